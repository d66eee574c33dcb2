"""`BackupAndRestore` in a sweep: one backup of the whole sweep, resumed run by run.

A sweep given `keras.callbacks.BackupAndRestore(backup_dir)` trains its runs
as K separate fits (`engine="sequential"`) and keeps one backup of the
whole sweep in `backup_dir`:

- `sweep.json`: the sweep's run names, in order. A later sweep resumes from
  the folder only if it has the same runs; another sweep is refused before
  anything trains, naming the folder.
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
patience count, starts afresh, as when Keras resumes a plain fit) and trains
the rest. With `delete_checkpoint=True` (Keras's
default) the folder is deleted when the sweep has finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import keras
import numpy as np

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

    def __init__(self, callback, where: str, names: list[str]):
        self.callback = callback
        self.folder = os.fspath(callback.backup_dir)
        self.names = list(names)
        path = os.path.join(self.folder, SWEEP_FILE)
        if os.path.exists(path):
            with open(path) as f:
                runs = json.load(f).get("runs")
            if runs != self.names:
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: BackupAndRestore("
                    f"backup_dir={self.folder!r}) holds the backup of another "
                    f"sweep (runs {runs!r}), and this sweep's runs are "
                    f"{self.names!r}. Expected the folder of this sweep's "
                    "backup, or a new one: give another backup_dir, or delete "
                    "that folder to start afresh."
                )
        else:
            os.makedirs(self.folder, exist_ok=True)
            _write_json(path, {"runs": self.names})

    def _path(self, index: int, suffix: str = "") -> str:
        return os.path.join(self.folder, self.names[index] + suffix)

    def run_callback(self, index: int) -> keras.callbacks.BackupAndRestore:
        """Run `index`'s own `BackupAndRestore`, in its folder of the backup."""
        return keras.callbacks.BackupAndRestore(
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
        """A callback saving run `index`'s history and random generators'
        states at each epoch end (before the run's backup, which comes after)."""
        return _SaveHistory(self._path(index, ".history.json"), history)

    def generator_restorer(self, index: int):
        """A callback (after the run's backup) giving a resumed run its random
        generators' states at the epoch it resumes from: Keras's backup holds
        the weights, not the `SeedGenerator` states (a `Dropout`'s masks)."""
        return _RestoreGenerators(
            self._path(index, ".history.json"),
            os.path.join(self._path(index), "training_metadata.json"),
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
            "global": _global_state(),
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
        if not (os.path.exists(self.path) and os.path.exists(self.metadata)):
            return
        with open(self.metadata) as f:
            resume = str(json.load(f)["epoch"])
        with open(self.path) as f:
            saved = json.load(f).get("generators", {})
        if resume in saved:
            _assign(generator_variables(self.model), saved[resume]["model"])
            _set_global_state(saved[resume]["global"])


def _global_state() -> dict:
    """NumPy's global generator (the shuffling order on JAX and PyTorch) and,
    on PyTorch, torch's (an unseeded Dropout's masks), as JSON values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "numpy": [
            kind,
            np.asarray(keys).tolist(),
            int(position),
            int(has_gauss),
            float(gauss),
        ]
    }
    if keras.backend.backend() == "torch":
        import torch

        state["torch"] = torch.random.get_rng_state().tolist()
    return state


def _set_global_state(state: dict) -> None:
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)
    )
    if "torch" in state:
        import torch

        torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


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
    os.makedirs(os.path.dirname(partial) or ".", exist_ok=True)  # `none/seed_4`
    with open(partial, "w") as f:
        json.dump(value, f)
    os.replace(partial, path)
