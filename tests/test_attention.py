"""Attention layers (``rddtensor.layers.attention``) and the global 1-D poolings.

Gradient checks (float64, every parameter and the input, with causal and padding masks and with
dropout in training), PyTorch as the oracle (``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` with ``batch_first=True``: outputs and gradients; a whole
Embedding -> PositionalEmbedding -> TransformerEncoderLayer -> pooling -> Dense model trained
three Adam steps), a small Transformer learning an order-dependent token task, and config, save /
load, summary and errors.
"""
from __future__ import annotations

import doctest
import json
import pickle

import numpy as np
import pytest
from gradcheck import check_grad, check_layer

from rddtensor import layers as L
from rddtensor.layers import attention, pooling
from rddtensor.layers.base import layer_class
from rddtensor.optim import Adam

TEL_KEYS = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
            "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
            "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]


# --- helpers ------------------------------------------------------------------------------------
def _random_params(layer, input_shape, seed=0, scale=0.5, dtype=np.float64):
    """float64 params with every entry random (biases and norm weights included)."""
    layer.build(tuple(input_shape))
    params = layer.init_params(np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    out = {}
    for k, v in params.items():
        r = rng.standard_normal(v.shape) * scale
        out[k] = (r + 1.0 if k.startswith("norm") and k.endswith("weight") else r).astype(dtype)
    return out


def _padded(N, T, E, seed=0):
    """Random ``(N, T, E)`` with zero (padded) steps: after the end, before the start, between."""
    X = np.random.default_rng(seed).standard_normal((N, T, E))
    X[0, T - 2:] = 0.0
    if N > 1:
        X[1, :2] = 0.0
    if N > 2:
        X[2, 1] = 0.0
    return X


def _valid(X):
    return np.any(X != 0.0, axis=-1)


def check_masked(layer, X, *, params=None, training=False, pad_gets_gradient=False, seed=0,
                 axis=-1, per_element=False):
    """Gradient check of a layer with ``mask_value=0.0``: padded steps (all features 0) stay
    exactly padding under the perturbation (the mask is a step function of ``X``)."""
    pad = ~np.any(X != 0.0, axis=axis, keepdims=True)
    layer.build(X.shape[1:])
    if params is None:
        params = _random_params(layer, X.shape[1:], seed)
    Y, backprop = layer.forward(params, X, training=training, rng=np.random.default_rng(seed))
    R = np.random.default_rng(seed + 1).standard_normal(Y.shape)
    dX, grads = backprop(R)
    padded = np.broadcast_to(pad, X.shape)
    if not pad_gets_gradient:
        assert np.all(dX[padded] == 0)  # padding gets no gradient
    dX = np.where(padded, 0.0, dX)

    def f(arrs):
        p = {k: arrs["p." + k] for k in params}
        Yp, _ = layer.forward(p, np.where(pad, 0.0, arrs["X"]), training=training,
                              rng=np.random.default_rng(seed))
        return float(np.sum(Yp * R))

    check_grad(f, {"X": X, **{"p." + k: v for k, v in params.items()}},
               {"X": dX, **{"p." + k: g for k, g in grads.items()}}, per_element=per_element)
    return Y, dX, grads


def _torch_mha(torch, layer, params):
    m = torch.nn.MultiheadAttention(layer.embed_dim, layer.num_heads, bias=layer.bias,
                                    batch_first=True, dtype=torch.float64)
    assert [n for n, _ in m.named_parameters()] == list(params)  # same names, same order
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return m


def _torch_tel(torch, layer, params, dtype=None):
    dtype = dtype or torch.float64
    m = torch.nn.TransformerEncoderLayer(
        layer.d_model, layer.nhead, layer.dim_feedforward, dropout=0.0,
        activation=layer.activation, layer_norm_eps=layer.layer_norm_eps, batch_first=True,
        norm_first=layer.norm_first, dtype=dtype)
    assert [n for n, _ in m.named_parameters()] == TEL_KEYS == list(params)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return m


def _causal_mask(torch, T, dtype):
    return torch.triu(torch.full((T, T), float("-inf"), dtype=dtype), 1)


# --- gradient checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_mha(causal, bias):
    layer = attention.MultiHeadAttention(8, 2, bias=bias, causal=causal)
    check_layer(layer, (5, 8), batch=3, params=_random_params(layer, (5, 8)))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_mha_padding_mask(causal):
    layer = attention.MultiHeadAttention(8, 4, causal=causal, mask_value=0.0)
    X = _padded(3, 6, 8)
    X[0] = 0.0  # a row of padding only: no NaN, zero output
    Y, _, _ = check_masked(layer, X)
    assert np.all(Y[~_valid(X)] == 0) and np.all(np.isfinite(Y))


def test_gradcheck_mha_dropout_in_training():
    layer = attention.MultiHeadAttention(8, 2, dropout=0.3)
    check_layer(layer, (5, 8), batch=2, training=True, params=_random_params(layer, (5, 8)))


def test_gradcheck_mha_per_element_tiny():
    layer = attention.MultiHeadAttention(4, 2, causal=True)
    check_layer(layer, (3, 4), batch=2, params=_random_params(layer, (3, 4)), per_element=True)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradcheck_transformer_encoder_layer(activation, norm_first):
    layer = attention.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                              activation=activation, norm_first=norm_first)
    check_layer(layer, (5, 8), batch=2, params=_random_params(layer, (5, 8)))


