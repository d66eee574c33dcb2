"""The `"sequential"` engine of `sweep`: each variant in its own `fit`, one after another.

The last engine `kerasreg.sweep.engines` tries, and the one that trains grid
points a one-fit engine cannot take (post-step transforms, `seeds=`,
callbacks other than those of `kerasreg.sweep.stopping.ONE_FIT`). It needs data that can be read K times: a one-pass iterator (a
Python generator) is refused before anything trains.

Exact by construction: variant k's fit is a plain Keras `fit` of its model,
with its own copies of the sweep's callbacks and fresh instances of its grid
point's post-step transforms (a callback or transform is never shared by two
fits), after `keras.utils.set_random_seed(fit_seeds[k])`: what the fit draws
from the global random generators (the shuffling order; on PyTorch, the masks
of a `Dropout` without a `seed` of its own) is the same for every run of one
seed, as in one shared fit, and for a run of `seeds=` it is what a fit right
after building the template under that seed draws.

Callbacks that write files get one file (or folder) per variant (also in the
one-fit engines, which copy callbacks with `copy_callback`): `{variant}`
in the path of `ModelCheckpoint`, `CSVLogger`, `TensorBoard` or
`WeightNormLogger` becomes the variant's run name; a folder without the field
(`TensorBoard`, `WeightNormLogger`) gets the run name appended; a file
without it is refused when there are several variants (they would all write
it). `BackupAndRestore` keeps one backup of the whole sweep, run by run
(`kerasreg.sweep.backup`).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import keras

from kerasreg.poststep import PostStepTransform
from kerasreg.sweep import backup
from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.items import fresh_transform
from kerasreg.sweep.monitor import Monitor, best_line
from kerasreg.sweep.rows import values_at
from kerasreg.sweep.variants import compile_like
from kerasreg.tensorboard import WeightNormLogger

NAME = "sequential"
# `fit` compiles each variant itself, right before its fit (kerasreg.sweep.engines).
PREPARE = "none"
OWN_OPTIMIZERS = True  # each variant trained by its own fit
FIELD = "{variant}"
# Callback class -> (attribute holding its path, whether it is a folder).
_PATHS: tuple[tuple[type, str, bool], ...] = (
    (keras.callbacks.ModelCheckpoint, "filepath", False),
    (keras.callbacks.CSVLogger, "filename", False),
    (keras.callbacks.TensorBoard, "log_dir", True),
    (WeightNormLogger, "log_dir", True),
)


def check_callbacks(callbacks: Any, runs: list[str]) -> list[keras.callbacks.Callback]:
    """`sweep`'s `callbacks`, checked for per-variant copies before anything trains."""
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback) or not isinstance(
        callbacks, (list, tuple)
    ):
        raise TypeError(
            "kerasreg.sweep: invalid `callbacks`: expected a list (or tuple) of "
            f"keras.callbacks.Callback. Received: callbacks={callbacks!r}."
        )
    seen: dict[int, int] = {}
    for index, callback in enumerate(callbacks):
        where = f"`callbacks[{index}]`"
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(
                f"kerasreg.sweep: invalid {where}: expected a "
                f"keras.callbacks.Callback. Received: {callback!r} "
                f"(type {type(callback).__name__})."
            )
        if id(callback) in seen:
            # A plain fit calls one object twice per hook (an EarlyStopping
            # counts its patience twice); each run's copies could not share.
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: it is the same "
                f"{type(callback).__name__} object as `callbacks[{seen[id(callback)]}]`"
                ". Each run gets its own copy of each callback, so one object "
                "listed twice cannot act as it does in a plain fit; list it once, "
                "or pass two separate instances."
            )
        seen[id(callback)] = index
        path = _path_of(callback)
        if path is not None and len(runs) > 1:
            attribute, value, folder = path
            if not folder and FIELD not in value:
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: {type(callback).__name__}"
                    f".{attribute}={value!r} has no {FIELD} field, so the "
                    f"{len(runs)} variants would all write that one file. Put "
                    f"{FIELD} in the path, e.g. {_with_field(value)!r}; it "
                    f"becomes each variant's run name (such as {runs[0]!r})."
                )
    backup.find(list(callbacks))  # at most one, Keras's own class
    return list(callbacks)


def _with_field(path: str) -> str:
    """`path` with the `{variant}` field as its file name: `logs/{variant}.csv`."""
    folder, name = os.path.split(path)
    return os.path.join(folder, FIELD + os.path.splitext(name)[1])


def copy_callback(
    callback: keras.callbacks.Callback, run: str, where: str = "`callbacks`"
) -> keras.callbacks.Callback:
    """A copy of `callback` for variant `run`'s fit: no state, its own files.

    Made with `copy.deepcopy` (the model it was last set to is not copied), so
    a callback that defines `__deepcopy__` decides what its copies share.
    Every run's copy is made right before its fit, the first before anything
    trains.
    """
    if isinstance(callback, PostStepTransform):
        fresh = fresh_transform(callback, where)
    else:
        model = getattr(callback, "_model", None)
        memo = {} if model is None else {id(model): None}
        try:
            fresh = copy.deepcopy(callback, memo)
        except Exception as error:
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: each variant needs its own "
                f"copy of {type(callback).__name__}, and copy.deepcopy failed "
                f"({type(error).__name__}: {error})."
            ) from None
    path = _path_of(fresh)
    if path is not None:
        attribute, value, folder = path
        if FIELD in value:
            value = value.replace(FIELD, run)
        elif folder:
            value = os.path.join(value, run)
        if not folder and os.path.dirname(value):
            os.makedirs(os.path.dirname(value), exist_ok=True)
        setattr(fresh, attribute, value)
    return fresh


