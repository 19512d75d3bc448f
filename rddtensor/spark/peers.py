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

Failures: a file the peer does not have (gone, overwritten, a wrong key) is ``Gone``, and a
peer that cannot be reached (its worker or executor is gone, a firewall between executors) is
``PeerUnreachable``; ``localcache`` raises both with the message prefix ``MISS``, and the
engine re-runs the job with the peer transport off for the rest of the fit (records between
hosts go through the shuffle again) and keeps the host-local cache. A peer that does not
answer counts as unreachable after ``CONNECT_TIMEOUT`` seconds to connect or ``TIMEOUT``
seconds without a byte; Spark retries the task (``spark.task.maxFailures``) before the job
fails and the engine falls back, so a black-holed peer costs a few such waits once per fit.

Who may read: the server binds the executor's own address (the host name Spark's block
manager gives it: where it cannot bind it, it does not serve and the record goes inline) and
answers only requests that name its host (``localcache.host_id``) and carry the run's key
(``CacheSettings.key``: random per fit, made by the driver) for a plain file name in that
run's directory. The bytes travel in clear, like Spark's shuffle without
``spark.network.crypto.enabled``; the engine turns the transport off when Spark's
authentication or encryption is on.

The server lives as long as the Python worker process (Spark reuses a worker for many tasks,
``spark.python.worker.reuse``, the default; without it the engine turns the transport off):
a daemon thread that accepts connections, one thread per connection. A receiving task keeps
one connection per peer for the process's life. A worker that exits between the pass that
wrote a record and the one that reads it (Spark stops idle workers of an executor after a
minute without tasks; a failed task ends its worker) takes its server with it: the reader
finds the peer unreachable, and the fit goes on through the shuffle.
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
import time

import numpy as np

__all__ = ["MISS", "PeerUnreachable", "Gone", "serve", "fetch"]

MISS = "rddtensor peer transfer failed"
"""The message prefix of ``PeerUnreachable``: the engine recognises it in a failed job."""

CONNECT_TIMEOUT = 10.0  # seconds to connect to a peer before it counts as unreachable
TIMEOUT = 120.0  # seconds a receiving task waits for a peer's next bytes
IDLE = 600.0  # seconds a server keeps a connection that sends no request
_MAX_REQUEST = 4096  # bytes of a request's JSON

_LEN = struct.Struct("<I")  # request: [u32 length][JSON {"run", "key", "name", "check"}]
_SIZE = struct.Struct("<q")  # reply: [i64 size or an error code][size bytes][check bytes]
_NO_FILE, _REFUSED = -1, -2
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a file name of a run directory, no path
_NOT_SERVED = ("owner",)  # (the driver's lock file: its pid and host)


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
    def __init__(self, host: str, me: str):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # (raises OSError where ``host`` is not this machine's: then nothing is served)
        self.sock = socket.create_server((host, 0), family=family, backlog=128)
        self.address = (host, self.sock.getsockname()[1])
        self.pid, self.me = os.getpid(), me
        self.runs: dict = {}  # run -> (directory, key)
        self.alive = True
        threading.Thread(target=self._accept, name="rddtensor-peers", daemon=True).start()

    def _accept(self):
        try:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.ECONNABORTED):
                        continue
                    if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: wait
                        time.sleep(0.1)
                        continue
                    return
                try:
                    threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
                except RuntimeError:  # no thread to spare: the client sees it closed
                    conn.close()
        finally:  # (the next ``serve`` starts a new server)
            self.alive = False
            self.sock.close()

    def _handle(self, conn):
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(IDLE)
                while True:
                    head = conn.recv(_LEN.size, socket.MSG_WAITALL)
                    if len(head) < _LEN.size:
                        return  # the client is done
                    (n,) = _LEN.unpack(head)
                    if n > _MAX_REQUEST:
                        return
                    conn.settimeout(TIMEOUT)
                    self._send(conn, json.loads(_recv_exact(conn, n)))
                    conn.settimeout(IDLE)
            except Exception:  # a broken or malformed connection: the client sees it closed
                return

    def _send(self, conn, req: dict) -> None:
        entry = self.runs.get(req["run"])
        name, check = str(req["name"]), int(req["check"])
        if (entry is None or not 0 <= check <= 64 or req.get("host") != self.me
                or not hmac.compare_digest(entry[1], str(req["key"]))
                or not _NAME.fullmatch(name) or name in _NOT_SERVED):
            conn.sendall(_SIZE.pack(_REFUSED))
            return
        try:
            fd = os.open(os.path.join(entry[0], name), os.O_RDONLY | os.O_NOFOLLOW)
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


