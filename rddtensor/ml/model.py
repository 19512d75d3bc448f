"""Fitted Spark ML stages: ``NNModel`` (regression / any network) and ``NNClassificationModel``."""
from __future__ import annotations

from pyspark import keyword_only
from pyspark.ml import Model
from pyspark.ml.util import MLReadable, MLWritable
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import DoubleType

from rddtensor.training.protocol import Model as Network
from rddtensor.ml import network as net
from rddtensor.ml.params import NNClassificationModelParams, NNModelParams, feature_columns
from rddtensor.ml.persistence import NNModelReader, NNModelWriter
from rddtensor.ml import shipping
from rddtensor.ml.transform import transform as arrow_transform


class NNModel(Model, NNModelParams, MLWritable, MLReadable):
    """A trained network as a Spark ML ``Model``: ``transform`` appends its predictions.

    ``prediction`` is a double for a network with one output and a vector for several. The
    prediction runs on Arrow batches (a scalar Arrow UDF, or ``mapInArrow`` on PySpark < 4.1)
    with the weights shipped once per executor (a broadcast; on Spark Connect, inside the
    plan), so it also runs on a streaming DataFrame and on a Spark Connect session.

    Args:
        network: a built ``rddtensor.layers.Sequential`` or graph ``L.Model`` with one output
            (weights included), e.g. trained with ``model.fit``; ``NNEstimator.fit`` makes
            this for you.
        featuresCol, predictionCol: column names.
        featuresCols: for a network with several inputs, one column per input in the
            network's input order (default: unset; then a one-input network reads
            ``featuresCol`` and a network with several inputs the columns named like its
            inputs). Each input's column is decoded as ``featuresCol`` is; numeric columns
            (ids for an ``Embedding``) are rows of shape ``(1,)``.
        inferenceBatchSize: rows per forward pass.

    Example:
        >>> from rddtensor import layers as L
        >>> m = L.Sequential([L.Dense(1, input_shape=(3,))], seed=0)
        >>> model = NNModel(network=m.build())
        >>> model.transform(df).select("prediction")   # doctest: +SKIP

        A graph model with two inputs, one column each:

        >>> ids, dense = L.Input((1,), name="ids"), L.Input((3,), name="dense")
        >>> h = L.Concatenate()([L.Flatten()(L.Embedding(10, 4)(ids)), dense])
        >>> two = L.Model([ids, dense], L.Dense(1)(h), seed=0).build()
        >>> model = NNModel(network=two, featuresCols=["user_id", "features"])
        >>> model.transform(df).select("prediction")   # doctest: +SKIP
    """

    _classifier = False

    @keyword_only
    def __init__(self, *, network=None, featuresCol="features", predictionCol="prediction",
                 inferenceBatchSize=4096, featuresCols=None):
        super().__init__()
        self._setup(self._input_kwargs)

    def _setup(self, kwargs):
        self._network, self._shipped, self.history = None, None, {}
        kwargs = dict(kwargs)
        network = kwargs.pop("network", None)
        if network is not None:
            self._set_network(network)
        self._set(**kwargs)

    def _set_network(self, model):
        if not isinstance(model, Network):
            raise TypeError(f"network must be a rddtensor model (e.g. rddtensor.layers.Sequential), "
                            f"got {type(model).__name__}")
        if len(model.output_specs) != 1:
            raise ValueError(f"network: a Spark ML model takes a network with one output (its "
                             f"prediction columns); this one has outputs "
                             f"{[s.name for s in model.output_specs]}")
        if not model.built:
            raise ValueError("network is not built: train it, or call network.build(input_shape) "
                             "so that it has weights")
        self._network, self._shipped = model, None

    @property
    def network(self):
        """The trained ``rddtensor.layers.Sequential``."""
        if self._network is None:
            raise ValueError(f"{type(self).__name__} has no network: pass network=... or fit an "
                             "estimator")
        return self._network

    def setFeaturesCol(self, value: str):
        return self._set(featuresCol=value)

    def setFeaturesCols(self, value: list):
        """One column per input of the network, in its input order (see ``featuresCols``)."""
        return self._set(featuresCols=value)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)

    def setInferenceBatchSize(self, value: int):
        return self._set(inferenceBatchSize=value)

    def copy(self, extra=None):
        """A copy with its own network (weights copied) and ``extra`` Params applied."""
        that = super().copy(extra)
        if self._network is not None:
            that._network, that._shipped = net.clone(self._network), None
        that.history = dict(self.history)
        return that

    # --- transform ----------------------------------------------------------------------------
    def _output_columns(self) -> dict:
        cols = {"prediction": self.getPredictionCol()}
        return {k: v for k, v in cols.items() if v}

    def _output_types(self) -> dict:
        n_out = 1
        for s in self.network.output_shape:
            n_out *= int(s)
        return {"prediction": DoubleType() if n_out == 1 else VectorUDT()}

    def _ship(self, spark):
        """The network as the executors get it (``rddtensor.ml.shipping``: a broadcast, or on
        Spark Connect inside the plan or as a session artifact), made once per weights version
        and SparkContext or Connect session."""
        token = net.fingerprint(self.network)
        owner = shipping.owner(spark)
        if self._shipped is None or self._shipped[0] != token or self._shipped[1] is not owner:
            self._shipped = (token, owner, shipping.ship(spark, net.encode(self.network), token))
        return token, self._shipped[2]

    def _transform(self, dataset):
        fcols, kinds = feature_columns(self, self.network, dataset.schema)
        several = len(self.network.input_specs) > 1
        columns = self._output_columns()
        for key, name in columns.items():
            if name in dataset.columns:
                raise ValueError(f"{_PARAM[key]}={name!r}: the DataFrame already has a column "
                                 f"{name!r}; set {_PARAM[key]} to a new name")
        if len(set(columns.values())) != len(columns):
            raise ValueError("output columns must have different names, got " + ", ".join(
                f"{_PARAM[k]}={v!r}" for k, v in columns.items()))
        token, payload = self._ship(dataset.sparkSession)
        return arrow_transform(dataset, payload, token,
                               features_col=fcols if several else fcols[0],
                               kind=kinds if several else kinds[0],
                               columns=columns, types=self._output_types(),
                               classifier=self._classifier,
                               batch_size=self.getInferenceBatchSize(),
                               input_shape=net.input_shapes(self.network))

    # --- persistence --------------------------------------------------------------------------
    def write(self):
        """An ``MLWriter`` that saves metadata (JSON) and the network (JSON + ``.npz``)."""
        return NNModelWriter(self)

    @classmethod
    def read(cls):
        return NNModelReader(cls)

    def __repr__(self):
        arch = repr(self._network) if self._network is not None else "no network"
        return f"{type(self).__name__}(uid={self.uid}, {arch})"


