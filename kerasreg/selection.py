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

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras

from kerasreg._compat import sublayers

Where = "None | str | Selector | Callable[[Any], bool] | Iterable[Any]"


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
        paths = ", ".join(v.path for v in weights[:12])
        more = ", ..." if len(weights) > 12 else ""
        raise ValueError(
            f"`{argument}`={describe_where(where)} selects no weight of model "
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
    return as_selector(where, argument=argument).bind(_Context(model, argument))


def check_where(where: Where, *, argument: str = "where") -> Where:
    """Validate `where` before a model is known (e.g. in a callback's `__init__`).

    Checks its type, the regular expression's syntax and the types of an
    iterable's items; whether the items belong to the model and whether the
    selection is empty can only be checked later, by `select_weights`.

    Returns:
        `where`, with an iterable turned into a list (a generator can then be
        used more than once).
    """
    selector = as_selector(where, argument=argument)
    return selector.items if isinstance(selector, _Items) else where


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
            _check_items([item], argument)
    return ids


def _check_items(items: list[Any], argument: str) -> None:
    for item in items:
        if not isinstance(item, (keras.layers.Layer, keras.Variable)):
            raise TypeError(
                f"Invalid `{argument}`: an iterable must hold Keras layers or "
                f"variables. Received an item {item!r} "
                f"(type {type(item).__name__})."
            )


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid `model`: expected a keras.Model or keras.layers.Layer. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )


def describe_where(where: Where) -> str:
    """A short text for `where` in error messages."""
    if where is None or isinstance(where, (str, Selector)):
        return repr(where)
    if callable(where) and not isinstance(where, keras.layers.Layer):
        return getattr(where, "__name__", repr(where))
    if isinstance(where, (keras.layers.Layer, keras.Variable)):
        where = [where]
    if isinstance(where, Iterable) and not isinstance(where, (bytes, dict)):
        # Variables by path, layers by name: what the error is about.
        where = [
            i.path if isinstance(i, keras.Variable) else getattr(i, "name", i)
            for i in where
        ]
    text = repr(where)
    return text if len(text) <= 200 else text[:197] + "..."


def layer_matcher(
    specs: tuple[Any, ...], layers: list[Any], model: Any, argument: str
) -> Callable[[Any], bool]:
    """`layer -> bool`: True when any spec matches the layer.

    Specs are the ones `layer(...)` takes: a regular expression searched in
    the layer's name, a layer instance (which must be one of `layers`), a
    layer class, a callable `layer -> bool`. Shared by `layer(...)` and
    `regularize`'s deprecated `layers=`.
    """
    known = {id(x) for x in layers}
    tests = []
    for spec in specs:
        if isinstance(spec, str):
            pattern = compile_pattern(spec, argument)
            tests.append(lambda x, p=pattern: p.search(x.name) is not None)
        elif isinstance(spec, keras.layers.Layer):
            if id(spec) not in known:
                raise ValueError(
                    f"Invalid `{argument}`: layer {spec.name!r} is not "
                    f"part of model {getattr(model, 'name', model)!r}."
                )
            tests.append(lambda x, s=spec: x is s)
        elif isinstance(spec, type):
            tests.append(lambda x, c=spec: isinstance(x, c))
        else:
            tests.append(lambda x, f=spec: bool(f(x)))
    return lambda x: any(test(x) for test in tests)


# Composable selectors ---------------------------------------------------------


class _Context:
    """What selectors need to know about one model, computed once per binding."""

    def __init__(self, model: Any, argument: str) -> None:
        self.model = model
        self.argument = argument
        self._paths: dict[int, str] | None = None
        self._walked: list[tuple[Any, tuple[Any, ...]]] | None = None

    @property
    def paths(self) -> dict[int, str]:
        if self._paths is None:
            self._paths = weight_paths(self.model)
        return self._paths

    @property
    def walked(self) -> list[tuple[Any, tuple[Any, ...]]]:
        if self._walked is None:
            self._walked = list(walk_layers(self.model))
        return self._walked


