"""`WeightNormLogger`: weight norms, penalties and the data loss in TensorBoard."""

from __future__ import annotations

import atexit
import os
import threading
import uuid
from typing import Any

import keras

from kerasreg._checks import optimizer_iterations, validate_bool
from kerasreg._compat import fit_callbacks
from kerasreg.callback_order import warn_if_logs_readers_run_first
from kerasreg.norms import STATISTICS, statistic_names, weight_norms
from kerasreg.plan import describe, weight_owners
from kerasreg.selection import Where, check_where, select_weights
from kerasreg.summaries import RunWriter, custom_scalars_layout

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
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.where = check_where(where)
        self.per_gate = per_gate
        self._writers: dict[str, Any] = {}
        self._is_writer = True
        if update_freq != "epoch":
            # Only batch mode gets a batch hook: its mere presence turns off
            # Keras's asynchronous batch dispatch.
            self.on_train_batch_end = self._log_batch

    # --- training hooks ------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
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
            n = self.update_freq
            self._next_log_step = (self._step_offset // n + 1) * n
            self._read_step(self._step_offset)
        # The keys and statistics of each log, known without measuring.
        names = statistic_names(model, self._variables, per_gate=self.per_gate)
        self._names = {
            id(v): (key, dict.fromkeys(stats, 0.0))
            for v, (key, stats) in zip(self._variables, names, strict=True)
        }
        self._keys = {i: key for i, (key, _) in self._names.items()}
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
        layout = custom_scalars_layout(groups, gates)
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
            return
        step = self._read_step(optimizer_iterations(self.model))
        if step < self._next_log_step:
            return
        self._next_log_step = (step // self.update_freq + 1) * self.update_freq
        self._log_train(step, self._measure(), logs)

    def _read_step(self, step: int) -> int:
        """Note the optimizer's count just read: the anchor of the bound."""
        self._last_read, self._calls_since_read = step, 0
        self._per_call = max(1, int(getattr(self._model, "steps_per_execution", 1)))
        return step

    def _log_train(self, step: int, norms: dict, logs: dict | None) -> None:
        self._last_train_step = step
        self._write("train", step, self._train_scalars(norms, logs, "loss"))

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
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.update_freq != "epoch":
            # The last log of a fit is at its last step.
            step = optimizer_iterations(self.model)
            if step > self._last_train_step:
                self._log_train(step, self._measure(), logs)
        for writer in self._writers.values():
            writer.flush()

    # --- measuring -----------------------------------------------------------

    def _measure(self) -> dict[str, dict[str, float]]:
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


def _regularized_weights(model: keras.Model) -> list[Any]:
    """The weights whose regularizer Keras adds to the loss: trainable ones."""
    weights = {id(v): v for v in model.trainable_weights if v.regularizer is not None}
    return list(weights.values())
