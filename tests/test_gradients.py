"""`kerasreg.gradient_norms` against closed forms and the backends' own autodiff.

References: for a linear model with mean squared error and `L2Penalty(c)` the
data gradient is `2/n X^T (Xw - y)` (with sample weights `2/n X^T (s * (Xw -
y))`) and the penalty gradient `2cw`; for a deeper model the data gradient is
taken by `tf.GradientTape`, `jax.grad` or `torch.autograd` on the model's own
forward pass, and the penalty gradients from their NumPy formulas.
"""

import keras
import numpy as np
import pytest
from conftest import assert_close, gradient_statistics, np_weights

import kerasreg

BACKEND = keras.backend.backend()


def linear_model(c=0.3, bias=False):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                1, use_bias=bias, kernel_regularizer=kerasreg.L2Penalty(c), name="lin"
            ),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def expected(data, penalty):
    return gradient_statistics(data, penalty)


def assert_stats(actual, reference, what, tolerance=2e-5):
    assert set(actual) == set(reference), what
    for name, value in reference.items():
        assert_close(actual[name], value, f"{what}: {name}", tolerance)


@pytest.mark.parametrize("batch_size", [None, 7, 40])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_mse_l2_closed_form(rng, batch_size, weighted):
    x = rng.normal(size=(40, 3)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    s = rng.uniform(0.2, 2.0, size=40).astype("float32") if weighted else None
    c = 0.3
    model = linear_model(c)
    w = np_weights(model.get_layer("lin").kernel)
    residual = x.astype(np.float64) @ w - y
    if weighted:
        residual = residual * s[:, None]
    data = 2.0 / len(x) * x.T.astype(np.float64) @ residual
    stats = kerasreg.gradient_norms(model, x, y, sample_weight=s, batch_size=batch_size)
    assert list(stats) == ["lin/kernel"]
    assert_stats(stats["lin/kernel"], expected(data, 2 * c * w), "lin/kernel")


def test_weight_without_penalty_and_zero_gradients(rng):
    model = linear_model(bias=True)
    x = rng.normal(size=(8, 3)).astype("float32")
    stats = kerasreg.gradient_norms(model, x, model.predict(x, verbose=0), where="bias")
    # A perfect fit and no penalty: both gradients are zero, share and cosine 0.
    assert stats["lin/bias"] == {
        "data": 0.0,
        "penalty": 0.0,
        "total": 0.0,
        "penalty_share": 0.0,
        "cosine": 0.0,
    }


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients_give_nan_share_and_cosine(rng, bad):
    # Never a made-up 0 or -1: a NaN or infinite data gradient makes the
    # statistics that divide by it NaN; the penalty gradient stays finite.
    model = linear_model(bias=True)
    w = np_weights(model.get_layer("lin").kernel)
    x = rng.normal(size=(8, 3)).astype("float32")
    x[0, 0] = bad
    y = rng.normal(size=(8, 1)).astype("float32")
    stats = kerasreg.gradient_norms(model, x, y)["lin/kernel"]
    assert not np.isfinite(stats["data"]) and not np.isfinite(stats["total"])
    assert_close(stats["penalty"], np.linalg.norm(2 * 0.3 * w), "penalty", 2e-5)
    assert np.isnan(stats["penalty_share"]) and np.isnan(stats["cosine"])


def deep_model():
    """Two inputs, two outputs with loss weights, every penalty kind on some role."""
    a = keras.Input((4,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(
        6,
        activation="tanh",
        kernel_regularizer=kerasreg.L1Penalty(0.02),
        bias_regularizer=keras.regularizers.L2(0.3),
        name="h",
    )(a)
    g = keras.layers.Dense(
        5,
        activation="sigmoid",
        kernel_regularizer=kerasreg.ExpAbsPenalty(0.01),
        name="g",
    )(keras.layers.Concatenate()([h, b]))
    out1 = keras.layers.Dense(
        1, kernel_regularizer=kerasreg.L2SPPenalty(0.5), name="out1"
    )(g)
    out2 = keras.layers.Dense(
        3,
        activation="softmax",
        kernel_regularizer=keras.regularizers.L1L2(0.01, 0.02),
        name="out2",
    )(g)
    model = keras.Model({"a": a, "b": b}, {"out1": out1, "out2": out2})
    model.compile(
        optimizer="adam",
        loss={"out1": "mse", "out2": "sparse_categorical_crossentropy"},
        loss_weights={"out1": 0.7, "out2": 1.9},
    )
    return model


def reference_data_gradients(model, x, y):
    """`d(0.7 mse + 1.9 crossentropy)/dw` for every trainable weight, by the
    backend's own automatic differentiation of the model's forward pass."""
    mse = keras.losses.MeanSquaredError()
    xent = keras.losses.SparseCategoricalCrossentropy()

    def loss_of(pred):
        return 0.7 * mse(y["out1"], pred["out1"]) + 1.9 * xent(y["out2"], pred["out2"])

    weights = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_of(model(x))
        grads = tape.gradient(loss, [w.value for w in weights])
    elif BACKEND == "jax":
        import jax

        def f(values):
            pred, _ = model.stateless_call(
                values, [v.value for v in model.non_trainable_variables], x
            )
            return loss_of(pred)

        grads = jax.jit(jax.grad(f))([w.value for w in weights])
    else:
        for w in weights:
            w.value.grad = None
        loss_of(model(x)).backward()
        grads = [w.value.grad for w in weights]
    return {
        w.path: np.asarray(keras.ops.convert_to_numpy(g), np.float64)
        for w, g in zip(weights, grads, strict=True)
    }


def reference_penalty_gradient(regularizer, w, ref=None):
    if isinstance(regularizer, kerasreg.L1Penalty):
        return regularizer.l1 * np.sign(w)
    if isinstance(regularizer, kerasreg.ExpAbsPenalty):
        return regularizer.factor * np.sign(w) * np.exp(np.abs(w))
    if isinstance(regularizer, kerasreg.L2SPPenalty):
        return 2 * regularizer.alpha * (w - ref)
    if isinstance(regularizer, keras.regularizers.L1L2):
        return float(regularizer.l1) * np.sign(w) + 2 * float(regularizer.l2) * w
    if isinstance(regularizer, keras.regularizers.L2):
        return 2 * float(regularizer.l2) * w
    raise AssertionError(regularizer)


def test_deeper_model_matches_the_backends_autodiff(rng):
    model = deep_model()
    x = {
        "a": rng.normal(size=(24, 4)).astype("float32"),
        "b": rng.normal(size=(24, 2)).astype("float32"),
    }
    y = {
        "out1": rng.normal(size=(24, 1)).astype("float32"),
        "out2": rng.integers(0, 3, size=(24, 1)),
    }
    assert model.losses  # the L2SP penalty takes its reference ...
    model.set_weights([w + rng.normal(size=w.shape) for w in model.get_weights()])
    out1 = model.get_layer("out1")  # ... and the weights move away from it
    ref = np.asarray(keras.ops.convert_to_numpy(out1.kernel_regularizer.reference))
    assert not np.allclose(ref, np_weights(out1.kernel))
    where = kerasreg.trainable()  # biases too: a Keras L2 on `h`'s bias role
    stats = kerasreg.gradient_norms(model, x, y, where=where)
    data = reference_data_gradients(model, x, y)
    paths = kerasreg.selection.weight_paths(model)
    for variable in model.trainable_variables:
        key = paths[id(variable)]
        w = np_weights(variable)
        regularizer = variable.regularizer
        penalty = (
            np.zeros_like(w)
            if regularizer is None
            else reference_penalty_gradient(regularizer, w, ref)
        )
        assert_stats(stats[key], expected(data[variable.path], penalty), key, 1e-4)
    assert stats["h/bias"]["penalty"] > 0 and stats["out2/bias"]["penalty"] == 0


def test_batches_weighted_by_size_equal_one_batch(rng):
    model = deep_model()
    x = {
        "a": rng.normal(size=(23, 4)).astype("float32"),
        "b": rng.normal(size=(23, 2)).astype("float32"),
    }
    y = {
        "out1": rng.normal(size=(23, 1)).astype("float32"),
        "out2": rng.integers(0, 3, size=(23, 1)),
    }
    whole = kerasreg.gradient_norms(model, x, y)
    for batch_size in (5, 23):
        batched = kerasreg.gradient_norms(model, x, y, batch_size=batch_size)
        for key, stats in whole.items():
            assert_stats(batched[key], stats, f"{key} in batches of {batch_size}")


def test_a_dataset_gives_what_its_arrays_give(rng):
    import tensorflow as tf

    model = linear_model()
    x = rng.normal(size=(30, 3)).astype("float32")
    y = rng.normal(size=(30, 1)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    assert_stats(
        kerasreg.gradient_norms(model, dataset)["lin/kernel"],
        kerasreg.gradient_norms(model, x, y, batch_size=10)["lin/kernel"],
        "dataset",
    )


def test_activity_regularizer_and_add_loss_are_not_part_of_the_data_loss(rng):
    class AddsLoss(keras.layers.Layer):
        def call(self, x):
            self.add_loss(5.0 * keras.ops.sum(keras.ops.square(x)))
            return x

    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    plain = linear_model()
    extra = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                1,
                use_bias=False,
                kernel_regularizer=kerasreg.L2Penalty(0.3),
                activity_regularizer=keras.regularizers.L2(3.0),
                name="lin",
            ),
            AddsLoss(),
        ]
    )
    extra.compile(optimizer="sgd", loss="mse")
    extra.set_weights(plain.get_weights())
    assert_stats(
        kerasreg.gradient_norms(extra, x, y)["lin/kernel"],
        kerasreg.gradient_norms(plain, x, y)["lin/kernel"],
        "lin/kernel",
    )


def state_of(model):
    """Every variable of the model, its optimizer and its metrics, as NumPy."""
    variables = model.weights + model.optimizer.variables + model.metrics_variables
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def test_nothing_in_the_model_changes(rng):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, kernel_regularizer=kerasreg.L2Penalty(0.1), name="a"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5, seed=1),
            keras.layers.Dense(1, name="b"),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model.train_on_batch(x[:8], y[:8])  # optimizer slots, metrics
    before = state_of(model)
    counts = [len(model.weights), len(model.optimizer.variables)]
    train = kerasreg.gradient_norms(model, x, y, training=True)
    again = kerasreg.gradient_norms(model, x, y, training=True)
    infer = kerasreg.gradient_norms(model, x, y, batch_size=8)
    after = state_of(model)
    assert counts == [len(model.weights), len(model.optimizer.variables)]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    # Dropout and batch statistics acted (training=True differs), with the
    # same seed state each time (same masks: same numbers).
    assert train["a/kernel"]["data"] != pytest.approx(infer["a/kernel"]["data"])
    assert train == again


