"""A combination generator: kerasreg's features crossed with Keras's loop options.

Hypothesis draws a scenario: a precision policy (float32, float64, float16,
bfloat16, mixed_float16 with dynamic loss scaling, mixed_bfloat16), an
optimizer (SGD or Adam, with or without EMA and its periodic overwrite,
gradient accumulation, a learning-rate schedule), `steps_per_execution`, the
epochs, a penalty (each kerasreg penalty, `L2SPPenalty` included, attached in
the constructor or by `regularize`), up to two post-step transforms
(`WeightDecay` with every option: rate or schedule, `lr_scaled`, batch or
epoch frequency, `toward="start"`, `where=`; `SoftThreshold`) and the
`WeightNormLogger`. Each scenario is checked against references that share no
code with kerasreg:

- the training loop: the same model trained by a plain Keras fit with Keras's
  own regularizer (or a hand-written callable) and a callback that applies the
  numpy formula of each transform after every update the optimizer applied
  (`optimizer.iterations` moved and, under gradient accumulation, on every
  n-th batch), at the end of each epoch, and once more after Keras writes the
  EMA over the weights at the end of `fit` (the rule in `kerasreg.poststep`);
  it runs at `steps_per_execution=1`, which must not change the result;
- kerasreg's arithmetic: `model.losses`, `evaluate`, `weight_norms` and the
  logger's scalars (read back with TensorBoard's reader) against numpy float64
  on the very weights the model holds;
- the command line: `kerasreg inspect --json` of the saved file against the
  live model's `weight_norms` and numpy;
- save and load in a fresh process, and a distribution strategy (TensorFlow
  `MirroredStrategy` over two logical CPUs, JAX `DataParallel` over two host
  devices) in a fresh process, both drawn the same way.

The number of examples per test is `KERASREG_COMBO_EXAMPLES` (default 6; CI
sets its own budget). Examples are derandomized (the same on every run);
shrinking is off unless `KERASREG_COMBO_SHRINK=1`, so a failure costs one
example, not a search. `KERASREG_COMBO_REPORT=FILE` records every failing
scenario in FILE (one JSON line each) and keeps going, to survey a branch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from keras import ops

import kerasreg
from kerasreg import cli

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script in a fresh process
    sys.path.insert(0, str(TESTS))

from conftest import np_exp_abs_terms, np_stats, read_scalars, run_result  # noqa: E402

BACKEND = keras.backend.backend()
EXAMPLES = int(os.environ.get("KERASREG_COMBO_EXAMPLES", "6"))
SHRINK = os.environ.get("KERASREG_COMBO_SHRINK", "") not in ("", "0")
REPORT = os.environ.get("KERASREG_COMBO_REPORT", "")

pytestmark = pytest.mark.combinations


def combo_settings(examples: int):
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if SHRINK:
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )


# --- the scenario: a plain JSON-able dict ----------------------------------------

POLICIES = [
    "float32",
    "mixed_float16",
    "float64",
    "float16",
    "bfloat16",
    "mixed_bfloat16",
]
PATHS = ["d0/kernel", "d0/bias", "d1/kernel", "d1/bias"]
SHAPES = [(3, 4), (4,), (4, 1), (1,)]
# `where=` as drawn, and the paths it selects by the rule in the README
# (resolved here by hand, not by kerasreg).
WHERE = {
    "none": (lambda: None, {"d0/kernel", "d1/kernel"}),
    "regex_d0": (lambda: "^d0/", {"d0/kernel", "d0/bias"}),
    "regex_bias": (lambda: "bias$", {"d0/bias", "d1/bias"}),
    "selector": (
        lambda: kerasreg.kernels() & kerasreg.layer("^d1$"),
        {"d1/kernel"},
    ),
    "callable": (lambda: lambda v: v.path.endswith("d1/bias"), {"d1/bias"}),
}
PENALTY_KINDS = ["l1", "l2", "elastic", "expabs", "l2sp"]
# Keras's PyTorch trainer refuses steps_per_execution > 1.
STEPS_PER_EXECUTION = [1] if BACKEND == "torch" else [1, 2, 3]


@st.composite
def transforms(draw):
    kind = draw(st.sampled_from(["decay", "soft"]))
    lr_scaled = draw(st.booleans())
    if kind == "decay":
        value = draw(st.sampled_from([0.05, 0.2] if not lr_scaled else [0.5, 0.9]))
        toward = draw(st.sampled_from([None, "start"]))
    else:
        value = draw(st.sampled_from([0.02, 0.1] if not lr_scaled else [1.0, 4.0]))
        toward = None
    return {
        "kind": kind,
        "value": value,
        "lr_scaled": lr_scaled,
        "frequency": draw(st.sampled_from(["batch", "epoch"])),
        "toward": toward,
        "schedule": draw(st.sampled_from([None, "keras", "python"])),
        "where": draw(st.sampled_from(sorted(WHERE))),
    }


@st.composite
def scenarios(draw, policies=tuple(POLICIES)):
    policy = draw(st.sampled_from(policies))
    optimizer = draw(st.sampled_from(["sgd", "adam"]))
    ema = draw(st.booleans())
    # Keras cannot add a float64 penalty to its float32 loss (plain Keras
    # fails the same: `tf.convert_to_tensor` of the mixed list).
    kinds = [] if policy == "float64" else PENALTY_KINDS
    penalty = draw(st.sampled_from([None, *kinds]))
    attach = (
        "regularize"
        if penalty == "l2sp"
        else draw(st.sampled_from(["layer", "regularize"]))
    )
    return {
        "policy": policy,
        "optimizer": optimizer,
        "ema": ema,
        "ema_overwrite": draw(st.sampled_from([None, 2])) if ema else None,
        "accumulation": draw(st.sampled_from([None, 2])),
        "lr_schedule": draw(st.sampled_from([None, "exponential", "piecewise"])),
        "steps_per_execution": draw(st.sampled_from(STEPS_PER_EXECUTION)),
        "epochs": draw(st.sampled_from([1, 2])),
        "samples": draw(st.sampled_from([12, 16])),
        # 300: under mixed_float16 the first scaled gradients overflow, so
        # LossScaleOptimizer skips updates.
        "y_scale": draw(st.sampled_from([1.0, 300.0])),
        "penalty": penalty,
        "penalty_role": draw(st.sampled_from(["kernel", "bias"])),
        "penalty_attach": attach,
        "transforms": draw(st.lists(transforms(), max_size=2)),
        "logger": draw(st.booleans()),
        # After training: `set_reference` on the L2-SP penalty (new anchor:
        # the trained weights), then every number must use the new anchor.
        "reset_reference": penalty == "l2sp" and draw(st.booleans()),
    }


def scenario(**changes):
    """A scenario with every option at its plainest, then `changes`."""
    spec = {
        "policy": "float32",
        "optimizer": "sgd",
        "ema": False,
        "ema_overwrite": None,
        "accumulation": None,
        "lr_schedule": None,
        "steps_per_execution": 1,
        "epochs": 1,
        "samples": 12,
        "y_scale": 1.0,
        "penalty": None,
        "penalty_role": "kernel",
        "penalty_attach": "layer",
        "transforms": [],
        "logger": False,
        "reset_reference": False,
    }
    spec.update(changes)
    return spec


def transform(kind="decay", value=0.05, **changes):
    """A transform with every option at its plainest, then `changes`."""
    t = {
        "kind": kind,
        "value": value,
        "lr_scaled": False,
        "frequency": "batch",
        "toward": None,
        "schedule": None,
        "where": "none",
    }
    t.update(changes)
    return t


# Scenarios the generator found failing on main, kept so that every budget
# runs them (issue 23's numbered items).
KNOWN = {
    "loss scaling skips updates (item 2)": scenario(
        policy="mixed_float16", y_scale=300.0, transforms=[transform()]
    ),
    "epoch lr_scaled uses the epoch's last step (item 3)": scenario(
        epochs=2,
        lr_schedule="exponential",
        transforms=[transform(value=0.5, lr_scaled=True, frequency="epoch")],
    ),
    "EMA then SoftThreshold (item 4)": scenario(
        ema=True, transforms=[transform("soft", 0.1)]
    ),
    "EMA overwrite every 2 updates, decay (item 4)": scenario(
        ema=True, ema_overwrite=2, transforms=[transform()]
    ),
    "float64 statistics (item 8)": scenario(policy="float64"),
    "float64 SoftThreshold keeps float64 (new: torch rounds to float32)": scenario(
        policy="float64", transforms=[transform("soft", 0.02)]
    ),
    "L2-SP: CLI rows, set_reference (items 5, 1)": scenario(
        penalty="l2sp", penalty_attach="regularize", reset_reference=True
    ),
}


def known_examples(test):
    for spec in KNOWN.values():
        test = example(spec)(test)
    return test


def float64_is_real() -> bool:
    """JAX without `jax_enable_x64` makes float64 variables float32."""
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def tolerance(policy: str, optimizer: str = "sgd") -> float:
    """Agreement of two training runs whose only difference is the order of
    kerasreg's arithmetic vs. numpy's (then rounded to the weights' dtype).

    Adam divides each gradient by its own running scale, so a rounding
    difference in a small gradient becomes a difference of up to the
    learning rate: in float64 its runs agree to 1e-7 (observed 1.5e-8 after
    8 updates with gradient accumulation, EMA and two transforms), still far
    below a float32 rounding (6e-8 relative per step, compounding). SGD keeps
    1e-9, and the float64 examples that catch a float32 path use SGD."""
    if policy == "float64" and not float64_is_real():
        policy = "float32"
    if policy == "float64" and optimizer == "adam":
        return 1e-7
    return {
        "float64": 1e-9,
        "float32": 1e-4,
        "mixed_float16": 2e-3,
        "mixed_bfloat16": 2e-2,
    }.get(policy, 3e-2)


def stats_tolerance(policy: str) -> float:
    """Statistics of given weights against numpy float64 on the same values."""
    return 1e-12 if policy == "float64" and float64_is_real() else 2e-5


# --- shared pieces of both runs ---------------------------------------------------

LR = {"sgd": 0.05, "adam": 0.02}


def initial_weights():
    rng = np.random.default_rng(7)
    return [rng.normal(scale=0.6, size=s) for s in SHAPES]


def dataset(spec):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(spec["samples"], 3))
    y = spec["y_scale"] * np.tanh(x @ np.array([[1.0], [-2.0], [0.5]]))
    return x.astype("float32"), y.astype("float32")


def learning_rate(spec):
    lr = LR[spec["optimizer"]]
    if spec["optimizer"] == "sgd":
        lr /= spec["y_scale"]  # gradients grow with the targets
    if spec["lr_schedule"] == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(lr, 2, 0.5)
    if spec["lr_schedule"] == "piecewise":
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [2, 5], [lr, lr / 2, lr / 4]
        )
    return lr


def np_learning_rate(spec, step: int) -> float:
    """The learning rate of optimizer step `step`, from the closed forms."""
    lr = LR[spec["optimizer"]]
    if spec["optimizer"] == "sgd":
        lr /= spec["y_scale"]
    if spec["lr_schedule"] == "exponential":
        return lr * 0.5 ** (step / 2)
    if spec["lr_schedule"] == "piecewise":
        return lr if step <= 2 else lr / 2 if step <= 5 else lr / 4
    return lr


def make_optimizer(spec):
    options = {
        "learning_rate": learning_rate(spec),
        "use_ema": spec["ema"],
        "ema_momentum": 0.8,
        "ema_overwrite_frequency": spec["ema_overwrite"],
        "gradient_accumulation_steps": spec["accumulation"],
    }
    if spec["optimizer"] == "adam":
        return keras.optimizers.Adam(epsilon=1e-3, **options)
    return keras.optimizers.SGD(**options)


@contextlib.contextmanager
def dtype_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def penalty_factor(spec) -> float:
    return {"l1": 0.02, "l2": 0.05, "elastic": 0.02, "expabs": 0.01, "l2sp": 0.1}[
        spec["penalty"]
    ]


def kerasreg_penalty(spec):
    f = penalty_factor(spec)
    return {
        "l1": lambda: kerasreg.L1Penalty(f),
        "l2": lambda: kerasreg.L2Penalty(f),
        "elastic": lambda: kerasreg.ElasticNetPenalty(f, f / 2),
        "expabs": lambda: kerasreg.ExpAbsPenalty(f),
        "l2sp": lambda: kerasreg.L2SPPenalty(f),
    }[spec["penalty"]]()


class _Callable(keras.regularizers.Regularizer):
    """A hand-written penalty as a Keras Regularizer (Keras 3.8 accepts only
    `Regularizer` instances as a variable's regularizer)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, w):
        return self.fn(w)


def keras_penalty(spec, ref):
    """The same penalty from Keras's built-ins, or a hand-written callable."""
    f = penalty_factor(spec)
    kind = spec["penalty"]
    if kind == "l1":
        return keras.regularizers.L1(f)
    if kind == "l2":
        return keras.regularizers.L2(f)
    if kind == "elastic":
        return keras.regularizers.L1L2(f, f / 2)
    if kind == "expabs":  # |w| stays far below 20: the exact formula
        return _Callable(
            lambda w: f * ops.sum(ops.expm1(ops.abs(ops.cast(w, "float32"))))
        )
    return _Callable(
        lambda w: (
            f
            * ops.sum(
                ops.square(
                    ops.cast(w, "float32") - ops.convert_to_tensor(ref, "float32")
                )
            )
        )
    )


def np_penalty(spec, weights: dict, anchor: dict | None = None) -> float:
    """The total penalty of `weights` ({path: float64 array}) from the formulas
    (L2-SP measured from `anchor`, by default the initial weights)."""
    if spec["penalty"] is None:
        return 0.0
    path = f"d0/{spec['penalty_role']}"
    w = weights[path]
    f = penalty_factor(spec)
    return {
        "l1": lambda: f * np.abs(w).sum(),
        "l2": lambda: f * (w**2).sum(),
        "elastic": lambda: f * np.abs(w).sum() + f / 2 * (w**2).sum(),
        "expabs": lambda: f * np_exp_abs_terms(w).sum(),
        "l2sp": lambda: f * ((w - (anchor or initial_by_path())[path]) ** 2).sum(),
    }[spec["penalty"]]()


def initial_by_path():
    return dict(zip(PATHS, initial_weights(), strict=True))


def build(spec, *, reference: bool):
    """The 3-4-1 model under the scenario's policy, compiled; with kerasreg's
    penalty (in the constructor or by `regularize`), or Keras's equivalent."""
    init = initial_weights()
    layer_penalty = {}
    if spec["penalty"] is not None:
        role = spec["penalty_role"]
        if reference:
            ref = init[0] if role == "kernel" else init[1]
            layer_penalty = {f"{role}_regularizer": keras_penalty(spec, ref)}
        elif spec["penalty_attach"] == "layer":
            layer_penalty = {f"{role}_regularizer": kerasreg_penalty(spec)}
    with dtype_policy(spec["policy"]):
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, activation="tanh", name="d0", **layer_penalty),
                keras.layers.Dense(1, name="d1"),
            ]
        )
        model.set_weights(init)
        if (
            not reference
            and spec["penalty"] is not None
            and spec["penalty_attach"] == "regularize"
        ):
            kerasreg.regularize(
                model,
                **{spec["penalty_role"]: kerasreg_penalty(spec)},
                where=kerasreg.layer("^d0$"),
            )
        model.compile(
            optimizer=make_optimizer(spec),
            loss="mse",
            steps_per_execution=1 if reference else spec["steps_per_execution"],
        )
    return model


