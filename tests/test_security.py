"""Security: model files and configs are data, never code.

A `.keras` file can carry Python bytecode (a `Lambda` layer, a lambda used as a
regularizer) or name modules and functions that deserializing would import and
call (CVE-2025-1550, CVE-2025-8747, CVE-2025-9906, and CVE-2025-9905 for legacy
HDF5). `kerasreg inspect` and `kerasreg shrink` never deserialize: they read
the config as JSON and the weights with h5py, so a `Lambda` model is inspected
and shrunk like any other, and nothing planted in a file ever runs. The planted
code would create a marker file: the control tests show it really does when
loaded unsafely or imported, so the tests cannot pass by accident.
"""

import io
import json
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
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


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def dataset(path, name):
    with zipfile.ZipFile(path) as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        return weights[name][()]


def test_cli_inspects_and_shrinks_a_lambda_model_without_running_it(
    unsafe_file, marker, capsys
):
    before = unsafe_file.read_bytes()
    status, out, err = run(["inspect", unsafe_file, "--json"], capsys)
    assert status == 0, err
    kernel = dataset(unsafe_file, "layers/dense/vars/0").astype(np.float64)
    assert list(json.loads(out)) == ["dense/kernel"]
    row = json.loads(out)["dense/kernel"]
    assert row["l1"] == pytest.approx(np.abs(kernel).sum(), rel=1e-6)
    assert row["penalty"] == pytest.approx(0.1 * (kernel**2).sum(), rel=1e-6)
    target = unsafe_file.with_name("out.keras")
    status, out, err = run(["shrink", unsafe_file, target, "--factor", "0.5"], capsys)
    assert status == 0, err
    np.testing.assert_array_equal(
        dataset(target, "layers/dense/vars/0"),
        dataset(unsafe_file, "layers/dense/vars/0") * np.float32(0.5),
    )
    with zipfile.ZipFile(unsafe_file) as a, zipfile.ZipFile(target) as b:
        assert a.read("config.json") == b.read("config.json")  # the Lambda kept
    assert not marker.exists()
    assert unsafe_file.read_bytes() == before


EVIL_MODULE = "kerasreg_test_planted_module"


