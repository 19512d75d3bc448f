"""Grid search for a neural network with Spark ML's ``CrossValidator``.

``NNClassifier``'s Params (``learningRate``, ``batchSize``, ...) go into a ``ParamGridBuilder``
like any MLlib estimator's; ``CrossValidator`` fits a copy of the pipeline for every grid point
and fold (each a distributed training run), averages the evaluator's metric and refits the best
on all the training data.

Run:  python examples/cross_validator.py    (RDDTENSOR_QUICK=1: 600 digits instead of 1797)
"""
import os

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.ml import NNClassifier
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
PIXELS = [f"p{i}" for i in range(64)]


def digits(spark, n):
    d = load_digits()
    pdf = pd.DataFrame(d.data[:n], columns=PIXELS)
    pdf["label"] = d.target[:n].astype(float)
    pdf["id"] = np.arange(len(pdf))
    df = spark.createDataFrame(pdf).repartition(2)
    return df.filter(df.id % 5 != 0), df.filter(df.id % 5 == 0)


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    train, test = digits(spark, 600 if QUICK else None)

    net = L.Sequential([L.Dense(32, activation="relu", input_shape=(64,)), L.Dense(10)])
    clf = NNClassifier(network=net, maxEpoch=2, seed=0)
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=PIXELS, outputCol="raw"),
                                StandardScaler(inputCol="raw", outputCol="features"), clf])
    grid = (ParamGridBuilder()
            .addGrid(clf.learningRate, [1e-4, 3e-2])
            .addGrid(clf.batchSize, [32, 128] if QUICK else [64, 256])
            .build())
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    cv = CrossValidator(estimator=pipeline, estimatorParamMaps=grid, evaluator=evaluator,
                        numFolds=2, seed=0)
    model = cv.fit(train)

    for params, metric in sorted(zip(grid, model.avgMetrics), key=lambda p: -p[1]):
        print(f"learningRate={params[clf.learningRate]:<7g} batchSize={params[clf.batchSize]:<4d}"
              f" mean CV accuracy {metric:.3f}")
    best = grid[int(np.argmax(model.avgMetrics))]
    acc = evaluator.evaluate(model.transform(test))
    print(f"best: learningRate={best[clf.learningRate]:g}, batchSize={best[clf.batchSize]}; "
          f"test accuracy {acc:.3f}")
    assert best[clf.learningRate] > 1e-4  # 1e-4 barely moves the weights in a few epochs
    assert acc > (0.7 if QUICK else 0.85), acc


if __name__ == "__main__":
    main()
