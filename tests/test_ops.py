"""The device switch: ``get_ops`` / ``ops_for``, ``NumpyOps`` (the reference) and ``CupyOps``.

The NumPy references are the library's own code, checked against PyTorch by the layer,
optimizer and loss tests; here: the switch picks them for NumPy and builds nothing of CuPy's,
every ``CupyOps`` override keeps its reference's signature and falls back to it where its
kernel does not apply, and CuPy without cupy names the ``gpu`` extra. The ``gpu`` tests compare
``CUPY_OPS.m`` on CuPy arrays with ``NUMPY_OPS.m`` on NumPy arrays; without cupy or a visible
GPU they skip.
"""
from __future__ import annotations

import doctest
import inspect
import os
import re

import numpy as np
import pytest

import rddtensor.backend as backend
from rddtensor.ops import cupy_ops as cupy_ops_module
from rddtensor.ops import numpy_ops as ops_module
import rddtensor.ops as ops_pkg
from rddtensor.ops import NUMPY_OPS, CupyOps, NumpyOps, get_ops, ops_for
from rddtensor.layers.activations import _sigmoid_pair, activation_forward
from rddtensor.layers.im2col import col2im, im2col, matmul_col2im

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the methods CupyOps runs kernels (or CuPy's own functions) for
OVERRIDDEN = {"sgd_update", "adam_update", "relu_backward", "sigmoid_backward", "tanh_backward",
              "gelu_tanh_backward", "normal_cdf", "sparse_softmax_cross_entropy", "im2col",
              "col2im", "matmul_col2im", "cached_constants", "_as_strided"}


# --- inputs ---------------------------------------------------------------------------------------
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

SGD_CASES = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "plain_wd": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    "dampening_wd": dict(momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.02),
}


def run_adam(ops, state, grads, case):
    kw = dict(ADAM_CASES[case])
    amsgrad = kw.pop("amsgrad")
    for step, g in enumerate(grads, start=1):
        extra = {"amsgrad_vmax": state["vmax"]} if amsgrad else {}
        ops.adam_update(state["w"], g.copy(), state["m"], state["v"], lr=0.01, beta1=0.9,
                        beta2=0.99, eps=1e-6, step=step, **kw, **extra)
    return state


def run_sgd(ops, state, grads, case):
    kw = SGD_CASES[case]
    buf = state["buf"] if kw["momentum"] else None
    for step, g in enumerate(grads, start=1):
        ops.sgd_update(state["w"], g.copy(), buf, lr=0.1, step=step, **kw)
    return state


X_EDGE = np.array([-40.0, -8.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 40.0])


def _activation_inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([X_EDGE, 3.0 * rng.standard_normal(40)]).astype(dtype).reshape(7, 7)
    return X, rng.standard_normal(X.shape).astype(dtype)


def _gelu_sigmoids(X):
    """``S, S_neg = sigmoid(2u), sigmoid(-2u)`` as the tanh GELU's forward makes them."""
    v = 2.0 * ops_module.SQRT_2_OVER_PI * (X + ops_module.GELU_C * X * X * X)
    return _sigmoid_pair(np, v >= 0, np.exp(-np.abs(v)))


def _backward_args(name, dtype):
    """``(dY, *forward arrays)`` for the activation backward ``name``, all NumPy."""
    X, dY = _activation_inputs(dtype)
    if name == "gelu_tanh_backward":
        return (dY, X, *_gelu_sigmoids(X))
    act = name[:-len("_backward")]
    Y, _ = activation_forward(act, X)
    return dY, Y


ACTIVATION_BACKWARDS = ["relu_backward", "sigmoid_backward", "tanh_backward", "gelu_tanh_backward"]

#: (x_shape, kernel, strides, dilation, pads): odd sizes, strides, dilation, asymmetric padding
CONV_GEOMETRIES = [
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    ((1, 2, 9, 8), (3, 2), (2, 3), (1, 1), ((0, 1), (2, 0))),
    ((3, 1, 10, 9), (2, 3), (1, 2), (2, 1), ((1, 0), (0, 2))),
    ((2, 4, 5, 5), (1, 1), (2, 2), (1, 1), ((0, 0), (0, 0))),
]
#: a 1-D convolution: CupyOps has no kernel for it and runs the reference
CONV_1D = ((2, 3, 11), (3,), (2,), (1,), ((1, 2),))


