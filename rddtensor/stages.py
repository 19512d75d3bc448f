"""The task-side functions of one training iteration (DESIGN.md, "One training iteration").

Record layout, per partition (every count fixed so that ``rawrdd.zip_raw`` lines partitions up):

- shards ``D``:          N records  ``[shard_j, pad...]``
- state ``S_t``:        2N records  ``[stats | pad, state_i(θ_i, slots_i, t), pad...]``
- all-gather ``AG_t``:   N records  (``theta`` block i from each owner i)
- reduce-scatter ``RS``: 2N records (``grad`` slice from each partition j, and ``stats`` | pad)

Iteration ``t -> t+1`` is two Python stages: ``gradient_stage`` on ``zip(AG_t, D)`` and
``update_stage`` on ``zip(RS_t, S_t)``, whose output is cached and read by ``allgather_emit``
(the map side of ``AG_{t+1}``) in the same Spark task. Every function here only calls the step
functions of ``layers.training``: the in-process loop calls the very same ones.
"""
from __future__ import annotations

import numpy as np

from layers.batching import local_batches, step_rng, steps_per_epoch
from layers.training import apply_update, batch_stats, empty_stats, gradient_step, merge_stats
from rddtensor import rawrdd, wire
from rddtensor.shards import read_shard

# --- stats records (loss sum, row count, mergeable metric states) ---------------------------


def pack_stats(stats: dict) -> bytes:
    arrays, spec = {}, []
    for m, s in enumerate(stats["states"]):
        if s is None:
            spec.append(-1)
            continue
        spec.append(len(s))
        for k, a in enumerate(s):
            arrays[f"s{m}_{k}"] = np.asarray(a)
    return wire.pack("stats", {"loss": stats["loss"], "count": stats["count"], "spec": spec}, arrays)


def unpack_stats(buf) -> dict:
    _, meta, arrays = wire.unpack(buf)
    states = [None if n < 0 else tuple(np.array(arrays[f"s{m}_{k}"]) for k in range(n))
              for m, n in enumerate(meta["spec"])]
    return {"loss": meta["loss"], "count": meta["count"], "states": states}


def pack_state(i: int, t: int, w, slots: dict) -> bytes:
    return wire.pack("state", {"i": i, "t": t}, {"w": w, **{"slot." + k: v for k, v in slots.items()}})


def read_state(records):
    """``(i, t, w, slots, stats_or_None)`` from a partition of the state RDD ``S``."""
    state = stats = None
    for r in records:
        kind = wire.kind_of(r)
        if kind == "state":
            state = wire.unpack(r)
        elif kind == "stats":
            stats = unpack_stats(r)
    _, meta, arrays = state
    slots = {k[5:]: v for k, v in arrays.items() if k.startswith("slot.")}
    return meta["i"], meta["t"], arrays["w"], slots, stats


def state_partition(n: int, stats_bytes, state_bytes):
    yield stats_bytes if stats_bytes is not None else wire.PAD
    yield state_bytes
    for _ in range(2 * n - 2):
        yield wire.PAD


# --- worker-local cache: batch plans per epoch (speed only; a miss recomputes) -----------------
_PLAN_CACHE: dict = {}


def _epoch_plan(cfg, epoch, lo, hi):
    key = (cfg["n_total"], cfg["batch_size"], cfg["seed"], epoch, cfg["shuffle"], lo, hi)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = local_batches(cfg["n_total"], cfg["batch_size"], cfg["seed"], epoch,
                             cfg["shuffle"], lo, hi)
        if len(_PLAN_CACHE) > 8:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


def assemble(records, size: int, dtype=np.float32):
    """Concatenate the N ``theta`` blocks of an all-gather partition into θ (block order)."""
    blocks = sorted((wire.unpack(r) for r in records), key=lambda rec: rec[1]["i"])
    t = blocks[0][1]["t"]
    theta = np.empty(size, dtype=dtype)
    for _, meta, arrays in blocks:
        if meta["t"] != t:
            raise RuntimeError(f"all-gather mixed versions {meta['t']} and {t}")
        theta[meta["lo"]:meta["hi"]] = arrays["w"]
    return t, theta


