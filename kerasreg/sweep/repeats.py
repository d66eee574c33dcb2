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
import random
from typing import Any

import keras
import numpy as np

from kerasreg.selection import select_weights
from kerasreg.sweep import randomness
from kerasreg.sweep.items import GridPoint
from kerasreg.sweep.variants import copy_template, make_variant
from kerasreg.walk import walk_layers


def check_seeds(seeds: Any) -> list[int] | None:
    """`seeds` as a list of distinct ints >= 0 (or None), or raise naming it."""
    if seeds is None:
        return None
    accepted = (
        "None or a non-empty list of distinct ints in [0, 2**32 - 1] "
        "(Keras's seed range), e.g. [0, 1, 2]"
    )
    if isinstance(seeds, (str, bytes, dict)) or not hasattr(seeds, "__iter__"):
        raise TypeError(
            f"kerasreg.sweep: invalid `seeds`: expected {accepted}. "
            f"Received: seeds={seeds!r} (type {type(seeds).__name__})."
        )
    values = list(seeds)
    if not values or any(
        isinstance(s, bool)
        or not isinstance(s, numbers.Integral)
        or not 0 <= int(s) <= 2**32 - 1
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


def draws_from_global_generators(variant: keras.Model) -> str | None:
    """Why `variant`'s training-mode call draws from the global random
    generators (None: only from its own seed generators, or nothing random).

    One fit can give each run its own generators' draws, not its own global
    generators: a layer drawing with `seed=None` would draw the K runs'
    values from one global stream. Two checks (the global generators' states
    are given back afterwards: Python's, NumPy's, torch's and Keras's):

    - on PyTorch, Keras draws an unseeded dropout mask (a `Dropout` without
      `seed` or `noise_shape`, an RNN cell's `dropout` or
      `recurrent_dropout`) from torch's global generator;
    - by behaviour, for any other layer (`keras.random.dropout(x, 0.3)` in a
      custom layer): the variant is called twice in training mode on the same
      inputs from the same state (weights, statistics, generator states and
      stateful RNN states restored), after `keras.utils.set_random_seed(1)` and `(2)`; different
      outputs mean a global draw. Everything is restored.
    """
    if keras.backend.backend() == "torch":
        names = [
            repr(layer.name)
            for layer, _ in walk_layers(variant)
            if _torch_global_mask(layer)
        ]
        if names:
            return (
                f"on PyTorch {', '.join(names)} draw dropout masks from torch's "
                "global generator (no `seed` of their own): one fit cannot give "
                "each run its own seed's masks"
            )
    rng = np.random.default_rng(0)
    inputs = []
    for tensor in variant.inputs:
        shape = tuple(8 if d is None else d for d in tensor.shape)
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "int" in dtype or dtype == "bool":
            value = np.zeros(shape)
        else:
            value = rng.normal(size=shape)
        inputs.append(keras.ops.convert_to_tensor(value, dtype=dtype))
    # A stateful RNN's states are variables Keras does not track (not in
    # `variant.variables`): restored too, or the probe's calls would change
    # the states the run's fit starts from (and each other's outputs).
    variables = list(variant.variables) + _rnn_states(variant)
    state = [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]

    def restore_state():
        for variable, value in zip(variables, state, strict=True):
            variable.assign(value)

    outputs = []
    saved = _GlobalRandomState()
    try:
        for seed in (1, 2):
            keras.utils.set_random_seed(seed)
            out = variant(inputs if len(inputs) > 1 else inputs[0], training=True)
            outputs.append(
                [
                    np.asarray(keras.ops.convert_to_numpy(o))
                    for o in keras.tree.flatten(out)
                ]
            )
            restore_state()
    except Exception as error:  # a call that needs real data: assume the worst
        restore_state()
        return (
            "the template's training-mode call could not be checked for draws "
            f"from the global random generators ({type(error).__name__}: {error})"
        )
    finally:
        saved.restore()
    if any(
        not np.array_equal(a, b, equal_nan=True) for a, b in zip(*outputs, strict=True)
    ):
        return (
            "the template draws random values from the global generators (a "
            "layer calling keras.random with seed=None): one fit cannot give "
            "each run its own seed's draws"
        )
    return None


class _GlobalRandomState:
    """Python's, NumPy's and torch's global generators and Keras's global
    `SeedGenerator`, as they are now, to be given back by `restore`."""

    NAME = "global_seed_generator"  # keras.src.random.seed_generator

    def __init__(self):
        from keras.src.backend.common import global_state

        self.python = random.getstate()
        self.numpy_and_torch = randomness.numpy_and_torch_state()
        self.keras = global_state.get_global_attribute(self.NAME)
        self.keras_state = (
            None
            if self.keras is None
            else np.array(keras.ops.convert_to_numpy(self.keras.state.value))
        )

    def restore(self) -> None:
        from keras.src.backend.common import global_state

        random.setstate(self.python)
        randomness.set_numpy_and_torch_state(self.numpy_and_torch)
        global_state.set_global_attribute(self.NAME, self.keras)
        if self.keras is not None:
            self.keras.state.assign(self.keras_state)


def _rnn_states(variant: keras.Model) -> list:
    """The state variables of `variant`'s stateful RNN layers."""
    states = []
    for layer, _ in walk_layers(variant):
        if getattr(layer, "stateful", False) and getattr(layer, "states", None):
            states += keras.tree.flatten(layer.states)
    return states


def _torch_global_mask(layer: Any) -> bool:
    """Whether Keras's torch backend draws this layer's dropout masks from
    torch's global generator (an unseeded generator and no noise shape)."""
    generator = getattr(layer, "seed_generator", None)
    if generator is None or getattr(generator, "_initial_seed", 0) is not None:
        return False
    if isinstance(layer, keras.layers.Dropout):
        return layer.rate > 0 and layer.noise_shape is None
    return (getattr(layer, "dropout", 0) or getattr(layer, "recurrent_dropout", 0)) > 0


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
