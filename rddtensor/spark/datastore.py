"""Executor-local data store: a partition's rows as memory-mapped ``.npy`` files, one per array.

A training iteration needs only its batch's rows of each partition. Cached as one record, a
partition's whole shard crosses from the JVM to Python on every pass (O(rows) per iteration);
stored here instead, the rows are written once, when the shards are built, to the executor's
local disk, and every later task maps the files and copies out only the rows it needs. What the
shard RDD caches is a *token* (``token``): a small ``wire`` record that names the files, the
host that holds them and what they must contain. The page cache is the memory: data larger than
RAM works, and reading a batch does not grow the process's anonymous memory.

Layout (``partition_dir``)::

    <root>/<dataset>/p<j>/
        manifest.json      written last (the directory appears by one rename, complete)
        <name>.npy         one per named array: a 4096-byte header, then the rows, C order

``root`` is under the executor's own local directories (``SPARK_LOCAL_DIRS``, which Spark sets
for its Python workers to its block manager's directories on ``spark.local.dir``), so the files
live no longer than the executor or its application; ``dataset`` is one build of shards (a
fit's training or validation data), removed with them (``remove_dataset``).

Writing streams (``PartitionWriter``): arrays arrive in chunks of rows (Arrow record batches or
stacked row iterators) and are appended to the files, so a build task holds one chunk at a time,
never the partition. Each file's header is reserved up front and finalised with the row count at
the end; a fingerprint (Adler-32 of each array's bytes, in row order) goes into the manifest, so
a partition rebuilt from lineage can be checked to be the same data, bit for bit.

Reading (``PartitionReader``) maps each file read-only and takes rows by index (a copy of just
those rows). Any reason the rows are not there (another host, a missing directory, an
incomplete or foreign file) raises ``StoreMiss`` (message prefix ``MISS``): the caller rebuilds
the partition from lineage. A store changes speed, never results.

Example:
    >>> import numpy as np, tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "p0")
    >>> with PartitionWriter(d, dataset="demo", part=0) as w:
    ...     n = w.append({"x": np.arange(6, dtype=np.float32).reshape(3, 2), "y": np.arange(3)})
    >>> r = PartitionReader.open(d)
    >>> r.n, r.take("x", [2, 0]).tolist()
    (3, [[4.0, 5.0], [0.0, 1.0]])
"""
from __future__ import annotations

import ast
import json
import mmap
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass

import numpy as np

from rddtensor.spark import wire
from rddtensor.spark.config import Kind
from rddtensor.spark.localcache import host_id

__all__ = ["MISS", "StoreMiss", "ArraySpec", "Manifest", "PartitionWriter", "PartitionReader",
           "store_roots", "partition_dir", "token", "open_token", "remove_dataset",
           "new_dataset_id", "fingerprints", "HEADER_BYTES"]

MISS = "rddtensor data store miss"
"""The message prefix of ``StoreMiss``: the engine recognises a miss in a failed job by it."""

HEADER_BYTES = 4096
"""Each ``.npy`` file's header, padded to one page: the rows start page-aligned, and the header
can be rewritten in place with the final row count (it never changes size)."""

#: arrays larger than this are gathered row by row with ``os.preadv`` (``PartitionReader.take``)
PREAD_MIN_BYTES = 64 << 20

MANIFEST = "manifest.json"
_FORMAT = 1  # manifest layout version
_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format 1.0: a 2-byte little-endian header length follows
_LEN = struct.Struct("<H")
_STORE_DIR = "rddtensor-store"


class StoreMiss(RuntimeError):
    """A partition's stored rows are not readable here: rebuild them from lineage."""


def _miss(text: str) -> StoreMiss:
    return StoreMiss(f"{MISS}: {text}")


