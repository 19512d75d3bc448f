"""Parameter-free structural layers: Dropout, Flatten, Reshape."""
from __future__ import annotations

import math
import numbers

import numpy as np

from rddtensor.layers.base import Layer, register
from rddtensor.backend import get_array_module

__all__ = ["Dropout", "Flatten", "Reshape"]


def _same_backprop(dY):
    return dY, {}


@register
class Dropout(Layer):
    """Inverted dropout: in training ``Y = X * M / (1 - rate)`` with ``M ~ Bernoulli(1 - rate)``.

    In evaluation (``training=False``) it is the identity, so no rescaling is needed at inference.
    The mask is drawn from the ``rng`` (a ``numpy.random.Generator``) that the training step
    passes to ``forward``: the same generator state gives the same mask, which is what makes
    distributed training reproducible. The mask is drawn on the host and moved to the array
    module of ``X``.

    Args:
        rate: fraction of inputs to zero, in ``[0, 1)``.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, *shape)``, output the same.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> drop = L.Dropout(0.5)
        >>> Y, _ = drop.forward({}, np.ones((1, 4)), training=True, rng=np.random.default_rng(0))
        >>> sorted(set(Y.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """

    def __init__(self, rate, *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        if (isinstance(rate, bool) or not isinstance(rate, numbers.Real) or math.isnan(rate)
                or not 0 <= rate < 1):
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def forward(self, params, X, training=False, rng=None):
        if not training or self.rate == 0.0:
            return X, _same_backprop
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"{self.describe()} needs a random generator in training mode: the "
                             f"training step must pass rng=np.random.default_rng(seed) to forward, "
                             f"got rng={rng!r}")
        xp = get_array_module(X)
        keep = xp.asarray(rng.random(X.shape, dtype=np.float32) >= self.rate)
        M = xp.where(keep, 1.0 / (1.0 - self.rate), 0.0).astype(X.dtype, copy=False)
        Y = X * M

        def backprop(dY):
            return dY * M, {}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@register
class Flatten(Layer):
    """Flatten each sample: ``(batch, *shape) -> (batch, prod(shape))``.

    Args:
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, d1, ..., dk)``, output ``(batch, d1 * ... * dk)``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.Flatten()(None, np.zeros((2, 3, 4))).shape
        (2, 12)
    """

    def compute_output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, params, X, training=False, rng=None):
        shape = X.shape
        Y = X.reshape(shape[0], math.prod(shape[1:]))  # explicit size: -1 fails on empty batches

        def backprop(dY):
            return dY.reshape(shape), {}
        return Y, backprop


def _target_shape(target_shape) -> tuple:
    if isinstance(target_shape, (int, np.integer)) and not isinstance(target_shape, bool):
        target_shape = (target_shape,)
    try:
        shape = tuple(target_shape)
    except TypeError:
        raise ValueError(f"target_shape must be a tuple of positive integers (one may be -1), "
                         f"got {target_shape!r}") from None
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or (s <= 0 and s != -1):
            raise ValueError(f"target_shape must be a tuple of positive integers (one may be -1), "
                             f"got {target_shape!r}")
    if sum(1 for s in shape if s == -1) > 1:
        raise ValueError(f"target_shape may contain at most one -1, got {target_shape!r}")
    return tuple(int(s) for s in shape)


@register
class Reshape(Layer):
    """Reshape each sample: ``(batch, *shape) -> (batch, *target_shape)``.

    Args:
        target_shape: per-sample output shape (without the batch axis); one entry may be ``-1``
            and is inferred from the element count.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, *shape)``, output ``(batch, *target_shape)`` with the same number of
        elements per sample.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> L.Reshape((3, -1))(None, np.zeros((2, 12))).shape
        (2, 3, 4)
    """

    def __init__(self, target_shape, *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.target_shape = _target_shape(target_shape)

    def compute_output_shape(self, input_shape):
        n = math.prod(input_shape)
        known = math.prod(s for s in self.target_shape if s != -1)
        if (-1 in self.target_shape and n % known) or (-1 not in self.target_shape and n != known):
            raise ValueError(f"{self.describe()} cannot reshape per-sample shape "
                             f"{tuple(input_shape)} ({n} elements) to target_shape "
                             f"{self.target_shape}")
        return tuple(n // known if s == -1 else s for s in self.target_shape)

    def forward(self, params, X, training=False, rng=None):
        shape = X.shape
        Y = X.reshape(shape[0], *self.compute_output_shape(shape[1:]))

        def backprop(dY):
            return dY.reshape(shape), {}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "target_shape": list(self.target_shape)}
