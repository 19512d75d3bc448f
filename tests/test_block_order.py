"""``fit(..., shuffle=BlockShuffle(block_rows, window_blocks))``: the epoch order for data larger
than memory (``rddtensor.training.batching``).

What users rely on: the order is a permutation of the rows, a pure function of (seed, epoch)
that differs between epochs; each window of the order is made of whole blocks (contiguous runs
of rows on disk); every partition of any partitioning takes exactly the in-process batches, so a
distributed fit (data store on, the default) equals the in-process fit; a fit resumed mid-epoch
is bit-identical to one never interrupted; a checkpoint refuses a resume with another order;
and bad arguments are refused naming the argument. ``shuffle=True`` keeps its global
permutation (the existing suites check every result made with it).
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import SGD, Adam
from rddtensor.training import BlockShuffle
from rddtensor.training import checkpoint as C
from rddtensor.training.batching import (batch_sizes, block_windows, epoch_order, local_batches,
                                         windows_to_prefetch)

_rng = np.random.default_rng(5)
X = _rng.normal(size=(40, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 2] > 0).astype(np.int64)
# 40 rows, blocks of 3 (the last one short), windows of 4 blocks: windows cross batches of 7 and
# partition boundaries; 6 steps per epoch, the last one 5 rows
SPEC = BlockShuffle(block_rows=3, window_blocks=4)
FIT = dict(batch_size=7, seed=3, verbose=0, shuffle=SPEC)


def model(opt=None, dropout=0.25):
    """Dropout (a resume must continue its masks too) draws per partition: distributed fits
    with several partitions compare models without it (``dropout=None``)."""
    hidden = [L.Dense(6, activation="relu", input_shape=(5,))]
    m = L.Sequential(hidden + ([L.Dropout(dropout)] if dropout else []) + [L.Dense(2)], seed=1)
    m.compile(optimizer=opt or Adam(0.05), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


# --- the order -------------------------------------------------------------------------------
@pytest.mark.parametrize("n, B, K", [(1, 1, 1), (10, 3, 2), (1000, 64, 4), (1001, 7, 1000),
                                     (97, 1, 1), (500, 600, 3)])
def test_a_permutation_deterministic_per_seed_and_epoch(n, B, K):
    spec = BlockShuffle(B, K)
    a = epoch_order(n, 3, 1, spec)
    assert a.dtype == np.int64 and np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, epoch_order(n, 3, 1, BlockShuffle(B, K)))
    batches = local_batches(n, 16, 3, 1, spec)
    assert np.array_equal(np.concatenate(batches), a)  # in-process batches: the order, cut
    assert [len(b) for b in batches] == batch_sizes(n, 16).tolist()
    if n > 10:
        assert not np.array_equal(a, epoch_order(n, 3, 2, spec))  # another epoch
        assert not np.array_equal(a, epoch_order(n, 4, 1, spec))  # another seed


def test_each_window_holds_whole_blocks():
    n, B, K = 4096, 64, 8
    order = epoch_order(n, 0, 0, BlockShuffle(B, K))
    blocks_seen = []
    for w in range(0, n, B * K):
        rows = order[w:w + B * K]
        blocks, counts = np.unique(rows // B, return_counts=True)
        assert len(blocks) == K and (counts == B).all()  # K complete blocks: K runs to read
        blocks_seen += blocks.tolist()
    assert sorted(blocks_seen) == list(range(n // B))
    assert not np.array_equal(order, np.sort(order))  # and the rows are mixed within a window


def test_a_short_last_block_and_window():
    n, B, K = 100, 8, 3  # 13 blocks (the last one 4 rows): windows of 3, 3, 3, 3 and 1 blocks
    order = epoch_order(n, 2, 5, BlockShuffle(B, K))
    rows_per_block = np.bincount(np.arange(n) // B)
    cut, windows = 0, []
    while cut < n:  # a window runs until a row of a (K+1)-th block comes
        blocks, end = set(), cut
        while end < n and len(blocks | {int(order[end]) // B}) <= K:
            blocks.add(int(order[end]) // B)
            end += 1
        assert sum(rows_per_block[b] for b in blocks) == end - cut  # whole blocks only
        windows.append(len(blocks))
        cut = end
    assert windows == [3, 3, 3, 3, 1]


PARTITIONINGS = [[0, 40], [0, 20, 40], [0, 11, 40], [0, 0, 13, 13, 14, 40], [0, 1, 39, 40]]


@pytest.mark.parametrize("bounds", PARTITIONINGS)
@pytest.mark.parametrize("shuffle", [SPEC, BlockShuffle(1, 1), BlockShuffle(64, 2), True])
def test_partitions_take_the_in_process_batches(bounds, shuffle):
    n, bs = 40, 7
    whole = local_batches(n, bs, 3, 2, shuffle)
    order = epoch_order(n, 3, 2, shuffle)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    parts = [local_batches(n, bs, 3, 2, shuffle, lo, hi)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    for step, rows in enumerate(whole):
        got = np.concatenate([lo + p[step] for lo, p in zip(bounds[:-1], parts)])
        assert np.array_equal(np.sort(got), np.sort(rows))
        for lo, p in zip(bounds[:-1], parts):  # a partition's rows come in epoch order
            assert np.all(np.diff(position[lo + p[step]]) > 0)


def test_shuffle_true_and_false_keep_their_orders():
    # True: the global permutation every earlier result used; False: the stored order
    assert np.array_equal(epoch_order(50, 7, 3, True),
                          np.random.default_rng([7, 3, 0x5EED]).permutation(50))
    assert np.array_equal(epoch_order(50, 7, 3, False), np.arange(50))
    assert not np.array_equal(epoch_order(50, 7, 3, BlockShuffle(1, 50)),
                              epoch_order(50, 7, 3, True))


def test_block_shuffle_is_small_frozen_and_hashable():
    s = BlockShuffle()
    assert (s.block_rows, s.window_blocks, s.window_rows) == (64, 1024, 65536)
    assert BlockShuffle(np.int64(8), 2) == BlockShuffle(8, 2)
    assert repr(BlockShuffle(np.int64(8), 2)) == "BlockShuffle(block_rows=8, window_blocks=2)"
    assert hash(BlockShuffle(8, 2)) == hash(BlockShuffle(8, 2))  # (a key of the worker's plans)
    assert BlockShuffle(8, 2) != True  # noqa: E712
    assert pickle.loads(pickle.dumps(s)) == s and len(pickle.dumps(s)) < 200
    with pytest.raises(AttributeError):
        s.block_rows = 3


@pytest.mark.parametrize("n, B, K, lo, hi, bs", [(40, 3, 4, 11, 40, 7), (100, 8, 3, 0, 100, 9),
                                                (50, 64, 2, 5, 20, 50), (33, 1, 5, 0, 0, 4)])
def test_windows_to_read_ahead(n, B, K, lo, hi, bs):
    order = epoch_order(n, 1, 2, BlockShuffle(B, K))
    bounds, runs = block_windows(n, 1, 2, BlockShuffle(B, K), lo, hi)
    assert bounds[0] == 0 and bounds[-1] == n and len(runs) == len(bounds) - 1
    asked = []
    for w, r in enumerate(runs):  # a window's runs: the range's rows in it, runs merged
        want = np.sort(order[bounds[w]:bounds[w + 1]])
        got = np.concatenate([np.arange(a, z) for a, z in r] + [np.zeros(0, int)])
        assert np.array_equal(lo + got, want[(want >= lo) & (want < hi)])
        assert (r[1:, 0] > r[:-1, 1]).all()
    for step in range(-(-n // bs)):  # each window once, by the first step that reads from it
        asked += windows_to_prefetch(bounds, step, bs)
        reads = np.searchsorted(bounds, np.arange(step * bs, min(n, (step + 1) * bs)), "right") - 1
        assert set(reads.tolist()) <= set(asked)
    assert asked == list(range(len(runs)))


def test_a_task_reads_its_windows_ahead(tmp_path):
    """``stages.read_ahead`` (the engine's CPU step): over an epoch, every stored row of the
    partition is asked for once, no later than the step that reads it."""
    from rddtensor.spark import stages
    from rddtensor.spark.config import StepConfig
    from rddtensor.spark.datastore import PartitionReader, PartitionWriter
    from rddtensor.spark.worker import Worker
    lo, n, bs = 11, 29, 7
    d = str(tmp_path / "p1")
    with PartitionWriter(d, dataset="t", part=1) as w:
        w.append({"X": X[lo:], "y": Y[lo:]})
    step = StepConfig(n_total=40, batch_size=bs, seed=3, shuffle=SPEC, offsets=(0, lo), t0=0,
                      batch_sizes=tuple(batch_sizes(40, bs).tolist()))
    plan = local_batches(40, bs, 3, 1, SPEC, lo, lo + n)
    asked, worker = [], Worker()
    with PartitionReader.open(d) as reader:
        reader.prefetch = lambda name, a, z: asked.append((name, a, z))
        for b in range(step.steps_per_epoch):
            stages.read_ahead(worker, step, 1, b, lo, n, reader)
            rows = {r for name, a, z in asked if name == "X" for r in range(a, z)}
            assert set(plan[b].tolist()) <= rows
    x_rows = sorted(r for name, a, z in asked if name == "X" for r in range(a, z))
    assert x_rows == list(range(n)) and {name for name, _, _ in asked} == {"X", "y"}


# --- fits --------------------------------------------------------------------------------------
def test_in_process_fit_trains_deterministically_and_differs_from_global():
    a, b, g = model(), model(), model()
    ha = a.fit(X, Y, epochs=2, **FIT)
    b.fit(X, Y, epochs=2, **FIT)
    g.fit(X, Y, epochs=2, **{**FIT, "shuffle": True})
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not np.array_equal(a.theta, g.theta)
    assert ha.epoch == [0, 1] and a.step == 12


@pytest.mark.parametrize("every, first_epochs, resumed_at", [
    (None, 1, 6),   # at the end of epoch 0
    (5, 2, 10),     # every 5 steps: step 10 is 4 steps into epoch 1 (steps 7..12)
])
def test_resume_mid_epoch_is_bit_identical(tmp_path, every, first_epochs, resumed_at):
    ref = model()
    href = ref.fit(X, Y, epochs=3, **FIT)
    d = str(tmp_path / "ckpt")
    model().fit(X, Y, epochs=first_epochs, checkpoint_dir=d, checkpoint_every=every, **FIT)
    assert C.latest(d).step == resumed_at
    m = model()
    h = m.fit(X, Y, epochs=3, checkpoint_dir=d, checkpoint_every=every, resume=True, **FIT)
    assert h.params["resumed_from"] == C.step_dir(d, resumed_at)
    np.testing.assert_array_equal(m.theta, ref.theta)
    for k in ref.slots:
        np.testing.assert_array_equal(m.slots[k], ref.slots[k])
    assert m.step == ref.step == 18
    n = len(h.epoch)
    for k, v in href.history.items():
        assert h.history[k] == v[-n:], k


def test_resume_refuses_another_order(tmp_path):
    d = str(tmp_path / "ckpt")
    model().fit(X, Y, epochs=1, checkpoint_dir=d, **FIT)
    for other in (True, BlockShuffle(3, 5)):
        with pytest.raises(ValueError, match=r"shuffle='BlockShuffle\(block_rows=3, "
                                             r"window_blocks=4\)', this fit has shuffle="):
            model().fit(X, Y, epochs=2, checkpoint_dir=d, resume=True, **{**FIT, "shuffle": other})
    d2 = str(tmp_path / "global")
    model().fit(X, Y, epochs=1, checkpoint_dir=d2, **{**FIT, "shuffle": True})
    assert C.latest(d2).meta["shuffle"] is True  # checkpoints of shuffle=True are as before
    with pytest.raises(ValueError, match=r"shuffle=True, this fit has shuffle='BlockShuffle"):
        model().fit(X, Y, epochs=2, checkpoint_dir=d2, resume=True, **FIT)


@pytest.mark.parametrize("shuffle", [1, 0, None, "batch", (64, 1024), BlockShuffle])
def test_bad_shuffle_is_refused_naming_the_argument(shuffle):
    with pytest.raises(ValueError, match=r"shuffle must be True, False or a BlockShuffle"):
        model().fit(X, Y, epochs=1, **{**FIT, "shuffle": shuffle})


@pytest.mark.parametrize("kwargs, msg", [
    ({"block_rows": 0}, r"block_rows must be a positive integer, got 0"),
    ({"window_blocks": -2}, r"window_blocks must be a positive integer, got -2"),
    ({"block_rows": True}, r"block_rows must be a positive integer, got True"),
    ({"window_blocks": 2.0}, r"window_blocks must be a positive integer, got 2.0"),
    ({"block_rows": "64"}, r"block_rows must be a positive integer, got '64'"),
])
def test_bad_block_shuffle_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        BlockShuffle(**kwargs)


# --- distributed (Spark, data store on) equals in-process ---------------------------------------
def chunked_rdd(sc, rows, sizes):
    """An RDD whose partition j holds exactly the next ``sizes[j]`` rows."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    chunks = [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]
    return sc.parallelize(chunks, len(chunks)).flatMap(lambda c: c)


@pytest.fixture(scope="module")
def in_process():
    m = model(SGD(0.1, momentum=0.9), dropout=None)
    h = m.fit(X, Y, epochs=2, **FIT)
    g = model(SGD(0.1, momentum=0.9), dropout=None)
    g.fit(X, Y, epochs=2, **{**FIT, "shuffle": True})
    assert not np.allclose(m.theta, g.theta, rtol=1e-3)  # the order shows in the weights
    return m, h


@pytest.mark.spark
@pytest.mark.parametrize("sizes, allreduce", [([40], "sharded"), ([11, 29], "sharded"),
                                              ([23, 17], "replicated")])
def test_distributed_equals_in_process(sc, in_process, sizes, allreduce):
    ref, href = in_process
    m = model(SGD(0.1, momentum=0.9), dropout=None)
    rdd = chunked_rdd(sc, list(zip(X, Y)), sizes)
    h = m.fit(rdd, epochs=2, allreduce=allreduce, iterations_per_job=4, **FIT)
    assert h.params["partitions"] == len(sizes) and h.params["data_store"] == "on"
    assert m.step == ref.step == 12
    if len(sizes) == 1:  # one partition: the same sums in the same order
        np.testing.assert_array_equal(m.theta, ref.theta)
    else:
        np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-5, atol=1e-7)
    for k in ref.slots:
        np.testing.assert_allclose(m.slots[k], ref.slots[k], rtol=1e-5, atol=1e-7)
    for k in href.history:
        np.testing.assert_allclose(h.history[k], href.history[k], rtol=1e-6, err_msg=k)
