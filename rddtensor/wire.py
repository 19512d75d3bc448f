"""Records that cross the shuffle: raw bytes, never pickled arrays.

A record is ``[u32 header length][JSON header][array payloads]``. The header names the record's
kind, small metadata and each array's dtype, shape and offset. ``unpack`` returns zero-copy
(read-only) NumPy views into the received bytes, so a 40 MB parameter block costs one memcpy to
send and none to receive.
"""
from __future__ import annotations

import json
import struct

import numpy as np

_LEN = struct.Struct("<I")
_ALIGN = 16


def pack(kind: str, meta: dict | None = None, arrays: dict | None = None) -> bytes:
    """Encode ``kind``, JSON-able ``meta`` and NumPy ``arrays`` into one bytes record."""
    arrays = arrays or {}
    specs, offset, parts = [], 0, []
    for name, a in arrays.items():
        a = np.asarray(a)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            a = a.copy(order="C")
        pad = (-offset) % _ALIGN
        if pad:
            parts.append(b"\0" * pad)
            offset += pad
        specs.append([name, a.dtype.str, list(a.shape), offset])
        parts.append(memoryview(a).cast("B") if a.size else b"")
        offset += a.nbytes
    header = json.dumps({"k": kind, "m": meta or {}, "a": specs}, separators=(",", ":")).encode()
    return b"".join([_LEN.pack(len(header)), header, *parts])


def unpack(buf) -> tuple[str, dict, dict]:
    """Decode a record into ``(kind, meta, arrays)``; arrays are read-only views of ``buf``."""
    (n,) = _LEN.unpack_from(buf, 0)
    header = json.loads(bytes(buf[_LEN.size:_LEN.size + n]))
    base = _LEN.size + n
    arrays = {}
    for name, dtype, shape, offset in header["a"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(buf, dtype=dt, count=count, offset=base + offset).reshape(tuple(shape))
    return header["k"], header["m"], arrays


def kind_of(buf) -> str:
    """The record's kind without decoding its arrays ("" for an empty padding record)."""
    if len(buf) == 0:
        return ""
    (n,) = _LEN.unpack_from(buf, 0)
    return json.loads(bytes(buf[_LEN.size:_LEN.size + n]))["k"]


PAD = b""
