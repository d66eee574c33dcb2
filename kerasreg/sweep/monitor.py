"""Each variant's history and TensorBoard run, split from the logs of one fit."""

from __future__ import annotations

import os

import keras
import numpy as np

from kerasreg.tensorboard import WeightNormLogger, run_writer


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


class InlineBatchLogs(keras.callbacks.Callback):
    """Defines `on_train_batch_end`, so Keras does not dispatch it to a thread."""

    def on_train_batch_end(self, batch, logs=None):
        pass
