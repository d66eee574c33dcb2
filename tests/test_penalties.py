"""Penalties against numpy formulas, Keras built-ins, and serialization round trips."""

import json
import math

import keras
import numpy as np
import pytest
from conftest import run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

import kerasreg
from kerasreg import ElasticNetPenalty, ExpAbsPenalty, L1Penalty, L2Penalty

# JAX computes in float32 unless x64 is enabled; compare float64 math accordingly.
X64 = keras.backend.backend() != "jax"


def rel64(w):
    """Relative tolerance of a penalty summed over `w`'s elements: float64's,
    or in float32 the bound of a sum of n same-sign terms, each rounded once
    (n + 4 roundings of at most 2**-24 each, twice: both sides of a
    comparison are rounded)."""
    return 1e-9 if X64 else 2 * (np.size(w) + 4) * 2.0**-24


SHAPES = [(7,), (5, 3), (2, 3, 4), (3, 3, 2, 4)]


def np_value(penalty, w):
    """Independent float64 numpy formula for each penalty."""
    w = np.asarray(w, dtype=np.float64)
    a = np.abs(w)
    if isinstance(penalty, L1Penalty):
        return penalty.l1 * a.sum()
    if isinstance(penalty, L2Penalty):
        return penalty.l2 * (w**2).sum()
    if isinstance(penalty, ElasticNetPenalty):
        return penalty.l1 * a.sum() + penalty.l2 * (w**2).sum()
    if isinstance(penalty, ExpAbsPenalty):
        return penalty.factor * np.expm1(a).sum()
    raise AssertionError(penalty)


ALL = [
    L1Penalty(0.03),
    L2Penalty(0.02),
    ElasticNetPenalty(0.01, 0.05),
    ExpAbsPenalty(0.1),
]


def value(penalty, w, dtype="float32"):
    return float(ops.convert_to_numpy(penalty(ops.convert_to_tensor(w, dtype=dtype))))


# --- values -----------------------------------------------------------------


