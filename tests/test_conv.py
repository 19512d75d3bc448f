"""Convolution layers (Conv1D, Conv2D, Conv2DTranspose) and their im2col helpers.

Gradient checks for every variant (strided, dilated, grouped, padded, transposed), PyTorch
equivalence of forward and backward and of a small CNN trained with Adam, dtype, config round
trips and the errors a user sees.
"""
import json
import pickle

import numpy as np
import pytest
from gradcheck import check_layer

from rddtensor import layers as L
from rddtensor.layers.base import layer_class
from rddtensor.layers.conv import Conv1D, Conv2D, Conv2DTranspose
import rddtensor.layers.conv as conv_module
from rddtensor.layers.im2col import col2im, im2col, matmul_col2im
from rddtensor.layers.pooling import MaxPool2D
from rddtensor.layers.winograd import winograd_conv3x3
from rddtensor.optim import Adam


def _built(layer, input_shape, seed=0, dtype=np.float64):
    layer.build(input_shape)
    return layer.init_params(np.random.default_rng(seed), dtype=dtype)


def _with_random_bias(params, seed=9):
    """The default bias is zeros; a random one makes its gradient check meaningful."""
    if "b" in params:
        params["b"] = np.random.default_rng(seed).standard_normal(params["b"].shape).astype(
            params["b"].dtype)
    return params


# (constructor kwargs, per-sample input shape)
CONV2D_CASES = {
    "plain": (dict(filters=3, kernel_size=3), (2, 5, 6)),
    "1x1": (dict(filters=3, kernel_size=1), (4, 3, 3)),
    "strided_padded": (dict(filters=3, kernel_size=3, strides=2, padding=1), (2, 7, 6)),
    "rect_kernel_stride_pad": (dict(filters=2, kernel_size=(2, 3), strides=(2, 1),
                                    padding=(1, 0)), (3, 5, 6)),
    "dilated": (dict(filters=2, kernel_size=3, dilation=2, padding=2), (2, 7, 7)),
    "dilated_strided": (dict(filters=2, kernel_size=2, dilation=(2, 3), strides=(1, 2)),
                        (2, 6, 9)),
    "grouped": (dict(filters=4, kernel_size=3, groups=2), (4, 5, 5)),
    "depthwise_same": (dict(filters=3, kernel_size=3, groups=3, padding="same"), (3, 5, 5)),
    "same_even_kernel": (dict(filters=2, kernel_size=4, padding="same", dilation=(1, 2)),
                         (2, 6, 7)),
    "no_bias_tanh": (dict(filters=2, kernel_size=3, use_bias=False, activation="tanh"),
                     (2, 5, 5)),
    "sigmoid": (dict(filters=2, kernel_size=3, strides=2, activation="sigmoid"), (1, 6, 6)),
}

CONV1D_CASES = {
    "plain": (dict(filters=3, kernel_size=3), (2, 8)),
    "strided_padded": (dict(filters=2, kernel_size=4, strides=3, padding=2), (3, 11)),
    "dilated": (dict(filters=2, kernel_size=3, dilation=3), (2, 10)),
    "grouped_same": (dict(filters=6, kernel_size=4, groups=3, padding="same"), (3, 7)),
    "no_bias_gelu": (dict(filters=2, kernel_size=2, use_bias=False, activation="gelu"), (2, 5)),
}

TRANSPOSE_CASES = {
    "plain": (dict(filters=3, kernel_size=3), (2, 4, 5)),
    "stride2_pad1_op1": (dict(filters=2, kernel_size=3, strides=2, padding=1, output_padding=1),
                         (3, 4, 4)),
    "rect": (dict(filters=2, kernel_size=(2, 3), strides=(2, 3), padding=(0, 1),
                  output_padding=(1, 2)), (2, 3, 4)),
    "dilated": (dict(filters=2, kernel_size=3, dilation=2, strides=2, padding=2), (2, 4, 4)),
    "no_bias_tanh": (dict(filters=2, kernel_size=2, strides=2, use_bias=False,
                          activation="tanh"), (2, 3, 3)),
}


