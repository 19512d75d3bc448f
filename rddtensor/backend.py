"""The one NumPy/CuPy switch: every other module asks this one for its array module.

Only this module imports cupy. Layers, losses and optimizers write ``xp = get_array_module(X)``
and run unchanged on NumPy (CPU executors) or CuPy (GPU executors).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

try:  # cupy is optional: the `gpu` extra installs it
    import cupy as _cupy
except Exception:  # ImportError, or a broken CUDA install raising at import
    _cupy = None

__all__ = [
    "get_array_module", "to_numpy", "asarray", "has_cupy", "gpu_available", "device_count",
    "select_device", "task_device", "is_cupy_array", "cupy_module",
]


def has_cupy() -> bool:
    """True when cupy imported successfully (a GPU may still be absent)."""
    return _cupy is not None


def cupy_module():
    """The cupy module, or ``None``: for the few hot paths that register CuPy kernels."""
    return _cupy


def device_count() -> int:
    """Number of CUDA devices cupy can see (0 without cupy or without a GPU)."""
    if _cupy is None:
        return 0
    try:
        return int(_cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_available() -> bool:
    """True when cupy is installed and at least one CUDA device is visible."""
    return device_count() > 0


def is_cupy_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    Example:
        >>> import numpy as np
        >>> get_array_module(np.zeros(3)) is np
        True
    """
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def to_numpy(x):
    """Copy a CuPy array to the host; NumPy arrays and scalars pass through as NumPy."""
    if is_cupy_array(x):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def asarray(x, dtype=None, xp=None):
    """Convert ``x`` to an array of module ``xp`` (default: the module ``x`` already uses).

    Args:
        x: array-like, NumPy or CuPy array.
        dtype: optional dtype.
        xp: ``numpy`` or ``cupy``; converting to cupy without a GPU raises a clear error.
    """
    if xp is None:
        xp = get_array_module(x)
    if xp is np:
        return np.asarray(to_numpy(x), dtype=dtype)
    if _cupy is None or xp is not _cupy:
        raise ValueError(f"xp must be numpy or cupy, got {xp!r}")
    if not gpu_available():
        raise RuntimeError("asarray(xp=cupy) needs a visible CUDA GPU; use numpy arrays instead")
    return _cupy.asarray(x, dtype=dtype)


def select_device(device_id: int | None = None) -> int | None:
    """Make ``device_id`` the current CUDA device; ``None`` keeps the current one.

    Returns the device id in use, or ``None`` when no GPU is available.
    """
    if not gpu_available():
        return None
    if device_id is None:
        return int(_cupy.cuda.runtime.getDevice())
    n = device_count()
    if not 0 <= int(device_id) < n:
        raise ValueError(f"device_id must be in [0, {n}), got {device_id}")
    _cupy.cuda.Device(int(device_id)).use()
    return int(device_id)


def task_device(task_resources: dict | None = None) -> int | None:
    """Pick the GPU for a Spark task from its scheduled resources.

    Args:
        task_resources: ``TaskContext.get().resources()`` (a dict name -> ResourceInformation);
            ``None`` falls back to ``CUDA_VISIBLE_DEVICES``-relative device 0.

    Returns the selected device id, or ``None`` (use NumPy) when no GPU is visible.
    """
    if not gpu_available():
        if task_resources and "gpu" in task_resources:
            warnings.warn("Spark assigned a GPU to this task but cupy cannot see one; "
                          "falling back to NumPy (install the `gpu` extra: pip install rddtensor[gpu])")
        return None
    if task_resources and "gpu" in task_resources:
        addresses = list(task_resources["gpu"].addresses)
        if addresses:
            return select_device(int(addresses[0]) % device_count())
    return select_device(int(os.environ.get("RDDTENSOR_DEVICE", "0")))
