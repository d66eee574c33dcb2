"""`sweep(..., callbacks=[...])` in one fit: each variant's callbacks as in its own fit.

Every one-fit engine that runs on the backend is forced in turn, with
`EarlyStopping`, `TerminateOnNaN`, `ModelCheckpoint`, `CSVLogger` and
`ReduceLROnPlateau`, and
each variant is compared with its own plain Keras fit
(`tests/sweep_reference.py`: a `clone_model` copy with the same penalty and
its own copies of the callbacks): history (its length: the variant's stop),
final weights (restored or not), `best_epoch`, the optimizer state of the
engine that keeps one per variant, and the files read back from disk. The
data make the variants stop at different epochs (asserted), so that one
variant's stop cannot pass for another's.
"""

from __future__ import annotations

import csv
import logging
import os

import keras
import numpy as np
import pytest

import kerasreg
from kerasreg.sweep import engines
from tests.sweep_reference import ATOL, RTOL, assert_same_fit, separate_fit

BACKEND = keras.backend.backend()
# (id, engine=, engine_reason starts with, keeps each variant's optimizer state)
ENGINES = [
    pytest.param(
        "batched", "vectorized", "batched kernels", False, id="batched-kernels"
    ),
    pytest.param("stacked", "stacked", "K copies side by side", False, id="stacked"),
]
if BACKEND == "jax":
    ENGINES.insert(
        0,
        pytest.param("mapped", "vectorized", "jax.vmap", True, id="jax-vmap"),
    )


# Batched kernels on TensorFlow are not bit-exact with a separate fit even
# without callbacks (measured on this template, 2 epochs, no callbacks: up to
# 2e-5 absolute in the weights; a batched matmul sums in another order):
# weights compared to 1e-4 there.
def tolerance(implementation):
    if implementation == "batched" and BACKEND == "tensorflow":
        return dict(rtol=RTOL, atol=1e-4)
    return dict(rtol=RTOL, atol=ATOL)


GRID = [None, kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(3e-1)]
EPOCHS = 14


def problem(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 16, 3)).astype("float32")
    y = np.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.3 * rng.normal(size=(n + 16, 1))
    y = y.astype("float32")
    return (x[:n], y[:n]), (x[n:], y[n:])


def template():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(**adam())
    return model


def adam():
    return dict(optimizer=keras.optimizers.Adam(0.05), loss="mse", metrics=["mae"])


def fit_arguments(validation, epochs=EPOCHS):
    """`fit`'s arguments for the sweep and each separate fit alike."""
    return dict(
        epochs=epochs,
        batch_size=8,
        shuffle=False,
        verbose=0,
        validation_data=validation,
    )


def sweep(model, engine, implementation, monkeypatch, grid=GRID, **fit):
    """The sweep on the forced engine (batched kernels on JAX: jax.vmap taken out)."""
    if implementation == "batched" and BACKEND == "jax":
        monkeypatch.setattr(
            engines,
            "IMPLEMENTATIONS",
            tuple(i for i in engines.IMPLEMENTATIONS if i[1] is not engines.MAPPED),
        )
    return kerasreg.sweep(model, grid, engine=engine, **fit)


def one_fit_or_refused(run, engine, own_optimizer, refusal, after_refusal=None):
    """`run(engine)`'s result where the engine keeps each variant's optimizer
    state; elsewhere the forced engine must raise `refusal` before anything
    trains (`after_refusal()`, if given, checks or resets what it left), and
    `run("auto")` gives the result."""
    if own_optimizer:
        result = run(engine)
        assert result.engine == engine
        return result
    with pytest.raises(ValueError, match=refusal):
        run(engine)
    if after_refusal is not None:
        after_refusal()
    return run("auto")


def optimizer_state(model):
    """The optimizer's variables, in order (the names hold each model's scope)."""
    return [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]


STOPPINGS = {
    "restore": dict(monitor="val_loss", patience=1, restore_best_weights=True),
    "no-restore": dict(monitor="val_loss", patience=1),
    "min-delta": dict(
        monitor="val_loss", patience=2, min_delta=1e-3, restore_best_weights=True
    ),
}


