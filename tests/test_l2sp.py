"""L2SPPenalty: alpha * sum((w - ref)**2) against numpy, its reference rules, save/load."""

import io
import json
import textwrap
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import run_mirrored, run_python
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


def losses(model):
    return [float(ops.convert_to_numpy(loss)) for loss in model.losses]


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

    def values(model):
        return {
            "losses": [float(keras.ops.convert_to_numpy(l)) for l in model.losses],
            "norms": [
                r["penalty"] for r in kerasreg.weight_norms(model, ".").values()
            ],
        }

    model = keras.saving.load_model(sys.argv[1])
    # A model from the config alone, then the weights file: load_weights.
    other = keras.Sequential.from_config(model.get_config())
    other.load_weights(sys.argv[2])
    x = np.asarray(json.loads(sys.argv[3]), "float32")
    data = float(np.mean((keras.ops.convert_to_numpy(model(x)) - 1.0) ** 2))
    model.compile(optimizer="sgd", loss="mse")
    evaluated = model.evaluate(x, np.ones((len(x), 1)), verbose=0) - data
    print(json.dumps({"load_model": values(model), "load_weights": values(other),
                      "evaluate": evaluated}))
    """
)


def test_reference_survives_save_and_load_in_a_fresh_process(rng, tmp_path):
    model = model_with(kernel_regularizer=L2SPPenalty(0.2))
    model.fit(*data(rng), epochs=1, verbose=0)
    kerasreg.regularize(model, kernel=L2SPPenalty(0.7), where=kerasreg.layer("^out$"))
    model.fit(*data(rng), epochs=2, verbose=0)
    expected = [
        alpha
        * ((to_np(layer.kernel) - to_np(layer.kernel.regularizer.reference)) ** 2).sum()
        for alpha, layer in zip((0.2, 0.7), model.layers, strict=True)
    ]
    assert all(v > 0 for v in expected)
    path = tmp_path / "l2sp.keras"
    model.save(path)
    model.save_weights(tmp_path / "l2sp.weights.h5")
    x = data(rng, 4)[0]
    script = tmp_path / "load.py"
    script.write_text(SAVE_LOAD)
    argv = [str(path), str(tmp_path / "l2sp.weights.h5"), json.dumps(x.tolist())]
    result = run_python(
        f"import runpy, sys; sys.argv = ['x', *{argv!r}]; runpy.run_path({str(script)!r})"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for way in ("load_model", "load_weights"):
        assert loaded[way]["losses"] == pytest.approx(expected, rel=1e-5)
        norms = loaded[way]["norms"]  # hidden kernel, bias, out kernel, bias
        assert norms == pytest.approx([expected[0], 0, expected[1], 0], rel=1e-5)
    assert loaded["evaluate"] == pytest.approx(sum(expected), rel=1e-4, abs=1e-6)


OLD_FILE = Path(__file__).parent / "data" / "l2sp_v0.keras"


def test_a_file_of_the_previous_version_loads_with_its_reference():
    # tests/data/l2sp_v0.keras was written by kerasreg before the reference
    # became layer state (commit 803e4cd; Keras 3.8, the floor, and TensorFlow,
    # so that every supported Keras reads it): a Sequential
    # `hidden` Dense(4, kernel_regularizer=L2SPPenalty(0.2)) and `out`
    # Dense(1) given L2SPPenalty(0.7) by `regularize`, each fitted away from
    # its reference. The reference is read here with h5py, alpha with json.
    with zipfile.ZipFile(OLD_FILE) as archive:
        config = json.loads(archive.read("config.json"))
        h5 = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    layers = config["config"]["layers"][1:]
    alphas = [
        layer["config"]["kernel_regularizer"]["config"]["alpha"] for layer in layers
    ]
    refs = [
        h5[f"layers/{g}/kernel_regularizer/vars/0"][()] for g in ("dense", "dense_1")
    ]
    kernels = [h5[f"layers/{g}/vars/0"][()] for g in ("dense", "dense_1")]
    expected = [
        a * ((k.astype(np.float64) - r) ** 2).sum()
        for a, k, r in zip(alphas, kernels, refs, strict=True)
    ]
    assert alphas == [0.2, 0.7] and all(v > 0 for v in expected)
    model = keras.saving.load_model(OLD_FILE)
    assert losses(model) == pytest.approx(expected, rel=1e-5)
    penalties = [r["penalty"] for r in kerasreg.weight_norms(model).values()]
    assert penalties == pytest.approx(expected, rel=1e-5)
    # load_weights into a model whose penalties already have a reference.
    other = model_with(kernel_regularizer=L2SPPenalty(0.2))
    kerasreg.regularize(other, kernel=L2SPPenalty(0.7), where=kerasreg.layer("^out$"))
    assert total_loss(other) == 0.0
    other.load_weights(OLD_FILE)
    assert losses(other) == pytest.approx(expected, rel=1e-5)


# --- the reference is state that every compiled step reads (issue 23, item 1) ----

ALPHA = 0.5
LR = 0.1


def zero_data_loss(y, p):
    """No data gradient: the loss is exactly the penalty."""
    return ops.mean(p) * 0.0


def anchored(alpha=ALPHA, *, compiled=True):
    """Dense(3 -> 2) without bias, L2-SP attached by `regularize`, SGD."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, use_bias=False, name="d")]
    )
    if compiled:
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=zero_data_loss)
    kerasreg.regularize(model, kernel=L2SPPenalty(alpha))
    return model


