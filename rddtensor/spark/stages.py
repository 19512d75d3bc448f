"""Task-side pieces shared by the all-reduce strategies (``rddtensor.spark.allreduce``).

Every record here is raw bytes (``rddtensor.spark.wire``). Compute goes through ``rddtensor.training.steps``'s
step functions (``gradient_step``, ``apply_update``), the same ones the in-process loop calls.
Per-step stats (loss sum, rows, metric states) go to the driver through an accumulator keyed by
``(step, partition)``: a retried or recomputed task rewrites the same entry, never double-counts.
Record kinds are ``config.Kind``; ``cache`` arguments are the job's ``config.CacheSettings``
(``None``: the host-local cache is off for these records).
"""
from __future__ import annotations

import numpy as np
from pyspark.accumulators import AccumulatorParam

from rddtensor.training.batching import (BlockShuffle, block_windows, count_rows,
                                         local_batches, step_rng, take_rows,
                                         windows_to_prefetch)
from rddtensor.training.steps import (empty_stats, evaluate_arrays, gradient_step, merge_stats,
                                      sum_weights)
from rddtensor.spark import device, localcache, rawrdd, wire, worker
from rddtensor.spark.config import CacheSettings, Kind, StepConfig
from rddtensor.spark.shards import model_inputs, model_targets, read_shard


