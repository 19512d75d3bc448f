"""The device switch of the math: ``get_ops(*arrays)`` / ``ops_for(xp)``.

They return ``NUMPY_OPS`` (``rddtensor.ops.numpy_ops.NumpyOps``, the reference: the library's
NumPy code) or, for CuPy arrays, ``CUPY_OPS`` (``rddtensor.ops.cupy_ops.CupyOps``, fused kernels
for the hot methods, built on first use). The switch lives in this package because it needs both
classes. Arrays themselves (``get_array_module``, ``to_numpy``, devices) are
``rddtensor.backend``'s, the only module that imports CuPy.

Floor 1 with ``rddtensor.backend``, ``rddtensor.allocator`` and ``rddtensor.runtime``: nothing
here imports Spark or any other part of rddtensor.
"""
import threading as _threading

import numpy as _np

from rddtensor.backend import cupy_module, get_array_module
from rddtensor.ops.cupy_ops import CupyOps
from rddtensor.ops.numpy_ops import NUMPY_OPS, NumpyOps

__all__ = ["get_ops", "ops_for", "NumpyOps", "CupyOps", "NUMPY_OPS"]

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
