"""SimpleRNN, LSTM, GRU, Bidirectional and TimeDistributed: gradient checks, PyTorch as the oracle
(forward, input and weight gradients, packed sequences), masking, config, errors."""
import json
import pickle

import numpy as np
import pytest
from gradcheck import check_grad, check_layer

from rddtensor import layers as L
from rddtensor.layers.base import layer_class
from rddtensor.layers.recurrent import GRU, LSTM, SimpleRNN, valid_steps
from rddtensor.layers.wrappers import Bidirectional, TimeDistributed, reverse_index

CELLS = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}
TORCH_NAMES = [("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"), ("b_ih", "bias_ih_l0"),
               ("b_hh", "bias_hh_l0")]
LENGTHS = [5, 2, 4, 1]  # a batch of 4 sequences padded to 5 steps


def _built(layer, input_shape, seed=0, dtype=np.float64):
    layer.build(input_shape)
    return layer.init_params(np.random.default_rng(seed), dtype=dtype)


def _padded(lengths, T, n_in, seed=0, pre=False):
    """Random sequences of the given lengths, zero-padded after (or before) the real steps."""
    X = np.random.default_rng(seed).standard_normal((len(lengths), T, n_in))
    for b, n in enumerate(lengths):
        if pre:
            X[b, :T - n] = 0.0
        else:
            X[b, n:] = 0.0
    return X


def check_masked(layer, X, *, seed=0, rtol=1e-5, atol=1e-7):
    """Gradient check of a masked layer: padded steps stay exactly padding under perturbation."""
    pad = ~valid_steps(X, 0.0)[:, :, None]
    layer.build(X.shape[1:])
    params = layer.init_params(np.random.default_rng(seed + 1), dtype=np.float64)
    Y, backprop = layer.forward(params, X)
    R = np.random.default_rng(seed).standard_normal(Y.shape)
    dX, grads = backprop(R)
    assert np.all(dX[np.broadcast_to(pad, X.shape)] == 0)  # padding gets no gradient

    def f(arrs):
        p = {k: arrs["p." + k] for k in params}
        return float(np.sum(layer(p, np.where(pad, 0.0, arrs["X"])) * R))

    check_grad(f, {"X": X, **{"p." + k: v for k, v in params.items()}},
               {"X": dX, **{"p." + k: g for k, g in grads.items()}}, rtol=rtol, atol=atol)
    return Y, dX, grads


# --- gradient checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck(cell, return_sequences):
    check_layer(CELLS[cell](4, return_sequences=return_sequences), (5, 3), batch=3)


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck_masked(cell, return_sequences):
    X = _padded(LENGTHS, 5, 3, seed=1)
    X[1, 3] = X[2, 0]  # a real step after a padded one: padding need not be at the end
    check_masked(CELLS[cell](4, return_sequences=return_sequences, mask_value=0.0), X)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_gradcheck_simple_rnn_activations(activation):
    check_layer(SimpleRNN(3, activation=activation, return_sequences=True), (4, 2), batch=3)


@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck_without_bias(cell):
    check_layer(CELLS[cell](3, use_bias=False, return_sequences=True), (4, 2), batch=2)


def test_gradcheck_per_element_tiny():
    check_layer(GRU(2, return_sequences=True), (3, 2), batch=2, per_element=True)
    check_layer(LSTM(2), (3, 2), batch=2, per_element=True)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave"])
def test_gradcheck_bidirectional(merge_mode):
    check_layer(Bidirectional(LSTM(3, return_sequences=True), merge_mode=merge_mode), (4, 2),
                batch=3)
    check_layer(Bidirectional(GRU(3), merge_mode=merge_mode), (4, 2), batch=2)


