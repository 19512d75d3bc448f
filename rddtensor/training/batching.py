"""Which rows form each mini-batch: one global rule shared by every engine.

An epoch's order is a permutation of all ``n_total`` rows drawn from ``(seed, epoch)``; step ``s``
takes positions ``[s*batch_size, (s+1)*batch_size)`` of it. A partition holding global rows
``[lo, hi)`` takes exactly the rows of each step that fall in its range, so the union over
partitions is the same mini-batch the in-process loop uses: distributed equals local, batch by
batch, for any partitioning.
"""
from __future__ import annotations

import numpy as np


def steps_per_epoch(n_total: int, batch_size: int) -> int:
    return -(-int(n_total) // int(batch_size))


def batch_sizes(n_total: int, batch_size: int) -> np.ndarray:
    """Global size of every step's batch (the last one may be short)."""
    steps = steps_per_epoch(n_total, batch_size)
    sizes = np.full(steps, batch_size, dtype=np.int64)
    if steps:
        sizes[-1] = n_total - batch_size * (steps - 1)
    return sizes


def epoch_order(n_total: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Permutation of ``range(n_total)`` for one epoch (identity without shuffle)."""
    if not shuffle:
        return np.arange(n_total, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n_total)


def local_batches(n_total: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
                  lo: int = 0, hi: int | None = None) -> list[np.ndarray]:
    """Per step of the epoch, the local row indices (relative to ``lo``) of rows ``[lo, hi)``.

    Rows within a step come in epoch order. Example:
        >>> [b.tolist() for b in local_batches(5, 2, 0, 0, shuffle=False, lo=1, hi=4)]
        [[0], [1, 2], []]
    """
    hi = n_total if hi is None else hi
    steps = steps_per_epoch(n_total, batch_size)
    if shuffle:
        order = epoch_order(n_total, seed, epoch, True)
        position = np.empty(n_total, dtype=np.int64)
        position[order] = np.arange(n_total, dtype=np.int64)
        pos = position[lo:hi]
        local = np.argsort(pos, kind="stable")
        step_of = pos[local] // batch_size
    else:
        local = np.arange(hi - lo, dtype=np.int64)
        step_of = (np.arange(lo, hi, dtype=np.int64)) // batch_size
    counts = np.bincount(step_of, minlength=steps) if len(step_of) else np.zeros(steps, np.int64)
    return np.split(local, np.cumsum(counts)[:-1]) if steps else []


def step_rng(seed: int, step: int, partition: int = 0) -> np.random.Generator:
    """The random generator a partition uses in one step (dropout masks): from seed, step, partition."""
    return np.random.default_rng([int(seed), int(step), int(partition), 0xD0])
