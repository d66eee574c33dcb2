"""Batched kernels: K copies of one Keras layer computed at once.

Each kernel computes the K variants' copies of one layer of the template
with their weights stacked on a leading axis of size K: variant k's weight is
the slice `[k]` of the kernel's variable. Tensors between layers are either
*shared* (the same for every variant: the model's inputs, and what weightless
layers make of them) or *stacked* (`(K, batch, ...)`: variant k's tensor is
`[k]`). Every kernel computes, for variant k, what the layer itself computes
for its own copy: the same operations in the same order, on slice k.

Layers are matched by *exact* class (`KERNELS`): a subclass may override
`call` or `build` and is another layer. Each kernel's `why_not` checks the
layer's options it does not support (a constraint, LoRA, `groups`, ...).

- Weightless layers that compute each sample on its own (`Flatten`,
  `Reshape`, pooling, activations, padding, merging layers such as `Add` and
  `Concatenate`, ...) run the layer's own `call` once on a shared input, or
  on the stacked input with K folded into the batch axis.
- `Dropout`: with a seed, every copy of the layer (a clone keeps the seed)
  draws the same masks in its own fit: one mask per step, drawn as the layer
  draws it (the same seed generator, the same number of random values), is
  applied to all K variants, so each equals its separate fit. Without a seed
  each variant draws its masks from its own copy's seed generator, as that
  copy draws them in its own fit on TensorFlow and JAX (on PyTorch a
  separate fit of an unseeded Dropout draws from torch's global generator;
  here, from the variant's generator: random either way, not comparable).
- `Dense` on inputs of any rank, `Conv1D/2D/3D`, `DepthwiseConv1D/2D`,
  `SeparableConv1D/2D`, `Embedding`: batched matrix products, convolutions
  with the K variants' filters (or channels) side by side, one gather.
- `BatchNormalization` (statistics and moving statistics per variant) and
  `LayerNormalization`.
- `SimpleRNN`, `LSTM`, `GRU` and `Bidirectional`: the cell's arithmetic,
  step by step, on the K variants' states at once.
"""

from __future__ import annotations

import inspect
from typing import Any

import keras
from keras import ops

from kerasreg import _compat

L = keras.layers


class Value:
    """A tensor between two layers: shared by all variants, or stacked on axis 0."""

    __slots__ = ("stacked", "tensor")

    def __init__(self, tensor: Any, stacked: bool):
        self.tensor = tensor
        self.stacked = stacked

    def per_variant(self, k: int) -> Any:
        """The `(K, batch, ...)` tensor (a shared one broadcast over K)."""
        if self.stacked:
            return self.tensor
        return ops.broadcast_to(
            ops.expand_dims(self.tensor, 0), (k, *ops.shape(self.tensor))
        )


def fold(tensor: Any) -> Any:
    """`(K, b, ...)` to `(K * b, ...)`: the K variants as one batch."""
    return ops.reshape(tensor, (-1, *ops.shape(tensor)[2:]))


def unfold(tensor: Any, k: int) -> Any:
    """`(K * b, ...)` to `(K, b, ...)`."""
    return ops.reshape(tensor, (k, -1, *ops.shape(tensor)[1:]))


def with_logits(part: Any, whole: Any, take) -> Any:
    """`part` of `whole`, carrying `take` of the logits Keras's TensorFlow
    backend attaches to a sigmoid or softmax output (`_keras_logits`): its
    crossentropy losses and metrics read them instead of the clipped
    probabilities, as they do in a separate fit (without them a saturated
    output trains differently)."""
    logits = getattr(whole, "_keras_logits", None)
    if logits is not None:
        part._keras_logits = take(logits)
    return part


def repeated_names(layer: keras.layers.Layer) -> list[str]:
    """The names two or more of `layer`'s weights share (a `Bidirectional`'s
    cells): a batched kernel gives those weights `<name>_<index>`."""
    names = [v.name for v in layer.weights]
    return sorted({name for name in names if names.count(name) > 1})


