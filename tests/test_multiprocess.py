"""Real multi-process jobs on localhost: the same training as one process.

`tests/multiprocess_job.py` launches two worker processes that talk over
127.0.0.1 only: a `tf.distribute.MultiWorkerMirroredStrategy` job (`TF_CONFIG`)
on the TensorFlow leg, and a `jax.distributed` job (local coordinator, one CPU
device per process, `keras.distribution.DataParallel`) on the JAX leg. Both
train a model with kerasreg penalties, `WeightDecay` and `WeightNormLogger`
(one log per step). The tests check, against a single-process run of the same
training (run in the test process: `worker` with one worker, no strategy) and
against TensorBoard's own reader:

- every worker ends with the same weights as one process, and as each other;
- the run's event files are written once, by the chief / process 0, with one
  value per step, equal to numpy statistics of the final weights;
- a worker that crashes (worker 1 exits in the middle of the first epoch) ends
  the job within a bounded time with an error that names it, and no process
  is left running.

Each job starts fresh processes (about 20-40 s of CPU for a pair), so the
tests are marked slow; each engine runs only on its own backend's leg.
"""

from __future__ import annotations

import json
import time

import keras
import numpy as np
import pytest
from conftest import read_scalars
from multiprocess_job import (
    CRASH_EXIT_CODE,
    RATE,
    WorkerFailed,
    data,
    launch,
    worker,
)

BACKEND = keras.backend.backend()
ENGINES = [
    pytest.param(
        "tf",
        marks=pytest.mark.skipif(
            BACKEND != "tensorflow",
            reason="MultiWorkerMirroredStrategy is a TensorFlow-backend engine",
        ),
    ),
    pytest.param(
        "jax",
        marks=pytest.mark.skipif(
            BACKEND != "jax",
            reason="jax.distributed with keras.distribution is a JAX-backend engine",
        ),
    ),
]
pytestmark = pytest.mark.slow

_JOBS: dict[tuple, dict] = {}
# The tests that read `_JOBS` run on one pytest-xdist worker (`--dist
# loadgroup`): each job runs once.
SHARES_JOBS = pytest.mark.xdist_group("multiprocess_jobs")


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def one_process(engine, out):
    """The single-process reference (`worker` with one worker: no strategy, no
    distribution), run in this process: a fresh one would only add the start
    of TensorFlow or JAX. `{0: result}`, as `launch` returns it."""
    filtering = keras.config.is_traceback_filtering_enabled()
    try:
        worker(engine, 0, 1, str(out), False)
    finally:
        if filtering:  # `worker` turns it off for its logs
            keras.config.enable_traceback_filtering()
    return {0: json.loads((out / "worker0.json").read_text())}


def job(engine, workers, tmp_path_factory):
    """Each job once per session: `{"out": folder, "result": {index: ...}}`."""
    key = (engine, workers)
    if key not in _JOBS:
        out = tmp_path_factory.mktemp(f"{engine}{workers}")
        if workers == 1:
            result = one_process(engine, out)
        else:
            result = launch(engine, workers, out)
        _JOBS[key] = {"out": out, "result": result}
    return _JOBS[key]


def event_files(folder):
    return sorted(p for p in folder.rglob("events.out.tfevents.*"))


@SHARES_JOBS
def test_every_worker_ends_with_the_single_process_weights(engine, tmp_path_factory):
    single = job(engine, 1, tmp_path_factory)["result"][0]
    workers = job(engine, 2, tmp_path_factory)["result"]
    assert single["replicas"] == 1
    assert [w["replicas"] for w in workers.values()] == [2, 2]
    for index, result in workers.items():
        assert result["steps"] == single["steps"] == 4, index
        assert result["rate"] == single["rate"] == [RATE, RATE], index
        np.testing.assert_allclose(result["loss"], single["loss"], rtol=1e-5)
        for i, (w, w1) in enumerate(
            zip(result["weights"], single["weights"], strict=True)
        ):
            np.testing.assert_allclose(
                w, w1, rtol=1e-5, atol=1e-6, err_msg=f"worker {index} weight {i}"
            )
    # The workers hold identical copies: bit for bit.
    for w0, w1 in zip(workers[0]["weights"], workers[1]["weights"], strict=True):
        np.testing.assert_array_equal(w0, w1)
    # Training happened and decay acted: the weights moved from the start.
    init = data()[2]
    assert not np.allclose(workers[0]["weights"][0], init[0])


@SHARES_JOBS
def test_the_chief_alone_writes_one_set_of_event_files(engine, tmp_path_factory):
    two = job(engine, 2, tmp_path_factory)
    one = job(engine, 1, tmp_path_factory)
    files = event_files(two["out"] / "logs")
    assert [f.parent.name for f in files] == ["train"], files
    assert len(event_files(one["out"] / "logs")) == 1
    logged = read_scalars(two["out"] / "logs" / "train")
    reference = read_scalars(one["out"] / "logs" / "train")
    assert set(logged) == set(reference)
    final = [np.asarray(w, np.float64) for w in two["result"][0]["weights"]]
    kernels = {"d0/kernel": final[0], "d1/kernel": final[2], "d2/kernel": final[4]}
    for tag, events in logged.items():
        # One value per step, steps 1..4 (update_freq=1), written once.
        assert [s for s, _ in events] == [1, 2, 3, 4], tag
        np.testing.assert_allclose(
            [v for _, v in events],
            [v for _, v in reference[tag]],
            rtol=1e-5,
            atol=1e-6,
            err_msg=tag,
        )
    for path, w in kernels.items():
        assert logged[f"norm_l2/{path}"][-1][1] == pytest.approx(
            np.sqrt(np.sum(w**2)), rel=1e-5
        )
        assert logged[f"norm_l1/{path}"][-1][1] == pytest.approx(
            np.sum(np.abs(w)), rel=1e-5
        )
    penalty = 0.01 * np.sum(final[0] ** 2) + (
        0.003 * np.sum(np.abs(final[2])) + 0.02 * np.sum(final[2] ** 2)
    )
    assert logged["penalty/total"][-1][1] == pytest.approx(penalty, rel=1e-5)
    # Every worker measured: each reports the same final norms.
    norms = [r["norms"] for r in two["result"].values()]
    assert norms[0] == norms[1]


def test_a_crashed_worker_ends_the_job_with_a_clear_error(engine, tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as failure:
        launch(engine, 2, tmp_path, crash=True, timeout=420, grace=20)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert f"worker 1 of 2 exited with code {CRASH_EXIT_CODE}" in message
    assert elapsed < 420  # the crash ended the job, not the whole-job timeout
    # The crash came before the end of the first epoch: nothing was finished.
    assert not list(tmp_path.glob("worker*.json"))
