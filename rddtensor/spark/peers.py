"""Records between hosts without the JVM shuffle: the host-local cache's files served to the
tasks of other hosts (the *peer transport*).

Within a host, a record one training task sends another is written once to the host-local
cache (``rddtensor.spark.localcache``) and the shuffle carries a small token naming the file.
Across hosts the shuffle used to carry the record itself: Python worker -> JVM (a socket), a
shuffle file, the JVM's block transfer to the other host, JVM -> Python worker (a socket again):
four copies of every byte and the JVMs' time. With the peer transport the sender still writes
the file once; the token also names the address of a small server in the sender's Python worker
(``serve``), and the receiving task fetches the file from it (``fetch``: ``os.sendfile`` out of
the memory filesystem on one side, ``recv_into`` a reused buffer on the other).

Nothing here changes a result: the receiver gets the very bytes of the file, which hold exactly
the record the shuffle would have carried, and ``localcache`` checks the file's stamp (the job
and step that wrote it) as for a file of its own host. The server also sends the stamp again
after the file, read once the file is sent: a file overwritten while it was being sent (a task
re-run from an older stage) is a miss, never a wrong record.

Failures: a file the peer does not have (gone, overwritten, a wrong key) is ``Gone``, which
``localcache`` turns into its ``CacheMiss`` (the engine re-runs the job without the cache). A
peer that cannot be reached (its worker or executor is gone, a firewall between executors)
raises ``PeerUnreachable`` (message prefix ``MISS``): the engine re-runs the job with the peer
transport off for the rest of the fit (records between hosts go through the shuffle again)
and keeps the host-local cache.

Who may read: the server binds the executor's own address (the one Spark's block manager
names) and answers only requests that carry the run's key (``CacheSettings.key``: random per
fit, made by the driver) for a plain file name in that run's directory.

The server lives as long as the Python worker process (Spark reuses a worker for many tasks,
``spark.python.worker.reuse``, the default): a daemon thread that accepts connections, one
thread per connection. A receiving task keeps one connection per peer for the process's life.
"""
from __future__ import annotations

import errno
import hmac
import json
import os
import re
import socket
import struct
import threading

import numpy as np

__all__ = ["MISS", "PeerUnreachable", "Gone", "serve", "fetch"]

MISS = "rddtensor peer transfer failed"
"""The message prefix of ``PeerUnreachable``: the engine recognises it in a failed job."""

TIMEOUT = 120.0  # seconds a receiving task waits on a peer before it counts as unreachable

_LEN = struct.Struct("<I")  # request: [u32 length][JSON {"run", "key", "name", "check"}]
_SIZE = struct.Struct("<q")  # reply: [i64 size or an error code][size bytes][check bytes]
_NO_FILE, _REFUSED = -1, -2
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a file name of a run directory, no path


class PeerUnreachable(RuntimeError):
    """The peer that holds a record could not be reached (or broke off mid-transfer)."""


class Gone(LookupError):
    """The peer was reached but does not hold the record (any more) or refused the key."""


def _recv_exact(sock, n: int) -> bytes:
    out = bytearray(n)
    _recv_into(sock, memoryview(out))
    return bytes(out)


def _recv_into(sock, view) -> None:
    got = 0
    while got < view.nbytes:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the peer closed the connection")
        got += k


