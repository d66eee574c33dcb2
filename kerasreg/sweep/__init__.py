"""`kerasreg.sweep`: a grid of regularization settings trained side by side.

- `run`: the `sweep` call: checks its arguments, makes the variants, picks
  the engine, collects the rows.
- `items`: the grid items (penalties, transforms, lists), their family,
  values and names; `grids`: `grid`, `product`, `log_range` build them.
- `variants`: the copies of the template, each with its own penalties;
  `repeats`: the copy of a grid point under a seed (`seeds=`).
- `separate`: the sequential engine: each variant its own fit, with its own
  copies of the callbacks and transforms.
- `stacked`: the general engine (K copies side by side in one `fit`).
- `vectorized`: the engine for Dense chains (weights on a leading K axis).
- `monitor`: each variant's history and TensorBoard run from the one fit,
  and the progress it prints.
- `data`: what the sweep needs to know of the training data.
- `result`: `SweepResult` (best, summary, tables); `rows`: a run's row;
  `figure`: the validation curve; `hparams`: the HParams experiment.
"""

from kerasreg.sweep.grids import grid, log_range, product
from kerasreg.sweep.result import SweepResult
from kerasreg.sweep.run import sweep

__all__ = ["SweepResult", "grid", "log_range", "product", "sweep"]