class StatsParam(AccumulatorParam):
    """Accumulator of ``{(step, partition): stats}``: merging is idempotent per key."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


def own_record(i: int, t: int, lo: int, hi: int, w, slots: dict,
               cache: CacheSettings | None = None):
    """Block ``[lo, hi)`` of θ_t with its optimizer slots, what its owner needs for a step:
    chunk records of kind ``own`` (``wire.chunks``), or a token of the host-local cache when
    ``cache`` (the job's cache settings) allows (``to_self``)."""
    return to_self(cache, Kind.OWN, i, t, {"i": i, "t": t, "lo": lo, "hi": hi},
                   join_own(w, slots))


def theta_record(i: int, t: int, lo: int, hi: int, w, bf16: bool = False):
    """Block ``[lo, hi)`` of θ_t for a non-owner: chunk records of kind ``theta``."""
    return wire.chunks(Kind.THETA, {"i": i, "t": t, "lo": lo, "hi": hi}, {"w": w},
                       bf16=("w",) if bf16 else ())


def join_own(w, slots: dict) -> dict:
    """θ (or a block of it) and its optimizer slots as the named arrays of one record
    (``w``, ``slot.<name>``); ``split_own`` is the inverse."""
    return {"w": w, **{"slot." + k: v for k, v in slots.items()}}


def split_own(arrays: dict):
    return arrays["w"], {k[5:]: v for k, v in arrays.items() if k.startswith("slot.")}


def split_records(records):
    """A task's input as ``(parameter records, data shard records)``: each parameter record is
    ``(kind, meta, x, raw bytes)`` (a decoded chunk), shard records (inline, or tokens of the
    data store: ``rddtensor.spark.shards.read_shard``) stay raw bytes. A token of
    the host-local cache (``rddtensor.spark.localcache``) stands for the chunks of the record it
    names: each of them carries the token as its raw bytes."""
    params, shard = [], []
    for r in records:
        if not len(r):
            continue
        kind, meta, arrays = wire.unpack(r)
        if kind in (Kind.SHARD, Kind.STORE):  # inline, or a token of the data store
            shard.append(r)
        elif kind == Kind.LOCAL:
            params.extend((k, m, x, r) for k, m, x in localcache.expand(meta))
        else:
            params.append((kind, meta, arrays["x"], r))
    return params, shard


def to_self(cache: CacheSettings | None, kind: Kind, part, t: int, meta: dict, arrays: dict,
            bf16: tuple = (), serve: str | None = None):
    """The records that carry a record of ``kind`` from partition ``part`` to itself: one token
    of the host-local cache when the job's ``cache`` settings allow it (and the write worked),
    else its chunks (``wire.chunks``). ``t`` versions the file; ``serve``: see
    ``localcache.put``."""
    if cache is not None:
        token = localcache.put(cache, kind, part, t, meta, arrays, bf16, serve)
        if token is not None:
            return [token]
    return wire.chunks(kind, meta, arrays, bf16)


def keyed(dest: int, records):
    """``key(dest), record`` pairs: ``records`` addressed to partition ``dest``."""
    for rec in records:
        yield rawrdd.key(dest)
        yield rec


def deliver(cache: CacheSettings | None, kind: Kind, src: int, t: int, meta: dict, arrays: dict,
            dests, bf16: tuple = (), file=None):
    """``key(d), record`` pairs that deliver one record of ``kind`` from partition ``src`` to
    every partition in ``dests``.

    Through the host-local cache (``to_self``) when the job's ``cache`` settings allow it: to
    ``src`` itself always, to other partitions on the same host (``cache.shares_host``), and
    with the peer transport to partitions on other hosts too (``cache.serves``: this worker
    serves the file, ``rddtensor.spark.peers``). The record is written once (file
    ``<kind>-<file or src>``) and each of those destinations gets its token; the others get its
    chunks."""
    dests = list(dests)
    serve = None if cache is None else next(
        (a for a in (cache.serves(src, d) for d in dests) if a is not None), None)
    cached = inline = None
    for d in dests:
        near = cache is not None and cache.shares_host(src, d)
        if near or serve is not None:
            if cached is None:
                cached = list(to_self(cache, kind, src if file is None else file, t, meta,
                                      arrays, bf16, serve))
                # other hosts can read it: chunks (the write failed), or a served token
                token = len(cached) == 1 and isinstance(cached[0], (bytes, bytearray))
                reach = not token or localcache.served(cached[0])
            if near or reach:
                yield from keyed(d, cached)
                continue
        if inline is None:
            inline = list(wire.chunks(kind, meta, arrays, bf16))
        yield from keyed(d, inline)


def raws_of(params, kind: Kind):
    """The raw records (chunks or tokens, each once) that delivered the ``kind`` records."""
    seen = set()
    for k, _, _, raw in params:
        if k == kind and id(raw) not in seen:
            seen.add(id(raw))
            yield raw


def is_local(params, kind: Kind) -> bool:
    """Whether the ``kind`` records came through the host-local cache (as a token)."""
    raw = next((raw for k, _, _, raw in params if k == kind), None)
    return raw is not None and wire.unpack(raw)[0] == Kind.LOCAL


def chunks_of(params, kind: Kind) -> wire.Chunks:
    """The chunk records of ``kind`` among decoded parameter records."""
    got = wire.Chunks()
    for k, meta, x, _ in params:
        if k == kind:
            got.add(meta, x)
    return got


def read_own(params):
    """``(meta, w, slots)`` of the ``own`` block among decoded parameter records (new,
    writable arrays)."""
    got = chunks_of(params, Kind.OWN)
    if got.meta is None:
        raise RuntimeError("the partition holds no parameter block")
    arrays = {name: got.into(name) for name in got.names()}
    return got.meta, *split_own(arrays)


def assemble(params, size: int, dtype=np.float32):
    """θ_t from the blocks (``own``/``theta`` chunks) of an all-gather partition: ``(t, θ)``."""
    theta = worker.current().scratch("theta", size, dtype)
    t, filled = None, 0
    for kind, meta, x, _ in params:
        if kind not in (Kind.OWN, Kind.THETA) or meta["name"] != "w":
            continue
        if t is not None and meta["t"] != t:
            raise RuntimeError(f"all-gather mixed parameter versions {meta['t']} and {t}")
        t = meta["t"]
        a = meta["lo"] + meta["at"]
        theta[a:a + x.size] = x
        filled += x.size
    if filled != size:
        raise RuntimeError(f"all-gather delivered {filled} of {size} parameters")
    return t, theta


def local_gradient(step: StepConfig, model, theta, t: int, j: int, shard_records, acc,
                   weight_sum=None):
    """Partition j's part of step ``t+1``: its rows of the global batch, their gradient at θ_t
    (normalised by the global batch size, or with sample weights (shard array ``"w"``) by
    ``weight_sum``, the weights' sum over the global batch), and its stats sent to the
    driver."""
    meta, arrays = read_shard(shard_records)
    here = worker.current()
    epoch, b = divmod(t - step.t0, step.steps_per_epoch)
    lo = step.offsets[j]
    rows = here.epoch_plan(step, epoch, lo, lo + meta["n"])[b]
    w, grad_out = theta, None
    sample_weight = arrays.take("w", rows) if "w" in arrays else None
    # --- GPU executors (rddtensor.spark.device): the shard stays on the task's GPU, θ_t goes in and
    # the gradient comes out through pinned memory; None (no GPU, device="cpu") is pure NumPy
    gpu = device.task_placement(getattr(model, "device", "auto"), meta, arrays)
    if gpu is not None:
        w, X, y, rows = gpu.step_inputs(theta, meta, arrays, rows)
        X, y = take_rows(X, rows), take_rows(y, rows)
    else:  # only the batch's rows are read (from the data store: nothing else is mapped)
        if isinstance(step.shuffle, BlockShuffle) and arrays.reader is not None:
            read_ahead(here, step, epoch, b, lo, meta["n"], arrays.reader)
        X, y = model_inputs(arrays, rows), model_targets(arrays, rows)
        grad_out = here.scratch("grad", model.layout.size, theta.dtype)
    g, stats = gradient_step(model, w, X, y,
                             loss=model.loss, n_batch=int(step.batch_sizes[b]),
                             rng=step_rng(step.seed, t + 1, j),
                             class_weight=step.class_weight, metrics=model.metrics,
                             grad_out=grad_out, sample_weight=sample_weight,
                             weight_sum=weight_sum)
    if gpu is not None:
        g = gpu.gradient_to_host(g)
    acc.add({(t + 1, j): stats})
    return g


def read_ahead(here, step: StepConfig, epoch: int, b: int, lo: int, n: int, reader) -> None:
    """A ``BlockShuffle`` fit on stored rows: ask the kernel to read the partition's runs of the
    windows step ``b`` enters and of the next one (``batching.windows_to_prefetch``,
    ``PartitionReader.prefetch``: ``MADV_WILLNEED``), so that a window's blocks come from disk
    as a few sequential reads, ahead of the batches that gather from them. Speed only: the
    rows a step reads never change, and a failed hint is ignored. The windows' runs of an
    epoch are kept with the worker's batch plans."""
    key = ("windows", step.n_total, step.seed, epoch, step.shuffle, lo, lo + n)
    windows = here.plans.get(key)
    if windows is None:
        windows = here.plans[key] = block_windows(step.n_total, step.seed, epoch, step.shuffle,
                                                  lo, lo + n)
    bounds, runs = windows
    try:
        for w in windows_to_prefetch(bounds, b, step.batch_size):
            for a, z in runs[w].tolist():
                for name in reader.names:
                    reader.prefetch(name, a, z)
    except (OSError, ValueError):  # (a hint: the reads themselves report real trouble)
        pass


def batch_weight_sums(step: StepConfig, epochs):
    """Partition j's share of each step's weight sum: ``(j, sums)``, ``sums[k, b]`` the sum of
    its sample weights (shard array ``"w"``) in batch ``b`` of ``epochs[k]`` (``sum_weights``:
    float64, in the batch's row order)."""
    epochs = list(epochs)

    def run(j, records):
        _, shard = split_records(records)
        meta, arrays = read_shard(shard)
        w, lo = arrays["w"], step.offsets[j]
        sums = np.zeros((len(epochs), step.steps_per_epoch), np.float64)
        for k, e in enumerate(epochs):
            for b, rows in enumerate(local_batches(step.n_total, step.batch_size, step.seed, e,
                                                   step.shuffle, lo, lo + meta["n"])):
                sums[k, b] = sum_weights(w[rows])
        yield (j, sums)
    return run


def broadcast_emit(n_dest: int, own_block):
    """Each owner sends its (settled) block of θ to ``n_dest`` partitions of other data
    (validation, prediction): one record per owner per destination."""
    def run(i, records):
        meta, w, _ = own_block(i, list(records))
        recs = list(theta_record(meta["i"], meta["t"], meta["lo"], meta["hi"], w))
        for d in range(n_dest):
            yield from keyed(d, recs)
    return run


def eval_stage(model, batch_size: int):
    """Partition j of ``co_union(AG, D)``: loss and metric stats of θ on all its rows (eval
    mode)."""
    def run(j, records):
        worker.current()
        ag, shard_recs = split_records(records)
        _, theta = assemble(ag, model.layout.size)
        _, arrays = read_shard(shard_recs)
        stats = evaluate_arrays(model, theta, model_inputs(arrays), model_targets(arrays), loss=model.loss,
                                metrics=model.metrics, batch_size=batch_size)
        yield (j, stats)
    return run


def stream_eval_stage(model, batch_size: int, theta, stack, feature_shape):
    """Partition j of a data ``Source``'s rows: loss and metric stats of ``theta`` (a broadcast
    of the driver's weights) on all its rows, decoded one chunk at a time (``stack(records,
    feature_shape, j, True)``): one pass, nothing cached, a chunk in memory."""
    def run(j, records):
        worker.current()
        w = theta.value
        stats = empty_stats(model.metrics)
        for arrays in stack(records, feature_shape, j, True):
            stats = merge_stats(model.metrics, stats, evaluate_arrays(
                model, w, model_inputs(arrays), model_targets(arrays), loss=model.loss, metrics=model.metrics,
                batch_size=batch_size))
        yield (j, stats)
    return run


def stream_predict_stage(model, batch_size: int, theta, stack, feature_shape):
    """Partition j of a data ``Source``'s rows: the model's outputs for its rows, in row order,
    decoded and predicted one chunk at a time (a chunk in memory, nothing cached). A row's
    record is its output array, or a tuple of one per output for a model with several."""
    def run(j, records):
        worker.current()
        params = model.layout.unflatten(theta.value)
        for arrays in stack(records, feature_shape, j, True):
            X = model_inputs(arrays)
            for a in range(0, count_rows(X), batch_size):
                Y, _ = model.forward(params, take_rows(X, slice(a, a + batch_size)),
                                     training=False)
                if isinstance(Y, (list, tuple)):  # several outputs: a tuple per row
                    yield from zip(*[np.asarray(y) for y in Y])
                else:
                    yield from np.asarray(Y)
    return run
