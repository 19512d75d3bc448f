"""The engine's task protocol: the kinds of record tasks exchange, and the settings the driver
ships to them.

Everything here travels inside Spark task closures (pickled once per stage), so the types are
plain, small and immutable: frozen dataclasses of ints, strings, tuples and flags, and a string
enum. Readers: ``rddtensor.spark.allreduce`` (the strategies), ``rddtensor.spark.stages`` (the
task-side pieces), ``rddtensor.spark.localcache`` (the host-local cache) and
``rddtensor.spark.worker`` (the plan cache); the driver side builds them in
``rddtensor.spark.engine``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from rddtensor.training.batching import BlockShuffle, steps_per_epoch

__all__ = ["Kind", "StepConfig", "CacheSettings", "Iteration"]


class Kind(str, enum.Enum):
    """The kind of a ``rddtensor.spark.wire`` record: the ``"k"`` of its header.

    A member is a ``str`` equal to its value (``Kind.OWN == "own"``), so what ``wire.unpack``
    returns (a plain ``str``) compares equal to it. Where a kind becomes bytes or part of a
    file name, its ``.value`` is written (``wire.frames``, ``localcache.put``): never
    ``str()``/``format()`` of a member, which spell ``Kind.OWN``.
    """

    OWN = "own"          #: an owner's block of θ and its optimizer slots (sharded state)
    THETA = "theta"      #: a block of θ for the other partitions (all-gather, broadcast)
    GRAD = "grad"        #: one partition's gradient for one block (sharded reduce-scatter)
    RSTATE = "rstate"    #: a replica's whole θ and optimizer slots (replicated state)
    RGRAD = "rgrad"      #: one partition's whole gradient, to every partition (replicated)
    SHARD = "shard"      #: a partition's data shard, inline (``rddtensor.spark.shards``)
    STORE = "store"      #: a token for a shard in the executor-local data store (``datastore``)
    LOCAL = "local"      #: a token naming a record in the host-local cache (``localcache``)
    BLOCK = "block"      #: one block of a ``BlockTensor`` (``rddtensor.spark.tensor``)
    SLICE = "slice"      #: a piece of a block on its way to a new blocking (``BlockTensor``)
    NETWORK = "network"  #: a Spark ML model's network (``rddtensor.ml.network``)


@dataclass(frozen=True)
class StepConfig:
    """What a task needs to compute its part of a training step: which rows of the global
    batch are its own, how to weigh and normalise them, how gradients travel. Fixed for a fit;
    built by ``DistributedRunner``, read by ``stages.local_gradient`` and the strategies.

    Fields:
        n_total: training rows over all partitions.
        batch_size: rows per global mini-batch.
        seed: the fit's seed (row order per epoch, per-step dropout streams).
        shuffle: each epoch's row order (``rddtensor.training.batching``): ``True`` (a global
            permutation per epoch), ``False`` (as stored) or a ``BlockShuffle`` (blocks, then
            rows within windows of blocks; a frozen pair of ints, pickles small).
        offsets: ``offsets[j]`` is the global index of partition ``j``'s first row.
        t0: the step epoch 0 started from (``epoch, batch = divmod(t - t0, steps_per_epoch)``).
        batch_sizes: rows of each mini-batch of an epoch (the last may be short): the
            gradient's normaliser.
        class_weight: ``{class: weight}`` or ``None``, as given to ``fit``.
        wire_bf16: whether gradients and non-owners' parameter copies cross the shuffle as
            bfloat16 (``fit(..., wire_dtype="bfloat16")``).
    """

    n_total: int
    batch_size: int
    seed: int
    shuffle: bool | BlockShuffle
    offsets: tuple
    t0: int
    batch_sizes: tuple
    class_weight: dict | None = None
    wire_bf16: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n_total, self.batch_size)

    @property
    def gradient_bf16(self) -> tuple:
        """The ``bf16`` argument of ``wire.chunks`` for a gradient record (array ``g``)."""
        return ("g",) if self.wire_bf16 else ()


@dataclass(frozen=True)
class CacheSettings:
    """A job's settings for the host-local cache (``rddtensor.spark.localcache``), from the
    driver. ``DistributedRunner`` holds one per fit and makes a new one per job with
    ``dataclasses.replace`` (a task only ever reads them); ``localcache.put`` and
    ``stages.deliver``/``to_self`` read them.

    Fields:
        run: the fit's run id: the cache directory ``<root>/<run>`` and the job tag.
        job: the job's number within the run (1, 2, ...): stamped into each file, so a token
            of an earlier job never reads a later job's record.
        evict: fault injection (``spark.rddtensor.localCache=evict``): every file is deleted as
            soon as it is written, so every read misses.
        owner: ``localcache.register_run``'s value (the driver's host and cache root), or
            ``None``: a task there never makes the run's directory anew once it is removed.
        peers: per partition, the host its tasks run on (a small int; ``engine`` reads where
            each partition's data is cached), or ``()`` when not known: a record between two
            partitions of one host goes through that host's cache too (a token); a
            partition's records to itself always do.
        addrs: with the peer transport (``rddtensor.spark.peers``), the address of each host
            of ``peers`` (``addrs[peers[j]]``: the host name Spark's block manager gives the
            executor), else ``()``: a record to a partition on another host is then a token
            too, which that partition fetches from the sender's worker.
        key: the fit's secret for the peer transport: a worker serves a run's files only to
            requests that carry it.
    """

    run: str
    job: int = 0
    evict: bool = False
    owner: str | None = None
    peers: tuple = ()
    addrs: tuple = ()
    key: str = ""

    def shares_host(self, src: int, dest: int) -> bool:
        """Whether partitions ``src`` and ``dest`` run on one host (``src == dest`` always)."""
        return src == dest or (bool(self.peers) and self.peers[src] == self.peers[dest])

    def serves(self, src: int, dest: int) -> str | None:
        """The address partition ``src`` serves its record to ``dest`` from, when ``dest`` is
        on another host and the peer transport is on; else ``None``."""
        if not self.addrs or not self.peers or self.shares_host(src, dest):
            return None
        return self.addrs[self.peers[src]]


@dataclass(frozen=True)
class Iteration:
    """What one iteration's tasks read besides the model: built per iteration by
    ``DistributedRunner._try_group``, read by the strategies (``allreduce``).

    Fields:
        step: the fit's ``StepConfig``.
        cache: the job's ``CacheSettings``, or ``None`` while the host-local cache is off.
        cut: whether this is the job's last iteration, whose state is the job's cut state:
            it outlives the job, so it goes inline (never as cache tokens).
        weight_sum: with sample weights (``fit(..., weight_col=...)``), the sum of the weights
            over this iteration's whole global batch: every partition's loss is normalised by
            it (``rddtensor.training.steps.gradient_step``); ``None`` without weights.
        homes: whether each pass also reads its data's home (``Shards.beside``), so that it
            runs on the host holding its data: needed while the partitions are on several
            hosts, a small cost for nothing while they share one.
    """

    step: StepConfig
    cache: CacheSettings | None = None
    cut: bool = True
    weight_sum: float | None = None
    homes: bool = True

    @property
    def state_cache(self) -> CacheSettings | None:
        """The cache settings for the iteration's state records: none when ``cut``."""
        return None if self.cut else self.cache
