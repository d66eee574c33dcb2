"""Fold post-step transforms into the model's compiled train step.

The per-backend half of `kerasreg.poststep`: `TrainStepFold` shadows a model's
`train_step` with the original step followed by each transform, in list order,
and `fold_step` builds that step for the active backend's trainer (a
cross-replica `assign` on TensorFlow, the trainer's state tuple on JAX, an
in-place `copy_` under `no_grad` on PyTorch). A member is a
`kerasreg.poststep.PostStepTransform`; the fold uses its step protocol only:
`selected`, `references`, `log_key`, `strength_in_step`, `applies_in_step`,
`param_in_step`, `new_value`, `fold_config` and `fold_cache`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from kerasreg import _compat

_MISSING = object()


class TrainStepFold:
    """The transforms folded into one model's `train_step` during one `fit`.

    While active it shadows three model attributes: `train_step` (the original
    step followed by each transform, in list order), `train_function` (Keras's
    compiled function over that step, cached so a second `fit` does not
    re-trace) and `make_train_function` (this object). Keras calls
    `make_train_function` at the start of every `fit` and `train_on_batch`,
    before `on_train_begin`, so a `fit` that raised (Keras then skips
    `on_train_end`) is undone by the model's next training call: no later
    training can run a stale transform. A `make_train_function(force=True)`
    while folded re-traces and folds again (see `__call__`).
    """

    NAMES = ("train_step", "make_train_function")

    def __init__(self, model: keras.Model):
        self._model: Callable[[], Any] = weakref.ref(model)
        self.members: list[Any] = []
        self.saved = {name: vars(model).get(name, _MISSING) for name in self.NAMES}
        self.step = model.train_step
        self.train_function = model.train_function

    @staticmethod
    def active(model: keras.Model) -> TrainStepFold | None:
        fold = vars(model).get("make_train_function")
        return fold if isinstance(fold, TrainStepFold) else None

    @classmethod
    def add(cls, model: keras.Model, member: Any) -> None:
        fold = cls.active(model)
        if fold is not None and member in fold.members:
            fold.restore()  # left by a call that raised before `on_train_end`
            fold = None
        if fold is None:
            fold = cls(model)
        fold.members.append(member)
        fold.install()

    @classmethod
    def remove(cls, model: keras.Model) -> None:
        fold = cls.active(model)
        if fold is not None:
            fold.restore()

    def install(self) -> None:
        model = self._model()
        owner = self.members[-1]
        key = (
            self.train_function,
            tuple((member, member.fold_config()) for member in self.members),
        )
        if key not in owner.fold_cache:
            step = self.step
            for member in self.members:
                if not wraps_train_function(member):
                    step = fold_step(step, model, member)
            model.train_step = step
            self._original_make()(force=True)
            function = model.train_function
            # Members that wrap the whole train function (gradient capture)
            # come last, around every folded transform.
            for member in self.members:
                if wraps_train_function(member):
                    function = member.wrap_train_function(
                        model, step, function, self.build_train_function
                    )
            # Entries built over an older `train_function` (before a `compile`)
            # can never be used again.
            for stale in [k for k in owner.fold_cache if k[0] is not key[0]]:
                del owner.fold_cache[stale]
            owner.fold_cache[key] = (step, function)
        model.train_step, model.train_function = owner.fold_cache[key]
        model.make_train_function = self

    def restore(self) -> None:
        model = self._model()
        for name, value in self.saved.items():
            if value is not _MISSING:
                setattr(model, name, value)
            elif name in vars(model):
                delattr(model, name)
        model.train_function = self.train_function

    def build_train_function(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """A train function over `step`, built by Keras's own `make_train_function`
        (`model.train_step` is left as it was)."""
        model = self._model()
        saved = model.train_step
        model.train_step = step
        try:
            self._original_make()(force=True)
            return model.train_function
        finally:
            model.train_step = saved

    def _original_make(self) -> Callable[..., Any]:
        model = self._model()
        make = self.saved["make_train_function"]
        return (
            type(model).make_train_function.__get__(model) if make is _MISSING else make
        )

    def __call__(self, force: bool = False) -> Any:
        """Stand-in for `model.make_train_function`.

        Keras's own call at the start of `fit` and `train_on_batch` (no
        `force`) unfolds, then builds as usual. A `force=True` call (Keras's
        documented re-trace, as `kerasreg.regularize` does from a callback
        during `fit`) re-traces the plain function over the original step and
        folds every member into it again, so a new penalty and the folded
        transforms both hold from the next call.
        """
        model = self._model()
        if not force:
            self.restore()
            return model.make_train_function()
        self.train_function = self.build_train_function(self.step)
        self.install()
        return model.train_function


def _logs_with(logs: Any, key: str, strength: Any) -> Any:
    if not isinstance(logs, dict):
        return logs
    return {**logs, key: ops.convert_to_tensor(strength, "float32")}


def _fold_tensorflow(step, model, member):
    import tensorflow as tf

    optimizer = model.optimizer
    variables = [v.value for v in member.selected]
    refs = member.references or [None] * len(variables)

    def update_one(variable, param, apply, ref):
        return variable.assign(member.new_value(variable, param, apply, ref))

    def update(distribution, param, apply):
        # Cross-replica update: each mirrored copy is updated exactly once.
        for variable, ref in zip(variables, refs, strict=True):
            distribution.extended.update(
                variable, update_one, args=(param, apply, ref), group=False
            )

    def train_step(data):
        strength, ok, before = member.strength_in_step(optimizer)
        logs = step(data)
        apply = member.applies_in_step(optimizer, ok, before)
        param = member.param_in_step(strength)
        if isinstance(param, float):
            param = tf.constant(param, "float64")  # keep `1 - rate` exact
        _compat.merge_call(update, param, apply)
        return _logs_with(logs, member.log_key, strength)

    return train_step


def _fold_jax(step, model, member):
    optimizer = model.optimizer
    refs = member.references or [None] * len(member.selected)
    selected = {id(v): ref for v, ref in zip(member.selected, refs, strict=True)}
    # The JAX trainer's state holds values in these two lists' orders.
    trainable = [
        (i, selected[id(v)])
        for i, v in enumerate(model.trainable_variables)
        if id(v) in selected
    ]
    non_trainable = [
        (i, selected[id(v)])
        for i, v in enumerate(model.non_trainable_variables)
        if id(v) in selected
    ]
    if len(trainable) + len(non_trainable) != len(selected):
        raise RuntimeError(
            f"{type(member).__name__}: a selected weight is not in the model's "
            "trainable or non-trainable variables, so it cannot be updated in "
            "the train step."
        )

    def updated(values, indices, param, apply):
        values = list(values)
        for i, ref in indices:
            values[i] = member.new_value(values[i], param, apply, ref)
        return values

    def train_step(state, data):
        mapping = list(zip(optimizer.variables, state[2], strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            strength, ok, before = member.strength_in_step(optimizer)
        logs, state = step(state, data)
        mapping = list(zip(optimizer.variables, state[2], strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            apply = member.applies_in_step(optimizer, ok, before)
        param = member.param_in_step(strength)
        trainable_values, non_trainable_values, *rest = state
        state = (
            updated(trainable_values, trainable, param, apply),
            updated(non_trainable_values, non_trainable, param, apply),
            *rest,
        )
        return _logs_with(logs, member.log_key, strength), state

    return train_step


def _fold_torch(step, model, member):
    import torch

    optimizer = model.optimizer
    variables = list(member.selected)
    refs = member.references or [None] * len(variables)

    def train_step(data):
        strength, ok, before = member.strength_in_step(optimizer)
        logs = step(data)
        apply = member.applies_in_step(optimizer, ok, before)
        param = member.param_in_step(strength)
        with torch.no_grad():
            for variable, ref in zip(variables, refs, strict=True):
                value = variable.value
                value.copy_(member.new_value(value, param, apply, ref))
        return _logs_with(logs, member.log_key, strength)

    return train_step


FOLDS = {
    "tensorflow": _fold_tensorflow,
    "jax": _fold_jax,
    "torch": _fold_torch,
}


def wraps_train_function(member: Any) -> bool:
    """A member that wraps the built train function (`wrap_train_function(model,
    step, function, build)`) instead of folding a transform into the step."""
    return callable(getattr(member, "wrap_train_function", None))


def fold_step(step: Callable[..., Any], model: keras.Model, member: Any) -> Callable:
    """`step` followed by `member`'s transform, for the active backend's trainer."""
    return FOLDS[keras.backend.backend()](step, model, member)
