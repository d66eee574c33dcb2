"""Per-step cost of the post-step transforms: decay toward a reference, soft-threshold.

    python benchmarks/poststep.py              # 7 rounds, all three workloads
    python benchmarks/poststep.py --rounds 5
    python benchmarks/poststep.py --quick      # smoke run
    python benchmarks/poststep.py --only deep

Times one `fit` epoch of the MLP, LSTM and deep-stack workloads of
`benchmarks/overhead.py` (its builders, data and timing harness, imported, not
copied) with, as callbacks, nothing; `WeightDecay(rate)` (decay to zero);
`WeightDecay(rate, toward="start")` (`w <- w - rate * (w - w_start)`, one
more read per weight); `SoftThreshold(t)`. All select the default weights
(trainable, `ndim >= 2`) and run after every optimizer update. Rounds are
interleaved (each round times every variant, the order rotating), and the
table gives median, min and max over rounds of time(variant) /
time(reference) from the same round (wall clock) and the median of the same
ratio in process CPU time. The goal for `toward=` and `SoftThreshold` is the
speed of `WeightDecay` (issue 12, "One machinery"). Results are also written
as JSON to `benchmarks/results/poststep.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
from overhead import (
    BUILDERS,
    RATE,
    RESULTS,
    Variant,
    compiled,
    data,
    ratios,
    run_rounds,
    table,
    write_report,
)

import kerasreg

# Small enough that few weights reach zero: the cost does not depend on it.
THRESHOLD = 1e-6

ROWS = (
    ("WeightDecay(toward='start')", "WeightDecay", "<= 1.05"),
    ("SoftThreshold", "WeightDecay", "<= 1.05"),
    ("WeightDecay", "no callback", "(report)"),
    ("WeightDecay(toward='start')", "no callback", "(report)"),
    ("SoftThreshold", "no callback", "(report)"),
)


def poststep_variants(kind: str, steps: int) -> dict[str, Variant]:
    build = BUILDERS[kind]
    x, y = data(kind, steps)
    callbacks = {
        "no callback": [],
        "WeightDecay": [kerasreg.WeightDecay(RATE)],
        "WeightDecay(toward='start')": [kerasreg.WeightDecay(RATE, toward="start")],
        "SoftThreshold": [kerasreg.SoftThreshold(THRESHOLD)],
    }
    return {
        name: Variant(name, compiled(build, kind), x, y, list(cbs))
        for name, cbs in callbacks.items()
    }


def bench(kind: str, steps: int, rounds: int) -> list[dict]:
    variants = poststep_variants(kind, steps)
    run_rounds(list(variants.values()), rounds)
    return [
        {
            "workload": kind,
            "group": "poststep",
            "variant": variant,
            "reference": reference,
            "goal": goal,
            **ratios(variants[variant], variants[reference]),
        }
        for variant, reference, goal in ROWS
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", choices=list(BUILDERS), action="append")
    parser.add_argument("--out", type=Path, default=RESULTS / "poststep.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    steps = {
        "mlp": 10 if args.quick else 60,
        "lstm": 4 if args.quick else 15,
        "deep": 10 if args.quick else 60,
    }
    rows: list[dict] = []
    for kind in args.only or list(BUILDERS):
        rows += bench(kind, steps[kind], rounds)
        print(table(rows), flush=True)
        keras.utils.clear_session()

    write_report("poststep", argv, args.out, rounds, steps, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
