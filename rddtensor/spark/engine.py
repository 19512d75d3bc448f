"""The distributed engine: ``model.fit`` on an RDD or DataFrame.

θ and the optimizer slots live on an RDD (the *state*, see ``rddtensor.spark.allreduce``); every
iteration all-reduces gradients through Spark's shuffle. The driver builds
``iterations_per_job`` iterations of lineage, runs them as one Spark job, and receives only
per-step stats through an accumulator (loss sum, rows, metric states: O(classes) per partition).
After every job the state is cached and its lineage cut (``localCheckpoint``) and the previous
state unpersisted, so cached blocks and driver memory stay flat however long the run.

Surviving failures: every job is a function of the previous state (``S_{t+k} = f(S_t)``), so a
retried or recomputed task recomputes the same records and no update is ever applied twice;
per-step stats are keyed by ``(step, partition)``. A lost executor loses shuffle outputs (Spark
recomputes them from the cut state) and cached blocks. The data shards are recomputed from their
lineage; the cut state has none, so on a cluster with two or more executors it is stored with a
second copy on another executor (``MEMORY_AND_DISK_2``): losing one executor loses no parameter
block. Should every copy of a block be lost anyway (several executors at once), the fit reloads
its newest checkpoint (``checkpoint_dir``) and replays the steps since (bit-identical: the steps
are deterministic); without a checkpoint it stops with an error that says so.
"""
from __future__ import annotations

import dataclasses
import gc
import secrets
import uuid

import numpy as np
from pyspark import StorageLevel

from rddtensor.training import checkpoint as checkpoints
from rddtensor.layers.base import positive_int
from rddtensor.training.batching import (batch_sizes, check_shuffle, shuffle_setting,
                                         steps_per_epoch)
from rddtensor.training.params import block_bounds
from rddtensor.training.steps import empty_stats, merge_stats, stats_logs
from rddtensor.training.loop import fit_loop, stopped_at, warn_interrupted
from rddtensor.spark import datastore, localcache, peers, rawrdd, wire
from rddtensor.spark import hierarchical  # noqa: F401  (adds "hierarchical" to STRATEGIES)
from rddtensor.spark.allreduce import AllReduce, choose
from rddtensor.spark.checkpoint import save_state
from rddtensor.spark.errors import (marked_line, quiet_task_failures, spark_errors,
                                     spark_setting as _conf, task_error)
from rddtensor.spark.faults import stats_param
from rddtensor.spark.config import CacheSettings, Iteration, Kind, StepConfig
from rddtensor.spark.shards import Shards, make_shards, named_error, source
from rddtensor.spark.tensor import BlockTensor
from rddtensor.spark.stages import (batch_weight_sums, broadcast_emit, chunks_of, eval_stage,
                                    own_record, split_records, stream_eval_stage,
                                    stream_predict_stage)

LOCAL_CACHE_CONF = "spark.rddtensor.localCache"
PEER_CONF = "spark.rddtensor.peerTransport"
_LEVEL = StorageLevel.MEMORY_AND_DISK
_LEVEL_2 = StorageLevel.MEMORY_AND_DISK_2
_MAX_RECOVERIES = 3  # reloads of the last checkpoint per fit after the state was lost
# Spark deletes a shuffle's files only once the driver JVM has garbage-collected the RDDs that
# use it (ContextCleaner). Two things kept them alive, so every iteration's shuffle files piled
# up for the whole fit (tests/test_soak.py: 588 block files after 100 iterations, 2052 after
# 1000): py4j's proxies of those RDDs sit in reference cycles (a JavaObject caches its bound
# methods, which point back to it) that only Python's cyclic collector frees, and a mostly idle
# driver JVM rarely runs a full collection. The engine runs both at least this often:
_GC_ITERATIONS = 100
_GC_BYTES = 1 << 30  # or after about this many shuffle bytes (big models: every job or so)


def state_level(sc) -> StorageLevel:
    """Storage of a cut parameter state: memory and disk, plus a copy on a second executor when
    there are two or more (local masters have one block manager: nowhere to copy to)."""
    executors = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver's
    return _LEVEL_2 if executors >= 2 else _LEVEL


def one_host(sc) -> bool:
    """Whether the driver and every executor run on one machine (local masters,
    ``local-cluster``, a one-machine cluster): then every task of a job can read the files
    any other task writes to the host-local cache (``rddtensor.spark.localcache``)."""
    keys = sc._jsc.sc().getExecutorMemoryStatus().keys().mkString("\n").split("\n")
    return len({k.rsplit(":", 1)[0] for k in keys}) == 1


def executor_hosts(sc) -> int:
    """How many machines the executors run on (1 with ``one_host``): the ``hosts`` of
    ``allreduce.choose``'s cost model. The driver's block manager is not an executor's: its
    host counts only when executors run there too."""
    if one_host(sc):
        return 1
    keys = sc._jsc.sc().getExecutorMemoryStatus().keys().mkString("\n").split("\n")
    hosts = [k.rsplit(":", 1)[0] for k in keys]
    driver = sc.getConf().get("spark.driver.host", "")
    if driver in hosts:
        hosts.remove(driver)  # (one entry: the driver's own)
    return max(1, len(set(hosts)))


class _StatsLost(RuntimeError):
    """A job finished but the stats of some of its tasks never reached the driver."""


def _state_lost(exc: BaseException) -> bool:
    """A job failed because blocks of the cut state are gone (every executor holding a copy)."""
    return task_error(exc) is None and "CHECKPOINT_RDD_BLOCK_ID_NOT_FOUND" in str(exc)


