"""End-to-end tests of the examples: each runs in `--quick` mode on the active backend.

The numbers are checked for direction against expectations that do not come
from kerasreg: the published results (regularized test accuracy >= unregularized
on two moons; d2l's ||w|| about 14 at lambda = 0, far below 1 at lambda = 3),
closed forms (`kerasreg shrink --factor F` scales norms by exactly F), NumPy
penalties of the final weights, TensorBoard event files read back with
TensorBoard's own reader, and a real TensorBoard server asked through its HTTP
data API. Figures must be valid PNG files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TORCH = keras.backend.backend() == "torch"


@pytest.fixture(scope="module", autouse=True)
def _examples_importable():
    """Put `examples/` on `sys.path`, as running a script there does."""
    sys.path.insert(0, str(EXAMPLES))
    threads = None
    if TORCH:
        import torch

        # These models are tiny: two threads on two shared cores only wait on
        # each other (several times slower per step).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    yield
    sys.path.remove(str(EXAMPLES))
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "")).startswith(str(EXAMPLES)):
            del sys.modules[name]
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def example(name: str):
    return importlib.import_module(name)


def assert_png(path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 300 and height >= 300, (path, image.size)


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Scalar series of a TensorBoard run folder, read with TensorBoard's reader."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["tensors"]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        series[tag] = [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in accumulator.Tensors(tag)
        ]
    return series


def test_moons_script_reproduces_the_published_direction(tmp_path):
    """`python examples/moons.py --quick` as a script; parse its printed table."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if TORCH:
        env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "examples/moons.py",
            "--quick",
            "--log-dir",
            tmp_path / "moons",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        m["name"]: (float(m["train"]), float(m["test"]), float(m["norm"]))
        for m in re.finditer(
            r"^(?P<name>none|L2Penalty)\s+\S+\s+(?P<train>[\d.]+)\s+(?P<test>[\d.]+)"
            r"\s+\S+\s+(?P<norm>[\d.]+)$",
            result.stdout,
            re.M,
        )
    }
    assert set(rows) == {"none", "L2Penalty"}, result.stdout
    (train_none, test_none, norm_none), (_, test_l2, norm_l2) = (
        rows["none"],
        rows["L2Penalty"],
    )
    # Published: train 1.000 / test 0.914 without, test 0.943 with L2Penalty(1e-3).
    assert train_none == 1.0
    assert test_l2 >= test_none
    assert norm_l2 < 0.5 * norm_none
    assert result.stdout.rstrip().splitlines()[-1].startswith("tensorboard --logdir")
    assert_png(tmp_path / "moons.png")
    runs = {p.name for p in (tmp_path / "moons").iterdir() if p.is_dir()}
    assert runs == {"none", "L2Penalty_0.001"}
    assert "epoch_loss" in scalars(tmp_path / "moons" / "none" / "train")
    # One sweep: the HParams experiment sits at the root of the runs.
    hparams = EventAccumulator(str(tmp_path / "moons"))
    hparams.Reload()
    assert "_hparams_/experiment" in hparams.Tags()["tensors"]


def test_d2l_weight_decay_norms(tmp_path):
    results = example("d2l_linear").main(
        ["--quick", "--log-dir", str(tmp_path / "d2l")]
    )
    free, decayed = results["runs"][0.0], results["runs"][3.0]
    # d2l: ||w|| about 12-19 at lambda = 0 (sqrt(200) = 14.1 at init), 0.35-0.5 at 3.
    assert 10 < free["norm"] < 20
    assert decayed["norm"] < 1.0
    assert decayed["norm"] < free["norm"] / 10
    assert decayed["test_loss"] < free["test_loss"] / 10
    assert len(free["test_curve"]) == 100
    # The free model interpolates its 20 points: training loss far below test.
    assert free["train_loss"] < 1e-3 < free["test_loss"]
    series = scalars(tmp_path / "d2l" / decayed["run"] / "train")
    assert decayed["run"] == "L2Penalty_1.5"  # d2l's lambda / 2 * ||w||^2
    logged = [value for _, value in series["batch_test_data_loss"]]
    np.testing.assert_allclose(logged[-1], decayed["test_loss"], rtol=1e-5)
    assert_png(tmp_path / "d2l.png")


