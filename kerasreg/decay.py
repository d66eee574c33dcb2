"""Weight decay that shrinks weights: `w <- (1 - rate) * w`, outside the optimizer.

`WeightDecay` is a callback that shrinks the selected weights after every
training step (or epoch) of `fit`, whatever the optimizer; `shrink_weights`
does it once, outside `fit`. Per-step decay is folded into the model's
compiled train step for the duration of `fit` (`_TrainStepFold`); per-epoch
decay, Python-callable schedules and `shrink_weights` use one compiled,
in-place update for all selected weights on the device where they live
(`ScaleInPlace`).
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kerasreg import _compat
from kerasreg.norms import weight_norms
from kerasreg.penalties import as_real_scalar, is_low_precision
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


def _times(value: Any, factor: Any) -> Any:
    """`value * factor`, rounded once to `value`'s dtype.

    float16/bfloat16 values are multiplied in float32: casting `factor` to
    float16 first would round `1 - rate` to a multiple of 2**-11 and change the
    rate applied (3e-4 would act as ~6.8e-4, rates below ~2.4e-4 as 0).
    """
    dtype = keras.backend.standardize_dtype(value.dtype)
    if is_low_precision(dtype):
        product = ops.multiply(ops.cast(value, "float32"), ops.cast(factor, "float32"))
        return ops.cast(product, dtype)
    return ops.multiply(value, ops.cast(factor, dtype))


def _tensorflow_scale(variables: list[Any]) -> Callable[[Any], None]:
    import tensorflow as tf

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([], "float64")])
    def scale(factor):
        for v in variables:
            v.assign(_times(v, factor))

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
        return [_times(v, factor) for v in values]

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
            expression searched in the weight's path (`weight_paths`), a callable
            `variable -> bool`, or an iterable of layers and/or variables.

    Returns:
        `{variable.path: {"before": float, "after": float}}`: the L2 norm
        (`sqrt(sum(w**2))`, the `l2` of `kerasreg.weight_norms`, keyed the same
        way) of each selected weight before and after, in model order.

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
    before = weight_norms(model, variables)
    _scale_model_weights(model, ScaleInPlace(variables), factor)
    after = weight_norms(model, variables)
    return {
        path: {"before": before[path]["l2"], "after": after[path]["l2"]}
        for path in before
    }


class WeightDecay(keras.callbacks.Callback):
    """Shrink the selected weights by `(1 - rate)` after every step or epoch.

    After each training step (`frequency="batch"`) or each epoch
    (`frequency="epoch"`), every selected weight becomes `w * (1 - rate_t)`,
    where `rate_t` is `rate`, or `schedule(t)` when a schedule is given, and is
    multiplied by the optimizer's learning rate when `lr_scaled=True` (the
    AdamW convention). `t` is the index of the optimizer step just taken
    (counted across `fit` calls, from `optimizer.iterations`) for
    `frequency="batch"`, the epoch index for `frequency="epoch"`. With
    `steps_per_execution=k`, each of the k steps is followed by its decay, so
    a constant rate gives `(1 - rate) ** k` per execution: the same result as k
    single steps.

    This is decoupled weight decay (Loshchilov and Hutter, 2019): it acts on
    the weights directly, whatever the optimizer. Under plain SGD at learning
    rate `lr`, shrinking by `(1 - r)` per step matches `L2Penalty(r / (2 * lr))`
    to first order; under Adam it does not (an L2 penalty's gradient is
    rescaled by Adam, the decay is not).

    How it runs: with `frequency="batch"` and no schedule or a
    `keras.optimizers.schedules.LearningRateSchedule`, the decay is folded
    into the model's train step. At `on_train_begin` the callback sets the
    model's `train_step` to "the original step (including a subclass's own
    `train_step`), then `w <- w * (1 - rate_t)` for every selected weight",
    and Keras compiles that as one function; `on_train_end` puts the original
    back. So the decay costs one extra multiply per weight inside the compiled
    step, and the callback defines no batch hook: Keras keeps its asynchronous
    batch dispatch. `rate_t` is computed inside the step, before the
    optimizer update: `schedule(optimizer.iterations)`, times the learning
    rate the optimizer uses for that same step (exact also with a learning
    rate schedule). The compiled step is cached: a further `fit` with the same
    callback and model does not re-trace; a new `compile`, or a changed
    `rate` or selection, builds a new one. If `fit` raises, Keras skips
    `on_train_end`: the model's next `fit` or `train_on_batch` then restores
    the original step first, so no later training decays by accident.
    With `frequency="epoch"`, or a `schedule` that is any other Python
    callable (called eagerly with a Python int `t`), the callback does the
    update itself, as one compiled in-place update of all selected weights;
    only the latter needs a batch hook, and with `steps_per_execution=k` it
    applies the product of the k steps' factors after the k steps.

    Everything runs where the weights live (no copy to the host) and works on
    TensorFlow (also under `tf.distribute` strategies, where each mirrored
    copy is scaled once), JAX and PyTorch. The rate applied is written to
    `logs` under `"weight_decay_rate"` (per batch, and at epoch end the last
    rate applied), so `History`, `CSVLogger` and `TensorBoard` record it.
    Folded, the train step itself returns it, so Keras reports the epoch's
    logs from the last step rather than from `model.metrics`: the same values
    for the built-in metrics.

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
            learning rate: the one used for the step just taken (folded), or
            the current one when the callback runs (per epoch, Python
            callable schedules).
        schedule: optional `keras.optimizers.schedules.LearningRateSchedule`
            (evaluated inside the train step on `optimizer.iterations`) or
            Python callable `t -> rate` (Python number in `[0, 1)` or a scalar
            tensor), replacing `rate`. `rate`, `where`, `lr_scaled` and
            `schedule` are read at the start of each `fit`.

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
        self._variables: list[Any] = []
        self._fold_cache: dict[tuple, tuple[Any, Any]] = {}
        self._step = 0
        self._last_end_step = -1
        self._last_rate: Any = None
        self.folded = frequency == "batch" and _can_fold(schedule)
        if frequency == "batch" and not self.folded:
            # Bound per instance so decay that needs no batch hook (folded into
            # the train step, or per epoch) keeps Keras's asynchronous dispatch.
            self.on_train_batch_end = self._decay_after_batch

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        variables = select_weights(model, self.where)
        if self.lr_scaled and getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"{type(self).__name__}(lr_scaled=True) needs a compiled model "
                "with an optimizer."
            )
        self._variables = variables
        self._last_rate = None
        if self.folded:
            _TrainStepFold.add(model, self)
            return
        key = tuple(id(v) for v in variables)
        if self._update is None or self._update.key != key:
            self._update = ScaleInPlace(variables)
        self._step = self._optimizer_iterations() or 0

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.folded:
            _TrainStepFold.remove(self._model)

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
        if self.folded:
            # The step logged the rate already; a constant rate is exact as given.
            if logs is not None and self.schedule is None and not self.lr_scaled:
                logs[LOG_KEY] = self.rate
            return
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

    def _fold_config(self) -> tuple:
        """What a folded train step bakes in: a change means a new trace."""
        return (
            tuple(id(v) for v in self._variables),
            self.rate,
            self.lr_scaled,
            self.schedule,
        )

    def _fold_into(self, step: Callable[..., Any], model: keras.Model) -> Callable:
        """`step` followed by this decay, for the active backend's trainer."""
        return _FOLDS[keras.backend.backend()](
            step, model, list(self._variables), self._rate_in_step
        )

    def _rate_in_step(self, optimizer: Any) -> Any:
        """The rate of the step about to run (read before the optimizer moves)."""
        if self.schedule is None:
            rate = self.rate
        else:
            rate = ops.cast(self.schedule(optimizer.iterations), "float32")
        if self.lr_scaled:
            learning_rate = ops.cast(optimizer.learning_rate, "float32")
            rate = ops.multiply(ops.cast(rate, "float32"), learning_rate)
        return rate

    def _rate_at(self, step: int) -> Any:
        if self.schedule is None:
            return self.rate
        rate = self.schedule(step)
        if isinstance(rate, numbers.Real) and not isinstance(rate, bool):
            return _validate_unit_interval(
                rate, f"schedule({step})", type(self).__name__, upper=False
            )
        return rate