_SECURE_CONFS = ("spark.authenticate", "spark.network.crypto.enabled",
                 "spark.io.encryption.enabled")


def _peers_blocked(sc) -> str | None:
    """Why this session cannot use the peer transport (``rddtensor.spark.peers``), or None:
    Spark authenticates or encrypts its traffic (the transport sends in clear), or a Python
    worker exits after each task (and its server with it)."""
    secure = [c for c in _SECURE_CONFS if _conf(sc, c, "false").strip().lower() == "true"]
    if secure:
        return f"{secure[0]}=true (the peer transport sends in clear)"
    if _conf(sc, "spark.python.worker.reuse", "true").strip().lower() == "false":
        return "spark.python.worker.reuse=false (a worker's server would end with its task)"
    return None


def quiet_unpersist_warning(sc) -> None:
    """Spark logs a warning whenever a locally checkpointed RDD is unpersisted ("cannot be
    recomputed"): the engine does exactly that, on purpose, after every job (the next state is
    cached and cut first). Turn that logger (PythonRDD's) down to errors."""
    try:
        log4j = sc._jvm.org.apache.logging.log4j
        log4j.core.config.Configurator.setLevel("org.apache.spark.api.python.PythonRDD",
                                                log4j.Level.ERROR)
    except Exception:  # another logging backend: the warning stays, nothing else changes
        pass


class ParameterState:
    """θ and optimizer slots on the executors, in the layout of an all-reduce strategy.

    ``S`` is the state RDD; ``model`` the task copy of the model whose optimizer settings
    produced it (the replicated strategy applies an update still pending in ``S`` with them);
    ``bounds`` the parameter blocks."""

    def __init__(self, strategy: AllReduce, S, model, bounds, handles=()):
        self.strategy, self.S, self.model, self.bounds = strategy, S, model, bounds
        self.handles = list(handles)  # broadcasts the state was built from (destroyed with it)

    @classmethod
    def from_driver(cls, strategy, sc, model, n_blocks: int, with_slots: bool = True):
        """Ship the driver's weights (start of a fit, or evaluate/predict after one)."""
        bounds = block_bounds(model.layout.size, n_blocks)
        slots = (model.slots or {}) if with_slots else {}
        S, handles = strategy.initial(sc, model.theta, slots, bounds, model.step)
        return cls(strategy, S.persist(_LEVEL), model.task_copy(), bounds, handles)

    @property
    def n_blocks(self) -> int:
        return len(self.bounds)

    def settled(self):
        """Partition i: block i of θ_t and its slots as ``own`` chunk records (decode a
        partition with ``stages.read_own(stages.split_records(records)[0])``)."""
        own_block = self.strategy.own_block(self.model, self.bounds)

        def run(i, records):
            meta, w, slots = own_block(i, records)
            return own_record(meta["i"], meta["t"], meta["lo"], meta["hi"], w, slots)
        return rawrdd.map_raw(rawrdd.shuffle_pairs(self.S, self.n_blocks), run)

    def broadcast(self, n_dest: int):
        """θ to ``n_dest`` partitions of other data: one block record per owner per partition."""
        own_block = self.strategy.own_block(self.model, self.bounds)
        return rawrdd.shuffle_raw(rawrdd.shuffle_pairs(self.S, self.n_blocks),
                                  broadcast_emit(n_dest, own_block), n_dest)

    def gather(self):
        """``(θ, slots, t)`` on the driver (end of a fit only)."""
        with spark_errors():
            parts = self.settled().collect()
        size = self.model.layout.size
        theta, slots, t = np.empty(size, np.float32), {}, 0
        for rec in parts:
            _, meta, arrays = wire.unpack(rec)
            name, a, t = meta["name"], meta["lo"] + meta["at"], meta["t"]
            out = theta if name == "w" else slots.setdefault(name[5:], np.empty(size, np.float32))
            out[a:a + arrays["x"].size] = arrays["x"]
        return theta, slots, t

    def tensor(self, name: str = "w"):
        """θ (``"w"``) or one optimizer slot as a lazy ``BlockTensor`` (never on the driver)."""
        size, n = self.model.layout.size, self.n_blocks

        def view(i, records):
            got = chunks_of(split_records(records)[0], Kind.OWN)
            x = got.into("w" if name == "w" else "slot." + name)
            yield wire.frames(Kind.BLOCK, {"i": i, "lo": got.meta["lo"], "hi": got.meta["hi"],
                                        "size": size, "n": n}, {"x": x})
        return BlockTensor(rawrdd.map_raw(self.settled(), view), size, n, np.float32)

    def unpersist(self):
        self.S.unpersist(blocking=False)
        for h in self.handles:
            h.destroy(blocking=False)
        self.handles = []


def batch_weight_table(shards: Shards, step: StepConfig, epochs) -> dict:
    """``{t: W}``: for the state step ``t`` of each batch of ``epochs``, the sum of the sample
    weights of its global batch (partitions' shares added in partition order, float64; with
    one partition exactly the in-process sum)."""
    epochs = list(epochs)
    if not epochs:
        return {}

    def job():
        with spark_errors():
            return shards.keyed().mapPartitionsWithIndex(batch_weight_sums(step, epochs)).collect()
    total = np.zeros((len(epochs), step.steps_per_epoch), np.float64)
    for _, sums in sorted(shards.run(job), key=lambda p: p[0]):
        total += sums
    return {step.t0 + e * step.steps_per_epoch + b: float(total[k, b])
            for k, e in enumerate(epochs) for b in range(step.steps_per_epoch)}


