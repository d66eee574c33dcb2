"""Weight decay and soft-thresholding after each update, and a one-off shrink.

`WeightDecay` shrinks the selected weights toward zero (or toward a reference)
after every optimizer update or epoch of `fit`, whatever the optimizer;
`SoftThreshold` applies the proximal step of an L1 penalty, which makes exact
zeros; `shrink_weights` scales weights once, outside `fit`. The first two are
small transforms on the machinery of `kerasreg.poststep`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import validate_factor, validate_unit_interval
from kerasreg.inplace import InPlaceUpdate, cast_exact, update_model_weights
from kerasreg.norms import weight_norms
from kerasreg.poststep import PostStepTransform
from kerasreg.selection import Where, check_where, select_weights, weight_paths

LOG_KEY = "weight_decay_rate"  # the default `WeightDecay` logs key
TOWARD_START = "start"


def host_factor(strengths: Sequence[Any], dtype: str = "float32") -> Any:
    """`prod(1 - s)`: exact in float64 for Python numbers, else in `dtype`."""
    if all(isinstance(s, float) for s in strengths):
        return math.prod(1.0 - s for s in strengths)
    return ops.prod(ops.stack([1.0 - cast_exact(s, dtype) for s in strengths]))


def _scale(value: Any, factor: Any, ref: Any) -> Any:
    """`factor * w`, or `ref + factor * (w - ref)`: decay toward `ref`."""
    if ref is None:
        return ops.multiply(value, factor)
    return ops.add(ref, ops.multiply(factor, ops.subtract(value, ref)))


class WeightDecay(PostStepTransform):
    """Shrink the selected weights by `(1 - rate)` after every update or epoch.

    After each optimizer update (`frequency="batch"`) or each epoch
    (`frequency="epoch"`), every selected weight becomes

        w <- w * (1 - rate_t)                  (toward=None)
        w <- w - rate_t * (w - ref)            (toward a reference `ref`)

    where `rate_t` is `rate`, or `schedule(t)` when a schedule is given, times
    the optimizer's learning rate at that step when `lr_scaled=True` (the
    AdamW convention). `t` is the optimizer step (`optimizer.iterations`
    before the update, counted across `fit` calls) for `frequency="batch"`,
    the epoch index for `frequency="epoch"` (whose learning rate is that of
    the epoch's last update).

    Exactly once per update the optimizer applied (`iterations` moved): with
    `steps_per_execution=k` each of the k steps is followed by its decay
    (`(1 - rate) ** k` per execution for a constant rate); with gradient
    accumulation over `n` batches the decay acts on the `n`-th batch of each
    group only, when the optimizer updates (as Keras's own `weight_decay`
    does); a step that dynamic loss scaling skips (non-finite gradients) gets
    no decay. Per epoch, an epoch without any applied update gets none. With
    the optimizer's `use_ema=True`, the decay is applied once more after Keras
    writes the moving average over the weights at the end of `fit`, so the
    model ends with the moving average of the decayed weights (exactly, for a
    constant rate).

    This is decoupled weight decay (Loshchilov and Hutter, 2019): it acts on
    the weights directly, whatever the optimizer. Under plain SGD at learning
    rate `lr`, shrinking by `(1 - r)` per step matches `L2Penalty(r / (2 * lr))`
    to first order; under Adam it does not (an L2 penalty's gradient is
    rescaled by Adam, the decay is not). Decay toward the pretrained weights
    is L2-SP's decoupled form (Li et al., 2018); toward the initial weights,
    L2-Init (Kumar et al., 2023).

    Per-step decay with a constant rate or a
    `keras.optimizers.schedules.LearningRateSchedule` is folded into the
    model's compiled train step (no batch hook, no host sync); per-epoch decay
    runs before the epoch's validation (so `val_loss`, `EarlyStopping` and
    `ModelCheckpoint` see the decayed weights); a schedule that is any other
    Python callable is called on the host with each step index. A rate
    outside `[0, 1)` (from `rate`, a schedule or the learning-rate product)
    raises a `ValueError` naming the step, and never touches a weight. The
    rate applied is written to `logs[f"{name}_rate"]` (default key
    `"weight_decay_rate"`; several kerasreg callbacks with one name in one
    `fit` get `name_2_rate`, ... in list order).

    Args:
        rate: float in `[0, 1)`, the fraction removed per update (or epoch).
            Ignored when `schedule` is given. Checked again when set and at
            the start of each `fit`.
        frequency: `"batch"` (default: after every optimizer update) or
            `"epoch"`.
        where: which weights (see `kerasreg.selection`): `None` (default:
            trainable weights with `ndim >= 2`), a regular expression searched
            in the weight's path, a callable `variable -> bool`, or an
            iterable of layers and/or variables. An empty selection raises at
            the start of `fit`, before any weight changes.
        lr_scaled: bool, default False. Multiply the rate by the learning rate
            of the step (of the epoch's last step, per epoch).
        schedule: optional `LearningRateSchedule` or Python callable
            `t -> rate`, replacing `rate`.
        toward: `None` (decay to zero), `"start"` (each selected weight's
            value when this callback first starts training; kept on the
            device across later fits with the same callback), a
            `keras.Model` of the same architecture (matched weight by weight
            in model order) or a mapping `{weight path: array}` (paths as
            `kerasreg.selection.weight_paths` gives them).
        name: str, default `"weight_decay"`: names the `logs` key.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 3)), np.zeros((8, 1))
    >>> history = model.fit(x, y, epochs=2, verbose=0,
    ...                     callbacks=[WeightDecay(0.02)])
    >>> history.history["weight_decay_rate"]
    [0.02, 0.02]
    """

    STRENGTH = "rate"
    DEFAULT_NAME = "weight_decay"

    def __init__(
        self,
        rate: float = 0.01,
        *,
        frequency: str = "batch",
        where: Where = None,
        lr_scaled: bool = False,
        schedule: Callable[[int], Any] | None = None,
        toward: Any = None,
        name: str | None = None,
    ):
        super().__init__(
            rate,
            frequency=frequency,
            where=where,
            lr_scaled=lr_scaled,
            schedule=schedule,
            name=name,
        )
        self.toward = _check_toward(toward)
        self._start: dict[int, Any] = {}

    @property
    def rate(self) -> float:
        return self._strength

    @rate.setter
    def rate(self, value: Any) -> None:
        self._strength = self._check_strength(value, "rate")

    def _check_strength(self, value: Any, name: str) -> float:
        return validate_unit_interval(value, name, type(self).__name__, upper=False)

    def _strength_ok(self, strength: Any) -> Any:
        return ops.logical_and(strength >= 0.0, strength < 1.0)

    def _param(self, strengths: Sequence[Any]) -> Any:
        return host_factor(strengths, self.strength_dtype)

    def param_in_step(self, strength: Any) -> Any:
        if isinstance(strength, float):
            return 1.0 - strength  # exact in float64
        return ops.subtract(1.0, cast_exact(strength, self.strength_dtype))

    transform = staticmethod(_scale)  # type: ignore[assignment]  # called positionally

    def describe_action(self) -> str:
        if self.schedule is not None:
            text = f"decay schedule {self.schedule!r}"
        else:
            text = f"decay rate {self.rate:g}"
        if self.lr_scaled:
            text += " x lr"
        text += " per update" if self.frequency == "batch" else " per epoch"
        if self.toward is not None:
            text += f" toward {_describe_toward(self.toward)}"
        return text

    def _references(self, model: keras.Model, variables: list[Any]) -> list | None:
        toward = self.toward
        if toward is None:
            return None
        if isinstance(toward, str):  # "start": captured once, kept across fits
            missing = [v for v in variables if id(v) not in self._start]
            for v in missing:
                self._start[id(v)] = (v, _compat.eager_copy(v))
            return [self._start[id(v)][1] for v in variables]
        paths = weight_paths(model)
        if isinstance(toward, keras.Model):
            ours, theirs = list(model.weights), list(toward.weights)
            if len(ours) != len(theirs):
                raise ValueError(
                    f"WeightDecay: invalid `toward`: model {toward.name!r} has "
                    f"{len(theirs)} weights, the trained model {model.name!r} has "
                    f"{len(ours)}: expected a model of the same architecture."
                )
            by_id = {id(v): w for v, w in zip(ours, theirs, strict=True)}
            refs = []
            for v in variables:
                ref = by_id[id(v)]
                _check_shape(v, tuple(ref.shape), paths, f"model {toward.name!r}")
                refs.append(_compat.eager_copy(ref))
            return refs
        missing = [paths[id(v)] for v in variables if paths[id(v)] not in toward]
        if missing:
            raise ValueError(
                "WeightDecay: invalid `toward`: the mapping has no reference for "
                f"the selected weights {missing[:8]}. Its keys must be weight paths "
                "as kerasreg.selection.weight_paths gives them."
            )
        unknown = sorted(set(toward) - set(paths.values()))
        if unknown:
            raise ValueError(
                f"WeightDecay: invalid `toward`: keys {unknown[:8]} are not weight "
                f"paths of model {model.name!r}."
            )
        refs = []
        for v in variables:
            value = ops.convert_to_tensor(toward[paths[id(v)]], dtype=v.dtype)
            _check_shape(v, tuple(value.shape), paths, "the mapping")
            refs.append(value)
        return refs


class SoftThreshold(PostStepTransform):
    """Soft-threshold the selected weights after every update or epoch: exact zeros.

    `w <- sign(w) * max(|w| - threshold_t, 0)`: the proximal step of an L1
    penalty (ISTA). A gradient step on `L1Penalty` oscillates around zero and
    never lands on it; this step sets every weight with `|w| <= threshold_t`
    to exactly 0 and moves the others toward zero by `threshold_t`. Under
    plain SGD at learning rate `lr`, `SoftThreshold(lr * l1)` after each step
    is the proximal-gradient form of `L1Penalty(l1)`; `lr_scaled=True` gives
    that product from `threshold=l1`.

    `threshold_t` is `threshold`, or `schedule(t)`, times the learning rate
    when `lr_scaled=True`; same steps, selection, checks and `logs` handling
    as `WeightDecay` (key `f"{name}_threshold"`, default name `"prox_l1"`).
    With the optimizer's `use_ema=True`, the threshold is applied once more
    after Keras writes its moving average over the weights at the end of
    `fit`, so the model ends with exact zeros.

    Args:
        threshold: float, finite and >= 0, per update (or epoch).
        frequency: `"batch"` (default) or `"epoch"`.
        where: which weights, as in `WeightDecay`.
        lr_scaled: bool, default False: multiply by the learning rate.
        schedule: optional `LearningRateSchedule` or callable `t -> threshold`.
        name: str, default `"prox_l1"`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 3)), np.zeros((8, 1))
    >>> _ = model.fit(x, y, epochs=2, verbose=0, callbacks=[SoftThreshold(10.0)])
    >>> float(np.abs(model.layers[0].kernel.numpy()).max())
    0.0
    """

    STRENGTH = "threshold"
    DEFAULT_NAME = "prox_l1"

    def __init__(
        self,
        threshold: float,
        *,
        frequency: str = "batch",
        where: Where = None,
        lr_scaled: bool = False,
        schedule: Callable[[int], Any] | None = None,
        name: str | None = None,
    ):
        super().__init__(
            threshold,
            frequency=frequency,
            where=where,
            lr_scaled=lr_scaled,
            schedule=schedule,
            name=name,
        )

    @property
    def threshold(self) -> float:
        return self._strength

    @threshold.setter
    def threshold(self, value: Any) -> None:
        self._strength = self._check_strength(value, "threshold")

    def _check_strength(self, value: Any, name: str) -> float:
        return validate_factor(value, name, type(self).__name__)

    def _strength_ok(self, strength: Any) -> Any:
        return ops.logical_and(strength >= 0.0, ops.isfinite(strength))

    def _param(self, strengths: Sequence[Any]) -> Any:
        # Soft-thresholds compose: t1 then t2 is one soft-threshold by t1 + t2.
        if all(isinstance(s, float) for s in strengths):
            return math.fsum(strengths)
        return ops.sum(
            ops.stack([cast_exact(s, self.strength_dtype) for s in strengths])
        )

    def param_in_step(self, strength: Any) -> Any:
        return strength

    @staticmethod
    def transform(value: Any, param: Any, ref: Any) -> Any:
        # `relu`, not `maximum(x, 0.0)`: Keras's torch `maximum` returns
        # float32 for float64 inputs (3.15), rounding the weights. A NaN
        # weight stays NaN either way (`sign(nan)` is nan).
        shrunk = ops.relu(ops.subtract(ops.abs(value), param))
        return ops.multiply(ops.sign(value), shrunk)

    def describe_action(self) -> str:
        if self.schedule is not None:
            text = f"soft-threshold schedule {self.schedule!r}"
        else:
            text = f"soft-threshold {self.threshold:g}"
        if self.lr_scaled:
            text += " x lr"
        return text + (" per update" if self.frequency == "batch" else " per epoch")


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
            expression searched in the weight's path, a callable
            `variable -> bool`, or an iterable of layers and/or variables.

    Returns:
        `{path: {"before": float, "after": float}}`: the L2 norm
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
    factor = validate_unit_interval(factor, "factor", "shrink_weights", upper=True)
    where = check_where(where)
    variables = select_weights(model, where)
    before = weight_norms(model, variables)
    update_model_weights(model, InPlaceUpdate(variables, _scale), factor)
    after = weight_norms(model, variables)
    return {
        path: {"before": before[path]["l2"], "after": after[path]["l2"]}
        for path in before
    }


def _check_toward(toward: Any) -> Any:
    if toward is None or isinstance(toward, keras.Model):
        return toward
    if isinstance(toward, str):
        if toward != TOWARD_START:
            raise ValueError(
                f"WeightDecay: invalid `toward`: expected None, 'start', a "
                f"keras.Model or a mapping {{weight path: array}}. Received: "
                f"toward={toward!r}."
            )
        return toward
    if isinstance(toward, Mapping):
        if not all(isinstance(k, str) for k in toward):
            raise TypeError(
                "WeightDecay: invalid `toward`: a mapping's keys must be weight "
                f"paths (str). Received keys: {list(toward)[:8]!r}."
            )
        return dict(toward)
    raise TypeError(
        "WeightDecay: invalid `toward`: expected None, 'start', a keras.Model or "
        f"a mapping {{weight path: array}}. Received: toward={toward!r} "
        f"(type {type(toward).__name__})."
    )


def _check_shape(variable: Any, shape: tuple, paths: dict, source: str) -> None:
    if tuple(variable.shape) != tuple(shape):
        raise ValueError(
            f"WeightDecay: invalid `toward`: {source} gives shape {tuple(shape)} "
            f"for weight {paths.get(id(variable), variable.path)!r} of shape "
            f"{tuple(variable.shape)}."
        )


def _describe_toward(toward: Any) -> str:
    if isinstance(toward, str):
        return "its value at the start of training"
    if isinstance(toward, keras.Model):
        return f"model {toward.name!r}"
    return "given references"
