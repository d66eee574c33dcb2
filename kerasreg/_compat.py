"""The one home of every access to Keras, TensorFlow or JAX internals.

kerasreg uses public APIs wherever they exist. Where a private detail is
unavoidable, it is read here, through a small function with a one-line reason,
a guard that fails loudly (never silently) when Keras changes it, and a test in
`tests/test_compat.py`. No other kerasreg module touches a private attribute.
"""

from __future__ import annotations

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
