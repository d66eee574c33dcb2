"""Post-step transforms at the edges of Keras's training loop, against closed forms and numpy.

WeightDecay (to zero and toward a reference) and SoftThreshold: exactly once per
optimizer update (steps_per_execution, gradient accumulation, unknown epoch
length), out-of-range strengths rejected before they touch a weight, distinct
logs keys, per-epoch transforms before validation, and composition in list order.
"""

import keras
import numpy as np
import pytest
from conftest import run_mirrored
from keras import ops
from test_decay import assert_decayed, fit, small_model, snapshot, to_np, xy

import kerasreg
from kerasreg import SoftThreshold, WeightDecay
from kerasreg.selection import weight_paths

TORCH = keras.backend.backend() == "torch"


def kernels(model):
    return [to_np(layer.kernel) for layer in model.layers]


def soft(w, t):
    return np.sign(w) * np.maximum(np.abs(w) - t, 0.0)


# --- once per optimizer update ---------------------------------------------------


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_gradient_accumulation_decays_once_per_update(steps_per_execution, rng):
    if TORCH and steps_per_execution > 1:
        pytest.skip("the PyTorch trainer only supports steps_per_execution=1")
    model = small_model(steps_per_execution=steps_per_execution)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        loss=model.loss,
        steps_per_execution=steps_per_execution,
    )
    before = snapshot(model)
    x, y = xy(rng, n=16)  # batch 4: 4 batches per epoch, 2 optimizer updates
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[WeightDecay(0.1)])
    # Keras's `iterations` counts updates: 8 batches, 4 updates.
    assert int(to_np(model.optimizer.iterations)) == 4
    assert_decayed(model, before, 0.9**4)  # 4 updates, not 8 batches


def test_gradient_accumulation_matches_numpy_sgd(rng):
    # Folded (constant rate) and host path (Python schedule) against numpy.
    lr, rate, batch, n = 0.1, 0.05, 4, 2
    x, y = xy(rng, n=16)
    results = []
    for decay in (WeightDecay(rate), WeightDecay(schedule=lambda t: rate)):
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1, use_bias=False)]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(lr, gradient_accumulation_steps=n),
            loss="mse",
        )
        w = to_np(model.layers[0].kernel)
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[decay],
        )
        results.append(to_np(model.layers[0].kernel))
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    accumulated = np.zeros_like(w)
    for k, i in enumerate(range(0, 16, batch)):
        xb, yb = xd[i : i + batch], yd[i : i + batch]
        accumulated += 2 * xb.T @ (xb @ w - yb) / batch
        if (k + 1) % n == 0:
            w = (1 - rate) * (w - lr * accumulated / n)
            accumulated[:] = 0
    for result in results:
        np.testing.assert_allclose(result, w, rtol=1e-5, atol=1e-6)


def test_python_schedule_sees_each_step_once_and_never_lags(rng):
    # 3 steps per epoch, steps_per_execution=2, 2 epochs x 2 fits: 12 updates.
    spe = 1 if TORCH else 2
    model = small_model(steps_per_execution=spe)
    kernel = model.get_layer("hidden").kernel
    w0 = to_np(kernel)
    seen = []

    def schedule(t):
        seen.append(t)
        return 0.01 * (t % 5 + 1)

    class Check(keras.callbacks.Callback):
        """Runs after the decay: the weights hold every update's decay so far."""

        def on_train_batch_end(self, batch, logs=None):
            done = int(to_np(self.model.optimizer.iterations))
            expected = w0 * np.prod([1 - 0.01 * (t % 5 + 1) for t in range(done)])
            np.testing.assert_allclose(to_np(kernel), expected, rtol=1e-5)

    decay = WeightDecay(schedule=schedule)
    for _ in range(2):
        model.fit(
            *xy(rng), batch_size=4, epochs=2, verbose=0, callbacks=[decay, Check()]
        )
    assert seen == list(range(12))


# --- strengths out of range ---------------------------------------------------------


def test_learning_rate_schedule_out_of_range_is_refused_before_training(rng):
    schedule = keras.optimizers.schedules.ExponentialDecay(1.5, 10, 0.5)
    model = small_model(loss="mse")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"optimizer step 0.*1\.5.*\[0, 1\)"):
        fit(model, xy(rng), [WeightDecay(schedule=schedule)], epochs=2)
    for path, w in snapshot(model).items():  # not even the optimizer moved
        np.testing.assert_array_equal(w, before[path])


