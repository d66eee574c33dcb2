"""Per-weight statistics: norms, sparsity and penalties, in one on-device pass.

`weight_norms(model)` measures every selected weight (the `where=` rule of
`kerasreg.selection`) with one compiled computation that returns one small
vector per precision (float32; float64 for float64 weights), each copied to
the host once. On a GPU this costs one kernel launch sequence and one or two
transfers, however many weights the model has.

Longer than 400 lines on purpose: it is one computation. `_NormProgram` and
its reductions (`_zero_fractions`, `_sum_of_squares`, `_scaled_norm`, the
linear-penalty shortcut) are its only users and are tuned together for the
pass count described in `_NormProgram`; the program cache beside them keys
on exactly what the program bakes in.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kerasreg._checks import (
    accumulation_dtype,
    is_low_precision,
    validate_bool,
    validate_factor,
)
from kerasreg.gradient_stats import penalty_state
from kerasreg.selection import Where, select_weights, walk_layers, weight_paths
from kerasreg.tf_functions import traced_once

# |w| below this counts as zero: a float32 weight that small changes no output.
DEFAULT_ZERO_THRESHOLD = 1e-8

STATISTICS = ("l1", "l2", "linf", "zero_fraction")

# Gate column blocks of Keras's recurrent cells, in Keras's order (last axis).
GATES: dict[type, tuple[str, ...]] = {
    keras.layers.LSTMCell: ("i", "f", "c", "o"),
    keras.layers.GRUCell: ("z", "r", "h"),
}
# ConvLSTM1D/2D/3D: their cell (a class Keras does not export) has LSTM's
# i, f, c, o blocks of `filters` output channels.
CONV_LSTM = (keras.layers.ConvLSTM1D, keras.layers.ConvLSTM2D, keras.layers.ConvLSTM3D)

# Compiled programs kept per model: one per selection and settings in use.
CACHE_SIZE = 8


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
      `0.0` when it has none. For a trainable weight it is exactly what Keras
      adds to the loss for it;
    - `trainable`: `True` when Keras adds that penalty to the loss (the weight
      is in `model.trainable_weights`), `False` for a frozen weight (its layer
      or model has `trainable=False`, or a LoRA base kernel): its `penalty` is
      reported (what it would add once unfrozen) but is not in the loss, and
      `WeightNormLogger`'s `penalty/total` leaves it out.

    With `per_gate=True`, the weights of `keras.layers.LSTMCell` (so `LSTM`
    and both directions of `Bidirectional(LSTM)`), `keras.layers.GRUCell` and
    the cells of `ConvLSTM1D/2D/3D` whose last axis holds one column (channel)
    block per gate (kernel, recurrent kernel,
    bias; GRU's `reset_after` bias of shape `(2, 3 * units)` too) also get
    `l1/gate_g`, `l2/gate_g`, `linf/gate_g` and `zero_fraction/gate_g` for each
    gate `g` in Keras's column order: LSTM `i, f, c, o` (input, forget, cell,
    output; the same for ConvLSTM), GRU `z, r, h` (update, reset, candidate).

    Precision: statistics come back in the weight's own precision: float64
    weights are measured and reported in float64 (to float64 rounding, as
    numpy would give them), float32 ones in float32, and float16 and bfloat16
    ones are accumulated and reported in float32. The values are Python
    floats.

    All statistics of all weights are computed by one compiled computation
    (a `tf.function` on TensorFlow, `jax.jit` on JAX, plain ops under
    `torch.no_grad()` on PyTorch) that returns one vector per precision in use
    (float32, and float64 when some weight is float64), and only those small
    vectors are copied to the host.
    The compiled computation is cached per model and selection (the last
    `CACHE_SIZE = 8` combinations of selection, regularizers, `per_gate` and
    `zero_threshold`), so several selections used in turn are not re-traced.

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
        `{path: {statistic: value}}` in model order (floats, and the
        `trainable` bool), keyed by the weight's
        path as `kerasreg.selection.weight_paths` gives it: the same before
        and after a save/load round trip (for a model built in this process
        it is `variable.path` without a `Sequential`'s own name).

    Raises:
        TypeError: `model`, `where` or `per_gate` has an unsupported type.
        ValueError: `where` is invalid or selects nothing, or `zero_threshold`
            is negative or not finite.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(2, kernel_regularizer=kerasreg.L2Penalty(0.1)),
    ... ])
    >>> stats = weight_norms(model)["dense/kernel"]
    >>> sorted(stats)
    ['l1', 'l2', 'linf', 'penalty', 'trainable', 'zero_fraction']
    >>> bool(abs(stats["penalty"] - 0.1 * stats["l2"] ** 2) < 1e-6)
    True
    """
    per_gate = validate_bool(per_gate, "per_gate", "weight_norms")
    zero_threshold = validate_factor(zero_threshold, "zero_threshold", "weight_norms")
    variables = select_weights(model, where)
    return _program_for(model, variables, per_gate, zero_threshold)()


