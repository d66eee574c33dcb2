"""The rows of a sweep: one per run (grid point and seed), named and measured.

A row holds what the grid point changes (family, values, config), its run's
history, and every history key measured at the run's `best_epoch` (Keras's
epoch number, as `EarlyStopping.best_epoch` and `History.epoch` count).
"""

from __future__ import annotations

from typing import Any

import keras

from kerasreg import _compat


def unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


class RunHistory(dict):
    """A run's `History.history` (`{key: [value per epoch it was measured]}`)
    that also knows the epoch of each value: `epochs[key]`, Keras's epoch
    numbers (from `initial_epoch`; `val_*` only where `validation_freq`
    validated)."""

    def __init__(self):
        super().__init__()
        self.epochs: dict[str, list[int]] = {}

    def append(self, epoch: int, logs: dict) -> None:
        for key, value in logs.items():
            self.setdefault(key, []).append(float(value))
            self.epochs.setdefault(key, []).append(int(epoch))


def epochs_of(history: dict) -> dict[str, list[int]]:
    """The epoch number of each value of each key (positions for a plain dict)."""
    known = getattr(history, "epochs", None)
    if known is not None:
        return known
    return {key: list(range(len(values))) for key, values in history.items()}


def last_epoch(history: dict) -> int:
    """The last epoch a run measured (-1: none)."""
    return max((e[-1] for e in epochs_of(history).values() if e), default=-1)


def values_at(history: dict, epoch: int | None) -> dict:
    """Every key's value measured at `epoch` (the last epoch when None); a key
    not measured then (validation skipped by `validation_freq`) is left out."""
    if epoch is None:
        epoch = last_epoch(history)
    out = {}
    for key, at in epochs_of(history).items():
        if epoch in at:
            out[key] = history[key][at.index(epoch)]
    return out


def run_name(name: str, seed: int | None) -> str:
    """The TensorBoard run (and `{variant}` field) of a grid point and seed."""
    return name if seed is None else f"{name}/seed_{seed}"


def make_row(
    point: Any,
    name: str,
    seed: int | None,
    history: dict,
    best_epoch: int | None = None,
) -> dict:
    """A row of `SweepResult.rows` from a grid point (`items.GridPoint`) and its run."""
    epochs = max((len(v) for v in history.values()), default=0)
    if best_epoch is None:
        best_epoch = last_epoch(history)
    config = {
        role: None if p is None else keras.saving.serialize_keras_object(p)
        for role, p in point.penalties.items()
    }
    row = {
        "run": run_name(name, seed),
        "penalty": name,
        "family": point.family,
        "values": dict(point.values),
        "strength": point.strength,
        "config": config,
        "transforms": [repr(t) for t in point.transforms],
        "seed": seed,
        "history": history,
        "epochs": epochs,
        "best_epoch": best_epoch,
    }
    row.update(values_at(history, best_epoch))
    return row


def metric_directions(models: list[keras.Model]) -> dict[str, str]:
    """The directions of the compiled metrics, read while they are built."""
    directions: dict[str, str] = {}
    for model in models:
        directions.update(_compat.metric_directions(model))
        if directions:
            break
    return directions
