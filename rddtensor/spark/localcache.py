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
same chunks (``wire.chunk_views``), so sums run in the same order over the same values.

Between hosts, with the peer transport (``rddtensor.spark.peers``, on by default on a cluster
of several hosts; ``spark.rddtensor.peerTransport=false`` turns it off), a record to a partition
on another host is a token too: the sender's Python worker serves the file, and the receiving
task fetches its bytes from there (``load``) instead of the JVM shuffle carrying them.

What a cache token can do is miss: the receiving task ran on another host that cannot fetch
it (e.g. an executor on another machine joined mid-job), or the file is gone (a task re-ran
from an older stage after its files were pruned, the memory filesystem was full or cleared).
A miss raises ``CacheMiss`` in the task; the engine then re-runs that job from its start state
(which is always inline: the cut state of a job never holds tokens) with the cache off, and
keeps it off for the rest of the fit (a miss of a record fetched from another host, message
prefix ``peers.MISS``: with the peer transport off, the cache on). So a miss costs one job's
time, never a result.

Layout: ``<root>/<run>/<kind>-<name>-<slot>``, two slots per kind and name (the sending
partition, or ``<src>-<dest>`` for a record only one destination reads): step ``t`` overwrites
slot ``t % 2`` in place (the step ``t - 2`` record, no longer needed: every task that reads a
step's records finishes before the stage that writes step ``t + 2`` starts, and a re-run of the
current stage still finds its inputs). Overwriting keeps the file's memory pages;
a new file per record cost more than the shuffle it replaces (every page allocated and zeroed
by the kernel). Each file starts with a stamp, the job and step
that wrote it, which ``load`` checks against the token: a record overwritten by a later step
(a task re-run from an older stage) is a miss, never a wrong record. The stamp is written last.
``drop_run`` removes a run's files at the end of a fit on the driver's host.

