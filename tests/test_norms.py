"""`weight_norms` against numpy formulas computed from the weights themselves."""

import keras
import numpy as np
import pytest
from conftest import np_penalty, np_stats, np_weights
from keras import ops

import kerasreg
from kerasreg import norms as norms_module
from kerasreg import weight_norms
from kerasreg.selection import weight_paths


def key(model, variable):
    """The key `weight_norms` reports `variable` under (its save/load-stable path)."""
    return weight_paths(model)[id(variable)]


def assert_matches(stats, variable, threshold=1e-8, rel=1e-5):
    w = np_weights(variable)
    expected = np_stats(w, threshold)
    expected["penalty"] = np_penalty(variable.regularizer, w)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=rel, abs=1e-7), name


def assert_gates_match(stats, w, gates, path):
    """Per-gate statistics against numpy on Keras's column blocks."""
    units = w.shape[-1] // len(gates)
    for k, gate in enumerate(gates):
        block = w[..., k * units : (k + 1) * units]
        for name, value in np_stats(block).items():
            key = f"{name}/gate_{gate}"
            assert stats[key] == pytest.approx(value, rel=1e-5), (path, key)


def dense_conv_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(
                3, 3, kernel_regularizer=kerasreg.L1Penalty(0.02), name="conv"
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(
                5,
                kernel_regularizer=keras.regularizers.L1L2(0.01, 0.03),
                bias_regularizer=kerasreg.L2Penalty(0.5),
                name="hidden",
            ),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )


def recurrent_model(reset_after=True):
    inputs = keras.Input((4, 3))
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(
            5,
            return_sequences=True,
            kernel_regularizer=kerasreg.L2Penalty(0.1),
            recurrent_regularizer=kerasreg.L1Penalty(0.03),
        ),
        name="bi",
    )(inputs)
    x = keras.layers.GRU(2, reset_after=reset_after, name="gru")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x), name="rnn")


def test_every_statistic_matches_numpy():
    model = dense_conv_model()
    for variable in model.weights:  # non-zero biases, so all entries matter
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    result = weight_norms(model, where=lambda v: True)
    assert list(result) == [key(model, v) for v in model.weights]
    for variable in model.weights:
        stats = result[key(model, variable)]
        assert set(stats) == {
            "l1", "l2", "linf", "zero_fraction", "penalty", "trainable"
        }  # fmt: skip
        assert_matches(stats, variable)
    # A weight without regularizer reports penalty 0.0.
    assert result["out/kernel"]["penalty"] == 0.0
    assert result["hidden/bias"]["penalty"] > 0


def test_default_selection_and_regex():
    model = dense_conv_model()
    assert list(weight_norms(model)) == [
        "conv/kernel",
        "hidden/kernel",
        "out/kernel",
    ]
    assert list(weight_norms(model, "bias$")) == [
        "conv/bias",
        "hidden/bias",
        "out/bias",
    ]


def test_zero_fraction_counts_entries_below_threshold():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    kernel = model.layers[0].kernel
    w = np.full((4, 5), 0.5, dtype="float32")
    w[0, :] = 0.0  # 5 exact zeros
    w[1, :2] = 1e-9  # 2 below the default threshold
    w[2, :3] = 1e-4  # 3 below 1e-3 only
    kernel.assign(w)
    assert weight_norms(model)[key(model, kernel)]["zero_fraction"] == pytest.approx(
        7 / 20
    )
    coarse = weight_norms(model, zero_threshold=1e-3)[key(model, kernel)]
    assert coarse["zero_fraction"] == pytest.approx(10 / 20)
    assert (
        weight_norms(model, zero_threshold=0)[key(model, kernel)]["zero_fraction"] == 0
    )


@pytest.mark.parametrize("reset_after", [True, False])
def test_per_gate_blocks_follow_keras_column_order(reset_after):
    model = recurrent_model(reset_after)
    rng = np.random.default_rng(3)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape))
    result = weight_norms(model, where=lambda v: True, per_gate=True)
    gated = {
        "bi/forward_lstm/lstm_cell/kernel": "ifco",
        "bi/forward_lstm/lstm_cell/recurrent_kernel": "ifco",
        "bi/forward_lstm/lstm_cell/bias": "ifco",
        "bi/backward_lstm/lstm_cell/kernel": "ifco",
        "bi/backward_lstm/lstm_cell/recurrent_kernel": "ifco",
        "gru/gru_cell/kernel": "zrh",
        "gru/gru_cell/recurrent_kernel": "zrh",
        "gru/gru_cell/bias": "zrh",  # (2, 6) with reset_after, else (6,)
    }
    by_path = {key(model, v): v for v in model.weights}
    for path, gates in gated.items():
        variable = by_path[path]
        w = np_weights(variable)
        assert_matches(result[path], variable)
        assert_gates_match(result[path], w, gates, path)
    assert not any("/gate_" in name for name in result["out/kernel"])