@pytest.mark.parametrize("norm_first", [False, True])
def test_gradcheck_transformer_encoder_layer_masked_causal_dropout(norm_first):
    layer = attention.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.2,
                                              norm_first=norm_first, causal=True, mask_value=0.0)
    X = _padded(3, 6, 8, seed=3)
    Y, _, _ = check_masked(layer, X, training=True)
    assert np.all(Y[~_valid(X)] == 0)


@pytest.mark.parametrize("mask_value", [None, 0.0])
def test_gradcheck_positional_embedding(mask_value):
    layer = attention.PositionalEmbedding(7, 4, mask_value=mask_value)
    X = _padded(3, 5, 4)
    if mask_value is None:
        Y, _, grads = check_layer(layer, (5, 4), X=X, per_element=True)
    else:  # the gradient at a padded step is dY (Y = X there), holding the mask fixed
        Y, _, grads = check_masked(layer, X, pad_gets_gradient=True, per_element=True)
        assert np.all(Y[~_valid(X)] == 0)  # padding stays padding
    assert np.all(grads["W"][5:] == 0)  # rows past the sequence get nothing


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("mask_value", [None, 0.0])
@pytest.mark.parametrize("cls", [pooling.GlobalAveragePooling1D, pooling.GlobalMaxPooling1D])
def test_gradcheck_global_pooling_1d(cls, mask_value, data_format):
    X = _padded(4, 5, 3, seed=4)
    X[3] = 0.0  # all padding
    if mask_value is None:  # no ties for the maximum
        X = np.random.default_rng(4).standard_normal(X.shape)
    if data_format == "channels_first":
        X = X.transpose(0, 2, 1).copy()
    layer = cls(data_format=data_format, mask_value=mask_value)
    if mask_value is None:
        Y, _, _ = check_layer(layer, X.shape[1:], X=X, per_element=True)
    else:
        Y, _, _ = check_masked(layer, X, per_element=True,
                               axis=2 if data_format == "channels_last" else 1)
    assert Y.shape == (4, 3)
    if mask_value is not None:  # a row of padding only gives zeros
        assert np.all(Y[3] == 0)


def test_global_pooling_1d_values():
    X = np.array([[[1.0, -2.0], [3.0, -4.0], [0.0, 0.0]]])
    np.testing.assert_allclose(L.GlobalAveragePooling1D()(None, X), [[4 / 3, -2.0]])
    np.testing.assert_allclose(L.GlobalAveragePooling1D(mask_value=0.0)(None, X), [[2.0, -3.0]])
    np.testing.assert_allclose(L.GlobalMaxPooling1D()(None, X), [[3.0, 0.0]])
    np.testing.assert_allclose(L.GlobalMaxPooling1D(mask_value=0.0)(None, X), [[3.0, -2.0]])
    Xcf = X.transpose(0, 2, 1)
    np.testing.assert_allclose(L.GlobalAveragePooling1D(data_format="channels_first")(None, Xcf),
                               [[4 / 3, -2.0]])
    assert L.GlobalAveragePooling2D is L.GlobalAvgPool2D  # Keras' name for the existing layer