def test_schedule_leaving_its_range_mid_fit_names_the_step(rng):
    # Valid for steps 0..3, 1.0 from step 4 on (epoch 2 of 3-step epochs).
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.1, 1.0])
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"rate at optimizer step 4"):
        fit(model, xy(rng), [WeightDecay(schedule=schedule)], epochs=3)
    assert_decayed(model, before, 0.9**3)  # epoch 1 only: refused before epoch 2


def test_unknown_epoch_length_leaves_bad_steps_undone_then_raises(rng):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.data generators of unknown length: TensorFlow backend")
    x, y = xy(rng, n=10)
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(zip(x, y, strict=True)),
        output_signature=(
            tf.TensorSpec((3,), "float32"),
            tf.TensorSpec((1,), "float32"),
        ),
    ).batch(2)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, -0.5])
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"optimizer step 2.*-0\.5"):
        model.fit(
            dataset, epochs=1, verbose=0, callbacks=[WeightDecay(schedule=schedule)]
        )
    assert_decayed(model, before, 0.9**2)  # steps 0, 1; the bad steps did nothing


def test_python_schedule_returning_a_tensor_is_checked(rng):
    model = small_model()
    before = snapshot(model)
    decay = WeightDecay(
        schedule=lambda t: ops.convert_to_tensor(1.5 if t == 2 else 0.1)
    )
    with pytest.raises(ValueError, match=r"schedule\(2\).*1\.5"):
        model.fit(*xy(rng), batch_size=4, epochs=1, verbose=0, callbacks=[decay])
    assert_decayed(model, before, 0.9**2)


def test_rate_times_learning_rate_out_of_range(rng):
    model = small_model(lr=3.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"times the learning rate gives"):
        fit(model, xy(rng), [WeightDecay(0.5, lr_scaled=True)])
    assert_decayed(model, before, 1.0)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), 2])
def test_rate_set_after_construction_is_validated(value):
    decay = WeightDecay(0.1)
    with pytest.raises(ValueError, match=r"`rate`.*\[0, 1\)"):
        decay.rate = value
    assert decay.rate == 0.1
    prox = SoftThreshold(0.1)
    if value < 0 or value != value:
        with pytest.raises(ValueError, match=r"`threshold`"):
            prox.threshold = value


def test_rate_bypassing_the_setter_is_caught_when_fit_starts(rng):
    model = small_model()
    before = snapshot(model)
    decay = WeightDecay(0.1)
    # No public path stores an invalid rate (constructor, setter, from_config
    # all validate): this pins the check `fit` makes anyway, against code that
    # writes the stored value directly, so it must write it directly too.
    decay._strength = 2.0
    with pytest.raises(ValueError, match=r"`rate`"):
        model.fit(*xy(rng), batch_size=4, epochs=1, verbose=0, callbacks=[decay])
    assert_decayed(model, before, 1.0)


# --- logs keys and callback order ----------------------------------------------------


def test_each_callback_has_its_own_logs_key(rng):
    model = small_model()
    history = fit(
        model,
        xy(rng),
        [
            WeightDecay(0.1, where="^hidden/"),
            WeightDecay(0.2, where="^out/"),
            WeightDecay(0.3, where="^out/", name="head"),
            SoftThreshold(0.001),
        ],
        epochs=2,
    )
    logged = history.history
    assert logged["weight_decay_rate"] == pytest.approx([0.1, 0.1])
    assert logged["weight_decay_2_rate"] == pytest.approx([0.2, 0.2])
    assert logged["head_rate"] == pytest.approx([0.3, 0.3])
    assert logged["prox_l1_threshold"] == pytest.approx([0.001, 0.001])
    with pytest.raises(ValueError, match="`name`"):
        WeightDecay(0.1, name="not a key")