def _case_params(cls, kwargs, input_shape):
    layer = cls(**kwargs)
    return layer, _with_random_bias(_built(layer, input_shape, seed=1))


# --- gradient checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CONV2D_CASES))
def test_gradcheck_conv2d(case):
    kwargs, shape = CONV2D_CASES[case]
    layer, params = _case_params(Conv2D, kwargs, shape)
    check_layer(layer, shape, batch=2, params=params)


@pytest.mark.parametrize("case", list(CONV1D_CASES))
def test_gradcheck_conv1d(case):
    kwargs, shape = CONV1D_CASES[case]
    layer, params = _case_params(Conv1D, kwargs, shape)
    check_layer(layer, shape, batch=3, params=params)


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_gradcheck_conv2d_transpose(case):
    kwargs, shape = TRANSPOSE_CASES[case]
    layer, params = _case_params(Conv2DTranspose, kwargs, shape)
    check_layer(layer, shape, batch=2, params=params)


def test_gradcheck_per_element_tiny_conv2d():
    rng = np.random.default_rng(4)
    params = {"W": rng.standard_normal((2, 1, 2, 2)), "b": rng.standard_normal(2)}
    check_layer(Conv2D(2, 2, strides=(1, 2), padding=1), (1, 3, 3), batch=2, params=params,
                per_element=True)


def test_gradcheck_per_element_tiny_transpose():
    rng = np.random.default_rng(5)
    params = {"W": rng.standard_normal((2, 1, 2, 2)), "b": rng.standard_normal(1)}
    check_layer(Conv2DTranspose(1, 2, strides=2, padding=1, output_padding=1), (2, 2, 2),
                batch=1, params=params, per_element=True)


# --- im2col / col2im ----------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,strides,dilation,pads", [
    ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    ((2, 3), (2, 3), (2, 1), ((0, 1), (2, 0))),
    ((4,), (3,), (2,), ((1, 2),)),
])
def test_col2im_is_the_adjoint_of_im2col(kernel, strides, dilation, pads):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 3, *(9,) * len(kernel)))
    cols, out = im2col(X, kernel, strides, dilation, pads)
    assert cols.shape == (3, *kernel, 2, *out) and cols.flags.c_contiguous
    C = rng.standard_normal(cols.shape)
    dX = col2im(C, X.shape, kernel, strides, dilation, pads, out)
    assert dX.shape == X.shape
    np.testing.assert_allclose(np.sum(cols * C), np.sum(X * dX), rtol=1e-12)


