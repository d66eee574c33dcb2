"""The one home of every access to Keras, TensorFlow or JAX internals.

kerasreg uses public APIs wherever they exist. Where a private detail is
unavoidable, it is read here, through a small function with a one-line reason,
a guard that fails loudly (never silently) when Keras changes it, and a test in
`tests/test_compat.py`. No other kerasreg module touches a private attribute.
"""

from __future__ import annotations

import inspect
from typing import Any

import keras

KERAS_VERSION = tuple(int(p) for p in keras.__version__.split(".")[:2])


class KerasInternalsChanged(RuntimeError):
    """A private Keras detail kerasreg relies on is gone: upgrade kerasreg."""


def sublayers(layer: Any) -> list[Any]:
    """The layers directly tracked by `layer` (a model's layers, an RNN's cell,
    both directions of `Bidirectional`, the layer inside `TimeDistributed`).

    Reason: Keras has no public "direct children" accessor; `layer._layers`
    (Keras's own tracker list, since 3.0) is what `layer.weights` is built from.
    """
    children = getattr(layer, "_layers", None)
    if children is None:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} layers have no `_layers` list "
            f"(layer {getattr(layer, 'name', layer)!r}); kerasreg cannot walk "
            "nested layers on this Keras version."
        )
    return list(children)


def sync_jax_state(model: Any) -> bool:
    """Write a JAX trainer's live state back into the model's variables.

    Reason: during a JAX `fit` the live weights sit in the trainer's state, not
    in the variables; `jax_state_sync` (a public trainer method) copies them
    back. Returns whether the model has such a state (JAX backend).
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is None:
        return False
    sync()
    return True


def refresh_jax_state(model: Any) -> None:
    """Make a JAX trainer's cached state match the model's variables again.

    Reason: after a short last execution the JAX trainer writes its cached
    `_jax_state` back at epoch end, which would undo a callback's update of the
    variables (Keras 3.8 to 3.15 at least). Keras has no public way to drop it.
    """
    # Outside `fit` there is no state to refresh; that the attribute exists
    # during `fit` is checked by tests/test_compat.py.
    state = getattr(model, "_jax_state", None)
    if state:
        for key in ("trainable_variables", "non_trainable_variables"):
            if state.get(key) is not None:
                state[key] = [v.value for v in getattr(model, key)]


def merge_call(fn: Any, *args: Any) -> Any:
    """Run `fn(strategy, *args)` in cross-replica context from a replica function.

    Reason: a weight update folded into the train step must update each
    mirrored copy once; `tf.__internal__.distribute.interim.maybe_merge_call`
    is what Keras's own optimizers use for that (TensorFlow 2.16 to 2.21).
    """
    import tensorflow as tf

    try:
        merge = tf.__internal__.distribute.interim.maybe_merge_call
    except AttributeError:
        raise KerasInternalsChanged(
            f"kerasreg: TensorFlow {tf.__version__} has no "
            "`tf.__internal__.distribute.interim.maybe_merge_call`; kerasreg cannot "
            "fold a weight update into a distributed train step."
        ) from None
    return merge(fn, tf.distribute.get_strategy(), *args)


def learning_rate_at(optimizer: Any, step: Any) -> Any:
    """The learning rate `optimizer` uses for its update number `step`.

    Reason: Keras exposes only the current rate (`optimizer.learning_rate`);
    the rate of another update needs the schedule itself, which the optimizer
    keeps in `_learning_rate` (Keras 3.0 to 3.15) and evaluates on its batch
    counter: update `t` under gradient accumulation over `n` batches happens at
    batch `t * n + n - 1`. A `LossScaleOptimizer` forwards to its
    `inner_optimizer`.
    """
    if optimizer is None:
        raise ValueError("lr_scaled=True needs a compiled model with an optimizer.")
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        optimizer = inner
    if not hasattr(optimizer, "_learning_rate"):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} optimizers have no `_learning_rate`; "
            "kerasreg cannot evaluate the learning rate of a given step."
        )
    schedule = optimizer._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        n = gradient_accumulation_steps(optimizer)
        return schedule(step * n + (n - 1) if n > 1 else step)
    return optimizer.learning_rate


def gradient_accumulation_steps(optimizer: Any) -> int:
    """How many batches make one optimizer update (1 without accumulation)."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        steps = getattr(candidate, "gradient_accumulation_steps", None)
        if steps:
            return int(steps)
    return 1


