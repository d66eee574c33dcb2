"""The guide's engine table is what `sweep` does: each row's template, built here,
gets the row's engine, and `engine_reason` holds the row's reason.

The table is read from docs/guide/sweep.md, so a row changed there without
the behaviour (or the reverse) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import kerasreg

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "sweep.md"
L = keras.layers


def table() -> dict[str, tuple[str, str]]:
    """`{template: (engine, why)}` from the guide's engine table, for this backend
    (on JAX, the column "on JAX": a template `jax.vmap` takes has its reason)."""
    text = GUIDE.read_text()
    start = text.index("| template | engine | why")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        engine, why = cells[1], cells[2].strip("`")
        if keras.backend.backend() == "jax":
            on_jax = cells[3]
            if on_jax == "vectorized (`jax.vmap`)":
                engine, why = "vectorized", "jax.vmap of the template's train step"
            else:
                engine = on_jax
        rows[cells[0]] = (engine, why)
    return rows


def dense_net(*hidden, name="net"):
    return keras.Sequential([keras.Input((4,)), *hidden, L.Dense(1)], name=name)


@keras.saving.register_keras_serializable(package="kerasreg_tests")
class ScaledDense(L.Dense):
    def call(self, inputs, training=None):
        return 0.5 * super().call(inputs)


@keras.saving.register_keras_serializable(package="kerasreg_tests")
def batch_centered(y_true, y_pred):
    return ops.mean(ops.square(y_true - y_pred + ops.mean(y_pred)), axis=-1)


def residual_two_outputs():
    inputs = keras.Input((4,))
    hidden = L.Dense(4, "tanh")(inputs)
    merged = L.Add()([inputs, hidden])
    return keras.Model(
        inputs, [L.Dense(1, name="a")(merged), L.Dense(1, name="b")(merged)]
    )


class Probe(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        pass


def case(name, tmp_path):
    """`(model, compile kwargs, x, y, sweep kwargs)` for a row of the table."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    adam = keras.optimizers.Adam(0.01)
    if name == "Dense layers, Adam":
        return dense_net(L.Dense(8, "relu")), dict(optimizer=adam, loss="mse"), x, y, {}
    if name == "digits: Flatten, Dense, Dropout(0.2, seed=1)":
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                L.Flatten(),
                L.Dense(8, "relu"),
                L.Dropout(0.2, seed=1),
                L.Dense(10, "softmax"),
            ]
        )
        images = rng.random((8, 8, 8, 1)).astype("float32")
        labels = rng.integers(0, 10, 8)
        compiled = dict(
            optimizer=adam, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        return model, compiled, images, labels, {}
    if name == "Conv2D, MaxPooling2D, BatchNormalization, Flatten, Dense":
        model = keras.Sequential(
            [
                keras.Input((6, 6, 1)),
                L.Conv2D(2, 3, use_bias=False),
                L.BatchNormalization(),
                L.MaxPooling2D(),
                L.Flatten(),
                L.Dense(1),
            ]
        )
        images = rng.random((8, 6, 6, 1)).astype("float32")
        return model, dict(optimizer=adam, loss="mse"), images, y, {}
    if name == "Embedding, GlobalAveragePooling1D, Dense, SGD with momentum":
        model = keras.Sequential(
            [
                keras.Input((5,), dtype="int32"),
                L.Embedding(10, 3),
                L.GlobalAveragePooling1D(),
                L.Dense(1),
            ]
        )
        tokens = rng.integers(0, 10, (8, 5)).astype("int32")
        momentum = keras.optimizers.SGD(0.1, momentum=0.9)
        return model, dict(optimizer=momentum, loss="mse"), tokens, y, {}
    if name == "a residual block (Dense, Add), two outputs":
        compiled = dict(optimizer=adam, loss=["mse", "mae"])
        return residual_two_outputs(), compiled, x, [y, y], {}
    if name == "a loss of your own that reads the whole batch":
        return dense_net(), dict(optimizer=adam, loss=batch_centered), x, y, {}
    if name == "global_clipnorm":
        optimizer = keras.optimizers.SGD(0.1, global_clipnorm=0.5)
        return dense_net(), dict(optimizer=optimizer, loss="mse"), x, y, {}
    if name == "a Dense subclass with its own call":
        model = dense_net(ScaledDense(4, name="scaled"))
        return model, dict(optimizer=adam, loss="mse"), x, y, {}
    if name == "an LSTM and a Bidirectional GRU":
        model = keras.Sequential(
            [
                keras.Input((3, 2)),
                L.LSTM(2, return_sequences=True),
                L.Bidirectional(L.GRU(2)),
                L.Dense(1),
            ]
        )
        sequences = rng.normal(size=(8, 3, 2)).astype("float32")
        return model, dict(optimizer=adam, loss="mse"), sequences, y, {}
    if name == "a Bidirectional, AdamW excluding weights by name":
        model = keras.Sequential(
            [keras.Input((3, 2)), L.Bidirectional(L.SimpleRNN(2)), L.Dense(1)]
        )
        sequences = rng.normal(size=(8, 3, 2)).astype("float32")
        decay = keras.optimizers.AdamW(0.01, weight_decay=0.1)
        decay.exclude_from_weight_decay(var_names=["bias"])
        return model, dict(optimizer=decay, loss="mse"), sequences, y, {}
    if name == "a nested model":
        inner = keras.Sequential([keras.Input((4,)), L.Dense(3)], name="inner")
        inputs = keras.Input((4,))
        model = keras.Model(inputs, L.Dense(1)(inner(inputs)))
        return model, dict(optimizer=adam, loss="mse"), x, y, {}
    if name == "mixed_bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = dense_net(L.Dense(4))
        keras.config.set_dtype_policy("float32")
        return model, dict(optimizer=adam, loss="mse"), x, y, {}
    if name == "a LossScaleOptimizer (mixed_float16)":
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        return dense_net(), dict(optimizer=optimizer, loss="mse"), x, y, {}
    if name == "a stateful RNN":
        model = keras.Sequential(
            [
                keras.Input(batch_shape=(4, 3, 2)),
                L.SimpleRNN(2, stateful=True),
                L.Dense(1),
            ]
        )
        sequences = rng.normal(size=(8, 3, 2)).astype("float32")
        return model, dict(optimizer=adam, loss="mse"), sequences, y, {"batch_size": 4}
    if name == "an LSTM with dropout in its cell":
        model = keras.Sequential(
            [
                keras.Input((3, 2)),
                L.LSTM(2, dropout=0.2, seed=1, name="rnn"),
                L.Dense(1),
            ]
        )
        sequences = rng.normal(size=(8, 3, 2)).astype("float32")
        return model, dict(optimizer=adam, loss="mse"), sequences, y, {}
    if name == "callbacks=[EarlyStopping(...), CSVLogger(...)]":
        compiled = dict(optimizer=adam, loss="mse")
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="loss"),
            keras.callbacks.CSVLogger(str(tmp_path / "{variant}.csv")),
        ]
        return dense_net(), compiled, x, y, {"callbacks": callbacks}
    if name == "callbacks=[a callback of your own]":
        compiled = dict(optimizer=adam, loss="mse")
        return dense_net(), compiled, x, y, {"callbacks": [Probe()]}
    raise KeyError(name)


