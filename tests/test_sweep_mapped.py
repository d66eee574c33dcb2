"""The mapped engine (`jax.vmap` of the template's own step): every variant of a
sweep equals its own separate fit, whatever the template holds.

The reference of each variant is the one SWEEP_ENGINES.md names: a
`clone_model` of the template with the template's weights, the variant's
penalty attached with `kerasreg.regularize`, compiled like the template with a
fresh optimizer, and an ordinary Keras `fit` on the same data with
`shuffle=False`. Per-epoch history and final weights must agree within rtol
2e-5 / atol 2e-6. The templates are the ones the issue found silently wrong
(a frozen layer, a `Dense` subclass with its own `call`, batch-coupled and
scalar custom losses and metrics, an `L2SPPenalty`), and the Keras features
that change the training loop.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import kerasreg
from kerasreg import _compat
from kerasreg.sweep import mapped
from tests.conftest import ROOT, run_result

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the mapped engine is JAX's"
)

RTOL, ATOL = 2e-5, 2e-6
L = keras.layers
GRID = [None, kerasreg.L2Penalty(3e-2), kerasreg.L1Penalty(1e-2)]


def data(n=40, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, :1] - 0.5 * x[:, 1:2] > 0).astype("float32")
    return x, y


def dense(*middle, features=4, out="sigmoid"):
    return keras.Sequential(
        [keras.Input((features,)), L.Dense(8, "tanh"), *middle, L.Dense(1, out)]
    )


def reference_fit(template, penalty, compile_model, x, y, fit_kwargs):
    """The variant's own fit: a clone with the template's weights and `penalty`."""
    model = keras.models.clone_model(template)
    model.set_weights(template.get_weights())
    if penalty is not None:
        kerasreg.regularize(model, kernel=penalty)
    compile_model(model)
    history = model.fit(x, y, verbose=0, **fit_kwargs).history
    return history, model


def assert_same(history, weights, expected_history, expected_weights, rtol=RTOL):
    assert set(history) == set(expected_history)
    for key, values in expected_history.items():
        np.testing.assert_allclose(
            history[key], values, rtol=rtol, atol=ATOL, err_msg=key
        )
    assert len(weights) == len(expected_weights)
    for got, want in zip(weights, expected_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=ATOL)


def check(template, compile_model, x, y, grid=GRID, rtol=RTOL, **fit_kwargs):
    """Sweep `grid` on the mapped engine; every variant equals its own fit."""
    fit_kwargs = {"epochs": 2, "batch_size": 8, "shuffle": False, **fit_kwargs}
    compile_model(template)
    result = kerasreg.sweep(template, grid, x, y, verbose=0, **fit_kwargs)
    assert result.engine == "vectorized"
    assert "jax.vmap" in result.engine_reason
    references = []
    for penalty, row, trained in zip(grid, result.rows, result.models, strict=True):
        history, reference = reference_fit(
            template, penalty, compile_model, x, y, fit_kwargs
        )
        assert_same(
            row["history"],
            trained.get_weights(),
            history,
            reference.get_weights(),
            rtol=rtol,
        )
        references.append(reference)
    return result, references


def adam(model, **compile_kwargs):
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )


# --- the templates the issue found silently wrong ----------------------------------


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
class ShiftedDense(L.Dense):
    """A Dense subclass with its own `call` (not a Dense as far as math goes)."""

    def call(self, inputs):
        return super().call(inputs) * 2.0 + 0.5


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
def centered_squares(y_true, y_pred):
    """Per-sample, but coupled through the batch mean of the residual."""
    residual = y_pred - y_true
    return ops.mean(ops.square(residual - ops.mean(residual)), axis=-1)


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
def mean_abs_scalar(y_true, y_pred):
    """One scalar for the whole batch."""
    return ops.mean(ops.abs(y_pred - y_true))


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
def spread(y_true, y_pred):
    """Max minus min of the batch's predictions: a scalar, batch-coupled."""
    return ops.max(y_pred) - ops.min(y_pred)


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
def half_centered_scalar(y_true, y_pred):
    """One scalar for the batch: squared error after half the batch's mean prediction.

    Half, not all: with the whole mean removed the output bias would have no
    gradient, and Adam would turn rounding noise into steps of the bias.
    """
    return ops.mean(ops.square(y_pred - 0.5 * ops.mean(y_pred) - y_true))


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
def batch_std(y_true, y_pred):
    """The predictions' standard deviation over the batch: shape (outputs,)."""
    return ops.std(y_pred, axis=0)


