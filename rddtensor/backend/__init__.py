"""The backend floor: arrays (the NumPy/CuPy switch), the ops (NumPy references, CuPy kernels),
the allocator, process tuning.

Nothing here imports Spark or any other part of rddtensor. ``rddtensor.backend`` hands on the
array functions of ``rddtensor.backend.arrays`` (``from rddtensor.backend import
get_array_module``) and the device switch of the math: ``get_ops(*arrays)`` / ``ops_for(xp)``
return ``NUMPY_OPS`` (``rddtensor.backend.ops.NumpyOps``, the reference) or, for CuPy,
``CUPY_OPS`` (``rddtensor.backend.cupy_ops.CupyOps``, built on first use). The switch lives here
because it needs both classes. The other modules are imported by name
(``rddtensor.backend.allocator``, ``.runtime``).
"""
import threading as _threading

import numpy as _np

from rddtensor.backend.arrays import (DEVICES, asarray, check_device, cupy_module, cupy_special,
                                      device_count, device_info, get_array_module, gpu_available,
                                      gpu_ordinal, has_cupy, is_cupy_array, is_out_of_memory,
                                      pinned_empty, select_device, task_device, to_device,
                                      to_numpy)
from rddtensor.backend.cupy_ops import CupyOps
from rddtensor.backend.ops import NUMPY_OPS, NumpyOps

__all__ = [
    # rddtensor.backend.arrays
    "get_array_module", "to_numpy", "asarray", "has_cupy", "gpu_available", "device_count",
    "select_device", "task_device", "is_cupy_array", "cupy_module", "DEVICES", "check_device",
    "gpu_ordinal", "device_info", "cupy_special", "pinned_empty", "to_device", "is_out_of_memory",
    # the device switch
    "get_ops", "ops_for", "NumpyOps", "CupyOps", "NUMPY_OPS",
]

_CUPY_OPS: list = []
_LOCK = _threading.Lock()


def _cupy_ops() -> CupyOps:
    if not _CUPY_OPS:
        with _LOCK:
            if not _CUPY_OPS:
                _CUPY_OPS.append(CupyOps())
    return _CUPY_OPS[0]


def get_ops(*arrays) -> NumpyOps:
    """The ops for these arrays: ``CUPY_OPS`` if any is a CuPy array, else ``NUMPY_OPS``.

    Example:
        >>> import numpy as np
        >>> get_ops(np.zeros(2)) is NUMPY_OPS
        True
    """
    return NUMPY_OPS if get_array_module(*arrays) is _np else _cupy_ops()


def ops_for(xp) -> NumpyOps:
    """The ops of array module ``xp``: ``NUMPY_OPS`` for numpy, ``CUPY_OPS`` for cupy."""
    if xp is _np:
        return NUMPY_OPS
    if xp is not None and xp is cupy_module():
        return _cupy_ops()
    raise ValueError(f"xp must be numpy or cupy, got {xp!r}")


def __getattr__(name):
    if name == "CUPY_OPS":  # the CupyOps singleton, built on first use (needs cupy)
        return _cupy_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
