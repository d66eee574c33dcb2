"""L2SPPenalty: alpha * sum((w - ref)**2) against numpy, its reference rules, save/load."""

import json
import textwrap

import keras
import numpy as np
import pytest
from conftest import run_python
from keras import ops

import kerasreg
from kerasreg import L2SPPenalty


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def data(rng, n=16):
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 1)).astype(
        "float32"
    )


def model_with(**kwargs):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="hidden", **kwargs),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def total_loss(model):
    return float(sum(float(ops.convert_to_numpy(loss)) for loss in model.losses))


def test_regularize_takes_the_current_weights_as_reference(rng):
    model = model_with()
    model.fit(*data(rng), epochs=2, verbose=0)  # a "pretrained" model
    pretrained = [to_np(model.get_layer(n).kernel) for n in ("hidden", "out")]
    kerasreg.regularize(model, kernel=L2SPPenalty(0.3))
    assert total_loss(model) == 0.0  # w == ref: exactly zero
    model.fit(*data(rng), epochs=2, verbose=0)
    expected = sum(
        0.3 * ((to_np(model.get_layer(n).kernel) - ref) ** 2).sum()
        for n, ref in zip(("hidden", "out"), pretrained, strict=True)
    )
    assert total_loss(model) == pytest.approx(expected, rel=1e-5)
    # Each kernel got its own copy of the penalty.
    hidden, out = (model.get_layer(n).kernel.regularizer for n in ("hidden", "out"))
    assert hidden is not out and hidden == out  # equal configs, separate references
    stats = kerasreg.weight_norms(model)
    assert stats["hidden/kernel"]["penalty"] + stats["out/kernel"][
        "penalty"
    ] == pytest.approx(expected, rel=1e-5)


def test_constructor_penalty_measures_from_the_initial_weights(rng):
    keras.utils.set_random_seed(3)
    model = model_with(kernel_regularizer=L2SPPenalty(0.2))
    initial = to_np(model.get_layer("hidden").kernel)
    model.fit(*data(rng), epochs=3, verbose=0)
    w = to_np(model.get_layer("hidden").kernel)
    assert not np.allclose(w, initial)
    assert total_loss(model) == pytest.approx(
        0.2 * ((w - initial) ** 2).sum(), rel=1e-5
    )


def test_gradient_pulls_toward_the_reference(rng):
    # Zero data gradient, SGD: w <- w - lr * 2 * alpha * (w - ref) exactly.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: ops.mean(p) * 0.0
    )
    ref = to_np(model.layers[0].kernel)
    kerasreg.regularize(model, kernel=L2SPPenalty(0.5))
    model.layers[0].kernel.assign(np.zeros((3, 2)))
    model.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=4, epochs=3, verbose=0)
    w = np.zeros((3, 2))
    for _ in range(3):
        w = w - 0.1 * 2 * 0.5 * (w - ref)
    np.testing.assert_allclose(to_np(model.layers[0].kernel), w, rtol=1e-5, atol=1e-7)


def test_one_instance_on_two_weights_is_refused():
    shared = L2SPPenalty(0.1)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, kernel_regularizer=shared),
            keras.layers.Dense(3, kernel_regularizer=shared),
        ]
    )
    with pytest.raises(ValueError, match="two weights"):
        _ = model.losses


def test_no_reference_and_no_variable_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        L2SPPenalty(0.1)(ops.ones((2, 2)))
    with pytest.raises(ValueError, match="`alpha`"):
        L2SPPenalty(-1.0)


SAVE_LOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import kerasreg

    model = keras.saving.load_model(sys.argv[1])
    print(json.dumps([float(keras.ops.convert_to_numpy(l)) for l in model.losses]))
    """
)


def test_reference_survives_save_and_load_in_a_fresh_process(rng, tmp_path):
    model = model_with(kernel_regularizer=L2SPPenalty(0.2))
    model.fit(*data(rng), epochs=1, verbose=0)
    kerasreg.regularize(model, kernel=L2SPPenalty(0.7), where=kerasreg.layer("^out$"))
    model.fit(*data(rng), epochs=2, verbose=0)
    expected = [float(ops.convert_to_numpy(loss)) for loss in model.losses]
    assert all(v > 0 for v in expected)
    path = tmp_path / "l2sp.keras"
    model.save(path)
    script = tmp_path / "load.py"
    script.write_text(SAVE_LOAD)
    result = run_python(
        f"import runpy, sys; sys.argv = ['x', {str(path)!r}]; runpy.run_path({str(script)!r})"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == pytest.approx(expected, rel=1e-6)
