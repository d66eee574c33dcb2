"""A real multi-process kerasreg job on localhost, and its launcher.

As a script, this file is one worker: `python multiprocess_job.py ENGINE INDEX
WORKERS OUT_DIR [--crash]` trains a small model with kerasreg penalties,
`WeightDecay` and `WeightNormLogger` and writes what it ended with to
`OUT_DIR/worker<INDEX>.json`. `ENGINE` is

- `tf`: `tf.distribute.MultiWorkerMirroredStrategy`, the cluster described by
  `TF_CONFIG` (set by the launcher: one worker per process, 127.0.0.1 ports);
  `fit` gets the whole data set and the global batch, the strategy shards it;
- `jax`: `jax.distributed.initialize` with the coordinator on 127.0.0.1, one
  CPU device per process, `keras.distribution.DataParallel` over both
  processes' devices; each process feeds its own half of every global batch.

`WORKERS=1` is the single-process reference: the same training with no
strategy (TensorFlow) or no distribution (JAX). With `--crash`, worker 1 dies
(`os._exit`) in the middle of the first epoch.

As a module, `launch(...)` starts the workers on free loopback ports, waits for
them with a bounded timeout and, as soon as one fails, stops the others and
raises `WorkerFailed` naming it: a failed worker never leaves the job hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

GLOBAL_BATCH = 8
EPOCHS = 2
RATE = 0.05
CRASH_EXIT_CODE = 17


class WorkerFailed(RuntimeError):
    """A worker of a multi-process job exited with an error or timed out."""


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (loopback only)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(
    engine: str,
    workers: int,
    out_dir: str | os.PathLike,
    *,
    crash: bool = False,
    timeout: float = 420.0,
    grace: float = 20.0,
) -> dict:
    """Run one job of `workers` processes; return `{index: worker result}`.

    Raises `WorkerFailed` (naming the worker, its exit code and the end of its
    stderr) as soon as one worker exits non-zero, after giving the others
    `grace` seconds to stop by themselves and killing those that did not, or
    when the whole job takes longer than `timeout` seconds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(workers)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BACKEND"] = "tensorflow" if engine == "tf" else "jax"
    env.pop("XLA_FLAGS", None)  # one CPU device per JAX process
    env["CUDA_VISIBLE_DEVICES"] = ""
    if engine == "tf" and workers > 1:
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    else:
        cluster = None
    env["KERASREG_JOB_PORT"] = str(ports[0])
    processes = []
    for index in range(workers):
        worker_env = dict(env)
        if cluster is not None:
            worker_env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
        args = [sys.executable, __file__, engine, str(index), str(workers)]
        args += [str(out_dir)] + (["--crash"] if crash else [])
        log = open(out_dir / f"worker{index}.log", "w")  # noqa: SIM115
        processes.append(
            (
                subprocess.Popen(
                    args, env=worker_env, stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    failed: list[tuple[int, int | None]] = []
    try:
        while True:
            codes = [p.poll() for p, _ in processes]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad
                stop_by = time.monotonic() + grace
                while time.monotonic() < stop_by and any(
                    p.poll() is None for p, _ in processes
                ):
                    time.sleep(0.2)
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failed = [(i, None) for i, c in enumerate(codes) if c is None]
                break
            time.sleep(0.2)
    finally:
        still_running = [i for i, (p, _) in enumerate(processes) if p.poll() is None]
        for p, log in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            log.close()
    if failed:
        index, code = failed[0]
        tail = (out_dir / f"worker{index}.log").read_text()[-2000:]
        what = "timed out" if code is None else f"exited with code {code}"
        raise WorkerFailed(
            f"{engine} job: worker {index} of {workers} {what}; "
            f"workers killed after waiting: {still_running}. "
            f"Its last output:\n{tail}"
        )
    return {
        index: json.loads((out_dir / f"worker{index}.json").read_text())
        for index in range(workers)
    }


# --- one worker ---------------------------------------------------------------


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    shapes = [(5, 6), (6,), (6, 4), (4,), (4, 1), (1,)]
    init = [rng.normal(size=s).astype("float32") * 0.5 for s in shapes]
    return x, y, init


def build(init):
    import keras

    import kerasreg

    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                6,
                activation="tanh",
                kernel_regularizer=kerasreg.L2Penalty(0.01),
                name="d0",
            ),
            keras.layers.Dense(
                4,
                activation="tanh",
                kernel_regularizer=kerasreg.ElasticNetPenalty(0.003, 0.02),
                name="d1",
            ),
            keras.layers.Dense(1, name="d2"),
        ]
    )
    model.set_weights(init)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def work_around_keras_multi_worker_bugs(model, x, y):
    """Two Keras 3 bugs that stop any `fit` under `MultiWorkerMirroredStrategy`.

    Both are in Keras's TensorFlow trainer and hit every model, with or without
    kerasreg (Keras 3.15.1, TensorFlow 2.21; MirroredStrategy is not affected
    because with one worker TensorFlow passes these values through):

    1. At the start of `fit`, `_maybe_symbolic_build` calls
       `strategy.reduce("MEAN", (x, y))` on the first distributed batch, a
       tuple, only to learn its shapes: the collective ops reject the tuple
       ("Attempt to convert a value (PerReplica ...) to a Tensor"). Here the
       model is built from a local batch of the same shapes instead.
    2. Each step's logs are reduced with `strategy.reduce("MEAN", v, axis=0)`,
       which fails for scalar logs such as `loss` ("Invalid reduction
       dimension 0 for input with 0 dimensions"). Here scalars are averaged
       over replicas with `axis=None`, which is what `axis=0` means for them.

    Test-harness code only: kerasreg itself touches neither.
    """
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    # Older Keras releases lack these functions (and these bugs): patch only
    # what exists.
    original = getattr(model, "_maybe_symbolic_build", None)
    if original is not None:

        def build_from_local_batch(iterator=None, data_batch=None):
            return original(data_batch=(x, y))

        model._maybe_symbolic_build = build_from_local_batch

    reduce_per_replica = getattr(trainer, "reduce_per_replica", None)
    multi_worker = getattr(trainer, "_collective_all_reduce_multi_worker", None)
    if reduce_per_replica is None or multi_worker is None:
        return
    if getattr(reduce_per_replica, "scalar_aware", False):
        return

    def reduce_scalars_too(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return reduce_per_replica(values, strategy, reduction)

        def reduce(v):
            local = strategy.experimental_local_results(v)[0]
            if local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return reduce_per_replica(v, strategy, reduction)

        return tree.map_structure(reduce, values)

    reduce_scalars_too.scalar_aware = True
    trainer.reduce_per_replica = reduce_scalars_too


def worker(engine: str, index: int, workers: int, out_dir: str, crash: bool) -> None:
    distributed = workers > 1
    if engine == "jax" and distributed:
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        port = os.environ["KERASREG_JOB_PORT"]
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=workers,
            process_id=index,
            initialization_timeout=120,
            heartbeat_timeout_seconds=10,
        )
    import keras
    import numpy as np

    import kerasreg

    keras.config.disable_traceback_filtering()  # full tracebacks in worker logs
    # The same initializer draws in every process: JAX checks that a global
    # replicated array gets the same value from each process.
    keras.utils.set_random_seed(0)
    x, y, init = data()
    log_dir = os.path.join(out_dir, "logs")
    batch = GLOBAL_BATCH
    scope = None
    if engine == "tf" and distributed:
        import tensorflow as tf

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
        scope = strategy.scope()
        replicas = strategy.num_replicas_in_sync
    elif engine == "jax" and distributed:
        import jax

        # The data below is already this process's part: no auto-sharding.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=jax.devices(), auto_shard_dataset=False
            )
        )
        replicas = len(jax.devices())
        # Each process feeds its own part of every global batch, in process
        # order: global batch s is rows [8s, 8s + 8), this process's part is
        # rows [8s + 4i, 8s + 4i + 4).
        batch = GLOBAL_BATCH // workers
        rows = np.arange(len(x)).reshape(-1, workers, batch)[:, index].ravel()
        x, y = x[rows], y[rows]
    else:
        replicas = 1

    callbacks = [
        kerasreg.WeightDecay(RATE),
        kerasreg.WeightNormLogger(log_dir, update_freq=1),
    ]
    if crash and index == 1:

        class Crash(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 0:
                    os._exit(CRASH_EXIT_CODE)  # a hard crash: no clean-up at all

        callbacks.append(Crash())

    if scope is not None:
        with scope:
            model = build(init)
        work_around_keras_multi_worker_bugs(model, x[:batch], y[:batch])
    else:
        model = build(init)
    history = model.fit(
        x,
        y,
        batch_size=batch,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    ).history
    result = {
        "replicas": replicas,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "loss": [float(v) for v in history["loss"]],
        "rate": [float(v) for v in history["weight_decay_rate"]],
        "weights": [np.asarray(w, "float64").tolist() for w in model.get_weights()],
        "norms": kerasreg.weight_norms(model),
    }
    with open(os.path.join(out_dir, f"worker{index}.json"), "w") as handle:
        json.dump(result, handle)
    if engine == "jax" and distributed:
        import jax

        jax.distributed.shutdown()


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    engine_, index_, workers_, out_dir_ = arguments
    worker(engine_, int(index_), int(workers_), out_dir_, "--crash" in sys.argv)
