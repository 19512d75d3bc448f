"""Host-local delivery of the records training tasks send each other within a Spark job.

Of the bytes an iteration pushes through Spark's shuffle, a large share never leaves its
partition: the owner's block of θ and its optimizer slots ride from one pass to the next, and
each partition's gradient for its own block goes to itself. And when every task of a job runs
on one machine (a local master, ``local-cluster``, a one-machine cluster: the driver checks per
job, ``engine.one_host``), the records between partitions never leave that machine either. A
shuffle moves all of them through the JVM, a socket each way and a shuffle file, like bytes
that cross the network. Within a Spark job the engine instead writes such a record once to a
file under ``/dev/shm`` (memory) and shuffles a small *token* naming the file to each
destination (``stages.deliver``); the task that receives a token reads the file.

What a token never changes is the result: the file holds exactly the record the shuffle would
have carried (bfloat16 rounding included), and ``expand`` presents it to the receiver as the
same chunks (``wire.chunk_views``), so sums run in the same order over the same values. What it
can do is miss: the receiving task ran on another host (e.g. an executor on another machine
joined mid-job), or the file is gone (a task re-ran from an older stage after its files were
pruned, the memory filesystem was full or cleared). A miss raises ``CacheMiss`` in the task; the engine then re-runs that job from its start state (which
is always inline: the cut state of a job never holds tokens) with the cache off, and keeps it off
for the rest of the fit. So a miss costs one job's time, never a result.

Layout: ``<root>/<run>/<kind>-<name>-<slot>``, two slots per kind and name (the sending
partition, or ``<src>-<dest>`` for a record only one destination reads): step ``t`` overwrites
slot ``t % 2`` in place (the step ``t - 2`` record, no longer needed: every task that reads a
step's records finishes before the stage that writes step ``t + 2`` starts, and a re-run of the
current stage still finds its inputs). Overwriting keeps the file's memory pages;
a new file per record cost more than the shuffle it replaces here (every page allocated and
zeroed by the kernel: ~370 MB/s on this VM). Each file starts with a stamp, the job and step
that wrote it, which ``load`` checks against the token: a record overwritten by a later step
(a task re-run from an older stage) is a miss, never a wrong record. The stamp is written last.
``drop_run`` removes a run's files at the end of a fit on the driver's host; run directories
left on other hosts are removed by the next run that finds them untouched for an hour.
"""
from __future__ import annotations

import mmap
import os
import shutil
import socket
import struct
import tempfile
import time

from rddtensor import wire

__all__ = ["CacheMiss", "MISS", "root", "host_id", "put", "load", "expand", "drop_run"]

MISS = "rddtensor local cache miss"
"""The message prefix of ``CacheMiss``: the engine recognises a miss in a failed job by it."""

_STALE_SECONDS = 3600


class CacheMiss(RuntimeError):
    """A token's file is not on this host (or no longer exists)."""


def root() -> str:
    """The cache's directory: ``/dev/shm`` (memory) when writable, else the temp directory."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"rddtensor-{os.getuid()}")


_HOST = None


def host_id() -> str:
    """This machine: host name plus boot id (containers on different machines can share a
    host name)."""
    global _HOST
    if _HOST is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        _HOST = f"{socket.gethostname()}/{boot}"
    return _HOST


_STAMP = struct.Struct("<qq")  # (job, step), 16 bytes: the record after it stays 16-aligned
_SEEN_RUNS: set = set()  # run directories this worker has made


def _run_dir(run: str) -> str:
    path = os.path.join(root(), run)
    if run not in _SEEN_RUNS:
        _SEEN_RUNS.add(run)
        os.makedirs(path, exist_ok=True)
        _prune_stale_runs(run)
    return path


def _prune_stale_runs(current: str) -> None:
    base = root()
    now = time.time()
    for name in os.listdir(base):
        p = os.path.join(base, name)
        try:  # files are overwritten in place: the directory's own mtime does not move
            newest = max([os.path.getmtime(p)] + [os.path.getmtime(os.path.join(p, f))
                                                  for f in os.listdir(p)])
            if name != current and now - newest > _STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def put(local: dict, kind: str, part: int, t: int, meta: dict, arrays: dict,
        bf16: tuple = ()):
    """Write a record (as ``wire.frames(kind, meta, arrays, bf16)``) to the cache; return its
    token record, or ``None`` when it could not be written (the caller sends it inline).

    ``local`` is the job's cache settings from the driver: ``run``, ``job``, ``peers``
    (whether records between partitions may use the cache: ``stages.deliver``) and optionally
    ``evict`` (fault injection: the file is deleted at once, so every read misses). ``part``
    names the file (a partition, or ``"<src>-<dest>"``)."""
    path = os.path.join(root(), local["run"], f"{kind}-{part}-{t % 2}")
    try:
        _run_dir(local["run"])
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b", buffering=0) as f:
            f.write(_STAMP.pack(-1, -1))  # invalid until the record is complete
            for frame in wire.frames(kind, meta, arrays, bf16):
                view = memoryview(frame).cast("B")
                while view.nbytes:  # (a raw file may write less than asked)
                    view = view[f.write(view):]
            f.truncate()
            os.pwrite(fd, _STAMP.pack(local["job"], t), 0)
        if local.get("evict"):
            os.unlink(path)
    except OSError:  # e.g. the memory filesystem is full: the shuffle carries the record
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return wire.pack("local", {"host": host_id(), "path": path, "kind": kind,
                               "job": local["job"], "t": t})


def load(meta: dict):
    """The record a token names, as ``(kind, meta, arrays)`` with read-only views of the
    mapped file; raises ``CacheMiss`` when it is not on this host."""
    path = meta["path"]
    if meta["host"] != host_id():
        raise CacheMiss(f"{MISS}: {path} was written on {meta['host']}, this task runs on "
                        f"{host_id()}")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ,
                            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except (OSError, ValueError) as exc:  # gone, or empty
        raise CacheMiss(f"{MISS}: {path} ({exc})") from None
    stamp = _STAMP.unpack_from(buf, 0)
    if stamp != (meta["job"], meta["t"]):
        raise CacheMiss(f"{MISS}: {path} holds job {stamp[0]} step {stamp[1]}, the token "
                        f"names job {meta['job']} step {meta['t']}")
    return wire.unpack(memoryview(buf)[_STAMP.size:])


def expand(token_meta: dict):
    """The chunks ``(kind, meta, x)`` of the record a token names: the same slices the shuffle
    would have delivered (``wire.chunk_views``)."""
    kind, meta, arrays = load(token_meta)
    for m, x in wire.chunk_views(meta, arrays):
        yield kind, m, x


def drop_run(run: str) -> None:
    """Remove a run's cache files on this host (the driver's, at the end of a fit)."""
    shutil.rmtree(os.path.join(root(), run), ignore_errors=True)
