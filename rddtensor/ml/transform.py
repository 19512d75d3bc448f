"""``NNModel.transform``: batched prediction on Arrow record batches.

The trained network crosses to the executors as one ``rddtensor.spark.wire`` record
(``rddtensor.ml.shipping``: a broadcast on a classic session; on Spark Connect, which has no
broadcasts, inside the UDF when small, else as a session artifact). Each Python worker decodes
it once into ``_MODELS`` (keyed by the model's fingerprint) and keeps it for every later task,
micro-batch and query. Each Arrow batch of the features column is decoded column-wise
(``rddtensor.spark.columns``, no Python per row) and run through the network in chunks of
``inferenceBatchSize`` rows.

A network with several inputs (a graph ``L.Model``) reads one column per input
(``featuresCols``, in its input order): each is decoded as above and the network runs on the
list of arrays, as ``model.predict([X1, X2])`` does; the outputs are the same columns.

Two plans, both narrow and both valid on a streaming DataFrame:

- a scalar Arrow UDF (``arrow_udf``, PySpark >= 4.1; the default where available): only the
  features column(s) go to Python (vectors up to ``DENSE_VECTOR_MAX`` wide as float32 arrays)
  and only the outputs come back, as one struct column that a projection splits; the other
  columns stay in the JVM;
- ``mapInArrow`` (older PySpark): whole rows go to Python and back, the outputs appended.

The UDF plan moves less, so it is the default: with ``mapInArrow`` the input vectors cross
the Python boundary twice (``benchmarks/inference.py`` times both: ``rddtensor`` and
``rddtensor-mapInArrow``).

Output columns (MLlib's types, so its evaluators read them):

- classifier: ``rawPrediction`` and ``probability`` (``VectorUDT``, one entry per class) and
  ``prediction`` (double, the class index). A network with one output and a sigmoid loss is a
  binary classifier: ``probability = [1-p, p]``, ``rawPrediction = [-z, z]`` (as MLlib's
  logistic regression), ``prediction = p > 0.5``. With several outputs ``rawPrediction`` holds
  the logits centred per row (so with two classes element 1 ranks like the probability, as
  MLlib's ``BinaryClassificationEvaluator`` reads it). A model ending in sigmoid/softmax with a
  cross-entropy has the logits before that activation here, and its probabilities.
- regressor / generic: ``prediction`` (double for one output, ``VectorUDT`` for several).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from rddtensor.ml import network as net
from rddtensor.spark.columns import batch_from_arrow

_MODELS: dict = {}  # worker-local: fingerprint -> decoded Sequential
_MAX_MODELS = 4


def _worker_model(token: str, payload):
    """The decoded network named ``token``: ``payload`` (anything with the encoded network as
    ``.value``: ``rddtensor.ml.shipping``) is read only the first time this worker sees
    ``token``."""
    model = _MODELS.get(token)
    if model is None:
        if len(_MODELS) >= _MAX_MODELS:
            _MODELS.clear()
        model = _MODELS[token] = net.decode(payload.value)
    return model


def _vector_array(M):
    """A ``(n, k)`` float array as Arrow ``VectorUDT`` structs (dense vectors)."""
    n, k = M.shape
    values = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                      pa.array(np.ascontiguousarray(M, np.float64).ravel()))
    return pa.StructArray.from_arrays(
        [pa.array(np.ones(n, np.int8)), pa.nulls(n, pa.int32()),
         pa.nulls(n, pa.list_(pa.int32())), values],
        names=["type", "size", "indices", "values"])


def outputs(Y, loss, classifier: bool) -> dict:
    """What the loss reads, ``Y`` (logits, or probabilities for a loss that reads them) ->
    ``{"prediction", ["rawPrediction", "probability"]}`` arrays."""
    Y = np.asarray(Y, np.float64)
    Y = Y.reshape(Y.shape[0], int(np.prod(Y.shape[1:])))
    if not classifier:
        return {"prediction": Y[:, 0] if Y.shape[1] == 1 else Y}
    logits = loss is None or not loss.probabilities_in
    if Y.shape[1] == 1:  # one output: binary, the probability of class 1
        p = np.asarray(loss.link(Y), np.float64)[:, 0] if loss is not None else \
            1 / (1 + np.exp(-Y[:, 0]))
        raw = Y[:, 0] if logits else p - 0.5  # a logit, or a score with the same sign
        return {"rawPrediction": np.stack([-raw, raw], axis=1),
                "probability": np.stack([1 - p, p], axis=1),
                "prediction": (p > 0.5).astype(np.float64)}
    P = np.asarray(loss.link(Y), np.float64) if loss is not None else _softmax(Y)
    # logits centred per row (softmax does not change): with two classes rawPrediction[1] is
    # (z1 - z0) / 2 and ranks rows as the probability does, which MLlib's
    # BinaryClassificationEvaluator (it reads element 1) needs
    raw = Y - Y.mean(axis=1, keepdims=True) if logits else Y
    return {"rawPrediction": raw, "probability": P,
            "prediction": np.argmax(Y, axis=1).astype(np.float64)}


def _softmax(Y):
    E = np.exp(Y - Y.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def predict_batch(model, X, batch_size: int, logits: bool = False):
    """Forward ``X`` (numpy or ``SparseRows``; a tuple of them, one per input, for a model with
    several inputs) in chunks of ``batch_size`` rows (eval mode); ``logits``: stop before the
    output activation the compiled loss is fused with."""
    several = isinstance(X, tuple)
    n = X[0].shape[0] if several else X.shape[0]
    if n == 0:
        return np.zeros((0, *model.output_shape), np.float32)
    outs = [model.forward(model.params, tuple(A[a:a + batch_size] for A in X) if several
                          else X[a:a + batch_size], training=False, logits=logits)[0]
            for a in range(0, n, batch_size)]
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


def _labels(features_col) -> list:
    """The Param spelling of each features column, for error messages."""
    if isinstance(features_col, str):
        return [f"featuresCol={features_col!r}"]
    return [f"featuresCols[{i}]={c!r}" for i, c in enumerate(features_col)]


def predict_arrow(model, features, *, kind, features_col, keys, classifier: bool,
                  batch_size: int) -> list:
    """One Arrow features column (``kind`` and ``features_col`` strings) -> the Arrow arrays
    of the outputs named in ``keys``; for a model with several inputs, ``features``, ``kind``
    and ``features_col`` are lists (one per input, in input order)."""
    several = not isinstance(features_col, str)
    arrays = [batch_from_arrow(a, k, c) for a, k, c in
              zip(features if several else [features], kind if several else [kind],
                  features_col if several else [features_col])]
    for i, (X, label) in enumerate(zip(arrays, _labels(features_col))):
        expected = tuple(model.input_specs[i].shape) if several else tuple(model.input_shape)
        if X.shape[0] and tuple(X.shape[1:]) != expected:
            raise ValueError(f"{label}: rows have shape {tuple(X.shape[1:])} but the network "
                             f"expects {expected}" + (f" (input {model.input_specs[i].name!r})"
                                                      if several else ""))
    if several and len({X.shape[0] for X in arrays}) > 1:  # (columns of one batch: cannot be)
        raise ValueError(f"featuresCols={list(features_col)}: the columns of one batch have "
                         f"different lengths {[X.shape[0] for X in arrays]}")
    X = tuple(arrays) if several else arrays[0]
    # a classifier reads what its loss reads (logits when fused with a sigmoid/softmax output)
    fused = classifier and model.loss is not None and model.loss.fused is not None
    outs = outputs(predict_batch(model, X, batch_size, logits=fused), model.loss, classifier)
    return [pa.array(outs[k]) if outs[k].ndim == 1 else _vector_array(outs[k]) for k in keys]


def arrow_udf_predictor(payload, token: str, *, features_col, kind, columns: dict,
                        classifier: bool, batch_size: int, return_type):
    """A scalar Arrow UDF: features column(s) in, one struct of the output ``columns`` out.

    Only the features column(s) cross to Python and only the outputs come back; Spark keeps
    the other columns of each row in the JVM and joins them to the results. Captures
    ``payload`` (``rddtensor.ml.shipping``) and a few strings: kilobytes per task, except a
    small network inlined on Spark Connect. With lists ``features_col`` / ``kind`` (a model
    with several inputs) the UDF takes one column per input, in that order.
    """
    from pyspark.sql.functions import arrow_udf
    keys, names = list(columns), list(columns.values())
    several = not isinstance(features_col, str)

    def predict(features: pa.Array) -> pa.Array:
        model = _worker_model(token, payload)
        arrays = predict_arrow(model, features, kind=kind, features_col=features_col, keys=keys,
                               classifier=classifier, batch_size=batch_size)
        return pa.StructArray.from_arrays(arrays, names=names)

    def predict_inputs(*features: pa.Array) -> pa.Array:  # one column per input
        model = _worker_model(token, payload)
        arrays = predict_arrow(model, list(features), kind=kind, features_col=features_col,
                               keys=keys, classifier=classifier, batch_size=batch_size)
        return pa.StructArray.from_arrays(arrays, names=names)
    # scalar: from the type hints
    return arrow_udf(predict_inputs if several else predict, return_type)


def arrow_map_predictor(payload, token: str, *, features_col, kind, columns: dict,
                        classifier: bool, batch_size: int):
    """The ``mapInArrow`` function (PySpark without ``arrow_udf``): appends the output
    ``columns`` to each batch; every input column goes to Python and back."""
    keys, names = list(columns), list(columns.values())
    several = not isinstance(features_col, str)

    def run(batches):
        model = _worker_model(token, payload)
        for batch in batches:
            features = [batch.column(c) for c in features_col] if several else \
                batch.column(features_col)
            arrays = predict_arrow(model, features, kind=kind, features_col=features_col,
                                   keys=keys, classifier=classifier, batch_size=batch_size)
            yield pa.RecordBatch.from_arrays(list(batch.columns) + arrays,
                                             names=batch.schema.names + names)
    return run


def has_arrow_udf() -> bool:
    try:
        from pyspark.sql import functions
    except ImportError:
        return False
    return hasattr(functions, "arrow_udf")  # PySpark >= 4.1


#: ``"udf"`` (a scalar Arrow UDF: only the features column travels), ``"map"`` (``mapInArrow``:
#: whole rows travel) or ``"auto"`` (``"udf"`` where PySpark has ``arrow_udf``).
MODE = "auto"

#: Vector columns at most this wide reach the Arrow UDF as ``vector_to_array(col, "float32")``:
#: a ``VectorUDT`` value has a fixed cost per row on its way into a Python UDF whatever its
#: size, a float array a much smaller cost per element (``benchmarks/inference.py``:
#: ``rddtensor-udt`` against ``rddtensor``).
#: Wider vectors travel as the UDT struct and sparse batches stay sparse (``SparseRows``).
DENSE_VECTOR_MAX = 2048


def udf_input(dataset, features_col: str, kind: str, n_features: int):
    """The column the Arrow UDF reads, and its kind (see ``DENSE_VECTOR_MAX``)."""
    if kind == "vector" and n_features <= DENSE_VECTOR_MAX:
        from pyspark.ml.functions import vector_to_array
        return vector_to_array(dataset[features_col], "float32"), "array"
    return dataset[features_col], kind


def transform(dataset, payload, token: str, *, features_col, kind, columns: dict,
              types: dict, classifier: bool, batch_size: int, input_shape=None):
    """``dataset`` with the output ``columns`` (``{output: name}``, Spark ``types``) appended.

    ``features_col``, ``kind`` and ``input_shape``: the features column, its kind and the
    network's per-row input shape; for a network with several inputs, lists of them (one per
    input, in input order)."""
    from pyspark.sql.types import StructField, StructType
    fields = [StructField(name, types[key]) for key, name in columns.items()]
    opts = dict(features_col=features_col, kind=kind, columns=columns, classifier=classifier,
                batch_size=batch_size)
    if MODE == "udf" or (MODE == "auto" and has_arrow_udf()):
        from pyspark.sql.functions import col
        # Spark 4 may feed an Arrow UDF straight from a columnar scan (Parquet); its
        # row-to-column converter then fails on any vector (UDT) column of the same rows
        # ("[UNSUPPORTED_DATATYPE] UDT"), so keep the row path for this session's Arrow UDFs
        dataset.sparkSession.conf.set(
            "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled", "false")
        if isinstance(features_col, str):
            n_features = int(np.prod(input_shape)) if input_shape else 0
            features, opts["kind"] = udf_input(dataset, features_col, kind, n_features)
            features = [features]
        else:
            shapes = input_shape or [None] * len(features_col)
            inputs = [udf_input(dataset, c, k, int(np.prod(s)) if s else 0)
                      for c, k, s in zip(features_col, kind, shapes)]
            features, opts["kind"] = [f for f, _ in inputs], [k for _, k in inputs]
        udf = arrow_udf_predictor(payload, token, return_type=StructType(fields), **opts)
        tmp = f"__rddtensor_{token}"
        out = dataset.withColumn(tmp, udf(*features))
        return out.select(*[dataset[c] for c in dataset.columns],
                          *[col(tmp)[name].alias(name) for name in columns.values()])
    schema = StructType(dataset.schema.fields + fields)
    return dataset.mapInArrow(arrow_map_predictor(payload, token, **opts), schema)
