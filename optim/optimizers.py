"""Optimizers: one pure in-place update function per algorithm under a thin validating class.

The update functions work on any contiguous slice of the flat parameter vector: the in-process
loop passes the whole vector, the distributed engine one parameter block with the matching
slice of every slot. Element-wise algorithms (SGD, Adam/AdamW, RMSprop, Adagrad) give
bit-identical results however the vector is cut. LARS and LAMB scale each *layer* by a trust
ratio of norms, so they take ``segments``: (start, stop) ranges within the slice, one per
parameter tensor (the default treats the whole slice as one layer); a block must hold whole
layers (``Optimizer.layerwise_norms``).

SGD and Adam/AdamW run through the device switch (``rddtensor.ops.ops_for(xp)``): the
NumPy reference of ``rddtensor.ops.numpy_ops.NumpyOps`` on NumPy, one fused kernel pass on CuPy.
The others are written with ``xp`` and run as they are on both.

Conventions: ``step`` is the 1-based update count ``t``; ``g`` is scratch and is overwritten
(callers pass a copy of the gradient); arithmetic runs in the dtype of ``w``, with at most one
temporary of the slice's size per call.
"""
from __future__ import annotations

import math
from numbers import Real

import numpy

from rddtensor.optim.clipping import sum_of_squares
from rddtensor.optim.schedules import Schedule, get_schedule, serialize_schedule
from rddtensor.backend import get_array_module
from rddtensor.ops import ops_for
from rddtensor.ops.numpy_ops import adam_moments as _adam_moments
from rddtensor.ops.numpy_ops import add_weight_decay as _add_weight_decay
from rddtensor.ops.numpy_ops import check_step as _check_step

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LARS", "LAMB",
           "get_optimizer", "sgd_update", "adam_update", "rmsprop_update", "adagrad_update",
           "lars_update", "lamb_update", "serialize_optimizer"]


# ---------------------------------------------------------------------------- helpers

def _segments(segments, n: int) -> list:
    if segments is None:
        return [(0, n)]
    segments = [(int(a), int(b)) for a, b in segments]
    stop = 0
    for i, (a, b) in enumerate(segments):
        if a != stop or b < a:
            raise ValueError(f"segments must tile [0, {n}) in order as (start, stop) pairs: "
                             f"segment {i} is {(a, b)}, expected to start at {stop}")
        stop = b
    if stop != n:
        raise ValueError(f"segments must tile [0, {n}) in order as (start, stop) pairs: "
                         f"they end at {stop}")
    return segments


def _segment_norms(x, segs) -> list:
    """L2 norm of each ``x[start:stop]`` (float64 accumulation): the per-layer norms of a slice."""
    return [math.sqrt(sum_of_squares(x[a:b])) for a, b in segs]


# ---------------------------------------------------------------------------- update functions

def sgd_update(xp, w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, step) -> None:
    """SGD with momentum, dampening, Nesterov and L2 weight decay, in place (``torch.optim.SGD``).

    ``g += wd*w``; ``buf = g`` at t=1, else ``buf = momentum*buf + (1-dampening)*g``;
    ``w -= lr * (g + momentum*buf)`` with Nesterov, else ``w -= lr * buf``
    (``w -= lr*g`` when ``momentum == 0``).

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        buf: momentum buffer slice, or ``None`` when ``momentum == 0``.
        lr, momentum, dampening, nesterov, weight_decay: hyperparameters.
        step: 1-based update count; at step 1 the buffer is set to the gradient without
            dampening, as torch does.

    Example:
        >>> import numpy as np
        >>> w, g = np.ones(2), np.full(2, 0.5)
        >>> sgd_update(np, w, g, None, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
        ...            weight_decay=0.0, step=1)
        >>> w
        array([0.95, 0.95])
    """
    ops_for(xp).sgd_update(w, g, buf, lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov, weight_decay=weight_decay, step=step)


