"""`WeightNormLogger`: event files read back with TensorBoard's own reader."""

import os
import shutil
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_python
from keras import ops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import kerasreg
from kerasreg import WeightNormLogger
from kerasreg._checks import KerasregWarning


def read_scalars(folder):
    """`{tag: [(step, value), ...]}` from every event file in `folder`."""
    accumulator = EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "tensors": 0}
    )
    accumulator.Reload()
    result = {}
    for tag in accumulator.Tags()["tensors"]:
        arrays = [
            (e.step, tensor_util.make_ndarray(e.tensor_proto))
            for e in accumulator.Tensors(tag)
        ]
        if all(a.shape == () and a.dtype.kind == "f" for _, a in arrays):
            result[tag] = [(step, float(a)) for step, a in arrays]
    for tag in accumulator.Tags()["scalars"]:
        result[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return result


def last(scalars, tag):
    return scalars[tag][-1][1]


def np_weights(variable):
    return np.asarray(ops.convert_to_numpy(variable.value), dtype=np.float64)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 3)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def recurrent_model(regularized=True):
    def reg(penalty):
        return penalty if regularized else None

    inputs = keras.Input((4, 3))
    x = keras.layers.LSTM(
        4,
        return_sequences=True,
        kernel_regularizer=reg(kerasreg.L2Penalty(0.05)),
        recurrent_regularizer=reg(kerasreg.L1Penalty(0.01)),
        name="lstm",
    )(inputs)
    x = keras.layers.Bidirectional(
        keras.layers.GRU(
            3,
            kernel_regularizer=reg(kerasreg.L1Penalty(0.02)),
            recurrent_regularizer=reg(kerasreg.L2Penalty(0.04)),
        ),
        name="bi",
    )(x)
    outputs = keras.layers.Dense(
        1, bias_regularizer=reg(kerasreg.L2Penalty(0.3)), name="out"
    )(x)
    return keras.Model(inputs, outputs)


PENALTIES = {
    "lstm/lstm_cell/kernel": lambda w: 0.05 * (w**2).sum(),
    "lstm/lstm_cell/recurrent_kernel": lambda w: 0.01 * abs(w).sum(),
    "bi/forward_gru/gru_cell/kernel": lambda w: 0.02 * abs(w).sum(),
    "bi/forward_gru/gru_cell/recurrent_kernel": lambda w: 0.04 * (w**2).sum(),
    "bi/backward_gru/gru_cell/kernel": lambda w: 0.02 * abs(w).sum(),
    "bi/backward_gru/gru_cell/recurrent_kernel": lambda w: 0.04 * (w**2).sum(),
    "out/bias": lambda w: 0.3 * (w**2).sum(),
}


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory):
    """Two epochs with validation data, per-gate logging; read back from disk."""
    keras.utils.set_random_seed(0)
    log_dir = tmp_path_factory.mktemp("epoch") / "logs"
    model = recurrent_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x, y = data()
    xv, yv = data(16, seed=1)
    logger = WeightNormLogger(log_dir, per_gate=True)
    history = model.fit(
        x, y, batch_size=16, epochs=2, validation_data=(xv, yv), verbose=0,
        callbacks=[logger],
    )  # fmt: skip
    return {
        "model": model,
        "logger": logger,
        "history": history.history,
        "train": read_scalars(log_dir / "train"),
        "validation": read_scalars(log_dir / "validation"),
        "val_data": (xv, yv),
    }


def test_norms_of_every_selected_weight_match_final_weights(epoch_run):
    model, train = epoch_run["model"], epoch_run["train"]
    # The default `where`: kernels (ndim >= 2), not GRU's 2-D reset_after bias.
    selected = [v for v in model.weights if v.name != "bias" and len(v.shape) >= 2]
    assert len(selected) == 7
    for variable in selected:
        w = np_weights(variable)
        a = abs(w)
        expected = {
            "norm_l1": a.sum(),
            "norm_l2": np.sqrt((w**2).sum()),
            "norm_linf": a.max(),
            "zero_fraction": (a < 1e-8).mean(),
        }
        for section, value in expected.items():
            series = train[f"{section}/{variable.path}"]
            assert [step for step, _ in series] == [0, 1]
            assert series[-1][1] == pytest.approx(value, rel=1e-5, abs=1e-7)
    logged = {t.split("/", 1)[1] for t in train if t.startswith("norm_l2/")}
    logged = {path for path in logged if "/gate_" not in path}
    assert logged == {v.path for v in selected}
    assert "out/bias" not in logged and "lstm/lstm_cell/bias" not in logged


