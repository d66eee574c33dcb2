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
