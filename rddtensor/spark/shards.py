"""Training data as N cached shards: one stacked ``(X, y)`` block per partition.

Accepted inputs: an RDD of ``(features, label)`` pairs (features: list, numpy array or
``pyspark.ml.linalg`` vector), an RDD of features alone (prediction), or a DataFrame with a
features column (vector, array or image; read through Arrow batches, see
``rddtensor.spark.arrow_shards``) and a label column. Partition ``j`` of the shard RDD holds one raw
record, shard ``j``, and the RDD has the partitioner of ``rawrdd.shuffle_pairs``' outputs, so that
``rawrdd.co_union`` appends shard ``j`` to partition ``j`` of any parameter shuffle: the one pass
that stacks the rows also writes that shuffle. Uneven and empty partitions are fine.

Where the rows live (conf ``spark.rddtensor.dataStore``):

- ``true`` (the default, for data read more than once: a fit's training and validation data): the
  build task writes partition ``j``'s arrays to the executor's local disk
  (``rddtensor.spark.datastore``) and the cached record is a token of a few hundred bytes; a
  training task maps the files and copies out only its batch's rows, so an iteration costs
  O(batch), not O(partition), and the page cache, not the JVM heap, holds the data. A task that
  cannot read the files (another host, files removed, executor restarted) fails with a store
  miss; the engine builds the shards again from their lineage (``Shards.restore``: the same
  rows, checked by fingerprint) and re-runs the job; after ``MAX_RESTORES`` restores in one fit
  the shards go inline. Results never depend on where the rows were read from.
- ``false``: the cached record holds the partition's arrays (inline), read whole by every task.
- ``evict``: fault injection for tests: every stored partition is deleted as soon as it is
  written, so every read misses (and the fit ends inline, with the same results).

In store mode the build streams: rows (RDD) or Arrow record batches (DataFrame) are decoded and
appended to the files a chunk at a time (``CHUNK_BYTES``), so a build task holds one chunk, not
the partition. A partition whose first row is a sparse vector is stacked whole and stays inline
(a CSR matrix), as do ``evaluate`` and ``predict`` (which read each row once).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from pyspark.accumulators import AccumulatorParam
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import ArrayType, NumericType

from rddtensor.spark import arrow_shards, datastore, rawrdd, wire
from rddtensor.spark.columns import (decode_sparse, decode_value, encode_sparse, feature_kind,
                                     stack_sparse)
from rddtensor.spark.errors import (marked_line, quiet_task_failures, spark_errors,
                                     spark_setting)
from rddtensor.spark.config import Kind
from rddtensor.spark.localcache import host_id

log = logging.getLogger("rddtensor")

STORE_CONF = "spark.rddtensor.dataStore"
#: store misses a fit's shards recover from by building them again before going inline
MAX_RESTORES = 2
#: Decoded bytes (float32 features) of one chunk of an RDD partition's rows that a streaming
#: build stacks and appends to the data store at a time: ``chunk_rows``, from the first row.
CHUNK_BYTES = 1 << 20


def chunk_rows(feature_shape, chunk_bytes: int | None = None) -> int:
    """Rows per chunk of the streaming build: about ``CHUNK_BYTES`` of float32 features."""
    row_bytes = 4 * int(np.prod(feature_shape, dtype=np.int64)) if feature_shape else 4
    return max(1, int(chunk_bytes or CHUNK_BYTES) // max(1, row_bytes))


def store_mode(sc) -> str:
    """``spark.rddtensor.dataStore``: ``"true"`` (default), ``"false"`` or ``"evict"``."""
    mode = (spark_setting(sc, STORE_CONF, "true") or "true").strip().lower()
    if mode not in ("true", "false", "evict"):
        raise ValueError(f"{STORE_CONF} must be true, false or evict, got {mode!r}")
    return mode


@dataclass
class Shards:
    """Cached, stacked training data: ``rdd`` (raw records: tokens of stored partitions, or the
    arrays inline), rows per partition, feature shape."""

    rdd: object
    sizes: list
    feature_shape: tuple
    has_labels: bool
    #: ``(min, max, all integers)`` of scalar labels over every row (``None``: no scalar labels)
    label_range: tuple | None = None
    #: ``"true"`` (stored), ``"false"`` (inline) or ``"evict"`` (see the module docstring)
    mode: str = "false"
    #: builds the shards again: ``rebuild(mode) -> _Built`` (``restore``)
    rebuild: object = None
    #: per partition: ``(host, directory)`` of its stored files, or ``None`` (inline)
    dirs: list = field(default_factory=list)
    #: per partition: ``{array: fingerprint}`` of its rows, or ``None`` (sparse)
    fingerprints: list = field(default_factory=list)
    #: store misses recovered from (``restore``)
    restores: int = 0
    #: whether every partition holds sample weights: array ``"w"`` (float32, one per row)
    has_weights: bool = False
    #: an empty RDD cached beside each partition (``rawrdd.home``, made by the build with the
    #: shard RDD): keeps its tasks there
    home: object = None

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

    def beside(self, *rdds, data: bool = True, home: bool = True):
        """``rdds`` (shuffle outputs) unioned partition by partition with this data (``data``)
        and its home, so that partition ``j``'s task runs on the host caching shard ``j``
        (``rawrdd.home``): ``co_union(*rdds, shards, home)``, or ``co_union(*rdds, home, home)``
        for a pass that reads no data. ``home=False`` (every task on one host, where any
        executor reads every file): no home, ``co_union(*rdds, shards)`` or ``rdds`` alone
        (the home's reads cost ~9 ms per iteration of the sharded all-reduce on one host)."""
        if not home:
            return rawrdd.co_union(*rdds, *((self.rdd,) if data else ()))
        h = self.home
        return rawrdd.co_union(*rdds, *((self.rdd, h) if data else (h, h)))

    @property
    def stored(self) -> bool:
        """Whether the cached records are tokens of partitions in the data store."""
        return any(d is not None for d in self.dirs)

    def store_state(self) -> str:
        """``"on"``, ``"off"`` or ``"off after N misses"`` (``History.params["data_store"]``)."""
        if self.stored:
            return "on" + (f" ({self.restores} restored)" if self.restores else "")
        if not self.restores:
            return "off"
        return f"off after {self.restores} miss" + ("es" if self.restores > 1 else "")

    def unpersist(self):
        """Drop the cached records and the stored files this host holds (the files on other
        hosts go with their executors' local directories)."""
        self.rdd.unpersist()
        self.home.unpersist()
        _remove_files(self.dirs)

    def restore(self, why: str = "") -> None:
        """After a store miss: build the shards again from their lineage, stored again or,
        after ``MAX_RESTORES`` restores, inline. The rows must come back the same (size and
        fingerprint per partition): a lineage that gives other rows (e.g. an unseeded sample)
        raises ``ValueError`` instead of training on other data."""
        self.restores += 1
        mode = self.mode if self.restores <= MAX_RESTORES else "false"
        log.warning("data store miss%s: building the shards again from their lineage (%s)",
                    f" ({why})" if why else "",
                    "stored again" if mode != "false" else
                    f"inline for the rest of this fit, after {self.restores} store misses")
        self.unpersist()
        built = self.rebuild(mode)
        for j, (n, fp) in enumerate(zip(built.sizes, built.fingerprints)):
            old = self.fingerprints[j] if j < len(self.fingerprints) else None
            if n != self.sizes[j] or (fp is not None and old is not None and fp != old):
                built.drop()
                raise ValueError(
                    f"partition {j} of the data was built again from its lineage after a data "
                    f"store miss and holds other rows than before ({n} rows, {self.sizes[j]} "
                    "before): the input is not deterministic (e.g. an unseeded sample, or a "
                    "repartition of unordered input); persist or checkpoint the input "
                    "DataFrame/RDD before fit, or set spark.rddtensor.dataStore=false")
        self.rdd, self.home, self.dirs, self.fingerprints = (built.rdd, built.home, built.dirs,
                                                             built.fingerprints)
        if mode == "false":
            self.mode = "false"

    def run(self, job):
        """``job()``, again after ``restore`` each time it fails on a store miss."""
        while True:
            try:
                return job()
            except Exception as exc:
                if datastore.MISS not in str(exc):
                    raise
                self.restore(marked_line(str(exc), datastore.MISS))


def _remove_files(dirs) -> None:
    here = host_id()
    for d in {os.path.dirname(d[1]) for d in dirs if d is not None and d[0] == here}:
        shutil.rmtree(d, ignore_errors=True)


def _features_of(value):
    if hasattr(value, "toArray"):  # pyspark.ml / mllib vectors, dense or sparse
        return value.toArray()
    if getattr(value, "__fields__", None) is not None:  # a struct, e.g. an image: decode it
        return decode_value(value)
    return value


def _stack_rows(rows, feature_shape, has_labels, j, names=("features", "labels"),
                has_weights=False):
    """``_stack``, but a partition of sparse vectors may stay one sparse matrix (see
    ``rddtensor.spark.columns.stack_sparse``) instead of being densified row by row."""
    rows = list(rows)
    width = 3 if has_weights else 2
    feats = [r[0] if isinstance(r, (tuple, list)) and len(r) == width else None for r in rows] \
        if has_labels else rows
    if _sparse_first(feats):
        X = stack_sparse(feats, feature_shape, j)
        if X is not None:  # labels are checked by _stack, with a placeholder feature per row
            arrays = _stack([(0.0, *r[1:]) for r in rows] if has_labels else [0.0] * len(rows),
                            (), has_labels, j, names, has_weights=has_weights)
            arrays["X"] = X
            return arrays
    return _stack(rows, feature_shape, has_labels, j, names, has_weights=has_weights)


def _sparse_first(feats) -> bool:
    return bool(feats) and hasattr(feats[0], "indices")


def _row_chunks(rows, feature_shape, has_labels, j, names, n_chunk, has_weights=False):
    """Partition ``j``'s rows stacked ``n_chunk`` rows at a time (``_stack`` of each, errors
    counting partition rows): the streaming build holds one chunk, not the partition.

    A partition whose first row holds a sparse vector is stacked whole (``_stack_rows``: a
    CSR matrix or dense, decided on the partition), as the inline shards are, in one chunk.
    An empty partition yields one empty chunk."""
    rows = iter(rows)
    chunk = list(itertools.islice(rows, n_chunk))
    if not chunk:
        yield _stack([], feature_shape, has_labels, j, names, has_weights=has_weights)
        return
    width = 3 if has_weights else 2
    first = chunk[0]
    if _sparse_first([(first[0] if isinstance(first, (tuple, list)) and len(first) == width
                       else None) if has_labels else first]):
        del first
        yield _stack_rows(itertools.chain(chunk, rows), feature_shape, has_labels, j, names,
                          has_weights)
        return
    del first
    offset = 0
    while chunk:
        n = len(chunk)
        arrays = _stack(chunk, feature_shape, has_labels, j, names, offset, has_weights)
        chunk = None
        yield arrays
        del arrays
        offset += n
        chunk = list(itertools.islice(rows, n_chunk))


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
    if isinstance(features_col, (list, tuple)):  # one column per input of the model
        for c in features_col:
            feature_kind(df.schema, c, "features_col", scalar=True)
    else:
        feature_kind(df.schema, features_col, "features_col")
    for label_col in _label_list(label_col):
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


def _check_weight_col(df, weight_col):
    """The sample-weight column: present and numeric (checked on the driver)."""
    if weight_col not in df.columns:
        raise ValueError(f"weight_col={weight_col!r}: the DataFrame has no column "
                         f"{weight_col!r}; its columns are {df.columns}")
    t = df.schema[weight_col].dataType
    if not isinstance(t, NumericType):
        raise ValueError(f"weight_col={weight_col!r}: column {weight_col!r} has type "
                         f"{t.simpleString()}; sample weights must be numbers (finite, >= 0), "
                         "one per row")


def _wire_arrays(arrays):
    if "X" not in arrays or isinstance(arrays["X"], np.ndarray):  # (several inputs: dense)
        return arrays
    return encode_sparse(arrays)


def _stack(rows, feature_shape, has_labels, j, names=("features", "labels"), offset=0,
           has_weights=False):
    """Stack partition ``j``'s rows (or a chunk of them starting at partition row ``offset``);
    errors name the row, the partition and (``names``) what the features and labels are
    called (DataFrame columns, see ``make_shards``; a third name for the sample weights).
    ``has_weights``: rows are ``(features, label, weight)`` triples (array ``"w"``)."""
    feat, lab = names[:2]
    X_rows, y_rows, w_rows = [], [], []
    width = 3 if has_weights else 2
    for r, row in enumerate(rows, offset):
        if has_labels:
            if not isinstance(row, (tuple, list)) or len(row) != width:
                raise ValueError(f"row {r} of partition {j}: expected a "
                                 f"{_ROW_FORM[has_weights]}, got {type(row).__name__}")
            feats, label = row[0], row[1]
            y_rows.append(label)
            if has_weights:
                w_rows.append(row[2])
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
    del X_rows
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))[0])
        raise ValueError(f"{feat} contain NaN or inf (row {offset + bad} of partition {j})")
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
                             f"(row {offset + bad}: {_short(y_rows[bad]) if y_rows else ''})")
        if y.dtype.kind == "f":
            y = y.astype(np.float32)
            if not np.isfinite(y).all():
                bad = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
                raise ValueError(f"{lab} contain NaN or inf (row {offset + bad} of partition {j})")
        arrays["y"] = y if len(y) else np.zeros(0, np.float32)
    if has_weights:
        arrays["w"] = _weights(w_rows, j, names[2] if len(names) > 2 else "sample weights",
                               offset)
    return arrays


