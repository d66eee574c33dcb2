"""Fine-tuning a pretrained network on few labels: L2 toward zero or toward the start.

scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to
[0, 1]. A small MLP (64 -> 64 -> 32, relu) is pretrained on digits 0-4 (all
their images, Adam, seed 0). Then, for each seed, a NEW 5-way head on the
pretrained body is fine-tuned, body included, on digits 5-9 with only
`--shots` labelled images per class (full batch, Adam 1e-3), and tested on
all the other images of 5-9. Compared, each on the body's kernels only (the
new head is never regularized):

- `none`: plain fine-tuning;
- `L2Penalty(a)`: `a * sum(w**2)`, toward zero;
- `L2SPPenalty(a)` attached with `kerasreg.regularize` to the pretrained
  body: `a * sum((w - w_pretrained)**2)` (L2-SP, Li et al., 2018);
- `WeightDecay(r, toward="start")`: after every update
  `w <- w - r * (w - w_start)`, the decoupled form of the same pull.

Strengths: each regularized method's strength is chosen from a small grid by
its mean VALIDATION accuracy over the seeds (10 more labelled images per class
per seed, never trained on; the test images are never used to choose). The
table gives mean +- std over seeds of the test accuracy at the chosen
strength, and `drift`, `||W_body - W_pretrained||_2` after fine-tuning.
The figure goes to `logs/transfer_l2sp.png`, the numbers to
`logs/transfer_l2sp/results.json`, and one TensorBoard run per method and strength
(first seed, `kerasreg.WeightNormLogger`) under `logs/transfer_l2sp/`.

    python examples/transfer_l2sp.py           # 5 seeds, 4 strengths per method
    python examples/transfer_l2sp.py --quick   # 2 seeds, 1 strength, fewer steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np
from sklearn.datasets import load_digits

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import kerasreg

LOG_ROOT = Path(__file__).resolve().parents[1] / "logs"
BODY = r"^body_"  # the pretrained layers, by layer name
BODY_KERNELS = r"^body_\d/kernel$"  # their kernels, by weight path
VAL_PER_CLASS = 10
LEARNING_RATE = 1e-3
GRIDS = {
    "none": (0.0,),
    "L2Penalty": (1e-4, 1e-3, 1e-2, 1e-1),
    "L2SPPenalty": (1e-4, 1e-3, 1e-2, 1e-1),
    "WeightDecay(toward='start')": (1e-3, 3e-3, 1e-2, 3e-2),
}
QUICK_STRENGTH = {
    "none": 0.0,
    "L2Penalty": 1e-2,
    "L2SPPenalty": 1e-2,
    "WeightDecay(toward='start')": 1e-2,
}


def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y


def body_and_head(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, "relu", name="body_1"),
            keras.layers.Dense(32, "relu", name="body_2"),
            keras.layers.Dense(5, name="head"),
        ],
        name="mlp",
    )


def pretrain(epochs: int) -> tuple[list[np.ndarray], float]:
    """Train on every image of digits 0-4; the body's weights and train accuracy."""
    x, y = digits()
    source = y < 5
    model = body_and_head(0)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x[source], y[source], batch_size=32, epochs=epochs, verbose=0)
    logits = keras.ops.convert_to_numpy(model(x[source]))
    accuracy = float(np.mean(np.argmax(logits, 1) == y[source]))
    body = [w for layer in model.layers[:2] for w in layer.get_weights()]
    return body, accuracy


def target_split(seed: int, shots: int):
    """Digits 5-9 (labels 0-4): `shots` train and 10 validation images per class."""
    x, y = digits()
    x, y = x[y >= 5], y[y >= 5] - 5
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(5):
        index = rng.permutation(np.flatnonzero(y == c))
        parts["train"].append(index[:shots])
        parts["val"].append(index[shots : shots + VAL_PER_CLASS])
        parts["test"].append(index[shots + VAL_PER_CLASS :])
    return {k: (x[np.concatenate(v)], y[np.concatenate(v)]) for k, v in parts.items()}


def fine_tune(method, strength, pretrained, split, seed, steps, run_dir=None) -> dict:
    model = body_and_head(1000 + seed)  # a new head per seed
    for layer, weights in zip(
        model.layers[:2], (pretrained[:2], pretrained[2:]), strict=True
    ):
        layer.set_weights(weights)
    callbacks = []
    if method == "L2Penalty":
        kerasreg.regularize(
            model, kernel=kerasreg.L2Penalty(strength), where=kerasreg.layer(BODY)
        )
    elif method == "L2SPPenalty":
        kerasreg.regularize(
            model, kernel=kerasreg.L2SPPenalty(strength), where=kerasreg.layer(BODY)
        )
    elif method == "WeightDecay(toward='start')":
        callbacks.append(
            kerasreg.WeightDecay(strength, toward="start", where=BODY_KERNELS)
        )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = split["train"]
    epochs = 10
    per_epoch = steps // epochs
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
        callbacks.append(kerasreg.WeightNormLogger(str(run_dir)))
    # Full batch: each epoch is `per_epoch` copies of the few labelled images.
    model.fit(
        np.tile(x, (per_epoch, 1)),
        np.tile(y, per_epoch),
        batch_size=len(x),
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )

    def accuracy(part):
        xs, ys = split[part]
        return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(xs)), 1) == ys))

    body = [
        keras.ops.convert_to_numpy(model.get_layer(n).kernel)
        for n in ("body_1", "body_2")
    ]
    drift = np.sqrt(
        sum(np.sum((w - p) ** 2) for w, p in zip(body, pretrained[::2], strict=True))
    )
    return {"val": accuracy("val"), "test": accuracy("test"), "drift": float(drift)}


