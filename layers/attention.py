"""Attention layers: ``MultiHeadAttention``, ``TransformerEncoderLayer`` and ``PositionalEmbedding``.

Self-attention on ``(batch, time, embed_dim)`` inputs (PyTorch's ``batch_first=True``) with
``torch.nn.MultiheadAttention``'s weights, names and order, so a PyTorch ``state_dict`` maps
straight in (``set_weights`` matches by position)::

    in_proj_weight (3E, E), in_proj_bias (3E,), out_proj.weight (E, E), out_proj.bias (E,)

``TransformerEncoderLayer`` is ``torch.nn.TransformerEncoderLayer(batch_first=True)``: its keys
are PyTorch's ``state_dict`` keys (``self_attn.in_proj_weight`` ... ``norm2.bias``) in
``parameters()`` order. It is composed of a ``MultiHeadAttention``, two ``Dense``, two
``LayerNorm`` and ``Dropout`` layers: the attention math lives in one place.

Padding (the library's one mask convention, as the recurrent layers): with ``mask_value=v`` a
time step whose features ALL equal ``v`` is padding. Padded steps are left out as keys (PyTorch's
``key_padding_mask``) and the output there is zero, so a following layer with the same
``mask_value`` sees the same padding. ``Embedding(padding_idx=0)`` (zero vectors at padding) ->
``PositionalEmbedding(mask_value=0.0)`` (adds no position there) ->
``TransformerEncoderLayer(mask_value=0.0)`` -> ``GlobalAveragePooling1D(mask_value=0.0)`` (mean
over the real steps) is a padded-sequence Transformer classifier.

Compute: one GEMM for the q/k/v projections of all steps, batched ``matmul`` over ``(batch,
heads)`` for the scores and the weighted values, a max-shifted softmax in place, and the
FlashAttention identity ``rowsum(dP * P) = rowsum(dO * O)`` in the backward (no extra
``(batch, heads, time, time)`` temporary). The ``1/sqrt(head_dim)`` scale is folded into the
query rows of the projection weights (an ``E x E`` multiply instead of a ``T x T`` one).

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.attention import MultiHeadAttention
    >>> mha = MultiHeadAttention(8, 2, causal=True)
    >>> mha.build((5, 8))
    (5, 8)
    >>> params = mha.init_params(np.random.default_rng(0))
    >>> list(params)
    ['in_proj_weight', 'in_proj_bias', 'out_proj.weight', 'out_proj.bias']
    >>> Y, backprop = mha.forward(params, np.ones((3, 5, 8), np.float32))
    >>> dX, grads = backprop(np.ones_like(Y))
    >>> Y.shape, Y.dtype, dX.shape, grads["in_proj_weight"].shape
    ((3, 5, 8), dtype('float32'), (3, 5, 8), (24, 8))
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from rddtensor.layers.base import (Layer, flag, is_shape_list, mask_value_arg, positive_int,
                                   register)
from rddtensor.layers.core import Dropout
from rddtensor.layers.dense import Dense
from rddtensor.layers.initializers import get_initializer, initialize
from rddtensor.layers.normalization import LayerNorm
from rddtensor.layers.recurrent import valid_steps
from rddtensor.backend import get_array_module

__all__ = ["MultiHeadAttention", "TransformerEncoderLayer", "PositionalEmbedding"]

ACTIVATIONS = ("relu", "gelu")


# --- argument checks -------------------------------------------------------------------------------
def _rate(value, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            or not 0 <= value < 1):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)




def _eps(value, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    return float(value)


def _valid(X, mask_value):
    """``(batch, time)`` booleans of the real steps, or ``None`` when nothing is padding."""
    valid = valid_steps(X, mask_value)
    if valid is None or bool(valid.all()):
        return None
    return valid


def _torch_uniform(rng, shape, fan_in, dtype):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: ``torch.nn.Linear``'s default weight and bias."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    k = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-k, k, shape).astype(dtype)


def _check_sequence(layer, X, features: int):
    if X.ndim != 3:
        raise ValueError(f"{layer.describe()} expects inputs of shape (batch, time, {features}), "
                         f"got shape {tuple(X.shape)}")
    if X.shape[-1] != features:
        raise ValueError(f"{layer.describe()} expects inputs with {features} features (last "
                         f"axis), got {X.shape[-1]}")


def _check_sequence_shape(layer, input_shape, features: int):
    if len(input_shape) != 2:
        raise ValueError(f"{layer.describe()} needs a per-sample input shape (time, {features}), "
                         f"got {tuple(input_shape)}")
    if input_shape[-1] != features:
        raise ValueError(f"{layer.describe()} needs {features} features on the last axis, got "
                         f"per-sample input shape {tuple(input_shape)}")


def _ordered(grads: dict, shapes: dict) -> dict:
    """``grads`` in the order of ``shapes`` (the layer's parameter order)."""
    return {k: grads[k] for k in shapes}


def _dropout_mask(layer, rate, shape, dtype, xp, rng):
    """Inverted-dropout multiplier ``M / (1 - rate)`` drawn from ``rng`` (as ``Dropout``)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{layer.describe()} needs a random generator in training mode: the "
                         f"training step must pass rng=np.random.default_rng(seed) to forward, "
                         f"got rng={rng!r}")
    keep = xp.asarray(rng.random(shape, dtype=np.float32) >= rate)
    return xp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(dtype, copy=False)


# --- MultiHeadAttention --------------------------------------------------------------------------
@register
class MultiHeadAttention(Layer):
    """Multi-head scaled dot-product attention, as ``torch.nn.MultiheadAttention``.

    For ``X`` of shape ``(batch, T, E)``, ``[Q, K, V] = X @ in_proj_weight.T + in_proj_bias``
    split into ``num_heads`` heads of ``d = E / num_heads``; per head
    ``P = softmax(Q K^T / sqrt(d) + mask)``, ``O = dropout(P) V``; the heads are concatenated and
    ``Y = O @ out_proj.weight.T + out_proj.bias``. That is PyTorch's ``mha(X, X, X,
    need_weights=False)[0]`` with ``batch_first=True``.

    Cross-attention: called on a list ``[query, key, value]`` (``[query, value]``: the value is
    the key too), as in a graph model ``MultiHeadAttention(E, H)([q, k, v])``, it is PyTorch's
    ``mha(query, key, value)``: queries ``(batch, T, E)`` from one tensor attend over keys and
    values ``(batch, S, E)`` from others, projected by the same packed ``in_proj_weight`` (rows
    ``:E``, ``E:2E``, ``2E:``); ``backprop`` returns a list of input gradients.

    Masks: ``causal=True`` lets step ``t`` attend to steps ``<= t`` only (PyTorch's
    ``attn_mask=triu(-inf, 1)`` / ``is_causal=True``). ``mask_value=v``: a step whose features
    all equal ``v`` is padding; it is no key for any query (PyTorch's ``key_padding_mask``) and
    its output is zero (see the module docstring); in cross-attention the key's padding leaves
    out keys and the query's zeroes outputs. Masked scores get a large finite negative
    bias rather than ``-inf``, so a fully masked row (a padded query) gives no NaN.

    Dropout acts on the attention probabilities ``P`` in training only, drawing its mask from
    ``rng`` like ``Dropout``.

    Initialisation as PyTorch: ``in_proj_weight`` Xavier-uniform, ``out_proj.weight``
    ``U(-1/sqrt(E), 1/sqrt(E))`` (``nn.Linear``'s default), biases zero.

    Args:
        embed_dim: ``E``, the feature size of the input and the output.
        num_heads: number of heads; must divide ``embed_dim``.
        dropout: dropout rate on the attention probabilities, in ``[0, 1)``.
        bias: learn ``in_proj_bias`` and ``out_proj.bias``.
        causal: mask out future steps.
        mask_value: ``None`` or the feature value of padded steps (see above).
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, T, E)`` (or a list: query ``(batch, T, E)``, key and value ``(batch, S,
        E)``), output ``(batch, T, E)``; params ``in_proj_weight`` ``(3E, E)``,
        ``in_proj_bias`` ``(3E,)``, ``out_proj.weight`` ``(E, E)``, ``out_proj.bias`` ``(E,)``
        (PyTorch's names and ``parameters()`` order; the biases only with ``bias=True``).

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> model = L.Sequential([L.MultiHeadAttention(8, 4, input_shape=(6, 8)),
        ...                       L.GlobalAveragePooling1D(), L.Dense(2)], seed=0)
        >>> model.predict(np.ones((3, 6, 8), np.float32)).shape
        (3, 2)
        >>> model.layout.keys[:2]
        ['0.in_proj_weight', '0.in_proj_bias']
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, causal=False,
                 mask_value=None, *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.embed_dim = positive_int(embed_dim, "embed_dim")
        self.num_heads = positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.describe()}: embed_dim ({self.embed_dim}) must be divisible "
                             f"by num_heads ({self.num_heads})")
        self.dropout = _rate(dropout, "dropout")
        self.bias = flag(bias, "bias")
        self.causal = flag(causal, "causal")
        self.mask_value = mask_value_arg(mask_value)
        if self.input_shape is not None:
            _check_sequence_shape(self, self.input_shape, self.embed_dim)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def check_inputs(self, count):
        if count is not None and count not in (2, 3):
            raise ValueError(f"{self.describe()} takes one tensor (self-attention), [query, "
                             f"value] or [query, key, value] (cross-attention), got a list of "
                             f"{count}")

    def compute_output_shape(self, input_shape):
        if not is_shape_list(input_shape):
            _check_sequence_shape(self, input_shape, self.embed_dim)
            return tuple(input_shape)
        self.check_inputs(len(input_shape))
        for shape in input_shape:
            _check_sequence_shape(self, shape, self.embed_dim)
        if len(input_shape) == 3 and input_shape[1][0] != input_shape[2][0]:
            raise ValueError(f"{self.describe()}: key and value need the same length, got "
                             f"shapes {tuple(input_shape[-2])} and {tuple(input_shape[-1])}")
        return tuple(input_shape[0])

    def param_shapes(self):
        E = self.embed_dim
        shapes = {"in_proj_weight": (3 * E, E)}
        if self.bias:
            shapes["in_proj_bias"] = (3 * E,)
        shapes["out_proj.weight"] = (E, E)
        if self.bias:
            shapes["out_proj.bias"] = (E,)
        return shapes

    def init_params(self, rng, dtype=np.float32):
        E = self.embed_dim
        params = {"in_proj_weight": initialize("glorot_uniform", rng, (3 * E, E), dtype)}
        if self.bias:
            params["in_proj_bias"] = np.zeros(3 * E, dtype)
        params["out_proj.weight"] = _torch_uniform(rng, (E, E), E, dtype)
        if self.bias:
            params["out_proj.bias"] = np.zeros(E, dtype)
        return {k: params[k] for k in self.param_shapes()}

    def forward(self, params, X, training=False, rng=None):
        if isinstance(X, (list, tuple)):
            return self._cross_attend(params, X, training=training, rng=rng)
        _check_sequence(self, X, self.embed_dim)
        return self.attend(params, X, _valid(X, self.mask_value), training=training, rng=rng)

    def _score_bias(self, xp, valid, T, S, dtype):
        """Additive score mask ``(1 or batch, 1, T, S)`` for ``T`` queries and ``S`` keys: 0
        where allowed, a large negative (finite: ``finfo.min / 2``) where not (``valid``: the
        keys' padding); ``None`` without masks."""
        neg = float(np.finfo(dtype).min) / 2
        bias = None
        if self.causal:
            bias = xp.triu(xp.full((T, S), neg, dtype=dtype), 1)[None, None]
        if valid is not None:
            keys = xp.where(valid, 0.0, neg).astype(dtype, copy=False)[:, None, None, :]
            bias = keys if bias is None else xp.minimum(bias, keys)
        return bias

    def _scaled_in_proj(self, params, dtype):
        """``in_proj_weight`` and ``in_proj_bias`` (or ``None``) with ``1/sqrt(d)`` folded into
        the query rows: ``Q`` comes out of the projection already scaled."""
        E, scale = self.embed_dim, 1.0 / math.sqrt(self.head_dim)
        Ws = params["in_proj_weight"].astype(dtype, copy=True)
        Ws[:E] *= scale
        bs = None
        if self.bias:
            bs = params["in_proj_bias"].astype(dtype, copy=True)
            bs[:E] *= scale
        return Ws, bs

    def attend(self, params, X, valid, training=False, rng=None):
        """Self-attention of ``X`` ``(batch, T, E)`` with an explicit padding mask.

        ``valid`` is ``None`` or ``(batch, T)`` booleans (False: padding, no key, zero output).
        ``TransformerEncoderLayer`` calls this with the mask of its own input. Returns
        ``(Y, backprop)`` like ``forward``.
        """
        xp = get_array_module(X)
        N, T, E = X.shape
        H, d = self.num_heads, self.head_dim
        dtype = X.dtype
        scale = 1.0 / math.sqrt(d)
        Ws, bs = self._scaled_in_proj(params, dtype)
        X2 = X.reshape(N * T, E)
        QKV = X2 @ Ws.T                                     # (N*T, 3E): one GEMM for all steps
        if bs is not None:
            QKV += bs
        Q, K, V = QKV.reshape(N, T, 3, H, d).transpose(2, 0, 3, 1, 4)  # views (N, H, T, d)
        Y, core_backprop = self._attention(params, Q, K, V, self._score_bias(xp, valid, T, T,
                                                                             dtype),
                                           valid, training, rng)

        def backprop(dY):
            dQKV = xp.empty((N, T, 3, H, d), dtype=dY.dtype)
            dQ, dK, dV = dQKV.transpose(2, 0, 3, 1, 4)     # views (N, H, T, d) into dQKV
            grads = core_backprop(dY, dQ, dK, dV)
            dQKV2 = dQKV.reshape(N * T, 3 * E)
            dW = dQKV2.T @ X2
            dW[:E] *= scale                                 # the folded scale, back on W_q
            grads["in_proj_weight"] = dW
            if self.bias:
                db = dQKV2.sum(axis=0)
                db[:E] *= scale
                grads["in_proj_bias"] = db
            dX = (dQKV2 @ Ws).reshape(N, T, E)
            return dX, _ordered(grads, self.param_shapes())
        return Y, backprop

    def _cross_attend(self, params, Xs, training=False, rng=None):
        """Cross-attention of ``[query, key, value]`` (``[query, value]``: the value is the
        key too): PyTorch's ``mha(query, key, value)`` with the packed ``in_proj_weight``
        (rows ``:E`` project the query, ``E:2E`` the key, ``2E:`` the value). Padding
        (``mask_value``) is read from the key (no key) and the query (zero output)."""
        self.check_inputs(len(Xs))
        for Z in Xs:
            _check_sequence(self, Z, self.embed_dim)
        Xq, Xk, Xv = Xs if len(Xs) == 3 else (Xs[0], Xs[1], Xs[1])
        if Xk.shape[:2] != Xv.shape[:2] or Xq.shape[0] != Xk.shape[0]:
            raise ValueError(f"{self.describe()}: query (batch, T, E), key and value (batch, S, "
                             f"E) must agree, got shapes {[tuple(Z.shape) for Z in Xs]}")
        xp = get_array_module(Xq)
        (N, T, E), S = Xq.shape, Xk.shape[1]
        H, d = self.num_heads, self.head_dim
        dtype = Xq.dtype
        scale = 1.0 / math.sqrt(d)
        Ws, bs = self._scaled_in_proj(params, dtype)
        rows = [slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E)]
        flat = [Z.reshape(-1, E) for Z in (Xq, Xk, Xv)]
        heads = []
        for Z2, r, L in zip(flat, rows, (T, S, S)):
            P = Z2 @ Ws[r].T
            if bs is not None:
                P += bs[r]
            heads.append(P.reshape(N, L, H, d).transpose(0, 2, 1, 3))  # (N, H, L, d) view
        valid_q, valid_k = _valid(Xq, self.mask_value), _valid(Xk, self.mask_value)
        Y, core_backprop = self._attention(params, *heads,
                                           self._score_bias(xp, valid_k, T, S, dtype), valid_q,
                                           training, rng)

        def backprop(dY):
            bufs = [xp.empty((N, L, H, d), dtype=dY.dtype) for L in (T, S, S)]
            grads = core_backprop(dY, *(B.transpose(0, 2, 1, 3) for B in bufs))
            dW = xp.empty_like(Ws)
            db = xp.empty(3 * E, dtype=dY.dtype) if self.bias else None
            dXs = []
            for B, Z2, r in zip(bufs, flat, rows):
                dP2 = B.reshape(-1, E)
                dW[r] = dP2.T @ Z2
                if db is not None:
                    db[r] = dP2.sum(axis=0)
                dXs.append((dP2 @ Ws[r]).reshape(N, -1, E))
            dW[:E] *= scale                                 # the folded scale, back on W_q
            grads["in_proj_weight"] = dW
            if db is not None:
                db[:E] *= scale
                grads["in_proj_bias"] = db
            if len(Xs) == 2:
                dXs = [dXs[0], dXs[1] + dXs[2]]             # the value was the key too
            return dXs, _ordered(grads, self.param_shapes())
        return Y, backprop

    def _attention(self, params, Q, K, V, bias, valid_q, training, rng):
        """From projected heads ``Q`` (scaled), ``K``, ``V`` ``(N, H, T or S, d)``: softmax
        attention, dropout, the heads side by side and the output projection; ``Y`` ``(N, T,
        E)`` (zero at padded queries) and ``backprop(dY, dQ, dK, dV)``, which writes the
        heads' gradients into the given views and returns the output projection's grads."""
        xp = get_array_module(Q)
        N, H, T, d = Q.shape
        E = self.embed_dim
        dtype = Q.dtype
        W_out = params["out_proj.weight"]
        b_out = params["out_proj.bias"] if self.bias else None
        # NumPy's stacked matmul only calls BLAS when the right operand's rows are contiguous,
        # so K^T is made contiguous once (a (N, H, d, S) copy, small next to the scores)
        S = Q @ xp.ascontiguousarray(K.swapaxes(-1, -2))  # (N, H, T, S) scaled scores
        if bias is not None:
            S += bias
        S -= S.max(axis=-1, keepdims=True)                  # softmax in place, overflow-free
        xp.exp(S, out=S)
        S *= 1.0 / S.sum(axis=-1, keepdims=True)
        P = S
        M = None
        if training and self.dropout > 0.0:
            M = _dropout_mask(self, self.dropout, P.shape, dtype, xp, rng)
            Pd = P * M
        else:
            Pd = P
        Obuf = xp.empty((N, T, H, d), dtype=dtype)          # heads side by side: (N*T, E) rows
        O = Obuf.transpose(0, 2, 1, 3)                      # (N, H, T, d) view
        xp.matmul(Pd, V, out=O)
        O2 = Obuf.reshape(N * T, E)
        Y = O2 @ W_out.T
        if b_out is not None:
            Y += b_out
        Y = Y.reshape(N, T, E)
        vmask = None if valid_q is None else valid_q[:, :, None]
        if vmask is not None:
            Y *= vmask                                      # zero output at padded steps

        def backprop(dY, dQ, dK, dV):
            if vmask is not None:
                dY = dY * vmask
            dY2 = xp.ascontiguousarray(dY.reshape(N * T, E))
            grads = {"out_proj.weight": dY2.T @ O2}
            if self.bias:
                grads["out_proj.bias"] = dY2.sum(axis=0)
            dO = (dY2 @ W_out).reshape(N, T, H, d).transpose(0, 2, 1, 3)  # (N, H, T, d) view
            xp.matmul(Pd.swapaxes(-1, -2), dO, out=dV)
            dP = dO @ xp.ascontiguousarray(V.swapaxes(-1, -2))  # (N, H, T, S)
            if M is not None:
                dP *= M
            # softmax backward: dS = P * (dP - rowsum(dP * P)), rowsum(dP * P) = rowsum(dO * O)
            delta = (dO * O).sum(axis=-1, keepdims=True)
            dP -= delta
            dP *= P
            xp.matmul(dP, K, out=dQ)
            xp.matmul(dP.swapaxes(-1, -2), Q, out=dK)
            return grads
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim,
                "num_heads": self.num_heads, "dropout": self.dropout, "bias": self.bias,
                "causal": self.causal, "mask_value": self.mask_value}


