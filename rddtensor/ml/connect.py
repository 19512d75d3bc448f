"""The engine ``fit`` / ``evaluate`` / ``predict`` find for a Spark Connect DataFrame.

Registered (``rddtensor/__init__.py``) under ``pyspark.sql.connect.dataframe.DataFrame``, which is
also a ``pyspark.sql.dataframe.DataFrame``: the most specific registered type wins
(``rddtensor.training.engines``), so a Connect DataFrame comes here, not to the RDD engine.

- ``fit`` and ``evaluate`` run on RDDs, which Spark Connect does not have: they stop before
  touching the data, with ``rddtensor.spark.connect.ConnectTrainingError`` saying what to do.
- ``predict`` is ``NNModel.transform``: the DataFrame with a ``prediction`` column appended
  (lazy, as on a classic session; there, ``predict`` returns an RDD of numpy arrays instead).
"""
from __future__ import annotations

from rddtensor.ml.model import NNModel
from rddtensor.spark.connect import evaluation_error, training_error


def fit_distributed(model, data, **options):
    """Refuses: training needs RDDs."""
    raise training_error(f"{type(model).__name__}.fit")


def evaluate_distributed(model, data, **options):
    """Refuses: evaluation runs on RDDs too."""
    raise evaluation_error(f"{type(model).__name__}.evaluate")


def predict_distributed(model, data, *, batch_size: int = 4096, features_col="features"):
    """``data`` with a ``prediction`` column: the model's outputs for ``features_col``, a double
    for one output, else a vector of the flattened outputs (``NNModel.transform``).

    Example:
        >>> out = model.predict(connect_df)            # doctest: +SKIP
        >>> out.select("id", "prediction").show()      # doctest: +SKIP
    """
    return NNModel(network=model, featuresCol=features_col,
                   inferenceBatchSize=batch_size).transform(data)
