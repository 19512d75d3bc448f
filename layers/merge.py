"""Merge layers: ``Add``, ``Subtract``, ``Multiply``, ``Average``, ``Concatenate``, ``Dot``.

Each is called on a list of tensors (see ``rddtensor.layers.base``: ``forward`` takes a list of
arrays and ``backprop`` returns a list of input gradients, in the call's order) and has no
parameters. The element-wise ones need inputs of one shape (no broadcasting); ``Concatenate``
joins along one axis, ``Dot`` contracts one axis of each of two inputs. Axes count the batch
axis, as in Keras: ``axis=-1`` and ``axis=1`` of a ``(batch, features)`` tensor are the same.

Example (a residual connection):
    >>> import numpy as np
    >>> from rddtensor import layers as L
    >>> x = L.Input((4,))
    >>> y = L.Add()([x, L.Dense(4)(x)])
    >>> L.Add().forward({}, [np.ones((2, 3)), np.ones((2, 3))])[0].tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
"""
from __future__ import annotations

import numpy as np

from rddtensor.backend import get_array_module
from rddtensor.layers.base import Layer, flag, is_shape_list, register

__all__ = ["Add", "Subtract", "Multiply", "Average", "Concatenate", "Dot"]

#: ``Dot(normalize=True)``'s floor on a norm (``torch.nn.functional.normalize``'s eps)
NORM_EPS = 1e-12


class Merge(Layer):
    """Base of the merge layers: called on a list of ``min_inputs`` to ``max_inputs`` tensors
    (``None``: any number); no parameters."""

    min_inputs, max_inputs = 2, None

    def __init__(self, *, name=None):
        super().__init__(name=name)

    def check_inputs(self, count):
        if self.max_inputs is None:
            want = f"a list of at least {self.min_inputs} tensors"
        elif self.max_inputs == self.min_inputs:
            want = f"a list of {self.min_inputs} tensors"
        else:
            want = f"a list of {self.min_inputs} to {self.max_inputs} tensors"
        if count is None:
            raise ValueError(f"{self.describe()} takes {want} ([a, b]), got one tensor")
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            raise ValueError(f"{self.describe()} takes {want}, got {count}")

    def compute_output_shape(self, input_shape):
        if not is_shape_list(input_shape):
            raise ValueError(f"{self.describe()} is built from a list of input shapes, got "
                             f"{tuple(input_shape)}")
        self.check_inputs(len(input_shape))
        return self.merged_shape([tuple(s) for s in input_shape])

    def merged_shape(self, shapes: list) -> tuple:
        """The output shape of inputs of per-sample ``shapes`` (element-wise: all equal)."""
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"{self.describe()} needs inputs of one shape, got "
                             f"{[tuple(s) for s in shapes]}")
        return shapes[0]

    def _inputs(self, Xs):
        """The list of input arrays, checked: a list of the right length whose per-sample
        shapes fit (what ``merged_shape`` checks) and whose batch sizes agree."""
        if not isinstance(Xs, (list, tuple)):
            raise ValueError(f"{self.describe()} takes a list of arrays, got "
                             f"{type(Xs).__name__}")
        self.check_inputs(len(Xs))
        rows = {int(X.shape[0]) for X in Xs}
        if len(rows) > 1:
            raise ValueError(f"{self.describe()} got inputs with different batch sizes "
                             f"{[int(X.shape[0]) for X in Xs]}")
        self.merged_shape([tuple(X.shape[1:]) for X in Xs])
        return list(Xs)


def _fold(arrays, ufunc):
    """``ufunc`` over ``arrays`` left to right (``((a0 op a1) op a2) ...``) into a new array; the
    inputs are left as they are."""
    Y = ufunc(arrays[0], arrays[1])
    for Z in arrays[2:]:
        ufunc(Y, Z, out=Y)
    return Y


@register
class Add(Merge):
    """Element-wise sum of its inputs: ``Y = X_1 + X_2 + ...`` (a residual connection).

    Shape:
        inputs: a list of two or more ``(batch, *shape)`` of one shape; output the same shape.
    """

    def forward(self, params, X, training=False, rng=None):
        Xs = self._inputs(X)
        Y = _fold(Xs, np.add)

        def backprop(dY):
            return [dY] * len(Xs), {}
        return Y, backprop


