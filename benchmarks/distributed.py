"""kerasreg on sharded weights: JAX `ModelParallel` over 4 host devices.

    KERAS_BACKEND=jax python benchmarks/distributed.py            # about 4 minutes
    KERAS_BACKEND=jax python benchmarks/distributed.py --quick    # smoke run

Four comparisons, with the harness of `benchmarks/overhead.py` (every call warmed
up once, then timed round after round in rotating order; median, min and max
of the per-round ratio, and the median ratio of process CPU time):

- `weight_norms(model)` on a model whose kernels are sharded over a 2x2 mesh
  of four host devices vs the same model on one device;
- one epoch of `fit` on the sharded model with `WeightDecay` (folded into the
  compiled step) vs the same sharded model with no decay: the per-step cost of
  decaying sharded weights where they live.
- `kerasreg.sweep` of K=3 penalties (none and two `L2Penalty` strengths) on
  the sharded model, one epoch, vs one plain `fit` of a fresh copy of it on the
  mesh, set-up included in both (copies, compiling, tracing), as in
  `benchmarks/sweep.py`: K separate fits would cost about K times the latter.
- `kerasreg.sweep` of K=8 penalties with the variants spread over a mesh axis
  `"variants"` of the four devices (two variants per device, whole batches)
  vs the same sweep on one device (`--variants-only` runs just this row).

Host devices are threads of one CPU: the sharded/unsharded ratio measures the
cost of partitioning (collectives, per-shard dispatch) on this machine, not a
speed-up that real accelerators would give. Results are printed as a table and
written as JSON to `benchmarks/results/distributed.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )

import keras
import numpy as np

import kerasreg

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RATE = 0.001
LAYOUT = {
    "d0/kernel": (None, "model"),
    "d1/kernel": ("batch", "model"),
    "d2/kernel": ("model", None),
}


def overhead():
    """`benchmarks/overhead.py`, for its timing harness."""
    spec = importlib.util.spec_from_file_location("overhead", HERE / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sharded():
    import jax

    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    for path, axes in LAYOUT.items():
        layout_map[f".*/{path}"] = axes
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def mlp(width: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(
                width,
                "relu",
                kernel_regularizer=kerasreg.L2Penalty(1e-4),
                name="d0",
            ),
            keras.layers.Dense(width, "relu", name="d1"),
            keras.layers.Dense(width // 4, name="d2"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def in_scope(distribution, call):
    def run():
        if distribution is None:
            return call()
        with distribution.scope():
            return call()

    return run


def variants_over_devices(harness, rounds, width, steps, batch):
    """A sweep of K=8 with the variants over a 1x4 `("batch", "variants")` mesh
    vs the same sweep on one device (set-up included in both)."""
    import jax

    mesh = keras.distribution.DeviceMesh((1, 4), ["batch", "variants"], jax.devices())
    spread = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps * batch, width)).astype("float32")
    y = rng.normal(size=(steps * batch, width // 4)).astype("float32")
    one = mlp(width)
    with spread.scope():
        on_mesh = mlp(width)
        on_mesh.set_weights(one.get_weights())
    grid = [None] + [kerasreg.L2Penalty(float(c)) for c in np.logspace(-2, -5, 7)]
    fit_kwargs = dict(batch_size=batch, epochs=1, shuffle=False, verbose=0)

    def sweep(template):
        result = kerasreg.sweep(template, grid, x, y, **fit_kwargs)
        if result.engine != "vectorized":
            raise RuntimeError(f"sweep took the {result.engine} engine")
        return result

    # The same numbers, or the timing means nothing.
    a, b = sweep(one), in_scope(spread, lambda: sweep(on_mesh))()
    for row_a, row_b in zip(a.rows, b.rows, strict=True):
        np.testing.assert_allclose(row_a["loss"], row_b["loss"], rtol=1e-5)
    calls = [
        harness.Call("sweep K=8, one device", lambda: sweep(one)),
        harness.Call(
            "sweep K=8, variants over 4 devices",
            in_scope(spread, lambda: sweep(on_mesh)),
        ),
    ]
    harness.run_rounds(calls, rounds)
    parameters = sum(int(np.prod(v.shape)) for v in one.weights)
    row = {
        "workload": f"sweep K=8, MLP {parameters / 1e6:.2f}M parameters, "
        f"{steps} steps of {batch}, set-up included",
        "variant": "variants over 4 host devices (mesh axis 'variants')",
        "reference": "one device",
        "goal": "report",
        **harness.ratios(calls[1], calls[0]),
    }
    return row, {c.name: float(np.median(c.times)) for c in calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    parser.add_argument(
        "--variants-only", action="store_true", help="only the K-over-devices row"
    )
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("keras.distribution.ModelParallel needs KERAS_BACKEND=jax")
    import jax

    if len(jax.devices()) < 4:
        parser.error("needs 4 devices: XLA_FLAGS was set after JAX started")
    harness = overhead()
    rounds = args.rounds or (3 if args.quick else 11)
    width = 256 if args.quick else 1024
    steps = 5 if args.quick else 20
    batch = 64
    spread_row, spread_seconds = variants_over_devices(
        harness, max(rounds // 3, 3) if not args.quick else 1, width // 2, steps, batch
    )
    if args.variants_only:
        print(f"\n{harness.machine()}\n")
        print(harness.table([spread_row]))
        print("\nmedian seconds:", spread_seconds)
        return 0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, width)).astype("float32")
    y = rng.normal(size=(steps * batch, width // 4)).astype("float32")
    distribution = sharded()

    one = mlp(width)
    with distribution.scope():
        split = mlp(width)
        split.set_weights(one.get_weights())
    layout = {v.path: str(v.value.sharding.spec) for v in split.weights}
    where = ".*"
    norms = [
        harness.Call("unsharded", lambda: kerasreg.weight_norms(one, where)),
        harness.Call(
            "sharded",
            in_scope(distribution, lambda: kerasreg.weight_norms(split, where)),
        ),
    ]
    a = norms[0].call()
    b = norms[1].call()
    for path in a:  # the same statistics, or the timing means nothing
        np.testing.assert_allclose(
            [b[path][s] for s in a[path]], list(a[path].values()), rtol=1e-4
        )
    harness.run_rounds(norms, max(3 * rounds, 11))

    with distribution.scope():
        plain = mlp(width)
        decayed = mlp(width)

    def fit(model, callbacks):
        return in_scope(
            distribution,
            lambda: model.fit(
                x,
                y,
                batch_size=batch,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            ),
        )

    decay = [
        harness.Call("no decay", fit(plain, [])),
        harness.Call(
            "WeightDecay (folded)", fit(decayed, [kerasreg.WeightDecay(RATE)])
        ),
    ]
    harness.run_rounds(decay, rounds)

    with distribution.scope():
        template = mlp(width)
    grid = [None, kerasreg.L2Penalty(1e-4), kerasreg.L2Penalty(1e-3)]
    fit_kwargs = dict(batch_size=batch, epochs=1, shuffle=False, verbose=0)

    def plain_fit():
        model = keras.models.clone_model(template)
        model.set_weights(template.get_weights())
        model.compile_from_config(template.get_compile_config())
        model.fit(x, y, **fit_kwargs)

    def sweep():
        result = kerasreg.sweep(template, grid, x, y, **fit_kwargs)
        if not result.stacked:  # K sequential fits: not what this row measures
            raise RuntimeError("sweep did not stack the variants on the mesh")

    sweeps = [
        harness.Call("one plain fit", in_scope(distribution, plain_fit)),
        harness.Call(f"sweep K={len(grid)}", in_scope(distribution, sweep)),
    ]
    harness.run_rounds(sweeps, rounds)

    parameters = sum(int(np.prod(v.shape)) for v in one.weights)
    rows = [
        {
            "workload": f"weight_norms, MLP {parameters / 1e6:.1f}M parameters",
            "variant": "sharded over 2x2 host devices",
            "reference": "one device",
            "goal": "report",
            **harness.ratios(norms[1], norms[0]),
        },
        {
            "workload": f"fit, sharded MLP, {steps} steps of {batch}",
            "variant": "WeightDecay (folded)",
            "reference": "no decay",
            "goal": "report",
            **harness.ratios(decay[1], decay[0]),
        },
        {
            "workload": f"sharded MLP, {steps} steps of {batch}, set-up included",
            "variant": f"sweep K={len(grid)} (one stacked fit)",
            "reference": "one plain fit of a fresh copy",
            "goal": "report",
            **harness.ratios(sweeps[1], sweeps[0]),
        },
    ]
    rows.append(spread_row)
    report = {
        "command": " ".join(
            [
                "KERAS_BACKEND=jax python benchmarks/distributed.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "machine": harness.machine(),
        "devices": len(jax.devices()),
        "layout": layout,
        "rounds": rounds,
        "seconds": {
            **{c.name: float(np.median(c.times)) for c in norms + decay + sweeps},
            **spread_seconds,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}; {rounds} rounds; layout {layout}\n")
    print(harness.table(rows))
    print("\nmedian seconds:", report["seconds"])
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
