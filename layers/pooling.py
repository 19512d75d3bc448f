"""Pooling and upsampling layers: MaxPool1D/2D, AvgPool2D, GlobalAvgPool2D, UpSampling2D, and the
sequence poolings GlobalAveragePooling1D / GlobalMaxPooling1D.

Channels-first like the convolutions (``(batch, channels, length)``, NCHW) and numerically what
PyTorch's ``max_pool1d/2d``, ``avg_pool2d``, ``adaptive_avg_pool2d(1)`` and
``interpolate(mode="nearest")`` compute. No parameters. The global 1-D poolings default to
channels-last sequences ``(batch, time, features)`` (what ``Embedding``, the recurrent layers and
the attention layers output; Keras' default) and take ``data_format="channels_first"`` after a
``Conv1D``. The window work is vectorised over batch,
channels and pixels; the only Python loops run over the offsets inside one pooling window.
"""
from __future__ import annotations

import math

import numpy as np

from rddtensor.layers.base import Layer, mask_value_arg, register
from rddtensor.layers.im2col import (SPATIAL_AXES, conv_output_size, crop_spatial, int_tuple, offset_slices,
                           pad_spatial, window_view)
from rddtensor.backend import get_array_module

__all__ = ["MaxPool1D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "GlobalAveragePooling2D",
           "GlobalAveragePooling1D", "GlobalMaxPooling1D", "UpSampling2D", "max_pool_nd",
           "avg_pool_nd"]

# --- the pure functions ---------------------------------------------------------------------------
def _all(sl):
    return (slice(None), slice(None), *sl)


def max_pool_nd(X, kernel, strides, padding):
    """Max over each window, as PyTorch's ``max_pool{1,2}d``; returns ``(Y, backprop)``.

    ``Y[n, c, p] = max_k Xpad[n, c, p s + k]`` with ``-inf`` padding. The gradient goes to the
    arg-max of each window, the first one in row-major window order on ties (as PyTorch);
    overlapping windows add up.
    """
    xp = get_array_module(X)
    pads = tuple((p, p) for p in padding)
    r = len(kernel)
    ones = (1,) * r
    out = tuple(conv_output_size(n, k, s, 1, p) for n, k, s, p in
                zip(X.shape[2:], kernel, strides, pads))
    Xp = pad_spatial(X, pads, value=-np.inf)
    x_shape, padded_shape = X.shape, Xp.shape  # backprop keeps shapes, not arrays
    windows = window_view(Xp, kernel, strides, ones, out)
    K = math.prod(kernel)
    windows = windows.reshape(*windows.shape[:2 + r], K)  # one copy: (N, C, *out, K)
    idx = windows.argmax(axis=-1)  # first maximum on ties; a NaN wins, as in PyTorch
    Y = xp.take_along_axis(windows, idx[..., None], axis=-1)[..., 0]
    idx = idx.astype(np.uint8 if K < 256 else np.int32)  # kept for backprop: keep it small

    def backprop(dY):
        dXp = xp.zeros(padded_shape, dtype=dY.dtype)
        for i, sl in offset_slices(kernel, strides, ones, out):
            dXp[_all(sl)] += xp.where(idx == i, dY, 0)
        return crop_spatial(dXp, pads, x_shape), {}
    return Y, backprop


