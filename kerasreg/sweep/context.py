"""`SweepContext`: what an engine needs to know to decide whether it can train a sweep."""

from __future__ import annotations

import dataclasses
import types
from typing import Any


@dataclasses.dataclass
class SweepContext:
    """Everything but the models that the choice of an engine depends on.

    Attributes:
        backend: `keras.backend.backend()`.
        data_kind: the kind of `x` (`kerasreg.sweep.data`: `"arrays"`,
            `"tf.data.Dataset"`, `"keras.utils.PyDataset"`, `"one-pass
            iterator"`, `"iterable"`).
        fit_kwargs: the keyword arguments for `fit`.
        distribution: `keras.distribution.distribution()` (None: none set).
        compile_config: the template's `get_compile_config()`.
        exclusions: the template optimizer's weight-decay exclusions
            (`_compat.weight_decay_exclusions`: `(var_names, indices)`).
        x, y: the training data as `fit` is to receive it (a one-pass
            iterator whose first batch was read is re-chained).
        sample: `(x, y)` of two samples, or None when the data give none.
        sample_weights: whether any batch may carry sample or class weights.
        batch_size: the size of a training batch (`fit`'s `batch_size`, 32
            by default, or the first batch's size).
        separate: why the runs must be K separate fits whatever the
            template (post-step transforms, `seeds=`, callbacks that no
            one-fit engine runs), or None.
    """

    backend: str
    data_kind: str
    fit_kwargs: dict
    distribution: Any
    compile_config: dict
    exclusions: tuple = ((), ())
    x: Any = None
    y: Any = None
    sample: Any = None
    sample_weights: bool = False
    batch_size: int = 32
    separate: str | None = None

    @property
    def one_pass(self) -> bool:
        """Whether the data can be read only once (one `fit` at most)."""
        return self.one_pass_argument is not None

    @property
    def one_pass_argument(self) -> str | None:
        """`"x"` or `"validation_data"`: the data that can be read only once."""
        if self.data_kind == "one-pass iterator":
            return "x"
        validation = self.fit_kwargs.get("validation_data")
        if validation is None:
            return None
        if isinstance(validation, types.GeneratorType) or (
            hasattr(validation, "__next__") and iter(validation) is validation
        ):
            return "validation_data"
        return None
