"""A plain Parquet scan read by the Python build tasks themselves, in Spark's row order.

Why: a DataFrame's rows reach the build tasks through ``Dataset.toArrowBatchRdd`` (the JVM
decodes Parquet into rows, turns them into Arrow and ships the bytes to Python), and when
``fit(..., num_partitions=n)`` differs from the DataFrame's partition count, through the
order-keeping range shuffle of ``rddtensor.spark.arrow_shards.in_order``. On 5 GB of Parquet
(10M rows x 128 float32 as ``array<float>``) building cost about 8x a plain Spark scan of the
same files. Where the DataFrame is nothing but a scan of Parquet files, the tasks here read the
files with ``pyarrow.parquet`` instead: no JVM decode, no copy through a socket, no shuffle.
(On those files, in ``local[2]`` on a shared, loaded 2-core machine: 15.9 s to read every
row in two groups here, 28.8 s for Spark's own scan, ``write.format("noop")``.)

What is read: ``plan`` takes Spark's own ``FilePartition`` list of the scan (each partition
a list of ``(path, start, length)`` splits of files, in Spark's order: files packed by size,
large ones cut at ``spark.sql.files.maxPartitionBytes``), so with Spark's partition count
partition ``j`` here holds the rows of Spark's partition ``j``, in its order; another count
(``num_partitions``) cuts the row groups of all splits into consecutive runs balanced by rows
(``groups``), so concatenating the runs still gives the DataFrame's row order. A rebuild of
group ``j`` reads the same row groups again: the same rows in the same order.

Which row groups a split reads (the midpoint rule): Spark 4.3 reads a split's footer through
``ParquetFooterReader.buildFilter``, ``HadoopReadOptions.withRange(start, start + length)``,
which parquet-mr 1.17.0 (``ParquetMetadataConverter.filterFileMetaDataByMidpoint``, read from
the bundled jar with ``javap -c``) applies per row group as::

    offset = first column chunk's data_page_offset, or its dictionary_page_offset where that
             is set and smaller                 (the first column chunk has metadata: always,
                                                 but for encrypted files, which pyarrow refuses)
    size   = the row group's total_compressed_size, else the sum of its column chunks'
    kept   = start <= offset + size // 2 < start + length

pyarrow exposes neither the row group's ``total_compressed_size`` nor ``file_offset``; the sum
of the column chunks' ``total_compressed_size`` is what both parquet-mr
(``BlockMetaData.getCompressedSize``) and Arrow C++ write there, so that sum is used.

What is refused (``plan`` returns ``None`` and the caller takes the JVM path), each because
the rows Spark would produce could differ from the file's, or their order could:

* any plan but ``FileSourceScanExec`` of ``ParquetFileFormat`` (exactly: no Delta or other
  subclass) under ``WholeStageCodegen`` / ``InputAdapter`` / ``ColumnarToRow`` and projections
  of plain columns: filters, limits, samples, joins, unions, computed or renamed columns, a
  cached DataFrame, the DataSource V2 reader, adaptive plans;
* pushed data or partition filters, any partitioning of the relation (hive-style directories:
  their values are not in the files), bucketing, metadata columns (``_metadata``);
* schema merging, ``ignoreCorruptFiles`` / ``ignoreMissingFiles`` (Spark would skip what this
  raises on), Parquet field-id resolution, a path scheme other than ``file:``;
* column types but byte/short/int/long/float/double, arrays (nested too) of them and ML
  vectors (Spark's ``struct<type, size, indices, values>``, which is what the file holds):
  dates, timestamps (rebase modes), decimals, strings and the rest; duplicated columns;
* a file whose Arrow schema does not give every selected column by its exact name and type
  (list element names aside; a column nullable in the file may not be non-nullable in the
  schema).

Any error while planning is a refusal too: ``plan`` never breaks its caller. Planning reads
every file's footer on the driver once (one small read per file; kept in the plan for
``groups``); the tasks read the footer of each file they read again, for its row groups.

``rdd`` yields ``pyarrow.RecordBatch`` objects, not IPC messages: the consumer is a later
``mapPartitions`` in the same Python task, so nothing is serialized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

#: read buffer of a column chunk: pages stream through it (and nothing is pre-buffered), so a
#: task holds about one record batch, not the compressed column chunks of its row groups
#: (pyarrow 26's defaults, ``buffer_size=0, pre_buffer=True``, held ~530 MB reading 4 row groups
#: of the 10M x 128 file; this, ~22 MB at 8192-row batches)
READ_BUFFER = 1 << 20

_PARQUET = "org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat"
_EXEC = "org.apache.spark.sql.execution."
_SCAN = _EXEC + "FileSourceScanExec"
_PROJECT = _EXEC + "ProjectExec"
_PASS_THROUGH = {_EXEC + "WholeStageCodegenExec", _EXEC + "InputAdapter",
                 _EXEC + "ColumnarToRowExec"}
_ATTRIBUTE = "org.apache.spark.sql.catalyst.expressions.AttributeReference"
#: settings under which Spark skips or resolves differently what this reads as is
_REFUSED_WHEN_TRUE = ("spark.sql.parquet.mergeSchema", "spark.sql.files.ignoreCorruptFiles",
                      "spark.sql.files.ignoreMissingFiles",
                      "spark.sql.parquet.fieldId.read.enabled")
_REFUSED_OPTIONS = ("mergeSchema", "ignoreCorruptFiles", "ignoreMissingFiles")
_SCALARS = ("ByteType", "ShortType", "IntegerType", "LongType", "FloatType", "DoubleType")


class Refused(Exception):
    """Why a DataFrame is not a plain Parquet scan (``refusal`` says it)."""


@dataclass(frozen=True)
class ScanPlan:
    """Spark's partitions of a plain Parquet scan, in order, each a list of file splits
    ``(path, start, length)``, and the Arrow schema of the selected columns
    (``to_arrow_schema`` of Spark's schema: what ``toArrowBatchRdd`` hands out); ``footers``:
    each file's ``FileMetaData`` as the plan read it (``groups`` needs its row groups)."""

    partitions: list
    schema: pa.Schema
    footers: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def columns(self) -> list:
        return list(self.schema.names)


def plan(df, columns) -> ScanPlan | None:
    """The ``ScanPlan`` of ``df.select(*columns)``, or ``None`` where it is anything but a
    plain scan of Parquet files this module reads exactly as Spark would (module docstring)."""
    try:
        return _plan(df, list(columns))
    except Exception:  # noqa: BLE001 (a refusal, a py4j error, a file that will not open)
        return None


def refusal(df, columns) -> str | None:
    """Why ``plan`` returns ``None`` for these columns (``None``: it does not)."""
    try:
        _plan(df, list(columns))
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, Refused) else str(exc)
    return None