def test_per_epoch_decay_happens_before_validation(rng, tmp_path):
    # No training (lr 0): only the decay moves the weights, so each epoch's
    # val_loss must be the loss of the weights after that epoch's decay.
    model = small_model(lr=0.0, loss="mse")
    x, y = xy(rng)
    xv, yv = xy(rng, n=8)
    w0 = model.get_weights()
    path = tmp_path / "best.keras"
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        verbose=0,
        validation_data=(xv, yv),
        callbacks=[
            WeightDecay(0.3, frequency="epoch"),
            keras.callbacks.ModelCheckpoint(
                path, monitor="val_loss", save_best_only=True
            ),
        ],
    )
    probe = keras.models.clone_model(model)
    probe.compile(loss="mse")
    for epoch, val_loss in enumerate(history.history["val_loss"]):
        probe.set_weights([w * 0.7 ** (epoch + 1) if w.ndim >= 2 else w for w in w0])
        assert probe.evaluate(xv, yv, verbose=0) == pytest.approx(val_loss, rel=1e-5)
    best = keras.saving.load_model(path)
    assert best.evaluate(xv, yv, verbose=0) == pytest.approx(
        min(history.history["val_loss"]), rel=1e-5
    )


# --- toward a reference ----------------------------------------------------------------


@pytest.mark.parametrize("frequency", ["batch", "epoch"])
def test_toward_a_model_closed_form(frequency, rng):
    model = small_model()
    reference = small_model()  # same architecture, other weights
    for v in reference.weights:
        v.assign(np.random.default_rng(3).normal(size=v.shape))
    w0 = {p: w for p, w in snapshot(model).items()}
    r = {weight_paths(reference)[id(v)]: to_np(v) for v in reference.weights}
    fit(
        model,
        xy(rng),
        [WeightDecay(0.1, frequency=frequency, toward=reference)],
        epochs=2,
    )
    n = 6 if frequency == "batch" else 2
    for path, w in snapshot(model).items():
        expected = (
            r[path] + 0.9**n * (w0[path] - r[path])
            if path.endswith("kernel")
            else w0[path]
        )
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


def test_toward_start_keeps_the_reference_exactly_across_fits(rng):
    model = small_model()
    before = snapshot(model)
    decay = WeightDecay(0.3, toward="start")
    for _ in range(2):
        model.fit(*xy(rng), batch_size=4, epochs=1, verbose=0, callbacks=[decay])
    for path, w in snapshot(model).items():  # w - 0.3 (w - w) == w: bit for bit
        np.testing.assert_array_equal(w, before[path])


def test_toward_start_with_real_gradients_matches_numpy(rng):
    lr, rate, batch = 0.1, 0.2, 4
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    w = w0 = to_np(model.layers[0].kernel)
    x, y = xy(rng)
    decay = WeightDecay(rate, toward="start")
    model.fit(
        x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[decay]
    )
    model.layers[0].kernel.assign(np.zeros((3, 1)))  # the reference stays w0
    w = np.zeros((3, 1))
    model.fit(
        x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[decay]
    )
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    for i in range(0, len(x), batch):
        xb, yb = xd[i : i + batch], yd[i : i + batch]
        w = w - lr * 2 * xb.T @ (xb @ w - yb) / batch
        w = w - rate * (w - w0)
    np.testing.assert_allclose(to_np(model.layers[0].kernel), w, rtol=1e-5, atol=1e-6)


def test_toward_a_mapping(rng):
    model = small_model()
    before = snapshot(model)
    target = {"hidden/kernel": np.ones((3, 4)), "out/kernel": np.full((4, 1), -2.0)}
    fit(model, xy(rng), [WeightDecay(0.5, toward=target)])
    for path, w in snapshot(model).items():
        if path in target:
            np.testing.assert_allclose(
                w, target[path] + 0.5**3 * (before[path] - target[path]), rtol=1e-5
            )
        else:
            np.testing.assert_array_equal(w, before[path])


@pytest.mark.parametrize(
    "toward, match",
    [
        ("begin", r"`toward`.*'start'"),
        (3.0, r"`toward`"),
        ({1: np.ones(3)}, r"keys must be weight paths"),
        (
            {"hidden/kernel": np.ones((3, 4))},
            r"no reference for the selected.*out/kernel",
        ),
        (
            {"hidden/kernel": np.ones((3, 4)), "out/kernel": np.ones((4, 1)), "x/y": 1},
            r"x/y.*not weight paths",
        ),
        ({"hidden/kernel": np.ones((4, 3)), "out/kernel": np.ones((4, 1))}, r"shape"),
        ("other-architecture", r"has 2 weights.*has 4"),
        ("other-shapes", r"shape \(3, 5\).*hidden/kernel"),
    ],
)
def test_toward_mismatches_are_clear_errors_and_change_nothing(toward, match, rng):
    model = small_model()
    before = snapshot(model)
    if toward == "other-architecture":
        toward = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    elif toward == "other-shapes":
        toward = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(1)]
        )
    with pytest.raises((TypeError, ValueError), match=match):
        decay = WeightDecay(0.1, toward=toward)
        model.fit(*xy(rng), batch_size=4, epochs=1, verbose=0, callbacks=[decay])
    for path, w in snapshot(model).items():
        np.testing.assert_array_equal(w, before[path])


