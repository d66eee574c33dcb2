"""`kerasreg inspect` / `kerasreg shrink`: output against numpy, errors, safety."""

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import cli_models
import h5py
import keras
import numpy as np
import pytest
from conftest import run_python

import kerasreg
from kerasreg import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small trained model with penalties, saved as .keras."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    x = keras.layers.LSTM(
        4,
        kernel_regularizer=kerasreg.L2Penalty(0.05),
        recurrent_regularizer=kerasreg.L1Penalty(0.01),
        name="lstm",
    )(inputs)
    outputs = keras.layers.Dense(1, name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 4, 3)), rng.normal(size=(16, 1)), verbose=0)
    path = tmp_path_factory.mktemp("models") / "model.keras"
    model.save(path)
    return path


def saved_weights(path):
    """`{path: float64 array}` read back from the file with Keras."""
    model = keras.saving.load_model(path, compile=False)
    return {
        v.path: np.asarray(keras.ops.convert_to_numpy(v.value), np.float64)
        for v in model.weights
    }


def np_stats(w):
    a = np.abs(w)
    return {
        "l1": a.sum(),
        "l2": np.sqrt((w**2).sum()),
        "linf": a.max(),
        "zero_fraction": (a < 1e-8).mean(),
    }


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_inspect_json_matches_numpy(saved_model, capsys):
    status, out, err = run(["inspect", saved_model, "--json", "--where", "."], capsys)
    assert status == 0, err
    result = json.loads(out)
    weights = saved_weights(saved_model)
    assert list(result) == list(weights)  # every trainable weight, model order
    penalties = {
        "lstm/lstm_cell/kernel": lambda w: 0.05 * (w**2).sum(),
        "lstm/lstm_cell/recurrent_kernel": lambda w: 0.01 * abs(w).sum(),
    }
    for path, w in weights.items():
        expected = np_stats(w)
        expected["penalty"] = penalties.get(path, lambda w: 0.0)(w)
        for name, value in expected.items():
            assert result[path][name] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_inspect_table_is_aligned_and_matches_numpy(saved_model, capsys):
    status, out, _ = run(["inspect", saved_model, "--per-gate"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "weight", "shape", "l1", "l2", "linf", "zero_fraction", "penalty",
    ]  # fmt: skip
    table = [line for line in lines[1:] if not line.startswith("total")]
    assert len({len(line.rstrip()) for line in lines[:1] + table[:1]}) == 1
    weights = saved_weights(saved_model)
    rows = {line.split()[0]: line.split() for line in table if line[0] != " "}
    assert list(rows) == ["lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel",
                          "out/kernel"]  # fmt: skip
    for path, cells in rows.items():
        w = weights[path]
        assert cells[1] == "x".join(map(str, w.shape))
        expected = np_stats(w)
        for cell, name in zip(cells[2:6], expected, strict=True):
            assert float(cell) == pytest.approx(expected[name], rel=1e-5, abs=1e-7)
    assert rows["out/kernel"][-1] == "-"  # no regularizer
    assert float(rows["lstm/lstm_cell/kernel"][-1]) == pytest.approx(
        0.05 * (weights["lstm/lstm_cell/kernel"] ** 2).sum(), rel=1e-5
    )
    # Per-gate rows: LSTM columns i, f, c, o, right under their weight.
    kernel = weights["lstm/lstm_cell/kernel"]
    start = table.index(next(t for t in table if t.startswith("lstm/lstm_cell/kernel")))
    gate_rows = table[start + 1 : start + 5]
    assert [r.split()[:2] for r in gate_rows] == [["gate", g] for g in "ifco"]
    for k, row in enumerate(gate_rows):
        block = kernel[:, 4 * k : 4 * (k + 1)]
        assert float(row.split()[3]) == pytest.approx(
            np.sqrt((block**2).sum()), rel=1e-5
        )


def test_shrink_writes_scaled_copy_and_leaves_input_alone(
    saved_model, tmp_path, capsys
):
    before = digest(saved_model)
    target = tmp_path / "small.keras"
    status, out, err = run(
        ["shrink", saved_model, target, "--factor", "0.25", "--where", "kernel"],
        capsys,
    )
    assert status == 0, err
    assert digest(saved_model) == before
    original, shrunk = saved_weights(saved_model), saved_weights(target)
    assert list(original) == list(shrunk)
    for path, w in original.items():
        factor = 0.25 if "kernel" in path else 1.0  # biases not selected
        np.testing.assert_allclose(shrunk[path], factor * w, rtol=1e-6)
    assert "lstm/lstm_cell/recurrent_kernel: l2" in out
    assert sorted(os.listdir(tmp_path)) == ["small.keras"]  # no temporary left


def test_shrink_never_leaves_a_half_written_output(
    saved_model, tmp_path, capsys, monkeypatch
):
    target = tmp_path / "out.keras"
    copy = cli.shutil.copyfileobj

    def failing_copy(source, destination, *args):
        copy(source, destination, *args)
        raise OSError("disk full")

    monkeypatch.setattr(cli.shutil, "copyfileobj", failing_copy)
    status, _, err = run(["shrink", saved_model, target, "--factor", "0.5"], capsys)
    assert status == 1
    assert err.count("\n") == 1 and "disk full" in err
    assert os.listdir(tmp_path) == []


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    text = tmp_path / "text.keras"
    text.write_text("definitely not a zip")
    other_zip = tmp_path / "other.keras"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    folder = tmp_path / "folder.keras"
    folder.mkdir()
    return {
        "missing": (tmp_path / "missing.keras", "no such file"),
        "empty": (empty, "not a Keras model file"),
        "not a zip": (text, "not a Keras model file"),
        "zip without config": (other_zip, "no config.json"),
        "directory": (folder, "is a directory"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty", "not a zip", "zip without config", "directory"]
)
@pytest.mark.parametrize("command", ["inspect", "shrink"])
def test_unreadable_inputs_fail_with_one_line(
    bad_files, case, command, tmp_path, capsys
):
    path, message = bad_files[case]
    argv = ["inspect", path]
    if command == "shrink":
        argv = ["shrink", path, tmp_path / "result.keras", "--factor", "0.5"]
    status, out, err = run(argv, capsys)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"kerasreg {command}: error:")
    assert message in err
    assert not (tmp_path / "result.keras").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--factor", "abc"], "--factor"),
        (["--factor", "1.5"], "--factor"),
        (["--factor", "-0.1"], "--factor"),
        (["--factor", "nan"], "--factor"),
        (["--factor", "0.5", "--where", "("], "regular expression"),
        (["--factor", "0.5", "--where", "no-such-weight"], "selects no weight"),
    ],
)
def test_bad_arguments_fail_with_one_line(
    saved_model, tmp_path, extra, message, capsys
):
    target = tmp_path / "result.keras"
    status, _, err = run(["shrink", saved_model, target, *extra], capsys)
    assert status == 2
    assert err.count("\n") == 1 and message in err
    assert not target.exists()