def avg_pool_nd(X, kernel, strides, padding, count_include_pad=True):
    """Mean over each window, as PyTorch's ``avg_pool{1,2}d``; returns ``(Y, backprop)``.

    ``Y[n, c, p] = sum_k Xpad[n, c, p s + k] / D`` with zero padding, ``D = prod(kernel)`` when
    ``count_include_pad`` else the number of real (unpadded) inputs in the window.
    """
    xp = get_array_module(X)
    pads = tuple((p, p) for p in padding)
    ones = (1,) * len(kernel)
    out = tuple(conv_output_size(n, k, s, 1, p) for n, k, s, p in
                zip(X.shape[2:], kernel, strides, pads))
    Xp = pad_spatial(X, pads)
    x_shape, padded_shape = X.shape, Xp.shape  # backprop keeps shapes, not arrays
    offsets = list(offset_slices(kernel, strides, ones, out))
    S = xp.zeros((*X.shape[:2], *out), dtype=X.dtype)
    for _, sl in offsets:
        S += Xp[_all(sl)]
    if count_include_pad or not any(padding):
        D = float(math.prod(kernel))
    else:
        real = pad_spatial(xp.ones((1, 1, *X.shape[2:]), dtype=X.dtype), pads)
        D = sum(real[_all(sl)] for _, sl in offsets)
    Y = S / D

    def backprop(dY):
        dS = dY / D
        dXp = xp.zeros(padded_shape, dtype=dS.dtype)
        for _, sl in offsets:
            dXp[_all(sl)] += dS
        return crop_spatial(dXp, pads, x_shape), {}
    return Y, backprop


# --- layers ---------------------------------------------------------------------------------------
class _Pool(Layer):
    """Window arguments, shapes and config shared by the pooling layers (not registered)."""

    rank = 2

    def __init__(self, pool_size=2, strides=None, padding=0, *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.pool_size = int_tuple(pool_size, self.rank, "pool_size")
        self.strides = self.pool_size if strides is None else int_tuple(strides, self.rank,
                                                                        "strides")
        self.padding = int_tuple(padding, self.rank, "padding", minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.pool_size)):
            raise ValueError(f"padding must be at most half of pool_size (as in PyTorch), got "
                             f"padding={self.padding}, pool_size={self.pool_size}")

    def _out(self, spatial):
        return tuple(conv_output_size(n, k, s, 1, (p, p)) for n, k, s, p in
                     zip(spatial, self.pool_size, self.strides, self.padding))

    def _check_spatial(self, spatial):
        out = self._out(spatial)
        if any(o < 1 for o in out):
            raise ValueError(f"{self.describe()}: input {SPATIAL_AXES[self.rank]} {tuple(spatial)} "
                             f"are smaller than pool_size {self.pool_size} (with padding "
                             f"{self.padding})")
        return out

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape)
        return (input_shape[0], *self._check_spatial(input_shape[1:]))

    def _check_input(self, X):
        _check_batch(self, X)
        self._check_spatial(X.shape[2:])

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size),
                "strides": list(self.strides), "padding": list(self.padding)}


def _check_rank(layer, input_shape):
    if len(input_shape) != layer.rank + 1:
        raise ValueError(f"{layer.describe()} needs a per-sample input shape (channels, "
                         f"{SPATIAL_AXES[layer.rank]}), got {tuple(input_shape)}")


def _check_batch(layer, X):
    if X.ndim != layer.rank + 2:
        raise ValueError(f"{layer.describe()} expects a batch of inputs (batch, channels, "
                         f"{SPATIAL_AXES[layer.rank]}), got shape {tuple(X.shape)}")
    if layer.input_shape is not None and X.shape[1] != layer.input_shape[0]:
        raise ValueError(f"{layer.describe()} expects inputs with {layer.input_shape[0]} "
                         f"channels (axis 1), got {X.shape[1]}")


class _MaxPool(_Pool):
    def forward(self, params, X, training=False, rng=None):
        self._check_input(X)
        return max_pool_nd(X, self.pool_size, self.strides, self.padding)


