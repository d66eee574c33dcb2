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


def nnx_enabled() -> bool:
    """Whether Keras runs JAX models as Flax NNX modules.

    Reason: Flax NNX trainers call the class's `train_step`, not the instance's,
    so decay cannot be folded into the step; `keras.config.is_nnx_enabled` only
    exists since Keras 3.11 (NNX support), and older Keras never enables NNX.
    """
    is_enabled = getattr(keras.config, "is_nnx_enabled", None)
    if is_enabled is None:
        if KERAS_VERSION >= (3, 11):
            raise KerasInternalsChanged(
                f"kerasreg: Keras {keras.__version__} has no "
                "`keras.config.is_nnx_enabled` (present since Keras 3.11); "
                "kerasreg cannot tell whether JAX models run as Flax NNX modules."
            )
        return False
    return bool(is_enabled())