class Untracked:
    """Holds what a Keras layer must not track (models, maps of variables)."""

    def __init__(self, value: Any):
        self.value = value


def _is_keras_function(fn: Any) -> bool:
    return fn is None or getattr(fn, "__module__", "").startswith("keras.")


class Kernel(keras.layers.Layer):
    """K copies of one layer as one layer whose weights have a leading K axis.

    Args:
        layers: the K copies (variant k's copy at position k); all of the
            same exact class and config.
        trainable: ids of the variables that a separate fit of variant 0
            trains (`model.trainable_weights`: the layers' and variables'
            `trainable` flags).
    """

    kinds: tuple[type, ...] = ()

    def __init__(self, layers: list[keras.layers.Layer], trainable: set[int]):
        super().__init__(name=layers[0].name, dtype="float32")
        self.k = len(layers)
        self._copies = Untracked(list(layers))
        pairs = []  # (stacked variable, [each variant's variable])
        by_id = {}
        template = layers[0]
        # Unique names within the kernel: the torch backend tracks a layer's
        # variables by path, and a `Bidirectional`'s two cells both have a
        # `kernel` (one would silently shadow the other's updates).
        repeated = repeated_names(template)
        for index, variable in enumerate(template.weights):
            sources = [layer.weights[index] for layer in layers]
            stacked = self.add_weight(
                shape=(self.k, *variable.shape),
                dtype=variable.dtype,
                initializer="zeros",
                trainable=id(variable) in trainable,
                name=f"{variable.name}_{index}"
                if variable.name in repeated
                else variable.name,
            )
            stacked.assign(ops.stack([v.value for v in sources]))
            pairs.append((stacked, sources))
            by_id[id(variable)] = stacked
        self._pairs = Untracked(pairs)
        self._by_id = Untracked(by_id)
        self.built = True

    @property
    def pairs(self) -> list[tuple[keras.Variable, list[keras.Variable]]]:
        """`(stacked variable, [variant k's variable for each k])`."""
        return self._pairs.value

    @property
    def copies(self) -> list[keras.layers.Layer]:
        return self._copies.value

    @property
    def layer(self) -> keras.layers.Layer:
        """Variant 0's copy: the layer's config and code."""
        return self._copies.value[0]

    def stacked(self, variable: keras.Variable) -> keras.Variable:
        """The `(K, ...)` variable of variant 0's `variable`."""
        return self._by_id.value[id(variable)]

    @classmethod
    def why_not(cls, layer: keras.layers.Layer) -> str | None:
        """Why this kernel cannot compute `layer` (None: it can)."""
        return None

    @classmethod
    def why_not_inputs(cls, layer, inputs: list) -> str | None:
        """Why it cannot compute `layer` on these symbolic inputs (None: it can)."""
        return None

    def apply(self, inputs: list[Value], training: Any) -> Value | list[Value]:
        raise NotImplementedError

    def finish(self, out: Any) -> Value:
        """`out` (K on its first axis, features last) plus each variant's bias,
        through the layer's activation: the tail of Dense and the convolutions."""
        layer = self.layer
        if layer.use_bias:
            bias = self.stacked(layer.bias)
            shape = _bias_shape(self.k, len(out.shape), bias.shape[-1])
            out = ops.add(out, ops.reshape(bias, shape))
        if layer.activation is not None:
            out = layer.activation(out)
        return Value(out, True)

    def copy_to(self) -> None:
        """Write each variant's slice into its own copy of the layer."""
        for stacked, sources in self.pairs:
            values = ops.convert_to_numpy(stacked.value)
            for index, variable in enumerate(sources):
                variable.assign(values[index])


def _constraint_reason(layer, *names) -> str | None:
    for name in names:
        if getattr(layer, name, None) is not None:
            return f"has a weight constraint ({name})"
    if getattr(layer, "lora_enabled", False):
        return "has LoRA weights"
    if getattr(layer, "quantization_mode", None):
        return "is quantized"
    return None


# --- weightless layers: the layer's own call, K folded into the batch -----------