@pytest.mark.parametrize("merge_mode", ["concat", "mul"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_gradcheck_bidirectional_masked(return_sequences, merge_mode):
    X = _padded(LENGTHS, 5, 3, seed=2)
    X[3, 3] = X[0, 1]  # row 3: real steps 0 and 3 around padding
    check_masked(Bidirectional(LSTM(3, return_sequences=return_sequences, mask_value=0.0),
                               merge_mode=merge_mode), X)


def test_gradcheck_time_distributed_dense():
    check_layer(TimeDistributed(L.Dense(3, activation="tanh")), (4, 5), batch=2)


# --- PyTorch as the oracle ---------------------------------------------------------------------
def _torch_module(torch, cell, n_in, units, params, dtype, bidirectional=False):
    cls = {"SimpleRNN": torch.nn.RNN, "LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[cell]
    m = cls(n_in, units, batch_first=True, bidirectional=bidirectional, dtype=dtype)
    sources = [("forward.", ""), ("backward.", "_reverse")] if bidirectional else [("", "")]
    with torch.no_grad():
        for prefix, suffix in sources:
            for ours, theirs in TORCH_NAMES:
                getattr(m, theirs + suffix).copy_(torch.from_numpy(params[prefix + ours]))
    return m


def _assert_grads_match(grads, m, sources=(("", ""),), rtol=1e-10, atol=1e-12):
    for prefix, suffix in sources:
        for ours, theirs in TORCH_NAMES:
            np.testing.assert_allclose(grads[prefix + ours], getattr(m, theirs + suffix).grad,
                                       rtol=rtol, atol=atol, err_msg=prefix + ours)


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_torch(cell, return_sequences):
    torch = pytest.importorskip("torch")
    layer = CELLS[cell](6, return_sequences=return_sequences)
    params = _built(layer, (7, 4), seed=1)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3, 7, 4))
    Y, backprop = layer.forward(params, X)
    dY = rng.standard_normal(Y.shape)
    dX, grads = backprop(dY)

    m = _torch_module(torch, cell, 4, 6, params, torch.float64)
    Xt = torch.tensor(X, requires_grad=True)
    out, h_n = m(Xt)
    h_n = h_n[0] if cell == "LSTM" else h_n
    Yt = out if return_sequences else out[:, -1]
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach(), rtol=1e-12, atol=1e-12)
    if not return_sequences:
        np.testing.assert_allclose(Y, h_n[0].detach(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad, rtol=1e-10, atol=1e-12)
    _assert_grads_match(grads, m)


@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_torch_float32(cell):
    torch = pytest.importorskip("torch")
    layer = CELLS[cell](8, return_sequences=True)
    params = _built(layer, (6, 5), seed=3, dtype=np.float32)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((4, 6, 5)).astype(np.float32)
    dY = rng.standard_normal((4, 6, 8)).astype(np.float32)
    Y, backprop = layer.forward(params, X)
    dX, grads = backprop(dY)
    assert Y.dtype == dX.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    m = _torch_module(torch, cell, 5, 8, params, torch.float32)
    Xt = torch.tensor(X, requires_grad=True)
    out = m(Xt)[0]
    out.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, out.detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dX, Xt.grad, rtol=1e-4, atol=1e-5)
    _assert_grads_match(grads, m, rtol=1e-4, atol=1e-5)


