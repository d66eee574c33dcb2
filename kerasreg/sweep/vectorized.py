"""The vectorised engine of `sweep`: K Dense networks as one network of (K, ...) weights.

For a chain of `Dense` (and stateless activation) layers, the K variants of a
sweep are one model whose every weight has a leading axis of size K: variant
k is the slice `[k]` of each weight. One batched matrix product per layer,
one loss, one metric update and one optimizer update serve all K variants,
so a step costs about what one fit's step costs until compute dominates.

Why this is K separate fits: the stacked loss is `sum_k loss_k`, and
`loss_k` reads only slice k, so the gradient of slice k is variant k's own
gradient; the optimizers accepted here (`_ELEMENTWISE`) update each element
from its own gradient and slots only (per-variable `clipnorm`, or a norm over
the whole variable, would couple the slices and is refused). Penalties are
evaluated as per-variant coefficient vectors times per-slice sums, which is
each penalty's own formula (`l1 * sum|w| + l2 * sum w**2`) on each slice.

Everything else (other layers, penalties, losses, metrics, optimizers, a
distribution) is trained by `sweep`'s general engine: K copies side by side.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kerasreg import _compat
from kerasreg.penalties import ElasticNetPenalty, L1Penalty, L2Penalty

# Optimizers whose update of an element reads only that element's gradient
# and slots (plus shared scalars: learning rate, step count).
_ELEMENTWISE = (
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
# Layers without weights that act on the last axis only.
_STATELESS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
)
_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum")


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


def why_not(
    template: keras.Model, variants: list[keras.Model], compiled: keras.Model
) -> str | None:
    """Why the vectorised engine cannot train these variants (None: it can).

    `compiled` is variant 0 compiled like the template, with its loss and
    metrics built; its optimizer is the template optimizer's copy.
    """
    if keras.distribution.distribution() is not None:
        return "a keras.distribution is set"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return "a tf.distribute strategy is active"
    optimizer = compiled.optimizer
    # Keras's own classes only (the torch backend subclasses each per backend):
    # a user's subclass may couple elements.
    if not isinstance(optimizer, _ELEMENTWISE) or not type(
        optimizer
    ).__module__.startswith("keras."):
        return (
            f"the optimizer {type(optimizer).__name__} is not known to be elementwise"
        )
    if getattr(optimizer, "clipnorm", None):
        return "the optimizer clips each variable by its norm"
    if len(template.inputs) != 1 or len(template.inputs[0].shape) != 2:
        return "the template's input is not one 2-D tensor"
    reason = _chain_reason(template)
    if reason:
        return reason
    if _loss(compiled) is None:
        return "the compiled loss is not a single per-sample Keras loss"
    if _metrics(compiled) is None:
        return "a compiled metric is not a per-sample mean (MeanMetricWrapper)"
    for variant in variants:
        for layer in _layers(variant):
            if not isinstance(layer, keras.layers.Dense):
                continue
            for role in ("kernel_regularizer", "bias_regularizer"):
                if coefficients(getattr(layer, role)) is None:
                    return f"a penalty ({type(getattr(layer, role)).__name__}) has no vector form"
    return None


def _layers(model: keras.Model) -> list[Any]:
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def _chain_reason(model: keras.Model) -> str | None:
    previous = model.inputs[0]
    for layer in _layers(model):
        if isinstance(layer, keras.layers.Dense):
            if getattr(layer, "lora_enabled", False) or getattr(
                layer, "quantization_mode", None
            ):
                return f"layer {layer.name!r} has LoRA or quantized weights"
            if layer.kernel_constraint or layer.bias_constraint:
                return f"layer {layer.name!r} has a weight constraint"
        elif not isinstance(layer, _STATELESS):
            return f"layer {layer.name!r} ({type(layer).__name__}) is not a Dense layer"
        if layer.activity_regularizer is not None:
            return f"layer {layer.name!r} has an activity regularizer"
        if layer.dtype_policy.name != "float32":
            return f"layer {layer.name!r} computes in {layer.dtype_policy.name}"
        try:
            inbound = layer.input
        except (AttributeError, ValueError):  # shared layer: several nodes
            return f"layer {layer.name!r} is used more than once"
        if inbound is not previous:
            return "the template is not a chain of layers"
        previous = layer.output
    if previous is not model.outputs[0]:
        return "the template is not a chain of layers"
    return None


def _loss(compiled: keras.Model) -> tuple[keras.losses.Loss, str] | None:
    """The compiled loss with reduction "none", and the reduction it replaces."""
    identifier = compiled.loss
    if isinstance(identifier, (list, tuple, dict)):
        if len(identifier) != 1:
            return None
        identifier = next(
            iter(identifier.values() if isinstance(identifier, dict) else identifier)
        )
    if isinstance(identifier, str) and identifier.lower() in ("crossentropy", "ce"):
        return None
    if compiled.get_compile_config().get("loss_weights") is not None:
        return None
    try:
        loss = keras.losses.get(identifier)
        if isinstance(loss, keras.losses.Loss):
            reduction = loss.reduction
            config = dict(loss.get_config(), reduction="none")
            per_sample = type(loss).from_config(config)
        elif callable(loss):
            reduction = "sum_over_batch_size"
            per_sample = _compat.per_sample_loss(loss)
        else:
            return None
    except _compat.KerasInternalsChanged:
        raise
    except Exception:  # a custom loss that cannot be re-created: general engine
        return None
    if reduction not in _REDUCTIONS:
        return None
    return per_sample, reduction


def _metrics(compiled: keras.Model) -> list[tuple[str, Any, dict]] | None:
    """`(name, per-sample fn, kwargs)` of each compiled metric, in Keras's order."""
    found = []
    names = [k for k in compiled.get_metrics_result() if k != "loss"]
    for metric in compiled.metrics:
        if metric.name == "loss":
            continue
        for inner in getattr(metric, "metrics", [metric]):
            if (
                not isinstance(inner, keras.metrics.MeanMetricWrapper)
                or type(inner).update_state
                is not keras.metrics.MeanMetricWrapper.update_state
            ):
                return None
            fn, kwargs = _compat.mean_metric_function(inner)
            found.append((inner.name, fn, kwargs))
    if [name for name, _, _ in found] != names:
        return None
    return found


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


