"""High-dimensional linear regression with weight decay (d2l, section 4.5).

Reproduces "Weight Decay" of Dive into Deep Learning (Zhang, Lipton, Li and
Smola; d2l.ai, 0.17 edition, section 4.5, PyTorch and TensorFlow versions):
`y = 0.05 + sum_i 0.01 * x_i + noise`, `x ~ N(0, 1)` in d = 200 dimensions,
noise N(0, 0.01^2), 20 training and 100 test examples, minibatch SGD with batch
size 5 and learning rate 0.003 for 100 epochs, weights initialized N(0, 1) and
bias 0, loss `(y_hat - y)**2 / 2`, penalty `lambda / 2 * ||w||^2`.

Published: the L2 norm of w after training is about 12-19 for lambda = 0 (the
model interpolates the 20 points and the test loss stays high) and about
0.35-0.5 for lambda = 3 (the test loss falls with the training loss).

Keras's L2 has no 1/2, so d2l's `lambda / 2 * ||w||^2` is `L2Penalty(lambda / 2)`;
d2l's squared loss has a 1/2, so the loss here is half of Keras's mean squared
error. With both, the gradient step is d2l's exactly. The lambdas are one
`kerasreg.sweep` call. The script writes one TensorBoard run per lambda under
`logs/d2l_linear/<variant>` (`none`, `L2Penalty_1.5` for lambda = 3, ...: the
train and test data losses, without the penalty, per epoch, as
`batch_train_data_loss` / `batch_test_data_loss`)
and plots the losses per epoch, the final test loss and ||w|| against lambda in
`logs/d2l_linear.png`.

    python examples/d2l_linear.py           # lambda in 0, 0.1, ..., 30
    python examples/d2l_linear.py --quick   # lambda = 0 and 3 only
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import kerasreg

LOG_ROOT = Path(__file__).resolve().parents[1] / "logs"
NUM_INPUTS, NUM_TRAIN, NUM_TEST = 200, 20, 100
BATCH_SIZE, LEARNING_RATE, EPOCHS = 5, 0.003, 100
LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
PUBLISHED_NORM = {0.0: (12.0, 19.0), 3.0: (0.35, 0.5)}


def linear_data(seed: int = 0):
    """d2l's synthetic data: 20 training and 100 test examples in 200 dims."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (NUM_TRAIN + NUM_TEST, NUM_INPUTS))
    y = x @ np.full(NUM_INPUTS, 0.01) + 0.05 + rng.normal(0.0, 0.01, len(x))
    x, y = x.astype("float32"), y.astype("float32")[:, None]
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


@keras.saving.register_keras_serializable(package="d2l_linear")  # sweep copies models
def half_squared_error(y_true, y_pred):
    """d2l's `squared_loss`: `(y_hat - y)**2 / 2` (Keras's MSE has no 1/2)."""
    return 0.5 * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


class DataLosses(keras.callbacks.Callback):
    """Add the train and test data losses (no penalty) to the logs, once per epoch.

    Computed in NumPy from the weights after the last batch of each d2l epoch,
    as d2l does. On TensorFlow and JAX one compiled call runs one d2l epoch
    (`steps_per_execution=4`), so the hook runs once per epoch; on PyTorch it
    runs after every step and skips all but the last of each epoch. Put it
    first in `callbacks`, so that `TensorBoard` sees the values too.

    `kerasreg.sweep` gives each variant's fit its own copy of every callback
    (`copy.deepcopy`); the copies of this one share `runs`, where each fit
    appends its curves, in the order of the grid.
    """

    def __init__(self, train, test, runs=None):
        super().__init__()
        self.train, self.test = train, test
        self.runs = [] if runs is None else runs

    def __deepcopy__(self, memo):
        return DataLosses(self.train, self.test, self.runs)

    def on_train_begin(self, logs=None):
        self.curves = {"train": [], "test": []}
        self.runs.append(self.curves)

    def on_train_batch_end(self, batch, logs=None):
        # The optimizer's step count, not Keras's `batch` argument: under
        # `steps_per_execution` older Keras passes the execution's first step.
        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if done % (NUM_TRAIN // BATCH_SIZE):
            return
        kernel, bias = (keras.ops.convert_to_numpy(w) for w in self.model.weights)
        for name, (x, y) in (("train", self.train), ("test", self.test)):
            loss = float(np.mean((x @ kernel + bias - y) ** 2) / 2)
            self.curves[name].append(loss)
            logs[f"{name}_data_loss"] = loss


def train(lambdas: list[float], log_dir: Path, epochs: int, seed: int = 0) -> list:
    """d2l's model with penalty `lambda / 2 * ||w||^2`, one `kerasreg.sweep`.

    Every lambda starts from the same initial weights and takes the same
    minibatches; each variant is exactly its own fit.
    """
    train_data, test_data = linear_data(seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((NUM_INPUTS,)),
            keras.layers.Dense(
                1, kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0)
            ),
        ]
    )
    # d2l reshuffles the 20 examples every epoch. Drawing the 100 permutations
    # up front and fitting ONE Keras epoch over them (shuffle=False), one d2l
    # epoch (4 batches) per compiled call, does the same SGD steps without
    # Keras's per-epoch overhead (about 50 ms on CPU, 5 s for 100 epochs).
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(NUM_TRAIN) for _ in range(epochs)])
    steps_per_epoch = NUM_TRAIN // BATCH_SIZE
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=half_squared_error,
        # Keras's PyTorch trainer has no steps_per_execution.
        steps_per_execution=1
        if keras.backend.backend() == "torch"
        else steps_per_epoch,
    )
    losses = DataLosses(train_data, test_data)
    shutil.rmtree(log_dir, ignore_errors=True)
    result = kerasreg.sweep(
        model,
        [kerasreg.L2Penalty(lam / 2) if lam else None for lam in lambdas],
        train_data[0][order],
        train_data[1][order],
        batch_size=BATCH_SIZE,
        epochs=1,
        shuffle=False,
        verbose=0,
        # One TensorBoard run per lambda: log_dir/none, log_dir/L2Penalty_1.5, ...
        callbacks=[losses, keras.callbacks.TensorBoard(str(log_dir), update_freq=1)],
    )
    runs = []
    for lam, row, trained, curves in zip(
        lambdas, result.rows, result.models, losses.runs, strict=True
    ):
        kernel = keras.ops.convert_to_numpy(trained.layers[0].kernel)
        runs.append(
            {
                "lambda": lam,
                "run": row["run"],
                "norm": float(np.linalg.norm(kernel)),
                "train_curve": curves["train"],
                "test_curve": curves["test"],
                "train_loss": curves["train"][-1],
                "test_loss": curves["test"][-1],
            }
        )
    return runs