@pytest.mark.parametrize("stopping", list(STOPPINGS))
@pytest.mark.parametrize("implementation, engine, what, own_optimizer", ENGINES)
def test_early_stopping_each_variant_as_its_own_fit(
    stopping, implementation, engine, what, own_optimizer, monkeypatch, caplog
):
    (x, y), validation = problem()
    model = template()
    fit = fit_arguments(validation)
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = sweep(
            model,
            engine,
            implementation,
            monkeypatch,
            x=x,
            y=y,
            callbacks=[keras.callbacks.EarlyStopping(**STOPPINGS[stopping])],
            **fit,
        )
    assert result.engine == engine
    assert result.engine_reason.startswith(what), result.engine_reason
    assert "separate fits" not in caplog.text
    stops = []
    for penalty, row, trained in zip(GRID, result.rows, result.models, strict=True):
        own = keras.callbacks.EarlyStopping(**STOPPINGS[stopping])
        history, weights, reference = separate_fit(
            model, penalty, x, y, adam, callbacks=[own], **fit
        )
        assert_same_fit(row, trained, history, weights, **tolerance(implementation))
        assert row["epochs"] == len(history["loss"])
        stops.append(row["epochs"])
        if own.restore_best_weights:
            assert row["best_epoch"] == own.best_epoch
        else:
            assert row["best_epoch"] == row["epochs"] - 1
        if own_optimizer:  # its Adam slots and step count: those of its stop
            got, want = optimizer_state(trained), optimizer_state(reference)
            assert len(got) == len(want) > 2
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, **tolerance(implementation))
        else:  # documented: a fresh optimizer (SweepResult.models)
            assert int(keras.ops.convert_to_numpy(trained.optimizer.iterations)) == 0
    # Different stops (one fit went on after the first variant stopped),
    # and at least one stopped before the last epoch.
    assert len(set(stops)) > 1, stops
    assert min(stops) < EPOCHS, stops


@pytest.mark.parametrize("implementation, engine, what, own_optimizer", ENGINES)
def test_terminate_on_nan_stops_that_variant_only(
    implementation, engine, what, own_optimizer, monkeypatch
):
    # A huge penalty strength makes one variant's loss overflow within its
    # first epochs; the others go on to the last epoch.
    (x, y), validation = problem()
    model = template()
    grid = [None, kerasreg.L2Penalty(1e-2), kerasreg.L2Penalty(1e38)]
    fit = fit_arguments(validation, epochs=4)

    def callbacks():
        return [
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True),
        ]

    if BACKEND == "torch":
        # A NaN variant's rows, computed on after its stop, could make a torch
        # loss raise for all: K separate fits instead, as engine="auto" picks.
        with pytest.raises(ValueError, match=r"TerminateOnNaN.*PyTorch"):
            sweep(model, engine, implementation, monkeypatch, grid=grid, x=x, y=y,
                  callbacks=callbacks(), **fit)  # fmt: skip
        engine = "auto"
    result = sweep(
        model,
        engine,
        implementation,
        monkeypatch,
        grid=grid,
        x=x,
        y=y,
        callbacks=callbacks(),
        **fit,
    )
    if BACKEND != "torch":
        assert result.engine == engine
    lengths = []
    for penalty, row, trained in zip(grid, result.rows, result.models, strict=True):
        history, weights, _ = separate_fit(
            model, penalty, x, y, adam, callbacks=callbacks(), **fit
        )
        assert_same_fit(row, trained, history, weights, **tolerance(implementation))
        lengths.append(len(history["loss"]))
    assert lengths[:2] == [4, 4]
    assert lengths[2] < 4 and not np.isfinite(result.rows[2]["history"]["loss"][-1])