def evaluate_state(state: ParameterState, shards: Shards, batch_size: int) -> dict:
    """Loss/metric stats of the weights in ``state`` over ``shards`` (zip with a broadcast)."""
    AG = state.broadcast(shards.n_partitions)

    def job():
        with spark_errors():
            return shards.beside(AG).mapPartitionsWithIndex(
                eval_stage(state.model, batch_size)).collect()
    parts = shards.run(job)
    stats = empty_stats(state.model.metrics)
    for _, s in sorted(parts, key=lambda p: p[0]):
        stats = merge_stats(state.model.metrics, stats, s)
    return stats


class DistributedRunner:
    """Runs epochs of synchronous mini-batch training on Spark for ``fit_loop``."""

    engine = "distributed"

    def __init__(self, model, shards: Shards, strategy: AllReduce, *, batch_size, shuffle, seed,
                 class_weight, iterations_per_job: int, wire_dtype: str = "float32",
                 t0: int | None = None, checkpoint=None, resume_stats=None):
        self.model, self.shards = model, shards
        self.sc = shards.rdd.ctx
        self.N = shards.n_partitions
        self.n_total = shards.n_total
        self.k = int(iterations_per_job)
        self.t0 = model.step if t0 is None else int(t0)  # the step epoch 0 started from
        self.checkpoint, self.resume_stats = checkpoint, resume_stats
        self.recoveries = 0
        # host-local delivery of the records a partition sends itself (rddtensor.spark.localcache):
        # conf spark.rddtensor.localCache = true (default) | false | evict (every read misses)
        mode = _conf(self.sc, LOCAL_CACHE_CONF, "true").strip().lower()
        if mode not in ("true", "false", "evict"):
            raise ValueError(f"{LOCAL_CACHE_CONF} must be true, false or evict, got {mode!r}")
        self.local_cache, self.cache_missed = mode != "false", False
        # records to partitions on other hosts: tokens too, fetched from the sending worker
        # (rddtensor.spark.peers): conf spark.rddtensor.peerTransport = true (default) | false
        peer = _conf(self.sc, PEER_CONF, "true").strip().lower()
        if peer not in ("true", "false"):
            raise ValueError(f"{PEER_CONF} must be true or false, got {peer!r}")
        self.peer_transport, self.peer_blocked = peer == "true", _peers_blocked(self.sc)
        self.peer_failed = self.peer_used = False
        run = uuid.uuid4().hex[:16]
        # this driver owns the run's files on its host (killed: removed)
        owner = localcache.register_run(run) if self.local_cache else None
        # the settings of the last job (``_try_group`` numbers the jobs: ``job``)
        self.cache = CacheSettings(run=run, job=0, evict=mode == "evict", owner=owner,
                                   key=secrets.token_hex(16))
        self.since_gc = 0  # iterations since the driver JVM last collected garbage
        self.bytes_since_gc = 0  # estimated shuffle bytes since then
        # whether the last job sent records between all partitions as tokens
        self.tokens_between = False
        self.step_config = StepConfig(
            n_total=self.n_total, batch_size=batch_size, seed=seed, shuffle=shuffle,
            offsets=tuple(shards.offsets), t0=self.t0,
            batch_sizes=tuple(batch_sizes(self.n_total, batch_size).tolist()),
            class_weight=class_weight, wire_bf16=wire_dtype == "bfloat16")
        self.spe = steps_per_epoch(self.n_total, batch_size)
        self.state = ParameterState.from_driver(strategy, self.sc, model, self.N)
        self.acc = self.sc.accumulator({}, stats_param(self.sc))
        quiet_unpersist_warning(self.sc)
        self.t = model.step
        self.engine = f"distributed ({strategy.name} all-reduce, {self.N} partitions)"
        #: what this engine adds to ``History.params`` (``fit_loop`` hands them to callbacks)
        self.params = {"partitions": self.N, "allreduce": strategy.name,
                       "iterations_per_job": self.k, "wire_dtype": wire_dtype}
        # the last step a job may run to: None stops every job at its epoch's end; a later
        # step lets one job run on into the next epochs (see ``fit_distributed``), whose stats
        # wait in ``ahead`` (epoch -> stats) for their ``train_epoch``
        self.horizon, self.ahead = None, {}
        # with sample weights: {state step t: the weight sum of step t+1's global batch}
        self.weight_sums = None
        # for a fit that ends with an exception (``keep_progress``): the step the driver's
        # model holds, the epoch running, the steps of the job in flight, and a tag on this
        # fit's jobs so that one left running by a Ctrl-C can be cancelled
        self.synced, self.epoch, self.in_flight, self.finished = model.step, None, None, False
        self._started = model.step
        self.tag = f"rddtensor-fit-{self.cache.run}"
        self.sc.addJobTag(self.tag)

    def _run_group(self, steps: int) -> dict:
        """``steps`` iterations as one Spark job; returns their merged stats. If the state was
        lost with its executors, reload the last checkpoint, replay up to here and run again."""
        lost_stats = 0
        while True:
            try:
                stats = self._try_group(steps)
                break
            except _StatsLost as exc:
                lost_stats += 1
                if lost_stats > _MAX_RECOVERIES:
                    raise RuntimeError(f"{exc}, {lost_stats} times in a row") from None
                checkpoints.log.warning("%s: re-running the job from step %d", exc, self.t)
                continue
            except Exception as exc:
                if datastore.MISS in str(exc):
                    # a task found no stored rows where its shard's token points: build the
                    # shards again from their lineage and run the job again from its start state
                    self.shards.restore(f"at step {self.t}")
                    continue
                if self.local_cache and self.peer_transport and peers.MISS in str(exc):
                    # a task could not reach the worker serving a record from another host:
                    # run the job again with records between hosts going through the shuffle
                    checkpoints.log.warning(
                        "peer transport failed at step %d (%s): re-running the job with records "
                        "between hosts going through the shuffle for the rest of the fit (set "
                        "%s=false to skip it)", self.t, marked_line(str(exc), peers.MISS),
                        PEER_CONF)
                    self.peer_transport, self.peer_failed = False, True
                    continue
                if self.local_cache and localcache.MISS in str(exc):
                    # a record the job sent through the host-local cache was not found where
                    # it was read: run the job again from its (inline) start state, without it
                    checkpoints.log.warning("host-local cache miss at step %d: re-running the "
                                            "job without the cache for the rest of the fit",
                                            self.t)
                    self.local_cache, self.cache_missed = False, True
                    continue
                if not _state_lost(exc):
                    raise
                self._recover(exc)
        self._release_shuffles(steps)
        return stats

    def _hosts(self, one: bool) -> tuple:
        """``(peers, addrs)``: per partition, which host its tasks run on (0, 1, ...: the order
        hosts first appear), and each host's address (Spark's name for it), or ``((), ())``
        when that is not known for every partition. All on one host (``one_host``): all 0,
        no addresses. Else a partition's tasks run where its data shard's home is
        cached (``rawrdd.home``); a partition whose home is not cached right now (its
        executor was lost) is not known. ``one``: ``one_host`` (asked once per job)."""
        if one:
            return (0,) * self.N, ()
        home = self.shards.home
        # (the scheduler's view: a snapshot taken when the last job was submitted, so a job
        # right after the shards were built sees no cached home and sends peers inline)
        jsc, rdd, ids, out = self.sc._jsc.sc(), home._jrdd.rdd(), {}, []
        for j in range(self.N):
            locs = jsc.getPreferredLocs(rdd, j)
            where = str(locs.apply(0).toString()) if locs.size() else ""
            if not where.startswith("executor_"):  # (cached: "executor_<host>_<id>")
                return (), ()
            out.append(ids.setdefault(where[len("executor_"):].rsplit("_", 1)[0], len(ids)))
        return tuple(out), tuple(ids)

    def _release_shuffles(self, steps: int):
        """Let Spark delete the shuffle files of finished iterations (see ``_GC_ITERATIONS``):
        per 100 iterations or ~1 GB of shuffle, one driver JVM collection (which frees what the
        previous round released; py4j releases JVM objects from its own thread) and one Python
        ``gc.collect()`` (each a pause too long to take every iteration). Files live for at most
        two rounds.

        The shuffle bytes are estimated: ~8·P·N per iteration whose records go inline, and only
        the job's last (cut) iteration does while the partitions share a host's cache or the
        records between hosts go through the peer transport."""
        self.since_gc += steps
        inline = 1 if self.tokens_between else steps
        self.bytes_since_gc += inline * 8 * self.model.layout.size * self.N
        if self.since_gc >= _GC_ITERATIONS or self.bytes_since_gc >= _GC_BYTES:
            self.sc._jvm.System.gc()
            gc.collect()
            self.since_gc = self.bytes_since_gc = 0

    def _recover(self, exc):
        loaded = self.checkpoint.newest_loadable() if self.checkpoint is not None else None
        found = loaded[0] if loaded else None
        if found is None or found.step > self.t or self.recoveries >= _MAX_RECOVERIES:
            why = ("no checkpoint to reload: pass checkpoint_dir=... (and checkpoint_every=...) "
                   "so a fit can recover" if found is None or found.step > self.t else
                   f"gave up after {self.recoveries} reloads of the last checkpoint")
            raise RuntimeError(f"the parameter state at step {self.t} was lost with the "
                               f"executors holding it; {why}") from exc
        self.recoveries += 1
        checkpoints.log.warning("parameter state at step %d lost with its executors: reloading "
                                "%s and replaying %d steps", self.t, found.path,
                                self.t - found.step)
        target, m = self.t, self.model
        _, theta, slots = loaded
        m.load_state(theta, slots, found.step)
        self.t = self.synced = found.step
        st = self.state
        self.state = ParameterState.from_driver(st.strategy, self.sc, m, self.N)
        st.unpersist()
        while self.t < target:  # (the replayed steps' stats are rewritten, never merged twice)
            self._try_group(min(self.k, target - self.t))

    def _try_group(self, steps: int) -> dict:
        st = self.state
        job = self.model.task_copy(freeze_optimizer=True)
        self.cache = dataclasses.replace(self.cache, job=self.cache.job + 1)
        # records between partitions of one host go through that host's cache too
        one = one_host(self.sc)
        cache = None
        if self.local_cache:
            hosts, addrs = self._hosts(one)
            addrs = addrs if self.peer_transport and len(addrs) > 1 else ()
            if addrs and self.peer_blocked:  # (said once per fit)
                checkpoints.log.warning("records between hosts go through the shuffle, not the "
                                        "peer transport: %s", self.peer_blocked)
                self.peer_transport, addrs = False, ()
            self.peer_used = self.peer_used or bool(addrs)
            cache = dataclasses.replace(self.cache, peers=hosts, addrs=addrs)
        self.tokens_between = cache is not None and len(cache.peers) > 0 and (
            len(set(cache.peers)) == 1 or bool(cache.addrs))
        # each iteration starts from the state before it: an update pending in it (the
        # replicated strategy) applies with the optimizer settings of the job that computed its
        # gradients: the previous job's (``st.model``) in the cut state, then this job's
        state = st
        for s in range(steps):
            # the last iteration's state is the job's cut state: inline, never a cache token
            it = Iteration(self.step_config, cache, cut=s == steps - 1,
                           weight_sum=self.weight_sums.get(self.t + s)
                           if self.weight_sums is not None else None, homes=not one)
            state = ParameterState(st.strategy, st.strategy.iteration(
                state, self.shards, it, job, self.acc), job, st.bounds)
        S = state.S
        S.persist(state_level(self.sc))
        S.localCheckpoint()  # cut the lineage: the next job starts from these records
        steps_done = range(self.t + 1, self.t + steps + 1)
        self.in_flight = (steps_done[0], steps_done[-1])
        try:
            with spark_errors():
                S._jrdd.count()
            got = self.acc.value
            missing = [(t, j) for t in steps_done for j in range(self.N) if (t, j) not in got]
            if missing:
                # the stats of a step come with the task that computed it; when an executor
                # dies after storing a block of S (and its replica) but before reporting the
                # task, Spark re-reads the replica and the stats never come: run the job again
                raise _StatsLost(f"the stats of steps/partitions {missing} never arrived")
        except BaseException:
            S.unpersist(blocking=False)
            raise
        # the new cut state first, then the old one goes: an interrupt in between leaves
        # ``self.state`` a state that can be read (``keep_progress``)
        self.state = ParameterState(st.strategy, S, job, st.bounds)
        self.t += steps
        self.in_flight = None
        st.unpersist()
        return self._take_stats(steps_done)

    def _take_stats(self, steps) -> dict:
        """The merged stats of ``steps`` in the first step's epoch; those of later epochs (a
        job that ran on, see ``horizon``) are kept in ``ahead``."""
        got = self.acc.value
        metrics = self.model.metrics
        by_epoch = {}
        for t in steps:
            e = (t - self.t0 - 1) // self.spe
            for j in range(self.N):
                by_epoch[e] = merge_stats(metrics, by_epoch.get(e) or empty_stats(metrics),
                                          got[(t, j)])
        self.acc.value = {k: v for k, v in got.items() if k[0] > steps[-1]}
        first, *later = sorted(by_epoch)
        for e in later:
            self.ahead[e] = merge_stats(metrics, self.ahead.get(e) or empty_stats(metrics),
                                        by_epoch[e])
        return by_epoch[first]

    def train_epoch(self, epoch: int, on_progress) -> dict:
        metrics = self.model.metrics
        self.epoch = epoch
        stats, self.resume_stats = self.resume_stats or empty_stats(metrics), None
        start = self.t - self.t0 - epoch * self.spe  # steps of this epoch already done
        sizes = self.step_config.batch_sizes
        ckpt = self.checkpoint
        if epoch in self.ahead:  # run by the previous epoch's last job
            stats = merge_stats(metrics, stats, self.ahead.pop(epoch))
            on_progress(int(sum(sizes[:min(start, self.spe)])), stats)
        while start < self.spe:
            steps = min(self.k, self.spe - start if self.horizon is None
                        else self.horizon - self.t)
            if ckpt is not None:
                steps = ckpt.clip(self.t, steps)  # a job ends where a checkpoint is due
            stats = merge_stats(metrics, stats, self._run_group(steps))
            on_progress(int(sum(sizes[start:min(start + steps, self.spe)])), stats)
            start += steps
            if ckpt is not None and ckpt.due(self.t, start == self.spe):
                self._reading_state(lambda: save_state(ckpt, self.state, self.model, self.t,
                                                       self.t0, self.spe, stats))
        return stats

    def _reading_state(self, job):
        """``job()``, a Spark job that reads the cut parameter state (a checkpoint write,
        validation, a gather); if the state's blocks were lost with their executors since the
        training job that made them, recover it (``_recover``: reload the last checkpoint and
        replay to this step) and run ``job`` again."""
        while True:
            try:
                return job()
            except Exception as exc:
                if not _state_lost(exc):
                    raise
                self._recover(exc)

    def evaluate(self, shards, batch_size) -> dict:
        return self._reading_state(lambda: evaluate_state(self.state, shards, batch_size))

    def sync_weights(self):
        """Copy θ, the slots and the step from the executors into the driver's model (one
        collect of O(P): for callbacks that save or read weights mid-fit)."""
        theta, slots, t = self._reading_state(lambda: self.state.gather())
        self.model.load_state(theta, slots, t)
        self.synced = t

    def finish(self):
        self.sync_weights()
        self.finished = True
        self.close()

    def keep_progress(self, exc: BaseException, epochs: int) -> None:
        """``exc`` ends the fit (a Ctrl-C, a callback's error, a failed checkpoint write or
        job): copy the last cut state, the state after the last completed job, into the
        driver's model, and say in a warning (the ``rddtensor`` logger and
        ``warnings.warn``, category ``FitInterrupted``) which step the model now holds. Where
        that state cannot be read (the SparkContext is gone, the state lost with its
        executors, a second Ctrl-C), the model keeps what it held (the newest checkpoint of
        this fit instead, if that is newer), and the warning says so. Never raises."""
        try:
            text = self._keep_progress(exc, epochs)
        except BaseException as e:  # (a Ctrl-C while reporting: the model is whole anyway)
            text = (f"fit interrupted by {type(exc).__name__}; the model holds the weights, "
                    f"optimizer slots and step of step {self.model.step} ({type(e).__name__} "
                    "while reading back the last completed step)")
        warn_interrupted(text)

    def _keep_progress(self, exc, epochs) -> str:
        running, self.in_flight = self.in_flight, None
        if running is not None:  # a Ctrl-C leaves the job running (PySpark cannot cancel it)
            self._cancel()
        name, m = type(exc).__name__, self.model
        where = ("before its first epoch" if self.epoch is None else
                 f"epoch {self.epoch + 1} of {epochs}" +
                 (f", during steps {running[0]}-{running[1]}" if running else ""))
        if self.finished:
            return (f"fit stopped by {name} after its last epoch: the model holds the weights, "
                    f"optimizer slots and step of its last step, {m.step}")
        try:
            theta, slots, t = self.state.gather()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                self._cancel()
            held = "the weights it had when the fit started" if m.step == self.synced and \
                self.synced == self._started else "its last copy from the executors"
            loaded = None
            try:
                loaded = self.checkpoint.newest_loadable() if self.checkpoint else None
            except Exception:
                pass
            if loaded is not None and loaded[0].step > self.synced:
                m.load_state(loaded[1], loaded[2], loaded[0].step)
                self.synced, held = loaded[0].step, f"the newest checkpoint, {loaded[0].path}"
            return (f"fit interrupted by {name} in {where}; the last completed step "
                    f"({self.t}) could not be read back from the executors "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): the "
                    f"model holds the weights, optimizer slots and step of step {m.step} "
                    f"({held})")
        m.load_state(theta, slots, t)
        self.synced = t
        if t == self._started:
            return (f"fit interrupted by {name} in {where}, before its first step completed: "
                    f"the model holds the weights, optimizer slots and step it started with "
                    f"(step {t})")
        return (f"fit interrupted by {name} in {where}: the model holds the weights, optimizer "
                f"slots and step of " + stopped_at(t, self.t0, self.spe,
                                                   self.checkpoint is not None))

    def _cancel(self):
        try:
            self.sc.cancelJobsWithTag(self.tag)
        except BaseException:
            pass

    def local_cache_state(self) -> str:
        """``"on"``, ``"off"`` (conf) or ``"off after a miss"``, for ``History.params``."""
        return "on" if self.local_cache else "off after a miss" if self.cache_missed else "off"

    def peer_transport_state(self) -> str:
        """For ``History.params``: ``"on"`` (a job ran with records to other hosts as tokens
        served by the sending worker where it could start its server, ``rddtensor.spark.peers``),
        ``"off after a failure"``, ``"off"`` (conf; Spark's authentication or encryption on;
        workers not reused; the host-local cache off) or ``"unused"`` (one host, or the hosts
        were never known)."""
        if self.peer_failed:
            return "off after a failure"
        if not self.peer_transport or (not self.local_cache and not self.peer_used):
            return "off"
        return "on" if self.peer_used else "unused"

    def close(self):
        """Release the state's cached blocks and this host's cache files (idempotent)."""
        try:
            self.sc.removeJobTag(self.tag)
        except Exception:  # (a SparkContext already stopped)
            pass
        self.state.unpersist()
        localcache.drop_run(self.cache.run)


