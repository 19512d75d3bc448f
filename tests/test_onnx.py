"""ONNX export (``model.export(path, format="onnx")``): onnxruntime is the oracle.

Every layer kind in a small model: the exported file, run by onnxruntime on a batch size never
used before (the batch dimension is symbolic), equals ``model.predict``. Weights are random
(not the initialisers: BatchNorm statistics away from 0/1, biases away from 0) so that a wrong
gate order or layout cannot hide. Tiny shapes: the whole file runs in seconds.
"""
from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from rddtensor import layers as L  # noqa: E402
from rddtensor.training import onnx_export  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5


def _randomize(model, seed=0):
    """Random weights of scale ~0.5; BatchNorm's running variances positive."""
    model.ensure_built()
    rng = np.random.default_rng(seed)
    weights = []
    for key, w in zip(model.layout.keys, model.get_weights()):
        w = rng.normal(0.0, 0.5, w.shape).astype(np.float32)
        weights.append(np.abs(w) + 0.5 if key.endswith("running_var") else w)
    model.set_weights(weights)
    return model


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export_and_compare(model, X, tmp_path, rtol=RTOL, atol=ATOL):
    path = tmp_path / "model.onnx"
    model.export(path)
    got = _session(path).run(None, {"X": X})[0]
    want = model.predict(X)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    return path


def _padded(rng, shape):
    """Sequences ``(batch, T, F)`` with padding (all-zero steps) at the end, the start, in
    between and a row of padding only."""
    X = rng.normal(size=shape).astype(np.float32)
    T = shape[1]
    X[0, T - 2:] = 0.0
    X[1, :2] = 0.0
    X[2, [1, T - 1]] = 0.0
    X[3] = 0.0
    return X


