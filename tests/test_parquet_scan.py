"""``rddtensor.spark.parquet_scan``: a plain Parquet scan read by pyarrow in Spark's row order.

One data set, written here by Spark as four files of different sizes with many small row
groups, is read under different split settings: the direct read must give ``df.select(cols)``'s
rows in order, partition by partition (Spark's file packing and splits, the midpoint rule), and
in consecutive runs of partitions for ``n``.
"""
from __future__ import annotations

import contextlib
import itertools

import pyarrow as pa
import pytest
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

from rddtensor.spark import arrow_shards, parquet_scan

pytestmark = pytest.mark.spark

#: every kind of column read here; ``v`` holds dense and sparse vectors, ``d`` and ``fn`` nulls
COLUMNS = ["v", "id", "f", "d", "l", "i", "nest", "fn"]
#: files of different sizes (rows each): Spark packs them by size, largest first
FILE_ROWS = (300, 2500, 60, 1200)


@contextlib.contextmanager
def conf(spark, **settings):
    """Spark SQL settings (``a_b`` for ``a.b``) for the block, restored after it."""
    keys = {k: "spark.sql.files." + k for k in settings}
    before = {k: spark.conf.get(key, None) for k, key in keys.items()}
    for k, key in keys.items():
        spark.conf.set(key, str(settings[k]))
    try:
        yield
    finally:
        for k, key in keys.items():
            if before[k] is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, before[k])


def rows_of(spark, lo, hi, sizes=None):
    """Rows ``lo`` to ``hi`` of every column kind, in one partition per ``sizes`` entry."""
    bounds = [lo] + [lo + s for s in itertools.accumulate(sizes or [hi - lo])]
    # (vectors: sparse where id is even, dense where odd, null every 13th)
    ids = spark.sparkContext.parallelize(list(zip(bounds, bounds[1:])), len(bounds) - 1) \
        .flatMap(lambda b: ((i, None if i % 13 == 0 else Vectors.sparse(4, [0], [i]) if i % 2
                             else Vectors.dense([i, 1.0, 0.0, 0.0])) for i in range(*b)))
    schema = StructType([StructField("id", LongType()), StructField("v", VectorUDT())])
    return spark.createDataFrame(ids, schema).select(
        "id",
        F.expr("transform(sequence(0, 7), k -> cast(id * 8 + k as float))").alias("f"),
        F.expr("if(id % 7 = 0, null, id * 0.5d)").alias("d"),
        (F.col("id") * 3 - 5).alias("l"),
        F.col("id").cast("int").alias("i"),
        F.expr("array(array(cast(id as float), 1.5f), array(2.5f, cast(-id as float)))")
        .alias("nest"),
        F.expr("if(id % 11 = 0, null, array(cast(id as float), if(id % 5 = 0, null, 1.0f)))")
        .alias("fn"),
        "v")


@pytest.fixture(scope="module")
def data(spark, tmp_path_factory):
    """The path of the data set: one file per ``FILE_ROWS`` entry, row groups of ~16 KB."""
    path = str(tmp_path_factory.mktemp("parquet_scan") / "data")
    (rows_of(spark, 0, sum(FILE_ROWS), FILE_ROWS).write
     .option("parquet.block.size", 16 << 10).option("parquet.page.size", 4 << 10)
     .option("parquet.block.size.row.check.min", 10).parquet(path))
    return path


def plain(value):
    """A collected value as the Arrow read gives it (vectors: Spark's struct of them)."""
    if isinstance(value, dict):  # an Arrow vector struct
        return tuple(value.values())
    if hasattr(value, "toArray"):
        return tuple(VectorUDT().serialize(value))
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def spark_parts(df, cols):
    return [[[plain(v) for v in row] for row in part]
            for part in df.select(*cols).rdd.glom().collect()]


def direct_parts(sc, p, n=None, batch_rows=100):
    cols = p.columns
    parts = parquet_scan.rdd(sc, p, n, cols, batch_rows).mapPartitions(
        lambda it: [[r for b in it for r in b.to_pylist()]]).collect()
    return [[[plain(r[c]) for c in cols] for r in part] for part in parts]


