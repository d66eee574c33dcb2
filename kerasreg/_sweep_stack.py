"""The general engine of `sweep`: K copies of the template side by side in one `fit`.

Also what both one-fit engines share: fresh optimizers (with the template's
weight-decay exclusions), the choice between the vectorised engine
(`_sweep_vector`) and the stack of copies, and the callback that splits the
stacked logs into each variant's history and TensorBoard run.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import keras
import numpy as np

from kerasreg import _sweep_vector
from kerasreg.tensorboard import WeightNormLogger, run_writer

logger = logging.getLogger("kerasreg")


def is_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


# --- the stacked fit ------------------------------------------------------------


class _Stack(keras.Model):
    """K variants as K outputs of one functional model.

    Each variant is a compiled model; its loss is computed by its own
    `compute_loss` (its compiled loss plus its own penalties) and its metrics
    by its own `compute_metrics`, so they are the very numbers a separate fit
    computes. The stacked loss is their sum.
    """

    def __init__(self, inputs, outputs, variants):
        super().__init__(inputs=inputs, outputs=outputs, name="kerasreg_sweep")
        self.keys = list(outputs)
        self.variants = variants
        # Weighted by batch size, as Keras's own loss tracker is.
        self.loss_trackers = [keras.metrics.Mean(name=f"{k}_loss") for k in outputs]

    @property
    def metrics(self):
        metrics = list(super().metrics)
        for variant in self.variants:
            metrics.extend(variant.metrics)
        return metrics

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        batch = keras.ops.shape(_first(x))[0]
        total = None
        for key, variant, tracker in zip(
            self.keys, self.variants, self.loss_trackers, strict=True
        ):
            loss = variant.compute_loss(
                x, y, y_pred[key], sample_weight, training=training
            )
            tracker.update_state(loss, sample_weight=batch)
            total = loss if total is None else total + loss
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for key, variant in zip(self.keys, self.variants, strict=True):
            variant.compute_metrics(x, y, y_pred[key], sample_weight)
        return self.get_metrics_result()

    def get_metrics_result(self):
        logs = {}
        for key, variant, tracker in zip(
            self.keys, self.variants, self.loss_trackers, strict=True
        ):
            logs[f"{key}_loss"] = tracker.result()
            for name, value in variant.get_metrics_result().items():
                if name != "loss":
                    logs[f"{key}_{name}"] = value
        return logs


def _first(x):
    return next(item for item in keras.tree.flatten(x) if item is not None)


def _fresh_optimizer(compile_config, exclusions, models):
    """The template's optimizer, anew, with its weight-decay exclusions for `models`."""
    # Keras's deserialization consumes parts of the config it reads: a copy.
    config = copy.deepcopy(compile_config["optimizer"])
    optimizer = keras.saving.deserialize_keras_object(config)
    names, indices = exclusions
    if names or indices:
        optimizer.exclude_from_weight_decay(
            var_list=[m.weights[i] for m in models for i in indices] or None,
            var_names=names or None,
        )
    return optimizer


def compile_like(variant, compile_config, exclusions):
    config = keras.saving.deserialize_keras_object(copy.deepcopy(compile_config))
    config["optimizer"] = _fresh_optimizer(compile_config, exclusions, [variant])
    variant.compile(**config)


