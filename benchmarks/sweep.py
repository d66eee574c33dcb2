"""What a `kerasreg.sweep` of K penalties costs next to one fit and to K separate fits.

    python benchmarks/sweep.py                    # every workload, 3 rounds
    python benchmarks/sweep.py --rounds 5 --only digits
    python benchmarks/sweep.py --engine vectorized  # force an engine
    python benchmarks/sweep.py --memory           # peak memory, one process per call
    python benchmarks/sweep.py --no-separate      # sweep and one fit only
    python benchmarks/sweep.py --floor            # + one fit doing K times the arithmetic
    python benchmarks/sweep.py --quick            # smoke run
    python benchmarks/sweep.py --early-stopping   # sweep + EarlyStopping vs none
    python benchmarks/sweep.py --fixed-cost       # time per epoch vs set-up time

Each timed call is what a user waits for, set-up included: the sweep call
(copies, the engine's model, tracing, training); one `fit` of a fresh copy
of the template (compile, tracing, training); and K separate fits (K fresh
copies, each with its own penalty, compiled and fitted one after another:
what a user without `sweep` runs). Calls are interleaved round after round
(the order rotating, `overhead.run_rounds`); the table gives the median, min
and max over rounds of time(sweep) / time(one fit) and time(sweep) / time(K
separate fits) from the same round, in wall-clock time. `--floor` adds one
fit of the template on each sample repeated K times with a K times larger
batch (`k_wide`): the same steps and weights as one fit, K times the
arithmetic per step, one fit's overhead; time(that fit) / time(one fit) is
what the arithmetic alone costs, below which no one-fit engine can go.
Results are also
written to `benchmarks/results/sweep_<backend>.json`.

Workloads (K=6 strengths unless noted):

- digits (scikit-learn's `load_digits`, 8x8x1 images, 10 classes; 5 epochs,
  batch 32, `validation_split=0.2`, Adam): a Flatten-MLP (Dense 128), the
  same with `Dropout(0.2, seed=1)`, and a CNN (two Conv2D 16, Dense 64);
- moons as Brownlee trains it: `Dense(500, relu) -> Dense(1, sigmoid)`, 150
  one-batch epochs with validation after each;
- a compute-bound MLP 256-1024-1024-10 on 4096 points (batch 128).

`--early-stopping` times instead, per workload: the sweep without callbacks;
the same sweep with `EarlyStopping(patience=2, restore_best_weights=True)`
(on `val_loss`, else `loss`; one fit in which variants stop at their own
epochs); the same with a patience no variant reaches (`EarlyStopping`'s
per-epoch cost alone: every variant runs every epoch); and K separate fits
each with its own `EarlyStopping(patience=2, restore_best_weights=True)`.
Ratios are to the sweep without callbacks (and to the K early-stopped fits),
median over interleaved rounds.

`--memory` runs each call of each workload once in a fresh Python process
and reports its peak resident memory (`ru_maxrss`), next to one fit's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import kerasreg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from moons_problem import moons_data, moons_model  # noqa: E402
from overhead import Call, machine, ratios, run_rounds  # noqa: E402

K = 6


def strengths(k: int) -> list:
    return [kerasreg.L2Penalty(float(a)) for a in np.logspace(-1, -6, k)]


def copy_of(template: keras.Model, penalty=None) -> keras.Model:
    """A fresh copy of the template, compiled like it, with `penalty` on its kernels."""
    model = keras.models.clone_model(template)
    model.set_weights(template.get_weights())
    if penalty is not None:
        kerasreg.regularize(model, kernel=penalty)
    model.compile_from_config(template.get_compile_config())
    return model


def one_fit(template, x, y, **fit_kwargs) -> None:
    copy_of(template).fit(x, y, verbose=0, **fit_kwargs)


def k_wide(x, y, k: int, **fit_kwargs):
    """`(x, y, fit_kwargs)` of one fit doing K variants' arithmetic at one
    fit's overhead: each sample repeated K times, the batch K times larger, so
    the steps, the gradients and the trained weights are those of one fit (a
    mean loss over K equal copies) while each step computes K times as much.
    No engine can train K variants in one fit for less than this fit costs."""
    kwargs = dict(fit_kwargs)
    split = kwargs.pop("validation_split", 0.0)
    if split:  # Keras's own rule: the last part, from floor(n * (1 - split))
        at = int(np.floor(len(x) * (1.0 - split)))
        kwargs["validation_data"] = (x[at:], y[at:])
        x, y = x[:at], y[:at]
    if kwargs.get("validation_data") is not None:
        vx, vy = kwargs["validation_data"]
        kwargs["validation_data"] = (np.repeat(vx, k, 0), np.repeat(vy, k, 0))
    kwargs["batch_size"] = k * kwargs.get("batch_size", 32)
    return np.repeat(x, k, 0), np.repeat(y, k, 0), kwargs


def separate_fits(template, penalties, x, y, **fit_kwargs) -> list[dict]:
    """What a user without `sweep` runs: K ordinary fits, one after another
    (their histories)."""
    return [
        copy_of(template, penalty).fit(x, y, verbose=0, **fit_kwargs).history
        for penalty in penalties
    ]


# --- workloads: (template, x, y, fit kwargs, penalties) ---------------------------


def digits_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return x, digits.target.astype("int32")


def digits(kind: str, epochs: int = 5, k: int = K):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1)), keras.layers.Flatten()]
    if kind == "cnn":
        layers = [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
        ]
    else:
        layers.append(keras.layers.Dense(128, activation="relu"))
        if kind == "dropout":
            layers.append(keras.layers.Dropout(0.2, seed=1))
    layers.append(keras.layers.Dense(10, activation="softmax"))
    template = keras.Sequential(layers, name=f"digits_{kind}")
    template.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    x, y = digits_data()
    kwargs = dict(epochs=epochs, batch_size=32, validation_split=0.2, shuffle=False)
    return template, x, y, kwargs, strengths(k)


def brownlee(epochs: int = 150, k: int = K):
    """Brownlee's own protocol: one full batch per epoch, validation every epoch."""
    (x, y), test = moons_data()
    template = moons_model()
    template.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    kwargs = dict(batch_size=32, epochs=epochs, shuffle=False, validation_data=test)
    return template, x, y, kwargs, strengths(k)


