"""How a trained network reaches the executors for ``NNModel.transform``.

The network travels as one ``rddtensor.spark.wire`` record (``rddtensor.ml.network.encode``), in
one of three envelopes, each with the record as ``.value`` on the worker; a worker reads it only
when its decoded-model cache (``rddtensor.ml.transform``, keyed by the network's fingerprint)
misses, so once per worker process and network:

- a classic session: a broadcast (``SparkContext.broadcast``), fetched once per executor;
- Spark Connect, which has no ``SparkContext`` and so no broadcasts:

  - ``InlineNetwork``: a network of at most ``INLINE_MAX`` bytes travels inside the UDF, so
    inside the query plan; every task gets its copy, as classic PySpark ships a UDF's pickled
    closure inline up to ``spark.broadcast.UDFCompressionThreshold`` (1 MiB) and broadcasts it
    above;
  - ``ArtifactNetwork``: a larger one is uploaded once per session as a file artifact
    (``SparkSession.addArtifacts(path, file=True)``: streamed in chunks, so gRPC's message
    limit, 128 MiB by default, does not apply) and read from the executor's local copy
    (``SparkFiles.get``). Inlining it instead would cost every concurrently running task its
    own deserialized copy in the executor's JVM heap, and plans over 128 MiB fail outright.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from rddtensor.spark.connect import is_connect_session

#: Largest encoded network (bytes) that travels inside a Spark Connect plan; larger ones
#: travel as session artifacts. PySpark's own threshold for inlining a UDF's closure.
INLINE_MAX = 1 << 20


@dataclass(frozen=True)
class InlineNetwork:
    """The encoded network inside the UDF's closure (Spark Connect, small networks)."""

    value: bytes

    def __repr__(self):
        return f"InlineNetwork({len(self.value)} bytes)"


@dataclass(frozen=True)
class ArtifactNetwork:
    """The name of a session file artifact holding the encoded network (Spark Connect)."""

    name: str

    @property
    def value(self) -> bytes:
        """The encoded network, read from this executor's copy of the artifact."""
        from pyspark import SparkFiles
        with open(SparkFiles.get(self.name), "rb") as f:
            return f.read()


def owner(spark):
    """What a shipped network belongs to: the ``SparkContext`` (classic) or the Connect session
    (artifacts are per session)."""
    return spark if is_connect_session(spark) else spark.sparkContext


def artifact_name(token: str) -> str:
    """The artifact's file name: the fingerprint covers everything encoded, so one name never
    stands for two contents (Spark Connect refuses to overwrite an artifact)."""
    return f"rddtensor-network-{token}.wire"


def ship(spark, payload: bytes, token: str):
    """``payload`` (the encoded network with fingerprint ``token``) in the envelope for
    ``spark``'s kind of session (see the module docstring)."""
    if not is_connect_session(spark):
        return spark.sparkContext.broadcast(payload)
    if len(payload) <= INLINE_MAX:
        return InlineNetwork(payload)
    name = artifact_name(token)
    tmp = tempfile.mkdtemp(prefix="rddtensor-ship-")
    try:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(payload)
        spark.addArtifacts(path, file=True)  # (same name, same bytes: accepted again)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ArtifactNetwork(name)
