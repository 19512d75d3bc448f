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

    A model with several inputs reads the columns named like its inputs, or ``features_col``
    as a list (one column per input, in input order) or a dict ``{input name: column}``
    (``NNModel``'s ``featuresCols``), as the classic engine does.

    Example:
        >>> out = model.predict(connect_df)            # doctest: +SKIP
        >>> out.select("id", "prediction").show()      # doctest: +SKIP
    """
    names = [spec.name for spec in model.input_specs]
    if len(names) > 1 and features_col in ("features", None):  # (as the classic engine reads)
        missing = [c for c in names if c not in data.columns]
        if missing:
            raise ValueError(f"the model's inputs {names} are read from the DataFrame's columns "
                             f"of the same names, and it has no column {missing[0]!r} (its "
                             f"columns: {data.columns}); or map them: features_col=[one column "
                             "per input, in order] or {input name: column}")
        features_col = names
    if isinstance(features_col, dict):
        unknown = [k for k in features_col if k not in names]
        if unknown or len(features_col) != len(names):
            raise ValueError(f"features_col maps the model's inputs {names} to columns, got "
                             f"{features_col!r}" + (f" (no input named {unknown[0]!r})"
                                                    if unknown else " (not every input)"))
        features_col = [features_col[n] for n in names]
    if isinstance(features_col, (list, tuple)):
        return NNModel(network=model, featuresCols=list(features_col),
                       inferenceBatchSize=batch_size).transform(data)
    return NNModel(network=model, featuresCol=features_col,
                   inferenceBatchSize=batch_size).transform(data)
