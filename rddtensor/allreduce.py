"""Two ways to all-reduce gradients through Spark's shuffle, behind one interface.

``Sharded`` (the design's reduce-scatter + all-gather): θ and the optimizer slots are cut into N
blocks; owner i updates block i. Each partition moves ``2(N-1)/N·P`` values per iteration (what a
ring all-reduce moves) but an iteration is two Python passes.

``Replicated`` (all-to-all gradient exchange): every partition sends its whole gradient to every
partition, and each applies the identical update to its own full copy of θ and the slots (same
inputs, same fixed summation order: bit-identical replicas). One Python pass per iteration, but
``(N-1)·P`` values out of each partition, and every partition updates (and sends itself) the whole
state. A Python pass costs ~30-40 ms of scheduling and worker round trips on an idle local[2],
so for small models ``Replicated`` wins; past a few million parameters ``Sharded`` does, even
at N = 2 where both send the same cross-partition bytes (``choose``).

``initial`` ships driver-side θ (start of a fit) by broadcast and returns the state RDD and
the broadcast handles to destroy once that state is cut loose from its lineage.

A strategy produces the *state RDD* ``S``: the raw pre-shuffle records of the last pass
(``key(dest), payload`` pairs). ``iteration`` maps ``S_t -> S_{t+1}``; ``own_block`` reads the
settled block i of θ_t (and its slots) from partition i of ``shuffle_pairs(S_t)``.

Every parameter-sized array crosses Spark as 256 KiB chunk records (``wire.chunks``: the JVM
never holds a humongous array), and a gradient pass sees the shuffled parameters and its data
shard through ``rawrdd.co_union`` (no record-count bookkeeping). Gradients are summed chunk by
chunk in source order (``wire.Chunks.sum_into``): bit-reproducible whatever the arrival order.
Within a job, records go through the host-local cache where the job's ``local`` settings allow
(``stages.deliver``, ``rddtensor.localcache``): a token in the shuffle instead of the chunks.
"""
from __future__ import annotations

from rddtensor.layers.training import apply_update, clip_trainable, optimizer_step
from rddtensor import rawrdd, wire
from rddtensor.stages import (assemble, chunks_of, deliver, is_local, join_own, keyed,
                              local_gradient, own_record, raws_of, read_own, scratch, split_own,
                              split_records, to_self)

# The cost model of ``choose``: an iteration costs PASS_SECONDS per Python pass plus a price per
# float32 value a partition sends, writes to itself or updates. SECONDS_PER_VALUE is the price
# when the records between partitions cross Spark's shuffle (fitted to ``python -m
# benchmarks.allreduce`` on local[2], idle, N = 2, SGD, with only a partition's records to
# itself in the host-local cache: sharded 83 / 128 / 319 ms and replicated 67 / 104 / 416 ms at
# P = 1e5 / 1e6 / 1e7); SECONDS_PER_VALUE_ONE_HOST when all tasks share one host's cache
# (the same benchmark since: sharded 94 / 100 / 165 ms, replicated 54 / 84 / 190 ms).
PASS_SECONDS = 0.0375
SECONDS_PER_VALUE = 7.5e-9
SECONDS_PER_VALUE_ONE_HOST = 3.3e-9


