"""Weight decay that shrinks weights: `w <- (1 - rate) * w`, outside the optimizer.

`WeightDecay` is a callback that shrinks the selected weights after every
training step (or epoch) of `fit`, whatever the optimizer; `shrink_weights`
does it once, outside `fit`. Both use one compiled, in-place update for all
selected weights on the device where they live (`ScaleInPlace`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kerasreg.selection import Where, check_where, select_weights

FREQUENCIES = ("batch", "epoch")
LOG_KEY = "weight_decay_rate"


class ScaleInPlace:
    """One compiled in-place update `w <- factor * w` for a fixed list of variables.

    Built once per variable list: on TensorFlow a `tf.function` over the
    variables (works under `tf.distribute` strategies), on JAX a `jax.jit` over
    their values, on PyTorch in-place `mul_` under `no_grad` (one fused
    `torch._foreach_mul_` on GPU). `factor` is a runtime argument, so a
    changing factor never re-traces.

    Args:
        variables: the `keras.Variable`s to scale.
    """

    def __init__(self, variables: Sequence[Any]):
        self.variables = list(variables)
        self.key = tuple(id(v) for v in self.variables)
        self._scale = _BACKENDS[keras.backend.backend()](self.variables)

    def __call__(self, factor: Any) -> None:
        self._scale(factor)


def _tensorflow_scale(variables: list[Any]) -> Callable[[Any], None]:
    import tensorflow as tf

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([], "float64")])
    def scale(factor):
        for v in variables:
            v.assign(ops.multiply(v, ops.cast(factor, v.dtype)))

    def run(factor):
        if isinstance(factor, numbers.Real):
            factor = tf.constant(factor, "float64")  # keep a float64 factor exact
        scale(tf.cast(factor, "float64"))

    return run


def _jax_scale(variables: list[Any]) -> Callable[[Any], None]:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def scaled(values, factor):
        return [ops.multiply(v, ops.cast(factor, v.dtype)) for v in values]

    def scale(factor):
        new_values = scaled([v.value for v in variables], jnp.asarray(factor))
        for v, value in zip(variables, new_values, strict=True):
            v.assign(value)

    return scale


def _torch_scale(variables: list[Any]) -> Callable[[Any], None]:
    import torch

    def scale(factor):
        if not isinstance(factor, numbers.Real):
            factor = ops.convert_to_tensor(factor)
        tensors = [v.value for v in variables]
        with torch.no_grad():
            if tensors[0].is_cuda:
                torch._foreach_mul_(tensors, factor)
            else:  # on CPU the foreach kernel measured 6x slower than a loop
                for tensor in tensors:
                    tensor.mul_(factor)

    return scale


def _numpy_scale(variables: list[Any]) -> Callable[[Any], None]:
    def scale(factor):
        for v in variables:
            v.assign(ops.convert_to_numpy(v) * np.asarray(factor, v.dtype))

    return scale


_BACKENDS = {
    "tensorflow": _tensorflow_scale,
    "jax": _jax_scale,
    "torch": _torch_scale,
    "numpy": _numpy_scale,
}


def _scale_model_weights(model: Any, update: ScaleInPlace, factor: Any) -> None:
    """Run `update(factor)` on weights that may live in a JAX trainer's state."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is None:
        update(factor)
        return
    # During JAX `fit` the live weights are in the trainer's state pytree: write
    # them back to the variables, which the trainer then reloads next step.
    sync()
    update(factor)
    # Refresh the trainer's copy too: after a short last execution it syncs that
    # copy again at epoch end, which would overwrite the decayed weights.
    state = getattr(model, "_jax_state", None)
    if state:
        for key in ("trainable_variables", "non_trainable_variables"):
            if state.get(key) is not None:
                state[key] = [v.value for v in getattr(model, key)]


def _l2_norms(variables: list[Any]) -> np.ndarray:
    """All L2 norms in one device vector, one transfer to the host."""
    norms = [ops.sqrt(ops.sum(ops.square(ops.cast(v, "float32")))) for v in variables]
    return ops.convert_to_numpy(ops.stack(norms))


