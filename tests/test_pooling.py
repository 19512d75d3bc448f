"""Pooling and upsampling layers: gradient checks, PyTorch equivalence, ties, config, errors."""
import json
import pickle

import numpy as np
import pytest
from gradcheck import check_layer

from rddtensor.layers.base import layer_class
from rddtensor.layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool1D, MaxPool2D, UpSampling2D

# (layer factory, per-sample input shape); inputs are standard normal, so no window has ties
CASES = {
    "max2d": (lambda: MaxPool2D(2), (2, 6, 6)),
    "max2d_odd_input": (lambda: MaxPool2D(2), (1, 5, 7)),
    "max2d_overlap_pad": (lambda: MaxPool2D(3, strides=2, padding=1), (2, 7, 6)),
    "max2d_rect": (lambda: MaxPool2D((2, 3), strides=(1, 2), padding=(1, 0)), (1, 5, 7)),
    "max1d": (lambda: MaxPool1D(2), (3, 9)),
    "max1d_overlap_pad": (lambda: MaxPool1D(4, strides=2, padding=2), (2, 9)),
    "avg2d": (lambda: AvgPool2D(2), (2, 6, 6)),
    "avg2d_overlap_pad": (lambda: AvgPool2D(3, strides=2, padding=1), (2, 7, 6)),
    "avg2d_exclude_pad": (lambda: AvgPool2D((3, 2), strides=(2, 1), padding=1,
                                            count_include_pad=False), (2, 7, 6)),
    "global_avg": (lambda: GlobalAvgPool2D(), (3, 4, 5)),
    "upsample2": (lambda: UpSampling2D(2), (2, 3, 4)),
    "upsample_rect": (lambda: UpSampling2D((3, 2)), (1, 2, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    make, shape = CASES[case]
    check_layer(make(), shape, batch=2)


def test_gradcheck_per_element_tiny():
    check_layer(MaxPool2D(2, strides=1, padding=1), (1, 3, 3), batch=1, per_element=True)
    check_layer(AvgPool2D(2, strides=1, padding=1, count_include_pad=False), (1, 3, 3), batch=1,
                per_element=True)


# --- against PyTorch ----------------------------------------------------------------------------
def _torch_fn(torch, case):
    F = torch.nn.functional
    return {
        "max2d": lambda t: F.max_pool2d(t, 2),
        "max2d_odd_input": lambda t: F.max_pool2d(t, 2),
        "max2d_overlap_pad": lambda t: F.max_pool2d(t, 3, stride=2, padding=1),
        "max2d_rect": lambda t: F.max_pool2d(t, (2, 3), stride=(1, 2), padding=(1, 0)),
        "max1d": lambda t: F.max_pool1d(t, 2),
        "max1d_overlap_pad": lambda t: F.max_pool1d(t, 4, stride=2, padding=2),
        "avg2d": lambda t: F.avg_pool2d(t, 2),
        "avg2d_overlap_pad": lambda t: F.avg_pool2d(t, 3, stride=2, padding=1),
        "avg2d_exclude_pad": lambda t: F.avg_pool2d(t, (3, 2), stride=(2, 1), padding=1,
                                                    count_include_pad=False),
        "global_avg": lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1),
        "upsample2": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        "upsample_rect": lambda t: F.interpolate(t, scale_factor=(3, 2), mode="nearest"),
    }[case]


def _compare(torch, layer, X, fn, rtol, atol):
    Y, backprop = layer.forward({}, X)
    dY = np.random.default_rng(1).standard_normal(Y.shape).astype(X.dtype)
    dX, grads = backprop(dY)
    assert grads == {}
    Xt = torch.tensor(X, requires_grad=True)
    Yt = fn(Xt)
    Yt.backward(torch.tensor(dY))
    np.testing.assert_allclose(Y, Yt.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dX, Xt.grad.numpy(), rtol=rtol, atol=atol)
    return Y, dX


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype):
    torch = pytest.importorskip("torch")
    make, shape = CASES[case]
    layer = make()
    layer.build(shape)
    X = np.random.default_rng(0).standard_normal((3, *shape)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    Y, dX = _compare(torch, layer, X, _torch_fn(torch, case), tol, tol)
    assert Y.dtype == dX.dtype == dtype
    assert Y.shape[1:] == layer.output_shape


@pytest.mark.parametrize("make,fn", [
    (lambda: MaxPool2D(2), lambda F, t: F.max_pool2d(t, 2)),
    (lambda: MaxPool2D(3, strides=1, padding=1), lambda F, t: F.max_pool2d(t, 3, 1, 1)),
    (lambda: MaxPool1D(3, strides=2), lambda F, t: F.max_pool1d(t, 3, 2)),
])
def test_max_pool_ties_route_to_the_first_maximum_as_torch(make, fn):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shape = (2, 3, 6) if isinstance(make(), MaxPool1D) else (2, 3, 6, 6)
    X = rng.integers(0, 2, size=shape).astype(np.float64)  # many equal values per window
    # overlapping windows may sum in another order: allow rounding, not a misrouted gradient
    _compare(torch, make(), X, lambda t: fn(torch.nn.functional, t), 1e-12, 1e-12)


def test_max_pool_tie_goes_to_the_first_position():
    Y, backprop = MaxPool2D(2).forward({}, np.zeros((1, 1, 2, 2)))
    dX, _ = backprop(np.ones_like(Y))
    np.testing.assert_array_equal(dX[0, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_pool_overlapping_windows_add_up():
    X = np.array([[[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]])
    Y, backprop = MaxPool2D(2, strides=1).forward({}, X)
    np.testing.assert_array_equal(Y, 5.0)
    dX, _ = backprop(np.ones_like(Y))
    assert dX[0, 0, 1, 1] == 4.0 and dX.sum() == 4.0


# --- shapes, dtype, batches ---------------------------------------------------------------------
@pytest.mark.parametrize("layer,in_shape,out_shape", [
    (MaxPool2D(2), (3, 7, 8), (3, 3, 4)),
    (MaxPool2D(3, strides=2, padding=1), (3, 7, 8), (3, 4, 4)),
    (MaxPool1D(2, strides=1), (2, 5), (2, 4)),
    (AvgPool2D((2, 4), strides=(2, 1)), (1, 6, 6), (1, 3, 3)),
    (GlobalAvgPool2D(), (5, 3, 2), (5,)),
    (UpSampling2D((2, 3)), (4, 3, 2), (4, 6, 6)),
], ids=repr)
def test_output_shapes_and_float32(layer, in_shape, out_shape):
    assert layer.build(in_shape) == out_shape
    assert layer.param_shapes() == {} and layer.init_params(np.random.default_rng(0)) == {}
    X = np.random.default_rng(0).standard_normal((2, *in_shape)).astype(np.float32)
    Y, backprop = layer.forward({}, X)
    assert Y.shape == (2, *out_shape) and Y.dtype == np.float32
    dX, grads = backprop(np.ones_like(Y))
    assert dX.shape == X.shape and dX.dtype == np.float32 and grads == {}
    dX[...] = 0  # a real, writable array (not a broadcast view)


@pytest.mark.parametrize("layer,in_shape", [
    (MaxPool2D(2), (2, 4, 4)), (MaxPool1D(2), (2, 4)), (AvgPool2D(2, padding=1), (2, 4, 4)),
    (GlobalAvgPool2D(), (2, 4, 4)), (UpSampling2D(2), (2, 3, 3)),
], ids=repr)
def test_empty_batch(layer, in_shape):
    layer.build(in_shape)
    Y, backprop = layer.forward({}, np.zeros((0, *in_shape)))
    dX, _ = backprop(np.zeros_like(Y))
    assert Y.shape == (0, *layer.output_shape) and dX.shape == (0, *in_shape)


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    MaxPool2D(), MaxPool2D((2, 3), strides=1, padding=(1, 0), name="pool"),
    MaxPool1D(3, strides=2, padding=1, input_shape=(2, 9)),
    AvgPool2D(3, strides=2, padding=1, count_include_pad=False), GlobalAvgPool2D(name="gap"),
    UpSampling2D((2, 3), interpolation="nearest", input_shape=(1, 4, 4)),
], ids=repr)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class(type(layer).__name__).from_config(json.loads(json.dumps(cfg)))
    assert type(clone) is type(layer) and clone.get_config() == cfg
    shape = (2, 9) if isinstance(layer, MaxPool1D) else (1, 4, 4) if isinstance(
        layer, UpSampling2D) else (2, 6, 6)
    X = np.random.default_rng(0).standard_normal((2, *shape))
    np.testing.assert_array_equal(layer({}, X), clone({}, X))


def test_pickles_small():
    layer = MaxPool2D(2)
    layer.build((16, 8, 8))
    layer.forward({}, np.ones((8, 16, 8, 8)))
    assert len(pickle.dumps(layer)) < 1000


# --- bad arguments and inputs -------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: MaxPool2D(0), "pool_size must be an integer or a tuple of 2 positive integers, got 0"),
    (lambda: MaxPool2D((2, 2, 2)), r"pool_size .* got \(2, 2, 2\)"),
    (lambda: MaxPool2D(2, strides=0), "strides .* got 0"),
    (lambda: MaxPool2D(2, padding=-1), "padding must be an integer or a tuple of 2 integers >= 0"),
    (lambda: MaxPool2D(2, padding=2), r"padding must be at most half of pool_size \(as in "
                                      r"PyTorch\), got padding=\(2, 2\), pool_size=\(2, 2\)"),
    (lambda: MaxPool1D((2, 2)), r"pool_size must be an integer or a tuple of 1 positive "
                                r"integers, got \(2, 2\)"),
    (lambda: AvgPool2D(2, count_include_pad="no"), "count_include_pad must be True or False"),
    (lambda: AvgPool2D(2.0), "pool_size .* got 2.0"),
    (lambda: UpSampling2D(0), "size must be an integer or a tuple of 2 positive integers, got 0"),
    (lambda: UpSampling2D(1.5), "size .* got 1.5"),
    (lambda: UpSampling2D(2, interpolation="bilinear"),
     "interpolation must be 'nearest', got 'bilinear'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("layer,shape,match", [
    (MaxPool2D(2), (4, 4), r"MaxPool2D layer needs a per-sample input shape \(channels, height, "
                           r"width\), got \(4, 4\)"),
    (MaxPool1D(2), (1, 4, 4), r"\(channels, length\), got \(1, 4, 4\)"),
    (AvgPool2D(3, name="p"), (1, 2, 5), r"AvgPool2D layer 'p': input height, width \(2, 5\) are "
                                        r"smaller than pool_size \(3, 3\)"),
    (GlobalAvgPool2D(), (4,), r"\(channels, height, width\), got \(4,\)"),
    (UpSampling2D(2), (4, 4), r"got \(4, 4\)"),
])
def test_bad_input_shapes_at_build(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer.build(shape)


@pytest.mark.parametrize("layer,X_shape,match", [
    (MaxPool2D(2, name="p"), (2, 4, 4), r"MaxPool2D layer 'p' expects a batch of inputs \(batch, "
                                        r"channels, height, width\), got shape \(2, 4, 4\)"),
    (MaxPool2D(2), (2, 3, 1, 4), r"input height, width \(1, 4\) are smaller than pool_size"),
    (MaxPool1D(2), (2, 4), r"\(batch, channels, length\), got shape \(2, 4\)"),
    (AvgPool2D(2), (1, 1, 4), "got shape"),
    (GlobalAvgPool2D(), (2, 3), "got shape"),
    (UpSampling2D(2), (2, 3, 3), "got shape"),
])
def test_bad_inputs_at_forward(layer, X_shape, match):
    with pytest.raises(ValueError, match=match):
        layer.forward({}, np.zeros(X_shape))


def test_built_pool_checks_channels():
    layer = MaxPool2D(2, name="p")
    layer.build((3, 4, 4))
    with pytest.raises(ValueError, match=r"MaxPool2D layer 'p' expects inputs with 3 channels "
                                         r"\(axis 1\), got 2"):
        layer.forward({}, np.zeros((1, 2, 4, 4)))


def test_docstring_examples_run():
    import doctest

    import rddtensor.layers.pooling as pooling_module
    assert doctest.testmod(pooling_module).failed == 0
