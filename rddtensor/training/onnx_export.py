"""ONNX export: ``model.export(path, format="onnx")`` writes a model as an ONNX graph.

The graph computes what ``model.predict`` returns (the output activation included, also for a
classifier trained with a loss fused to it), at opset ``OPSET`` (17: ``LayerNormalization``'s
first), with a symbolic batch dimension (``"batch"``) and every other dimension fixed by the
model's per-row shapes. The inputs and outputs carry the names of the model's ``input_specs`` and
``output_specs`` (``"X"`` and ``"y"`` for a ``Sequential``; a graph model's ``L.Input`` names
and its output calls' names, one ONNX output per model output), float32 (an input declared
``L.Input(..., dtype="int64")`` keeps its dtype and is cast to float32 in the graph, as
``predict`` casts it). The graph is built with the
``onnx`` package's helpers (an optional extra: ``pip install rddtensor[onnx]``; imported only
here, when a model is exported) and checked with ``onnx.checker.check_model(full_check=True)``
before anything is written, so a model with a layer that cannot be exported fails with an error
naming the layer (index, class, name) and leaves no file behind.

Example:
    >>> import numpy as np, rddtensor.layers as L                                # doctest: +SKIP
    >>> m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)], seed=0)
    >>> m.export("model.onnx")                                                   # doctest: +SKIP
    >>> import onnxruntime as ort                                                # doctest: +SKIP
    >>> ort.InferenceSession("model.onnx").run(None, {"X": np.ones((3, 4), np.float32)})[0]

Layouts: the library is channels-first (NCL / NCHW), as ONNX, so convolutions and poolings map
one to one; sequences are ``(batch, time, features)``, so the recurrent layers transpose to ONNX's
time-major layout and back. Padding masks (``mask_value=v``: a step whose features all equal
``v``) are computed in the graph from the input, as the layers do: the recurrent layers gather
each row's real steps to the front, run with ``sequence_lens`` and scatter the outputs back, so
padding anywhere in a row gives what ``predict`` gives.

Extension point
---------------
Two tables, both filled with decorators:

- ``CONVERTERS``: one converter per layer class, ``@converter(LayerClass)``::

      @converter(Dense)
      def _dense(g: OnnxGraph, layer, params, inputs):
          (x,) = inputs
          y = g.op("MatMul", [x, g.const(params["W"].T, "W")])
          ...
          return [y]

  It gets the graph being built, the built layer, its parameters (the layer's own keys:
  ``"W"``, ``"forward.W_ih"``, as numpy arrays) and the names of its input tensors; it adds nodes
  and returns the names of its output tensors. The lookup walks the layer class's MRO (``ReLU``
  uses ``Activation``'s converter). A converter calls ``g.convert(inner, params, inputs)`` for
  a layer it wraps. A configuration the ONNX graph cannot express raises
  ``NotExportable(reason)``; the model walker adds which layer it is.
- ``MODEL_WALKERS``: how a model's layers wire together, per model class (keyed
  ``"module.ClassName"``, so this module imports no model class), ``@model_walker(path)``:
  ``walker(g, model) -> output names``, reading ``g.inputs`` (one name per ``input_specs``). The
  ``Sequential`` walker is a chain. The graph model's (``L.Model(inputs, outputs)``) visits its
  nodes in call order and calls ``g.convert_at(layer_index, layer, params, input_names)`` for
  each; a layer called on a list (the merge layers, ``MultiHeadAttention`` on ``[query, key,
  value]``) gets one input name per tensor. A shared layer's calls are converted in the same
  scope (its index), and ``g.const`` stores a value once per scope and hint, so they read one
  set of initializers.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os

import numpy as np

from rddtensor.layers.activations import Activation
from rddtensor.layers.attention import (MultiHeadAttention, PositionalEmbedding,
                                        TransformerEncoderLayer)
from rddtensor.layers.conv import Conv1D, Conv2D, Conv2DTranspose
from rddtensor.layers.core import Dropout, Flatten, Reshape
from rddtensor.layers.dense import Dense
from rddtensor.layers.embedding import Embedding
from rddtensor.layers.merge import NORM_EPS, Add, Average, Concatenate, Dot, Multiply, Subtract
from rddtensor.layers.normalization import BatchNorm, LayerNorm
from rddtensor.layers.pooling import (AvgPool2D, GlobalAveragePooling1D, GlobalAvgPool2D,
                                      GlobalMaxPooling1D, MaxPool1D, MaxPool2D, UpSampling2D)
from rddtensor.layers.recurrent import GRU, LSTM, Recurrent, SimpleRNN
from rddtensor.layers.wrappers import Bidirectional, TimeDistributed
from rddtensor.ops.numpy_ops import GELU_C, SQRT_2_OVER_PI
from rddtensor.version import __version__

__all__ = ["OPSET", "export_onnx", "to_onnx", "OnnxGraph", "NotExportable", "CONVERTERS",
           "MODEL_WALKERS", "converter", "model_walker"]

#: the ONNX opset every export targets (LayerNormalization needs >= 17)
OPSET = 17
#: the symbolic name of the batch dimension of the inputs and outputs
BATCH = "batch"


class NotExportable(ValueError):
    """A layer (or a configuration of one) that the ONNX graph cannot express."""


#: layer class -> converter ``f(g, layer, params, inputs) -> output names``
CONVERTERS: dict[type, object] = {}
#: ``"module.ClassName"`` of a model class -> walker ``f(g, model) -> output names``
MODEL_WALKERS: dict[str, object] = {}


def converter(layer_class):
    """Decorator: register ``f(g, layer, params, inputs) -> output names`` for ``layer_class``
    (and its subclasses that register none of their own)."""
    def register(fn):
        CONVERTERS[layer_class] = fn
        return fn
    return register


def model_walker(class_path: str):
    """Decorator: register ``f(g, model) -> output names`` for the model class at
    ``class_path`` (``"rddtensor.training.sequential.Sequential"``) and its subclasses."""
    def register(fn):
        MODEL_WALKERS[class_path] = fn
        return fn
    return register


def _converter_for(layer):
    for cls in type(layer).__mro__:
        if cls in CONVERTERS:
            return CONVERTERS[cls]
    known = sorted({c.__name__ for c in CONVERTERS if not c.__name__.startswith("_")})
    raise NotExportable(f"no ONNX converter for {type(layer).__name__}; exportable layers: "
                        f"{known} and their subclasses (register one with "
                        f"rddtensor.training.onnx_export.converter)")


def describe_layer(index, layer) -> str:
    """``"layer 3 (LSTM 'encoder')"``: how errors name a layer of a model."""
    name = f" {layer.name!r}" if layer.name else ""
    return f"layer {index} ({type(layer).__name__}{name})"


# --- the graph under construction ---------------------------------------------------------------
class OnnxGraph:
    """Nodes, initializers and unique names of the graph being built (see the module docstring).

    Tensor, node and initializer names start with the scope of the layer being converted (its
    index in the model, ``"0"``; nested layers add their attribute, ``"0.layer"``), so a weight
    keeps its model key (``"0.W"``) where it is used as stored. An initializer of the same scope,
    hint and value is stored once: the calls of a layer shared in a graph model (converted in
    the same scope) use one set of weights.
    """

    def __init__(self, onnx_module, inputs=(), reserved=()):
        self.onnx = onnx_module
        self.helper = onnx_module.helper
        self.opset = OPSET
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list[str] = list(inputs)  # the model's input tensors, what walkers start at
        self._used: set[str] = {*self.inputs, *reserved}
        self._scope = ""
        self._batch: dict[str, str] = {}
        self._consts: dict[tuple, str] = {}  # (scoped hint, dtype, shape, digest) -> name

    # --- names and scopes -------------------------------------------------------------------
    def name(self, hint: str) -> str:
        """A fresh tensor or node name ``<scope>/<hint>``."""
        return self._unique(f"{self._scope}/{hint}" if self._scope else hint)

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name

    @contextlib.contextmanager
    def scope(self, name: str):
        """Names created inside start with ``name`` (nested: ``outer.name``)."""
        outer = self._scope
        self._scope = f"{outer}.{name}" if outer else str(name)
        try:
            yield
        finally:
            self._scope = outer

    # --- building blocks --------------------------------------------------------------------
    def const(self, value, hint: str, dtype=np.float32) -> str:
        """An initializer holding ``value`` (float32 unless ``dtype``); returns its name. The
        same value under the same scope and hint returns the initializer made first (a shared
        layer's second call reuses its first call's weights)."""
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        base = f"{self._scope}.{hint}" if self._scope else hint  # "0.W"
        key = (base, array.dtype.str, array.shape,
               hashlib.blake2b(array.reshape(-1).view(np.uint8), digest_size=20).digest())
        name = self._consts.get(key)
        if name is None:
            name = self._consts[key] = self._unique(base)
            self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, values, hint: str) -> str:
        """An int64 initializer (shapes, axes, indices)."""
        return self.const(np.asarray(values, dtype=np.int64), hint, dtype=np.int64)

    def op(self, op_type: str, inputs, hint: str | None = None, outputs: int = 1, **attrs):
        """Add one node; returns its output name (a list when ``outputs > 1``). An input
        ``""`` is an omitted optional input."""
        names = [self.name(f"{hint or op_type}" + (f":{k}" if outputs > 1 else ""))
                 for k in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names,
                                                name=self.name(f"{op_type}_node"), **attrs))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type: str, x: str, axes, keepdims: bool = False) -> str:
        """``ReduceSum``/``ReduceMean``/``ReduceMax`` over ``axes`` (an input or an attribute,
        as the opset defines each: from opset 18 all take an input)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(list(axes), "axes")], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def batch_size(self, x: str) -> str:
        """A ``(1,)`` int64 tensor: the batch dimension of ``x`` (one ``Shape`` node per ``x``)."""
        if x not in self._batch:
            self._batch[x] = self.op("Shape", [x], "batch_size", start=0, end=1)
        return self._batch[x]

    def reshape_rows(self, x: str, tail, batch: str | None = None) -> str:
        """Reshape to ``(batch, *tail)``; ``batch`` a ``(1,)`` int64 tensor, or ``None`` for
        ``x``'s own first dimension (kept as is, which an empty batch allows too)."""
        if batch is None:
            return self.op("Reshape", [x, self.ints([0, *tail], "shape")])
        shape = self.op("Concat", [batch, self.ints(list(tail), "shape_tail")], "shape", axis=0)
        return self.op("Reshape", [x, shape])

    # --- layers -----------------------------------------------------------------------------
    def convert(self, layer, params: dict, inputs: list[str]) -> list[str]:
        """Add ``layer``'s nodes (its registered converter); returns its output names."""
        return list(_converter_for(layer)(self, layer, params, list(inputs)))

    def convert_at(self, where: str, layer, params: dict, inputs: list[str],
                   label: str | None = None) -> list[str]:
        """``convert`` in scope ``where``, an error naming the layer as ``label`` (default:
        ``describe_layer(where, layer)``; ``where`` is its index in the model)."""
        with self.scope(where):
            try:
                return self.convert(layer, params, inputs)
            except NotExportable as e:
                what = describe_layer(where, layer) if label is None else label
                raise NotExportable(f"cannot export {what} to ONNX: {e}") from None