def test_decay_matches_l2_under_sgd_not_under_adam(tmp_path):
    results = example("decay_vs_l2").main(
        ["--quick", "--log-dir", str(tmp_path / "dv")]
    )
    sgd, adam = results["SGD"], results["Adam"]
    # The decay itself must do something, or agreement would mean nothing.
    assert sgd["none"]["relative_diff"] > 1e-2
    assert adam["none"]["relative_diff"] > 1e-2
    # SGD: L2Penalty(r / (2 lr)) == WeightDecay(r) to first order in r...
    assert sgd["L2Penalty"]["relative_diff"] < 1e-3
    assert sgd["L2Penalty"]["diff_over_effect"] < 0.02
    # ... and Keras's SGD(weight_decay=2c) is L2Penalty(c) up to float rounding.
    assert sgd["L2Penalty_vs_built-in"]["relative_diff"] < 1e-5
    # Adam: the penalty is rescaled by Adam, the decay is not (Loshchilov & Hutter).
    assert adam["L2Penalty"]["diff_over_effect"] > 1.0
    assert adam["L2Penalty"]["relative_diff"] > 100 * sgd["L2Penalty"]["relative_diff"]
    # AdamW(weight_decay=r / lr) is decoupled decay: it agrees with WeightDecay(r).
    assert adam["built-in"]["diff_over_effect"] < 0.02
    assert_png(tmp_path / "dv.png")


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    """The LSTM example, run once in quick mode: (module, results, log_dir)."""
    log_dir = tmp_path_factory.mktemp("examples") / "lstm"
    lstm = example("lstm_penalties")
    return lstm, lstm.main(["--quick", "--log-dir", str(log_dir)]), log_dir


def test_lstm_penalties_are_separate_tensorboard_series(lstm_run):
    lstm, results, log_dir = lstm_run
    run = results["runs"]["penalized"]
    series = scalars(log_dir / "penalized" / "train")
    kernel_tag = f"penalty/{run['paths']['kernel']}"
    recurrent_tag = f"penalty/{run['paths']['recurrent']}"
    assert kernel_tag.endswith("lstm_cell/kernel")
    assert recurrent_tag.endswith("lstm_cell/recurrent_kernel")
    kernel, recurrent = series[kernel_tag], series[recurrent_tag]
    assert [s for s, _ in kernel] == [s for s, _ in recurrent] == [0, 1, 2, 3]
    # The last logged values are the penalties of the final weights (NumPy).
    weights = run["weights"]
    l1, l2 = lstm.PENALTIES["kernel"].l1, lstm.PENALTIES["recurrent"].l2
    np.testing.assert_allclose(
        kernel[-1][1], l1 * np.abs(weights["kernel"]).sum(), rtol=1e-4
    )
    np.testing.assert_allclose(
        recurrent[-1][1], l2 * np.square(weights["recurrent"]).sum(), rtol=1e-4
    )
    assert not np.isclose(kernel[-1][1], recurrent[-1][1], rtol=0.1)
    # The recurrent penalty shrinks the recurrent kernel as training goes on.
    assert recurrent[-1][1] < recurrent[0][1]
    total = dict(series["penalty/total"])
    np.testing.assert_allclose(total[3], kernel[-1][1] + recurrent[-1][1], rtol=1e-4)
    for gate in "ifco":
        assert f"norm_l2/{run['paths']['recurrent']}/gate_{gate}" in series
    # The unpenalized run logs no per-weight penalty series.
    plain = scalars(log_dir / "none" / "train")
    assert not any(t.startswith("penalty/") and "lstm_cell" in t for t in plain)
    norms = results["runs"]
    assert (
        norms["penalized"]["norms"][run["paths"]["recurrent"]]["l2"]
        < norms["none"]["norms"][run["paths"]["recurrent"]]["l2"]
    )
    assert_png(log_dir.parent / "lstm.png")


