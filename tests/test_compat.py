"""Every Keras internal kerasreg relies on (kerasreg/_compat.py) is still there.

Each test fails loudly when a Keras release changes the detail, instead of
letting kerasreg silently do less.
"""

import keras
import numpy as np
import pytest

from kerasreg import _compat


def test_sublayers_are_the_direct_children_keras_tracks():
    lstm = keras.layers.LSTM(3)
    bidirectional = keras.layers.Bidirectional(keras.layers.LSTM(2))
    inner = keras.Sequential([keras.layers.Dense(2)], name="inner")
    model = keras.Sequential(
        [keras.Input((4, 3)), lstm, keras.layers.RepeatVector(2), bidirectional]
    )
    model.build((None, 4, 3))
    assert lstm.cell in _compat.sublayers(lstm)
    children = _compat.sublayers(bidirectional)
    assert bidirectional.forward_layer in children
    assert bidirectional.backward_layer in children
    assert set(map(id, _compat.sublayers(model))) >= {id(lstm), id(bidirectional)}
    assert _compat.sublayers(inner) == [inner.layers[0]]


def test_sublayers_fails_loudly_without_the_tracker():
    class Bare:
        name = "bare"

    with pytest.raises(_compat.KerasInternalsChanged, match="_layers"):
        _compat.sublayers(Bare())


def test_jax_trainer_state_exists_during_fit():
    if keras.backend.backend() != "jax":
        pytest.skip("the JAX trainer's state")
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self._model._jax_state)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        np.ones((4, 2)), np.ones((4, 1)), batch_size=2, verbose=0, callbacks=[Probe()]
    )
    assert seen and all("trainable_variables" in s for s in seen)
    assert _compat.sync_jax_state(model)


def test_learning_rate_at_evaluates_the_schedule_on_the_batch_counter():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
    plain = keras.optimizers.SGD(schedule)
    accumulating = keras.optimizers.SGD(schedule, gradient_accumulation_steps=3)
    # Update t of an accumulating optimizer happens at batch 3t + 2.
    assert float(_compat.learning_rate_at(plain, 2)) == pytest.approx(0.5 * 0.5**2)
    assert float(_compat.learning_rate_at(accumulating, 2)) == pytest.approx(
        0.5 * 0.5**8
    )
    constant = keras.optimizers.SGD(0.25)
    assert float(_compat.learning_rate_at(constant, 7)) == pytest.approx(0.25)
    assert _compat.gradient_accumulation_steps(accumulating) == 3
    assert _compat.gradient_accumulation_steps(plain) == 1


def test_merge_call_updates_each_mirrored_copy_once():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute")
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    variable = tf.Variable(2.0)

    def double(distribution, v):
        distribution.extended.update(v, lambda x: x.assign(x * 2.0), group=False)

    tf.function(lambda: _compat.merge_call(double, variable))()
    assert float(variable.numpy()) == 4.0
    assert strategy is not None


class _FindsItsList(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.found = _compat.fit_callbacks(self)


def test_fit_callbacks_finds_the_running_callback_list():
    import numpy as np

    first, probe = keras.callbacks.Callback(), _FindsItsList()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((2, 2)), np.ones((2, 1)), verbose=0, callbacks=[first, probe])
    # The list Keras calls, in order, with the History it appends.
    assert probe.found[:2] == [first, probe]
    assert isinstance(probe.found[-1], keras.callbacks.History)
    probe.on_train_begin()  # called by hand: no CallbackList on the stack
    assert probe.found is None


class _ListWithoutCallbacks(keras.callbacks.CallbackList):
    """A CallbackList as a future Keras might make it: no `callbacks` list."""

    def __init__(self, callback):
        self.callback = callback

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)


def test_fit_callbacks_fails_loudly_without_the_callbacks_list():
    probe = _FindsItsList()
    with pytest.raises(_compat.KerasInternalsChanged, match="callbacks"):
        _ListWithoutCallbacks(probe).on_train_begin()


