"""``rddtensor.spark.shards.make_shards``: stacking RDD / DataFrame rows into one cached shard record per
partition, partitioned like the parameter shuffles it is unioned with."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (ArrayType, DoubleType, FloatType, IntegerType, LongType,
                               NumericType, StructField, StructType)

from rddtensor.spark import wire
from rddtensor.spark.shards import from_numpy, make_shards, read_shard

pytestmark = pytest.mark.spark

_rng = np.random.default_rng(3)
X = _rng.normal(size=(7, 4)).astype(np.float32)
Y = np.array([0, 1, 1, 0, 2, 1, 0])


def chunked_rdd(sc, rows, sizes):
    """An RDD whose partition j holds exactly the next ``sizes[j]`` rows (empty ones allowed)."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    chunks = [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]
    return sc.parallelize(chunks, len(chunks)).flatMap(lambda c: c)


def partitions(shards):
    """Per partition: ``(meta, arrays)`` of its shard record and the number of other records."""
    out = []
    for records in shards.rdd.glom().collect():
        assert len(records) >= 1 and len(records[0]) > 0, "the shard record comes first"
        kind, meta, arrays = wire.unpack(records[0])
        assert kind in ("shard", "store")
        if kind == "store":  # a token of the partition's files in the data store
            assert len(records[0]) < 2048, "a token, whatever the partition's size"
            meta, arrays = read_shard([records[0]])
            meta = {k: meta[k] for k in ("j", "n", "id")}  # (and where its files are)
        out.append((meta, arrays, len(records) - 1))
    return out


def _persisted(sc) -> set:
    return {int(k) for k in dict(sc._jsc.getPersistentRDDs())}


def _assert_clean(excinfo):
    e = excinfo.value
    assert type(e) is ValueError, type(e)
    assert "Py4J" not in str(e) and "org.apache" not in str(e) and e.__cause__ is None


# --- inputs -------------------------------------------------------------------------------------
def _ml_dense(x):
    from pyspark.ml.linalg import Vectors
    return Vectors.dense(x.tolist())


def _ml_sparse(x):
    from pyspark.ml.linalg import Vectors
    nz = np.flatnonzero(x)
    return Vectors.sparse(len(x), nz.tolist(), x[nz].tolist())


def _mllib_dense(x):
    from pyspark.mllib.linalg import Vectors
    return Vectors.dense(x.tolist())


FEATURES = {
    "list": lambda x: x.tolist(),
    "numpy": lambda x: x,
    "ml_dense": _ml_dense,
    "ml_sparse": _ml_sparse,
    "mllib_dense": _mllib_dense,
}


def test_pairs_with_any_feature_type(sc):
    """Lists, numpy arrays, ml dense/sparse and mllib vectors, mixed in one RDD."""
    Xs = X.copy()
    Xs[Xs < 0] = 0  # zeros so that the sparse vectors are really sparse
    kinds = ["list", "ml_sparse", "numpy", "ml_dense", "mllib_dense", "ml_sparse", "list"]
    rows = [(FEATURES[k](x), int(t)) for k, x, t in zip(kinds, Xs, Y)]
    s = make_shards(chunked_rdd(sc, rows, [3, 0, 4]))
    try:
        assert s.has_labels and s.feature_shape == (4,)
        assert s.sizes == [3, 0, 4] and s.offsets == [0, 3, 3] and s.n_total == 7
        parts = partitions(s)
        ids = {p[0].pop("id") for p in parts}  # one id per shard set (device caches' key)
        assert len(ids) == 1 and len(ids.pop()) == 16
        assert [p[0] for p in parts] == [{"j": 0, "n": 3}, {"j": 1, "n": 0}, {"j": 2, "n": 4}]
        assert [p[2] for p in parts] == [0, 0, 0]  # one record per partition: the shard
        got_X = np.concatenate([p[1]["X"] for p in parts])
        got_y = np.concatenate([p[1]["y"] for p in parts])
        assert got_X.dtype == np.float32 and got_X.shape == (7, 4)
        np.testing.assert_array_equal(got_X, Xs)
        np.testing.assert_array_equal(got_y, Y)
        assert parts[1][1]["X"].shape == (0, 4) and parts[1][1]["y"].shape == (0,)
    finally:
        s.unpersist()


def test_sizes_offsets_with_uneven_and_empty_partitions(sc):
    rows = list(zip(X, Y))
    s = make_shards(chunked_rdd(sc, rows, [0, 4, 0, 3]))
    try:
        assert s.n_partitions == 4 and s.sizes == [0, 4, 0, 3] and s.offsets == [0, 0, 4, 4]
        parts = partitions(s)
        assert [p[0]["n"] for p in parts] == [0, 4, 0, 3] and [p[2] for p in parts] == [0] * 4
        np.testing.assert_array_equal(parts[1][1]["X"], X[:4])
        np.testing.assert_array_equal(parts[3][1]["X"], X[4:])
        # read_shard finds the shard among a partition's records wherever it is
        records = s.rdd.glom().collect()[3]
        meta, arrays = read_shard([wire.PAD] + records[::-1])
        assert meta["n"] == 3
        np.testing.assert_array_equal(arrays["y"], Y[4:])
    finally:
        s.unpersist()
    with pytest.raises(ValueError, match="no shard record"):
        read_shard([wire.PAD, wire.PAD])


def test_shards_are_partitioned_like_the_parameter_shuffles(sc):
    from rddtensor.spark import rawrdd
    s = make_shards(sc.parallelize(list(zip(X, Y)), 2))
    try:
        other = rawrdd.shuffle_raw(sc.parallelize([0, 1], 2),
                                   lambda j, it: [rawrdd.key(j), b"p%d" % j], 2)
        got = rawrdd.co_union(other, s.keyed()).glom().collect()  # no shuffle, no error
        assert [p[0] for p in got] == [b"p0", b"p1"]
        assert [read_shard(p[1:])[0]["n"] for p in got] == [3, 4]
    finally:
        s.unpersist()