# --- PyTorch as the oracle ------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_matches_torch(causal, padding):
    torch = pytest.importorskip("torch")
    layer = attention.MultiHeadAttention(12, 3, causal=causal,
                                         mask_value=0.0 if padding else None)
    params = _random_params(layer, (7, 12), seed=1)
    X = _padded(4, 7, 12, seed=2) if padding else np.random.default_rng(2).standard_normal(
        (4, 7, 12))
    valid = _valid(X)
    m = _torch_mha(torch, layer, params)
    Xt = torch.from_numpy(X).requires_grad_(True)
    kwargs = {"need_weights": False}
    if causal:
        kwargs["attn_mask"] = _causal_mask(torch, 7, torch.float64)
    if padding:  # a float mask (0 / -inf), the same type as attn_mask
        kwargs["key_padding_mask"] = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(
            torch.from_numpy(~valid), float("-inf"))
    Yt = m(Xt, Xt, Xt, **kwargs)[0]
    Y, backprop = layer.forward(params, X)
    real = valid[..., None]  # PyTorch computes something at padded queries; ours is 0 there
    np.testing.assert_allclose(Y * real, Yt.detach().numpy() * real, rtol=1e-10, atol=1e-12)
    R = np.random.default_rng(3).standard_normal(Y.shape) * real
    dX, grads = backprop(R)
    (Yt * torch.from_numpy(R)).sum().backward()
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    for name, p in m.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_mha_without_bias_matches_torch_float32():
    torch = pytest.importorskip("torch")
    layer = attention.MultiHeadAttention(16, 4, bias=False, causal=True)
    params = _random_params(layer, (9, 16), seed=5, dtype=np.float32)
    m = torch.nn.MultiheadAttention(16, 4, bias=False, batch_first=True)
    assert [n for n, _ in m.named_parameters()] == list(params) == ["in_proj_weight",
                                                                    "out_proj.weight"]
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    X = np.random.default_rng(6).standard_normal((3, 9, 16)).astype(np.float32)
    Y, backprop = layer.forward(params, X)
    dX, grads = backprop(np.ones_like(Y))
    assert Y.dtype == dX.dtype == np.float32 and all(g.dtype == np.float32
                                                     for g in grads.values())
    Xt = torch.from_numpy(X)
    Yt = m(Xt, Xt, Xt, attn_mask=_causal_mask(torch, 9, torch.float32), need_weights=False)[0]
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer_matches_torch(activation, norm_first):
    torch = pytest.importorskip("torch")
    layer = attention.TransformerEncoderLayer(12, 3, dim_feedforward=20, dropout=0.0,
                                              activation=activation, norm_first=norm_first)
    params = _random_params(layer, (6, 12), seed=7)
    m = _torch_tel(torch, layer, params)
    X = np.random.default_rng(8).standard_normal((3, 6, 12))
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt = m(Xt)
    Y, backprop = layer.forward(params, X, training=True)
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=1e-9, atol=1e-11)
    R = np.random.default_rng(9).standard_normal(Y.shape)
    dX, grads = backprop(R)
    (Yt * torch.from_numpy(R)).sum().backward()
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=1e-8, atol=1e-10)
    for name, p in m.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=name)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_causal_padded_matches_torch(norm_first):
    torch = pytest.importorskip("torch")
    layer = attention.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                              norm_first=norm_first, causal=True, mask_value=0.0)
    params = _random_params(layer, (7, 8), seed=10)
    m = _torch_tel(torch, layer, params)
    X = _padded(3, 7, 8, seed=11)
    valid = _valid(X)
    Xt = torch.from_numpy(X).requires_grad_(True)
    pad = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(torch.from_numpy(~valid),
                                                                    float("-inf"))
    Yt = m(Xt, src_mask=_causal_mask(torch, 7, torch.float64), is_causal=True,
           src_key_padding_mask=pad)
    Y, backprop = layer.forward(params, X)
    real = valid[..., None]
    assert np.all(Y[~valid] == 0)
    np.testing.assert_allclose(Y * real, Yt.detach().numpy() * real, rtol=1e-9, atol=1e-11)
    R = np.random.default_rng(12).standard_normal(Y.shape) * real
    dX, grads = backprop(R)
    (Yt * torch.from_numpy(R)).sum().backward()
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=1e-8, atol=1e-10)
    for name, p in m.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=name)


