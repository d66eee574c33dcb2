"""`kerasreg.sweep` as a study: every knob, seeds, callbacks per variant, results.

References are independent of `sweep`: each run is compared with a plain
Keras fit of a model built with Keras's own `kernel_regularizer` argument (and,
for a post-step transform, a fresh instance of it as that fit's callback);
a seeded run with a model built after `keras.utils.set_random_seed(seed)`;
`best` with NumPy's argmin/argmax and each metric's direction as Keras states
it; tables with the CSV read back by Python's `csv` module; TensorBoard files
with TensorBoard's own reader.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import random
import re
import shutil
import sys
import warnings

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

import kerasreg
from kerasreg.sweep.items import parse_grid
from kerasreg.sweep.result import SweepResult
from kerasreg.sweep.rows import make_row

RTOL, ATOL = 2e-5, 2e-6


def build(kernel=None, *, dropout=0.0, name="net"):
    """The test network, with Keras's own `kernel_regularizer` argument."""
    layers = [
        keras.Input((3,)),
        keras.layers.Dense(8, "tanh", kernel_regularizer=kernel, name="hidden"),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(1, "sigmoid", kernel_regularizer=kernel))
    return keras.Sequential(layers, name=name)


def data(n=48, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x[:, :1] + 0.5 * x[:, 1:2] > 0).astype("float32")
    return x, y


def compile_(model, learning_rate=0.1):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def reference_fit(template, penalty, transforms, x, y, learning_rate=0.1, **fit_kwargs):
    """A plain Keras fit: Keras's regularizer argument, a fresh transform callback."""
    reference = compile_(build(penalty), learning_rate)
    reference.set_weights(template.get_weights())
    history = reference.fit(x, y, callbacks=transforms, **fit_kwargs).history
    return history, reference


def assert_same_run(row, model, history, reference):
    assert set(row["history"]) == set(history)
    for key, values in history.items():
        np.testing.assert_allclose(
            row["history"][key], values, rtol=RTOL, atol=ATOL, err_msg=key
        )
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


FIT = dict(epochs=2, batch_size=16, shuffle=False, verbose=0)


# --- grid items, families, names ---------------------------------------------------


def test_grid_items_name_their_family_and_values():
    decay = kerasreg.WeightDecay(0.01)
    items = [
        None,
        kerasreg.L2Penalty(1e-3),
        {"kernel": kerasreg.L1Penalty(1e-4), "bias": kerasreg.L2Penalty(1e-2)},
        decay,
        kerasreg.WeightDecay(0.02, toward="start"),
        kerasreg.SoftThreshold(1e-3, lr_scaled=True),
        [kerasreg.L2Penalty(1e-3), decay],
        [None, decay],
        kerasreg.ElasticNetPenalty(l1=1e-4, l2=1e-3),
        kerasreg.WeightDecay(0.1, name="decay_hidden", where="hidden"),
    ]
    points = parse_grid(items, "kernel")
    assert [p.family for p in points] == [
        "none",
        "L2Penalty",
        "L1Penalty+bias-L2Penalty",
        "WeightDecay",
        "WeightDecay_toward_start",
        "SoftThreshold_lr_scaled",
        "L2Penalty+WeightDecay",
        "none+WeightDecay",
        "ElasticNetPenalty",
        "decay_hidden",
    ]
    assert [p.name for p in points] == [
        "none",
        "L2Penalty_0.001",
        "L1Penalty_0.0001+bias-L2Penalty_0.01",
        "WeightDecay_0.01",
        "WeightDecay_toward_start_0.02",
        "SoftThreshold_lr_scaled_0.001",
        "L2Penalty_0.001+WeightDecay_0.01",
        "none+WeightDecay_0.01",
        "ElasticNetPenalty_l1=0.0001_l2=0.001",
        "decay_hidden_0.1",
    ]
    assert points[0].values == {} and points[0].strength == 0.0
    # A decay rate is a value of its own knob, not the no-penalty baseline.
    assert points[3].values == {"WeightDecay.rate": 0.01}
    # Transforms alone: no penalty on the role, as `[None, decay]`.
    assert points[3].penalties == {"kernel": None} and points[3].strength == 0.01
    assert points[6].values == {"L2Penalty.l2": 0.001, "WeightDecay.rate": 0.01}
    assert points[7].penalties == {"kernel": None}  # no penalty, and decay
    assert points[2].penalties == {
        "kernel": kerasreg.L1Penalty(1e-4),
        "bias": kerasreg.L2Penalty(1e-2),
    }
    # Each fit gets new transform instances with the same arguments.
    fresh = points[4].fresh_transforms()[0]
    assert fresh is not items[4] and repr(fresh) == repr(items[4])
    assert repr(fresh) == "WeightDecay(rate=0.02, toward='start')"
    # The sweep's `role` decides which role a bare penalty takes.
    bias = parse_grid([kerasreg.L2Penalty(1e-2)], "bias")[0]
    assert bias.penalties == {"bias": kerasreg.L2Penalty(1e-2)}
    assert bias.family == "L2Penalty"


def test_grid_product_and_log_range_build_readable_grids():
    assert kerasreg.grid(kerasreg.L2Penalty, [1e-4, 1e-3]) == [
        kerasreg.L2Penalty(1e-4),
        kerasreg.L2Penalty(1e-3),
    ]
    # L1 x L2 strengths: every pair, in itertools.product order.
    l1, l2 = [1e-4, 1e-3], [1e-5, 1e-4, 1e-3]
    net = kerasreg.grid(kerasreg.ElasticNetPenalty, l1=l1, l2=l2)
    assert net == [
        kerasreg.ElasticNetPenalty(l1=a, l2=b) for a, b in itertools.product(l1, l2)
    ]
    # Fixed arguments pass through; NumPy arrays are axes too.
    decays = kerasreg.grid(kerasreg.WeightDecay, np.array([1e-3, 1e-2]), toward="start")
    assert [(d.rate, d.toward) for d in decays] == [(1e-3, "start"), (1e-2, "start")]
    # Penalty x decay rate, baselines included.
    items = kerasreg.product([None, *net[:2]], [None, *decays])
    assert len(items) == 9 and items[0] is None
    assert items[1] == [None, decays[0]] and items[3] is net[0]
    assert items[4] == [net[0], decays[0]]
    names = [p.name for p in parse_grid(items, "kernel")]
    assert len(set(names)) == 9
    assert (
        names[4]
        == "ElasticNetPenalty_l1=0.0001_l2=1e-05+WeightDecay_toward_start_0.001"
    )
    # A product of two penalty axes on one role: None gives way, two refuse.
    both = kerasreg.product([None, kerasreg.L1Penalty(1e-3)], [kerasreg.L2Penalty(1)])
    assert parse_grid(both[:1], "kernel")[0].penalties == {
        "kernel": kerasreg.L2Penalty(1)
    }
    with pytest.raises(ValueError, match=r"penalties\[1\].*two penalties.*ElasticNet"):
        parse_grid(both, "kernel")

    # Log ranges: the exact log-spaced values, to two significant digits.
    assert kerasreg.log_range(1e-5, 1e-1) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    for per_decade in (2, 3, 4):
        values = kerasreg.log_range(1e-4, 1e-1, per_decade=per_decade)
        exact = np.geomspace(1e-4, 1e-1, 3 * per_decade + 1)
        np.testing.assert_allclose(values, exact, rtol=0.05)
        assert all(
            len(f"{v:e}".split("e")[0].rstrip("0").rstrip(".")) <= 3 for v in values
        )
    assert kerasreg.log_range(2e-3, 1e-2) == [2e-3]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: kerasreg.grid("L2Penalty", [1]), TypeError, r"`knob`.*'L2Penalty'"),
        (lambda: kerasreg.grid(kerasreg.L2Penalty), ValueError, "no values to vary"),
        (lambda: kerasreg.grid(kerasreg.L2Penalty, "abc"), TypeError, r"`values`.*abc"),
        (
            lambda: kerasreg.grid(kerasreg.L2Penalty, [1], l2=[2]),
            TypeError,
            r"`l2` is given twice",
        ),
        (lambda: kerasreg.product(), ValueError, "at least one list"),
        (lambda: kerasreg.product([]), ValueError, r"`axes\[0\]`: empty"),
        (lambda: kerasreg.product(None), TypeError, r"`axes\[0\]`.*None"),
        (lambda: kerasreg.log_range(0, 1), ValueError, r"`start`.*> 0.*start=0"),
        (lambda: kerasreg.log_range(1, 0.1), ValueError, r"stop >= start"),
        (lambda: kerasreg.log_range(1, 10, 1.5), TypeError, r"`per_decade`.*1.5"),
        (lambda: kerasreg.log_range(1, 10, 0), ValueError, r"`per_decade`.*0"),
    ],
)
def test_grid_helpers_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