@pytest.mark.parametrize("seed", [None, 1])
@pytest.mark.parametrize("training", [True, False])
def test_the_next_fit_draws_the_masks_it_would_have_drawn(rng, training, seed):
    # Dropout draws from the backend's global random state when unseeded (on
    # torch, torch's own generator): the call leaves it where it was, and the
    # fit after it equals the same fit without it. On torch, a model's first
    # call (Keras's own `predict` too) changes the masks a later fit draws for
    # an unseeded Dropout: Keras's behaviour, documented; there only the
    # generator's state is compared.
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")

    def fitted(measure_first):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, kernel_regularizer=kerasreg.L2Penalty(0.1)),
                keras.layers.Dropout(0.5, seed=seed),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
        if measure_first:
            state = global_random_state()
            kerasreg.gradient_norms(model, x, y, training=training)
            kerasreg.gradient_norms(model, x, y, batch_size=8, training=training)
            np.testing.assert_array_equal(global_random_state(), state)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    measured = fitted(True)
    if BACKEND == "torch" and seed is None:
        return
    for a, b in zip(measured, fitted(False), strict=True):
        np.testing.assert_array_equal(a, b)


def global_random_state():
    """torch's global generator state (the other backends draw from Keras's
    seed state, checked by test_nothing_in_the_model_changes)."""
    if BACKEND != "torch":
        return np.zeros(0)
    import torch

    return torch.random.get_rng_state().numpy()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"batch_size": "8"}, TypeError, "batch_size"),
        ({"batch_size": True}, ValueError, "batch_size"),
        ({"training": "yes"}, TypeError, "training"),
        ({"where": "nothing-matches"}, ValueError, "selects no weight"),
    ],
)
def test_bad_arguments_name_the_argument(rng, kwargs, error, match):
    model = linear_model()
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(error, match=match):
        kerasreg.gradient_norms(model, x, x[:, :1], **kwargs)


