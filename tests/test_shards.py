"""``rddtensor.spark.shards.make_shards``: stacking RDD / DataFrame rows into one cached shard record per
partition, partitioned like the parameter shuffles it is unioned with."""
from __future__ import annotations

import numpy as np
import pytest

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
        # repartitioning moves rows around but loses and duplicates none
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, X.tolist()))
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
    assert s.rdd.is_cached and len(_persisted(sc) - before) == 1
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
