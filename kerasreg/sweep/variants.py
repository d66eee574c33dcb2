"""The variants of a sweep: copies of the template, each with its own penalties,
compiled like the template with a fresh optimizer."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import keras

from kerasreg.attach import REMOVE, regularize


def copy_template(model: keras.Model, index: int) -> keras.Model:
    """`clone_model(model)` with its weights, named `variant_{index}`."""
    try:
        # Unique variable paths: the torch backend keys parameters by path, and
        # one stacked model with K equal paths would zero only one variant's grads.
        # Under a keras.distribution (JAX) the LayoutMap full-matches paths: there
        # the template's paths are kept, so every variant gets the template's layout.
        if keras.distribution.distribution() is None:
            scope = keras.name_scope(f"kerasreg_sweep_{index}")
        else:
            scope = contextlib.nullcontext()
        with scope:
            variant = keras.models.clone_model(model)
    except Exception as error:  # Keras raises many types for uncloneable models
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} cannot be copied "
            f"with keras.models.clone_model ({type(error).__name__}: {error})."
        ) from None
    variant.set_weights(model.get_weights())
    variant.name = f"variant_{index}"
    return variant


def make_variant(model: keras.Model, penalty: dict, where: Any, index: int):
    variant = copy_template(model, index)
    roles = {r: (REMOVE if p is None else p) for r, p in penalty.items()}
    try:
        regularize(variant, **roles, where=where)
    except (TypeError, ValueError) as error:
        raise type(error)(f"kerasreg.sweep: penalties[{index}]: {error}") from None
    return variant


def fresh_optimizer(compile_config, exclusions, models):
    """The template's optimizer, anew, with its weight-decay exclusions for `models`."""
    # Keras's deserialization consumes parts of the config it reads: a copy.
    config = copy.deepcopy(compile_config["optimizer"])
    optimizer = keras.saving.deserialize_keras_object(config)
    names, indices = exclusions
    if names or indices:
        optimizer.exclude_from_weight_decay(
            var_list=[m.weights[i] for m in models for i in indices] or None,
            var_names=names or None,
        )
    return optimizer


def compile_like(variant, compile_config, exclusions):
    config = keras.saving.deserialize_keras_object(copy.deepcopy(compile_config))
    config["optimizer"] = fresh_optimizer(compile_config, exclusions, [variant])
    variant.compile(**config)