def test_refusals(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="not compiled with a `loss`"):
        kerasreg.gradient_norms(uncompiled, x, x[:, :1])
    with pytest.raises(TypeError, match="model"):
        kerasreg.gradient_norms(keras.layers.Dense(1), x, x[:, :1])
    model = linear_model()
    stranger = keras.Variable(np.ones((3, 1), "float32"), name="stranger")
    with pytest.raises(ValueError, match="not a weight of model"):
        kerasreg.gradient_norms(model, x, x[:, :1], where=[stranger])
    with pytest.raises(ValueError, match="no sample"):
        kerasreg.gradient_norms(model, x[:0], x[:0, :1])
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(2)
    with pytest.raises(ValueError, match="batch_size"):
        kerasreg.gradient_norms(model, dataset, batch_size=2)


@pytest.mark.parametrize("batch_size", [None, 7])
def test_l2sp_penalty_gradient_follows_set_reference_and_load_weights(
    rng, tmp_path, batch_size
):
    # The reference is state a compiled program reads at each call: after
    # `set_reference` or `load_weights` the very next call measures against
    # the new anchor (JAX once froze the one it saw first).
    x = rng.normal(size=(20, 3)).astype("float32")
    y = rng.normal(size=(20, 1)).astype("float32")
    alpha = 0.4
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, use_bias=False, name="lin")]
    )
    kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(alpha))
    model.compile(optimizer="sgd", loss="mse")
    kernel = model.get_layer("lin").kernel
    penalty = kernel.regularizer

    def closed_form(ref):
        w = np_weights(kernel)
        data = 2.0 / len(x) * x.T.astype(np.float64) @ (x.astype(np.float64) @ w - y)
        return expected(data, 2 * alpha * (w - ref))

    def measured():
        return kerasreg.gradient_norms(model, x, y, batch_size=batch_size)["lin/kernel"]

    start = np_weights(kernel)
    assert_stats(measured(), closed_form(start), "at the initial reference")
    assert measured()["penalty"] == 0.0
    penalty.set_reference(np.ones((3, 1)))
    assert_stats(measured(), closed_form(np.ones((3, 1))), "after set_reference")

    path = tmp_path / "m.weights.h5"
    model.save_weights(path)  # kernel `start`, reference ones
    kernel.assign(rng.normal(size=(3, 1)).astype("float32"))
    penalty.set_reference(np.full((3, 1), -2.0))
    assert_stats(measured(), closed_form(np.full((3, 1), -2.0)), "second reference")
    model.load_weights(path)
    np.testing.assert_array_equal(np_weights(kernel), start)
    assert_stats(measured(), closed_form(np.ones((3, 1))), "after load_weights")


def test_no_targets_is_refused_naming_y(rng):
    """Without targets there is no data loss: the error names `y`, for array
    inputs and for a dataset that yields inputs only."""
    model = linear_model()
    x = rng.normal(size=(4, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"invalid `y`.*y=None"):
        kerasreg.gradient_norms(model, x)
    import tensorflow as tf

    with pytest.raises(ValueError, match=r"invalid `y`"):
        kerasreg.gradient_norms(model, tf.data.Dataset.from_tensor_slices(x).batch(2))
    for b, a in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
