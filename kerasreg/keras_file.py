"""Read saved Keras models as data: no model is built, no code from the file runs.

A `.keras` file is a zip archive holding `config.json` (the model's
architecture), `metadata.json` and `model.weights.h5` (the weights, one HDF5
dataset per variable at `layers/<attribute>/.../vars/<i>`). This module reads
the two JSON members with `json` and the weights with `h5py`, the way
`keras.saving.KerasFileEditor` does, but without importing Keras: no module
named in the file is imported, no layer is built, no `Lambda` is loaded. It
imports neither TensorFlow nor Keras, so `kerasreg inspect` starts instantly.

Each HDF5 dataset is given the path that `kerasreg.selection.weight_paths`
gives the same weight once the model is loaded (layer-name chain below the
model, then the variable name: `"bidirectional/forward_lstm/lstm_cell/kernel"`),
using what the config says about known Keras layers. A weight of a layer this
module does not know is still reported, as `<layer path>/var_<i>`.

Weights are read in blocks of at most `CHUNK_BYTES`, so memory stays bounded
whatever the size of the largest tensor. Hostile archives (oversized or
highly compressed members, path-traversal or duplicate member names, missing
or malformed members, datasets that disagree with the config or whose storage
is missing) raise `KerasFileError` with one line of explanation.
"""

from __future__ import annotations

import contextlib
import json
import math
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

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

# Blocks read at once: peak memory is a few times this, whatever the tensor size.
CHUNK_BYTES = 4 << 20
# config.json / metadata.json larger than this are refused (a model's config is KBs).
MAX_JSON_BYTES = 64 << 20
# A member that inflates more than this many times is treated as a zip bomb.
MAX_COMPRESSION_RATIO = 200
MAX_MEMBERS = 100_000
# Nesting deeper than this (layers in layers, HDF5 groups) is refused.
MAX_DEPTH = 64
ZERO_THRESHOLD = 1e-8


class KerasFileError(Exception):
    """The file cannot be read as a Keras model: the message is one line."""


# --- the archive ----------------------------------------------------------------


@dataclass
class Weight:
    """One variable in the weights file, named as `weight_paths` names it."""

    path: str
    dataset: str  # the HDF5 dataset's path
    shape: tuple[int, ...]
    dtype: str
    trainable: bool = True
    regularizer: Any = None  # its serialized config, or None
    gates: tuple[str, ...] = ()
    layer_class: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


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
        raise KerasFileError(f"cannot read {path!r}: {_first_line(error)}") from None


def _open_weights_only(path: str) -> KerasFile:
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise KerasFileError(
            f"cannot read {path!r} as HDF5 weights: {_first_line(error)}"
        ) from None
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
            f"{path!r}: {info.filename} is not valid JSON ({_first_line(error)})."
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
    try:
        h5 = h5py.File(source, "r")
    except OSError as error:
        raise KerasFileError(
            f"{path!r}: {WEIGHTS} is not a readable HDF5 file ({_first_line(error)})."
        ) from None
    closers.append(h5.close)
    return h5


# --- naming the weights --------------------------------------------------------

# Variable names of the layers Keras saves, in the order `save_own_variables`
# writes them (trainable ones first). `None` entries depend on the config.
_KERNEL_BIAS = {
    "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
}  # fmt: skip
_CELLS = {"LSTMCell", "GRUCell", "SimpleRNNCell", "ConvLSTMCell"}
_RNN_CELL = {
    "LSTM": ("LSTMCell", "lstm_cell"),
    "GRU": ("GRUCell", "gru_cell"),
    "SimpleRNN": ("SimpleRNNCell", "simple_rnn_cell"),
    "ConvLSTM1D": ("ConvLSTMCell", "conv_lstm_cell"),
    "ConvLSTM2D": ("ConvLSTMCell", "conv_lstm_cell"),
    "ConvLSTM3D": ("ConvLSTMCell", "conv_lstm_cell"),
}
GATES = {"LSTMCell": "ifco", "GRUCell": "zrh", "ConvLSTMCell": "ifco"}
_NON_TRAINABLE = {"moving_mean", "moving_variance"}
# Attention layers: (h5 attributes, layer name) of their EinsumDense sublayers.
_ATTENTION = {
    "MultiHeadAttention": ("query", "key", "value", "output"),
    "GroupedQueryAttention": ("query", "key", "gate", "value", "output"),
    "GroupQueryAttention": ("query", "key", "gate", "value", "output"),
}