def layer_params(model, index: int, layer) -> dict:
    """The parameters and buffers of layer ``index`` of a model (a ``Sequential`` or a graph
    model) under the layer's own keys (the model keys them ``"<index>.<key>"``)."""
    keys = [*layer.param_shapes(), *layer.buffer_shapes()]
    return {k: np.asarray(model.params[f"{index}.{k}"]) for k in keys}


@model_walker("rddtensor.training.sequential.Sequential")
def _walk_sequential(g: OnnxGraph, model) -> list[str]:
    """A chain: each layer's output is the next one's input."""
    x = g.inputs[0]
    for i, layer in enumerate(model.layers):
        (x,) = g.convert_at(str(i), layer, layer_params(model, i, layer), [x])
    return [x]


@model_walker("rddtensor.training.graph.GraphModel")
def _walk_graph(g: OnnxGraph, model) -> list[str]:
    """A graph model (``L.Model(inputs, outputs)``): its nodes in call order, each converted in
    the scope of its layer's index, so a layer called several times (shared) keeps one set of
    initializers (``OnnxGraph.const``) that all its calls read. A layer called on a list gets
    one input name per tensor of the list."""
    tensors = []  # tensor number -> ONNX name: the inputs, then one per node (graph.py)
    for spec, name in zip(model.input_specs, g.inputs):
        if np.dtype(spec.dtype) != np.float32:  # predict feeds every input as float32
            name = g.op("Cast", [name], f"{spec.name}_float32", to=g.onnx.TensorProto.FLOAT)
        tensors.append(name)
    params = [layer_params(model, i, layer) for i, layer in enumerate(model.layers)]
    names = model.layer_names
    calls = [sum(n.layer == i for n in model.nodes) for i in range(len(model.layers))]
    seen = [0] * len(model.layers)
    for j, node in enumerate(model.nodes):
        i, layer = node.layer, model.layers[node.layer]
        call = names[i] if calls[i] == 1 else f"{names[i]}[{seen[i]}]"  # as summary() names it
        seen[i] += 1
        label = f"{describe_layer(i, layer)} at node {j} ({call!r})"
        outs = g.convert_at(str(i), layer, params[i], [tensors[r] for r in node.inputs], label)
        if len(outs) != 1:
            raise NotExportable(f"cannot export {label} to ONNX: its converter returned "
                                f"{len(outs)} outputs; a node of a graph model has one")
        tensors.append(outs[0])
    outputs = []
    input_names = [spec.name for spec in model.input_specs]
    for spec, r in zip(model.output_specs, model.get_config()["outputs"]):
        if r >= len(input_names) and spec.name in input_names:
            raise NotExportable(f"output {spec.name!r} has the name of an input: ONNX names "
                                "every tensor once (name the input or the layer otherwise)")
        if r < len(g.inputs) and tensors[r] != spec.name:  # an input cast to float32
            raise NotExportable(f"output {spec.name!r} is the {model.input_specs[r].dtype} "
                                "input itself, which predict returns as float32: ONNX cannot "
                                "name one tensor as an input and an output of two dtypes (pass "
                                "it through a layer, e.g. L.Activation('linear'))")
        outputs.append(tensors[r])
    return outputs