def test_config_regularizer_attribute_is_what_attention_layers_save():
    q = keras.Input((4, 6))
    mha = keras.layers.MultiHeadAttention(2, 3)
    gqa = keras.layers.GroupQueryAttention(3, 2, 1)
    keras.Model(q, [mha(q, q), gqa(q, q)])
    for layer in (mha, gqa):
        for attribute in ("kernel_regularizer", "bias_regularizer"):
            name = _compat.config_regularizer_attribute(layer, attribute)
            assert name in (attribute, f"_{attribute}")
            setattr(layer, name, keras.regularizers.L2(0.5))
            saved = layer.get_config()[attribute]
            assert keras.regularizers.deserialize(saved).l2 == pytest.approx(0.5)
    # Ordinary layers keep the attribute public and own their weights: no slot.
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    assert _compat.config_regularizer_attribute(dense, "kernel_regularizer") is None


def test_config_regularizer_attribute_fails_loudly_when_keras_changes():
    q = keras.Input((4, 6))
    mha = keras.layers.MultiHeadAttention(2, 3)
    keras.Model(q, mha(q, q))
    del mha._kernel_regularizer  # what a Keras release renaming it would look like
    with pytest.raises(_compat.KerasInternalsChanged, match="MultiHeadAttention"):
        _compat.config_regularizer_attribute(mha, "kernel_regularizer")


def test_nnx_enabled_follows_keras_config():
    is_enabled = getattr(keras.config, "is_nnx_enabled", None)
    if is_enabled is None:
        # Keras added NNX support (and the switch) in 3.11; before, never NNX.
        assert _compat.KERAS_VERSION < (3, 11), keras.__version__
        assert _compat.nnx_enabled() is False
    else:
        assert _compat.nnx_enabled() is is_enabled()


@pytest.mark.parametrize("enabled", [True, False])
def test_nnx_enabled_reads_the_switch_each_call(monkeypatch, enabled):
    monkeypatch.setattr(keras.config, "is_nnx_enabled", lambda: enabled, raising=False)
    assert _compat.nnx_enabled() is enabled


def test_nnx_enabled_is_false_on_keras_without_nnx(monkeypatch):
    monkeypatch.delattr(keras.config, "is_nnx_enabled", raising=False)
    monkeypatch.setattr(_compat, "KERAS_VERSION", (3, 8))
    assert _compat.nnx_enabled() is False


def test_nnx_enabled_fails_loudly_when_the_switch_disappears(monkeypatch):
    monkeypatch.delattr(keras.config, "is_nnx_enabled", raising=False)
    monkeypatch.setattr(_compat, "KERAS_VERSION", (3, 11))
    with pytest.raises(_compat.KerasInternalsChanged, match="is_nnx_enabled"):
        _compat.nnx_enabled()


@pytest.mark.parametrize(
    "metric",
    [
        keras.metrics.BinaryAccuracy,
        keras.metrics.MeanSquaredError,
        keras.metrics.CategoricalAccuracy,
    ],
)
def test_mean_metric_function_gives_the_per_sample_values_keras_averages(metric):
    rng = np.random.default_rng(0)
    y_true = (rng.random((6, 3)) > 0.5).astype("float32")
    y_pred = rng.random((6, 3)).astype("float32")
    wrapper = metric()
    fn, kwargs = _compat.mean_metric_function(wrapper)
    per_sample = keras.ops.convert_to_numpy(fn(y_true, y_pred, **kwargs))
    per_sample = per_sample.reshape(6, -1).mean(axis=1)
    wrapper.update_state(y_true, y_pred)
    assert float(wrapper.result()) == pytest.approx(per_sample.mean(), rel=1e-6)


def test_mean_metric_function_fails_loudly_when_keras_changes():
    metric = keras.metrics.BinaryAccuracy()
    del metric._fn  # what a Keras release renaming it would look like
    with pytest.raises(_compat.KerasInternalsChanged, match="binary_accuracy"):
        _compat.mean_metric_function(metric)