def test_inspect_bad_regex_fails_with_one_line(saved_model, capsys):
    status, out, err = run(["inspect", saved_model, "--where", "[a-"], capsys)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and "regular expression" in err


def test_shrink_refuses_to_overwrite_its_input(saved_model, tmp_path, capsys):
    before = digest(saved_model)
    link = tmp_path / "link.keras"
    os.link(saved_model, link)
    spellings = [
        saved_model,
        saved_model.parent / ".." / saved_model.parent.name / saved_model.name,
        link,  # a hard link is the same file under another name
    ]
    for target in spellings:
        status, _, err = run(["shrink", saved_model, target, "--factor", "0"], capsys)
        assert status == 1
        assert err.count("\n") == 1 and "refusing to overwrite the input" in err
    assert digest(saved_model) == before


def test_output_name_must_end_in_keras(saved_model, tmp_path, capsys):
    status, _, err = run(
        ["shrink", saved_model, tmp_path / "out.h5", "--factor", "0.5"], capsys
    )
    assert status == 2 and "'.keras'" in err
    assert os.listdir(tmp_path) == []


def command_env():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command must quiet TF itself
    return env


def test_python_dash_m_runs_inspect(saved_model):
    result = subprocess.run(
        [sys.executable, "-m", "kerasreg", "inspect", str(saved_model), "--json"],
        capture_output=True, text=True, env=command_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    result_json = json.loads(result.stdout)
    assert set(result_json) == {
        "lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "out/kernel",
    }  # fmt: skip


def test_console_script_error_is_one_line(tmp_path):
    script = Path(sys.executable).with_name("kerasreg")
    if not script.exists():
        pytest.skip("the kerasreg console script is not installed in this env")
    missing = tmp_path / "missing.keras"
    result = subprocess.run(
        [str(script), "inspect", str(missing)],
        capture_output=True, text=True, env=command_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"kerasreg inspect: error: '{missing}': no such file.\n"


# --- the CLI reads files as data: same names and numbers as weight_norms -------

BACKENDS = ("tensorflow", "jax", "torch")


def cli_json(path, *extra):
    """`kerasreg inspect PATH --json ...` run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["inspect", str(path), "--json", *map(str, extra)])
    assert status == 0
    return json.loads(out.getvalue())


def assert_equals_weight_norms(path, model):
    # One weight_norms call (compiling it is what costs): all trainable weights;
    # the default selection is checked against `select_weights`'s rule.
    expected = kerasreg.weight_norms(model, ".", per_gate=True)
    paths = kerasreg.selection.weight_paths(model)
    default = [paths[id(v)] for v in kerasreg.select_weights(model)]
    for where, keys in ((None, default), (".", list(expected))):
        extra = ["--per-gate"] + (["--where", where] if where else [])
        got = cli_json(path, *extra)
        assert list(got) == keys  # same keys, same (model) order
        for key in keys:
            stats = expected[key]
            assert set(got[key]) == set(stats), key
            for name, value in stats.items():
                assert got[key][name] == pytest.approx(value, rel=2e-5, abs=1e-6), (
                    key,
                    name,
                )


def keras_loss_penalty(model):
    """What Keras adds to the loss: the sum of `model.losses`."""
    return sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)


def footer_total(out):
    line = out.strip().splitlines()[-1]
    match = re.match(
        r"total penalty \(what Keras adds to the loss, (\d+) regularized weights?\): "
        r"([^;]+); (\d+) weights? shown",
        line,
    )
    assert match, line
    return int(match[1]), float(match[2]), int(match[3])


@pytest.mark.slow
def test_zoo_matches_weight_norms_and_keras_losses(tmp_path, capsys):
    model = cli_models.zoo()
    path = tmp_path / "zoo.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert_equals_weight_norms(path, loaded)
    status, out, _ = run(["inspect", path], capsys)
    assert status == 0
    count, total, shown = footer_total(out)
    regularized = [v for v in loaded.trainable_weights if v.regularizer is not None]
    assert count == len(regularized) == len(loaded.losses)
    assert total == pytest.approx(keras_loss_penalty(loaded), rel=1e-5)
    assert shown == len(kerasreg.select_weights(loaded))
    # The frozen layer's penalty is not part of the total, as in Keras.
    assert "frozen/kernel" not in out


@pytest.mark.slow
def test_a_file_saved_on_another_backend_matches_weight_norms(tmp_path):
    # Each leg reads a file saved on another installed backend (CI installs
    # them leg by leg: the torch leg reads TensorFlow's, the JAX leg
    # TensorFlow's); the zoo test above covers the current backend's own.
    import importlib.util

    current = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    others = [
        b
        for b in BACKENDS[BACKENDS.index(current) + 1 :] + BACKENDS
        if b != current and importlib.util.find_spec(module[b]) is not None
    ]
    if not others:
        pytest.skip("no other Keras backend is installed")
    backend = others[0]
    path = tmp_path / f"zoo_{backend}.keras"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_models.py"), "zoo", str(path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = keras.saving.load_model(path, compile=False)
    assert_equals_weight_norms(path, loaded)


def test_conv_lstm_gates_match_numpy(tmp_path):
    model = cli_models.conv_lstm()
    path = tmp_path / "conv_lstm.keras"
    model.save(path)
    got = cli_json(path, "--per-gate", "--where", ".")
    cell = model.layers[1].cell
    filters = 3
    for variable, name in ((cell.kernel, "kernel"), (cell.recurrent_kernel,
                           "recurrent_kernel"), (cell.bias, "bias")):  # fmt: skip
        w = np.asarray(keras.ops.convert_to_numpy(variable), np.float64)
        row = got[f"conv_lstm1d/conv_lstm_cell/{name}"]
        for g, gate in enumerate("ifco"):
            block = w[..., g * filters : (g + 1) * filters]
            expected = np_stats(block)
            for stat, value in expected.items():
                assert row[f"{stat}/gate_{gate}"] == pytest.approx(value, rel=1e-5)
    w = np.asarray(keras.ops.convert_to_numpy(cell.kernel), np.float64)
    penalty = got["conv_lstm1d/conv_lstm_cell/kernel"]["penalty"]
    assert penalty == pytest.approx(0.1 * (w**2).sum(), rel=1e-5)


def test_float64_model(tmp_path, capsys):
    model = cli_models.float64()
    path = tmp_path / "f64.keras"
    model.save(path)
    got = cli_json(path, "--where", ".", "--per-gate")
    if keras.ops.convert_to_numpy(model.layers[1].kernel).dtype != np.float64:
        pytest.skip("this backend has float64 disabled (JAX without x64)")
    for variable in model.trainable_weights:
        key = kerasreg.selection.weight_paths(model)[id(variable)]
        w = keras.ops.convert_to_numpy(variable)
        for stat, value in np_stats(w).items():
            assert got[key][stat] == pytest.approx(value, rel=1e-12, abs=1e-15)
    kernel = keras.ops.convert_to_numpy(model.layers[1].kernel)
    assert got["dense/kernel"]["penalty"] == pytest.approx(0.1 * (kernel**2).sum())
    target = tmp_path / "f64_small.keras"
    status, _, err = run(["shrink", path, target, "--factor", "0.5"], capsys)
    assert status == 0, err
    shrunk = keras.saving.load_model(target)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(shrunk.layers[1].kernel), kernel * 0.5
    )


def test_weights_only_file_says_what_it_cannot_tell(tmp_path, capsys):
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True)),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    got = cli_json(path, "--where", ".")
    # Without a config, names, trainability and penalties are unknown: every
    # weight is listed, as unknown (BatchNormalization's moving statistics
    # too), named by the layer names Keras stores and numbered.
    expected = kerasreg.weight_norms(model, model.weights)
    assert all(re.fullmatch(r"unknown:.*/var_\d+", k) for k in got)
    assert all(r["trainable"] is None and r["penalty"] is None for r in got.values())

    def layers_and_norms(rows):
        return sorted(
            (k.removeprefix("unknown:").rsplit("/", 1)[0], round(r["l2"], 5))
            for k, r in rows.items()
        )

    assert layers_and_norms(got) == layers_and_norms(expected)
    status, out, _ = run(["inspect", path, "--where", "."], capsys)
    assert status == 0
    assert re.search(r"\): unknown; 0 weights shown and 12 unknown", out), out


def test_shrink_keeps_every_other_member_and_dataset_byte_identical(
    saved_model, tmp_path, capsys
):
    target = tmp_path / "small.keras"
    status, _, err = run(["shrink", saved_model, target, "--factor", "0.5"], capsys)
    assert status == 0, err
    with zipfile.ZipFile(saved_model) as a, zipfile.ZipFile(target) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if name != "model.weights.h5":
                assert a.read(name) == b.read(name), name
        old = h5py.File(io.BytesIO(a.read("model.weights.h5")), "r")
        new = h5py.File(io.BytesIO(b.read("model.weights.h5")), "r")
    names = []
    old.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else 0)
    scaled = {  # the default selection: the kernels and recurrent kernels
        "layers/lstm/cell/vars/0",
        "layers/lstm/cell/vars/1",
        "layers/dense/vars/0",
    }
    for name in names:
        before, after = old[name][()], new[name][()]
        assert after.dtype == before.dtype and after.shape == before.shape
        if name in scaled:
            np.testing.assert_array_equal(after, before * np.float32(0.5))
        else:
            assert after.tobytes() == before.tobytes(), name
        assert dict(old[name].attrs) == dict(new[name].attrs)


def test_bfloat16_weights_are_read_and_shrunk(tmp_path, capsys):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    finally:
        keras.config.set_dtype_policy("float32")
    path = tmp_path / "bf16.keras"
    model.save(path)
    w = np.asarray(keras.ops.convert_to_numpy(model.layers[0].kernel), np.float32)
    got = cli_json(path)
    assert got["dense/kernel"]["l1"] == pytest.approx(np.abs(w).sum(), rel=1e-6)
    target = tmp_path / "bf16_small.keras"
    status, _, err = run(["shrink", path, target, "--factor", "0.25"], capsys)
    assert status == 0, err
    kernel = keras.saving.load_model(target).layers[0].kernel
    expected = (w * 0.25).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(keras.ops.convert_to_numpy(kernel), np.float32), expected
    )


def test_large_tensor_is_read_in_blocks(tmp_path, monkeypatch):
    # Blocks of 1 KiB: a 64 KiB kernel is read in many pieces, and an LSTM
    # kernel row (4 gates x 80 units x 4 bytes) is split inside the row, gates
    # straddling blocks: same numbers.
    from kerasreg import keras_file

    inputs = keras.Input((3, 128))
    lstm = keras.layers.LSTM(80, name="lstm")
    outputs = keras.layers.Dense(128, name="dense")(lstm(inputs))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "m.keras"
    model.save(path)
    reads = []
    read = keras_file.read_block
    monkeypatch.setattr(keras_file, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(
        keras_file, "read_block", lambda d, t, i: reads.append(i) or read(d, t, i)
    )
    got = cli_json(path, "--per-gate")
    w = np.asarray(keras.ops.convert_to_numpy(model.get_layer("dense").kernel))
    assert sum(1 for i in reads if len(i) == 1) == 80 * 128 * 4 // 1024  # dense
    assert sum(1 for i in reads if len(i) == 2) > 128  # LSTM rows split
    for stat, value in np_stats(w.astype(np.float64)).items():
        assert got["dense/kernel"][stat] == pytest.approx(value, rel=1e-6)
    kernel = np.asarray(keras.ops.convert_to_numpy(lstm.cell.kernel), np.float64)
    for g, gate in enumerate("ifco"):
        block = kernel[:, 80 * g : 80 * (g + 1)]
        for stat, value in np_stats(block).items():
            assert got["lstm/lstm_cell/kernel"][f"{stat}/gate_{gate}"] == (
                pytest.approx(value, rel=1e-6)
            )


def test_blocks_cover_every_entry_once():
    from kerasreg.keras_file import blocks

    for shape in [(5,), (7, 3), (2, 3, 5), (1, 4, 1, 9), (3, 1000), (1, 1, 4097)]:
        for chunk in [4, 64, 1000, 1 << 20]:
            hits = np.zeros(shape, np.int64)
            for index in blocks(shape, 4, chunk):
                hits[index] += 1
                assert hits[index].size * 4 <= max(chunk, 4)
            assert (hits == 1).all(), (shape, chunk)


# --- start-up: the command imports neither Keras nor TensorFlow --------------------


HEAVY = ("keras", "tensorflow", "jax", "torch")


def test_command_process_imports_no_keras(saved_model, tmp_path):
    code = f"""
import sys
sys.argv = ["kerasreg"]
import kerasreg.cli
assert kerasreg.cli.main(["inspect", {str(saved_model)!r}, "--per-gate"]) == 0
assert kerasreg.cli.main(["shrink", {str(saved_model)!r},
                          {str(tmp_path / "out.keras")!r}, "--factor", "0.5"]) == 0
print(sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_help_and_version_import_nothing_heavy():
    code = f"""
import sys
sys.argv = ["kerasreg"]
import kerasreg.cli
for argv in (["--help"], ["--version"], ["inspect", "--help"]):
    try:
        kerasreg.cli.main(argv)
    except SystemExit as stop:
        assert stop.code == 0
heavy = {set(HEAVY) | {"h5py", "numpy"}!r}
print(sorted({{m.split(".")[0] for m in sys.modules}} & heavy))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_import_kerasreg_still_registers_the_penalties():
    code = """
import keras, kerasreg
for name in ("L1Penalty", "L2Penalty", "ElasticNetPenalty", "ExpAbsPenalty"):
    assert keras.saving.get_registered_object(f"kerasreg>{name}") is getattr(
        kerasreg, name)
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lazy_names_of_the_command_process_resolve_to_the_real_ones():
    # In the command, `kerasreg/__init__.py` imports nothing Keras; its
    # `__getattr__` serves every public name on first use instead.
    from kerasreg import penalties, tensorboard

    assert kerasreg.__getattr__("L2Penalty") is penalties.L2Penalty
    assert kerasreg.__getattr__("WeightNormLogger") is tensorboard.WeightNormLogger
    with pytest.raises(AttributeError, match="no_such_name"):
        kerasreg.__getattr__("no_such_name")


# --- the benchmark's harness (the benchmark itself is not run in tests) --------


def test_benchmark_writes_a_valid_keras_file_and_measures_it(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cli_benchmark", ROOT / "benchmarks" / "cli.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "tiny.keras"
    nbytes = bench.write_model(path, mib=0.05, units=16)
    model = keras.saving.load_model(path)  # Keras itself accepts the file
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    assert kernel.nbytes == nbytes
    got = cli_json(path)
    assert got["dense/kernel"]["l2"] == pytest.approx(
        np.sqrt((kernel.astype(np.float64) ** 2).sum()), rel=1e-6
    )
    sample = bench.measure("inspect", path, tmp_path / "out.keras")
    assert sample["seconds"] > 0 and sample["maxrss_kib"] > 0


# --- the generator: every model of the layer zoo, the CLI against Keras ---------

CLI_DRIVER = """
import contextlib, io, json, sys
sys.argv = ["kerasreg"]
import kerasreg.cli
jobs = json.loads(sys.stdin.read())
out = {}
for name, path, shrunk in jobs:
    runs = {
        "all": ["inspect", path, "--json", "--per-gate", "--where", "."],
        "default": ["inspect", path, "--json", "--per-gate"],
        "text": ["inspect", path, "--where", "."],
        "shrink": ["shrink", path, shrunk, "--factor", "0.5", "--where", "."],
    }
    out[name] = {}
    for key, argv in runs.items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = kerasreg.cli.main(argv)
        out[name][key] = [status, stdout.getvalue(), stderr.getvalue()]
heavy = {"keras", "tensorflow", "jax", "torch"}
out["imported"] = sorted({m.split(".")[0] for m in sys.modules} & heavy)
print("RESULT" + json.dumps(out))
"""

# Models whose file tells everything the live model has: no "unknown" allowed.
FULLY_KNOWN = {
    "zoo", "zoo_rows", "conv_lstm", "float64", "normalization", "nested",
    "l2sp_unused", "bfloat16",
}  # fmt: skip
STATS = ("l1", "l2", "linf", "zero_fraction")


def close(a, b):
    return a == pytest.approx(b, rel=2e-5, abs=1e-6)


def check_rows(name, rows, live, fully_known):
    """The CLI's rows against `weight_norms` of the model loaded from disk.

    Rows of weights the file proves trainable: the same keys, in the same
    order, the same statistics and penalty. A row whose trainability the
    file cannot tell (`trainable` null, `unknown:` key when it cannot name
    it either) must have the statistics of a weight the live model has; and
    every live row is either a proven row or such an undetermined row (or,
    for a LoRA adapter the file does not hold, its row with unknown
    statistics).
    """
    proven = [k for k, r in rows.items() if r["trainable"] is True]
    undetermined = [k for k, r in rows.items() if r["trainable"] is None]
    assert len(proven) + len(undetermined) == len(rows), name
    assert not undetermined or not fully_known, (name, undetermined)
    assert [k for k in live if k in proven] == proven, name  # model order
    for key in proven:
        got, want = rows[key], live[key]
        for stat, value in want.items():
            if stat == "trainable":
                continue
            if got[stat] is None:  # the file cannot tell
                assert not fully_known, (name, key, stat)
                assert stat == "penalty" or "lora_" in key, (name, key, stat)
            else:
                assert close(got[stat], value), (name, key, stat, got[stat], value)
    free = {k: w for k, w in live.items() if k not in proven}
    for key in undetermined:
        got = rows[key]
        if key in free:  # named: its statistics are the live weight's
            want = free.pop(key)
            assert all(close(got[s], want[s]) for s in STATS), (name, key)
            continue
        assert key.startswith("unknown:") and got["penalty"] is None, (name, key)
        match = next(
            (k for k, w in free.items() if all(close(got[s], w[s]) for s in STATS)),
            None,
        )
        # Else a weight `where` leaves out (not trainable): the file cannot tell.
        if match is not None:
            free.pop(match)
    assert not free, (name, "live rows the CLI neither shows nor marks unknown", free)


def footer_value(text):
    line = text.strip().splitlines()[-1]
    match = re.match(
        r"total penalty \(what Keras adds to the loss, \d+ regularized weights?\): "
        r"([^;]+);",
        line,
    )
    assert match, line
    return None if match[1] == "unknown" else float(match[1])


def scaled_paths(stdout):
    return [line.split(": l2 ")[0] for line in stdout.splitlines() if ": l2 " in line]


def values_by_path(model):
    paths = kerasreg.selection.weight_paths(model)
    return {
        paths[id(v)]: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights
    }


def references(model):
    """`{path: reference}` of the L2SP references a freshly loaded model holds."""
    paths = kerasreg.selection.weight_paths(model)
    return {
        paths[id(v)]: np.asarray(keras.ops.convert_to_numpy(v.regularizer.reference))
        for v in model.weights
        if isinstance(v.regularizer, kerasreg.L2SPPenalty)
        and v.regularizer.reference is not None
    }


@pytest.mark.slow
def test_cli_agrees_with_keras_on_every_model_of_the_layer_zoo(tmp_path):
    builders = cli_models.zoo_models()
    jobs = []
    for i, (name, build) in enumerate(builders.items()):
        keras.utils.set_random_seed(i)
        model = build()
        cli_models.randomize(model, seed=i)
        path = tmp_path / f"m{i}.keras"
        model.save(path)
        jobs.append([name, str(path), str(tmp_path / f"m{i}_shrunk.keras")])
    result = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER], input=json.dumps(jobs),
        capture_output=True, text=True, env=command_env(), cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out.pop("imported") == []  # the CLI process never imported Keras
    for name, path, shrunk in jobs:
        runs = out[name]
        fully_known = name in FULLY_KNOWN
        live = keras.saving.load_model(path, compile=False)
        refs = references(live)  # before any first use
        # One weight_norms pass (compiling it is what costs): every trainable
        # weight; the default rows are those `select_weights` picks.
        try:
            every = kerasreg.weight_norms(live, ".", per_gate=True)
        except ValueError:  # the model trains nothing
            every = {}
        paths = kerasreg.selection.weight_paths(live)
        default = [paths[id(v)] for v in live.trainable_weights if len(v.shape) >= 2]
        default = [p for p in every if p in default and not p.endswith("/bias")]
        for key, expected in (
            ("all", every),
            ("default", {p: every[p] for p in default}),
        ):
            status, stdout, stderr = runs[key]
            if status != 0:
                assert not expected or not fully_known, (name, key, stderr)
                assert "selects no weight" in stderr, (name, stderr)
                continue
            check_rows(f"{name} {key}", json.loads(stdout), expected, fully_known)
        # The footer: what Keras adds to the loss, or "unknown".
        status, stdout, stderr = runs["text"]
        total = footer_value(stdout) if status == 0 else None
        if total is None:
            assert not fully_known, (name, stdout, stderr)
        else:
            assert close(total, keras_loss_penalty(live)), (name, stdout)
        # shrink: exactly what shrink_weights scales, where the file can tell.
        original = values_by_path(live)
        try:
            kerasreg.shrink_weights(live, 0.5, where=".")
            by_keras = values_by_path(live)
        except ValueError:
            by_keras = original
        status, stdout, stderr = runs["shrink"]
        if status != 0:
            assert not fully_known, (name, stderr)
            continue
        cli_scaled = scaled_paths(stdout)
        by_cli = keras.saving.load_model(shrunk, compile=False)
        got_refs = references(by_cli)
        got = values_by_path(by_cli)
        assert list(got) == list(original), name
        for key, value in got.items():
            want = by_keras[key] if key in cli_scaled else original[key]
            np.testing.assert_array_equal(value, want, err_msg=f"{name} {key}")
        if fully_known:
            changed = [
                k for k in original if not np.array_equal(by_keras[k], original[k])
            ]
            assert set(cli_scaled) >= set(changed), (name, changed, cli_scaled)
        # An L2-SP reference is never shrunk (nor written where there was none).
        assert list(got_refs) == list(refs), name
        for key, ref in got_refs.items():
            np.testing.assert_array_equal(ref, refs[key], err_msg=f"{name} {key}")


# --- issue 23: references, non-trainable state, subclassed models ---------------


def h5_of(path):
    """The weights file of a .keras archive, opened with h5py."""
    with zipfile.ZipFile(path) as archive:
        return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")


def test_l2sp_reference_is_no_weight_and_its_penalty_is_computed(tmp_path, capsys):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="h"),
            keras.layers.Dense(1, name="o"),
        ]
    )
    kerasreg.regularize(model, kernel=kerasreg.L2SPPenalty(0.3))
    cli_models.randomize(model)  # away from the references
    path = tmp_path / "l2sp.keras"
    model.save(path)
    h5 = h5_of(path)
    # Independent reference: the numbers as the file holds them.
    expected = {
        name: 0.3 * ((h5[f"layers/{g}/vars/0"][()].astype(np.float64)
                      - h5[f"layers/{g}/kernel_regularizer/vars/0"][()]) ** 2).sum()
        for name, g in (("h", "dense"), ("o", "dense_1"))
    }  # fmt: skip
    assert all(v > 0 for v in expected.values())
    rows = cli_json(path, "--where", ".")
    assert list(rows) == ["h/kernel", "h/bias", "o/kernel", "o/bias"]  # no reference
    for name, value in expected.items():
        assert rows[f"{name}/kernel"]["penalty"] == pytest.approx(value, rel=1e-6)
    status, out, _ = run(["inspect", path], capsys)
    assert footer_value(out) == pytest.approx(sum(expected.values()), rel=1e-6)
    loaded = keras.saving.load_model(path)
    assert keras_loss_penalty(loaded) == pytest.approx(sum(expected.values()), rel=1e-5)
    # shrink scales the weights, never the references.
    target = tmp_path / "small.keras"
    status, _, err = run(
        ["shrink", path, target, "--factor", "0.5", "--where", "."], capsys
    )
    assert status == 0, err
    new = h5_of(target)
    for g in ("dense", "dense_1"):
        ref = f"layers/{g}/kernel_regularizer/vars/0"
        np.testing.assert_array_equal(new[ref][()], h5[ref][()])
        kernel = f"layers/{g}/vars/0"
        np.testing.assert_array_equal(new[kernel][()], h5[kernel][()] * np.float32(0.5))


