"""Read saved Keras models as data: no model is built, no code from the file runs.

A `.keras` file is a zip archive holding `config.json` (the model's
architecture), `metadata.json` and `model.weights.h5` (the weights, one HDF5
dataset per variable at `layers/<attribute>/.../vars/<i>`). This module reads
the two JSON members with `json` and the weights with `h5py`, the way
`keras.saving.KerasFileEditor` does, but without importing Keras: no module
named in the file is imported, no layer is built, no `Lambda` is loaded. It
imports neither TensorFlow nor Keras, so `kerasreg inspect` starts instantly.

Each HDF5 dataset is given the path that `kerasreg.selection.weight_paths`
gives the same weight once the model is loaded (`kerasreg.keras_file_names`).
What the commands compute from the weights (statistics, penalty formulas,
the scaled copy) is in `kerasreg.keras_file_stats`.

Weights are read in blocks of at most `CHUNK_BYTES`, so memory stays bounded
whatever the size of the largest tensor. Hostile archives (oversized or
highly compressed members, path-traversal or duplicate member names, missing
or malformed members, datasets that disagree with the config or whose storage
is missing) raise `KerasFileError` with one line of explanation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from kerasreg.keras_file_names import (
    MAX_COMPRESSION_RATIO,
    KerasFileError,
    Weight,
    first_line,
    name_weights,
)

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

# Blocks read at once: peak memory is a few times this, whatever the tensor size.
CHUNK_BYTES = 4 << 20
# config.json / metadata.json larger than this are refused (a model's config is KBs).
MAX_JSON_BYTES = 64 << 20
MAX_MEMBERS = 100_000


@dataclass
class KerasFile:
    """An opened `.keras` (or `.weights.h5`) file: config, metadata, weights."""

    path: str
    config: dict | None
    metadata: dict | None
    h5: h5py.File
    weights: list[Weight] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_model_file(path: str) -> KerasFile:
    """Open a `.keras` archive (or an `.h5` weights file) as data.

    Raises:
        KerasFileError: the file is missing, not a Keras file, or hostile.
    """
    _check_exists(path)
    if _is_hdf5(path):
        return _open_weights_only(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise KerasFileError(f"cannot read {path!r}: {error.strerror}.") from None
    if not is_zip:
        raise KerasFileError(
            f"{path!r} is not a Keras model file: a .keras file is a zip "
            "archive, and this is not one (empty, truncated or another format)."
        )
    closers: list[Callable[[], None]] = []
    try:
        archive = zipfile.ZipFile(path)
        closers.append(archive.close)
        members = check_archive(archive, path)
        if CONFIG not in members:
            raise KerasFileError(
                f"{path!r} is a zip archive but not a Keras model file "
                "(it has no config.json)."
            )
        if WEIGHTS not in members:
            raise KerasFileError(f"{path!r} has no {WEIGHTS}: it holds no weights.")
        config = _read_json(archive, members[CONFIG], path)
        metadata = (
            _read_json(archive, members[METADATA], path)
            if METADATA in members
            else None
        )
        if not isinstance(config, dict):
            raise KerasFileError(f"{path!r}: config.json is not a JSON object.")
        h5 = _open_member_h5(path, archive, members[WEIGHTS], closers)
        file = KerasFile(path, config, metadata, h5, _closers=closers)
        file.weights = name_weights(h5, config, path)
        return file
    except KerasFileError:
        _close_all(closers)
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
        _close_all(closers)
        raise KerasFileError(f"cannot read {path!r}: {first_line(error)}") from None


def _open_h5(source: Any, failure: Callable[[str], str]) -> h5py.File:
    """`h5py.File(source, "r")`; unreadable: `KerasFileError(failure(reason))`,
    `reason` being h5py's first line."""
    try:
        return h5py.File(source, "r")
    except OSError as error:
        raise KerasFileError(failure(first_line(error))) from None


def _open_weights_only(path: str) -> KerasFile:
    h5 = _open_h5(
        path, lambda reason: f"cannot read {path!r} as HDF5 weights: {reason}"
    )
    file = KerasFile(path, None, None, h5, _closers=[h5.close])
    try:
        file.weights = name_weights(h5, None, path)
        if not file.weights:
            raise KerasFileError(
                f"{path!r} holds no Keras 3 weights (`layers/.../vars/<i>`): "
                "legacy HDF5 (.h5) models are not read, by design, and a "
                "model's .weights.h5 file or .keras archive is expected."
            )
    except BaseException:
        file.close()
        raise
    return file


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            close()


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise KerasFileError(f"{path!r}: no such file.")
    if os.path.isdir(path):
        raise KerasFileError(f"{path!r} is a directory, not a .keras model file.")


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as error:
        raise KerasFileError(f"cannot read {path!r}: {error.strerror}.") from None


