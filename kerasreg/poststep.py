"""After each optimizer update, transform the selected weights.

The one machinery behind `WeightDecay` (`w <- (1 - rate) * w`, or toward a
reference) and `SoftThreshold` (`w <- sign(w) * max(|w| - t, 0)`), in the
spirit of optax's chained transforms: each is a small `PostStepTransform`
subclass that says how to turn its strength into an update. This module holds
what they share:

- **When.** Exactly once per update the optimizer applied (its
  `iterations` moved), whatever `steps_per_execution`, gradient accumulation
  (an update happens every `n`-th batch: the transform acts on those batches
  only, as Keras's own `weight_decay` does), dynamic loss scaling (a step
  whose gradients overflowed is skipped by `LossScaleOptimizer`, and so is its
  transform) or the epoch length say. A per-epoch transform acts once per
  epoch in which the optimizer applied an update. The step index is always
  `optimizer.iterations`, read on the device in the compiled step or as one
  scalar on the host, never rebuilt from Keras's `batch` argument.
- **EMA.** With an optimizer's `use_ema=True`, Keras writes its moving
  average over the weights every `ema_overwrite_frequency` updates (inside
  the update, so that update's own transform follows it) and at the end of
  `fit` (after the last update): then the transform is applied once more, to
  what Keras wrote, with the strength of the last update (or epoch). The
  model ends with what the transform promises.
- **How.** Per-step transforms with a constant strength or a
  `keras.optimizers.schedules.LearningRateSchedule` are folded into the
  model's compiled train step (`kerasreg.train_step_fold`): several compose in list
  order in one compiled step and need no batch hook. Per-epoch transforms and
  Python-callable schedules run from the callback as one compiled in-place
  update (`kerasreg.inplace`); per-epoch ones run before the epoch's
  validation, so `val_loss`, `EarlyStopping` and `ModelCheckpoint` judge the
  weights the model keeps.
- **Checks.** A strength outside its range (a rate outside `[0, 1)`, a
  negative threshold) is an error naming the schedule and the step, and never
  touches a weight: the host path checks before it applies; the folded path
  checks each epoch's steps on the host before the epoch and, inside the step,
  leaves the weights alone for an out-of-range strength.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from kerasreg import _compat
from kerasreg._checks import (
    as_real_scalar,
    optimizer_iterations,
    update_counter,
    validate_bool,
)
from kerasreg.callback_order import warn_if_logs_readers_run_first
from kerasreg.fit_record import record_fit_end, record_fit_start
from kerasreg.inplace import (
    InPlaceUpdate,
    apply_transform,
    cast_exact,
    param_dtype,
    update_model_weights,
)
from kerasreg.selection import Where, check_where, select_weights
from kerasreg.train_step_fold import TrainStepFold

FREQUENCIES = ("batch", "epoch")

# Host-side schedule checks evaluate at most this many steps one by one when a
# schedule does not accept a vector of steps.
_MAX_SCALAR_CHECKS = 20_000


class PostStepTransform(keras.callbacks.Callback):
    """Base class: transform the selected weights after each update or epoch.

    Subclasses set `STRENGTH` (the strength's argument name, also the suffix
    of the `logs` key), `DEFAULT_NAME`, and implement `_check_strength`,
    `_strength_ok`, `_param` (host: several steps' strengths to one update
    parameter), `param_in_step`, `transform(value, param, ref)` and
    `describe_action`.
    """

    STRENGTH = "strength"
    DEFAULT_NAME = "post_step"

    def __init__(
        self,
        strength: Any,
        *,
        frequency: str = "batch",
        where: Where = None,
        lr_scaled: bool = False,
        schedule: Callable[[int], Any] | None = None,
        name: str | None = None,
    ):
        super().__init__()
        owner = type(self).__name__
        self._strength = self._check_strength(strength, self.STRENGTH)
        if frequency not in FREQUENCIES:
            raise ValueError(
                f"{owner}: invalid `frequency`: expected one of "
                f"{', '.join(map(repr, FREQUENCIES))}. Received: "
                f"frequency={frequency!r}."
            )
        lr_scaled = validate_bool(lr_scaled, "lr_scaled", owner)
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"{owner}: invalid `schedule`: expected None or a callable "
                f"`step -> {self.STRENGTH}`. Received: schedule={schedule!r} "
                f"(type {type(schedule).__name__})."
            )
        if name is None:
            name = self.DEFAULT_NAME
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"{owner}: invalid `name`: expected a non-empty identifier-like "
                f"string (it names the `logs` key). Received: name={name!r}."
            )
        self.frequency = frequency
        self.where = check_where(where)
        self.lr_scaled = bool(lr_scaled)
        self.schedule = schedule
        self.name = name
        self.log_key = f"{name}_{self.STRENGTH}"
        self.folded = frequency == "batch" and _can_fold(schedule)
        self.selected: list[Any] = []
        # The dtype of strengths computed as tensors (`param_dtype` of the
        # selected weights): float64 arithmetic for float64 weights.
        self.strength_dtype = "float32"
        self.references: list[Any] | None = None
        self._update: InPlaceUpdate | None = None
        self._ema_update: InPlaceUpdate | None = None
        self.fold_cache: dict[tuple, tuple[Any, Any]] = {}
        self._step = 0
        self._epoch = 0
        self._epoch_first_step = 0
        self._fit_first_step = 0
        self._epoch_pending = False
        self._last_strength: Any = None
        if frequency == "batch" and not self.folded:
            # Bound per instance so a transform that needs no batch hook
            # (folded, or per epoch) keeps Keras's asynchronous dispatch.
            self.on_train_batch_end = self._after_batch

    def __repr__(self) -> str:
        """`WeightDecay(rate=0.001, toward='start')`: the arguments not at default."""
        parts = []
        signature = inspect.signature(type(self).__init__)
        for name, parameter in signature.parameters.items():
            if name == "self" or parameter.kind in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            ):
                continue
            value = getattr(self, name, parameter.default)
            default = self.DEFAULT_NAME if name == "name" else parameter.default
            if parameter.default is not parameter.empty and (
                value is default or (isinstance(value, str) and value == default)
            ):
                continue
            if isinstance(value, bool) and value == parameter.default:
                continue
            text = f"{value:g}" if isinstance(value, float) else repr(value)
            parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- what subclasses define ----------------------------------------------

    def _check_strength(self, value: Any, name: str) -> float:
        raise NotImplementedError

    def _strength_ok(self, strength: Any) -> Any:
        """In-step: a boolean tensor, True when `strength` is in range."""
        raise NotImplementedError

    def _param(self, strengths: Sequence[Any]) -> Any:
        """Host: the update parameter of several consecutive steps at once."""
        raise NotImplementedError

    def param_in_step(self, strength: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def transform(value: Any, param: Any, ref: Any) -> Any:
        raise NotImplementedError

    def describe_action(self) -> str:
        raise NotImplementedError

    def _references(self, model: keras.Model, variables: list[Any]) -> list | None:
        """Per-variable reference tensors the transform needs, or None."""
        return None

    # --- the strength, one function for every path -----------------------------

    def strength_at(
        self,
        step: Any,
        optimizer: Any = None,
        *,
        current: bool = False,
        lr_step: Any = None,
    ) -> Any:
        """The strength of optimizer update `step`: `strength` or `schedule(step)`,
        times the learning rate of that update when `lr_scaled` (`current`: the
        optimizer's learning rate now, inside the step before it updates;
        `lr_step`: the learning rate of that update instead, as a per-epoch
        transform uses its epoch's last update's)."""
        s = self._strength if self.schedule is None else self.schedule(step)
        if self.lr_scaled:
            if current:
                learning_rate = optimizer.learning_rate
            else:
                at = step if lr_step is None else lr_step
                learning_rate = _compat.learning_rate_at(optimizer, at)
            dtype = self.strength_dtype
            s = ops.multiply(cast_exact(s, dtype), ops.cast(learning_rate, dtype))
        return s

    def _host_strength(self, step: int, lr_step: int | None = None) -> float | Any:
        """`strength_at(step)` checked on the host; raises when out of range."""
        optimizer = getattr(self._model, "optimizer", None)
        value = self.strength_at(step, optimizer, lr_step=lr_step)
        number = as_real_scalar(value)
        if number is None:
            try:
                number = float(np.asarray(ops.convert_to_numpy(value)).reshape(()))
            except Exception:
                number = None
        self._check_step_strength(number, value, step)
        return number if isinstance(value, numbers.Real) else value

    def _check_step_strength(self, number: float | None, value: Any, step: int) -> None:
        try:
            self._check_strength(number, self.STRENGTH)
        except (TypeError, ValueError) as error:
            if self.schedule is not None:
                source = f"`schedule({step})` (schedule={self.schedule!r})"
            else:
                source = f"`{self.STRENGTH}`"
            scaled = " times the learning rate" if self.lr_scaled else ""
            when = "epoch" if self.frequency == "epoch" else "optimizer step"
            raise ValueError(
                f"{type(self).__name__}: invalid {self.STRENGTH} at {when} "
                f"{step}: {source}{scaled} gives {value!r}; {_reason(error)} No "
                "weight was changed with it."
            ) from None

    @property
    def _accumulation(self) -> int:
        return _compat.gradient_accumulation_steps(
            getattr(self._model, "optimizer", None)
        )

    def _update_steps(self, first: int, last: int) -> list[int]:
        """Optimizer updates in `[first, last)`: `optimizer.iterations` counts
        updates, not batches, also under gradient accumulation."""
        return list(range(first, last))

    # --- training hooks --------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        owner = type(self).__name__
        self._check_strength(self._strength, self.STRENGTH)  # changed since?
        variables = select_weights(model, self.where)
        if self.lr_scaled and getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"{owner}(lr_scaled=True) needs a compiled model with an optimizer."
            )
        refs = self._references(model, variables)
        self.log_key = _FitNames.claim(self, f"{self.name}_{self.STRENGTH}")
        warn_if_logs_readers_run_first(self, (self.log_key,))
        self.selected = variables
        self.strength_dtype = param_dtype(variables)
        self.references = refs
        self._last_strength = None
        self._step = self._fit_first_step = optimizer_iterations(model)
        record_fit_start(model, self)
        if self.folded:
            TrainStepFold.add(model, self)
            return
        update = InPlaceUpdate.key_of(variables, self.transform, refs)
        if self._update is None or self._update.key != update:
            self._update = InPlaceUpdate(variables, self.transform, refs)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.folded:
            TrainStepFold.remove(self._model)
        self._epoch_pending = False
        self._after_ema_overwrite()
        record_fit_end(self._model, self, optimizer_iterations(self._model))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_pending = self.frequency == "epoch"
        if self._epoch_pending:
            self._epoch_first_step = optimizer_iterations(self.model)
        if self.folded and self._needs_guard():
            # Check the epoch's steps before they run (nothing moves on error).
            self._epoch_first_step = optimizer_iterations(self.model)
            steps = (self.params or {}).get("steps")
            if steps:
                first = self._epoch_first_step
                self._check_steps(first, first + int(steps))

    def on_test_begin(self, logs: dict | None = None) -> None:
        # The epoch's validation is about to run: apply the per-epoch transform
        # first, so `val_loss` and checkpoints see the weights the model keeps.
        if self._epoch_pending:
            self._epoch_pending = False
            self._apply_epoch()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.folded:
            if self._needs_guard() and not (self.params or {}).get("steps"):
                # Unknown epoch length: check the steps that ran (a bad one was
                # a no-op in the step).
                done = optimizer_iterations(self.model)
                self._check_steps(self._epoch_first_step, done)
            if logs is not None and self.schedule is None and not self.lr_scaled:
                logs[self.log_key] = self._strength
            return
        if self.frequency == "epoch":
            if self._epoch_pending:
                self._epoch_pending = False
                self._apply_epoch()
        else:
            # Some trainers skip the batch hook after a short last execution
            # (JAX, unknown epoch length): apply the steps it missed, once.
            self._after_batch(None, None)
        if logs is not None and self._last_strength is not None:
            logs[self.log_key] = float(ops.convert_to_numpy(self._last_strength))

    def _after_batch(self, batch: int | None, logs: dict | None = None) -> None:
        done = optimizer_iterations(self.model)  # `model`: syncs JAX state
        first, self._step = self._step, done
        steps = self._update_steps(first, done)
        if steps:
            self._apply([self._host_strength(t) for t in steps], logs)

    def _apply_epoch(self) -> None:
        done = optimizer_iterations(self.model)
        if done == self._epoch_first_step:
            return  # every update of the epoch was skipped (loss scaling)
        # `schedule(epoch)`, times the learning rate of the epoch's last update.
        self._apply([self._host_strength(self._epoch, lr_step=done - 1)], None)

    def _apply(self, strengths: list[Any], logs: dict | None) -> None:
        param = self._param(strengths)
        # `_update` is set when the transform is installed, before any update.
        update_model_weights(self.model, self._update, param)  # type: ignore[arg-type]
        self._last_strength = strengths[-1]
        if logs is not None:
            logs[self.log_key] = strengths[-1]

    def _after_ema_overwrite(self) -> None:
        """Keras has just written its EMA over the trainable weights (its
        `finalize_variable_values`, before `on_train_end`): transform them
        once more, with the strength of the last update (or epoch), so the
        model ends with what the transform promises."""
        model = self._model
        if not uses_ema(getattr(model, "optimizer", None)):
            return
        done = optimizer_iterations(model)
        if done == self._fit_first_step:
            return  # no update in this fit: Keras wrote nothing new
        if self.frequency == "epoch" or not self.folded:
            strength = self._last_strength
            if strength is None:
                return  # no epoch of this fit applied the transform
        else:
            strength = self._host_strength(done - 1)
        trainable = {id(v) for v in model.trainable_weights}
        refs = self.references or [None] * len(self.selected)
        pairs = [(v, r) for v, r in zip(self.selected, refs, strict=True)]
        pairs = [(v, r) for v, r in pairs if id(v) in trainable]
        if not pairs:
            return
        variables = [v for v, _ in pairs]
        refs = None if self.references is None else [r for _, r in pairs]  # type: ignore[assignment]
        key = InPlaceUpdate.key_of(variables, self.transform, refs)
        if self._ema_update is None or self._ema_update.key != key:
            self._ema_update = InPlaceUpdate(variables, self.transform, refs)
        update_model_weights(model, self._ema_update, self._param([strength]))

    # --- host checks of a folded schedule ----------------------------------------

    def _needs_guard(self) -> bool:
        """Whether a strength can come out of range (checked per step)."""
        return self.schedule is not None or self.lr_scaled

    def _check_steps(self, first: int, last: int) -> None:
        steps = self._update_steps(first, last)
        if not steps or (self.schedule is None and not self.lr_scaled):
            return
        optimizer = getattr(self._model, "optimizer", None)
        values: Any = None
        try:
            vector = self.strength_at(ops.convert_to_tensor(steps, "int64"), optimizer)
            values = np.asarray(ops.convert_to_numpy(vector), np.float64).reshape(-1)
            if values.shape != (len(steps),):
                values = None
        except Exception:
            values = None
        if values is None:
            steps = steps[:_MAX_SCALAR_CHECKS]
            values = [
                as_real_scalar(ops.convert_to_numpy(self.strength_at(t, optimizer)))
                for t in steps
            ]
        for t, value in zip(steps, values, strict=True):
            number = None if value is None else float(value)
            if number is None or not self._in_range(number):
                self._check_step_strength(number, value, t)

    def _in_range(self, number: float) -> bool:
        try:
            self._check_strength(number, self.STRENGTH)
        except (TypeError, ValueError):
            return False
        return True

    # --- folding into the train step --------------------------------------------

    def fold_config(self) -> tuple:
        """What a folded train step bakes in: a change means a new trace."""
        return (
            tuple(id(v) for v in self.selected),
            None if self.references is None else tuple(id(r) for r in self.references),
            self._strength,
            self.lr_scaled,
            self.schedule,
            self.log_key,
            self._accumulation,
            may_skip_updates(getattr(self._model, "optimizer", None)),
        )

    def strength_in_step(self, optimizer: Any) -> tuple[Any, Any, Any]:
        """`(strength, ok, before)` of the step about to run, read before the
        optimizer moves: `ok` is None or a boolean tensor (strength in range),
        `before` the update count so far (None when every step updates)."""
        step = update_counter(optimizer)
        strength = self.strength_at(step, optimizer, current=True)
        before = None
        if may_skip_updates(optimizer):
            # A copy: on PyTorch the variable's tensor is updated in place.
            before = ops.copy(ops.convert_to_tensor(step))
        if not self._needs_guard():
            return strength, None, before
        strength = cast_exact(strength, self.strength_dtype)
        return strength, self._strength_ok(strength), before

    def applies_in_step(self, optimizer: Any, ok: Any, before: Any) -> Any:
        """After the step: whether to transform (None: always). Only a step
        whose update the optimizer applied counts (`iterations` moved): not a
        batch that gradient accumulation only accumulated, nor a step that
        dynamic loss scaling skipped."""
        if before is None:
            return ok
        updated = ops.greater(ops.convert_to_tensor(update_counter(optimizer)), before)
        return updated if ok is None else ops.logical_and(ok, updated)

    def new_value(self, value: Any, param: Any, apply: Any, ref: Any) -> Any:
        """One weight's value after the transform (unchanged where not `apply`)."""
        new = apply_transform(self.transform, value, param, ref)
        return new if apply is None else ops.where(apply, new, value)