def _walker_for(model):
    for cls in type(model).__mro__:
        walker = MODEL_WALKERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if walker is not None:
            return walker
    raise TypeError(f"ONNX export supports {sorted(MODEL_WALKERS)} (and subclasses), got "
                    f"{type(model).__name__}; a model class plugs in with "
                    f"rddtensor.training.onnx_export.model_walker")


# --- export -------------------------------------------------------------------------------------
def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'rddtensor[onnx]' "
                          "(onnx, and onnxruntime to run the exported model)") from None
    return onnx


def _value_info(onnx, name: str, spec):
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return onnx.helper.make_tensor_value_info(name, elem, [BATCH, *spec.shape])


def to_onnx(model):
    """The ``onnx.ModelProto`` of ``model`` (built, checked; see the module docstring).

    Raises:
        NotExportable: (a ``ValueError``) naming the first layer the graph cannot express.
        TypeError: for a model class without a walker.
    """
    onnx = _import_onnx()
    walker = _walker_for(model)
    model.ensure_built()
    g = OnnxGraph(onnx, inputs=[spec.name for spec in model.input_specs],
                  reserved=[spec.name for spec in model.output_specs])
    outputs = walker(g, model)
    for spec, out in zip(model.output_specs, outputs):
        if out != spec.name:  # (a graph model's input that is also an output is both at once)
            g.nodes.append(onnx.helper.make_node("Identity", [out], [spec.name],
                                                 name=g.name("output")))
    graph = onnx.helper.make_graph(
        g.nodes, model.name or type(model).__name__,
        [_value_info(onnx, spec.name, spec) for spec in model.input_specs],
        [_value_info(onnx, spec.name, spec) for spec in model.output_specs],
        g.initializers)
    opsets = [onnx.helper.make_opsetid("", g.opset)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="rddtensor",
                                   producer_version=__version__,
                                   doc_string=f"rddtensor {type(model).__name__}: what predict "
                                              f"returns")
    # the oldest IR version that carries this opset: runtimes older than the onnx package read it
    proto.ir_version = onnx.helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, **options) -> None:
    """Write ``model`` as an ONNX file at ``path`` (``model.export(path, format="onnx")``).

    The whole graph is built and checked first; the file is written to ``path + ".tmp"`` and
    renamed, so a failed export leaves no file and an existing one untouched.

    Args:
        model: a built (or buildable) model whose class has a walker (``Sequential``, a graph
            model).
        path: the file to write (``"model.onnx"``).
        **options: none yet (an unknown option raises ``TypeError``).
    """
    if options:
        raise TypeError(f"export(format='onnx') got unexpected option(s) {sorted(options)}; "
                        "it takes none")
    proto = to_onnx(model)
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)


