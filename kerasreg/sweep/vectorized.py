"""The vectorized engine of `sweep` on batched kernels: K variants as one model.

Every weight of the template becomes one variable with a leading axis of
size K (variant k is the slice `[k]`), and every layer a batched kernel
(`kerasreg.sweep.kernels`) that computes the K variants' copies at once: one
step of one model trains the K variants.

Why this is K separate fits: the loss is `sum_k loss_k`, and `loss_k` reads
only the slices `[k]`, so the gradient of slice k is variant k's own
gradient. The optimizers accepted here (`ELEMENTWISE`) update each element
from its own gradient and slots only (and shared scalars: learning rate,
step count); `clipnorm` and `global_clipnorm` are computed on each variant's
slices (the norm of its own gradient), as its own optimizer computes them.
Each variant's loss is its data loss plus its own penalties on its own
slices, each penalty's own formula.

Losses and metrics: Keras's losses and metrics known to compute each
sample on its own (`PER_SAMPLE`) are evaluated once on the K variants'
predictions folded into one batch. Anything else (a user's function, a
`Loss` or `Metric` subclass, several outputs, sample weights) is computed
for each variant on its own predictions by a *head*: a weightless model with
the template's outputs, compiled like the template, so that variant k's loss
and metrics are Keras's own computation on variant k's outputs.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kerasreg import _compat
from kerasreg.penalties import ElasticNetPenalty, L1Penalty, L2Penalty
from kerasreg.sweep import stopping
from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.data import has_sample_weights, peek, sample_batch
from kerasreg.sweep.kernels import (
    KERNELS,
    Untracked,
    Value,
    repeated_names,
    with_logits,
)
from kerasreg.sweep.stacked import fit_stack
from kerasreg.sweep.variants import compile_arguments, fresh_optimizer

PREPARE = "first"  # what fit needs beforehand (kerasreg.sweep.engines)
NAME = "vectorized"

# Optimizers whose update of an element reads only that element's gradient
# and slots (plus shared scalars: learning rate, step count).
ELEMENTWISE = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Adamax,
    keras.optimizers.Nadam,
    keras.optimizers.RMSprop,
    keras.optimizers.Adagrad,
    keras.optimizers.Adadelta,
    keras.optimizers.Ftrl,
    keras.optimizers.Lion,
)
_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum")

# Keras's loss and metric functions that compute each sample on its own
# (they reduce the last axis at most): one call on a batch of K variants'
# predictions is each variant's call.
_PER_SAMPLE_NAMES = (
    "mean_squared_error",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
    "cosine_similarity",
    "huber",
    "log_cosh",
    "hinge",
    "squared_hinge",
    "categorical_hinge",
    "kl_divergence",
    "poisson",
    "binary_crossentropy",
    "binary_focal_crossentropy",
    "categorical_crossentropy",
    "categorical_focal_crossentropy",
    "sparse_categorical_crossentropy",
    "accuracy",
    "binary_accuracy",
    "categorical_accuracy",
    "sparse_categorical_accuracy",
    "top_k_categorical_accuracy",
    "sparse_top_k_categorical_accuracy",
)
PER_SAMPLE = {
    fn
    for name in _PER_SAMPLE_NAMES
    for module in (keras.losses, keras.metrics)
    if (fn := getattr(module, name, None)) is not None
}
_PER_SAMPLE_LOSSES = {
    cls
    for name in (
        "MeanSquaredError",
        "MeanAbsoluteError",
        "MeanAbsolutePercentageError",
        "MeanSquaredLogarithmicError",
        "CosineSimilarity",
        "Huber",
        "LogCosh",
        "Hinge",
        "SquaredHinge",
        "CategoricalHinge",
        "KLDivergence",
        "Poisson",
        "BinaryCrossentropy",
        "BinaryFocalCrossentropy",
        "CategoricalCrossentropy",
        "CategoricalFocalCrossentropy",
        "SparseCategoricalCrossentropy",
    )
    if (cls := getattr(keras.losses, name, None)) is not None
}


def coefficients(penalty: Any) -> tuple[float, float, float] | None:
    """`(c_abs, c_signabs, c_square)` of a penalty, or None when not a known form.

    `c_abs` multiplies `sum(abs(w))` (Keras's L1 and L1L2), `c_signabs`
    multiplies `sum(sign(w) * w)` (kerasreg's L1 terms, whose gradient at 0
    is 0 on every backend), and `c_square` multiplies `sum(w**2)`. Only the
    exact classes are accepted: a subclass may change the formula.
    """
    kind = type(penalty)
    if penalty is None:
        return (0.0, 0.0, 0.0)
    if kind is L1Penalty:
        return (0.0, penalty.l1, 0.0)
    if kind is L2Penalty:
        return (0.0, 0.0, penalty.l2)
    if kind is ElasticNetPenalty:
        return (0.0, penalty.l1, penalty.l2)
    if kind is keras.regularizers.L1:
        return (float(penalty.l1), 0.0, 0.0)
    if kind is keras.regularizers.L2:
        return (0.0, 0.0, float(penalty.l2))
    if kind is keras.regularizers.L1L2:
        return (float(penalty.l1), 0.0, float(penalty.l2))
    return None


# --- can it? ----------------------------------------------------------------------


def _is_functional(model: keras.Model) -> bool:
    kind = type(model)
    return kind is keras.Sequential or (
        kind.__name__ == "Functional" and kind.__module__.startswith("keras.")
    )


def why_not(
    template: keras.Model, variants: list[keras.Model], context: SweepContext
) -> str | None:
    """Why batched kernels cannot train these variants (None: they can, exactly)."""
    if context.distribution is not None:
        return "a keras.distribution is set"
    if context.backend == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return "a tf.distribute strategy is active"
    # The variants are compiled later, each with an optimizer made from the
    # template's config (Keras 3.8's clone_model does not compile the clone).
    optimizer = template.optimizer
    # Keras's own classes only (the torch backend subclasses each per backend):
    # a user's subclass may couple elements.
    if not isinstance(optimizer, ELEMENTWISE) or not type(
        optimizer
    ).__module__.startswith("keras."):
        return (
            f"the optimizer {type(optimizer).__name__} is not known to update "
            "each element on its own"
        )
    if not _is_functional(template):
        return (
            f"the template is a {type(template).__name__} (a subclassed model: "
            "its code is not known)"
        )
    reason = _graph_reason(variants[0])
    if reason:
        return reason
    reason = _renamed_reason(template, optimizer)
    if reason:
        return reason
    if context.backend == "tensorflow" and not _linear(optimizer):
        _, calls = _compat.functional_graph(variants[0])
        if any(isinstance(op, keras.layers.Embedding) for op, *_ in calls):
            # A separate fit's embedding gradient is a tf.IndexedSlices: Keras
            # squares and clips its rows before duplicates are summed.
            return (
                "on TensorFlow an Embedding's gradient is sparse (tf.IndexedSlices), "
                f"which {type(optimizer).__name__} (or gradient clipping) updates "
                "row by row; only plain SGD is batched"
            )
    for variant in variants:
        reason = _penalty_reason(variant)
        if reason:
            return reason
    return stopping.why_not(
        template, list(context.fit_kwargs.get("callbacks") or []), own_optimizers=False
    )


def _renamed_reason(template: keras.Model, optimizer) -> str | None:
    """A layer with two weights of one name (a `Bidirectional`'s cells) gets
    renamed stacked weights (`Kernel`); the optimizer's weight-decay
    exclusions by name would then match other weights than in a separate fit."""
    names, _ = _compat.weight_decay_exclusions(optimizer, template.weights)
    if not names:
        return None
    _, calls = _compat.functional_graph(template)
    for layer, *_ in calls:
        twice = repeated_names(layer)
        if twice:
            return (
                f"the optimizer excludes weights from weight decay by name and "
                f"layer {layer.name!r} has two weights named {twice[0]!r} (the "
                "batched kernel renames them)"
            )
    return None


def _linear(optimizer) -> bool:
    """Whether the update is linear in the gradient (SGD, with momentum, unclipped)."""
    return type(optimizer).__name__ == "SGD" and not (
        optimizer.clipnorm or optimizer.global_clipnorm or optimizer.clipvalue
    )


def _graph_reason(model: keras.Model) -> str | None:
    functional, calls = _compat.functional_graph(model)
    if functional is None:
        return "the template has no known input"
    # The policy first: Keras 3.8 adds Cast operations to a mixed-precision graph.
    for operation, *_ in calls:
        if not isinstance(operation, keras.layers.Layer):
            continue
        if operation.dtype_policy.name != "float32":
            return f"layer {operation.name!r} computes in {operation.dtype_policy.name}"
    for operation, args, kwargs, _ in calls:
        name = getattr(operation, "name", type(operation).__name__)
        kind = type(operation)
        if not isinstance(operation, keras.layers.Layer):
            return f"operation {name!r} ({kind.__name__}) is not a Keras layer"
        kernel = KERNELS.get(kind)
        if kernel is None:
            if isinstance(operation, keras.Model):
                return f"layer {name!r} is a nested model"
            return f"layer {name!r} ({kind.__name__}) has no batched kernel"
        reason = kernel.why_not(operation)
        if reason:
            return f"layer {name!r} ({kind.__name__}) {reason}"
        if operation.activity_regularizer is not None:
            return f"layer {name!r} has an activity regularizer"
        extra = {k for k, v in kwargs.items() if k != "training" and v is not None}
        if extra:
            return f"layer {name!r} is called with {sorted(extra)}"
        flat = keras.tree.flatten(args)
        if not flat or not all(isinstance(a, keras.KerasTensor) for a in flat):
            return f"layer {name!r} is called with arguments that are not tensors"
        reason = kernel.why_not_inputs(operation, flat)
        if reason:
            return f"layer {name!r} ({kind.__name__}) {reason}"
    return None


def _penalty_reason(model: keras.Model) -> str | None:
    for variable in model.trainable_weights:
        penalty = variable.regularizer
        if penalty is None or coefficients(penalty) is not None:
            continue
        try:
            value = penalty(variable.value)
            float(ops.convert_to_numpy(value))
        except Exception as error:  # a regularizer that needs the variable itself
            return (
                f"the penalty {type(penalty).__name__} on {variable.path!r} cannot "
                f"be computed on a slice of a stacked weight ({error})"
            )
    return None


# --- losses and metrics -----------------------------------------------------------


def _folded_loss(compiled: keras.Model) -> tuple[Any, str] | None:
    """The compiled loss with reduction "none", and the reduction it replaces;
    None unless it is a single Keras loss known to compute each sample alone."""
    if len(compiled.outputs) != 1:
        return None
    if compiled.get_compile_config().get("loss_weights") is not None:
        return None
    identifier = compiled.loss
    if isinstance(identifier, (list, tuple, dict)):
        if len(identifier) != 1:
            return None
        identifier = next(
            iter(identifier.values() if isinstance(identifier, dict) else identifier)
        )
    if isinstance(identifier, str):
        if identifier.lower() in ("crossentropy", "ce"):
            return None
        identifier = keras.losses.get(identifier)
    if type(identifier) in _PER_SAMPLE_LOSSES:
        # The arguments themselves: a config may drop some (Huber's delta).
        arguments = _compat.function_arguments(identifier)
        reduction = getattr(identifier, "reduction", None)
        if arguments is None or reduction not in _REDUCTIONS:
            return None
        if arguments.get("axis", -1) != -1:
            return None
        if arguments.get("ignore_class") is not None:
            # Keras masks the ignored samples and divides by the others' count.
            return None
        # A shallow copy by hand: copy.copy goes through the config as well.
        per_sample = object.__new__(type(identifier))
        per_sample.__dict__.update(vars(identifier))
        per_sample.reduction = "none"
        return per_sample, reduction
    if identifier in PER_SAMPLE:
        return _compat.per_sample_loss(identifier), "sum_over_batch_size"
    return None


def _folded_metrics(compiled: keras.Model) -> list[tuple[str, Any, dict]] | None:
    """`(name, per-sample fn, kwargs)` of each compiled metric, in Keras's order;
    None unless each is a mean of a Keras function known to compute each sample alone."""
    if len(compiled.outputs) != 1:
        return None
    if compiled.get_compile_config().get("weighted_metrics"):
        return None
    found = []
    names = [k for k in compiled.get_metrics_result() if k != "loss"]
    for metric in compiled.metrics:
        if metric.name == "loss":
            continue
        for inner in getattr(metric, "metrics", [metric]):
            if not isinstance(inner, keras.metrics.MeanMetricWrapper) or any(
                # A subclass with its own update, result or reset is not a mean.
                getattr(type(inner), method)
                is not getattr(keras.metrics.MeanMetricWrapper, method)
                for method in ("update_state", "result", "reset_state")
            ):
                return None
            fn, kwargs = _compat.mean_metric_function(inner)
            if fn not in PER_SAMPLE or kwargs.get("axis", -1) != -1:
                return None
            found.append((inner.name, fn, kwargs))
    if [name for name, _, _ in found] != names:
        return None
    return found


def _head(compiled: keras.Model, compile_config: dict) -> keras.Model:
    """A weightless model with `compiled`'s outputs, compiled with its loss and metrics."""
    functional, _ = _compat.functional_graph(compiled)
    names = list(functional.output_names)
    inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=name)
        for t, name in zip(functional.outputs, names, strict=True)
    ]
    outputs = keras.tree.pack_sequence_as(functional.output, inputs)
    head = keras.Model(inputs, outputs, name=f"{compiled.name}_head")
    config = compile_arguments(compile_config)
    config["optimizer"] = "sgd"  # never used: the head has no weights
    for key in ("steps_per_execution", "jit_compile", "run_eagerly"):
        config.pop(key, None)
    head.compile(**config)
    return head


