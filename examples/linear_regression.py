"""Linear regression on a Spark DataFrame: one Dense unit trained with mean squared error.

The usual Spark ML preparation (numeric columns -> ``VectorAssembler`` -> a ``features`` vector
column), then ``model.fit(df)`` trains with the distributed engine: every partition computes the
gradient of its rows and the gradients are all-reduced through Spark's shuffle each step.
The learned weight and bias recover the coefficients the data was made with.

Run:  python examples/linear_regression.py      (RDDTENSOR_QUICK=1: fewer rows and epochs)
"""
import os

import numpy as np
from pyspark.ml.feature import VectorAssembler

from rddtensor import layers as L
from rddtensor.optim import SGD
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
TRUE_W, TRUE_B = np.array([2.0, -3.0, 0.5]), 1.0


def make_data(spark, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = X @ TRUE_W + TRUE_B + rng.normal(scale=0.1, size=n)
    rows = [(*map(float, x), float(t)) for x, t in zip(X, y)]
    df = spark.createDataFrame(rows, ["x1", "x2", "x3", "label"])
    return VectorAssembler(inputCols=["x1", "x2", "x3"], outputCol="features").transform(df)


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    df = make_data(spark, 2_000 if QUICK else 10_000).repartition(2)

    model = L.Sequential([L.Dense(1, input_shape=(3,))], seed=0)
    model.compile(optimizer=SGD(0.2), loss="mse", metrics=["rmse"])
    model.fit(df, epochs=3 if QUICK else 5, batch_size=256 if QUICK else 500)

    W, b = model.get_weights()
    rmse = model.evaluate(df)["rmse"]
    print(f"learned w = {np.round(W.ravel(), 3)}, b = {b[0]:.3f} "
          f"(true w = {TRUE_W}, b = {TRUE_B}); rmse {rmse:.4f} (noise 0.1)")
    assert np.allclose(W.ravel(), TRUE_W, atol=0.05) and abs(b[0] - TRUE_B) < 0.05, \
        "the weights did not recover the true coefficients"
    assert rmse < 0.15, f"rmse {rmse:.3f} is above the noise level"


if __name__ == "__main__":
    main()
