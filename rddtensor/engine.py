"""The distributed engine: ``model.fit`` on an RDD or DataFrame.

Parameters (θ) and optimizer slots live block-partitioned on an RDD; each iteration all-gathers θ
through one shuffle and reduce-scatters gradients through another (``rddtensor.stages``). The
driver builds ``iterations_per_job`` iterations of lineage, runs them as one Spark job, and
receives only the stats of that group (loss sum, row count, metric states: O(classes)). The
lineage is cut after every job (``localCheckpoint``), and the RDDs of finished iterations are
unpersisted, so cached blocks and driver memory stay flat however long the run.
"""
from __future__ import annotations

import copy

import numpy as np
from pyspark import StorageLevel

from layers.batching import batch_sizes, steps_per_epoch
from layers.params import block_bounds
from layers.training import empty_stats, fit_loop, merge_stats, stats_logs
from rddtensor import rawrdd, wire
from rddtensor.errors import spark_errors
from rddtensor.shards import Shards, make_shards
from rddtensor.stages import (allgather_emit, eval_stage, gradient_stage, pack_state,
                              predict_stage, read_state, state_partition, unpack_stats,
                              update_stage)

_LEVEL = StorageLevel.MEMORY_AND_DISK


def skeleton(model):
    """A copy of ``model`` without its weights, for task closures (kilobytes, not O(P))."""
    s = copy.copy(model)
    s.theta, s.params, s.slots = None, {}, {}
    return s


def initial_state(sc, theta, slots: dict, bounds, t: int):
    """The state RDD ``S_t`` from driver-side θ and slots (start of a fit only)."""
    n = len(bounds)
    recs = [pack_state(i, t, theta[a:z], {k: v[a:z] for k, v in slots.items()})
            for i, (a, z) in enumerate(bounds)]
    base = sc.parallelize(recs, n)
    return rawrdd.map_raw(base, lambda i, it: state_partition(n, None, next(iter(it)))).persist(_LEVEL)


def allgather(S, bounds, n_dest: int):
    """``AG``: every destination partition receives all N blocks of θ from ``S``."""
    return rawrdd.shuffle_raw(S, allgather_emit(n_dest, bounds), n_dest)


def gather_state(S, size: int, slot_names):
    """θ, slots and step from a state RDD, assembled on the driver (end of a fit)."""
    with spark_errors():
        parts = rawrdd.map_raw(S, lambda i, it: [r for r in it if wire.kind_of(r) == "state"]).collect()
    theta = np.empty(size, np.float32)
    slots = {k: np.empty(size, np.float32) for k in slot_names}
    t = 0
    for rec in parts:
        _, meta, arrays = wire.unpack(rec)
        i, t, w, sl, _ = read_state([rec])
        lo, hi = _bounds_of(meta, size, len(parts), i)
        theta[lo:hi] = w
        for k in slots:
            slots[k][lo:hi] = sl[k]
    return theta, slots, t


def _bounds_of(meta, size, n, i):
    return block_bounds(size, n)[i]


def state_tensor(S, size: int, bounds, name: str = "w"):
    """A lazy ``BlockTensor`` view of θ (``name="w"``) or one optimizer slot in state ``S``."""
    from rddtensor.tensor import BlockTensor
    def view(i, it):
        _, _, w, slots, _ = read_state(it)
        a, z = bounds[i]
        x = w if name == "w" else slots[name]
        yield wire.pack("block", {"i": i, "lo": a, "hi": z, "size": size, "n": len(bounds)}, {"x": x})
    return BlockTensor(rawrdd.map_raw(S, view), size, len(bounds), np.float32)


