"""regularize(): penalties on trained models, against numpy sums and Keras's own losses."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import kerasreg
from kerasreg import REMOVE, L1Penalty, L2Penalty, regularize

C_KERNEL = 0.03
C_RECURRENT = 0.02
C_BIAS = 0.05

# Tests of the deprecated `layers=` alias: its KerasregDeprecationWarning (an
# error elsewhere in the suite, see setup.cfg) is expected here.
USES_LAYERS_ALIAS = pytest.mark.filterwarnings(
    r"ignore:regularize\(layers=\.\.\.\) is deprecated"
    ":kerasreg._checks.KerasregDeprecationWarning"
)


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def dense_model():
    inp = keras.Input((4,))
    return keras.Model(
        inp,
        keras.layers.Dense(1, name="out")(
            keras.layers.Dense(3, activation="tanh", name="hidden")(inp)
        ),
    )


def conv_model():
    inp = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, name="conv")(inp)
    return keras.Model(
        inp, keras.layers.Dense(1, name="out")(keras.layers.Flatten()(h))
    )


def embedding_model():
    inp = keras.Input((3,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(7, 2, name="emb")(inp))
    return keras.Model(inp, keras.layers.Dense(1, name="out")(h))


def lstm_model():
    inp = keras.Input((5, 2))
    return keras.Model(
        inp, keras.layers.Dense(1, name="out")(keras.layers.LSTM(3, name="lstm")(inp))
    )


def gru_model():
    inp = keras.Input((5, 2))
    return keras.Model(
        inp, keras.layers.Dense(1, name="out")(keras.layers.GRU(3, name="gru")(inp))
    )


def bidirectional_model():
    inp = keras.Input((5, 2))
    h = keras.layers.Bidirectional(keras.layers.LSTM(3, name="lstm"), name="bi")(inp)
    return keras.Model(inp, keras.layers.Dense(1, name="out")(h))


def nested_model():
    enc_in = keras.Input((4,))
    encoder = keras.Model(
        enc_in, keras.layers.Dense(3, name="enc_dense")(enc_in), name="encoder"
    )
    inp = keras.Input((4,))
    h = keras.Sequential([keras.layers.Dense(4, name="seq_dense")], name="block")(inp)
    return keras.Model(inp, keras.layers.Dense(1, name="out")(encoder(h)), name="outer")


BUILDERS = {
    "dense": (dense_model, (4,)),
    "conv": (conv_model, (5, 5, 2)),
    "embedding": (embedding_model, "ids"),
    "lstm": (lstm_model, (5, 2)),
    "gru": (gru_model, (5, 2)),
    "bidirectional": (bidirectional_model, (5, 2)),
    "nested": (nested_model, (4,)),
}

# Role of each weight, by the last part of its path: the independent reference.
ROLE_OF = {
    "kernel": "kernel",
    "embeddings": "kernel",
    "recurrent_kernel": "recurrent",
    "bias": "bias",
}


def data(kind, rng):
    if kind == "ids":
        x = rng.integers(0, 7, size=(12, 3)).astype("int32")
    else:
        x = rng.normal(size=(12, *kind)).astype("float32")
    return x, rng.normal(size=(12, 1)).astype("float32")


def trained(name, rng):
    builder, kind = BUILDERS[name]
    model = builder()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = data(kind, rng)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    return model, x, y


def numpy_penalty(model, factors):
    """Sum over weights of factor[role] * sum(w**2) (L2) or sum(|w|) (recurrent: L1)."""
    total = 0.0
    for v in model.weights:
        role = ROLE_OF.get(v.path.rsplit("/", 1)[-1])
        if role in factors and v.trainable:
            w = to_np(v)
            total += factors[role] * (
                np.abs(w).sum() if role == "recurrent" else (w**2).sum()
            )
    return total


def losses_sum(model):
    return float(sum(to_np(loss) for loss in model.losses))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_attach_losses_evaluate_fit_and_save(name, rng, tmp_path):
    model, x, y = trained(name, rng)
    weights = [to_np(v) for v in model.weights]
    data_loss = model.evaluate(x, y, verbose=0)
    assert model.losses == []

    recurrent = (
        L1Penalty(C_RECURRENT) if name in ("lstm", "gru", "bidirectional") else None
    )
    out = regularize(model, kernel=L2Penalty(C_KERNEL), recurrent=recurrent)
    assert out is model
    factors = {"kernel": C_KERNEL}
    if recurrent is not None:
        factors["recurrent"] = C_RECURRENT
    expected = numpy_penalty(model, factors)
    assert expected > 0
    assert losses_sum(model) == pytest.approx(expected, rel=1e-5)
    for before, v in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, to_np(v))

    # The cached test function was re-traced: evaluate includes the penalty.
    assert model.evaluate(x, y, verbose=0) == pytest.approx(
        data_loss + expected, rel=1e-5
    )

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert losses_sum(loaded) == pytest.approx(expected, rel=1e-5)
    assert loaded.evaluate(x, y, verbose=0) == pytest.approx(
        data_loss + expected, rel=1e-5
    )
    saved = json.dumps(loaded.get_config())
    assert "kerasreg>L2Penalty" in saved

    # Removing gives back the plain data loss, in memory and after saving.
    regularize(model, kernel=REMOVE, recurrent=REMOVE if recurrent else None)
    assert model.losses == []
    assert model.evaluate(x, y, verbose=0) == pytest.approx(data_loss, rel=1e-6)
    model.save(tmp_path / "removed.keras")
    assert keras.saving.load_model(tmp_path / "removed.keras").losses == []


def test_next_fit_includes_penalty(rng):
    model, x, y = trained("lstm", rng)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, y, batch_size=12, epochs=1, verbose=0)  # caches train_function
    data_loss = model.evaluate(x, y, verbose=0)
    regularize(model, kernel="l2_penalty", recurrent=L2Penalty(C_RECURRENT))
    expected = numpy_penalty(model, {"kernel": 0.01}) + sum(
        C_RECURRENT * (to_np(v) ** 2).sum()
        for v in model.weights
        if v.path.endswith("recurrent_kernel")
    )
    history = model.fit(x, y, batch_size=12, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(data_loss + expected, rel=1e-5)


def test_one_sgd_step_matches_numpy(rng):
    """Linear model, full batch: w1 = w0 - lr * (grad_mse + 2 c w0) for the kernel."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="lin")])
    lr, c = 0.1, 0.2
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    regularize(model, kernel=L2Penalty(c), bias=L1Penalty(c))
    w0, b0 = to_np(model.layers[0].kernel), to_np(model.layers[0].bias)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    residual = x.astype(np.float64) @ w0 + b0 - y
    grad_w = 2 * x.T @ residual / len(x) + 2 * c * w0
    grad_b = 2 * residual.mean(axis=0) + c * np.sign(b0)
    np.testing.assert_allclose(
        to_np(model.layers[0].kernel), w0 - lr * grad_w, atol=1e-6
    )
    np.testing.assert_allclose(to_np(model.layers[0].bias), b0 - lr * grad_b, atol=1e-6)


