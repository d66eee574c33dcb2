"""Which weights: the one `where=` rule every kerasreg function accepts.

`where` may be:

- `None` (default): trainable weights with `ndim >= 2`: kernels, recurrent
  kernels, embeddings, convolution filters. Biases (also a `GRU` cell's 2-D
  bias) and normalization scales and offsets are left out, as the literature
  recommends.
- a string: a regular expression searched (`re.search`) in each trainable
  weight's path (`weight_paths`), e.g. `"recurrent_kernel"` or `"^encoder/"`.
- a callable `variable -> bool`, called on each trainable weight.
- an iterable of layers and/or variables: a layer contributes the weights the
  default rule selects inside it (its own and its sublayers'); a variable is
  taken as it is, trainable or not.

Nested models, RNN cells, both directions of `Bidirectional` and functional
sub-models are walked. A selection that comes out empty is an error, never a
silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras

from kerasreg._compat import sublayers

Where = "None | str | Callable[[Any], bool] | Iterable[Any]"


def walk_layers(model: keras.layers.Layer) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Yield `(layer, ancestors)` for `model` and every layer nested in it.

    Depth-first, each layer once (shared layers are visited at their first
    place). `ancestors` runs from `model` down to the layer's parent.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, tuple[Any, ...]]] = [(model, ())]
    while stack:
        layer, ancestors = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer, ancestors
        children = sublayers(layer)
        stack.extend((child, (*ancestors, layer)) for child in reversed(children))


def all_weights(model: keras.layers.Layer) -> list[Any]:
    """Every variable of `model`, nested ones included, each once, in order."""
    _check_model(model)
    seen: set[int] = set()
    weights = []
    for variable in model.weights:
        if id(variable) not in seen:
            seen.add(id(variable))
            weights.append(variable)
    return weights


def weight_paths(model: keras.layers.Layer) -> dict[int, str]:
    """`{id(variable): path}`: a name for each weight that survives save/load.

    The path is the chain of layer names from `model`'s layers down to the layer
    that owns the variable, then the variable's name:
    `"bidirectional/forward_lstm/lstm_cell/kernel"`, `"encoder/dense/kernel"`.
    `model`'s own name is not part of it. Keras's `variable.path` depends on how
    the model was made: a `Sequential` built in this process names its kernel
    `"sequential/dense/kernel"`, the same model after `keras.saving.load_model`
    `"dense/kernel"`, and nested layers lose their parents' names on load. These
    paths are the same in both cases (layer names are saved in the config), so
    TensorBoard series, `weight_norms` keys and `where=` patterns do not change
    when a model is saved, reloaded and trained further. Should two variables
    share a path, the later ones get `#2`, `#3`, ...
    """
    _check_model(model)
    paths: dict[int, str] = {}
    counts: dict[str, int] = {}

    def visit(layer: Any, prefix: str, seen: set[int]) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for child in sublayers(layer):
            visit(child, f"{prefix}{child.name}/", seen)
        for variable in layer.weights:  # what no sublayer owns is the layer's own
            if id(variable) not in paths:
                path = f"{prefix}{variable.name}"
                counts[path] = counts.get(path, 0) + 1
                n = counts[path]
                paths[id(variable)] = path if n == 1 else f"{path}#{n}"

    visit(model, "", set())
    return paths


def default_rule(variable: Any) -> bool:
    """The `where=None` rule: trainable, at least two-dimensional, not a bias.

    The name check keeps out biases that are 2-D, such as a `GRU` cell's
    (`reset_after=True` gives it shape `(2, 3 * units)`).
    """
    return (
        bool(variable.trainable)
        and len(variable.shape) >= 2
        and variable.name != "bias"
    )


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

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> paths = weight_paths(model)
    >>> [paths[id(v)] for v in select_weights(model)]
    ['dense/kernel']
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
        paths = ", ".join(v.path for v in weights[:12])
        more = ", ..." if len(weights) > 12 else ""
        raise ValueError(
            f"`{argument}`={_describe(where)} selects no weight of model "
            f"{model.name!r}. Its weights are: {paths}{more}."
        )
    return selected


def where_predicate(
    where: Where, model: keras.layers.Layer, *, argument: str = "where"
) -> Callable[[Any], bool]:
    """Turn `where` into a predicate over `model`'s variables (no emptiness check).

    Validates `where` eagerly so that callers can reject bad input before they
    change anything.
    """
    if where is None:
        return default_rule
    if isinstance(where, str):
        pattern = compile_pattern(where, argument)
        paths = weight_paths(model)
        return lambda v: (
            bool(v.trainable) and (pattern.search(paths.get(id(v), v.path)) is not None)
        )
    if isinstance(where, (keras.layers.Layer, keras.Variable)):
        where = [where]
    if callable(where):
        return lambda v: bool(v.trainable) and bool(where(v))
    if isinstance(where, Iterable) and not isinstance(where, (bytes, dict)):
        ids = _ids_of_items(list(where), model, argument)
        return lambda v: id(v) in ids
    raise TypeError(
        f"Invalid `{argument}`: expected None, a regular expression string, a "
        "callable `variable -> bool`, or an iterable of layers and/or "
        f"variables. Received: {argument}={where!r} (type {type(where).__name__})."
    )


def check_where(where: Where, *, argument: str = "where") -> Where:
    """Validate `where` before a model is known (e.g. in a callback's `__init__`).

    Checks its type, the regular expression's syntax and the types of an
    iterable's items; whether the items belong to the model and whether the
    selection is empty can only be checked later, by `select_weights`.

    Returns:
        `where`, with an iterable turned into a list (a generator can then be
        used more than once).
    """
    if isinstance(where, (keras.layers.Layer, keras.Variable)):
        return [where]
    if where is None or callable(where):
        return where
    if isinstance(where, str):
        compile_pattern(where, argument)
        return where
    if isinstance(where, Iterable) and not isinstance(where, (bytes, dict)):
        items = list(where)
        for item in items:
            if not isinstance(item, (keras.layers.Layer, keras.Variable)):
                raise TypeError(
                    f"Invalid `{argument}`: an iterable must hold Keras layers or "
                    f"variables. Received an item {item!r} "
                    f"(type {type(item).__name__})."
                )
        return items
    # Same message as `where_predicate` gives for an unsupported type.
    where_predicate(where, None, argument=argument)
    return where


def compile_pattern(pattern: str, argument: str) -> re.Pattern:
    """Compile a user regular expression, naming `argument` on failure."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"Invalid `{argument}`: {pattern!r} is not a valid regular expression "
            f"({error})."
        ) from None