def concat(parts):
    return [row for part in parts for row in part]


def check(spark, df, cols=COLUMNS, jvm=False):
    """The plan of ``df``; its direct read equals Spark's partitions and rows; with ``jvm``,
    its schema and rows are ``toArrowBatchRdd``'s too (what the decoders read)."""
    p = parquet_scan.plan(df, cols)
    assert p is not None, parquet_scan.refusal(df, cols)
    want = spark_parts(df, cols)
    assert len(p.partitions) == len(want)
    assert direct_parts(spark.sparkContext, p) == want
    assert concat(want) == [[plain(v) for v in r] for r in df.select(*cols).collect()]
    if jvm:
        batches, schema = arrow_shards.arrow_rows(df, cols)
        assert p.schema == schema
        rows = arrow_shards.read_table(batches.collect(), schema).to_pylist()
        assert [[plain(r[c]) for c in cols] for r in rows] == concat(want)
    return p, want


def test_files_of_different_sizes(spark, data):
    with conf(spark, openCostInBytes=1 << 10):
        df = spark.read.parquet(data)
        p, want = check(spark, df, jvm=True)
    assert len(set(path for files in p.partitions for path, _, _ in files)) == len(FILE_ROWS)
    assert any(len(files) > 1 for files in p.partitions)  # (packed files)
    assert len(concat(want)) == sum(FILE_ROWS)


def test_files_cut_into_splits_of_many_row_groups(spark, data):
    import pyarrow.parquet as pq
    with conf(spark, maxPartitionBytes=40 << 10, openCostInBytes=1 << 10):
        df = spark.read.parquet(data)
        p, want = check(spark, df)
        q = parquet_scan.plan(df, ["fn", "id"])  # (a projection, in another order)
    picked = [COLUMNS.index("fn"), COLUMNS.index("id")]
    assert direct_parts(spark.sparkContext, q, batch_rows=7) == [
        [[row[i] for i in picked] for row in part] for part in want]
    splits = [f for files in p.partitions for f in files]
    path, _, _ = max(splits, key=lambda f: f[1])
    cut = sorted((f for f in splits if f[0] == path), key=lambda f: f[1])
    meta = pq.ParquetFile(path).metadata
    assert len(cut) >= 3 and meta.num_row_groups > len(cut)
    kept = [parquet_scan.kept_row_groups(meta, s, n) for _, s, n in cut]
    assert sorted(g for k in kept for g in k) == list(range(meta.num_row_groups))
    assert sum(len(part) for part in want) == sum(FILE_ROWS)

    def by_first_page(s, n):  # (the rule the midpoint one is not: the data tells them apart)
        return [i for i in range(meta.num_row_groups)
                if s <= min(filter(None, [meta.row_group(i).column(0).dictionary_page_offset,
                                          meta.row_group(i).column(0).data_page_offset])) < s + n]
    assert kept != [by_first_page(s, n) for _, s, n in cut]


def test_other_partition_counts_are_runs_of_consecutive_row_groups(spark, data):
    """``num_partitions`` other than Spark's: runs of consecutive row groups balanced by rows,
    none empty, together the DataFrame's rows in order; Spark's own count keeps its partitions
    (as the JVM path does)."""
    import pyarrow.parquet as pq
    with conf(spark, maxPartitionBytes=40 << 10, openCostInBytes=1 << 10):
        df = spark.read.parquet(data)
        p = parquet_scan.plan(df, ["id", "f"])
        want = [[list(r) for r in part] for part in spark_parts(df, ["id", "f"])]
    sc = spark.sparkContext
    assert len(p.partitions) > 5
    assert parquet_scan.groups(p, None) == parquet_scan.groups(p, len(p.partitions)) == \
        p.partitions

    def row_groups(splits):  # (file, row group) in the order the splits read them
        return [(f, g) for f, a, k in splits
                for g in parquet_scan.kept_row_groups(pq.read_metadata(f), a, k)]
    every = row_groups(concat(p.partitions))
    for n in (1, 3, len(p.partitions) + 2, len(every)):
        parts = direct_parts(sc, p, n, batch_rows=64)
        assert len(parts) == n and all(parts)
        assert concat(parts) == concat(want)
        assert row_groups(concat(parquet_scan.groups(p, n))) == every
    rows = [sum(pq.read_metadata(f).row_group(g).num_rows for f, g in row_groups(run))
            for run in parquet_scan.groups(p, 3)]
    biggest = max(pq.read_metadata(f).row_group(g).num_rows for f, g in every)
    assert max(rows) - min(rows) <= 2 * biggest
    assert parquet_scan.groups(p, len(every) + 1) is None  # (fewer row groups: the JVM cuts rows)