class PythonSchedule:
    """`t -> value / (1 + t)`: a schedule that is a plain Python callable."""

    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value / (1.0 + float(step))

    def __repr__(self):
        return f"PythonSchedule({self.value})"


def make_transform(t):
    schedule = None
    if t["schedule"] == "keras":
        schedule = keras.optimizers.schedules.ExponentialDecay(t["value"], 1, 0.7)
    elif t["schedule"] == "python":
        schedule = PythonSchedule(t["value"])
    common = {
        "frequency": t["frequency"],
        "where": WHERE[t["where"]][0](),
        "lr_scaled": t["lr_scaled"],
        "schedule": schedule,
    }
    if t["kind"] == "decay":
        return kerasreg.WeightDecay(t["value"], toward=t["toward"], **common)
    return kerasreg.SoftThreshold(t["value"], **common)


def np_strength(t, step: int) -> float:
    """The transform's strength at step (or epoch) `step`, before any lr."""
    if t["schedule"] == "keras":
        return t["value"] * 0.7**step
    if t["schedule"] == "python":
        return t["value"] / (1.0 + step)
    return t["value"]


def np_transform(t, w, strength, ref):
    if t["kind"] == "soft":
        return np.sign(w) * np.maximum(np.abs(w) - strength, 0.0)
    if ref is None:
        return w * (1.0 - strength)
    return w - strength * (w - ref)


