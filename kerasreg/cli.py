"""Command line: `kerasreg inspect` and `kerasreg shrink` (also `python -m kerasreg`).

    kerasreg inspect MODEL.keras [--where REGEX] [--per-gate] [--json]
    kerasreg shrink IN.keras OUT.keras --factor F [--where REGEX]

Errors print one line on stderr and exit with status 1 (a file that cannot be
read, loaded or written) or 2 (a bad argument); nothing is written then.
This module imports Keras only inside the commands.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import sys
import tempfile
import zipfile
from typing import Any

PROG = "kerasreg"


def _invoked_as_command() -> bool:
    """True in a `kerasreg ...` or `python -m kerasreg ...` process."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if name in (PROG, f"{PROG}.exe", f"{PROG}-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(
        (a == "-m" and argv[i + 1 : i + 2] == [PROG]) or a == f"-m{PROG}"
        for i, a in enumerate(argv)
    )


def _divert_native_stderr() -> tuple[int, Any] | None:
    """Send file descriptor 2 to a temporary file until `main` starts.

    TensorFlow's C++ start-up log (oneDNN, CUDA probing) is written before its
    log level is read, so `TF_CPP_MIN_LOG_LEVEL` alone cannot hide it.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        capture = tempfile.TemporaryFile()  # noqa: SIM115 (lives until main)
        os.dup2(capture.fileno(), 2)
    except (OSError, ValueError, AttributeError):
        return None
    atexit.register(_restore_native_stderr, replay=True)
    return saved, capture


def _restore_native_stderr(*, replay: bool = False) -> None:
    """Give file descriptor 2 back; with `replay`, show what was captured."""
    global _DIVERTED
    if _DIVERTED is None:
        return
    saved, capture = _DIVERTED
    _DIVERTED = None
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    if replay:
        # `main` never ran (the import failed): the captured text explains why.
        capture.seek(0)
        sys.stderr.write(capture.read().decode(errors="replace"))
        sys.stderr.flush()
    capture.close()


# Imported by `kerasreg/__init__.py` before Keras, so that the command line's
# output is not buried under TensorFlow's C++ start-up log; user settings win.
_DIVERTED = None
if _invoked_as_command():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _DIVERTED = _divert_native_stderr()


class CommandError(Exception):
    """A failure reported as one line on stderr; `status` is the exit code."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    from kerasreg import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Weight regularization tools for Keras 3 models.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="print per-weight norms, sparsity and penalties of a .keras model",
        description=(
            "Print l1 = sum|w|, l2 = sqrt(sum w^2), linf = max|w|, the fraction "
            "of |w| < 1e-8 and the attached regularizer's penalty ('-' when "
            "none; 0.0 in JSON) for each selected weight of a saved model."
        ),
    )
    inspect.add_argument("model", metavar="MODEL.keras", help="saved Keras model")
    _add_where(inspect)
    inspect.add_argument(
        "--per-gate",
        action="store_true",
        help="also split LSTM (i, f, c, o) and GRU (z, r, h) weights by gate",
    )
    inspect.add_argument(
        "--json",
        action="store_true",
        help="print JSON {path: {statistic: value}} instead of a table",
    )
    inspect.set_defaults(run=_inspect)

    shrink = commands.add_parser(
        "shrink",
        help="write a copy of a .keras model with selected weights scaled by F",
        description=(
            "Write OUT.keras: a copy of IN.keras in which every selected weight "
            "w becomes F * w. IN is never modified; OUT is written to a "
            "temporary file first and renamed into place."
        ),
    )
    shrink.add_argument("input", metavar="IN.keras", help="saved Keras model")
    shrink.add_argument("output", metavar="OUT.keras", help="where to write the copy")
    shrink.add_argument(
        "--factor",
        required=True,
        metavar="F",
        help="multiply the selected weights by F, a number in [0, 1]",
    )
    _add_where(shrink)
    shrink.set_defaults(run=_shrink)
    return parser


