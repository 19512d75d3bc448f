"""Spark ML stages: train and apply rddtensor networks inside ``pyspark.ml`` pipelines.

- ``NNEstimator`` / ``NNRegressor`` / ``NNClassifier``: Estimators whose ``fit`` trains a
  ``rddtensor.layers.Sequential`` (or a graph ``L.Model`` with one output) with the distributed
  engine and returns
- ``NNModel`` / ``NNClassificationModel``: Models whose ``transform`` predicts on Arrow batches
  (a scalar Arrow UDF; ``mapInArrow`` on older PySpark), on batch and streaming DataFrames
  alike.

All of them have camelCase Params (``featuresCol``, ``labelCol``, ``batchSize``, ``maxEpoch``,
``learningRate``, ...), ``copy`` and ``explainParams``. A graph model with several inputs
reads one column per input: ``featuresCols=[...]`` in the model's input order (unset: the
columns named like its inputs, as ``model.fit(df)`` reads them). They all persist with
``write().save(path)`` / ``load(path)``, alone or inside a saved ``PipelineModel`` (JSON +
``.npz``, never pickle; ``featuresCols`` with the other Params).

On a Spark Connect session (no RDDs) models ``load`` and ``transform`` as on a classic one;
training stops at once with a message that says why and what to do (``rddtensor.ml.connect``).

Example:
    >>> from rddtensor import layers as L
    >>> from pyspark.ml import Pipeline
    >>> from pyspark.ml.feature import StandardScaler, VectorAssembler
    >>> from rddtensor.ml import NNClassifier
    >>> net = L.Sequential([L.Dense(32, activation="relu", input_shape=(4,)), L.Dense(3)])
    >>> pipeline = Pipeline(stages=[
    ...     VectorAssembler(inputCols=["a", "b", "c", "d"], outputCol="raw"),
    ...     StandardScaler(inputCol="raw", outputCol="features"),
    ...     NNClassifier(network=net, maxEpoch=20, batchSize=32, learningRate=1e-2)])
    >>> model = pipeline.fit(train_df)            # doctest: +SKIP
    >>> model.transform(test_df).select("prediction", "probability")   # doctest: +SKIP
"""
from rddtensor.ml.estimator import NNClassifier, NNEstimator, NNRegressor
from rddtensor.ml.model import NNClassificationModel, NNModel

__all__ = ["NNEstimator", "NNRegressor", "NNClassifier", "NNModel", "NNClassificationModel"]
