"""Shared test set-up: quiet TensorFlow, deterministic seeds, fresh Keras state."""

import gc
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# Tests whose outcome cannot depend on KERAS_BACKEND or on the Keras version:
# they read kerasreg's source or build its docs or its wheel, and run no model.
# They get the `backend_independent` marker; CI (.ci/run) runs them on its
# TensorFlow leg and leaves them out of the other legs, where they would only
# repeat the same work. A test that runs a model has no place here.
BACKEND_INDEPENDENT = (
    "tests/test_layering.py::",  # ast of kerasreg/*.py
    "tests/test_dev.py::",  # dev.py's arguments and conftest's lists
    "tests/test_typing.py::",  # mypy over the sources (Keras is untyped: Any)
    "tests/test_package.py::",  # the wheel and sdist built from the sources
    "tests/test_docs.py::test_site_builds_strictly",  # mkdocs build (also .ci/run)
    "tests/test_docs.py::test_api_reference_shows_the_public_names",  # docs/api.md
)


# Slow tests of code that differs per backend (distribution strategies and
# meshes, multi-process jobs, the jax.vmap sweep engine): they get the
# `per_backend` marker, and CI runs them on every backend's leg, while the
# other slow tests (examples, forced sweep engines, generators, the CLI zoo,
# the browser) run on its TensorFlow leg only.
PER_BACKEND = (
    "tests/test_distribution.py::",
    "tests/test_multiprocess.py::",
    "tests/test_sharded.py::",
    "tests/test_sweep_mapped.py::",
)


# The quick loop (`python3 dev.py test`, the README's test command) leaves out
# the slow tests and these: each starts fresh processes or several devices,
# runs an example script or a whole guide page, or times a benchmark, and
# repeats at full size what unit tests check piece by piece. They get the
# `full` marker; the full suite (`python3 dev.py test --all`, what CI runs on
# every leg) runs them as before.
FULL_ONLY = (
    "tests/test_examples.py::",  # the example scripts, end to end
    "tests/test_docs.py::test_page_snippets_run[docs/",  # guide pages (README stays)
    "tests/test_distribution.py::",  # a fresh process on two devices
    "tests/test_benchmarks.py::",  # benchmark scripts' smoke runs
    "tests/test_benchmark_sweep.py::",
    "tests/test_decay.py::test_mirrored_strategy_matches_one_device",
    "tests/test_gradient_logging.py::test_mirrored_strategy_is_refused",
    "tests/test_l2sp.py::test_set_reference_reaches_mirrored_replicas",
    "tests/test_poststep.py::test_toward_and_soft_threshold_under_mirrored_strategy",
    "tests/test_tensorboard.py::test_works_under_mirrored_strategy",
    "tests/test_l2sp.py::test_reference_survives_save_and_load_in_a_fresh_process",
    "tests/test_penalties.py::test_save_load_in_fresh_process",
    "tests/test_zoo.py::test_zoo_save_load_in_one_fresh_process",
)


# Set by pytest_collection_finish where pytest-xdist's groups are lost.
LOST_GROUPS: list[str] = []


def pytest_configure(config):
    # Known even without pytest-xdist (`-p no:xdist`), under --strict-markers.
    config.addinivalue_line(
        "markers",
        "xdist_group(name): tests sharing one expensive fixture or fresh process "
        "run on one pytest-xdist worker (`--dist loadgroup`, as dev.py runs)",
    )
    config.addinivalue_line(
        "markers",
        "per_backend: a slow test of code that differs per backend "
        "(conftest.PER_BACKEND); CI runs it on every leg",
    )
    config.addinivalue_line(
        "markers",
        "full: in the full suite only (`dev.py test --all`, CI), left out of "
        "the quick loop (conftest.FULL_ONLY)",
    )
    config.addinivalue_line(
        "markers",
        "backend_independent: runs no model, same result on every backend "
        "(conftest.BACKEND_INDEPENDENT); CI runs it on the TensorFlow leg only",
    )


