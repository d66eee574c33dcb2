"""Decoupled weight decay vs. an L2 penalty: equal under SGD, not under Adam.

Reproduces the central observation of Loshchilov and Hutter, "Decoupled Weight
Decay Regularization" (ICLR 2019), section 2: for plain SGD, shrinking the
weights by `(1 - r)` after every step and adding the penalty
`c * ||w||^2` with `c = r / (2 * lr)` are the same thing (to first order in
`r`; Keras's own `SGD(weight_decay=2 * c)` is the penalty exactly), while for
an adaptive optimizer such as Adam the penalty's gradient is divided by the
running RMS of the gradients and the two differ: "L2 regularization and weight
decay are not identical" for Adam, and AdamW is Adam with the decay decoupled.

Every run starts from the same weights and sees the same batches in the same
order (a small MLP, regression on locally made data); only the way the weights
are shrunk changes:

    SGD:  L2Penalty(c) | SGD(weight_decay=2c) | WeightDecay(r)
    Adam: L2Penalty(c) | AdamW(weight_decay=r/lr) | WeightDecay(r)
          (plus a run with no regularization at all, for the size of the effect)

The table gives, against `WeightDecay(r)`, the largest absolute difference of
any kernel entry, the relative difference of all kernels
`||w_a - w_b|| / ||w_b||`, and that difference over the size of the effect
itself, `||w_a - w_b|| / ||w_b - w_none||`. TensorBoard runs go under
`logs/decay_vs_l2/<optimizer>_<method>`, the figure (final weights under the
penalty against the same weights under decay) to `logs/decay_vs_l2.png`.

    python examples/decay_vs_l2.py           # 2000 steps
    python examples/decay_vs_l2.py --quick   # 200 steps
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
RATE = 1e-4
LEARNING_RATES = {"SGD": 0.05, "Adam": 1e-3}
BATCH_SIZE = 32


def regression_data(seed: int = 0):
    """512 points in 8 dimensions, a smooth nonlinear target plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))) + 0.1 * rng.normal(size=(512, 1))
    return x, y.astype("float32")


def mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="output"),
        ]
    )


def make_optimizer(name: str, decay: float | None = None):
    """The optimizer; `decay` is Keras's built-in (coupled to lr) weight decay."""
    lr = LEARNING_RATES[name]
    if name == "SGD":
        optimizer = keras.optimizers.SGD(lr, weight_decay=decay)
    elif decay is None:
        optimizer = keras.optimizers.Adam(lr)
    else:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=decay)
    if decay is not None:
        # kerasreg's default `where=None` leaves biases alone; so must Keras.
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def run(method: str, optimizer_name: str, start, data, steps: int, log_dir: Path):
    """Train from weights `start` with one way of shrinking; return the kernels."""
    lr = LEARNING_RATES[optimizer_name]
    c = RATE / (2 * lr)
    model = mlp()
    model.set_weights(start)
    callbacks = [keras.callbacks.TensorBoard(str(log_dir), update_freq=50)]
    if method == "L2Penalty":
        kerasreg.regularize(model, kernel=kerasreg.L2Penalty(c))
        optimizer = make_optimizer(optimizer_name)
    elif method == "WeightDecay":
        optimizer = make_optimizer(optimizer_name)
        # Listed first so TensorBoard also records the rate it writes to logs.
        callbacks.insert(0, kerasreg.WeightDecay(RATE))
    elif method == "built-in":
        # SGD: lr * (2c) = r per step, the penalty exactly; AdamW: lr * (r/lr) = r.
        decay = 2 * c if optimizer_name == "SGD" else RATE / lr
        optimizer = make_optimizer(optimizer_name, decay)
    else:
        optimizer = make_optimizer(optimizer_name)
    # steps_per_execution stays 1: WeightDecay then shrinks after every step,
    # as the comparison needs (with k > 1 it applies (1 - r)**k every k steps).
    model.compile(optimizer=optimizer, loss="mse")
    x, y = data
    rng = np.random.default_rng(1)
    per_epoch = len(x) // BATCH_SIZE
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(epochs)])
    order = order[: steps * BATCH_SIZE]
    shutil.rmtree(log_dir, ignore_errors=True)
    # One Keras epoch over pre-shuffled epochs: the same batches for every run.
    model.fit(
        x[order],
        y[order],
        batch_size=BATCH_SIZE,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    kernels = [model.get_layer(n).kernel for n in ("hidden", "output")]
    return np.concatenate([keras.ops.convert_to_numpy(k).ravel() for k in kernels])


def compare(a: np.ndarray, b: np.ndarray, none: np.ndarray) -> dict:
    diff = np.linalg.norm(a - b)
    return {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "relative_diff": float(diff / np.linalg.norm(b)),
        "diff_over_effect": float(diff / np.linalg.norm(b - none)),
        "norm": float(np.linalg.norm(a)),
    }


def plot(weights: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for ax, name in zip(axes, LEARNING_RATES, strict=True):
        w = weights[name]
        decay = w["WeightDecay"]
        lim = 1.05 * np.max(np.abs(decay))
        ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
        ax.scatter(decay, w["L2Penalty"], s=6, label="L2Penalty(r / (2 lr))")
        built_in = "SGD(weight_decay=2c)" if name == "SGD" else "AdamW(r / lr)"
        ax.scatter(decay, w["built-in"], s=6, marker="x", label=built_in)
        ax.set(
            xlabel="kernel entry, WeightDecay(r) (decoupled)",
            ylabel="same entry, other method",
            title=f"{name} (lr={LEARNING_RATES[name]:g}, r={RATE:g})",
        )
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Final weights: on the diagonal = the same as decoupled decay")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 steps")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "decay_vs_l2")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps

    start_time = time.perf_counter()
    data = regression_data()
    keras.utils.set_random_seed(0)
    start = mlp().get_weights()
    weights, results = {}, {}
    for name in LEARNING_RATES:
        weights[name] = {
            method: run(
                method, name, start, data, steps, args.log_dir / f"{name}_{method}"
            )
            for method in ("none", "WeightDecay", "L2Penalty", "built-in")
        }
        w = weights[name]
        results[name] = {
            method: compare(w[method], w["WeightDecay"], w["none"])
            for method in ("L2Penalty", "built-in", "none")
        }
        results[name]["L2Penalty_vs_built-in"] = compare(
            w["L2Penalty"], w["built-in"], w["none"]
        )
    seconds = time.perf_counter() - start_time
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(weights, figure)

    print(f"{steps} steps, r = {RATE:g}, c = r / (2 lr)\n")
    print(
        f"{'optimizer':<9} {'compared':<44} {'max|dw|':>9} {'rel diff':>9} "
        f"{'diff/effect':>11}"
    )
    for name, rows in results.items():
        built_in = (
            "SGD(weight_decay=2c)" if name == "SGD" else "AdamW(weight_decay=r/lr)"
        )
        labels = {
            "L2Penalty": "L2Penalty(c) vs WeightDecay(r)",
            "built-in": f"{built_in} vs WeightDecay(r)",
            "L2Penalty_vs_built-in": f"L2Penalty(c) vs {built_in}",
            "none": "no decay vs WeightDecay(r)",
        }
        for key, label in labels.items():
            row = rows[key]
            print(
                f"{name:<9} {label:<44} {row['max_abs_diff']:>9.2e} "
                f"{row['relative_diff']:>9.2e} {row['diff_over_effect']:>11.2e}"
            )
    print(f"\n{seconds:.0f} s; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {**results, "steps": steps, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
