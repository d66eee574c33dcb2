"""dev.py's test command: the quick loop by default, the full suite with `--all`.

The README promises `python3 dev.py test` is the quick loop (every test but
those marked `slow` or `full`) and `python3 dev.py test --all` the full suite
CI runs; these tests read dev.py's own choice of pytest arguments, and check
that every entry of conftest.FULL_ONLY still names a test that exists.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import FULL_ONLY, ROOT


@pytest.fixture(scope="module")
def dev():
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_is_the_quick_loop_with_a_small_generator_budget(dev):
    args, env = dev.quick_loop(["-x", "-k", "where"])
    assert args == ["-m", "not slow and not full", "-x", "-k", "where"]
    assert env == {"KERASREG_COMBO_EXAMPLES": "2"}


def test_all_runs_the_full_suite(dev):
    args, env = dev.quick_loop(["--all", "-p", "no:cacheprovider"])
    assert args == ["-p", "no:cacheprovider"]
    assert env == {}


@pytest.mark.parametrize(
    "rest",
    [
        ["-m", "slow"],
        ["-mslow"],
        ["tests/test_examples.py"],
        ["tests/test_docs.py::test_page_snippets_run", "-x"],
    ],
)
def test_own_markers_or_named_tests_replace_the_default(dev, rest):
    assert dev.quick_loop(rest) == (rest, {})


def test_the_ci_script_runs_the_full_suite():
    script = (ROOT / ".ci" / "run").read_text()
    calls = re.findall(r"python3 dev\.py test\b[^\n]*", script)
    assert calls, "CI does not call dev.py test"
    assert all("--all" in call for call in calls), calls


@pytest.mark.parametrize("prefix", FULL_ONLY)
def test_every_full_only_entry_names_an_existing_test(prefix):
    path, _, name = prefix.partition("::")
    source = (ROOT / path).read_text()
    function = re.match(r"\w*", name).group(0)
    assert not function or re.search(rf"^def {function}", source, re.MULTILINE), prefix