class NoTraining(keras.callbacks.Callback):
    """Fails the test if any fit starts."""

    def on_train_begin(self, logs=None):
        raise AssertionError("a variant started training")


def test_bad_items_seeds_and_callbacks_raise_before_anything_trains(tmp_path):
    x, y = data()
    model = compile_(build())
    before = [w.copy() for w in model.get_weights()]
    guard = [NoTraining()]
    cases = [
        ([[]], ValueError, r"`penalties\[0\]`: an empty list"),
        ([None, [[kerasreg.L2Penalty(1)]]], ValueError, r"`penalties\[1\]`.*inside"),
        ([kerasreg.WeightDecay], TypeError, r"`penalties\[0\]`.*class WeightDecay"),
        (
            [keras.callbacks.EarlyStopping()],
            TypeError,
            r"`penalties\[0\]`.*EarlyStopping is a callback.*`callbacks=`",
        ),
        ([{"kernal": kerasreg.L2Penalty(1)}], ValueError, r"unknown role 'kernal'"),
        (
            [None, kerasreg.WeightDecay(0.1, where="no_such_layer")],
            ValueError,
            r"`penalties\[1\]`: WeightDecay's `where`.*selects no weight",
        ),
    ]
    for items, error, message in cases:
        with pytest.raises(error, match=message):
            kerasreg.sweep(model, items, x, y, callbacks=guard, **FIT)
    decay = kerasreg.WeightDecay(0.1)
    with pytest.raises(ValueError, match=r"same transform WeightDecay instance"):
        kerasreg.sweep(model, [[decay, decay]], x, y, callbacks=guard, **FIT)
    for seeds, error in (([], ValueError), ([0, 0], ValueError), (3, TypeError)):
        with pytest.raises(error, match=r"`seeds`"):
            kerasreg.sweep(model, [None], x, y, seeds=seeds, callbacks=guard, **FIT)
    for seeds in ([-1], [2**32]):
        with pytest.raises(ValueError, match=rf"`seeds`.*2\*\*32 - 1.*{seeds[0]}"):
            kerasreg.sweep(model, [None], x, y, seeds=seeds, callbacks=guard, **FIT)
    scheduled = compile_(build())
    scheduled.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        ),
        loss="binary_crossentropy",
    )
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss")
    with pytest.raises(
        ValueError, match=r"`callbacks\[1\]`: ReduceLROnPlateau.*ExponentialDecay"
    ):
        kerasreg.sweep(scheduled, [None], x, y, callbacks=[*guard, plateau], **FIT)
    shared = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"))
    with pytest.raises(ValueError, match=r"`callbacks\[1\]`.*\{variant\}.*2 variants"):
        kerasreg.sweep(model, [None, None], x, y, callbacks=[*guard, shared], **FIT)
    log = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    example = re.escape(repr(str(tmp_path / "{variant}.csv")))
    with pytest.raises(ValueError, match=rf"CSVLogger.filename=.*e\.g\. {example}"):
        kerasreg.sweep(model, [None, None], x, y, callbacks=[*guard, log], **FIT)
    backups = [keras.callbacks.BackupAndRestore(str(tmp_path / n)) for n in "ab"]
    with pytest.raises(
        ValueError, match=r"`callbacks\[1\]` and `callbacks\[2\]` are both Backup"
    ):
        kerasreg.sweep(model, [None], x, y, callbacks=[*guard, *backups], **FIT)

    class MyBackup(keras.callbacks.BackupAndRestore):
        pass

    with pytest.raises(ValueError, match=r"`callbacks\[1\]`: MyBackup is a subclass"):
        kerasreg.sweep(
            model, [None], x, y, callbacks=[*guard, MyBackup(str(tmp_path))], **FIT
        )
    with pytest.raises(TypeError, match=r"`callbacks`.*list"):
        kerasreg.sweep(model, [None], x, y, callbacks=guard[0], **FIT)
    # One object twice: a plain fit calls it twice per epoch (an EarlyStopping
    # counts its patience twice), which per-run copies cannot do.
    stop = keras.callbacks.EarlyStopping(patience=2)
    with pytest.raises(
        ValueError, match=r"`callbacks\[2\]`.*same EarlyStopping.*`callbacks\[1\]`"
    ):
        kerasreg.sweep(model, [None], x, y, callbacks=[*guard, stop, stop], **FIT)
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not list(tmp_path.rglob("*.keras"))


# --- every knob, seeds and callbacks: each run equals its own fit ------------------


def test_transform_and_mixed_grids_equal_separate_fits(caplog):
    x, y = data()
    model = compile_(build())
    grid = [
        kerasreg.WeightDecay(0.05),
        kerasreg.WeightDecay(0.02, toward="start"),
        kerasreg.SoftThreshold(2e-3),
        [kerasreg.L2Penalty(1e-2), kerasreg.WeightDecay(0.05)],
    ]
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(model, grid, x, y, **FIT)
    assert result.engine == "sequential"
    assert "post-step transforms (SoftThreshold, WeightDecay)" in caplog.text
    assert [row["family"] for row in result.rows] == [
        "WeightDecay",
        "WeightDecay_toward_start",
        "SoftThreshold",
        "L2Penalty+WeightDecay",
    ]
    references = [
        (None, [kerasreg.WeightDecay(0.05)]),
        (None, [kerasreg.WeightDecay(0.02, toward="start")]),
        (None, [kerasreg.SoftThreshold(2e-3)]),
        (kerasreg.L2Penalty(1e-2), [kerasreg.WeightDecay(0.05)]),
    ]
    for (penalty, transforms), row, trained in zip(
        references, result.rows, result.models, strict=True
    ):
        history, reference = reference_fit(model, penalty, transforms, x, y, **FIT)
        assert_same_run(row, trained, history, reference)
        assert row["best_epoch"] == 1 and row["epochs"] == 2
    # The transforms of the grid were never attached to any fit.
    for item in grid:
        for transform in item if isinstance(item, list) else [item]:
            assert getattr(transform, "_model", None) is None
    # The decay acted: the weights differ from the undecayed fit.
    plain, _ = reference_fit(model, None, [], x, y, **FIT)
    assert not np.allclose(result.rows[0]["history"]["loss"], plain["loss"])