try:  # Reason: Keras saves an object's own variables only for this base class.
    from keras.src.saving.keras_saveable import KerasSaveable as KerasSaveable
except ImportError as error:  # pragma: no cover - fails loudly on a new Keras
    raise KerasInternalsChanged(
        f"kerasreg: Keras {keras.__version__} has no "
        "keras.src.saving.keras_saveable.KerasSaveable; L2SPPenalty cannot save "
        "its reference with the model."
    ) from error

# Keras's saving walks a KerasSaveable's attributes with a skip list chosen by
# its type name; "Loss" skips nothing an L2SPPenalty holds.
SAVEABLE_TYPE = "Loss"


def eager_copy(variable: Any) -> Any:
    """A copy of `variable`'s current value, also while a train step is traced.

    Returns None when the variable has no value yet (PyTorch's symbolic build
    runs on shape-only "meta" tensors).

    Reason: a penalty first called inside `tf.function` tracing sees the
    variable symbolically; `tf.init_scope` (public TF API) reads it eagerly,
    and `jax.ensure_compile_time_eval` does the same under a JAX trace.
    """
    from keras import ops

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            return tf.identity(variable.value)
    if backend == "jax":
        import jax

        # Keras's symbolic build traces with concrete variable values: copy
        # them outside the trace (public JAX API).
        with jax.ensure_compile_time_eval():
            return jax.numpy.array(variable.value, copy=True)
    value = variable.value
    if getattr(value, "is_meta", False):
        return None  # PyTorch's symbolic build: shapes only, no values yet
    # Detached: on PyTorch a clone would stay in the autograd graph of `w`.
    return ops.copy(ops.stop_gradient(value))


# Reason: a layer passes the `state` variable of every `keras.random.SeedGenerator`
# it holds as an attribute to its trainers (`layer.variables` and
# `layer.non_trainable_variables` include it: JAX's compiled steps take it as
# state, not as a constant), yet never counts it as a weight nor saves it
# (Keras 3.0 to 3.15; the public docstrings of `Layer.variables` and
# `Layer.non_trainable_variables` say so). An object of a subclass, set as a
# layer attribute, has Keras carry its `state` the same way.
LayerState = keras.random.SeedGenerator


def state_variable(value: Any, name: str) -> Any:
    """A non-trainable `keras.Variable` holding `value`, created eagerly.

    Works while a train step is traced: under `tf.function` the variable is
    created in `tf.init_scope` (public TF API); in Keras's stateless scope
    (JAX and TensorFlow symbolic builds), a variable with a callable
    initializer is created uninitialized and Keras initializes it when the
    scope exits (what `Layer.add_weight` relies on there too).
    """
    shape = tuple(int(d) for d in value.shape)
    dtype = keras.backend.standardize_dtype(value.dtype)

    def initializer(shape: Any = None, dtype: Any = None) -> Any:
        return value

    def make() -> Any:
        return keras.Variable(
            initializer, shape=shape, dtype=dtype, trainable=False,
            autocast=False, name=name,
        )  # fmt: skip

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            return make()
    return make()


def set_tracked_attribute(layer: Any, name: str, value: Any) -> None:
    """`setattr(layer, name, value)`, also on a built layer, untracking the old value.

    Reason: Keras locks a built layer's tracker, so a new `LayerState` set as
    an attribute would raise "You cannot add new elements of state"; Keras's
    own `enable_lora` and `quantize` unlock `layer._tracker` the same way to
    add state after build (Keras 3.0 to 3.15). The value it replaces leaves
    the layer's state with it (`Tracker.untrack`).
    """
    tracker = getattr(layer, "_tracker", None)
    if tracker is None or not all(
        hasattr(tracker, m) for m in ("lock", "unlock", "untrack", "locked")
    ):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} layers have no `_tracker` with "
            f"lock/unlock/untrack (layer {getattr(layer, 'name', layer)!r}); "
            "kerasreg cannot attach an L2SPPenalty to a built layer."
        )
    old = getattr(layer, name, None)
    locked = tracker.locked
    tracker.unlock()
    try:
        if isinstance(old, LayerState) and old is not value:
            tracker.untrack(old)
        setattr(layer, name, value)
    finally:
        if locked:
            tracker.lock()


