"""The layer zoo: every weight-owning Keras layer through the whole post-hoc API.

One table row per layer (small, default arguments). For each: `regularize`
every role it has, `model.losses` against numpy, one train step against
Keras's own `evaluate`, `clone_model` with the same penalties, `REMOVE`,
`WeightDecay`, `weight_norms` (per gate where the layer has gates) and
`shrink_weights`. A layer without a role gets a clear error naming it.
Save/load runs for all rows in ONE fresh Python process per backend.
"""

import json
import re

import keras
import numpy as np
import pytest
from conftest import run_python
from keras import ops

from kerasreg import (
    REMOVE,
    L1Penalty,
    L2Penalty,
    WeightDecay,
    regularize,
    shrink_weights,
    weight_norms,
)
from kerasreg.selection import weight_paths

BACKEND = keras.backend.backend()

# role -> (penalty used here, variable names that carry it)
PENALTIES = {
    "kernel": L2Penalty(0.1),
    "recurrent": L1Penalty(0.05),
    "bias": L2Penalty(0.2),
}
ROLE_NAMES = {
    "kernel": {
        "kernel",
        "embeddings",
        "depthwise_kernel",
        "pointwise_kernel",
        "lora_kernel_a",
        "lora_kernel_b",
        "lora_embeddings_a",
        "lora_embeddings_b",
    },
    "recurrent": {"recurrent_kernel"},
    "bias": {"bias"},
}
KR = ("kernel", "bias")
KRB = ("kernel", "recurrent", "bias")


def seq(shape, layer, dtype="float32"):
    return keras.Sequential([keras.Input(shape, dtype=dtype), layer])


def attention(layer):
    q = keras.Input((4, 3))
    return keras.Model(q, layer(q, q))


def lora(layer, shape, dtype="float32"):
    model = seq(shape, layer, dtype)
    layer.enable_lora(2)
    return model


def quantized(mode):
    model = seq((4,), keras.layers.Dense(3, name="layer"))
    model.layers[0].quantize(mode)
    return model