def test_per_gate_norms_match_column_blocks(epoch_run):
    model, train = epoch_run["model"], epoch_run["train"]
    by_path = {v.path: v for v in model.weights}
    for path, gates in [
        ("lstm/lstm_cell/kernel", "ifco"),
        ("lstm/lstm_cell/recurrent_kernel", "ifco"),
        ("bi/backward_gru/gru_cell/recurrent_kernel", "zrh"),
    ]:
        w = np_weights(by_path[path])
        units = w.shape[-1] // len(gates)
        for k, gate in enumerate(gates):
            block = w[:, k * units : (k + 1) * units]
            assert last(train, f"norm_l2/{path}/gate_{gate}") == pytest.approx(
                np.sqrt((block**2).sum()), rel=1e-5
            )
            assert last(train, f"norm_l1/{path}/gate_{gate}") == pytest.approx(
                abs(block).sum(), rel=1e-5
            )


def test_penalties_are_separate_series_per_weight(epoch_run):
    model, train = epoch_run["model"], epoch_run["train"]
    by_path = {v.path: v for v in model.weights}
    penalty_tags = {t for t in train if t.startswith("penalty/")}
    expected_tags = {f"penalty/{p}" for p in PENALTIES} | {"penalty/total"}
    assert penalty_tags == expected_tags
    total = 0.0
    for path, formula in PENALTIES.items():
        value = formula(np_weights(by_path[path]))
        assert last(train, f"penalty/{path}") == pytest.approx(value, rel=1e-5)
        total += value
    assert last(train, "penalty/total") == pytest.approx(total, rel=1e-5)
    assert last(epoch_run["validation"], "penalty/total") == pytest.approx(
        total, rel=1e-5
    )
    # The LSTM's input and recurrent penalties really are different numbers.
    assert last(train, "penalty/lstm/lstm_cell/kernel") != pytest.approx(
        last(train, "penalty/lstm/lstm_cell/recurrent_kernel"), rel=1e-3
    )


def test_validation_data_loss_is_the_plain_validation_loss(epoch_run):
    model, validation = epoch_run["model"], epoch_run["validation"]
    xv, yv = epoch_run["val_data"]
    assert [step for step, _ in validation["loss/data"]] == [0, 1]
    # Independent reference: the same weights in a model without any penalty.
    plain = recurrent_model(regularized=False)
    plain.set_weights(model.get_weights())
    plain.compile(loss="mse")
    plain_loss = plain.evaluate(xv, yv, batch_size=16, verbose=0)
    numpy_loss = float(np.mean((plain.predict(xv, verbose=0) - yv) ** 2))
    assert last(validation, "loss/data") == pytest.approx(plain_loss, rel=1e-5)
    assert last(validation, "loss/data") == pytest.approx(numpy_loss, rel=1e-5)
    history = epoch_run["history"]
    assert last(epoch_run["train"], "loss/data") == pytest.approx(
        history["loss"][-1] - last(epoch_run["train"], "penalty/total"), rel=1e-6
    )


def test_train_data_loss_is_exact_when_weights_do_not_move(tmp_path):
    # lr = 0: the penalty is constant over the epoch, so loss - penalty is exact.
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, kernel_regularizer=kerasreg.L2Penalty(0.5)),
            keras.layers.Dense(1, kernel_regularizer=kerasreg.L1Penalty(0.2)),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 3)), rng.normal(size=(32, 1))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[WeightNormLogger(tmp_path)])  # fmt: skip
    train = read_scalars(tmp_path / "train")
    numpy_loss = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    assert last(train, "loss/data") == pytest.approx(numpy_loss, rel=1e-5)
    assert last(train, "penalty/total") > 0.1 * numpy_loss  # not a trivial check


def is_default(method):
    # How keras.callbacks.CallbackList decides whether a hook is overridden.
    return getattr(method, "_is_default", False)


def test_epoch_mode_defines_no_batch_hook(epoch_run):
    logger = epoch_run["logger"]
    assert is_default(logger.on_train_batch_end)
    assert is_default(logger.on_batch_end)
    batch_logger = WeightNormLogger("unused", update_freq=3)
    assert not is_default(batch_logger.on_train_batch_end)
    # Backends that allow async dispatch keep it with the epoch-mode logger.
    baseline = keras.callbacks.CallbackList([keras.callbacks.Callback()])
    assert keras.callbacks.CallbackList([logger])._async_train == baseline._async_train
    assert not keras.callbacks.CallbackList([batch_logger])._async_train


