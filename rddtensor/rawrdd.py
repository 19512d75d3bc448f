"""Raw-bytes RDD plumbing: Python stages that emit bytes records, a shuffle keyed by destination
partition, and partition-wise zips — the three moves the training iteration is made of.

PySpark pickles every record by default and its ``partitionBy`` pickles lists of pairs; here a
record is one ``bytes`` object (see ``rddtensor.wire``) that the JVM stores, shuffles and hands
back untouched. ``zip_raw`` pairs partition ``j`` of two RDDs without a shuffle (the JVM's
``zip``), which is how a task sees both the shuffled parameters and its cached data shard; it
requires both sides to hold the same number of records per partition, so every stage here emits
a fixed record count.
"""
from __future__ import annotations

import struct

from pyspark.rdd import RDD
from pyspark.serializers import NoOpSerializer

_KEY = struct.Struct(">q")  # PairwiseRDD reads keys as big-endian longs


def raw(jrdd, ctx) -> RDD:
    """Wrap a JVM RDD of byte arrays as a Python RDD whose records arrive as ``bytes``."""
    return RDD(jrdd, ctx, NoOpSerializer())


def map_raw(rdd: RDD, f, preserves_partitioning: bool = False) -> RDD:
    """``f(split, records) -> iterable of bytes``; the output records are stored unpickled."""
    out = rdd.mapPartitionsWithIndex(f, preservesPartitioning=preserves_partitioning)
    out._bypass_serializer = True
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
