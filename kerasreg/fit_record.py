"""Which kerasreg callbacks acted on a model in its last `fit`.

`kerasreg.describe(model)` shows what acts on each weight. Callbacks are not
part of a model, so each post-step kerasreg callback (`WeightDecay`,
`SoftThreshold`) records itself here when its `fit` starts, and the step at
which that `fit` ended. The record answers only while it is current: once the
model has trained further (its optimizer step moved) in a `fit` without them,
they no longer act on it and the record says nothing.
"""

from __future__ import annotations

import weakref
from typing import Any


class _Record:
    """The post-step callbacks of one `fit`, and the step at which it ended."""

    def __init__(self, params: Any):
        # Keras gives every callback of one `fit` the same `params` dict.
        self.params = params
        self.callbacks: list[Any] = []
        self.end_step: int | None = None  # None while the fit runs


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_fit_start(model: Any, callback: Any) -> None:
    """Call from `on_train_begin`: `callback` acts on `model` in this `fit`."""
    record = _RECORDS.get(model)
    params = callback.params
    if record is None or record.params is not params or record.end_step is not None:
        record = _RECORDS[model] = _Record(params)
    if not any(c is callback for c in record.callbacks):
        record.callbacks.append(callback)


def record_fit_end(model: Any, callback: Any, step: int) -> None:
    """Call from `on_train_end`, with the optimizer's step count now."""
    record = _RECORDS.get(model)
    if record is not None and any(c is callback for c in record.callbacks):
        record.end_step = step


def last_fit_callbacks(model: Any, step: int) -> list[Any]:
    """The post-step callbacks of `model`'s last `fit`, in list order, if that
    `fit` is still running or the model has not trained since (`step`, its
    optimizer's step count now, is where that `fit` ended); else `[]`."""
    record = _RECORDS.get(model)
    if record is None or record.end_step not in (None, step):
        return []
    return list(record.callbacks)
