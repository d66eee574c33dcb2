"""The `where=` rule: every form against the weight paths the test model must have."""

import re

import keras
import numpy as np
import pytest

import kerasreg
from kerasreg.selection import check_where, select_weights, walk_layers, weight_paths


def build_net():
    """Bidirectional LSTM, a nested functional encoder, BN, GRU, Embedding, Conv."""
    enc_in = keras.Input((5,))
    encoder = keras.Model(
        enc_in, keras.layers.Dense(3, name="inner_dense")(enc_in), name="encoder"
    )
    seq = keras.Input((6, 2))
    h = keras.layers.Bidirectional(keras.layers.LSTM(4, name="lstm"), name="bi")(seq)
    h = keras.layers.Dense(5, name="proj")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = encoder(h)
    g = keras.layers.GRU(2, name="gru")(keras.layers.Reshape((3, 1))(h))
    ids = keras.Input((4,), dtype="int32")
    e = keras.layers.Flatten()(keras.layers.Embedding(10, 2, name="emb")(ids))
    c = keras.layers.Flatten()(keras.layers.Conv1D(2, 3, name="conv")(seq))
    out = keras.layers.Concatenate()([g, e, c])
    out = keras.layers.Dense(1, name="head")(out)
    return keras.Model([seq, ids], out, name="net")


CELL = "lstm_cell"
# Written out by hand from the architecture above: the independent reference.
KERNELS = [
    f"bi/forward_lstm/{CELL}/kernel",
    f"bi/forward_lstm/{CELL}/recurrent_kernel",
    f"bi/backward_lstm/{CELL}/kernel",
    f"bi/backward_lstm/{CELL}/recurrent_kernel",
    "proj/kernel",
    "inner_dense/kernel",
    "emb/embeddings",
    "conv/kernel",
    "gru/gru_cell/kernel",
    "gru/gru_cell/recurrent_kernel",
    "head/kernel",
]


def paths(variables):
    return [v.path for v in variables]


def test_default_selects_kernels_only_in_model_order():
    model = build_net()
    assert sorted(paths(select_weights(model))) == sorted(KERNELS)
    order = [v.path for v in model.weights]
    got = paths(select_weights(model))
    assert got == sorted(got, key=order.index)


def test_default_leaves_out_biases_normalization_and_2d_gru_bias():
    model = build_net()
    gru_bias = model.get_layer("gru").cell.bias
    assert (
        len(gru_bias.shape) == 2
    )  # reset_after=True: the case a bare ndim rule misses
    selected = set(paths(select_weights(model)))
    assert not any(p.endswith(("/bias", "/gamma", "/beta")) for p in selected)
    assert not any("moving" in p for p in selected)


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("recurrent_kernel", [p for p in KERNELS if p.endswith("recurrent_kernel")]),
        (
            "^bi/backward",
            [
                f"bi/backward_lstm/{CELL}/{n}"
                for n in ("kernel", "recurrent_kernel", "bias")
            ],
        ),
        ("bias$", None),
        ("^bn/", ["bn/gamma", "bn/beta"]),
    ],
)
def test_regex_searched_in_path_over_trainable_weights(pattern, expected):
    model = build_net()
    got = paths(select_weights(model, pattern))
    if expected is None:  # every trainable bias, the GRU's 2-D one included
        expected = [
            f"bi/forward_lstm/{CELL}/bias",
            f"bi/backward_lstm/{CELL}/bias",
            "proj/bias",
            "inner_dense/bias",
            "conv/bias",
            "gru/gru_cell/bias",
            "head/bias",
        ]
    assert sorted(got) == sorted(expected)


def test_callable_sees_trainable_weights_only():
    model = build_net()
    seen = []

    def where(v):
        seen.append(v.path)
        return v.path.startswith("bn/")

    assert sorted(paths(select_weights(model, where))) == ["bn/beta", "bn/gamma"]
    assert "bn/moving_mean" not in seen
    assert len(seen) == len(model.trainable_weights)


