"""Layers that wrap another layer: ``Bidirectional`` (a recurrent layer both ways along time) and
``TimeDistributed`` (a layer applied to every time step).

A wrapper exposes its inner layers' parameters under dotted keys (``"forward.W_ih"``,
``"backward.W_ih"``, ``"layer.W"``; in a ``Sequential`` they become ``"0.forward.W_ih"``), and its
config nests each inner layer as ``{"class_name": ..., "config": ...}``, read back through the
layer registry (``rddtensor.layers.base.layer_class``).
"""
from __future__ import annotations

import numpy as np

from rddtensor.layers.base import Layer, layer_class, register
from rddtensor.layers.recurrent import Recurrent, valid_steps
from rddtensor.backend import get_array_module

__all__ = ["Bidirectional", "TimeDistributed", "serialize_layer", "deserialize_layer"]

MERGE_MODES = ("concat", "sum", "mul", "ave")


def serialize_layer(layer: Layer) -> dict:
    """``{"class_name": ..., "config": ...}`` of a layer, the form ``Sequential`` files use."""
    return {"class_name": type(layer).__name__, "config": layer.get_config()}


def deserialize_layer(config, what: str = "layer") -> Layer:
    """Rebuild a layer from ``serialize_layer``'s dict (only registered layer types load)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{what} must be a Layer or a dict with 'class_name' and 'config', "
                         f"got {config!r}")
    return layer_class(config["class_name"]).from_config(dict(config.get("config", {})))


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def _sub(params: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _check_layer(layer, what="layer"):
    if not isinstance(layer, Layer):
        raise ValueError(f"{what} must be a Layer instance, got {type(layer).__name__} {layer!r}")
    return layer


def reverse_index(valid, xp):
    """Per-row gather index ``(batch, time)`` that reverses the real steps of each row in place.

    Padded positions map to themselves and the real steps are reversed among themselves, wherever
    the padding is (after, before or in between). It is its own inverse.
    """
    batch, T = valid.shape
    rank = xp.cumsum(valid, axis=1) - 1               # rank of each real step in its row
    count = rank[:, -1:] + 1                          # real steps per row
    pos = xp.zeros((batch, T), dtype=np.intp)         # pos[b, k]: position of real step k
    rows, cols = xp.nonzero(valid)
    pos[rows, rank[rows, cols]] = cols
    mirrored = xp.take_along_axis(pos, xp.clip(count - 1 - rank, 0, T - 1), axis=1)
    return xp.where(valid, mirrored, xp.arange(T)[None, :])


@register
class Bidirectional(Layer):
    """Run a recurrent layer forwards and a copy of it backwards in time, and merge the outputs.

    The backward copy (same config, its own weights) reads each sequence's real steps in
    reverse; with the inner layer's ``mask_value`` padded steps stay where they are, so the
    backward direction starts at a row's last real step, as PyTorch's ``bidirectional=True`` on
    a packed sequence. With ``return_sequences=True`` the backward outputs are put back in
    forward time order; otherwise each direction contributes its final state (``h_n``)::

        Y = merge(layer(X), reverse(layer_backward(reverse(X))))

    ``merge_mode`` is ``"concat"`` (``[Y_f, Y_b]`` on the last axis, PyTorch's layout),
    ``"sum"`` (``Y_f + Y_b``), ``"mul"`` (``Y_f * Y_b``) or ``"ave"`` (``(Y_f + Y_b) / 2``).

    Args:
        layer: a ``SimpleRNN``, ``LSTM`` or ``GRU`` (its ``input_shape`` is adopted if given).
        merge_mode: see above.
        input_shape, name: see ``Layer``.

    Shape:
        input ``(batch, time, n_in)``; output as the inner layer's with the last axis doubled
        for ``"concat"``; params ``forward.<key>`` and ``backward.<key>`` for each inner key
        (PyTorch's ``weight_ih_l0`` and ``weight_ih_l0_reverse``).

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> from rddtensor.layers.recurrent import GRU
        >>> from rddtensor.layers.wrappers import Bidirectional
        >>> model = L.Sequential([Bidirectional(GRU(4), input_shape=(6, 3)), L.Dense(2)], seed=0)
        >>> model.predict(np.ones((5, 6, 3), np.float32)).shape
        (5, 2)
        >>> model.layout.keys[:2]
        ['0.forward.W_ih', '0.forward.W_hh']
    """

    def __init__(self, layer, merge_mode="concat", *, input_shape=None, name=None):
        _check_layer(layer)
        if not isinstance(layer, Recurrent):
            raise ValueError(f"layer must be a recurrent layer (SimpleRNN, LSTM, GRU), got "
                             f"{type(layer).__name__}")
        if input_shape is None:
            input_shape = layer.input_shape
        super().__init__(input_shape=input_shape, name=name)
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {list(MERGE_MODES)}, got {merge_mode!r}")
        self.merge_mode = merge_mode
        self.forward_layer = layer
        self.backward_layer = type(layer).from_config(layer.get_config())
        self.return_sequences = layer.return_sequences

    def compute_output_shape(self, input_shape):
        out = self.forward_layer.build(input_shape)
        self.backward_layer.build(input_shape)
        if self.merge_mode == "concat":
            return (*out[:-1], 2 * out[-1])
        return out

    def param_shapes(self):
        return {**_prefixed("forward", self.forward_layer.param_shapes()),
                **_prefixed("backward", self.backward_layer.param_shapes())}

    def buffer_shapes(self):
        return {**_prefixed("forward", self.forward_layer.buffer_shapes()),
                **_prefixed("backward", self.backward_layer.buffer_shapes())}

    def init_params(self, rng, dtype=np.float32):
        return {**_prefixed("forward", self.forward_layer.init_params(rng, dtype)),
                **_prefixed("backward", self.backward_layer.init_params(rng, dtype))}

    def forward(self, params, X, training=False, rng=None):
        xp = get_array_module(X)
        if X.ndim != 3:
            raise ValueError(f"{self.describe()} expects inputs of shape (batch, time, features), "
                             f"got shape {tuple(X.shape)}")
        reverse = self._reverser(xp, X)
        Yf, bp_f = self.forward_layer.forward(_sub(params, "forward"), X, training, rng)
        Yb, bp_b = self.backward_layer.forward(_sub(params, "backward"), reverse(X), training,
                                               rng)
        if self.return_sequences:
            Yb = reverse(Yb)
        Y, merge_bp = self._merge(xp, Yf, Yb)

        def backprop(dY):
            dYf, dYb = merge_bp(dY)
            if self.return_sequences:
                dYb = reverse(dYb)
            dXf, gf = bp_f(dYf)
            dXb, gb = bp_b(dYb)
            grads = {**_prefixed("forward", gf), **_prefixed("backward", gb)}
            return dXf + reverse(dXb), grads
        return Y, backprop

    def _reverser(self, xp, X):
        """A function reversing the real steps of each row along axis 1 (its own inverse)."""
        valid = valid_steps(X, self.forward_layer.mask_value)
        if valid is None or bool(valid.all()):
            return lambda A: A[:, ::-1]
        index = reverse_index(valid, xp)
        rows = xp.arange(X.shape[0])[:, None]
        return lambda A: A[rows, index]

    def _merge(self, xp, Yf, Yb):
        mode = self.merge_mode
        if mode == "concat":
            u = Yf.shape[-1]
            return xp.concatenate([Yf, Yb], axis=-1), lambda dY: (dY[..., :u], dY[..., u:])
        if mode == "sum":
            return Yf + Yb, lambda dY: (dY, dY)
        if mode == "ave":
            return (Yf + Yb) * 0.5, lambda dY: (dY * 0.5, dY * 0.5)
        return Yf * Yb, lambda dY: (dY * Yb, dY * Yf)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(layer=serialize_layer(self.forward_layer), merge_mode=self.merge_mode)
        return cfg

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = deserialize_layer(config.get("layer"))
        return cls(**config)


@register
class TimeDistributed(Layer):
    """Apply ``layer`` to every time step: ``Y[:, t] = layer(X[:, t])``, one call for all steps.

    Time is folded into the batch (``(batch, time, ...) -> (batch * time, ...)``), so the inner
    layer sees one big batch; its parameters are shared across steps. A ``dX`` of ``None`` from
    the inner layer (``Embedding``) stays ``None``.

    Args:
        layer: any layer taking per-step inputs (``Dense``, ``Conv2D``, ``Dropout``, ...).
        input_shape, name: see ``Layer`` (``input_shape`` is ``(time, *step_shape)``).

    Shape:
        input ``(batch, time, *step_shape)``, output ``(batch, time, *layer_output_shape)``;
        params ``layer.<key>`` for each key of the inner layer.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> from rddtensor.layers.wrappers import TimeDistributed
        >>> td = TimeDistributed(L.Dense(2))
        >>> td.build((5, 3))
        (5, 2)
        >>> td(td.init_params(np.random.default_rng(0)), np.ones((4, 5, 3))).shape
        (4, 5, 2)
    """

    def __init__(self, layer, *, input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.layer = _check_layer(layer)

    def compute_output_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"{self.describe()} needs a per-sample input shape (time, ...) with "
                             f"at least two axes, got {tuple(input_shape)}")
        return (input_shape[0], *self.layer.build(tuple(input_shape[1:])))

    def param_shapes(self):
        return _prefixed("layer", self.layer.param_shapes())

    def buffer_shapes(self):
        return _prefixed("layer", self.layer.buffer_shapes())

    def init_params(self, rng, dtype=np.float32):
        return _prefixed("layer", self.layer.init_params(rng, dtype))

    def forward(self, params, X, training=False, rng=None):
        return self._forward(self.layer.forward, params, X, training, rng)

    def output_activation(self):
        return self.layer.output_activation()

    def forward_logits(self, params, X, training=False, rng=None):
        return self._forward(self.layer.forward_logits, params, X, training, rng)

    def _forward(self, inner_forward, params, X, training, rng):
        if X.ndim < 3:
            raise ValueError(f"{self.describe()} expects inputs of shape (batch, time, ...), got "
                             f"shape {tuple(X.shape)}")
        batch, T = X.shape[:2]
        Yf, bp = inner_forward(_sub(params, "layer"), X.reshape(batch * T, *X.shape[2:]),
                               training, rng)
        Y = Yf.reshape(batch, T, *Yf.shape[1:])

        def backprop(dY):
            dXf, grads = bp(dY.reshape(batch * T, *dY.shape[2:]))
            dX = None if dXf is None else dXf.reshape(X.shape)
            return dX, _prefixed("layer", grads)
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "layer": serialize_layer(self.layer)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = deserialize_layer(config.get("layer"))
        return cls(**config)
