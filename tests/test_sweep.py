"""`kerasreg.sweep`: K variants in one stacked fit equal K separate fits.

References are independent of `sweep`: each variant's separate fit is a model
built with Keras's own `kernel_regularizer`/`bias_regularizer` arguments,
given the template's weights and compiled like it; penalties are checked
against numpy formulas; TensorBoard files are read back with TensorBoard's
own reader.
"""

from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

import kerasreg
from kerasreg.sweep import engines, mapped
from tests.conftest import run_python

TORCH = keras.backend.backend() == "torch"
RTOL, ATOL = 2e-5, 2e-6
PENALTIES = [
    None,
    kerasreg.L2Penalty(1e-2),
    {"kernel": kerasreg.L1Penalty(1e-3), "bias": kerasreg.L2Penalty(1e-2)},
]


def build(kernel=None, bias=None, *, name="net"):
    """The test network, with Keras's own regularizer arguments."""
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                8, "tanh", kernel_regularizer=kernel, bias_regularizer=bias
            ),
            keras.layers.Dense(
                1, "sigmoid", kernel_regularizer=kernel, bias_regularizer=bias
            ),
        ],
        name=name,
    )


def data(n=48, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x[:, :1] + 0.5 * x[:, 1:2] > 0).astype("float32")
    return x, y


def optimizer(kind):
    return {
        "sgd": lambda: keras.optimizers.SGD(0.1),
        "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(0.01),
        "adam_clipnorm": lambda: keras.optimizers.Adam(0.01, clipnorm=0.05),
    }[kind]()


def metrics(engine="vectorized"):
    # AUC is not a per-sample mean: it sends the sweep to its general engine.
    if engine == "stacked":
        return ["accuracy", keras.metrics.AUC(name="auc")]
    return ["accuracy"]


def template(kind="adam", engine="vectorized", **compile_kwargs):
    model = build()
    model.compile(
        optimizer=optimizer(kind),
        loss="binary_crossentropy",
        metrics=metrics(engine),
        **compile_kwargs,
    )
    return model


def separate_fit(
    model, penalty, kind, x, y, compile_kwargs=None, engine="vectorized", **fit_kwargs
):
    """A plain Keras fit of the template's architecture and weights with `penalty`."""
    roles = penalty if isinstance(penalty, dict) else {"kernel": penalty}
    reference = build(roles.get("kernel"), roles.get("bias"))
    reference.set_weights(model.get_weights())
    reference.compile(
        optimizer=optimizer(kind),
        loss="binary_crossentropy",
        metrics=metrics(engine),
        **(compile_kwargs or {}),
    )
    history = reference.fit(x, y, **fit_kwargs).history
    return history, reference.get_weights()


def assert_same_fit(row, model, history, weights):
    assert set(row["history"]) == set(history)
    for key, values in history.items():
        np.testing.assert_allclose(
            row["history"][key], values, rtol=RTOL, atol=ATOL, err_msg=key
        )
        assert row[key] == row["history"][key][-1]
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.slow  # one sweep and two traced reference fits per case
@pytest.mark.parametrize(
    "kind, engine",
    [
        ("sgd", "vectorized"),
        ("momentum", "vectorized"),
        ("adam", "vectorized"),
        ("momentum", "stacked"),
        ("adam", "stacked"),
    ],
)
def test_each_variant_equals_a_separate_fit(kind, engine):
    x, y = data()
    model = template(kind, engine)
    fit_kwargs = dict(
        epochs=2,
        batch_size=10,  # 48 points: a last batch of 8, weighted as Keras weighs it
        shuffle=False,
        validation_data=data(16, seed=4),
        verbose=0,
    )
    penalties = PENALTIES[1:]  # the baseline (None) is checked by the other tests
    result = kerasreg.sweep(model, penalties, x, y, engine=engine, **fit_kwargs)
    assert result.stacked and result.engine == engine
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        history, weights = separate_fit(
            model, penalty, kind, x, y, engine=engine, **fit_kwargs
        )
        assert_same_fit(row, trained, history, weights)


