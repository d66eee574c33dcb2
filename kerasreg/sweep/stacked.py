"""The general engine of `sweep`: K copies of the template side by side in one `fit`.

The K variants become K branches of one functional model whose loss is the
sum of the variants' own losses (each variant's `compute_loss`: its compiled
loss and its own penalties), so the gradient of each variant's weights is
exactly its own. Keras's optimizers update every variable from its own
gradient and slots (SGD, momentum, Adam, ..., per-variable `clipnorm` and
`clipvalue`, gradient accumulation, EMA), so one optimizer over the stack
makes the very updates K separate optimizers would. Metrics are each
variant's own `compute_metrics`. What couples the variables of a whole model
(global-norm clipping, loss scaling) is not exact here: `why_not` says so.
"""

from __future__ import annotations

from typing import Any

import keras

from kerasreg.selection import walk_layers
from kerasreg.sweep import stopping
from kerasreg.sweep.context import SweepContext
from kerasreg.sweep.monitor import InlineBatchLogs, Monitor
from kerasreg.sweep.variants import fresh_optimizer

PREPARE = "all"  # what fit needs beforehand (kerasreg.sweep.engines)
NAME = "stacked"


def separate_fit_layers(template) -> str | None:
    """Layers that no one-fit engine trains as their own fits, or None.

    A stateful layer's state has the batch's shape (measured:
    `SimpleRNN(stateful=True)` fails inside `jax.vmap`); an RNN cell's
    dropout masks, drawn in one fit of K variants, are not those of each
    variant's own fit (measured: `LSTM(4, dropout=0.2, seed=5)` 0.07 off in
    the weights, in the stacked and the mapped engines).
    """
    layers = [layer for layer, _ in walk_layers(template)]
    if any(getattr(layer, "stateful", False) for layer in layers):
        return "the template has stateful layers"
    for layer in layers:
        rates: Any = (
            getattr(layer, "dropout", 0),
            getattr(layer, "recurrent_dropout", 0),
        )
        if hasattr(layer, "recurrent_dropout") and any(rates):
            return f"layer {layer.name!r} has dropout in its recurrent cell"
    return None


def why_not(
    template: keras.Model, variants: list[keras.Model], context: SweepContext
) -> str | None:
    """Why one stacked fit would not be exact or is not supported (None: it is)."""
    optimizer = template.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return "the optimizer scales the loss (one scale for all variables)"
    if getattr(optimizer, "global_clipnorm", None):
        return "the optimizer clips by global norm (one norm over all variables)"
    if len(template.inputs) != 1 or len(template.outputs) != 1:
        return "the template has several inputs or outputs"
    reason = separate_fit_layers(template)
    if reason:
        return reason
    for method in ("train_step", "test_step"):
        if getattr(type(template), method) is not getattr(keras.Model, method):
            return f"the template overrides `{method}`"
    return stopping.why_not(
        template, list(context.fit_kwargs.get("callbacks") or []), own_optimizers=False
    )


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


def fit_stack(
    stack,
    variants,
    names,
    logs,
    compile_config,
    fit_kwargs,
    x,
    y,
    sync,
    write=None,
    optimizer=False,
):
    """Fit `stack` (a model of the K variants) once; each variant's history.

    The sweep's `callbacks` (`kerasreg.sweep.stopping.ONE_FIT`) act on each
    variant (`sync(variants)` copies the stack's values into the variants'
    models; `write(variants, index)` copies variant `index`'s model into the
    stack, None where they share their variables; `optimizer`: whether the
    variants' optimizers hold their state). Returns a
    `kerasreg.sweep.stopping.Histories`.
    """
    kwargs = dict(fit_kwargs)
    variant_callbacks = stopping.variant_callbacks(
        kwargs,
        variants,
        names,
        optimizer=optimizer,
        write=write or (lambda variants, index: None),
    )
    monitor = Monitor(
        variants,
        names,
        logs,
        kwargs.get("verbose", "auto"),
        [f"v{i:04d}" for i in range(len(variants))],
        sync,
        variant_callbacks,
    )
    kwargs["callbacks"] = [monitor]
    if keras.distribution.distribution() is not None:
        # Keras converts each batch's logs in a worker thread while the main
        # thread dispatches; on a device mesh this deadlocked XLA:CPU's
        # collectives (2.4M-parameter sweep, 2x2 host mesh). A batch-end hook
        # makes Keras convert them in line.
        kwargs["callbacks"].append(InlineBatchLogs())
    stack.fit(x, y, **kwargs)
    if sync is not None:
        sync(variants)
    return stopping.histories(monitor)


def fit(variants, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Train the compiled variants as K branches of one model, in one `fit`."""
    keys = [f"v{i:04d}" for i in range(len(variants))]
    template_input = variants[0].inputs[0]
    inputs = keras.Input(
        batch_shape=template_input.shape,
        dtype=template_input.dtype,
        name="sweep_input",
    )
    outputs = {k: variant(inputs) for k, variant in zip(keys, variants, strict=True)}
    stack = _Stack(inputs, outputs, variants)
    stack.compile(
        optimizer=fresh_optimizer(compile_config, exclusions, variants),
        run_eagerly=compile_config.get("run_eagerly", False),
        steps_per_execution=compile_config.get("steps_per_execution", 1),
        jit_compile=compile_config.get("jit_compile", "auto"),
    )
    return fit_stack(
        stack, variants, names, logs, compile_config, fit_kwargs, x, y, None
    )