def adam_update(xp, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                amsgrad_vmax=None, step) -> None:
    """Adam (``decoupled=False``) or AdamW (``decoupled=True``), in place (``torch.optim.Adam[W]``).

    Adam: ``g += wd*w``; AdamW: ``w *= 1 - lr*wd``. Then ``m = b1*m + (1-b1)*g``,
    ``v = b2*v + (1-b2)*g^2``, ``vmax = max(vmax, v)`` (AMSGrad, used instead of ``v``),
    ``w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``.

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        m, v: first and second moment slices.
        lr, beta1, beta2, eps, weight_decay: hyperparameters.
        decoupled: True for AdamW's decoupled weight decay.
        amsgrad_vmax: running maximum of ``v`` (AMSGrad), or ``None``.
        step: 1-based update count ``t`` for the bias corrections.

    Example:
        >>> import numpy as np
        >>> w, m, v = np.ones(2), np.zeros(2), np.zeros(2)
        >>> adam_update(np, w, np.full(2, 3.0), m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
        ...             weight_decay=0.0, decoupled=False, step=1)
        >>> np.round(w, 6)
        array([0.9, 0.9])
    """
    ops_for(xp).adam_update(w, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, decoupled=decoupled, step=step,
                            amsgrad_vmax=amsgrad_vmax)


def rmsprop_update(xp, w, g, square_avg, *, lr, alpha, eps, weight_decay, momentum, centered,
                   grad_avg=None, buf=None, step) -> None:
    """RMSprop, optionally centered and with momentum, in place (``torch.optim.RMSprop``).

    ``g += wd*w``; ``s = alpha*s + (1-alpha)*g^2``; centered: ``a = alpha*a + (1-alpha)*g`` and
    ``den = sqrt(s - a^2) + eps``, else ``den = sqrt(s) + eps``; with momentum
    ``buf = momentum*buf + g/den`` and ``w -= lr*buf``, else ``w -= lr*g/den``.

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        square_avg: running mean of ``g^2``.
        lr, alpha, eps, weight_decay, momentum, centered: hyperparameters.
        grad_avg: running mean of ``g`` (required when ``centered``).
        buf: momentum buffer (required when ``momentum > 0``).
        step: 1-based update count (unused by the formula; kept for a uniform signature).

    Example:
        >>> import numpy as np
        >>> w, s = np.ones(2), np.zeros(2)
        >>> rmsprop_update(np, w, np.full(2, 2.0), s, lr=0.01, alpha=0.75, eps=0.0,
        ...                weight_decay=0.0, momentum=0.0, centered=False, step=1)
        >>> np.round(w, 6)
        array([0.98, 0.98])
    """
    _check_step(step)
    lr, alpha, momentum = float(lr), float(alpha), float(momentum)
    tmp = xp.empty_like(w)
    _add_weight_decay(xp, g, w, float(weight_decay), tmp)
    square_avg *= alpha
    xp.multiply(g, 1.0 - alpha, out=tmp)
    tmp *= g
    square_avg += tmp
    if centered:
        xp.subtract(g, grad_avg, out=tmp)
        tmp *= 1.0 - alpha
        grad_avg += tmp
        xp.multiply(grad_avg, grad_avg, out=tmp)
        xp.subtract(square_avg, tmp, out=tmp)
        xp.sqrt(tmp, out=tmp)
    else:
        xp.sqrt(square_avg, out=tmp)
    tmp += float(eps)
    xp.divide(g, tmp, out=tmp)
    if momentum > 0:
        buf *= momentum
        buf += tmp
        xp.multiply(buf, -lr, out=tmp)
    else:
        tmp *= -lr
    w += tmp


