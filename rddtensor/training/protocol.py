"""The model protocol: what the engines, checkpoints, Spark ML and model files need from a model.

A model is a pure function of a flat float32 parameter vector plus the state a fit changes:

- **structure**: ``layout`` (a ``ParamLayout``: each named tensor's slice of the flat vector,
  which ones are non-trainable buffers), ``input_specs`` / ``output_specs`` (a ``TensorSpec``
  per named input and output), ``build(input_shape, seed)``;
- **compute**: ``forward(params, X, training, rng, logits) -> (Y, backprop)`` with
  ``backprop(dY) -> (dX, grads)``, ``params`` the layout's views into θ;
- **training state**: ``theta`` (the flat vector), ``slots`` (the optimizer's, same length),
  ``step``, set together by ``load_state``; ``optimizer``, ``loss``, ``metrics``, ``device``
  from ``compile``;
- **shipping**: ``task_copy()`` (what a Spark task closure carries: no weights),
  ``get_config()`` / ``from_config()`` (model files are data, never pickle).

``Model`` implements what follows from that (weights in and out, slots, state, task copies);
``rddtensor.training.keras_api.KerasModel`` adds the user-facing ``compile`` / ``fit`` /
``evaluate`` / ``predict`` / ``save`` once for every model class, and
``rddtensor.training.sequential.Sequential`` and ``rddtensor.training.graph.GraphModel``
(``L.Model(inputs, outputs)``) implement the rest. A model with several inputs takes (and
``backprop`` returns) a tuple of arrays, one per input; one with several outputs returns a tuple
and its ``backprop`` takes one. Code outside a model uses only these members, never a model's
private ones.
"""
from __future__ import annotations

import abc
import copy
from dataclasses import dataclass

import numpy as np

from rddtensor.training.loop import interrupts_deferred