def test_per_sample_loss_is_what_compile_averages():
    rng = np.random.default_rng(1)
    y_true = (rng.random((5, 1)) > 0.5).astype("float32")
    y_pred = rng.random((5, 1)).astype("float32")
    fn = keras.losses.get("binary_crossentropy")
    per_sample = keras.ops.convert_to_numpy(
        _compat.per_sample_loss(fn)(
            y_true[:, 0], y_pred
        )  # ranks aligned as compile does
    )
    assert per_sample.shape == (5,)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Identity()])
    model.compile(loss="binary_crossentropy")
    compiled = float(model.compute_loss(y=y_true[:, 0], y_pred=y_pred))
    assert compiled == pytest.approx(per_sample.mean(), rel=1e-6)


def test_weight_decay_exclusions_are_read_back_as_given():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    assert _compat.weight_decay_exclusions(optimizer, model.weights) == ([], [])
    optimizer.exclude_from_weight_decay(
        var_list=[model.layers[1].kernel], var_names=["bias"]
    )
    names, indices = _compat.weight_decay_exclusions(optimizer, model.weights)
    assert indices == [2]  # the second layer's kernel
    # The names act as Keras's own rule does: a fresh optimizer told these
    # names leaves exactly the biases undecayed.
    fresh = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    fresh.exclude_from_weight_decay(var_names=names)
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]
    fresh.apply([keras.ops.zeros(w.shape) for w in model.weights], model.weights)
    after = [keras.ops.convert_to_numpy(w) for w in model.weights]
    kept = [np.array_equal(a, b) for a, b in zip(after, before, strict=True)]
    assert kept == [False, True, False, True]


def test_metric_directions_are_what_keras_early_stopping_decides():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = (rng.random((16, 1)) > 0.5).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, "sigmoid")])
    metrics = [
        "accuracy",
        "mae",
        keras.metrics.R2Score(),
        keras.metrics.CosineSimilarity(),
        keras.metrics.AUC(name="auc"),
    ]
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=metrics)
    assert _compat.metric_directions(model) == {}  # not built before the first step
    model.fit(x, y, epochs=1, verbose=0)
    directions = _compat.metric_directions(model)
    assert set(directions) == {
        "accuracy",
        "mae",
        "r2_score",
        "cosine_similarity",
        "auc",
    }
    for name, direction in directions.items():
        stopping = keras.callbacks.EarlyStopping(monitor=f"val_{name}")
        stopping.set_model(model)
        stopping._set_monitor_op()  # Keras's own mode="auto" decision
        up = stopping.monitor_op is keras.ops.greater
        assert direction == ("up" if up else "down"), name


def test_metric_directions_fail_loudly_when_keras_changes(monkeypatch):
    class Undirected(keras.metrics.Accuracy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self._direction  # what a Keras release renaming it would look like

    monkeypatch.setattr(keras.metrics, "Accuracy", Undirected)
    with pytest.raises(_compat.KerasInternalsChanged, match="_direction"):
        _compat.metric_directions(keras.Sequential())


# --- gradients (`gradient_norms`, `WeightNormLogger(gradients=True)`) ---------


def penalized_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer="l2")]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_compiled_loss_is_the_compiled_data_loss_only():
    model = penalized_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    loss = _compat.compiled_loss(model, x, y)
    prediction = keras.ops.convert_to_numpy(model(x))
    value = float(keras.ops.convert_to_numpy(loss(y, model(x))))
    assert np.isclose(value, np.mean((prediction - y) ** 2), rtol=1e-5)
    assert float(sum(keras.ops.convert_to_numpy(p) for p in model.losses)) > 0
    assert _compat.compiled_loss(keras.Sequential([keras.layers.Dense(1)])) is None


