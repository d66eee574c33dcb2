"""`BackupAndRestore` in a sweep: one backup of the whole sweep, resumed run by run.

A sweep given `keras.callbacks.BackupAndRestore(backup_dir)` trains its runs
as K separate fits (`engine="sequential"`) and keeps one backup of the
whole sweep in `backup_dir`:

- `sweep.json`: the sweep's run names, in order, and the seeds its fits
  start from (without `seeds=`, the one drawn for the sweep: the runs
  trained after a resume keep the data order of those before). A later
  sweep resumes from the folder only if it has the same runs; another sweep
  is refused before anything trains, naming the folder (only the names are
  compared: the same runs with other fit arguments or data are not seen).
- `<run>/`: the run's own copy of Keras's `BackupAndRestore` (its weights,
  optimizer state and epoch, saved at each epoch end or every `save_freq`
  batches, exactly as in a plain fit).
- `<run>.history.json`: the run's history so far, saved at each epoch end
  just before its backup, so that a resumed run's row holds every epoch.
- `<run>.done/`: a finished run's weights and optimizer state
  (`model.weights.h5`), its history and best epoch (`run.json`): a resumed
  sweep loads it instead of training the run again.

Called again after an interruption, the same `sweep(...)` loads the finished
runs, resumes the interrupted one where its backup ends (Keras's own
`BackupAndRestore`: weights, optimizer state and epoch; the state of other
callbacks, such as `EarlyStopping`'s patience count, starts afresh, as when
Keras resumes a plain fit; with `shuffle=True` the resumed epochs draw a new
data order; the random layers' generator states are not in Keras's backup,
so a resumed run's dropout masks are not those of the uninterrupted run;
with `save_freq=N` Keras starts the epoch it backed up inside again from its
first batch) and trains the rest. With `delete_checkpoint=True` (Keras's
default) the folder is deleted when the sweep has finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import keras

from kerasreg.sweep.rows import RunHistory, epochs_of

SWEEP_FILE = "sweep.json"


def find(callbacks: list) -> tuple[int, keras.callbacks.BackupAndRestore] | None:
    """`(position, callback)` of the sweep's `BackupAndRestore`, or None."""
    found = [
        (i, c)
        for i, c in enumerate(callbacks)
        if isinstance(c, keras.callbacks.BackupAndRestore)
    ]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(
            "kerasreg.sweep: invalid `callbacks`: "
            f"`callbacks[{found[0][0]}]` and `callbacks[{found[1][0]}]` are both "
            "BackupAndRestore. Expected at most one: it holds the backup of "
            "the whole sweep."
        )
    index, callback = found[0]
    if type(callback) is not keras.callbacks.BackupAndRestore:
        raise ValueError(
            f"kerasreg.sweep: invalid `callbacks[{index}]`: "
            f"{type(callback).__name__} is a subclass of BackupAndRestore. "
            "Expected keras.callbacks.BackupAndRestore itself: each run gets "
            "a fresh one in its own folder of the sweep's backup."
        )
    return index, callback


