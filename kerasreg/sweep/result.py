"""`SweepResult`, the outcome of `kerasreg.sweep`: rows, models, best, plot, HParams.

Also how a variant is named (`L2Penalty_0.001`), its strength (the sum of its
penalties' numeric arguments), and the HParams experiment written next to
the variants' TensorBoard runs.
"""

from __future__ import annotations

import os
from typing import Any

import keras

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
    ):
        self.rows = rows
        self.models = models
        self.engine = engine
        self.engine_reason = engine_reason
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


# --- names, strengths, rows, HParams --------------------------------------------


def variant_name(variant: dict[str, Any]) -> str:
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


def strength(variant: dict[str, Any]) -> float:
    return float(
        sum(sum(_numbers(p).values()) for p in variant.values() if p is not None)
    )


def unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def make_row(name: str, variant: dict, strength: float, history: dict) -> dict:
    config = {
        role: None if p is None else keras.saving.serialize_keras_object(p)
        for role, p in variant.items()
    }
    row = {"penalty": name, "config": config, "strength": strength}
    row["history"] = history
    row.update({key: values[-1] for key, values in history.items() if values})
    return row


def write_hparams(log_dir: str, rows: list[dict]) -> None:
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
