"""A sweep of K=8 variants with K spread over a mesh axis `"variants"`; print JSON.

Run by `tests/test_sweep_mapped.py` in a fresh process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and `KERAS_BACKEND=jax`
(host devices must be configured before JAX starts). The same sweep (same
template weights, data and grid) runs three times: with no distribution (one
device), under `keras.distribution.ModelParallel` (no layouts: replicated
weights, batch over `"batch"`) on a `("batch", "variants")`
mesh of 1x4 devices (each device holds two variants, the whole batch) and of
2x2 devices (each device holds four variants and half of each batch), and
on a `("batch", "variants", "model")` mesh of 1x2x2 devices whose `LayoutMap`
splits the hidden kernel's columns over `"model"`. For
each run the script records every variant's history and final weights, and
the shapes of the addressable shards of every stacked weight at the end of
the (last) fit. Then in several fits: two variants a fit over a 2x2 mesh,
one a fit under `DataParallel`; and `chunk_size=3` over a `"variants"` axis
of four, which must be refused (its message is recorded).

The last line of stdout is `RESULT <json>`.
"""

from __future__ import annotations

import contextlib
import json

import jax
import keras
import numpy as np

import kerasreg
from kerasreg.sweep import mapped

K = 8


def template():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, "tanh", name="hidden"),
            keras.layers.Dropout(0.25, seed=2),
            keras.layers.Dense(1, "sigmoid", name="out"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = (x[:, :1] - 0.5 * x[:, 1:2] > 0).astype("float32")
    return x, y


def run(distribution, chunk_size=None):
    shards = []
    copy_to = mapped.MappedStack.copy_to

    def recording(self, variants, **kwargs):
        shards[:] = [
            [list(s.data.shape) for s in v.value.addressable_shards]
            for v in self.trainable_variables
        ]
        return copy_to(self, variants, **kwargs)

    mapped.MappedStack.copy_to = recording
    try:
        grid = [kerasreg.L2Penalty(float(c)) for c in np.logspace(-1, -4, K - 1)]
        grid = [None, *grid]
        x, y = data()
        scope = (
            contextlib.nullcontext() if distribution is None else distribution.scope()
        )
        with scope:
            model = template()
            result = kerasreg.sweep(
                model,
                grid,
                x,
                y,
                epochs=2,
                batch_size=8,
                shuffle=False,
                validation_split=0.25,
                verbose=0,
                chunk_size=chunk_size,
            )
    finally:
        mapped.MappedStack.copy_to = copy_to
    return {
        "engine": result.engine,
        "engine_reason": result.engine_reason,
        "histories": [row["history"] for row in result.rows],
        "weights": [[w.tolist() for w in m.get_weights()] for m in result.models],
        "shards": shards,
    }


def main():
    devices = jax.devices()
    runs = {"one device": run(None)}
    for shape in ((1, 4), (2, 2)):
        mesh = keras.distribution.DeviceMesh(shape, ["batch", "variants"], devices)
        runs[f"{shape[0]}x{shape[1]}"] = run(
            keras.distribution.ModelParallel(
                layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
            )
        )
    # With the template's own layouts: its hidden kernel split over "model".
    mesh = keras.distribution.DeviceMesh(
        (1, 2, 2), ["batch", "variants", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    runs["1x2x2 model"] = run(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    # In several fits: of two variants over a "variants" axis of two; of one
    # variant each under DataParallel (no "variants" axis).
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "variants"], devices)
    runs["2x2 in fits of 2"] = run(
        keras.distribution.ModelParallel(
            layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
        ),
        chunk_size=2,
    )
    runs["DataParallel in fits of 1"] = run(
        keras.distribution.DataParallel(devices=devices), chunk_size=1
    )
    mesh = keras.distribution.DeviceMesh((1, 4), ["batch", "variants"], devices)
    try:
        run(
            keras.distribution.ModelParallel(
                layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
            ),
            chunk_size=3,
        )
        refused = None
    except ValueError as error:
        refused = str(error)
    print(
        "RESULT "
        + json.dumps({"devices": len(devices), "runs": runs, "refused": refused})
    )


if __name__ == "__main__":
    main()