@USES_LAYERS_ALIAS
def test_bidirectional_both_directions_and_cells(rng, tmp_path):
    model, _x, _y = trained("bidirectional", rng)
    regularize(model, kernel=L2Penalty(C_KERNEL), bias=L1Penalty(C_BIAS), layers="bi")
    bi = model.get_layer("bi")
    for direction in (bi.forward_layer, bi.backward_layer):
        assert direction.cell.kernel_regularizer == L2Penalty(C_KERNEL)
        assert direction.cell.kernel.regularizer == L2Penalty(C_KERNEL)
        assert direction.cell.bias_regularizer == L1Penalty(C_BIAS)
        assert direction.kernel_regularizer == L2Penalty(C_KERNEL)  # via the cell
    assert model.get_layer("out").kernel.regularizer is None  # outside `layers`
    model.save(tmp_path / "bi.keras")
    loaded = keras.saving.load_model(tmp_path / "bi.keras").get_layer("bi")
    assert loaded.backward_layer.cell.kernel.regularizer == L2Penalty(C_KERNEL)
    assert loaded.forward_layer.cell.bias.regularizer == L1Penalty(C_BIAS)


@USES_LAYERS_ALIAS
def test_embedding_kernel_role_is_embeddings_regularizer(rng):
    model, _, _ = trained("embedding", rng)
    regularize(model, kernel=L2Penalty(C_KERNEL), layers="emb")
    emb = model.get_layer("emb")
    assert emb.embeddings_regularizer == L2Penalty(C_KERNEL)
    assert (
        emb.get_config()["embeddings_regularizer"]["registered_name"]
        == "kerasreg>L2Penalty"
    )
    assert losses_sum(model) == pytest.approx(
        C_KERNEL * (to_np(emb.embeddings) ** 2).sum(), rel=1e-5
    )


