"""``Sequential``: a stack of layers with one flat parameter vector.

The user-facing ``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``save`` API is
``rddtensor.training.keras_api.KerasModel``'s, shared with graph models
(``rddtensor.training.graph``); this module holds the stack's structure and compute.
"""
from __future__ import annotations

import scipy.sparse

from rddtensor.layers.base import Layer, layers_from_config, shape_tuple
from rddtensor.training.keras_api import KerasModel
from rddtensor.training.protocol import TensorSpec


class Sequential(KerasModel):
    """A linear stack of layers trained as one model.

    Parameters live in one float32 vector ``theta`` (layer order; keys ``"<index>.<name>"`` such
    as ``"0.W"``); ``params`` holds reshaped views into it.

    Args:
        layers: the layers, first one with ``input_shape`` (or build on the first ``fit``).
        name: optional model name.
        seed: seed for weight initialisation (``None``: ``fit``'s seed, else fresh entropy).

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> m = L.Sequential([L.Dense(4, activation="relu", input_shape=(3,)), L.Dense(2)], seed=0)
        >>> m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> X = np.random.default_rng(0).normal(size=(32, 3)).astype("float32"); y = (X[:, 0] > 0).astype(int)
        >>> h = m.fit(X, y, epochs=2, batch_size=8, verbose=0)
        >>> m.predict(X).shape
        (32, 2)
    """

    def __init__(self, layers=None, name: str | None = None, seed: int | None = None):
        self._init_state(name, seed)
        self.layers: list[Layer] = []
        for layer in layers or []:
            self.add(layer)

    # --- structure ------------------------------------------------------------------------
    def add(self, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add expects a Layer, got {type(layer).__name__}")
        if self.built:
            raise ValueError("cannot add layers to a built model")
        self.layers.append(layer)
        if self._loss is not None:
            self.loss = self._loss  # the output activation changed: bind the loss again

    @property
    def input_shape(self):
        return self.layers[0].input_shape if self.layers else None

    @property
    def output_shape(self):
        return self.layers[-1].output_shape if self.built else None

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """One input, ``"X"``: the features (per-row shape of the first layer)."""
        return (TensorSpec("X", self.input_shape),)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """One output, ``"y"``: the last layer's (per-row shape once built)."""
        return (TensorSpec("y", self.output_shape),)

    def output_activation(self):
        return self.layers[-1].output_activation() if self.layers else None

    def build(self, input_shape=None, seed: int | None = None) -> "Sequential":
        """Build every layer from the per-sample ``input_shape`` and initialise the weights."""
        if not self.layers:
            raise ValueError("Sequential model has no layers")
        shape = input_shape if input_shape is not None else self.layers[0].input_shape
        if shape is None:
            raise ValueError("the first layer needs input_shape=..., or call build(input_shape) "
                             "or fit() so the model can infer it")
        shape = shape_tuple(shape, "input_shape")
        if self.layers[0].input_shape is not None and shape != self.layers[0].input_shape:
            raise ValueError(f"input_shape {shape} does not match the first layer's "
                             f"input_shape {self.layers[0].input_shape}")
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.build(shape)
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer.describe()}): {e}") from None
        self._init_weights(self.seed if seed is None else seed)
        return self

    # --- compute --------------------------------------------------------------------------
    def forward(self, params: dict, X, training: bool = False, rng=None, logits: bool = False):
        """Forward through every layer; returns ``(Y, backprop)``, ``backprop(dY) -> (dX, grads)``.

        ``logits=True`` leaves out the last layer's output activation (what a loss fused with
        it reads, see ``Loss.bind``): the training step and evaluation pass
        ``logits=loss.fused is not None``.
        """
        if scipy.sparse.issparse(X) and self.layers and \
                not getattr(self.layers[0], "accepts_sparse", False):
            X = X.toarray()  # only a layer that multiplies sparse batches (Dense) keeps them sparse
        backprops = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            run = layer.forward_logits if logits and i == last else layer.forward
            try:
                X, bp = run(self._layer_params(params, i), X, training=training, rng=rng)
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer.describe()}): {e}") from None
            backprops.append(bp)

        def backprop(dY):
            grads = {}
            for bp, keys in zip(reversed(backprops), reversed(self._keys)):
                dY, g = bp(dY)
                for k, full in keys:
                    grads[full] = g[k]
            return dY, grads

        return X, backprop

    def check_input_shape(self, shape, what: str, index: int = 0) -> None:
        """Refuse per-row input ``shape`` the first layer cannot take, naming ``what``."""
        first = self.layers[0] if self.layers else None
        if first is not None and first.input_shape is not None and \
                tuple(shape) != tuple(first.input_shape):
            raise ValueError(f"{what} has per-row shape {tuple(shape)} but the first layer "
                             f"({first.describe()}) expects {tuple(first.input_shape)}")

    def output_layer(self):
        return self.layers[-1] if self.layers else None

    def summary_rows(self):
        rows = [("#", "layer", "output shape", "params")]
        for i, layer in enumerate(self.layers):
            rows.append((str(i), self.layer_label(layer), str((None, *layer.output_shape)),
                         f"{self.layer_size(layer):,}"))
        return rows

    # --- persistence ----------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "layers": [
            {"class_name": type(l).__name__, "config": l.get_config()} for l in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        return cls(layers_from_config(config["layers"]), name=config.get("name"))

    def __repr__(self):
        return f"Sequential({len(self.layers)} layers" + (f", {self.layout.size:,} params)" if self.built else ")")

