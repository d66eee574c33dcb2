"""A regularization study, end to end: how much weight decay, and is L2 the same?

The weight-decay FAQ asks "which weight decay should I use, and should I add
an L2 penalty too?", and answers: search a log-scale grid, judge on
validation data, stop each run early, and repeat over seeds before trusting a
difference. Under Adam the two knobs are not the same thing (Loshchilov and
Hutter, 2019): an L2 penalty's gradient is rescaled by Adam, a decoupled decay
`w <- (1 - rate) * w` is not. This script runs that study with one
`kerasreg.sweep` call:

- data: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels
  scaled to [0, 1], split 50 % train / 20 % validation / 30 % test
  (stratified, fixed seed);
- model: `Dense(128, relu) -> Dense(10, softmax)`, Adam 1e-3, batch 32;
- grid: `L2Penalty(l2)` for l2 in 1e-5, 1e-4, 1e-3, crossed with
  `WeightDecay(rate)` for rate in 1e-5, 1e-4, 1e-3 (per update), baselines
  included (`kerasreg.product`): 16 grid points, on the kernels;
- 3 seeds per grid point (initial weights drawn under each seed);
- `EarlyStopping(monitor="val_loss", restore_best_weights=True)` per run:
  each run keeps the weights of its own best epoch.

It prints the table (mean +- standard deviation over seeds of the metrics at
each run's best epoch), draws the validation curve with its spread
(`logs/weight_decay_study.png`), writes `runs.csv` and `points.csv`, one
TensorBoard run per grid point and seed with the HParams table, and saves the
best grid point's best run to `best.keras`, reloads it and evaluates it on
the test set.

    python examples/weight_decay_study.py           # 4 x 4 points, 3 seeds
    python examples/weight_decay_study.py --quick   # 2 x 2 points, 2 seeds, short
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import kerasreg

LOG_ROOT = Path(__file__).resolve().parents[1] / "logs"


def digits():
    """Train, validation and test splits of scikit-learn's bundled digits."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=2 / 7, stratify=y_rest, random_state=0
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def template() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ],
        name="digits_mlp",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 2 grid, 2 seeds")
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "weight_decay_study")
    args = parser.parse_args(argv)
    if args.quick:
        l2, rates, seeds, epochs, patience = [1e-3], [1e-3], [0, 1], 8, 2
    else:
        l2 = kerasreg.log_range(1e-5, 1e-3)
        rates = kerasreg.log_range(1e-5, 1e-3)
        seeds, epochs, patience = [0, 1, 2], 150, 10

    train, validation, test = digits()
    grid = kerasreg.product(
        [None, *kerasreg.grid(kerasreg.L2Penalty, l2)],
        [None, *kerasreg.grid(kerasreg.WeightDecay, rates)],
    )
    shutil.rmtree(args.log_dir, ignore_errors=True)
    start = time.perf_counter()
    result = kerasreg.sweep(
        template(),
        grid,
        *train,
        seeds=seeds,
        epochs=epochs,
        batch_size=32,
        validation_data=validation,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=patience, restore_best_weights=True
            )
        ],
        log_dir=args.log_dir,
        verbose=0,
    )
    seconds = time.perf_counter() - start

    best = result.best("val_accuracy")  # the grid point with the best mean
    model = result.best_model("val_accuracy")  # its best seed
    path = args.log_dir / "best.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    _, test_accuracy = reloaded.evaluate(*test, verbose=0)
    same = np.allclose(
        reloaded.predict(test[0], verbose=0), model.predict(test[0], verbose=0)
    )
    figure = result.plot(
        args.log_dir.parent / f"{args.log_dir.name}.png", metric="accuracy"
    )
    result.to_csv(args.log_dir / "runs.csv")
    result.to_csv(args.log_dir / "points.csv", summary=True)
    points = result.summary()
    (args.log_dir / "results.json").write_text(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "seeds": seeds,
                "best": best["penalty"],
                "test_accuracy": test_accuracy,
                "points": [
                    {k: e[k] for k in ("penalty", "family", "values", "runs")}
                    | {"val_accuracy": e["val_accuracy"], "epochs": e["best_epoch"]}
                    for e in points
                ],
            },
            indent=2,
        )
    )

    print(result)
    print(
        f"\nbest by mean val_accuracy: {best['penalty']} "
        f"({best['val_accuracy']:.4f} +- {best['val_accuracy_std']:.4f} over "
        f"{len(best['runs'])} seeds)"
    )
    print(
        f"saved and reloaded {path.name}: test accuracy {test_accuracy:.4f}, "
        f"predictions {'equal' if same else 'DIFFERENT'}"
    )
    print(
        f"\n{len(result.rows)} runs ({len(points)} grid points x {len(seeds)} "
        f"seeds, engine {result.engine}) in {seconds:.0f} s; figure: {figure}"
    )
    print(f"tensorboard --logdir {args.log_dir}")
    return {
        "result": result,
        "best": best,
        "test_accuracy": test_accuracy,
        "reloaded_equal": same,
        "saved": path,
        "figure": Path(figure),
        "test": test,
    }


if __name__ == "__main__":
    main()