@USES_LAYERS_ALIAS
@pytest.mark.parametrize(
    "layers, expected",
    [
        ("^enc", ["enc_dense"]),  # the ancestor "encoder" matches
        ("block|out", ["seq_dense", "out"]),
        (lambda layer: layer.name == "encoder", ["enc_dense"]),
        ("layer-list", ["seq_dense", "enc_dense"]),
    ],
    ids=["regex-ancestor", "regex", "callable", "list"],
)
def test_layers_filter(layers, expected, rng):
    model, _, _ = trained("nested", rng)
    if layers == "layer-list":
        layers = [model.get_layer("block").layers[0], model.get_layer("encoder")]
    regularize(model, kernel=L2Penalty(C_KERNEL), layers=layers)
    got = sorted(
        v.path.split("/")[-2] for v in model.weights if v.regularizer is not None
    )
    assert got == sorted(expected)


@pytest.mark.parametrize(
    "identifier",
    [
        "l2_penalty",
        "L2Penalty",
        "kerasreg>L2Penalty",
        "l2",
        {"class_name": "L2Penalty", "config": {"l2": 0.01}},
    ],
)
def test_accepts_what_kerasreg_get_resolves(identifier, rng):
    model, _, _ = trained("dense", rng)
    regularize(model, kernel=identifier)
    assert losses_sum(model) == pytest.approx(
        numpy_penalty(model, {"kernel": 0.01}), rel=1e-5
    )


def snapshot(model):
    return (
        json.dumps(model.get_config(), sort_keys=True, default=str),
        [repr(v.regularizer) for v in model.weights],
        [to_np(v).tobytes() for v in model.weights],
        [
            id(getattr(model, f))
            for f in ("train_function", "test_function", "predict_function")
        ],
    )


@USES_LAYERS_ALIAS
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kernel="no_such_penalty"), ValueError, r"`kernel`.*no_such_penalty"),
        (dict(kernel=L2Penalty(), bias="nope"), ValueError, r"`bias`.*nope"),
        (
            dict(kernel=L2Penalty(), layers="^zzz"),
            ValueError,
            r"`layers`.*'\^zzz'.*matches no layer",
        ),
        (
            dict(kernel=L2Penalty(), layers="(bad"),
            ValueError,
            "not a valid regular expression",
        ),
        (dict(kernel=L2Penalty(), layers=3), TypeError, r"layers=3"),
        (
            dict(kernel=L2Penalty(), recurrent=L2Penalty()),
            ValueError,
            r"`recurrent`: no weight of model '.*' has a recurrent role\. Its "
            r"weights by role: kernel: 'hidden/kernel', 'out/kernel'; recurrent: "
            r"none; bias: 'hidden/bias', 'out/bias'\.",
        ),
        (
            dict(kernel=L2Penalty(), layers=lambda layer: False),
            ValueError,
            "matches no layer",
        ),
        (dict(), ValueError, "at least one of"),
        (dict(kernel=12), ValueError, "Could not interpret"),
    ],
)
def test_rejected_call_changes_nothing(kwargs, error, match, rng):
    model, _, _ = trained("dense", rng)
    regularize(model, bias=L1Penalty(C_BIAS))  # an existing penalty must survive
    model.evaluate(*data((4,), rng), verbose=0)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        regularize(model, **kwargs)
    assert snapshot(model) == before


@USES_LAYERS_ALIAS
def test_rejects_non_models_and_foreign_layers(rng):
    model, _, _ = trained("dense", rng)
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="alien")])
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"expected a built keras.Model"):
        regularize(keras.layers.Dense(2), kernel=L2Penalty())
    with pytest.raises(ValueError, match="'alien' is not part of model"):
        regularize(model, kernel=L2Penalty(), layers=[other.layers[0]])
    with pytest.raises(ValueError, match="is not built"):
        regularize(keras.Sequential([keras.layers.Dense(2)]), kernel=L2Penalty())
    assert snapshot(model) == before


def test_none_leaves_role_alone(rng):
    model, _, _ = trained("dense", rng)
    regularize(model, kernel=L2Penalty(C_KERNEL), bias=L1Penalty(C_BIAS))
    regularize(model, kernel=L1Penalty(C_BIAS))
    hidden = model.get_layer("hidden")
    assert hidden.bias_regularizer == L1Penalty(C_BIAS)
    assert hidden.kernel_regularizer == L1Penalty(C_BIAS)