def fit_callbacks(callback: Any) -> list[Any] | None:
    """The callbacks of the `fit` now calling `callback`'s hook, in list order.

    Reason: Keras gives a callback no handle on the `CallbackList` that calls
    it; that list is `self` in the frame of `CallbackList.on_train_begin` (and
    the other dispatch methods), a few frames up the stack. Returns `None` when
    no `CallbackList` holding `callback` is on the stack (a hook called by hand).
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(_CALLER_FRAMES):
            if frame is None:
                break
            code = frame.f_code
            # Only a method's frame can hold the list as `self`; other frames'
            # locals are never materialized.
            owner = None
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList):
                callbacks = getattr(owner, "callbacks", None)
                if not isinstance(callbacks, list):
                    raise KerasInternalsChanged(
                        f"kerasreg: Keras {keras.__version__}'s CallbackList has "
                        "no `callbacks` list; kerasreg cannot see the order of "
                        "the callbacks passed to `fit`."
                    )
                if any(item is callback for item in callbacks):
                    return list(callbacks)
            frame = frame.f_back
        return None
    finally:
        del frame


# How far up the stack `fit_callbacks` looks: hook, wrappers, CallbackList.
_CALLER_FRAMES = 12

# Layers known to keep a role's regularizer in their config for their sublayers.
_CONFIG_REGULARIZER_LAYERS = ("MultiHeadAttention", "GroupedQueryAttention")


def config_regularizer_attribute(layer: Any, attribute: str) -> str | None:
    """The instance attribute that holds `layer`'s config-level `attribute`.

    For a layer that owns no weight for a role but whose config carries the
    role's regularizer and rebuilds its sublayers from it (`MultiHeadAttention`
    and `GroupedQueryAttention`: `kernel_regularizer`, `bias_regularizer`),
    return the attribute `get_config` reads it from, else `None`.

    Reason: `MultiHeadAttention` keeps it only in the private
    `_kernel_regularizer`/`_bias_regularizer`, which its `get_config` saves
    and its `build` passes to its projection layers; there is no public setter.
    """
    own = vars(layer)
    name = next((n for n in (attribute, f"_{attribute}") if n in own), None)
    known = any(
        cls.__name__ in _CONFIG_REGULARIZER_LAYERS for cls in type(layer).__mro__
    ) and attribute in ("kernel_regularizer", "bias_regularizer")
    if name is None or not sublayers(layer):
        if known:
            raise KerasInternalsChanged(
                f"kerasreg: Keras {keras.__version__} {type(layer).__name__} keeps "
                f"no `{attribute}` or `_{attribute}` attribute (layer "
                f"{layer.name!r}); kerasreg cannot make its penalty survive saving."
            )
        return None
    try:
        saved = layer.get_config().get(attribute, _MISSING)
    except Exception:
        saved = _MISSING
    if saved is _MISSING:
        if known:
            raise KerasInternalsChanged(
                f"kerasreg: Keras {keras.__version__} {type(layer).__name__} no "
                f"longer saves `{attribute}` in its config (layer {layer.name!r})."
            )
        return None
    if saved != keras.regularizers.serialize(own[name]):
        if not known:
            return None
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} {type(layer).__name__} does not "
            f"save `{attribute}` from `{name}` (layer {layer.name!r}); kerasreg "
            "cannot make its penalty survive saving."
        )
    return name


_MISSING = object()


def traced(tensor: Any) -> bool:
    """Whether `tensor` is symbolic: inside a `tf.function` or a JAX trace."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if backend == "jax":
        import jax

        return isinstance(tensor, jax.core.Tracer)
    return False


def nnx_enabled() -> bool:
    """Whether Keras runs JAX models as Flax NNX modules.

    Reason: Flax NNX trainers call the class's `train_step`, not the instance's,
    so decay cannot be folded into the step; `keras.config.is_nnx_enabled` only
    exists since Keras 3.11 (NNX support), and older Keras never enables NNX.
    """
    is_enabled = getattr(keras.config, "is_nnx_enabled", None)
    if is_enabled is None:
        if KERAS_VERSION >= (3, 11):
            raise KerasInternalsChanged(
                f"kerasreg: Keras {keras.__version__} has no "
                "`keras.config.is_nnx_enabled` (present since Keras 3.11); "
                "kerasreg cannot tell whether JAX models run as Flax NNX modules."
            )
        return False
    return bool(is_enabled())