# --- activations ------------------------------------------------------------------------------
def activation(g: OnnxGraph, name: str, kwargs: dict, x: str) -> str:
    """``f(x)`` for an activation of ``rddtensor.layers.activations`` (its name and arguments)."""
    if name == "linear":
        return x
    if name == "relu":
        return g.op("Relu", [x])
    if name == "sigmoid":
        return g.op("Sigmoid", [x])
    if name == "tanh":
        return g.op("Tanh", [x])
    if name == "leaky_relu":
        return g.op("LeakyRelu", [x], alpha=float(kwargs["negative_slope"]))
    if name == "elu":
        return g.op("Elu", [x], alpha=float(kwargs["alpha"]))
    if name == "softmax":
        return g.op("Softmax", [x], axis=int(kwargs["axis"]))
    if name == "gelu":
        if kwargs["approximate"] == "tanh":
            # x * sigmoid(2u), u = sqrt(2/pi) (x + c x^3): the library's form (no cancellation)
            x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
            inner = g.op("Add", [x, g.op("Mul", [x3, g.const(GELU_C, "gelu_c")])])
            v = g.op("Mul", [inner, g.const(2.0 * SQRT_2_OVER_PI, "gelu_scale")])
            return g.op("Mul", [x, g.op("Sigmoid", [v])], "gelu")
        # x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
        e = g.op("Erf", [g.op("Mul", [x, g.const(1.0 / math.sqrt(2.0), "inv_sqrt2")])])
        phi = g.op("Mul", [g.op("Add", [e, g.const(1.0, "one")]), g.const(0.5, "half")])
        return g.op("Mul", [x, phi], "gelu")
    raise NotExportable(f"activation {name!r} has no ONNX form")


def _fused_activation(g, layer, x):
    act = layer.activation
    return activation(g, act.activation, act.kwargs, x)


@converter(Activation)
def _activation_layer(g, layer, params, inputs):
    (x,) = inputs
    return [activation(g, layer.activation, layer.kwargs, x)]


# --- dense, structure ---------------------------------------------------------------------------
def _linear(g, x, W, b):
    """``x @ W.T + b`` on the last axis of ``x`` (any rank); ``W`` in PyTorch's layout."""
    y = g.op("MatMul", [x, g.const(W.T, "W_t")])
    return y if b is None else g.op("Add", [y, g.const(b, "b")])


@converter(Dense)
def _dense(g, layer, params, inputs):
    (x,) = inputs
    y = _linear(g, x, params["W"], params.get("b") if layer.use_bias else None)
    return [_fused_activation(g, layer, y)]


@converter(Dropout)
def _dropout(g, layer, params, inputs):
    return list(inputs)  # the identity at inference


@converter(Flatten)
def _flatten(g, layer, params, inputs):
    return [g.op("Flatten", inputs, axis=1)]


@converter(Reshape)
def _reshape(g, layer, params, inputs):
    (x,) = inputs
    return [g.reshape_rows(x, layer.output_shape)]


# --- merge layers (called on a list: one input name per tensor) ---------------------------------
def _chain(g, op_type, xs):
    """``((x_1 op x_2) op x_3) ...``: the order the layer computes in."""
    y = xs[0]
    for x in xs[1:]:
        y = g.op(op_type, [y, x])
    return y


@converter(Add)
def _add(g, layer, params, inputs):
    return [_chain(g, "Add", inputs)]


@converter(Subtract)
def _subtract(g, layer, params, inputs):
    a, b = inputs
    return [g.op("Sub", [a, b])]


@converter(Multiply)
def _multiply(g, layer, params, inputs):
    return [_chain(g, "Mul", inputs)]


@converter(Average)
def _average(g, layer, params, inputs):  # the sum times float32(1 / n), as the layer
    return [g.op("Mul", [_chain(g, "Add", inputs), g.const(1.0 / len(inputs), "inv_n")])]


@converter(Concatenate)
def _concatenate(g, layer, params, inputs):
    return [g.op("Concat", inputs, axis=layer.axis)]  # both count the batch axis


def _sample_axis(axis: int, rank: int) -> int:
    """A layer's ``axis`` (the batch axis counted, may be negative) on a ``(batch, *shape)``
    tensor whose ``shape`` has ``rank`` axes, as an axis >= 1."""
    return axis if axis > 0 else axis + rank + 1


def _l2_normalize(g, x, axis):
    """``x / max(||x||_2, eps)`` along ``axis`` (``Dot(normalize=True)``'s)."""
    norm = g.op("Sqrt", [g.reduce("ReduceSum", g.op("Mul", [x, x]), [axis], keepdims=True)])
    return g.op("Div", [x, g.op("Max", [norm, g.const(NORM_EPS, "eps")])])


@converter(Dot)
def _dot(g, layer, params, inputs):
    """``A``'s contracted axis moved last and ``B``'s first (after the batch), both flattened
    to ``(batch, P, k)`` and ``(batch, k, Q)``, one batched ``MatMul``, then the output's shape
    (``A``'s other axes, then ``B``'s), as the layer computes it."""
    (A, B), (sa, sb) = inputs, layer.input_shape
    a, b = _sample_axis(layer.axes[0], len(sa)), _sample_axis(layer.axes[1], len(sb))
    if layer.normalize:
        A, B = _l2_normalize(g, A, a), _l2_normalize(g, B, b)
    k = sa[a - 1]
    P = math.prod(n for i, n in enumerate(sa, 1) if i != a)  # static: an empty batch reshapes
    Q = math.prod(n for i, n in enumerate(sb, 1) if i != b)
    perm_a = [0, *(i for i in range(1, len(sa) + 1) if i != a), a]
    perm_b = [0, b, *(i for i in range(1, len(sb) + 1) if i != b)]
    if perm_a != sorted(perm_a):
        A = g.op("Transpose", [A], perm=perm_a)
    if perm_b != sorted(perm_b):
        B = g.op("Transpose", [B], perm=perm_b)
    y = g.op("MatMul", [g.reshape_rows(A, [P, k]), g.reshape_rows(B, [k, Q])])
    return [g.reshape_rows(y, layer.output_shape)]


