"""Strided-window helpers shared by the convolution and pooling layers.

Arrays are channels-first with any number of spatial axes: ``(batch, channels, *spatial)``.
A convolution becomes one GEMM over a column matrix::

    cols = im2col(X, kernel, strides, dilation, pads)        # (C, *kernel, batch, *out)
    Y    = W.reshape(O, C * K) @ cols.reshape(C * K, -1)     # (O, batch * P)

``im2col`` reads the windows through a zero-copy strided view (``as_strided``) and copies them
once into that order; ``col2im`` is its adjoint and accumulates with one strided slice-add per
kernel offset, so the only Python loop runs over the ``K = prod(kernel)`` offsets, never over
the batch or the pixels. ``matmul_col2im(A, B)`` is ``col2im(A @ B)`` (the data gradient, and
the forward of a transposed convolution) with one GEMM per offset, so the ``K`` times larger
product never exists.
Everything keeps the dtype of its input (float32 stays float32) and works on NumPy and CuPy
arrays alike.

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.im2col import im2col, col2im
    >>> X = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> cols, out = im2col(X, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)))
    >>> cols.shape, out
    ((1, 2, 2, 1, 2, 2), (2, 2))
    >>> col2im(cols, X.shape, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)), out).shape
    (1, 1, 4, 4)
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from rddtensor.backend import get_array_module, is_cupy_array
from rddtensor.kernels import cupy_kernel

__all__ = ["conv_output_size", "pad_spatial", "crop_spatial", "window_view", "offset_slices",
           "im2col", "col2im", "im2col_strided", "col2im_strided", "matmul_col2im", "int_tuple",
           "SPATIAL_AXES"]

#: names of the spatial axes per rank, for error messages ("(batch, channels, height, width)")
SPATIAL_AXES = {1: "length", 2: "height, width"}


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple) -> int:
    """Output length of one spatial axis: ``(size + lo + hi - d (k - 1) - 1) // s + 1``.

    May be 0 or negative when the (dilated) window does not fit; callers turn that into an error.
    """
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


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


def window_view(Xp, kernel, strides, dilation, out):
    """Zero-copy view ``(batch, channels, *out, *kernel)`` of the windows of ``Xp``.

    ``view[n, c, o_1.., k_1..] = Xp[n, c, o_1 s_1 + k_1 d_1, ...]``. Read-only: never write to it.
    """
    xp = get_array_module(Xp)
    st = Xp.strides
    shape = (*Xp.shape[:2], *out, *kernel)
    strides_ = (st[0], st[1], *(a * s for a, s in zip(st[2:], strides)),
                *(a * d for a, d in zip(st[2:], dilation)))
    if xp is np:
        return np.lib.stride_tricks.as_strided(Xp, shape, strides_, writeable=False)
    return xp.lib.stride_tricks.as_strided(Xp, shape, strides_)


def offset_slices(kernel, strides, dilation, out):
    """Yield ``(flat_offset, slices)`` for every kernel offset: the spatial slices of the padded
    input that this offset of every window reads (one strided slice per axis)."""
    for i, k in enumerate(itertools.product(*(range(n) for n in kernel))):
        yield i, tuple(slice(kk * d, kk * d + s * (o - 1) + 1, s)
                       for kk, d, s, o in zip(k, dilation, strides, out))


def _gpu_kernel(X, kernel) -> bool:
    # CuPy float arrays of a 2-D convolution: rddtensor.kernels' gather kernels, one pass
    return len(kernel) == 2 and is_cupy_array(X) and X.dtype in (np.float32, np.float64)


def im2col(X, kernel, strides, dilation, pads):
    """Column matrix of a convolution: ``(channels, *kernel, batch, *out)``, C-contiguous.

    Args:
        X: input ``(batch, channels, *spatial)``.
        kernel, strides, dilation: one int per spatial axis.
        pads: ``((lo, hi), ...)`` zero padding per spatial axis.

    Returns:
        ``(cols, out)`` with ``out`` the output spatial shape. ``cols.reshape(C * K, batch * P)``
        is the GEMM operand (``K = prod(kernel)``, ``P = prod(out)``).
    """
    if _gpu_kernel(X, kernel):
        out = tuple(conv_output_size(n, k, s, d, p)
                    for n, k, s, d, p in zip(X.shape[2:], kernel, strides, dilation, pads))
        return cupy_kernel("im2col")(X, kernel, strides, dilation, pads, out), out
    return im2col_strided(X, kernel, strides, dilation, pads)


def im2col_strided(X, kernel, strides, dilation, pads):
    """``im2col`` through a strided view and one copy (NumPy, and CuPy's generic path)."""
    xp = get_array_module(X)
    out = tuple(conv_output_size(n, k, s, d, p)
                for n, k, s, d, p in zip(X.shape[2:], kernel, strides, dilation, pads))
    r = len(kernel)
    view = window_view(pad_spatial(X, pads), kernel, strides, dilation, out)
    # channel, kernel, batch, out: the innermost axis stays the input's row (contiguous for
    # stride 1), and both GEMM operands come out without another transpose
    order = (1, *range(2 + r, 2 + 2 * r), 0, *range(2, 2 + r))
    return xp.ascontiguousarray(view.transpose(order)), out


def col2im(cols, x_shape, kernel, strides, dilation, pads, out):
    """Adjoint of ``im2col``: sum every column back into its input position.

    Args:
        cols: ``(channels, *kernel, batch, *out)`` (or anything reshapeable to it).
        x_shape: shape of the (unpadded) input ``(batch, channels, *spatial)``.
        kernel, strides, dilation, pads: as in ``im2col``; out: the output shape it returned.

    Returns:
        ``dX`` of shape ``x_shape``, C-contiguous, dtype of ``cols``.
    """
    if _gpu_kernel(cols, kernel):
        return cupy_kernel("col2im")(cols, x_shape, kernel, strides, dilation, pads, out)
    return col2im_strided(cols, x_shape, kernel, strides, dilation, pads, out)


def col2im_strided(cols, x_shape, kernel, strides, dilation, pads, out):
    """``col2im`` as one strided slice-add per kernel offset (NumPy, CuPy's generic path)."""
    xp = get_array_module(cols)
    N, C = x_shape[:2]
    cols = cols.reshape(C, math.prod(kernel), N, *out)
    # accumulate channel-major, like cols, and transpose once at the end
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[2:], pads))
    acc = xp.zeros((C, N, *padded), dtype=cols.dtype)
    for i, sl in offset_slices(kernel, strides, dilation, out):
        acc[(slice(None), slice(None), *sl)] += cols[:, i]
    acc = crop_spatial(acc, pads, (C, N, *x_shape[2:]))
    return xp.ascontiguousarray(acc.swapaxes(0, 1))


def matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out):
    """``col2im(A @ B, ...)`` without the ``K`` times larger product: one GEMM per kernel offset.

    Args:
        A: ``(groups, C / groups * K, M)``, rows ordered (channel, kernel offset) like im2col's.
        B: ``(groups, M, batch * P)``.
        x_shape, kernel, strides, dilation, pads, out: as in ``col2im``.

    Returns:
        ``dX`` of shape ``x_shape``, C-contiguous. Each offset's ``(C, batch * P)`` product is
        added into the padded input as soon as it exists, so the working set stays ``1 / K`` of
        the column matrix (for a 3x3 kernel on 64 channels of 32 x 32 images at batch 32, 8 MB
        instead of 75 MB that a fresh allocation would page-fault in on every call).
    """
    xp = get_array_module(A, B)
    if _gpu_kernel(A, kernel) and A.dtype == B.dtype:
        # a GPU has the memory for the K-times larger product: one GEMM, one gather kernel
        return col2im(xp.matmul(A, B), x_shape, kernel, strides, dilation, pads, out)
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


def int_tuple(value, rank: int, what: str, minimum: int = 1) -> tuple:
    """Validate an int or a sequence of ``rank`` ints, each ``>= minimum``; return a tuple.

    The shared check behind ``kernel_size``, ``strides``, ``dilation``, ``padding``, ``size``.
    """
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        values = (value,) * rank
    elif isinstance(value, (tuple, list)) and len(value) == rank:
        values = tuple(value)
    else:
        raise ValueError(f"{what} must be an integer or a tuple of {rank} {kind}, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{what} must be an integer or a tuple of {rank} {kind}, "
                             f"got {value!r}")
    return tuple(int(v) for v in values)
