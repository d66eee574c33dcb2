"""Weight penalties: serializable regularizers usable wherever Keras takes one.

Every penalty subclasses `keras.regularizers.Regularizer`, is registered under the
`kerasreg` package (registered name `"kerasreg>ClassName"`), computes with
`keras.ops` only, and accumulates in float32 when the weights are float16 or
bfloat16. Class names never equal a Keras built-in, so a model saved with a
kerasreg penalty cannot silently load with a different one.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import accumulation_dtype, validate_factor

_PACKAGE = "kerasreg"

# `ExpAbsPenalty` is exact up to this |w|; beyond it, a quadratic continuation.
EXP_ABS_EXACT_LIMIT = 20.0


def _abs(x):
    """`|x|` whose gradient at 0 is 0 on every backend (JAX's `abs` gives 1 there)."""
    return ops.sign(x) * x


class Penalty(keras.regularizers.Regularizer):
    """Base class of the kerasreg penalties.

    Subclasses define `_ARGS` (argument names, in order) and `penalty(x)`, the
    value for a weight tensor `x` already in its accumulation dtype. The base
    class validates arguments, casts float16/bfloat16 weights to float32, and
    provides `get_config`, `from_config`, equality, hashing and `repr`.
    """

    _ARGS: tuple[str, ...] = ()

    def __call__(self, x):
        return self.penalty(accumulation_dtype(x))

    def penalty(self, x):
        raise NotImplementedError

    def get_config(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self._ARGS}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Penalty:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.get_config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L1Penalty(Penalty):
    """L1 penalty: `l1 * sum(abs(w))`.

    Same value as `keras.regularizers.L1(l1)`; registered as `"kerasreg>L1Penalty"`.

    Args:
        l1: float, default 0.01. Finite and >= 0.

    Example:

    >>> layer = keras.layers.Dense(4, kernel_regularizer=L1Penalty(1e-3))
    """

    _ARGS = ("l1",)

    def __init__(self, l1: float = 0.01):
        self.l1 = validate_factor(l1, "l1", type(self).__name__)

    def penalty(self, x):
        return self.l1 * ops.sum(_abs(x))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L2Penalty(Penalty):
    """L2 penalty: `l2 * sum(w**2)`, with no factor 1/2 (the Keras convention).

    Same value as `keras.regularizers.L2(l2)`. The textbook penalty
    `lambda / 2 * ||w||^2` is `L2Penalty(lambda / 2)`. Under plain SGD with
    learning rate `lr`, `L2Penalty(c)` is exactly the update
    `w <- (1 - 2 * lr * c) * w - lr * grad`.

    Args:
        l2: float, default 0.01. Finite and >= 0.

    Example:

    >>> layer = keras.layers.Dense(4, kernel_regularizer=L2Penalty(1e-3))
    """

    _ARGS = ("l2",)

    def __init__(self, l2: float = 0.01):
        self.l2 = validate_factor(l2, "l2", type(self).__name__)

    def penalty(self, x):
        return self.l2 * ops.sum(ops.square(x))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ElasticNetPenalty(Penalty):
    """Elastic-net penalty: `l1 * sum(abs(w)) + l2 * sum(w**2)`.

    Same value as `keras.regularizers.L1L2(l1, l2)`. Use `from_ratio` to give
    the factors in scikit-learn's `(alpha, l1_ratio)` convention.

    Args:
        l1: float, default 0.01. Finite and >= 0.
        l2: float, default 0.01. Finite and >= 0.

    Example:

    >>> penalty = ElasticNetPenalty.from_ratio(alpha=1e-3, l1_ratio=0.5)
    >>> penalty
    ElasticNetPenalty(l1=0.0005, l2=0.00025)
    """

    _ARGS = ("l1", "l2")

    def __init__(self, l1: float = 0.01, l2: float = 0.01):
        self.l1 = validate_factor(l1, "l1", type(self).__name__)
        self.l2 = validate_factor(l2, "l2", type(self).__name__)

    @classmethod
    def from_ratio(cls, alpha: float, l1_ratio: float) -> ElasticNetPenalty:
        """Build from scikit-learn's convention.

        `alpha * (l1_ratio * |w|_1 + 0.5 * (1 - l1_ratio) * |w|_2^2)`, that is
        `l1 = alpha * l1_ratio` and `l2 = 0.5 * alpha * (1 - l1_ratio)`.

        Args:
            alpha: float, finite and >= 0: overall strength.
            l1_ratio: float in `[0, 1]`: share of the L1 term.
        """
        owner = f"{cls.__name__}.from_ratio"
        alpha = validate_factor(alpha, "alpha", owner)
        l1_ratio = validate_factor(l1_ratio, "l1_ratio", owner)
        if l1_ratio > 1:
            raise ValueError(
                f"{owner}: invalid `l1_ratio`: expected a number in [0, 1]. "
                f"Received: l1_ratio={l1_ratio!r}."
            )
        return cls(l1=alpha * l1_ratio, l2=0.5 * alpha * (1.0 - l1_ratio))

    def penalty(self, x):
        return self.l1 * ops.sum(_abs(x)) + self.l2 * ops.sum(ops.square(x))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExpAbsPenalty(Penalty):
    """Exponential penalty: `factor * sum(exp(abs(w)) - 1)`.

    Grows gently near zero (like L1 there: `exp(a) - 1 ~ a`) and very steeply
    for large weights. Computed with `expm1`, exactly, for `|w| <= 20`. Beyond
    that, where `exp` would soon overflow float32 (at `|w| = 88.7`), each term
    continues as the second-order Taylor expansion at `c = 20`:
    `exp(c) * (1 + d + d**2 / 2) - 1` with `d = |w| - c`. The continuation
    matches value, slope and curvature at `c`, is increasing, and stays finite
    (value and gradient) in float32 for `|w|` up to 1e6 and beyond.

    Args:
        factor: float, default 0.01. Finite and >= 0.

    Example:

    >>> layer = keras.layers.Dense(4, kernel_regularizer=ExpAbsPenalty(1e-4))
    """

    _ARGS = ("factor",)

    def __init__(self, factor: float = 0.01):
        self.factor = validate_factor(factor, "factor", type(self).__name__)

    def penalty(self, x):
        c = EXP_ABS_EXACT_LIMIT
        a = _abs(x)
        beyond = a > c
        # Both branches are clamped so neither produces inf/NaN (or its gradient).
        exact = ops.expm1(ops.where(beyond, c, a))
        d = ops.where(beyond, a - c, ops.zeros_like(a))
        tail = math.exp(c) * (d + 0.5 * ops.square(d))
        return self.factor * ops.sum(exact + tail)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L2SPPenalty(Penalty, _compat.KerasSaveable, _compat.LayerState):
    """L2 penalty toward a reference: `alpha * sum((w - ref)**2)`.

    L2-SP (Li, Grandvalet and Davoine, ICML 2018) keeps a fine-tuned weight
    near its pretrained value instead of near zero; with the initial weights as
    reference it is L2-Init (Kumar, Marklund and Van Roy, 2023). Keras
    convention: no factor 1/2. `ref` is the weight's value when the penalty is
    attached to it:

    - `kerasreg.regularize(model, kernel=L2SPPenalty(a))` gives each selected
      weight its own copy of the penalty with `ref` = its current value (L2-SP
      for a trained model);
    - given to a layer constructor (`Dense(8, kernel_regularizer=
      L2SPPenalty(a))`), `ref` is the weight's value the first time the
      penalty sees it: at the first `fit`, `evaluate` or `model.losses`, so the
      initial weights (L2-Init) unless you load other weights before.

    The reference is model state, not a weight. It lives in a non-trainable
    `keras.Variable` (`penalty.reference`) that the layer holding the penalty
    passes to every compiled step (it is in `layer.variables` and
    `model.non_trainable_variables`, like a `keras.random.SeedGenerator`'s
    state), so `set_reference` and `load_weights` take effect in the very next
    `fit`, `evaluate`, `train_on_batch`, `model.losses` and
    `kerasreg.weight_norms`, on every backend. It is not in `model.weights`
    (nor `get_weights`, `summary`'s counts, or any `where=` selection): never
    trained, decayed or shrunk.

    It is saved with the model: `model.save` and `model.save_weights` write it
    into the weights file (dataset `"0"` of the layer's `kernel_regularizer`
    group, or the group of the attribute holding the penalty), and
    `keras.saving.load_model` and `load_weights` restore it exactly, in any
    process. A file saved before the penalty's first use holds no reference:
    loading it into a penalty that has one sets the reference to the loaded
    weight (what the first use would take). `clone_model` and `from_config`
    build new penalties from the config alone: like a constructor's, their
    reference is their weight at first use; copy one with
    `clone.set_reference(original.reference)`.

    One instance serves one weight: used on a second weight it raises instead
    of measuring against the first one's reference. Asked for a value with no
    reference and no variable to take it from, it raises.

    Args:
        alpha: float, default 0.01. Finite and >= 0.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> _ = kerasreg.regularize(model, kernel=L2SPPenalty(0.1))
    >>> total = lambda: float(keras.ops.convert_to_numpy(sum(model.losses)))
    >>> total()  # the weights are still at their reference
    0.0
    >>> penalty = model.layers[0].kernel.regularizer
    >>> _ = penalty.set_reference(np.ones((3, 2)))  # a new anchor, in place
    >>> kernel = model.layers[0].kernel
    >>> bool(abs(total() - float(keras.ops.convert_to_numpy(penalty(kernel)))) < 1e-6)
    True
    """

    _ARGS = ("alpha",)

    def __init__(self, alpha: float = 0.01):
        self.alpha = validate_factor(alpha, "alpha", type(self).__name__)
        self._reference = None
        self._placeholder = None
        self._owner = None

    @property
    def reference(self) -> Any:
        """The non-trainable `keras.Variable` holding `ref`, or None before first use."""
        return self._reference

    @property
    def variables(self) -> list[Any]:
        """The state this penalty's value depends on: `[reference]`, or `[]`."""
        return [] if self._reference is None else [self._reference]

    @property
    def state(self) -> Any:
        # What a layer holding the penalty passes to its compiled steps: the
        # reference, or an empty placeholder until the penalty has one.
        if self._reference is not None:
            return self._reference
        if self._placeholder is None:
            self._placeholder = _compat.state_variable(
                ops.zeros((0,), "float32"), "l2sp_reference"
            )
        return self._placeholder

    def set_reference(self, value: Any) -> L2SPPenalty:
        """Make `value` the reference `ref`, in place (a copy is kept).

        Takes effect in every compiled step at its next call (the reference
        is state those steps read), so call it between `fit`s or from outside
        the training loop.

        Args:
            value: a `keras.Variable` (its current value: e.g. the weight
                itself, or another penalty's `reference` to copy it), a
                tensor or a NumPy array, of the weight's shape.

        Returns:
            The penalty itself.

        Raises:
            TypeError: `value` is not an array-like of floats.
            ValueError: `value` has another shape than the reference this
                penalty already holds.
        """
        if isinstance(value, keras.Variable):
            copy = _compat.eager_copy(value)
            if copy is None:  # PyTorch's symbolic build: no values yet
                return self
        else:
            copy = self._as_tensor(value)
        if self._reference is None:
            name = f"{getattr(value, 'name', 'l2sp')}_reference"
            self._reference = _compat.state_variable(copy, name.replace("/", "_"))
            return self
        shape = tuple(self._reference.shape)
        if tuple(copy.shape) != shape:
            raise ValueError(
                f"L2SPPenalty.set_reference: invalid `value`: expected shape "
                f"{shape} (the reference's), received shape {tuple(copy.shape)}."
            )
        self._reference.assign(ops.cast(copy, self._reference.dtype))
        return self

    @staticmethod
    def _as_tensor(value: Any) -> Any:
        try:
            tensor = ops.convert_to_tensor(value)
        except Exception as error:
            raise TypeError(
                "L2SPPenalty.set_reference: invalid `value`: expected a "
                "keras.Variable, a tensor or a NumPy array of floats. Received: "
                f"value={value!r} (type {type(value).__name__}); {error}"
            ) from None
        if not keras.backend.is_float_dtype(tensor.dtype):
            raise TypeError(
                "L2SPPenalty.set_reference: invalid `value`: expected floats. "
                f"Received dtype {keras.backend.standardize_dtype(tensor.dtype)}."
            )
        return tensor

    def __call__(self, x):
        if isinstance(x, keras.Variable):
            owner = None if self._owner is None else self._owner()
            if owner is None:
                self._owner = weakref.ref(x)
            elif owner is not x:
                raise ValueError(
                    f"L2SPPenalty: one instance is attached to two weights "
                    f"({x.path!r} and {owner.path!r}). Each weight needs its own "
                    "reference: pass a new L2SPPenalty per weight, or attach it "
                    "with kerasreg.regularize, which copies it per weight."
                )
            if self._reference is None:
                self.set_reference(x)
                if self._reference is None:  # a shape-only symbolic pass
                    return ops.zeros((), "float32")
        if self._reference is None:
            raise ValueError(
                "L2SPPenalty has no reference weight: it gets one when attached "
                "with kerasreg.regularize, or when it first sees its weight "
                "(first fit, evaluate or model.losses). It cannot compute "
                "`alpha * sum((w - ref)**2)` without it."
            )
        if tuple(self._reference.shape) != tuple(x.shape):
            raise ValueError(
                f"L2SPPenalty: the reference has shape {tuple(self._reference.shape)} "
                f"but the weight has shape {tuple(x.shape)}."
            )
        return super().__call__(x)

    def penalty(self, x):
        ref = ops.cast(self._reference, x.dtype)
        return self.alpha * ops.sum(ops.square(ops.subtract(x, ref)))

    # Saved into the weights file (Keras's saving walks KerasSaveable objects).
    def _obj_type(self) -> str:
        return _compat.SAVEABLE_TYPE

    def save_own_variables(self, store: Any) -> None:
        # No reference yet (never evaluated): none is saved, and the loaded
        # penalty takes its weight's value at first use, as this one would.
        if self._reference is not None:
            store["0"] = ops.convert_to_numpy(self._reference)

    def load_own_variables(self, store: Any) -> None:
        # `keys()`: Keras 3.8's store has no `in` operator.
        if "0" in store.keys():  # noqa: SIM118
            self.set_reference(store["0"][...])
            return
        # Saved before first use: the reference is the weight at first use.
        # Keras loads a layer's own weights before its attributes', so the
        # weight already holds the loaded value.
        owner = None if self._owner is None else self._owner()
        if self._reference is not None and owner is not None:
            self.set_reference(owner)

    def __reduce__(self):
        return (type(self).from_config, (self.get_config(),))


PENALTIES = (L1Penalty, L2Penalty, ElasticNetPenalty, ExpAbsPenalty, L2SPPenalty)

_BY_NAME: dict[str, type[Penalty]] = {}
for _cls in PENALTIES:
    _BY_NAME[_cls.__name__] = _cls
    _BY_NAME[re.sub(r"(?<!^)(?=[A-Z])", "_", _cls.__name__).lower()] = _cls
    _BY_NAME[f"{_PACKAGE}>{_cls.__name__}"] = _cls
del _cls


def get(identifier: Any) -> keras.regularizers.Regularizer | None:
    """Resolve a regularizer identifier, as `keras.regularizers.get` does.

    Accepts `None`, a regularizer instance, a regularizer class, a config dict
    (from `keras.regularizers.serialize`), a kerasreg class name (`"L2Penalty"`),
    snake_case name (`"l2_penalty"`) or registered name (`"kerasreg>L2Penalty"`),
    a Keras built-in name (`"l2"`, `"L1L2"`), or a plain callable `w -> scalar`.
    Names build the penalty with its default arguments.

    Where strings work: here and in `kerasreg.regularize`. A Keras layer's
    `kernel_regularizer=` (and friends) resolves strings only among Keras's
    built-ins (`keras.regularizers.get` has no public extension point for
    names), so `Dense(4, kernel_regularizer="l2_penalty")` raises Keras's
    "Could not interpret regularizer identifier". Give a layer an instance
    (`L2Penalty(1e-4)`), the class (`L2Penalty`, default arguments), a config
    dict (`{"class_name": "kerasreg>L2Penalty", "config": {"l2": 1e-4}}`), or
    `kerasreg.get("l2_penalty")`.

    Args:
        identifier: what to resolve.

    Returns:
        A regularizer (or the callable given), or `None`.

    Example:

    >>> get("l2_penalty")
    L2Penalty(l2=0.01)
    """
    if identifier is None:
        return None
    if isinstance(identifier, keras.regularizers.Regularizer):
        return identifier
    if isinstance(identifier, str):
        cls = _BY_NAME.get(identifier)
        if cls is not None:
            return cls()
        try:
            return keras.regularizers.get(identifier)
        except ValueError:
            raise ValueError(_unknown(identifier)) from None
    if isinstance(identifier, dict):
        try:
            obj = keras.regularizers.deserialize(identifier, custom_objects=_BY_NAME)
        except (TypeError, ValueError, KeyError) as error:
            # The class was found but its arguments are wrong: say that first.
            raise ValueError(
                f"Invalid regularizer config {identifier!r}: {_cause(error)}"
            ) from None
        if not callable(obj):
            raise ValueError(_unknown(identifier))
        return obj
    if inspect.isclass(identifier):
        if issubclass(identifier, keras.regularizers.Regularizer):
            return identifier()
        raise ValueError(_unknown(identifier))
    if callable(identifier):
        return identifier
    raise ValueError(_unknown(identifier))


def _cause(error: Exception) -> str:
    """The constructor's own message, without Keras's deserialization preamble."""
    text = str(error)
    marker = "Exception encountered: "
    return text.rsplit(marker, 1)[-1] if marker in text else text


def _unknown(identifier: Any) -> str:
    names = ", ".join(f'"{cls.__name__}"' for cls in PENALTIES)
    return (
        f"Could not interpret regularizer identifier: {identifier!r}. Expected "
        f"None, a regularizer instance or class, a config dict, a callable, a "
        f"kerasreg name ({names}, their snake_case or 'kerasreg>' forms) or a "
        f"Keras built-in name ('l1', 'l2', 'l1l2', 'orthogonal_regularizer')."
    )