__all__ = ["Model", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output of a model: the per-row ``shape`` (no batch axis; ``None`` while
    the model is not built) and the ``dtype`` rows arrive in."""
    name: str
    shape: tuple | None
    dtype: str = "float32"


class Model(abc.ABC):
    """The base of every trainable model (see the module docstring for the protocol)."""

    layout = None
    theta = None
    slots = None
    step = 0
    optimizer = None
    metrics: list = []
    device = "auto"
    _loss = None

    # --- structure (the subclass) --------------------------------------------------------------
    @property
    @abc.abstractmethod
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in the order ``forward`` takes them."""

    @property
    @abc.abstractmethod
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in the order ``forward`` returns them."""

    @abc.abstractmethod
    def build(self, input_shape=None, seed: int | None = None) -> "Model":
        """Create ``layout`` and initialise ``theta`` (from ``input_shape`` per row)."""

    @abc.abstractmethod
    def forward(self, params: dict, X, training: bool = False, rng=None, logits: bool = False):
        """``(Y, backprop)``; ``logits=True`` leaves out the output activation a loss fuses."""

    @abc.abstractmethod
    def output_activation(self):
        """The output's activation (``("sigmoid", {})``-like, see ``Layer.output_activation``)
        or ``None``: what ``Loss.bind`` fuses with a cross-entropy (a tuple of one per output
        for a model with several outputs)."""

    @abc.abstractmethod
    def check_input_shape(self, shape, what: str) -> None:
        """Refuse a per-row input ``shape`` the model cannot take, naming ``what``."""

    @abc.abstractmethod
    def check_label_range(self, labels, what: str) -> None:
        """Refuse labels that cannot be the model's targets (before any work is lost)."""

    @abc.abstractmethod
    def get_config(self) -> dict:
        """The architecture as JSON-able data."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict) -> "Model":
        """The model ``get_config`` describes (not built)."""

    # --- what follows from the protocol ----------------------------------------------------------
    @property
    def loss(self):
        """The compiled loss (``rddtensor.optim.Loss``), bound to this model's output activation
        (``Loss.bind``: a sigmoid/softmax output with a cross-entropy trains on the logits)."""
        return self._loss

    @loss.setter
    def loss(self, loss) -> None:
        self._loss = None if loss is None else loss.bind(self.output_activation())

    @property
    def built(self) -> bool:
        return self.theta is not None

    def ensure_built(self) -> None:
        """Build from the declared input shape if not built yet."""
        if not self.built:
            self.build()

    def count_params(self) -> int:
        self.ensure_built()
        return self.layout.size

    def _set_theta(self, theta) -> None:
        self.theta = theta
        self.params = self.layout.unflatten(theta)

    def get_weights(self) -> list[np.ndarray]:
        """Copies of all parameters in layout order (PyTorch layouts)."""
        self.ensure_built()
        return [self.params[k].copy() for k in self.layout.keys]

    def set_weights(self, weights) -> None:
        """Set all parameters from a list of arrays in ``get_weights`` order, or from a mapping
        such as a PyTorch ``state_dict`` (matched by position, in its order; BatchNorm's
        ``num_batches_tracked`` counters are skipped). Every shape is checked before anything
        changes; a mismatch names both keys.

        Example:
            >>> import torch, rddtensor.layers as L                                   # doctest: +SKIP
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
            ...                           torch.nn.Linear(8, 2))            # doctest: +SKIP
            >>> m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)])
            >>> m.set_weights(net.state_dict())                             # doctest: +SKIP
        """
        self.ensure_built()
        keys = self.layout.keys
        if hasattr(weights, "keys") and hasattr(weights, "items"):
            names = [str(k) for k, v in weights.items()
                     if not str(k).endswith("num_batches_tracked")]
            weights = [_to_numpy(v) for k, v in weights.items()
                       if not str(k).endswith("num_batches_tracked")]
            what = "state_dict entry"
        else:
            if isinstance(weights, np.ndarray) and weights.dtype != object:
                raise TypeError("set_weights takes a list of arrays (get_weights order) or a "
                                f"mapping such as a state_dict, got one array of shape "
                                f"{weights.shape}")
            weights = [_to_numpy(w) for w in weights]
            names, what = [str(i) for i in range(len(weights))], "array"
        if len(weights) != len(keys):
            raise ValueError(f"set_weights expects {len(keys)} arrays ({keys}), got "
                             f"{len(weights)}" + (f" ({names})" if what != "array" else ""))
        for name, k, w in zip(names, keys, weights):  # check all first: a failed call changes nothing
            if w.shape != self.layout.shapes[k]:
                raise ValueError(f"weight {k!r} must have shape {self.layout.shapes[k]}, got "
                                 f"{w.shape}" + (f" from {what} {name!r}" if what != "array"
                                                 else ""))
        for k, w in zip(keys, weights):
            self.params[k][...] = w

    # --- training state: what the engines read and write through the model --------------------
    def init_slots(self) -> None:
        """Create the optimizer slots (zeros) and set the step to 0, unless they exist."""
        if self.slots is None:
            self.slots = self.optimizer.init_slots(self.layout.size)
            self.step = 0

    def load_state(self, theta, slots: dict, step: int) -> None:
        """Set θ, the optimizer slots and the step together (a Ctrl-C waits until all of
        them are written): what an engine hands back after training or a checkpoint holds."""
        with interrupts_deferred():
            self.theta[...] = theta
            for k in self.slots:
                self.slots[k][...] = slots[k]
            self.step = int(step)

    def task_copy(self, freeze_optimizer: bool = False) -> "Model":
        """A copy without weights or slots for Spark task closures (kilobytes, not O(P)).

        With ``freeze_optimizer`` the copy gets its own copy of the optimizer: the settings
        (e.g. a learning rate a callback changes between epochs) of the job it is shipped with.
        """
        s = copy.copy(self)
        s.theta, s.params, s.slots = None, {}, {}
        if freeze_optimizer:
            s.optimizer = copy.deepcopy(self.optimizer)
        return s

    # --- export: a file other runtimes serve --------------------------------------------------
    #: the ``format`` values ``export`` takes
    EXPORT_FORMATS = ("onnx",)

    def export(self, path, format: str = "onnx", **options) -> None:
        """Write the model for serving outside rddtensor (Keras 3's ``model.export``).

        ``format="onnx"``: an ONNX graph of what ``predict`` returns, with a dynamic batch
        dimension (``rddtensor.training.onnx_export``; needs ``pip install 'rddtensor[onnx]'``).
        A layer that cannot be exported raises an error naming it before any file is written.

        Example:
            >>> model.export("model.onnx")                                   # doctest: +SKIP
            >>> import onnxruntime as ort                                    # doctest: +SKIP
            >>> ort.InferenceSession("model.onnx").run(None, {"X": X})[0]    # doctest: +SKIP
        """
        if format not in self.EXPORT_FORMATS:
            raise ValueError(f"format must be one of {list(self.EXPORT_FORMATS)}, got "
                             f"{format!r}")
        # imported here: the exporter reads the layer classes, and onnx is an optional extra
        from rddtensor.training.onnx_export import export_onnx
        export_onnx(self, path, **options)


def _to_numpy(w):
    """An array-like (numpy, a PyTorch tensor on any device, a list) as a numpy array."""
    if hasattr(w, "detach") and hasattr(w, "cpu"):  # a torch.Tensor: no torch import needed
        w = w.detach().cpu().numpy()
    return np.asarray(w)
