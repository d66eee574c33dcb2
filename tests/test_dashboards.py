"""TensorBoard dashboards of `WeightNormLogger`: logger steps, the custom
scalars layout, the `regularization/plan` text, `logs` keys, tags across
save/load. Event files are read back with TensorBoard's own reader."""

import csv
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.util import tensor_util

import kerasreg
from kerasreg import WeightNormLogger


def accumulator(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events


def steps(events, tag):
    return [e.step for e in events.Tensors(tag)]


def values(events, tag):
    return [
        float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)
    ]


def np_weights(variable):
    return np.asarray(ops.convert_to_numpy(variable.value), dtype=np.float64)


def small_model(name="mymodel", penalty=0.1):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, kernel_regularizer=kerasreg.L2Penalty(penalty)),
            keras.layers.Dense(1),
        ],
        name=name,
    )
    return model


# --- logger steps (issue 10, item 1) ------------------------------------------


def unknown_length(x, y, batch_size):
    # `filter` hides the cardinality: Keras cannot know the epoch length.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return dataset.filter(lambda a, b: True)


@pytest.mark.parametrize("known_length", [True, False])
def test_logger_steps_are_optimizer_steps_with_steps_per_execution(
    tmp_path, known_length
):
    # The numbers: 3 steps per epoch, steps_per_execution=2, 2 epochs
    # per fit, 2 fits = 12 optimizer steps. Keras 3.15.1 passes `batch` so
    # that rebuilding the step from it gave [2, 4, 6, 8, 8, 10, 12, 14].
    # PyTorch allows only steps_per_execution=1.
    spe = 1 if keras.backend.backend() == "torch" else 2
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                  steps_per_execution=spe)  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    data = {"x": x, "y": y, "batch_size": 8}
    if not known_length:
        data = {"x": unknown_length(x, y, 8)}
    ends = []
    for _ in range(2):
        model.fit(**data, epochs=2, verbose=0,
                  callbacks=[WeightNormLogger(tmp_path, update_freq=2)])  # fmt: skip
        ends.append(int(ops.convert_to_numpy(model.optimizer.iterations)))
    assert ends == [6, 12]
    logged = steps(accumulator(tmp_path / "train"), "penalty/dense/kernel")
    assert logged == sorted(set(logged)), logged  # strictly increasing
    assert max(logged) <= 12
    assert 6 in logged and logged[-1] == 12  # each fit's last log at its last step
    if known_length and spe == 2:
        # Executions end at steps 2, 3 | 5, 6 || 8, 9 | 11, 12: a log at the
        # first end at or past each multiple of 2, and at each fit's end.
        assert logged == [2, 5, 6, 8, 11, 12]
    if spe == 1:
        assert logged == [2, 4, 6, 8, 10, 12]
    # The value at the last step is the penalty of the final weights.
    kernel = np_weights(model.layers[0].kernel)
    last = values(accumulator(tmp_path / "train"), "penalty/dense/kernel")[-1]
    assert last == pytest.approx(0.1 * (kernel**2).sum(), rel=1e-5)


# --- layout, plan and logs keys, with Keras's TensorBoard in the same dir ------


def recurrent_model():
    inputs = keras.Input((4, 3))
    x = keras.layers.LSTM(
        4,
        return_sequences=True,
        kernel_regularizer=kerasreg.L2Penalty(0.05),
        recurrent_regularizer=kerasreg.L1Penalty(0.01),
        name="lstm",
    )(inputs)
    x = keras.layers.Bidirectional(
        keras.layers.GRU(
            3,
            kernel_regularizer=kerasreg.L1Penalty(0.02),
            recurrent_regularizer=kerasreg.L2Penalty(0.04),
        ),
        name="bi",
    )(x)
    x = keras.layers.LayerNormalization(name="norm")(x)
    outputs = keras.layers.Dense(
        1, bias_regularizer=kerasreg.L2Penalty(0.3), name="out"
    )(x)
    return keras.Model(inputs, outputs)


GRU_DIRECTIONS = ("bi/forward_gru/gru_cell", "bi/backward_gru/gru_cell")
GATED = {
    "lstm/lstm_cell/kernel": "ifco",
    "lstm/lstm_cell/recurrent_kernel": "ifco",
    **{
        f"{d}/{w}": "zrh"
        for d in GRU_DIRECTIONS
        for w in ("kernel", "recurrent_kernel")
    },
}