def _torch_packed(torch, m, X, lengths):
    """Run ``m`` on a packed batch; return (padded outputs, final h) and the input tensor."""
    nn_utils = torch.nn.utils.rnn
    Xt = torch.tensor(X, requires_grad=True)
    packed = nn_utils.pack_padded_sequence(Xt, torch.tensor(lengths), batch_first=True,
                                           enforce_sorted=False)
    out, h_n = m(packed)
    out, _ = nn_utils.pad_packed_sequence(out, batch_first=True, total_length=X.shape[1])
    h_n = h_n[0] if isinstance(h_n, tuple) else h_n
    return out, h_n, Xt


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_masked_matches_torch_packed_sequence(cell, return_sequences):
    torch = pytest.importorskip("torch")
    layer = CELLS[cell](5, return_sequences=return_sequences, mask_value=0.0)
    params = _built(layer, (5, 3), seed=5)
    X = _padded(LENGTHS, 5, 3, seed=6)
    Y, backprop = layer.forward(params, X)
    dY = np.random.default_rng(7).standard_normal(Y.shape)
    dX, grads = backprop(dY)

    m = _torch_module(torch, cell, 3, 5, params, torch.float64)
    out, h_n, Xt = _torch_packed(torch, m, X, LENGTHS)
    Yt = out if return_sequences else h_n[0]
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad, rtol=1e-10, atol=1e-12)
    _assert_grads_match(grads, m)


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_bidirectional_matches_torch(cell, return_sequences):
    torch = pytest.importorskip("torch")
    layer = Bidirectional(CELLS[cell](4, return_sequences=return_sequences))
    params = _built(layer, (6, 3), seed=8)
    rng = np.random.default_rng(9)
    X = rng.standard_normal((2, 6, 3))
    Y, backprop = layer.forward(params, X)
    dY = rng.standard_normal(Y.shape)
    dX, grads = backprop(dY)

    m = _torch_module(torch, cell, 3, 4, params, torch.float64, bidirectional=True)
    Xt = torch.tensor(X, requires_grad=True)
    out, h_n = m(Xt)
    h_n = h_n[0] if cell == "LSTM" else h_n
    Yt = out if return_sequences else torch.cat([h_n[0], h_n[1]], dim=-1)
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad, rtol=1e-10, atol=1e-12)
    _assert_grads_match(grads, m, [("forward.", ""), ("backward.", "_reverse")])


@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_masked_matches_torch_packed_sequence(return_sequences):
    torch = pytest.importorskip("torch")
    layer = Bidirectional(GRU(4, return_sequences=return_sequences, mask_value=0.0))
    params = _built(layer, (5, 3), seed=10)
    X = _padded(LENGTHS, 5, 3, seed=11)
    Y, backprop = layer.forward(params, X)
    dY = np.random.default_rng(12).standard_normal(Y.shape)
    dX, grads = backprop(dY)

    m = _torch_module(torch, "GRU", 3, 4, params, torch.float64, bidirectional=True)
    out, h_n, Xt = _torch_packed(torch, m, X, LENGTHS)
    Yt = out if return_sequences else torch.cat([h_n[0], h_n[1]], dim=-1)
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad, rtol=1e-10, atol=1e-12)
    _assert_grads_match(grads, m, [("forward.", ""), ("backward.", "_reverse")])


# --- masking -----------------------------------------------------------------------------------
def _per_sequence(layer, params, X, dY, lengths, pre):
    """Outputs, input grads and summed weight grads of each sequence run alone, unpadded."""
    T = X.shape[1]
    Ys, dXs, total = [], [], None
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if pre else slice(0, n)
        Yb, bp = layer.forward(params, X[b:b + 1, sl])
        dYb = dY[b:b + 1, sl] if dY.ndim == 3 else dY[b:b + 1]
        dXb, g = bp(dYb)
        Ys.append(Yb[0])
        dXs.append(dXb[0])
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return Ys, dXs, total