def fit_distributed(model, data, *, epochs, batch_size, validation_data=None, shuffle=True,
                    seed=0, verbose=1, class_weight=None, callbacks=(), num_partitions=None,
                    iterations_per_job: int = 8, allreduce: str = "auto",
                    wire_dtype: str = "float32", features_col="features", label_col="label",
                    checkpoint_dir=None, checkpoint_every=None, resume: bool = False,
                    initial_epoch: int = 0, weight_col=None):
    """Train ``model`` on an RDD of ``(features, label)`` or a DataFrame, distributed.

    Same semantics as in-process ``fit``: the same global mini-batches (rows in each epoch's
    order, ``shuffle``: ``True``, ``False`` or a ``BlockShuffle``; each partition taking its
    own rows), the same loss
    normalisation and the same optimizer update, so the weights equal the in-process run up to
    float summation order (bit-identical with one partition).

    Args:
        num_partitions: repartition the data to this many shards (default: as given): runs
            of consecutive rows, the input's order kept, so the weights still equal in-process
            training on the rows in that order, and a rebuild from lineage (after a lost
            executor) gives the same shards row for row.
        iterations_per_job: iterations run as one Spark job (fewer jobs, longer lineage).
        allreduce: ``"sharded"`` (reduce-scatter + all-gather, blocks owned by partitions),
            ``"replicated"`` (all-to-all gradients, one pass per iteration),
            ``"hierarchical"`` (sharded, with one reduced copy per host crossing between
            hosts: ``rddtensor.spark.hierarchical``; never picked by ``"auto"``) or
            ``"auto"`` (see ``rddtensor.spark.allreduce.choose``).
        wire_dtype: ``"float32"`` (exact: equals in-process training) or ``"bfloat16"``
            (gradients and parameter copies cross the shuffle as bfloat16, half the bytes;
            owners keep float32 master weights and optimizer slots, as BigDL did).
        features_col, label_col: DataFrame columns. A model with several inputs (outputs)
            reads one column per input (output): by default the columns named like them, else
            a list in the model's order or a dict by name (``input_columns``,
            ``target_columns``); each output's labels go to its own loss.
        weight_col: sample weights: a DataFrame column of numbers >= 0, or (any name) an RDD
            of ``(features, label, weight)`` rows. The loss is the weighted mean over each
            global batch (``sum(w_i * l_i) / sum(w_i)``), as in-process ``fit(sample_weight=)``:
            one small job at the start adds up each step's weights over all partitions.
        checkpoint_dir: save checkpoints here (see ``rddtensor.training.checkpoint``): each partition writes
            its own parameter block and optimizer slots, the driver a manifest last. Must be a
            path the driver and every executor see (shared filesystem on a cluster).
        checkpoint_every: save every this many optimizer steps (default: every epoch end).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir`` (its
            weights, slots and step; ``epochs`` counts from the original start, like Keras'
            ``initial_epoch``); bit-identical to a run that was never interrupted. Starts afresh
            when the directory holds none.
        initial_epoch: the epoch to start at (Keras): epochs ``initial_epoch .. epochs - 1``
            run, each with its own row order, so ``fit(epochs=3)`` then
            ``fit(epochs=6, initial_epoch=3)`` equals ``fit(epochs=6)``.
    """
    iterations_per_job = positive_int(iterations_per_job, "iterations_per_job")
    shuffle = check_shuffle(shuffle)
    if wire_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"wire_dtype must be 'float32' or 'bfloat16', got {wire_dtype!r}")
    if checkpoint_dir is not None:  # a path that cannot hold checkpoints fails before any job
        checkpoints.check_directory(checkpoint_dir)
    features_col = input_columns(model, data, features_col)
    label_col = target_columns(model, data, label_col)
    shards = make_shards(data, n_partitions=num_partitions,
                         feature_shape=_input_shape(model) if model.built or
                         len(model.input_specs) > 1 else None,
                         features_col=features_col, label_col=label_col,
                         **({"weight_col": weight_col} if weight_col is not None else {}))
    val = runner = ending = None
    quiet = quiet_task_failures(shards.rdd.ctx)  # one clear error, not a trace per failed task
    quiet.__enter__()
    try:
        if not shards.has_labels:
            raise ValueError("training data needs labels: an RDD of (features, label) pairs or a "
                             f"DataFrame with a {label_col!r} column")
        if isinstance(features_col, list):
            for i, (c, shape) in enumerate(zip(features_col, shards.feature_shape)):
                model.check_input_shape(shape, f"column {c!r}", index=i)
        else:
            model.check_input_shape(shards.feature_shape, f"the features (column "
                                    f"{features_col!r})" if hasattr(data, "columns")
                                    else "the features")
        if not model.built:
            model.build(shards.feature_shape if len(model.input_specs) == 1 else None,
                        seed=model.seed if model.seed is not None else seed)
        if batch_size > shards.n_total:
            raise ValueError(f"batch_size={batch_size} is larger than the {shards.n_total} "
                             f"training rows; use batch_size <= {shards.n_total} (full batch)")
        model.check_label_range(shards.label_range, _labels_named(model, data, label_col))
        strategy = choose(allreduce, model, shards.n_partitions,
                          hosts=executor_hosts(shards.rdd.ctx))
        model.init_slots()
        ckpt, resumed = checkpoints.start(
            model, checkpoint_dir, checkpoint_every, resume,
            settings={"seed": seed, "batch_size": batch_size, "shuffle": shuffle_setting(shuffle),
                      "n_total": shards.n_total, "partitions": shards.n_partitions})
        if validation_data is not None:
            val = make_shards(validation_data, feature_shape=_input_shape(model),
                              features_col=features_col, label_col=label_col,
                              what="validation_data")
            model.check_label_range(val.label_range, "labels of validation_data")
        runner = DistributedRunner(model, shards, strategy, batch_size=batch_size,
                                   shuffle=shuffle, seed=seed, class_weight=class_weight,
                                   iterations_per_job=iterations_per_job, wire_dtype=wire_dtype,
                                   t0=resumed.t0 if resumed else
                                   model.step - initial_epoch * steps_per_epoch(
                                       shards.n_total, batch_size),
                                   checkpoint=ckpt,
                                   resume_stats=resumed.stats if resumed else None)
        if weight_col is not None:
            runner.weight_sums = batch_weight_table(
                shards, runner.step_config, range(resumed.epoch if resumed else initial_epoch,
                                                   epochs))
        if val is None and not callbacks and ckpt is None:  # no epoch end needs the driver
            runner.horizon = runner.t0 + epochs * runner.spe
        history = fit_loop(model, runner, epochs=epochs, validation=val, batch_size=batch_size,
                           verbose=verbose, callbacks=callbacks,
                           initial_epoch=resumed.epoch if resumed else initial_epoch)
        history.params.update(runner.params, local_cache=runner.local_cache_state(),
                              peer_transport=runner.peer_transport_state(),
                              data_store=shards.store_state())
        if resumed:
            history.params["resumed_from"] = resumed.path
        return history
    except BaseException as exc:  # (fit_loop has told the runner to keep its progress)
        ending = exc
        raise
    finally:
        try:
            shards.unpersist()
            if val is not None:
                val.unpersist()
            if runner is not None:
                runner.close()
        except Exception as e:
            if ending is None:
                raise
            # (e.g. the SparkContext is gone): the error that ended the fit is the one to see
            checkpoints.log.warning("releasing the fit's cached data after %s failed: %s: %s",
                                    type(ending).__name__, type(e).__name__,
                                    (str(e).splitlines() or [""])[0])
        finally:
            quiet.__exit__(None, None, None)


