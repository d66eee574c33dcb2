"""The last engine of `sweep`: K separate fits, one after another.

Exact for any template (each variant is an ordinary compiled model fitted on
its own), and as slow as K fits. It needs data that can be read K times: a
one-pass iterator (a Python generator) is refused before anything trains.
"""

from __future__ import annotations

import keras

from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.monitor import Monitor

PREPARE = "compile"  # what fit needs beforehand (kerasreg.sweep.engines)
NAME = "sequential"
OWN_OPTIMIZERS = True  # each variant trained by its own fit


def why_not(
    template: keras.Model, variants: list[keras.Model], context: SweepContext
) -> str | None:
    """Why K separate fits cannot train these variants (None: they can)."""
    if context.one_pass and len(variants) > 1:
        return (
            f"`{context.one_pass_argument}` is a one-pass iterator (such as a "
            f"Python generator): it can be read once, and K={len(variants)} "
            "separate fits would each read it"
        )
    return None


def fit(variants, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Fit each compiled variant on its own; each variant's history."""
    histories = []
    verbose = fit_kwargs.get("verbose", "auto")
    for variant, name, log in zip(variants, names, logs, strict=True):
        monitor = Monitor([variant], [name], [log], verbose, split=None)
        callbacks = [*(fit_kwargs.get("callbacks") or []), monitor]
        variant.fit(x, y, **{**fit_kwargs, "callbacks": callbacks})
        histories.append(monitor.histories[0])
    return histories