@keras.saving.register_keras_serializable(package="test_sweep_mapped")
class RangeMetric(keras.metrics.Metric):
    """The running max-minus-min of all predictions (state: running max, min)."""

    def __init__(self, name="range", **kwargs):
        super().__init__(name=name, **kwargs)
        self.high = self.add_variable((), initializer="zeros", name="high")
        self.low = self.add_variable((), initializer="zeros", name="low")
        self.seen = self.add_variable((), initializer="zeros", name="seen")

    def update_state(self, y_true, y_pred, sample_weight=None):
        first = ops.equal(self.seen, 0.0)
        high, low = ops.max(y_pred), ops.min(y_pred)
        self.high.assign(ops.where(first, high, ops.maximum(self.high, high)))
        self.low.assign(ops.where(first, low, ops.minimum(self.low, low)))
        self.seen.assign(1.0)

    def result(self):
        return self.high - self.low


@jax_only
def test_silent_wrong_templates_train_as_their_own_fits():
    # The Dense chain: a subclass with its own call, a frozen layer, a
    # batch-coupled loss and a scalar batch-coupled metric (the batched-kernel
    # engine trained the frozen layer and folded the K batches into one).
    x, y = data()
    template = keras.Sequential(
        [
            keras.Input((4,)),
            ShiftedDense(8, "tanh"),
            L.Dense(6, "relu", name="frozen"),
            L.Dense(1),
        ]
    )
    template.get_layer("frozen").trainable = False

    def compile_model(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=centered_squares,
            metrics=[spread],
        )

    grid = [None, kerasreg.L2Penalty(3e-2)]
    result, _ = check(template, compile_model, x, y, grid=grid)
    for trained in result.models:
        for got, want in zip(
            trained.get_layer("frozen").get_weights(),
            template.get_layer("frozen").get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)


@jax_only
def test_normalization_seeded_dropout_stateful_metric_and_l2sp():
    x, y = data()
    template = dense(L.BatchNormalization(), L.Dropout(0.5, seed=3), out=None)

    def compile_model(model):
        model.compile(
            optimizer=keras.optimizers.Adam(0.02),
            loss="mse",
            metrics=[RangeMetric()],
        )

    grid = [kerasreg.L2SPPenalty(0.3), kerasreg.L2SPPenalty(3.0)]
    result, _ = check(template, compile_model, x, y, grid=grid, validation_split=0.25)
    means = [m.layers[1].moving_mean.numpy() for m in result.models]
    assert not np.allclose(means[0], means[1])  # each variant's own statistics


@jax_only
def test_scalar_loss_with_global_clipnorm_and_ema():
    x, y = data()

    def compile_model(model):
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.2, global_clipnorm=0.3, use_ema=True, ema_momentum=0.8
            ),
            loss=mean_abs_scalar,
            metrics=[spread],
        )

    grid = [None, kerasreg.L1Penalty(1e-2)]
    check(dense(), compile_model, x, y, grid=grid, validation_split=0.25)


@pytest.mark.parametrize(
    "compile_kwargs",
    [
        {"loss": half_centered_scalar},
        {"loss": "mse", "metrics": [batch_std]},
    ],
    ids=["scalar_loss", "batch_statistic_metric"],
)
@jax_only
def test_batch_statistic_loss_or_metric_of_one_value_per_batch(compile_kwargs):
    # Issue 21 item 1: a custom loss returning one scalar for the batch, or a
    # metric returning a statistic over the batch axis (shape (1,)), is not
    # per-sample; folded over the K variants' outputs it crashed the sweep
    # ("cannot reshape array of shape () into shape (3, -1)", "... of shape
    # (1,) into shape (3, 16, -1)"). Each variant computes it on its own outputs.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = x[:, :1].copy()
    template = dense(features=6, out=None)

    def compile_model(model):
        model.compile(optimizer=keras.optimizers.Adam(1e-2), **compile_kwargs)

    grid = [None, kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(1e-1)]
    result, _ = check(
        template, compile_model, x, y, grid=grid, batch_size=16, validation_split=0.25
    )
    assert "jax.vmap" in result.engine_reason  # mapped.py ran, not batched kernels