# name: (builder, input shape, input kind, roles, gates of the gated weights)
ZOO = {
    "Dense": (lambda: seq((4,), keras.layers.Dense(3)), (4,), "float", KR, ""),
    "EinsumDense": (
        lambda: seq((4,), keras.layers.EinsumDense("ab,bc->ac", 3, bias_axes="c")),
        (4,), "float", KR, "",
    ),
    "Conv1D": (lambda: seq((6, 2), keras.layers.Conv1D(2, 3)), (6, 2), "float", KR, ""),
    "Conv2D": (lambda: seq((5, 5, 2), keras.layers.Conv2D(2, 3)), (5, 5, 2), "float", KR, ""),
    "Conv3D": (lambda: seq((3, 3, 3, 1), keras.layers.Conv3D(2, 2)), (3, 3, 3, 1), "float", KR, ""),
    "Conv1DTranspose": (
        lambda: seq((4, 2), keras.layers.Conv1DTranspose(2, 3)), (4, 2), "float", KR, "",
    ),
    "Conv2DTranspose": (
        lambda: seq((3, 3, 2), keras.layers.Conv2DTranspose(2, 2)), (3, 3, 2), "float", KR, "",
    ),
    "Conv3DTranspose": (
        lambda: seq((2, 2, 2, 1), keras.layers.Conv3DTranspose(2, 2)),
        (2, 2, 2, 1), "float", KR, "",
    ),
    "DepthwiseConv1D": (
        lambda: seq((6, 2), keras.layers.DepthwiseConv1D(3)), (6, 2), "float", KR, "",
    ),
    "DepthwiseConv2D": (
        lambda: seq((5, 5, 2), keras.layers.DepthwiseConv2D(3)), (5, 5, 2), "float", KR, "",
    ),
    "SeparableConv1D": (
        lambda: seq((6, 2), keras.layers.SeparableConv1D(2, 3)), (6, 2), "float", KR, "",
    ),
    "SeparableConv2D": (
        lambda: seq((5, 5, 2), keras.layers.SeparableConv2D(2, 3)), (5, 5, 2), "float", KR, "",
    ),
    "Embedding": (
        lambda: seq((4,), keras.layers.Embedding(7, 3), "int32"), (4,), "int", ("kernel",), "",
    ),
    "SimpleRNN": (lambda: seq((4, 2), keras.layers.SimpleRNN(3)), (4, 2), "float", KRB, ""),
    "GRU": (lambda: seq((4, 2), keras.layers.GRU(3)), (4, 2), "float", KRB, "zrh"),
    "LSTM": (lambda: seq((4, 2), keras.layers.LSTM(3)), (4, 2), "float", KRB, "ifco"),
    "RNN(SimpleRNNCell)": (
        lambda: seq((4, 2), keras.layers.RNN(keras.layers.SimpleRNNCell(3))),
        (4, 2), "float", KRB, "",
    ),
    "RNN(GRUCell)": (
        lambda: seq((4, 2), keras.layers.RNN(keras.layers.GRUCell(3))),
        (4, 2), "float", KRB, "zrh",
    ),
    "RNN(LSTMCell)": (
        lambda: seq((4, 2), keras.layers.RNN(keras.layers.LSTMCell(3))),
        (4, 2), "float", KRB, "ifco",
    ),
    "ConvLSTM1D": (
        lambda: seq((2, 5, 1), keras.layers.ConvLSTM1D(2, 3)), (2, 5, 1), "float", KRB, "ifco",
    ),
    "ConvLSTM2D": (
        lambda: seq((2, 4, 4, 1), keras.layers.ConvLSTM2D(2, 3)),
        (2, 4, 4, 1), "float", KRB, "ifco",
    ),
    "ConvLSTM3D": (
        lambda: seq((2, 3, 3, 3, 1), keras.layers.ConvLSTM3D(1, 2)),
        (2, 3, 3, 3, 1), "float", KRB, "ifco",
    ),
    "Bidirectional(LSTM)": (
        lambda: seq((4, 2), keras.layers.Bidirectional(keras.layers.LSTM(2))),
        (4, 2), "float", KRB, "ifco",
    ),
    "TimeDistributed(Dense)": (
        lambda: seq((3, 4), keras.layers.TimeDistributed(keras.layers.Dense(2))),
        (3, 4), "float", KR, "",
    ),
    "MultiHeadAttention": (
        lambda: attention(keras.layers.MultiHeadAttention(2, 2)), (4, 3), "float", KR, "",
    ),
    "GroupQueryAttention": (
        lambda: attention(keras.layers.GroupQueryAttention(2, 2, 1)),
        (4, 3), "float", KR, "",
    ),
    "BatchNormalization": (
        lambda: seq((4,), keras.layers.BatchNormalization()), (4,), "float", (), "",
    ),
    "LayerNormalization": (
        lambda: seq((4,), keras.layers.LayerNormalization()), (4,), "float", (), "",
    ),
    "Dense+LoRA": (lambda: lora(keras.layers.Dense(3), (4,)), (4,), "float", KR, ""),
    "EinsumDense+LoRA": (
        lambda: lora(keras.layers.EinsumDense("ab,bc->ac", 3, bias_axes="c"), (4,)),
        (4,), "float", KR, "",
    ),
    "Embedding+LoRA": (
        lambda: lora(keras.layers.Embedding(7, 3), (4,), "int32"),
        (4,), "int", ("kernel",), "",
    ),
    "Dense(float8)": (lambda: quantized("float8"), (4,), "float", KR, ""),
    "Dense(int8)": (lambda: quantized("int8"), (4,), "float", ("bias",), ""),
}  # fmt: skip


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def make(name):
    builder, shape, kind, roles, gates = ZOO[name]
    keras.utils.set_random_seed(0)
    model = builder()
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:  # nonzero everywhere (LoRA's b starts at 0)
        v.assign(rng.uniform(-1, 1, size=v.shape).astype(v.dtype))
    if kind == "int":
        x = rng.integers(0, 7, size=(4, *shape)).astype("int32")
    else:
        x = rng.normal(size=(4, *shape)).astype("float32")
    y = np.asarray(ops.convert_to_numpy(model(x)))
    y = (y + rng.normal(size=y.shape)).astype("float32")
    return model, x, y, roles, gates


def numpy_penalty(model, roles):
    """Sum of each role's penalty over the trainable weights that carry it."""
    total = 0.0
    for role in roles:
        factor = PENALTIES[role]
        for v in model.trainable_weights:
            if v.name in ROLE_NAMES[role]:
                w = to_np(v)
                if role == "recurrent":
                    total += factor.l1 * np.abs(w).sum()
                else:
                    total += factor.l2 * (w**2).sum()
    return total


def losses_sum(model):
    return float(sum(to_np(x) for x in model.losses))


