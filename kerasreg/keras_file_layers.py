"""What each known Keras layer saves: its variables, in order, and which train.

The tables `kerasreg.keras_file_names` reads to name a layer's datasets from
its config alone (Keras 3.8 to 3.15): `own_variables` gives, for a layer
class Keras ships and the datasets its `vars` group holds, each variable's
name and whether Keras trains it, or None when the file cannot tell (a class
not listed here, a count or dtype that disagrees, a quantization mode whose
layout is not listed). `lora_adapters` gives the trainable LoRA adapters a
LoRA-enabled layer has once loaded, which the file does not hold. Imports
neither Keras nor TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KERNEL_BIAS = {
    "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
}  # fmt: skip
CELLS = {"LSTMCell", "GRUCell", "SimpleRNNCell", "ConvLSTMCell"}
GATES = {"LSTMCell": "ifco", "GRUCell": "zrh", "ConvLSTMCell": "ifco"}
# Statistics Keras keeps as variables but never trains.
_NON_TRAINABLE = {"moving_mean", "moving_variance"}
# Dtype policies of layers that are not quantized (3.0-3.3 called it Float...).
_PLAIN_POLICIES = {"DTypePolicy", "FloatDTypePolicy"}
FLOATS = {"float16", "bfloat16", "float32", "float64"}


@dataclass(frozen=True)
class Variable:
    """One variable a layer saves: its name, whether Keras trains it, and its
    place among the loaded layer's weights (`rank`; default: saving order)."""

    name: str
    trainable: bool = True
    rank: int = 0


def quantization_mode(cfg: dict) -> str | None:
    """The layer's quantization mode (`"int8"`, `"float8"`, ...), or None.

    Read from its serialized dtype policy; `"unknown"` for a quantized policy
    whose mode the config does not state plainly.
    """
    policy = cfg.get("dtype")
    if not isinstance(policy, dict) or policy.get("class_name") in _PLAIN_POLICIES:
        return None
    inner = policy.get("config")
    inner = inner if isinstance(inner, dict) else {}
    mode = inner.get("mode")
    if not isinstance(mode, str):  # Keras 3.0-3.3: "int8_from_float32"
        name = inner.get("name")
        mode = name.split("_from_")[0] if isinstance(name, str) else "unknown"
    return mode


def own_variables(
    cls: str | None, cfg: dict, dtypes: list[str]
) -> list[Variable] | None:
    """The variables a known layer saves in its `vars` group, in order, or None.

    `dtypes` are the datasets' dtypes (one per saved variable): the layout must
    match their count, and a quantized kernel its integer dtype.
    """
    mode = quantization_mode(cfg)
    if mode is not None:
        if cfg.get("lora_rank"):
            return None  # LoRA over a quantized kernel: layouts not listed
        variables = _quantized(cls, cfg, mode, dtypes)
    else:
        names = _names(cls, cfg)
        if names is None:
            return None
        frozen = _NON_TRAINABLE | (set(names) if cls == "Normalization" else set())
        if lora_adapters(cls, cfg, None):
            # Keras merges the adapters into the kernel on save and freezes it.
            frozen |= _LORA_BASE
        variables = [Variable(n, n not in frozen, i) for i, n in enumerate(names)]
    if variables is None or len(variables) != len(dtypes):
        return None
    return variables


def _in_loaded_order(variables: list[Variable], loaded: list[str]) -> list[Variable]:
    """`variables` (saving order) ranked by their place in `loaded`."""
    return [
        Variable(v.name, v.trainable, loaded.index(v.name) if v.name in loaded else i)
        for i, v in enumerate(variables)
    ]


def _names(cls: str | None, cfg: dict) -> list[str] | None:
    use_bias = cfg.get("use_bias", True) is not False
    bias = ["bias"] if use_bias else []
    if cls in _KERNEL_BIAS:
        return ["kernel", *bias]
    if cls == "EinsumDense":
        return ["kernel", *(["bias"] if cfg.get("bias_axes") else [])]
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if cls == "Embedding":
        return ["embeddings"]
    if cls in CELLS:
        return ["kernel", "recurrent_kernel", *bias]
    if cls == "BatchNormalization":
        return [
            *(["gamma"] if cfg.get("scale", True) is not False else []),
            *(["beta"] if cfg.get("center", True) is not False else []),
            "moving_mean",
            "moving_variance",
        ]
    if cls in ("LayerNormalization", "GroupNormalization"):
        return [
            *(["gamma"] if cfg.get("scale", True) is not False else []),
            *(["beta"] if cfg.get("center", True) is not False else []),
        ]
    if cls == "PReLU":
        return ["alpha"]
    if cls == "Normalization":  # adapted statistics, none trainable
        return ["mean", "variance", "count"]
    return None


# Quantized layers: what `save_own_variables` writes for each mode, in order,
# and the order of the loaded layer's weights (the same in Keras 3.8 and
# 3.15). "int8" freezes the integer kernel and its scale; "float8" trains its
# scales and amax histories with the kernel (Keras overwrites them with their
# "gradient"). Other modes: not listed.
_FLOAT8_STATE = (
    "inputs_scale", "inputs_amax_history", "kernel_scale", "kernel_amax_history",
    "outputs_grad_scale", "outputs_grad_amax_history",
)  # fmt: skip


