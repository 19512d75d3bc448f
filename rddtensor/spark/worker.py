"""What a Spark Python worker keeps between the engine's tasks.

A Python worker runs one task at a time and, with ``spark.python.worker.reuse`` (the default),
many tasks in turn. ``current()`` is called first thing by every stage function the engine runs
(``rawrdd.map_raw``, ``stages.eval_stage``/``predict_stage``): on a worker's first task it
tunes the process (``rddtensor.runtime.prepare_worker``: malloc thresholds and
``gc.freeze()``) and makes the worker's ``Worker``; later tasks get the same one.

Nothing here changes a result, only speed: a buffer is fully overwritten before it is read,
and a batch plan that is not cached is recomputed, the same.
"""
from __future__ import annotations

import numpy as np

from rddtensor import runtime
from rddtensor.training.batching import local_batches

__all__ = ["Worker", "current"]

_MAX_PLANS = 8  # epoch plans kept (a fit needs one per epoch and partition this worker serves)


class Worker:
    """A worker process's reusable buffers and batch plans.

    ``buffers``: ``name -> array``, reused across tasks (``scratch``): a fresh parameter-sized
    array faults in every page of it again, each task. ``plans``: the row plans of recent
    epochs (``epoch_plan``), keyed by everything they depend on.
    """

    def __init__(self):
        self.buffers: dict = {}
        self.plans: dict = {}

    def scratch(self, name: str, size: int, dtype=np.float32) -> np.ndarray:
        """The buffer ``name`` of ``size`` elements of ``dtype`` (made anew when its size or
        dtype changed). Its contents are whatever the last task left: overwrite before use."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != (size,) or buf.dtype != dtype:
            buf = self.buffers[name] = np.empty(size, dtype=dtype)
        return buf

    def epoch_plan(self, step, epoch: int, lo: int, hi: int):
        """``local_batches`` of the rows ``[lo, hi)`` (one partition's) in ``epoch`` of the fit
        that ``step`` (a ``config.StepConfig``) describes."""
        key = (step.n_total, step.batch_size, step.seed, epoch, step.shuffle, lo, hi)
        plan = self.plans.get(key)
        if plan is None:
            plan = local_batches(step.n_total, step.batch_size, step.seed, epoch,
                                 step.shuffle, lo, hi)
            if len(self.plans) > _MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        return plan


_CURRENT: Worker | None = None


def current() -> Worker:
    """This process's ``Worker``; the first call prepares the process
    (``runtime.prepare_worker``) before anything else happens in the task."""
    global _CURRENT
    if _CURRENT is None:
        runtime.prepare_worker()
        _CURRENT = Worker()
    return _CURRENT
