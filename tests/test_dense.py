import pickle

import numpy as np
import pytest
import scipy.sparse
from gradcheck import check_layer

from rddtensor import layers as L
from rddtensor.layers.activations import ACTIVATION_DEFAULTS
from rddtensor.layers.base import layer_class
from rddtensor.layers.initializers import INITIALIZERS, compute_fans, initialize

ACTIVATIONS = sorted(ACTIVATION_DEFAULTS)


def _built(layer, input_shape, seed=0, dtype=np.float64):
    layer.build(input_shape)
    return layer.init_params(np.random.default_rng(seed), dtype=dtype)


# --- gradient checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, use_bias):
    check_layer(L.Dense(4, activation=activation, use_bias=use_bias), (5,), batch=3)


@pytest.mark.parametrize("use_bias", [True, False])
def test_gradcheck_3d_input(use_bias):
    check_layer(L.Dense(3, activation="tanh", use_bias=use_bias), (4, 5), batch=2)


def test_gradcheck_per_element_tiny():
    rng = np.random.default_rng(7)
    params = {"W": rng.standard_normal((2, 3)), "b": rng.standard_normal(2)}
    check_layer(L.Dense(2, activation="sigmoid"), (3,), batch=2, params=params, per_element=True)


def test_gradcheck_fused_leaky_relu_instance():
    check_layer(L.Dense(4, activation=L.LeakyReLU(0.3)), (3,), batch=4)


# --- against PyTorch ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_torch_linear(shape, use_bias):
    torch = pytest.importorskip("torch")
    layer = L.Dense(4, use_bias=use_bias)
    params = _built(layer, shape[1:], seed=1)
    rng = np.random.default_rng(2)
    X, dY = rng.standard_normal(shape), rng.standard_normal((*shape[:-1], 4))
    Y, backprop = layer.forward(params, X)
    dX, grads = backprop(dY)

    lin = torch.nn.Linear(5, 4, bias=use_bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(params["W"]))
        if use_bias:
            lin.bias.copy_(torch.tensor(params["b"]))
    Xt = torch.tensor(X, requires_grad=True)
    Yt = lin(Xt)
    Yt.backward(torch.tensor(dY))
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["W"], lin.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert set(grads) == ({"W", "b"} if use_bias else {"W"})
    if use_bias:
        np.testing.assert_allclose(grads["b"], lin.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "softmax"])
def test_matches_torch_linear_plus_activation_float32(activation):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fn = {"relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid,
          "softmax": lambda t: F.softmax(t, dim=-1)}[activation]
    layer = L.Dense(4, activation=activation)
    params = _built(layer, (5,), dtype=np.float32)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 5)).astype(np.float32)
    dY = rng.standard_normal((6, 4)).astype(np.float32)
    Y, backprop = layer.forward(params, X)
    dX, grads = backprop(dY)
    Wt = torch.tensor(params["W"], requires_grad=True)
    bt = torch.tensor(params["b"], requires_grad=True)
    Xt = torch.tensor(X, requires_grad=True)
    Yt = fn(F.linear(Xt, Wt, bt))
    Yt.backward(torch.tensor(dY))
    for ours, theirs in [(Y, Yt.detach()), (dX, Xt.grad), (grads["W"], Wt.grad),
                         (grads["b"], bt.grad)]:
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)


# --- dtype, shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_stays_float32(activation):
    layer = L.Dense(3, activation=activation)
    params = _built(layer, (2, 4), dtype=np.float32)
    assert all(p.dtype == np.float32 for p in params.values())
    X = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
    Y, backprop = layer.forward(params, X)
    dX, grads = backprop(np.ones_like(Y))
    assert Y.shape == (5, 2, 3) and Y.dtype == np.float32
    assert dX.shape == X.shape and dX.dtype == np.float32
    assert grads["W"].dtype == np.float32 and grads["b"].dtype == np.float32


def test_shapes_and_param_shapes():
    layer = L.Dense(7, input_shape=(3,))
    assert layer.build((2, 3)) == (2, 7)
    assert layer.param_shapes() == {"W": (7, 3), "b": (7,)}
    assert L.Dense(7, use_bias=False).build((3,)) == (7,)


def test_empty_batch():
    layer = L.Dense(3)
    params = _built(layer, (4,))
    Y, backprop = layer.forward(params, np.zeros((0, 4)))
    dX, grads = backprop(np.zeros((0, 3)))
    assert Y.shape == (0, 3) and dX.shape == (0, 4)
    np.testing.assert_array_equal(grads["W"], 0.0)
    np.testing.assert_array_equal(grads["b"], 0.0)


# --- sparse input ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_sparse_equals_dense(activation, dtype):
    layer = L.Dense(4, activation=activation)
    params = _built(layer, (30,), dtype=dtype)
    rng = np.random.default_rng(5)
    Xs = scipy.sparse.random(8, 30, density=0.1, format="csr", random_state=5, dtype=dtype)
    dY = rng.standard_normal((8, 4)).astype(dtype)
    Y, backprop = layer.forward(params, Xs)
    dX, grads = backprop(dY)
    Yd, backprop_d = layer.forward(params, Xs.toarray())
    _, grads_d = backprop_d(dY)
    assert dX is None
    assert isinstance(Y, np.ndarray) and Y.dtype == dtype
    assert grads["W"].dtype == dtype and grads["W"].shape == (4, 30)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(Y, Yd, rtol=tol, atol=tol)
    for k in grads_d:
        np.testing.assert_allclose(grads[k], grads_d[k], rtol=tol, atol=tol)


