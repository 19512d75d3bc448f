"""Spark ML Params of the rddtensor stages: camelCase names, type converters that validate.

A converter turns a value into the Param's type and refuses a bad one with a ``ValueError`` that
names the Param (``batchSize must be a positive integer, got 0``) when it is set, not later in a
Spark task. Shared column Params come from ``pyspark.ml.param.shared``; ``featuresCols`` (one
column per input of a graph model with several inputs) is this module's, with
``feature_columns``, which both ``fit`` and ``transform`` use to pick the columns the network's
inputs read.
"""
from __future__ import annotations

import json

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (HasFeaturesCol, HasLabelCol, HasPredictionCol,
                                     HasProbabilityCol, HasRawPredictionCol, HasSeed,
                                     HasWeightCol)

from rddtensor.ml.network import network_json
from rddtensor.spark.columns import feature_kind
from rddtensor.optim import Loss, Optimizer, get_loss, get_optimizer
from rddtensor.optim.optimizers import serialize_optimizer

ALLREDUCE = ("auto", "sharded", "replicated", "hierarchical")


def _positive_int(name):
    def convert(value):
        v = TypeConverters.toInt(value)
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
        return v
    return convert


def _positive_float(name):
    def convert(value):
        v = TypeConverters.toFloat(value)
        if not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v}")
        return v
    return convert


def _split(value):
    v = TypeConverters.toFloat(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"validationSplit must be in [0, 1), got {v}")
    return v


def _verbose(value):
    v = TypeConverters.toInt(value)
    if v not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {v}")
    return v


def _allreduce(value):
    v = TypeConverters.toString(value)
    if v not in ALLREDUCE:
        raise ValueError(f"allreduce must be one of {ALLREDUCE}, got {v!r}")
    return v


def _optimizer(value):
    """A name (``"adam"``), an ``rddtensor.optim`` optimizer or its ``{"class_name", "config"}`` dict ->
    the name or the dict as JSON text."""
    if isinstance(value, Optimizer):
        value = serialize_optimizer(value)
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    value = TypeConverters.toString(value)
    try:
        get_optimizer(json.loads(value) if value.lstrip().startswith("{") else value)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"optimizer: {e}") from None
    return value


def _loss(value):
    """A loss name (``"mse"``), an ``rddtensor.optim.Loss`` or its config dict -> the name or JSON text."""
    if isinstance(value, Loss):
        value = value.get_config()
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    value = TypeConverters.toString(value)
    try:
        loss_from_param(value)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"loss: {e}") from None
    return value


def loss_from_param(value: str):
    if value.lstrip().startswith("{"):
        config = dict(json.loads(value))
        return get_loss(config.pop("name"), **config)
    return get_loss(value)


def optimizer_from_params(name_or_json: str, learning_rate: float):
    """The optimizer of the ``optimizer`` Param with its learning rate set to ``learningRate``."""
    spec = json.loads(name_or_json) if name_or_json.lstrip().startswith("{") else name_or_json
    config = serialize_optimizer(get_optimizer(spec))
    config["config"]["lr"] = float(learning_rate)
    return get_optimizer(config)


def _columns(value):
    """A non-empty list of column names (``featuresCols``); ``None`` stays unset."""
    if value is None:
        return None
    if isinstance(value, dict):
        raise ValueError("featuresCols takes a list of column names in the network's input "
                         f"order (one per input), not a dict; got {value!r}")
    if isinstance(value, str):
        raise ValueError("featuresCols takes a list of column names (one per network input), "
                         f"got the string {value!r}; for one column set featuresCol")
    try:
        v = TypeConverters.toListString(value)
    except TypeError:
        raise ValueError("featuresCols must be a list of column names (one per network input), "
                         f"got {value!r}") from None
    if not v or not all(v):
        raise ValueError("featuresCols must be a non-empty list of non-empty column names (one "
                         f"per network input), got {v!r}")
    return v


