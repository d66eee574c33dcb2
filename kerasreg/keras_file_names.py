"""Name the weights of a saved Keras model from its config, as data.

Each HDF5 dataset of a `model.weights.h5` is given the path that
`kerasreg.selection.weight_paths` gives the same weight once the model is
loaded (layer-name chain below the model, then the variable name:
`"bidirectional/forward_lstm/lstm_cell/kernel"`), using what `config.json`
says about the layers Keras ships (`kerasreg.keras_file_layers`: which
variables each saves, in order, and which it trains). What the file cannot
tell is said, never guessed: a weight of any other layer (a subclassed model
or layer, every layer of a weights-only file) is `unknown:<layers>/var_<i>`,
its trainability and penalty unknown. An L2SPPenalty's saved reference is not
a weight: it goes with the weight it measures. With `keras_file_layers`, the
bottom of the Keras-free file readers (`keras_file`, `keras_file_stats`):
imports neither Keras nor TensorFlow.

Longer than 400 lines on purpose: it is one walk of the file's groups
(containers, wrappers, cells, attention projections, regularizer state), and
each step is only correct together with the others; the storage checks of a
dataset (`dataset_dtype`, `check_storage`) sit with the walk that finds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from kerasreg.keras_file_layers import (
    FLOATS,
    format_shape,
    gates_of,
    is_builtin,
    lora_adapters,
    lora_base,
    own_variables,
    regularizer_key,
    shape_problem,
)

# A member or dataset that inflates more than this many times is a zip bomb.
MAX_COMPRESSION_RATIO = 200
# Nesting deeper than this (layers in layers, HDF5 groups) is refused.
MAX_DEPTH = 64


class KerasFileError(Exception):
    """The file cannot be read as a Keras model: the message is one line."""


@dataclass
class Weight:
    """One variable of the saved model, named as `weight_paths` names it.

    `known` is False when the file cannot tell what the variable is (a
    layer class kerasreg does not know, a weights-only file): its path is then
    `unknown:<layers>/var_<i>`, its trainability and penalty unknown.
    `trainable` is None whenever the file cannot tell whether the loaded model
    trains it. A LoRA adapter has no `dataset`: the loaded model creates it
    anew.
    """

    path: str
    dataset: str | None  # the HDF5 dataset's path
    shape: tuple[int, ...]
    dtype: str
    trainable: bool | None = True
    regularizer: Any = None  # its serialized config, or None
    gates: tuple[str, ...] = ()
    layer_class: str | None = None
    known: bool = True
    reference: str | None = None  # the HDF5 dataset of an L2SPPenalty's reference
    reference_problem: str | None = None  # why that reference cannot be used
    owner: str = ""  # the owning layer's path prefix
    attribute: str = ""  # the layer attribute holding its regularizer

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS


UNKNOWN = "unknown:"

# --- naming the weights --------------------------------------------------------

_RNN_CELL = {
    "LSTM": ("LSTMCell", "lstm_cell"),
    "GRU": ("GRUCell", "gru_cell"),
    "SimpleRNN": ("SimpleRNNCell", "simple_rnn_cell"),
    "ConvLSTM1D": ("ConvLSTMCell", "conv_lstm_cell"),
    "ConvLSTM2D": ("ConvLSTMCell", "conv_lstm_cell"),
    "ConvLSTM3D": ("ConvLSTMCell", "conv_lstm_cell"),
}
# Attention layers: (h5 attributes, layer name) of their EinsumDense sublayers.
_ATTENTION = {
    "MultiHeadAttention": ("query", "key", "value", "output"),
    "GroupedQueryAttention": ("query", "key", "gate", "value", "output"),
    "GroupQueryAttention": ("query", "key", "gate", "value", "output"),
}
# Keras containers whose config lists their layers (and whose weights are
# theirs): a user's subclass, even of `Functional`, may add more.
_CONTAINERS = {"Functional", "Sequential", "StackedRNNCells"}
# Layers whose `trainable: false` reaches their sublayers once loaded (Keras
# 3.8 to 3.15). A frozen attention or ConvLSTM layer, or a user's layer,
# comes back with trainable sublayers: what those train is left unknown.
_FROZEN_REACHES = {
    *_CONTAINERS, *_RNN_CELL, "RNN", "Bidirectional", "TimeDistributed",
}  # fmt: skip
_FROZEN_REACHES -= {"ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"}
# A layer attribute holding a regularizer: its group is the regularizer's own
# saved state (an L2SPPenalty's reference), never a weight.
_REGULARIZER_GROUP = re.compile(r"^_?[A-Za-z0-9_]*_regularizer$")
_L2SP = "kerasreg>L2SPPenalty"


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


def _builtin(cls: str, config: dict) -> dict:
    """A serialized Keras layer, for the sublayers a config implies."""
    return {"module": "keras.layers", "class_name": cls, "config": config,
            "registered_name": None}  # fmt: skip


def _children(cls: str | None, cfg: dict) -> list[tuple[tuple[str, ...], str, Any]]:
    """`(h5 attribute candidates, layer name, layer config)` of known sublayers."""
    if cls in _RNN_CELL:
        cell_cls, cell_name = _RNN_CELL[cls]
        return [(("cell",), cell_name, _builtin(cell_cls, cfg))]
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
                _builtin("EinsumDense", sub),
            )
            for part in _ATTENTION[cls]
        ]
    return []


def name_weights(h5: h5py.File, config: dict | None, path: str) -> list[Weight]:
    """Every dataset of the model's weights, named, in the model's weight order.

    Layers Keras ships are named from `config`; the weights of any other
    layer (a subclassed model or layer, or every layer of a weights-only
    file, `config=None`) are `unknown:<layer names>/var_<i>`, the layer names
    those Keras stores with each group. LoRA adapters follow their layer's
    saved weights (no dataset). An L2SPPenalty's saved reference is never a
    weight: it is attached to the weight it measures.
    """
    weights: list[Weight] = []
    top_cls, top_cfg = _layer(config) if config is not None else (None, {})
    known = config is not None and is_builtin(config)
    _walk(h5, top_cls, top_cfg, "", True, known, weights, path, 0, top=True)
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
    trainable: bool | None,
    known: bool,
    out: list[Weight],
    path: str,
    depth: int,
    *,
    top: bool = False,
) -> None:
    """Name the weights of one layer's group.

    `known`: its class is one Keras ships (and so are its ancestors');
    `trainable`: False under a frozen ancestor whose flag reaches it, None
    where the file cannot tell, else True.
    """
    if depth > MAX_DEPTH:
        raise KerasFileError(f"{path!r}: layers nested more than {MAX_DEPTH} deep.")
    if cfg.get("trainable", True) is False and known:
        # Its own weights are frozen; its sublayers only if the flag reaches.
        own_state: bool | None = False
        trainable = False if cls in _FROZEN_REACHES else None
    else:
        own_state = trainable
    start = len(out)
    if "vars" in group:
        _own(_group(group, "vars", path), cls, cfg, prefix, own_state, known, out, path)
    consumed = {"vars"}
    cells = {prefix}
    for keys, name, child in _children(cls, cfg) if known else []:
        key = next((k for k in keys if k in group), None)
        if key is None:
            continue
        consumed.add(key)
        child_cls, child_cfg = _layer(child)
        if key == "cell":
            cells.add(f"{prefix}{name}/")
        _walk(_group(group, key, path), child_cls, child_cfg, f"{prefix}{name}/",
              trainable, known and is_builtin(child), out, path, depth + 1)  # fmt: skip
    for container in ("layers", "cells"):
        items = cfg.get(container)
        if not known or cls not in _CONTAINERS or not isinstance(items, list):
            continue
        if container not in group:
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
                      f"{prefix}{name or key}/", trainable, is_builtin(item), out,
                      path, depth + 1)  # fmt: skip
        for key in holder:
            if key not in taken:
                _walk_unknown(_group(holder, key, path), key, prefix, trainable, out,
                              path, depth + 1)  # fmt: skip
    # Anything the config did not explain is still reported (as unknown), but
    # a regularizer's saved state is not a weight. At the top, "optimizer"
    # holds optimizer state, not model weights.
    for key in group:
        if key in consumed or (top and key == "optimizer"):
            continue
        item = group[key]
        if not isinstance(item, h5py.Group):
            continue
        if _REGULARIZER_GROUP.match(key):
            if known:
                _attach_reference(item, key.lstrip("_"), cells, out[start:], path)
            continue
        _walk_unknown(item, key, prefix, trainable, out, path, depth + 1)


def _own(
    variables: h5py.Group,
    cls: str | None,
    cfg: dict,
    prefix: str,
    trainable: bool | None,
    known: bool,
    out: list[Weight],
    path: str,
) -> None:
    """The weights of a layer's own `vars` group, then its LoRA adapters."""
    keys = list(variables.keys())
    if sorted(keys, key=_index) != [str(i) for i in range(len(keys))]:
        raise KerasFileError(
            f"{path!r}: malformed weights group {variables.name!r} "
            f"(members {sorted(keys)[:5]} are not 0..n-1)."
        )
    datasets = []
    for i in range(len(keys)):
        dataset = variables.get(str(i))
        if not isinstance(dataset, h5py.Dataset):
            raise KerasFileError(
                f"{path!r}: {variables.name}/{i} is not an HDF5 dataset."
            )
        check_storage(dataset, path)
        datasets.append(dataset)
    dtypes = [dataset_dtype(d, path) for d in datasets]
    layout = own_variables(cls, cfg, dtypes) if known else None
    order: list[int] = list(range(len(datasets)))
    if layout is not None:  # the loaded layer's order (a quantized one differs)
        order = sorted(order, key=lambda i: layout[i].rank)
    for i in order:
        dataset = datasets[i]
        shape = tuple(int(d) for d in dataset.shape or ())
        if layout is None:
            out.append(Weight(f"{UNKNOWN}{prefix}var_{i}", dataset.name, shape,
                              dtypes[i], None, layer_class=cls, known=False,
                              owner=prefix))  # fmt: skip
            continue
        variable = layout[i]
        problem = shape_problem(cls, cfg, variable.name, shape)
        if problem:
            raise KerasFileError(
                f"{path!r}: weight {prefix}{variable.name} has shape "
                f"{format_shape(shape)} but the config disagrees ({problem})."
            )
        attribute = regularizer_key(cls, variable.name)
        out.append(Weight(f"{prefix}{variable.name}", dataset.name, shape, dtypes[i],
                          trainable if variable.trainable else False,
                          cfg.get(attribute),
                          gates_of(cls, cfg, variable.name, shape), cls, owner=prefix,
                          attribute=attribute))  # fmt: skip
    if layout is None:
        return
    base = next(
        (w for w in out if w.owner == prefix and w.name == lora_base(cls)), None
    )
    for name, shape in lora_adapters(cls, cfg, base.shape if base else None):
        attribute = regularizer_key(cls, name)
        out.append(Weight(f"{prefix}{name}", None, shape,
                          base.dtype if base else "float32", trainable,
                          cfg.get(attribute), (), cls, owner=prefix,
                          attribute=attribute))  # fmt: skip


def _attach_reference(
    group: h5py.Group,
    attribute: str,
    owners: set[str],
    weights: list[Weight],
    path: str,
) -> None:
    """Give the weight an L2SPPenalty measures the reference saved in `group`.

    Keras saves a penalty held by a layer attribute under the attribute's
    name (dataset `vars/0`), at the first layer whose attribute reaches it:
    an RNN layer's `bias_regularizer` sits beside its `cell` group, the
    kernels' inside it.
    """
    targets = [
        w for w in weights
        if w.owner in owners and w.attribute == attribute and w.dataset is not None
        and isinstance(w.regularizer, dict)
        and w.regularizer.get("registered_name") == _L2SP
    ]  # fmt: skip
    variables = group.get("vars")
    dataset = variables.get("0") if isinstance(variables, h5py.Group) else None
    if len(targets) != 1 or not isinstance(dataset, h5py.Dataset):
        return
    target = targets[0]
    check_storage(dataset, path)
    shape = tuple(int(d) for d in dataset.shape or ())
    dtype = dataset_dtype(dataset, path)
    if shape != target.shape or dtype not in FLOATS:
        target.reference_problem = (
            f"its saved reference is {dtype} of shape {format_shape(shape)}"
        )
        return
    target.reference = dataset.name


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
    trainable: bool | None,
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
    _walk(group, None, {}, f"{prefix}{name}/", trainable, False, out, path, depth)


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


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
