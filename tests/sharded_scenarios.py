"""Run kerasreg on a JAX `ModelParallel` 2x2 mesh and on one device; print JSON.

Run by `tests/test_sharded.py` in a fresh process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and `KERAS_BACKEND=jax`
(host devices must be configured before JAX starts). Every scenario runs twice
from the same initial weights: once with no distribution (one device) and once
under `keras.distribution.ModelParallel` whose `LayoutMap` shards the kernels
over a `("batch", "model")` mesh of four devices. For every selected weight the
script records the sharding of its value before and after each operation, and,
for `weight_norms` and `shrink_weights`, the collectives in XLA's compiled
program (an `all-gather` would bring a whole weight onto each device).

The last line of stdout is `RESULT <json>`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import tempfile
import time

import jax
import keras
import numpy as np
from conftest import read_scalars  # this script's folder is on sys.path

import kerasreg


class KerasregPrograms:
    """Every call of a `jax.jit` program that kerasreg compiles, recorded.

    Seen through the public `jax.jit` (kerasreg calls it when it builds the
    `weight_norms` computation or an in-place update), so the scenarios can
    lower exactly the programs kerasreg ran, on the arguments it passed.
    """

    def __init__(self):
        self.calls = []  # (jitted, args, outputs)
        real_jit = jax.jit
        calls = self.calls

        class Recorded:
            def __init__(self, jitted):
                self.jitted = jitted

            def __call__(self, *args):
                out = self.jitted(*args)
                calls.append((self.jitted, args, out))
                return out

            def __getattr__(self, name):  # `lower` and the rest: the real one
                return getattr(self.jitted, name)

        def jit(fn, *args, **kwargs):
            jitted = real_jit(fn, *args, **kwargs)
            if not getattr(fn, "__module__", "").startswith("kerasreg"):
                return jitted  # Keras's own train step etc.: untouched
            return Recorded(jitted)

        jax.jit = jit

    def hlo_of_calls(self, since, outputs=None):
        """XLA's compiled text of the calls made since `since`; with
        `outputs` (a list of shapes), only the calls returning those."""
        texts = []
        for jitted, args, out in self.calls[since:]:
            shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(out)]
            if outputs is None or shapes == outputs:
                texts.append(jitted.lower(*args).compile().as_text())
        return texts


PROGRAMS = KerasregPrograms()  # before any kerasreg program is built

rng = np.random.default_rng(0)
SEQ = rng.normal(size=(16, 3, 8)).astype("float32")  # LSTM model input
Y = rng.normal(size=(16, 4)).astype("float32")
SEQ_V = rng.normal(size=(8, 3, 8)).astype("float32")
YV = rng.normal(size=(8, 4)).astype("float32")
FLAT, FLAT_V = SEQ[:, 0], SEQ_V[:, 0]  # MLP model input
LSTM_SHAPES = [(8, 64), (16, 64), (64,)]  # kernel, recurrent kernel, bias
MLP_SHAPES = [(8, 16), (16,)]  # d0 kernel, bias
HEAD_SHAPES = [(16, 16), (16,), (16, 4), (4,)]  # d1, d2
INIT = {
    name: [rng.normal(size=s).astype("float32") * 0.3 for s in shapes]
    for name, shapes in (
        ("lstm", LSTM_SHAPES),
        ("mlp", MLP_SHAPES),
        ("head", HEAD_SHAPES),
    )
}

# What the LayoutMap asks for, by weight path (biases stay replicated).
LAYOUT = {
    "lstm/lstm_cell/kernel": (None, "model"),  # gate columns split in two
    "lstm/lstm_cell/recurrent_kernel": ("batch", "model"),  # four blocks
    "d0/kernel": (None, "model"),
    "d1/kernel": ("model", "batch"),  # four blocks
    "d2/kernel": (None, "model"),
}


def sharded_distribution():
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    for path, axes in LAYOUT.items():
        layout_map[".*/" + re.escape(path)] = axes  # keys are full-matched
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def build(penalties=True, lstm=False):
    """An LSTM (or Dense) layer, then two Dense layers; kerasreg penalties."""

    def reg(p):
        return p if penalties else None

    if lstm:
        first = [
            keras.Input((3, 8)),
            keras.layers.LSTM(
                16,
                kernel_regularizer=reg(kerasreg.L2Penalty(0.01)),
                recurrent_regularizer=reg(kerasreg.L1Penalty(0.002)),
                name="lstm",
            ),
        ]
    else:
        first = [
            keras.Input((8,)),
            keras.layers.Dense(
                16,
                activation="tanh",
                kernel_regularizer=reg(kerasreg.L2Penalty(0.01)),
                bias_regularizer=reg(kerasreg.L1Penalty(0.002)),
                name="d0",
            ),
        ]
    model = keras.Sequential(
        [
            *first,
            keras.layers.Dense(
                16,
                activation="tanh",
                kernel_regularizer=reg(kerasreg.ElasticNetPenalty(0.003, 0.02)),
                name="d1",
            ),
            keras.layers.Dense(
                4, kernel_regularizer=reg(kerasreg.ExpAbsPenalty(0.004)), name="d2"
            ),
        ]
    )
    model.set_weights(INIT["lstm" if lstm else "mlp"] + INIT["head"])
    return model


def paths(model):
    names = kerasreg.selection.weight_paths(model)
    return [names[id(v)] for v in model.weights]


def weights(model):
    return [np.asarray(w, "float64").tolist() for w in model.get_weights()]


def shardings(model):
    """Per weight path: (partition spec as a list, number of devices, shard shape)."""
    out = {}
    for path, v in zip(paths(model), model.weights, strict=True):
        sharding = v.value.sharding
        spec = getattr(sharding, "spec", None)
        shard_shape = list(sharding.shard_shape(tuple(v.shape)))
        if spec is not None:
            # JAX reads missing trailing entries as None: PartitionSpec() and
            # PartitionSpec(None) are the same layout of a vector (Keras keeps
            # an equivalent sharding as it is), so the spec is padded.
            spec = list(spec) + [None] * (len(v.shape) - len(spec))
        out[path] = [
            spec,
            len(sharding.device_set),
            shard_shape,
        ]
    return out


def gathers(hlo_text):
    """Element counts of the results of every `all-gather` in a compiled program."""
    sizes = []
    for match in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo_text):
        dims = [int(d) for d in match.group(1).split(",") if d]
        sizes.append(int(np.prod(dims)) if dims else 1)
    return sizes


def collective_count(hlo_text):
    return len(
        re.findall(
            r"\b(?:all-gather|all-reduce|all-to-all|collective-permute)", hlo_text
        )
    )


def inputs(model, validation=False):
    if len(model.inputs[0].shape) == 3:
        return SEQ_V if validation else SEQ
    return FLAT_V if validation else FLAT


def fit(model, epochs=1, **kwargs):
    history = model.fit(
        inputs(model),
        Y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        **kwargs,
    )
    return history.history


def evaluate(model):
    return float(model.evaluate(inputs(model), Y, batch_size=8, verbose=0))


def scenario_regularize():
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    first = fit(model)["loss"]
    before = weights(model)
    e0 = evaluate(model)
    kerasreg.regularize(
        model, kernel=kerasreg.L2Penalty(0.02), bias=kerasreg.L1Penalty(0.01)
    )
    at_regularize = weights(model)
    sharding_at_regularize = shardings(model)
    e1 = evaluate(model)
    second = fit(model)["loss"]
    return {
        "loss": first + second,
        "evaluate_before": e0,
        "evaluate_after": e1,
        "weights_before": before,
        "weights_at_regularize": at_regularize,
        "weights": weights(model),
        "sharding_at_regularize": sharding_at_regularize,
        "sharding": shardings(model),
    }


def decay_variants():
    half = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    return {
        # Folded into the train step, constant rate.
        "step": (kerasreg.WeightDecay(0.1), {}),
        # Folded, two steps per compiled execution.
        "step_spe2": (kerasreg.WeightDecay(0.1), {"steps_per_execution": 2}),
        # Folded, rate from a LearningRateSchedule on optimizer.iterations.
        "schedule": (kerasreg.WeightDecay(schedule=half), {}),
        # A Python callable schedule: the callback's own compiled update.
        "python_schedule": (kerasreg.WeightDecay(schedule=lambda t: 0.1 / (t + 1)), {}),
        # Per epoch.
        "epoch": (kerasreg.WeightDecay(0.1, frequency="epoch"), {}),
    }


def scenario_decay_closed_form():
    # Zero learning rate: only the decay moves the weights.
    out = {}
    for name, (decay, compile_kwargs) in decay_variants().items():
        model = build(penalties=False)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **compile_kwargs)
        start = shardings(model)
        history = fit(model, epochs=2, callbacks=[decay])
        out[name] = {
            "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            "rate": history["weight_decay_rate"],
            "weights": weights(model),
            "sharding_start": start,
            "sharding": shardings(model),
        }
    return out


def scenario_decay_training():
    # Real training: gradients, penalties and decay together.
    out = {}
    variants = {
        "folded": kerasreg.WeightDecay(0.05),
        "lr_scaled": kerasreg.WeightDecay(0.5, lr_scaled=True),
    }
    for name, decay in variants.items():
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        history = fit(model, epochs=2, callbacks=[decay])
        out[name] = {
            "loss": history["loss"],
            "rate": history["weight_decay_rate"],
            "weights": weights(model),
            "sharding": shardings(model),
        }
    return out


class StepProgram(keras.callbacks.Callback):
    """At `on_train_begin`, after the callbacks before it, compile the train step.

    A `WeightDecay` listed before it has folded itself into `model.train_step`
    by then; the step is lowered on the trainer's state and one batch, and the
    all-gathers and collectives of XLA's compiled program are recorded.
    """

    def on_train_begin(self, logs=None):
        model = self.model
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        lowered = jax.jit(model.train_step).lower(state, (FLAT[:8], Y[:8]))
        hlo = lowered.compile().as_text()
        self.result = {
            "folded": not inspect.ismethod(model.train_step),
            "gathers": gathers(hlo),
            "collectives": collective_count(hlo),
        }


def scenario_decay_step_program():
    # The compiled train step with the decay folded in vs without it.
    out = {}
    for name, callbacks in (("plain", []), ("decay", [kerasreg.WeightDecay(0.1)])):
        model = build(penalties=False)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        probe = StepProgram()
        fit(model, callbacks=[*callbacks, probe])
        out[name] = probe.result
    return out


def scenario_shrink():
    model = build(penalties=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    first = fit(model)["loss"]
    before = weights(model)
    start = len(PROGRAMS.calls)
    norms = kerasreg.shrink_weights(model, 0.5)
    shrunk = weights(model)
    sharding_shrunk = shardings(model)
    # The compiled update shrink_weights ran: the program returning new weights.
    new_weights = [tuple(v.shape) for v in kerasreg.select_weights(model)]
    (hlo,) = PROGRAMS.hlo_of_calls(start, outputs=new_weights)
    second = fit(model)["loss"]
    return {
        "loss": first + second,
        "weights_before": before,
        "weights_shrunk": shrunk,
        "norms": norms,
        "weights": weights(model),
        "sharding_shrunk": sharding_shrunk,
        "sharding": shardings(model),
        "collectives": collective_count(hlo),
    }


def scenario_lstm():
    # Penalties in the loss, WeightDecay folded, WeightNormLogger per gate, then
    # weight_norms: all on an LSTM whose gate columns are split across devices.
    model = build(lstm=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    start = shardings(model)
    root = tempfile.mkdtemp()
    history = fit(
        model,
        epochs=2,
        validation_data=(SEQ_V, YV),
        callbacks=[
            kerasreg.WeightDecay(0.01),
            kerasreg.WeightNormLogger(root, where=".*", per_gate=True),
        ],
    )
    out = {
        "loss": history["loss"],
        "val_loss": history["val_loss"],
        "evaluate": evaluate(model),
        "logged": {
            run: read_scalars(os.path.join(root, run))
            for run in ("train", "validation")
        },
        "weights": weights(model),
        "paths": paths(model),
        "sharding_start": start,
    }
    for name, kwargs in (
        ("default", {}),
        ("per_gate", {"where": ".*", "per_gate": True}),
    ):
        start = len(PROGRAMS.calls)
        norms = kerasreg.weight_norms(model, **kwargs)
        (hlo,) = PROGRAMS.hlo_of_calls(start)  # its one compiled computation
        out[name] = {
            "norms": norms,
            "gathers": gathers(hlo),
            "collectives": collective_count(hlo),
        }
    out["sharding"] = shardings(model)
    return out


# --- sweep -------------------------------------------------------------------

SWEEP_PENALTIES = [None, 1e-3, 3e-2]  # no penalty, then L2Penalty(strength)
SWEEP_OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
}


def sweep_reference(penalty):
    """The Dense template with Keras's own `kernel_regularizer` on every layer."""
    reg = None if penalty is None else kerasreg.L2Penalty(penalty)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                16, activation="tanh", kernel_regularizer=reg, name="d0"
            ),
            keras.layers.Dense(
                16, activation="tanh", kernel_regularizer=reg, name="d1"
            ),
            keras.layers.Dense(4, kernel_regularizer=reg, name="d2"),
        ]
    )
    model.set_weights(INIT["mlp"] + INIT["head"])
    return model


