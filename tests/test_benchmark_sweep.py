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
    row = bench.bench("moons", (template, x, y, kwargs, penalties), 2, "auto")
    assert row["engine"] in ("vectorized", "stacked", "sequential")
    assert row["rounds"] == 2
    assert row["min"] <= row["sweep / one fit"] <= row["max"]
    assert row["K fits min"] <= row["sweep / K fits"] <= row["K fits max"]
