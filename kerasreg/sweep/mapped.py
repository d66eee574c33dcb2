"""The vectorized engine on JAX: the template's own step, mapped over the K variants.

One *lane* model (a copy of the template, compiled like it) has, on JAX, a
pure training step `train_step(state, data) -> (logs, state)` of `state =
(trainable, non_trainable, optimizer_variables, metrics_variables)` (Keras's
JAX trainer). The stack is a `keras.Model` whose variables are the lane's
variables stacked on a leading axis of size K (row k holds variant k's own
values: its weights, seed-generator and normalization state, optimizer slots
and metric totals), and whose step is `jax.vmap` of the lane's step over that
axis, with the batch shared by all rows. Row k's step is therefore the very
code of variant k's separate fit, on its own state: any layer (subclasses,
frozen layers, Dropout with its seed, normalization, RNNs, several inputs and
outputs), the compiled loss and metrics on the variant's own outputs, and the
variant's own optimizer update (per-variable and global clipping, loss
scaling, EMA, gradient accumulation, schedules, weight-decay exclusions).
Keras's `fit` drives the stack (callbacks, validation, progress bar, data
adapters, `steps_per_execution`); the logs are split per variant.

Penalties differ per row: each lane weight carries a `_LanePenalty` that
computes the penalty of the row being mapped (`_LaneIndex`): one coefficient
vector when the variants share one exact kerasreg class (`L2Penalty(c_k)`,
`None` being the zero coefficient), otherwise each variant's own penalty
object, selected by row (each keeps its own state, such as an
`L2SPPenalty`'s reference).

K over devices: under a `keras.distribution` whose `DeviceMesh` has an axis
named `"variants"` (`VARIANTS_AXIS`), the K axis of every stacked variable is
sharded over that mesh axis (each device holds K/D variants; the rest of the
variable's layout comes from the distribution, as for the template), and the
batch is laid out by the distribution as for any fit (replicated over
`"variants"`, sharded over its batch axis).

Not on TensorFlow or PyTorch: `tf.vectorized_map` cannot map a Keras train
step (variables, `tf.function` state), and `torch.func.vmap` was evaluated
(see `_TORCH_NOTE`). A mesh axis `"variants"` there is refused
(`check_variants_axis`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import types
from typing import Any

import keras
import numpy as np
from keras import ops

from kerasreg import _compat
from kerasreg.penalties import (
    ElasticNetPenalty,
    ExpAbsPenalty,
    L1Penalty,
    L2Penalty,
)
from kerasreg.sweep import stopping
from kerasreg.sweep.monitor import InlineBatchLogs, Monitor
from kerasreg.sweep.variants import carry_state, compile_like
from kerasreg.walk import walk_layers

VARIANTS_AXIS = "variants"
# K over a mesh axis is shown exact (tests/test_sweep_mapped.py: every
# variant equals the one-device sweep) from these versions on; on Keras 3.8
# with JAX 0.4.34 the per-variant metrics (accuracy) differed from the
# one-device sweep, cause not found: refused there.
MESH_EXACT_SINCE = {"keras": (3, 15), "jax": (0, 10)}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)


def mesh_unproven() -> str | None:
    """Why K over a mesh axis is not shown exact on the installed versions (None: it is)."""
    import jax

    installed = {"keras": keras.__version__, "jax": jax.__version__}
    for name, since in MESH_EXACT_SINCE.items():
        if _version(installed[name]) < since:
            least = ".".join(map(str, since))
            return (
                f"K over a mesh axis is shown exact from Keras "
                f"{'.'.join(map(str, MESH_EXACT_SINCE['keras']))} and JAX "
                f"{'.'.join(map(str, MESH_EXACT_SINCE['jax']))} on, and this is "
                f"{name} {installed[name]} (< {least}): its per-variant metrics "
                "differed from the one-device sweep"
            )
    return None


_TORCH_NOTE = """\
Why there is no `torch.func.vmap` engine (evaluated; `benchmarks/torch_vmap.py`).
Keras's torch trainer step is not a function of its state: it calls
`backward()` and the optimizer updates the variables in place, so the
template's own step cannot be mapped as `jax.vmap` maps JAX's pure step (the
property that makes this engine exact for any template). What can be mapped
is `model.stateless_call` under `torch.func.grad`: one SGD step of K=6
variants of a 64-128-128-10 MLP was 0.34x the time of K separate passes
(median of 7 interleaved rounds, equal weights after the step), but the
optimizer (clipping, loss scaling, EMA, accumulation), the loss and metric
bookkeeping and the random state (Keras's seed generators) would all have to
be re-implemented around it: the batched-kernel route of `vectorized.py`,
which already serves torch, with no exactness-by-construction gained.
"""

# Penalties whose value is `coefficient * f(w)` with `coefficient` an
# attribute read only in that product (exact classes: a subclass may differ),
# and which keep no state: one evaluation with a per-row coefficient is each
# row's own formula; `None` is the zero coefficient.
_LINEAR = {
    L1Penalty: ("l1",),
    L2Penalty: ("l2",),
    ElasticNetPenalty: ("l1", "l2"),
    ExpAbsPenalty: ("factor",),
    keras.regularizers.L1: ("l1",),
    keras.regularizers.L2: ("l2",),
}
# Stateless penalty classes: two equal configs are the same penalty.
_STATELESS = (*_LINEAR, keras.regularizers.L1L2)


# --- which engine -----------------------------------------------------------------


def why_not(template: keras.Model, variants: list, context: Any = None) -> str | None:
    """Why `jax.vmap` of the template's step cannot train these variants (None: it can).

    `context` may carry `fit_kwargs` (a mapping, or an attribute of that
    name): callbacks given to `sweep` would see the stack, not a variant.
    """
    if keras.backend.backend() != "jax":
        return f"the backend is {keras.backend.backend()}, not JAX"
    if _compat.nnx_enabled():
        return "Keras runs JAX models as Flax NNX modules (their step is not pure)"
    fit_kwargs = _lookup(context, "fit_kwargs") or {}
    reason = stopping.why_not(
        template, list(fit_kwargs.get("callbacks") or []), own_optimizers=True
    )
    if reason:
        return reason
    distribution = keras.distribution.distribution()
    if distribution is not None:
        reason = _distribution_reason(distribution, len(variants))
        if reason:
            return reason
    for variant in variants:
        for layer, reference in zip(
            _flat_layers(variant), _flat_layers(template), strict=False
        ):
            if _config(layer.activity_regularizer) != _config(
                reference.activity_regularizer
            ):
                return f"layer {layer.name!r} has a different activity regularizer"
    first = _state_signature(variants[0])
    for variant in variants[1:]:
        if _state_signature(variant) != first:
            return (
                "the variants hold different model state (a penalty with "
                "state, such as an L2SPPenalty, on some of them only)"
            )
    return None


def _state_signature(model: keras.Model) -> list[tuple[str, tuple, str]]:
    """Name, shape and dtype of each non-trainable variable, in Keras's order."""
    return [
        (v.name, tuple(v.shape), str(v.dtype)) for v in model.non_trainable_variables
    ]


def check_variants_axis(template: keras.Model, variants: list, context: Any = None):
    """Refuse a mesh axis `"variants"` that the mapped engine cannot honour.

    A `keras.distribution` whose `DeviceMesh` has an axis `"variants"` asks
    for K over devices, which only `jax.vmap` of the template's step does: on
    TensorFlow and PyTorch, or where `why_not` gives a reason, any other
    engine would ignore the axis (each device holding all K variants), so
    `sweep` raises before anything trains.

    Raises:
        ValueError: the active distribution's mesh has an axis `"variants"`
            and the mapped engine cannot train these variants (the message
            says why).
    """
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None or VARIANTS_AXIS not in mesh.axis_names:
        return
    # Grid points that need K separate fits (transforms, seeds, callbacks).
    reason = _lookup(context, "separate") or why_not(template, variants, context)
    if reason is None:
        return
    raise ValueError(
        f"kerasreg.sweep: the distribution's device mesh has an axis "
        f"{VARIANTS_AXIS!r}, which spreads the K variants over devices; only "
        f"the vectorized engine on JAX (jax.vmap of the template's step) can "
        f"do that, and it cannot take this sweep: {reason}. Received: "
        f"distribution={distribution!r} with mesh axes {list(mesh.axis_names)} "
        f"and K={len(variants)} variants. Accepted: a {VARIANTS_AXIS!r} axis on "
        f"JAX for a sweep the vectorized engine takes (K a multiple of the "
        f"axis size, no `callbacks`), or a mesh without that axis."
    )


def _lookup(context: Any, name: str) -> Any:
    if context is None:
        return None
    if isinstance(context, dict):
        return context.get(name)
    return getattr(context, name, None)


def variants_axis_size() -> int | None:
    """The size of the active distribution's mesh axis `"variants"`, or None."""
    mesh = getattr(keras.distribution.distribution(), "device_mesh", None)
    if mesh is None or VARIANTS_AXIS not in mesh.axis_names:
        return None
    return int(mesh.shape[list(mesh.axis_names).index(VARIANTS_AXIS)])


def _distribution_reason(distribution, k: int) -> str | None:
    mesh = distribution.device_mesh
    if VARIANTS_AXIS not in mesh.axis_names:
        return None  # every device holds all K rows, as a replica would
    unproven = mesh_unproven()
    if unproven:
        return unproven
    size = mesh.shape[list(mesh.axis_names).index(VARIANTS_AXIS)]
    if k % size:
        return (
            f"K={k} variants do not divide over the {size} devices of the mesh "
            f"axis {VARIANTS_AXIS!r}"
        )
    if getattr(distribution, "batch_dim_name", None) == VARIANTS_AXIS:
        return f"the distribution shards the batch over {VARIANTS_AXIS!r}"
    return None


def _flat_layers(model):
    return [layer for layer, _ in walk_layers(model)]


def _config(regularizer):
    if regularizer is None:
        return None
    return (type(regularizer), keras.regularizers.serialize(regularizer))


# --- per-row penalties ------------------------------------------------------------


class _LaneIndex:
    """The row being computed by a mapped step (None outside one)."""

    def __init__(self):
        self.value = None

    @contextlib.contextmanager
    def at(self, index):
        previous, self.value = self.value, index
        try:
            yield
        finally:
            self.value = previous


def _same(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or type(a) is not type(b):
        return False
    return type(a) in _STATELESS and a.get_config() == b.get_config()


class _LanePenalty(keras.regularizers.Regularizer):
    """The penalty of the row being mapped, among the K variants' penalties.

    Internal to a sweep's lane model (never saved). Rows share an evaluation
    when their penalties are equal; when all are one exact `_LINEAR` class
    (or None), one evaluation with the row's coefficients serves all rows;
    otherwise each distinct penalty is evaluated and the row's value is
    selected (a `where`, so a penalty of another row contributes neither
    value nor gradient, even a non-finite one).
    """

    def __init__(self, penalties: list, lane: _LaneIndex):
        self.lane = lane
        self.distinct: list = []
        table = []
        for penalty in penalties:
            for j, seen in enumerate(self.distinct):
                if _same(penalty, seen):
                    table.append(j)
                    break
            else:
                self.distinct.append(penalty)
                table.append(len(self.distinct) - 1)
        self.table = np.asarray(table, "int32")
        self.first = penalties[0]
        self.linear = None
        kinds = {type(p) for p in self.distinct if p is not None}
        if len(self.distinct) > 1 and len(kinds) == 1 and next(iter(kinds)) in _LINEAR:
            kind = next(iter(kinds))
            model = next(p for p in self.distinct if p is not None)
            names = _LINEAR[kind]
            columns = {
                name: np.asarray(
                    [0.0 if p is None else float(getattr(p, name)) for p in penalties],
                    "float32",
                )
                for name in names
            }
            self.linear = (model, columns)

    def __call__(self, x):
        if isinstance(x, keras.Variable):
            # The lane's own variable (an eager build): the variants' penalties
            # see its value, never a variable they do not belong to.
            x = x.value
        index = self.lane.value
        if index is None or len(self.distinct) == 1:
            return _value(self.first, x)
        if self.linear is not None:
            model, columns = self.linear
            penalty = copy.copy(model)
            for name, column in columns.items():
                setattr(penalty, name, ops.take(column, index))
            return penalty(x)
        choice = ops.take(self.table, index)
        values = []
        for j, penalty in enumerate(self.distinct):
            mine = ops.equal(choice, j)
            values.append(_value(penalty, ops.where(mine, x, ops.stop_gradient(x))))
        dtype = keras.backend.result_type(*[v.dtype for v in values])
        values = ops.stack([ops.cast(v, dtype) for v in values])
        return ops.take(values, choice)


def _value(penalty, x):
    if penalty is None:
        return ops.zeros((), "float32")
    return ops.convert_to_tensor(penalty(x))


# --- data ------------------------------------------------------------------------


def _first_batch(x, y):
    """Two samples of the training data, and `x` to give `fit` (a generator is
    re-made with its first batch put back: it is read once)."""
    from kerasreg.sweep.data import is_array, is_dataset

    if isinstance(x, keras.utils.PyDataset):
        batch = x[0]
    elif is_dataset(x):
        batch = next(iter(x))
    elif isinstance(x, types.GeneratorType) or (
        not is_array(x) and not isinstance(x, (dict, list, tuple)) and y is None
    ):
        iterator = iter(x)
        batch = next(iterator)

        def replay():
            yield from itertools.chain([batch], iterator)

        x = replay()
    else:
        batch = (x, y)
    if not isinstance(batch, (tuple, list)):
        batch = (batch,)
    xs, ys = batch[0], batch[1] if len(batch) > 1 else None
    head = lambda t: None if t is None else t[:2]  # noqa: E731
    return (keras.tree.map_structure(head, xs), keras.tree.map_structure(head, ys)), x


def _build(model, sample):
    """Create the compiled loss, metric and optimizer variables of `model`."""
    _compat.build_compiled(model, *sample)
    model.optimizer.build(model.trainable_variables)


def _groups(model):
    """The four lists of a JAX train step's state, in Keras's order."""
    return (
        list(model.trainable_variables),
        list(model.non_trainable_variables),
        list(model.optimizer.variables),
        list(model.metrics_variables),
    )


# --- the stack --------------------------------------------------------------------


class _Box:
    """Holds objects out of sight of Keras's attribute tracking."""

    def __init__(self, **items):
        self.__dict__.update(items)

    def __getattr__(self, name: str) -> Any:  # the items, for type checkers
        raise AttributeError(name)


class _StackOptimizer(keras.optimizers.Optimizer):
    """The stacked optimizer state, for Keras's trainer; the updates are the lanes'."""

    def __init__(self, variables, finalize):
        super().__init__(learning_rate=0.0, name="kerasreg_sweep_optimizer")
        self._stack = _Box(variables=list(variables), finalize=finalize)
        self.built = True

    @property
    def variables(self):
        return list(self._stack.variables)

    def finalize_variable_values(self, var_list):
        self._stack.finalize()


class MappedStack(keras.Model):
    """K variants as one model: the lane's state stacked on a leading K axis."""

    def __init__(
        self, lane: keras.Model, variants: list, lane_index: _LaneIndex, rows: list
    ):
        super().__init__(name="kerasreg_sweep")
        self.k = len(variants)
        self.keys = [f"v{i:04d}" for i in range(self.k)]
        self._lane = _Box(model=lane, index=lane_index)
        lane_groups = _groups(lane)
        variant_groups = [_groups(v) for v in variants]
        for g, lane_vars in enumerate(lane_groups):
            for i, var in enumerate(lane_vars):
                for groups in variant_groups:
                    other = groups[g][i]
                    # Model variables' names are scope-free ("moving_mean",
                    # "kernel_reference"); optimizer slots' names hold paths.
                    renamed = g < 2 and other.name != var.name
                    if tuple(other.shape) != tuple(var.shape) or renamed:
                        raise ValueError(
                            "kerasreg.sweep: the variants' state does not line up "
                            f"for one jax.vmap ({other.path} {tuple(other.shape)} "
                            f"vs {var.path} {tuple(var.shape)}); use "
                            "engine='auto' or 'sequential'."
                        )
        layouts = _StackLayouts()
        # One row, no distribution: the lane's own shapes, no K axis (XLA's
        # CPU step on a K axis of one copies the state at every step).
        self.unit = self.k == 1 and layouts.distribution is None
        stacked = []
        with layouts.scope():
            for g, lane_vars in enumerate(lane_groups):
                row = []
                for i, var in enumerate(lane_vars):
                    value = self._stack(
                        [groups[g][i].value for groups in variant_groups]
                    )
                    name = layouts.name(var, g, i)
                    if g < 2:
                        row.append(
                            self.add_weight(
                                shape=tuple(value.shape),
                                initializer=_Constant(value),
                                dtype=var.dtype,
                                trainable=g == 0,
                                name=name,
                            )
                        )
                    else:
                        row.append(
                            keras.Variable(
                                value, dtype=var.dtype, trainable=False, name=name
                            )
                        )
                stacked.append(row)
            # Which of the sweep's variants each row is (its penalty's index):
            # state, so that one compiled step serves every group of K rows.
            self._rows = self.add_weight(
                shape=(self.k,),
                initializer=_Constant(np.asarray(rows, "int32")),
                dtype="int32",
                trainable=False,
                name=layouts.name_rows(),
            )
        self._state = _Box(optimizer=stacked[2], metrics=stacked[3], axis=layouts.axis)
        self._functions = _Box(results=None, reset=None)
        self.built = True

    # Keras's trainer reads these.
    @property
    def metrics(self):
        return []

    @property
    def metrics_variables(self):
        return list(self._state.metrics)

    def compile(self, *, steps_per_execution=1, jit_compile="auto", run_eagerly=False):
        super().compile(
            optimizer=None,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            run_eagerly=run_eagerly,
        )
        self.optimizer = _StackOptimizer(self._state.optimizer, self._finalize)

    # The mapped steps.
    def _map(self, fn, rows, *args):
        """`jax.vmap` of `fn` over the K axis of `args`, row k computed as
        variant `rows[k]` of the sweep (its penalty)."""
        import jax

        kwargs = {}
        if self._state.axis is not None:
            kwargs["spmd_axis_name"] = self._state.axis
        lane_index = self._lane.index

        def row(index, *row_args):
            with lane_index.at(index):
                return fn(*row_args)

        if self.unit:
            return row(rows[0], *args)
        in_axes = (0,) * (len(args) + 1)
        return jax.vmap(row, in_axes=in_axes, **kwargs)(rows, *args)

    def _map_state(self, fn, state):
        """`_map` of a step `fn(lane_state)` over Keras's JAX state of the stack
        (its non-trainable part holds the rows' indices, not mapped to the lane)."""
        trainable, non_trainable, *rest = state
        at = self._rows_position()
        rows = non_trainable[at]
        lane_state = (trainable, non_trainable[:at] + non_trainable[at + 1 :], *rest)
        out, new_state = self._map(fn, rows, lane_state)
        if len(state) == 2:  # predict: it returns the non-trainable state only
            return out, _with(new_state, at, rows)
        trainable, lane_non_trainable, *rest = new_state
        return out, (trainable, _with(lane_non_trainable, at, rows), *rest)

    def _rows_position(self) -> int:
        return next(
            i for i, v in enumerate(self.non_trainable_variables) if v is self._rows
        )

    def _stack(self, values):
        """The stacked value of the rows' `values`."""
        return values[0] if self.unit else ops.stack(values)

    def _row(self, value, index):
        """Row `index` of a stacked value."""
        return value if self.unit else value[index]

    def _split(self, logs):
        out = {}
        for index, key in enumerate(self.keys):
            for name, value in logs.items():
                out[f"{key}_{name}"] = self._row(value, index)
        return out

    def train_step(self, state, data):
        lane = self._lane.model
        logs, state = self._map_state(lambda s: lane.train_step(s, data), state)
        return self._split(logs), state

    def test_step(self, state, data):
        lane = self._lane.model
        logs, state = self._map_state(lambda s: lane.test_step(s, data), state)
        return self._split(logs), state

    def predict_step(self, state, data):
        lane = self._lane.model
        outputs, non_trainable = self._map_state(
            lambda s: lane.predict_step(s, data), state
        )
        per_variant = {
            key: keras.tree.map_structure(lambda o, i=i: self._row(o, i), outputs)
            for i, key in enumerate(self.keys)
        }
        return per_variant, non_trainable

    def get_metrics_result(self):
        import jax

        lane = self._lane.model
        if self._functions.results is None:

            def results(values):
                mapping = list(zip(lane.metrics_variables, values, strict=True))
                with keras.StatelessScope(state_mapping=mapping):
                    return lane.get_metrics_result()

            self._functions.results = jax.jit(lambda r, v: self._map(results, r, v))
        values = self._functions.results(
            self._rows.value, [v.value for v in self._state.metrics]
        )
        # One transfer per metric, split on the host.
        return self._split({name: np.asarray(v) for name, v in values.items()})

    def reset_metrics(self):
        import jax

        if self._functions.reset is None:
            lane = self._lane.model

            def reset(values):
                # Each row's own `reset_state` (a metric may keep its totals).
                mapping = list(zip(lane.metrics_variables, values, strict=True))
                with keras.StatelessScope(state_mapping=mapping) as scope:
                    lane.reset_metrics()
                return [scope.get_current_value(v) for v in lane.metrics_variables]

            self._functions.reset = jax.jit(lambda r, v: self._map(reset, r, v))
        values = self._functions.reset(
            self._rows.value, [v.value for v in self._state.metrics]
        )
        for stacked, value in zip(self._state.metrics, values, strict=True):
            stacked.assign(value)

    def _finalize(self):
        """Each row's end of `fit`: its optimizer's `finalize_variable_values` (EMA)."""
        lane = self._lane.model
        optimizer = lane.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if not getattr(inner, "use_ema", False):
            return

        def finalize(trainable, optimizer_values):
            mapping = list(zip(lane.trainable_variables, trainable, strict=True))
            mapping += list(zip(optimizer.variables, optimizer_values, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                optimizer.finalize_variable_values(lane.trainable_variables)
            return [scope.get_current_value(v) for v in lane.trainable_variables]

        values = self._map(
            finalize,
            self._rows.value,
            [v.value for v in self.trainable_variables],
            [v.value for v in self._state.optimizer],
        )
        for var, value in zip(self.trainable_variables, values, strict=True):
            var.assign(value)

    def _stacked_groups(self) -> list[list]:
        """The stacked variables in the lane's groups: trainable, non-trainable
        (without the rows' indices), optimizer, metrics."""
        non_trainable = [v for v in self.non_trainable_variables if v is not self._rows]
        return [
            list(self.trainable_variables),
            non_trainable,
            list(self._state.optimizer),
            list(self._state.metrics),
        ]

    def fill(self, variants, rows):
        """Make the stack hold `variants` (their own state: weights, optimizer
        slots, metric totals), as variants `rows` of the sweep, for one more
        `fit` with the same compiled steps."""
        own = [_groups(v) for v in variants]
        for g, stacked in enumerate(self._stacked_groups()):
            for i, var in enumerate(stacked):
                var.assign(self._stack([groups[g][i].value for groups in own]))
        self._rows.assign(np.asarray(rows, "int32"))

    def copy_to(self, variants, *, optimizer=False, model=True):
        """Write row k of the stacked state into variant k's own variables
        (`model`: its weights and non-trainable state; `optimizer`: its
        optimizer's variables)."""
        own = [_groups(v) for v in variants]
        for g, stacked in enumerate(self._stacked_groups()[:3]):
            if not (optimizer if g == 2 else model):
                continue
            for i, var in enumerate(stacked):
                # One transfer per variable, sliced on the host.
                value = np.asarray(ops.convert_to_numpy(var.value))
                for index, groups in enumerate(own):
                    groups[g][i].assign(self._row(value, index))

    def copy_from(self, variants, index):
        """Write variant `index`'s own state (optimizer too) into row `index`."""
        groups = _groups(variants[index])
        for g, stacked in enumerate(self._stacked_groups()[:3]):
            for i, var in enumerate(stacked):
                own = ops.convert_to_numpy(groups[g][i])
                if self.unit:
                    var.assign(own)
                    continue
                values = np.array(ops.convert_to_numpy(var.value))
                values[index] = own
                var.assign(values)


def _with(values: list, at: int, value) -> list:
    """`values` with `value` inserted at position `at`."""
    return [*values[:at], value, *values[at:]]


class _Constant(keras.initializers.Initializer):
    """An initializer returning a given value (the stacked initial state)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return ops.cast(self.value, dtype) if dtype is not None else self.value


class _StackLayouts:
    """Names and, under a `keras.distribution`, layouts of the stacked state.

    A stacked variable is laid out as its lane variable is (the distribution's
    layout for the template's weight, the optimizer's for its slots), with
    the K axis in front: over the mesh axis `"variants"` when there is one,
    else whole on every device.
    """

    def __init__(self):
        self.distribution = keras.distribution.distribution()
        self.axis = None
        self.layouts = {}
        mesh = getattr(self.distribution, "device_mesh", None)
        if mesh is not None and VARIANTS_AXIS in mesh.axis_names:
            self.axis = VARIANTS_AXIS

    def name(self, var, group, index):
        name = f"kerasreg_sweep_{('w', 'n', 'o', 'm')[group]}{index:04d}"
        if self.distribution is not None:
            axes = [None] * len(var.shape)
            spec = getattr(getattr(var.value, "sharding", None), "spec", None)
            for i, axis in enumerate(spec or ()):
                axes[i] = axis
            self.layouts[name] = (self.axis, *axes)
        return name

    def name_rows(self):
        """The name (and layout: over the K axis) of the rows' indices."""
        name = "kerasreg_sweep_rows"
        if self.distribution is not None:
            self.layouts[name] = (self.axis,)
        return name

    @contextlib.contextmanager
    def scope(self):
        if self.distribution is None:
            yield
            return
        owner = self
        mesh = self.distribution.device_mesh

        class Stacked(keras.distribution.ModelParallel):
            def get_variable_layout(self, variable):
                axes = owner.layouts.get(variable.name)
                if axes is None:
                    return super().get_variable_layout(variable)
                return keras.distribution.TensorLayout(axes, mesh)

        stacked = Stacked(
            layout_map=keras.distribution.LayoutMap(mesh),
            batch_dim_name=self.distribution.batch_dim_name,
        )
        with stacked.scope():
            yield


# --- the engine -------------------------------------------------------------------


def _lane(variants, compile_config, exclusions, sample, lane_index):
    """A copy of the template whose weights carry the per-row penalties."""
    with contextlib.ExitStack() as stack:
        if keras.distribution.distribution() is None:
            stack.enter_context(keras.name_scope("kerasreg_sweep_lane"))
        lane = keras.models.clone_model(variants[0])
    # clone_model drops the variables' own `trainable` flags (a layer's flag
    # is in its config) and penalty state (an L2SPPenalty's reference): the
    # lane's state groups must be the variants'.
    carry_state(variants[0], lane)
    per_variant = [v.weights for v in variants]
    for i, var in enumerate(lane.weights):
        penalties = [weights[i].regularizer for weights in per_variant]
        if all(p is None for p in penalties):
            var.regularizer = None
        else:
            var.regularizer = _LanePenalty(penalties, lane_index)
    compile_like(lane, compile_config, exclusions)
    _build(lane, sample)
    _compat.prepare_jax_step(lane)
    return lane


class Steps:
    """One sweep's stacks, one per group size, sharing one lane: each group of
    a size trains with the steps compiled for the first group of that size
    (filled with the group's variants), so a sweep in groups compiles once."""

    def __init__(self, variants: list):
        self.variants = list(variants)
        self.lane_index = _LaneIndex()
        self.lane: keras.Model | None = None
        self.stacks: dict[int, MappedStack] = {}
        self.prepared: set[int] = set()

    def prepare(self, variants, compile_config, exclusions, sample) -> None:
        """Compile `variants` like the template and build their loss, metrics
        and optimizer (a penalty taking its reference at first use takes it)."""
        for variant in variants:
            if id(variant) not in self.prepared:
                compile_like(variant, compile_config, exclusions)
                _build(variant, sample)
                self.prepared.add(id(variant))

    def stack(self, variants, compile_config, exclusions, sample) -> MappedStack:
        """The stack holding `variants` (a group of `self.variants`)."""
        rows = [
            next(i for i, v in enumerate(self.variants) if v is variant)
            for variant in variants
        ]
        stack = self.stacks.get(len(variants))
        if stack is not None:
            stack.fill(variants, rows)
            return stack
        # Building draws default seeds from Python's and NumPy's generators
        # (state the rows overwrite), which also shuffle the data: restored,
        # so that every fit of the sweep draws one data order.
        drawn = random.getstate(), np.random.get_state()
        try:
            if self.lane is None:
                # The lane carries every variant's penalty: all are prepared.
                self.prepare(self.variants, compile_config, exclusions, sample)
                self.lane = _lane(
                    self.variants, compile_config, exclusions, sample, self.lane_index
                )
            stack = MappedStack(self.lane, variants, self.lane_index, rows)
            stack.compile(
                steps_per_execution=compile_config.get("steps_per_execution", 1),
                jit_compile=compile_config.get("jit_compile", "auto"),
                run_eagerly=compile_config.get("run_eagerly", False),
            )
        finally:
            random.setstate(drawn[0])
            np.random.set_state(drawn[1])
        self.stacks[len(variants)] = stack
        return stack


def fit(
    variants,
    names,
    logs,
    compile_config,
    exclusions,
    x,
    y,
    fit_kwargs,
    steps: Steps | None = None,
):
    """Train the variants as one mapped model in one `fit`; their histories.

    `steps` (one per sweep) reuses the compiled steps of an earlier group of
    the sweep's variants; without it, the variants are the whole sweep.
    """
    sample, x = _first_batch(x, y)
    if steps is None:
        steps = Steps(variants)
    steps.prepare(variants, compile_config, exclusions, sample)
    stack = steps.stack(variants, compile_config, exclusions, sample)
    kwargs = dict(fit_kwargs)
    # A stopped variant keeps the optimizer state it stopped with.
    variant_callbacks = stopping.variant_callbacks(
        kwargs,
        variants,
        names,
        optimizer=True,
        write=stack.copy_from,
        copy_optimizer=lambda v: stack.copy_to(v, optimizer=True, model=False),
    )
    monitor = Monitor(
        variants,
        names,
        logs,
        kwargs.get("verbose", "auto"),
        stack.keys,
        stack.copy_to,
        variant_callbacks,
    )
    kwargs["callbacks"] = [monitor]
    if keras.distribution.distribution() is not None:
        kwargs["callbacks"].append(InlineBatchLogs())
    stack.fit(x, y, **kwargs)
    stack.copy_to(variants, optimizer=True)
    return stopping.histories(monitor)
