"""Five templates every sweep engine once got silently wrong, now exact (issue 21).

Each template is swept with `engine="auto"` and with each engine forced: the
sweep either trains every variant exactly as its own separate fit
(`tests/sweep_reference.py`: per-epoch history and final weights) or refuses
with a ValueError before anything trains (the template's weights unchanged).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import kerasreg
from tests.sweep_reference import assert_same_fit, assert_untouched, separate_fit

ENGINE_NAMES = ("vectorized", "stacked", "sequential")
# Forcing each engine: three more sweeps and their reference fits per template.
# Forced engines are slow; "vectorized" is a different engine per backend
# (jax.vmap of the train step on JAX, batched kernels elsewhere), so CI runs
# it on every leg (`per_backend`).
ENGINES = [
    "auto",
    *(
        pytest.param(
            e,
            marks=[pytest.mark.slow]
            + ([pytest.mark.per_backend] if e == "vectorized" else []),
        )
        for e in ENGINE_NAMES
    ),
]
FIT = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
GRID = [kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(2e-1)]


def data(n=24, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x[:, :1] + 0.5 * x[:, 1:2] + 0.3).astype("float32")
    return x, y


def adam():
    return dict(optimizer=keras.optimizers.Adam(0.05), loss="mse", metrics=["mae"])


def chain(*layers, name="net"):
    return keras.Sequential([keras.Input((3,)), *layers], name=name)


def check(template, compile_kwargs, engine, x, y, grid=GRID, prepare=None, **kwargs):
    """Sweep `template`; each variant equals its separate fit, or nothing trained."""
    before = template.get_weights()
    fit_kwargs = {**FIT, **kwargs}
    try:
        result = kerasreg.sweep(template, grid, x, y, engine=engine, **fit_kwargs)
    except ValueError as error:
        assert engine != "auto", error  # auto always finds an exact engine here
        assert "engine=" in str(error)
        assert_untouched(template, before)
        return None
    assert_untouched(template, before)
    if engine != "auto":
        assert result.engine == engine
    for penalty, row, model in zip(grid, result.rows, result.models, strict=True):
        history, weights, _ = separate_fit(
            template, penalty, x, y, compile_kwargs, prepare=prepare, **fit_kwargs
        )
        assert_same_fit(row, model, history, weights)
    return result


# --- 1. a frozen layer ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_frozen_layer_stays_frozen_in_every_variant(engine):
    x, y = data()
    frozen = keras.layers.Dense(4, "tanh", name="frozen")
    template = chain(frozen, keras.layers.Dense(1, name="head"))
    frozen.trainable = False
    template.compile(**adam())
    kernel = keras.ops.convert_to_numpy(frozen.kernel)
    result = check(template, adam, engine, x, y)
    if result is not None:
        for model in result.models:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(model.get_layer("frozen").kernel), kernel
            )


@pytest.mark.parametrize("frozen", ["bias", "kernel"])
def test_a_frozen_variable_stays_frozen(frozen):
    # A variable frozen on its own (not its layer): clone_model drops the flag
    # (on JAX, the mapped engine's lane copy once did: it crashed).
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh", name="a"), keras.layers.Dense(1))
    variable = getattr(template.get_layer("a"), frozen)
    variable.trainable = False
    template.compile(**adam())
    value = keras.ops.convert_to_numpy(variable)
    result = check(template, adam, "auto", x, y)
    if keras.backend.backend() == "jax":
        assert result.engine == "vectorized", result.engine_reason  # jax.vmap
    for model in result.models:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(getattr(model.get_layer("a"), frozen)), value
        )


# --- 2. a subclass of a known layer -------------------------------------------------


class DoubledDense(keras.layers.Dense):
    """A Dense layer with its own `call`: not a Dense layer for the sweep."""

    def call(self, inputs, training=None):
        return 2.0 * super().call(inputs)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_subclass_with_its_own_call_is_not_its_parent(engine):
    x, y = data()
    template = chain(DoubledDense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**adam())
    if engine == "vectorized" and keras.backend.backend() != "jax":
        # Batched kernels know Dense, not its subclass: refused, naming it.
        with pytest.raises(ValueError, match="DoubledDense"):
            kerasreg.sweep(template, GRID, x, y, engine=engine, **FIT)
    result = check(template, adam, engine, x, y)
    if engine == "vectorized" and keras.backend.backend() == "jax":
        assert result.engine_reason.startswith("jax.vmap")  # the subclass's own step


@pytest.mark.parametrize("engine", ["auto", "vectorized"])
def test_a_layer_over_the_batch_axis_does_not_mix_the_variants(engine):
    # Softmax(axis=0) normalizes over the batch: with K folded into the batch
    # axis, batched kernels once normalized over all K variants' samples.
    x, y = data()

    def sgd():
        return dict(optimizer=keras.optimizers.SGD(0.1), loss="mse")

    template = chain(
        keras.layers.Dense(4), keras.layers.Softmax(axis=0), keras.layers.Dense(1)
    )
    template.compile(**sgd())
    result = check(template, sgd, engine, x, y)
    if result is not None and keras.backend.backend() != "jax":
        assert "axis=0" in result.engine_reason  # batched kernels refused it


# --- 3. losses and metrics that read the whole batch ---------------------------------
# Registered: `clone_model` recompiles a compiled model from its config.


@keras.saving.register_keras_serializable(package="kerasreg_tests")
def centered_mse(y_true, y_pred):
    """Per-sample values that depend on the batch: the squared error plus the
    squared distance of each prediction from the batch's mean prediction."""
    error = ops.square(y_true - y_pred) + 0.5 * ops.square(y_pred - ops.mean(y_pred))
    return ops.mean(error, axis=-1)