# --- soft-thresholding -------------------------------------------------------------------


@pytest.mark.parametrize("frequency", ["batch", "epoch"])
def test_soft_threshold_closed_form_gives_exact_zeros(frequency, rng):
    model = small_model()
    before = snapshot(model)
    t = 0.05
    fit(model, xy(rng), [SoftThreshold(t, frequency=frequency)], epochs=2)
    n = 6 if frequency == "batch" else 2
    zeros = 0
    for path, w in snapshot(model).items():
        expected = (
            soft(before[path], n * t) if path.endswith("kernel") else before[path]
        )
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
        if path.endswith("kernel"):
            np.testing.assert_array_equal(w == 0, expected == 0)
            zeros += int((w == 0).sum())
    assert zeros > 0  # some weights are exactly zero, not merely small
    norms = kerasreg.weight_norms(model)
    total = sum(before[p].size for p in norms)
    assert sum(
        s["zero_fraction"] * before[p].size for p, s in norms.items()
    ) == pytest.approx(zeros)
    assert total > zeros


def test_soft_threshold_with_real_gradients_matches_numpy_proximal_sgd(rng):
    lr, l1, batch = 0.1, 0.3, 4
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    w = to_np(model.layers[0].kernel)
    x, y = xy(rng)
    model.fit(
        x,
        y,
        batch_size=batch,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[SoftThreshold(l1, lr_scaled=True)],
    )
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    for _ in range(2):
        for i in range(0, len(x), batch):
            xb, yb = xd[i : i + batch], yd[i : i + batch]
            w = soft(w - lr * 2 * xb.T @ (xb @ w - yb) / batch, lr * l1)
    np.testing.assert_allclose(to_np(model.layers[0].kernel), w, rtol=1e-5, atol=1e-6)


