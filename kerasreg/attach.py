"""Post-hoc penalties: put regularizers on a model that is already built or trained.

Keras reads `kernel_regularizer` and friends only when a layer builds its
weights, and caches its compiled train/test/predict functions. `regularize`
does the three things needed to change a penalty afterwards: it sets the layer
attribute (so `get_config` and saving keep it), the variable's `regularizer`
(so `model.losses` sees it), and drops the cached functions (so the very next
`fit`, `evaluate` or `predict` is re-traced with the penalty).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import keras

from kerasreg.penalties import get
from kerasreg.selection import (
    compile_pattern,
    describe_where,
    walk_layers,
    where_predicate,
)


class _Remove:
    """Type of `REMOVE`: passed for a role, it takes that role's penalty off."""

    _instance: _Remove | None = None

    def __new__(cls) -> _Remove:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "kerasreg.REMOVE"

    def __reduce__(self) -> str:
        return "REMOVE"


REMOVE = _Remove()
"""Sentinel for `regularize`: `regularize(model, kernel=REMOVE)` removes penalties."""

# role -> (layer attribute, variable attribute) pairs, tried on every layer/cell.
ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "kernel": (
        ("kernel_regularizer", "kernel"),
        ("embeddings_regularizer", "embeddings"),
        ("depthwise_regularizer", "depthwise_kernel"),
        ("pointwise_regularizer", "pointwise_kernel"),
    ),
    "recurrent": (("recurrent_regularizer", "recurrent_kernel"),),
    "bias": (("bias_regularizer", "bias"),),
}

LayerFilter = "None | str | Callable[[keras.layers.Layer], bool] | Iterable[Layer]"


