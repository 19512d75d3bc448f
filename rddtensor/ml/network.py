"""The network of a Spark ML stage: its JSON config, fresh copies, and the bytes shipped to executors.

An estimator holds only the architecture (``network`` Param: JSON text, so estimators persist
with ``DefaultParamsWriter`` and copy cheaply); every ``fit`` builds a fresh ``Sequential`` from
it. A model holds the trained ``Sequential``; ``transform`` ships it as one ``rddtensor.spark.wire``
record (JSON header + raw float32 arrays, never pickle): in a broadcast, or on Spark Connect
inside the plan or as a session artifact (``rddtensor.ml.shipping``).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from rddtensor.spark import wire
from rddtensor.spark.config import Kind
from rddtensor.training.sequential import Sequential
from rddtensor.optim import get_loss


def network_json(value) -> str:
    """The ``network`` Param's value: a ``Sequential``, its config dict or JSON text -> JSON text."""
    if isinstance(value, Sequential):
        config = value.get_config()
    elif isinstance(value, dict):
        config = value
    elif isinstance(value, str):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"network: not valid JSON ({e})") from None
    else:
        raise TypeError(f"network must be a rddtensor.layers.Sequential, its get_config() dict or that "
                        f"dict as JSON, got {type(value).__name__}")
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list) \
            or not config["layers"]:
        raise ValueError("network: expected a Sequential config with a non-empty 'layers' list "
                         "(as returned by Sequential.get_config())")
    Sequential.from_config(config)  # unknown layer types and bad settings fail here, not in fit
    return json.dumps(config, sort_keys=True)


def network_from_json(text: str, seed=None):
    """A fresh, unbuilt ``Sequential`` from the ``network`` Param."""
    model = Sequential.from_config(json.loads(text))
    model.seed = seed
    return model


def clone(model):
    """An independent copy of a built ``Sequential``: same config, weights and compile settings."""
    copy = decode(encode(model))
    copy.name = model.name
    return copy


def _loss_config(model):
    return None if model.loss is None else model.loss.get_config()


def encode(model) -> bytes:
    """A built model as one wire record: config, input shape, loss config, parameters."""
    model.ensure_built()
    meta = {"config": model.get_config(), "input_shape": list(model.input_shape),
            "loss": _loss_config(model)}
    return wire.pack(Kind.NETWORK, meta, {k: model.params[k] for k in model.layout.keys})


def decode(payload: bytes):
    """Inverse of ``encode``: a built ``Sequential`` (compiled with the loss, if there was one)."""
    kind, meta, arrays = wire.unpack(payload)
    if kind != Kind.NETWORK:
        raise ValueError(f"expected a network record, got {kind!r}")
    model = Sequential.from_config(meta["config"])
    model.build(tuple(meta["input_shape"]), seed=0)
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
                                 "input_shape": list(model.input_shape),
                                 "loss": _loss_config(model)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(model.theta).view(np.uint8))
    return h.hexdigest()[:16]