def test_lstm_input_and_recurrent_penalties_are_separate():
    model = recurrent_model()
    result = weight_norms(model)
    for direction in ("forward", "backward"):
        kernel = f"bi/{direction}_lstm/lstm_cell/kernel"
        recurrent = f"bi/{direction}_lstm/lstm_cell/recurrent_kernel"
        by_path = {key(model, v): v for v in model.weights}
        w_in, w_rec = np_weights(by_path[kernel]), np_weights(by_path[recurrent])
        assert result[kernel]["penalty"] == pytest.approx(0.1 * (w_in**2).sum())
        assert result[recurrent]["penalty"] == pytest.approx(0.03 * abs(w_rec).sum())
    # The sum over regularized weights is exactly Keras's regularization loss.
    keras_total = float(sum(ops.convert_to_numpy(loss) for loss in model.losses))
    ours = sum(stats["penalty"] for stats in result.values())
    assert ours == pytest.approx(keras_total, rel=1e-6)


def test_extreme_magnitudes_and_zeros_next_to_ordinary_weights():
    # One computation holds weights on the fast path and weights that need
    # the second pass: a float32 sum of squares that overflows (1e25**2),
    # squares that underflow (1e-22**2), exact zeros in one gate only.
    model = recurrent_model()
    rng = np.random.default_rng(11)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape))
    by_path = {key(model, v): v for v in model.weights}
    huge = by_path["bi/forward_lstm/lstm_cell/kernel"]
    tiny = by_path["bi/backward_lstm/lstm_cell/recurrent_kernel"]
    sparse = by_path["gru/gru_cell/kernel"]
    huge.assign(rng.normal(size=huge.shape) * 1e25)
    tiny.assign(rng.normal(size=tiny.shape) * 1e-22)
    w = np_weights(sparse).copy()
    w[:3, 2:4] = 0.0  # GRU gate "r" holds columns 2:4 (2 units)
    sparse.assign(w)
    for per_gate in (False, True):
        result = weight_norms(model, where=lambda v: True, per_gate=per_gate)
        for variable in model.weights:
            w = np_weights(variable)
            stats = result[key(model, variable)]
            for name, value in np_stats(w).items():
                assert stats[name] == pytest.approx(value, rel=1e-5), (
                    key(model, variable),
                    name,
                )
            gates = norms_module.gate_layout(model).get(id(variable), ())
            if per_gate and gates:
                assert_gates_match(stats, w, gates, key(model, variable))
        size = int(np.prod(sparse.shape))
        assert result[key(model, sparse)]["zero_fraction"] == pytest.approx(6 / size)
        # Keras adds sum(w**2) in float32 for the huge kernel: inf, as reported.
        assert result[key(model, huge)]["penalty"] == float("inf")
        assert result[key(model, tiny)]["penalty"] == pytest.approx(
            0.03 * np.abs(np_weights(tiny)).sum(), rel=1e-5
        )


