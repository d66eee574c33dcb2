"""kerasreg: weight regularization for Keras 3, complete, correct and visible."""

from kerasreg.penalties import ElasticNetPenalty as ElasticNetPenalty
from kerasreg.penalties import ExpAbsPenalty as ExpAbsPenalty
from kerasreg.penalties import L1Penalty as L1Penalty
from kerasreg.penalties import L2Penalty as L2Penalty
from kerasreg.penalties import Penalty as Penalty
from kerasreg.penalties import get as get
from kerasreg.selection import select_weights as select_weights

__version__ = "0.1.0"
