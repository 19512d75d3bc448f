"""``CupyOps``: the hot methods of ``NumpyOps`` as fused CuPy kernels (see ``rddtensor.ops.numpy_ops``).

Each override runs one ``ElementwiseKernel`` / ``RawKernel`` pass that does the reference's
arithmetic, for float32/float64 CuPy arrays, and calls ``super()`` (the reference, on CuPy)
for anything else. Kernels are created on first use and cached; CuPy compiles and caches each
one per dtype and device on its first call. This module never imports cupy: the module comes
from ``rddtensor.backend.cupy_module()``, so importing it without cupy is fine and only
``CupyOps()`` fails, naming the ``gpu`` extra.

=========================  ===================================================================
method                     kernel
=========================  ===================================================================
``adam_update``            ``adam`` / ``adam_amsgrad``: moments, bias corrections, AMSGrad
``sgd_update``             ``sgd_momentum`` / ``sgd_plain``: momentum, dampening, Nesterov, L2
``relu_backward``          ``relu_backward``: ``dX = dY * (Y > 0)``
``sigmoid_backward``       ``sigmoid_backward``: ``dX = dY * Y * (1 - Y)``
``tanh_backward``          ``tanh_backward``: ``dX = dY * (1 - Y^2)``
``gelu_tanh_backward``     ``gelu_tanh_backward``: ``dX`` of the tanh GELU, from ``X`` alone
``normal_cdf``             ``cupyx.scipy.special.ndtr`` (no kernel of ours)
``sparse_softmax_cross_``  ``rdd_softmax_xent_<type>`` (``RawKernel``): one block per row,
``entropy``                without label smoothing
``im2col``                 ``im2col``: 2-D windows -> columns ``(C, kh, kw, N, oh, ow)``
``col2im``                 ``col2im``: each input pixel gathers its columns (no atomics)
``matmul_col2im``          one GEMM, then ``col2im`` (a GPU has the memory for the product)
=========================  ===================================================================

The kernels agree with the references to float rounding (``tests/test_ops.py``, on a GPU);
``tests/test_kernel_sources.py`` compiles every source with NVRTC.
"""
from __future__ import annotations

import threading

import numpy as np

from rddtensor.backend import cupy_module, cupy_special, is_cupy_array
from rddtensor.ops.numpy_ops import (GELU_C, SQRT_2_OVER_PI, NumpyOps, check_step,
                                   conv_output_shape, normal_cdf_chebyshev)

