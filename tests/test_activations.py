import pickle
import warnings

import numpy as np
import pytest
from gradcheck import check_layer

from rddtensor import layers as L
from rddtensor.layers.activations import (ACTIVATION_DEFAULTS, Linear, activation_config,
                                activation_forward, get_activation, sigmoid, softmax)
from rddtensor.layers.base import layer_class

NAMES = sorted(ACTIVATION_DEFAULTS)

# every activation layer, including non-default arguments
LAYERS = [
    L.ReLU(), L.LeakyReLU(), L.LeakyReLU(0.2), L.ELU(), L.ELU(alpha=0.5), L.GELU(),
    L.GELU(approximate="tanh"), L.Sigmoid(), L.Tanh(), L.Softmax(), L.Softmax(axis=1), Linear(),
    L.Activation("relu"), L.Activation("leaky_relu", negative_slope=0.3),
    L.Activation("gelu", approximate="tanh"), L.Activation(None),
]


def _id(layer):
    return repr(layer)


# --- gradient checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("layer", LAYERS, ids=_id)
def test_gradcheck(layer):
    check_layer(layer, (4, 5), batch=3)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_per_element(name):
    check_layer(L.Activation(name), (3,), batch=2, per_element=True)


def test_elu_gradcheck_large_negative_and_positive():
    X = np.array([[-30.0, -3.0, -0.5, 0.5, 3.0, 30.0]])
    check_layer(L.ELU(alpha=2.0), (6,), X=X, per_element=True)


# --- against PyTorch ---------------------------------------------------------------------------
def _torch_fn(torch, layer):
    F = torch.nn.functional
    kw = layer.kwargs
    return {
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, kw.get("negative_slope", 0.01)),
        "elu": lambda t: F.elu(t, kw.get("alpha", 1.0)),
        "gelu": lambda t: F.gelu(t, approximate=kw.get("approximate", "none")),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softmax": lambda t: F.softmax(t, dim=kw.get("axis", -1)),
        "linear": lambda t: t,
    }[layer.activation]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("layer", LAYERS, ids=_id)
def test_matches_torch(layer, dtype, tol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((3, 4, 5)) * 3).astype(dtype)
    X[0, 0, :3] = 0.0  # the kinks: PyTorch's subgradient choice at 0
    dY = rng.standard_normal(X.shape).astype(dtype)
    Y, backprop = layer.forward({}, X, training=True)
    dX, grads = backprop(dY)
    assert grads == {}
    Xt = torch.tensor(X, requires_grad=True)
    Yt = _torch_fn(torch, layer)(Xt)
    Yt.backward(torch.tensor(dY))
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=tol, atol=tol)


# --- dtype, stability --------------------------------------------------------------------------
@pytest.mark.parametrize("layer", LAYERS, ids=_id)
def test_float32_stays_float32(layer):
    X = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    Y, backprop = layer.forward({}, X)
    dX, _ = backprop(np.ones_like(Y))
    assert Y.dtype == np.float32 and dX.dtype == np.float32
    assert Y.shape == X.shape and dX.shape == X.shape


