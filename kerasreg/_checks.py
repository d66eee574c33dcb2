"""Argument checks and small numeric rules shared by every kerasreg module.

- scalar arguments: `as_real_scalar`, `validate_factor` (finite, >= 0),
  `validate_unit_interval` (`[0, 1]` or `[0, 1)`), `validate_bool`;
- iterables of Keras objects: `check_items`;
- dtype rules: `is_low_precision`, `accumulation_dtype` (float16 and bfloat16
  weights are summed in float32);
- the optimizer's step count: `update_counter`, `optimizer_iterations`;
- the category of kerasreg's own warnings: `KerasregWarning`.

Errors name the argument, the value received and what is accepted, as
Keras's own `validate_float_arg` does. This module imports nothing from
kerasreg: it is the bottom layer.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import numpy as np
from keras import ops

_LOW_PRECISION = ("float16", "bfloat16")


class KerasregWarning(UserWarning):
    """The category of every warning kerasreg issues itself.

    Its warnings point at the user's code (`stacklevel`), so a filter on
    kerasreg's modules does not see them; filter on this class instead
    (kerasreg's own test suite turns it into an error).
    """


class KerasregDeprecationWarning(KerasregWarning, DeprecationWarning):
    """A kerasreg argument or function that will go away."""


def as_real_scalar(value: Any) -> float | None:
    """`value` as a Python float if it is one real number, else `None`.

    Python ints and floats, NumPy scalars and 0-d arrays (or tensors) qualify;
    booleans, strings, `None` and arrays with any dimension do not.
    """
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        try:
            array = np.asarray(value)
        except Exception:
            return None
        if array.shape == () and array.dtype.kind in "fiu":
            return float(array)
    return None


def validate_factor(value: Any, name: str, owner: str) -> float:
    """Return `value` as a Python float, or raise naming `name` and `value`.

    Accepts any finite real number >= 0: Python ints and floats, NumPy scalars
    and 0-d arrays (or tensors). Rejects booleans, strings, sequences, arrays
    with more than one element, `None`, NaN, infinities and negative numbers.
    """
    accepted = "a finite real number >= 0 (int, float, NumPy scalar or 0-d array)"
    number = as_real_scalar(value)
    if number is None:
        raise TypeError(
            f"{owner}: invalid `{name}`: expected {accepted}. "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{owner}: invalid `{name}`: expected {accepted}. "
            f"Received: {name}={value!r}."
        )
    return number


def validate_unit_interval(value: Any, name: str, owner: str, *, upper: bool) -> float:
    """`value` as a float in `[0, 1]` (`upper=True`) or `[0, 1)`, or raise."""
    accepted = f"a real number in [0, 1{']' if upper else ')'}"
    number = as_real_scalar(value)
    if number is None:
        raise TypeError(
            f"{owner}: invalid `{name}`: expected {accepted}. "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    if not (0.0 <= number <= 1.0) or (number == 1.0 and not upper):
        raise ValueError(
            f"{owner}: invalid `{name}`: expected {accepted}. Received: {name}={value!r}."
        )
    return number


def validate_bool(value: Any, name: str, owner: str) -> bool:
    """`value` as a Python bool (`True`, `False` or a NumPy bool), or raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{owner}: invalid `{name}`: expected True or False. "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    return bool(value)


def check_items(items: Any, types: Any, prefix: str, expected: str) -> list[Any]:
    """`items` as a list whose every item is an instance of `types`, or raise.

    The `TypeError` reads `"{prefix}: an iterable must hold {expected}.
    Received an item ..."`, naming the first item of another type.
    """
    items = list(items)
    for item in items:
        if not isinstance(item, types):
            raise TypeError(
                f"{prefix}: an iterable must hold {expected}. Received an item "
                f"{item!r} (type {type(item).__name__})."
            )
    return items


def is_low_precision(dtype: Any) -> bool:
    """True for float16 and bfloat16, which kerasreg sums in float32."""
    return keras.backend.standardize_dtype(dtype) in _LOW_PRECISION


def accumulation_dtype(x: Any) -> Any:
    """Low-precision weights are summed in float32 (float16 overflows at 65504)."""
    x = ops.convert_to_tensor(x)
    if is_low_precision(x.dtype):
        return ops.cast(x, "float32")
    return x


def update_counter(optimizer: Any) -> Any:
    """The variable (or tensor) counting the updates `optimizer` applied, or None.

    `optimizer.iterations`, except for a `LossScaleOptimizer`: its wrapped
    optimizer's, which moves only when an update is applied (not on a step
    skipped for non-finite gradients). Keras 3.8's `LossScaleOptimizer` does
    not forward `iterations` (its own stays 0); later versions forward it.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        optimizer = inner
    return getattr(optimizer, "iterations", None)


def optimizer_iterations(model: Any) -> int:
    """Optimizer updates taken so far (one scalar read from the device); 0 without
    an optimizer. The step index of every kerasreg callback, never rebuilt from
    Keras's `batch` argument."""
    iterations = update_counter(getattr(model, "optimizer", None))
    return 0 if iterations is None else int(ops.convert_to_numpy(iterations))
