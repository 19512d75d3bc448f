"""``rddtensor.kernels``: generic references equal the library paths; CuPy kernels equal them.

On NumPy the generic implementations must reproduce ``rddtensor.optim.optimizers``, ``rddtensor.layers.activations``
and ``rddtensor.optim.losses`` bit for bit (same operations, same order), and the LSTM cell the textbook
formulas and PyTorch. The ``gpu`` tests compare every CuPy kernel with its generic path on random
CuPy inputs; without cupy or a visible GPU they skip.
"""
from __future__ import annotations

import doctest
import os
import re

import numpy as np
import pytest
import scipy.special
from gradcheck import check_grad

from rddtensor.layers.activations import activation_forward
from rddtensor.optim.losses import sparse_categorical_crossentropy
from rddtensor.optim.optimizers import adam_update, sgd_update
from rddtensor import kernels
from rddtensor.kernels import KERNELS, generic, kernel_or_generic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- optimizers -----------------------------------------------------------------------------------
def _state(n, dtype, seed, names):
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(n).astype(dtype) for k in names}
    for k in ("v", "vmax"):  # second moments are non-negative
        if k in state:
            state[k] = np.abs(state[k])
    return state


ADAM_CASES = {
    "adam": dict(weight_decay=0.0, decoupled=False, amsgrad=False),
    "adam_l2": dict(weight_decay=0.1, decoupled=False, amsgrad=False),
    "adamw": dict(weight_decay=0.1, decoupled=True, amsgrad=False),
    "adam_amsgrad": dict(weight_decay=0.0, decoupled=False, amsgrad=True),
    "adamw_amsgrad": dict(weight_decay=0.05, decoupled=True, amsgrad=True),
}


def run_adam(fn, state, grads, case, xp=np):
    kw = dict(ADAM_CASES[case])
    amsgrad = kw.pop("amsgrad")
    for step, g in enumerate(grads, start=1):
        args = (state["w"], xp.array(g, copy=True), state["m"], state["v"])
        extra = {"amsgrad_vmax": state["vmax"]} if amsgrad else {}
        if fn is adam_update:
            fn(np, *args, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, step=step, **kw, **extra)
        else:
            fn(*args, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, step=step, **kw, **extra)
    return state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_generic_adam_equals_adam_update(case, dtype):
    grads = [np.random.default_rng(s).standard_normal(37).astype(dtype) for s in range(3)]
    names = ("w", "m", "v", "vmax")
    ref = run_adam(adam_update, _state(37, dtype, 1, names), grads, case)
    got = run_adam(kernels.adam_generic, _state(37, dtype, 1, names), grads, case)
    for k in names:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        assert got[k].dtype == dtype


SGD_CASES = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "plain_wd": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    "dampening_wd": dict(momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.02),
}


