"""kerasreg: weight regularization for Keras 3, complete, correct and visible."""

# First, before Keras: run as a command, it keeps TensorFlow's C++ log quiet.
from kerasreg import cli as cli
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
from kerasreg.selection import Selector as Selector
from kerasreg.selection import kernels as kernels
from kerasreg.selection import layer as layer
from kerasreg.selection import path as path
from kerasreg.selection import select_weights as select_weights
from kerasreg.selection import trainable as trainable
from kerasreg.tensorboard import WeightNormLogger as WeightNormLogger

__version__ = "0.1.0"
