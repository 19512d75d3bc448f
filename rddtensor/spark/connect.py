"""Spark Connect: recognising its sessions and DataFrames, and what rddtensor does on them.

A Spark Connect client (``SparkSession.builder.remote("sc://...")``, ``remote("local[2]")``, or
a serverless / shared cluster) has DataFrames but no ``SparkContext``: no RDDs, no broadcasts,
no py4j gateway to the JVM. rddtensor trains on RDDs (parameter blocks, the all-reduce shuffle,
cached shards), so training stops at once on Connect with ``ConnectTrainingError``; scoring
(``rddtensor.ml.NNModel.transform``) is DataFrame code and runs there, the network carried
inside the plan instead of in a broadcast (``rddtensor.ml.model``).

The checks read ``sys.modules`` and never import ``pyspark.sql.connect``: an object cannot
come from a module that is not loaded, and the module needs ``pyspark[connect]``'s extra
dependencies (grpcio, ...), which a classic installation may lack.
"""
from __future__ import annotations

import sys

#: where a Connect client's classes live (PySpark >= 3.4)
_DATAFRAME = ("pyspark.sql.connect.dataframe", "DataFrame")
_SESSION = ("pyspark.sql.connect.session", "SparkSession")


def _loaded(module: str, name: str):
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def is_connect_dataframe(obj) -> bool:
    """Whether ``obj`` is a Spark Connect DataFrame (imports nothing)."""
    cls = _loaded(*_DATAFRAME)
    return cls is not None and isinstance(obj, cls)


def is_connect_session(obj) -> bool:
    """Whether ``obj`` is a Spark Connect ``SparkSession`` (imports nothing)."""
    cls = _loaded(*_SESSION)
    return cls is not None and isinstance(obj, cls)


class ConnectTrainingError(TypeError):
    """Training (or anything else that needs RDDs) was asked of a Spark Connect DataFrame."""


def training_error(what: str, then: str = "") -> ConnectTrainingError:
    """The refusal of ``what`` (e.g. ``"NNClassifier.fit"``) on a Connect DataFrame: why, and
    what to do (``then``: after training on a classic session; by default, save the model and
    score it on Connect with ``rddtensor.ml``)."""
    then = then or ("then save the model (model.save(path)) and score on Connect with "
                    "rddtensor.ml.NNModel(network=rddtensor.layers.load_model(path))"
                    ".transform(df)")
    return ConnectTrainingError(
        f"{what} got a Spark Connect DataFrame: rddtensor trains on RDDs (parameter blocks, "
        "the all-reduce shuffle and the cached shards are RDD operations) and Spark Connect "
        "has no RDD API. Train on a classic Spark session (SparkSession.builder.master(...), "
        f"not .remote(...)), {then}.")


def evaluation_error(what: str) -> ConnectTrainingError:
    """The refusal of ``what`` (e.g. ``"Sequential.evaluate"``) on a Connect DataFrame."""
    return ConnectTrainingError(
        f"{what} got a Spark Connect DataFrame: rddtensor evaluates on RDDs and Spark Connect "
        "has no RDD API. Evaluate on a classic Spark session, or score on Connect with "
        "rddtensor.ml.NNModel(network=model).transform(df) (NNClassificationModel for class "
        "probabilities) and a pyspark.ml.evaluation evaluator.")
