"""The benchmark harness: its arithmetic and its baselines, not its timings.

Speed is only measured by `benchmarks/overhead.py` itself; these tests check
that what it times computes what it claims (the baselines decay by the same
factor as `WeightDecay`; the numpy loop computes the same norms) and that the
ratios it reports are the ratios of the times it recorded.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import kerasreg

if keras.backend.backend() != "tensorflow":
    pytest.skip(
        "benchmarks/overhead.py compares TensorFlow-backend mechanisms",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location(
        "overhead", ROOT / "benchmarks" / "overhead.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("overhead", None)


def test_ratios_are_same_round_ratios(overhead):
    a = overhead.Variant("a", None, None, None, times=[2.0, 3.0, 8.0])
    b = overhead.Variant("b", None, None, None, times=[1.0, 2.0, 2.0])
    a.cpu_times, b.cpu_times = [1.0, 1.0, 1.0], [2.0, 4.0, 1.0]
    r = overhead.ratios(a, b)
    assert r["median"] == statistics.median([2.0, 1.5, 4.0]) == 2.0
    assert (r["min"], r["max"], r["rounds"]) == (1.5, 4.0, 3)
    assert r["cpu_median"] == 0.5


@pytest.mark.parametrize("kind", ["mlp", "deep"])
def test_decay_baselines_shrink_like_weight_decay(overhead, kind):
    # Every decay variant must do the same work: after `steps` steps of SGD
    # with learning rate 0 (no gradient change), each kernel is
    # w0 * (1 - RATE) ** steps, the closed form. `SGD(weight_decay)` ties its
    # decay to the learning rate (w -= lr * weight_decay * w), so it is
    # checked at its own rate: weight_decay * lr must equal RATE.
    steps = 3
    variants = overhead.decay_variants(kind, steps)
    sgd = variants.pop("SGD(weight_decay)").model.optimizer
    assert sgd.weight_decay * float(sgd.learning_rate) == pytest.approx(overhead.RATE)
    for name, variant in variants.items():
        model = variant.model
        model.optimizer.learning_rate = 0.0
        kernels = [v for v in model.trainable_weights if len(v.shape) >= 2]
        before = [np.array(keras.ops.convert_to_numpy(v)) for v in kernels]
        variant.run()
        factor = 1.0 if name == "no decay" else (1.0 - overhead.RATE) ** steps
        for v, w0 in zip(kernels, before, strict=True):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(v), w0 * factor, rtol=2e-6, err_msg=name
            )


def test_norm_baselines_compute_the_norms(overhead):
    rows = overhead.bench_norms(parameters=1, rounds=3)
    assert [r["reference"] for r in rows] == ["one compiled read", "numpy loop"]
    for row in rows:
        assert row["rounds"] == 3
        assert 0 < row["min"] <= row["median"] <= row["max"]
    # The tracemalloc peak of weight_norms stays far below the weights' bytes.
    assert rows[0]["weight_bytes"] == 4 * (2048 * 2048 + 2048)
    assert rows[0]["host_peak_bytes"] < rows[0]["weight_bytes"] / 100
    # The numpy loop and weight_norms agree (same model and seed as the bench).
    model = overhead.big_model(1)
    kernel = model.layers[0].kernel
    a = np.abs(keras.ops.convert_to_numpy(kernel).astype(np.float64))
    stats = kerasreg.weight_norms(model)[
        kerasreg.selection.weight_paths(model)[id(kernel)]
    ]
    assert stats["l2"] == pytest.approx(np.sqrt((a * a).sum()), rel=1e-5)
    assert stats["l1"] == pytest.approx(a.sum(), rel=1e-5)


def test_gradient_rows_time_what_they_claim(overhead, tmp_path):
    variant = overhead.logger_variants("mlp", 2, tmp_path)[
        "WeightNormLogger(10, gradients)"
    ]
    (logger,) = variant.callbacks
    assert logger.gradients and logger.update_freq == 10
    assert ("WeightNormLogger(10, gradients)", "no callback", "<= 1.10") in (
        overhead.COMPARISONS["logger"]
    )
    (row,) = overhead.bench_gradients(rounds=1)
    assert (row["variant"], row["reference"], row["rounds"]) == (
        "gradient_norms",
        "train_on_batch",
        1,
    )