def adagrad_update(xp, w, g, acc, *, lr, lr_decay, weight_decay, eps, step) -> None:
    """Adagrad with learning-rate decay, in place (``torch.optim.Adagrad``).

    ``g += wd*w``; ``acc += g^2``; ``w -= lr / (1 + (t-1)*lr_decay) * g / (sqrt(acc) + eps)``.

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        acc: accumulated squared gradients (starts at ``initial_accumulator_value``).
        lr, lr_decay, weight_decay, eps: hyperparameters.
        step: 1-based update count ``t``.

    Example:
        >>> import numpy as np
        >>> w, acc = np.ones(2), np.zeros(2)
        >>> adagrad_update(np, w, np.full(2, 2.0), acc, lr=0.1, lr_decay=0.0, weight_decay=0.0,
        ...                eps=0.0, step=1)
        >>> w
        array([0.9, 0.9])
    """
    step, lr = _check_step(step), float(lr)
    tmp = xp.empty_like(w)
    _add_weight_decay(xp, g, w, float(weight_decay), tmp)
    clr = lr / (1.0 + (step - 1) * float(lr_decay))
    xp.multiply(g, g, out=tmp)
    acc += tmp
    xp.sqrt(acc, out=tmp)
    tmp += float(eps)
    xp.divide(g, tmp, out=tmp)
    tmp *= -clr
    w += tmp


def _norm_pairs(w, d, segs) -> list:
    return list(zip(_segment_norms(w, segs), _segment_norms(d, segs)))


def lars_update(xp, w, g, buf, *, lr, momentum, weight_decay, trust_coefficient, eps, step,
                segments=None) -> None:
    """LARS (You et al. 2017, torchlars-style) in place: SGD on layer-wise trust-scaled gradients.

    Per layer: ``local = tc*||w|| / (||g|| + wd*||w|| + eps)`` (1 if either norm is 0),
    ``d = local * (g + wd*w)``; then ``buf = momentum*buf + d`` (``buf = d`` at t=1) and
    ``w -= lr*buf`` (``w -= lr*d`` when ``momentum == 0``).

    A layer is one parameter tensor: ``segments`` must follow tensor boundaries, and a slice
    must hold whole layers.

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        buf: momentum buffer slice, or ``None`` when ``momentum == 0``.
        lr, momentum, weight_decay, trust_coefficient, eps: hyperparameters.
        step: 1-based update count.
        segments: (start, stop) ranges tiling the slice, one per layer; default one layer.

    Example:
        >>> import numpy as np
        >>> w, g = np.array([3.0, 4.0]), np.array([0.6, 0.8])
        >>> lars_update(np, w, g, None, lr=1.0, momentum=0.0, weight_decay=0.0,
        ...             trust_coefficient=0.1, eps=0.0, step=1)
        >>> np.round(w, 6)
        array([2.7, 3.6])
    """
    step, lr, momentum = _check_step(step), float(lr), float(momentum)
    weight_decay, tc, eps = float(weight_decay), float(trust_coefficient), float(eps)
    segs = _segments(segments, w.shape[0])
    pairs = _norm_pairs(w, g, segs)
    _add_weight_decay(xp, g, w, weight_decay, xp.empty_like(w) if weight_decay else None)
    for (a, b), (w_norm, g_norm) in zip(segs, pairs):
        if w_norm > 0 and g_norm > 0:
            seg = g[a:b]
            seg *= tc * w_norm / (g_norm + weight_decay * w_norm + eps)
    if momentum != 0:
        if step == 1:
            xp.copyto(buf, g)
        else:
            buf *= momentum
            buf += g
        xp.multiply(buf, -lr, out=g)
    else:
        g *= -lr
    w += g


def _lamb_direction(xp, w, g, m, v, *, beta1, beta2, eps, weight_decay, step):
    """LAMB phase 1: update the moments and write the direction ``r + wd*w`` into ``g``.

    ``m, v`` as Adam; ``r = (m/(1-b1^t)) / (sqrt(v)/sqrt(1-b2^t) + eps)``. Returns ``g``.
    """
    step, beta1, beta2 = _check_step(step), float(beta1), float(beta2)
    tmp = xp.empty_like(w)
    _adam_moments(xp, g, m, v, beta1, beta2, tmp)
    xp.sqrt(v, out=tmp)
    tmp /= (1.0 - beta2 ** step) ** 0.5
    tmp += float(eps)
    xp.divide(m, tmp, out=g)
    g /= 1.0 - beta1 ** step
    _add_weight_decay(xp, g, w, float(weight_decay), tmp)
    return g