class Sharded:
    """Reduce-scatter gradients to block owners, update there, all-gather θ (two passes)."""

    name = "sharded"

    @staticmethod
    def check(model):
        opt = model.optimizer
        if opt.needs_whole_gradient:
            what = "clipnorm" if opt.clipnorm is not None else type(opt).__name__
            raise ValueError(f"{what} needs norms over the whole gradient, which the sharded "
                             "all-reduce does not have; use allreduce='replicated'")

    @staticmethod
    def emit_state(i, t, bounds, w, slots, bf16=False, local=None):
        lo, hi = bounds[i]
        yield from keyed(i, own_record(i, t, lo, hi, w, slots, local))
        yield from deliver(local, "theta", i, t, {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w},
                           [d for d in range(len(bounds)) if d != i], ("w",) if bf16 else ())

    def initial(self, sc, theta, slots, bounds, t):
        # one broadcast per block: task i fetches block i only, and the driver JVM streams it
        # from a file (a parallelized collection would hold all of θ in the driver's heap)
        handles = [sc.broadcast(wire.pack(
                       "own", {}, join_own(theta[a:z], {k: v[a:z] for k, v in slots.items()})))
                   for a, z in bounds]
        emit_state = self.emit_state

        def emit(i, records):
            for _ in records:
                pass
            _, _, arrays = wire.unpack(handles[i].value)
            w, sl = split_own(arrays)
            return emit_state(i, t, bounds, w, sl)
        return rawrdd.map_raw(sc.parallelize(range(len(bounds)), len(bounds)), emit), handles

    def iteration(self, S, shards, cfg, model, bounds, acc, pending_model=None):
        n = len(bounds)  # (no update is pending in a sharded state: pending_model is unused)
        AG = rawrdd.shuffle_pairs(S, n)
        RS = rawrdd.shuffle_raw(rawrdd.co_union(AG, shards), self._gradient(cfg, model, bounds, acc), n)
        return rawrdd.map_raw(RS, self._update(model, bounds, cfg.get("wire_bf16", False),
                                               state_local(cfg)))

    @staticmethod
    def _gradient(cfg, model, bounds, acc):
        bf16 = ("g",) if cfg.get("wire_bf16") else ()
        local = cfg.get("local")

        def run(j, records):
            params, shard = split_records(records)
            t, theta = assemble(params, model.layout.size)
            g = local_gradient(cfg, model, theta, t, j, shard, acc)
            for i, (a, z) in enumerate(bounds):
                yield from deliver(local, "grad", j, t, {"src": j, "t": t}, {"g": g[a:z]}, [i],
                                   bf16, file=f"{j}-{i}")
            # the block's state rides back to its owner unchanged (into the host-local cache
            # when it arrived inline, at a job's first iteration)
            if local and not is_local(params, "own"):
                meta, w, slots = read_own(params)
                yield from keyed(j, own_record(j, t, meta["lo"], meta["hi"], w, slots, local))
            else:
                yield from keyed(j, raws_of(params, "own"))
        return run

    def _update(self, model, bounds, bf16=False, local=None):
        emit_state = self.emit_state
        n = len(bounds)

        def run(i, records):
            params, _ = split_records(records)
            meta, w, slots = read_own(params)
            grads = chunks_of(params, "grad")
            if grads.sources() != list(range(n)):
                raise RuntimeError(f"block {i} got gradients from partitions {grads.sources()}, "
                                   f"expected all {n}")
            g = grads.sum_into("g", scratch("gsum", w.size))
            train, bufs = model.layout.split_segments(*bounds[i])
            if model.optimizer.clipvalue is not None:  # elementwise: exact on a block
                clip_trainable(model.optimizer, g, train)
            apply_update(model.optimizer, w, g, slots, meta["t"] + 1,
                         segments=train, buffer_segments=bufs)
            return emit_state(i, meta["t"] + 1, bounds, w, slots, bf16, local)
        return run

    @staticmethod
    def own_block(model, bounds):
        def read(i, records):
            params, _ = split_records(records)
            return read_own(params)
        return read