class HasFeaturesCols(Params):
    """``featuresCols``: the columns a network with several inputs reads, one per input in
    the network's input order (``L.Input`` order of ``L.Model(inputs, outputs)``). Unset by
    default: then a one-input network reads ``featuresCol``, and a network with several
    inputs reads the columns named like its inputs (``L.Input(name=...)``), as
    ``model.fit(df)`` does."""

    featuresCols = Param(
        Params._dummy(), "featuresCols",
        "feature columns of a network with several inputs: one column name per input, in the "
        "network's input order (default: unset; then one input reads featuresCol, several "
        "read the columns named like the inputs). Each is a vector, an array of numbers, an "
        "image struct or (several inputs) a numeric column such as an id",
        typeConverter=_columns)

    def getFeaturesCols(self):
        """The ``featuresCols`` list, or ``None`` while unset."""
        return self.getOrDefault(self.featuresCols) if self.isDefined(self.featuresCols) \
            else None


def feature_columns(stage, network, schema) -> tuple[list, list]:
    """``(columns, kinds)``: the DataFrame column each input of ``network`` reads (in the
    network's input order) and its kind (``rddtensor.spark.columns.feature_kind``), from the
    ``featuresCol`` / ``featuresCols`` Params of ``stage``; checked against ``schema``.

    - ``featuresCols`` set: one column per input (a ``featuresCol`` set explicitly as well
      must be that same single column);
    - else one input: ``featuresCol``;
    - else (several inputs): the columns named like the inputs, as ``model.fit(df)`` reads
      them (``rddtensor.spark.engine.input_columns``).

    Every error names the Param to set.
    """
    names = [spec.name for spec in network.input_specs]
    n = len(names)
    cols = stage.getFeaturesCols()
    fcol = stage.getFeaturesCol()
    if cols is not None:
        if stage.isSet(stage.featuresCol) and list(cols) != [fcol]:
            raise ValueError(
                f"featuresCol={fcol!r} and featuresCols={cols!r} are both set and disagree: "
                "set only featuresCols (one column per network input, in input order), e.g. "
                "stage.clear(stage.featuresCol)")
        if len(cols) != n:
            raise ValueError(
                f"featuresCols={cols!r} names {len(cols)} column(s) but the network has {n} "
                f"input(s) {names}: set featuresCols to one column per input, in the network's "
                "input order")
        cols = list(cols)
        params = [f"featuresCols[{i}]" for i in range(n)]
    elif n == 1:
        cols, params = [fcol], ["featuresCol"]
    else:
        if stage.isSet(stage.featuresCol) and fcol != "features":
            raise ValueError(
                f"featuresCol={fcol!r} names one column but the network has {n} inputs "
                f"{names}: set featuresCols=[one column per input, in the network's input "
                "order] instead")
        missing = [c for c in names if c not in schema.names]
        if missing:
            raise ValueError(
                f"the network has {n} inputs {names}: with featuresCols unset they are read "
                f"from the DataFrame's columns of the same names, and it has no column "
                f"{missing[0]!r} (its columns: {schema.names}); set featuresCols=[one column "
                "per input, in the network's input order]")
        cols, params = list(names), [f"featuresCols[{i}]" for i in range(n)]
    kinds = [feature_kind(schema, c, p, scalar=n > 1) for c, p in zip(cols, params)]
    for c, p, kind, spec in zip(cols, params, kinds, network.input_specs):
        if kind == "scalar" and spec.shape is not None and tuple(spec.shape) != (1,):
            raise ValueError(f"{p}={c!r}: a numeric column gives rows of shape (1,) but the "
                             f"network's input {spec.name!r} expects {tuple(spec.shape)}; is "
                             "featuresCols in the network's input order "
                             f"{[s.name for s in network.input_specs]}?")
    return cols, kinds


class HasInferenceBatchSize(Params):
    inferenceBatchSize = Param(
        Params._dummy(), "inferenceBatchSize",
        "rows per forward pass in transform (each Arrow batch is cut into chunks of this size)",
        typeConverter=_positive_int("inferenceBatchSize"))

    def __init__(self):
        super().__init__()
        self._setDefault(inferenceBatchSize=4096)

    def getInferenceBatchSize(self) -> int:
        return self.getOrDefault(self.inferenceBatchSize)


class NNModelParams(HasFeaturesCol, HasFeaturesCols, HasPredictionCol, HasInferenceBatchSize):
    """Params of a fitted ``NNModel``."""


class NNClassificationModelParams(NNModelParams, HasProbabilityCol, HasRawPredictionCol):
    """Params of a fitted ``NNClassificationModel``."""


