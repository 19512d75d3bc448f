"""Model files are data: ``model.json`` (architecture, compile settings) + ``weights.npz``.

Weights load with ``allow_pickle=False`` and must be numeric arrays of the layout's shapes; the
config only names registered layer types, optimizers, losses and metrics (looked up in their
registries, never imported or evaluated), and every layer validates its own settings, so a
tampered model directory cannot run code and is refused with an error that names the file and
the layer. ``model.json`` is written last (after the arrays), so a directory without it is
recognisably incomplete.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from rddtensor.optim import get_loss, get_metric
from rddtensor.optim.optimizers import serialize_optimizer
from rddtensor.version import __version__

FORMAT = "rddtensor.model"
FORMAT_VERSION = 1


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_model(model, path: str, include_optimizer: bool = True) -> None:
    model.ensure_built()
    os.makedirs(path, exist_ok=True)
    weights = {k: v for k, v in model.params.items()}
    _atomic_write(os.path.join(path, "weights.npz"), lambda f: np.savez(f, **weights))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "rddtensor_version": _version(), "config": model.get_config(),
            "layout": model.layout.to_config()}
    if len(model.input_specs) == 1:  # (a graph model's config holds its inputs' shapes too)
        meta["input_shape"] = list(model.input_specs[0].shape)
    if model.loss is not None:
        meta["compile"] = {"optimizer": serialize_optimizer(model.optimizer),
                           "loss": model.loss.get_config(),
                           "metrics": [m.get_config() for m in model.metrics]}
    opt_path = os.path.join(path, "optimizer.npz")
    if include_optimizer and model.slots is not None and model.loss is not None:
        slots = {k: np.asarray(v) for k, v in model.slots.items()}
        _atomic_write(opt_path, lambda f: np.savez(f, **slots))
        meta["optimizer_step"] = int(model.step)
    elif os.path.exists(opt_path):  # never pair these weights with an older run's slots
        os.remove(opt_path)
    body = json.dumps(meta, indent=1).encode()
    _atomic_write(os.path.join(path, "model.json"), lambda f: f.write(body))


def _version() -> str:
    return __version__


def read_meta(path: str) -> dict:
    """Read and validate ``model.json`` of a model directory, with errors that say what is wrong."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model directory at {path!r}")
    meta_path = os.path.join(path, "model.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path!r} is not a complete rddtensor model: model.json is missing "
                                "(the save did not finish, or this is not a model directory)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt model file {meta_path!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path!r} is not an rddtensor model file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path!r} has model format version {version!r}; this rddtensor "
                         f"({_version()}) reads version {FORMAT_VERSION}: re-save the model with "
                         f"rddtensor {meta.get('rddtensor_version', '?')} or upgrade rddtensor")
    return meta


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refuse
        raise ValueError(f"{path!r} holds non-numeric data ({e}); refusing to load it") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"corrupt weights file {path!r}: {e}") from None


def _build(meta: dict, meta_path: str, model_class):
    """The architecture of ``model.json``, every layer type and setting checked
    (``layers_from_config``) and the model built."""
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise ValueError(f"{meta_path!r}: 'config' must hold a list of 'layers'")
    try:
        model = model_class(config).from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{meta_path!r}: {e}") from None
    shape = meta.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"{meta_path!r}: input_shape must be a list of positive integers, got "
                         f"{shape!r}")
    try:
        model.build(None if shape is None else tuple(shape), seed=0)
    except ValueError as e:
        raise ValueError(f"{meta_path!r}: the layers do not fit together: {e}") from None
    return model


def _numeric(arrays: dict, path: str) -> dict:
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":
            raise ValueError(f"{path!r}: array {k!r} has dtype {v.dtype}, expected numbers")
    return arrays


def _compile(model, c: dict) -> None:
    """Compile settings from ``model.json``: names looked up in the optimizer, loss and metric
    registries (an unknown name raises), settings validated by their classes."""
    loss, metrics, loss_weights = c["loss"], c["metrics"], None
    if not isinstance(c["optimizer"], (str, dict)):
        raise TypeError(f"optimizer must be a name or a config dict, got {c['optimizer']!r}")
    if isinstance(loss, dict) and "outputs" in loss:  # several outputs: a loss each
        loss_weights = loss.get("loss_weights")
        loss = [_loss(entry) for entry in loss["outputs"]]
    else:
        loss = _loss(loss)
    per_output = [m for m in metrics if isinstance(m, dict) and "output" in m]
    if per_output:
        by_output = [[] for _ in model.output_specs]
        for m in per_output:
            m = dict(m)
            by_output[m.pop("output")].append(_metric(m))
        metrics = by_output
    else:
        metrics = [_metric(m) for m in metrics]
    model.compile(optimizer=c["optimizer"], loss=loss, metrics=metrics, loss_weights=loss_weights)


def _loss(c):
    if isinstance(c, dict):
        c = dict(c)
        return get_loss(c.pop("name"), **c)
    if not isinstance(c, str):
        raise TypeError(f"loss must be a name or a config dict, got {c!r}")
    return c


def _metric(c):
    return get_metric(c) if isinstance(c, str) else \
        get_metric(c["name"], **{k: v for k, v in c.items() if k != "name"})


def load_model(path: str, model_class):
    """The model a directory ``save_model`` wrote holds; ``model_class(config)`` is the class
    of a model config (``rddtensor.training.models.model_class``)."""
    meta = read_meta(path)
    meta_path = os.path.join(path, "model.json")
    model = _build(meta, meta_path, model_class)
    weights_path = os.path.join(path, "weights.npz")
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"model directory {path!r} has no weights.npz")
    weights = _numeric(_load_npz(weights_path), weights_path)
    missing = [k for k in model.layout.keys if k not in weights]
    if missing:
        raise ValueError(f"{weights_path!r} lacks weights {missing}")
    try:
        model.set_weights([weights[k] for k in model.layout.keys])
    except ValueError as e:
        raise ValueError(f"{weights_path!r}: {e}") from None
    if "compile" in meta:
        try:
            _compile(model, meta["compile"])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{meta_path!r}: invalid compile settings: {e}") from None
        opt_path = os.path.join(path, "optimizer.npz")
        if os.path.exists(opt_path) and "optimizer_step" in meta:
            slots = _numeric(_load_npz(opt_path), opt_path)
            if set(slots) == set(model.optimizer.slot_names) and all(
                    v.shape == (model.layout.size,) for v in slots.values()):
                model.slots = {k: v.astype(np.float32) for k, v in slots.items()}
                model.step = int(meta.get("optimizer_step", 0))
    return model
