"""kerasreg: weight regularization for Keras 3, complete, correct and visible."""

__version__ = "0.2.0.dev0"

from typing import TYPE_CHECKING

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
    "grid": "kerasreg.sweep",
    "log_range": "kerasreg.sweep",
    "product": "kerasreg.sweep",
    "sweep": "kerasreg.sweep",
    "WeightNormLogger": "kerasreg.tensorboard",
}
__all__ = sorted(_PUBLIC)


if TYPE_CHECKING:
    # What type checkers see (the package ships `py.typed`): the same names as
    # `_PUBLIC`, each an explicit re-export, and no `__getattr__`, so that a
    # misspelt name is an error rather than `Any`. tests/test_typing.py keeps
    # this list equal to `_PUBLIC`.
    from kerasreg.attach import REMOVE as REMOVE
    from kerasreg.attach import regularize as regularize
    from kerasreg.decay import SoftThreshold as SoftThreshold
    from kerasreg.decay import WeightDecay as WeightDecay
    from kerasreg.decay import shrink_weights as shrink_weights
    from kerasreg.gradients import gradient_norms as gradient_norms
    from kerasreg.norms import weight_norms as weight_norms
    from kerasreg.penalties import ElasticNetPenalty as ElasticNetPenalty
    from kerasreg.penalties import ExpAbsPenalty as ExpAbsPenalty
    from kerasreg.penalties import L1Penalty as L1Penalty
    from kerasreg.penalties import L2Penalty as L2Penalty
    from kerasreg.penalties import L2SPPenalty as L2SPPenalty
    from kerasreg.penalties import Penalty as Penalty
    from kerasreg.penalties import get as get
    from kerasreg.plan import describe as describe
    from kerasreg.selection import Selector as Selector
    from kerasreg.selection import kernels as kernels
    from kerasreg.selection import layer as layer
    from kerasreg.selection import path as path
    from kerasreg.selection import select_weights as select_weights
    from kerasreg.selection import trainable as trainable
    from kerasreg.sweep import SweepResult as SweepResult
    from kerasreg.sweep import grid as grid
    from kerasreg.sweep import log_range as log_range
    from kerasreg.sweep import product as product
    from kerasreg.sweep import sweep as sweep
    from kerasreg.tensorboard import WeightNormLogger as WeightNormLogger
else:

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
        # for `keras.saving.load_model`. The `kerasreg` command skips it so that
        # it never imports Keras or TensorFlow; `__getattr__` serves the names
        # there.
        for _name in _PUBLIC:
            __getattr__(_name)
        del _name
