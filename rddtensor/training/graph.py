"""``GraphModel`` (``L.Model(inputs, outputs)``): layers wired as a graph, Keras' functional API.

Calling layers on symbolic tensors (``rddtensor.layers.base``: ``L.Input``, ``layer(x)``,
``L.Add()([a, b])``) records each call; ``Model(inputs, outputs)`` reads the record back from
the outputs and keeps it as data: the inputs (``TensorSpec``), the distinct layers and one
``Node`` per call, in the order the calls were made (a node's inputs are always computed
before it). A tensor is a number: the inputs are ``0 .. n_inputs - 1``, node ``j``'s output is
``n_inputs + j``. That is also the model file (``get_config``), so loading replays the calls.

- **Weights**: the layers in the order of their first call; each layer's arrays in its own
  (PyTorch) order, keys ``"<layer index>.<key>"`` as ``Sequential``'s. A PyTorch module that
  declares its submodules in the order its ``forward`` first uses them maps by position.
- **Shared layers**: a layer called several times is one layer, one set of weights; ``backprop``
  adds the gradients of its calls. A layer with buffers (``BatchNorm``'s running statistics) is
  refused as a shared layer: both calls would move the statistics from the same old value.
- **Forward / backprop**: the nodes in order, each with its layer's views of ``params``; then
  in reverse, each node's output gradient is the sum over its consumers (out of place: a merge
  layer may hand the same array to several inputs).
- **Output activation**: the output node's layer's, so a loss fuses with a ``softmax`` /
  ``sigmoid`` as in ``Sequential`` (``forward(logits=True)`` runs that one call without it),
  unless that tensor also feeds another layer.
- **Several outputs**: ``forward`` returns a tuple and ``backprop`` takes one (each output's
  gradient enters where that tensor is made); the compiled loss is an ``OutputLosses``
  (``rddtensor.training.outputs``), which also says which outputs to leave the activation off.

Training, inputs as lists or dicts by input name, ``summary`` and files: see
``rddtensor.training.keras_api``.
"""
from __future__ import annotations

from dataclasses import dataclass

import scipy.sparse

from rddtensor.layers.base import Input, Layer, SymbolicTensor, layers_from_config, shape_tuple
from rddtensor.training.keras_api import KerasModel
from rddtensor.training.protocol import TensorSpec

__all__ = ["GraphModel", "Model", "Node"]


@dataclass(frozen=True)
class Node:
    """One layer call: ``layer`` (its index in the model's ``layers``), ``inputs`` (tensor
    numbers, see the module docstring) and ``as_list`` (called on a list, not one tensor)."""
    layer: int
    inputs: tuple
    as_list: bool


