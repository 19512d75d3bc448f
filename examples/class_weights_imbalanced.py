"""Class weights on an imbalanced data set: catch the rare class.

A fraud-like problem: 5% positives whose features overlap with the negatives. A plain classifier
minimises the average loss and mostly answers "negative", so it misses many positives. With
``class_weight={0: 1, 1: 19}`` (the inverse class frequencies) each positive counts as much as
nineteen negatives in the loss -- the same model now finds most positives, trading some
precision for recall. Both models train with the distributed engine on the same DataFrame.

Run:  python examples/class_weights_imbalanced.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os

import numpy as np
from pyspark.ml.linalg import Vectors

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def make_data(spark, n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(float)
    X = rng.normal(size=(n, 4)) + np.outer(y, [1.5, 1.0, 0.0, 0.0])
    return spark.createDataFrame([(Vectors.dense(x), float(t)) for x, t in zip(X, y)],
                                 ["features", "label"]).repartition(2)


def train(df, class_weight):
    model = L.Sequential([L.Dense(16, activation="relu", input_shape=(4,)), L.Dense(1)], seed=0)
    model.compile(optimizer=Adam(1e-2), loss="binary_crossentropy",
                  metrics=["recall_binary", "precision_binary"])
    model.fit(df, epochs=5 if QUICK else 10, batch_size=500, class_weight=class_weight,
              verbose=0)
    return model


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    train_df, test_df = make_data(spark, 4000, seed=0), make_data(spark, 4000, seed=1)
    counts = dict(train_df.groupBy("label").count().collect())
    weights = {0: 1.0, 1: counts[0.0] / counts[1.0]}
    print(f"training rows per class: {counts}; class weights {weights}")

    results = {}
    for name, cw in (("plain", None), ("class-weighted", weights)):
        results[name] = r = train(train_df, cw).evaluate(test_df)
        print(f"{name:>15}: recall {r['recall_binary']:.3f}, precision "
              f"{r['precision_binary']:.3f} on the rare class")
    plain, weighted = results["plain"]["recall_binary"], results["class-weighted"]["recall_binary"]
    assert weighted >= 0.7 and weighted >= plain + 0.3, \
        "class weights should make the model find the rare class"


if __name__ == "__main__":
    main()
