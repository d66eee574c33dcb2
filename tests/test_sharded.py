"""Sharded weights: JAX `ModelParallel` over a 2x2 mesh gives one device's numbers.

`tests/sharded_scenarios.py` runs in a fresh process with four host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`): each scenario once on
one device and once under `keras.distribution.ModelParallel`, whose `LayoutMap`
splits the LSTM's gate columns in two, cuts the recurrent kernel and a Dense
kernel into four blocks and splits the other kernels' columns. These tests
compare the two runs with each other and with numpy float64 references (an
LSTM forward pass, the penalty formulas, closed-form decay, norms, per-gate
norms), read the logged values back with TensorBoard's own reader, check that
every kernel keeps the layout the `LayoutMap` asked for after each operation,
and read XLA's compiled programs to check that `weight_norms` and
`shrink_weights` never gather a weight onto one device.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import ROOT, arrays, assert_close, np_stats, run_result, sigmoid

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "jax",
        reason="keras.distribution.ModelParallel shards weights on the JAX backend "
        "only; the subprocess runs in the jax session",
    ),
]

TOLERANCE = 1e-5
SCRIPT = ROOT / "tests" / "sharded_scenarios.py"
LAYOUT = {
    "lstm/lstm_cell/kernel": [None, "model"],
    "lstm/lstm_cell/recurrent_kernel": ["batch", "model"],
    "d0/kernel": [None, "model"],
    "d1/kernel": ["model", "batch"],
    "d2/kernel": [None, "model"],
}
MESH = {None: 1, "batch": 2, "model": 2}


@pytest.fixture(scope="module")
def runs():
    return run_result([SCRIPT], backend="jax", host_devices=4, timeout=900)


# --- independent references (numpy float64) ---------------------------------


def data():
    """The scenarios' data and initial weights, regenerated the same way."""
    rng = np.random.default_rng(0)
    seq = rng.normal(size=(16, 3, 8))
    y = rng.normal(size=(16, 4))
    seq_v = rng.normal(size=(8, 3, 8))
    y_v = rng.normal(size=(8, 4))
    init = {}
    for name, shapes in (
        ("lstm", [(8, 64), (16, 64), (64,)]),
        ("mlp", [(8, 16), (16,)]),
        ("head", [(16, 16), (16,), (16, 4), (4,)]),
    ):
        init[name] = [
            (rng.normal(size=s).astype("float32") * 0.3).astype("float64")
            for s in shapes
        ]
    return {
        "seq": seq.astype("float32"),
        "y": y.astype("float32"),
        "seq_v": seq_v.astype("float32"),
        "y_v": y_v.astype("float32"),
        "init": init,
    }


