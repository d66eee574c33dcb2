"""The one home of every access to Keras, TensorFlow or JAX internals.

kerasreg uses public APIs wherever they exist. Where a private detail is
unavoidable, it is read here, through a small function with a one-line reason,
a guard that fails loudly (never silently) when Keras changes it, and a test in
`tests/test_compat.py`. No other kerasreg module touches a private attribute.
"""

from __future__ import annotations

import inspect
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


def fit_callbacks(callback: Any) -> list[Any] | None:
    """The callbacks of the `fit` now calling `callback`'s hook, in list order.

    Reason: Keras gives a callback no handle on the `CallbackList` that calls
    it; that list is `self` in the frame of `CallbackList.on_train_begin` (and
    the other dispatch methods), a few frames up the stack. Returns `None` when
    no `CallbackList` holding `callback` is on the stack (a hook called by hand).
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(_CALLER_FRAMES):
            if frame is None:
                break
            code = frame.f_code
            # Only a method's frame can hold the list as `self`; other frames'
            # locals are never materialized.
            owner = None
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList):
                callbacks = getattr(owner, "callbacks", None)
                if not isinstance(callbacks, list):
                    raise KerasInternalsChanged(
                        f"kerasreg: Keras {keras.__version__}'s CallbackList has "
                        "no `callbacks` list; kerasreg cannot see the order of "
                        "the callbacks passed to `fit`."
                    )
                if any(item is callback for item in callbacks):
                    return list(callbacks)
            frame = frame.f_back
        return None
    finally:
        del frame


# How far up the stack `fit_callbacks` looks: hook, wrappers, CallbackList.
_CALLER_FRAMES = 12