class _VectorMean(keras.metrics.Metric):
    """K running means at once (Keras's `Mean`, one per variant)."""

    def __init__(self, k: int, name: str):
        super().__init__(name=name)
        self.total = self.add_variable(shape=(k,), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, sums, count):
        self.total.assign_add(ops.cast(sums, self.dtype))
        self.count.assign_add(ops.cast(count, self.dtype))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)


# --- the batched model -------------------------------------------------------------


class Batched(keras.Model):
    """K variants of one template as one model of `(K, ...)` weights.

    Args:
        variants: the K variants, compiled like the template and built on
            a sample (their loss and metrics exist).
        sample: `(x, y)` of a few samples, to build the heads.
        folded: whether the losses and metrics may be folded (no sample or
            class weights).
    """

    def __init__(self, variants, compile_config, sample, folded=True):
        super().__init__(name="kerasreg_sweep")
        self.k = len(variants)
        self._variants = Untracked(variants)
        first = variants[0]
        functional, calls = _compat.functional_graph(first)
        self._functional = Untracked(functional)
        self._calls = Untracked(calls)
        trainable = {id(v) for v in first.trainable_weights}
        kernels = []
        kernel_of = {}
        for operation, _, _, _ in calls:
            if id(operation) in kernel_of:
                continue  # a shared layer: one kernel, called at each use
            copies = [v.get_layer(operation.name) for v in variants]
            kernel = KERNELS[type(operation)](copies, trainable)
            kernels.append(kernel)
            kernel_of[id(operation)] = kernel
        self.kernels = kernels
        self._kernel_of = Untracked(kernel_of)
        stacked_of = {}
        for kernel in kernels:
            for stacked, sources in kernel.pairs:
                stacked_of[id(sources[0])] = stacked
        self._stacked_of = Untracked(stacked_of)
        self._penalties = Untracked(self._penalty_terms(variants, trainable))

        self.loss_tracker = _VectorMean(self.k, "loss")
        self.folded_loss = _folded_loss(first) if folded else None
        self.folded_metrics = _folded_metrics(first) if folded else None
        self.metric_trackers = [
            _VectorMean(self.k, name) for name, _, _ in self.folded_metrics or []
        ]
        self.heads = []
        if self.folded_loss is None or self.folded_metrics is None:
            self.heads = [_head(first, compile_config) for _ in range(self.k)]
            prediction = first(sample[0])
            for head in self.heads:
                _compat.build_compiled(head, sample[0], sample[1], prediction)
        self.keys = [f"v{i:04d}" for i in range(self.k)]
        self.built = True

    def stacked_weights(self) -> list[keras.Variable]:
        """Variant 0's `weights`, each as its stacked `(K, ...)` variable."""
        return [self._stacked_of.value[id(v)] for v in self._variants.value[0].weights]

    # --- penalties ------------------------------------------------------------------

    def _penalty_terms(self, variants, trainable):
        """`(stacked variable, vectors or penalties)` for each penalized weight."""
        terms = []
        for index, variable in enumerate(variants[0].weights):
            if id(variable) not in trainable:
                continue  # Keras penalizes trainable weights only
            penalties = [v.weights[index].regularizer for v in variants]
            if all(p is None for p in penalties):
                continue
            stacked = self._stacked_of.value[id(variable)]
            rows = [coefficients(p) for p in penalties]
            if all(row is not None for row in rows):
                vectors = [
                    np.asarray(column, "float32") if any(column) else None
                    for column in zip(*rows, strict=True)
                ]
                terms.append((stacked, vectors, None))
            else:
                terms.append((stacked, None, penalties))
        return terms

    def penalties(self):
        """The `(K,)` vector of each variant's penalty, or None."""
        total = None
        for stacked, vectors, penalties in self._penalties.value:
            if vectors is not None:
                axes = tuple(range(1, len(stacked.shape)))
                for c, term in zip(
                    vectors,
                    (ops.absolute, lambda w: ops.sign(w) * w, ops.square),
                    strict=True,
                ):
                    if c is None:
                        continue
                    value = ops.multiply(c, ops.sum(term(stacked.value), axis=axes))
                    total = value if total is None else total + value
            else:
                value = ops.stack(
                    [
                        ops.zeros((), "float32")
                        if p is None
                        else ops.cast(ops.sum(p(stacked.value[i])), "float32")
                        for i, p in enumerate(penalties)
                    ]
                )
                total = value if total is None else total + value
        return total

    # --- forward ----------------------------------------------------------------------

    def call(self, inputs, training=None):
        functional = self._functional.value
        flat = _compat.standardize_inputs(functional, inputs)
        table = {
            id(t): Value(x, False) for t, x in zip(functional.inputs, flat, strict=True)
        }
        for operation, args, kwargs, outputs in self._calls.value:
            values = [
                table[id(t)]
                for t in keras.tree.flatten(args)
                if isinstance(t, keras.KerasTensor)
            ]
            mode = training if training is not None else kwargs.get("training")
            result = self._kernel_of.value[id(operation)].apply(values, mode)
            results = result if isinstance(result, list) else [result]
            for tensor, value in zip(outputs, results, strict=True):
                table[id(tensor)] = value
        return keras.tree.pack_sequence_as(
            functional.output,
            [table[id(t)].per_variant(self.k) for t in functional.outputs],
        )

    # --- loss and metrics ---------------------------------------------------------------

    def _slice(self, y_pred, index):
        return keras.tree.map_structure(
            lambda t: with_logits(t[index], t, lambda x: x[index]), y_pred
        )

    def _fold(self, y, y_pred):
        """y tiled K times and y_pred (K, b, ...) folded to (K*b, ...): one batch."""
        y = ops.convert_to_tensor(y)
        y_true = ops.tile(y, [self.k] + [1] * (len(y.shape) - 1))

        def fold(x):
            return ops.reshape(x, (-1, *ops.shape(x)[2:]))

        return y_true, with_logits(fold(y_pred), y_pred, fold)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if self.folded_loss is not None:
            per_sample, reduction = self.folded_loss
            y_true, folded = self._fold(y, y_pred)
            values = ops.reshape(per_sample(y_true, folded), (self.k, -1))
            data = ops.sum(values, axis=1)
            if reduction != "sum":
                data = data / ops.cast(ops.shape(values)[1], data.dtype)
        else:
            data = ops.stack(
                [
                    ops.cast(
                        head.compute_loss(
                            x, y, self._slice(y_pred, i), sample_weight, training
                        ),
                        "float32",
                    )
                    for i, head in enumerate(self.heads)
                ]
            )
        penalty = self.penalties()
        if penalty is not None:
            data = data + penalty
        batch = ops.shape(keras.tree.flatten(y_pred)[0])[1]
        self.loss_tracker.update_state(data * ops.cast(batch, data.dtype), batch)
        return ops.sum(data)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self.folded_metrics is not None:
            y_true, folded = self._fold(y, y_pred)
            batch = ops.shape(y_pred)[1]
            for (_, fn, kwargs), tracker in zip(
                self.folded_metrics, self.metric_trackers, strict=True
            ):
                values = ops.cast(fn(y_true, folded, **kwargs), tracker.dtype)
                values = ops.reshape(values, (self.k, batch, -1))
                tracker.update_state(ops.sum(ops.mean(values, axis=2), axis=1), batch)
        else:
            for i, head in enumerate(self.heads):
                head.compute_metrics(x, y, self._slice(y_pred, i), sample_weight)
        return self.get_metrics_result()

    @property
    def metrics(self):
        found = list(super().metrics)
        for head in self.heads:
            found.extend(head.metrics)
        unique = {}
        for metric in found:
            unique.setdefault(id(metric), metric)
        return list(unique.values())

    def get_metrics_result(self):
        losses = _entries(self.loss_tracker.result(), self.k)
        logs = {}
        if self.folded_metrics is not None:
            results = [_entries(t.result(), self.k) for t in self.metric_trackers]
            for index, key in enumerate(self.keys):
                logs[f"{key}_loss"] = losses[index]
                for tracker, result in zip(self.metric_trackers, results, strict=True):
                    logs[f"{key}_{tracker.name}"] = result[index]
            return logs
        for index, (key, head) in enumerate(zip(self.keys, self.heads, strict=True)):
            logs[f"{key}_loss"] = losses[index]
            for name, value in head.get_metrics_result().items():
                if name != "loss":
                    logs[f"{key}_{name}"] = value
        return logs

    # --- results ------------------------------------------------------------------------

    def copy_to(self, variants: list[keras.Model]) -> None:
        """Write each variant's slices into its standalone model."""
        for kernel in self.kernels:
            kernel.copy_to()

    def copy_from(self, variants: list[keras.Model], index: int) -> None:
        """Write variant `index`'s standalone model into its slices."""
        for kernel in self.kernels:
            for stacked, sources in kernel.pairs:
                values = np.array(ops.convert_to_numpy(stacked.value))
                values[index] = ops.convert_to_numpy(sources[index].value)
                stacked.assign(values)