# --- TransformerEncoderLayer ---------------------------------------------------------------------
#: our key -> (sub-layer attribute, the sub-layer's own key), in PyTorch's parameters() order
_TEL_KEYS = {
    "self_attn.in_proj_weight": ("self_attn", "in_proj_weight"),
    "self_attn.in_proj_bias": ("self_attn", "in_proj_bias"),
    "self_attn.out_proj.weight": ("self_attn", "out_proj.weight"),
    "self_attn.out_proj.bias": ("self_attn", "out_proj.bias"),
    "linear1.weight": ("linear1", "W"),
    "linear1.bias": ("linear1", "b"),
    "linear2.weight": ("linear2", "W"),
    "linear2.bias": ("linear2", "b"),
    "norm1.weight": ("norm1", "W"),
    "norm1.bias": ("norm1", "b"),
    "norm2.weight": ("norm2", "W"),
    "norm2.bias": ("norm2", "b"),
}
_SUBLAYERS = ("self_attn", "linear1", "linear2", "norm1", "norm2")


@register
class TransformerEncoderLayer(Layer):
    """A Transformer encoder block, as ``torch.nn.TransformerEncoderLayer(batch_first=True)``.

    Post-norm (``norm_first=False``, PyTorch's default)::

        X = norm1(X + dropout1(self_attn(X)))
        Y = norm2(X + dropout2(linear2(dropout(activation(linear1(X))))))

    Pre-norm (``norm_first=True``)::

        X = X + dropout1(self_attn(norm1(X)))
        Y = X + dropout2(linear2(dropout(activation(linear1(norm2(X))))))

    ``self_attn`` is a ``MultiHeadAttention(d_model, nhead, dropout)`` (its dropout on the
    attention probabilities, as PyTorch), ``linear1``/``linear2`` are ``Dense`` layers and
    ``norm1``/``norm2`` ``LayerNorm`` layers; the three dropouts sit where PyTorch's do and act in
    training only. Initialisation as PyTorch (``nn.Linear``'s default for the linears, ones and
    zeros for the norms, ``MultiHeadAttention``'s for the attention).

    With ``mask_value=v`` the padded steps of the input (all features equal to ``v``) are no keys
    (PyTorch's ``src_key_padding_mask``) and the output there is zero, so a stacked layer with the
    same ``mask_value`` sees the same padding; at the real steps the output is PyTorch's.

    Args:
        d_model: feature size ``E`` of the input and the output.
        nhead: number of attention heads; must divide ``d_model``.
        dim_feedforward: width of the feed-forward block.
        dropout: rate of every dropout (attention probabilities included), in ``[0, 1)``.
        activation: ``"relu"`` or ``"gelu"`` (exact, erf-based, as PyTorch's ``F.gelu``).
        norm_first: pre-norm instead of post-norm.
        layer_norm_eps: ``eps`` of both ``LayerNorm`` layers.
        causal: causal self-attention (PyTorch's ``is_causal=True`` with a ``triu`` mask).
        mask_value: ``None`` or the feature value of padded steps (see above).
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, T, d_model)``, output the same; params (PyTorch's ``state_dict`` keys,
        in its ``parameters()`` order): ``self_attn.in_proj_weight`` ``(3E, E)``,
        ``self_attn.in_proj_bias`` ``(3E,)``, ``self_attn.out_proj.weight`` ``(E, E)``,
        ``self_attn.out_proj.bias`` ``(E,)``, ``linear1.weight`` ``(F, E)``, ``linear1.bias``
        ``(F,)``, ``linear2.weight`` ``(E, F)``, ``linear2.bias`` ``(E,)``, ``norm1.weight``,
        ``norm1.bias``, ``norm2.weight``, ``norm2.bias`` ``(E,)``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> enc = L.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0)
        >>> enc.build((10, 16))
        (10, 16)
        >>> params = enc.init_params(np.random.default_rng(0))
        >>> list(params)[4:8]
        ['linear1.weight', 'linear1.bias', 'linear2.weight', 'linear2.bias']
        >>> enc(params, np.ones((2, 10, 16), np.float32)).shape
        (2, 10, 16)
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 norm_first=False, layer_norm_eps=1e-5, causal=False, mask_value=None, *,
                 input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.d_model = positive_int(d_model, "d_model")
        self.nhead = positive_int(nhead, "nhead")
        if self.d_model % self.nhead:
            raise ValueError(f"{self.describe()}: d_model ({self.d_model}) must be divisible by "
                             f"nhead ({self.nhead})")
        self.dim_feedforward = positive_int(dim_feedforward, "dim_feedforward")
        self.dropout = _rate(dropout, "dropout")
        key = activation.lower() if isinstance(activation, str) else None
        if key not in ACTIVATIONS:
            raise ValueError(f"{self.describe()}: activation must be 'relu' or 'gelu', got "
                             f"{activation!r}")
        self.activation = key
        self.norm_first = flag(norm_first, "norm_first")
        self.layer_norm_eps = _eps(layer_norm_eps, "layer_norm_eps")
        self.causal = flag(causal, "causal")
        self.mask_value = mask_value_arg(mask_value)
        if self.input_shape is not None:
            _check_sequence_shape(self, self.input_shape, self.d_model)
        E, F = self.d_model, self.dim_feedforward
        self.self_attn = MultiHeadAttention(E, self.nhead, dropout=self.dropout,
                                            causal=self.causal)
        self.linear1 = Dense(F, activation=self.activation)  # exact GELU: approximate="none"
        self.linear2 = Dense(E)
        self.linear1.build((E,))  # the linears act on the last axis: (batch, T, E) works as is
        self.linear2.build((F,))
        self.norm1 = LayerNorm((E,), eps=self.layer_norm_eps)
        self.norm2 = LayerNorm((E,), eps=self.layer_norm_eps)
        self.dropout1 = Dropout(self.dropout)
        self.dropout_ff = Dropout(self.dropout)
        self.dropout2 = Dropout(self.dropout)

    def compute_output_shape(self, input_shape):
        _check_sequence_shape(self, input_shape, self.d_model)
        return tuple(input_shape)

    def param_shapes(self):
        shapes = {}
        for key, (sub, k) in _TEL_KEYS.items():
            shapes[key] = getattr(self, sub).param_shapes()[k]
        return shapes

    def init_params(self, rng, dtype=np.float32):
        E, F = self.d_model, self.dim_feedforward
        p = self.self_attn.init_params(rng, dtype)
        params = {f"self_attn.{k}": v for k, v in p.items()}
        params["linear1.weight"] = _torch_uniform(rng, (F, E), E, dtype)
        params["linear1.bias"] = _torch_uniform(rng, (F,), E, dtype)
        params["linear2.weight"] = _torch_uniform(rng, (E, F), F, dtype)
        params["linear2.bias"] = _torch_uniform(rng, (E,), F, dtype)
        for norm in ("norm1", "norm2"):
            params[f"{norm}.weight"] = np.ones(E, dtype)
            params[f"{norm}.bias"] = np.zeros(E, dtype)
        return params

    def _split(self, params):
        subs = {s: {} for s in _SUBLAYERS}
        for key, (sub, k) in _TEL_KEYS.items():
            subs[sub][k] = params[key]
        return subs

    def forward(self, params, X, training=False, rng=None):
        _check_sequence(self, X, self.d_model)
        p = self._split(params)
        valid = _valid(X, self.mask_value)
        E = self.d_model
        kw = {"training": training, "rng": rng}
        backprops = {}

        def attention_block(Z):
            A, backprops["attn"] = self.self_attn.attend(p["self_attn"], Z, valid, **kw)
            A, backprops["drop1"] = self.dropout1.forward({}, A, **kw)
            return A

        def feed_forward(Z):
            # on (batch*T, E) rows: NumPy's matmul of a 3-D array runs one small GEMM per
            # sample (about 3x slower here than the one 2-D GEMM)
            F, backprops["lin1"] = self.linear1.forward(p["linear1"], Z.reshape(-1, E), **kw)
            F, backprops["drop_ff"] = self.dropout_ff.forward({}, F, **kw)
            F, backprops["lin2"] = self.linear2.forward(p["linear2"], F, **kw)
            F, backprops["drop2"] = self.dropout2.forward({}, F, **kw)
            return F.reshape(Z.shape)

        if self.norm_first:
            Z, backprops["norm1"] = self.norm1.forward(p["norm1"], X, **kw)
            X1 = X + attention_block(Z)
            Z, backprops["norm2"] = self.norm2.forward(p["norm2"], X1, **kw)
            Y = X1 + feed_forward(Z)
        else:
            X1, backprops["norm1"] = self.norm1.forward(p["norm1"], X + attention_block(X), **kw)
            Y, backprops["norm2"] = self.norm2.forward(p["norm2"], X1 + feed_forward(X1), **kw)
        vmask = None if valid is None else valid[:, :, None]
        if vmask is not None:
            Y = Y * vmask  # zero at padded steps: the mask carries on to a stacked layer

        def run(name, dY, sub=None, grads=None):
            dX, g = backprops[name](dY)
            if sub is not None:
                grads[sub] = g
            return dX

        def backprop_attention(dA, grads):
            dA = run("drop1", dA)
            return run("attn", dA, "self_attn", grads)

        def backprop_feed_forward(dF, grads):
            shape = dF.shape
            dF = run("drop2", dF.reshape(-1, E))
            dF = run("lin2", dF, "linear2", grads)
            dF = run("drop_ff", dF)
            return run("lin1", dF, "linear1", grads).reshape(shape)

        def backprop(dY):
            if vmask is not None:
                dY = dY * vmask
            grads = {}
            if self.norm_first:
                dX1 = dY + run("norm2", backprop_feed_forward(dY, grads), "norm2", grads)
                dX = dX1 + run("norm1", backprop_attention(dX1, grads), "norm1", grads)
            else:
                dS2 = run("norm2", dY, "norm2", grads)
                dX1 = dS2 + backprop_feed_forward(dS2, grads)
                dS1 = run("norm1", dX1, "norm1", grads)
                dX = dS1 + backprop_attention(dS1, grads)
            return dX, {key: grads[sub][k] for key, (sub, k) in _TEL_KEYS.items()}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "nhead": self.nhead,
                "dim_feedforward": self.dim_feedforward, "dropout": self.dropout,
                "activation": self.activation, "norm_first": self.norm_first,
                "layer_norm_eps": self.layer_norm_eps, "causal": self.causal,
                "mask_value": self.mask_value}


# --- PositionalEmbedding -------------------------------------------------------------------------
@register
class PositionalEmbedding(Layer):
    """Learned absolute positions added to a sequence: ``Y[b, t, :] = X[b, t, :] + W[t, :]``.

    ``W`` has ``torch.nn.Embedding``'s layout ``(max_length, dim)``; PyTorch's equivalent is
    ``X + pos(torch.arange(T))`` with ``pos = nn.Embedding(max_length, dim)``. Sequences may be
    shorter than ``max_length`` (rows ``T..`` then get no gradient), never longer.

    With ``mask_value=v`` a step whose features all equal ``v`` is padding and gets no position
    (it stays padding for the next layer, see ``rddtensor.layers.attention``).

    Args:
        max_length: the longest sequence, a positive integer (rows of ``W``).
        dim: feature size, a positive integer.
        mask_value: ``None`` or the feature value of padded steps.
        embeddings_initializer: name in ``rddtensor.layers.initializers.INITIALIZERS`` (default
            ``"uniform"`` as ``Embedding``; ``torch.nn.Embedding`` draws ``N(0, 1)``).
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, T, dim)`` with ``T <= max_length``, output the same; param ``W``
        ``(max_length, dim)``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> pos = L.PositionalEmbedding(4, 2)
        >>> pos.build((3, 2))
        (3, 2)
        >>> pos({"W": np.arange(8.0).reshape(4, 2)}, np.zeros((1, 3, 2)))
        array([[[0., 1.],
                [2., 3.],
                [4., 5.]]])
    """

    def __init__(self, max_length, dim, mask_value=None, embeddings_initializer="uniform", *,
                 input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.max_length = positive_int(max_length, "max_length")
        self.dim = positive_int(dim, "dim")
        self.mask_value = mask_value_arg(mask_value)
        self.embeddings_initializer = get_initializer(embeddings_initializer,
                                                      "embeddings_initializer")
        if self.input_shape is not None:
            self.compute_output_shape(self.input_shape)

    def compute_output_shape(self, input_shape):
        _check_sequence_shape(self, input_shape, self.dim)
        self._check_length(input_shape[0])
        return tuple(input_shape)

    def _check_length(self, T):
        if T > self.max_length:
            raise ValueError(f"{self.describe()}: sequences of length {T} are longer than "
                             f"max_length={self.max_length}")

    def param_shapes(self):
        return {"W": (self.max_length, self.dim)}

    def init_params(self, rng, dtype=np.float32):
        return {"W": initialize(self.embeddings_initializer, rng, (self.max_length, self.dim),
                                dtype)}

    def forward(self, params, X, training=False, rng=None):
        _check_sequence(self, X, self.dim)
        W = params["W"]
        if W.shape != (self.max_length, self.dim):
            raise ValueError(f"{self.describe()} expects W of shape {(self.max_length, self.dim)}, "
                             f"got {tuple(W.shape)}")
        xp = get_array_module(X)
        T = X.shape[1]
        self._check_length(T)
        valid = _valid(X, self.mask_value)
        vmask = None if valid is None else valid[:, :, None]
        Y = X + W[:T] if vmask is None else X + W[:T] * vmask

        def backprop(dY):
            dW = xp.zeros(W.shape, dtype=dY.dtype)
            dW[:T] = (dY if vmask is None else dY * vmask).sum(axis=0)
            return dY, {"W": dW}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length, "dim": self.dim,
                "mask_value": self.mask_value,
                "embeddings_initializer": self.embeddings_initializer}