@pytest.mark.slow  # a sweep and two traced reference fits per engine
@pytest.mark.parametrize("engine", ["vectorized", "stacked"])
def test_training_loop_options_keep_equality(engine):
    # Per-variable clipnorm (the norm of each variant's own gradient),
    # gradient accumulation, several steps per call, a penalty without a
    # vector form.
    x, y = data()
    compile_kwargs = {} if TORCH else {"steps_per_execution": 3}
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(
            0.01, clipnorm=0.05, gradient_accumulation_steps=2
        ),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )
    penalties = [kerasreg.L2Penalty(1e-1), kerasreg.ExpAbsPenalty(1e-2)]
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    result = kerasreg.sweep(model, penalties, x, y, engine=engine, **fit_kwargs)
    assert result.engine == engine
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = build(penalty)
        reference.set_weights(model.get_weights())
        reference.compile(
            optimizer=keras.optimizers.Adam(
                0.01, clipnorm=0.05, gradient_accumulation_steps=2
            ),
            loss="binary_crossentropy",
            metrics=["accuracy"],
            **compile_kwargs,
        )
        history = reference.fit(x, y, **fit_kwargs).history
        assert_same_fit(row, trained, history, reference.get_weights())


def classifier(kernel=None, bias=None):
    """Three classes, softmax output, ReLU layer: the other common Dense chain."""
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(6, kernel_regularizer=kernel, bias_regularizer=bias),
            keras.layers.ReLU(),
            keras.layers.Dense(3, "softmax", kernel_regularizer=kernel),
        ],
        name="classifier",
    )


def classifier_compile(model, steps_per_execution):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 4, 0.7)
    adamw = keras.optimizers.AdamW(
        schedule, weight_decay=0.05, gradient_accumulation_steps=2
    )
    adamw.exclude_from_weight_decay(var_names=["bias"])
    model.compile(
        optimizer=adamw,
        loss=keras.losses.SparseCategoricalCrossentropy(reduction="sum"),
        metrics=[
            "sparse_categorical_accuracy",
            keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2"),
        ],
        steps_per_execution=steps_per_execution,
    )


@pytest.mark.slow  # a sweep and three traced reference fits
def test_vectorized_engine_with_the_options_that_change_the_loop():
    # AdamW with a schedule and name-based exclusion, gradient accumulation,
    # several steps per call, a loss summed (not averaged) over integer
    # labels, a ReLU layer and two metrics: still K separate fits.
    x, _ = data()
    labels = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32")
    spe = 1 if TORCH else 3
    model = classifier()
    classifier_compile(model, spe)
    penalties = [None, kerasreg.L2Penalty(3e-2), keras.regularizers.L1L2(1e-2, 1e-2)]
    fit_kwargs = dict(
        epochs=3,
        batch_size=8,
        shuffle=False,
        validation_data=(x[:16], labels[:16]),
        verbose=0,
    )
    result = kerasreg.sweep(model, penalties, x, labels, **fit_kwargs)
    assert result.engine == "vectorized"
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = classifier(penalty)
        reference.set_weights(model.get_weights())
        classifier_compile(reference, spe)
        history = reference.fit(x, labels, **fit_kwargs).history
        assert_same_fit(row, trained, history, reference.get_weights())


@pytest.mark.parametrize("engine", ["vectorized", "stacked"])
def test_sample_weights_are_weighed_as_separate_fits_weigh_them(engine):
    x, y = data()
    weights = np.linspace(0.2, 2.0, len(x)).astype("float32")
    model = template("adam")
    penalties = [None, kerasreg.L2Penalty(1e-2)]
    fit_kwargs = dict(
        epochs=2, batch_size=16, shuffle=False, sample_weight=weights, verbose=0
    )
    result = kerasreg.sweep(model, penalties, x, y, engine=engine, **fit_kwargs)
    assert result.engine == engine
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        history, final = separate_fit(model, penalty, "adam", x, y, **fit_kwargs)
        assert_same_fit(row, trained, history, final)


class SeededShuffle(keras.utils.PyDataset):
    """Batches in a new seeded random order every epoch."""

    def __init__(self, x, y, batch_size, seed):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


def test_shuffled_order_is_shared_and_equals_separate_fits():
    x, y = data()
    model = template("momentum")
    result = kerasreg.sweep(
        model,
        PENALTIES[:2],
        SeededShuffle(x, y, 10, seed=7),
        epochs=3,
        shuffle=False,  # Keras would also shuffle the batches' order
        verbose=0,
    )
    assert result.stacked
    for penalty, row, trained in zip(
        PENALTIES[:2], result.rows, result.models, strict=True
    ):
        history, weights = separate_fit(
            model,
            penalty,
            "momentum",
            SeededShuffle(x, y, 10, seed=7),
            None,
            epochs=3,
            shuffle=False,
            verbose=0,
        )
        assert_same_fit(row, trained, history, weights)


