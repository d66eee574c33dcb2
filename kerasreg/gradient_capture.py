"""Capture the gradient the optimizer applies, inside the compiled train step.

`GradientCapture` is a `kerasreg.train_step_fold.TrainStepFold` member that
wraps the model's train function instead of folding a transform into the
step. It keeps two train functions built by Keras's own
`make_train_function`: the plain one, and a measured one whose step also
returns, per selected weight, the sums of `kerasreg.gradient_stats` (the data
gradient, the penalty gradient, the applied gradient, their dot product, and
the update `w_after - w_before`). Each call of the train function (one
execution: `steps_per_execution` batches) runs the measured one only when
`decide(call index)` says so, so unmeasured steps cost nothing.

What is measured, per step: the gradient the optimizer applies, taken where
the train step hands it to the optimizer (`optimizer.apply` on TensorFlow and
PyTorch, `optimizer.stateless_apply` on JAX), divided by the loss scale
(`LossScaleOptimizer`'s dynamic scale, or `loss_scale_factor`) and, under
gradient accumulation, averaged with the window's accumulated gradients, as
the optimizer itself does: the gradient its update uses, before clipping.
The data gradient is that minus the penalty gradient of each weight's own
regularizer at the weights before the step. Whether the optimizer applied an
update (its `update_counter` moved: a loss-scaled step with non-finite gradients
and an accumulation batch that does not update apply none) goes with the
sums, with the update count after the step.

The sums of the last step of a measured execution leave the compiled step in
its `logs` under `KEY` and `STEP_KEY`, and are taken out of them before Keras
sees the logs: no callback, progress bar or `History` ever sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import update_counter
from kerasreg.gradient_stats import (
    gradient_sums,
    penalty_gradients,
    penalty_state,
    prepare_regularizers,
    regularizer_key,
    update_sums,
)

KEY = "kerasreg_gradient_sums"
STEP_KEY = "kerasreg_gradient_step"


class GradientCapture:
    """Measure the applied gradient of `variables` in the train step of `model`.

    Args:
        model: the compiled model being trained.
        variables: trainable weights of `model` (in `model.trainable_variables`).

    Attributes:
        latest: `(sums vector, update count)` of the last measured execution's
            last step, device values (None before the first).
        decide: `call index -> bool`, whether to measure the train function's
            next call; `calls` counts the calls (reset by the owner).
    """

    def __init__(self, model: keras.Model, variables: Sequence[Any]):
        self.variables = list(variables)
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self.positions = [index[id(v)] for v in self.variables]
        self.optimizer = model.optimizer
        self.fold_cache: dict[tuple, tuple[Any, Any]] = {}
        self.latest: tuple[Any, Any] | None = None
        self.calls = 0
        self.decide: Callable[[int], bool] = lambda call: True
        prepare_regularizers(self.variables)

    @property
    def regularizers(self) -> list[Any]:
        """Each weight's regularizer now: `kerasreg.regularize` may change them
        between fits or during one (which re-traces the step)."""
        return [v.regularizer for v in self.variables]

    def fold_config(self) -> tuple:
        """What the measured step bakes in: a change means a new trace (a
        `kerasreg.regularize` between fits or during one changes the
        regularizers: object, config or state variables)."""
        return (
            tuple(id(v) for v in self.variables),
            _penalties_key(self.variables),
            id(self.optimizer),
            _compat.gradient_accumulation_steps(self.optimizer),
        )

    # --- the train function ------------------------------------------------------

    def wrap_train_function(
        self,
        model: keras.Model,
        step: Callable[..., Any],
        function: Callable[..., Any],
        build: Callable[[Callable[..., Any]], Callable[..., Any]],
    ) -> Callable[..., Any]:
        """`function`, measuring the calls `decide` picks (the `TrainStepFold` hook)."""
        backend = keras.backend.backend()
        prepare_regularizers(self.variables)  # a penalty set since `__init__`
        measured_step = _MEASURED[backend](self, model, step)
        if backend == "torch":
            # Keras's PyTorch train function looks `model.train_step` up at
            # each call: point it at the measured step for the call.
            def measured(*args: Any, **kwargs: Any) -> Any:
                saved = model.train_step
                model.train_step = measured_step
                try:
                    return function(*args, **kwargs)
                finally:
                    model.train_step = saved

        else:
            measured = build(measured_step)

        def train_function(*args: Any, **kwargs: Any) -> Any:
            call = self.calls
            self.calls += 1
            if not self.decide(call):
                return function(*args, **kwargs)
            result = measured(*args, **kwargs)
            logs = result[0] if isinstance(result, tuple) else result
            self.latest = (logs.pop(KEY), logs.pop(STEP_KEY))
            return result

        return train_function

    # --- inside the step -------------------------------------------------------------

    def sums_at_apply(self, optimizer: Any, grads: Sequence[Any], before: list) -> list:
        """The gradient sums of one step, from the gradients handed to the optimizer
        (those of `self.variables`, in order) and the weights before the update."""
        grads = [
            ops.zeros_like(b) if g is None else g
            for g, b in zip(grads, before, strict=True)
        ]
        applied = _unscaled(optimizer, grads)
        steps = _compat.gradient_accumulation_steps(optimizer)
        if steps > 1:
            accumulators = _compat.gradient_accumulators(optimizer, self.variables)
            # As the optimizer computes the gradient of an updating batch.
            applied = [
                (g + a.value) / steps
                for g, a in zip(applied, accumulators, strict=True)
            ]
        penalty = penalty_gradients(self.regularizers, before)
        data = [
            ops.subtract(g, ops.cast(p, g.dtype))
            for g, p in zip(applied, penalty, strict=True)
        ]
        return gradient_sums(data, penalty, total=applied)

    def vector(self, sums: list, before: list, after: list, applied: Any) -> Any:
        """Per weight its 4 gradient sums and 2 update sums, then the applied flag."""
        updates = update_sums(before, after)
        rows = []
        for i in range(len(self.variables)):
            rows += sums[4 * i : 4 * i + 4] + updates[2 * i : 2 * i + 2]
        rows.append(ops.cast(applied, "float32"))
        return ops.stack(rows)


def _penalties_key(variables: Sequence[Any]) -> tuple:
    # The fold's cache holds the traced step, and with it the regularizers it
    # read: their ids cannot be reused while the key is compared.
    regularizers = [v.regularizer for v in variables]
    return (
        tuple(regularizer_key(r) for r in regularizers),
        tuple(id(s) for s in penalty_state(regularizers)),
    )


def _unscaled(optimizer: Any, grads: list) -> list:
    """The gradients divided by the loss scale, as the optimizer divides them."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = optimizer.dynamic_scale
        return [ops.divide(g, scale) for g in grads]
    factor = getattr(optimizer, "loss_scale_factor", None)
    if factor is not None:
        return [g / factor for g in grads]
    return grads


