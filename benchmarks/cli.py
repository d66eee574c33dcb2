"""Benchmark of `kerasreg inspect` / `kerasreg shrink`: memory, throughput, start-up.

Writes a valid `.keras` file whose Dense kernel is at least `--mib` MiB
(512 by default), directly with h5py and numpy (no training, no Keras), then
measures, each in a fresh subprocess and interleaved over `--rounds` rounds:

- peak resident memory (`VmHWM`, else `ru_maxrss`) of `inspect`, of `shrink`, and of a plain
  h5py full read of the same datasets, each minus the peak of a process that
  only imports the same modules (the interpreter baseline);
- throughput (MB/s of weights processed) of the three;
- start-up: wall time of `python -m kerasreg --help` vs `python -c pass`.

Run:  python benchmarks/cli.py [--mib 512] [--rounds 3] [--folder DIR]
Results are medians over rounds; ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def keras_config(rows: int, units: int) -> dict:
    """The config.json Keras writes for `Sequential([Input((rows,)), Dense(units)])`."""
    dense = {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {
            "name": "dense",
            "trainable": True,
            "dtype": "float32",
            "units": units,
            "activation": "linear",
            "use_bias": True,
            "kernel_regularizer": {
                "module": "kerasreg.penalties",
                "class_name": "L2Penalty",
                "config": {"l2": 0.001},
                "registered_name": "kerasreg>L2Penalty",
            },
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, rows]},
    }
    inputs = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {"batch_shape": [None, rows], "dtype": "float32", "name": "input"},
        "registered_name": None,
    }
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "sequential", "trainable": True, "layers": [inputs, dense]},
        "registered_name": None,
        "build_config": {"input_shape": [None, rows]},
    }


def write_model(path: Path, mib: float, units: int = 1024, seed: int = 0) -> int:
    """Write a `.keras` file with a float32 kernel of about `mib` MiB.

    The kernel is written in blocks, so this needs little memory itself.
    Returns the kernel's size in bytes.
    """
    rows = max(1, int(mib * MIB) // (4 * units))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        weights = Path(folder) / "model.weights.h5"
        with h5py.File(weights, "w") as h5:
            h5.create_group("vars").attrs["name"] = "sequential"
            group = h5.create_group("layers/dense/vars")
            group.attrs["name"] = "dense"
            kernel = group.create_dataset("0", shape=(rows, units), dtype="float32")
            step = max(1, (16 * MIB) // (4 * units))
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                kernel[start:stop] = rng.standard_normal(
                    (stop - start, units), np.float32
                )
            group.create_dataset("1", data=np.zeros(units, np.float32))
        metadata = {"keras_version": "3.15.1", "date_saved": "2026-01-01@00:00:00"}
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", json.dumps(metadata))
            archive.writestr("config.json", json.dumps(keras_config(rows, units)))
            archive.write(weights, "model.weights.h5")
    return rows * units * 4


PRELUDE = """
import contextlib, json, os, resource, sys, time
sys.argv = ["kerasreg"]
import h5py, numpy, zipfile
import kerasreg.cli, kerasreg.keras_file
"""

SCRIPTS = {
    "baseline": "",
    "inspect": """
with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
    assert kerasreg.cli.main(["inspect", MODEL, "--where", "."]) == 0
""",
    "shrink": """
with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
    assert kerasreg.cli.main(["shrink", MODEL, OUT, "--factor", "0.5"]) == 0
""",
    # As Keras reads it: h5py on the archive member.
    "h5py full read": """
with zipfile.ZipFile(MODEL) as archive, archive.open("model.weights.h5") as member:
    with h5py.File(member, "r") as h5:
        arrays = [h5[n][()] for n in ("layers/dense/vars/0", "layers/dense/vars/1")]
""",
    # The fastest plain read: h5py on the weights file extracted beforehand.
    "h5py full read, extracted": """
with h5py.File(EXTRACTED, "r") as h5:
    arrays = [h5[n][()] for n in ("layers/dense/vars/0", "layers/dense/vars/1")]
""",
}

# Peak RSS: VmHWM, which exec resets (ru_maxrss can carry the parent's peak
# across fork + exec on Linux); ru_maxrss where /proc is missing.
EPILOGUE = """
seconds = time.perf_counter() - START
try:
    with open("/proc/self/status") as status:
        peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "maxrss_kib": peak}))
"""


def measure(name: str, model: Path, out: Path) -> dict:
    """Run one variant in a fresh process; its wall time and peak RSS."""
    code = (
        PRELUDE
        + f"MODEL, OUT = {str(model)!r}, {str(out)!r}\n"
        + f"EXTRACTED = {str(model.with_suffix('.weights.h5'))!r}\n"
        + "START = time.perf_counter()\n"
        + SCRIPTS[name]
        + EPILOGUE
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def startup(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=env, check=True)
    return time.perf_counter() - start


def run(mib: float, rounds: int, folder: Path) -> dict:
    model = folder / "big.keras"
    out = folder / "big_shrunk.keras"
    nbytes = write_model(model, mib)
    with (
        zipfile.ZipFile(model) as archive,
        archive.open("model.weights.h5") as member,
        open(model.with_suffix(".weights.h5"), "wb") as extracted,
    ):
        shutil.copyfileobj(member, extracted, 16 * MIB)
    names = list(SCRIPTS)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    help_times: list[float] = []
    pass_times: list[float] = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(measure(name, model, out))
        help_times.append(startup([sys.executable, "-m", "kerasreg", "--help"]))
        pass_times.append(startup([sys.executable, "-c", "pass"]))
    base = statistics.median(s["maxrss_kib"] for s in samples["baseline"]) / 1024
    table = {}
    for name in names[1:]:
        peak = statistics.median(s["maxrss_kib"] for s in samples[name]) / 1024
        seconds = statistics.median(s["seconds"] for s in samples[name])
        table[name] = {
            "peak_rss_mib": round(peak, 1),
            "above_baseline_mib": round(peak - base, 1),
            "seconds": round(seconds, 3),
            "mb_per_s": round(nbytes / 1e6 / seconds, 1),
        }
    ratios = [h / p for h, p in zip(help_times, pass_times, strict=True)]
    return {
        "tensor_mib": round(nbytes / MIB, 1),
        "rounds": rounds,
        "baseline_rss_mib": round(base, 1),
        "variants": table,
        "help_seconds": round(statistics.median(help_times), 3),
        "python_pass_seconds": round(statistics.median(pass_times), 3),
        "help_over_pass_median": round(statistics.median(ratios), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        result = run(args.mib, args.rounds, Path(folder))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