# --- the stages --------------------------------------------------------------------------------
def allgather_emit(n_dest: int, bounds):
    """Map side of the all-gather: owner i sends its block of θ_t to every destination."""
    def emit(i, records):
        i, t, w, _, _ = read_state(records)
        lo, hi = bounds[i]
        rec = wire.pack("theta", {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w})
        for d in range(n_dest):
            yield rawrdd.key(d)
            yield rec
    return emit


def gradient_stage(cfg: dict, model, bounds):
    """Partition j: assemble θ_t, take its rows of step t+1's global batch, emit the gradient
    slice of every block (keyed by block id) and its stats (to block 0's owner)."""
    N = len(bounds)
    sizes = cfg["batch_sizes"]
    spe = steps_per_epoch(cfg["n_total"], cfg["batch_size"])

    def run(j, records):
        ag, shard_recs = rawrdd.pairs(records)
        t, theta = assemble(ag, model.layout.size)
        meta, arrays = read_shard(shard_recs)
        lo = cfg["offsets"][j]
        epoch, b = divmod(t, spe)
        rows = _epoch_plan(cfg, epoch, lo, lo + meta["n"])[b]
        X, y = arrays["X"][rows], arrays["y"][rows]
        g, stats = gradient_step(model, theta, X, y, loss=model.loss, n_batch=int(sizes[b]),
                                 rng=step_rng(cfg["seed"], t + 1, j),
                                 class_weight=cfg["class_weight"], metrics=model.metrics)
        for i, (a, z) in enumerate(bounds):
            yield rawrdd.key(i)
            yield wire.pack("grad", {"src": j, "t": t}, {"g": g[a:z]})
            yield rawrdd.key(i)
            yield pack_stats(stats) if i == 0 else wire.PAD
    return run


def update_stage(model, bounds, reset_stats: bool):
    """Owner i: sum the N gradient slices of block i in partition order, update θ_i and its
    slots with the optimizer, and carry the stats accumulated on owner 0."""
    N = len(bounds)
    metrics = model.metrics

    def run(i, records):
        rs, state_recs = rawrdd.pairs(records)
        i, t, w, slots, acc = read_state(state_recs)
        grads, incoming = [], []
        for r in rs:
            kind = wire.kind_of(r)
            if kind == "grad":
                _, meta, arrays = wire.unpack(r)
                grads.append((meta["src"], arrays["g"]))
            elif kind == "stats":
                incoming.append(r)
        grads.sort(key=lambda p: p[0])
        g = np.array(grads[0][1])
        for _, gj in grads[1:]:
            g += gj
        w = np.array(w)
        slots = {k: np.array(v) for k, v in slots.items()}
        lo, hi = bounds[i]
        apply_update(model.optimizer, w, g, slots, t + 1, segments=model.layout.segments(lo, hi))
        stats_out = None
        if i == 0:
            acc = empty_stats(metrics) if (reset_stats or acc is None) else acc
            for r in incoming:  # stats records carry no source order issue: sums of counts
                acc = merge_stats(metrics, acc, unpack_stats(r))
            stats_out = pack_stats(acc)
        return state_partition(N, stats_out, pack_state(i, t + 1, w, slots))
    return run


def eval_stage(model, batch_size: int):
    """Partition j of ``zip(AG, D)``: loss and metric stats of θ on all its rows (eval mode)."""
    from layers.training import evaluate_arrays

    def run(j, records):
        ag, shard_recs = rawrdd.pairs(records)
        _, theta = assemble(ag, model.layout.size)
        meta, arrays = read_shard(shard_recs)
        stats = evaluate_arrays(model, theta, arrays["X"], arrays["y"], loss=model.loss,
                                metrics=model.metrics, batch_size=batch_size)
        yield pack_stats(stats)
    return run


def predict_stage(model, batch_size: int):
    """Partition j of ``zip(AG, D)``: model outputs for its rows, in row order."""
    def run(j, records):
        ag, shard_recs = rawrdd.pairs(records)
        _, theta = assemble(ag, model.layout.size)
        _, arrays = read_shard(shard_recs)
        X, params = arrays["X"], model.layout.unflatten(theta)
        for a in range(0, len(X), batch_size):
            Y, _ = model.forward(params, X[a:a + batch_size], training=False)
            yield from np.asarray(Y)
    return run
