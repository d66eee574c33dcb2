"""`BackupAndRestore` in a sweep: one backup of the whole sweep, resumed run by run.

A sweep given `keras.callbacks.BackupAndRestore(backup_dir)` trains its runs
as K separate fits (`engine="sequential"`) and keeps one backup of the
whole sweep in `backup_dir`:

- `sweep.json`: the sweep's run names, in order, the seeds its fits start
  from (without `seeds=`, the one drawn for the sweep: the runs trained
  after a resume keep the data order of those before) and a fingerprint of
  its settings. A later sweep resumes from the folder only if it has the
  same runs and settings; another is refused before anything trains,
  naming the folder.
- `<run>/`: the run's own copy of Keras's `BackupAndRestore` (its weights,
  optimizer state and epoch, saved at each epoch end or every `save_freq`
  batches, exactly as in a plain fit).
- `<run>.history.json`: the run's history so far and the states of its
  random generators (its `SeedGenerator`s, NumPy's and, on PyTorch, torch's
  global generator), saved at each epoch end just before its backup: a
  resumed run's row holds every epoch, and it draws the masks and the data
  order the uninterrupted run drew (Keras's backup holds only weights and
  optimizer state).
- `<run>.done/`: a finished run's weights and optimizer state
  (`model.weights.h5`), its history and best epoch (`run.json`): a resumed
  sweep loads it instead of training the run again.

Called again after an interruption, the same `sweep(...)` loads the finished
runs, resumes the interrupted one where its backup ends (Keras's own
`BackupAndRestore`: weights, optimizer state and epoch, plus the generator
states above; the state of other callbacks, such as `EarlyStopping`'s
patience count, starts afresh, as when Keras resumes a plain fit; with
`save_freq=N` Keras starts the epoch it backed up inside again from its
first batch, so that resume is not exact) and trains the rest. With
`delete_checkpoint=True` (Keras's
default) the folder is deleted when the sweep has finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any

import keras
import numpy as np

from kerasreg.sweep import randomness
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


def check_log_dir(callbacks: list, log_dir: Any) -> None:
    """Refuse a `log_dir` inside the backup folder, which the sweep deletes."""
    found = find(callbacks)
    if found is None or log_dir is None or not found[1].delete_checkpoint:
        return
    folder = os.path.abspath(os.fspath(found[1].backup_dir))
    logs = os.path.abspath(os.fspath(log_dir))
    if os.path.commonpath([folder, logs]) == folder:
        raise ValueError(
            f"kerasreg.sweep: invalid `log_dir`: {os.fspath(log_dir)!r} is inside "
            f"`callbacks[{found[0]}]`'s backup_dir {os.fspath(found[1].backup_dir)!r}"
            ", which the sweep deletes when it has finished "
            "(delete_checkpoint=True). Expected a log_dir outside the backup."
        )


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
        settings: dict | None = None,
    ):
        self.callback = callback
        self.folder = os.fspath(callback.backup_dir)
        self.names = list(names)
        self.fit_seeds = None if fit_seeds is None else [int(s) for s in fit_seeds]
        path = os.path.join(self.folder, SWEEP_FILE)
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: BackupAndRestore(backup_dir="
                f"{self.folder!r}) is a file. Expected a folder (made if "
                "missing) that holds only this sweep's backup."
            )
        if (
            os.path.isdir(self.folder)
            and os.listdir(self.folder)
            and not os.path.exists(path)
        ):
            # Not a sweep's backup: `delete_checkpoint` would delete its files.
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: BackupAndRestore(backup_dir="
                f"{self.folder!r}) holds files that are not a sweep's backup "
                f"(such as {sorted(os.listdir(self.folder))[0]!r}), which the "
                "sweep would delete at its end. Expected a new or empty folder, "
                "or the folder of this sweep's backup."
            )
        if os.path.exists(path):
            try:
                with open(path) as f:
                    record = json.load(f)
            except ValueError as error:
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: {path!r} cannot be read "
                    f"({error}). Delete {self.folder!r} to start afresh."
                ) from None
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
            saved = record.get("settings")
            if settings is not None and saved is not None and saved != settings:
                changed = sorted(
                    k for k in {*saved, *settings} if saved.get(k) != settings.get(k)
                )
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: BackupAndRestore("
                    f"backup_dir={self.folder!r}) holds the backup of a sweep "
                    f"of the same runs with other settings ({', '.join(changed)} "
                    "differ: the fit's arguments, the compile configuration, "
                    "the template's starting weights or the data). Expected "
                    "the folder of this sweep's backup: give another "
                    "backup_dir, or delete that folder to start afresh."
                )
            # The seeds the interrupted sweep's fits started from: without
            # `seeds=` one is drawn per call, and the runs of one sweep share
            # it (one data order), the runs trained after the resume too.
            if record.get("fit_seeds") is not None:
                self.fit_seeds = [int(s) for s in record["fit_seeds"]]
        else:
            os.makedirs(self.folder, exist_ok=True)
            _write_json(
                path,
                {"runs": self.names, "fit_seeds": self.fit_seeds, "settings": settings},
            )

    def _path(self, index: int, suffix: str = "") -> str:
        return os.path.join(self.folder, self.names[index] + suffix)

    def _metadata(self, index: int) -> str:
        """Where run `index`'s Keras backup records the epoch it resumes at."""
        return os.path.join(self._path(index), "training_metadata.json")

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
        _assign(generator_variables(variant), record.get("generators", []))
        return _history(record["history"]), record["best_epoch"]

    def resumed_history(self, index: int) -> RunHistory:
        """Run `index`'s history up to where its backup resumes (empty if none)."""
        history = RunHistory()
        path = self._path(index, ".history.json")
        resume = _resume_epoch(self._metadata(index))
        if resume is None or not os.path.exists(path):
            return history
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
        """A callback saving run `index`'s history and random generators'
        states at each epoch end (before the run's backup, which comes after)."""
        return _SaveHistory(self._path(index, ".history.json"), history)

    def generator_restorer(self, index: int):
        """A callback (after the run's backup) giving a resumed run its random
        generators' states at the epoch it resumes from: Keras's backup holds
        the weights, not the `SeedGenerator` states (a `Dropout`'s masks)."""
        return _RestoreGenerators(
            self._path(index, ".history.json"), self._metadata(index)
        )

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
            {
                "history": _record(history),
                "best_epoch": best,
                "generators": _values(generator_variables(variant)),
            },
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(index, ".history.json"))

    def end(self) -> None:
        """The sweep has finished: the backup is deleted (`delete_checkpoint`)."""
        if self.callback.delete_checkpoint:
            shutil.rmtree(self.folder, ignore_errors=True)