@register
class Subtract(Merge):
    """Difference of two inputs: ``Y = X_1 - X_2``.

    Shape:
        inputs: a list of two ``(batch, *shape)`` of one shape; output the same shape.
    """

    min_inputs = max_inputs = 2

    def forward(self, params, X, training=False, rng=None):
        A, B = self._inputs(X)

        def backprop(dY):
            return [dY, -dY], {}
        return A - B, backprop


@register
class Multiply(Merge):
    """Element-wise product of its inputs: ``Y = X_1 * X_2 * ...``;
    ``dX_i = dY * prod_{j != i} X_j``.

    Shape:
        inputs: a list of two or more ``(batch, *shape)`` of one shape; output the same shape.
    """

    def forward(self, params, X, training=False, rng=None):
        Xs = self._inputs(X)
        Y = _fold(Xs, np.multiply)

        def backprop(dY):
            return [_fold([dY] + [Z for j, Z in enumerate(Xs) if j != i], np.multiply)
                    for i in range(len(Xs))], {}
        return Y, backprop


@register
class Average(Merge):
    """Element-wise mean of its inputs: ``Y = (X_1 + ... + X_n) / n``.

    Shape:
        inputs: a list of two or more ``(batch, *shape)`` of one shape; output the same shape.
    """

    def forward(self, params, X, training=False, rng=None):
        Xs = self._inputs(X)
        n = len(Xs)
        Y = _fold(Xs, np.add)
        Y *= Y.dtype.type(1.0 / n)

        def backprop(dY):
            return [dY * dY.dtype.type(1.0 / n)] * n, {}
        return Y, backprop


def _axis(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer axis (counting the batch axis, -1 the "
                         f"last), got {value!r}")
    if value == 0:
        raise ValueError(f"{what}=0 is the batch axis; merge along a feature axis (1, 2, ... "
                         "or -1, -2, ...)")
    return int(value)


def _sample_axis(layer, axis: int, rank: int, what: str) -> int:
    """``axis`` (batch axis counted, may be negative) as an index into a per-sample shape of
    ``rank`` axes, or a ``ValueError`` naming the layer."""
    a = axis - 1 if axis > 0 else axis + rank
    if not 0 <= a < rank:
        raise ValueError(f"{layer.describe()}: {what}={axis} is out of range for inputs with "
                         f"{rank} axes after the batch axis")
    return a


@register
class Concatenate(Merge):
    """Join the inputs along ``axis`` (``torch.cat(dim=axis)``).

    Args:
        axis: the axis to join along, counting the batch axis (``-1``: the last; ``1``: the
            channels of NCHW images); every other axis must match.
        name: see ``Layer``.

    Shape:
        inputs: a list of two or more ``(batch, *shape_i)`` equal except on ``axis``; output
        the same with ``axis`` the sum of theirs.
    """

    def __init__(self, axis=-1, *, name=None):
        super().__init__(name=name)
        self.axis = _axis(axis, "Concatenate axis")

    def merged_shape(self, shapes):
        ranks = {len(s) for s in shapes}
        if len(ranks) > 1:
            raise ValueError(f"{self.describe()} needs inputs with the same number of axes, got "
                             f"shapes {shapes}")
        a = _sample_axis(self, self.axis, len(shapes[0]), "axis")
        rest = [s[:a] + s[a + 1:] for s in shapes]
        if any(r != rest[0] for r in rest):
            raise ValueError(f"{self.describe()} needs inputs that match on every axis but "
                             f"axis={self.axis}, got shapes {shapes}")
        out = list(shapes[0])
        out[a] = sum(s[a] for s in shapes)
        return tuple(out)

    def forward(self, params, X, training=False, rng=None):
        Xs = self._inputs(X)
        xp = get_array_module(*Xs)
        a = 1 + _sample_axis(self, self.axis, Xs[0].ndim - 1, "axis")
        cuts = np.cumsum([Z.shape[a] for Z in Xs])[:-1].tolist()

        def backprop(dY):
            return xp.split(dY, cuts, axis=a), {}
        return xp.concatenate(Xs, axis=a), backprop

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def _axes_pair(axes):
    pair = (axes, axes) if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool) \
        else tuple(axes) if isinstance(axes, (list, tuple)) else None
    if pair is None or len(pair) != 2:
        raise ValueError(f"Dot axes must be an integer or a pair of integers (one axis of each "
                         f"input, counting the batch axis), got {axes!r}")
    return tuple(_axis(a, "Dot axes") for a in pair)


