"""Activation functions: pure forward functions with backprop closures, and thin layers over them.

Every activation is one module-level function ``f(X, **kwargs) -> (Y, backprop)`` with
``backprop(dY) -> dX``. Layers (``Activation``, ``ReLU``, ...), ``Dense(activation=...)`` and the
recurrent layers all call these same functions through ``activation_forward`` or
``Activation.apply``. Results keep the dtype of ``X`` (float32 stays float32): constants are Python
floats, which NumPy treats as weakly typed.

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.activations import activation_forward
    >>> Y, backprop = activation_forward("relu", np.array([[-1.0, 2.0]], np.float32))
    >>> Y, backprop(np.ones((1, 2), np.float32))
    (array([[0., 2.]], dtype=float32), array([[0., 1.]], dtype=float32))
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from rddtensor.layers.base import Layer, register
from rddtensor.backend import get_array_module
from rddtensor.ops import get_ops
from rddtensor.ops.numpy_ops import GELU_C as _GELU_C
from rddtensor.ops.numpy_ops import SQRT_2_OVER_PI as _SQRT_2_OVER_PI

__all__ = [
    "Activation", "ReLU", "LeakyReLU", "ELU", "GELU", "Sigmoid", "Tanh", "Softmax", "Linear",
    "get_activation", "activation_forward", "activation_config", "sigmoid", "softmax",
    "ACTIVATION_DEFAULTS",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --- array helpers (also used by recurrent layers and losses) ------------------------------------
def sigmoid(X):
    """Logistic function ``1 / (1 + exp(-X))`` without overflow for any finite ``X``."""
    xp = get_array_module(X)
    e = xp.exp(-xp.abs(X))  # in (0, 1]: never overflows
    return _sigmoid_pair(xp, X >= 0, e)[0]


def _sigmoid_pair(xp, nonneg, e):
    """``(sigmoid(v), sigmoid(-v))`` from ``nonneg = v >= 0`` and ``e = exp(-|v|)``.

    ``1 / (1 + e)`` for the larger and ``e / (1 + e)`` for the smaller, each without
    cancellation in float32 tails; the numerator ``max(e, v >= 0)`` picks 1 or ``e`` branch-free
    (the same bits as ``where``, which branches per element and mispredicts on mixed signs).
    """
    d = 1.0 + e
    return xp.maximum(e, nonneg) / d, xp.maximum(e, ~nonneg) / d


def softmax(X, axis: int = -1):
    """``exp(X) / sum(exp(X))`` along ``axis``, shifted by the maximum so it cannot overflow."""
    xp = get_array_module(X)
    e = xp.exp(X - X.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _identity_backprop(dY):
    return dY


# --- the activations: f(X, **kwargs) -> (Y, backprop) ---------------------------------------------
def _linear(X):
    return X, _identity_backprop


def _relu(X):
    ops = get_ops(X)
    Y = ops.xp.maximum(X, 0)

    def backprop(dY):
        return ops.relu_backward(dY, Y)  # gradient 0 at X == 0, as in PyTorch
    return Y, backprop


def _leaky_relu(X, negative_slope):
    xp = get_array_module(X)
    positive = X > 0
    Y = xp.where(positive, X, X * negative_slope)

    def backprop(dY):
        return dY * (positive + (~positive) * X.dtype.type(negative_slope))
    return Y, backprop


def _elu(X, alpha):
    xp = get_array_module(X)
    positive = X > 0
    # expm1 of min(X, 0) never overflows and is 0 where X > 0, so adding max(X, 0) selects
    # without where(), which branches per element
    Y = xp.expm1(xp.minimum(X, 0))
    Y *= alpha
    Y += xp.maximum(X, 0)

    def backprop(dY):
        # 1 where X > 0, else d/dX alpha*(e^X - 1) = Y + alpha; min(Y, 0) keeps an infinite
        # Y out of the product with the zero mask (and avoids where(), which branches)
        dX = xp.minimum(Y, 0.0)
        dX += alpha
        dX *= ~positive
        dX += positive
        dX *= dY
        return dX
    return Y, backprop


def _gelu(X, approximate):
    ops = get_ops(X)
    xp = ops.xp
    if approximate == "tanh":
        # 0.5 (1 + tanh u) = sigmoid(2u) and 0.5 (1 - tanh^2 u) = 2 sigmoid(2u) sigmoid(-2u):
        # written with sigmoids, nothing cancels where tanh u is close to -1 (float32 tails)
        v = 2.0 * _SQRT_2_OVER_PI * (X + _GELU_C * X * X * X)
        S, S_neg = _sigmoid_pair(xp, v >= 0, xp.exp(-xp.abs(v)))
        Y = X * S

        def backprop(dY):
            return ops.gelu_tanh_backward(dY, X, S, S_neg)
        return Y, backprop
    Phi = ops.normal_cdf(X)
    Y = X * Phi

    def backprop(dY):
        return dY * (Phi + X * (_INV_SQRT_2PI * xp.exp(-0.5 * X * X)))
    return Y, backprop


def _sigmoid(X):
    ops = get_ops(X)
    Y = sigmoid(X)

    def backprop(dY):
        return ops.sigmoid_backward(dY, Y)
    return Y, backprop


def _tanh(X):
    ops = get_ops(X)
    Y = ops.xp.tanh(X)

    def backprop(dY):
        return ops.tanh_backward(dY, Y)
    return Y, backprop


def _softmax(X, axis):
    Y = softmax(X, axis)

    def backprop(dY):
        return Y * (dY - (dY * Y).sum(axis=axis, keepdims=True))
    return Y, backprop


_FUNCTIONS = {
    "relu": _relu, "leaky_relu": _leaky_relu, "elu": _elu, "gelu": _gelu,
    "sigmoid": _sigmoid, "tanh": _tanh, "softmax": _softmax, "linear": _linear,
}

#: name -> its keyword arguments and their defaults (the same names as PyTorch's functional API).
ACTIVATION_DEFAULTS = {
    "relu": {}, "leaky_relu": {"negative_slope": 0.01}, "elu": {"alpha": 1.0},
    "gelu": {"approximate": "none"}, "sigmoid": {}, "tanh": {}, "softmax": {"axis": -1},
    "linear": {},
}


def _real(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)  # a Python float keeps float32 arrays float32


def _approximate(value, what):
    if value not in ("none", "tanh"):
        raise ValueError(f"{what} must be 'none' or 'tanh', got {value!r}")
    return value


def _axis(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


_CHECKS = {"negative_slope": _real, "alpha": _real, "approximate": _approximate, "axis": _axis}


def _resolve(name, kwargs: dict) -> tuple[str, dict]:
    """Canonical name and validated, complete keyword arguments of an activation."""
    key = name.lower() if isinstance(name, str) else None
    if key not in _FUNCTIONS:
        raise ValueError(f"unknown activation {name!r}; known activations: {sorted(_FUNCTIONS)}")
    defaults = ACTIVATION_DEFAULTS[key]
    for k in kwargs:
        if k not in defaults:
            raise ValueError(f"activation {key!r} takes no argument {k!r}; "
                             f"its arguments are {sorted(defaults)}")
    full = {**defaults, **kwargs}
    return key, {k: _CHECKS[k](v, k) for k, v in full.items()}


def activation_forward(name: str, X, **kwargs):
    """Apply activation ``name`` to ``X``; return ``(Y, backprop)`` with ``backprop(dY) -> dX``.

    The one implementation behind every activation layer and every fused activation
    (``Dense(activation=...)``, recurrent gates).

    Args:
        name: one of ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"gelu"``, ``"sigmoid"``,
            ``"tanh"``, ``"softmax"``, ``"linear"`` (case-insensitive).
        X: NumPy or CuPy array; ``Y`` has its shape and dtype.
        **kwargs: ``negative_slope`` (leaky_relu), ``alpha`` (elu), ``approximate`` (gelu:
            ``"none"`` or ``"tanh"``), ``axis`` (softmax).

    Example:
        >>> import numpy as np
        >>> Y, _ = activation_forward("sigmoid", np.array([-1000.0, 0.0, 1000.0]))
        >>> Y
        array([0. , 0.5, 1. ])
    """
    key, kw = _resolve(name, kwargs)
    return _FUNCTIONS[key](X, **kw)


# --- layers -------------------------------------------------------------------------------------
@register
class Activation(Layer):
    """Apply an elementwise (or softmax) activation: ``Y = f(X)``. No parameters.

    Args:
        activation: ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"gelu"``, ``"sigmoid"``,
            ``"tanh"``, ``"softmax"`` or ``"linear"`` (case-insensitive); ``None`` is ``"linear"``.
        **kwargs: the activation's own arguments (``negative_slope``, ``alpha``, ``approximate``,
            ``axis``), as in ``activation_forward``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> act = L.Activation("leaky_relu", negative_slope=0.1)
        >>> act(None, np.array([[-2.0, 3.0]]))
        array([[-0.2,  3. ]])
    """

    _fixed_activation = None  # set by the named subclasses (ReLU, ...): not in their config

    def __init__(self, activation, *, input_shape=None, name=None, **kwargs):
        super().__init__(input_shape=input_shape, name=name)
        self.activation, self.kwargs = _resolve("linear" if activation is None else activation,
                                                kwargs)
        self._fn = _FUNCTIONS[self.activation]

    def compute_output_shape(self, input_shape):
        if "axis" in self.kwargs:
            ndim = len(input_shape) + 1
            axis = self.kwargs["axis"]
            # a softmax across the batch would couple samples that live on different partitions
            if not -ndim <= axis < ndim or axis % ndim == 0:
                raise ValueError(f"{self.describe()}: axis {axis} must name a non-batch axis of "
                                 f"inputs with {ndim} axes (batch, *{tuple(input_shape)})")
        return input_shape

    def apply(self, X):
        """``(Y, backprop)`` with ``backprop(dY) -> dX``: the pure function, no grads dict."""
        return self._fn(X, **self.kwargs)

    def forward(self, params, X, training=False, rng=None):
        Y, backprop_x = self._fn(X, **self.kwargs)

        def backprop(dY):
            return backprop_x(dY), {}
        return Y, backprop

    def output_activation(self):
        return None if self.activation == "linear" else (self.activation, dict(self.kwargs))

    def forward_logits(self, params, X, training=False, rng=None):
        return X, lambda dY: (dY, {})

    def get_config(self):
        cfg = super().get_config()
        if self._fixed_activation is None:
            cfg["activation"] = self.activation
        cfg.update(self.kwargs)
        return cfg


@register
class ReLU(Activation):
    """Rectified linear unit: ``Y = max(X, 0)`` (gradient 0 at 0, as in PyTorch).

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.ReLU()(None, np.array([[-1.0, 2.0]]))
        array([[0., 2.]])
    """

    _fixed_activation = "relu"

    def __init__(self, *, input_shape=None, name=None):
        super().__init__("relu", input_shape=input_shape, name=name)


@register
class LeakyReLU(Activation):
    """Leaky ReLU: ``Y = X if X > 0 else negative_slope * X``.

    Args:
        negative_slope: slope for ``X <= 0`` (PyTorch's default 0.01).

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.LeakyReLU(0.5)(None, np.array([[-2.0, 2.0]]))
        array([[-1.,  2.]])
    """

    _fixed_activation = "leaky_relu"

    def __init__(self, negative_slope=0.01, *, input_shape=None, name=None):
        super().__init__("leaky_relu", negative_slope=negative_slope, input_shape=input_shape,
                         name=name)


@register
class ELU(Activation):
    """Exponential linear unit: ``Y = X if X > 0 else alpha * (exp(X) - 1)``.

    Args:
        alpha: scale of the negative part.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.ELU()(None, np.array([[0.0, 2.0]]))
        array([[0., 2.]])
    """

    _fixed_activation = "elu"

    def __init__(self, alpha=1.0, *, input_shape=None, name=None):
        super().__init__("elu", alpha=alpha, input_shape=input_shape, name=name)


@register
class GELU(Activation):
    """Gaussian error linear unit: ``Y = X * Phi(X)``, ``Phi`` the standard normal CDF.

    With ``approximate="tanh"``:
    ``Y = 0.5 X (1 + tanh(sqrt(2/pi) (X + 0.044715 X^3)))``, as ``torch.nn.GELU``.

    Args:
        approximate: ``"none"`` (exact normal CDF) or ``"tanh"``.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.GELU()(None, np.array([[0.0]]))
        array([[0.]])
    """

    _fixed_activation = "gelu"

    def __init__(self, approximate="none", *, input_shape=None, name=None):
        super().__init__("gelu", approximate=approximate, input_shape=input_shape, name=name)


@register
class Sigmoid(Activation):
    """Logistic sigmoid: ``Y = 1 / (1 + exp(-X))``, overflow-free for any finite input.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.Sigmoid()(None, np.array([[0.0]]))
        array([[0.5]])
    """

    _fixed_activation = "sigmoid"

    def __init__(self, *, input_shape=None, name=None):
        super().__init__("sigmoid", input_shape=input_shape, name=name)


@register
class Tanh(Activation):
    """Hyperbolic tangent: ``Y = tanh(X)``.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.Tanh()(None, np.array([[0.0]]))
        array([[0.]])
    """

    _fixed_activation = "tanh"

    def __init__(self, *, input_shape=None, name=None):
        super().__init__("tanh", input_shape=input_shape, name=name)


@register
class Softmax(Activation):
    """Softmax along ``axis``: ``Y = exp(X - max X) / sum(exp(X - max X))``.

    Args:
        axis: axis of the full ``(batch, ...)`` array to normalise over; never the batch axis.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.Softmax()(None, np.array([[0.0, 0.0]]))
        array([[0.5, 0.5]])
    """

    _fixed_activation = "softmax"

    def __init__(self, axis=-1, *, input_shape=None, name=None):
        super().__init__("softmax", axis=axis, input_shape=input_shape, name=name)


@register
class Linear(Activation):
    """Identity activation: ``Y = X`` (what ``activation=None`` or ``"linear"`` means).

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.activations import Linear
        >>> Linear()(None, np.array([[-1.0]]))
        array([[-1.]])
    """

    _fixed_activation = "linear"

    def __init__(self, *, input_shape=None, name=None):
        super().__init__("linear", input_shape=input_shape, name=name)


_CLASSES = {"relu": ReLU, "leaky_relu": LeakyReLU, "elu": ELU, "gelu": GELU, "sigmoid": Sigmoid,
            "tanh": Tanh, "softmax": Softmax, "linear": Linear}


def get_activation(activation) -> Activation:
    """Turn a name, an activation layer, a config dict or ``None`` into an activation layer.

    Args:
        activation: ``None`` or ``"linear"`` (identity); a name, case-insensitive (``"relu"``,
            ``"leaky_relu"``, ``"elu"``, ``"gelu"``, ``"sigmoid"``, ``"tanh"``, ``"softmax"``);
            an ``Activation`` instance (returned as is); or a dict such as
            ``{"activation": "leaky_relu", "negative_slope": 0.2}`` (see ``activation_config``).

    Example:
        >>> get_activation("ReLU")
        ReLU()
        >>> get_activation(None)
        Linear()
    """
    if activation is None:
        return Linear()
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, dict):
        kwargs = dict(activation)
        key, kwargs = _resolve(kwargs.pop("activation", None), kwargs)
        return _CLASSES[key](**kwargs)
    if isinstance(activation, str):
        key, _ = _resolve(activation, {})
        return _CLASSES[key]()
    raise ValueError(f"activation must be a name such as 'relu', an activation layer or None, "
                     f"got {type(activation).__name__} {activation!r}")


def activation_config(activation: Activation):
    """JSON form of an activation for a layer's config, read back by ``get_activation``.

    ``None`` for the identity, the bare name when every argument is at its default, else a dict.
    """
    if activation.activation == "linear":
        return None
    if activation.kwargs == ACTIVATION_DEFAULTS[activation.activation]:
        return activation.activation
    return {"activation": activation.activation, **activation.kwargs}


class ActivationOutput:
    """Mixin of the layers with an ``activation=`` argument applied to their output (``Dense``,
    the convolutions): ``forward`` applies it, ``forward_logits`` leaves it out. The layer sets
    ``_act`` (the ``Activation``, or ``None`` for the identity) and implements
    ``_forward(params, X, act) -> (Y, backprop)``."""

    _act = None

    def output_activation(self):
        return None if self._act is None else (self._act.activation, dict(self._act.kwargs))

    def forward(self, params, X, training=False, rng=None):
        return self._forward(params, X, self._act)

    def forward_logits(self, params, X, training=False, rng=None):
        return self._forward(params, X, None)
