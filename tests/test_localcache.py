"""The host-local cache (``rddtensor.spark.localcache``): a token stands for exactly the chunks the
shuffle would have carried, and anything that cannot be read is a ``CacheMiss``, never a wrong
or partial record."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest

from rddtensor.spark import localcache, rawrdd, wire
from rddtensor.spark.config import CacheSettings, Kind
from rddtensor.spark.stages import raws_of, split_records, to_self


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setattr(localcache, "root", lambda: str(tmp_path / "cache"))
    localcache._SEEN_RUNS.clear()
    return tmp_path / "cache"


def _arrays(n=200_000):
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=n).astype(np.float32), "slot.m": rng.normal(size=n).astype(np.float32)}


def _decoded(records):
    return [(k, m, np.array(x)) for k, m, x, _ in split_records(records)[0]]


@pytest.mark.parametrize("bf16", [(), ("w",)])
def test_token_expands_to_the_chunks_the_shuffle_carries(cache_root, bf16):
    arrays, meta = _arrays(), {"i": 1, "t": 5, "lo": 0, "hi": 200_000}
    cache = CacheSettings(run="r1", job=1)
    token = list(to_self(cache, Kind.OWN, 1, 5, meta, arrays, bf16))
    assert len(token) == 1 and len(token[0]) < 500  # a small record instead of 1.6 MB
    inline = [wire.pack(*wire.unpack(b"".join(bytes(memoryview(p).cast("B")) for p in r)))
              for r in wire.chunks(Kind.OWN, meta, arrays, bf16)]
    got, want = _decoded(token), _decoded(inline)
    assert len(got) == len(want) > 2  # several chunks per array
    for (k1, m1, x1), (k2, m2, x2) in zip(got, want):
        assert k1 == k2 == "own" and m1 == m2
        np.testing.assert_array_equal(x1, x2)  # bfloat16 rounding included
    # forwarding a token sends it once, however many chunks it stands for
    assert list(raws_of(split_records(token)[0], Kind.OWN)) == token


def test_missing_file_or_other_host_is_a_cache_miss(cache_root):
    cache = CacheSettings(run="r2", job=1)
    token = localcache.put(cache, Kind.GRAD, 0, 3, {"src": 0, "t": 3}, {"g": np.ones(10, np.float32)})
    _, meta, _ = wire.unpack(token)
    elsewhere = {**meta, "host": "other-host/boot"}
    with pytest.raises(localcache.CacheMiss, match="written on other-host"):
        list(localcache.expand(elsewhere))
    os.unlink(meta["path"])
    with pytest.raises(localcache.CacheMiss, match=localcache.MISS):
        split_records([token])
    evicted = localcache.put(replace(cache, evict=True), Kind.GRAD, 1, 3, {}, {"g": np.ones(3)})
    with pytest.raises(localcache.CacheMiss):
        split_records([evicted])


def test_unwritable_cache_sends_the_record_inline(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(localcache, "root", lambda: str(blocker))
    localcache._SEEN_RUNS.clear()
    recs = list(to_self(CacheSettings(run="r3", job=1), Kind.GRAD, 0, 1, {"src": 0, "t": 1},
                        {"g": np.arange(5, dtype=np.float32)}))
    assert wire.unpack(b"".join(bytes(p) for p in recs[0]))[0] == "grad"  # chunks, no token
    assert to_self(None, Kind.GRAD, 0, 1, {}, {"g": np.ones(2)}) is not None


def test_two_slots_per_kind_overwritten_in_place_and_stale_tokens_miss(cache_root):
    def put(job, t, value):
        return localcache.put(CacheSettings(run="r4", job=job), Kind.GRAD, 0, t, {"t": t},
                              {"g": np.full(4, value, np.float32)})

    tokens = [put(1, t, t) for t in range(5)]
    assert sorted(os.listdir(cache_root / "r4")) == ["grad-0-0", "grad-0-1"]
    for t in (3, 4):  # the newest two steps are readable
        (_, _, x, _), = split_records([tokens[t]])[0]
        np.testing.assert_array_equal(x, np.full(4, t, np.float32))
    with pytest.raises(localcache.CacheMiss, match="holds job 1 step 4, the token names job 1 step 2"):
        split_records([tokens[2]])  # its slot now holds step 4: a miss, not step 4's values
    put(2, 4, 40)  # the same step written again by a later job (e.g. a replay)
    with pytest.raises(localcache.CacheMiss, match="holds job 2 step 4"):
        split_records([tokens[4]])
    localcache.put(CacheSettings(run="r5", job=1), Kind.GRAD, 0, 1, {}, {"g": np.ones(2)})
    localcache.drop_run("r4")
    assert not (cache_root / "r4").exists()
    assert (cache_root / "r5").exists()  # another run keeps the cache root
    localcache.drop_run("r5")
    assert not cache_root.exists()  # the last run leaves no empty root behind in /dev/shm


def test_stale_runs_are_removed_but_live_ones_kept(cache_root):
    live = localcache.put(CacheSettings(run="live", job=1), Kind.GRAD, 0, 1, {}, {"g": np.ones(2)})
    old = cache_root / "old"
    old.mkdir(parents=True)
    (old / "grad-0-0").write_bytes(b"x")
    past = time.time() - 2 * 3600
    os.utime(old / "grad-0-0", (past, past))
    os.utime(old, (past, past))
    live_dir = cache_root / "live"
    os.utime(live_dir, (past, past))  # a live run's directory mtime stays old: its files move
    localcache._SEEN_RUNS.clear()
    localcache.put(CacheSettings(run="new", job=1), Kind.GRAD, 0, 1, {}, {"g": np.ones(2)})
    assert not old.exists() and live_dir.exists()
    assert len(split_records([live])[0]) == 1


def _raw(record) -> bytes:
    """A record as the bytes a receiver gets (chunk records are lists of frames)."""
    if isinstance(record, (bytes, bytearray)):
        return bytes(record)
    return b"".join(bytes(memoryview(p).cast("B")) for p in record)


@pytest.mark.parametrize("peers, tokens", [((), {1}), ((0, 0, 0), {0, 1, 2}),
                                           ((0, 1, 1), {1, 2}), ((1, 0, 1), {1})])
def test_deliver_writes_once_and_tokens_only_where_the_cache_reaches(cache_root, peers, tokens):
    """Tokens go to the partition itself and to the others on its host (``peers``: each
    partition's host; ``()``: not known), chunks to the rest."""
    from rddtensor.spark.stages import deliver
    g = np.arange(300_000, dtype=np.float32)
    meta = {"src": 1, "t": 7}
    out = list(deliver(CacheSettings(run="r5", job=1, peers=peers), Kind.RGRAD, 1, 7, meta,
                       {"g": g}, range(3)))
    by_dest: dict = {}
    for key, rec in zip(out[::2], out[1::2]):
        by_dest.setdefault(key, []).append(_raw(rec))
    assert len(by_dest) == 3
    got = {d for d, recs in by_dest.items() if wire.unpack(recs[0])[0] == "local"}
    # itself always through the cache; the other partitions too when they share the host
    assert got == {rawrdd.key(d) for d in tokens}
    assert os.listdir(cache_root / "r5") == ["rgrad-1-1"]  # one file, however many readers
    want = _decoded([_raw(r) for r in wire.chunks(Kind.RGRAD, meta, {"g": g})])
    for recs in by_dest.values():  # every destination gets the same chunks, either way
        got = _decoded(recs)
        assert [m for _, m, _ in got] == [m for _, m, _ in want]
        np.testing.assert_array_equal(np.concatenate([x for *_, x in got]), g)
    assert list(deliver(None, Kind.RGRAD, 1, 7, meta, {"g": g[:4]}, [0]))[1] is not None
