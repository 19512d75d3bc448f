"""Model files are data: ``model.json`` (architecture, compile settings) + ``weights.npz``.

Weights load with ``allow_pickle=False`` and the config only names registered layer types, so a
tampered model directory cannot run code. ``model.json`` is written last (after the arrays), so
a directory without it is recognisably incomplete.
"""
from __future__ import annotations

import json
import os

import numpy as np

FORMAT = "rddtensor.model"
FORMAT_VERSION = 1


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_model(model, path: str, include_optimizer: bool = True) -> None:
    model._require_built()
    os.makedirs(path, exist_ok=True)
    weights = {k: v for k, v in model.params.items()}
    _atomic_write(os.path.join(path, "weights.npz"), lambda f: np.savez(f, **weights))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "rddtensor_version": _version(), "config": model.get_config(),
            "input_shape": list(model.input_shape), "layout": model.layout.to_config()}
    if model.loss is not None:
        from optim.optimizers import serialize_optimizer
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
    from rddtensor import __version__
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
    except (OSError, EOFError) as e:
        raise ValueError(f"corrupt weights file {path!r}: {e}") from None


def load_model(path: str):
    from layers.sequential import Sequential
    meta = read_meta(path)
    model = Sequential.from_config(meta["config"])
    model.build(tuple(meta["input_shape"]), seed=0)
    weights_path = os.path.join(path, "weights.npz")
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"model directory {path!r} has no weights.npz")
    weights = _load_npz(weights_path)
    missing = [k for k in model.layout.keys if k not in weights]
    if missing:
        raise ValueError(f"{weights_path!r} lacks weights {missing}")
    model.set_weights([weights[k] for k in model.layout.keys])
    if "compile" in meta:
        from optim import get_loss, get_metric
        c = meta["compile"]
        loss, metrics = c["loss"], c["metrics"]
        if isinstance(loss, dict):
            loss = dict(loss)
            loss = get_loss(loss.pop("name"), **loss)
        metrics = [get_metric(m) if isinstance(m, str) else get_metric(
            m["name"], **{k: v for k, v in m.items() if k != "name"}) for m in metrics]
        model.compile(optimizer=c["optimizer"], loss=loss, metrics=metrics)
        opt_path = os.path.join(path, "optimizer.npz")
        if os.path.exists(opt_path) and "optimizer_step" in meta:
            slots = _load_npz(opt_path)
            if set(slots) == set(model.optimizer.slot_names) and all(
                    v.shape == (model.layout.size,) for v in slots.values()):
                model.slots = {k: v.astype(np.float32) for k, v in slots.items()}
                model.step = int(meta.get("optimizer_step", 0))
    return model
