"""Exact zeros: an L1 penalty's gradient steps vs its proximal step (soft-thresholding).

A binary problem made locally with scikit-learn's `make_classification`: 100
features of which only 8 are informative (the other 92 are noise), 300
training and 300 test points. A small MLP (100 -> 32 relu -> 2) is trained
with plain SGD (learning rate 0.1, batch 30) for the same number of steps,
with, at each strength `l1` of a small grid, either

- `L1Penalty(l1)` on every kernel (attached with `kerasreg.regularize`): the
  gradient `l1 * sign(w)` is added to each step, or
- `SoftThreshold(l1, lr_scaled=True)` on the same kernels: after each SGD
  step, `w <- sign(w) * max(|w| - lr * l1, 0)`, the proximal step of the
  same penalty at the same learning rate (ISTA).

The table gives, per run, the fraction of kernel entries that are exactly
0.0 (counted as `w == 0` in NumPy on the final weights, no tolerance), the
fraction with `|w| < 1e-3` (near zero), how many of the 100 input features
the hidden layer still reads (rows of the first kernel not entirely zero),
and the test accuracy. Final kernels are written to
`logs/sparse_l1/kernels.npz`, the numbers to `logs/sparse_l1/results.json`,
the figure to `logs/sparse_l1.png`.

    python examples/sparse_l1.py           # 5 strengths, 40 epochs
    python examples/sparse_l1.py --quick   # 2 strengths, 12 epochs
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np
from sklearn.datasets import make_classification

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import kerasreg

LOG_ROOT = Path(__file__).resolve().parents[1] / "logs"
FEATURES, INFORMATIVE = 100, 8
LEARNING_RATE, BATCH_SIZE = 0.1, 30
STRENGTHS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)
QUICK_STRENGTHS = (1e-3, 1e-2)
NEAR_ZERO = 1e-3


def problem():
    x, y = make_classification(
        n_samples=600,
        n_features=FEATURES,
        n_informative=INFORMATIVE,
        n_redundant=0,
        n_repeated=0,
        shuffle=False,  # the informative features are the first 8 columns
        random_state=0,
    )
    x = x.astype("float32")
    return (x[:300], y[:300]), (x[300:], y[300:])


def train_grid(runs: list[tuple[str, float]], epochs: int, log_dir: Path):
    """One `kerasreg.sweep` over the runs: `(rows, kernels per run)`.

    Every run starts from the same initial weights (the template's) and sees
    the batches in the same order; each is exactly its own fit.
    """
    (x_train, y_train), (x_test, y_test) = problem()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(32, "relu", name="hidden"),
            keras.layers.Dense(2, name="output"),
        ],
        name="mlp",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    knobs = {
        "none": lambda l1: None,
        "L1Penalty": kerasreg.L1Penalty,  # on every kernel
        "SoftThreshold": lambda l1: kerasreg.SoftThreshold(l1, lr_scaled=True),
    }
    result = kerasreg.sweep(
        model,
        [knobs[method](l1) for method, l1 in runs],
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        verbose=0,
        log_dir=log_dir,  # one TensorBoard run per grid item, with weight norms
    )
    rows, arrays = [], {}
    for (method, l1), trained in zip(runs, result.models, strict=True):
        kernels = {
            n: keras.ops.convert_to_numpy(trained.get_layer(n).kernel)
            for n in ("hidden", "output")
        }
        flat = np.concatenate([k.ravel() for k in kernels.values()])
        used = np.any(kernels["hidden"] != 0, axis=1)

        def accuracy(x, y, model=trained):
            logits = keras.ops.convert_to_numpy(model(x))
            return float(np.mean(np.argmax(logits, 1) == y))

        rows.append(
            {
                "method": method,
                "l1": l1,
                "zero_fraction": float(np.mean(flat == 0.0)),
                "near_zero_fraction": float(np.mean(np.abs(flat) < NEAR_ZERO)),
                "inputs_used": int(used.sum()),
                "informative_used": int(used[:INFORMATIVE].sum()),
                "train": accuracy(x_train, y_train),
                "test": accuracy(x_test, y_test),
            }
        )
        for name, kernel in kernels.items():
            arrays[f"{method}_{l1:g}/{name}"] = kernel
    return rows, arrays


def plot(rows: list[dict], path: Path) -> None:
    fig, (zeros, acc) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    base = next(r for r in rows if r["method"] == "none")
    for method, color in (("L1Penalty", "C3"), ("SoftThreshold", "C0")):
        runs = [r for r in rows if r["method"] == method]
        l1 = [r["l1"] for r in runs]
        zeros.plot(
            l1,
            [r["zero_fraction"] for r in runs],
            "o-",
            color=color,
            label=f"{method}: exactly 0",
        )
        zeros.plot(
            l1,
            [r["near_zero_fraction"] for r in runs],
            "x--",
            color=color,
            label=f"{method}: |w| < {NEAR_ZERO:g}",
        )
        acc.plot(l1, [r["test"] for r in runs], "o-", color=color, label=method)
    acc.axhline(base["test"], color="0.4", ls=":", label="no L1")
    zeros.set(
        xscale="log",
        xlabel="l1",
        ylabel="fraction of kernel entries",
        title="sparsity of the kernels",
        ylim=(-0.02, 1.02),
    )
    acc.set(xscale="log", xlabel="l1", ylabel="test accuracy", title="test accuracy")
    for ax in (zeros, acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"L1 gradient steps vs soft-thresholding under SGD "
        f"({INFORMATIVE} informative of {FEATURES} features)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 strengths, 12 epochs")
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "sparse_l1")
    args = parser.parse_args(argv)
    strengths = QUICK_STRENGTHS if args.quick else STRENGTHS
    epochs = 12 if args.quick else 40

    start = time.perf_counter()
    runs = [("none", 0.0)] + [
        (method, l1) for l1 in strengths for method in ("L1Penalty", "SoftThreshold")
    ]
    shutil.rmtree(args.log_dir, ignore_errors=True)
    rows, arrays = train_grid(runs, epochs, args.log_dir)
    seconds = time.perf_counter() - start

    args.log_dir.mkdir(parents=True, exist_ok=True)
    np.savez(args.log_dir / "kernels.npz", **arrays)
    (args.log_dir / "results.json").write_text(
        json.dumps(
            {"backend": keras.backend.backend(), "epochs": epochs, "rows": rows},
            indent=2,
        )
    )
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(rows, figure)

    print(
        f"{'method':<14} {'l1':>7} {'exact 0':>8} {'|w|<1e-3':>9} {'inputs':>7} "
        f"{'train':>6} {'test':>6}"
    )
    for r in rows:
        print(
            f"{r['method']:<14} {r['l1']:>7g} {r['zero_fraction']:>8.3f} "
            f"{r['near_zero_fraction']:>9.3f} {r['inputs_used']:>3}/{FEATURES:<3} "
            f"{r['train']:>6.3f} {r['test']:>6.3f}"
        )
    print(
        f"(exact 0: fraction of kernel entries == 0.0; inputs: features the hidden "
        f"layer still reads; {epochs} epochs of SGD({LEARNING_RATE:g}), "
        f"{INFORMATIVE} informative features)"
    )
    print(f"\n{len(rows)} models in {seconds:.0f} s; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {"rows": rows, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
