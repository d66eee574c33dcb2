"""How hard each penalty pulls: `gradient_norms()`, per weight, in one device pass.

For each selected weight, the gradient of the compiled data loss over some
data against the gradient of the weight's own penalty: their norms, the
penalty's share and the cosine between them. The forward and backward pass,
the penalty gradients and every sum run in one compiled computation per
batch shape (a `tf.function` on TensorFlow, `jax.jit` on JAX, autograd on
PyTorch); one small float32 vector is copied to the host. Nothing in the
model changes: the pass reads the variables' values and runs the model in a
`keras.StatelessScope`, so weights, optimizer state, metrics and random-seed
states stay as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import validate_bool
from kerasreg.gradient_stats import (
    gradient_sums,
    penalty_gradients,
    penalty_state,
    prepare_regularizers,
    read_statistics,
    regularizer_key,
)
from kerasreg.selection import Where, select_weights, weight_paths

# Compiled programs kept per model, as in `kerasreg.norms`.
CACHE_SIZE = 8


def gradient_norms(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    where: Where = None,
    sample_weight: Any = None,
    batch_size: int | None = None,
    training: bool = False,
) -> dict[str, dict[str, float]]:
    """How hard each weight's penalty pulls against the data, per weight.

    For each weight `w` that `where` selects, with `g_data` the gradient of
    the compiled data loss (the `loss` and `loss_weights` given to
    `model.compile`; no `model.losses`) over `x`, `y`, and `g_penalty` the
    gradient of `w`'s own regularizer (`w.regularizer`: a kerasreg or Keras
    regularizer on any role; an `L2SPPenalty` with its reference), both at
    the weight's current value:

    - `data`: `||g_data||`, the L2 (Frobenius) norm;
    - `penalty`: `||g_penalty||` (0 for a weight without a regularizer);
    - `total`: `||g_data + g_penalty||`, the gradient of data loss plus
      penalty before any clipping (activity regularizers and `add_loss`
      terms are not part of it);
    - `penalty_share`: `penalty / (data + penalty)`, 0 when both are 0;
    - `cosine`: `<g_data, g_penalty> / (data * penalty)`, 0 when either is 0.

    With `batch_size=None` all of `x` is one batch. With `batch_size=n`, the
    data gradient is the mean of the batches' gradients weighted by their
    sizes, which equals the gradient over one batch of all the data for a
    loss that averages over samples (every Keras loss by default) on an
    output without a mask (Keras averages a masked loss over each batch's
    unmasked entries, so there, as for `evaluate`, the batch size matters).
    A NaN or infinite gradient makes `penalty_share` and `cosine` NaN.

    What the numbers mean: at a minimum of data loss plus penalty the two
    gradients cancel, so on the training data `penalty_share` tends to 0.5
    and `cosine` to -1 whatever the strength. The informative readings are
    during training (`WeightNormLogger(gradients=True)`: how much of each
    step the penalty takes) and on held-out data: `gradient_norms(model,
    x_val, y_val)` compares the pull of data the model did not train on with
    the penalty's pull. A `penalty_share` well above 0.5 there means the
    penalty pulls harder than unseen data pushes back.

    Computed in one compiled pass per batch shape; only a small vector goes
    to the host. Nothing in the model changes: weights, optimizer state,
    metrics and random-seed states (`Dropout` with `training=True`) are left
    as they were; on torch, so is torch's global generator, from which an
    unseeded `Dropout` draws (there a model's first call, Keras's own
    `predict` included, can still change the masks a later fit draws for it:
    seed random layers, `Dropout(0.5, seed=1)`, for fits that repeat).

    Args:
        model: a built `keras.Model`, compiled with a `loss`.
        x: input data, as `model.fit` takes it: arrays or tensors (also a
            list or dict of them), a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or a generator yielding `(x, y)` or
            `(x, y, sample_weight)` batches.
        y: targets, for array inputs.
        where: which weights, as everywhere in kerasreg: `None` (trainable
            weights with `ndim >= 2`), a regular expression searched in the
            weight's path, a callable `variable -> bool`, or an iterable of
            layers and/or variables. The weights must belong to `model`.
        sample_weight: optional per-sample weights, for array inputs.
        batch_size: `None` (one batch of all the data) or an int >= 1, for
            array inputs.
        training: bool, default `False`. Run the model in training mode
            (`Dropout` active, batch statistics); no state is updated either
            way.

    Returns:
        `{path: {"data", "penalty", "total", "penalty_share", "cosine"}}` in
        model order, keyed by the weight's path as `weight_norms` keys it.

    Raises:
        TypeError: `model`, `where`, `batch_size` or `training` has an
            unsupported type.
        ValueError: `model` is not compiled with a loss, `where` selects
            nothing or a weight outside `model`, `batch_size` is given with a
            dataset or is < 1, the data is empty, or it holds no targets
            (`y=None`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(1, kernel_regularizer=kerasreg.L2Penalty(0.1)),
    ... ])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.random.rand(32, 3), np.random.rand(32, 1)
    >>> stats = kerasreg.gradient_norms(model, x, y)["dense/kernel"]
    >>> sorted(stats)
    ['cosine', 'data', 'penalty', 'penalty_share', 'total']
    >>> kernel = model.layers[0].kernel.numpy()
    >>> bool(abs(stats["penalty"] - 0.2 * np.sqrt((kernel**2).sum())) < 1e-5)
    True
    """
    owner = "gradient_norms"
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{owner}: invalid `model`: expected a compiled keras.Model. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
    training = validate_bool(training, "training", owner)
    batch_size = check_batch_size(batch_size, x, owner)
    variables = select_weights(model, where)
    program = program_for(model, variables, training, owner)
    with _global_rng_kept():
        return program.run(data_batches(x, y, sample_weight, batch_size, owner=owner))


def _global_rng_kept() -> Any:
    """On torch, Keras's unseeded random layers (`Dropout()` without a seed)
    draw from torch's global generators: forked here, so the call leaves
    them, and the next fit's masks, as they were. The other backends draw
    from Keras's seed state, which the program does not advance."""
    if keras.backend.backend() != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.random.fork_rng()


