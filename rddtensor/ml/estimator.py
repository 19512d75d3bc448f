"""Spark ML estimators: ``NNEstimator``, ``NNRegressor``, ``NNClassifier``.

``fit`` builds a fresh network from the ``network`` Param, compiles it from the Params and trains
it with the distributed engine (``Sequential.fit`` on the DataFrame, so the same step function,
mini-batches and all-reduce as any distributed fit). The estimator itself never changes, so
``CrossValidator`` and ``fitMultiple`` can fit many copies of it.
"""
from __future__ import annotations

import inspect

from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import ArrayType, NumericType

from rddtensor.spark.engine import fit_distributed
from rddtensor.training.sequential import Sequential

from rddtensor.spark.connect import is_connect_dataframe, training_error
from rddtensor.ml.model import NNClassificationModel, NNModel
from rddtensor.ml.network import network_from_json
from rddtensor.ml.params import (NNClassifierParams, NNEstimatorParams, feature_columns,
                                 loss_from_param, optimizer_from_params)


def engine_accepts(option: str) -> bool:
    """Whether a distributed ``fit`` takes keyword ``option`` (e.g. ``checkpoint_dir``)."""
    return option in inspect.signature(Sequential.fit).parameters or \
        option in inspect.signature(fit_distributed).parameters


def _check_label(schema, col: str, scalar: bool):
    if col not in schema.names:
        raise ValueError(f"labelCol={col!r}: the DataFrame has no column {col!r}; its columns "
                         f"are {schema.names}")
    t = schema[col].dataType
    if not scalar and (isinstance(t, VectorUDT) or (isinstance(t, ArrayType) and
                                                     isinstance(t.elementType, NumericType))):
        return  # vector targets: a network whose output has several values
    if not isinstance(t, NumericType):
        hint = " (index string labels with pyspark.ml.feature.StringIndexer)" \
            if t.typeName() == "string" else ""
        raise ValueError(f"labelCol={col!r}: labels must be numeric, got {t.simpleString()}{hint}")


