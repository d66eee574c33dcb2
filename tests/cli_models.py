"""Models saved for the CLI tests, each in a fresh process on a chosen backend.

`python tests/cli_models.py KIND PATH` builds model KIND with Keras on the
backend in `KERAS_BACKEND` and saves it at PATH.
"""

import sys

import keras
import numpy as np
from keras import ops

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


# --- the layer zoo, saved: every kind of model the CLI must read right -------


@keras.saving.register_keras_serializable(package="cli_models")
class AutoEncoder(keras.Model):
    """A subclassed model: its config does not describe its layers."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.encoder = L.Dense(
            units, name="encoder", kernel_regularizer=kerasreg.L2Penalty(0.1)
        )
        self.decoder = L.Dense(
            4, name="decoder", bias_regularizer=kerasreg.L1Penalty(0.2)
        )
        self.scale = self.add_weight(
            shape=(4,),
            initializer="ones",
            name="scale",
            regularizer=kerasreg.L2Penalty(0.3),
        )

    def call(self, x):
        return self.decoder(self.encoder(x)) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="cli_models")
class Gated(L.Layer):
    """A subclassed layer: a weight of its own, a Dense inside, a frozen statistic."""

    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = L.Dense(
            units, name="inner", kernel_regularizer=kerasreg.L1Penalty(0.05)
        )

    def build(self, input_shape):
        self.gate = self.add_weight(
            shape=(int(input_shape[-1]), self.units),
            regularizer=kerasreg.L2Penalty(0.2),
            name="gate",
        )
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                    name="seen")  # fmt: skip
        self.inner.build(input_shape)

    def call(self, x):
        return self.inner(x) * ops.sigmoid(ops.matmul(x, self.gate))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="cli_models")
class Halved(keras.regularizers.Regularizer):
    """A user's regularizer: the CLI never computes (nor runs) it."""

    def __call__(self, x):
        return 0.5 * ops.sum(ops.abs(x))

    def get_config(self):
        return {}


def _custom_layer():
    inputs = keras.Input((4,))
    x = Gated(3, name="gated")(inputs)
    return keras.Model(inputs, L.Dense(2, name="head")(x))


def _frozen_custom_layer():
    model = _custom_layer()
    model.get_layer("gated").trainable = False
    return model


def _normalization():
    norm = L.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(size=(16, 4)).astype("float32"))
    model = keras.Sequential([keras.Input((4,)), norm, L.Dense(2, name="d")])
    kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(0.5))
    return model


def _nested():
    inner = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(3, name="a", kernel_regularizer=kerasreg.L2Penalty(0.1)),
        ],
        name="inner",
    )
    mid_in = keras.Input((3,))
    mid = keras.Model(mid_in, L.Dense(2, name="b")(inner(mid_in)), name="mid")
    inputs = keras.Input((3,))
    x = L.Dense(3, name="c", bias_regularizer=kerasreg.ExpAbsPenalty(0.1))(inputs)
    model = keras.Model(inputs, mid(x))
    kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(0.2), where="^mid/b/")
    return model


def _stateful_rnn():
    inputs = keras.Input((3, 2), batch_size=4)
    x = L.LSTM(
        2, stateful=True, name="lstm", kernel_regularizer=kerasreg.L2Penalty(0.1)
    )(inputs)
    return keras.Model(inputs, L.Dense(1, name="out")(x))


def _custom_regularizer():
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(2, name="mine", kernel_regularizer=Halved()),
            L.Dense(
                1, name="plain", kernel_regularizer=keras.regularizers.L1L2(0.1, 0.2)
            ),
        ]
    )


def _l2sp_unused():
    # Saved before the penalty's first use: no reference in the file.
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(2, name="d", kernel_regularizer=kerasreg.L2SPPenalty(0.4)),
        ]
    )


def _bfloat16():
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = keras.Sequential(
            [
                keras.Input((4,)),
                L.Dense(3, name="d", kernel_regularizer=kerasreg.L2Penalty(0.1)),
            ]
        )
    finally:
        keras.config.set_dtype_policy("float32")
    return model


def _zoo_row(name):
    """A row of the layer zoo (tests/test_zoo.py), every role regularized.

    L2-SP wherever a layer keeps one regularizer per weight (not attention
    layers or LoRA, which Keras rebuilds with one shared instance on load,
    nor quantized layers).
    """
    from test_zoo import PENALTIES, ZOO

    builder, *_, roles, _ = ZOO[name]
    model = builder()
    shared = name.endswith("Attention") or "LoRA" in name or "8)" in name
    penalties = {
        role: (PENALTIES[role] if shared else kerasreg.L2SPPenalty(0.1 * (i + 1)))
        for i, role in enumerate(roles)
    }
    if penalties:
        kerasreg.regularize(model, **penalties)
    return model


def _zoo_rows(lora):
    """The rows of the layer zoo, side by side in one functional model.

    One model (one save, one load, one compiled `weight_norms`) for many
    rows: each row's model is a nested sub-model, its paths `<model>/...`.
    """
    from test_zoo import ZOO

    rows = [_zoo_row(name) for name in ZOO if ("LoRA" in name) == lora]
    inputs = [
        keras.Input(tuple(m.inputs[0].shape[1:]), dtype=m.inputs[0].dtype) for m in rows
    ]
    outputs = [L.Flatten()(m(x)) for m, x in zip(rows, inputs, strict=True)]
    return keras.Model(inputs, outputs)


def zoo_models():
    """`{name: builder}`: every model the CLI is checked on against Keras."""
    models = {
        "zoo": zoo,
        "conv_lstm": conv_lstm,
        "float64": float64,
        "subclassed_model": lambda: _built(AutoEncoder(), (1, 4)),
        "subclassed_layer": _custom_layer,
        "frozen_subclassed_layer": _frozen_custom_layer,
        "normalization": _normalization,
        "nested": _nested,
        "stateful_rnn": _stateful_rnn,
        "custom_regularizer": _custom_regularizer,
        "l2sp_unused": _l2sp_unused,
        "bfloat16": _bfloat16,
    }
    models["zoo_rows"] = lambda: _zoo_rows(lora=False)
    models["zoo_lora"] = lambda: _zoo_rows(lora=True)
    return models


def _built(model, shape):
    model(np.zeros(shape, "float32"))
    return model


def randomize(model, seed=0):
    """Every float weight nonzero and away from any L2-SP reference."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if keras.backend.is_float_dtype(v.dtype) and "amax_history" not in v.name:
            value = rng.uniform(-1, 1, size=tuple(v.shape))
            v.assign(value.astype(keras.backend.standardize_dtype(v.dtype)))


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    {"zoo": zoo, "conv_lstm": conv_lstm, "float64": float64}[kind]().save(path)