def test_linear_penalties_match_their_own_formula():
    # L1, L2 and elastic-net penalties are read off the norm sums; any other
    # regularizer (or a subclass) is called as Keras calls it.
    class Doubled(kerasreg.L2Penalty):
        def __call__(self, x):
            return 2.0 * super().__call__(x)

    regularizers = [
        kerasreg.L1Penalty(0.3),
        kerasreg.L2Penalty(0.2),
        kerasreg.ElasticNetPenalty(0.1, 0.4),
        kerasreg.ExpAbsPenalty(0.05),
        keras.regularizers.L1(0.3),
        keras.regularizers.L2(0.2),
        keras.regularizers.L1L2(0.0, 0.7),
        keras.regularizers.L1L2(0.1, 0.4),
        Doubled(0.2),
    ]
    model = keras.Sequential(
        [keras.Input((3,))]
        + [keras.layers.Dense(3, kernel_regularizer=r) for r in regularizers]
    )
    rng = np.random.default_rng(2)
    for layer in model.layers:
        layer.kernel.assign(rng.normal(size=(3, 3)))
    result = weight_norms(model)
    for layer, regularizer in zip(model.layers, regularizers, strict=True):
        w = np_weights(layer.kernel)
        l1, l2 = np.abs(w).sum(), (w**2).sum()
        expected = {
            "L1Penalty": 0.3 * l1,
            "L2Penalty": 0.2 * l2,
            "ElasticNetPenalty": 0.1 * l1 + 0.4 * l2,
            "ExpAbsPenalty": 0.05 * np.expm1(np.abs(w)).sum(),
            "L1": 0.3 * l1,
            "L2": 0.2 * l2,
            "L1L2": regularizer.l1 * l1 + regularizer.l2 * l2
            if isinstance(regularizer, keras.regularizers.L1L2)
            else None,
            "Doubled": 0.4 * l2,
        }[type(regularizer).__name__]
        stats = result[key(model, layer.kernel)]
        assert stats["penalty"] == pytest.approx(expected, rel=1e-5), regularizer


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_accumulate_in_float32(dtype):
    model = keras.Sequential(
        [keras.Input((200,)), keras.layers.Dense(200, dtype=dtype, use_bias=False)]
    )
    kernel = model.layers[0].kernel
    rng = np.random.default_rng(5)
    kernel.assign(rng.uniform(100, 200, size=(200, 200)) * rng.choice([-1, 1]))
    # float16 overflows at 65504: a float16 sum |w| or sum w**2 would be inf.
    stats = weight_norms(model)[key(model, kernel)]
    assert np.isfinite(list(stats.values())).all()
    assert_matches(stats, kernel, rel=1e-4)


class CountingL2(kerasreg.L2Penalty):
    """An `L2Penalty` that records each run of its Python body in `calls`.

    A public hook on tracing: on TensorFlow and JAX `weight_norms` runs a
    compiled program, and the regularizer's Python body runs only while that
    program is traced, so `len(calls)` counts traces. On PyTorch the
    computation is eager (no program to re-trace) and the body runs on every
    call. A subclass, so `weight_norms` calls it instead of summing `w**2`.
    """

    def __init__(self, l2, calls):
        super().__init__(l2)
        self.calls = calls

    def __call__(self, x):
        self.calls.append(1)
        return super().__call__(x)


def body_runs(programs, calls):
    """Expected runs of a `CountingL2` body after `calls` calls of
    `weight_norms` that built `programs` programs: one per trace when compiled
    (TensorFlow, JAX), one per call when eager (PyTorch)."""
    if keras.backend.backend() in ("tensorflow", "jax"):
        return programs
    return calls


def test_values_follow_weight_updates_and_regularizer_changes():
    model = dense_conv_model()
    calls = []
    model.get_layer("out").kernel.regularizer = CountingL2(0.2, calls)
    first = weight_norms(model)
    kernel = model.get_layer("hidden").kernel
    kernel.assign(kernel * 2.0)
    second = weight_norms(model)
    # Not re-traced for new weight values, yet the values are the new ones.
    assert len(calls) == body_runs(1, 2)
    assert second[key(model, kernel)]["l2"] == pytest.approx(
        2 * first[key(model, kernel)]["l2"]
    )
    for variable in model.weights:
        if variable.ndim >= 2:
            assert_matches(second[key(model, variable)], variable)
    kernel.regularizer = kerasreg.L2Penalty(1.0)
    third = weight_norms(model)
    assert len(calls) == body_runs(2, 3)  # a new regularizer: a new program
    assert_matches(third[key(model, kernel)], kernel)


def test_invalid_arguments_raise_naming_them():
    model = dense_conv_model()
    with pytest.raises(TypeError, match="per_gate"):
        weight_norms(model, per_gate="yes")
    with pytest.raises(ValueError, match="zero_threshold"):
        weight_norms(model, zero_threshold=-1)
    with pytest.raises(ValueError, match="selects no weight"):
        weight_norms(model, "nothing-matches")
    with pytest.raises(ValueError, match="regular expression"):
        weight_norms(model, "(")


# --- issue 16: float64, cache per selection, ConvLSTM gates, frozen weights --