class Selector:
    """A `where=` rule that combines with `&` (and), `|` (or) and `~` (not).

    Build one with `kernels()`, `trainable()`, `path(regex)` or `layer(...)`.
    A selector chooses among a model's trainable weights: `~s` is every
    trainable weight that `s` leaves out. A string, callable or iterable of
    layers/variables may stand on the other side of `&` and `|`; it means what
    it means as `where=`.

    Example:

    >>> import kerasreg
    >>> encoder = keras.Sequential(
    ...     [keras.layers.Dense(4, name="a"), keras.layers.LayerNormalization()],
    ...     name="encoder",
    ... )
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), encoder, keras.layers.Dense(1, name="head")]
    ... )
    >>> where = kerasreg.kernels() & kerasreg.layer("encoder")
    >>> where
    kernels() & layer('encoder')
    >>> paths = kerasreg.selection.weight_paths(model)
    >>> [paths[id(v)] for v in kerasreg.select_weights(model, where)]
    ['encoder/a/kernel']
    >>> [paths[id(v)] for v in kerasreg.select_weights(model, ~where)]
    ['encoder/a/bias', 'encoder/layer_normalization/gamma', \
'encoder/layer_normalization/beta', 'head/kernel', 'head/bias']
    """

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        """Return `variable -> bool` for the model in `context`; raises on bad input."""
        raise NotImplementedError

    def __and__(self, other: Any) -> Selector:
        return _And(self, as_selector(other, argument="where"))

    def __rand__(self, other: Any) -> Selector:
        return _And(as_selector(other, argument="where"), self)

    def __or__(self, other: Any) -> Selector:
        return _Or(self, as_selector(other, argument="where"))

    def __ror__(self, other: Any) -> Selector:
        return _Or(as_selector(other, argument="where"), self)

    def __invert__(self) -> Selector:
        return _Not(self)

    def __bool__(self) -> bool:
        # `s1 and s2` would silently drop s1: point to `&` instead.
        raise TypeError(
            "A kerasreg selector has no truth value: combine selectors with "
            "`&`, `|` and `~`, not `and`, `or` and `not`."
        )


def kernels() -> Selector:
    """The default rule (`where=None`) as a selector.

    Trainable weights with `ndim >= 2` that are not biases: kernels, recurrent
    kernels, embeddings, convolution filters. Biases (a `GRU` cell's 2-D bias
    too) and normalization scales and offsets are left out.

    Example:

    >>> import kerasreg
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [v.name for v in kerasreg.select_weights(model, kerasreg.kernels())]
    ['kernel']
    """
    return _Kernels()


def trainable() -> Selector:
    """Every trainable weight: biases and normalization scales included.

    Example:

    >>> import kerasreg
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [v.name for v in kerasreg.select_weights(model, kerasreg.trainable())]
    ['kernel', 'bias']
    """
    return _Trainable()


def path(regex: str) -> Selector:
    """Trainable weights whose path (`weight_paths`) contains a match of `regex`.

    The path is the chain of layer names below the model plus the variable
    name, e.g. `"encoder/dense/kernel"`; `regex` is searched (`re.search`), so
    anchor it (`"^encoder/"`, `"/kernel$"`) to match a whole part. A bare
    string passed as `where=` means the same.

    Args:
        regex: a regular expression.

    Example:

    >>> import kerasreg
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [v.name for v in kerasreg.select_weights(model, kerasreg.path("bias$"))]
    ['bias']
    """
    if not isinstance(regex, str):
        raise TypeError(
            "Invalid `regex`: expected a regular expression string. "
            f"Received: regex={regex!r} (type {type(regex).__name__})."
        )
    return _Path(regex, compile_pattern(regex, "regex"))


def layer(*specs: Any) -> Selector:
    """Trainable weights owned by matching layers or by their sublayers.

    A layer of the model (the model itself excluded) matches when any spec
    matches it. A weight is selected when its owning layer, or any layer that
    contains that layer (an enclosing sub-model, RNN layer or
    `Bidirectional`), matches. Combine with `kernels()` to leave out biases.

    Args:
        *specs: one or more of: a regular expression searched in the layer's
            name (`"^encoder$"`); a layer instance of the model; a layer class
            (`keras.layers.Dense`: its instances and subclasses' instances); a
            callable `layer -> bool`.

    Example:

    >>> import kerasreg
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
    ...      keras.layers.Dropout(0.1), keras.layers.Dense(1, name="head")]
    ... )
    >>> where = kerasreg.layer(keras.layers.Dense) & ~kerasreg.layer("head")
    >>> paths = kerasreg.selection.weight_paths(model)
    >>> [paths[id(v)] for v in kerasreg.select_weights(model, where)]
    ['hidden/kernel', 'hidden/bias']
    """
    if not specs:
        raise TypeError(
            "layer() needs at least one spec: a layer-name regular expression, "
            "a layer, a layer class or a callable `layer -> bool`."
        )
    for spec in specs:
        if isinstance(spec, str):
            compile_pattern(spec, "layer")
        elif not (
            isinstance(spec, keras.layers.Layer)
            or (isinstance(spec, type) and issubclass(spec, keras.layers.Layer))
            or callable(spec)
        ):
            raise TypeError(
                "Invalid `layer` spec: expected a layer-name regular expression, "
                "a Keras layer, a Keras layer class or a callable "
                f"`layer -> bool`. Received: {spec!r} (type {type(spec).__name__})."
            )
    return _Layer(specs)