class DistributedRunner:
    """Runs epochs of synchronous SGD on Spark for ``fit_loop`` (same interface as LocalRunner)."""

    engine = "distributed"

    def __init__(self, model, shards: Shards, *, batch_size, shuffle, seed, class_weight,
                 iterations_per_job: int):
        self.model, self.shards = model, shards
        self.sc = shards.rdd.ctx
        self.N = shards.n_partitions
        self.n_total = shards.n_total
        self.bounds = block_bounds(model.layout.size, self.N)
        self.skel = skeleton(model)
        self.k = int(iterations_per_job)
        self.t0 = model.step
        self.cfg = {"n_total": self.n_total, "batch_size": batch_size, "seed": seed,
                    "shuffle": shuffle, "offsets": shards.offsets, "t0": self.t0,
                    "batch_sizes": batch_sizes(self.n_total, batch_size).tolist(),
                    "class_weight": class_weight}
        self.spe = steps_per_epoch(self.n_total, batch_size)
        self.S = initial_state(self.sc, model.theta, model.slots, self.bounds, model.step)
        self.t = model.step
        self._ag = None  # (t, n_dest, AG rdd) reused by validation and the next gradient stage

    def _allgather(self, n_dest=None):
        n_dest = self.N if n_dest is None else n_dest
        if self._ag is None or self._ag[:2] != (self.t, n_dest):
            self._ag = (self.t, n_dest, allgather(self.S, self.bounds, n_dest))
        return self._ag[2]

    def _run_group(self, steps: int) -> dict:
        created = []
        S = self.S
        for k in range(steps):
            AG = self._allgather() if k == 0 else allgather(S, self.bounds, self.N)
            RS = rawrdd.shuffle_raw(rawrdd.zip_raw(AG, self.shards.rdd),
                                    gradient_stage(self.cfg, self.skel, self.bounds), self.N)
            S = rawrdd.map_raw(rawrdd.zip_raw(RS, S),
                               update_stage(self.skel, self.bounds, reset_stats=(k == 0)))
            S.persist(_LEVEL)
            created.append(S)
        S.localCheckpoint()
        with spark_errors():
            stats = unpack_stats(bytes(S._jrdd.first()))
        for old in [self.S, *created[:-1]]:
            old.unpersist(blocking=False)
        self.S, self.t = S, self.t + steps
        return stats

    def train_epoch(self, epoch: int, on_progress) -> dict:
        metrics = self.model.metrics
        stats = empty_stats(metrics)
        start = self.t - self.t0 - epoch * self.spe  # steps of this epoch already done
        sizes = self.cfg["batch_sizes"]
        while start < self.spe:
            steps = min(self.k, self.spe - start)
            g = self._run_group(steps)
            stats = merge_stats(metrics, stats, g)
            on_progress(int(sum(sizes[start:start + steps])), stats)
            start += steps
        return stats

    def evaluate(self, data, batch_size) -> dict:
        shards = data if isinstance(data, Shards) else make_shards(
            data, feature_shape=self.model.input_shape, n_records=self.N)
        return evaluate_shards(self.skel, self._allgather(shards.n_partitions), shards, batch_size)

    def theta_tensor(self):
        return state_tensor(self.S, self.model.layout.size, self.bounds)

    def finish(self):
        m = self.model
        theta, slots, t = gather_state(self.S, m.layout.size, list(m.slots))
        m.theta[...] = theta
        for k in m.slots:
            m.slots[k][...] = slots[k]
        m.step = t
        self.S.unpersist(blocking=False)


def evaluate_shards(skel, AG, shards: Shards, batch_size: int) -> dict:
    with spark_errors():
        recs = rawrdd.zip_raw(AG, shards.rdd).mapPartitionsWithIndex(
            _pickled(eval_stage(skel, batch_size))).collect()
    stats = empty_stats(skel.metrics)
    for r in recs:
        stats = merge_stats(skel.metrics, stats, unpack_stats(r))
    return stats


def _pickled(f):  # a raw-input stage whose outputs are ordinary (pickled) Python objects
    return f


def _check_supported(model):
    opt = model.optimizer
    if opt.clipnorm is not None:
        raise ValueError("clipnorm is not supported by the distributed engine yet "
                         "(it needs the global gradient norm before any block updates); "
                         "use clipvalue, or train in-process")
    if type(opt).__name__ in ("LARS", "LAMB"):
        raise ValueError(f"{type(opt).__name__} needs per-tensor norms that span parameter "
                         "blocks; the distributed engine does not support it yet")


