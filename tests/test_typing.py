"""kerasreg's type hints are what users' type checkers see (PEP 561, `py.typed`).

- mypy (settings in pyproject.toml) passes on the package and on
  tests/typing/public_api.py, typed code as a `mypy --strict` user writes it,
  whose `assert_type`s fail if a public name were typed `Any`;
- tests/typing/public_api_misuse.py gets exactly the errors it marks;
- `kerasreg/__init__.py` shows type checkers the names it serves at run time.

Run in the checkout (`python3 dev.py test`), mypy reads `kerasreg/` from the
source tree. Run from outside it with kerasreg installed from the wheel
(`.ci/package`), it reads the installed package, whose types it sees only
through the `py.typed` marker the wheel ships: the test checks which copy
mypy read.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import kerasreg

TYPING = ROOT / "tests" / "typing"
PACKAGE = Path(kerasreg.__file__).resolve().parent
INSTALLED = not PACKAGE.is_relative_to(ROOT)
MARK = re.compile(r"#\s*E:\s*([a-z-]+)\s*$")
ERROR = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def type_checking_imports(source: str) -> dict[str, str]:
    """`{name: module}` of the `if TYPE_CHECKING:` block's `from M import N as N`."""
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom), ast.unparse(statement)
                for alias in statement.names:
                    # `N as N`: an explicit re-export, seen under --strict.
                    assert alias.asname == alias.name, ast.unparse(statement)
                    found[alias.name] = statement.module or ""
    return found


def test_type_checkers_see_every_public_name():
    # `__getattr__` serves `_PUBLIC` at run time; type checkers read the
    # TYPE_CHECKING imports instead: the two lists must not drift apart.
    source = (PACKAGE / "__init__.py").read_text()
    assert type_checking_imports(source) == kerasreg._PUBLIC
    assert sorted(kerasreg._PUBLIC) == kerasreg.__all__


def test_type_checking_imports_reader():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kerasreg.decay import WeightDecay as WeightDecay\n"
        "else:\n    from kerasreg.norms import weight_norms as weight_norms\n"
    )
    assert type_checking_imports(source) == {"WeightDecay": "kerasreg.decay"}
    with pytest.raises(AssertionError):
        type_checking_imports(
            "if TYPE_CHECKING:\n    from kerasreg.decay import WeightDecay\n"
        )


def test_the_marker_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()


def test_typed_usage_runs(tmp_path):
    # The typed calls of public_api.py are real calls: they run as written.
    spec = importlib.util.spec_from_file_location(
        "public_api", TYPING / "public_api.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(str(tmp_path / "logs"))
    assert isinstance(result, kerasreg.SweepResult)
    assert len(result.rows) == len(result.models) == 2
    assert (tmp_path / "logs" / "train").is_dir()


def marked_errors(path: Path) -> set[tuple[int, str]]:
    return {
        (number, match.group(1))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := MARK.search(line))
    }


def test_marked_errors_reader(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("a = 1\nf(a)  # E: arg-type\nb = 2  # E:call-arg\n")
    assert marked_errors(sample) == {(2, "arg-type"), (3, "call-arg")}


def mypy_available() -> bool:
    return importlib.util.find_spec("mypy") is not None


def test_mypy_sees_the_public_api_types(tmp_path):
    if not mypy_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but mypy is missing (pip install -e .[test])")
        pytest.skip("mypy not installed (pip install -e .[test])")
    files = [TYPING / "public_api.py", TYPING / "public_api_misuse.py"]
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--python-executable",
        sys.executable,
        "--show-traceback",
        "-v",
    ]
    if INSTALLED:
        # From outside the checkout: `kerasreg` can only be the installed copy.
        command += ["--cache-dir", str(tmp_path / "cache"), *map(str, files)]
        cwd = tmp_path
    else:
        command += ["kerasreg", *(str(f.relative_to(ROOT)) for f in files)]
        cwd = ROOT
    run = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    report = run.stdout + run.stderr
    # mypy read the kerasreg that this process imports, nothing else.
    read = re.findall(
        r"(?:Parsing (\S+) \(kerasreg\)|Metadata fresh for kerasreg: file (\S+))$",
        report,
        re.MULTILINE,
    )
    assert read, report[-4000:]
    assert {(cwd / "".join(p)).resolve() for p in read} == {PACKAGE / "__init__.py"}
    errors = {
        (Path(m["file"]).name, int(m["line"]), m["code"])
        for m in map(ERROR.match, run.stdout.splitlines())
        if m
    }
    expected = {
        ("public_api_misuse.py", line, code) for line, code in marked_errors(files[1])
    }
    assert len(expected) >= 10
    assert errors == expected, run.stdout[-4000:]
    assert run.returncode == 1, report[-4000:]  # 1: type errors (those above) only