def settings(
    variants: list, fit_kwargs: dict, compile_config: dict, x: Any, y: Any
) -> dict:
    """What a resumed sweep must share with the interrupted one: `fit`'s
    plain arguments, the compile configuration, a digest of the runs'
    starting weights and of the data (arrays; other data by type)."""
    plain = (bool, int, float, str, type(None))
    fit = {
        k: v
        for k, v in sorted(fit_kwargs.items())
        if k != "verbose" and isinstance(v, plain)
    }
    try:
        compiled = json.loads(json.dumps(compile_config, sort_keys=True))
        # Keras numbers optimizers' names per process ("sgd", "sgd_1"): not a
        # setting.
        compiled["optimizer"] = _without_names(compiled.get("optimizer"))
    except (TypeError, ValueError):  # an object without a config: by type
        compiled = sorted(f"{k}: {type(v).__name__}" for k, v in compile_config.items())
    weights = hashlib.sha256()
    penalties = []
    for variant in variants:
        for value in variant.get_weights():
            weights.update(np.ascontiguousarray(value).tobytes())
        penalties.append(
            [_config(getattr(w, "regularizer", None)) for w in variant.weights]
        )
    data = hashlib.sha256()
    for part in keras.tree.flatten([x, y, fit_kwargs.get("validation_data")]):
        if isinstance(part, np.ndarray):
            data.update(repr((part.shape, part.dtype.str)).encode())
            data.update(np.ascontiguousarray(part).tobytes())
        else:
            data.update(type(part).__name__.encode())
    return {
        "fit": fit,
        "compile": compiled,
        "weights": weights.hexdigest(),
        "penalties": hashlib.sha256(
            json.dumps(penalties, sort_keys=True, default=_name).encode()
        ).hexdigest(),
        "data": data.hexdigest(),
    }