@keras.saving.register_keras_serializable(package="kerasreg_tests")
def spread(y_true, y_pred):
    """One number per batch: max minus min of the predictions."""
    return ops.max(y_pred) - ops.min(y_pred)


@keras.saving.register_keras_serializable(package="kerasreg_tests")
def scalar_mse(y_true, y_pred):
    """A loss that returns one scalar for the whole batch."""
    return ops.mean(ops.square(y_true - y_pred))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_batch_coupled_loss_is_each_variants_own(engine):
    x, y = data()

    def compile_kwargs():
        return dict(
            optimizer=keras.optimizers.Adam(0.05),
            loss=centered_mse,
            metrics=["mae", spread],
        )

    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**compile_kwargs())
    check(template, compile_kwargs, engine, x, y)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_scalar_loss_and_metric_are_each_variants_own(engine):
    x, y = data()

    def compile_kwargs():
        return dict(
            optimizer=keras.optimizers.SGD(0.1), loss=scalar_mse, metrics=[spread]
        )

    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**compile_kwargs())
    check(template, compile_kwargs, engine, x, y)


@keras.saving.register_keras_serializable(package="kerasreg_tests")
class RootMeanSquared(keras.metrics.MeanSquaredError):
    """A built-in mean metric's subclass with its own `result`: not a mean."""

    def result(self):
        return ops.sqrt(super().result())


@keras.saving.register_keras_serializable(package="kerasreg_tests")
class RunningMAE(keras.metrics.MeanAbsoluteError):
    """A built-in mean metric's subclass that never resets: over all epochs."""

    def reset_state(self):
        pass


@pytest.mark.parametrize("metric", [RootMeanSquared, RunningMAE])
def test_a_mean_metrics_subclass_with_its_own_result_or_reset_is_its_own(metric):
    x, y = data()

    def compile_kwargs():
        return dict(
            optimizer=keras.optimizers.Adam(0.05), loss="mse", metrics=[metric()]
        )

    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**compile_kwargs())
    check(template, compile_kwargs, "auto", x, y, epochs=3)


def test_weight_decay_exclusions_by_name_match_the_same_weights_as_in_a_separate_fit():
    # A Bidirectional's two cells each have a `kernel`: the batched kernels
    # rename such weights, so an exclusion by name would match others.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 3)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")

    def compile_kwargs():
        optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.5)
        optimizer.exclude_from_weight_decay(var_names=["^kernel$"])
        return dict(optimizer=optimizer, loss="mse")

    template = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.Bidirectional(keras.layers.SimpleRNN(4)),
            keras.layers.Dense(1),
        ]
    )
    template.compile(**compile_kwargs())
    result = check(template, compile_kwargs, "auto", x, y)
    if keras.backend.backend() != "jax":
        assert "two weights named" in result.engine_reason