def _trust_ratio_update(w, d, *, lr, segments=None) -> None:
    """LAMB phase 2: ``w -= lr * ||w|| / ||d|| * d`` per layer (ratio 1 if either norm is 0);
    ``d`` (the direction) is scratch."""
    lr = float(lr)
    segs = _segments(segments, w.shape[0])
    for (a, b), (w_norm, d_norm) in zip(segs, _norm_pairs(w, d, segs)):
        ratio = w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
        seg, w_seg = d[a:b], w[a:b]
        seg *= -lr * ratio
        w_seg += seg


def lamb_update(xp, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step,
                segments=None) -> None:
    """LAMB (You et al. 2019, Alg. 2 with bias correction) in place.

    ``m, v`` as Adam; ``r = m_hat / (sqrt(v_hat) + eps)``; per layer
    ``w -= lr * ||w|| / ||r + wd*w|| * (r + wd*w)`` (ratio 1 if either norm is 0).
    A slice must hold whole layers.

    Args:
        xp: ``numpy`` or ``cupy``.
        w: parameters (1-D slice), updated in place.
        g: gradient slice, used as scratch.
        m, v: first and second moment slices.
        lr, beta1, beta2, eps, weight_decay: hyperparameters.
        step: 1-based update count ``t``.
        segments: (start, stop) ranges tiling the slice, one per parameter tensor; default one.

    Example:
        >>> import numpy as np
        >>> w, m, v = np.array([3.0, 4.0]), np.zeros(2), np.zeros(2)
        >>> lamb_update(np, w, np.array([1.0, 0.0]), m, v, lr=0.1, beta1=0.9, beta2=0.999,
        ...             eps=1e-6, weight_decay=0.0, step=1)
        >>> np.round(w, 4)
        array([2.5, 4. ])
    """
    _lamb_direction(xp, w, g, m, v, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, step=step)
    _trust_ratio_update(w, g, lr=lr, segments=segments)


# ---------------------------------------------------------------------------- classes

