"""`sweep`: a grid of penalties trained side by side in one `fit`.

There is no formula for a penalty's strength: one searches a log-scale grid.
`sweep` trains the K variants of a compiled template model (one per penalty)
as K sub-models of one stacked functional model, on the same batches, in one
`fit`. The stacked loss is the sum of the K variants' losses (each variant's
data loss plus its own penalty), so the gradient of each variant's weights is
exactly that variant's own gradient; Keras's optimizers update every variable
from its own gradient and its own slots, so one optimizer over the stack
makes the very updates K separate optimizers would. Everything that couples
variables across the whole model (global-norm clipping, dynamic loss scaling)
breaks this; such templates, and inputs the stack does not handle, are
trained one variant after another instead, with a log line saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kerasreg import _compat, _sweep_vector
from kerasreg.attach import REMOVE, ROLES, regularize
from kerasreg.penalties import get
from kerasreg.selection import walk_layers
from kerasreg.tensorboard import WeightNormLogger, run_writer

logger = logging.getLogger("kerasreg")

# Keras EarlyStopping's rule for mode="auto", plus the usual score metrics.
_MAX_METRICS = ("acc", "auc", "precision", "recall", "fmeasure", "f1")


class SweepResult:
    """The outcome of `kerasreg.sweep`: one row and one trained model per penalty.

    Attributes:
        rows: list of dicts, one per variant, in the order of `penalties`:
            `"penalty"` (readable name, also the TensorBoard run name),
            `"config"` (`{role: serialized penalty or None}`), `"strength"`
            (the sum of the penalty's numeric arguments; `0.0` for none),
            `"history"` (exactly as `History.history` of a separate `fit`),
            and the final value of every history key (`"loss"`,
            `"val_loss"`, ...).
        models: list of the trained models, each a standalone copy of the
            template carrying its penalty, compiled like the template (with a
            fresh optimizer), ready to `evaluate`, `predict` and `save`.
        engine: how the variants were trained: `"vectorized"` (one model
            whose weights have a leading axis of K: Dense chains with the
            common penalties, losses, metrics and optimizers), `"stacked"`
            (K copies side by side in one `fit`), or `"sequential"` (K
            separate fits; the reason is logged).
        stacked: `True` when the variants were trained in one `fit`
            (`engine` is `"vectorized"` or `"stacked"`).

    Example:

    >>> result = kerasreg.sweep(model, [None, kerasreg.L2Penalty(1e-3)], x, y,
    ...                         validation_split=0.25, epochs=5, verbose=0)
    ...                         # doctest: +SKIP
    >>> result.best("val_loss")["penalty"]  # doctest: +SKIP
    'L2Penalty_0.001'
    """

    def __init__(self, rows: list[dict], models: list[keras.Model], engine: str):
        self.rows = rows
        self.models = models
        self.engine = engine
        self.stacked = engine != "sequential"

    def best(self, monitor: str = "val_loss", mode: str = "auto") -> dict:
        """The row with the best final `monitor` value.

        Args:
            monitor: a history key, such as `"val_loss"` or `"accuracy"`.
            mode: `"min"`, `"max"`, or `"auto"` (`"max"` for accuracy-like
                names, as Keras's `EarlyStopping` decides, else `"min"`).

        Returns:
            The row (a dict of `rows`).
        """
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                "SweepResult.best: invalid `mode`: expected 'auto', 'min' or "
                f"'max'. Received: mode={mode!r}."
            )
        available = list(self.rows[0]["history"])
        if monitor not in available:
            raise ValueError(
                f"SweepResult.best: invalid `monitor`: {monitor!r} is not in the "
                f"history. Available: {available}."
            )
        if mode == "auto":
            name = monitor.lower()
            mode = "max" if any(m in name for m in _MAX_METRICS) else "min"
        pick = max if mode == "max" else min
        return pick(self.rows, key=lambda row: row[monitor])

    def plot(self, path: str | os.PathLike, metric: str | None = None) -> str:
        """Draw the validation curve: final `metric` against strength, log x axis.

        Training and (when the fit had validation data) validation values are
        drawn against the penalty strength on a logarithmic axis, as in
        Brownlee's weight-decay figure; a variant without penalty is drawn as
        a dashed horizontal line. Writes a PNG file.

        Args:
            path: the PNG file to write.
            metric: a training history key; default: the first compiled
                metric (such as `"accuracy"`), else `"loss"`.

        Returns:
            `path`, as a string.
        """
        import matplotlib

        if matplotlib.get_backend().lower() not in (
            "agg",
            "module://matplotlib_inline.backend_inline",
        ):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(self.rows[0]["history"])
        train_keys = [k for k in keys if not k.startswith("val_")]
        if metric is None:
            metric = next((k for k in train_keys if k != "loss"), "loss")
        if metric not in train_keys:
            raise ValueError(
                f"SweepResult.plot: invalid `metric`: {metric!r} is not a training "
                f"history key. Available: {train_keys}."
            )
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        series = [(metric, "o-", "train")]
        if f"val_{metric}" in keys:
            series.append((f"val_{metric}", "s-", "validation"))
        scaled = [row for row in self.rows if row["strength"] > 0]
        scaled.sort(key=lambda row: row["strength"])
        for key, style, label in series:
            line = ax.plot(
                [row["strength"] for row in scaled],
                [row[key] for row in scaled],
                style,
                label=label,
            )[0]
            for row in self.rows:
                if row["strength"] == 0:
                    ax.axhline(
                        row[key],
                        color=line.get_color(),
                        ls="--",
                        lw=1,
                        label=f"{label}, {row['penalty']}",
                    )
        if scaled:
            ax.set_xscale("log")
        ax.set_xlabel("penalty strength")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.fspath(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        history = list(self.rows[0]["history"])
        train = [k for k in history if not k.startswith("val_")]
        keys = sorted(train, key=lambda k: k != "loss")
        keys += sorted(
            set(history) - set(train), key=lambda k: (k != "val_loss", history.index(k))
        )
        width = max(len("penalty"), *(len(row["penalty"]) for row in self.rows))
        header = f"{'penalty':<{width}} " + " ".join(f"{k:>12}" for k in keys)
        lines = [header]
        for row in self.rows:
            values = " ".join(f"{row[k]:>12.5g}" for k in keys)
            lines.append(f"{row['penalty']:<{width}} {values}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        names = ", ".join(row["penalty"] for row in self.rows)
        return f"<SweepResult of {len(self.rows)} variants: {names}>"


def sweep(
    model: keras.Model,
    penalties: Sequence[Any],
    x: Any,
    y: Any = None,
    *,
    role: str = "kernel",
    where: Any = None,
    log_dir: str | os.PathLike | None = None,
    **fit_kwargs: Any,
) -> SweepResult:
    """Train one copy of a compiled model per penalty, side by side in one `fit`.

    Each variant is a copy of `model` (same architecture, the template's
    current weights, its loss and metrics, a fresh optimizer from its
    optimizer's config) carrying its own penalty through `kerasreg.regularize`.
    The K variants become K branches of one functional model, fitted once on
    the same batches (one shuffling order shared by all) with the loss

    `sum_k (data_loss_k + penalty_k)`,

    so the gradient of variant k's weights is exactly its own; as Keras's
    optimizers (SGD, momentum, Adam, ... and per-variable `clipnorm`/`clipvalue`,
    gradient accumulation, EMA) update each variable from its own gradient and
    slots, this is the same computation as K separate fits with the same data
    order. Each variant's history is reported as a separate fit reports it:
    its `loss` includes its own penalty only.

    Templates for which one stacked fit is not exact or not supported are
    trained one variant after another (K separate fits), with a log line on
    the `"kerasreg"` logger: an optimizer with `global_clipnorm` or loss
    scaling, stateful layers, several inputs or outputs, `callbacks` (they
    would see the stacked model; they are given to each of the K fits
    instead), and training data other than arrays, a
    `keras.utils.PyDataset` or a `tf.data.Dataset`.

    The engine is chosen per template (`SweepResult.engine`). A chain of
    `Dense` and activation layers with the usual penalties (kerasreg's L1,
    L2 and elastic net, Keras's L1, L2 and L1L2), a per-sample loss, mean
    metrics (accuracy, MSE, ...) and an elementwise optimizer (SGD, Adam,
    AdamW, RMSprop, ...) is `"vectorized"`: one model whose weights have a
    leading axis of K, so a step is one batched matrix product per layer and
    one optimizer update. Other templates are `"stacked"` (K copies side by
    side). Both are the same computation as K separate fits.

    Args:
        model: a built and compiled `keras.Model` (Sequential or functional),
            the template. It is neither trained nor changed.
        penalties: a non-empty list; each item is anything `regularize`
            accepts for `role` (`None` = no penalty for that role), or a dict
            `{role: penalty}` for several roles at once.
        x: training inputs, as for `fit`.
        y: training targets, as for `fit`.
        role: `"kernel"` (default), `"recurrent"` or `"bias"`: the role of
            the penalties given without a dict.
        where: which weights get the penalties: `regularize`'s `where=`, the
            selection rule used everywhere in kerasreg (`None` = every weight
            of the role; a regular expression searched in weight paths such
            as `"hidden/kernel"`; or a selector such as
            `kerasreg.layer("^hidden$")`).
        log_dir: optional TensorBoard root: one run per variant,
            `log_dir/<penalty name>/train|validation`, with Keras's
            `epoch_<metric>` scalars and `WeightNormLogger` data, plus the
            HParams experiment (`penalty`, `strength`, final metrics).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`,
            `validation_data`, `validation_split`, `shuffle`, `verbose`, ...).
            With `verbose=1` the best variant so far (by `val_loss`, else
            `loss`) is printed at each epoch end.

    Returns:
        A `SweepResult`.

    Raises:
        TypeError: `model` is not a Keras model, or `penalties` is not a list.
        ValueError: `penalties` is empty, `role` is unknown, a penalty cannot be
            resolved or targets a role the model lacks, the template is not
            built or not compiled, or it cannot be copied.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16),
    ...                           keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.random.rand(32, 2), np.random.rand(32, 1)
    >>> grid = [None] + [kerasreg.L2Penalty(a) for a in (1e-3, 1e-2)]
    >>> result = kerasreg.sweep(model, grid, x, y, epochs=3,
    ...                         verbose=0)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    """
    _check_template(model)
    variants = _check_penalties(penalties, role)
    names = _unique([_variant_name(v) for v in variants])
    compile_config = model.get_compile_config()
    models = [_make_variant(model, v, where, i) for i, v in enumerate(variants)]
    reason = _why_not_stacked(model, x, y, fit_kwargs, compile_config)
    # get_config drops `exclude_from_weight_decay`: carried over by hand.
    exclusions = _compat.weight_decay_exclusions(model.optimizer, model.weights)
    if log_dir is not None:
        log_dir = os.fspath(log_dir)
    logs = [
        _VariantLog(os.path.join(log_dir, name)) if log_dir is not None else None
        for name in names
    ]
    verbose = fit_kwargs.get("verbose", "auto")
    if reason is None:
        histories, engine = _fit_stacked(
            models, names, logs, compile_config, exclusions, x, y, fit_kwargs
        )
    else:
        logger.warning(
            "kerasreg.sweep: %s; training the %d variants one after another "
            "(K separate fits).",
            reason,
            len(models),
        )
        histories = []
        for variant, name, log in zip(models, names, logs, strict=True):
            _compile_like(variant, compile_config, exclusions)
            monitor = _Monitor([variant], [name], [log], verbose, split=None)
            callbacks = [*(fit_kwargs.get("callbacks") or []), monitor]
            kwargs = {**fit_kwargs, "callbacks": callbacks}
            variant.fit(x, y, **kwargs)
            histories.append(monitor.histories[0])
        engine = "sequential"
    for variant in models:
        variant.name = model.name
        if reason is None:
            _compile_like(variant, compile_config, exclusions)
    rows = [
        _row(name, v, _strength(v), history)
        for name, v, history in zip(names, variants, histories, strict=True)
    ]
    if log_dir is not None:
        _write_hparams(log_dir, rows)
    return SweepResult(rows, models, engine)


# --- validation ---------------------------------------------------------------


def _check_template(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            "kerasreg.sweep: invalid `model`: expected a compiled keras.Model. "
            f"Received: model={model!r} (type {type(model).__name__})."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} has no known input "
            "(a Sequential model without `keras.Input`, or a subclassed model). "
            "Build it with `keras.Input(shape)` first."
        )
    if not model.compiled or not model.get_compile_config():
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} is not compiled. "
            "Compile the template with its optimizer, loss and metrics first: "
            "every variant is compiled like it."
        )


def _check_penalties(penalties: Any, role: str) -> list[dict[str, Any]]:
    if role not in ROLES:
        raise ValueError(
            f"kerasreg.sweep: invalid `role`: expected one of {sorted(ROLES)}. "
            f"Received: role={role!r}."
        )
    if isinstance(penalties, (str, bytes, dict)) or not isinstance(penalties, Sequence):
        raise TypeError(
            "kerasreg.sweep: invalid `penalties`: expected a list of penalties "
            "(or None, or dicts {role: penalty}). Received: "
            f"penalties={penalties!r} (type {type(penalties).__name__})."
        )
    if not penalties:
        raise ValueError(
            "kerasreg.sweep: invalid `penalties`: the list is empty; give at "
            "least one penalty (None for no penalty)."
        )
    variants = []
    for index, item in enumerate(penalties):
        mapping = item if isinstance(item, dict) else {role: item}
        resolved = {}
        for key, value in mapping.items():
            if key not in ROLES:
                raise ValueError(
                    f"kerasreg.sweep: invalid `penalties[{index}]`: unknown role "
                    f"{key!r}; expected one of {sorted(ROLES)}. Received: {item!r}."
                )
            try:
                resolved[key] = get(value)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"kerasreg.sweep: invalid `penalties[{index}]`: {error}"
                ) from None
        variants.append(resolved)
    return variants


def _make_variant(model: keras.Model, penalty: dict, where: Any, index: int):
    try:
        # Unique variable paths: the torch backend keys parameters by path, and
        # one stacked model with K equal paths would zero only one variant's grads.
        with keras.name_scope(f"kerasreg_sweep_{index}"):
            variant = keras.models.clone_model(model)
    except Exception as error:  # Keras raises many types for uncloneable models
        raise ValueError(
            f"kerasreg.sweep: invalid `model`: {model.name!r} cannot be copied "
            f"with keras.models.clone_model ({type(error).__name__}: {error})."
        ) from None
    variant.set_weights(model.get_weights())
    variant.name = f"variant_{index}"
    roles = {r: (REMOVE if p is None else p) for r, p in penalty.items()}
    try:
        regularize(variant, **roles, where=where)
    except (TypeError, ValueError) as error:
        raise type(error)(f"kerasreg.sweep: penalties[{index}]: {error}") from None
    return variant


def _why_not_stacked(model, x, y, fit_kwargs, compile_config) -> str | None:
    """Why one stacked fit would not be exact or is not supported (None: it is)."""
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return "the optimizer scales the loss (one scale for all variables)"
    if getattr(optimizer, "global_clipnorm", None):
        return "the optimizer clips by global norm (one norm over all variables)"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return "the template has several inputs or outputs"
    if any(getattr(layer, "stateful", False) for layer, _ in walk_layers(model)):
        return "the template has stateful layers"
    if fit_kwargs.get("callbacks"):
        return "`callbacks` are given (in one stacked fit they would see the stack)"
    if isinstance(x, keras.utils.PyDataset) or _is_dataset(x):
        return None
    if not (_is_array(x) and _is_array(y)):
        return "`x`/`y` are not arrays, a keras.utils.PyDataset or a tf.data.Dataset"
    return None


def _is_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def _is_array(value: Any) -> bool:
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
    optimizer = keras.saving.deserialize_keras_object(compile_config["optimizer"])
    names, indices = exclusions
    if names or indices:
        optimizer.exclude_from_weight_decay(
            var_list=[m.weights[i] for m in models for i in indices] or None,
            var_names=names or None,
        )
    return optimizer


def _compile_like(variant, compile_config, exclusions):
    config = keras.saving.deserialize_keras_object(compile_config)
    config["optimizer"] = _fresh_optimizer(compile_config, exclusions, [variant])
    variant.compile(**config)


def _fit_stacked(models, names, logs, compile_config, exclusions, x, y, fit_kwargs):
    """Train the variants in one fit; returns (histories, engine name)."""
    keys = [f"v{i:04d}" for i in range(len(models))]
    sample = _sample_batch(x, y)
    for index, variant in enumerate(models):
        _compile_like(variant, compile_config, exclusions)
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
    monitor = _Monitor(models, names, logs, kwargs.get("verbose", "auto"), keys, sync)
    kwargs["callbacks"] = [monitor]
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
    if _is_dataset(x):
        spec = x.element_spec
        return not isinstance(spec, tuple) or len(spec) > 2
    return False


def _sample_batch(x, y):
    if isinstance(x, keras.utils.PyDataset):
        x, y = x[0][:2]
    elif _is_dataset(x):
        x, y = next(iter(x))[:2]
    return x[:2], y[:2]


# --- per-variant logs, histories and TensorBoard --------------------------------


class _VariantLog:
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


class _Monitor(keras.callbacks.Callback):
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


# --- names, strengths, rows, HParams --------------------------------------------


def _variant_name(variant: dict[str, Any]) -> str:
    parts = []
    for role, penalty in variant.items():
        name = "none" if penalty is None else _penalty_name(penalty)
        parts.append(name if len(variant) == 1 else f"{role}-{name}")
    return "+".join(parts)


def _penalty_name(penalty: Any) -> str:
    numbers = _numbers(penalty)
    cls = type(penalty).__name__
    if len(numbers) == 1:
        return f"{cls}_{next(iter(numbers.values())):g}"
    return "_".join([cls] + [f"{k}={v:g}" for k, v in numbers.items()])


def _numbers(penalty: Any) -> dict[str, float]:
    config = penalty.get_config() if hasattr(penalty, "get_config") else {}
    return {
        k: float(v)
        for k, v in config.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _strength(variant: dict[str, Any]) -> float:
    return float(
        sum(sum(_numbers(p).values()) for p in variant.values() if p is not None)
    )


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _row(name: str, variant: dict, strength: float, history: dict) -> dict:
    config = {
        role: None if p is None else keras.saving.serialize_keras_object(p)
        for role, p in variant.items()
    }
    row = {"penalty": name, "config": config, "strength": strength}
    row["history"] = history
    row.update({key: values[-1] for key, values in history.items() if values})
    return row


def _write_hparams(log_dir: str, rows: list[dict]) -> None:
    """The HParams experiment at `log_dir`, one session per variant run."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    penalty = hp.HParam("penalty", hp.Discrete([row["penalty"] for row in rows]))
    strength = hp.HParam("strength")
    metrics = [
        hp.Metric(
            f"epoch_{key[4:] if key.startswith('val_') else key}",
            group="validation" if key.startswith("val_") else "train",
            display_name=key,
        )
        for key in rows[0]["history"]
    ]
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams_config(hparams=[penalty, strength], metrics=metrics)
    for row in rows:
        folder = os.path.join(log_dir, row["penalty"])
        with tf.summary.create_file_writer(folder).as_default():
            hp.hparams(
                {penalty: row["penalty"], strength: row["strength"]},
                trial_id=row["penalty"],
            )
