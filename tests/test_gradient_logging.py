"""`WeightNormLogger(gradients=True)`: the gradient statistics of training steps.

The reference for every logged value is `kerasreg.gradient_norms(...,
training=True)` on the same batch (the window's batches under gradient
accumulation) with the weights from before that step, recorded by a callback
in the same fit or in a plain `steps_per_execution=1` fit of the same model
(training is deterministic). `update_ratio` is checked against the recorded
weights before and after the step. Event files are read back with
TensorBoard's own reader.
"""

import json
import re
import warnings

import keras
import numpy as np
import pytest
from conftest import assert_close, gradient_statistics, read_scalars, run_mirrored
from keras import ops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

import kerasreg
from kerasreg.gradient_capture import KEY, STEP_KEY

BACKEND = keras.backend.backend()
STATS = {
    "grad_data": "data",
    "grad_penalty": "penalty",
    "grad_total": "total",
    "penalty_share": "penalty_share",
    "grad_cosine": "cosine",
}
KEYS = ("h/kernel", "o/kernel")


def make_model(optimizer=None, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                5,
                activation="tanh",
                kernel_regularizer=kerasreg.L2Penalty(0.05),
                name="h",
            ),
            keras.layers.Dense(
                1, kernel_regularizer=kerasreg.L1Penalty(0.01), name="o"
            ),
        ]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.05),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (np.sin(x.sum(axis=1, keepdims=True)) + 0.1 * rng.normal(size=(n, 1))).astype(
        "float32"
    )
    return x, y


class Recorder(keras.callbacks.Callback):
    """Weights before each batch and the optimizer's count after it."""

    def __init__(self):
        super().__init__()
        self.before, self.updates = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self.model.get_weights())

    def on_train_batch_end(self, batch, logs=None):
        # The wrapped optimizer's count: Keras 3.8's LossScaleOptimizer does
        # not forward `iterations` (its own stays 0).
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.updates.append(int(ops.convert_to_numpy(optimizer.iterations)))

    def on_train_end(self, logs=None):
        self.before.append(self.model.get_weights())  # after the last batch


def reference(weights, x, y):
    """`gradient_norms(training=True)` of a fresh copy holding `weights`."""
    model = make_model()
    model.set_weights(weights)
    return kerasreg.gradient_norms(model, x, y, training=True)


def update_ratio(before, after, index):
    b = np.asarray(before[index], np.float64)
    a = np.asarray(after[index], np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def logged(run_dir, key):
    """`{step: {statistic: value}}` of one weight's gradient tags."""
    scalars = read_scalars(run_dir)
    out = {}
    for section, name in {**STATS, "update_ratio": "update_ratio"}.items():
        for step, value in scalars.get(f"{section}/{key}", []):
            out.setdefault(step, {})[name] = value
    return out


def assert_matches(actual, expected, what, tolerance=1e-4):
    for name, value in expected.items():
        assert_close(actual[name], value, f"{what}: {name}", tolerance)


# Kernel index in `get_weights()` of each logged weight.
INDEX = {"h/kernel": 0, "o/kernel": 2}


def test_logged_statistics_equal_gradient_norms_before_each_step(tmp_path):
    x, y = data()
    model = make_model()
    recorder = Recorder()
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True)
    history = model.fit(
        x,
        y,
        batch_size=12,
        epochs=2,
        shuffle=False,
        validation_split=0.25,
        verbose=0,
        callbacks=[logger, recorder],
    )
    train_x, train_y = x[:36], y[:36]
    assert recorder.updates == [1, 2, 3, 4, 5, 6]
    for key in KEYS:
        series = logged(tmp_path / "train", key)
        assert sorted(series) == [1, 2, 3, 4, 5, 6], key
        for t in range(6):
            b = t % 3
            expected = reference(
                recorder.before[t],
                train_x[12 * b : 12 * b + 12],
                train_y[12 * b : 12 * b + 12],
            )[key]
            expected["update_ratio"] = update_ratio(
                recorder.before[t], recorder.before[t + 1], INDEX[key]
            )
            assert_matches(series[t + 1], expected, f"{key} at step {t + 1}")
        # Validation data at each epoch end, at the optimizer's step, with the
        # weights of that moment.
        validation = logged(tmp_path / "validation", key)
        assert sorted(validation) == [3, 6]
        for step in (3, 6):
            copy = make_model()  # inference mode: gradient_norms' default
            copy.set_weights(recorder.before[step])
            expected = kerasreg.gradient_norms(copy, x[36:], y[36:])[key]
            assert set(validation[step]) == set(STATS.values())
            assert_matches(validation[step], expected, f"validation {key} at {step}")
    # The sums never reach Keras's logs.
    assert KEY not in history.history and STEP_KEY not in history.history