_PARAM = {"prediction": "predictionCol", "probability": "probabilityCol",
          "rawPrediction": "rawPredictionCol"}


class NNClassificationModel(NNModel, NNClassificationModelParams):
    """A trained classifier: ``rawPrediction`` and ``probability`` vectors and ``prediction``.

    ``rawPrediction`` holds the network's logits, ``probability`` the loss's link of them
    (softmax; a single sigmoid output becomes ``[1 - p, p]``), ``prediction`` the class index as
    a double: the columns ``MulticlassClassificationEvaluator`` and
    ``BinaryClassificationEvaluator`` read. An empty column name skips that column.
    """

    _classifier = True

    @keyword_only
    def __init__(self, *, network=None, featuresCol="features", predictionCol="prediction",
                 probabilityCol="probability", rawPredictionCol="rawPrediction",
                 inferenceBatchSize=4096, featuresCols=None):
        super(NNModel, self).__init__()  # (NNModel.__init__ takes only its own keywords)
        self._setup(self._input_kwargs)

    @property
    def numClasses(self) -> int:
        """Number of classes: the network's outputs (2 for a single sigmoid output)."""
        n_out = 1
        for s in self.network.output_shape:
            n_out *= int(s)
        return max(n_out, 2)

    def setProbabilityCol(self, value: str):
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value: str):
        return self._set(rawPredictionCol=value)

    def _output_columns(self) -> dict:
        cols = {"rawPrediction": self.getRawPredictionCol(),
                "probability": self.getProbabilityCol(),
                "prediction": self.getPredictionCol()}
        return {k: v for k, v in cols.items() if v}

    def _output_types(self) -> dict:
        return {"rawPrediction": VectorUDT(), "probability": VectorUDT(),
                "prediction": DoubleType()}