_ROW_FORM = {False: "(features, label) pair", True: "(features, label, weight) triple"}


def _weights(values, j, what, offset):
    """Sample weights of a chunk of rows: float32 (through float64), finite and >= 0."""
    for r, v in enumerate(values, offset):
        if v is None:
            raise ValueError(f"row {r} of partition {j}: {what} is null; drop or fill nulls "
                             "first (df.na.drop(subset=[...]))")
        if isinstance(v, (str, bytes, bool)) or not np.isscalar(v) and \
                np.ndim(v) != 0:
            raise ValueError(f"row {r} of partition {j}: {what} must be numbers, got "
                             f"{type(v).__name__} {_short(v)}")
    try:
        w = np.asarray(values, dtype=np.float64).astype(np.float32).reshape(len(values))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} in partition {j} must be numbers ({e})") from None
    arrow_shards.check_weights(w, j, what, offset)
    return w


def _label_list(label_col) -> list:
    """The label column(s): none, one, or one per output of a model with several outputs."""
    if isinstance(label_col, (list, tuple)):
        return list(label_col)
    return [label_col] if label_col else []


def _check_df(df, features_col, label_col):
    cols = list(features_col) if isinstance(features_col, (list, tuple)) else [features_col]
    missing = [c for c in (*cols, *_label_list(label_col)) if c and c not in df.columns]
    if missing:
        raise ValueError(f"DataFrame has no column {missing[0]!r}; columns are {df.columns}")
    _check_columns(df, features_col, label_col)


