"""``Embedding``: a lookup table from integer ids to dense vectors, like ``torch.nn.Embedding``."""
from __future__ import annotations

import numpy as np

from rddtensor.layers.base import Layer, positive_int, register
from rddtensor.layers.initializers import get_initializer, initialize
from rddtensor.backend import get_array_module

__all__ = ["Embedding"]


@register
class Embedding(Layer):
    """Look up row ``X[b, t]`` of ``W``: ``Y[b, t, :] = W[X[b, t], :]``.

    ``W`` has ``torch.nn.Embedding``'s layout ``(input_dim, output_dim)`` (``weight -> W``).
    Ids are integers in ``[0, input_dim)``; float arrays holding whole numbers are accepted and
    cast (``Sequential`` feeds float32 features). The ids are not differentiable: the backprop
    closure returns ``dX = None``, so this is a first layer. ``dW`` accumulates every occurrence
    of an id (``np.add.at``).

    Padding: row ``padding_idx`` is initialised to zero and its gradient is always zero
    (PyTorch semantics), so a padding id maps to a zero vector for good. A following recurrent
    layer with ``mask_value=0.0`` then treats those steps as padding (``rddtensor.layers.recurrent``).

    Args:
        input_dim: vocabulary size (number of rows), a positive integer.
        output_dim: embedding width, a positive integer.
        padding_idx: ``None`` or the id of the padding row, in ``[-input_dim, input_dim)``
            (negative counts from the end, as in PyTorch; stored non-negative).
        mask_zero: ``True`` is shorthand for ``padding_idx=0`` (Keras' name for it).
        embeddings_initializer: name in ``rddtensor.layers.initializers.INITIALIZERS`` (default
            ``"uniform"``, Keras' ``U(-0.05, 0.05)``; ``torch.nn.Embedding`` draws ``N(0, 1)``).
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, *shape)`` of ids (usually ``(batch, time)``), output
        ``(batch, *shape, output_dim)``; param ``W`` ``(input_dim, output_dim)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.embedding import Embedding
        >>> emb = Embedding(10, 3, padding_idx=0)
        >>> emb.build((4,))
        (4, 3)
        >>> W = emb.init_params(np.random.default_rng(0))["W"]
        >>> Y, backprop = emb.forward({"W": W}, np.array([[0, 2, 2, 9]]))
        >>> dX, grads = backprop(np.ones_like(Y))
        >>> Y.shape, dX, grads["W"][2].tolist(), grads["W"][0].tolist()
        ((1, 4, 3), None, [2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    """

    def __init__(self, input_dim, output_dim, padding_idx=None, mask_zero=False,
                 embeddings_initializer="uniform", *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.input_dim = positive_int(input_dim, "input_dim")
        self.output_dim = positive_int(output_dim, "output_dim")
        if not isinstance(mask_zero, (bool, np.bool_)):
            raise ValueError(f"mask_zero must be True or False, got {mask_zero!r}")
        self.mask_zero = bool(mask_zero)
        if padding_idx is not None:
            if (isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer))
                    or not -self.input_dim <= padding_idx < self.input_dim):
                raise ValueError(f"padding_idx must be None or an integer in "
                                 f"[{-self.input_dim}, {self.input_dim}) (input_dim="
                                 f"{self.input_dim}), got {padding_idx!r}")
            padding_idx = int(padding_idx) % self.input_dim
        if self.mask_zero:
            if padding_idx not in (None, 0):
                raise ValueError(f"mask_zero=True means padding_idx=0, got padding_idx="
                                 f"{padding_idx}; pass one of them")
            padding_idx = 0
        self.padding_idx = padding_idx
        self.embeddings_initializer = get_initializer(embeddings_initializer,
                                                      "embeddings_initializer")

    def compute_output_shape(self, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"{self.describe()} needs a per-sample input shape with at least one "
                             f"axis, such as (time,), got {tuple(input_shape)}")
        return (*input_shape, self.output_dim)

    def param_shapes(self):
        return {"W": (self.input_dim, self.output_dim)}

    def init_params(self, rng, dtype=np.float32):
        W = initialize(self.embeddings_initializer, rng, (self.input_dim, self.output_dim), dtype)
        if self.padding_idx is not None:
            W[self.padding_idx] = 0
        return {"W": W}

    def forward(self, params, X, training=False, rng=None):
        W = params["W"]
        if W.shape[0] != self.input_dim:
            raise ValueError(f"{self.describe()} has input_dim={self.input_dim} but W has "
                             f"{W.shape[0]} rows")
        xp = get_array_module(W)
        ids = self._ids(xp, X)
        Y = W[ids]

        def backprop(dY):
            dW = xp.zeros(W.shape, dY.dtype)
            xp.add.at(dW, ids.reshape(-1), dY.reshape(-1, W.shape[1]))
            if self.padding_idx is not None:
                dW[self.padding_idx] = 0
            return None, {"W": dW}
        return Y, backprop

    def _ids(self, xp, X):
        """Validated integer ids: whole numbers in range, else an error naming id and row."""
        X = xp.asarray(X)
        if X.ndim < 2:
            raise ValueError(f"{self.describe()} expects a batch of ids (batch, ...), got shape "
                             f"{tuple(X.shape)}; add a batch axis with X[None]")
        if X.dtype.kind not in "iuf":
            raise ValueError(f"{self.describe()} expects integer ids (or floats holding whole "
                             f"numbers), got dtype {X.dtype}")
        if X.dtype.kind == "f":
            bad = ~(X == xp.floor(X))  # NaN fails here, +-inf in the range check below
            if bool(bad.any()):
                self._raise_at(xp, X, bad, "is not a whole number: ids must be integers")
        bad = (X < 0) | (X >= self.input_dim)
        if bool(bad.any()):
            self._raise_at(xp, X, bad, f"is out of range: ids must be in [0, {self.input_dim}) "
                                       f"(input_dim={self.input_dim})")
        return X.astype(np.intp)

    def _raise_at(self, xp, X, bad, what):
        flat = int(xp.argmax(bad.reshape(-1)))
        idx = np.unravel_index(flat, X.shape)
        value = X.reshape(-1)[flat].item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        where = f"row {idx[0]}" + (f", position {tuple(int(i) for i in idx[1:])}"
                                   if len(idx) > 2 else f", position {idx[1]}")
        raise ValueError(f"{self.describe()}: id {value} at {where} {what}")

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "padding_idx": self.padding_idx,
            "mask_zero": self.mask_zero,
            "embeddings_initializer": self.embeddings_initializer,
        }