@pytest.fixture
def planted_file(tmp_path, marker, monkeypatch):
    """A .keras file whose config names a module that writes the marker on
    import, and the CVE vectors in spirit: a config that calls `os.system`, one
    that calls `keras.utils.get_file`, one that turns unsafe deserialization on
    before a Lambda."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{EVIL_MODULE}.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['KERASREG_TEST_MARKER']).touch()\n"
        "import keras\n"
        "class Evil(keras.layers.Dense):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{SOURCE.parent}")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)]
    )
    path = tmp_path / "planted.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    layers = config["config"]["layers"]
    layers[1].update(module=EVIL_MODULE, class_name="Evil", registered_name="Evil")
    layers[2]["config"]["kernel_regularizer"] = {
        "module": "os", "class_name": "system", "registered_name": "system",
        "config": {"command": f"touch {marker}"},
    }  # fmt: skip
    layers.append({
        "module": "keras.utils", "class_name": "get_file", "registered_name": None,
        "config": {"fname": str(marker), "origin": "file:///etc/hostname"},
    })  # fmt: skip
    layers.append({
        "module": "keras.config", "class_name": "enable_unsafe_deserialization",
        "registered_name": None, "config": {},
    })  # fmt: skip
    lambda_config = keras.saving.serialize_keras_object(
        keras.layers.Lambda(lambda_code())
    )
    layers.append(lambda_config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_planted_module_and_cve_vectors_never_run(planted_file, marker, capsys):
    status, out, err = run(["inspect", planted_file, "--where", "."], capsys)
    assert status == 0, err
    # The unknown class's weights are still reported (named by the file).
    assert "dense/var_0" in out and "dense_1/kernel" in out
    assert "unknown" in out  # the os.system "regularizer" is never called
    target = planted_file.with_name("out.keras")
    status, _, err = run(["shrink", planted_file, target, "--factor", "0.5"], capsys)
    assert status == 0, err
    assert not marker.exists()
    # Control: importing the planted module does write the marker.
    __import__(EVIL_MODULE)
    assert marker.exists()


def test_command_process_runs_no_planted_code(planted_file, marker):
    script = (
        "import sys; sys.argv = ['kerasreg']; import kerasreg.cli as c; "
        f"c.main(['inspect', {str(planted_file)!r}]); "
        f"c.main(['shrink', {str(planted_file)!r}, "
        f"{str(planted_file.with_name('o.keras'))!r}, '--factor', '0']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"('keras', 'tensorflow', {EVIL_MODULE!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not marker.exists()


def test_legacy_hdf5_model_config_is_never_read(tmp_path, marker, capsys):
    # CVE-2025-9905 in spirit: a legacy .h5 model with a Lambda in its config.
    path = tmp_path / "legacy.h5"
    lambda_config = keras.saving.serialize_keras_object(
        keras.layers.Lambda(lambda_code())
    )
    with h5py.File(path, "w") as legacy:
        legacy.attrs["model_config"] = json.dumps(
            {"class_name": "Sequential", "config": {"layers": [lambda_config]}}
        )
        legacy.create_dataset(
            "model_weights/dense/dense/kernel:0", data=np.ones((2, 2))
        )
    status, out, err = run(["inspect", path], capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "legacy" in err
    assert not marker.exists()


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


def test_cli_never_deserializes_or_imports_keras():
    for name in (
        "cli.py",
        "keras_file.py",
        "keras_file_names.py",
        "keras_file_stats.py",
    ):
        text = (SOURCE / name).read_text()
        for forbidden in (
            r"^\s*(import|from)\s+(keras|tensorflow|jax|torch)\b",
            r"load_model\(|deserialize_keras_object|from_config\(|importlib|__import__",
        ):
            assert not re.search(forbidden, text, re.M), (name, forbidden)


# --- hostile archives: one line, exit 1, nothing written ----------------------


@pytest.fixture(scope="module")
def good_members(tmp_path_factory):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d")])
    path = tmp_path_factory.mktemp("good") / "good.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewrite_weights(members, edit):
    """`members` with model.weights.h5 changed by `edit(h5file)`."""
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "a") as weights:
        edit(weights)
    return {**members, "model.weights.h5": buffer.getvalue()}


def replace_kernel(**kwargs):
    def edit(weights):
        del weights["layers/dense/vars/0"]
        weights["layers/dense/vars"].create_dataset("0", **kwargs)

    return edit


def write_zip(path, entries, compression=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(path, "w", compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)


HOSTILE = {
    "zip bomb": (lambda m: [*m.items(), ("padding.bin", b"\0" * (40 << 20))],
                 zipfile.ZIP_DEFLATED, "zip bomb"),
    "path traversal": (lambda m: [*m.items(), ("../../evil.py", b"x")],
                       zipfile.ZIP_STORED, "unsafe path"),
    "absolute path": (lambda m: [*m.items(), ("/tmp/evil.py", b"x")],
                      zipfile.ZIP_STORED, "unsafe path"),
    "duplicate member": (lambda m: [*m.items(), ("config.json", b"{}")],
                         zipfile.ZIP_STORED, "two members"),
    "no weights": (lambda m: [(k, v) for k, v in m.items()
                              if k != "model.weights.h5"],
                   zipfile.ZIP_STORED, "no model.weights.h5"),
    "config not JSON": (lambda m: {**m, "config.json": b"{not json"}.items(),
                        zipfile.ZIP_STORED, "not valid JSON"),
    "config nested too deep": (lambda m: {**m, "config.json": b"[" * 100000}.items(),
                               zipfile.ZIP_STORED, "not valid JSON"),
    "config a list": (lambda m: {**m, "config.json": b"[]"}.items(),
                      zipfile.ZIP_STORED, "not a JSON object"),
    "weights not HDF5": (lambda m: {**m, "model.weights.h5": b"junk" * 100}.items(),
                         zipfile.ZIP_STORED, "not a readable HDF5"),
    "weights truncated": (lambda m: {**m, "model.weights.h5":
                                     m["model.weights.h5"][:3000]}.items(),
                          zipfile.ZIP_STORED, "model.weights.h5"),
    "shape disagrees with config": (
        lambda m: rewrite_weights(m, replace_kernel(data=np.ones((3, 5), "f4"))).items(),
        zipfile.ZIP_STORED, "config disagrees"),
    "dataset larger than its storage": (
        lambda m: rewrite_weights(m, replace_kernel(shape=(3, 1 << 40), dtype="f4")).items(),
        zipfile.ZIP_STORED, "declares"),
    "dataset of strings": (
        lambda m: rewrite_weights(m, replace_kernel(data=np.array([b"a", b"b"]))).items(),
        zipfile.ZIP_STORED, "not numbers"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_fails_with_one_line_and_writes_nothing(
    case, good_members, tmp_path, capsys
):
    build, compression, message = HOSTILE[case]
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "hostile.keras"
    write_zip(path, build(good_members), compression)
    before = path.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["inspect", path],
                 ["shrink", path, out_dir / "o.keras", "--factor", "0.5"]):  # fmt: skip
        status, out, err = run(argv, capsys)
        assert (status, out) == (1, ""), (case, err)
        assert err.count("\n") == 1 and message in err, err
    assert list(out_dir.iterdir()) == []
    assert sorted(p.name for p in folder.iterdir()) == ["hostile.keras"]
    assert path.read_bytes() == before


def test_truncated_archive_fails_with_one_line(good_members, tmp_path, capsys):
    path = tmp_path / "cut.keras"
    write_zip(path, good_members.items())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    status, out, err = run(["inspect", path], capsys)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and "not a Keras model file" in err
