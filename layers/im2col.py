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
arrays alike: the functions here call the device's ops (``rddtensor.ops.get_ops``), whose
NumPy methods (``rddtensor.ops.numpy_ops.NumpyOps``) are the strided reference and whose CuPy
methods run gather kernels for 2-D float convolutions.

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

import numpy as np

from rddtensor.ops import get_ops
from rddtensor.ops.numpy_ops import conv_output_size, crop_spatial, offset_slices, pad_spatial

__all__ = ["conv_output_size", "pad_spatial", "crop_spatial", "window_view", "offset_slices",
           "im2col", "col2im", "matmul_col2im", "int_tuple", "SPATIAL_AXES"]

#: names of the spatial axes per rank, for error messages ("(batch, channels, height, width)")
SPATIAL_AXES = {1: "length", 2: "height, width"}


def window_view(Xp, kernel, strides, dilation, out):
    """Zero-copy view ``(batch, channels, *out, *kernel)`` of the windows of ``Xp``.

    ``view[n, c, o_1.., k_1..] = Xp[n, c, o_1 s_1 + k_1 d_1, ...]``. Read-only: never write to it.
    """
    return get_ops(Xp).window_view(Xp, kernel, strides, dilation, out)


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
    return get_ops(X).im2col(X, kernel, strides, dilation, pads)


def col2im(cols, x_shape, kernel, strides, dilation, pads, out):
    """Adjoint of ``im2col``: ``dX`` of shape ``x_shape`` (see ``NumpyOps.col2im``)."""
    return get_ops(cols).col2im(cols, x_shape, kernel, strides, dilation, pads, out)


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
        instead of 75 MB that a fresh allocation would page-fault in on every call). On a GPU
        (``CupyOps``) it is one GEMM and the col2im kernel.
    """
    return get_ops(A, B).matmul_col2im(A, B, x_shape, kernel, strides, dilation, pads, out)


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
