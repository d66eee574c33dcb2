"""The reference every sweep engine is held to: each variant's own separate fit.

A variant's reference is a `keras.models.clone_model` of the template with
the template's weights (and the `trainable` flag of each weight), the
variant's penalties attached with `kerasreg.regularize`, compiled by the
test's own compile function (a fresh optimizer), and `fit` on the same data.
Nothing of `kerasreg.sweep` is used to build it.
"""

from __future__ import annotations

import keras
import numpy as np

import kerasreg

RTOL, ATOL = 2e-5, 2e-6


def separate_fit(
    template,
    penalty,
    x,
    y,
    compile_kwargs,
    *,
    where=None,
    role="kernel",
    prepare=None,
    **fit_kwargs,
):
    """`(history, final weights, model)` of the plain Keras fit of one variant.

    `compile_kwargs()` returns fresh compile arguments (a new optimizer);
    `prepare(model)`, when given, finishes the copy (e.g. gives a penalty
    its reference) before it is compiled; `x` may be a callable returning
    fresh data (a new generator).
    """
    model = keras.models.clone_model(template)
    model.set_weights(template.get_weights())
    for source, target in zip(template.weights, model.weights, strict=True):
        target.trainable = source.trainable
    roles = penalty if isinstance(penalty, dict) else {role: penalty}
    roles = {r: p for r, p in roles.items() if p is not None}
    if roles:
        kerasreg.regularize(model, **roles, where=where)
    if prepare is not None:
        prepare(model)
    model.compile(**compile_kwargs())
    data = x() if callable(x) else x
    history = model.fit(data, y, **fit_kwargs).history
    return history, model.get_weights(), model


def assert_same_fit(row, model, history, weights, rtol=RTOL, atol=ATOL):
    """The sweep's row and trained model equal a separate fit's history and weights."""
    assert set(row["history"]) == set(history), (row["history"].keys(), history.keys())
    for key, values in history.items():
        np.testing.assert_allclose(
            row["history"][key], values, rtol=rtol, atol=atol, err_msg=key
        )
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_untouched(template, before):
    """The template's weights are those it had before the sweep was called."""
    for got, want in zip(template.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