def test_compiled_loss_is_built_from_the_data_structure_without_computing():
    a = keras.Input((3,), name="a")
    model = keras.Model(
        a,
        {
            "p": keras.layers.Dense(1, name="p")(a),
            "q": keras.layers.Dense(2, name="q")(a),
        },
    )
    model.compile(
        optimizer="sgd",
        loss={"p": "mse", "q": "mae"},
        loss_weights={"p": 2.0, "q": 1.0},
    )
    x = np.ones((4, 3), "float32")
    y = {"p": np.ones((4, 1), "float32"), "q": np.zeros((4, 2), "float32")}
    before = [w.copy() for w in model.get_weights()]
    loss = _compat.compiled_loss(model, x, y)
    assert loss.built
    for b, a in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    p = keras.ops.convert_to_numpy(model(x)["p"])
    q = keras.ops.convert_to_numpy(model(x)["q"])
    expected = 2.0 * np.mean((p - 1.0) ** 2) + np.mean(np.abs(q))
    with keras.StatelessScope():  # its per-output loss trackers stay as they are
        value = float(keras.ops.convert_to_numpy(loss(y, model(x))))
    assert np.isclose(value, expected, rtol=1e-5)


def test_compiled_loss_fails_loudly_without_the_attribute():
    class Bare:
        pass

    with pytest.raises(_compat.KerasInternalsChanged, match="_compile_loss"):
        _compat.compiled_loss(Bare())


def test_data_batches_reads_arrays_and_datasets_in_order():
    import tensorflow as tf

    x = np.arange(14, dtype="float32").reshape(7, 2)
    y = np.arange(7, dtype="float32")
    s = np.linspace(0.5, 2.0, 7).astype("float32")
    batches = list(_compat.data_batches(x, y, s, batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), s)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    batches = list(_compat.data_batches(dataset, steps=1))
    assert len(batches) == 1 and batches[0][2] is None
    np.testing.assert_array_equal(batches[0][1], y[:4])


def test_gradient_accumulators_hold_the_gradient_sum_of_the_window():
    import kerasreg

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="d")])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=3), loss="mse"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    expected = kerasreg.gradient_norms(model, x, y)["d/kernel"]["data"]
    model.train_on_batch(x, y)  # the window's first batch: no update yet
    (kernel_sum,) = _compat.gradient_accumulators(
        model.optimizer, [model.get_layer("d").kernel]
    )
    norm = np.linalg.norm(keras.ops.convert_to_numpy(kernel_sum.value))
    assert np.isclose(norm, expected, rtol=1e-5)
    inner = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(gradient_accumulation_steps=2)
    )
    inner.build(model.trainable_variables)
    assert len(_compat.gradient_accumulators(inner, model.trainable_variables)) == 2


def test_gradient_accumulators_fail_loudly_when_keras_changes():
    class Accumulating:
        gradient_accumulation_steps = 2

    with pytest.raises(_compat.KerasInternalsChanged, match="_accumulated_gradients"):
        _compat.gradient_accumulators(Accumulating(), [])


@pytest.mark.parametrize("split", [True, False])
def test_record_fit_validation_sees_the_data_fit_validates_on(split):
    model = penalized_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.normal(size=(12, 2)).astype("float32")
    seen = []
    _compat.record_fit_validation(model, lambda *args: seen.append(args))
    if split:
        model.fit(x, y, epochs=2, batch_size=4, validation_split=0.25, verbose=0)
    else:
        model.fit(x, y, epochs=2, validation_data=(x[:5], y[:5]), verbose=0)
    model.evaluate(x, y, verbose=0)  # a user's own evaluate: not recorded
    _compat.forget_fit_validation(model)
    assert "evaluate" not in vars(model)
    assert len(seen) == 2
    vx, vy, sample_weight, batch_size, steps = seen[-1]
    expected = (x[9:], y[9:]) if split else (x[:5], y[:5])
    np.testing.assert_array_equal(np.asarray(vx), expected[0])
    np.testing.assert_array_equal(np.asarray(vy), expected[1])
    assert sample_weight is None and steps is None
    assert batch_size == (4 if split else None)


class _Held(_compat.LayerState):
    """A minimal LayerState: one non-trainable variable as its `state`."""

    def __init__(self):
        self.state = keras.Variable(np.ones((2, 2)), trainable=False, name="held")