def test_transformer_encoder_layer_float32_eval_matches_torch():
    torch = pytest.importorskip("torch")
    layer = attention.TransformerEncoderLayer(16, 4, dim_feedforward=32, activation="gelu")
    layer.build((10, 16))
    params = layer.init_params(np.random.default_rng(13))  # float32, PyTorch's initialisation
    m = _torch_tel(torch, layer, params, dtype=torch.float32).eval()
    X = np.random.default_rng(14).standard_normal((4, 10, 16)).astype(np.float32)
    Y = layer(params, X)  # evaluation: every dropout is the identity
    assert Y.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(Y, m(torch.from_numpy(X)).numpy(), rtol=1e-4, atol=1e-5)


def test_set_weights_takes_a_torch_state_dict():
    torch = pytest.importorskip("torch")
    net = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True,
                                           norm_first=True).eval()
    model = L.Sequential([L.TransformerEncoderLayer(16, 4, 24, norm_first=True,
                                                    input_shape=(5, 16)),
                          L.MultiHeadAttention(16, 2)])
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    model.set_weights({**net.state_dict(), **{f"mha.{k}": v for k, v in
                                              mha.state_dict().items()}})  # by position
    X = np.random.default_rng(15).standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        h = net(torch.from_numpy(X))
        want = mha(h, h, h, need_weights=False)[0].numpy()
    np.testing.assert_allclose(model.predict(X), want, rtol=1e-4, atol=1e-5)


class _TorchClassifier:
    """Embedding -> learned positions -> TransformerEncoderLayer -> (masked) mean -> Linear."""

    def __new__(cls, torch, vocab, T, d, nhead, ff, k, masked, norm_first):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(vocab, d, padding_idx=0 if masked else None)
                self.pos = torch.nn.Embedding(T, d)
                self.enc = torch.nn.TransformerEncoderLayer(d, nhead, ff, dropout=0.0,
                                                            batch_first=True,
                                                            norm_first=norm_first)
                self.fc = torch.nn.Linear(d, k)

            def forward(self, ids):
                valid = (ids != 0) if masked else torch.ones_like(ids, dtype=torch.bool)
                h = self.emb(ids) + self.pos.weight[None] * valid[..., None]
                if masked:
                    pad = torch.zeros(ids.shape).masked_fill(~valid, float("-inf"))
                    h = self.enc(h, src_key_padding_mask=pad)
                else:
                    h = self.enc(h)
                w = valid[..., None].float()
                return self.fc((h * w).sum(1) / w.sum(1))
        return Net()


@pytest.mark.parametrize("optimizer,masked,norm_first", [("sgd", False, False),
                                                          ("adam", True, True),
                                                          ("adam", False, False)])
