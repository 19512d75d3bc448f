"""``rddtensor.spark.columns``: feature columns (vectors, arrays, image structs) to numpy batches.

The Arrow path (``transform``) and the row path (training, through ``make_shards``) must decode
the same values to the same arrays. No Spark here: Arrow batches are built with pyarrow in the
layout Spark sends (``VectorUDT`` as ``struct<type, size, indices, values>``).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse
from pyspark.ml.linalg import Vectors
from pyspark.sql import Row

from rddtensor import layers as L
from rddtensor.spark import wire
from rddtensor.spark import columns as C

_rng = np.random.default_rng(0)


def vector_column(vectors):
    """Arrow struct array of pyspark ml vectors, as Spark's mapInArrow delivers them."""
    types, sizes, indices, values = [], [], [], []
    for v in vectors:
        if v is None:
            types.append(None), sizes.append(None), indices.append(None), values.append(None)
        elif hasattr(v, "indices"):
            types.append(0), sizes.append(v.size), indices.append(v.indices.tolist())
            values.append(v.values.tolist())
        else:
            types.append(1), sizes.append(None), indices.append(None)
            values.append(v.toArray().tolist())
    mask = pa.array([v is None for v in vectors])
    return pa.StructArray.from_arrays(
        [pa.array([t if t is not None else 0 for t in types], pa.int8()),
         pa.array(sizes, pa.int32()), pa.array(indices, pa.list_(pa.int32())),
         pa.array(values, pa.list_(pa.float64()))],
        names=["type", "size", "indices", "values"], mask=mask)


def sparse_rows(n, d, per_row, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = np.sort(rng.choice(d, size=per_row, replace=False))
        out.append(Vectors.sparse(d, idx.tolist(), rng.normal(size=per_row).tolist()))
    return out


def dense_of(vectors):
    return np.stack([v.toArray() for v in vectors]).astype(np.float32)


# --- vectors ------------------------------------------------------------------------------------
def test_dense_vectors():
    X = _rng.normal(size=(5, 4))
    vecs = [Vectors.dense(x) for x in X]
    got = C.batch_from_arrow(vector_column(vecs), "vector", "features")
    assert got.dtype == np.float32 and got.shape == (5, 4)
    np.testing.assert_array_equal(got, X.astype(np.float32))


def test_low_density_sparse_vectors_stay_sparse():
    vecs = sparse_rows(6, 100, 3)  # 3% stored
    got = C.batch_from_arrow(vector_column(vecs), "vector", "features")
    assert isinstance(got, C.SparseRows) and got.shape == (6, 100) and len(got) == 6
    np.testing.assert_array_equal(got.toarray(), dense_of(vecs))


def test_dense_enough_sparse_and_mixed_vectors_are_densified():
    vecs = sparse_rows(4, 10, 5) + [Vectors.dense(_rng.normal(size=10))] + sparse_rows(2, 10, 1)
    got = C.batch_from_arrow(vector_column(vecs), "vector", "features")
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, dense_of(vecs))


def test_sliced_vector_column():
    vecs = sparse_rows(3, 8, 2) + [Vectors.dense(np.arange(8.0))] + sparse_rows(3, 8, 4, seed=2)
    col = vector_column(vecs).slice(2, 4)
    np.testing.assert_array_equal(C.batch_from_arrow(col, "vector", "f"), dense_of(vecs[2:6]))


def test_vectors_of_different_sizes_and_nulls_name_the_column():
    with pytest.raises(ValueError, match=r"column 'feats'.*different sizes \(3 and 4 at row 1\)"):
        C.batch_from_arrow(vector_column([Vectors.dense([1, 2, 3]), Vectors.dense([1, 2, 3, 4])]),
                           "vector", "feats")
    with pytest.raises(ValueError, match=r"column 'feats' has a null value at row 1"):
        C.batch_from_arrow(vector_column([Vectors.dense([1.0]), None]), "vector", "feats")


# --- arrays -------------------------------------------------------------------------------------
def test_arrays_flat_and_nested():
    X = _rng.normal(size=(4, 3, 2))
    flat = C.batch_from_arrow(pa.array(X[:, :, 0].tolist()), "array", "x")
    np.testing.assert_array_equal(flat, X[:, :, 0].astype(np.float32))
    nested = C.batch_from_arrow(pa.array(X.tolist()), "array", "x")
    np.testing.assert_array_equal(nested, X.astype(np.float32))
    ints = C.batch_from_arrow(pa.array([[1, 2, 3], [4, 5, 6]], pa.list_(pa.int32())), "array", "x")
    assert ints.dtype == np.float32 and ints.tolist() == [[1, 2, 3], [4, 5, 6]]
    sliced = C.batch_from_arrow(pa.array(X.tolist()).slice(1, 2), "array", "x")
    np.testing.assert_array_equal(sliced, X[1:3].astype(np.float32))


