"""Keras callbacks in a one-fit sweep: each variant gets its own copy, fed its own logs.

`EarlyStopping`, `TerminateOnNaN`, `ModelCheckpoint` (saving at epoch ends),
`CSVLogger` and `ReduceLROnPlateau` (exact classes: a subclass may use other
hooks) keep the sweep in one fit. Each variant gets its own copy of each
(`sequential.copy_callback`: its own state, `{variant}` in its file path),
whose model is a `VariantModel`: the variant's own `keras.Model`, brought in
sync with the one fit when the copy reads or writes it. Its hooks get the
variant's logs, as its own fit would pass them; its `stop_training` is the
variant's own stop; `get_weights`/`set_weights`/`save` act on the variant
alone. Keras's own hooks run at the points of the variant's own fit, so what
they do (Keras 3 restores `restore_best_weights` in `on_train_end`, whether
or not the fit stopped early) is what the installed Keras does.

A variant *stops* where its own fit would end: after the epoch whose end a
copy set `stop_training` (or, for `TerminateOnNaN`, after the batch: that
epoch's logs are then its training logs at that batch, plus the validation
of its weights at that batch, as its own fit reports them). Its copies then
get `on_train_end` (where `EarlyStopping(restore_best_weights=True)`
restores its best weights), its history ends, and its state (weights,
non-trainable state and, where the engine keeps one per variant, its
optimizer's variables) is recorded. The one fit goes on for the others (the
stopped variant's rows keep computing, and no other variant reads them:
the engines' variants are independent), and ends when every variant has
stopped; each stopped variant is then given back the state it had when it
stopped (`VariantCallbacks.finish`), so nothing after its stop reaches the
result.

Not exact in one fit, hence K separate fits (`why_not`): `TerminateOnNaN`
on PyTorch (a NaN variant's rows go on computing, and a torch loss may raise
on them), an optimizer with
an exponential moving average of the weights (`use_ema`: its end-of-fit
swap would be at the one fit's end), `ModelCheckpoint` saving every N
batches, and, on engines that keep no optimizer state per variant, any
`ModelCheckpoint` (its file holds the optimizer, `.weights.h5` too) and
`ReduceLROnPlateau` (it sets each variant's own learning rate, an optimizer
variable: the JAX engine keeps one per variant, written back into the one
fit when a copy changes it).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kerasreg.sweep import backup
from kerasreg.sweep.sequential import copy_callback, restored_epoch

# The callbacks that keep one fit (exact classes).
ONE_FIT = (
    keras.callbacks.EarlyStopping,
    keras.callbacks.TerminateOnNaN,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.ReduceLROnPlateau,
)
ONE_FIT_NAMES = ", ".join(c.__name__ for c in ONE_FIT)


def why_separate(callbacks: list) -> str | None:
    """Why these callbacks need K separate fits whatever the engine (None: they do not)."""
    if backup.find(callbacks) is not None:
        return (
            "`callbacks` has BackupAndRestore (one backup of the whole sweep, "
            "resumed run by run)"
        )
    others = [type(c).__name__ for c in callbacks if type(c) not in ONE_FIT]
    if others:
        return (
            f"`callbacks` has {', '.join(dict.fromkeys(others))} (only "
            f"{ONE_FIT_NAMES} keep one fit; each separate fit gets its own copy)"
        )
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and (
            callback.save_freq != "epoch"
        ):
            return (
                f"`callbacks` has ModelCheckpoint(save_freq={callback.save_freq!r}) "
                "(saving every N batches; save_freq='epoch' keeps one fit)"
            )
    return None


def check_learning_rate(template: keras.Model, callbacks: list) -> None:
    """Refuse a `ReduceLROnPlateau` whose optimizer's rate cannot be set.

    Keras raises `TypeError` at the first epoch where the callback cuts a
    schedule's rate; in a sweep that would lose every variant's training so
    far, so it is refused before anything trains.
    """
    optimizer = template.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = getattr(inner, "_learning_rate", None)
    if not (
        isinstance(rate, keras.optimizers.schedules.LearningRateSchedule)
        or callable(rate)
    ):
        return
    for index, callback in enumerate(callbacks):
        if isinstance(callback, keras.callbacks.ReduceLROnPlateau):
            raise ValueError(
                f"kerasreg.sweep: invalid `callbacks[{index}]`: ReduceLROnPlateau "
                "sets the optimizer's learning rate, and the template's "
                f"optimizer has learning_rate={rate!r} (a schedule or callable, "
                "which Keras cannot set). Expected an optimizer with a float "
                "learning rate, or no ReduceLROnPlateau."
            )


def why_not(template: keras.Model, callbacks: list, own_optimizers: bool) -> str | None:
    """Why a one-fit engine cannot run these (supported) callbacks exactly (None: it can).

    `own_optimizers`: whether the engine keeps each variant's optimizer state.
    """
    if not callbacks:
        return None
    if keras.distribution.distribution() is not None:
        return (
            "`callbacks` in one fit are not shown exact under a "
            "keras.distribution (each variant's state is copied to and from "
            "the one fit's)"
        )
    if keras.backend.backend() == "torch" and any(
        isinstance(c, keras.callbacks.TerminateOnNaN) for c in callbacks
    ):
        # A stopped variant's rows go on computing in the one fit, and some
        # torch losses raise on NaN inputs (binary_cross_entropy): that
        # variant's own fit ended at its NaN, the one fit would end for all.
        return (
            "`callbacks` has TerminateOnNaN, and on PyTorch a NaN variant's "
            "rows, computed on after its stop, can make a loss raise for all"
        )
    optimizer = template.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "use_ema", False):
        return (
            "`callbacks` may stop variants at different epochs, and the optimizer "
            "keeps an EMA of the weights (use_ema), swapped in at the end of each "
            "variant's own fit"
        )
    if not own_optimizers:
        for callback in callbacks:
            if isinstance(callback, keras.callbacks.ModelCheckpoint):
                return (
                    "`callbacks` has a ModelCheckpoint, whose file holds the "
                    "optimizer state (with save_weights_only=True too), which this "
                    "engine does not keep per variant"
                )
            if isinstance(callback, keras.callbacks.ReduceLROnPlateau):
                return (
                    "`callbacks` has ReduceLROnPlateau, which sets each variant's "
                    "learning rate, and this engine's one optimizer has one "
                    "learning rate for all variants"
                )
    return None


def _learning_rate(variant: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(variant.optimizer.learning_rate))


def _values(variables) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def _state(variant: keras.Model, optimizer: bool) -> list:
    variables = list(variant.trainable_variables) + list(
        variant.non_trainable_variables
    )
    if optimizer and variant.optimizer is not None:
        variables += list(variant.optimizer.variables)
    return variables


class VariantModel:
    """What a variant's copies see as their model: its own `keras.Model`,
    brought in sync with the one fit only when they read or write it.

    `stop_training` is the variant's own flag; `get_weights` and
    `set_weights` first sync its weights (at most once per step: `sync` is
    the Monitor's), anything else (`save`, `save_weights`, ...) its
    optimizer state too (`sync_all`), then act on the variant.
    """

    def __init__(self, variant: keras.Model, sync, sync_all):
        self.__dict__.update(
            _variant=variant, _sync=sync, _sync_all=sync_all, stop_training=False
        )

    def jax_state_sync(self) -> None:
        """`Callback.model` calls it on JAX; the sync is done on use instead."""

    @property
    def metrics(self):  # MonitorCallback's direction: no values needed
        return self._variant.metrics

    def get_weights(self):
        self._sync()
        return self._variant.get_weights()

    def set_weights(self, weights) -> None:
        self._sync()
        self._variant.set_weights(weights)

    def __getattr__(self, name):
        self._sync_all()
        return getattr(self._variant, name)


class VariantCallbacks:
    """Each variant's copies of the sweep's callbacks, driven by `Monitor`.

    Args:
        callbacks: the sweep's callbacks (all of `ONE_FIT`).
        variants: the variants' own models (kept in sync by `Monitor`).
        names: their run names (`{variant}` in file paths).
        optimizer: whether the engine keeps each variant's optimizer state
            (then a stopped variant's optimizer variables are kept too).
        write: `write(variants, index)` writes variant `index`'s model state
            into the one fit's (used after a stop inside an epoch).
        copy_optimizer: with `optimizer`, `copy_optimizer(variants)` copies
            the one fit's optimizer state into the variants' optimizers
            (their weights untouched).
    """

    def __init__(
        self, callbacks, variants, names, *, optimizer, write, copy_optimizer=None
    ):
        self.variants = variants
        self.models: list[VariantModel] = []
        self.sync = lambda: None  # the Monitor's (lazy) sync, set in `begin`
        self.optimizer_synced = False  # since the last training step
        self.touch = lambda: None  # the Monitor's one fit, synced on JAX
        self.copy_optimizer = copy_optimizer
        self.copies = [
            [
                copy_callback(c, name, f"`callbacks[{i}]`")
                for i, c in enumerate(callbacks)
            ]
            for name in names
        ]
        self.optimizer = optimizer
        self.write = write
        self.stopped = [False] * len(variants)
        self.state: list[list | None] = [None] * len(variants)
        self.stop_logs: list[dict | None] = [None] * len(variants)
        # Batch hooks only for the copies that act on batches (ModelCheckpoint
        # saves at epoch ends here: `why_separate`).
        self.batches = any(
            isinstance(c, keras.callbacks.TerminateOnNaN) for c in callbacks
        )

    def active(self) -> list[int]:
        return [i for i, stopped in enumerate(self.stopped) if not stopped]

    def begin(self, params, sync, touch) -> None:
        self.sync, self.touch = sync, touch
        self.models = [VariantModel(v, sync, self._sync_all) for v in self.variants]
        for model, copies in zip(self.models, self.copies, strict=True):
            for callback in copies:
                callback.set_model(model)
                callback.set_params(params)
                callback.on_train_begin()

    def epoch_begin(self, epoch: int) -> None:
        for index in self.active():
            for callback in self.copies[index]:
                callback.on_epoch_begin(epoch)

    def batch_end(self, batch: int, per_variant: list[dict]) -> None:
        """Each running variant's batch hooks; a stop here freezes its state."""
        for index in self.active():
            if self.stop_logs[index] is not None:
                # Stopped earlier in this epoch: its state stays the one it
                # stopped with, for the rest of the epoch (its validation).
                self.sync()
                self._restore(index)
                self.write(self.variants, index)
                continue
            for callback in self.copies[index]:
                if isinstance(callback, keras.callbacks.TerminateOnNaN):
                    callback.on_train_batch_end(batch, per_variant[index])
            if self.models[index].stop_training:
                self.sync()
                self._sync_optimizer()
                self.stop_logs[index] = dict(per_variant[index])
                self.state[index] = _values(
                    _state(self.variants[index], self.optimizer)
                )

    def epoch_logs(self, index: int, logs: dict) -> dict:
        """Variant `index`'s epoch logs: those at its stop batch, if it stopped."""
        stop = self.stop_logs[index]
        if stop is None:
            return logs
        out = {k: v for k, v in stop.items() if not k.startswith("val_")}
        out.update({k: v for k, v in logs.items() if k.startswith("val_")})
        return out

    def epoch_end(self, epoch: int, index: int, logs: dict) -> None:
        """Variant `index`'s epoch-end hooks (its model in sync).

        A copy that sets the variant's learning rate (`ReduceLROnPlateau`)
        sets it on the variant's own optimizer: written into the one fit.
        """
        sets_rate = self.optimizer and any(
            isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in self.copies[index]
        )
        if sets_rate:
            self._sync_all()
            before = _learning_rate(self.variants[index])
        for callback in self.copies[index]:
            callback.on_epoch_end(epoch, logs)
        if sets_rate and _learning_rate(self.variants[index]) != before:
            self.write(self.variants, index)

    def end_if_stopped(self, index: int, logs: dict) -> None:
        """After its epoch end (history and TensorBoard run written, as in its
        own fit): variant `index`'s end, if a copy stopped it."""
        if self.models[index].stop_training:
            self.end(index, logs)

    def end(self, index: int, logs: dict | None) -> None:
        """Variant `index`'s fit ends: its `on_train_end`, its state recorded."""
        for callback in self.copies[index]:
            callback.on_train_end(logs)
        self.sync()  # (a no-op if a copy read or wrote the variant in this step)
        self._sync_optimizer()
        self.stopped[index] = True
        self.stop_logs[index] = None
        self.state[index] = _values(_state(self.variants[index], self.optimizer))

    def _sync_all(self) -> None:
        self.sync()
        self._sync_optimizer()

    def new_step(self) -> None:
        """The one fit trained since the last sync (the Monitor calls it)."""
        self.optimizer_synced = False

    def _sync_optimizer(self) -> None:
        if self.optimizer and self.copy_optimizer is not None:
            if self.optimizer_synced:
                return
            self.touch()
            self.copy_optimizer(self.variants)
            self.optimizer_synced = True

    def _restore(self, index: int) -> None:
        state = self.state[index]
        if state is None:
            return
        variables = _state(self.variants[index], self.optimizer)
        for variable, value in zip(variables, state, strict=True):
            variable.assign(value)

    def finish(self) -> None:
        """After the one fit's last copy into the variants: each gets its end state."""
        for index in range(len(self.variants)):
            self._restore(index)

    def best_epochs(self) -> list[int | None]:
        return [restored_epoch(copies) for copies in self.copies]


class Histories(list):
    """The variants' histories, with `best_epochs` (restored by `EarlyStopping`)."""

    best_epochs: list[int | None]


def variant_callbacks(
    fit_kwargs: dict, variants, names, **options
) -> VariantCallbacks | None:
    """The variants' copies of the sweep's `callbacks` (`VariantCallbacks`
    with `options`), or None without any."""
    callbacks = list(fit_kwargs.get("callbacks") or [])
    if not callbacks:
        return None
    return VariantCallbacks(callbacks, variants, names, **options)


def histories(monitor: Any) -> Histories:
    """The variants' histories once the one fit's last values are in the
    variants: each stopped variant first gets back the state it stopped with."""
    out = Histories(monitor.histories)
    variant_callbacks = monitor.callbacks
    if variant_callbacks is None:
        out.best_epochs = [None] * len(out)
        return out
    variant_callbacks.finish()
    out.best_epochs = variant_callbacks.best_epochs()
    return out