def mlp(epochs: int = 3, k: int = K):
    keras.utils.set_random_seed(0)
    template = keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(1024, "relu"),
            keras.layers.Dense(1024, "relu"),
            keras.layers.Dense(10),
        ],
        name="mlp",
    )
    template.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 256)).astype("float32")
    y = rng.integers(0, 10, size=4096)
    kwargs = dict(batch_size=128, epochs=epochs, shuffle=False)
    return template, x, y, kwargs, strengths(k)


WORKLOADS = {
    "digits-mlp": ("digits Flatten-MLP 128", lambda q: digits("mlp", 1 if q else 5)),
    "digits-dropout": (
        "digits + Dropout(0.2, seed)",
        lambda q: digits("dropout", 1 if q else 5),
    ),
    "digits-cnn": (
        "digits CNN (Conv2D 16 x2, Dense 64)",
        lambda q: digits("cnn", 1 if q else 5),
    ),
    "moons": ("moons, 150 one-batch epochs", lambda q: brownlee(15 if q else 150)),
    "mlp": ("compute-bound MLP 256-1024-1024-10", lambda q: mlp(1 if q else 3)),
}

# Each workload at a given number of epochs (`--fixed-cost`).
BY_EPOCHS = {
    "digits-mlp": lambda epochs: digits("mlp", epochs),
    "digits-dropout": lambda epochs: digits("dropout", epochs),
    "digits-cnn": lambda epochs: digits("cnn", epochs),
    "moons": brownlee,
    "mlp": mlp,
}


# --- timing ------------------------------------------------------------------------


