"""Typed use of kerasreg's public API, as a user's type checker sees it.

mypy checks this file in strict mode (settings in pyproject.toml): every call
below type-checks, and `assert_type` fails if a public name's type were lost
(`Any`). tests/test_typing.py runs the check against the source tree and, in
CI (`.ci/package`), against the installed wheel, where kerasreg's types reach
mypy only through its `py.typed` marker. The test also runs `main`, so that
the typed calls are real calls.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import keras
import numpy as np
from typing_extensions import assert_type

import kerasreg


def main(log_dir: str) -> kerasreg.SweepResult:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 1)).astype("float32")
    l2 = kerasreg.L2Penalty(1e-3)
    assert_type(l2, kerasreg.L2Penalty)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="hidden", kernel_regularizer=l2),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")

    penalties: list[kerasreg.Penalty] = [
        kerasreg.L1Penalty(1e-4),
        kerasreg.ElasticNetPenalty(l1=1e-4, l2=1e-3),
        kerasreg.ExpAbsPenalty(1e-4),
        kerasreg.L2SPPenalty(alpha=1e-3),
    ]
    assert kerasreg.get("kerasreg>L2Penalty") is not None

    where = (kerasreg.kernels() & kerasreg.layer("hidden")) | ~kerasreg.trainable()
    assert_type(where, kerasreg.Selector)
    kerasreg.regularize(model, bias=penalties[0], where=kerasreg.path("^head/"))
    kerasreg.regularize(model, bias=kerasreg.REMOVE, where="^head/bias$")
    assert_type(kerasreg.select_weights(model, where), list[Any])

    callbacks = [
        kerasreg.WeightDecay(1e-3, toward="start"),
        kerasreg.SoftThreshold(1e-6, where=where),
        kerasreg.WeightNormLogger(log_dir, update_freq=2, per_gate=False),
    ]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=callbacks)
    assert_type(kerasreg.describe(model, callbacks), str)

    norms = kerasreg.weight_norms(model, where, zero_threshold=1e-8)
    assert_type(norms, dict[str, dict[str, float]])
    shrunk = kerasreg.shrink_weights(model, 0.9, where="^hidden/kernel$")
    assert_type(shrunk, dict[str, dict[str, float]])

    grid = [None, kerasreg.L2Penalty(1e-2)]
    result = kerasreg.sweep(model, grid, x, y, epochs=1, batch_size=8, verbose=0)
    assert_type(result, kerasreg.SweepResult)
    assert_type(result.engine, str)
    assert_type(result.best("loss"), dict[Any, Any])
    assert_type(kerasreg.__version__, str)
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print(main(sys.argv[1] if len(sys.argv) > 1 else folder))