# The weightless kinds with an `axis` option (any axis but the batch axis is
# per-sample).
_AXIS_OPTIONS = (L.Softmax, L.Concatenate)


class PerSample(Kernel):
    """A weightless layer that computes each sample on its own."""

    kinds = (
        L.Activation,
        L.ReLU,
        L.LeakyReLU,
        L.ELU,
        L.Softmax,
        L.Identity,
        L.Flatten,
        L.Reshape,
        L.Permute,
        L.RepeatVector,
        L.MaxPooling1D,
        L.MaxPooling2D,
        L.MaxPooling3D,
        L.AveragePooling1D,
        L.AveragePooling2D,
        L.AveragePooling3D,
        L.GlobalMaxPooling1D,
        L.GlobalMaxPooling2D,
        L.GlobalMaxPooling3D,
        L.GlobalAveragePooling1D,
        L.GlobalAveragePooling2D,
        L.GlobalAveragePooling3D,
        L.ZeroPadding1D,
        L.ZeroPadding2D,
        L.ZeroPadding3D,
        L.Cropping1D,
        L.Cropping2D,
        L.Cropping3D,
        L.UpSampling1D,
        L.UpSampling2D,
        L.UpSampling3D,
        L.Add,
        L.Subtract,
        L.Multiply,
        L.Average,
        L.Maximum,
        L.Minimum,
        L.Concatenate,
    )

    @classmethod
    def why_not(cls, layer):
        if isinstance(layer, L.Activation) and not _is_keras_function(layer.activation):
            return "has an activation function that is not Keras's own"
        return None

    @classmethod
    def why_not_inputs(cls, layer, inputs):
        # K is folded into the batch axis: an option that reaches axis 0
        # (`Softmax(axis=0)`, `Concatenate(axis=0)`, axis -1 of a 1-D input)
        # would mix the variants. Only the known options are checked.
        rank = min(len(tensor.shape) for tensor in inputs)
        if type(layer) in _AXIS_OPTIONS:
            value = layer.axis
            axes = value if isinstance(value, (list, tuple)) else [value]
            if any((a + rank if a < 0 else a) == 0 for a in axes):
                return (
                    f"has axis={value!r}, the batch axis of its {rank}-D input "
                    "(the K variants' batches are folded into it)"
                )
        elif hasattr(layer, "axis"):
            return "has an `axis` option not known to leave the batch axis alone"
        if isinstance(layer, L.Activation) and rank < 2:
            try:
                params = inspect.signature(layer.activation).parameters
            except (TypeError, ValueError):
                return "has an activation function whose signature is unknown"
            if "axis" in params:
                return f"reduces the last axis of its {rank}-D input (the batch axis)"
        return None

    def apply(self, inputs, training):
        call = self.layer.call
        if not any(value.stacked for value in inputs):
            tensors = [value.tensor for value in inputs]
            return Value(call(tensors if len(tensors) > 1 else tensors[0]), False)
        tensors = [fold(value.per_variant(self.k)) for value in inputs]
        out = call(tensors if len(tensors) > 1 else tensors[0])
        # An `Activation("softmax")` or `Softmax()` output keeps its logits.
        unfolded = with_logits(unfold(out, self.k), out, lambda t: unfold(t, self.k))
        return Value(unfolded, True)


