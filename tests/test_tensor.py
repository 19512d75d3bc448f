import tracemalloc

import numpy as np
import pytest

from rddtensor.training.params import block_bounds
from rddtensor.spark import wire
from rddtensor.spark.tensor import BlockTensor

# (size, n_blocks): N = 1, 2, 3, 7 with size not divisible by N, size < N (empty blocks), size 0
SHAPES = [(10, 1), (11, 2), (10, 3), (17, 7), (3, 7), (0, 3)]


def _records(t):
    """Per partition, the decoded records: [[(meta, array), ...], ...]."""
    return [[wire.unpack(r)[1:] for r in part] for part in t.rdd.glom().collect()]


def _rand(size, seed, positive=False):
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    return np.abs(x) + 0.5 if positive else x


# --- layout and round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("size,n", SHAPES)
def test_round_trip_and_layout(sc, size, n):
    a = _rand(size, seed=size + n)
    t = BlockTensor.from_numpy(sc, a, n)
    assert (t.size, t.n_blocks, t.dtype, t.bounds) == (size, n, np.float32, block_bounds(size, n))
    out = t.to_numpy()
    assert out.dtype == np.float32 and np.array_equal(out, a)
    out[:] = 1  # the gathered array is the caller's to write
    parts = _records(t)
    assert [len(p) for p in parts] == [1] * n  # exactly one record per partition
    for i, ((meta, arrays),) in enumerate(parts):
        lo, hi = block_bounds(size, n)[i]
        assert meta == {"i": i, "lo": lo, "hi": hi, "size": size, "n": n}
        assert np.array_equal(arrays["x"], a[lo:hi])
    lo, hi = t.bounds[-1]
    assert np.array_equal(t.block(n - 1), a[lo:hi])


def test_from_numpy_flattens_and_casts(sc):
    t = BlockTensor.from_numpy(sc, np.arange(6).reshape(2, 3), 4, dtype=np.float64)
    assert t.dtype == np.float64 and t.bounds == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert np.array_equal(t.to_numpy(), np.arange(6.0))
    assert repr(t) == "BlockTensor(size=6, n_blocks=4, dtype=float64)"


def test_constructor_wraps_an_engine_rdd_and_checks_it(sc):
    t = BlockTensor.from_numpy(sc, np.arange(5.0), 2)
    again = BlockTensor(t.rdd, 5, 2, np.float32)
    assert np.array_equal(again.to_numpy(), np.arange(5.0, dtype=np.float32))
    with pytest.raises(ValueError, match="rdd has 2 partitions but n_blocks is 3"):
        BlockTensor(t.rdd, 5, 3, np.float32)


@pytest.mark.parametrize("call,match", [
    (lambda sc: BlockTensor.from_numpy(sc, [1.0], 0), "n_blocks must be a positive integer, got 0"),
    (lambda sc: BlockTensor.zeros(sc, -1, 2), "size must be a non-negative integer, got -1"),
    (lambda sc: BlockTensor.zeros(sc, 4, 2.5), "n_blocks must be a positive integer, got 2.5"),
    (lambda sc: BlockTensor.zeros(sc, 4, 2, np.int32), "dtype must be a floating-point dtype"),
    (lambda sc: BlockTensor.full(sc, 4, 2, "x"), "fill_value must be a real number"),
    (lambda sc: BlockTensor.zeros(sc, 4, 2).block(2), r"i must be in \[0, 2\), got 2"),
    (lambda sc: BlockTensor.zeros(sc, 4, 2).rebalance(0), "n_blocks must be a positive integer"),
])
def test_bad_arguments_name_themselves(sc, call, match):
    with pytest.raises(ValueError, match=match):
        call(sc)


# --- zeros / full are built in tasks -----------------------------------------------------------
def test_zeros_and_full_values(sc):
    assert np.array_equal(BlockTensor.zeros(sc, 3, 5).to_numpy(), np.zeros(3, np.float32))
    f = BlockTensor.full(sc, 11, 3, 0.25, np.float64)
    assert f.dtype == np.float64 and np.array_equal(f.to_numpy(), np.full(11, 0.25))
    assert [f.block(i).size for i in range(3)] == [4, 4, 3]


def test_zeros_and_full_never_hold_the_vector_on_the_driver(sc):
    size = 4_000_000  # 16 MB as float32; the driver may only see O(n_blocks) data
    tracemalloc.start()
    try:
        assert BlockTensor.full(sc, size, 4, 0.5).sum() == size * 0.5
        assert BlockTensor.zeros(sc, size, 4).max() == 0.0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"driver allocated {peak} bytes for a {size}-element tensor"