class Replicated:
    """Every partition sends its gradient to all and applies the same update (one pass)."""

    name = "replicated"

    @staticmethod
    def check(model):
        pass

    def initial(self, sc, theta, slots, bounds, t):
        handle = sc.broadcast(wire.pack("rstate", {"t": t},
                                        join_own(theta, slots)))

        def emit(j, records):
            for _ in records:
                pass
            _, meta, arrays = wire.unpack(handle.value)
            return keyed(j, wire.chunks("rstate", meta, arrays))
        return rawrdd.map_raw(sc.parallelize(range(len(bounds)), len(bounds)), emit), [handle]

    def iteration(self, S, shards, cfg, model, bounds, acc, pending_model=None):
        """``S_t -> S_{t+1}``; the update pending in ``S_t`` is applied with
        ``pending_model``'s optimizer (default ``model``'s)."""
        n = len(bounds)
        settle = self.settle
        bf16 = ("g",) if cfg.get("wire_bf16") else ()
        pending_model = model if pending_model is None else pending_model
        local = state_local(cfg)

        def run(j, records):
            params, shard = split_records(records)
            t, w, slots = settle(pending_model, params)
            g = local_gradient(cfg, model, w, t, j, shard, acc)
            yield from deliver(local, "rgrad", j, t, {"src": j, "t": t}, {"g": g}, range(n), bf16)
            yield from keyed(j, to_self(local, "rstate", j, t, {"t": t},
                                         join_own(w, slots)))
        return rawrdd.map_raw(rawrdd.co_union(rawrdd.shuffle_pairs(S, n), shards), run)

    @staticmethod
    def settle(model, params):
        """θ_t and slots after applying the pending gradients (if any): ``(t, w, slots)``."""
        state = chunks_of(params, "rstate")
        if state.meta is None:
            raise RuntimeError("the partition holds no parameter state")
        t = state.meta["t"]
        arrays = {name: state.into(name, scratch("state." + name, state.sizes[(0, name)]))
                  for name in state.names()}
        w, slots = split_own(arrays)
        grads = chunks_of(params, "rgrad")
        if grads.meta is not None:
            if grads.meta["t"] != t:
                raise RuntimeError(f"gradients of step {grads.meta['t'] + 1} met the state of step {t}")
            g = grads.sum_into("g", scratch("gsum", w.size))
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


STRATEGIES = {"sharded": Sharded, "replicated": Replicated}


def state_local(cfg: dict):
    """The host-local cache settings for an iteration's state records: none for the last
    iteration of a job, whose state is the job's cut state (inline: it outlives the job)."""
    return None if cfg.get("cut", True) else cfg.get("local")


def values_per_partition(strategy: str, P: int, n: int, n_slots: int) -> float:
    """Values one partition sends, sends itself and updates per iteration (see ``choose``)."""
    if strategy == "sharded":  # blocks of P/n: 2 cross-partition moves, state + gradient to self
        return P * (2 * (n - 1) / n + (2 + n_slots) / n + (1 + n_slots) / n)
    # replicated: whole gradients to all; full state to itself; the full update (and settle)
    return P * ((n - 1) + (2 + n_slots) + 2 * (1 + n_slots))


def choose(allreduce: str, model, n: int, one_host: bool = False):
    """The strategy for ``allreduce`` ("auto", "sharded" or "replicated").

    ``auto`` picks ``replicated`` when the optimizer needs whole-gradient norms (clipnorm,
    LARS, LAMB), or when the values it moves and updates beyond ``sharded``'s cost less than
    the Python pass it saves (``values_per_partition``, ``PASS_SECONDS`` and the price per
    value: ``SECONDS_PER_VALUE_ONE_HOST`` when every task shares one host's cache
    (``one_host``), else ``SECONDS_PER_VALUE``): small models, few partitions. At N = 2 with
    SGD the two cross near P = 4.5e6 on one host (Adam: 1.7e6), 2e6 across hosts (Adam: 8e5).
    """
    if allreduce not in ("auto", *STRATEGIES):
        raise ValueError(f"allreduce must be 'auto', 'sharded' or 'replicated', got {allreduce!r}")
    if allreduce != "auto":
        strategy = STRATEGIES[allreduce]()
        strategy.check(model)
        return strategy
    opt = model.optimizer
    needs_norms = opt.needs_whole_gradient
    P, s = model.layout.size, len(opt.slot_names)
    extra = values_per_partition("replicated", P, n, s) - values_per_partition("sharded", P, n, s)
    price = SECONDS_PER_VALUE_ONE_HOST if one_host else SECONDS_PER_VALUE
    return Replicated() if needs_norms or extra * price < PASS_SECONDS else Sharded()
