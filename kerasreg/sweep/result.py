"""`SweepResult`, the outcome of `kerasreg.sweep`: rows, models, best, tables, plot.

Its rows are made by `kerasreg.sweep.rows`, its figure drawn by
`kerasreg.sweep.figure`; the HParams experiment is `kerasreg.sweep.hparams`.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import keras
import numpy as np

from kerasreg import _compat
from kerasreg.sweep.figure import draw
from kerasreg.sweep.rows import last_epoch

# Row keys that are not metrics, in the order tables show them.
_DESCRIPTION = (
    "run",
    "penalty",
    "family",
    "seed",
    "best_epoch",
    "epochs",
    "strength",
)


class SweepResult:
    """The outcome of `kerasreg.sweep`: one row and one trained model per run.

    A run is one grid point, or with `seeds=` one grid point and one seed.

    Attributes:
        rows: list of dicts, one per run, grid point by grid point (seeds
            within a point): `"penalty"` (the grid point's readable name,
            e.g. `"L2Penalty_0.001"` or `"L2Penalty_0.001+WeightDecay_0.01"`),
            `"family"` (its kind of knob: `"none"`, `"L2Penalty"`,
            `"WeightDecay"`, `"L2Penalty+WeightDecay"`, ...), `"values"`
            (`{"L2Penalty.l2": 0.001, "WeightDecay.rate": 0.01}`),
            `"strength"` (the sum of the values; `0.0` for none), `"config"`
            (`{role: serialized penalty or None}`), `"transforms"` (their
            reprs), `"seed"` (`None` without `seeds=`), `"run"` (the
            TensorBoard run name: the point's name, `name/seed_<s>` with
            seeds), `"history"` (exactly `History.history` of a separate
            `fit`), `"epochs"` (how many epochs ran), `"best_epoch"` (the
            epoch whose weights the returned model holds, numbered as Keras
            numbers them, from 0 or `initial_epoch`: the last epoch unless a
            callback restored another), and the value of every history key
            measured at `best_epoch` (`"loss"`, `"val_loss"`, ...; a `val_*`
            key is left out where `validation_freq` skipped that epoch).
        models: the trained models, `models[i]` for `rows[i]`: standalone
            copies of the template carrying their penalties, compiled like
            the template, ready to `evaluate`, `predict` and `save`. Their
            optimizers hold each run's trained state where the engine keeps
            one per variant (`"sequential"`, and `"vectorized"` on JAX:
            `jax.vmap`); after the batched-kernel and stacked engines they
            are fresh (step 0: a further `fit` starts Adam's moments anew).
        engine: how the variants were trained: `"vectorized"` (one batched
            step for all K variants: every weight on a leading axis of K),
            `"stacked"` (K copies side by side in one `fit`), or
            `"sequential"` (K separate fits, one after another).
        engine_reason: one sentence: what ran, and why no faster engine
            could (for example `"batched kernels: Flatten, Dense"`, or
            `"K copies side by side in one fit; not batched kernels: layer
            'gru' (GRU) has no batched kernel"`).
        stacked: `True` when the variants were trained in one `fit`
            (`engine` is `"vectorized"` or `"stacked"`).
        repeated: `True` when the runs repeat grid points over seeds.

    Example:

    >>> result = kerasreg.sweep(model, [None, kerasreg.L2Penalty(1e-3)], x, y,
    ...                         validation_split=0.25, epochs=5, verbose=0)
    ...                         # doctest: +SKIP
    >>> result.best("val_loss")["penalty"]  # doctest: +SKIP
    'L2Penalty_0.001'
    """

    def __init__(
        self,
        rows: list[dict],
        models: list[keras.Model],
        engine: str,
        engine_reason: str = "",
        *,
        directions: dict[str, str] | None = None,
    ):
        self.rows = rows
        self.models = models
        self.engine = engine
        self.engine_reason = engine_reason
        self.stacked = engine != "sequential"
        self.repeated = any(row.get("seed") is not None for row in rows)
        self.directions = dict(directions or {})

    # --- choosing ------------------------------------------------------------------

    def best(self, monitor: str = "val_loss", mode: str = "auto") -> dict:
        """The best run (with repeats: the best grid point, by its mean over seeds).

        Runs are compared by their `monitor` value at their `best_epoch` (the
        weights the returned model holds). `mode="auto"` follows the metric's
        own direction, as Keras's `EarlyStopping` and `ModelCheckpoint`
        decide it: `loss`/`val_loss` are minimized, a compiled metric that
        declares a direction (accuracy, AUC, R2, cosine similarity: up; errors:
        down) follows it, and anything else raises.

        Args:
            monitor: a history key, such as `"val_loss"` or `"val_accuracy"`.
            mode: `"auto"`, `"min"` or `"max"`.

        Returns:
            Without repeats, the row (a dict of `rows`); with `seeds=`, the
            entry of `summary()` with the best mean (its `"runs"` are the
            indices of its rows).

        Raises:
            ValueError: `monitor` is not a history key, `mode` is unknown,
                `mode="auto"` and the direction of `monitor` is unknown, or no
                run has a value of `monitor` at its `best_epoch`. Runs without
                one (NaN) are not ranked.
        """
        pick = max if self._direction(monitor, mode, "best") == "max" else min
        candidates = self.summary() if self.repeated else self.rows
        scored = [c for c in candidates if not math.isnan(c.get(monitor, math.nan))]
        if not scored:
            raise ValueError(
                f"kerasreg.sweep: invalid `monitor`: no run has a value of "
                f"monitor={monitor!r} at its `best_epoch` (with `validation_freq`, "
                "validation may skip the last epoch; with NaN losses every value "
                "is NaN). Choose another `monitor`, or end training on an "
                "evaluated epoch."
            )
        return pick(scored, key=lambda c: c[monitor])

    def best_model(self, monitor: str = "val_loss", mode: str = "auto") -> keras.Model:
        """The model of the best run (with repeats: the best seed of the best point).

        Args:
            monitor: a history key, as for `best`.
            mode: `"auto"`, `"min"` or `"max"`, as for `best`.

        Returns:
            One of `models`.
        """
        best = self.best(monitor, mode)
        if not self.repeated:
            return self.models[self.rows.index(best)]
        pick = max if self._direction(monitor, mode, "best_model") == "max" else min
        value = [self.rows[i].get(monitor, math.nan) for i in range(len(self.rows))]
        runs = [i for i in best["runs"] if not math.isnan(value[i])]
        index = pick(runs or best["runs"], key=lambda i: value[i])
        return self.models[index]

    def _direction(self, monitor: str, mode: str, owner: str) -> str:
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                f"SweepResult.{owner}: invalid `mode`: expected 'auto', 'min' or "
                f"'max'. Received: mode={mode!r}."
            )
        available = self.metric_keys()
        if monitor not in available:
            raise ValueError(
                f"SweepResult.{owner}: invalid `monitor`: {monitor!r} is not in the "
                f"history. Available: {available}."
            )
        if mode != "auto":
            return mode
        name = monitor.removeprefix("val_")
        if name == "loss":
            return "min"
        direction = self.directions.get(name)
        for model in self.models:
            if direction is not None:
                break
            direction = _compat.metric_directions(model).get(name)
        if direction is None:
            raise ValueError(
                f"SweepResult.{owner} received monitor={monitor!r}, but its "
                "direction is unknown (Keras decides mode='auto' from the loss or "
                "a compiled metric that declares a direction). Pass mode='max' "
                "to pick the highest value, or mode='min' for the lowest."
            )
        return "max" if direction == "up" else "min"

    # --- tables --------------------------------------------------------------------

    def metric_keys(self) -> list[str]:
        """The history keys of the runs, in first-seen order."""
        keys: dict[str, None] = {}
        for row in self.rows:
            keys.update(dict.fromkeys(row["history"]))
        return list(keys)

    def value_keys(self) -> list[str]:
        """The knob values of the grid (`"L2Penalty.l2"`, ...), in first-seen order."""
        keys: dict[str, None] = {}
        for row in self.rows:
            keys.update(dict.fromkeys(row["values"]))
        return list(keys)

    def summary(self) -> list[dict]:
        """One entry per grid point: mean and spread of its runs over seeds.

        Each entry has the point's `"penalty"`, `"family"`, `"values"`,
        `"strength"`, `"config"` and `"transforms"`, `"seeds"` (the seeds of
        its runs; `[None]` without `seeds=`), `"runs"` (indices into `rows`
        and `models`), and for every history key `k` the mean over the runs
        of the value at each run's `best_epoch` (`k`) and its sample standard
        deviation (`k + "_std"`, with `ddof=1` as pandas' `std`; NaN for a
        single run), plus `"best_epoch"` and `"best_epoch_std"` likewise.
        """
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(self.rows):
            groups.setdefault(row["penalty"], []).append(index)
        entries = []
        for name, runs in groups.items():
            first = self.rows[runs[0]]
            entry = {
                "penalty": name,
                "family": first["family"],
                "values": dict(first["values"]),
                "strength": first["strength"],
                "config": first["config"],
                "transforms": list(first["transforms"]),
                "seeds": [self.rows[i]["seed"] for i in runs],
                "runs": runs,
            }
            for key in ["best_epoch", *self.metric_keys()]:
                numbers = np.array(
                    [self.rows[i].get(key, np.nan) for i in runs], dtype="float64"
                )
                entry[key] = float(np.mean(numbers))
                entry[f"{key}_std"] = (
                    float(np.std(numbers, ddof=1)) if len(numbers) > 1 else math.nan
                )
            entries.append(entry)
        return entries

    def table(self, summary: bool = False) -> tuple[list[str], list[list[Any]]]:
        """`(columns, records)`: the rows (or `summary()`) as a flat table.

        Columns: the run's description (`run`, `penalty`, `family`, `seed`,
        `best_epoch`, `epochs`, `strength`), one column per knob value
        (empty where a run has none), then the metrics at `best_epoch`. With
        `summary=True`: `penalty`, `family`, `runs` (their count), `strength`,
        the values, then each metric and its `_std`.
        """
        values = self.value_keys()
        metrics = self.metric_keys()
        if summary:
            columns = ["penalty", "family", "runs", "strength", *values]
            columns += ["best_epoch", "best_epoch_std"]
            for key in metrics:
                columns += [key, f"{key}_std"]
            records = []
            for entry in self.summary():
                record = [
                    entry["penalty"],
                    entry["family"],
                    len(entry["runs"]),
                    entry["strength"],
                ]
                record += [entry["values"].get(k, "") for k in values]
                record += [entry[k] for k in columns[4 + len(values) :]]
                records.append(record)
            return columns, records
        columns = [*_DESCRIPTION, *values, *metrics]
        records = []
        for row in self.rows:
            record = [row.get(k) for k in _DESCRIPTION]
            record[_DESCRIPTION.index("seed")] = (
                "" if row["seed"] is None else row["seed"]
            )
            record += [row["values"].get(k, "") for k in values]
            record += [row.get(k, "") for k in metrics]
            records.append(record)
        return columns, records

    def to_csv(self, path: str | os.PathLike, summary: bool = False) -> str:
        """Write the table (`table(summary)`) as a CSV file, with a header line.

        Needs only Python's `csv` module. Histories are not in the table:
        read them from `rows[i]["history"]` or the TensorBoard runs.

        Args:
            path: the file to write.
            summary: write `summary()` (one line per grid point) instead of
                one line per run.

        Returns:
            `path`, as a string.
        """
        columns, records = self.table(summary)
        path = os.fspath(path)
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(records)
        return path

    def to_frame(self, summary: bool = False) -> Any:
        """The table (`table(summary)`) as a `pandas.DataFrame`.

        pandas is not a kerasreg dependency: install it to use this method.

        Args:
            summary: one line per grid point (`summary()`) instead of per run.

        Returns:
            A `pandas.DataFrame` with the columns of `table`.

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas  # type: ignore[import-untyped]
        except ImportError:
            raise ImportError(
                "SweepResult.to_frame needs pandas, which kerasreg does not "
                "install: `pip install pandas`, or use SweepResult.to_csv(path) "
                "or SweepResult.table(), which need nothing else."
            ) from None
        columns, records = self.table(summary)
        return pandas.DataFrame(records, columns=columns)

    # --- the figure ----------------------------------------------------------------

    def plot(
        self,
        path: str | os.PathLike | None = None,
        metric: str | None = None,
        *,
        monitor: str | None = None,
        ax: Any = None,
    ) -> str | None:
        """Draw the validation curve: `metric` against each knob's value, log x axis.

        One line per family (kind of knob): validation values solid, training
        values dotted, at each run's `best_epoch`; a family whose points
        vary in two knobs (L2 strength x decay rate) gets one line per value
        of the second. With repeats, each line is the mean over seeds with a
        band of one standard deviation. A grid point without a knob value
        (no penalty) is a dashed horizontal line. The best run (by
        `monitor`) is marked with a star. Writes a PNG file, or draws on the
        matplotlib axes `ax`.

        matplotlib is not a kerasreg dependency: install it
        (`pip install matplotlib`, or the `kerasreg[examples]` extra) to use
        this method.

        Args:
            path: the PNG file to write (optional when `ax` is given).
            metric: a training history key; default: the first compiled
                metric (such as `"accuracy"`), else `"loss"`.
            monitor: the key that picks the best (as `best` does); default
                `"val_" + metric` when validation ran, else `metric`.
            ax: optional matplotlib `Axes` to draw on (a figure of yours).

        Returns:
            `path`, as a string (None when only `ax` was drawn on).

        Raises:
            ImportError: matplotlib is not installed.
        """
        if path is None and ax is None:
            raise ValueError(
                "SweepResult.plot: give `path` (a PNG file to write) or `ax` "
                "(matplotlib axes to draw on). Received neither."
            )
        try:
            import matplotlib
        except ImportError:
            raise ImportError(
                "SweepResult.plot needs matplotlib, which kerasreg does not "
                "install: `pip install matplotlib` (or `pip install "
                "kerasreg[examples]`), or use SweepResult.summary() or "
                "SweepResult.to_csv(path), which need nothing else."
            ) from None

        if matplotlib.get_backend().lower() not in (
            "agg",
            "module://matplotlib_inline.backend_inline",
        ):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = self.metric_keys()
        train_keys = [k for k in keys if not k.startswith("val_")]
        if metric is None:
            metric = next((k for k in train_keys if k != "loss"), "loss")
        if metric not in train_keys:
            raise ValueError(
                f"SweepResult.plot: invalid `metric`: {metric!r} is not a training "
                f"history key. Available: {train_keys}."
            )
        own = ax is None
        if own:
            _, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        draw(self, ax, metric, monitor)
        if path is None:
            return None
        path = os.fspath(path)
        ax.figure.savefig(path, dpi=110)
        if own:
            plt.close(ax.figure)
        return path

    # --- text ----------------------------------------------------------------------

    def __str__(self) -> str:
        # Keys every run has (a transform's own logs key is left to the CSV).
        history = [
            k for k in self.metric_keys() if all(k in r["history"] for r in self.rows)
        ]
        train = [k for k in history if not k.startswith("val_")]
        keys = sorted(train, key=lambda k: k != "loss")
        keys += sorted(
            set(history) - set(train), key=lambda k: (k != "val_loss", history.index(k))
        )
        restored = any(r["best_epoch"] != last_epoch(r["history"]) for r in self.rows)
        if self.repeated:
            entries = self.summary()
            width = max(len("penalty"), *(len(e["penalty"]) for e in entries))
            header = f"{'penalty':<{width}} {'runs':>4} " + " ".join(
                f"{k:>19}" for k in keys
            )
            lines = [header]
            for e in entries:
                cells = " ".join(f"{e[k]:>9.4g} +- {e[f'{k}_std']:<6.2g}" for k in keys)
                lines.append(f"{e['penalty']:<{width}} {len(e['runs']):>4} {cells}")
            return "\n".join(lines)
        width = max(len("penalty"), *(len(row["penalty"]) for row in self.rows))
        epoch = f" {'best_epoch':>10}" if restored else ""
        header = f"{'penalty':<{width}}{epoch} " + " ".join(f"{k:>12}" for k in keys)
        lines = [header]
        for row in self.rows:
            values = " ".join(f"{row.get(k, math.nan):>12.5g}" for k in keys)
            at = f" {row['best_epoch']:>10}" if restored else ""
            lines.append(f"{row['penalty']:<{width}}{at} {values}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        names = ", ".join(row["run"] for row in self.rows)
        return f"<SweepResult of {len(self.rows)} runs: {names}>"
