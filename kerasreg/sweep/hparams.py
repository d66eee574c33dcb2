"""The HParams experiment of a sweep, written next to its runs' TensorBoard folders.

Hyperparameters are the knob families and values; metrics are each run's
values at its `best_epoch`. Trial ids are unique to the sweep's folder, so
two sweeps under one parent folder stay apart in the HParams table, and the
runs of one grid point (its seeds) share one id: one row, their mean.
"""

from __future__ import annotations

import hashlib
import os


def trial_prefix(log_dir: str) -> str:
    """A prefix of HParams trial ids unique to this sweep's log directory.

    TensorBoard groups the sessions of one trial id into one row (the repeats
    of a grid point); two sweeps under one parent folder must not share ids.
    """
    folder = os.path.abspath(log_dir)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:6]
    return f"{os.path.basename(folder) or 'sweep'}-{digest}"


def write_hparams(log_dir: str, rows: list[dict]) -> None:
    """The HParams experiment at `log_dir`, one session per run.

    Hyperparameters: `penalty` (the grid point's name), `family`, `strength`
    and every knob value (`L2Penalty.l2`, `WeightDecay.rate`, ...). Metrics:
    each history key at the run's `best_epoch`, written to the session's own
    run as `hparams/<key>`. The runs of one grid point (its seeds) share a
    trial id, so the table shows them as one row (their mean, by default).
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    names = list(dict.fromkeys(row["penalty"] for row in rows))
    families = list(dict.fromkeys(row["family"] for row in rows))
    values = list(dict.fromkeys(k for row in rows for k in row["values"]))
    params = {
        "penalty": hp.HParam("penalty", hp.Discrete(names)),
        "family": hp.HParam("family", hp.Discrete(families)),
        "strength": hp.HParam("strength"),
        **{key: hp.HParam(key) for key in values},
    }
    keys = list(dict.fromkeys(k for row in rows for k in row["history"]))
    metrics = [
        hp.Metric(f"hparams/{key}", display_name=key) for key in ["best_epoch", *keys]
    ]
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams_config(hparams=list(params.values()), metrics=metrics)
    prefix = trial_prefix(log_dir)
    for row in rows:
        folder = os.path.join(log_dir, row["run"])
        chosen = {
            params["penalty"]: row["penalty"],
            params["family"]: row["family"],
            params["strength"]: row["strength"],
        }
        chosen.update({params[k]: v for k, v in row["values"].items()})
        writer = tf.summary.create_file_writer(folder)
        with writer.as_default():
            hp.hparams(chosen, trial_id=f"{prefix}/{row['penalty']}")
            step = row["best_epoch"]
            tf.summary.scalar("hparams/best_epoch", row["best_epoch"], step=step)
            for key in keys:
                if key in row:
                    tf.summary.scalar(f"hparams/{key}", row[key], step=step)
        writer.close()