# --- per-variant gradient clipping -----------------------------------------------------


def _entries(vector: Any, k: int) -> list:
    """The K entries of a `(K,)` result: sliced in a traced step and on
    PyTorch (whose step is eager: a slice is cheap there, a transfer per step
    is not); when TensorFlow or JAX read the epoch's results eagerly, one
    transfer to the host and K NumPy scalars, not K eager slicing ops."""
    if keras.backend.backend() == "torch" or _compat.traced(vector):
        return [vector[i] for i in range(k)]
    values = np.asarray(ops.convert_to_numpy(vector))
    return [values[i] for i in range(k)]


def _per_variant_clipping(optimizer) -> Any:
    """`clipnorm`/`global_clipnorm`/`clipvalue` of `optimizer`, on each variant's slices."""
    clipnorm = optimizer.clipnorm
    global_clipnorm = optimizer.global_clipnorm
    clipvalue = optimizer.clipvalue

    def squared(g):
        # Per variant: the sum of squares of slice k (a (K,)-shaped gradient
        # is one number per variant).
        if len(g.shape) == 1:
            return ops.square(g)
        return ops.sum(ops.square(g), axis=tuple(range(1, len(g.shape))))

    def expand(v, g):
        return ops.reshape(v, (-1, *[1] * (len(g.shape) - 1)))

    def clip(grads):
        if clipnorm and clipnorm > 0:
            out = []
            for g in grads:
                if g is None:
                    out.append(g)
                    continue
                # Keras's clip_by_norm, with the norm of each slice.
                l2sum = expand(squared(g), g)
                pred = l2sum > 0
                l2sum_safe = ops.where(pred, l2sum, ops.ones_like(l2sum))
                l2norm = ops.where(pred, ops.sqrt(l2sum_safe), l2sum)
                intermediate = ops.multiply(g, clipnorm)
                out.append(
                    ops.convert_to_tensor(intermediate) / ops.maximum(l2norm, clipnorm)
                )
            return out
        if global_clipnorm and global_clipnorm > 0:
            # Keras's clip_by_global_norm, with one norm per variant.
            norms = [squared(g) for g in grads if g is not None]
            use_norm = ops.sqrt(ops.sum(ops.stack(norms), axis=0))
            scale_for_finite = global_clipnorm * ops.minimum(
                1.0 / use_norm, 1.0 / global_clipnorm
            )
            scale = scale_for_finite + (use_norm - use_norm)
            return [g if g is None else g * expand(scale, g) for g in grads]
        if clipvalue and clipvalue > 0:
            return [
                g if g is None else ops.clip(g, -clipvalue, clipvalue) for g in grads
            ]
        return grads

    return clip


