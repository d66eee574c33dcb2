"""`sweep`: a grid of penalties trained side by side in one `fit`.

There is no formula for a penalty's strength: one searches a log-scale grid.
`sweep` trains the K variants of a compiled template model (one per penalty)
as K sub-models of one stacked functional model, on the same batches, in one
`fit`. The stacked loss is the sum of the K variants' losses (each variant's
data loss plus its own penalty), so the gradient of each variant's weights is
exactly that variant's own gradient; Keras's optimizers update every variable
from its own gradient and its own slots, so one optimizer over the stack
makes the very updates K separate optimizers would. Everything that couples
variables across the whole model (global-norm clipping, dynamic loss scaling)
breaks this; such templates, and inputs the stack does not handle, are
trained one variant after another instead, with a log line saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import keras

from kerasreg import _compat
from kerasreg.attach import ROLES
from kerasreg.penalties import get
from kerasreg.selection import walk_layers
from kerasreg.sweep import mapped  # sweep-vmap hook
from kerasreg.sweep.data import is_array, is_dataset
from kerasreg.sweep.monitor import Monitor, VariantLog
from kerasreg.sweep.result import (
    SweepResult,
    make_row,
    strength,
    unique,
    variant_name,
    write_hparams,
)
from kerasreg.sweep.stacked import fit_together
from kerasreg.sweep.variants import compile_like, make_variant

__all__ = ["SweepResult", "sweep"]

logger = logging.getLogger("kerasreg")


def sweep(
    model: keras.Model,
    penalties: Sequence[Any],
    x: Any,
    y: Any = None,
    *,
    role: str = "kernel",
    where: Any = None,
    log_dir: str | os.PathLike | None = None,
    **fit_kwargs: Any,
) -> SweepResult:
    """Train one copy of a compiled model per penalty, side by side in one `fit`.

    Each variant is a copy of `model` (same architecture, the template's
    current weights, its loss and metrics, a fresh optimizer from its
    optimizer's config) carrying its own penalty through `kerasreg.regularize`.
    The K variants become K branches of one functional model, fitted once on
    the same batches (one shuffling order shared by all) with the loss

    `sum_k (data_loss_k + penalty_k)`,

    so the gradient of variant k's weights is exactly its own; as Keras's
    optimizers (SGD, momentum, Adam, ... and per-variable `clipnorm`/`clipvalue`,
    gradient accumulation, EMA) update each variable from its own gradient and
    slots, this is the same computation as K separate fits with the same data
    order. Each variant's history is reported as a separate fit reports it:
    its `loss` includes its own penalty only.

    Templates for which one stacked fit is not exact or not supported are
    trained one variant after another (K separate fits), with a log line on
    the `"kerasreg"` logger: an optimizer with `global_clipnorm` or loss
    scaling, stateful layers, several inputs or outputs, `callbacks` (they
    would see the stacked model; they are given to each of the K fits
    instead), and training data other than arrays, a
    `keras.utils.PyDataset` or a `tf.data.Dataset`.

    The engine is chosen per template (`SweepResult.engine`). A chain of
    `Dense` and activation layers with the usual penalties (kerasreg's L1,
    L2 and elastic net, Keras's L1, L2 and L1L2), a per-sample loss, mean
    metrics (accuracy, MSE, ...) and an elementwise optimizer (SGD, Adam,
    AdamW, RMSprop, ...) is `"vectorized"`: one model whose weights have a
    leading axis of K, so a step is one batched matrix product per layer and
    one optimizer update. Other templates are `"stacked"` (K copies side by
    side). Both are the same computation as K separate fits.

    Args:
        model: a built and compiled `keras.Model` (Sequential or functional),
            the template. It is neither trained nor changed.
        penalties: a non-empty list; each item is anything `regularize`
            accepts for `role` (`None` = no penalty for that role), or a dict
            `{role: penalty}` for several roles at once.
        x: training inputs, as for `fit`.
        y: training targets, as for `fit`.
        role: `"kernel"` (default), `"recurrent"` or `"bias"`: the role of
            the penalties given without a dict.
        where: which weights get the penalties: `regularize`'s `where=`, the
            selection rule used everywhere in kerasreg (`None` = every weight
            of the role; a regular expression searched in weight paths such
            as `"hidden/kernel"`; or a selector such as
            `kerasreg.layer("^hidden$")`).
        log_dir: optional TensorBoard root: one run per variant,
            `log_dir/<penalty name>/train|validation`, with Keras's
            `epoch_<metric>` scalars and `WeightNormLogger` data, plus the
            HParams experiment (`penalty`, `strength`, final metrics).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`,
            `validation_data`, `validation_split`, `shuffle`, `verbose`, ...).
            With `verbose=1` the best variant so far (by `val_loss`, else
            `loss`) is printed at each epoch end.

    Returns:
        A `SweepResult`.

    Raises:
        TypeError: `model` is not a Keras model, or `penalties` is not a list.
        ValueError: `penalties` is empty, `role` is unknown, a penalty cannot be
            resolved or targets a role the model lacks, the template is not
            built or not compiled, or it cannot be copied.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16),
    ...                           keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.random.rand(32, 2), np.random.rand(32, 1)
    >>> grid = [None] + [kerasreg.L2Penalty(a) for a in (1e-3, 1e-2)]
    >>> result = kerasreg.sweep(model, grid, x, y, epochs=3,
    ...                         verbose=0)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    """
    _check_template(model)
    variants = _check_penalties(penalties, role)
    names = unique([variant_name(v) for v in variants])
    compile_config = model.get_compile_config()
    models = [make_variant(model, v, where, i) for i, v in enumerate(variants)]
    reason = _why_not_stacked(model, x, y, fit_kwargs, compile_config)
    # get_config drops `exclude_from_weight_decay`: carried over by hand.
    exclusions = _compat.weight_decay_exclusions(model.optimizer, model.weights)
    if log_dir is not None:
        log_dir = os.fspath(log_dir)
    logs = [
        VariantLog(os.path.join(log_dir, name)) if log_dir is not None else None
        for name in names
    ]
    verbose = fit_kwargs.get("verbose", "auto")
    # --- sweep-vmap hook (for engines.py): jax.vmap of the template's step ---
    mapped.check_variants_axis(model, models, {"fit_kwargs": fit_kwargs})
    mapped_reason = mapped.why_not(model, models, {"fit_kwargs": fit_kwargs})
    if mapped_reason is None:
        histories = mapped.fit(
            models, names, logs, compile_config, exclusions, x, y, fit_kwargs
        )
        engine, reason = "vectorized", "mapped"
    # --- end of the sweep-vmap hook ---
    elif reason is None:
        histories, engine = fit_together(
            models, names, logs, compile_config, exclusions, x, y, fit_kwargs
        )
    else:
        logger.warning(
            "kerasreg.sweep: %s; training the %d variants one after another "
            "(K separate fits).",
            reason,
            len(models),
        )
        histories = []
        for variant, name, log in zip(models, names, logs, strict=True):
            compile_like(variant, compile_config, exclusions)
            monitor = Monitor([variant], [name], [log], verbose, split=None)
            callbacks = [*(fit_kwargs.get("callbacks") or []), monitor]
            kwargs = {**fit_kwargs, "callbacks": callbacks}
            variant.fit(x, y, **kwargs)
            histories.append(monitor.histories[0])
        engine = "sequential"
    for variant in models:
        variant.name = model.name
        if reason is None:  # sweep-vmap hook: "mapped" variants stay as trained
            compile_like(variant, compile_config, exclusions)
    rows = [
        make_row(name, v, strength(v), history)
        for name, v, history in zip(names, variants, histories, strict=True)
    ]
    if log_dir is not None:
        write_hparams(log_dir, rows)
    return SweepResult(rows, models, engine)


# --- validation ---------------------------------------------------------------


def _check_template(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            "kerasreg.sweep: invalid `model`: expected a compiled keras.Model. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} has no known input "
            "(a Sequential model without `keras.Input`, or a subclassed model). "
            "Build it with `keras.Input(shape)` first."
        )
    if not model.compiled or not model.get_compile_config():
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} is not compiled. "
            "Compile the template with its optimizer, loss and metrics first: "
            "every variant is compiled like it."
        )


def _check_penalties(penalties: Any, role: str) -> list[dict[str, Any]]:
    if role not in ROLES:
        raise ValueError(
            f"kerasreg.sweep: invalid `role`: expected one of {sorted(ROLES)}. "
            f"Received: role={role!r}."
        )
    if isinstance(penalties, (str, bytes, dict)) or not isinstance(penalties, Sequence):
        raise TypeError(
            "kerasreg.sweep: invalid `penalties`: expected a list of penalties "
            "(or None, or dicts {role: penalty}). Received: "
            f"penalties={penalties!r} (type {type(penalties).__name__})."
        )
    if not penalties:
        raise ValueError(
            "kerasreg.sweep: invalid `penalties`: the list is empty; give at "
            "least one penalty (None for no penalty)."
        )
    variants = []
    for index, item in enumerate(penalties):
        mapping = item if isinstance(item, dict) else {role: item}
        resolved = {}
        for key, value in mapping.items():
            if key not in ROLES:
                raise ValueError(
                    f"kerasreg.sweep: invalid `penalties[{index}]`: unknown role "
                    f"{key!r}; expected one of {sorted(ROLES)}. Received: {item!r}."
                )
            try:
                resolved[key] = get(value)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"kerasreg.sweep: invalid `penalties[{index}]`: {error}"
                ) from None
        variants.append(resolved)
    return variants


def _why_not_stacked(model, x, y, fit_kwargs, compile_config) -> str | None:
    """Why one stacked fit would not be exact or is not supported (None: it is)."""
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return "the optimizer scales the loss (one scale for all variables)"
    if getattr(optimizer, "global_clipnorm", None):
        return "the optimizer clips by global norm (one norm over all variables)"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return "the template has several inputs or outputs"
    if any(getattr(layer, "stateful", False) for layer, _ in walk_layers(model)):
        return "the template has stateful layers"
    if fit_kwargs.get("callbacks"):
        return "`callbacks` are given (in one stacked fit they would see the stack)"
    if isinstance(x, keras.utils.PyDataset) or is_dataset(x):
        return None
    if not (is_array(x) and is_array(y)):
        return "`x`/`y` are not arrays, a keras.utils.PyDataset or a tf.data.Dataset"
    return None
