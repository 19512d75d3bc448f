"""The device switch: ``NumpyOps`` holds the reference code of every hot path; CuPy overrides it.

Layers, losses and optimizers never ask which array module they run on. They call
``get_ops(X).method(...)`` (or ``ops_for(xp)`` where they are handed a module), both from
``rddtensor.backend``:

- ``get_ops(*arrays)`` returns ``NUMPY_OPS``, the one ``NumpyOps``, unless an argument is a CuPy
  array; then it returns ``CUPY_OPS``, the one ``CupyOps`` (``rddtensor.ops.cupy_ops``),
  built on first use.
- ``NumpyOps`` is the reference: its methods are the library's NumPy code (the optimizer steps,
  activation backprops, the sparse softmax cross-entropy, im2col/col2im), written with
  ``self.xp`` so that they run unchanged on CuPy arrays too. What the CPU test suite checks
  against PyTorch is exactly this code.
- ``CupyOps(NumpyOps)`` has ``xp = cupy`` and overrides only the hot methods with fused CuPy
  kernels (``ElementwiseKernel`` / ``RawKernel``) that do the same arithmetic in one pass. An
  override keeps its parent's signature and calls ``super()`` wherever its kernel does not
  apply (another dtype than float32/float64, a convolution that is not 2-D, label smoothing),
  so every method works for every input the reference takes.

Adding a kernel: write the reference as a ``NumpyOps`` method (with ``self.xp``) and call it
from the layer as ``get_ops(X).name(...)``; then add the CUDA source to ``cupy_ops``' tables and
a ``CupyOps.name`` override with the same signature that runs it where it applies and returns
``super().name(...)`` elsewhere. ``tests/test_ops.py`` checks the signatures and (with a GPU)
compares ``CUPY_OPS.name`` on CuPy arrays with ``NUMPY_OPS.name`` on NumPy arrays;
``tests/test_kernel_sources.py`` compiles the CUDA source with NVRTC.

The module-level helpers (``pad_spatial``, ``offset_slices``, ``softmax_xent``, ...) are pieces
of the references that the layers and losses share; they use ``get_array_module`` and never
dispatch.

Example:
    >>> import numpy as np
    >>> from rddtensor.ops import get_ops, NUMPY_OPS
    >>> ops = get_ops(np.zeros(3))
    >>> ops is NUMPY_OPS, ops.relu_backward(np.ones(3), np.array([-1.0, 0.0, 2.0]))
    (True, array([0., 0., 1.]))
"""
from __future__ import annotations

import itertools
import math
from numbers import Integral

import numpy as np
import scipy.special

from rddtensor.backend import get_array_module

__all__ = ["NumpyOps", "NUMPY_OPS", "check_step", "conv_output_size", "conv_output_shape",
           "pad_spatial", "crop_spatial", "offset_slices", "add_weight_decay", "adam_moments",
           "softmax_xent", "normal_cdf_chebyshev", "SQRT_2_OVER_PI", "GELU_C"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715  # the cubic coefficient of the tanh-approximated GELU
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def check_step(step) -> int:
    """``step`` as an int; it is the 1-based update count, so anything else raises."""
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 1:
        raise ValueError(f"step is 1-based and must be an integer >= 1, got {step!r}")
    return int(step)


# --- shared pieces of the references ----------------------------------------------------------
def add_weight_decay(xp, g, w, weight_decay, tmp) -> None:
    """``g += weight_decay * w`` through the scratch ``tmp`` (nothing when the decay is 0)."""
    if weight_decay != 0:
        xp.multiply(w, weight_decay, out=tmp)
        g += tmp


def adam_moments(xp, g, m, v, beta1, beta2, tmp) -> None:
    """Adam's moments in place: ``v = b2*v + (1-b2)*g^2``, ``m = lerp(m, g, 1-b1)`` (torch's forms)."""
    v *= beta2
    xp.multiply(g, 1.0 - beta2, out=tmp)
    tmp *= g
    v += tmp
    xp.subtract(g, m, out=tmp)
    tmp *= 1.0 - beta1
    m += tmp


def softmax_xent(xp, Y, T):
    """Cross-entropy of softmax(Y) against target rows ``T``; gradient ``softmax * sum(T) - T``.

    Returns per-row losses ``(batch,)`` and the gradient, neither divided by the batch size.
    """
    Z = Y - Y.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(Z).sum(axis=1, keepdims=True))
    logP = Z - lse
    per = -(T * logP).sum(axis=1)
    return per, xp.exp(logP) * T.sum(axis=1, keepdims=True) - T