def statistic_names(
    model: keras.layers.Layer, variables: list[Any], *, per_gate: bool = False
) -> list[tuple[str, list[str]]]:
    """What `weight_norms(model, variables, per_gate=...)` returns, without the
    values: `[(key, [statistic names]), ...]` in the same order, from the
    same cached program (nothing is computed on the device).

    Args:
        model: a built `keras.Model` (or layer).
        variables: the weights, as a list (e.g. from `select_weights`).
        per_gate: bool, as for `weight_norms`.
    """
    per_gate = validate_bool(per_gate, "per_gate", "statistic_names")
    variables = select_weights(model, variables)
    program = _program_for(model, variables, per_gate, DEFAULT_ZERO_THRESHOLD)
    return [(key, [*positions, "trainable"]) for key, _, positions in program.layout]


class _NormProgram:
    """The compiled computation for one model, selection and settings.

    Weights are grouped by the precision of their statistics (`float64` for
    float64 weights, `float32` for the others) and the computation returns one
    vector per group. Every statistic is a reduction of `|w|` or `w**2`, so a
    gated weight is reshaped to `(-1, gates, units)` and reduced per gate; its
    whole-tensor statistics combine the per-gate ones (sums and maxima)
    without another pass. Each group's vector is statistic-major: all `l1`
    entries (per weight, the whole tensor then its gates), then all `l2`,
    `linf`, zero fractions, then one penalty per weight.

    Cost per weight on TensorFlow: `|w|` written once and read for its sum,
    its max and its row minima, and `w**2` summed in one fused kernel; zeros
    are counted only in the rows whose minimum is below the threshold
    (usually none or a few). On JAX, XLA fuses the reductions. One rare case
    takes a second pass, chosen for each group by one `cond` (a per-weight
    `cond` costs more than it saves): the exact `l2` of a weight whose sum of
    squares overflows or whose largest entry is below `1e-5` (its squares
    could underflow float32), recomputed scaled by `max|w|`.
    """

    def __init__(
        self,
        variables: list[Any],
        keys: list[str],
        gates: dict[int, tuple[str, ...]],
        zero_threshold: float,
        trainable: list[bool] | None = None,
    ):
        self.variables = variables
        self.trainable = trainable or [True] * len(variables)
        self.regularizers = [v.regularizer for v in variables]
        self.state = penalty_state(self.regularizers)
        self.gates = [gates.get(id(v), ()) for v in variables]
        self.zero_threshold = zero_threshold
        self.linear = [
            _linear_penalty(r, str(v.dtype))
            for r, v in zip(self.regularizers, variables, strict=True)
        ]
        # Groups of weights by result dtype, in order of first appearance.
        # The values' dtype: JAX without x64 holds float64 weights as float32.
        dtypes = [result_dtype(v.value.dtype) for v in variables]
        self.groups: list[tuple[str, list[int]]] = []
        for dtype in dict.fromkeys(dtypes):
            self.groups.append((dtype, [i for i, d in enumerate(dtypes) if d == dtype]))
        # Host-side layout: for each weight, its key, its group and, for each
        # output name, the position of that value in the group's vector.
        self.layout: list[Any] = [None] * len(variables)
        for group, (_, members) in enumerate(self.groups):
            entries = [1 + len(self.gates[i]) for i in members]  # tensor, gates
            n_entries = sum(entries)
            first = 0
            for index, i in enumerate(members):
                positions = {}
                for s, stat in enumerate(STATISTICS):
                    positions[stat] = s * n_entries + first
                positions["penalty"] = len(STATISTICS) * n_entries + index
                for s, stat in enumerate(STATISTICS):
                    for g, gate in enumerate(self.gates[i]):
                        positions[f"{stat}/gate_{gate}"] = s * n_entries + first + 1 + g
                self.layout[i] = (keys[i], group, positions)
                first += entries[index]
        self.compiled = _compile(self.compute)

    def _reductions(self, x: Any, gate_names: tuple[str, ...]):
        """`(a, axis, x)`: `|w|`, the reduction axes, `w` (gated: reshaped)."""
        if gate_names:
            n = len(gate_names)
            x = ops.reshape(x, (-1, n, int(x.shape[-1]) // n))
            return ops.abs(x), (0, 2), x
        return ops.abs(x), None, x

    def compute(self, values: list[Any], state: list[Any]) -> tuple[Any, ...]:
        """One vector per group, each in its group's dtype."""
        if not state:
            return self._compute(values)
        # The penalties read their state (an L2SPPenalty's reference) as an
        # input of the program, not as a constant baked in when traced.
        with keras.StatelessScope(
            state_mapping=list(zip(self.state, state, strict=True))
        ):
            return self._compute(values)

    def _compute(self, values: list[Any]) -> tuple[Any, ...]:
        return tuple(
            self._compute_group(dtype, members, [values[i] for i in members])
            for dtype, members in self.groups
        )

    def _compute_group(self, dtype: str, members: list[int], values: list) -> Any:
        # Per weight: sum|w|, max|w|, zero fraction, sum(w**2), each a vector
        # over (whole tensor, gates...); then one penalty.
        sums, maxima, zeros, squares, penalties = [], [], [], [], []
        for i, value in zip(members, values, strict=True):
            regularizer, gate_names = self.regularizers[i], self.gates[i]
            x = accumulation_dtype(value)
            if _size(x.shape) == 0:
                empty = ops.zeros((1 + len(gate_names),), dtype)
                sums.append(empty)
                maxima.append(empty)
                zeros.append(empty)
                squares.append(empty)
                penalties.append(ops.zeros((), dtype))
                continue
            a, axis, blocks = self._reductions(x, gate_names)
            l1 = ops.cast(ops.sum(a, axis=axis), dtype)
            linf = ops.cast(ops.max(a, axis=axis), dtype)
            fraction = _zero_fractions(a, axis, self.zero_threshold, dtype)
            ss = ops.cast(_sum_of_squares(blocks, axis), dtype)
            if gate_names:  # the whole tensor from its gates, then the gates
                l1 = ops.concatenate([_first(ops.sum(l1)), l1])
                linf = ops.concatenate([_first(ops.max(linf)), linf])
                ss = ops.concatenate([_first(ops.sum(ss)), ss])
            else:
                l1, linf, ss = (_first(t) for t in (l1, linf, ss))
            sums.append(l1)
            maxima.append(linf)
            zeros.append(fraction)
            squares.append(ss)
            if regularizer is None:
                penalties.append(ops.zeros((), dtype))
            elif self.linear[i] is not None:
                # Exactly the regularizer's formula, from the sums just taken.
                totals = {"l1": l1[0], "l2": ss[0]}
                penalty = ops.zeros((), dtype)
                for term, factor in self.linear[i] or ():
                    penalty = penalty + factor * totals[term]
                penalties.append(penalty)
            else:
                # Called on the variable's own dtype, as Keras does for the loss.
                penalties.append(ops.cast(ops.sum(regularizer(value)), dtype))
        l1 = ops.concatenate(sums)
        linf = ops.concatenate(maxima)
        zero_fraction = ops.concatenate(zeros)
        ss = ops.concatenate(squares)
        fast_l2 = ops.logical_and(
            ops.isfinite(ss),
            ops.logical_or(linf == 0, linf >= _SMALLEST_FAST_LINF),
        )
        l2 = ops.cond(
            ops.all(fast_l2),
            lambda: ops.sqrt(ss),
            lambda: self._scaled_l2(members, values, dtype),
        )
        return ops.concatenate([l1, l2, linf, zero_fraction, ops.stack(penalties)])

    def _scaled_l2(self, members: list[int], values: list[Any], dtype: str) -> Any:
        """`l2` of every entry, robust to overflow and float32 underflow."""
        parts = []
        for i, value in zip(members, values, strict=True):
            gate_names = self.gates[i]
            x = accumulation_dtype(value)
            n = 1 + len(gate_names)
            if _size(x.shape) == 0:
                parts.append(ops.zeros((n,), dtype))
                continue
            a, axis, _ = self._reductions(x, gate_names)
            if gate_names:
                # Whole tensor first (scaled by its own max), then each gate.
                whole = _scaled_norm(a, None, dtype)
                parts.append(
                    ops.concatenate([_first(whole), _scaled_norm(a, axis, dtype)])
                )
            else:
                parts.append(_first(_scaled_norm(a, None, dtype)))
        return ops.concatenate(parts)

    def __call__(self) -> dict[str, dict[str, float]]:
        vectors = self.compiled(
            [v.value for v in self.variables], [v.value for v in self.state]
        )
        vectors = [ops.convert_to_numpy(vector) for vector in vectors]
        result = {}
        for (key, group, positions), trainable in zip(
            self.layout, self.trainable, strict=True
        ):
            vector = vectors[group]
            result[key] = {name: float(vector[i]) for name, i in positions.items()}
            result[key]["trainable"] = trainable
        return result


def result_dtype(dtype: Any) -> str:
    """The dtype of a weight's statistics: float64 for float64 weights, else
    float32 (float16 and bfloat16 ones are accumulated in float32)."""
    return (
        "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"
    )


# Below this largest |w| a sum of squares may lose entries to float32
# underflow; such weights get the scaled computation.
_SMALLEST_FAST_LINF = 1e-5


def _zero_fractions(a: Any, axis: Any, threshold: float, dtype: str) -> Any:
    """Fraction of `a` below `threshold`: whole tensor, then each gate if gated.

    `a` is `|w|`, gated ones shaped `(-1, gates, units)` and reduced over
    `axis = (0, 2)`. On TensorFlow the count reads `a` once for its row
    minima and compares only the rows whose minimum is below `threshold`
    (a float32 compare-and-cast of every entry costs about three reads).
    """
    size = _size(a.shape)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if axis:  # (rows, gates, units)
            rows = a
        elif len(a.shape) >= 2:
            rows = tf.reshape(a, (-1, a.shape[-1]))
        else:
            rows = tf.reshape(a, (1, -1))
        row_axes = tuple(range(1, len(rows.shape)))
        low = tf.reduce_min(rows, axis=row_axes) < threshold
        picked = tf.gather(rows, tf.reshape(tf.where(low), (-1,)))
        below = tf.cast(picked < threshold, dtype)
        if axis:
            per_gate = tf.reduce_sum(below, axis=(0, 2))
            whole = tf.reduce_sum(per_gate)
            counts = tf.concat([tf.reshape(whole, (1,)), per_gate], 0)
            shares = [size] + [size // int(a.shape[1])] * int(a.shape[1])
            return counts / tf.constant(shares, dtype)
        return tf.reshape(tf.reduce_sum(below) / size, (1,))
    # Sums over sizes, not `ops.mean`: Keras's JAX and torch `mean` compute
    # float64 in float32 (0.2 -> 0.20000000298).
    below = ops.cast(a < threshold, dtype)
    whole = _first(ops.divide(ops.sum(below), ops.cast(size, dtype)))
    if axis:
        per_gate = ops.cast(size // int(a.shape[1]), dtype)
        return ops.concatenate([whole, ops.divide(ops.sum(below, axis=axis), per_gate)])
    return whole


def _first(scalar: Any) -> Any:
    """A scalar as a vector of length 1."""
    return ops.reshape(scalar, (1,))


def _scaled_norm(a: Any, axis: Any, dtype: str) -> Any:
    """`sqrt(sum(a**2))` over `axis`, scaled by `max(a)`: no overflow, no underflow."""
    # In the weight's own dtype (float32 or float64): `a / scale` needs one dtype.
    linf = ops.max(a, axis=axis, keepdims=True)
    scale = ops.where(linf > 0, linf, ops.ones_like(linf))
    norm = ops.sqrt(ops.sum(ops.square(a / scale), axis=axis, keepdims=True)) * scale
    norm = ops.cast(ops.where(ops.isinf(linf), linf, norm), dtype)
    return ops.reshape(norm, (-1,)) if axis is not None else ops.reshape(norm, ())


def _sum_of_squares(x: Any, axis: Any) -> Any:
    """`sum(x**2)` over `axis` (in `x`'s dtype, no scaling)."""
    if axis is None and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One fused kernel (`sum(x**2) / 2`); `ops.sum(ops.square(x))`
        # writes and reads back a temporary of the weight's size.
        return 2.0 * tf.nn.l2_loss(x)
    return ops.sum(ops.square(x), axis=axis)


def _linear_penalty(regularizer: Any, dtype: str) -> tuple | None:
    """`((term, factor), ...)` when `regularizer(w)` is a sum of such terms.

    Terms are `"l1"` (`sum|w|`) and `"l2"` (`sum(w**2)`), exactly as the
    regularizer adds them. Only for the exact classes (a subclass may override
    `__call__`): the kerasreg L1/L2/elastic-net penalties (which accumulate in
    float32, as here), and Keras's `L1`, `L2`, `L1L2` on weights that are not
    float16 or bfloat16 (Keras sums those in their own dtype).
    """
    from kerasreg.penalties import ElasticNetPenalty, L1Penalty, L2Penalty

    kind = type(regularizer)
    if kind is L1Penalty:
        return (("l1", regularizer.l1),)
    if kind is L2Penalty:
        return (("l2", regularizer.l2),)
    if kind is ElasticNetPenalty:
        return (("l1", regularizer.l1), ("l2", regularizer.l2))
    if is_low_precision(dtype):
        return None
    if kind is keras.regularizers.L1:
        return (("l1", float(regularizer.l1)),)
    if kind is keras.regularizers.L2:
        return (("l2", float(regularizer.l2)),)
    if kind is keras.regularizers.L1L2:
        # Keras adds only the terms with a nonzero factor.
        terms = (("l1", float(regularizer.l1)), ("l2", float(regularizer.l2)))
        return tuple((term, factor) for term, factor in terms if factor)
    return None


def _size(shape: tuple) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


def gate_layout(model: keras.layers.Layer) -> dict[int, tuple[str, ...]]:
    """Map `id(variable)` to its gate names, for every gated recurrent cell.

    A cell's kernel, recurrent kernel and bias qualify when their last axis is
    `len(gates) * cell.units` wide (`cell.filters` for ConvLSTM cells): one
    column (channel) block per gate.
    """
    layout: dict[int, tuple[str, ...]] = {}
    names: tuple[str, ...] | None
    for layer, _ in walk_layers(model):
        if isinstance(layer, CONV_LSTM):
            cell, names, units = layer.cell, ("i", "f", "c", "o"), layer.cell.filters
        else:
            names = next(
                (g for cls, g in GATES.items() if isinstance(layer, cls)), None
            )
            if names is None:
                continue
            cell, units = layer, layer.units
        width = len(names) * int(units)
        for variable in cell.weights:
            if len(variable.shape) >= 1 and int(variable.shape[-1]) == width:
                layout[id(variable)] = names
    return layout


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile `fn(values) -> vector` for the active backend.

    The other backend-specific code here is two TensorFlow fast paths inside
    the computation: `_sum_of_squares` and `_zero_fractions`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        # One trace per program: many programs are not "retracing".
        return traced_once(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "torch":
        import torch

        return torch.no_grad()(fn)
    return fn


# model -> OrderedDict(cache key -> program), least recently used first; weak
# so that a cached program never keeps a model alive. A program holds its
# variables, so their ids cannot be reused while it is cached. Several
# selections used in turn (two loggers, a logger and a user's own call) each
# keep their program: no re-tracing, no TensorFlow retracing warnings.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _program_for(
    model: keras.layers.Layer,
    variables: list[Any],
    per_gate: bool,
    zero_threshold: float,
) -> _NormProgram:
    for v in variables:
        # A reference penalty (L2SPPenalty) takes its weight's value when it
        # first sees the weight: give it the variable, not a traced value.
        if getattr(v.regularizer, "reference", False) is None:
            v.regularizer(v)
    trainable = _trainable_ids(model)
    key = (
        tuple(id(v) for v in variables),
        tuple(_regularizer_key(v.regularizer) for v in variables),
        tuple(id(s) for s in penalty_state([v.regularizer for v in variables])),
        tuple((tuple(v.shape), str(v.dtype), id(v) in trainable) for v in variables),
        per_gate,
        zero_threshold,
    )
    programs = _PROGRAMS.get(model)
    if programs is None:
        programs = _PROGRAMS[model] = OrderedDict()
    program = programs.get(key)
    if program is not None:
        programs.move_to_end(key)
        return program
    gates = gate_layout(model) if per_gate else {}
    paths = weight_paths(model)
    # A variable outside `model` (allowed in an explicit list) keeps its own path.
    keys = [paths.get(id(v), v.path) for v in variables]
    inside = {id(v) for v in model.weights}
    flags = [
        id(v) in trainable if id(v) in inside else bool(v.trainable) for v in variables
    ]
    program = _NormProgram(variables, keys, gates, zero_threshold, flags)
    programs[key] = program
    while len(programs) > CACHE_SIZE:
        programs.popitem(last=False)
    return program


def _trainable_ids(model: keras.layers.Layer) -> set[int]:
    """Ids of the weights whose penalty Keras adds to the loss (trainable ones)."""
    return {id(v) for v in model.trainable_weights}


def _regularizer_key(regularizer: Any) -> tuple:
    """Identity plus config: a regularizer whose factors change is re-traced."""
    if regularizer is None:
        return (None,)
    try:
        config = repr(regularizer.get_config())
    except Exception:
        config = None
    return (id(regularizer), config)
