"""rddtensor: deep learning on Apache Spark in pure Python.

Users write ``from rddtensor import layers as L, optim``.
"""
from rddtensor import _checkout

_checkout.mount(__name__, __file__)  # a source checkout: rddtensor.layers/.optim are ../layers, ../optim

from rddtensor.backend import asarray, get_array_module, gpu_available, has_cupy, to_numpy  # noqa: E402

from rddtensor.training import engines as _engines  # noqa: E402
from rddtensor.version import __version__  # noqa: E402

# RDDs and DataFrames train on the Spark engine (imported, with pyspark, only when one arrives)
_engines.register("rddtensor.spark.engine", ("pyspark.rdd.RDD", "pyspark.sql.dataframe.DataFrame"),
                  options=("num_partitions", "iterations_per_job", "allreduce", "wire_dtype",
                           "features_col", "label_col", "weight_col"))
# a Spark Connect DataFrame (no RDDs): predict scores it, fit and evaluate refuse, saying why
_engines.register("rddtensor.ml.connect", ("pyspark.sql.connect.dataframe.DataFrame",))

__all__ = ["__version__", "asarray", "get_array_module", "gpu_available", "has_cupy", "to_numpy"]
