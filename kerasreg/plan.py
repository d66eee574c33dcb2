"""The regularization plan of a model: `describe()`, a markdown table.

Named `plan`, not `describe`, so the package attribute `kerasreg.describe` is
the function, never shadowed by a module of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from kerasreg._checks import check_items, optimizer_iterations
from kerasreg._compat import sublayers
from kerasreg.fit_record import last_fit_callbacks
from kerasreg.selection import default_rule, weight_paths, where_predicate

# Layers whose own weights are normalization scales and offsets.
NORMALIZATION_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "RMSNormalization",
    )
    if hasattr(keras.layers, name)
)

# Layers whose weights are drawn together: an RNN and its cell, both
# directions of `Bidirectional`, the layer inside `TimeDistributed`.
GROUPING_LAYERS = (
    keras.layers.RNN,
    keras.layers.Bidirectional,
    keras.layers.Wrapper,
)


def weight_owners(model: keras.layers.Layer) -> dict[int, tuple[Any, str]]:
    """`{id(variable): (owning layer, group)}` for every weight of `model`.

    `group` is the path (as in `weight_paths`) of the layer a weight is shown
    under: the outermost RNN, `Bidirectional` or wrapper layer around it (so
    an LSTM's kernel and recurrent kernel, and both directions of a
    `Bidirectional`, share one group), else the layer that owns it.
    """
    owners: dict[int, tuple[Any, str]] = {}

    def visit(layer: Any, prefix: str, group: str | None, seen: set[int]) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        path = prefix.rstrip("/") or layer.name
        if group is None and layer is not model and isinstance(layer, GROUPING_LAYERS):
            group = path
        for child in sublayers(layer):
            visit(child, f"{prefix}{child.name}/", group, seen)
        for variable in layer.weights:
            if id(variable) not in owners:
                owners[id(variable)] = (layer, group or path)

    visit(model, "", None, set())
    return owners


def left_out_reason(variable: Any, layer: Any) -> str | None:
    """Why the default `where` rule leaves `variable` out, or None if it selects it."""
    if default_rule(variable):
        return None
    if not variable.trainable:
        return "not trainable"
    if isinstance(layer, NORMALIZATION_LAYERS):
        return "normalization"
    if variable.name == "bias":
        return "bias"
    return f"{len(variable.shape)}-D"


def penalty_text(regularizer: Any) -> str:
    """`ClassName(arg=value, ...)` of a regularizer, from its config."""
    if regularizer is None:
        return "none"
    try:
        config = regularizer.get_config()
    except NotImplementedError:
        config = {}
    args = ", ".join(f"{k}={_plain(v)!r}" for k, v in (config or {}).items())
    return f"{type(regularizer).__name__}({args})"


def is_post_step_callback(callback: Any) -> bool:
    """Duck typing: a kerasreg callback that changes weights has `where` and
    `describe_action()` (or, before that method existed, `rate`)."""
    return hasattr(callback, "where") and (
        callable(getattr(callback, "describe_action", None))
        or hasattr(callback, "rate")
    )


def logging_text(callback: Any) -> str | None:
    """What a kerasreg logger records about each weight it selects, or None.

    Duck typing: a callback with `where` and `describe_logging()` (such as
    `WeightNormLogger(gradients=True)`, which says when it logs gradient
    statistics)."""
    describe_logging = getattr(callback, "describe_logging", None)
    if not hasattr(callback, "where") or not callable(describe_logging):
        return None
    text = describe_logging()
    return None if text is None else f"{type(callback).__name__}: {text}"


def action_text(callback: Any) -> str:
    """What `callback` does to each weight it selects, in a few words."""
    name = type(callback).__name__
    describe_action = getattr(callback, "describe_action", None)
    if callable(describe_action):
        return f"{name}: {describe_action()}"
    return f"{name}: rate {_plain(callback.rate)!r}"


def describe(model: keras.Model, callbacks: Iterable[Any] | None = None) -> str:
    """The regularization plan of `model`, as a markdown table.

    One row per weight: every trainable weight, and every frozen
    (non-trainable) weight of 2 or more dimensions, such as a frozen layer's
    kernel. Columns:

    - `weight`: its path (`kerasreg.selection.weight_paths`, the same before
      and after save/load);
    - `shape`;
    - `penalty`: the regularizer Keras adds to the loss for it, as
      `ClassName(arguments)`, or `none`;
    - `callbacks`: what each kerasreg callback that acts on weights after
      each step (anything with `where` and `describe_action()`, such as
      `WeightDecay` and `SoftThreshold`) does to it: those in `callbacks`,
      or by default those of the model's last `fit`; and when a logger in
      `callbacks` records its gradient statistics
      (`WeightNormLogger(gradients=True)`: "gradient statistics every 10
      updates (training batch) ...", for the trainable weights its `where`
      selects);
    - `default where`: `selected` if the default `where=None` rule selects it,
      else why it is left out: `bias`, `normalization`, `1-D` (or `0-D`), or
      `not trainable`.

    `WeightNormLogger` writes the same table as the TensorBoard text summary
    `regularization/plan` at the start of each `fit`.

    Args:
        model: a built `keras.Model` (or layer).
        callbacks: optional iterable of callbacks, as passed to `fit`; those
            that are not post-step kerasreg callbacks are ignored. Default
            `None`: the post-step kerasreg callbacks of the model's last
            `fit` (remembered by the callbacks themselves), as long as the
            model has not trained since without them (its optimizer step has
            not moved since that `fit` ended); `[]` shows none.

    Returns:
        The markdown table, one line per row, ending with a newline.

    Raises:
        TypeError: `model` is not a Keras layer, or `callbacks` is not an
            iterable of `keras.callbacks.Callback`.
        ValueError: `model` has no weights (not built), or a callback's
            `where` is invalid for `model`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(2, kernel_regularizer=kerasreg.L2Penalty(0.01)),
    ... ])
    >>> print(kerasreg.describe(model))  # doctest: +NORMALIZE_WHITESPACE
    | weight | shape | penalty | callbacks | default where |
    |---|---|---|---|---|
    | `dense/kernel` | (3, 2) | L2Penalty(l2=0.01) | none | selected |
    | `dense/bias` | (2,) | none | none | left out: bias |
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "describe: invalid `model`: expected a keras.Model or layer. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
    remembered = callbacks is None
    callbacks = _check_callbacks(callbacks)
    if not model.weights:
        raise ValueError(
            f"describe: `model` {model.name!r} has no weights: build it (call it "
            "on data or give it an Input) first."
        )
    if remembered:
        callbacks = last_fit_callbacks(model, optimizer_iterations(model))
    paths = weight_paths(model)
    owners = weight_owners(model)
    actions = []
    for callback in callbacks:
        if is_post_step_callback(callback):
            predicate = where_predicate(callback.where, model)
            actions.append((predicate, action_text(callback)))
        elif (text := logging_text(callback)) is not None:
            selects = where_predicate(callback.where, model)

            def trained(variable: Any, selects: Any = selects) -> bool:
                return bool(variable.trainable) and selects(variable)

            actions.append((trained, text))
    lines = [
        "| weight | shape | penalty | callbacks | default where |",
        "|---|---|---|---|---|",
    ]
    seen: set[int] = set()
    for variable in model.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        if not variable.trainable and len(variable.shape) < 2:
            continue  # moving statistics, seed states, counters
        layer = owners.get(id(variable), (model, model.name))[0]
        regularizer = variable.regularizer if variable.trainable else None
        acting = [text for predicate, text in actions if predicate(variable)]
        reason = left_out_reason(variable, layer)
        lines.append(
            f"| `{paths.get(id(variable), variable.path)}` "
            f"| {tuple(int(d) for d in variable.shape)} "
            f"| {penalty_text(regularizer)} "
            f"| {'; '.join(acting) or 'none'} "
            f"| {'selected' if reason is None else 'left out: ' + reason} |"
        )
    return "\n".join(lines) + "\n"


def _check_callbacks(callbacks: Any) -> list[Any]:
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes)):
        raise TypeError(
            "describe: invalid `callbacks`: expected None or an iterable of "
            f"keras.callbacks.Callback. Received: callbacks={callbacks!r} "
            f"(type {type(callbacks).__name__})."
        )
    return check_items(
        callbacks,
        keras.callbacks.Callback,
        "describe: invalid `callbacks`",
        "keras.callbacks.Callback instances",
    )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value