@pytest.mark.parametrize("engine", ENGINES)
def test_a_loss_without_reduction_is_refused_before_training(engine):
    # reduction="none": a loss per sample; Keras's own fit of a variant fails
    # adding a penalty to it (TensorFlow: "Shapes must be equal rank").
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.MeanSquaredError(reduction="none"),
    )
    separate = kerasreg.regularize(keras.models.clone_model(template), kernel=GRID[0])
    separate.compile(optimizer="sgd", loss=template.loss)
    with pytest.raises((ValueError, TypeError, RuntimeError)):  # the fit it would run
        separate.fit(x, y, **FIT)
    before = template.get_weights()
    with pytest.raises(ValueError, match=r"`model`.*reduction='none'"):
        kerasreg.sweep(template, GRID, x, y, engine=engine, **FIT)
    assert_untouched(template, before)


@pytest.mark.parametrize("seed", [1, None], ids=["seeded", "unseeded"])
def test_a_dropout_of_rate_zero_trains_as_its_separate_fit(seed):
    # A grid's usual baseline; Keras gives Dropout(0.0) no seed generator.
    x, y = data()
    template = chain(
        keras.layers.Dense(4, "tanh"),
        keras.layers.Dropout(0.0, seed=seed),
        keras.layers.Dense(1),
    )
    template.compile(**adam())
    check(template, adam, "auto", x, y)


# --- 4. a penalty with state: the L2-SP reference ------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_the_templates_l2sp_reference_is_carried_into_every_variant(engine):
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh", name="a"), keras.layers.Dense(1))
    # L2-SP at the "pretrained" weights, then training moves the weights away.
    kerasreg.regularize(template, kernel=kerasreg.L2SPPenalty(0.5))
    template.compile(**adam())
    template.fit(x, y, epochs=2, batch_size=8, verbose=0)
    references = {
        v.path: keras.ops.convert_to_numpy(v.regularizer.reference)
        for v in template.weights
        if v.regularizer is not None
    }
    assert references and any(
        not np.allclose(keras.ops.convert_to_numpy(v), references[v.path])
        for v in template.weights
        if v.path in references
    )
    template.compile(**adam())  # a fresh optimizer for the sweep's variants

    def same_reference(model):
        # The reference model: the template's references, through public API.
        for source, target in zip(template.weights, model.weights, strict=True):
            if source.path in references:
                current = keras.ops.convert_to_numpy(target)
                target.assign(references[source.path])
                target.regularizer.set_reference(target)
                target.assign(current)

    # The grid varies the biases' penalty; the kernels keep their L2-SP.
    grid = [{"bias": None}, {"bias": kerasreg.L2Penalty(1e-1)}]
    result = check(template, adam, engine, x, y, grid=grid, prepare=same_reference)
    if result is None:
        return
    for model in result.models:
        # Each variant's L2-SP penalty is alpha * sum((w - ref_template)**2).
        for source, target in zip(template.weights, model.weights, strict=True):
            if source.path not in references:
                continue
            w = keras.ops.convert_to_numpy(target).astype("float64")
            expected = 0.5 * np.sum((w - references[source.path]) ** 2)
            got = float(keras.ops.convert_to_numpy(target.regularizer(target)))
            np.testing.assert_allclose(got, expected, rtol=1e-5)


# --- 5. a Python generator --------------------------------------------------------


def batches(x, y, size=8, epochs=2):
    def generate():
        for _ in range(epochs):
            for start in range(0, len(x), size):
                yield x[start : start + size], y[start : start + size]

    return generate