def scenario_sweep():
    # K=3 variants of a Dense template whose kernels the LayoutMap shards:
    # `sweep` once, and each variant as a plain separate fit, same batches.
    fit_kwargs = dict(
        batch_size=8,
        epochs=3,
        shuffle=False,
        validation_data=(FLAT_V, YV),
        verbose=0,
    )
    out = {}
    for kind, make_optimizer in SWEEP_OPTIMIZERS.items():
        template = build(penalties=False)
        template.compile(optimizer=make_optimizer(), loss="mse", metrics=["mae"])
        template_before = weights(template)
        template_sharding = shardings(template)
        penalties = [
            None if p is None else kerasreg.L2Penalty(p) for p in SWEEP_PENALTIES
        ]
        result = kerasreg.sweep(template, penalties, FLAT, Y, **fit_kwargs)
        variants = []
        for penalty, row, model in zip(
            SWEEP_PENALTIES, result.rows, result.models, strict=True
        ):
            reference = sweep_reference(penalty)
            reference.compile(optimizer=make_optimizer(), loss="mse", metrics=["mae"])
            separate = reference.fit(FLAT, Y, **fit_kwargs).history
            variants.append(
                {
                    "history": row["history"],
                    "weights": weights(model),
                    "paths": paths(model),
                    "sharding": shardings(model),
                    "separate_history": separate,
                    "separate_weights": weights(reference),
                    "separate_sharding": shardings(reference),
                }
            )
        out[kind] = {
            "stacked": result.stacked,
            "variants": variants,
            "template_before": template_before,
            "template_after": weights(template),
            "template_sharding_before": template_sharding,
            "template_sharding_after": shardings(template),
        }
    return out