@pytest.mark.parametrize("kernel,strides,dilation,pads,groups", [
    ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1),
    ((2, 3), (2, 3), (2, 1), ((0, 1), (2, 0)), 3),
    ((4,), (3,), (2,), ((1, 2),), 1),
])
def test_matmul_col2im_equals_col2im_of_the_product(kernel, strides, dilation, pads, groups):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2, 6, *(9,) * len(kernel)))
    _, out = im2col(X, kernel, strides, dilation, pads)
    K, P = int(np.prod(kernel)), 2 * int(np.prod(out))
    A = rng.standard_normal((groups, 6 // groups * K, 5))
    B = rng.standard_normal((groups, 5, P))
    dX = matmul_col2im(A, B, X.shape, kernel, strides, dilation, pads, out)
    ref = col2im(np.matmul(A, B), X.shape, kernel, strides, dilation, pads, out)
    assert dX.shape == X.shape and dX.flags.c_contiguous
    np.testing.assert_allclose(dX, ref, rtol=1e-12, atol=1e-12)


def test_non_contiguous_input_gives_the_same_result():
    layer = Conv2D(3, 3, strides=2, padding=1)
    params = _with_random_bias(_built(layer, (2, 7, 7)))
    X = np.random.default_rng(1).standard_normal((7, 7, 2, 4)).transpose(3, 2, 0, 1)
    assert not X.flags.c_contiguous
    np.testing.assert_array_equal(layer(params, X), layer(params, np.ascontiguousarray(X)))


# --- Winograd F(4x4, 3x3) -----------------------------------------------------------------------
WINOGRAD_CASES = {  # case -> (filters, per-sample input shape, padding)
    "same_multiple_of_4": (3, (2, 8, 8), 1),
    "same_ragged": (4, (3, 7, 9), 1),
    "valid": (2, (2, 6, 11), 0),
    "pad2": (3, (2, 5, 5), 2),
    "asymmetric": (2, (1, 5, 6), (2, 0)),
    "single_tile": (1, (1, 3, 3), 0),
}


@pytest.fixture
def winograd_always(monkeypatch):
    """Route every eligible Conv2D (3x3, stride 1, one group) through Winograd."""
    monkeypatch.setattr(conv_module, "WINOGRAD_MIN_CHANNELS", 1)


def _winograd_layer(case):
    filters, shape, padding = WINOGRAD_CASES[case]
    layer = Conv2D(filters, 3, padding=padding)
    return layer, _with_random_bias(_built(layer, shape, seed=1)), shape


@pytest.mark.parametrize("case", list(WINOGRAD_CASES))
def test_gradcheck_conv2d_winograd(case, winograd_always):
    layer, params, shape = _winograd_layer(case)
    check_layer(layer, shape, batch=2, params=params)


@pytest.mark.parametrize("case", list(CONV2D_CASES))
def test_gradcheck_conv2d_with_winograd_forced(case, winograd_always):
    kwargs, shape = CONV2D_CASES[case]  # the non-3x3, strided or grouped ones stay on im2col
    layer, params = _case_params(Conv2D, kwargs, shape)
    check_layer(layer, shape, batch=2, params=params)


@pytest.mark.parametrize("case", list(WINOGRAD_CASES))
def test_winograd_matches_im2col(case, monkeypatch):
    monkeypatch.setattr(conv_module, "WINOGRAD_MIN_CHANNELS", 10 ** 9)  # conv_nd: im2col
    _, params, shape = _winograd_layer(case)
    pad = WINOGRAD_CASES[case][2]
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    pads = ((ph, ph), (pw, pw))
    X = np.random.default_rng(2).standard_normal((3, *shape))
    Y, backprop = winograd_conv3x3(X, params["W"], params["b"], pads)
    Y_ref, backprop_ref = conv_module.conv_nd(X, params["W"], params["b"], (1, 1), (1, 1), pads)
    assert Y.shape == Y_ref.shape and Y.flags.c_contiguous
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-12, atol=1e-12)
    dY = np.random.default_rng(3).standard_normal(Y.shape)
    for got, ref in zip(backprop(dY), backprop_ref(dY)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)


def test_winograd_runs_where_it_pays():
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return winograd_conv3x3(*args)
    X16, X2 = np.ones((2, 16, 6, 6)), np.ones((2, 2, 6, 6))
    runs = [(Conv2D(16, 3, padding=1), X16, True),        # 16 -> 16 channels: Winograd
            (Conv2D(6, 3, padding=1), X2, False),          # 2 -> 6: the transforms would dominate
            (Conv2D(16, 3, strides=2), X16, False), (Conv2D(16, 3, dilation=2), X16, False),
            (Conv2D(16, 3, groups=2), X16, False), (Conv2D(16, 5), X16, False)]
    for layer, X, expected in runs:
        calls.clear()
        params = _built(layer, X.shape[1:])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(conv_module, "winograd_conv3x3", spy)
            layer(params, X)
        assert bool(calls) == expected, layer.get_config()


@pytest.mark.parametrize("case", list(WINOGRAD_CASES))
def test_conv2d_winograd_matches_torch(case, winograd_always):
    torch = pytest.importorskip("torch")
    layer, params, shape = _winograd_layer(case)
    pad = tuple(layer.padding) if not isinstance(layer.padding, str) else layer.padding
    X = np.random.default_rng(2).standard_normal((3, *shape))

    def fn(Xt, Wt, bt):
        return torch.nn.functional.conv2d(Xt, Wt, bt, padding=pad)
    _compare_with_torch(layer, params, X, fn)


def test_winograd_float32_matches_torch():
    """float32 rounding of the transforms stays ~1e-6 of the output's scale (64 channels)."""
    torch = pytest.importorskip("torch")
    layer = Conv2D(64, 3, padding=1)
    params = _with_random_bias(_built(layer, (64, 12, 12), dtype=np.float32))
    X = np.random.default_rng(2).standard_normal((4, 64, 12, 12)).astype(np.float32)
    Y, backprop = layer.forward(params, X)
    dY = np.random.default_rng(3).standard_normal(Y.shape).astype(np.float32)
    dX, grads = backprop(dY)
    ref = _torch_grads(torch, lambda Xt, Wt, bt: torch.nn.functional.conv2d(Xt, Wt, bt, padding=1),
                       X, params, dY)
    for name, got in (("Y", Y), ("dX", dX), ("W", grads["W"]), ("b", grads["b"])):
        assert got.dtype == np.float32, name
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=2e-5 * scale, err_msg=name)


