"""Post-hoc penalties: put regularizers on a model that is already built or trained.

Keras reads `kernel_regularizer` and friends only when a layer builds its
weights, and caches its compiled train/test/predict functions. `regularize`
does the three things needed to change a penalty afterwards: it sets the layer
attribute (so `get_config` and saving keep it), the variable's `regularizer`
(so `model.losses` sees it), and drops the cached functions (so the very next
`fit`, `evaluate` or `predict` is re-traced with the penalty).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import keras

from kerasreg._checks import (
    KerasregDeprecationWarning,
    KerasregWarning,
    check_items,
)
from kerasreg._compat import (
    config_regularizer_attribute,
    set_tracked_attribute,
    sublayers,
)
from kerasreg.penalties import get
from kerasreg.selection import (
    describe_where,
    layer_matcher,
    select_weights,
    walk_layers,
    where_predicate,
)
from kerasreg.walk import weight_paths


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

# role -> (layer attribute, variable name) pairs, tried on every layer/cell.
ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "kernel": (
        ("kernel_regularizer", "kernel"),
        ("embeddings_regularizer", "embeddings"),
        ("depthwise_regularizer", "depthwise_kernel"),
        ("depthwise_regularizer", "kernel"),  # DepthwiseConv1D/2D's filters
        ("pointwise_regularizer", "pointwise_kernel"),
    ),
    "recurrent": (("recurrent_regularizer", "recurrent_kernel"),),
    "bias": (("bias_regularizer", "bias"),),
}


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

    Layer by layer (see the support table in `docs/guide/layers.md`):
    `DepthwiseConv1D/2D` filters are their kernel; `MultiHeadAttention` and
    `GroupQueryAttention` get the penalty on all projections and in their own
    saved config (so it survives saving and `clone_model`); on a LoRA-enabled
    layer the kernel penalty goes on the trainable adapters, as Keras's
    `enable_lora` does; an integer-quantized kernel is refused. Called from a
    callback during `fit`, the penalty counts from the next training step.
    A warning says when a changed layer lives inside a subclassed model or
    layer, whose saved file will not keep the penalty.

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
            matches no layer (or names a layer outside `model`), no selected
            weight has a requested role, `layers` selects some projections of an
            attention layer but not the layer, or a kernel is integer-quantized.

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
                f"layers={describe_where(layers)}."
            )
        warnings.warn(
            "regularize(layers=...) is deprecated: pass where=kerasreg.layer(...) "
            "with the same layers (it selects their trainable weights), or any "
            "other `where=` rule.",
            KerasregDeprecationWarning,
            stacklevel=2,
        )
    if isinstance(layers, Iterable) and not isinstance(
        layers, (str, bytes, dict, keras.layers.Layer)
    ):
        layers = list(layers)  # a generator is read twice: to match and to report
    walked = list(walk_layers(model))
    in_scope = _layers_in_scope(model, layers, walked)
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
                select_weights(model, where)  # selects nothing: that error
                scope = f"that `where`={describe_where(where)} selects"
            elif layers is not None:
                scope = f"in `layers`={describe_where(layers)}"
            else:
                scope = f"of model {model.name!r}"
            raise ValueError(
                f"Invalid `{role}`: no weight {scope} has a {role} role. "
                f"{role_listing(model, walked)}"
            )
        found.extend(_config_slots(walked, in_scope, found, role, layers))
        value = None if penalty is REMOVE else penalty
        changes.extend((layer, attr, var, value) for layer, attr, var in found)

    _warn_if_lost_on_save(model, walked, {id(layer) for layer, *_ in changes})
    for layer, attribute, variable, value in changes:
        if variable is not None and hasattr(value, "set_reference"):
            # L2SPPenalty: one copy per weight, its reference the current value,
            # bound to its weight by a first call (a second weight is refused).
            value = type(value).from_config(value.get_config()).set_reference(variable)
            value(variable)
        # A built layer's tracker is locked; an L2SPPenalty is layer state.
        set_tracked_attribute(layer, attribute, value)
        if variable is not None:
            variable.regularizer = value
    _remake_compiled_functions(model)
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


def role_weights(model: keras.Model, role: str, where: Any = None) -> list[Any]:
    """The weights of `model` that `where` selects and that have `role`: those
    `regularize(model, **{role: ...}, where=where)` puts the penalty on."""
    selected = (lambda v: True) if where is None else where_predicate(where, model)
    return [
        variable
        for layer, _ in walk_layers(model)
        for _, variable in _role_slots(layer, role)
        if selected(variable)
    ]


def role_listing(
    model: keras.Model, walked: list[tuple[Any, tuple[Any, ...]]] | None = None
) -> str:
    """The weights of `model` that have each role, by the paths `where=`
    patterns search: what an error about a missing role shows."""
    paths = weight_paths(model)
    walked = walked if walked is not None else list(walk_layers(model))
    parts = []
    for role in ROLES:
        names: list[str] = []
        for layer, _ in walked:
            try:
                slots = _role_slots(layer, role)
            except ValueError:  # a quantized kernel: no penalty can act on it
                continue
            names.extend(repr(paths.get(id(v), v.path)) for _, v in slots)
        more = f", ... ({len(names)} in all)" if len(names) > 8 else ""
        parts.append(f"{role}: {', '.join(names[:8]) + more if names else 'none'}")
    owners = [
        f"{layer.name} ({type(layer).__name__})"
        for layer, _ in walked
        if layer is not model and _own_variables(layer)
    ]
    return (
        f"Its weights by role: {'; '.join(parts)}. Layers with weights: "
        f"{', '.join(owners[:12]) or 'none'}{', ...' if len(owners) > 12 else ''}."
    )


def _layers_in_scope(
    model: keras.Model, layers: Any, walked: list[tuple[Any, tuple[Any, ...]]]
) -> list[Any]:
    """Layers of `model` that `layers` selects, directly or through an ancestor."""
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
            f"Invalid `layers`: {describe_where(layers)} matches no layer of model "
            f"{model.name!r}. Its layers are: {names}."
        )
    return in_scope


def _layer_predicate(
    layers: Any, walked: list[tuple[Any, tuple[Any, ...]]], model: keras.Model
) -> Callable[[Any], bool]:
    """`layers=` as `layer(...)` specs, matched by the one rule of `selection`."""
    if isinstance(layers, (str, keras.layers.Layer)) or callable(layers):
        specs: tuple[Any, ...] = (layers,)
    elif isinstance(layers, Iterable) and not isinstance(layers, (bytes, dict)):
        layer_type = keras.layers.Layer
        specs = tuple(
            check_items(layers, layer_type, "Invalid `layers`", "Keras layers")
        )
    else:
        raise TypeError(
            "Invalid `layers`: expected None, a regular expression string, a "
            "callable `layer -> bool`, or an iterable of layers. "
            f"Received: layers={layers!r} (type {type(layers).__name__})."
        )
    return layer_matcher(specs, [layer for layer, _ in walked], model, "layers")


def _role_slots(layer: Any, role: str) -> list[tuple[str, Any]]:
    """`(attribute, variable)` pairs through which `layer` itself owns `role`.

    Variables are found by name among the layer's own weights (those no
    sublayer owns), through public attributes only. A LoRA-enabled layer's
    kernel role is where Keras's own `enable_lora` puts `kernel_regularizer`:
    both trainable adapters (and, as at construction, the frozen base kernel).
    An integer-quantized kernel cannot carry a penalty: that is an error.
    """
    slots: list[tuple[str, Any]] = []
    own = None
    for attribute, variable_name in ROLES[role]:
        if not hasattr(layer, attribute):
            continue
        if own is None:
            own = _own_variables(layer)
        variable = own.get(variable_name)
        if variable is None:
            continue
        lora = [own.get(f"lora_{variable_name}_{end}") for end in ("a", "b")]
        if getattr(layer, "lora_enabled", False) and all(v is not None for v in lora):
            found = [variable, *lora]
        elif not keras.backend.is_float_dtype(variable.dtype):
            raise ValueError(
                f"Invalid `{role}`: layer {layer.name!r} "
                f"({type(layer).__name__}) is "
                f"{getattr(layer, 'quantization_mode', None) or 'quantized'}-"
                f"quantized: its {variable_name!r} is a frozen "
                f"{keras.backend.standardize_dtype(variable.dtype)} variable that "
                "no penalty can act on. Regularize before quantizing, enable LoRA "
                "(`layer.enable_lora(rank)`) to regularize its trainable adapters, "
                "or leave this layer out with `layers=`."
            )
        else:
            found = [variable]
        slots.extend((attribute, v) for v in found if all(v is not s for _, s in slots))
    return slots


def _own_variables(layer: Any) -> dict[str, Any]:
    """`{variable.name: variable}` for the weights `layer` owns itself."""
    nested = {id(v) for child in sublayers(layer) for v in child.weights}
    own: dict[str, Any] = {}
    for variable in layer.weights:
        if id(variable) not in nested:
            own.setdefault(variable.name, variable)
    return own


def _config_slots(
    walked: list[tuple[Any, tuple[Any, ...]]],
    in_scope: list[Any],
    found: list[tuple[Any, str, Any]],
    role: str,
    layers: Any,
) -> list[tuple[Any, str, None]]:
    """Slots of layers whose config holds the regularizer of their sublayers.

    `MultiHeadAttention` and `GroupedQueryAttention` save one
    `kernel_regularizer` (and `bias_regularizer`) and rebuild their projection
    layers from it on load and in `clone_model`: setting only the projections
    would be lost there. Such a layer is all or nothing: selecting some of its
    projections without the layer itself is an error.
    """
    scope = {id(layer) for layer in in_scope}
    owners = {id(layer) for layer, *_ in found}
    extra: list[tuple[Any, str, None]] = []
    for layer, _ in walked:
        for attribute in dict.fromkeys(a for a, _ in ROLES[role]):
            name = config_regularizer_attribute(layer, attribute)
            if name is None:
                continue
            inside = [
                child
                for child, parents in walked
                if id(child) in owners and any(p is layer for p in parents)
            ]
            if id(layer) in scope:
                extra.append((layer, name, None))
            elif inside:
                raise ValueError(
                    f"Invalid `layers`: {describe_where(layers)} selects "
                    f"{', '.join(repr(c.name) for c in inside)} inside "
                    f"{type(layer).__name__} {layer.name!r} but not the layer "
                    f"itself. It saves one `{attribute}` for all its projections "
                    f"and rebuilds them from it on load: select {layer.name!r}."
                )
    return extra


def _warn_if_lost_on_save(
    model: keras.Model, walked: list[tuple[Any, tuple[Any, ...]]], changed: set[int]
) -> None:
    """Warn when a changed layer lives inside a user-defined (subclassed) layer.

    Keras saves a subclassed model or layer through its own `get_config` and
    rebuilds its sublayers in `__init__` on load, so penalties set afterwards
    on those sublayers are not in the saved file.
    """
    owners: dict[str, None] = {}
    for layer, ancestors in walked:
        if id(layer) not in changed:
            continue
        for parent in ancestors:
            if not type(parent).__module__.startswith("keras."):
                owners[f"{type(parent).__name__} {parent.name!r}"] = None
    if owners:
        warnings.warn(
            "regularize: the penalties are in `model.losses` and the next `fit`, "
            f"but not in a saved file: {', '.join(owners)} is a subclassed "
            "Keras model or layer, which Keras rebuilds from its own `__init__` "
            "on load. Pass the regularizers in its `__init__` (and `get_config`), "
            "or call `regularize` again after loading.",
            KerasregWarning,
            stacklevel=3,
        )


def _remake_compiled_functions(model: keras.Model) -> None:
    """Re-trace the model's cached train/test/predict functions.

    Keras's documented way (see `Layer.trainable`): `make_*_function(force=True)`.
    Unlike dropping them (`None`), it is safe inside `fit`, `evaluate` and
    `predict`, which call the function they find on the model at each step: a
    `regularize` from a callback applies from the next call (the next batch,
    or the next `steps_per_execution` batches).
    """
    for kind in ("train", "test", "predict"):
        if getattr(model, f"{kind}_function", None) is not None:
            getattr(model, f"make_{kind}_function")(force=True)