def bench(
    name: str, workload, rounds: int, engine: str, separate=True, floor=False
) -> dict:
    template, x, y, kwargs, penalties = workload
    k = len(penalties)
    used = {}
    wide = k_wide(x, y, k, **kwargs)

    def run_sweep():
        result = kerasreg.sweep(
            template, penalties, x, y, verbose=0, engine=engine, **kwargs
        )
        used["engine"], used["reason"] = result.engine, result.engine_reason

    calls = [
        Call("one fit", lambda: one_fit(template, x, y, **kwargs)),
        Call(f"sweep K={k}", run_sweep),
    ]
    if separate:
        calls.append(
            Call(
                f"{k} separate fits",
                lambda: separate_fits(template, penalties, x, y, **kwargs),
            )
        )
    if floor:
        calls.append(
            Call(
                f"one fit, {k}x the batch",
                lambda: one_fit(template, *wide[:2], **wide[2]),
            )
        )
    run_rounds(calls, rounds)
    per_fit = ratios(calls[1], calls[0])
    nan = float("nan")
    per_k = (
        ratios(calls[1], calls[2]) if separate else dict(median=nan, min=nan, max=nan)
    )
    per_floor = (
        ratios(calls[-1], calls[0]) if floor else dict(median=nan, min=nan, max=nan)
    )
    return {
        "workload": name,
        "K": k,
        "engine": used["engine"],
        "engine_reason": used["reason"],
        "one fit s": float(np.median(calls[0].times)),
        "sweep s": float(np.median(calls[1].times)),
        "K fits s": float(np.median(calls[2].times)) if separate else nan,
        "sweep / one fit": per_fit["median"],
        "min": per_fit["min"],
        "max": per_fit["max"],
        "sweep / K fits": per_k["median"],
        "K fits min": per_k["min"],
        "K fits max": per_k["max"],
        "K-wide fit / one fit": per_floor["median"],
        "K-wide min": per_floor["min"],
        "K-wide max": per_floor["max"],
        "rounds": per_fit["rounds"],
    }


def per_epoch_and_fixed(short: float, long: float, epochs: int) -> tuple:
    """`(time per epoch, time before the first epoch)` of a call that took
    `short` seconds for `epochs` epochs and `long` for 3 x `epochs`."""
    per_epoch = (long - short) / (2 * epochs)
    return per_epoch, short - epochs * per_epoch


def bench_fixed_cost(key: str, rounds: int, engine: str, quick: bool) -> dict:
    """Time per epoch and time before the first epoch (trace, compile, set-up),
    of the sweep, one fit and the K-wide fit, from fits of E and 3E epochs.

    In each round every call runs at E and at 3E epochs (E: the workload's
    own); per epoch = (t(3E) - t(E)) / 2E, fixed = t(E) - E * per epoch; the
    ratios sweep / one fit of each are taken within the round, median over
    rounds. A sweep above its goal only by its fixed cost gets within the
    goal as the fit gets longer.
    """
    build = BY_EPOCHS[key]
    short = WORKLOADS[key][1](quick)
    epochs = short[3]["epochs"]
    long = build(3 * epochs)
    used = {}
    calls = []
    for label, (template, x, y, kwargs, penalties) in (("E", short), ("3E", long)):
        wide = k_wide(x, y, len(penalties), **kwargs)

        def run_sweep(t=template, p=penalties, a=(x, y), k=kwargs):
            result = kerasreg.sweep(t, p, *a, verbose=0, engine=engine, **k)
            used["engine"] = result.engine

        calls += [
            Call(
                f"one fit {label}",
                lambda t=template, a=(x, y), k=kwargs: one_fit(t, *a, **k),
            ),
            Call(f"sweep {label}", run_sweep),
            Call(
                f"K-wide fit {label}",
                lambda t=template, w=wide: one_fit(t, *w[:2], **w[2]),
            ),
        ]
    run_rounds(calls, rounds)
    fit, swept, wide = (
        [(a, b) for a, b in zip(calls[i].times, calls[i + 3].times, strict=True)]
        for i in range(3)
    )

    def split(pair):
        return per_epoch_and_fixed(*pair, epochs)

    row = {"workload": WORKLOADS[key][0], "K": len(short[4]), "epochs": epochs}
    row["engine"] = used["engine"]
    for name, times in (("sweep", swept), ("K-wide", wide)):
        for part, index in (("per epoch", 0), ("fixed", 1)):
            values = [
                split(mine)[index] / split(reference)[index]
                for mine, reference in zip(times, fit, strict=True)
            ]
            row[f"{name} / fit {part}"] = float(np.median(values))
    for name, times in (("one fit", fit), ("sweep", swept), ("K-wide", wide)):
        per_epoch, fixed = zip(*(split(t) for t in times), strict=True)
        row[f"{name} per epoch s"] = float(np.median(per_epoch))
        row[f"{name} fixed s"] = float(np.median(fixed))
    row["rounds"] = rounds
    return row