def test_one_file_read_as_four_partitions(spark, data):
    """One file of many row groups in one split: ``num_partitions=4`` reads it as 4 runs of its
    row groups, every one holding rows, together the file's rows in order."""
    df = spark.read.parquet(data)
    p = parquet_scan.plan(df, ["id"])
    files = concat(p.partitions)
    one = parquet_scan.ScanPlan([[max(files, key=lambda f: f[2])]], p.schema)
    whole = concat(direct_parts(spark.sparkContext, one, None, batch_rows=50))
    parts = direct_parts(spark.sparkContext, one, 4, batch_rows=50)
    assert len(parts) == 4 and all(parts) and concat(parts) == whole


def test_record_batches_keep_the_batch_size_and_a_full_first_batch(spark, data):
    """Batches of at most ``batch_rows`` rows; the first holds exactly the first ``batch_rows``
    rows across row-group and file boundaries, as the JVM's first Arrow batch does."""
    df = spark.read.parquet(data)
    p = parquet_scan.plan(df, ["id", "v"])
    files = concat(p.partitions)
    batches = list(parquet_scan.record_batches(files, ["id", "v"], p.schema, 37))
    assert all(0 < b.num_rows <= 37 for b in batches) and batches[0].num_rows == 37
    big = sum(FILE_ROWS) - 5  # (a first batch across every row group and file)
    first = next(parquet_scan.record_batches(files, ["id", "v"], p.schema, big))
    assert first.num_rows == big
    assert all(b.schema == p.schema for b in batches)
    assert sum(b.num_rows for b in batches) == sum(FILE_ROWS)


def test_refused(spark, data, tmp_path):
    df = spark.read.parquet(data)
    refused = {
        "filter": (df.filter("id > 3"), ["id"]),
        "withColumn": (df.withColumn("z", F.col("id") + 1), ["z"]),
        "alias": (df.select(F.col("id").alias("z")), ["z"]),
        "union": (df.union(df), ["id"]),
        "join": (df.join(df.select("id"), "id"), ["id"]),
        "limit": (df.limit(10), ["id"]),
        "cache": (df.cache(), ["id"]),
        "a string column": (df.withColumn("s", F.lit("a")), ["s"]),
        "duplicated columns": (df, ["id", "id"]),
    }
    small = spark.range(20, numPartitions=1).withColumn("x", F.col("id") * 2.0)
    part = str(tmp_path / "part")
    small.withColumn("p", F.col("id") % 2).write.partitionBy("p").parquet(part)
    refused["partition column"] = (spark.read.parquet(part), ["id", "p"])
    refused["partitioned relation"] = (spark.read.parquet(part), ["id"])
    for fmt in ("csv", "json"):
        small.write.format(fmt).save(str(tmp_path / fmt))
        refused[fmt] = (spark.read.schema("id long, x double").format(fmt)
                        .load(str(tmp_path / fmt)), ["id", "x"])
    try:
        for what, (frame, cols) in refused.items():
            assert parquet_scan.plan(frame, cols) is None, what
            assert parquet_scan.refusal(frame, cols), what
    finally:
        df.unpersist()
    assert parquet_scan.plan(df, ["id"]) is not None


def test_refused_when_spark_would_skip_files_or_merge_schemas(spark, data):
    df = spark.read.parquet(data)
    with conf(spark, ignoreCorruptFiles="true"):
        assert parquet_scan.plan(df, ["id"]) is None
    assert parquet_scan.plan(df, ["id"]) is not None
    for option in ("ignoreMissingFiles", "mergeSchema"):
        assert parquet_scan.plan(spark.read.option(option, "true").parquet(data), ["id"]) is None