def evaluate_distributed(model, data, *, batch_size: int = 4096, features_col="features",
                         label_col="label") -> dict:
    """Loss and metrics of the driver's model over an RDD/DataFrame, computed on executors.

    One pass over the data (a Spark job without a shuffle): each task decodes its partition
    one chunk at a time (an Arrow record batch, or ``chunk_rows`` rows of an RDD) and adds up
    the chunk's stats, so memory holds a chunk, whatever the partition's size; the weights
    travel as one Spark broadcast. Nothing is cached or written.
    """
    model.ensure_built()
    src = _source(data, model, features_col, label_col, "evaluation data")
    if not src.has_labels:
        raise ValueError("evaluate needs labels: an RDD of (features, label) pairs or a DataFrame "
                         f"with a {label_col!r} column")
    sc = src.rows.ctx
    theta = sc.broadcast(np.asarray(model.theta))
    try:
        with quiet_task_failures(sc), spark_errors():
            parts = src.rows.mapPartitionsWithIndex(stream_eval_stage(
                model.task_copy(), batch_size, theta, src.stack, src.feature_shape)).collect()
    except ValueError as e:  # (a row the decoder refuses: named as the build names it)
        raise named_error(e, "evaluation data", True) from None
    finally:
        theta.destroy(blocking=False)
    stats = empty_stats(model.metrics)
    for _, s in sorted(parts, key=lambda p: p[0]):
        stats = merge_stats(model.metrics, stats, s)
    if not stats["count"]:
        raise ValueError("the evaluation data is empty: no rows")
    return stats_logs(model.metrics, stats)