def normal_cdf_chebyshev(xp, X):
    """Standard normal CDF from ``exp`` alone, for array modules without ``erf``.

    Numerical Recipes' erfc (a Chebyshev fit, relative error < 1.2e-7: float32 precision).
    """
    z = xp.abs(X) * _INV_SQRT2
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    half_erfc = 0.5 * t * xp.exp(-z * z + poly)  # = Phi(-|X|)
    return xp.where(X >= 0, 1.0 - half_erfc, half_erfc)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple) -> int:
    """Output length of one spatial axis: ``(size + lo + hi - d (k - 1) - 1) // s + 1``.

    May be 0 or negative when the (dilated) window does not fit; callers turn that into an error.
    """
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(x_shape, kernel, strides, dilation, pads) -> tuple:
    """The output's spatial shape of a convolution over ``x_shape`` ``(batch, C, *spatial)``."""
    return tuple(conv_output_size(n, k, s, d, p)
                 for n, k, s, d, p in zip(x_shape[2:], kernel, strides, dilation, pads))


def pad_spatial(X, pads, value=0.0):
    """Pad the spatial axes of ``(batch, channels, *spatial)`` by ``pads = ((lo, hi), ...)``."""
    if not any(lo or hi for lo, hi in pads):
        return X
    xp = get_array_module(X)
    return xp.pad(X, ((0, 0), (0, 0), *pads), mode="constant", constant_values=value)


def crop_spatial(Xp, pads, shape):
    """Undo ``pad_spatial``: the ``shape[2:]`` block of ``Xp`` starting at each ``lo``."""
    return Xp[(slice(None), slice(None),
               *(slice(lo, lo + n) for (lo, _), n in zip(pads, shape[2:])))]


def offset_slices(kernel, strides, dilation, out):
    """Yield ``(flat_offset, slices)`` for every kernel offset: the spatial slices of the padded
    input that this offset of every window reads (one strided slice per axis)."""
    for i, k in enumerate(itertools.product(*(range(n) for n in kernel))):
        yield i, tuple(slice(kk * d, kk * d + s * (o - 1) + 1, s)
                       for kk, d, s, o in zip(k, dilation, strides, out))


