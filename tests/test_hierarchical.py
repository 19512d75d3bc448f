"""The hierarchical all-reduce (``rddtensor.spark.hierarchical``) without Spark: the delegate
choice, the fixed summation order, and whole iterations of its passes run here, task function
by task function, with the shuffle simulated (records routed by key, delivered in a random
order) and the host-local cache in a temporary directory.

The fake cluster is 4 partitions on 2 hosts (``peers`` ``(0, 0, 1, 1)``); every partition is
in this process, so a token would be readable anywhere: the tests check instead that tokens
only ever go between partitions of one host, and count the bytes that go between hosts.
(On a real two-host cluster: ``tests/test_multihost.py``.)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark import localcache, rawrdd, wire
from rddtensor.spark import allreduce as AR
from rddtensor.spark.config import CacheSettings, Iteration, Kind, StepConfig
from rddtensor.spark.hierarchical import Hierarchical, HostMap, sharded_cross_host_values
from rddtensor.spark.stages import read_own, split_records
from rddtensor.training.batching import batch_sizes
from rddtensor.training.params import block_bounds

PEERS = (0, 0, 1, 1)


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setattr(localcache, "root", lambda: str(tmp_path / "cache"))
    localcache._SEEN_RUNS.clear()
    return tmp_path / "cache"


# --- the delegates and the order of the sums ---------------------------------------------------
def test_delegates_spread_a_hosts_remote_blocks_over_its_partitions():
    hm = HostMap(PEERS)
    # host 0 (partitions 0, 1) delegates blocks 2, 3 of host 1, one each, and vice versa
    assert [hm.delegate(0, i) for i in (2, 3)] == [0, 1]
    assert [hm.delegate(1, i) for i in (0, 1)] == [2, 3]
    assert [hm.delegated(d) for d in range(4)] == [[2], [3], [0], [1]]
    # a slice goes to its owner on the same host, else to its own host's delegate
    assert [[hm.route(j, i) for i in range(4)] for j in range(4)] == [
        [0, 1, 0, 1], [0, 1, 0, 1], [2, 3, 2, 3], [2, 3, 2, 3]]
    # owner 0 adds partitions 0, 1 (its host, in order), then host 1's sum (source 4 + 1)
    assert hm.contributors(0) == [0, 1, 5] and hm.contributors(3) == [2, 3, 4]

    uneven = HostMap((1, 0, 1, 0, 0))  # host 0: 1, 3, 4; host 1: 0, 2 (hosts interleaved)
    assert uneven.delegated(1) == [0] and uneven.delegated(3) == [2]  # host 0: blocks 0, 2
    assert [uneven.delegate(1, i) for i in (1, 3, 4)] == [0, 2, 0]    # round-robin, in order
    for d in range(5):  # every slice stays on its sender's host
        for i in range(5):
            assert uneven.host(uneven.route(d, i)) == uneven.host(d)
    # the same peers give the same map: the driver and every task agree
    assert HostMap((1, 0, 1, 0, 0))._delegate == uneven._delegate


@pytest.mark.parametrize("peers", [(), (0, 0, 0, 0), (0, 1, 2, 3), (0, 0, 1)])
def test_no_hierarchy_where_it_has_nothing_to_offer(peers):
    """Hosts not known, one host for all, one partition per host, or a map of the wrong
    size: ``HostMap.of`` is None and ``Hierarchical`` runs ``Sharded``'s passes."""
    cache = CacheSettings(run="r", job=1, peers=peers)
    assert HostMap.of(cache, 4) is None
    assert HostMap.of(None, 4) is None
    it = Iteration(_step(), cache, cut=False)
    assert Hierarchical().plan(it, None, block_bounds(40, 4), None) is None
    assert HostMap.of(CacheSettings(run="r", peers=PEERS), 4) is not None


def test_partial_sums_add_in_source_order_whatever_the_arrival_order():
    """``wire.Chunks.sum_into`` adds in source order: a host's partial sum and an owner's
    sum of slices and partial sums are bit-identical however the chunks arrive, and equal
    the left-to-right sum in ``HostMap.contributors`` order."""
    rng = np.random.default_rng(0)
    n = 70_000  # > one chunk (65536 float32)
    parts = {s: (rng.normal(size=n) * 10.0 ** rng.integers(-4, 4)).astype(np.float32)
             for s in (0, 1, 5)}
    records = []
    for s, g in parts.items():
        records += [(m, x) for m, x in wire.chunk_views({"src": s, "t": 0, "blk": 0}, {"g": g})]
    want = (parts[0] + parts[1]) + parts[5]
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(records))
        got = wire.Chunks()
        for k in order:
            got.add(*records[k])
        out = got.sum_into("g", np.empty(n, np.float32))
        np.testing.assert_array_equal(out, want)
    assert got.sources() == HostMap(PEERS).contributors(0)


