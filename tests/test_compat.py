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


def test_config_regularizer_attribute_is_what_attention_layers_save():
    q = keras.Input((4, 6))
    mha = keras.layers.MultiHeadAttention(2, 3)
    gqa = keras.layers.GroupQueryAttention(3, 2, 1)
    keras.Model(q, [mha(q, q), gqa(q, q)])
    for layer in (mha, gqa):
        for attribute in ("kernel_regularizer", "bias_regularizer"):
            name = _compat.config_regularizer_attribute(layer, attribute)
            assert name in (attribute, f"_{attribute}")
            setattr(layer, name, keras.regularizers.L2(0.5))
            saved = layer.get_config()[attribute]
            assert keras.regularizers.deserialize(saved).l2 == pytest.approx(0.5)
    # Ordinary layers keep the attribute public and own their weights: no slot.
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    assert _compat.config_regularizer_attribute(dense, "kernel_regularizer") is None


def test_config_regularizer_attribute_fails_loudly_when_keras_changes():
    q = keras.Input((4, 6))
    mha = keras.layers.MultiHeadAttention(2, 3)
    keras.Model(q, mha(q, q))
    del mha._kernel_regularizer  # what a Keras release renaming it would look like
    with pytest.raises(_compat.KerasInternalsChanged, match="MultiHeadAttention"):
        _compat.config_regularizer_attribute(mha, "kernel_regularizer")
