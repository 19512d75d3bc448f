"""``BlockTensor``: a 1-D float tensor held on an RDD, one contiguous block per partition.

Partition ``i`` holds exactly one raw record, ``wire.pack("block", {"i", "lo", "hi", "size", "n"},
{"x": block})``, with ``(lo, hi) = rddtensor.training.params.block_bounds(size, n)[i]`` (the first
``size % n`` blocks one element longer; blocks may be empty when ``size < n``). This is how the
training engine holds θ and the optimizer slots. Tensors are immutable and every transformation is
lazy; elementwise ops between tensors zip partitions (no shuffle), reductions send O(N) floats to
the driver, and only ``to_numpy`` / ``from_numpy`` move O(size) data through it.

Example:
    >>> t = BlockTensor.from_numpy(sc, np.arange(10.0), 3)        # doctest: +SKIP
    >>> (2 * t + 1).sum(), t.dot(t), t.bounds                      # doctest: +SKIP
    (100.0, 285.0, [(0, 4), (4, 7), (7, 10)])
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np
from pyspark import StorageLevel

from rddtensor.training.params import block_bounds
from rddtensor.spark import rawrdd, wire
from rddtensor.spark.config import Kind
from rddtensor.backend import to_numpy as _host
from rddtensor.spark.errors import spark_errors

__all__ = ["BlockTensor"]


# --- records and argument checks (module level: task closures must never capture an RDD) --------
def _pack_block(meta: dict, x) -> bytes:
    return wire.pack(Kind.BLOCK, meta, {"x": x})


def _unpack_block(buf):
    kind, meta, arrays = wire.unpack(buf)
    if kind != Kind.BLOCK:
        raise ValueError(f"expected a 'block' record, got kind {kind!r}")
    return meta, arrays["x"]


def _block_meta(i: int, size: int, n: int) -> dict:
    q, r = divmod(size, n)  # block_bounds(size, n)[i] in O(1)
    lo = i * q + min(i, r)
    return {"i": i, "lo": lo, "hi": lo + q + (i < r), "size": size, "n": n}


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "positive" if minimum > 0 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"dtype must be a floating-point dtype (e.g. np.float32), got {dt}")
    return dt


# --- task functions ----------------------------------------------------------------------------
def _build_task(size, n, dtype, fill):
    def f(split, records):
        for _ in records:  # empty, but must be drained for worker reuse (SPARK-26549)
            pass
        meta = _block_meta(split, size, n)
        yield _pack_block(meta, np.full(meta["hi"] - meta["lo"], fill, dtype=dtype))
    return f


def _adopt_task(split, records):
    """Turn the pickled records of ``sc.parallelize`` into raw ones, checking their placement."""
    records = list(records)
    if len(records) != 1 or _unpack_block(records[0])[0]["i"] != split:
        raise RuntimeError(f"partition {split} did not receive exactly its own block")
    return records


def _map_task(fn, dtype):
    def f(split, records):
        for buf in records:
            meta, x = _unpack_block(buf)
            y = _host(fn(x, meta["i"]))
            if y.shape != x.shape:
                raise ValueError(f"map_blocks function must return shape {x.shape} for block "
                                 f"{meta['i']}, got {y.shape}")
            yield _pack_block(meta, y.astype(dtype, copy=False))
    return f


def _zip_task(op, dtype):
    def f(split, records):
        (a,), (b,) = rawrdd.pairs(records)
        meta, x = _unpack_block(a)
        yield _pack_block(meta, op(x, _unpack_block(b)[1]).astype(dtype, copy=False))
    return f


def _reduce_task(fn):
    """``fn(*arrays)`` over every block array in the partition (one, or two when zipped)."""
    def f(split, records):
        return [fn(*[_unpack_block(r)[1] for r in records])]
    return f


def _slice_task(size, n_new):
    def f(split, records):
        new_bounds = block_bounds(size, n_new)
        for buf in records:
            meta, x = _unpack_block(buf)
            lo, hi = meta["lo"], meta["hi"]
            for j, (a, b) in enumerate(new_bounds):
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    yield rawrdd.key(j)
                    yield wire.pack(Kind.SLICE, {"lo": a, "hi": b}, {"x": x[a - lo:b - lo]})
    return f


def _gather_task(size, n_new, dtype):
    def f(split, records):
        meta = _block_meta(split, size, n_new)
        parts = sorted((wire.unpack(r)[1:] for r in records), key=lambda p: p[0]["lo"])
        x = np.concatenate([p[1]["x"] for p in parts]) if parts else np.empty(0, dtype)
        if x.size != meta["hi"] - meta["lo"]:
            raise RuntimeError(f"rebalanced block {split} got {x.size} values, "
                               f"expected {meta['hi'] - meta['lo']}")
        yield _pack_block(meta, x.astype(dtype, copy=False))
    return f


def _sum64(x):
    return float(np.sum(x, dtype=np.float64))


def _dot64(x, y):
    return float(np.multiply(x, y, dtype=np.float64).sum())  # no BLAS: deterministic everywhere


def _total(values) -> float:
    """Combine per-block partials in block order (float64; inf/NaN behave as in NumPy)."""
    return float(np.sum(np.asarray(values, dtype=np.float64)))


def _extreme_or_none(fn):
    def f(x):
        return float(fn(x)) if x.size else None
    return f


def _operators(op):
    """The forward and reflected operator methods for ``op``."""
    return (lambda self, other: self._binary(other, op),
            lambda self, other: self._binary(other, op, reflected=True))


class BlockTensor:
    """A 1-D float tensor of length ``size`` split into ``n_blocks`` contiguous blocks on an RDD.

    Partition ``i`` holds one raw record: block ``i`` (bounds ``block_bounds(size, n_blocks)[i]``).
    Use the ``from_numpy`` / ``zeros`` / ``full`` constructors; the engine wraps its own RDDs of
    that record format directly.

    Args:
        rdd: raw-bytes RDD (``rddtensor.spark.rawrdd``) with ``n_blocks`` partitions of one block each.
        size: total number of elements.
        n_blocks: number of blocks (= partitions).
        dtype: floating-point dtype of the blocks.

    Example:
        >>> t = BlockTensor.zeros(sc, 10, 3) + 1.5                  # doctest: +SKIP
        >>> t.sum(), t.block(2)                                        # doctest: +SKIP
        (15.0, array([1.5, 1.5, 1.5], dtype=float32))
    """

    __array_ufunc__ = None  # `ndarray + tensor` defers to our reflected ops (→ TypeError)

    def __init__(self, rdd, size: int, n_blocks: int, dtype=np.float32):
        self._size = _count("size", size, 0)
        self._n = _count("n_blocks", n_blocks, 1)
        self._dtype = _float_dtype(dtype)
        parts = rdd.getNumPartitions()
        if parts != self._n:
            raise ValueError(f"rdd has {parts} partitions but n_blocks is {self._n}: a BlockTensor "
                             "needs exactly one block record per partition")
        self._rdd = rdd

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_numpy(cls, sc, array, n_blocks: int, dtype=np.float32) -> "BlockTensor":
        """Distribute a host array as ``n_blocks`` blocks (a multi-dimensional array is flattened
        in C order). ``n_blocks`` may exceed the length: the trailing blocks are then empty.

        Args:
            sc: the SparkContext.
            array: array-like, converted to ``dtype`` and flattened.
            n_blocks: positive number of blocks / partitions.
            dtype: floating-point dtype of the tensor (default float32).

        Example:
            >>> BlockTensor.from_numpy(sc, np.ones((2, 3)), 4).bounds      # doctest: +SKIP
            [(0, 2), (2, 4), (4, 5), (5, 6)]
        """
        n, dt = _count("n_blocks", n_blocks, 1), _float_dtype(dtype)
        flat = np.ascontiguousarray(_host(array), dtype=dt).reshape(-1)
        size = flat.size
        metas = [_block_meta(i, size, n) for i in range(n)]
        records = [_pack_block(m, flat[m["lo"]:m["hi"]]) for m in metas]
        return cls(rawrdd.map_raw(sc.parallelize(records, n), _adopt_task), size, n, dt)

    @classmethod
    def full(cls, sc, size: int, n_blocks: int, fill_value: float, dtype=np.float32) -> "BlockTensor":
        """A tensor with every element ``fill_value``, built block by block on the executors.

        Args:
            sc: the SparkContext.
            size: non-negative length.
            n_blocks: positive number of blocks / partitions.
            fill_value: the value of every element.
            dtype: floating-point dtype (default float32).

        Example:
            >>> BlockTensor.full(sc, 5, 2, 0.5).sum()                      # doctest: +SKIP
            2.5
        """
        size, n = _count("size", size, 0), _count("n_blocks", n_blocks, 1)
        dt = _float_dtype(dtype)
        if not isinstance(fill_value, numbers.Real):
            raise ValueError(f"fill_value must be a real number, got {fill_value!r}")
        rdd = rawrdd.map_raw(sc.parallelize([], n), _build_task(size, n, dt, float(fill_value)))
        return cls(rdd, size, n, dt)

    @classmethod
    def zeros(cls, sc, size: int, n_blocks: int, dtype=np.float32) -> "BlockTensor":
        """A tensor of zeros, built block by block on the executors (see ``full``).

        Example:
            >>> BlockTensor.zeros(sc, 5, 2).to_numpy()                     # doctest: +SKIP
            array([0., 0., 0., 0., 0.], dtype=float32)
        """
        return cls.full(sc, size, n_blocks, 0.0, dtype)

    # --- properties and host access ------------------------------------------------------------
    @property
    def rdd(self):
        """The raw-bytes RDD: partition ``i`` holds the one record of block ``i``."""
        return self._rdd

    @property
    def size(self) -> int:
        return self._size

    @property
    def n_blocks(self) -> int:
        return self._n

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``[(lo, hi), ...]`` of every block: ``rddtensor.training.params.block_bounds(size, n_blocks)``."""
        return block_bounds(self._size, self._n)

    def to_numpy(self) -> np.ndarray:
        """Gather the whole tensor to the driver as one (writable) NumPy array, in block order.

        Example:
            >>> BlockTensor.from_numpy(sc, [1, 2, 3], 2).to_numpy()        # doctest: +SKIP
            array([1., 2., 3.], dtype=float32)
        """
        with spark_errors():
            records = self._rdd.collect()
        blocks = sorted((_unpack_block(r) for r in records), key=lambda b: b[0]["i"])
        if [m["i"] for m, _ in blocks] != list(range(self._n)):
            raise RuntimeError(f"expected blocks 0..{self._n - 1}, got {[m['i'] for m, _ in blocks]}")
        out = np.concatenate([x for _, x in blocks]).astype(self._dtype, copy=False)
        if out.size != self._size:
            raise RuntimeError(f"blocks hold {out.size} values, expected size {self._size}")
        return out

    def block(self, i: int) -> np.ndarray:
        """Block ``i`` as a (writable) NumPy array, computing only partition ``i``.

        Example:
            >>> BlockTensor.from_numpy(sc, np.arange(5.0), 2).block(1)      # doctest: +SKIP
            array([3., 4.], dtype=float32)
        """
        i = _count("i", i, 0)
        if i >= self._n:
            raise ValueError(f"block index i must be in [0, {self._n}), got {i}")
        with spark_errors():
            (buf,) = self._rdd.ctx.runJob(self._rdd, lambda records: list(records), [i])
        return np.array(_unpack_block(buf)[1])

    # --- lazy transformations --------------------------------------------------------------------
    def map_blocks(self, fn, dtype=None) -> "BlockTensor":
        """A new tensor with block ``i`` replaced by ``fn(block, i)`` (lazy; runs on the executors).

        Args:
            fn: ``fn(x, i) -> array`` of the same length as ``x``. ``x`` is a read-only view of
                the received bytes: return a new array rather than writing into it.
            dtype: dtype of the result (default: this tensor's dtype).

        Example:
            >>> t = BlockTensor.full(sc, 5, 2, 1.0).map_blocks(lambda x, i: x * i)  # doctest: +SKIP
            >>> t.to_numpy()                                                 # doctest: +SKIP
            array([0., 0., 0., 1., 1.], dtype=float32)
        """
        dt = self._dtype if dtype is None else _float_dtype(dtype)
        rdd = rawrdd.map_raw(self._rdd, _map_task(fn, dt), preserves_partitioning=True)
        return BlockTensor(rdd, self._size, self._n, dt)

    def _check_aligned(self, other: "BlockTensor", what: str) -> None:
        if (self._size, self._n) != (other._size, other._n):
            raise ValueError(f"{what}: tensors must have the same size and n_blocks, got "
                             f"size={self._size}, n_blocks={self._n} and "
                             f"size={other._size}, n_blocks={other._n}")

    def _binary(self, other, op, reflected: bool = False):
        if isinstance(other, BlockTensor):
            if reflected:
                return other._binary(self, op)
            self._check_aligned(other, f"operator {op.__name__}")
            dt = np.result_type(self._dtype, other._dtype)
            rdd = rawrdd.map_raw(rawrdd.zip_raw(self._rdd, other._rdd), _zip_task(op, dt))
            return BlockTensor(rdd, self._size, self._n, dt)
        if isinstance(other, numbers.Real):
            s = other
            return self.map_blocks((lambda x, i: op(s, x)) if reflected else (lambda x, i: op(x, s)))
        if isinstance(other, np.ndarray):
            raise TypeError(f"cannot combine a BlockTensor with a {other.shape} numpy array; "
                            "distribute it first with BlockTensor.from_numpy(sc, array, n_blocks)")
        return NotImplemented

    __add__, __radd__ = _operators(operator.add)
    __sub__, __rsub__ = _operators(operator.sub)
    __mul__, __rmul__ = _operators(operator.mul)
    __truediv__, __rtruediv__ = _operators(operator.truediv)

    def __neg__(self) -> "BlockTensor":
        return self.map_blocks(lambda x, i: -x)

    def rebalance(self, n_blocks: int) -> "BlockTensor":
        """Re-block to ``n_blocks`` blocks through one shuffle (lazy).

        Each old block sends the slice that falls in each new block; a new block sorts the
        slices it receives by offset and concatenates them. Same values, new bounds: equal to
        ``from_numpy(sc, t.to_numpy(), n_blocks)`` without passing through the driver.

        Example:
            >>> BlockTensor.zeros(sc, 10, 3).rebalance(2).bounds             # doctest: +SKIP
            [(0, 5), (5, 10)]
        """
        n = _count("n_blocks", n_blocks, 1)
        if n == self._n:
            return self  # tensors are immutable
        shuffled = rawrdd.shuffle_raw(self._rdd, _slice_task(self._size, n), n)
        return BlockTensor(rawrdd.map_raw(shuffled, _gather_task(self._size, n, self._dtype)),
                           self._size, n, self._dtype)

    # --- reductions (executors compute one value per block; the driver combines N floats) -------
    def _per_block(self, rdd, fn) -> list:
        with spark_errors():  # a task's ValueError reaches the user as itself, not a JVM trace
            return rdd.mapPartitionsWithIndex(_reduce_task(fn)).collect()

    def sum(self) -> float:
        """Σ x, accumulated in float64 and combined in block order (deterministic).

        Example:
            >>> BlockTensor.from_numpy(sc, [1, 2, 3], 2).sum()              # doctest: +SKIP
            6.0
        """
        return _total(self._per_block(self._rdd, _sum64))

    def dot(self, other: "BlockTensor") -> float:
        """Σ x·y over two tensors of equal size and n_blocks, accumulated in float64.

        Args:
            other: a BlockTensor aligned with this one (else ValueError naming both shapes).

        Example:
            >>> t = BlockTensor.from_numpy(sc, [1, 2, 3], 2)                  # doctest: +SKIP
            >>> t.dot(t + 1)                                                 # doctest: +SKIP
            20.0
        """
        if not isinstance(other, BlockTensor):
            raise TypeError(f"dot needs a BlockTensor, got {type(other).__name__}")
        self._check_aligned(other, "dot")
        return _total(self._per_block(rawrdd.zip_raw(self._rdd, other._rdd), _dot64))

    def norm(self) -> float:
        """Euclidean norm √(Σ x²), accumulated in float64.

        Example:
            >>> BlockTensor.from_numpy(sc, [3, 4], 2).norm()                 # doctest: +SKIP
            5.0
        """
        return math.sqrt(_total(self._per_block(self._rdd, lambda x: _dot64(x, x))))

    def _extreme(self, name: str, fn) -> float:
        if self._size == 0:
            raise ValueError(f"{name}() of an empty BlockTensor (size 0) is undefined")
        values = [v for v in self._per_block(self._rdd, _extreme_or_none(fn)) if v is not None]
        return float(fn(np.asarray(values)))  # NaN propagates, as in NumPy

    def max(self) -> float:
        """Largest element (NaN if any element is NaN); an empty tensor raises ValueError.

        Example:
            >>> BlockTensor.from_numpy(sc, [3, -4], 2).max()                 # doctest: +SKIP
            3.0
        """
        return self._extreme("max", np.max)

    def min(self) -> float:
        """Smallest element (NaN if any element is NaN); an empty tensor raises ValueError."""
        return self._extreme("min", np.min)

    # --- caching -------------------------------------------------------------------------------
    def persist(self, storage_level: StorageLevel = StorageLevel.MEMORY_ONLY) -> "BlockTensor":
        """Keep the blocks (raw bytes) in executor storage after they are first computed."""
        self._rdd.persist(storage_level)
        return self

    def cache(self) -> "BlockTensor":
        """``persist()`` at MEMORY_ONLY."""
        return self.persist()

    def unpersist(self, blocking: bool = False) -> "BlockTensor":
        """Drop the stored blocks."""
        self._rdd.unpersist(blocking)
        return self

    def __repr__(self) -> str:
        return f"BlockTensor(size={self._size}, n_blocks={self._n}, dtype={self._dtype})"
