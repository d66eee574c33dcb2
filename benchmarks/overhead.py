"""Overhead of kerasreg next to Keras's own mechanisms and hand-written code.

    python benchmarks/overhead.py             # full run (about 15 minutes on 2 cores)
    python benchmarks/overhead.py --rounds 11 # the README table
    python benchmarks/overhead.py --quick     # smoke run (about 2 minutes)
    python benchmarks/overhead.py --only norms
    python benchmarks/overhead.py --only mlp --group logger --only gradients
    python benchmarks/overhead.py --only mlp --group logger --rounds 11

Every variant is built once and warmed up; then, round after round, each
variant's `fit` (one epoch) is timed in turn, the order rotating every round.
For each comparison the script reports the median, min and max over rounds of
time(variant) / time(reference) from the same round (wall clock), and the
median of the same ratio in process CPU time, which other tenants of a shared
machine do not inflate: absolute times mean little there, ratios from the same
round do. Results are printed as a table and written as JSON to
`benchmarks/results/overhead.json`.

Workloads: an MLP 784-1024-1024-10 (1.86M parameters, batch 128), a two-layer
LSTM (128 units, sequences 50 x 32, batch 128), and, for weight decay only, a
deep stack of 40 Dense(128) layers (many small weights, where per-weight
Python loops cost most); `weight_norms` on a 25M-parameter model;
`gradient_norms` against one `train_on_batch` of the same MLP batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import kerasreg

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 0.001  # per-step shrink: w <- (1 - RATE) * w
LR = 0.01


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """Wall time and process CPU time (all threads) of `call()`."""
    start, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - start, time.process_time() - cpu


@dataclass
class Call:
    """One thing to time: any call (the norm benchmarks)."""

    name: str
    call: Callable[[], object]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    def run(self) -> tuple[float, float]:
        return timed(self.call)


@dataclass
class Variant:
    """One thing to time: a compiled model, its callbacks, its data."""

    name: str
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    callbacks: list = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    def run(self) -> tuple[float, float]:
        """Wall time and process CPU time (all threads) of one epoch."""
        return timed(
            lambda: self.model.fit(
                self.x,
                self.y,
                batch_size=128,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=self.callbacks,
            )
        )


# --- workloads --------------------------------------------------------------


def mlp(regularizer=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, "relu", kernel_regularizer=regularizer),
            keras.layers.Dense(1024, "relu", kernel_regularizer=regularizer),
            keras.layers.Dense(10, kernel_regularizer=regularizer),
        ],
        name="mlp",
    )


def lstm(regularizer=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((50, 32)),
            keras.layers.LSTM(
                128,
                return_sequences=True,
                kernel_regularizer=regularizer,
                recurrent_regularizer=regularizer,
            ),
            keras.layers.LSTM(
                128, kernel_regularizer=regularizer, recurrent_regularizer=regularizer
            ),
            keras.layers.Dense(10, kernel_regularizer=regularizer),
        ],
        name="lstm",
    )


def deep(regularizer=None) -> keras.Model:
    """Many small weights: 40 Dense(128) layers (0.67M parameters)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((128,))]
        + [
            keras.layers.Dense(128, "relu", kernel_regularizer=regularizer)
            for _ in range(40)
        ]
        + [keras.layers.Dense(10, kernel_regularizer=regularizer)],
        name="deep",
    )


BUILDERS = {"mlp": mlp, "lstm": lstm, "deep": deep}
INPUTS = {"mlp": (784,), "lstm": (50, 32), "deep": (128,)}


def data(kind: str, steps: int):
    rng = np.random.default_rng(0)
    n = 128 * steps
    shape = (n, *INPUTS[kind])
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 10, n)


def compiled(build, kind, optimizer=None, **regularizer):
    model = build(**regularizer)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# --- hand-written baselines users write today ---------------------------------


class EagerAssignLoop(keras.callbacks.Callback):
    """What users write by hand: one eager `assign` per weight after every batch."""

    def on_train_batch_end(self, batch, logs=None):
        for v in self.model.trainable_weights:
            if len(v.shape) >= 2:
                v.assign(v * (1.0 - RATE))


class SetWeightsLoop(keras.callbacks.Callback):
    """The other common hand-written form: a round trip through numpy."""

    def on_train_batch_end(self, batch, logs=None):
        self.model.set_weights(
            [w * (1.0 - RATE) if w.ndim >= 2 else w for w in self.model.get_weights()]
        )