def shrink_weights(
    model: keras.Model, factor: float, where: Where = None
) -> dict[str, dict[str, float]]:
    """Multiply the selected weights of `model` by `factor`, once, in place.

    `w <- factor * w` for every weight `where` selects (by default the
    trainable weights with `ndim >= 2`; see `kerasreg.selection`). Runs on the
    device where the weights live, as one compiled update. Arguments are
    validated first: a call that raises changes nothing.

    Args:
        model: a built `keras.Model` (or layer).
        factor: float in `[0, 1]`: 1 leaves the weights as they are, 0 zeroes
            them.
        where: which weights, as everywhere in kerasreg: `None`, a regular
            expression searched in `variable.path`, a callable
            `variable -> bool`, or an iterable of layers and/or variables.

    Returns:
        `{variable.path: {"before": float, "after": float}}`: the L2 norm
        (`sqrt(sum(w**2))`) of each selected weight before and after, in model
        order.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> norms = shrink_weights(model, 0.5)
    >>> [path.split("/")[-1] for path in norms]
    ['kernel']
    >>> row = next(iter(norms.values()))
    >>> bool(abs(row["after"] - 0.5 * row["before"]) < 1e-6)
    True
    """
    factor = _validate_unit_interval(factor, "factor", "shrink_weights", upper=True)
    where = check_where(where)
    variables = select_weights(model, where)
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()
    before = _l2_norms(variables)
    _scale_model_weights(model, ScaleInPlace(variables), factor)
    after = _l2_norms(variables)
    return {
        v.path: {"before": float(b), "after": float(a)}
        for v, b, a in zip(variables, before, after, strict=True)
    }