def sync(model):
    """On JAX, callbacks see and change the weights only after a state sync."""
    if BACKEND == "jax":
        model.jax_state_sync()


class NumpyTransforms(keras.callbacks.Callback):
    """The reference: each transform's numpy formula, applied after every
    update the optimizer applied (`optimizer.iterations`, which counts
    updates, moved: not after a step loss scaling skipped, nor after a batch
    gradient accumulation only accumulated), at each epoch end in which an
    update was applied, and once more after Keras writes the EMA over the
    weights at the end of `fit`, each with its last strength. `lr_scaled` uses
    the learning rate the optimizer applied in that update: Keras evaluates a
    schedule at its batch counter, `(t + 1) * n - 1` for update `t` under
    accumulation over `n` batches."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.every = spec["accumulation"] or 1
        self.last = [None] * len(spec["transforms"])

    def _apply(self, which, strengths):
        sync(self.model)
        weights = dict(zip(PATHS, self.model.get_weights(), strict=True))
        weights = {p: np.asarray(w, np.float64) for p, w in weights.items()}
        for i in which:
            t = self.spec["transforms"][i]
            for p in sorted(WHERE[t["where"]][1]):
                ref = self.start[p] if t["toward"] == "start" else None
                weights[p] = np_transform(t, weights[p], strengths[i], ref)
            self.last[i] = strengths[i]
        self.model.set_weights([weights[p] for p in PATHS])

    def _learning_rate(self, update):
        return np_learning_rate(self.spec, (update + 1) * self.every - 1)

    def _iterations(self):
        sync(self.model)
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        sync(self.model)
        self.start = {
            p: np.asarray(w, np.float64)
            for p, w in zip(PATHS, self.model.get_weights(), strict=True)
        }
        self.seen = self.first = self._iterations()

    def on_epoch_begin(self, epoch, logs=None):
        self.last_update = None

    def on_train_batch_end(self, batch, logs=None):
        done = self._iterations()
        for step in range(self.seen, done):
            self.last_update = step
            strengths = {}
            batch_ones = []
            for i, t in enumerate(self.spec["transforms"]):
                if t["frequency"] == "batch":
                    s = np_strength(t, step)
                    if t["lr_scaled"]:
                        s *= self._learning_rate(step)
                    strengths[i] = s
                    batch_ones.append(i)
            self._apply(batch_ones, strengths)
        self.seen = done

    def on_epoch_end(self, epoch, logs=None):
        if self.last_update is None:
            return
        strengths, epoch_ones = {}, []
        for i, t in enumerate(self.spec["transforms"]):
            if t["frequency"] == "epoch":
                s = np_strength(t, epoch)
                if t["lr_scaled"]:
                    s *= self._learning_rate(self.last_update)
                strengths[i] = s
                epoch_ones.append(i)
        self._apply(epoch_ones, strengths)

    def on_train_end(self, logs=None):
        if not self.spec["ema"] or self._iterations() == self.first:
            return
        which = [i for i, s in enumerate(self.last) if s is not None]
        self._apply(which, dict(enumerate(self.last)))


class WeightRecorder(keras.callbacks.Callback):
    """The weights at each epoch end, after every other callback's."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        sync(self.model)
        self.epochs.append(dict(zip(PATHS, self.model.get_weights(), strict=True)))