def fit_together(models, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Train the variants in one fit; returns (histories, engine name)."""
    keys = [f"v{i:04d}" for i in range(len(models))]
    sample = _sample_batch(x, y)
    for index, variant in enumerate(models):
        compile_like(variant, compile_config, exclusions)
        # Build the compiled loss and metrics eagerly on two samples, so their
        # variables exist before the stacked step is traced.
        prediction = variant(sample[0])
        variant.compute_loss(sample[0], sample[1], prediction, training=False)
        variant.compute_metrics(sample[0], sample[1], prediction, None)
        variant.reset_metrics()
        if index == 0:
            reason = _sweep_vector.why_not(models[0], models, variant)
            if reason is None and exclusions[1]:
                reason = "weight decay excludes variables by identity (var_list)"
            if reason is None and _has_sample_weights(x, fit_kwargs):
                reason = "the data carry sample or class weights"
            if reason is None:
                break
            logger.debug("kerasreg.sweep: not vectorised: %s", reason)
    if reason is None:
        stack = _sweep_vector.VectorStack(models[0], models, models[0])
        sync = stack.copy_to
    else:
        template_input = models[0].inputs[0]
        inputs = keras.Input(
            batch_shape=template_input.shape,
            dtype=template_input.dtype,
            name="sweep_input",
        )
        outputs = {k: variant(inputs) for k, variant in zip(keys, models, strict=True)}
        stack = _Stack(inputs, outputs, models)
        sync = None
    stack.compile(
        optimizer=_fresh_optimizer(
            compile_config, exclusions, [] if reason is None else models
        ),
        run_eagerly=compile_config.get("run_eagerly", False),
        steps_per_execution=compile_config.get("steps_per_execution", 1),
        jit_compile=compile_config.get("jit_compile", "auto"),
    )
    kwargs = dict(fit_kwargs)
    monitor = Monitor(models, names, logs, kwargs.get("verbose", "auto"), keys, sync)
    kwargs["callbacks"] = [monitor]
    if keras.distribution.distribution() is not None:
        # Keras converts each batch's logs in a worker thread while the main
        # thread dispatches; on a device mesh this deadlocked XLA:CPU's
        # collectives (2.4M-parameter sweep, 2x2 host mesh). A batch-end hook
        # makes Keras convert them in line.
        kwargs["callbacks"].append(_InlineBatchLogs())
    stack.fit(x, y, **kwargs)
    if sync is not None:
        sync(models)
    return monitor.histories, "vectorized" if reason is None else "stacked"


def _has_sample_weights(x, fit_kwargs) -> bool:
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


def _sample_batch(x, y):
    if isinstance(x, keras.utils.PyDataset):
        x, y = x[0][:2]
    elif is_dataset(x):
        x, y = next(iter(x))[:2]
    return x[:2], y[:2]


# --- per-variant logs, histories and TensorBoard --------------------------------


class VariantLog:
    """One variant's TensorBoard run: Keras-style epoch scalars and weight norms."""

    def __init__(self, folder: str):
        self.folder = folder
        self.norms = WeightNormLogger(folder)

    def begin(self, variant: keras.Model) -> None:
        self.norms.set_model(variant)
        self.norms.on_train_begin()

    def epoch_end(self, epoch: int, logs: dict) -> None:
        train = {f"epoch_{k}": v for k, v in logs.items() if not k.startswith("val_")}
        validation = {
            f"epoch_{k[4:]}": v for k, v in logs.items() if k.startswith("val_")
        }
        for run, scalars in (("train", train), ("validation", validation)):
            if scalars:
                writer = run_writer(os.path.join(self.folder, run))
                writer.write(epoch, scalars)
                writer.flush()
        self.norms.on_epoch_end(epoch, logs)

    def end(self) -> None:
        self.norms.on_train_end()


class Monitor(keras.callbacks.Callback):
    """Splits the stacked logs into each variant's logs, as a separate fit's."""

    def __init__(self, variants, names, logs, verbose, split, sync=None):
        super().__init__()
        self.sync = sync
        self.variants = variants
        self.names = names
        self.logs = logs
        self.verbose = verbose
        self.split = split
        self.histories = [{} for _ in variants]

    def on_train_begin(self, logs=None):
        for variant, log in zip(self.variants, self.logs, strict=True):
            if log is not None:
                log.begin(variant)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self.split is None:
            per_variant = [logs]
        else:
            per_variant = [_split(logs, k) for k in self.split]
        if any(log is not None for log in self.logs):
            self.model  # noqa: B018 on JAX this syncs the trained values into the variables
            if self.sync is not None:
                self.sync(self.variants)
        for history, variant_logs, log in zip(
            self.histories, per_variant, self.logs, strict=True
        ):
            for key, value in variant_logs.items():
                history.setdefault(key, []).append(float(value))
            if log is not None:
                log.epoch_end(epoch, variant_logs)
        if self.verbose == 1 and self.split is not None:
            monitor = "val_loss" if "val_loss" in per_variant[0] else "loss"
            values = [float(v[monitor]) for v in per_variant]
            best = int(np.argmin(values))
            print(f"best so far by {monitor}: {self.names[best]} ({values[best]:.4g})")

    def on_train_end(self, logs=None):
        for log in self.logs:
            if log is not None:
                log.end()


def _split(logs: dict, key: str) -> dict:
    """Variant `key`'s logs, named as a separate fit names them."""
    out = {}
    for prefix in ("", "val_"):
        start = f"{prefix}{key}_"
        for name, value in logs.items():
            if name.startswith(start):
                out[f"{prefix}{name[len(start) :]}"] = float(value)
    return out


class _InlineBatchLogs(keras.callbacks.Callback):
    """Defines `on_train_batch_end`, so Keras does not dispatch it to a thread."""

    def on_train_batch_end(self, batch, logs=None):
        pass