class _StackedDense(keras.layers.Layer):
    """K `Dense` layers as one: kernel (K, in, out), bias (K, out)."""

    def __init__(self, k: int, template: keras.layers.Dense, penalties: list, **kwargs):
        super().__init__(name=template.name, **kwargs)
        self.k = k
        self.units = template.units
        self.activation = template.activation
        self.use_bias = template.use_bias
        self.penalty_vectors = {}
        for role in ("kernel", "bias"):
            rows = [coefficients(p[role]) for p in penalties]
            self.penalty_vectors[role] = [
                np.asarray(column, "float32") if any(column) else None
                for column in zip(*rows, strict=True)
            ]

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(self.k, input_shape[-1], self.units),
            initializer="zeros",
            name="kernel",
        )
        self.bias = (
            self.add_weight(
                shape=(self.k, self.units), initializer="zeros", name="bias"
            )
            if self.use_bias
            else None
        )

    def call(self, inputs):
        if len(inputs.shape) == 2:  # the shared input batch: the same rows for each k
            inputs = ops.tile(ops.expand_dims(inputs, 0), [self.k, 1, 1])
        # One batched product (K, b, in) @ (K, in, out); measured faster than einsum.
        x = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            x = ops.add(x, ops.expand_dims(self.bias, 1))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def penalties(self):
        """The (K,) vector of this layer's penalty for each variant, or None."""
        total = None
        for role, weight in (("kernel", self.kernel), ("bias", self.bias)):
            if weight is None:
                continue
            c_abs, c_signabs, c_square = self.penalty_vectors[role]
            axes = tuple(range(1, len(weight.shape)))
            for c, term in (
                (c_abs, ops.absolute),
                (c_signabs, lambda w: ops.sign(w) * w),
                (c_square, ops.square),
            ):
                if c is None:
                    continue
                value = ops.multiply(c, ops.sum(term(weight), axis=axes))
                total = value if total is None else total + value
        return total

    def compute_output_shape(self, input_shape):
        return (self.k, *input_shape[-2:-1], self.units)