class NNEstimator(Estimator, NNEstimatorParams, DefaultParamsWritable, DefaultParamsReadable):
    """Trains a ``rddtensor.layers.Sequential`` (or a graph ``L.Model`` with one output) on a
    DataFrame; ``fit`` returns an ``NNModel``.

    Features come from ``featuresCol`` (a vector column, dense or sparse; ``array<float>`` /
    ``array<int>`` sequences; image structs from ``spark.read.format("image")``, decoded to
    NCHW float32 in [0, 1], RGB); for a network with several inputs, from ``featuresCols``:
    one column per input, in the network's input order (each of those kinds, or a numeric
    column, e.g. ids for an ``Embedding``: rows of shape ``(1,)``; unset, the columns named
    like the inputs, as ``model.fit(df)`` reads them). Targets come from ``labelCol``
    (numeric; a vector or array column for a network whose output has several values),
    optional sample weights from ``weightCol`` (numbers >= 0: the loss is the weighted mean over
    each global batch). Training is
    ``maxEpoch`` epochs of synchronous mini-batch SGD with global batch ``batchSize`` on the
    distributed engine; the optimizer is ``optimizer`` with learning rate ``learningRate``.

    Example:
        >>> from rddtensor import layers as L
        >>> net = L.Sequential([L.Dense(16, activation="relu", input_shape=(4,)), L.Dense(1)])
        >>> est = NNEstimator(network=net, loss="mse", maxEpoch=5, batchSize=64)
        >>> model = est.fit(train_df)                 # doctest: +SKIP
        >>> model.transform(test_df).select("prediction").show()   # doctest: +SKIP

        Two inputs (an id column and a vector column), one column each:

        >>> ids, dense = L.Input((1,), name="ids"), L.Input((4,), name="dense")
        >>> h = L.Concatenate()([L.Flatten()(L.Embedding(100, 8)(ids)), dense])
        >>> net = L.Model([ids, dense], L.Dense(1)(h))
        >>> est = NNRegressor(network=net, featuresCols=["user_id", "features"])
        >>> model = est.fit(train_df)                 # doctest: +SKIP
    """

    _model_class = NNModel

    @keyword_only
    def __init__(self, *, network=None, featuresCol="features", labelCol="label",
                 predictionCol="prediction", batchSize=32, maxEpoch=10, learningRate=1e-3,
                 optimizer="adam", loss="mse", metrics=None, seed=0, validationSplit=0.0,
                 checkpointDir=None, numPartitions=None, allreduce="auto", iterationsPerJob=8,
                 verbose=0, inferenceBatchSize=4096, weightCol=None,
                 featuresCols=None):
        super().__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, network=None, featuresCol="features", labelCol="label",
                  predictionCol="prediction", batchSize=32, maxEpoch=10, learningRate=1e-3,
                  optimizer="adam", loss="mse", metrics=None, seed=0, validationSplit=0.0,
                  checkpointDir=None, numPartitions=None, allreduce="auto", iterationsPerJob=8,
                  verbose=0, inferenceBatchSize=4096, weightCol=None,
                  featuresCols=None):
        """Set any of the Params by keyword."""
        return self._set(**self._input_kwargs)

    # setters, pyspark.ml style
    def setNetwork(self, value):
        return self._set(network=value)

    def setFeaturesCol(self, value):
        return self._set(featuresCol=value)

    def setFeaturesCols(self, value):
        """One column per input of the network, in its input order (see ``featuresCols``)."""
        return self._set(featuresCols=value)

    def setLabelCol(self, value):
        return self._set(labelCol=value)

    def setPredictionCol(self, value):
        return self._set(predictionCol=value)

    def setBatchSize(self, value):
        return self._set(batchSize=value)

    def setMaxEpoch(self, value):
        return self._set(maxEpoch=value)

    def setLearningRate(self, value):
        return self._set(learningRate=value)

    def setOptimizer(self, value):
        return self._set(optimizer=value)

    def setLoss(self, value):
        return self._set(loss=value)

    def setMetrics(self, value):
        return self._set(metrics=value)

    def setSeed(self, value):
        return self._set(seed=value)

    def setValidationSplit(self, value):
        return self._set(validationSplit=value)

    def setCheckpointDir(self, value):
        return self._set(checkpointDir=value)

    def setNumPartitions(self, value):
        return self._set(numPartitions=value)

    def setInferenceBatchSize(self, value):
        return self._set(inferenceBatchSize=value)

    def setWeightCol(self, value):
        return self._set(weightCol=value)

    # --- fit ----------------------------------------------------------------------------------
    def _network(self):
        if not self.isDefined(self.network):
            raise ValueError(f"{type(self).__name__}: set network=... (a rddtensor.layers.Sequential) "
                             "before fit")
        model = network_from_json(self.getNetwork(), seed=self.getSeed())
        model.compile(optimizer=optimizer_from_params(self.getOptimizer(),
                                                      self.getLearningRate()),
                      loss=loss_from_param(self.getLoss()), metrics=self.getMetrics())
        return model

    def _engine_options(self, features=None) -> dict:
        """The engine ``fit``'s keywords; ``features``: its ``features_col`` (a column, or a
        list of one per input; default ``featuresCol``)."""
        opts = {"features_col": self.getFeaturesCol() if features is None else features,
                "label_col": self.getLabelCol(),
                "allreduce": self.getAllreduce(), "iterations_per_job": self.getIterationsPerJob()}
        if self.getNumPartitions() is not None:
            opts["num_partitions"] = self.getNumPartitions()
        if self.isDefined(self.weightCol) and self.getWeightCol():
            opts["weight_col"] = self.getWeightCol()
        if self.getCheckpointDir() is not None and engine_accepts("checkpoint_dir"):
            opts["checkpoint_dir"] = self.getCheckpointDir()
        return opts

    def _fit(self, dataset):
        if is_connect_dataframe(dataset):
            name = self._model_class.__name__
            raise training_error(f"{type(self).__name__}.fit", then=(
                f"then save the fitted {name} (model.save(path)) and on Connect load it with "
                f"{name}.load(path) and call its transform(df)"))
        lcol = self.getLabelCol()
        model = self._network()
        # one column per input of the network (featuresCol, or featuresCols), checked here
        fcols, _ = feature_columns(self, model, dataset.schema)
        _check_label(dataset.schema, lcol, scalar=self._model_class is NNClassificationModel)
        wcol = self.getWeightCol() if self.isDefined(self.weightCol) else None
        if wcol and wcol not in dataset.columns:
            raise ValueError(f"weightCol={wcol!r}: the DataFrame has no column {wcol!r}; its "
                             f"columns are {dataset.columns}")
        # (a column that two inputs, or an input and the label, read is selected once)
        data = dataset.select(*dict.fromkeys([*fcols, lcol, *([wcol] if wcol else [])]))
        validation = None
        if self.getValidationSplit() > 0:
            split = self.getValidationSplit()
            data, validation = data.randomSplit([1 - split, split], seed=self.getSeed())
        history = model.fit(data, epochs=self.getMaxEpoch(), batch_size=self.getBatchSize(),
                            seed=self.getSeed(), verbose=self.getVerbose(),
                            validation_data=validation, **self._engine_options(
                                fcols if len(model.input_specs) > 1 else fcols[0]))
        fitted = self._model_class(network=model)
        fitted.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        return self._copyValues(fitted)