def _variable_names(cls: str | None, cfg: dict, count: int) -> list[str] | None:
    """Names of a known layer's own variables, or None (unknown or mismatch)."""
    use_bias = cfg.get("use_bias", True) is not False
    bias = ["bias"] if use_bias else []
    if cls in _KERNEL_BIAS:
        names = ["kernel", *bias]
    elif cls == "EinsumDense":
        names = ["kernel", *(["bias"] if cfg.get("bias_axes") else [])]
    elif cls in ("SeparableConv1D", "SeparableConv2D"):
        names = ["depthwise_kernel", "pointwise_kernel", *bias]
    elif cls == "Embedding":
        names = ["embeddings"]
    elif cls in _CELLS:
        names = ["kernel", "recurrent_kernel", *bias]
    elif cls == "BatchNormalization":
        names = [
            *(["gamma"] if cfg.get("scale", True) is not False else []),
            *(["beta"] if cfg.get("center", True) is not False else []),
            "moving_mean",
            "moving_variance",
        ]
    elif cls in ("LayerNormalization", "GroupNormalization"):
        names = [
            *(["gamma"] if cfg.get("scale", True) is not False else []),
            *(["beta"] if cfg.get("center", True) is not False else []),
        ]
    elif cls == "PReLU":
        names = ["alpha"]
    else:
        return None
    return names if len(names) == count else None


def _regularizer_key(cls: str | None, name: str) -> str:
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D") and name == "kernel":
        return "depthwise_regularizer"
    if name == "recurrent_kernel":
        return "recurrent_regularizer"
    if name in ("depthwise_kernel", "pointwise_kernel"):
        return name.replace("_kernel", "_regularizer")
    return f"{name}_regularizer"


def _expected_shape_problem(cls: str | None, cfg: dict, name: str, shape: tuple):
    """Why `shape` cannot be variable `name` of this layer's config, or None."""
    units = cfg.get("units")
    gates = len(GATES.get(cls or "", "")) or 1
    if cls == "Dense" and isinstance(units, int):
        want = {"kernel": (None, units), "bias": (units,)}.get(name)
        if want and (len(shape) != len(want) or shape[-1] != units):
            return f"Dense units={units} needs {name} of shape {_shape(want)}"
    if cls == "Embedding" and name == "embeddings":
        want = (cfg.get("input_dim"), cfg.get("output_dim"))
        if all(isinstance(d, int) for d in want) and tuple(shape) != want:
            return f"Embedding needs embeddings of shape {_shape(want)}"
    if cls in ("LSTMCell", "GRUCell", "SimpleRNNCell") and isinstance(units, int):
        width = gates * units
        want = {"kernel": (None, width), "recurrent_kernel": (units, width)}.get(name)
        if want and (len(shape) != 2 or shape[-1] != width or (
            want[0] is not None and shape[0] != want[0]
        )):  # fmt: skip
            return f"{cls} units={units} needs {name} of shape {_shape(want)}"
    if cls == "ConvLSTMCell" and name in ("kernel", "recurrent_kernel"):
        filters = cfg.get("filters")
        if isinstance(filters, int) and (not shape or shape[-1] != 4 * filters):
            return (
                f"ConvLSTM filters={filters} needs {name} with last axis {4 * filters}"
            )
    if (
        cls in _KERNEL_BIAS
        and cls.startswith("Conv")
        and "Transpose" not in cls
        and (name == "kernel")
    ):
        filters = cfg.get("filters")
        if isinstance(filters, int) and (not shape or shape[-1] != filters):
            return f"{cls} filters={filters} needs a kernel with last axis {filters}"
    return None


