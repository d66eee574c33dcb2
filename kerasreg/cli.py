"""Command line: `kerasreg inspect` and `kerasreg shrink` (also `python -m kerasreg`).

    kerasreg inspect MODEL.keras [--where REGEX] [--per-gate] [--json]
    kerasreg shrink IN.keras OUT.keras --factor F [--where REGEX]

Errors print one line on stderr and exit with status 1 (a file that cannot be
read or written, or a hostile one) or 2 (a bad argument); nothing is written
then. The commands read model files as data (`kerasreg.keras_file`): no model
is deserialized, no code from the file runs, and neither TensorFlow nor Keras
is imported, so the command starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
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
    where = _check_where(args.where)
    with _open(args.model) as file:
        selected, undetermined = _select(file, where, args.where)
        shown = [w for w in file.weights if _among(w, selected + undetermined)]
        rows = {w.path: _measure(file, w, per_gate=args.per_gate) for w in shown}
        total = _total_penalty(file, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(shown, rows))
    print(_footer(file, total, len(selected), len(undetermined)))
    return 0


def _among(weight: Any, weights: list[Any]) -> bool:
    return any(weight is w for w in weights)


def _total_penalty(file: Any, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What Keras adds to the loss: every trainable regularized weight.

    `value` is the sum, or None when the file cannot tell a part of it: a
    regularizer the CLI does not compute, a LoRA adapter (not in the file), or
    weights whose trainability and penalty are unknown.
    """
    from kerasreg import keras_file_stats

    regularized = [
        w for w in file.weights if w.trainable is True and w.regularizer is not None
    ]
    penalties = []
    not_computed = set()
    for w in regularized:
        row = rows.get(w.path) or _measure(file, w, per_gate=False)
        if row["penalty"] is None:
            formula = keras_file_stats.penalty_formula(w.regularizer)
            label = str(getattr(formula, "label", "unknown"))
            if w.dataset is None:
                label = f"{label} on LoRA adapters, not in the file"
            elif w.reference_problem:
                label = f"{label} ({w.reference_problem})"
            not_computed.add(label)
        else:
            penalties.append(row["penalty"])
    # A weight of unknown trainability may carry a penalty Keras adds.
    unknown = [
        w
        for w in file.weights
        if w.trainable is None
        and w.is_float
        and (not w.known or w.regularizer is not None)
    ]
    known = math.fsum(penalties)
    value = known if not not_computed and not unknown else None
    return {
        "value": value,
        "known": known,
        "count": len(regularized),
        "computed": len(penalties),
        "not_computed": sorted(not_computed),
        "unknown_weights": len(unknown),
    }


def _footer(file: Any, total: dict[str, Any], selected: int, undetermined: int) -> str:
    count = total["count"]
    value = "unknown" if total["value"] is None else _number(total["value"])
    footer = (
        f"total penalty (what Keras adds to the loss, {count} regularized "
        f"weight{'s' * (count != 1)}): {value}; {selected} "
        f"weight{'s' * (selected != 1)} shown"
    )
    if undetermined:
        footer += f" and {undetermined} unknown"
    if total["value"] is None:
        parts = []
        if total["computed"]:
            parts.append(
                f"{_number(total['known'])} from the {total['computed']} it computes"
            )
        if total["not_computed"]:
            parts.append(f"not computed: {', '.join(total['not_computed'])}")
        if total["unknown_weights"]:
            n = total["unknown_weights"]
            parts.append(
                f"{n} weight{'s' * (n != 1)} whose trainability (or penalty) "
                "the file cannot tell"
            )
        footer += "; total unknown: " + "; ".join(parts)
    if file.config is None:
        footer += (
            "; a weights-only file: layers are named from the names Keras "
            "stores, variables numbered, their trainability and penalties unknown"
        )
    return footer


_COLUMNS = ("l1", "l2", "linf", "zero_fraction", "penalty")


def _table(weights: list[Any], rows: dict[str, dict[str, Any]]) -> str:
    table: list[tuple[str, ...]] = [("weight", "shape", *_COLUMNS)]
    for weight in weights:
        stats = rows[weight.path]
        if weight.known and weight.regularizer is None:
            penalty = "-"
        elif stats["penalty"] is None:
            penalty = "unknown"
        else:
            penalty = _number(stats["penalty"])
        shape = "x".join(str(d) for d in weight.shape) or "scalar"
        cells = (_number(stats[c]) for c in _COLUMNS[:-1])
        table.append((weight.path, shape, *cells, penalty))
        for gate in weight.gates:
            if f"l1/gate_{gate}" in stats:
                cells = (_number(stats[f"{c}/gate_{gate}"]) for c in _COLUMNS[:-1])
                table.append((f"  gate {gate}", "", *cells, ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    )


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6g}"


# --- shrink ------------------------------------------------------------------


def _shrink(args: argparse.Namespace) -> int:
    factor = _parse_factor(args.factor)
    where = _check_where(args.where)
    source = args.input
    target = args.output
    _check_output(source, target)
    with _open(source) as file:
        if file.config is None:
            raise CommandError(
                f"{source!r} is a weights-only HDF5 file: shrink needs a .keras "
                "model archive."
            )
        selected, undetermined = _select(file, where, args.where)
        # Only what the file proves a trainable float weight is scaled.
        scaled = [w for w in selected if w.dataset is not None and w.is_float]
        if not scaled:
            raise CommandError(
                f"`--where`={args.where!r} selects no weight of {source!r} that "
                "the file shows to be a trainable float weight"
                + _never_shrunk(selected, undetermined),
                status=2,
            )
        norms = _write_shrunk(file, scaled, factor, target)
    for weight in scaled:
        before, after = norms[weight.dataset]
        print(f"{weight.path}: l2 {_number(before)} -> {_number(after)}")
    left = [w for w in selected if not _among(w, scaled)]
    if left or undetermined:
        print("not scaled" + _never_shrunk(left, undetermined))
    print(f"wrote {target} ({len(scaled)} weights scaled by {factor:g})")
    return 0


