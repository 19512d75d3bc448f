"""Fused CuPy kernels for hot paths, each next to its generic NumPy/CuPy reference.

Every entry of ``KERNELS`` has two implementations with one signature: a generic one written
with ``xp = get_array_module(...)`` (the reference, and what runs on NumPy), and a CuPy one that
does the same arithmetic in one fused pass (``ElementwiseKernel`` / ``RawKernel``). CuPy kernels
come only from ``rddtensor.backend.cupy_module()`` (this module never imports cupy), are created
on first use and cached; CuPy compiles and caches each one per dtype and device on first call.
``kernel_or_generic(name)`` returns a function that runs the CuPy kernel for float32/float64
CuPy inputs and the generic implementation for anything else.

=========================  ===================================================================
name                       what
=========================  ===================================================================
``adam``                   Adam/AdamW step (moments, bias corrections, AMSGrad) in place
``sgd``                    SGD step with momentum/dampening/Nesterov/L2 in place
``relu_backward``          ``dX = dY * (Y > 0)``
``gelu_tanh_backward``     ``dX`` of the tanh-approximated GELU, from ``X``
``sigmoid_backward``       ``dX = dY * Y * (1 - Y)``
``tanh_backward``          ``dX = dY * (1 - Y^2)``
``lstm_cell_forward``      LSTM pointwise part: gate pre-activations, ``c_prev`` -> ``h, c``
``lstm_cell_backward``     its backward: ``dh, dc`` -> ``dgates, dc_prev``
``gru_cell_forward``       GRU pointwise part: ``gi, gh, h_prev`` -> ``h``, activated gates
``gru_cell_backward``      its backward: ``dh`` -> ``dgi, dgh`` and the direct part of ``dh_prev``
``softmax_cross_entropy``  per-row softmax cross-entropy and its gradient from logits
``im2col``                 2-D convolution windows -> columns ``(C, kh, kw, N, oh, ow)``
``col2im``                 its adjoint: each input pixel gathers its columns (no atomics)
=========================  ===================================================================

The generic optimizer and activation references do the same operations in the same order as
``rddtensor.optim.optimizers`` and ``rddtensor.layers.activations``, so on NumPy they give bit-identical results
(tested); the CuPy kernels agree with them to float rounding (tested where a GPU is present).

Example:
    >>> import numpy as np
    >>> relu_backward = kernel_or_generic("relu_backward")
    >>> relu_backward(np.ones(3), np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 1.])
"""
from __future__ import annotations

import math
import threading

import numpy as np

from rddtensor.backend import cupy_module, get_array_module, is_cupy_array

