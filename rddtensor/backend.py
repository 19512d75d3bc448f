"""The one NumPy/CuPy switch: every other module asks this one for its array module.

Only this module imports cupy. Layers, losses and optimizers write ``xp = get_array_module(X)``
and run unchanged on NumPy (CPU executors) or CuPy (GPU executors).
"""
from __future__ import annotations

import os

import numpy as np

try:  # cupy is optional: the `gpu` extra installs it
    import cupy as _cupy
except Exception:  # ImportError, or a broken CUDA install raising at import
    _cupy = None

__all__ = [
    "get_array_module", "to_numpy", "asarray", "has_cupy", "gpu_available", "device_count",
    "select_device", "task_device", "is_cupy_array", "cupy_module", "DEVICES", "check_device",
    "gpu_ordinal", "device_info", "cupy_special", "pinned_empty", "to_device", "is_out_of_memory",
]

#: the values of the ``device`` option (``Sequential.compile(device=...)``)
DEVICES = ("auto", "cpu", "gpu")


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


def device_info(device_id: int = 0) -> dict:
    """``{"id", "name", "compute_capability", "memory_bytes"}`` of a visible CUDA device."""
    if not gpu_available():
        raise RuntimeError("no CUDA GPU is visible (device_info needs cupy and a GPU)")
    props = _cupy.cuda.runtime.getDeviceProperties(int(device_id))
    name = props["name"]
    return {"id": int(device_id), "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_bytes": int(props["totalGlobalMem"])}


def cupy_special(name: str):
    """``cupyx.scipy.special.<name>`` (e.g. ``"ndtr"``), or ``None`` when it is unavailable."""
    if _cupy is None:
        return None
    try:
        import cupyx.scipy.special as special
    except Exception:
        return None
    return getattr(special, name, None)


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


def check_device(device) -> str:
    """Validate a ``device`` option: ``"auto"`` (a GPU when one is visible), ``"cpu"`` or ``"gpu"``.

    Example:
        >>> check_device("GPU")
        'gpu'
    """
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    return device.lower()


def gpu_ordinal(address, visible: str | None = None, count: int | None = None) -> int:
    """The CUDA device ordinal of a GPU address that Spark's resource scheduling assigned.

    Spark's addresses are what the discovery script printed (``nvidia-smi`` indices). CUDA
    numbers the devices it can see from 0: with ``CUDA_VISIBLE_DEVICES=2,3`` address ``"3"`` is
    ordinal 1. Without that variable the address is the ordinal; a process that sees a single
    device (isolated by YARN or Kubernetes, renumbered from 0) uses it whatever the address.

    Args:
        address: one entry of ``TaskContext.get().resources()["gpu"].addresses``.
        visible: ``CUDA_VISIBLE_DEVICES`` (default: this process's environment).
        count: devices visible to this process (default: ``device_count()``).

    Example:
        >>> gpu_ordinal("3", visible="2,3", count=2)
        1
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    count = device_count() if count is None else int(count)
    address = str(address).strip()
    listed = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if address in listed:
        ordinal = listed.index(address)
    elif address.isdigit() and int(address) < count:
        ordinal = int(address)
    elif count == 1:
        ordinal = 0
    else:
        raise ValueError(f"Spark assigned GPU address {address!r} but this process sees {count} "
                         f"device(s) (CUDA_VISIBLE_DEVICES={visible!r}); the discovery script "
                         f"must print the indices that nvidia-smi shows on the executor's host")
    if not 0 <= ordinal < max(count, 1):
        raise ValueError(f"GPU address {address!r} maps to device {ordinal}, but only {count} "
                         f"device(s) are visible")
    return ordinal


def task_device(task_resources: dict | None = None) -> int | None:
    """Pick the GPU for a Spark task from its scheduled resources, and make it current.

    Args:
        task_resources: ``TaskContext.get().resources()`` (a dict name -> ResourceInformation);
            without a ``"gpu"`` entry the device is ``RDDTENSOR_DEVICE`` (default 0).

    Returns the selected device id, or ``None`` (use NumPy) when no GPU is visible.
    """
    if not gpu_available():
        return None
    if task_resources and "gpu" in task_resources:
        addresses = list(task_resources["gpu"].addresses)
        if addresses:
            return select_device(gpu_ordinal(addresses[0]))
    return select_device(int(os.environ.get("RDDTENSOR_DEVICE", "0")))


# --- host <-> device copies (only NumPy arrays cross the shuffle) -------------------------------
def pinned_empty(shape, dtype=np.float32) -> np.ndarray:
    """A NumPy array in page-locked host memory: copies from and to it run at full PCIe speed.

    Without a GPU this is a plain ``np.empty`` (nothing to pin for).
    """
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if not gpu_available():
        return np.empty(shape, dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = _cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
    return np.ndarray(shape, dtype=dtype, buffer=mem)


def to_device(host, out=None, stream=None):
    """Copy the NumPy array ``host`` to the current GPU (into ``out`` when given); returns it.

    With ``out``, the copy is asynchronous on ``stream`` when ``host`` is pinned
    (``pinned_empty``); the caller synchronizes the stream before reusing ``host``.
    """
    if _cupy is None:
        raise RuntimeError("to_device needs cupy and a CUDA GPU; install the `gpu` extra "
                           "(pip install rddtensor[gpu])")
    if out is None:
        return _cupy.asarray(host)
    out.set(np.ascontiguousarray(host), stream=stream)
    return out


def is_out_of_memory(error: BaseException) -> bool:
    """True for CuPy's device (or pinned host) out-of-memory errors and ``MemoryError``."""
    if isinstance(error, MemoryError):
        return True
    if _cupy is None:
        return False
    if isinstance(error, _cupy.cuda.memory.OutOfMemoryError):
        return True
    # pinned host allocations fail as cudaErrorMemoryAllocation
    runtime_error = getattr(_cupy.cuda.runtime, "CUDARuntimeError", None)
    return (runtime_error is not None and isinstance(error, runtime_error)
            and "memory" in str(error).lower())
