"""Winograd F(4x4, 3x3): a 3x3, stride-1 convolution with 4x fewer multiplications than im2col.

The output is cut into 4x4 tiles; each reads a 6x6 input tile (overlapping by 2). In the
transformed domain the convolution of one tile is an elementwise product, and summing over
input channels turns the 36 elementwise products into 36 independent GEMMs
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    V = (B^T (x) B^T) tiles(Xpad)        (36, C, T)    T = batch * tiles per image
    U = (G (x) G) W                      (36, O, C)
    M = U @ V                            (36, O, T)    36 GEMMs of O x C x T
    Y = untile((A^T (x) A^T) M)          (batch, O, H_out, W_out)

The backward runs the same pieces transposed: ``dM = (A (x) A) tiles(dY)``, ``dU = dM V^T``
(then ``dW = (G (x) G)^T dU``) and ``dV = U^T dM`` (then the adjoint of the input transform and
an overlapping-tile add give ``dX``). Every transform is one small-by-large GEMM; the copies
are the padding, the tile gathers (strided, one per tile offset) and their adjoints.

For a 64->64-channel 3x3 convolution on 32x32 images at batch 32 the GEMM work falls from 7.2
to about 2.8 GFLOP per forward+backward, and one CPU thread runs it in about half the time.
The price is float rounding of the transforms: float32 results differ from im2col's by about
1e-6 relative to the output's scale (float64 by about 1e-15). The code runs on the device's
ops (``rddtensor.ops.get_ops``), but ``rddtensor.layers.conv.conv_nd`` picks it only where
``ops.use_winograd`` (NumPy; on a GPU the im2col GEMM stays, not measured there).

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.winograd import winograd_conv3x3
    >>> X = np.random.default_rng(0).standard_normal((2, 3, 7, 9))
    >>> W = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    >>> Y, backprop = winograd_conv3x3(X, W, None, ((1, 1), (1, 1)))
    >>> Y.shape
    (2, 4, 7, 9)
    >>> [a.shape for a in backprop(np.ones_like(Y))[:2]]
    [(2, 3, 7, 9), (4, 3, 3, 3)]
"""
from __future__ import annotations

import numpy as np

from rddtensor.ops import get_ops

__all__ = ["winograd_conv3x3", "M_TILE"]

#: output tile size per axis; the input tile is M_TILE + 2
M_TILE = 4
_R = M_TILE + 2

# interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray's F(4x4, 3x3))
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)
# two-axis transforms as one matrix each: (P (x) P) acting on a row-major flattened tile
_BTBT = np.kron(_BT, _BT)   # (36, 36): input tile -> transformed
_GG = np.kron(_G, _G)       # (36, 9): 3x3 kernel -> transformed
_ATAT = np.kron(_AT, _AT)   # (16, 36): transformed product -> 4x4 output tile
# the product slot whose output-transform column is all ones (the point 1 on both axes): a
# bias added there reaches every output once, and summing dM there sums dY, so the bias and
# its gradient cost O x T instead of a pass over the whole output
_BIAS_SLOT = int(np.flatnonzero((_ATAT == 1).all(axis=0))[0])

def _matrices(ops, dtype):
    """``(BtBt, GG, AtAt)`` in ``dtype`` as arrays of ``ops.xp`` (``ops.cached_constants``:
    made once on NumPy)."""
    return ops.cached_constants(
        ("winograd", np.dtype(dtype).str),
        lambda: tuple(ops.xp.asarray(a.astype(dtype)) for a in (_BTBT, _GG, _ATAT)))


def _grid_slices(a, n):
    """Every 4th position from ``a``: offset ``a`` of each of ``n`` tiles (stride 4)."""
    return slice(a, a + M_TILE * (n - 1) + 1, M_TILE)


def _input_tiles(xp, Xp, nth, ntw):
    """``(36, C, batch * nth * ntw)``: the overlapping 6x6 tiles of ``Xp`` ``(batch, C, Hp, Wp)``.

    One strided copy per tile offset (36 in all) reads rows and columns with stride 4.
    """
    N, C = Xp.shape[:2]
    tiles = xp.empty((_R, _R, C, N, nth, ntw), Xp.dtype)
    for a in range(_R):
        for b in range(_R):
            tiles[a, b] = Xp[:, :, _grid_slices(a, nth), _grid_slices(b, ntw)].swapaxes(0, 1)
    return tiles.reshape(_R * _R, C, N * nth * ntw)


def _untile_output(xp, Yt, shape):
    """``(4, 4, O, batch, nth, ntw)`` output tiles -> ``(batch, O, Ho, Wo)``, C-contiguous.

    One strided copy per position in the tile (16 in all), then a crop if ``Ho``, ``Wo`` are
    not multiples of 4.
    """
    N, O, Ho, Wo = shape
    nth, ntw = Yt.shape[-2:]
    Y = xp.empty((N, O, nth * M_TILE, ntw * M_TILE), Yt.dtype)
    Y6 = Y.reshape(N, O, nth, M_TILE, ntw, M_TILE)
    for a in range(M_TILE):
        for c in range(M_TILE):
            Y6[:, :, :, a, :, c] = Yt[a, c].swapaxes(0, 1)
    if Ho != M_TILE * nth or Wo != M_TILE * ntw:
        Y = xp.ascontiguousarray(Y[:, :, :Ho, :Wo])
    return Y