def plot(runs: list[dict], path: Path) -> None:
    """Loss curves for lambda 0 and 3, test loss and ||w|| against lambda."""
    fig, (curves, losses, norms) = plt.subplots(
        1, 3, figsize=(13, 3.8), layout="constrained"
    )
    for run, color in zip(
        [r for r in runs if r["lambda"] in (0.0, 3.0)], ("C3", "C0"), strict=False
    ):
        epochs = np.arange(1, len(run["train_curve"]) + 1)
        label = f"lambda={run['lambda']:g}"
        curves.plot(epochs, run["train_curve"], color=color, label=f"train, {label}")
        curves.plot(
            epochs, run["test_curve"], "--", color=color, label=f"test, {label}"
        )
    curves.set(yscale="log", xlabel="epoch", ylabel="loss (no penalty)")
    curves.set_title("train and test loss")
    curves.legend(fontsize=8)
    lambdas = [r["lambda"] for r in runs]
    positive = [i for i, lam in enumerate(lambdas) if lam > 0]
    for ax, key, title in (
        (losses, "test_loss", "final test loss"),
        (norms, "norm", "||w||_2 after training"),
    ):
        ax.plot([lambdas[i] for i in positive], [runs[i][key] for i in positive], "o-")
        if 0.0 in lambdas:
            ax.axhline(
                runs[lambdas.index(0.0)][key], color="C3", ls="--", label="lambda=0"
            )
        ax.set(xscale="log", yscale="log", xlabel="lambda", title=title)
        ax.grid(alpha=0.3)
    for lam, (low, high) in PUBLISHED_NORM.items():
        if lam > 0:
            norms.errorbar(
                lam,
                (low + high) / 2,
                yerr=(high - low) / 2,
                fmt="kx",
                capsize=4,
                label="published (d2l)",
            )
        else:
            norms.axhspan(
                low, high, color="C3", alpha=0.15, label="published, lambda=0"
            )
    norms.legend(fontsize=8)
    losses.legend(fontsize=8)
    fig.suptitle("d2l 4.5: weight decay in high-dimensional linear regression")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lambda = 0 and 3 only")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "d2l_linear")
    args = parser.parse_args(argv)
    lambdas = (0.0, 3.0) if args.quick else LAMBDAS

    start = time.perf_counter()
    runs = train(list(lambdas), args.log_dir, args.epochs, args.seed)
    seconds = time.perf_counter() - start
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(runs, figure)

    print(
        f"{'lambda':>7} {'train loss':>11} {'test loss':>10} {'||w||':>8} "
        f"{'published ||w||':>16}"
    )
    for run in runs:
        low_high = PUBLISHED_NORM.get(run["lambda"])
        published = f"{low_high[0]:g}-{low_high[1]:g}" if low_high else "-"
        print(
            f"{run['lambda']:>7g} {run['train_loss']:>11.2e} "
            f"{run['test_loss']:>10.2e} {run['norm']:>8.3f} {published:>16}"
        )
    print(f"\n{len(runs)} models in {seconds:.0f} s; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {
        "runs": {run["lambda"]: run for run in runs},
        "seconds": seconds,
        "figure": figure,
    }


if __name__ == "__main__":
    main()