def _l2_normalize(xp, X, axis):
    """``X / max(||X||, eps)`` along ``axis`` (``torch.nn.functional.normalize``) and its
    backprop."""
    norm = xp.sqrt((X * X).sum(axis=axis, keepdims=True))
    big = norm >= NORM_EPS
    d = xp.maximum(norm, NORM_EPS)
    Xn = X / d

    def backprop(dXn):
        # d(x / |x|) = (dXn - Xn <dXn, Xn>) / |x| where |x| >= eps, dXn / eps below it
        inner = (dXn * Xn).sum(axis=axis, keepdims=True)
        return (dXn - Xn * (inner * big)) / d
    return Xn, backprop


@register
class Dot(Merge):
    """Batch dot product of two inputs along one axis of each (Keras' ``Dot``).

    ``Y[n, i..., j...] = sum_k A[n, i..., k] B[n, k, j...]`` with ``k`` running over axis
    ``axes[0]`` of ``A`` and ``axes[1]`` of ``B`` (moved into place); the output's axes are
    ``A``'s other axes, then ``B``'s. Two vectors ``(batch, d)`` with ``axes=1`` give
    ``(batch, 1)``, ``torch.sum(a * b, 1, keepdim=True)``; ``(batch, m, d)`` and ``(batch, k,
    d)`` with ``axes=2`` give ``(batch, m, k)``, ``torch.bmm(a, b.transpose(1, 2))``. With
    ``normalize=True`` both are first L2-normalised along their axis (``F.normalize``), so
    vectors give their cosine similarity.

    Args:
        axes: the axis of each input to contract (an integer for both, or a pair), counting the
            batch axis.
        normalize: L2-normalise both inputs along ``axes`` first.
        name: see ``Layer``.

    Shape:
        inputs: a list of two, ``(batch, *a)`` and ``(batch, *b)`` with ``a[axes[0]]`` ==
        ``b[axes[1]]``; output ``(batch, *a_rest, *b_rest)``, ``(batch, 1)`` when both are
        vectors.
    """

    min_inputs = max_inputs = 2

    def __init__(self, axes, normalize=False, *, name=None):
        super().__init__(name=name)
        self.axes = _axes_pair(axes)
        self.normalize = flag(normalize, "normalize")

    def _sample_axes(self, shapes):
        return tuple(_sample_axis(self, ax, len(s), f"axes[{i}]")
                     for i, (ax, s) in enumerate(zip(self.axes, shapes)))

    def merged_shape(self, shapes):
        a, b = self._sample_axes(shapes)
        if shapes[0][a] != shapes[1][b]:
            raise ValueError(f"{self.describe()} contracts axis {self.axes[0]} of shape "
                             f"{shapes[0]} (size {shapes[0][a]}) with axis {self.axes[1]} of "
                             f"shape {shapes[1]} (size {shapes[1][b]}): the sizes must match")
        rest = shapes[0][:a] + shapes[0][a + 1:] + shapes[1][:b] + shapes[1][b + 1:]
        return rest or (1,)

    def forward(self, params, X, training=False, rng=None):
        A, B = self._inputs(X)
        xp = get_array_module(A, B)
        a, b = (1 + s for s in self._sample_axes([A.shape[1:], B.shape[1:]]))
        norm_a = norm_b = None
        if self.normalize:
            A, norm_a = _l2_normalize(xp, A, a)
            B, norm_b = _l2_normalize(xp, B, b)
        N, k = A.shape[0], A.shape[a]
        Am = xp.moveaxis(A, a, -1)                  # (N, ..., k)
        Bm = xp.moveaxis(B, b, 1)                   # (N, k, ...)
        A3 = Am.reshape(N, -1, k)
        B3 = Bm.reshape(N, k, -1)
        Y3 = A3 @ B3                                # (N, P, Q)
        out_shape = (N, *self.merged_shape([A.shape[1:], B.shape[1:]]))

        def backprop(dY):
            dY3 = dY.reshape(Y3.shape)
            dA = xp.moveaxis((dY3 @ B3.swapaxes(1, 2)).reshape(Am.shape), -1, a)
            dB = xp.moveaxis((A3.swapaxes(1, 2) @ dY3).reshape(Bm.shape), 1, b)
            if norm_a is not None:
                dA, dB = norm_a(dA), norm_b(dB)
            return [dA, dB], {}
        return Y3.reshape(out_shape), backprop

    def get_config(self):
        return {**super().get_config(), "axes": list(self.axes), "normalize": self.normalize}
