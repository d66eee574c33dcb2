"""Security: model files and configs are data, never code.

A `.keras` file can carry Python bytecode (a `Lambda` layer, a lambda used as a
regularizer). Keras's `safe_mode` refuses to load it; `kerasreg inspect` and
`kerasreg shrink` load with that default and must refuse too, without running
the code and without writing anything. The planted code would create a marker
file: the control test shows it really does when loaded unsafely, so the
refusal tests cannot pass by accident.
"""

import re
import warnings
from pathlib import Path

import keras
import pytest

import kerasreg
from kerasreg import cli

SOURCE = Path(kerasreg.__file__).resolve().parent
MARKER_VARIABLE = "KERASREG_TEST_MARKER"


def lambda_code():
    # A genuine lambda (the serialized kind), calling the side effect above.
    return lambda x: (
        __import__("pathlib")
        .Path(__import__("os").environ["KERASREG_TEST_MARKER"])
        .touch(),
        x,
    )[1]


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_VARIABLE, str(path))
    return path


def save(model, folder):
    path = folder / "unsafe.keras"
    model.save(path)
    return path


@pytest.fixture
def unsafe_file(tmp_path, marker):
    inputs = keras.Input((3,))
    x = keras.layers.Lambda(lambda_code())(inputs)
    outputs = keras.layers.Dense(2, kernel_regularizer=kerasreg.L2Penalty(0.1))(x)
    model = keras.Model(inputs, outputs)
    folder = tmp_path / "files"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that lambdas are unsafe
        path = save(model, folder)
    if marker.exists():
        marker.unlink()  # building the Lambda model ran it once, legitimately
    return path


def test_control_the_planted_code_runs_when_loaded_unsafely(unsafe_file, marker):
    keras.saving.load_model(unsafe_file, safe_mode=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["inspect", "shrink"])
def test_cli_refuses_unsafe_model_and_runs_no_code(
    unsafe_file, marker, command, capsys
):
    before = unsafe_file.read_bytes()
    argv = ["inspect", str(unsafe_file)]
    if command == "shrink":
        argv = ["shrink", str(unsafe_file), str(unsafe_file.with_name("out.keras")),
                "--factor", "0.5"]  # fmt: skip
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"kerasreg {command}: error: cannot load ")
    assert "safe_mode" in err
    assert not marker.exists()
    assert unsafe_file.read_bytes() == before
    assert sorted(p.name for p in unsafe_file.parent.iterdir()) == ["unsafe.keras"]


def test_get_refuses_a_lambda_config(marker):
    with pytest.warns(UserWarning, match="lambda"):
        config = keras.saving.serialize_keras_object(lambda_code())
    assert config["class_name"] == "__lambda__"
    with pytest.raises(ValueError, match="Could not interpret regularizer"):
        kerasreg.get(config)
    assert not marker.exists()
    # Control: the config is live code, which Keras runs only when told to.
    function = keras.saving.deserialize_keras_object(config, safe_mode=False)
    function(1.0)
    assert marker.exists()


# --- guard on the source: no unpickling, no evaluation, no unsafe loading -------

FORBIDDEN = {
    "pickle / dill / cloudpickle / shelve / marshal": re.compile(
        r"\b(c?pickle|dill|cloudpickle|shelve|marshal)\b"
    ),
    "eval() / exec() / compile() of source": re.compile(
        r"(?<![\w.])(eval|exec)\s*\(|(?<![\w.])compile\s*\(\s*[^)]*['\"]exec['\"]"
    ),
    "safe_mode=False": re.compile(r"safe_mode\s*=\s*False"),
    "enable_unsafe_deserialization": re.compile(r"enable_unsafe_deserialization"),
    "torch.load / numpy allow_pickle": re.compile(
        r"torch\.load|allow_pickle\s*=\s*True"
    ),
    "yaml.load / unsafe loaders": re.compile(r"yaml\.(unsafe_)?load\b"),
}


def test_source_never_unpickles_or_evaluates():
    files = sorted(SOURCE.glob("*.py"))
    assert len(files) >= 8
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    found.append(f"{path.name}:{number}: {what}: {line.strip()}")
    assert found == []


def test_guard_patterns_catch_what_they_guard_against():
    # The guard above is only as good as its patterns.
    bad = [
        "import pickle",
        "obj = pickle.loads(data)",
        "fn = eval(config['code'])",
        "exec(text)",
        "keras.saving.load_model(path, safe_mode=False)",
        "keras.config.enable_unsafe_deserialization()",
        "np.load(path, allow_pickle=True)",
        "import marshal",
    ]
    for line in bad:
        assert any(p.search(line) for p in FORBIDDEN.values()), line
    fine = ["model.evaluate(x)", "re.compile(pattern)", "tf.function(fn)"]
    for line in fine:
        assert not any(p.search(line) for p in FORBIDDEN.values()), line


def test_cli_loads_with_safe_mode():
    text = (SOURCE / "cli.py").read_text()
    calls = re.findall(r"load_model\(([^)]*)\)", text)
    assert calls, "cli.py no longer calls keras.saving.load_model"
    for arguments in calls:
        assert "safe_mode=True" in arguments or "safe_mode" not in arguments