def serve(host: str, me: str, run: str, key: str, directory: str) -> tuple:
    """Serve ``run``'s files in ``directory`` to requests with ``key`` that name host ``me``
    (``localcache.host_id``), from this process, on ``host`` (this executor's address); returns
    the ``(host, port)`` to put in tokens. The first call in a process starts the server.
    Raises ``OSError`` when it cannot serve (no socket on ``host``, no key)."""
    if len(key) < 16:
        raise OSError("no key to serve with")
    with _LOCK:
        server = _SERVERS.get(host)
        # (a forked child has no accept thread; a server whose thread ended is closed)
        if server is None or server.pid != os.getpid() or not server.alive:
            server = _SERVERS[host] = _Server(host, me)
        server.runs[run] = (directory, key)
        return server.address


# --- the client, in the receiving task -----------------------------------------------------------
_CONNS: dict = {}  # (host, port) -> (pid, a connected socket)
_BUFFERS: dict = {}  # a file's name without its slot -> the reused receive buffer


def _buffer(name: str, size: int) -> np.ndarray:
    """A byte buffer for the file ``name``, reused across tasks (a fresh one faults in every
    page again) and across its two slots (``<kind>-<part>-<slot>``): a task reads one record
    per kind and sender (one step's), whose arrays are views of it until the next task."""
    k = name.rsplit("-", 1)[0]
    buf = _BUFFERS.get(k)
    if buf is None or buf.size != size:
        _BUFFERS.pop(k, None)
        buf = _BUFFERS[k] = np.empty(size, np.uint8)
    return buf


def _drop(addr) -> None:
    got = _CONNS.pop(addr, None)
    if got is not None:
        try:
            got[1].close()
        except OSError:
            pass


def _connection(addr):
    """``(socket, fresh)``: the kept connection to ``addr`` (this process's), or a new one."""
    got = _CONNS.get(addr)
    if got is not None and got[0] == os.getpid():
        return got[1], False
    _CONNS.pop(addr, None)  # (a forked child must not share its parent's stream)
    sock = socket.create_connection(addr, timeout=CONNECT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(TIMEOUT)
    except OSError:
        sock.close()
        raise
    _CONNS[addr] = (os.getpid(), sock)
    return sock, True


def fetch(addr, host: str, run: str, key: str, name: str, size: int, check: int) -> memoryview:
    """The bytes of file ``name`` of ``run`` (``size`` bytes, as written) from the peer at
    ``addr`` on host ``host`` (``localcache.host_id``), as a (writable) view of a buffer this
    process reuses for that file. ``check``: the length of the file's leading stamp, which the
    peer sends again once the file is sent; they must agree.

    Raises ``Gone`` when the peer does not hold the file (or holds another size), refused the
    request, or the file changed while it was sent; ``PeerUnreachable`` when the peer cannot be
    reached or breaks off. A connection kept from an earlier task that turns out closed is made
    anew once (not one that timed out)."""
    addr = (str(addr[0]), int(addr[1]))
    req = json.dumps({"run": run, "key": key, "name": name, "check": check,
                      "host": host}).encode()
    for attempt in (0, 1):
        sock = None
        try:
            sock, fresh = _connection(addr)
            sock.sendall(_LEN.pack(len(req)) + req)
            (got,) = _SIZE.unpack(_recv_exact(sock, _SIZE.size))
        except OSError as exc:  # (ConnectionError and socket.timeout are OSErrors)
            _drop(addr)
            if sock is None or fresh or attempt or isinstance(exc, socket.timeout):
                raise PeerUnreachable(f"{MISS}: {addr[0]}:{addr[1]} ({name}): "
                                      f"{type(exc).__name__}: {exc}") from None
            continue
        if got == _REFUSED:
            raise Gone(f"{addr[0]}:{addr[1]} refused {name} of run {run} (not its host or key)")
        if got < 0:
            raise Gone(f"{addr[0]}:{addr[1]} holds no {name} of run {run}")
        try:
            if got != size:  # (the payload is not read: the stream is dropped below)
                raise Gone(f"{addr[0]}:{addr[1]} holds {got} bytes of {name}, the token "
                           f"names {size}")
            view = memoryview(_buffer(name, size))
            _recv_into(sock, view)
            again = _recv_exact(sock, check)
        except OSError as exc:
            _drop(addr)
            raise PeerUnreachable(f"{MISS}: {addr[0]}:{addr[1]} ({name}): "
                                  f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # (anything else mid-stream: the stream is out of step)
            _drop(addr)
            raise
        if bytes(view[:check]) != again:
            raise Gone(f"{name} of run {run} changed while {addr[0]}:{addr[1]} sent it")
        return view
    raise AssertionError("unreachable")