@pytest.mark.parametrize("name", NAMES)
def test_extreme_inputs_no_warnings(name):
    X = np.array([[-1000.0, -50.0, 0.0, 50.0, 1000.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y, backprop = activation_forward(name, X)
        dX = backprop(np.ones_like(Y))
    assert np.all(np.isfinite(Y)) and np.all(np.isfinite(dX))


def test_sigmoid_saturates_exactly():
    Y = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(Y, [0.0, 0.5, 1.0])


def test_softmax_rows_sum_to_one():
    X = np.array([[1000.0, 1000.0, -1000.0], [1.0, 2.0, 3.0]])
    Y = softmax(X)
    np.testing.assert_allclose(Y.sum(axis=1), 1.0)
    np.testing.assert_allclose(Y[0], [0.5, 0.5, 0.0])


def test_activation_forward_is_what_the_layer_uses():
    X = np.random.default_rng(2).standard_normal((3, 4))
    Y1, b1 = activation_forward("ELU", X, alpha=0.7)
    Y2, b2 = L.ELU(0.7).forward({}, X)
    np.testing.assert_array_equal(Y1, Y2)
    np.testing.assert_array_equal(b1(X), b2(X)[0])


# --- get_activation, config --------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [
    ("relu", L.ReLU), ("ReLU", L.ReLU), ("leaky_relu", L.LeakyReLU), ("ELU", L.ELU),
    ("gelu", L.GELU), ("Sigmoid", L.Sigmoid), ("TANH", L.Tanh), ("softmax", L.Softmax),
    ("linear", Linear), (None, Linear),
])
def test_get_activation_names(name, cls):
    assert type(get_activation(name)) is cls


def test_get_activation_passes_layers_through_and_reads_dicts():
    act = L.LeakyReLU(0.2)
    assert get_activation(act) is act
    back = get_activation(activation_config(act))
    assert type(back) is L.LeakyReLU and back.kwargs == {"negative_slope": 0.2}
    assert activation_config(L.ReLU()) == "relu"
    assert activation_config(L.LeakyReLU()) == "leaky_relu"
    assert activation_config(Linear()) is None


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'foo'; known activations: \[.*'relu'"):
        get_activation("foo")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        L.Activation("swish")
    with pytest.raises(ValueError, match="unknown activation"):
        activation_forward("nope", np.zeros((1, 1)))


@pytest.mark.parametrize("bad", [3, 1.5, ["relu"], L.Dense(2)])
def test_get_activation_rejects_other_types(bad):
    with pytest.raises(ValueError, match="activation must be"):
        get_activation(bad)


@pytest.mark.parametrize("make,match", [
    (lambda: L.LeakyReLU("x"), "negative_slope must be a finite number"),
    (lambda: L.LeakyReLU(float("nan")), "negative_slope must be a finite number"),
    (lambda: L.ELU(alpha=True), "alpha must be a finite number"),
    (lambda: L.GELU(approximate="erf"), "approximate must be 'none' or 'tanh'"),
    (lambda: L.Softmax(axis=1.0), "axis must be an integer"),
    (lambda: L.Activation("relu", alpha=1.0), "activation 'relu' takes no argument 'alpha'"),
    (lambda: L.Activation("elu", negative_slope=0.1), "takes no argument 'negative_slope'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("axis", [0, -3, 3])
def test_softmax_axis_must_be_a_sample_axis(axis):
    with pytest.raises(ValueError, match=f"axis {axis} must name a non-batch axis"):
        L.Softmax(axis=axis).build((4, 5))


@pytest.mark.parametrize("layer", LAYERS + [L.ReLU(name="r", input_shape=(3,))], ids=_id)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    clone = layer_class(type(layer).__name__).from_config(cfg)
    assert type(clone) is type(layer)
    assert clone.get_config() == cfg
    assert clone.activation == layer.activation and clone.kwargs == layer.kwargs
    X = np.random.default_rng(3).standard_normal((2, 4, 5))
    np.testing.assert_array_equal(clone(None, X), layer(None, X))


def test_pickles_small():
    layer = L.GELU(approximate="tanh")
    layer.forward({}, np.ones((100, 100)))
    blob = pickle.dumps(layer)
    assert len(blob) < 1000
    assert pickle.loads(blob).get_config() == layer.get_config()


def test_normal_cdf_fallback_for_other_array_modules():
    # the erf-free path CuPy takes, checked here on NumPy against scipy
    import scipy.special
    from rddtensor.ops.numpy_ops import normal_cdf_chebyshev
    X = np.linspace(-12, 12, 2001)
    ours, ref = normal_cdf_chebyshev(np, X), scipy.special.ndtr(X)
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=1e-300)
    assert normal_cdf_chebyshev(np, X.astype(np.float32)).dtype == np.float32
