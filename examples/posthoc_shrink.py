"""Post-hoc regularization of an overfit, already trained and saved model.

The engineers' question: "I have a trained model that overfits; can I
regularize it now, without starting over?" The model is the two-moons network
of the seeds' Keras tutorial (see `moons_problem.py`): trained for 4000
full-batch Adam updates without regularization it fits its 30 training points
perfectly (train 1.000 / test 0.914 published and reproduced) with large
weights. It is saved to `overfit.keras`, then, each time starting from that
file:

1. loaded and trained on with `kerasreg.WeightDecay(rate)` (decoupled decay:
   every kernel shrinks by `(1 - rate)` per update, the engineers'
   `w = w * 0.98`), while `EarlyStopping(restore_best_weights=True)` watches
   the loss on a separate validation set (50 fresh two-moons points,
   `random_state=2`; the 70 test points are never used to choose);
2. loaded, given `kerasreg.regularize(model, kernel=L2Penalty(1e-3))` (the
   published tutorial's penalty, attached to the trained model in place) and
   trained on the same way;
3. shrunk once with the command line, `kerasreg shrink overfit.keras
   shrunk_<F>.keras --factor F`, no training at all.

For each, the table gives the weight norms (`kerasreg.weight_norms`), train
and test accuracy, and the test cross-entropy. Nothing is published for the
post-hoc runs; the reference is the same penalty from the start: test 0.943
(published and reproduced by `moons.py`). TensorBoard runs go under
`logs/posthoc_shrink/<run>` (with `kerasreg.WeightNormLogger`), the figure to
`logs/posthoc_shrink.png`.

    python examples/posthoc_shrink.py           # 4000 + up to 4000 updates
    python examples/posthoc_shrink.py --quick   # 1000 + up to 500 updates
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from pathlib import Path

import keras
import matplotlib
from sklearn.datasets import make_moons

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from moons_problem import (
    LOG_ROOT,
    accuracy,
    fit_full_batch,
    loss_parts,
    moons_data,
    moons_model,
)

import kerasreg
import kerasreg.cli

DECAY_RATE = 1e-3
PENALTY = 1e-3
SHRINK_FACTORS = (0.8, 0.5)
UPDATES_PER_EPOCH = 100


def validation_data():
    """50 fresh two-moons points, for early stopping (never the test points)."""
    x, y = make_moons(n_samples=50, noise=0.2, random_state=2)
    return x.astype("float32"), y.astype("float32")


def measure(model: keras.Model) -> dict:
    (x_train, y_train), (x_test, y_test) = moons_data()
    norms = kerasreg.weight_norms(model)
    return {
        "hidden_l2": norms[
            kerasreg.selection.weight_paths(model)[id(model.get_layer("hidden").kernel)]
        ]["l2"],
        "output_l2": norms[
            kerasreg.selection.weight_paths(model)[id(model.get_layer("output").kernel)]
        ]["l2"],
        "train": accuracy(model, x_train, y_train),
        "test": accuracy(model, x_test, y_test),
        "test_loss": loss_parts(model, x_test, y_test)["data_loss"],
    }


def continue_training(model, extra_callbacks, updates: int, run_dir: Path) -> dict:
    """Train on with early stopping on the validation loss; measure the result."""
    (x_train, y_train), _ = moons_data()
    shutil.rmtree(run_dir, ignore_errors=True)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=5, restore_best_weights=True
    )
    history = fit_full_batch(
        model,
        x_train,
        y_train,
        updates,
        updates_per_epoch=UPDATES_PER_EPOCH,
        validation_data=validation_data(),
        callbacks=[
            *extra_callbacks,
            # The logger before the callbacks that read its `logs` keys.
            kerasreg.WeightNormLogger(str(run_dir)),
            stopper,
            keras.callbacks.TensorBoard(str(run_dir)),
        ],
    )
    # EarlyStopping restores the best weights only when it stops early.
    epochs = len(history.history["loss"])
    kept = stopper.best_epoch + 1 if stopper.stopped_epoch else epochs
    return {**measure(model), "updates": kept * UPDATES_PER_EPOCH}


def shrink_with_cli(source: Path, factor: float) -> dict:
    """`kerasreg shrink source target --factor F`, then load and measure."""
    target = source.with_name(f"shrunk_{factor:g}.keras")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = kerasreg.cli.main(
            ["shrink", str(source), str(target), "--factor", f"{factor:g}"]
        )
    if status != 0:
        raise RuntimeError(f"kerasreg shrink exited with {status}: {output.getvalue()}")
    return {**measure(keras.saving.load_model(target)), "updates": 0}


def plot(rows: dict, path: Path) -> None:
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    panels = (
        ("hidden_l2", "||W1||_2 (hidden kernel)"),
        ("test", "test accuracy"),
        ("test_loss", "test cross-entropy"),
    )
    colors = ["C3"] + ["C0"] * (len(names) - 1)
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [rows[name][key] for name in names]
        ax.barh(names, values, color=colors)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.3g}", va="center", fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.margins(x=0.25)
        if key == "test":
            ax.set_xlim(min(0.75, min(values) - 0.05), 1.0)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("Regularizing a trained, overfit two-moons model after the fact")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000 + up to 500 updates")
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "posthoc_shrink")
    args = parser.parse_args(argv)
    first, more = (1000, 500) if args.quick else (4000, 4000)

    start = time.perf_counter()
    (x_train, y_train), _ = moons_data()
    model = moons_model()
    shutil.rmtree(args.log_dir / "overfit", ignore_errors=True)
    fit_full_batch(
        model,
        x_train,
        y_train,
        first,
        updates_per_epoch=UPDATES_PER_EPOCH,
        callbacks=[keras.callbacks.TensorBoard(str(args.log_dir / "overfit"))],
    )
    saved = args.log_dir / "overfit.keras"
    saved.parent.mkdir(parents=True, exist_ok=True)
    model.save(saved)
    rows = {"overfit (saved)": {**measure(model), "updates": first}}

    model = keras.saving.load_model(saved)
    rows[f"+ WeightDecay({DECAY_RATE:g})"] = continue_training(
        model, [kerasreg.WeightDecay(DECAY_RATE)], more, args.log_dir / "weight_decay"
    )
    model = keras.saving.load_model(saved)
    kerasreg.regularize(model, kernel=kerasreg.L2Penalty(PENALTY))
    rows[f"+ regularize(L2Penalty({PENALTY:g}))"] = continue_training(
        model, [], more, args.log_dir / "regularize_l2"
    )
    for factor in SHRINK_FACTORS:
        rows[f"kerasreg shrink --factor {factor:g}"] = shrink_with_cli(saved, factor)
    seconds = time.perf_counter() - start
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(rows, figure)

    print(
        f"{'model':<34} {'updates':>7} {'||W1||':>7} {'||W2||':>7} {'train':>6} "
        f"{'test':>6} {'test CE':>7}"
    )
    for name, row in rows.items():
        print(
            f"{name:<34} {row['updates']:>7} {row['hidden_l2']:>7.2f} "
            f"{row['output_l2']:>7.2f} {row['train']:>6.3f} {row['test']:>6.3f} "
            f"{row['test_loss']:>7.3f}"
        )
    print("(updates: of the overfit model, then the extra ones kept by EarlyStopping)")
    print(f"\n{seconds:.0f} s; saved models in {args.log_dir}; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {"rows": rows, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