def fit(spec, *, reference: bool, log_dir=None):
    """Train the scenario's model; `(model, history, recorder)`."""
    model = build(spec, reference=reference)
    if reference:
        callbacks = [NumpyTransforms(spec)]
    else:
        callbacks = [make_transform(t) for t in spec["transforms"]]
        if spec["logger"] and log_dir is not None:
            callbacks.append(kerasreg.WeightNormLogger(log_dir))
    recorder = WeightRecorder()
    callbacks.append(recorder)
    x, y = dataset(spec)
    with dtype_policy(spec["policy"]):
        history = model.fit(
            x,
            y,
            batch_size=4,
            epochs=spec["epochs"],
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    if BACKEND == "jax" and spec["ema"]:
        # A Keras bug, not kerasreg's: on JAX, after `fit` writes the EMA over
        # the weights they share buffers with the optimizer's EMA slots;
        # `evaluate`/`predict` donate them and a later `save` fails ("Array
        # has been deleted"). Plain Keras fails the same; unshare the values.
        for v in model.trainable_variables:
            v.assign(ops.copy(v.value))
    return model, history, recorder


def np_weights(model) -> dict:
    sync(model)
    return {
        p: np.asarray(ops.convert_to_numpy(ops.cast(v.value, "float32")), np.float64)
        if v.dtype in ("float16", "bfloat16")
        else np.asarray(ops.convert_to_numpy(v.value), np.float64)
        for p, v in zip(PATHS, model.weights, strict=True)
    }


def np_loss(spec, weights, anchor=None) -> float:
    """mse of the 3-4-1 tanh network in float64, plus the penalty."""
    x, y = dataset(spec)
    h = np.tanh(x @ weights["d0/kernel"] + weights["d0/bias"])
    out = h @ weights["d1/kernel"] + weights["d1/bias"]
    return float(((out - y) ** 2).mean()) + np_penalty(spec, weights, anchor)


def close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: not finite: {actual}"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


# --- the checks ------------------------------------------------------------------


def check_training(spec, model, reference):
    ours, theirs = np_weights(model), np_weights(reference)
    tol = tolerance(spec["policy"], spec["optimizer"])
    for p in PATHS:
        close(ours[p], theirs[p], tol, f"{p} after fit vs the numpy-transform fit")
    for t in spec["transforms"]:
        if t["kind"] == "soft":
            # SoftThreshold promises exact zeros: the reference's zeros are
            # zeros of ours too.
            for p in WHERE[t["where"]][1]:
                zeros = theirs[p] == 0.0
                assert np.all(ours[p][zeros] == 0.0), f"{p}: lost exact zeros"


def check_arithmetic(spec, model, anchor=None):
    """model.losses, evaluate and weight_norms against numpy on the weights."""
    weights = np_weights(model)
    stol = stats_tolerance(spec["policy"])
    penalty = np_penalty(spec, weights, anchor)
    losses = sum(float(ops.convert_to_numpy(loss)) for loss in model.losses)
    close(losses, penalty, 1e-5, "sum(model.losses) vs numpy")
    norms = kerasreg.weight_norms(model, ".")
    assert list(norms) == PATHS
    for p in PATHS:
        expected = np_stats(weights[p])
        expected["penalty"] = penalty if p == f"d0/{spec['penalty_role']}" else 0.0
        for name, value in expected.items():
            close(norms[p][name], value, stol, f"weight_norms {p} {name}")
    x, y = dataset(spec)
    with dtype_policy(spec["policy"]):
        loss = model.evaluate(x, y, batch_size=len(x), verbose=0)
    low = spec["policy"] in ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
    expected = np_loss(spec, weights, anchor)
    close(loss, expected, 3e-2 if low else 1e-5, "evaluate vs numpy")
    return weights, norms


def check_logger(spec, log_dir, recorder):
    scalars = read_scalars(Path(log_dir) / "train")
    for epoch, raw in enumerate(recorder.epochs):
        weights = {p: np.asarray(w, np.float64) for p, w in raw.items()}
        for p in sorted(WHERE["none"][1]):
            logged = dict(scalars[f"norm_l2/{p}"])[epoch]
            close(logged, np.sqrt((weights[p] ** 2).sum()), 1e-5, f"logged l2 {p}")
        if spec["penalty"] is not None:
            logged = dict(scalars["penalty/total"])[epoch]
            close(logged, np_penalty(spec, weights), 1e-5, "logged penalty/total")


def inspect_json(path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["inspect", str(path), "--json", "--where", "."])
    assert status == 0
    return json.loads(out.getvalue())


def check_cli(spec, model, weights, norms, folder, anchor=None):
    path = Path(folder) / "model.keras"
    model.save(path)
    rows = inspect_json(path)
    assert list(rows) == PATHS, f"CLI rows {list(rows)} vs the live model's weights"
    for p in PATHS:
        for name, value in norms[p].items():
            if name not in rows[p]:
                continue
            close(rows[p][name], value, 2e-5, f"CLI {p} {name} vs weight_norms")
        expected = (
            np_penalty(spec, weights, anchor)
            if p == f"d0/{spec['penalty_role']}"
            else 0.0
        )
        close(rows[p]["penalty"], expected, 1e-5, f"CLI {p} penalty vs numpy")


def record_failure(spec, error):
    with open(REPORT, "a") as f:
        f.write(
            json.dumps({"backend": BACKEND, "spec": spec, "error": str(error)[:600]})
        )
        f.write("\n")


def run_scenario(spec):
    with tempfile.TemporaryDirectory() as folder:
        keras.utils.clear_session(free_memory=False)
        keras.utils.set_random_seed(0)
        log_dir = Path(folder) / "logs"
        model, _, recorder = fit(spec, reference=False, log_dir=log_dir)
        reference, _, _ = fit(spec, reference=True)
        check_training(spec, model, reference)
        if spec["logger"]:
            check_logger(spec, log_dir, recorder)
        weights, norms = check_arithmetic(spec, model)
        anchor = None
        if spec.get("reset_reference"):
            variable = model.get_layer("d0").kernel
            if spec["penalty_role"] == "bias":
                variable = model.get_layer("d0").bias
            variable.regularizer.set_reference(variable)
            anchor = np_weights(model)
            # The compiled evaluate and norm programs ran with the old anchor.
            weights, norms = check_arithmetic(spec, model, anchor)
        check_cli(spec, model, weights, norms, folder, anchor)


def surveyed(function):
    """Run `function(spec)`; with KERASREG_COMBO_REPORT, record a failure and go on."""

    def run(spec):
        if not REPORT:
            return function(spec)
        try:
            function(spec)
        except Exception as error:
            record_failure(spec, f"{type(error).__name__}: {error}")

    return run


@combo_settings(EXAMPLES)
@given(scenarios())
@known_examples
def test_combination_matches_references(spec):
    surveyed(run_scenario)(spec)


# --- the CLI against the live model, over the layer zoo ----------------------------

ZOO_PENALTIES = {
    "l1": lambda: kerasreg.L1Penalty(0.03),
    "l2": lambda: kerasreg.L2Penalty(0.05),
    "elastic": lambda: kerasreg.ElasticNetPenalty(0.01, 0.02),
    "expabs": lambda: kerasreg.ExpAbsPenalty(0.01),
    "l2sp": lambda: kerasreg.L2SPPenalty(0.1),
    "keras_l2": lambda: keras.regularizers.L2(0.07),
}


@keras.saving.register_keras_serializable(package="combinations")
class Wrapper(keras.Model):
    """A subclassed model holding the zoo model as an attribute."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)

    def get_config(self):
        config = super().get_config()
        config["inner"] = keras.saving.serialize_keras_object(self.inner)
        return config

    @classmethod
    def from_config(cls, config):
        inner = keras.saving.deserialize_keras_object(config.pop("inner"))
        return cls(inner, **config)


@st.composite
def zoo_models(draw):
    from test_zoo import ZOO

    return {
        "row": draw(st.sampled_from(sorted(ZOO))),
        "wrap": draw(st.sampled_from(["plain", "normalization", "subclassed"])),
        "roles": {
            role: draw(st.sampled_from([None, *sorted(ZOO_PENALTIES)]))
            for role in ("kernel", "recurrent", "bias")
        },
        "train": draw(st.booleans()),
    }


def build_zoo(spec):
    from test_zoo import ZOO, make

    model, x, y, roles, _ = make(spec["row"])
    kind = ZOO[spec["row"]][2]
    if spec["wrap"] == "normalization" and kind == "float" and len(model.inputs) == 1:
        norm = keras.layers.Normalization(name="norm")
        norm.adapt(x)
        inputs = keras.Input(x.shape[1:])
        model = keras.Model(inputs, model(norm(inputs)))
    elif spec["wrap"] == "subclassed" and len(model.inputs) == 1:
        model = Wrapper(model)
        model(x)
    penalties = {
        role: ZOO_PENALTIES[name]()
        for role, name in spec["roles"].items()
        if name is not None and role in roles
    }
    if penalties:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kerasreg.regularize(model, **penalties)
        # Penalties set on the sublayers of a subclassed model are not in its
        # saved file, and regularize says so (only then).
        lost = [w for w in caught if "not in a saved file" in str(w.message)]
        assert len(lost) == (
            spec["wrap"] == "subclassed" and isinstance(model, Wrapper)
        ), [str(w.message) for w in caught]
        for w in caught:
            if w not in lost:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    model.compile(optimizer="sgd", loss="mse")
    if spec["train"]:
        model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    return model


def footer_total(path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["inspect", str(path), "--where", "."])
    assert status == 0
    line = out.getvalue().strip().splitlines()[-1]
    match = re.search(r"total penalty[^:]*:\s*([^;\s]+)", line)
    assert match, line
    return line, match[1]


def check_zoo_cli(spec):
    with tempfile.TemporaryDirectory() as folder:
        keras.utils.clear_session(free_memory=False)
        model = build_zoo(spec)
        path = Path(folder) / "zoo.keras"
        model.save(path)
        rows = inspect_json(path)
        line, total = footer_total(path)
    live = kerasreg.weight_norms(model, ".")
    named = [k for k in rows if not k.startswith("unknown")]
    unknown = [k for k in rows if k.startswith("unknown")]
    # Every named row is a trainable weight of the live model, in its order;
    # weights the file cannot name are rows that say "unknown".
    assert named == [k for k in live if k in named], (list(rows), list(live))
    assert len(named) + len(unknown) == len(live), (list(rows), list(live))
    for key in named:
        for name, value in live[key].items():
            if name not in rows[key] or (name == "penalty" and rows[key][name] is None):
                continue
            close(rows[key][name], value, 2e-5, f"CLI {key} {name} vs weight_norms")
    keras_total = sum(float(ops.convert_to_numpy(loss)) for loss in model.losses)
    if "unknown" not in line:
        close(float(total), keras_total, 1e-5, f"CLI footer vs model.losses: {line}")


@combo_settings(EXAMPLES * 2)
@given(zoo_models())
def test_cli_agrees_with_the_live_model_over_the_zoo(spec):
    surveyed(check_zoo_cli)(spec)


# --- save and load in a fresh process --------------------------------------------

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import kerasreg  # noqa: F401  (registers the penalties)
    out = {}
    for path, x, y in json.loads(sys.argv[1]):
        model = keras.saving.load_model(path)
        out[path] = {
            "weights": [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(
                v.value, "float64")), np.float64).tolist() for v in model.weights],
            "losses": sum(float(keras.ops.convert_to_numpy(l)) for l in model.losses),
            "evaluate": float(model.evaluate(np.array(x, "float32"),
                np.array(y, "float32"), batch_size=len(x), verbose=0)),
            "norms": kerasreg.weight_norms(model, "."),
        }
    print("RESULT " + json.dumps(out))
    """
)


