"""Two ways to all-reduce gradients through Spark's shuffle, behind one interface.

``Sharded`` (the design's reduce-scatter + all-gather): θ and the optimizer slots are cut into N
blocks; owner i updates block i. Each partition moves ``2(N-1)/N·P`` values per iteration (what a
ring all-reduce moves) but an iteration is two Python passes.

``Replicated`` (all-to-all gradient exchange): every partition sends its whole gradient to every
partition, and each applies the identical update to its own full copy of θ and the slots (same
inputs, same fixed summation order: bit-identical replicas). One Python pass per iteration, but
``(N-1)·P`` values out of each partition. On Spark a Python pass costs ~90 ms of scheduling and
worker round trips (see DESIGN.md), so for small models or few partitions ``Replicated`` wins; at
N = 2 both move exactly the same number of gradient/weight bytes.

``initial`` ships driver-side θ (start of a fit) by broadcast and returns the state RDD and
the broadcast handles to destroy once that state is cut loose from its lineage.

A strategy produces the *state RDD* ``S``: the raw pre-shuffle records of the last pass
(``key(dest), payload`` pairs). ``iteration`` maps ``S_t -> S_{t+1}``; ``own_block`` reads the
settled block i of θ_t (and its slots) from partition i of ``shuffle_pairs(S_t)``.
"""
from __future__ import annotations

import numpy as np

from layers.training import apply_update, optimizer_step
from rddtensor import rawrdd, wire
from rddtensor.stages import (assemble, local_gradient, own_record, split_own, sum_in_order,
                              theta_record)

PASS_SECONDS = 0.09       # measured cost of one Python pass on local[2] (DESIGN.md)
BYTES_PER_SECOND = 5e8    # measured shuffle throughput per partition, local disk


def _unpack_all(records):
    return [wire.unpack(r) for r in records if len(r)]


def _grads_and_state(records, grad_kind: str, state_kind: str):
    """``(sum of the gradient slices in source order, state meta, writable w, writable slots)``.

    ``None`` for the sum when no gradient arrived (the replicated strategy's first pass).
    """
    grads, state = [], None
    for kind, meta, arrays in _unpack_all(records):
        if kind == grad_kind:
            grads.append((meta["src"], arrays["g"]))
        elif kind == state_kind:
            state = (meta, arrays)
    meta, arrays = state
    w, slots = split_own(arrays)
    if not grads:
        return None, meta, w, slots
    return sum_in_order(grads), meta, np.array(w), {k: np.array(v) for k, v in slots.items()}


class Sharded:
    """Reduce-scatter gradients to block owners, update there, all-gather θ (two passes)."""

    name = "sharded"

    @staticmethod
    def shard_records(n: int) -> int:
        return n  # the all-gather delivers one block per owner

    @staticmethod
    def check(model):
        opt = model.optimizer
        if opt.clipnorm is not None or type(opt).__name__ in ("LARS", "LAMB"):
            what = "clipnorm" if opt.clipnorm is not None else type(opt).__name__
            raise ValueError(f"{what} needs norms over the whole gradient, which the sharded "
                             "all-reduce does not have; use allreduce='replicated'")

    @staticmethod
    def emit_state(i, t, bounds, w, slots, bf16=False):
        lo, hi = bounds[i]
        other = theta_record(i, t, lo, hi, w, bf16) if len(bounds) > 1 else None
        for d in range(len(bounds)):
            yield rawrdd.key(d)
            yield own_record(i, t, lo, hi, w, slots) if d == i else other

    def initial(self, sc, theta, slots, bounds, t):
        # one broadcast per block: task i fetches block i only, and the driver JVM streams it
        # from a file (a parallelized collection would hold all of θ in the driver's heap)
        handles = [sc.broadcast(b"".join(own_record(i, t, a, z, theta[a:z],
                                                    {k: v[a:z] for k, v in slots.items()})))
                   for i, (a, z) in enumerate(bounds)]
        emit_state = self.emit_state

        def emit(i, records):
            for _ in records:
                pass
            _, _, arrays = wire.unpack(handles[i].value)
            w, sl = split_own(arrays)
            return emit_state(i, t, bounds, w, sl)
        return rawrdd.map_raw(sc.parallelize(range(len(bounds)), len(bounds)), emit), handles

    def iteration(self, S, shards, cfg, model, bounds, acc):
        n = len(bounds)
        AG = rawrdd.shuffle_pairs(S, n)
        RS = rawrdd.shuffle_raw(rawrdd.zip_raw(AG, shards), self._gradient(cfg, model, bounds, acc), n)
        return rawrdd.map_raw(RS, self._update(model, bounds, cfg.get("wire_bf16", False)))

    @staticmethod
    def _gradient(cfg, model, bounds, acc):
        bf16 = ("g",) if cfg.get("wire_bf16") else ()

        def run(j, records):
            ag, shard_records = rawrdd.pairs(records)
            t, theta, own = assemble(ag, model.layout.size)
            g = local_gradient(cfg, model, theta, t, j, shard_records, acc)
            for i, (a, z) in enumerate(bounds):
                yield rawrdd.key(i)
                yield wire.frames("grad", {"src": j, "t": t}, {"g": g[a:z]}, bf16=bf16)
            yield rawrdd.key(j)
            yield own  # the block's state rides back to its owner unchanged
        return run

    def _update(self, model, bounds, bf16=False):
        emit_state = self.emit_state

        def run(i, records):
            g, meta, w, slots = _grads_and_state(records, "grad", "own")
            train, bufs = model.layout.split_segments(*bounds[i])
            apply_update(model.optimizer, w, g, slots, meta["t"] + 1,
                         segments=train, buffer_segments=bufs)
            return emit_state(i, meta["t"] + 1, bounds, w, slots, bf16)
        return run

    @staticmethod
    def own_block(model, bounds):
        def read(i, records):
            for kind, meta, arrays in _unpack_all(records):
                if kind == "own":
                    w, slots = split_own(arrays)
                    return meta, w, slots
            raise RuntimeError(f"partition {i} of the parameter state holds no block")
        return read