def run_dir(log_dir: Path, method: str, strength: float) -> Path:
    """TensorBoard run of the first seed, e.g. `L2SPPenalty_0.01`."""
    name = method.replace("(toward='start')", "_toward_start")
    return log_dir / (name if method == "none" else f"{name}_{strength:g}")


def plot(rows: dict, path: Path, shots: int) -> None:
    names = list(rows)
    fig, (acc, drift) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for i, name in enumerate(names):
        tests = rows[name]["tests"]
        acc.scatter(tests, [i] * len(tests), color="0.6", s=12, zorder=2)
        acc.errorbar(
            rows[name]["test_mean"],
            i,
            xerr=rows[name]["test_std"],
            fmt="o",
            color="C3" if name == "none" else "C0",
            capsize=4,
            zorder=3,
        )
        drift.barh(i, rows[name]["drift_mean"], color="C3" if name == "none" else "C0")
    labels = [f"{n}\n({rows[n]['strength']:g})" if n != "none" else n for n in names]
    for ax in (acc, drift):
        ax.set_yticks(range(len(names)), labels if ax is acc else [])
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    acc.set(
        xlabel="test accuracy (digits 5-9)",
        title="mean +- std over seeds (dots: seeds)",
    )
    drift.set(
        xlabel="||W_body - W_pretrained||_2", title="distance from the pretrained body"
    )
    fig.suptitle(
        f"Fine-tuning a body pretrained on digits 0-4, {shots} labels per class"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 strength")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--shots", type=int, default=5, help="labels per class")
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "transfer_l2sp")
    args = parser.parse_args(argv)
    seeds = range(args.seeds or (2 if args.quick else 5))
    steps = 100 if args.quick else 300
    grids = {m: (QUICK_STRENGTH[m],) for m in GRIDS} if args.quick else GRIDS

    start = time.perf_counter()
    pretrained, source_accuracy = pretrain(10 if args.quick else 30)
    splits = {seed: target_split(seed, args.shots) for seed in seeds}
    rows = {}
    for method, grid in grids.items():
        runs = {
            s: [
                fine_tune(
                    method,
                    s,
                    pretrained,
                    splits[seed],
                    seed,
                    steps,
                    run_dir(args.log_dir, method, s) if seed == seeds[0] else None,
                )
                for seed in seeds
            ]
            for s in grid
        }
        # Chosen on validation accuracy only; ties go to the weaker strength.
        best = max(grid, key=lambda s: (statistics.mean(r["val"] for r in runs[s]), -s))
        chosen = runs[best]
        tests = [r["test"] for r in chosen]
        rows[method] = {
            "strength": best,
            "grid": {
                f"{s:g}": statistics.mean(r["val"] for r in runs[s]) for s in grid
            },
            "tests": tests,
            "test_mean": float(np.mean(tests)),
            "test_std": float(np.std(tests)),
            "val_mean": float(np.mean([r["val"] for r in chosen])),
            "drift_mean": float(np.mean([r["drift"] for r in chosen])),
        }
    seconds = time.perf_counter() - start

    args.log_dir.mkdir(parents=True, exist_ok=True)
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(rows, figure, args.shots)
    result = {
        "backend": keras.backend.backend(),
        "seeds": len(seeds),
        "shots": args.shots,
        "steps": steps,
        "pretrain_accuracy": source_accuracy,
        "rows": rows,
    }
    (args.log_dir / "results.json").write_text(json.dumps(result, indent=2))

    print(f"pretrained on digits 0-4: train accuracy {source_accuracy:.3f}")
    print(
        f"fine-tuned on digits 5-9, {args.shots} labels per class, {steps} full-batch "
        f"Adam steps, {len(seeds)} seeds\n"
    )
    print(
        f"{'method':<28} {'strength':>8} {'val':>6} {'test mean':>9} {'+-':>2} {'std':<6} {'drift':>6}"
    )
    for name, row in rows.items():
        print(
            f"{name:<28} {row['strength']:>8g} {row['val_mean']:>6.3f} "
            f"{row['test_mean']:>9.3f} +- {row['test_std']:<6.3f} {row['drift_mean']:>6.2f}"
        )
    print(
        "(strength: chosen on the validation accuracy; drift: ||W_body - W_pretrained||)"
    )
    winner = max(rows, key=lambda n: rows[n]["test_mean"])
    print(f"\nbest mean test accuracy: {winner}")
    print(
        f"{seconds:.0f} s; results: {args.log_dir / 'results.json'}; figure: {figure}"
    )
    print(f"tensorboard --logdir {args.log_dir}")
    return {**result, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