def test_a_transform_only_item_removes_the_templates_penalty_as_none_does():
    # A template with its own kernel penalty: the grid point "WeightDecay"
    # is decay without penalty, like None and `[None, decay]`, never decay on
    # top of the template's L2 (compared with a plain fit of the template
    # built without the penalty, the transform as a callback).
    x, y = data()
    model = compile_(build(kerasreg.L2Penalty(0.5)))
    grid = [None, kerasreg.WeightDecay(1e-3), [None, kerasreg.WeightDecay(1e-3)]]
    result = kerasreg.sweep(model, grid, x, y, **FIT)
    assert [row["family"] for row in result.rows] == [
        "none",
        "WeightDecay",
        "none+WeightDecay",
    ]
    references = [(None, []), *[(None, [kerasreg.WeightDecay(1e-3)])] * 2]
    for (penalty, transforms), row, trained in zip(
        references, result.rows, result.models, strict=True
    ):
        history, reference = reference_fit(model, penalty, transforms, x, y, **FIT)
        assert_same_run(row, trained, history, reference)
        assert all(w.regularizer is None for w in trained.weights)
        assert row["config"] == {"kernel": None}
    # The template's penalty would have made a difference.
    kept, _ = reference_fit(
        model, kerasreg.L2Penalty(0.5), [kerasreg.WeightDecay(1e-3)], x, y, **FIT
    )
    assert not np.allclose(result.rows[1]["history"]["loss"], kept["loss"])


