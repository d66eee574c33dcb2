"""Precision policies: finite values within 1e-3 of a float64 reference.

Under `mixed_float16`, `mixed_bfloat16` and pure `float16`, penalties,
`WeightDecay`, `shrink_weights`, `weight_norms` and `WeightNormLogger` are
compared with numpy float64 computed from the very same weights (read back
from the variables, so the only difference is kerasreg's arithmetic). The
weights are large enough that a float16 sum of squares (or a float16
`exp(|w|)`) would overflow 65504.
"""

from itertools import pairwise

import keras
import numpy as np
import pytest
from conftest import np_exp_abs_terms, np_penalty, np_stats, read_scalars
from keras import ops

import kerasreg

RTOL = 1e-3
FLOAT16_MAX = 65504.0
POLICIES = ["mixed_float16", "mixed_bfloat16", "float16"]


@pytest.fixture(params=POLICIES)
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy(previous)


def test_policy_is_restored_after_each_test():
    assert keras.config.dtype_policy().name == "float32"


# --- references ----------------------------------------------------------------


def np_value(variable):
    """The variable's exact value as float64 (float16 -> float64 is exact)."""
    return np.asarray(ops.convert_to_numpy(ops.cast(variable.value, "float32")), "f8")


# --- a model whose float16 sums of squares overflow ------------------------------

PENALTIES = {
    "d0/kernel": kerasreg.L2Penalty(0.01),
    "d0/bias": kerasreg.L1Penalty(0.01),
    "d1/kernel": kerasreg.ElasticNetPenalty(0.001, 0.01),
    "d2/kernel": kerasreg.ExpAbsPenalty(0.001),
}


def build(rng):
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                16,
                activation="tanh",
                kernel_regularizer=PENALTIES["d0/kernel"],
                bias_regularizer=PENALTIES["d0/bias"],
                name="d0",
            ),
            keras.layers.Dense(
                4,
                activation="tanh",
                kernel_regularizer=PENALTIES["d1/kernel"],
                name="d1",
            ),
            keras.layers.Dense(
                1,
                activation="tanh",
                kernel_regularizer=PENALTIES["d2/kernel"],
                name="d2",
            ),
        ]
    )
    signs = rng.choice([-1.0, 1.0], size=(8, 16))
    model.set_weights(
        [
            rng.uniform(30, 60, (8, 16)) * signs,  # sum of squares ~ 2.8e5
            rng.uniform(-2, 2, 16),
            rng.uniform(40, 70, (16, 4)),  # sum of squares ~ 1.9e5
            np.zeros(4),
            # exp(12) = 1.6e5 overflows float16; the gradient stays representable.
            np.array([[3.0], [-12.0], [11.5], [-7.0]]),
            np.zeros(1),
        ]
    )
    return model


def by_role(model):
    return {v.path.split("/", 1)[1]: v for v in model.weights}


def assert_close(actual, expected, what):
    assert np.all(np.isfinite(actual)), f"{what}: not finite: {actual}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, err_msg=what)


def test_weights_really_overflow_float16(rng):
    # Guard on the test itself: the float16 arithmetic it protects against fails.
    model = build(rng)
    with np.errstate(over="ignore"):
        for role in ("d0/kernel", "d1/kernel"):
            w = np.asarray(np_value(by_role(model)[role]), np.float16)
            assert np.isinf(np.sum(w * w, dtype=np.float16)), role
        assert np.isinf(np.expm1(np.float16(12.0)))


# --- penalties ----------------------------------------------------------------


def test_penalties_in_model_losses(policy, rng):
    model = build(rng)
    variables = by_role(model)
    compute = keras.config.dtype_policy().compute_dtype
    expected_dtype = "float16" if policy == "float16" else "float32"
    assert keras.backend.standardize_dtype(variables["d0/kernel"].dtype) == (
        expected_dtype
    ), compute
    # Keras adds exactly `variable.regularizer(variable)` for each weight.
    losses = [float(ops.convert_to_numpy(x)) for x in model.losses]
    expected = [np_penalty(p, np_value(variables[r])) for r, p in PENALTIES.items()]
    assert_close(losses, expected, f"{policy}: model.losses")
    for loss in model.losses:
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"