def _hyper(name: str, value, ok, rule: str) -> float:
    if not (isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
            and ok(value)):
        raise ValueError(f"invalid {name}: {value!r} ({rule})")
    return float(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError(f"invalid {name}: {value!r} (must be True or False)")
    return bool(value)


def _check_lr(lr):
    if isinstance(lr, dict):
        return get_schedule(lr)
    if callable(lr):
        return lr
    if not (isinstance(lr, Real) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate: {lr!r} (must be a finite number >= 0, "
                         "a Schedule, or a callable step -> lr)")
    return float(lr)


def _check_clip(name: str, value):
    return None if value is None else _hyper(name, value, lambda x: x > 0, "must be > 0 or None")


_NONNEG = (lambda x: x >= 0, "must be >= 0")
_BETA = (lambda x: 0 <= x < 1, "must be in [0, 1)")


class Optimizer:
    """Base class: validated hyperparameters, slot creation and the update call.

    Subclasses list their hyperparameters (stored as attributes) in ``_config_keys`` and
    implement ``update`` by calling their pure update function. ``clipnorm`` / ``clipvalue`` are
    only stored: the caller clips (``rddtensor.optim.clipping``) before ``update``.

    Args:
        lr: a number >= 0, a :class:`~optim.schedules.Schedule` (or its config dict), or any
            callable ``step -> lr``.
        clipnorm: clip the global gradient norm to this (> 0), or ``None``.
        clipvalue: clip gradient elements to ``[-clipvalue, clipvalue]`` (> 0), or ``None``.

    Example:
        >>> import numpy as np
        >>> opt = SGD(lr=0.1)
        >>> w, slots = np.ones(3, np.float32), opt.init_slots(3)
        >>> opt.update(w, np.ones(3, np.float32), slots, step=1)
        >>> w
        array([0.9, 0.9, 0.9], dtype=float32)
    """

    _config_keys: tuple = ()
    #: the update needs norms of whole parameter tensors (trust ratios): a block of the flat
    #: vector cut anywhere is not enough (the sharded all-reduce refuses it)
    layerwise_norms: bool = False

    @property
    def needs_whole_gradient(self) -> bool:
        """Whether an update needs more than its own slice of the gradient: global-norm
        clipping, or per-tensor norms (LARS, LAMB)."""
        return self.clipnorm is not None or self.layerwise_norms

    def __init__(self, lr, *, clipnorm=None, clipvalue=None):
        self.lr = _check_lr(lr)
        self.clipnorm = _check_clip("clipnorm", clipnorm)
        self.clipvalue = _check_clip("clipvalue", clipvalue)

    @property
    def slot_names(self) -> tuple:
        """Names of the per-parameter state arrays ``update`` expects in ``slots``."""
        return ()

    def init_slots(self, size: int, xp=numpy, dtype=numpy.float32) -> dict:
        """Fresh slot arrays of length ``size`` (zeros unless the algorithm says otherwise)."""
        return {name: xp.zeros(int(size), dtype=dtype) for name in self.slot_names}

    def learning_rate(self, step: int) -> float:
        """The learning rate of the 1-based update ``step``."""
        step = _check_step(step)
        return float(self.lr(step)) if callable(self.lr) else self.lr

    def update(self, w, g, slots: dict, step: int, segments=None) -> None:
        """Update ``w`` and ``slots`` in place from gradient ``g`` (overwritten) at update ``step``.

        ``segments`` ((start, stop) per parameter tensor) matters only to LARS and LAMB.
        """
        raise NotImplementedError

    def get_config(self) -> dict:
        """Hyperparameters as a JSON-serializable dict (a schedule as its class name and config)."""
        lr = self.lr if isinstance(self.lr, float) else serialize_schedule(self.lr)
        config = {"lr": lr}
        config.update({k: getattr(self, k) for k in self._config_keys})
        config.update(clipnorm=self.clipnorm, clipvalue=self.clipvalue)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Optimizer":
        """Rebuild an optimizer from :meth:`get_config` output."""
        return cls(**config)

    def __repr__(self) -> str:
        lr = self.lr if isinstance(self.lr, (float, Schedule)) else "<callable>"
        args = [f"lr={lr!r}"] + [f"{k}={getattr(self, k)!r}" for k in self._config_keys]
        return f"{type(self).__name__}({', '.join(args)})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum; see :func:`sgd_update`.

    Args:
        lr: learning rate or schedule. momentum: >= 0. dampening: in [0, 1].
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        weight_decay: L2 penalty added to the gradient, >= 0.

    Example:
        >>> SGD(lr=0.1, momentum=0.9).slot_names
        ('momentum',)
    """

    _config_keys = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.momentum = _hyper("momentum", momentum, *_NONNEG)
        self.dampening = _hyper("dampening", dampening, lambda x: 0 <= x <= 1, "must be in [0, 1]")
        self.nesterov = _flag("nesterov", nesterov)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"invalid nesterov: True (Nesterov momentum requires momentum > 0 and "
                             f"dampening = 0, got momentum={momentum}, dampening={dampening})")

    @property
    def slot_names(self):
        return ("momentum",) if self.momentum > 0 else ()

    def update(self, w, g, slots, step, segments=None):
        sgd_update(get_array_module(w), w, g, slots.get("momentum"), lr=self.learning_rate(step),
                   momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov,
                   weight_decay=self.weight_decay, step=step)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay and optional AMSGrad; see :func:`adam_update`.

    Args:
        lr: learning rate or schedule. beta1, beta2: in [0, 1). eps: >= 0.
        weight_decay: L2 penalty added to the gradient, >= 0 (use :class:`AdamW` to decouple it).
        amsgrad: keep the running maximum of the second moment (slot ``"vmax"``).

    Example:
        >>> Adam(1e-3, amsgrad=True).slot_names
        ('m', 'v', 'vmax')
    """

    _config_keys = ("beta1", "beta2", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.beta1 = _hyper("beta1", beta1, *_BETA)
        self.beta2 = _hyper("beta2", beta2, *_BETA)
        self.eps = _hyper("eps", eps, *_NONNEG)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)
        self.amsgrad = _flag("amsgrad", amsgrad)

    @property
    def slot_names(self):
        return ("m", "v", "vmax") if self.amsgrad else ("m", "v")

    def update(self, w, g, slots, step, segments=None):
        adam_update(get_array_module(w), w, g, slots["m"], slots["v"],
                    lr=self.learning_rate(step), beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay, decoupled=self._decoupled,
                    amsgrad_vmax=slots["vmax"] if self.amsgrad else None, step=step)


class AdamW(Adam):
    """Adam with decoupled weight decay ``w *= 1 - lr*wd`` (Loshchilov & Hutter); see :class:`Adam`.

    Example:
        >>> AdamW().weight_decay
        0.01
    """

    _decoupled = True

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
                 *, clipnorm=None, clipvalue=None):
        super().__init__(lr, beta1, beta2, eps, weight_decay, amsgrad,
                         clipnorm=clipnorm, clipvalue=clipvalue)


class RMSprop(Optimizer):
    """RMSprop (Hinton), optionally centered and with momentum; see :func:`rmsprop_update`.

    Args:
        lr: learning rate or schedule. alpha: smoothing constant in [0, 1]. eps: >= 0.
        weight_decay: L2 penalty, >= 0. momentum: >= 0.
        centered: normalise by the estimated variance instead of the second moment.

    Example:
        >>> RMSprop(centered=True, momentum=0.9).slot_names
        ('square_avg', 'grad_avg', 'momentum')
    """

    _config_keys = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(self, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.alpha = _hyper("alpha", alpha, lambda x: 0 <= x <= 1, "must be in [0, 1]")
        self.eps = _hyper("eps", eps, *_NONNEG)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)
        self.momentum = _hyper("momentum", momentum, *_NONNEG)
        self.centered = _flag("centered", centered)

    @property
    def slot_names(self):
        return (("square_avg",) + (("grad_avg",) if self.centered else ())
                + (("momentum",) if self.momentum > 0 else ()))

    def update(self, w, g, slots, step, segments=None):
        rmsprop_update(get_array_module(w), w, g, slots["square_avg"],
                       lr=self.learning_rate(step), alpha=self.alpha, eps=self.eps,
                       weight_decay=self.weight_decay, momentum=self.momentum,
                       centered=self.centered, grad_avg=slots.get("grad_avg"),
                       buf=slots.get("momentum"), step=step)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.) with learning-rate decay; see :func:`adagrad_update`.

    Args:
        lr: learning rate or schedule. lr_decay: >= 0. weight_decay: >= 0.
        initial_accumulator_value: starting value of the ``"sum"`` slot, >= 0. eps: >= 0.

    Example:
        >>> Adagrad(initial_accumulator_value=0.1).init_slots(2)["sum"]
        array([0.1, 0.1], dtype=float32)
    """

    _config_keys = ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(self, lr=0.01, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.lr_decay = _hyper("lr_decay", lr_decay, *_NONNEG)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)
        self.initial_accumulator_value = _hyper(
            "initial_accumulator_value", initial_accumulator_value, *_NONNEG)
        self.eps = _hyper("eps", eps, *_NONNEG)

    @property
    def slot_names(self):
        return ("sum",)

    def init_slots(self, size, xp=numpy, dtype=numpy.float32):
        return {"sum": xp.full(int(size), self.initial_accumulator_value, dtype=dtype)}

    def update(self, w, g, slots, step, segments=None):
        adagrad_update(get_array_module(w), w, g, slots["sum"], lr=self.learning_rate(step),
                       lr_decay=self.lr_decay, weight_decay=self.weight_decay, eps=self.eps,
                       step=step)


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) with momentum; see :func:`lars_update`.

    Trust ratios are per layer: pass ``segments`` (one (start, stop) per parameter tensor) to
    ``update``, or the whole slice is treated as one layer.

    Args:
        lr: global learning rate or schedule. momentum: >= 0. weight_decay: >= 0.
        trust_coefficient: > 0. eps: >= 0.

    Example:
        >>> LARS(lr=0.1).slot_names
        ('momentum',)
    """

    layerwise_norms = True

    _config_keys = ("momentum", "weight_decay", "trust_coefficient", "eps")

    def __init__(self, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
                 *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.momentum = _hyper("momentum", momentum, *_NONNEG)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)
        self.trust_coefficient = _hyper("trust_coefficient", trust_coefficient,
                                        lambda x: x > 0, "must be > 0")
        self.eps = _hyper("eps", eps, *_NONNEG)

    @property
    def slot_names(self):
        return ("momentum",) if self.momentum > 0 else ()

    def update(self, w, g, slots, step, segments=None):
        lars_update(get_array_module(w), w, g, slots.get("momentum"), lr=self.learning_rate(step),
                    momentum=self.momentum, weight_decay=self.weight_decay,
                    trust_coefficient=self.trust_coefficient, eps=self.eps, step=step,
                    segments=segments)


