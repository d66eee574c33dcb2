"""TensorBoard event files: one writer per run folder, and the dashboards' layout.

`RunWriter` writes scalars (one cached `tf.function` per tag set), text and
the `custom_scalars` layout into one run folder's event file, kept open across
`fit` calls; `custom_scalars_layout` builds that layout. Used by
`WeightNormLogger` and `kerasreg.sweep` through `kerasreg.tensorboard.run_writer`,
which keeps one `RunWriter` per folder per process.
"""

from __future__ import annotations

import os
import re
from typing import Any

from kerasreg.tf_functions import traced_once


class RunWriter:
    """A summary writer for one run folder, kept open across `fit` calls.

    TensorBoard reads a run's event files in name order, and TensorFlow names
    them `events.out.tfevents.<seconds>.<host>.<pid>.<counter>.v2`: two files
    opened in the same second sort by the counter as text (`...10.v2` before
    `...9.v2`), so a second `fit` logging to the same folder through a new
    writer can be read before the first. Keeping one writer per folder per
    process appends every `fit` to the same file, in order.

    All the scalars of one log are written by one cached `tf.function` (one
    per tag set), about 7 times faster than one eager `tf.summary.scalar` per
    tag. Writes run under `tf.summary.record_if(True)`, so another callback's
    `record_if` condition cannot drop them (TensorFlow issue 49109).
    """

    _MAX_FUNCTIONS = 8

    def __init__(self, folder: str):
        import tensorflow as tf

        before = event_files(folder)
        self.writer = tf.summary.create_file_writer(folder)
        created = sorted(event_files(folder) - before)
        # Our file: the new one with our pid. If another process made one in
        # the same instant we cannot tell which is ours; then the writer is
        # not reused (`alive()` is False) and the next `fit` opens a new one.
        mine = [name for name in created if f".{os.getpid()}." in name]
        self.path = os.path.join(folder, mine[0]) if len(mine) == 1 else None
        self._functions: dict[tuple[str, ...], Any] = {}
        self._layout: bytes | None = None

    def alive(self) -> bool:
        """True while the writer's event file still exists."""
        import tensorflow as tf

        return self.path is not None and tf.io.gfile.exists(self.path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        import tensorflow as tf

        tags = tuple(scalars)
        values = tf.constant(list(scalars.values()), dtype=tf.float32)
        step = tf.constant(step, dtype=tf.int64)
        function = self._functions.get(tags)
        if function is None:
            # First write of these tags: eagerly (a one-off log, such as a
            # short fit's epoch end, is not worth a trace). Compiled from the
            # second on.
            if len(self._functions) >= self._MAX_FUNCTIONS:
                self._functions.pop(next(iter(self._functions)))
            self._functions[tags] = self._compile(tags)
            write_scalars(self.writer, tags, values, step)
        else:
            function(values, step)

    def _compile(self, tags: tuple[str, ...]) -> Any:
        writer = self.writer

        def write_all(values, step):
            write_scalars(writer, tags, values, step)

        # One trace per writer and tag set is by design; a sweep over many
        # log dirs must not print TensorFlow's "frequent retracing" warning.
        return traced_once(write_all, autograph=False)

    def write_text(self, tag: str, text: str, step: int) -> None:
        """A markdown text summary (TensorBoard's Text dashboard)."""
        import tensorflow as tf

        with self.writer.as_default(), tf.summary.record_if(True):
            tf.summary.text(tag, text, step=step)

    def write_layout(self, layout: Any) -> None:
        """The run's `custom_scalars` layout, unless this writer already wrote it.

        TensorFlow 2 has no op for it: the serialized summary proto is written
        raw (tensorboard PR 5011).
        """
        import tensorflow as tf
        from tensorboard.plugins.custom_scalar import summary as custom_scalar

        serialized = layout.SerializeToString()
        if serialized == self._layout:
            return
        with self.writer.as_default(), tf.summary.record_if(True):
            tf.summary.experimental.write_raw_pb(
                custom_scalar.pb(layout).SerializeToString(), step=0
            )
        self._layout = serialized

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self._functions = {}
        self.writer.close()


def custom_scalars_layout(
    penalties: dict[str, list[str]],
    gates: dict[str, list[str]],
    gradients: dict[str, dict[str, list[str]]] | None = None,
) -> Any:
    """The `custom_scalars` layout: several series per chart.

    - category `regularization: penalty per layer` (when some weight has a
      penalty): one chart per layer (an RNN with its cell, both directions of
      `Bidirectional`) with the `penalty/<path>` series of its weights;
    - category `regularization: loss`: `loss/data`, `penalty/total` and
      `loss/total` in one chart (train and validation runs);
    - category `regularization: L2 norm per gate` (with `per_gate=True`): one
      chart per gated weight with its `norm_l2/<path>/gate_<g>` series;
    - the `gradients` categories (with `gradients=True`), right after the
      penalties: gradient norms, penalty share, cosine and update ratio, one
      chart per layer each.

    Each chart's regular expression is anchored and lists the exact tags, so
    it matches those tags and no others.

    Args:
        penalties: `{layer path: [penalty tags]}`.
        gates: `{weight path: [gate tags]}`.
        gradients: `{category title: {chart title: [tags]}}`, or None.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, tags: list[str]) -> Any:
        pattern = "^(" + "|".join(re.escape(tag) for tag in tags) + ")$"
        return layout_pb2.Chart(
            title=title, multiline=layout_pb2.MultilineChartContent(tag=[pattern])
        )

    categories = []
    if penalties:
        categories.append(
            layout_pb2.Category(
                title="regularization: penalty per layer",
                chart=[chart(f"penalty {g}", t) for g, t in penalties.items()],
            )
        )
    for title, charts in (gradients or {}).items():
        categories.append(
            layout_pb2.Category(
                title=title, chart=[chart(c, t) for c, t in charts.items()]
            )
        )
    categories.append(
        layout_pb2.Category(
            title="regularization: loss",
            chart=[chart("loss", ["loss/data", "penalty/total", "loss/total"])],
        )
    )
    if gates:
        categories.append(
            layout_pb2.Category(
                title="regularization: L2 norm per gate",
                chart=[chart(f"norm_l2 {w}", t) for w, t in gates.items()],
            )
        )
    return layout_pb2.Layout(category=categories)


def write_scalars(writer: Any, tags: tuple[str, ...], values: Any, step: Any) -> None:
    import tensorflow as tf

    with writer.as_default(), tf.summary.record_if(True):
        for index, tag in enumerate(tags):
            tf.summary.scalar(tag, values[index], step=step)


def event_files(folder: str) -> set[str]:
    import tensorflow as tf

    if not tf.io.gfile.isdir(folder):
        return set()
    return {
        name
        for name in tf.io.gfile.listdir(folder)
        if name.startswith("events.out.tfevents.")
    }