class EmptyBatchHook(keras.callbacks.Callback):
    """A batch hook that does nothing: what any per-batch callback costs.

    Defining `on_train_batch_end` at all makes Keras convert the logs to
    Python numbers after every batch and turns off its asynchronous callback
    dispatch; a logger with `update_freq=N` cannot cost less than this.
    """

    def on_train_batch_end(self, batch, logs=None):
        pass


class MemoryFloor(keras.callbacks.Callback):
    """The memory floor of decay: one compiled read+write of the selected weights.

    Not a user-facing baseline: it measures what any per-step decay must at
    least cost (stream every selected weight in and out once), with the least
    callback machinery possible, so WeightDecay can be compared with it.
    """

    def __init__(self, model):
        super().__init__()
        import tensorflow as tf

        variables = [v.value for v in kerasreg.select_weights(model)]

        @tf.function(jit_compile=False)
        def scale(factor):
            for v in variables:
                v.assign(v * factor)

        self._scale = scale
        self._factor = tf.constant(1.0 - RATE)

    def on_train_batch_end(self, batch, logs=None):
        self._scale(self._factor)


# --- timing -----------------------------------------------------------------


def run_rounds(variants: list[Variant] | list[Call], rounds: int) -> None:
    for variant in variants:  # warm-up: trace and compile everything once
        variant.run()
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            gc.collect()
            wall, cpu = variant.run()
            variant.times.append(wall)
            variant.cpu_times.append(cpu)


def ratios(variant: Variant | Call, reference: Variant | Call) -> dict:
    values = [a / b for a, b in zip(variant.times, reference.times, strict=True)]
    cpu = [a / b for a, b in zip(variant.cpu_times, reference.cpu_times, strict=True)]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "cpu_median": statistics.median(cpu),
        "rounds": len(values),
    }


def decay_variants(kind: str, steps: int) -> dict[str, Variant]:
    build = BUILDERS[kind]
    x, y = data(kind, steps)
    v = {}
    v["no decay"] = Variant("no decay", compiled(build, kind), x, y)
    model = compiled(build, kind)
    v["WeightDecay"] = Variant("WeightDecay", model, x, y, [kerasreg.WeightDecay(RATE)])
    v["SGD(weight_decay)"] = Variant(
        "SGD(weight_decay)",
        compiled(build, kind, keras.optimizers.SGD(LR, weight_decay=RATE / LR)),
        x,
        y,
    )
    model = compiled(build, kind)
    v["eager assign loop"] = Variant(
        "eager assign loop", model, x, y, [EagerAssignLoop()]
    )
    model = compiled(build, kind)
    v["set_weights loop"] = Variant("set_weights loop", model, x, y, [SetWeightsLoop()])
    model = compiled(build, kind)
    v["memory floor"] = Variant("memory floor", model, x, y, [MemoryFloor(model)])
    return v


def penalty_variants(kind: str, steps: int) -> dict[str, Variant]:
    build = BUILDERS[kind]
    x, y = data(kind, steps)
    return {
        "keras L2": Variant(
            "keras L2",
            compiled(build, kind, regularizer=keras.regularizers.L2(1e-4)),
            x,
            y,
        ),
        "L2Penalty": Variant(
            "L2Penalty",
            compiled(build, kind, regularizer=kerasreg.L2Penalty(1e-4)),
            x,
            y,
        ),
    }


def logger_variants(kind: str, steps: int, log_root: Path) -> dict[str, Variant]:
    build = BUILDERS[kind]
    x, y = data(kind, steps)
    v = {"no callback": Variant("no callback", compiled(build, kind), x, y)}
    v["WeightNormLogger(epoch)"] = Variant(
        "WeightNormLogger(epoch)",
        compiled(build, kind),
        x,
        y,
        [kerasreg.WeightNormLogger(str(log_root / f"{kind}-epoch"))],
    )
    v["WeightNormLogger(10)"] = Variant(
        "WeightNormLogger(10)",
        compiled(build, kind),
        x,
        y,
        [kerasreg.WeightNormLogger(str(log_root / f"{kind}-10"), update_freq=10)],
    )
    v["WeightNormLogger(10, gradients)"] = Variant(
        "WeightNormLogger(10, gradients)",
        compiled(build, kind),
        x,
        y,
        [
            kerasreg.WeightNormLogger(
                str(log_root / f"{kind}-10-gradients"), update_freq=10, gradients=True
            )
        ],
    )
    v["empty batch hook"] = Variant(
        "empty batch hook", compiled(build, kind), x, y, [EmptyBatchHook()]
    )
    v["TensorBoard(histogram_freq=1)"] = Variant(
        "TensorBoard(histogram_freq=1)",
        compiled(build, kind),
        x,
        y,
        [keras.callbacks.TensorBoard(str(log_root / f"{kind}-tb"), histogram_freq=1)],
    )
    return v


