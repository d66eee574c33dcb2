"""kerasreg: weight regularization for Keras 3, complete, correct and visible."""

__version__ = "0.1.0"

from kerasreg import cli as cli  # Keras-free

# Public name -> module. One list: imported now in a normal process, on first
# use in the `kerasreg` command process.
_PUBLIC = {
    "REMOVE": "kerasreg.attach",
    "regularize": "kerasreg.attach",
    "SoftThreshold": "kerasreg.decay",
    "WeightDecay": "kerasreg.decay",
    "shrink_weights": "kerasreg.decay",
    "gradient_norms": "kerasreg.gradients",
    "weight_norms": "kerasreg.norms",
    "ElasticNetPenalty": "kerasreg.penalties",
    "ExpAbsPenalty": "kerasreg.penalties",
    "L1Penalty": "kerasreg.penalties",
    "L2Penalty": "kerasreg.penalties",
    "L2SPPenalty": "kerasreg.penalties",
    "Penalty": "kerasreg.penalties",
    "get": "kerasreg.penalties",
    "describe": "kerasreg.plan",
    "Selector": "kerasreg.selection",
    "kernels": "kerasreg.selection",
    "layer": "kerasreg.selection",
    "path": "kerasreg.selection",
    "select_weights": "kerasreg.selection",
    "trainable": "kerasreg.selection",
    "SweepResult": "kerasreg.sweep",
    "sweep": "kerasreg.sweep",
    "WeightNormLogger": "kerasreg.tensorboard",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasreg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if not cli._invoked_as_command():
    # A normal process imports everything now, which registers the penalties
    # for `keras.saving.load_model`. The `kerasreg` command skips it so that it
    # never imports Keras or TensorFlow; `__getattr__` serves the names there.
    for _name in _PUBLIC:
        __getattr__(_name)
    del _name