@pytest.mark.parametrize("penalty", ALL, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_value_matches_numpy(penalty, shape, dtype, rng):
    w = rng.normal(size=shape).astype(dtype)
    expected = np_value(penalty, w)
    assert value(penalty, w, dtype) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("penalty", ALL, ids=repr)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_accumulate_in_float32(penalty, dtype, rng):
    # 40_000 weights of magnitude ~200: a float16 sum of squares would be inf.
    w = rng.uniform(150, 250, size=(200, 200)) * rng.choice([-1, 1], (200, 200))
    if isinstance(penalty, ExpAbsPenalty):
        w = w / 100.0
    tensor = ops.convert_to_tensor(w, dtype=dtype)
    result = penalty(tensor)
    assert keras.backend.standardize_dtype(result.dtype) == "float32"
    assert tuple(result.shape) == ()
    rounded = ops.convert_to_numpy(ops.cast(tensor, "float64"))
    assert float(ops.convert_to_numpy(result)) == pytest.approx(
        np_value(penalty, rounded), rel=1e-5
    )


@pytest.mark.parametrize(
    "ours, builtin",
    [
        (L1Penalty(0.037), keras.regularizers.L1(0.037)),
        (L2Penalty(0.021), keras.regularizers.L2(0.021)),
        (ElasticNetPenalty(0.013, 0.029), keras.regularizers.L1L2(0.013, 0.029)),
    ],
    ids=["L1", "L2", "L1L2"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equal_to_keras_builtin(ours, builtin, shape, rng):
    w = ops.convert_to_tensor(rng.normal(size=shape), dtype="float32")
    a = float(ops.convert_to_numpy(ours(w)))
    b = float(ops.convert_to_numpy(builtin(w)))
    assert a == pytest.approx(b, rel=1e-6)


def test_returns_scalar_tensor():
    for penalty in ALL:
        out = penalty(ops.ones((3, 4)))
        assert tuple(out.shape) == ()


# --- ExpAbsPenalty overflow safety ------------------------------------------


def exp_abs_reference(a):
    """The documented continuation, in float64: exact up to 20, Taylor beyond."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    c = 20.0
    d = np.maximum(a - c, 0.0)
    exact = np.expm1(np.minimum(a, c))
    return exact + math.exp(c) * (d + 0.5 * d * d)


def exp_abs_reference_grad(w):
    w = np.asarray(w, dtype=np.float64)
    a = np.abs(w)
    slope = np.where(
        a <= 20.0, np.exp(np.minimum(a, 20.0)), math.exp(20.0) * (1 + a - 20.0)
    )
    return np.sign(w) * slope


def grad_of(penalty, w):
    import tensorflow as tf

    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(lambda x: penalty(x))(np.asarray(w, np.float32)))
    if keras.backend.backend() == "torch":
        import torch

        x = torch.tensor(np.asarray(w, np.float32), requires_grad=True)
        penalty(x).backward()
        return x.grad.numpy()
    x = tf.Variable(np.asarray(w, np.float32))
    with tf.GradientTape() as tape:
        y = penalty(x)
    return tape.gradient(y, x).numpy()


EXP_POINTS = np.array(
    [
        -1e6,
        -1e4,
        -100.0,
        -88.8,
        -25.0,
        -20.0,
        -3.0,
        -1e-7,
        0.0,
        1e-7,
        0.5,
        2.0,
        19.9,
        20.0,
        20.1,
        50.0,
        88.8,
        89.0,
        1e3,
        1e5,
        1e6,
    ],
    dtype=np.float32,
)


def test_exp_abs_exact_up_to_20():
    w = np.linspace(-20, 20, 2001, dtype=np.float32)
    for x in w[::50]:
        got = value(ExpAbsPenalty(1.0), np.array([x], np.float32))
        assert got == pytest.approx(np.expm1(abs(np.float64(x))), rel=2e-6, abs=1e-12)


def test_exp_abs_finite_value_and_gradient_up_to_1e6():
    penalty = ExpAbsPenalty(1.0)
    for x in EXP_POINTS:
        w = np.array([x], np.float32)
        got = value(penalty, w)
        assert math.isfinite(got)
        assert got == pytest.approx(
            float(exp_abs_reference(w).sum()), rel=1e-5, abs=1e-12
        )
        g = grad_of(penalty, w)
        assert np.all(np.isfinite(g))
        assert np.sign(g[0]) == np.sign(x)
        assert g[0] == pytest.approx(exp_abs_reference_grad(w)[0], rel=1e-5, abs=1e-12)


def test_exp_abs_small_gradients_survive_next_to_huge_weights():
    # A large weight in the same tensor must not wipe out the tiny weights' gradient.
    w = np.array([1e-6, -3e-5, 0.25, 1e6, -5e5], np.float32)
    g = grad_of(ExpAbsPenalty(1.0), w)
    np.testing.assert_allclose(g, exp_abs_reference_grad(w), rtol=1e-5)


def test_exp_abs_continuation_smooth_and_monotone():
    a = np.linspace(0, 200, 4001).astype(np.float32)
    values = np.array([value(ExpAbsPenalty(1.0), np.array([x])) for x in a[::40]])
    assert np.all(np.diff(values) > 0)
    # value and slope continuous at the join
    left, right = 20.0 - 1e-3, 20.0 + 1e-3
    v = [
        value(ExpAbsPenalty(1.0), np.array([x], np.float64), "float64")
        for x in (left, right)
    ]
    assert v[1] - v[0] == pytest.approx(2e-3 * math.exp(20.0), rel=1e-3)
    g = [grad_of(ExpAbsPenalty(1.0), np.array([x]))[0] for x in (left, 20.0, right)]
    # slope continuous across the join: both sides within 0.1% of exp(20)
    assert g[0] == pytest.approx(math.exp(left), rel=1e-5)
    assert g[2] == pytest.approx(math.exp(20.0) * (1 + 1e-3), rel=1e-5)
    assert g[1] == pytest.approx(math.exp(20.0), rel=1e-5)


# --- properties -------------------------------------------------------------

finite_arrays = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.floats(-50, 50, allow_nan=False, width=64),
)
factors = st.floats(0, 10, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(w=finite_arrays, f=factors)
def test_non_negative(w, f):
    for penalty in (
        L1Penalty(f),
        L2Penalty(f),
        ElasticNetPenalty(f, f),
        ExpAbsPenalty(f),
    ):
        assert value(penalty, w, "float64") >= 0.0


@settings(max_examples=60, deadline=None)
@given(w=finite_arrays, t=st.floats(-20, 20, allow_nan=False))
def test_homogeneity(w, t):
    # L1 is 1-homogeneous, L2 is 2-homogeneous.
    assert value(L1Penalty(0.3), t * w, "float64") == pytest.approx(
        abs(t) * value(L1Penalty(0.3), w, "float64"), rel=rel64(w), abs=1e-9
    )
    assert value(L2Penalty(0.3), t * w, "float64") == pytest.approx(
        t * t * value(L2Penalty(0.3), w, "float64"), rel=rel64(w), abs=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(w=finite_arrays, l1=factors, l2=factors)
def test_elastic_net_is_l1_plus_l2(w, l1, l2):
    total = value(ElasticNetPenalty(l1, l2), w, "float64")
    parts = value(L1Penalty(l1), w, "float64") + value(L2Penalty(l2), w, "float64")
    assert total == pytest.approx(parts, rel=rel64(w), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(0, 5), ratio=st.floats(0, 1), w=finite_arrays)
def test_from_ratio_matches_sklearn_formula(alpha, ratio, w):
    penalty = ElasticNetPenalty.from_ratio(alpha, ratio)
    w64 = np.asarray(w, np.float64)
    expected = alpha * (ratio * np.abs(w64).sum() + 0.5 * (1 - ratio) * (w64**2).sum())
    assert value(penalty, w, "float64") == pytest.approx(
        expected, rel=rel64(w), abs=1e-9
    )


# --- argument validation ----------------------------------------------------

ACCEPTED = [
    0,
    3,
    0.5,
    np.float32(0.25),
    np.float64(1e-4),
    np.int64(2),
    np.array(0.125),
    np.array(7),
]


@pytest.mark.parametrize("cls", [L1Penalty, L2Penalty, ExpAbsPenalty])
@pytest.mark.parametrize("good", ACCEPTED, ids=repr)
def test_accepts_real_scalars(cls, good):
    penalty = cls(good)
    (stored,) = penalty.get_config().values()
    assert type(stored) is float and stored == float(good)


REJECTED = [
    (-0.1, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (-float("inf"), ValueError),
    (np.float32("nan"), ValueError),
    ("0.1", TypeError),
    ([0.1], TypeError),
    ((0.1,), TypeError),
    (np.array([0.1, 0.2]), TypeError),
    (np.array([0.1]), TypeError),
    (None, TypeError),
    (True, TypeError),
    (1 + 2j, TypeError),
]


@pytest.mark.parametrize(
    "cls, name",
    [
        (L1Penalty, "l1"),
        (L2Penalty, "l2"),
        (ExpAbsPenalty, "factor"),
        (ElasticNetPenalty, "l2"),
    ],
)
@pytest.mark.parametrize("bad, error", REJECTED, ids=lambda x: repr(x)[:20])
def test_rejects_bad_factors(cls, name, bad, error):
    with pytest.raises(error) as info:
        cls(**{name: bad})
    message = str(info.value)
    assert f"`{name}`" in message
    assert repr(bad) in message
    assert ">= 0" in message


@pytest.mark.parametrize(
    "alpha, ratio", [(-1, 0.5), (1, 1.5), (1, -0.1), (float("nan"), 0.5)]
)
def test_from_ratio_rejects(alpha, ratio):
    with pytest.raises(ValueError, match=r"alpha|l1_ratio"):
        ElasticNetPenalty.from_ratio(alpha, ratio)


# --- config, equality, repr, get --------------------------------------------


@pytest.mark.parametrize("penalty", ALL, ids=repr)
def test_config_round_trip(penalty):
    config = penalty.get_config()
    assert json.loads(json.dumps(config)) == config
    assert all(type(v) is float for v in config.values())
    clone = type(penalty).from_config(config)
    assert clone == penalty and clone is not penalty
    serialized = keras.regularizers.serialize(penalty)
    assert serialized["registered_name"] == f"kerasreg>{type(penalty).__name__}"
    text = json.dumps(serialized)
    restored = keras.regularizers.deserialize(json.loads(text))
    assert type(restored) is type(penalty) and restored == penalty


def test_equality_and_hash():
    assert L2Penalty(0.1) == L2Penalty(np.float64(0.1))
    assert L2Penalty(0.1) != L2Penalty(0.2)
    assert L2Penalty(0.1) != L1Penalty(0.1)
    assert L2Penalty(0.1) != keras.regularizers.L2(0.1)
    assert len({L2Penalty(0.1), L2Penalty(0.1), L1Penalty(0.1)}) == 2


def test_repr():
    assert repr(L2Penalty(0.5)) == "L2Penalty(l2=0.5)"
    assert repr(ElasticNetPenalty(0.1, 0.2)) == "ElasticNetPenalty(l1=0.1, l2=0.2)"
    assert eval(repr(ExpAbsPenalty(0.25)), vars(kerasreg)) == ExpAbsPenalty(0.25)


def test_names_do_not_collide_with_keras_builtins():
    builtin = {n.lower() for n in dir(keras.regularizers)}
    for cls in kerasreg.penalties.PENALTIES:
        assert cls.__name__.lower() not in builtin


@pytest.mark.parametrize(
    "identifier, expected",
    [
        ("L2Penalty", L2Penalty()),
        ("l2_penalty", L2Penalty()),
        ("kerasreg>L2Penalty", L2Penalty()),
        ("elastic_net_penalty", ElasticNetPenalty()),
        ("ExpAbsPenalty", ExpAbsPenalty()),
        ("kerasreg>L1Penalty", L1Penalty()),
        (L1Penalty, L1Penalty()),
        ({"class_name": "L2Penalty", "config": {"l2": 0.3}}, L2Penalty(0.3)),
    ],
    ids=repr,
)
def test_get_resolves_kerasreg(identifier, expected):
    assert kerasreg.get(identifier) == expected


def test_get_passes_through_and_builtins():
    assert kerasreg.get(None) is None
    p = L1Penalty(0.2)
    assert kerasreg.get(p) is p
    assert kerasreg.get(keras.regularizers.serialize(p)) == p
    assert isinstance(kerasreg.get("l2"), keras.regularizers.L2)
    assert isinstance(kerasreg.get("L1L2"), keras.regularizers.L1L2)
    fn = lambda w: ops.sum(w)  # noqa: E731
    assert kerasreg.get(fn) is fn


@pytest.mark.parametrize(
    "bad",
    [
        "l3",
        "L2penalty ",
        42,
        0.1,
        [L2Penalty()],
        {"class_name": "Nope", "config": {}},
        int,
    ],
)
def test_get_rejects(bad):
    with pytest.raises(ValueError, match="Could not interpret regularizer identifier"):
        kerasreg.get(bad)


# --- inside Keras: layers, training, save/load -------------------------------


def test_sgd_step_matches_hand_computed_gradient(rng):
    # One SGD step on mean squared error + penalty; gradient computed by hand in numpy.
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    w0 = rng.normal(size=(3, 2)).astype("float32")
    lr, l1, l2 = 0.1, 0.01, 0.02
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                2, use_bias=False, kernel_regularizer=ElasticNetPenalty(l1, l2)
            ),
        ]
    )
    model.set_weights([w0])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.train_on_batch(x, y)
    w = w0.astype(np.float64)
    residual = x @ w - y
    grad = 2 * x.T @ residual / residual.size + l1 * np.sign(w) + 2 * l2 * w
    np.testing.assert_allclose(
        model.get_weights()[0], w - lr * grad, rtol=1e-5, atol=1e-6
    )


def test_penalty_appears_in_model_losses(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, kernel_regularizer=ExpAbsPenalty(0.5)),
        ]
    )
    kernel = model.layers[0].kernel
    expected = np_value(ExpAbsPenalty(0.5), ops.convert_to_numpy(kernel))
    assert float(ops.convert_to_numpy(ops.sum(model.losses))) == pytest.approx(
        expected, rel=1e-6
    )


def recurrent_model_with_every_penalty():
    inp = keras.Input((6, 4))
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(
            3,
            return_sequences=True,
            kernel_regularizer=L1Penalty(0.01),
            recurrent_regularizer=ExpAbsPenalty(0.02),
            bias_regularizer=L2Penalty(0.03),
        )
    )(inp)
    x = keras.layers.GRU(
        3,
        kernel_regularizer=ElasticNetPenalty(0.01, 0.02),
        recurrent_regularizer=L2Penalty(0.05),
    )(x)
    x = keras.layers.Dense(
        5,
        kernel_regularizer=ExpAbsPenalty(0.1),
        bias_regularizer=L1Penalty(0.2),
        activity_regularizer=L2Penalty(0.04),
    )(x)
    return keras.Model(inp, x)


# One fresh process: Keras alone cannot load the file; after `import kerasreg`
# it loads it with kerasreg's penalties.
LOAD_SCRIPT = """
import json, sys, traceback
import keras, numpy as np
try:
    keras.saving.load_model(PATH, safe_mode=True)
    bare = "LOADED"
except Exception:
    bare = traceback.format_exc()
assert "kerasreg" not in sys.modules, "Keras imported kerasreg by itself"
import kerasreg
model = keras.saving.load_model(PATH, safe_mode=True)
data = np.random.default_rng(0).normal(size=(2, 6, 4)).astype("float32")
model(data)
regs = [
    type(v.regularizer).__module__ + "." + type(v.regularizer).__name__
    for v in model.weights
    if v.regularizer is not None
]
act = model.layers[-1].activity_regularizer
regs.append(type(act).__module__ + "." + type(act).__name__)
print(json.dumps([bare, sorted(float(v) for v in model.losses), sorted(regs)]))
"""


def test_save_load_in_fresh_process(tmp_path):
    path = tmp_path / "model.keras"
    keras.utils.set_random_seed(3)
    model = recurrent_model_with_every_penalty()
    model.compile("sgd", "mse")
    model(np.random.default_rng(0).normal(size=(2, 6, 4)).astype("float32"))
    model.save(path)
    saved_losses = sorted(float(v) for v in model.losses)
    # LSTM forward + backward (3 each), GRU (2), Dense kernel, bias and activity (3)
    assert len(saved_losses) == 11

    load = run_python(f"PATH = {str(path)!r}\n" + LOAD_SCRIPT)
    assert load.returncode == 0, load.stderr[-3000:]
    bare, loaded_losses, regs = json.loads(load.stdout.strip().splitlines()[-1])
    # Keras names the unknown registered penalty; it never falls back to a built-in.
    assert bare != "LOADED"
    assert "kerasreg>" in bare
    assert "Could not interpret regularizer identifier" in bare
    np.testing.assert_allclose(loaded_losses, saved_losses, rtol=1e-6)
    assert all(r.startswith("kerasreg.penalties.") for r in regs)
    # weights: forward + backward LSTM (3 each), GRU (2), Dense (2); + activity
    assert len(regs) == 11


# --- issue 16 items 11 and 12: names in Keras layers, config errors ----------


def test_where_names_work_in_keras_layers():
    """Item 11: Keras resolves only its built-in names; class and dict work."""
    with pytest.raises(ValueError, match="Could not interpret regularizer"):
        keras.layers.Dense(2, kernel_regularizer="l2_penalty")
    with pytest.raises(ValueError, match="Could not interpret regularizer"):
        keras.layers.Dense(2, kernel_regularizer="kerasreg>L2Penalty")
    by_class = keras.layers.Dense(2, kernel_regularizer=L2Penalty)
    assert by_class.kernel_regularizer == L2Penalty()
    registered = keras.saving.get_registered_object("kerasreg>L2Penalty")
    assert keras.layers.Dense(2, kernel_regularizer=registered).kernel_regularizer == (
        L2Penalty()
    )
    config = {"class_name": "kerasreg>L2Penalty", "config": {"l2": 1e-4}}
    by_dict = keras.layers.Dense(2, kernel_regularizer=config)
    assert by_dict.kernel_regularizer == L2Penalty(1e-4)
    by_get = keras.layers.Dense(2, kernel_regularizer=kerasreg.get("l2_penalty"))
    assert by_get.kernel_regularizer == L2Penalty()


@pytest.mark.parametrize(
    "config, cause",
    [
        ({"class_name": "kerasreg>L2Penalty", "config": {"l2": -1.0}}, "invalid `l2`"),
        ({"class_name": "L2Penalty", "config": {"l3": 1.0}}, "unexpected keyword"),
    ],
)
def test_config_dict_error_leads_with_the_cause(config, cause):
    """Item 12: the constructor's complaint comes first, not a generic message."""
    with pytest.raises(ValueError) as info:
        kerasreg.get(config)
    message = str(info.value)
    assert message.startswith("Invalid regularizer config")
    assert cause in message.split("\n")[0]
    assert "Could not interpret" not in message
    assert "could not be deserialized properly" not in message