def _as_rows(data, features_col, label_col, what, weight_col=None):
    """An RDD of (features, label) pairs (or features, or (features, label, weight) triples
    with ``weight_col``) from an RDD or a DataFrame."""
    if hasattr(data, "select") and hasattr(data, "columns"):  # DataFrame
        _check_df(data, features_col, label_col)
        if weight_col:
            return data.select(features_col, label_col, weight_col).rdd.map(
                lambda r: (r[0], r[1], r[2])), True
        if label_col:
            return data.select(features_col, label_col).rdd.map(lambda r: (r[0], r[1])), True
        return data.select(features_col).rdd.map(lambda r: r[0]), False
    first = data.first() if not data.isEmpty() else None
    if first is None:
        raise ValueError(f"the {what} RDD is empty: no rows")
    if weight_col is not None:  # every row a (features, label, weight) triple (checked per row)
        return data, True
    has_labels = isinstance(first, tuple) and len(first) == 2 and label_col is not None
    return data, has_labels


_SAME_LENGTH = "(every row needs the same feature length)"


def make_shards(data, n_partitions: int | None = None, feature_shape=None,
                features_col: str = "features", label_col: str | None = "label",
                what: str = "training data", store: bool = True,
                weight_col: str | None = None) -> Shards:
    """Stack ``data`` into cached shards, one per partition (``n_partitions`` repartitions).

    Args:
        data: RDD of ``(features, label)`` / features, or DataFrame with ``features_col`` and
            ``label_col`` (``label_col=None`` for features only).
        n_partitions: number of shards (default: the input's partition count).
        feature_shape: per-row feature shape (default: taken from the first row); given, it is
            the model's input shape, and errors say so.
        what: how error messages name this data ("training data", "validation_data", ...):
            every error about other data than the training data starts with it.
        store: write the rows to the executors' data store (``spark.rddtensor.dataStore``
            decides; ``False``: inline, for data read once).
        weight_col: sample weights, stored as array ``"w"`` (float32, one per row; finite and
            >= 0, else ``ValueError`` naming the row and partition): for a DataFrame, a numeric
            column; for an RDD (any string), its rows are ``(features, label, weight)``
            triples. Needs labels.

    The store mode streams: a build task decodes and writes its partition one chunk at a time
    (``CHUNK_BYTES`` of rows, one Arrow record batch), so it holds one chunk, not the
    partition; the stored arrays are those the inline build stacks at once, bit for bit.
    """
    ctx = data.ctx if hasattr(data, "ctx") else data.sparkSession.sparkContext
    mode = store_mode(ctx) if store else "false"
    if weight_col is not None and (not isinstance(weight_col, str) or not weight_col):
        raise ValueError(f"weight_col must be a column name (a non-empty string), got "
                         f"{weight_col!r}")
    if weight_col is not None and not label_col:
        raise ValueError(f"weight_col={weight_col!r} needs labels: give label_col")
    with quiet_task_failures(ctx):
        try:
            return _make_shards(data, n_partitions, feature_shape, features_col, label_col, what,
                                mode, weight_col)
        except ValueError as e:
            raise named_error(e, what, feature_shape is not None) from None