def run_sgd(fn, state, grads, case, xp=np):
    kw = SGD_CASES[case]
    buf = state["buf"] if kw["momentum"] else None
    for step, g in enumerate(grads, start=1):
        g = xp.array(g, copy=True)
        if fn is sgd_update:
            fn(np, state["w"], g, buf, lr=0.1, step=step, **kw)
        else:
            fn(state["w"], g, buf, lr=0.1, step=step, **kw)
    return state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_generic_sgd_equals_sgd_update(case, dtype):
    grads = [np.random.default_rng(s).standard_normal(29).astype(dtype) for s in range(3)]
    ref = run_sgd(sgd_update, _state(29, dtype, 2, ("w", "buf")), grads, case)
    got = run_sgd(kernels.sgd_generic, _state(29, dtype, 2, ("w", "buf")), grads, case)
    for k in ("w", "buf"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_optimizer_step_must_be_one_based():
    w = np.ones(2)
    with pytest.raises(ValueError, match="step is 1-based"):
        kernels.sgd_generic(w, np.ones(2), None, lr=0.1, momentum=0.0, dampening=0.0,
                            nesterov=False, weight_decay=0.0, step=0)


# --- activation backward --------------------------------------------------------------------------
X_EDGE = np.array([-40.0, -8.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 40.0])


def _activation_inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([X_EDGE, 3.0 * rng.standard_normal(40)]).astype(dtype).reshape(7, 7)
    return X, rng.standard_normal(X.shape).astype(dtype)


ACTIVATION_KERNELS = {  # kernel -> (activation, kwargs, which forward array the kernel takes)
    "relu_backward": ("relu", {}, "Y"),
    "sigmoid_backward": ("sigmoid", {}, "Y"),
    "tanh_backward": ("tanh", {}, "Y"),
    "gelu_tanh_backward": ("gelu", {"approximate": "tanh"}, "X"),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(ACTIVATION_KERNELS))
def test_generic_activation_backward_equals_layers(name, dtype):
    act, kw, arg = ACTIVATION_KERNELS[name]
    X, dY = _activation_inputs(dtype)
    Y, backprop = activation_forward(act, X, **kw)
    got = generic(name)(dY, Y if arg == "Y" else X)
    np.testing.assert_array_equal(got, backprop(dY))
    assert got.dtype == dtype


# --- LSTM cell ------------------------------------------------------------------------------------
def _lstm_inputs(batch=3, H=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (2.0 * rng.standard_normal((batch, 4 * H))).astype(dtype), \
        rng.standard_normal((batch, H)).astype(dtype)


def test_lstm_cell_forward_equals_formulas():
    gates, c_prev = _lstm_inputs()
    gates[0, :3] = [-800.0, 800.0, 0.0]  # saturated gates stay finite
    H = c_prev.shape[1]
    h, c, act = kernels.lstm_cell_forward_generic(gates, c_prev)
    i, f = scipy.special.expit(gates[:, :H]), scipy.special.expit(gates[:, H:2 * H])
    g, o = np.tanh(gates[:, 2 * H:3 * H]), scipy.special.expit(gates[:, 3 * H:])
    np.testing.assert_allclose(act, np.concatenate([i, f, g, o], axis=1), rtol=1e-14, atol=0)
    np.testing.assert_allclose(c, f * c_prev + i * g, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(h, o * np.tanh(f * c_prev + i * g), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("with_dc", [True, False])
def test_lstm_cell_backward_gradcheck(with_dc):
    gates, c_prev = _lstm_inputs(batch=2, H=3, seed=1)
    rng = np.random.default_rng(2)
    Rh, Rc = rng.standard_normal(c_prev.shape), rng.standard_normal(c_prev.shape)
    if not with_dc:
        Rc = np.zeros_like(Rc)

    def f(a):
        h, c, _ = kernels.lstm_cell_forward_generic(a["gates"], a["c_prev"])
        return float(np.sum(h * Rh) + np.sum(c * Rc))

    h, c, act = kernels.lstm_cell_forward_generic(gates, c_prev)
    dgates, dc_prev = kernels.lstm_cell_backward_generic(Rh, Rc if with_dc else None, act,
                                                         c_prev, c)
    check_grad(f, {"gates": gates, "c_prev": c_prev}, {"gates": dgates, "c_prev": dc_prev},
               per_element=True)


def test_lstm_cell_matches_torch():
    torch = pytest.importorskip("torch")
    n_in, H, batch = 5, 4, 3
    cell = torch.nn.LSTMCell(n_in, H, dtype=torch.float64)
    rng = np.random.default_rng(3)
    X, h0, c0 = (rng.standard_normal((batch, n)) for n in (n_in, H, H))
    dh, dc = rng.standard_normal((batch, H)), rng.standard_normal((batch, H))
    W_ih, W_hh = cell.weight_ih.detach().numpy(), cell.weight_hh.detach().numpy()
    gates = X @ W_ih.T + cell.bias_ih.detach().numpy() + h0 @ W_hh.T + cell.bias_hh.detach().numpy()
    h, c, act = kernels.lstm_cell_forward_generic(gates, c0)
    dgates, dc_prev = kernels.lstm_cell_backward_generic(dh, dc, act, c0, c)

    Xt, ht, ct = (torch.tensor(a, requires_grad=True) for a in (X, h0, c0))
    h_t, c_t = cell(Xt, (ht, ct))
    (h_t * torch.tensor(dh)).sum().add((c_t * torch.tensor(dc)).sum()).backward()
    tol = {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(h, h_t.detach().numpy(), **tol)
    np.testing.assert_allclose(c, c_t.detach().numpy(), **tol)
    np.testing.assert_allclose(dgates @ W_ih, Xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dgates @ W_hh, ht.grad.numpy(), **tol)
    np.testing.assert_allclose(dc_prev, ct.grad.numpy(), **tol)


# --- GRU cell -------------------------------------------------------------------------------------
def _gru_inputs(batch=3, H=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    gi, gh = ((2.0 * rng.standard_normal((batch, 3 * H))).astype(dtype) for _ in range(2))
    return gi, gh, rng.standard_normal((batch, H)).astype(dtype)


def test_gru_cell_backward_gradcheck():
    gi, gh, h_prev = _gru_inputs(batch=2, H=3, seed=8)
    R = np.random.default_rng(9).standard_normal(h_prev.shape)

    def f(a):
        h, _ = kernels.gru_cell_forward_generic(a["gi"], a["gh"], a["h_prev"])
        return float(np.sum(h * R))

    h, act = kernels.gru_cell_forward_generic(gi, gh, h_prev)
    dgi, dgh, dh_direct = kernels.gru_cell_backward_generic(R, act, gh, h_prev)
    check_grad(f, {"gi": gi, "gh": gh, "h_prev": h_prev},
               {"gi": dgi, "gh": dgh, "h_prev": dh_direct}, per_element=True)


def test_gru_cell_matches_torch():
    torch = pytest.importorskip("torch")
    n_in, H, batch = 5, 4, 3
    cell = torch.nn.GRUCell(n_in, H, dtype=torch.float64)
    rng = np.random.default_rng(10)
    X, h0, dh = rng.standard_normal((batch, n_in)), *rng.standard_normal((2, batch, H))
    W_ih, W_hh = cell.weight_ih.detach().numpy(), cell.weight_hh.detach().numpy()
    gi = X @ W_ih.T + cell.bias_ih.detach().numpy()
    gh = h0 @ W_hh.T + cell.bias_hh.detach().numpy()
    h, act = kernels.gru_cell_forward_generic(gi, gh, h0)
    dgi, dgh, dh_direct = kernels.gru_cell_backward_generic(dh, act, gh, h0)

    Xt, ht = (torch.tensor(a, requires_grad=True) for a in (X, h0))
    h_t = cell(Xt, ht)
    (h_t * torch.tensor(dh)).sum().backward()
    tol = {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(h, h_t.detach().numpy(), **tol)
    np.testing.assert_allclose(dgi @ W_ih, Xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dh_direct + dgh @ W_hh, ht.grad.numpy(), **tol)


# --- im2col / col2im ------------------------------------------------------------------------------
#: (x_shape, kernel, strides, dilation, pads): odd sizes, strides, dilation, asymmetric padding
CONV_GEOMETRIES = [
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    ((1, 2, 9, 8), (3, 2), (2, 3), (1, 1), ((0, 1), (2, 0))),
    ((3, 1, 10, 9), (2, 3), (1, 2), (2, 1), ((1, 0), (0, 2))),
    ((2, 4, 5, 5), (1, 1), (2, 2), (1, 1), ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
def test_im2col_col2im_are_adjoint(geometry):
    from rddtensor.layers.im2col import col2im, im2col
    x_shape, kernel, strides, dilation, pads = CONV_GEOMETRIES[geometry]
    rng = np.random.default_rng(geometry)
    X = rng.standard_normal(x_shape)
    cols, out = im2col(X, kernel, strides, dilation, pads)
    C = rng.standard_normal(cols.shape)
    dX = col2im(C, x_shape, kernel, strides, dilation, pads, out)
    # <im2col(X), C> == <X, col2im(C)>: col2im is the adjoint the backward pass needs
    assert np.isclose(np.vdot(cols, C), np.vdot(X, dX), rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
def test_matmul_col2im_equals_col2im_of_the_product(geometry, groups):
    # the GPU strategy: one GEMM, then the col2im kernel, instead of one GEMM per offset
    from rddtensor.layers.im2col import col2im, im2col, matmul_col2im
    x_shape, kernel, strides, dilation, pads = CONV_GEOMETRIES[geometry]
    x_shape = (x_shape[0], 2 * groups, *x_shape[2:])
    rng = np.random.default_rng(20 + geometry)
    _, out = im2col(np.zeros(x_shape), kernel, strides, dilation, pads)
    K, NP = int(np.prod(kernel)), x_shape[0] * int(np.prod(out))
    A = rng.standard_normal((groups, x_shape[1] // groups * K, 3))
    B = rng.standard_normal((groups, 3, NP))
    np.testing.assert_allclose(
        matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out),
        col2im(A @ B, x_shape, kernel, strides, dilation, pads, out), rtol=1e-12, atol=1e-12)


# --- softmax cross-entropy ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_generic_softmax_cross_entropy_equals_loss(dtype):
    rng = np.random.default_rng(4)
    Y = (3.0 * rng.standard_normal((6, 5))).astype(dtype)
    Y[0] = [1e4, -1e4, 0.0, 5.0, 1e4]  # extreme logits stay finite
    labels = np.array([1, 0, 4, 2, 2, 3])
    losses, dY = kernels.softmax_cross_entropy_generic(Y, labels, 10)
    loss, dY_ref = sparse_categorical_crossentropy(Y, labels, n_total=10)
    np.testing.assert_array_equal(dY, dY_ref)
    assert dY.dtype == dtype and losses.shape == (6,) and np.isfinite(losses).all()
    assert float(losses.astype(np.float64).sum()) / 10 == loss


# --- dispatch and the one-switch rule -------------------------------------------------------------
def test_kernel_or_generic_runs_generic_on_numpy_and_builds_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "_CACHE", {})
    X, dY = _activation_inputs(np.float32)
    for name in ACTIVATION_KERNELS:
        fn = kernel_or_generic(name)
        assert fn is kernel_or_generic(name)  # one dispatcher per name
        np.testing.assert_array_equal(fn(dY, X), generic(name)(dY, X))
    gates, c_prev = _lstm_inputs(dtype=np.float32)
    for a, b in zip(kernel_or_generic("lstm_cell_forward")(gates, c_prev),
                    kernels.lstm_cell_forward_generic(gates, c_prev)):
        np.testing.assert_array_equal(a, b)
    assert kernels._CACHE == {}  # no CuPy kernel was created for NumPy inputs


def test_every_kernel_has_both_implementations():
    assert set(KERNELS) == {"adam", "sgd", "relu_backward", "gelu_tanh_backward",
                            "sigmoid_backward", "tanh_backward", "lstm_cell_forward",
                            "lstm_cell_backward", "gru_cell_forward", "gru_cell_backward",
                            "softmax_cross_entropy"}
    for name, (gen, cup) in KERNELS.items():
        assert callable(gen) and callable(cup), name
    assert set(kernels.CUPY_ONLY) == {"im2col", "col2im"}  # reference: rddtensor.layers.im2col


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match=r"unknown kernel 'adamw'; known kernels: \['adam'"):
        kernel_or_generic("adamw")
    with pytest.raises(ValueError, match=r"unknown kernel"):
        generic("nope")


def test_cupy_kernel_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels, "cupy_module", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install rddtensor\[gpu\]"):
        kernels.cupy_kernel("adam")


def test_docstring_examples():
    assert doctest.testmod(kernels).failed == 0


_CUPY_IMPORT = re.compile(r"^\s*(import\s+([\w.]+\s*,\s*)*cupy\b|from\s+cupy\b)"
                          r"|__import__\(\s*['\"]cupy|import_module\(\s*['\"]cupy", re.M)


def test_only_backend_imports_cupy():
    offenders = []
    for tree in ("rddtensor", "layers", "optim"):
        for folder, _, files in os.walk(os.path.join(ROOT, tree)):
            for name in files:
                path = os.path.join(folder, name)
                if not name.endswith(".py") or path == os.path.join(ROOT, "rddtensor", "backend.py"):
                    continue
                with open(path, encoding="utf-8") as fh:
                    if _CUPY_IMPORT.search(fh.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == [], f"only rddtensor/backend.py may import cupy; found in {offenders}"
    assert _CUPY_IMPORT.search("    import cupy as _cupy")  # the pattern does catch imports
    assert _CUPY_IMPORT.search("import numpy, cupy") and _CUPY_IMPORT.search("from cupy import x")
    assert not _CUPY_IMPORT.search("from rddtensor.backend import cupy_module")


# --- CuPy kernels against the generic path (GPU only) ---------------------------------------------
def _tol(dtype):
    return {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_gpu_adam_kernel(cp, case, dtype):
    grads = [np.random.default_rng(s).standard_normal(1000).astype(dtype) for s in range(3)]
    names = ("w", "m", "v", "vmax")
    ref = run_adam(kernels.adam_generic, _state(1000, dtype, 1, names), grads, case)
    state = {k: cp.asarray(a) for k, a in _state(1000, dtype, 1, names).items()}
    got = run_adam(kernel_or_generic("adam"), state, [cp.asarray(g) for g in grads], case, cp)
    for k in names:
        np.testing.assert_allclose(cp.asnumpy(got[k]), ref[k], **_tol(dtype), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_gpu_sgd_kernel(cp, case, dtype):
    grads = [np.random.default_rng(s).standard_normal(1000).astype(dtype) for s in range(3)]
    ref = run_sgd(kernels.sgd_generic, _state(1000, dtype, 2, ("w", "buf")), grads, case)
    state = {k: cp.asarray(a) for k, a in _state(1000, dtype, 2, ("w", "buf")).items()}
    got = run_sgd(kernel_or_generic("sgd"), state, [cp.asarray(g) for g in grads], case, cp)
    for k in ("w", "buf"):
        np.testing.assert_allclose(cp.asnumpy(got[k]), ref[k], **_tol(dtype), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(ACTIVATION_KERNELS))
def test_gpu_activation_backward_kernels(cp, name, dtype):
    act, kw, arg = ACTIVATION_KERNELS[name]
    X, dY = _activation_inputs(dtype)
    Y, _ = activation_forward(act, X, **kw)
    A = Y if arg == "Y" else X
    got = kernels.cupy_kernel(name)(cp.asarray(dY), cp.asarray(A))
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    np.testing.assert_allclose(cp.asnumpy(got), generic(name)(dY, A), **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_lstm_cell_kernels(cp, dtype):
    gates, c_prev = _lstm_inputs(batch=7, H=33, seed=5, dtype=dtype)
    rng = np.random.default_rng(6)
    dh, dc = (rng.standard_normal(c_prev.shape).astype(dtype) for _ in range(2))
    ref = kernels.lstm_cell_forward_generic(gates, c_prev)
    got = kernel_or_generic("lstm_cell_forward")(cp.asarray(gates), cp.asarray(c_prev))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))
    h, c, act = ref
    for dc_in in (dc, None):
        ref_b = kernels.lstm_cell_backward_generic(dh, dc_in, act, c_prev, c)
        got_b = kernel_or_generic("lstm_cell_backward")(
            cp.asarray(dh), None if dc_in is None else cp.asarray(dc_in), cp.asarray(act),
            cp.asarray(c_prev), cp.asarray(c))
        for a, b in zip(got_b, ref_b):
            np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 5, 300])  # fewer classes than threads, and several per thread
def test_gpu_softmax_cross_entropy_kernel(cp, C, dtype):
    rng = np.random.default_rng(7)
    Y = (4.0 * rng.standard_normal((9, C))).astype(dtype)
    labels = rng.integers(0, C, 9)
    ref = kernels.softmax_cross_entropy_generic(Y, labels, 16)
    got = kernel_or_generic("softmax_cross_entropy")(cp.asarray(Y), cp.asarray(labels), 16)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))
    empty = kernels.cupy_kernel("softmax_cross_entropy")(cp.zeros((0, C), dtype),
                                                          cp.zeros(0, np.int64), 1)
    assert empty[0].shape == (0,) and empty[1].shape == (0, C)


@pytest.mark.gpu
def test_gpu_dispatch_and_mixed_inputs(cp):
    Y = cp.asarray(np.array([0.5, -1.0], np.float16))  # no kernel for float16: generic on CuPy
    out = kernel_or_generic("relu_backward")(cp.ones(2, np.float16), Y)
    assert isinstance(out, cp.ndarray) and out.dtype == np.float16
    with pytest.raises(TypeError, match=r"rddtensor.backend.asarray\(Y, xp=cupy_module\(\)\)"):
        kernel_or_generic("relu_backward")(cp.ones(2, np.float32), np.ones(2, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_gru_cell_kernels(cp, dtype):
    gi, gh, h_prev = _gru_inputs(batch=7, H=33, seed=11, dtype=dtype)
    dh = np.random.default_rng(12).standard_normal(h_prev.shape).astype(dtype)
    ref = kernels.gru_cell_forward_generic(gi, gh, h_prev)
    got = kernel_or_generic("gru_cell_forward")(*(cp.asarray(a) for a in (gi, gh, h_prev)))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))
    act = ref[1]
    ref_b = kernels.gru_cell_backward_generic(dh, act, gh, h_prev)
    got_b = kernel_or_generic("gru_cell_backward")(*(cp.asarray(a) for a in (dh, act, gh, h_prev)))
    for a, b in zip(got_b, ref_b):
        np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
def test_gpu_im2col_col2im_kernels(cp, geometry, dtype):
    x_shape, kernel, strides, dilation, pads = CONV_GEOMETRIES[geometry]
    rng = np.random.default_rng(geometry)
    X = rng.standard_normal(x_shape).astype(dtype)
    from rddtensor.layers.im2col import col2im_strided, im2col_strided
    ref, out = im2col_strided(X, kernel, strides, dilation, pads)
    got = kernels.cupy_kernel("im2col")(cp.asarray(X), kernel, strides, dilation, pads, out)
    np.testing.assert_array_equal(cp.asnumpy(got), ref)  # a gather: exact
    C = rng.standard_normal(ref.shape).astype(dtype)
    ref_dX = col2im_strided(C, x_shape, kernel, strides, dilation, pads, out)
    got_dX = kernels.cupy_kernel("col2im")(cp.asarray(C), x_shape, kernel, strides, dilation,
                                           pads, out)
    # the same additions in the same order as the slice-adds (equal up to rounding at most)
    np.testing.assert_allclose(cp.asnumpy(got_dX), ref_dX, **_tol(dtype))


@pytest.mark.gpu
def test_gpu_conv_layers_take_the_kernels(cp, monkeypatch):
    from rddtensor.layers.im2col import col2im, im2col, matmul_col2im
    x_shape, kernel, strides, dilation, pads = CONV_GEOMETRIES[1]
    X = cp.asarray(np.random.default_rng(0).standard_normal(x_shape).astype(np.float32))
    calls = []
    real = kernels.cupy_kernel
    monkeypatch.setattr("rddtensor.layers.im2col.cupy_kernel", lambda n: calls.append(n) or real(n))
    cols, out = im2col(X, kernel, strides, dilation, pads)
    col2im(cols, x_shape, kernel, strides, dilation, pads, out)
    A = cp.ones((1, x_shape[1] * 6, 2), np.float32)
    B = cp.ones((1, 2, x_shape[0] * out[0] * out[1]), np.float32)
    matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out)
    assert calls == ["im2col", "col2im", "col2im"]
