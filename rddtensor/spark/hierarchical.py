"""Hierarchical all-reduce (issue 21): records between partitions of one host go through that
host's cache as tokens, and only one reduced copy per host crosses the network.

``Sharded`` (``rddtensor.spark.allreduce``) already sends a record between two partitions of
one host as a token of the host-local cache (``stages.deliver`` with ``CacheSettings.peers``).
But with E partitions on a host, each of them sends its own slice of a gradient block to the
block's owner on another host: E copies of every block cross between two hosts, and E copies of
every θ block come back in the all-gather. ``Hierarchical`` sends one of each.

Each host appoints, for every block owned on *another* host, one *delegate* among its own
partitions (``HostMap``: from ``CacheSettings.peers``, deterministic; the remote blocks are dealt
round-robin over the host's partitions in partition order, so the reduction work is spread).
An iteration is up to four Python passes (``Sharded``: two):

1. **gradient** — partition j computes its gradient at θ_t and sends the slice of block i to
   owner i when i is on j's host, else to j's host's delegate for i: a token either way (the
   same host). Its own block's state rides on to itself (as in ``Sharded``).
2. **host reduce** — a delegate sums its host's slices of each block it delegates, in source
   (partition) order (``wire.Chunks.sum_into``: bit-reproducible whatever the arrival order),
   and sends the one partial sum, inline, across to the owner (as a gradient record from the
   pseudo-source ``n + host``). What a partition sent itself, its ``own`` state and the
   same-host slices of its own block, it forwards to itself as they came (tokens stay tokens).
3. **update** — owner i sums its host's slices (in partition order) and then the other hosts'
   partial sums (in host order) into one gradient, in a fixed order (``HostMap.contributors``),
   and applies the optimizer to block i and its slots. At the job's cut iteration (``it.cut``:
   the state outlives the job and must be inline) it emits its state exactly like
   ``Sharded.emit_state`` (no pass 4): the cut state between jobs, ``own_block``,
   checkpoints, ``ParameterState.gather`` and a following job of any strategy read it
   unchanged. Otherwise it sends its θ block as a token to the partitions of its own host and
   one copy (inline, or a served token with the peer transport) to its delegate on each other
   host.
4. **fan-out** (not at the cut) — a delegate writes each θ block it received from another host
   once to its host's cache and hands the token to every partition of its host (itself
   included); the ``own`` state and the θ tokens of the host's owners are forwarded as they
   came. The next iteration's gradient pass assembles θ from these.

Cross-host volume per iteration, with ``H`` hosts of ``E = n/H`` partitions each:
``Sharded`` moves ``(n - E)·P`` values each way (gradients and θ), ``Hierarchical``
``(H - 1)·P`` each way: ``1/E`` of it (``cross_host_values`` and ``values``, per partition, for
``allreduce.CostModel``; ``sharded_cross_host_values``). The price is two more Python
passes (one at the cut iteration, whose θ goes out flat): for big models on hosts of several
partitions, not for small ones (``passes``; the cost model of ``allreduce.choose`` does not pick
this strategy on its own).

With the peer transport (``rddtensor.spark.peers``) the θ block an owner sends a delegate on
another host is a token the delegate fetches from the owner's worker, not inline bytes; the
host partial sums of pass 2 still cross inline, through the shuffle. On the benchmark's 2 hosts
x 2 executors, plain ``Sharded`` with the transport was faster (``benchmarks/allreduce.py
--cluster 2x2``: 794 against 1,006 ms per iteration at P = 1e7).

It behaves exactly like ``Sharded`` (same passes, same records, same sums) where there is no
hierarchy to use: while the host-local cache is off (``it.cache`` is None), while the hosts
of the partitions are not known (``cache.peers`` empty: e.g. the first job after the shards
were built), when all partitions share one host, or when no host holds two of them.

Determinism: the summation order is a function of the host map (which partitions share a
host), never of the arrival order: two runs whose partitions land on the hosts alike are bit
identical. It differs from ``Sharded``'s (source order over all partitions), and so does the
result, within float tolerance; a fit whose partitions move between hosts (a lost executor)
or that runs a job without the map (fallback) sums those steps in another order, also within
float tolerance of the others, not bit for bit. So the bit-identical guarantees of ``sharded``
and ``replicated`` do not carry over: a fit's first job (hosts not yet known) always runs in
``Sharded``'s order, so a fit resumed from a checkpoint or continued with ``initial_epoch``
(whose first job is a different step range), a fit whose host-local cache turned off after a
miss, one whose shards were rebuilt after a data-store miss, and one whose executor was lost
each agree with the uninterrupted fit to float tolerance only. That is why ``auto`` never
picks it. With ``wire_dtype="bfloat16"`` a host's partial sum is rounded to bfloat16 again
before it crosses (one more rounding than ``sharded``'s).
"""
from __future__ import annotations

