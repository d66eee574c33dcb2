"""Which weights: the one `where=` rule every kerasreg function accepts.

`where` selects among the model's **trainable** weights (a variable named
explicitly is the one exception). It may be:

- `None` (default): the `kernels()` rule: trainable weights with `ndim >= 2`:
  kernels, recurrent kernels, embeddings, convolution filters. Biases (also a
  `GRU` cell's 2-D bias) and normalization scales and offsets are left out, as
  the literature recommends.
- a string: a regular expression searched (`re.search`) in each trainable
  weight's path (`weight_paths`), e.g. `"recurrent_kernel"` or `"^encoder/"`.
  A bare string matches among **all** trainable weights, biases included:
  it is `path(regex)`; write `kernels() & path(regex)` for kernels only.
- a callable `variable -> bool`, called on each trainable weight.
- an iterable of layers and/or variables: a layer contributes the weights the
  default rule selects inside it (its own and its sublayers'); a variable is
  taken as it is, trainable or not.
- a `Selector`: `kernels()`, `trainable()`, `path(regex)`, `layer(...)`,
  combined with `&` (and), `|` (or) and `~` (not), e.g.
  `kernels() & layer("encoder") & layer(keras.layers.Dense)`: the Dense
  kernels of the encoder. `~s` is every trainable weight that `s` leaves out.
  A bare string, callable or iterable may stand on either side of `&`/`|`.

Nested models, RNN cells, both directions of `Bidirectional` and functional
sub-models are walked. A selection that comes out empty is an error, never a
silent no-op.
"""

from __future__ import annotations

from typing import Any

import keras

# The rule is built from two layers below: `walk` (layers, weights, paths) and
# `selectors` (the composable selectors and the one `where=` dispatcher); their
# public names are importable from here.
from kerasreg.selectors import (
    Selector,
    Where,
    as_selector,
    check_where,
    compile_pattern,
    describe_where,
    kernels,
    layer,
    layer_matcher,
    path,
    trainable,
    where_predicate,
)
from kerasreg.walk import all_weights, default_rule, walk_layers, weight_paths

__all__ = [
    "Selector",
    "Where",
    "all_weights",
    "as_selector",
    "check_where",
    "compile_pattern",
    "default_rule",
    "describe_where",
    "kernels",
    "layer",
    "layer_matcher",
    "path",
    "select_weights",
    "trainable",
    "walk_layers",
    "weight_paths",
    "where_predicate",
]


def select_weights(
    model: keras.layers.Layer, where: Where = None, *, argument: str = "where"
) -> list[Any]:
    """Return the weights of `model` that `where` selects, in model order.

    Args:
        model: a built `keras.Model` (or layer).
        where: the selection, as described in this module's docstring.
        argument: the argument name used in error messages.

    Returns:
        A non-empty list of `keras.Variable`, each once.

    Raises:
        TypeError: `model` is not a Keras layer or model, or `where` has an
            unsupported type.
        ValueError: `model` has no weights (not built), `where` is an invalid
            regular expression, names a layer or variable outside the model, or
            selects nothing.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")])
    >>> paths = weight_paths(model)
    >>> [paths[id(v)] for v in select_weights(model)]
    ['out/kernel']
    """
    weights = all_weights(model)
    if not weights:
        raise ValueError(
            f"`model` {model.name!r} has no weights: build it (call it on data "
            "or give it an Input) before selecting weights."
        )
    predicate = where_predicate(where, model, argument=argument)
    selected = [v for v in weights if predicate(v)]
    if not selected:
        raise ValueError(
            f"`{argument}`={describe_where(where)} selects no weight of model "
            f"{model.name!r}. {_listing(model, weights, argument)}"
        )
    return selected


def _listing(model: keras.layers.Layer, weights: list[Any], argument: str) -> str:
    """The weights a `where=` can select, named by the paths its patterns
    search (`weight_paths`, not Keras's `variable.path`)."""
    paths = weight_paths(model)
    names = [paths.get(id(v), v.path) for v in weights if v.trainable]
    frozen = len(weights) - len(names)
    if not names:
        return f"It has no trainable weights ({frozen} frozen)."
    shown = ", ".join(repr(name) for name in names[:12])
    more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
    also = f"; {frozen} frozen weights not listed" if frozen else ""
    return (
        f"Its trainable weights, by the paths `{argument}` patterns search, "
        f"are: {shown}{more}{also}."
    )