def regularize(
    model: keras.Model,
    kernel: Any = None,
    recurrent: Any = None,
    bias: Any = None,
    *,
    where: Any = None,
    layers: Any = None,
) -> keras.Model:
    """Attach (or remove) weight penalties on a built or trained model, in place.

    For each role given, every layer in scope that has that role gets the
    penalty: `kernel` is `kernel_regularizer` (`embeddings_regularizer` for
    `Embedding`, `depthwise_regularizer`/`pointwise_regularizer` for
    depthwise and separable convolutions), `recurrent` is
    `recurrent_regularizer`, `bias` is `bias_regularizer`. RNN layers are
    handled on their cell, `Bidirectional` on both directions, and nested
    models are walked. The layer attribute and the variable's `regularizer`
    are both set, and the model's cached train/test/predict functions are
    dropped, so `model.losses`, the next `fit`/`evaluate` and a saved model all
    include the penalty. The weights themselves are not touched.

    Every argument is validated before anything changes: a call that raises
    leaves the model exactly as it was.

    Args:
        model: a built `keras.Model`.
        kernel: penalty for kernels, anything `kerasreg.get` resolves (an
            instance, a name such as `"l2_penalty"`, a config dict, a
            callable), `None` to leave kernels alone, or `kerasreg.REMOVE` to
            take their penalty off.
        recurrent: same, for the recurrent kernels of RNN layers.
        bias: same, for biases.
        where: which weights, as everywhere in kerasreg (see
            `kerasreg.selection`): each role applies to the selected weights
            that have that role. `None` (default) means every weight of the
            role, since the role already says which kind of weight (so
            `bias=` reaches biases, which the `kernels()` rule leaves out).
            E.g. `where=kerasreg.layer("^encoder$")` or `where="^encoder/"`.
        layers: deprecated alias, kept for now: `layers=x` (a layer-name
            regular expression, a callable `layer -> bool`, or an iterable of
            layers of `model`) is `where=kerasreg.layer(x)`, except that it
            also reaches non-trainable weights. Emits a `DeprecationWarning`.

    Returns:
        `model` itself.

    Raises:
        TypeError: `model` is not a `keras.Model`, or `where`/`layers` has
            an unsupported type, or both are given.
        ValueError: a penalty cannot be resolved, no role is given, `layers`
            matches no layer (or names a layer outside `model`), or no selected
            weight has a requested role.

    Example:

    >>> import kerasreg
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model = regularize(model, kernel=kerasreg.L2Penalty(1e-3))
    >>> model.layers[0].kernel_regularizer
    L2Penalty(l2=0.001)
    >>> model = regularize(model, kernel=kerasreg.REMOVE)
    >>> model.layers[0].kernel_regularizer is None
    True
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Invalid `model`: expected a built keras.Model. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
    requested = {
        role: _resolve(role, value)
        for role, value in (
            ("kernel", kernel),
            ("recurrent", recurrent),
            ("bias", bias),
        )
        if value is not None
    }
    if not requested:
        raise ValueError(
            "regularize() needs at least one of `kernel`, `recurrent`, `bias`: "
            "a penalty, or kerasreg.REMOVE to remove one. Received all None."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: build it (call it on data or "
            "give it an Input) before attaching penalties."
        )
    if layers is not None:
        if where is not None:
            raise TypeError(
                "regularize() takes `where=` or its deprecated alias `layers=`, "
                f"not both. Received: where={describe_where(where)}, "
                f"layers={_describe(layers)}."
            )
        warnings.warn(
            "regularize(layers=...) is deprecated: pass where=kerasreg.layer(...) "
            "with the same layers (it selects their trainable weights), or any "
            "other `where=` rule.",
            DeprecationWarning,
            stacklevel=2,
        )
    if isinstance(layers, Iterable) and not isinstance(
        layers, (str, bytes, dict, keras.layers.Layer)
    ):
        layers = list(layers)  # a generator is read twice: to match and to report
    in_scope = _layers_in_scope(model, layers)
    if where is None:
        selected: Callable[[Any], bool] = lambda variable: True  # noqa: E731
    else:
        selected = where_predicate(where, model)

    changes: list[tuple[Any, str, Any, Any]] = []
    for role, penalty in requested.items():
        found = [
            (layer, attribute, variable)
            for layer in in_scope
            for attribute, variable in _role_slots(layer, role)
            if selected(variable)
        ]
        if not found:
            if where is not None:
                raise ValueError(
                    f"Invalid `{role}`: no weight that "
                    f"`where`={describe_where(where)} selects has a {role} role."
                )
            names = ", ".join(layer.name for layer in in_scope[:12])
            raise ValueError(
                f"Invalid `{role}`: no layer in scope has a {role} weight "
                f"(layers={_describe(layers)}; layers in scope: {names})."
            )
        value = None if penalty is REMOVE else penalty
        changes.extend((layer, attr, var, value) for layer, attr, var in found)

    for layer, attribute, variable, value in changes:
        if hasattr(value, "set_reference"):  # L2SPPenalty: one copy per weight
            value = type(value).from_config(value.get_config()).set_reference(variable)
        setattr(layer, attribute, value)
        variable.regularizer = value
    _drop_compiled_functions(model)
    return model


def _resolve(role: str, value: Any) -> Any:
    if value is REMOVE:
        return REMOVE
    try:
        penalty = get(value)
    except ValueError as error:
        raise ValueError(f"Invalid `{role}`: {error}") from None
    if not callable(penalty):
        raise ValueError(
            f"Invalid `{role}`: expected a penalty, None or kerasreg.REMOVE. "
            f"Received: {role}={value!r}."
        )
    return penalty


def _layers_in_scope(model: keras.Model, layers: Any) -> list[Any]:
    """Layers of `model` that `layers` selects, directly or through an ancestor."""
    walked = list(walk_layers(model))
    if layers is None:
        return [layer for layer, _ in walked]
    match = _layer_predicate(layers, walked, model)
    in_scope = [
        layer
        for layer, ancestors in walked
        if match(layer) or any(match(a) for a in ancestors if a is not model)
    ]
    if not in_scope:
        names = ", ".join(layer.name for layer, _ in walked[1:13])
        raise ValueError(
            f"Invalid `layers`: {_describe(layers)} matches no layer of model "
            f"{model.name!r}. Its layers are: {names}."
        )
    return in_scope


def _layer_predicate(
    layers: Any, walked: list[tuple[Any, tuple[Any, ...]]], model: keras.Model
) -> Callable[[Any], bool]:
    if isinstance(layers, str):
        pattern: re.Pattern = compile_pattern(layers, "layers")
        return lambda layer: pattern.search(layer.name) is not None
    if isinstance(layers, keras.layers.Layer):
        layers = [layers]
    if callable(layers):
        return lambda layer: bool(layers(layer))
    if isinstance(layers, Iterable) and not isinstance(layers, (bytes, dict)):
        known = {id(layer) for layer, _ in walked}
        ids = set()
        for item in layers:
            if not isinstance(item, keras.layers.Layer):
                raise TypeError(
                    "Invalid `layers`: an iterable must hold Keras layers. "
                    f"Received an item {item!r} (type {type(item).__name__})."
                )
            if id(item) not in known:
                raise ValueError(
                    f"Invalid `layers`: layer {item.name!r} is not part of "
                    f"model {model.name!r}."
                )
            ids.add(id(item))
        return lambda layer: id(layer) in ids
    raise TypeError(
        "Invalid `layers`: expected None, a regular expression string, a "
        "callable `layer -> bool`, or an iterable of layers. "
        f"Received: layers={layers!r} (type {type(layers).__name__})."
    )


def _role_slots(layer: Any, role: str) -> list[tuple[str, Any]]:
    """`(attribute, variable)` pairs through which `layer` itself owns `role`."""
    slots = []
    for attribute, variable_name in ROLES[role]:
        if attribute not in vars(layer):
            continue
        variable = _own_variable(layer, variable_name)
        if variable is not None:
            slots.append((attribute, variable))
    return slots


def _own_variable(layer: Any, name: str) -> Any:
    # Dense/Embedding keep the variable in `_kernel`/`_embeddings` behind a property.
    for attribute in (f"_{name}", name):
        candidate = vars(layer).get(attribute)
        if isinstance(candidate, keras.Variable):
            return candidate
    return None


def _drop_compiled_functions(model: keras.Model) -> None:
    # What `Trainer.compile` does: the next fit/evaluate/predict re-traces.
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)


def _describe(layers: Any) -> str:
    if layers is None or isinstance(layers, str):
        return repr(layers)
    if callable(layers):
        return getattr(layers, "__name__", repr(layers))
    text = repr([getattr(item, "name", item) for item in layers])
    return text if len(text) <= 200 else text[:197] + "..."