# --- elementwise arithmetic --------------------------------------------------------------------
def test_tensor_tensor_arithmetic_is_exact(sc):
    a, b = _rand(23, 1), _rand(23, 2, positive=True)
    x, y = BlockTensor.from_numpy(sc, a, 3).cache(), BlockTensor.from_numpy(sc, b, 3).cache()
    for got, want in [(x + y, a + b), (x - y, a - b), (x * y, a * b), (x / y, a / b),
                      (0.5 * x + y, np.float32(0.5) * a + b), (-x, -a)]:
        assert got.dtype == np.float32 and got.n_blocks == 3
        assert np.array_equal(got.to_numpy(), want)
    x.unpersist(), y.unpersist()


def test_scalar_arithmetic_matches_numpy(sc):
    a = _rand(10, 3, positive=True)
    x = BlockTensor.from_numpy(sc, a, 4).cache()
    for got, want in [(x + 1, a + 1), (1 - x, 1 - a), (x * 2.5, a * 2.5), (np.float32(3) * x, 3 * a),
                      (x / 3, a / 3), (3 / x, 3 / a)]:
        assert got.dtype == np.float32
        assert np.array_equal(got.to_numpy(), want)
    x.unpersist()


def test_mixed_dtypes_promote(sc):
    a = _rand(7, 4)
    z = BlockTensor.from_numpy(sc, a, 2) + BlockTensor.from_numpy(sc, a, 2, dtype=np.float64)
    assert z.dtype == np.float64
    np.testing.assert_allclose(z.to_numpy(), 2 * a.astype(np.float64))


def test_mismatched_tensors_raise_naming_both(sc):
    x = BlockTensor.zeros(sc, 10, 3)
    with pytest.raises(ValueError, match="size=10, n_blocks=3 and size=11, n_blocks=3"):
        x + BlockTensor.zeros(sc, 11, 3)
    with pytest.raises(ValueError, match="size=10, n_blocks=3 and size=10, n_blocks=2"):
        x.dot(BlockTensor.zeros(sc, 10, 2))
    with pytest.raises(TypeError, match="BlockTensor.from_numpy"):
        x * np.ones(10)
    with pytest.raises(TypeError):
        x + "1"


# --- map_blocks, reductions, rebalance ---------------------------------------------------------
def test_map_blocks(sc):
    a = _rand(10, 5)
    y = BlockTensor.from_numpy(sc, a, 3).map_blocks(lambda x, i: x * i + i)
    want = np.concatenate([a[lo:hi] * i + i for i, (lo, hi) in enumerate(block_bounds(10, 3))])
    assert np.array_equal(y.to_numpy(), want)
    bad = BlockTensor.zeros(sc, 10, 3).map_blocks(lambda x, i: x[:1])
    with pytest.raises(ValueError, match=r"must return shape \([34],\) for block [0-2], got \(1,\)"):
        bad.to_numpy()


@pytest.mark.parametrize("size,n", [(1001, 3), (3, 7)])
def test_reductions_match_numpy(sc, size, n):
    a, b = _rand(size, 6), _rand(size, 7)
    x, y = BlockTensor.from_numpy(sc, a, n).cache(), BlockTensor.from_numpy(sc, b, n).cache()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert isinstance(x.sum(), float)
    np.testing.assert_allclose(x.sum(), a64.sum(), rtol=1e-12, atol=1e-12)
    d = x.dot(y)
    np.testing.assert_allclose(d, a64 @ b64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.norm(), np.linalg.norm(a64), rtol=1e-12)
    assert (x.max(), x.min()) == (float(a.max()), float(a.min()))
    assert x.dot(y) == d  # fixed order: bit-identical on repeat
    x.unpersist(), y.unpersist()


def test_empty_reductions(sc):
    e = BlockTensor.zeros(sc, 0, 2)
    assert (e.sum(), e.norm(), e.to_numpy().shape) == (0.0, 0.0, (0,))
    for reduce in (e.max, e.min):
        with pytest.raises(ValueError, match="empty BlockTensor"):
            reduce()


@pytest.mark.parametrize("size,n_from,n_to", [(11, 3, 2), (11, 2, 5), (3, 2, 5), (4, 6, 1)])
def test_rebalance_equals_reblocking_on_the_driver(sc, size, n_from, n_to):
    a = _rand(size, 8)
    r = BlockTensor.from_numpy(sc, a, n_from).rebalance(n_to)
    assert (r.size, r.n_blocks, r.dtype) == (size, n_to, np.float32)
    got, want = _records(r), _records(BlockTensor.from_numpy(sc, a, n_to))
    assert len(got) == n_to and all(len(p) == 1 for p in got)
    for ((gm, ga),), ((wm, wa),) in zip(got, want):
        assert gm == wm and np.array_equal(ga["x"], wa["x"])


def test_persist_cache_unpersist_return_self(sc):
    t = BlockTensor.from_numpy(sc, np.arange(4.0), 2)
    assert t.cache() is t and t.rdd.is_cached
    assert t.sum() == 6.0 and t.sum() == 6.0
    assert t.unpersist() is t and not t.rdd.is_cached
    assert t.persist() is t
    t.unpersist()
