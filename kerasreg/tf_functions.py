"""TensorFlow functions traced once per instance, called as concrete functions.

kerasreg builds a `tf.function` per measured selection (`weight_norms`), per
in-place update and per set of TensorBoard tags, each traced once and then
called many times. TensorFlow's frequent-retracing detector counts traces per
Python *code object*, so many such instances (many models, many selections)
look like one function retraced over and over and log "triggered tf.function
retracing" warnings although nothing is retraced. A concrete function
(`get_concrete_function`, public TensorFlow API) is called without that
bookkeeping, and with less argument dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def traced_once(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """`tf.function(fn, **options)`, traced at its first call and afterwards
    called through that concrete function.

    Every later call must pass arguments of the first call's structure,
    dtypes and shapes (variables stay variables: their live values are read).
    """
    import tensorflow as tf

    function = tf.function(fn, **options)
    concrete: list[Any] = []

    def call(*args: Any) -> Any:
        if not concrete:
            concrete.append(function.get_concrete_function(*args))
        return concrete[0](*args)

    return call