def test_non_trainable_state_and_quantized_kernels_are_never_selected(tmp_path, capsys):
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(size=(16, 4)).astype("float32"))
    model = keras.Sequential(
        [keras.Input((4,)), norm, keras.layers.Dense(3, name="q"),
         keras.layers.Dense(2, name="f")]
    )  # fmt: skip
    model.layers[1].quantize("int8")
    cli_models.randomize(model)
    path = tmp_path / "state.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    rows = cli_json(path, "--where", ".")
    assert list(rows) == list(kerasreg.weight_norms(loaded, "."))  # q/bias, f/*
    assert all(r["trainable"] is True for r in rows.values())
    assert list(cli_json(path)) == ["f/kernel"]  # the int8 kernel is no float kernel
    target = tmp_path / "small.keras"
    status, _, err = run(
        ["shrink", path, target, "--factor", "0.5", "--where", "."], capsys
    )
    assert status == 0, err
    old, new = h5_of(path), h5_of(target)
    frozen = [
        f"layers/normalization/vars/{i}" for i in range(3)
    ]  # mean, variance, count
    frozen += ["layers/dense/vars/0", "layers/dense/vars/2"]  # int8 kernel, its scale
    for name in frozen:
        assert new[name][()].tobytes() == old[name][()].tobytes(), name
    for name in (
        "layers/dense/vars/1",
        "layers/dense_1/vars/0",
        "layers/dense_1/vars/1",
    ):
        np.testing.assert_array_equal(new[name][()], old[name][()] * np.float32(0.5))