def fixed_cost_table(rows: list[dict]) -> str:
    lines = [
        "| workload | K | engine | E | per epoch (s): fit / sweep / K-wide "
        "| fixed (s): fit / sweep / K-wide | sweep / fit, per epoch "
        "| sweep / fit, fixed | K-wide / fit, per epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['K']} | {r['engine']} | {r['epochs']} "
            f"| {r['one fit per epoch s']:.3f} / {r['sweep per epoch s']:.3f} / "
            f"{r['K-wide per epoch s']:.3f} "
            f"| {r['one fit fixed s']:.2f} / {r['sweep fixed s']:.2f} / "
            f"{r['K-wide fixed s']:.2f} "
            f"| {r['sweep / fit per epoch']:.2f} | {r['sweep / fit fixed']:.2f} "
            f"| {r['K-wide / fit per epoch']:.2f} |"
        )
    return "\n".join(lines)


def stopping(kwargs, patience: int) -> keras.callbacks.EarlyStopping:
    has_validation = kwargs.get("validation_data") is not None or kwargs.get(
        "validation_split"
    )
    return keras.callbacks.EarlyStopping(
        monitor="val_loss" if has_validation else "loss",
        patience=patience,
        restore_best_weights=True,
    )


def bench_early_stopping(name: str, workload, rounds: int, engine: str) -> dict:
    """The sweep with EarlyStopping next to the same sweep without callbacks."""
    template, x, y, kwargs, penalties = workload
    k = len(penalties)
    used = {}
    epochs = kwargs.get("epochs", 1)

    def run_sweep(patience=None):
        extra = {} if patience is None else {"callbacks": [stopping(kwargs, patience)]}
        result = kerasreg.sweep(
            template, penalties, x, y, verbose=0, engine=engine, **kwargs, **extra
        )
        if patience == 2:
            used["engine"], used["reason"] = result.engine, result.engine_reason
            used["epochs"] = [row["epochs"] for row in result.rows]

    calls = [
        Call("sweep, no callbacks", run_sweep),
        Call("sweep + EarlyStopping(patience=2)", lambda: run_sweep(2)),
        Call("sweep + EarlyStopping (never stops)", lambda: run_sweep(epochs + 1)),
        Call(
            f"{k} separate early-stopped fits",
            lambda: separate_fits(
                template, penalties, x, y, callbacks=[stopping(kwargs, 2)], **kwargs
            ),
        ),
    ]
    run_rounds(calls, rounds)
    stopped = ratios(calls[1], calls[0])
    never = ratios(calls[2], calls[0])
    per_k = ratios(calls[1], calls[3])
    return {
        "workload": name,
        "K": k,
        "engine": used["engine"],
        "engine_reason": used["reason"],
        "epochs per variant": used["epochs"],
        "sweep s": float(np.median(calls[0].times)),
        "sweep + ES s": float(np.median(calls[1].times)),
        "sweep + ES never s": float(np.median(calls[2].times)),
        "K ES fits s": float(np.median(calls[3].times)),
        "ES / sweep": stopped["median"],
        "ES / sweep min": stopped["min"],
        "ES / sweep max": stopped["max"],
        "ES never / sweep": never["median"],
        "ES never / sweep min": never["min"],
        "ES never / sweep max": never["max"],
        "ES / K ES fits": per_k["median"],
        "rounds": stopped["rounds"],
    }


def early_stopping_table(rows: list[dict]) -> str:
    lines = [
        "| workload | K | engine | epochs per variant | sweep (s) | + ES (s) "
        "| + ES / sweep (min–max) | ES never stopping / sweep (min–max) "
        "| + ES / K early-stopped fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['K']} | {r['engine']} "
            f"| {' '.join(map(str, r['epochs per variant']))} "
            f"| {r['sweep s']:.1f} | {r['sweep + ES s']:.1f} "
            f"| {r['ES / sweep']:.2f} ({r['ES / sweep min']:.2f}–"
            f"{r['ES / sweep max']:.2f}) "
            f"| {r['ES never / sweep']:.2f} ({r['ES never / sweep min']:.2f}–"
            f"{r['ES never / sweep max']:.2f}) "
            f"| {r['ES / K ES fits']:.2f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | K | engine | one fit (s) | sweep (s) | K fits (s) "
        "| sweep / one fit (min–max) | sweep / K separate fits (min–max) "
        "| K-wide fit / one fit (min–max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['K']} | {r['engine']} | {r['one fit s']:.1f} "
            f"| {r['sweep s']:.1f} | {r['K fits s']:.1f} "
            f"| {r['sweep / one fit']:.2f} ({r['min']:.2f}–{r['max']:.2f}) "
            f"| {r['sweep / K fits']:.2f} ({r['K fits min']:.2f}–{r['K fits max']:.2f}) "
            f"| {r['K-wide fit / one fit']:.2f} "
            f"({r['K-wide min']:.2f}–{r['K-wide max']:.2f}) |"
        )
    return "\n".join(lines)