def mean_metric_function(metric: Any) -> tuple[Any, dict[str, Any]]:
    """The per-sample function of a `keras.metrics.MeanMetricWrapper` and its kwargs.

    Reason: `sweep`'s vectorised engine evaluates one metric for K variants
    at once; `MeanMetricWrapper` (accuracy, MSE, crossentropy, ...) keeps its
    per-sample function in `_fn` and `_fn_kwargs` (Keras 3.0 to 3.15 at
    least) and has no public accessor.
    """
    fn = getattr(metric, "_fn", None)
    kwargs = getattr(metric, "_fn_kwargs", None)
    if not callable(fn) or not isinstance(kwargs, dict):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} MeanMetricWrapper "
            f"{getattr(metric, 'name', metric)!r} has no `_fn`/`_fn_kwargs`; "
            "kerasreg.sweep cannot vectorise its metrics on this Keras version."
        )
    return fn, dict(kwargs)


def per_sample_loss(fn: Any) -> Any:
    """A Keras `Loss` with reduction "none" around a loss function, as `compile` wraps it.

    Reason: `compile(loss="mse")` wraps the function in Keras's
    `LossFunctionWrapper` (which also aligns the ranks of `y_true` and
    `y_pred`); the class is not exported under `keras.losses`.
    """
    try:
        from keras.src.losses.losses import LossFunctionWrapper
    except ImportError:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} has no "
            "keras.src.losses.losses.LossFunctionWrapper; kerasreg.sweep cannot "
            "vectorise a loss given as a function on this Keras version."
        ) from None
    return LossFunctionWrapper(fn, reduction="none")


def weight_decay_exclusions(optimizer: Any, weights: list[Any]) -> tuple[list, list]:
    """What `optimizer.exclude_from_weight_decay` was told: `(var_names, indices)`.

    `var_names` is a list of regular expressions (empty: none), `indices` the
    positions in `weights` of the variables excluded by `var_list`.

    Reason: `sweep` gives each variant a fresh optimizer from the template's
    config, and `get_config` drops these exclusions (Keras 3.8 to 3.15 keep
    them in `_exclude_from_weight_decay_pattern` and, by `_var_key`, in
    `_exclude_from_weight_decay`); losing them would silently decay biases.
    """
    pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
    keys = getattr(optimizer, "_exclude_from_weight_decay", None) or set()
    var_key: Any = getattr(optimizer, "_var_key", None)
    if not hasattr(optimizer, "exclude_from_weight_decay") or (
        keys and var_key is None
    ):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} optimizers keep weight-decay "
            "exclusions differently; kerasreg.sweep cannot copy them."
        )
    names = [] if pattern is None else [pattern.pattern]
    indices = [i for i, w in enumerate(weights) if keys and var_key(w) in keys]
    return names, indices


def metric_directions(model: Any) -> dict[str, str]:
    """`{name: "up" | "down"}` for the compiled metrics of `model` that declare one.

    Reason: Keras's `EarlyStopping`/`ModelCheckpoint` decide `mode="auto"` from
    a metric object's `_direction` (Keras 3.8 to 3.15: `"up"` for accuracy,
    AUC, R2, cosine similarity, ...; `"down"` for errors), found in the
    compiled metrics' containers (`CompileMetrics`, `MetricsList`); there is
    no public accessor. `SweepResult.best` follows the same rule. Metrics not
    built yet (before the first step) are not listed.
    """
    try:
        from keras.src.trainers.compile_utils import CompileMetrics, MetricsList
    except ImportError:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} has no "
            "keras.src.trainers.compile_utils.CompileMetrics/MetricsList; "
            "SweepResult.best cannot read metric directions (pass mode=)."
        ) from None
    if getattr(keras.metrics.Accuracy(), "_direction", None) != "up":
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} metrics keep no `_direction`; "
            "SweepResult.best cannot read metric directions (pass mode=)."
        )
    found = []
    for metric in getattr(model, "metrics", None) or []:
        if isinstance(metric, (CompileMetrics, MetricsList)):
            found.extend(metric.metrics)
    return {
        m.name: m._direction
        for m in found
        if getattr(m, "_direction", None) in ("up", "down")
    }


