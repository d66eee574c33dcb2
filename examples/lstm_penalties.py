"""An LSTM with different penalties on its input and recurrent kernels, in TensorBoard.

Keras's recurrent layers take separate `kernel_regularizer` (input-to-hidden
weights) and `recurrent_regularizer` (hidden-to-hidden weights): the usual
advice for recurrent networks is to penalize the two differently (for
example Zaremba, Sutskever and Vinyals, "Recurrent Neural Network
Regularization", 2014, regularize only the non-recurrent connections). This
example trains `LSTM(32) -> Dense(1)` to forecast the next value of noisy sine
waves (random frequency and phase, made here with NumPy) with

    kernel_regularizer=L1Penalty(1e-4), recurrent_regularizer=L2Penalty(1e-3)

and logs it with `kerasreg.WeightNormLogger(per_gate=True)` next to Keras's
`TensorBoard` callback. The two penalties are two TensorBoard series,
`penalty/.../lstm_cell/kernel` and `penalty/.../lstm_cell/recurrent_kernel`,
and the L2 norms are split by gate (`norm_l2/<path>/gate_i`, `_f`, `_c`,
`_o`). The script reads them back from the event files with TensorBoard's own
reader (`EventAccumulator`), prints them beside `kerasreg.weight_norms`, and
compares with the same model trained without penalties. No published numbers:
this shows the logging; the table also gives each run's validation data loss
(`loss/data` in the `validation` run folder).

Runs go under `logs/lstm_penalties/<run>`, the figure to
`logs/lstm_penalties.png`.

    python examples/lstm_penalties.py           # 30 epochs
    python examples/lstm_penalties.py --quick   # 4 epochs, less data
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import kerasreg

LOG_ROOT = Path(__file__).resolve().parents[1] / "logs"
WINDOW = 24
PENALTIES = {
    "kernel": kerasreg.L1Penalty(1e-4),
    "recurrent": kerasreg.L2Penalty(1e-3),
}


def sine_windows(n: int, seed: int):
    """`n` windows of noisy sine waves; the target is the next (clean) value."""
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.1, 0.4, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    t = np.arange(WINDOW + 1)[None, :]
    wave = np.sin(freq * t + phase)
    x = wave[:, :WINDOW] + rng.normal(0, 0.2, (n, WINDOW))
    return x[..., None].astype("float32"), wave[:, WINDOW:].astype("float32")


def lstm_model(penalized: bool) -> keras.Model:
    keras.utils.set_random_seed(0)
    penalties = PENALTIES if penalized else {"kernel": None, "recurrent": None}
    model = keras.Sequential(
        [
            keras.Input((WINDOW, 1)),
            keras.layers.LSTM(
                32,
                kernel_regularizer=penalties["kernel"],
                recurrent_regularizer=penalties["recurrent"],
                name="lstm",
            ),
            keras.layers.Dense(1, name="forecast"),
        ],
        name="sine",
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    return model


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder, read with TensorBoard's reader.

    TF2 summaries are stored as tensors; `{tag: [(step, value), ...]}`.
    """
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [
            (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def train(penalized: bool, data, epochs: int, run_dir: Path) -> dict:
    (x, y), validation = data
    model = lstm_model(penalized)
    shutil.rmtree(run_dir, ignore_errors=True)
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=epochs,
        validation_data=validation,
        verbose=0,
        callbacks=[
            # The logger first: Keras's TensorBoard then logs its keys too.
            kerasreg.WeightNormLogger(str(run_dir), per_gate=True),
            keras.callbacks.TensorBoard(str(run_dir)),
        ],
    )
    cell = model.get_layer("lstm").cell
    return {
        "val_loss": history.history["val_loss"],
        "val_data_loss": [
            v for _, v in read_scalars(run_dir / "validation")["loss/data"]
        ],
        "norms": kerasreg.weight_norms(model, per_gate=True),
        "scalars": read_scalars(run_dir / "train"),
        "paths": {
            "kernel": kerasreg.selection.weight_paths(model)[id(cell.kernel)],
            "recurrent": kerasreg.selection.weight_paths(model)[
                id(cell.recurrent_kernel)
            ],
        },
        "weights": {
            "kernel": keras.ops.convert_to_numpy(cell.kernel),
            "recurrent": keras.ops.convert_to_numpy(cell.recurrent_kernel),
        },
    }


def plot(runs: dict, path: Path) -> None:
    fig, (pen, gates, val) = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    run = runs["penalized"]
    for role, color in (("kernel", "C0"), ("recurrent", "C1")):
        series = run["scalars"][f"penalty/{run['paths'][role]}"]
        steps, values = zip(*series, strict=True)
        label = f"{role}: {PENALTIES[role]!r}"
        pen.plot(steps, values, "o-", ms=3, color=color, label=label)
    pen.set(xlabel="epoch", title="penalty series (read from event files)")
    pen.legend(fontsize=8)
    width = 0.2
    for i, (name, hatch) in enumerate((("none", ""), ("penalized", "//"))):
        for j, role in enumerate(("kernel", "recurrent")):
            norms = runs[name]["norms"][runs[name]["paths"][role]]
            heights = [norms[f"l2/gate_{g}"] for g in "ifco"]
            x = np.arange(4) + (2 * j + i - 1.5) * width
            gates.bar(
                x,
                heights,
                width,
                color=f"C{j}",
                hatch=hatch,
                edgecolor="k",
                lw=0.3,
                label=f"{role}, {name}",
            )
    gates.set_xticks(range(4), ["input i", "forget f", "cell c", "output o"])
    gates.set(title="L2 norm per gate after training")
    gates.legend(fontsize=7, ncol=2, loc="upper center")
    gates.set_ylim(top=1.3 * gates.get_ylim()[1])
    for name, run in runs.items():
        curve = run["val_data_loss"]
        val.plot(np.arange(len(curve)), curve, label=name)  # step = epoch, as logged
    val.set(xlabel="epoch", yscale="log", title="validation data loss (loss/data)")
    val.legend(fontsize=8)
    fig.suptitle("LSTM: separate input and recurrent penalties")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 epochs, less data")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--log-dir", type=Path, default=LOG_ROOT / "lstm_penalties")
    args = parser.parse_args(argv)
    epochs, n = (4, 256) if args.quick else (args.epochs, 1024)

    start = time.perf_counter()
    data = (sine_windows(n, seed=0), sine_windows(n // 4, seed=1))
    runs = {
        name: train(name == "penalized", data, epochs, args.log_dir / name)
        for name in ("none", "penalized")
    }
    seconds = time.perf_counter() - start
    figure = args.log_dir.parent / f"{args.log_dir.name}.png"
    plot(runs, figure)

    run = runs["penalized"]
    print(
        "TensorBoard penalty series of the penalized run (last epoch), vs weight_norms:"
    )
    for role in ("kernel", "recurrent"):
        tag = f"penalty/{run['paths'][role]}"
        step, value = run["scalars"][tag][-1]
        direct = run["norms"][run["paths"][role]]["penalty"]
        print(f"  {tag:<46} step {step:>2}  {value:.5f}  (weight_norms {direct:.5f})")
    print(
        f"\n{'run':<10} {'weight':<18} {'l2':>6} "
        + " ".join(f"{'l2 ' + g:>6}" for g in "ifco")
        + f" {'val data loss':>13}"
    )
    for name, r in runs.items():
        for role in ("kernel", "recurrent"):
            norms = r["norms"][r["paths"][role]]
            gates = " ".join(f"{norms[f'l2/gate_{g}']:>6.3f}" for g in "ifco")
            print(
                f"{name:<10} {r['paths'][role].split('/')[-1]:<18} {norms['l2']:>6.3f} {gates} "
                f"{r['val_data_loss'][-1]:>13.4f}"
            )
    print(f"\n{seconds:.0f} s; figure: {figure}")
    print(f"tensorboard --logdir {args.log_dir}")
    return {"runs": runs, "seconds": seconds, "figure": figure}


if __name__ == "__main__":
    main()
