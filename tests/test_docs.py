"""The documentation cannot rot: every snippet runs, every doctest passes, the site builds.

- Every ```python block of README.md and docs/**/*.md is executed: a page's
  blocks in order, in one namespace per page, in a temporary working directory.
  A block right after a `<!-- skip-snippet -->` line is not run (only for code
  that cannot run here, e.g. on a GPU); the test checks that such markers stay
  rare.
- The docstring examples (`>>>`) of every kerasreg module run as doctests, each
  docstring on a fresh Keras session (layer names such as `dense` restart), with
  `keras`, `np` and `kerasreg` in scope.
- `mkdocs build --strict` builds the site (slow; skipped only when mkdocs is not
  installed and CI is not set).
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT

import kerasreg

SKIP_MARK = "<!-- skip-snippet -->"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def pages() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """`(line number, code, skipped)` for every ```python block of `text`."""
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1), before.strip() == SKIP_MARK))
    return blocks


def test_block_finder_reads_markdown_as_written():
    text = (
        "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
        f"{SKIP_MARK}\n```python\ngpu()\n```\n```python title\ny = 2\n```\n"
    )
    assert python_blocks(text) == [
        (3, "x = 1\n", False),
        (11, "gpu()\n", True),
        (14, "y = 2\n", False),
    ]


def test_the_docs_have_snippets_and_few_skips():
    blocks = {
        p.relative_to(ROOT).as_posix(): python_blocks(p.read_text()) for p in pages()
    }
    assert len(blocks["README.md"]) >= 1
    run = sum(not skipped for bs in blocks.values() for _, _, skipped in bs)
    skipped = sum(skipped for bs in blocks.values() for _, _, skipped in bs)
    assert run >= 10
    assert skipped <= max(2, run // 10), "skip-snippet is for code that cannot run here"


def test_readme_is_short_and_keeps_the_quick_start():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 12_000
    text = readme.decode()
    assert "```bash\npython3 dev.py demo\npython3 dev.py test\n```" in text


def test_every_docs_page_is_in_the_nav():
    """mkdocs only reports unlisted pages at INFO level, which --strict lets pass."""
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        name = page.relative_to(ROOT / "docs").as_posix()
        assert re.search(rf":\s*{re.escape(name)}\s*$", config, re.MULTILINE), name


def pages_with_snippets() -> list:
    return [
        p for p in pages() if any(not s for _, _, s in python_blocks(p.read_text()))
    ]


@pytest.mark.parametrize(
    "page", pages_with_snippets(), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = [
        (line, code)
        for line, code, skipped in python_blocks(page.read_text())
        if not skipped
    ]
    monkeypatch.chdir(tmp_path)
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__snippet__"}
    policy = keras.config.dtype_policy()
    try:
        for line, code in blocks:
            compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(compiled, namespace)  # the page's own code, as a reader would run it
    finally:
        keras.config.set_dtype_policy(policy)


def modules() -> list[str]:
    """Every kerasreg module, those of subpackages (`kerasreg.sweep.*`) included."""
    return sorted(
        info.name
        for info in pkgutil.walk_packages(kerasreg.__path__, "kerasreg.")
        if info.name != "kerasreg.__main__"
    )


def examples_in(name: str) -> int:
    found = doctest.DocTestFinder().find(importlib.import_module(name), name)
    return sum(len(test.examples) for test in found)


@pytest.mark.parametrize("name", [m for m in modules() if examples_in(m)])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "keras": keras, "np": np, "kerasreg": kerasreg}
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    failures: list[str] = []
    for test in doctest.DocTestFinder().find(module, name, globs=globs):
        # Layer names restart at `dense` in every docstring.
        keras.utils.clear_session(free_memory=False)
        runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)


def test_docstring_examples_exist():
    """The doctest test above has something to run: the public API has examples."""
    assert sum(examples_in(name) for name in modules()) >= 30


def mkdocs_available() -> bool:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    if not mkdocs_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but mkdocs/mkdocs-material/mkdocstrings are missing")
        pytest.skip("mkdocs not installed (pip install -e .[docs])")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The API reference is generated from the docstrings, not written by hand.
    api = (site / "api" / "index.html").read_text()
    assert "l2 * sum(w**2)" in api or "l2 * sum(w**2)".replace("*", "&ast;") in api
    assert "kerasreg.layer" in api
    for page in ("index.html", "guide/where/index.html", "guide/penalties/index.html"):
        assert (site / page).exists(), page


def test_api_reference_shows_the_public_names():
    """docs/api.md documents every name of `kerasreg.__all__` and only
    importable objects: each `::: a.b.c` resolves, and each public name is
    the very object one of them documents (`kerasreg.grid is
    kerasreg.sweep.grids.grid`)."""
    text = (ROOT / "docs" / "api.md").read_text()
    shown = {}
    for dotted in re.findall(r"^::: ([\w.]+)", text, flags=re.M):
        module, _, name = dotted.rpartition(".")
        try:
            shown[dotted] = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:
            shown[dotted] = importlib.import_module(dotted)
    missing = [
        name
        for name in kerasreg.__all__
        if not any(obj is getattr(kerasreg, name) for obj in shown.values())
    ]
    assert not missing, f"public names absent from docs/api.md: {missing}"
