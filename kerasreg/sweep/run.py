"""`sweep`: a grid of penalties trained side by side, each variant exactly its own fit.

There is no formula for a penalty's strength: one searches a log-scale grid.
`sweep` makes one variant of a compiled template model per penalty and trains
them with the fastest engine that can prove it gives each variant the very
result of its own separate fit (`kerasreg.sweep.engines`): one batched step
for all variants (`"vectorized"`), K copies side by side in one `fit`
(`"stacked"`), or K separate fits (`"sequential"`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras

from kerasreg import _compat
from kerasreg.attach import ROLES
from kerasreg.penalties import get
from kerasreg.sweep import engines
from kerasreg.sweep.monitor import VariantLog
from kerasreg.sweep.result import (
    SweepResult,
    make_row,
    strength,
    unique,
    variant_name,
    write_hparams,
)
from kerasreg.sweep.variants import compile_like, make_variant

__all__ = ["SweepResult", "sweep"]


def sweep(
    model: keras.Model,
    penalties: Sequence[Any],
    x: Any,
    y: Any = None,
    *,
    role: str = "kernel",
    where: Any = None,
    log_dir: str | os.PathLike | None = None,
    engine: str = "auto",
    chunk_size: int | None = None,
    **fit_kwargs: Any,
) -> SweepResult:
    """Train one copy of a compiled model per penalty, each exactly its own fit.

    Each variant is a copy of `model` (same architecture, the template's
    current weights and `trainable` flags, the state of the penalties it
    already carries such as an `L2SPPenalty`'s reference, its loss and
    metrics, a fresh optimizer from its optimizer's config) carrying its own
    penalty through `kerasreg.regularize`. Each variant's history and final
    weights are those of its own separate `fit` on the same data (in the
    same order: one shuffling order is shared by the variants of one fit);
    its `loss` includes its own penalty only.

    An engine trains them (`SweepResult.engine`; `engine_reason` says what
    ran and why): the fastest that can prove, from what it knows of every
    layer, loss, metric, optimizer and of the data, that it is exact. Each
    engine passed over is logged at INFO on the `"kerasreg"` logger, with
    its reason.

    - `"vectorized"`: one batched step trains all K variants: every weight
      has a leading axis of K. On JAX, the template's own train step is
      mapped with `jax.vmap` over that axis (any layer, loss, metric and
      optimizer option; not stateful layers or `callbacks`). Elsewhere (or
      where `jax.vmap` cannot), batched kernels exist for `Dense` (inputs of
      any rank), `Conv1D/2D/3D`, `DepthwiseConv1D/2D`,
      `SeparableConv1D/2D`, `Embedding`, `BatchNormalization` and
      `LayerNormalization` (statistics per variant), `Dropout`, `Flatten`,
      `Reshape`, pooling, activations and merging layers (`Add`,
      `Concatenate`, ...), in any functional graph (residual branches,
      several inputs and outputs), matched by exact class (a subclass with
      its own `call` is another layer), with Keras's elementwise optimizers
      (SGD, Adam, AdamW, RMSprop, ...; `clipnorm`, `global_clipnorm` and
      `clipvalue` act on each variant's own gradients). Keras's per-sample
      losses and metrics are computed once over the K variants'
      predictions; any other loss or metric (a user's function, a
      `Loss`/`Metric` subclass) on each variant's own predictions.
    - `"stacked"`: K copies side by side in one `fit`, each with its own
      `compute_loss` and `compute_metrics` (any layer; not global-norm
      clipping or loss scaling, which couple the copies).
    - `"sequential"`: K separate fits, one after another, logged as a
      WARNING: loss scaling, stateful layers, `callbacks` (given to each of
      the K fits).

    `Dropout`: with `Dropout(seed=s)` every variant draws the masks its own
    fit draws (a copy keeps the seed: the same masks for all variants, as
    in their separate fits); without a seed each variant draws its own
    independent masks, random as in a separate fit.

    Data: arrays, a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
    Python generator (read once: where the template needs K separate fits,
    `sweep` refuses before anything trains), or anything `fit` reads
    several times. Memory: one fit holds K times a variant's activations;
    when `kerasreg.sweep.engines.variant_bytes` times K exceeds half of the
    memory available (or `KERASREG_SWEEP_MEMORY` bytes), the variants are
    trained in several fits of as many as fit (each fit shuffles its own
    order); `chunk_size` sets the most variants per fit.

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
        engine: `"auto"` (default: the fastest exact engine), or
            `"vectorized"`, `"stacked"` or `"sequential"` to force one; a
            forced engine that cannot train the template raises before
            anything trains.
        chunk_size: the most variants one fit trains (default: as many as
            the memory rule allows).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`,
            `validation_data`, `validation_split`, `shuffle`, `verbose`, ...).
            With `verbose=1` the best variant so far (by `val_loss`, else
            `loss`) is printed at each epoch end.

    Returns:
        A `SweepResult`.

    Raises:
        TypeError: `model` is not a Keras model, or `penalties` is not a list.
        ValueError: `penalties` is empty, `role` or `engine` is unknown, a
            penalty cannot be resolved or targets a role the model lacks, the
            template is not built or not compiled, or it cannot be copied; a
            forced engine cannot train the template; `x` can be read once and
            the sweep needs several fits. Nothing is trained.

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
    # get_config drops `exclude_from_weight_decay`: carried over by hand.
    exclusions = _compat.weight_decay_exclusions(model.optimizer, model.weights)
    models = [make_variant(model, v, where, i) for i, v in enumerate(variants)]
    context = engines.context(model, x, y, fit_kwargs, compile_config, exclusions)
    name, implementation, reason = engines.choose(model, models, context, engine)
    if context.one_pass:  # refused before its first batch is read
        groups = engines.chunks(model, models, context, implementation, chunk_size)
    x = engines.prepare(context)
    if not context.one_pass:  # the batch size of a dataset is read from it
        groups = engines.chunks(model, models, context, implementation, chunk_size)
    if len(groups) > 1:
        reason += f"; in {len(groups)} fits of at most {len(groups[0])} variants"
    if log_dir is not None:
        log_dir = os.fspath(log_dir)
    logs = [
        VariantLog(os.path.join(log_dir, n)) if log_dir is not None else None
        for n in names
    ]
    histories = []
    for group in groups:
        chosen = [models[i] for i in group]
        engines.ready(chosen, compile_config, exclusions, context, implementation)
        histories += implementation.fit(
            chosen,
            [names[i] for i in group],
            [logs[i] for i in group],
            compile_config,
            exclusions,
            x,
            y,
            fit_kwargs,
        )
    for variant in models:
        variant.name = model.name
        if not getattr(implementation, "OWN_OPTIMIZERS", False):
            # A fresh optimizer: the one fit's optimizer trained the stack.
            compile_like(variant, compile_config, exclusions)
    rows = [
        make_row(n, v, strength(v), history)
        for n, v, history in zip(names, variants, histories, strict=True)
    ]
    if log_dir is not None:
        write_hparams(log_dir, rows)
    return SweepResult(rows, models, name, reason)


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
