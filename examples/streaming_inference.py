"""Neural-network inference on a Structured Streaming DataFrame.

A pipeline (``VectorAssembler`` -> ``StandardScaler`` -> ``NNClassifier``) is trained on a batch
DataFrame and saved; the reloaded ``PipelineModel`` then scores a stream of parquet files that
arrive in a directory. ``NNModel.transform`` is a ``mapInArrow`` over Arrow batches with the
weights broadcast once, so the very same ``transform`` call works on the stream; the query here
runs with the ``availableNow`` trigger into a memory sink, and its predictions equal the batch
transform's.

Run:  python examples/streaming_inference.py    (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import StandardScaler, VectorAssembler
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.ml import NNClassifier
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
PIXELS = [f"p{i}" for i in range(64)]


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    d = load_digits()
    pdf = pd.DataFrame(d.data, columns=PIXELS)
    pdf["label"] = d.target.astype(float)
    pdf["id"] = np.arange(len(pdf))
    df = spark.createDataFrame(pdf)
    train, arriving = df.filter(df.id % 3 != 0), df.filter(df.id % 3 == 0)

    net = L.Sequential([L.Dense(32, activation="relu", input_shape=(64,)), L.Dense(10)])
    pipeline = Pipeline(stages=[
        VectorAssembler(inputCols=PIXELS, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        NNClassifier(network=net, maxEpoch=3 if QUICK else 6, batchSize=128, learningRate=1e-2)])

    with tempfile.TemporaryDirectory() as tmp:
        pipeline.fit(train.repartition(2)).write().save(os.path.join(tmp, "model"))
        model = PipelineModel.load(os.path.join(tmp, "model"))

        incoming = os.path.join(tmp, "incoming")  # new files land here, 4 of them
        arriving.repartition(4).write.parquet(incoming)
        stream = (spark.readStream.schema(arriving.schema).option("maxFilesPerTrigger", 1)
                  .parquet(incoming))
        query = (model.transform(stream).select("id", "label", "prediction", "probability")
                 .writeStream.format("memory").queryName("digit_predictions")
                 .trigger(availableNow=True)
                 .option("checkpointLocation", os.path.join(tmp, "checkpoint")).start())
        query.awaitTermination()
        streamed = spark.table("digit_predictions").orderBy("id").collect()
        batch = model.transform(spark.read.parquet(incoming)).select(
            "id", "label", "prediction", "probability").orderBy("id").collect()

    acc = np.mean([r.prediction == r.label for r in streamed])
    same = [r.id for r in streamed] == [r.id for r in batch] and \
        [r.prediction for r in streamed] == [r.prediction for r in batch]
    # probabilities agree up to float32 rounding (micro-batches give other GEMM shapes)
    gap = max(float(np.abs(a.probability.toArray() - b.probability.toArray()).max())
              for a, b in zip(streamed, batch))
    print(f"streamed {len(streamed)} rows in {len(query.recentProgress)} micro-batches; "
          f"accuracy {acc:.3f}; same predictions as the batch transform: {same} "
          f"(largest probability difference {gap:.1e})")
    assert len(streamed) == len(batch) and same and gap < 1e-5
    assert acc > (0.85 if QUICK else 0.9), acc


if __name__ == "__main__":
    main()
