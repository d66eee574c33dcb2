"""The rows of a sweep: one per run (grid point and seed), named and measured.

A row holds what the grid point changes (family, values, config), its run's
history, and every history key at the run's `best_epoch`.
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
        best_epoch = epochs - 1
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
    for key, values in history.items():
        if 0 <= best_epoch < len(values):
            row[key] = values[best_epoch]
    return row


def metric_directions(models: list[keras.Model]) -> dict[str, str]:
    """The directions of the compiled metrics, read while they are built."""
    directions: dict[str, str] = {}
    for model in models:
        directions.update(_compat.metric_directions(model))
        if directions:
            break
    return directions