def check_batch_size(batch_size: Any, x: Any, owner: str) -> int | None:
    if batch_size is None:
        return None
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise (TypeError if not isinstance(batch_size, numbers.Real) else ValueError)(
            f"{owner}: invalid `batch_size`: expected None (all the data in one "
            f"batch) or an int >= 1. Received: batch_size={batch_size!r}."
        )
    if not _is_arrays(x):
        raise ValueError(
            f"{owner}: `batch_size` is for array inputs; a dataset, PyDataset or "
            f"generator is batched already. Received: batch_size={batch_size!r} "
            f"with x of type {type(x).__name__}."
        )
    return int(batch_size)


def _is_arrays(x: Any) -> bool:
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    return all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)


def _first_dimension(x: Any) -> int:
    leaf = next(v for v in keras.tree.flatten(x) if v is not None)
    return int(leaf.shape[0])


def data_batches(
    x: Any,
    y: Any,
    sample_weight: Any,
    batch_size: int | None,
    steps: int | None = None,
    *,
    owner: str,
) -> Iterable[tuple[Any, Any, Any]]:
    """`(x, y, sample_weight)` batches; arrays without `batch_size`: one batch."""
    if _is_arrays(x) and batch_size is None:
        batch_size = _first_dimension(x)
        if batch_size == 0:
            raise ValueError(f"{owner}: `x` holds no sample.")
    return _compat.data_batches(x, y, sample_weight, batch_size, steps)