__all__ = ["KERNELS", "kernel_or_generic", "generic", "cupy_kernel", "adam_generic",
           "sgd_generic", "relu_backward_generic", "gelu_tanh_backward_generic",
           "sigmoid_backward_generic", "tanh_backward_generic", "lstm_cell_forward_generic",
           "lstm_cell_backward_generic", "gru_cell_forward_generic", "gru_cell_backward_generic",
           "softmax_cross_entropy_generic", "CUPY_ONLY"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step is 1-based and must be an integer >= 1, got {step!r}")
    return int(step)


def _sigmoid_pair(xp, nonneg, e):
    # (sigmoid(v), sigmoid(-v)) from v >= 0 and e = exp(-|v|), as layers.activations: the
    # numerator max(e, v >= 0) picks 1 or e without where(), which branches per element
    d = 1.0 + e
    return xp.maximum(e, nonneg) / d, xp.maximum(e, ~nonneg) / d


def _sigmoid(xp, X):
    e = xp.exp(-xp.abs(X))  # in (0, 1]: never overflows
    return _sigmoid_pair(xp, X >= 0, e)[0]


# --- generic references -------------------------------------------------------------------------
def adam_generic(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                 amsgrad_vmax=None) -> None:
    """Adam (AdamW with ``decoupled=True``) in place, as ``rddtensor.optim.optimizers.adam_update``.

    ``g += wd*w`` (Adam) or ``w *= 1 - lr*wd`` (AdamW); ``m = b1*m + (1-b1)*g``,
    ``v = b2*v + (1-b2)*g^2``, ``vmax = max(vmax, v)`` (AMSGrad, used instead of ``v``);
    ``w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``. ``g`` is scratch.
    """
    xp = get_array_module(w)
    step, lr, beta1, beta2 = _check_step(step), float(lr), float(beta1), float(beta2)
    weight_decay = float(weight_decay)
    tmp = xp.empty_like(w)
    if weight_decay != 0:
        if decoupled:
            w *= 1.0 - lr * weight_decay
        else:
            xp.multiply(w, weight_decay, out=tmp)
            g += tmp
    v *= beta2
    xp.multiply(g, 1.0 - beta2, out=tmp)
    tmp *= g
    v += tmp
    xp.subtract(g, m, out=tmp)
    tmp *= 1.0 - beta1
    m += tmp
    second = v
    if amsgrad_vmax is not None:
        xp.maximum(amsgrad_vmax, v, out=amsgrad_vmax)
        second = amsgrad_vmax
    xp.sqrt(second, out=tmp)
    tmp /= (1.0 - beta2 ** step) ** 0.5
    tmp += float(eps)
    xp.divide(m, tmp, out=tmp)
    tmp *= -(lr / (1.0 - beta1 ** step))
    w += tmp


def sgd_generic(w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, step) -> None:
    """SGD in place, as ``rddtensor.optim.optimizers.sgd_update`` (``buf`` is ``None`` without momentum).

    ``g += wd*w``; ``buf = g`` at t=1, else ``buf = momentum*buf + (1-dampening)*g``;
    ``w -= lr * (g + momentum*buf)`` (Nesterov) or ``w -= lr * buf``. ``g`` is scratch.
    """
    xp = get_array_module(w)
    step, lr, momentum = _check_step(step), float(lr), float(momentum)
    dampening, weight_decay = float(dampening), float(weight_decay)
    tmp = xp.empty_like(w) if (weight_decay or dampening or nesterov) else None
    if weight_decay != 0:
        xp.multiply(w, weight_decay, out=tmp)
        g += tmp
    if momentum != 0:
        if step == 1:
            xp.copyto(buf, g)
        else:
            buf *= momentum
            if dampening != 0:
                xp.multiply(g, 1.0 - dampening, out=tmp)
                buf += tmp
            else:
                buf += g
        if nesterov:
            xp.multiply(buf, momentum, out=tmp)
            g += tmp
            g *= -lr
        else:
            xp.multiply(buf, -lr, out=g)
    else:
        g *= -lr
    w += g


def relu_backward_generic(dY, Y):
    """``dX = dY where Y > 0 else 0`` (gradient 0 at 0, as PyTorch)."""
    xp = get_array_module(dY, Y)
    return xp.where(Y > 0, dY, 0)


def gelu_tanh_backward_generic(dY, X):
    """``dX`` of ``Y = 0.5 X (1 + tanh(u))``, ``u = sqrt(2/pi) (X + 0.044715 X^3)``.

    Written with ``sigmoid(2u)`` as ``rddtensor.layers.activations`` does, so float32 tails do not cancel.
    """
    xp = get_array_module(dY, X)
    v = 2.0 * _SQRT_2_OVER_PI * (X + _GELU_C * X * X * X)
    S, S_neg = _sigmoid_pair(xp, v >= 0, xp.exp(-xp.abs(v)))
    dv = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * X * X)
    return dY * (S + X * S * S_neg * dv)


def sigmoid_backward_generic(dY, Y):
    """``dX = dY * Y * (1 - Y)`` from the sigmoid's output ``Y``."""
    return dY * Y * (1.0 - Y)


