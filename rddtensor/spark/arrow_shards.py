"""A DataFrame's rows to shard arrays through Arrow record batches: no Python object per row.

The JVM turns each partition of ``df.select(features, label)`` into Arrow record batches
(``Dataset.toArrowBatchRdd``: columnar, no Python worker involved); one Python pass per
partition reads them (``pyarrow.ipc.read_record_batch``, zero-copy) one batch at a time
(``stream_arrays``: a build task holds one batch, not the partition) and decodes the columns
with vectorised numpy (``rddtensor.spark.columns``, the decoder ``transform`` uses). The rows path
(``rddtensor.spark.shards``) built one ``Row``, one vector object and one small array per row:
on small data sets that was most of a fit's fixed cost (``benchmarks/race_digits.py``).

The arrays and the checks are the rows path's: float32 features (a CSR matrix for sparse
enough vectors, decided per partition), integer labels as int64 and others as float32, errors
that name the row, the partition and the column. ``arrow_rows`` returns ``None`` where the JVM
method is missing (another Spark), and ``rddtensor.spark.shards`` then takes the rows path.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import DecimalType

from rddtensor.spark import parquet_scan, rawrdd
from rddtensor.spark.columns import SparseRows, batch_from_arrow


#: Decoded bytes (float32 features) of one record batch the JVM hands to a build task, where
#: rows are wide enough that Spark's default batch (``spark.sql.execution.arrow
#: .maxRecordsPerBatch``, 10,000 rows) would be larger: a build task holds about one batch.
TARGET_BATCH_BYTES = 4 << 20
MAX_RECORDS = "spark.sql.execution.arrow.maxRecordsPerBatch"
#: ``"true"`` (default): a DataFrame that is a plain Parquet scan is read by the build tasks
#: themselves (``rddtensor.spark.parquet_scan``); ``"false"``: always through the JVM
DIRECT_CONF = "spark.rddtensor.readParquet"


def arrow_rows(df, columns: list, n_partitions: int | None = None, row_bytes: int | None = None):
    """``(rdd, schema)``: an RDD of Arrow record batches of ``df.select(*columns)`` (one or
    more per partition, none for an empty one: ``batches`` reads them) and their Arrow schema;
    or ``None``.

    A plain Parquet scan is read by the tasks themselves (``parquet_scan``: ``pyarrow``, Spark's
    row order, ``n_partitions`` runs of consecutive splits: no shuffle); any other DataFrame
    through the JVM (``Dataset.toArrowBatchRdd``: IPC messages; ``in_order`` for
    ``n_partitions``). ``row_bytes`` (decoded bytes of one row): record batches of at most about
    ``TARGET_BATCH_BYTES`` (``maxRecordsPerBatch`` is lowered for this call only; Spark reads it
    when the RDD is made, and a rebuild from lineage batches the same)."""
    direct = _direct(df, columns, n_partitions, row_bytes)
    if direct is not None:
        return direct
    sel = df.select(*[F.col(c).cast("double") if isinstance(df.schema[c].dataType, DecimalType)
                      else F.col(c) for c in columns])
    try:
        with _batch_rows(df.sparkSession, row_bytes):
            jrdd = _batches(sel)
            if n_partitions is not None and jrdd.getNumPartitions() != int(n_partitions):
                sel = in_order(sel, int(n_partitions))
                jrdd = _batches(sel)
    except Exception as exc:  # noqa: BLE001 (no such JVM method here: take the rows path)
        if type(exc).__name__ in ("Py4JError", "Py4JJavaError", "AttributeError", "TypeError"):
            return None
        raise
    large = df.sparkSession.conf.get("spark.sql.execution.arrow.useLargeVarTypes",
                                     "false").lower() == "true"
    schema = to_arrow_schema(sel.schema, prefers_large_types=large)
    return rawrdd.raw(jrdd, df.sparkSession.sparkContext), schema


def _direct(df, columns, n_partitions, row_bytes):
    """``arrow_rows`` of a plain Parquet scan, read by the tasks (``parquet_scan``), or
    ``None`` (another DataFrame, or ``spark.rddtensor.readParquet=false``)."""
    spark = df.sparkSession
    if spark.conf.get(DIRECT_CONF, "true").lower() != "true":
        return None
    plan = parquet_scan.plan(df, list(columns))
    if plan is None:
        return None
    rows = _target_rows(_max_records(spark), row_bytes) or _max_records(spark) or 10_000
    rdd = parquet_scan.rdd(spark.sparkContext, plan, n_partitions, batch_rows=rows)
    return None if rdd is None else (rdd, plan.schema)


#: the row-index column ``in_order`` adds for the shuffle and drops after it
_ORDER = "__rddtensor_row"


def in_order(sel, n: int):
    """``sel`` in ``n`` partitions of consecutive rows, its order kept (``fit``'s
    ``num_partitions``): ranges of each row's ``monotonically_increasing_id`` (a pure function
    of its partition and place in it), rows sorted by it within each partition. ``repartition(n)``
    would deal the rows round robin, in the order the shuffle fetches them: another order on
    every host, which a rebuild after a data-store miss refuses as other data."""
    cols = sel.columns
    return (sel.withColumn(_ORDER, F.monotonically_increasing_id())
            .repartitionByRange(n, F.col(_ORDER)).sortWithinPartitions(_ORDER).select(*cols))


def _batches(sel):
    return sel._jdf.toArrowBatchRdd().toJavaRDD()


@contextlib.contextmanager
def _batch_rows(spark, row_bytes):
    """``maxRecordsPerBatch`` lowered to about ``TARGET_BATCH_BYTES / row_bytes`` rows (never
    raised) while the block runs, then restored."""
    conf = spark.conf
    before = conf.get(MAX_RECORDS, None)
    target = _target_rows(_max_records(spark), row_bytes)
    if target is None:
        yield
        return
    conf.set(MAX_RECORDS, str(target))
    try:
        yield
    finally:
        if before is None:
            conf.unset(MAX_RECORDS)
        else:
            conf.set(MAX_RECORDS, before)


def _max_records(spark) -> int:
    """Spark's ``maxRecordsPerBatch`` (``0``: unlimited, or unreadable)."""
    try:
        return max(0, int(spark.conf.get(MAX_RECORDS)))
    except (TypeError, ValueError):
        return 0