@pytest.mark.skipif(BACKEND == "torch", reason="no steps_per_execution on PyTorch")
@pytest.mark.parametrize("known_length", [True, False])
def test_steps_per_execution(tmp_path, known_length):
    import tensorflow as tf

    x, y = data(40)
    plain, recorder = make_model(), Recorder()
    plain.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[recorder]
    )
    model = make_model(steps_per_execution=2)
    train = (
        (x, y)
        if known_length
        else (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(8)
            .filter(lambda a, b: True),
        )
    )
    kwargs = {"batch_size": 8} if known_length else {}
    model.fit(
        *train,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[kerasreg.WeightNormLogger(tmp_path, update_freq=3, gradients=True)],
        **kwargs,
    )
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in model.get_weights()]),
        np.concatenate([w.ravel() for w in recorder.before[-1]]),
        rtol=1e-5,
    )
    # 5 batches per epoch in executions of 2, 2, 1: the hook sees steps
    # 2, 4, 5, 7, 9, 10; logs land at the first at or past each multiple of 3
    # and at the fit's last step.
    series = logged(tmp_path / "train", "h/kernel")
    norms = read_scalars(tmp_path / "train")["norm_l2/h/kernel"]
    assert [s for s, _ in norms] == [4, 7, 9, 10]
    # Gradients of every logged step (when the epoch length is unknown every
    # execution is measured; otherwise those that may end with a log).
    assert sorted(series) == [4, 7, 9, 10]
    for step, stats in series.items():
        t = step - 1
        b = t % 5
        expected = reference(
            recorder.before[t], x[8 * b : 8 * b + 8], y[8 * b : 8 * b + 8]
        )["h/kernel"]
        expected["update_ratio"] = update_ratio(
            recorder.before[t], recorder.before[t + 1], 0
        )
        assert_matches(stats, expected, f"step {step}")


def test_gradient_accumulation_logs_the_applied_window_mean(tmp_path):
    x, y = data(32)
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    model = make_model(optimizer)
    recorder = Recorder()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[
            kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True),
            recorder,
        ],
    )
    assert recorder.updates == [0, 1, 1, 2, 2, 3, 3, 4]
    series = logged(tmp_path / "train", "h/kernel")
    assert sorted(series) == [1, 2, 3, 4]
    for update in (1, 2, 3, 4):
        first = 2 * (update - 1)  # the window's first batch
        b = first % 4
        window = slice(8 * b, 8 * b + 16)  # its two batches: one batch of 16
        expected = reference(recorder.before[first], x[window], y[window])["h/kernel"]
        expected["update_ratio"] = update_ratio(
            recorder.before[first], recorder.before[first + 2], 0
        )
        assert_matches(series[update], expected, f"update {update}")


def test_loss_scaling_logs_unscaled_gradients_and_skips_skipped_steps(tmp_path):
    x, y = data(48)
    y = 30 * y  # large gradients, and a scale so large that the first steps
    # overflow and are skipped.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**127
    )
    model = make_model(optimizer)
    recorder = Recorder()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[
            kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True),
            recorder,
        ],
    )
    updates = recorder.updates
    skipped = [
        t for t in range(len(updates)) if updates[t] == (updates[t - 1] if t else 0)
    ]
    assert skipped and len(skipped) < len(updates), updates
    series = logged(tmp_path / "train", "h/kernel")
    assert sorted(series) == list(range(1, updates[-1] + 1))
    for t, done in enumerate(updates):
        if t in skipped:
            continue
        b = t % 6
        expected = reference(
            recorder.before[t], x[8 * b : 8 * b + 8], y[8 * b : 8 * b + 8]
        )["h/kernel"]
        expected["update_ratio"] = update_ratio(
            recorder.before[t], recorder.before[t + 1], 0
        )
        assert_matches(series[done], expected, f"batch {t}, update {done}")


