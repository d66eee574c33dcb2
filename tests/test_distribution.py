"""Distribution: two devices give the numbers one device gives.

TensorFlow `MirroredStrategy` over two logical CPUs and JAX
`keras.distribution.DataParallel` over two host devices run the same scenarios
(penalties, `regularize`, `WeightDecay`, `shrink_weights`, `WeightNormLogger`)
as a single-device run. Devices must be configured before the framework starts,
so one fresh subprocess runs every scenario on one device and on two, and prints
the results as JSON; the tests compare the two settings with each other and
with numpy float64 references (forward pass, penalties, closed-form decay,
norms), and read the logged values back from the event files with
TensorBoard's own reader.
"""

import keras
import numpy as np
import pytest
from conftest import arrays, assert_close, np_stats, run_result

TOLERANCE = 1e-5
BACKEND = keras.backend.backend()
# One subprocess's results (`_RESULTS`) for every test: one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("distribution")

SCENARIOS = r'''
import contextlib
import json
import os
import sys
import tempfile

import numpy as np

BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import kerasreg

rng = np.random.default_rng(0)
X = rng.normal(size=(16, 5)).astype("float32")
Y = rng.normal(size=(16, 1)).astype("float32")
XV = rng.normal(size=(8, 5)).astype("float32")
YV = rng.normal(size=(8, 1)).astype("float32")
SHAPES = [(5, 6), (6,), (6, 4), (4,), (4, 1), (1,)]
INIT = [rng.normal(size=s).astype("float32") * 0.5 for s in SHAPES]


def strategies():
    """(name, context factory, replica count) for one device and for two."""
    if BACKEND == "tensorflow":
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        one = tf.distribute.OneDeviceStrategy(devices[0])
        two = tf.distribute.MirroredStrategy(devices)
        return {"one": one.scope, "two": two.scope}, two.num_replicas_in_sync
    import jax

    devices = jax.devices()
    two = keras.distribution.DataParallel(devices=devices)
    return {"one": contextlib.nullcontext, "two": two.scope}, len(devices)


def replica_copies(variable):
    """Every device's copy of a variable, as numpy arrays."""
    value = variable.value
    if BACKEND == "tensorflow":
        return [c.numpy() for c in getattr(value, "values", [value])]
    return [np.asarray(s.data) for s in value.addressable_shards]


def replica_report(model):
    """(copies per variable, max difference between copies of any variable)."""
    counts, gap = set(), 0.0
    for v in model.weights:
        copies = replica_copies(v)
        counts.add(len(copies))
        for c in copies[1:]:
            gap = max(gap, float(np.max(np.abs(c - copies[0]))) if c.size else 0.0)
    return sorted(counts), gap


def build(penalties=True):
    def reg(p):
        return p if penalties else None

    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                6,
                activation="tanh",
                kernel_regularizer=reg(kerasreg.L2Penalty(0.01)),
                bias_regularizer=reg(kerasreg.L1Penalty(0.002)),
                name="d0",
            ),
            keras.layers.Dense(
                4,
                activation="tanh",
                kernel_regularizer=reg(kerasreg.ElasticNetPenalty(0.003, 0.02)),
                name="d1",
            ),
            keras.layers.Dense(
                1, kernel_regularizer=reg(kerasreg.ExpAbsPenalty(0.004)), name="d2"
            ),
        ]
    )
    model.set_weights(INIT)
    return model


def weights(model):
    return [np.asarray(w, "float64").tolist() for w in model.get_weights()]


def fit(model, epochs=1, **kwargs):
    history = model.fit(
        X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, **kwargs
    )
    return history.history


def scenario_penalties():
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = fit(model, epochs=2)
    return {
        "loss": history["loss"],
        "evaluate": float(model.evaluate(X, Y, batch_size=8, verbose=0)),
        "weights": weights(model),
        "replicas": replica_report(model),
    }


def scenario_regularize():
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    first = fit(model)["loss"]
    before = weights(model)
    e0 = float(model.evaluate(X, Y, batch_size=8, verbose=0))
    kerasreg.regularize(
        model, kernel=kerasreg.L2Penalty(0.02), bias=kerasreg.L1Penalty(0.01)
    )
    e1 = float(model.evaluate(X, Y, batch_size=8, verbose=0))
    at_regularize = weights(model)
    second = fit(model)["loss"]
    return {
        "loss": first + second,
        "evaluate_before": e0,
        "evaluate_after": e1,
        "weights_before": before,
        "weights_at_regularize": at_regularize,
        "weights": weights(model),
        "replicas": replica_report(model),
    }


def scenario_decay():
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = fit(model, epochs=2, callbacks=[kerasreg.WeightDecay(0.05)])
    return {
        "loss": history["loss"],
        "rate": history["weight_decay_rate"],
        "weights": weights(model),
        "replicas": replica_report(model),
    }


def scenario_decay_closed_form():
    # Zero learning rate: only the decay moves the weights, w0 * (1 - r) ** n.
    # Three ways to decay: constant rate per step, a Python schedule per step,
    # and per epoch.
    variants = {
        "step": kerasreg.WeightDecay(0.1),
        "schedule": kerasreg.WeightDecay(schedule=lambda step: 0.1),
        "epoch": kerasreg.WeightDecay(0.1, frequency="epoch"),
    }
    out = {}
    for name, decay in variants.items():
        model = build(penalties=False)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        fit(model, epochs=2, callbacks=[decay])
        out[name] = {
            "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            "weights": weights(model),
            "replicas": replica_report(model),
        }
    return out


def scenario_shrink():
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    first = fit(model)["loss"]
    before = weights(model)
    norms = kerasreg.shrink_weights(model, 0.5)
    shrunk = weights(model)
    replicas = replica_report(model)
    # The next fit must start from the shrunk weights on every replica.
    second = fit(model)["loss"]
    return {
        "loss": first + second,
        "weights_before": before,
        "weights_shrunk": shrunk,
        "norms": norms,
        "weights": weights(model),
        "replicas": replicas,
        "replicas_end": replica_report(model),
    }


def scenario_keras_loss():
    # No kerasreg at all: what Keras itself reports as the loss under this
    # strategy (Keras 3.8's MirroredStrategy reports a different number than
    # one device although the weights are the same).
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return {
        "loss": fit(model)["loss"],
        "evaluate": float(model.evaluate(X, Y, batch_size=8, verbose=0)),
        "weights": weights(model),
        "replicas": replica_report(model),
    }


def read_scalars(folder):
    accumulator = EventAccumulator(folder, size_guidance={"tensors": 0})
    accumulator.Reload()
    result = {}
    for tag in accumulator.Tags()["tensors"]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue  # the custom_scalars layout and the text plan
        result[tag] = [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in accumulator.Tensors(tag)
        ]
    return result


def scenario_logger():
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    root = tempfile.mkdtemp()
    epochs_dir, batches_dir = os.path.join(root, "e"), os.path.join(root, "b")
    history = model.fit(
        X,
        Y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        validation_data=(XV, YV),
        callbacks=[
            kerasreg.WeightNormLogger(epochs_dir, where=".*"),
            kerasreg.WeightNormLogger(batches_dir, update_freq=1),
        ],
    ).history
    logged = {
        f"{mode}/{run}": read_scalars(os.path.join(folder, run))
        for mode, folder in (("epoch", epochs_dir), ("batch", batches_dir))
        for run in ("train", "validation")
    }
    return {
        "loss": history["loss"],
        "val_loss": history["val_loss"],
        "logged": logged,
        "weights": weights(model),
        "paths": [kerasreg.selection.weight_paths(model)[id(v)] for v in model.weights],
        "replicas": replica_report(model),
    }


SCENARIOS = {
    name[len("scenario_") :]: fn
    for name, fn in list(globals().items())
    if name.startswith("scenario_")
}

contexts, replicas = strategies()
out = {"replicas": replicas, "devices": {}}
for setting, scope in contexts.items():
    out[setting] = {}
    for name, scenario in SCENARIOS.items():
        keras.utils.set_random_seed(0)
        with scope():
            out[setting][name] = scenario()
        keras.utils.clear_session(free_memory=False)
print("RESULT " + json.dumps(out))
sys.stdout.flush()
'''