def _shape(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _snake_case(name: str) -> str:
    """Keras's `naming.to_snake_case`: how it names a layer in a container."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layer(item: Any) -> tuple[str | None, dict]:
    if isinstance(item, dict):
        config = item.get("config")
        cls = item.get("class_name")
        return (cls if isinstance(cls, str) else None), (
            config if isinstance(config, dict) else {}
        )
    return None, {}


def _children(cls: str | None, cfg: dict) -> list[tuple[tuple[str, ...], str, Any]]:
    """`(h5 attribute candidates, layer name, layer config)` of known sublayers."""
    if cls in _RNN_CELL:
        cell_cls, cell_name = _RNN_CELL[cls]
        return [(("cell",), cell_name, {"class_name": cell_cls, "config": cfg})]
    if cls == "RNN":
        _, cell_cfg = _layer(cfg.get("cell"))
        return [(("cell",), str(cell_cfg.get("name", "cell")), cfg.get("cell"))]
    if cls == "Bidirectional":
        forward = cfg.get("layer")
        _, forward_cfg = _layer(forward)
        base = str(forward_cfg.get("name", ""))
        backward = cfg.get("backward_layer")
        _, backward_cfg = _layer(backward)
        backward_name = backward_cfg.get("name") if backward is not None else None
        if not isinstance(backward_name, str):
            backward = forward
            backward_name = "backward_" + base.removeprefix("backward_")
        return [
            (("forward_layer",), "forward_" + base.removeprefix("forward_"), forward),
            (("backward_layer",), backward_name, backward),
        ]
    if cls == "TimeDistributed":
        _, inner = _layer(cfg.get("layer"))
        return [(("layer",), str(inner.get("name", "layer")), cfg.get("layer"))]
    if cls in _ATTENTION:
        use_bias = cfg.get("use_bias", True) is not False
        sub = {
            "bias_axes": "b" if use_bias else None,
            "kernel_regularizer": cfg.get("kernel_regularizer"),
            "bias_regularizer": cfg.get("bias_regularizer"),
        }
        names = {"output": "attention_output"}
        return [
            (
                (f"{part}_dense", f"_{part}_dense"),
                names.get(part, part),
                {"class_name": "EinsumDense", "config": sub},
            )
            for part in _ATTENTION[cls]
        ]
    return []


def name_weights(h5: h5py.File, config: dict | None, path: str) -> list[Weight]:
    """Every dataset of the model's weights, named, in the model's weight order.

    With `config=None` (a `.weights.h5` file) the names come from the file
    alone: the layer names Keras stores with each group, then `var_<i>`.
    """
    weights: list[Weight] = []
    top_cls, top_cfg = _layer(config) if config is not None else (None, {})
    _walk(h5, top_cls, top_cfg, "", True, weights, path, 0, top=True)
    seen: set[str] = set()
    for weight in weights:
        n = 1
        base = weight.path
        while weight.path in seen:  # as weight_paths does for duplicates
            n += 1
            weight.path = f"{base}#{n}"
        seen.add(weight.path)
    return weights


def _walk(
    group: h5py.Group,
    cls: str | None,
    cfg: dict,
    prefix: str,
    trainable: bool,
    out: list[Weight],
    path: str,
    depth: int,
    *,
    top: bool = False,
) -> None:
    if depth > MAX_DEPTH:
        raise KerasFileError(f"{path!r}: layers nested more than {MAX_DEPTH} deep.")
    trainable = trainable and cfg.get("trainable", True) is not False
    if "vars" in group:
        variables = _group(group, "vars", path)
        keys = list(variables.keys())
        if sorted(keys, key=_index) != [str(i) for i in range(len(keys))]:
            raise KerasFileError(
                f"{path!r}: malformed weights group {variables.name!r} "
                f"(members {sorted(keys)[:5]} are not 0..n-1)."
            )
        names = _variable_names(cls, cfg, len(keys))
        for i in range(len(keys)):
            dataset = variables.get(str(i))
            if not isinstance(dataset, h5py.Dataset):
                raise KerasFileError(
                    f"{path!r}: {variables.name}/{i} is not an HDF5 dataset."
                )
            out.append(_weight(dataset, cls, cfg, names, i, prefix, trainable, path))
    consumed = {"vars"}
    for keys, name, child in _children(cls, cfg):
        key = next((k for k in keys if k in group), None)
        if key is None:
            continue
        consumed.add(key)
        child_cls, child_cfg = _layer(child)
        sub = _group(group, key, path)
        _walk(sub, child_cls, child_cfg, f"{prefix}{name}/", trainable, out, path,
              depth + 1)  # fmt: skip
    for container in ("layers", "cells"):
        items = cfg.get(container)
        if not isinstance(items, list) or container not in group:
            continue
        consumed.add(container)
        holder = _group(group, container, path)
        # Keras names a container's entries by class (`dense`, `dense_1`, ...)
        # and, since 3.x, stores each layer's name with it: match by that name
        # where present, else by Keras's class-based naming.
        by_name = {_stored_name(holder[k]): k for k in holder}
        by_name.pop(None, None)
        used: dict[str, int] = {}
        taken: set[str] = set()
        for item in items:
            child_cls, child_cfg = _layer(item)
            name = str(child_cfg.get("name", ""))
            key = _unique(_snake_case(child_cls or ""), used)
            key = by_name.get(name, key)
            if key in holder and key not in taken:
                taken.add(key)
                _walk(_group(holder, key, path), child_cls, child_cfg,
                      f"{prefix}{name or key}/", trainable, out, path, depth + 1)  # fmt: skip
        for key in holder:
            if key not in taken:
                _walk_unknown(_group(holder, key, path), key, prefix, trainable, out,
                              path, depth + 1)  # fmt: skip
    # Anything the config did not explain is still reported, never skipped.
    # At the top, "optimizer" holds optimizer state, not model weights.
    for key in group:
        if key in consumed or (top and key == "optimizer"):
            continue
        item = group[key]
        if isinstance(item, h5py.Group):
            _walk_unknown(item, key, prefix, trainable, out, path, depth + 1)


def _unique(name: str, used: dict[str, int]) -> str:
    """Keras's `_get_unique_name`: `dense`, `dense_1`, `dense_2`, ..."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def _walk_unknown(
    group: h5py.Group,
    key: str,
    prefix: str,
    trainable: bool,
    out: list[Weight],
    path: str,
    depth: int,
) -> None:
    """A group the config does not describe: named by Keras's stored layer name."""
    if depth > MAX_DEPTH:
        raise KerasFileError(f"{path!r}: layers nested more than {MAX_DEPTH} deep.")
    name = _stored_name(group) or key
    if "vars" not in group and key in ("layers", "cells"):
        # A container of layers (a weights-only file has no config to say so).
        for child in group:
            item = group.get(child)
            if isinstance(item, h5py.Group):
                _walk_unknown(item, child, prefix, trainable, out, path, depth + 1)
        return
    _walk(group, None, {}, f"{prefix}{name}/", trainable, out, path, depth)