from rddtensor.spark import rawrdd, wire, worker
from rddtensor.spark.allreduce import STRATEGIES, Sharded, _per_host
from rddtensor.spark.config import CacheSettings, Iteration, Kind
from rddtensor.spark.stages import deliver, keyed, own_record, raws_of, split_records

__all__ = ["Hierarchical", "HostMap", "sharded_cross_host_values"]


class HostMap:
    """Which partitions share a host, and who delegates what: built from ``CacheSettings.peers``
    (per partition, its host: small ints), the same on the driver and in every task.

    ``delegate(h, i)``: the partition of host ``h`` that reduces that host's slices of block
    ``i`` (owned on another host) and fans θ block ``i`` out on ``h``. A host's remote blocks,
    in block order, are dealt round-robin over its partitions in partition order.
    """

    def __init__(self, peers):
        self.peers = tuple(int(p) for p in peers)
        self.n = n = len(self.peers)
        self.hosts = sorted(set(self.peers))
        self.members = {h: tuple(j for j in range(n) if self.peers[j] == h) for h in self.hosts}
        self._delegate = {}
        for h in self.hosts:
            mine = self.members[h]
            remote = [i for i in range(n) if self.peers[i] != h]
            for k, i in enumerate(remote):
                self._delegate[(h, i)] = mine[k % len(mine)]

    @classmethod
    def of(cls, cache: CacheSettings | None, n: int) -> HostMap | None:
        """The map of a job's ``cache`` settings for ``n`` partitions, or ``None`` where a
        hierarchy has nothing to offer (``Hierarchical`` then runs as ``Sharded``): the cache
        is off, the hosts are not known, one host holds all partitions, or none holds two."""
        if cache is None or len(cache.peers) != n:
            return None
        hm = cls(cache.peers)
        if len(hm.hosts) < 2 or max(len(m) for m in hm.members.values()) < 2:
            return None
        return hm

    def host(self, j: int) -> int:
        return self.peers[j]

    def delegate(self, h: int, i: int) -> int:
        """The partition of host ``h`` that handles block ``i`` (owned on another host)."""
        return self._delegate[(h, i)]

    def delegated(self, d: int) -> list:
        """The blocks partition ``d`` handles for its host, in block order."""
        h = self.peers[d]
        return [i for i in range(self.n) if self.peers[i] != h and self._delegate[(h, i)] == d]

    def route(self, j: int, i: int) -> int:
        """Where partition ``j`` sends its slice of block ``i``: the owner when it shares
        ``j``'s host, else ``j``'s host's delegate for ``i`` (on ``j``'s host either way)."""
        h = self.peers[j]
        return i if self.peers[i] == h else self._delegate[(h, i)]

    def partial_source(self, h: int) -> int:
        """The source number of host ``h``'s partial sum at an owner: ``n + h``, after every
        partition's own number, so an owner adds its host's slices first (partition order)
        and then the other hosts' sums (host order)."""
        return self.n + h

    def contributors(self, i: int) -> list:
        """The gradient sources owner ``i`` adds, in the order it adds them (``Chunks``'
        source order): the partitions of its host, then each other host's partial sum."""
        h = self.peers[i]
        return [*self.members[h], *(self.partial_source(g) for g in self.hosts if g != h)]


def sharded_cross_host_values(P: int, n: int, hosts: int, slots: int = 0) -> float:
    """Values one partition of ``Sharded`` sends to other hosts per iteration (``values``'
    ``cross``), for ``P`` parameters on ``n`` partitions spread evenly over ``hosts`` hosts
    (``E = n/hosts`` each): its slice of each of the ``n - E`` blocks owned on other hosts, and
    its θ block to the ``n - E`` partitions there: ``2·(n - E)/n·P``. Optimizer slots
    (``slots`` per parameter) never leave their owner."""
    return Sharded.values(P, n, hosts, slots)[0]


