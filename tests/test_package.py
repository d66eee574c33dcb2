"""The wheel and the sdist hold what users need; CI tests the installed wheel.

`.ci/package` builds both (`python -m build`: the sdist, then the wheel from
the sdist), installs the wheel in a fresh virtual environment and runs this
file with it, from outside the source tree, with `KERASREG_DIST` naming the
folder of the built files. Run in the checkout without `KERASREG_DIST`, the
tests build them here, the same way, from a copy of the files git tracks.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.version import Version

import kerasreg

DIST = os.environ.get("KERASREG_DIST")
PACKAGE = Path(kerasreg.__file__).resolve().parent
# In the sdist: the repository less CI's own scripts.
NOT_IN_SDIST = re.compile(r"^(\.ci/|\.gitignore$)")


def tracked(*paths: str) -> list[str]:
    """The files git tracks under `paths` (all of them by default)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout the tests come from")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(name for name in out.split("\0") if name)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    if DIST:
        return Path(DIST)
    # What a fresh clone holds: the tracked files, as they are in the work tree.
    source = tmp_path_factory.mktemp("source")
    for name in tracked():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    return out


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def wheel_names(dist: Path) -> list[str]:
    with zipfile.ZipFile(only(dist, "kerasreg-*.whl")) as wheel:
        return wheel.namelist()


def wheel_read(dist: Path, name: str) -> str:
    with zipfile.ZipFile(only(dist, "kerasreg-*.whl")) as wheel:
        return wheel.read(name).decode()


def dist_info() -> str:
    return f"kerasreg-{kerasreg.__version__}.dist-info/"


@pytest.mark.slow
def test_wheel_holds_every_module_the_marker_and_the_license(dist):
    names = wheel_names(dist)
    # Every file git tracks in the package, the new subpackages included, and
    # nothing else: no test, no stray build file.
    assert sorted(n for n in names if n.startswith("kerasreg/")) == tracked("kerasreg")
    assert "kerasreg/py.typed" in names
    assert "kerasreg/sweep/__init__.py" in names
    licenses = [n for n in names if n.startswith(dist_info()) and "LICENSE" in n]
    assert len(licenses) == 1, licenses
    assert wheel_read(dist, licenses[0]) == (ROOT / "LICENSE").read_text()
    others = [n for n in names if not n.startswith(("kerasreg/", dist_info()))]
    assert others == []


@pytest.mark.slow
def test_sdist_is_the_tracked_tree(dist):
    sdist = only(dist, "kerasreg-*.tar.gz")
    top = f"kerasreg-{kerasreg.__version__}/"
    with tarfile.open(sdist) as archive:
        files = {m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()}
    generated = {"PKG-INFO"} | {f for f in files if f.startswith("kerasreg.egg-info/")}
    expected = {f for f in tracked() if not NOT_IN_SDIST.match(f)}
    assert files - generated == expected
    assert {"LICENSE", "CHANGELOG.md", "README.md", "kerasreg/py.typed"} <= files


@pytest.mark.slow
def test_wheel_metadata(dist):
    metadata = email.parser.Parser().parsestr(
        wheel_read(dist, dist_info() + "METADATA")
    )
    assert metadata["Name"] == "kerasreg"
    assert metadata["Version"] == kerasreg.__version__
    assert "Apache-2.0" in {metadata["License"], metadata["License-Expression"]}
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = setup["options"]["install_requires"].split()
    requires = metadata.get_all("Requires-Dist")
    assert sorted(r for r in requires if "extra ==" not in r) == sorted(declared)
    assert set(metadata.get_all("Provides-Extra")) == {"test", "examples", "docs"}
    entry_points = wheel_read(dist, dist_info() + "entry_points.txt")
    assert "kerasreg = kerasreg.cli:main" in entry_points.splitlines()


def test_kerasreg_comes_from_where_this_run_says():
    # `.ci/package` (KERASREG_DIST set): the wheel installed in the fresh
    # environment's site-packages, never the checkout. Otherwise: the checkout.
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if DIST:
        assert site / "kerasreg" == PACKAGE
        assert not PACKAGE.is_relative_to(ROOT)
    else:
        assert ROOT / "kerasreg" == PACKAGE


def test_changelog_describes_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    # Keep a Changelog: "Unreleased" on top, then the newest version first;
    # the newest is the one this package says it is.
    assert versions[0] == "Unreleased"
    newest = Version(next(v for v in versions if v != "Unreleased"))
    version = Version(kerasreg.__version__)
    assert str(version) == kerasreg.__version__  # PEP 440, normalized
    unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    changes = re.sub(r"<!--.*?-->|^#+ [^\n]*$", "", unreleased, flags=re.S | re.M)
    if changes.strip():
        # Changes since the newest release: this is a pre-release (0.2.0.dev0)
        # of a version after it, not the released version itself.
        assert version.is_prerelease, (version, "has unreleased changes")
        assert Version(version.base_version) > newest, (version, newest)
    else:
        assert version == newest