def shared_fixtures(item) -> list[str]:
    """The module-scoped fixtures `item` asks for, itself or through another
    fixture (autouse ones not included): what it shares with other tests."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a Python test function
        return []
    seen, todo = set(), list(info.argnames)
    while todo:
        name = todo.pop()
        definitions = info.name2fixturedefs.get(name)
        if name in seen or not definitions:
            continue
        seen.add(name)
        todo.extend(getattr(definitions[-1], "argnames", ()))
    return sorted(
        name
        for name in seen
        if info.name2fixturedefs[name][-1].scope in ("module", "package", "class")
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist's `--dist loadgroup` (dev.py's default): the tests of a
    module that share a module-scoped fixture (a trained model, a subprocess's
    results) form one group, run on one worker that builds it once; and the
    slow tests come first, so that no long test starts last while the other
    worker has nothing left to do (stable: the order is otherwise kept).
    The tests named in `BACKEND_INDEPENDENT`, `PER_BACKEND` and `FULL_ONLY`
    get their markers."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and shared_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if item.nodeid.startswith(BACKEND_INDEPENDENT):
            item.add_marker(pytest.mark.backend_independent)
        if item.nodeid.startswith(PER_BACKEND):
            item.add_marker(pytest.mark.per_backend)
        if item.nodeid.startswith(FULL_ONLY):
            item.add_marker(pytest.mark.full)
    if getattr(config.option, "dist", "no") != "no" or hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session):
    """Check that pytest-xdist's groups hold, then freeze what the imports made
    (TensorFlow, Keras, the test modules).

    `--dist loadgroup` groups a test by the `@group` suffix pytest-xdist
    appends to its node id on the worker; where that suffix is lost (pytest
    9.2 with pytest-xdist 3.8), the tests of a group spread over the workers
    and every worker builds the group's module fixtures again, silently
    doubling the suite's time: every test then fails, naming the versions.

    A full garbage collection (Python's own, and any a test asks for) walks
    every tracked object: with TensorFlow imported, over 400,000 of them.
    Frozen objects are never walked again; they live as long as the process
    anyway. The tests' own objects are not frozen and are collected as before.
    """
    if getattr(session.config.option, "loadgroup", False):
        lost = [
            item.nodeid
            for item in session.items
            if item.get_closest_marker("xdist_group") is not None
            and "@" not in item.nodeid.rpartition("]")[2]
        ]
        if lost:
            import xdist

            # Raised here, a worker's error is lost in pytest-xdist's crash
            # report; each test fails with it instead (_fresh_keras_state).
            LOST_GROUPS.append(
                f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__}"
                f" loses --dist loadgroup's groups ({lost[0]} has no @group "
                "suffix): install the test extra again (setup.cfg excludes the "
                "pytest that loses them) or run with -p no:xdist"
            )
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    if LOST_GROUPS:
        pytest.fail(LOST_GROUPS[0], pytrace=False)
    # Keras's state only: a full garbage collection before every test
    # (`free_memory=True`) walks every object the earlier tests left alive
    # (TensorFlow's traced graphs among them), up to a second per test late
    # in a worker; Python's own generational collection still runs. A test
    # that needs garbage gone (a weak cache, a closed file) collects itself.
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


class _RetracingRecords(logging.Handler):
    """Keeps TensorFlow's "triggered tf.function retracing" messages."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "triggered tf.function retracing" in message:
            self.messages.append(message)


def kerasreg_function_named(message):
    """The kerasreg function a TensorFlow retracing message names, or None.

    TensorFlow names it `<function qualname at 0x...>` (or `<bound method
    qualname of ...>`); it is kerasreg's when the qualname starts with a
    function or class defined in a kerasreg module."""
    found = re.search(r"<(?:function|bound method) ([\w.<>]+)", message)
    if found is None:
        return None
    qualname = found.group(1)
    first = qualname.split(".")[0]
    for name, module in list(sys.modules.items()):
        if name == "kerasreg" or name.startswith("kerasreg."):
            defined = getattr(module, first, None)
            if getattr(defined, "__module__", "") == name:
                return f"{name}.{qualname}"
    return None


@pytest.fixture(autouse=True)
def _no_retracing_of_kerasreg_functions():
    """TensorFlow reports retracing through its logger, not the warnings
    module: fail a test in which it reports retracing of a kerasreg function
    (setup.cfg makes kerasreg's warnings errors)."""
    records = _RetracingRecords()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(records)
    try:
        yield
    finally:
        logger.removeHandler(records)
    ours = [m for m in records.messages if kerasreg_function_named(m)]
    if ours:
        pytest.fail(f"TensorFlow retraced a kerasreg function: {ours[0]}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def run_python(code: str, *, cwd: Path | None = None, timeout: float = 300):
    """Run `code` in a fresh Python process; return the CompletedProcess."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` of a run folder's scalars, read back with
    TensorBoard's own reader (other plugins' tags, such as the custom-scalars
    layout and the text plan, are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


# --- independent numpy references (float64), one copy for every test file -----


def to_np(x):
    """A tensor or variable as a float64 numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def np_weights(variable):
    """A variable's current value as a float64 numpy array."""
    return to_np(variable.value)


def arrays(weights):
    """A list of weights (nested lists from JSON, arrays) as float64 arrays."""
    return [np.asarray(w, np.float64) for w in weights]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_stats(w, threshold=1e-8):
    """What `weight_norms` reports for `w`: `l1`, `l2` (not squared), `linf`,
    `zero_fraction` (entries with `|w| < threshold`)."""
    a = np.abs(np.asarray(w, np.float64))
    return {
        "l1": a.sum(),
        "l2": np.sqrt((a**2).sum()),
        "linf": a.max(),
        "zero_fraction": (a < threshold).mean(),
    }


def np_exp_abs_terms(w):
    """`exp(|w|) - 1`, continued beyond 20 as documented in the README."""
    a = np.abs(np.asarray(w, np.float64))
    d = np.maximum(a - 20.0, 0.0)
    return np.expm1(np.minimum(a, 20.0)) + math.exp(20.0) * (d + 0.5 * d**2)


def np_penalty(regularizer, w):
    """The penalty `regularizer(w)` from its formula (its factors read back
    from the object): the kerasreg penalties and Keras's `L1`/`L2`/`L1L2`."""
    import kerasreg

    w = np.asarray(w, dtype=np.float64)
    if regularizer is None:
        return 0.0
    l1 = getattr(regularizer, "l1", 0.0)
    l2 = getattr(regularizer, "l2", 0.0)
    if isinstance(regularizer, kerasreg.ExpAbsPenalty):
        return regularizer.factor * np_exp_abs_terms(w).sum()
    known = (
        kerasreg.L1Penalty,
        kerasreg.L2Penalty,
        kerasreg.ElasticNetPenalty,
        keras.regularizers.L1,
        keras.regularizers.L2,
        keras.regularizers.L1L2,
    )
    if not isinstance(regularizer, known):
        raise AssertionError(f"no numpy reference for {regularizer!r}")
    return float(l1) * np.abs(w).sum() + float(l2) * (w**2).sum()


def assert_close(actual, expected, what, tolerance=1e-5):
    """`actual` (finite) equals `expected` within `tolerance` (rel and abs)."""
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: not finite: {actual}"
    np.testing.assert_allclose(
        actual,
        np.asarray(expected, np.float64),
        rtol=tolerance,
        atol=tolerance,
        err_msg=what,
    )


# --- a fresh process with two TensorFlow replicas -----------------------------

MIRRORED_PRELUDE = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    init = [rng.normal(size=s).astype("float32") for s in [(3, 4), (4,), (4, 1), (1,)]]
    devices = tf.config.list_logical_devices("CPU")
    mirrored = tf.distribute.MirroredStrategy([d.name for d in devices])
    one = tf.distribute.OneDeviceStrategy(devices[0].name)

    def fit_under(strategy, callbacks=(), prepare=None):
        # The same 3-4-1 model from `init`, `prepare(model)`, two epochs:
        # `(loss history, weights)`, after checking every replica's copy of
        # every weight holds the same value, not just the first.
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((3,)),
                keras.layers.Dense(4, activation="tanh"),
                keras.layers.Dense(1),
            ])
            model.set_weights(init)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        if prepare is not None:
            prepare(model)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                            callbacks=list(callbacks))
        for v in model.weights:
            copies = getattr(v.value, "values", [v.value])
            for c in copies:
                np.testing.assert_array_equal(c.numpy(), copies[0].numpy())
        return history.history["loss"], [w.tolist() for w in model.get_weights()]
    """
)


def run_mirrored(script: str) -> dict:
    """Run `MIRRORED_PRELUDE + script` (which prints one JSON line last) in a
    fresh process (devices are set before TensorFlow starts); its JSON."""
    result = run_python(MIRRORED_PRELUDE + textwrap.dedent(script))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    return out


def run_result(args, *, backend, host_devices=None, timeout=600) -> dict:
    """Run `python *args` in a fresh process under `KERAS_BACKEND=backend`
    (with `host_devices` XLA host devices: devices are set before the
    framework starts) and return the JSON of its last `RESULT <json>` line."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if host_devices is not None:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={host_devices}"
        )
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def gradient_statistics(data, penalty) -> dict:
    """The five statistics of `gradient_norms` from a data and a penalty
    gradient (float64 NumPy): the reference the gradient tests compare with."""
    data, penalty = np.asarray(data, np.float64), np.asarray(penalty, np.float64)
    d, p = np.linalg.norm(data), np.linalg.norm(penalty)
    return {
        "data": d,
        "penalty": p,
        "total": np.linalg.norm(data + penalty),
        "penalty_share": p / (d + p) if d + p else 0.0,
        "cosine": float((data * penalty).sum() / (d * p)) if d and p else 0.0,
    }