def test_subclassed_model_rows_and_total_say_unknown(tmp_path, capsys):
    model = cli_models.AutoEncoder()
    model(np.zeros((1, 4), "float32"))
    cli_models.randomize(model)
    path = tmp_path / "sub.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_loss_penalty(loaded) > 0  # Keras adds penalties the file hides
    rows = cli_json(path, "--where", ".")
    # Every weight is listed, by its place in the file, as unknown.
    assert sorted(rows) == ["unknown:decoder/var_0", "unknown:decoder/var_1",
                            "unknown:encoder/var_0", "unknown:encoder/var_1",
                            "unknown:var_0"]  # fmt: skip
    assert all(r["trainable"] is None and r["penalty"] is None for r in rows.values())
    live = kerasreg.weight_norms(loaded, ".")
    assert sorted(round(r["l2"], 5) for r in rows.values()) == sorted(
        round(r["l2"], 5) for r in live.values()
    )
    status, out, _ = run(["inspect", path], capsys)
    assert status == 0 and footer_value(out) is None  # "unknown", never 0
    target = tmp_path / "small.keras"
    status, _, err = run(
        ["shrink", path, target, "--factor", "0.5", "--where", "."], capsys
    )
    assert status == 2 and "cannot tell whether Keras trains them" in err
    assert not target.exists()


@keras.saving.register_keras_serializable(package="kerasreg_test_cli")
class _OpaqueBlock(keras.layers.Layer):
    """Weights the file cannot name or tell the trainability of."""

    def build(self, shape):
        self.w1 = self.add_weight(shape=(shape[-1], 3), name="w1")
        self.w2 = self.add_weight(shape=(3,), name="w2", trainable=False)

    def call(self, x):
        return x @ self.w1 + self.w2


def test_selects_nothing_lists_unknown_weights_apart_from_trainable(tmp_path, capsys):
    model = keras.Sequential(
        [keras.Input((4,)), _OpaqueBlock(name="blk"), keras.layers.Dense(2, name="d")]
    )
    path = tmp_path / "opaque.keras"
    model.save(path)
    status, _, err = run(["inspect", path, "--where", "no-such-weight"], capsys)
    assert status == 2
    trainable, _, unknown = err.partition("; weights of unknown trainability: ")
    # The file proves d/kernel and d/bias trainable; the block's two weights
    # (one of them non-trainable) are unknown, never listed as trainable.
    assert trainable.endswith("Its trainable weights are: d/kernel, d/bias"), err
    assert re.fullmatch(r"unknown:\S+/var_0, unknown:\S+/var_1\.\n", unknown), err