class GradientProgram:
    """The compiled computations for one model, selection and mode.

    `single(trainable, non_trainable, state, x, y, sw)` returns the sums
    vector of one batch; `accumulate(acc, weight, ...)` adds `weight *
    g_data` of a batch to `acc`; `finish(acc, scale, trainable,
    non_trainable, state)` turns a mean data gradient into the sums vector.
    Variable values are arguments, the penalties' state (an `L2SPPenalty`'s
    reference) included, so the compiled functions read the weights and the
    references as they are at each call (JAX would bake a variable read
    inside in as a constant).
    """

    def __init__(
        self, model: keras.Model, variables: list[Any], keys: list[str], training: bool
    ):
        self.model = weakref.ref(model)
        self.keys = keys
        self.training = training
        self.trainable = list(model.trainable_variables)
        self.non_trainable = list(model.non_trainable_variables)
        trainable_ids = {id(v): i for i, v in enumerate(self.trainable)}
        non_trainable_ids = {id(v): i for i, v in enumerate(self.non_trainable)}
        self.positions = [
            ("t", trainable_ids[id(v)])
            if id(v) in trainable_ids
            else ("n", non_trainable_ids[id(v)])
            for v in variables
        ]
        self.regularizers = [v.regularizer for v in variables]
        self.state = penalty_state(self.regularizers)
        self.call_takes_training = (
            "training" in inspect.signature(model.call).parameters
        )
        self.single = _compile(self._single)
        self.accumulate = _compile(self._accumulate)
        self.finish = _compile(self._finish)

    # --- traced ---------------------------------------------------------------

    def _selected(self, trainable: list, non_trainable: list) -> list:
        return [
            trainable[i] if kind == "t" else non_trainable[i]
            for kind, i in self.positions
        ]

    def _data_loss(self, selected, trainable, non_trainable, x, y, sample_weight):
        model = self.model()
        trainable, non_trainable = list(trainable), list(non_trainable)
        for (kind, i), value in zip(self.positions, selected, strict=True):
            (trainable if kind == "t" else non_trainable)[i] = value
        mapping = list(zip(self.trainable, trainable, strict=True)) + list(
            zip(self.non_trainable, non_trainable, strict=True)
        )
        # Assignments inside (seed states, batch statistics, the compiled
        # loss's trackers) stay in the scope: nothing in the model changes.
        with keras.StatelessScope(state_mapping=mapping):
            if self.call_takes_training:
                y_pred = model(x, training=self.training)
            else:
                y_pred = model(x)
            loss = _compat.compiled_loss(model)(y, y_pred, sample_weight)
        return ops.cast(loss, "float32")

    def _data_gradients(self, trainable, non_trainable, x, y, sample_weight) -> list:
        selected = self._selected(trainable, non_trainable)
        return _DATA_GRADIENTS[keras.backend.backend()](
            lambda values: self._data_loss(
                values, trainable, non_trainable, x, y, sample_weight
            ),
            selected,
        )

    def _sums(self, data: list, trainable: list, non_trainable: list, state) -> Any:
        selected = self._selected(trainable, non_trainable)
        # The penalties read their state as an input of the program.
        with keras.StatelessScope(
            state_mapping=list(zip(self.state, state, strict=True))
        ):
            penalty = penalty_gradients(self.regularizers, selected)
        return ops.stack(gradient_sums(data, penalty))

    def _single(self, trainable, non_trainable, state, x, y, sample_weight):
        data = self._data_gradients(trainable, non_trainable, x, y, sample_weight)
        return self._sums(data, trainable, non_trainable, state)

    def _accumulate(self, acc, weight, trainable, non_trainable, x, y, sample_weight):
        data = self._data_gradients(trainable, non_trainable, x, y, sample_weight)
        return [
            a + ops.cast(weight, a.dtype) * ops.cast(g, a.dtype)
            for a, g in zip(acc, data, strict=True)
        ]

    def _finish(self, acc, scale, trainable, non_trainable, state):
        data = [a * ops.cast(scale, a.dtype) for a in acc]
        return self._sums(data, trainable, non_trainable, state)

    # --- host -----------------------------------------------------------------

    def run(self, batches: Iterable[tuple[Any, Any, Any]]) -> dict:
        trainable = [v.value for v in self.trainable]
        non_trainable = [v.value for v in self.non_trainable]
        state = [v.value for v in self.state]
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise ValueError("gradient_norms: the data holds no batch.")
        if first[1] is None:
            raise ValueError(
                "gradient_norms: invalid `y`: the data gradient is the gradient "
                "of the compiled loss, which needs targets. Received: y=None "
                "(or a dataset whose batches hold no targets). Pass `y` with "
                "array inputs, or data yielding `(x, y)` batches."
            )
        first = _tensors(first)
        _compat.compiled_loss(self.model(), first[0], first[1])  # build it once
        second = next(iterator, None)
        if second is None:
            vector = self.single(trainable, non_trainable, state, *first)
        else:
            acc = [
                ops.zeros(tuple(v.shape), _gradient_dtype(v))
                for v in self._selected(self.trainable, self.non_trainable)
            ]
            count = 0
            for batch in _chain(first, second, iterator):
                n = _first_dimension(batch[0])
                weight = ops.convert_to_tensor(float(n), "float32")
                acc = self.accumulate(acc, weight, trainable, non_trainable, *batch)
                count += n
            scale = ops.convert_to_tensor(1.0 / count, "float32")
            vector = self.finish(acc, scale, trainable, non_trainable, state)
        return read_statistics(ops.convert_to_numpy(vector), self.keys)


