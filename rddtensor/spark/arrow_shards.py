"""A DataFrame's rows to shard arrays through Arrow record batches: no Python object per row.

The JVM turns each partition of ``df.select(features, label)`` into Arrow record batches
(``Dataset.toArrowBatchRdd``: columnar, no Python worker involved); one Python pass per
partition reads them (``pyarrow.ipc.read_record_batch``, zero-copy) and decodes the columns with
vectorised numpy (``rddtensor.spark.columns``, the decoder ``transform`` uses). The rows path
(``rddtensor.spark.shards``) built one ``Row``, one vector object and one small array per row:
on small data sets that was most of a fit's fixed cost (``benchmarks/race_digits.py``).

The arrays and the checks are the rows path's: float32 features (a CSR matrix for sparse
enough vectors, decided per partition), integer labels as int64 and others as float32, errors
that name the row, the partition and the column. ``arrow_rows`` returns ``None`` where the JVM
method is missing (another Spark), and ``rddtensor.spark.shards`` then takes the rows path.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import DecimalType

from rddtensor.spark import rawrdd
from rddtensor.spark.columns import SparseRows, batch_from_arrow


def arrow_rows(df, columns: list, n_partitions: int | None = None):
    """``(rdd, schema)``: an RDD of Arrow record-batch messages of ``df.select(*columns)``
    (one or more per partition, none for an empty one) and their Arrow schema; or ``None``."""
    sel = df.select(*[F.col(c).cast("double") if isinstance(df.schema[c].dataType, DecimalType)
                      else F.col(c) for c in columns])
    try:
        jrdd = _batches(sel)
        if n_partitions is not None and jrdd.getNumPartitions() != int(n_partitions):
            sel = sel.repartition(int(n_partitions))
            jrdd = _batches(sel)
    except Exception as exc:  # noqa: BLE001 (no such JVM method here: take the rows path)
        if type(exc).__name__ in ("Py4JError", "Py4JJavaError", "AttributeError", "TypeError"):
            return None
        raise
    large = df.sparkSession.conf.get("spark.sql.execution.arrow.useLargeVarTypes",
                                     "false").lower() == "true"
    schema = to_arrow_schema(sel.schema, prefers_large_types=large)
    return rawrdd.raw(jrdd, df.sparkSession.sparkContext), schema


def _batches(sel):
    return sel._jdf.toArrowBatchRdd().toJavaRDD()


def read_table(records, schema):
    """The record-batch messages of one partition as one ``pyarrow.Table`` (zero-copy)."""
    batches = []
    for r in records:
        b = pa.ipc.read_record_batch(pa.py_buffer(r), schema)
        b.validate()  # the JVM's layout must be the schema's: refuse, never misread
        batches.append(b)
    return pa.Table.from_batches(batches, schema)


def stack_table(table, kinds, feature_shape, j: int, names):
    """Partition ``j``'s rows (``table``: features, then the label if any) as shard arrays.

    ``kinds``: the ``rddtensor.spark.columns.feature_kind`` of each column; ``feature_shape``
    ``None`` takes it from the partition (the driver compares partitions).
    """
    cols = [table.column(i).combine_chunks() for i in range(table.num_columns)]
    feat = names[0]
    X = _features(cols[0], kinds[0], feature_shape, j, feat, table.column_names[0])
    arrays = {"X": X}
    if len(cols) > 1:
        arrays["y"] = _labels(cols[1], kinds[1], j, names[1], table.column_names[1])
    return arrays


def _first(mask) -> int:
    return int(np.flatnonzero(mask)[0])


def _no_nulls(arr, j, what):
    if arr.null_count:
        r = _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise ValueError(f"row {r} of partition {j}: {what} is null; drop or fill nulls first "
                         "(df.na.drop(subset=[...]))")


def _row_sizes(arr, kind):
    """Per-row length of a vector or (outer) array column, or ``None`` for other kinds."""
    if kind == "vector":
        types, sizes, _, values = arr.flatten()
        offsets = values.offsets.to_numpy()
        return np.where(types.to_numpy(zero_copy_only=False) == 1, np.diff(offsets),
                        sizes.fill_null(0).to_numpy(zero_copy_only=False))
    if kind == "array":
        return np.diff(arr.offsets.to_numpy())
    return None


def _depth(t) -> int:
    d = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t):
        t, d = t.value_type, d + 1
    return d


def _shape_text(first: int, nested: bool) -> str:
    return f"({first}, ...)" if nested else f"({first},)"


def _features(arr, kind, feature_shape, j, what, col):
    _no_nulls(arr, j, what)
    n = len(arr)
    sizes = _row_sizes(arr, kind)
    if sizes is not None and n:  # ragged rows (or not the given length): name the first
        want = int(feature_shape[0]) if feature_shape else int(sizes[0])
        if (sizes != want).any():
            r = _first(sizes != want)
            nested = kind == "array" and _depth(arr.type) > 1
            expected = tuple(feature_shape) if feature_shape else _shape_text(want, nested)
            raise ValueError(f"row {r} of partition {j} has {what} of shape "
                             f"{_shape_text(int(sizes[r]), nested)}, expected {expected} "
                             "(every row needs the same feature length)")
    if not n:
        return np.zeros((0, *(feature_shape or ())), np.float32)
    try:
        X = batch_from_arrow(arr, kind, col)
    except ValueError as e:  # ragged inner axes of nested arrays, odd images
        raise ValueError(f"partition {j}: {what}: {e}") from None
    if feature_shape is not None and tuple(X.shape[1:]) != tuple(feature_shape):
        raise ValueError(f"row 0 of partition {j} has {what} of shape {tuple(X.shape[1:])}, "
                         f"expected {tuple(feature_shape)} (every row needs the same feature "
                         "length)")
    if isinstance(X, SparseRows):
        finite = np.isfinite(X.data)
        if not finite.all():
            r = int(np.searchsorted(X.indptr, _first(~finite), side="right")) - 1
            raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
        return X
    if not np.isfinite(X).all():
        r = _first(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))
        raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
    return X


def _labels(arr, kind, j, what, col):
    _no_nulls(arr, j, what)
    if kind is None:  # a numeric scalar column
        y = arr.to_numpy(zero_copy_only=False)
        y = y.astype(np.int64) if y.dtype.kind in "biu" else y.astype(np.float32)
    else:
        leaf = arr.type
        while pa.types.is_list(leaf) or pa.types.is_large_list(leaf):
            leaf = leaf.value_type
        sizes = _row_sizes(arr, kind)
        if len(arr) and (sizes != sizes[0]).any():
            raise ValueError(f"{what} in partition {j} do not stack into one array (row "
                             f"{_first(sizes != sizes[0])} has {int(sizes[_first(sizes != sizes[0])])}"
                             f" values, row 0 {int(sizes[0])}); every row needs a label of the "
                             "same shape")
        try:
            y = batch_from_arrow(arr, kind, col)
        except ValueError as e:
            raise ValueError(f"{what} in partition {j} do not stack into one array ({e})") \
                from None
        if hasattr(y, "toarray"):  # sparse label vectors
            y = y.toarray()
        if pa.types.is_integer(leaf):
            y = y.astype(np.int64)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        r = _first(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))
        raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
    return y if len(y) else np.zeros(0, np.float32)
