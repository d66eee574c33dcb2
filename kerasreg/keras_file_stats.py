"""What the CLI computes from a saved model's weights, read in blocks.

`measure` (for `kerasreg inspect`): norms, sparsity and the penalty of one
weight, the penalty computed from its serialized config by the formulas in
`FORMULAS` (no regularizer is deserialized); `scaled_weights_copy` (for
`kerasreg shrink`): a copy of the weights file with selected datasets scaled.
Reads through `kerasreg.keras_file` (its `blocks`, `read_block` and
`CHUNK_BYTES`). Imports neither Keras nor TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from kerasreg import keras_file
from kerasreg.keras_file import KerasFile, read_encoded, write_block
from kerasreg.keras_file_names import (
    MAX_DEPTH,
    KerasFileError,
    Weight,
    check_storage,
    dataset_dtype,
    first_line,
)

ZERO_THRESHOLD = 1e-8


# --- statistics and penalties ---------------------------------------------------------


@dataclass
class _Sums:
    l1: float = 0.0
    maximum: float = 0.0
    scaled: float = 0.0  # sum((w / maximum)**2): l2 without overflow
    zeros: int = 0
    size: int = 0
    exp_abs: float = 0.0
    to_reference: float = 0.0  # sum((w - ref)**2), an L2SPPenalty's sum

    def add(self, a: np.ndarray, *, exp_abs: bool = False) -> None:
        if a.size == 0:
            return
        self.size += a.size
        self.l1 += float(np.sum(a, dtype=np.float64))
        self.zeros += int(np.count_nonzero(a < ZERO_THRESHOLD))
        if exp_abs:
            self.exp_abs += _exp_abs_sum(a)
        m = float(np.max(a))
        if math.isnan(m) or math.isnan(self.maximum):
            self.maximum = math.nan
            return
        if m == 0.0:
            return
        if math.isinf(m):
            self.maximum = math.inf
            return
        s = float(np.sum(np.square(a / np.asarray(m, a.dtype)), dtype=np.float64))
        if m > self.maximum:
            self.scaled = self.scaled * (self.maximum / m) ** 2 + s
            self.maximum = m
        else:
            self.scaled += s * (m / self.maximum) ** 2

    @property
    def l2(self) -> float:
        if not math.isfinite(self.maximum):
            return self.maximum
        return self.maximum * math.sqrt(self.scaled)

    @property
    def sum_squares(self) -> float:
        if not math.isfinite(self.maximum):
            return self.maximum
        return self.maximum**2 * self.scaled

    def stats(self) -> dict[str, float]:
        return {
            "l1": self.l1,
            "l2": self.l2,
            "linf": self.maximum if self.size else 0.0,
            "zero_fraction": self.zeros / self.size if self.size else 0.0,
        }


# `ExpAbsPenalty`: exact below this |w|, then its quadratic continuation.
EXP_ABS_EXACT_LIMIT = 20.0


def _exp_abs_sum(a: np.ndarray) -> float:
    c = EXP_ABS_EXACT_LIMIT
    total = float(np.sum(np.expm1(np.minimum(a, c)), dtype=np.float64))
    beyond = a[a > c].astype(np.float64)
    if beyond.size:
        d = beyond - c
        total += float(np.sum(math.exp(c) * (d + 0.5 * d * d)))
    return total


@dataclass(frozen=True)
class Formula:
    """A penalty as a sum of `factor * term`; terms: `l1`, `sum_squares`,
    `exp_abs`, `to_reference` (`sum((w - ref)**2)`)."""

    label: str
    terms: tuple[tuple[str, float], ...]

    def value(self, sums: _Sums) -> float:
        totals = {"l1": sums.l1, "sum_squares": sums.sum_squares,
                  "exp_abs": sums.exp_abs, "to_reference": sums.to_reference}  # fmt: skip
        return float(sum(factor * totals[term] for term, factor in self.terms))

    def uses(self, term: str) -> bool:
        return any(t == term for t, _ in self.terms)


@dataclass(frozen=True)
class Unknown:
    """A regularizer this module does not compute (it is never executed)."""

    label: str


def _factor(config: dict, name: str, default: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(name)
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(name)
    return value


# Penalties computed from their config, keyed by Keras's registered name (or
# `keras.regularizers>Name` for built-ins). Extension point: a penalty whose
# value needs more than these sums adds an entry here and a term to `_Sums`.
# An L2SPPenalty's reference is read from the weights file beside the weight;
# a penalty saved before its first use has none, and the loaded model takes
# the loaded weight as reference: its value is 0.
FORMULAS: dict[str, Callable[[dict], tuple[tuple[str, float], ...]]] = {
    "kerasreg>L1Penalty": lambda c: (("l1", _factor(c, "l1", 0.01)),),
    "kerasreg>L2Penalty": lambda c: (("sum_squares", _factor(c, "l2", 0.01)),),
    "kerasreg>ElasticNetPenalty": lambda c: (
        ("l1", _factor(c, "l1", 0.01)),
        ("sum_squares", _factor(c, "l2", 0.01)),
    ),
    "kerasreg>ExpAbsPenalty": lambda c: (("exp_abs", _factor(c, "factor", 0.01)),),
    "kerasreg>L2SPPenalty": lambda c: (("to_reference", _factor(c, "alpha", 0.01)),),
    "keras.regularizers>L1": lambda c: (("l1", _factor(c, "l1", 0.01)),),
    "keras.regularizers>L2": lambda c: (("sum_squares", _factor(c, "l2", 0.01)),),
    "keras.regularizers>L1L2": lambda c: (
        ("l1", _factor(c, "l1", 0.0)),
        ("sum_squares", _factor(c, "l2", 0.0)),
    ),
}


def penalty_formula(regularizer: Any) -> Formula | Unknown | None:
    """How to compute a serialized regularizer, `Unknown`, or None (none set)."""
    if regularizer is None:
        return None
    if not isinstance(regularizer, dict):
        return Unknown(_label(regularizer))
    cls = regularizer.get("class_name")
    registered = regularizer.get("registered_name")
    module = regularizer.get("module")
    if isinstance(registered, str) and registered.startswith("kerasreg>"):
        key = registered
    elif registered is None and module == "keras.regularizers":
        key = f"keras.regularizers>{cls}"
    else:
        key = None
    label = str(registered or cls)
    config = regularizer.get("config")
    if key not in FORMULAS or not isinstance(config, dict):
        return Unknown(label)
    try:
        return Formula(label, FORMULAS[key](config))
    except ValueError:
        return Unknown(f"{label} (invalid config)")


def _label(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def measure(
    file: KerasFile, weight: Weight, *, per_gate: bool = False
) -> dict[str, Any]:
    """Norms, sparsity and penalty of one weight, read in blocks.

    Returns `{"l1", "l2", "linf", "zero_fraction", "penalty", "trainable"}`
    (penalty `0.0` without a regularizer, `None` when it is unknown;
    `trainable` as `kerasreg.weight_norms` reports it, `None` when the file
    cannot tell), plus `<stat>/gate_<g>` entries for gated recurrent weights
    when `per_gate`. A weight the file does not hold (a LoRA adapter) has
    `None` statistics.
    """
    formula = penalty_formula(weight.regularizer)
    if not weight.known or weight.reference_problem:
        formula = Unknown(str(getattr(formula, "label", "unknown")))
    if weight.dataset is None:
        row: dict[str, Any] = dict.fromkeys(("l1", "l2", "linf", "zero_fraction"))
        row["penalty"] = 0.0 if formula is None else None
        row["trainable"] = weight.trainable
        return row
    dataset = file.h5[weight.dataset]
    uses = formula.uses if isinstance(formula, Formula) else (lambda term: False)
    reference = file.h5[weight.reference] if weight.reference else None
    ref_dtype = dataset_dtype(reference, file.path) if reference is not None else ""
    whole = _Sums()
    gates = weight.gates if per_gate else ()
    gate_sums = [_Sums() for _ in gates]
    width = weight.shape[-1] // len(gates) if gates else 0
    try:
        for index in keras_file.blocks(weight.shape, dataset.dtype.itemsize):
            values = keras_file.read_block(dataset, weight.dtype, index)
            a = np.abs(values)
            whole.add(a, exp_abs=uses("exp_abs"))
            if reference is not None and uses("to_reference"):
                ref = keras_file.read_block(reference, ref_dtype, index)
                diff = values.astype(np.float64) - ref.astype(np.float64)
                whole.to_reference += float(np.sum(np.square(diff)))
            if gates:
                first = _last_axis_start(index, weight.shape)
                for g, sums in enumerate(gate_sums):
                    lo = max(0, g * width - first)
                    hi = min(a.shape[-1], (g + 1) * width - first)
                    if hi > lo:
                        sums.add(a[..., lo:hi])
    except OSError as error:
        raise KerasFileError(
            f"{file.path!r}: cannot read weight {weight.path}: {first_line(error)}"
        ) from None
    row = dict(whole.stats())
    if formula is None:
        row["penalty"] = 0.0
    elif isinstance(formula, Unknown):
        row["penalty"] = None
    else:
        row["penalty"] = formula.value(whole)
    row["trainable"] = weight.trainable
    for gate, sums in zip(gates, gate_sums, strict=True):
        for stat, value in sums.stats().items():
            row[f"{stat}/gate_{gate}"] = value
    return row


def _last_axis_start(index: tuple, shape: tuple[int, ...]) -> int:
    """First last-axis column a block covers (0 unless the block splits it)."""
    if len(index) == len(shape) and isinstance(index[-1], slice):
        return index[-1].start or 0
    return 0


# --- rewriting the weights ------------------------------------------------------------


def scaled_weights_copy(
    file: KerasFile, selected: set[str], factor: float, target: Any
) -> dict[str, tuple[float, float]]:
    """Write to `target` (path or file object) a copy of the weights file in
    which the datasets named in `selected` are multiplied by `factor`.

    Groups, attributes and every other dataset are copied as they are, block
    by block. Returns `{dataset: (l2 before, l2 after)}` of the scaled ones.
    """
    norms: dict[str, tuple[float, float]] = {}
    with h5py.File(target, "w") as out:
        _copy_attrs(file.h5, out)
        _copy_group(file, file.h5, out, selected, factor, norms, 0)
    return norms


def _copy_attrs(source: Any, target: Any) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value


def _copy_group(
    file: KerasFile,
    source: h5py.Group,
    target: h5py.Group,
    selected: set[str],
    factor: float,
    norms: dict[str, tuple[float, float]],
    depth: int,
) -> None:
    if depth > MAX_DEPTH:
        raise KerasFileError(f"{file.path!r}: HDF5 groups nested too deep.")
    for key in source:
        item = source.get(key)
        if isinstance(item, h5py.Group):
            group = target.create_group(key)
            _copy_attrs(item, group)
            _copy_group(file, item, group, selected, factor, norms, depth + 1)
        elif isinstance(item, h5py.Dataset):
            _copy_dataset(file, item, target, key, item.name in selected, factor, norms)
        else:
            raise KerasFileError(f"{file.path!r}: unsupported HDF5 object {key!r}.")


def _copy_dataset(
    file: KerasFile,
    source: h5py.Dataset,
    target: h5py.Group,
    key: str,
    scale: bool,
    factor: float,
    norms: dict[str, tuple[float, float]],
) -> None:
    check_storage(source, file.path)
    dataset = target.create_dataset(key, shape=source.shape, dtype=source.dtype)
    _copy_attrs(source, dataset)
    dtype = dataset_dtype(source, file.path) if scale else ""
    if scale and dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise KerasFileError(
            f"{file.path!r}: cannot scale {source.name}: it holds {dtype} data."
        )
    before, after = _Sums(), _Sums()
    for index in keras_file.blocks(tuple(source.shape), source.dtype.itemsize):
        if scale:
            values = keras_file.read_block(source, dtype, index)
            before.add(np.abs(values))
            encoded = write_block(values * np.asarray(factor, values.dtype), dtype)
            after.add(np.abs(read_encoded(encoded, dtype)))
            dataset[index] = encoded
        else:
            dataset[index] = source[index]
    if scale:
        norms[source.name] = (before.l2, after.l2)