def _chain(first, second, rest):
    yield first
    yield _tensors(second)
    for batch in rest:
        yield _tensors(batch)


def _tensors(batch: tuple) -> tuple:
    return tuple(
        None if part is None else keras.tree.map_structure(_tensor, part)
        for part in batch
    )


def _tensor(value: Any) -> Any:
    return None if value is None else ops.convert_to_tensor(value)


def _gradient_dtype(variable: Any) -> str:
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return "float64" if dtype == "float64" else "float32"


def _tensorflow_data_gradients(loss_of: Callable, values: list) -> list:
    import tensorflow as tf

    values = [tf.convert_to_tensor(v) for v in values]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for value in values:
            tape.watch(value)
        loss = loss_of(values)
    grads = tape.gradient(loss, values)
    return [
        tf.zeros_like(v) if g is None else g for g, v in zip(grads, values, strict=True)
    ]


def _jax_data_gradients(loss_of: Callable, values: list) -> list:
    import jax

    return jax.grad(loss_of)(list(values))


def _torch_data_gradients(loss_of: Callable, values: list) -> list:
    import torch

    with torch.enable_grad():
        leaves = [v.detach().requires_grad_(True) for v in values]
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [
        torch.zeros_like(v) if g is None else g
        for g, v in zip(grads, leaves, strict=True)
    ]


_DATA_GRADIENTS = {
    "tensorflow": _tensorflow_data_gradients,
    "jax": _jax_data_gradients,
    "torch": _torch_data_gradients,
}


def _compile(fn: Callable) -> Callable:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        function = tf.function(fn, reduce_retracing=True)
        # One trace per batch shape and model is by design (a last partial
        # batch, a logger over many fits): no "frequent retracing" warning.
        if hasattr(function, "_omit_frequent_tracing_warning"):
            function._omit_frequent_tracing_warning = True
        return function
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


# model -> OrderedDict(cache key -> program), least recently used first; weak,
# so that a cached program never keeps a model alive.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def program_for(
    model: keras.Model, variables: Sequence[Any], training: bool, owner: str
) -> GradientProgram:
    """The cached `GradientProgram` of `model` for `variables` and `training`."""
    loss = _compat.compiled_loss(model)
    if loss is None:
        raise ValueError(
            f"{owner}: `model` {model.name!r} is not compiled with a `loss`: "
            "call `model.compile(optimizer=..., loss=...)` first (the data "
            "gradient is the gradient of the compiled loss)."
        )
    inside = {id(v) for v in model.trainable_variables} | {
        id(v) for v in model.non_trainable_variables
    }
    outside = [v.path for v in variables if id(v) not in inside]
    if outside:
        raise ValueError(
            f"{owner}: the selection holds weights that are not weights of "
            f"`model` {model.name!r}: {', '.join(outside)}. Select among the "
            "model's own weights."
        )
    prepare_regularizers(variables)
    key = (
        tuple(id(v) for v in variables),
        tuple(regularizer_key(v.regularizer) for v in variables),
        tuple(id(s) for s in penalty_state([v.regularizer for v in variables])),
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
        id(loss),
        training,
    )
    programs = _PROGRAMS.get(model)
    if programs is None:
        programs = _PROGRAMS[model] = OrderedDict()
    program = programs.get(key)
    if program is not None:
        programs.move_to_end(key)
        return program
    paths = weight_paths(model)
    keys = [paths.get(id(v), v.path) for v in variables]
    program = GradientProgram(model, list(variables), keys, training)
    programs[key] = program
    while len(programs) > CACHE_SIZE:
        programs.popitem(last=False)
    return program