@pytest.mark.parametrize("magnitude", [12.0, 25.0, 100.0, 1e4])
def test_exp_abs_penalty_finite_on_policy_weights(policy, magnitude):
    layer = keras.layers.Dense(
        2, kernel_regularizer=kerasreg.ExpAbsPenalty(1e-3), use_bias=False
    )
    layer.build((None, 2))
    layer.kernel.assign(np.array([[magnitude, -magnitude], [0.5, -1.0]]))
    (loss,) = layer.losses
    value = float(ops.convert_to_numpy(loss))
    expected = 1e-3 * np_exp_abs_terms(np_value(layer.kernel)).sum()
    assert_close(value, expected, f"{policy}: ExpAbsPenalty at |w|={magnitude}")


# --- decay --------------------------------------------------------------------


def test_shrink_weights_matches_float64(policy, rng):
    model = build(rng)
    before = {r: np_value(v) for r, v in by_role(model).items()}
    norms = kerasreg.shrink_weights(model, 0.98)
    after = {r: np_value(v) for r, v in by_role(model).items()}
    for role in before:
        if role.endswith("kernel"):
            assert_close(after[role], before[role] * 0.98, f"{policy}: {role}")
            row = norms[role]
            assert_close(row["before"], np_stats(before[role])["l2"], role)
            assert_close(row["after"], np_stats(after[role])["l2"], role)
        else:
            np.testing.assert_array_equal(after[role], before[role])