@jax_only
def test_two_inputs_two_outputs_accumulation_steps_per_execution_schedule():
    # Several inputs and outputs, loss weights, sample weights; AdamW with a
    # schedule and a name-based weight-decay exclusion; gradient accumulation
    # and three steps per execution.
    rng = np.random.default_rng(3)
    x = {
        "a": rng.normal(size=(40, 3)).astype("float32"),
        "b": rng.normal(size=(40, 2)).astype("float32"),
    }
    y = {
        "value": x["a"][:, :1] - x["b"][:, 1:],
        "label": (x["a"][:, 1] > 0).astype("int32"),
    }
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = L.Concatenate()([L.Dense(5, "tanh")(a), b])
    template = keras.Model(
        {"a": a, "b": b},
        {
            "value": L.Dense(1, name="value")(hidden),
            "label": L.Dense(2, "softmax", name="label")(hidden),
        },
    )

    def compile_model(model):
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 3, 0.6)
        optimizer = keras.optimizers.AdamW(
            schedule, weight_decay=0.1, gradient_accumulation_steps=2
        )
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        model.compile(
            optimizer=optimizer,
            loss={"value": "mse", "label": "sparse_categorical_crossentropy"},
            loss_weights={"value": 1.0, "label": 0.5},
            metrics={"label": ["accuracy"]},
            steps_per_execution=3,
        )

    weights = np.linspace(0.2, 2.0, 40).astype("float32")
    check(
        template,
        compile_model,
        x,
        y,
        grid=[None, kerasreg.L2Penalty(3e-2)],
        epochs=3,
        sample_weight=weights,
        validation_split=0.25,
    )


@jax_only
def test_a_generator_is_read_once():
    x, y = data()
    reads = []

    def batches():
        for epoch in range(2):
            for start in range(0, len(x), 8):
                reads.append((epoch, start))
                yield x[start : start + 8], y[start : start + 8]

    template = dense()
    adam(template)
    grid = GRID[:2]
    result = kerasreg.sweep(
        template, grid, batches(), epochs=2, steps_per_epoch=5, verbose=0
    )
    assert result.engine == "vectorized"
    assert "jax.vmap" in result.engine_reason
    assert len(reads) == 10  # one pass over the generator, for all variants
    for penalty, row, trained in zip(grid, result.rows, result.models, strict=True):
        history, reference = reference_fit(
            template, penalty, adam, x, y, dict(epochs=2, batch_size=8, shuffle=False)
        )
        assert_same(
            row["history"], trained.get_weights(), history, reference.get_weights()
        )


@jax_only
def test_per_variant_penalty_state_is_each_variants_own():
    # Variants whose L2SP references differ (as a template carrying its own
    # reference would give): each lane is pulled toward its own reference.
    x, y = data()
    template = dense()
    adam(template)
    variants, references = [], []
    for index, shift in enumerate([0.5, -1.0]):
        shifted = [w + shift for w in template.get_weights()]
        variant = keras.models.clone_model(template)
        reference = keras.models.clone_model(template)
        for model in (variant, reference):
            # The reference is taken at the shifted weights, then the
            # training starts from the template's.
            model.set_weights(shifted)
            kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(0.5))
            model.set_weights(template.get_weights())
        variant.name = f"variant_{index}"
        variants.append(variant)
        references.append(reference)
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert mapped.why_not(template, variants, {"fit_kwargs": fit_kwargs}) is None
    histories = mapped.fit(
        variants,
        ["a", "b"],
        [None] * 2,
        template.get_compile_config(),
        ([], []),
        x,
        y,
        fit_kwargs,
    )
    for history, variant, reference in zip(
        histories, variants, references, strict=True
    ):
        adam(reference)
        expected = reference.fit(x, y, **fit_kwargs).history
        assert_same(history, variant.get_weights(), expected, reference.get_weights())
        # The optimizer state is the reference's too (Adam's moments, step).
        for got, want in zip(
            variant.optimizer.variables, reference.optimizer.variables, strict=True
        ):
            np.testing.assert_allclose(
                ops.convert_to_numpy(got), ops.convert_to_numpy(want), RTOL, ATOL
            )