ROWS = table()


def test_the_table_has_a_template_for_each_engine():
    # On JAX, jax.vmap takes every template the stack would.
    stacked = () if keras.backend.backend() == "jax" else ("stacked",)
    assert {engine for engine, _ in ROWS.values()} == {
        "vectorized",
        *stacked,
        "sequential",
    }


@pytest.mark.parametrize("name", list(ROWS))
def test_each_row_of_the_guides_engine_table(name, tmp_path):
    engine, why = ROWS[name]
    model, compiled, x, y, kwargs = case(name, tmp_path)
    model.compile(**compiled)
    result = kerasreg.sweep(
        model,
        [kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(1e-1)],
        x,
        y,
        epochs=1,
        verbose=0,
        **{"batch_size": 8, **kwargs},
    )
    assert result.engine == engine
    if why.startswith("batched kernels: "):
        # The kernels the reason names: the row's layer classes, any order.
        named = set(re.findall(r"\w+", result.engine_reason.split(":", 1)[1]))
        assert named == set(re.findall(r"\w+", why.split(":", 1)[1]))
    else:
        assert why in result.engine_reason


CONVOLUTIONAL_FALLBACKS = {
    "channels_first": (
        lambda: [L.Conv2D(2, 3), L.Conv2D(2, 2, data_format="channels_first")],
        (6, 6, 2),
        "uses data_format='channels_first'",
    ),
    "groups": (
        lambda: [L.Conv2D(2, 3), L.Conv2D(2, 2, groups=2)],
        (6, 6, 2),
        "has groups=2",
    ),
    "causal": (lambda: [L.Conv1D(2, 3, padding="causal")], (6, 2), "padding='causal'"),
    "Conv2DTranspose": (lambda: [L.Conv2DTranspose(2, 3)], (6, 6, 2), "no batched"),
    "SpatialDropout2D": (
        lambda: [L.Conv2D(2, 3), L.SpatialDropout2D(0.2, seed=1)],
        (6, 6, 2),
        "no batched kernel",
    ),
    "GroupNormalization": (
        lambda: [L.Conv2D(4, 3), L.GroupNormalization(2)],
        (6, 6, 2),
        "no batched kernel",
    ),
}


@pytest.mark.parametrize("name", sorted(CONVOLUTIONAL_FALLBACKS))
def test_the_guides_convolutional_layers_without_a_batched_kernel(name):
    """The guide's list of convolutional layers that take the stacked engine."""
    layers, shape, why = CONVOLUTIONAL_FALLBACKS[name]
    text = " ".join(GUIDE.read_text().split())
    listed = {
        "channels_first": '`data_format="channels_first"`',
        "groups": "`groups` above 1",
        "causal": '`padding="causal"`',
    }.get(name, f"`{name}`")
    assert listed in text[text.index("Layers of convolutional templates") :][:500]
    model = keras.Sequential([keras.Input(shape), *layers(), L.Flatten(), L.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, *shape)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    grid = [None, kerasreg.L2Penalty(1e-2)]
    result = kerasreg.sweep(model, grid, x, y, epochs=1, verbose=0)
    if keras.backend.backend() == "jax":
        assert result.engine == "vectorized"
        assert result.engine_reason.startswith("jax.vmap")
    else:
        assert result.engine == "stacked"
        assert why in result.engine_reason
        probe = model.layers[-3]  # the layer before Flatten and Dense
        assert f"({type(probe).__name__})" in result.engine_reason
