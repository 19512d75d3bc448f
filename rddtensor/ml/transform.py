"""``NNModel.transform``: batched prediction on Arrow record batches (``mapInArrow``).

The trained network crosses to the executors once, as a broadcast of one ``rddtensor.wire``
record; each Python worker decodes it once into ``_MODELS`` (keyed by the model's fingerprint)
and keeps it for every later task, micro-batch and query. Each Arrow batch is decoded column-wise
(``rddtensor.ml.columns``, no Python per row), run through the network in chunks of
``inferenceBatchSize`` rows, and returned with the input columns passed through untouched and
the output columns appended. ``mapInArrow`` is a plain narrow operator, so the same plan runs
on a streaming DataFrame.

Output columns (MLlib's types, so its evaluators read them):

- classifier: ``rawPrediction`` and ``probability`` (``VectorUDT``, one entry per class) and
  ``prediction`` (double, the class index). A network with one output and a sigmoid loss is a
  binary classifier: ``probability = [1-p, p]``, ``rawPrediction = [-z, z]`` (as MLlib's
  logistic regression), ``prediction = p > 0.5``.
- regressor / generic: ``prediction`` (double for one output, ``VectorUDT`` for several).
"""
from __future__ import annotations

import numpy as np

from rddtensor.ml import network as net
from rddtensor.ml.columns import batch_from_arrow

_MODELS: dict = {}  # worker-local: fingerprint -> decoded Sequential
_MAX_MODELS = 4


def _worker_model(token: str, payload):
    model = _MODELS.get(token)
    if model is None:
        if len(_MODELS) >= _MAX_MODELS:
            _MODELS.clear()
        model = _MODELS[token] = net.decode(payload.value)
    return model


def _vector_array(M):
    """A ``(n, k)`` float array as Arrow ``VectorUDT`` structs (dense vectors)."""
    import pyarrow as pa
    n, k = M.shape
    values = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                      pa.array(np.ascontiguousarray(M, np.float64).ravel()))
    return pa.StructArray.from_arrays(
        [pa.array(np.ones(n, np.int8)), pa.nulls(n, pa.int32()),
         pa.nulls(n, pa.list_(pa.int32())), values],
        names=["type", "size", "indices", "values"])


def outputs(Y, loss, classifier: bool) -> dict:
    """Network outputs ``Y`` -> ``{"prediction", ["rawPrediction", "probability"]}`` arrays."""
    Y = np.asarray(Y, np.float64)
    Y = Y.reshape(Y.shape[0], int(np.prod(Y.shape[1:])))
    if not classifier:
        return {"prediction": Y[:, 0] if Y.shape[1] == 1 else Y}
    if Y.shape[1] == 1:  # one logit: binary with a sigmoid link
        p = np.asarray(loss.link(Y), np.float64)[:, 0] if loss is not None else \
            1 / (1 + np.exp(-Y[:, 0]))
        return {"rawPrediction": np.stack([-Y[:, 0], Y[:, 0]], axis=1),
                "probability": np.stack([1 - p, p], axis=1),
                "prediction": (p > 0.5).astype(np.float64)}
    P = np.asarray(loss.link(Y), np.float64) if loss is not None else _softmax(Y)
    return {"rawPrediction": Y, "probability": P,
            "prediction": np.argmax(Y, axis=1).astype(np.float64)}


def _softmax(Y):
    E = np.exp(Y - Y.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def predict_batch(model, X, batch_size: int):
    """Forward ``X`` (numpy or ``SparseRows``) in chunks of ``batch_size`` rows (eval mode)."""
    n = X.shape[0]
    if n == 0:
        return np.zeros((0, *model.output_shape), np.float32)
    outs = [model.forward(model.params, X[a:a + batch_size], training=False)[0]
            for a in range(0, n, batch_size)]
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


def arrow_predictor(payload, token: str, *, features_col: str, kind: str, columns: dict,
                    classifier: bool, batch_size: int):
    """The ``mapInArrow`` function: appends ``columns`` (``{output: column name}``) to each batch.

    Captures only the broadcast and a few strings (kilobytes per task), never the model.
    """
    def run(batches):
        import pyarrow as pa
        model = _worker_model(token, payload)
        for batch in batches:
            X = batch_from_arrow(batch.column(features_col), kind, features_col)
            if X.shape[1:] != tuple(model.input_shape) and X.shape[0]:
                raise ValueError(f"featuresCol={features_col!r}: rows have shape "
                                 f"{tuple(X.shape[1:])} but the network expects "
                                 f"{tuple(model.input_shape)}")
            outs = outputs(predict_batch(model, X, batch_size), model.loss, classifier)
            arrays = list(batch.columns)
            for key, name in columns.items():
                o = outs[key]
                arrays.append(pa.array(o) if o.ndim == 1 else _vector_array(o))
            yield pa.RecordBatch.from_arrays(arrays, names=batch.schema.names + list(columns.values()))
    return run