def test_repartition(sc):
    s = make_shards(sc.parallelize(list(zip(X, Y)), 2), n_partitions=3)
    try:
        assert s.n_partitions == 3 and s.n_total == 7 and len(s.offsets) == 3
        parts = partitions(s)
        assert [p[0]["n"] for p in parts] == s.sizes
        got = np.concatenate([p[1]["X"] for p in parts])
        # num_partitions cuts the rows into runs of consecutive rows: the order is kept, so
        # the weights equal a fit on the input as given (and on its rows in-process)
        np.testing.assert_array_equal(got, X)
        assert max(s.sizes) - min(s.sizes) <= 1
    finally:
        s.unpersist()


def test_features_only_and_multidimensional_features(sc):
    X3 = _rng.normal(size=(5, 2, 3)).astype(np.float32)
    s = make_shards(sc.parallelize(list(X3), 2), label_col=None)
    try:
        assert not s.has_labels and s.feature_shape == (2, 3) and s.sizes == [2, 3]
        parts = partitions(s)
        assert "y" not in parts[0][1]
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in parts]), X3)
    finally:
        s.unpersist()
    # without label_col=None, an RDD of bare features is detected as unlabelled too
    s = make_shards(sc.parallelize(list(X3), 2))
    assert not s.has_labels
    s.unpersist()


def test_label_types(sc):
    rows = [(x, float(t) + 0.5) for x, t in zip(X, Y)] + [(X[0], 1)]  # an int among floats
    s = make_shards(sc.parallelize(rows, 1))
    try:
        (_, arrays, _), = partitions(s)
        assert arrays["y"].dtype == np.float32
        np.testing.assert_allclose(arrays["y"], np.r_[Y + 0.5, 1.0])
    finally:
        s.unpersist()
    targets = _rng.normal(size=(7, 2)).astype(np.float32)  # vector-valued regression targets
    s = make_shards(sc.parallelize(list(zip(X, targets)), 2))
    try:
        parts = partitions(s)
        np.testing.assert_array_equal(np.concatenate([p[1]["y"] for p in parts]), targets)
    finally:
        s.unpersist()


def test_from_numpy_round_trip(sc):
    rdd = from_numpy(sc, X, Y, n_partitions=3)
    assert rdd.getNumPartitions() == 3
    s = make_shards(rdd)
    try:
        parts = partitions(s)
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in parts]), X)
        np.testing.assert_array_equal(np.concatenate([p[1]["y"] for p in parts]), Y)
    finally:
        s.unpersist()


# --- DataFrames ---------------------------------------------------------------------------------
def test_dataframe_vector_column(spark):
    from pyspark.ml.linalg import Vectors
    df = spark.createDataFrame([(Vectors.dense(x.tolist()), float(t)) for x, t in zip(X, Y)],
                               ["features", "label"])
    s = make_shards(df)
    try:
        assert s.has_labels and s.feature_shape == (4,) and s.n_total == 7
        parts = partitions(s)
        assert [p[0]["n"] for p in parts] == s.sizes and [p[2] for p in parts] == [
            0] * s.n_partitions
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in parts]), X)
        y = np.concatenate([p[1]["y"] for p in parts])
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, Y)
    finally:
        s.unpersist()


def test_dataframe_array_column_custom_names_and_features_only(spark):
    df = spark.createDataFrame([(x.tolist(), int(t), "junk") for x, t in zip(X, Y)],
                               "x array<float>, target int, other string")
    s = make_shards(df, features_col="x", label_col="target", n_partitions=3)
    try:
        assert s.n_partitions == 3 and s.n_total == 7 and s.has_labels
        got_X = np.concatenate([p[1]["X"] for p in partitions(s)])
        assert sorted(map(tuple, got_X.tolist())) == sorted(map(tuple, X.tolist()))
    finally:
        s.unpersist()
    s = make_shards(df, features_col="x", label_col=None)
    try:
        assert not s.has_labels
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in partitions(s)]), X)
    finally:
        s.unpersist()


@pytest.mark.parametrize("cols, missing", [({"features_col": "feats"}, "feats"),
                                           ({"label_col": "y"}, "y")])
def test_dataframe_missing_column_is_named(spark, cols, missing):
    df = spark.createDataFrame([(x.tolist(), float(t)) for x, t in zip(X, Y)],
                               "features array<float>, label double")
    with pytest.raises(ValueError, match=rf"no column '{missing}'; columns are \['features', "
                                         r"'label'\]") as excinfo:
        make_shards(df, **cols)
    _assert_clean(excinfo)


# --- errors name the row and partition ----------------------------------------------------------
def _bad(i, value):
    rows = list(zip(X, Y))
    rows[i] = value
    return rows