def compiled_loss(model: Any, x: Any = None, y: Any = None) -> Any:
    """The loss `model.compile` built from `loss` and `loss_weights`, or None.

    It is the compiled data loss only: no `model.losses` (weight penalties,
    activity regularizers, `add_loss`). When it has not been built yet (no
    `fit` or `evaluate` so far), it is built here from the structure of `x`
    and `y` (symbolic tensors, nothing is computed), as Keras's first step
    would build it, so that a later traced call creates no variable.

    Reason: Keras keeps it in `model._compile_loss` (Keras 3.0 to 3.15) and
    has no public accessor; `compute_loss` adds `model.losses` to it.
    """
    if not hasattr(model, "_compile_loss"):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} models have no `_compile_loss`; "
            "kerasreg cannot compute the compiled data loss on this Keras version."
        )
    loss = model._compile_loss
    if loss is None or getattr(loss, "built", True) or x is None:
        return loss
    build = getattr(loss, "build", None)
    if build is None:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__}'s compiled loss has no `build`."
        )

    def spec(value: Any) -> Any:
        if value is None:
            return None
        dtype = keras.backend.standardize_dtype(value.dtype)
        return keras.KerasTensor(tuple(value.shape), dtype)

    y_pred = model.compute_output_spec(keras.tree.map_structure(spec, x))
    build(keras.tree.map_structure(spec, y), y_pred)
    return loss


def data_batches(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    batch_size: int | None = None,
    steps: int | None = None,
) -> Any:
    """Yield `(x, y, sample_weight)` batches of anything `fit` accepts, in order.

    Arrays (and nested structures of them) in batches of `batch_size` (the
    last one may be smaller), a `tf.data.Dataset`, a `keras.utils.PyDataset`
    or a generator as they come; at most `steps` batches. Batches are NumPy.

    Reason: Keras turns these inputs into batches with its data adapters
    (`keras.src.trainers.data_adapters.get_data_adapter`, Keras 3.0 to 3.15);
    there is no public equivalent.
    """
    try:
        from keras.src.trainers.data_adapters import get_data_adapter
    except ImportError:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} has no "
            "keras.src.trainers.data_adapters.get_data_adapter; kerasreg cannot "
            "read batches of data on this Keras version."
        ) from None
    adapter = get_data_adapter(
        x, y, sample_weight, batch_size=batch_size, steps_per_epoch=steps, shuffle=False
    )
    if not hasattr(adapter, "get_numpy_iterator"):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} data adapters have no "
            "`get_numpy_iterator`."
        )
    begin = getattr(adapter, "on_epoch_begin", None)
    if begin is not None:
        begin()
    try:
        for index, batch in enumerate(adapter.get_numpy_iterator()):
            if steps is not None and index >= steps:
                break
            yield keras.utils.unpack_x_y_sample_weight(batch)
    finally:
        end = getattr(adapter, "on_epoch_end", None)
        if end is not None:
            end()


def gradient_accumulators(optimizer: Any, variables: list[Any]) -> list[Any]:
    """The gradient accumulator variable of each of `variables`, in order.

    For an optimizer with `gradient_accumulation_steps` (directly or inside a
    `LossScaleOptimizer`): before the batch that updates, each holds the sum
    of the gradients of the window's earlier batches.

    Reason: Keras keeps them in the optimizer's `_accumulated_gradients`,
    indexed by `_get_variable_index` (Keras 3.8 to 3.15), with no accessor.
    """
    owner = next(
        (
            candidate
            for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None))
            if getattr(candidate, "gradient_accumulation_steps", None)
        ),
        None,
    )
    if owner is None:
        raise ValueError("gradient_accumulators: the optimizer accumulates nothing.")
    accumulated = getattr(owner, "_accumulated_gradients", None)
    index = getattr(owner, "_get_variable_index", None)
    # A plain list (TensorFlow's tracking wraps it in a ListWrapper).
    if not hasattr(accumulated, "__getitem__") or not callable(index):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} optimizers keep accumulated "
            "gradients differently (no `_accumulated_gradients` list or "
            "`_get_variable_index`); kerasreg cannot read the gradient they apply."
        )
    return [accumulated[index(v)] for v in variables]  # type: ignore[index]


