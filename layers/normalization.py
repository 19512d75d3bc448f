"""Normalization layers: ``BatchNorm`` (running statistics kept as buffers) and ``LayerNorm``.

Both normalise ``X`` to zero mean and unit variance over some axes and then scale and shift it,
``Y = (X - mean) / sqrt(var + eps) * W + b``; they differ in which axes the statistics are taken
over (every axis but the channel axis for BatchNorm, the last axes of each sample for LayerNorm).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from rddtensor.layers.base import Layer, flag, register, shape_tuple
from rddtensor.backend import get_array_module

__all__ = ["BatchNorm", "LayerNorm"]


def _real(value, what, ok, rule):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not ok(value)):
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return float(value)



def _normalize(xp, X, axes, eps):
    """``(Xhat, inv_std, mean, var)`` over ``axes`` (biased variance, kept dims)."""
    mean = X.mean(axis=axes, keepdims=True)
    Xc = X - mean
    var = (Xc * Xc).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    return Xc * inv_std, inv_std, mean, var


def _normalize_backward(dXhat, Xhat, inv_std, axes, sum_dXhat=None, sum_dXhat_Xhat=None):
    """``dX`` of ``Xhat = (X - mean(X)) * inv_std`` with batch statistics over ``axes``:
    ``dX = inv_std * (dXhat - mean(dXhat) - Xhat * mean(dXhat * Xhat))``."""
    count = max(Xhat.size // max(inv_std.size, 1), 1)  # values per statistic (1 if empty)
    if sum_dXhat is None:
        sum_dXhat = dXhat.sum(axis=axes, keepdims=True)
    if sum_dXhat_Xhat is None:
        sum_dXhat_Xhat = (dXhat * Xhat).sum(axis=axes, keepdims=True)
    return (dXhat - sum_dXhat / count - Xhat * (sum_dXhat_Xhat / count)) * inv_std


@register
class BatchNorm(Layer):
    """Batch normalization over every axis but the channel axis (``torch.nn.BatchNorm1d/2d/3d``).

    Training: ``Y = (X - mean_B) / sqrt(var_B + eps) * W + b`` with the mean and the biased
    variance of this batch per channel, and the running statistics move towards the batch's:
    ``running = (1 - momentum) * running + momentum * stat_B`` (the *unbiased* variance for
    ``running_var``, as PyTorch). Evaluation: the running statistics replace the batch's.

    ``running_mean`` and ``running_var`` are buffers (``buffer_shapes``): they live in the model's
    flat vector, and in training mode ``backprop`` returns under their keys the change this batch
    makes, ``new_running - running``, which the training step adds (see ``Layer.buffer_shapes``).

    Distributed training (an RDD or DataFrame ``fit``): each partition normalises with the
    statistics of its own rows of the global mini-batch (per-partition BatchNorm, as PyTorch DDP
    without ``SyncBatchNorm``), so the trainable weights follow per-partition statistics. The
    running statistics are updated with the batch-share-weighted average of the partitions'
    statistics, ``running += momentum * sum_j (n_j / n) * (stat_j - running)``, and are identical
    on every partition. With one partition (or in-process) this is exactly PyTorch's BatchNorm.
    A partition with no rows in a step contributes the current running value (a change of 0), and
    so does a partition with a single value per channel for the variance, where the unbiased
    variance is undefined (PyTorch refuses such a batch in training; here the output is ``b``).

    Args:
        momentum: weight of the batch statistic in the running average, in ``[0, 1]``.
        eps: added to the variance, > 0.
        affine: learn the per-channel scale ``W`` (init 1) and shift ``b`` (init 0).
        axis: the channel axis of the full ``(batch, ...)`` array; 1 is PyTorch's NC / NCL /
            NCHW, -1 channels-last. Never the batch axis.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, C)`` or ``(batch, C, *spatial)`` (channel axis ``axis``), output the same;
        params ``W``, ``b`` and buffers ``running_mean`` (init 0), ``running_var`` (init 1),
        all ``(C,)``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> bn = L.BatchNorm()
        >>> bn.build((3,))
        (3,)
        >>> params = bn.init_params(np.random.default_rng(0))
        >>> X = np.arange(12, dtype=np.float32).reshape(4, 3)
        >>> Y, backprop = bn.forward(params, X, training=True)
        >>> dX, grads = backprop(np.ones_like(Y))
        >>> np.round(Y[:, 0], 3)
        array([-1.342, -0.447,  0.447,  1.342], dtype=float32)
        >>> np.round(grads["running_mean"], 4)  # the change momentum * (mean - 0), not a gradient
        array([0.45, 0.55, 0.65], dtype=float32)
    """

    def __init__(self, momentum=0.1, eps=1e-5, affine=True, axis=1, *, input_shape=None,
                 name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.momentum = _real(momentum, "momentum", lambda x: 0 <= x <= 1, "a number in [0, 1]")
        self.eps = _real(eps, "eps", lambda x: x > 0, "a number > 0")
        self.affine = flag(affine, "affine")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise ValueError(f"axis must be an integer (the channel axis), got {axis!r}")
        self.axis = int(axis)

    def _channel_axis(self, ndim: int) -> int:
        if not -ndim <= self.axis < ndim or self.axis % ndim == 0:
            raise ValueError(f"{self.describe()}: axis {self.axis} must name a non-batch axis of "
                             f"inputs with {ndim} axes (batch, ...); use axis=1 for (batch, C, ...)"
                             f" or axis=-1 for channels-last")
        return self.axis % ndim

    def compute_output_shape(self, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"{self.describe()} needs a per-sample shape with a channel axis, "
                             f"(C,) or (C, *spatial), got {tuple(input_shape)}")
        self._channel_axis(len(input_shape) + 1)
        return input_shape

    @property
    def channels(self) -> int:
        if self.input_shape is None:
            raise ValueError(f"{self.describe()} has no input shape yet: call build(input_shape) "
                             f"or pass input_shape=")
        return self.input_shape[self._channel_axis(len(self.input_shape) + 1) - 1]

    def param_shapes(self):
        C = self.channels
        return {"W": (C,), "b": (C,)} if self.affine else {}

    def buffer_shapes(self):
        C = self.channels
        return {"running_mean": (C,), "running_var": (C,)}

    def init_params(self, rng, dtype=np.float32):
        C = self.channels
        params = {"W": np.ones(C, dtype), "b": np.zeros(C, dtype)} if self.affine else {}
        params.update(running_mean=np.zeros(C, dtype), running_var=np.ones(C, dtype))
        return params

    def forward(self, params, X, training=False, rng=None):
        ax = self._check_input(X)
        shape = [1] * X.ndim
        shape[ax] = X.shape[ax]
        axes = tuple(a for a in range(X.ndim) if a != ax)
        W = params["W"].reshape(shape) if self.affine else None
        b = params["b"].reshape(shape) if self.affine else None
        if training:
            return self._forward_train(params, X, W, b, shape, axes)
        xp = get_array_module(X)
        inv_std = 1.0 / xp.sqrt(params["running_var"].reshape(shape) + self.eps)
        Xhat = (X - params["running_mean"].reshape(shape)) * inv_std
        Y = Xhat * W + b if self.affine else Xhat

        def backprop(dY):
            grads = self._affine_grads(dY, Xhat, axes)
            grads.update(self._no_change(params))
            return dY * (inv_std * W if self.affine else inv_std), grads
        return Y.astype(X.dtype, copy=False), backprop

    def _forward_train(self, params, X, W, b, shape, axes):
        xp = get_array_module(X)
        count = X.size // int(np.prod(shape))  # values per channel in this local batch
        if count == 0:  # an empty local batch: nothing to normalise, nothing to learn
            def backprop_empty(dY):
                grads = {k: xp.zeros_like(params[k]) for k in ("W", "b") if self.affine}
                grads.update(self._no_change(params))
                return xp.zeros_like(dY), grads
            return xp.empty_like(X), backprop_empty
        Xhat, inv_std, mean, var = _normalize(xp, X, axes, self.eps)
        Y = Xhat * W + b if self.affine else Xhat
        changes = self._running_changes(xp, params, mean.reshape(-1), var.reshape(-1), count)

        def backprop(dY):
            grads = self._affine_grads(dY, Xhat, axes)
            if self.affine:  # reuse the sums: sum(dY*W) = W*db, sum(dY*W*Xhat) = W*dW
                Wc = params["W"]
                dX = _normalize_backward(dY * W, Xhat, inv_std, axes,
                                         (Wc * grads["b"]).reshape(inv_std.shape),
                                         (Wc * grads["W"]).reshape(inv_std.shape))
            else:
                dX = _normalize_backward(dY, Xhat, inv_std, axes)
            grads.update(changes)
            return dX, grads
        return Y, backprop

    def _running_changes(self, xp, params, mean, var, count):
        """``new - old`` of both running statistics (see the class docstring)."""
        m = self.momentum
        rm, rv = params["running_mean"], params["running_var"]
        new_mean = (1.0 - m) * rm + m * mean.astype(rm.dtype, copy=False)
        changes = {"running_mean": (new_mean - rm).astype(rm.dtype, copy=False)}
        if count > 1:
            unbiased = var.astype(rv.dtype, copy=False) * (count / (count - 1))
            new_var = (1.0 - m) * rv + m * unbiased
            changes["running_var"] = (new_var - rv).astype(rv.dtype, copy=False)
        else:  # one value per channel: no variance estimate, keep the running one
            changes["running_var"] = xp.zeros_like(rv)
        return changes

    def _affine_grads(self, dY, Xhat, axes):
        if not self.affine:
            return {}
        return {"W": (dY * Xhat).sum(axis=axes), "b": dY.sum(axis=axes)}

    @staticmethod
    def _no_change(params):
        xp = get_array_module(params["running_mean"])
        return {k: xp.zeros_like(params[k]) for k in ("running_mean", "running_var")}

    def _check_input(self, X) -> int:
        want = None if self.input_shape is None else len(self.input_shape) + 1
        if X.ndim < 2 or (want is not None and X.ndim != want):
            raise ValueError(f"{self.describe()} expects a batch of inputs (batch, C, ...) with "
                             f"{want or 'at least 2'} axes, got shape {tuple(X.shape)}")
        ax = self._channel_axis(X.ndim)
        if self.input_shape is not None and X.shape[ax] != self.channels:
            raise ValueError(f"{self.describe()} expects {self.channels} channels on axis "
                             f"{self.axis}, got shape {tuple(X.shape)}")
        return ax

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "eps": self.eps,
                "affine": self.affine, "axis": self.axis}


@register
class LayerNorm(Layer):
    """Layer normalization over the last axes of each sample (``torch.nn.LayerNorm``).

    ``Y = (X - mean) / sqrt(var + eps) * W + b`` with the mean and biased variance of each
    sample over its last ``len(normalized_shape)`` axes. No batch statistics: distributed training
    equals in-process training, and training and evaluation compute the same thing.

    Args:
        normalized_shape: the trailing per-sample shape to normalise over (an int or a tuple);
            ``None`` (default) is the last axis, ``(input_shape[-1],)``.
        eps: added to the variance, > 0.
        elementwise_affine: learn ``W`` (init 1) and ``b`` (init 0) of ``normalized_shape``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, ..., *normalized_shape)``, output the same; params ``W`` and ``b`` of
        shape ``normalized_shape``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> ln = L.LayerNorm()
        >>> ln.build((2,))
        (2,)
        >>> Y, _ = ln.forward(ln.init_params(np.random.default_rng(0)), np.array([[1.0, 3.0]]))
        >>> np.round(Y, 4)
        array([[-1.,  1.]])
    """

    def __init__(self, normalized_shape=None, eps=1e-5, elementwise_affine=True, *,
                 input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.normalized_shape = (None if normalized_shape is None
                                 else shape_tuple(normalized_shape, "normalized_shape"))
        self.eps = _real(eps, "eps", lambda x: x > 0, "a number > 0")
        self.elementwise_affine = flag(elementwise_affine, "elementwise_affine")

    def _norm_shape(self, input_shape) -> tuple:
        ns = self.normalized_shape or tuple(input_shape[-1:])
        if len(input_shape) < len(ns) or tuple(input_shape[len(input_shape) - len(ns):]) != ns:
            raise ValueError(f"{self.describe()}: normalized_shape {ns} must be the last axes of "
                             f"the per-sample input shape, got input shape {tuple(input_shape)}")
        return ns

    def compute_output_shape(self, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"{self.describe()} needs a per-sample shape with at least one axis, "
                             f"got {tuple(input_shape)}")
        self._norm_shape(input_shape)
        return input_shape

    def _shape(self) -> tuple:
        if self.input_shape is None:
            if self.normalized_shape is None:
                raise ValueError(f"{self.describe()} has no input shape yet: call "
                                 f"build(input_shape), pass input_shape= or normalized_shape=")
            return self.normalized_shape
        return self._norm_shape(self.input_shape)

    def param_shapes(self):
        ns = self._shape()
        return {"W": ns, "b": ns} if self.elementwise_affine else {}

    def init_params(self, rng, dtype=np.float32):
        ns = self._shape()
        return {"W": np.ones(ns, dtype), "b": np.zeros(ns, dtype)} if self.elementwise_affine else {}

    def forward(self, params, X, training=False, rng=None):
        ns = self._shape()
        k = len(ns)
        if X.ndim < k + 1 or tuple(X.shape[X.ndim - k:]) != ns:
            raise ValueError(f"{self.describe()} expects inputs (batch, ..., *{ns}), got shape "
                             f"{tuple(X.shape)}")
        xp = get_array_module(X)
        axes = tuple(range(X.ndim - k, X.ndim))
        lead = tuple(range(X.ndim - k))
        Xhat, inv_std, _, _ = _normalize(xp, X, axes, self.eps)
        affine = self.elementwise_affine
        Y = Xhat * params["W"] + params["b"] if affine else Xhat

        def backprop(dY):
            if not affine:
                return _normalize_backward(dY, Xhat, inv_std, axes), {}
            grads = {"W": (dY * Xhat).sum(axis=lead), "b": dY.sum(axis=lead)}
            return _normalize_backward(dY * params["W"], Xhat, inv_std, axes), grads
        return Y, backprop

    def get_config(self):
        cfg = {**super().get_config(), "eps": self.eps,
               "elementwise_affine": self.elementwise_affine}
        if self.normalized_shape is not None:
            cfg["normalized_shape"] = list(self.normalized_shape)
        return cfg