def test_batch_level_logging_steps(tmp_path):
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(48)
    xv, yv = data(16, seed=1)
    # 48 / 8 = 6 batches per epoch, 2 epochs: global batches 1..12.
    model.fit(
        x, y, batch_size=8, epochs=2, validation_data=(xv, yv), verbose=0,
        callbacks=[WeightNormLogger(tmp_path, update_freq=4)],
    )  # fmt: skip
    train = read_scalars(tmp_path / "train")
    validation = read_scalars(tmp_path / "validation")
    kernel = "norm_l2/lstm/lstm_cell/kernel"
    assert [step for step, _ in train[kernel]] == [4, 8, 12]
    assert [step for step, _ in train["loss/data"]] == [4, 8, 12]
    assert [step for step, _ in validation["loss/data"]] == [6, 12]
    w = np_weights(model.get_layer("lstm").cell.kernel)
    assert last(train, kernel) == pytest.approx(np.sqrt((w**2).sum()), rel=1e-5)
    # A second fit continues the global batch count (optimizer iterations),
    # and its last log is at its last step (18), not only at multiples of 4.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[WeightNormLogger(tmp_path, update_freq=4)])  # fmt: skip
    steps = [step for step, _ in read_scalars(tmp_path / "train")[kernel]]
    assert steps == [4, 8, 12, 16, 18]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_batch_logs_read_the_step_only_when_a_log_may_be_due(
    accumulation, tmp_path, monkeypatch
):
    # 20 batches, one update per batch (or per 2 with gradient accumulation):
    # logs at optimizer steps 5, 10, 15, 20 (5, 10). The hook reads the
    # optimizer's count only once a log may be due, not after every batch.
    from kerasreg import tensorboard as module

    reads = []
    real = module.optimizer_iterations

    def counting(model):
        reads.append(real(model))
        return reads[-1]

    monkeypatch.setattr(module, "optimizer_iterations", counting)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="d")])
    model.compile(
        optimizer=keras.optimizers.SGD(
            0.01, gradient_accumulation_steps=accumulation if accumulation > 1 else None
        ),
        loss="mse",
    )
    x = np.ones((80, 3), "float32")
    y = np.zeros((80, 1), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[WeightNormLogger(tmp_path, update_freq=5)])  # fmt: skip
    updates = 20 // accumulation
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == updates
    logged = [step for step, _ in read_scalars(tmp_path / "train")["norm_l2/d/kernel"]]
    assert logged == list(range(5, updates + 1, 5))
    if accumulation == 1:
        # on_train_begin, the 4 logs, on_epoch_end, on_train_end: not 20+.
        assert len(reads) == 7, reads
    else:
        assert len(reads) < 20, reads


def event_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".tfevents." in p.name)


def test_consecutive_fits_append_to_one_event_file_in_step_order(tmp_path):
    # TensorBoard reads a run's files in name order, and TensorFlow's names
    # sort `...10.v2` before `...9.v2` within one second: with a new file per
    # fit, a later fit could be read first. One file keeps them in order.
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(16)
    for _ in range(4):  # 2 batches per fit: steps 2, 4, 6, 8
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[WeightNormLogger(tmp_path, update_freq=2)])  # fmt: skip
    assert len(event_files(tmp_path / "train")) == 1
    train = read_scalars(tmp_path / "train")
    kernel = "norm_l2/lstm/lstm_cell/kernel"
    assert [step for step, _ in train[kernel]] == [2, 4, 6, 8]
    w = np_weights(model.get_layer("lstm").cell.kernel)
    assert last(train, kernel) == pytest.approx(np.sqrt((w**2).sum()), rel=1e-5)


def test_log_dir_removed_between_fits_is_written_again(tmp_path):
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(16)
    log_dir = tmp_path / "logs"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[WeightNormLogger(log_dir)])  # fmt: skip
    shutil.rmtree(log_dir)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[WeightNormLogger(log_dir)])  # fmt: skip
    train = read_scalars(log_dir / "train")
    assert [step for step, _ in train["penalty/total"]] == [0, 1]
    w = np_weights(model.get_layer("lstm").cell.recurrent_kernel)
    tag = "norm_l2/lstm/lstm_cell/recurrent_kernel"
    assert last(train, tag) == pytest.approx(np.sqrt((w**2).sum()), rel=1e-5)