def test_layers_contribute_their_default_weights_and_walk_nested():
    model = build_net()
    got = paths(
        select_weights(model, [model.get_layer("bi"), model.get_layer("encoder")])
    )
    assert sorted(got) == sorted(
        [p for p in KERNELS if p.startswith("bi/")] + ["inner_dense/kernel"]
    )


def test_single_layer_and_variables_taken_as_given():
    model = build_net()
    bn = model.get_layer("bn")
    assert paths(select_weights(model, model.get_layer("head"))) == ["head/kernel"]
    # A variable is taken as it is, even non-trainable.
    got = paths(select_weights(model, [bn.moving_mean, model.get_layer("proj").bias]))
    assert sorted(got) == ["bn/moving_mean", "proj/bias"]


def test_rnn_cell_and_both_bidirectional_directions_are_walked():
    model = build_net()
    bi = model.get_layer("bi")
    walked = [layer for layer, _ in walk_layers(model)]
    for direction in (bi.forward_layer, bi.backward_layer):
        assert any(layer is direction for layer in walked)
        assert any(layer is direction.cell for layer in walked)
    got = paths(select_weights(model, [bi.backward_layer.cell]))
    assert sorted(got) == [
        f"bi/backward_lstm/{CELL}/kernel",
        f"bi/backward_lstm/{CELL}/recurrent_kernel",
    ]


def test_walk_reports_ancestors():
    model = build_net()
    ancestry = {layer.name: [a.name for a in anc] for layer, anc in walk_layers(model)}
    assert ancestry["inner_dense"] == ["net", "encoder"]
    assert ancestry["gru_cell"] == ["net", "gru"]
    assert ancestry["backward_lstm"] == ["net", "bi"]


def test_empty_selection_names_the_pattern_and_lists_weights():
    model = build_net()
    with pytest.raises(
        ValueError, match=r"`where`=.no_such_weight. selects no weight.*proj/kernel"
    ):
        select_weights(model, "no_such_weight")
    with pytest.raises(ValueError, match="selects no weight"):
        select_weights(model, lambda v: False)
    with pytest.raises(ValueError, match="selects no weight"):
        select_weights(model, [model.get_layer("bn")])  # no kernel in BN


def test_empty_selection_lists_names_that_where_matches():
    # Keras names the kernel `sequential/d/kernel`; `where=` patterns search
    # `d/kernel`: the error lists those, and each one, as a pattern, selects
    # its weight.
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d"), keras.layers.Dense(1)]
    )
    assert model.layers[0].kernel.path == "sequential/d/kernel"
    with pytest.raises(ValueError, match="selects no weight") as error:
        select_weights(model, "no_such_weight")
    listed = re.findall(r"'([^']*)'", str(error.value).split("are: ")[1])
    assert listed == ["d/kernel", "d/bias", "dense/kernel", "dense/bias"]
    for name in listed:
        [variable] = select_weights(model, "^" + re.escape(name) + "$")
        assert weight_paths(model)[id(variable)] == name


def test_bad_regex_and_bad_types():
    model = build_net()
    with pytest.raises(ValueError, match=r"`where`.*'\(unclosed'.*not a valid regular"):
        select_weights(model, "(unclosed")
    with pytest.raises(TypeError, match=r"where=42"):
        select_weights(model, 42)
    with pytest.raises(TypeError, match="must hold Keras layers or variables"):
        select_weights(model, ["proj"])
    with pytest.raises(TypeError, match="`model`"):
        select_weights("not a model")


def test_foreign_layer_and_variable_rejected():
    model = build_net()
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="alien")])
    with pytest.raises(ValueError, match="layer 'alien' is not part of model 'net'"):
        select_weights(model, [other.layers[0]])
    with pytest.raises(ValueError, match=r"alien/kernel.*is not a weight of model"):
        select_weights(model, [other.layers[0].kernel])


def test_unbuilt_model_rejected():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no weights"):
        select_weights(model)


def test_argument_name_used_in_messages():
    model = build_net()
    with pytest.raises(ValueError, match="`exclude`"):
        select_weights(model, "nothing", argument="exclude")