class Batches(keras.utils.PyDataset):
    """`(x, y)` in batches of 8: Keras shuffles their order with Python's
    `random` when `fit(shuffle=True)`."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // 8

    def __getitem__(self, index):
        return self.x[8 * index : 8 * index + 8], self.y[8 * index : 8 * index + 8]


@pytest.mark.parametrize(
    "chunk_size, kind", [(None, "arrays"), (1, "arrays"), (1, "PyDataset")]
)
def test_shuffle_true_uses_one_order_for_all_variants(chunk_size, kind):
    # Keras shuffles the data itself; variants with the same penalty then
    # follow the same trajectory only if they saw the same order, also when
    # each trains in a fit of its own (chunk_size=1: the first fit builds
    # what later ones reuse, and must not draw from the shuffling generator).
    x, y = data()
    model = template("sgd")
    penalty = kerasreg.L2Penalty(1e-2)
    given = (x, y) if kind == "arrays" else (Batches(x, y), None)
    result = kerasreg.sweep(
        model,
        [penalty, penalty, penalty],
        *given,
        epochs=3,
        batch_size=8 if kind == "arrays" else None,
        shuffle=True,
        verbose=0,
        chunk_size=chunk_size,
    )
    assert [row["penalty"] for row in result.rows] == [
        "L2Penalty_0.01",
        "L2Penalty_0.01_2",
        "L2Penalty_0.01_3",
    ]
    a, b, c = result.rows
    assert a["history"] == b["history"] == c["history"]
    for other in result.models[1:]:
        for wa, wb in zip(
            result.models[0].get_weights(), other.get_weights(), strict=True
        ):
            np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)
    unshuffled = kerasreg.sweep(
        model, [penalty], x, y, epochs=3, batch_size=8, shuffle=False, verbose=0
    )
    assert unshuffled.rows[0]["history"]["loss"] != a["history"]["loss"]


@pytest.mark.slow  # a fresh process loads the saved model
def test_template_is_untouched_and_models_carry_their_penalty(tmp_path):
    x, y = data()
    model = template("adam")
    before = [w.copy() for w in model.get_weights()]
    result = kerasreg.sweep(model, PENALTIES, x, y, epochs=1, batch_size=16, verbose=0)
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert all(layer.kernel_regularizer is None for layer in model.layers)
    assert model.name == "net" and all(m.name == "net" for m in result.models)

    trained = result.models[2]
    assert trained.layers[0].kernel_regularizer == kerasreg.L1Penalty(1e-3)
    assert trained.layers[1].bias_regularizer == kerasreg.L2Penalty(1e-2)
    assert result.models[0].layers[0].kernel_regularizer is None
    # The model's losses are the numpy penalties of its own final weights.
    kernels = [np.asarray(layer.kernel) for layer in trained.layers]
    biases = [np.asarray(layer.bias) for layer in trained.layers]
    expected = sum(1e-3 * np.abs(k).sum() for k in kernels) + sum(
        1e-2 * (b.astype("float64") ** 2).sum() for b in biases
    )
    got = sum(float(keras.ops.convert_to_numpy(v)) for v in trained.losses)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    path = tmp_path / "variant.keras"
    trained.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "p.npy", trained.predict(x, verbose=0))
    done = run_python(
        "import keras, numpy as np, kerasreg\n"
        f"m = keras.saving.load_model({str(path)!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"p = np.load({str(tmp_path / 'p.npy')!r})\n"
        "np.testing.assert_allclose(m.predict(x, verbose=0), p, rtol=1e-6)\n"
        "assert m.layers[0].kernel_regularizer == kerasreg.L1Penalty(1e-3)\n"
        "assert m.layers[1].bias_regularizer == kerasreg.L2Penalty(1e-2)\n"
        "print('ok', m.optimizer.__class__.__name__)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", "Adam"]


def test_global_norm_clipping_is_each_variants_own_norm(caplog):
    # One norm over all variables would couple the variants in a stack of
    # copies; the vectorized engine clips with each variant's own norm.
    x, y = data()
    model = build()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.1),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    penalties = [None, kerasreg.L2Penalty(1e-1)]
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(
            model, penalties, x, y, epochs=2, batch_size=16, shuffle=False, verbose=0
        )
    assert result.engine == "vectorized"
    with pytest.raises(ValueError, match=r"engine='stacked'.*global norm"):
        kerasreg.sweep(model, penalties, x, y, engine="stacked", epochs=1)
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = build(penalty)
        reference.set_weights(model.get_weights())
        reference.compile(
            optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.1),
            loss="binary_crossentropy",
            metrics=["accuracy"],
        )
        history = reference.fit(
            x, y, epochs=2, batch_size=16, shuffle=False, verbose=0
        ).history
        assert_same_fit(row, trained, history, reference.get_weights())


def test_bad_inputs_raise_and_leave_the_template_alone():
    x, y = data()
    model = template("adam")
    before = [w.copy() for w in model.get_weights()]
    config = model.get_compile_config()
    with pytest.raises(ValueError, match=r"`penalties`.*empty"):
        kerasreg.sweep(model, [], x, y)
    with pytest.raises(TypeError, match=r"`penalties`.*list"):
        kerasreg.sweep(model, kerasreg.L2Penalty(0.1), x, y)
    # Named by the argument at fault, listing what exists (the copies'
    # internal names never appear).
    with pytest.raises(ValueError) as raised:
        kerasreg.sweep(model, [None, kerasreg.L2Penalty(0.1)], x, y, role="recurrent")
    assert re.search(
        r"`penalties\[0\]`: it acts on the recurrent role \(`role`='recurrent'\), "
        r"but no weight of model '.*' has that role\. Its weights by role: "
        r"kernel: ('\w+/kernel'(, )?)+; recurrent: none; bias: ",
        str(raised.value),
    ), raised.value
    assert "variant_" not in str(raised.value)
    with pytest.raises(ValueError, match=r"`penalties\[1\]`: it acts on the recurrent"):
        kerasreg.sweep(model, [None, {"recurrent": kerasreg.L2Penalty(0.1)}], x, y)
    for grid in ([None], [kerasreg.L2Penalty(0.1)]):
        with pytest.raises(
            ValueError,
            match=r"invalid `where`: `where`='nope' selects no weight.*'\w+/kernel'",
        ):
            kerasreg.sweep(model, grid, x, y, where="nope")
    with pytest.raises(ValueError, match=r"`where`='/bias' selects has that role"):
        kerasreg.sweep(model, [None], x, y, where="/bias")
    with pytest.raises(ValueError, match=r"`role`.*'weights'"):
        kerasreg.sweep(model, [None], x, y, role="weights")
    with pytest.raises(ValueError, match=r"penalties\[0\].*not_a_penalty"):
        kerasreg.sweep(model, ["not_a_penalty"], x, y)
    with pytest.raises(TypeError, match=r"`model`.*str"):
        kerasreg.sweep("model.keras", [None], x, y)
    with pytest.raises(TypeError, match=r"argument `epoch`=3.*epochs"):
        kerasreg.sweep(model, [None], x, y, epoch=3)  # fit's is `epochs`
    uncompiled = build()
    with pytest.raises(ValueError, match="not compiled"):
        kerasreg.sweep(uncompiled, [None], x, y)
    no_input = keras.Sequential([keras.layers.Dense(1)])
    no_input.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="no known input"):
        kerasreg.sweep(no_input, [None], x, y)
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert model.get_compile_config() == config
    assert all(layer.kernel_regularizer is None for layer in model.layers)
    assert not uncompiled.compiled


def test_best_plot_str_and_progress(tmp_path, capsys):
    x, y = data()
    model = template("adam")
    result = kerasreg.sweep(
        model,
        [None, kerasreg.L2Penalty(1e-1), kerasreg.L2Penalty(3.0)],
        x,
        y,
        epochs=2,
        batch_size=16,
        validation_data=data(16, seed=4),
        verbose=1,
    )
    printed = capsys.readouterr().out
    val = np.array([row["history"]["val_loss"] for row in result.rows])
    expected = [result.rows[int(i)]["penalty"] for i in np.argmin(val, axis=0)]
    announced = re.findall(r"best so far by val_loss: (\S+) \(", printed)
    assert announced == expected
    final = [row["history"]["val_loss"][-1] for row in result.rows]
    assert result.best()["penalty"] == result.rows[int(np.argmin(final))]["penalty"]
    acc = [row["history"]["val_accuracy"][-1] for row in result.rows]
    assert result.best("val_accuracy")["val_accuracy"] == max(acc)
    assert result.best("loss", mode="max")["loss"] == max(
        r["loss"] for r in result.rows
    )
    with pytest.raises(ValueError, match=r"`monitor`.*'val_auc'"):
        result.best("val_auc")
    assert [row["strength"] for row in result.rows] == [0.0, 0.1, 3.0]
    assert result.rows[2]["config"]["kernel"]["config"] == {"l2": 3.0}

    text = str(result)
    assert text.splitlines()[0].split() == [
        "penalty",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
    ]
    for row, line in zip(result.rows, text.splitlines()[1:], strict=True):
        assert line.split()[0] == row["penalty"]
        assert float(line.split()[1]) == pytest.approx(row["loss"], rel=1e-4)

    png = result.plot(tmp_path / "curve.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300
    with pytest.raises(ValueError, match="`metric`"):
        result.plot(tmp_path / "x.png", metric="val_loss")


def scalars(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [
            (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }, accumulator


def test_log_dir_writes_one_run_per_variant_and_hparams(tmp_path):
    x, y = data()
    model = template("adam")
    penalties = [None, kerasreg.L2Penalty(1e-2)]
    result = kerasreg.sweep(
        model,
        penalties,
        x,
        y,
        epochs=2,
        batch_size=16,
        validation_data=data(16, seed=4),
        log_dir=tmp_path,
        verbose=0,
    )
    names = [row["penalty"] for row in result.rows]
    assert names == ["none", "L2Penalty_0.01"]
    for row, trained in zip(result.rows, result.models, strict=True):
        train, _ = scalars(tmp_path / row["penalty"] / "train")
        validation, _ = scalars(tmp_path / row["penalty"] / "validation")
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(
                [v for _, v in train[f"epoch_{key}"]], row["history"][key], rtol=1e-6
            )
            assert [s for s, _ in train[f"epoch_{key}"]] == [0, 1]
            np.testing.assert_allclose(
                [v for _, v in validation[f"epoch_{key}"]],
                row["history"][f"val_{key}"],
                rtol=1e-6,
            )
        # WeightNormLogger data: the last penalty is the numpy penalty of the
        # final weights.
        kernels = [
            np.asarray(layer.kernel, dtype="float64") for layer in trained.layers
        ]
        expected = (
            0.0
            if row["penalty"] == "none"
            else sum(1e-2 * (k**2).sum() for k in kernels)
        )
        assert train["penalty/total"][-1] == (
            1,
            pytest.approx(expected, rel=1e-5, abs=1e-9),
        )
        assert "norm_l2/dense/kernel" in train

    _, root = scalars(tmp_path)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        root.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    # The knob families and values (tests/test_sweep_study.py checks them).
    assert [h.name for h in experiment.hparam_infos] == [
        "penalty",
        "family",
        "strength",
        "L2Penalty.l2",
    ]
    assert {m.name.tag for m in experiment.metric_infos} == {
        "hparams/best_epoch",
        "hparams/loss",
        "hparams/accuracy",
        "hparams/val_loss",
        "hparams/val_accuracy",
    }
    for row in result.rows:
        _, run = scalars(tmp_path / row["penalty"])
        start = plugin_data_pb2.HParamsPluginData.FromString(
            run.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        ).session_start_info
        assert start.hparams["penalty"].string_value == row["penalty"]
        assert start.hparams["strength"].number_value == pytest.approx(row["strength"])


def test_chunks_of_variants_equal_separate_fits(monkeypatch, caplog):
    # The memory rule: per variant, 4 bytes x (2 x batch x the per-sample size
    # of every layer output + 4 x the number of weights). The test network
    # (3 -> 8 -> 1): outputs of 8 + 1 numbers per sample, 3*8+8+8+1 = 41 weights;
    # with batch 16: 4 * (2*16*9 + 4*41) = 1808 bytes a variant.
    x, y = data()
    model = template("sgd")
    penalties = [None, kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(1e-1)]
    fit_kwargs = dict(epochs=2, batch_size=16, shuffle=False, verbose=0)
    monkeypatch.setenv("KERASREG_SWEEP_MEMORY", str(2 * 1808 + 100))
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(model, penalties, x, y, **fit_kwargs)
    assert result.engine == "vectorized"
    assert "in 2 fits of at most 2 variants" in result.engine_reason
    assert "trained in 2 fits of at most 2" in caplog.text
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        history, weights = separate_fit(model, penalty, "sgd", x, y, **fit_kwargs)
        assert_same_fit(row, trained, history, weights)
    monkeypatch.setenv("KERASREG_SWEEP_MEMORY", str(3 * 1808 + 100))
    whole = kerasreg.sweep(model, penalties, x, y, **fit_kwargs)
    assert "fits of at most" not in whole.engine_reason
    one_each = kerasreg.sweep(model, penalties, x, y, chunk_size=1, **fit_kwargs)
    assert "in 3 fits of at most 1 variants" in one_each.engine_reason
    with pytest.raises(ValueError, match=r"`chunk_size`.*Received: chunk_size=0"):
        kerasreg.sweep(model, penalties, x, y, chunk_size=0, **fit_kwargs)


@pytest.mark.parametrize("chunk_size, sizes", [(1, [1]), (3, [3, 1])])
def test_fits_of_a_sweep_in_groups_equal_separate_fits(monkeypatch, chunk_size, sizes):
    # On JAX, each fit of a sweep in groups reuses the steps compiled for the
    # first group of its size (one stack per size): each group must still
    # train with its own variants' penalties, of distinct kinds here.
    x, y = data()
    model = template("adam")
    penalties = [
        None,
        kerasreg.L1Penalty(1e-2),
        kerasreg.L2Penalty(1e-1),
        {"kernel": kerasreg.L1Penalty(1e-3), "bias": kerasreg.L2Penalty(1e-2)},
    ]
    stacks = []
    made = mapped.MappedStack.__init__

    def counted(self, lane, variants, *args):
        stacks.append(len(variants))
        made(self, lane, variants, *args)

    monkeypatch.setattr(mapped.MappedStack, "__init__", counted)
    fit_kwargs = dict(
        epochs=2, batch_size=16, shuffle=False, verbose=0, validation_split=0.25
    )
    result = kerasreg.sweep(model, penalties, x, y, chunk_size=chunk_size, **fit_kwargs)
    fits = -(-len(penalties) // chunk_size)
    assert f"in {fits} fits of at most {chunk_size} variants" in result.engine_reason
    assert stacks == (sizes if keras.backend.backend() == "jax" else [])
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        history, weights = separate_fit(model, penalty, "adam", x, y, **fit_kwargs)
        assert_same_fit(row, trained, history, weights)


def wide(units, penalty=None):
    """A network whose training state (4 copies of its weights) is
    `16 * (513 * units + units + 1)` bytes."""
    return keras.Sequential(
        [
            keras.Input((512,)),
            keras.layers.Dense(units, "relu", kernel_regularizer=penalty),
            keras.layers.Dense(1, kernel_regularizer=penalty),
        ]
    )


def test_large_variants_train_one_at_a_time_on_a_jax_cpu(caplog):
    # 16 * (513*600 + 601) bytes = 4.7 MiB a variant: above the 4 MiB rule,
    # 400 units (3.1 MiB) below it.
    assert 16 * (513 * 600 + 601) > engines.ONE_AT_A_TIME_BYTES > 16 * (513 * 400 + 401)
    on_jax = keras.backend.backend() == "jax"
    if on_jax:
        assert engines.one_at_a_time(wide(400), engines.MAPPED) is None
        assert "(4.7 MiB) is above 4 MiB" in engines.one_at_a_time(
            wide(600), engines.MAPPED
        )
    assert engines.one_at_a_time(wide(600), engines.vectorized) is None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 512)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    keras.utils.set_random_seed(1)
    model = wide(600)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    penalties = [kerasreg.L2Penalty(1e-3), kerasreg.L2Penalty(1e-1)]
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(model, penalties, x, y, **fit_kwargs)
    alone = "one variant at a time" in result.engine_reason
    assert alone == on_jax
    assert ("2 fits of at most 1 (a variant's training state" in caplog.text) == on_jax
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = wide(600, penalty)
        reference.set_weights(model.get_weights())
        reference.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        history = reference.fit(x, y, **fit_kwargs).history
        np.testing.assert_allclose(row["history"]["loss"], history["loss"], rtol=1e-5)
        for got, want in zip(
            trained.get_weights(), reference.get_weights(), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    stacked = kerasreg.sweep(model, penalties, x, y, chunk_size=2, **fit_kwargs)
    assert "fits of at most" not in stacked.engine_reason


def test_a_generator_is_refused_when_the_variants_need_several_fits():
    x, y = data()
    model = template("sgd")
    before = model.get_weights()

    def batches():
        for start in range(0, len(x), 16):
            yield x[start : start + 16], y[start : start + 16]

    generator = batches()
    with pytest.raises(ValueError, match=r"`x`.*2 fits.*read once"):
        kerasreg.sweep(model, PENALTIES, generator, chunk_size=2, epochs=1)
    np.testing.assert_array_equal(next(generator)[0], x[:16])  # nothing was read
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


RECURRENT = {
    "SimpleRNN": lambda: keras.layers.SimpleRNN(3, return_sequences=True),
    "LSTM": lambda: keras.layers.LSTM(3),
    "GRU": lambda: keras.layers.GRU(3, go_backwards=True),
    "GRU reset before": lambda: keras.layers.GRU(3, reset_after=False),
    "Bidirectional LSTM": lambda: keras.layers.Bidirectional(
        keras.layers.LSTM(2, return_sequences=True), merge_mode="sum"
    ),
}


@pytest.mark.slow  # a sweep and two traced recurrent reference fits per layer
@pytest.mark.parametrize("layer", list(RECURRENT))
def test_recurrent_layers_are_batched_and_equal_separate_fits(layer):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(24, 4, 2)).astype("float32")
    y = (x[:, :, :1].sum(axis=1) > 0).astype("float32")

    def build_rnn(kernel=None, recurrent=None):
        model = keras.Sequential(
            [
                keras.Input((4, 2)),
                RECURRENT[layer](),
                keras.layers.Flatten(),
                keras.layers.Dense(1, "sigmoid"),
            ],
            name="rnn",
        )
        if kernel is not None:
            kerasreg.regularize(model, kernel=kernel, recurrent=recurrent)
        return model

    keras.utils.set_random_seed(3)
    model = build_rnn()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    penalties = [
        {"kernel": kerasreg.L2Penalty(1e-2), "recurrent": kerasreg.L1Penalty(1e-2)},
        {"kernel": kerasreg.L2Penalty(1e-1), "recurrent": None},
    ]
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    result = kerasreg.sweep(model, penalties, x, y, **fit_kwargs)
    assert result.engine == "vectorized"
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = build_rnn(penalty["kernel"], penalty["recurrent"])
        reference.set_weights(model.get_weights())
        reference.compile(
            optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy"
        )
        history = reference.fit(x, y, **fit_kwargs).history
        assert_same_fit(row, trained, history, reference.get_weights())


@pytest.mark.parametrize("kind", ["sgd", "adam", "adam_clipnorm"])
def test_embeddings_equal_separate_fits(kind):
    # Repeated tokens in a batch: on TensorFlow a separate fit's embedding
    # gradient is a tf.IndexedSlices whose rows Keras squares (Adam) and clips
    # before summing the repeats; only SGD's update is the same either way.
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (16, 5)).astype("int32")
    y = rng.normal(size=(16, 1)).astype("float32")

    def build_embedding():
        return keras.Sequential(
            [
                keras.Input((5,), dtype="int32"),
                keras.layers.Embedding(4, 3),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )

    model = build_embedding()
    model.compile(optimizer=optimizer(kind), loss="mse")
    penalties = [None, kerasreg.L2Penalty(1e-2)]
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
    result = kerasreg.sweep(model, penalties, x, y, **fit_kwargs)
    sparse = keras.backend.backend() == "tensorflow" and kind != "sgd"
    assert result.engine == ("stacked" if sparse else "vectorized")
    for penalty, row, trained in zip(
        penalties, result.rows, result.models, strict=True
    ):
        reference = build_embedding()
        reference.set_weights(model.get_weights())
        if penalty is not None:
            kerasreg.regularize(reference, kernel=penalty)
        reference.compile(optimizer=optimizer(kind), loss="mse")
        history = reference.fit(x, y, **fit_kwargs).history
        assert_same_fit(row, trained, history, reference.get_weights())


def test_engine_choice_is_logged_and_can_be_forced(caplog):
    x, y = data()
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.GaussianNoise(0.1), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss="mse")
    before = model.get_weights()
    why = "layer 'gaussian_noise' (GaussianNoise) has no batched kernel"
    if keras.backend.backend() == "jax":
        # jax.vmap of the template's own step takes any layer; `callbacks`
        # send a template past it.
        result = kerasreg.sweep(model, [None], x, y, epochs=1, verbose=0)
        assert result.engine == "vectorized"
        assert result.engine_reason == "jax.vmap of the template's train step"
        with caplog.at_level(logging.INFO, logger="kerasreg"):
            callbacks = [keras.callbacks.Callback()]
            kerasreg.sweep(
                model, [None], x, y, epochs=1, verbose=0, callbacks=callbacks
            )
        assert "not jax.vmap: `callbacks` has Callback" in caplog.text
        assert caplog.records[0].levelname == "INFO"
        result = kerasreg.sweep(
            model, [None], x, y, epochs=1, verbose=0, engine="stacked"
        )
    else:
        with caplog.at_level(logging.INFO, logger="kerasreg"):
            result = kerasreg.sweep(model, [None], x, y, epochs=1, verbose=0)
        assert f"not batched kernels: {why}" in caplog.text
        assert caplog.records[0].levelname == "INFO"
        assert (
            result.engine_reason
            == f"K copies side by side in one fit; not batched kernels: {why}"
        )
    assert result.engine == "stacked"
    if keras.backend.backend() != "jax":
        with pytest.raises(
            ValueError, match=r"engine='vectorized' cannot train.*GaussianNoise"
        ):
            kerasreg.sweep(model, [None], x, y, engine="vectorized", epochs=1)
    with pytest.raises(ValueError, match=r"`engine`.*Received: engine='fast'"):
        kerasreg.sweep(model, [None], x, y, engine="fast", epochs=1)
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    forced = kerasreg.sweep(
        model, [None], x, y, engine="sequential", epochs=1, verbose=0
    )
    assert forced.engine == "sequential"
    assert forced.engine_reason == "K separate fits, one after another"


def test_an_unregistered_custom_metric_is_named_as_the_cause():
    # clone_model succeeds on such a model; the sweep's copy, compiled from
    # the template's compile config, cannot find the class.
    class Unregistered(keras.metrics.Mean):
        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(keras.ops.abs(y_true - y_pred))

    x, y = data()
    model = build()
    model.compile(optimizer="sgd", loss="mse", metrics=[Unregistered(name="err")])
    with pytest.raises(ValueError, match="register_keras_serializable"):
        kerasreg.sweep(model, [None, kerasreg.L2Penalty(0.1)], x, y, verbose=0)


def test_the_memory_rule_counts_a_convolutions_patches():
    # 8x8x2 images -> Conv2D(4, 3) on the shared input: 6x6x4 outputs, one
    # convolution (no patches) -> Conv2D(3, 2) on each variant's own input:
    # 5x5x3 outputs, and on TensorFlow (im2col) its patches: 5x5 positions x
    # 2x2 windows x 4 channels -> Flatten: 75 numbers -> Dense(1).
    # Weights: 3*3*2*4 + 4 = 76, 2*2*4*3 + 3 = 51, 75 + 1 = 76.
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Conv2D(3, 2),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    patches = 5 * 5 * 2 * 2 * 4 if keras.backend.backend() == "tensorflow" else 0
    per_sample = 6 * 6 * 4 + 5 * 5 * 3 + patches + 75 + 1
    expected = 4 * (2 * 16 * per_sample + 4 * (76 + 51 + 76))
    assert engines.variant_bytes(model, 16) == expected


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "0", "-5", "0.5"])
def test_an_invalid_memory_budget_is_refused_naming_the_variable(monkeypatch, value):
    x, y = data()
    model = template("sgd")
    before = model.get_weights()
    monkeypatch.setenv("KERASREG_SWEEP_MEMORY", value)
    with pytest.raises(ValueError) as raised:
        kerasreg.sweep(model, PENALTIES, x, y, epochs=1, verbose=0)
    message = str(raised.value)
    assert "`KERASREG_SWEEP_MEMORY`" in message
    assert f"Received: KERASREG_SWEEP_MEMORY={value!r}" in message
    assert "positive number of bytes" in message
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_best_so_far_line_ranks_the_runs_of_earlier_fits(capsys):
    # Three fits of one variant each (chunk_size=1): the line printed at the
    # last epoch of the last fit names the best run of the whole sweep by
    # val_loss, read here from the rows' own histories.
    x, y = data()
    model = template("sgd")
    grid = [None, kerasreg.L2Penalty(30.0), kerasreg.L2Penalty(10.0)]
    result = kerasreg.sweep(
        model, grid, x, y, chunk_size=1, epochs=2, validation_split=0.25, verbose=2
    )
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("best so far by val_loss: ")
    ]
    bests = [min(row["history"]["val_loss"]) for row in result.rows]
    best = int(np.argmin(bests))
    assert best != len(grid) - 1  # the best run was trained by an earlier fit
    name, value = re.match(
        r"best so far by val_loss: (\S+) \(([^)]+)\)", lines[-1]
    ).groups()
    assert name == result.rows[best]["run"]
    assert float(value) == pytest.approx(bests[best], rel=1e-3)


def test_the_memory_rule_reads_a_graph_with_a_keras_ops_call():
    # A functional model calling keras.ops has Operation nodes, which are not
    # layers and have no weights: 4 -> ops.multiply (4) -> Dense(2) (2).
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(keras.ops.multiply(inputs, 2.0))
    model = keras.Model(inputs, outputs)
    assert engines.variant_bytes(model, 8) == 4 * (2 * 8 * (4 + 2) + 4 * (4 * 2 + 2))