def test_epoch_mode_logs_the_epochs_last_step_and_decay_is_in_the_update(tmp_path):
    x, y = data(40)
    model = make_model(keras.optimizers.SGD(0.1))
    recorder = Recorder()
    decay = kerasreg.WeightDecay(0.05)  # folded into the step: part of the update
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            decay,
            kerasreg.WeightNormLogger(tmp_path, gradients=True),
            recorder,
        ],
    )
    series = logged(tmp_path / "train", "o/kernel")
    assert sorted(series) == [0, 1, 2]
    for epoch in range(3):
        t = 5 * epoch + 4  # the epoch's last batch
        expected = reference(recorder.before[t], x[32:], y[32:])["o/kernel"]
        expected["update_ratio"] = update_ratio(
            recorder.before[t], recorder.before[t + 1], 2
        )
        assert_matches(series[epoch], expected, f"epoch {epoch}")


def test_validation_dataset_gives_what_its_arrays_give(tmp_path):
    import tensorflow as tf

    x, y = data(48)
    runs = {}
    for name, validation in {
        "arrays": (x[32:], y[32:]),
        "dataset": tf.data.Dataset.from_tensor_slices((x[32:], y[32:])).batch(5),
    }.items():
        model = make_model()
        model.fit(
            x[:32],
            y[:32],
            batch_size=8,
            epochs=1,
            verbose=0,
            validation_data=validation,
            callbacks=[kerasreg.WeightNormLogger(tmp_path / name, gradients=True)],
        )
        runs[name] = logged(tmp_path / name / "validation", "h/kernel")
        weights = model.get_weights()
    copy = make_model()
    copy.set_weights(weights)
    expected = kerasreg.gradient_norms(copy, x[32:], y[32:])["h/kernel"]
    assert_matches(runs["dataset"][0], expected, "dataset")
    assert_matches(runs["arrays"][0], expected, "arrays")


def read_layout_and_plan(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    (raw,) = [e for e in events.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)]
    layout = layout_pb2.Layout()
    layout.ParseFromString(raw.tensor_proto.string_val[0])
    plan = events.Tensors("regularization/plan")[0].tensor_proto.string_val[0]
    return layout, plan.decode()


def test_layout_charts_gradients_per_layer_and_plan_says_when(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.LSTM(
                3,
                kernel_regularizer=kerasreg.L2Penalty(0.01),
                recurrent_regularizer=kerasreg.L2Penalty(0.02),
                name="lstm",
            ),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        validation_split=0.25,
        callbacks=[kerasreg.WeightNormLogger(tmp_path, update_freq=2, gradients=True)],
    )
    layout, plan = read_layout_and_plan(tmp_path / "train")
    charts = {
        category.title: {c.title: c.multiline.tag[0] for c in category.chart}
        for category in layout.category
    }
    titles = [category.title for category in layout.category]
    assert titles[:5] == [
        "regularization: penalty per layer",
        "regularization: gradient norms per layer",
        "regularization: penalty share per layer",
        "regularization: gradient cosine per layer",
        "regularization: update ratio per layer",
    ]
    lstm = ("lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel")
    share = charts["regularization: penalty share per layer"]
    assert set(share) == {"penalty share lstm", "penalty share out"}
    written = set(read_scalars(tmp_path / "train")) | set(
        read_scalars(tmp_path / "validation")
    )

    matched = {
        title: sorted(t for t in written if re.fullmatch(pattern, t))
        for category in charts.values()
        for title, pattern in category.items()
    }
    assert matched["penalty share lstm"] == [f"penalty_share/{k}" for k in lstm]
    assert matched["gradient lstm"] == sorted(
        f"grad_{s}/{k}" for k in lstm for s in ("data", "penalty")
    )
    assert matched["update ratio out"] == ["update_ratio/out/kernel"]
    # Every gradient tag written is in exactly one chart.
    gradient_tags = {
        t
        for t in written
        if t.split("/")[0] in (*STATS, "update_ratio") and t != "penalty/total"
    }
    charted = [t for tags in matched.values() for t in tags if t in gradient_tags]
    assert sorted(charted) == sorted(
        gradient_tags - {f"grad_total/{k}" for k in (*lstm, "out/kernel")}
    )
    assert "gradient statistics every 2 updates (training batch)" in plan
    assert plan.count("WeightNormLogger: gradient statistics") == 3  # the kernels