class PlanDecay(keras.callbacks.Callback):
    """A stub post-step callback: `where` plus `describe_action()`."""

    where = "recurrent_kernel"

    def describe_action(self):
        return "decay 0.01/step toward start"


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    log_dir = tmp_path_factory.mktemp("dash") / "logs"
    csv_path = log_dir.parent / "history.csv"
    model = recurrent_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4, 3)), rng.normal(size=(32, 1))
    xv, yv = rng.normal(size=(16, 4, 3)), rng.normal(size=(16, 1))
    decay = PlanDecay()
    logger = WeightNormLogger(log_dir, per_gate=True)
    callbacks = [
        decay,
        logger,
        keras.callbacks.TensorBoard(log_dir),
        keras.callbacks.CSVLogger(str(csv_path)),
    ]
    history = model.fit(x, y, batch_size=16, epochs=2, validation_data=(xv, yv),
                        verbose=0, callbacks=callbacks)  # fmt: skip
    # A second fit in the same process: the same layout is not written again.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks[:3])
    return {
        "model": model,
        "callbacks": callbacks,
        "history": history.history,
        "csv": csv_path,
        "train": accumulator(log_dir / "train"),
        "validation": accumulator(log_dir / "validation"),
        "val_data": (xv, yv),
    }


def read_layout(events):
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    layouts = events.Tensors(tag)
    proto = tensor_util.make_ndarray(layouts[0].tensor_proto).item()
    return len(layouts), layout_pb2.Layout.FromString(proto)


def test_layout_regexes_match_exactly_the_tags_written(dashboard_run):
    count, layout = read_layout(dashboard_run["train"])
    assert count == 1  # once per run, also across fits
    written = set(dashboard_run["train"].Tags()["tensors"])
    written |= set(dashboard_run["validation"].Tags()["tensors"])
    assert "epoch_loss" in written  # Keras's own tags sit in the same runs
    charts = {
        (category.title, chart.title): chart.multiline.tag
        for category in layout.category
        for chart in category.chart
    }
    lstm = "lstm/lstm_cell"
    expected = {
        ("regularization: loss", "loss"): {
            "loss/data",
            "penalty/total",
            "loss/total",
        },
        ("regularization: penalty per layer", "penalty lstm"): {
            f"penalty/{lstm}/kernel",
            f"penalty/{lstm}/recurrent_kernel",
        },
        ("regularization: penalty per layer", "penalty bi"): {
            f"penalty/{d}/{w}"
            for d in GRU_DIRECTIONS
            for w in ("kernel", "recurrent_kernel")
        },
        ("regularization: penalty per layer", "penalty out"): {"penalty/out/bias"},
        **{
            ("regularization: L2 norm per gate", f"norm_l2 {path}"): {
                f"norm_l2/{path}/gate_{g}" for g in gates
            }
            for path, gates in GATED.items()
        },
    }
    assert set(charts) == set(expected)
    for key, patterns in charts.items():
        matched = {t for t in written if any(re.search(p, t) for p in patterns)}
        assert matched == expected[key], key


def plan_rows(text):
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = rows[0], rows[2:]
    return header, {
        row[0].strip("`"): dict(zip(header, row, strict=True)) for row in rows
    }


def test_plan_text_lists_every_trainable_weight_with_penalty_and_actions(
    dashboard_run,
):
    events = dashboard_run["train"]
    plans = events.Tensors("regularization/plan")
    assert [e.step for e in plans] == [0, 4]  # one per fit, at its first step
    text = tensor_util.make_ndarray(plans[-1].tensor_proto).item().decode()
    model = dashboard_run["model"]
    assert text == kerasreg.describe(model, dashboard_run["callbacks"])
    header, rows = plan_rows(text)
    assert header == ["weight", "shape", "penalty", "callbacks", "default where"]
    expected_paths = {
        "lstm/lstm_cell/kernel": (3, 16),
        "lstm/lstm_cell/recurrent_kernel": (4, 16),
        "lstm/lstm_cell/bias": (16,),
        **{f"{d}/kernel": (4, 9) for d in GRU_DIRECTIONS},
        **{f"{d}/recurrent_kernel": (3, 9) for d in GRU_DIRECTIONS},
        **{f"{d}/bias": (2, 9) for d in GRU_DIRECTIONS},
        "norm/gamma": (6,),
        "norm/beta": (6,),
        "out/kernel": (6, 1),
        "out/bias": (1,),
    }
    assert {p: eval(r["shape"]) for p, r in rows.items()} == expected_paths
    assert rows["lstm/lstm_cell/kernel"]["penalty"] == "L2Penalty(l2=0.05)"
    assert rows["lstm/lstm_cell/recurrent_kernel"]["penalty"] == "L1Penalty(l1=0.01)"
    assert rows["out/bias"]["penalty"] == "L2Penalty(l2=0.3)"
    assert rows["out/kernel"]["penalty"] == "none"
    action = "PlanDecay: decay 0.01/step toward start"
    for path, row in rows.items():
        assert row["callbacks"] == (action if "recurrent_kernel" in path else "none")
    assert rows["lstm/lstm_cell/kernel"]["default where"] == "selected"
    assert rows["lstm/lstm_cell/bias"]["default where"] == "left out: bias"
    # A GRU bias is 2-D but still a bias.
    assert rows[f"{GRU_DIRECTIONS[0]}/bias"]["default where"] == "left out: bias"
    assert rows["norm/gamma"]["default where"] == "left out: normalization"


