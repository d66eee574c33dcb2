"""Each variant's history and TensorBoard run, split from the logs of one fit."""

from __future__ import annotations

import contextvars
import os

import keras
import numpy as np

from kerasreg.sweep import gradient_log
from kerasreg.sweep.rows import RunHistory, epochs_of, values_at
from kerasreg.tensorboard import WeightNormLogger, run_writer

# `(names, values)` of the runs that earlier fits of the same sweep trained
# (the variants split into chunks): the "best so far" line of a later fit
# ranks them with its own variants. Set by `kerasreg.sweep.run`.
FINISHED: contextvars.ContextVar[tuple[list[str], list[dict]]] = contextvars.ContextVar(
    "kerasreg_sweep_finished", default=([], [])
)


class VariantLog:
    """One variant's TensorBoard run: Keras-style epoch scalars, weight norms and,
    with `sweep(..., gradients=True)`, gradient statistics."""

    def __init__(self, folder: str, gradients: list | None = None):
        self.folder = folder
        self.norms = WeightNormLogger(folder)
        self.gradients = gradients  # gradient_log.readings, or None
        self.variant: keras.Model | None = None

    def begin(self, variant: keras.Model) -> None:
        self.variant = variant
        self.norms.set_model(variant)
        self.norms.on_train_begin()

    def epoch_end(self, epoch: int, logs: dict) -> None:
        train = {f"epoch_{k}": v for k, v in logs.items() if not k.startswith("val_")}
        validation = {
            f"epoch_{k[4:]}": v for k, v in logs.items() if k.startswith("val_")
        }
        for run, scalars in (("train", train), ("validation", validation)):
            if scalars:
                writer = run_writer(os.path.join(self.folder, run))
                writer.write(epoch, scalars)
                writer.flush()
        self.norms.on_epoch_end(epoch, logs)
        if self.gradients is not None and self.variant is not None:
            gradient_log.write(self.variant, self.folder, epoch, self.gradients)

    def end(self) -> None:
        self.norms.on_train_end()


