"""`kerasreg.sweep`: a grid of regularization settings trained side by side.

- `run`: the `sweep` call: checks its arguments, makes the variants, picks
  the engine, collects the rows.
- `variants`: the copies of the template, each with its own penalties.
- `stacked`: the general engine (K copies side by side in one `fit`).
- `vectorized`: the engine for Dense chains (weights on a leading K axis).
- `monitor`: each variant's history and TensorBoard run from the one fit.
- `data`: what the sweep needs to know of the training data.
- `result`: `SweepResult`, names, rows, HParams.
"""

from kerasreg.sweep.result import SweepResult
from kerasreg.sweep.run import sweep

__all__ = ["SweepResult", "sweep"]