# --- the reference ops ------------------------------------------------------------------------
class NumpyOps:
    """The reference implementation of the hot paths, on NumPy (``xp``; see the module doc).

    Every method keeps the dtype of its inputs (float32 stays float32: constants are Python
    floats, which NumPy treats as weakly typed). ``CupyOps`` subclasses it; its methods take the
    same arguments.
    """

    name = "numpy"
    #: the array module the methods compute with
    xp = np
    #: ``rddtensor.layers.conv.conv_nd`` runs a qualifying 3x3 convolution by Winograd
    #: F(4x4, 3x3): 4x fewer multiplications pay off on a CPU's GEMMs. A GPU keeps the im2col
    #: GEMM (Winograd was never measured there).
    use_winograd = True

    def __init__(self):
        self._constants: dict = {}

    def __repr__(self):
        return f"{type(self).__name__}()"

    # --- constants --------------------------------------------------------------------------
    def cached_constants(self, key, build):
        """``build()``, made once per ``key`` and kept (host arrays serve every call)."""
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = build()
        return value

    # --- optimizer steps ----------------------------------------------------------------------
    def sgd_update(self, w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay,
                   step) -> None:
        """SGD in place, as ``torch.optim.SGD`` (``buf`` is ``None`` without momentum).

        ``g += wd*w``; ``buf = g`` at t=1, else ``buf = momentum*buf + (1-dampening)*g``;
        ``w -= lr * (g + momentum*buf)`` (Nesterov) or ``w -= lr * buf``. ``g`` is scratch.
        """
        xp = self.xp
        step, lr, momentum = check_step(step), float(lr), float(momentum)
        dampening, weight_decay = float(dampening), float(weight_decay)
        tmp = xp.empty_like(w) if (weight_decay or dampening or nesterov) else None
        add_weight_decay(xp, g, w, weight_decay, tmp)
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

    def adam_update(self, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                    amsgrad_vmax=None) -> None:
        """Adam (AdamW with ``decoupled=True``) in place, as ``torch.optim.Adam[W]``.

        ``g += wd*w`` (Adam) or ``w *= 1 - lr*wd`` (AdamW); ``m = b1*m + (1-b1)*g``,
        ``v = b2*v + (1-b2)*g^2``, ``vmax = max(vmax, v)`` (AMSGrad, used instead of ``v``);
        ``w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``. ``g`` is scratch.
        """
        xp = self.xp
        step, lr, beta1, beta2 = check_step(step), float(lr), float(beta1), float(beta2)
        weight_decay = float(weight_decay)
        tmp = xp.empty_like(w)
        if weight_decay != 0:
            if decoupled:
                w *= 1.0 - lr * weight_decay
            else:
                add_weight_decay(xp, g, w, weight_decay, tmp)
        adam_moments(xp, g, m, v, beta1, beta2, tmp)
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

    # --- activation backprops -----------------------------------------------------------------
    def relu_backward(self, dY, Y):
        """``dX = dY where Y > 0 else 0`` (gradient 0 at 0, as PyTorch).

        A multiply, not ``where``: ``where`` branches per element and mispredicts on a mask
        that is about half true.
        """
        return dY * (Y > 0)

    def sigmoid_backward(self, dY, Y):
        """``dX = dY * Y * (1 - Y)`` from the sigmoid's output ``Y``."""
        return dY * Y * (1.0 - Y)

    def tanh_backward(self, dY, Y):
        """``dX = dY * (1 - Y^2)`` from the tanh's output ``Y``."""
        return dY * (1.0 - Y * Y)

    def gelu_tanh_backward(self, dY, X, S, S_neg):
        """``dX`` of ``Y = 0.5 X (1 + tanh(u))``, ``u = sqrt(2/pi) (X + 0.044715 X^3)``.

        ``S, S_neg = sigmoid(2u), sigmoid(-2u)`` from the forward: written with them, nothing
        cancels where ``tanh u`` is close to -1 (float32 tails).
        """
        dv = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * X * X)
        return dY * (S + X * S * S_neg * dv)

    def normal_cdf(self, X):
        """Standard normal CDF ``Phi(X) = erfc(-X / sqrt 2) / 2``, accurate in both tails."""
        return scipy.special.ndtr(X)

    # --- losses -------------------------------------------------------------------------------
    def sparse_softmax_cross_entropy(self, Y, labels, label_smoothing=0.0):
        """Softmax cross-entropy of logits ``Y`` against class ids, and its gradient.

        The target row is ``(1 - s) * onehot(label) + s / C``; ``loss_i = -sum_j T_ij
        log softmax(Y_i)_j`` and ``dY = softmax(Y) * sum(T) - T``. Labels must already be valid
        class ids in ``[0, C)`` (the loss validates them).

        Args:
            Y: ``(batch, C)`` logits.
            labels: ``(batch,)`` integer class ids.
            label_smoothing: ``s`` in ``[0, 1]``.

        Returns:
            ``(losses, dY)``: per-row losses ``(batch,)`` and ``dY`` ``(batch, C)``, neither
            divided by the batch size.
        """
        xp = self.xp
        batch, C = Y.shape
        T = xp.full(Y.shape, label_smoothing / C, dtype=Y.dtype)
        T[xp.arange(batch), labels] += 1 - label_smoothing
        return softmax_xent(xp, Y, T)

    # --- convolution windows ------------------------------------------------------------------
    def window_view(self, Xp, kernel, strides, dilation, out):
        """Zero-copy view ``(batch, channels, *out, *kernel)`` of the windows of ``Xp``.

        ``view[n, c, o_1.., k_1..] = Xp[n, c, o_1 s_1 + k_1 d_1, ...]``. Read-only: never write
        to it.
        """
        st = Xp.strides
        shape = (*Xp.shape[:2], *out, *kernel)
        strides_ = (st[0], st[1], *(a * s for a, s in zip(st[2:], strides)),
                    *(a * d for a, d in zip(st[2:], dilation)))
        return self._as_strided(Xp, shape, strides_)

    def _as_strided(self, X, shape, strides):
        return np.lib.stride_tricks.as_strided(X, shape, strides, writeable=False)

    def im2col(self, X, kernel, strides, dilation, pads):
        """Column matrix of a convolution: ``(channels, *kernel, batch, *out)``, C-contiguous.

        Reads the windows through a strided view and copies them once into that order.

        Args:
            X: input ``(batch, channels, *spatial)``.
            kernel, strides, dilation: one int per spatial axis.
            pads: ``((lo, hi), ...)`` zero padding per spatial axis.

        Returns:
            ``(cols, out)`` with ``out`` the output spatial shape.
        """
        out = conv_output_shape(X.shape, kernel, strides, dilation, pads)
        r = len(kernel)
        view = self.window_view(pad_spatial(X, pads), kernel, strides, dilation, out)
        # channel, kernel, batch, out: the innermost axis stays the input's row (contiguous for
        # stride 1), and both GEMM operands come out without another transpose
        order = (1, *range(2 + r, 2 + 2 * r), 0, *range(2, 2 + r))
        return self.xp.ascontiguousarray(view.transpose(order)), out

    def col2im(self, cols, x_shape, kernel, strides, dilation, pads, out):
        """Adjoint of ``im2col``: one strided slice-add per kernel offset.

        Args:
            cols: ``(channels, *kernel, batch, *out)`` (or anything reshapeable to it).
            x_shape: shape of the (unpadded) input ``(batch, channels, *spatial)``.
            kernel, strides, dilation, pads: as in ``im2col``; out: the output shape it returned.

        Returns:
            ``dX`` of shape ``x_shape``, C-contiguous, dtype of ``cols``.
        """
        xp = self.xp
        N, C = x_shape[:2]
        cols = cols.reshape(C, math.prod(kernel), N, *out)
        # accumulate channel-major, like cols, and transpose once at the end
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[2:], pads))
        acc = xp.zeros((C, N, *padded), dtype=cols.dtype)
        for i, sl in offset_slices(kernel, strides, dilation, out):
            acc[(slice(None), slice(None), *sl)] += cols[:, i]
        acc = crop_spatial(acc, pads, (C, N, *x_shape[2:]))
        return xp.ascontiguousarray(acc.swapaxes(0, 1))

    def matmul_col2im(self, A, B, x_shape, kernel, strides, dilation, pads, out):
        """``col2im(A @ B, ...)`` without the ``K`` times larger product: one GEMM per offset.

        Args:
            A: ``(groups, C / groups * K, M)``, rows ordered (channel, kernel offset) like
                im2col's.
            B: ``(groups, M, batch * P)``.
            x_shape, kernel, strides, dilation, pads, out: as in ``col2im``.

        Returns:
            ``dX`` of shape ``x_shape``, C-contiguous. Each offset's ``(C, batch * P)`` product
            is added into the padded input as soon as it exists, so the working set stays
            ``1 / K`` of the column matrix.
        """
        xp = self.xp
        N, C = x_shape[:2]
        K = math.prod(kernel)
        groups, M = A.shape[0], A.shape[2]
        A4 = A.reshape(groups, C // groups, K, M)
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[2:], pads))
        acc = xp.zeros((C, N, *padded), dtype=xp.result_type(A, B))
        part = xp.empty((groups, C // groups, B.shape[2]), dtype=acc.dtype)
        part_view = part.reshape(C, N, *out)
        for i, sl in offset_slices(kernel, strides, dilation, out):
            xp.matmul(A4[:, :, i], B, out=part)
            acc[(slice(None), slice(None), *sl)] += part_view
        acc = crop_spatial(acc, pads, (C, N, *x_shape[2:]))
        return xp.ascontiguousarray(acc.swapaxes(0, 1))


#: the NumPy ops: what ``get_ops`` returns for anything but CuPy arrays
NUMPY_OPS = NumpyOps()