Ownership, so that a killed driver leaks nothing for long: the driver registers its run
(``register_run``, when the engine's runner starts, before any job can write a file) by holding
an exclusive ``flock`` on ``<root>/<run>/owner`` for the run's life; the file also names the
driver (pid, process start time, host) for ``rddtensor info``. The kernel releases the lock when
the process dies however it dies (SIGKILL, OOM killer), and a process id reused by another
program does not hold it. A fit that is ended by SIGTERM (``timeout``, cluster managers) removes
its own runs' files in a handler (installed while a run is registered, from the main thread
only; it then calls the handler it replaced, or terminates the process by SIGTERM as before);
an ``atexit`` hook removes them at interpreter exit. What a SIGKILL leaves is removed by the next
fit on the host: registering a run (and an executor's first write of a run) removes every run
directory whose owner lock is free, at once, and every directory with no owner file (an
executor's files on a host that is not the driver's, or a directory that predates this scheme)
once it has been untouched for an hour (a live run rewrites its files every step). A directory a
driver has just created and not yet claimed has no owner file and is new, so it is never taken.
Nor does a task on the driver's host make a registered run's directory anew once it is removed
(``CacheSettings.owner``): a task of a killed driver still writing for a moment gets no file.
``rddtensor info`` lists the run directories, their size, owner and whether it is alive
(``runs``); ``rddtensor info --clean-cache`` removes the stale ones now (``remove_stale``).
"""
from __future__ import annotations

import atexit
import fcntl
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time

from rddtensor.spark import peers, wire
from rddtensor.spark.config import CacheSettings, Kind

__all__ = ["CacheMiss", "MISS", "root", "host_id", "put", "served", "load", "expand",
           "register_run", "drop_run", "runs", "remove_stale"]

MISS = "rddtensor local cache miss"
"""The message prefix of ``CacheMiss``: the engine recognises a miss in a failed job by it."""

_STALE_SECONDS = 3600  # a run directory with no owner file is stale once untouched this long
_OWNER = "owner"  # <root>/<run>/owner: the driver's lock and pid (``register_run``)


class CacheMiss(RuntimeError):
    """A token's file is not on this host (or no longer exists)."""


def root() -> str:
    """The cache's directory: ``/dev/shm`` (memory) when writable, else the temp directory."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"rddtensor-{os.getuid()}")


_HOST = None


def host_id() -> str:
    """This machine: host name plus boot id (containers on different machines can share a
    host name), or ``RDDTENSOR_HOST_ID`` where set: the fake hosts of a test cluster on one
    machine (``rddtensor.spark.testing``) share both but not ``/dev/shm``, and name themselves so."""
    global _HOST
    if _HOST is None and os.environ.get("RDDTENSOR_HOST_ID"):
        _HOST = os.environ["RDDTENSOR_HOST_ID"]
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


def _home() -> str:
    """This host and cache directory: where a run's owner made its directory."""
    return f"{host_id()} {root()}"


def _run_dir(cache: CacheSettings) -> str:
    run = cache.run
    path = os.path.join(root(), run)
    if run not in _SEEN_RUNS:
        _SEEN_RUNS.add(run)
        # where the driver registered the run, its directory exists until the run ends: a
        # task still writing after that (its driver was killed) must not make it anew
        if cache.owner != _home():
            os.makedirs(path, exist_ok=True)
        _prune_stale_runs(run)
    return path


def _remove_run(path: str) -> None:
    """Remove a run directory, and the cache root with it once nothing else is left there
    (``rmdir`` takes an empty directory only: a run another process is writing keeps it)."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def _prune_stale_runs(current: str) -> list:
    """Remove the run directories other than ``current`` that no live process owns (see the
    module docstring); return what was removed (``runs``' records)."""
    removed = []
    for r in runs():
        if r["run"] != current and r["stale"]:
            _remove_run(r["path"])
            removed.append(r)
    return removed


def remove_stale() -> list:
    """Remove every run directory on this host that no live process owns: a killed driver's
    at once, one with no owner file once untouched for an hour (what the next fit's start
    removes anyway); return their records (``runs``)."""
    return _prune_stale_runs("")


def _start_time(pid: int):
    """A process's start time (clock ticks since boot), or ``None`` when it does not exist:
    with the pid it names one process, never a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner(path: str):
    """``(owner record or None, alive)`` of a run directory; ``alive`` is ``True``/``False``,
    or ``None`` when nobody on this host can tell (no owner file: an executor's directory, or
    one not yet claimed; an owner on another host)."""
    try:
        fd = os.open(os.path.join(path, _OWNER), os.O_RDONLY)
    except OSError:
        return None, None
    try:
        try:
            info = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            info = {}
        try:  # the owner holds this lock for the run's life; the kernel drops it at its death
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return info, False
        except BlockingIOError:
            return info, True
        except OSError:  # no locks on this filesystem: the owner's pid and start time tell
            if info.get("host") != host_id() or None in (info.get("pid"), info.get("start")):
                return info, None
            return info, _start_time(info["pid"]) == info.get("start")
    finally:
        os.close(fd)


def runs() -> list:
    """The run directories under ``root()`` on this host, one record each: ``run``, ``path``,
    ``bytes`` and ``files`` (the cache files), ``idle`` (seconds since the newest write),
    ``owner`` (the owner file's record: ``pid``, ``start``, ``host``, ``created``; ``None``
    without one), ``alive`` (``True``/``False``/``None``: cannot tell) and ``stale`` (whether
    the next fit's start removes it)."""
    base, now, out = root(), time.time(), []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        p = os.path.join(base, name)
        try:  # files are overwritten in place: the directory's own mtime does not move
            newest, size, files = os.path.getmtime(p), 0, 0
            for f in os.listdir(p):
                st = os.stat(os.path.join(p, f))
                newest = max(newest, st.st_mtime)
                if f != _OWNER and not f.startswith("."):
                    size, files = size + st.st_size, files + 1
        except OSError:  # not a directory, or removed meanwhile
            continue
        owner, alive = _owner(p)
        idle = now - newest
        out.append({"run": name, "path": p, "bytes": size, "files": files, "idle": idle,
                    "owner": owner, "alive": alive,
                    "stale": alive is False or (alive is None and idle > _STALE_SECONDS)})
    return out


# --- ownership: the driver's runs in this process ---------------------------------------------
_OWNED: dict = {}  # run -> the fd holding its owner lock
_LOCK = threading.Lock()
# "sigterm": the handler ours replaced, while ours is installed; "pid": the owning process
_HOOKS = {"atexit": False, "sigterm": None, "pid": None}


def register_run(run: str):
    """Make this process (the driver, as a fit starts) the owner of ``run`` on this host: its
    files are removed on SIGTERM and at exit, and by the next fit on the host once this
    process is gone however it ended; and remove what runs of dead owners left here.

    Returns the value for the run's ``CacheSettings.owner`` (``put``: a task on this host never
    makes the run's directory anew once it is removed), or ``None`` when the directory
    could not be made (every write will go inline)."""
    path = os.path.join(root(), run)
    with _LOCK:
        if run in _OWNED:
            return _home()
        fd = None
        try:
            os.makedirs(path, exist_ok=True)
            tmp = os.path.join(path, f".{_OWNER}-{os.getpid()}")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # no locks here: _owner falls back to the pid and its start time
                pass
            os.write(fd, json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()),
                                     "host": host_id(), "created": time.time()}).encode())
            os.rename(tmp, os.path.join(path, _OWNER))  # appears locked: never taken for dead
        except OSError:  # no cache directory: every write will go inline anyway
            if fd is not None:
                os.close(fd)
            return None
        _OWNED[run] = fd
        _HOOKS["pid"] = os.getpid()
        _SEEN_RUNS.add(run)
        if not _HOOKS["atexit"]:
            atexit.register(_remove_owned)
            _HOOKS["atexit"] = True
        _install_sigterm()
    _prune_stale_runs(run)
    return _home()