# --- convolutions, pooling ----------------------------------------------------------------------
def _conv_pads(layer) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) of a ``Conv1D``/``Conv2D``'s ``padding``."""
    if layer.padding == "valid":
        pairs = [(0, 0)] * layer.rank
    elif layer.padding == "same":  # the layer's rule: the odd pixel goes to the high side
        totals = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in layer.padding]
    return [lo for lo, _ in pairs] + [hi for _, hi in pairs]


@converter(Conv1D)
@converter(Conv2D)
def _conv(g, layer, params, inputs):
    (x,) = inputs
    args = [x, g.const(params["W"], "W")]
    if layer.use_bias:
        args.append(g.const(params["b"], "b"))
    y = g.op("Conv", args, kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
             dilations=list(layer.dilation), pads=_conv_pads(layer), group=layer.groups)
    return [_fused_activation(g, layer, y)]


@converter(Conv2DTranspose)
def _conv_transpose(g, layer, params, inputs):
    (x,) = inputs
    args = [x, g.const(params["W"], "W")]
    if layer.use_bias:
        args.append(g.const(params["b"], "b"))
    y = g.op("ConvTranspose", args, kernel_shape=list(layer.kernel_size),
             strides=list(layer.strides), dilations=list(layer.dilation),
             pads=list(layer.padding) * 2, output_padding=list(layer.output_padding))
    return [_fused_activation(g, layer, y)]


@converter(MaxPool1D)
@converter(MaxPool2D)
def _max_pool(g, layer, params, inputs):
    return [g.op("MaxPool", inputs, kernel_shape=list(layer.pool_size),
                 strides=list(layer.strides), pads=list(layer.padding) * 2)]


@converter(AvgPool2D)
def _avg_pool(g, layer, params, inputs):
    return [g.op("AveragePool", inputs, kernel_shape=list(layer.pool_size),
                 strides=list(layer.strides), pads=list(layer.padding) * 2,
                 count_include_pad=int(layer.count_include_pad))]


@converter(GlobalAvgPool2D)
def _global_avg_pool_2d(g, layer, params, inputs):
    (x,) = inputs
    return [g.reduce("ReduceMean", x, [2, 3])]


