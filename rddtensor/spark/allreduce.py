"""Two ways to all-reduce gradients through Spark's shuffle, behind one interface (``AllReduce``).

``Sharded`` (the design's reduce-scatter + all-gather): θ and the optimizer slots are cut into N
blocks; owner i updates block i. Each partition moves ``2(N-1)/N·P`` values per iteration (what a
ring all-reduce moves) but an iteration is two Python passes.

``Replicated`` (all-to-all gradient exchange): every partition sends its whole gradient to every
partition, and each applies the identical update to its own full copy of θ and the slots (same
inputs, same fixed summation order: bit-identical replicas). One Python pass per iteration, but
``(N-1)·P`` values out of each partition, and every partition updates (and sends itself) the whole
state. A Python pass has a fixed cost in scheduling and worker round trips (``CostModel``,
fitted by ``python -m benchmarks.allreduce`` on one host and on two), so for small models
``Replicated`` wins; past a few million parameters ``Sharded`` does, even at N = 2 where both
send the same cross-partition bytes (``choose``). On several hosts a pass and a value cost
more than on one (the JVM shuffle, the network, the task machinery), and ``Replicated``'s whole
gradients to every partition cross hosts, so ``Sharded`` wins sooner there.

``initial`` ships driver-side θ (start of a fit) by broadcast and returns the state RDD and
the broadcast handles to destroy once that state is cut loose from its lineage.

A strategy produces the *state RDD* ``S``: the raw pre-shuffle records of the last pass
(``key(dest), payload`` pairs). ``iteration`` maps ``S_t -> S_{t+1}``; ``own_block`` reads the
settled block i of θ_t (and its slots) from partition i of ``shuffle_pairs(S_t)``.

Every parameter-sized array crosses Spark as 256 KiB chunk records (``wire.chunks``: the JVM
never holds a humongous array), and a gradient pass sees the shuffled parameters and its data
shard through ``rawrdd.co_union`` (no record-count bookkeeping). Gradients are summed chunk by
chunk in source order (``wire.Chunks.sum_into``): bit-reproducible whatever the arrival order.
Within a job, records go through the host-local cache where the job's ``CacheSettings`` allow
(``stages.deliver``, ``rddtensor.spark.localcache``): a token in the shuffle instead of the chunks.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from rddtensor.training.steps import apply_update, clip_trainable, optimizer_step
from rddtensor.spark import rawrdd, wire, worker
from rddtensor.spark.config import CacheSettings, Iteration, Kind
from rddtensor.spark.stages import (assemble, chunks_of, deliver, is_local, join_own, keyed,
                                    local_gradient, own_record, raws_of, read_own, split_own,
                                    split_records, to_self)

@dataclass(frozen=True)
class CostModel:
    """What ``choose`` expects an iteration to cost: ``per_iteration`` (the job's share: submit,
    cut state, stats) plus ``per_pass`` for each Python pass, ``per_local_value`` for each
    float32 value a partition sends within its host (host-local cache tokens), sends itself or
    updates, and ``per_cross_value`` for each value it sends to a partition on another host
    (the JVM shuffle and the network). Fitted by ``python -m benchmarks.allreduce``
    (``fit_cost_model``: non-negative least squares over the ``sharded`` and ``replicated``
    medians at P = 1e5, 1e6, 1e7, N = 2, SGD) and printed with its results."""

    per_iteration: float
    per_pass: float
    per_local_value: float
    per_cross_value: float

    def seconds(self, strategy, P: int, n: int, hosts: int, n_slots: int) -> float:
        """Expected seconds per iteration of ``strategy`` (a class or instance)."""
        cross, local = strategy.values(P, n, hosts, n_slots)
        return (self.per_iteration + strategy.passes * self.per_pass
                + local * self.per_local_value + cross * self.per_cross_value)


# one host (local[2], idle): ``python -m benchmarks.allreduce --fit-from
# benchmarks/results/allreduce.json`` (the model's ms per iteration within 0.4-11 ms of the medians)
ONE_HOST = CostModel(per_iteration=0.026, per_pass=0.0345, per_local_value=2.6e-9,
                     per_cross_value=0.0)
# two hosts of one executor each (``--cluster 2hosts``: loopback, 2 cores for everything),
# records between the hosts through the peer transport (``rddtensor.spark.peers``):
# ``--fit-from benchmarks/results/allreduce_2hosts.json`` (within 0-16 ms of the medians).
# With one executor per host both strategies send the same values across at N = 2, so the fit
# sees a value across hosts only through the whole iteration (6.0 ns, one within a host 5.0
# ns: ~2x one host's 2.65, this rig's 9 JVM and Python processes share 2 cores). The choice
# at N = 2: sharded past 7.7e6 values with SGD, 2.9e6 with Adam (before the peer transport,
# with the records between hosts in the JVM shuffle: 2.7e6 and 1.0e6). A run on 2 hosts x 2
# executors (``--cluster 2x2``, N = 4, 6 processes more on the same 2 cores) fitted higher
# prices (308 ms per iteration, 69 ms per pass, 16 ns per value) and a lower N = 4 crossover
# (0.9e6 against this model's 3.9e6; measured: replicated ahead at 1e5, sharded at 1e6).
HOSTS = CostModel(per_iteration=0.079, per_pass=0.0943, per_local_value=5.0e-9,
                  per_cross_value=6.03e-9)


def _per_host(n: int, hosts: int) -> float:
    """Partitions per host when ``n`` partitions spread evenly over ``hosts`` (at least one)."""
    return max(1.0, n / max(1, min(int(hosts), n)))


class AllReduce(abc.ABC):
    """An all-reduce strategy: how θ, the optimizer slots and the gradients are laid out on
    the state RDD and exchanged each iteration. Strategies hold no state of their own (their
    methods return task functions or RDDs), so one instance serves a whole fit.

    The ``state`` an ``iteration`` starts from is the engine's ``ParameterState``
    (``rddtensor.spark.engine``): its RDD ``S``, the block ``bounds`` and ``model``, the model
    whose optimizer settings produced ``S`` (they apply an update still pending in it).
    """

    name: str = ""

    def check(self, model) -> None:
        """Raise ``ValueError`` when this strategy cannot train ``model`` (its optimizer)."""

    @abc.abstractmethod
    def initial(self, sc, theta, slots: dict, bounds, t: int):
        """The state RDD of driver-side ``theta``/``slots`` at step ``t``, and the broadcast
        handles it reads (destroy them with the state): ``(S, handles)``."""

    @abc.abstractmethod
    def iteration(self, state, shards, it: Iteration, model, acc):
        """``S_t -> S_{t+1}`` (lazy): one training step of ``model`` (this job's copy) on
        ``shards`` (``rddtensor.spark.shards.Shards``: a pass reads the shuffled records
        ``shards.beside(...)``, on the data's host), stats into the accumulator ``acc``."""

    @abc.abstractmethod
    def own_block(self, model, bounds):
        """A function ``(i, records) -> (meta, w, slots)``: the settled block ``i`` of θ_t and
        its slots from partition ``i`` of ``shuffle_pairs(S_t)`` (``model``: as ``state``'s)."""

    #: Python passes per iteration (``CostModel``)
    passes: int = 1

    @staticmethod
    @abc.abstractmethod
    def values(P: int, n: int, hosts: int, n_slots: int) -> tuple:
        """``(cross, local)``: float32 values one partition sends to partitions on other hosts,
        and those it sends within its host, sends itself or updates, per iteration, for ``P``
        parameters on ``n`` partitions spread evenly over ``hosts`` hosts with ``n_slots``
        optimizer slots (``CostModel``)."""


class Sharded(AllReduce):
    """Reduce-scatter gradients to block owners, update there, all-gather θ (two passes)."""

    name = "sharded"

    def check(self, model):
        opt = model.optimizer
        if opt.needs_whole_gradient:
            what = "clipnorm" if opt.clipnorm is not None else type(opt).__name__
            raise ValueError(f"{what} needs norms over the whole gradient, which the {self.name} "
                             "all-reduce does not have; use allreduce='replicated'")

    @staticmethod
    def emit_state(i, t, bounds, w, slots, bf16=False, cache: CacheSettings | None = None):
        lo, hi = bounds[i]
        yield from keyed(i, own_record(i, t, lo, hi, w, slots, cache))
        yield from deliver(cache, Kind.THETA, i, t, {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w},
                           [d for d in range(len(bounds)) if d != i], ("w",) if bf16 else ())

    def initial(self, sc, theta, slots, bounds, t):
        # one broadcast per block: task i fetches block i only, and the driver JVM streams it
        # from a file (a parallelized collection would hold all of θ in the driver's heap)
        handles = [sc.broadcast(wire.pack(
                       Kind.OWN, {}, join_own(theta[a:z], {k: v[a:z] for k, v in slots.items()})))
                   for a, z in bounds]
        emit_state = self.emit_state

        def emit(i, records):
            for _ in records:
                pass
            _, _, arrays = wire.unpack(handles[i].value)
            w, sl = split_own(arrays)
            return emit_state(i, t, bounds, w, sl)
        return rawrdd.map_raw(sc.parallelize(range(len(bounds)), len(bounds)), emit), handles

    def iteration(self, state, shards, it: Iteration, model, acc):
        # (a sharded state holds no pending update: the owners applied it)
        bounds = state.bounds
        n = len(bounds)
        AG = rawrdd.shuffle_pairs(state.S, n)
        RS = rawrdd.shuffle_raw(shards.beside(AG, home=it.homes),
                                self._gradient(it, model, bounds, acc), n)
        # (the update reads no data, but runs where the data is: its records to itself, in
        # the host-local cache, are there)
        return rawrdd.map_raw(shards.beside(RS, data=False, home=it.homes),
                              self._update(model, bounds, it.step.wire_bf16, it.state_cache))

    @staticmethod
    def _gradient(it: Iteration, model, bounds, acc, route=None):
        """The gradient pass: partition j's gradient at θ_t, block i's slice to ``route(j,
        i)`` (default: owner i; ``Hierarchical``: a delegate on j's host), its own block's
        state on to itself (``forward_own``)."""
        step, cache = it.step, it.cache
        bf16 = step.gradient_bf16
        forward_own = Sharded.forward_own

        def run(j, records):
            params, shard = split_records(records)
            t, theta = assemble(params, model.layout.size)
            g = local_gradient(step, model, theta, t, j, shard, acc, it.weight_sum)
            for i, (a, z) in enumerate(bounds):
                yield from deliver(cache, Kind.GRAD, j, t, {"src": j, "t": t, "blk": i},
                                   {"g": g[a:z]}, [i if route is None else route(j, i)], bf16,
                                   file=f"{j}-{i}")
            yield from forward_own(j, params, t, cache)
        return run

    @staticmethod
    def forward_own(j, params, t, cache: CacheSettings | None):
        """The ``own`` state of partition ``j`` on to itself, unchanged: its raw records (a
        token stays a token), or into the host-local cache when it arrived inline (a job's
        first iteration)."""
        if cache is not None and not is_local(params, Kind.OWN):
            meta, w, slots = read_own(params)
            return keyed(j, own_record(j, t, meta["lo"], meta["hi"], w, slots, cache))
        return keyed(j, raws_of(params, Kind.OWN))

    def _update(self, model, bounds, bf16=False, cache: CacheSettings | None = None):
        emit_state = self.emit_state
        n = len(bounds)

        def run(i, records):
            params, _ = split_records(records)
            t, w, slots = Sharded.update_block(model, bounds, i, params, range(n))
            return emit_state(i, t, bounds, w, slots, bf16, cache)
        return run

    @staticmethod
    def update_block(model, bounds, i, params, sources):
        """Block ``i`` after its update: the gradient records of exactly ``sources`` among
        ``params`` summed in source order (``wire.Chunks.sum_into``), clipped by value,
        applied to the block and its slots: ``(t + 1, w, slots)``."""
        meta, w, slots = read_own(params)
        grads = chunks_of(params, Kind.GRAD)
        want = sorted(sources)
        if grads.sources() != want:
            raise RuntimeError(f"block {i} got gradients from sources {grads.sources()}, "
                               f"expected {want}")
        g = grads.sum_into("g", worker.current().scratch("gsum", w.size))
        train, bufs = model.layout.split_segments(*bounds[i])
        if model.optimizer.clipvalue is not None:  # elementwise: exact on a block
            clip_trainable(model.optimizer, g, train)
        apply_update(model.optimizer, w, g, slots, meta["t"] + 1,
                     segments=train, buffer_segments=bufs)
        return meta["t"] + 1, w, slots

    def own_block(self, model, bounds):
        def read(i, records):
            params, _ = split_records(records)
            return read_own(params)
        return read

    passes = 2

    @staticmethod
    def values(P: int, n: int, hosts: int, n_slots: int) -> tuple:
        # a block of P/n to every other partition twice (gradient, θ): those on other hosts
        # cross; the gradient block and the state to self; the block's update
        e = _per_host(n, hosts)
        cross = 2 * (n - e) / n * P
        return cross, P * (2 * (e - 1) / n + (2 + n_slots) / n + (1 + n_slots) / n)


class Replicated(AllReduce):
    """Every partition sends its gradient to all and applies the same update (one pass).

    The state ``S_t`` holds each replica's θ and slots of step ``t`` and the gradients of step
    ``t + 1`` (``rstate`` and ``rgrad`` records): the update is pending, and the next pass (or
    ``own_block``) applies it first (``settle``), with the optimizer settings of the model that
    produced the state (``state.model``)."""

    name = "replicated"

    def initial(self, sc, theta, slots, bounds, t):
        handle = sc.broadcast(wire.pack(Kind.RSTATE, {"t": t},
                                        join_own(theta, slots)))

        def emit(j, records):
            for _ in records:
                pass
            _, meta, arrays = wire.unpack(handle.value)
            return keyed(j, wire.chunks(Kind.RSTATE, meta, arrays))
        return rawrdd.map_raw(sc.parallelize(range(len(bounds)), len(bounds)), emit), [handle]

    def iteration(self, state, shards, it: Iteration, model, acc):
        """``S_t -> S_{t+1}``; the update pending in ``S_t`` is applied with the optimizer
        settings of ``state.model`` (those of the job that computed its gradients)."""
        n = len(state.bounds)
        settle = self.settle
        step, bf16 = it.step, it.step.gradient_bf16
        settle_model = state.model
        cache = it.state_cache

        def run(j, records):
            params, shard = split_records(records)
            t, w, slots = settle(settle_model, params)
            g = local_gradient(step, model, w, t, j, shard, acc, it.weight_sum)
            yield from deliver(cache, Kind.RGRAD, j, t, {"src": j, "t": t}, {"g": g}, range(n),
                               bf16)
            yield from keyed(j, to_self(cache, Kind.RSTATE, j, t, {"t": t},
                                         join_own(w, slots)))
        return rawrdd.map_raw(shards.beside(rawrdd.shuffle_pairs(state.S, n), home=it.homes),
                              run)

    @staticmethod
    def settle(model, params):
        """θ_t and slots after applying the pending gradients (if any): ``(t, w, slots)``."""
        state = chunks_of(params, Kind.RSTATE)
        if state.meta is None:
            raise RuntimeError("the partition holds no parameter state")
        t = state.meta["t"]
        here = worker.current()
        arrays = {name: state.into(name, here.scratch("state." + name, state.sizes[(0, name)]))
                  for name in state.names()}
        w, slots = split_own(arrays)
        grads = chunks_of(params, Kind.RGRAD)
        if grads.meta is not None:
            if grads.meta["t"] != t:
                raise RuntimeError(f"gradients of step {grads.meta['t'] + 1} met the state of step {t}")
            g = grads.sum_into("g", here.scratch("gsum", w.size))
            optimizer_step(model.optimizer, w, g, slots, t + 1, model.layout.split_segments())
            t += 1
        return t, w, slots

    def own_block(self, model, bounds):
        settle = self.settle

        def read(i, records):
            params, _ = split_records(records)
            t, w, slots = settle(model, params)
            lo, hi = bounds[i]
            return ({"i": i, "t": t, "lo": lo, "hi": hi}, w[lo:hi],
                    {k: v[lo:hi] for k, v in slots.items()})
        return read

    passes = 1

    @staticmethod
    def values(P: int, n: int, hosts: int, n_slots: int) -> tuple:
        # the whole gradient to every other partition (those on other hosts cross); the whole
        # state to self; the whole update (and settle)
        e = _per_host(n, hosts)
        return (n - e) * P, P * ((e - 1) + (2 + n_slots) + 2 * (1 + n_slots))


# by name; "hierarchical" adds itself when ``rddtensor.spark.hierarchical`` is imported (the
# engine imports it: that module builds on this one, so this one cannot import it)
STRATEGIES = {"sharded": Sharded, "replicated": Replicated}


def choose(allreduce: str, model, n: int, hosts: int = 1) -> AllReduce:
    """The strategy for ``allreduce`` ("auto", "sharded", "replicated" or "hierarchical":
    ``rddtensor.spark.hierarchical``, never picked by "auto").

    ``auto`` picks ``replicated`` when the optimizer needs whole-gradient norms (clipnorm,
    LARS, LAMB); otherwise the strategy ``CostModel.seconds`` expects to be fastest for ``n``
    partitions on ``hosts`` hosts (``ONE_HOST`` for one, ``HOSTS`` for several). ``replicated``
    saves a Python pass, ``sharded`` moves and updates fewer values: with the fitted constants,
    at N = 2 and SGD they cross near P = 5.3e6 on one host (Adam: 2.0e6) and near 7.7e6 on two
    hosts (Adam: 2.9e6: a pass costs more there); with more partitions ``replicated``'s whole
    gradients to every partition make ``sharded`` win sooner.
    """
    if allreduce not in ("auto", *STRATEGIES):
        raise ValueError(f"allreduce must be 'auto', 'sharded', 'replicated' or 'hierarchical', "
                         f"got {allreduce!r}")
    if allreduce != "auto":
        strategy = STRATEGIES[allreduce]()
        strategy.check(model)
        return strategy
    opt = model.optimizer
    if opt.needs_whole_gradient:
        return Replicated()
    P, s = model.layout.size, len(opt.slot_names)
    cost = ONE_HOST if hosts <= 1 else HOSTS
    return min((Sharded, Replicated), key=lambda c: cost.seconds(c, P, n, hosts, s))()