class LAMB(Optimizer):
    """Layer-wise adaptive moments (You et al. 2019); see :func:`lamb_update`.

    Trust ratios are per layer: pass ``segments`` (one (start, stop) per parameter tensor) to
    ``update``, or the whole slice is treated as one layer.

    Args:
        lr: learning rate or schedule. beta1, beta2: in [0, 1). eps: >= 0.
        weight_decay: decoupled decay added to the direction, >= 0.

    Example:
        >>> LAMB().slot_names
        ('m', 'v')
    """

    layerwise_norms = True

    _config_keys = ("beta1", "beta2", "eps", "weight_decay")

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                 *, clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, clipvalue=clipvalue)
        self.beta1 = _hyper("beta1", beta1, *_BETA)
        self.beta2 = _hyper("beta2", beta2, *_BETA)
        self.eps = _hyper("eps", eps, *_NONNEG)
        self.weight_decay = _hyper("weight_decay", weight_decay, *_NONNEG)

    @property
    def slot_names(self):
        return ("m", "v")

    def update(self, w, g, slots, step, segments=None):
        lamb_update(get_array_module(w), w, g, slots["m"], slots["v"],
                    lr=self.learning_rate(step), beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay, step=step, segments=segments)


_OPTIMIZERS = {cls.__name__.lower(): cls
               for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, LARS, LAMB)}


