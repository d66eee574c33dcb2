"""How tests/data/l2sp_v0.keras was made (kept for the record; not a test).

Run with kerasreg at commit 803e4cd (the reference was then a tensor kept by
the penalty), Keras 3.8.0 and TensorFlow: `python make_l2sp_v0.py OUT` writes
`OUT.keras`.
"""

import sys

import keras
import numpy as np

import kerasreg

keras.utils.set_random_seed(7)
model = keras.Sequential(
    [
        keras.Input((3,)),
        keras.layers.Dense(
            4, activation="tanh", name="hidden",
            kernel_regularizer=kerasreg.L2SPPenalty(0.2),
        ),
        keras.layers.Dense(1, name="out"),
    ],
    name="l2sp_v0",
)  # fmt: skip
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 3)).astype("float32")
y = rng.normal(size=(16, 1)).astype("float32")
model.fit(x, y, epochs=1, verbose=0)
kerasreg.regularize(
    model, kernel=kerasreg.L2SPPenalty(0.7), where=kerasreg.layer("^out$")
)
model.fit(x, y, epochs=2, verbose=0)
model.save(sys.argv[1] + ".keras")