def record_fit_validation(model: Any, record: Any) -> None:
    """Call `record(x, y, sample_weight, batch_size, steps)` with the validation
    data each time `fit` evaluates it, until `forget_fit_validation(model)`.

    Reason: Keras gives callbacks no handle on `fit`'s validation data; `fit`
    evaluates it with `self.evaluate(x=..., y=..., sample_weight=...,
    batch_size=..., steps=..., _use_cached_eval_dataset=True)` (Keras 3.0 to
    3.15, every backend), so an instance-level `evaluate` sees it. Calls
    without that private flag (a user's own `evaluate`) are not recorded.
    """
    forget_fit_validation(model)
    evaluate = model.evaluate

    def evaluate_and_record(*args: Any, **kwargs: Any) -> Any:
        result = evaluate(*args, **kwargs)
        if kwargs.get("_use_cached_eval_dataset") and not args:
            record(
                kwargs.get("x"),
                kwargs.get("y"),
                kwargs.get("sample_weight"),
                kwargs.get("batch_size"),
                kwargs.get("steps"),
            )
        return result

    evaluate_and_record.kerasreg_records_validation = True  # type: ignore[attr-defined]
    model.evaluate = evaluate_and_record


def forget_fit_validation(model: Any) -> None:
    """Undo `record_fit_validation`."""
    current = vars(model).get("evaluate")
    if getattr(current, "kerasreg_records_validation", False):
        delattr(model, "evaluate")


def functional_graph(model: Any) -> tuple[Any, list[tuple[Any, Any, Any, list]]]:
    """`(functional, calls)`: the functional form of `model` and its layer calls.

    `functional` is `model` itself (a functional model) or the functional
    model a `Sequential` built with `keras.Input` runs (`model._functional`);
    `calls` lists `(operation, args, kwargs, outputs)` for every call of the
    graph but its inputs, in an order that computes each input of a call
    first (deepest nodes first, as Keras runs them); `args` and `kwargs` hold
    `keras.KerasTensor`s where the call received tensors.

    Reason: `sweep`'s vectorized engine runs the template's graph with a
    batched kernel for each layer; Keras runs it from `_nodes_by_depth`
    (`Node.operation`, `.arguments.args/.kwargs`, `.outputs`, `.is_input`;
    Keras 3.0 to 3.15 at least) and has no public walk.
    """
    functional = model
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            return None, []
    by_depth = getattr(functional, "_nodes_by_depth", None)
    if not isinstance(by_depth, dict):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} functional models have no "
            "`_nodes_by_depth`; kerasreg.sweep cannot walk the template's graph."
        )
    calls = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            try:
                if node.is_input or node.operation is None:
                    continue
                arguments = node.arguments
                calls.append(
                    (node.operation, arguments.args, arguments.kwargs, node.outputs)
                )
            except AttributeError as error:
                raise KerasInternalsChanged(
                    f"kerasreg: Keras {keras.__version__} graph nodes changed "
                    f"({error}); kerasreg.sweep cannot walk the template's graph."
                ) from None
    return functional, calls


def standardize_inputs(functional: Any, inputs: Any) -> list[Any]:
    """`inputs` as the flat list of tensors `functional` computes with.

    Reason: a functional model matches a list or dict of inputs to its
    `keras.Input`s, converts them to their dtypes and adjusts their ranks in
    `_standardize_inputs` (Keras 3.0 to 3.15 at least); `sweep`'s vectorized
    engine must read the template's inputs exactly as the template does.
    """
    method = getattr(functional, "_standardize_inputs", None)
    if method is None:
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} functional models have no "
            "`_standardize_inputs`; kerasreg.sweep cannot read the inputs."
        )
    return list(method(inputs))


def set_gradient_clipping(optimizer: Any, clip: Any) -> None:
    """Make `optimizer` clip its gradients with `clip(grads) -> grads`.

    Reason: `sweep`'s vectorized engine trains K variants' weights as slices
    of one variable; `clipnorm` and `global_clipnorm` must act on each
    variant's slices, not on the whole variable. Every Keras optimizer clips
    in `_clip_gradients(grads)` (Keras 3.0 to 3.15 at least, all backends),
    right before weight decay and the update.
    """
    if not callable(getattr(type(optimizer), "_clip_gradients", None)):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} optimizers have no "
            "`_clip_gradients`; kerasreg.sweep cannot clip each variant's "
            "gradients on its own."
        )
    optimizer._clip_gradients = clip