class Dropout(Kernel):
    """`Dropout`: with a seed, the masks of each variant's separate fit."""

    kinds = (L.Dropout,)

    def __init__(self, layers, trainable):
        super().__init__(layers, trainable)
        layer = self.layer
        self.rate = float(layer.rate)
        self.seeded = layer.seed is not None
        self.seed_generator = keras.random.SeedGenerator(layer.seed)
        # Unseeded: each variant's own generator, from its copy's state (a
        # variant built under `sweep(seeds=...)` has its seed's generator).
        self.generators = []
        # Keras gives a Dropout(0.0) no seed generator: nothing to draw or sync.
        if not self.seeded and self.rate > 0:
            for copy in self.copies:
                generator = keras.random.SeedGenerator(0)
                generator.state.assign(copy.seed_generator.state.value)
                self.generators.append(generator)

    def apply(self, inputs, training):
        (value,) = inputs
        if not training or self.rate == 0:
            return value
        noise_shape = self.layer.noise_shape
        if self.seeded:
            if not value.stacked:
                out = keras.random.dropout(
                    value.tensor, self.rate, noise_shape, seed=self.seed_generator
                )
                return Value(out, False)
            # One mask over the variant axis: a leading 1, then the layer's
            # own noise shape; the same random values as the layer draws.
            shape = ops.shape(value.tensor)[1:]
            if noise_shape is None:
                noise_shape = shape
            noise = (
                1,
                *(
                    s if n is None else n
                    for s, n in zip(shape, noise_shape, strict=True)
                ),
            )
            out = keras.random.dropout(
                value.tensor, self.rate, noise, seed=self.seed_generator
            )
            return Value(out, True)
        # Each variant's masks from its own generator, on its own slice: the
        # draws its copy makes in its own fit.
        stacked = value.per_variant(self.k)
        return Value(
            ops.stack(
                [
                    keras.random.dropout(
                        stacked[k], self.rate, noise_shape, seed=generator
                    )
                    for k, generator in enumerate(self.generators)
                ]
            ),
            True,
        )

    def copy_to(self):
        if self.rate == 0:
            return
        if self.seeded:
            state = ops.convert_to_numpy(self.seed_generator.state.value)
            for layer in self.copies:
                layer.seed_generator.state.assign(state)
            return
        for layer, generator in zip(self.copies, self.generators, strict=True):
            layer.seed_generator.state.assign(generator.state.value)


# --- layers with weights ---------------------------------------------------------


def _bias_shape(k: int, rank: int, size: int, axis: int = -1) -> tuple:
    """`(K, 1, ..., size, ...)` for a bias on `axis` of a stacked tensor of `rank`."""
    shape = [1] * rank
    shape[0] = k
    shape[axis] = size
    return tuple(shape)


class Dense(Kernel):
    """`Dense` on inputs of any rank: one batched matrix product for K variants."""

    kinds = (L.Dense,)

    @classmethod
    def why_not(cls, layer):
        if not _is_keras_function(layer.activation):
            return "has an activation function that is not Keras's own"
        return _constraint_reason(layer, "kernel_constraint", "bias_constraint")

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        kernel = self.stacked(layer.kernel)
        x = value.tensor
        shape = ops.shape(x)
        units = kernel.shape[-1]
        if value.stacked:
            flat = ops.reshape(x, (self.k, -1, shape[-1]))
            out = ops.matmul(flat, kernel)
            out = ops.reshape(out, (self.k, *shape[1:-1], units))
        else:
            # The shared rows broadcast to the K variants, one batched product:
            # measured faster than an einsum or one product with the K kernels
            # side by side (TensorFlow, PyTorch; JAX on large layers).
            flat = ops.reshape(x, (1, -1, shape[-1]))
            flat = ops.broadcast_to(flat, (self.k, *ops.shape(flat)[1:]))
            out = ops.matmul(flat, kernel)
            out = ops.reshape(out, (self.k, *shape[:-1], units))
        return self.finish(out)


def _channels_last(layer) -> str | None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "uses data_format='channels_first'"
    return None


def _convolution_reason(layer, *constraints: str) -> str | None:
    """Why the batched convolutions cannot compute `layer` (None: they can)."""
    if layer.padding not in ("valid", "same"):
        return f"has padding={layer.padding!r}"
    if not _is_keras_function(layer.activation):
        return "has an activation function that is not Keras's own"
    return _channels_last(layer) or _constraint_reason(layer, *constraints)


def _to_channels(x: Any, k: int) -> Any:
    """`(K, b, *spatial, C)` to `(b, *spatial, K * C)`: variants as channel groups."""
    rank = len(x.shape)
    x = ops.transpose(x, (*range(1, rank - 1), 0, rank - 1))
    shape = ops.shape(x)
    return ops.reshape(x, (*shape[:-2], k * shape[-1]))