def run_scenarios(backend):
    host_devices = 2 if backend == "jax" else None
    return run_result(["-c", SCENARIOS], backend=backend, host_devices=host_devices)


PLATFORMS = [
    pytest.param(
        "tensorflow",
        marks=pytest.mark.skipif(
            BACKEND != "tensorflow",
            reason="tf.distribute.MirroredStrategy exists only on the TensorFlow "
            "backend",
        ),
    ),
    pytest.param(
        "jax",
        marks=pytest.mark.skipif(
            BACKEND != "jax",
            reason="the JAX DataParallel subprocess sets its own backend; it runs "
            "in the jax session only, to keep CI time down",
        ),
    ),
]

_RESULTS: dict[str, dict] = {}


@pytest.fixture(params=PLATFORMS)
def runs(request):
    """`{"replicas": n, "one": {scenario: ...}, "two": {scenario: ...}}`."""
    if request.param not in _RESULTS:
        _RESULTS[request.param] = run_scenarios(request.param)
    return _RESULTS[request.param]


# --- independent references (numpy float64) ---------------------------------

ROLES = ("d0/kernel", "d0/bias", "d1/kernel", "d1/bias", "d2/kernel", "d2/bias")


def data():
    """The scenarios' data and initial weights, regenerated the same way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    xv = rng.normal(size=(8, 5)).astype("float32")
    yv = rng.normal(size=(8, 1)).astype("float32")
    shapes = [(5, 6), (6,), (6, 4), (4,), (4, 1), (1,)]
    init = [rng.normal(size=s).astype("float32") * 0.5 for s in shapes]
    return x, y, xv, yv, init


def np_mse(weights, x, y):
    k0, b0, k1, b1, k2, b2 = arrays(weights)
    h = np.tanh(np.tanh(x @ k0 + b0) @ k1 + b1)
    return float(np.mean((h @ k2 + b2 - y) ** 2))


def np_penalties(weights):
    """Per weight, the penalties `build()` attaches (see README formulas)."""
    k0, b0, k1, _, k2, _ = arrays(weights)
    return {
        "d0/kernel": 0.01 * np.sum(k0**2),
        "d0/bias": 0.002 * np.sum(np.abs(b0)),
        "d1/kernel": 0.003 * np.sum(np.abs(k1)) + 0.02 * np.sum(k1**2),
        "d2/kernel": 0.004 * np.sum(np.expm1(np.abs(k2))),
    }


# Keys computed from the loss Keras reports (history, evaluate, `loss/data`).
REPORTED_LOSS_KEYS = (
    "loss",
    "val_loss",
    "evaluate",
    "evaluate_before",
    "evaluate_after",
)


def keras_reports_the_same_loss(runs):
    """Whether Keras itself, without kerasreg, reports the one-device loss on
    two replicas. Keras 3.8's MirroredStrategy does not (its weights do match);
    kerasreg cannot make Keras's reported loss right, so the checks of reported
    losses apply only where Keras gets its own right."""
    one, two = runs["one"]["keras_loss"], runs["two"]["keras_loss"]
    return all(
        np.allclose(two[k], one[k], rtol=TOLERANCE, atol=TOLERANCE)
        for k in ("loss", "evaluate")
    )


def skip_unless_keras_reports_the_same_loss(runs, setting):
    if setting == "two" and not keras_reports_the_same_loss(runs):
        pytest.skip(
            f"Keras {keras.__version__} reports a different loss on two replicas "
            "than on one even without kerasreg; weights are compared instead"
        )


# --- two devices == one device ----------------------------------------------

SCENARIO_NAMES = [
    "keras_loss",
    "penalties",
    "regularize",
    "decay",
    "decay_closed_form",
    "shrink",
    "logger",
]


def test_really_ran_on_two_replicas(runs):
    assert runs["replicas"] == 2
    for name in SCENARIO_NAMES:
        outs = runs["two"][name]
        ones = runs["one"][name]
        if name == "decay_closed_form":
            outs, ones = list(outs.values()), list(ones.values())
        else:
            outs, ones = [outs], [ones]
        for out, one in zip(outs, ones, strict=True):
            counts, gap = out["replicas"]
            assert counts == [2], f"{name}: variables are not on both devices"
            # Every replica's copy holds the same value: decay and shrinking
            # reach all of them, not only the first.
            assert gap == 0.0, f"{name}: replica copies differ by {gap}"
            assert one["replicas"] == [[1], 0.0]
    assert runs["two"]["shrink"]["replicas_end"] == [[2], 0.0]


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_losses_and_weights_match_one_device(runs, name):
    pairs = [(name, runs["one"][name], runs["two"][name])]
    if name == "decay_closed_form":
        pairs = [
            (f"{name}/{v}", one, runs["two"][name][v]) for v, one in pairs[0][1].items()
        ]
    same_loss = keras_reports_the_same_loss(runs)
    for label, one, two in pairs:
        assert set(one) == set(two)
        for key in one:
            if key in ("replicas", "replicas_end", "logged", "norms", "paths"):
                continue
            if key in REPORTED_LOSS_KEYS and not same_loss:
                continue  # Keras's own number differs; the weights must not
            a, b = one[key], two[key]
            if key.startswith("weights"):
                assert len(a) == len(b) == 6
                for role, wa, wb in zip(ROLES, a, b, strict=True):
                    assert_close(wb, wa, f"{label}: {key} {role}")
            else:
                assert_close(b, a, f"{label}: {key}")


def test_logged_values_match_one_device(runs):
    one, two = runs["one"]["logger"]["logged"], runs["two"]["logger"]["logged"]
    same_loss = keras_reports_the_same_loss(runs)
    assert set(one) == set(two)
    for run in one:
        assert set(one[run]) == set(two[run]), run
        for tag, events in one[run].items():
            # Same steps: the logger wrote each step once, not once per replica.
            assert [s for s, _ in two[run][tag]] == [s for s, _ in events], tag
            if tag in ("loss/data", "loss/total") and not same_loss:
                continue  # Keras's reported loss (minus the penalty)
            assert_close(
                [v for _, v in two[run][tag]], [v for _, v in events], f"{run} {tag}"
            )


# --- each setting against numpy ----------------------------------------------


@pytest.mark.parametrize("setting", ["one", "two"])
def test_penalties_are_in_the_loss(runs, setting):
    skip_unless_keras_reports_the_same_loss(runs, setting)
    x, y, *_ = data()
    out = runs[setting]["penalties"]
    final = out["weights"]
    expected = np_mse(final, x, y) + sum(np_penalties(final).values())
    assert out["evaluate"] == pytest.approx(expected, rel=TOLERANCE)
    assert all(np.isfinite(out["loss"])) and out["loss"][1] < out["loss"][0]


@pytest.mark.parametrize("setting", ["one", "two"])
def test_regularize_adds_the_penalty_and_keeps_the_weights(runs, setting):
    out = runs[setting]["regularize"]
    before = arrays(out["weights_before"])
    for w, w_after in zip(before, arrays(out["weights_at_regularize"]), strict=True):
        np.testing.assert_array_equal(w_after, w)
    skip_unless_keras_reports_the_same_loss(runs, setting)
    kernels, biases = before[0::2], before[1::2]
    penalty = 0.02 * sum(np.sum(k**2) for k in kernels) + 0.01 * sum(
        np.sum(np.abs(b)) for b in biases
    )
    gained = out["evaluate_after"] - out["evaluate_before"]
    assert gained == pytest.approx(penalty, rel=TOLERANCE, abs=TOLERANCE)
    # The first fit after regularize trains with the penalty included.
    x, y, *_ = data()
    assert out["evaluate_before"] == pytest.approx(np_mse(before, x, y), rel=1e-5)


@pytest.mark.parametrize("setting", ["one", "two"])
@pytest.mark.parametrize(
    "variant, decays", [("step", 4), ("schedule", 4), ("epoch", 2)]
)
def test_decay_closed_form_on_every_replica(runs, setting, variant, decays):
    out = runs[setting]["decay_closed_form"][variant]
    init = arrays(data()[-1])
    assert out["steps"] == 4  # 16 samples, global batch 8, 2 epochs
    assert out["replicas"][1] == 0.0  # every copy decayed alike
    final = arrays(out["weights"])
    for role, w0, w in zip(ROLES, init, final, strict=True):
        if role.endswith("kernel"):
            np.testing.assert_allclose(w, w0 * 0.9**decays, rtol=1e-6, err_msg=role)
        else:
            np.testing.assert_array_equal(w, w0, err_msg=role)
    assert runs[setting]["decay"]["rate"] == [0.05, 0.05]


@pytest.mark.parametrize("setting", ["one", "two"])
def test_shrink_weights_halves_kernels_and_reports_norms(runs, setting):
    out = runs[setting]["shrink"]
    before = arrays(out["weights_before"])
    shrunk = arrays(out["weights_shrunk"])
    for role, w0, w in zip(ROLES, before, shrunk, strict=True):
        # Multiplying by 0.5 is exact in float32.
        np.testing.assert_array_equal(w, w0 * 0.5 if role.endswith("kernel") else w0)
    assert list(out["norms"]) == list(ROLES[0::2])
    for (path, row), w0 in zip(out["norms"].items(), before[0::2], strict=True):
        norm = np.sqrt(np.sum(w0**2))
        assert row["before"] == pytest.approx(norm, rel=TOLERANCE), path
        assert row["after"] == pytest.approx(0.5 * norm, rel=TOLERANCE), path


@pytest.mark.parametrize("setting", ["one", "two"])
def test_logged_values_match_numpy_from_the_final_weights(runs, setting):
    out = runs[setting]["logger"]
    _, _, xv, yv, _ = data()
    final = out["weights"]
    by_path = dict(zip(out["paths"], final, strict=True))
    penalties = np_penalties(final)
    total = sum(penalties.values())

    train = out["logged"]["epoch/train"]
    for path, w in by_path.items():  # where=".*": every weight
        for stat, value in np_stats(w).items():  # logged as norm_l1, ...
            tag = stat if stat == "zero_fraction" else f"norm_{stat}"
            assert train[f"{tag}/{path}"][-1] == pytest.approx(
                [1, value], rel=TOLERANCE, abs=TOLERANCE
            )
    for role, value in penalties.items():
        assert train[f"penalty/{role}"][-1] == pytest.approx([1, value], rel=TOLERANCE)
    assert train["penalty/total"][-1] == pytest.approx([1, total], rel=TOLERANCE)
    data_loss = out["loss"][-1] - total
    assert train["loss/data"][-1] == pytest.approx([1, data_loss], rel=TOLERANCE)

    validation = out["logged"]["epoch/validation"]
    assert validation["penalty/total"][-1] == pytest.approx([1, total], rel=1e-5)
    # val_loss is measured with the final weights: its data part is plain mse.
    assert validation["loss/data"][-1] == pytest.approx(
        [1, np_mse(final, xv, yv)], rel=TOLERANCE
    )

    batch = out["logged"]["batch/train"]
    assert [s for s, _ in batch["penalty/total"]] == [1, 2, 3, 4]
    assert batch["penalty/total"][-1] == pytest.approx([4, total], rel=TOLERANCE)
    assert [s for s, _ in out["logged"]["batch/validation"]["loss/data"]] == [2, 4]