def test_check_where_without_model():
    assert check_where(None) is None
    assert check_where("kernel") == "kernel"
    layer = keras.layers.Dense(2)
    assert check_where(layer) == [layer]
    assert check_where(x for x in [layer]) == [layer]  # generator made reusable
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check_where("[")
    with pytest.raises(TypeError, match=r"where=3\.5"):
        check_where(3.5)
    with pytest.raises(TypeError, match="must hold Keras layers"):
        check_where([layer, "x"])


def test_weight_paths_are_the_same_after_save_and_load(tmp_path):
    from kerasreg.selection import weight_paths

    encoder = keras.Sequential(
        [keras.layers.Dense(4), keras.layers.Dense(3)], name="encoder"
    )
    inputs = keras.Input((5, 3))
    h = keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True))(inputs)
    h = keras.layers.TimeDistributed(keras.layers.Dense(2))(h)
    outputs = encoder(keras.layers.Flatten()(h))
    functional = keras.Model(inputs, outputs, name="top")
    sequential = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="a"),
            keras.layers.Dense(1, name="b"),
        ],
        name="seq",
    )
    for model in (functional, sequential):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        before = weight_paths(model)
        after = weight_paths(loaded)
        names = [before[id(v)] for v in model.weights]
        assert names == [after[id(v)] for v in loaded.weights]
        # Keras's own paths disagree across the round trip; ours are those of a
        # functional model built in this process (its paths carry every parent).
        if model is functional:
            assert names == [v.path for v in model.weights]
    assert [weight_paths(sequential)[id(v)] for v in sequential.weights] == [
        "a/kernel",
        "a/bias",
        "b/kernel",
        "b/bias",
    ]
    assert "bidirectional/backward_lstm/lstm_cell/recurrent_kernel" in set(
        weight_paths(functional).values()
    )


def test_a_regex_matches_the_same_weights_after_save_and_load(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="hidden"), keras.layers.Dense(1)]
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for m in (model, loaded):
        assert [v.shape for v in select_weights(m, "^hidden/")] == [(3, 2), (2,)]


# Composable selectors: each against path lists written out by hand above ------

BIASES = [
    f"bi/forward_lstm/{CELL}/bias",
    f"bi/backward_lstm/{CELL}/bias",
    "proj/bias",
    "encoder/inner_dense/bias",
    "conv/bias",
    "gru/gru_cell/bias",
    "head/bias",
]
# `weight_paths` keeps the enclosing sub-model's name, which Keras's own
# `variable.path` (used by the tests above) drops for the nested encoder.
WP_KERNELS = [p.replace("inner_dense/", "encoder/inner_dense/") for p in KERNELS]
TRAINABLE = WP_KERNELS + BIASES + ["bn/gamma", "bn/beta"]


def chosen(model, where):
    from kerasreg.selection import weight_paths

    names = weight_paths(model)
    return sorted(names[id(v)] for v in select_weights(model, where))


def test_kernels_is_the_default_and_trainable_is_everything_trainable():
    model = build_net()
    assert chosen(model, kerasreg.kernels()) == sorted(WP_KERNELS)
    assert chosen(model, kerasreg.trainable()) == sorted(TRAINABLE)
    assert len(TRAINABLE) == len(model.trainable_weights)  # the list is complete