def test_cost_description():
    P, n = 1_000_000, 4
    # one copy per host: half of sharded's cross-host values with 2 partitions per host
    assert sharded_cross_host_values(P, n, 2) == AR.Sharded.values(P, n, 2, 0)[0] == P
    assert Hierarchical.cross_host_values(P, n, 2, 0) == P / 2
    assert Hierarchical.cross_host_values(P, 8, 2, 0) == sharded_cross_host_values(P, 8, 2) / 4
    # the cut iteration's θ goes out flat; a gradient-only hierarchy halves one way
    assert P / 2 < Hierarchical.cross_host_values(P, n, 2, 0, iterations_per_job=4) < P
    assert Hierarchical.cross_host_values(P, n, 2, 0, host_gather=False) == 0.75 * P
    # nothing to gain: one host, one partition per host
    assert Hierarchical.values(P, n, 1, 2) == AR.Sharded.values(P, n, 1, 2)
    assert Hierarchical.values(P, n, 4, 2) == AR.Sharded.values(P, n, 4, 2)
    cross, local = Hierarchical.values(P, n, 2, 2)
    assert cross == P / 2 and local > AR.Sharded.values(P, n, 2, 2)[1]
    assert (Hierarchical.passes, AR.Sharded.passes) == (4, 2)
    assert Hierarchical.passes_per_iteration(1) == 3 and Hierarchical.passes_per_iteration(4) == 3.75


def test_registered_wherever_allreduce_names_are_checked():
    from rddtensor.ml.params import ALLREDUCE, _allreduce
    assert AR.STRATEGIES["hierarchical"] is Hierarchical
    assert issubclass(Hierarchical, AR.Sharded) and Hierarchical.name == "hierarchical"
    assert "hierarchical" in ALLREDUCE and _allreduce("hierarchical") == "hierarchical"
    m = _model()
    m.build((5,))
    assert isinstance(AR.choose("hierarchical", m, 4), Hierarchical)
    with pytest.raises(ValueError, match="'hierarchical'"):
        AR.choose("tree", m, 4)


# --- whole iterations, the shuffle simulated -----------------------------------------------------
rng = np.random.default_rng(21)
X = rng.normal(size=(240, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 3] + 0.5 * X[:, 1] > 0).astype(np.int64)
FIT = dict(epochs=2, batch_size=60, shuffle=True, seed=3, verbose=0)
JOB = 4  # iterations per job: 8 steps, 2 jobs


def _model():
    m = L.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(2)], seed=7)
    m.compile(optimizer=Adam(0.02), loss="sparse_categorical_crossentropy")
    return m


def _step(n_total=240, batch_size=60, n=4):
    per = n_total // n
    return StepConfig(n_total=n_total, batch_size=batch_size, seed=FIT["seed"], shuffle=True,
                      offsets=tuple(range(0, n_total, per)), t0=0,
                      batch_sizes=tuple(batch_sizes(n_total, batch_size).tolist()))


class _Acc:
    def add(self, stats):
        pass


def _bytes(record) -> bytes:
    if isinstance(record, (bytes, bytearray)):
        return bytes(record)
    return b"".join(bytes(memoryview(p).cast("B")) for p in record)


class _Shuffle:
    """Routes ``key(dest), record`` pairs to partitions (in a random order per partition, as a
    shuffle may deliver them) and counts what goes between hosts."""

    def __init__(self, n, peers, seed):
        self.n, self.peers = n, peers
        self.rng = np.random.default_rng(seed)
        self.cross_bytes = 0
        self.cross_tokens = 0

    def run(self, outputs):
        """``outputs[j]``: partition j's output stream -> each partition's input records."""
        inbox = [[] for _ in range(self.n)]
        for j, stream in enumerate(outputs):
            it = iter(stream)
            for k in it:
                rec = _bytes(next(it))  # (as RawFrames: written before the task goes on)
                d = rawrdd._KEY.unpack(k)[0]
                if self.peers[d] != self.peers[j]:
                    self.cross_bytes += len(rec)
                    self.cross_tokens += wire.unpack(rec)[0] == Kind.LOCAL
                inbox[d].append(rec)
        for box in inbox:
            self.rng.shuffle(box)
        return inbox


