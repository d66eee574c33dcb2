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


def test_nnx_enabled_follows_keras_config():
    is_enabled = getattr(keras.config, "is_nnx_enabled", None)
    if is_enabled is None:
        # Keras added NNX support (and the switch) in 3.11; before, never NNX.
        assert _compat.KERAS_VERSION < (3, 11), keras.__version__
        assert _compat.nnx_enabled() is False
    else:
        assert _compat.nnx_enabled() is is_enabled()


@pytest.mark.parametrize("enabled", [True, False])
def test_nnx_enabled_reads_the_switch_each_call(monkeypatch, enabled):
    monkeypatch.setattr(keras.config, "is_nnx_enabled", lambda: enabled, raising=False)
    assert _compat.nnx_enabled() is enabled


def test_nnx_enabled_is_false_on_keras_without_nnx(monkeypatch):
    monkeypatch.delattr(keras.config, "is_nnx_enabled", raising=False)
    monkeypatch.setattr(_compat, "KERAS_VERSION", (3, 8))
    assert _compat.nnx_enabled() is False


def test_nnx_enabled_fails_loudly_when_the_switch_disappears(monkeypatch):
    monkeypatch.delattr(keras.config, "is_nnx_enabled", raising=False)
    monkeypatch.setattr(_compat, "KERAS_VERSION", (3, 11))
    with pytest.raises(_compat.KerasInternalsChanged, match="is_nnx_enabled"):
        _compat.nnx_enabled()