def test_bad_arguments_and_refusals_change_nothing(tmp_path):
    with pytest.raises(TypeError, match="gradients"):
        kerasreg.WeightNormLogger(tmp_path, gradients="yes")
    model = make_model()
    model.get_layer("h").trainable = False
    model.get_layer("o").trainable = False
    model.compile(optimizer="adam", loss="mse")
    x, y = data(8)
    frozen = [model.get_layer("h").kernel]  # an explicit variable: selected as it is
    logger = kerasreg.WeightNormLogger(tmp_path, where=frozen, gradients=True)
    with pytest.raises(ValueError, match="no weight the optimizer trains"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    assert "train_step" not in vars(model) and "evaluate" not in vars(model)


def test_logs_seen_by_other_callbacks_never_hold_the_sums(tmp_path):
    seen = []

    class Keys(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(set(logs))

        def on_epoch_end(self, epoch, logs=None):
            seen.append(set(logs))

    x, y = data(16)
    make_model().fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            Keys(),
            kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True),
        ],
    )
    assert seen and all(KEY not in keys and STEP_KEY not in keys for keys in seen)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_mirrored_strategy_is_refused_before_anything_changes(tmp_path):
    out = run_mirrored(
        f"""
        import kerasreg
        with mirrored.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
        before = model.get_weights()
        logger = kerasreg.WeightNormLogger({str(tmp_path)!r}, gradients=True)
        try:
            model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
            message = None
        except ValueError as error:
            message = str(error)
        same = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
        print(json.dumps({{"replicas": mirrored.num_replicas_in_sync,
                          "message": message, "same": same}}))
        """
    )
    assert "more than one replica" in out["message"]
    assert "MirroredStrategy with 2 replicas" in out["message"]
    assert out["same"]
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_gradient_scalars_seam_for_other_writers():
    stats = {"a/kernel": {"data": 1.0, "penalty": 2.0, "total": 3.0,
                          "penalty_share": 0.5, "cosine": -1.0}}  # fmt: skip
    assert kerasreg.tensorboard.gradient_scalars(stats) == {
        "grad_data/a/kernel": 1.0,
        "grad_penalty/a/kernel": 2.0,
        "grad_total/a/kernel": 3.0,
        "penalty_share/a/kernel": 0.5,
        "grad_cosine/a/kernel": -1.0,
    }
    assert json.dumps(stats)  # plain floats


