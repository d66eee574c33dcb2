"""How hard does the penalty pull? Penalty share and cosine per layer, beside the
validation curve.

The two-moons network of `moons_problem.py` (Brownlee's tutorial):
`Dense(500, relu) -> Dense(1, sigmoid)`, Adam, binary cross-entropy, 30
training and 70 test points, 4000 full-batch updates, here with
`L2Penalty(alpha)` on both kernels, for a grid of strengths. Each strength is
one plain `fit` with `WeightNormLogger(gradients=True)`, which logs at the
step's own batch (`kerasreg.sweep(..., log_dir=..., gradients=True)` logs per
variant too, but once per epoch); the test points are the validation data.
Every 100 updates (one Keras epoch of `fit_full_batch`) the logger writes,
per kernel:

- from the training batch of that step: the norms of the data gradient and
  of the penalty gradient, `penalty_share = |g_penalty| / (|g_data| +
  |g_penalty|)` and the cosine between the two;
- from the validation data (one extra pass): the same against the gradient
  of the test loss.

The script reads those series back from the event files (TensorBoard's own
reader) and draws, against alpha: the validation curve (train and test
accuracy, test loss), the training-batch share and cosine (mean over the run
and at its end) and the validation share and cosine at the end, one line per
layer. It prints the table and which reading, if any, changes where the
validation curve turns (see the guide, docs/guide/tensorboard.md).

    python examples/gradient_share.py            # 8 strengths, 4000 updates each
    python examples/gradient_share.py --quick    # 3 strengths, 600 updates
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
from moons_problem import (
    LOG_ROOT,
    SEED,
    compile_moons_model,
    fit_full_batch,
    moons_data,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import kerasreg

ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_ALPHAS = (1e-5, 1e-3, 1e-1)
LAYERS = {"hidden": "hidden/kernel", "output": "output/kernel"}
PER_EPOCH = 100  # updates per Keras epoch: one log per 100 updates


def model_with_penalty(alpha: float) -> keras.Model:
    """The moons network with `L2Penalty(alpha)` on both kernels."""
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(
                500,
                activation="relu",
                kernel_regularizer=kerasreg.L2Penalty(alpha),
                name="hidden",
            ),
            keras.layers.Dense(
                1,
                activation="sigmoid",
                kernel_regularizer=kerasreg.L2Penalty(alpha),
                name="output",
            ),
        ],
        name="moons",
    )
    compile_moons_model(model)
    return model


def predictions(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Probabilities of class 1 (one call of the model: no predict function,
    so no re-tracing per model)."""
    return keras.ops.convert_to_numpy(model(x, training=False))[:, 0].astype("float64")


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((predictions(model, x) > 0.5) == (y > 0.5)))