def _plan(df, columns: list) -> ScanPlan:
    if len(set(columns)) != len(columns):
        raise Refused(f"duplicated columns {columns}")
    sel = df.select(*columns)
    for field in sel.schema.fields:
        if not _readable(field.dataType):
            raise Refused(f"column {field.name!r} is {field.dataType.simpleString()}")
    spark = df.sparkSession
    _check_conf(spark)
    executed = sel._jdf.queryExecution().executedPlan()
    scan = _plain_scan(executed)
    _check_relation(scan)
    _check_output(executed, scan, sel.schema.names)
    partitions = _file_partitions(scan)
    schema = _arrow_schema(spark, sel.schema)
    footers = {path: _check_file(path, schema)
               for path in dict.fromkeys(p for files in partitions for p, _, _ in files)}
    return ScanPlan(partitions, schema, footers)


def _readable(t) -> bool:
    """Spark types read here: numeric scalars, arrays of them (nested too), ML vectors."""
    name = type(t).__name__
    if name == "ArrayType":
        return _readable(t.elementType)
    if name == "VectorUDT":
        return type(t).__module__ == "pyspark.ml.linalg"
    return name in _SCALARS


def _check_conf(spark) -> None:
    for key in _REFUSED_WHEN_TRUE:
        if str(spark.conf.get(key, "false")).lower() == "true":
            raise Refused(f"{key} is true")


def _class(node) -> str:
    return node.getClass().getName()


def _seq(scala_seq) -> list:
    return [scala_seq.apply(i) for i in range(scala_seq.size())]


def _plain_scan(node):
    """The ``FileSourceScanExec`` under a chain of nodes that pass its rows on unchanged."""
    while _class(node) != _SCAN:
        name = _class(node)
        if name == _PROJECT:
            odd = [e.toString() for e in _seq(node.projectList()) if _class(e) != _ATTRIBUTE]
            if odd:
                raise Refused(f"computed columns {odd}")
        elif name not in _PASS_THROUGH:
            raise Refused(f"not a plain scan: {node.nodeName()}")
        children = _seq(node.children())
        if len(children) != 1:
            raise Refused(f"{node.nodeName()} has {len(children)} inputs")
        node = children[0]
    return node


def _check_relation(scan) -> None:
    rel = scan.relation()
    if _class(rel.fileFormat()) != _PARQUET:
        raise Refused(f"not Parquet: {_class(rel.fileFormat())}")
    if len(rel.partitionSchema().fieldNames()):
        raise Refused(f"partitioned by {list(rel.partitionSchema().fieldNames())}")
    if rel.bucketSpec().isDefined() or scan.bucketedScan() or scan.optionalBucketSet().isDefined():
        raise Refused("bucketed")
    if not scan.partitionFilters().isEmpty() or not scan.dataFilters().isEmpty():
        raise Refused("filtered")
    options = rel.options()
    for key in _REFUSED_OPTIONS:
        value = options.get(key)
        if value.isDefined() and str(value.get()).lower() == "true":
            raise Refused(f"option {key} is true")


