"""What a `kerasreg.sweep` of K penalties costs next to one plain `fit`.

    python benchmarks/sweep.py               # moons K=6, K=12 and a larger MLP
    python benchmarks/sweep.py --rounds 5
    python benchmarks/sweep.py --quick       # smoke run

Each timed call is what a user waits for, set-up included: the sweep call
(copies, stacked model, tracing, training) against one `fit` of a fresh copy
of the template (compile, tracing, training). K separate fits cost about K
times the latter. Calls are interleaved round after round (the order rotating,
`overhead.run_rounds`); the table gives the median, min and max over rounds of
time(sweep) / time(one fit) from the same round, in wall-clock and process CPU
time. Results are also written to `benchmarks/results/sweep.json`.

Workloads: Brownlee's two-moons network trained as Brownlee trains it (one
full-batch epoch at a time, validation after each, `steps_per_execution=1`),
where the per-epoch work of `fit` dominates; the same network (`Dense(500, relu) -> Dense(1,
sigmoid)`, 30 points, Adam, full batch, `steps_per_execution=100` on
TensorFlow and JAX) for K = 6 and K = 12 strengths, 4000 updates as in
`examples/moons.py`; and an MLP 256-1024-1024-10 on 4096 points (batch 128),
where compute dominates and the ratio grows toward K.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import kerasreg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from moons_problem import STEPS_PER_EXECUTION, moons_data, moons_model  # noqa: E402
from overhead import Call, machine, ratios, run_rounds  # noqa: E402


def plain_fit(template: keras.Model, x, y, **fit_kwargs) -> None:
    """One ordinary fit of a fresh copy of the template, compiled like it."""
    model = keras.models.clone_model(template)
    model.set_weights(template.get_weights())
    model.compile_from_config(template.get_compile_config())
    model.fit(x, y, verbose=0, **fit_kwargs)


def strengths(k: int) -> list:
    return [kerasreg.L2Penalty(float(a)) for a in np.logspace(-1, -6, k)]


def moons_workload(k: int, updates: int):
    (x, y), _ = moons_data()
    per_epoch = min(200, updates)
    x, y = np.tile(x, (per_epoch, 1)), np.tile(y, per_epoch)
    kwargs = dict(batch_size=30, epochs=updates // per_epoch, shuffle=False)
    template = moons_model()
    return template, x, y, kwargs, strengths(k)


def brownlee_workload(k: int, epochs: int):
    """Brownlee's own protocol: one full batch per epoch, validation every epoch."""
    (x, y), test = moons_data()
    kwargs = dict(batch_size=32, epochs=epochs, shuffle=False, validation_data=test)
    template = moons_model()
    template.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return template, x, y, kwargs, strengths(k)


def mlp_workload(k: int, epochs: int):
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
        steps_per_execution=STEPS_PER_EXECUTION // 10 or 1,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 256)).astype("float32")
    y = rng.integers(0, 10, size=4096)
    kwargs = dict(batch_size=128, epochs=epochs, shuffle=False)
    return template, x, y, kwargs, strengths(k)


def bench(name: str, workload, rounds: int) -> dict:
    template, x, y, kwargs, penalties = workload
    calls = [
        Call("one fit", lambda: plain_fit(template, x, y, **kwargs)),
        Call(
            f"sweep K={len(penalties)}",
            lambda: kerasreg.sweep(template, penalties, x, y, verbose=0, **kwargs),
        ),
    ]
    run_rounds(calls, rounds)
    r = ratios(calls[1], calls[0])
    return {
        "workload": name,
        "K": len(penalties),
        "one fit s": float(np.median(calls[0].times)),
        "sweep s": float(np.median(calls[1].times)),
        "ratio": r["median"],
        "min": r["min"],
        "max": r["max"],
        "cpu ratio": r["cpu_median"],
        "K fits / sweep": len(penalties) / r["median"],
        "rounds": r["rounds"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | K | one fit (s) | sweep (s) | sweep / one fit (wall) "
        "| min–max | CPU | K fits / sweep |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['K']} | {r['one fit s']:.1f} | "
            f"{r['sweep s']:.1f} | {r['ratio']:.2f} | {r['min']:.2f}–{r['max']:.2f} "
            f"| {r['cpu ratio']:.2f} | {r['K fits / sweep']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    updates = 400 if args.quick else 4000
    rounds = 1 if args.quick else args.rounds
    epochs = 100 if args.quick else 1000
    rows = [
        bench(
            f"moons, Brownlee's protocol ({epochs} one-batch epochs, validation)",
            brownlee_workload(6, epochs),
            rounds,
        ),
        bench("moons 4000 updates", moons_workload(6, updates), rounds),
        bench("moons 4000 updates", moons_workload(12, updates), rounds),
        bench("MLP 256-1024-1024-10", mlp_workload(6, 1 if args.quick else 3), rounds),
    ]
    if args.quick:
        for row in rows:
            row["workload"] = row["workload"].replace("4000", str(updates))
    print(machine())
    print(table(rows))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"sweep_{keras.backend.backend()}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