def test_transformer_classifier_steps_match_torch(optimizer, masked, norm_first):
    """Three steps on three batches from the same weights: every weight as PyTorch's.

    One exception under Adam: the gradient of the key bias (``in_proj_bias[E:2E]``) is exactly
    zero in exact arithmetic (a softmax ignores a constant added to all of a query's scores), so
    both libraries compute rounding noise (~1e-9) there, and Adam scales noise up to steps of
    ``lr``: those entries are compared under SGD only."""
    torch = pytest.importorskip("torch")
    from rddtensor.optim import SGD
    vocab, T, d, nhead, ff, k, lr = 11, 8, 12, 3, 20, 3, 1e-2
    rng = np.random.default_rng(20)
    X = rng.integers(1, vocab, (24, T))
    if masked:
        for i, n in enumerate(rng.integers(3, T + 1, len(X))):
            X[i, n:] = 0
    y = rng.integers(0, k, len(X))
    mv = 0.0 if masked else None
    model = L.Sequential([
        L.Embedding(vocab, d, padding_idx=0 if masked else None, input_shape=(T,)),
        L.PositionalEmbedding(T, d, mask_value=mv),
        L.TransformerEncoderLayer(d, nhead, dim_feedforward=ff, dropout=0.0,
                                  norm_first=norm_first, mask_value=mv),
        L.GlobalAveragePooling1D(mask_value=mv),
        L.Dense(k)], seed=21)
    if optimizer == "adam":
        model.compile(optimizer=Adam(lr), loss="sparse_categorical_crossentropy")
    else:
        lr = 0.1
        model.compile(optimizer=SGD(lr, momentum=0.9), loss="sparse_categorical_crossentropy")
    model.build()
    start = model.get_weights()
    net = _TorchClassifier(torch, vocab, T, d, nhead, ff, k, masked, norm_first)
    params = list(net.parameters())
    assert [tuple(p.shape) for p in params] == [w.shape for w in start]  # same order, layouts
    net.load_state_dict(dict(zip(net.state_dict(), map(torch.from_numpy, start))))
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for b in range(3):  # three steps, three different batches of 8
        ids, yt = torch.from_numpy(X[8 * b:8 * b + 8]), torch.from_numpy(y[8 * b:8 * b + 8])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(ids), yt).backward()
        opt.step()

    model.fit(X.astype(np.float32), y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert model.step == 3
    for key, ours, theirs in zip(model.layout.keys, model.get_weights(), params):
        theirs = theirs.detach().numpy()
        if optimizer == "adam" and key.endswith("self_attn.in_proj_bias"):
            ours, theirs = np.delete(ours, np.s_[d:2 * d]), np.delete(theirs, np.s_[d:2 * d])
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=key)
    moved = model.get_weights()[2]
    assert np.abs(moved - start[2]).max() > 1e-3  # the attention weights moved


# --- it learns ------------------------------------------------------------------------------------
def order_task(n, T=10, seed=0):
    """Ids 1..9 with one 7 and one 3 at random places, right-padded with 0 to ``T``;
    label = "the 7 comes before the 3" (only the order tells: half and half)."""
    rng = np.random.default_rng(seed)
    others = np.array([1, 2, 4, 5, 6, 8, 9])
    X = np.zeros((n, T), np.int64)
    y = np.zeros(n, np.int64)
    for i, length in enumerate(rng.integers(4, T + 1, n)):
        X[i, :length] = rng.choice(others, length)
        a, b = rng.choice(length, 2, replace=False)
        X[i, a], X[i, b] = 7, 3
        y[i] = a < b
    return X, y


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_learns_an_order_task(causal):
    Xtr, ytr = order_task(1000, seed=1)
    Xte, yte = order_task(500, seed=2)
    model = L.Sequential([
        L.Embedding(10, 16, padding_idx=0, input_shape=(10,)),
        L.PositionalEmbedding(10, 16, mask_value=0.0),
        L.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, causal=causal,
                                  mask_value=0.0),
        L.GlobalAveragePooling1D(mask_value=0.0),
        L.Dense(2)], seed=0)
    model.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(Xtr.astype(np.float32), ytr, epochs=12, batch_size=32, verbose=0)  # ~2 s
    # chance is 0.5; both reach 1.0 (causal after 2 epochs, bidirectional after 7-8)
    assert model.evaluate(Xte.astype(np.float32), yte)["accuracy"] >= 0.9
    # padding is ignored: more of it changes no prediction (rows whose last 2 steps are padding)
    X8 = Xte[(Xte[:, 8:] == 0).all(axis=1)]
    assert len(X8) > 50
    np.testing.assert_allclose(model.forward(model.params, X8[:, :8].astype(np.float32))[0],
                               model.forward(model.params, X8.astype(np.float32))[0],
                               rtol=1e-5, atol=1e-5)