def test_sparse_wrong_width():
    layer = L.Dense(2)
    params = _built(layer, (5,))
    with pytest.raises(ValueError, match="expects inputs with 5 features"):
        layer.forward(params, scipy.sparse.csr_matrix(np.ones((3, 4))))


# --- initialisers ------------------------------------------------------------------------------
@pytest.mark.parametrize("init", sorted(INITIALIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initializers_dtype_and_seed(init, dtype):
    layer = L.Dense(64, kernel_initializer=init, bias_initializer=init)
    p1 = _built(layer, (32,), seed=3, dtype=dtype)
    p2 = layer.init_params(np.random.default_rng(3), dtype=dtype)
    for k in ("W", "b"):
        assert p1[k].dtype == dtype
        np.testing.assert_array_equal(p1[k], p2[k])


@pytest.mark.parametrize("init,std", [
    ("glorot_uniform", np.sqrt(2 / (400 + 300))), ("glorot_normal", np.sqrt(2 / (400 + 300))),
    ("he_normal", np.sqrt(2 / 400)), ("he_uniform", np.sqrt(2 / 400)),
    ("lecun_normal", np.sqrt(1 / 400)), ("lecun_uniform", np.sqrt(1 / 400)),
    ("normal", 0.05), ("uniform", 0.05 / np.sqrt(3)),
])
def test_initializer_scales(init, std):
    W = initialize(init, np.random.default_rng(0), (300, 400), np.float64)
    assert abs(W.mean()) < 0.05 * std
    assert W.std() == pytest.approx(std, rel=0.02)


def test_initializer_constants_and_fans():
    assert np.all(initialize("zeros", np.random.default_rng(0), (2, 3)) == 0)
    assert np.all(initialize("ones", np.random.default_rng(0), (3,)) == 1)
    assert compute_fans((8, 4, 3, 3)) == (36, 72)
    assert compute_fans((5,)) == (5, 5)


# --- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    L.Dense(3),
    L.Dense(5, activation="ReLU", use_bias=False, kernel_initializer="he_normal",
            bias_initializer="ones", input_shape=(4,), name="fc"),
    L.Dense(2, activation=L.LeakyReLU(0.2)),
    L.Dense(2, activation=L.GELU(approximate="tanh")),
    L.Dense(2, activation="softmax"),
], ids=repr)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    clone = layer_class("Dense").from_config(cfg)
    assert clone.get_config() == cfg
    assert type(clone.activation) is type(layer.activation)
    assert clone.activation.kwargs == layer.activation.kwargs
    p = _built(layer, (4,), seed=0)
    q = _built(clone, (4,), seed=0)
    X = np.random.default_rng(1).standard_normal((3, 4))
    np.testing.assert_array_equal(layer(p, X), clone(q, X))


def test_config_is_plain_json():
    import json
    cfg = L.Dense(2, activation=L.LeakyReLU(0.2), input_shape=(3,)).get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["activation"] == {"activation": "leaky_relu", "negative_slope": 0.2}


def test_pickles_small():
    layer = L.Dense(100, activation="relu")
    params = _built(layer, (100,))
    layer.forward(params, np.ones((64, 100)))
    assert len(pickle.dumps(layer)) < 1500


# --- bad arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"units": 0}, "units must be a positive integer, got 0"),
    ({"units": -3}, "units must be a positive integer, got -3"),
    ({"units": 2.5}, "units must be a positive integer, got 2.5"),
    ({"units": True}, "units must be a positive integer, got True"),
    ({"units": 2, "activation": "foo"}, "unknown activation 'foo'; known activations"),
    ({"units": 2, "use_bias": "yes"}, "use_bias must be True or False, got 'yes'"),
    ({"units": 2, "kernel_initializer": "xavier"}, "unknown kernel_initializer 'xavier'"),
    ({"units": 2, "bias_initializer": 0}, "unknown bias_initializer 0"),
    ({"units": 2, "input_shape": (0,)}, "input_shape"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.Dense(**kwargs)


def test_wrong_input_width_names_layer_and_widths():
    layer = L.Dense(3, name="fc1")
    params = _built(layer, (64,))
    with pytest.raises(ValueError,
                       match=r"Dense layer 'fc1' expects inputs with 64 features \(last axis\), got 32"):
        layer.forward(params, np.zeros((2, 32)))


def test_input_without_batch_axis():
    layer = L.Dense(3)
    params = _built(layer, (4,))
    with pytest.raises(ValueError, match=r"expects a batch of inputs .* got shape \(4,\)"):
        layer.forward(params, np.zeros(4))


def test_build_needs_a_feature_axis():
    with pytest.raises(ValueError, match=r"Dense layer needs a per-sample input shape with at "
                                         r"least one axis .* got \(\)"):
        L.Dense(3).build(())


def test_param_shapes_before_build():
    with pytest.raises(ValueError, match="no input shape yet"):
        L.Dense(3).param_shapes()


def test_rebuild_with_other_shape():
    layer = L.Dense(3)
    layer.build((4,))
    with pytest.raises(ValueError, match="was built for input shape"):
        layer.build((5,))


def test_init_params_needs_a_generator():
    layer = L.Dense(3)
    layer.build((4,))
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        layer.init_params(0)