# --- layers ---------------------------------------------------------------------------


@jax_only
def test_why_not_names_what_it_cannot_take():
    template = dense()
    adam(template)
    assert mapped.why_not(template, [template], {"fit_kwargs": {}}) is None
    # EarlyStopping keeps the mapped engine (tests/test_sweep_callbacks.py),
    # unless the optimizer keeps an EMA of the weights.
    stopping = {"fit_kwargs": {"callbacks": [keras.callbacks.EarlyStopping()]}}
    assert mapped.why_not(template, [template], stopping) is None
    template.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    reason = mapped.why_not(template, [template], stopping)
    assert "callbacks" in reason and "use_ema" in reason


# --- slower: more layers and optimizers ----------------------------------------------


@pytest.mark.slow  # a sweep and two reference fits
@jax_only
def test_unseeded_dropout_draws_independent_masks_per_variant():
    x, y = data()
    template = dense(L.Dropout(0.5))
    adam(template)
    same = [kerasreg.L2Penalty(1e-2)] * 2
    result = kerasreg.sweep(
        template, same, x, y, epochs=2, batch_size=8, shuffle=False, verbose=0
    )
    assert result.engine == "vectorized"
    assert "jax.vmap" in result.engine_reason
    a, b = (row["history"]["loss"] for row in result.rows)
    assert a != b  # equal penalties, different masks


@pytest.mark.slow  # an LSTM's compiled scan, and three reference fits
@jax_only
def test_lstm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 5, 2)).astype("float32")
    y = (x[:, :, 0].sum(axis=1, keepdims=True) > 0).astype("float32")
    template = keras.Sequential([keras.Input((5, 2)), L.LSTM(4), L.Dense(1, "sigmoid")])
    check(template, adam, x, y)


@pytest.mark.slow  # a sweep and three reference fits per optimizer
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.Adam(0.02, clipnorm=0.05),
        lambda: keras.optimizers.SGD(
            0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=3
        ),
    ],
    ids=["clipnorm", "ema_overwrite"],
)
@jax_only
def test_optimizers_that_clip_or_overwrite_with_averages(make_optimizer):
    x, y = data()

    def compile_model(model):
        model.compile(
            optimizer=make_optimizer(), loss="binary_crossentropy", metrics=["mse"]
        )

    check(dense(), compile_model, x, y, validation_split=0.25)