def tanh_backward_generic(dY, Y):
    """``dX = dY * (1 - Y^2)`` from the tanh's output ``Y``."""
    return dY * (1.0 - Y * Y)


def lstm_cell_forward_generic(gates, c_prev):
    """The pointwise part of an LSTM cell (PyTorch gate order i, f, g, o).

    ``i, f, o = sigmoid(.)``, ``g = tanh(.)`` of the four column blocks of ``gates``;
    ``c = f * c_prev + i * g``; ``h = o * tanh(c)``.

    Args:
        gates: ``(batch, 4H)`` pre-activations ``X @ W_ih.T + b_ih + h_prev @ W_hh.T + b_hh``.
        c_prev: ``(batch, H)`` previous cell state.

    Returns:
        ``(h, c, act)``: ``(batch, H)`` each, and ``act`` ``(batch, 4H)``, the activated gates
        that ``lstm_cell_backward`` needs.
    """
    xp = get_array_module(gates, c_prev)
    H = c_prev.shape[-1]
    act = xp.empty_like(gates)
    act[:, :2 * H] = _sigmoid(xp, gates[:, :2 * H])
    act[:, 2 * H:3 * H] = xp.tanh(gates[:, 2 * H:3 * H])
    act[:, 3 * H:] = _sigmoid(xp, gates[:, 3 * H:])
    i, f, g, o = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    c = f * c_prev + i * g
    h = o * xp.tanh(c)
    return h, c, act


def lstm_cell_backward_generic(dh, dc, act, c_prev, c):
    """Backward of ``lstm_cell_forward``: ``(dgates, dc_prev)``.

    ``dc_total = dc + dh * o * (1 - tanh(c)^2)``; ``di = dc_total * g * i(1-i)``,
    ``df = dc_total * c_prev * f(1-f)``, ``dg = dc_total * i * (1-g^2)``,
    ``do = dh * tanh(c) * o(1-o)``; ``dc_prev = dc_total * f``.

    Args:
        dh: ``(batch, H)`` gradient of ``h``.
        dc: ``(batch, H)`` gradient of ``c`` from the next step, or ``None`` (zero).
        act, c_prev, c: from the forward (``act`` the activated gates).
    """
    xp = get_array_module(dh, act)
    H = c_prev.shape[-1]
    i, f, g, o = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    tc = xp.tanh(c)
    dct = dh * o * (1.0 - tc * tc)
    if dc is not None:
        dct = dc + dct
    dgates = xp.empty_like(act)
    dgates[:, :H] = dct * g * i * (1.0 - i)
    dgates[:, H:2 * H] = dct * c_prev * f * (1.0 - f)
    dgates[:, 2 * H:3 * H] = dct * i * (1.0 - g * g)
    dgates[:, 3 * H:] = dh * tc * o * (1.0 - o)
    return dgates, dct * f


def gru_cell_forward_generic(gi, gh, h_prev):
    """The pointwise part of a GRU cell (PyTorch gate order r, z, n).

    ``r = sigmoid(gi_r + gh_r)``, ``z = sigmoid(gi_z + gh_z)``, ``n = tanh(gi_n + r * gh_n)``,
    ``h = (1 - z) * n + z * h_prev`` (computed as ``n + z * (h_prev - n)``, as ``rddtensor.layers.GRU``).

    Args:
        gi: ``(batch, 3H)`` input projection ``X @ W_ih.T + b_ih``.
        gh: ``(batch, 3H)`` recurrent projection ``h_prev @ W_hh.T + b_hh``.
        h_prev: ``(batch, H)`` previous state.

    Returns:
        ``(h, act)``: ``(batch, H)`` and the activated gates ``r, z, n`` ``(batch, 3H)``.
    """
    xp = get_array_module(gi, gh, h_prev)
    H = h_prev.shape[-1]
    act = xp.empty_like(gi)
    act[:, :2 * H] = _sigmoid(xp, gi[:, :2 * H] + gh[:, :2 * H])
    act[:, 2 * H:] = xp.tanh(gi[:, 2 * H:] + act[:, :H] * gh[:, 2 * H:])
    z, n = act[:, H:2 * H], act[:, 2 * H:]
    return n + z * (h_prev - n), act


