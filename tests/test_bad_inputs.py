"""Bad-input catalogue: every rejected call fails loudly and changes nothing.

One table of bad inputs across the public API and the command line. For each
case the test asserts the exception type (for the CLI: a non-zero exit status
and one clear error line on stderr), that the message names the argument and
the value received, and that the model (its weights bit for bit, its optimizer
state, its regularizers as layer attributes and as `variable.regularizer`, its
compiled functions and config) and every file in play are exactly as before.

A last test interrupts `fit` from another callback mid-epoch and checks that
every weight is decayed for exactly the steps that ran, never half-updated.
"""

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

import kerasreg
from kerasreg import (
    ElasticNetPenalty,
    ExpAbsPenalty,
    L1Penalty,
    L2Penalty,
    WeightDecay,
    WeightNormLogger,
    cli,
    regularize,
    shrink_weights,
    weight_norms,
)
from kerasreg._checks import KerasregDeprecationWarning
from kerasreg.selection import walk_layers

EXIT = "exit"  # expected outcome of a command-line case: non-zero status
REGULARIZER_ATTRIBUTES = (
    "kernel_regularizer",
    "bias_regularizer",
    "recurrent_regularizer",
    "embeddings_regularizer",
    "activity_regularizer",
)


@dataclasses.dataclass
class World:
    model: keras.Model
    other: keras.Model  # a model the bad `where`/`layers` items belong to
    saved: Path  # a valid .keras file of `model`
    tmp: Path
    x: np.ndarray
    y: np.ndarray

    def file(self, name: str, content: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content)
        return str(path)

    def fit(self, *callbacks: Any) -> None:
        self.model.fit(self.x, self.y, batch_size=4, verbose=0, callbacks=callbacks)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    h = keras.layers.LSTM(4, kernel_regularizer=L2Penalty(0.01), name="lstm")(inputs)
    h = keras.layers.Dense(3, bias_regularizer=L1Penalty(0.02), name="dense")(h)
    outputs = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inputs, outputs, name="victim")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model.fit(x, y, batch_size=4, verbose=0)  # builds optimizer and train_function
    other = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2, name="alien")], name="other"
    )
    saved = tmp_path_factory.mktemp("saved") / "model.keras"
    model.save(saved)
    return model, other, saved, x, y


@pytest.fixture
def world(shared, tmp_path):
    model, other, saved, x, y = shared
    return World(model, other, saved, tmp_path, x, y)


# --- what "exactly as before" means ----------------------------------------------


def model_state(model: keras.Model) -> dict:
    weights = {
        f"{i}:{v.path}": (
            str(v.dtype),
            tuple(v.shape),
            ops.convert_to_numpy(v).tobytes(),
        )
        for i, v in enumerate([*model.weights, *model.optimizer.variables])
    }
    layer_regularizers = {
        f"{i}:{layer.name}.{attr}": id(vars(layer)[attr])
        for i, (layer, _) in enumerate(walk_layers(model))
        for attr in REGULARIZER_ATTRIBUTES
        if attr in vars(layer)
    }
    variable_regularizers = {v.path: id(v.regularizer) for v in model.weights}
    functions = {
        name: id(getattr(model, name, None))
        for name in ("train_function", "test_function", "predict_function")
    }
    return {
        "weights": weights,
        "layer_regularizers": layer_regularizers,
        "variable_regularizers": variable_regularizers,
        "functions": functions,
        "config": model.to_json(),
    }