def test_ragged_arrays_name_the_column_and_row():
    with pytest.raises(ValueError, match=r"column 'tokens': arrays of different lengths \(3 and 2 "
                                         r"at row 2\)"):
        C.batch_from_arrow(pa.array([[1, 2, 3], [1, 2, 3], [1, 2]]), "array", "tokens")
    with pytest.raises(ValueError, match="column 'tokens' has a null value at row 1"):
        C.batch_from_arrow(pa.array([[1.0], None]), "array", "tokens")


# --- images -------------------------------------------------------------------------------------
def image_column(images, modes=None):
    """Images (n, H, W, C) uint8 in BGR(A) order as Spark's image struct column."""
    n = len(images)
    modes = modes or [{1: 0, 3: 16, 4: 24}[im.shape[2]] for im in images]
    return pa.StructArray.from_arrays(
        [pa.array(["file:/x%d.png" % i for i in range(n)]),
         pa.array([im.shape[0] for im in images], pa.int32()),
         pa.array([im.shape[1] for im in images], pa.int32()),
         pa.array([im.shape[2] for im in images], pa.int32()),
         pa.array(modes, pa.int32()), pa.array([im.tobytes() for im in images], pa.binary())],
        names=["origin", "height", "width", "nChannels", "mode", "data"])


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_images_decode_to_nchw_rgb_in_unit_range(channels):
    bgr = _rng.integers(0, 256, size=(3, 5, 4, channels), dtype=np.uint8)
    expected = bgr[..., [2, 1, 0, 3][:channels]] if channels > 1 else bgr
    expected = expected.transpose(0, 3, 1, 2).astype(np.float32) / 255
    got = C.batch_from_arrow(image_column(list(bgr)), "image", "image")
    assert got.shape == (3, channels, 5, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # the row path (training) decodes one image Row the same way
    row = Row(origin="file:/x.png", height=5, width=4, nChannels=channels,
              mode={1: 0, 3: 16, 4: 24}[channels], data=bytearray(bgr[1].tobytes()))
    np.testing.assert_array_equal(C.decode_value(row), got[1])
    sliced = C.batch_from_arrow(image_column(list(bgr)).slice(1, 2), "image", "image")
    np.testing.assert_array_equal(sliced, got[1:])


def test_images_of_different_sizes_or_modes_are_refused():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.zeros((5, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"column 'image': images of different height \(4 and 5 "
                                         r"at row 1\); resize"):
        C.batch_from_arrow(image_column([a, b]), "image", "image")
    with pytest.raises(ValueError, match="not an 8-bit image"):
        C.batch_from_arrow(image_column([a], modes=[21]), "image", "image")


# --- sparse rows for training shards ------------------------------------------------------------
def test_stack_sparse_and_wire_round_trip():
    vecs = sparse_rows(7, 50, 2)
    X = C.stack_sparse(vecs, (50,), 0)
    assert isinstance(X, C.SparseRows) and X.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), dense_of(vecs))
    assert isinstance(X[np.array([4, 1])], C.SparseRows) and len(X[2:5]) == 3
    arrays = C.encode_sparse({"X": X, "y": np.arange(7)})
    assert "X" not in arrays and all(isinstance(a, np.ndarray) for a in arrays.values())
    _, _, back = wire.unpack(wire.pack("shard", {}, arrays))
    back = C.decode_sparse(back)
    assert isinstance(back["X"], C.SparseRows)
    np.testing.assert_array_equal(back["X"].toarray(), X.toarray())
    np.testing.assert_array_equal(back["y"], np.arange(7))


def test_stack_sparse_declines_dense_or_mixed_rows_and_refuses_bad_ones():
    assert C.stack_sparse(sparse_rows(3, 4, 2), (4,), 0) is None  # 50% stored: densify
    assert C.stack_sparse(sparse_rows(3, 50, 1) + [Vectors.dense(np.zeros(50))], (50,), 0) is None
    with pytest.raises(ValueError, match=r"row 1 of partition 3 has features of shape \(60,\)"):
        C.stack_sparse([Vectors.sparse(50, [1], [1.0]), Vectors.sparse(60, [1], [1.0])], (50,), 3)
    with pytest.raises(ValueError, match=r"NaN or inf \(row 1 of partition 0\)"):
        C.stack_sparse([Vectors.sparse(50, [1], [1.0]), Vectors.sparse(50, [2], [np.nan])],
                       (50,), 0)


def test_sequential_keeps_sparse_for_dense_first_layer_and_densifies_otherwise():
    Xs = scipy.sparse.random(6, 12, density=0.2, format="csr", random_state=3,
                             dtype=np.float32)
    dense_first = L.Sequential([L.Dense(3, input_shape=(12,))], seed=0).build()
    Y, _ = dense_first.forward(dense_first.params, C.SparseRows(Xs))
    np.testing.assert_allclose(Y, dense_first.predict(Xs.toarray()), rtol=1e-5, atol=1e-6)
    reshape_first = L.Sequential([L.Reshape((3, 4), input_shape=(12,)), L.Flatten(),
                                  L.Dense(2)], seed=0).build()
    Y, _ = reshape_first.forward(reshape_first.params, C.SparseRows(Xs))
    np.testing.assert_allclose(Y, reshape_first.predict(Xs.toarray()), rtol=1e-5, atol=1e-6)
