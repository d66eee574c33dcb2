"""`kerasreg inspect` / `kerasreg shrink`: output against numpy, errors, safety."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

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

    def failing_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", failing_save)
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
