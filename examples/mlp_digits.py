"""A multi-layer perceptron on handwritten digits, from a Spark DataFrame of vectors.

scikit-learn's bundled 8x8 digits (1,797 images, flattened to 64 pixels) become a DataFrame with
a ``features`` vector column and a ``label`` column, split with ``randomSplit``. A 64-128-64-10
MLP with dropout trains on it with the distributed engine; held-out accuracy is computed on the
executors, then the model is saved (JSON + .npz), loaded back, and gives the same predictions.

Run:  python examples/mlp_digits.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
from pyspark.ml.linalg import Vectors
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    digits = load_digits()
    rows = [(Vectors.dense(x / 16.0), float(y)) for x, y in zip(digits.data, digits.target)]
    df = spark.createDataFrame(rows, ["features", "label"])
    train, test = df.randomSplit([0.75, 0.25], seed=0)
    train = train.repartition(2)

    model = L.Sequential([
        L.Dense(128, activation="relu", input_shape=(64,)),
        L.Dropout(0.1),
        L.Dense(64, activation="relu"),
        L.Dense(10),
    ], seed=0)
    model.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train, epochs=6 if QUICK else 12, batch_size=128, validation_data=test)
    acc = model.evaluate(test)["accuracy"]

    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "mlp"))
        loaded = L.load_model(os.path.join(tmp, "mlp"))
    X_test = np.stack([r.features.toArray() for r in test.collect()]).astype("float32")
    same = np.array_equal(loaded.predict(X_test), model.predict(X_test))
    print(f"held-out accuracy {acc:.4f} on {len(X_test)} digits; the reloaded model predicts "
          f"{'the same' if same else 'DIFFERENTLY'}")
    assert acc >= 0.95, f"the MLP should reach 95% on digits, got {acc:.3f}"
    assert same


if __name__ == "__main__":
    main()
