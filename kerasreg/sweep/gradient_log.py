"""`sweep(..., gradients=True)`: each variant's gradient statistics per epoch.

At the end of every epoch each variant's TensorBoard run gets
`kerasreg.gradient_norms` of that variant, with its weights of that moment,
on the training data (`<run>/train`) and, when the fit has validation data,
on the validation data (`<run>/validation`), under the tags of
`WeightNormLogger(gradients=True)` (`grad_data/<path>`, `grad_penalty/...`,
`grad_share/...`, `grad_cosine/...`). These are full passes over the data
(one per variant, run and epoch), not the step's training batch that the
logger reads inside `fit`: exact whatever engine trains the variants.
"""

from __future__ import annotations

import math
import os
from typing import Any

import keras

from kerasreg._checks import validate_bool
from kerasreg.gradients import gradient_norms
from kerasreg.tensorboard import write_gradient_statistics


def _is_arrays(x: Any) -> bool:
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    return all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)


def _split(data: Any, start: int, stop: int | None) -> Any:
    return keras.tree.map_structure(
        lambda a: None if a is None else a[start:stop], data
    )


def readings(
    gradients: Any,
    log_dir: Any,
    one_pass: str | None,
    x: Any,
    y: Any,
    fit_kwargs: dict,
) -> list[tuple[str, tuple[Any, Any, Any], int | None]] | None:
    """The `(run, (x, y, sample_weight), batch_size)` data each epoch's
    gradient statistics are computed on, or None without `gradients=True`.

    Raises:
        TypeError: `gradients` is not a bool.
        ValueError: `gradients=True` without `log_dir`, with data that can
            be read only once (a Python generator), with `class_weight`, or
            with `steps_per_epoch`/`validation_steps` on a dataset.
    """
    if not validate_bool(gradients, "gradients", "kerasreg.sweep"):
        return None
    if log_dir is None:
        raise ValueError(
            "kerasreg.sweep: invalid `gradients`: gradient statistics are "
            "written to each variant's TensorBoard run; pass `log_dir` too. "
            "Received: gradients=True, log_dir=None."
        )
    if one_pass is not None:
        raise ValueError(
            "kerasreg.sweep: invalid `gradients`: gradient statistics read the "
            f"data again after each epoch, and `{one_pass}` can be read only "
            "once (a Python generator). Pass arrays, a tf.data.Dataset or a "
            "keras.utils.PyDataset, or gradients=False."
        )
    if fit_kwargs.get("class_weight") is not None:
        raise ValueError(
            "kerasreg.sweep: invalid `gradients`: `gradient_norms` has no "
            "`class_weight`, so its data gradient would not be the one the "
            "fit trains on. Received: gradients=True with class_weight="
            f"{fit_kwargs['class_weight']!r}. Pass per-sample `sample_weight` "
            "instead, or gradients=False."
        )
    arrays = _is_arrays(x)
    for name, data in (
        ("steps_per_epoch", x),
        ("validation_steps", fit_kwargs.get("validation_data")),
    ):
        if (
            fit_kwargs.get(name) is not None
            and data is not None
            and not _is_arrays(data)
        ):
            raise ValueError(
                "kerasreg.sweep: invalid `gradients`: each epoch's gradient "
                "statistics read the whole dataset, and with "
                f"`{name}={fit_kwargs[name]!r}` it may be endless (a repeated "
                "dataset). Pass a finite dataset without "
                f"`{name}`, or gradients=False."
            )
    batch_size = (fit_kwargs.get("batch_size") or 32) if arrays else None
    sample_weight = fit_kwargs.get("sample_weight")
    split = fit_kwargs.get("validation_split") or 0.0
    out: list[tuple[str, tuple[Any, Any, Any], int | None]] = []
    train = (x, y, sample_weight)
    validation = None
    # Keras ignores validation_split when validation_data is given.
    if split and arrays and fit_kwargs.get("validation_data") is None:
        # Keras's own split (`train_validation_split`): the last fraction.
        size = int(keras.tree.flatten(x)[0].shape[0])
        at = math.floor(size * (1.0 - split))
        train = _split(train, 0, at)
        validation = _split((x, y, sample_weight), at, None)
    data = fit_kwargs.get("validation_data")
    if data is not None:
        if isinstance(data, (list, tuple)) and len(data) in (2, 3):
            validation = (*data, None)[:3]
        else:
            validation = (data, None, None)
    out.append(("train", train, batch_size))
    if validation is not None:
        batches = batch_size if _is_arrays(validation[0]) else None
        out.append(("validation", validation, batches))
    return out


def write(
    variant: keras.Model,
    folder: str,
    epoch: int,
    data: list[tuple[str, tuple[Any, Any, Any], int | None]],
) -> None:
    """One epoch's gradient statistics of `variant`, to `folder/<run>`."""
    for run, (x, y, sample_weight), batch_size in data:
        stats = gradient_norms(
            variant, x, y, sample_weight=sample_weight, batch_size=batch_size
        )
        write_gradient_statistics(os.path.join(folder, run), epoch, stats)