def test_posthoc_shrinking_reduces_norms(tmp_path):
    results = example("posthoc_shrink").main(
        ["--quick", "--log-dir", str(tmp_path / "posthoc")]
    )
    rows = results["rows"]
    overfit = rows["overfit (saved)"]
    assert overfit["train"] == 1.0
    for name in ("+ WeightDecay(0.001)", "+ regularize(L2Penalty(0.001))"):
        assert rows[name]["hidden_l2"] < overfit["hidden_l2"], name
        assert 0 < rows[name]["updates"] <= 500
    for factor in (0.8, 0.5):
        row = rows[f"kerasreg shrink --factor {factor:g}"]
        for key in ("hidden_l2", "output_l2"):
            np.testing.assert_allclose(row[key], factor * overfit[key], rtol=1e-5)
        assert (tmp_path / "posthoc" / f"shrunk_{factor:g}.keras").is_file()
    series = scalars(tmp_path / "posthoc" / "regularize_l2" / "train")
    assert any(tag.endswith("hidden/kernel") for tag in series if "penalty/" in tag)
    assert_png(tmp_path / "posthoc.png")


def test_demo(tmp_path):
    """The main job as `python3 dev.py demo` runs it, in a fresh process: its
    numbers, its TensorBoard runs, and a clean first run (no Python warning,
    kerasreg's callback-order warning included, and no TensorFlow retracing
    warning)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")  # as dev.py sets it
    if TORCH:
        env["OMP_NUM_THREADS"] = "1"  # tiny models: see _examples_importable
    command = [sys.executable, str(EXAMPLES / "demo.py"), "--quick"]
    command += ["--log-dir", str(tmp_path / "demo"), "--json", str(tmp_path / "r.json")]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    noise = re.compile(r"Warning: |WARNING:tensorflow|WARNING:absl|retracing")
    noisy = [
        line for line in (done.stdout + done.stderr).splitlines() if noise.search(line)
    ]
    assert not noisy, noisy
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    none = runs["none"]
    for name in ("L2Penalty(1e-3)", "L1Penalty(1e-3)", "ExpAbsPenalty(1e-3)"):
        assert runs[name]["hidden_l2"] < none["hidden_l2"], name
        assert 0.05 < runs[name]["share"] < 1.0, name
    assert none["penalty"] == 0.0 and none["share"] == 0.0
    decayed = runs["none + WeightDecay(1e-3)"]
    assert decayed["updates"] == none["updates"] * 3 // 2
    assert decayed["penalty"] == 0.0  # decay acts on the weights, not the loss
    out = done.stdout
    assert out.rstrip().splitlines()[-1].strip().startswith("tensorboard --logdir ")
    assert "share" in out and "||W1||" in out
    folders = {p.name for p in (tmp_path / "demo").iterdir() if p.is_dir()}
    assert folders == {
        "none",
        "L2Penalty_0.001",
        "L1Penalty_0.001",
        "ExpAbsPenalty_0.001",
        "none+WeightDecay_0.001",
    }
    series = scalars(tmp_path / "demo" / "L2Penalty_0.001" / "train")
    assert {"epoch_loss", "penalty/total", "loss/data"} <= set(series)
    steps = [step for step, _ in series["penalty/total"]]
    epochs = none["updates"] // 100
    assert steps == list(range(epochs))
    decay_series = scalars(tmp_path / "demo" / "none+WeightDecay_0.001" / "train")
    # Its curves go on where the `none` run stopped; WeightDecay logs its rate.
    assert decay_series["epoch_loss"][0][0] == epochs
    rates = [rate for _, rate in decay_series["epoch_weight_decay_rate"]]
    np.testing.assert_allclose(rates, 1e-3, rtol=1e-6)
    assert_png(tmp_path / "demo.png")


@pytest.fixture
def tensorboard_server(lstm_run):
    """A real TensorBoard server on the LSTM example's logs; stopped afterwards."""
    _, _, log_dir = lstm_run
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(log_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",  # TensorBoard picks a free port and prints its address
        "--load_fast",
        "false",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        address, lines, deadline = None, [], time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            lines.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            address = match and match.group(1)
        assert address, "TensorBoard did not start:\n" + "".join(lines)[-3000:]
        yield address
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


def get_json(address: str, path: str, **query):
    url = f"{address}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_real_tensorboard_serves_the_penalty_norm_and_data_loss_series(
    lstm_run, tensorboard_server
):
    """Ask TensorBoard's HTTP data API what it shows for WeightNormLogger's logs."""
    _, results, log_dir = lstm_run
    paths = results["runs"]["penalized"]["paths"]
    wanted = {
        "penalized/train": {
            f"penalty/{paths['kernel']}",
            f"penalty/{paths['recurrent']}",
            "penalty/total",
            "loss/data",
            f"norm_l2/{paths['kernel']}",
            f"norm_l2/{paths['recurrent']}/gate_f",
        },
        "penalized/validation": {"penalty/total", "loss/data"},
    }
    deadline = time.monotonic() + 60
    while True:  # the server loads the event files in the background
        tags = get_json(tensorboard_server, "/data/plugin/scalars/tags")
        if all(tags.get(run, {}).keys() >= want for run, want in wanted.items()):
            break
        assert time.monotonic() < deadline, f"tags served: {tags}"
        time.sleep(1)

    def served(run: str, tag: str) -> list[tuple[int, float]]:
        rows = get_json(
            tensorboard_server, "/data/plugin/scalars/scalars", run=run, tag=tag
        )
        return [(step, value) for _, step, value in rows]

    # What the server shows is what is in the event files...
    for run, want in wanted.items():
        on_disk = scalars(log_dir / run)
        for tag in want:
            steps, values = zip(*served(run, tag), strict=True)
            disk_steps, disk_values = zip(*on_disk[tag], strict=True)
            assert steps == disk_steps == (0, 1, 2, 3), (run, tag)
            np.testing.assert_allclose(values, disk_values, rtol=1e-6)
    # ... and the logged values are right: input and recurrent penalties apart.
    kernel = served("penalized/train", f"penalty/{paths['kernel']}")
    recurrent = served("penalized/train", f"penalty/{paths['recurrent']}")
    total = served("penalized/train", "penalty/total")
    norms = results["runs"]["penalized"]["norms"]
    np.testing.assert_allclose(
        kernel[-1][1], norms[paths["kernel"]]["penalty"], rtol=1e-5
    )
    np.testing.assert_allclose(
        recurrent[-1][1], norms[paths["recurrent"]]["penalty"], rtol=1e-5
    )
    assert not np.allclose([v for _, v in kernel], [v for _, v in recurrent], rtol=0.1)
    np.testing.assert_allclose(
        [v for _, v in total],
        [k + r for (_, k), (_, r) in zip(kernel, recurrent, strict=True)],
        rtol=1e-5,
    )
    weights = results["runs"]["penalized"]["weights"]["recurrent"]
    forget = weights[:, weights.shape[1] // 4 : weights.shape[1] // 2]
    gate_f = served("penalized/train", f"norm_l2/{paths['recurrent']}/gate_f")
    np.testing.assert_allclose(gate_f[-1][1], np.linalg.norm(forget), rtol=1e-5)
    # Validation: the data loss is Keras's val_loss minus the penalty.
    val_loss = results["runs"]["penalized"]["val_loss"]
    val_data = served("penalized/validation", "loss/data")
    val_penalty = served("penalized/validation", "penalty/total")
    np.testing.assert_allclose(
        [d + p for (_, d), (_, p) in zip(val_data, val_penalty, strict=True)],
        val_loss,
        rtol=1e-5,
    )


def table_rows(text: str, pattern: str) -> list[dict]:
    return [m.groupdict() for m in re.finditer(pattern, text, re.M)]


@pytest.mark.slow
def test_transfer_l2sp_pulls_toward_the_pretrained_body(tmp_path, capsys):
    """Fine-tuning digits 5-9 on a body pretrained on 0-4 (`--quick`, 2 seeds).

    Independent facts: accuracy far above chance (0.2) for every method; both
    pulls toward the pretrained body (L2-SP and decay toward the start) end
    nearer to it than plain fine-tuning from the same start with the same
    head and data; the printed table is the JSON written to disk; TensorBoard's
    reader finds the body's norms in each run.
    """
    log_dir = tmp_path / "transfer_l2sp"
    example("transfer_l2sp").main(["--quick", "--log-dir", str(log_dir)])
    printed = capsys.readouterr().out
    saved = json.loads((log_dir / "results.json").read_text())
    methods = ["none", "L2Penalty", "L2SPPenalty", "WeightDecay(toward='start')"]
    assert list(saved["rows"]) == methods
    assert saved["seeds"] == 2 and saved["pretrain_accuracy"] > 0.95
    rows = table_rows(
        printed,
        r"^(?P<name>\S+)\s+(?P<strength>[\d.e-]+)\s+(?P<val>[\d.]+)\s+"
        r"(?P<mean>[\d.]+) \+- (?P<std>[\d.]+)\s+(?P<drift>[\d.]+)$",
    )
    assert [r["name"] for r in rows] == methods, printed
    for row in rows:
        data = saved["rows"][row["name"]]
        assert len(data["tests"]) == 2
        assert float(row["mean"]) == pytest.approx(np.mean(data["tests"]), abs=6e-4)
        assert float(row["std"]) == pytest.approx(np.std(data["tests"]), abs=6e-4)
        assert float(row["mean"]) > 0.5, printed
    drift = {name: saved["rows"][name]["drift_mean"] for name in methods}
    assert drift["L2SPPenalty"] < drift["none"], drift
    assert drift["WeightDecay(toward='start')"] < drift["none"], drift
    assert_png(tmp_path / "transfer_l2sp.png")
    for run in ("none", "L2SPPenalty_0.01", "WeightDecay_toward_start_0.01"):
        series = scalars(log_dir / run / "train")
        assert "norm_l2/body_1/kernel" in series, sorted(series)
        assert len(series["norm_l2/body_1/kernel"]) == 10


def test_soft_threshold_makes_exact_zeros_l1_penalty_does_not(tmp_path, capsys):
    """`L1Penalty(l1)` vs `SoftThreshold(l1, lr_scaled=True)` (`--quick`).

    Independent facts (keras issue 18388): gradient steps on an L1 penalty
    leave no weight exactly at 0.0; the proximal step of the same strength
    does, many at the stronger strength, with about the same accuracy. Zero
    fractions are recounted from the kernels the script saved to disk.
    """
    log_dir = tmp_path / "sparse_l1"
    example("sparse_l1").main(["--quick", "--log-dir", str(log_dir)])
    printed = capsys.readouterr().out
    saved = json.loads((log_dir / "results.json").read_text())["rows"]
    with np.load(log_dir / "kernels.npz") as kernels:
        for row in saved:
            run = f"{row['method']}_{row['l1']:g}"
            flat = np.concatenate(
                [kernels[f"{run}/hidden"].ravel(), kernels[f"{run}/output"].ravel()]
            )
            assert flat.size == 100 * 32 + 32 * 2
            assert row["zero_fraction"] == pytest.approx(np.mean(flat == 0.0))
    printed_rows = table_rows(
        printed,
        r"^(?P<method>none|L1Penalty|SoftThreshold)\s+(?P<l1>[\d.e-]+)\s+"
        r"(?P<zero>[\d.]+)\s+[\d.]+\s+\d+/100\s+[\d.]+\s+(?P<test>[\d.]+)$",
    )
    assert len(printed_rows) == len(saved) == 5, printed
    for shown, row in zip(printed_rows, saved, strict=True):
        assert float(shown["zero"]) == pytest.approx(row["zero_fraction"], abs=6e-4)
    by = {(r["method"], r["l1"]): r for r in saved}
    assert by[("none", 0.0)]["zero_fraction"] == 0.0
    for l1 in (1e-3, 1e-2):
        penalty, prox = by[("L1Penalty", l1)], by[("SoftThreshold", l1)]
        assert penalty["zero_fraction"] < 0.01, penalty
        assert prox["zero_fraction"] > penalty["zero_fraction"], (prox, penalty)
        assert abs(prox["test"] - penalty["test"]) < 0.05, (prox, penalty)
    assert by[("SoftThreshold", 1e-2)]["zero_fraction"] > 0.3
    assert_png(tmp_path / "sparse_l1.png")


@pytest.mark.slow  # eight separate fits until the one-fit engines take callbacks
def test_weight_decay_study_keeps_and_saves_the_best_of_a_seeded_grid(tmp_path, capsys):
    """L2 strength x decay rate, 2 seeds, early stopping, best model saved (`--quick`).

    Independent facts: the best grid point is the best mean of `runs.csv` read
    back with the csv module; each run's `best_epoch` is where its own
    `val_loss` history is lowest (what `restore_best_weights` restores); the
    saved file reloads to a model that predicts as the chosen run and scores
    the printed test accuracy, recounted in NumPy.
    """
    import csv

    out = example("weight_decay_study").main(
        ["--quick", "--log-dir", str(tmp_path / "study")]
    )
    printed = capsys.readouterr().out
    result = out["result"]
    with open(tmp_path / "study" / "runs.csv") as file:
        runs = list(csv.DictReader(file))
    assert len(runs) == len(result.rows) == 8
    points: dict[str, list[float]] = {}
    for run in runs:
        points.setdefault(run["penalty"], []).append(float(run["val_accuracy"]))
    assert list(points) == [
        "none",
        "none+WeightDecay_0.001",
        "L2Penalty_0.001",
        "L2Penalty_0.001+WeightDecay_0.001",
    ]
    assert {len(values) for values in points.values()} == {2}
    means = {name: np.mean(values) for name, values in points.items()}
    assert means[out["best"]["penalty"]] == pytest.approx(max(means.values()))
    assert f"best by mean val_accuracy: {out['best']['penalty']}" in printed
    for row in result.rows:
        assert row["best_epoch"] == int(np.argmin(row["history"]["val_loss"]))
        assert (tmp_path / "study" / row["run"] / "train").is_dir()
    reloaded = keras.saving.load_model(out["saved"])
    x_test, y_test = out["test"]
    predicted = reloaded.predict(x_test, verbose=0)
    accuracy = float(np.mean(np.argmax(predicted, axis=1) == y_test))
    assert accuracy == pytest.approx(out["test_accuracy"], abs=1e-6)
    assert accuracy > 0.8 and out["reloaded_equal"]
    chosen = [result.models[i] for i in out["best"]["runs"]]
    assert any(
        np.allclose(m.predict(x_test, verbose=0), predicted, atol=1e-6) for m in chosen
    )
    assert_png(out["figure"])


def np_moons_gradients(weights, x, y):
    """Data gradients of the moons network's kernels by hand (NumPy backprop):
    `relu(x W1 + b1) W2 + b2` -> sigmoid -> mean binary cross-entropy."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    pre = x @ w1 + b1
    h = np.maximum(pre, 0.0)
    p = 1.0 / (1.0 + np.exp(-(h @ w2 + b2)))
    dz = (p - np.asarray(y, np.float64)[:, None]) / len(x)
    return {"hidden": (x.T @ ((dz @ w2.T) * (pre > 0)), w1), "output": (h.T @ dz, w2)}


@pytest.mark.slow
def test_gradient_share_readings_match_numpy_backprop(tmp_path):
    results = example("gradient_share").main(
        ["--quick", "--log-dir", str(tmp_path / "gradient_share")]
    )
    from moons_problem import moons_data

    _, (x_test, y_test) = moons_data()
    rows = results["rows"]
    assert [row["alpha"] for row in rows] == [1e-5, 1e-3, 1e-1]
    for row in rows:
        grads = np_moons_gradients(row["weights"], x_test, y_test)
        for layer, (g, w) in grads.items():
            pen = 2 * row["alpha"] * w  # L2Penalty(alpha): alpha * sum(w**2)
            d, p = np.linalg.norm(g), np.linalg.norm(pen)
            logged = row["layers"][layer]
            what = f"{layer} at alpha {row['alpha']}"
            np.testing.assert_allclose(
                logged["val_data_end"], d, rtol=1e-3, err_msg=what
            )
            np.testing.assert_allclose(
                logged["val_penalty_end"], p, rtol=1e-4, err_msg=what
            )
            np.testing.assert_allclose(
                logged["val_share_end"], p / (d + p), rtol=1e-3, atol=1e-6, err_msg=what
            )
            np.testing.assert_allclose(
                logged["val_cosine_end"],
                (g * pen).sum() / (d * p),
                atol=2e-3,
                err_msg=what,
            )
    # At a stationary point of data loss plus penalty the two training
    # gradients cancel: the strongest penalty converges there, the weakest not.
    strong, weak = rows[-1]["layers"]["hidden"], rows[0]["layers"]["hidden"]
    assert abs(strong["train_share_end"] - 0.5) < 0.01
    assert strong["train_cosine_end"] < -0.99
    assert weak["train_share_end"] < 0.1 and weak["train_cosine_end"] > -0.9
    # Held-out data: the weakest penalty's gradient points along the penalty's
    # (shrinking would lower the test loss), the strongest's against it.
    assert weak["val_cosine_end"] > 0 > strong["val_cosine_end"]
    assert_png(results["figure"])
