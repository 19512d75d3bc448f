"""A wide & deep recommender on a Spark DataFrame with one column per input field.

Synthetic click data: 200 users and 100 items, each with a hidden 4-dimensional taste / profile;
a user clicks an item when their tastes agree (plus a little noise) and, less strongly, when
the item's price (a dense feature) is low. The model has three inputs, one DataFrame column
each: ``user`` and ``item`` (ids, one number per row) feed ``Embedding`` layers whose product
(``Dot``) is the "deep" part; ``price`` feeds a linear "wide" part; the two are added before a
sigmoid. The distributed engine reads each input from its own column (matched by the inputs'
names), and the held-out ROC AUC (scikit-learn) shows the embeddings learned the tastes: the
price alone cannot reach it. The model is saved and loaded back (JSON + .npz) and scores the
DataFrame the same.

Run:  python examples/wide_and_deep_recommender.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
from sklearn.metrics import roc_auc_score

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
USERS, ITEMS, ROWS = 200, 100, 12_000


def clicks(seed: int = 0):
    rng = np.random.default_rng(seed)
    taste, profile = rng.normal(size=(USERS, 4)), rng.normal(size=(ITEMS, 4))
    user, item = rng.integers(0, USERS, ROWS), rng.integers(0, ITEMS, ROWS)
    price = rng.uniform(0, 1, ROWS).astype(np.float32)
    score = np.einsum("ij,ij->i", taste[user], profile[item]) - 1.5 * price + 0.75
    click = (score + rng.normal(scale=0.5, size=ROWS) > 0).astype(np.float32)
    return user, item, price, click


def wide_and_deep():
    user, item = L.Input((1,), name="user"), L.Input((1,), name="item")
    price = L.Input((1,), name="price")
    u = L.Flatten()(L.Embedding(USERS, 8)(user))
    v = L.Flatten()(L.Embedding(ITEMS, 8)(item))
    deep = L.Dot(axes=1)([u, v])                       # the user-item affinity, (batch, 1)
    wide = L.Dense(1)(price)                           # the price effect and a bias
    out = L.Activation("sigmoid")(L.Add()([deep, wide]))
    model = L.Model([user, item, price], out, name="wide_and_deep", seed=0)
    model.compile(optimizer=Adam(0.02), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    user, item, price, click = clicks()
    rows = [(int(u), int(i), float(p), float(c)) for u, i, p, c in zip(user, item, price, click)]
    df = spark.createDataFrame(rows, "user long, item long, price float, label float")
    train, test = df.randomSplit([0.8, 0.2], seed=0)
    train = train.repartition(2)

    model = wide_and_deep()
    model.summary()
    model.fit(train, epochs=4 if QUICK else 8, batch_size=256, verbose=2)  # columns by name

    truth = np.array([r.label for r in test.select("label").collect()])
    scores = np.concatenate(model.predict(test).collect())
    auc = roc_auc_score(truth, scores)
    price_auc = roc_auc_score(truth, -np.array([r.price for r in test.select("price").collect()]))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "wide_and_deep"))
        loaded = L.load_model(os.path.join(tmp, "wide_and_deep"))
    same = np.array_equal(np.concatenate(loaded.predict(test).collect()), scores)
    print(f"held-out ROC AUC {auc:.3f} (the price alone: {price_auc:.3f}) on {len(truth)} rows; "
          f"the reloaded model scores {'the same' if same else 'DIFFERENTLY'}")
    assert auc >= 0.8, f"the embeddings should learn the tastes: ROC AUC {auc:.3f} < 0.8"
    assert auc > price_auc + 0.15
    assert same


if __name__ == "__main__":
    main()