class _RecordingProbe(keras.callbacks.Callback):
    """Notes whether summaries would be recorded at each epoch end."""

    def __init__(self):
        super().__init__()
        self.recording = []

    def on_epoch_end(self, epoch, logs=None):
        self.recording.append(bool(tf.summary.should_record_summaries()))


def test_keras_tensorboard_record_if_cannot_swallow_epoch_summaries(tmp_path):
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(40)  # 5 batches per epoch: epoch ends at batches 5, 10, 15
    probe = _RecordingProbe()
    # TensorBoard first on purpose (its batch record_if is the hazard), so
    # kerasreg warns that TensorBoard does not see the logger's `logs` keys.
    with pytest.warns(KerasregWarning, match="Put WeightNormLogger first"):
        model.fit(
            x, y, batch_size=8, epochs=3, verbose=0,
            callbacks=[
                keras.callbacks.TensorBoard(tmp_path, update_freq=3),
                probe,
                WeightNormLogger(tmp_path),
            ],
        )  # fmt: skip
    if probe.recording.count(False) < 2:
        pytest.skip(
            f"Keras {keras.__version__}'s TensorBoard leaves no record_if condition "
            f"that is false at epoch end ({probe.recording}): the hazard is absent; "
            "test_another_callbacks_record_if_cannot_swallow_epoch_summaries covers "
            "kerasreg's side on every version"
        )
    # The hazard is live: Keras's record_if would drop a plain epoch summary...
    train = read_scalars(tmp_path / "train")
    # ...but every epoch of ours is there, next to Keras's own batch summaries.
    assert [s for s, _ in train["penalty/total"]] == [0, 1, 2]
    assert [s for s, _ in train["norm_l2/lstm/lstm_cell/kernel"]] == [0, 1, 2]
    assert "batch_loss" in train


class _RecordNothing(keras.callbacks.Callback):
    """Holds `tf.summary.record_if(False)` open for the whole `fit`, as any
    callback may (Keras's TensorBoard holds a `record_if` between its update
    steps), and writes a plain epoch summary of its own, which it swallows."""

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir))

    def on_train_begin(self, logs=None):
        self._context = tf.summary.record_if(False)
        self._context.__enter__()

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default():
            tf.summary.scalar("plain", 1.0, step=epoch)
        self.writer.flush()

    def on_train_end(self, logs=None):
        self._context.__exit__(None, None, None)


def test_another_callbacks_record_if_cannot_swallow_epoch_summaries(tmp_path):
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(16)
    swallower = _RecordNothing(tmp_path / "plain")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[swallower, WeightNormLogger(tmp_path)])  # fmt: skip
    # The hazard is live: a plain summary written during fit is dropped...
    assert "plain" not in read_scalars(tmp_path / "plain")
    # ...but every epoch of ours is there.
    train = read_scalars(tmp_path / "train")
    assert [s for s, _ in train["penalty/total"]] == [0, 1, 2]
    tag = "norm_l2/lstm/lstm_cell/kernel"
    assert [s for s, _ in train[tag]] == [0, 1, 2]
    w = np_weights(model.get_layer("lstm").cell.kernel)
    assert last(train, tag) == pytest.approx(np.sqrt((w**2).sum()), rel=1e-5)