def predict_distributed(model, data, *, batch_size: int = 4096, features_col="features"):
    """Model outputs for every row of an RDD (of features or ``(features, label)`` pairs) or a
    DataFrame's ``features_col``, as an RDD of numpy arrays in row order (lazy); for a model
    with several outputs, a tuple of one array per output per row.

    Each task decodes its partition one chunk at a time and yields the chunk's outputs: no
    shuffle, nothing cached, a chunk in memory; the weights travel as one Spark broadcast
    (kept while the returned RDD may be recomputed)."""
    model.ensure_built()
    labelled = not hasattr(data, "columns") and _looks_labelled(data)
    src = _source(data, model, features_col, "label" if labelled else None, "prediction data")
    theta = src.rows.ctx.broadcast(np.asarray(model.theta))
    return src.rows.mapPartitionsWithIndex(stream_predict_stage(
        model.task_copy(), batch_size, theta, src.stack, src.feature_shape))


def input_columns(model, data, features_col="features"):
    """The column(s) the model's inputs are read from: ``features_col`` for a model with one
    input; for several, a list of one column per input, in the model's input order: by default
    the columns named like the inputs (``L.Input(name=...)``), else ``features_col`` as a list
    (input order) or a dict ``{input name: column}``."""
    return _spec_columns([s.name for s in model.input_specs], data, features_col, "features",
                         "features_col", "input")


