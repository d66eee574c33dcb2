"""Wrong uses of kerasreg's public API that a user's type checker must catch.

Never run. tests/test_typing.py type-checks it and expects exactly the errors
marked `# E: <mypy error code>`, no more, no fewer: each marked line would be
silently accepted if kerasreg's types did not reach the checker (no
`py.typed`, or a public name typed `Any`).
"""

from __future__ import annotations

import keras

import kerasreg


def misuse(model: keras.Model) -> None:
    kerasreg.L2Penalty("0.01")  # E: arg-type
    kerasreg.ElasticNetPenalty(l3=0.1)  # E: call-arg
    kerasreg.L2Penaltyy(0.01)  # E: attr-defined
    kerasreg.WeightDecay(1e-3, frequency=1)  # E: arg-type
    kerasreg.WeightNormLogger(update_freq=2.5)  # E: arg-type
    kerasreg.weight_norms(model, where=3)  # E: arg-type
    kerasreg.weight_norms(model, per_gate="yes")  # E: arg-type
    norms: list[float] = kerasreg.weight_norms(model)  # E: assignment
    kerasreg.shrink_weights(model)  # E: call-arg
    kerasreg.path(r"^dense/")(model)  # E: operator
    result = kerasreg.sweep(model, [None, kerasreg.L2Penalty(1e-3)], x=None)
    result.engine + 1  # E: operator
    result.best(monitor=1)  # E: arg-type
    del norms