def test_layer_state_is_passed_to_trainers_but_is_no_weight(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")])
    layer = model.layers[0]
    weights = [id(v) for v in model.weights]
    held = _Held()
    _compat.set_tracked_attribute(layer, "held", held)  # a built layer
    # In the state Keras's trainers pass (JAX: as inputs of the compiled step).
    assert any(v is held.state for v in model.non_trainable_variables)
    assert [id(v) for v in model.weights] == weights  # not a weight, not saved
    model.save_weights(tmp_path / "m.weights.h5")
    import h5py

    with h5py.File(tmp_path / "m.weights.h5") as h5:
        names = []
        h5.visit(names.append)
    assert not any("held" in n for n in names), names
    # The tracker is locked again, and a replaced value leaves the state.
    with pytest.raises(ValueError, match="state"):
        layer.add_weight(shape=(1,), name="late")
    _compat.set_tracked_attribute(layer, "held", None)
    assert not any(v is held.state for v in model.non_trainable_variables)


def test_set_tracked_attribute_fails_loudly_without_the_tracker():
    class Bare:
        name = "bare"

    with pytest.raises(_compat.KerasInternalsChanged, match="_tracker"):
        _compat.set_tracked_attribute(Bare(), "x", 1)


def test_state_variable_is_created_eagerly_inside_a_stateless_scope():
    value = keras.ops.convert_to_tensor(np.arange(4.0).reshape(2, 2))
    with keras.StatelessScope():
        variable = _compat.state_variable(value, "inside")
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), value)
    assert not variable.trainable
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    variable.assign(np.zeros((2, 2)))
    assert float(keras.ops.sum(variable)) == 0.0


def test_functional_graph_lists_each_call_with_its_inputs_first():
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    shared = keras.layers.Dense(3, name="shared")
    merged = keras.layers.Add(name="add")([shared(inputs), shared(hidden)])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(merged))
    functional, calls = _compat.functional_graph(model)
    assert functional is model
    names = [operation.name for operation, *_ in calls]
    assert sorted(names) == ["add", "hidden", "out", "shared", "shared"]
    # Running the calls in the given order computes the model's output.
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    values = {id(model.inputs[0]): keras.ops.convert_to_tensor(x)}
    for operation, args, kwargs, outputs in calls:
        filled = keras.tree.map_structure(
            lambda a: values[id(a)] if isinstance(a, keras.KerasTensor) else a, args
        )
        values[id(outputs[0])] = operation(*filled, **kwargs)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(values[id(model.outputs[0])]),
        keras.ops.convert_to_numpy(model(x)),
        rtol=1e-6,
    )
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    functional, calls = _compat.functional_graph(sequential)
    assert [op.name for op, *_ in calls] == ["d"]
    assert functional.outputs[0] is calls[0][3][0]


def test_functional_graph_fails_loudly_without_the_nodes():
    class Bare:
        pass

    with pytest.raises(_compat.KerasInternalsChanged, match="_nodes_by_depth"):
        _compat.functional_graph(Bare())