def _never_shrunk(left: list[Any], undetermined: list[Any]) -> str:
    parts = []
    if left:
        names = ", ".join(w.path for w in left[:6])
        parts.append(f"{names} (not in the file: Keras creates them anew on load)")
    if undetermined:
        names = ", ".join(w.path for w in undetermined[:6])
        more = ", ..." if len(undetermined) > 6 else ""
        parts.append(f"{names}{more} (the file cannot tell whether Keras trains them)")
    return (": " + "; ".join(parts) + ".") if parts else "."


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
    if not same and os.path.exists(target) and os.path.exists(source):
        same = os.path.samefile(source, target)
    if same:
        raise CommandError(
            f"refusing to overwrite the input: OUT {target!r} is the same file "
            f"as IN {source!r}. Choose another output path."
        )
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {target!r}: no such directory {folder!r}.")


def _write_shrunk(
    file: Any, selected: list[Any], factor: float, target: str
) -> dict[str, tuple[float, float]]:
    """Copy the archive member by member, the weights scaled; then rename.

    Every member but `model.weights.h5` is copied byte for byte; `target` is
    either the whole new file or untouched.
    """
    import tempfile
    import zipfile

    from kerasreg import keras_file, keras_file_stats

    folder = os.path.dirname(os.path.abspath(target))
    temporaries: list[str] = []
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=".kerasreg-", suffix=".keras", dir=folder
        )
        os.close(handle)
        temporaries.append(temporary)
        handle, weights = tempfile.mkstemp(
            prefix=".kerasreg-", suffix=".h5", dir=folder
        )
        os.close(handle)
        temporaries.append(weights)
    except OSError as error:
        _remove(temporaries)
        raise CommandError(f"cannot write {target!r}: {error.strerror}.") from None
    try:
        names = {w.dataset for w in selected}
        norms = keras_file_stats.scaled_weights_copy(file, names, factor, weights)
        with (
            zipfile.ZipFile(file.path) as source,
            zipfile.ZipFile(temporary, "w", allowZip64=True) as output,
        ):
            for info in source.infolist():
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.compress_type = info.compress_type
                copy.external_attr = info.external_attr
                copy.comment = info.comment
                if info.filename == keras_file.WEIGHTS:
                    copy.file_size = os.path.getsize(weights)
                    reader: Any = open(weights, "rb")  # noqa: SIM115
                else:
                    copy.file_size = info.file_size
                    reader = source.open(info)
                with reader, output.open(copy, "w") as writer:
                    shutil.copyfileobj(reader, writer, keras_file.CHUNK_BYTES)
        os.chmod(temporary, _new_file_mode(target))
        os.replace(temporary, target)
    except BaseException as error:
        _remove(temporaries)
        if isinstance(error, keras_file.KerasFileError):
            raise CommandError(str(error)) from None
        if isinstance(error, Exception):
            raise CommandError(
                f"cannot write {target!r}: {_first_line(error)}"
            ) from None
        raise
    _remove(temporaries)
    return norms


def _remove(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _new_file_mode(target: str) -> int:
    """Keep an existing output's mode, else what a plain `open` would give."""
    if os.path.exists(target):
        return os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --- shared ------------------------------------------------------------------


def _check_where(where: str | None) -> re.Pattern | None:
    """Compile `--where` (the same rule and message as `kerasreg.selection`)."""
    if where is None:
        return None
    try:
        return re.compile(where)
    except re.error as error:
        raise CommandError(
            f"Invalid `--where`: {where!r} is not a valid regular expression "
            f"({error}).",
            status=2,
        ) from None


def _open(path: str) -> Any:
    from kerasreg import keras_file

    try:
        return keras_file.open_model_file(path)
    except keras_file.KerasFileError as error:
        raise CommandError(str(error)) from None


def _select(
    file: Any, where: re.Pattern | None, text: str | None
) -> tuple[list[Any], list[Any]]:
    """`(selected, undetermined)`: the weights `--where` selects, and those it
    might select were the file to tell what they are (listed as unknown)."""
    from kerasreg import keras_file

    selected = keras_file.select(file.weights, where)
    undetermined = keras_file.undetermined(file.weights, where)
    if not selected and not undetermined:
        trainable = [w.path for w in file.weights if w.trainable is True]
        unknown = [w.path for w in file.weights if w.trainable is None]
        message = (
            f"`--where`={text!r} selects no weight of {file.path!r}. Its "
            f"trainable weights are: {_listed(trainable)}"
        )
        if unknown:
            message += f"; weights of unknown trainability: {_listed(unknown)}"
        raise CommandError(message + ".", status=2)
    return selected, undetermined


def _listed(paths: list[str]) -> str:
    """The first 12 paths, comma-separated, or "none"."""
    more = ", ..." if len(paths) > 12 else ""
    return (", ".join(paths[:12]) or "none") + more


def _measure(file: Any, weight: Any, *, per_gate: bool) -> dict[str, Any]:
    from kerasreg import keras_file, keras_file_stats

    try:
        return keras_file_stats.measure(file, weight, per_gate=per_gate)
    except keras_file.KerasFileError as error:
        raise CommandError(str(error)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