def np_lstm_mse(weights, x, y):
    """Keras LSTM (gates i, f, c, o; tanh, sigmoid), then two Dense layers."""
    k, r, b, k1, b1, k2, b2 = arrays(weights)
    x = np.asarray(x, np.float64)
    units = r.shape[0]
    h = np.zeros((x.shape[0], units))
    c = np.zeros((x.shape[0], units))
    for t in range(x.shape[1]):
        z = x[:, t] @ k + h @ r + b
        i, f, cc, o = (z[:, g * units : (g + 1) * units] for g in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(cc)
        h = sigmoid(o) * np.tanh(c)
    out = np.tanh(h @ k1 + b1) @ k2 + b2
    return float(np.mean((out - y) ** 2))


def np_lstm_penalties(weights):
    k, r, _, k1, _, k2, _ = arrays(weights)
    return {
        "lstm/lstm_cell/kernel": 0.01 * np.sum(k**2),
        "lstm/lstm_cell/recurrent_kernel": 0.002 * np.sum(np.abs(r)),
        "d1/kernel": 0.003 * np.sum(np.abs(k1)) + 0.02 * np.sum(k1**2),
        "d2/kernel": 0.004 * np.sum(np.expm1(np.abs(k2))),
    }


def np_gate_stats(w, gates=4):
    """Per gate (Keras column blocks i, f, c, o along the last axis)."""
    w = np.asarray(w, np.float64)
    width = w.shape[-1] // gates
    names = "ifco"
    out = {}
    for g in range(gates):
        for stat, value in np_stats(w[..., g * width : (g + 1) * width]).items():
            out[f"{stat}/gate_{names[g]}"] = value
    return out


def each_run(runs, name):
    """`(label, one, sharded)` for a scenario (or each of its variants)."""
    one, sharded = runs["one"][name], runs["sharded"][name]
    if "weights" in one:
        return [(name, one, sharded)]
    return [(f"{name}/{v}", one[v], sharded[v]) for v in one]


SCENARIOS = ["regularize", "decay_closed_form", "decay_training", "shrink", "lstm"]

# --- the layout the LayoutMap asked for, after every operation --------------


def test_ran_on_four_devices(runs):
    assert runs["devices"] == 4


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_kernel_keeps_its_sharding(runs, name):
    for label, one, sharded in each_run(runs, name):
        checked = 0
        for key in sharded:
            if not key.startswith("sharding"):
                continue
            for path, (spec, devices, shard_shape) in sharded[key].items():
                index = list(sharded[key]).index(path)
                shape = np.shape(sharded["weights"][index])
                expected = LAYOUT.get(path, [None] * len(shape))
                assert spec == expected, f"{label} {key} {path}"
                assert devices == 4, f"{label} {key} {path}"
                split = [
                    n // MESH[axis] for n, axis in zip(shape, expected, strict=True)
                ]
                assert shard_shape == split, f"{label} {key} {path}"
                checked += path in LAYOUT
            for path, (spec, devices, _) in one[key].items():
                assert devices == 1 and spec is None, f"{label} one {path}"
        assert checked >= 3, f"{label}: kernels not checked"


# --- sharded == one device ---------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_losses_and_weights_match_one_device(runs, name):
    for label, one, sharded in each_run(runs, name):
        assert set(one) == set(sharded)
        compared = 0
        for key in one:
            a, b = one[key], sharded[key]
            if key.startswith("weights"):
                assert len(a) == len(b)
                for i, (wa, wb) in enumerate(zip(a, b, strict=True)):
                    assert_close(wb, wa, f"{label}: {key}[{i}]")
                compared += 1
            elif key in ("loss", "val_loss", "evaluate", "rate", "steps") or (
                key.startswith("evaluate")
            ):
                assert_close(b, a, f"{label}: {key}")
                compared += 1
        assert compared >= 2, label


def test_norms_and_logged_values_match_one_device(runs):
    one, sharded = runs["one"]["lstm"], runs["sharded"]["lstm"]
    for mode in ("default", "per_gate"):
        assert list(one[mode]["norms"]) == list(sharded[mode]["norms"])
        for path, stats in one[mode]["norms"].items():
            assert set(stats) == set(sharded[mode]["norms"][path])
            for stat, value in stats.items():
                assert_close(sharded[mode]["norms"][path][stat], value, path + stat)
    for run in ("train", "validation"):
        assert set(one["logged"][run]) == set(sharded["logged"][run])
        for tag, events in one["logged"][run].items():
            # Same steps: every process and device measures, one writer writes.
            other = sharded["logged"][run][tag]
            assert [s for s, _ in other] == [s for s, _ in events], tag
            assert_close([v for _, v in other], [v for _, v in events], tag)


# --- each setting against numpy ----------------------------------------------


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_lstm_loss_includes_penalties(runs, setting):
    d = data()
    out = runs[setting]["lstm"]
    final = out["weights"]
    expected = np_lstm_mse(final, d["seq"], d["y"]) + sum(
        np_lstm_penalties(final).values()
    )
    assert out["evaluate"] == pytest.approx(expected, rel=TOLERANCE)
    assert np.isfinite(out["loss"]).all() and out["loss"][1] < out["loss"][0]


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_weight_norms_are_global_statistics(runs, setting):
    out = runs[setting]["lstm"]
    by_path = dict(zip(out["paths"], out["weights"], strict=True))
    penalties = np_lstm_penalties(out["weights"])
    default = out["default"]["norms"]
    assert list(default) == [p for p in out["paths"] if np.ndim(by_path[p]) >= 2]
    per_gate = out["per_gate"]["norms"]
    assert list(per_gate) == out["paths"]
    for path, w in by_path.items():
        expected = np_stats(w)
        expected["penalty"] = penalties.get(path, 0.0)
        if path.startswith("lstm/"):  # kernel, recurrent kernel and bias: gated
            expected.update(np_gate_stats(w))
        assert set(per_gate[path]) == set(expected) | {"trainable"}, path
        assert per_gate[path]["trainable"] is True  # every weight here trains
        for stat, value in expected.items():
            assert_close(per_gate[path][stat], value, f"{setting} {path} {stat}")
            if path in default and "/gate_" not in stat:
                assert_close(default[path][stat], value, f"{setting} {path} {stat}")


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_logged_values_match_numpy_from_the_final_weights(runs, setting):
    out = runs[setting]["lstm"]
    d = data()
    final = out["weights"]
    train = out["logged"]["train"]
    sections = {
        "l1": "norm_l1",
        "l2": "norm_l2",
        "linf": "norm_linf",
        "zero_fraction": "zero_fraction",
    }
    for path, w in zip(out["paths"], final, strict=True):
        stats = np_stats(w)
        if path.startswith("lstm/"):
            stats.update(np_gate_stats(w))
        for name, value in stats.items():
            stat, _, gate = name.partition("/")
            tag = f"{sections[stat]}/{path}" + (f"/{gate}" if gate else "")
            assert train[tag][-1] == pytest.approx([1, value], rel=1e-5, abs=1e-6)
    penalties = np_lstm_penalties(final)
    for path, value in penalties.items():
        assert train[f"penalty/{path}"][-1] == pytest.approx([1, value], rel=1e-5)
    total = sum(penalties.values())
    assert train["penalty/total"][-1] == pytest.approx([1, total], rel=1e-5)
    assert train["loss/data"][-1] == pytest.approx(
        [1, out["loss"][-1] - total], rel=1e-5
    )
    validation = out["logged"]["validation"]
    assert validation["loss/data"][-1] == pytest.approx(
        [1, np_lstm_mse(final, d["seq_v"], d["y_v"])], rel=1e-5
    )


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_regularize_adds_the_penalty_and_keeps_the_weights(runs, setting):
    out = runs[setting]["regularize"]
    before = arrays(out["weights_before"])
    for w, w_after in zip(before, arrays(out["weights_at_regularize"]), strict=True):
        np.testing.assert_array_equal(w_after, w)
    kernels, biases = before[0::2], before[1::2]
    penalty = 0.02 * sum(np.sum(k**2) for k in kernels) + 0.01 * sum(
        np.sum(np.abs(b)) for b in biases
    )
    gained = out["evaluate_after"] - out["evaluate_before"]
    assert gained == pytest.approx(penalty, rel=TOLERANCE, abs=TOLERANCE)


DECAYED = {
    "step": np.prod([0.9] * 4),
    "step_spe2": np.prod([0.9] * 4),
    "schedule": np.prod([1 - 0.1 * 0.5**t for t in range(4)]),
    "python_schedule": np.prod([1 - 0.1 / (t + 1) for t in range(4)]),
    "epoch": 0.9**2,
}


@pytest.mark.parametrize("setting", ["one", "sharded"])
@pytest.mark.parametrize("variant", list(DECAYED))
def test_decay_closed_form(runs, setting, variant):
    out = runs[setting]["decay_closed_form"][variant]
    init = data()["init"]
    w0 = init["mlp"] + init["head"]
    assert out["steps"] == 4  # 16 samples, batch 8, 2 epochs
    for i, (start, final) in enumerate(zip(w0, arrays(out["weights"]), strict=True)):
        if start.ndim >= 2:
            np.testing.assert_allclose(
                final, start * DECAYED[variant], rtol=2e-6, err_msg=f"{variant}[{i}]"
            )
        else:
            np.testing.assert_array_equal(final, start, err_msg=f"{variant}[{i}]")


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_lr_scaled_decay_reports_the_scaled_rate(runs, setting):
    out = runs[setting]["decay_training"]
    assert out["lr_scaled"]["rate"] == pytest.approx([0.025, 0.025], rel=1e-6)
    assert out["folded"]["rate"] == [0.05, 0.05]


@pytest.mark.parametrize("setting", ["one", "sharded"])
def test_shrink_weights_halves_kernels_and_reports_norms(runs, setting):
    out = runs[setting]["shrink"]
    before = arrays(out["weights_before"])
    shrunk = arrays(out["weights_shrunk"])
    for w0, w in zip(before, shrunk, strict=True):
        # Multiplying by 0.5 is exact in float32.
        np.testing.assert_array_equal(w, w0 * 0.5 if w0.ndim >= 2 else w0)
    kernels = [w for w in before if w.ndim >= 2]
    assert list(out["norms"]) == ["d0/kernel", "d1/kernel", "d2/kernel"]
    for row, w0 in zip(out["norms"].values(), kernels, strict=True):
        norm = np.sqrt(np.sum(w0**2))
        assert row["before"] == pytest.approx(norm, rel=TOLERANCE)
        assert row["after"] == pytest.approx(0.5 * norm, rel=TOLERANCE)


# --- nothing is gathered onto one device ------------------------------------


def test_weight_norms_reduce_each_shard_where_it_lives(runs):
    sharded, one = runs["sharded"]["lstm"], runs["one"]["lstm"]
    # Default statistics: partial sums and maxima combined by all-reduce, and
    # no all-gather at all.
    assert sharded["default"]["gathers"] == []
    assert sharded["default"]["collectives"] > 0
    assert one["default"]["collectives"] == 0
    # Per gate: the gate axis itself is split across devices, so the per-gate
    # statistic vectors (a few floats) are gathered, never a weight: every
    # gather is at most the returned statistics' size (padded to the 4
    # devices), and smaller than each gated LSTM kernel (512 and 1024 floats).
    norms = sharded["per_gate"]["norms"]
    n_values = sum(len(stats) for stats in norms.values())
    gathers = sharded["per_gate"]["gathers"]
    assert gathers and max(gathers) <= n_values + 4
    assert max(gathers) < 8 * 64


def test_folded_decay_adds_no_communication_to_the_train_step(runs):
    sharded = runs["sharded"]["decay_step_program"]
    assert sharded["decay"]["folded"] and not sharded["plain"]["folded"]
    # The decay is elementwise on each shard: the compiled step with it has
    # exactly the collectives of the step without it, and no all-gather.
    assert sharded["decay"]["collectives"] == sharded["plain"]["collectives"] > 0
    assert sharded["decay"]["gathers"] == sharded["plain"]["gathers"] == []
    assert runs["one"]["decay_step_program"]["decay"]["collectives"] == 0


def test_shrink_weights_runs_without_communication(runs):
    assert runs["sharded"]["shrink"]["collectives"] == 0


# --- sweep: K variants in one fit on sharded weights ------------------------

SWEEP_L2 = [None, 1e-3, 3e-2]  # the scenario's penalties: none, L2Penalty(l2)
SWEEP_KINDS = ["adam", "momentum"]
SWEEP_HISTORY = ["loss", "mae", "val_loss", "val_mae"]
SWEEP_RTOL, SWEEP_ATOL = 1e-5, 1e-6


def assert_same_training(a, b, what):
    """Per-epoch history and final weights of two runs, float32 tolerance."""
    assert list(a["history"]) == list(b["history"]) == SWEEP_HISTORY, what
    for key in SWEEP_HISTORY:
        assert len(a["history"][key]) == 3, f"{what}: {key}"  # epochs=3
        np.testing.assert_allclose(
            a["history"][key],
            b["history"][key],
            rtol=SWEEP_RTOL,
            atol=SWEEP_ATOL,
            err_msg=f"{what}: history[{key!r}]",
        )
    assert len(a["weights"]) == len(b["weights"]) == 6, what
    for i, (wa, wb) in enumerate(zip(a["weights"], b["weights"], strict=True)):
        np.testing.assert_allclose(
            np.asarray(wa, np.float64),
            np.asarray(wb, np.float64),
            rtol=SWEEP_RTOL,
            atol=SWEEP_ATOL,
            err_msg=f"{what}: weights[{i}]",
        )


def separate(variant):
    return {
        "history": variant["separate_history"],
        "weights": variant["separate_weights"],
    }


def np_mlp_mse(weights, x, y):
    k0, b0, k1, b1, k2, b2 = arrays(weights)
    out = np.tanh(np.tanh(np.asarray(x, np.float64) @ k0 + b0) @ k1 + b1) @ k2 + b2
    return float(np.mean((out - y) ** 2))


@pytest.mark.parametrize("setting", ["one", "sharded"])
@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_is_one_stacked_fit(runs, setting, kind):
    out = runs[setting]["sweep"][kind]
    assert out["stacked"] is True  # one fit of the K variants, not K fits
    assert len(out["variants"]) == len(SWEEP_L2)


@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sharded_sweep_equals_the_sweep_on_one_device(runs, kind):
    sharded = runs["sharded"]["sweep"][kind]["variants"]
    one = runs["one"]["sweep"][kind]["variants"]
    for l2, a, b in zip(SWEEP_L2, sharded, one, strict=True):
        assert_same_training(a, b, f"{kind} L2Penalty({l2})")


@pytest.mark.parametrize("setting", ["one", "sharded"])
@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_variants_equal_separate_fits(runs, setting, kind):
    variants = runs[setting]["sweep"][kind]["variants"]
    one_device = runs["one"]["sweep"][kind]["variants"]
    for l2, variant, reference in zip(SWEEP_L2, variants, one_device, strict=True):
        what = f"{setting} {kind} L2Penalty({l2})"
        # A plain fit of the same model with that penalty, in the same setting...
        assert_same_training(variant, separate(variant), what + " vs separate fit")
        # ... and on one device.
        assert_same_training(
            variant, separate(reference), what + " vs separate fit on one device"
        )


@pytest.mark.parametrize("setting", ["one", "sharded"])
@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_variants_trained_with_their_own_penalty(runs, setting, kind):
    # Keras's val_loss is the data loss plus the variant's penalty: checked
    # against a numpy forward pass of each variant's final weights.
    d = data()
    x_v, y_v = d["seq_v"][:, 0], d["y_v"]
    init = d["init"]["mlp"] + d["init"]["head"]
    finals = []
    for l2, variant in zip(
        SWEEP_L2, runs[setting]["sweep"][kind]["variants"], strict=True
    ):
        final = arrays(variant["weights"])
        finals.append(final)
        penalty = 0.0 if l2 is None else l2 * sum(np.sum(w**2) for w in final[0::2])
        expected = np_mlp_mse(final, x_v, y_v) + penalty
        assert variant["history"]["val_loss"][-1] == pytest.approx(
            expected, rel=SWEEP_RTOL
        ), f"{setting} {kind} L2Penalty({l2})"
        assert (
            max(np.max(np.abs(w - w0)) for w, w0 in zip(final, init, strict=True))
            > 1e-2
        )
    # Different penalties, different models: the strongest has the smallest kernels.
    sizes = [sum(np.sum(w**2) for w in final[0::2]) for final in finals]
    assert sizes[2] < sizes[1] < sizes[0], sizes


@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_models_carry_the_layout(runs, kind):
    out = runs["sharded"]["sweep"][kind]
    for l2, variant in zip(SWEEP_L2, out["variants"], strict=True):
        for key in ("sharding", "separate_sharding"):
            assert list(variant[key]) == variant["paths"]
            for path, w in zip(variant["paths"], variant["weights"], strict=True):
                spec, devices, shard_shape = variant[key][path]
                shape = np.shape(w)
                expected = LAYOUT.get(path, [None] * len(shape))
                what = f"{kind} L2Penalty({l2}) {key} {path}"
                assert spec == expected, what
                assert devices == 4, what
                assert shard_shape == [
                    n // MESH[a] for n, a in zip(shape, expected, strict=True)
                ], what
        assert sum(path in LAYOUT for path in variant["paths"]) == 3
    for variant in runs["one"]["sweep"][kind]["variants"]:
        for spec, devices, _ in variant["sharding"].values():
            assert devices == 1 and spec is None


@pytest.mark.parametrize("setting", ["one", "sharded"])
@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_leaves_the_template_alone(runs, setting, kind):
    out = runs[setting]["sweep"][kind]
    init = data()["init"]
    for before, after, start in zip(
        out["template_before"],
        out["template_after"],
        init["mlp"] + init["head"],
        strict=True,
    ):
        np.testing.assert_array_equal(after, before)
        np.testing.assert_array_equal(before, start)
    assert out["template_sharding_after"] == out["template_sharding_before"]
    for path, (spec, devices, _) in out["template_sharding_after"].items():
        if setting == "sharded":
            assert devices == 4 and spec == LAYOUT.get(path, [None]), path
        else:
            assert devices == 1 and spec is None, path


def test_sweep_with_a_layout_map_keyed_by_the_template_paths(runs):
    out, one = (
        runs["sharded"]["sweep_template_paths"],
        runs["one"]["sweep_template_paths"],
    )
    assert out["stacked"] is True
    for path, (spec, devices, _) in out["template"]["sharding"].items():
        assert spec == LAYOUT.get(path, [None]) and devices == 4, path
    for variant, reference in zip(out["variants"], one["variants"], strict=True):
        for wa, wb in zip(variant["weights"], reference["weights"], strict=True):
            np.testing.assert_allclose(
                np.asarray(wa), np.asarray(wb), rtol=SWEEP_RTOL, atol=SWEEP_ATOL
            )


def test_sweep_variants_get_the_layout_keyed_by_the_template_paths(runs):
    out = runs["sharded"]["sweep_template_paths"]
    for variant in out["variants"]:
        assert variant["sharding"] == out["template"]["sharding"]


def test_sweep_under_data_parallel_equals_one_device(runs):
    out = runs["sharded"]["sweep_data_parallel"]
    one = runs["one"]["sweep_data_parallel"]
    assert out["stacked"] is True
    for variant, reference in zip(out["variants"], one["variants"], strict=True):
        assert list(variant["history"]) == ["loss"]
        np.testing.assert_allclose(
            variant["history"]["loss"],
            reference["history"]["loss"],
            rtol=SWEEP_RTOL,
            atol=SWEEP_ATOL,
        )
        for wa, wb in zip(variant["weights"], reference["weights"], strict=True):
            np.testing.assert_allclose(
                np.asarray(wa), np.asarray(wb), rtol=SWEEP_RTOL, atol=SWEEP_ATOL
            )
        for path, (spec, devices, shard_shape) in variant["sharding"].items():
            index = list(variant["sharding"]).index(path)
            # Replicated: every device holds the whole weight.
            assert devices == 4 and set(spec) == {None}, path
            assert shard_shape == list(np.shape(variant["weights"][index])), path