# --- against PyTorch ----------------------------------------------------------------------------
def _torch_grads(torch, fn, X, params, dY):
    Xt = torch.tensor(X, requires_grad=True)
    Wt = torch.tensor(params["W"], requires_grad=True)
    bt = torch.tensor(params["b"], requires_grad=True) if "b" in params else None
    Yt = fn(Xt, Wt, bt)
    Yt.backward(torch.tensor(dY))
    out = {"Y": Yt.detach().numpy(), "dX": Xt.grad.numpy(), "W": Wt.grad.numpy()}
    if bt is not None:
        out["b"] = bt.grad.numpy()
    return out


def _compare_with_torch(layer, params, X, fn, rtol=1e-10, atol=1e-10):
    torch = pytest.importorskip("torch")
    Y, backprop = layer.forward(params, X)
    dY = np.random.default_rng(3).standard_normal(Y.shape).astype(X.dtype)
    dX, grads = backprop(dY)
    ref = _torch_grads(torch, fn, X, params, dY)
    np.testing.assert_allclose(Y, ref["Y"], rtol=rtol, atol=atol, err_msg="Y")
    np.testing.assert_allclose(dX, ref["dX"], rtol=rtol, atol=atol, err_msg="dX")
    assert set(grads) == set(params)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref[k], rtol=rtol, atol=atol, err_msg=k)
    return Y, dX, grads


def _torch_padding(layer):
    return layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)


