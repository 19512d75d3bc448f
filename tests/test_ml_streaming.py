"""``NNModel.transform`` on a streaming DataFrame: the same plan, the same predictions.

A network trained in process (numpy ``fit``, no Spark job) is wrapped in an
``NNClassificationModel`` behind a ``VectorAssembler``; a file-source stream read with the
``availableNow`` trigger into a memory sink must give the batch transform's predictions, and its
probabilities up to float32 rounding (micro-batches group rows into other matrix shapes, and a
BLAS GEMM may round a row differently depending on where it sits in the block).
"""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.feature import VectorAssembler

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.ml import NNClassificationModel

pytestmark = pytest.mark.spark

PIXELS = [f"p{i}" for i in range(64)]


@pytest.fixture(scope="module")
def digits_dir(spark, tmp_path_factory):
    """Digits as parquet files (pixel columns, id), three files so the stream has 3 batches."""
    import pandas as pd
    from sklearn.datasets import load_digits
    d = load_digits()
    pdf = pd.DataFrame(d.data / 16, columns=PIXELS)
    pdf["id"] = np.arange(len(pdf))
    path = str(tmp_path_factory.mktemp("stream") / "digits")
    spark.createDataFrame(pdf).repartition(3).write.parquet(path)
    return path, d


@pytest.fixture(scope="module")
def pipeline_model(digits_dir):
    _, d = digits_dir
    net = L.Sequential([L.Dense(32, activation="relu", input_shape=(64,)), L.Dense(10)], seed=0)
    net.compile(optimizer=Adam(3e-3), loss="sparse_categorical_crossentropy")
    net.fit((d.data / 16).astype(np.float32), d.target, epochs=10, batch_size=64, verbose=0)
    return PipelineModel(stages=[VectorAssembler(inputCols=PIXELS, outputCol="features"),
                                 NNClassificationModel(network=net, inferenceBatchSize=100)])


def by_id(rows):
    """``(ids, predictions, probabilities, raw predictions)`` in id order."""
    rows = sorted(rows, key=lambda r: r.id)
    return (np.array([r.id for r in rows]), np.array([r.prediction for r in rows]),
            np.stack([r.probability.toArray() for r in rows]),
            np.stack([r.rawPrediction.toArray() for r in rows]))


@pytest.mark.parametrize("mode", ["udf", "map"])
def test_streaming_query_equals_batch_transform(spark, digits_dir, pipeline_model, tmp_path,
                                                mode, monkeypatch):
    from rddtensor.ml import transform as T
    monkeypatch.setattr(T, "MODE", mode)  # the Arrow UDF plan, and mapInArrow (PySpark < 4.1)
    path, d = digits_dir
    batch = spark.read.parquet(path)
    cols = ["id", "prediction", "probability", "rawPrediction"]
    expected = by_id(pipeline_model.transform(batch).select(*cols).collect())
    stream = spark.readStream.schema(batch.schema).option("maxFilesPerTrigger", 1).parquet(path)
    assert stream.isStreaming
    query = (pipeline_model.transform(stream).select(*cols).writeStream.format("memory")
             .queryName(f"nn_stream_{mode}").trigger(availableNow=True)
             .option("checkpointLocation", str(tmp_path / "ckpt")).start())
    try:
        query.awaitTermination(300)
        assert query.exception() is None
        got = by_id(spark.table(f"nn_stream_{mode}").collect())
    finally:
        query.stop()
    ids, prediction, probability, raw = got
    np.testing.assert_array_equal(ids, np.arange(len(d.target)))
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(prediction, expected[1])
    # micro-batches cut the rows into other GEMM shapes than the batch job: float32 rounding
    np.testing.assert_allclose(probability, expected[2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(raw, expected[3], rtol=1e-5, atol=1e-6)
    acc = np.mean(prediction == d.target)
    assert acc > 0.9, acc