BAD_ROWS = {
    # rows (4 + 3 over 2 partitions), message regex
    "ragged": (_bad(5, (X[5][:3], 1)), r"row 2 of partition 1 has features of shape \(3,\), "
                                       r"expected \(4,\)"),
    "nan_feature": (_bad(2, (np.r_[X[2][:3], np.nan], 1)),
                    r"features contain NaN or inf \(row 2 of partition 0\)"),
    "inf_feature": (_bad(6, (np.r_[np.inf, X[6][1:]], 1)),
                    r"features contain NaN or inf \(row 3 of partition 1\)"),
    "nan_label": (_bad(4, (X[4], np.nan)), r"labels contain NaN or inf \(row 1 of partition 1\)"),
    "not_a_pair": (_bad(3, X[3]), r"row 0 of partition 1: expected a \(features, label\) pair, "
                                  r"got ndarray"),
    "string_label": (_bad(1, (X[1], "cat")), r"labels must be numeric, got <U\d+ values in "
                                             r"partition 0"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_row_and_partition(sc, case):
    rows, msg = BAD_ROWS[case]
    with pytest.raises(ValueError, match=msg) as excinfo:
        make_shards(sc.parallelize(rows, 2))
    _assert_clean(excinfo)


def test_feature_shape_given_and_not_matching(sc):
    # every partition is bad: whichever task fails first is reported
    with pytest.raises(ValueError, match=r"row 0 of partition [01] has features of shape \(4,\), "
                                         r"expected \(5,\)") as excinfo:
        make_shards(sc.parallelize(list(zip(X, Y)), 2), feature_shape=(5,))
    _assert_clean(excinfo)


def test_empty_inputs(sc, spark):
    for rdd in (sc.parallelize([], 3), sc.emptyRDD()):
        with pytest.raises(ValueError, match="empty: no rows"):
            make_shards(rdd)
    df = spark.createDataFrame([], "features array<float>, label double")
    with pytest.raises(ValueError, match="empty: no rows"):
        make_shards(df)
    with pytest.raises(ValueError, match="empty: no rows"):
        make_shards(df, feature_shape=(4,))


def test_unpersist_releases_the_cache(sc):
    before = _persisted(sc)
    s = make_shards(sc.parallelize(list(zip(X, Y)), 2))
    # the shards and their home (rawrdd.home: an empty RDD cached beside each partition)
    assert s.rdd.is_cached and s.home.is_cached and len(_persisted(sc) - before) == 2
    s.unpersist()
    assert _persisted(sc) - before == set()


def test_bad_rows_leave_nothing_persisted(sc):
    before = _persisted(sc)
    with pytest.raises(ValueError, match="row 2 of partition 1"):
        make_shards(sc.parallelize(BAD_ROWS["ragged"][0], 2))
    assert _persisted(sc) - before == set()


# --- DataFrames through Arrow batches: the same arrays as the rows path --------------------------
def _rows_path(data, **kw):
    import rddtensor.spark.shards as shards_module
    real = shards_module._arrow_build
    shards_module._arrow_build = lambda *a: None
    try:
        return make_shards(data, **kw)
    finally:
        shards_module._arrow_build = real


def _same_shards(a, b):
    pa_, pb = partitions(a), partitions(b)
    assert a.sizes == b.sizes and a.feature_shape == b.feature_shape
    assert a.label_range == b.label_range
    for (ma, xa, _), (mb, xb, _) in zip(pa_, pb):
        assert ma.pop("id") != mb.pop("id")  # each shard set has its own cache key
        assert ma == mb and sorted(xa) == sorted(xb)
        for k in xa:
            assert xa[k].dtype == xb[k].dtype, k
            np.testing.assert_array_equal(xa[k], xb[k])


@pytest.mark.parametrize("kind", ["dense", "sparse", "mixed", "array_int_labels",
                                  "vector_labels"])
def test_dataframe_arrow_path_equals_rows_path(spark, kind):
    from pyspark.ml.linalg import Vectors
    Xs = np.zeros((40, 30), np.float32)
    Xs[np.arange(40), np.arange(40) % 30] = np.arange(1, 41)  # one entry per row: sparse
    labels = np.arange(40) % 3
    if kind == "dense":
        rows = [(Vectors.dense(x.tolist()), float(t)) for x, t in zip(Xs, labels)]
    elif kind in ("sparse", "mixed"):
        rows = [(_ml_sparse(x) if kind == "sparse" or i % 2 else _ml_dense(x), float(t))
                for i, (x, t) in enumerate(zip(Xs, labels))]
    elif kind == "array_int_labels":
        rows = [(x.tolist(), int(t)) for x, t in zip(Xs, labels)]
    else:
        rows = [(x.tolist(), Vectors.dense([t, 2 * t])) for x, t in zip(Xs, labels)]
    df = spark.createDataFrame(rows, ["features", "label"]).repartition(3)
    a, b = make_shards(df), _rows_path(df)
    try:
        _same_shards(a, b)
        if kind == "sparse":
            assert "X.indptr" in partitions(a)[0][1]  # stays a CSR matrix on the wire
    finally:
        a.unpersist()
        b.unpersist()


def test_dataframe_arrow_path_empty_partitions_and_repartition(spark):
    df = spark.createDataFrame([(x.tolist(), float(t)) for x, t in zip(X, Y)],
                               "features array<float>, label double").coalesce(1)
    from pyspark.sql import functions as F
    s = make_shards(df.repartition(3, F.lit(0)))  # every row in one partition, two empty
    try:
        assert sorted(s.sizes) == [0, 0, 7] and s.feature_shape == (4,)
        parts = partitions(s)
        assert all(p[1]["X"].shape == (0, 4) and p[1]["y"].shape == (0,) for p in parts
                   if not p[0]["n"])
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in parts]), X)
    finally:
        s.unpersist()
    s = make_shards(df, n_partitions=3, label_col=None)
    try:
        assert s.n_partitions == 3 and s.n_total == 7 and not s.has_labels
        # consecutive rows per partition, the DataFrame's order kept
        np.testing.assert_array_equal(np.concatenate([p[1]["X"] for p in partitions(s)]), X)
    finally:
        s.unpersist()


