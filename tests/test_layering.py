"""The package is layered: a module imports only modules of lower layers.

Every `kerasreg/*.py` and `kerasreg/<subpackage>/*.py` is parsed with `ast`
(nothing is imported) and each of its `kerasreg` imports, at module level or
inside a function, is checked against `LAYERS`. A subpackage's modules are
named `<subpackage>.<module>` (its `__init__` is `<subpackage>`). A new module
must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kerasreg"

# Lower numbers are lower layers; a module may import only strictly lower ones.
LAYERS = {
    # Helpers, the one door to Keras internals, functions traced once; the
    # Keras-free table of what Keras layers save imports no kerasreg module.
    "_checks": 0,
    "_compat": 0,
    "tf_functions": 0,
    "keras_file_layers": 0,
    # The formulas, the model walk, the TensorBoard event-file writer and the
    # machinery the callbacks share.
    "summaries": 1,
    "penalties": 1,
    "walk": 1,
    "callback_order": 1,
    "fit_record": 1,
    "inplace": 1,
    "train_step_fold": 1,
    "gradient_stats": 1,
    "keras_file_names": 1,
    "keras_file": 2,
    "selectors": 2,
    "gradient_capture": 2,
    "keras_file_stats": 3,
    # The one `where=` rule.
    "selection": 3,
    # Features built on penalties and selection.
    "norms": 4,
    "gradients": 4,
    "attach": 4,
    "plan": 4,
    "poststep": 4,
    "decay": 5,
    "tensorboard": 5,
    # The sweep subpackage: data, context and the batched kernels low, the
    # engines above the variants and the monitor, the engine choice above
    # them, the call on top, its public surface (`kerasreg/sweep/__init__.py`)
    # above it.
    "sweep.data": 2,
    "sweep.context": 2,
    "sweep.figure": 2,
    "sweep.hparams": 2,
    "sweep.kernels": 2,
    "sweep.grids": 5,
    "sweep.items": 5,
    "sweep.vectorized": 8,
    "sweep.result": 5,
    "sweep.rows": 2,
    "sweep.variants": 5,
    "sweep.gradient_log": 5.5,  # above tensorboard, below monitor
    "sweep.monitor": 6,
    "sweep.repeats": 6,
    "sweep.randomness": 2,
    "sweep.backup": 3,  # a sweep's BackupAndRestore: above rows
    "sweep.sequential": 7,
    "sweep.stopping": 7.5,  # callbacks in one fit: above sequential's copies
    "sweep.stacked": 7.7,
    "sweep.mapped": 7.7,
    "sweep.engines": 9,
    "sweep.run": 10,
    "sweep": 11,
    # The command line (Keras-free) and the package surface on top.
    "cli": 12,
    "__init__": 13,
    "__main__": 14,
}

# (importer, imported): why an import may go upward. Keep this short.
JUSTIFIED = {
    ("cli", "__init__"): (
        "`kerasreg --version` reads `kerasreg.__version__`, inside "
        "`build_parser`, once the package has finished importing"
    ),
}


def kerasreg_imports(source: str, known: set[str]) -> set[str]:
    """The kerasreg modules `source` imports, at any depth (`__init__` for the package).

    `from kerasreg import X` names module `X` when `X` is one of `known`,
    otherwise an attribute of the package (`__init__`).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "kerasreg":
                continue
            if len(parts) > 1:
                module = module_name(parts[1:], known)
                if module in SUBPACKAGES and len(parts) == 2:
                    # `from kerasreg.sweep import run`: a module of the subpackage
                    for alias in node.names:
                        inner = f"{module}.{alias.name}"
                        found.add(inner if inner in known else module)
                else:
                    found.add(module)
            else:
                for alias in node.names:
                    found.add(alias.name if alias.name in known else "__init__")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # Relative imports inside the package.
            module = (node.module or "").split(".")[0]
            if module:
                found.add(module)
            else:
                found.update(
                    a.name if a.name in known else "__init__" for a in node.names
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kerasreg":
                    found.add(
                        module_name(parts[1:], known) if len(parts) > 1 else "__init__"
                    )
    return found


def module_name(parts: list[str], known: set[str]) -> str:
    """`["sweep", "run", "X"]` -> `"sweep.run"` when known, else `"sweep"`."""
    if len(parts) > 1 and f"{parts[0]}.{parts[1]}" in known:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def upward_imports(
    modules: dict[str, str], layers: dict[str, int], justified: dict
) -> list[str]:
    """`importer -> imported` for every import that is not strictly downward."""
    known = set(modules)
    problems = []
    for name, source in sorted(modules.items()):
        for target in sorted(kerasreg_imports(source, known) - {name}):
            if target not in layers:
                problems.append(f"{name} -> {target} (no layer declared)")
            elif layers[target] >= layers[name] and (name, target) not in justified:
                problems.append(
                    f"{name} (layer {layers[name]}) -> {target} "
                    f"(layer {layers[target]})"
                )
    return problems


SUBPACKAGES = {"sweep"}


def package_sources() -> dict[str, str]:
    sources = {path.stem: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}
    for sub in sorted(SUBPACKAGES):
        for path in sorted((PACKAGE / sub).glob("*.py")):
            name = sub if path.stem == "__init__" else f"{sub}.{path.stem}"
            sources[name] = path.read_text()
    return sources


def test_every_subpackage_is_declared():
    found = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert found == SUBPACKAGES


def test_every_module_has_a_layer():
    assert set(package_sources()) == set(LAYERS)


def test_no_module_imports_upward():
    assert upward_imports(package_sources(), LAYERS, JUSTIFIED) == []


def test_justified_imports_still_exist():
    # A stale exception would silently allow an upward import later.
    sources = package_sources()
    for importer, imported in JUSTIFIED:
        assert imported in kerasreg_imports(sources[importer], set(sources))


def test_penalties_and_selection_are_below_every_feature():
    for feature in ("norms", "attach", "poststep", "decay", "tensorboard", "sweep"):
        assert LAYERS[feature] > LAYERS["selection"] > LAYERS["penalties"]
        assert LAYERS["penalties"] > LAYERS["_checks"]


@pytest.mark.parametrize(
    "source",
    [
        "from kerasreg.decay import WeightDecay",
        "import kerasreg.decay",
        "def f():\n    from kerasreg import decay\n",
        "from kerasreg import WeightDecay",  # the package surface is the top
        "from . import decay",
    ],
)
def test_an_upward_import_is_caught(source):
    # The checker on a made-up low module: each form of import is seen,
    # module level or inside a function.
    modules = {"penalties": source, "decay": "", "__init__": ""}
    layers = {"penalties": 1, "decay": 5, "__init__": 8}
    assert upward_imports(modules, layers, {}) != []
    assert upward_imports({"penalties": "import numpy"}, layers, {}) == []
