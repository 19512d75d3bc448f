"""The peer transport (``rddtensor.spark.peers``): a record to a partition on another host is a
token of the host-local cache that the receiving task fetches from the sending worker. It
delivers exactly the chunks the shuffle would have carried; anything it cannot deliver is a
``CacheMiss`` (the file is gone, changed, or the key is wrong) or ``PeerUnreachable`` (nobody
serves it), never a wrong or partial record. Runs without Spark: both "hosts" are this
process, told apart by ``localcache.host_id``; the multi-host cluster tests
(``tests/test_multihost.py``) run it between real executors."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from rddtensor.spark import localcache, peers, rawrdd, wire
from rddtensor.spark.config import CacheSettings, Kind
from rddtensor.spark.stages import deliver, split_records

HOSTS = ("127.0.0.1", "127.0.0.1")  # both hosts' addresses: the servers of this process


@pytest.fixture()
def host_a(tmp_path, monkeypatch):
    """The cache under a temp directory; this process is host A until ``on_host_b``."""
    monkeypatch.setattr(localcache, "root", lambda: str(tmp_path / "cache"))
    monkeypatch.setattr(localcache, "_HOST", "host-a")
    localcache._SEEN_RUNS.clear()
    return tmp_path / "cache"


def on_host_b(monkeypatch):
    monkeypatch.setattr(localcache, "_HOST", "host-b")


def _raw(record) -> bytes:
    if isinstance(record, (bytes, bytearray)):
        return bytes(record)
    return b"".join(bytes(memoryview(p).cast("B")) for p in record)


def _by_dest(out) -> dict:
    got: dict = {}
    for key, rec in zip(out[::2], out[1::2]):
        got.setdefault(key, []).append(_raw(rec))
    return got


def _decoded(records):
    return [(k, m, np.array(x)) for k, m, x, _ in split_records(records)[0]]


def _cache(run="p1", job=1, key="k" * 32, **kw):
    # partitions 0, 1 on host A (index 0), partition 2 on host B (index 1)
    return CacheSettings(run=run, job=job, key=key, peers=(0, 0, 1), addrs=HOSTS, **kw)


@pytest.mark.parametrize("bf16", [(), ("g",)])
def test_a_record_to_another_host_is_a_token_that_fetches_the_same_chunks(host_a, monkeypatch,
                                                                          bf16):
    g = np.random.default_rng(0).normal(size=700_003).astype(np.float32)  # 11 chunks
    meta = {"src": 1, "t": 4}
    out = list(deliver(_cache(), Kind.RGRAD, 1, 4, meta, {"g": g}, range(3), bf16))
    recs = _by_dest(out)
    # every destination, the one on host B too, gets one small token of one file
    assert all(len(r) == 1 and len(r[0]) < 600 for r in recs.values())
    assert wire.unpack(recs[rawrdd.key(2)][0])[1]["addr"][0] == "127.0.0.1"
    assert sorted(p.name for p in (host_a / "p1").iterdir()) == ["rgrad-1-0"]
    want = _decoded([_raw(r) for r in wire.chunks(Kind.RGRAD, meta, {"g": g}, bf16)])
    on_host_b(monkeypatch)
    got = _decoded(recs[rawrdd.key(2)])  # fetched from host A's server
    assert [m for _, m, _ in got] == [m for _, m, _ in want] and len(got) == 11
    for (_, _, x), (_, _, y) in zip(got, want):
        np.testing.assert_array_equal(x, y)  # bit for bit, bfloat16 rounding included
    assert len(_decoded(recs[rawrdd.key(2)])) == 11  # fetched again, on the kept connection


def test_without_the_transport_other_hosts_get_the_record_inline(host_a):
    g = np.arange(10, dtype=np.float32)
    plain = CacheSettings(run="p2", job=1, peers=(0, 0, 1))  # addrs (): transport off
    recs = _by_dest(list(deliver(plain, Kind.RGRAD, 1, 4, {"src": 1, "t": 4}, {"g": g},
                                 range(3))))
    assert wire.unpack(recs[rawrdd.key(2)][0])[0] == "rgrad"  # chunks
    assert wire.unpack(recs[rawrdd.key(0)][0])[0] == "local"  # same host: a token
    token = wire.unpack(recs[rawrdd.key(0)][0])[1]
    assert "addr" not in token and "key" not in token  # nothing served


def test_a_server_that_cannot_start_sends_other_hosts_the_record_inline(host_a, monkeypatch):
    def no_socket(*a, **k):
        raise OSError("no sockets here")
    monkeypatch.setattr(peers, "serve", no_socket)
    recs = _by_dest(list(deliver(_cache(run="p3"), Kind.RGRAD, 0, 4, {"src": 0, "t": 4},
                                 {"g": np.ones(5, np.float32)}, range(3))))
    assert wire.unpack(recs[rawrdd.key(2)][0])[0] == "rgrad"
    assert wire.unpack(recs[rawrdd.key(1)][0])[0] == "local"


def _served_token(cache, t=4, value=1.0):
    out = list(deliver(cache, Kind.GRAD, 0, t, {"src": 0, "t": t, "blk": 2},
                       {"g": np.full(64, value, np.float32)}, [2], file="0-2"))
    return _raw(out[1])


def test_what_cannot_be_fetched_is_a_miss_never_a_wrong_record(host_a, monkeypatch):
    cache = _cache(run="p4")
    token = _served_token(cache)
    newer = _served_token(cache, t=6, value=2.0)  # step 6 overwrote step 4's slot
    evicted = _served_token(_cache(run="p5", evict=True))
    on_host_b(monkeypatch)
    # (a miss of the transport: the engine turns the transport off, not the cache)
    with pytest.raises(localcache.CacheMiss, match=f"^{peers.MISS}: .* holds job 1 step 6, "
                                                   "the token names job 1 step 4"):
        split_records([token])
    np.testing.assert_array_equal(_decoded([newer])[0][2], 2.0)
    meta = wire.unpack(newer)[1]
    with pytest.raises(localcache.CacheMiss, match="refused"):
        split_records([wire.pack(Kind.LOCAL, {**meta, "key": "y" * 32})])
    with pytest.raises(localcache.CacheMiss, match="holds no grad-0-2-0"):
        split_records([evicted])


def test_a_peer_nobody_serves_is_unreachable(host_a, monkeypatch):
    token = wire.unpack(_served_token(_cache(run="p6")))[1]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    on_host_b(monkeypatch)
    gone = wire.pack(Kind.LOCAL, {**token, "addr": ["127.0.0.1", port]})
    with pytest.raises(peers.PeerUnreachable, match=peers.MISS):
        split_records([gone])
    # (a token that names no server, from a run without the transport, misses as before)
    plain = wire.pack(Kind.LOCAL, {k: v for k, v in token.items() if k != "addr"})
    with pytest.raises(localcache.CacheMiss, match="written on host-a"):
        split_records([plain])


def test_a_kept_connection_the_peer_closed_is_made_anew(host_a, monkeypatch):
    token = _served_token(_cache(run="p7"))
    on_host_b(monkeypatch)
    assert len(_decoded([token])) == 1
    addr = tuple(wire.unpack(token)[1]["addr"])
    peers._CONNS[addr][1].shutdown(socket.SHUT_RDWR)  # as if the peer had closed it
    np.testing.assert_array_equal(_decoded([token])[0][2], 1.0)


@pytest.mark.parametrize("name", ["../etc-passwd", "", ".owner", "owner", "a/b"])
def test_the_server_serves_plain_file_names_of_the_run_only(host_a, name):
    token = wire.unpack(_served_token(_cache(run="p8")))[1]
    size = token["size"]
    with pytest.raises(peers.Gone, match="refused"):
        peers.fetch(token["addr"], "host-a", "p8", token["key"], name, size, 16)
    with pytest.raises(peers.Gone, match="refused"):
        peers.fetch(token["addr"], "host-a", "no-such-run", token["key"], "grad-0-2-0", size, 16)
    with pytest.raises(peers.Gone, match="refused"):  # a token of another host, same port
        peers.fetch(token["addr"], "host-c", "p8", token["key"], "grad-0-2-0", size, 16)
    with pytest.raises(peers.Gone, match=f"holds {size} bytes of grad-0-2-0, the token names "
                                         f"{size + 1}"):
        peers.fetch(token["addr"], "host-a", "p8", token["key"], "grad-0-2-0", size + 1, 16)
    got = peers.fetch(token["addr"], "host-a", "p8", token["key"], "grad-0-2-0", size, 16)
    assert got.nbytes == size  # (the connection stays in step after a refusal)


def test_a_request_too_long_is_dropped_and_the_server_keeps_serving(host_a):
    token = wire.unpack(_served_token(_cache(run="p9")))[1]
    with socket.create_connection(tuple(token["addr"])) as s:
        s.sendall(peers._LEN.pack(1 << 30))  # 1 GiB of JSON announced: closed at once
        assert s.recv(8) == b""
    got = peers.fetch(token["addr"], "host-a", "p9", token["key"], "grad-0-2-0",
                      token["size"], 16)
    assert got.nbytes == token["size"]


def test_an_address_this_host_does_not_have_serves_nothing(host_a):
    """The driver's idea of the host is out of date (the task ran elsewhere): no server binds
    another machine's address, and the other hosts get the record inline."""
    cache = CacheSettings(run="p10", job=1, key="k" * 32, peers=(0, 1),
                          addrs=("192.0.2.123", "127.0.0.1"))  # (TEST-NET-1: not this host)
    recs = _by_dest(list(deliver(cache, Kind.RGRAD, 0, 4, {"src": 0, "t": 4},
                                 {"g": np.ones(5, np.float32)}, range(2))))
    assert wire.unpack(recs[rawrdd.key(1)][0])[0] == "rgrad"
    assert wire.unpack(recs[rawrdd.key(0)][0])[0] == "local"


def test_a_cache_that_cannot_be_written_sends_everyone_the_record_inline(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(localcache, "root", lambda: str(blocker))
    localcache._SEEN_RUNS.clear()
    for g in (np.ones(5, np.float32), np.ones(300_000, np.float32)):  # one chunk, several
        recs = _by_dest(list(deliver(_cache(run="p11"), Kind.RGRAD, 0, 4, {"src": 0, "t": 4},
                                     {"g": g}, range(3))))
        assert all(wire.unpack(r[0])[0] == "rgrad" for r in recs.values())
        assert len({tuple(r) for r in recs.values()}) == 1  # the same chunks to everyone


def test_cache_settings_serve_only_across_hosts():
    c = _cache()
    assert c.serves(0, 1) is None and c.serves(0, 0) is None  # same host
    assert c.serves(0, 2) == "127.0.0.1" and c.serves(2, 0) == "127.0.0.1"
    assert CacheSettings(run="r", peers=(0, 1)).serves(0, 1) is None  # no addresses: off