@pytest.mark.parametrize("engine", ENGINES)
def test_a_generator_is_read_once_in_one_fit_or_refused(engine):
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**adam())
    make = batches(x, y)
    before = template.get_weights()
    fit_kwargs = dict(epochs=2, steps_per_epoch=3, verbose=0)
    try:
        result = kerasreg.sweep(template, GRID, make(), engine=engine, **fit_kwargs)
    except ValueError as error:
        assert engine == "sequential"
        assert "`x`" in str(error) and "read once" in str(error)
        assert_untouched(template, before)
        return
    assert result.engine != "sequential"
    for penalty, row, model in zip(GRID, result.rows, result.models, strict=True):
        history, weights, _ = separate_fit(
            template, penalty, make, None, adam, **fit_kwargs
        )
        assert_same_fit(row, model, history, weights)


def test_a_generator_that_would_need_k_fits_is_refused_before_training():
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**adam())
    before = template.get_weights()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append("trained")

    generator = batches(x, y)()
    with pytest.raises(ValueError, match=r"`x`.*read once"):
        kerasreg.sweep(
            template,
            GRID,
            generator,
            epochs=2,
            steps_per_epoch=3,
            callbacks=[Probe()],
            verbose=0,
        )
    assert seen == []
    assert_untouched(template, before)
    np.testing.assert_array_equal(next(generator)[0], x[:8])  # nothing was read


@pytest.mark.parametrize("needs", ["callbacks", "chunk_size"])
def test_a_validation_generator_that_would_need_k_fits_is_refused(needs):
    # K fits (callbacks force K separate fits; chunk_size=1 one fit per
    # variant) would each read the validation generator: variant 0 trained,
    # then the next fit crashed on the exhausted generator.
    x, y = data()
    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**adam())
    before = template.get_weights()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append("trained")

    extra = dict(callbacks=[Probe()]) if needs == "callbacks" else dict(chunk_size=1)
    validation = batches(x, y, epochs=1)()
    with pytest.raises(ValueError, match=r"`validation_data`.*read once"):
        kerasreg.sweep(
            template,
            GRID,
            x,
            y,
            validation_data=validation,
            epochs=1,
            batch_size=8,
            verbose=0,
            **extra,
        )
    assert seen == []
    assert_untouched(template, before)
    np.testing.assert_array_equal(next(validation)[0], x[:8])  # nothing was read


# --- penalty state on some variants only ------------------------------------------