def _stored_name(group: Any) -> str | None:
    """The layer name Keras stores with a layer's `vars` group, if any."""
    variables = group.get("vars") if isinstance(group, h5py.Group) else None
    if not isinstance(variables, h5py.Group):
        return None
    stored = variables.attrs.get("name")
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8", "replace")
    return stored if isinstance(stored, str) and stored else None


def _group(parent: h5py.Group, key: str, path: str) -> h5py.Group:
    item = parent.get(key)
    if not isinstance(item, h5py.Group):
        raise KerasFileError(f"{path!r}: {parent.name}/{key} is not an HDF5 group.")
    return item


def _index(key: str) -> int:
    return int(key) if key.isdigit() else -1


def _weight(
    dataset: h5py.Dataset,
    cls: str | None,
    cfg: dict,
    names: list[str] | None,
    i: int,
    prefix: str,
    trainable: bool,
    path: str,
) -> Weight:
    shape = tuple(int(d) for d in dataset.shape or ())
    dtype = dataset_dtype(dataset, path)
    check_storage(dataset, path)
    if names is None:
        return Weight(f"{prefix}var_{i}", dataset.name, shape, dtype, trainable,
                      layer_class=cls)  # fmt: skip
    name = names[i]
    problem = _expected_shape_problem(cls, cfg, name, shape)
    if problem:
        raise KerasFileError(
            f"{path!r}: weight {prefix}{name} has shape {_shape(shape)} but the "
            f"config disagrees ({problem})."
        )
    gates: tuple[str, ...] = ()
    if cls in GATES and name in ("kernel", "recurrent_kernel", "bias") and shape:
        units = cfg.get("filters") if cls == "ConvLSTMCell" else cfg.get("units")
        if isinstance(units, int) and shape[-1] == len(GATES[cls]) * units:
            gates = tuple(GATES[cls])
    regularizer = cfg.get(_regularizer_key(cls, name))
    return Weight(
        f"{prefix}{name}",
        dataset.name,
        shape,
        dtype,
        trainable and name not in _NON_TRAINABLE,
        regularizer,
        gates,
        cls,
    )