@pytest.fixture
def float64_everywhere():
    """Float64 weights and float64 losses and optimizer (floatx), restored after."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    # Keras caches float32 state across floatx changes.
    keras.utils.clear_session(free_memory=False)
    try:
        if keras.backend.backend() == "jax" and not is_float64(keras.Variable(0.0)):
            pytest.skip("JAX without jax_enable_x64 holds float64 weights as float32")
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
        keras.utils.clear_session(free_memory=False)


def is_float64(variable):
    return keras.backend.standardize_dtype(variable.value.dtype) == "float64"


class NumpyProximalStep(keras.callbacks.Callback):
    """The reference transform: numpy float64, after every batch (SGD updates
    on every batch), on the kernel."""

    def __init__(self, formula):
        super().__init__()
        self.formula = formula

    def on_train_batch_end(self, batch, logs=None):
        if keras.backend.backend() == "jax":
            self.model.jax_state_sync()  # callbacks see the live weights
        kernel = self.model.layers[0].kernel
        kernel.assign(self.formula(np.asarray(to_np(kernel), np.float64)))


FLOAT64_CASES = {
    # name: (kerasreg callback, the same step in numpy: w -> w after)
    "threshold": (lambda: SoftThreshold(0.02), lambda w: soft(w, 0.02)),
    "threshold x lr": (
        lambda: SoftThreshold(0.16, lr_scaled=True),
        lambda w: soft(w, 0.16 * 0.125),
    ),
    "decay x lr": (
        lambda: WeightDecay(0.3, lr_scaled=True),
        lambda w: w * (1.0 - 0.3 * 0.125),
    ),
}


@pytest.mark.parametrize("case", list(FLOAT64_CASES))
def test_float64_weights_are_transformed_in_float64(case, float64_everywhere):
    """Issue 23 (combination generator): the threshold (and the rate times the
    learning rate) is computed in the weights' float64, not rounded to float32."""
    make, formula = FLOAT64_CASES[case]
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 2))

    def trained(callback):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.125), loss="mse")
        start = [to_np(v) for v in (model.layers[0].kernel, model.layers[0].bias)]
        fit_kw = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
        model.fit(x, y, callbacks=[callback], **fit_kw)
        assert is_float64(model.layers[0].kernel)
        return start, to_np(model.layers[0].kernel), to_np(model.layers[0].bias)

    (w, b), kernel, bias = trained(make())
    # The reference loop: the same Keras fit, the transform in numpy float64.
    (w_ref, _), kernel_ref, bias_ref = trained(NumpyProximalStep(formula))
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_allclose(kernel, kernel_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias, bias_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(kernel == 0, kernel_ref == 0)
    if TORCH:
        return  # Keras 3.15's torch matmul computes float64 inputs in float32
    # Proximal SGD in numpy float64, the whole loop.
    for _ in range(2):
        for i in range(0, 32, 8):
            r = x[i : i + 8] @ w + b - y[i : i + 8]  # mse over 8 x 2 values
            w = formula(w - 0.125 * 2 * x[i : i + 8].T @ r / 16)
            b = b - 0.125 * 2 * r.sum(axis=0) / 16
    np.testing.assert_allclose(kernel, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias, b, rtol=1e-9, atol=1e-12)


def test_transforms_compose_in_list_order(rng):
    model = small_model()
    before = snapshot(model)
    fit(model, xy(rng), [WeightDecay(0.5), SoftThreshold(0.02)])
    for path, w in snapshot(model).items():
        if path.endswith("kernel"):
            expected = before[path]
            for _ in range(3):
                expected = soft(0.5 * expected, 0.02)
        else:
            expected = before[path]
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threshold", [-0.1, float("inf"), "0.1", None])
def test_soft_threshold_bad_threshold(threshold):
    with pytest.raises((TypeError, ValueError), match="`threshold`"):
        SoftThreshold(threshold)


def test_describe_action_says_what_each_callback_does():
    assert WeightDecay(0.01).describe_action() == "decay rate 0.01 per update"
    assert (
        WeightDecay(0.2, frequency="epoch", toward="start").describe_action()
        == "decay rate 0.2 per epoch toward its value at the start of training"
    )
    assert SoftThreshold(1e-3, lr_scaled=True).describe_action() == (
        "soft-threshold 0.001 x lr per update"
    )


MIRRORED = """
from kerasreg import SoftThreshold, WeightDecay

settings = {
    "toward": lambda: [WeightDecay(0.2, toward="start")],
    "soft": lambda: [SoftThreshold(0.05)],
    "both": lambda: [WeightDecay(0.1, toward="start"), SoftThreshold(0.02)],
}
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    **{k: [fit_under(s, f())[1] for s in (one, mirrored)] for k, f in settings.items()},
}))
"""


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow only"
)
def test_toward_and_soft_threshold_under_mirrored_strategy():
    out = run_mirrored(MIRRORED)
    for name in ("toward", "soft", "both"):
        one, mirrored = out[name]
        for a, b in zip(one, mirrored, strict=True):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6)
    assert (np.array(out["soft"][1][0]) == 0).any()


@pytest.mark.parametrize("policy", ["mixed_float16", "float16"])
def test_toward_and_soft_threshold_in_low_precision(policy, rng):
    keras.config.set_dtype_policy(policy)
    try:
        model = small_model()
        before = snapshot(model)
        fit(model, xy(rng), [WeightDecay(0.5, toward="start"), SoftThreshold(0.01)])
        for path, w in snapshot(model).items():
            if path.endswith("kernel"):
                w0 = expected = before[path]
                for _ in range(3):
                    expected = soft(expected - 0.5 * (expected - w0), 0.01)
                np.testing.assert_allclose(w, expected, rtol=2e-3, atol=2e-3)
                assert np.isfinite(w).all()
    finally:
        keras.config.set_dtype_policy("float32")


