"""Per-weight gradient statistics: the penalty gradient, the sums, the host reading.

Shared by `kerasreg.gradient_norms` (the data gradient from its own pass over
the data) and `WeightNormLogger(gradients=True)` (the data gradient is the
gradient the optimizer applied minus the penalty gradient, taken inside the
train step). On the device each weight contributes four sums (`SUMS`), and the
logger two more (`UPDATE_SUMS`); all of them go to the host as one float32
vector, which `read_statistics` turns into the documented statistics.

- `penalty_gradients`: the gradient of each weight's own regularizer at its
  value, by the backend's own automatic differentiation (`tf.GradientTape`,
  `jax.grad`, `torch.autograd`), the same differentiation Keras's train step
  applies to the penalty it adds to the loss.
- `gradient_sums`, `update_sums`: the sums, accumulated in float32 (float64
  for float64 weights).
- `read_statistics`: norms, `penalty_share`, `cosine`, `update_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from kerasreg._checks import accumulation_dtype

# Per weight, in this order: |data|^2, |penalty|^2, |total|^2, <data, penalty>.
SUMS = ("data_sq", "penalty_sq", "total_sq", "dot")
# Per weight, for the logger: |w_after - w_before|^2, |w_before|^2.
UPDATE_SUMS = ("update_sq", "weight_sq")
STATISTICS = ("data", "penalty", "total", "penalty_share", "cosine")


def prepare_regularizers(variables: Sequence[Any]) -> None:
    """Give reference penalties (`L2SPPenalty`) their reference before a trace.

    A reference penalty takes its weight's value when it first sees it; it
    must see the variable, not a traced value.
    """
    for v in variables:
        if getattr(v.regularizer, "reference", False) is None:
            v.regularizer(v)


def regularizer_key(regularizer: Any) -> tuple:
    """Identity plus config: a compiled step bakes a regularizer's factors in,
    so one whose factors change needs a new trace."""
    if regularizer is None:
        return (None,)
    try:
        config = repr(regularizer.get_config())
    except Exception:
        config = None
    return (id(regularizer), config)


def penalty_state(regularizers: Sequence[Any]) -> list[Any]:
    """The variables the penalties' values depend on (`penalty.variables`).

    An `L2SPPenalty`'s reference: a compiled program must take it as an input
    (JAX bakes any other variable in as a constant when it traces).
    """
    state: list[Any] = []
    for regularizer in regularizers:
        for variable in getattr(regularizer, "variables", None) or ():
            if isinstance(variable, keras.Variable) and all(
                variable is not v for v in state
            ):
                state.append(variable)
    return state


def penalty_gradients(regularizers: Sequence[Any], values: Sequence[Any]) -> list:
    """`d regularizer_i(w_i) / d w_i` for each weight value (zeros without one).

    Each weight's penalty depends on that weight only, so one differentiation
    of the sum of all penalties gives every weight its own penalty gradient.
    """
    values = [ops.convert_to_tensor(v) for v in values]
    active = [i for i, r in enumerate(regularizers) if r is not None]
    grads: list[Any] = [None] * len(values)
    if active:
        found = _DIFFERENTIATE[keras.backend.backend()](
            [regularizers[i] for i in active], [values[i] for i in active]
        )
        for i, g in zip(active, found, strict=True):
            grads[i] = g
    return [
        ops.zeros_like(v) if g is None else ops.cast(g, v.dtype)
        for g, v in zip(grads, values, strict=True)
    ]


def _total_penalty(regularizers: Sequence[Any], values: Sequence[Any]) -> Any:
    total = None
    for regularizer, value in zip(regularizers, values, strict=True):
        term = ops.cast(ops.sum(regularizer(value)), "float32")
        total = term if total is None else total + term
    return total


def _tensorflow_gradients(regularizers, values):
    import tensorflow as tf

    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for value in values:
            tape.watch(value)
        total = _total_penalty(regularizers, values)
    return tape.gradient(total, values)


def _jax_gradients(regularizers, values):
    import jax

    return jax.grad(lambda vs: _total_penalty(regularizers, vs))(list(values))


def _torch_gradients(regularizers, values):
    import torch

    with torch.enable_grad():
        leaves = [v.detach().requires_grad_(True) for v in values]
        total = _total_penalty(regularizers, leaves)
        if not total.requires_grad:  # no penalty depends on its weight
            return [None] * len(values)
        return list(torch.autograd.grad(total, leaves, allow_unused=True))


_DIFFERENTIATE = {
    "tensorflow": _tensorflow_gradients,
    "jax": _jax_gradients,
    "torch": _torch_gradients,
}


def gradient_sums(
    data: Sequence[Any], penalty: Sequence[Any], total: Sequence[Any] | None = None
) -> list:
    """`SUMS` of each weight, flat: `|d|^2, |p|^2, |t|^2, <d, p>` per weight.

    `total` defaults to `data + penalty`; the logger passes the gradient the
    optimizer applied.
    """
    sums = []
    totals = total if total is not None else [None] * len(data)
    for d, p, t in zip(data, penalty, totals, strict=True):
        d = accumulation_dtype(d)
        p = accumulation_dtype(p)
        t = d + p if t is None else accumulation_dtype(t)
        sums += [
            _sum(ops.square(d)),
            _sum(ops.square(p)),
            _sum(ops.square(t)),
            _sum(ops.multiply(d, p)),
        ]
    return sums


def update_sums(before: Sequence[Any], after: Sequence[Any]) -> list:
    """`UPDATE_SUMS` of each weight, flat: `|after - before|^2, |before|^2`."""
    sums = []
    for b, a in zip(before, after, strict=True):
        b = accumulation_dtype(b)
        a = accumulation_dtype(a)
        sums += [_sum(ops.square(a - b)), _sum(ops.square(b))]
    return sums


def _sum(x: Any) -> Any:
    return ops.cast(ops.sum(x), "float32")


def read_statistics(
    vector: Any, keys: Sequence[str], *, update: bool = False
) -> dict[str, dict[str, float]]:
    """`{key: statistics}` from the host copy of a sums vector.

    Per weight: `data`, `penalty`, `total` (L2 norms), `penalty_share`
    (`penalty / (data + penalty)`, 0 when both are 0), `cosine` (between the
    data and the penalty gradient, 0 when either is 0) and, with `update`,
    `update_ratio` (`|w_after - w_before| / |w_before|`; 0 for a weight that
    did not move, `inf` for one that moved from all zeros). A statistic read
    from a non-finite sum (a NaN or infinite gradient or weight) is NaN, never
    a made-up 0 or -1.
    """
    width = len(SUMS) + (len(UPDATE_SUMS) if update else 0)
    result = {}
    for i, key in enumerate(keys):
        row = [float(x) for x in vector[i * width : (i + 1) * width]]
        data_sq, penalty_sq, total_sq, dot = row[:4]
        data, penalty, total = (_norm(x) for x in (data_sq, penalty_sq, total_sq))
        finite = all(map(math.isfinite, (data_sq, penalty_sq, dot)))
        stats = {
            "data": data,
            "penalty": penalty,
            "total": total,
            "penalty_share": (
                math.nan
                if not finite
                else penalty / (data + penalty)
                if data + penalty > 0
                else 0.0
            ),
            "cosine": (
                math.nan
                if not finite
                else min(1.0, max(-1.0, dot / (data * penalty)))
                if data > 0 and penalty > 0
                else 0.0
            ),
        }
        if update:
            update_sq, weight_sq = row[4:6]
            if not (math.isfinite(update_sq) and math.isfinite(weight_sq)):
                ratio = math.nan
            elif weight_sq > 0:
                ratio = math.sqrt(max(update_sq, 0.0) / weight_sq)
            else:
                ratio = math.inf if update_sq > 0 else 0.0
            stats["update_ratio"] = ratio
        result[key] = stats
    return result


def _norm(square_sum: float) -> float:
    """The L2 norm from a sum of squares: NaN stays NaN (`max` would keep
    whichever operand comes first), rounding below 0 is 0."""
    return square_sum if math.isnan(square_sum) else math.sqrt(max(square_sum, 0.0))