class WeightRecorder(keras.callbacks.Callback):
    """Copies every weight after each batch (listed after WeightDecay)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_begin(self, logs=None):
        self.steps = [[np_value(v) for v in self.model.weights]]

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append([np_value(v) for v in self.model.weights])


def test_weight_decay_during_fit_matches_float64(policy, rng):
    model = build(rng)
    # Zero learning rate: only the decay moves the weights.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(size=(24, 8)).astype("float32")
    y = rng.uniform(-1, 1, (24, 1)).astype("float32")
    recorder = WeightRecorder()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[kerasreg.WeightDecay(0.02), recorder],
    )
    assert len(recorder.steps) == 4
    roles = list(by_role(model))
    for step, (previous, current) in enumerate(pairwise(recorder.steps)):
        for role, w0, w1 in zip(roles, previous, current, strict=True):
            what = f"{policy}: step {step} {role}"
            if role.endswith("kernel"):
                # Each step, from the weights it started with: w * (1 - rate).
                assert_close(w1, w0 * 0.98, what)
            else:
                np.testing.assert_array_equal(w1, w0, err_msg=what)


# --- norms and logged values ----------------------------------------------------


def test_weight_norms_match_float64(policy, rng):
    model = build(rng)
    variables = by_role(model)
    norms = kerasreg.weight_norms(model, where=".*", per_gate=False)
    assert len(norms) == 6
    for role, variable in variables.items():
        stats = norms[role]
        w = np_value(variable)
        for name, value in np_stats(w).items():
            assert_close(stats[name], value, f"{policy}: {name} of {role}")
        penalty = np_penalty(PENALTIES[role], w) if role in PENALTIES else 0.0
        assert_close(stats["penalty"], penalty, f"{policy}: penalty of {role}")
    # The float16 overflow this guards against: these sums exceed 65504.
    assert norms["d0/kernel"]["l2"] ** 2 > FLOAT16_MAX


def test_weight_norm_logger_values_match_float64(policy, rng, tmp_path):
    model = build(rng)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.uniform(-1, 1, (16, 1)).astype("float32")
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        validation_data=(x[:8], y[:8]),
        callbacks=[kerasreg.WeightNormLogger(tmp_path)],
    ).history
    train = read_scalars(tmp_path / "train")
    validation = read_scalars(tmp_path / "validation")
    variables = by_role(model)
    total = 0.0
    for role, variable in variables.items():
        w = np_value(variable)
        path = role
        if role.endswith("kernel"):
            for name, value in np_stats(w).items():
                tag = {"zero_fraction": "zero_fraction"}.get(name, f"norm_{name}")
                assert train[f"{tag}/{path}"] == [(0, pytest.approx(value, rel=RTOL))]
        if role in PENALTIES:
            penalty = np_penalty(PENALTIES[role], w)
            total += penalty
            assert_close(train[f"penalty/{path}"][0][1], penalty, f"{policy}: {role}")
    assert_close(train["penalty/total"][0][1], total, f"{policy}: penalty/total")
    assert_close(validation["penalty/total"][0][1], total, policy)
    # loss/data = reported loss - penalty total: a difference of two numbers
    # ~5e3, so its error is measured against them, not against the ~1 result.
    for logged, loss in (
        (train["loss/data"][0][1], history["loss"][0]),
        (validation["loss/data"][0][1], history["val_loss"][0]),
    ):
        assert np.isfinite(logged) and np.isfinite(loss)
        assert abs(logged - (loss - total)) <= RTOL * total, (policy, logged, loss)


def test_lr_scaled_decay_reads_the_policy_optimizer_rate(policy, rng):
    # mixed_float16 wraps the optimizer in a LossScaleOptimizer: the learning
    # rate must still be found, and the factor stay exact to float16 rounding.
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)]
    )
    model.set_weights(
        [
            rng.uniform(30, 60, (3, 4)),
            np.zeros(4),
            rng.uniform(-9, 9, (4, 1)),
            np.zeros(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [np_value(v) for v in model.weights]
    # Zero inputs and targets: every gradient is zero, only the decay acts.
    zeros = np.zeros((16, 3), "float32")
    history = model.fit(
        zeros,
        zeros[:, :1],
        batch_size=16,
        verbose=0,
        callbacks=[kerasreg.WeightDecay(0.5, lr_scaled=True)],
    ).history
    assert history["weight_decay_rate"] == [pytest.approx(0.05, rel=1e-6)]
    after = [np_value(v) for v in model.weights]
    for w0, w1, v in zip(before, after, model.weights, strict=True):
        expected = w0 * (1 - 0.5 * 0.1) if v.name == "kernel" else w0
        assert_close(w1, expected, f"{policy}: {v.path}")


@pytest.mark.parametrize("rate", [0.02, 1e-3, 3e-4])
@pytest.mark.parametrize("how", ["shrink_weights", "WeightDecay"])
def test_float16_weights_are_decayed_by_the_rate_asked_for(how, rate, rng):
    # float16 storage: w * (1 - rate) must be rounded once, like numpy's float32
    # product rounded to float16. Rounding (1 - rate) itself to float16 first
    # would quantize it to a multiple of 2**-11 and change the decay rate
    # (3e-4 would act as 4.9e-4, and the backends would disagree).
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float16")
    try:
        model = keras.Sequential(
            [keras.Input((32,)), keras.layers.Dense(32, use_bias=False)]
        )
        model.set_weights([rng.uniform(0.5, 2.0, (32, 32))])
        (variable,) = model.weights
        assert keras.backend.standardize_dtype(variable.dtype) == "float16"
        w0 = np.asarray(ops.convert_to_numpy(variable.value))
        if how == "shrink_weights":
            kerasreg.shrink_weights(model, 1 - rate)
        else:
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
            zeros = np.zeros((8, 32), "float32")
            model.fit(zeros, zeros, batch_size=8, verbose=0,
                      callbacks=[kerasreg.WeightDecay(rate)])  # fmt: skip
        w1 = np.asarray(ops.convert_to_numpy(variable.value))
    finally:
        keras.config.set_dtype_policy(previous)
    expected = (w0.astype(np.float32) * np.float32(1 - rate)).astype(np.float16)
    mismatched = np.mean(w1 != expected)
    asked = 1 - np.mean(expected.astype("f8") / w0.astype("f8"))
    applied = 1 - np.mean(w1.astype("f8") / w0.astype("f8"))
    assert mismatched == 0, (
        f"{mismatched:.0%} of the weights differ from w * (1 - {rate}) rounded "
        f"once; mean rate applied {applied:.3g}, correctly rounded {asked:.3g}"
    )