def test_unwritable_log_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    before = [np.array(w) for w in model.get_weights()]
    x, y = data(16)
    logger = WeightNormLogger(blocker / "logs")
    with pytest.raises(OSError, match="cannot write TensorBoard logs"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 0
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"update_freq": 0}, ValueError, "update_freq"),
        ({"update_freq": "batch"}, ValueError, "update_freq"),
        ({"update_freq": True}, ValueError, "update_freq"),
        ({"update_freq": 2.5}, ValueError, "update_freq"),
        ({"where": "("}, ValueError, "regular expression"),
        ({"where": 5}, TypeError, "where"),
        ({"where": ["dense"]}, TypeError, "where"),
        ({"per_gate": "yes"}, TypeError, "per_gate"),
        ({"log_dir": None}, TypeError, "log_dir"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightNormLogger(**kwargs)


def test_where_selecting_nothing_raises_at_train_begin(tmp_path):
    model = recurrent_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data(16)
    logger = WeightNormLogger(tmp_path, where="no-such-weight")
    with pytest.raises(ValueError, match="selects no weight"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    assert not os.path.exists(tmp_path / "train")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TF-only"
)
def test_works_under_mirrored_strategy():
    # Two logical CPUs must be set up before TensorFlow starts: a fresh process.
    code = textwrap.dedent(
        """
        import os, tempfile
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, kerasreg
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
                4, kernel_regularizer=kerasreg.L2Penalty(0.1)),
                keras.layers.Dense(1)])
            model.compile("adam", "mse")
        log_dir = tempfile.mkdtemp()
        x, y = np.random.rand(32, 3), np.random.rand(32, 1)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[kerasreg.WeightNormLogger(log_dir)])
        acc = EventAccumulator(os.path.join(log_dir, "train"),
                               size_guidance={"tensors": 0})
        acc.Reload()
        event = acc.Tensors("penalty/total")[-1]
        w = model.layers[0].kernel.numpy().astype("float64")
        print(strategy.num_replicas_in_sync, event.step,
              float(tf.make_ndarray(event.tensor_proto)), 0.1 * (w**2).sum())
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    replicas, step, logged, expected = result.stdout.split()
    assert (replicas, step) == ("2", "1")
    assert float(logged) == pytest.approx(float(expected), rel=1e-5)


def small_regularized_model():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, kernel_regularizer=kerasreg.L2Penalty(0.1)),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def test_non_chief_worker_measures_but_writes_nothing(tmp_path, monkeypatch):
    # A non-chief worker of a multi-worker job: training runs, no file appears.
    # "Measures": it runs `weight_norms` (on JAX an SPMD computation every
    # process must join), seen through the public function the logger calls.
    measured = []
    real_weight_norms = kerasreg.tensorboard.weight_norms

    def spy(model, *args, **kwargs):
        measured.append(real_weight_norms(model, *args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(kerasreg.tensorboard, "writes_summaries", lambda model: False)
    monkeypatch.setattr(kerasreg.tensorboard, "weight_norms", spy)
    model = small_regularized_model()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 1))
    log_dir = tmp_path / "worker1"
    model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0,
              callbacks=[WeightNormLogger(log_dir)])  # fmt: skip
    assert len(measured) == 2
    assert not log_dir.exists()


class _Extended:
    def __init__(self, chief):
        self.should_save_summary = chief


class _Strategy:
    def __init__(self, chief):
        self.extended = _Extended(chief)


class _ModelOnWorker:
    def __init__(self, chief):
        self.distribute_strategy = _Strategy(chief)


def test_only_the_chief_writes_summaries():
    from kerasreg.tensorboard import writes_summaries

    # A single process is always the writer, on every backend.
    assert writes_summaries(small_regularized_model()) is True
    if keras.backend.backend() == "tensorflow":
        # The rule follows TensorFlow's own flag, False on non-chief workers.
        assert writes_summaries(_ModelOnWorker(chief=False)) is False
        assert writes_summaries(_ModelOnWorker(chief=True)) is True


def open_files_under(folder):
    """The files under `folder` this process holds open (Linux `/proc`)."""
    folder = os.path.realpath(folder)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith(folder + os.sep):
            found.append(target)
    return found


def test_writers_beyond_the_open_file_limit_are_reopened(tmp_path, monkeypatch):
    from kerasreg import tensorboard

    monkeypatch.setattr(tensorboard, "MAX_OPEN_RUN_WRITERS", 2)
    model = small_regularized_model()
    x, y = np.random.rand(16, 3), np.random.rand(16, 1)
    runs = [tmp_path / name for name in ("a", "b", "c", "a")]
    totals = []
    for run in runs:  # "a" is closed by "c", then written again
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[WeightNormLogger(run)])  # fmt: skip
        w = np_weights(model.layers[0].kernel)
        totals.append(0.1 * (w**2).sum())
    # At most 2 open: "a" was closed by "c", then "b" by "a" again.
    assert len(open_files_under(tmp_path)) <= 2
    for run, expected in zip(runs[1:3], totals[1:3], strict=True):
        assert read_scalars(run / "train")["penalty/total"][0][1] == pytest.approx(
            expected, rel=1e-5
        )
    # Two files in "a", both at step 0 (epoch 0 of each fit): file order is
    # not step order here, so compare the values as a set.
    logged = read_scalars(tmp_path / "a" / "train")["penalty/total"]
    assert sorted(value for _, value in logged) == pytest.approx(
        sorted([totals[0], totals[3]]), rel=1e-5
    )
    assert len(event_files(tmp_path / "a" / "train")) == 2
