"""Set up a virtual environment and run the demo or the tests.

    python3 dev.py demo               # the main job: examples/demo.py
    python3 dev.py test [ARGS]        # the quick loop: pytest ARGS
    python3 dev.py test --all [ARGS]  # the full suite, as CI runs it
    python3 dev.py docs [ARGS]        # the site, `mkdocs build --strict` into site/

Needs only Python 3.10+ and pip (`test` installs the test extras). The environment lives in `.venv/` (override with
KERASREG_VENV) and is reinstalled only when `setup.cfg` changes. Set
KERAS_BACKEND=jax or torch to run on another backend: its package is installed
too (PyTorch as the CPU build).

`test` runs pytest on one pytest-xdist worker per CPU core (at most 4: each
holds its own TensorFlow), `-n N --dist loadgroup`, unless ARGS choose (`-n`,
`--numprocesses`, `--dist`, `-p no:xdist`) or debug (`--pdb`, `--trace`).
By default it runs the quick loop, `-m "not slow and not full"`: every test
but the slow ones (marked `slow`, > ~20 s) and those marked `full` (fresh
processes, several devices, example scripts, whole guide pages, benchmark
smoke runs: tests/conftest.py's FULL_ONLY), with 2 drawn examples per
combination-generator test (KERASREG_COMBO_EXAMPLES, unless set). `--all`
runs the full suite, as CI does; a `-m` of your own, or test files or node
ids named in ARGS, replace the default.

KERASREG_FLOOR=1 uses a separate environment, `.venv-floor/`, holding exactly the
oldest Keras, TensorFlow, JAX and numpy kerasreg supports (`ci/floor-constraints.txt`),
for the TensorFlow and JAX backends.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FLOOR = os.environ.get("KERASREG_FLOOR", "") not in ("", "0")
FLOOR_CONSTRAINTS = ROOT / "ci" / "floor-constraints.txt"
FLOOR_BACKENDS = ("tensorflow", "jax")
VENV = Path(
    os.environ.get("KERASREG_VENV", ROOT / (".venv-floor" if FLOOR else ".venv"))
)
BACKEND_PACKAGES = {
    "tensorflow": [],
    "jax": ["jax[cpu]"],
    # Pinned to the CPU build these machines carry; an unpinned torch pulls
    # several GB of CUDA libraries.
    "torch": ["torch==2.13.0"],
}
# The tests build the docs too (tests/test_docs.py), so they install its extra.
EXTRAS = {"demo": "examples", "test": "test,examples,docs", "docs": "docs"}


def python_in_venv() -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return VENV / scripts / ("python.exe" if os.name == "nt" else "python")


def ensure_environment(task: str, backend: str) -> Path:
    python = python_in_venv()
    if not python.exists():
        print(f"dev.py: creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    extras = EXTRAS[task]
    recipe = (ROOT / "setup.cfg").read_bytes() + f"{extras};{backend}".encode()
    if FLOOR:
        recipe += FLOOR_CONSTRAINTS.read_bytes()
    key = hashlib.sha256(recipe).hexdigest()[:16]
    stamp = VENV / f".kerasreg-installed-{key}"
    if not stamp.exists():
        print(f"dev.py: installing kerasreg[{extras}] ({backend})", flush=True)
        pip = [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        if FLOOR:
            # Every install below resolves within the floor's exact pins.
            pip.extend(["--constraint", str(FLOOR_CONSTRAINTS)])
        subprocess.run([*pip, "-e", f"{ROOT}[{extras}]"], check=True)
        if BACKEND_PACKAGES[backend]:
            subprocess.run([*pip, *BACKEND_PACKAGES[backend]], check=True)
        stamp.touch()
    return python


def workers() -> int:
    """How many pytest-xdist workers `test` starts: one per usable core, at
    most 4 (each worker imports TensorFlow: about 1.5 GB of memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(cores, 4)


def pytest_arguments(rest: list[str]) -> list[str]:
    """`rest`, with `-n N --dist loadgroup` first unless `rest` chooses how
    to run (a worker count, a distribution mode, xdist off) or debugs (the
    debugger needs the test in this process), or there is one core."""
    chooses = ("-n", "--numprocesses", "--dist", "--pdb", "--trace")
    if (
        workers() < 2
        or any(arg.startswith(chooses) for arg in rest)
        or any(arg.endswith("no:xdist") for arg in rest)  # -p no:xdist
    ):
        return rest
    # loadgroup: tests that share one expensive fresh process or module
    # fixture carry `@pytest.mark.xdist_group` and run on one worker.
    return ["-n", str(workers()), "--dist", "loadgroup", *rest]


QUICK_LOOP = "not slow and not full"


def quick_loop(rest: list[str]) -> tuple[list[str], dict[str, str]]:
    """`(pytest ARGS, environment)` of `test`: the quick loop's marker
    expression and generator budget unless `rest` asks for `--all` (removed:
    it is dev.py's), gives its own `-m`, or names test files or node ids
    (`tests/test_examples.py`: what it names runs)."""
    if "--all" in rest:
        return [arg for arg in rest if arg != "--all"], {}
    if any(arg.startswith("-m") for arg in rest) or any(
        (ROOT / arg.split("::")[0]).exists() for arg in rest if not arg.startswith("-")
    ):
        return rest, {}
    return ["-m", QUICK_LOOP, *rest], {"KERASREG_COMBO_EXAMPLES": "2"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    task, rest = argv[0], argv[1:]
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend not in BACKEND_PACKAGES:
        print(
            f"dev.py: KERAS_BACKEND={backend!r} is not supported; expected one of "
            f"{', '.join(BACKEND_PACKAGES)}.",
            file=sys.stderr,
        )
        return 2
    if FLOOR and backend not in FLOOR_BACKENDS:
        print(
            f"dev.py: KERASREG_FLOOR=1 with KERAS_BACKEND={backend!r}: the floor "
            f"environment is tested on {' and '.join(FLOOR_BACKENDS)} only.",
            file=sys.stderr,
        )
        return 2
    python = ensure_environment(task, backend)
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if task == "demo":
        command = [str(python), str(ROOT / "examples" / "demo.py"), *rest]
    elif task == "docs":
        site = str(ROOT / "site")
        command = [str(python), "-m", "mkdocs", "build", "--strict", "-d", site, *rest]
    else:
        rest, defaults = quick_loop(rest)
        for name, value in defaults.items():
            env.setdefault(name, value)
        command = [str(python), "-m", "pytest", *pytest_arguments(rest)]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