@register
class MaxPool2D(_MaxPool):
    """2-D max pooling over NCHW inputs: ``Y[n, c, i, j] = max of the window at (i sh, j sw)``.

    Padding is ``-inf`` (it never wins). The gradient flows to each window's maximum, the first
    in row-major order on ties, as ``torch.nn.functional.max_pool2d``.

    Args:
        pool_size: ``k`` or ``(kh, kw)``.
        strides: ``s`` or ``(sh, sw)``; ``None`` means ``pool_size`` (non-overlapping windows).
        padding: ``p`` or ``(ph, pw)`` on both sides, at most half of ``pool_size``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C, H, W)``, output ``(batch, C, H_out, W_out)`` with
        ``H_out = (H + 2 ph - kh) // sh + 1``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import MaxPool2D
        >>> X = np.arange(16.0).reshape(1, 1, 4, 4)
        >>> MaxPool2D(2)(None, X)
        array([[[[ 5.,  7.],
                 [13., 15.]]]])
    """

    rank = 2


@register
class MaxPool1D(_MaxPool):
    """1-D max pooling over ``(batch, channels, length)``, as ``torch.nn.functional.max_pool1d``.

    ``Y[n, c, i] = max_u Xpad[n, c, i s + u]``; gradient to the first maximum of each window.

    Args:
        pool_size, strides, padding: one int (or a 1-tuple) each, as ``MaxPool2D``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C, L)``, output ``(batch, C, (L + 2 p - k) // s + 1)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import MaxPool1D
        >>> MaxPool1D(3, strides=1)(None, np.array([[[1.0, 3.0, 2.0, 0.0]]]))
        array([[[3., 3.]]])
    """

    rank = 1


@register
class AvgPool2D(_Pool):
    """2-D average pooling over NCHW inputs: the mean of each window, as ``avg_pool2d``.

    ``Y[n, c, i, j] = sum_{u, v} Xpad[n, c, i sh + u, j sw + v] / D`` with zero padding and
    ``D = kh * kw`` (``count_include_pad=True``, PyTorch's default) or the number of unpadded
    inputs in the window.

    Args:
        pool_size, strides, padding: as ``MaxPool2D``.
        count_include_pad: count padded zeros in the divisor.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C, H, W)``, output ``(batch, C, H_out, W_out)`` as ``MaxPool2D``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import AvgPool2D
        >>> AvgPool2D(2)(None, np.arange(16.0).reshape(1, 1, 4, 4))
        array([[[[ 2.5,  4.5],
                 [10.5, 12.5]]]])
    """

    rank = 2

    def __init__(self, pool_size=2, strides=None, padding=0, count_include_pad=True, *,
                 input_shape=None, name=None):
        super().__init__(pool_size, strides, padding, input_shape=input_shape, name=name)
        if not isinstance(count_include_pad, (bool, np.bool_)):
            raise ValueError(f"count_include_pad must be True or False, got {count_include_pad!r}")
        self.count_include_pad = bool(count_include_pad)

    def forward(self, params, X, training=False, rng=None):
        self._check_input(X)
        return avg_pool_nd(X, self.pool_size, self.strides, self.padding, self.count_include_pad)

    def get_config(self):
        return {**super().get_config(), "count_include_pad": self.count_include_pad}


@register
class GlobalAvgPool2D(Layer):
    """Mean over all pixels of each channel: ``Y[n, c] = mean_{i, j} X[n, c, i, j]``.

    ``adaptive_avg_pool2d(X, 1)`` flattened: the output drops the spatial axes.

    Args:
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C, H, W)``, output ``(batch, C)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import GlobalAvgPool2D
        >>> GlobalAvgPool2D()(None, np.arange(8.0).reshape(1, 2, 2, 2))
        array([[1.5, 5.5]])
    """

    rank = 2

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape)
        return (input_shape[0],)

    def forward(self, params, X, training=False, rng=None):
        _check_batch(self, X)
        xp = get_array_module(X)
        shape = X.shape
        Y = X.mean(axis=(2, 3))

        def backprop(dY):
            dX = xp.empty(shape, dtype=dY.dtype)
            dX[...] = (dY / (shape[2] * shape[3]))[:, :, None, None]
            return dX, {}
        return Y, backprop


