"""Callback order: a kerasreg callback that writes `logs` warns, once, when a
Keras callback that reads them comes before it in `fit`'s list."""

import warnings

import keras
import numpy as np
import pytest

import kerasreg
from kerasreg.callback_order import warn_if_logs_readers_run_first


class WritesLogs(keras.callbacks.Callback):
    """A stub kerasreg-style callback: adds a key, checks its place."""

    def __init__(self):
        super().__init__()
        self.warned = []

    def on_train_begin(self, logs=None):
        self.warned.append(warn_if_logs_readers_run_first(self, ("my_key",)))

    def on_epoch_end(self, epoch, logs=None):
        logs["my_key"] = float(epoch)


class SeesKey(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append("my_key" in logs)


def order_warnings(caught):
    return [w for w in caught if "before it in `callbacks`" in str(w.message)]


def fit(callbacks, epochs=1):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 2)), np.zeros((4, 1))
    return model.fit(x, y, epochs=epochs, verbose=0, callbacks=callbacks)


def test_warns_once_when_a_reader_comes_first(tmp_path):
    writer = WritesLogs()
    csv_logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    with pytest.warns(UserWarning, match=r"WritesLogs .*'my_key'.*CSVLogger"):
        fit([csv_logger, writer])
    # The warning is true: the CSV file (read back) lacks the key.
    assert "my_key" not in (tmp_path / "log.csv").read_text().splitlines()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([csv_logger, writer])  # once per callback, not per fit
    assert not order_warnings(caught)
    assert writer.warned == [True, False]


@pytest.mark.parametrize(
    "reader",
    [
        lambda tmp: keras.callbacks.TensorBoard(str(tmp)),
        lambda tmp: keras.callbacks.EarlyStopping(monitor="loss"),
        lambda tmp: keras.callbacks.ModelCheckpoint(str(tmp / "m.keras")),
        lambda tmp: keras.callbacks.ReduceLROnPlateau(monitor="loss"),
    ],
)
def test_every_keras_logs_reader_is_recognised(tmp_path, reader):
    writer = WritesLogs()
    with pytest.warns(UserWarning, match="Put WritesLogs first"):
        fit([reader(tmp_path), writer])


def test_no_warning_in_the_right_order_and_readers_after_see_the_key(tmp_path):
    writer, probe = WritesLogs(), SeesKey()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(
            [writer, keras.callbacks.CSVLogger(str(tmp_path / "l.csv")), probe], 2
        )
    assert not order_warnings(caught)
    assert writer.warned == [False]
    assert probe.seen == [True, True]
    assert history.history["my_key"] == [0.0, 1.0]  # History runs last
    assert "my_key" in (tmp_path / "l.csv").read_text().splitlines()[0]


def test_hook_called_by_hand_does_not_warn():
    writer = WritesLogs()
    writer.on_train_begin()
    assert writer.warned == [False]


def test_weight_norm_logger_warns_when_placed_after_early_stopping(tmp_path):
    stop = keras.callbacks.EarlyStopping(monitor="val_data_loss", mode="min")
    logger = kerasreg.WeightNormLogger(tmp_path)
    with pytest.warns(UserWarning, match="WeightNormLogger .*'val_data_loss'"):
        fit([stop, logger])
