"""Which engine trains a sweep, and why: each engine proves it can before it runs.

An engine is a module with `NAME` (the user-facing engine name),
`why_not(template, variants, context) -> str | None` (None: it can train
these variants exactly, proven from what it knows of every layer, loss,
metric, optimizer and the data; otherwise the reason, one short sentence),
`fit(variants, names, logs, compile_config, exclusions, x, y, fit_kwargs)`
(each variant's `History.history`, as its own fit reports it), and
optionally `describe(template, variants, context) -> str` (what runs).

`IMPLEMENTATIONS` are tried in order; the first whose `why_not` is None
trains the sweep. Every engine passed over is logged at INFO on the
`"kerasreg"` logger with its reason; falling back to K separate fits is a
WARNING (no speed-up).
"""

from __future__ import annotations

import logging

import keras

from kerasreg.sweep import data, sequential, stacked, vectorized
from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.variants import compile_like

logger = logging.getLogger("kerasreg")

ENGINES = ("vectorized", "stacked", "sequential")
# (label, module), fastest first. On JAX, `mapped` (jax.vmap of the template's
# own step, another `"vectorized"` implementation) goes first.
IMPLEMENTATIONS = (
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
    passed = []
    for label, module in IMPLEMENTATIONS:
        if engine not in ("auto", module.NAME):
            continue
        reason = module.why_not(template, variants, context)
        if reason is None:
            describe = getattr(module, "describe", None)
            what = (
                describe(template, variants, context)
                if describe is not None
                else _WHAT.get(module.NAME, label)
            )
            if passed:
                what += "; " + "; ".join(f"not {lab}: {why}" for lab, why in passed)
            if module.NAME == "sequential" and len(variants) > 1:
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


def prepare(variants, compile_config, exclusions, context: SweepContext, engine):
    """Compile the variants like the template; for a one-fit `engine`, build
    their losses and metrics on two samples of the data.

    Returns the data to give to `fit` (a one-pass iterator whose first batch
    was read is re-chained). Sets `context.sample` and `.sample_weights`.
    """
    first, x = data.peek(context.x)
    sample = None
    if first is not None or context.data_kind == data.ARRAYS:
        sample = data.sample_batch(x, context.y, first)
    context.x = x
    context.sample = sample
    context.sample_weights = data.has_sample_weights(x, context.fit_kwargs, first)
    for variant in variants:
        compile_like(variant, compile_config, exclusions)
        if sample is not None and engine != "sequential":
            # The compiled loss and metrics get their variables now, before
            # a stacked step is traced.
            prediction = variant(sample[0])
            variant.compute_loss(sample[0], sample[1], prediction, training=False)
            variant.compute_metrics(sample[0], sample[1], prediction, None)
            variant.reset_metrics()
    return x