#: Keras' name for ``GlobalAvgPool2D`` (the same class: configs keep saying ``GlobalAvgPool2D``)
GlobalAveragePooling2D = GlobalAvgPool2D

DATA_FORMATS = ("channels_last", "channels_first")


class _GlobalPool1D(Layer):
    """Shared arguments, shapes and masks of the global 1-D poolings (not registered)."""

    def __init__(self, data_format="channels_last", mask_value=None, *, input_shape=None,
                 name=None):
        super().__init__(input_shape=input_shape, name=name)
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be 'channels_last' (batch, time, features) or "
                             f"'channels_first' (batch, channels, length), got {data_format!r}")
        self.data_format = data_format
        self.mask_value = mask_value_arg(mask_value)

    @property
    def _axes(self):
        """``(time axis, feature axis)`` of the full ``(batch, ...)`` array."""
        return (1, 2) if self.data_format == "channels_last" else (2, 1)

    def _layout(self):
        return ("(batch, time, features)" if self.data_format == "channels_last"
                else "(batch, channels, length)")

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"{self.describe()} needs a per-sample input shape "
                             f"{self._layout().replace('batch, ', '')}, got {tuple(input_shape)}")
        return (input_shape[self._axes[1] - 1],)

    def _check_input(self, X):
        if X.ndim != 3:
            raise ValueError(f"{self.describe()} expects a batch of inputs {self._layout()}, got "
                             f"shape {tuple(X.shape)}")
        if self.input_shape is not None:
            want = self.input_shape[self._axes[1] - 1]
            if X.shape[self._axes[1]] != want:
                raise ValueError(f"{self.describe()} expects inputs with {want} features (axis "
                                 f"{self._axes[1]}), got shape {tuple(X.shape)}")

    def _valid(self, X):
        """``(batch, time, 1)`` or ``(batch, 1, length)`` booleans of the real steps, or None."""
        if self.mask_value is None:
            return None
        xp = get_array_module(X)
        valid = xp.any(X != self.mask_value, axis=self._axes[1], keepdims=True)
        return None if bool(valid.all()) else valid

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format,
                "mask_value": self.mask_value}


@register
class GlobalAveragePooling1D(_GlobalPool1D):
    """Mean over the time axis: ``Y[n, f] = mean_t X[n, t, f]`` (Keras' ``GlobalAveragePooling1D``).

    With ``mask_value=v`` a step whose features all equal ``v`` is padding and the mean is over
    the real steps only (``sum_t valid X / count``; a row of padding only gives zeros), as Keras
    does with a mask: ``Embedding(padding_idx=0)`` -> ... -> ``GlobalAveragePooling1D(
    mask_value=0.0)`` averages the tokens, not the padding.

    Args:
        data_format: ``"channels_last"`` (``(batch, time, features)``, default) or
            ``"channels_first"`` (``(batch, channels, length)``, what ``Conv1D`` outputs).
        mask_value: ``None`` or the feature value of padded steps.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, T, F)`` (or ``(batch, F, T)``), output ``(batch, F)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import GlobalAveragePooling1D
        >>> X = np.array([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
        >>> GlobalAveragePooling1D()(None, X), GlobalAveragePooling1D(mask_value=0.0)(None, X)
        (array([[1.33333333, 2.        ]]), array([[2., 3.]]))
    """

    def forward(self, params, X, training=False, rng=None):
        self._check_input(X)
        xp = get_array_module(X)
        t = self._axes[0]
        shape, T = X.shape, X.shape[t]
        valid = self._valid(X)
        if valid is None:
            Y = X.mean(axis=t)
            scale = 1.0 / max(T, 1)
        else:
            count = valid.sum(axis=t, keepdims=True)
            scale = (1.0 / xp.maximum(count, 1)).astype(X.dtype, copy=False)  # (batch, 1, 1)
            Y = (X * valid).sum(axis=t) * xp.squeeze(scale, axis=t)

        def backprop(dY):
            g = xp.expand_dims(dY, t) * scale
            if valid is not None:
                g = g * valid
            return xp.broadcast_to(g, shape).astype(dY.dtype, copy=True), {}
        return Y, backprop


