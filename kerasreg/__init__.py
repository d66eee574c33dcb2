"""kerasreg: weight regularization for Keras 3, complete, correct and visible."""

__version__ = "0.1.0"

from kerasreg import cli as cli  # Keras-free

_PUBLIC = {
    "REMOVE": "kerasreg.attach",
    "regularize": "kerasreg.attach",
    "WeightDecay": "kerasreg.decay",
    "shrink_weights": "kerasreg.decay",
    "weight_norms": "kerasreg.norms",
    "ElasticNetPenalty": "kerasreg.penalties",
    "ExpAbsPenalty": "kerasreg.penalties",
    "L1Penalty": "kerasreg.penalties",
    "L2Penalty": "kerasreg.penalties",
    "Penalty": "kerasreg.penalties",
    "get": "kerasreg.penalties",
    "select_weights": "kerasreg.selection",
    "WeightNormLogger": "kerasreg.tensorboard",
}

if not cli._invoked_as_command():
    # A normal process: import everything now, which registers the penalties
    # for `keras.saving.load_model`. The `kerasreg` command skips this so that
    # it never imports Keras or TensorFlow; `__getattr__` below still serves
    # the names there, importing on first use.
    from kerasreg.attach import REMOVE as REMOVE
    from kerasreg.attach import regularize as regularize
    from kerasreg.decay import WeightDecay as WeightDecay
    from kerasreg.decay import shrink_weights as shrink_weights
    from kerasreg.norms import weight_norms as weight_norms
    from kerasreg.penalties import ElasticNetPenalty as ElasticNetPenalty
    from kerasreg.penalties import ExpAbsPenalty as ExpAbsPenalty
    from kerasreg.penalties import L1Penalty as L1Penalty
    from kerasreg.penalties import L2Penalty as L2Penalty
    from kerasreg.penalties import Penalty as Penalty
    from kerasreg.penalties import get as get
    from kerasreg.selection import select_weights as select_weights
    from kerasreg.tensorboard import WeightNormLogger as WeightNormLogger


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasreg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
