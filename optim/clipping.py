"""Gradient clipping: by global L2 norm (torch ``clip_grad_norm_`` semantics) and by value.

Norms accumulate in float64 whatever the gradient dtype. A distributed caller that holds the
gradient in blocks sums :func:`sum_of_squares` over its blocks and asks :func:`norm_clip_scale`
for the same factor the in-process loop gets from :func:`clip_by_global_norm`.
"""
from __future__ import annotations

import math
from numbers import Real

from rddtensor.backend import get_array_module

__all__ = ["sum_of_squares", "global_norm", "norm_clip_scale", "clip_by_global_norm",
           "clip_by_value", "CLIP_EPS"]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing
_CHUNK = 1 << 20  # float64 conversion in chunks keeps the temporary at 8 MiB


def _as_list(grads) -> list:
    return list(grads) if isinstance(grads, (list, tuple)) else [grads]


def _check_positive(name: str, value) -> float:
    if not (isinstance(value, Real) and not isinstance(value, bool) and value > 0
            and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def sum_of_squares(x) -> float:
    """Sum of squared elements of one array, accumulated in float64: ``sum(x_i^2)``.

    Args:
        x: a NumPy or CuPy array of any shape.

    Example:
        >>> import numpy as np
        >>> sum_of_squares(np.array([3.0, 4.0], dtype=np.float32))
        25.0
    """
    xp = get_array_module(x)
    x = x.reshape(-1)
    if x.dtype == xp.float64:
        return float(xp.dot(x, x))
    total = 0.0
    for start in range(0, x.size, _CHUNK):
        c = x[start:start + _CHUNK].astype(xp.float64)
        total += float(xp.dot(c, c))
    return total


def global_norm(grads) -> float:
    """L2 norm of all gradients together: ``sqrt(sum_k sum_i g_ki^2)``.

    Args:
        grads: one array (e.g. the flat gradient vector) or a list of arrays.

    Example:
        >>> import numpy as np
        >>> global_norm([np.array([3.0]), np.array([4.0])])
        5.0
    """
    return math.sqrt(sum(sum_of_squares(g) for g in _as_list(grads)))


def norm_clip_scale(sq_norm: float, max_norm: float) -> float:
    """The factor ``min(1, max_norm / (sqrt(sq_norm) + 1e-6))`` that clipping multiplies by.

    A NaN norm gives a NaN factor, as in torch (no error is raised).

    Args:
        sq_norm: the squared global norm (e.g. summed over parameter blocks).
        max_norm: the largest allowed norm (> 0).

    Example:
        >>> round(norm_clip_scale(100.0, 5.0), 6)
        0.5
    """
    max_norm = _check_positive("max_norm", max_norm)
    coef = max_norm / (math.sqrt(sq_norm) + CLIP_EPS)
    return 1.0 if coef > 1.0 else coef


def clip_by_global_norm(grads, max_norm: float) -> float:
    """Scale gradients in place so that their global norm is at most ``max_norm``.

    ``g <- g * min(1, max_norm / (||g|| + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
    (which returns the norm; this returns the factor, 1.0 when nothing was clipped).

    Args:
        grads: one array or a list of arrays, modified in place.
        max_norm: the largest allowed global L2 norm (> 0).

    Returns:
        The factor the gradients were multiplied by.

    Example:
        >>> import numpy as np
        >>> g = np.array([3.0, 4.0])
        >>> round(clip_by_global_norm(g, 1.0), 6), np.round(g, 6)
        (0.2, array([0.6, 0.8]))
    """
    grads = _as_list(grads)
    scale = norm_clip_scale(sum(sum_of_squares(g) for g in grads), max_norm)
    if scale != 1.0:  # multiplying by 1.0 would change nothing
        for g in grads:
            g *= scale
    return scale


def clip_by_value(grads, clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place.

    As ``torch.nn.utils.clip_grad_value_``.

    Args:
        grads: one array or a list of arrays, modified in place.
        clip_value: the bound (> 0).

    Example:
        >>> import numpy as np
        >>> g = np.array([-3.0, 0.5, 2.0])
        >>> clip_by_value(g, 1.0)
        >>> g
        array([-1. ,  0.5,  1. ])
    """
    clip_value = _check_positive("clip_value", clip_value)
    for g in _as_list(grads):
        get_array_module(g).clip(g, -clip_value, clip_value, out=g)
