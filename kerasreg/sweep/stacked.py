"""The general engine of `sweep`: K copies of the template side by side in one `fit`.

Also the choice between the vectorised engine (`kerasreg.sweep.vectorized`)
and the stack of copies, which both train in one `fit`.
"""

from __future__ import annotations

import logging

import keras

from kerasreg.sweep import vectorized
from kerasreg.sweep.data import has_sample_weights, sample_batch
from kerasreg.sweep.monitor import InlineBatchLogs, Monitor
from kerasreg.sweep.variants import compile_like, fresh_optimizer

logger = logging.getLogger("kerasreg")


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


def fit_together(models, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Train the variants in one fit; returns (histories, engine name)."""
    keys = [f"v{i:04d}" for i in range(len(models))]
    sample = sample_batch(x, y)
    for index, variant in enumerate(models):
        compile_like(variant, compile_config, exclusions)
        # Build the compiled loss and metrics eagerly on two samples, so their
        # variables exist before the stacked step is traced.
        prediction = variant(sample[0])
        variant.compute_loss(sample[0], sample[1], prediction, training=False)
        variant.compute_metrics(sample[0], sample[1], prediction, None)
        variant.reset_metrics()
        if index == 0:
            reason = vectorized.why_not(models[0], models, variant)
            if reason is None and exclusions[1]:
                reason = "weight decay excludes variables by identity (var_list)"
            if reason is None and has_sample_weights(x, fit_kwargs):
                reason = "the data carry sample or class weights"
            if reason is None:
                break
            logger.debug("kerasreg.sweep: not vectorised: %s", reason)
    if reason is None:
        stack = vectorized.VectorStack(models[0], models, models[0])
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
        optimizer=fresh_optimizer(
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
        kwargs["callbacks"].append(InlineBatchLogs())
    stack.fit(x, y, **kwargs)
    if sync is not None:
        sync(models)
    return monitor.histories, "vectorized" if reason is None else "stacked"