class Monitor(keras.callbacks.ProgbarLogger):
    """Splits the stacked logs into each variant's logs, as a separate fit's.

    It is also the fit's progress bar: Keras uses a `ProgbarLogger` found
    among the callbacks instead of adding its own. With one variant
    (`split=None`) it shows Keras's own bar. With several, the bar shows the
    best training loss of the epoch so far (the stacked logs' keys mean
    nothing to a reader), and after each epoch (`verbose=1` or `2`) one line
    names the best variant so far by its knob, with its values.
    """

    # The batch hook only updates the bar, as Keras's own progress bar does.
    async_safe = True

    def __init__(
        self, variants, names, logs, verbose, split, sync=None, callbacks=None
    ):
        super().__init__()
        self.sync = sync
        self.variants = variants
        self.names = names
        self.logs = logs
        self.verbose = verbose  # Keras's `params` set it again in `set_params`
        self.split = split
        self.histories = [RunHistory() for _ in variants]
        # `kerasreg.sweep.stopping.VariantCallbacks`: each variant's own copies
        # of the sweep's callbacks (one-fit engines), or None.
        self.callbacks = callbacks
        if callbacks is not None and callbacks.batches:
            self.async_safe = False  # a copy's batch hook may stop its variant

    def _sync(self):
        """The one fit's current values in the variants' own models."""
        self.model  # noqa: B018 on JAX this syncs the trained values into the variables
        if self.sync is not None:
            self.sync(self.variants)
        self._synced = True

    def _stale(self):
        """The one fit has trained since the variants were last brought in sync."""
        self._synced = False
        if self.callbacks is not None:
            self.callbacks.new_step()

    def _sync_once(self):
        """`_sync`, unless done since the last training step."""
        if not getattr(self, "_synced", False):
            self._sync()

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for variant, log in zip(self.variants, self.logs, strict=True):
            if log is not None:
                log.begin(variant)
        self._stale()
        if self.callbacks is not None:
            self.callbacks.begin(self.params, self._sync_once, lambda: self.model)

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._stale()
        if self.callbacks is not None:
            self.callbacks.epoch_begin(epoch)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._compact(logs))
        if self.callbacks is not None and self.callbacks.batches:
            self._stale()  # (only hooked with per-variant batch hooks)
            logs = dict(logs or {})
            self.callbacks.batch_end(batch, [_split(logs, k) for k in self.split])
            if not self.callbacks.active() or all(
                self.callbacks.stop_logs[i] is not None for i in self.callbacks.active()
            ):
                self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._stale()  # the epoch's steps ran since any sync
        shown = self._compact(logs)  # before the TensorBoard logs add their keys
        logs = dict(logs or {})
        if self.split is None:
            per_variant = [logs]
        else:
            per_variant = [_split(logs, k) for k in self.split]
        running = list(range(len(self.variants)))
        if self.callbacks is not None:
            running = self.callbacks.active()
            per_variant = [
                self.callbacks.epoch_logs(i, v) for i, v in enumerate(per_variant)
            ]
        if any(log is not None for log in self.logs):
            self._sync_once()
        for index in running:
            variant_logs, log = per_variant[index], self.logs[index]
            # The variant's callbacks first, as in its own fit (Keras's
            # History comes last): what they add to the logs
            # (ReduceLROnPlateau's `learning_rate`) is in its history.
            if self.callbacks is not None:
                self.callbacks.epoch_end(epoch, index, variant_logs)
            self.histories[index].append(epoch, variant_logs)
            if log is not None:
                log.epoch_end(epoch, variant_logs)
            if self.callbacks is not None:
                self.callbacks.end_if_stopped(index, variant_logs)
        self._last = per_variant
        super().on_epoch_end(epoch, shown)
        if self.verbose and self.split is not None:
            # Each variant at its best epoch so far, stopped ones included,
            # and the runs of the sweep's earlier fits.
            names, finished = FINISHED.get()
            line = best_line(
                [*names, *self.names],
                [*finished, *(best_so_far(h) for h in self.histories)],
            )
            if line:
                print(line, flush=True)
        if self.callbacks is not None and not self.callbacks.active():
            self.model.stop_training = True  # every variant has stopped

    def on_train_end(self, logs=None):
        if self.callbacks is not None and self.callbacks.active():
            last = getattr(self, "_last", None)
            for index in self.callbacks.active():
                self.callbacks.end(index, last[index] if last else None)
        for log in self.logs:
            if log is not None:
                log.end()

    def _compact(self, logs):
        """What the bar shows: the variant's own logs, or the best loss of K."""
        if self.split is None or not logs:
            return dict(logs or {})
        losses = [logs[f"{k}_loss"] for k in self.split if f"{k}_loss" in logs]
        losses = [float(v) for v in losses if not np.isnan(float(v))]
        return {"best_loss": min(losses)} if losses else {}


def best_so_far(history: dict) -> dict:
    """A run's values at its best epoch so far by `val_loss` (else `loss`)."""
    key = "val_loss" if "val_loss" in history else "loss"
    values = history.get(key) or []
    finite = [(v, i) for i, v in enumerate(values) if not np.isnan(v)]
    if not finite:
        return values_at(history, None)
    return values_at(history, epochs_of(history)[key][min(finite)[1]])


def best_line(names: list[str], per_variant: list[dict]) -> str | None:
    """`best so far by val_loss: <name> (<value>) - loss: ... - accuracy: ...`."""
    if not per_variant or not per_variant[0]:
        return None
    monitor = "val_loss" if "val_loss" in per_variant[0] else "loss"
    values = np.array([float(v.get(monitor, np.nan)) for v in per_variant])
    if np.all(np.isnan(values)):
        return None
    best = int(np.nanargmin(values))
    others = " - ".join(
        f"{k}: {float(v):.4g}" for k, v in per_variant[best].items() if k != monitor
    )
    line = f"best so far by {monitor}: {names[best]} ({values[best]:.4g})"
    return f"{line} - {others}" if others else line


def _split(logs: dict, key: str) -> dict:
    """Variant `key`'s logs, named as a separate fit names them."""
    out = {}
    for prefix in ("", "val_"):
        start = f"{prefix}{key}_"
        for name, value in logs.items():
            if name.startswith(start):
                out[f"{prefix}{name[len(start) :]}"] = float(value)
    return out


class InlineBatchLogs(keras.callbacks.Callback):
    """Defines `on_train_batch_end`, so Keras does not dispatch it to a thread."""

    def on_train_batch_end(self, batch, logs=None):
        pass
