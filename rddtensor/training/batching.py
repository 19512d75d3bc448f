"""Which rows form each mini-batch: one global rule shared by every engine.

An epoch's order is a permutation of all ``n_total`` rows drawn from ``(seed, epoch)``; step ``s``
takes positions ``[s*batch_size, (s+1)*batch_size)`` of it. A partition holding global rows
``[lo, hi)`` takes exactly the rows of each step that fall in its range, so the union over
partitions is the same mini-batch the in-process loop uses: distributed equals local, batch by
batch, for any partitioning.

``fit``'s ``shuffle`` picks the order (``check_shuffle``):

- ``False``: the rows as stored, every epoch.
- ``True`` (the default): a global permutation of all rows per epoch. A batch gathers
  ``batch_size`` rows from anywhere in the data: from the page cache that costs little, from a
  disk it is one random read per row.
- ``BlockShuffle(block_rows=B, window_blocks=K)``: for data larger than the page cache. The
  rows are cut into blocks of ``B`` consecutive rows (the last may be short); the blocks are
  permuted by ``(seed, epoch)``; each run of ``K`` consecutive blocks of that order is a
  *window*, whose rows are permuted by ``(seed, epoch, window)``. A batch still mixes rows from
  ``K`` places all over the data, but an epoch reads each window's ``K`` runs of ``B`` rows
  once, while its batches draw from them: the working set is ``K * B`` rows, read as contiguous
  runs. Like ``True`` it is a pure function of ``(n_total, seed, epoch, B, K)``, so in-process
  equals distributed for any partitioning; a partition computes its plan from the windows that
  hold its own blocks only (memory O(partition + window + n_total / B), not O(n_total)).
  Convergence: see ``BlockShuffle``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BlockShuffle", "count_rows", "take_rows", "check_shuffle", "shuffle_setting",
           "steps_per_epoch",
           "batch_sizes", "epoch_order", "local_batches", "step_rng", "block_windows",
           "windows_to_prefetch"]


@dataclass(frozen=True)
class BlockShuffle:
    """``fit(..., shuffle=BlockShuffle(block_rows=64, window_blocks=1024))``: shuffle blocks of
    rows, then the rows within windows of blocks (see the module docstring).

    Args:
        block_rows: rows per block ``B``: the length of each contiguous run an epoch reads.
        window_blocks: blocks per window ``K``: how many distant places of the data every batch
            draws from, and (times ``B``) the rows an epoch works on at a time.

    What it does to convergence (``benchmarks/shuffle_order.py``): only where the stored row
    order correlates with the label (data sorted or grouped by class, time, source) and only
    through ``K``: with label-sorted storage, ``K`` in the hundreds trained like a global
    shuffle, ``K = 16`` lost several points of accuracy, ``K <= 8`` far more; with storage in
    random order every ``(B, K)`` trained like a global shuffle. Keep ``window_blocks`` in the
    hundreds or more and pick ``block_rows`` for the disk (a few pages per block).

    Example:
        >>> from rddtensor.training.batching import epoch_order
        >>> epoch_order(12, seed=0, epoch=0, shuffle=BlockShuffle(3, 2)).tolist()  # windows of 6
        [5, 8, 4, 6, 3, 7, 11, 0, 10, 9, 1, 2]
    """

    block_rows: int = 64
    window_blocks: int = 1024

    def __post_init__(self):
        for name in ("block_rows", "window_blocks"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"BlockShuffle {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))  # plain ints: small pickles, a plain repr

    @property
    def window_rows(self) -> int:
        """Rows per window (``block_rows * window_blocks``; the last window may be shorter)."""
        return self.block_rows * self.window_blocks


def check_shuffle(shuffle):
    """``fit``'s ``shuffle`` as ``True``, ``False`` or a ``BlockShuffle``; else ``ValueError``."""
    if isinstance(shuffle, BlockShuffle):
        return shuffle
    if isinstance(shuffle, (bool, np.bool_)):
        return bool(shuffle)
    raise ValueError(f"shuffle must be True, False or a BlockShuffle (e.g. "
                     f"shuffle=BlockShuffle(block_rows=64, window_blocks=1024)), got {shuffle!r}")