class NNEstimatorParams(NNModelParams, HasLabelCol, HasSeed, HasWeightCol):
    """Params of ``NNEstimator`` (and of its subclasses)."""

    network = Param(Params._dummy(), "network",
                    "the network to train: a rddtensor.layers.Sequential or a graph L.Model "
                    "with one output (one input, or several: see featuresCols), its "
                    "get_config() dict or that dict as JSON (kept as JSON; weights start from "
                    "seed)",
                    typeConverter=network_json)
    batchSize = Param(Params._dummy(), "batchSize", "global mini-batch size for training",
                      typeConverter=_positive_int("batchSize"))
    maxEpoch = Param(Params._dummy(), "maxEpoch", "passes over the training data",
                     typeConverter=_positive_int("maxEpoch"))
    learningRate = Param(Params._dummy(), "learningRate", "the optimizer's learning rate",
                         typeConverter=_positive_float("learningRate"))
    optimizer = Param(Params._dummy(), "optimizer",
                      "optimizer: a name (sgd, adam, adamw, rmsprop, adagrad, lars, lamb), an "
                      "optim optimizer or its config dict; its lr is learningRate",
                      typeConverter=_optimizer)
    loss = Param(Params._dummy(), "loss",
                 "loss: a name (e.g. sparse_categorical_crossentropy, mse), an optim loss or "
                 "its config dict", typeConverter=_loss)
    metrics = Param(Params._dummy(), "metrics", "metric names reported during training",
                    typeConverter=TypeConverters.toListString)
    validationSplit = Param(Params._dummy(), "validationSplit",
                            "share of rows held out (randomSplit with seed) to validate after "
                            "every epoch; 0 validates nothing", typeConverter=_split)
    checkpointDir = Param(Params._dummy(), "checkpointDir",
                          "directory for training checkpoints (passed to the engine's fit as "
                          "checkpoint_dir when it supports it)",
                          typeConverter=TypeConverters.toString)
    numPartitions = Param(Params._dummy(), "numPartitions",
                          "repartition the training data to this many shards (default: as given)",
                          typeConverter=_positive_int("numPartitions"))
    allreduce = Param(Params._dummy(), "allreduce",
                      "all-reduce strategy: auto, sharded, replicated or hierarchical", typeConverter=_allreduce)
    iterationsPerJob = Param(Params._dummy(), "iterationsPerJob",
                             "training iterations run as one Spark job",
                             typeConverter=_positive_int("iterationsPerJob"))
    verbose = Param(Params._dummy(), "verbose",
                    "0 silent, 1 progress bar, 2 one line per epoch", typeConverter=_verbose)

    def __init__(self):
        super().__init__()
        self._setDefault(batchSize=32, maxEpoch=10, learningRate=1e-3, optimizer="adam",
                         loss="mse", metrics=[], seed=0, validationSplit=0.0, allreduce="auto",
                         iterationsPerJob=8, verbose=0)

    def getNetwork(self) -> str:
        return self.getOrDefault(self.network)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getMaxEpoch(self) -> int:
        return self.getOrDefault(self.maxEpoch)

    def getLearningRate(self) -> float:
        return self.getOrDefault(self.learningRate)

    def getOptimizer(self) -> str:
        return self.getOrDefault(self.optimizer)

    def getLoss(self) -> str:
        return self.getOrDefault(self.loss)

    def getMetrics(self) -> list:
        return self.getOrDefault(self.metrics)

    def getValidationSplit(self) -> float:
        return self.getOrDefault(self.validationSplit)

    def getCheckpointDir(self):
        return self.getOrDefault(self.checkpointDir) if self.isDefined(self.checkpointDir) \
            else None

    def getNumPartitions(self):
        return self.getOrDefault(self.numPartitions) if self.isDefined(self.numPartitions) \
            else None

    def getAllreduce(self) -> str:
        return self.getOrDefault(self.allreduce)

    def getIterationsPerJob(self) -> int:
        return self.getOrDefault(self.iterationsPerJob)

    def getVerbose(self) -> int:
        return self.getOrDefault(self.verbose)


class NNClassifierParams(NNEstimatorParams, HasProbabilityCol, HasRawPredictionCol):
    """Params of ``NNClassifier``."""

    def __init__(self):
        super().__init__()
        self._setDefault(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