def _ids_of_items(items: list[Any], model: keras.layers.Layer, argument: str) -> set:
    model_weights = {id(v): v for v in all_weights(model)}
    model_layers = {id(layer) for layer, _ in walk_layers(model)}
    ids: set[int] = set()
    for item in items:
        if isinstance(item, keras.Variable):
            if id(item) not in model_weights:
                raise ValueError(
                    f"Invalid `{argument}`: variable {item.path!r} is not a weight "
                    f"of model {model.name!r}."
                )
            ids.add(id(item))
        elif isinstance(item, keras.layers.Layer):
            if id(item) not in model_layers:
                raise ValueError(
                    f"Invalid `{argument}`: layer {item.name!r} is not part of "
                    f"model {model.name!r}."
                )
            ids.update(id(v) for v in item.weights if default_rule(v))
        else:
            raise TypeError(
                f"Invalid `{argument}`: an iterable must hold Keras layers or "
                f"variables. Received an item {item!r} "
                f"(type {type(item).__name__})."
            )
    return ids


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid `model`: expected a keras.Model or keras.layers.Layer. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )


def _describe(where: Where) -> str:
    if where is None or isinstance(where, str):
        return repr(where)
    if callable(where):
        return getattr(where, "__name__", repr(where))
    text = repr(where)
    return text if len(text) <= 200 else text[:197] + "..."