def test_a_file_without_the_column_is_refused(spark, data, tmp_path):
    path = str(tmp_path / "other")
    spark.range(10).write.parquet(path)
    other = spark.read.schema("id long, f array<float>").parquet(path)
    assert parquet_scan.plan(other, ["id", "f"]) is None
    assert "missing" in parquet_scan.refusal(other, ["id", "f"])
    assert parquet_scan.plan(other, ["id"]) is not None


def test_no_files_is_no_partitions(spark, tmp_path):
    path = str(tmp_path / "empty")
    spark.range(0).write.parquet(path)
    df = spark.read.parquet(path)
    p = parquet_scan.plan(df, ["id"])
    assert p is not None
    got = direct_parts(spark.sparkContext, p)
    assert concat(got) == [] and len(got) == df.rdd.getNumPartitions()
    assert pa.Table.from_batches(
        list(parquet_scan.record_batches(concat(p.partitions), ["id"], p.schema, 10)),
        p.schema).num_rows == 0


# --- the engine reads Parquet this way ---------------------------------------------------------
def test_fit_and_evaluate_on_parquet_read_directly_equal_the_jvm_path(spark, tmp_path):
    """``fit`` on ``spark.read.parquet``: the build tasks read the files themselves (the
    default), in ``num_partitions`` runs without a shuffle. On Spark's own partitions the
    weights are bit-identical to the JVM path's (``spark.rddtensor.readParquet=false``:
    ``toArrowBatchRdd``); with ``num_partitions=3`` (runs of whole splits here, an ordered
    range shuffle there: other partition sizes, another summation order) equal to float
    tolerance, as both are to the in-process fit on the DataFrame's rows in their order."""
    import numpy as np

    from rddtensor import layers as L
    rng = np.random.default_rng(7)
    X = rng.normal(size=(1500, 8)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    path = str(tmp_path / "d")
    (spark.createDataFrame([(x.tolist(), int(t)) for x, t in zip(X, y)],
                           "features array<float>, label long").repartition(3).write
     .option("parquet.block.size", 8 << 10).option("parquet.block.size.row.check.min", 10)
     .parquet(path))

    def fit(direct, n):
        spark.conf.set(arrow_shards.DIRECT_CONF, direct)
        try:
            m = L.Sequential([L.Dense(8, activation="relu", input_shape=(8,)), L.Dense(3)],
                             seed=2)
            m.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
            h = m.fit(df, epochs=2, batch_size=100, num_partitions=n, verbose=0)
            return m, h, m.evaluate(df)
        finally:
            spark.conf.unset(arrow_shards.DIRECT_CONF)
    with conf(spark, maxPartitionBytes=12 << 10, openCostInBytes=1 << 10):
        df = spark.read.parquet(path)
        assert parquet_scan.plan(df, ["features", "label"]) is not None
        renamed = df.withColumnRenamed("label", "y")
        assert parquet_scan.plan(renamed, ["features", "y"]) is None  # (the JVM path reads it)
        rows = df.collect()
        n_spark = df.rdd.getNumPartitions()
        assert n_spark > 3
        m, h, ev = fit("true", None)
        m_jvm, h_jvm, ev_jvm = fit("false", None)
        m3, h3, _ = fit("true", 3)
        m3_jvm, _, _ = fit("false", 3)
    assert h.params["partitions"] == n_spark and h3.params["partitions"] == 3
    np.testing.assert_array_equal(m.theta, m_jvm.theta)
    assert ev == ev_jvm and h.history == h_jvm.history
    ref = L.Sequential([L.Dense(8, activation="relu", input_shape=(8,)), L.Dense(3)], seed=2)
    ref.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ref.fit(np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows]),
            epochs=2, batch_size=100, verbose=0)
    for got in (m, m3, m3_jvm):
        np.testing.assert_allclose(got.theta, ref.theta, rtol=1e-5, atol=1e-6)
