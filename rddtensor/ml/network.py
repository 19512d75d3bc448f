"""The network of a Spark ML stage: its JSON config, fresh copies, and the bytes shipped to executors.

An estimator holds only the architecture (``network`` Param: JSON text, so estimators persist
with ``DefaultParamsWriter`` and copy cheaply); every ``fit`` builds a fresh model from it: a
``Sequential``, or a graph ``L.Model`` with one output and one input or several (one column per
input: ``featuresCols``). A model holds the trained network; ``transform`` ships it as one
``rddtensor.spark.wire`` record (JSON header + raw float32 arrays, never pickle): in a
broadcast, or on Spark Connect inside the plan or as a session artifact
(``rddtensor.ml.shipping``).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from rddtensor.spark import wire
from rddtensor.spark.config import Kind
from rddtensor.training.models import model_class
from rddtensor.training.protocol import Model
from rddtensor.optim import get_loss


def _from_config(config: dict):
    """The (unbuilt) model ``config`` describes: a ``Sequential`` or a graph model with one
    output (what a Spark ML stage's prediction columns carry) and one input or several (read
    from ``featuresCol``, or one column per input from ``featuresCols``)."""
    model = model_class(config).from_config(config)
    if len(model.output_specs) != 1:
        raise ValueError(f"network: a Spark ML stage takes a model with one output (its "
                         f"prediction columns); this one has outputs "
                         f"{[s.name for s in model.output_specs]} (inputs "
                         f"{[s.name for s in model.input_specs]}): train it with model.fit(df) "
                         "(one column per input and per output) instead")
    return model


def input_shapes(model):
    """The per-row input shape (a list) of a one-input model; a list of them (one per input,
    in input order) for a model with several inputs."""
    specs = model.input_specs
    if len(specs) == 1:
        return list(model.input_shape)
    return [list(spec.shape) for spec in specs]


def network_json(value) -> str:
    """The ``network`` Param's value: a model (``Sequential`` or a graph ``L.Model`` with one
    output and one input or several), its config dict or JSON text -> JSON text."""
    if isinstance(value, Model):
        config = value.get_config()
    elif isinstance(value, dict):
        config = value
    elif isinstance(value, str):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"network: not valid JSON ({e})") from None
    else:
        raise TypeError(f"network must be a rddtensor model (rddtensor.layers.Sequential or "
                        f"L.Model), its get_config() dict or that dict as JSON, got "
                        f"{type(value).__name__}")
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list) \
            or not config["layers"]:
        raise ValueError("network: expected a model config with a non-empty 'layers' list "
                         "(as returned by Sequential.get_config() or Model.get_config())")
    _from_config(config)  # unknown layer types and bad settings fail here, not in fit
    return json.dumps(config, sort_keys=True)


def network_from_json(text: str, seed=None):
    """A fresh, unbuilt model from the ``network`` Param."""
    model = _from_config(json.loads(text))
    model.seed = seed
    return model


def clone(model):
    """An independent copy of a built model: same config, weights and compile settings."""
    copy = decode(encode(model))
    copy.name = model.name
    return copy


def _loss_config(model):
    return None if model.loss is None else model.loss.get_config()


def encode(model) -> bytes:
    """A built model as one wire record: config, input shape(s) (``input_shapes``), loss
    config, parameters."""
    model.ensure_built()
    meta = {"config": model.get_config(), "input_shape": input_shapes(model),
            "loss": _loss_config(model)}
    return wire.pack(Kind.NETWORK, meta, {k: model.params[k] for k in model.layout.keys})


def decode(payload: bytes):
    """Inverse of ``encode``: a built model (compiled with the loss, if there was one)."""
    kind, meta, arrays = wire.unpack(payload)
    if kind != Kind.NETWORK:
        raise ValueError(f"expected a network record, got {kind!r}")
    model = _from_config(meta["config"])
    # (a graph model with several inputs knows their shapes from its config)
    model.build(tuple(meta["input_shape"]) if len(model.input_specs) == 1 else None, seed=0)
    model.set_weights([arrays[k] for k in model.layout.keys])
    if meta.get("loss") is not None:
        loss = dict(meta["loss"])
        model.loss = get_loss(loss.pop("name"), **loss)
    return model


def fingerprint(model) -> str:
    """A digest of everything ``encode`` writes (config, input shape, loss, weights): names
    the decoded copy in worker caches, so a model with the same weights and another loss (the
    classifier's link) is not served the first one's."""
    model.ensure_built()
    h = hashlib.sha1(json.dumps({"config": model.get_config(),
                                 "input_shape": input_shapes(model),
                                 "loss": _loss_config(model)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(model.theta).view(np.uint8))
    return h.hexdigest()[:16]