def gru_cell_backward_generic(dh, act, gh, h_prev):
    """Backward of ``gru_cell_forward``: ``(dgi, dgh, dh_direct)``.

    ``dn = dh (1 - z)(1 - n^2)``, ``dz = dh (h_prev - n) z (1 - z)``,
    ``dr = dn gh_n r (1 - r)``; ``dgi = [dr, dz, dn]``, ``dgh = [dr, dz, dn r]``, and
    ``dh_direct = dh z``: the caller adds ``dgh @ W_hh`` for the full ``dh_prev``.
    """
    xp = get_array_module(dh, act)
    H = h_prev.shape[-1]
    r, z, n = act[:, :H], act[:, H:2 * H], act[:, 2 * H:]
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    dr = dn * gh[:, 2 * H:] * r * (1.0 - r)
    dgi = xp.concatenate([dr, dz, dn], axis=1)
    dgh = xp.concatenate([dr, dz, dn * r], axis=1)
    return dgi, dgh, dh * z


def softmax_cross_entropy_generic(Y, labels, n_total):
    """Softmax cross-entropy of logits ``Y`` against class ids, and its gradient.

    ``loss_i = logsumexp(Y_i) - Y_i[y_i]``; ``dY = (softmax(Y) - onehot(y)) / n_total`` (the
    unweighted ``rddtensor.optim.losses.SparseCategoricalCrossentropy``). Labels must already be valid
    class ids in ``[0, C)`` (the loss validates them).

    Args:
        Y: ``(batch, C)`` logits.
        labels: ``(batch,)`` integer class ids.
        n_total: the global batch size that normalises the gradient.

    Returns:
        ``(losses, dY)``: per-row losses ``(batch,)`` (not normalised) and ``dY`` ``(batch, C)``.
    """
    xp = get_array_module(Y)
    rows = xp.arange(Y.shape[0])
    labels = xp.asarray(labels).reshape(-1)
    Z = Y - Y.max(axis=1, keepdims=True)
    logP = Z - xp.log(xp.exp(Z).sum(axis=1, keepdims=True))
    P = xp.exp(logP)
    P[rows, labels] -= 1
    return -logP[rows, labels], P / float(n_total)


