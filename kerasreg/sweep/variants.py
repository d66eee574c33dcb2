"""The variants of a sweep: copies of the template, each with its own penalties,
compiled like the template with a fresh optimizer.

A copy is `keras.models.clone_model` of the template with its weights, plus
what the clone does not carry and a separate fit of the template would keep:
the `trainable` flag of each variable, and the state of the penalties the
template already carries (the reference of an `L2SPPenalty`: a clone builds
its penalties from their config, without it).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import keras
import numpy as np

from kerasreg import _compat
from kerasreg.attach import REMOVE, regularize, role_listing, role_weights
from kerasreg.penalties import (
    ElasticNetPenalty,
    ExpAbsPenalty,
    L1Penalty,
    L2Penalty,
    L2SPPenalty,
)
from kerasreg.selection import describe_where, select_weights

# Regularizers that hold no state beyond their config: a clone's is the same.
STATELESS = (
    L1Penalty,
    L2Penalty,
    ElasticNetPenalty,
    ExpAbsPenalty,
    keras.regularizers.L1,
    keras.regularizers.L2,
    keras.regularizers.L1L2,
    keras.regularizers.OrthogonalRegularizer,
)


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
    carry_state(model, variant)
    variant.name = f"variant_{index}"
    return variant


def check_roles(model: keras.Model, points: Any, where: Any, role: str) -> None:
    """Refuse, before any copy is made, a `where` that selects no weight of the
    template and a grid item acting on a role no selected weight has, naming
    the argument at fault (not the variant that would have failed)."""
    if where is not None:
        try:
            select_weights(model, where)
        except (TypeError, ValueError) as error:
            raise type(error)(f"kerasreg.sweep: invalid `where`: {error}") from None
    checked: set[str] = set()
    for index, point in enumerate(points):
        for key in point.penalties:
            if key in checked:
                continue
            checked.add(key)
            try:
                found = role_weights(model, key, where)
            except ValueError as error:  # a quantized kernel
                raise ValueError(
                    f"kerasreg.sweep: invalid `penalties[{index}]`: {error}"
                ) from None
            if found:
                continue
            given = f" (`role`={role!r})" if key == role else ""
            scope = (
                ""
                if where is None
                else f" that `where`={describe_where(where)} selects"
            )
            raise ValueError(
                f"kerasreg.sweep: invalid `penalties[{index}]`: it acts on the "
                f"{key} role{given}, but no weight of model {model.name!r}{scope} "
                f"has that role. {role_listing(model)} Choose `role=` (or the "
                "keys of a `{role: penalty}` item) among the roles listed."
            )


def make_variant(model: keras.Model, penalty: dict, where: Any, index: int):
    variant = copy_template(model, index)
    roles = {r: (REMOVE if p is None else p) for r, p in penalty.items()}
    try:
        regularize(variant, **roles, where=where)
    except (TypeError, ValueError) as error:
        raise type(error)(f"kerasreg.sweep: penalties[{index}]: {error}") from None
    return variant


def carry_state(template: keras.Model, variant: keras.Model) -> None:
    """Give `variant` the variables' `trainable` flags and penalty state of `template`.

    Raises:
        ValueError: a penalty of the template holds state this function
            cannot copy (a regularizer class it does not know that keeps
            tensors or variables).
    """
    pairs = list(zip(template.weights, variant.weights, strict=True))
    for source, target in pairs:
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(
                f"kerasreg.sweep: invalid `model`: its copy has weight "
                f"{target.path!r} of shape {tuple(target.shape)} where the "
                f"template has {source.path!r} of shape {tuple(source.shape)}."
            )
        target.trainable = source.trainable
        _carry_penalty(source, target)


def _carry_penalty(source: keras.Variable, target: keras.Variable) -> None:
    penalty = source.regularizer
    if penalty is None or type(penalty) in STATELESS:
        return
    if type(penalty) is L2SPPenalty:
        reference = penalty.reference
        if reference is None:
            # Both take their weight's value at first use: the same value.
            return
        copied = target.regularizer
        if type(copied) is not L2SPPenalty:
            raise ValueError(
                f"kerasreg.sweep: the copy of weight {source.path!r} lost its "
                "L2SPPenalty; the template cannot be copied with its reference."
            )
        # Public API only: the penalty takes its reference from its weight.
        value = keras.ops.convert_to_numpy(target.value)
        target.assign(keras.ops.convert_to_numpy(reference))
        copied.set_reference(target)
        target.assign(value)
        return
    state = [
        name
        for name, value in vars(penalty).items()
        if isinstance(value, (keras.Variable, np.ndarray)) or keras.ops.is_tensor(value)
    ]
    if state:
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: the regularizer "
            f"{type(penalty).__name__} of weight {source.path!r} holds state "
            f"({', '.join(state)}) that a copy made from its config would not "
            "have; the sweep cannot give every variant the same penalty. "
            "Remove it from the template, or use a kerasreg penalty."
        )


def fresh_optimizer(compile_config, exclusions, models, variables=None):
    """The template's optimizer, anew, with its weight-decay exclusions.

    `exclusions` is `(var_names, indices)`: the indices are positions in a
    model's `weights`; they exclude those weights of each of `models`, or
    `variables[i]` for each index `i` when `variables` is given.
    """
    # Keras's deserialization consumes parts of the config it reads: a copy.
    config = copy.deepcopy(compile_config["optimizer"])
    optimizer = keras.saving.deserialize_keras_object(config)
    names, indices = exclusions
    if variables is not None:
        excluded = [variables[i] for i in indices]
    else:
        excluded = [m.weights[i] for m in models for i in indices]
    if names or excluded:
        optimizer.exclude_from_weight_decay(
            var_list=excluded or None, var_names=list(names) or None
        )
    return optimizer


# The key of `compile_recipe` holding the template's loss objects themselves.
LOSS_OBJECTS = "kerasreg_loss_objects"


def compile_recipe(model: keras.Model) -> dict:
    """`model.get_compile_config()`, with `model`'s loss objects themselves.

    Keras's configs drop some loss arguments (Keras 3.15: `Huber(delta=0.3)`
    comes back as `Huber()`; a copy goes through the config too), so the
    variants share the template's loss objects (a Keras loss holds no state),
    not losses rebuilt from the config. A compiled metric
    whose config drops an argument cannot be copied (it holds variables): it
    is refused, naming the argument.

    Raises:
        ValueError: a compiled metric's config does not keep its arguments.
    """
    config = dict(model.get_compile_config())
    arguments = _compat.compile_arguments(model)
    for key in ("metrics", "weighted_metrics"):
        for metric in keras.tree.flatten(arguments.get(key)):
            _check_round_trip(metric, key)
    config[LOSS_OBJECTS] = arguments.get("loss")
    return config


def _check_round_trip(metric: Any, key: str) -> None:
    given = _compat.function_arguments(metric)
    if not given:
        return
    rebuilt = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    again = _compat.function_arguments(rebuilt) or {}
    lost = {k: v for k, v in given.items() if k not in again or again[k] != v}
    if lost:
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: its compiled `{key}` entry "
            f"{type(metric).__name__} loses {lost} in its Keras config (received "
            f"{type(metric).__name__}({', '.join(f'{k}={v!r}' for k, v in lost.items())})"
            "), so the variants, compiled from the config, would compute another "
            "metric. Accepted: metrics whose config keeps their arguments (leave "
            "these at their defaults, or write the metric as a function)."
        )


def check_compile_config(model: keras.Model, compile_config: dict) -> None:
    """Refuse, before any copy is made, a compile config Keras cannot rebuild
    (an unregistered custom loss or metric): every variant is compiled from it."""
    try:
        compile_arguments(compile_config)
    except Exception as error:  # Keras raises several types here
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: the compile config of "
            f"{model.name!r} cannot be rebuilt ({type(error).__name__}: {error}). "
            "Each variant is compiled from it: register custom losses and metrics "
            "with @keras.saving.register_keras_serializable()."
        ) from None


def check_loss_reduction(template: keras.Model) -> None:
    """Refuse a compiled loss with `reduction="none"`: a loss per sample, to
    which Keras cannot add a penalty (its fit fails stacking the vector with
    the penalties' scalars), in one fit or in separate fits."""
    losses = template.loss
    if isinstance(losses, dict):
        losses = list(losses.values())
    elif not isinstance(losses, (list, tuple)):
        losses = [losses]
    for loss in losses:
        if isinstance(loss, keras.losses.Loss) and loss.reduction in (None, "none"):
            raise ValueError(
                f"kerasreg.sweep: invalid `model`: its loss {type(loss).__name__} "
                f"has reduction={loss.reduction!r} (one loss per sample), to which "
                "Keras cannot add a penalty. Compile it with "
                "reduction='sum_over_batch_size' (the default) or 'sum'. Nothing "
                "was trained."
            )


def compile_arguments(compile_config: dict) -> dict:
    """The keyword arguments of `compile` from a `compile_recipe`: fresh
    objects from the config, but the template's own losses."""
    config = dict(compile_config)
    losses = config.pop(LOSS_OBJECTS, None)
    config = keras.saving.deserialize_keras_object(copy.deepcopy(config))
    if losses is not None:
        config["loss"] = losses
    return config


def compile_like(variant, compile_config, exclusions):
    config = compile_arguments(compile_config)
    config["optimizer"] = fresh_optimizer(compile_config, exclusions, [variant])
    variant.compile(**config)