def test_remove_sentinel_is_a_named_singleton():
    import copy
    import pickle

    assert repr(REMOVE) == "kerasreg.REMOVE"
    assert kerasreg.REMOVE is REMOVE
    assert copy.deepcopy(REMOVE) is REMOVE
    assert pickle.loads(pickle.dumps(REMOVE)) is REMOVE


# `where=`: the one selection rule, here picking which weights of each role ----


def regularized_paths(model):
    paths = kerasreg.selection.weight_paths(model)
    return sorted(paths[id(v)] for v in model.weights if v.regularizer is not None)


@pytest.mark.parametrize(
    "make_where, roles, expected",
    [
        (
            lambda m: kerasreg.layer("^encoder$"),
            ("kernel", "bias"),
            ["encoder/enc_dense/bias", "encoder/enc_dense/kernel"],
        ),
        (
            lambda m: "^block/",
            ("kernel",),
            ["block/seq_dense/kernel"],
        ),
        (
            lambda m: ~kerasreg.layer(m.get_layer("out")),
            ("bias",),
            ["block/seq_dense/bias", "encoder/enc_dense/bias"],
        ),
        (
            lambda m: kerasreg.layer(keras.layers.Dense) & kerasreg.path("dense/"),
            ("kernel", "bias"),
            [
                "block/seq_dense/bias",
                "block/seq_dense/kernel",
                "encoder/enc_dense/bias",
                "encoder/enc_dense/kernel",
            ],
        ),
    ],
    ids=["layer", "regex", "not", "and"],
)
def test_where_picks_the_weights_each_role_applies_to(make_where, roles, expected, rng):
    model, x, y = trained("nested", rng)
    kwargs = {role: L2Penalty(C_KERNEL) for role in roles}
    regularize(model, **kwargs, where=make_where(model))
    assert regularized_paths(model) == expected
    # The penalty is in the very next evaluate: data loss + sum over selected.
    selected = {
        id(v)
        for v in model.weights
        if kerasreg.selection.weight_paths(model)[id(v)] in expected
    }
    penalty = sum(
        C_KERNEL * (to_np(v) ** 2).sum() for v in model.weights if id(v) in selected
    )
    data_loss = float(np.mean((to_np(model.predict(x, verbose=0)) - y) ** 2))
    assert model.evaluate(x, y, verbose=0) == pytest.approx(
        data_loss + penalty, rel=1e-4
    )


def test_layers_is_a_deprecated_alias_of_where_layer(rng):
    old, _, _ = trained("nested", rng)
    new, _, _ = trained("nested", rng)
    with pytest.warns(DeprecationWarning, match=r"where=kerasreg\.layer"):
        regularize(old, kernel=L2Penalty(C_KERNEL), layers="^enc")
    regularize(new, kernel=L2Penalty(C_KERNEL), where=kerasreg.layer("^enc"))
    assert (
        regularized_paths(old) == regularized_paths(new) == ["encoder/enc_dense/kernel"]
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(kernel=L2Penalty(), where="x", layers="y"),
            TypeError,
            "not both",
        ),
        (
            dict(recurrent=L2Penalty(), where=kerasreg.layer("^hidden$")),
            ValueError,
            r"`recurrent`.*layer\('\^hidden\$'\) selects has a recurrent role\. "
            r"Its weights by role: kernel: 'hidden/kernel', 'out/kernel'; "
            r"recurrent: none",
        ),
        (dict(bias=L2Penalty(), where=kerasreg.kernels()), ValueError, "`bias`"),
        (dict(kernel=L2Penalty(), where="(bad"), ValueError, "not a valid regular"),
        (dict(kernel=L2Penalty(), where=3), TypeError, "where=3"),
    ],
)
def test_rejected_where_changes_nothing(kwargs, error, match, rng):
    model, _, _ = trained("dense", rng)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        regularize(model, **kwargs)
    assert snapshot(model) == before


# --- issue 16 / issue 10 item 5: layers and uses that were silently wrong ---


def attention_model(kind, **kwargs):
    q = keras.Input((4, 6))
    if kind == "mha":
        layer = keras.layers.MultiHeadAttention(2, 3, name="att", **kwargs)
    else:
        layer = keras.layers.GroupQueryAttention(3, 2, 1, name="att", **kwargs)
    return keras.Model(q, layer(q, q))