def as_selector(where: Where, *, argument: str = "where") -> Selector:
    """Any accepted `where=` value as a `Selector` (validated, not yet bound).

    Raises:
        TypeError: `where` has an unsupported type, or an iterable holds
            something other than layers and variables.
        ValueError: `where` is an invalid regular expression.
    """
    if where is None:
        return _Kernels()
    if isinstance(where, Selector):
        return where
    if isinstance(where, str):
        return _Path(where, compile_pattern(where, argument))
    if isinstance(where, (keras.layers.Layer, keras.Variable)):
        where = [where]
    if callable(where):
        return _Callable(where)
    if isinstance(where, Iterable) and not isinstance(where, (bytes, dict)):
        items = list(where)
        _check_items(items, argument)
        return _Items(items)
    raise TypeError(
        f"Invalid `{argument}`: expected None, a regular expression string, a "
        "callable `variable -> bool`, an iterable of layers and/or variables, "
        "or a selector such as `kerasreg.kernels() & kerasreg.path(...)`. "
        f"Received: {argument}={where!r} (type {type(where).__name__})."
    )


class _Kernels(Selector):
    def bind(self, context: _Context) -> Callable[[Any], bool]:
        return default_rule

    def __repr__(self) -> str:
        return "kernels()"


class _Trainable(Selector):
    def bind(self, context: _Context) -> Callable[[Any], bool]:
        return lambda v: bool(v.trainable)

    def __repr__(self) -> str:
        return "trainable()"


class _Path(Selector):
    def __init__(self, regex: str, pattern: re.Pattern) -> None:
        self.regex = regex
        self.pattern = pattern

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        paths = context.paths
        return lambda v: (
            bool(v.trainable)
            and (self.pattern.search(paths.get(id(v), v.path)) is not None)
        )

    def __repr__(self) -> str:
        return f"path({self.regex!r})"


class _Layer(Selector):
    def __init__(self, specs: tuple[Any, ...]) -> None:
        self.specs = specs

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        model = context.model
        inside = [layer for layer, _ in context.walked if layer is not model]
        match = layer_matcher(self.specs, inside, model, context.argument)
        ids = {id(v) for x in inside if match(x) for v in x.weights}
        return lambda v: bool(v.trainable) and id(v) in ids

    def __repr__(self) -> str:
        def spec_repr(spec: Any) -> str:
            if isinstance(spec, keras.layers.Layer):
                return f"<layer {spec.name!r}>"
            if isinstance(spec, type):
                return spec.__name__
            return repr(spec) if isinstance(spec, str) else describe_where(spec)

        return f"layer({', '.join(spec_repr(s) for s in self.specs)})"


class _Callable(Selector):
    def __init__(self, function: Callable[[Any], bool]) -> None:
        self.function = function

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        return lambda v: bool(v.trainable) and bool(self.function(v))

    def __repr__(self) -> str:
        return describe_where(self.function)


class _Items(Selector):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        ids = _ids_of_items(self.items, context.model, context.argument)
        return lambda v: id(v) in ids

    def __repr__(self) -> str:
        return describe_where(
            [getattr(i, "path", getattr(i, "name", i)) for i in self.items]
        )


class _And(Selector):
    def __init__(self, left: Selector, right: Selector) -> None:
        self.left, self.right = left, right

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        left, right = self.left.bind(context), self.right.bind(context)
        return lambda v: left(v) and right(v)

    def __repr__(self) -> str:
        return f"{_wrap(self.left, _Or)} & {_wrap(self.right, _Or)}"


class _Or(Selector):
    def __init__(self, left: Selector, right: Selector) -> None:
        self.left, self.right = left, right

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        left, right = self.left.bind(context), self.right.bind(context)
        return lambda v: left(v) or right(v)

    def __repr__(self) -> str:
        return f"{self.left!r} | {self.right!r}"


class _Not(Selector):
    def __init__(self, inner: Selector) -> None:
        self.inner = inner

    def bind(self, context: _Context) -> Callable[[Any], bool]:
        inner = self.inner.bind(context)
        return lambda v: bool(v.trainable) and not inner(v)

    def __repr__(self) -> str:
        return f"~{_wrap(self.inner, (_And, _Or))}"


def _wrap(selector: Selector, kinds: Any) -> str:
    text = repr(selector)
    return f"({text})" if isinstance(selector, kinds) else text
