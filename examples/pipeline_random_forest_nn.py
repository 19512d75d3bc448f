"""MLlib and rddtensor in one Spark ML Pipeline: a random forest's class probabilities feed a
neural network.

The pipeline is ordinary Spark ML: ``VectorAssembler`` (pixel columns -> vector), MLlib's
``RandomForestClassifier`` (its outputs renamed so they do not collide with the network's),
a second ``VectorAssembler`` that stacks the pixels with the forest's class probabilities, and
``rddtensor.ml.NNClassifier``, which trains its network with the distributed engine. The fitted
``PipelineModel`` predicts with both, saves and loads like any other pipeline.

Run:  python examples/pipeline_random_forest_nn.py    (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.ml import NNClassifier
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
PIXELS = [f"p{i}" for i in range(64)]


def digits(spark):
    d = load_digits()
    pdf = pd.DataFrame(d.data, columns=PIXELS)
    pdf["label"] = d.target.astype(float)
    pdf["id"] = np.arange(len(pdf))
    df = spark.createDataFrame(pdf).repartition(2)
    return df.filter(df.id % 5 != 0), df.filter(df.id % 5 == 0)


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    train, test = digits(spark)

    net = L.Sequential([L.Dense(64, activation="relu", input_shape=(74,)), L.Dropout(0.1),
                        L.Dense(10)])
    pipeline = Pipeline(stages=[
        VectorAssembler(inputCols=PIXELS, outputCol="pixels"),
        RandomForestClassifier(featuresCol="pixels", numTrees=20, maxDepth=8, seed=0,
                               predictionCol="rf_prediction", probabilityCol="rf_probability",
                               rawPredictionCol="rf_raw"),
        VectorAssembler(inputCols=["pixels", "rf_probability"], outputCol="stacked"),
        StandardScaler(inputCol="stacked", outputCol="features"),
        NNClassifier(network=net, maxEpoch=3 if QUICK else 6, batchSize=128,
                     learningRate=5e-3, seed=0),
    ])
    model = pipeline.fit(train)
    out = model.transform(test).cache()
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    acc_nn = evaluator.evaluate(out)
    acc_rf = evaluator.setPredictionCol("rf_prediction").evaluate(out)
    print(f"test accuracy: random forest {acc_rf:.3f}, random forest -> NN {acc_nn:.3f}")

    with tempfile.TemporaryDirectory() as tmp:  # the mixed pipeline round-trips through disk
        model.write().save(os.path.join(tmp, "model"))
        again = PipelineModel.load(os.path.join(tmp, "model")).transform(test)
        same = again.select("id", "prediction").orderBy("id").collect() == \
            out.select("id", "prediction").orderBy("id").collect()
    print(f"reloaded PipelineModel predicts identically: {same}")
    assert same
    assert acc_nn > (0.85 if QUICK else 0.9), acc_nn


if __name__ == "__main__":
    main()
