"""Training data as N cached shards: one stacked ``(X, y)`` block per partition.

Accepted inputs: an RDD of ``(features, label)`` pairs (features: list, numpy array or
``pyspark.ml.linalg`` vector), an RDD of features alone (prediction), or a DataFrame with a
features column (vector or array) and a label column. Partition ``j`` of the shard RDD holds
exactly ``N`` raw records, ``[shard_j, pad, ..., pad]``, so that it zips with an all-gather shuffle
output (one record from each of the N parameter owners). Uneven and empty partitions are fine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rddtensor import rawrdd, wire
from rddtensor.errors import spark_errors


@dataclass
class Shards:
    """Cached, stacked training data: ``rdd`` (raw records), rows per partition, feature shape."""

    rdd: object
    sizes: list
    feature_shape: tuple
    has_labels: bool

    @property
    def n_partitions(self) -> int:
        return len(self.sizes)

    @property
    def n_total(self) -> int:
        return int(sum(self.sizes))

    @property
    def offsets(self) -> list:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)[:-1]])] if self.sizes else []

    def unpersist(self):
        self.rdd.unpersist()


def _features_of(value):
    if hasattr(value, "toArray"):  # pyspark.ml / mllib vectors, dense or sparse
        return value.toArray()
    if getattr(value, "__fields__", None) is not None:  # a struct, e.g. an image: decode it
        from rddtensor.ml.columns import decode_value
        return decode_value(value)
    return value


def _stack_rows(rows, feature_shape, has_labels, j):
    """``_stack``, but a partition of sparse vectors may stay one sparse matrix (see
    ``rddtensor.ml.columns.stack_sparse``) instead of being densified row by row."""
    rows = list(rows)
    feats = [r[0] if isinstance(r, (tuple, list)) and len(r) == 2 else None for r in rows] \
        if has_labels else rows
    if feats and hasattr(feats[0], "indices"):
        from rddtensor.ml.columns import stack_sparse
        X = stack_sparse(feats, feature_shape, j)
        if X is not None:  # labels are checked by _stack, with a placeholder feature per row
            arrays = _stack([(0.0, r[1]) for r in rows] if has_labels else [0.0] * len(rows),
                            (), has_labels, j)
            arrays["X"] = X
            return arrays
    return _stack(rows, feature_shape, has_labels, j)


def _wire_arrays(arrays):
    if isinstance(arrays["X"], np.ndarray):
        return arrays
    from rddtensor.ml.columns import encode_sparse
    return encode_sparse(arrays)


def _stack(rows, feature_shape, has_labels, j):
    X_rows, y_rows = [], []
    for r, row in enumerate(rows):
        if has_labels:
            if not isinstance(row, (tuple, list)) or len(row) != 2:
                raise ValueError(f"row {r} of partition {j}: expected a (features, label) pair, "
                                 f"got {type(row).__name__}")
            feats, label = row
            y_rows.append(label)
        else:
            feats = row
        x = np.asarray(_features_of(feats), dtype=np.float32)
        if x.shape != feature_shape:
            raise ValueError(f"row {r} of partition {j} has features of shape {x.shape}, "
                             f"expected {feature_shape} (every row needs the same feature length)")
        X_rows.append(x)
    X = np.stack(X_rows) if X_rows else np.zeros((0, *feature_shape), np.float32)
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))[0])
        raise ValueError(f"features contain NaN or inf (row {bad} of partition {j})")
    arrays = {"X": X}
    if has_labels:
        y = np.asarray([_features_of(v) for v in y_rows])
        if y.dtype.kind not in "biuf":
            raise ValueError(f"labels must be numeric, got {y.dtype} values in partition {j}")
        if y.dtype.kind == "f":
            y = y.astype(np.float32)
            if not np.isfinite(y).all():
                bad = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
                raise ValueError(f"labels contain NaN or inf (row {bad} of partition {j})")
        arrays["y"] = y if len(y) else np.zeros(0, np.float32)
    return arrays


def _as_rows(data, features_col, label_col, what):
    """An RDD of (features, label) pairs (or features) from an RDD or a DataFrame."""
    if hasattr(data, "select") and hasattr(data, "columns"):  # DataFrame
        missing = [c for c in (features_col, label_col) if c and c not in data.columns]
        if missing:
            raise ValueError(f"DataFrame has no column {missing[0]!r}; columns are {data.columns}")
        if label_col:
            return data.select(features_col, label_col).rdd.map(lambda r: (r[0], r[1])), True
        return data.select(features_col).rdd.map(lambda r: r[0]), False
    first = data.first() if not data.isEmpty() else None
    if first is None:
        raise ValueError(f"the {what} RDD is empty: no rows")
    has_labels = isinstance(first, tuple) and len(first) == 2 and label_col is not None
    return data, has_labels


def make_shards(data, n_partitions: int | None = None, feature_shape=None,
                features_col: str = "features", label_col: str | None = "label",
                n_records: int | None = None, what: str = "training data") -> Shards:
    """Stack ``data`` into cached shards, one per partition (``n_partitions`` repartitions).

    Args:
        data: RDD of ``(features, label)`` / features, or DataFrame with ``features_col`` and
            ``label_col`` (``label_col=None`` for features only).
        n_partitions: number of shards (default: the input's partition count).
        feature_shape: per-row feature shape (default: taken from the first row).
        n_records: records per partition (default: the partition count): the number of
            parameter owners whose all-gather this shard RDD will be zipped with.
        what: how error messages name this data ("training data", "validation_data", ...).
    """
    rows, has_labels = _as_rows(data, features_col, label_col, what)
    if n_partitions is not None and n_partitions != rows.getNumPartitions():
        rows = rows.repartition(int(n_partitions))
    N = rows.getNumPartitions()
    n_records = N if n_records is None else int(n_records)
    with spark_errors():
        if feature_shape is None:
            if rows.isEmpty():
                raise ValueError(f"the {what} is empty: no rows")
            first = rows.first()
            feature_shape = np.asarray(_features_of(first[0] if has_labels else first)).shape
        feature_shape = tuple(int(s) for s in feature_shape)

        def build(j, it):
            arrays = _stack_rows(it, feature_shape, has_labels, j)
            yield wire.pack("shard", {"j": j, "n": len(arrays["X"])}, _wire_arrays(arrays))
            for _ in range(n_records - 1):
                yield wire.PAD

        shard_rdd = rawrdd.map_raw(rows, build).persist()
        try:
            sizes = _sizes(shard_rdd)
        except BaseException:
            shard_rdd.unpersist()
            raise
    if sum(sizes) == 0:
        shard_rdd.unpersist()
        raise ValueError(f"the {what} is empty: no rows")
    return Shards(shard_rdd, sizes, feature_shape, has_labels)


def _sizes(shard_rdd) -> list:
    def count(j, it):
        n = 0
        for r in it:
            if len(r):
                n = wire.unpack(r)[1]["n"]
        yield (j, n)
    return [n for _, n in sorted(shard_rdd.mapPartitionsWithIndex(count).collect())]


def read_shard(records):
    """The ``(meta, arrays)`` of the shard among a partition's records (reads them all)."""
    found = None
    for r in records:
        if len(r):
            found = r
    if found is None:
        raise ValueError("partition holds no shard record")
    _, meta, arrays = wire.unpack(found)
    if "X.indptr" in arrays:  # a sparse shard (see _stack_rows)
        from rddtensor.ml.columns import decode_sparse
        arrays = decode_sparse(arrays)
    return meta, arrays


def from_numpy(sc, X, y=None, n_partitions: int = 2):
    """Distribute numpy ``X`` (and ``y``) as an RDD of ``(features, label)`` rows."""
    X = np.asarray(X, dtype=np.float32)
    rows = list(zip(X, np.asarray(y))) if y is not None else list(X)
    return sc.parallelize(rows, int(n_partitions))
