"""Composable `where=` selectors and the one dispatcher of every `where=` value.

`as_selector` turns any accepted `where=` (None, a regex string, a callable, an
iterable of layers/variables, a `Selector`) into a `Selector`;
`where_predicate` binds it to a model; `check_where` validates it before a
model is known. `kernels()`, `trainable()`, `path(regex)` and `layer(...)`
combine with `&`, `|` and `~`. The rule itself is documented in
`kerasreg.selection`, which re-exports the public names.

Longer than 400 lines on purpose: `Selector`, its eight small subclasses and
the functions that build and dispatch them are one closed family (the
operators of `Selector` build the subclasses, `as_selector` builds them from
any `where=`), and a third of it is the public docstrings with their
runnable examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import keras

from kerasreg._checks import check_items
from kerasreg.walk import all_weights, default_rule, walk_layers, weight_paths

Where: TypeAlias = "str | Selector | Callable[[Any], bool] | Iterable[Any] | None"


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
    kinds = (keras.layers.Layer, keras.Variable)
    check_items(items, kinds, f"Invalid `{argument}`", "Keras layers or variables")


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