def _path_of(callback: Any) -> tuple[str, str, bool] | None:
    for cls, attribute, folder in _PATHS:
        if isinstance(callback, cls):
            return attribute, os.fspath(getattr(callback, attribute)), folder
    return None


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


def fit(
    variants: list[keras.Model],
    names: list[str],
    logs: list[Any],
    compile_config: dict,
    exclusions: tuple,
    x: Any,
    y: Any,
    fit_kwargs: dict,
) -> list[dict]:
    """Fit each variant on its own; each variant's `History.history`.

    The engine interface of `kerasreg.sweep.engines`; `fit_runs` is the same
    with per-run transforms and seeds, and the epochs restored.
    """
    return fit_runs(
        variants, names, logs, compile_config, exclusions, x, y, fit_kwargs
    )[0]


def fit_runs(
    variants: list[keras.Model],
    names: list[str],
    logs: list[Any],
    compile_config: dict,
    exclusions: tuple,
    x: Any,
    y: Any,
    fit_kwargs: dict,
    *,
    transforms: list[list[PostStepTransform]] | None = None,
    fit_seeds: list[int] | None = None,
) -> tuple[list[dict], list[int | None]]:
    """Fit each variant on its own; `(histories, best_epochs)`.

    `transforms[k]` are variant k's fresh post-step transforms (they run
    first in its fit); `fit_seeds[k]` seeds the global random generators
    before its fit. `best_epochs[k]` is the epoch whose weights variant k
    ends with when a callback restored them (`EarlyStopping` with
    `restore_best_weights=True`), else None (the last epoch).
    """
    callbacks = list(fit_kwargs.get("callbacks") or [])
    verbose = fit_kwargs.get("verbose", "auto")
    found = backup.find(callbacks)
    sweep_backup = None
    if found is not None:
        callbacks.pop(found[0])
        sweep_backup = backup.SweepBackup(
            found[1],
            f"`callbacks[{found[0]}]`",
            names,
            fit_seeds,
            backup.settings(variants, fit_kwargs, compile_config, x, y),
        )
        fit_seeds = sweep_backup.fit_seeds  # those of the interrupted sweep
    histories: list[dict] = []
    best_epochs: list[int | None] = []
    for index, (variant, name, log) in enumerate(
        zip(variants, names, logs, strict=True)
    ):
        compile_like(variant, compile_config, exclusions)
        if sweep_backup is not None:
            finished = sweep_backup.load_finished(index, variant)
            if finished is not None:  # trained before the sweep was interrupted
                histories.append(finished[0])
                best_epochs.append(finished[1])
                continue
        copies = [
            copy_callback(c, name, f"`callbacks[{i}]`") for i, c in enumerate(callbacks)
        ]
        monitor = Monitor([variant], [name], [log], verbose, split=None)
        own = [] if transforms is None else list(transforms[index])
        last = []
        if sweep_backup is not None:
            # The run's history so far, saved before its backup (which comes
            # last, after every other callback has seen the epoch).
            monitor.histories[0] = sweep_backup.resumed_history(index)
            last = [
                sweep_backup.history_saver(index, monitor.histories[0]),
                sweep_backup.run_callback(index),
                sweep_backup.generator_restorer(index),
            ]
        kwargs = {**fit_kwargs, "callbacks": [*own, *copies, monitor, *last]}
        if verbose:
            print(f"[{index + 1}/{len(variants)}] {name}", flush=True)
        if fit_seeds is not None:
            keras.utils.set_random_seed(fit_seeds[index])
        variant.fit(x, y, **kwargs)
        histories.append(monitor.histories[0])
        best_epochs.append(restored_epoch(copies))
        if sweep_backup is not None:
            sweep_backup.finish_run(index, variant, histories[-1], best_epochs[-1])
        if verbose:
            done = [
                values_at(h, e) for h, e in zip(histories, best_epochs, strict=True)
            ]
            line = best_line(names[: len(done)], done)
            if line:
                print(line, flush=True)
    if sweep_backup is not None:
        sweep_backup.end()
    return histories, best_epochs


def restored_epoch(callbacks: list[Any]) -> int | None:
    """The epoch an `EarlyStopping(restore_best_weights=True)` restored, if any."""
    restored = None
    for callback in callbacks:
        if (
            isinstance(callback, keras.callbacks.EarlyStopping)
            and callback.restore_best_weights
            and callback.best_weights is not None
        ):
            restored = int(callback.best_epoch)  # the last one to restore wins
    return restored