@pytest.mark.parametrize("case, msg", [
    ("ragged", r"row 1 of partition 0 has features \(column 'features'\) of shape \(3,\), "
               r"expected \(4,\)"),
    ("null", r"row 2 of partition 0: features \(column 'features'\) is null"),
    ("null_label", r"row 3 of partition 0: labels \(column 'label'\) is null"),
    ("nan", r"features \(column 'features'\) contain NaN or inf \(row 4 of partition 0\)"),
])
def test_dataframe_arrow_path_errors_name_row_partition_and_column(spark, case, msg):
    rows = [(x.tolist(), float(t)) for x, t in zip(X, Y)]
    if case == "ragged":
        rows[1] = (rows[1][0][:3], rows[1][1])
    elif case == "null":
        rows[2] = (None, rows[2][1])
    elif case == "null_label":
        rows[3] = (rows[3][0], None)
    else:
        rows[4] = (rows[4][0][:3] + [float("nan")], rows[4][1])
    df = spark.createDataFrame(rows, "features array<double>, label double").coalesce(1)
    before = _persisted(spark.sparkContext)
    with pytest.raises(ValueError, match=msg) as excinfo:
        make_shards(df)
    _assert_clean(excinfo)
    assert _persisted(spark.sparkContext) - before == set()


# --- streaming build: chunk by chunk into the data store, the inline arrays bit for bit ---------
STORE_CONF = "spark.rddtensor.dataStore"


def _inline(spark, data, **kw):
    """``make_shards`` with the data store off: the whole partition stacked at once."""
    spark.conf.set(STORE_CONF, "false")
    try:
        return make_shards(data, **kw)
    finally:
        spark.conf.unset(STORE_CONF)


def _small_chunks(monkeypatch, rows: int, row_bytes: int = 16):
    """Chunks (rows path) and Arrow record batches of ``rows`` rows of ``row_bytes``."""
    import rddtensor.spark.arrow_shards as arrow_module
    import rddtensor.spark.shards as shards_module
    monkeypatch.setattr(shards_module, "CHUNK_BYTES", rows * row_bytes)
    monkeypatch.setattr(arrow_module, "TARGET_BATCH_BYTES", rows * row_bytes)


SIZES = [0, 17, 3, 20]  # uneven, an empty partition, partitions several chunks long
_Xs = _rng.normal(size=(40, 4)).astype(np.float32)
_Xs[np.arange(40), np.arange(40) % 4] = 0
_ints = np.arange(40) % 3
_Xcsr = np.zeros((40, 30), np.float32)  # one stored entry in 30: sparse vectors stay CSR
_Xcsr[np.arange(40), np.arange(40) % 30] = np.arange(1, 41)
_BIG = 2 ** 24 + 1  # int64 labels that float32 rounds (2 ** 24 + 1 -> 2 ** 24)
#: an int64 label that float32 rounds to 2 ** 54 through float64 (as numpy.asarray of mixed
#: numbers does), to 2 ** 54 + 2 ** 31 directly
_HUGE = 2 ** 54 + 2 ** 30 + 1


def _stream_rows(case):
    if case == "list_int":
        return [(x.tolist(), int(t)) for x, t in zip(_Xs, _ints)]
    if case == "numpy_float":
        return [(x, float(t) + 0.25) for x, t in zip(_Xs, _ints)]
    if case == "ints_then_floats":  # int labels, then fractional ones chunks later: float32
        return [(x, int(t) if i < 30 else float(t) + 0.5)
                for i, (x, t) in enumerate(zip(_Xs, _ints))]
    if case == "floats_then_ints":
        return [(x, float(t) + 0.5 if i % 17 < 4 else int(t))
                for i, (x, t) in enumerate(zip(_Xs, _ints))]
    if case == "big_ints_then_floats":  # the widened labels' summary is float32's too
        return [(x, _HUGE if i in (1, 35) else _BIG + int(t) if i % 17 < 10 else float(t) + 0.5)
                for i, (x, t) in enumerate(zip(_Xs, _ints))]
    if case == "int32_then_int64":
        return [(x, np.int32(t) if i % 17 < 5 else int(t)) for i, (x, t) in
                enumerate(zip(_Xs, _ints))]
    if case == "dense_then_sparse":  # first rows dense vectors: densified chunk by chunk
        return [(_ml_dense(x) if i % 17 < 4 else _ml_sparse(x), int(t))
                for i, (x, t) in enumerate(zip(_Xs, _ints))]
    if case == "sparse_first":  # a sparse first row: the partition decided whole, as inline
        return [(_ml_sparse(x) if i % 17 < 4 else _ml_dense(x), int(t))
                for i, (x, t) in enumerate(zip(_Xs, _ints))]
    if case == "sparse_csr":  # every row sparse and sparse enough: one CSR matrix, inline
        return [(_ml_sparse(x), int(t)) for x, t in zip(_Xcsr, _ints)]
    if case == "vector_labels":
        return [(x, [float(t), 2.0 * t]) for x, t in zip(_Xs, _ints)]
    if case == "features_only":
        return [x for x in _Xs]
    raise AssertionError(case)


ROW_CASES = ["list_int", "numpy_float", "ints_then_floats", "floats_then_ints",
             "big_ints_then_floats", "int32_then_int64", "dense_then_sparse", "sparse_first",
             "sparse_csr", "vector_labels", "features_only"]


def _parts(sizes=SIZES):
    """The rows (indices) of each partition of ``chunked_rdd(sc, rows, sizes)``."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [range(a, z) for a, z in zip(bounds[:-1], bounds[1:])]


class _Counted:
    """An iterator that counts what it yields (``count``): the chunks of a partition."""

    def __init__(self, it):
        self.it, self.count = iter(it), 0

    def __iter__(self):
        return self

    def __next__(self):
        value = next(self.it)
        self.count += 1
        return value


def _inline_record(j, arrays):
    """What ``_build`` caches for partition ``j``'s whole ``arrays`` inline (``dataStore=false``,
    or a sparse partition), read back as a task reads it: ``(meta, arrays, facts)``, facts the
    driver's (rows, label summaries (one per output), feature shape, fingerprints)."""
    from rddtensor.spark import datastore
    from rddtensor.spark import shards as S
    from rddtensor.spark.config import Kind
    dense = all(isinstance(a, np.ndarray) for a in arrays.values())
    n = len(S.first_input(arrays))
    facts = (n, S._label_summaries(arrays), S.input_shapes(arrays),
             datastore.fingerprints(arrays) if dense else None)
    meta, got = read_shard([wire.pack(Kind.SHARD, {"j": j, "n": n, "id": "t"},
                                      S._wire_arrays(arrays))])
    return {"j": meta["j"], "n": meta["n"]}, got, facts