# --- CuPy kernels -------------------------------------------------------------------------------
_PREAMBLE = """
template <typename T> __device__ T rdd_sigmoid(T x) {
    T e = exp(-fabs(x));
    return x >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
}
"""

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
    "lstm_cell_forward": (
        "raw T gates, T c_prev, int32 H",
        "T h, T c, raw T act",
        """
        const ptrdiff_t base = (i / H) * 4 * H + i % H;
        T gi = rdd_sigmoid(gates[base]);
        T gf = rdd_sigmoid(gates[base + H]);
        T gg = tanh(gates[base + 2 * H]);
        T go = rdd_sigmoid(gates[base + 3 * H]);
        act[base] = gi;
        act[base + H] = gf;
        act[base + 2 * H] = gg;
        act[base + 3 * H] = go;
        T cn = gf * c_prev + gi * gg;
        c = cn;
        h = go * tanh(cn);
        """),
    "lstm_cell_backward": (
        "T dh, T dc, raw T act, T c_prev, T c, int32 H",
        "raw T dgates, T dc_prev",
        """
        const ptrdiff_t base = (i / H) * 4 * H + i % H;
        T gi = act[base];
        T gf = act[base + H];
        T gg = act[base + 2 * H];
        T go = act[base + 3 * H];
        T tc = tanh(c);
        T dct = dc + dh * go * ((T)1 - tc * tc);
        dgates[base] = dct * gg * gi * ((T)1 - gi);
        dgates[base + H] = dct * c_prev * gf * ((T)1 - gf);
        dgates[base + 2 * H] = dct * gi * ((T)1 - gg * gg);
        dgates[base + 3 * H] = dh * tc * go * ((T)1 - go);
        dc_prev = dct * gf;
        """),
    "gru_cell_forward": (
        "raw T gi, raw T gh, T h_prev, int32 H",
        "T h, raw T act",
        """
        const ptrdiff_t base = (i / H) * 3 * H + i % H;
        T r = rdd_sigmoid(gi[base] + gh[base]);
        T z = rdd_sigmoid(gi[base + H] + gh[base + H]);
        T n = tanh(gi[base + 2 * H] + r * gh[base + 2 * H]);
        act[base] = r;
        act[base + H] = z;
        act[base + 2 * H] = n;
        h = n + z * (h_prev - n);
        """),
    "gru_cell_backward": (
        "T dh, raw T act, raw T gh, T h_prev, int32 H",
        "raw T dgi, raw T dgh, T dh_direct",
        """
        const ptrdiff_t base = (i / H) * 3 * H + i % H;
        T r = act[base];
        T z = act[base + H];
        T n = act[base + 2 * H];
        T dn = dh * ((T)1 - z) * ((T)1 - n * n);
        T dz = dh * (h_prev - n) * z * ((T)1 - z);
        T dr = dn * gh[base + 2 * H] * r * ((T)1 - r);
        dgi[base] = dr;
        dgi[base + H] = dz;
        dgi[base + 2 * H] = dn;
        dgh[base] = dr;
        dgh[base + H] = dz;
        dgh[base + 2 * H] = dn * r;
        dh_direct = dh * z;
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
        raise RuntimeError("CuPy kernels need cupy and a CUDA GPU; install the `gpu` extra "
                           "(pip install rddtensor[gpu]) or call the generic implementation")
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
                                              f"rddtensor_{name}", preamble=_PREAMBLE)
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


def _require_cupy(**arrays):
    for what, a in arrays.items():
        if a is not None and not is_cupy_array(a):
            raise TypeError(f"{what} is a {type(a).__module__}.{type(a).__name__} but the other "
                            f"inputs are CuPy arrays; move it to the GPU with "
                            f"rddtensor.backend.asarray({what}, xp=cupy_module())")


def _adam_cupy(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, step,
               amsgrad_vmax=None) -> None:
    _require_cupy(g=g, m=m, v=v, amsgrad_vmax=amsgrad_vmax)
    step, lr, weight_decay = _check_step(step), float(lr), float(weight_decay)
    t = w.dtype.type
    l2, decay = (0.0, 1.0 - lr * weight_decay) if decoupled else (weight_decay, 1.0)
    scalars = (t(l2), t(decay), t(1.0 - float(beta1)), t(beta2), t(1.0 - float(beta2)),
               t((1.0 - float(beta2) ** step) ** 0.5), t(eps),
               t(-(lr / (1.0 - float(beta1) ** step))))
    if amsgrad_vmax is None:
        _elementwise("adam")(g, *scalars, w, m, v)
    else:
        _elementwise("adam_amsgrad")(g, *scalars, w, m, v, amsgrad_vmax)


def _sgd_cupy(w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, step) -> None:
    _require_cupy(g=g, buf=buf)
    step, t = _check_step(step), w.dtype.type
    if float(momentum) == 0:
        _elementwise("sgd_plain")(g, t(weight_decay), t(-float(lr)), w)
        return
    _elementwise("sgd_momentum")(g, t(weight_decay), t(momentum), t(1.0 - float(dampening)),
                                 t(-float(lr)), np.int32(step == 1), np.int32(bool(nesterov)), w,
                                 buf)


def _unary_backward_cupy(name):
    def run(dY, Y):
        _require_cupy(Y=Y)
        return _elementwise(name)(dY, Y)
    run.__name__ = f"{name}_cupy"
    return run


def _gelu_tanh_backward_cupy(dY, X):
    _require_cupy(X=X)
    t = X.dtype.type
    return _elementwise("gelu_tanh_backward")(dY, X, t(2.0 * _SQRT_2_OVER_PI), t(_GELU_C),
                                              t(3.0 * _GELU_C))


def _lstm_cell_forward_cupy(gates, c_prev):
    _require_cupy(c_prev=c_prev)
    cp = _cupy()
    gates = cp.ascontiguousarray(gates)
    H = c_prev.shape[-1]
    h = cp.empty(c_prev.shape, gates.dtype)
    c = cp.empty(c_prev.shape, gates.dtype)
    act = cp.empty_like(gates)
    _elementwise("lstm_cell_forward")(gates, c_prev, np.int32(H), h, c, act)
    return h, c, act


def _lstm_cell_backward_cupy(dh, dc, act, c_prev, c):
    _require_cupy(dc=dc, act=act, c_prev=c_prev, c=c)
    cp = _cupy()
    act = cp.ascontiguousarray(act)
    H = c_prev.shape[-1]
    dgates = cp.empty_like(act)
    dc_prev = cp.empty(c_prev.shape, act.dtype)
    _elementwise("lstm_cell_backward")(dh, act.dtype.type(0) if dc is None else dc, act, c_prev,
                                       c, np.int32(H), dgates, dc_prev)
    return dgates, dc_prev


def _gru_cell_forward_cupy(gi, gh, h_prev):
    _require_cupy(gh=gh, h_prev=h_prev)
    cp = _cupy()
    gi, gh = cp.ascontiguousarray(gi), cp.ascontiguousarray(gh)
    h = cp.empty(h_prev.shape, gi.dtype)
    act = cp.empty_like(gi)
    _elementwise("gru_cell_forward")(gi, gh, h_prev, np.int32(h_prev.shape[-1]), h, act)
    return h, act


def _gru_cell_backward_cupy(dh, act, gh, h_prev):
    _require_cupy(act=act, gh=gh, h_prev=h_prev)
    cp = _cupy()
    act, gh = cp.ascontiguousarray(act), cp.ascontiguousarray(gh)
    dgi, dgh = cp.empty_like(act), cp.empty_like(act)
    dh_direct = cp.empty(h_prev.shape, act.dtype)
    _elementwise("gru_cell_backward")(dh, act, gh, h_prev, np.int32(h_prev.shape[-1]), dgi, dgh,
                                      dh_direct)
    return dgi, dgh, dh_direct


def _conv_geometry(x_shape, kernel, strides, dilation, pads, out):
    N, C, H, W = x_shape
    return tuple(np.int32(v) for v in (N, C, H, W, *kernel, *out, *strides, *dilation,
                                       pads[0][0], pads[1][0]))


def _im2col_cupy(X, kernel, strides, dilation, pads, out):
    """2-D im2col columns ``(C, *kernel, N, *out)`` of ``X`` (``out``: the output's spatial
    shape, from ``rddtensor.layers.im2col``, whose strided view is the reference)."""
    cp = _cupy()
    X = cp.ascontiguousarray(X)
    geometry = _conv_geometry(X.shape, kernel, strides, dilation, pads, out)
    cols = cp.empty((X.shape[1], *kernel, X.shape[0], *out), X.dtype)
    if cols.size:
        _elementwise("im2col")(X, *geometry, cols)
    return cols


def _col2im_cupy(cols, x_shape, kernel, strides, dilation, pads, out):
    """The adjoint of ``_im2col_cupy`` (2-D): ``dX`` of ``x_shape``."""
    cp = _cupy()
    cols = cp.ascontiguousarray(cols)
    geometry = _conv_geometry(x_shape, kernel, strides, dilation, pads, out)
    dX = cp.empty(tuple(x_shape), cols.dtype)
    if dX.size:
        _elementwise("col2im")(cols, *geometry, dX)
    return dX


def _softmax_cross_entropy_cupy(Y, labels, n_total):
    cp = _cupy()
    Y = cp.ascontiguousarray(Y)
    batch, C = Y.shape
    labels = cp.ascontiguousarray(cp.asarray(labels).reshape(-1), dtype=cp.int64)
    losses = cp.empty(batch, Y.dtype)
    dY = cp.empty_like(Y)
    if batch and C:
        _raw_softmax_xent(Y.dtype)((batch,), (_SOFTMAX_XENT_BLOCK,),
                                   (Y, labels, losses, dY, np.int32(C), Y.dtype.type(n_total)))
    return losses, dY


#: name -> (generic implementation, CuPy implementation), one signature per name
KERNELS = {
    "adam": (adam_generic, _adam_cupy),
    "sgd": (sgd_generic, _sgd_cupy),
    "relu_backward": (relu_backward_generic, _unary_backward_cupy("relu_backward")),
    "gelu_tanh_backward": (gelu_tanh_backward_generic, _gelu_tanh_backward_cupy),
    "sigmoid_backward": (sigmoid_backward_generic, _unary_backward_cupy("sigmoid_backward")),
    "tanh_backward": (tanh_backward_generic, _unary_backward_cupy("tanh_backward")),
    "lstm_cell_forward": (lstm_cell_forward_generic, _lstm_cell_forward_cupy),
    "lstm_cell_backward": (lstm_cell_backward_generic, _lstm_cell_backward_cupy),
    "gru_cell_forward": (gru_cell_forward_generic, _gru_cell_forward_cupy),
    "gru_cell_backward": (gru_cell_backward_generic, _gru_cell_backward_cupy),
    "softmax_cross_entropy": (softmax_cross_entropy_generic, _softmax_cross_entropy_cupy),
}
#: CuPy kernels whose reference is the layer's own NumPy code (``rddtensor.layers.im2col``)
CUPY_ONLY = {"im2col": _im2col_cupy, "col2im": _col2im_cupy}


def _lookup(name):
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {sorted(KERNELS)}") from None


def generic(name: str):
    """The generic (NumPy or CuPy, via ``get_array_module``) implementation of ``name``."""
    return _lookup(name)[0]


def cupy_kernel(name: str):
    """The CuPy implementation of ``name`` (its kernel compiles on first call; needs a GPU)."""
    _cupy()
    return CUPY_ONLY[name] if name in CUPY_ONLY else _lookup(name)[1]


_DISPATCHERS: dict = {}


def kernel_or_generic(name: str):
    """A function with the signature of kernel ``name`` that picks its implementation per call.

    The CuPy kernel runs when the first argument is a float32 or float64 CuPy array; anything
    else (NumPy arrays, other dtypes) runs the generic implementation. Nothing touches CuPy
    until a CuPy array arrives.

    Args:
        name: a key of ``KERNELS`` (``"adam"``, ``"sgd"``, ``"relu_backward"``, ...).

    Example:
        >>> import numpy as np
        >>> sigmoid_backward = kernel_or_generic("sigmoid_backward")
        >>> sigmoid_backward(np.ones(2), np.array([0.5, 1.0]))
        array([0.25, 0.  ])
    """
    fn = _DISPATCHERS.get(name)
    if fn is not None:
        return fn
    generic_fn, cupy_fn = _lookup(name)

    def dispatch(first, *args, **kwargs):
        if is_cupy_array(first) and first.dtype in _FLOATS:
            return cupy_fn(first, *args, **kwargs)
        return generic_fn(first, *args, **kwargs)

    dispatch.__name__ = name
    dispatch.__doc__ = generic_fn.__doc__
    _DISPATCHERS[name] = dispatch
    return dispatch