def _from_channels(x: Any, k: int) -> Any:
    """`(b, *spatial, K * C)` to `(K, b, *spatial, C)`."""
    shape = ops.shape(x)
    x = ops.reshape(x, (*shape[:-1], k, shape[-1] // k))
    rank = len(x.shape)
    return ops.transpose(x, (rank - 2, *range(rank - 2), rank - 1))


def _kernels_as_groups(kernel: Any) -> Any:
    """`(K, *window, C_in, C_out)` to `(*window, C_in, K * C_out)`."""
    rank = len(kernel.shape)
    kernel = ops.transpose(kernel, (*range(1, rank - 1), 0, rank - 1))
    shape = ops.shape(kernel)
    return ops.reshape(kernel, (*shape[:-2], shape[-2] * shape[-1]))


class Conv(Kernel):
    """`Conv1D/2D/3D`: on a shared input, one convolution with the K kernels'
    filters side by side; on a stacked input, one convolution per variant.

    Measured (CPU; TensorFlow, JAX and PyTorch): a grouped convolution with
    the K variants as K channel groups is 30 to 50 times slower than K
    convolutions, forward and backward, so stacked inputs are convolved one
    variant at a time, in one traced step. On TensorFlow a `Conv2D`
    (`channels_last`, known image size) on stacked inputs is one im2col
    instead: the patches of all K * batch images (`tf.image.extract_patches`)
    times each variant's kernel in one batched matrix product, measured 2
    times faster than K convolutions forward and backward
    (`benchmarks/conv_variants.py`); on JAX, K convolutions were faster.
    """

    kinds = (L.Conv1D, L.Conv2D, L.Conv3D)

    @classmethod
    def why_not(cls, layer):
        if layer.groups != 1:
            return f"has groups={layer.groups}"
        return _convolution_reason(layer, "kernel_constraint", "bias_constraint")

    def convolve(self, x, kernel):
        layer = self.layer
        return ops.conv(
            x,
            kernel,
            strides=list(layer.strides),
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    @staticmethod
    def builds_patches(layer) -> bool:
        """Whether `layer`, on stacked inputs, is convolved as one im2col (see
        above): on TensorFlow, an exact `Conv2D`, channels last. (The memory
        rule, `engines.variant_bytes`, counts the patches by this too.)"""
        return (
            keras.backend.backend() == "tensorflow"
            and type(layer) is L.Conv2D
            and layer.data_format == "channels_last"
        )

    def as_patches(self, x) -> bool:
        """Whether the stacked `x` is convolved as one im2col: the layer builds
        patches and the image size is known."""
        return self.builds_patches(self.layer) and all(
            d is not None for d in x.shape[2:]
        )

    def patches_convolve(self, x, kernel):
        """`(K, b, H, W, C)` by `(K, kh, kw, C, F)`: one im2col, one matmul."""
        import tensorflow as tf

        layer = self.layer
        size = (1, *layer.kernel_size, 1)
        patches = tf.image.extract_patches(
            fold(x),
            sizes=size,
            strides=(1, *layer.strides, 1),
            rates=(1, *layer.dilation_rate, 1),
            padding=layer.padding.upper(),
        )  # (K * b, H', W', kh * kw * C), C fastest: the kernel's order
        height, width, depth = patches.shape[1:]
        out = ops.matmul(
            ops.reshape(patches, (self.k, -1, depth)),
            ops.reshape(kernel, (self.k, depth, layer.filters)),
        )
        return ops.reshape(out, (self.k, -1, height, width, layer.filters))

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        kernel = self.stacked(layer.kernel)
        if value.stacked and self.as_patches(value.tensor):
            out = self.patches_convolve(value.tensor, kernel)
        elif value.stacked:
            x = value.tensor
            out = ops.stack([self.convolve(x[i], kernel[i]) for i in range(self.k)])
        else:
            # (K, *window, in, out) -> (*window, in, K * out): K kernels as one.
            out = _from_channels(
                self.convolve(value.tensor, _kernels_as_groups(kernel)), self.k
            )
        return self.finish(out)


def _depthwise_as_channels(kernel: Any) -> Any:
    """`(K, *window, C, m)` to `(*window, K * C, m)`."""
    rank = len(kernel.shape)
    kernel = ops.transpose(kernel, (*range(1, rank - 2), 0, rank - 2, rank - 1))
    shape = ops.shape(kernel)
    return ops.reshape(kernel, (*shape[:-3], shape[-3] * shape[-2], shape[-1]))


def _channels_of(value: Value, k: int) -> Any:
    if value.stacked:
        return _to_channels(value.tensor, k)
    return ops.tile(value.tensor, (*[1] * (len(value.tensor.shape) - 1), k))


class DepthwiseConv(Kernel):
    """`DepthwiseConv1D/2D`: the K variants' channels side by side."""

    kinds = (L.DepthwiseConv1D, L.DepthwiseConv2D)

    @classmethod
    def why_not(cls, layer):
        return _convolution_reason(layer, "depthwise_constraint", "bias_constraint")

    def depthwise(self, value, kernel):
        layer = self.layer
        return ops.depthwise_conv(
            _channels_of(value, self.k),
            _depthwise_as_channels(kernel),
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        out = _from_channels(self.depthwise(value, self.stacked(layer.kernel)), self.k)
        return self.finish(out)


class SeparableConv(DepthwiseConv):
    """`SeparableConv1D/2D`: batched depthwise, then a grouped 1x1 convolution."""

    kinds = (L.SeparableConv1D, L.SeparableConv2D)

    @classmethod
    def why_not(cls, layer):
        return _convolution_reason(
            layer, "depthwise_constraint", "pointwise_constraint", "bias_constraint"
        )

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        middle = _from_channels(
            self.depthwise(value, self.stacked(layer.depthwise_kernel)), self.k
        )
        # The 1x1 pointwise convolution: one batched matrix product.
        pointwise = self.stacked(layer.pointwise_kernel)
        shape = ops.shape(middle)
        flat = ops.reshape(middle, (self.k, -1, shape[-1]))
        weights = ops.reshape(pointwise, (self.k, shape[-1], layer.filters))
        out = ops.reshape(
            ops.matmul(flat, weights), (self.k, *shape[1:-1], layer.filters)
        )
        return self.finish(out)


class Embedding(Kernel):
    """`Embedding`: one gather from the `(K, vocabulary, dim)` tables."""

    kinds = (L.Embedding,)

    @classmethod
    def why_not(cls, layer):
        if layer.mask_zero:
            return "has mask_zero=True (masks are not batched)"
        return _constraint_reason(layer, "embeddings_constraint")

    def apply(self, inputs, training):
        (value,) = inputs
        if value.stacked:
            raise ValueError("kerasreg.sweep: an Embedding's input depends on weights")
        ids = value.tensor
        if keras.backend.standardize_dtype(ids.dtype) not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")
        table = self.stacked(self.layer.embeddings)
        return Value(ops.take(table, ids, axis=1), True)


def _axis(axis: int, rank: int) -> int:
    """A layer's axis of a `rank` tensor, as an axis of the stacked tensor."""
    return axis % rank + 1


class BatchNormalization(Kernel):
    """`BatchNormalization`: per-variant batch statistics and moving statistics."""

    kinds = (L.BatchNormalization,)

    @classmethod
    def why_not(cls, layer):
        if getattr(layer, "synchronized", False):
            return "has synchronized=True"
        if getattr(layer, "renorm", False):
            return "has renorm=True"
        if not isinstance(layer.axis, int):
            return "normalizes over several axes"
        return _constraint_reason(layer, "gamma_constraint", "beta_constraint")

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        x = value.per_variant(self.k)
        rank = len(x.shape)
        axis = _axis(layer.axis, rank - 1)
        size = x.shape[axis]
        shape = _bias_shape(self.k, rank, size, axis)
        moving_mean = self.stacked(layer.moving_mean)
        moving_variance = self.stacked(layer.moving_variance)
        if training and layer.trainable:
            reduce = [i for i in range(1, rank) if i != axis]
            mean, variance = ops.moments(x, axes=reduce)
            momentum = layer.momentum
            moving_mean.assign(moving_mean * momentum + mean * (1.0 - momentum))
            moving_variance.assign(
                moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            mean, variance = moving_mean.value, moving_variance.value
        # Keras's ops.batch_normalization, with per-variant vectors.
        inv = ops.rsqrt(ops.reshape(variance, shape) + layer.epsilon)
        if layer.scale:
            inv = inv * ops.reshape(self.stacked(layer.gamma), shape)
        res = -ops.reshape(mean, shape) * inv
        if layer.center:
            res = res + ops.reshape(self.stacked(layer.beta), shape)
        return Value(x * inv + res, True)


class LayerNormalization(Kernel):
    """`LayerNormalization`: each sample's own statistics, per-variant gamma and beta."""

    kinds = (L.LayerNormalization,)

    @classmethod
    def why_not(cls, layer):
        if getattr(layer, "rms_scaling", False):
            return "has rms_scaling=True"
        return _constraint_reason(layer, "gamma_constraint", "beta_constraint")

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        x = value.per_variant(self.k)
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        axes = sorted(_axis(a, rank - 1) for a in axes)
        shape = [1] * rank
        shape[0] = self.k
        for a in axes:
            shape[a] = x.shape[a]
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        inv = ops.rsqrt(variance + layer.epsilon)
        if layer.scale:
            inv = inv * ops.reshape(self.stacked(layer.gamma), shape)
        res = -mean * inv
        if layer.center:
            res = res + ops.reshape(self.stacked(layer.beta), shape)
        return Value(x * inv + res, True)


_CELLS = {L.SimpleRNN: L.SimpleRNNCell, L.LSTM: L.LSTMCell, L.GRU: L.GRUCell}


class Recurrent(Kernel):
    """`SimpleRNN`, `LSTM`, `GRU` and their `Bidirectional`: the cell's own
    arithmetic, step by step, on `(K, batch, units)` states.

    The input projection of every step is one batched product; each step
    adds the recurrent product in the cell's own order (SimpleRNN:
    `(x W + b) + h U`; LSTM: `(x W + h U) + b`, on torch `(x W + b) + h U`
    as Keras's torch LSTM; GRU: `x W + b_x`, then the
    gates from `h U (+ b_h)`), so each variant's states are its own layer's.
    """

    kinds = (L.SimpleRNN, L.LSTM, L.GRU, L.Bidirectional)

    @classmethod
    def why_not(cls, layer):
        if isinstance(layer, L.Bidirectional):
            if layer.merge_mode not in ("concat", "sum", "ave", "mul"):
                return f"has merge_mode={layer.merge_mode!r}"
            if getattr(layer, "return_state", False):
                return "returns its states"
            parts = [layer.forward_layer, layer.backward_layer]
        else:
            parts = [layer]
        for rnn in parts:
            kind = type(rnn)
            if kind not in _CELLS or type(rnn.cell) is not _CELLS[kind]:
                return f"wraps a {kind.__name__} (no batched kernel)"
            if rnn.stateful:
                return "is stateful"
            if rnn.return_state:
                return "returns its states"
            cell = rnn.cell
            if cell.dropout or cell.recurrent_dropout:
                return "has dropout in its cell"
            for fn in (cell.activation, getattr(cell, "recurrent_activation", None)):
                if not _is_keras_function(fn):
                    return "has an activation function that is not Keras's own"
            reason = _constraint_reason(
                cell, "kernel_constraint", "recurrent_constraint", "bias_constraint"
            )
            if reason:
                return reason
        return None

    @classmethod
    def why_not_inputs(cls, layer, inputs):
        if len(inputs) != 1 or inputs[0].shape[1] is None:
            return "has sequences of unknown length"
        return None

    def run(self, rnn, value):
        """`(K, b, units)` (or `(K, b, T, units)`) outputs of one RNN layer."""
        cell = rnn.cell
        kernel = self.stacked(cell.kernel)
        recurrent = self.stacked(cell.recurrent_kernel)
        bias = self.stacked(cell.bias) if cell.use_bias else None
        x = value.tensor
        shape = ops.shape(x)
        steps, features = shape[-2], shape[-1]
        if value.stacked:
            flat = ops.reshape(x, (self.k, -1, features))
        else:
            flat = ops.reshape(x, (1, -1, features))
            flat = ops.broadcast_to(flat, (self.k, *ops.shape(flat)[1:]))
        projected = ops.matmul(flat, kernel)  # (K, b * T, gates * units)
        projected = ops.reshape(projected, (self.k, -1, steps, kernel.shape[-1]))
        units = cell.units
        kind = type(rnn)
        input_bias = recurrent_bias = None
        if bias is not None:
            if kind is L.GRU and cell.reset_after:
                input_bias, recurrent_bias = bias[:, 0], bias[:, 1]
            else:
                input_bias = bias
        # Keras's LSTM adds its bias after the recurrent product, except on
        # torch (recent Keras without CUDA: with the input projection).
        bias_late = kind is L.LSTM and not _compat.lstm_bias_with_inputs()
        if input_bias is not None and not bias_late:
            projected = projected + ops.expand_dims(ops.expand_dims(input_bias, 1), 1)
        batch = ops.shape(projected)[1]
        h = ops.zeros((self.k, batch, units), projected.dtype)
        c = h
        outputs = []
        order = range(steps - 1, -1, -1) if rnn.go_backwards else range(steps)
        for t in order:
            xt = projected[:, :, t]
            if kind is L.SimpleRNN:
                h = xt + ops.matmul(h, recurrent)
                if cell.activation is not None:
                    h = cell.activation(h)
            elif kind is L.LSTM:
                z = xt + ops.matmul(h, recurrent)
                if bias is not None and bias_late:
                    z = z + ops.expand_dims(bias, 1)
                z0, z1, z2, z3 = ops.split(z, 4, axis=-1)
                i = cell.recurrent_activation(z0)
                f = cell.recurrent_activation(z1)
                c = f * c + i * cell.activation(z2)
                o = cell.recurrent_activation(z3)
                h = o * cell.activation(c)
            else:
                x_z, x_r, x_h = ops.split(xt, 3, axis=-1)
                if cell.reset_after:
                    inner = ops.matmul(h, recurrent)
                    if recurrent_bias is not None:
                        inner = inner + ops.expand_dims(recurrent_bias, 1)
                else:
                    inner = ops.matmul(h, recurrent[:, :, : 2 * units])
                z = cell.recurrent_activation(x_z + inner[..., :units])
                r = cell.recurrent_activation(x_r + inner[..., units : 2 * units])
                if cell.reset_after:
                    hh = r * inner[..., 2 * units :]
                else:
                    hh = ops.matmul(r * h, recurrent[:, :, 2 * units :])
                hh = cell.activation(x_h + hh)
                h = z * h + (1 - z) * hh
            outputs.append(h)
        if rnn.return_sequences:
            return ops.stack(outputs, axis=2)
        return h

    def apply(self, inputs, training):
        (value,) = inputs
        layer = self.layer
        if not isinstance(layer, L.Bidirectional):
            return Value(self.run(layer, value), True)
        y = self.run(layer.forward_layer, value)
        y_rev = self.run(layer.backward_layer, value)
        if layer.return_sequences:
            y_rev = ops.flip(y_rev, axis=2)
        if layer.merge_mode == "concat":
            out = ops.concatenate([y, y_rev], axis=-1)
        elif layer.merge_mode == "sum":
            out = y + y_rev
        elif layer.merge_mode == "ave":
            out = (y + y_rev) / 2
        else:
            out = y * y_rev
        return Value(out, True)


KERNELS: dict[type, type[Kernel]] = {
    kind: kernel
    for kernel in (
        PerSample,
        Dropout,
        Dense,
        Conv,
        DepthwiseConv,
        SeparableConv,
        Embedding,
        BatchNormalization,
        LayerNormalization,
        Recurrent,
    )
    for kind in kernel.kinds
}
