"""Anomaly detection with a convolutional autoencoder: flag images that are not digits.

A small convolutional autoencoder (conv -> pool -> conv -> upsample -> conv) learns to reproduce
the bundled 8x8 digits: it is trained on an RDD of ``(image, image)`` pairs with mean squared
error. Images it reconstructs badly are anomalies. The threshold is the 99th percentile of the
reconstruction error on the training digits; the test set mixes held-out digits with anomalies
that have exactly the digits' pixel values but no digit shape (the pixels of a digit shuffled).
Reconstruction errors are computed on the executors with ``model.predict(rdd)``.

Run:  python examples/autoencoder_anomaly.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def reconstruction_errors(model, rdd):
    """Mean squared reconstruction error per image, computed on the executors."""
    images = rdd.map(lambda pair: pair[0])
    pairs = images.zip(model.predict(images))
    return np.array(pairs.map(lambda p: float(np.mean((p[0] - p[1]) ** 2))).collect())


def main():
    sc = get_spark().sparkContext
    sc.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    X = (load_digits().images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    order = rng.permutation(len(X))
    train, normal = X[order[:1400]], X[order[1400:]]
    shuffled = np.stack([rng.permutation(x.ravel()).reshape(x.shape) for x in normal[:200]])

    model = L.Sequential([
        L.Conv2D(16, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
        L.MaxPool2D(2),                                             # 16 x 4 x 4
        L.Conv2D(8, 3, padding="same", activation="relu"),          # the bottleneck: 8 x 4 x 4
        L.UpSampling2D(2),
        L.Conv2D(1, 3, padding="same"),                             # back to 1 x 8 x 8
    ], seed=0)
    model.compile(optimizer=Adam(5e-3), loss="mse")
    train_rdd = sc.parallelize([(x, x) for x in train], 2)
    model.fit(train_rdd, epochs=8 if QUICK else 20, batch_size=128)

    threshold = np.percentile(reconstruction_errors(model, train_rdd), 99)
    test = np.concatenate([normal, shuffled])
    is_anomaly = np.r_[np.zeros(len(normal)), np.ones(len(shuffled))]
    errors = reconstruction_errors(model, sc.parallelize([(x, x) for x in test], 2))
    flagged = errors > threshold
    recall = float(flagged[is_anomaly == 1].mean())
    false_alarms = float(flagged[is_anomaly == 0].mean())
    auc = roc_auc_score(is_anomaly, errors)
    print(f"threshold {threshold:.4f}: {recall:.1%} of anomalies flagged, {false_alarms:.1%} of "
          f"held-out digits flagged; ROC AUC {auc:.3f}")
    assert auc >= 0.95 and recall >= 0.8 and false_alarms <= 0.05, \
        "the autoencoder should tell digits from shuffled pixels"


if __name__ == "__main__":
    main()