@pytest.mark.parametrize(
    "make, expected",
    [
        # A layer name regex: the layer and everything inside it.
        (
            lambda m: kerasreg.layer("^encoder$"),
            ["encoder/inner_dense/kernel", "encoder/inner_dense/bias"],
        ),
        (
            lambda m: kerasreg.layer("^bi$"),
            [p for p in TRAINABLE if p.startswith("bi/")],
        ),
        # A cell is owned by its RNN layer: matching the cell's name selects it.
        (
            lambda m: kerasreg.layer("gru_cell"),
            [
                "gru/gru_cell/kernel",
                "gru/gru_cell/recurrent_kernel",
                "gru/gru_cell/bias",
            ],
        ),
        (lambda m: kerasreg.layer(m.get_layer("proj")), ["proj/kernel", "proj/bias"]),
        # A class: every Dense, also the one nested in the encoder.
        (
            lambda m: kerasreg.layer(keras.layers.Dense),
            [
                "proj/kernel",
                "proj/bias",
                "encoder/inner_dense/kernel",
                "encoder/inner_dense/bias",
                "head/kernel",
                "head/bias",
            ],
        ),
        (
            lambda m: kerasreg.layer(lambda layer: layer.name == "conv"),
            ["conv/kernel", "conv/bias"],
        ),
        # Several specs: any of them.
        (
            lambda m: kerasreg.layer("^emb$", keras.layers.BatchNormalization),
            ["emb/embeddings", "bn/gamma", "bn/beta"],
        ),
    ],
    ids=[
        "regex-submodel",
        "regex-bidirectional",
        "regex-cell",
        "instance",
        "class",
        "callable",
        "several",
    ],
)
def test_layer_selects_owned_and_nested_trainable_weights(make, expected):
    model = build_net()
    assert chosen(model, make(model)) == sorted(expected)


def test_path_is_a_bare_string_and_matches_biases_too():
    model = build_net()
    assert chosen(model, kerasreg.path("^proj/")) == ["proj/bias", "proj/kernel"]
    assert chosen(model, "^proj/") == chosen(model, kerasreg.path("^proj/"))
    # Non-trainable weights are never matched by a pattern.
    with pytest.raises(ValueError, match="selects no weight"):
        select_weights(model, kerasreg.path("moving_mean"))


def test_combinations_read_as_sentences():
    model = build_net()
    encoder_dense_kernels = (
        kerasreg.kernels()
        & kerasreg.layer("^encoder$")
        & kerasreg.layer(keras.layers.Dense)
    )
    assert chosen(model, encoder_dense_kernels) == ["encoder/inner_dense/kernel"]
    # Everything but the LSTM: the complement is taken among trainable weights.
    assert chosen(model, ~kerasreg.layer("^bi$")) == sorted(
        p for p in TRAINABLE if not p.startswith("bi/")
    )
    assert chosen(model, kerasreg.kernels() | kerasreg.path("^head/bias$")) == sorted(
        [*WP_KERNELS, "head/bias"]
    )
    # Strings, callables and layer lists combine from either side.
    assert chosen(model, "recurrent" & kerasreg.layer("^gru$")) == [
        "gru/gru_cell/recurrent_kernel"
    ]
    assert chosen(model, kerasreg.kernels() & (lambda v: len(v.shape) == 3)) == [
        "conv/kernel"
    ]
    assert chosen(model, [model.get_layer("head")] | kerasreg.path("^proj/bias")) == [
        "head/kernel",
        "proj/bias",
    ]


ATOMS = {
    "kernels": (lambda m: kerasreg.kernels(), set(WP_KERNELS)),
    "biases": (lambda m: kerasreg.path("/bias$"), set(BIASES)),
    "bi": (
        lambda m: kerasreg.layer("^bi$"),
        {p for p in TRAINABLE if p.startswith("bi/")},
    ),
    "dense": (
        lambda m: kerasreg.layer(keras.layers.Dense),
        {
            f"{n}/{w}"
            for n in ("proj", "encoder/inner_dense", "head")
            for w in ("kernel", "bias")
        },
    ),
    "bn": (lambda m: kerasreg.layer(m.get_layer("bn")), {"bn/gamma", "bn/beta"}),
}


def expressions():
    """(selector builder, expected set) pairs: set algebra on the hand-written sets."""
    from hypothesis import strategies as st

    atoms = st.sampled_from(sorted(ATOMS)).map(lambda k: ATOMS[k])

    def extend(children):
        def combine(op, a, b):
            (fa, sa), (fb, sb) = a, b
            if op == "&":
                return (lambda m: fa(m) & fb(m)), sa & sb
            return (lambda m: fa(m) | fb(m)), sa | sb

        invert = children.map(lambda a: ((lambda m: ~a[0](m)), set(TRAINABLE) - a[1]))
        binary = st.builds(combine, st.sampled_from("&|"), children, children)
        return invert | binary

    return st.recursive(atoms, extend, max_leaves=5)