# --- config, files, summary ------------------------------------------------------------------------
@pytest.mark.parametrize("layer,shape", [
    (attention.MultiHeadAttention(8, 2), (5, 8)),
    (attention.MultiHeadAttention(8, 4, dropout=0.1, bias=False, causal=True, mask_value=-1.0,
                                  input_shape=(5, 8), name="mha"), (5, 8)),
    (attention.TransformerEncoderLayer(8, 2, dim_feedforward=16), (5, 8)),
    (attention.TransformerEncoderLayer(8, 2, 16, 0.2, "gelu", True, 1e-6, True, 0.0,
                                       name="enc"), (5, 8)),
    (attention.PositionalEmbedding(9, 8, mask_value=0.0, embeddings_initializer="normal"), (5, 8)),
    (pooling.GlobalAveragePooling1D(mask_value=0.0), (5, 8)),
    (pooling.GlobalMaxPooling1D(data_format="channels_first", name="gmp"), (5, 8)),
], ids=lambda v: repr(v) if not isinstance(v, tuple) else "")
def test_config_round_trip(layer, shape):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class(type(layer).__name__).from_config(cfg)
    assert clone.get_config() == cfg
    layer.build(shape)
    clone.build(shape)
    p = layer.init_params(np.random.default_rng(0), np.float64)
    q = clone.init_params(np.random.default_rng(0), np.float64)
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])
    X = np.random.default_rng(1).standard_normal((3, *shape))
    np.testing.assert_array_equal(layer(p, X), clone(q, X))


def test_save_load_and_summary(tmp_path):
    X, y = order_task(64, seed=3)
    X = X.astype(np.float32)
    model = L.Sequential([
        L.Embedding(10, 8, padding_idx=0, input_shape=(10,)),
        L.PositionalEmbedding(10, 8, mask_value=0.0),
        L.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, norm_first=True,
                                  mask_value=0.0),
        L.MultiHeadAttention(8, 2, dropout=0.1, causal=True, mask_value=0.0),
        L.GlobalMaxPooling1D(mask_value=0.0),
        L.Dense(2)], seed=4)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)  # dropout in training: needs the rng
    model.save(str(tmp_path / "m"))
    loaded = L.load_model(str(tmp_path / "m"))
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert model.layout.keys[2:14] == [f"2.{k}" for k in TEL_KEYS]
    assert model.layout.keys[14:18] == ["3.in_proj_weight", "3.in_proj_bias",
                                        "3.out_proj.weight", "3.out_proj.bias"]
    lines = []
    model.summary(print_fn=lines.append)
    text = lines[0]
    E, F = 8, 16
    tel = 4 * E * E + 4 * E + 2 * E * F + F + E + 4 * E
    assert "PositionalEmbedding" in text and "(None, 10, 8)" in text
    assert f"{tel:,}" in text and f"{4 * E * E + 4 * E:,}" in text
    assert "GlobalMaxPooling1D" in text and "(None, 8)" in text


def test_default_init_is_torch_like():
    layer = attention.TransformerEncoderLayer(64, 4, dim_feedforward=128)
    layer.build((3, 64))
    p = layer.init_params(np.random.default_rng(0))
    xavier = np.sqrt(6 / (64 + 3 * 64))
    w = p["self_attn.in_proj_weight"]
    assert np.abs(w).max() <= xavier and w.std() > xavier / 2
    for k, fan_in in (("self_attn.out_proj.weight", 64), ("linear1.weight", 64),
                      ("linear1.bias", 64), ("linear2.weight", 128), ("linear2.bias", 128)):
        assert np.abs(p[k]).max() <= 1 / np.sqrt(fan_in) and p[k].std() > 0.3 / np.sqrt(fan_in), k
    for k in ("self_attn.in_proj_bias", "self_attn.out_proj.bias", "norm1.bias", "norm2.bias"):
        assert np.all(p[k] == 0), k
    assert np.all(p["norm1.weight"] == 1) and np.all(p["norm2.weight"] == 1)
    assert all(v.dtype == np.float32 for v in p.values())