def _quantized(
    cls: str | None, cfg: dict, mode: str, dtypes: list[str]
) -> list[Variable] | None:
    if cls in ("Dense", "EinsumDense"):
        has_bias = (
            bool(cfg.get("bias_axes"))
            if cls == "EinsumDense"
            else cfg.get("use_bias", True) is not False
        )
        bias = [Variable("bias")] if has_bias else []
        if mode == "int8" and dtypes[:1] == ["int8"]:
            saved = [Variable("kernel", False), *bias, Variable("kernel_scale", False)]
            return _in_loaded_order(saved, ["bias", "kernel", "kernel_scale"])
        if mode == "float8" and dtypes[:1] and dtypes[0] in FLOATS:
            saved = [Variable("kernel"), *bias, *map(Variable, _FLOAT8_STATE)]
            return _in_loaded_order(saved, [*_FLOAT8_STATE, "kernel", "bias"])
    if cls == "Embedding" and mode == "int8" and dtypes[:1] == ["int8"]:
        return [Variable("embeddings", False), Variable("embeddings_scale", False)]
    return None


# The variable a LoRA-enabled layer freezes, and the adapters it trains instead.
_LORA = {
    "Dense": ("kernel", "lora_kernel"),
    "EinsumDense": ("kernel", "lora_kernel"),
    "Embedding": ("embeddings", "lora_embeddings"),
}
_LORA_BASE = {base for base, _ in _LORA.values()}


def lora_adapters(
    cls: str | None, cfg: dict, base_shape: tuple[int, ...] | None
) -> list[tuple[str, tuple[int, ...]]]:
    """`[(name, shape), ...]` of the adapters of a LoRA-enabled layer, else `[]`.

    Keras saves the kernel with the adapters merged into it and, on load,
    creates the adapters anew (`lora_rank` in the config): the loaded model
    trains them, but their values are not in the file. Shapes follow the base
    variable's (`base_shape`; `()` each when it is None).
    """
    rank = cfg.get("lora_rank")
    if cls not in _LORA or isinstance(rank, bool) or not isinstance(rank, int):
        return []
    if rank <= 0:
        return []
    prefix = _LORA[cls][1]
    if base_shape is None or not base_shape:
        return [(f"{prefix}_a", ()), (f"{prefix}_b", ())]
    return [
        (f"{prefix}_a", (*base_shape[:-1], rank)),
        (f"{prefix}_b", (rank, base_shape[-1])),
    ]


def lora_base(cls: str | None) -> str | None:
    """The variable a LoRA-enabled layer of class `cls` freezes."""
    return _LORA[cls][0] if cls in _LORA else None


def regularizer_key(cls: str | None, name: str) -> str:
    """The config key (and layer attribute) of variable `name`'s regularizer."""
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D") and name == "kernel":
        return "depthwise_regularizer"
    if name == "recurrent_kernel":
        return "recurrent_regularizer"
    if name in ("depthwise_kernel", "pointwise_kernel"):
        return name.replace("_kernel", "_regularizer")
    if name.startswith(("lora_kernel_", "lora_embeddings_")):
        return name[len("lora_") : -len("_a")] + "_regularizer"
    return f"{name}_regularizer"


def shape_problem(cls: str | None, cfg: dict, name: str, shape: tuple) -> str | None:
    """Why `shape` cannot be variable `name` of this layer's config, or None."""
    units = cfg.get("units")
    gates = len(GATES.get(cls or "", "")) or 1
    if cls == "Dense" and isinstance(units, int):
        want = {"kernel": (None, units), "bias": (units,)}.get(name)
        if want and (len(shape) != len(want) or shape[-1] != units):
            return f"Dense units={units} needs {name} of shape {format_shape(want)}"
    if cls == "Embedding" and name == "embeddings":
        want = (cfg.get("input_dim"), cfg.get("output_dim"))
        if all(isinstance(d, int) for d in want) and tuple(shape) != want:
            return f"Embedding needs embeddings of shape {format_shape(want)}"
    if cls in ("LSTMCell", "GRUCell", "SimpleRNNCell") and isinstance(units, int):
        width = gates * units
        want = {"kernel": (None, width), "recurrent_kernel": (units, width)}.get(name)
        if want and (len(shape) != 2 or shape[-1] != width or (
            want[0] is not None and shape[0] != want[0]
        )):  # fmt: skip
            return f"{cls} units={units} needs {name} of shape {format_shape(want)}"
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


def gates_of(cls: str | None, cfg: dict, name: str, shape: tuple) -> tuple[str, ...]:
    """The gate names of a recurrent cell's kernel, recurrent kernel or bias."""
    if cls in GATES and name in ("kernel", "recurrent_kernel", "bias") and shape:
        units = cfg.get("filters") if cls == "ConvLSTMCell" else cfg.get("units")
        if isinstance(units, int) and shape[-1] == len(GATES[cls]) * units:
            return tuple(GATES[cls])
    return ()


def format_shape(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def is_builtin(item: Any) -> bool:
    """Whether a serialized layer is one Keras ships (not a user's class).

    Keras writes a `keras...` module and `registered_name: null` for its own
    classes (`"Functional"` for its functional model), and `"package>Name"`
    for the classes users register.
    """
    if not isinstance(item, dict):
        return False
    module = item.get("module")
    registered = item.get("registered_name")
    keras_module = isinstance(module, str) and (
        module == "keras" or module.startswith("keras.")
    )
    return keras_module and (
        registered is None
        or (registered == item.get("class_name") and ">" not in registered)
    )