def l2_of_named(model, name, c):
    """c * sum(w**2) over every trainable weight called `name`, from numpy."""
    return sum(
        c * (to_np(v) ** 2).sum() for v in model.trainable_weights if v.name == name
    )


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_penalty_survives_config_clone_and_save(kind, tmp_path):
    """Item 1: attention layers rebuild their projections from their own config."""
    model = attention_model(kind)
    regularize(model, kernel=L2Penalty(0.1), bias=L1Penalty(0.2))
    expected = l2_of_named(model, "kernel", 0.1) + sum(
        0.2 * np.abs(to_np(v)).sum() for v in model.weights if v.name == "bias"
    )
    assert losses_sum(model) == pytest.approx(expected, rel=1e-5)
    config = model.get_layer("att").get_config()
    assert config["kernel_regularizer"] == keras.regularizers.serialize(L2Penalty(0.1))
    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    model.save(tmp_path / "att.keras")
    loaded = keras.saving.load_model(tmp_path / "att.keras")
    for other in (rebuilt, clone, loaded):
        assert losses_sum(other) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_remove_and_replace_survive_clone_and_save(kind, tmp_path):
    """Item 1, reverse: a constructor penalty removed or replaced stays so."""
    model = attention_model(kind, kernel_regularizer=L2Penalty(0.5))
    regularize(model, kernel=REMOVE)
    assert model.losses == []
    assert keras.models.clone_model(model).losses == []
    model.save(tmp_path / "removed.keras")
    assert keras.saving.load_model(tmp_path / "removed.keras").losses == []
    regularize(model, kernel=L1Penalty(0.3))
    expected = sum(
        0.3 * np.abs(to_np(v)).sum() for v in model.weights if v.name == "kernel"
    )
    model.save(tmp_path / "replaced.keras")
    loaded = keras.saving.load_model(tmp_path / "replaced.keras")
    assert losses_sum(loaded) == pytest.approx(expected, rel=1e-5)
    assert {type(v.regularizer) for v in loaded.weights if v.name == "kernel"} == {
        L1Penalty
    }


@USES_LAYERS_ALIAS
def test_attention_projection_alone_is_refused_unchanged():
    model = attention_model("mha")
    with pytest.raises(ValueError, match="select 'att'"):
        regularize(model, kernel=L2Penalty(0.1), layers="query")
    assert model.losses == []


@USES_LAYERS_ALIAS
@pytest.mark.parametrize(
    "layer, shape",
    [
        (keras.layers.DepthwiseConv1D(3, name="dw"), (6, 2)),
        (keras.layers.DepthwiseConv2D(3, name="dw"), (5, 5, 2)),
    ],
)
def test_depthwise_filters_get_the_kernel_role(layer, shape):
    """Item 2: `kernel` variable behind the `depthwise_regularizer` attribute."""
    model = keras.Sequential([keras.Input(shape), layer])
    regularize(model, kernel=L2Penalty(0.1), layers="dw")
    assert layer.depthwise_regularizer == L2Penalty(0.1)
    assert losses_sum(model) == pytest.approx(
        0.1 * (to_np(layer.kernel) ** 2).sum(), rel=1e-5
    )
    clone = keras.models.clone_model(model)
    assert clone.layers[0].kernel.regularizer == L2Penalty(0.1)


def test_subclassed_model_warns_that_save_loses_the_penalty():
    """Item 3: Keras rebuilds a subclassed model's layers in `__init__` on load."""

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(2)

        def call(self, x):
            return self.hidden(x)

    model = Net()
    model(np.ones((1, 3), "float32"))
    with pytest.warns(UserWarning, match="Net .* subclassed"):
        regularize(model, kernel=L2Penalty(0.1))
    assert losses_sum(model) == pytest.approx(
        l2_of_named(model, "kernel", 0.1), rel=1e-5
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # functional models save their layers' config
        regularize(dense_model(), kernel=L2Penalty(0.1))


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_regularize_from_a_callback_applies_from_the_next_step(steps_per_execution):
    """Item 8: no crash; the penalty counts from the next call of the train step.

    SGD(0) keeps the weights fixed, so each batch loss is the data loss `d`,
    plus the penalty `P` once it applies: the epoch mean is a closed form.
    """
    if keras.backend.backend() == "torch" and steps_per_execution > 1:
        pytest.skip("Keras supports steps_per_execution > 1 only on TF and JAX")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(
        keras.optimizers.SGD(0.0), "mse", steps_per_execution=steps_per_execution
    )
    x = np.ones((16, 3), "float32")
    y = np.zeros((16, 1), "float32")

    class WarmUp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not self.model.losses:
                regularize(self.model, kernel=L2Penalty(1.0))

    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[WarmUp()])
    w, b = to_np(model.layers[0].kernel), to_np(model.layers[0].bias)
    d = float(((x @ w + b) ** 2).mean())
    p = float((w**2).sum())
    k = steps_per_execution  # batches run before the callback first fires
    assert history.history["loss"] == pytest.approx(
        [(k * d + (4 - k) * (d + p)) / 4, d + p], rel=1e-5
    )
    assert model.evaluate(x, y, verbose=0) == pytest.approx(d + p, rel=1e-5)