def test_standardize_inputs_reads_inputs_as_the_model_does():
    a = keras.Input((2,), name="a")
    b = keras.Input((1,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Concatenate()([a, b]))
    x = {"b": np.ones((4, 1)), "a": np.zeros((4, 2))}
    flat = _compat.standardize_inputs(model, x)
    # In the order of the model's inputs (a, b), as float32 tensors.
    assert [tuple(t.shape) for t in flat] == [(4, 2), (4, 1)]
    assert [t.name for t in model.inputs] == ["a", "b"]
    assert all(keras.backend.standardize_dtype(t.dtype) == "float32" for t in flat)

    class Bare:
        pass

    with pytest.raises(_compat.KerasInternalsChanged, match="_standardize_inputs"):
        _compat.standardize_inputs(Bare(), x)


def test_set_gradient_clipping_replaces_the_optimizers_clipping():
    variable = keras.Variable(np.ones(3, "float32"))
    optimizer = keras.optimizers.SGD(1.0, clipnorm=1e-9)
    seen = []

    def halve(grads):
        seen.append(len(grads))
        return [g * 0.5 for g in grads]

    _compat.set_gradient_clipping(optimizer, halve)
    optimizer.apply([keras.ops.ones(3)], [variable])
    # Clipped by the given function (halved), not by clipnorm=1e-9.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), [0.5] * 3)
    assert seen == [1]

    class Bare:
        pass

    with pytest.raises(_compat.KerasInternalsChanged, match="_clip_gradients"):
        _compat.set_gradient_clipping(Bare(), halve)


def test_prepare_jax_step_makes_the_step_callable_outside_fit():
    if keras.backend.backend() != "jax":
        pytest.skip("the JAX trainer's pure step")
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.optimizer.build(model.trainable_variables)
        models.append(model)
    stepped, reference = models
    _compat.prepare_jax_step(stepped)
    state = (
        [v.value for v in stepped.trainable_variables],
        [v.value for v in stepped.non_trainable_variables],
        [v.value for v in stepped.optimizer.variables],
        [v.value for v in stepped.metrics_variables],
    )
    logs, state = stepped.train_step(state, (x, y))
    expected = reference.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(float(logs["loss"]), expected["loss"], rtol=1e-6)
    for got, want in zip(state[0], reference.get_weights(), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_prepare_jax_step_fails_loudly_when_keras_changes():
    class Trainer:
        def _enforce_jax_state_sharding(self):
            pass

    with pytest.raises(_compat.KerasInternalsChanged, match="sharding"):
        _compat.prepare_jax_step(Trainer())
    _compat.prepare_jax_step(object())  # a trainer that constrains nothing


def test_compile_arguments_are_the_objects_compile_was_given():
    loss = keras.losses.Huber(delta=0.3)
    metric = keras.metrics.CosineSimilarity(axis=0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=loss, metrics=[metric])
    arguments = _compat.compile_arguments(model)
    assert arguments["loss"] is loss
    assert arguments["metrics"][0] is metric


def test_compile_arguments_fail_loudly_when_keras_changes():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model._compile_config = None
    with pytest.raises(_compat.KerasInternalsChanged, match="compile arguments"):
        _compat.compile_arguments(model)


def test_function_arguments_are_what_the_loss_or_metric_passes_its_function():
    # What the sweep needs them for: Keras's config drops these (a model
    # compiled from the config computes another loss).
    huber = keras.losses.Huber(delta=0.3)
    assert _compat.function_arguments(huber) == {"delta": 0.3}
    y_true, y_pred = np.array([[0.0], [2.0]]), np.array([[1.0], [0.0]])
    by_hand = keras.losses.huber(y_true, y_pred, **_compat.function_arguments(huber))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(huber(y_true, y_pred)),
        np.mean(keras.ops.convert_to_numpy(by_hand)),
        rtol=1e-6,
    )
    cosine = keras.metrics.CosineSimilarity(axis=0)
    assert _compat.function_arguments(cosine)["axis"] == 0
    assert _compat.function_arguments(keras.metrics.AUC()) is None


def test_build_compiled_creates_the_metric_state_of_a_fresh_fit():
    # Built on symbolic tensors, as Keras's fit builds them: the metric
    # variables exist and hold their initial values (an eager call would have
    # added the batch to them, which a metric that never resets would keep).
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    assert len(model.metrics_variables) == 2  # the loss tracker only
    x = np.ones((4, 3), "float32")
    y = np.full((4, 2), 5.0, "float32")
    _compat.build_compiled(model, x, y)
    values = [keras.ops.convert_to_numpy(v) for v in model.metrics_variables]
    assert len(values) == 4  # loss and mae: total and count each
    for value in values:
        np.testing.assert_array_equal(value, np.zeros_like(value))
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    plain.evaluate(x, y, verbose=0)  # Keras's own build: the same variables
    assert [v.shape for v in plain.metrics_variables] == [
        v.shape for v in model.metrics_variables
    ]