def _stored(directory, j, chunks, names=("features", "labels")):
    """What a build task of ``_build`` makes of partition ``j``'s ``chunks`` in store mode,
    without Spark: a dense first chunk, and the chunks are appended to the data store
    (``_write_partition``) and read back through the token the shard RDD caches; a sparse
    partition (one chunk) goes inline. ``(meta, arrays, facts)`` as ``_inline_record``."""
    from rddtensor.spark import datastore
    from rddtensor.spark import shards as S
    first = next(chunks)
    if not all(isinstance(a, np.ndarray) for a in first.values()):
        assert next(chunks, None) is None, "a sparse partition comes in one chunk"
        return _inline_record(j, first)
    manifest, n, labels, shape = S._write_partition(directory, "t", j,
                                                    itertools.chain([first], chunks), names)
    meta, arrays = read_shard([datastore.token(directory, manifest, j=j, n=n, id="t")])
    assert meta["manifest"]["n"] == n
    return {"j": meta["j"], "n": meta["n"]}, arrays, (n, labels, shape, manifest.fingerprints)


def _assert_same(got, want):
    """Same meta and facts, same arrays: names, dense or CSR, dtype for dtype, values."""
    (gm, ga, gf), (wm, wa, wf) = got, want
    assert gm == wm
    assert gf[0] == wf[0], "rows"
    assert gf[1] == wf[1], "label summary"
    assert gf[2] == wf[2], "feature shape"
    assert gf[3] == wf[3], "fingerprints"
    assert sorted(ga) == sorted(wa)
    for k in wa:
        a, b = ga[k], wa[k]
        assert scipy.sparse.issparse(a) == scipy.sparse.issparse(b), k
        if scipy.sparse.issparse(b):
            assert a.shape == b.shape, k
            pairs = [(a.data, b.data), (a.indices, b.indices), (a.indptr, b.indptr)]
        else:
            pairs = [(a, b)]
        for x, y in pairs:
            assert x.dtype == y.dtype, k
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", ROW_CASES)
def test_streamed_rows_equal_inline_rows(tmp_path, case):
    """No Spark: for every partition of ``SIZES`` and chunks of 1, 3 and 7 rows, what a
    store-mode build task writes chunk by chunk (``_row_chunks`` into ``_write_partition``) and
    reads back is what the inline build stacks at once (``_stack_rows``): the same arrays
    (dtypes: labels widened across chunks), rows, label summary, feature shape, fingerprints."""
    from rddtensor.spark import shards as S
    rows = _stream_rows(case)
    has_labels = case != "features_only"
    names = ("features", "labels")
    feats = [r[0] for r in rows] if has_labels else rows
    shape = tuple(np.asarray(S._features_of(feats[0])).shape)  # (the driver's, see source)
    for j, part in enumerate(_parts()):
        mine = [rows[i] for i in part]
        want = _inline_record(j, S._stack_rows(mine, shape, has_labels, j, names))
        sparse_first = bool(mine) and hasattr(feats[part[0]], "indices")
        for n_chunk in (1, 3, 7):
            chunks = _Counted(S._row_chunks(iter(mine), shape, has_labels, j, names, n_chunk))
            _assert_same(_stored(str(tmp_path / f"p{j}-{n_chunk}"), j, chunks), want)
            # several chunks, but a partition with a sparse first row is stacked whole
            assert chunks.count == (1 if sparse_first or not mine else -(-len(mine) // n_chunk))
        if case in ("ints_then_floats", "floats_then_ints") and j == 3:
            assert want[1]["y"].dtype == np.float32  # (int and fractional chunks: widened)
        if case == "big_ints_then_floats" and j in (1, 3):  # (rows 1 and 35)
            assert want[2][1][0][1] == 2.0 ** 54 and want[1]["y"].dtype == np.float32
        if case == "sparse_csr" and mine:
            assert scipy.sparse.issparse(want[1]["X"])


def test_streamed_build_equals_inline_rows_path(spark, sc, monkeypatch):
    """One case through Spark (the rest: ``test_streamed_rows_equal_inline_rows``): chunk rows
    decided on the driver, chunks written by the build tasks, tokens cached, label ranges of
    partitions merged."""
    _small_chunks(monkeypatch, 3)  # 3 rows per chunk: partitions of 1 to 7 chunks
    rows = _stream_rows("ints_then_floats")
    a = make_shards(chunked_rdd(sc, rows, SIZES))
    b = _inline(spark, chunked_rdd(sc, rows, SIZES))
    try:
        assert a.stored and not b.stored
        _same_shards(a, b)
        assert a.label_range == (0.0, 2.5, False)  # int64 and float32 partitions
    finally:
        a.unpersist()
        b.unpersist()


def _label(i):
    return float(_ints[i])


#: DataFrame columns: case -> (features type, features of row i, label type, label of row i)
ARROW_CASES = {
    "array_int": (ArrayType(FloatType()), lambda i: _Xs[i].tolist(),
                  LongType(), lambda i: int(_ints[i])),
    "nested_array_float": (ArrayType(ArrayType(DoubleType())),
                           lambda i: _Xs[i].reshape(2, 2).tolist(),
                           DoubleType(), lambda i: float(_ints[i]) + 0.5),
    "int_array_vector_labels": (ArrayType(IntegerType()),
                                lambda i: [int(v) for v in np.round(4 * _Xs[i])],
                                VectorUDT(), lambda i: _ml_dense(np.array([_label(i),
                                                                           2 * _label(i)]))),
    "vector": (VectorUDT(), lambda i: _ml_dense(_Xs[i]), DoubleType(), _label),
    "vector_dense_then_sparse": (VectorUDT(), lambda i: (_ml_dense if i % 17 < 4
                                                         else _ml_sparse)(_Xs[i]),
                                 DoubleType(), _label),
    "vector_sparse_first": (VectorUDT(), lambda i: (_ml_sparse if i % 17 < 4
                                                    else _ml_dense)(_Xs[i]),
                            DoubleType(), _label),
    # every row sparse enough: each partition one CSR matrix, inline
    "vector_sparse_csr": (VectorUDT(), lambda i: _ml_sparse(_Xcsr[i]), DoubleType(), _label),
    # dense first rows, then batches that decode to CSR: densified batch by batch
    "vector_dense_then_csr": (VectorUDT(), lambda i: (_ml_dense if i % 17 < 4
                                                      else _ml_sparse)(_Xcsr[i]),
                              DoubleType(), _label),
}


def _record_batches(fields, part, per_batch=3):
    """``(schema, records)``: rows ``part`` as serialized Arrow record batches of ``per_batch``
    rows, what ``Dataset.toArrowBatchRdd`` hands a build task, in the Arrow schema Spark gives
    ``fields`` (``[(name, Spark type, value of row i)]``, ``to_arrow_schema``). A vector is its
    ``VectorUDT`` struct (type, size, indices, values: ``VectorUDT.serialize``).
    ``test_streamed_build_equals_inline_arrow_path`` checks these are the JVM's batches."""
    schema = to_arrow_schema(StructType([StructField(n, t) for n, t, _ in fields]))
    records = []
    for a in range(part.start, part.stop, per_batch):
        rows = range(a, min(a + per_batch, part.stop))
        cols = []
        for k, (_, t, value) in enumerate(fields):
            values = [value(i) for i in rows]
            if isinstance(t, VectorUDT):
                values = [dict(zip(("type", "size", "indices", "values"), t.serialize(v)))
                          for v in values]
            cols.append(pa.array(values, type=schema.field(k).type))
        records.append(pa.record_batch(cols, schema=schema).serialize().to_pybytes())
    return schema, records


@pytest.mark.parametrize("case", list(ARROW_CASES))
def test_streamed_arrow_equals_inline_arrow(tmp_path, case):
    """No Spark: for every partition of ``SIZES`` in record batches of 3 rows, what a
    store-mode build task writes batch by batch (``stream_arrays`` into ``_write_partition``)
    and reads back is what the inline build stacks from the whole table (``stack_table``), with
    the feature shape given or not; and that is what the rows path stacks of the same values."""
    from rddtensor.spark import arrow_shards
    from rddtensor.spark import shards as S
    from rddtensor.spark.columns import feature_kind
    ft, fx, lt, fy = ARROW_CASES[case]
    fields = [("features", ft, fx), ("label", lt, fy)]
    df_schema = StructType([StructField(n, t) for n, t, _ in fields])
    kinds = [feature_kind(df_schema, "features", "features_col"),  # (as _arrow_build)
             None if isinstance(lt, NumericType) else feature_kind(df_schema, "label",
                                                                   "label_col")]
    names = ("features (column 'features')", "labels (column 'label')")
    shape = tuple(np.asarray(S._features_of(fx(0))).shape)
    for j, part in enumerate(_parts()):
        schema, records = _record_batches(fields, part)
        assert len(records) == -(-len(part) // 3)  # several batches per partition
        rows_path = _inline_record(j, S._stack_rows([(fx(i), fy(i)) for i in part], shape,
                                                    True, j, names))
        sparse_first = kinds[0] == "vector" and any(hasattr(fx(i), "indices")
                                                    for i in part[:3])
        # (the driver builds without the shape, then again with it where a partition is empty)
        for given in ((None, shape) if len(part) else (shape,)):
            table = arrow_shards.read_table(records, schema)
            want = _inline_record(j, arrow_shards.stack_table(table, kinds, given, j, names))
            _assert_same(want, rows_path)
            chunks = _Counted(arrow_shards.stream_arrays(iter(records), schema, kinds, given, j,
                                                         names))
            got = _stored(str(tmp_path / f"p{j}-{given is None}"), j, chunks, names)
            _assert_same(got, want)
            # a chunk per batch, but a vector partition with a sparse first batch is one
            assert chunks.count == (1 if sparse_first or not records else len(records))
        if case == "vector_sparse_csr" and len(part):
            assert scipy.sparse.issparse(want[1]["X"])


def test_streamed_build_equals_inline_arrow_path(spark, sc, monkeypatch):
    """Through Spark: the JVM's record batches of every ``ARROW_CASES`` column (in batches of 3
    rows, ``TARGET_BATCH_BYTES``) are those ``_record_batches`` builds with pyarrow for
    ``test_streamed_arrow_equals_inline_arrow``; and one case end to end (batch size decided on
    the driver, a batch per chunk into the store, tokens cached) equals the inline build."""
    from rddtensor.spark import arrow_shards
    _small_chunks(monkeypatch, 3)  # record batches of 3 rows
    fields = [(f"{case}{suffix}", t, value) for case, (ft, fx, lt, fy) in ARROW_CASES.items()
              for suffix, t, value in (("", ft, fx), ("_label", lt, fy))]
    rows = [tuple(value(i) for _, _, value in fields) for i in range(sum(SIZES))]
    df = spark.createDataFrame(chunked_rdd(sc, rows, SIZES),
                               StructType([StructField(n, t) for n, t, _ in fields]))
    rdd, schema = arrow_shards.arrow_rows(df, df.columns, row_bytes=16)
    assert spark.conf.get(arrow_shards.MAX_RECORDS, None) is None  # (the conf is restored)
    jvm = rdd.glom().collect()
    for j, part in enumerate(_parts()):
        mine_schema, mine = _record_batches(fields, part)
        assert schema.equals(mine_schema)
        assert len(jvm[j]) == len(mine)  # several record batches per partition
        for a, b in zip(arrow_shards.batches(jvm[j], schema), arrow_shards.batches(mine, schema)):
            assert a.equals(b)
    case = "vector_dense_then_sparse"
    cols = {"features_col": case, "label_col": case + "_label"}
    a, b = make_shards(df, **cols), _inline(spark, df, **cols)
    try:
        assert a.stored and not b.stored and a.sizes == SIZES
        _same_shards(a, b)
    finally:
        a.unpersist()
        b.unpersist()


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_streamed_build_errors_count_partition_rows(sc, monkeypatch, case):
    """The error texts of ``test_bad_rows_name_row_and_partition``, with chunks of 1 and 2
    rows: row numbers are the partition's."""
    rows, msg = BAD_ROWS[case]
    for n in (1, 2):
        _small_chunks(monkeypatch, n)
        with pytest.raises(ValueError, match=msg) as excinfo:
            make_shards(sc.parallelize(rows, 2))
        _assert_clean(excinfo)


@pytest.mark.parametrize("case, msg", [
    ("ragged", r"row 5 of partition 0 has features \(column 'features'\) of shape \(3,\), "
               r"expected \(4,\)"),
    ("null", r"row 5 of partition 0: features \(column 'features'\) is null"),
    ("null_label", r"row 6 of partition 0: labels \(column 'label'\) is null"),
    ("nan", r"features \(column 'features'\) contain NaN or inf \(row 6 of partition 0\)"),
])
def test_streamed_arrow_errors_count_partition_rows(spark, monkeypatch, case, msg):
    _small_chunks(monkeypatch, 2)  # record batches of 2 rows: the bad row is in the 3rd/4th
    rows = [(x.tolist(), float(t)) for x, t in zip(X, Y)]
    if case == "ragged":
        rows[5] = (rows[5][0][:3], rows[5][1])
    elif case == "null":
        rows[5] = (None, rows[5][1])
    elif case == "null_label":
        rows[6] = (rows[6][0], None)
    else:
        rows[6] = (rows[6][0][:3] + [float("nan")], rows[6][1])
    df = spark.createDataFrame(rows, "features array<double>, label double").coalesce(1)
    with pytest.raises(ValueError, match=msg) as excinfo:
        make_shards(df)
    _assert_clean(excinfo)


def test_streamed_build_holds_a_chunk_not_the_partition(tmp_path):
    """A partition 80 chunks long (20 MiB of features) is written holding one 256 KiB chunk:
    rows path (``_row_chunks``) and Arrow path (``stream_arrays``), same files as stacking
    the whole partition."""
    import tracemalloc

    import pyarrow as pa

    from rddtensor.spark import arrow_shards, datastore
    from rddtensor.spark import shards as S

    d, n = 256, 20480  # 1 KiB rows

    def row(i):
        return np.random.default_rng(i).normal(size=d).astype(np.float32)

    def rows():
        for i in range(n):
            yield row(i), i % 7

    names = ("features", "labels")
    n_chunk = S.chunk_rows((d,), 256 << 10)
    assert n_chunk == 256 and S.chunk_rows((d,)) * 4 * d == S.CHUNK_BYTES
    tracemalloc.start()
    try:
        chunks = S._row_chunks(rows(), (d,), True, 0, names, n_chunk)
        manifest, got, labels, shape = S._write_partition(str(tmp_path / "rows"), "t", 0,
                                                          chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == n and shape == (d,) and labels == ((0.0, 6.0, True),)
    assert peak < 3 << 20, peak  # the partition is 20 MiB
    whole = S._stack_rows(list(rows()), (d,), True, 0, names)
    assert manifest.fingerprints == datastore.fingerprints(whole)
    with datastore.PartitionReader.open(str(tmp_path / "rows")) as r:
        np.testing.assert_array_equal(r.array("X"), whole["X"])
        assert r.array("y").dtype == whole["y"].dtype == np.int64

    schema = pa.schema([("features", pa.list_(pa.float32())), ("label", pa.int64())])

    def records():  # one record-batch message at a time, as the JVM hands them out
        for a in range(0, n, 256):
            xs = [row(i) for i in range(a, a + 256)]
            batch = pa.record_batch([pa.array(xs, type=schema[0].type),
                                     pa.array([i % 7 for i in range(a, a + 256)], pa.int64())],
                                    schema=schema)
            yield batch.serialize().to_pybytes()

    names = ("features (column 'features')", "labels (column 'label')")
    tracemalloc.start()
    try:
        chunks = arrow_shards.stream_arrays(records(), schema, ["array", None], None, 0, names)
        manifest, got, labels, shape = S._write_partition(str(tmp_path / "arrow"), "t", 0,
                                                          chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == n and shape == (d,) and labels == ((0.0, 6.0, True),)
    assert peak < 3 << 20, peak
    assert manifest.fingerprints == datastore.fingerprints(whole)


# --- sample weights: array "w" ------------------------------------------------------------------
_W = np.array([1.0, 0.5, 2.0, 0.0, 3.25, 1.0, 0.75])


def test_weight_column_dataframe(spark):
    df = spark.createDataFrame([(x.tolist(), int(t), float(w), int(2 * w))
                                for x, t, w in zip(X, Y, _W)],
                               "features array<float>, label long, wt double, iw int")
    a = make_shards(df, weight_col="wt")
    b = _inline(spark, df, weight_col="wt")
    c = _rows_path(df, weight_col="wt")
    d = make_shards(df, weight_col="iw")  # an integer column: float32 weights too
    plain = make_shards(df)
    try:
        assert a.has_weights and b.has_weights and c.has_weights and not plain.has_weights
        _same_shards(a, b)
        _same_shards(a, c)
        parts = partitions(a)
        w = np.concatenate([p[1]["w"] for p in parts])
        assert w.dtype == np.float32 and w.shape == (7,)
        np.testing.assert_array_equal(w, _W.astype(np.float32))
        np.testing.assert_array_equal(np.concatenate([p[1]["w"] for p in partitions(d)]),
                                      np.floor(2 * _W).astype(np.float32))
        assert all("w" not in p[1] for p in partitions(plain))
    finally:
        for s in (a, b, c, d, plain):
            s.unpersist()


def test_weight_triples_rdd(spark, sc, monkeypatch):
    _small_chunks(monkeypatch, 2)
    rows = [(x, int(t), int(w) if w == int(w) else w) for x, t, w in zip(X, Y, _W)]
    a = make_shards(chunked_rdd(sc, rows, [3, 0, 4]), weight_col="weight")
    b = _inline(spark, chunked_rdd(sc, rows, [3, 0, 4]), weight_col="weight")
    try:
        assert a.has_weights and a.sizes == [3, 0, 4]
        _same_shards(a, b)
        parts = partitions(a)
        assert parts[1][1]["w"].shape == (0,) and parts[1][1]["w"].dtype == np.float32
        np.testing.assert_array_equal(np.concatenate([p[1]["w"] for p in parts]),
                                      _W.astype(np.float32))
    finally:
        a.unpersist()
        b.unpersist()


def _weighted_df(spark, w, wtype="double"):
    return spark.createDataFrame([(x.tolist(), float(t), v) for x, t, v in zip(X, Y, w)],
                                 f"features array<float>, label double, wt {wtype}").coalesce(1)


@pytest.mark.parametrize("case, msg", [
    ("negative", r"sample weights \(column 'wt'\) must be finite and >= 0, got -1.0 \(row 5 "
                 r"of partition 0\)"),
    ("nan", r"sample weights \(column 'wt'\) must be finite and >= 0, got nan \(row 4 of "
            r"partition 0\)"),
    ("inf", r"sample weights \(column 'wt'\) must be finite and >= 0, got inf \(row 6 of "
            r"partition 0\)"),
    ("null", r"row 3 of partition 0: sample weights \(column 'wt'\) is null"),
    ("string", r"weight_col='wt': column 'wt' has type string; sample weights must be numbers"),
    ("missing", r"weight_col='nope': the DataFrame has no column 'nope'"),
])
@pytest.mark.parametrize("path", ["arrow"])
def test_bad_weights_dataframe(spark, monkeypatch, case, msg, path):
    _small_chunks(monkeypatch, 2)
    w = [float(v) for v in _W]
    col = "wt"
    if case == "negative":
        w[5] = -1.0
    elif case == "nan":
        w[4] = float("nan")
    elif case == "inf":
        w[6] = float("inf")
    elif case == "null":
        w[3] = None
    elif case == "missing":
        col = "nope"
    df = _weighted_df(spark, [str(v) for v in w] if case == "string" else w,
                      "string" if case == "string" else "double")
    before = _persisted(spark.sparkContext)
    with pytest.raises(ValueError, match=msg) as excinfo:
        (make_shards if path == "arrow" else _rows_path)(df, weight_col=col)
    _assert_clean(excinfo)
    assert _persisted(spark.sparkContext) - before == set()


@pytest.mark.parametrize("case, msg", [
    ("negative", r"sample weights \(column 'wt'\) must be finite and >= 0, got -1.0 \(row 5 "
                 r"of partition 0\)"),
    ("null", r"row 3 of partition 0: sample weights \(column 'wt'\) is null")])
def test_bad_weights_dataframe_rows_path(spark, monkeypatch, case, msg):
    """(the rows path, taken where Spark cannot hand out Arrow batches, checks the same)"""
    test_bad_weights_dataframe(spark, monkeypatch, case, msg, "rows")


@pytest.mark.parametrize("bad, msg", [
    (-2.0, r"sample weights must be finite and >= 0, got -2.0 \(row 2 of partition 1\)"),
    (float("nan"), r"sample weights must be finite and >= 0, got nan \(row 2 of partition 1\)"),
    (None, r"row 2 of partition 1: sample weights is null"),
    ("heavy", r"row 2 of partition 1: sample weights must be numbers, got str 'heavy'"),
    ("pair", r"row 2 of partition 1: expected a \(features, label, weight\) triple, got tuple"),
])
@pytest.mark.parametrize("store", ["true"])  # (inline shards stack weights the same way)
def test_bad_weights_rdd(spark, sc, monkeypatch, bad, msg, store):
    _small_chunks(monkeypatch, 2)
    rows = [(x, int(t), float(w)) for x, t, w in zip(X, Y, _W)]
    rows[5] = (rows[5][0], rows[5][1]) if bad == "pair" else (rows[5][0], rows[5][1], bad)
    spark.conf.set(STORE_CONF, store)
    try:
        with pytest.raises(ValueError, match=msg) as excinfo:
            make_shards(chunked_rdd(sc, rows, [3, 4]), weight_col="w")
    finally:
        spark.conf.unset(STORE_CONF)
    _assert_clean(excinfo)


def test_weight_col_needs_labels(sc):
    with pytest.raises(ValueError, match=r"weight_col='w' needs labels"):
        make_shards(sc.parallelize(list(zip(X, Y, _W)), 2), label_col=None, weight_col="w")