def lora_model(kind, rank=2):
    if kind == "embedding":
        inputs = keras.Input((3,), dtype="int32")
        layer = keras.layers.Embedding(7, 4, name="lr")
    elif kind == "einsum":
        inputs = keras.Input((3,))
        layer = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, name="lr")
    else:
        inputs = keras.Input((3,))
        layer = keras.layers.Dense(4, name="lr")
    model = keras.Model(inputs, layer(inputs))
    layer.enable_lora(rank)
    for v in layer.trainable_weights:  # LoRA's `b` starts at zero
        v.assign(np.linspace(-1, 1, int(np.prod(v.shape))).reshape(v.shape))
    return model, layer


@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding"])
def test_lora_penalty_goes_where_keras_constructor_puts_it(kind, tmp_path):
    """Issue 10 item 5: on the trainable adapters, as Keras's `enable_lora` does."""
    model, layer = lora_model(kind)
    regularize(model, kernel=L2Penalty(0.1))
    adapters = [v for v in layer.trainable_weights if v.name.startswith("lora_")]
    assert len(adapters) == 2
    assert losses_sum(model) == pytest.approx(
        sum(0.1 * (to_np(v) ** 2).sum() for v in adapters), rel=1e-5
    )
    # Independent reference: a layer constructed with the regularizer.
    attribute = (
        "embeddings_regularizer" if kind == "embedding" else "kernel_regularizer"
    )
    ref_config = {**layer.get_config(), attribute: L2Penalty(0.1), "name": "ref"}
    ref_config.pop("lora_rank", None)
    reference = type(layer).from_config(ref_config)
    reference.build((None, 3))
    reference.enable_lora(2)
    regularized = sorted(v.name for v in reference.weights if v.regularizer)
    assert sorted(v.name for v in layer.weights if v.regularizer) == regularized
    # Saved: Keras merges the adapters into the kernel and reloads them at zero.
    model.save(tmp_path / "lora.keras")
    loaded = keras.saving.load_model(tmp_path / "lora.keras").get_layer("lr")
    assert loaded.lora_enabled
    loaded_adapters = [
        v for v in loaded.trainable_weights if v.name.startswith("lora_")
    ]
    for v in loaded_adapters:
        assert v.regularizer == L2Penalty(0.1)
        v.assign(np.full(v.shape, 0.5))
    assert losses_sum(loaded) == pytest.approx(
        sum(0.1 * 0.25 * np.prod(v.shape) for v in loaded_adapters), rel=1e-5
    )


def test_integer_quantized_kernel_is_refused_unchanged():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="q")])
    model.layers[0].quantize("int8")
    with pytest.raises(ValueError, match="'q' \\(Dense\\) is int8-quantized"):
        regularize(model, kernel=L2Penalty(0.1))
    assert model.layers[0].kernel_regularizer is None
    assert model.losses == []
    # Its float bias can still carry a penalty, and LoRA adapters the kernel's.
    regularize(model, bias=L1Penalty(0.1))
    assert len(model.losses) == 1
    model.layers[0].enable_lora(2)
    regularize(model, kernel=L2Penalty(0.1))
    names = {v.name for v in model.trainable_weights if v.regularizer is not None}
    assert names == {"bias", "lora_kernel_a", "lora_kernel_b"}


def test_float8_quantized_kernel_is_regularized():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="q")])
    model.layers[0].quantize("float8")
    regularize(model, kernel=L2Penalty(0.1))
    assert losses_sum(model) == pytest.approx(
        0.1 * (to_np(model.layers[0].kernel) ** 2).sum(), rel=1e-5
    )