# Keras optimizers that apply an update on every step (without gradient
# accumulation): no check of `iterations` is needed after their steps.
_EVERY_STEP_OPTIMIZERS = tuple(
    getattr(keras.optimizers, name)
    for name in (
        "SGD",
        "Adam",
        "AdamW",
        "Adamax",
        "Adagrad",
        "Adadelta",
        "Adafactor",
        "Ftrl",
        "Lamb",
        "Lion",
        "Nadam",
        "RMSprop",
        "Muon",
    )
    if hasattr(keras.optimizers, name)
)


def may_skip_updates(optimizer: Any) -> bool:
    """Whether a training step can leave the weights without an update.

    True for `LossScaleOptimizer` (a step with non-finite gradients is
    skipped), under gradient accumulation (only every `n`-th batch updates),
    and for any optimizer that is not exactly one of Keras's own (kerasreg
    cannot prove it updates on every step). Where True, a folded transform
    follows only the steps after which `optimizer.iterations` moved.
    """
    if optimizer is None:
        return False
    if _compat.gradient_accumulation_steps(optimizer) > 1:
        return True
    return type(optimizer) not in _EVERY_STEP_OPTIMIZERS


def uses_ema(optimizer: Any) -> bool:
    """Whether `optimizer` (or the one a `LossScaleOptimizer` wraps) keeps an
    EMA of the weights, which Keras writes over them (`use_ema=True`)."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if candidate is not None and getattr(candidate, "use_ema", False):
            return True
    return False


def _reason(error: Exception) -> str:
    text = str(error)
    marker = "expected"
    return text[text.index(marker) :] if marker in text else text


def _can_fold(schedule: Any) -> bool:
    """Whether per-step transforms can run inside the model's compiled train step."""
    if schedule is not None and not isinstance(
        schedule, keras.optimizers.schedules.LearningRateSchedule
    ):
        return False  # arbitrary callables are called eagerly, with Python ints
    backend = keras.backend.backend()
    if backend == "jax":
        # Flax NNX trainers call the class's `train_step`, not the instance's.
        return not _compat.nnx_enabled()
    return backend in ("tensorflow", "torch")


class _FitNames:
    """Distinct `logs` keys for the kerasreg callbacks of one `fit`.

    Keras gives every callback of one `fit` the same `params` dict: the first
    callback to claim a key keeps it, a later one with the same name gets
    `<name>_2_<strength>`, `<name>_3_<strength>`, ... in list order.
    """

    _fits: ClassVar[list[tuple[Any, dict[str, Any]]]] = []

    @classmethod
    def claim(cls, callback: PostStepTransform, key: str) -> str:
        params = callback.params
        claims = next((c for p, c in cls._fits if p is params), None)
        if claims is None:
            claims = {}
            cls._fits = [*cls._fits[-7:], (params, claims)]
        for owner_key, owner in claims.items():
            if owner is callback:
                return owner_key
        if key in claims:
            n = 2
            while f"{callback.name}_{n}_{callback.STRENGTH}" in claims:
                n += 1
            key = f"{callback.name}_{n}_{callback.STRENGTH}"
        claims[key] = callback
        return key