def test_l2sp_on_some_variants_only_keeps_each_variants_state():
    """A grid mixing `L2Penalty` and `L2SPPenalty` on the bias, with a
    BatchNormalization: the L2-SP variant holds one more state variable (its
    reference) than the others. Each variant's moving statistics, reference
    and evaluation equal those of its own fit (on JAX the one `jax.vmap` took
    variant 0's state layout for all and shifted the L2-SP variant's state by
    one slot: moving variance never updated, reference = the moving mean)."""
    x, y = data(32)
    keras.utils.set_random_seed(1)
    template = chain(
        keras.layers.Dense(4, name="d1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(1, name="d2"),
    )
    template.compile(optimizer="sgd", loss="mse")
    before = template.get_weights()
    grids = [
        lambda: {"bias": kerasreg.L2Penalty(0.1)},
        lambda: {"bias": kerasreg.L2SPPenalty(0.5)},
    ]
    result = kerasreg.sweep(template, [g() for g in grids], x, y, **FIT)
    assert_untouched(template, before)
    for make, row, model in zip(grids, result.rows, result.models, strict=True):
        history, weights, reference = separate_fit(
            template, make(), x, y, lambda: dict(optimizer="sgd", loss="mse"), **FIT
        )
        assert_same_fit(row, model, history, weights)
        np.testing.assert_allclose(
            model.evaluate(x, y, verbose=0),
            reference.evaluate(x, y, verbose=0),
            rtol=2e-5,
        )
        for layer in ("d1", "d2"):
            penalty = model.get_layer(layer).bias.regularizer
            if isinstance(penalty, kerasreg.L2SPPenalty):
                np.testing.assert_array_equal(
                    ops.convert_to_numpy(penalty.reference),
                    template.get_layer(layer).get_weights()[1],
                )


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_an_l2sp_reference_taken_at_first_use_in_a_sweep_in_several_fits(chunk_size):
    """An `L2SPPenalty` given to a layer of a template never fit takes its
    reference at first use: in a sweep in several fits, every variant's own
    (its starting weights), as in its separate fit (on JAX the one compiled
    step of all the fits was built before the later fits' variants had
    taken theirs: "L2SPPenalty has no reference weight")."""
    x, y = data()
    template = chain(
        keras.layers.Dense(4, "tanh", kernel_regularizer=kerasreg.L2SPPenalty(0.5)),
        keras.layers.Dense(1),
    )
    template.compile(**adam())
    before = template.get_weights()
    grid = [None, kerasreg.L2Penalty(0.1), kerasreg.L1Penalty(0.01)]
    result = kerasreg.sweep(
        template, grid, x, y, role="bias", chunk_size=chunk_size, **FIT
    )
    assert f"fits of at most {chunk_size} variants" in result.engine_reason
    assert_untouched(template, before)
    for penalty, row, model in zip(grid, result.rows, result.models, strict=True):
        history, weights, _ = separate_fit(
            template, penalty, x, y, adam, role="bias", **FIT
        )
        assert_same_fit(row, model, history, weights)
        reference = model.layers[0].kernel.regularizer.reference
        np.testing.assert_array_equal(ops.convert_to_numpy(reference), before[0])


# --- found by the review of the merged engines ---------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_loss_with_an_ignored_class_is_each_variants_own(engine):
    """`SparseCategoricalCrossentropy(ignore_class=2)`: Keras masks the
    ignored samples and averages over the others; folded over K variants the
    mean divided by the whole batch (losses 0.41 vs 0.99 on TF, no error)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.integers(0, 3, size=(24,)).astype("int32")
    y[::3] = 2

    def compile_kwargs():
        return dict(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=2
            ),
        )

    template = chain(keras.layers.Dense(6, "relu"), keras.layers.Dense(3))
    template.compile(**compile_kwargs())
    check(template, compile_kwargs, engine, x, y)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_loss_argument_its_config_drops_is_kept(engine):
    """`Huber(delta=0.3)`: Keras 3.15's config drops `delta`, and the variants
    were compiled from the config: every engine trained with delta=1.0."""
    x, y = data()

    def compile_kwargs():
        loss = keras.losses.Huber(delta=0.3, reduction="mean_with_sample_weight")
        return dict(optimizer=keras.optimizers.SGD(0.1), loss=loss)

    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**compile_kwargs())
    weights = np.linspace(0.1, 1.0, len(x)).astype("float32")
    check(template, compile_kwargs, engine, x, 3.0 * y, sample_weight=weights)


def test_a_metric_whose_config_drops_an_argument_is_refused():
    """A compiled metric cannot be copied (it holds variables) and its config
    would lose the argument: refused, naming it, before anything trains."""
    x, y = data()
    metric = keras.metrics.CosineSimilarity(axis=0)
    if "axis" in metric.get_config():
        pytest.skip("this Keras keeps CosineSimilarity's axis in its config")
    template = chain(keras.layers.Dense(1))
    template.compile(optimizer="sgd", loss="mse", metrics=[metric])
    before = template.get_weights()
    with pytest.raises(ValueError, match="'axis': 0") as raised:
        kerasreg.sweep(template, GRID, x, y, **FIT)
    assert "`model`" in str(raised.value)
    assert_untouched(template, before)


def test_weights_in_a_dataset_count_with_unweighted_validation_data():
    """Training batches `(x, y, w)` from a dataset and `validation_data=(x, y,
    None)`: the weights were dropped (the validation tuple decided alone)."""
    tf = pytest.importorskip("tensorflow")
    x, y = data(32)
    weights = np.linspace(0.0, 3.0, len(x)).astype("float32")

    def train():
        return tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)

    template = chain(keras.layers.Dense(4, "tanh"), keras.layers.Dense(1))
    template.compile(**adam())
    fit = dict(FIT, batch_size=None, validation_data=(x[:8], y[:8], None))
    result = kerasreg.sweep(template, GRID, train(), None, **fit)
    for penalty, row, model in zip(GRID, result.rows, result.models, strict=True):
        history, weights_after, _ = separate_fit(
            template, penalty, train, None, adam, **fit
        )
        assert_same_fit(row, model, history, weights_after)


@pytest.mark.parametrize("cell", [dict(dropout=0.2), dict(recurrent_dropout=0.2)])
def test_rnn_cell_dropout_is_each_variants_own(cell):
    """`LSTM(4, dropout=0.2, seed=5)`: in one fit of K variants (stacked, or
    `jax.vmap`) the cell's masks were not those of each variant's own fit
    (0.07 off in the weights on every backend, no error): K separate fits."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5, 3)).astype("float32")
    y = x[:, :, :1].sum(axis=1)
    keras.utils.set_random_seed(0)
    template = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.LSTM(4, seed=5, name="rnn", **cell),
            keras.layers.Dense(1),
        ]
    )
    template.compile(**adam())
    result = check(template, adam, "auto", x, y, grid=[None, kerasreg.L2Penalty(0.1)])
    assert result.engine == "sequential"
    assert "'rnn' has dropout in its recurrent cell" in result.engine_reason


