"""`sweep`: a grid of penalties trained side by side, each variant exactly its own fit.

There is no formula for a penalty's strength: one searches a log-scale grid.
`sweep` makes one variant of a compiled template model per penalty and trains
them with the fastest engine that can prove it gives each variant the very
result of its own separate fit (`kerasreg.sweep.engines`): one batched step
for all variants (`"vectorized"`), K copies side by side in one `fit`
(`"stacked"`), or K separate fits (`"sequential"`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kerasreg import _compat
from kerasreg.sweep import backup, engines, gradient_log, monitor, sequential, stopping
from kerasreg.sweep.hparams import write_hparams
from kerasreg.sweep.items import GridPoint, parse_grid
from kerasreg.sweep.monitor import VariantLog, best_so_far
from kerasreg.sweep.repeats import (
    build_variant,
    check_seeds,
    draws_from_global_generators,
)
from kerasreg.sweep.result import SweepResult
from kerasreg.sweep.rows import make_row, metric_directions, run_name, unique
from kerasreg.sweep.variants import (
    check_compile_config,
    check_loss_reduction,
    check_roles,
    compile_like,
    compile_recipe,
)

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
    gradients: bool = False,
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

    `callbacks`: each variant gets its own copy of every callback, fed its
    own logs and acting on its own model, and a callback's file path takes a
    `{variant}` field (the variant's run name). Keras's `EarlyStopping`,
    `TerminateOnNaN`, `ModelCheckpoint` (saving at epoch ends), `CSVLogger`
    and `ReduceLROnPlateau` keep a one-fit engine
    (module `kerasreg.sweep.stopping`): a variant
    stops where its own fit would (its history ends there, its
    `EarlyStopping` restores its own best weights) and ends with exactly the
    state it had then, while the others go on; the fit ends when all have
    stopped. There a `ModelCheckpoint` needs the JAX engine (its file holds
    the optimizer's state, which the others do not keep per variant), as
    does `ReduceLROnPlateau` (each variant's own learning rate), and an
    optimizer with `use_ema=True` or a `keras.distribution` needs K fits.

    A `keras.callbacks.BackupAndRestore(backup_dir)` keeps one backup of
    the whole sweep (`kerasreg.sweep.backup`): the runs train as K separate
    fits, and the same call after an interruption loads the finished runs,
    resumes the interrupted one from its last backup and trains the rest.

    Grid points with post-step transforms and any other callback
    are trained by the `"sequential"` engine (logged at INFO; `engine_reason`
    says why, naming the callback): each variant's fit gets its own copy of
    every callback, made right before that fit, and a fresh instance of its
    transforms (never shared between two fits).

    - `"vectorized"`: one batched step trains all K variants: every weight
      has a leading axis of K. On JAX, the template's own train step is
      mapped with `jax.vmap` over that axis (any layer, loss, metric and
      optimizer option; not stateful layers or a callback of your own). Elsewhere (or
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
      WARNING where no one-fit engine can take the template (loss scaling
      off JAX, stateful layers, dropout inside an RNN cell), at INFO where
      the grid asks for it (callbacks other than the five above, each fit
      with its own copy; decay transforms; on PyTorch, seeds with an
      unseeded `Dropout`).

    `Dropout`: with `Dropout(seed=s)` every variant draws the masks its own
    fit draws (a copy keeps the seed: the same masks for all variants, as
    in their separate fits); without a seed each variant draws its masks
    from its own copy's seed generator (on PyTorch, from torch's global
    generator, as any unseeded Dropout there).

    Data: arrays, a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
    Python generator (read once: where the template needs K separate fits,
    `sweep` refuses before anything trains), or anything `fit` reads
    several times. Memory: one fit holds K times a variant's activations;
    when `variant_bytes` (module `kerasreg.sweep.engines`) times K exceeds half of the
    memory available (or `KERASREG_SWEEP_MEMORY` bytes), the variants are
    trained in several fits of as many as fit (each fit shuffles its own
    order); `chunk_size` sets the most variants per fit.

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
            its random layers seeded likewise, all runs in the same fit:
            each run equals a separate fit of the template built under its
            seed with `shuffle=False`. With `shuffle=True` (`fit`'s default)
            the runs of one fit share one data order, drawn after
            `keras.utils.set_random_seed(seeds[0])`: reproducible, but not
            the order of a separate fit (on JAX and PyTorch, not even that
            of `seeds[0]`'s), and logged at INFO. K separate fits
            (`engine="sequential"`, or a template or callback that needs
            them, named in `engine_reason`) give each run its own seed's
            order instead. Seeds are ints in [0, 2**32 - 1].
            `SweepResult.summary()` gives the mean and spread per grid item.
        log_dir: optional TensorBoard root: one run per variant,
            `log_dir/<name>/train|validation` (`<name>/seed_<s>` with seeds),
            with Keras's `epoch_<metric>` scalars and `WeightNormLogger`
            data, plus the HParams experiment (grid item, family, knob values;
            the metrics at each run's `best_epoch`).
        gradients: bool, default `False`. With `log_dir`, also write each
            variant's `kerasreg.gradient_norms` at the end of every epoch, on
            the training data (`<name>/train`) and on the validation data
            (`<name>/validation`), under `WeightNormLogger(gradients=True)`'s
            tags: one extra pass over each per variant and epoch (the
            training data in batches of `batch_size`).
        engine: `"auto"` (default: the fastest exact engine), or
            `"vectorized"`, `"stacked"` or `"sequential"` to force one; a
            forced engine that cannot train the template raises before
            anything trains.
        chunk_size: the most variants one fit trains (default: as many as
            the memory rule allows).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`,
            `validation_data`, `validation_split`, `shuffle`, `callbacks`,
            `verbose`, ...). With `verbose=1` or `2` the best variant so far
            (by `val_loss`, else `loss`) is named on its own line after each
            epoch.

    Returns:
        A `SweepResult`.

    Raises:
        TypeError: `model` is not a Keras model, `penalties`, `seeds` or
            `callbacks` is not a list (or tuple), `gradients` is not a bool, an item
            is of the wrong kind, or a keyword is neither `sweep`'s nor `fit`'s.
        ValueError: `penalties` is empty, `role` or `engine` is unknown, an
            item cannot be resolved, targets a role the model lacks or gives
            one role two penalties, a transform's `where` selects nothing, a
            callback would write one file for all variants, the template is
            not built or not compiled, it cannot be copied, its compile
            config cannot be rebuilt or its loss has reduction="none"; a forced
            engine cannot train the template; `x` can be read once and the
            sweep needs several fits or `gradients=True`; `gradients=True`
            without `log_dir`. Nothing has trained then.

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
    _check_fit_arguments(model, fit_kwargs)
    points = parse_grid(penalties, role)
    check_roles(model, points, where, role)
    seeds = check_seeds(seeds)
    runs = _runs(points, seeds)
    names = [run_name(name, seed) for _, _, name, seed in runs]
    callbacks = sequential.check_callbacks(fit_kwargs.get("callbacks"), names)
    stopping.check_learning_rate(model, callbacks)
    backup.check_log_dir(callbacks, log_dir)
    compile_config = compile_recipe(model)
    check_compile_config(model, compile_config)
    check_loss_reduction(model)
    models = [
        build_variant(model, point, where, i, seed, item)
        for i, (item, point, _, seed) in enumerate(runs)
    ]
    # get_config drops `exclude_from_weight_decay`: carried over by hand.
    exclusions = _compat.weight_decay_exclusions(model.optimizer, model.weights)
    context = engines.context(model, x, y, fit_kwargs, compile_config, exclusions)
    context.separate = _why_separate_fits(models[0], points, seeds, callbacks)
    readings = gradient_log.readings(
        gradients, log_dir, context.one_pass_argument, x, y, fit_kwargs
    )
    chosen, implementation, reason = engines.choose(model, models, context, engine)
    if context.one_pass:  # refused before its first batch is read
        groups, why = engines.chunks(model, models, context, implementation, chunk_size)
    x = engines.prepare(context)
    if not context.one_pass:  # the batch size of a dataset is read from it
        groups, why = engines.chunks(model, models, context, implementation, chunk_size)
    if len(groups) > 1:
        reason += (
            f"; in {len(groups)} fits of at most {len(groups[0])} variants ({why})"
        )
    if log_dir is not None:
        log_dir = os.fspath(log_dir)
    logs = [
        VariantLog(os.path.join(log_dir, n), readings) if log_dir is not None else None
        for n in names
    ]
    best_epochs: list[int | None] = [None] * len(models)
    histories: list[dict] = []
    if implementation is sequential:
        histories, best_epochs = sequential.fit_runs(
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
    else:
        shared = {}
        if hasattr(implementation, "Steps"):
            shared["steps"] = implementation.Steps(models)
        start = _start_seed(seeds, fit_kwargs)
        for group in groups:
            part = [models[i] for i in group]
            engines.ready(part, compile_config, exclusions, context, implementation)
            if start is not None:
                keras.utils.set_random_seed(start)
            finished = monitor.FINISHED.set(
                (names[: len(histories)], [best_so_far(h) for h in histories])
            )
            try:
                part_histories = implementation.fit(
                    part,
                    [names[i] for i in group],
                    [logs[i] for i in group],
                    compile_config,
                    exclusions,
                    x,
                    y,
                    fit_kwargs,
                    **shared,
                )
            finally:
                monitor.FINISHED.reset(finished)
            histories += part_histories
            # Epochs restored by each variant's own EarlyStopping copy.
            restored = getattr(part_histories, "best_epochs", None) or []
            for i, epoch in zip(group, restored, strict=False):
                best_epochs[i] = epoch
    directions = metric_directions(models)  # while the compiled metrics are built
    for variant in models:
        variant.name = model.name
        if not getattr(implementation, "OWN_OPTIMIZERS", False):
            # A fresh optimizer: the one fit's optimizer trained the stack.
            # Built, so that a saved model holds all its (zero) slots and
            # loads without Keras's "Skipping variable loading" warning.
            compile_like(variant, compile_config, exclusions)
            variant.optimizer.build(variant.trainable_variables)
    rows = [
        make_row(point, name, seed, history, best)
        for (_, point, name, seed), history, best in zip(
            runs, histories, best_epochs, strict=True
        )
    ]
    if log_dir is not None:
        write_hparams(log_dir, rows)
    return SweepResult(rows, models, chosen, reason, directions=directions)


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
    variant: keras.Model,
    points: list[GridPoint],
    seeds: list[int] | None,
    callbacks: list,
) -> str | None:
    """Why the runs are K separate fits whatever the template, or None."""
    transforms = sorted({type(t).__name__ for p in points for t in p.transforms})
    if transforms:
        return f"the grid has post-step transforms ({', '.join(transforms)})"
    if seeds is not None:
        reason = draws_from_global_generators(variant)
        if reason is not None:
            return f"`seeds` are given and {reason}"
    return stopping.why_separate(callbacks)


def _check_fit_arguments(model: keras.Model, fit_kwargs: dict) -> None:
    """Refuse a keyword neither `sweep` nor the template's `fit` takes (a
    misspelled `epoch=`), before anything is copied or trained."""
    parameters = inspect.signature(type(model).fit).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a fit of the user's own that takes any keyword
    accepted = [name for name in parameters if name not in ("self", "x", "y")]
    unknown = [name for name in fit_kwargs if name not in accepted]
    if unknown:
        raise TypeError(
            f"kerasreg.sweep: invalid argument `{unknown[0]}`="
            f"{fit_kwargs[unknown[0]]!r}: neither `sweep` nor `fit` takes it. "
            f"Accepted by `fit`: {', '.join(accepted)}; by `sweep`: role, where, "
            "seeds, log_dir, gradients, engine, chunk_size."
        )


def _start_seed(seeds: list[int] | None, fit_kwargs: dict) -> int | None:
    """The seed every fit of a one-fit engine starts from, or None (no
    shuffling, no `seeds`).

    With `seeds`, `seeds[0]`: the data order (`shuffle=True`), shared by
    every run of a fit, is drawn after `set_random_seed(seeds[0])`
    (reproducible; not always the order a separate fit under `seeds[0]`
    draws: Keras's JAX trainer draws one more permutation when it builds an
    unbuilt model). Without, with `shuffle=True`, one seed drawn for the
    sweep from NumPy's global generator: every fit draws one data order, the
    same whether the sweep runs in one fit or several."""
    shuffled = fit_kwargs.get("shuffle", True)
    if seeds is None:
        return int(np.random.randint(2**31 - 1)) if shuffled else None
    if shuffled:
        logger.info(
            "kerasreg.sweep: the runs of a fit share one data order "
            "(shuffle=True), drawn after set_random_seed(%d); "
            "engine='sequential' gives each run its own seed's order.",
            seeds[0],
        )
    return seeds[0]


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