def fit_distributed(model, data, *, epochs, batch_size, validation_data=None, shuffle=True,
                    seed=0, verbose=1, class_weight=None, callbacks=(), num_partitions=None,
                    iterations_per_job: int = 8, features_col="features", label_col="label"):
    """Train ``model`` on an RDD of ``(features, label)`` or a DataFrame, distributed.

    Same semantics as in-process ``fit``: the same global mini-batches (rows are drawn from one
    global permutation per epoch, each partition taking its own rows), the same loss
    normalisation and the same optimizer update, so the weights equal the in-process run up to
    float summation order.

    Args:
        num_partitions: repartition the data to this many shards (default: as given).
        iterations_per_job: iterations run as one Spark job (fewer jobs, more lineage per job).
        features_col, label_col: DataFrame columns.
    """
    from layers.base import positive_int
    iterations_per_job = positive_int(iterations_per_job, "iterations_per_job")
    _check_supported(model)
    shards = make_shards(data, n_partitions=num_partitions,
                         feature_shape=model.input_shape if model.built else None,
                         features_col=features_col, label_col=label_col)
    try:
        if not shards.has_labels:
            raise ValueError("training data needs labels: an RDD of (features, label) pairs or a "
                             f"DataFrame with a {label_col!r} column")
        if not model.built:
            model.build(shards.feature_shape, seed=model.seed if model.seed is not None else seed)
        if tuple(shards.feature_shape) != tuple(model.input_shape):
            raise ValueError(f"features have shape {shards.feature_shape} but the first layer "
                             f"({model.layers[0].describe()}) expects {model.input_shape}")
        if batch_size > shards.n_total:
            raise ValueError(f"batch_size={batch_size} is larger than the {shards.n_total} "
                             f"training rows; use batch_size <= {shards.n_total} (full batch)")
        model._init_slots()
        val = None
        if validation_data is not None:
            val = make_shards(validation_data, feature_shape=model.input_shape,
                              n_records=shards.n_partitions, features_col=features_col,
                              label_col=label_col)
        runner = DistributedRunner(model, shards, batch_size=batch_size, shuffle=shuffle,
                                   seed=seed, class_weight=class_weight,
                                   iterations_per_job=iterations_per_job)
        history = fit_loop(model, runner, epochs=epochs, validation=val, batch_size=batch_size,
                           verbose=verbose, callbacks=callbacks)
        history.params.update(partitions=shards.n_partitions, iterations_per_job=iterations_per_job)
        if val is not None:
            val.unpersist()
        return history
    finally:
        shards.unpersist()


def _driver_state(model, n_owners: int, sc):
    bounds = block_bounds(model.layout.size, n_owners)
    return initial_state(sc, model.theta, {}, bounds, model.step), bounds


def evaluate_distributed(model, data, *, batch_size: int = 4096, features_col="features",
                         label_col="label") -> dict:
    """Loss and metrics of the driver's model over an RDD/DataFrame, computed on executors."""
    model._require_built()
    shards = make_shards(data, feature_shape=model.input_shape, features_col=features_col,
                         label_col=label_col)
    try:
        S, bounds = _driver_state(model, shards.n_partitions, shards.rdd.ctx)
        stats = evaluate_shards(skeleton(model), allgather(S, bounds, shards.n_partitions),
                                shards, batch_size)
        S.unpersist()
        return stats_logs(model.metrics, stats)
    finally:
        shards.unpersist()


def predict_distributed(model, data, *, batch_size: int = 4096, features_col="features"):
    """Model outputs for every row of an RDD (of features or pairs) or DataFrame, as an RDD of
    numpy arrays in row order. Lazy: nothing runs until the result is used."""
    model._require_built()
    shards = make_shards(data, feature_shape=model.input_shape, features_col=features_col,
                         label_col=None if not _looks_labelled(data) else "label")
    S, bounds = _driver_state(model, shards.n_partitions, shards.rdd.ctx)
    AG = allgather(S, bounds, shards.n_partitions)
    return rawrdd.zip_raw(AG, shards.rdd).mapPartitionsWithIndex(predict_stage(skeleton(model), batch_size))


def _looks_labelled(data) -> bool:
    if hasattr(data, "columns"):
        return False
    first = data.first()
    return isinstance(first, tuple) and len(first) == 2