def shuffle_setting(shuffle):
    """How a checkpoint records ``shuffle`` (JSON): ``True``/``False`` as always, a
    ``BlockShuffle`` as its repr, so a fit resumes only with the order it was written with."""
    shuffle = check_shuffle(shuffle)
    return repr(shuffle) if isinstance(shuffle, BlockShuffle) else shuffle


def count_rows(X) -> int:
    """The rows of a model input: one array (numpy, scipy sparse), or a tuple of arrays, one per
    input of a model with several inputs (all with the same rows)."""
    return int((X[0] if isinstance(X, tuple) else X).shape[0])


def take_rows(X, rows):
    """Rows ``rows`` (indices or a slice) of a model input (see ``count_rows``): every array of
    a tuple indexed with the same rows, so a batch of a several-input model stays aligned.

    Example:
        >>> import numpy as np
        >>> [a.tolist() for a in take_rows((np.arange(4), np.arange(4) * 10), [3, 0])]
        [[3, 0], [30, 0]]
    """
    if isinstance(X, tuple):
        return tuple(x[rows] for x in X)
    return X[rows]


def steps_per_epoch(n_total: int, batch_size: int) -> int:
    return -(-int(n_total) // int(batch_size))


def batch_sizes(n_total: int, batch_size: int) -> np.ndarray:
    """Global size of every step's batch (the last one may be short)."""
    steps = steps_per_epoch(n_total, batch_size)
    sizes = np.full(steps, batch_size, dtype=np.int64)
    if steps:
        sizes[-1] = n_total - batch_size * (steps - 1)
    return sizes


def epoch_order(n_total: int, seed: int, epoch: int, shuffle) -> np.ndarray:
    """The order of ``range(n_total)`` in one epoch: identity (``False``), a global permutation
    (``True``) or the block-then-window order of a ``BlockShuffle``."""
    shuffle = check_shuffle(shuffle)
    if shuffle is False:
        return np.arange(n_total, dtype=np.int64)
    if shuffle is True:
        return _permutation(int(n_total), seed, epoch).astype(np.int64, copy=False)
    return _block_order(int(n_total), seed, epoch, shuffle)


def local_batches(n_total: int, batch_size: int, seed: int, epoch: int, shuffle,
                  lo: int = 0, hi: int | None = None) -> list[np.ndarray]:
    """Per step of the epoch, the local row indices (relative to ``lo``) of rows ``[lo, hi)``.

    Rows within a step come in epoch order. Example:
        >>> [b.tolist() for b in local_batches(5, 2, 0, 0, shuffle=False, lo=1, hi=4)]
        [[0], [1, 2], []]
    """
    shuffle = check_shuffle(shuffle)
    hi = n_total if hi is None else hi
    steps = steps_per_epoch(n_total, batch_size)
    if shuffle is False:
        local = np.arange(hi - lo, dtype=np.int64)
        step_of = (np.arange(lo, hi, dtype=np.int64)) // batch_size
    elif lo == 0 and hi == n_total:  # the whole epoch (in-process): its order, cut in batches
        local = epoch_order(n_total, seed, epoch, shuffle)
        step_of = np.arange(n_total, dtype=np.int64) // batch_size
    elif shuffle is True:
        local, counts = _global_local(int(n_total), seed, epoch, int(lo), int(hi), batch_size)
        return np.split(local, np.cumsum(counts)[:-1]) if steps else []
    else:
        local, pos = _block_local(int(n_total), seed, epoch, shuffle, int(lo), int(hi))
        step_of = pos
        step_of //= batch_size
    counts = np.bincount(step_of, minlength=steps) if len(step_of) else np.zeros(steps, np.int64)
    return np.split(local, np.cumsum(counts)[:-1]) if steps else []


def _index_dtype(n: int):
    """The narrowest of int32/int64 that holds ``0 .. n``."""
    return np.int32 if n < 2 ** 31 else np.int64


def _permutation(n_total: int, seed, epoch) -> np.ndarray:
    """The global permutation of ``shuffle=True`` (the same numbers as ``Generator.permutation``,
    whose shuffle draws do not depend on the dtype), as int32 where it fits: half the bytes."""
    order = np.arange(n_total, dtype=_index_dtype(n_total))
    np.random.default_rng([int(seed), int(epoch), 0x5EED]).shuffle(order)
    return order


#: positions of the global permutation a partition scans at a time for its own rows
_SCAN = 1 << 20


def _global_local(n_total: int, seed, epoch, lo: int, hi: int, batch_size: int):
    """``(local, counts)`` of ``shuffle=True`` for rows ``[lo, hi)``: the range's rows (as
    ``row - lo``) in epoch order, and how many of them each step takes. The permutation is drawn
    whole (int32 where it fits), then scanned a slice at a time: the working memory is the
    permutation and the range's rows, nothing else n_total-sized."""
    order = _permutation(n_total, seed, epoch)
    local = np.empty(hi - lo, _index_dtype(n_total))
    counts = np.zeros(steps_per_epoch(n_total, batch_size), np.int64)
    done = 0
    for a in range(0, n_total, _SCAN):
        seg = order[a:a + _SCAN]
        at = np.flatnonzero((seg >= lo) & (seg < hi))  # ascending: epoch order
        k = len(at)
        np.subtract(seg[at], lo, out=local[done:done + k], casting="unsafe")
        at += a
        at //= batch_size
        counts += np.bincount(at, minlength=len(counts))
        done += k
    return local, counts


def step_rng(seed: int, step: int, partition: int = 0) -> np.random.Generator:
    """The random generator a partition uses in one step (dropout masks): from seed, step, partition."""
    return np.random.default_rng([int(seed), int(step), int(partition), 0xD0])


# --- the block-then-window order -----------------------------------------------------------------
def _blocks(n_total: int, seed, epoch, spec: BlockShuffle):
    """``(order, starts)``: the blocks in epoch order, and ``starts[p]`` the epoch position where
    the ``p``-th of them begins (``starts[-1] == n_total``); before the windows' shuffle."""
    B = spec.block_rows
    n_blocks = -(-n_total // B)
    order = np.random.default_rng([int(seed), int(epoch), 0xB10C]).permutation(n_blocks)
    sizes = np.full(n_blocks, B, np.int64)
    if n_blocks:
        sizes[-1] = n_total - B * (n_blocks - 1)
    starts = np.zeros(n_blocks + 1, np.int64)
    np.cumsum(sizes[order], out=starts[1:])
    return order, starts


def _window_permutation(size: int, seed, epoch, window: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), int(window), 0x5EED]).permutation(size)


