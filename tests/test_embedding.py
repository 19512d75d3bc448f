"""Embedding: gradient check, PyTorch's nn.Embedding as the oracle, padding rows, id validation,
and Embedding(padding_idx=0) -> LSTM(mask_value=0.0) end to end."""
import json
import pickle

import numpy as np
import pytest
from gradcheck import check_grad

from rddtensor import layers as L
from rddtensor.layers.base import layer_class
from rddtensor.layers.embedding import Embedding
from rddtensor.layers.recurrent import LSTM

IDS = np.array([[1, 4, 4, 0], [9, 0, 3, 4], [2, 2, 2, 7]])


def _built(layer, input_shape, seed=0, dtype=np.float64):
    layer.build(input_shape)
    return layer.init_params(np.random.default_rng(seed), dtype=dtype)


# --- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 0, 4])
def test_gradcheck(padding_idx):
    layer = Embedding(10, 3, padding_idx=padding_idx)
    params = _built(layer, (4,), seed=1)
    params["W"] = np.random.default_rng(2).standard_normal((10, 3))
    Y, backprop = layer.forward(params, IDS)
    R = np.random.default_rng(3).standard_normal(Y.shape)
    dX, grads = backprop(R)
    assert dX is None  # ids are not differentiable
    if padding_idx is None:
        check_grad(lambda a: float(np.sum(layer({"W": a["W"]}, IDS) * R)), params, grads)
    else:  # torch semantics: the padding row's gradient is zero, the rest is the true gradient
        assert np.all(grads["W"][padding_idx] == 0)
        keep = np.ones((10, 1))
        keep[padding_idx] = 0
        W0 = params["W"]
        check_grad(lambda a: float(np.sum(layer({"W": W0 + keep * (a["W"] - W0)}, IDS) * R)),
                   params, grads)


def test_gradient_accumulates_repeated_ids():
    layer = Embedding(10, 2)
    params = _built(layer, (4,))
    _, backprop = layer.forward(params, IDS)
    dW = backprop(np.ones((3, 4, 2)))[1]["W"]
    counts = np.bincount(IDS.ravel(), minlength=10)
    np.testing.assert_array_equal(dW, np.repeat(counts[:, None], 2, axis=1).astype(float))


@pytest.mark.parametrize("padding_idx", [None, 0, 7, -1])
def test_matches_torch(padding_idx):
    torch = pytest.importorskip("torch")
    layer = Embedding(10, 5, padding_idx=padding_idx)
    params = _built(layer, (4,), seed=4, dtype=np.float32)
    emb = torch.nn.Embedding(10, 5, padding_idx=padding_idx)
    assert layer.padding_idx == emb.padding_idx  # a negative index is normalised alike
    if padding_idx is not None:
        assert np.all(params["W"][layer.padding_idx] == 0)  # zero-initialised, as in torch
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(params["W"]))
    ids = np.concatenate([IDS, [[9, 9, 7, 0]]])
    dY = np.random.default_rng(5).standard_normal((4, 4, 5)).astype(np.float32)
    Y, backprop = layer.forward(params, ids.astype(np.float32))  # floats holding ids are fine
    _, grads = backprop(dY)
    Yt = emb(torch.from_numpy(ids))
    Yt.backward(torch.from_numpy(dY))
    np.testing.assert_allclose(Y, Yt.detach(), rtol=0, atol=0)
    np.testing.assert_allclose(grads["W"], emb.weight.grad, rtol=1e-6, atol=1e-6)
    assert Y.dtype == grads["W"].dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.float32, np.float64])
def test_id_dtypes(dtype):
    layer = Embedding(10, 2)
    params = _built(layer, (4,))
    np.testing.assert_array_equal(layer(params, IDS.astype(dtype)), params["W"][IDS])


# --- padding -------------------------------------------------------------------------------------
def test_mask_zero_is_padding_idx_zero():
    a, b = Embedding(6, 3, mask_zero=True), Embedding(6, 3, padding_idx=0)
    assert a.padding_idx == 0
    pa, pb = _built(a, (2,)), _built(b, (2,))
    np.testing.assert_array_equal(pa["W"], pb["W"])
    assert np.all(pa["W"][0] == 0) and np.all(pa["W"][1:] != 0)
    assert Embedding(6, 3, mask_zero=True, padding_idx=0).padding_idx == 0


def test_padding_row_never_trains():
    m = L.Sequential([Embedding(8, 3, padding_idx=0, input_shape=(5,)), LSTM(4), L.Dense(2)],
                     seed=0)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    X = np.random.default_rng(0).integers(0, 8, (16, 5))
    m.fit(X, X[:, 0] % 2, epochs=3, batch_size=4, verbose=0)
    W = m.params["0.W"]
    assert np.all(W[0] == 0) and np.all(W[1:] != 0)


def _text_batch(seed=0):
    """Token ids 1..9, padded with 0 after each row's length."""
    lengths = [6, 3, 1, 4]
    X = np.random.default_rng(seed).integers(1, 10, (4, 6))
    for b, n in enumerate(lengths):
        X[b, n:] = 0
    return X, lengths


