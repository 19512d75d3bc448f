"""Raw-bytes RDD plumbing: Python stages that emit bytes records, a shuffle keyed by destination
partition, and partition-wise unions — the three moves the training iteration is made of.

PySpark pickles every record by default and its ``partitionBy`` pickles lists of pairs; here a
record is one ``bytes`` object (see ``rddtensor.spark.wire``) that the JVM stores, shuffles and hands
back untouched. ``co_union`` appends partition ``j`` of one shuffle output to partition ``j`` of
another without a shuffle (Spark's partitioner-aware union), which is how a task sees both the
shuffled parameters and its cached data shard (``pin``), whatever the number of records on each
side; ``home`` keeps partition ``j``'s tasks on the host that holds its data. ``zip_raw`` (the JVM's ``zip``, equal record counts) pairs the one-record partitions of
block tensors.
"""
from __future__ import annotations

import struct

from pyspark.rdd import RDD
from pyspark.serializers import FramedSerializer, NoOpSerializer, write_int

from rddtensor.spark import worker

_KEY = struct.Struct(">q")  # PairwiseRDD reads keys as big-endian longs


def raw(jrdd, ctx) -> RDD:
    """Wrap a JVM RDD of byte arrays as a Python RDD whose records arrive as ``bytes``."""
    return RDD(jrdd, ctx, NoOpSerializer())


class RawFrames(FramedSerializer):
    """Task output: each record is ``bytes`` or a list of buffers sent back to back as one
    record (a header and array views: no join copy on the way out)."""

    def dump_stream(self, iterator, stream):
        for obj in iterator:
            if isinstance(obj, list):
                views = [memoryview(p).cast("B") for p in obj]
                write_int(sum(v.nbytes for v in views), stream)
                for v in views:
                    stream.write(v)
            else:
                write_int(len(obj), stream)
                stream.write(obj)

    def loads(self, obj):
        return obj


def map_raw(rdd: RDD, f, preserves_partitioning: bool = False) -> RDD:
    """``f(split, records) -> iterable of records``; a record is ``bytes`` or a list of buffers
    (``rddtensor.spark.wire.frames``) and is stored unpickled. Every task starts with
    ``worker.current()`` (a worker's first task prepares the process)."""
    def run(split, records):
        worker.current()
        return f(split, records)
    out = rdd.mapPartitionsWithIndex(run, preservesPartitioning=preserves_partitioning)
    out._jrdd_deserializer = RawFrames()
    return raw(out._jrdd, rdd.ctx)


def key(dest: int) -> bytes:
    return _KEY.pack(int(dest))


def _identity_partition(k):  # one function object, so every shuffle shares one partitioner id
    return k


def shuffle_raw(rdd: RDD, f, n_partitions: int) -> RDD:
    """Run ``f(split, records)`` yielding ``key(dest), payload, key(dest), payload, ...`` and
    deliver each payload to partition ``dest`` of the result (a shuffle; order within a
    partition is not defined, so payloads carry their source in their header)."""
    return shuffle_pairs(map_raw(rdd, f), n_partitions)


def shuffle_pairs(keyed: RDD, n_partitions: int) -> RDD:
    """Shuffle a raw RDD whose records alternate ``key(dest), payload`` (no Python pass: the
    JVM pairs, partitions and delivers the payloads)."""
    ctx = keyed.ctx
    jvm = ctx._jvm
    pairs = jvm.PairwiseRDD(keyed._jrdd.rdd()).asJavaPairRDD()
    partitioner = jvm.PythonPartitioner(int(n_partitions), id(_identity_partition))
    return raw(jvm.PythonRDD.valueOfPair(pairs.partitionBy(partitioner)), ctx)


def pin(rdd: RDD, n_partitions: int) -> RDD:
    """``rdd``'s non-empty records, each kept in its partition but carried by a shuffle, so that
    the result has the partitioner of ``shuffle_pairs``' outputs (for ``co_union``). Cached:
    the caller unpersists it."""
    def keep(j, records):
        for r in records:
            if len(r):
                yield key(j)
                yield r
    return shuffle_raw(rdd, keep, n_partitions).persist()


def co_union(*rdds: RDD) -> RDD:
    """Partition ``j`` of the result is partition ``j`` of each RDD in turn (no shuffle).

    The RDDs must come from ``shuffle_pairs`` / ``pin`` / ``home`` with the same partition
    count: Spark then unions them partition by partition (``PartitionerAwareUnionRDD``),
    whatever the number of records in each. This is how a task sees the shuffled parameters and
    its data shard. One union of all of them, never nested: the union's task runs on the host
    that most of its parents prefer (a cached partition: where it is cached; a shuffle output:
    the hosts that wrote at least a fifth of its bytes), a vote that ``home`` wins.
    """
    first = rdds[0]
    if len(rdds) <= 2:  # (one py4j call: the union's of two, or the RDD itself)
        out = first._jrdd.union(rdds[1]._jrdd) if len(rdds) == 2 else first._jrdd
    else:
        out = first.ctx.union(list(rdds))._jrdd
    if out.getNumPartitions() != first.getNumPartitions():
        raise RuntimeError("co_union needs RDDs partitioned alike (shuffle_pairs or pin outputs)")
    return raw(out, first.ctx)


def home(rdd: RDD) -> RDD:
    """An empty RDD partitioned like ``rdd`` (a ``pin`` / ``shuffle_pairs`` output, cached) whose
    partition ``j`` is cached where partition ``j`` of ``rdd`` is: its task computes (or reads)
    ``rdd``'s partition and keeps none of its records (the JVM's ``sample`` at fraction 0: no
    Python pass, the partitioner kept). Persisted: count it once, and each of its tasks caches
    both partitions on one executor.

    Why: a partition's state records to itself go through its host's cache as tokens of a few
    bytes (``rddtensor.spark.localcache``), so the shuffle's byte counts point a reducer to the
    *other* hosts. ``co_union(shuffled, data, home)`` (or ``co_union(shuffled, home, home)``)
    gives the data's host two votes to the shuffle's one per host: partition ``j`` runs on the
    same host pass after pass and job after job (issue 21)."""
    return raw(rdd._jrdd.sample(False, 0.0, 0), rdd.ctx).persist()


def zip_raw(a: RDD, b: RDD) -> RDD:
    """Partition-wise zip without a shuffle: records arrive as ``a0, b0, a1, b1, ...``.

    Both RDDs must have the same number of partitions and of records in each partition.
    """
    return raw(a._jrdd.zip(b._jrdd), a.ctx)


def pairs(records):
    """Regroup a zipped stream ``a0, b0, a1, b1, ...`` into two lists ``([a...], [b...])``."""
    left, right = [], []
    for i, r in enumerate(records):
        (left if i % 2 == 0 else right).append(r)
    return left, right