def dataset_dtype(dataset: h5py.Dataset, path: str) -> str:
    """`float16`/`bfloat16`/`float32`/`float64`/integer names; else an error."""
    if dataset.attrs.get("dtype") in ("bfloat16", b"bfloat16"):
        if dataset.dtype.itemsize != 2:
            raise KerasFileError(f"{path!r}: {dataset.name} is not bfloat16 data.")
        return "bfloat16"
    kind = dataset.dtype.kind
    if kind not in "fiub" or dataset.dtype.itemsize > 8:
        raise KerasFileError(
            f"{path!r}: {dataset.name} holds {dataset.dtype} data, not numbers."
        )
    return str(dataset.dtype)


def check_storage(dataset: h5py.Dataset, path: str) -> None:
    """Refuse a dataset whose declared size its stored bytes cannot hold."""
    nbytes = (
        int(np.prod(dataset.shape or (), dtype=np.float64)) * dataset.dtype.itemsize
    )
    if nbytes == 0:
        return
    stored = dataset.id.get_storage_size()
    filtered = dataset.compression is not None or bool(dataset.chunks and (
        dataset.shuffle or dataset.fletcher32 or dataset.scaleoffset
    ))  # fmt: skip
    limit = stored * (MAX_COMPRESSION_RATIO if filtered else 1)
    if nbytes > limit:
        raise KerasFileError(
            f"{path!r}: weight dataset {dataset.name} declares {nbytes} bytes but "
            f"the file stores {stored}: truncated or crafted."
        )


# --- selection -------------------------------------------------------------------


def default_rule(weight: Weight) -> bool:
    """`kerasreg.selection.default_rule`: trainable, ndim >= 2, not a bias."""
    return weight.trainable and len(weight.shape) >= 2 and weight.name != "bias"


def select(weights: list[Weight], where: re.Pattern | None) -> list[Weight]:
    """The weights `--where` selects: the same rule as `select_weights`."""
    if where is None:
        return [w for w in weights if default_rule(w)]
    return [w for w in weights if w.trainable and where.search(w.path)]


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


# --- statistics and penalties ---------------------------------------------------------


@dataclass
class _Sums:
    l1: float = 0.0
    maximum: float = 0.0
    scaled: float = 0.0  # sum((w / maximum)**2): l2 without overflow
    zeros: int = 0
    size: int = 0
    exp_abs: float = 0.0

    def add(self, a: np.ndarray, *, exp_abs: bool = False) -> None:
        if a.size == 0:
            return
        self.size += a.size
        self.l1 += float(np.sum(a, dtype=np.float64))
        self.zeros += int(np.count_nonzero(a < ZERO_THRESHOLD))
        if exp_abs:
            self.exp_abs += _exp_abs_sum(a)
        m = float(np.max(a))
        if math.isnan(m) or math.isnan(self.maximum):
            self.maximum = math.nan
            return
        if m == 0.0:
            return
        if math.isinf(m):
            self.maximum = math.inf
            return
        s = float(np.sum(np.square(a / np.asarray(m, a.dtype)), dtype=np.float64))
        if m > self.maximum:
            self.scaled = self.scaled * (self.maximum / m) ** 2 + s
            self.maximum = m
        else:
            self.scaled += s * (m / self.maximum) ** 2

    @property
    def l2(self) -> float:
        if not math.isfinite(self.maximum):
            return self.maximum
        return self.maximum * math.sqrt(self.scaled)

    @property
    def sum_squares(self) -> float:
        if not math.isfinite(self.maximum):
            return self.maximum
        return self.maximum**2 * self.scaled

    def stats(self) -> dict[str, float]:
        return {
            "l1": self.l1,
            "l2": self.l2,
            "linf": self.maximum if self.size else 0.0,
            "zero_fraction": self.zeros / self.size if self.size else 0.0,
        }


# `ExpAbsPenalty`: exact below this |w|, then its quadratic continuation.
EXP_ABS_EXACT_LIMIT = 20.0