def _target_rows(current: int, row_bytes) -> int | None:
    """Rows of a record batch of about ``TARGET_BATCH_BYTES`` where that is fewer than
    ``current`` (``0``: unlimited); ``None`` where ``current`` stands (or the row size is
    unknown)."""
    if not row_bytes:
        return None
    rows = max(1, TARGET_BATCH_BYTES // int(row_bytes))
    return rows if current <= 0 or rows < current else None


def batches(records, schema):
    """One partition's record-batch messages decoded one at a time (zero-copy views of the
    records): the build holds one batch, not the partition. Record batches read by the task
    itself (``parquet_scan``) pass through."""
    for r in records:
        if isinstance(r, pa.RecordBatch):  # (parquet_scan: validated where it was read)
            yield r
            continue
        b = pa.ipc.read_record_batch(pa.py_buffer(r), schema)
        b.validate()  # the JVM's layout must be the schema's: refuse, never misread
        yield b


def read_table(records, schema):
    """The record-batch messages of one partition as one ``pyarrow.Table`` (zero-copy)."""
    return pa.Table.from_batches(list(batches(records, schema)), schema)


def input_keys(k: int) -> tuple:
    """The shard arrays holding a model's ``k`` inputs: ``("X",)`` for one, else ``X0 ..``."""
    return ("X",) if k == 1 else tuple(f"X{i}" for i in range(k))


def target_keys(k: int) -> tuple:
    """The shard arrays holding the labels of a model's ``k`` outputs: ``("y",)`` for one, else
    ``y0 ..`` (output order)."""
    return ("y",) if k == 1 else tuple(f"y{i}" for i in range(k))


def n_inputs(kinds) -> int:
    """How many of a build's columns (``kinds``: features first, then ``None`` for a numeric
    label, a feature kind for a vector label, ``"weight"``) are model inputs: an
    ``InputKinds``' ``n_inputs``, else one."""
    return kinds.n_inputs if isinstance(kinds, InputKinds) else 1


def n_outputs(kinds) -> int:
    """How many label columns a build's ``kinds`` hold targets of model outputs (one, unless an
    ``InputKinds`` says more)."""
    return kinds.n_outputs if isinstance(kinds, InputKinds) else 1


class InputKinds(list):
    """``kinds`` of a build whose first ``n_inputs`` columns are the inputs of a model with
    several inputs, and whose label columns are the targets of ``n_outputs`` outputs (a list,
    so every reader of ``kinds[i]`` works unchanged)."""

    def __init__(self, kinds, n_inputs: int, n_outputs: int = 1):
        super().__init__(kinds)
        self.n_inputs, self.n_outputs = int(n_inputs), int(n_outputs)


def stack_table(table, kinds, feature_shape, j: int, names, offset: int = 0, seen=None):
    """Partition ``j``'s rows (``table``, or one record batch of them: features, then the
    label(s) and the sample weight where given) as shard arrays ``X`` (``X0 ..`` for several
    inputs), ``y`` (``y0 ..`` for several outputs), ``w``.

    ``kinds``: per column, the ``rddtensor.spark.columns.feature_kind`` (``None``: a numeric
    label, ``"weight"``: the sample weights); ``names``: per column, how errors call it;
    ``feature_shape`` ``None`` takes it from the partition (the driver compares partitions).
    ``offset``: the partition row of the batch's first row (errors count partition rows);
    ``seen``: ``{array name: row shape}`` of the partition's earlier batches.
    """
    cols = [table.column(i) for i in range(table.num_columns)]
    cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    col_names = table.schema.names
    seen = seen or {}
    keys = input_keys(n_inputs(kinds))
    shapes = [feature_shape] if len(keys) == 1 else \
        [None] * len(keys) if feature_shape is None else list(feature_shape)
    arrays = {key: _features(cols[i], kinds[i], shapes[i], j, names[i], col_names[i], offset,
                             seen.get(key))
              for i, key in enumerate(keys)}
    targets = iter(target_keys(n_outputs(kinds)))
    for i in range(len(keys), len(cols)):
        if kinds[i] == "weight":
            arrays["w"] = weights_of(cols[i], j, names[i], offset)
        else:
            key = next(targets)
            arrays[key] = _labels(cols[i], kinds[i], j, names[i], col_names[i], offset,
                                  seen.get(key))
    return arrays


def stream_arrays(records, schema, kinds, feature_shape, j: int, names):
    """Partition ``j``'s shard arrays, one chunk per record batch (``stack_table`` of each).

    The arrays equal ``stack_table`` of the whole partition, chunk by chunk: a vector column
    whose first batch holds a sparse vector is decided on the whole partition (a CSR matrix or
    dense), as the inline shards are, and yields one chunk; later batches of a dense partition
    that decode to CSR are densified. An empty partition yields one empty chunk."""
    records = iter(records)
    offset, seen = 0, None
    keys = input_keys(n_inputs(kinds))
    for b in batches(records, schema):
        if not b.num_rows:
            continue
        if not offset and len(keys) == 1 and kinds[0] == "vector" and _any_sparse(b.column(0)):
            table = pa.Table.from_batches([b] + list(batches(records, schema)), schema)
            del b
            yield stack_table(table, kinds, feature_shape, j, names)
            return
        arrays = stack_table(b, kinds, feature_shape, j, names, offset, seen)
        for key in keys:
            if isinstance(arrays[key], SparseRows):
                arrays[key] = arrays[key].toarray()
        if seen is None:
            seen = {key: tuple(a.shape[1:]) for key, a in arrays.items() if key != "w"}
        offset += b.num_rows
        del b
        yield arrays
        arrays = None  # (hold no chunk while the next one is decoded)
    if not offset:
        yield stack_table(pa.Table.from_batches([], schema), kinds, feature_shape, j, names)


def _any_sparse(arr) -> bool:
    """Whether a vector column holds a sparse vector (type 0; nulls are checked later)."""
    types = arr.field(0) if hasattr(arr, "field") else arr.flatten()[0]
    return bool((types.fill_null(1).to_numpy(zero_copy_only=False) == 0).any())


def weights_of(arr, j: int, what: str, offset: int = 0) -> np.ndarray:
    """A numeric column as float32 sample weights (through float64, like the rows path);
    nulls, NaN, inf and negative weights are refused, naming the row."""
    _no_nulls(arr, j, what, offset)
    w = np.asarray(arr.to_numpy(zero_copy_only=False), np.float64).astype(np.float32)
    check_weights(w, j, what, offset)
    return w


def check_weights(w, j: int, what: str, offset: int = 0) -> None:
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        r = _first(bad)
        raise ValueError(f"{what} must be finite and >= 0, got {w[r]} (row {offset + r} of "
                         f"partition {j})")


def _first(mask) -> int:
    return int(np.flatnonzero(mask)[0])


def _no_nulls(arr, j, what, offset=0):
    if arr.null_count:
        r = offset + _first(arr.is_null().to_numpy(zero_copy_only=False))
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


def _features(arr, kind, feature_shape, j, what, col, offset=0, seen=None):
    """``seen``: the feature shape of the partition's earlier rows (a later batch)."""
    _no_nulls(arr, j, what, offset)
    n = len(arr)
    sizes = _row_sizes(arr, kind)
    if sizes is not None and n:  # ragged rows (or not the given length): name the first
        want = int(feature_shape[0]) if feature_shape else \
            int(seen[0]) if seen else int(sizes[0])
        if (sizes != want).any():
            r = offset + _first(sizes != want)
            nested = kind == "array" and _depth(arr.type) > 1
            expected = tuple(feature_shape) if feature_shape else _shape_text(want, nested)
            raise ValueError(f"row {r} of partition {j} has {what} of shape "
                             f"{_shape_text(int(sizes[r - offset]), nested)}, expected {expected} "
                             "(every row needs the same feature length)")
    if not n:
        return np.zeros((0, *(feature_shape or ())), np.float32)
    try:
        X = batch_from_arrow(arr, kind, col)
    except ValueError as e:  # ragged inner axes of nested arrays, odd images
        raise ValueError(f"partition {j}: {what}: {e}" + (
            f" (rows counted from row {offset} of the partition)" if offset else "")) from None
    want = feature_shape if feature_shape is not None else seen
    if want is not None and tuple(X.shape[1:]) != tuple(want):
        raise ValueError(f"row {offset} of partition {j} has {what} of shape "
                         f"{tuple(X.shape[1:])}, expected {tuple(want)} (every row needs the "
                         "same feature length)")
    if isinstance(X, SparseRows):
        finite = np.isfinite(X.data)
        if not finite.all():
            r = offset + int(np.searchsorted(X.indptr, _first(~finite), side="right")) - 1
            raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
        return X
    if not np.isfinite(X).all():
        r = offset + _first(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))
        raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
    return X


