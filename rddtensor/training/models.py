"""The model classes a model file can hold, and ``load_model`` for all of them.

A config with ``"nodes"`` is a graph model (``rddtensor.training.graph``), any other a
``Sequential`` (every model file written before graph models existed).
"""
from __future__ import annotations

from rddtensor.training import serialization
from rddtensor.training.graph import GraphModel
from rddtensor.training.sequential import Sequential

__all__ = ["load_model", "model_class"]


def model_class(config: dict) -> type:
    """The class whose ``from_config`` reads ``config`` (``get_config``'s output)."""
    return GraphModel if isinstance(config, dict) and "nodes" in config else Sequential


def load_model(path: str):
    """Load a model saved with ``model.save(path)``, ``Sequential`` or graph (data only: JSON +
    ``.npz``, never pickle).

    Example:
        >>> import os, tempfile, numpy as np, rddtensor.layers as L
        >>> x = L.Input((3,)); m = L.Model(x, L.Dense(2)(x), seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "m"); m.save(path)
        >>> np.array_equal(L.load_model(path).predict(np.ones((1, 3))), m.predict(np.ones((1, 3))))
        True
    """
    return serialization.load_model(path, model_class)