def test_dropout_draws_from_rng_and_is_off_in_evaluation():
    layer = attention.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5)
    params = _random_params(layer, (5, 8), dtype=np.float32)
    X = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    a = layer.forward(params, X, training=True, rng=np.random.default_rng(1))[0]
    b = layer.forward(params, X, training=True, rng=np.random.default_rng(1))[0]
    c = layer.forward(params, X, training=True, rng=np.random.default_rng(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(layer(params, X), layer(params, X))
    with pytest.raises(ValueError, match="needs a random generator in training mode"):
        attention.MultiHeadAttention(8, 2, dropout=0.1, input_shape=(5, 8)).forward(
            {k[len("self_attn."):]: v for k, v in params.items() if k.startswith("self_attn")},
            X, training=True)


def test_causal_output_ignores_the_future():
    layer = attention.MultiHeadAttention(8, 2, causal=True)
    params = _random_params(layer, (6, 8))
    X = np.random.default_rng(0).standard_normal((2, 6, 8))
    X2 = X.copy()
    X2[:, 4:] += 1.0
    np.testing.assert_allclose(layer(params, X)[:, :4], layer(params, X2)[:, :4], rtol=1e-12)


def test_pickles_small_and_empty_batch():
    layer = attention.TransformerEncoderLayer(32, 4, dim_feedforward=64)
    params = _random_params(layer, (10, 32), dtype=np.float32)
    layer.forward(params, np.ones((4, 10, 32), np.float32))
    assert len(pickle.dumps(layer)) < 6000
    Y, backprop = layer.forward(params, np.zeros((0, 10, 32), np.float32))
    dX, grads = backprop(np.zeros((0, 10, 32), np.float32))
    assert Y.shape == dX.shape == (0, 10, 32) and Y.dtype == np.float32
    assert all(g.dtype == np.float32 and g.shape == params[k].shape for k, g in grads.items())


def test_docstring_examples_run():
    for module in (attention, pooling):
        assert doctest.testmod(module).failed == 0


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: L.MultiHeadAttention(10, 3), r"MultiHeadAttention layer: embed_dim \(10\) must be "
                                          r"divisible by num_heads \(3\)"),
    (lambda: L.MultiHeadAttention(8, 0), "num_heads must be a positive integer, got 0"),
    (lambda: L.MultiHeadAttention(8, 2, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (lambda: L.MultiHeadAttention(8, 2, causal="yes"), "causal must be True or False"),
    (lambda: L.MultiHeadAttention(8, 2, mask_value=float("nan")), "mask_value must be a finite"),
    (lambda: L.MultiHeadAttention(8, 2, input_shape=(5, 6), name="a"),
     r"MultiHeadAttention layer 'a' needs 8 features on the last axis, got per-sample input "
     r"shape \(5, 6\)"),
    (lambda: L.TransformerEncoderLayer(6, 4), r"TransformerEncoderLayer layer: d_model \(6\) "
                                              r"must be divisible by nhead \(4\)"),
    (lambda: L.TransformerEncoderLayer(8, 2, activation="tanh"),
     "TransformerEncoderLayer layer: activation must be 'relu' or 'gelu', got 'tanh'"),
    (lambda: L.TransformerEncoderLayer(8, 2, layer_norm_eps=0), "layer_norm_eps must be a number"),
    (lambda: L.TransformerEncoderLayer(8, 2, dim_feedforward=-1), "dim_feedforward must be a"),
    (lambda: L.PositionalEmbedding(0, 4), "max_length must be a positive integer, got 0"),
    (lambda: L.PositionalEmbedding(4, 2, input_shape=(5, 2)),
     "PositionalEmbedding layer: sequences of length 5 are longer than max_length=4"),
    (lambda: L.GlobalAveragePooling1D(data_format="NCL"), "data_format must be 'channels_last'"),
    (lambda: L.GlobalMaxPooling1D(mask_value="pad"), "mask_value must be a finite number"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_name_the_layer():
    mha = L.MultiHeadAttention(8, 2, name="att")
    params = _random_params(mha, (5, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"MultiHeadAttention layer 'att' expects inputs with 8 "
                                         r"features \(last axis\), got 6"):
        mha.forward(params, np.zeros((2, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"MultiHeadAttention layer 'att' expects inputs of "
                                         r"shape \(batch, time, 8\), got shape \(5, 8\)"):
        mha.forward(params, np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"needs a per-sample input shape \(time, 8\), got \(8,\)"):
        L.TransformerEncoderLayer(8, 2).build((8,))
    pos = L.PositionalEmbedding(4, 2)
    pos.build((3, 2))
    with pytest.raises(ValueError, match="PositionalEmbedding layer: sequences of length 6 are "
                                         "longer than max_length=4"):
        pos.forward({"W": np.zeros((4, 2))}, np.zeros((1, 6, 2)))
    with pytest.raises(ValueError, match=r"GlobalAveragePooling1D layer expects a batch of inputs "
                                         r"\(batch, time, features\)"):
        L.GlobalAveragePooling1D()(None, np.zeros((2, 3)))
    model = L.Sequential([L.PositionalEmbedding(4, 3)])
    with pytest.raises(ValueError, match=r"layer 0 \(PositionalEmbedding layer\): "
                                         r"PositionalEmbedding layer: sequences of length 6"):
        model.build((6, 3))


# --- cross-attention ([query, key, value]) --------------------------------------------------------
@pytest.mark.parametrize("inputs, causal", [(3, False), (2, True)])
def test_cross_attention_gradients_with_padding(inputs, causal):
    """float64 gradient check of ``MultiHeadAttention`` on ``[query, key, value]`` / ``[query,
    value]``: padded keys (and queries), a causal mask over T != S."""
    mha = attention.MultiHeadAttention(4, 2, causal=causal, mask_value=0.0)
    shapes = [(3, 4), (5, 4), (5, 4)][:inputs]
    assert mha.build(shapes) == (3, 4)
    params = _random_params(attention.MultiHeadAttention(4, 2), (3, 4))
    Xs = [_padded(3, 3, 4, seed=1)] + [_padded(3, 5, 4, seed=s) for s in (2, 3)][:inputs - 1]
    Y, backprop = mha.forward(params, Xs)
    assert (Y[0, 1:] == 0).all()  # padded queries: zero output
    R = np.random.default_rng(4).standard_normal(Y.shape)
    dXs, grads = backprop(R)
    assert len(dXs) == inputs and list(grads) == list(params)
    pads = [~_valid(X)[:, :, None] for X in Xs]  # padding stays padding under the perturbation
    assert all(np.all(dX[np.broadcast_to(pad, dX.shape)] == 0) for dX, pad in zip(dXs, pads))

    def f(arrays):
        p = {k: arrays["p." + k] for k in params}
        Zs = [np.where(pad, 0.0, arrays[f"x{i}"]) for i, pad in enumerate(pads)]
        return float(np.sum(mha.forward(p, Zs)[0] * R))

    check_grad(f, {**{f"x{i}": X for i, X in enumerate(Xs)},
                   **{"p." + k: v for k, v in params.items()}},
               {**{f"x{i}": dX for i, dX in enumerate(dXs)},
                **{"p." + k: g for k, g in grads.items()}})


def test_cross_attention_equals_pytorch_with_a_key_padding_mask():
    import torch
    mha = attention.MultiHeadAttention(8, 2, mask_value=0.0)
    params = _random_params(attention.MultiHeadAttention(8, 2), (4, 8))
    Q = np.random.default_rng(0).standard_normal((3, 4, 8))
    K, V = _padded(3, 6, 8, seed=1), np.random.default_rng(2).standard_normal((3, 6, 8))
    Y, backprop = mha.forward(params, [Q, K, V])
    R = np.random.default_rng(3).standard_normal(Y.shape)
    dXs, grads = backprop(R)
    net = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    net.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    ts = [torch.tensor(X, requires_grad=True) for X in (Q, K, V)]
    out = net(*ts, key_padding_mask=torch.tensor(~_valid(K)), need_weights=False)[0]
    (out * torch.tensor(R)).sum().backward()
    np.testing.assert_allclose(Y, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for dX, t in zip(dXs, ts):
        np.testing.assert_allclose(dX, t.grad.numpy(), rtol=1e-9, atol=1e-12)
    for k, p in net.named_parameters():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_cross_attention_calls_are_checked():
    q, kv = L.Input((3, 8)), L.Input((5, 8))
    with pytest.raises(ValueError, match=r"takes one tensor \(self-attention\), \[query, value\] "
                                         r"or \[query, key, value\].*got a list of 4"):
        L.MultiHeadAttention(8, 2)([q, kv, kv, kv])
    with pytest.raises(ValueError, match="key and value need the same length"):
        L.MultiHeadAttention(8, 2)([q, kv, q])
    with pytest.raises(ValueError, match="8 features"):
        L.MultiHeadAttention(8, 2)([q, L.Input((5, 4))])
