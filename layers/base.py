"""The layer contract every layer in ``layers/`` follows.

A layer stores and validates its configuration in ``__init__``, learns its input shape in
``build``, creates weights in ``init_params`` and computes in ``forward``, which returns the output
and a backprop closure::

    Y, backprop = layer.forward(params, X, training=True, rng=rng)
    dX, grads = backprop(dY)          # grads: dict with the same keys as params

Nothing about a batch is kept on ``self``: a layer pickles small and is safe across threads.
Shapes in ``build`` are per sample (without the batch axis). Weights use PyTorch layouts.
``backprop`` never changes ``dY`` in place: in a graph model one gradient array may reach
several layers.

Layers with several inputs (the merge layers, ``MultiHeadAttention`` for cross-attention) are
called on a list, and everything comes as a list, in the call's order::

    layer.build([shape_a, shape_b])                  # -> one output shape
    Y, backprop = layer.forward(params, [A, B], training=True, rng=rng)
    [dA, dB], grads = backprop(dY)                   # one input gradient per input

``check_inputs`` says which calls a layer takes (one array, or a list of how many); the default
is one array, so a single-input layer never sees a list.

Building graphs (Keras' functional API): ``Input(shape)`` is a ``SymbolicTensor``, and calling a
layer on symbolic tensors (``Dense(4)(x)``, ``Add()([a, b])``) builds the layer for their shapes
and returns the symbolic tensor of its output, which records the call. ``Model(inputs,
outputs)`` (the training floor) reads those records; this floor holds no model.
"""
from __future__ import annotations

import itertools
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


def layers_from_config(configs) -> list:
    """The layers of a model config's ``"layers"`` list (``{"class_name": ..., "config":
    ...}`` each): only registered types, every setting validated by its class; an error names
    the layer's position and type."""
    if not isinstance(configs, list):
        raise ValueError(f"'layers' must be a list of layer configs, got {type(configs).__name__}")
    layers = []
    for i, c in enumerate(configs):
        if not isinstance(c, dict) or not isinstance(c.get("class_name"), str) or \
                not isinstance(c.get("config", {}), dict):
            raise ValueError(f"layer {i} must be {{'class_name': str, 'config': dict}}, got "
                             f"{str(c)[:80]}")
        cls = layer_class(c["class_name"])  # registered types only: unknown names raise
        try:
            layers.append(cls.from_config(dict(c.get("config", {}))))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"layer {i} ({c['class_name']}) has an invalid config: {e}") from None
    return layers


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


def is_shape_list(shape) -> bool:
    """True for a list of per-sample shapes (what a layer called on a list is built from),
    False for one shape."""
    return isinstance(shape, (list, tuple)) and len(shape) > 0 and \
        all(isinstance(s, (list, tuple)) for s in shape)


# --- symbolic tensors: the records calls on them leave, read by Model(inputs, outputs) ---------
class SymbolicTensor:
    """A placeholder for a batch while a model is described, not data.

    ``Input(shape)`` makes one; calling a layer on symbolic tensors makes the layer's output one,
    which remembers the call: ``layer``, its ``inputs`` (a tuple of symbolic tensors) and whether
    they came as a list (``as_list``). ``order`` counts the calls in the order they were made,
    which is the order a model computes them in (every input exists before its consumers).

    Attributes:
        shape: per-sample shape (no batch axis).
        dtype: the dtype rows arrive in (``Input``'s; layer outputs are ``"float32"``).
        name: an ``Input``'s name (``None``: the model names it by position).
    """

    __slots__ = ("shape", "dtype", "layer", "inputs", "as_list", "name", "order")
    _calls = itertools.count()

    def __init__(self, shape, dtype="float32", layer=None, inputs=(), as_list=False, name=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.layer = layer
        self.inputs = tuple(inputs)
        self.as_list = bool(as_list)
        self.name = name
        self.order = next(SymbolicTensor._calls)

    @property
    def is_input(self) -> bool:
        """True for an ``Input``, False for a layer's output."""
        return self.layer is None

    def describe(self) -> str:
        if self.is_input:
            return "Input" + (f" {self.name!r}" if self.name else "") + f" of shape {self.shape}"
        return f"the output of {self.layer.describe()} (shape {self.shape})"

    def __repr__(self):
        return f"<SymbolicTensor shape=(None, {', '.join(map(str, self.shape))}) " \
               f"{'Input' if self.is_input else 'from ' + self.layer.describe()}>"

    def __array__(self, *args, **kwargs):
        raise TypeError("a SymbolicTensor describes a model's input or a layer's output, it "
                        "holds no data: build a model with L.Model(inputs, outputs) and pass "
                        "numpy arrays to its fit/predict")

    def __bool__(self):
        raise TypeError("a SymbolicTensor has no truth value: it holds no data")


def Input(shape, dtype="float32", name=None) -> SymbolicTensor:
    """A model input: the symbolic tensor layers are first called on (Keras' ``keras.Input``).

    Args:
        shape: per-sample shape, no batch axis (``(3, 32, 32)`` for NCHW images, ``(T,)`` for
            token ids): a positive integer or a tuple of them.
        dtype: the dtype of the rows (``"float32"``; ``"int64"`` for ids): a numpy dtype name,
            reported in the model's ``input_specs``. In-process, rows are fed as float32.
        name: the input's name: ``fit``/``predict`` take a dict of arrays by these names, and
            a model file records them. Default: ``"input_<position>"`` in the model.

    Example:
        >>> from rddtensor import layers as L
        >>> x = L.Input((4,), name="features")
        >>> y = L.Dense(2)(x)
        >>> x.shape, y.shape
        ((4,), (2,))
    """
    shape = shape_tuple(shape, "Input shape")
    try:
        dtype = np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"Input dtype must be a numpy dtype name such as 'float32' or 'int64', "
                         f"got {dtype!r}") from None
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"Input name must be a non-empty string or None, got {name!r}")
    return SymbolicTensor(shape, dtype, name=name)


