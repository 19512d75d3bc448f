"""Logistic regression inside a Spark ML feature pipeline: breast-cancer diagnosis.

scikit-learn's bundled breast-cancer table (569 tumours, 30 measurements) becomes a Spark
DataFrame; a Spark ML ``Pipeline`` assembles and standardises the columns; one Dense unit with a
sigmoid (Keras' spelling: ``activation="sigmoid"`` with ``binary_crossentropy``, which trains on
the logit before the sigmoid) is trained by the distributed engine and scored on a held-out
split, with accuracy and ROC AUC computed on the executors; ``predict`` gives probabilities.

Run:  python examples/logistic_regression.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os

import numpy as np
from pyspark.ml import Pipeline
from pyspark.ml.feature import StandardScaler, VectorAssembler
from sklearn.datasets import load_breast_cancer

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def load(spark):
    data = load_breast_cancer(as_frame=True)
    pdf = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    pdf["label"] = (pdf.pop("target") == 0).astype(float)  # 1 = malignant
    return spark.createDataFrame(pdf), [c for c in pdf.columns if c != "label"]


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    df, columns = load(spark)
    train, test = df.randomSplit([0.75, 0.25], seed=1)
    prep = Pipeline(stages=[
        VectorAssembler(inputCols=columns, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features", withMean=True),
    ]).fit(train)
    train, test = prep.transform(train).repartition(2), prep.transform(test)

    model = L.Sequential([L.Dense(1, activation="sigmoid", input_shape=(len(columns),))], seed=0)
    model.compile(optimizer=Adam(0.05), loss="binary_crossentropy",
                  metrics=["accuracy", "auc"])
    model.fit(train, epochs=5 if QUICK else 20, batch_size=100, validation_data=test)

    result = model.evaluate(test)
    print(f"held-out accuracy {result['accuracy']:.3f}, ROC AUC {result['roc_auc']:.3f} "
          f"on {test.count()} tumours")
    assert result["accuracy"] >= 0.93, "logistic regression should reach 93% here"
    assert result["roc_auc"] >= 0.97
    p = np.concatenate(model.predict(test).collect())  # probabilities of "malignant"
    assert 0 <= p.min() and p.max() <= 1 and p.min() < 0.1 and p.max() > 0.9


if __name__ == "__main__":
    main()