def _tensors(value, what: str) -> list:
    """``value`` (a symbolic tensor or a list/tuple of them) as a list, or a ``TypeError``."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"Model {what} must hold at least one tensor, got an empty list")
    for i, t in enumerate(items):
        if not isinstance(t, SymbolicTensor):
            raise TypeError(f"Model {what}[{i}] must be a symbolic tensor (L.Input(...) or a "
                            f"layer's output), got {type(t).__name__}")
    return items


def _display_name(layer: Layer, index: int) -> str:
    return layer.name or f"{type(layer).__name__.lower()}_{index}"


class GraphModel(KerasModel):
    """A model whose layers form a graph: several inputs, merges, residual connections,
    shared layers (Keras' functional ``Model(inputs, outputs)``, PyTorch's layouts).

    Args:
        inputs: an ``L.Input(...)`` or a list of them (their order is the order ``fit`` and
            ``predict`` take a list of arrays in).
        outputs: the symbolic tensor the model computes (a layer's output reachable from
            ``inputs``), or a list of them: a model with several outputs (``compile`` takes a
            loss per output, ``fit`` a target per output, ``predict`` returns a list).
        name: optional model name.
        seed: seed for weight initialisation (``None``: ``fit``'s seed, else fresh entropy).

    Example (a residual block and a two-input model):
        >>> import numpy as np, rddtensor.layers as L
        >>> x = L.Input((8,))
        >>> h = L.Dense(8, activation="relu")(x)
        >>> y = L.Dense(3)(L.Add()([x, L.Dense(8)(h)]))
        >>> m = L.Model(x, y, seed=0)
        >>> m.predict(np.ones((2, 8), np.float32)).shape
        (2, 3)
        >>> a, b = L.Input((4,), name="a"), L.Input((2,), name="b")
        >>> z = L.Dense(1)(L.Concatenate()([L.Dense(3)(a), L.Dense(3)(b)]))
        >>> two = L.Model([a, b], z, seed=0)
        >>> two.predict({"a": np.ones((5, 4)), "b": np.ones((5, 2))}).shape
        (5, 1)
    """

    def __init__(self, inputs, outputs, name: str | None = None, *, seed: int | None = None):
        self._init_state(name, seed)
        ins, outs = _tensors(inputs, "inputs"), _tensors(outputs, "outputs")
        for i, t in enumerate(ins):
            if not t.is_input:
                raise ValueError(f"Model inputs[{i}] is {t.describe()}, not an L.Input(...): a "
                                 "model starts from its Input tensors")
            if any(t is u for u in ins[:i]):
                raise ValueError(f"Model inputs[{i}] ({t.describe()}) is listed twice")
        reached = self._reached(outs)
        position = {id(t): i for i, t in enumerate(ins)}
        for t in reached:
            if t.is_input and id(t) not in position:
                raise ValueError(f"the model's outputs depend on {t.describe()}, which is not "
                                 "in inputs: add it to Model(inputs=[...])")
        used = {id(t) for t in reached}
        for i, t in enumerate(ins):
            if id(t) not in used:
                raise ValueError(f"Model inputs[{i}] ({t.describe()}) is not used by any "
                                 "output: remove it from inputs, or build an output from it")
        calls = sorted((t for t in reached if not t.is_input), key=lambda t: t.order)
        self.layers: list[Layer] = []
        index = {}
        for t in calls:
            if id(t.layer) not in index:
                index[id(t.layer)] = len(self.layers)
                self.layers.append(t.layer)
        number = dict(position)
        for j, t in enumerate(calls):
            number[id(t)] = len(ins) + j
        self.nodes = tuple(Node(index[id(t.layer)], tuple(number[id(u)] for u in t.inputs),
                                t.as_list) for t in calls)
        self._outputs = tuple(number[id(t)] for t in outs)
        self._input_specs = tuple(TensorSpec(t.name or f"input_{i}", t.shape, t.dtype)
                                  for i, t in enumerate(ins))
        self._out_shapes = tuple(t.shape for t in outs)
        self._check_names_and_sharing()
        names = [spec.name for spec in self.output_specs]
        for k, name in enumerate(names):
            if names.index(name) != k:
                raise ValueError(f"Model outputs[{k}] is listed twice ({name!r}): an output "
                                 "tensor may be listed once")

    @staticmethod
    def _reached(outputs) -> list:
        """Every tensor the outputs are computed from (outputs included)."""
        seen, order, stack = set(), [], list(outputs)
        while stack:
            t = stack.pop()
            if id(t) not in seen:
                seen.add(id(t))
                order.append(t)
                stack.extend(t.inputs)
        return order

    def _check_names_and_sharing(self) -> None:
        names = [s.name for s in self._input_specs]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two inputs are named {name!r}: Input names must be unique in "
                                 "a model (fit and predict match a dict of arrays by them)")
        layer_names = self.layer_names
        for i, name in enumerate(layer_names):
            if layer_names.index(name) != i:
                raise ValueError(f"two layers are named {name!r} ({self.layers[i].describe()} "
                                 f"and {self.layers[layer_names.index(name)].describe()}): layer "
                                 "names must be unique in a model")
        for i, layer in enumerate(self.layers):
            calls = sum(node.layer == i for node in self.nodes)
            if calls > 1 and layer.buffer_shapes():
                raise ValueError(f"{layer.describe()} is called {calls} times, but a layer with "
                                 f"running statistics ({sorted(layer.buffer_shapes())}) cannot "
                                 "be shared: both calls would update them from the same value. "
                                 "Use one such layer per call")

    # --- structure ------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Each layer's name: its own, else ``"<type>_<index>"`` (``"dense_2"``)."""
        return [_display_name(layer, i) for i, layer in enumerate(self.layers)]

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The ``L.Input`` tensors: name (``"input_<i>"`` when unnamed), per-row shape, dtype."""
        return self._input_specs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The outputs, each named after the call that computes it (``losses``, ``metrics``
        and targets given as dicts use these names)."""
        return tuple(TensorSpec(self._tensor_name(r), shape)
                     for r, shape in zip(self._outputs, self._out_shapes))

    @property
    def output_shape(self):
        """The output's per-row shape; a list of them for a model with several outputs."""
        return self._out_shapes[0] if len(self._outputs) == 1 else list(self._out_shapes)

    def output_layer(self, k: int = 0):
        node = self._output_node(k)
        return None if node is None else self.layers[self.nodes[node].layer]

    def _output_node(self, k: int = 0):
        """The node computing output ``k``, or ``None`` when that output is an input."""
        j = self._outputs[k] - len(self._input_specs)
        return j if j >= 0 else None

    def _activation(self, k: int):
        j = self._output_node(k)
        if j is None or any(self._outputs[k] in node.inputs for node in self.nodes):
            return None  # an input, or a tensor other layers read too: nothing to fuse
        return self.layers[self.nodes[j].layer].output_activation()

    def output_activation(self):
        """The output's activation (see ``Model.output_activation``); a tuple of one per output
        for a model with several outputs."""
        acts = tuple(self._activation(k) for k in range(len(self._outputs)))
        return acts[0] if len(acts) == 1 else acts

    def build(self, input_shape=None, seed: int | None = None) -> "GraphModel":
        """Initialise the weights (the layers were built when they were called).
        ``input_shape``, if given, must be the single input's per-row shape."""
        if input_shape is not None:
            shape = shape_tuple(input_shape, "input_shape")
            if len(self._input_specs) != 1:
                raise ValueError(f"input_shape={shape}: the model has "
                                 f"{len(self._input_specs)} inputs, whose shapes it knows")
            self.check_input_shape(shape, f"input_shape {shape}")
        self._init_weights(self.seed if seed is None else seed)
        return self

    # --- compute --------------------------------------------------------------------------
    def _feed(self, X) -> list:
        """The arrays of the inputs, in order, from ``forward``'s ``X`` (one array for a
        one-input model, a list or tuple of one per input otherwise)."""
        n = len(self._input_specs)
        arrays = list(X) if isinstance(X, (list, tuple)) else [X]
        if len(arrays) != n:
            raise ValueError(f"the model has {n} inputs {[s.name for s in self._input_specs]}; "
                             f"forward got {len(arrays)} array(s)")
        for i, A in enumerate(arrays):
            if scipy.sparse.issparse(A) and not self._takes_sparse(i):
                arrays[i] = A.toarray()  # only a layer that multiplies sparse batches keeps them
        return arrays

    def _takes_sparse(self, ref: int) -> bool:
        readers = [node for node in self.nodes if ref in node.inputs]
        return all(not node.as_list and getattr(self.layers[node.layer], "accepts_sparse", False)
                   for node in readers)

    def _fused_nodes(self, logits: bool) -> set:
        """The nodes ``forward(logits=True)`` runs without their output activation: the output
        (with one output), or the outputs whose compiled loss is fused (``OutputLosses``)."""
        if not logits:
            return set()
        if len(self._outputs) == 1:
            return {self._output_node()} if self._activation(0) is not None else set()
        fused = self.loss.fused if self.loss is not None else None
        return {self._output_node(k) for k in range(len(self._outputs))
                if fused is not None and fused[k] is not None}

    def forward(self, params: dict, X, training: bool = False, rng=None, logits: bool = False):
        """Run the nodes in order; returns ``(Y, backprop)``, ``backprop(dY) -> (dX, grads)``
        with ``dX`` one array per input (a tuple for several); with several outputs ``Y`` is a
        tuple and ``backprop`` takes a tuple.

        ``logits=True`` runs the output's call without its output activation (see
        ``output_activation``; what a fused loss reads); with several outputs, the outputs
        whose compiled loss is fused.
        """
        n_in = len(self._input_specs)
        values = self._feed(X) + [None] * len(self.nodes)
        fused = self._fused_nodes(logits)
        backprops = []
        for j, node in enumerate(self.nodes):
            layer = self.layers[node.layer]
            arg = [values[r] for r in node.inputs] if node.as_list else values[node.inputs[0]]
            run = layer.forward_logits if j in fused else layer.forward
            try:
                values[n_in + j], bp = run(self._layer_params(params, node.layer), arg,
                                           training=training, rng=rng)
            except ValueError as e:
                raise ValueError(f"{self._call_name(j)} ({layer.describe()}): {e}") from None
            backprops.append(bp)

        def backprop(dY):
            grads, grad_of = {}, [None] * len(values)
            for r, d in zip(self._outputs, [dY] if len(self._outputs) == 1 else dY):
                grad_of[r] = d if grad_of[r] is None else grad_of[r] + d
            for j in range(len(self.nodes) - 1, -1, -1):
                node = self.nodes[j]
                d, grad_of[n_in + j] = grad_of[n_in + j], None
                dX, g = backprops[j](d)
                self._add_layer_grads(grads, node.layer, g)
                for r, dx in zip(node.inputs, dX if node.as_list else [dX]):
                    grad_of[r] = dx if grad_of[r] is None else grad_of[r] + dx
            dX = grad_of[:n_in]
            return (dX[0] if n_in == 1 else tuple(dX)), grads

        outputs = tuple(values[r] for r in self._outputs)
        return (outputs[0] if len(outputs) == 1 else outputs), backprop

    # --- names and summary ----------------------------------------------------------------
    def _call_name(self, j: int) -> str:
        """Node ``j`` as a user reads it: the layer's name, ``[k]`` for the k-th call of a
        shared layer (from 0)."""
        node = self.nodes[j]
        name = self.layer_names[node.layer]
        calls = [i for i, n in enumerate(self.nodes) if n.layer == node.layer]
        return name if len(calls) == 1 else f"{name}[{calls.index(j)}]"

    def _tensor_name(self, ref: int) -> str:
        n_in = len(self._input_specs)
        return self._input_specs[ref].name if ref < n_in else self._call_name(ref - n_in)

    def summary_rows(self):
        rows = [("#", "layer", "type", "output shape", "params", "inputs")]
        for spec in self._input_specs:
            rows.append(("", spec.name, "Input", str((None, *spec.shape)), "0", ""))
        seen = set()
        for j, node in enumerate(self.nodes):
            layer = self.layers[node.layer]
            size = "shared" if node.layer in seen else f"{self.layer_size(layer):,}"
            seen.add(node.layer)
            label = self.layer_label(layer).replace(f" ({layer.name})", "")
            rows.append((str(j), self._call_name(j), label, str((None, *layer.output_shape)),
                         size, ", ".join(self._tensor_name(r) for r in node.inputs)))
        return rows

    # --- persistence ----------------------------------------------------------------------
    def get_config(self) -> dict:
        """The graph as data: inputs (name, shape, dtype), layers (first-call order), nodes
        (layer index, input tensor numbers, called on a list) and the output tensor numbers."""
        return {"name": self.name,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype}
                           for s in self._input_specs],
                "layers": [{"class_name": type(layer).__name__, "config": layer.get_config()}
                           for layer in self.layers],
                "nodes": [{"layer": n.layer, "inputs": list(n.inputs), "list": n.as_list}
                          for n in self.nodes],
                "outputs": list(self._outputs)}

    @classmethod
    def from_config(cls, config: dict) -> "GraphModel":
        """Replay the calls ``get_config`` recorded on fresh layers (not built)."""
        layers = layers_from_config(config["layers"])
        specs = config.get("inputs")
        if not isinstance(specs, list) or not specs:
            raise ValueError("a graph model config needs 'inputs': a list of {'name', 'shape', "
                             "'dtype'}")
        tensors = []
        for i, s in enumerate(specs):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise ValueError(f"input {i} must be {{'name': str, 'shape': [...], 'dtype': "
                                 f"str}}, got {str(s)[:80]}")
            tensors.append(Input(s.get("shape"), s.get("dtype", "float32"), s["name"]))
        inputs = list(tensors)
        nodes = config.get("nodes")
        if not isinstance(nodes, list):
            raise ValueError("a graph model config needs 'nodes': a list of layer calls")
        for j, n in enumerate(nodes):
            if not isinstance(n, dict) or not _index(n.get("layer"), len(layers)) or \
                    not isinstance(n.get("inputs"), list) or not n["inputs"] or \
                    not all(_index(r, len(tensors)) for r in n["inputs"]) or \
                    not isinstance(n.get("list"), bool) or \
                    (not n["list"] and len(n["inputs"]) != 1):
                raise ValueError(f"node {j} must be {{'layer': a layer index < {len(layers)}, "
                                 f"'inputs': tensor numbers < {len(tensors)}, 'list': bool}} "
                                 f"(one input unless 'list'), got {str(n)[:120]}")
            args = [tensors[r] for r in n["inputs"]]
            tensors.append(layers[n["layer"]](args if n["list"] else args[0]))
        outs = config.get("outputs")
        if not isinstance(outs, list) or not outs or \
                not all(_index(r, len(tensors)) for r in outs):
            raise ValueError(f"'outputs' must be a list of tensor numbers < {len(tensors)}, got "
                             f"{outs!r}")
        model = cls(inputs, [tensors[r] for r in outs], name=config.get("name"))
        if [id(layer) for layer in model.layers] != [id(layer) for layer in layers]:
            raise ValueError("'layers' must list every layer once, in the order of its first "
                             "call in 'nodes'")
        return model

    def __repr__(self):
        return (f"Model({len(self._input_specs)} input(s), {len(self.layers)} layers, "
                f"{len(self.nodes)} calls" +
                (f", {self.layout.size:,} params)" if self.built else ")"))


def _index(value, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


#: the public name (``L.Model``), as Keras' ``keras.Model(inputs, outputs)``
Model = GraphModel