def _matmul_inputs(geometry, groups, dtype=np.float64, seed=20):
    x_shape, kernel, strides, dilation, pads = geometry
    x_shape = (x_shape[0], 2 * groups, *x_shape[2:])
    rng = np.random.default_rng(seed)
    _, out = im2col(np.zeros(x_shape), kernel, strides, dilation, pads)
    K, NP = int(np.prod(kernel)), x_shape[0] * int(np.prod(out))
    A = rng.standard_normal((groups, x_shape[1] // groups * K, 3)).astype(dtype)
    B = rng.standard_normal((groups, 3, NP)).astype(dtype)
    return A, B, x_shape, out


# --- the switch -----------------------------------------------------------------------------------
def test_numpy_arrays_get_the_numpy_ops_and_build_nothing_of_cupy(monkeypatch):
    monkeypatch.setattr(cupy_ops_module, "_CACHE", {})
    monkeypatch.setattr(ops_pkg, "_CUPY_OPS", [])
    X, dY = _activation_inputs(np.float32)
    assert get_ops(X) is NUMPY_OPS and get_ops(X, dY, 1.0, None) is NUMPY_OPS
    assert get_ops() is NUMPY_OPS and ops_for(np) is NUMPY_OPS
    assert type(NUMPY_OPS) is NumpyOps and NUMPY_OPS.xp is np
    for name in ACTIVATION_BACKWARDS:  # what the layers call on NumPy arrays
        getattr(get_ops(dY), name)(*_backward_args(name, np.float32))
    run_adam(get_ops(X), _state(5, np.float32, 0, ("w", "m", "v", "vmax")),
             [np.ones(5, np.float32)], "adam_amsgrad")
    run_sgd(get_ops(X), _state(5, np.float32, 0, ("w", "buf")), [np.ones(5, np.float32)],
            "nesterov")
    get_ops(X).sparse_softmax_cross_entropy(X, np.arange(7), 0.0)
    cols, out = get_ops(X).im2col(X[None, None], (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    get_ops(cols).col2im(cols, (1, 1, 7, 7), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), out)
    assert cupy_ops_module._CACHE == {}  # no CuPy kernel was created for NumPy inputs
    assert ops_pkg._CUPY_OPS == []  # nor the CuPy ops


def test_the_switch_package_hands_on_only_the_switch():
    assert set(ops_pkg.__all__) == {"get_ops", "ops_for", "NumpyOps", "CupyOps", "NUMPY_OPS"}
    assert ops_pkg.NumpyOps is ops_module.NumpyOps and ops_pkg.CupyOps is cupy_ops_module.CupyOps


def test_ops_for_refuses_other_modules():
    with pytest.raises(ValueError, match="xp must be numpy or cupy"):
        ops_for(re)
    with pytest.raises(ValueError, match="xp must be numpy or cupy"):
        ops_for(None)


def test_every_cupy_override_has_the_reference_signature():
    overrides = {name for name, value in vars(CupyOps).items()
                 if callable(value) and hasattr(NumpyOps, name) and name != "__init__"}
    assert overrides == OVERRIDDEN
    for name in overrides:
        assert inspect.signature(getattr(CupyOps, name)) == \
            inspect.signature(getattr(NumpyOps, name)), name
    public = {n for n, v in vars(NumpyOps).items() if callable(v) and not n.startswith("_")}
    assert OVERRIDDEN - {"_as_strided"} <= public


def test_cupy_ops_without_cupy_names_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(cupy_ops_module, "cupy_module", lambda: None)
    monkeypatch.setattr(ops_pkg, "_CUPY_OPS", [])
    with pytest.raises(RuntimeError, match=r"`gpu` extra \(pip install rddtensor\[gpu\]\)"):
        CupyOps()
    with pytest.raises(RuntimeError, match=r"pip install rddtensor\[gpu\]"):
        ops_pkg.CUPY_OPS  # noqa: B018 (built on first use)
    with pytest.raises(RuntimeError, match=r"pip install rddtensor\[gpu\]"):
        cupy_ops_module._elementwise("adam")
    assert ops_pkg._CUPY_OPS == []


def _cupy_ops_on_numpy():
    """A ``CupyOps`` computing with NumPy: no kernel applies, so every method falls back."""
    ops = CupyOps.__new__(CupyOps)
    NumpyOps.__init__(ops)
    ops.xp = np
    return ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_overrides_fall_back_to_the_reference(dtype, monkeypatch):
    # where no kernel applies (here: NumPy arrays) every override hands all its arguments on
    monkeypatch.setattr(cupy_ops_module, "_elementwise", None)  # a kernel call would fail
    monkeypatch.setattr(cupy_ops_module, "_raw_softmax_xent", None)
    ops = _cupy_ops_on_numpy()
    for case in ADAM_CASES:
        grads = [np.random.default_rng(s).standard_normal(9).astype(dtype) for s in range(3)]
        names = ("w", "m", "v", "vmax")
        got = run_adam(ops, _state(9, dtype, 1, names), grads, case)
        ref = run_adam(NUMPY_OPS, _state(9, dtype, 1, names), grads, case)
        for k in names:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{case} {k}")
    for case in SGD_CASES:
        grads = [np.random.default_rng(s).standard_normal(9).astype(dtype) for s in range(3)]
        got = run_sgd(ops, _state(9, dtype, 2, ("w", "buf")), grads, case)
        ref = run_sgd(NUMPY_OPS, _state(9, dtype, 2, ("w", "buf")), grads, case)
        for k in ("w", "buf"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{case} {k}")
    for name in ACTIVATION_BACKWARDS:
        args = _backward_args(name, dtype)
        np.testing.assert_array_equal(getattr(ops, name)(*args), getattr(NUMPY_OPS, name)(*args))
    Y, labels = _activation_inputs(dtype)[0], np.array([0, 6, 3, 3, 1, 2, 5])
    for s in (0.0, 0.2):
        for a, b in zip(ops.sparse_softmax_cross_entropy(Y, labels, s),
                        NUMPY_OPS.sparse_softmax_cross_entropy(Y, labels, s)):
            np.testing.assert_array_equal(a, b)
    for x_shape, kernel, strides, dilation, pads in (CONV_GEOMETRIES[1], CONV_1D):
        X = np.random.default_rng(0).standard_normal(x_shape).astype(dtype)
        cols, out = ops.im2col(X, kernel, strides, dilation, pads)
        ref_cols, ref_out = NUMPY_OPS.im2col(X, kernel, strides, dilation, pads)
        assert out == ref_out
        np.testing.assert_array_equal(cols, ref_cols)
        np.testing.assert_array_equal(
            ops.col2im(cols, x_shape, kernel, strides, dilation, pads, out),
            NUMPY_OPS.col2im(cols, x_shape, kernel, strides, dilation, pads, out))
    A, B, x_shape, out = _matmul_inputs(CONV_GEOMETRIES[2], 2, dtype)
    geometry = CONV_GEOMETRIES[2][1:]
    np.testing.assert_array_equal(ops.matmul_col2im(A, B, x_shape, *geometry, out),
                                  NUMPY_OPS.matmul_col2im(A, B, x_shape, *geometry, out))


def test_optimizer_step_must_be_one_based():
    with pytest.raises(ValueError, match="step is 1-based"):
        NUMPY_OPS.sgd_update(np.ones(2), np.ones(2), None, lr=0.1, momentum=0.0, dampening=0.0,
                             nesterov=False, weight_decay=0.0, step=0)
    with pytest.raises(ValueError, match="step is 1-based"):
        NUMPY_OPS.adam_update(np.ones(2), np.ones(2), np.ones(2), np.ones(2), lr=0.1, beta1=0.9,
                              beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False,
                              step=True)


def test_numpy_constants_are_made_once():
    made = []
    first = NUMPY_OPS.cached_constants(("test_ops", 1), lambda: made.append(1) or (np.ones(2),))
    assert NUMPY_OPS.cached_constants(("test_ops", 1), lambda: made.append(1)) is first
    assert made == [1]


# --- the NumPy references of the convolution windows --------------------------------------------
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
def test_im2col_col2im_are_adjoint(geometry):
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
    # what CupyOps.matmul_col2im does (one GEMM, then col2im) against one GEMM per offset
    A, B, x_shape, out = _matmul_inputs(CONV_GEOMETRIES[geometry], groups, seed=20 + geometry)
    geo = CONV_GEOMETRIES[geometry][1:]
    np.testing.assert_allclose(matmul_col2im(A, B, x_shape, *geo, out),
                               col2im(A @ B, x_shape, *geo, out), rtol=1e-12, atol=1e-12)


def test_window_view_is_read_only_on_numpy():
    X = np.arange(16.0).reshape(1, 1, 4, 4)
    view = NUMPY_OPS.window_view(X, (2, 2), (2, 2), (1, 1), (2, 2))
    assert view.shape == (1, 1, 2, 2, 2, 2) and not view.flags.writeable
    assert view[0, 0, 1, 1, 1, 1] == X[0, 0, 3, 3]


def test_docstring_examples():
    for module in (ops_module, backend, ops_pkg, cupy_ops_module):
        assert doctest.testmod(module).failed == 0, module.__name__


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


# --- CUPY_OPS on CuPy arrays against NUMPY_OPS on NumPy arrays (GPU only) ------------------------
def _tol(dtype):
    return {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


@pytest.fixture
def gpu_ops(cp):
    ops = ops_for(cp)
    assert type(ops) is CupyOps and ops.xp is cp and ops is ops_pkg.CUPY_OPS
    return ops


def _to_gpu(cp, arrays):
    return {k: cp.asarray(a) for k, a in arrays.items()}


@pytest.mark.gpu
def test_gpu_switch(cp, gpu_ops):
    assert get_ops(cp.zeros(2)) is gpu_ops and get_ops(np.zeros(2), cp.zeros(2)) is gpu_ops
    assert get_ops(np.zeros(2)) is NUMPY_OPS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_gpu_adam_update(cp, gpu_ops, case, dtype):
    grads = [np.random.default_rng(s).standard_normal(1000).astype(dtype) for s in range(3)]
    names = ("w", "m", "v", "vmax")
    ref = run_adam(NUMPY_OPS, _state(1000, dtype, 1, names), grads, case)
    got = run_adam(gpu_ops, _to_gpu(cp, _state(1000, dtype, 1, names)),
                   [cp.asarray(g) for g in grads], case)
    for k in names:
        assert got[k].dtype == dtype
        np.testing.assert_allclose(cp.asnumpy(got[k]), ref[k], **_tol(dtype), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_gpu_sgd_update(cp, gpu_ops, case, dtype):
    grads = [np.random.default_rng(s).standard_normal(1000).astype(dtype) for s in range(3)]
    ref = run_sgd(NUMPY_OPS, _state(1000, dtype, 2, ("w", "buf")), grads, case)
    got = run_sgd(gpu_ops, _to_gpu(cp, _state(1000, dtype, 2, ("w", "buf"))),
                  [cp.asarray(g) for g in grads], case)
    for k in ("w", "buf"):
        np.testing.assert_allclose(cp.asnumpy(got[k]), ref[k], **_tol(dtype), err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATION_BACKWARDS)
def test_gpu_activation_backward(cp, gpu_ops, name, dtype):
    args = _backward_args(name, dtype)
    got = getattr(gpu_ops, name)(*(cp.asarray(a) for a in args))
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    np.testing.assert_allclose(cp.asnumpy(got), getattr(NUMPY_OPS, name)(*args), **_tol(dtype))


@pytest.mark.gpu
def test_gpu_fallbacks_and_mixed_inputs(cp, gpu_ops):
    Y = np.array([0.5, -1.0, 0.0], np.float16)  # no kernel for float16: the reference on CuPy
    out = gpu_ops.relu_backward(cp.ones(3, np.float16), cp.asarray(Y))
    assert isinstance(out, cp.ndarray) and out.dtype == np.float16
    np.testing.assert_array_equal(cp.asnumpy(out), NUMPY_OPS.relu_backward(np.ones(3, np.float16), Y))
    with pytest.raises(TypeError, match=r"rddtensor.backend.asarray\(Y, xp=cupy_module\(\)\)"):
        gpu_ops.relu_backward(cp.ones(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"asarray\(m, xp=cupy_module\(\)\)"):
        gpu_ops.adam_update(cp.ones(2), cp.ones(2), np.zeros(2), cp.zeros(2), lr=0.1, beta1=0.9,
                            beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False, step=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_normal_cdf(cp, gpu_ops, dtype):
    X = np.linspace(-8, 8, 2001).astype(dtype)
    got = gpu_ops.normal_cdf(cp.asarray(X))
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    tol = {"rtol": 1e-9, "atol": 0} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-30}
    np.testing.assert_allclose(cp.asnumpy(got), NUMPY_OPS.normal_cdf(X), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 5, 300])  # fewer classes than threads, and several per thread
def test_gpu_sparse_softmax_cross_entropy(cp, gpu_ops, C, dtype):
    rng = np.random.default_rng(7)
    Y = (4.0 * rng.standard_normal((9, C))).astype(dtype)
    labels = rng.integers(0, C, 9)
    for s in (0.0, 0.1):  # label smoothing: the reference on CuPy
        ref = NUMPY_OPS.sparse_softmax_cross_entropy(Y, labels, s)
        got = gpu_ops.sparse_softmax_cross_entropy(cp.asarray(Y), cp.asarray(labels), s)
        for a, b in zip(got, ref):
            assert isinstance(a, cp.ndarray) and a.dtype == dtype
            np.testing.assert_allclose(cp.asnumpy(a), b, **_tol(dtype))
    losses, dY = gpu_ops.sparse_softmax_cross_entropy(cp.zeros((0, C), dtype),
                                                      cp.zeros(0, np.int64))
    assert losses.shape == (0,) and dY.shape == (0, C)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES) + 1))
def test_gpu_im2col_col2im(cp, gpu_ops, geometry, dtype):
    x_shape, kernel, strides, dilation, pads = ([*CONV_GEOMETRIES, CONV_1D])[geometry]
    rng = np.random.default_rng(geometry)
    X = rng.standard_normal(x_shape).astype(dtype)
    ref, out = NUMPY_OPS.im2col(X, kernel, strides, dilation, pads)
    got, got_out = gpu_ops.im2col(cp.asarray(X), kernel, strides, dilation, pads)
    assert got_out == out
    np.testing.assert_array_equal(cp.asnumpy(got), ref)  # a gather: exact
    C = rng.standard_normal(ref.shape).astype(dtype)
    ref_dX = NUMPY_OPS.col2im(C, x_shape, kernel, strides, dilation, pads, out)
    got_dX = gpu_ops.col2im(cp.asarray(C), x_shape, kernel, strides, dilation, pads, out)
    # the same additions in the same order as the slice-adds (equal up to rounding at most)
    np.testing.assert_allclose(cp.asnumpy(got_dX), ref_dX, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("geometry", [*CONV_GEOMETRIES[:2], CONV_1D])
def test_gpu_matmul_col2im(cp, gpu_ops, geometry):
    A, B, x_shape, out = _matmul_inputs(geometry, 2, np.float32)
    geo = geometry[1:]
    ref = NUMPY_OPS.matmul_col2im(A, B, x_shape, *geo, out)
    got = gpu_ops.matmul_col2im(cp.asarray(A), cp.asarray(B), x_shape, *geo, out)
    np.testing.assert_allclose(cp.asnumpy(got), ref, **_tol(np.float32))


@pytest.mark.gpu
def test_gpu_conv_layers_take_the_kernels(cp, gpu_ops, monkeypatch):
    x_shape, kernel, strides, dilation, pads = CONV_GEOMETRIES[1]
    X = cp.asarray(np.random.default_rng(0).standard_normal(x_shape).astype(np.float32))
    calls = []
    real = cupy_ops_module._elementwise
    monkeypatch.setattr(cupy_ops_module, "_elementwise", lambda n: calls.append(n) or real(n))
    cols, out = im2col(X, kernel, strides, dilation, pads)
    col2im(cols, x_shape, kernel, strides, dilation, pads, out)
    A = cp.ones((1, x_shape[1] * 6, 2), np.float32)
    B = cp.ones((1, 2, x_shape[0] * out[0] * out[1]), np.float32)
    matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out)
    assert calls == ["im2col", "col2im", "col2im"]
    view = gpu_ops.window_view(X, kernel, strides, dilation, out)
    np.testing.assert_array_equal(cp.asnumpy(view),
                                  NUMPY_OPS.window_view(cp.asnumpy(X), kernel, strides, dilation,
                                                        out))
