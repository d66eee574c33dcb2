"""What `sweep` needs to know of the training data it is given."""

from __future__ import annotations

from typing import Any

import keras


def is_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def has_sample_weights(x, fit_kwargs) -> bool:
    """Whether any batch of training or validation data may carry weights."""
    if fit_kwargs.get("sample_weight") is not None or fit_kwargs.get("class_weight"):
        return True
    validation = fit_kwargs.get("validation_data")
    if isinstance(validation, (tuple, list)) and len(validation) > 2:
        return validation[2] is not None
    if validation is not None and not isinstance(validation, (tuple, list)):
        return True  # a dataset: its elements may hold weights
    if isinstance(x, keras.utils.PyDataset):
        first = x[0]
        return len(first) > 2 and first[2] is not None
    if is_dataset(x):
        spec = x.element_spec
        return not isinstance(spec, tuple) or len(spec) > 2
    return False


def sample_batch(x, y):
    if isinstance(x, keras.utils.PyDataset):
        x, y = x[0][:2]
    elif is_dataset(x):
        x, y = next(iter(x))[:2]
    return x[:2], y[:2]