@contextlib.contextmanager
def _shadowed(owner: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """`owner.name` is `replacement` inside the block (an instance attribute)."""
    missing = object()
    saved = vars(owner).get(name, missing)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if saved is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)


def _with_sums(logs: Any, vector: Any, step: Any) -> dict:
    if not isinstance(logs, dict):
        raise TypeError(
            "WeightNormLogger(gradients=True) needs a train step that returns a "
            f"dict of logs; this model's returns {type(logs).__name__}."
        )
    return {**logs, KEY: vector, STEP_KEY: step}


def _missing_apply(name: str) -> RuntimeError:
    return RuntimeError(
        "WeightNormLogger(gradients=True): the train step never called "
        f"`optimizer.{name}`, where the applied gradient is taken (a custom "
        "`train_step` that updates the weights another way is not supported)."
    )


def _measured_stateful(capture: GradientCapture, model: keras.Model, step, snapshot):
    """TensorFlow and PyTorch: `train_step(data) -> logs`, variables updated in place."""
    optimizer = model.optimizer

    def measured(data):
        captured: dict[str, Any] = {}
        original = optimizer.apply

        def apply(grads, trainable_variables=None):
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else list(model.trainable_variables)
            )
            if not optimizer.built:
                # What `apply` does first on TensorFlow's first trace (Keras
                # builds the optimizer lazily there without a strategy).
                with keras.name_scope(optimizer.name, caller=optimizer):
                    optimizer.build(variables)
            where = {id(v): i for i, v in enumerate(variables)}
            picked = [grads[where[id(v)]] for v in capture.variables]
            before = [snapshot(v.value) for v in capture.variables]
            captured["sums"] = capture.sums_at_apply(optimizer, picked, before)
            captured["before"] = before
            return original(grads, trainable_variables)

        iterations = snapshot(ops.convert_to_tensor(update_counter(optimizer)))
        with _shadowed(optimizer, "apply", apply):
            logs = step(data)
        if "sums" not in captured:
            raise _missing_apply("apply")
        # A copy: on PyTorch the counter's tensor is the live variable, which
        # would go on counting after this step and pass a later step's check.
        done = snapshot(ops.convert_to_tensor(update_counter(optimizer)))
        after = [v.value for v in capture.variables]
        vector = capture.vector(
            captured["sums"], captured["before"], after, ops.greater(done, iterations)
        )
        return _with_sums(logs, vector, done)

    return measured


def _measured_tensorflow(capture, model, step):
    import tensorflow as tf

    return _measured_stateful(capture, model, step, tf.identity)


def _measured_torch(capture, model, step):
    return _measured_stateful(capture, model, step, lambda x: x.detach().clone())


def _measured_jax(capture: GradientCapture, model: keras.Model, step):
    """JAX: `train_step(state, data) -> (logs, state)`, pure."""
    optimizer = model.optimizer

    def iterations(optimizer_values):
        mapping = list(zip(optimizer.variables, optimizer_values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return ops.convert_to_tensor(update_counter(optimizer))

    def measured(state, data):
        captured: dict[str, Any] = {}
        original = optimizer.stateless_apply

        def stateless_apply(optimizer_variables, grads, trainable_variables):
            before = [trainable_variables[i] for i in capture.positions]
            picked = [grads[i] for i in capture.positions]
            # Keras has purged the variables' values here: the penalties read
            # their state (an L2SPPenalty's reference, a non-trainable
            # variable of the model) from the step's state, the loss scale
            # and accumulators from the optimizer's.
            mapping = list(
                zip(model.non_trainable_variables, state[1], strict=True)
            ) + list(zip(optimizer.variables, optimizer_variables, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                captured["sums"] = capture.sums_at_apply(optimizer, picked, before)
            captured["before"] = before
            return original(optimizer_variables, grads, trainable_variables)

        with _shadowed(optimizer, "stateless_apply", stateless_apply):
            logs, new_state = step(state, data)
        if "sums" not in captured:
            raise _missing_apply("stateless_apply")
        start, done = iterations(state[2]), iterations(new_state[2])
        after = [new_state[0][i] for i in capture.positions]
        vector = capture.vector(
            captured["sums"], captured["before"], after, ops.greater(done, start)
        )
        return _with_sums(logs, vector, done), new_state

    return measured


_MEASURED = {
    "tensorflow": _measured_tensorflow,
    "jax": _measured_jax,
    "torch": _measured_torch,
}