class Hierarchical(Sharded):
    """Reduce-scatter through one delegate per host and block, update at the owner, all-gather
    through one delegate per host and block (see the module docstring): up to four passes.

    ``host_gather=False`` keeps the all-gather flat (``Sharded.emit_state`` every iteration;
    three passes): the gradients still cross once per host, θ once per partition."""

    name = "hierarchical"
    passes = 4
    """Python passes of an iteration that is not a job's cut (the cut iteration: 3; the
    fallback, like ``Sharded``: 2); ``passes_per_iteration`` averages over a job."""

    def __init__(self, host_gather: bool = True):
        self.host_gather = bool(host_gather)
        self.passes = 4 if self.host_gather else 3

    @staticmethod
    def passes_per_iteration(iterations_per_job: int = 1, host_gather: bool = True) -> float:
        """Python passes per iteration, averaged over a job of ``iterations_per_job``
        iterations while the hierarchy is on: 4 per iteration and 3 for the cut one (no
        fan-out pass); 3 each with ``host_gather=False``. (``Sharded``: 2.)"""
        k = max(int(iterations_per_job), 1)
        return (4 * (k - 1) + 3) / k if host_gather else 3.0

    @staticmethod
    def cross_host_values(P: int, n: int, hosts: int, slots: int = 0,
                          iterations_per_job: int | None = None,
                          host_gather: bool = True) -> float:
        """Values one partition sends to other hosts per iteration, on average (``values``'
        ``cross``, comparable with ``sharded_cross_host_values``), for ``P`` parameters on
        ``n`` partitions spread evenly over ``hosts`` hosts (``E = n/hosts`` each).

        Gradients: each host sends one partial sum of each of the ``n - E`` blocks owned
        elsewhere, ``(n - E)·P/n`` from ``E`` partitions: ``(n - E)/(E·n)·P`` per partition;
        the all-gather the same, except at a job's cut iteration, whose θ goes out flat
        (``(n - E)/n·P``, as ``Sharded``'s). ``iterations_per_job`` ``None``: an iteration
        that is not the cut; ``k``: the average over a job of ``k`` iterations. So ``1/E`` of
        ``Sharded``'s away from the cut. Optimizer slots (``slots`` per parameter) never leave
        their owner. With one host, or one partition per host, the hierarchy is off: as
        ``Sharded``."""
        e = _per_host(n, hosts)
        if hosts <= 1 or e <= 1:
            return sharded_cross_host_values(P, n, hosts, slots)
        once = (n - e) / (e * n) * P
        if not host_gather:
            return once + (n - e) / n * P
        if iterations_per_job is None:
            return 2 * once
        k = max(int(iterations_per_job), 1)
        return once + ((k - 1) * once + (n - e) / n * P) / k

    @staticmethod
    def values(P: int, n: int, hosts: int, n_slots: int) -> tuple:
        """``(cross, local)`` per partition of an iteration that is not a job's cut
        (``AllReduce.values``, ``CostModel``; ``passes``: 4). ``cross``:
        ``cross_host_values``. ``local``: its gradient slices to the owners or delegates on
        its host, the slices a delegate adds (``E`` of each block it delegates), θ to its
        host's partitions and the fanned-out θ blocks (each counted once per partition that
        reads it, as ``Sharded.values`` and ``Replicated.values`` count a record one cache
        file serves to several partitions), its gradient block and state to itself, the
        block's update. With one host or one partition per
        host: ``Sharded.values``."""
        e = _per_host(n, hosts)
        if hosts <= 1 or e <= 1:
            return Sharded.values(P, n, hosts, n_slots)
        cross = Hierarchical.cross_host_values(P, n, hosts, n_slots)
        local = P * ((n - 1) / n + (n - e) / n + (e - 1) / n + (n - e) / n
                     + (2 + n_slots) / n + (1 + n_slots) / n)
        return cross, local

    # --- the iteration ----------------------------------------------------------------------
    def iteration(self, state, shards, it: Iteration, model, acc):
        n = len(state.bounds)
        plan = self.plan(it, model, state.bounds, acc)
        if plan is None:  # nothing to gain: exactly Sharded's passes and records
            return Sharded.iteration(self, state, shards, it, model, acc)
        S = state.S
        for run, data in plan:  # each pass reads the last one's records, shuffled
            S = rawrdd.map_raw(shards.beside(rawrdd.shuffle_pairs(S, n), data=data,
                                             home=it.homes), run)
        return S

    def plan(self, it: Iteration, model, bounds, acc):
        """The iteration's passes as ``[(task function, reads data), ...]``: each task
        function ``(partition, records) -> key(dest), record, ...`` reads the previous pass's
        records (the first: ``S_t``'s) shuffled to it, plus its data shard where ``reads
        data``; the last one's output is ``S_{t+1}``. ``None`` where the hierarchy is off
        (``HostMap.of``): then ``iteration`` is ``Sharded``'s."""
        hm = HostMap.of(it.cache, len(bounds))
        if hm is None:
            return None
        # the cut iteration's state goes out inline and flat (``Sharded.emit_state``)
        fan = self.host_gather and it.state_cache is not None
        passes = [(self._gradient(it, model, bounds, acc, route=hm.route), True),
                  (self._host_reduce(it, bounds, hm), False),
                  (self._host_update(model, bounds, it, hm, fan), False)]
        if fan:
            passes.append((self._fan_out(it, hm), False))
        return passes

    @staticmethod
    def _host_reduce(it: Iteration, bounds, hm: HostMap):
        """Pass 2: partition d forwards to itself what is its own (``own`` state, its host's
        slices of block d), and sends one partial sum per block it delegates, added in
        partition order, inline to the block's owner on the other host."""
        bf16 = it.step.gradient_bf16

        def run(d, records):
            params, _ = split_records(records)
            yield from keyed(d, raws_of(params, Kind.OWN))
            grads = [p for p in params if p[0] == Kind.GRAD]
            yield from keyed(d, raws_of([p for p in grads if p[1]["blk"] == d], Kind.GRAD))
            h = hm.host(d)
            members = list(hm.members[h])
            here = worker.current()
            for i in hm.delegated(d):
                got = _chunks_where(grads, "blk", i)
                if got.sources() != members:
                    raise RuntimeError(f"partition {d} got slices of block {i} from partitions "
                                       f"{got.sources()}, expected its host's {members}")
                a, z = bounds[i]
                g = got.sum_into("g", here.scratch("hsum", z - a))
                meta = {"src": hm.partial_source(h), "t": got.meta["t"], "blk": i}
                yield from keyed(i, wire.chunks(Kind.GRAD, meta, {"g": g}, bf16))
        return run

    @staticmethod
    def _host_update(model, bounds, it: Iteration, hm: HostMap, fan: bool):
        """Pass 3: owner i adds its host's slices and the other hosts' partial sums in a fixed
        order (``HostMap.contributors``), updates block i and its slots, and emits its state:
        flat (``Sharded.emit_state``) without ``fan``, else θ to its host's partitions
        (tokens) and to one delegate per other host (inline, or served: ``stages.deliver``)."""
        bf16, cache = it.step.wire_bf16, it.state_cache
        emit_state = Sharded.emit_state

        def run(i, records):
            params, _ = split_records(records)
            t, w, slots = Sharded.update_block(model, bounds, i, params, hm.contributors(i))
            if not fan:
                return emit_state(i, t, bounds, w, slots, bf16, cache)
            return emit_host_state(i, t, bounds, w, slots, hm, bf16, cache)
        return run

    @staticmethod
    def _fan_out(it: Iteration, hm: HostMap):
        """Pass 4: partition d forwards its ``own`` state and its host's θ blocks (tokens) to
        itself, and writes each θ block it got from another host once to the host's cache,
        a token to every partition of its host."""
        bf16, cache = it.step.wire_bf16, it.state_cache

        def run(d, records):
            params, _ = split_records(records)
            yield from keyed(d, raws_of(params, Kind.OWN))
            h = hm.host(d)
            theta = [p for p in params if p[0] == Kind.THETA]
            yield from keyed(d, raws_of([p for p in theta if hm.host(p[1]["i"]) == h],
                                        Kind.THETA))
            here = worker.current()
            for i in hm.delegated(d):
                got = _chunks_where(theta, "i", i)
                if got.meta is None:
                    raise RuntimeError(f"partition {d} got no θ block {i} to fan out")
                m = {k: got.meta[k] for k in ("i", "t", "lo", "hi")}
                w = got.into("w", here.scratch("fan", m["hi"] - m["lo"]))
                yield from deliver(cache, Kind.THETA, d, m["t"], m, {"w": w}, hm.members[h],
                                   ("w",) if bf16 else (), file=f"{i}-{d}")
        return run


def _chunks_where(params, field: str, value) -> wire.Chunks:
    """The chunks among decoded records ``params`` whose header has ``field == value``."""
    got = wire.Chunks()
    for _, meta, x, _ in params:
        if meta[field] == value:
            got.add(meta, x)
    return got


def emit_host_state(i, t, bounds, w, slots, hm: HostMap, bf16=False,
                    cache: CacheSettings | None = None):
    """Owner ``i``'s records after its update when θ fans out per host: its ``own`` state to
    itself, θ block ``i`` to the other partitions of its host (tokens through the cache) and
    to its delegate on each other host (inline, or served: ``stages.deliver``)."""
    lo, hi = bounds[i]
    h = hm.host(i)
    yield from keyed(i, own_record(i, t, lo, hi, w, slots, cache))
    dests = [d for d in hm.members[h] if d != i]
    dests += [hm.delegate(g, i) for g in hm.hosts if g != h]
    yield from deliver(cache, Kind.THETA, i, t, {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w},
                       dests, ("w",) if bf16 else ())


STRATEGIES.setdefault(Hierarchical.name, Hierarchical)