def test_any_combination_equals_set_algebra_on_the_reference_sets():
    from hypothesis import HealthCheck, given, settings

    model = build_net()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(expressions())
    def check(expression):
        build, expected = expression
        if expected:
            assert chosen(model, build(model)) == sorted(expected)
        else:
            with pytest.raises(ValueError, match="selects no weight"):
                select_weights(model, build(model))

    check()


def test_selectors_have_readable_reprs_used_in_errors():
    model = build_net()
    where = kerasreg.kernels() & ~(
        kerasreg.path("^bi/") | kerasreg.layer(keras.layers.Dense, "^emb$")
    )
    assert repr(where) == "kernels() & ~(path('^bi/') | layer(Dense, '^emb$'))"
    with pytest.raises(
        ValueError, match=r"`where`=kernels\(\) & layer\('\^bn\$'\) selects no weight"
    ):
        select_weights(model, kerasreg.kernels() & kerasreg.layer("^bn$"))


def test_bad_selectors_are_rejected_with_the_value():
    model = build_net()
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="alien")])
    with pytest.raises(TypeError, match=r"`regex`.*regex=3"):
        kerasreg.path(3)
    with pytest.raises(ValueError, match=r"'\(bad'.*not a valid regular expression"):
        kerasreg.path("(bad")
    with pytest.raises(ValueError, match=r"`layer`.*'\[x'.*not a valid regular"):
        kerasreg.layer("[x")
    with pytest.raises(TypeError, match=r"`layer` spec.*3\.5"):
        kerasreg.layer(3.5)
    with pytest.raises(TypeError, match="at least one spec"):
        kerasreg.layer()
    with pytest.raises(ValueError, match="layer 'alien' is not part of model 'net'"):
        select_weights(model, kerasreg.kernels() & kerasreg.layer(other.layers[0]))
    with pytest.raises(TypeError, match="must hold Keras layers"):
        kerasreg.kernels() & [model.get_layer("proj"), "proj"]
    with pytest.raises(TypeError, match=r"`where`.*where=2\.0"):
        kerasreg.kernels() | 2.0
    # `and`/`or` would silently drop one side.
    with pytest.raises(TypeError, match="combine selectors with `&`"):
        kerasreg.kernels() and kerasreg.path("x")


def test_check_where_passes_selectors_through():
    where = kerasreg.kernels() & kerasreg.path("x")
    assert check_where(where) is where


def test_a_selector_selects_the_same_weights_after_save_and_load(tmp_path):
    encoder = keras.Sequential(
        [keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")],
        name="encoder",
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(encoder(inputs)))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    where = kerasreg.kernels() & kerasreg.layer("^encoder$") & ~kerasreg.path("/b/")
    for m in (model, loaded):
        assert chosen(m, where) == ["encoder/a/kernel"]


def test_every_where_consumer_takes_a_selector(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    where = kerasreg.trainable() & kerasreg.layer("^hidden$")
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.weights]
    norms = kerasreg.shrink_weights(model, 0.5, where=where)
    assert sorted(norms) == ["hidden/bias", "hidden/kernel"]
    after = [keras.ops.convert_to_numpy(v) for v in model.weights]
    factors = [0.5, 0.5, 1.0, 1.0]  # hidden kernel, hidden bias, head kernel, head bias
    for b, a, f in zip(before, after, factors, strict=True):
        np.testing.assert_allclose(a, f * b, rtol=1e-6)
    assert sorted(kerasreg.weight_norms(model, where)) == [
        "hidden/bias",
        "hidden/kernel",
    ]
    decay = kerasreg.WeightDecay(0.1, where=where)
    logger = kerasreg.WeightNormLogger(str(tmp_path), where=where)
    assert decay.where is where and logger.where is where