def _optimizer_class(name):
    cls = _OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(_OPTIMIZERS)}")
    return cls


def serialize_optimizer(optimizer: Optimizer) -> dict:
    """``{"class_name": ..., "config": ...}``, the form :func:`get_optimizer` reads back.

    Example:
        >>> serialize_optimizer(SGD(0.1))["class_name"]
        'SGD'
    """
    return {"class_name": type(optimizer).__name__, "config": optimizer.get_config()}


def get_optimizer(obj) -> Optimizer:
    """Return an optimizer from a name, an instance or a ``{"class_name", "config"}`` dict.

    Args:
        obj: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"lars"`` or
            ``"lamb"`` (any case; default hyperparameters), an :class:`Optimizer` (returned as
            is), or a dict as produced by :func:`serialize_optimizer`.

    Example:
        >>> get_optimizer("Adam").lr
        0.001
        >>> get_optimizer({"class_name": "SGD", "config": {"lr": 0.5}}).lr
        0.5
    """
    if isinstance(obj, Optimizer):
        return obj
    if isinstance(obj, str):
        return _optimizer_class(obj)()
    if isinstance(obj, dict):
        return _optimizer_class(obj.get("class_name")).from_config(dict(obj.get("config", {})))
    raise TypeError(f"cannot make an optimizer from {type(obj).__name__} {obj!r}; pass a name "
                    f"({', '.join(_OPTIMIZERS)}), an Optimizer or a config dict")