def _can_fold(schedule: Any) -> bool:
    """Whether per-step decay can run inside the model's compiled train step."""
    if schedule is not None and not isinstance(
        schedule, keras.optimizers.schedules.LearningRateSchedule
    ):
        return False  # arbitrary callables are called eagerly, with Python ints
    backend = keras.backend.backend()
    if backend == "jax":
        # Flax NNX trainers call the class's `train_step`, not the instance's.
        return not _compat.nnx_enabled()
    return backend in ("tensorflow", "torch")


_MISSING = object()


class _TrainStepFold:
    """The `WeightDecay`s folded into one model's `train_step` during one `fit`.

    While active it shadows three model attributes: `train_step` (the original
    step followed by each decay), `train_function` (Keras's compiled function
    over that step, cached per decay so a second `fit` does not re-trace) and
    `make_train_function` (this object). Keras calls `make_train_function` at
    the start of every `fit` and `train_on_batch`, before `on_train_begin`, so
    a `fit` that raised (Keras then skips `on_train_end`) is undone by the
    model's next training call: no later training can run a stale decay.
    """

    NAMES = ("train_step", "make_train_function")

    def __init__(self, model: keras.Model):
        self._model = weakref.ref(model)
        self.decays: list[WeightDecay] = []
        self.saved = {name: vars(model).get(name, _MISSING) for name in self.NAMES}
        self.step = model.train_step
        self.train_function = model.train_function

    @staticmethod
    def active(model: keras.Model) -> _TrainStepFold | None:
        fold = vars(model).get("make_train_function")
        return fold if isinstance(fold, _TrainStepFold) else None

    @classmethod
    def add(cls, model: keras.Model, decay: WeightDecay) -> None:
        fold = cls.active(model)
        if fold is not None and decay in fold.decays:
            fold.restore()  # left by a call that raised before `on_train_end`
            fold = None
        if fold is None:
            fold = cls(model)
        fold.decays.append(decay)
        fold.install()

    @classmethod
    def remove(cls, model: keras.Model) -> None:
        fold = cls.active(model)
        if fold is not None:
            fold.restore()

    def install(self) -> None:
        model = self._model()
        owner = self.decays[-1]
        key = (
            self.train_function,
            tuple((decay, decay._fold_config()) for decay in self.decays),
        )
        if key not in owner._fold_cache:
            step = self.step
            for decay in self.decays:
                step = decay._fold_into(step, model)
            model.train_step = step
            self._original_make()(force=True)
            # Entries built over an older `train_function` (before a `compile`)
            # can never be used again.
            for stale in [k for k in owner._fold_cache if k[0] is not key[0]]:
                del owner._fold_cache[stale]
            owner._fold_cache[key] = (step, model.train_function)
        model.train_step, model.train_function = owner._fold_cache[key]
        model.make_train_function = self

    def restore(self) -> None:
        model = self._model()
        for name, value in self.saved.items():
            if value is not _MISSING:
                setattr(model, name, value)
            elif name in vars(model):
                delattr(model, name)
        model.train_function = self.train_function

    def _original_make(self) -> Callable[..., Any]:
        model = self._model()
        make = self.saved["make_train_function"]
        return (
            type(model).make_train_function.__get__(model) if make is _MISSING else make
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Stand-in for `model.make_train_function`: unfold, then build as usual."""
        model = self._model()
        self.restore()
        return model.make_train_function(*args, **kwargs)


def _logs_with_rate(logs: Any, rate: Any) -> Any:
    if not isinstance(logs, dict):
        return logs
    return {**logs, LOG_KEY: ops.convert_to_tensor(rate, "float32")}


def _factor(rate: Any) -> Any:
    """`1 - rate`: exact in float64 for a Python rate, else in float32."""
    if isinstance(rate, float):
        return 1.0 - rate
    return ops.subtract(1.0, ops.cast(rate, "float32"))


def _fold_tensorflow(step, model, variables, rate_in_step):
    import tensorflow as tf

    optimizer = model.optimizer
    tf_variables = [v.value for v in variables]

    def scale_one(variable, factor):
        return variable.assign(_times(variable, factor))

    def scale(distribution, factor):
        # Cross-replica update: each mirrored copy is scaled exactly once.
        for variable in tf_variables:
            distribution.extended.update(
                variable, scale_one, args=(factor,), group=False
            )

    def train_step(data):
        rate = rate_in_step(optimizer)  # read before the optimizer moves
        logs = step(data)
        factor = _factor(rate)
        if isinstance(factor, float):
            factor = tf.constant(factor, "float64")
        tf.__internal__.distribute.interim.maybe_merge_call(
            scale, tf.distribute.get_strategy(), factor
        )
        return _logs_with_rate(logs, rate)

    return train_step


def _fold_jax(step, model, variables, rate_in_step):
    optimizer = model.optimizer
    selected = {id(v) for v in variables}
    # The JAX trainer's state holds values in these two lists' orders.
    trainable = [
        i for i, v in enumerate(model.trainable_variables) if id(v) in selected
    ]
    non_trainable = [
        i for i, v in enumerate(model.non_trainable_variables) if id(v) in selected
    ]
    if len(trainable) + len(non_trainable) != len(selected):
        raise RuntimeError(
            "WeightDecay: a selected weight is not in the model's trainable or "
            "non-trainable variables, so it cannot be decayed in the train step."
        )

    def scaled(values, indices, factor):
        values = list(values)
        for i in indices:
            values[i] = _times(values[i], factor)
        return values

    def train_step(state, data):
        mapping = list(zip(optimizer.variables, state[2], strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            rate = rate_in_step(optimizer)
        logs, state = step(state, data)
        factor = _factor(rate)
        trainable_values, non_trainable_values, *rest = state
        state = (
            scaled(trainable_values, trainable, factor),
            scaled(non_trainable_values, non_trainable, factor),
            *rest,
        )
        return _logs_with_rate(logs, rate), state

    return train_step


def _fold_torch(step, model, variables, rate_in_step):
    import torch

    optimizer = model.optimizer

    def train_step(data):
        rate = rate_in_step(optimizer)
        logs = step(data)
        factor = _factor(rate)
        with torch.no_grad():
            for v in variables:
                value = v.value
                if value.dtype in (torch.float16, torch.bfloat16):
                    value.copy_(_times(value, factor))  # see `_times`
                elif isinstance(factor, float):
                    value.mul_(factor)
                else:
                    value.mul_(factor.to(value.dtype))
        return _logs_with_rate(logs, rate)

    return train_step


_FOLDS = {
    "tensorflow": _fold_tensorflow,
    "jax": _fold_jax,
    "torch": _fold_torch,
}


def _validate_unit_interval(value: Any, name: str, owner: str, *, upper: bool) -> float:
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
