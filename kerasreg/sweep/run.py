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
import numpy as np

from kerasreg import _compat
from kerasreg.selection import walk_layers
from kerasreg.sweep import separate
from kerasreg.sweep.data import is_array, is_dataset
from kerasreg.sweep.hparams import write_hparams
from kerasreg.sweep.items import GridPoint, parse_grid
from kerasreg.sweep.monitor import VariantLog
from kerasreg.sweep.repeats import build_variant, check_seeds
from kerasreg.sweep.result import SweepResult
from kerasreg.sweep.rows import make_row, metric_directions, run_name, unique
from kerasreg.sweep.stacked import fit_together
from kerasreg.sweep.variants import compile_like

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
    seeds: Sequence[int] | None = None,
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
    scaling, stateful layers, several inputs or outputs, and training data
    other than arrays, a `keras.utils.PyDataset` or a `tf.data.Dataset`. So
    are, for now, grids with post-step transforms, `seeds=` and `callbacks`:
    each variant's fit gets its own copy of every callback and a fresh
    instance of its transforms (never shared between two fits), and a
    callback's file path takes a `{variant}` field (the variant's run name).

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
        penalties: a non-empty list of grid items. Each item is a penalty
            (anything `regularize` accepts, for `role`), `None` (no penalty
            for that role), a dict `{role: penalty}` for several roles, a
            kerasreg post-step transform (`WeightDecay(rate)`,
            `WeightDecay(rate, toward="start")`, `SoftThreshold(threshold)`;
            it keeps its own `where`), or a list combining them, e.g.
            `[L2Penalty(1e-4), WeightDecay(1e-3)]`. `kerasreg.grid`,
            `kerasreg.product` and `kerasreg.log_range` build such lists.
        x: training inputs, as for `fit`.
        y: training targets, as for `fit`.
        role: `"kernel"` (default), `"recurrent"` or `"bias"`: the role of
            the penalties given without a dict.
        where: which weights get the penalties: `regularize`'s `where=`, the
            selection rule used everywhere in kerasreg (`None` = every weight
            of the role; a regular expression searched in weight paths such
            as `"hidden/kernel"`; or a selector such as
            `kerasreg.layer("^hidden$")`).
        seeds: optional list of ints: every grid item is trained once per
            seed, each run from weights drawn afresh under
            `keras.utils.set_random_seed(seed)` (as if the template were built
            again under that seed; the template's weights are not used), and
            its random layers seeded likewise. `SweepResult.summary()` gives
            the mean and spread per grid item.
        log_dir: optional TensorBoard root: one run per variant,
            `log_dir/<name>/train|validation` (`<name>/seed_<s>` with seeds),
            with Keras's `epoch_<metric>` scalars and `WeightNormLogger`
            data, plus the HParams experiment (grid item, family, knob values;
            the metrics at each run's `best_epoch`).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`,
            `validation_data`, `validation_split`, `shuffle`, `callbacks`,
            `verbose`, ...). With `verbose=1` or `2` the best variant so far
            (by `val_loss`, else `loss`) is named on its own line after each
            epoch.

    Returns:
        A `SweepResult`.

    Raises:
        TypeError: `model` is not a Keras model, `penalties`, `seeds` or
            `callbacks` is not a list, or an item is of the wrong kind.
        ValueError: `penalties` is empty, `role` is unknown, an item cannot be
            resolved, targets a role the model lacks or gives one role two
            penalties, a transform's `where` selects nothing, a callback would
            write one file for all variants, the template is not built or not
            compiled, or it cannot be copied. Nothing has trained then.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16),
    ...                           keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.random.rand(32, 2), np.random.rand(32, 1)
    >>> grid = [None] + kerasreg.grid(kerasreg.L2Penalty, [1e-3, 1e-2])
    >>> result = kerasreg.sweep(model, grid, x, y, epochs=3,
    ...                         verbose=0)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    >>> decay = kerasreg.grid(kerasreg.WeightDecay, kerasreg.log_range(1e-4, 1e-2))
    >>> study = kerasreg.sweep(
    ...     model, kerasreg.product(grid, [None] + decay), x, y, epochs=20,
    ...     validation_split=0.25, seeds=[0, 1, 2], verbose=0,
    ...     callbacks=[keras.callbacks.EarlyStopping(restore_best_weights=True)],
    ... )  # doctest: +SKIP
    >>> study.best_model("val_loss").save("best.keras")  # doctest: +SKIP
    """
    _check_template(model)
    points = parse_grid(penalties, role)
    seeds = check_seeds(seeds)
    runs = _runs(points, seeds)
    names = [run_name(name, seed) for _, _, name, seed in runs]
    callbacks = separate.check_callbacks(fit_kwargs.get("callbacks"), names)
    compile_config = model.get_compile_config()
    models = [
        build_variant(model, point, where, i, seed, item)
        for i, (item, point, _, seed) in enumerate(runs)
    ]
    requested = _why_separate_fits(points, seeds, callbacks)
    reason = requested or _why_not_stacked(model, x, y, fit_kwargs, compile_config)
    # get_config drops `exclude_from_weight_decay`: carried over by hand.
    exclusions = _compat.weight_decay_exclusions(model.optimizer, model.weights)
    if log_dir is not None:
        log_dir = os.fspath(log_dir)
    logs = [
        VariantLog(os.path.join(log_dir, name)) if log_dir is not None else None
        for name in names
    ]
    best_epochs: list[int | None] = [None] * len(models)
    if reason is None:
        histories, engine = fit_together(
            models, names, logs, compile_config, exclusions, x, y, fit_kwargs
        )
    else:
        # Asked for (transforms, seeds, callbacks): INFO; a template the
        # one-fit engines cannot take: WARNING.
        logger.log(
            logging.INFO if requested else logging.WARNING,
            "kerasreg.sweep: %s; training the %d variants one after another "
            "(K separate fits).",
            reason,
            len(models),
        )
        histories, best_epochs = separate.fit(
            models,
            names,
            logs,
            compile_config,
            exclusions,
            x,
            y,
            fit_kwargs,
            transforms=[point.fresh_transforms() for _, point, _, _ in runs],
            fit_seeds=_fit_seeds(runs),
        )
        engine = "sequential"
    directions = metric_directions(models)  # while the compiled metrics are built
    for variant in models:
        variant.name = model.name
        if reason is None:
            compile_like(variant, compile_config, exclusions)
    rows = [
        make_row(point, name, seed, history, best)
        for (_, point, name, seed), history, best in zip(
            runs, histories, best_epochs, strict=True
        )
    ]
    if log_dir is not None:
        write_hparams(log_dir, rows)
    return SweepResult(rows, models, engine, directions=directions)


# --- grid points, seeds and callbacks (issue 22) ----------------------------------


def _runs(
    points: list[GridPoint], seeds: list[int] | None
) -> list[tuple[int, GridPoint, str, int | None]]:
    """`(item, point, name, seed)` per run: grid point by grid point, seeds within."""
    names = unique([point.name for point in points])
    return [
        (item, point, name, seed)
        for item, (point, name) in enumerate(zip(points, names, strict=True))
        for seed in (seeds or [None])  # type: ignore[list-item]
    ]


def _fit_seeds(runs: list) -> list[int]:
    """Each run's seed, or one seed drawn for the sweep: one data order per seed."""
    shared = int(np.random.randint(2**31 - 1))
    return [shared if seed is None else seed for _, _, _, seed in runs]


def _why_separate_fits(
    points: list[GridPoint], seeds: list[int] | None, callbacks: list
) -> str | None:
    """Why the runs are K separate fits until the one-fit engines take them."""
    transforms = sorted({type(t).__name__ for p in points for t in p.transforms})
    if transforms:
        return f"the grid has post-step transforms ({', '.join(transforms)})"
    if seeds is not None:
        return "`seeds` are given"
    if callbacks:
        names = ", ".join(type(c).__name__ for c in callbacks)
        return f"`callbacks` are given ({names}: each fit gets its own copy)"
    return None


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
    if isinstance(x, keras.utils.PyDataset) or is_dataset(x):
        return None
    if not (is_array(x) and is_array(y)):
        return "`x`/`y` are not arrays, a keras.utils.PyDataset or a tf.data.Dataset"
    return None
