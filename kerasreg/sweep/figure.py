"""The validation curve of a sweep: one line per family of knob, the best marked.

Drawn from a `SweepResult`'s `summary()` (means over seeds, their spread) on
matplotlib axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def draw(result: Any, ax: Any, metric: str, monitor: str | None) -> None:
    """Draw `result`'s `metric` (and `val_<metric>`) per family on `ax`."""
    import matplotlib.pyplot as plt

    keys = result.metric_keys()
    validated = f"val_{metric}" in keys
    series = [(metric, ":" if validated else "-", "o")]
    if validated:
        series.insert(0, (f"val_{metric}", "-", "s"))
    if monitor is None:
        monitor = series[0][0]
    entries = result.summary()
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 8)
    x_keys: set[str] = set()
    lines = list(lines_of(entries))
    for label, points, x_key in lines:
        color = next(colors)
        for key, style, marker in series:
            means = np.array([p[key] for p in points])
            spread = np.array([p[f"{key}_std"] for p in points])
            line_label = label if key == series[0][0] else None
            if x_key is None:
                dashes = "--" if key == series[0][0] else ":"
                ax.axhline(means[0], color=color, ls=dashes, lw=1, label=line_label)
                continue
            x_keys.add(x_key)
            x = [p["values"][x_key] for p in points]
            ax.plot(x, means, style, marker=marker, color=color, label=line_label)
            if key == series[0][0] and not np.all(np.isnan(spread)):
                ax.fill_between(
                    x, means - spread, means + spread, color=color, alpha=0.15
                )
    _mark_best(result, ax, lines, monitor)
    if x_keys and all(
        p["values"][k] > 0 for k in x_keys for p in entries if k in p["values"]
    ):
        ax.set_xscale("log")
    names = sorted({k.rsplit(".", 1)[-1] for k in x_keys})
    ax.set_xlabel(f"knob value ({', '.join(names)})" if names else "grid point")
    described = "validation: solid, train: dotted" if validated else "train"
    ax.set_ylabel(f"{metric} ({described})")
    if result.repeated:
        ax.set_title("mean over seeds, band: one standard deviation", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _mark_best(result: Any, ax: Any, lines: list, monitor: str) -> None:
    try:
        best = result.best(monitor)
    except ValueError:  # unknown direction: no star rather than a guess
        return
    label = f"best by {monitor}: {best['penalty']}"
    for _, points, x_key in lines:
        if x_key is not None and any(p["penalty"] == best["penalty"] for p in points):
            ax.plot(
                best["values"][x_key], best[monitor], "*", color="k", ms=14, label=label
            )
            return
    # A run without knob values is a horizontal line: the star sits on it at
    # the left edge (x in axes coordinates, y in data coordinates).
    ax.plot(
        [0.03],
        [best[monitor]],
        "*",
        color="k",
        ms=14,
        label=label,
        transform=ax.get_yaxis_transform(),
    )


def lines_of(entries: list[dict]):
    """`(label, points sorted by x, x key or None)` for each line of the plot.

    A family's x is its first knob value that varies (the first one when
    none does); a family varying in two knobs gets one line per value of the
    others. A family without values (no penalty) is one horizontal line per
    grid point.
    """
    families: dict[str, list[dict]] = {}
    for entry in entries:
        families.setdefault(entry["family"], []).append(entry)
    for family, points in families.items():
        keys = list(points[0]["values"])
        varying = [k for k in keys if len({p["values"].get(k) for p in points}) > 1]
        if not keys:
            for point in points:
                yield point["penalty"], [point], None
            continue
        x_key = varying[0] if varying else keys[0]
        others = [k for k in keys if k != x_key]
        lines: dict[tuple, list[dict]] = {}
        for point in points:
            fixed = tuple(point["values"][k] for k in others)
            lines.setdefault(fixed, []).append(point)
        for fixed, members in lines.items():
            label = family
            shown = [(k, v) for k, v in zip(others, fixed, strict=True) if k in varying]
            if shown:
                label += " (" + ", ".join(f"{k}={v:g}" for k, v in shown) + ")"
            yield label, sorted(members, key=lambda p: p["values"][x_key]), x_key
