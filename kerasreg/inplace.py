"""In-place weight updates: one compiled update of a fixed list of variables.

`InPlaceUpdate(variables, transform)` runs `w <- transform(w, param, ref)` for
every variable at once, on the device where the weights live: a `tf.function`
on TensorFlow (works under `tf.distribute` strategies, in cross-replica
context), a `jax.jit` over the values on JAX, in-place `copy_` under
`no_grad` on PyTorch. `param` and the references are runtime arguments, so a
changing rate never re-traces. `update_model_weights` runs such an update on a
model whose live weights may sit in a JAX trainer's state during `fit`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import is_low_precision
from kerasreg.tf_functions import traced_once

# transform(value, param, ref) -> new value, in `keras.ops`; `ref` may be None.
Transform = Callable[[Any, Any, Any], Any]


def apply_transform(transform: Transform, value: Any, param: Any, ref: Any) -> Any:
    """`transform(value, param, ref)`, rounded once to `value`'s dtype.

    float16/bfloat16 values are transformed in float32: casting `1 - rate` to
    float16 first would round it to a multiple of 2**-11 and change the rate
    applied (3e-4 would act as ~6.8e-4, rates below ~2.4e-4 as 0).
    """
    dtype = keras.backend.standardize_dtype(value.dtype)
    work = "float32" if is_low_precision(dtype) else dtype
    x = ops.cast(value, work) if work != dtype else value
    r = None if ref is None else ops.cast(ref, work)
    return ops.cast(transform(x, cast_exact(param, work), r), dtype)


def cast_exact(x: Any, dtype: str) -> Any:
    """`ops.cast(x, dtype)`, but a Python number goes straight to `dtype`:
    TensorFlow's cast makes it a float32 constant first (0.16 -> 0.1599999964
    in float64)."""
    if isinstance(x, numbers.Real):
        return ops.convert_to_tensor(x, dtype)
    return ops.cast(x, dtype)


def param_dtype(variables: Sequence[Any]) -> str:
    """The dtype in which a transform's strength and parameter are computed:
    float64 when a selected weight holds float64 values, else float32.

    The value's dtype, not the declared one: JAX without `jax_enable_x64`
    keeps a float64 weight in float32. A float64 weight transformed with a
    float32 parameter would move by a float32-rounded amount (a relative
    error of ~3e-8 per step); `apply_transform` then rounds the parameter
    once to each weight's own working dtype.
    """
    for v in variables:
        value = v.value if isinstance(v, keras.Variable) else v
        if keras.backend.standardize_dtype(value.dtype) == "float64":
            return "float64"
    return "float32"


class InPlaceUpdate:
    """One compiled `w <- transform(w, param, ref)` for a fixed list of variables.

    Args:
        variables: the `keras.Variable`s to update.
        transform: `(value, param, ref) -> new value`, written with `keras.ops`.
        refs: optional list of reference tensors, one per variable (or None).
    """

    def __init__(
        self,
        variables: Sequence[Any],
        transform: Transform,
        refs: Sequence[Any] | None = None,
    ):
        self.variables = list(variables)
        self.refs = list(refs) if refs is not None else [None] * len(self.variables)
        self.key = self.key_of(self.variables, transform, refs)
        self._run = _BACKENDS[keras.backend.backend()](
            self.variables, transform, self.refs
        )

    @staticmethod
    def key_of(variables: Sequence[Any], transform: Transform, refs: Any) -> tuple:
        """What an update is built for: a different key needs a new update."""
        ref_ids = None if refs is None else tuple(id(r) for r in refs)
        return (tuple(id(v) for v in variables), transform, ref_ids)

    def __call__(self, param: Any) -> None:
        self._run(param)


def _tensorflow_update(variables, transform, refs):
    import tensorflow as tf

    with_refs = [r is not None for r in refs]

    def assign_all(param, refs):
        for v, ref in zip(variables, refs, strict=True):
            v.assign(apply_transform(transform, v, param, ref))

    # One trace per update: many updates (models, fits) are not "retracing".
    update = traced_once(assign_all, autograph=False)

    def run(param):
        if isinstance(param, numbers.Real):
            param = tf.constant(param, "float64")  # keep a float64 factor exact
        live = [r if has else None for r, has in zip(refs, with_refs, strict=True)]
        update(tf.cast(param, "float64"), live)

    return run


def _jax_update(variables, transform, refs):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def updated(values, param, refs):
        return [
            apply_transform(transform, v, param, r)
            for v, r in zip(values, refs, strict=True)
        ]

    def run(param):
        new = updated([v.value for v in variables], jnp.asarray(param), refs)
        for v, value in zip(variables, new, strict=True):
            v.assign(value)

    return run


def _torch_update(variables, transform, refs):
    import torch

    def run(param):
        if not isinstance(param, numbers.Real):
            param = ops.convert_to_tensor(param)
        with torch.no_grad():
            for v, ref in zip(variables, refs, strict=True):
                value = v.value
                value.copy_(apply_transform(transform, value, param, ref))

    return run


def _numpy_update(variables, transform, refs):
    def run(param):
        for v, ref in zip(variables, refs, strict=True):
            v.assign(apply_transform(transform, ops.convert_to_tensor(v), param, ref))

    return run


_BACKENDS = {
    "tensorflow": _tensorflow_update,
    "jax": _jax_update,
    "torch": _torch_update,
    "numpy": _numpy_update,
}


def update_model_weights(model: Any, update: InPlaceUpdate, param: Any) -> None:
    """Run `update(param)` on weights that may live in a JAX trainer's state."""
    synced = _compat.sync_jax_state(model)
    update(param)
    if synced:
        _compat.refresh_jax_state(model)
