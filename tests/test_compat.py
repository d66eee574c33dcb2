"""Every Keras internal kerasreg relies on (kerasreg/_compat.py) is still there.

Each test fails loudly when a Keras release changes the detail, instead of
letting kerasreg silently do less.
"""

import keras
import pytest

from kerasreg import _compat


def test_sublayers_are_the_direct_children_keras_tracks():
    lstm = keras.layers.LSTM(3)
    bidirectional = keras.layers.Bidirectional(keras.layers.LSTM(2))
    inner = keras.Sequential([keras.layers.Dense(2)], name="inner")
    model = keras.Sequential(
        [keras.Input((4, 3)), lstm, keras.layers.RepeatVector(2), bidirectional]
    )
    model.build((None, 4, 3))
    assert lstm.cell in _compat.sublayers(lstm)
    children = _compat.sublayers(bidirectional)
    assert bidirectional.forward_layer in children
    assert bidirectional.backward_layer in children
    assert set(map(id, _compat.sublayers(model))) >= {id(lstm), id(bidirectional)}
    assert _compat.sublayers(inner) == [inner.layers[0]]


def test_sublayers_fails_loudly_without_the_tracker():
    class Bare:
        name = "bare"

    with pytest.raises(_compat.KerasInternalsChanged, match="_layers"):
        _compat.sublayers(Bare())


class _FindsItsList(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.found = _compat.fit_callbacks(self)


def test_fit_callbacks_finds_the_running_callback_list():
    import numpy as np

    first, probe = keras.callbacks.Callback(), _FindsItsList()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((2, 2)), np.ones((2, 1)), verbose=0, callbacks=[first, probe])
    # The list Keras calls, in order, with the History it appends.
    assert probe.found[:2] == [first, probe]
    assert isinstance(probe.found[-1], keras.callbacks.History)
    probe.on_train_begin()  # called by hand: no CallbackList on the stack
    assert probe.found is None


class _ListWithoutCallbacks(keras.callbacks.CallbackList):
    """A CallbackList as a future Keras might make it: no `callbacks` list."""

    def __init__(self, callback):
        self.callback = callback

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)


def test_fit_callbacks_fails_loudly_without_the_callbacks_list():
    probe = _FindsItsList()
    with pytest.raises(_compat.KerasInternalsChanged, match="callbacks"):
        _ListWithoutCallbacks(probe).on_train_begin()
