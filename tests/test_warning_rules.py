"""kerasreg's own warnings are errors in its test suite (setup.cfg, conftest.py).

A tiny test file is run by pytest in a fresh process with this repository's
configuration and fixtures; each of its tests triggers one kind of kerasreg
noise without saying it expects it, and must fail.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from kerasreg._checks import KerasregDeprecationWarning, KerasregWarning

PROBES = textwrap.dedent(
    """
    import logging

    import keras
    import numpy as np
    import pytest

    import kerasreg
    from kerasreg._checks import KerasregWarning


    def fit(callbacks):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(np.ones((4, 2)), np.zeros((4, 1)), verbose=0, callbacks=callbacks)


    def test_order_warning_unexpected(tmp_path):
        fit([keras.callbacks.CSVLogger(str(tmp_path / "l.csv")),
             kerasreg.WeightDecay(0.1)])


    def test_order_warning_expected(tmp_path):
        with pytest.warns(KerasregWarning, match="Put WeightDecay first"):
            fit([keras.callbacks.CSVLogger(str(tmp_path / "l.csv")),
                 kerasreg.WeightDecay(0.1)])


    def test_deprecated_alias_unexpected():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
        kerasreg.regularize(model, kernel=kerasreg.L2Penalty(), layers="^d$")


    def test_retracing_of_a_kerasreg_function():
        import kerasreg.inplace  # noqa: F401  (the function the message names)

        logging.getLogger("tensorflow").warning(
            "5 out of the last 9 calls to <function _tensorflow_update.<locals>."
            "update at 0x7f> triggered tf.function retracing."
        )


    def test_retracing_of_a_keras_function():
        logging.getLogger("tensorflow").warning(
            "5 out of the last 9 calls to <function TensorFlowTrainer.make_predict_"
            "function.<locals>.multi_step_on_data at 0x7f> triggered tf.function "
            "retracing."
        )
    """
)


def test_warning_category_is_a_user_warning():
    assert issubclass(KerasregWarning, UserWarning)
    assert issubclass(KerasregDeprecationWarning, KerasregWarning)
    assert issubclass(KerasregDeprecationWarning, DeprecationWarning)


@pytest.mark.slow
def test_unexpected_kerasreg_noise_fails_a_test(tmp_path):
    probes = tmp_path / "test_probes.py"
    probes.write_text(PROBES)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "setup.cfg"),
         "--rootdir", str(tmp_path), "-p", "conftest", "-p", "no:cacheprovider",
         "-q", "-rA", str(probes)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = done.stdout
    expected = {
        "test_order_warning_unexpected": "FAILED",
        "test_order_warning_expected": "PASSED",
        "test_deprecated_alias_unexpected": "FAILED",
        "test_retracing_of_a_kerasreg_function": "ERROR",  # the fixture's teardown
        "test_retracing_of_a_keras_function": "PASSED",
    }
    for name, outcome in expected.items():
        assert f"{outcome} test_probes.py::{name}" in out, (name, out[-3000:])
    assert "KerasregWarning: WeightDecay writes" in out
    assert "KerasregDeprecationWarning: regularize(layers=...)" in out
    assert "TensorFlow retraced a kerasreg function" in out
