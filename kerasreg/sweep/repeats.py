"""The variant of one grid point and one seed, and the check of `sweep`'s `seeds=`.

What a seed controls: the variant is the template's architecture with every
weight drawn afresh from its layer's initializer, and every random layer
(`Dropout`, ...) given its own seed generator, after
`keras.utils.set_random_seed(seed)`: exactly what building the template
again after `keras.utils.set_random_seed(seed)` gives, when the build makes
its layers in the template's order. The template's own weights are not used.
The runs train in one fit when an engine can take the template: each
run's weights and its random layers' generators are its own, so each equals
its separate fit with `shuffle=False`; the fit starts from
`keras.utils.set_random_seed(seeds[0])` and its data order (`shuffle=True`)
is shared by all runs. In K separate fits (`engine="sequential"`, a grid
with transforms, or on PyTorch an unseeded `Dropout`, whose masks come from
torch's global generator), each run's fit also starts from
`keras.utils.set_random_seed(seed)`, so what the fit draws from the global
generators (the shuffling order with `shuffle=True`; on PyTorch, the masks
of a `Dropout` without a `seed` of its own) is what a fit right after that
build draws, and the runs of one seed share their data order.

Without `seeds=`, a variant starts from the template's current weights.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras

from kerasreg.selection import select_weights
from kerasreg.sweep.items import GridPoint
from kerasreg.sweep.variants import copy_template, make_variant


def check_seeds(seeds: Any) -> list[int] | None:
    """`seeds` as a list of distinct ints >= 0 (or None), or raise naming it."""
    if seeds is None:
        return None
    accepted = "None or a non-empty list of distinct ints >= 0, e.g. [0, 1, 2]"
    if isinstance(seeds, (str, bytes, dict)) or not hasattr(seeds, "__iter__"):
        raise TypeError(
            f"kerasreg.sweep: invalid `seeds`: expected {accepted}. "
            f"Received: seeds={seeds!r} (type {type(seeds).__name__})."
        )
    values = list(seeds)
    if not values or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0
        for s in values
    ):
        raise ValueError(
            f"kerasreg.sweep: invalid `seeds`: expected {accepted}. "
            f"Received: seeds={seeds!r}."
        )
    values = [int(s) for s in values]
    if len(set(values)) != len(values):
        raise ValueError(
            f"kerasreg.sweep: invalid `seeds`: the seeds repeat. Expected {accepted}. "
            f"Received: seeds={seeds!r}."
        )
    return values


def build_variant(
    model: keras.Model,
    point: GridPoint,
    where: Any,
    index: int,
    seed: int | None,
    item: int,
) -> keras.Model:
    """Run `index`'s variant of grid point `point` (`penalties[item]`) and `seed`.

    A copy of `model` with the point's penalties. Its transforms are not
    attached (they are callbacks of its fit); their `where` is checked on the
    variant here, before anything trains.
    """
    try:
        if seed is None:
            variant = _variant(model, point, where, index)
        else:
            keras.utils.set_random_seed(seed)
            fresh = keras.models.clone_model(model)  # weights drawn under the seed
            # The same draws again: the variant's own layers (and the seed
            # generators of its random layers) are those of a build under `seed`.
            keras.utils.set_random_seed(seed)
            variant = _variant(fresh, point, where, index)
    except (TypeError, ValueError) as error:
        # make_variant names the run's index; the user's list is by item.
        text = str(error).replace(f"penalties[{index}]", f"penalties[{item}]", 1)
        raise type(error)(text) from None
    for transform in point.transforms:
        try:
            select_weights(variant, transform.where)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"kerasreg.sweep: invalid `penalties[{item}]`: "
                f"{type(transform).__name__}'s `where`: {error}"
            ) from None
    return variant


def _variant(model: keras.Model, point: GridPoint, where: Any, index: int):
    if point.penalties:
        return make_variant(model, point.penalties, where, index)
    # No role named: the template's copy, its penalties kept.
    return copy_template(model, index)