__all__ = ["CupyOps"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# name -> (in_params, out_params, operation); every one is an ElementwiseKernel over T
_ELEMENTWISE = {
    "adam": (
        "T g, T l2, T decay, T beta1c, T beta2, T beta2c, T sqrt_bc2, T eps, T step_size",
        "T w, T m, T v",
        """
        T gi = g;
        if (l2 != (T)0) gi = gi + w * l2;
        w = w * decay;
        v = v * beta2 + gi * beta2c * gi;
        m = m + (gi - m) * beta1c;
        w = w + m / (sqrt(v) / sqrt_bc2 + eps) * step_size;
        """),
    "adam_amsgrad": (
        "T g, T l2, T decay, T beta1c, T beta2, T beta2c, T sqrt_bc2, T eps, T step_size",
        "T w, T m, T v, T vmax",
        """
        T gi = g;
        if (l2 != (T)0) gi = gi + w * l2;
        w = w * decay;
        v = v * beta2 + gi * beta2c * gi;
        m = m + (gi - m) * beta1c;
        if (v > vmax || v != v) vmax = v;
        w = w + m / (sqrt(vmax) / sqrt_bc2 + eps) * step_size;
        """),
    "sgd_momentum": (
        "T g, T wd, T momentum, T damp_c, T neg_lr, int32 first, int32 nesterov",
        "T w, T buf",
        """
        T gi = g;
        if (wd != (T)0) gi = gi + w * wd;
        buf = first ? gi : buf * momentum + gi * damp_c;
        T d = nesterov ? gi + buf * momentum : buf;
        w = w + d * neg_lr;
        """),
    "sgd_plain": (
        "T g, T wd, T neg_lr",
        "T w",
        """
        T gi = g;
        if (wd != (T)0) gi = gi + w * wd;
        w = w + gi * neg_lr;
        """),
    "relu_backward": ("T dY, T Y", "T dX", "dX = Y > (T)0 ? dY : (T)0;"),
    "sigmoid_backward": ("T dY, T Y", "T dX", "dX = dY * Y * ((T)1 - Y);"),
    "tanh_backward": ("T dY, T Y", "T dX", "dX = dY * ((T)1 - Y * Y);"),
    "gelu_tanh_backward": (
        "T dY, T X, T k, T c, T k3c",
        "T dX",
        """
        T x = X;
        T v = k * (x + c * x * x * x);
        T e = exp(-fabs(v));
        T lo = e / ((T)1 + e);
        T hi = (T)1 / ((T)1 + e);
        T S = v >= (T)0 ? hi : lo;
        T Sn = v >= (T)0 ? lo : hi;
        T dv = k * ((T)1 + k3c * x * x);
        dX = dY * (S + x * S * Sn * dv);
        """),
    # one thread per column entry (c, kh, kw, n, oh, ow): a gather, zero outside the input
    "im2col": (
        "raw T X, int32 N, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 OH, int32 OW, "
        "int32 SH, int32 SW, int32 DH, int32 DW, int32 PH, int32 PW",
        "T cols",
        """
        ptrdiff_t t = i;
        const int ow = t % OW; t /= OW;
        const int oh = t % OH; t /= OH;
        const int n = t % N; t /= N;
        const int kw = t % KW; t /= KW;
        const int kh = t % KH;
        const int c = t / KH;
        const int y = oh * SH + kh * DH - PH;
        const int x = ow * SW + kw * DW - PW;
        cols = (y >= 0 && y < H && x >= 0 && x < W)
            ? X[((ptrdiff_t)n * C + c) * H * W + (ptrdiff_t)y * W + x] : (T)0;
        """),
    # one thread per input pixel (n, c, y, x): it sums the columns that read it, in im2col's
    # kernel-offset order (the order col2im's slice-adds use), so no atomics are needed
    "col2im": (
        "raw T cols, int32 N, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 OH, int32 OW, "
        "int32 SH, int32 SW, int32 DH, int32 DW, int32 PH, int32 PW",
        "T dX",
        """
        ptrdiff_t t = i;
        const int x = t % W; t /= W;
        const int y = t % H; t /= H;
        const int c = t % C;
        const int n = t / C;
        T acc = (T)0;
        for (int kh = 0; kh < KH; ++kh) {
            const int ty = y + PH - kh * DH;
            if (ty < 0 || ty % SH != 0 || ty / SH >= OH) continue;
            const int oh = ty / SH;
            for (int kw = 0; kw < KW; ++kw) {
                const int tx = x + PW - kw * DW;
                if (tx < 0 || tx % SW != 0 || tx / SW >= OW) continue;
                const int ow = tx / SW;
                acc += cols[((((ptrdiff_t)c * KH + kh) * KW + kw) * N + n) * OH * OW
                            + (ptrdiff_t)oh * OW + ow];
            }
        }
        dX = acc;
        """),
}

_SOFTMAX_XENT_BLOCK = 128
_SOFTMAX_XENT_SOURCE = r"""
extern "C" __global__ void rdd_softmax_xent_TYPE(
        const TYPE* __restrict__ Y, const long long* __restrict__ labels,
        TYPE* __restrict__ loss, TYPE* __restrict__ dY, const int C, const TYPE n_total) {
    // one block per row: max, then sum of exp, both reduced in shared memory
    __shared__ TYPE red[BLOCK];
    const int tid = threadIdx.x;
    const TYPE* x = Y + (long long)blockIdx.x * C;
    TYPE* d = dY + (long long)blockIdx.x * C;
    TYPE mx = x[0];
    for (int j = tid; j < C; j += BLOCK) mx = x[j] > mx ? x[j] : mx;
    red[tid] = mx;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s && red[tid + s] > red[tid]) red[tid] = red[tid + s];
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    TYPE sum = 0;
    for (int j = tid; j < C; j += BLOCK) sum += exp(x[j] - mx);
    red[tid] = sum;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    const TYPE lse = log(red[0]);  // log-sum-exp of x - mx
    const long long label = labels[blockIdx.x];
    for (int j = tid; j < C; j += BLOCK) {
        const TYPE p = exp((x[j] - mx) - lse);
        d[j] = (p - (j == label ? (TYPE)1 : (TYPE)0)) / n_total;
    }
    if (tid == 0) {
        // an invalid label gives NaN rather than reading out of bounds
        loss[blockIdx.x] = (label >= 0 && label < C) ? lse - (x[label] - mx) : sqrt((TYPE)-1);
    }
}
"""

_CACHE: dict = {}
_LOCK = threading.Lock()


def _cupy():
    cp = cupy_module()
    if cp is None:
        raise RuntimeError("CupyOps needs cupy and a CUDA GPU; install the `gpu` extra "
                           "(pip install rddtensor[gpu]), or compute on NumPy arrays")
    return cp


def _elementwise(name):
    """The ``ElementwiseKernel`` ``name``, created on first use and cached."""
    kernel = _CACHE.get(name)
    if kernel is None:
        cp = _cupy()
        with _LOCK:
            kernel = _CACHE.get(name)
            if kernel is None:
                in_params, out_params, operation = _ELEMENTWISE[name]
                kernel = cp.ElementwiseKernel(in_params, out_params, operation,
                                              f"rddtensor_{name}")
                _CACHE[name] = kernel
    return kernel


def _raw_softmax_xent(dtype):
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    key = ("softmax_cross_entropy", ctype)
    kernel = _CACHE.get(key)
    if kernel is None:
        cp = _cupy()
        with _LOCK:
            kernel = _CACHE.get(key)
            if kernel is None:
                source = (_SOFTMAX_XENT_SOURCE.replace("TYPE", ctype)
                          .replace("BLOCK", str(_SOFTMAX_XENT_BLOCK)))
                kernel = cp.RawKernel(source, f"rdd_softmax_xent_{ctype}")
                _CACHE[key] = kernel
    return kernel


def _kernel_applies(first) -> bool:
    """The kernels take float32/float64 CuPy arrays; anything else runs the reference."""
    return is_cupy_array(first) and first.dtype in _FLOATS


def _require_cupy(**arrays):
    for what, a in arrays.items():
        if a is not None and not is_cupy_array(a):
            raise TypeError(f"{what} is a {type(a).__module__}.{type(a).__name__} but the other "
                            f"inputs are CuPy arrays; move it to the GPU with "
                            f"rddtensor.backend.asarray({what}, xp=cupy_module())")


def _conv_geometry(x_shape, kernel, strides, dilation, pads, out):
    N, C, H, W = x_shape
    return tuple(np.int32(v) for v in (N, C, H, W, *kernel, *out, *strides, *dilation,
                                       pads[0][0], pads[1][0]))


class CupyOps(NumpyOps):
    """``NumpyOps`` on CuPy, with fused kernels for the hot methods (see the module doc).

    Raises ``RuntimeError`` on construction without cupy. Use the singleton that
    ``rddtensor.ops.get_ops`` returns for CuPy arrays.
    """

    name = "cupy"
    use_winograd = False

    def __init__(self):
        super().__init__()
        self.xp = _cupy()

    def cached_constants(self, key, build):
        """``build()`` on every call: device arrays belong to the device current when made."""
        return build()

    def _as_strided(self, X, shape, strides):
        return self.xp.lib.stride_tricks.as_strided(X, shape, strides)  # no writeable flag

    # --- optimizer steps ----------------------------------------------------------------------
    def sgd_update(self, w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay,
                   step) -> None:
        if not _kernel_applies(w):
            return super().sgd_update(w, g, buf, lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, step=step)
        _require_cupy(g=g, buf=buf)
        step, t = check_step(step), w.dtype.type
        if float(momentum) == 0:
            _elementwise("sgd_plain")(g, t(weight_decay), t(-float(lr)), w)
            return
        _elementwise("sgd_momentum")(g, t(weight_decay), t(momentum), t(1.0 - float(dampening)),
                                     t(-float(lr)), np.int32(step == 1), np.int32(bool(nesterov)),
                                     w, buf)

    def adam_update(self, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                    amsgrad_vmax=None) -> None:
        if not _kernel_applies(w):
            return super().adam_update(w, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, decoupled=decoupled, step=step,
                                       amsgrad_vmax=amsgrad_vmax)
        _require_cupy(g=g, m=m, v=v, amsgrad_vmax=amsgrad_vmax)
        step, lr, weight_decay = check_step(step), float(lr), float(weight_decay)
        t = w.dtype.type
        l2, decay = (0.0, 1.0 - lr * weight_decay) if decoupled else (weight_decay, 1.0)
        scalars = (t(l2), t(decay), t(1.0 - float(beta1)), t(beta2), t(1.0 - float(beta2)),
                   t((1.0 - float(beta2) ** step) ** 0.5), t(eps),
                   t(-(lr / (1.0 - float(beta1) ** step))))
        if amsgrad_vmax is None:
            _elementwise("adam")(g, *scalars, w, m, v)
        else:
            _elementwise("adam_amsgrad")(g, *scalars, w, m, v, amsgrad_vmax)

    # --- activation backprops -----------------------------------------------------------------
    def _unary_backward(self, name, dY, Y):
        _require_cupy(Y=Y)
        return _elementwise(name)(dY, Y)

    def relu_backward(self, dY, Y):
        if not _kernel_applies(dY):
            return super().relu_backward(dY, Y)
        return self._unary_backward("relu_backward", dY, Y)

    def sigmoid_backward(self, dY, Y):
        if not _kernel_applies(dY):
            return super().sigmoid_backward(dY, Y)
        return self._unary_backward("sigmoid_backward", dY, Y)

    def tanh_backward(self, dY, Y):
        if not _kernel_applies(dY):
            return super().tanh_backward(dY, Y)
        return self._unary_backward("tanh_backward", dY, Y)

    def gelu_tanh_backward(self, dY, X, S, S_neg):
        if not _kernel_applies(dY):
            return super().gelu_tanh_backward(dY, X, S, S_neg)
        _require_cupy(X=X)  # the kernel recomputes the sigmoids from X: S, S_neg go unused
        t = X.dtype.type
        return _elementwise("gelu_tanh_backward")(dY, X, t(2.0 * SQRT_2_OVER_PI), t(GELU_C),
                                                  t(3.0 * GELU_C))

    def normal_cdf(self, X):
        ndtr = cupy_special("ndtr")  # CuPy's own: float64-accurate, as SciPy's
        if ndtr is not None and is_cupy_array(X):
            return ndtr(X)
        return normal_cdf_chebyshev(self.xp, X)  # CuPy has no erf in its main namespace

    # --- losses -------------------------------------------------------------------------------
    def sparse_softmax_cross_entropy(self, Y, labels, label_smoothing=0.0):
        if label_smoothing != 0 or not _kernel_applies(Y):
            return super().sparse_softmax_cross_entropy(Y, labels, label_smoothing)
        cp = self.xp
        Y = cp.ascontiguousarray(Y)
        batch, C = Y.shape
        labels = cp.ascontiguousarray(cp.asarray(labels).reshape(-1), dtype=cp.int64)
        losses = cp.empty(batch, Y.dtype)
        dY = cp.empty_like(Y)
        if batch and C:
            _raw_softmax_xent(Y.dtype)((batch,), (_SOFTMAX_XENT_BLOCK,),
                                       (Y, labels, losses, dY, np.int32(C), Y.dtype.type(1)))
        return losses, dY

    # --- convolution windows ------------------------------------------------------------------
    def im2col(self, X, kernel, strides, dilation, pads):
        if len(kernel) != 2 or not _kernel_applies(X):
            return super().im2col(X, kernel, strides, dilation, pads)
        cp = self.xp
        out = conv_output_shape(X.shape, kernel, strides, dilation, pads)
        X = cp.ascontiguousarray(X)
        geometry = _conv_geometry(X.shape, kernel, strides, dilation, pads, out)
        cols = cp.empty((X.shape[1], *kernel, X.shape[0], *out), X.dtype)
        if cols.size:
            _elementwise("im2col")(X, *geometry, cols)
        return cols, out

    def col2im(self, cols, x_shape, kernel, strides, dilation, pads, out):
        if len(kernel) != 2 or not _kernel_applies(cols):
            return super().col2im(cols, x_shape, kernel, strides, dilation, pads, out)
        cp = self.xp
        cols = cp.ascontiguousarray(cols)
        geometry = _conv_geometry(x_shape, kernel, strides, dilation, pads, out)
        dX = cp.empty(tuple(x_shape), cols.dtype)
        if dX.size:
            _elementwise("col2im")(cols, *geometry, dX)
        return dX

    def matmul_col2im(self, A, B, x_shape, kernel, strides, dilation, pads, out):
        if len(kernel) != 2 or not _kernel_applies(A) or A.dtype != B.dtype:
            return super().matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out)
        # a GPU has the memory for the K-times larger product: one GEMM, one gather kernel
        return self.col2im(self.xp.matmul(A, B), x_shape, kernel, strides, dilation, pads, out)