@pytest.mark.parametrize("implementation, engine, what, own_optimizer", ENGINES)
def test_checkpoint_and_csv_files_per_variant(
    implementation, engine, what, own_optimizer, monkeypatch, tmp_path
):
    (x, y), validation = problem()
    model = template()
    fit = fit_arguments(validation)
    # A checkpoint holds the optimizer (`.weights.h5` too): in one fit only
    # where the engine keeps one per variant (test_a_checkpoint_holds_...).
    suffix = ".keras"

    def callbacks(checkpoint, log):
        checkpoints = [keras.callbacks.ModelCheckpoint(checkpoint, save_best_only=True)]
        return [
            keras.callbacks.EarlyStopping(patience=1),
            *(checkpoints if own_optimizer else []),
            keras.callbacks.CSVLogger(log),
        ]

    sweep_dir = tmp_path / "sweep"
    result = sweep(
        model,
        engine,
        implementation,
        monkeypatch,
        x=x,
        y=y,
        callbacks=callbacks(
            str(sweep_dir / f"{{variant}}{suffix}"), str(sweep_dir / "{variant}.csv")
        ),
        **fit,
    )
    assert result.engine == engine
    stops = []
    for index, (penalty, row) in enumerate(zip(GRID, result.rows, strict=True)):
        folder = tmp_path / f"own_{index}"
        folder.mkdir()
        own = callbacks(str(folder / f"best{suffix}"), str(folder / "log.csv"))
        history, _, _ = separate_fit(model, penalty, x, y, adam, callbacks=own, **fit)
        stops.append(len(history["loss"]))
        saved, wanted = sweep_dir / f"{row['run']}{suffix}", folder / f"best{suffix}"
        if own_optimizer:  # the whole model, optimizer state included
            got = keras.saving.load_model(saved)
            want = keras.saving.load_model(wanted)
            pairs = list(zip(got.weights, want.weights, strict=True))
            pairs += list(
                zip(got.optimizer.variables, want.optimizer.variables, strict=True)
            )
            for a, b in pairs:
                np.testing.assert_allclose(
                    keras.ops.convert_to_numpy(a),
                    keras.ops.convert_to_numpy(b),
                    **tolerance(implementation),
                    err_msg=a.path,
                )
        with open(sweep_dir / f"{row['run']}.csv") as file:
            logged = list(csv.DictReader(file))
        with open(folder / "log.csv") as file:
            expected = list(csv.DictReader(file))
        assert [r.keys() for r in logged] == [r.keys() for r in expected]
        assert [r["epoch"] for r in logged] == [r["epoch"] for r in expected]
        for key in expected[0]:
            np.testing.assert_allclose(
                [float(r[key]) for r in logged],
                [float(r[key]) for r in expected],
                rtol=RTOL,
                atol=ATOL,
                err_msg=key,
            )
    assert len(set(stops)) > 1, stops
    assert len(os.listdir(sweep_dir)) == (2 if own_optimizer else 1) * len(GRID)


def built_clone(model):
    clone = keras.models.clone_model(model)
    clone.compile(**adam())
    clone.optimizer.build(clone.trainable_variables)
    return clone


@pytest.mark.parametrize("implementation, engine, what, own_optimizer", ENGINES)
def test_a_checkpoint_holds_each_variants_own_optimizer_state(
    implementation, engine, what, own_optimizer, monkeypatch, tmp_path
):
    """Keras saves the optimizer with the weights (`.weights.h5` too): an
    engine without per-variant optimizer state refuses a ModelCheckpoint
    when forced, and `engine="auto"` then trains K fits whose files equal
    the separate fits' files, optimizer step count and slots included."""
    (x, y), validation = problem()
    model = template()
    fit = fit_arguments(validation, epochs=3)

    def checkpoint(path):
        return keras.callbacks.ModelCheckpoint(path, save_weights_only=True)

    pattern = str(tmp_path / "sweep" / "{variant}.weights.h5")

    def run(engine):
        return sweep(
            model, engine, implementation, monkeypatch, x=x, y=y,
            callbacks=[checkpoint(pattern)], **fit,
        )  # fmt: skip

    def nothing_written():
        assert not (tmp_path / "sweep").exists()

    result = one_fit_or_refused(
        run,
        engine,
        own_optimizer,
        r"ModelCheckpoint.*optimizer",
        after_refusal=nothing_written,
    )
    for index, (penalty, row) in enumerate(zip(GRID, result.rows, strict=True)):
        wanted = tmp_path / f"own_{index}.weights.h5"
        separate_fit(
            model, penalty, x, y, adam, callbacks=[checkpoint(str(wanted))], **fit
        )
        got, want = built_clone(model), built_clone(model)
        got.load_weights(tmp_path / "sweep" / f"{row['run']}.weights.h5")
        want.load_weights(wanted)
        assert int(keras.ops.convert_to_numpy(want.optimizer.iterations)) > 0
        for a, b in zip(
            got.weights + got.optimizer.variables,
            want.weights + want.optimizer.variables,
            strict=True,
        ):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(a),
                keras.ops.convert_to_numpy(b),
                **tolerance(implementation),
                err_msg=a.path,
            )


