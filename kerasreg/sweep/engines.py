"""Which engine trains a sweep, and why: each engine proves it can before it runs.

An engine is a module with `NAME` (the user-facing engine name),
`why_not(template, variants, context) -> str | None` (None: it can train
these variants exactly, proven from what it knows of every layer, loss,
metric, optimizer and the data; otherwise the reason, one short sentence),
`fit(variants, names, logs, compile_config, exclusions, x, y, fit_kwargs)`
(each variant's `History.history`, as its own fit reports it; the one-fit
engines return a `kerasreg.sweep.stopping.Histories`, whose `best_epochs`
are the epochs each variant's `EarlyStopping` restored), and
optionally `describe(template, variants, context) -> str` (what runs),
`PREPARE` (what `fit` needs of the variants beforehand: `"all"`, the
default: each compiled like the template, its loss and metrics built on two
samples; `"first"`: each compiled, only the first one's built; `"compile"`: each compiled, nothing
built; `"none"`: `fit` prepares them itself), `BACKENDS` (the backends it
runs on; default all), `OWN_OPTIMIZERS` (True: each trained variant
keeps the optimizer state of its own training; otherwise it gets a fresh
optimizer afterwards, the one fit's optimizer having trained the stack) and
`Steps` (a class made once per sweep from all its variants and given to
every `fit` as `steps=`: what the fits of a sweep in groups share, such as
compiled steps).

`IMPLEMENTATIONS` are tried in order; the first whose `why_not` is None
trains the sweep. Every engine passed over is logged at INFO on the
`"kerasreg"` logger with its reason; falling back to K separate fits is a
WARNING (no speed-up). A sweep whose grid points need K separate fits
(`SweepContext.separate`: post-step transforms, a callback other than
`EarlyStopping`, `TerminateOnNaN`, `ModelCheckpoint`, `CSVLogger` and
`ReduceLROnPlateau`, and `seeds=` with a template that draws from the
global random generators, named in the reason) goes to the sequential
engine, logged once at INFO (the user asked for it).

Callbacks in one fit (`kerasreg.sweep.stopping`): those five keep a one-fit
engine. Each variant gets its own copies, driven by the engine's `Monitor`
with the variant's own logs and model; a variant stops where its own fit
would, and ends with the state it had then. Each one-fit engine's `why_not`
asks `stopping.why_not` what it cannot do exactly (an optimizer with
`use_ema=True`, a `keras.distribution`, and, on the engines that keep no
optimizer state per variant, a `ModelCheckpoint`: its file holds the
optimizer's state).
"""

from __future__ import annotations

import logging
import math
import os
import types

import keras
import numpy as np

from kerasreg import _compat
from kerasreg.sweep import data, kernels, mapped, sequential, stacked, vectorized
from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.variants import compile_like

logger = logging.getLogger("kerasreg")

ENGINES = ("vectorized", "stacked", "sequential")
# The `"vectorized"` engine on JAX: `jax.vmap` of the template's own train
# step over the K axis of its state (`kerasreg.sweep.mapped`), exact by
# construction for any layer, loss, metric and optimizer option. It compiles
# and builds the variants itself, and hands each its own optimizer state.
MAPPED = types.SimpleNamespace(
    NAME="vectorized",
    PREPARE="none",
    BACKENDS=("jax",),
    OWN_OPTIMIZERS=True,
    why_not=lambda template, variants, context: (
        stacked.separate_fit_layers(template)
        or mapped.why_not(template, variants, context)
    ),
    fit=mapped.fit,
    Steps=mapped.Steps,
    describe=lambda template, variants, context: (
        "jax.vmap of the template's train step"
    ),
)
# (label, module), fastest first.
IMPLEMENTATIONS = (
    ("jax.vmap", MAPPED),
    ("batched kernels", vectorized),
    ("stacked", stacked),
    ("sequential", sequential),
)
_WHAT = {
    "stacked": "K copies side by side in one fit",
    "sequential": "K separate fits, one after another",
}


