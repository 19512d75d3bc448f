"""rddtensor/training/batching.py: the one mini-batch rule every engine shares.

What users rely on: a partitioned run draws exactly the same global mini-batches as the
in-process loop (for any partitioning, empty partitions included), batches cover every row once
per epoch, and the random streams are reproducible from (seed, step, partition).
"""
import numpy as np
import pytest

from rddtensor.training.batching import batch_sizes, epoch_order, local_batches, step_rng, steps_per_epoch
from rddtensor.training.params import block_bounds

# (n_total, batch_size, partition boundaries): uneven, with an empty range, and a single one
PARTITIONINGS = [
    (10, 3, [0, 4, 7, 10]),
    (10, 3, [0, 0, 6, 10]),          # empty first partition
    (23, 5, [0, 7, 7, 16, 23]),      # empty partition in the middle, uneven sizes
    (17, 4, [0, 17]),                # one partition
    (9, 9, [0, 2, 9, 9]),            # full batch, empty last partition
    (7, 2, [0, 1, 2, 3, 4, 5, 6, 7]),  # one row per partition
]


@pytest.mark.parametrize("n, bs", [(10, 3), (9, 3), (1, 1), (5, 7), (100, 32), (0, 4)])
def test_steps_and_sizes(n, bs):
    steps = steps_per_epoch(n, bs)
    assert steps == -(-n // bs)
    sizes = batch_sizes(n, bs)
    assert len(sizes) == steps
    assert int(sizes.sum()) == n
    if steps:
        assert (sizes[:-1] == bs).all()
        assert 1 <= sizes[-1] <= bs


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n, bs, bounds", PARTITIONINGS)
def test_union_over_partitions_is_the_in_process_batch(n, bs, bounds, shuffle):
    seed, epoch = 7, 3
    whole = local_batches(n, bs, seed, epoch, shuffle)
    order = epoch_order(n, seed, epoch, shuffle)
    assert len(whole) == steps_per_epoch(n, bs)
    # the in-process batch s is positions [s*bs, (s+1)*bs) of the epoch order
    for s, rows in enumerate(whole):
        np.testing.assert_array_equal(rows, order[s * bs:(s + 1) * bs])
    parts = [local_batches(n, bs, seed, epoch, shuffle, lo=lo, hi=hi)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    for p, (lo, hi) in zip(parts, zip(bounds[:-1], bounds[1:])):
        assert len(p) == len(whole)  # every partition takes part in every step, maybe with 0 rows
        for rows in p:
            assert ((rows >= 0) & (rows < hi - lo)).all()  # indices are local to the partition
    for s, rows in enumerate(whole):
        union = np.concatenate([lo + p[s] for p, lo in zip(parts, bounds[:-1])])
        assert sorted(union.tolist()) == sorted(rows.tolist())
    sizes = batch_sizes(n, bs)
    for s in range(len(whole)):
        assert sum(len(p[s]) for p in parts) == sizes[s]


@pytest.mark.parametrize("shuffle", [False, True])
def test_block_bounds_partitioning_matches_in_process(shuffle):
    n, bs = 101, 16
    whole = local_batches(n, bs, 1, 0, shuffle)
    for n_parts in (1, 2, 3, 5, 200):  # 200 partitions: most are empty
        bounds = block_bounds(n, n_parts)
        parts = [local_batches(n, bs, 1, 0, shuffle, lo=lo, hi=hi) for lo, hi in bounds]
        for s, rows in enumerate(whole):
            union = np.concatenate([lo + p[s] for p, (lo, _) in zip(parts, bounds)])
            assert sorted(union.tolist()) == sorted(rows.tolist())


@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_covers_every_row_once(shuffle):
    batches = local_batches(50, 8, 3, 2, shuffle)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(50))


def test_no_shuffle_is_sequential():
    assert [b.tolist() for b in local_batches(5, 2, 0, 0, shuffle=False)] == [[0, 1], [2, 3], [4]]
    assert [b.tolist() for b in local_batches(5, 2, 0, 0, shuffle=False, lo=1, hi=4)] == [
        [0], [1, 2], []]


def test_shuffle_is_deterministic_and_changes_per_epoch_and_seed():
    a = epoch_order(200, 5, 0, True)
    np.testing.assert_array_equal(a, epoch_order(200, 5, 0, True))
    assert sorted(a.tolist()) == list(range(200))
    assert not np.array_equal(a, epoch_order(200, 5, 1, True))   # next epoch reshuffles
    assert not np.array_equal(a, epoch_order(200, 6, 0, True))   # other seed, other order
    assert not np.array_equal(a, np.arange(200))
    np.testing.assert_array_equal(epoch_order(200, 5, 0, False), np.arange(200))


def test_empty_data_has_no_steps():
    assert steps_per_epoch(0, 4) == 0
    assert len(batch_sizes(0, 4)) == 0
    assert local_batches(0, 4, 0, 0, True) == []
    assert local_batches(0, 4, 0, 0, False) == []


def test_step_rng_is_deterministic():
    a = step_rng(3, 10, 2).random(16)
    np.testing.assert_array_equal(a, step_rng(3, 10, 2).random(16))
    assert isinstance(step_rng(3, 10), np.random.Generator)
    np.testing.assert_array_equal(step_rng(3, 10).random(4), step_rng(3, 10, 0).random(4))
    for other in (step_rng(4, 10, 2), step_rng(3, 11, 2), step_rng(3, 10, 3)):
        assert not np.array_equal(a, other.random(16))