def plateau_callbacks():
    return [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", patience=1, factor=0.5, min_delta=1e-3
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=3, restore_best_weights=True
        ),
    ]


@pytest.mark.parametrize("implementation, engine, what, own_optimizer", ENGINES)
def test_reduce_lr_on_plateau_sets_each_variants_own_learning_rate(
    implementation, engine, what, own_optimizer, monkeypatch, caplog
):
    """Per variant in one fit where the engine keeps each variant's optimizer
    (JAX); elsewhere the forced engine refuses and `auto` trains K fits. Each
    run equals its own fit with its own copies: its `learning_rate` history
    (Keras's callback logs it), weights and, in one fit, its optimizer."""
    (x, y), validation = problem()
    model = template()
    fit = fit_arguments(validation)

    def run(engine):
        return sweep(
            model, engine, implementation, monkeypatch, x=x, y=y,
            callbacks=plateau_callbacks(), **fit,
        )  # fmt: skip

    with caplog.at_level(logging.INFO, logger="kerasreg"):
        result = one_fit_or_refused(
            run,
            engine,
            own_optimizer,
            r"ReduceLROnPlateau.*learning rate",
            after_refusal=caplog.clear,  # what `auto` logs, below
        )
    if not own_optimizer:
        if BACKEND == "jax" and implementation != "batched":  # auto: jax.vmap
            assert result.engine_reason.startswith("jax.vmap")
        else:
            assert result.engine == "sequential"
            assert "ReduceLROnPlateau" in caplog.text
    rates = []
    for penalty, row, trained in zip(GRID, result.rows, result.models, strict=True):
        callbacks = plateau_callbacks()
        history, weights, reference = separate_fit(
            model, penalty, x, y, adam, callbacks=callbacks, **fit
        )
        assert "learning_rate" in history
        assert_same_fit(row, trained, history, weights, **tolerance(implementation))
        assert row["best_epoch"] == callbacks[1].best_epoch
        rates.append(tuple(history["learning_rate"]))
        if own_optimizer:  # the rate it ended with, slots and step count too
            for a, b in zip(
                optimizer_state(trained), optimizer_state(reference), strict=True
            ):
                np.testing.assert_allclose(a, b, **tolerance(implementation))
    # The rates were cut, at different epochs in different variants.
    assert all(min(r) < r[0] for r in rates), rates
    assert len(set(rates)) > 1, rates


def logged_sweep(model, callbacks, caplog):
    """A one-epoch sweep of two grid points, its INFO lines in `caplog`."""
    (x, y), _ = problem()
    with caplog.at_level(logging.INFO, logger="kerasreg"):
        return kerasreg.sweep(
            model, GRID[:2], x, y, epochs=1, verbose=0, callbacks=callbacks
        )


def test_other_callbacks_keep_k_separate_fits_naming_them(caplog):
    class Probe(keras.callbacks.Callback):
        pass

    stop = keras.callbacks.EarlyStopping(monitor="loss")
    result = logged_sweep(template(), [stop, Probe()], caplog)
    assert result.engine == "sequential"
    assert "`callbacks` has Probe" in result.engine_reason or "Probe" in caplog.text
    assert "Probe" in caplog.text and "EarlyStopping" in caplog.text


def test_an_ema_optimizer_keeps_k_separate_fits(caplog):
    model = template()
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True), loss="mse")
    stop = keras.callbacks.EarlyStopping(monitor="loss")
    result = logged_sweep(model, [stop], caplog)
    assert result.engine == "sequential"
    assert "use_ema" in caplog.text
