"""Convolution layers: Conv1D, Conv2D (strided, padded, dilated, grouped) and Conv2DTranspose.

Channels-first (``(batch, channels, length)``, NCHW) with PyTorch weight layouts, so a PyTorch
``state_dict`` maps straight in. The compute is two pure functions, ``conv_nd`` and
``conv_transpose_nd``, each ``f(X, W, b, ...) -> (Y, backprop)``: one im2col copy and one GEMM
forward; backward a GEMM for the weights and, for the data, one GEMM per kernel offset added
straight into place (``matmul_col2im``; see ``rddtensor.layers.im2col``). They take any number of
spatial axes; the layers pin it. On NumPy, a 3x3 stride-1 ungrouped 2-D convolution with enough
channels runs Winograd F(4x4, 3x3) instead (``rddtensor.layers.winograd``: 4x fewer multiplications, the
same result to float rounding).
"""
from __future__ import annotations

import math

import numpy as np

from rddtensor.layers.activations import ActivationOutput, activation_config, get_activation
from rddtensor.layers.base import Layer, positive_int, register
from rddtensor.layers.im2col import SPATIAL_AXES, conv_output_size, im2col, int_tuple, matmul_col2im
from rddtensor.layers.initializers import get_initializer, initialize
from rddtensor.layers.winograd import winograd_conv3x3
from rddtensor.backend import get_array_module
from rddtensor.ops import get_ops

__all__ = ["Conv1D", "Conv2D", "Conv2DTranspose", "conv_nd", "conv_transpose_nd",
           "WINOGRAD_MIN_CHANNELS"]

#: Winograd runs when the harmonic mean of input and output channels is at least this. Its
#: transforms cost about (C + O) per pixel and it saves about C * O / 2 multiply-adds, so few
#: channels (a 3-channel image, 2 -> 6 channels) stay on im2col, where Winograd is slower;
#: from about 8 -> 8 channels on it is faster (single thread, CPU).
WINOGRAD_MIN_CHANNELS = 8


# --- the pure functions ---------------------------------------------------------------------------
def _to_batch_first(xp, Z, b, N, out):
    """``(O, batch * P)`` GEMM result -> ``(batch, O, *out)`` (plus bias) in one copy."""
    O = Z.shape[0]
    Z = Z.reshape(O, N, *out).swapaxes(0, 1)
    if b is None:
        return xp.ascontiguousarray(Z)
    Y = xp.empty(Z.shape, dtype=xp.result_type(Z, b))
    xp.add(Z, b.reshape(1, O, *(1,) * len(out)), out=Y)
    return Y


def _to_channel_major(xp, X):
    """``(batch, C, *spatial)`` -> ``(C, batch * P)``, C-contiguous (the GEMM operand)."""
    N, C = X.shape[:2]
    P = math.prod(X.shape[2:])  # explicit sizes: -1 cannot be inferred for an empty batch
    return xp.ascontiguousarray(X.reshape(N, C, P).swapaxes(0, 1)).reshape(C, N * P)


def _winograd_applies(ops, X, W, strides, dilation, groups) -> bool:
    """3x3, unit strides and dilation, one group, float, enough channels, ops that use it
    (``NumpyOps.use_winograd``: NumPy)."""
    if not ops.use_winograd or X.ndim != 4 or groups != 1 or tuple(W.shape[2:]) != (3, 3):
        return False
    if tuple(strides) != (1, 1) or tuple(dilation) != (1, 1) or X.shape[0] == 0:
        return False
    if X.dtype not in (np.float32, np.float64) or W.dtype not in (np.float32, np.float64):
        return False
    C, O = X.shape[1], W.shape[0]
    return 2 * C * O >= WINOGRAD_MIN_CHANNELS * (C + O)


