"""What `sweep` needs to know of the training data it is given.

- its kind: arrays, a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
  one-pass iterator (a Python generator: it can be read once, so only an
  engine that trains every variant in one `fit` may take it), or another
  iterable (read again at each `iter`, as a torch `DataLoader`);
- one batch of it (to build the variants' losses and metrics before the
  step is traced), read without consuming anything a `fit` will need.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import keras

ARRAYS = "arrays"
DATASET = "tf.data.Dataset"
PYDATASET = "keras.utils.PyDataset"
ONE_PASS = "one-pass iterator"
ITERABLE = "iterable"


def is_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def kind(x: Any) -> str:
    """The kind of training data `x` is (one of this module's constants)."""
    if isinstance(x, keras.utils.PyDataset):
        return PYDATASET
    if is_dataset(x):
        return DATASET
    if is_array(x) or (
        isinstance(x, (list, tuple, dict))
        and all(is_array(v) for v in keras.tree.flatten(x))
    ):
        return ARRAYS
    if isinstance(x, types.GeneratorType) or (hasattr(x, "__next__") and iter(x) is x):
        return ONE_PASS
    return ITERABLE


# The first batch of each re-chained one-pass iterator, read by `peek`.
_FIRST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rechained(first: Any, rest: Any):
    yield first
    yield from rest


def peek(x: Any) -> tuple[Any, Any]:
    """`(first batch, x to give to fit)`: a one-pass iterator is re-chained.

    The re-chained iterator is a Python generator (what Keras's `fit`
    accepts) yielding the batch read, then the rest; peeking at it again
    reads nothing.
    """
    data_kind = kind(x)
    if data_kind == PYDATASET:
        return x[0], x
    if data_kind == DATASET:
        return next(iter(x)), x
    if data_kind == ONE_PASS:
        try:
            if x in _FIRST:
                return _FIRST[x], x
        except TypeError:  # not weakly referable: not one of ours
            pass
        first = next(x)
        rechained = _rechained(first, x)
        _FIRST[rechained] = first
        return first, rechained
    if data_kind == ITERABLE:
        return next(iter(x)), x
    return None, x


def has_sample_weights(x, fit_kwargs, first=None) -> bool:
    """Whether any batch of training or validation data may carry weights."""
    if fit_kwargs.get("sample_weight") is not None or fit_kwargs.get("class_weight"):
        return True
    validation = fit_kwargs.get("validation_data")
    # Validation data can only add weights: the training data is read below.
    if isinstance(validation, (tuple, list)) and len(validation) > 2:
        if validation[2] is not None:
            return True
    elif validation is not None and not isinstance(validation, (tuple, list)):
        return True  # a dataset or generator: its elements may hold weights
    if kind(x) == DATASET:
        spec = x.element_spec
        return not isinstance(spec, tuple) or len(spec) > 2
    if first is not None:
        return not isinstance(first, tuple) or (len(first) > 2 and first[2] is not None)
    return False


def sample_batch(x, y, first=None):
    """Two samples of `(x, y)`, from the arrays or from a first batch."""
    if first is not None:
        x, y = first[0], first[1] if len(first) > 1 else None
    return (
        keras.tree.map_structure(lambda v: v[:2], x),
        None if y is None else keras.tree.map_structure(lambda v: v[:2], y),
    )