def context(model, x, y, fit_kwargs, compile_config, exclusions) -> SweepContext:
    """What the choice of an engine depends on, besides the models."""
    return SweepContext(
        backend=keras.backend.backend(),
        data_kind=data.kind(x),
        fit_kwargs=dict(fit_kwargs),
        distribution=keras.distribution.distribution(),
        compile_config=compile_config,
        exclusions=exclusions,
        x=x,
        y=y,
        batch_size=fit_kwargs.get("batch_size") or 32,
    )


def choose(template, variants, context: SweepContext, engine: str = "auto"):
    """`(engine name, module, reason)`: the engine that trains the variants.

    Raises:
        ValueError: `engine` is forced and cannot take the template, or no
            engine can (one-pass data that would need K fits). Nothing has
            been trained.
    """
    if engine not in ("auto", *ENGINES):
        raise ValueError(
            "kerasreg.sweep: invalid `engine`: expected 'auto', "
            f"{', '.join(repr(e) for e in ENGINES)}. Received: engine={engine!r}."
        )
    # A mesh axis "variants" asks for K over devices, which only jax.vmap of
    # the template's step does: any other engine would hold all K on every
    # device, so it is refused here, before anything trains.
    mapped.check_variants_axis(template, variants, context)
    passed: list[tuple[str, str]] = []
    for label, module in IMPLEMENTATIONS:
        if engine not in ("auto", module.NAME):
            continue
        if context.backend not in getattr(module, "BACKENDS", (context.backend,)):
            continue
        if context.separate is not None and module.NAME != "sequential":
            # Asked for by the grid, seeds or callbacks: no one-fit engine.
            reason: str | None = context.separate
        else:
            reason = module.why_not(template, variants, context)
        if reason is None:
            describe = getattr(module, "describe", None)
            what = (
                describe(template, variants, context)
                if describe is not None
                else _WHAT.get(module.NAME, label)
            )
            if passed:
                what += "; " + _passed_over(passed)
            if module.NAME == "sequential" and context.separate is not None:
                logger.info(
                    "kerasreg.sweep: %s; training the %d variants one after another "
                    "(K separate fits).",
                    context.separate,
                    len(variants),
                )
            elif module.NAME == "sequential" and len(variants) > 1:
                logger.warning(
                    "kerasreg.sweep: %s; training the %d variants one after another "
                    "(K separate fits).",
                    passed[-1][1] if passed else "engine='sequential'",
                    len(variants),
                )
            return module.NAME, module, what
        logger.info("kerasreg.sweep: not %s: %s.", label, reason)
        passed.append((label, reason))
    reasons = "; ".join(f"{label}: {why}" for label, why in passed)
    if engine != "auto":
        raise ValueError(
            f"kerasreg.sweep: invalid `engine`: engine={engine!r} cannot train "
            f"this template ({reasons}). Use engine='auto' to let the sweep pick."
        )
    raise ValueError(
        f"kerasreg.sweep: no engine can train this sweep ({reasons}). Nothing "
        "was trained."
    )


def _passed_over(passed: list[tuple[str, str]]) -> str:
    """`not A: why; not B or C: why`: engines passed over for one reason, together."""
    groups: list[tuple[list[str], str]] = []
    for label, why in passed:
        if groups and groups[-1][1] == why:
            groups[-1][0].append(label)
        else:
            groups.append(([label], why))
    parts = []
    for labels, why in groups:
        names = (
            labels[0]
            if len(labels) == 1
            else (", ".join(labels[:-1]) + " or " + labels[-1])
        )
        parts.append(f"not {names}: {why}")
    return "; ".join(parts)


def prepare(context: SweepContext):
    """Read what the engines need of the data: its first batch, two samples of it.

    Returns the data to give to `fit` (a one-pass iterator whose first batch
    was read is re-chained). Sets `context.sample`, `.sample_weights` and
    `.batch_size`.
    """
    first, x = data.peek(context.x)
    sample = None
    if first is not None or context.data_kind == data.ARRAYS:
        sample = data.sample_batch(x, context.y, first)
    context.x = x
    context.sample = sample
    if first is not None:
        context.batch_size = len(keras.tree.flatten(first)[0])
    context.sample_weights = data.has_sample_weights(x, context.fit_kwargs, first)
    return x


