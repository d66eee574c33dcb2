"""The `where=` rule: every form against the weight paths the test model must have."""

import keras
import pytest

from kerasreg.selection import check_where, select_weights, walk_layers


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