def _simulate(strategy, shuffle_seed, cache_on=True, peers=PEERS, steps=8, job=JOB):
    """``steps`` training steps of ``strategy`` on 4 partitions, jobs of ``job`` iterations
    (each job's last iteration cut), all passes run here: ``(θ, slots, t, shuffle, the final
    cut state's records per partition)``."""
    n = 4
    model = _model()
    model.build((5,))
    model.init_slots()
    task = model.task_copy(freeze_optimizer=True)
    bounds = block_bounds(model.layout.size, n)
    step = _step()
    per = 240 // n
    shards = [wire.pack(Kind.SHARD, {"j": j, "n": per, "id": "sim"},
                        {"X": X[j * per:(j + 1) * per], "y": Y[j * per:(j + 1) * per]})
              for j in range(n)]
    sh = _Shuffle(n, PEERS, shuffle_seed)  # (where the partitions are, known or not)
    outputs = [AR.Sharded.emit_state(i, 0, bounds, model.theta[a:z].copy(),
                                     {k: v[a:z].copy() for k, v in model.slots.items()})
               for i, (a, z) in enumerate(bounds)]
    for s in range(steps):
        cache = (CacheSettings(run="sim", job=s // job + 1, peers=peers) if cache_on
                 else None)
        it = Iteration(step, cache, cut=s % job == job - 1, homes=True)
        plan = strategy.plan(it, task, bounds, _Acc()) if hasattr(strategy, "plan") else None
        if plan is None:  # Sharded's two passes
            plan = [(AR.Sharded._gradient(it, task, bounds, _Acc()), True),
                    (AR.Sharded()._update(task, bounds, step.wire_bf16, it.state_cache), False)]
        for run, data in plan:
            inbox = sh.run(outputs)
            outputs = [run(j, inbox[j] + ([shards[j]] if data else [])) for j in range(n)]
    inbox = sh.run(outputs)
    theta = np.empty(model.layout.size, np.float32)
    slots = {}
    t = None
    for i in range(n):
        meta, w, sl = read_own(split_records(inbox[i])[0])
        theta[meta["lo"]:meta["hi"]] = w
        for k, v in sl.items():
            slots.setdefault(k, np.empty(model.layout.size, np.float32))[meta["lo"]:meta["hi"]] = v
        t = meta["t"]
    return theta, slots, t, sh, inbox


@pytest.fixture(scope="module")
def reference():
    m = _model()
    m.fit(X, Y, **FIT)
    return m


def test_hierarchical_iterations_equal_in_process_and_are_bit_reproducible(cache_root, reference):
    """Two jobs of 4 iterations on 2 hosts x 2 partitions: the weights equal in-process
    training (the tolerance of ``test_multihost``), bit-identical whatever order the records
    arrive in; tokens never cross hosts, the cut state is inline and flat (``Sharded``'s: own
    block + every θ block to every partition), and about half of ``Sharded``'s bytes cross
    between hosts."""
    theta, slots, t, sh, final = _simulate(Hierarchical(), shuffle_seed=1)
    assert t == reference.step == 8
    np.testing.assert_allclose(theta, reference.theta, rtol=1e-5, atol=1e-7)
    assert sh.cross_tokens == 0
    for j, box in enumerate(final):  # the cut state: no tokens, all blocks, own block once
        kinds = [wire.unpack(r) for r in box]
        assert all(k != Kind.LOCAL for k, _, _ in kinds)
        assert sorted({m["i"] for k, m, _ in kinds if k == Kind.THETA} | {j}) == [0, 1, 2, 3]
        assert {m["i"] for k, m, _ in kinds if k == Kind.OWN} == {j}

    again, slots2, _, sh2, _ = _simulate(Hierarchical(), shuffle_seed=2)
    np.testing.assert_array_equal(again, theta)
    for k in slots:
        np.testing.assert_array_equal(slots2[k], slots[k])

    flat, _, _, shs, _ = _simulate(AR.Sharded(), shuffle_seed=3)
    np.testing.assert_allclose(flat, reference.theta, rtol=1e-5, atol=1e-7)
    assert shs.cross_tokens == 0
    ratio = sh.cross_bytes / shs.cross_bytes
    print(f"bytes between hosts: hierarchical {sh.cross_bytes}, sharded {shs.cross_bytes} "
          f"({ratio:.2f})")
    # per job: 4 gradient passes at 1/2, 3 host all-gathers at 1/2, the cut's flat: 9/16
    assert 0.45 < ratio < 0.65


def test_gradient_only_hierarchy_and_fallbacks_match(cache_root, reference):
    """``host_gather=False`` (θ flat every iteration), the cache off, and peers unknown all
    give the in-process weights; the last two are exactly ``Sharded``'s, bit for bit."""
    grad_only, _, _, sh, _ = _simulate(Hierarchical(host_gather=False), shuffle_seed=4)
    np.testing.assert_allclose(grad_only, reference.theta, rtol=1e-5, atol=1e-7)
    assert sh.cross_tokens == 0
    flat, _, _, _, _ = _simulate(AR.Sharded(), shuffle_seed=5, peers=())
    off, _, _, _, _ = _simulate(Hierarchical(), shuffle_seed=6, cache_on=False)
    unknown, _, _, _, _ = _simulate(Hierarchical(), shuffle_seed=7, peers=())
    np.testing.assert_array_equal(off, flat)
    np.testing.assert_array_equal(unknown, flat)


def test_bf16_wire_trains_close(cache_root, reference):
    """With ``wire_dtype="bfloat16"`` the partial sums cross as bfloat16 too: close to the
    float32 weights, and still bit-reproducible."""
    def run(seed):
        h = Hierarchical()
        step = _step()
        orig = h.plan

        def plan(it, model, bounds, acc):
            return orig(dataclasses.replace(it, step=dataclasses.replace(step, wire_bf16=True)),
                        model, bounds, acc)
        h.plan = plan
        return _simulate(h, shuffle_seed=seed)[0]
    a, b = run(8), run(9)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, reference.theta, rtol=0.05, atol=0.02)