def ready(variants, compile_config, exclusions, context: SweepContext, module):
    """Make the variants of one fit ready for `module.fit` (its `PREPARE`)."""
    needs = getattr(module, "PREPARE", "all")
    if needs == "none":
        return
    sample = context.sample
    for index, variant in enumerate(variants):
        # Each variant is compiled (its loss is read per variant, as by the
        # gradient log); "first": only the first one's metrics are built.
        compile_like(variant, compile_config, exclusions)
        if needs == "first" and index > 0 and not context.fit_kwargs.get("callbacks"):
            # (With callbacks, each variant's copies read its own metrics.)
            continue
        if sample is not None and needs != "compile":
            # The compiled loss and metrics get their variables now, before
            # a one-fit step is traced.
            _compat.build_compiled(variant, *sample)


# --- K in chunks, when K times the activations would not fit ----------------------

# Bytes of a float32 number, and how many copies of each activation and weight
# one training step holds: an activation and its gradient; a weight, its
# gradient and two optimizer slots (Adam's).
_BYTES, _PER_ACTIVATION, _PER_WEIGHT = 4, 2, 4


def variant_bytes(template: keras.Model, batch_size: int) -> int:
    """The memory one variant's training step needs, estimated from its graph.

    `batch_size * (sum of every layer output's size per sample) * 4 bytes * 2`
    (activations and their gradients) plus `(number of weights) * 4 bytes * 4`
    (weights, gradients, two optimizer slots). On TensorFlow, a `Conv2D` on
    each variant's own input (downstream of a layer with weights) also counts
    its im2col patches (`kernel window * input channels` per output
    position), which the batched kernels build there. Unknown dimensions
    count as 1.
    """
    _, calls = _compat.functional_graph(template)
    per_variant: set[int] = set()  # ids of the tensors that differ per variant
    per_sample = 0
    for operation, args, kwargs, outputs in calls:
        fed = any(id(t) in per_variant for t in keras.tree.flatten((args, kwargs)))
        if fed or getattr(operation, "weights", None):
            per_variant.update(id(t) for t in outputs)
        for tensor in outputs:
            per_sample += math.prod(d or 1 for d in tensor.shape[1:])
            if fed and kernels.Conv.builds_patches(operation):
                per_sample += _patches_per_sample(operation, args[0], tensor)
    return _BYTES * _PER_ACTIVATION * batch_size * per_sample + state_bytes(template)


def state_bytes(template: keras.Model) -> int:
    """One variant's training state: its weights, their gradients and two
    optimizer slots, 4 bytes each."""
    return _BYTES * _PER_WEIGHT * sum(math.prod(w.shape) for w in template.weights)


def _patches_per_sample(layer, inputs, outputs) -> int:
    """The size of one sample's im2col patches of a channels-last `Conv2D` call."""
    channels = inputs.shape[-1] or 1
    return math.prod(d or 1 for d in outputs.shape[1:-1]) * (
        math.prod(layer.kernel_size) * channels
    )


def memory_budget() -> int:
    """Bytes one fit of a sweep may use: `KERASREG_SWEEP_MEMORY`, else half of
    the host memory available now (on accelerators, give `chunk_size`).

    Raises:
        ValueError: `KERASREG_SWEEP_MEMORY` is set but not a finite number
            of at least one byte.
    """
    configured = os.environ.get("KERASREG_SWEEP_MEMORY")
    if configured:
        try:
            budget = float(configured)
        except ValueError:
            budget = math.nan
        if not (math.isfinite(budget) and budget >= 1):
            raise ValueError(
                "kerasreg.sweep: invalid environment variable "
                "`KERASREG_SWEEP_MEMORY`: expected a positive number of bytes "
                "(such as 4e9), or unset for half of the memory available. "
                f"Received: KERASREG_SWEEP_MEMORY={configured!r}."
            )
        return int(budget)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX host
        return 2**63
    return available // 2