def bench_training(
    kind: str,
    steps: int,
    rounds: int,
    log_root: Path,
    groups: tuple[str, ...] = ("penalty", "decay", "logger"),
) -> list[dict]:
    rows = []

    def row(group, variant, reference, goal, vs):
        r = ratios(vs[variant], vs[reference])
        rows.append(
            {
                "workload": kind,
                "group": group,
                "variant": variant,
                "reference": reference,
                "goal": goal,
                **r,
            }
        )

    variants = {
        "penalty": lambda: penalty_variants(kind, steps),
        "decay": lambda: decay_variants(kind, steps),
        "logger": lambda: logger_variants(kind, steps, log_root),
    }
    for group in ("penalty", "decay", "logger"):
        if group in groups:
            vs = variants[group]()
            run_rounds(list(vs.values()), rounds)
            for variant, reference, goal in COMPARISONS[group]:
                row(group, variant, reference, goal, vs)
    return rows


# Per group: (variant, reference, goal) rows of the table, in order.
COMPARISONS = {
    "penalty": [("L2Penalty", "keras L2", "<= 1.02")],
    "decay": [
        ("WeightDecay", "SGD(weight_decay)", "<= 1.00"),
        ("WeightDecay", "eager assign loop", "clearly < 1"),
        ("WeightDecay", "set_weights loop", "clearly < 1"),
        ("WeightDecay", "memory floor", "<= 1.2"),
        ("WeightDecay", "no decay", "(report)"),
        ("memory floor", "no decay", "(report)"),
        ("SGD(weight_decay)", "no decay", "(report)"),
        ("eager assign loop", "no decay", "(report)"),
    ],
    "logger": [
        ("WeightNormLogger(epoch)", "no callback", "<= 1.01"),
        ("WeightNormLogger(10)", "no callback", "<= 1.03"),
        ("WeightNormLogger(10)", "empty batch hook", "(report)"),
        ("empty batch hook", "no callback", "(report)"),
        ("WeightNormLogger(epoch)", "TensorBoard(histogram_freq=1)", "< 1"),
        ("TensorBoard(histogram_freq=1)", "no callback", "(report)"),
        ("WeightNormLogger(10, gradients)", "no callback", "<= 1.10"),
        ("WeightNormLogger(10, gradients)", "WeightNormLogger(10)", "(report)"),
    ],
}


def big_model(parameters: int) -> keras.Model:
    """About `parameters` weights in square Dense kernels of 2048 x 2048."""
    layers = max(1, round(parameters / (2048 * 2048)))
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((2048,))]
        + [
            keras.layers.Dense(2048, kernel_regularizer=kerasreg.L2Penalty(1e-4))
            for _ in range(layers)
        ],
        name="big",
    )


