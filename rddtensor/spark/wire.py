"""Records that cross the shuffle: raw bytes, never pickled arrays.

A record is ``[u32 header length][JSON header][array payloads]``. The header names the record's
kind, small metadata and each array's dtype, shape and offset. ``unpack`` returns zero-copy
(read-only) NumPy views into the received bytes, so a 40 MB parameter block costs one memcpy to
send and none to receive. Optionally float32 arrays travel as bfloat16 (half the bytes; BigDL's
wire compression): the engine uses it for gradients and for the parameter copies it sends to
non-owners when ``fit(..., wire_dtype="bfloat16")``; owners keep float32 master weights.
"""
from __future__ import annotations

import enum
import json
import struct

import numpy as np

_LEN = struct.Struct("<I")
_ALIGN = 16


BF16 = "bf16"  # a float32 array sent as its top 16 bits (round to nearest even): half the bytes


def to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def from_bf16(h) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    out = np.empty(h.shape, np.uint32)
    np.left_shift(h, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def pack(kind: str, meta: dict | None = None, arrays: dict | None = None,
         bf16: tuple = ()) -> bytes:
    """Encode ``kind``, JSON-able ``meta`` and NumPy ``arrays`` into one bytes record.

    ``kind`` is a ``str`` (the engine's are ``rddtensor.spark.config.Kind`` members: their
    ``.value`` is written, so ``unpack`` returns it as a plain ``str``). Arrays named in ``bf16`` travel as bfloat16 and are float32 again after ``unpack``.
    """
    return b"".join(frames(kind, meta, arrays, bf16))


def frames(kind: str, meta: dict | None = None, arrays: dict | None = None,
           bf16: tuple = ()) -> list:
    """``pack``'s record as a list of buffers (the header, then views of the arrays): what a
    stage yields to send a record without copying the arrays into one ``bytes`` first
    (``rddtensor.spark.rawrdd.RawFrames`` writes them back to back). The arrays must not change
    until the stage's generator resumes."""
    if isinstance(kind, enum.Enum):
        kind = kind.value
    arrays = arrays or {}
    specs, offset, parts = [], 0, []
    for name, a in arrays.items():
        a = np.asarray(a)
        dtype_tag = None
        if name in bf16:
            a, dtype_tag = to_bf16(a), BF16
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            a = a.copy(order="C")
        pad = (-offset) % _ALIGN
        if pad:
            parts.append(b"\0" * pad)
            offset += pad
        specs.append([name, dtype_tag or a.dtype.str, list(a.shape), offset])
        parts.append(memoryview(a).cast("B") if a.size else b"")
        offset += a.nbytes
    header = json.dumps({"k": kind, "m": meta or {}, "a": specs}, separators=(",", ":")).encode()
    header += b" " * ((-(_LEN.size + len(header))) % _ALIGN)  # arrays start 16-byte aligned
    return [_LEN.pack(len(header)) + header, *parts]


def unpack(buf) -> tuple[str, dict, dict]:
    """Decode a record into ``(kind, meta, arrays)``; arrays are read-only views of ``buf``."""
    (n,) = _LEN.unpack_from(buf, 0)
    header = json.loads(bytes(buf[_LEN.size:_LEN.size + n]))
    base = _LEN.size + n
    arrays = {}
    for name, dtype, shape, offset in header["a"]:
        dt = np.dtype(np.uint16 if dtype == BF16 else dtype)
        count = int(np.prod(shape, dtype=np.int64))
        a = np.frombuffer(buf, dtype=dt, count=count, offset=base + offset).reshape(tuple(shape))
        arrays[name] = from_bf16(a) if dtype == BF16 else a
    return header["k"], header["m"], arrays


PAD = b""

# --- chunked arrays --------------------------------------------------------------------------
CHUNK_BYTES = 1 << 18
"""Array data per chunk record (256 KiB). Parameter-sized arrays cross Spark in chunks: the JVM
holds every record as one ``byte[]``, and G1 allocates arrays over half a heap region (512 KiB
on a 1 GiB heap) as "humongous" objects that go straight to the old generation: 40 MB records
cost a full-heap concurrent cycle every few iterations and a 400 MB one does not fit a 1 GiB
driver at all. A 256 KiB chunk is an ordinary short-lived young-generation object."""


def chunks(kind: str, meta: dict, arrays: dict, bf16: tuple = ()):
    """Records (``frames``) carrying ``arrays`` in pieces of at most ``CHUNK_BYTES`` each.

    Each record holds one slice ``x`` of one array's flattened values, with ``meta`` plus
    ``name`` (the array), ``at`` (the slice's first element) and ``size`` (the array's length);
    an empty array still sends one (empty) record. ``Chunks`` puts them back together.
    """
    for m, x in chunk_views(meta, arrays):
        yield frames(kind, m, {"x": x}, bf16=("x",) if m["name"] in bf16 else ())


def chunk_views(meta: dict, arrays: dict):
    """``(chunk meta, slice)`` for each chunk ``chunks`` would send of ``arrays`` (views, no
    copy): one definition of the chunk boundaries, shared with ``rddtensor.spark.localcache``."""
    for name, a in arrays.items():
        flat = np.ascontiguousarray(a).reshape(-1)
        step = max(CHUNK_BYTES // max(flat.itemsize, 1), 1)
        for at in range(0, max(flat.size, 1), step):
            yield {**meta, "name": name, "at": at, "size": int(flat.size)}, flat[at:at + step]


class Chunks:
    """Chunk records of one kind grouped by ``(source, array name)``: put back or summed.

    ``add(meta, x)`` files a received slice (a view; nothing is copied until ``into`` or
    ``sum_into``). ``src`` names the sender in multi-sender kinds (gradients), else 0.
    """

    def __init__(self):
        self.parts: dict = {}   # (src, name) -> {at: x}
        self.sizes: dict = {}   # (src, name) -> declared size
        self.meta: dict | None = None

    def add(self, meta: dict, x) -> None:
        k = (meta.get("src", 0), meta["name"])
        self.parts.setdefault(k, {})[meta["at"]] = x
        self.sizes[k] = meta["size"]
        self.meta = meta

    def names(self) -> list:
        return sorted({name for _, name in self.parts})

    def sources(self) -> list:
        return sorted({src for src, _ in self.parts})

    def _complete(self, k):
        got = self.parts.get(k)
        if got is None:
            raise RuntimeError(f"no chunks of {k[1]!r} from source {k[0]}")
        if sum(x.size for x in got.values()) != self.sizes[k]:
            raise RuntimeError(f"chunks of {k[1]!r} from source {k[0]} cover "
                               f"{sum(x.size for x in got.values())} of {self.sizes[k]} values")
        return got

    def into(self, name: str, out=None, offset: int = 0, src=0):
        """Array ``name`` (from ``src``) written into ``out[offset:]`` (a new array if None)."""
        got = self._complete((src, name))
        if out is None:
            first = next(iter(got.values()))
            out = np.empty(self.sizes[(src, name)], first.dtype)
        for at, x in got.items():
            out[offset + at:offset + at + x.size] = x
        return out

    def sum_into(self, name: str, out):
        """``out`` = the sum over sources of array ``name``, added in source order (so the
        result is bit-identical whatever order the chunks arrived in)."""
        srcs = self.sources()
        parts = [self._complete((s, name)) for s in srcs]
        for at, x in parts[0].items():
            seg = out[at:at + x.size]
            seg[...] = x
            for p in parts[1:]:
                seg += p[at]
        return out