class NNRegressor(NNEstimator):
    """``NNEstimator`` for regression: mean squared error by default, ``prediction`` a double.

    ``RegressionEvaluator`` reads its output. See ``NNEstimator`` for the Params.
    """

    @keyword_only
    def __init__(self, *, network=None, featuresCol="features", labelCol="label",
                 predictionCol="prediction", batchSize=32, maxEpoch=10, learningRate=1e-3,
                 optimizer="adam", loss="mse", metrics=None, seed=0, validationSplit=0.0,
                 checkpointDir=None, numPartitions=None, allreduce="auto", iterationsPerJob=8,
                 verbose=0, inferenceBatchSize=4096, weightCol=None,
                 featuresCols=None):
        super(NNEstimator, self).__init__()
        self._set(**self._input_kwargs)


class NNClassifier(NNEstimator, NNClassifierParams):
    """``NNEstimator`` for classification; ``fit`` returns an ``NNClassificationModel``.

    Labels are class indices ``0 .. K-1`` (numeric; index strings with ``StringIndexer``); the
    network ends in ``K`` logits (loss ``sparse_categorical_crossentropy``, the default) or in
    one logit for two classes (loss ``binary_crossentropy``). The model's ``rawPrediction``,
    ``probability`` and ``prediction`` columns are what ``MulticlassClassificationEvaluator``
    and ``BinaryClassificationEvaluator`` read.

    Example:
        >>> from rddtensor import layers as L
        >>> net = L.Sequential([L.Dense(32, activation="relu", input_shape=(64,)), L.Dense(10)])
        >>> clf = NNClassifier(network=net, maxEpoch=10, batchSize=64, learningRate=3e-3)
        >>> pipeline = Pipeline(stages=[assembler, scaler, clf])   # doctest: +SKIP
    """

    _model_class = NNClassificationModel

    @keyword_only
    def __init__(self, *, network=None, featuresCol="features", labelCol="label",
                 predictionCol="prediction", probabilityCol="probability",
                 rawPredictionCol="rawPrediction", batchSize=32, maxEpoch=10, learningRate=1e-3,
                 optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None, seed=0,
                 validationSplit=0.0, checkpointDir=None, numPartitions=None, allreduce="auto",
                 iterationsPerJob=8, verbose=0, inferenceBatchSize=4096, weightCol=None,
                 featuresCols=None):
        super(NNEstimator, self).__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, network=None, featuresCol="features", labelCol="label",
                  predictionCol="prediction", probabilityCol="probability",
                  rawPredictionCol="rawPrediction", batchSize=32, maxEpoch=10, learningRate=1e-3,
                  optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None, seed=0,
                  validationSplit=0.0, checkpointDir=None, numPartitions=None, allreduce="auto",
                  iterationsPerJob=8, verbose=0, inferenceBatchSize=4096, weightCol=None,
                  featuresCols=None):
        """Set any of the Params by keyword."""
        return self._set(**self._input_kwargs)

    def setProbabilityCol(self, value):
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value):
        return self._set(rawPredictionCol=value)
