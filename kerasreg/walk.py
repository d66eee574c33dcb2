"""Walking a model: its layers, its weights and the paths that name them.

The bottom of `kerasreg.selection`: `walk_layers` (nested models, RNN cells,
both directions of `Bidirectional`), `all_weights`, `weight_paths` (a name for
each weight that survives save/load) and `default_rule` (the `where=None`
rule). Everything here is importable from `kerasreg.selection` too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras

from kerasreg._compat import sublayers


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


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid `model`: expected a keras.Model or keras.layers.Layer. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
