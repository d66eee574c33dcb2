"""Models saved for the CLI tests, each in a fresh process on a chosen backend.

`python tests/cli_models.py KIND PATH` builds model KIND with Keras on the
backend in `KERAS_BACKEND` and saves it at PATH.
"""

import sys

import keras
import numpy as np

import kerasreg

L = keras.layers


def zoo():
    """Every weight-owning layer family the CLI names, with penalties."""
    keras.utils.set_random_seed(0)
    seq = keras.Input((6, 4), name="seq")
    x = L.LSTM(
        3,
        return_sequences=True,
        kernel_regularizer=kerasreg.L2Penalty(0.05),
        recurrent_regularizer=kerasreg.L1Penalty(0.01),
        bias_regularizer=keras.regularizers.L1L2(0.1, 0.2),
    )(seq)
    x = L.Bidirectional(
        L.GRU(2, return_sequences=True, kernel_regularizer=keras.regularizers.L2(0.3))
    )(x)
    x = L.TimeDistributed(
        L.Dense(5, kernel_regularizer=kerasreg.ElasticNetPenalty(0.01, 0.02))
    )(x)
    x = L.MultiHeadAttention(2, 3, kernel_regularizer=kerasreg.L2Penalty(0.1))(x, x)
    x = L.LayerNormalization()(x)
    x = L.BatchNormalization(gamma_regularizer=keras.regularizers.L1(0.5))(x)
    x = L.Conv1D(3, 2)(x)
    x = L.DepthwiseConv1D(2, depthwise_regularizer=kerasreg.L1Penalty(0.2))(x)
    x = L.SeparableConv1D(2, 2, pointwise_regularizer=kerasreg.L2Penalty(0.3))(x)
    x = L.SimpleRNN(2, return_sequences=True)(x)
    x = L.GlobalAveragePooling1D()(x)
    inner = keras.Sequential(
        [keras.Input((2,)), L.Dense(3, name="hidden"), L.Dense(2, use_bias=False)],
        name="encoder",
    )
    x = inner(x)
    ids = keras.Input((3,), dtype="int32", name="ids")
    e = L.Embedding(7, 2, embeddings_regularizer=kerasreg.L2Penalty(0.01))(ids)
    e = L.Flatten()(e)
    big = L.Dense(2, kernel_regularizer=kerasreg.ExpAbsPenalty(1e-3), name="big")
    y = big(L.Concatenate()([x, e]))
    frozen = L.Dense(1, kernel_regularizer=kerasreg.L2Penalty(1.0), name="frozen")
    out = frozen(y)
    frozen.trainable = False
    model = keras.Model([seq, ids], out)
    # Entries beyond ExpAbsPenalty's exact range (|w| > 20) and exact zeros.
    kernel = np.linspace(-30.0, 25.0, 16).reshape(8, 2).astype("float32")
    kernel[0, 0] = 0.0
    big.kernel.assign(kernel)
    model.compile(optimizer="adam", loss="mse")
    return model


def conv_lstm():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3, 5, 2))
    x = L.ConvLSTM1D(3, 2, kernel_regularizer=kerasreg.L2Penalty(0.1))(inputs)
    return keras.Model(inputs, L.Flatten()(x))


def float64():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4,), dtype="float64")
    x = L.Dense(3, dtype="float64", kernel_regularizer=kerasreg.L2Penalty(0.1))(inputs)
    x = L.LSTM(2, dtype="float64")(L.Reshape((3, 1), dtype="float64")(x))
    return keras.Model(inputs, x)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    {"zoo": zoo, "conv_lstm": conv_lstm, "float64": float64}[kind]().save(path)