def conv_nd(X, W, b, strides, dilation, pads, groups=1):
    """Cross-correlation as PyTorch's ``conv1d`` / ``conv2d``; returns ``(Y, backprop)``.

    ``Y[n, o, p] = b[o] + sum_{c, k} W[o, c, k] * Xpad[n, g(o) Cg + c, p s + k d]``, where
    ``g(o)`` is the group of output channel ``o`` and ``Cg = C / groups``. A 3x3 kernel with
    unit strides and dilation, one group and enough channels (``WINOGRAD_MIN_CHANNELS``) runs
    ``rddtensor.layers.winograd.winograd_conv3x3`` on NumPy (``ops.use_winograd``); everything
    else im2col and one GEMM.

    Args:
        X: ``(batch, C, *spatial)``. W: ``(O, C / groups, *kernel)``. b: ``(O,)`` or ``None``.
        strides, dilation: one int per spatial axis. pads: ``((lo, hi), ...)`` zero padding.
        groups: ``C`` and ``O`` split into this many independent groups.

    Returns:
        ``Y`` of shape ``(batch, O, *out)`` and ``backprop(dY) -> (dX, dW, db)`` (``db`` is
        ``None`` without a bias).
    """
    ops = get_ops(X)
    xp = ops.xp
    if _winograd_applies(ops, X, W, strides, dilation, groups):
        return winograd_conv3x3(X, W, b, pads)
    N, x_shape = X.shape[0], X.shape  # backprop keeps the shape, not the input
    O, Cg, *kernel = W.shape
    kernel = tuple(kernel)
    K = math.prod(kernel)
    cols, out = im2col(X, kernel, strides, dilation, pads)  # (C, *kernel, N, *out)
    NP = N * math.prod(out)
    cols = cols.reshape(groups, Cg * K, NP)
    W3 = W.reshape(groups, O // groups, Cg * K)
    Y = _to_batch_first(xp, xp.matmul(W3, cols).reshape(O, NP), b, N, out)

    def backprop(dY):
        dY2 = _to_channel_major(xp, dY).reshape(groups, O // groups, NP)
        dW = xp.matmul(dY2, cols.transpose(0, 2, 1)).reshape(W.shape)
        db = None if b is None else dY2.reshape(O, NP).sum(axis=1)
        dX = matmul_col2im(W3.transpose(0, 2, 1), dY2, x_shape, kernel, strides, dilation,
                           pads, out)
        return dX, dW, db
    return Y, backprop


def conv_transpose_output_size(size, kernel, stride, dilation, pad, output_padding) -> int:
    """``(size - 1) s - 2 p + d (k - 1) + output_padding + 1``, as ``torch.nn.ConvTranspose2d``."""
    return (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_padding + 1


def conv_transpose_nd(X, W, b, strides, dilation, padding, output_padding):
    """Transposed convolution as PyTorch's ``conv_transpose2d`` (groups=1); ``(Y, backprop)``.

    The adjoint of ``conv_nd`` in ``X``: ``Y = col2im(W^T X) + b``, each input pixel scattering
    ``X[n, c, p] * W[c, o, k]`` to output position ``p s + k d - padding``.

    Args:
        X: ``(batch, C_in, *spatial)``. W: ``(C_in, C_out, *kernel)``. b: ``(C_out,)`` or None.
        strides, dilation, padding, output_padding: one int per spatial axis;
            ``output_padding < strides`` (it only picks among the sizes a stride makes ambiguous).

    Returns:
        ``Y`` of shape ``(batch, C_out, *out)`` and ``backprop(dY) -> (dX, dW, db)``.
    """
    xp = get_array_module(X)
    N, C_in, *spatial = X.shape
    C_out, kernel = W.shape[1], tuple(W.shape[2:])
    out = tuple(conv_transpose_output_size(n, k, s, d, p, op) for n, k, s, d, p, op in
                zip(spatial, kernel, strides, dilation, padding, output_padding))
    pads = tuple((p, p) for p in padding)
    X2 = _to_channel_major(xp, X)                      # (C_in, N * P)
    W2 = W.reshape(C_in, C_out * math.prod(kernel))    # (C_in, C_out * K)
    Y = matmul_col2im(W2.T[None], X2[None], (N, C_out, *out), kernel, strides, dilation, pads,
                      tuple(spatial))
    if b is not None:
        Y += b.reshape(1, C_out, *(1,) * len(out))

    def backprop(dY):
        # the data gradient is the forward convolution of dY: same kernel, strides and padding
        cols, _ = im2col(dY, kernel, strides, dilation, pads)  # (C_out, *kernel, N, *spatial)
        cols = cols.reshape(W2.shape[1], X2.shape[1])
        dX = _to_batch_first(xp, xp.matmul(W2, cols), None, N, spatial)
        dW = xp.matmul(X2, cols.T).reshape(W.shape)
        db = None if b is None else dY.sum(axis=(0, *range(2, dY.ndim)))
        return dX, dW, db
    return Y, backprop


# --- argument checks ------------------------------------------------------------------------------
def _use_bias(use_bias) -> bool:
    if not isinstance(use_bias, (bool, np.bool_)):
        raise ValueError(f"use_bias must be True or False, got {use_bias!r}")
    return bool(use_bias)


def _conv_padding(padding, rank, kernel, strides, dilation):
    """``(config value, ((lo, hi), ...))`` for ``"valid"``, ``"same"``, an int or a tuple."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return "valid", ((0, 0),) * rank
        if mode == "same":
            if any(s != 1 for s in strides):
                raise ValueError(f"padding='same' needs strides=1 (as in PyTorch), got "
                                 f"strides={strides}; pass an explicit padding instead")
            # PyTorch's rule: the odd extra pixel of an even kernel goes to the high side
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return "same", tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"padding must be 'valid', 'same', an integer or a tuple of {rank} "
                         f"integers >= 0, got {padding!r}")
    pad = int_tuple(padding, rank, "padding", minimum=0)
    return pad, tuple((p, p) for p in pad)


class _ConvBase(ActivationOutput, Layer):
    """Arguments, weights and config shared by the convolution layers (not registered)."""

    rank = 2

    def __init__(self, filters, kernel_size, strides=1, dilation=1, use_bias=True,
                 activation=None, kernel_initializer="he_uniform", bias_initializer="zeros", *,
                 input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.filters = positive_int(filters, "filters")
        self.kernel_size = int_tuple(kernel_size, self.rank, "kernel_size")
        self.strides = int_tuple(strides, self.rank, "strides")
        self.dilation = int_tuple(dilation, self.rank, "dilation")
        self.use_bias = _use_bias(use_bias)
        self.activation = get_activation(activation)
        self.kernel_initializer = get_initializer(kernel_initializer, "kernel_initializer")
        self.bias_initializer = get_initializer(bias_initializer, "bias_initializer")
        # the identity is skipped in forward rather than called
        self._act = None if self.activation.activation == "linear" else self.activation

    def _input_channels(self, input_shape) -> int:
        if len(input_shape) != self.rank + 1:
            raise ValueError(f"{self.describe()} needs a per-sample input shape (channels, "
                             f"{SPATIAL_AXES[self.rank]}), got {tuple(input_shape)}")
        return int(input_shape[0])

    def _check_output(self, out, spatial):
        if any(o < 1 for o in out):
            raise ValueError(f"{self.describe()}: input {SPATIAL_AXES[self.rank]} {tuple(spatial)} "
                             f"give an empty output {tuple(out)}; use a larger input, more "
                             f"padding or a smaller kernel_size/dilation")
        self.activation.compute_output_shape((self.filters, *out))  # validates a softmax axis

    def _require_shape(self):
        if self.input_shape is None:
            raise ValueError(f"{self.describe()} has no input shape yet: call build(input_shape) "
                             f"or pass input_shape=")

    def init_params(self, rng, dtype=np.float32):
        shapes = self.param_shapes()
        params = {"W": initialize(self.kernel_initializer, rng, shapes["W"], dtype)}
        if self.use_bias:
            params["b"] = initialize(self.bias_initializer, rng, shapes["b"], dtype)
        return params

    def _check_input(self, X, channels):
        if X.ndim != self.rank + 2:
            raise ValueError(f"{self.describe()} expects a batch of inputs (batch, channels, "
                             f"{SPATIAL_AXES[self.rank]}), got shape {tuple(X.shape)}")
        if X.shape[1] != channels:
            raise ValueError(f"{self.describe()} expects inputs with {channels} channels "
                             f"(axis 1), got {X.shape[1]}")

    def _activate(self, Z, conv_backprop, act):
        Y, act_backprop = (Z, None) if act is None else act.apply(Z)

        def backprop(dY):
            dX, dW, db = conv_backprop(dY if act_backprop is None else act_backprop(dY))
            grads = {"W": dW}
            if self.use_bias:
                grads["b"] = db
            return dX, grads
        return Y, backprop

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": list(self.strides),
            "dilation": list(self.dilation),
            "use_bias": self.use_bias,
            "activation": activation_config(self.activation),
            "kernel_initializer": self.kernel_initializer,
            "bias_initializer": self.bias_initializer,
        }


class _Conv(_ConvBase):
    """A convolution of any rank; Conv1D and Conv2D pin ``rank``."""

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation=1, groups=1,
                 use_bias=True, activation=None, kernel_initializer="he_uniform",
                 bias_initializer="zeros", *, input_shape=None, name=None):
        super().__init__(filters, kernel_size, strides, dilation, use_bias, activation,
                         kernel_initializer, bias_initializer, input_shape=input_shape, name=name)
        self.groups = positive_int(groups, "groups")
        if self.filters % self.groups:
            raise ValueError(f"groups={self.groups} must divide filters={self.filters}")
        self.padding, self._pads = _conv_padding(padding, self.rank, self.kernel_size,
                                                 self.strides, self.dilation)

    def _out(self, spatial):
        return tuple(conv_output_size(n, k, s, d, p) for n, k, s, d, p in
                     zip(spatial, self.kernel_size, self.strides, self.dilation, self._pads))

    def compute_output_shape(self, input_shape):
        channels = self._input_channels(input_shape)
        if channels % self.groups:
            raise ValueError(f"{self.describe()}: groups={self.groups} must divide the input "
                             f"channels, got {channels}")
        out = self._out(input_shape[1:])
        self._check_output(out, input_shape[1:])
        return (self.filters, *out)

    def param_shapes(self):
        self._require_shape()
        shapes = {"W": (self.filters, self.input_shape[0] // self.groups, *self.kernel_size)}
        if self.use_bias:
            shapes["b"] = (self.filters,)
        return shapes

    def _forward(self, params, X, act):
        W = params["W"]
        self._check_input(X, W.shape[1] * self.groups)
        self._check_output(self._out(X.shape[2:]), X.shape[2:])
        Z, conv_backprop = conv_nd(X, W, params.get("b") if self.use_bias else None,
                                   self.strides, self.dilation, self._pads, self.groups)
        return self._activate(Z, conv_backprop, act)

    def get_config(self):
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {**super().get_config(), "padding": padding, "groups": self.groups}


@register
class Conv2D(_Conv):
    """2-D convolution (cross-correlation, as PyTorch) over NCHW inputs, with an optional fused
    activation.

    ``Y[n, o, i, j] = f(b[o] + sum_{c, u, v} W[o, c, u, v] * Xpad[n, g Cg + c, i sh + u dh,
    j sw + v dw])`` with ``g`` the group of ``o`` and ``Cg = C_in / groups``.
    ``W`` has ``torch.nn.Conv2d``'s layout ``(filters, C_in / groups, kh, kw)``.

    Args:
        filters: output channels ``C_out``, a positive integer divisible by ``groups``.
        kernel_size: ``k`` or ``(kh, kw)``.
        strides: ``s`` or ``(sh, sw)``.
        padding: ``"valid"`` (none), ``"same"`` (output size = input size; strides 1 only, the
            odd pixel of an even dilated kernel on the bottom/right, as PyTorch), ``p`` or
            ``(ph, pw)`` zeros on both sides.
        dilation: ``d`` or ``(dh, dw)``: spacing of the kernel taps.
        groups: split the channels into this many independent convolutions (``C_in`` and
            ``filters`` divisible by it; ``groups = C_in`` is a depthwise convolution).
        use_bias: add the bias ``b``.
        activation: fused activation (see ``rddtensor.layers.activations.get_activation``).
        kernel_initializer: name in ``rddtensor.layers.initializers.INITIALIZERS`` for ``W`` (fans from
            the PyTorch layout: ``fan_in = C_in / groups * kh * kw``).
        bias_initializer: the same for ``b``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C_in, H, W)``, output ``(batch, filters, H_out, W_out)`` with
        ``H_out = (H + 2 ph - dh (kh - 1) - 1) // sh + 1``; params ``W``
        ``(filters, C_in / groups, kh, kw)`` and ``b`` ``(filters,)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.conv import Conv2D
        >>> conv = Conv2D(4, 3, padding="same", activation="relu")
        >>> conv.build((2, 8, 8))
        (4, 8, 8)
        >>> params = conv.init_params(np.random.default_rng(0))
        >>> Y, backprop = conv.forward(params, np.ones((5, 2, 8, 8), np.float32))
        >>> dX, grads = backprop(np.ones_like(Y))
        >>> Y.shape, dX.shape, grads["W"].shape
        ((5, 4, 8, 8), (5, 2, 8, 8), (4, 2, 3, 3))
    """

    rank = 2


@register
class Conv1D(_Conv):
    """1-D convolution (cross-correlation, as PyTorch) over ``(batch, channels, length)``.

    ``Y[n, o, i] = f(b[o] + sum_{c, u} W[o, c, u] * Xpad[n, g Cg + c, i s + u d])``;
    ``W`` has ``torch.nn.Conv1d``'s layout ``(filters, C_in / groups, k)``.

    Args:
        filters, kernel_size, strides, padding, dilation, groups, use_bias, activation,
        kernel_initializer, bias_initializer, input_shape, name: as ``Conv2D``, with one int
        (or a 1-tuple) per argument.

    Shape:
        input ``(batch, C_in, L)``, output ``(batch, filters, L_out)`` with
        ``L_out = (L + 2 p - d (k - 1) - 1) // s + 1``; params ``W`` ``(filters, C_in / groups,
        k)`` and ``b`` ``(filters,)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.conv import Conv1D
        >>> conv = Conv1D(3, 5, strides=2)
        >>> conv.build((2, 20))
        (3, 8)
        >>> params = conv.init_params(np.random.default_rng(0))
        >>> conv(params, np.ones((4, 2, 20), np.float32)).shape
        (4, 3, 8)
    """

    rank = 1


@register
class Conv2DTranspose(_ConvBase):
    """Transposed 2-D convolution ("deconvolution"), as ``torch.nn.ConvTranspose2d`` (groups=1).

    The adjoint of ``Conv2D`` with the same kernel, strides, padding and dilation: every input
    pixel adds ``X[n, c, i, j] * W[c, o, :, :]`` to the output window at ``(i sh - ph,
    j sw - pw)``, then ``Y = f(that + b)``. ``W`` has PyTorch's layout ``(C_in, filters, kh, kw)``.

    Args:
        filters: output channels ``C_out``.
        kernel_size, strides, dilation: ``k`` or ``(kh, kw)`` and so on, as ``Conv2D``.
        padding: ``p`` or ``(ph, pw)``: rows/columns cropped from each side of the full output.
        output_padding: ``op`` or ``(oph, opw)`` added to the bottom/right of the output, each
            smaller than its stride (it picks among the input sizes a stride maps to one size).
        use_bias, activation, kernel_initializer, bias_initializer, input_shape, name: as
            ``Conv2D``.

    Shape:
        input ``(batch, C_in, H, W)``, output ``(batch, filters, H_out, W_out)`` with
        ``H_out = (H - 1) sh - 2 ph + dh (kh - 1) + oph + 1``; params ``W``
        ``(C_in, filters, kh, kw)`` and ``b`` ``(filters,)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.conv import Conv2DTranspose
        >>> up = Conv2DTranspose(3, 3, strides=2, padding=1, output_padding=1)
        >>> up.build((8, 4, 4))
        (3, 8, 8)
        >>> params = up.init_params(np.random.default_rng(0))
        >>> up(params, np.ones((2, 8, 4, 4), np.float32)).shape
        (2, 3, 8, 8)
    """

    rank = 2

    def __init__(self, filters, kernel_size, strides=1, padding=0, output_padding=0, dilation=1,
                 use_bias=True, activation=None, kernel_initializer="he_uniform",
                 bias_initializer="zeros", *, input_shape=None, name=None):
        super().__init__(filters, kernel_size, strides, dilation, use_bias, activation,
                         kernel_initializer, bias_initializer, input_shape=input_shape, name=name)
        self.padding = int_tuple(padding, self.rank, "padding", minimum=0)
        self.output_padding = int_tuple(output_padding, self.rank, "output_padding", minimum=0)
        if any(op >= s for op, s in zip(self.output_padding, self.strides)):
            raise ValueError(f"output_padding must be smaller than strides on every axis, got "
                             f"output_padding={self.output_padding}, strides={self.strides}")

    def _out(self, spatial):
        return tuple(conv_transpose_output_size(n, k, s, d, p, op) for n, k, s, d, p, op in
                     zip(spatial, self.kernel_size, self.strides, self.dilation, self.padding,
                         self.output_padding))

    def compute_output_shape(self, input_shape):
        self._input_channels(input_shape)
        out = self._out(input_shape[1:])
        self._check_output(out, input_shape[1:])
        return (self.filters, *out)

    def param_shapes(self):
        self._require_shape()
        shapes = {"W": (self.input_shape[0], self.filters, *self.kernel_size)}
        if self.use_bias:
            shapes["b"] = (self.filters,)
        return shapes

    def _forward(self, params, X, act):
        W = params["W"]
        self._check_input(X, W.shape[0])
        self._check_output(self._out(X.shape[2:]), X.shape[2:])
        Z, conv_backprop = conv_transpose_nd(X, W, params.get("b") if self.use_bias else None,
                                             self.strides, self.dilation, self.padding,
                                             self.output_padding)
        return self._activate(Z, conv_backprop, act)

    def get_config(self):
        return {**super().get_config(), "padding": list(self.padding),
                "output_padding": list(self.output_padding)}