@pytest.mark.parametrize("pre", [False, True], ids=["post_padding", "pre_padding"])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("layer_fn", [
    lambda rs: LSTM(4, return_sequences=rs, mask_value=0.0),
    lambda rs: GRU(4, return_sequences=rs, mask_value=0.0),
    lambda rs: SimpleRNN(4, return_sequences=rs, mask_value=0.0),
    lambda rs: Bidirectional(LSTM(3, return_sequences=rs, mask_value=0.0), merge_mode="sum"),
], ids=["LSTM", "GRU", "SimpleRNN", "Bidirectional"])
def test_masked_batch_equals_per_sequence_runs(layer_fn, return_sequences, pre):
    layer = layer_fn(return_sequences)
    params = _built(layer, (5, 3), seed=13)
    X = _padded(LENGTHS, 5, 3, seed=14, pre=pre)
    Y, backprop = layer.forward(params, X)
    dY = np.random.default_rng(15).standard_normal(Y.shape)
    dX, grads = backprop(dY)
    Ys, dXs, total = _per_sequence(layer, params, X, dY, LENGTHS, pre)
    for b, n in enumerate(LENGTHS):
        sl = slice(5 - n, 5) if pre else slice(0, n)
        pad = slice(0, 5 - n) if pre else slice(n, 5)
        np.testing.assert_allclose(dX[b, sl], dXs[b], rtol=1e-12, atol=1e-12)
        assert np.all(dX[b, pad] == 0)
        if return_sequences:
            np.testing.assert_allclose(Y[b, sl], Ys[b], rtol=1e-12, atol=1e-12)
            assert np.all(Y[b, pad] == 0)
        else:
            np.testing.assert_allclose(Y[b], Ys[b], rtol=1e-12, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], total[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_stacked_masked_layers_skip_the_same_steps():
    """A return_sequences layer outputs zeros at padding, so the next masked layer skips them."""
    model = L.Sequential([LSTM(4, return_sequences=True, mask_value=0.0, input_shape=(5, 3)),
                          GRU(3, mask_value=0.0)], seed=0)
    model.build()
    X = _padded(LENGTHS, 5, 3, seed=16).astype(np.float32)
    Y = model.predict(X)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(Y[b], model.forward(model.params, X[b:b + 1, :n])[0][0],
                                   rtol=1e-6, atol=1e-7)


def test_all_padded_row_outputs_zero_state():
    layer = LSTM(3, mask_value=0.0)
    params = _built(layer, (4, 2))
    X = np.random.default_rng(0).standard_normal((2, 4, 2))
    X[1] = 0.0
    Y, backprop = layer.forward(params, X)
    assert np.all(Y[1] == 0) and np.any(Y[0] != 0)
    dX, _ = backprop(np.ones_like(Y))
    assert np.all(dX[1] == 0)


def test_mask_value_other_than_zero():
    layer = GRU(3, return_sequences=True, mask_value=-1.0)
    params = _built(layer, (4, 2))
    X = np.random.default_rng(1).standard_normal((1, 4, 2))
    X[0, 2:] = -1.0
    Y = layer(params, X)
    np.testing.assert_allclose(Y[0, :2], layer(params, X[:, :2])[0], rtol=1e-12)
    assert np.all(Y[0, 2:] == 0)
    # a step with only SOME features equal to mask_value is real
    X[0, 3, 0] = 0.5
    assert np.any(layer(params, X)[0, 3] != 0)


def test_reverse_index_reverses_real_steps_in_place():
    valid = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0],
                      [1, 1, 1, 1, 1]], dtype=bool)
    idx = reverse_index(valid, np)
    np.testing.assert_array_equal(idx, [[2, 1, 0, 3, 4], [0, 1, 4, 3, 2], [4, 1, 2, 3, 0],
                                        [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    np.testing.assert_array_equal(np.take_along_axis(idx, idx, axis=1),
                                  np.broadcast_to(np.arange(5), (5, 5)))  # its own inverse


# --- TimeDistributed ---------------------------------------------------------------------------
def test_time_distributed_dense_equals_dense_on_3d():
    td, dense = TimeDistributed(L.Dense(3, activation="relu")), L.Dense(3, activation="relu")
    params = _built(td, (4, 5), seed=1)
    assert set(params) == {"layer.W", "layer.b"}
    dense.build((4, 5))
    inner = {"W": params["layer.W"], "b": params["layer.b"]}
    X = np.random.default_rng(2).standard_normal((2, 4, 5))
    Y, bp = td.forward(params, X)
    Yd, bpd = dense.forward(inner, X)
    np.testing.assert_allclose(Y, Yd, rtol=1e-12)
    dY = np.random.default_rng(3).standard_normal(Y.shape)
    (dX, g), (dXd, gd) = bp(dY), bpd(dY)
    np.testing.assert_allclose(dX, dXd, rtol=1e-12)
    np.testing.assert_allclose(g["layer.W"], gd["W"], rtol=1e-12)


def test_time_distributed_keeps_none_input_gradient():
    from rddtensor.layers.embedding import Embedding
    td = TimeDistributed(Embedding(10, 2))
    params = _built(td, (3, 4))
    Y, bp = td.forward(params, np.random.default_rng(0).integers(0, 10, (2, 3, 4)))
    assert Y.shape == (2, 3, 4, 2)
    dX, g = bp(np.ones_like(Y))
    assert dX is None and g["layer.W"].sum() == 2 * 3 * 4 * 2


def test_time_distributed_passes_training_and_rng():
    td = TimeDistributed(L.Dropout(0.5))
    td.build((3, 4))
    X = np.ones((2, 3, 4))
    assert np.all(td.forward({}, X, training=False)[0] == 1)
    Y, _ = td.forward({}, X, training=True, rng=np.random.default_rng(0))
    assert set(np.unique(Y)) == {0.0, 2.0}


# --- in a model ----------------------------------------------------------------------------------
def test_sequential_keys_are_dotted_and_unique():
    model = L.Sequential([
        Bidirectional(LSTM(4, return_sequences=True), input_shape=(6, 3)),
        TimeDistributed(L.Dense(2)),
        GRU(3),
    ], seed=0)
    model.build()
    assert model.layout.keys == [
        "0.forward.W_ih", "0.forward.W_hh", "0.forward.b_ih", "0.forward.b_hh",
        "0.backward.W_ih", "0.backward.W_hh", "0.backward.b_ih", "0.backward.b_hh",
        "1.layer.W", "1.layer.b", "2.W_ih", "2.W_hh", "2.b_ih", "2.b_hh"]
    assert model.layout.shapes["0.backward.W_ih"] == (16, 3)
    assert model.layout.shapes["1.layer.W"] == (2, 8)
    assert model.output_shape == (3,)
    # the two directions start from different weights
    assert not np.allclose(model.params["0.forward.W_ih"], model.params["0.backward.W_ih"])


def test_save_and_load_round_trip(tmp_path):
    model = L.Sequential([
        Bidirectional(GRU(4, return_sequences=True, mask_value=0.0), merge_mode="ave",
                      input_shape=(5, 3)),
        TimeDistributed(L.Dense(2, activation="tanh")),
        SimpleRNN(3, activation="relu"),
        L.Dense(2),
    ], seed=3)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    X = _padded(LENGTHS, 5, 3).astype(np.float32)
    model.fit(X, np.array([0, 1, 0, 1]), epochs=2, batch_size=2, verbose=0)
    model.save(str(tmp_path / "m"))
    loaded = L.load_model(str(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.get_config() == model.get_config()


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,shape", [
    (LSTM(3), (4, 2)),
    (LSTM(5, return_sequences=True, mask_value=0.0, use_bias=False, input_shape=(4, 2),
          name="enc"), (4, 2)),
    (GRU(2, kernel_initializer="glorot_uniform", recurrent_initializer="he_normal",
         bias_initializer="zeros"), (4, 2)),
    (SimpleRNN(4, activation="relu", mask_value=-1.5), (4, 2)),
    (SimpleRNN(4, activation=L.LeakyReLU(0.2)), (4, 2)),
    (Bidirectional(LSTM(3, return_sequences=True), merge_mode="mul"), (4, 2)),
    (Bidirectional(GRU(3, mask_value=0.0, input_shape=(4, 2)), name="bi"), (4, 2)),
    (TimeDistributed(L.Dense(3, activation="relu")), (4, 2)),
    (TimeDistributed(Bidirectional(GRU(2))), (3, 4, 2)),
], ids=lambda v: repr(v) if not isinstance(v, tuple) else "")
def test_config_round_trip(layer, shape):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class(type(layer).__name__).from_config(cfg)
    assert clone.get_config() == cfg
    p, q = _built(layer, shape, seed=0), _built(clone, shape, seed=0)
    X = np.random.default_rng(1).standard_normal((3, *shape))
    np.testing.assert_array_equal(layer(p, X), clone(q, X))


def test_nested_config_shape():
    cfg = Bidirectional(LSTM(3), merge_mode="sum").get_config()
    assert cfg["layer"]["class_name"] == "LSTM"
    assert cfg["layer"]["config"]["units"] == 3 and cfg["merge_mode"] == "sum"


def test_default_init_is_torch_uniform():
    layer = LSTM(16)
    params = _built(layer, (3, 8), seed=0)
    bound = 1 / np.sqrt(16)
    for k, v in params.items():
        assert np.all(np.abs(v) <= bound) and v.std() > bound / 3, k


def test_pickles_small():
    layer = Bidirectional(LSTM(32, return_sequences=True))
    params = _built(layer, (20, 16))
    layer.forward(params, np.ones((8, 20, 16)))
    assert len(pickle.dumps(layer)) < 3000


@pytest.mark.parametrize("cell", list(CELLS))
def test_empty_batch_and_float32(cell):
    layer = CELLS[cell](3, return_sequences=True)
    params = _built(layer, (4, 2), dtype=np.float32)
    Y, backprop = layer.forward(params, np.zeros((0, 4, 2), np.float32))
    dX, grads = backprop(np.zeros((0, 4, 3), np.float32))
    assert Y.shape == (0, 4, 3) and dX.shape == (0, 4, 2) and Y.dtype == np.float32
    assert all(np.all(g == 0) and g.dtype == np.float32 for g in grads.values())


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: LSTM(0), "units must be a positive integer, got 0"),
    (lambda: GRU(2.5), "units must be a positive integer, got 2.5"),
    (lambda: LSTM(3, return_sequences="yes"), "return_sequences must be True or False, got 'yes'"),
    (lambda: LSTM(3, mask_value="pad"), "mask_value must be a finite number or None, got 'pad'"),
    (lambda: GRU(3, mask_value=float("nan")), "mask_value must be a finite number"),
    (lambda: GRU(3, use_bias=1), "use_bias must be True or False, got 1"),
    (lambda: LSTM(3, kernel_initializer="xavier"), "unknown kernel_initializer 'xavier'"),
    (lambda: LSTM(3, recurrent_initializer="orthogonal"), "unknown recurrent_initializer"),
    (lambda: LSTM(3, bias_initializer=1), "unknown bias_initializer 1"),
    (lambda: SimpleRNN(3, activation="swish"), "unknown activation 'swish'"),
    (lambda: LSTM(3, input_shape=(0, 2)), "input_shape"),
    (lambda: Bidirectional(L.Dense(3)), "layer must be a recurrent layer .* got Dense"),
    (lambda: Bidirectional("LSTM"), "layer must be a Layer instance, got str"),
    (lambda: Bidirectional(LSTM(3), merge_mode="max"), "merge_mode must be one of"),
    (lambda: TimeDistributed(None), "layer must be a Layer instance, got NoneType"),
    (lambda: Bidirectional.from_config({"layer": {"units": 3}}), "layer must be a Layer or a dict"),
    (lambda: TimeDistributed.from_config({"layer": {"class_name": "Nope"}}),
     "unknown layer type 'Nope'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_shapes():
    layer = LSTM(3, name="enc")
    params = _built(layer, (4, 2))
    with pytest.raises(ValueError, match=r"LSTM layer 'enc' expects inputs with 2 features "
                                         r"\(last axis\), got 5"):
        layer.forward(params, np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, time, features\)"):
        layer.forward(params, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"needs a per-sample input shape \(time, features\)"):
        GRU(2).build((4,))
    with pytest.raises(ValueError, match="at least two axes"):
        TimeDistributed(L.Dense(2)).build((4,))
    with pytest.raises(ValueError, match="no input shape yet"):
        GRU(2).param_shapes()


def test_error_through_sequential_names_the_layer():
    model = L.Sequential([LSTM(2, input_shape=(5, 3))], seed=0)
    model.build()
    with pytest.raises(ValueError, match=r"layer 0 \(LSTM layer\): LSTM layer expects inputs "
                                         r"with 3 features"):
        model.forward(model.params, np.zeros((1, 5, 7), np.float32))
