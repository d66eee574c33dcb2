"""The two-moons problem shared by `moons.py`, `demo.py` and `posthoc_shrink.py`.

The setting of the seeds' Keras tutorial (Jason Brownlee, "How to Use Weight
Decay to Reduce Overfitting of Neural Networks in Keras", Machine Learning
Mastery): `make_moons(n_samples=100, noise=0.2, random_state=1)`, the first 30
points for training and the last 70 for testing, a `Dense(500, relu)` hidden
layer, a `Dense(1, sigmoid)` output, Adam, binary cross-entropy and 4000
full-batch updates (4000 epochs of one batch).

Keras spends a few milliseconds per epoch on callbacks and bookkeeping, so
4000 one-batch epochs take about a minute. `fit_full_batch` does the very same
updates in a fraction of that: it fits one epoch (or a few) over the training
batch repeated once per update, with `shuffle=False` and `batch_size` equal to
the training-set size, so every step sees exactly the full batch, and the model
is compiled with `steps_per_execution=100`, so one compiled call runs 100
updates (on TensorFlow and JAX; Keras's PyTorch backend supports only 1).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from sklearn.datasets import make_moons

ROOT = Path(__file__).resolve().parents[1]
LOG_ROOT = ROOT / "logs"
# Keras's PyTorch trainer runs one step per call (it has no steps_per_execution).
STEPS_PER_EXECUTION = 1 if keras.backend.backend() == "torch" else 100
SEED = 1


def moons_data():
    """Return `((x_train, y_train), (x_test, y_test))`: 30 and 70 points."""
    x, y = make_moons(n_samples=100, noise=0.2, random_state=1)
    x, y = x.astype("float32"), y.astype("float32")
    return (x[:30], y[:30]), (x[30:], y[30:])


def moons_model(penalty=None, *, seed: int = SEED) -> keras.Model:
    """`Dense(500, relu) -> Dense(1, sigmoid)`, compiled, `penalty` on the hidden kernel.

    The random seed is set first, so every call starts from the same weights.
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(
                500, activation="relu", kernel_regularizer=penalty, name="hidden"
            ),
            keras.layers.Dense(1, activation="sigmoid", name="output"),
        ],
        name="moons",
    )
    compile_moons_model(model)
    return model


def compile_moons_model(model: keras.Model) -> None:
    """Adam, binary cross-entropy, accuracy, `STEPS_PER_EXECUTION` updates per call."""
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )


def fit_full_batch(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    updates: int,
    *,
    updates_per_epoch: int | None = None,
    initial_epoch: int = 0,
    **fit_kwargs,
) -> keras.callbacks.History:
    """Do `updates` full-batch updates, `updates_per_epoch` per Keras epoch.

    Same updates as `model.fit(x, y, batch_size=len(x), epochs=updates)`, much
    faster: each epoch is one pass over `x` repeated `updates_per_epoch` times
    (default: all `updates` in one epoch). Epochs still matter for callbacks that
    act per epoch (`EarlyStopping`, per-epoch logging, validation). To go on
    training a model, pass the epochs done so far as `initial_epoch`: the
    TensorBoard curves then continue where they stopped.
    """
    per_epoch = updates_per_epoch or updates
    if updates % per_epoch:
        raise ValueError(
            f"`updates`={updates} is not a multiple of `updates_per_epoch`={per_epoch}."
        )
    repeated_x = np.tile(x, (per_epoch,) + (1,) * (x.ndim - 1))
    repeated_y = np.tile(y, (per_epoch,) + (1,) * (y.ndim - 1))
    return model.fit(
        repeated_x,
        repeated_y,
        batch_size=len(x),
        epochs=initial_epoch + updates // per_epoch,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        **fit_kwargs,
    )


def probabilities(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The model's output for `x`, as numpy: one direct call, not `predict`
    (whose per-model compiled function, called with a new shape each time for
    several models in a row, makes TensorFlow warn about retracing)."""
    return keras.ops.convert_to_numpy(model(x.astype("float32"), training=False))


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of points classified right (threshold 0.5)."""
    p = probabilities(model, x)[:, 0]
    return float(np.mean((p > 0.5) == (y > 0.5)))


def loss_parts(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Data loss (cross-entropy), penalty (sum of `model.losses`) and its share."""
    p = probabilities(model, x)[:, 0].astype("float64")
    p = np.clip(p, 1e-7, 1 - 1e-7)
    data = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    penalty = float(
        sum(keras.ops.convert_to_numpy(loss) for loss in model.losses) or 0.0
    )
    return {"data_loss": data, "penalty": penalty, "share": penalty / (data + penalty)}


def hidden_kernel_norm(model: keras.Model) -> float:
    """L2 (Frobenius) norm of the hidden layer's kernel."""
    kernel = keras.ops.convert_to_numpy(model.get_layer("hidden").kernel)
    return float(np.sqrt(np.sum(kernel.astype("float64") ** 2)))