def _labels(arr, kind, j, what, col, offset=0, seen=None):
    """``seen``: the label row shape of the partition's earlier rows (a later batch)."""
    _no_nulls(arr, j, what, offset)
    if kind is None:  # a numeric scalar column
        y = arr.to_numpy(zero_copy_only=False)
        y = y.astype(np.int64) if y.dtype.kind in "biu" else y.astype(np.float32)
    else:
        leaf = arr.type
        while pa.types.is_list(leaf) or pa.types.is_large_list(leaf):
            leaf = leaf.value_type
        sizes = _row_sizes(arr, kind)
        want = int(seen[0]) if seen else int(sizes[0]) if len(arr) else 0
        if len(arr) and (sizes != want).any():
            r = _first(sizes != want)
            raise ValueError(f"{what} in partition {j} do not stack into one array (row "
                             f"{offset + r} has {int(sizes[r])} values, row 0 {want}); every "
                             "row needs a label of the same shape")
        try:
            y = batch_from_arrow(arr, kind, col)
        except ValueError as e:
            raise ValueError(f"{what} in partition {j} do not stack into one array ({e})") \
                from None
        if hasattr(y, "toarray"):  # sparse label vectors
            y = y.toarray()
        if pa.types.is_integer(leaf):
            y = y.astype(np.int64)
    if seen is not None and tuple(y.shape[1:]) != tuple(seen):
        raise ValueError(f"{what} in partition {j} do not stack into one array (row {offset} "
                         f"has shape {tuple(y.shape[1:])}, row 0 {tuple(seen)}); every row "
                         "needs a label of the same shape")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        r = offset + _first(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))
        raise ValueError(f"{what} contain NaN or inf (row {r} of partition {j})")
    return y if len(y) else np.zeros(0, np.float32)