X, Y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")


def l2sp(w, ref, alpha=ALPHA):
    return alpha * ((np.asarray(w, np.float64) - ref) ** 2).sum()


def move_anchor(kernel, new):
    """`set_reference(kernel)` with `kernel` at `new`, then `kernel` as it was."""
    w = to_np(kernel)
    kernel.assign(new)
    kernel.regularizer.set_reference(kernel)
    kernel.assign(w)


def assert_everywhere(model, expected):
    """Eager `model.losses`, compiled `evaluate` and `weight_norms` agree."""
    assert total_loss(model) == pytest.approx(expected, rel=1e-5)
    assert model.evaluate(X, Y, verbose=0) == pytest.approx(expected, rel=1e-5)
    norms = kerasreg.weight_norms(model)
    assert norms["d/kernel"]["penalty"] == pytest.approx(expected, rel=1e-5)


def test_set_reference_reaches_every_compiled_step(rng):
    model = anchored()
    kernel = model.layers[0].kernel
    assert_everywhere(model, 0.0)  # compiles evaluate and weight_norms
    kernel.assign(rng.normal(size=(3, 2)))
    w = to_np(kernel)
    assert_everywhere(model, l2sp(w, w0 := to_np(kernel.regularizer.reference)))
    new = rng.normal(size=(3, 2))
    move_anchor(kernel, new)
    assert_everywhere(model, l2sp(w, new))
    assert not np.allclose(w0, new)
    # train_on_batch: the loss of the step, then one SGD step toward `new`.
    loss = model.train_on_batch(X, Y)
    assert float(np.ravel(loss)[0]) == pytest.approx(l2sp(w, new), rel=1e-5)
    expected = w - LR * 2 * ALPHA * (w - new)
    np.testing.assert_allclose(to_np(kernel), expected, rtol=1e-5, atol=1e-7)