@converter(UpSampling2D)
def _upsampling_2d(g, layer, params, inputs):
    (x,) = inputs
    scales = g.const([1.0, 1.0, *map(float, layer.size)], "scales")
    # asymmetric + floor: output pixel i reads input pixel floor(i / s), the layer's rule
    return [g.op("Resize", [x, "", scales], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")]


# --- padding masks ------------------------------------------------------------------------------
def valid_steps(g, x: str, mask_value: float, feature_axis: int = -1) -> str:
    """``(batch, time)`` float 0/1: 1 where some feature differs from ``mask_value`` (a real
    step), as ``rddtensor.layers.recurrent.valid_steps``."""
    differs = g.op("Not", [g.op("Equal", [x, g.const(mask_value, "mask_value")])])
    real = g.op("Cast", [differs], to=g.onnx.TensorProto.FLOAT)
    return g.reduce("ReduceMax", real, [feature_axis])


def _global_pool_1d(g, layer, x, reducer):
    t, f = (1, 2) if layer.data_format == "channels_last" else (2, 1)
    if layer.mask_value is None:
        return g.reduce(reducer, x, [t])
    valid = g.op("Unsqueeze", [valid_steps(g, x, layer.mask_value, f), g.ints([f], "axes")])
    if reducer == "ReduceMean":  # sum over the real steps / max(count, 1)
        total = g.reduce("ReduceSum", g.op("Mul", [x, valid]), [t])
        count = g.op("Max", [g.reduce("ReduceSum", valid, [t]), g.const(1.0, "one")])
        return g.op("Mul", [total, g.op("Reciprocal", [count])])
    is_valid = g.op("Cast", [valid], to=g.onnx.TensorProto.BOOL)
    masked = g.op("Where", [is_valid, x, g.const(-np.inf, "neg_inf")])
    top = g.reduce("ReduceMax", masked, [t])
    any_real = g.op("Cast", [g.reduce("ReduceMax", valid, [t])], to=g.onnx.TensorProto.BOOL)
    return g.op("Where", [any_real, top, g.const(0.0, "zero")])  # padding only: 0


@converter(GlobalAveragePooling1D)
def _global_avg_pool_1d(g, layer, params, inputs):
    return [_global_pool_1d(g, layer, inputs[0], "ReduceMean")]


@converter(GlobalMaxPooling1D)
def _global_max_pool_1d(g, layer, params, inputs):
    return [_global_pool_1d(g, layer, inputs[0], "ReduceMax")]


# --- normalization, embeddings ------------------------------------------------------------------
@converter(BatchNorm)
def _batch_norm(g, layer, params, inputs):
    (x,) = inputs
    ndim = len(layer.input_shape) + 1
    axis = layer.axis % ndim
    C = layer.channels
    scale = params["W"] if layer.affine else np.ones(C, np.float32)
    shift = params["b"] if layer.affine else np.zeros(C, np.float32)
    perm = [0, axis, *(a for a in range(1, ndim) if a != axis)]
    if axis != 1:  # ONNX normalizes axis 1: move the channels there and back
        x = g.op("Transpose", [x], perm=perm)
    y = g.op("BatchNormalization", [x, g.const(scale, "W"), g.const(shift, "b"),
                                    g.const(params["running_mean"], "running_mean"),
                                    g.const(params["running_var"], "running_var")],
             epsilon=layer.eps)
    if axis != 1:
        y = g.op("Transpose", [y], perm=[int(a) for a in np.argsort(perm)])
    return [y]


def _layer_norm(g, x, shape, W, b, eps):
    """``LayerNormalization`` over the last ``len(shape)`` axes (ones/zeros without affine)."""
    W = np.ones(shape, np.float32) if W is None else W
    b = np.zeros(shape, np.float32) if b is None else b
    return g.op("LayerNormalization", [x, g.const(W, "W"), g.const(b, "b")], axis=-len(shape),
                epsilon=eps)


@converter(LayerNorm)
def _layer_norm_layer(g, layer, params, inputs):
    (x,) = inputs
    shape = layer.normalized_shape or tuple(layer.input_shape[-1:])
    affine = layer.elementwise_affine
    return [_layer_norm(g, x, shape, params["W"] if affine else None,
                        params["b"] if affine else None, layer.eps)]


@converter(Embedding)
def _embedding(g, layer, params, inputs):
    (x,) = inputs  # float32 ids (what Sequential feeds), whole numbers
    ids = g.op("Cast", [x], "ids", to=g.onnx.TensorProto.INT64)
    return [g.op("Gather", [g.const(params["W"], "W"), ids], axis=0)]


@converter(PositionalEmbedding)
def _positional_embedding(g, layer, params, inputs):
    (x,) = inputs
    T = layer.input_shape[0]
    pos = g.const(params["W"][:T], "W")
    if layer.mask_value is not None:  # padded steps get no position
        valid = g.op("Unsqueeze", [valid_steps(g, x, layer.mask_value), g.ints([-1], "axes")])
        pos = g.op("Mul", [pos, valid])
    return [g.op("Add", [x, pos])]


# --- recurrent ----------------------------------------------------------------------------------
#: ONNX's gate order as indices into PyTorch's (LSTM: i f g o -> i o f c; GRU: r z n -> z r h)
_GATE_ORDER = {SimpleRNN: (0,), LSTM: (0, 3, 1, 2), GRU: (1, 0, 2)}
_RNN_OPS = {SimpleRNN: "RNN", LSTM: "LSTM", GRU: "GRU"}
#: a SimpleRNN activation -> ONNX RNN's name for it and its alpha / beta arguments
_RNN_ACTIVATIONS = {"tanh": ("Tanh", None), "relu": ("Relu", None),
                    "sigmoid": ("Sigmoid", None), "linear": ("Affine", None),
                    "leaky_relu": ("LeakyRelu", "negative_slope"), "elu": ("Elu", "alpha")}


def _rnn_kind(layer) -> type:
    for cls in type(layer).__mro__:
        if cls in _RNN_OPS:
            return cls
    raise NotExportable(f"recurrent layer {type(layer).__name__} has no ONNX operator "
                        f"(SimpleRNN, LSTM and GRU have)")


def _rnn_weights(kind, layer, p):
    """``(W, R, B)`` of one direction in ONNX's gate order (``B`` None without biases)."""
    u = layer.units

    def gates(a):
        return np.concatenate([a[j * u:(j + 1) * u] for j in _GATE_ORDER[kind]])
    B = np.concatenate([gates(p["b_ih"]), gates(p["b_hh"])]) if layer.use_bias else None
    return gates(p["W_ih"]), gates(p["W_hh"]), B


def _rnn_attributes(kind, layer, directions: int) -> dict:
    attrs = {"hidden_size": layer.units,
             "direction": "bidirectional" if directions == 2 else "forward"}
    if kind is GRU:
        attrs["linear_before_reset"] = 1  # r multiplies W_hh h + b_hh, as PyTorch
    if kind is SimpleRNN:
        act = layer.activation
        if act.activation not in _RNN_ACTIVATIONS:
            raise NotExportable(f"SimpleRNN(activation={act.activation!r}) has no ONNX RNN "
                                f"form; ONNX's RNN takes {sorted(_RNN_ACTIVATIONS)}")
        name, arg = _RNN_ACTIVATIONS[act.activation]
        attrs["activations"] = [name] * directions
        if name == "Affine":
            attrs.update(activation_alpha=[1.0] * directions, activation_beta=[0.0] * directions)
        elif arg is not None:
            attrs["activation_alpha"] = [float(act.kwargs[arg])] * directions
    return attrs


def _compaction(g, valid, T):
    """``(order, inverse, lengths)`` that move each row's real steps to the front, in order.

    ``order[b, j]``: the time index of the j-th real step (then the padded ones);
    ``inverse`` is its inverse permutation; ``lengths`` the real steps per row (int32).
    """
    t = g.const(np.arange(T, dtype=np.float32), "time")
    key = g.op("Sub", [g.op("Mul", [valid, g.const(2.0 * T, "two_T")]), t])  # real first
    K = g.ints([T], "K")
    _, order = g.op("TopK", [key, K], "order", outputs=2, axis=1, largest=1, sorted=1)
    back = g.op("Neg", [g.op("Cast", [order], to=g.onnx.TensorProto.FLOAT)])
    _, inverse = g.op("TopK", [back, K], "inverse", outputs=2, axis=1, largest=1, sorted=1)
    lengths = g.op("Cast", [g.reduce("ReduceSum", valid, [1])], "lengths",
                   to=g.onnx.TensorProto.INT32)
    return order, inverse, lengths


def _gather_steps(g, x, index):
    """``x[b, index[b, t]]`` for ``x`` ``(batch, time, ...)``, ``index`` ``(batch, time)``."""
    return g.op("GatherND", [x, g.op("Unsqueeze", [index, g.ints([-1], "axes")])], batch_dims=1)


def _merge(g, mode, parts, axis):
    """Merge the two directions of a ``(..., 2, units)``-shaped output on ``axis``."""
    fwd, bwd = g.op("Split", [parts, g.ints([1, 1], "split")], outputs=2, axis=axis)
    squeeze = g.ints([axis], "axes")
    fwd, bwd = g.op("Squeeze", [fwd, squeeze]), g.op("Squeeze", [bwd, squeeze])
    if mode == "sum":
        return g.op("Add", [fwd, bwd])
    if mode == "mul":
        return g.op("Mul", [fwd, bwd])
    return g.op("Mul", [g.op("Add", [fwd, bwd]), g.const(0.5, "half")])  # "ave"


def recurrent(g, layers, params: list[dict], x: str, merge_mode: str = "concat") -> str:
    """One ONNX ``RNN``/``LSTM``/``GRU`` node for a recurrent layer (``layers`` one layer) or a
    ``Bidirectional`` pair (forward, backward), with the outputs in the library's layout."""
    layer = layers[0]
    kind = _rnn_kind(layer)
    D, T, u = len(layers), layer.input_shape[0], layer.units
    weights = [_rnn_weights(kind, l, p) for l, p in zip(layers, params)]
    args = [None, g.const(np.stack([w[0] for w in weights]), "W_onnx"),
            g.const(np.stack([w[1] for w in weights]), "R_onnx"),
            g.const(np.stack([w[2] for w in weights]), "B_onnx") if layer.use_bias else ""]
    valid = None
    if layer.mask_value is not None:
        valid = valid_steps(g, x, layer.mask_value)
        order, inverse, lengths = _compaction(g, valid, T)
        x = _gather_steps(g, x, order)
        args.append(lengths)
    args[0] = g.op("Transpose", [x], "time_major", perm=[1, 0, 2])
    outputs = g.op(_RNN_OPS[kind], args, outputs=3 if kind is LSTM else 2,
                   **_rnn_attributes(kind, layer, D))
    Y, Y_h = outputs[0], outputs[1]  # (T, D, batch, units), (D, batch, units)
    if layer.return_sequences:
        y = g.op("Transpose", [Y], perm=[2, 0, 1, 3])  # (T, D, B, u) -> (B, T, D, u)
        y = g.reshape_rows(y, [T, D * u]) if D == 1 or merge_mode == "concat" else \
            _merge(g, merge_mode, y, axis=2)
        if valid is not None:  # real steps back in place, zeros at the padded ones
            y = _gather_steps(g, y, inverse)
            y = g.op("Mul", [y, g.op("Unsqueeze", [valid, g.ints([-1], "axes")])])
        return y
    h = g.op("Transpose", [Y_h], perm=[1, 0, 2])  # (D, B, u) -> (B, D, u)
    h = g.reshape_rows(h, [D * u]) if D == 1 or merge_mode == "concat" else \
        _merge(g, merge_mode, h, axis=1)
    if valid is not None:  # a row of padding only: the initial state, zeros
        h = g.op("Mul", [h, g.reduce("ReduceMax", valid, [1], keepdims=True)])
    return h


@converter(Recurrent)
def _recurrent(g, layer, params, inputs):
    return [recurrent(g, [layer], [params], inputs[0])]


def _sub(params: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


@converter(Bidirectional)
def _bidirectional(g, layer, params, inputs):
    return [recurrent(g, [layer.forward_layer, layer.backward_layer],
                      [_sub(params, "forward"), _sub(params, "backward")], inputs[0],
                      layer.merge_mode)]


@converter(TimeDistributed)
def _time_distributed(g, layer, params, inputs):
    (x,) = inputs
    T, step = layer.input_shape[0], layer.input_shape[1:]
    batch = g.batch_size(x)
    rows = g.op("Mul", [batch, g.ints([T], "time")], "rows")  # time folded into the batch
    inner = g.reshape_rows(x, step, rows)
    with g.scope("layer"):
        (y,) = g.convert(layer.layer, _sub(params, "layer"), [inner])
    return [g.reshape_rows(y, [T, *layer.layer.output_shape], batch)]


# --- attention ----------------------------------------------------------------------------------
def _scaled_in_proj(layer: MultiHeadAttention, params: dict):
    """``in_proj_weight`` and ``in_proj_bias`` (``None`` without biases) with ``1/sqrt(d)``
    folded into the query rows, as the layer does."""
    E, scale = layer.embed_dim, 1.0 / math.sqrt(layer.head_dim)
    W = params["in_proj_weight"].astype(np.float32, copy=True)
    W[:E] *= scale
    b = None
    if layer.bias:
        b = params["in_proj_bias"].astype(np.float32, copy=True)
        b[:E] *= scale
    return W, b


def _attend(g, layer: MultiHeadAttention, params: dict, q: str, k: str, v: str, T: int, S: int,
            valid_q: str | None, valid_k: str | None) -> str:
    """From projected heads ``q`` (scaled) ``(batch, H, T, d)``, ``k``, ``v`` ``(batch, H, S,
    d)``: the masked softmax attention, the heads side by side and the output projection, as
    ``MultiHeadAttention._attention``; ``valid_k`` ``(batch, S)`` float 0/1 leaves keys out,
    ``valid_q`` ``(batch, T)`` zeroes outputs (``None``: no padding)."""
    E = layer.embed_dim
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, H, T, S)
    neg = float(np.finfo(np.float32).min) / 2  # the layer's finite "minus infinity"
    bias = None
    if layer.causal:
        bias = g.const(np.triu(np.full((T, S), neg, np.float32), 1)[None, None], "causal")
    if valid_k is not None:
        keys = g.op("Mul", [g.op("Sub", [g.const(1.0, "one"), valid_k]), g.const(neg, "neg")])
        keys = g.op("Unsqueeze", [keys, g.ints([1, 2], "axes")])      # (B, 1, 1, S)
        bias = keys if bias is None else g.op("Min", [bias, keys])
    if bias is not None:
        scores = g.op("Add", [scores, bias])
    probs = g.op("Softmax", [scores], axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # (B, T, H, d)
    y = _linear(g, g.reshape_rows(out, [T, E]), params["out_proj.weight"],
                params["out_proj.bias"] if layer.bias else None)
    if valid_q is not None:  # zero output at padded queries
        y = g.op("Mul", [y, g.op("Unsqueeze", [valid_q, g.ints([-1], "axes")])])
    return y


def attention(g, layer: MultiHeadAttention, params: dict, x: str, T: int,
              valid: str | None) -> str:
    """Self-attention of ``x`` ``(batch, T, E)`` as ``MultiHeadAttention.attend``: ``valid``
    ``(batch, T)`` float 0/1 or ``None`` (no padding). One ``MatMul`` projects q, k and v."""
    H, d = layer.num_heads, layer.head_dim
    W, b = _scaled_in_proj(layer, params)
    qkv = _linear(g, x, W, b)                                        # (B, T, 3E)
    qkv = g.reshape_rows(qkv, [T, 3, H, d])
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])             # (3, B, H, T, d)
    q, k, v = g.op("Split", [qkv, g.ints([1, 1, 1], "split")], outputs=3, axis=0)
    axis0 = g.ints([0], "axes")
    q, k, v = (g.op("Squeeze", [t, axis0]) for t in (q, k, v))
    return _attend(g, layer, params, q, k, v, T, T, valid, valid)


def cross_attention(g, layer: MultiHeadAttention, params: dict, inputs: list[str]) -> str:
    """``MultiHeadAttention`` called on ``[query, key, value]`` (or ``[query, value]``, the
    value the key too), as ``MultiHeadAttention._cross_attend``: the packed projection's rows
    ``:E`` project the query, ``E:2E`` the key, ``2E:`` the value; padding (``mask_value``) is
    read from the key (no key) and the query (zero output)."""
    E, H, d = layer.embed_dim, layer.num_heads, layer.head_dim
    xq, xk, xv = inputs if len(inputs) == 3 else (inputs[0], inputs[1], inputs[1])
    T, S = layer.input_shape[0][0], layer.input_shape[1][0]
    W, b = _scaled_in_proj(layer, params)
    heads = []
    for x, rows, L, hint in ((xq, slice(0, E), T, "q"), (xk, slice(E, 2 * E), S, "k"),
                             (xv, slice(2 * E, 3 * E), S, "v")):
        with g.scope(hint):
            p = g.reshape_rows(_linear(g, x, W[rows], None if b is None else b[rows]),
                               [L, H, d])
            heads.append(g.op("Transpose", [p], perm=[0, 2, 1, 3]))  # (B, H, L, d)
    valid_q = valid_k = None
    if layer.mask_value is not None:
        valid_q = valid_steps(g, xq, layer.mask_value)
        valid_k = valid_steps(g, xk, layer.mask_value)
    return _attend(g, layer, params, *heads, T, S, valid_q, valid_k)


@converter(MultiHeadAttention)
def _multi_head_attention(g, layer, params, inputs):
    if len(inputs) > 1:  # called on a list: cross-attention
        return [cross_attention(g, layer, params, inputs)]
    (x,) = inputs
    valid = None if layer.mask_value is None else valid_steps(g, x, layer.mask_value)
    return [attention(g, layer, params, x, layer.input_shape[0], valid)]


@converter(TransformerEncoderLayer)
def _transformer_encoder_layer(g, layer, params, inputs):
    (x,) = inputs
    E = layer.d_model
    T = layer.input_shape[0]
    valid = None if layer.mask_value is None else valid_steps(g, x, layer.mask_value)
    attn = layer.self_attn
    attn_params = {k: params[f"self_attn.{k}"] for k in attn.param_shapes()}

    def norm(name, z):
        with g.scope(name):
            return _layer_norm(g, z, (E,), params[f"{name}.weight"], params[f"{name}.bias"],
                               layer.layer_norm_eps)

    def attention_block(z):
        with g.scope("self_attn"):
            return attention(g, attn, attn_params, z, T, valid)

    def feed_forward(z):
        with g.scope("linear1"):
            f = _linear(g, z, params["linear1.weight"], params["linear1.bias"])
            f = activation(g, layer.activation, {"approximate": "none"}
                           if layer.activation == "gelu" else {}, f)
        with g.scope("linear2"):
            return _linear(g, f, params["linear2.weight"], params["linear2.bias"])

    if layer.norm_first:
        x1 = g.op("Add", [x, attention_block(norm("norm1", x))])
        y = g.op("Add", [x1, feed_forward(norm("norm2", x1))])
    else:
        x1 = norm("norm1", g.op("Add", [x, attention_block(x)]))
        y = norm("norm2", g.op("Add", [x1, feed_forward(x1)]))
    if valid is not None:  # zero at padded steps, as the layer
        y = g.op("Mul", [y, g.op("Unsqueeze", [valid, g.ints([-1], "axes")])])
    return [y]
