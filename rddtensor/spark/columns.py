"""Feature columns to numpy batches: vectors (dense and sparse), arrays, image structs.

Two paths decode the same column types to the same arrays, so a model sees identical inputs in
training and in ``transform``:

- rows (training, through ``rddtensor.spark.shards``): ``decode_value`` turns one value (a
  ``pyspark.ml`` vector, a list, an image ``Row``) into a numpy array; ``stack_sparse`` stacks a
  partition of sparse vectors into one CSR matrix instead of densifying it;
- Arrow batches (``transform``): ``batch_from_arrow`` turns one column of a ``RecordBatch`` into
  a ``(batch, ...)`` float32 array (or CSR matrix) with vectorised numpy, no Python per row.

Image structs (``spark.read.format("image")``) hold 8-bit BGR(A) bytes in row-major HWC order;
they decode to NCHW float32 in ``[0, 1]`` with the channels in RGB(A) order (torchvision's
``ToTensor`` convention, so a PyTorch-trained network maps straight in).

Sparse vectors stay sparse (``SparseRows``, a CSR matrix) when every row of a partition or
batch is sparse and at most ``SPARSE_MAX_DENSITY`` of the entries are stored; ``rddtensor.layers.Dense``
multiplies them without densifying. Denser data is densified: a dense GEMM beats a sparse
product there.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import ArrayType, NumericType, StructType

#: Largest share of stored entries for which sparse vectors stay a CSR matrix.
SPARSE_MAX_DENSITY = 0.1

IMAGE_FIELDS = ("height", "width", "nChannels", "mode", "data")
_IMAGE_MODES = {0: 1, 16: 3, 24: 4}  # OpenCV CV_8UC1, CV_8UC3, CV_8UC4 -> channels


class SparseRows(scipy.sparse.csr_matrix):
    """A CSR matrix whose ``len()`` is its number of rows, like a numpy batch.

    Batching code slices rows and calls ``len(X)``; a plain scipy matrix refuses ``len``.
    Row slices and fancy row indexing return ``SparseRows`` again.
    """

    def __len__(self):
        return self.shape[0]


# --- column types -------------------------------------------------------------------------------
def feature_kind(schema, col: str, param: str = "featuresCol", scalar: bool = False) -> str:
    """``"vector"``, ``"array"`` or ``"image"`` for column ``col`` of ``schema``; with
    ``scalar``, also ``"scalar"`` for a numeric column (one number per row: features of shape
    ``(1,)``, e.g. an id column feeding an ``Embedding`` input of a model with several inputs).

    Raises a ``ValueError`` that names ``param`` and the column when it is missing or of a type
    no network can take.
    """
    if col not in schema.names:
        raise ValueError(f"{param}={col!r}: the DataFrame has no column {col!r}; its columns "
                         f"are {schema.names}")
    t = schema[col].dataType
    if isinstance(t, VectorUDT):
        return "vector"
    leaf = t
    while isinstance(leaf, ArrayType):
        leaf = leaf.elementType
    if isinstance(t, ArrayType) and isinstance(leaf, NumericType):
        return "array"
    if isinstance(t, StructType) and all(f in t.names for f in IMAGE_FIELDS):
        return "image"
    if scalar and isinstance(t, NumericType):
        return "scalar"
    raise ValueError(f"{param}={col!r}: column {col!r} has type {t.simpleString()}; features "
                     "must be a vector (e.g. from VectorAssembler), an array of numbers "
                     "(array<float>, array<int>, nested arrays) or an image struct from "
                     "spark.read.format('image')")


# --- rows (training) ----------------------------------------------------------------------------
def is_image(value) -> bool:
    fields = getattr(value, "__fields__", None)
    return fields is not None and all(f in fields for f in IMAGE_FIELDS)


def decode_value(value):
    """One feature value as a numpy array: vectors densified, images NCHW, lists as given."""
    if hasattr(value, "toArray"):  # pyspark.ml / mllib vectors, dense or sparse
        return value.toArray()
    if is_image(value):
        raw = np.frombuffer(bytes(value.data), np.uint8)
        if raw.size != value.height * value.width * value.nChannels:
            raise ValueError(f"image {value.origin!r} has {raw.size} bytes of data, expected "
                             f"{value.height}x{value.width}x{value.nChannels}")
        return decode_images(raw, value.height, value.width, value.nChannels, value.mode)[0]
    return value


def _is_sparse_vector(value) -> bool:
    return hasattr(value, "indices") and hasattr(value, "toArray") and hasattr(value, "size")


def stack_sparse(values, feature_shape, j: int):
    """Partition ``j``'s feature values as one ``SparseRows`` matrix, or ``None``.

    ``None`` (stack densely instead) unless every value is a sparse vector of the expected
    size and at most ``SPARSE_MAX_DENSITY`` of the entries are stored.
    """
    if len(feature_shape) != 1 or not values or not all(map(_is_sparse_vector, values)):
        return None
    d = int(feature_shape[0])
    nnz = sum(len(v.indices) for v in values)
    if nnz > SPARSE_MAX_DENSITY * len(values) * d:
        return None
    for r, v in enumerate(values):
        if v.size != d:
            raise ValueError(f"row {r} of partition {j} has features of shape ({v.size},), "
                             f"expected {tuple(feature_shape)} (every row needs the same "
                             "feature length)")
    indptr = np.zeros(len(values) + 1, np.int64)
    np.cumsum([len(v.indices) for v in values], out=indptr[1:])
    indices = np.concatenate([v.indices for v in values]).astype(np.int32)
    data = np.concatenate([v.values for v in values]).astype(np.float32)
    if not np.isfinite(data).all():
        bad = int(np.searchsorted(indptr, np.flatnonzero(~np.isfinite(data))[0], side="right")) - 1
        raise ValueError(f"features contain NaN or inf (row {bad} of partition {j})")
    return SparseRows((data, indices, indptr), shape=(len(values), d))


def encode_sparse(arrays: dict) -> dict:
    """Arrays for ``rddtensor.spark.wire``: a sparse ``X`` becomes its CSR parts."""
    X = arrays.get("X")
    if not scipy.sparse.issparse(X):
        return arrays
    out = {k: v for k, v in arrays.items() if k != "X"}
    out.update({"X.data": X.data, "X.indices": X.indices, "X.indptr": X.indptr,
                "X.shape": np.asarray(X.shape, np.int64)})
    return out


def decode_sparse(arrays: dict) -> dict:
    """Inverse of ``encode_sparse`` (zero-copy: the CSR parts are views of the record)."""
    if "X.indptr" not in arrays:
        return arrays
    out = {k: v for k, v in arrays.items() if not k.startswith("X.")}
    shape = tuple(int(s) for s in arrays["X.shape"])
    out["X"] = SparseRows((arrays["X.data"], arrays["X.indices"], arrays["X.indptr"]),
                          shape=shape, copy=False)
    return out


# --- images -------------------------------------------------------------------------------------
def decode_images(raw, height: int, width: int, n_channels: int, mode: int,
                  col: str = "image") -> np.ndarray:
    """Image bytes (``uint8``, BGR(A), row-major HWC, 8 bit, images back to back) ->
    ``(n, C, H, W)`` float32, RGB(A) channel order, values in [0, 1]."""
    if _IMAGE_MODES.get(int(mode)) != int(n_channels):
        raise ValueError(f"column {col!r}: image mode {mode} with {n_channels} channels is not "
                         "an 8-bit image (CV_8UC1/3/4); only 8-bit images are supported")
    h, w, c = int(height), int(width), int(n_channels)
    if h * w * c == 0 or raw.size % (h * w * c):
        raise ValueError(f"column {col!r}: image data has {raw.size} bytes, not a multiple of "
                         f"{h}x{w}x{c} (height x width x nChannels)")
    X = raw.reshape(-1, h, w, c)
    if c >= 3:  # BGR(A) -> RGB(A)
        X = X[..., [2, 1, 0, 3][:c]]
    return X.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)


# --- Arrow batches (transform) ------------------------------------------------------------------
def _first_null(arr) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _check_no_nulls(arr, col: str):
    if arr.null_count:
        raise ValueError(f"column {col!r} has a null value at row {_first_null(arr)} of this "
                         "batch; drop or fill nulls first (df.na.drop(subset=[...]))")


def _list_parts(arr):
    """(flat child array, offsets from 0) of a possibly sliced Arrow list array."""
    offsets = arr.offsets.to_numpy()
    return arr.flatten(), offsets - offsets[0]


def batch_from_arrow(arr, kind: str, col: str):
    """One Arrow column of ``kind`` (see ``feature_kind``) as a float32 batch or ``SparseRows``."""
    _check_no_nulls(arr, col)
    if kind == "vector":
        return _vectors(arr, col)
    if kind == "array":
        return _arrays(arr, col)
    if kind == "image":
        return _images(arr, col)
    if kind == "scalar":  # (through float64, as the label path converts numbers)
        return np.asarray(arr.to_numpy(zero_copy_only=False), np.float64).astype(
            np.float32).reshape(-1, 1)
    raise ValueError(f"unknown feature kind {kind!r}")


def _vectors(arr, col):
    types_a, sizes_a, indices_a, values_a = arr.flatten()
    n = len(arr)
    types = types_a.to_numpy(zero_copy_only=False)
    values, voff = _list_parts(values_a)
    vals = values.to_numpy(zero_copy_only=False)
    lengths = np.diff(voff)
    dense = types == 1
    sizes = np.where(dense, lengths, sizes_a.fill_null(0).to_numpy(zero_copy_only=False))
    if n and (sizes != sizes[0]).any():
        r = int(np.flatnonzero(sizes != sizes[0])[0])
        raise ValueError(f"column {col!r}: vectors of different sizes ({sizes[0]} and "
                         f"{sizes[r]} at row {r}); every row needs the same feature length")
    d = int(sizes[0]) if n else 0
    if dense.all():
        return vals.astype(np.float32).reshape(n, d)
    indices = indices_a.flatten().to_numpy(zero_copy_only=False)  # sparse rows' indices only
    if not dense.any() and len(vals) <= SPARSE_MAX_DENSITY * n * d:
        indptr = voff.astype(np.int64)
        return SparseRows((vals.astype(np.float32), indices.astype(np.int32), indptr),
                          shape=(n, d))
    X = np.zeros((n, d), np.float32)
    elem_row = np.repeat(np.arange(n), lengths)
    elem_sparse = ~dense[elem_row]
    X[elem_row[elem_sparse], indices] = vals[elem_sparse]
    X[dense] = vals[~elem_sparse].reshape(-1, d)
    return X


def _arrays(arr, col):
    shape, a = [len(arr)], arr
    while pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
        _check_no_nulls(a, col)
        a, offsets = _list_parts(a)
        lengths = np.diff(offsets)
        if len(lengths) and (lengths != lengths[0]).any():
            r = int(np.flatnonzero(lengths != lengths[0])[0])
            where = f"row {r}" if len(shape) == 1 else f"element {r} (flattened) of axis {len(shape)}"
            raise ValueError(f"column {col!r}: arrays of different lengths ({lengths[0]} and "
                             f"{lengths[r]} at {where}); pad the sequences to one length "
                             "(see mask_value of the recurrent layers)")
        shape.append(int(lengths[0]) if len(lengths) else 0)
    _check_no_nulls(a, col)
    return a.to_numpy(zero_copy_only=False).astype(np.float32).reshape(shape)


def _images(arr, col):
    fields = {arr.type.field(i).name: f for i, f in enumerate(arr.flatten())}
    n = len(arr)
    geometry = [fields[k].to_numpy(zero_copy_only=False) for k in ("height", "width",
                                                                    "nChannels", "mode")]
    if n == 0:
        return np.zeros((0, 0, 0, 0), np.float32)
    for name, g in zip(("height", "width", "nChannels", "mode"), geometry):
        if (g != g[0]).any():
            r = int(np.flatnonzero(g != g[0])[0])
            raise ValueError(f"column {col!r}: images of different {name} ({g[0]} and {g[r]} "
                             f"at row {r}); resize them to one size first")
    h, w, c, mode = (int(g[0]) for g in geometry)
    data = fields["data"]
    if pa.types.is_large_binary(data.type):
        data = data.cast(pa.binary())
    offsets = np.frombuffer(data.buffers()[1], np.int32)[data.offset:data.offset + n + 1]
    raw = np.frombuffer(data.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    if (np.diff(offsets) != h * w * c).any():
        r = int(np.flatnonzero(np.diff(offsets) != h * w * c)[0])
        raise ValueError(f"column {col!r}: image {r} has {int(np.diff(offsets)[r])} bytes of "
                         f"data, expected {h}x{w}x{c}")
    return decode_images(raw, h, w, c, mode, col)