DATA_PARALLEL = r"""
import json, sys, tempfile
import numpy as np
import jax
import keras
import kerasreg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 3)).astype("float32")
y = rng.normal(size=(32, 1)).astype("float32")


def model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="h",
                           kernel_regularizer=kerasreg.L2Penalty(0.05)),
        keras.layers.Dense(1, name="o"),
    ])
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return m


before = []


class Recorder(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        before.append(self.model.get_weights())


log_dir = tempfile.mkdtemp()
with keras.distribution.DataParallel(devices=jax.devices()).scope():
    trained = model()
    trained.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[
        kerasreg.WeightNormLogger(log_dir, update_freq=1, gradients=True), Recorder()])
    shards = len(trained.get_layer("h").kernel.value.addressable_shards)
events = EventAccumulator(log_dir + "/train", size_guidance={"tensors": 0})
events.Reload()
logged = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in events.Tensors("grad_data/h/kernel")}
reference = {}
for t in range(2):
    plain = model()
    plain.set_weights(before[t])
    batch = slice(16 * t, 16 * t + 16)
    reference[t + 1] = kerasreg.gradient_norms(
        plain, x[batch], y[batch], training=True)["h/kernel"]["data"]
print("RESULT " + json.dumps({"devices": len(jax.devices()), "shards": shards,
                              "logged": logged, "reference": reference}))
sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="JAX DataParallel over 2 host devices")
def test_jax_data_parallel_logs_the_global_gradient():
    from conftest import run_result

    out = run_result(["-c", DATA_PARALLEL], backend="jax", host_devices=2)
    assert out["devices"] == 2 and out["shards"] == 2
    assert set(out["logged"]) == {"1", "2"}
    for step, value in out["reference"].items():
        # The gradient of the whole batch (both devices' halves), not a half's.
        assert_close(out["logged"][step], value, f"step {step}", 1e-5)


def test_mixed_precision_logs_the_unscaled_gradient(tmp_path):
    x, y = data(32)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make_model(keras.optimizers.SGD(0.1))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        recorder = Recorder()
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[
                kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True),
                recorder,
            ],
        )
        series = logged(tmp_path / "train", "h/kernel")
        assert sorted(series) == [1, 2]
        for t in range(2):
            expected = reference_mixed(
                recorder.before[t], x[16 * t : 16 * t + 16], y[16 * t : 16 * t + 16]
            )
            # float16 arithmetic in the forward and backward passes; the
            # scale (32768) is divided out, else the norms would be 2**15 off.
            assert_matches(series[t + 1], expected, f"step {t + 1}", tolerance=2e-2)
    finally:
        keras.config.set_dtype_policy("float32")


def reference_mixed(weights, x, y):
    model = make_model()  # under the mixed policy in force
    model.set_weights(weights)
    return kerasreg.gradient_norms(model, x, y, training=True)["h/kernel"]


def describe_rows(text):
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header = rows[0]
    return {row[0].strip("`"): dict(zip(header, row, strict=True)) for row in rows[2:]}


@pytest.mark.parametrize(
    "update_freq, when",
    [
        (1, "every update"),
        (3, "every 3 updates"),
        ("epoch", "at each epoch's last update"),
    ],
)
def test_describe_with_callbacks_says_when_gradients_are_logged(
    tmp_path, update_freq, when
):
    model = make_model()
    logger = kerasreg.WeightNormLogger(
        tmp_path, update_freq=update_freq, gradients=True
    )
    rows = describe_rows(kerasreg.describe(model, callbacks=[logger]))
    expected = (
        f"WeightNormLogger: gradient statistics {when} (training batch) and at "
        "each epoch end on the validation data, if any"
    )
    # The logger's default `where` (kernels) gets the sentence; biases do not.
    assert sorted(rows) == ["h/bias", "h/kernel", "o/bias", "o/kernel"]
    for path in KEYS:
        assert expected in rows[path]["callbacks"], rows[path]
    for path in ("h/bias", "o/bias"):
        assert "gradient" not in rows[path]["callbacks"], rows[path]
    # Without gradients=True the plan says nothing about gradients.
    plain = kerasreg.WeightNormLogger(tmp_path, update_freq=update_freq)
    assert "gradient" not in kerasreg.describe(model, callbacks=[plain])
    # Describing is read-only: no run folder is written.
    assert not list(tmp_path.iterdir())


def test_write_gradient_statistics_one_run_per_variant(tmp_path):
    """The seam a sweep needs: per-variant `gradient_norms` dicts written to
    each variant's run, read back from disk, against the closed-form penalty
    gradient of L2Penalty (2 * alpha * ||w||)."""
    x, y = data(16)
    written = {}
    for alpha in (0.05, 0.5):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(
                    2, kernel_regularizer=kerasreg.L2Penalty(alpha), name="h"
                ),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
        stats = kerasreg.gradient_norms(model, x, y)
        folder = tmp_path / f"l2_{alpha:g}" / "validation"
        kerasreg.tensorboard.write_gradient_statistics(str(folder), 7, stats)
        kernel = np.asarray(model.get_layer("h").kernel.numpy(), np.float64)
        written[alpha] = (folder, stats, 2 * alpha * np.linalg.norm(kernel))
    for alpha, (folder, stats, penalty) in written.items():
        series = logged(folder, "h/kernel")
        assert list(series) == [7]
        assert set(series[7]) == set(STATS.values())
        assert_close(series[7]["penalty"], penalty, f"alpha {alpha}", 1e-5)
        assert_matches(series[7], stats["h/kernel"], f"alpha {alpha}", 1e-6)
    # Ten times the strength, ten times the penalty gradient, same data gradient.
    a, b = (logged(written[k][0], "h/kernel")[7] for k in (0.05, 0.5))
    assert_close(b["penalty"], 10 * a["penalty"], "penalty x10", 1e-5)
    assert_close(b["data"], a["data"], "data", 1e-6)


@pytest.mark.parametrize(
    "step, statistics, message",
    [
        (-1, {"a/kernel": {"data": 1.0}}, "step=-1"),
        (True, {"a/kernel": {"data": 1.0}}, "step=True"),
        (0, {"a/kernel": {"norm": 1.0}}, "unknown statistic 'norm'"),
        (0, {"a/kernel": {"data": "1"}}, "'a/kernel'/'data' is '1'"),
        (0, [("a/kernel", {})], "statistics=[("),
    ],
)
def test_write_gradient_statistics_refuses_bad_input(
    tmp_path, step, statistics, message
):
    with pytest.raises(ValueError, match=re.escape(message)):
        kerasreg.tensorboard.write_gradient_statistics(
            str(tmp_path / "run"), step, statistics
        )
    assert not (tmp_path / "run").exists()


def test_l2sp_reference_is_read_at_each_step_and_follows_set_reference(tmp_path):
    # The penalty gradient reads the L2-SP reference from the step's state
    # (on JAX the first fit once crashed: Keras purges the variables' values
    # around `stateless_apply`), and a new reference between two fits is the
    # one the next logged step measures against.
    x, y = data(8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(0.5))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # w constant
    kernel = model.get_layer("d").kernel
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True)
    fit = dict(batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    model.fit(x, y, **fit)
    first = kerasreg.gradient_norms(model, x, y, training=True)["d/kernel"]
    kernel.regularizer.set_reference(np.ones((3, 2)))
    model.fit(x, y, **fit)
    second = kerasreg.gradient_norms(model, x, y, training=True)["d/kernel"]
    series = logged(tmp_path / "train", "d/kernel")
    assert sorted(series) == [1, 2]
    w = np.asarray(ops.convert_to_numpy(kernel), np.float64)
    assert first["penalty"] == 0.0  # the reference is the initial kernel
    assert_close(second["penalty"], np.linalg.norm(2 * 0.5 * (w - 1)), "closed form")
    for step, expected in ((1, first), (2, second)):
        assert_matches(series[step], expected, f"step {step}")
        assert series[step]["update_ratio"] == 0.0


@pytest.mark.parametrize("engine", ["auto", "sequential"])
def test_sweep_logs_each_variants_gradients_per_epoch(tmp_path, engine):
    """`sweep(..., log_dir=..., gradients=True)`: each variant's run holds, per
    epoch, its gradient statistics on the training part and on the validation
    part of the data (Keras's validation_split: the last quarter). At the last
    epoch they equal `gradient_norms` of the trained variant on those parts,
    and the penalty gradient is the closed form 2 * alpha * ||w||."""
    x, y = data(40)
    keras.utils.set_random_seed(0)
    template = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="h"), keras.layers.Dense(1)]
    )
    template.compile(optimizer="sgd", loss="mse")
    alphas = (0.01, 0.3)
    result = kerasreg.sweep(
        template,
        kerasreg.grid(kerasreg.L2Penalty, list(alphas)),
        x,
        y,
        epochs=2,
        batch_size=10,
        validation_split=0.25,
        shuffle=False,
        verbose=0,
        log_dir=tmp_path,
        gradients=True,
        engine=engine,
    )
    parts = {"train": (x[:30], y[:30]), "validation": (x[30:], y[30:])}
    for alpha, row, variant in zip(alphas, result.rows, result.models, strict=True):
        kernel = np.asarray(variant.get_layer("h").kernel.numpy(), np.float64)
        for run, (xs, ys) in parts.items():
            series = logged(tmp_path / row["run"] / run, "h/kernel")
            assert sorted(series) == [0, 1], (run, sorted(series))
            expected = kerasreg.gradient_norms(variant, xs, ys, batch_size=10)
            assert_matches(series[1], expected["h/kernel"], f"{row['run']} {run}", 1e-5)
            assert_close(
                series[1]["penalty"],
                2 * alpha * np.linalg.norm(kernel),
                f"{row['run']} {run} penalty",
                1e-5,
            )


def test_sweep_gradients_with_validation_data_read_all_of_x(tmp_path):
    """Keras ignores validation_split when validation_data is given and trains
    on all of `x`: so does the logged training gradient."""
    x, y = data(24)
    xv, yv = data(8)
    template = make_model()
    result = kerasreg.sweep(
        template,
        [kerasreg.L2Penalty(0.1)],
        x,
        y,
        epochs=1,
        batch_size=8,
        validation_split=0.5,
        validation_data=(xv, yv),
        shuffle=False,
        verbose=0,
        log_dir=tmp_path,
        gradients=True,
    )
    variant, run = result.models[0], result.rows[0]["run"]
    for part, (xs, ys) in {"train": (x, y), "validation": (xv, yv)}.items():
        expected = kerasreg.gradient_norms(variant, xs, ys, batch_size=8)
        series = logged(tmp_path / run / part, "h/kernel")
        assert_matches(series[0], expected["h/kernel"], part, 1e-5)


def test_sweep_gradients_refusals_train_nothing(tmp_path):
    import tensorflow as tf

    x, y = data(8)
    template = make_model()
    before = [w.copy() for w in template.get_weights()]
    grid = [kerasreg.L2Penalty(0.1)]
    with pytest.raises(ValueError, match=r"invalid `gradients`.*log_dir=None"):
        kerasreg.sweep(template, grid, x, y, gradients=True, verbose=0)
    with pytest.raises(TypeError, match="gradients"):
        kerasreg.sweep(template, grid, x, y, gradients="yes", verbose=0)
    kwargs = dict(log_dir=tmp_path, gradients=True, verbose=0)
    with pytest.raises(ValueError, match=r"invalid `gradients`.*class_weight"):
        kerasreg.sweep(template, grid, x, y, class_weight={0: 1.0}, **kwargs)
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    with pytest.raises(ValueError, match=r"invalid `gradients`.*steps_per_epoch=2"):
        kerasreg.sweep(template, grid, endless, steps_per_epoch=2, **kwargs)
    for a, b in zip(template.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


# --- a logger reused across fits; steps the logger did not measure ----------------


def linear_closed_form(w, x, y, penalty_grad):
    """The statistics of a bias-free linear model under mean squared error:
    data gradient `2/n X^T (Xw - y)`, the penalty gradient given."""
    w, x, y = (np.asarray(a, np.float64) for a in (w, x, y))
    return gradient_statistics(2 / len(x) * x.T @ (x @ w - y), penalty_grad)


def linear_model(regularizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                1, use_bias=False, kernel_regularizer=regularizer, name="d"
            ),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


# (penalty of the first fit, what `regularize` sets before the second,
#  c such that the second fit's penalty is c * sum(w**2), None if removed)
REGULARIZE_CASES = {
    "stronger": (lambda: kerasreg.L2Penalty(0.1), lambda: kerasreg.L2Penalty(1.0), 1.0),
    "added": (lambda: None, lambda: kerasreg.L2Penalty(1.0), 1.0),
    "removed": (lambda: kerasreg.L2Penalty(0.1), lambda: kerasreg.REMOVE, None),
    "keras": (lambda: kerasreg.L2Penalty(0.1), lambda: keras.regularizers.L2(0.3), 0.3),
}


@pytest.mark.parametrize("case", sorted(REGULARIZE_CASES))
def test_reused_logger_measures_the_penalty_regularize_set_between_fits(tmp_path, case):
    # One logger, two fits, `kerasreg.regularize` between them: the second
    # fit's gradient statistics (training batch and validation data) and
    # penalties are those of the new penalty (the logger once kept measuring
    # the training gradient against the penalty of its first fit).
    first, second, strength = REGULARIZE_CASES[case]
    x, y = data(8)
    x_val, y_val = data(8, seed=1)
    model = linear_model(first())
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True)
    fit = dict(
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[logger],
    )
    model.fit(x, y, **fit)
    kerasreg.regularize(model, kernel=second())
    kernel = model.get_layer("d").kernel
    w = np.asarray(ops.convert_to_numpy(kernel), np.float64)
    model.fit(x, y, **fit)
    after = np.asarray(ops.convert_to_numpy(kernel), np.float64)
    c = strength or 0.0
    expected = linear_closed_form(w, x, y, 2 * c * w)
    series = logged(tmp_path / "train", "d/kernel")
    assert sorted(series) == [1, 2]
    assert_matches(series[2], expected, f"{case}: step 2")
    validation = logged(tmp_path / "validation", "d/kernel")
    expected = linear_closed_form(after, x_val, y_val, 2 * c * after)
    assert_matches(validation[2], expected, f"{case}: validation at step 2")
    scalars = read_scalars(tmp_path / "train")
    assert_close(dict(scalars["penalty/total"])[2], c * np.sum(after**2), "total")
    if strength is None:
        assert 2 not in dict(scalars.get("penalty/d/kernel", []))
    else:
        assert_close(dict(scalars["penalty/d/kernel"])[2], c * np.sum(after**2), case)


class StopAfter(keras.callbacks.Callback):
    """Weights before each batch; `stop_training` after batch `last`."""

    def __init__(self, last=None):
        super().__init__()
        self.last, self.before = last, []

    def on_train_batch_begin(self, batch, logs=None):
        kernel = self.model.get_layer("d").kernel
        self.before.append(np.asarray(ops.convert_to_numpy(kernel), np.float64))

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.last:
            self.model.stop_training = True


@pytest.mark.parametrize("ending", ["stop_training", "data_ran_out"])
def test_an_unmeasured_last_step_logs_no_older_steps_gradient(tmp_path, ending):
    # `update_freq=2`: steps 2, 4, ... are measured; the fit ends after step 3,
    # which is logged (norms) without a measurement: no gradient statistics
    # there. On PyTorch, step 3 once carried step 2's gradient (the update
    # count sent with the measurement was a live view of the optimizer's).
    x, y = data(16)
    model = linear_model(kerasreg.L2Penalty(0.1))
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=2, gradients=True)
    if ending == "stop_training":
        recorder = StopAfter(last=2)
        inputs = dict(x=x, y=y, batch_size=2, shuffle=False)
    else:
        recorder = StopAfter()

        def three_batches():
            for i in range(3):
                yield x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]

        inputs = dict(x=three_batches(), steps_per_epoch=8, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Your input ran out of data")
        model.fit(**inputs, epochs=1, verbose=0, callbacks=[logger, recorder])
    # Three updates; on TensorFlow, Keras counts one more iteration (without
    # an update) when the data runs out.
    last = int(ops.convert_to_numpy(model.optimizer.iterations))
    assert len(recorder.before) >= 3 and last in (3, 4)
    scalars = read_scalars(tmp_path / "train")
    assert sorted(dict(scalars["norm_l2/d/kernel"])) == [2, last]  # the fit's end
    series = logged(tmp_path / "train", "d/kernel")
    assert sorted(series) == [2]
    w = recorder.before[1]
    expected = linear_closed_form(w, x[2:4], y[2:4], 2 * 0.1 * w)
    assert_matches(series[2], expected, f"{ending}: step 2")
