"""Process tuning for the Python processes that compute, applied in one place.

Math (layers, losses, the training step) has no process-wide side effects; what a computing
process needs is set here, once:

- ``prepare_worker()``: once per Spark Python worker, on its first task
  (``rddtensor.spark.worker.current()``, which every stage function the engine runs calls first:
  ``rawrdd.map_raw`` before a task's function, ``eval_stage``/``predict_stage`` too):
  glibc's malloc thresholds (``rddtensor.allocator.tune_malloc``: a step's temporaries reuse
  pages instead of faulting fresh ones in) and ``gc.freeze()`` (PySpark's daemon runs a full
  ``gc.collect()`` after every task; frozen objects, the modules and the first task's closure,
  are out of its reach).
- ``prepare_process()``: the malloc part, for an in-process fit, evaluate or predict (called by
  ``LocalRunner`` and ``Sequential``).

Both are idempotent and change speed only, never results; ``RDDTENSOR_MALLOC=default`` leaves
glibc alone.
"""
from __future__ import annotations

import gc

from rddtensor.allocator import tune_malloc

__all__ = ["prepare_worker", "prepare_process"]

_STATE = {"frozen": False}


def prepare_process() -> None:
    """Tune this process's allocator for training steps (once; see ``tune_malloc``)."""
    tune_malloc()


def prepare_worker() -> None:
    """Once per Spark Python worker: ``prepare_process`` and ``gc.freeze()``."""
    if not _STATE["frozen"]:
        tune_malloc()
        gc.freeze()
        _STATE["frozen"] = True