# (id, layers, per-row input shape, input kind); exported, then run on 7 rows
CASES = [
    ("dense", lambda: [L.Dense(5, activation="relu"), L.Dense(3)], (4,), "normal"),
    ("dense_3d_no_bias", lambda: [L.Dense(5, use_bias=False, activation="tanh")], (3, 4),
     "normal"),
    ("activations", lambda: [L.ReLU(), L.Dense(6), L.Sigmoid(), L.Dense(6), L.Tanh(),
                             L.Dense(6), L.LeakyReLU(0.2), L.ELU(0.7), L.GELU(),
                             L.GELU("tanh"), L.Activation("linear"), L.Softmax()], (6,),
     "normal"),
    ("softmax_axis", lambda: [L.Softmax(axis=1)], (3, 4), "normal"),
    ("structure", lambda: [L.Dropout(0.5), L.Flatten(), L.Reshape((4, -1)),
                           L.Dense(2, activation="elu")], (2, 3, 4), "normal"),
    ("conv1d", lambda: [L.Conv1D(4, 3, strides=2, padding=1, activation="relu"),
                        L.Conv1D(2, 2, dilation=2, padding="same", groups=2),
                        L.MaxPool1D(2, strides=1)], (2, 11), "normal"),
    ("conv2d", lambda: [L.Conv2D(4, 3, strides=(2, 1), padding=(1, 0), use_bias=False),
                        L.Conv2D(4, 2, padding="same", dilation=2, groups=2,
                                 activation="leaky_relu")], (2, 7, 6), "normal"),
    ("conv2d_transpose", lambda: [L.Conv2DTranspose(3, 3, strides=2, padding=1,
                                                    output_padding=1, activation="sigmoid"),
                                  L.Conv2DTranspose(2, 2, strides=(2, 1), padding=(0, 1),
                                                    dilation=2, use_bias=False)],
     (2, 3, 4), "normal"),
    ("pooling", lambda: [L.MaxPool2D(3, strides=2, padding=1),
                         L.AvgPool2D(2, strides=1, padding=1, count_include_pad=False),
                         L.AvgPool2D(3, strides=2, padding=1), L.UpSampling2D((2, 3)),
                         L.GlobalAvgPool2D()], (2, 7, 7), "normal"),
    ("global_pool_1d", lambda: [L.Conv1D(3, 2), L.GlobalAveragePooling1D(
        data_format="channels_first")], (2, 6), "normal"),
    ("global_max_1d", lambda: [L.GlobalMaxPooling1D()], (5, 3), "normal"),
    ("batchnorm", lambda: [L.Conv2D(3, 3), L.BatchNorm(), L.Flatten(), L.BatchNorm(affine=False),
                           L.Reshape((3, 4, 4)), L.BatchNorm(axis=-1)], (2, 6, 6), "normal"),
    ("layernorm", lambda: [L.LayerNorm(), L.LayerNorm((3, 4), elementwise_affine=False)],
     (3, 4), "normal"),
    ("embedding", lambda: [L.Embedding(10, 4, padding_idx=0), L.GlobalAveragePooling1D()], (6,),
     "ids"),
    ("simple_rnn", lambda: [L.SimpleRNN(4, return_sequences=True),
                            L.SimpleRNN(3, activation="relu")], (5, 3), "normal"),
    ("simple_rnn_activations", lambda: [
        L.SimpleRNN(4, activation="leaky_relu", return_sequences=True),
        L.SimpleRNN(4, activation="elu", return_sequences=True, use_bias=False),
        L.SimpleRNN(3, activation="sigmoid", return_sequences=True),
        L.SimpleRNN(2, activation="linear")], (5, 3), "normal"),
    ("lstm", lambda: [L.LSTM(4, return_sequences=True), L.LSTM(3)], (5, 3), "normal"),
    ("gru", lambda: [L.GRU(4, return_sequences=True), L.GRU(3, use_bias=False)], (5, 3),
     "normal"),
    ("bidirectional_concat", lambda: [L.Bidirectional(L.GRU(3, return_sequences=True)),
                                      L.Bidirectional(L.LSTM(2))], (5, 2), "normal"),
    ("bidirectional_merges", lambda: [
        L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="sum"),
        L.Bidirectional(L.SimpleRNN(3, return_sequences=True), merge_mode="mul"),
        L.Bidirectional(L.GRU(2), merge_mode="ave")], (5, 2), "normal"),
    ("time_distributed", lambda: [L.TimeDistributed(L.Conv2D(2, 3, activation="relu")),
                                  L.TimeDistributed(L.Flatten()),
                                  L.TimeDistributed(L.Dense(3, activation="softmax"))],
     (3, 1, 5, 5), "normal"),
    ("multi_head_attention", lambda: [L.MultiHeadAttention(8, 2),
                                      L.MultiHeadAttention(8, 4, causal=True, bias=False)],
     (5, 8), "normal"),
    ("transformer_post_norm", lambda: [L.PositionalEmbedding(8, 8),
                                       L.TransformerEncoderLayer(8, 2, 16, dropout=0.1)],
     (5, 8), "normal"),
    ("transformer_pre_norm_gelu_causal", lambda: [L.TransformerEncoderLayer(
        8, 2, 16, activation="gelu", norm_first=True, causal=True)], (5, 8), "normal"),
    # padding masks (mask_value): padding at the end, the start, in between, a row of it only
    ("masked_recurrent", lambda: [L.SimpleRNN(4, mask_value=0.0, return_sequences=True),
                                  L.LSTM(4, mask_value=0.0, return_sequences=True),
                                  L.GRU(3, mask_value=0.0)], (6, 3), "padded"),
    ("masked_recurrent_sequences", lambda: [L.GRU(3, mask_value=0.0, return_sequences=True)],
     (6, 3), "padded"),
    ("masked_bidirectional", lambda: [
        L.Bidirectional(L.LSTM(3, mask_value=0.0, return_sequences=True)),
        L.Bidirectional(L.GRU(2, mask_value=0.0, return_sequences=True), merge_mode="ave")],
     (6, 3), "padded"),
    ("masked_bidirectional_last", lambda: [L.Bidirectional(L.SimpleRNN(3, mask_value=0.0))],
     (6, 3), "padded"),
    ("masked_pools", lambda: [L.Dense(3, use_bias=False), L.TimeDistributed(L.Dense(3)),
                              L.GlobalMaxPooling1D(mask_value=0.0)], (6, 3), "padded"),
    ("masked_transformer", lambda: [
        L.PositionalEmbedding(8, 6, mask_value=0.0),
        L.MultiHeadAttention(6, 2, mask_value=0.0, causal=True),
        L.TransformerEncoderLayer(6, 2, 8, mask_value=0.0),
        L.GlobalAveragePooling1D(mask_value=0.0)], (6, 6), "padded"),
]