def test_float64_weights_match_numpy_and_shrink(tmp_path):
    """Item 7: float64 models on every path, the scaled-l2 one included."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                4, dtype="float64", kernel_regularizer=kerasreg.L2Penalty(0.1)
            ),
            keras.layers.Dense(2, dtype="float64", name="big"),
        ]
    )
    kernel = model.layers[0].kernel
    assert_matches(weight_norms(model)[key(model, kernel)], kernel)
    big = model.get_layer("big").kernel
    big.assign(np.full((4, 2), 1e30))  # squares overflow float32: scaled path
    stats = weight_norms(model)[key(model, big)]
    assert stats["l2"] == pytest.approx(1e30 * np.sqrt(8), rel=1e-5)
    w0 = np_weights(kernel)
    report = kerasreg.shrink_weights(model, 0.5)
    np.testing.assert_allclose(np_weights(kernel), 0.5 * w0, rtol=1e-12)
    assert report[key(model, kernel)]["after"] == pytest.approx(
        0.5 * np.sqrt((w0**2).sum()), rel=1e-6
    )


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")
def test_float64_weights_come_back_in_float64(rng):
    """Statistics in the weight's own precision: float64 weights to float64
    rounding (a float32 result would be off by ~1e-8 relative), next to a
    float32 weight in the same model (one vector per precision), per gate too."""
    inputs = keras.Input((3, 2))
    x = keras.layers.LSTM(2, dtype="float64", name="lstm")(inputs)
    x = keras.layers.Dense(
        5,
        dtype="float64",
        kernel_regularizer=kerasreg.ElasticNetPenalty(0.3, 0.7),
        name="wide",
    )(x)
    outputs = keras.layers.Dense(
        1, kernel_regularizer=kerasreg.L2Penalty(0.1), name="narrow"
    )(x)
    model = keras.Model(inputs, outputs)
    for variable in model.weights:
        values = rng.normal(size=variable.shape) * np.pi  # not float32-representable
        values.reshape(-1)[::7] = 0.0  # zero fractions such as 2/10, 3/15 too
        variable.assign(values.astype(variable.dtype))
    stats = weight_norms(model, per_gate=True)
    for variable in model.weights:
        path = key(model, variable)
        if path not in stats:
            continue
        w = np_weights(variable)
        expected = np_stats(w)
        expected["penalty"] = np_penalty(variable.regularizer, w)
        # float64 weights: float64 results; float32 ones: float32 results.
        rel = 1e-13 if is_float64(variable) else 1e-6
        for name, value in expected.items():
            assert stats[path][name] == pytest.approx(value, rel=rel, abs=0), (
                path,
                name,
            )
        if is_float64(variable) and path.startswith("lstm/"):
            units = w.shape[-1] // 4
            for k, gate in enumerate("ifco"):
                block = np_stats(w[..., k * units : (k + 1) * units])
                assert stats[path][f"l2/gate_{gate}"] == pytest.approx(
                    block["l2"], rel=1e-13, abs=0
                )
                assert stats[path][f"l1/gate_{gate}"] == pytest.approx(
                    block["l1"], rel=1e-13, abs=0
                )
                assert stats[path][f"zero_fraction/gate_{gate}"] == pytest.approx(
                    block["zero_fraction"], rel=1e-13, abs=0
                )
    assert any(v.dtype == "float32" for v in model.weights)
    # JAX without `jax_enable_x64` holds float64 weights as float32 (a warning
    # from Keras says so): there are no float64 values to measure.
    assert any(is_float64(v) for v in model.weights) or keras.backend.backend() == "jax"


def is_float64(variable):
    """Whether the variable's value really is float64 (not on JAX without x64)."""
    return keras.backend.standardize_dtype(variable.value.dtype) == "float64"


def test_float64_model_trains_with_weight_norm_logger(tmp_path):
    """Item 7: a whole float64 model (floatx), trained with the logger attached."""
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    # Keras caches float32 state across floatx changes.
    keras.utils.clear_session(free_memory=False)
    try:
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, kernel_regularizer=kerasreg.L2Penalty(0.1)),
            ]
        )
        model.compile(keras.optimizers.SGD(0.01), "mse")
        logger = kerasreg.WeightNormLogger(str(tmp_path / "logs"))
        model.fit(np.ones((4, 3)), np.ones((4, 4)), verbose=0, callbacks=[logger])
    finally:
        keras.config.set_floatx(floatx)
    assert any((tmp_path / "logs" / "train").iterdir())


