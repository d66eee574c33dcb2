"""`WeightNormLogger`: weight norms, penalties and the data loss in TensorBoard."""

from __future__ import annotations

import atexit
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from kerasreg import _compat
from kerasreg._checks import optimizer_iterations, validate_bool
from kerasreg._compat import fit_callbacks
from kerasreg.callback_order import warn_if_logs_readers_run_first
from kerasreg.gradient_capture import GradientCapture
from kerasreg.gradient_stats import read_statistics
from kerasreg.gradients import data_batches, program_for
from kerasreg.norms import STATISTICS, statistic_names, weight_norms
from kerasreg.plan import describe, weight_owners
from kerasreg.selection import Where, check_where, select_weights, weight_paths
from kerasreg.summaries import RunWriter, custom_scalars_layout
from kerasreg.train_step_fold import TrainStepFold

# `logs` keys written at each epoch end.
LOGS_KEYS = ("data_loss", "val_data_loss", "penalty")
PLAN_TAG = "regularization/plan"

# TensorBoard section (tag prefix) of each statistic of `weight_norms`.
SECTIONS = {
    "l1": "norm_l1",
    "l2": "norm_l2",
    "linf": "norm_linf",
    "zero_fraction": "zero_fraction",
}

# TensorBoard section (tag prefix) of each gradient statistic (`gradients=True`).
GRADIENT_SECTIONS = {
    "data": "grad_data",
    "penalty": "grad_penalty",
    "total": "grad_total",
    "penalty_share": "penalty_share",
    "cosine": "grad_cosine",
    "update_ratio": "update_ratio",
}


