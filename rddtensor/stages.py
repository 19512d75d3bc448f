"""Task-side pieces shared by the all-reduce strategies (``rddtensor.allreduce``).

Every record here is raw bytes (``rddtensor.wire``). Compute goes through ``layers.training``'s
step functions (``gradient_step``, ``apply_update``), the same ones the in-process loop calls.
Per-step stats (loss sum, rows, metric states) go to the driver through an accumulator keyed by
``(step, partition)``: a retried or recomputed task rewrites the same entry, never double-counts.
"""
from __future__ import annotations

import numpy as np
from pyspark.accumulators import AccumulatorParam

from layers.batching import local_batches, step_rng, steps_per_epoch
from layers.training import evaluate_arrays, gradient_step
from rddtensor import rawrdd, wire
from rddtensor.shards import read_shard


class StatsParam(AccumulatorParam):
    """Accumulator of ``{(step, partition): stats}``: merging is idempotent per key."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


def own_record(i: int, t: int, lo: int, hi: int, w, slots: dict) -> list:
    """Block ``[lo, hi)`` of θ_t with its optimizer slots: what its owner needs for a step."""
    return wire.frames("own", {"i": i, "t": t, "lo": lo, "hi": hi},
                     {"w": w, **{"slot." + k: v for k, v in slots.items()}})


def theta_record(i: int, t: int, lo: int, hi: int, w, bf16: bool = False) -> list:
    return wire.frames("theta", {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w},
                     bf16=("w",) if bf16 else ())


def split_own(arrays: dict):
    return arrays["w"], {k[5:]: v for k, v in arrays.items() if k.startswith("slot.")}


_SCRATCH: dict = {}


def scratch(name: str, size: int, dtype=np.float32) -> np.ndarray:
    """A worker-local buffer reused across tasks (a Python worker runs one task at a time).

    Fresh 40 MB arrays cost ~10k page faults each; reusing them changes speed, never results.
    """
    buf = _SCRATCH.get(name)
    if buf is None or buf.shape != (size,) or buf.dtype != dtype:
        buf = _SCRATCH[name] = np.empty(size, dtype=dtype)
    return buf


def assemble(records, size: int, dtype=np.float32):
    """θ from the blocks (``own``/``theta`` records) of an all-gather partition: ``(t, θ, own)``."""
    theta = scratch("theta", size, dtype)
    t, own = None, None
    for r in records:
        kind, meta, arrays = wire.unpack(r)
        if kind == "own":
            own = r
        if t is not None and meta["t"] != t:
            raise RuntimeError(f"all-gather mixed parameter versions {meta['t']} and {t}")
        t = meta["t"]
        theta[meta["lo"]:meta["hi"]] = arrays["w"]
    return t, theta, own


# --- worker-local cache of batch plans (speed only: a miss recomputes the same plan) -----------
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


def local_gradient(cfg: dict, model, theta, t: int, j: int, shard_records, acc):
    """Partition j's part of step ``t+1``: its rows of the global batch, their gradient at θ_t
    (normalised by the global batch size), and its stats sent to the driver."""
    meta, arrays = read_shard(shard_records)
    spe = steps_per_epoch(cfg["n_total"], cfg["batch_size"])
    epoch, b = divmod(t - cfg["t0"], spe)
    lo = cfg["offsets"][j]
    rows = _epoch_plan(cfg, epoch, lo, lo + meta["n"])[b]
    g, stats = gradient_step(model, theta, arrays["X"][rows], arrays["y"][rows],
                             loss=model.loss, n_batch=int(cfg["batch_sizes"][b]),
                             rng=step_rng(cfg["seed"], t + 1, j),
                             class_weight=cfg["class_weight"], metrics=model.metrics,
                             grad_out=scratch("grad", model.layout.size, theta.dtype))
    acc.add({(t + 1, j): stats})
    return g


def sum_in_order(parts):
    """Sum ``[(src, array), ...]`` in source order (bit-reproducible whatever the arrival order)."""
    parts = sorted(parts, key=lambda p: p[0])
    g = np.array(parts[0][1])
    for _, x in parts[1:]:
        g += x
    return g


def broadcast_emit(n_dest: int, own_block):
    """Each owner sends its (settled) block of θ to ``n_dest`` partitions of other data
    (validation, prediction): one record per owner per destination."""
    def run(i, records):
        meta, w, _ = own_block(i, list(records))
        rec = theta_record(meta["i"], meta["t"], meta["lo"], meta["hi"], w)
        for d in range(n_dest):
            yield rawrdd.key(d)
            yield rec
    return run


def eval_stage(model, batch_size: int):
    """Partition j of ``zip(AG, D)``: loss and metric stats of θ on all its rows (eval mode)."""
    def run(j, records):
        ag, shard_recs = rawrdd.pairs(records)
        _, theta, _ = assemble(ag, model.layout.size)
        _, arrays = read_shard(shard_recs)
        stats = evaluate_arrays(model, theta, arrays["X"], arrays["y"], loss=model.loss,
                                metrics=model.metrics, batch_size=batch_size)
        yield (j, stats)
    return run


def predict_stage(model, batch_size: int):
    """Partition j of ``zip(AG, D)``: model outputs for its rows, in row order."""
    def run(j, records):
        ag, shard_recs = rawrdd.pairs(records)
        _, theta, _ = assemble(ag, model.layout.size)
        _, arrays = read_shard(shard_recs)
        X, params = arrays["X"], model.layout.unflatten(theta)
        for a in range(0, len(X), batch_size):
            Y, _ = model.forward(params, X[a:a + batch_size], training=False)
            yield from np.asarray(Y)
    return run