def files_state(*roots: Path) -> dict:
    """Every file and folder under `roots`: path -> sha256 (None for folders)."""
    state = {}
    for root in roots:
        if root.is_file():
            state[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                state[os.path.join(folder, name)] = None
            for name in files:
                path = os.path.join(folder, name)
                state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return state


# --- the catalogue ----------------------------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    prepare: Callable[[World], Callable[[], Any]]  # makes files, returns the call
    expect: Any  # an exception class, or EXIT for the command line
    words: Callable[[World], list[str]]  # what the message must contain


def regularize_layers(model, **kwargs):
    """`regularize` with its deprecated `layers=`: it warns, then refuses."""
    with pytest.warns(KerasregDeprecationWarning, match=r"regularize\(layers=\.\.\.\)"):
        return regularize(model, **kwargs)


def api(call, expect, *words):
    """A Python API case: `call(world)`; `words` may be callables of the world."""
    return lambda id: Case(
        id,
        lambda w: lambda: call(w),
        expect,
        lambda w: [word(w) if callable(word) else word for word in words],
    )


def prepared(prepare, expect, *words):
    """A Python API case whose `prepare(world)` makes files, then returns the call."""
    return lambda id: Case(
        id,
        prepare,
        expect,
        lambda w: [word(w) if callable(word) else word for word in words],
    )


def command(argv, *words):
    """A CLI case: `argv(world)` may create files first; exit must be non-zero."""
    return lambda id: Case(
        id,
        lambda w: (lambda args: lambda: cli.main([str(a) for a in args]))(argv(w)),
        EXIT,
        lambda w: [word(w) if callable(word) else word for word in words],
    )


def truncated(w: World) -> str:
    data = w.saved.read_bytes()
    return w.file("truncated.keras", data[: len(data) // 2])


def corrupt_weights(w: World) -> str:
    path = w.tmp / "corrupt.keras"
    with zipfile.ZipFile(w.saved) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            content = source.read(item)
            if item.filename.endswith(".h5"):
                content = b"not an HDF5 file" * 8
            target.writestr(item, content)
    return str(path)


def zip_without_config(w: World) -> str:
    path = w.tmp / "other.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return str(path)


def folder(w: World) -> str:
    path = w.tmp / "folder.keras"
    path.mkdir()
    return str(path)


def existing_output(w: World) -> str:
    return w.file("existing.keras", b"an older output that must survive")


OUT = "out.keras"

CATALOGUE = {
    # penalty factors
    "L1Penalty negative": api(lambda w: L1Penalty(-0.1), ValueError, "`l1`", "l1=-0.1"),
    "L2Penalty nan": api(
        lambda w: L2Penalty(float("nan")), ValueError, "`l2`", "l2=nan"
    ),
    "L2Penalty inf": api(
        lambda w: L2Penalty(float("inf")), ValueError, "`l2`", "l2=inf"
    ),
    "ElasticNet string l2": api(
        lambda w: ElasticNetPenalty(0.1, "0.1"), TypeError, "`l2`", "l2='0.1'"
    ),
    "ExpAbs bool": api(
        lambda w: ExpAbsPenalty(True), TypeError, "`factor`", "factor=True"
    ),
    "ExpAbs None": api(
        lambda w: ExpAbsPenalty(None), TypeError, "`factor`", "factor=None"
    ),
    "L1Penalty list": api(lambda w: L1Penalty([0.1]), TypeError, "`l1`", "l1=[0.1]"),
    "L2Penalty 2-element array": api(
        lambda w: L2Penalty(np.array([0.1, 0.2])), TypeError, "`l2`", "0.1, 0.2"
    ),
    "from_ratio l1_ratio > 1": api(
        lambda w: ElasticNetPenalty.from_ratio(0.1, 1.5),
        ValueError,
        "`l1_ratio`",
        "l1_ratio=1.5",
    ),
    "from_ratio negative alpha": api(
        lambda w: ElasticNetPenalty.from_ratio(-1.0, 0.5),
        ValueError,
        "`alpha`",
        "alpha=-1.0",
    ),
    # kerasreg.get identifiers
    "get unknown name": api(
        lambda w: kerasreg.get("no_such_penalty"),
        ValueError,
        "identifier",
        "'no_such_penalty'",
    ),
    "get number": api(lambda w: kerasreg.get(42), ValueError, "identifier", "42"),
    "get empty string": api(lambda w: kerasreg.get(""), ValueError, "identifier", "''"),
    "get unknown class in config": api(
        lambda w: kerasreg.get({"class_name": "NoSuchPenalty", "config": {}}),
        ValueError,
        "identifier",
        "NoSuchPenalty",
    ),
    "get config with bad factor": api(
        lambda w: kerasreg.get(
            {
                "class_name": "L2Penalty",
                "config": {"l2": -1.0},
                "module": None,
                "registered_name": "kerasreg>L2Penalty",
            }
        ),
        ValueError,
        "`l2`",
        "l2=-1.0",
    ),
    "get non-regularizer class": api(
        lambda w: kerasreg.get(keras.layers.Dense), ValueError, "identifier", "Dense"
    ),
    # where= patterns
    "where bad regex": api(
        lambda w: weight_norms(w.model, where="(unclosed"),
        ValueError,
        "`where`",
        "(unclosed",
    ),
    "where wrong type": api(
        lambda w: weight_norms(w.model, where=3.5), TypeError, "`where`", "where=3.5"
    ),
    "where list of numbers": api(
        lambda w: weight_norms(w.model, where=[1, 2]), TypeError, "`where`", "1"
    ),
    "where foreign layer": api(
        lambda w: weight_norms(w.model, where=[w.other.layers[0]]),
        ValueError,
        "`where`",
        "'alien'",
    ),
    "where foreign variable": api(
        lambda w: weight_norms(w.model, where=[w.other.weights[0]]),
        ValueError,
        "`where`",
        "other/alien/kernel",
    ),
    "where selects nothing": api(
        lambda w: weight_norms(w.model, where="no_such_weight"),
        ValueError,
        "`where`",
        "'no_such_weight'",
    ),
    "where callable selects nothing": api(
        lambda w: weight_norms(w.model, where=lambda v: False),
        ValueError,
        "`where`",
        "lambda",
    ),
    "weight_norms negative zero_threshold": api(
        lambda w: weight_norms(w.model, zero_threshold=-1e-3),
        ValueError,
        "`zero_threshold`",
        "-0.001",
    ),
    "weight_norms per_gate string": api(
        lambda w: weight_norms(w.model, per_gate="yes"),
        TypeError,
        "`per_gate`",
        "'yes'",
    ),
    # regularize roles and layer filters
    "regularize unknown kernel penalty": api(
        lambda w: regularize(w.model, kernel="no_such"),
        ValueError,
        "`kernel`",
        "'no_such'",
    ),
    "regularize number as bias": api(
        lambda w: regularize(w.model, bias=-1), ValueError, "`bias`", "-1"
    ),
    "regularize valid kernel, bad bias": api(
        lambda w: regularize(w.model, kernel=L2Penalty(0.5), bias="nope"),
        ValueError,
        "`bias`",
        "'nope'",
    ),
    "regularize no role": api(
        lambda w: regularize(w.model), ValueError, "`kernel`", "None"
    ),
    "regularize layers match nothing": api(
        lambda w: regularize_layers(w.model, kernel=L2Penalty(), layers="^zzz"),
        ValueError,
        "`layers`",
        "'^zzz'",
    ),
    "regularize layers bad regex": api(
        lambda w: regularize_layers(w.model, kernel=L2Penalty(), layers="(bad"),
        ValueError,
        "`layers`",
        "(bad",
    ),
    "regularize layers wrong type": api(
        lambda w: regularize_layers(w.model, kernel=L2Penalty(), layers=3),
        TypeError,
        "`layers`",
        "layers=3",
    ),
    "regularize foreign layer": api(
        lambda w: regularize_layers(
            w.model, kernel=L2Penalty(), layers=[w.other.layers[0]]
        ),
        ValueError,
        "`layers`",
        "'alien'",
    ),
    "regularize role absent in scope": api(
        lambda w: regularize_layers(w.model, recurrent=L2Penalty(), layers="^out$"),
        ValueError,
        "`recurrent`",
        "'^out$'",
    ),
    "regularize a layer, not a model": api(
        lambda w: regularize(w.model.layers[-1], kernel=L2Penalty()),
        TypeError,
        "`model`",
        "Dense",
    ),
    # WeightDecay
    "WeightDecay rate 1": api(
        lambda w: WeightDecay(1.0), ValueError, "`rate`", "rate=1.0"
    ),
    "WeightDecay negative rate": api(
        lambda w: WeightDecay(-0.01), ValueError, "`rate`", "rate=-0.01"
    ),
    "WeightDecay string rate": api(
        lambda w: WeightDecay("0.1"), TypeError, "`rate`", "rate='0.1'"
    ),
    "WeightDecay nan rate": api(
        lambda w: WeightDecay(float("nan")), ValueError, "`rate`", "rate=nan"
    ),
    "WeightDecay frequency name": api(
        lambda w: WeightDecay(0.1, frequency="step"),
        ValueError,
        "`frequency`",
        "'step'",
    ),
    "WeightDecay frequency number": api(
        lambda w: WeightDecay(0.1, frequency=1),
        ValueError,
        "`frequency`",
        "frequency=1",
    ),
    "WeightDecay where bad regex": api(
        lambda w: WeightDecay(0.1, where="("), ValueError, "`where`", "'('"
    ),
    "WeightDecay schedule not callable": api(
        lambda w: WeightDecay(0.1, schedule=0.3),
        TypeError,
        "`schedule`",
        "schedule=0.3",
    ),
    "WeightDecay lr_scaled string": api(
        lambda w: WeightDecay(0.1, lr_scaled="yes"), TypeError, "`lr_scaled`", "'yes'"
    ),
    "WeightDecay where selects nothing in fit": api(
        lambda w: w.fit(WeightDecay(0.1, where="no_such_weight")),
        ValueError,
        "`where`",
        "'no_such_weight'",
    ),
    # shrink_weights
    "shrink factor above 1": api(
        lambda w: shrink_weights(w.model, 1.5), ValueError, "`factor`", "factor=1.5"
    ),
    "shrink negative factor": api(
        lambda w: shrink_weights(w.model, -0.5), ValueError, "`factor`", "factor=-0.5"
    ),
    "shrink string factor": api(
        lambda w: shrink_weights(w.model, "0.5"), TypeError, "`factor`", "factor='0.5'"
    ),
    "shrink nan factor": api(
        lambda w: shrink_weights(w.model, float("nan")), ValueError, "`factor`", "nan"
    ),
    "shrink where selects nothing": api(
        lambda w: shrink_weights(w.model, 0.5, where="no_such_weight"),
        ValueError,
        "`where`",
        "'no_such_weight'",
    ),
    "shrink where bad regex": api(
        lambda w: shrink_weights(w.model, 0.5, where="["), ValueError, "`where`", "'['"
    ),
    "shrink a path, not a model": api(
        lambda w: shrink_weights(str(w.saved), 0.5), TypeError, "`model`", "model.keras"
    ),
    # WeightNormLogger
    "logger update_freq 0": api(
        lambda w: WeightNormLogger(w.tmp, update_freq=0),
        ValueError,
        "`update_freq`",
        "update_freq=0",
    ),
    "logger update_freq 'batch'": api(
        lambda w: WeightNormLogger(w.tmp, update_freq="batch"),
        ValueError,
        "`update_freq`",
        "'batch'",
    ),
    "logger update_freq float": api(
        lambda w: WeightNormLogger(w.tmp, update_freq=2.5),
        ValueError,
        "`update_freq`",
        "2.5",
    ),
    "logger update_freq bool": api(
        lambda w: WeightNormLogger(w.tmp, update_freq=True),
        ValueError,
        "`update_freq`",
        "True",
    ),
    "logger log_dir None": api(
        lambda w: WeightNormLogger(None), TypeError, "`log_dir`", "log_dir=None"
    ),
    "logger log_dir empty": api(
        lambda w: WeightNormLogger(""), TypeError, "`log_dir`", "log_dir=''"
    ),
    "logger per_gate string": api(
        lambda w: WeightNormLogger(w.tmp, per_gate="no"),
        TypeError,
        "`per_gate`",
        "'no'",
    ),
    "logger log_dir is a file": prepared(
        lambda w: (lambda path: lambda: w.fit(WeightNormLogger(path)))(
            w.file("a-file", b"keep me")
        ),
        OSError,
        "`log_dir`",
        lambda w: str(w.tmp / "a-file"),
    ),
    "logger where selects nothing in fit": api(
        lambda w: w.fit(WeightNormLogger(w.tmp / "logs", where="no_such_weight")),
        ValueError,
        "`where`",
        "'no_such_weight'",
    ),
    # command line: files
    "inspect missing file": command(
        lambda w: ["inspect", w.tmp / "missing.keras"],
        lambda w: str(w.tmp / "missing.keras"),
        "no such file",
    ),
    "inspect empty file": command(
        lambda w: ["inspect", w.file("empty.keras", b"")], "empty.keras", "not a Keras"
    ),
    "inspect not a zip": command(
        lambda w: ["inspect", w.file("text.keras", b"hello\n")], "text.keras", "not a"
    ),
    "inspect truncated .keras": command(
        lambda w: ["inspect", truncated(w)], "truncated.keras", "not a"
    ),
    "inspect zip without config": command(
        lambda w: ["inspect", zip_without_config(w)], "other.keras", "config.json"
    ),
    "inspect corrupt weights": command(
        lambda w: ["inspect", corrupt_weights(w)],
        "corrupt.keras",
        "not a readable HDF5",
    ),
    "inspect directory": command(
        lambda w: ["inspect", folder(w)], "folder.keras", "directory"
    ),
    "inspect bad --where": command(
        lambda w: ["inspect", w.saved, "--where", "[a-"], "--where", "'[a-'"
    ),
    "inspect --where selects nothing": command(
        lambda w: ["inspect", w.saved, "--where", "no_such_weight"],
        "--where",
        "'no_such_weight'",
    ),
    "shrink missing input": command(
        lambda w: ["shrink", w.tmp / "missing.keras", w.tmp / OUT, "--factor", "0.5"],
        "missing.keras",
        "no such file",
    ),
    "shrink truncated input": command(
        lambda w: ["shrink", truncated(w), w.tmp / OUT, "--factor", "0.5"],
        "truncated.keras",
        "not a",
    ),
    "shrink directory input": command(
        lambda w: ["shrink", folder(w), w.tmp / OUT, "--factor", "0.5"],
        "folder.keras",
        "directory",
    ),
    "shrink OUT == IN": command(
        lambda w: ["shrink", w.saved, w.saved, "--factor", "0.5"],
        "refusing to overwrite",
        lambda w: str(w.saved),
    ),
    "shrink output is a directory": command(
        lambda w: ["shrink", w.saved, folder(w), "--factor", "0.5"],
        "folder.keras",
        "directory",
    ),
    "shrink output folder missing": command(
        lambda w: ["shrink", w.saved, w.tmp / "no" / OUT, "--factor", "0.5"],
        lambda w: str(w.tmp / "no"),
        "no such directory",
    ),
    "shrink output not .keras": command(
        lambda w: ["shrink", w.saved, w.tmp / "out.h5", "--factor", "0.5"],
        "OUT.keras",
        "out.h5",
    ),
    "shrink factor not a number": command(
        lambda w: ["shrink", w.saved, w.tmp / OUT, "--factor", "abc"],
        "--factor",
        "'abc'",
    ),
    "shrink factor above 1 keeps old output": command(
        lambda w: ["shrink", w.saved, existing_output(w), "--factor", "1.5"],
        "--factor",
        "'1.5'",
    ),
    "shrink factor negative": command(
        lambda w: ["shrink", w.saved, w.tmp / OUT, "--factor=-0.1"],
        "--factor",
        "'-0.1'",
    ),
    "shrink factor nan": command(
        lambda w: ["shrink", w.saved, w.tmp / OUT, "--factor", "nan"],
        "--factor",
        "'nan'",
    ),
    "shrink factor inf": command(
        lambda w: ["shrink", w.saved, w.tmp / OUT, "--factor", "inf"],
        "--factor",
        "'inf'",
    ),
    "shrink bad --where keeps old output": command(
        lambda w: [
            "shrink",
            w.saved,
            existing_output(w),
            "--factor",
            "0.5",
            "--where",
            "(",
        ],
        "--where",
        "'('",
    ),
    "shrink --where selects nothing": command(
        lambda w: ["shrink", w.saved, w.tmp / OUT, "--factor", "0.5", "--where", "zzz"],
        "--where",
        "'zzz'",
    ),
}
CASES = [make(name) for name, make in CATALOGUE.items()]


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_loudly_and_changes_nothing(case, world, capsys):
    call = case.prepare(world)
    model_before = model_state(world.model)
    files_before = files_state(world.tmp, world.saved)
    capsys.readouterr()

    if case.expect is EXIT:
        status = call()
        out, err = capsys.readouterr()
        assert status not in (0, None), f"exit status {status}"
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1, err  # one clear line, no traceback, no log noise
        message = lines[0]
        assert message.startswith("kerasreg "), message
    else:
        with pytest.raises(case.expect) as caught:
            call()
        message = str(caught.value)

    for word in case.words(world):
        assert word in message, f"{word!r} not in: {message}"
    assert model_state(world.model) == model_before
    assert files_state(world.tmp, world.saved) == files_before


# --- argparse usage errors: a usage line, then one error line -----------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["shrink", "a.keras", "b.keras"], ["--factor"]),
        (["shrink", "a.keras", "b.keras", "--factor"], ["--factor"]),
        (["inspect"], ["MODEL.keras"]),
        (["frobnicate"], ["'frobnicate'"]),
        (["inspect", "a.keras", "--no-such-option"], ["--no-such-option"]),
    ],
)
def test_usage_errors_exit_2_with_one_error_line(
    argv, words, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert caught.value.code == 2
    assert out == ""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    assert err.splitlines()[0].startswith("usage: kerasreg")
    for word in words:
        assert word in errors[0]
    assert os.listdir(tmp_path) == []


# --- interrupting fit ----------------------------------------------------------------


class StopAt(keras.callbacks.Callback):
    """Raises from `on_train_batch_end` at one batch, like a failing callback."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.started = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.started += 1

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError(f"stop at batch {batch}")


def keras_keeps_weights_readable_after_an_interrupted_fit():
    """Keras 3.8 on JAX does not, even without kerasreg: a callback that raises
    mid-fit leaves the model's variables purged (reading one raises TypeError)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.ones((16, 3), "float32")
    with pytest.raises(RuntimeError, match="stop at batch 0"):
        model.fit(x, x[:, :2], batch_size=8, verbose=0, callbacks=[StopAt(0)])
    try:
        ops.convert_to_numpy(model.weights[0])
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("position", ["before_stop", "after_stop"])
def test_interrupted_fit_leaves_every_weight_decayed_for_the_steps_that_ran(position):
    if not keras_keeps_weights_readable_after_an_interrupted_fit():
        pytest.skip(
            f"Keras {keras.__version__} on {keras.backend.backend()} leaves a "
            "model's weights unreadable after an interrupted fit, with or "
            "without kerasreg"
        )
    rng = np.random.default_rng(3)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    init = [rng.normal(size=w.shape).astype("float32") for w in model.get_weights()]
    model.set_weights(init)
    # Zero learning rate: the optimizer leaves the weights exactly as they are.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(size=(48, 3)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")
    stop = StopAt(3)
    decay = WeightDecay(0.1)
    callbacks = [decay, stop] if position == "before_stop" else [stop, decay]
    with pytest.raises(RuntimeError, match="stop at batch 3"):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=callbacks)  # fmt: skip
    assert stop.started == 4  # batches 0..3 ran, of 6
    final = [ops.convert_to_numpy(v) for v in model.weights]
    kernels = [
        (v.path, w0.astype(np.float64), w)
        for w0, w, v in zip(init, final, model.weights, strict=True)
        if v.name == "kernel"
    ]
    for w0, w, v in zip(init, final, model.weights, strict=True):
        if v.name != "kernel":
            np.testing.assert_array_equal(w, w0, err_msg=v.path)  # not selected
    # One exponent for every kernel, never some weights decayed and others not.
    exponents = {
        path: np.log(np.abs(w / w0)).mean() / np.log(0.9) for path, w0, w in kernels
    }
    steps = round(next(iter(exponents.values())))
    # Listed before the failing callback, the decay has run for all 4 steps;
    # listed after it, for 4 if it runs inside the train step, else 3 (its
    # hook for step 3 never ran).
    assert steps == 4 if position == "before_stop" else steps in (3, 4), exponents
    for path, w0, w in kernels:
        np.testing.assert_allclose(w, w0 * 0.9**steps, rtol=2e-6, err_msg=path)
    # The interrupted decay must not outlive its fit: a later fit without it
    # (zero learning rate) leaves every weight bit for bit as it is.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for w, v in zip(final, model.weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(v), w, err_msg=v.path)