class SweepBackup:
    """The backup of one sweep's runs in `callback.backup_dir`.

    Args:
        callback: the sweep's `keras.callbacks.BackupAndRestore`.
        where: how to name it in errors (`"`callbacks[1]`"`).
        names: the runs' names, in order.
    """

    def __init__(
        self,
        callback,
        where: str,
        names: list[str],
        fit_seeds: list[int] | None = None,
    ):
        self.callback = callback
        self.folder = os.fspath(callback.backup_dir)
        self.names = list(names)
        self.fit_seeds = None if fit_seeds is None else [int(s) for s in fit_seeds]
        path = os.path.join(self.folder, SWEEP_FILE)
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            runs = record.get("runs")
            if runs != self.names:
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: BackupAndRestore("
                    f"backup_dir={self.folder!r}) holds the backup of another "
                    f"sweep (runs {runs!r}), and this sweep's runs are "
                    f"{self.names!r}. Expected the folder of this sweep's "
                    "backup, or a new one: give another backup_dir, or delete "
                    "that folder to start afresh."
                )
            # The seeds the interrupted sweep's fits started from: without
            # `seeds=` one is drawn per call, and the runs of one sweep share
            # it (one data order), the runs trained after the resume too.
            if record.get("fit_seeds") is not None:
                self.fit_seeds = [int(s) for s in record["fit_seeds"]]
        else:
            os.makedirs(self.folder, exist_ok=True)
            _write_json(path, {"runs": self.names, "fit_seeds": self.fit_seeds})

    def _path(self, index: int, suffix: str = "") -> str:
        return os.path.join(self.folder, self.names[index] + suffix)

    def run_callback(self, index: int) -> keras.callbacks.BackupAndRestore:
        """Run `index`'s own `BackupAndRestore`, in its folder of the backup."""
        return _RunBackup(
            self._path(index),
            save_freq=self.callback.save_freq,
            double_checkpoint=self.callback.double_checkpoint,
            delete_checkpoint=self.callback.delete_checkpoint,
        )

    def load_finished(self, index: int, variant: keras.Model):
        """`(history, best_epoch)` of run `index` if it had finished (its
        weights and optimizer state loaded into `variant`), else None."""
        folder = self._path(index, ".done")
        if not os.path.isdir(folder):
            return None
        with open(os.path.join(folder, "run.json")) as f:
            record = json.load(f)
        if variant.optimizer is not None and not variant.optimizer.built:
            variant.optimizer.build(variant.trainable_variables)
        variant.load_weights(os.path.join(folder, "model.weights.h5"))
        return _history(record["history"]), record["best_epoch"]

    def resumed_history(self, index: int) -> RunHistory:
        """Run `index`'s history up to where its backup resumes (empty if none)."""
        history = RunHistory()
        path = self._path(index, ".history.json")
        metadata = os.path.join(self._path(index), "training_metadata.json")
        if not (os.path.exists(path) and os.path.exists(metadata)):
            return history
        with open(metadata) as f:
            resume = int(json.load(f)["epoch"])
        with open(path) as f:
            saved = _history(json.load(f))
        # Epochs after the last backup are trained again.
        for key, values in saved.items():
            for value, epoch in zip(values, saved.epochs[key], strict=True):
                if epoch < resume:
                    history.setdefault(key, []).append(value)
                    history.epochs.setdefault(key, []).append(epoch)
        return history

    def history_saver(self, index: int, history: RunHistory):
        """A callback saving run `index`'s history at each epoch end (before
        the run's backup, which comes last in its fit)."""
        return _SaveHistory(self._path(index, ".history.json"), history)

    def finish_run(
        self, index: int, variant: keras.Model, history: dict, best: Any
    ) -> None:
        """Record run `index` as finished (written whole, then renamed)."""
        final = self._path(index, ".done")
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        variant.save_weights(os.path.join(partial, "model.weights.h5"))
        _write_json(
            os.path.join(partial, "run.json"),
            {"history": _record(history), "best_epoch": best},
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(index, ".history.json"))

    def end(self) -> None:
        """The sweep has finished: the backup is deleted (`delete_checkpoint`)."""
        if self.callback.delete_checkpoint:
            shutil.rmtree(self.folder, ignore_errors=True)


class _RunBackup(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore`, counting epochs from the resumed one.

    Keras's counts the epoch it records from 0 in each fit and sets it at
    epoch ends only: with `save_freq=N`, a backup inside the first epoch of a
    resumed fit recorded epoch 0, and a second resume restarted the run's
    epochs (and its history) at 0 from weights that had trained.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch


class _SaveHistory(keras.callbacks.Callback):
    def __init__(self, path: str, history: RunHistory):
        super().__init__()
        self.path = path
        self.history = history

    def on_epoch_end(self, epoch, logs=None):
        _write_json(self.path, _record(self.history))


def _record(history: dict) -> dict:
    return {"values": dict(history), "epochs": dict(epochs_of(history))}


def _history(record: dict) -> RunHistory:
    history = RunHistory()
    history.update({k: list(v) for k, v in record["values"].items()})
    history.epochs.update({k: list(v) for k, v in record["epochs"].items()})
    return history


def _write_json(path: str, value: Any) -> None:
    """Write `value` to `path` whole: a reader never sees half a file."""
    partial = path + ".partial"
    # A run named `<point>/seed_<s>` (`seeds=`) has its files in a subfolder.
    os.makedirs(os.path.dirname(partial) or ".", exist_ok=True)
    with open(partial, "w") as f:
        json.dump(value, f)
    os.replace(partial, path)