def _install_sigterm() -> None:
    if _HOOKS["sigterm"] is not None or threading.current_thread() is not threading.main_thread():
        return  # installed already; or not installable here (the next fit's start cleans up)
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return  # the process ignores SIGTERM: it does not end, nor do its runs
    signal.signal(signal.SIGTERM, _on_sigterm)
    _HOOKS["sigterm"] = signal.SIG_DFL if previous in (None, _on_sigterm) else previous


def _restore_sigterm() -> None:
    previous = _HOOKS["sigterm"]
    if (previous is None or _OWNED
            or threading.current_thread() is not threading.main_thread()):
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # (not if another replaced ours since)
        signal.signal(signal.SIGTERM, previous)
    _HOOKS["sigterm"] = None


def _on_sigterm(signum, frame):
    """Remove this process's runs' files, then do what SIGTERM did before: the replaced
    handler, or the default (the process terminates, by SIGTERM)."""
    previous = _HOOKS["sigterm"]
    _remove_owned()
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _remove_owned() -> None:
    # (no lock: this runs in a signal handler, maybe while this thread holds it)
    for run in list(_OWNED):
        if os.getpid() == _HOOKS["pid"]:  # (a child forked from the driver leaves them be)
            _remove_run(os.path.join(root(), run))
        fd = _OWNED.pop(run, None)
        if fd is not None:
            os.close(fd)