class VectorStack(keras.Model):
    """K variants of a Dense chain trained as one model of (K, ...) weights."""

    def __init__(self, template: keras.Model, variants: list[keras.Model], compiled):
        super().__init__(name="kerasreg_sweep")
        self.k = len(variants)
        per_layer = list(zip(*(_layers(v) for v in variants), strict=True))
        self.stages = []
        for layers in per_layer:
            first = layers[0]
            if isinstance(first, keras.layers.Dense):
                roles = [
                    {"kernel": layer.kernel_regularizer, "bias": layer.bias_regularizer}
                    for layer in layers
                ]
                self.stages.append(_StackedDense(self.k, first, roles))
            else:
                self.stages.append(type(first).from_config(first.get_config()))
        # Not None: `why_not` checked both before this engine was chosen.
        self.per_sample_loss, self.reduction = _loss(compiled)  # type: ignore[misc]
        self.metric_functions: list = _metrics(compiled)  # type: ignore[assignment]
        self.loss_tracker = _VectorMean(self.k, "loss")
        self.metric_trackers = [
            _VectorMean(self.k, name) for name, _, _ in self.metric_functions
        ]
        self.keys = [f"v{i:04d}" for i in range(self.k)]
        self.build(template.inputs[0].shape)
        for stage, layers in zip(self.stages, per_layer, strict=True):
            if isinstance(stage, _StackedDense):
                stage.kernel.assign(ops.stack([layer.kernel.value for layer in layers]))
                if stage.bias is not None:
                    stage.bias.assign(ops.stack([layer.bias.value for layer in layers]))

    def build(self, input_shape):
        shape = tuple(input_shape)
        for stage in self.stages:
            stage.build(shape)
            shape = stage.compute_output_shape(shape)
        self.built = True

    def call(self, inputs):
        x = inputs
        for stage in self.stages:
            x = stage(x)
        return x

    def _folded(self, y, y_pred):
        """y tiled K times and y_pred (K, b, ...) folded to (K*b, ...): one batch."""
        y = ops.convert_to_tensor(y)
        y_true = ops.tile(y, [self.k] + [1] * (len(y.shape) - 1))
        y_pred = ops.reshape(y_pred, (-1, *y_pred.shape[2:]))
        return y_true, y_pred

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        y_true, folded = self._folded(y, y_pred)
        values = ops.reshape(self.per_sample_loss(y_true, folded), (self.k, -1))
        data = ops.sum(values, axis=1)
        if self.reduction != "sum":
            data = data / ops.cast(ops.shape(values)[1], data.dtype)
        for stage in self.stages:
            if isinstance(stage, _StackedDense):
                penalty = stage.penalties()
                if penalty is not None:
                    data = data + penalty
        batch = ops.shape(y_pred)[1]
        self.loss_tracker.update_state(data * ops.cast(batch, data.dtype), batch)
        return ops.sum(data)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_true, folded = self._folded(y, y_pred)
        batch = ops.shape(y_pred)[1]
        for (_, fn, kwargs), tracker in zip(
            self.metric_functions, self.metric_trackers, strict=True
        ):
            values = ops.cast(fn(y_true, folded, **kwargs), tracker.dtype)
            values = ops.reshape(values, (self.k, batch, -1))
            tracker.update_state(ops.sum(ops.mean(values, axis=2), axis=1), batch)
        return self.get_metrics_result()

    def get_metrics_result(self):
        trackers = [self.loss_tracker, *self.metric_trackers]
        results = [tracker.result() for tracker in trackers]
        logs = {}
        for index, key in enumerate(self.keys):
            for tracker, result in zip(trackers, results, strict=True):
                logs[f"{key}_{tracker.name}"] = result[index]
        return logs

    def copy_to(self, variants: list[keras.Model]) -> None:
        """Write each variant's slice into its standalone model (one transfer per weight)."""
        per_layer = list(zip(*(_layers(v) for v in variants), strict=True))
        for stage, layers in zip(self.stages, per_layer, strict=True):
            if not isinstance(stage, _StackedDense):
                continue
            kernel = ops.convert_to_numpy(stage.kernel)
            bias = None if stage.bias is None else ops.convert_to_numpy(stage.bias)
            for index, layer in enumerate(layers):
                layer.kernel.assign(kernel[index])
                if bias is not None:
                    layer.bias.assign(bias[index])