def regularizers_by_path(model):
    paths = weight_paths(model)
    return {
        paths[id(v)]: keras.regularizers.serialize(v.regularizer)
        for v in model.weights
        if v.regularizer is not None
    }


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_layer_through_the_post_hoc_api(name):
    model, x, y, roles, gates = make(name)
    layer_name = model.layers[-1].name
    if "kernel" not in roles:
        with pytest.raises(ValueError, match=re.escape(layer_name)):
            regularize(model, kernel=L2Penalty(0.1))
        assert model.losses == []
    # Keras 3.15's float8 Dense cannot train eagerly on TF (its custom gradient);
    # JAX runs small models much faster compiled than op by op.
    eager = not name.endswith("(float8)") and BACKEND != "jax"
    quantized_row = name.endswith("8)")
    selected = [v for v in model.trainable_weights if len(v.shape) >= 2]
    selected = [v for v in selected if v.name != "bias"]  # the default where=
    if roles:
        regularize(model, **{role: PENALTIES[role] for role in roles})
        expected = numpy_penalty(model, roles)
        assert expected > 0
        assert losses_sum(model) == pytest.approx(expected, rel=1e-5)

    # One train step with WeightDecay(0.5): SGD(0) keeps the gradient step out,
    # so its loss is Keras's own evaluate of the same weights (penalty included)
    # and the decay is exactly w * 0.5.
    model.compile(keras.optimizers.SGD(0.0), "mse", run_eagerly=eager)
    before = model.evaluate(x, y, batch_size=4, verbose=0)
    w0 = [to_np(v) for v in selected]
    callbacks = [WeightDecay(0.5)] if selected else []
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=callbacks)
    if not name.startswith("BatchNormalization"):  # BN trains on batch statistics
        assert history.history["loss"][0] == pytest.approx(before, rel=1e-5)
    for v, w in zip(selected, w0, strict=True):
        np.testing.assert_allclose(to_np(v), 0.5 * w, rtol=1e-6, atol=1e-7)

    if roles:
        if not quantized_row:  # clone_model does not carry Keras's quantized state
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
            assert regularizers_by_path(clone) == regularizers_by_path(model)
            assert losses_sum(clone) == pytest.approx(losses_sum(model), rel=1e-6)
        regularize(model, **{role: REMOVE for role in roles})
        assert model.losses == []
        assert regularizers_by_path(model) == {}

    if not selected:
        return
    paths = weight_paths(model)
    norms = weight_norms(model, per_gate=bool(gates))
    assert set(norms) == {paths[id(v)] for v in selected}
    for v in selected:
        w = to_np(v)
        stats = norms[paths[id(v)]]
        assert stats["l2"] == pytest.approx(np.sqrt((w**2).sum()), rel=1e-5)
        assert stats["l1"] == pytest.approx(np.abs(w).sum(), rel=1e-5)
        if gates and w.shape[-1] % len(gates) == 0 and "/gate_" in str(stats):
            units = w.shape[-1] // len(gates)
            for k, gate in enumerate(gates):
                block = w[..., k * units : (k + 1) * units]
                assert stats[f"l2/gate_{gate}"] == pytest.approx(
                    np.sqrt((block**2).sum()), rel=1e-5
                )
    if gates:
        assert any("/gate_" in k for stats in norms.values() for k in stats)

    w1 = [to_np(v) for v in selected]
    shrink_weights(model, 0.5)
    for v, w in zip(selected, w1, strict=True):
        np.testing.assert_allclose(to_np(v), 0.5 * w, rtol=1e-6, atol=1e-7)


def test_zoo_integer_quantized_kernel_error_names_the_layer():
    model = quantized("int8")
    with pytest.raises(ValueError, match="'layer' \\(Dense\\) is int8-quantized"):
        regularize(model, kernel=L2Penalty(0.1))


LOAD_ALL = """
import json, sys
import keras
import kerasreg
from kerasreg.selection import weight_paths
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = keras.saving.load_model(path)
    paths = weight_paths(model)
    out[name] = {
        "regularizers": {
            paths[id(v)]: keras.regularizers.serialize(v.regularizer)
            for v in model.weights if v.regularizer is not None
        },
        "losses": float(sum(
            float(keras.ops.convert_to_numpy(x)) for x in model.losses
        )),
    }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_zoo_save_load_in_one_fresh_process(tmp_path):
    """Every row with roles: saved here, loaded in a fresh process, same penalties."""
    files, expected = {}, {}
    for name, (_, _, _, roles, _) in ZOO.items():
        if not roles:
            continue
        model, *_ = make(name)
        regularize(model, **{role: PENALTIES[role] for role in roles})
        path = tmp_path / f"{len(files)}.keras"
        model.save(path)
        files[name] = str(path)
        expected[name] = (regularizers_by_path(model), losses_sum(model))
    code = LOAD_ALL.replace("sys.argv[1]", repr(json.dumps(files)))
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    loaded = json.loads(line[len("RESULT") :])
    for name, (regularizers, losses) in expected.items():
        assert loaded[name]["regularizers"] == json.loads(json.dumps(regularizers)), (
            name
        )
        if "LoRA" not in name:  # Keras merges LoRA adapters into the kernel on save
            assert loaded[name]["losses"] == pytest.approx(losses, rel=1e-5), name