def _symbolic_call(inputs) -> bool:
    """Whether a layer call is symbolic: a ``SymbolicTensor`` or a list of them (a list that
    mixes them with anything else is refused)."""
    if isinstance(inputs, SymbolicTensor):
        return True
    if isinstance(inputs, (list, tuple)) and inputs and \
            any(isinstance(t, SymbolicTensor) for t in inputs):
        for i, t in enumerate(inputs):
            if not isinstance(t, SymbolicTensor):
                raise TypeError(f"a layer called on a list of symbolic tensors got "
                                f"{type(t).__name__} at position {i}; every item must be an "
                                "L.Input or a layer's output")
        return True
    return False


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
        """Record the per-sample input shape (a list of them for a layer called on a list) and
        return the per-sample output shape."""
        if is_shape_list(input_shape):
            input_shape = tuple(tuple(int(s) for s in shape) for shape in input_shape)
        else:
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

    def check_inputs(self, count: int | None) -> None:
        """Refuse to be called on ``count`` inputs: ``None`` is one array or tensor
        (``layer(x)``), an integer a list of that many (``layer([a, b])``). A layer that takes
        lists overrides this (see the module docstring); the default takes one input."""
        if count is not None:
            raise ValueError(f"{self.describe()} takes one input, got a list of {count}: call it "
                             "on one tensor, or merge the tensors first (L.Concatenate()([a, b]), "
                             "L.Add()([a, b]))")

    def __call__(self, params, X=None, training=False, rng=None):
        """``layer(params, X)``: the output of ``forward`` (no backprop); ``layer(x)`` or
        ``layer([a, b])`` on symbolic tensors: the symbolic output, recording the call."""
        if X is None and _symbolic_call(params):
            return self._call_symbolic(params)
        if X is None:
            raise TypeError(f"{self.describe()} was called on {type(params).__name__}: call a "
                            "layer on symbolic tensors (L.Input(...) or another layer's output) "
                            "to build a model, or as layer(params, X) to compute on arrays")
        return self.forward(params, X, training=training, rng=rng)[0]

    def _call_symbolic(self, inputs) -> SymbolicTensor:
        as_list = isinstance(inputs, (list, tuple))
        tensors = tuple(inputs) if as_list else (inputs,)
        self.check_inputs(len(tensors) if as_list else None)
        shape = [t.shape for t in tensors] if as_list else tensors[0].shape
        if not as_list and not self.built and self.input_shape is not None and \
                shape != self.input_shape:
            raise ValueError(f"{self.describe()} declares input_shape={self.input_shape} but is "
                             f"called on {tensors[0].describe()}")
        try:
            out = self.build(shape)
        except ValueError as e:
            what = ", ".join(t.describe() for t in tensors)
            raise ValueError(f"{self.describe()} cannot take {what}: {e}") from None
        return SymbolicTensor(out, "float32", layer=self, inputs=tensors, as_list=as_list)

    # --- config ---------------------------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-serializable constructor arguments (subclasses add their own)."""
        cfg = {}
        if self.input_shape is not None and not is_shape_list(self.input_shape):
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