@register
class GlobalMaxPooling1D(_GlobalPool1D):
    """Maximum over the time axis: ``Y[n, f] = max_t X[n, t, f]`` (Keras' ``GlobalMaxPooling1D``).

    The gradient goes to the first maximum along time (as ``torch.max(dim=...)``). With
    ``mask_value=v`` padded steps (all features equal to ``v``) never win; a row of padding only
    gives zeros.

    Args:
        data_format: ``"channels_last"`` (``(batch, time, features)``, default) or
            ``"channels_first"`` (``(batch, channels, length)``).
        mask_value: ``None`` or the feature value of padded steps.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, T, F)`` (or ``(batch, F, T)``), output ``(batch, F)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import GlobalMaxPooling1D
        >>> GlobalMaxPooling1D()(None, np.array([[[1.0, -2.0], [3.0, -4.0]]]))
        array([[ 3., -2.]])
    """

    def forward(self, params, X, training=False, rng=None):
        self._check_input(X)
        xp = get_array_module(X)
        t = self._axes[0]
        shape = X.shape
        valid = self._valid(X)
        Xm = X if valid is None else xp.where(valid, X, -xp.inf)
        idx = xp.expand_dims(xp.argmax(Xm, axis=t), t)  # first maximum; NaN wins, as PyTorch
        Y = xp.squeeze(xp.take_along_axis(X, idx, axis=t), axis=t)
        if valid is not None:
            any_real = xp.squeeze(valid.any(axis=t, keepdims=True), axis=t)
            Y = Y * any_real  # a row of padding only: 0
        else:
            any_real = None

        def backprop(dY):
            dX = xp.zeros(shape, dtype=dY.dtype)
            g = dY if any_real is None else dY * any_real
            xp.put_along_axis(dX, idx, xp.expand_dims(g, t), axis=t)
            return dX, {}
        return Y, backprop


@register
class UpSampling2D(Layer):
    """Nearest-neighbour upsampling: ``Y[n, c, i, j] = X[n, c, i // sh, j // sw]``, integer factors.

    What ``torch.nn.functional.interpolate(X, scale_factor=size, mode="nearest")`` computes for
    integer factors. Backward sums each ``sh x sw`` block of ``dY``.

    Args:
        size: ``s`` or ``(sh, sw)``, positive integers.
        interpolation: ``"nearest"`` (the only mode).
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C, H, W)``, output ``(batch, C, H sh, W sw)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.pooling import UpSampling2D
        >>> UpSampling2D(2)(None, np.array([[[[1.0, 2.0]]]]))
        array([[[[1., 1., 2., 2.],
                 [1., 1., 2., 2.]]]])
    """

    rank = 2

    def __init__(self, size=2, interpolation="nearest", *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.size = int_tuple(size, self.rank, "size")
        if interpolation != "nearest":
            raise ValueError(f"interpolation must be 'nearest', got {interpolation!r}")
        self.interpolation = interpolation

    def compute_output_shape(self, input_shape):
        _check_rank(self, input_shape)
        C, H, W = input_shape
        return (C, H * self.size[0], W * self.size[1])

    def forward(self, params, X, training=False, rng=None):
        _check_batch(self, X)
        xp = get_array_module(X)
        N, C, H, W = X.shape
        sh, sw = self.size
        Y = xp.broadcast_to(X[:, :, :, None, :, None], (N, C, H, sh, W, sw)).reshape(
            N, C, H * sh, W * sw)  # reshape of a broadcast view: one copy

        def backprop(dY):
            return dY.reshape(N, C, H, sh, W, sw).sum(axis=(3, 5)), {}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "size": list(self.size),
                "interpolation": self.interpolation}
