"""Training data as N cached shards: one stacked ``(X, y)`` block per partition.

Accepted inputs: an RDD of ``(features, label)`` pairs (features: list, numpy array or
``pyspark.ml.linalg`` vector), an RDD of features alone (prediction), or a DataFrame with a
features column (vector, array or image; read through Arrow batches, see
``rddtensor.spark.arrow_shards``) and a label column. Partition ``j`` of the shard RDD holds one raw
record, shard ``j``, and the RDD has the partitioner of ``rawrdd.shuffle_pairs``' outputs, so that
``rawrdd.co_union`` appends shard ``j`` to partition ``j`` of any parameter shuffle: the one pass
that stacks the rows also writes that shuffle. Uneven and empty partitions are fine.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from pyspark.accumulators import AccumulatorParam
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import ArrayType, NumericType

from rddtensor.spark import arrow_shards, rawrdd, wire
from rddtensor.spark.columns import (decode_sparse, decode_value, encode_sparse, feature_kind,
                               stack_sparse)
from rddtensor.spark.errors import quiet_task_failures, spark_errors
from rddtensor.spark.config import Kind


@dataclass
class Shards:
    """Cached, stacked training data: ``rdd`` (raw records), rows per partition, feature shape."""

    rdd: object
    sizes: list
    feature_shape: tuple
    has_labels: bool
    #: ``(min, max, all integers)`` of scalar labels over every row (``None``: no scalar labels)
    label_range: tuple | None = None

    @property
    def n_partitions(self) -> int:
        return len(self.sizes)

    @property
    def n_total(self) -> int:
        return int(sum(self.sizes))

    @property
    def offsets(self) -> list:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)[:-1]])] if self.sizes else []

    def keyed(self):
        """The shard RDD, partitioned like every parameter shuffle (``rawrdd.co_union``)."""
        return self.rdd

    def unpersist(self):
        self.rdd.unpersist()


def _features_of(value):
    if hasattr(value, "toArray"):  # pyspark.ml / mllib vectors, dense or sparse
        return value.toArray()
    if getattr(value, "__fields__", None) is not None:  # a struct, e.g. an image: decode it
        return decode_value(value)
    return value


def _stack_rows(rows, feature_shape, has_labels, j, names=("features", "labels")):
    """``_stack``, but a partition of sparse vectors may stay one sparse matrix (see
    ``rddtensor.spark.columns.stack_sparse``) instead of being densified row by row."""
    rows = list(rows)
    feats = [r[0] if isinstance(r, (tuple, list)) and len(r) == 2 else None for r in rows] \
        if has_labels else rows
    if feats and hasattr(feats[0], "indices"):
        X = stack_sparse(feats, feature_shape, j)
        if X is not None:  # labels are checked by _stack, with a placeholder feature per row
            arrays = _stack([(0.0, r[1]) for r in rows] if has_labels else [0.0] * len(rows),
                            (), has_labels, j, names)
            arrays["X"] = X
            return arrays
    return _stack(rows, feature_shape, has_labels, j, names)


def _short(value, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _label_summary(y):
    """``(min, max, all integers)`` of scalar labels, ``None`` for vector labels or no rows."""
    if y is None or y.ndim != 1 or not len(y):
        return None
    return float(y.min()), float(y.max()), bool(y.dtype.kind in "biu" or np.all(y == np.floor(y)))


def _check_columns(df, features_col, label_col):
    """DataFrame column types, checked on the driver before any task runs."""
    feature_kind(df.schema, features_col, "features_col")
    if label_col:
        t = df.schema[label_col].dataType
        leaf = t
        while isinstance(leaf, ArrayType):
            leaf = leaf.elementType
        if not isinstance(leaf, NumericType) and not isinstance(t, VectorUDT):
            hint = (" (index string labels first, e.g. pyspark.ml.feature.StringIndexer)"
                    if t.simpleString() == "string" else "")
            raise ValueError(f"label_col={label_col!r}: column {label_col!r} has type "
                             f"{t.simpleString()}; labels must be numeric (or a vector / array "
                             f"of numbers for multi-output targets){hint}")


def _wire_arrays(arrays):
    if isinstance(arrays["X"], np.ndarray):
        return arrays
    return encode_sparse(arrays)


def _stack(rows, feature_shape, has_labels, j, names=("features", "labels")):
    """Stack partition ``j``'s rows; errors name the row, the partition and (``names``) what
    the features and labels are called (DataFrame columns, see ``make_shards``)."""
    feat, lab = names
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
        try:
            x = np.asarray(_features_of(feats), dtype=np.float32)
        except (TypeError, ValueError) as e:  # strings, None, ragged nested lists
            raise ValueError(f"row {r} of partition {j}: {feat} must be numbers (a list, numpy "
                             f"array or vector), got {type(feats).__name__} {_short(feats)} "
                             f"({e})") from None
        if x.shape != feature_shape:
            raise ValueError(f"row {r} of partition {j} has {feat} of shape {x.shape}, "
                             f"expected {feature_shape} (every row needs the same feature length)")
        X_rows.append(x)
    X = np.stack(X_rows) if X_rows else np.zeros((0, *feature_shape), np.float32)
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))[0])
        raise ValueError(f"{feat} contain NaN or inf (row {bad} of partition {j})")
    arrays = {"X": X}
    if has_labels:
        try:
            y = np.asarray([_features_of(v) for v in y_rows])
        except ValueError as e:  # labels of different lengths
            raise ValueError(f"{lab} in partition {j} do not stack into one array ({e}); every "
                             "row needs a label of the same shape") from None
        if y.dtype.kind not in "biuf":
            bad = next((i for i, v in enumerate(y_rows)
                        if v is None or isinstance(v, (str, bytes))), 0)
            raise ValueError(f"{lab} must be numeric, got {y.dtype} values in partition {j} "
                             f"(row {bad}: {_short(y_rows[bad]) if y_rows else ''})")
        if y.dtype.kind == "f":
            y = y.astype(np.float32)
            if not np.isfinite(y).all():
                bad = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
                raise ValueError(f"{lab} contain NaN or inf (row {bad} of partition {j})")
        arrays["y"] = y if len(y) else np.zeros(0, np.float32)
    return arrays


def _check_df(df, features_col, label_col):
    missing = [c for c in (features_col, label_col) if c and c not in df.columns]
    if missing:
        raise ValueError(f"DataFrame has no column {missing[0]!r}; columns are {df.columns}")
    _check_columns(df, features_col, label_col)


def _as_rows(data, features_col, label_col, what):
    """An RDD of (features, label) pairs (or features) from an RDD or a DataFrame."""
    if hasattr(data, "select") and hasattr(data, "columns"):  # DataFrame
        _check_df(data, features_col, label_col)
        if label_col:
            return data.select(features_col, label_col).rdd.map(lambda r: (r[0], r[1])), True
        return data.select(features_col).rdd.map(lambda r: r[0]), False
    first = data.first() if not data.isEmpty() else None
    if first is None:
        raise ValueError(f"the {what} RDD is empty: no rows")
    has_labels = isinstance(first, tuple) and len(first) == 2 and label_col is not None
    return data, has_labels


_SAME_LENGTH = "(every row needs the same feature length)"


def make_shards(data, n_partitions: int | None = None, feature_shape=None,
                features_col: str = "features", label_col: str | None = "label",
                what: str = "training data") -> Shards:
    """Stack ``data`` into cached shards, one per partition (``n_partitions`` repartitions).

    Args:
        data: RDD of ``(features, label)`` / features, or DataFrame with ``features_col`` and
            ``label_col`` (``label_col=None`` for features only).
        n_partitions: number of shards (default: the input's partition count).
        feature_shape: per-row feature shape (default: taken from the first row); given, it is
            the model's input shape, and errors say so.
        what: how error messages name this data ("training data", "validation_data", ...):
            every error about other data than the training data starts with it.
    """
    ctx = data.ctx if hasattr(data, "ctx") else data.sparkSession.sparkContext
    with quiet_task_failures(ctx):
        try:
            return _make_shards(data, n_partitions, feature_shape, features_col, label_col, what)
        except ValueError as e:
            raise _named(e, what, feature_shape is not None) from None


def _named(e: ValueError, what: str, model_shape: bool) -> ValueError:
    """``e`` with the data it is about (``what``) in front, and where the expected feature
    shape came from (the model) instead of "every row needs the same length"."""
    msg = str(e)
    if what != "training data" and what not in msg:
        msg = f"{what}: {msg}"
    if model_shape:
        msg = msg.replace(_SAME_LENGTH, "(the model's input shape" + (
            f": {what} needs rows of the training data's shape)" if what != "training data"
            else ")"))
    if msg == str(e):
        return e
    err = ValueError(msg)
    if hasattr(e, "spark_trace"):
        err.spark_trace = e.spark_trace
    return err


def _make_shards(data, n_partitions, feature_shape, features_col, label_col, what) -> Shards:
    is_df = hasattr(data, "select") and hasattr(data, "columns")
    names = ((f"features (column {features_col!r})", f"labels (column {label_col!r})")
             if is_df else ("features", "labels"))
    if feature_shape is not None:
        feature_shape = tuple(int(s) for s in feature_shape)
    arrow = None
    if is_df:
        _check_df(data, features_col, label_col)
        arrow = _arrow_build(data, features_col, label_col, n_partitions)
    if arrow is not None:
        (rows, stack), has_labels = arrow, bool(label_col)
    else:
        rows, has_labels = _as_rows(data, features_col, label_col, what)
        if n_partitions is not None and n_partitions != rows.getNumPartitions():
            rows = rows.repartition(int(n_partitions))
        with spark_errors():
            if feature_shape is None:
                if rows.isEmpty():
                    raise ValueError(f"the {what} is empty: no rows")
                first = rows.first()
                feature_shape = tuple(np.asarray(_features_of(first[0] if has_labels
                                                              else first)).shape)

        def stack(it, shape, j):
            return _stack_rows(it, shape, has_labels, j, names)
    shard_rdd, sizes, labels, shapes = _build(rows, stack, feature_shape)
    if sum(sizes) == 0:
        shard_rdd.unpersist()
        raise ValueError(f"the {what} is empty: no rows")
    if feature_shape is None:  # (Arrow path) every partition's own: they must agree
        found = [(j, s) for j, s in enumerate(shapes) if sizes[j]]
        feature_shape = found[0][1]
        bad = next(((j, s) for j, s in found if s != feature_shape), None)
        if bad is not None:
            shard_rdd.unpersist()
            raise ValueError(f"row 0 of partition {bad[0]} has {names[0]} of shape {bad[1]}, "
                             f"expected {feature_shape} {_SAME_LENGTH}")
        if not all(sizes):  # empty partitions' arrays need the shape too: build them again
            shard_rdd.unpersist()
            shard_rdd, sizes, labels, _ = _build(rows, stack, feature_shape)
    return Shards(shard_rdd, sizes, feature_shape, has_labels, label_range=labels)


def _arrow_build(df, features_col, label_col, n_partitions):
    """``(rdd, stack)`` for a DataFrame through Arrow batches (``rddtensor.spark.arrow_shards``), or
    ``None`` where this Spark cannot hand them out."""
    columns = [features_col] + ([label_col] if label_col else [])
    got = arrow_shards.arrow_rows(df, columns, n_partitions)
    if got is None:
        return None
    rdd, schema = got
    kinds = [feature_kind(df.schema, features_col, "features_col")]
    if label_col:
        t = df.schema[label_col].dataType
        kinds.append(None if isinstance(t, NumericType) else
                     feature_kind(df.schema, label_col, "label_col"))
    names = (f"features (column {features_col!r})", f"labels (column {label_col!r})")

    def stack(it, shape, j):
        table = arrow_shards.read_table(it, schema)
        return arrow_shards.stack_table(table, kinds, shape, j, names)
    return rdd, stack


class _PartsParam(AccumulatorParam):
    """Per-partition facts from the build tasks: ``{j: (rows, label summary, feature shape)}``
    (a retried task overwrites its own entry)."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


def _build(rows, stack, feature_shape):
    """Stack every partition (``stack(records, feature_shape, j)``) into one shard record,
    carried by a shuffle into the same partition and cached; returns the RDD, rows and feature
    shape per partition, and ``(min, max, all integers)`` of the scalar labels (or ``None``)."""
    facts = rows.ctx.accumulator({}, _PartsParam())
    shard_id = uuid.uuid4().hex

    def build(j, it):
        arrays = stack(it, feature_shape, j)
        X = arrays["X"]
        facts.add({j: (len(X), _label_summary(arrays.get("y")), tuple(X.shape[1:]))})
        yield rawrdd.key(j)
        # "id" tells this data apart in executor-local caches (rddtensor.spark.device)
        yield wire.pack(Kind.SHARD, {"j": j, "n": len(X), "id": shard_id}, _wire_arrays(arrays))

    N = rows.getNumPartitions()
    shard_rdd = rawrdd.shuffle_raw(rows, build, N).persist()
    try:
        with spark_errors():
            shard_rdd._jrdd.count()  # the JVM caches the shuffled records: no Python pass
    except BaseException:
        shard_rdd.unpersist()
        raise
    parts = [facts.value[j] for j in range(N)]
    found = [p[1] for p in parts if p[1] is not None]
    labels = None
    if found and len(found) == sum(1 for p in parts if p[0]):
        labels = (min(f[0] for f in found), max(f[1] for f in found), all(f[2] for f in found))
    return shard_rdd, [p[0] for p in parts], labels, [p[2] for p in parts]


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
        arrays = decode_sparse(arrays)
    return meta, arrays


def from_numpy(sc, X, y=None, n_partitions: int = 2):
    """Distribute numpy ``X`` (and ``y``) as an RDD of ``(features, label)`` rows."""
    X = np.asarray(X, dtype=np.float32)
    rows = list(zip(X, np.asarray(y))) if y is not None else list(X)
    return sc.parallelize(rows, int(n_partitions))
