"""Where a Spark task computes (its GPU through CuPy, or NumPy), and what stays on the GPU.

A training task asks ``task_placement(model.device, meta, arrays)`` once: ``None`` means NumPy
(no GPU, ``device="cpu"``, or a sparse shard), else a ``Placement`` on the GPU that Spark's
resource scheduling assigned to the task (``TaskContext.get().resources()["gpu"]``). The
placement keeps the task's data shard on the device between iterations (``DEVICE_CACHE``,
keyed by shard id, partition and device, versioned by the shard's row count), copies θ_t in
and the gradient out through page-locked host buffers: only NumPy arrays cross the shuffle.

=============  =====================  =====================================================
``device``     cupy + a visible GPU   what the task does
=============  =====================  =====================================================
``"cpu"``      either                 NumPy
``"auto"``     yes                    the GPU (Spark's address, else ``RDDTENSOR_DEVICE``, 0)
``"auto"``     no                     NumPy, with one warning per worker when cupy is
                                      installed or Spark assigned the task a GPU
``"gpu"``      yes                    the GPU
``"gpu"``      no                     ``RuntimeError`` naming what is missing
=============  =====================  =====================================================

The cache changes speed, never results: a miss (another worker process, an evicted entry, an
executor restart) copies the shard from the RDD again. Standalone clusters find their GPUs with
the discovery script shipped in the package (``discovery_script_path()``,
``rddtensor info --gpu-discovery-script``).

Example:
    >>> choose_device("cpu") is None
    True
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict

import numpy as np

from rddtensor import backend
from rddtensor.spark.shards import model_inputs, model_targets

log = logging.getLogger("rddtensor")

__all__ = ["choose_device", "task_resources", "no_gpu_reason", "task_placement", "Placement",
           "DeviceCache", "DEVICE_CACHE", "discovery_script_path"]


def discovery_script_path() -> str:
    """Path of the GPU discovery script for ``spark.executor.resource.gpu.discoveryScript``.

    It prints ``{"name": "gpu", "addresses": [...]}`` from ``nvidia-smi`` (Spark's resource
    discovery format); standalone and YARN clusters without their own script point Spark at it.
    """
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "get_gpus_resources.sh")


# --- which device ---------------------------------------------------------------------------------
def task_resources() -> dict | None:
    """``TaskContext.get().resources()`` inside a Spark task, else ``None``."""
    try:
        from pyspark import TaskContext
    except ImportError:
        return None
    ctx = TaskContext.get()
    if ctx is None:
        return None
    try:
        return ctx.resources()
    except Exception:  # an old PySpark, or a context without resource information
        return None


def _assigned(resources) -> list | None:
    if resources and "gpu" in resources:
        return [str(a) for a in resources["gpu"].addresses]
    return None


def no_gpu_reason(resources=None) -> str:
    """Why this process computes without a GPU, in words a user can act on."""
    if not backend.has_cupy():
        what = "cupy is not installed (pip install rddtensor[gpu])"
    else:
        what = "cupy is installed but sees no CUDA GPU"
    where = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
    assigned = _assigned(resources)
    if assigned is not None:
        where += f", Spark assigned this task GPU address(es) {assigned}"
    else:
        where += (", Spark assigned this task no GPU (set spark.executor.resource.gpu.amount "
                  "and spark.task.resource.gpu.amount)")
    return f"{what} ({where})"


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_device(requested: str = "auto", resources: dict | None = None) -> int | None:
    """The CUDA device this task computes on (made current), or ``None`` for NumPy.

    Args:
        requested: ``"auto"``, ``"cpu"`` or ``"gpu"`` (``Sequential.compile(device=...)``).
        resources: ``TaskContext.get().resources()``; its ``"gpu"`` addresses pick the device.

    Raises:
        RuntimeError: ``requested="gpu"`` and no GPU is usable here.
    """
    requested = backend.check_device(requested)
    if requested == "cpu":
        return None
    if backend.gpu_available():
        return backend.task_device(resources)
    if requested == "gpu":
        raise RuntimeError(f"device='gpu' was requested, but {no_gpu_reason(resources)}; "
                           f"compile with device='auto' to fall back to NumPy")
    if backend.has_cupy() or _assigned(resources) is not None:
        _warn_once(f"{no_gpu_reason(resources)}: computing on NumPy. Compile with "
                   f"device='cpu' to silence this, or device='gpu' to make it an error")
    return None


# --- the executor-local cache ---------------------------------------------------------------------
def _nbytes(value) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return int(getattr(value, "nbytes", 0))


def _default_limit() -> int | None:
    mb = os.environ.get("RDDTENSOR_DEVICE_CACHE_MB")
    if mb is not None:
        return int(float(mb) * 2 ** 20)
    cp = backend.cupy_module()
    if cp is None or not backend.gpu_available():
        return None
    return int(cp.cuda.Device().mem_info[1]) // 2  # half the device: the rest for activations


class DeviceCache:
    """Executor-local LRU of device-resident values, keyed by (run, partition, ...), versioned.

    ``get(key, version, make)`` returns the stored value when its version matches, else calls
    ``make()``, stores and returns that (replacing an older version of the key). Entries are
    evicted least-recently-used past ``max_bytes`` (default ``RDDTENSOR_DEVICE_CACHE_MB``, else
    half the device memory) or ``max_entries``. When ``make`` runs out of device memory the
    cache is emptied and ``make`` tried once more. A cache changes speed, never results.

    Example:
        >>> cache = DeviceCache(max_entries=1)
        >>> cache.get(("run", 0), 1, lambda: "built")
        'built'
        >>> cache.get(("run", 0), 1, lambda: "rebuilt"), cache.stats()["hits"]
        ('built', 1)
    """

    def __init__(self, max_bytes: int | None = None, max_entries: int = 64, on_clear=None):
        self.max_bytes, self.max_entries = max_bytes, int(max_entries)
        self.on_clear = on_clear  # e.g. return the freed blocks of CuPy's memory pool
        self._entries: OrderedDict = OrderedDict()  # key -> (version, value, nbytes)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, version, make):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self._entries.pop(key, None)  # an old version: its memory is free for the new one
            self.misses += 1
        value = self._make(make)
        size = _nbytes(value)
        with self._lock:
            self._entries[key] = (version, value, size)
            self._evict(keep=key)
        return value

    def _make(self, make):
        try:
            return make()
        except Exception as e:
            if not backend.is_out_of_memory(e) or not self._entries:
                raise
            log.warning("device memory full: emptying the device cache (%d entries) and "
                        "retrying", len(self._entries))
            self.clear()
            return make()

    def _evict(self, keep):
        limit = self.max_bytes if self.max_bytes is not None else _default_limit()
        total = sum(e[2] for e in self._entries.values())
        for key in list(self._entries):
            over = len(self._entries) > self.max_entries or (limit is not None and total > limit)
            if not over:
                break
            if key != keep:
                total -= self._entries.pop(key)[2]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        if self.on_clear is not None:
            self.on_clear()

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "bytes": sum(e[2] for e in self._entries.values())}


def _free_pool():
    cp = backend.cupy_module()
    if cp is not None:
        cp.get_default_memory_pool().free_all_blocks()


DEVICE_CACHE = DeviceCache(on_clear=_free_pool)

_PINNED: dict = {}


def pinned_buffer(name: str, size: int, dtype) -> np.ndarray:
    """A worker-local page-locked host buffer of ``size`` elements, reused across tasks."""
    dtype = np.dtype(dtype)
    buf = _PINNED.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = _PINNED[name] = backend.pinned_empty(size, dtype)
    return buf[:size]


# --- one task on its GPU --------------------------------------------------------------------------
class Placement:
    """A training task on GPU ``device_id``: its inputs moved there, its gradient brought back.

    Args:
        device_id: the CUDA device (already current: ``choose_device`` made it so).
        cache: where shards stay between tasks (default ``DEVICE_CACHE``).
    """

    def __init__(self, device_id: int, cache: DeviceCache | None = None):
        self.device_id = int(device_id)
        self.cache = DEVICE_CACHE if cache is None else cache
        self.xp = backend.cupy_module()

    def to_device(self, host: np.ndarray, name: str):
        """``host`` on the device, copied through the pinned buffer ``name``."""
        host = np.ascontiguousarray(host)
        staging = pinned_buffer(name, host.size, host.dtype).reshape(host.shape)
        np.copyto(staging, host)
        stream = self.xp.cuda.Stream(non_blocking=True)
        out = self.xp.empty(host.shape, host.dtype)
        backend.to_device(staging, out=out, stream=stream)
        stream.synchronize()  # the staging buffer is reused by the next copy
        return out

    def to_host(self, dev, name: str) -> np.ndarray:
        """``dev`` copied into the pinned buffer ``name`` (valid until the next copy there)."""
        out = pinned_buffer(name, dev.size, dev.dtype).reshape(dev.shape)
        dev.get(out=out)
        return out

    def shard(self, meta: dict, arrays: dict) -> dict:
        """The shard's arrays on the device; from the cache when this worker holds them."""
        def make():
            return {k: self.to_device(v, "shard") for k, v in arrays.items()}
        if meta.get("id") is None:  # a shard without an id cannot be told apart: no caching
            return make()
        key = ("shard", meta["id"], meta.get("j"), self.device_id)
        return self.cache.get(key, int(meta["n"]), make)

    def step_inputs(self, theta, meta: dict, arrays: dict, rows):
        """``(θ, X, y, rows)`` on the device for ``gradient_step``."""
        d = self.shard(meta, arrays)
        rows = self.xp.asarray(np.asarray(rows, dtype=np.int64))
        return self.to_device(theta, "theta"), model_inputs(d), model_targets(d), rows

    def gradient_to_host(self, g) -> np.ndarray:
        """The flat gradient as a NumPy array in pinned memory (what the shuffle sends)."""
        return self.to_host(g, "grad") if backend.is_cupy_array(g) else g


def task_placement(requested: str, meta: dict, arrays: dict) -> Placement | None:
    """This training task's ``Placement``, or ``None`` to compute on NumPy.

    A sparse shard stays on NumPy (its matrix product is SciPy's).
    """
    dev = choose_device(requested, task_resources())
    if dev is None:
        return None
    if any(not isinstance(a, np.ndarray) for a in arrays.values()):
        log.debug("partition %s: sparse shard, computing on NumPy", meta.get("j"))
        return None
    return Placement(dev)