def _block_order(n_total: int, seed, epoch, spec: BlockShuffle) -> np.ndarray:
    """Every row in epoch order: each window's rows (its blocks in order, a block's rows in
    order) permuted by the window's permutation."""
    B, K = spec.block_rows, spec.window_blocks
    order, starts = _blocks(n_total, seed, epoch, spec)
    # row at each position before the windows' shuffle: block order[p]'s rows, in order
    before = np.repeat(order * B - starts[:-1], np.diff(starts)) + np.arange(n_total)
    out = np.empty(n_total, np.int64)
    for w, p in enumerate(range(0, len(order), K)):
        a, z = starts[p], starts[min(p + K, len(order))]
        out[a:z] = before[a:z][_window_permutation(z - a, seed, epoch, w)]
    return out


def _block_local(n_total: int, seed, epoch, spec: BlockShuffle, lo: int, hi: int):
    """``(local, pos)``: rows ``[lo, hi)`` (as ``row - lo``) in epoch order, and their epoch
    positions, drawing only the permutations of the windows that hold blocks of the range.
    Memory: the outputs, one window's permutation and marks, and O(n_total / block_rows)."""
    B, K = spec.block_rows, spec.window_blocks
    local, pos = np.empty(max(hi - lo, 0), np.int64), np.empty(max(hi - lo, 0), np.int64)
    if hi <= lo:
        return local, pos
    order, starts = _blocks(n_total, seed, epoch, spec)
    mine = np.arange(lo // B, (hi - 1) // B + 1)  # the blocks [lo, hi) touches
    where = np.empty(len(order), np.int64)  # block -> its place in the block order
    where[order] = np.arange(len(order))
    p = where[mine]
    del where, order
    a = np.maximum(mine * B, lo)  # each block's rows in the range: [a, a + n)
    n = np.minimum((mine + 1) * B, hi) - a
    u = starts[p] + (a - mine * B)  # epoch position of row a, before its window's shuffle
    by_window = np.argsort(p // K, kind="stable")
    windows, first = np.unique(p[by_window] // K, return_index=True)
    done = 0
    for w, s, e in zip(windows.tolist(), first.tolist(), [*first[1:].tolist(), len(p)]):
        i = by_window[s:e]  # the range's blocks in window w
        start, stop = starts[w * K], starts[min((w + 1) * K, len(starts) - 1)]
        ramp = np.arange(int(n[i].sum())) - np.repeat(np.cumsum(n[i]) - n[i], n[i])
        marks = np.full(stop - start, -1, np.int64)  # window row before the shuffle -> row - lo
        marks[np.repeat(u[i] - start, n[i]) + ramp] = np.repeat(a[i] - lo, n[i]) + ramp
        marks = marks[_window_permutation(stop - start, seed, epoch, w)]  # after the shuffle
        at = np.flatnonzero(marks >= 0)
        local[done:done + len(at)] = marks[at]
        pos[done:done + len(at)] = start + at
        done += len(at)
    return local, pos


# --- what to read ahead ------------------------------------------------------------------------
def block_windows(n_total: int, seed: int, epoch: int, spec: BlockShuffle, lo: int = 0,
                  hi: int | None = None):
    """``(bounds, runs)`` of one epoch's ``BlockShuffle`` order, for reading ahead: window ``w``
    is epoch positions ``[bounds[w], bounds[w + 1])``, and ``runs[w]`` (shape ``(r, 2)``) the
    contiguous runs ``[a, z)`` of rows ``[lo, hi)`` it holds, relative to ``lo``, adjacent
    blocks merged (empty where the window holds none of them). Memory O(n_total / block_rows).

    Example:
        >>> bounds, runs = block_windows(12, 0, 0, BlockShuffle(3, 2), lo=2, hi=12)
        >>> bounds.tolist(), [r.tolist() for r in runs]
        ([0, 6, 12], [[[1, 7]], [[0, 1], [7, 10]]])
    """
    hi = n_total if hi is None else hi
    B, K = spec.block_rows, spec.window_blocks
    order, starts = _blocks(int(n_total), seed, epoch, spec)
    bounds = starts[np.r_[0:len(order):K, len(order)]]
    runs = []
    for p in range(0, len(order), K):
        blocks = np.sort(order[p:p + K])
        a, z = np.maximum(blocks * B, lo), np.minimum((blocks + 1) * B, min(n_total, hi))
        keep = a < z
        a, z = a[keep], z[keep]
        joined = np.flatnonzero(a[1:] != z[:-1]) + 1  # where a run ends
        runs.append(np.stack([np.concatenate([a[:1], a[joined]]),
                              np.concatenate([z[joined - 1], z[-1:]])], axis=1) - lo
                    if len(a) else np.zeros((0, 2), np.int64))
    return bounds, runs


def windows_to_prefetch(bounds, step: int, batch_size: int) -> range:
    """The windows (``block_windows``' ``bounds``) to read ahead at ``step``: the ones its
    batch enters and the next one, less those the step before asked for (steps may run in
    other processes: this depends on the step alone)."""
    n_total, last = int(bounds[-1]), len(bounds) - 2

    def window(position):  # the window holding an epoch position
        return int(np.searchsorted(bounds, position, side="right")) - 1

    first, end = step * batch_size, min((step + 1) * batch_size, n_total) - 1
    if end < first:
        return range(0)
    since = window(first - 1) + 2 if step > 0 else 0
    return range(max(window(first), since), min(window(end) + 1, last) + 1)
