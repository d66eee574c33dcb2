"""kerasreg demo: two moons without and with weight penalties, and post-hoc decay.

The first command of the quick start (`python3 dev.py demo`). It reproduces the
seeds' Keras tutorial (Jason Brownlee, "How to Use Weight Decay to Reduce
Overfitting of Neural Networks in Keras", Machine Learning Mastery, 2018): 30
noisy two-moons points for training, 70 for testing, `Dense(500, relu) ->
Dense(1, sigmoid)`, Adam, binary cross-entropy, 4000 full-batch updates.
Published: train 1.000 / test 0.914 without regularization, test 0.943 with an
L2 penalty of 0.001 on the hidden kernel.

Runs (each 4000 updates from the same initial weights):

- `none`: no regularization (overfits: large weights, wiggly boundary);
- `L2Penalty(1e-3)`, `L1Penalty(1e-3)`, `ExpAbsPenalty(1e-3)` on the hidden
  kernel, the tutorial's strength for all three (these four are one
  `kerasreg.sweep` call: trained side by side, each exactly its own fit);
- `none + WeightDecay(1e-3)`: the trained `none` model, trained on for 2000
  more updates with `kerasreg.WeightDecay(1e-3)`, which shrinks every kernel
  by 0.1% after each update (decay applied after the fact, no penalty in the
  loss).

Each run is logged under `logs/demo/<run>` (`none`, `L2Penalty_0.001`, ...,
`none+WeightDecay_0.001`: loss, accuracy, weight norms, penalties, data loss,
per 100 updates; the sweep's own runs, then `keras.callbacks.TensorBoard` and
`kerasreg.WeightNormLogger`). The summary figure,
`logs/demo.png`, shows each run's decision boundary and bars of accuracy and
weight norms. The table gives train/test accuracy, the kernels' L2 norms
(`kerasreg.weight_norms`) and the penalty's share of the final training loss.

The 4000 updates are done as 40 Keras epochs over the training batch repeated
100 times, 100 updates per compiled call (`steps_per_execution=100`): the same
updates as 4000 one-batch epochs, without Keras's per-epoch overhead (see
`moons_problem.fit_full_batch`). About 30 s on 2 CPU cores.

    python examples/demo.py            # or: python3 dev.py demo
    python examples/demo.py --quick    # 600 updates per run (for tests)
    python examples/demo.py --json results.json  # the table's numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from moons_problem import (
    LOG_ROOT,
    accuracy,
    fit_full_batch,
    loss_parts,
    moons_data,
    moons_model,
    probabilities,
)

import kerasreg

UPDATES_PER_EPOCH = 100
STRENGTH = 1e-3
PENALTIES = {
    "none": None,
    "L2Penalty(1e-3)": kerasreg.L2Penalty(STRENGTH),
    "L1Penalty(1e-3)": kerasreg.L1Penalty(STRENGTH),
    "ExpAbsPenalty(1e-3)": kerasreg.ExpAbsPenalty(STRENGTH),
}
POSTHOC = "none + WeightDecay(1e-3)"
POSTHOC_RUN = f"none+WeightDecay_{STRENGTH:g}"  # named as the sweep names its runs
PUBLISHED = {"none": ("1.000", "0.914"), "L2Penalty(1e-3)": ("-", "0.943")}


def callbacks(log_dir: Path, run: str) -> list:
    run_dir = log_dir / run
    shutil.rmtree(run_dir, ignore_errors=True)
    # The logger first: Keras's TensorBoard then also logs the logger's
    # `data_loss` and `penalty` keys (kerasreg warns about the other order).
    return [
        kerasreg.WeightNormLogger(str(run_dir)),
        keras.callbacks.TensorBoard(str(run_dir)),
    ]


def measure(model: keras.Model, updates: int) -> dict:
    (x_train, y_train), (x_test, y_test) = moons_data()
    norms = kerasreg.weight_norms(model)
    return {
        "updates": updates,
        "train": accuracy(model, x_train, y_train),
        "test": accuracy(model, x_test, y_test),
        "hidden_l2": norms[
            kerasreg.selection.weight_paths(model)[id(model.get_layer("hidden").kernel)]
        ]["l2"],
        "output_l2": norms[
            kerasreg.selection.weight_paths(model)[id(model.get_layer("output").kernel)]
        ]["l2"],
        **loss_parts(model, x_train, y_train),
        "boundary": decision_grid(model),
    }


GRID = np.meshgrid(np.linspace(-1.6, 2.6, 160), np.linspace(-1.2, 1.7, 120))


def decision_grid(model: keras.Model) -> np.ndarray:
    points = np.stack([g.ravel() for g in GRID], axis=1).astype("float32")
    return probabilities(model, points).reshape(GRID[0].shape)


def plot(results: dict, path: Path) -> None:
    (x_train, y_train), (x_test, y_test) = moons_data()
    names = list(results)
    fig = plt.figure(figsize=(3.2 * len(names), 7.2), layout="constrained")
    spec = fig.add_gridspec(2, len(names) * 2, height_ratios=(1.15, 1))
    for i, name in enumerate(names):
        r = results[name]
        ax = fig.add_subplot(spec[0, 2 * i : 2 * i + 2])
        ax.contourf(*GRID, r["boundary"], levels=20, cmap="RdBu_r", alpha=0.55)
        ax.contour(*GRID, r["boundary"], levels=[0.5], colors="k", linewidths=1.2)
        for x, y, marker, label in (
            (x_train, y_train, "o", "train"),
            (x_test, y_test, "^", "test"),
        ):
            ax.scatter(
                x[:, 0],
                x[:, 1],
                c=y,
                cmap="RdBu_r",
                marker=marker,
                s=22,
                edgecolors="k",
                linewidths=0.5,
                label=label,
                vmin=0,
                vmax=1,
            )
        ax.set_title(
            f"{name}\ntrain {r['train']:.3f}  test {r['test']:.3f}", fontsize=9
        )
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    third = max(1, (2 * len(names)) // 3)
    acc = fig.add_subplot(spec[1, :third])
    norm = fig.add_subplot(spec[1, third : 2 * third])
    share = fig.add_subplot(spec[1, 2 * third :])
    y = np.arange(len(names))
    acc.barh(y - 0.2, [results[n]["train"] for n in names], 0.4, label="train")
    acc.barh(y + 0.2, [results[n]["test"] for n in names], 0.4, label="test")
    acc.axvline(0.943, color="k", ls=":", lw=1, label="published test, L2 1e-3")
    acc.set(xlim=(0.7, 1.02), title="accuracy")
    norm.barh(y - 0.2, [results[n]["hidden_l2"] for n in names], 0.4, label="hidden")
    norm.barh(y + 0.2, [results[n]["output_l2"] for n in names], 0.4, label="output")
    norm.set(title="kernel L2 norm")
    share.barh(y, [100 * results[n]["share"] for n in names], 0.5, color="C2")
    share.set(title="penalty share of the training loss (%)")
    for ax in (acc, norm, share):
        ax.set_yticks(y, names if ax is acc else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    for ax in (acc, norm):
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    fig.suptitle("kerasreg demo: two moons, 30 training points, Dense(500) network")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(results: dict) -> None:
    header = (
        f"{'run':<25} {'updates':>7} {'train':>6} {'test':>6} {'published':>11} "
        f"{'||W1||':>7} {'||W2||':>7} {'data loss':>9} {'penalty':>8} {'share':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        # The published numbers are for 4000 updates only.
        published = PUBLISHED.get(name) if r["updates"] == 4000 else None
        train, test = published or ("-", "-")
        print(
            f"{name:<25} {r['updates']:>7} {r['train']:>6.3f} {r['test']:>6.3f} "
            f"{train + '/' + test:>11} {r['hidden_l2']:>7.2f} {r['output_l2']:>7.2f} "
            f"{r['data_loss']:>9.4f} {r['penalty']:>8.4f} {r['share']:>6.1%}"
        )
    print(
        "(accuracy on 30 train / 70 test points; ||W||: kernel L2 norms; data loss:\n"
        " training cross-entropy; share: penalty / (data loss + penalty))"
    )


def print_tensorboard_command(log_root: Path) -> None:
    """End with the exact command that shows the runs (relative path if short)."""
    try:
        shown = os.path.relpath(log_root)
    except ValueError:  # another drive on Windows
        shown = str(log_root)
    if shown.startswith(".."):
        shown = str(log_root)
    scripts = Path(sys.executable).parent
    if shutil.which("tensorboard") is None and (scripts / "tensorboard").exists():
        print(
            f"(tensorboard is installed in {scripts.parent}: activate it first, "
            f"`source {scripts / 'activate'}`)"
        )
    print(f"\n    tensorboard --logdir {shown}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="600 updates per run (for tests)"
    )
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "demo")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results here"
    )
    args = parser.parse_args(argv)
    updates = 600 if args.quick else 4000
    start = time.perf_counter()
    (x_train, y_train), _ = moons_data()

    results, models = {}, {}
    print(f"training {', '.join(PENALTIES)} side by side ...", flush=True)
    shutil.rmtree(args.log_dir, ignore_errors=True)
    result = kerasreg.sweep(
        moons_model(),
        list(PENALTIES.values()),
        np.tile(x_train, (UPDATES_PER_EPOCH, 1)),  # 100 full-batch updates an epoch
        np.tile(y_train, UPDATES_PER_EPOCH),
        where="hidden",  # the hidden kernel
        batch_size=len(x_train),
        epochs=updates // UPDATES_PER_EPOCH,
        shuffle=False,
        log_dir=args.log_dir,
        verbose=0,
    )
    for name, model in zip(PENALTIES, result.models, strict=True):
        results[name] = measure(model, updates)
        models[name] = model

    print(f"training {POSTHOC} ...", flush=True)
    more, overfit = updates // 2, models["none"]
    fit_full_batch(
        overfit,
        x_train,
        y_train,
        more,
        updates_per_epoch=UPDATES_PER_EPOCH,
        initial_epoch=updates // UPDATES_PER_EPOCH,
        callbacks=[
            kerasreg.WeightDecay(STRENGTH),
            *callbacks(args.log_dir, POSTHOC_RUN),
        ],
    )
    results[POSTHOC] = measure(overfit, updates + more)
    seconds = time.perf_counter() - start

    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(results, figure)
    print()
    print_table(results)
    print(f"\n{len(results)} runs in {seconds:.0f} s. Summary figure: {figure}")
    print(f"TensorBoard runs: {args.log_dir}/<run>. Look at them with:")
    print_tensorboard_command(args.log_dir.parent)
    runs = {
        name: {key: value for key, value in r.items() if key != "boundary"}
        for name, r in results.items()
    }
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "figure": str(figure)}))
    return {"runs": runs, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