def run_saved(spec_list):
    with tempfile.TemporaryDirectory() as folder:
        saved, jobs = [], []
        for i, spec in enumerate(spec_list):
            keras.utils.clear_session(free_memory=False)
            model, _, _ = fit(spec, reference=False)
            path = str(Path(folder) / f"m{i}.keras")
            model.save(path)
            x, y = dataset(spec)
            jobs.append((path, x.tolist(), y.tolist()))
            saved.append((spec, path, np_weights(model)))
        script = Path(folder) / "load.py"
        script.write_text(LOAD_SCRIPT)
        result = run_result([script, json.dumps(jobs)], backend=BACKEND)
    for spec, path, weights in saved:
        got = result[path]
        loaded = dict(zip(PATHS, map(np.asarray, got["weights"]), strict=True))
        for p in PATHS:
            np.testing.assert_array_equal(loaded[p], weights[p], err_msg=p)
        penalty = np_penalty(spec, weights)
        close(got["losses"], penalty, 1e-5, "loaded model.losses vs numpy")
        low = spec["policy"] not in ("float32", "float64")
        close(
            got["evaluate"],
            np_loss(spec, weights),
            3e-2 if low else 1e-5,
            "loaded evaluate vs numpy",
        )
        for p in PATHS:
            expected = penalty if p == f"d0/{spec['penalty_role']}" else 0.0
            close(got["norms"][p]["penalty"], expected, 1e-5, f"loaded penalty {p}")
            close(
                got["norms"][p]["l2"],
                np.sqrt((weights[p] ** 2).sum()),
                stats_tolerance(spec["policy"]),
                f"loaded l2 {p}",
            )