class WeightNormLogger(keras.callbacks.Callback):
    """Log weight norms, weight penalties and the data loss to TensorBoard.

    Writes scalar summaries into `log_dir/train` and `log_dir/validation`, the
    run folders `keras.callbacks.TensorBoard(log_dir)` uses, so one TensorBoard
    run shows Keras's curves and these side by side. Tags are grouped by
    statistic, one TensorBoard section each, and named by the weight's path
    (`kerasreg.selection.weight_paths`: the same before and after a save/load
    round trip, so a reloaded model continues the same series):

    - `norm_l1/<path>`, `norm_l2/<path>`, `norm_linf/<path>`,
      `zero_fraction/<path>` for each weight `where` selects (see
      `kerasreg.weight_norms` for the definitions); with `per_gate=True`, also
      `norm_l2/<path>/gate_i` etc. for LSTM (`i, f, c, o`) and GRU
      (`z, r, h`) weights.
    - `penalty/<path>` for every trainable weight with a regularizer, whatever
      `where` says: an LSTM's `.../lstm_cell/kernel` (input) and
      `.../lstm_cell/recurrent_kernel` (recurrent) are separate series, as are
      both directions of a `Bidirectional` layer.
    - `penalty/total`: the sum of those, which is exactly the weight
      regularization term Keras adds to the loss.
    - `loss/data`: the reported loss minus `penalty/total`.
    - `loss/total`: the reported loss itself, so one custom-scalars chart can
      hold `loss/data`, `penalty/total` and `loss/total`.

    With `gradients=True`, also how hard each penalty pulls, for each weight
    `where` selects that the optimizer trains (see `kerasreg.gradient_norms`
    for the statistics):

    - `grad_data/<path>`, `grad_penalty/<path>`, `grad_total/<path>`,
      `penalty_share/<path>`, `grad_cosine/<path>` in `train`, from the
      training batch of the logged step: `grad_total` is the gradient the
      optimizer applied (unscaled by a `LossScaleOptimizer`, the window's
      mean under gradient accumulation, before clipping), `grad_penalty` the
      gradient of the weight's own regularizer at the weights before the
      step and `grad_data` the difference (so it includes the gradient of any
      activity regularizer or `add_loss` term); and `update_ratio/<path>`,
      `||w_after - w_before|| / ||w_before||` over that step (the optimizer's
      update and any transform folded into the step, such as `WeightDecay`).
      Taken inside the compiled train step, with no extra pass over the data:
      only the steps that are logged compute them (with
      `steps_per_execution=k`, every step of an execution that ends with a
      log, or, when the number of steps per epoch is unknown, every step).
      Nothing is written for a logged step that applied no update (a
      loss-scaled step with non-finite gradients, an accumulation batch).
    - with validation data, the same (without `update_ratio`) in `validation`
      at each epoch end: the gradient of the compiled loss over the validation
      data (one extra forward and backward pass over it, in inference mode)
      against the penalty gradient.

    `gradients=True` refuses a `tf.distribute` strategy with more than one
    replica (inside the step each replica holds only its own gradient) and
    JAX models run as Flax NNX modules, at `on_train_begin`.

    `loss/data` and `penalty/total` are written to `train` (from `logs["loss"]`)
    and, when `fit` has validation data, to `validation` (from
    `logs["val_loss"]`). Keras reports `val_loss` from an evaluation at epoch
    end with fixed weights, so the validation `loss/data` is exactly the
    validation data loss (the compiled loss, plus any activity-regularizer or
    `add_loss` terms, which are not weight penalties). Keras's training `loss`
    is instead the mean over the epoch's batches of the loss at the weights
    before each step, while `penalty/total` is measured after the last step:
    the training `loss/data` is the epoch's mean data loss plus (mean penalty
    over the epoch's steps - penalty at epoch end). It is exact when the
    penalty does not change during the epoch and otherwise off by that
    difference, which is small when the penalty moves slowly.

    Dashboards: once per run folder (again only if it changes), a
    `custom_scalars` layout (see `custom_scalars_layout`): one chart per layer
    with its weights' penalties together (an LSTM's input and recurrent
    kernel; both directions of a `Bidirectional`), one chart of the loss
    terms, and with `per_gate=True` one chart of per-gate L2 norms per gated
    weight; each chart's regex matches exactly the tags written. At the start
    of each `fit`, the text summary `regularization/plan`: the markdown table
    of `kerasreg.describe(model, callbacks)`, with the callbacks of that `fit`.

    `logs` keys: at each epoch end the logger adds `logs["penalty"]`
    (`penalty/total`), `logs["data_loss"]` (`loss - penalty`) and, with
    validation data, `logs["val_data_loss"]` (`val_loss - penalty`), so
    `History`, `CSVLogger`, Keras's `TensorBoard` and
    `EarlyStopping(monitor="val_data_loss", mode="min")` see them. Those
    callbacks must come after the logger in `callbacks` (Keras calls them in
    list order); the logger warns once at `on_train_begin` when it sees one
    before it.

    Steps: with `update_freq="epoch"` everything is logged once per epoch at
    step `epoch`, as Keras's TensorBoard callback logs its `epoch_*` tags. This
    mode defines no per-batch hook, so Keras keeps dispatching batches
    asynchronously. With `update_freq=N`, the step is the optimizer's own
    count, `optimizer.iterations`, never rebuilt from Keras's `batch`
    argument (it is read from the device only where a log may be due: a
    batch hook call covers at most `steps_per_execution` updates, so before
    that bound reaches the next multiple of `N` nothing is read; with one
    update per batch, one read per `N` batches). The training scalars are
    logged at the first batch end at or past each multiple of `N` (with
    `steps_per_execution=k` Keras calls the hook once per `k` steps, so a log
    may land past the multiple, never beyond the optimizer) and at the end of
    each `fit` at its last step; steps increase strictly across `fit` calls.
    `loss` is then Keras's running mean over the epoch so far. Validation
    scalars are logged at each epoch end at the optimizer's step.

    In a multi-worker job every worker measures but only the chief writes
    (TensorFlow's `should_save_summary`, JAX process 0, torch rank 0), so
    give the logger to every worker with the same `log_dir`.

    Each run folder gets one event file per process, kept open across `fit`
    calls (and flushed at every epoch end and at the end of `fit`), so the
    scalars of consecutive fits follow each other in one file in step order.
    Writes are wrapped in `tf.summary.record_if(True)` on this callback's own
    writers, so a `keras.callbacks.TensorBoard(update_freq=N)` in the same
    `fit` (which leaves a `record_if` condition active) cannot swallow them
    (TensorFlow issue 49109). TensorFlow is used only to write the summaries:
    the statistics are computed by `kerasreg.weight_norms` on the active
    backend (TensorFlow, JAX or PyTorch), in one device pass per log.

    Args:
        log_dir: str or path-like, default `"logs"`. The TensorBoard run
            folder; created if needed. An unwritable folder raises `OSError`
            at `on_train_begin`, before the first training step.
        update_freq: `"epoch"` (default) or an int `N >= 1`: log every `N`
            training batches.
        where: which weights get norm statistics, as everywhere in kerasreg:
            `None` (trainable weights with `ndim >= 2`), a regular expression
            searched in the weight's path (`weight_paths`), a callable `variable -> bool`, or an
            iterable of layers and/or variables. Checked here; checked against
            the model at `on_train_begin`.
        per_gate: bool, default `False`. Also log per-gate norms of LSTM and
            GRU weights.
        gradients: bool, default `False`. Also log the gradient statistics
            above (data and penalty gradient norms, penalty share, cosine,
            update ratio), at the same steps as the norms.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, kernel_regularizer=kerasreg.L2Penalty(1e-3)),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.random.rand(64, 4), np.random.rand(64, 1)
    >>> model.fit(x, y, validation_split=0.25, epochs=2, verbose=0, callbacks=[
    ...     keras.callbacks.TensorBoard("logs/run1"),
    ...     WeightNormLogger("logs/run1"),
    ... ])  # doctest: +SKIP
    """

    def __init__(
        self,
        log_dir: str | os.PathLike = "logs",
        update_freq: str | int = "epoch",
        where: Where = None,
        per_gate: bool = False,
        gradients: bool = False,
    ):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise TypeError(
                "WeightNormLogger: invalid `log_dir`: expected a non-empty str "
                f"or path-like. Received: log_dir={log_dir!r} "
                f"(type {type(log_dir).__name__})."
            )
        if update_freq != "epoch" and (
            isinstance(update_freq, bool)
            or not isinstance(update_freq, int)
            or update_freq < 1
        ):
            raise ValueError(
                "WeightNormLogger: invalid `update_freq`: expected 'epoch' or "
                f"an int >= 1 (log every N batches). Received: "
                f"update_freq={update_freq!r}."
            )
        per_gate = validate_bool(per_gate, "per_gate", "WeightNormLogger")
        gradients = validate_bool(gradients, "gradients", "WeightNormLogger")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.where = check_where(where)
        self.per_gate = per_gate
        self.gradients = gradients
        self._capture: GradientCapture | None = None
        self._validation: tuple[Any, ...] | None = None
        self._writers: dict[str, Any] = {}
        self._is_writer = True
        if update_freq != "epoch":
            # Only batch mode gets a batch hook: its mere presence turns off
            # Keras's asynchronous batch dispatch.
            self.on_train_batch_end = self._log_batch

    # --- training hooks ------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        if self.gradients:
            check_gradients_supported(model)
        warn_if_logs_readers_run_first(self, LOGS_KEYS)
        self._norm_variables = select_weights(model, self.where)
        norm_ids = {id(v) for v in self._norm_variables}
        self._penalty_variables = _regularized_weights(model)
        penalty_ids = {id(v) for v in self._penalty_variables}
        # One list, one device pass: selected weights plus regularized ones.
        self._variables = [
            v for v in model.weights if id(v) in norm_ids or id(v) in penalty_ids
        ]
        self._variables = list({id(v): v for v in self._variables}.values())
        self._train_dir = os.path.join(self.log_dir, "train")
        self._validation_dir = os.path.join(self.log_dir, "validation")
        self._is_writer = writes_summaries(model)
        if self._is_writer:
            self._check_writable(self._train_dir)
            self._check_writable(self._validation_dir)
        self._writers = {}
        self._step_offset = optimizer_iterations(model)
        self._last_train_step = self._step_offset
        if self.update_freq != "epoch":
            n: int = self.update_freq  # type: ignore[assignment]  # not "epoch": an int
            self._next_log_step = (self._step_offset // n + 1) * n
            self._read_step(self._step_offset)
        # The keys and statistics of each log, known without measuring.
        names = statistic_names(model, self._variables, per_gate=self.per_gate)
        self._names = {
            id(v): (key, dict.fromkeys(stats, 0.0))
            for v, (key, stats) in zip(self._variables, names, strict=True)
        }
        self._keys = {i: key for i, (key, _) in self._names.items()}
        if self.gradients:
            self._start_gradients(model)
        if self._is_writer:
            self._write_plan_and_layout(model)

    def _write_plan_and_layout(self, model: keras.Model) -> None:
        # The tags of one log, from the statistics a measurement returns: the
        # layout's regexes then match exactly the tags written.
        tags = list(self._train_scalars(self._names, {"loss": 0.0}, "loss"))
        owners = weight_owners(model)
        groups: dict[str, list[str]] = {}
        for variable in self._penalty_variables:
            key = self._keys[id(variable)]
            group = owners.get(id(variable), (None, key.rsplit("/", 1)[0]))[1]
            groups.setdefault(group, []).append(f"penalty/{key}")
        gates: dict[str, list[str]] = {}
        for tag in tags:
            if tag.startswith("norm_l2/") and "/gate_" in tag:
                gates.setdefault(tag[len("norm_l2/") :].rsplit("/", 1)[0], []).append(
                    tag
                )
        layout = custom_scalars_layout(groups, gates, self._gradient_layout(owners))
        callbacks = fit_callbacks(self)
        plan = describe(model, callbacks)
        writer = self._writers["train"] = run_writer(self._train_dir)
        writer.write_layout(layout)
        writer.write_text(PLAN_TAG, plan, self._step_offset)

    def _log_batch(self, batch: int, logs: dict | None = None) -> None:
        # The step is the optimizer's own count, never rebuilt from `batch`:
        # with `steps_per_execution=k` Keras calls this hook once per k steps.
        # A call covers at most k updates, so until that bound reaches the
        # next log step no log can be due: the count is not read (a device
        # read per batch costs ~1% of a step).
        self._calls_since_read += 1
        bound = self._last_read + self._calls_since_read * self._per_call
        if bound < self._next_log_step:
            self._seen_step = bound  # an upper bound: gradients measure early
            return
        step = self._read_step(optimizer_iterations(self.model))
        self._seen_step = step
        if step < self._next_log_step:
            return
        n: int = self.update_freq  # type: ignore[assignment]  # batch mode: an int
        self._next_log_step = (step // n + 1) * n
        self._log_train(step, self._measure(), logs)

    def _read_step(self, step: int) -> int:
        """Note the optimizer's count just read: the anchor of the bound."""
        self._last_read, self._calls_since_read = step, 0
        self._per_call = max(1, int(getattr(self._model, "steps_per_execution", 1)))
        return step

    def _log_train(self, step: int, norms: dict, logs: dict | None) -> None:
        self._last_train_step = step
        scalars = self._train_scalars(norms, logs, "loss")
        if self._capture is not None:
            scalars.update(self._training_gradient_scalars(step))
        self._write("train", step, scalars)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self._capture is not None:
            self._capture.calls = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        batch_mode = self.update_freq != "epoch"
        step = (
            self._read_step(optimizer_iterations(self.model)) if batch_mode else epoch
        )
        norms = self._measure()
        total = self._total_penalty(norms)
        if logs is not None:
            # Seen by the callbacks after this one (History, CSVLogger, ...).
            logs["penalty"] = total
            if "loss" in logs:
                logs["data_loss"] = float(logs["loss"]) - total
            if "val_loss" in logs:
                logs["val_data_loss"] = float(logs["val_loss"]) - total
        logs = logs or {}
        if not batch_mode:
            self._log_train(step, norms, logs)
        if "val_loss" in logs:
            scalars = {"penalty/total": total}
            scalars["loss/data"] = float(logs["val_loss"]) - total
            scalars["loss/total"] = float(logs["val_loss"])
            self._write("validation", step, scalars)
        if self._capture is not None and self._validation is not None:
            self._write("validation", step, self._validation_gradient_scalars())
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.update_freq != "epoch":
            # The last log of a fit is at its last step.
            step = optimizer_iterations(self.model)
            if step > self._last_train_step:
                self._log_train(step, self._measure(), logs)
        if self._capture is not None:
            TrainStepFold.remove(self._model)
            _compat.forget_fit_validation(self._model)
        for writer in self._writers.values():
            writer.flush()

    # --- gradients (`gradients=True`) -----------------------------------------

    def _start_gradients(self, model: keras.Model) -> None:
        trainable = {id(v) for v in model.trainable_variables}
        variables = [v for v in self._norm_variables if id(v) in trainable]
        if not variables:
            raise ValueError(
                "WeightNormLogger(gradients=True): `where` selects no weight the "
                "optimizer trains, so there is no gradient to log. Select "
                "trainable weights, or pass gradients=False."
            )
        capture = self._capture
        if (
            capture is None
            or [id(v) for v in capture.variables] != [id(v) for v in variables]
            or capture.optimizer is not model.optimizer
        ):
            capture = GradientCapture(model, variables)
        paths = weight_paths(model)
        self._gradient_keys = [paths.get(id(v), v.path) for v in variables]
        self._gradient_variables = variables
        self._seen_step = self._step_offset
        self._epoch = 0
        steps = (self.params or {}).get("steps")
        per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        self._executions = -(-int(steps) // per_execution) if steps else None
        self._per_execution = per_execution
        capture.calls = 0
        capture.latest = None
        capture.decide = self._measure_execution
        self._capture = capture
        self._validation = None
        TrainStepFold.add(model, capture)
        _compat.record_fit_validation(model, self._record_validation)

    def _measure_execution(self, call: int) -> bool:
        """Whether the train function's call number `call` of this epoch (one
        execution) must measure gradients: it may end with a log."""
        last_of_epoch = self._executions is None or call >= self._executions - 1
        if self.update_freq == "epoch":
            return last_of_epoch
        epochs = (self.params or {}).get("epochs")
        if last_of_epoch and (epochs is None or self._epoch >= epochs - 1):
            return True  # possibly the last step of the fit, which is logged
        # At most `steps_per_execution` updates per call.
        return self._seen_step + self._per_execution >= self._next_log_step

    def _training_gradient_scalars(self, step: int) -> dict[str, float]:
        """The statistics of the training step logged at `step`, if it was
        measured and applied an update (else none)."""
        assert self._capture is not None  # gradients=True made it
        latest = self._capture.latest
        if latest is None:
            return {}
        vector, update = (ops.convert_to_numpy(x) for x in latest)
        if self.update_freq == "epoch":
            step = optimizer_iterations(self.model)
        if vector[-1] < 0.5 or int(update) != step:
            return {}
        stats = read_statistics(vector[:-1], self._gradient_keys, update=True)
        return gradient_scalars(stats)

    def _record_validation(self, x, y, sample_weight, batch_size, steps) -> None:
        self._validation = (x, y, sample_weight, batch_size, steps)

    def _validation_gradient_scalars(self) -> dict[str, float]:
        assert self._validation is not None  # recorded by this fit's evaluation
        x, y, sample_weight, batch_size, steps = self._validation
        self._validation = None
        if isinstance(x, Iterator):
            # A generator is consumed by the evaluation itself.
            warnings.warn(
                "WeightNormLogger(gradients=True) logs no validation gradients: "
                f"the validation data is a one-pass iterator ({type(x).__name__}) "
                "that fit's own evaluation has consumed. Pass arrays, a "
                "tf.data.Dataset or a keras.utils.PyDataset.",
                stacklevel=2,
            )
            return {}
        owner = "WeightNormLogger"
        program = program_for(self.model, self._gradient_variables, False, owner)
        batches = data_batches(x, y, sample_weight, batch_size, steps, owner=owner)
        stats = program.run(batches)
        return gradient_scalars(
            {self._gradient_keys[i]: s for i, s in enumerate(stats.values())}
        )

    def _gradient_layout(self, owners: dict) -> dict[str, dict[str, list[str]]]:
        """Custom-scalars charts of the gradient statistics: one per layer."""
        if self._capture is None:
            return {}
        groups: dict[str, list[str]] = {}
        for variable, key in zip(
            self._gradient_variables, self._gradient_keys, strict=True
        ):
            group = owners.get(id(variable), (None, key.rsplit("/", 1)[0]))[1]
            groups.setdefault(group, []).append(key)
        charts = {
            "regularization: gradient norms per layer": (
                "gradient",
                ("data", "penalty"),
            ),
            "regularization: penalty share per layer": (
                "penalty share",
                ("penalty_share",),
            ),
            "regularization: gradient cosine per layer": ("cosine", ("cosine",)),
            "regularization: update ratio per layer": (
                "update ratio",
                ("update_ratio",),
            ),
        }
        return {
            category: {
                f"{title} {group}": [
                    f"{GRADIENT_SECTIONS[stat]}/{key}" for key in keys for stat in stats
                ]
                for group, keys in groups.items()
            }
            for category, (title, stats) in charts.items()
        }

    def describe_logging(self) -> str | None:
        """When gradient statistics are logged, for `kerasreg.describe`."""
        if not self.gradients:
            return None
        if self.update_freq == "epoch":
            when = "at each epoch's last update"
        else:
            when = (
                "every update"
                if self.update_freq == 1
                else f"every {self.update_freq} updates"
            )
        return (
            f"gradient statistics {when} (training batch) and at each epoch end "
            "on the validation data, if any"
        )

    # --- measuring -----------------------------------------------------------

    def _measure(self) -> dict[int, tuple[str, dict[str, float]]]:
        # `self.model` (not `_model`): on JAX it syncs the trainer's state.
        norms = weight_norms(self.model, self._variables, per_gate=self.per_gate)
        # Keys follow `self._variables`: model order, repeated paths suffixed.
        return {
            id(v): item for v, item in zip(self._variables, norms.items(), strict=True)
        }

    def _total_penalty(self, norms: dict) -> float:
        return sum(norms[id(v)][1]["penalty"] for v in self._penalty_variables)

    def _train_scalars(self, norms: dict, logs: dict | None, loss_key: str) -> dict:
        scalars: dict[str, float] = {}
        for variable in self._norm_variables:
            key, stats = norms[id(variable)]
            for stat in STATISTICS:
                scalars[f"{SECTIONS[stat]}/{key}"] = stats[stat]
            for name, value in stats.items():
                if "/gate_" in name:
                    stat, gate = name.split("/")
                    scalars[f"{SECTIONS[stat]}/{key}/{gate}"] = value
        for variable in self._penalty_variables:
            key, stats = norms[id(variable)]
            scalars[f"penalty/{key}"] = stats["penalty"]
        total = self._total_penalty(norms)
        scalars["penalty/total"] = total
        if logs and loss_key in logs:
            scalars["loss/data"] = float(logs[loss_key]) - total
            scalars["loss/total"] = float(logs[loss_key])
        return scalars

    # --- writing -------------------------------------------------------------

    def _write(self, run: str, step: int, scalars: dict[str, float]) -> None:
        if not self._is_writer:
            return
        folder = self._train_dir if run == "train" else self._validation_dir
        # Looked up on every write: a writer closed meanwhile (its file
        # removed, or evicted by logs to many other folders) is reopened.
        writer = self._writers[run] = run_writer(folder)
        writer.write(step, scalars)

    def _check_writable(self, folder: str) -> None:
        import tensorflow as tf

        probe = os.path.join(folder, f".kerasreg-write-test-{uuid.uuid4().hex}")
        try:
            tf.io.gfile.makedirs(folder)
            with tf.io.gfile.GFile(probe, "w") as handle:
                handle.write("")
            tf.io.gfile.remove(probe)
        except (OSError, tf.errors.OpError) as error:
            reason = getattr(error, "message", None) or str(error)
            raise OSError(
                f"WeightNormLogger: cannot write TensorBoard logs to "
                f"log_dir={self.log_dir!r}: the folder {folder!r} cannot be "
                f"created or written ({reason}). Pass a writable `log_dir`."
            ) from None


_RUN_WRITERS: dict[str, RunWriter] = {}  # least recently used first
_RUN_WRITERS_LOCK = threading.Lock()
# Open files are bounded: a sweep over hundreds of log dirs must not run out
# of file handles. The least recently used writer beyond this is closed.
MAX_OPEN_RUN_WRITERS = 32


def run_writer(folder: str) -> RunWriter:
    """The process's `RunWriter` for `folder`, opened again if its file is gone."""
    key = folder if "://" in folder else os.path.realpath(folder)
    with _RUN_WRITERS_LOCK:
        writer = _RUN_WRITERS.pop(key, None)
        if writer is not None and not writer.alive():
            writer.close()
            writer = None
        if writer is None:
            writer = RunWriter(folder)
        _RUN_WRITERS[key] = writer
        while len(_RUN_WRITERS) > MAX_OPEN_RUN_WRITERS:
            _RUN_WRITERS.pop(next(iter(_RUN_WRITERS))).close()
        return writer


@atexit.register
def _close_run_writers() -> None:
    with _RUN_WRITERS_LOCK:
        for writer in _RUN_WRITERS.values():
            writer.close()
        _RUN_WRITERS.clear()


def writes_summaries(model: keras.Model) -> bool:
    """True in the one process of a multi-worker job that writes the summaries.

    Every worker measures (on JAX the measurement is an SPMD computation every
    process must run); only the chief writes: TensorFlow's
    `strategy.extended.should_save_summary` (False on non-chief workers of
    `MultiWorkerMirroredStrategy`), JAX process 0, `torch.distributed` rank 0.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        extended = getattr(strategy, "extended", None)
        return bool(getattr(extended, "should_save_summary", True))
    if backend == "jax":
        import jax

        return jax.process_index() == 0
    if backend == "torch":
        import torch.distributed as dist

        return (
            not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        )
    return True


def check_gradients_supported(model: keras.Model) -> None:
    """Raise when `WeightNormLogger(gradients=True)` cannot measure `model`'s
    applied gradient exactly (before anything changes)."""
    owner = "WeightNormLogger(gradients=True)"
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"{owner} needs a model compiled with an optimizer.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        replicas = int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
        if replicas > 1:
            raise ValueError(
                f"{owner} does not support tf.distribute strategies with more than "
                f"one replica (this model trains under {type(strategy).__name__} "
                f"with {replicas} replicas): inside the train step each replica "
                "holds only its own gradient, and kerasreg does not log per-replica "
                "values as the global gradient. Use gradients=False, or call "
                "kerasreg.gradient_norms(model, x, y) on the data between fits."
            )
    if backend == "jax" and _compat.nnx_enabled():
        raise ValueError(
            f"{owner} does not support JAX models run as Flax NNX modules (NNX "
            "trainers call the class's train_step, so the gradient cannot be "
            "taken in the step). Use gradients=False."
        )


def gradient_scalars(statistics: dict[str, dict[str, float]]) -> dict[str, float]:
    """TensorBoard scalars of gradient statistics: `{"grad_data/<path>": ...}`.

    `statistics` is what `kerasreg.gradient_norms` returns (or the logger's
    per-step reading, which adds `update_ratio`); each statistic goes to its
    `GRADIENT_SECTIONS` section. Write them with
    `run_writer(folder).write(step, scalars)`.
    """
    return {
        f"{GRADIENT_SECTIONS[name]}/{key}": value
        for key, stats in statistics.items()
        for name, value in stats.items()
        if name in GRADIENT_SECTIONS
    }


def write_gradient_statistics(
    folder: str, step: int, statistics: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Write one reading of gradient statistics to the TensorBoard run `folder`.

    The seam for writers other than `WeightNormLogger` (such as one run per
    sweep variant): `statistics` is what `kerasreg.gradient_norms` returns for
    one model, `{path: {"data", "penalty", "total", "penalty_share",
    "cosine"}}` (`"update_ratio"` too, if known); each value is written at
    `step` under the tags `WeightNormLogger(gradients=True)` uses
    (`grad_data/<path>`, ...), so its custom-scalars charts show them.
    Statistics of other names are refused, not dropped.

    Args:
        folder: the run's folder (`<log_dir>/<variant>/validation`, say).
        step: the step to write at, an int >= 0.
        statistics: `{path: {statistic name: float}}`.

    Returns:
        The scalars written, `{tag: value}`.

    Raises:
        ValueError: a statistic name or value that is not accepted; nothing is
            written then.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            "write_gradient_statistics: invalid `step`: expected an int >= 0. "
            f"Received: step={step!r}."
        )
    if not isinstance(statistics, dict) or not all(
        isinstance(key, str) and isinstance(stats, dict)
        for key, stats in statistics.items()
    ):
        raise ValueError(
            "write_gradient_statistics: invalid `statistics`: expected "
            "{path: {statistic name: float}}, as gradient_norms returns. "
            f"Received: statistics={statistics!r}."
        )
    for key, stats in statistics.items():
        for name, value in stats.items():
            if name not in GRADIENT_SECTIONS:
                raise ValueError(
                    "write_gradient_statistics: invalid `statistics`: unknown "
                    f"statistic {name!r} for {key!r}. Accepted: "
                    f"{sorted(GRADIENT_SECTIONS)}."
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    "write_gradient_statistics: invalid `statistics`: "
                    f"{key!r}/{name!r} is {value!r}; expected a float."
                )
    scalars = {tag: float(v) for tag, v in gradient_scalars(statistics).items()}
    if scalars:
        writer = run_writer(os.fspath(folder))
        writer.write(step, scalars)
        writer.flush()
    return scalars


def _regularized_weights(model: keras.Model) -> list[Any]:
    """The weights whose regularizer Keras adds to the loss: trainable ones."""
    weights = {id(v): v for v in model.trainable_weights if v.regularizer is not None}
    return list(weights.values())
