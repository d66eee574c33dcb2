"""Per-weight statistics: norms, sparsity and penalties, in one on-device pass.

`weight_norms(model)` measures every selected weight (the `where=` rule of
`kerasreg.selection`) with one compiled computation that returns one small
float32 vector, copied to the host once. On a GPU this costs one kernel launch
sequence and one transfer, however many weights the model has.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kerasreg.penalties import accumulation_dtype, validate_factor
from kerasreg.selection import Where, select_weights, walk_layers

# |w| below this counts as zero: a float32 weight that small changes no output.
DEFAULT_ZERO_THRESHOLD = 1e-8

STATISTICS = ("l1", "l2", "linf", "zero_fraction")

# Gate column blocks of Keras's recurrent cells, in Keras's order (last axis).
GATES: dict[type, tuple[str, ...]] = {
    keras.layers.LSTMCell: ("i", "f", "c", "o"),
    keras.layers.GRUCell: ("z", "r", "h"),
}

_LOW_PRECISION = ("float16", "bfloat16")


def weight_norms(
    model: keras.layers.Layer,
    where: Where = None,
    *,
    per_gate: bool = False,
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
) -> dict[str, dict[str, float]]:
    """Norms, sparsity and penalty of each selected weight, in one device pass.

    For each weight `w` that `where` selects:

    - `l1`: `sum(|w|)`;
    - `l2`: `sqrt(sum(w**2))`, the Euclidean (Frobenius) norm, not squared;
    - `linf`: `max(|w|)`;
    - `zero_fraction`: the fraction of entries with `|w| < zero_threshold`;
    - `penalty`: the value of the regularizer attached to the variable
      (`variable.regularizer`, what `kernel_regularizer=` and friends set),
      exactly what Keras adds to the loss for it; `0.0` when it has none.

    With `per_gate=True`, the weights of `keras.layers.LSTMCell` (so `LSTM`
    and both directions of `Bidirectional(LSTM)`) and `keras.layers.GRUCell`
    whose last axis holds one column block per gate (kernel, recurrent kernel,
    bias; GRU's `reset_after` bias of shape `(2, 3 * units)` too) also get
    `l1/gate_g`, `l2/gate_g`, `linf/gate_g` and `zero_fraction/gate_g` for each
    gate `g` in Keras's column order: LSTM `i, f, c, o` (input, forget, cell,
    output), GRU `z, r, h` (update, reset, candidate).

    All statistics of all weights are computed by one compiled computation
    (a `tf.function` on TensorFlow, `jax.jit` on JAX, plain ops under
    `torch.no_grad()` on PyTorch) that returns one float32 vector, and only
    that vector is copied to the host. float16 and bfloat16 weights are
    accumulated in float32. The compiled computation is cached per model and
    rebuilt only when the selection, a regularizer, `per_gate` or
    `zero_threshold` changes.

    Args:
        model: a built `keras.Model` (or layer).
        where: which weights, as everywhere in kerasreg: `None` (trainable
            weights with `ndim >= 2`), a regular expression searched in
            `variable.path`, a callable `variable -> bool`, or an iterable of
            layers and/or variables. See `kerasreg.selection`.
        per_gate: bool, default `False`. Also split recurrent cells' weights
            by gate.
        zero_threshold: float, default `1e-8`. Finite and >= 0; entries with
            `|w|` strictly below it count as zeros (`0` counts none).

    Returns:
        `{variable.path: {statistic: float}}` in model order. Should two
        selected variables share a path, the later ones are keyed
        `path#2`, `path#3`, ...

    Raises:
        TypeError: `model`, `where` or `per_gate` has an unsupported type.
        ValueError: `where` is invalid or selects nothing, or `zero_threshold`
            is negative or not finite.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(2, kernel_regularizer=kerasreg.L2Penalty(0.1)),
    ... ])
    >>> stats = weight_norms(model)["sequential/dense/kernel"]
    >>> sorted(stats)
    ['l1', 'l2', 'linf', 'penalty', 'zero_fraction']
    >>> bool(abs(stats["penalty"] - 0.1 * stats["l2"] ** 2) < 1e-6)
    True
    """
    if not isinstance(per_gate, bool):
        raise TypeError(
            "weight_norms: invalid `per_gate`: expected True or False. "
            f"Received: per_gate={per_gate!r} (type {type(per_gate).__name__})."
        )
    zero_threshold = validate_factor(zero_threshold, "zero_threshold", "weight_norms")
    variables = select_weights(model, where)
    return _program_for(model, variables, per_gate, zero_threshold)()


class _NormProgram:
    """The compiled computation for one model, selection and settings."""

    def __init__(
        self,
        variables: list[Any],
        gates: dict[int, tuple[str, ...]],
        zero_threshold: float,
    ):
        self.variables = variables
        self.regularizers = [v.regularizer for v in variables]
        self.gates = [gates.get(id(v), ()) for v in variables]
        self.zero_threshold = zero_threshold
        self.layout: list[tuple[str, list[str]]] = []
        for key, gate_names in zip(_unique_keys(variables), self.gates, strict=True):
            names = [*STATISTICS, "penalty"]
            for gate in gate_names:
                names.extend(f"{stat}/gate_{gate}" for stat in STATISTICS)
            self.layout.append((key, names))
        self.compiled = _compile(self.compute)

    def compute(self, values: list[Any]) -> Any:
        parts = []
        for value, regularizer, gate_names in zip(
            values, self.regularizers, self.gates, strict=True
        ):
            x = accumulation_dtype(value)
            parts.extend(_statistics(x, self.zero_threshold))
            if regularizer is None:
                parts.append(ops.zeros((), "float32"))
            else:
                # Called on the variable's own dtype, as Keras does for the loss.
                parts.append(ops.cast(ops.sum(regularizer(value)), "float32"))
            if gate_names:
                for block in ops.split(x, len(gate_names), axis=-1):
                    parts.extend(_statistics(block, self.zero_threshold))
        return ops.stack([ops.cast(p, "float32") for p in parts])

    def __call__(self) -> dict[str, dict[str, float]]:
        vector = ops.convert_to_numpy(self.compiled([v.value for v in self.variables]))
        result: dict[str, dict[str, float]] = {}
        position = 0
        for key, names in self.layout:
            values = vector[position : position + len(names)]
            result[key] = {
                name: float(x) for name, x in zip(names, values, strict=True)
            }
            position += len(names)
        return result


def _statistics(x: Any, zero_threshold: float) -> list[Any]:
    """`l1`, `l2`, `linf`, `zero_fraction` of one tensor, as scalars."""
    if _size(x.shape) == 0:
        return [ops.zeros((), "float32")] * len(STATISTICS)
    a = ops.abs(x)
    linf = ops.max(a)
    # Scaling by max|w| keeps the sum of squares from overflowing float32.
    scale = ops.where(linf > 0, linf, ops.ones_like(linf))
    l2 = scale * ops.sqrt(ops.sum(ops.square(a / scale)))
    l2 = ops.where(ops.isinf(linf), linf, l2)
    zero_fraction = ops.mean(ops.cast(a < zero_threshold, "float32"))
    return [ops.sum(a), l2, linf, zero_fraction]


def _size(shape: tuple) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


def _unique_keys(variables: list[Any]) -> list[str]:
    counts: dict[str, int] = {}
    keys = []
    for variable in variables:
        counts[variable.path] = counts.get(variable.path, 0) + 1
        n = counts[variable.path]
        keys.append(variable.path if n == 1 else f"{variable.path}#{n}")
    return keys


def gate_layout(model: keras.layers.Layer) -> dict[int, tuple[str, ...]]:
    """Map `id(variable)` to its gate names, for every gated recurrent cell.

    A cell's kernel, recurrent kernel and bias qualify when their last axis is
    `len(gates) * cell.units` wide (one column block per gate).
    """
    layout: dict[int, tuple[str, ...]] = {}
    for layer, _ in walk_layers(model):
        names = next((g for cls, g in GATES.items() if isinstance(layer, cls)), None)
        if names is None:
            continue
        width = len(names) * int(layer.units)
        for variable in layer.weights:
            if len(variable.shape) >= 1 and int(variable.shape[-1]) == width:
                layout[id(variable)] = names
    return layout


def _compile(fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """Compile `fn(values) -> vector` for the active backend (the only backend code)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "torch":
        import torch

        return torch.no_grad()(fn)
    return fn


# model -> (cache key, program); weak so that a cached program never keeps a
# model alive. The program holds its variables, so their ids cannot be reused.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _program_for(
    model: keras.layers.Layer,
    variables: list[Any],
    per_gate: bool,
    zero_threshold: float,
) -> _NormProgram:
    key = (
        tuple(id(v) for v in variables),
        tuple(_regularizer_key(v.regularizer) for v in variables),
        tuple((tuple(v.shape), str(v.dtype)) for v in variables),
        per_gate,
        zero_threshold,
    )
    cached = _PROGRAMS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    gates = gate_layout(model) if per_gate else {}
    program = _NormProgram(variables, gates, zero_threshold)
    _PROGRAMS[model] = (key, program)
    return program


def _regularizer_key(regularizer: Any) -> tuple:
    """Identity plus config: a regularizer whose factors change is re-traced."""
    if regularizer is None:
        return (None,)
    try:
        config = repr(regularizer.get_config())
    except Exception:
        config = None
    return (id(regularizer), config)
