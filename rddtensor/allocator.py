"""glibc ``malloc`` settings that keep a training process's temporary arrays on reused pages.

A layer's forward and backward allocate and free the same megabyte-sized temporaries at every
step (gates, activations, im2col tiles, gradients). glibc serves a request above its *mmap
threshold* (128 KiB at start, raised by the sizes freed since, at most 32 MiB) with a fresh
``mmap``, and returns free memory at the top of its heap to the kernel past its *trim
threshold*: either way the next step's arrays land on new pages, and on first touch the kernel
faults in and zeroes each 4 KiB page. For a layer whose step allocates megabytes (the LSTM
case of the layer benchmark, ``benchmarks/layers.py --malloc default`` against the default
``tuned``) those faults are a large part of the step's time, and the settings below remove
them. PyTorch's CPU allocator is glibc too; the effect in a process depends on what it freed
before, so without fixed settings a layer's speed depends on what else the process ran.

``tune_malloc`` fixes both thresholds: requests up to 32 MiB come from the heap and up to
256 MiB of free heap stays mapped for reuse. The price is memory: a process keeps up to that
much free heap resident instead of giving it back (a Python worker training a model holds its
working set anyway). It runs once per process, applied by ``rddtensor.runtime`` (every
Spark Python worker) and by the in-process fit, evaluate and predict, never by the math itself;
``RDDTENSOR_MALLOC=default`` leaves glibc's defaults alone, and it does nothing where glibc is
absent (macOS, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the (dynamic) mmap threshold
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_STATE: dict = {}


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for this process (once); returns what was done:
    ``"tuned"``, ``"default"`` (``RDDTENSOR_MALLOC=default``) or ``"unavailable"`` (no glibc)."""
    done = _STATE.get("result")
    if done is not None:
        return done
    if os.environ.get("RDDTENSOR_MALLOC", "").strip().lower() == "default":
        result = "default"
    elif not sys.platform.startswith("linux"):
        result = "unavailable"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            result = "unavailable"
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            result = "tuned" if ok else "unavailable"
    _STATE["result"] = result
    return result