@pytest.mark.slow
@combo_settings(max(1, EXAMPLES // 6))
@given(st.lists(scenarios(), min_size=3, max_size=3))
def test_save_and_load_in_a_fresh_process(specs):
    surveyed(run_saved)(specs)


# --- a distribution strategy, in a fresh process ---------------------------------

DISTRIBUTED = {"tensorflow": "mirrored", "jax": "data_parallel"}


def run_distributed(spec_list):
    """Both fits of each scenario under two replicas, in a fresh process."""
    result = run_result(
        [Path(__file__), json.dumps(spec_list)],
        backend=BACKEND,
        host_devices=2 if BACKEND == "jax" else None,
    )
    for spec, (ours, theirs, replicas) in zip(spec_list, result, strict=True):
        assert replicas == 2
        tol = tolerance(spec["policy"], spec["optimizer"])
        for p, a, b in zip(PATHS, ours, theirs, strict=True):
            close(a, b, tol, f"{p} under {DISTRIBUTED[BACKEND]}")


@pytest.mark.slow
@pytest.mark.skipif(BACKEND == "torch", reason="no torch distribution in kerasreg")
@combo_settings(max(1, EXAMPLES // 6))
@given(
    st.lists(
        # Distribution strategies with float16 variables are out of scope.
        scenarios(policies=("float32", "mixed_float16", "float64")),
        min_size=2,
        max_size=2,
    )
)
def test_combination_under_a_distribution_strategy(specs):
    surveyed(run_distributed)(specs)


def distributed_main(spec_list):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")]
        )
        scope, replicas = strategy.scope, strategy.num_replicas_in_sync
    else:
        import jax

        keras.distribution.set_distribution(keras.distribution.DataParallel())
        scope, replicas = contextlib.nullcontext, len(jax.devices())
    out = []
    for spec in spec_list:
        keras.utils.set_random_seed(0)
        with scope():
            model, _, _ = fit(spec, reference=False)
            reference, _, _ = fit(spec, reference=True)
        out.append(
            [
                [w.tolist() for w in np_weights(model).values()],
                [w.tolist() for w in np_weights(reference).values()],
                replicas,
            ]
        )
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    distributed_main(json.loads(sys.argv[1]))