class WeightDecay(keras.callbacks.Callback):
    """Shrink the selected weights by `(1 - rate)` after every step or epoch.

    After each training step (`frequency="batch"`) or each epoch
    (`frequency="epoch"`), every selected weight becomes `w * (1 - rate_t)`,
    where `rate_t` is `rate`, or `schedule(t)` when a schedule is given, and is
    multiplied by the optimizer's current learning rate when `lr_scaled=True`
    (the AdamW convention). `t` is the index of the optimizer step just taken
    (counted across `fit` calls, from `optimizer.iterations`) for
    `frequency="batch"`, the epoch index for `frequency="epoch"`. With
    `steps_per_execution=k`, each call covers k steps and applies the product
    of their factors, `(1 - rate) ** k` for a constant rate: the same result
    as k single steps.

    This is decoupled weight decay (Loshchilov and Hutter, 2019): it acts on
    the weights directly, whatever the optimizer. Under plain SGD at learning
    rate `lr`, shrinking by `(1 - r)` per step matches `L2Penalty(r / (2 * lr))`
    to first order; under Adam it does not (an L2 penalty's gradient is
    rescaled by Adam, the decay is not).

    The update runs where the weights live, as one compiled in-place update of
    all selected weights, and works on TensorFlow (also under `tf.distribute`
    strategies), JAX and PyTorch. The rate applied is written to `logs` under
    `"weight_decay_rate"` (per batch, and at epoch end the last rate applied),
    so `History`, `CSVLogger` and `TensorBoard` record it: list `WeightDecay`
    before them in `callbacks`. With `frequency="epoch"` the callback defines
    no batch hook, so Keras keeps its asynchronous batch dispatch.

    Args:
        rate: float in `[0, 1)`, the fraction removed per step (or epoch).
            Ignored when `schedule` is given.
        frequency: `"batch"` (default) or `"epoch"`.
        where: which weights (see `kerasreg.selection`): `None` (default:
            trainable weights with `ndim >= 2`, so biases and normalization
            parameters are left alone), a regular expression searched in
            `variable.path`, a callable `variable -> bool`, or an iterable of
            layers and/or variables. A selection that is empty raises at the
            start of `fit`, before any weight changes.
        lr_scaled: bool, default False. Multiply the rate by the optimizer's
            current learning rate, read when the callback runs.
        schedule: optional callable `t -> rate` (Python number in `[0, 1)`,
            or a scalar tensor such as a `keras.optimizers.schedules`
            schedule's output), replacing `rate`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 3)), np.zeros((8, 1))
    >>> history = model.fit(x, y, epochs=2, verbose=0,
    ...                     callbacks=[WeightDecay(0.02)])
    >>> history.history["weight_decay_rate"]
    [0.02, 0.02]
    """

    def __init__(
        self,
        rate: float = 0.01,
        *,
        frequency: str = "batch",
        where: Where = None,
        lr_scaled: bool = False,
        schedule: Callable[[int], Any] | None = None,
    ):
        super().__init__()
        owner = type(self).__name__
        self.rate = _validate_unit_interval(rate, "rate", owner, upper=False)
        if frequency not in FREQUENCIES:
            raise ValueError(
                f"{owner}: invalid `frequency`: expected one of "
                f"{', '.join(map(repr, FREQUENCIES))}. Received: "
                f"frequency={frequency!r}."
            )
        if not isinstance(lr_scaled, (bool, np.bool_)):
            raise TypeError(
                f"{owner}: invalid `lr_scaled`: expected True or False. "
                f"Received: lr_scaled={lr_scaled!r} (type {type(lr_scaled).__name__})."
            )
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"{owner}: invalid `schedule`: expected None or a callable "
                f"`step -> rate`. Received: schedule={schedule!r} "
                f"(type {type(schedule).__name__})."
            )
        self.frequency = frequency
        self.where = check_where(where)
        self.lr_scaled = bool(lr_scaled)
        self.schedule = schedule
        self._update: ScaleInPlace | None = None
        self._step = 0
        self._last_end_step = -1
        self._last_rate: Any = None
        if frequency == "batch":
            # Bound per instance so per-epoch decay leaves Keras's default (no-op)
            # batch hook in place and keeps asynchronous batch dispatch.
            self.on_train_batch_end = self._decay_after_batch

    def on_train_begin(self, logs: dict | None = None) -> None:
        variables = select_weights(self.model, self.where)
        key = tuple(id(v) for v in variables)
        if self._update is None or self._update.key != key:
            self._update = ScaleInPlace(variables)
        if self.lr_scaled and getattr(self.model, "optimizer", None) is None:
            raise ValueError(
                f"{type(self).__name__}(lr_scaled=True) needs a compiled model "
                "with an optimizer."
            )
        self._step = self._optimizer_iterations() or 0
        self._last_rate = None

    def _optimizer_iterations(self) -> int | None:
        """Optimizer steps taken so far (one scalar read from the device)."""
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        return None if iterations is None else int(ops.convert_to_numpy(iterations))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._last_end_step = -1

    def _decay_after_batch(self, batch: int, logs: dict | None = None) -> None:
        steps = self._steps_since_last_call(batch)
        if steps <= 0:
            return
        first = self._step
        self._step += steps
        self._decay(range(first, first + steps), logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.frequency == "epoch":
            self._decay([epoch], None)
        else:
            # Some trainers skip the batch hook after a short last execution
            # (JAX, unknown epoch length): decay the steps it missed, once.
            done = self._optimizer_iterations()
            if done is not None and done > self._step:
                first, self._step = self._step, done
                self._decay(range(first, done), None)
        if logs is not None and self._last_rate is not None:
            logs[LOG_KEY] = float(ops.convert_to_numpy(self._last_rate))

    def _steps_since_last_call(self, batch: int) -> int:
        """Optimizer steps taken since the previous call, without a host sync."""
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        steps_per_epoch = (self.params or {}).get("steps")
        if per_call > 1 and not steps_per_epoch:
            # Unknown epoch length: the last call may have run fewer than k steps.
            return self._optimizer_iterations() - self._step
        if steps_per_epoch:
            batch = min(batch, steps_per_epoch - 1)
        steps = batch - self._last_end_step
        self._last_end_step = batch
        return steps

    def _decay(self, steps: Sequence[int], logs: dict | None) -> None:
        rates = [self._rate_at(t) for t in steps]
        if self.lr_scaled:
            lr = ops.convert_to_tensor(self.model.optimizer.learning_rate)
            lr = ops.cast(lr, "float32")
            scaled = [ops.multiply(r, lr) for r in rates]
            factor = ops.prod(ops.stack([1.0 - r for r in scaled]))
            rate = scaled[-1]
        elif all(isinstance(r, float) for r in rates):
            factor = math.prod(1.0 - r for r in rates)
            rate = rates[-1]
        else:
            factor = ops.prod(ops.stack([1.0 - ops.cast(r, "float32") for r in rates]))
            rate = rates[-1]
        _scale_model_weights(self.model, self._update, factor)
        self._last_rate = rate
        if logs is not None:
            logs[LOG_KEY] = rate

    def _rate_at(self, step: int) -> Any:
        if self.schedule is None:
            return self.rate
        rate = self.schedule(step)
        if isinstance(rate, numbers.Real) and not isinstance(rate, bool):
            return _validate_unit_interval(
                rate, f"schedule({step})", type(self).__name__, upper=False
            )
        return rate


def _validate_unit_interval(value: Any, name: str, owner: str, *, upper: bool) -> float:
    """`value` as a float in `[0, 1]` (`upper=True`) or `[0, 1)`, or raise."""
    accepted = f"a real number in [0, 1{']' if upper else ')'}"
    number = None
    if not isinstance(value, (bool, np.bool_, str, bytes)) and value is not None:
        if isinstance(value, numbers.Real):
            number = float(value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            array = np.asarray(value)
            if array.shape == () and array.dtype.kind in "fiu":
                number = float(array)
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
