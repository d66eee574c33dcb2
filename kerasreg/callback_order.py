"""Callback order: kerasreg callbacks that write `logs` must run before readers.

Keras calls the callbacks of `fit` in list order with one shared `logs` dict.
A callback that adds keys at epoch end (`WeightNormLogger`'s `data_loss`,
`WeightDecay`'s `weight_decay_rate`) is seen only by the callbacks after it:
`TensorBoard`, `CSVLogger`, `EarlyStopping`, `ModelCheckpoint` or
`ReduceLROnPlateau` placed before it never see those keys (`History` is always
last, so it always does).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import keras

from kerasreg._checks import KerasregWarning
from kerasreg._compat import fit_callbacks

# Keras callbacks that read epoch `logs` when their own hook runs.
LOGS_READERS = (
    keras.callbacks.TensorBoard,
    keras.callbacks.CSVLogger,
    keras.callbacks.EarlyStopping,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.ReduceLROnPlateau,
)

_WARNED: weakref.WeakSet = weakref.WeakSet()


def logs_readers_before(callback: keras.callbacks.Callback) -> list[Any]:
    """The `LOGS_READERS` placed before `callback` in the running `fit`'s list.

    Empty when `callback` is not being called by a `fit` (a hook called by hand).
    """
    callbacks = fit_callbacks(callback)
    if callbacks is None:
        return []
    index = next(i for i, item in enumerate(callbacks) if item is callback)
    return [item for item in callbacks[:index] if isinstance(item, LOGS_READERS)]


def warn_if_logs_readers_run_first(
    callback: keras.callbacks.Callback, keys: tuple[str, ...] = ()
) -> bool:
    """Warn, once per callback, if a Keras logs reader comes before `callback`.

    Call it from `on_train_begin` of a callback that writes to `logs`. It looks
    at the list of callbacks of the `fit` that is running and warns (a
    `UserWarning`, precisely a `kerasreg._checks.KerasregWarning`) when `TensorBoard`, `CSVLogger`, `EarlyStopping`,
    `ModelCheckpoint` or `ReduceLROnPlateau` comes before `callback`: those
    read `logs` before `callback` writes its keys, so they would not see them.

    Args:
        callback: the kerasreg callback whose `on_train_begin` is running.
        keys: the `logs` keys it writes, named in the warning.

    Returns:
        True if it warned now.

    Example:

    >>> class Writes(keras.callbacks.Callback):
    ...     def on_train_begin(self, logs=None):
    ...         warn_if_logs_readers_run_first(self, ("data_loss",))
    """
    if callback in _WARNED:
        return False
    readers = logs_readers_before(callback)
    if not readers:
        return False
    _WARNED.add(callback)
    name = type(callback).__name__
    readers = list(dict.fromkeys(type(r).__name__ for r in readers))
    names = ", ".join(readers)
    verb = "comes" if len(readers) == 1 else "come"
    what = f"the `logs` keys {', '.join(map(repr, keys))}" if keys else "`logs`"
    warnings.warn(
        f"{name} writes {what} at epoch end, but {names} {verb} before it in "
        f"`callbacks` and will not see them. Put {name} first: "
        f"callbacks=[{name}(...), {readers[0]}(...), ...].",
        KerasregWarning,
        stacklevel=3,
    )
    return True