def put(cache: CacheSettings, kind: Kind, part, t: int, meta: dict, arrays: dict,
        bf16: tuple = (), serve: str | None = None):
    """Write a record (as ``wire.frames(kind, meta, arrays, bf16)``) to the cache; return its
    token record, or ``None`` when it could not be written (the caller sends it inline).

    ``cache`` is the job's settings from the driver (``run`` and ``job`` name and stamp the
    file, ``owner`` and ``evict``: see ``CacheSettings``). ``part`` names the file (a
    partition, or ``"<src>-<dest>"``). ``serve``: this host's address, when a task on
    another host will read the record: this process serves the file (``peers.serve``) and
    the token names where (``"addr"``; absent when no server could be started: the caller
    sends that task the record inline)."""
    kind = Kind(kind)
    path = os.path.join(root(), cache.run, f"{kind.value}-{part}-{t % 2}")
    try:
        _run_dir(cache)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b", buffering=0) as f:
            f.write(_STAMP.pack(-1, -1))  # invalid until the record is complete
            for frame in wire.frames(kind, meta, arrays, bf16):
                view = memoryview(frame).cast("B")
                while view.nbytes:  # (a raw file may write less than asked)
                    view = view[f.write(view):]
            size = f.tell()
            f.truncate()
            os.pwrite(fd, _STAMP.pack(cache.job, t), 0)
        if cache.evict:
            os.unlink(path)
    except OSError:  # e.g. the memory filesystem is full: the shuffle carries the record
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    token = {"host": host_id(), "path": path, "kind": kind.value, "job": cache.job, "t": t}
    if serve is not None:
        try:
            addr = peers.serve(serve, host_id(), cache.run, cache.key, os.path.dirname(path))
        except OSError:  # no server here: the other host's tasks get the record inline
            pass
        else:
            token.update(addr=list(addr), run=cache.run, key=cache.key, size=size)
    return wire.pack(Kind.LOCAL, token)


def served(token: bytes) -> bool:
    """Whether a token ``put`` made can be read on another host (the file is served)."""
    return "addr" in wire.unpack(token)[1]


def load(meta: dict):
    """The record a token names, as ``(kind, meta, arrays)`` with read-only views of the
    mapped file, or on another host views of the bytes fetched from the worker that serves it
    (``peers.fetch``); raises ``CacheMiss`` when it is not on this host and not served, or
    its file is gone or holds another step (on another host: with the message prefix
    ``peers.MISS``, like ``peers.PeerUnreachable`` when the host serving it cannot be
    reached)."""
    path = meta["path"]
    if meta["host"] != host_id():
        if "addr" not in meta:
            raise CacheMiss(f"{MISS}: {path} was written on {meta['host']}, this task runs on "
                            f"{host_id()}")
        try:
            buf = peers.fetch(meta["addr"], meta["host"], meta["run"], meta["key"],
                              os.path.basename(path), meta["size"], _STAMP.size)
        except peers.Gone as exc:
            # (a miss of the peer transport only: the engine turns that off, not the cache)
            raise CacheMiss(f"{peers.MISS}: {exc}") from None
        return _unpack(buf, meta, f"{path} on {meta['host']}", peers.MISS)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ,
                            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except (OSError, ValueError) as exc:  # gone, or empty
        raise CacheMiss(f"{MISS}: {path} ({exc})") from None
    return _unpack(buf, meta, path)


def _unpack(buf, meta: dict, where: str, miss: str = MISS):
    """The record in a file's bytes, once its stamp matches the token's (else a ``CacheMiss``
    whose message starts with ``miss``)."""
    if len(buf) < _STAMP.size:
        raise CacheMiss(f"{miss}: {where} is empty")
    stamp = _STAMP.unpack_from(buf, 0)
    if stamp != (meta["job"], meta["t"]):
        raise CacheMiss(f"{miss}: {where} holds job {stamp[0]} step {stamp[1]}, the token "
                        f"names job {meta['job']} step {meta['t']}")
    return wire.unpack(memoryview(buf)[_STAMP.size:])


def expand(token_meta: dict):
    """The chunks ``(kind, meta, x)`` of the record a token names: the same slices the shuffle
    would have delivered (``wire.chunk_views``)."""
    kind, meta, arrays = load(token_meta)
    for m, x in wire.chunk_views(meta, arrays):
        yield kind, m, x


def drop_run(run: str) -> None:
    """Remove a run's cache files on this host (the driver's, at the end of a fit; the cache
    root too once no run is left) and, when this process owns it, release it
    (``register_run``)."""
    _remove_run(os.path.join(root(), run))
    with _LOCK:
        fd = _OWNED.pop(run, None)
        if fd is not None:
            os.close(fd)
        _restore_sigterm()