# --- peak memory -------------------------------------------------------------------


def peak_memory(workload: str, call: str, engine: str, quick: bool) -> float:
    """Peak resident memory (MiB) of one `call` of `workload` in a fresh process."""
    code = (
        "import sys, resource; sys.argv = ['sweep.py']\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import sweep as b\n"
        f"template, x, y, kwargs, penalties = b.WORKLOADS[{workload!r}][1]({quick})\n"
        f"if {call!r} == 'one fit':\n"
        "    b.one_fit(template, x, y, **kwargs)\n"
        "else:\n"
        "    b.kerasreg.sweep(template, penalties, x, y, verbose=0,"
        f" engine={engine!r}, **kwargs)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1]) / 1024  # Linux reports KiB


def memory_table(names: list[str], engine: str, quick: bool) -> tuple[str, list]:
    rows = []
    for key in names:
        one = peak_memory(key, "one fit", engine, quick)
        swept = peak_memory(key, "sweep", engine, quick)
        rows.append(
            {"workload": WORKLOADS[key][0], "one fit MiB": one, "sweep MiB": swept}
        )
    lines = [
        "| workload | one fit, peak RSS (MiB) | sweep K=6, peak RSS (MiB) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['workload']} | {r['one fit MiB']:.0f} | {r['sweep MiB']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument(
        "--no-separate",
        action="store_true",
        help="skip timing K separate fits (the costliest call)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time one fit with each sample repeated K times and a K times "
        "larger batch: K variants' arithmetic at one fit's overhead",
    )
    parser.add_argument(
        "--early-stopping",
        action="store_true",
        help="time the sweep with EarlyStopping against the same sweep without "
        "callbacks and against K early-stopped separate fits",
    )
    parser.add_argument(
        "--fixed-cost",
        action="store_true",
        help="split each call's time into time per epoch and time before the "
        "first epoch (fits of E and 3E epochs)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help=f"workloads: {', '.join(WORKLOADS)}"
    )
    args = parser.parse_args(argv)
    names = [
        key
        for key in WORKLOADS
        if not args.only or any(part in key for part in args.only)
    ]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    print(machine(), f"backend {keras.backend.backend()}, engine={args.engine}")
    if args.memory:
        text, rows = memory_table(names, args.engine, args.quick)
        print(text)
        path = out / f"sweep_memory_{keras.backend.backend()}.json"
        path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return 0
    rounds = 1 if args.quick else args.rounds
    if args.early_stopping:
        path = out / f"sweep_early_stopping_{keras.backend.backend()}.json"
        rows = []
        for key in names:
            workload = WORKLOADS[key][1](args.quick)
            rows.append(
                bench_early_stopping(WORKLOADS[key][0], workload, rounds, args.engine)
            )
            print(early_stopping_table(rows[-1:]).splitlines()[-1], flush=True)
            path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        print(early_stopping_table(rows))
        for row in rows:
            print(f"{row['workload']}: {row['engine']} ({row['engine_reason']})")
        return 0
    if args.fixed_cost:
        path = out / f"sweep_fixed_cost_{keras.backend.backend()}.json"
        rows = []
        for key in names:
            rows.append(bench_fixed_cost(key, rounds, args.engine, args.quick))
            print(fixed_cost_table(rows[-1:]).splitlines()[-1], flush=True)
            path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        print(fixed_cost_table(rows))
        return 0
    path = out / f"sweep_{keras.backend.backend()}.json"
    rows = []
    for key in names:  # each row printed and saved as soon as it is measured
        workload = WORKLOADS[key][1](args.quick)
        row = bench(
            WORKLOADS[key][0],
            workload,
            rounds,
            args.engine,
            not args.no_separate,
            args.floor,
        )
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(table(rows))
    for row in rows:
        print(f"{row['workload']}: {row['engine']} ({row['engine_reason']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