# --- 6. a saturated sigmoid or softmax output (TensorFlow's logits) -------------------


@pytest.mark.parametrize(
    "head, layer",
    [
        ("sigmoid", "in Dense"),
        ("softmax", "in Dense"),
        ("sigmoid", "Activation"),
        ("softmax", "Activation"),
        ("softmax", "Softmax"),
    ],
)
def test_a_saturated_output_trains_as_its_crossentropy_does_in_a_separate_fit(
    head, layer
):
    """Keras's TensorFlow backend computes a crossentropy of a sigmoid or
    softmax output from the logits it attaches to it; once outputs saturate
    (past the 1e-7 clip) the clipped probabilities give other gradients. The
    batched kernels' per-variant outputs carry their logits too, whether the
    activation is the Dense layer's or a layer of its own."""
    rng = np.random.default_rng(5)
    x = 20 * rng.normal(size=(24, 3)).astype("float32")
    labels = (x[:, 0] > 0) ^ (rng.random(24) < 0.25)  # a quarter flipped
    units, loss = (1, "binary_crossentropy") if head == "sigmoid" else (2, None)
    y = labels.astype("float32")[:, None] if units == 1 else labels.astype("int32")
    loss = loss or "sparse_categorical_crossentropy"

    def adam():
        return dict(optimizer=keras.optimizers.Adam(0.05), loss=loss)

    if layer == "in Dense":
        output = [keras.layers.Dense(units, head)]
    else:
        own = (
            keras.layers.Softmax()
            if layer == "Softmax"
            else keras.layers.Activation(head)
        )
        output = [keras.layers.Dense(units), own]
    template = chain(keras.layers.Dense(16, "relu"), *output)
    template.compile(**adam())
    result = check(template, adam, "auto", x, y, epochs=4)
    assert result.engine == "vectorized"


# --- 7. a convolution of each variant's own input (im2col on TensorFlow) ---------


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3),
        dict(kernel_size=(2, 3), use_bias=False),
        dict(kernel_size=3, strides=2),
        dict(kernel_size=3, strides=(2, 1), padding="same"),
        dict(kernel_size=2, dilation_rate=2),
        dict(kernel_size=3, dilation_rate=(1, 2), padding="same"),
        dict(kernel_size=1, activation="relu"),
        dict(kernel_size=3, strides=2, padding="same", jit_compile=True),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_a_conv2d_on_each_variants_own_input_trains_as_its_separate_fit(options):
    """The second `Conv2D` gets each variant's own input: on TensorFlow the
    batched kernels convolve it as one im2col (patches of all variants'
    images, one batched matrix product), which must equal each variant's own
    convolution for every padding, stride and dilation, and under XLA
    (`jit_compile=True`, Keras's default on a GPU) against a fit without."""
    options = dict(options)
    jit_compile = options.pop("jit_compile", "auto")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 7, 7, 2)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    template = keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            keras.layers.Conv2D(3, 2, activation="tanh"),
            keras.layers.Conv2D(4, **options),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    template.compile(**adam(), jit_compile=jit_compile)
    result = check(template, adam, "auto", x, y)
    assert result.engine == "vectorized"