def _check_output(executed, scan, names) -> None:
    """The plan's output is ``names``: columns of the files, as the scan reads them."""
    scan_out = _seq(scan.output())
    required = list(scan.requiredSchema().fieldNames())
    data = set(scan.relation().dataSchema().fieldNames())
    if [a.name() for a in scan_out] != required or not set(required) <= data:
        raise Refused("metadata columns")
    ids = {a.exprId().id() for a in scan_out}
    out = _seq(executed.output())
    if [a.name() for a in out] != list(names) or any(a.exprId().id() not in ids for a in out):
        raise Refused("the output is not the scan's columns")


def _file_partitions(scan) -> list:
    """Spark's ``FilePartition``s of the scan: per partition, its ``(path, start, length)``."""
    return [[(_local_path(f.filePath()), int(f.start()), int(f.length())) for f in part.files()]
            for part in scan.inputRDD().partitions()]


def _local_path(spark_path) -> str:
    uri = spark_path.toPath().toUri()
    if uri.getScheme() != "file":
        raise Refused(f"not a local file: {spark_path.toString()}")
    return uri.getPath()


def _arrow_schema(spark, spark_schema) -> pa.Schema:
    """What ``rddtensor.spark.arrow_shards.arrow_rows`` decodes the JVM's batches with."""
    from pyspark.sql.pandas.types import to_arrow_schema
    large = spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes",
                           "false").lower() == "true"
    return to_arrow_schema(spark_schema, prefers_large_types=large)


def _check_file(path: str, schema: pa.Schema):
    """``path``'s footer (``FileMetaData``), where its columns give ``schema``'s."""
    f = pq.ParquetFile(path)
    meta, found = f.metadata, f.schema_arrow
    for want in schema:
        i = found.get_field_index(want.name)
        if i < 0 or not _fits(found.field(i), want):
            raise Refused(f"{path}: column {want.name!r} is "
                          f"{found.field(i).type if i >= 0 else 'missing'}, not {want.type}")
    return meta


def _fits(got: pa.Field, want: pa.Field) -> bool:
    """Whether ``got``'s values are ``want``'s: the same type tree (list element names aside),
    and nothing nullable where ``want`` is not."""
    if got.nullable and not want.nullable:
        return False
    g, w = got.type, want.type
    if pa.types.is_list(g) and pa.types.is_list(w):
        return _fits(g.value_field, w.value_field)
    if pa.types.is_struct(g) and pa.types.is_struct(w):
        return g.num_fields == w.num_fields and all(
            g.field(i).name == w.field(i).name and _fits(g.field(i), w.field(i))
            for i in range(g.num_fields))
    return not pa.types.is_nested(g) and g.equals(w)


def kept_row_groups(metadata, start: int, length: int) -> list:
    """The row groups of a file (``pyarrow.parquet.FileMetaData``) that Spark's reader reads
    for the split ``[start, start + length)``: those whose midpoint lies in it."""
    return [i for i in range(metadata.num_row_groups)
            if start <= _midpoint(metadata.row_group(i)) < start + length]


def _midpoint(row_group) -> int:
    """parquet-mr 1.17's ``filterFileMetaDataByMidpoint`` (module docstring)."""
    first = row_group.column(0)
    offset = first.data_page_offset
    dictionary = first.dictionary_page_offset  # (None where not set)
    if dictionary is not None and offset > dictionary:
        offset = dictionary
    size = sum(row_group.column(j).total_compressed_size for j in range(row_group.num_columns))
    return offset + size // 2


def groups(plan: ScanPlan, n: int | None = None) -> list | None:
    """The splits each of ``n`` partitions reads, as lists of ``(path, start, length)``.

    ``None`` or Spark's partition count: Spark's partitions as they are (the JVM path's too).
    Another ``n``: the row groups of all splits in Spark's order, cut into ``n`` runs of
    consecutive row groups balanced by rows (footers read on the driver), each row group as the
    one-byte range at its midpoint (the midpoint rule reads exactly that row group), so
    concatenating the runs still gives the DataFrame's rows in order and no run is empty
    (footers: the plan's, read once).
    ``None`` where there are fewer row groups than ``n`` (the caller cuts rows instead)."""
    parts = plan.partitions
    if n is None or int(n) == len(parts):
        return [list(files) for files in parts]
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    units, rows, footers = [], [], dict(plan.footers)
    for path, start, length in (f for files in parts for f in files):
        meta = footers.get(path)
        if meta is None:
            meta = footers[path] = pq.read_metadata(path)
        for g in kept_row_groups(meta, start, length):
            units.append((path, _midpoint(meta.row_group(g)), 1))
            rows.append(meta.row_group(g).num_rows)
    if len(units) < n:
        return None
    return [[units[i] for i in run] for run in _balanced_runs(rows, n)]