def check_archive(archive: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    """Validate every member's name and size; return `{name: info}`.

    Refuses path-traversal, absolute and duplicate names, encrypted members,
    and members that inflate more than `MAX_COMPRESSION_RATIO` times.
    """
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise KerasFileError(f"{path!r} has {len(infos)} members: too many.")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise KerasFileError(
                f"{path!r} has a member with an unsafe path {name!r}: refusing it."
            )
        if name in members:
            raise KerasFileError(
                f"{path!r} has two members named {name!r}: refusing an ambiguous "
                "archive."
            )
        if info.flag_bits & 0x1:
            raise KerasFileError(f"{path!r}: member {name!r} is encrypted.")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
            1 << 20, MAX_COMPRESSION_RATIO * info.compress_size
        ):
            raise KerasFileError(
                f"{path!r}: member {name!r} would inflate from "
                f"{info.compress_size} to {info.file_size} bytes (a zip bomb?): "
                "refusing it."
            )
        members[name] = info
    return members


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        raise KerasFileError(
            f"{path!r}: {info.filename} is {info.file_size} bytes, larger than "
            f"the {MAX_JSON_BYTES} accepted."
        )
    with archive.open(info) as member:
        data = member.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise KerasFileError(f"{path!r}: {info.filename} is too large.")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise KerasFileError(
            f"{path!r}: {info.filename} is not valid JSON ({first_line(error)})."
        ) from None


class _Window:
    """A read-only, seekable view of `length` bytes at `offset` in a file.

    h5py reads a stored (uncompressed) zip member through this at the member's
    place in the archive, without copying it.
    """

    def __init__(self, path: str, offset: int, length: int):
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._offset = offset
        self._length = length
        self._position = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = 0) -> int:
        base = (0, self._position, self._length)[whence]
        self._position = max(0, base + position)
        return self._position

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._length - self._position)
        size = left if size is None or size < 0 else min(size, left)
        self._file.seek(self._offset + self._position)
        data = self._file.read(size)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local header (read, not trusted)."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise KerasFileError(f"{path!r}: the zip entry of {info.filename} is corrupt.")
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _open_member_h5(
    path: str,
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    closers: list[Callable[[], None]],
) -> h5py.File:
    if info.compress_type == zipfile.ZIP_STORED:
        offset = _member_data_offset(path, info)
        if offset + info.file_size > os.path.getsize(path):
            raise KerasFileError(f"{path!r} is truncated: {WEIGHTS} is cut short.")
        source: Any = _Window(path, offset, info.file_size)
        closers.append(source.close)
    else:
        # A compressed member is inflated, in blocks, into a temporary file.
        source = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the closers)
        closers.append(source.close)
        with archive.open(info) as member:
            shutil.copyfileobj(member, source, CHUNK_BYTES)
        source.seek(0)
    h5 = _open_h5(
        source,
        lambda reason: f"{path!r}: {WEIGHTS} is not a readable HDF5 file ({reason}).",
    )
    closers.append(h5.close)
    return h5


# --- selection -------------------------------------------------------------------


def default_rule(weight: Weight) -> bool:
    """`kerasreg.selection.default_rule`: trainable, ndim >= 2, not a bias."""
    return weight.trainable is True and len(weight.shape) >= 2 and weight.name != "bias"


def select(weights: list[Weight], where: re.Pattern | None) -> list[Weight]:
    """The weights `--where` selects: the same rule as `select_weights`.

    Only weights the file proves trainable (`trainable is True`): a weight
    whose trainability is unknown is never selected (see `undetermined`).
    """
    if where is None:
        return [w for w in weights if default_rule(w)]
    return [w for w in weights if w.trainable is True and where.search(w.path)]


def undetermined(weights: list[Weight], where: re.Pattern | None) -> list[Weight]:
    """Weights `--where` might select, were the file to tell what they are.

    Float weights whose trainability the file cannot tell (those it cannot
    name are `unknown:...`) that match `where` (by default: at least two
    dimensions, not a bias). Listed as unknown, never shrunk.
    """
    maybe = [w for w in weights if w.trainable is None and w.is_float]
    if where is None:
        return [w for w in maybe if len(w.shape) >= 2 and w.name != "bias"]
    return [w for w in maybe if where.search(w.path)]


# --- reading in blocks -------------------------------------------------------------


def blocks(
    shape: tuple[int, ...], itemsize: int, chunk_bytes: int | None = None
) -> Iterator[tuple[slice | int, ...]]:
    """Hyperslabs covering an array of `shape`, each at most `chunk_bytes`
    (default `CHUNK_BYTES`) unless a single entry is larger."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if not shape:
        yield ()
        return
    if 0 in shape:
        return
    ndim = len(shape)

    def inner(axis: int) -> int:  # bytes of one index step along `axis`
        return itemsize * int(np.prod(shape[axis + 1 :], dtype=np.int64))

    # The outermost axis whose steps fit in a chunk: slice along it.
    k = ndim - 1
    while k > 0 and inner(k - 1) <= chunk_bytes:
        k -= 1
    step = max(1, chunk_bytes // inner(k))
    for outer in np.ndindex(*shape[:k]):
        for start in range(0, shape[k], step):
            yield (*outer, slice(start, min(shape[k], start + step)))


def read_block(dataset: h5py.Dataset, dtype: str, index: tuple) -> np.ndarray:
    """One block as float32 (float64 for float64 data); bfloat16 decoded."""
    raw = np.asarray(dataset[index])
    if dtype == "bfloat16":
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if raw.dtype == np.float64:
        return raw
    return raw.astype(np.float32, copy=False)


def write_block(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` encoded back to the dataset's dtype (bfloat16: round to nearest even)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        nan = np.isnan(values)
        out = (rounded >> 16).astype(np.uint16)
        out[nan] = 0x7FC0
        return out.view(np.dtype("V2"))
    return values.astype(dtype, copy=False)


def read_encoded(values: np.ndarray, dtype: str) -> np.ndarray:
    """What `read_block` would give for `values` once written."""
    if dtype == "bfloat16":
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64 if dtype == "float64" else np.float32)