def data_loss(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Binary cross-entropy of the predictions (no penalty)."""
    p = np.clip(predictions(model, x), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def read_series(run_dir: Path) -> dict[str, list[float]]:
    """`{tag: [values in step order]}` of a run folder's scalars."""
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [
            float(tensor_util.make_ndarray(e.tensor_proto))
            for e in sorted(events.Tensors(tag), key=lambda e: e.step)
        ]
        for tag in events.Tags()["tensors"]
        if events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def train_one(alpha: float, updates: int, log_dir: Path) -> dict:
    (x_train, y_train), (x_test, y_test) = moons_data()
    model = model_with_penalty(alpha)
    fit_full_batch(
        model,
        x_train,
        y_train,
        updates,
        updates_per_epoch=PER_EPOCH,
        validation_data=(x_test, y_test),
        callbacks=[kerasreg.WeightNormLogger(log_dir, gradients=True)],
    )
    train, validation = (
        read_series(log_dir / "train"),
        read_series(log_dir / "validation"),
    )
    row = {
        "alpha": alpha,
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "test_loss": data_loss(model, x_test, y_test),
        "weights": model.get_weights(),
        "layers": {},
    }
    for layer, path in LAYERS.items():
        share = train[f"penalty_share/{path}"]
        cosine = train[f"grad_cosine/{path}"]
        row["layers"][layer] = {
            "train_share_mean": float(np.mean(share)),
            "train_share_end": share[-1],
            "train_cosine_mean": float(np.mean(cosine)),
            "train_cosine_end": cosine[-1],
            "val_share_end": validation[f"penalty_share/{path}"][-1],
            "val_cosine_end": validation[f"grad_cosine/{path}"][-1],
            "val_data_end": validation[f"grad_data/{path}"][-1],
            "val_penalty_end": validation[f"grad_penalty/{path}"][-1],
        }
    return row


READINGS = {
    "train_share_mean": "penalty share, training batch (mean over the run)",
    "train_share_end": "penalty share, training batch (end)",
    "val_share_end": "penalty share, validation data (end)",
    "train_cosine_end": "cosine, training batch (end)",
    "val_cosine_end": "cosine, validation data (end)",
}


def plot(rows: list[dict], path: Path, updates: int) -> None:
    """Validation curve, penalty share and cosine against alpha, side by side."""
    alphas = [row["alpha"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    ax = axes[0]
    ax.plot(alphas, [r["train_accuracy"] for r in rows], "o-", label="train accuracy")
    ax.plot(alphas, [r["test_accuracy"] for r in rows], "s-", label="test accuracy")
    loss = ax.twinx()
    loss.plot(
        alphas, [r["test_loss"] for r in rows], "^--", color="C3", label="test loss"
    )
    loss.set_ylabel("test data loss (cross-entropy)")
    ax.set_title("validation curve")
    ax.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()
    more = loss.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    readings = {  # color and marker per reading, line style per layer
        "train_{}_mean": ("C0", "o", "training batch, mean over the run"),
        "train_{}_end": ("C2", "x", "training batch, at the end"),
        "val_{}_end": ("C1", "s", "validation data, at the end"),
    }
    styles = {"hidden": "-", "output": ":"}
    for ax, kind, title, level in (
        (axes[1], "share", "penalty share  |g_pen| / (|g_data| + |g_pen|)", 0.5),
        (axes[2], "cosine", "cosine(g_data, g_pen)", -1.0),
    ):
        ax.axhline(level, color="gray", lw=0.8)
        for layer, style in styles.items():
            for key, (color, marker, _) in readings.items():
                values = [r["layers"][layer][key.format(kind)] for r in rows]
                ax.plot(alphas, values, marker=marker, ls=style, color=color)
        ax.set_title(title)
    handles = [
        plt.Line2D([], [], color=color, marker=marker, label=label)
        for color, marker, label in readings.values()
    ] + [
        plt.Line2D([], [], color="k", ls=style, label=f"{layer} kernel")
        for layer, style in styles.items()
    ]
    axes[2].legend(
        handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("alpha of L2Penalty on both kernels")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Two moons, {updates} Adam updates per strength: how hard the penalty pulls"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def turning_point(rows: list[dict]) -> int:
    """Index of the strength with the best test accuracy (ties: lowest test loss)."""
    return max(
        range(len(rows)),
        key=lambda i: (rows[i]["test_accuracy"], -rows[i]["test_loss"]),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 strengths, 600 updates")
    parser.add_argument("--updates", type=int, default=None)
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "gradient_share")
    args = parser.parse_args(argv)
    alphas = QUICK_ALPHAS if args.quick else ALPHAS
    updates = args.updates or (600 if args.quick else 4000)

    start = time.perf_counter()
    shutil.rmtree(args.log_dir, ignore_errors=True)
    rows = [train_one(a, updates, args.log_dir / f"l2_{a:g}") for a in alphas]
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(rows, figure, updates)

    header = f"{'alpha':>7} {'train':>6} {'test':>6} {'t.loss':>7}"
    for layer in LAYERS:
        header += f" | {layer}: {'share~':>6} {'share':>6} {'v.share':>7}"
        header += f" {'cos':>6} {'v.cos':>6}"
    print(header)
    for row in rows:
        line = (
            f"{row['alpha']:>7.0e} {row['train_accuracy']:>6.3f} "
            f"{row['test_accuracy']:>6.3f} {row['test_loss']:>7.3f}"
        )
        for layer in LAYERS:
            r = row["layers"][layer]
            line += (
                f" | {'':>{len(layer) + 1}} {r['train_share_mean']:>6.3f} "
                f"{r['train_share_end']:>6.3f} {r['val_share_end']:>7.3f} "
                f"{r['train_cosine_end']:>6.3f} {r['val_cosine_end']:>6.3f}"
            )
        print(line)
    best = turning_point(rows)
    print(
        f"\nbest test accuracy at alpha = {rows[best]['alpha']:g}; share~ = mean "
        "training-batch share over the run, share/cos = training batch at the end, "
        "v.share/v.cos = validation data at the end."
    )
    seconds = time.perf_counter() - start
    print(f"{len(rows)} fits in {seconds:.0f} s; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {"rows": rows, "best": best, "figure": figure, "updates": updates}


if __name__ == "__main__":
    main()