# --- what a partition holds -------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """One named array of a partition: its dtype (``numpy`` string, e.g. ``"<f4"``) and the
    shape of one row."""

    name: str
    dtype: str
    row_shape: tuple

    @classmethod
    def of(cls, name: str, chunk: np.ndarray) -> "ArraySpec":
        _check_name(name)
        if chunk.ndim == 0:
            raise ValueError(f"array {name!r} needs a row axis, got a scalar")
        if chunk.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object; the store holds numbers only")
        return cls(name, chunk.dtype.str, tuple(int(s) for s in chunk.shape[1:]))

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.row_shape, dtype=np.int64))

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name \
            or os.sep in name or name != name.strip():
        raise ValueError(f"array name {name!r}: use a non-empty file-name-safe string "
                         "(no '/', no leading '.', no surrounding spaces)")


@dataclass(frozen=True)
class Manifest:
    """What a stored partition holds: ``dataset`` and partition ``part`` it belongs to, rows
    ``n``, the arrays in order, each array's Adler-32 fingerprint, and the caller's ``meta``."""

    dataset: str
    part: int
    n: int
    specs: tuple
    fingerprints: dict
    meta: dict

    def spec(self, name: str) -> ArraySpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(f"no array {name!r} in partition {self.part} of dataset {self.dataset}; "
                       f"it holds {[s.name for s in self.specs]}")

    @property
    def names(self) -> list:
        return [s.name for s in self.specs]

    @property
    def nbytes(self) -> int:
        return sum(self.n * s.row_bytes for s in self.specs)

    def same_data(self, other: "Manifest") -> bool:
        """Whether ``other`` holds the same rows (same arrays, shapes, dtypes and bytes)."""
        return (self.n, self.specs, self.fingerprints) == (other.n, other.specs,
                                                           other.fingerprints)

    def to_json(self) -> dict:
        return {"format": _FORMAT, "dataset": self.dataset, "part": self.part, "n": self.n,
                "arrays": [[s.name, s.dtype, list(s.row_shape)] for s in self.specs],
                "fingerprints": self.fingerprints, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format") != _FORMAT:
            raise ValueError(f"manifest format {d.get('format')!r}, expected {_FORMAT}")
        specs = tuple(ArraySpec(name, dtype, tuple(shape)) for name, dtype, shape in d["arrays"])
        return cls(d["dataset"], int(d["part"]), int(d["n"]), specs, dict(d["fingerprints"]),
                   dict(d.get("meta") or {}))


# --- the .npy header ----------------------------------------------------------------------------
def _header(spec: ArraySpec, n: int) -> bytes:
    """A format 1.0 ``.npy`` header of exactly ``HEADER_BYTES`` bytes for ``n`` rows."""
    d = {"descr": spec.dtype, "fortran_order": False, "shape": (int(n), *spec.row_shape)}
    text = repr(d).encode("latin1")
    pad = HEADER_BYTES - len(_MAGIC) - _LEN.size - len(text) - 1
    if pad < 0:
        raise ValueError(f"array {spec.name!r}: row shape {spec.row_shape} does not fit a "
                         f"{HEADER_BYTES}-byte header")
    return _MAGIC + _LEN.pack(HEADER_BYTES - len(_MAGIC) - _LEN.size) + text + b" " * pad + b"\n"


def _read_header(f) -> tuple:
    """``(dtype, shape)`` of an ``.npy`` file written by this module (position: its start)."""
    head = f.read(HEADER_BYTES)
    if len(head) != HEADER_BYTES or head[:len(_MAGIC)] != _MAGIC:
        raise ValueError("not an .npy file of this store")
    (n,) = _LEN.unpack_from(head, len(_MAGIC))
    if len(_MAGIC) + _LEN.size + n != HEADER_BYTES:
        raise ValueError("header is not the store's fixed size")
    d = ast.literal_eval(head[len(_MAGIC) + _LEN.size:].decode("latin1").strip())
    if d.get("fortran_order"):
        raise ValueError("Fortran-ordered file")
    return d["descr"], tuple(d["shape"])


# --- writing ------------------------------------------------------------------------------------
class PartitionWriter:
    """Append one partition's named arrays in chunks of rows; ``finish`` publishes them.

    The files go to a hidden sibling directory; ``finish`` writes the final headers and the
    manifest there, then renames it to ``directory`` in one step, so a reader sees either the
    complete partition or nothing. Where ``directory`` already exists (a retried task on this
    host) the stored partition is kept if it holds the same data, and a mismatch raises
    ``ValueError``: the partition's lineage gave different rows this time.

    Args:
        directory: the partition's directory (``partition_dir``).
        dataset, part: which data this is (recorded in the manifest and checked by readers).
        specs: the arrays up front (``ArraySpec``s, in order); default: from the first chunk.

    Use as a context manager: leaving it by an exception removes the partial files.
    """

    def __init__(self, directory: str, *, dataset: str, part: int, specs=None):
        self.directory = os.path.abspath(directory)
        self.dataset, self.part = str(dataset), int(part)
        self.n = 0
        self.specs: tuple | None = None
        self._files: dict = {}
        self._sums: dict = {}
        parent = os.path.dirname(self.directory)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.directory)}-", dir=parent)
        self._done = False
        if specs is not None:
            self._open(tuple(specs))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finish()
        return False

    def _open(self, specs: tuple) -> None:
        names = [s.name for s in specs]
        if not names:
            raise ValueError("a partition needs at least one named array")
        if len(set(names)) != len(names):
            raise ValueError(f"array names must be unique, got {names}")
        for s in specs:
            _check_name(s.name)
            f = open(os.path.join(self._tmp, s.file), "wb")
            f.write(_header(s, 0))  # provisional: finish() writes the row count
            self._files[s.name] = f
            self._sums[s.name] = 1  # Adler-32's initial value
        self.specs = specs

    def append(self, arrays: dict) -> int:
        """Append a chunk: ``{name: array}``, every array with the same number of rows and the
        row shape of its spec. Another dtype is converted where no value can change
        (``numpy.can_cast(..., "safe")``, e.g. int32 into int64) and refused otherwise.
        Returns the partition's rows so far."""
        if self._done:
            raise RuntimeError("append after finish/abort")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if self.specs is None:
            self._open(tuple(ArraySpec.of(k, v) for k, v in arrays.items()))
        if set(arrays) != set(self._files):
            raise ValueError(f"chunk has arrays {sorted(arrays)}, the partition holds "
                             f"{sorted(self._files)}")
        rows = {len(v) for v in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"arrays of one chunk need the same number of rows, got "
                             f"{ {k: len(v) for k, v in arrays.items()} }")
        for s in self.specs:
            a = arrays[s.name]
            if tuple(a.shape[1:]) != s.row_shape:
                raise ValueError(f"array {s.name!r}: rows of shape {tuple(a.shape[1:])}, "
                                 f"expected {s.row_shape} (row {self.n} of partition "
                                 f"{self.part})")
            if a.dtype.str != s.dtype:
                if not np.can_cast(a.dtype, s.dtype, "safe"):
                    raise ValueError(f"array {s.name!r}: dtype {a.dtype} cannot be stored as "
                                     f"{np.dtype(s.dtype)} without loss (row {self.n} of "
                                     f"partition {self.part})")
                a = a.astype(s.dtype)
            view = _bytes_of(a)
            self._sums[s.name] = zlib.adler32(view, self._sums[s.name])
            self._files[s.name].write(view)
        self.n += rows.pop()
        return self.n

    def widen(self, name: str, dtype) -> None:
        """Convert the rows of ``name`` written so far to ``dtype`` (a type every value
        fits, e.g. int64 labels followed by fractional ones: float32), in blocks of rows, and
        store later chunks as ``dtype``. Integers become floats through float64, as
        ``numpy.asarray`` of mixed Python numbers does. The fingerprint is of the new bytes."""
        if self._done:
            raise RuntimeError("widen after finish/abort")
        old = self.specs and next((s for s in self.specs if s.name == name), None)
        if old is None:
            raise KeyError(f"no array {name!r} in this partition")
        new = ArraySpec(name, np.dtype(dtype).str, old.row_shape)
        if new == old:
            return
        src = self._files[name]
        src.flush()
        path = os.path.join(self._tmp, old.file)
        wide = os.path.join(self._tmp, f".{old.file}.widen")
        block = max(1, (1 << 20) // max(1, old.row_bytes))
        via = np.float64 if np.dtype(dtype).kind == "f" and np.dtype(old.dtype).kind in "biu" \
            else None
        total = 1
        with open(path, "rb") as f, open(wide, "wb") as out:
            f.seek(HEADER_BYTES)
            out.write(_header(new, 0))
            for a in range(0, self.n, block):
                rows = min(block, self.n - a)
                chunk = np.fromfile(f, dtype=np.dtype(old.dtype),
                                    count=rows * int(np.prod(old.row_shape, dtype=np.int64)))
                chunk = chunk.reshape(rows, *old.row_shape)
                if via is not None:
                    chunk = chunk.astype(via)
                view = _bytes_of(chunk.astype(new.dtype))
                total = zlib.adler32(view, total)
                out.write(view)
        src.close()
        os.replace(wide, path)
        self._files[name] = open(path, "r+b")
        self._files[name].seek(0, os.SEEK_END)
        self._sums[name] = total
        self.specs = tuple(new if s.name == name else s for s in self.specs)

    def finish(self, meta: dict | None = None) -> Manifest:
        """Finalise the headers, write the manifest and publish the directory; returns the
        manifest of what ``directory`` now holds."""
        if self._done:
            raise RuntimeError("finish after finish/abort")
        if self.specs is None:
            raise ValueError(f"partition {self.part}: no arrays were appended; give specs= "
                             "for an empty partition")
        try:
            for s in self.specs:
                f = self._files.pop(s.name)
                f.seek(0)
                f.write(_header(s, self.n))
                f.close()
            manifest = Manifest(self.dataset, self.part, self.n, self.specs,
                                {k: f"adler32:{v:08x}" for k, v in self._sums.items()},
                                dict(meta or {}))
            _write_json(os.path.join(self._tmp, MANIFEST), manifest.to_json())
            try:
                os.rename(self._tmp, self.directory)
            except OSError:  # (ENOTEMPTY/EEXIST) published by an earlier attempt on this host
                existing = _load_manifest(self.directory)
                if existing is None:  # not ours or damaged (only a rename publishes): replace
                    shutil.rmtree(self.directory, ignore_errors=True)
                    os.rename(self._tmp, self.directory)
                    existing = manifest
                if not existing.same_data(manifest):
                    raise ValueError(
                        f"partition {self.part} of dataset {self.dataset} was built again "
                        f"with different rows than {self.directory} holds: the data's lineage "
                        "is not deterministic (e.g. an unseeded sample or an RDD.repartition "
                        "of unordered input); persist or checkpoint the input DataFrame/RDD "
                        "before fit") from None
                if existing is not manifest:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                manifest = existing
        except BaseException:
            self.abort()
            raise
        self._done = True
        return manifest

    def abort(self) -> None:
        """Drop what was written (idempotent)."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def _load_manifest(directory: str) -> Manifest | None:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return Manifest.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- reading ------------------------------------------------------------------------------------
class PartitionReader:
    """A stored partition, its arrays memory-mapped read-only.

    ``take(name, rows)`` copies the given rows (any order, repeats allowed) out of the map;
    ``rows(name, a, b)`` is a read-only view of a contiguous range (evaluation, prediction).
    Pages the process touched stay in its RSS while mapped: ``release()`` drops them from this
    process (they stay in the page cache), ``close()`` unmaps.
    """

    def __init__(self, directory: str, manifest: Manifest):
        self.directory, self.manifest = directory, manifest
        self._maps: dict = {}
        self._arrays: dict = {}

    @classmethod
    def open(cls, directory: str, *, dataset: str | None = None, part: int | None = None,
             expect: Manifest | None = None) -> "PartitionReader":
        """Open ``directory``; raise ``StoreMiss`` unless it holds a complete partition (of
        ``dataset``/``part``, with ``expect``'s data, when given)."""
        manifest = _load_manifest(directory)
        if manifest is None:
            raise _miss(f"{directory} holds no complete partition")
        if dataset is not None and manifest.dataset != dataset or \
                part is not None and manifest.part != part:
            raise _miss(f"{directory} holds partition {manifest.part} of dataset "
                        f"{manifest.dataset}, not {part} of {dataset}")
        if expect is not None and not expect.same_data(manifest):
            raise _miss(f"{directory} holds other data than its token names")
        reader = cls(directory, manifest)
        for s in manifest.specs:  # sizes now: a truncated file is a miss, not a bus error later
            path = os.path.join(directory, s.file)
            want = HEADER_BYTES + manifest.n * s.row_bytes
            try:
                size = os.path.getsize(path)
            except OSError:
                raise _miss(f"{path} is missing") from None
            if size != want:
                raise _miss(f"{path} has {size} bytes, expected {want}")
        return reader

    @property
    def n(self) -> int:
        return self.manifest.n

    @property
    def names(self) -> list:
        return self.manifest.names

    def array(self, name: str) -> np.ndarray:
        """The whole array ``name`` as a read-only view of the map (nothing read yet)."""
        a = self._arrays.get(name)
        if a is not None:
            return a
        s = self.manifest.spec(name)
        shape = (self.n, *s.row_shape)
        if self.n == 0 or s.row_bytes == 0:
            a = np.zeros(shape, np.dtype(s.dtype))
            a.flags.writeable = False
        else:
            path = os.path.join(self.directory, s.file)
            try:
                with open(path, "rb") as f:
                    descr, file_shape = _read_header(f)
                    if np.dtype(descr) != np.dtype(s.dtype) or tuple(file_shape) != shape:
                        raise _miss(f"{path} holds {descr} {file_shape}, the manifest "
                                    f"{s.dtype} {shape}")
                    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            except (OSError, ValueError, SyntaxError) as exc:
                raise _miss(f"{path} ({exc})") from None
            self._maps[name] = m
            a = np.frombuffer(m, dtype=np.dtype(s.dtype), count=int(np.prod(shape)),
                              offset=HEADER_BYTES).reshape(shape)
        self._arrays[name] = a
        return a

    def take(self, name: str, rows) -> np.ndarray:
        """A new array of the given rows of ``name`` (any order, repeats allowed).

        An array larger than ``PREAD_MIN_BYTES`` is read row by row with ``os.preadv`` into
        the new array, mapping nothing: a gather through the map would put the cached pages
        around every row read into this process's RSS too (the kernel's fault-around, which
        ``MADV_RANDOM`` does not turn off), most of the partition for a random batch. Smaller
        arrays are gathered from the map. The same bytes either way."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be a 1-d array of row indices, got shape {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"row indices must be in [0, {self.n}), got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        s = self.manifest.spec(name)
        if self.n * s.row_bytes <= PREAD_MIN_BYTES or s.row_bytes == 0:
            return self.array(name).take(rows, axis=0)
        out = np.empty((len(rows), *s.row_shape), np.dtype(s.dtype))
        dest = out.reshape(len(rows), -1).view(np.uint8)
        path = os.path.join(self.directory, s.file)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _miss(f"{path} ({exc})") from None
        try:
            rb = s.row_bytes
            for i, r in enumerate(rows.tolist()):
                if os.preadv(fd, [dest[i]], HEADER_BYTES + r * rb) != rb:
                    raise _miss(f"{path}: row {r} is cut short")
        finally:
            os.close(fd)
        return out

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``name``: a read-only view (no copy)."""
        return self.array(name)[start:stop]

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to read rows ``[start, stop)`` ahead (``MADV_WILLNEED``): a window
        of the epoch order's blocks, before its batches gather from it."""
        m = self._maps.get(name)
        if m is None:
            self.array(name)
            m = self._maps.get(name)
        if m is None or not hasattr(m, "madvise") or stop <= start:
            return
        rb = self.manifest.spec(name).row_bytes
        a = (HEADER_BYTES + start * rb) // mmap.PAGESIZE * mmap.PAGESIZE
        b = HEADER_BYTES + stop * rb
        m.madvise(mmap.MADV_WILLNEED, a, b - a)

    def release(self) -> None:
        """Drop the mapped pages from this process's RSS (they stay in the page cache)."""
        for m in self._maps.values():
            if hasattr(m, "madvise"):
                m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._arrays.clear()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a view: the map goes with it
                pass
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --- where the files live -------------------------------------------------------------------------
def store_roots() -> list:
    """The store's root directories on this executor: ``rddtensor-store`` in each of Spark's
    local directories for this worker (``SPARK_LOCAL_DIRS``; the driver's temp directory when
    called outside a Spark task)."""
    dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d]
    return [os.path.join(d, _STORE_DIR) for d in (dirs or [tempfile.gettempdir()])]


def partition_dir(dataset: str, part: int, roots=None) -> str:
    """Partition ``part``'s directory: partitions spread over the local directories (disks)."""
    roots = roots or store_roots()
    return os.path.join(roots[int(part) % len(roots)], dataset, f"p{int(part):05d}")


def remove_dataset(dataset: str, roots=None) -> None:
    """Remove a dataset's stored partitions under ``roots`` (default: this process's)."""
    for r in roots or store_roots():
        shutil.rmtree(os.path.join(r, dataset), ignore_errors=True)


# --- tokens: what the shard RDD caches instead of the rows ----------------------------------------
def token(directory: str, manifest: Manifest, **meta) -> bytes:
    """The cached record standing for a stored partition (``wire`` kind ``store``): host,
    directory and the manifest (plus the caller's ``meta``), a few hundred bytes whatever the
    partition's size."""
    return wire.pack(Kind.STORE, {**meta, "host": host_id(), "dir": os.path.abspath(directory),
                                  "manifest": manifest.to_json()})


def open_token(meta: dict) -> PartitionReader:
    """The partition a token (its ``wire`` meta) names, opened here; ``StoreMiss`` when it is
    not readable on this host."""
    if meta["host"] != host_id():
        raise _miss(f"{meta['dir']} was written on {meta['host']}, this task runs on "
                    f"{host_id()}")
    expect = Manifest.from_json(meta["manifest"])
    return PartitionReader.open(meta["dir"], dataset=expect.dataset, part=expect.part,
                                expect=expect)


def fingerprints(arrays: dict) -> dict:
    """``{name: fingerprint}`` of whole arrays, equal to what ``PartitionWriter`` records for
    the same rows however they were chunked (the inline shards' check after a rebuild)."""
    return {k: f"adler32:{zlib.adler32(_bytes_of(v)):08x}" for k, v in arrays.items()}


def _bytes_of(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes in C order, as a flat ``uint8`` array (no copy when contiguous; also for
    zero rows, which a ``memoryview`` cast refuses)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def new_dataset_id() -> str:
    """A name for one build of shards (a fit's training or validation data)."""
    return uuid.uuid4().hex[:16]