def _add_where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--where",
        metavar="REGEX",
        default=None,
        help=(
            "regular expression searched in each trainable weight's path "
            "(default: trainable weights with ndim >= 2)"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    _restore_native_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except CommandError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


# --- inspect -----------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    _check_where(args.where)
    model = _load(args.model, compile=False)
    from kerasreg.norms import weight_norms
    from kerasreg.selection import select_weights

    try:
        variables = select_weights(model, args.where, argument="--where")
        norms = weight_norms(model, variables, per_gate=args.per_gate)
    except (TypeError, ValueError) as error:
        raise CommandError(_first_line(error), status=2) from None
    if args.json:
        print(json.dumps(norms, indent=2))
    else:
        print(_table(variables, norms))
    return 0


_COLUMNS = ("l1", "l2", "linf", "zero_fraction", "penalty")


def _table(variables: list[Any], norms: dict[str, dict[str, float]]) -> str:
    rows = [("weight", "shape", *_COLUMNS)]
    total = 0.0
    for variable, (key, stats) in zip(variables, norms.items(), strict=True):
        regularized = variable.regularizer is not None
        penalty = _number(stats["penalty"]) if regularized else "-"
        total += stats["penalty"]
        shape = "x".join(str(int(d)) for d in variable.shape) or "scalar"
        rows.append((key, shape, *(_number(stats[c]) for c in _COLUMNS[:-1]), penalty))
        gates = dict.fromkeys(n.split("/gate_")[1] for n in stats if "/gate_" in n)
        for gate in gates:
            cells = (_number(stats[f"{c}/gate_{gate}"]) for c in _COLUMNS[:-1])
            rows.append((f"  gate {gate}", "", *cells, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.append(f"total penalty of these {len(variables)} weights: {_number(total)}")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.6g}"


# --- shrink ------------------------------------------------------------------


def _shrink(args: argparse.Namespace) -> int:
    factor = _parse_factor(args.factor)
    _check_where(args.where)
    source = args.input
    target = args.output
    _check_input(source)
    _check_output(source, target)
    model = _load(source, compile=True)
    from kerasreg.decay import shrink_weights
    from kerasreg.selection import select_weights

    try:
        variables = select_weights(model, args.where, argument="--where")
        norms = shrink_weights(model, factor, where=variables)
    except (TypeError, ValueError) as error:
        raise CommandError(_first_line(error), status=2) from None
    _save_atomically(model, target)
    for path, row in norms.items():
        print(f"{path}: l2 {_number(row['before'])} -> {_number(row['after'])}")
    print(f"wrote {target} ({len(norms)} weights scaled by {factor:g})")
    return 0


def _parse_factor(text: str) -> float:
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and 0.0 <= factor <= 1.0):
        raise CommandError(
            f"invalid --factor: expected a number in [0, 1]. Received: {text!r}.",
            status=2,
        )
    return factor


def _check_output(source: str, target: str) -> None:
    if not target.endswith(".keras"):
        raise CommandError(
            f"invalid OUT.keras: the output file name must end in '.keras'. "
            f"Received: {target!r}.",
            status=2,
        )
    if os.path.isdir(target):
        raise CommandError(f"cannot write {target!r}: it is a directory.")
    same = os.path.realpath(source) == os.path.realpath(target)
    if not same and os.path.exists(target):
        same = os.path.samefile(source, target)
    if same:
        raise CommandError(
            f"refusing to overwrite the input: OUT {target!r} is the same file "
            f"as IN {source!r}. Choose another output path."
        )
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {target!r}: no such directory {folder!r}.")


def _save_atomically(model: Any, target: str) -> None:
    """Save next to `target`, then rename: `target` is whole or untouched."""
    folder = os.path.dirname(os.path.abspath(target))
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=".kerasreg-", suffix=".keras", dir=folder
        )
    except OSError as error:
        raise CommandError(f"cannot write {target!r}: {error.strerror}.") from None
    os.close(handle)
    try:
        model.save(temporary)
        os.chmod(temporary, _new_file_mode(target))
        os.replace(temporary, target)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, Exception):
            raise CommandError(
                f"cannot write {target!r}: {_first_line(error)}"
            ) from None
        raise


def _new_file_mode(target: str) -> int:
    """Keep an existing output's mode, else what a plain `open` would give."""
    if os.path.exists(target):
        return os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --- shared ------------------------------------------------------------------


def _check_where(where: str | None) -> None:
    if where is None:
        return
    from kerasreg.selection import compile_pattern

    try:
        compile_pattern(where, "--where")
    except ValueError as error:
        raise CommandError(_first_line(error), status=2) from None


def _check_input(path: str) -> None:
    if not os.path.exists(path):
        raise CommandError(f"{path!r}: no such file.")
    if os.path.isdir(path):
        raise CommandError(f"{path!r} is a directory, not a .keras model file.")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise CommandError(f"cannot read {path!r}: {error.strerror}.") from None
    if not is_zip:
        raise CommandError(
            f"{path!r} is not a Keras model file: a .keras file is a zip "
            "archive, and this is not one (empty, truncated or another format)."
        )
    with zipfile.ZipFile(path) as archive:
        if "config.json" not in archive.namelist():
            raise CommandError(
                f"{path!r} is a zip archive but not a Keras model file "
                "(it has no config.json)."
            )


def _load(path: str, *, compile: bool) -> Any:
    _check_input(path)
    import keras

    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as error:
        raise CommandError(
            f"cannot load {path!r} as a Keras model: {_first_line(error)}"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