def _config(regularizer: Any) -> Any:
    if regularizer is None:
        return None
    try:
        return [type(regularizer).__name__, regularizer.get_config()]
    except Exception:  # a callable without a config: by name
        return _name(regularizer)


def _name(value: Any) -> str:
    """A stable stand-in for an object JSON cannot write (no memory address)."""
    if isinstance(value, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    return type(value).__name__


def _without_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_names(v) for k, v in value.items() if k != "name"}
    if isinstance(value, list):
        return [_without_names(v) for v in value]
    return value


class _RunBackup(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore`, counting epochs from the resumed one.

    Keras's counts the epoch it records from 0 in each fit and sets it at
    epoch ends only: with `save_freq=N`, a backup inside the first epoch of a
    resumed fit recorded epoch 0, and a second resume restarted the run's
    epochs (and its history) at 0 from weights that had trained.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except OSError as error:
            raise ValueError(
                f"kerasreg.sweep: the backup of this run in {self.backup_dir!r} "
                f"cannot be read ({type(error).__name__}: {error}). Delete that "
                "folder to train this run again from its start (the runs "
                "finished before it are kept)."
            ) from None

    def _save_model(self):
        """Keras's save, each file written whole and then renamed: a process
        killed while writing leaves the previous backup, not half a file."""
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint and os.path.exists(self._weights_path):
            shutil.copy(self._weights_path, self._prev_weights_path)
        if self.double_checkpoint and os.path.exists(self._training_metadata_path):
            shutil.copy(self._training_metadata_path, self._prev_training_metadata_path)
        partial = os.path.join(self.backup_dir, "partial.weights.h5")
        self.model.save_weights(filepath=partial, overwrite=True)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        _write_json(self._training_metadata_path + ".next", metadata)
        # The two renames: the weights, then the epoch they belong to.
        os.replace(partial, self._weights_path)
        os.replace(self._training_metadata_path + ".next", self._training_metadata_path)


def generator_variables(model: keras.Model) -> list:
    """The model's state outside its weights: its `SeedGenerator` states."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _values(variables: list) -> list:
    return [keras.ops.convert_to_numpy(v.value).tolist() for v in variables]


def _assign(variables: list, values: list) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(np.asarray(value, dtype=variable.dtype))


class _SaveHistory(keras.callbacks.Callback):
    def __init__(self, path: str, history: RunHistory):
        super().__init__()
        self.path = path
        self.history = history
        self.generators: dict[str, list] = {}

    def on_epoch_end(self, epoch, logs=None):
        # The states after this epoch, for a resume at epoch + 1; the
        # previous epoch's are kept too (an interruption between this save
        # and the backup's resumes from the epoch before).
        states = {
            "model": _values(generator_variables(self.model)),
            "global": randomness.numpy_and_torch_state(),
        }
        self.generators = {
            **{k: v for k, v in self.generators.items() if k == str(epoch)},
            str(epoch + 1): states,
        }
        _write_json(self.path, {**_record(self.history), "generators": self.generators})


class _RestoreGenerators(keras.callbacks.Callback):
    def __init__(self, path: str, metadata: str):
        super().__init__()
        self.path = path
        self.metadata = metadata

    def on_train_begin(self, logs=None):
        resume = _resume_epoch(self.metadata)
        if resume is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            saved = json.load(f).get("generators", {})
        resume = str(resume)
        if resume in saved:
            _assign(generator_variables(self.model), saved[resume]["model"])
            randomness.set_numpy_and_torch_state(saved[resume]["global"])


def _resume_epoch(metadata: str) -> int | None:
    """The epoch a run's Keras backup resumes at (None: no backup yet)."""
    if not os.path.exists(metadata):
        return None
    with open(metadata) as f:
        return int(json.load(f)["epoch"])


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
