"""Distributed checkpoints: every parameter block is written by the partition that owns it.

The file format, the save policy and resuming are in ``rddtensor.training.checkpoint`` (shared with
in-process fits). Here a checkpoint of a distributed fit is one Spark job over the parameter
state's ``settled()`` RDD: partition i holds block i of θ_t and its optimizer slots, writes them
to ``block-<i>-of-<N>.npz`` in the step directory and returns only the file's name, bounds, size
and SHA-256; the driver writes the manifest once every block is in place. θ never travels to the
driver. A retried write task rewrites the same bytes under the same name (idempotent).

The directory must be visible to the driver and every executor at the same path (local disk
for ``local[*]`` and ``local-cluster`` masters; NFS or a mounted bucket on a real cluster).
"""
from __future__ import annotations

from rddtensor.training.checkpoint import Checkpointer, _clear, block_name, step_dir, write_block
from rddtensor.spark.errors import spark_errors
from rddtensor.spark.stages import read_own, split_records


def _writer(sdir: str, n: int):
    def run(i, records):
        meta, w, slots = read_own(split_records(records)[0])
        yield write_block(sdir, meta["i"], n, meta["lo"], meta["hi"], meta["t"], w, slots)
    return run


def write_state(state, sdir: str) -> list:
    """Write every block of ``state`` (a ``ParameterState``) into ``sdir``, one file per owner;
    returns the manifest entries (O(N) small dicts: the only thing the driver receives)."""
    n = state.n_blocks
    with spark_errors():
        blocks = state.settled().mapPartitionsWithIndex(_writer(sdir, n)).collect()
    files = sorted(b["file"] for b in blocks)
    if files != [block_name(i, n) for i in range(n)]:
        raise RuntimeError(f"checkpoint in {sdir!r} got blocks {files}, expected {n}")
    return blocks


def save_state(checkpointer: Checkpointer, state, model, step: int, t0: int,
               steps_per_epoch: int, stats: dict) -> str:
    """Save a distributed fit's ``state`` (a ``ParameterState`` holding θ at ``step``, and the
    optimizer slots) with the step counters and ``stats`` of the unfinished epoch; returns the
    checkpoint's directory. ``model`` is the driver's model: only its architecture and optimizer
    are read, never its weights."""
    sdir = step_dir(checkpointer.directory, step)
    try:
        _clear(sdir)
        blocks = write_state(state, sdir)
        return checkpointer.commit(checkpointer.info(model, step, t0, steps_per_epoch, stats),
                                   blocks)
    except OSError as e:  # (a task's OSError arrives as itself: rddtensor.spark.errors)
        try:
            err = type(e)(f"the checkpoint of step {step} could not be written to {sdir!r}: {e}")
        except Exception:
            raise e from None
        if hasattr(e, "spark_trace"):
            err.spark_trace = e.spark_trace
        raise err from None
