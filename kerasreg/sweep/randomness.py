"""The global random generators a fit draws from, read and set as JSON values.

NumPy's global generator (the shuffling order of array data on JAX and
PyTorch) and, on PyTorch, torch's (an unseeded `Dropout`'s masks). Used to
give a resumed run of a sweep the draws of the uninterrupted one
(`kerasreg.sweep.backup`) and to leave them as they were after the sweep's
check of a template (`kerasreg.sweep.repeats`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def numpy_and_torch_state() -> dict:
    """The states of NumPy's and (on PyTorch) torch's global generators."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "numpy": [
            kind,
            np.asarray(keys).tolist(),
            int(position),
            int(has_gauss),
            float(gauss),
        ]
    }
    if keras.backend.backend() == "torch":
        import torch

        state["torch"] = torch.random.get_rng_state().tolist()
    return state


def set_numpy_and_torch_state(state: dict) -> None:
    """Give NumPy's and torch's global generators the states of `state`."""
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)
    )
    if "torch" in state:
        import torch

        torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