def bench_norms(parameters: int, rounds: int) -> list[dict]:
    """`weight_norms` vs one compiled sum of squares and vs a numpy loop."""
    import tensorflow as tf

    model = big_model(parameters)
    selected = kerasreg.select_weights(model)
    variables = [v.value for v in selected]

    @tf.function
    def one_read():
        # The least a norm logger can do: one compiled sum(w**2) per weight.
        return tf.stack([tf.reduce_sum(tf.square(v)) for v in variables])

    def numpy_loop():
        # What users write today: every weight copied to the host.
        stats = {}
        for v in selected:
            a = np.abs(keras.ops.convert_to_numpy(v))
            stats[v.path] = (
                a.sum(),
                np.sqrt((a * a).sum()),
                a.max(),
                (a < 1e-8).mean(),
            )
        return stats

    calls = {
        "weight_norms": Call("weight_norms", lambda: kerasreg.weight_norms(model)),
        "one compiled read": Call("one compiled read", lambda: one_read().numpy()),
        "numpy loop": Call("numpy loop", numpy_loop),
    }
    run_rounds(list(calls.values()), rounds)

    # Host memory: the norms must not copy the weights (4 bytes each) to the host.
    tracemalloc.start()
    kerasreg.weight_norms(model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = sum(int(np.prod(v.shape)) for v in model.weights)
    rows = []
    for reference, goal in (("one compiled read", "<= 2"), ("numpy loop", "(report)")):
        rows.append(
            {
                "workload": f"dense {n / 1e6:.1f}M params",
                "group": "norms",
                "variant": "weight_norms",
                "reference": reference,
                "goal": goal,
                **ratios(calls["weight_norms"], calls[reference]),
            }
        )
    rows[0]["host_peak_bytes"] = peak
    rows[0]["weight_bytes"] = 4 * n
    return rows


def bench_gradients(rounds: int) -> list[dict]:
    """`gradient_norms` vs one `train_on_batch` of the same batch (the MLP, 128)."""
    x, y = data("mlp", 1)
    model = compiled(mlp, "mlp", regularizer=kerasreg.L2Penalty(1e-4))
    repeat = 10  # calls per timing: one call is a few milliseconds

    def times(call):
        return lambda: [call() for _ in range(repeat)]

    calls = {
        "gradient_norms": Call(
            "gradient_norms", times(lambda: kerasreg.gradient_norms(model, x, y))
        ),
        "train_on_batch": Call(
            "train_on_batch", times(lambda: model.train_on_batch(x, y))
        ),
    }
    run_rounds(list(calls.values()), rounds)
    return [
        {
            "workload": "mlp, one batch of 128",
            "group": "gradients",
            "variant": "gradient_norms",
            "reference": "train_on_batch",
            "goal": "<= 1.5",
            **ratios(calls["gradient_norms"], calls["train_on_batch"]),
        }
    ]


def machine() -> str:
    import tensorflow as tf

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Keras {keras.__version__} "
        f"({keras.backend.backend()}), TensorFlow {tf.__version__}"
    )


def table(rows: list[dict], digits: int = 3) -> str:
    lines = [
        "| workload | variant | vs | median (wall) | min–max | median (CPU) | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = f".{digits}f"
        cpu = format(r["cpu_median"], f) if "cpu_median" in r else "–"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r['reference']} | "
            f"{r['median']:{f}} | {r['min']:{f}}–{r['max']:{f}} | {cpu} | {r['goal']} |"
        )
    extra = [r for r in rows if "host_peak_bytes" in r]
    for r in extra:
        lines.append(
            f"\nweight_norms host peak memory: {r['host_peak_bytes'] / 1e6:.2f} MB "
            f"(weights: {r['weight_bytes'] / 1e6:.0f} MB)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--only",
        choices=["mlp", "lstm", "deep", "norms", "gradients"],
        action="append",
    )
    parser.add_argument(
        "--group",
        choices=["penalty", "decay", "logger"],
        action="append",
        help="only these groups of the training workloads (default: all)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        parser.error(
            "the benchmark compares TensorFlow-backend mechanisms; "
            "run it with KERAS_BACKEND=tensorflow"
        )
    rounds = args.rounds or (2 if args.quick else 7)
    steps = {
        "mlp": 10 if args.quick else 60,
        "lstm": 4 if args.quick else 15,
        "deep": 10 if args.quick else 60,
    }
    parameters = 4_000_000 if args.quick else 25_000_000
    only = args.only or ["mlp", "lstm", "deep", "norms", "gradients"]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as log_root:
        for kind in ("mlp", "lstm", "deep"):
            if kind in only:
                # The deep stack of small weights only for decay, where the
                # per-weight cost of hand-written loops shows.
                groups = (
                    ("decay",) if kind == "deep" else ("penalty", "decay", "logger")
                )
                groups = tuple(g for g in groups if g in (args.group or groups))
                rows += bench_training(
                    kind, steps[kind], rounds, Path(log_root), groups
                )
                print(table(rows), flush=True)
                keras.utils.clear_session()
    if "norms" in only:
        rows += bench_norms(parameters, max(3 * rounds, 21))
    if "gradients" in only:
        rows += bench_gradients(max(3 * rounds, 21))

    write_report("overhead", argv, args.out, rounds, steps, rows)
    return 0


def write_report(
    name: str,
    argv: list[str] | None,
    out: Path,
    rounds: int,
    steps: dict[str, int],
    rows: list[dict],
) -> None:
    """Write `benchmarks/<name>.py`'s JSON report to `out` and print its table."""
    report = {
        "command": " ".join(
            [f"python benchmarks/{name}.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "rounds": rounds,
        "steps_per_epoch": steps,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}; {rounds} rounds\n")
    print(table(rows))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