def scenario_sweep_template_paths():
    # A LayoutMap keyed by the template's own variable paths (`d0/kernel`, as
    # `variable.path` prints them for a functional model): the variants must
    # get the layout too, though Keras full-matches each key against a path.
    distribution = keras.distribution.distribution()
    scope = contextlib.nullcontext()
    if distribution is not None:
        layout_map = keras.distribution.LayoutMap(distribution.device_mesh)
        for path, axes in LAYOUT.items():
            layout_map[path] = axes
        scope = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        ).scope()
    with scope:
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, activation="tanh", name="d0")(inputs)
        hidden = keras.layers.Dense(16, activation="tanh", name="d1")(hidden)
        template = keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))
        template.set_weights(INIT["mlp"] + INIT["head"])
        template.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        result = kerasreg.sweep(
            template,
            [None, kerasreg.L2Penalty(1e-2)],
            FLAT,
            Y,
            batch_size=8,
            shuffle=False,
            verbose=0,
        )
        return {
            "stacked": result.stacked,
            "template": {"weights": weights(template), "sharding": shardings(template)},
            "variants": [
                {"weights": weights(m), "sharding": shardings(m)} for m in result.models
            ],
        }


def scenario_sweep_data_parallel():
    # `sweep` under DataParallel over the same four devices: replicated
    # weights, each batch split in four.
    scope = contextlib.nullcontext()
    if keras.distribution.distribution() is not None:
        scope = keras.distribution.DataParallel(devices=jax.devices()).scope()
    with scope:
        template = build(penalties=False)
        template.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        result = kerasreg.sweep(
            template,
            [None, kerasreg.L2Penalty(1e-2)],
            FLAT,
            Y,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        return {
            "stacked": result.stacked,
            "variants": [
                {
                    "history": row["history"],
                    "weights": weights(m),
                    "sharding": shardings(m),
                }
                for row, m in zip(result.rows, result.models, strict=True)
            ],
        }


SCENARIOS = {
    name[len("scenario_") :]: fn
    for name, fn in list(globals().items())
    if name.startswith("scenario_")
}


def main(names):
    out = {"devices": len(jax.devices()), "one": {}, "sharded": {}}
    for setting in ("one", "sharded"):
        for name in names:
            keras.utils.clear_session(free_memory=False)
            keras.utils.set_random_seed(0)
            start = time.perf_counter()
            if setting == "sharded":
                with sharded_distribution().scope():
                    out[setting][name] = SCENARIOS[name]()
            else:
                out[setting][name] = SCENARIOS[name]()
            out.setdefault("seconds", {})[f"{setting}/{name}"] = round(
                time.perf_counter() - start, 2
            )
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or list(SCENARIOS))