def low_precision(policy):
    """A hidden layer computing under `policy`, a float32 output."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(8, "tanh", dtype=policy),
            L.Dense(1, "sigmoid", dtype="float32"),
        ]
    )


@pytest.mark.slow  # float16 compute: its own compiled step and reference fits
@jax_only
def test_loss_scaling_in_mixed_precision():
    x, y = data()
    template = low_precision("mixed_float16")

    def compile_model(model):
        model.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1), initial_scale=2.0**10
            ),
            loss="binary_crossentropy",
            metrics=["accuracy"],
        )

    result, references = check(template, compile_model, x, y)
    # The dynamic scale evolved in each variant as in its own fit.
    for trained, reference in zip(result.models, references, strict=True):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(trained.optimizer.dynamic_scale),
            ops.convert_to_numpy(reference.optimizer.dynamic_scale),
        )


@jax_only
def test_bfloat16_compute_agrees_to_the_stated_tolerance():
    # docs/guide/sweep.md: the one-fit engines agree with separate fits to a
    # relative 2e-5 under mixed_bfloat16 compute too.
    x, y = data()
    template = low_precision("mixed_bfloat16")

    def compile_model(model):
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy")

    check(template, compile_model, x, y, epochs=3, batch_size=8)


# --- K over devices ---------------------------------------------------------------


@pytest.mark.slow  # a fresh process with four host devices, four sweeps
@jax_only
def test_variants_spread_over_a_mesh_axis_equal_the_one_device_sweep():
    if mapped.mesh_unproven():
        # Keras 3.8 / JAX 0.4.34: the metrics differed; refused instead.
        refuses_a_variants_axis("shown exact from Keras")
        return
    result = run_result(
        [ROOT / "tests" / "sweep_devices_scenarios.py"],
        backend="jax",
        host_devices=4,
        timeout=900,
    )
    runs = result["runs"]
    assert "`chunk_size`" in result["refused"]
    assert "multiple of 4" in result["refused"]
    assert "chunk_size=3" in result["refused"]
    one = runs.pop("one device")
    assert one["shards"] == [[[8, 4, 8]], [[8, 8]], [[8, 8, 1]], [[8, 1]]]
    expected_shards = {
        # K=8 over 4 devices: two variants each, whole weights.
        "1x4": [[2, 4, 8], [2, 8], [2, 8, 1], [2, 1]],
        # K=8 over 2: four variants each (the batch is split over the other axis).
        "2x2": [[4, 4, 8], [4, 8], [4, 8, 1], [4, 1]],
        # The template's layout kept: the hidden kernel's columns over "model".
        "1x2x2 model": [[4, 4, 4], [4, 8], [4, 8, 1], [4, 1]],
        # The last of four fits of two variants, one on each "variants" device.
        "2x2 in fits of 2": [[1, 4, 8], [1, 8], [1, 8, 1], [1, 1]],
        # The last of eight fits of one variant, replicated on every device.
        "DataParallel in fits of 1": [[1, 4, 8], [1, 8], [1, 8, 1], [1, 1]],
    }
    for name, run in runs.items():
        assert run["engine"] == "vectorized"
        assert "jax.vmap" in run["engine_reason"]
        for shards, expected in zip(run["shards"], expected_shards[name], strict=True):
            assert shards == [expected] * 4, name
        for got, want in zip(run["histories"], one["histories"], strict=True):
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6)
        for got, want in zip(run["weights"], one["weights"], strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def refuses_a_variants_axis(cause, **fit_kwargs):
    """A sweep under a 1x1 ("batch", "variants") mesh raises naming `cause`,
    before anything trains."""
    device = "cpu:0"
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "variants"], [device])
    try:
        distribution = keras.distribution.ModelParallel(
            layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
        )
    except AttributeError:
        # Keras 3.8's TensorFlow backend cannot build a ModelParallel at all.
        if _compat.KERAS_VERSION >= (3, 9) or keras.backend.backend() != "tensorflow":
            raise
        pytest.skip("Keras 3.8 has no ModelParallel on TensorFlow")
    x, y = data(n=8)
    fit_kwargs = {"epochs": 1, "batch_size": 4, "verbose": 0, **fit_kwargs}
    with distribution.scope():
        template = dense()
        adam(template)
        before = [w.copy() for w in template.get_weights()]
        with pytest.raises(ValueError, match="'variants'") as raised:
            kerasreg.sweep(template, GRID, x, y, **fit_kwargs)
    assert cause in str(raised.value)
    assert "K=3" in str(raised.value)
    for got, want in zip(template.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert template.optimizer.iterations.numpy() == 0


@jax_only
def test_a_variants_mesh_axis_is_refused_on_versions_not_shown_exact(monkeypatch):
    # What Keras 3.8 with JAX 0.4.34 (the floor) gets: a clear refusal.
    monkeypatch.setitem(mapped.MESH_EXACT_SINCE, "keras", (99, 0))
    refuses_a_variants_axis("shown exact from Keras 99.0")


def test_a_variants_mesh_axis_is_refused_where_the_mapped_engine_cannot_run():
    # TensorFlow and torch: no engine can spread K over devices; JAX: the
    # mapped engine cannot take a sweep with callbacks. Refused before any
    # training, naming the axis and the reason; the template is untouched.
    backend = keras.backend.backend()
    if backend == "jax":
        refuses_a_variants_axis("callbacks", callbacks=[keras.callbacks.History()])
    else:
        refuses_a_variants_axis(f"the backend is {backend}, not JAX")