def test_logs_keys_reach_history_csv_and_keras_tensorboard(dashboard_run):
    model, history = dashboard_run["model"], dashboard_run["history"]
    for key in ("data_loss", "val_data_loss", "penalty"):
        assert len(history[key]) == 2
    for epoch in range(2):
        assert history["data_loss"][epoch] == pytest.approx(
            history["loss"][epoch] - history["penalty"][epoch], rel=1e-6
        )
    with open(dashboard_run["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert {"data_loss", "val_data_loss", "penalty"} <= set(rows[0])
    assert float(rows[1]["val_data_loss"]) == pytest.approx(
        history["val_data_loss"][1], rel=1e-5
    )
    # Keras's TensorBoard (placed after the logger) wrote them as epoch_*.
    train, validation = dashboard_run["train"], dashboard_run["validation"]
    assert values(train, "epoch_data_loss")[:2] == pytest.approx(
        history["data_loss"], rel=1e-5
    )
    assert values(validation, "epoch_data_loss") == pytest.approx(
        history["val_data_loss"], rel=1e-5
    )
    # The penalty is the sum of the regularizers on the weights (numpy).
    by_path = {v.path: v for v in model.weights}
    assert history["penalty"][1] > 0
    kernel = np_weights(by_path["lstm/lstm_cell/kernel"])
    penalty_series = values(train, "penalty/lstm/lstm_cell/kernel")
    assert penalty_series[-1] == pytest.approx(0.05 * (kernel**2).sum(), rel=1e-5)


def test_early_stopping_on_val_data_loss_where_val_loss_misleads(tmp_path):
    # A perfect linear fit under a strong L2 penalty: each step trades a
    # little data loss for a lot of penalty, so val_loss keeps falling while
    # the validation data loss rises from its best value, 0.
    rng = np.random.default_rng(1)
    w_true = np.array([[1.0], [-2.0], [3.0], [0.5]], dtype="float32")
    x, xv = rng.normal(size=(64, 4)), rng.normal(size=(32, 4))
    y, yv = x @ w_true, xv @ w_true

    def fit(monitor):
        keras.utils.set_random_seed(0)
        layer = keras.layers.Dense(1, use_bias=False,
                                   kernel_regularizer=kerasreg.L2Penalty(0.5))  # fmt: skip
        model = keras.Sequential([keras.Input((4,)), layer])
        layer.kernel.assign(w_true)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        # mode="min": Keras guesses the direction only for "loss"/"val_loss".
        stop = keras.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=1)
        history = model.fit(x, y, batch_size=64, epochs=6, validation_data=(xv, yv),
                            verbose=0, callbacks=[WeightNormLogger(tmp_path), stop])  # fmt: skip
        return model, history.history

    _, misled = fit("val_loss")
    assert len(misled["val_loss"]) == 6  # val_loss fell every epoch...
    assert np.all(np.diff(misled["val_loss"]) < 0)
    assert np.all(np.diff(misled["val_data_loss"]) > 0)  # ...the fit got worse
    model, history = fit("val_data_loss")
    assert len(history["val_data_loss"]) == 2  # best at epoch 0, worse at 1: stop
    # Independent reference: numpy's mean squared error at the final weights.
    w = np_weights(model.layers[0].kernel)
    assert history["val_data_loss"][-1] == pytest.approx(
        float(np.mean((xv @ w - yv) ** 2)), rel=1e-4
    )


# --- tags across save/load ----------------------------------------------------


def test_tags_are_one_continuous_series_across_save_and_load(tmp_path):
    model = small_model("mymodel")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 3)), rng.normal(size=(32, 1))
    log_dir = tmp_path / "logs"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[WeightNormLogger(log_dir, update_freq=2)])  # fmt: skip
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[WeightNormLogger(log_dir, update_freq=2)])  # fmt: skip
    events = accumulator(log_dir / "train")
    tags = events.Tags()["tensors"]
    assert not [t for t in tags if "mymodel" in t], tags
    assert steps(events, "penalty/dense/kernel") == [2, 4, 6, 8]
    assert steps(events, "norm_l2/dense_1/kernel") == [2, 4, 6, 8]
    kernel = np_weights(loaded.layers[0].kernel)
    assert values(events, "penalty/dense/kernel")[-1] == pytest.approx(
        0.1 * (kernel**2).sum(), rel=1e-5
    )
    plans = [
        tensor_util.make_ndarray(e.tensor_proto).item().decode()
        for e in events.Tensors("regularization/plan")
    ]
    assert len(plans) == 2 and plans[0] == plans[1]


