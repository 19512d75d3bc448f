"""Weight initialisers: one small table of ``name -> function(rng, shape) -> float64 array``.

Values are always drawn in float64 from the given ``numpy.random.Generator`` and then cast, so the
same seed gives the same weights (up to rounding) in float32 and float64. Fans follow PyTorch
layouts: a weight of shape ``(out, in, *kernel)`` has ``fan_in = in * prod(kernel)`` and
``fan_out = out * prod(kernel)``.

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.initializers import initialize
    >>> W = initialize("he_normal", np.random.default_rng(0), (4, 3))
    >>> W.shape, W.dtype
    ((4, 3), dtype('float32'))
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["INITIALIZERS", "compute_fans", "get_initializer", "initialize"]


def compute_fans(shape: tuple) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight in PyTorch layout; a 1-D shape uses its length for both."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    receptive = math.prod(shape[2:])
    return max(1, int(shape[1]) * receptive), max(1, int(shape[0]) * receptive)


def _glorot_uniform(rng, shape):
    fan_in, fan_out = compute_fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape)


def _glorot_normal(rng, shape):
    fan_in, fan_out = compute_fans(shape)
    return rng.standard_normal(shape) * math.sqrt(2.0 / (fan_in + fan_out))


def _he_uniform(rng, shape):
    limit = math.sqrt(6.0 / compute_fans(shape)[0])
    return rng.uniform(-limit, limit, shape)


def _he_normal(rng, shape):
    return rng.standard_normal(shape) * math.sqrt(2.0 / compute_fans(shape)[0])


def _lecun_uniform(rng, shape):
    limit = math.sqrt(3.0 / compute_fans(shape)[0])
    return rng.uniform(-limit, limit, shape)


def _lecun_normal(rng, shape):
    return rng.standard_normal(shape) * math.sqrt(1.0 / compute_fans(shape)[0])


def _normal(rng, shape):
    return rng.standard_normal(shape) * 0.05  # Keras' RandomNormal default


def _uniform(rng, shape):
    return rng.uniform(-0.05, 0.05, shape)  # Keras' RandomUniform default


def _zeros(rng, shape):
    return np.zeros(shape)


def _ones(rng, shape):
    return np.ones(shape)


#: name -> ``f(rng, shape)`` returning float64. Normal variants are plain (not truncated) normals.
INITIALIZERS = {
    "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "he_uniform": _he_uniform,
    "he_normal": _he_normal,
    "lecun_uniform": _lecun_uniform,
    "lecun_normal": _lecun_normal,
    "normal": _normal,
    "uniform": _uniform,
    "zeros": _zeros,
    "ones": _ones,
}


def get_initializer(name, what: str = "initializer") -> str:
    """Validate an initialiser name (case-insensitive) and return its canonical form.

    Args:
        name: one of ``INITIALIZERS``.
        what: the argument name to put in the error (``"kernel_initializer"``).
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in INITIALIZERS:
        raise ValueError(f"unknown {what} {name!r}; known initializers: {sorted(INITIALIZERS)}")
    return key


def initialize(name: str, rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    """Draw a weight of ``shape`` with initialiser ``name`` from ``rng``, cast to ``dtype``."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    fn = INITIALIZERS[get_initializer(name)]
    return np.asarray(fn(rng, tuple(int(s) for s in shape)), dtype=dtype)