@pytest.mark.parametrize("layers, shape, kind", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_export_equals_predict(layers, shape, kind, tmp_path):
    model = _randomize(L.Sequential(layers(), seed=0).build(shape))
    rng = np.random.default_rng(1)
    if kind == "ids":
        X = rng.integers(0, 10, size=(7, *shape)).astype(np.float32)
    elif kind == "padded":
        X = _padded(rng, (7, *shape))
    else:
        X = rng.normal(size=(7, *shape)).astype(np.float32)
    _export_and_compare(model, X, tmp_path)


def test_every_layer_class_has_a_converter():
    classes = [getattr(L, n) for n in L.__all__]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, L.Layer)
               and c is not L.Layer]
    missing = [c.__name__ for c in classes
               if not any(k in onnx_export.CONVERTERS for k in c.__mro__)]
    assert missing == []


def test_trained_classifier_exports_what_predict_returns(tmp_path):
    """A softmax classifier fit with a loss fused to its output: the graph returns the
    probabilities ``predict`` returns, for batch sizes never used in training or export."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 1, 6, 6)).astype(np.float32)
    y = (X.mean(axis=(1, 2, 3)) > 0).astype(int) + (X[:, 0, 0, 0] > 1)
    model = L.Sequential([L.Conv2D(4, 3, padding="same", activation="relu", input_shape=(1, 6, 6)),
                          L.BatchNorm(), L.MaxPool2D(2), L.Flatten(), L.Dropout(0.2),
                          L.Dense(8, activation="relu"), L.Dense(3, activation="softmax")],
                         seed=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert model.loss.fused is not None  # trains on the logits
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "classifier.onnx"
    model.export(path)
    session = _session(path)
    for n in (13, 1, 0):  # an empty batch too (onnxruntime 1.32 aborts on one in LSTM/GRU)
        got = session.run(None, {"X": X[:n]})[0]
        np.testing.assert_allclose(got, model.predict(X[:n]), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_file_is_valid_onnx_with_dynamic_batch_and_named_io(tmp_path):
    model = L.Sequential([L.LSTM(4, input_shape=(5, 3)), L.LayerNorm(), L.Dense(2)], seed=0)
    path = tmp_path / "model.onnx"
    model.export(str(path), format="onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == \
        [onnx_export.OPSET]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("X", "y")  # model.input_specs / output_specs
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 5, 3]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 2]
    session = _session(path)
    for n in (1, 9):  # one session, several batch sizes
        X = np.random.default_rng(n).normal(size=(n, 5, 3)).astype(np.float32)
        np.testing.assert_allclose(session.run(None, {"X": X})[0], model.predict(X),
                                   rtol=RTOL, atol=ATOL)


class Squash(L.Layer):
    """A user layer that no converter knows."""

    def forward(self, params, X, training=False, rng=None):
        return X / (1 + abs(X)), None


def test_unexportable_layer_is_named_and_nothing_is_written(tmp_path):
    model = L.Sequential([L.Dense(3, input_shape=(2,)), Squash(name="squash")], seed=0)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match=r"layer 1 \(Squash 'squash'\).*no ONNX converter "
                                         r"for Squash"):
        model.export(path)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_unexportable_configuration_is_named(tmp_path):
    model = L.Sequential([L.Dense(4, input_shape=(5, 3)),
                          L.Bidirectional(L.SimpleRNN(2, activation="gelu"), name="birnn")])
    with pytest.raises(ValueError, match=r"layer 1 \(Bidirectional 'birnn'\).*"
                                         r"SimpleRNN\(activation='gelu'\)"):
        model.export(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_options_are_refused(tmp_path):
    model = L.Sequential([L.Dense(2, input_shape=(3,))])
    with pytest.raises(ValueError, match=r"format must be one of \['onnx'\], got 'tf_saved_model'"):
        model.export(tmp_path / "m", format="tf_saved_model")
    with pytest.raises(TypeError, match="opset"):
        model.export(tmp_path / "m.onnx", opset=11)
    with pytest.raises(TypeError, match=r"supports \['rddtensor.training.graph.GraphModel', "
                                        r"'rddtensor.training.sequential.Sequential'\]"
                                        r".*got object"):
        onnx_export.to_onnx(object())  # a model class without a walker
    assert list(tmp_path.iterdir()) == []


# --- graph models (L.Model(inputs, outputs)) ----------------------------------------------------
def _export_and_compare_graph(model, feeds: dict, tmp_path, batches=(7, 1)):
    """Export, then for each batch size (never used at export: the batch axis is symbolic) run
    the file with ``feeds`` (by input name) and compare every output with ``model.predict``."""
    path = tmp_path / "graph.onnx"
    model.export(path)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == [s.name for s in model.input_specs]
    assert [o.name for o in session.get_outputs()] == model.output_names
    for n in batches:
        rows = {k: v[:n] for k, v in feeds.items()}
        got = session.run(None, rows)
        want = model.predict(rows)
        want = want if isinstance(want, list) else [want]
        assert len(got) == len(want)
        for name, u, v in zip(model.output_names, got, want):
            assert u.shape == v.shape, name
            np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL, err_msg=name)
    return path


def test_graph_residual_cnn_exports(tmp_path):
    """Conv2D -> BatchNorm -> ReLU -> Conv2D -> BatchNorm, a projection shortcut, Add, ReLU and a
    softmax head; compiled with a loss fused to the softmax, the file still returns what
    ``predict`` returns, the probabilities."""
    x = L.Input((2, 6, 6), name="image")
    h = L.ReLU()(L.BatchNorm()(L.Conv2D(4, 3, padding="same")(x)))
    h = L.BatchNorm()(L.Conv2D(4, 3, padding="same")(h))
    y = L.ReLU()(L.Add()([h, L.Conv2D(4, 1)(x)]))
    probs = L.Dense(3, activation="softmax", name="probs")(L.GlobalAvgPool2D()(y))
    model = _randomize(L.Model(x, probs, seed=0))
    model.compile(loss="sparse_categorical_crossentropy")
    assert model.loss.fused is not None  # predict's softmax, not in forward(logits=True)
    X = np.random.default_rng(1).normal(size=(7, 2, 6, 6)).astype(np.float32)
    _export_and_compare_graph(model, {"image": X}, tmp_path, batches=(7, 1, 0))
    assert [o.name for o in onnx.load(str(tmp_path / "graph.onnx")).graph.output] == ["probs"]


def test_graph_two_inputs_with_concatenate_and_int_ids(tmp_path):
    """Two float sequences joined on the feature axis and an ``int64`` ids input (the graph
    casts it to float32 as ``predict`` does: ``Embedding`` reads it as ids, ``Dense`` as
    numbers), concatenated."""
    a, b = L.Input((3, 4), name="a"), L.Input((3, 2), name="b")
    ids = L.Input((5,), dtype="int64", name="ids")
    seq = L.Flatten()(L.Concatenate(axis=-1)([a, L.Dense(4, activation="tanh")(b), a]))
    emb = L.GlobalAveragePooling1D()(L.Embedding(10, 3)(ids))
    y = L.Dense(2)(L.Concatenate()([seq, emb, L.Dense(2)(ids)]))  # ids as numbers, too
    model = _randomize(L.Model([a, b, ids], y, seed=0))
    rng = np.random.default_rng(1)
    feeds = {"a": rng.normal(size=(7, 3, 4)).astype(np.float32),
             "b": rng.normal(size=(7, 3, 2)).astype(np.float32),
             "ids": rng.integers(0, 10, size=(7, 5)).astype(np.int64)}
    path = _export_and_compare_graph(model, feeds, tmp_path)
    elem = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(path)).graph.input}
    assert elem == {"a": onnx.TensorProto.FLOAT, "b": onnx.TensorProto.FLOAT,
                    "ids": onnx.TensorProto.INT64}


def test_graph_shared_layer_exports_one_set_of_weights(tmp_path):
    """A siamese model: one Dense called on both inputs (and a shared MultiHeadAttention on
    two sequences) exports one set of initializers that both calls read."""
    left, right = L.Input((4,), name="left"), L.Input((4,), name="right")
    shared = L.Dense(3, activation="tanh", name="shared")
    distance = L.Subtract()([shared(left), shared(right)])
    qa, qb = L.Input((3, 4), name="seq_a"), L.Input((3, 4), name="seq_b")
    mha = L.MultiHeadAttention(4, 2, name="mha")
    pooled = L.GlobalAveragePooling1D()(L.Add()([mha(qa), mha(qb)]))
    y = L.Dense(1, activation="sigmoid")(L.Concatenate()([distance, pooled]))
    model = _randomize(L.Model([left, right, qa, qb], y, seed=0))
    rng = np.random.default_rng(1)
    feeds = {k: rng.normal(size=(7, *s.shape)).astype(np.float32)
             for k, s in zip(["left", "right", "seq_a", "seq_b"], model.input_specs)}
    path = _export_and_compare_graph(model, feeds, tmp_path)
    graph = onnx.load(str(path)).graph
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer
               if i.data_type == onnx.TensorProto.FLOAT and i.name.split(".")[0] in ("0", "1")}
    # every float initializer of the shared layers (0: Dense, 1: MultiHeadAttention) once
    assert sum(w.size for w in weights.values()) == \
        model.layer_size(model.layers[0]) + model.layer_size(model.layers[1])
    readers = {name: sum(name in n.input for n in graph.node) for name in weights}
    assert readers == {name: 2 for name in weights}, readers  # each read by both calls


def test_graph_two_outputs_export_each_as_predict(tmp_path):
    """Two outputs, each named after its call, each what ``predict`` returns: a softmax and a
    sigmoid head trained with fused losses, and a hidden tensor that is also read by a head."""
    x = L.Input((6,), name="features")
    h = L.Dense(8, activation="relu", name="hidden")(x)
    cls = L.Dense(3, activation="softmax", name="cls")(h)
    score = L.Dense(1, activation="sigmoid", name="score")(L.Dropout(0.3)(h))
    model = _randomize(L.Model(x, [cls, score, h], seed=0))
    model.compile(loss=["sparse_categorical_crossentropy", "binary_crossentropy", "mse"])
    assert model.loss.fused[:2] != (None, None)
    assert model.output_names == ["cls", "score", "hidden"]
    X = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)
    _export_and_compare_graph(model, {"features": X}, tmp_path)


def test_graph_cross_attention_exports(tmp_path):
    """MultiHeadAttention on [query, key, value] (causal over a longer memory, padding in query
    and key) and on [query, value] (no bias), with a residual Add."""
    q = L.Input((4, 8), name="query")
    k, v = L.Input((6, 8), name="key"), L.Input((6, 8), name="value")
    h = L.MultiHeadAttention(8, 2, causal=True, mask_value=0.0)([q, k, v])
    h2 = L.MultiHeadAttention(8, 4, bias=False)([L.Add()([q, h]), v])
    y = L.Dense(2)(L.GlobalAveragePooling1D()(h2))
    model = _randomize(L.Model([q, k, v], [y, h], seed=0))
    rng = np.random.default_rng(1)
    feeds = {"query": _padded(rng, (7, 4, 8)), "key": _padded(rng, (7, 6, 8)),
             "value": rng.normal(size=(7, 6, 8)).astype(np.float32)}
    feeds["key"][4] = 0.0  # a row whose keys are all padding
    _export_and_compare_graph(model, feeds, tmp_path)


def test_graph_every_merge_layer_exports(tmp_path):
    """Add, Subtract, Multiply, Average (of 2 and 3 inputs), Concatenate on several axes and
    Dot (vectors, sequences, axes that need moving, normalize with a zero vector), one output
    each."""
    a, b, c = (L.Input((3, 4), name=n) for n in "abc")
    d = L.Input((5, 3), name="d")
    fa, fc = L.Flatten()(a), L.Flatten()(c)
    outputs = [L.Add()([a, b]), L.Add()([a, b, c]), L.Subtract()([a, c]),
               L.Multiply()([a, b, c]), L.Average()([a, b]), L.Average()([a, b, c]),
               L.Concatenate(axis=1)([a, b, c]), L.Concatenate(axis=-1)([a, b]),
               L.Concatenate(axis=2)([a, L.Dense(2)(c)]),
               L.Dot(axes=1)([fa, fc]), L.Dot(axes=1, normalize=True)([fa, fc]),
               L.Dot(axes=2)([a, b]), L.Dot(axes=(1, 2))([a, d]),
               L.Dot(axes=(-1, 2), normalize=True)([c, L.Dense(4)(d)])]
    model = _randomize(L.Model([a, b, c, d], outputs, seed=0))
    rng = np.random.default_rng(1)
    feeds = {s.name: rng.normal(size=(7, *s.shape)).astype(np.float32) for s in model.input_specs}
    feeds["c"][0] = 0.0  # a zero vector: the normalisation's eps
    _export_and_compare_graph(model, feeds, tmp_path)


def test_graph_unexportable_layer_is_named_with_its_call(tmp_path):
    x = L.Input((2,), name="x")
    squash = Squash(name="squash")
    model = L.Model(x, L.Add()([squash(x), squash(L.Dense(2)(x))]), seed=0)
    with pytest.raises(ValueError, match=r"layer 0 \(Squash 'squash'\) at node 0 \('squash\[0\]'\)"
                                         r".*no ONNX converter for Squash"):
        model.export(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