# --- describe -------------------------------------------------------------------


class OldDecay(keras.callbacks.Callback):
    """A post-step callback without `describe_action`: falls back to `rate`."""

    def __init__(self, rate, where=None):
        super().__init__()
        self.rate, self.where = rate, where


def test_describe_reasons_and_callback_fallbacks():
    frozen = keras.layers.Dense(2, name="frozen")
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="dense", kernel_regularizer=keras.regularizers.L2(0.2)),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.PReLU(name="prelu"),
            frozen,
        ]
    )  # fmt: skip
    frozen.trainable = False
    decay = kerasreg.WeightDecay(0.01)
    callbacks = [OldDecay(0.5, where="kernel$"), decay, keras.callbacks.History()]
    _, rows = plan_rows(kerasreg.describe(model, callbacks))
    # Frozen kernels are listed; moving statistics are not.
    assert set(rows) == {"dense/kernel", "dense/bias", "bn/gamma", "bn/beta",
                         "prelu/alpha", "frozen/kernel"}  # fmt: skip
    reasons = {p: r["default where"] for p, r in rows.items()}
    assert reasons == {
        "dense/kernel": "selected",
        "dense/bias": "left out: bias",
        "bn/gamma": "left out: normalization",
        "bn/beta": "left out: normalization",
        "prelu/alpha": "left out: 1-D",
        "frozen/kernel": "left out: not trainable",
    }
    assert rows["dense/kernel"]["penalty"] == "L2(l2=0.2)"
    if callable(getattr(decay, "describe_action", None)):
        decay_text = f"WeightDecay: {decay.describe_action()}"
    else:
        decay_text = "WeightDecay: rate 0.01"
    assert rows["dense/kernel"]["callbacks"] == f"OldDecay: rate 0.5; {decay_text}"
    assert rows["dense/bias"]["callbacks"] == "none"
    assert rows["frozen/kernel"]["callbacks"] == "none"


def test_describe_remembers_the_callbacks_of_the_last_fit():
    # The README tour: fit with WeightDecay and SoftThreshold, then
    # `describe(model)` without `callbacks=` shows what acted on each weight.
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 3)), np.zeros((8, 1))
    decay = kerasreg.WeightDecay(1e-3, toward="start")
    prox = kerasreg.SoftThreshold(1e-5, where="^d/")
    _, rows = plan_rows(kerasreg.describe(model))
    assert rows["d/kernel"]["callbacks"] == "none"  # nothing has trained yet
    model.fit(x, y, verbose=0, callbacks=[decay, prox, keras.callbacks.History()])
    _, rows = plan_rows(kerasreg.describe(model))
    both = (
        "WeightDecay: decay rate 0.001 per update toward its value at the start "
        "of training; SoftThreshold: soft-threshold 1e-05 per update"
    )
    assert rows["d/kernel"]["callbacks"] == both
    assert (
        rows["d/bias"]["callbacks"] == "SoftThreshold: soft-threshold 1e-05 per update"
    )
    assert rows["dense/kernel"]["callbacks"] == (
        "WeightDecay: decay rate 0.001 per update toward its value at the start "
        "of training"
    )
    model.evaluate(x, y, verbose=0)  # no training: still the same plan
    assert plan_rows(kerasreg.describe(model))[1]["d/kernel"]["callbacks"] == both
    # Explicit callbacks win; `[]` shows none.
    _, rows = plan_rows(kerasreg.describe(model, []))
    assert rows["d/kernel"]["callbacks"] == "none"
    # A later fit without them: they no longer act on the model.
    model.fit(x, y, verbose=0)
    assert plan_rows(kerasreg.describe(model))[1]["d/kernel"]["callbacks"] == "none"
    # A fit with only one of them: only that one.
    model.fit(x, y, verbose=0, callbacks=[prox])
    _, rows = plan_rows(kerasreg.describe(model))
    assert rows["d/kernel"]["callbacks"] == (
        "SoftThreshold: soft-threshold 1e-05 per update"
    )
    assert rows["dense/kernel"]["callbacks"] == "none"


@pytest.mark.parametrize(
    "model, callbacks, error, match",
    [
        ("not a model", None, TypeError, "model='not a model'"),
        (None, 3, TypeError, "callbacks=3"),
        (None, [object()], TypeError, "keras.callbacks.Callback"),
        ("unbuilt", None, ValueError, "has no weights"),
    ],
)
def test_describe_bad_inputs(model, callbacks, error, match):
    if model is None:
        model = small_model()
    elif model == "unbuilt":
        model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(error, match=match):
        kerasreg.describe(model, callbacks)