class Replicated:
    """Every partition sends its gradient to all and applies the same update (one pass)."""

    name = "replicated"

    @staticmethod
    def shard_records(n: int) -> int:
        return n + 1  # N gradients + the partition's own state

    @staticmethod
    def check(model):
        pass

    def initial(self, sc, theta, slots, bounds, t):
        n = len(bounds)
        handle = sc.broadcast(wire.pack("rstate", {"t": t},
                                        {"w": theta, **{"slot." + k: v for k, v in slots.items()}}))

        def emit(j, records):
            for _ in records:
                pass
            yield rawrdd.key(j)
            yield handle.value
            for k in range(n):  # placeholders keep the record count fixed for zip
                yield rawrdd.key(j)
                yield wire.pack("nograd", {"src": k})
        return rawrdd.map_raw(sc.parallelize(range(n), n), emit), [handle]

    def iteration(self, S, shards, cfg, model, bounds, acc):
        n = len(bounds)
        settle = self.settle
        bf16 = ("g",) if cfg.get("wire_bf16") else ()

        def run(j, records):
            pending, shard_records = rawrdd.pairs(records)
            t, w, slots = settle(model, pending)
            g = local_gradient(cfg, model, w, t, j, shard_records, acc)
            grad = wire.frames("rgrad", {"src": j, "t": t}, {"g": g}, bf16=bf16)
            for d in range(n):
                yield rawrdd.key(d)
                yield grad
            yield rawrdd.key(j)
            yield wire.frames("rstate", {"t": t}, {"w": w, **{"slot." + k: v for k, v in slots.items()}})
        return rawrdd.map_raw(rawrdd.zip_raw(rawrdd.shuffle_pairs(S, n), shards), run)

    @staticmethod
    def settle(model, records):
        """θ_t and slots after applying the pending gradients (if any): ``(t, w, slots)``."""
        g, meta, w, slots = _grads_and_state(records, "rgrad", "rstate")
        t = meta["t"]
        if g is not None:
            optimizer_step(model.optimizer, w, g, slots, t + 1, model.layout.split_segments())
            t += 1
        return t, w, slots

    def own_block(self, model, bounds):
        settle = self.settle

        def read(i, records):
            t, w, slots = settle(model, records)
            lo, hi = bounds[i]
            return ({"i": i, "t": t, "lo": lo, "hi": hi}, w[lo:hi],
                    {k: v[lo:hi] for k, v in slots.items()})
        return read


STRATEGIES = {"sharded": Sharded, "replicated": Replicated}


def choose(allreduce: str, model, n: int):
    """The strategy for ``allreduce`` ("auto", "sharded" or "replicated").

    ``auto`` picks ``replicated`` when the extra bytes it moves, ``(N-2)·P`` float32 values per
    partition, cost less than the Python pass it saves, or when the optimizer needs whole-gradient
    norms (clipnorm, LARS, LAMB); otherwise ``sharded``.
    """
    if allreduce not in ("auto", *STRATEGIES):
        raise ValueError(f"allreduce must be 'auto', 'sharded' or 'replicated', got {allreduce!r}")
    if allreduce != "auto":
        strategy = STRATEGIES[allreduce]()
        strategy.check(model)
        return strategy
    opt = model.optimizer
    needs_norms = opt.clipnorm is not None or type(opt).__name__ in ("LARS", "LAMB")
    extra_seconds = max(n - 2, 0) * model.layout.size * 4 / BYTES_PER_SECOND
    return Replicated() if needs_norms or extra_seconds < PASS_SECONDS else Sharded()