def _output_grad_tiles(xp, dY, nth, ntw, dtype):
    """``(batch, O, Ho, Wo)`` -> ``(16, O * batch * nth * ntw)`` tiles, zero past the output."""
    N, O, Ho, Wo = dY.shape
    if Ho != M_TILE * nth or Wo != M_TILE * ntw:
        full = xp.zeros((N, O, nth * M_TILE, ntw * M_TILE), dtype)
        full[:, :, :Ho, :Wo] = dY
        dY = full
    dY6 = dY.reshape(N, O, nth, M_TILE, ntw, M_TILE)
    dYt = xp.empty((M_TILE, M_TILE, O, N, nth, ntw), dtype)
    for a in range(M_TILE):
        for c in range(M_TILE):
            dYt[a, c] = dY6[:, :, :, a, :, c].swapaxes(0, 1)
    return dYt.reshape(M_TILE * M_TILE, O * N * nth * ntw)


def _add_input_tiles(xp, dtiles, x_shape, pads):
    """Adjoint of ``_input_tiles`` and the padding: ``(6, 6, C, batch, nth, ntw)`` -> ``dX``.

    The tiles overlap by 2 at stride 4. Rows first, in the tile domain: the last two rows of
    tile ``i`` are added onto the first two of tile ``i + 1`` (one add whose inner loop runs
    over whole tile rows), and those of the last tile go to the margin below the grid. Then one
    strided copy (the first 4 columns) or add (the last 2) per tile position places the rest,
    channel-major (the order of ``dtiles``), and one crop-and-transpose copy gives ``dX``.
    ``dtiles`` is overwritten.
    """
    N, C, H, Wd = x_shape
    (pt, _), (pl, _) = pads
    nth, ntw = dtiles.shape[-2:]
    Hp, Wp = M_TILE * nth + 2, M_TILE * ntw + 2
    last = M_TILE * (nth - 1)
    dtiles[:_R - M_TILE, :, :, :, 1:] += dtiles[M_TILE:, :, :, :, :-1]
    dXp = xp.empty((C, N, Hp, Wp), dtiles.dtype)
    dXp[:, :, :, Wp - 2:] = 0
    for a in range(_R):
        for c in range(_R):
            if a < M_TILE:
                target = dXp[:, :, _grid_slices(a, nth), _grid_slices(c, ntw)]
                source = dtiles[a, c]
            else:  # the last tile's bottom rows: the margin below the grid
                target = dXp[:, :, last + a, _grid_slices(c, ntw)]
                source = dtiles[a, c, :, :, nth - 1]
            if c < M_TILE:  # the first 4 columns of a row cover it once
                target[...] = source
            else:
                target += source
    dX = xp.empty(x_shape, dtiles.dtype)
    dX[...] = dXp[:, :, pt:pt + H, pl:pl + Wd].swapaxes(0, 1)
    return dX


def winograd_conv3x3(X, W, b, pads):
    """A 3x3 cross-correlation, stride 1, dilation 1, one group, by Winograd F(4x4, 3x3).

    ``Y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] Xpad[n, c, i + u, j + v]``, the same
    as ``rddtensor.layers.conv.conv_nd`` with a 3x3 kernel and unit strides.

    Args:
        X: ``(batch, C, H, W)``. W: ``(O, C, 3, 3)``. b: ``(O,)`` or ``None``.
        pads: ``((top, bottom), (left, right))`` zero padding.

    Returns:
        ``Y`` of shape ``(batch, O, H_out, W_out)`` with ``H_out = H + top + bottom - 2``, and
        ``backprop(dY) -> (dX, dW, db)``.
    """
    ops = get_ops(X)
    xp = ops.xp
    dtype = np.result_type(X.dtype, W.dtype)
    N, C, H, Wd = x_shape = X.shape  # backprop keeps the shape, not the input
    O = W.shape[0]
    (pt, pb), (pl, pr) = pads
    Ho, Wo = H + pt + pb - 2, Wd + pl + pr - 2
    nth, ntw = -(-Ho // M_TILE), -(-Wo // M_TILE)
    T = N * nth * ntw
    BtBt, GG, AtAt = _matrices(ops, dtype)
    # zero padding up to whole tiles: (4 nth + 2) x (4 ntw + 2) >= the padded input
    Xp = xp.zeros((N, C, M_TILE * nth + 2, M_TILE * ntw + 2), dtype)
    Xp[:, :, pt:pt + H, pl:pl + Wd] = X
    V = xp.matmul(BtBt, _input_tiles(xp, Xp, nth, ntw).reshape(_R * _R, C * T))
    V = V.reshape(_R * _R, C, T)
    del Xp
    U = xp.matmul(GG, W.astype(dtype, copy=False).reshape(O * C, 9).T).reshape(_R * _R, O, C)
    Mt = xp.matmul(U, V)                                                   # (36, O, T)
    if b is not None:
        Mt[_BIAS_SLOT] += b.astype(dtype, copy=False)[:, None]
    Yt = xp.matmul(AtAt, Mt.reshape(_R * _R, O * T))                      # (16, O * T)
    del Mt
    Y = _untile_output(xp, Yt.reshape(M_TILE, M_TILE, O, N, nth, ntw), (N, O, Ho, Wo))
    del Yt

    def backprop(dY):
        dM = xp.matmul(AtAt.T, _output_grad_tiles(xp, dY, nth, ntw, dtype))
        dM = dM.reshape(_R * _R, O, T)
        db = None if b is None else dM[_BIAS_SLOT].sum(axis=1).astype(b.dtype, copy=False)
        dU = xp.matmul(dM, V.transpose(0, 2, 1))                          # (36, O, C)
        dW = xp.matmul(dU.reshape(_R * _R, O * C).T, GG).reshape(W.shape)
        dV = xp.matmul(U.transpose(0, 2, 1), dM)                          # (36, C, T)
        del dM
        dtiles = xp.matmul(BtBt.T, dV.reshape(_R * _R, C * T))
        del dV
        dX = _add_input_tiles(xp, dtiles.reshape(_R, _R, C, N, nth, ntw), x_shape, pads)
        return dX, dW.astype(W.dtype, copy=False), db
    return Y, backprop
