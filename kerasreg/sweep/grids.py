"""Grids for `kerasreg.sweep`: one knob over ranges of values, products, log ranges.

`grid(knob, values, **arguments)` makes one item per value (or per
combination of several argument ranges), `product(*axes)` combines knobs
(penalty x decay rate), `log_range(start, stop)` gives log-spaced values with
short decimal forms, so that the variants' names stay readable.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kerasreg._checks import as_real_scalar
from kerasreg.poststep import PostStepTransform


def grid(knob: Callable[..., Any], values: Any = None, /, **arguments: Any) -> list:
    """Grid items for `kerasreg.sweep`: one knob over one or more ranges of values.

    `grid(kerasreg.L2Penalty, [1e-4, 1e-3])` is
    `[L2Penalty(1e-4), L2Penalty(1e-3)]`. A keyword argument given a list (or
    tuple, range or 1-D array) of numbers is an axis of the grid; several
    axes are combined, every value with every other (L1 x L2 strengths:
    `grid(ElasticNetPenalty, l1=[...], l2=[...])`). Any other keyword is
    passed as it is to every item (`toward="start"`, `where="hidden"`). The
    positional `values` are the knob's first argument (`l2`, `rate`,
    `threshold`, ...). Items come in the order of `itertools.product` over
    the axes, positional first.

    Args:
        knob: a penalty or post-step transform class (or any callable that
            returns a grid item), e.g. `kerasreg.L2Penalty`,
            `kerasreg.WeightDecay`, `kerasreg.SoftThreshold`.
        values: optional list of values of the knob's first argument.
        **arguments: the knob's other arguments: lists of numbers are axes,
            anything else is fixed.

    Returns:
        A list of grid items, to pass to `sweep` (concatenate with `+`, combine
        with `kerasreg.product`).

    Example:

    >>> kerasreg.grid(kerasreg.L2Penalty, [1e-4, 1e-3])
    [L2Penalty(l2=0.0001), L2Penalty(l2=0.001)]
    >>> len(kerasreg.grid(kerasreg.ElasticNetPenalty, l1=[1e-4, 1e-3],
    ...                   l2=[1e-4, 1e-3, 1e-2]))
    6
    >>> [d.rate for d in kerasreg.grid(kerasreg.WeightDecay,
    ...                                kerasreg.log_range(1e-4, 1e-2))]
    [0.0001, 0.001, 0.01]
    """
    if not callable(knob):
        raise TypeError(
            "kerasreg.grid: invalid `knob`: expected a penalty or post-step "
            "transform class (such as kerasreg.L2Penalty or kerasreg.WeightDecay). "
            f"Received: knob={knob!r} (type {type(knob).__name__})."
        )
    axes: dict[str, list[float]] = {}
    fixed: dict[str, Any] = {}
    if values is not None:
        first = _first_argument(knob)
        if first in arguments:
            raise TypeError(
                f"kerasreg.grid: `{first}` is given twice: as the positional "
                f"values and as a keyword. Received: values={values!r}, "
                f"{first}={arguments[first]!r}."
            )
        axes[first] = _axis(values, "values")
    for name, value in arguments.items():
        if _is_axis(value):
            axes[name] = _axis(value, name)
        else:
            fixed[name] = value
    if not axes:
        raise ValueError(
            "kerasreg.grid: no values to vary: give the values of the knob's "
            "first argument (grid(L2Penalty, [1e-4, 1e-3])) or a keyword with a "
            f"list of numbers. Received: values={values!r}, arguments={arguments!r}."
        )
    names = list(axes)
    return [
        knob(**dict(zip(names, combination, strict=True)), **fixed)
        for combination in itertools.product(*axes.values())
    ]


def product(*axes: Sequence[Any]) -> list:
    """Every combination of one item from each axis, as grid items for `sweep`.

    `product([None, L2Penalty(1e-4)], [None, WeightDecay(1e-3)])` is
    `[None, [None, WeightDecay(1e-3)], L2Penalty(1e-4), [L2Penalty(1e-4),
    WeightDecay(1e-3)]]`: penalty x decay rate, baselines included. An item
    that is itself a list is spread into the combination; `None` is left out
    of a combination that has a penalty; a combination of `None`s is `None`,
    one with a single item left is that item. (`[None, WeightDecay(1e-3)]`
    is "no penalty on the sweep's `role`, and decay".)

    Args:
        *axes: lists of grid items (penalties, `None`, `{role: penalty}`
            dicts, post-step transforms, lists of them), e.g. from `grid`.

    Returns:
        A list of grid items, in the order of `itertools.product`.

    Example:

    >>> decay = kerasreg.grid(kerasreg.WeightDecay, [1e-3, 1e-2])
    >>> l2 = kerasreg.grid(kerasreg.L2Penalty, [1e-4])
    >>> items = kerasreg.product([None] + l2, [None] + decay)
    >>> len(items), items[0]
    (6, None)
    >>> items[4]
    [L2Penalty(l2=0.0001), WeightDecay(rate=0.001)]
    """
    if not axes:
        raise ValueError("kerasreg.product: give at least one list of grid items.")
    checked = []
    for index, axis in enumerate(axes):
        if isinstance(axis, (str, bytes, dict)) or not isinstance(axis, Sequence):
            raise TypeError(
                f"kerasreg.product: invalid `axes[{index}]`: expected a list of "
                f"grid items. Received: {axis!r} (type {type(axis).__name__})."
            )
        if not axis:
            raise ValueError(f"kerasreg.product: invalid `axes[{index}]`: empty.")
        checked.append(list(axis))
    items: list[Any] = []
    for combination in itertools.product(*checked):
        parts: list[Any] = []
        for item in combination:
            parts.extend(item if isinstance(item, (list, tuple)) else [item])
        if any(p is not None and not isinstance(p, PostStepTransform) for p in parts):
            parts = [p for p in parts if p is not None]  # a penalty: None gives way
        if all(part is None for part in parts):
            items.append(None)
        elif len(parts) == 1:
            items.append(parts[0])
        else:
            items.append(parts)
    return items


def log_range(start: float, stop: float, per_decade: int = 1) -> list[float]:
    """Log-spaced values from `start` to `stop`, each with 2 significant digits.

    `start * 10 ** (k / per_decade)` for k = 0, 1, ... while it is at most
    `stop`, rounded to two significant digits so that names stay short
    (`10 ** 0.5 = 3.162...` becomes `3.2`; at most 5 % from exact log
    spacing).

    Args:
        start: the first value, finite and > 0.
        stop: the largest value allowed, >= `start`.
        per_decade: values per factor of 10 (an int >= 1).

    Returns:
        A list of floats.

    Example:

    >>> kerasreg.log_range(1e-4, 1e-1)
    [0.0001, 0.001, 0.01, 0.1]
    >>> kerasreg.log_range(1e-3, 1e-2, per_decade=2)
    [0.001, 0.0032, 0.01]
    """
    low, high = as_real_scalar(start), as_real_scalar(stop)
    for name, number, value in (("start", low, start), ("stop", high, stop)):
        if number is None or not math.isfinite(number) or number <= 0:
            raise ValueError(
                f"kerasreg.log_range: invalid `{name}`: expected a finite number "
                f"> 0. Received: {name}={value!r}."
            )
    assert low is not None and high is not None  # checked just above
    if high < low:
        raise ValueError(
            "kerasreg.log_range: invalid `stop`: expected stop >= start. "
            f"Received: start={start!r}, stop={stop!r}."
        )
    if isinstance(per_decade, bool) or not isinstance(per_decade, (int, np.integer)):
        raise TypeError(
            "kerasreg.log_range: invalid `per_decade`: expected an int >= 1. "
            f"Received: per_decade={per_decade!r}."
        )
    if per_decade < 1:
        raise ValueError(
            "kerasreg.log_range: invalid `per_decade`: expected an int >= 1. "
            f"Received: per_decade={per_decade!r}."
        )
    count = math.floor(math.log10(high / low) * per_decade + 1e-9)
    values: list[float] = []
    for k in range(count + 1):
        value = float(f"{low * 10 ** (k / per_decade):.2g}")
        if not values or value != values[-1]:
            values.append(value)
    return values


def _first_argument(knob: Callable[..., Any]) -> str:
    target = knob.__init__ if inspect.isclass(knob) else knob
    for name, parameter in inspect.signature(target).parameters.items():
        if name != "self" and parameter.kind in (
            parameter.POSITIONAL_OR_KEYWORD,
            parameter.POSITIONAL_ONLY,
        ):
            return name
    raise TypeError(
        f"kerasreg.grid: invalid `knob`: {knob!r} takes no positional argument "
        "for the values; name the argument as a keyword."
    )


def _is_axis(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.size > 0 and value.dtype.kind in "fiu"
    if isinstance(value, (list, tuple, range)):
        return len(value) > 0 and all(as_real_scalar(v) is not None for v in value)
    return False


def _axis(value: Any, name: str) -> list[float]:
    if not _is_axis(value):
        raise TypeError(
            f"kerasreg.grid: invalid `{name}`: expected a non-empty list of "
            f"numbers. Received: {name}={value!r}."
        )
    # Python ints stay ints; NumPy scalars become Python floats (short reprs).
    return [v if isinstance(v, int) else float(as_real_scalar(v)) for v in value]  # type: ignore[arg-type]
