"""`benchmarks/sweep.py` times what it claims: its K separate fits are the
fits the sweep replaces (each variant's history equals the sweep's row), and
its ratios are the same-round ratios of the times it recorded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import kerasreg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "sweep_benchmark", ROOT / "benchmarks" / "sweep.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep_benchmark"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["sweep_benchmark"]


def test_separate_fits_are_the_fits_the_sweep_replaces(bench):
    template, x, y, kwargs, penalties = bench.digits("dropout", epochs=2, k=2)
    x, y = x[:96], y[:96]
    separate = bench.separate_fits(template, penalties, x, y, **kwargs)
    result = kerasreg.sweep(template, penalties, x, y, verbose=0, **kwargs)
    assert len(separate) == len(result.rows) == 2
    for history, row in zip(separate, result.rows, strict=True):
        assert set(history) == set(row["history"])
        for key, values in history.items():
            np.testing.assert_allclose(
                row["history"][key], values, rtol=2e-5, atol=2e-6, err_msg=key
            )
    # The two penalties differ, so the baseline does not fit one model twice.
    assert separate[0]["loss"] != pytest.approx(separate[1]["loss"])


def test_bench_reports_same_round_ratios(bench, monkeypatch):
    template, x, y, kwargs, penalties = bench.brownlee(epochs=2, k=2)
    row = bench.bench(
        "moons", (template, x, y, kwargs, penalties), 2, "auto", floor=True
    )
    assert row["engine"] in ("vectorized", "stacked", "sequential")
    assert row["rounds"] == 2
    assert row["min"] <= row["sweep / one fit"] <= row["max"]
    assert row["K fits min"] <= row["sweep / K fits"] <= row["K fits max"]
    assert row["K-wide min"] <= row["K-wide fit / one fit"] <= row["K-wide max"]
    assert "K-wide fit / one fit" in bench.table([row]).splitlines()[0]


def test_the_k_wide_fit_trains_as_one_fit_does(bench):
    # The arithmetic floor repeats each sample K times in a K times larger
    # batch: the mean loss and its gradient are one fit's, so the histories
    # and the trained weights equal one fit's (validation_split taken by
    # Keras's rule before repeating), while each step computes K times as much.
    template, x, y, kwargs, _ = bench.digits("mlp", epochs=2, k=3)
    x, y = x[:96], y[:96]
    one = bench.copy_of(template)
    history = one.fit(x, y, verbose=0, **kwargs).history
    wx, wy, wide_kwargs = bench.k_wide(x, y, 3, **kwargs)
    assert wide_kwargs["batch_size"] == 3 * kwargs["batch_size"]
    assert len(wx) == 3 * 76  # floor(96 * 0.8) samples train, each three times
    wide = bench.copy_of(template)
    wide_history = wide.fit(wx, wy, verbose=0, **wide_kwargs).history
    assert set(wide_history) == set(history)
    for key, values in history.items():
        np.testing.assert_allclose(wide_history[key], values, rtol=1e-5, err_msg=key)
    for a, b in zip(wide.get_weights(), one.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fixed_cost_splits_a_time_line(bench):
    # A call costing `fixed + epochs * per_epoch` seconds: the split gives
    # both back from its times at E and 3E epochs.
    for fixed, per_epoch, epochs in ((1.5, 0.02, 150), (3.0, 0.4, 5), (0.0, 1.0, 1)):
        short, long = fixed + epochs * per_epoch, fixed + 3 * epochs * per_epoch
        got = bench.per_epoch_and_fixed(short, long, epochs)
        np.testing.assert_allclose(got, (per_epoch, fixed), rtol=1e-12, atol=1e-12)


def test_conv_variants_benchmark_checks_each_way_against_the_loop(capsys):
    # Each way is compared with K separate convolutions before it is timed
    # (the benchmark raises if one differs); two steps each, one round.
    spec = importlib.util.spec_from_file_location(
        "conv_variants", ROOT / "benchmarks" / "conv_variants.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rounds", "1", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| ms" not in line]
    assert any(line.startswith("| TensorFlow | im2col |") for line in rows)