def test_alternating_selections_compile_once_each(monkeypatch):
    """Item 9: two selections used in turn keep one compiled program each."""
    model = dense_conv_model()
    calls = {name: [] for name in ("conv", "hidden", "out")}
    for name, made in calls.items():
        model.get_layer(name).kernel.regularizer = CountingL2(0.1, made)
    for _ in range(3):
        conv = weight_norms(model, "conv")
        hidden = weight_norms(model, "hidden")
    assert len(calls["conv"]) == len(calls["hidden"]) == body_runs(1, 3)
    assert_matches(conv[key(model, model.get_layer("conv").kernel)],
                   model.get_layer("conv").kernel)  # fmt: skip
    assert_matches(hidden[key(model, model.get_layer("hidden").kernel)],
                   model.get_layer("hidden").kernel)  # fmt: skip
    monkeypatch.setattr(norms_module, "CACHE_SIZE", 2)  # bounded: oldest dropped
    weight_norms(model, "out")  # drops "conv", the least recently used
    weight_norms(model, "conv")  # traced again; drops "hidden"
    assert len(calls["conv"]) == body_runs(2, 4)
    weight_norms(model, "hidden")  # traced again; drops "out"
    assert len(calls["hidden"]) == body_runs(2, 4)
    weight_norms(model, "conv")  # still cached: at most 2 kept, the newest
    assert len(calls["conv"]) == body_runs(2, 5)
    assert len(calls["out"]) == body_runs(1, 1)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (keras.layers.ConvLSTM1D(2, 3, name="clstm"), (3, 6, 2)),
        (keras.layers.ConvLSTM2D(2, 3, name="clstm"), (3, 5, 5, 1)),
    ],
)
def test_conv_lstm_per_gate_follows_keras_channel_order(layer, shape):
    """Item 10: ConvLSTM kernels hold i, f, c, o blocks of `filters` channels."""
    model = keras.Sequential([keras.Input(shape), layer])
    rng = np.random.default_rng(5)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape))
    result = weight_norms(model, where=lambda v: True, per_gate=True)
    for variable in model.weights:
        path = key(model, variable)
        assert_matches(result[path], variable)
        assert_gates_match(result[path], np_weights(variable), "ifco", path)


def test_frozen_weights_report_their_penalty_marked_not_trainable():
    """Item 13: reported, marked, and the trainable ones sum to `model.losses`."""
    model = dense_conv_model()
    conv, hidden = model.get_layer("conv"), model.get_layer("hidden")
    conv.trainable = False
    result = weight_norms(model, [conv.kernel, hidden.kernel, hidden.bias])
    frozen = result[key(model, conv.kernel)]
    assert frozen["trainable"] is False
    assert frozen["penalty"] == pytest.approx(
        0.02 * np.abs(np_weights(conv.kernel)).sum(), rel=1e-5
    )
    in_loss = sum(s["penalty"] for s in result.values() if s["trainable"])
    keras_adds = sum(float(ops.convert_to_numpy(x)) for x in model.losses)
    assert in_loss == pytest.approx(keras_adds, rel=1e-5)
    conv.trainable = True
    assert weight_norms(model, [conv.kernel])[key(model, conv.kernel)]["trainable"]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's retracing detector"
)
def test_many_models_measured_and_shrunk_log_no_retracing():
    """TensorFlow counts traces per code object: one `tf.function` per program
    (per model) looked like one function retraced and logged "triggered
    tf.function retracing" after a few models. Each program, in-place update
    and summary writer is now traced once and called as a concrete function."""
    import logging
    import tempfile

    from conftest import _RetracingRecords, kerasreg_function_named

    from kerasreg.summaries import RunWriter

    records = _RetracingRecords()
    logging.getLogger("tensorflow").addHandler(records)
    try:
        for n in range(8):
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(n + 1)])
            weight_norms(model)
            kerasreg.shrink_weights(model, 0.5)
        with tempfile.TemporaryDirectory() as folder:
            writer = RunWriter(folder)
            for n in range(8):  # a new tag set each time: compiled on its 2nd write
                for step in range(2):
                    writer.write(step, {f"tag{k}": 1.0 for k in range(n + 1)})
            writer.close()
    finally:
        logging.getLogger("tensorflow").removeHandler(records)
    assert records.messages == []
    # The conftest fixture would have named these kerasreg functions:
    assert (
        kerasreg_function_named(
            "5 out of the last 9 calls to <bound method _NormProgram.compute of "
            "<kerasreg.norms._NormProgram object at 0x7f>> triggered tf.function "
            "retracing."
        )
        == "kerasreg.norms._NormProgram.compute"
    )
    assert (
        kerasreg_function_named(
            "5 out of the last 9 calls to <function _tensorflow_update.<locals>.update "
            "at 0x7f> triggered tf.function retracing."
        )
        == "kerasreg.inplace._tensorflow_update.<locals>.update"
    )
    assert (
        kerasreg_function_named(
            "5 out of the last 9 calls to <function TensorFlowTrainer.make_predict_"
            "function.<locals>.multi_step_on_data at 0x7f> triggered tf.function "
            "retracing."
        )
        is None
    )