def test_warns_once_when_a_logs_reader_comes_first(rng, tmp_path):
    import warnings

    model = small_model()
    csv_path = tmp_path / "log.csv"
    late = WeightDecay(0.1)
    with pytest.warns(
        UserWarning, match=r"WeightDecay writes.*weight_decay_rate.*CSVLogger"
    ):
        fit(model, xy(rng), [keras.callbacks.CSVLogger(str(csv_path)), late])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(
            model, xy(rng), [WeightDecay(0.1), keras.callbacks.CSVLogger(str(csv_path))]
        )
    assert "weight_decay_rate" in csv_path.read_text().splitlines()[0]


# --- skipped updates (dynamic loss scaling) ---------------------------------------


class AppliedSteps(keras.callbacks.Callback):
    """Records, per batch, whether Keras's optimizer applied an update (the
    wrapped optimizer's `iterations` moved; Keras 3.8's LossScaleOptimizer
    does not forward it): the reference of which steps count."""

    def count(self):
        optimizer = self.model.optimizer
        return int(to_np(getattr(optimizer, "inner_optimizer", optimizer).iterations))

    def on_train_begin(self, logs=None):
        self.last = self.count()
        self.applied = []

    def on_train_batch_end(self, batch, logs=None):
        now = self.count()
        self.applied.append(now > self.last)
        self.last = now


def np_mse_step(w, x, y, lr):
    """One SGD step of `Dense(1, use_bias=False)` under mean squared error."""
    return w - lr * 2.0 / len(x) * x.T @ (x @ w - y)


@pytest.mark.parametrize(
    "make, frequency",
    [
        (lambda: WeightDecay(0.1), "batch"),  # folded into the step
        (lambda: WeightDecay(schedule=lambda t: 0.1), "batch"),  # host path
        (lambda: WeightDecay(0.1, frequency="epoch"), "epoch"),
    ],
    ids=["folded", "host", "epoch"],
)
def test_skipped_loss_scaled_steps_get_no_transform(make, frequency, rng):
    # A LossScaleOptimizer under mixed_float16; a scale of 2**20 overflows
    # float16 gradients, so the first steps (all of epoch 0) are skipped, the
    # scale halved each time, until it fits: 3 epochs of 4 batches.
    lr, rate = 0.05, 0.1
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1, use_bias=False)]
        )
        model.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(lr), initial_scale=2.0**20
            ),
            loss="mse",
        )
        w = to_np(model.layers[0].kernel)
        steps = AppliedSteps()
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[make(), steps],
        )
    finally:
        keras.config.set_dtype_policy("float32")
    applied = steps.applied
    assert len(applied) == 12
    assert 2 <= sum(applied) <= 10, applied  # some skipped, some applied
    assert not any(applied[:4])  # the first epoch: every update skipped
    for epoch in range(3):
        for b in range(4):
            if applied[4 * epoch + b]:
                batch = slice(4 * b, 4 * b + 4)
                w = np_mse_step(w, x[batch].astype(np.float64), y[batch], lr)
                if frequency == "batch":
                    w = w * (1 - rate)
        if frequency == "epoch" and any(applied[4 * epoch : 4 * epoch + 4]):
            w = w * (1 - rate)
    # float16 compute: agreement to float16 rounding; one extra or missing
    # decay (10%) is far outside it.
    np.testing.assert_allclose(to_np(model.layers[0].kernel), w, rtol=1e-2, atol=1e-3)


# --- optimizer EMA (use_ema=True) -------------------------------------------------

EMA_CASES = {
    # name: (callback, numpy transform given w and the start value, per epoch?)
    "decay": (lambda: WeightDecay(0.1), lambda w, w0: 0.9 * w, False),
    "toward": (
        lambda: WeightDecay(0.1, toward="start"),
        lambda w, w0: w0 + 0.9 * (w - w0),
        False,
    ),
    "soft": (lambda: SoftThreshold(0.05), lambda w, w0: soft(w, 0.05), False),
    "host": (
        lambda: SoftThreshold(0.0, schedule=lambda t: 0.05),
        lambda w, w0: soft(w, 0.05),
        False,
    ),
    "soft-epoch": (
        lambda: SoftThreshold(0.05, frequency="epoch"),
        lambda w, w0: soft(w, 0.05),
        True,
    ),
}