def test_each_seeded_repeat_in_separate_fits_equals_a_template_built_with_that_seed():
    x, y = data()
    model = compile_(build(dropout=0.25))
    grid = [None, kerasreg.L2Penalty(1e-2)]
    seeds = [4, 7]
    fit = dict(FIT, shuffle=True)  # in K fits the order, too, is that seed's
    result = kerasreg.sweep(model, grid, x, y, seeds=seeds, engine="sequential", **fit)
    assert [(row["penalty"], row["seed"]) for row in result.rows] == [
        ("none", 4),
        ("none", 7),
        ("L2Penalty_0.01", 4),
        ("L2Penalty_0.01", 7),
    ]
    assert [row["run"] for row in result.rows][1] == "none/seed_7"
    for index, (row, trained) in enumerate(
        zip(result.rows, result.models, strict=True)
    ):
        keras.utils.set_random_seed(row["seed"])
        reference = compile_(build(grid[index // 2], dropout=0.25))
        history = reference.fit(x, y, **fit).history
        assert_same_run(row, trained, history, reference)
    # Different seeds: different runs; the template's weights were not used.
    a, b = (np.asarray(m.layers[0].kernel) for m in result.models[:2])
    assert not np.allclose(a, b)
    assert result.repeated
    summary = result.summary()
    assert [entry["runs"] for entry in summary] == [[0, 1], [2, 3]]
    losses = [row["loss"] for row in result.rows[:2]]
    assert summary[0]["loss"] == pytest.approx(np.mean(losses))
    assert summary[0]["loss_std"] == pytest.approx(np.std(losses, ddof=1))


def set_random_seed_resets_keras_global_generator():
    """Whether `set_random_seed` makes Keras's global generator draw again
    what it drew (newer Keras); otherwise a layer drawing with seed=None has
    no reproducible plain fit to compare with."""
    draws = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        draws.append(float(keras.ops.convert_to_numpy(keras.random.uniform(()))))
    return draws[0] == draws[1]


def assert_runs_equal_seeded_fits(result, template, grid, repeats, x, y):
    """Each run equals a plain fit of `template(penalty)` built and fitted
    under its seed (`FIT`: shuffle=False)."""
    for index, (row, trained) in enumerate(
        zip(result.rows, result.models, strict=True)
    ):
        keras.utils.set_random_seed(row["seed"])
        reference = compile_(template(grid[index // repeats]))
        keras.utils.set_random_seed(row["seed"])
        history = reference.fit(x, y, **FIT).history
        assert_same_run(row, trained, history, reference)


@pytest.mark.parametrize("engine", ["auto", "vectorized", "stacked"])
@pytest.mark.parametrize("dropout_seed", [None, 11])
def test_seeded_repeats_train_in_one_fit_each_equal_to_its_own_fit(
    engine, dropout_seed, caplog
):
    # Each run starts from weights drawn under its seed and draws the Dropout
    # masks its own fit draws (an unseeded Dropout: from its own generator,
    # made under the seed; a seeded one: the layer's seed), in one fit.
    x, y = data()
    backend = keras.backend.backend()

    def template(penalty=None):
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(8, "tanh", kernel_regularizer=penalty),
                keras.layers.Dropout(0.25, seed=dropout_seed),
                keras.layers.Dense(1, "sigmoid", kernel_regularizer=penalty),
            ]
        )

    grid = [None, kerasreg.L2Penalty(1e-2)]
    seeds = [4, 7, 9]
    torch_global = backend == "torch" and dropout_seed is None
    if torch_global and engine != "auto":
        with pytest.raises(ValueError, match=r"`seeds`.*torch's global generator"):
            kerasreg.sweep(
                compile_(template()), grid, x, y, seeds=seeds, engine=engine, **FIT
            )
        return
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(
            compile_(template()), grid, x, y, seeds=seeds, engine=engine, **FIT
        )
    if torch_global:  # K separate fits, and the log says why
        assert result.engine == "sequential"
        assert "torch's global generator" in caplog.text
    else:
        assert result.engine == (engine if engine != "auto" else "vectorized")
    assert_runs_equal_seeded_fits(result, template, grid, len(seeds), x, y)
    # The three repeats of a point are three different runs.
    losses = [row["loss"] for row in result.rows[:3]]
    assert len(set(losses)) == 3


@keras.saving.register_keras_serializable(package="kerasreg_tests")
class GlobalNoise(keras.layers.Layer):
    """Drops with `keras.random.dropout(x, 0.3)`: Keras's global generator."""

    def call(self, x, training=False):
        return keras.random.dropout(x, 0.3) if training else x


@pytest.mark.parametrize(
    "layer, one_fit",
    [
        pytest.param(lambda: keras.layers.GaussianNoise(0.3), True, id="GaussianNoise"),
        pytest.param(
            lambda: keras.layers.Dropout(0.3, noise_shape=(None, 1)),
            True,
            id="Dropout-noise_shape",
        ),
        pytest.param(lambda: keras.layers.Dropout(0.3), None, id="Dropout"),
        pytest.param(lambda: GlobalNoise(), False, id="global-draws"),
    ],
)
def test_seeds_keep_one_fit_unless_a_layer_draws_from_global_generators(
    layer, one_fit, caplog
):
    # `None`: one fit except on PyTorch, where an unseeded Dropout mask comes
    # from torch's global generator. A layer drawing with seed=None (Keras's
    # global generator; JAX refuses it in a compiled step) needs K fits.
    backend = keras.backend.backend()
    if one_fit is None:
        one_fit = backend != "torch"
    if backend == "jax" and not one_fit:
        pytest.skip("JAX refuses unseeded random draws in a compiled step")
    x, y = data()

    def template(penalty=None):
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(8, "tanh", kernel_regularizer=penalty),
                layer(),
                keras.layers.Dense(1, "sigmoid", kernel_regularizer=penalty),
            ]
        )

    grid = [None, kerasreg.L2Penalty(1e-2)]
    seeds = [4, 7]
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = kerasreg.sweep(compile_(template()), grid, x, y, seeds=seeds, **FIT)
    if one_fit:  # (GaussianNoise has no batched kernel: stacked off JAX)
        assert result.engine != "sequential", result.engine_reason
    else:
        assert result.engine == "sequential"
        assert "global generator" in result.engine_reason
        if not set_random_seed_resets_keras_global_generator():
            return  # (Keras 3.8: no plain fit under a seed to compare with)
    assert_runs_equal_seeded_fits(result, template, grid, len(seeds), x, y)


def test_seeds_with_an_rnn_without_dropout_keep_one_fit():
    # An LSTM's cell has an unseeded generator, used only with dropout > 0.
    x, y = data()
    model = keras.Sequential(
        [keras.Input((3, 1)), keras.layers.LSTM(4), keras.layers.Dense(1, "sigmoid")]
    )
    result = kerasreg.sweep(
        compile_(model), [None], x[..., None], y, seeds=[1, 2], **FIT
    )
    assert result.engine == "vectorized", result.engine_reason


def test_seeds_with_a_stateful_rnn_equal_their_own_fits():
    """The check for draws from the global generators calls the template in
    training mode: a stateful RNN's states (variables Keras does not track)
    must be restored too, or the first run's fit starts from changed states."""
    if keras.backend.backend() == "torch":
        pytest.skip("Keras's stateful LSTM does not train on PyTorch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 3)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")

    def template():
        model = keras.Sequential(
            [
                keras.Input(batch_shape=(8, 5, 3)),
                keras.layers.LSTM(4, stateful=True),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    fit = dict(FIT, batch_size=8)
    result = kerasreg.sweep(template(), [None], x, y, seeds=[0, 1], **fit)
    assert "global generators" not in result.engine_reason
    for row in result.rows:
        keras.utils.set_random_seed(row["seed"])
        reference = template()
        keras.utils.set_random_seed(row["seed"])
        history = reference.fit(x, y, **fit).history
        np.testing.assert_allclose(
            row["history"]["loss"], history["loss"], rtol=RTOL, atol=ATOL
        )


def test_a_shuffled_one_fit_sweep_with_seeds_is_reproducible():
    # One fit, one data order for all runs (drawn after the first seed):
    # the same sweep twice gives the same numbers.
    x, y = data()
    fit = dict(FIT, shuffle=True)
    results = [
        kerasreg.sweep(
            compile_(build(dropout=0.25)),
            [None, kerasreg.L2Penalty(1e-2)],
            x,
            y,
            seeds=[1, 2],
            **fit,
        )
        for _ in range(2)
    ]
    if keras.backend.backend() != "torch":  # torch: K fits (unseeded Dropout)
        assert results[0].engine == "vectorized"
    for first, second in zip(*(r.rows for r in results), strict=True):
        assert first["history"] == second["history"]


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of the `at`-th epoch of the whole sweep (all runs)."""

    def __init__(self, at, counter):
        super().__init__()
        self.at = at
        self.counter = counter  # shared by the runs' copies

    def __deepcopy__(self, memo):
        return Interrupt(self.at, self.counter)

    def on_epoch_end(self, epoch, logs=None):
        self.counter.append(epoch)
        if len(self.counter) == self.at:
            raise KeyboardInterrupt(f"interrupted at epoch {epoch}")


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    """One BackupAndRestore for the whole sweep: called again after an
    interruption in its second run, the sweep loads the first run, resumes
    the second where its backup ends and trains the others; rows, weights and
    optimizer state equal those of the sweep never interrupted, with an
    unseeded Dropout (its generator's state is not in Keras's backup) and
    `shuffle=True` (NumPy's and torch's global generators)."""
    x, y = data(n=64)
    grid = [None, kerasreg.L2Penalty(0.1)]
    fit = dict(FIT, epochs=5, validation_split=0.25, shuffle=True)
    folder = tmp_path / "backup"
    model = compile_(build(dropout=0.25))  # the template (left unchanged)

    def backup():
        return keras.callbacks.BackupAndRestore(str(folder))

    def run(*callbacks, **options):
        return kerasreg.sweep(
            model, grid, x, y, seeds=[1, 2], callbacks=list(callbacks), **fit,
            **options,
        )  # fmt: skip

    whole = run(engine="sequential")
    counter = []
    with pytest.raises(KeyboardInterrupt):
        run(Interrupt(8, counter), backup())
    assert counter[-1] == 2  # run 2 (none/seed_2), its third epoch
    assert sorted(p.name for p in folder.iterdir()) == ["none", "sweep.json"]
    assert sorted(p.name for p in (folder / "none").iterdir()) == [
        "seed_1.done",
        "seed_2",
        "seed_2.history.json",
    ]
    # A sweep of the same runs with other settings may not use it either.
    for changed in (dict(epochs=6), dict(batch_size=8)):
        with pytest.raises(ValueError, match=r"other settings \(fit differ"):
            kerasreg.sweep(
                model, grid, x, y, seeds=[1, 2], callbacks=[NoTraining(), backup()],
                **{**fit, **changed},
            )  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(data differ"):
        kerasreg.sweep(
            model, grid, x + 1, y, seeds=[1, 2], callbacks=[NoTraining(), backup()],
            **fit,
        )  # fmt: skip
    # A sweep of other runs may not use this backup: refused, nothing trained.
    with pytest.raises(ValueError, match=r"holds the backup of another sweep"):
        kerasreg.sweep(
            model, grid[:1], x, y, seeds=[1, 2], callbacks=[NoTraining(), backup()],
            **fit,
        )  # fmt: skip
    counter.clear()
    resumed = run(Interrupt(99, counter), backup())
    assert resumed.engine == "sequential"
    if keras.backend.backend() != "torch":  # (torch names its Dropout first)
        assert "BackupAndRestore" in resumed.engine_reason
    # Run 1 loaded, run 2 from its last backup (the end of its epoch 1), the
    # other two whole.
    assert counter == [2, 3, 4, *range(5), *range(5)]
    assert not folder.exists()  # delete_checkpoint=True: the backup is gone
    for a, b, model_a, model_b in zip(
        whole.rows, resumed.rows, whole.models, resumed.models, strict=True
    ):
        assert a["history"] == b["history"], a["run"]
        assert a["best_epoch"] == b["best_epoch"]
        for got, want in zip(
            model_b.variables + model_b.optimizer.variables,
            model_a.variables + model_a.optimizer.variables,
            strict=True,
        ):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want)
            )


def _interrupted_then_resumed(model, grid, x, y, folder, at, fit, backup=None):
    """The sweep interrupted at its `at`-th epoch, then called again; the
    resumed result and the epochs the second call trained."""
    backup = backup or (lambda: keras.callbacks.BackupAndRestore(str(folder)))
    counter = []
    with pytest.raises(KeyboardInterrupt):
        kerasreg.sweep(
            model, grid, x, y, callbacks=[Interrupt(at, counter), backup()], **fit
        )
    counter.clear()
    resumed = kerasreg.sweep(
        model, grid, x, y, callbacks=[Interrupt(99, counter), backup()], **fit
    )
    return resumed, counter


def test_a_sweep_with_seeds_resumes_to_the_uninterrupted_result(tmp_path):
    # Runs named `none/seed_1`: their backup files are in a subfolder.
    x, y = data(n=64)
    model = compile_(build())
    grid = [None, kerasreg.L2Penalty(1e-2)]
    fit = dict(FIT, epochs=3)
    whole = kerasreg.sweep(
        model, grid, x, y, seeds=[1, 2], engine="sequential", **fit
    )  # fmt: skip
    resumed, counter = _interrupted_then_resumed(
        model, grid, x, y, tmp_path / "backup", 5, dict(fit, seeds=[1, 2])
    )
    assert counter == [1, 2, *range(3), *range(3)]  # run 2 resumed at epoch 1
    for a, b, model_a, model_b in zip(
        whole.rows, resumed.rows, whole.models, resumed.models, strict=True
    ):
        assert a["history"] == b["history"]
        for got, want in zip(model_b.weights, model_a.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_resumed_shuffled_sweep_keeps_one_data_order(tmp_path):
    """Without `seeds=` one data order is drawn per sweep and shared by its
    runs: three runs of one grid point are one result. The resumed sweep
    trains its third run in the order of its first, loaded, run."""
    x, y = data(n=64)
    grid = [kerasreg.L2Penalty(1e-2)] * 3
    fit = dict(FIT, epochs=3, shuffle=True)
    resumed, counter = _interrupted_then_resumed(
        compile_(build()), grid, x, y, tmp_path / "backup", 5, fit
    )
    assert counter == [1, 2, *range(3)]
    first, _, third = resumed.rows
    assert first["history"] == third["history"]


def test_a_backup_of_other_starting_weights_is_refused(tmp_path):
    # The same runs from a template built again (other weights): refused
    # before anything trains, not silently loaded.
    x, y = data(n=64)
    folder = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        kerasreg.sweep(
            compile_(build()), [None, kerasreg.L2Penalty(1e-2)], x, y,
            callbacks=[Interrupt(3, []), keras.callbacks.BackupAndRestore(str(folder))],
            **FIT,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(weights differ"):
        kerasreg.sweep(
            compile_(build()), [None, kerasreg.L2Penalty(1e-2)], x, y,
            callbacks=[NoTraining(), keras.callbacks.BackupAndRestore(str(folder))],
            **FIT,
        )  # fmt: skip


def test_a_backup_refuses_folders_and_changes_it_cannot_trust(tmp_path):
    x, y = data(n=64)
    grid = [None, kerasreg.L2Penalty(1e-2)]
    model = compile_(build())

    def sweep_with(folder, *callbacks, **options):
        backup = keras.callbacks.BackupAndRestore(str(folder))
        return kerasreg.sweep(
            model, grid, x, y, callbacks=[*callbacks, backup], **{**FIT, **options}
        )

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match=r"backup_dir=.*a_file'\) is a file"):
        sweep_with(a_file, NoTraining())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a sweep's backup.*'notes.txt'"):
        sweep_with(notes, NoTraining())
    with pytest.raises(ValueError, match=r"`log_dir`.*inside.*backup_dir"):
        sweep_with(tmp_path / "b", NoTraining(), log_dir=tmp_path / "b" / "logs")
    assert a_file.read_text() == "mine" and (notes / "notes.txt").exists()
    # Interrupted in its first run, after one backup.
    folder = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        sweep_with(folder, Interrupt(2, []))
    # Other penalties on the same runs' names (`where=`): refused.
    with pytest.raises(ValueError, match=r"other settings \(penalties differ"):
        sweep_with(folder, NoTraining(), where="hidden")
    # A backup file cut short (a killed process): a clear error naming it.
    weights = folder / "none" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"backup of this run in .*none.*Delete"):
        sweep_with(folder)
    # As it says: without that run's folder, the run trains again from its
    # start, to the result of the sweep never interrupted.
    shutil.rmtree(folder / "none")
    resumed = sweep_with(folder)
    whole = kerasreg.sweep(model, grid, x, y, engine="sequential", **FIT)
    for a, b in zip(whole.rows, resumed.rows, strict=True):
        assert a["history"] == b["history"]


def test_a_run_backed_up_every_n_batches_resumes_at_its_epoch_twice(tmp_path):
    """Keras's BackupAndRestore records epoch 0 for a backup inside the first
    epoch of a resumed fit: a second interruption restarted the run at 0."""
    x, y = data(n=64)  # 4 batches per epoch
    model = compile_(build())
    fit = dict(FIT, epochs=5)
    folder = tmp_path / "backup"

    def backup():
        return keras.callbacks.BackupAndRestore(str(folder), save_freq=2)

    whole = kerasreg.sweep(model, [None], x, y, engine="sequential", **fit)
    counter = []
    with pytest.raises(KeyboardInterrupt):  # at the end of epoch 2
        kerasreg.sweep(
            model, [None], x, y, callbacks=[Interrupt(3, counter), backup()], **fit
        )
    resumed, counter = _interrupted_then_resumed(
        model, [None], x, y, folder, 1, fit, backup
    )
    # Each resume starts again at epoch 2 (backed up inside it, after its
    # last batch): the first two epochs are those of the uninterrupted run.
    assert counter == [2, 3, 4]
    history = resumed.rows[0]["history"]
    assert history.epochs["loss"] == list(range(5))
    assert history["loss"][:2] == whole.rows[0]["history"]["loss"][:2]


def test_shuffled_separate_fits_share_one_data_order():
    x, y = data()
    model = compile_(build())
    grid = [kerasreg.WeightDecay(0.01), kerasreg.WeightDecay(0.01)]
    result = kerasreg.sweep(model, grid, x, y, **{**FIT, "shuffle": True, "epochs": 3})
    assert [row["penalty"] for row in result.rows] == [
        "WeightDecay_0.01",
        "WeightDecay_0.01_2",
    ]
    first, second = (row["history"] for row in result.rows)
    assert first == second
    for got, want in zip(*(m.get_weights() for m in result.models), strict=True):
        np.testing.assert_array_equal(got, want)


def noisy_problem():
    """Labels independent of the inputs: the validation loss soon rises."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (rng.random((64, 1)) > 0.5).astype("float32")
    return (x[:48], y[:48]), (x[48:], y[48:])


def callbacks_for(folder):
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=1, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            os.path.join(folder, "{variant}.keras"), save_best_only=True
        ),
        keras.callbacks.CSVLogger(os.path.join(folder, "{variant}.csv")),
    ]


def test_callbacks_act_on_each_variant_as_in_its_own_fit(tmp_path):
    (x, y), validation = noisy_problem()
    model = compile_(build(), learning_rate=0.5)
    grid = [None, kerasreg.L2Penalty(1e-3), kerasreg.WeightDecay(0.01)]
    fit = dict(FIT, epochs=12, validation_data=validation)
    result = kerasreg.sweep(
        model, grid, x, y, callbacks=callbacks_for(str(tmp_path / "sweep")), **fit
    )
    stopped = 0
    for index, (row, trained) in enumerate(
        zip(result.rows, result.models, strict=True)
    ):
        folder = tmp_path / f"reference_{index}"
        callbacks = callbacks_for(str(folder))
        callbacks[1].filepath = str(folder / "best.keras")
        callbacks[2].filename = str(folder / "log.csv")
        os.makedirs(folder)
        penalty = grid[index] if index == 1 else None
        transforms = [kerasreg.WeightDecay(0.01)] if index == 2 else []
        history, reference = reference_fit(
            model, penalty, [*transforms, *callbacks], x, y, 0.5, **fit
        )
        assert_same_run(row, trained, history, reference)  # restored weights too
        stopping = callbacks[0]
        assert row["epochs"] == len(history["loss"])
        assert row["best_epoch"] == stopping.best_epoch
        assert row["val_loss"] == pytest.approx(
            history["val_loss"][stopping.best_epoch], rel=RTOL
        )
        stopped += row["epochs"] < 12 and row["best_epoch"] < row["epochs"] - 1
        # Its own checkpoint: the best of its own fit, not of the sweep so far.
        saved = keras.saving.load_model(tmp_path / "sweep" / f"{row['run']}.keras")
        own = keras.saving.load_model(folder / "best.keras")
        for got, want in zip(saved.get_weights(), own.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        with open(tmp_path / "sweep" / f"{row['run']}.csv") as file:
            logged = list(csv.DictReader(file))
        assert [int(r["epoch"]) for r in logged] == list(range(row["epochs"]))
        np.testing.assert_allclose(
            [float(r["val_loss"]) for r in logged], history["val_loss"], rtol=1e-5
        )
    assert stopped >= 1, [row["history"]["val_loss"] for row in result.rows]


# --- results -----------------------------------------------------------------------


def regression_sweep(metrics):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=metrics)
    grid = [None, *kerasreg.grid(kerasreg.L2Penalty, [1e-2, 1.0, 30.0])]
    return kerasreg.sweep(
        model, grid, x[:48], y[:48], validation_data=(x[48:], y[48:]), **FIT
    )


@keras.saving.register_keras_serializable(package="tests")
def close_to_one(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(keras.ops.subtract(y_pred, y_true)))


def test_best_follows_each_metric_direction_as_keras_does():
    metrics = [
        "mae",
        keras.metrics.R2Score(),
        keras.metrics.CosineSimilarity(),
        close_to_one,
    ]
    result = regression_sweep(metrics)
    directions = {"val_r2_score": np.argmax, "val_cosine_similarity": np.argmax}
    directions.update({"val_loss": np.argmin, "val_mae": np.argmin, "loss": np.argmin})
    for monitor, arg in directions.items():
        values = [row[monitor] for row in result.rows]
        assert len(set(values)) > 1, monitor  # the grid matters
        assert result.best(monitor) is result.rows[int(arg(values))], monitor
    # Keras's own rule for R2 and cosine similarity: maximized.
    for metric in (keras.metrics.R2Score(), keras.metrics.CosineSimilarity()):
        assert metric._direction == "up"
    # A metric without a direction: refused, as Keras refuses it; mode= decides.
    with pytest.raises(ValueError, match=r"close_to_one.*mode='max'"):
        result.best("val_close_to_one")
    values = [row["val_close_to_one"] for row in result.rows]
    assert (
        result.best("val_close_to_one", mode="max")
        is result.rows[int(np.argmax(values))]
    )
    with pytest.raises(ValueError, match=r"`mode`.*'best'"):
        result.best("val_loss", mode="best")
    assert (
        result.best_model("val_r2_score")
        is result.models[int(np.argmax([row["val_r2_score"] for row in result.rows]))]
    )


def synthetic(seeds=(None,)):
    """A SweepResult built from hand-made rows (known numbers, no training)."""
    points = parse_grid(
        [
            None,
            *kerasreg.grid(kerasreg.L2Penalty, [1e-3, 1e-2]),
            *kerasreg.grid(kerasreg.WeightDecay, [1e-3, 1e-2]),
            *kerasreg.product(
                kerasreg.grid(kerasreg.L2Penalty, [1e-3, 1e-2]),
                kerasreg.grid(kerasreg.WeightDecay, [1e-3, 1e-2]),
            ),
        ],
        "kernel",
    )
    rng = np.random.default_rng(5)
    rows = []
    for point in points:
        for seed in seeds:
            loss = rng.random(3).tolist()
            history = {"loss": loss, "val_loss": (rng.random(3) + 1).tolist()}
            rows.append(make_row(point, point.name, seed, history, best_epoch=1))
    return SweepResult(rows, [None] * len(rows), "sequential")


def test_summary_best_and_tables_read_back(tmp_path):
    result = synthetic(seeds=(0, 1, 2))
    assert len(result.rows) == 27 and result.repeated
    val = np.array([row["history"]["val_loss"][1] for row in result.rows])
    assert [row["val_loss"] for row in result.rows] == list(val)  # at best_epoch
    means = val.reshape(9, 3).mean(axis=1)
    best = result.best("val_loss")
    assert best["penalty"] == result.summary()[int(np.argmin(means))]["penalty"]
    assert best["val_loss"] == pytest.approx(means.min())
    assert best["val_loss_std"] == pytest.approx(
        np.std(val.reshape(9, 3)[int(np.argmin(means))], ddof=1)
    )
    # The CSV, read back with Python's csv module: one line per run...
    path = result.to_csv(tmp_path / "runs.csv")
    with open(path) as file:
        lines = list(csv.DictReader(file))
    assert len(lines) == 27
    for line, row in zip(lines, result.rows, strict=True):
        assert line["run"] == row["run"] and int(line["seed"]) == row["seed"]
        assert line["family"] == row["family"]
        assert float(line["val_loss"]) == pytest.approx(row["val_loss"], rel=1e-12)
        for key in ("L2Penalty.l2", "WeightDecay.rate"):
            expected = row["values"].get(key)
            assert line[key] == ("" if expected is None else repr(expected))
    # ... or per grid point, with the spread.
    with open(result.to_csv(tmp_path / "points.csv", summary=True)) as file:
        points = list(csv.DictReader(file))
    assert len(points) == 9 and [int(p["runs"]) for p in points] == [3] * 9
    np.testing.assert_allclose([float(p["val_loss"]) for p in points], means)
    text = str(result)
    assert text.splitlines()[0].split()[:2] == ["penalty", "runs"]
    assert "+-" in text.splitlines()[1]


def test_to_frame_needs_pandas_and_says_so():
    result = synthetic()
    try:
        import pandas
    except ImportError:
        with pytest.raises(ImportError, match=r"pandas.*to_csv"):
            result.to_frame()
        return
    frame = result.to_frame()
    columns, records = result.table()
    assert list(frame.columns) == columns and len(frame) == len(records)
    assert isinstance(frame, pandas.DataFrame)


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    result = synthetic()
    # `None` in sys.modules makes `import matplotlib` fail as if not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plot needs matplotlib") as error:
        result.plot(tmp_path / "curve.png")
    assert "pip install matplotlib" in str(error.value)
    assert "kerasreg[examples]" in str(error.value)
    assert not (tmp_path / "curve.png").exists()


def test_plot_draws_one_line_per_family_and_marks_the_best(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = synthetic(seeds=(0, 1))
    fig, ax = plt.subplots()
    assert result.plot(None, ax=ax) is None
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    best = result.best("val_loss")
    assert labels == [
        "none",
        "L2Penalty",
        "WeightDecay",
        "L2Penalty+WeightDecay (WeightDecay.rate=0.001)",
        "L2Penalty+WeightDecay (WeightDecay.rate=0.01)",
        f"best by val_loss: {best['penalty']}",
    ]
    # The decay rates are their own line, at their own x values.
    decay = next(line for line in ax.get_lines() if line.get_label() == "WeightDecay")
    assert list(decay.get_xdata()) == [1e-3, 1e-2]
    entries = {e["penalty"]: e for e in result.summary()}
    np.testing.assert_allclose(
        decay.get_ydata(),
        [entries[f"WeightDecay_{r:g}"]["val_loss"] for r in (1e-3, 1e-2)],
    )
    star = next(line for line in ax.get_lines() if line.get_marker() == "*")
    assert star.get_ydata()[0] == pytest.approx(best["val_loss"])
    assert len(ax.collections) == 4  # a band of one std per line with x values
    plt.close(fig)
    png = result.plot(tmp_path / "curve.png")
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


# --- TensorBoard, progress, warnings ------------------------------------------------


def sessions(folder):
    """`{run folder: SessionStartInfo}` of every HParams session under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        if not any(name.startswith("events.") for name in files):
            continue
        accumulator = EventAccumulator(root, size_guidance={"tensors": 0})
        accumulator.Reload()
        if "_hparams_/session_start_info" in accumulator.Tags()["tensors"]:
            content = accumulator.SummaryMetadata(
                "_hparams_/session_start_info"
            ).plugin_data.content
            info = plugin_data_pb2.HParamsPluginData.FromString(content)
            found[os.path.relpath(root, folder)] = (
                info.session_start_info,
                accumulator,
            )
    return found


def test_hparams_trials_are_unique_across_sweeps_and_group_repeats(tmp_path):
    x, y = data()
    model = compile_(build())
    grid = [None, kerasreg.WeightDecay(0.01)]
    fit = dict(FIT, validation_data=data(16, seed=4))
    first = kerasreg.sweep(model, grid, x, y, log_dir=tmp_path / "a", **fit)
    kerasreg.sweep(model, grid, x, y, log_dir=tmp_path / "b", **fit)
    found = sessions(tmp_path)
    assert sorted(found) == [
        "a/WeightDecay_0.01",
        "a/none",
        "b/WeightDecay_0.01",
        "b/none",
    ]
    # TensorBoard groups sessions by group name: four trials, not two.
    assert len({info.group_name for info, _ in found.values()}) == 4
    for row in first.rows:
        info, accumulator = found[f"a/{row['run']}"]
        assert info.hparams["penalty"].string_value == row["penalty"]
        assert info.hparams["family"].string_value == row["family"]
        for key, value in row["values"].items():
            assert info.hparams[key].number_value == pytest.approx(value)
        events = accumulator.Tensors("hparams/val_loss")
        assert [e.step for e in events] == [row["best_epoch"]]
        assert float(tensor_util.make_ndarray(events[0].tensor_proto)) == pytest.approx(
            row["val_loss"], rel=1e-6
        )
    # Repeats over seeds: one trial per grid point, one session per run.
    kerasreg.sweep(model, grid, x, y, seeds=[0, 1], log_dir=tmp_path / "c", **fit)
    seeded = sessions(tmp_path / "c")
    assert sorted(seeded) == [
        "WeightDecay_0.01/seed_0",
        "WeightDecay_0.01/seed_1",
        "none/seed_0",
        "none/seed_1",
    ]
    groups = {run: info.group_name for run, (info, _) in seeded.items()}
    assert groups["none/seed_0"] == groups["none/seed_1"]
    assert len(set(groups.values())) == 2
    root = EventAccumulator(str(tmp_path / "c"))
    root.Reload()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        root.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    assert [h.name for h in experiment.hparam_infos] == [
        "penalty",
        "family",
        "strength",
        "WeightDecay.rate",
    ]


@pytest.mark.parametrize("verbose", [1, 2])
def test_progress_names_variants_and_prints_the_best_on_its_own_line(verbose, capsys):
    x, y = data()
    model = compile_(build())
    grid = [None, *kerasreg.grid(kerasreg.L2Penalty, [1e-1, 3.0])]
    result = kerasreg.sweep(
        model, grid, x, y, **dict(FIT, validation_data=data(16, 4), verbose=verbose)
    )
    assert result.stacked
    printed = capsys.readouterr().out
    assert "v0000" not in printed and "v0001" not in printed
    val = np.array([row["history"]["val_loss"] for row in result.rows])
    # After epoch e: the variant with the lowest val_loss of epochs 0..e.
    so_far = np.minimum.accumulate(val, axis=1)
    expected = [
        (result.rows[int(np.argmin(column))]["penalty"], float(np.min(column)))
        for column in so_far.T
    ]
    announced = re.findall(r"^best so far by val_loss: (\S+) \((\S+)\)", printed, re.M)
    assert [name for name, _ in announced] == [name for name, _ in expected]
    for (_, shown), (_, value) in zip(announced, expected, strict=True):
        assert float(shown) == pytest.approx(value, rel=1e-3)  # printed to 4 digits
    assert len(re.findall("best so far", printed)) == FIT["epochs"]


def test_a_sweep_with_log_dir_emits_no_warning_from_kerasreg(tmp_path):
    x, y = data()
    model = compile_(build())
    model.compile(  # AUC: the stacked engine; six variants, six norm programs
        optimizer="adam",
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kerasreg.sweep(
                model,
                [None, *kerasreg.grid(kerasreg.L2Penalty, kerasreg.log_range(1e-5, 1))],
                x,
                y,
                log_dir=tmp_path,
                **dict(FIT, validation_data=data(16, 4)),
            )
    finally:
        tf_logger.removeHandler(handler)
    retracing = [r.getMessage() for r in records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]
    ours = [w for w in caught if os.sep + "kerasreg" + os.sep in str(w.filename)]
    assert not ours, [str(w.message) for w in ours]
    assert len(os.listdir(tmp_path)) > 6  # six runs and the experiment


def test_row_values_follow_the_best_epoch():
    point = parse_grid([kerasreg.L2Penalty(1e-3)], "kernel")[0]
    history = {"loss": [3.0, 1.0, 2.0], "val_loss": [4.0, 2.5, 3.5]}
    row = make_row(point, point.name, None, history, best_epoch=1)
    assert (row["loss"], row["val_loss"], row["epochs"]) == (1.0, 2.5, 3)
    last = make_row(point, point.name, None, history)
    assert last["best_epoch"] == 2 and last["val_loss"] == 3.5
    assert math.isclose(last["strength"], 1e-3)


def test_best_refuses_a_monitor_no_run_has_at_its_best_epoch(tmp_path):
    # validation_freq=2 over 3 epochs: the last epoch, each run's best_epoch
    # without early stopping, has no val_loss; ranking the runs by it would
    # pick the first row whatever its values.
    x, y = data(32)
    template = build()
    template.compile(optimizer="adam", loss="mse")
    result = kerasreg.sweep(
        template,
        [kerasreg.L2Penalty(1.0), None],
        x,
        y,
        epochs=3,
        validation_split=0.25,
        validation_freq=2,
        shuffle=False,
        verbose=0,
    )
    for row in result.rows:
        assert len(row["history"]["val_loss"]) == 1 and "val_loss" not in row
    with pytest.raises(ValueError, match="monitor='val_loss'"):
        result.best("val_loss")
    with pytest.raises(ValueError, match="monitor='val_loss'"):
        result.best_model("val_loss")
    losses = [row["loss"] for row in result.rows]
    assert result.best("loss") is result.rows[int(np.argmin(losses))]
    result.plot(tmp_path / "plot.png")  # no best to mark: drawn without it
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize(
    "fit_options",
    [
        dict(initial_epoch=2, monitor="val_loss"),
        dict(validation_freq=2, monitor="loss"),
    ],
    ids=["initial_epoch", "validation_freq"],
)
@pytest.mark.parametrize("engine", ["auto", "sequential"])
def test_best_epoch_is_kerass_epoch_number_and_rows_read_it(fit_options, engine):
    """`best_epoch` is the epoch as Keras numbers it (`EarlyStopping.best_epoch`,
    from `initial_epoch`); a row holds each key's value measured at that epoch,
    and no value of a neighbouring epoch where validation was skipped."""
    options = dict(fit_options)
    monitor = options.pop("monitor")
    (x, y), validation = noisy_problem()
    model = compile_(build(), learning_rate=0.5)
    grid = [None, kerasreg.L2Penalty(3e-2)]
    # 11 epochs with validation_freq=2: the last epoch (10) is not validated.
    epochs = 11 if "validation_freq" in options else 12
    fit = dict(FIT, epochs=epochs, validation_data=validation, **options)

    def stopping():
        return keras.callbacks.EarlyStopping(
            monitor=monitor, patience=2, restore_best_weights=True
        )

    result = kerasreg.sweep(
        model, grid, x, y, engine=engine, callbacks=[stopping()], **fit
    )
    first = options.get("initial_epoch", 0)
    for penalty, row, trained in zip(grid, result.rows, result.models, strict=True):
        callback = stopping()
        history, reference = reference_fit(model, penalty, [callback], x, y, 0.5, **fit)
        assert_same_run(row, trained, history, reference)
        assert row["best_epoch"] == callback.best_epoch
        ran = list(range(first, first + len(history["loss"])))
        validated = [e for e in ran if (e + 1) % options.get("validation_freq", 1) == 0]
        assert row["loss"] == pytest.approx(
            history["loss"][ran.index(callback.best_epoch)], rel=RTOL
        )
        if callback.best_epoch in validated:
            assert row["val_loss"] == pytest.approx(
                history["val_loss"][validated.index(callback.best_epoch)], rel=RTOL
            )
        else:
            assert "val_loss" not in row


def test_a_swept_model_saves_and_loads_without_warnings(tmp_path, recwarn):
    # Engines that train one optimizer for the stack hand back each variant
    # with a fresh optimizer: built, so the saved file holds all its slots
    # and loads without Keras's "Skipping variable loading" warning.
    x, y = data()
    result = kerasreg.sweep(
        compile_(build()), [None, kerasreg.L2Penalty(1e-2)], x, y, **FIT
    )
    path = tmp_path / "best.keras"
    result.best_model("loss").save(path)
    loaded = keras.models.load_model(path)
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "Skipping variable loading" in m], messages
    for got, want in zip(
        loaded.get_weights(), result.best_model("loss").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert len(loaded.optimizer.variables) == len(
        result.best_model("loss").optimizer.variables
    )


def test_the_global_draws_check_leaves_every_global_generator_as_it_was():
    from keras.src.backend.common import global_state

    from kerasreg.sweep.repeats import draws_from_global_generators

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), GlobalNoise()])
    if keras.backend.backend() == "jax":
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])

    def draws():
        return np.random.rand(), random.random()

    def keras_global_state():  # Keras's global SeedGenerator (made if missing)
        keras.random.uniform(())
        generator = global_state.get_global_attribute("global_seed_generator")
        return keras.ops.convert_to_numpy(generator.state.value).tolist()

    keras.utils.set_random_seed(5)
    want = draws()
    keras.utils.set_random_seed(5)
    keras_before = keras_global_state()
    weights = [w.copy() for w in model.get_weights()]
    draws_from_global_generators(model)
    generator = global_state.get_global_attribute("global_seed_generator")
    assert keras.ops.convert_to_numpy(generator.state.value).tolist() == keras_before
    keras.utils.set_random_seed(5)
    draws_from_global_generators(model)
    assert draws() == want
    for got, before in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, before)


def test_plot_marks_a_best_run_without_knob_values_on_its_line():
    # The baseline (no penalty) is a horizontal line; when it is the best,
    # its star is drawn on that line (at the left edge), not only in the legend.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = parse_grid(
        [None, *kerasreg.grid(kerasreg.L2Penalty, [1e-3, 1e-2])], "kernel"
    )
    rows = [
        make_row(point, point.name, None, {"loss": [0.5], "val_loss": [value]})
        for point, value in zip(points, [0.2, 0.4, 0.6], strict=True)
    ]
    result = SweepResult(rows, [None] * len(rows), "sequential")
    fig, ax = plt.subplots()
    result.plot(None, ax=ax)
    star = next(line for line in ax.get_lines() if line.get_marker() == "*")
    assert star.get_label() == "best by val_loss: none"
    assert list(star.get_ydata()) == [0.2]
    baseline = next(line for line in ax.get_lines() if line.get_label() == "none")
    assert list(baseline.get_ydata()) == [0.2, 0.2]  # axhline: the same height
    plt.close(fig)