def test_fit_after_set_reference_pulls_toward_the_new_anchor(rng):
    model = anchored()
    kernel = model.layers[0].kernel
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)  # traced with the old anchor
    w = to_np(kernel)
    new = rng.normal(size=(3, 2))
    move_anchor(kernel, new)
    model.fit(X, Y, batch_size=4, epochs=3, verbose=0)
    for _ in range(3):  # plain SGD on alpha * sum((w - new)**2)
        w = w - LR * 2 * ALPHA * (w - new)
    np.testing.assert_allclose(to_np(kernel), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param(
            {"steps_per_execution": 2},
            marks=pytest.mark.skipif(
                keras.backend.backend() == "torch",
                reason="Keras refuses steps_per_execution > 1 on PyTorch",
            ),
        ),
        {"gradient_accumulation_steps": 2},
        {"jit_compile": False},
    ],
    ids=["steps_per_execution", "gradient_accumulation", "no_jit"],
)
def test_set_reference_reaches_loops_that_change_the_step(rng, loop):
    loop = dict(loop)
    accumulate = loop.pop("gradient_accumulation_steps", 1)
    model = anchored(compiled=False)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, gradient_accumulation_steps=accumulate)
        if accumulate > 1
        else keras.optimizers.SGD(LR),
        loss=zero_data_loss,
        **loop,
    )
    kernel = model.layers[0].kernel
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0)  # traced with the old anchor
    kernel.assign(rng.normal(size=(3, 2)))
    w = to_np(kernel)
    new = rng.normal(size=(3, 2))
    move_anchor(kernel, new)
    model.fit(X, Y, batch_size=2, epochs=3, verbose=0)  # 6 batches
    # Plain SGD on alpha * sum((w - new)**2), one update per `accumulate`
    # batches (the accumulated gradients are all taken at the same w).
    for _ in range(6 // accumulate):
        w = w - LR * 2 * ALPHA * (w - new)
    np.testing.assert_allclose(to_np(kernel), w, rtol=1e-5, atol=1e-7)


MIRRORED = """
from kerasreg import L2SPPenalty, regularize

def run(strategy, scoped, move=True):
    # 3-4-1 from `init`, L2-SP attached inside or outside the strategy's
    # scope; one epoch, the anchors moved to ones, two more epochs.
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ])
        model.set_weights(init)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        if scoped:
            regularize(model, kernel=L2SPPenalty(0.5))
    if not scoped:
        regularize(model, kernel=L2SPPenalty(0.5))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    if move:
        for layer in model.layers:
            layer.kernel.regularizer.set_reference(np.ones(layer.kernel.shape))
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for v in model.weights:
        copies = getattr(v.value, "values", [v.value])
        for c in copies:
            np.testing.assert_array_equal(c.numpy(), copies[0].numpy())
    return [w.tolist() for w in model.get_weights()]

print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "one": run(one, True),
    "mirrored": run(mirrored, True),
    "mirrored_unscoped": run(mirrored, False),
    "not_moved": run(mirrored, True, move=False),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow only"
)
def test_set_reference_reaches_mirrored_replicas():
    out = run_mirrored(MIRRORED)
    for run in ("mirrored", "mirrored_unscoped"):
        for a, b in zip(out["one"], out[run], strict=True):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6)
    # The moved anchors did act on every replica: the kernels differ without.
    gap = np.abs(np.array(out["not_moved"][0]) - np.array(out["mirrored"][0])).max()
    assert gap > 1e-3


def test_load_weights_replaces_the_reference(rng, tmp_path):
    source = anchored()
    source.layers[0].kernel.assign(rng.normal(size=(3, 2)))
    ref = rng.normal(size=(3, 2))
    move_anchor(source.layers[0].kernel, ref)
    w = to_np(source.layers[0].kernel)
    # Optimizers built as `model`'s will be: their variables load without a warning.
    source.optimizer.build(source.trainable_variables)
    source.save_weights(tmp_path / "source.weights.h5")
    # A file saved before its penalty's first use holds no reference.
    fresh = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                2, use_bias=False, name="d", kernel_regularizer=L2SPPenalty(ALPHA)
            ),
        ]
    )
    fresh.compile(optimizer=keras.optimizers.SGD(LR), loss=zero_data_loss)
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.save_weights(tmp_path / "unused.weights.h5")

    model = anchored()
    assert_everywhere(model, 0.0)  # compiled with its own reference
    model.load_weights(tmp_path / "source.weights.h5")
    np.testing.assert_array_equal(to_np(model.layers[0].kernel), w)
    assert_everywhere(model, l2sp(w, ref))
    # Loaded with no reference: the reference is the loaded weight, as the
    # first use of the saved model's penalty would take.
    model.load_weights(tmp_path / "unused.weights.h5")
    np.testing.assert_array_equal(
        to_np(model.layers[0].kernel.regularizer.reference),
        to_np(fresh.layers[0].kernel),
    )
    assert_everywhere(model, 0.0)


def test_the_reference_is_state_not_a_weight(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    weights = [id(v) for v in model.weights]
    kerasreg.regularize(model, kernel=L2SPPenalty(ALPHA))
    kerasreg.regularize(model, kernel=L2SPPenalty(ALPHA))  # replaced, not added
    refs = [layer.kernel.regularizer.reference for layer in model.layers]
    assert [id(v) for v in model.weights] == weights  # get_weights, summary: same
    state = [id(v) for v in model.non_trainable_variables]
    assert [id(r) in state for r in refs] == [True, True]  # what trainers pass
    assert len(state) == 2  # the replaced penalties' references left with them
    assert not any(r.trainable for r in refs)
    before = [to_np(r) for r in refs]
    assert len(kerasreg.weight_norms(model, ".")) == 4  # kernels and biases
    kerasreg.shrink_weights(model, 0.5, where=".")
    model.fit(
        rng.normal(size=(8, 3)), rng.normal(size=(8, 1)), epochs=1, verbose=0,
        callbacks=[kerasreg.WeightDecay(0.5, where=".")],
    )  # fmt: skip
    for r, b in zip(refs, before, strict=True):
        np.testing.assert_array_equal(to_np(r), b)


def test_set_reference_copies_between_penalties_and_refuses_bad_values(rng):
    model = anchored(compiled=False)
    clone = keras.models.clone_model(model)
    original = model.layers[0].kernel.regularizer
    copy = clone.layers[0].kernel.regularizer
    assert copy.reference is None  # from the config alone
    copy.set_reference(original.reference)
    np.testing.assert_array_equal(to_np(copy.reference), to_np(original.reference))
    clone.layers[0].kernel.assign(model.layers[0].kernel)
    assert total_loss(clone) == 0.0
    new = rng.normal(size=(3, 2))
    copy.set_reference(new)  # an array: copied into the reference in place
    w = to_np(clone.layers[0].kernel)
    assert total_loss(clone) == pytest.approx(l2sp(w, new), rel=1e-5)
    penalty = kerasreg.weight_norms(clone)["d/kernel"]["penalty"]
    assert penalty == pytest.approx(l2sp(w, new), rel=1e-5)
    before = to_np(copy.reference)
    with pytest.raises(ValueError, match=r"`value`.*\(3, 2\).*\(2, 3\)"):
        copy.set_reference(np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"`value`.*floats"):
        copy.set_reference(np.array([["a", "b"]] * 3))
    np.testing.assert_array_equal(to_np(copy.reference), before)  # unchanged