@pytest.mark.parametrize("overwrite", [None, 2], ids=["at-end", "every-2"])
@pytest.mark.parametrize("case", list(EMA_CASES))
def test_ema_overwrites_are_followed_by_the_transform(case, overwrite, rng):
    # Keras writes its EMA over the weights every `ema_overwrite_frequency`
    # updates (inside the update) and at the end of fit; each time the
    # transform is applied to what Keras wrote: exact zeros stay exact zeros.
    make, transform, per_epoch = EMA_CASES[case]
    lr, momentum = 0.05, 0.8
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 4))
    w0 = rng.normal(size=(3, 4)) * 0.5
    w0[0, :2] = [0.01, -0.02]  # small entries the threshold zeroes
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, use_bias=False)])
    model.layers[0].kernel.assign(w0.astype("float32"))
    model.compile(
        optimizer=keras.optimizers.SGD(
            lr, use_ema=True, ema_momentum=momentum, ema_overwrite_frequency=overwrite
        ),
        loss="mse",
    )
    seen = []  # the kernel at each epoch end, after the transform
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(to_np(model.layers[0].kernel))
    )
    model.fit(
        x.astype("float32"),
        y.astype("float32"),
        batch_size=4,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[make(), record],
    )
    # numpy: SGD, then Keras's EMA (`average = weight` at the first update),
    # then its overwrite, then the transform; at the end the EMA once more.
    w, average, transformed_average = w0, None, None
    for k in range(6):
        b = slice(4 * (k % 2), 4 * (k % 2) + 4)
        p = w - lr * 2.0 / (4 * 4) * x[b].T @ (x[b] @ w - y[b])
        average = p if k == 0 else momentum * average + (1 - momentum) * p
        t = transform(p, w0)
        transformed_average = (
            t if k == 0 else momentum * transformed_average + (1 - momentum) * t
        )
        if overwrite and (k + 1) % overwrite == 0:
            p = average
        w = transform(p, w0) if (not per_epoch or k % 2 == 1) else p
        if k % 2 == 1:  # an epoch end: with `overwrite=2`, just overwritten
            np.testing.assert_allclose(seen[k // 2], w, rtol=1e-5, atol=1e-6)
            if case.startswith(("soft", "host")):
                assert np.all(seen[k // 2][w == 0] == 0.0)
    expected = transform(average, w0)
    kernel = to_np(model.layers[0].kernel)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6)
    if case.startswith(("soft", "host")):
        assert (expected == 0).sum() >= 2
        assert np.all(kernel[expected == 0] == 0.0)  # exact zeros
    elif case == "decay" or case == "toward":
        # Affine with a constant rate: the model ends with exactly the moving
        # average of the decayed weights.
        np.testing.assert_allclose(kernel, transformed_average, rtol=1e-5, atol=1e-6)


# --- `regularize` during `fit`: the re-traced step keeps every folded member -----


def np_penalized_sgd(w, x, y, lr, rate, l2, batches, accumulate=1, penalty_from=0):
    """numpy (float64): SGD on the batches of 4 given by index (mse + `l2 *
    sum(w**2)` from batch `penalty_from` on), decay by `1 - rate` after each
    update. Returns the final weights and, per update, the weights before it,
    the norms of its data gradient and of its penalty gradient."""
    w, x, y = (a.astype(np.float64) for a in (w, x, y))
    accumulated, rows = np.zeros_like(w), []
    for k, i in enumerate(batches):
        xb, yb = x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]
        accumulated += 2 * xb.T @ (xb @ w - yb) / 4
        if (k + 1) % accumulate == 0:
            data = accumulated / accumulate
            penalty = 2 * l2 * w if k >= penalty_from else np.zeros_like(w)
            rows.append((w, np.linalg.norm(data), np.linalg.norm(penalty)))
            w = (1 - rate) * (w - lr * (data + penalty))
            accumulated[:] = 0
    return w, rows


class PenaltyFrom(keras.callbacks.Callback):
    """`regularize(kernel=L2Penalty(l2))` at the start of epoch `epoch`."""

    def __init__(self, epoch, l2):
        super().__init__()
        self.epoch, self.l2 = epoch, l2

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            kerasreg.regularize(self.model, kernel=kerasreg.L2Penalty(self.l2))


def _linear_model(lr, accumulate=None, steps_per_execution=1):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(
        optimizer=keras.optimizers.SGD(lr, gradient_accumulation_steps=accumulate),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def test_regularize_during_fit_keeps_the_folded_decay_exactly(rng):
    # lr 0: only the decay moves the kernel, by exactly 0.9 per update, before
    # and after the callback's `regularize` re-traces the step (was 1.0 after).
    model = _linear_model(0.0)
    x, y = xy(rng, n=8)
    w0 = to_np(model.layers[0].kernel)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(to_np(self.model.layers[0].kernel))

    record = Record()
    callbacks = [PenaltyFrom(1, 0.5), WeightDecay(0.1), record]
    model.fit(
        x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=callbacks
    )
    for k, kernel in enumerate(seen):
        np.testing.assert_allclose(kernel, w0 * 0.9 ** (k + 1), rtol=1e-5, atol=1e-7)
    assert len(seen) == 4


@pytest.mark.parametrize(
    "steps_per_execution, accumulate",
    [(1, None), (2, None), (1, 2)],
    ids=["plain", "steps_per_execution=2", "gradient_accumulation_steps=2"],
)
def test_regularize_during_fit_keeps_decay_and_gradient_logger_folded(
    steps_per_execution, accumulate, rng, tmp_path
):
    if TORCH and steps_per_execution > 1:
        pytest.skip("the PyTorch trainer only supports steps_per_execution=1")
    from conftest import read_scalars

    lr, rate, l2 = 0.1, 0.1, 0.5
    model = _linear_model(lr, accumulate, steps_per_execution)
    x, y = xy(rng, n=8)  # batch 4: 2 batches per epoch, 6 in 3 epochs
    w0 = to_np(model.layers[0].kernel)
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True)
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[PenaltyFrom(1, l2), WeightDecay(rate), logger],
    )
    n = accumulate or 1
    expected, rows = np_penalized_sgd(
        w0, x, y, lr, rate, l2, [0, 1] * 3, accumulate=n, penalty_from=2
    )
    np.testing.assert_allclose(
        to_np(model.layers[0].kernel), expected, rtol=1e-5, atol=1e-6
    )
    # The logger still measures every update it logs (steps count updates),
    # the penalty gradient from the switch on included.
    logged = read_scalars(tmp_path / "train")
    every = steps_per_execution  # one log per execution at update_freq=1
    steps = list(range(every, len(rows) + 1, every))
    for section, column in (("grad_data", 1), ("grad_penalty", 2)):
        got = logged[f"{section}/dense/kernel"]
        assert [s for s, _ in got] == steps
        want = [rows[s - 1][column] for s in steps]
        np.testing.assert_allclose([v for _, v in got], want, rtol=1e-4, atol=1e-6)
    assert logged["grad_penalty/dense/kernel"][-1][1] > 0.1

    # The fold is gone at `on_train_end`: the model's own train function, with
    # the penalty and without the decay.
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    after, _ = np_penalized_sgd(
        expected, x, y, lr, 0.0, l2, [0, 1], accumulate=n, penalty_from=0
    )
    np.testing.assert_allclose(
        to_np(model.layers[0].kernel), after, rtol=1e-5, atol=1e-6
    )


def test_regularize_between_fits_reaches_a_reused_gradient_logger(rng, tmp_path):
    # The same logger in two fits, a penalty set between them: the second fit's
    # penalty-gradient rows measure it (were 0: the regularizers of the first).
    from conftest import read_scalars

    lr, l2 = 0.1, 0.5
    model = _linear_model(lr)
    x, y = xy(rng, n=8)
    w0 = to_np(model.layers[0].kernel)
    logger = kerasreg.WeightNormLogger(tmp_path, update_freq=1, gradients=True)
    fit_kwargs = dict(batch_size=4, shuffle=False, verbose=0, callbacks=[logger])
    model.fit(x, y, epochs=1, **fit_kwargs)
    kerasreg.regularize(model, kernel=kerasreg.L2Penalty(l2))
    model.fit(x, y, epochs=1, **fit_kwargs)
    expected, rows = np_penalized_sgd(w0, x, y, lr, 0.0, l2, [0, 1] * 2, penalty_from=2)
    np.testing.assert_allclose(
        to_np(model.layers[0].kernel), expected, rtol=1e-5, atol=1e-6
    )
    got = read_scalars(tmp_path / "train")["grad_penalty/dense/kernel"]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    want = [row[2] for row in rows]
    np.testing.assert_allclose([v for _, v in got], want, rtol=1e-4, atol=1e-6)