def named_error(e: ValueError, what: str, model_shape: bool) -> ValueError:
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


@dataclass
class Source:
    """Where shards are built from, or a one-pass job (``evaluate``, ``predict``) streams from:
    ``rows`` (an RDD: the Arrow record batches of a DataFrame's columns, or the rows of an RDD)
    and ``stack(records, feature_shape, j, stream)``, which turns partition ``j``'s records into
    an iterator of chunks of named arrays (``X``; ``y`` with labels; ``w`` with weights): one
    chunk per record batch / ``chunk_rows`` rows when ``stream``, the whole partition otherwise.
    ``names``: how errors call the columns."""

    rows: object
    stack: object
    feature_shape: tuple | None
    has_labels: bool
    names: tuple


def repartition_in_order(rows, n: int):
    """``rows`` cut into ``n`` partitions of consecutive rows, the order kept (``fit``'s
    ``num_partitions``): partition ``j`` holds rows ``[j * total // n, (j + 1) * total // n)``
    of the input's order, so the shards hold the rows the input had, in its order, and a rebuild
    from lineage gives the same partitions row for row (``RDD.repartition`` deals rows round
    robin and a task reads them in the order the shuffle fetches them: another order on every
    host, which a store miss would refuse as other data). One counting job, then a shuffle
    keyed by each row's index, sorted within each partition."""
    with spark_errors():
        counts = rows.mapPartitions(lambda it: [sum(1 for _ in it)]).collect()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    total = max(starts[-1], 1)

    def index(i, it):
        return ((starts[i] + k, r) for k, r in enumerate(it))
    return rows.mapPartitionsWithIndex(index).repartitionAndSortWithinPartitions(
        n, partitionFunc=lambda k: k * n // total).values()


def source(data, n_partitions=None, feature_shape=None, features_col="features",
           label_col="label", what="training data", weight_col=None) -> Source:
    """The ``Source`` of an RDD or DataFrame (``make_shards``' arguments): checks the columns,
    and for an RDD without ``feature_shape`` takes the shape from its first row."""
    is_df = hasattr(data, "select") and hasattr(data, "columns")
    several = isinstance(features_col, (list, tuple))
    if several and not is_df:
        raise ValueError(f"a model with several inputs trains on a DataFrame with one column "
                         f"per input (features_col={list(features_col)}); got an RDD")
    if isinstance(label_col, (list, tuple)) and not is_df:
        raise ValueError(f"a model with several outputs trains on a DataFrame with one label "
                         f"column per output (label_col={list(label_col)}); got an RDD")
    names = _column_names(is_df, features_col, label_col, weight_col)
    if feature_shape is not None:
        feature_shape = tuple(tuple(int(s) for s in shape) for shape in feature_shape) \
            if several else tuple(int(s) for s in feature_shape)
    arrow = None
    if is_df:
        _check_df(data, features_col, label_col)
        if weight_col:
            _check_weight_col(data, weight_col)
        arrow = _arrow_build(data, features_col, label_col, n_partitions, weight_col,
                             feature_shape, names)
    has_weights = bool(weight_col)
    if arrow is not None:
        (rows, stack), has_labels = arrow, bool(label_col)
        return Source(rows, stack, feature_shape, has_labels, names)
    if several or isinstance(label_col, (list, tuple)):
        raise ValueError("a model with several inputs or outputs reads its columns as Arrow "
                         "record batches, which this Spark cannot hand out "
                         "(Dataset.toArrowBatchRdd)")
    rows, has_labels = _as_rows(data, features_col, label_col, what, weight_col)
    if n_partitions is not None and n_partitions != rows.getNumPartitions():
        rows = repartition_in_order(rows, int(n_partitions))
    with spark_errors():
        if feature_shape is None:
            if rows.isEmpty():
                raise ValueError(f"the {what} is empty: no rows")
            first = rows.first()
            feature_shape = tuple(np.asarray(_features_of(
                first[0] if has_labels and isinstance(first, (tuple, list)) else first)).shape)
    n_chunk = chunk_rows(feature_shape)  # (decided here: a build task uses the driver's)

    def stack(it, shape, j, stream):
        if stream:
            return _row_chunks(it, shape, has_labels, j, names, n_chunk, has_weights)
        return iter([_stack_rows(it, shape, has_labels, j, names, has_weights)])
    return Source(rows, stack, feature_shape, has_labels, names)


def _column_names(is_df: bool, features_col, label_col, weight_col) -> tuple:
    """How errors call each column a build reads, in column order: the input(s), the label(s)
    (a placeholder without labels), the sample weights."""
    if isinstance(features_col, (list, tuple)):
        names = [f"input {i} (column {c!r})" for i, c in enumerate(features_col)]
    else:
        names = [f"features (column {features_col!r})" if is_df else "features"]
    if isinstance(label_col, (list, tuple)):
        names += [f"labels of output {i} (column {c!r})" for i, c in enumerate(label_col)]
    else:
        names.append(f"labels (column {label_col!r})" if is_df and label_col else "labels")
    if weight_col:
        names.append(f"sample weights (column {weight_col!r})" if is_df else "sample weights")
    return tuple(names)


def _make_shards(data, n_partitions, feature_shape, features_col, label_col, what,
                 mode, weight_col=None) -> Shards:
    src = source(data, n_partitions, feature_shape, features_col, label_col, what, weight_col)
    rows, stack, feature_shape, has_labels, names = \
        src.rows, src.stack, src.feature_shape, src.has_labels, src.names
    has_weights = bool(weight_col)
    built = _build(rows, stack, feature_shape, mode, names)
    if sum(built.sizes) == 0:
        built.drop()
        raise ValueError(f"the {what} is empty: no rows")
    if feature_shape is None:  # (Arrow path) every partition's own: they must agree
        found = [(j, s) for j, s in enumerate(built.shapes) if built.sizes[j]]
        feature_shape = found[0][1]
        bad = next(((j, s) for j, s in found if s != feature_shape), None)
        if bad is not None:
            built.drop()
            raise ValueError(f"row 0 of partition {bad[0]} has {names[0]} of shape {bad[1]}, "
                             f"expected {feature_shape} {_SAME_LENGTH}")
        if not all(built.sizes):  # empty partitions' arrays need the shape too: build them again
            built.drop()
            built = _build(rows, stack, feature_shape, mode, names)

    def rebuild(again_mode):
        return _build(rows, stack, feature_shape, again_mode, names)
    return Shards(built.rdd, built.sizes, feature_shape, has_labels, home=built.home,
                  label_range=built.labels,
                  mode=mode, rebuild=rebuild, dirs=built.dirs, fingerprints=built.fingerprints,
                  has_weights=has_weights)


def _arrow_build(df, features_col, label_col, n_partitions, weight_col=None,
                 feature_shape=None, names=None):
    """``(rdd, stack)`` for a DataFrame through Arrow batches (``rddtensor.spark.arrow_shards``), or
    ``None`` where this Spark cannot hand them out. ``names``: ``_column_names``."""
    several = isinstance(features_col, (list, tuple))
    inputs = list(features_col) if several else [features_col]
    labels = _label_list(label_col)
    columns = inputs + labels + ([weight_col] if weight_col else [])
    row_bytes = (sum(4 * max(1, int(np.prod(shape, dtype=np.int64))) for shape in feature_shape)
                 if several else _row_bytes(df, features_col, feature_shape))
    got = arrow_shards.arrow_rows(df, columns, n_partitions, row_bytes=row_bytes)
    if got is None:
        return None
    rdd, schema = got
    kinds = [feature_kind(df.schema, c, "features_col", scalar=several) for c in inputs]
    kinds += [None if isinstance(df.schema[c].dataType, NumericType) else
              feature_kind(df.schema, c, "label_col") for c in labels]
    if weight_col:
        kinds.append("weight")
    if several or len(labels) > 1:
        kinds = arrow_shards.InputKinds(kinds, len(inputs), max(1, len(labels)))
    names = names or _column_names(True, features_col, label_col, weight_col)
    names = names[:len(inputs) + len(labels)] + names[len(inputs) + max(1, len(labels)):]

    def stack(it, shape, j, stream):
        if stream:  # one record batch at a time
            return arrow_shards.stream_arrays(it, schema, kinds, shape, j, names)
        table = arrow_shards.read_table(it, schema)
        return iter([arrow_shards.stack_table(table, kinds, shape, j, names)])
    return rdd, stack


def _row_bytes(df, features_col, feature_shape):
    """Decoded bytes of one row's features (the model's shape, else the first row's), for the
    Arrow batch size; ``None`` where unknown (Spark's batch size then)."""
    if feature_shape is None:
        try:
            with spark_errors():
                first = df.select(features_col).first()
            if first is None or first[0] is None:
                return None
            feature_shape = np.shape(_features_of(first[0]))
        except (ValueError, TypeError):  # a bad first row: the build names it
            return None
    return 4 * max(1, int(np.prod(feature_shape, dtype=np.int64)))


class _PartsParam(AccumulatorParam):
    """Per-partition facts from the build tasks: ``{j: (rows, label summaries (one per
    output), feature shape, ...)}`` (a retried task overwrites its own entry)."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


@dataclass
class _Built:
    """What one build of the shards made: the cached RDD and, per partition, rows, feature
    shape, stored directory and fingerprints; ``labels`` summarises the scalar labels."""

    rdd: object
    home: object
    sizes: list
    labels: tuple | None
    shapes: list
    dirs: list
    fingerprints: list

    def drop(self):
        self.rdd.unpersist()
        self.home.unpersist()
        _remove_files(self.dirs)


def _build(rows, stack, feature_shape, mode, names=("features", "labels")) -> _Built:
    """Stack every partition (``stack(records, feature_shape, j, stream)``: an iterator of
    chunks of its arrays), carried by a shuffle into the same partition and cached: as a token
    of its files in the data store (``mode`` ``"true"``/``"evict"``: written chunk by chunk,
    ``_write_partition``) or as one inline record (``"false"``, and sparse partitions: one
    chunk, the whole partition)."""
    facts = rows.ctx.accumulator({}, _PartsParam())
    dataset = datastore.new_dataset_id()  # also tells this data apart in executor-local caches

    def build(j, it):
        chunks = stack(it, feature_shape, j, mode != "false")
        first = next(chunks)
        dense = all(isinstance(a, np.ndarray) for a in first.values())
        where = None
        if mode != "false" and dense:
            directory = datastore.partition_dir(dataset, j)
            chunks = itertools.chain([first], chunks)
            del first
            manifest, n, labels, shape = _write_partition(directory, dataset, j, chunks, names)
            if mode == "evict":  # fault injection: every read of this partition misses
                shutil.rmtree(directory, ignore_errors=True)
            where, fingerprint = (host_id(), directory), manifest.fingerprints
            record = datastore.token(directory, manifest, j=j, n=n, id=dataset)
        else:
            arrays = first
            del first
            if next(chunks, None) is not None:  # (an inline or sparse build is one chunk)
                raise RuntimeError(f"partition {j}: an inline shard came in several chunks")
            X = first_input(arrays)
            n, labels, shape = len(X), _label_summaries(arrays), input_shapes(arrays)
            fingerprint = datastore.fingerprints(arrays) if dense else None
            record = wire.pack(Kind.SHARD, {"j": j, "n": n, "id": dataset},
                               _wire_arrays(arrays))
            del arrays, X
        facts.add({j: (n, labels, shape, where, fingerprint)})
        yield rawrdd.key(j)
        yield record

    N = rows.getNumPartitions()
    shard_rdd = rawrdd.shuffle_raw(rows, build, N).persist()
    home = rawrdd.home(shard_rdd)
    try:
        with spark_errors():
            # each task caches partition j of both, on one executor (the JVM caches the
            # shuffled records: no Python pass after the build)
            home._jrdd.count()
    except BaseException:
        shard_rdd.unpersist()
        home.unpersist()
        _remove_files([f[3] for f in facts.value.values()])
        raise
    parts = [facts.value[j] for j in range(N)]
    return _Built(shard_rdd, home, [p[0] for p in parts], _labels_over(parts), [p[2] for p in parts],
                  [p[3] for p in parts], [p[4] for p in parts])


def _labels_over(parts):
    """The label summary over all partitions' facts (``(rows, summaries, ...)``; a summary per
    output, see ``_label_summaries``): one ``(min, max, all integers)``, a tuple of one per
    output for several, ``None`` for an output whose labels some non-empty partition cannot
    summarise (vectors)."""
    full = [p[1] for p in parts if p[0]]
    if not full or any(f is None for f in full):
        return None
    k = len(full[0])

    def over(found):
        if any(f is None for f in found):
            return None
        return min(f[0] for f in found), max(f[1] for f in found), all(f[2] for f in found)
    summaries = tuple(over([f[i] for f in full]) for i in range(k))
    return summaries[0] if k == 1 else summaries


def _label_summaries(arrays):
    """Per output's labels in a shard's arrays (``target_keys``), its ``_label_summary``; a
    tuple (``None`` without labels)."""
    keys = target_keys(arrays)
    return tuple(_label_summary(arrays[k]) for k in keys) if keys else None


def target_keys(arrays) -> tuple:
    """The label arrays among a shard's: ``("y",)``, ``(y0, y1, ...)`` for several outputs, or
    ``()`` without labels."""
    if "y" in arrays:
        return ("y",)
    return arrow_shards.target_keys(sum(1 for k in arrays if k[:1] == "y" and k[1:].isdigit())) \
        if "y0" in arrays else ()


def model_targets(arrays, rows=None):
    """What a model's loss takes from a shard's arrays (all rows, or ``rows`` of them): the ``y``
    array, or a tuple ``(y0, y1, ...)`` for several outputs."""
    keys = target_keys(arrays)
    got = [arrays[k] if rows is None else arrays.take(k, rows) for k in keys]
    return got[0] if keys == ("y",) else tuple(got)


def _write_partition(directory, dataset, j, chunks, names=("features", "labels")):
    """Append partition ``j``'s chunks of arrays to its files in the data store, one chunk in
    memory at a time; returns ``(manifest, rows, label summaries, feature shape)``.

    The labels' dtype is the one stacking the whole partition gives: integer chunks followed by
    fractional ones widen what was written (``PartitionWriter.widen``, to float32), later
    integer chunks are converted; label row shapes must agree across chunks (each output's
    labels on their own). ``names``: how errors call the columns (``_column_names``)."""
    writer = datastore.PartitionWriter(directory, dataset=dataset, part=j)
    try:
        n, shape, labels = 0, None, None
        for arrays in chunks:
            X = first_input(arrays)
            if shape is None:
                shape = input_shapes(arrays)
                keys = target_keys(arrays)
                first = len(_input_keys(arrays))
                labels = {k: _LabelColumn(names[first + i] if first + i < len(names) else
                                          "labels") for i, k in enumerate(keys)}
            for k, column in labels.items():
                arrays[k] = column.add(arrays[k], writer, k, j, n)
            writer.append(arrays)
            n += len(X)
            del arrays, X
        manifest = writer.finish()
    except BaseException:
        writer.abort()
        raise
    summaries = tuple(None if c.summary is _NO_LABELS else c.summary for c in labels.values()) \
        if labels else None
    return manifest, n, summaries, shape


class _LabelColumn:
    """One output's labels as a partition's chunks are written: their dtype (widened as
    stacking would) and row shape, and the summary so far."""

    def __init__(self, name: str):
        self.name, self.dtype, self.row, self.summary = name, None, None, _NO_LABELS

    def add(self, y, writer, key: str, j: int, n: int):
        """``y`` as written (converted to the partition's label dtype so far)."""
        if self.dtype is None:
            self.dtype, self.row = y.dtype, tuple(y.shape[1:])
        elif tuple(y.shape[1:]) != self.row:
            raise ValueError(f"{self.name} in partition {j} do not stack into one "
                             f"array (row {n} has shape {tuple(y.shape[1:])}, row 0 "
                             f"{self.row}); every row needs a label of the same shape")
        elif y.dtype != self.dtype:
            wide = _label_dtype(self.dtype, y.dtype)
            if wide != self.dtype:
                writer.widen(key, wide)
                self.dtype = wide
                if self.summary not in (None, _NO_LABELS):
                    self.summary = (float(wide.type(self.summary[0])),
                                    float(wide.type(self.summary[1])), self.summary[2])
            if y.dtype != self.dtype:
                y = (y.astype(np.float64) if self.dtype.kind == "f" and y.dtype.kind in "biu"
                     else y).astype(self.dtype)
        self.summary = _merge_summary(self.summary, _label_summary(y) if len(y) else _NO_LABELS)
        return y


_NO_LABELS = ()  # (no labelled rows yet)


def _label_dtype(a, b):
    """The dtype ``numpy.asarray`` gives labels of dtypes ``a`` and ``b`` together (floats:
    float32, as ``_stack`` stores them)."""
    t = np.result_type(a, b)
    return np.dtype(np.float32) if t.kind == "f" else t


def _merge_summary(a, b):
    if a is _NO_LABELS:
        return b
    if b is _NO_LABELS:
        return a
    if a is None or b is None:
        return None
    return min(a[0], b[0]), max(a[1], b[1]), a[2] and b[2]


def first_input(arrays):
    """The array of a shard's (first) model input: ``X``, or ``X0`` with several inputs."""
    return arrays["X"] if "X" in arrays else arrays["X0"]


def _input_keys(arrays) -> tuple:
    """The model inputs' arrays among a shard's (``arrow_shards.input_keys``' names)."""
    if "X" in arrays:
        return ("X",)
    return arrow_shards.input_keys(sum(1 for k in arrays if k[:1] == "X" and k[1:].isdigit()))


def input_shapes(arrays) -> tuple:
    """The per-row feature shape (one input), or a tuple of one per input (several)."""
    shapes = [tuple(arrays[k].shape[1:]) for k in _input_keys(arrays)]
    return shapes[0] if "X" in arrays else tuple(shapes)


def model_inputs(arrays, rows=None):
    """What a model's ``forward`` takes from a shard's arrays (all rows, or ``rows`` of them:
    ``ShardArrays.take``): the ``X`` array, or a tuple ``(X0, X1, ...)`` for several inputs."""
    keys = _input_keys(arrays)
    got = [arrays[k] if rows is None else arrays.take(k, rows) for k in keys]
    return got[0] if keys == ("X",) else tuple(got)


class ShardArrays(dict):
    """A shard's arrays by name; ``take(name, rows)`` copies rows out: from the data store's
    files (``reader``: ``PartitionReader.take``, which maps no more than it reads) or from the
    inline arrays."""

    reader = None

    def take(self, name: str, rows):
        if self.reader is not None:
            return self.reader.take(name, rows)
        return self[name][rows]


def read_shard(records):
    """The ``(meta, arrays)`` of the shard among a partition's records (reads them all).

    Returns a ``ShardArrays``. A stored shard's arrays are read-only views of its
    memory-mapped files; ``arrays.take(name, rows)`` reads only those rows and keeps the
    process's RSS to them. ``datastore.StoreMiss`` where they are not readable.
    """
    found = None
    for r in records:
        if len(r):
            found = r
    if found is None:
        raise ValueError("partition holds no shard record")
    kind, meta, arrays = wire.unpack(found)
    if kind == Kind.STORE:
        reader = datastore.open_token(meta)  # (each view keeps its file mapped while it lives)
        arrays = ShardArrays({name: reader.array(name) for name in reader.names})
        arrays.reader = reader
        return meta, arrays
    if "X.indptr" in arrays:  # a sparse shard (see _stack_rows)
        arrays = decode_sparse(arrays)
    return meta, ShardArrays(arrays)


def from_numpy(sc, X, y=None, n_partitions: int = 2):
    """Distribute numpy ``X`` (and ``y``) as an RDD of ``(features, label)`` rows."""
    X = np.asarray(X, dtype=np.float32)
    rows = list(zip(X, np.asarray(y))) if y is not None else list(X)
    return sc.parallelize(rows, int(n_partitions))
