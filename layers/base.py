"""The layer contract every layer in ``layers/`` follows.

A layer stores and validates its configuration in ``__init__``, learns its input shape in
``build``, creates weights in ``init_params`` and computes in ``forward``, which returns the output
and a backprop closure::

    Y, backprop = layer.forward(params, X, training=True, rng=rng)
    dX, grads = backprop(dY)          # grads: dict with the same keys as params

Nothing about a batch is kept on ``self``: a layer pickles small and is safe across threads.
Shapes in ``build`` are per sample (without the batch axis). Weights use PyTorch layouts.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make a layer loadable by name from a model's JSON config."""
    _REGISTRY[cls.__name__] = cls
    return cls


def layer_class(name: str) -> type:
    """Look up a registered layer class by name (for model files); unknown names raise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown layer type {name!r}; known types: {sorted(_REGISTRY)}") from None


def positive_int(value, what: str) -> int:
    """Validate a positive integer argument, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def flag(value, what: str) -> bool:
    """Validate a True/False argument, naming it in the error."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def mask_value_arg(value):
    """Validate a ``mask_value`` argument: a finite number (a padded step's every feature
    equals it) or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"mask_value must be a finite number or None, got {value!r}")
    return float(value)


def non_negative_int(value, what: str) -> int:
    """Validate an integer argument >= 0, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def shape_tuple(shape, what: str) -> tuple:
    """Validate a per-sample shape (a positive int or a tuple of positive ints)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{what} must be a tuple of positive integers, got {shape!r}") from None
    for s in shape:
        positive_int(s, f"every entry of {what}")
    return tuple(int(s) for s in shape)


class Layer:
    """Base class of all layers.

    Args:
        input_shape: per-sample input shape, needed on the first layer of a model only.
        name: optional display name (parameter keys are positional: ``"2.W"``).
    """

    def __init__(self, *, input_shape=None, name: str | None = None):
        self.input_shape = None if input_shape is None else shape_tuple(input_shape, "input_shape")
        self.name = name
        self.output_shape = None
        self.built = False

    # --- shapes and weights -------------------------------------------------------------
    def build(self, input_shape) -> tuple:
        """Record the per-sample input shape and return the per-sample output shape."""
        input_shape = tuple(int(s) for s in input_shape)
        if self.built and self.input_shape is not None and input_shape != self.input_shape:
            raise ValueError(f"{self.describe()} was built for input shape {self.input_shape}, "
                             f"got {input_shape}")
        self.output_shape = tuple(self.compute_output_shape(input_shape))
        self.input_shape = input_shape
        self.built = True
        return self.output_shape

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def param_shapes(self) -> dict[str, tuple]:
        """Trainable parameter shapes by local key (``"W"``, ``"b"``); needs ``build`` first."""
        return {}

    def buffer_shapes(self) -> dict[str, tuple]:
        """Non-trainable state (e.g. BatchNorm running statistics) by local key.

        Buffers live in the flat vector next to the parameters and reach ``forward`` in
        ``params``. In training mode the backprop closure returns, under a buffer's key, the
        *change* this batch makes to it (``new - old``), not a gradient: the training step scales
        it by this partition's share of the global batch, the all-reduce sums the shares, and
        the update adds the sum (no optimizer, no weight decay). With running averages that is
        exactly the update on the whole global batch's statistics, averaged over partitions.
        """
        return {}

    def init_params(self, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
        """Fresh parameters and buffers for this layer (zeros unless the layer overrides it)."""
        shapes = {**self.param_shapes(), **self.buffer_shapes()}
        return {k: np.zeros(s, dtype=dtype) for k, s in shapes.items()}

    # --- compute --------------------------------------------------------------------------
    def forward(self, params: dict, X, training: bool = False, rng=None):
        """Return ``(Y, backprop)`` with ``backprop(dY) -> (dX, grads)``."""
        raise NotImplementedError

    def output_activation(self):
        """The activation this layer's output ends in, as ``(name, kwargs)``, or ``None``.

        A model whose last layer ends in ``sigmoid`` or ``softmax`` trained with a matching
        cross-entropy computes the loss from the pre-activation logits (``forward_logits``),
        fused and numerically stable, as Keras does.
        """
        return None

    def forward_logits(self, params: dict, X, training: bool = False, rng=None):
        """``forward`` without the output activation (see ``output_activation``)."""
        raise NotImplementedError(f"{self.describe()} has no output activation to leave out")

    def __call__(self, params, X, training=False, rng=None):
        return self.forward(params, X, training=training, rng=rng)[0]

    # --- config ---------------------------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-serializable constructor arguments (subclasses add their own)."""
        cfg = {}
        if self.input_shape is not None:
            cfg["input_shape"] = list(self.input_shape)
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def describe(self) -> str:
        return f"{type(self).__name__} layer" + (f" {self.name!r}" if self.name else "")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