def prepare_jax_step(model: Any) -> None:
    """Make `model.train_step(state, data)` callable outside `fit` on JAX.

    Reason: Keras 3.8's JAX `train_step`/`test_step`/`predict_step` end by
    constraining the state to the shardings `fit` records first
    (`_record_training_state_sharding_spec`, Keras 3.8 to 3.10 at least);
    later versions record nothing. `sweep`'s mapped engine calls a copy's
    step inside its own, so it records them the way `fit` does.
    """
    record = getattr(model, "_record_training_state_sharding_spec", None)
    if record is not None:
        record()
        return
    if hasattr(model, "_enforce_jax_state_sharding"):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__}'s JAX trainer constrains its state "
            "to shardings it no longer records with "
            "`_record_training_state_sharding_spec`; kerasreg.sweep cannot call a "
            "model's train step outside fit on this Keras version."
        )


def lstm_bias_with_inputs() -> bool:
    """True where Keras's LSTM adds the bias to the input projection, `(x W +
    b) + h U`, instead of the cell's `(x W + h U) + b`.

    Reason: on the torch backend without CUDA, recent Keras (3.15)'s `LSTM` (also in
    a `Bidirectional`) runs `keras.src.backend.torch.rnn._fallback_lstm`,
    which pre-computes `x W + b` for all steps; older versions and the other
    backends (without cuDNN) run `LSTMCell.call`. The two round differently
    (1e-9), which Adam can amplify over a few steps; a batched LSTM must add
    in the same order as the layer it stands for.
    """
    if keras.backend.backend() != "torch":
        return False
    try:
        from keras.src.backend.torch import rnn
    except ImportError:  # pragma: no cover - a Keras without that module
        return False
    return hasattr(rnn, "_fallback_lstm")


def compile_arguments(model: Any) -> dict[str, Any]:
    """The arguments of `model`'s last `compile`, as given (objects, not configs).

    Reason: `get_compile_config()` serializes them, and some Keras configs drop
    arguments (Keras 3.15: `Huber`'s `delta`, `CosineSimilarity`'s and
    `SparseCategoricalCrossentropy`'s `axis`), so a model compiled from the
    config may compute another loss. Keras keeps the arguments in
    `model._compile_config.config` (Keras 3.0 to 3.15).
    """
    config = getattr(getattr(model, "_compile_config", None), "config", None)
    if not isinstance(config, dict):
        raise KerasInternalsChanged(
            f"kerasreg: Keras {keras.__version__} models keep their compile "
            "arguments differently; kerasreg.sweep cannot copy them."
        )
    return config


def function_arguments(wrapper: Any) -> dict[str, Any] | None:
    """The keyword arguments a Keras loss or metric passes to its function
    (`Huber(delta=0.3)` -> `{"delta": 0.3}`), or None if it wraps no function.

    Reason: Keras's `LossFunctionWrapper` and `MeanMetricWrapper` keep them in
    `_fn_kwargs` (Keras 3.0 to 3.15), and their `get_config` may drop some.
    """
    arguments = getattr(wrapper, "_fn_kwargs", None)
    return dict(arguments) if isinstance(arguments, dict) else None


def build_compiled(model: Any, x: Any, y: Any, prediction: Any = None) -> None:
    """Create `model`'s compiled loss and metric variables as Keras's `fit`
    does (`Trainer._symbolic_build`): on symbolic tensors shaped like `x` and
    `y`, so their state is that of a fresh build (an eager call would add
    the batch to a metric that never resets). `prediction`: the model's
    output for `x` (default: the model's own, symbolically)."""
    from keras.src import backend as backend_src

    def symbolic(value):
        if value is None:
            return None
        return keras.KerasTensor(
            tuple(value.shape), keras.backend.standardize_dtype(value.dtype)
        )

    xs = keras.tree.map_structure(symbolic, x)
    ys = keras.tree.map_structure(symbolic, y)
    if prediction is None:
        prediction = backend_src.compute_output_spec(model, xs, training=False)
    else:
        prediction = keras.tree.map_structure(symbolic, prediction)
    backend_src.compute_output_spec(
        model.compute_metrics, xs, ys, prediction, sample_weight=None
    )
    backend_src.compute_output_spec(
        lambda *args: model.compute_loss(*args, training=False), xs, ys, prediction
    )