def target_columns(model, data, label_col="label"):
    """The label column(s) of the model's outputs: ``label_col`` for a model with one output;
    for several, a list of one column per output, in the model's output order: by default the
    columns named like the outputs (``model.output_specs``' names), else ``label_col`` as a list
    (output order) or a dict ``{output name: column}``; ``None`` stays ``None`` (no labels)."""
    if label_col is None:
        return None
    return _spec_columns([s.name for s in model.output_specs], data, label_col, "label",
                         "label_col", "output")


def _spec_columns(names, data, given, default, arg: str, what: str):
    """``input_columns``/``target_columns``: ``names`` the model's inputs/outputs, ``given``
    the user's ``arg`` (``default`` its default value)."""
    if len(names) == 1:
        if not isinstance(given, str):
            raise ValueError(f"{arg} must be a column name for a model with one {what}, "
                             f"got {given!r}")
        return given
    if not hasattr(data, "columns"):
        raise ValueError(f"a model with several {what}s {names} trains and predicts on a "
                         f"DataFrame with one column per {what}; got an RDD")
    if given == default or given is None:
        missing = [c for c in names if c not in data.columns]
        if missing:
            raise ValueError(f"the model's {what}s {names} are read from the DataFrame's columns "
                             f"of the same names, and it has no column {missing[0]!r} (its "
                             f"columns: {data.columns}); or map them: {arg}=[one column "
                             f"per {what}, in order] or {{{what} name: column}}")
        return list(names)
    if isinstance(given, dict):
        unknown = [k for k in given if k not in names]
        if unknown or len(given) != len(names):
            raise ValueError(f"{arg} maps the model's {what}s {names} to columns, got "
                             f"{given!r}" + (f" (no {what} named {unknown[0]!r})"
                                             if unknown else f" (not every {what})"))
        return [given[n] for n in names]
    if isinstance(given, (list, tuple)) and len(given) == len(names) and \
            all(isinstance(c, str) for c in given):
        return list(given)
    raise ValueError(f"{arg} for a model with {len(names)} {what}s {names}: a list of "
                     f"{len(names)} column names ({what} order) or a dict {{{what} name: "
                     f"column}}, got {given!r}")


def _labels_named(model, data, label_col):
    """How label-range errors call the labels: their column, one name per output."""
    if isinstance(label_col, list):
        return [f"labels of output {spec.name!r} (column {c!r})"
                for spec, c in zip(model.output_specs, label_col)]
    return f"labels (column {label_col!r})" if hasattr(data, "columns") else "labels"


def _input_shape(model):
    """The per-row input shape, or the list of them for a model with several inputs."""
    specs = model.input_specs
    return specs[0].shape if len(specs) == 1 else [spec.shape for spec in specs]


def _source(data, model, features_col, label_col, what):
    features_col = input_columns(model, data, features_col)
    if hasattr(data, "columns"):  # (an RDD's label_col only says its rows hold labels)
        label_col = target_columns(model, data, label_col)
    try:
        with spark_errors():
            return source(data, feature_shape=_input_shape(model), features_col=features_col,
                          label_col=label_col, what=what)
    except ValueError as e:
        raise named_error(e, what, True) from None


def _looks_labelled(data) -> bool:
    first = data.first()
    return isinstance(first, tuple) and len(first) == 2