def test_embedding_then_masked_lstm_ignores_padding():
    """Embedding(padding_idx=0) + LSTM(mask_value=0.0): each row as if run alone, unpadded."""
    model = L.Sequential([Embedding(10, 3, padding_idx=0, input_shape=(6,)),
                          LSTM(4, return_sequences=True, mask_value=0.0),
                          LSTM(5, mask_value=0.0), L.Dense(2)], seed=1)
    model.build()
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    X, lengths = _text_batch()
    Y, backprop = model.forward(params, X)
    dY = np.random.default_rng(2).standard_normal(Y.shape)
    dX, grads = backprop(dY)
    assert dX is None  # Sequential passes the Embedding's None through
    total = {k: np.zeros_like(v) for k, v in grads.items()}
    for b, n in enumerate(lengths):
        Yb, bp = model.forward(params, X[b:b + 1, :n])
        np.testing.assert_allclose(Y[b], Yb[0], rtol=1e-12, atol=1e-12)
        for k, g in bp(dY[b:b + 1])[1].items():
            total[k] += g
    for k in grads:
        np.testing.assert_allclose(grads[k], total[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert np.all(grads["0.W"][0] == 0)
    # and padding more does not change anything
    Xlong = np.concatenate([X, np.zeros((4, 3), X.dtype)], axis=1)
    np.testing.assert_allclose(model.forward(params, Xlong)[0], Y, rtol=1e-12, atol=1e-12)


# --- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ids,match", [
    ([[1, 2], [3, 10]], r"Embedding layer 'tok': id 10 at row 1, position 1 is out of range: "
                        r"ids must be in \[0, 10\) \(input_dim=10\)"),
    ([[1, -1], [3, 4]], r"id -1 at row 0, position 1 is out of range"),
    ([[1.0, 2.5], [3, 4]], r"id 2.5 at row 0, position 1 is not a whole number"),
    ([[1.0, 2.0], [np.nan, 4]], r"id nan at row 1, position 0 is not a whole number"),
    ([[1.0, 2.0], [np.inf, 4]], r"id inf at row 1, position 0 is out of range"),
    ([[[1, 2], [3, 12]]], r"id 12 at row 0, position \(1, 1\) is out of range"),
    ([1, 2], r"expects a batch of ids \(batch, ...\), got shape \(2,\)"),
    ([["a", "b"]], "expects integer ids"),
])
def test_bad_ids_name_layer_id_and_row(ids, match):
    layer = Embedding(10, 2, name="tok")
    params = _built(layer, (2,))
    with pytest.raises(ValueError, match=match):
        layer.forward(params, np.asarray(ids))


def test_bad_ids_through_fit_name_the_layer():
    m = L.Sequential([Embedding(5, 2, input_shape=(3,)), LSTM(2), L.Dense(2)], seed=0)
    m.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"layer 0 \(Embedding layer\): Embedding layer: id 7 at "
                                         r"row 1, position 2 is out of range"):
        m.fit(np.array([[1, 2, 3], [0, 1, 7]]), np.array([0, 1]), batch_size=2, shuffle=False,
              verbose=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"input_dim": 0, "output_dim": 2}, "input_dim must be a positive integer, got 0"),
    ({"input_dim": 5, "output_dim": 2.0}, "output_dim must be a positive integer, got 2.0"),
    ({"input_dim": 5, "output_dim": 2, "padding_idx": 5},
     r"padding_idx must be None or an integer in \[-5, 5\) \(input_dim=5\), got 5"),
    ({"input_dim": 5, "output_dim": 2, "padding_idx": -6}, "padding_idx must be None"),
    ({"input_dim": 5, "output_dim": 2, "padding_idx": 1.0}, "padding_idx must be None"),
    ({"input_dim": 5, "output_dim": 2, "mask_zero": 1}, "mask_zero must be True or False, got 1"),
    ({"input_dim": 5, "output_dim": 2, "mask_zero": True, "padding_idx": 3},
     "mask_zero=True means padding_idx=0, got padding_idx=3"),
    ({"input_dim": 5, "output_dim": 2, "embeddings_initializer": "torch"},
     "unknown embeddings_initializer 'torch'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Embedding(**kwargs)


def test_build_needs_an_axis():
    with pytest.raises(ValueError, match="at least one axis"):
        Embedding(4, 2).build(())


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    Embedding(10, 3),
    Embedding(10, 3, padding_idx=-1, embeddings_initializer="normal", input_shape=(7,),
              name="tok"),
    Embedding(10, 3, mask_zero=True),
], ids=repr)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class("Embedding").from_config(cfg)
    assert clone.get_config() == cfg
    p, q = _built(layer, (4,)), _built(clone, (4,))
    np.testing.assert_array_equal(layer(p, IDS), clone(q, IDS))


def test_shapes_and_pickle():
    layer = Embedding(100, 8)
    assert layer.build((5, 2)) == (5, 2, 8)
    assert layer.param_shapes() == {"W": (100, 8)}
    params = layer.init_params(np.random.default_rng(0))
    layer.forward(params, np.zeros((4, 5, 2), int))
    assert len(pickle.dumps(layer)) < 1000