def _balanced_runs(sizes: list, n: int) -> list:
    """``range(len(sizes))`` cut into ``n`` non-empty runs of consecutive indices (``n <=
    len(sizes)``), each unit in the run its midpoint (by cumulative size) falls in, as far as
    that leaves every run at least one unit."""
    total, before, g = sum(sizes), 0, 0
    out = [[] for _ in range(n)]
    for i, size in enumerate(sizes):
        want = (2 * before + size) * n // (2 * total) if total else i * n // len(sizes)
        left = len(sizes) - i  # units not yet placed, this one included
        g = max(g, min(want, n - 1), n - left)  # (later runs still get one unit each)
        g = min(g, next((k for k in range(n) if not out[k]), n - 1))  # (no run skipped)
        out[g].append(i)
        before += size
    return out


def record_batches(files, columns, schema: pa.Schema, batch_rows: int):
    """The rows of one group's splits (``(path, start, length)``, read in order), as record
    batches of ``schema`` (the columns ``columns``) of at most ``batch_rows`` rows. The first
    holds exactly the first ``batch_rows`` rows (all, where there are fewer), across row groups
    and files, as the JVM's first Arrow batch of a partition does: it decides whether a vector
    column stays sparse, the same on both paths. Later batches are pyarrow's, passed on
    without a copy. The task holds about one batch. Row groups of a split:
    ``kept_row_groups``."""
    columns = list(columns)
    if columns != list(schema.names):
        raise ValueError(f"columns {columns} are not the schema's {schema.names}")
    batch_rows = int(batch_rows)
    held, have = [], 0  # (the first batch, while it is gathered)
    for batch in _file_batches(files, columns, schema, batch_rows):
        if held is None:
            yield batch
            continue
        take = min(batch_rows - have, batch.num_rows)
        held.append(batch.slice(0, take))
        have += take
        if have == batch_rows:
            yield _joined(held, schema)
            held = None
            if take < batch.num_rows:
                yield batch.slice(take)
    if held:
        yield _joined(held, schema)


def _file_batches(files, columns, schema, batch_rows):
    opened = None
    for path, start, length in files:
        if opened is None or opened[0] != path:  # (consecutive splits of one file: one open)
            opened = (path, pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False))
        reader = opened[1]
        kept = kept_row_groups(reader.metadata, start, length)
        if not kept:
            continue
        for batch in reader.iter_batches(batch_size=batch_rows, row_groups=kept,
                                         columns=columns, use_threads=False):
            yield _as_schema(batch, schema, path)


def _joined(pieces, schema) -> pa.RecordBatch:
    """Slices of record batches as one (copied where there are several)."""
    if len(pieces) == 1:
        return pieces[0]
    return pa.Table.from_batches(pieces, schema).combine_chunks().to_batches()[0]


def _as_schema(batch: pa.RecordBatch, schema: pa.Schema, path: str) -> pa.RecordBatch:
    """``batch``'s columns as ``schema`` says (list element names, nullability), validated."""
    arrays = []
    for want in schema:
        arr = batch.column(want.name)
        if not _fits(batch.schema.field(want.name), want):
            raise ValueError(f"{path}: column {want.name!r} is {arr.type}, not {want.type} "
                             "(did the file change after the plan?)")
        arrays.append(arr if arr.type.equals(want.type) else arr.cast(want.type))
    out = pa.RecordBatch.from_arrays(arrays, schema=schema)
    out.validate()
    return out


def rdd(sc, plan: ScanPlan, n: int | None = None, columns=None, batch_rows: int = 10_000):
    """An RDD of ``pyarrow.RecordBatch`` (Python objects: a later ``mapPartitions`` in the
    same task consumes them) of ``groups(plan, n)``: partition ``j`` reads group ``j``;
    ``None`` where ``groups`` is. ``columns``: a subset of the plan's (default all), in the
    order wanted."""
    columns = plan.columns if columns is None else list(columns)
    schema = pa.schema([plan.schema.field(c) for c in columns])
    runs = groups(plan, n)
    if runs is None:  # (fewer row groups than partitions)
        return None
    if not runs:  # (no files: Spark's scan has no partitions either)
        return sc.emptyRDD()

    def read(it):
        for files in it:
            yield from record_batches(files, columns, schema, batch_rows)
    return sc.parallelize(runs, len(runs)).mapPartitions(read)