# --- the server, in the sending worker ---------------------------------------------------------
class _Server:
    def __init__(self, host: str):
        try:
            self.sock = socket.create_server((host, 0), backlog=128)
        except OSError:  # (e.g. a name that resolves to no local interface): every interface
            self.sock = socket.create_server(("", 0), backlog=128)
        self.address = (host, self.sock.getsockname()[1])
        self.pid = os.getpid()
        self.runs: dict = {}  # run -> (directory, key)
        threading.Thread(target=self._accept, name="rddtensor-peers", daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    continue
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    head = conn.recv(_LEN.size, socket.MSG_WAITALL)
                    if len(head) < _LEN.size:
                        return  # the client is done
                    req = json.loads(_recv_exact(conn, _LEN.unpack(head)[0]))
                    self._send(conn, req)
            except (OSError, ValueError, KeyError, TypeError):
                return  # a broken or malformed connection: the client sees it closed

    def _send(self, conn, req: dict) -> None:
        entry = self.runs.get(req["run"])
        name, check = str(req["name"]), int(req["check"])
        if (entry is None or not hmac.compare_digest(entry[1], str(req["key"]))
                or not _NAME.fullmatch(name)):
            conn.sendall(_SIZE.pack(_REFUSED))
            return
        try:
            fd = os.open(os.path.join(entry[0], name), os.O_RDONLY)
        except OSError:
            conn.sendall(_SIZE.pack(_NO_FILE))
            return
        try:
            size = os.fstat(fd).st_size
            conn.sendall(_SIZE.pack(size))
            sent = 0
            while sent < size:
                k = os.sendfile(conn.fileno(), fd, sent, size - sent)
                if not k:  # the file shrank meanwhile: pad; its stamp below will not match
                    conn.sendall(bytes(size - sent))
                    break
                sent += k
            conn.sendall(os.pread(fd, check, 0).ljust(check, b"\0"))
        finally:
            os.close(fd)


_SERVERS: dict = {}  # host -> _Server of this process
_LOCK = threading.Lock()


def serve(host: str, run: str, key: str, directory: str) -> tuple:
    """Serve ``run``'s files in ``directory`` to requests with ``key`` from this process, on
    ``host`` (this executor's address); returns the ``(host, port)`` to put in tokens. The first
    call in a process starts the server (raises ``OSError`` when no socket can be made)."""
    with _LOCK:
        server = _SERVERS.get(host)
        if server is None or server.pid != os.getpid():  # (a forked child has no thread)
            server = _SERVERS[host] = _Server(host)
        server.runs[run] = (directory, key)
        return server.address


# --- the client, in the receiving task -----------------------------------------------------------
_CONNS: dict = {}  # (host, port) -> a connected socket
_BUFFERS: dict = {}  # (host, port, name) -> the reused receive buffer


def _buffer(addr, name: str, size: int) -> np.ndarray:
    """A byte buffer for ``name`` from ``addr``, reused across tasks (a fresh one faults in
    every page again): the arrays of one task's records are views of it until the next."""
    k = (*addr, name)
    buf = _BUFFERS.get(k)
    if buf is None or buf.size != size:
        buf = _BUFFERS[k] = np.empty(size, np.uint8)
    return buf


def _drop(addr) -> None:
    sock = _CONNS.pop(addr, None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def fetch(addr, run: str, key: str, name: str, check: int) -> memoryview:
    """The bytes of file ``name`` of ``run`` from the peer at ``addr``, as a (writable) view of
    a buffer this process reuses for that file. ``check``: the length of the file's leading
    stamp, which the peer sends again once the file is sent; they must agree.

    Raises ``Gone`` when the peer does not hold the file, refused the key, or the file changed
    while it was sent; ``PeerUnreachable`` when the peer cannot be reached. A connection kept
    from an earlier task that turns out broken is made anew once."""
    addr = (str(addr[0]), int(addr[1]))
    req = json.dumps({"run": run, "key": key, "name": name, "check": check}).encode()
    for attempt in (0, 1):
        sock = _CONNS.get(addr)
        fresh = sock is None
        try:
            if sock is None:
                sock = socket.create_connection(addr, timeout=TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _CONNS[addr] = sock
            sock.sendall(_LEN.pack(len(req)) + req)
            (size,) = _SIZE.unpack(_recv_exact(sock, _SIZE.size))
            if size == _REFUSED:
                raise Gone(f"{addr[0]}:{addr[1]} refused {name} of run {run} (not its key)")
            if size < 0:
                raise Gone(f"{addr[0]}:{addr[1]} holds no {name} of run {run}")
            buf = _buffer(addr, name, size)
            view = memoryview(buf)
            _recv_into(sock, view)
            again = _recv_exact(sock, check)
        except Gone:
            raise
        except OSError as exc:  # (ConnectionError, socket.timeout are OSErrors)
            _drop(addr)
            if fresh or attempt:
                raise PeerUnreachable(f"{MISS}: {addr[0]}:{addr[1]} ({name}): "
                                      f"{type(exc).__name__}: {exc}") from None
            continue
        if bytes(view[:check]) != again:
            raise Gone(f"{name} of run {run} changed while {addr[0]}:{addr[1]} sent it")
        return view
    raise AssertionError("unreachable")