# One variant's training state (weights, gradients, two optimizer slots),
# in bytes, above which the mapped engine on a JAX CPU trains one variant at a
# time with one compiled step. Measured (K=6, Adam, 3 epochs of 32 batches of
# 128, 2 cores), one at a time / stacked: 1.05 at 0.8 MiB a variant, 1.00 at
# 2 MiB, 0.97 at 4.1 MiB, 0.87 at 6.1 MiB, about 0.66 at 20 MiB (stacked, the K
# variants' state passes through memory at every step; one variant's stays
# in cache).
ONE_AT_A_TIME_BYTES = 4 * 2**20


def one_at_a_time(template: keras.Model, module) -> str | None:
    """Why the variants train one at a time, each group of one with the same
    compiled step, or None (they train stacked)."""
    if module is not MAPPED or keras.distribution.distribution() is not None:
        return None
    import jax

    if jax.default_backend() != "cpu":
        return None
    state = state_bytes(template)
    if state <= ONE_AT_A_TIME_BYTES:
        return None
    return (
        f"a variant's training state ({state / 2**20:.1f} MiB) is above "
        f"{ONE_AT_A_TIME_BYTES // 2**20} MiB: on a CPU one variant at a time, "
        "with one compiled step, is faster than K stacked"
    )


def chunks(template, variants, context: SweepContext, module, chunk_size=None):
    """The variants' indices in groups trained by one fit each, and why
    there are several groups (None: one).

    `chunk_size` (an int) caps a group; without it, a one-fit engine takes as
    many variants as `memory_budget()` holds by `variant_bytes`, and one at a
    time where `one_at_a_time` says so. K separate fits take one variant each
    anyway.

    Raises:
        ValueError: `chunk_size` is not a positive int, or the variants need
            several fits and `x` can be read only once.
    """
    k = len(variants)
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(
            "kerasreg.sweep: invalid `chunk_size`: expected a positive int (the "
            f"most variants trained by one fit) or None. Received: "
            f"chunk_size={chunk_size!r}."
        )
    if module.NAME == "sequential":
        return [list(range(k))], None
    # K over a mesh axis: each fit's variants divide over its devices.
    devices = (mapped.variants_axis_size() if module is MAPPED else None) or 1
    if chunk_size is not None and chunk_size % devices:
        raise ValueError(
            "kerasreg.sweep: invalid `chunk_size`: the distribution's mesh axis "
            f"{mapped.VARIANTS_AXIS!r} spreads each fit's variants over "
            f"{devices} devices, so a fit takes a multiple of {devices}. "
            f"Received: chunk_size={chunk_size!r}."
        )
    size, why = chunk_size, "chunk_size"
    if size is None:
        if context.one_pass:
            return [list(range(k))], None  # one fit is the only way to read it
        need = variant_bytes(template, context.batch_size)
        budget = memory_budget()
        if need > budget:
            logger.warning(
                "kerasreg.sweep: one variant needs about %d bytes, more than the "
                "memory budget of %d (KERASREG_SWEEP_MEMORY or half of the memory "
                "available): each fit trains %d.",
                need,
                budget,
                devices,
            )
        size, why = max(1, budget // max(need, 1)), "memory budget"
        alone = one_at_a_time(template, module)
        if alone is not None:
            size, why = 1, alone
        size = max(devices, size // devices * devices)
    size = int(min(size, k))
    groups = [list(range(start, min(start + size, k))) for start in range(0, k, size)]
    if len(groups) == 1:
        return groups, None
    if context.one_pass:
        raise ValueError(
            f"kerasreg.sweep: invalid `{context.one_pass_argument}`: the {k} "
            f"variants need {len(groups)} fits of at most {size} (chunk_size or "
            "the memory budget), and a one-pass iterator can be read once. "
            "Give arrays or a dataset, or a larger `chunk_size`."
        )
    logger.info(
        "kerasreg.sweep: the %d variants are trained in %d fits of at most %d (%s).",
        k,
        len(groups),
        size,
        why,
    )
    return groups, why
