"""kerasreg demo: two moons with and without a weight penalty.

Trains `Dense(500, relu) -> Dense(1, sigmoid)` on 30 noisy two-moons points and
tests it on 70, once without regularization and once with `L2Penalty(1e-3)` on the
hidden kernel; writes TensorBoard runs under `logs/demo/` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from sklearn.datasets import make_moons

import kerasreg

ROOT = Path(__file__).resolve().parents[1]


def moons():
    x, y = make_moons(n_samples=100, noise=0.2, random_state=1)
    x, y = x.astype("float32"), y.astype("float32")
    return (x[:30], y[:30]), (x[30:], y[30:])


def train(penalty, updates: int, log_dir: Path):
    (x_train, y_train), (x_test, y_test) = moons()
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(500, activation="relu", kernel_regularizer=penalty),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    # Full-batch training: one epoch over the batch repeated `updates` times, run
    # 100 updates per compiled call, does the same updates as `updates` epochs
    # without Keras's per-epoch overhead.
    model.compile(
        optimizer="adam",
        loss="binary_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=100,
    )
    repeated = (
        np.repeat(x_train[None], updates, 0).reshape(-1, 2),
        np.repeat(y_train[None], updates, 0).reshape(-1),
    )
    model.fit(
        *repeated,
        batch_size=len(x_train),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(str(log_dir), update_freq=100)],
    )
    _, train_acc = model.evaluate(x_train, y_train, verbose=0)
    _, test_acc = model.evaluate(x_test, y_test, verbose=0)
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    return train_acc, test_acc, float(np.sqrt((kernel**2).sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs" / "demo")
    args = parser.parse_args(argv)

    runs = {"none": None, "l2_1e-3": kerasreg.L2Penalty(1e-3)}
    print(f"{'run':<10} {'train acc':>9} {'test acc':>9} {'||W1||_2':>9}")
    for name, penalty in runs.items():
        train_acc, test_acc, norm = train(penalty, args.updates, args.log_dir / name)
        print(f"{name:<10} {train_acc:>9.3f} {test_acc:>9.3f} {norm:>9.2f}")
    print(f"\nLook at the runs with:  tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
