"""Name the weights of a saved Keras model from its config, as data.

Each HDF5 dataset of a `model.weights.h5` is given the path that
`kerasreg.selection.weight_paths` gives the same weight once the model is
loaded (layer-name chain below the model, then the variable name:
`"bidirectional/forward_lstm/lstm_cell/kernel"`), using what `config.json`
says about known Keras layers; a weight of a layer not known here is still
reported, as `<layer path>/var_<i>`. The bottom of the Keras-free file
readers (`keras_file`, `keras_file_stats`): imports neither Keras nor
TensorFlow.

Longer than 400 lines on purpose: it is one table-driven walk (which
variables each known Keras layer saves, in which order, under which
sublayer), and each table is only correct together with the walk that reads
it; the storage checks of a dataset (`dataset_dtype`, `check_storage`) sit
with the walk that finds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

# A member or dataset that inflates more than this many times is a zip bomb.
MAX_COMPRESSION_RATIO = 200
# Nesting deeper than this (layers in layers, HDF5 groups) is refused.
MAX_DEPTH = 64


class KerasFileError(Exception):
    """The file cannot be read as a Keras model: the message is one line."""


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
    for candidates, name, child in _children(cls, cfg):
        key = next((k for k in candidates if k in group), None)
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


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