# --- the engine --------------------------------------------------------------------------


def describe(template: keras.Model, variants, context) -> str:
    """What runs: the batched kernels, by the classes of the layers they compute."""
    _, calls = _compat.functional_graph(variants[0])
    kinds = dict.fromkeys(type(operation).__name__ for operation, *_ in calls)
    return "batched kernels: " + ", ".join(kinds)


def build(variants, compile_config, exclusions, sample, folded):
    """The batched model of the compiled variants, compiled to train them."""
    batched = Batched(variants, compile_config, sample, folded)
    optimizer = fresh_optimizer(
        compile_config, exclusions, [], variables=batched.stacked_weights()
    )
    if optimizer.clipnorm or optimizer.global_clipnorm:
        _compat.set_gradient_clipping(optimizer, _per_variant_clipping(optimizer))
    batched.compile(
        optimizer=optimizer,
        run_eagerly=compile_config.get("run_eagerly", False),
        steps_per_execution=compile_config.get("steps_per_execution", 1),
        jit_compile=compile_config.get("jit_compile", "auto"),
    )
    return batched


def fit(variants, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Train the compiled variants as one batched model, in one `fit`."""
    first, x = peek(x)
    sample = sample_batch(x, y, first)
    batched = build(
        variants,
        compile_config,
        exclusions,
        sample,
        folded=not has_sample_weights(x, fit_kwargs, first),
    )
    return fit_stack(
        batched,
        variants,
        names,
        logs,
        compile_config,
        fit_kwargs,
        x,
        y,
        batched.copy_to,
        batched.copy_from,
    )