def _exp_abs_sum(a: np.ndarray) -> float:
    c = EXP_ABS_EXACT_LIMIT
    total = float(np.sum(np.expm1(np.minimum(a, c)), dtype=np.float64))
    beyond = a[a > c].astype(np.float64)
    if beyond.size:
        d = beyond - c
        total += float(np.sum(math.exp(c) * (d + 0.5 * d * d)))
    return total


@dataclass(frozen=True)
class Formula:
    """A penalty as a sum of `factor * term`; terms: `l1`, `sum_squares`, `exp_abs`."""

    label: str
    terms: tuple[tuple[str, float], ...]

    def value(self, sums: _Sums) -> float:
        totals = {"l1": sums.l1, "sum_squares": sums.sum_squares,
                  "exp_abs": sums.exp_abs}  # fmt: skip
        return float(sum(factor * totals[term] for term, factor in self.terms))


@dataclass(frozen=True)
class Unknown:
    """A regularizer this module does not compute (it is never executed)."""

    label: str


def _factor(config: dict, name: str, default: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(name)
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(name)
    return value


# Penalties computed from their config, keyed by Keras's registered name (or
# `keras.regularizers>Name` for built-ins). Extension point: a penalty whose
# value needs more than these sums (e.g. an L2-SP reference stored in the
# weights file) adds an entry here and a term to `_Sums`.
FORMULAS: dict[str, Callable[[dict], tuple[tuple[str, float], ...]]] = {
    "kerasreg>L1Penalty": lambda c: (("l1", _factor(c, "l1", 0.01)),),
    "kerasreg>L2Penalty": lambda c: (("sum_squares", _factor(c, "l2", 0.01)),),
    "kerasreg>ElasticNetPenalty": lambda c: (
        ("l1", _factor(c, "l1", 0.01)),
        ("sum_squares", _factor(c, "l2", 0.01)),
    ),
    "kerasreg>ExpAbsPenalty": lambda c: (("exp_abs", _factor(c, "factor", 0.01)),),
    "keras.regularizers>L1": lambda c: (("l1", _factor(c, "l1", 0.01)),),
    "keras.regularizers>L2": lambda c: (("sum_squares", _factor(c, "l2", 0.01)),),
    "keras.regularizers>L1L2": lambda c: (
        ("l1", _factor(c, "l1", 0.0)),
        ("sum_squares", _factor(c, "l2", 0.0)),
    ),
}


def penalty_formula(regularizer: Any) -> Formula | Unknown | None:
    """How to compute a serialized regularizer, `Unknown`, or None (none set)."""
    if regularizer is None:
        return None
    if not isinstance(regularizer, dict):
        return Unknown(_label(regularizer))
    cls = regularizer.get("class_name")
    registered = regularizer.get("registered_name")
    module = regularizer.get("module")
    if isinstance(registered, str) and registered.startswith("kerasreg>"):
        key = registered
    elif registered is None and module == "keras.regularizers":
        key = f"keras.regularizers>{cls}"
    else:
        key = None
    label = str(registered or cls)
    config = regularizer.get("config")
    if key not in FORMULAS or not isinstance(config, dict):
        return Unknown(label)
    try:
        return Formula(label, FORMULAS[key](config))
    except ValueError:
        return Unknown(f"{label} (invalid config)")


def _label(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def measure(
    file: KerasFile, weight: Weight, *, per_gate: bool = False
) -> dict[str, Any]:
    """Norms, sparsity and penalty of one weight, read in blocks.

    Returns `{"l1", "l2", "linf", "zero_fraction", "penalty", "trainable"}`
    (penalty `0.0` without a regularizer, `None` when it is unknown;
    `trainable` as `kerasreg.weight_norms` reports it), plus `<stat>/gate_<g>`
    entries for gated recurrent weights when `per_gate`.
    """
    dataset = file.h5[weight.dataset]
    formula = penalty_formula(weight.regularizer)
    exp_abs = isinstance(formula, Formula) and any(
        t == "exp_abs" for t, _ in formula.terms
    )
    whole = _Sums()
    gates = weight.gates if per_gate else ()
    gate_sums = [_Sums() for _ in gates]
    width = weight.shape[-1] // len(gates) if gates else 0
    try:
        for index in blocks(weight.shape, dataset.dtype.itemsize):
            values = read_block(dataset, weight.dtype, index)
            a = np.abs(values)
            whole.add(a, exp_abs=exp_abs)
            if gates:
                first = _last_axis_start(index, weight.shape)
                for g, sums in enumerate(gate_sums):
                    lo = max(0, g * width - first)
                    hi = min(a.shape[-1], (g + 1) * width - first)
                    if hi > lo:
                        sums.add(a[..., lo:hi])
    except OSError as error:
        raise KerasFileError(
            f"{file.path!r}: cannot read weight {weight.path}: {_first_line(error)}"
        ) from None
    row: dict[str, Any] = whole.stats()
    if formula is None:
        row["penalty"] = 0.0
    elif isinstance(formula, Unknown):
        row["penalty"] = None
    else:
        row["penalty"] = formula.value(whole)
    row["trainable"] = bool(weight.trainable)
    for gate, sums in zip(gates, gate_sums, strict=True):
        for stat, value in sums.stats().items():
            row[f"{stat}/gate_{gate}"] = value
    return row


def _last_axis_start(index: tuple, shape: tuple[int, ...]) -> int:
    """First last-axis column a block covers (0 unless the block splits it)."""
    if len(index) == len(shape) and isinstance(index[-1], slice):
        return index[-1].start or 0
    return 0


# --- rewriting the weights ------------------------------------------------------------


def scaled_weights_copy(
    file: KerasFile, selected: set[str], factor: float, target: Any
) -> dict[str, tuple[float, float]]:
    """Write to `target` (path or file object) a copy of the weights file in
    which the datasets named in `selected` are multiplied by `factor`.

    Groups, attributes and every other dataset are copied as they are, block
    by block. Returns `{dataset: (l2 before, l2 after)}` of the scaled ones.
    """
    norms: dict[str, tuple[float, float]] = {}
    with h5py.File(target, "w") as out:
        _copy_attrs(file.h5, out)
        _copy_group(file, file.h5, out, selected, factor, norms, 0)
    return norms


def _copy_attrs(source: Any, target: Any) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value


def _copy_group(
    file: KerasFile,
    source: h5py.Group,
    target: h5py.Group,
    selected: set[str],
    factor: float,
    norms: dict[str, tuple[float, float]],
    depth: int,
) -> None:
    if depth > MAX_DEPTH:
        raise KerasFileError(f"{file.path!r}: HDF5 groups nested too deep.")
    for key in source:
        item = source.get(key)
        if isinstance(item, h5py.Group):
            group = target.create_group(key)
            _copy_attrs(item, group)
            _copy_group(file, item, group, selected, factor, norms, depth + 1)
        elif isinstance(item, h5py.Dataset):
            _copy_dataset(file, item, target, key, item.name in selected, factor, norms)
        else:
            raise KerasFileError(f"{file.path!r}: unsupported HDF5 object {key!r}.")


def _copy_dataset(
    file: KerasFile,
    source: h5py.Dataset,
    target: h5py.Group,
    key: str,
    scale: bool,
    factor: float,
    norms: dict[str, tuple[float, float]],
) -> None:
    check_storage(source, file.path)
    dataset = target.create_dataset(key, shape=source.shape, dtype=source.dtype)
    _copy_attrs(source, dataset)
    dtype = dataset_dtype(source, file.path) if scale else ""
    if scale and dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise KerasFileError(
            f"{file.path!r}: cannot scale {source.name}: it holds {dtype} data."
        )
    before, after = _Sums(), _Sums()
    for index in blocks(tuple(source.shape), source.dtype.itemsize):
        if scale:
            values = read_block(source, dtype, index)
            before.add(np.abs(values))
            encoded = write_block(values * np.asarray(factor, values.dtype), dtype)
            after.add(np.abs(read_encoded(encoded, dtype)))
            dataset[index] = encoded
        else:
            dataset[index] = source[index]
    if scale:
        norms[source.name] = (before.l2, after.l2)


def read_encoded(values: np.ndarray, dtype: str) -> np.ndarray:
    """What `read_block` would give for `values` once written."""
    if dtype == "bfloat16":
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64 if dtype == "float64" else np.float32)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
