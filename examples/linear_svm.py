"""A linear SVM (hinge loss + L2 weight decay) on an RDD of labelled points.

Two separable point clouds with labels -1/+1 as an RDD of ``(features, label)`` pairs: one Dense
unit trained on the hinge loss ``max(0, 1 - t*score)`` with weight decay, which is what a
linear SVM minimises. The learned hyperplane separates every training and test point, and its
direction agrees with scikit-learn's ``LinearSVC`` on the same data.

Run:  python examples/linear_svm.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os

import numpy as np
from sklearn.svm import LinearSVC

from rddtensor import layers as L
from rddtensor.optim import SGD
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def clouds(n, seed):
    rng = np.random.default_rng(seed)
    t = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    X = rng.normal(scale=0.5, size=(n, 2)) + np.outer(t, [2.0, 1.5])  # centres +-(2, 1.5)
    return X.astype("float32"), t.astype("float32")


def main():
    sc = get_spark().sparkContext
    sc.setLogLevel("ERROR")
    X, t = clouds(1000, seed=0)
    X_test, t_test = clouds(400, seed=1)
    train = sc.parallelize(list(zip(X, t)), 2)

    model = L.Sequential([L.Dense(1, input_shape=(2,))], seed=0)
    weight_decay = 1e-2  # the L2 penalty (weight_decay / 2) * |w|^2 of the SVM objective
    model.compile(optimizer=SGD(0.1, momentum=0.9, weight_decay=weight_decay), loss="hinge",
                  metrics=["accuracy"])
    model.fit(train, epochs=6 if QUICK else 12, batch_size=100)

    W, b = model.get_weights()
    scores = model.predict(X_test).ravel()
    train_acc = model.evaluate(train)["accuracy"]
    test_acc = float(np.mean(np.sign(scores) == t_test))
    # the same objective in LinearSVC's form: C * sum(hinge) + |w|^2 / 2
    ref = LinearSVC(C=1 / (weight_decay * len(X)), loss="hinge", max_iter=100_000).fit(X, t)
    ref = ref.coef_.ravel()
    cosine = float(W.ravel() @ ref / np.linalg.norm(W) / np.linalg.norm(ref))
    print(f"hyperplane w = {np.round(W.ravel(), 3)}, b = {b[0]:.3f}; train accuracy "
          f"{train_acc:.3f}, test accuracy {test_acc:.3f}; "
          f"cosine to sklearn LinearSVC {cosine:.4f}")
    assert train_acc == 1.0 and test_acc == 1.0, "the SVM does not separate the two clouds"
    assert cosine > 0.99, "the hyperplane's direction differs from LinearSVC's"


if __name__ == "__main__":
    main()