@pytest.mark.parametrize("case", list(CONV2D_CASES))
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv2d_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    kwargs, shape = CONV2D_CASES[case]
    layer, params = _case_params(Conv2D, kwargs, shape)
    act = {None: lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[
        kwargs.get("activation")]
    X = np.random.default_rng(2).standard_normal((3, *shape))

    def fn(Xt, Wt, bt):
        return act(F.conv2d(Xt, Wt, bt, stride=layer.strides, padding=_torch_padding(layer),
                            dilation=layer.dilation, groups=layer.groups))
    _compare_with_torch(layer, params, X, fn)


@pytest.mark.parametrize("case", list(CONV1D_CASES))
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv1d_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    kwargs, shape = CONV1D_CASES[case]
    layer, params = _case_params(Conv1D, kwargs, shape)
    act = {None: lambda t: t, "gelu": F.gelu}[kwargs.get("activation")]
    X = np.random.default_rng(2).standard_normal((4, *shape))

    def fn(Xt, Wt, bt):
        return act(F.conv1d(Xt, Wt, bt, stride=layer.strides, padding=_torch_padding(layer),
                            dilation=layer.dilation, groups=layer.groups))
    _compare_with_torch(layer, params, X, fn)


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv2d_transpose_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    kwargs, shape = TRANSPOSE_CASES[case]
    layer, params = _case_params(Conv2DTranspose, kwargs, shape)
    act = {None: lambda t: t, "tanh": torch.tanh}[kwargs.get("activation")]
    X = np.random.default_rng(2).standard_normal((3, *shape))

    def fn(Xt, Wt, bt):
        return act(F.conv_transpose2d(Xt, Wt, bt, stride=layer.strides, padding=layer.padding,
                                      output_padding=layer.output_padding,
                                      dilation=layer.dilation))
    Y, _, _ = _compare_with_torch(layer, params, X, fn)
    assert Y.shape[1:] == layer.output_shape


@pytest.mark.parametrize("cls,kwargs,shape,fn_name", [
    (Conv2D, dict(filters=8, kernel_size=3, strides=2, padding=1, groups=2), (4, 9, 9), "conv2d"),
    (Conv1D, dict(filters=4, kernel_size=5, padding="same"), (3, 16), "conv1d"),
    (Conv2DTranspose, dict(filters=3, kernel_size=4, strides=2, padding=1), (4, 5, 5),
     "conv_transpose2d"),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_float32_matches_torch_and_stays_float32(cls, kwargs, shape, fn_name):
    torch = pytest.importorskip("torch")
    fn_t = getattr(torch.nn.functional, fn_name)
    layer = cls(**kwargs)
    params = _with_random_bias(_built(layer, shape, dtype=np.float32))
    X = np.random.default_rng(2).standard_normal((5, *shape)).astype(np.float32)
    extra = {} if cls is Conv2DTranspose else {"groups": layer.groups}

    def fn(Xt, Wt, bt):
        return fn_t(Xt, Wt, bt, stride=layer.strides, padding=_torch_padding(layer),
                    dilation=layer.dilation, **extra)
    Y, dX, grads = _compare_with_torch(layer, params, X, fn, rtol=1e-4, atol=1e-5)
    assert Y.dtype == dX.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


def test_torch_state_dict_maps_straight_in():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, groups=1)
    layer = Conv2D(5, 3, strides=2, padding=1)
    layer.build((3, 8, 8))
    params = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    params = {"W": params["weight"], "b": params["bias"]}
    assert {k: v.shape for k, v in params.items()} == layer.param_shapes()
    X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(layer(params, X), ref, rtol=1e-5, atol=1e-5)


def test_small_cnn_adam_steps_match_torch():
    """Conv2D -> ReLU -> MaxPool -> Flatten -> Dense, same weights, 3 full-batch Adam steps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=32)
    lr = 1e-2
    model = L.Sequential([Conv2D(6, 3, padding=1, input_shape=(2, 8, 8)), L.ReLU(),
                          MaxPool2D(2), L.Flatten(), L.Dense(4)], seed=3)
    model.compile(optimizer=Adam(lr), loss="sparse_categorical_crossentropy")
    model.build()
    weights = model.get_weights()
    weights[1] = rng.standard_normal(6).astype(np.float32) * 0.1  # a non-zero conv bias
    model.set_weights(weights)

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(96, 4))
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):  # identical layouts
            assert tuple(p.shape) == w.shape
            p.copy_(torch.from_numpy(w))
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        opt.step()

    model.fit(X, y, epochs=3, batch_size=len(X), shuffle=False, verbose=0)
    assert model.step == 3
    for ours, theirs, w0 in zip(model.get_weights(), net.parameters(), weights):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-4, atol=1e-6)
        assert not np.allclose(ours, w0)  # it moved: the comparison is not trivially true


# --- shapes, dtype, batches ---------------------------------------------------------------------
@pytest.mark.parametrize("layer,in_shape,out_shape,param_shapes", [
    (Conv2D(8, 3), (3, 10, 12), (8, 8, 10), {"W": (8, 3, 3, 3), "b": (8,)}),
    (Conv2D(8, (3, 5), strides=(2, 3), padding=(1, 2), dilation=(1, 2),
            groups=4, use_bias=False), (4, 9, 16), (8, 5, 4), {"W": (8, 1, 3, 5)}),
    (Conv2D(2, 4, padding="same"), (1, 7, 6), (2, 7, 6), {"W": (2, 1, 4, 4), "b": (2,)}),
    (Conv1D(5, 3, strides=2), (2, 11), (5, 5), {"W": (5, 2, 3), "b": (5,)}),
    (Conv2DTranspose(6, 3, strides=2, padding=1, output_padding=1), (4, 5, 7), (6, 10, 14),
     {"W": (4, 6, 3, 3), "b": (6,)}),
], ids=repr)
def test_output_and_param_shapes(layer, in_shape, out_shape, param_shapes):
    assert layer.build(in_shape) == out_shape
    assert layer.param_shapes() == param_shapes
    params = layer.init_params(np.random.default_rng(0))
    assert all(p.dtype == np.float32 for p in params.values())
    X = np.ones((2, *in_shape), np.float32)
    Y, backprop = layer.forward(params, X)
    assert Y.shape == (2, *out_shape) and Y.dtype == np.float32
    dX, grads = backprop(np.ones_like(Y))
    assert dX.shape == X.shape and dX.dtype == np.float32
    assert {k: g.shape for k, g in grads.items()} == param_shapes


@pytest.mark.parametrize("layer,in_shape", [
    (Conv2D(3, 3, padding=1), (2, 5, 5)), (Conv1D(3, 2), (2, 5)),
    (Conv2DTranspose(3, 2, strides=2), (2, 3, 3)),
])
def test_empty_batch(layer, in_shape):
    params = _built(layer, in_shape)
    Y, backprop = layer.forward(params, np.zeros((0, *in_shape)))
    dX, grads = backprop(np.zeros_like(Y))
    assert Y.shape == (0, *layer.output_shape) and dX.shape == (0, *in_shape)
    for g in grads.values():
        np.testing.assert_array_equal(g, 0.0)


def test_default_initializer_scale():
    """he_uniform with PyTorch fans: fan_in = C_in / groups * kh * kw; bias zeros."""
    layer = Conv2D(256, 3, groups=2)
    params = _built(layer, (32, 5, 5), seed=0)
    fan_in = 16 * 9
    assert params["W"].std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.03)
    np.testing.assert_array_equal(params["b"], 0.0)


def test_other_spatial_sizes_run_fully_convolutional():
    layer = Conv2D(2, 3, padding="same")
    params = _built(layer, (1, 8, 8))
    assert layer(params, np.zeros((1, 1, 5, 11))).shape == (1, 2, 5, 11)


# --- config -------------------------------------------------------------------------------------
CONFIG_LAYERS = [  # (layer, per-sample input shape)
    (Conv2D(4, 3), (2, 9, 9)),
    (Conv2D(6, (3, 5), strides=(2, 1), padding=(1, 2), dilation=2, groups=3, use_bias=False,
            activation=L.LeakyReLU(0.2), kernel_initializer="glorot_normal",
            bias_initializer="ones", input_shape=(3, 9, 9), name="conv"), (3, 9, 9)),
    (Conv2D(2, 4, padding="SAME", activation="relu"), (2, 9, 9)),
    (Conv1D(3, 5, strides=2, padding="valid", groups=1, activation="tanh"), (2, 12)),
    (Conv1D(4, 3, padding=1, groups=2, input_shape=(2, 12)), (2, 12)),
    (Conv2DTranspose(3, 4, strides=2, padding=1, output_padding=1, activation="sigmoid"),
     (2, 5, 5)),
    (Conv2DTranspose(2, (2, 3), strides=(2, 3), dilation=(1, 2), use_bias=False, name="up"),
     (3, 4, 4)),
]


@pytest.mark.parametrize("layer,in_shape", CONFIG_LAYERS, ids=repr)
def test_config_round_trip(layer, in_shape):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class(type(layer).__name__).from_config(json.loads(json.dumps(cfg)))
    assert type(clone) is type(layer) and clone.get_config() == cfg
    p, q = _built(layer, in_shape), _built(clone, in_shape)
    X = np.random.default_rng(1).standard_normal((2, *in_shape))
    np.testing.assert_array_equal(layer(p, X), clone(q, X))


def test_save_and_load_a_cnn(tmp_path):
    model = L.Sequential([Conv2D(3, 3, padding="same", activation="relu", input_shape=(1, 6, 6)),
                          MaxPool2D(2), Conv2DTranspose(2, 2, strides=2), L.Flatten(),
                          L.Dense(2)], seed=0)
    model.build()
    model.save(str(tmp_path / "m"))
    loaded = L.load_model(str(tmp_path / "m"))
    X = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(X), loaded.predict(X))


def test_pickles_small():
    layer = Conv2D(64, 3, padding=1)
    params = _built(layer, (64, 16, 16), dtype=np.float32)
    layer.forward(params, np.ones((8, 64, 16, 16), np.float32))
    assert len(pickle.dumps(layer)) < 2000


# --- bad arguments and inputs -------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (Conv2D, dict(filters=0, kernel_size=3), "filters must be a positive integer, got 0"),
    (Conv2D, dict(filters=2.5, kernel_size=3), "filters must be a positive integer, got 2.5"),
    (Conv2D, dict(filters=2, kernel_size=0), r"kernel_size must be an integer or a tuple of 2 "
                                             r"positive integers, got 0"),
    (Conv2D, dict(filters=2, kernel_size=(3,)), r"kernel_size .* got \(3,\)"),
    (Conv2D, dict(filters=2, kernel_size=True), "kernel_size .* got True"),
    (Conv2D, dict(filters=2, kernel_size=3, strides=0), "strides .* got 0"),
    (Conv2D, dict(filters=2, kernel_size=3, strides=(1, 1.5)), r"strides .* got \(1, 1.5\)"),
    (Conv2D, dict(filters=2, kernel_size=3, dilation=-1), "dilation .* got -1"),
    (Conv2D, dict(filters=2, kernel_size=3, padding=-1),
     "padding must be an integer or a tuple of 2 integers >= 0, got -1"),
    (Conv2D, dict(filters=2, kernel_size=3, padding="full"),
     "padding must be 'valid', 'same', an integer or a tuple of 2 integers >= 0, got 'full'"),
    (Conv2D, dict(filters=2, kernel_size=3, padding="same", strides=2),
     r"padding='same' needs strides=1 \(as in PyTorch\), got strides=\(2, 2\)"),
    (Conv2D, dict(filters=2, kernel_size=3, groups=0), "groups must be a positive integer, got 0"),
    (Conv2D, dict(filters=4, kernel_size=3, groups=3), "groups=3 must divide filters=4"),
    (Conv2D, dict(filters=2, kernel_size=3, use_bias="yes"), "use_bias must be True or False"),
    (Conv2D, dict(filters=2, kernel_size=3, activation="foo"), "unknown activation 'foo'"),
    (Conv2D, dict(filters=2, kernel_size=3, kernel_initializer="xavier"),
     "unknown kernel_initializer 'xavier'"),
    (Conv2D, dict(filters=2, kernel_size=3, bias_initializer="one"),
     "unknown bias_initializer 'one'"),
    (Conv2D, dict(filters=2, kernel_size=3, input_shape=(0, 4, 4)), "input_shape"),
    (Conv1D, dict(filters=2, kernel_size=(3, 3)),
     r"kernel_size must be an integer or a tuple of 1 positive integers, got \(3, 3\)"),
    (Conv1D, dict(filters=2, kernel_size=3, padding=(1, 1)), r"padding .* got \(1, 1\)"),
    (Conv2DTranspose, dict(filters=2, kernel_size=3, padding="same"),
     "padding must be an integer or a tuple of 2 integers >= 0, got 'same'"),
    (Conv2DTranspose, dict(filters=2, kernel_size=3, strides=2, output_padding=2),
     r"output_padding must be smaller than strides on every axis, got output_padding=\(2, 2\), "
     r"strides=\(2, 2\)"),
    (Conv2DTranspose, dict(filters=2, kernel_size=3, output_padding=-1), "output_padding"),
    (Conv2DTranspose, dict(filters=0, kernel_size=3), "filters must be a positive integer"),
])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("layer,shape,match", [
    (Conv2D(4, 3, groups=2), (3, 5, 5), "groups=2 must divide the input channels, got 3"),
    (Conv2D(2, 3), (5, 5), r"Conv2D layer needs a per-sample input shape \(channels, height, "
                           r"width\), got \(5, 5\)"),
    (Conv1D(2, 3), (1, 5, 5), r"\(channels, length\), got \(1, 5, 5\)"),
    (Conv2D(2, 5, name="c"), (1, 3, 8), r"Conv2D layer 'c': input height, width \(3, 8\) give "
                                        r"an empty output \(-1, 4\)"),
    (Conv2D(2, 3, dilation=3), (1, 6, 6), "empty output"),
    (Conv2DTranspose(2, 1, padding=1), (1, 2, 2), "empty output"),
    (Conv2D(2, 3, activation=L.Softmax(axis=0)), (1, 5, 5), "axis 0 must name a non-batch axis"),
])
def test_bad_input_shapes_at_build(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer.build(shape)


@pytest.mark.parametrize("layer,in_shape,X_shape,match", [
    (Conv2D(3, 3, name="c1"), (3, 6, 6), (2, 2, 6, 6),
     r"Conv2D layer 'c1' expects inputs with 3 channels \(axis 1\), got 2"),
    (Conv2D(4, 3, groups=2), (4, 6, 6), (2, 2, 6, 6), "expects inputs with 4 channels"),
    (Conv1D(3, 3), (2, 8), (2, 3, 8), r"Conv1D layer expects inputs with 2 channels \(axis 1\), "
                                      r"got 3"),
    (Conv2DTranspose(3, 2, name="up"), (4, 3, 3), (1, 5, 3, 3),
     r"Conv2DTranspose layer 'up' expects inputs with 4 channels \(axis 1\), got 5"),
    (Conv2D(3, 3), (2, 6, 6), (2, 6, 6), r"expects a batch of inputs \(batch, channels, height, "
                                         r"width\), got shape \(2, 6, 6\)"),
    (Conv1D(3, 3), (2, 6), (2, 6), r"\(batch, channels, length\), got shape \(2, 6\)"),
    (Conv2D(3, 3), (2, 6, 6), (1, 2, 2, 6), "give an empty output"),
])
def test_bad_inputs_at_forward(layer, in_shape, X_shape, match):
    params = _built(layer, in_shape)
    with pytest.raises(ValueError, match=match):
        layer.forward(params, np.zeros(X_shape))


def test_sequential_names_the_layer_on_bad_channels():
    model = L.Sequential([L.Reshape((2, 4, 4), input_shape=(32,)), Conv2D(3, 3, name="c")])
    model.build()
    # a Reshape built for 2 channels feeding a conv, then called with the wrong weights
    params = dict(model.params)
    params["1.W"] = np.zeros((3, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"layer 1 \(Conv2D layer 'c'\): .* expects inputs with "
                                         r"1 channels \(axis 1\), got 2"):
        model.forward(params, np.zeros((1, 32), np.float32))


def test_param_shapes_before_build():
    with pytest.raises(ValueError, match="no input shape yet"):
        Conv2D(3, 3).param_shapes()
    with pytest.raises(ValueError, match="no input shape yet"):
        Conv2DTranspose(3, 3).param_shapes()


def test_docstring_examples_run():
    import doctest

    import rddtensor.layers.im2col as im2col_module
    import rddtensor.layers.winograd as winograd_module
    for module in (conv_module, im2col_module, winograd_module):
        assert doctest.testmod(module).failed == 0
