"""A Transformer classifier on token sequences: did the user log in before paying?

Each row of a DataFrame is one session's events as token ids (``login``, ``pay``, ``view``, ...),
variable length, zero-padded at the end to 16 steps. The label says whether ``login`` happened
before ``pay``: the same tokens in another order give the other label, so a bag of words
cannot tell (it is near chance), while self-attention with learned positions can. The model,
written with the functional API: ``Embedding(padding_idx=0)`` -> ``PositionalEmbedding`` ->
``TransformerEncoderLayer`` -> masked mean over the steps -> ``Dense``; every layer after the
embedding takes ``mask_value=0.0``, so padded steps get no position, are never attended to and
do not count in the mean. It trains with the distributed engine on the DataFrame's ``features``
array column.

Run:  python examples/transformer_event_order.py      (RDDTENSOR_QUICK=1: fewer rows and epochs)
"""
import os

import numpy as np

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
STEPS, EVENTS = 16, ["<pad>", "login", "pay", "view", "search", "cart", "logout", "help"]
LOGIN, PAY = EVENTS.index("login"), EVENTS.index("pay")


def sessions(n: int, seed: int):
    """``(ids, label)``: sessions of 4..16 events holding one login and one pay, in either order."""
    rng = np.random.default_rng(seed)
    X, y = np.zeros((n, STEPS), np.float32), np.zeros(n, np.int64)
    for r in range(n):
        length = int(rng.integers(4, STEPS + 1))
        events = rng.integers(3, len(EVENTS), size=length)  # filler events
        a, b = rng.choice(length, size=2, replace=False)
        events[a], events[b] = LOGIN, PAY
        X[r, :length], y[r] = events, int(a < b)
    return X, y


def transformer(d_model: int = 16):
    tokens = L.Input((STEPS,), name="features")
    h = L.Embedding(len(EVENTS), d_model, padding_idx=0)(tokens)  # padding -> zero vectors
    h = L.PositionalEmbedding(STEPS, d_model, mask_value=0.0)(h)
    h = L.TransformerEncoderLayer(d_model, 2, dim_feedforward=32, dropout=0.0,
                                  mask_value=0.0)(h)
    logits = L.Dense(2)(L.GlobalAveragePooling1D(mask_value=0.0)(h))
    model = L.Model(tokens, logits, name="event_order", seed=0)
    model.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    X, y = sessions(2000 if QUICK else 4000, seed=0)
    X_test, y_test = sessions(500, seed=1)
    df = spark.createDataFrame([(x.tolist(), int(t)) for x, t in zip(X, y)],
                               "features array<float>, label long").repartition(2)

    model = transformer()
    model.fit(df, epochs=6 if QUICK else 10, batch_size=64, verbose=2)
    acc = model.evaluate(X_test, y_test)["accuracy"]

    # a bag of words (the same counts, no order) for comparison: logistic regression on counts
    from sklearn.linear_model import LogisticRegression
    counts = lambda A: np.stack([np.bincount(r.astype(int), minlength=len(EVENTS)) for r in A])
    bag = LogisticRegression(max_iter=1000).fit(counts(X), y).score(counts(X_test), y_test)

    print(f"held-out accuracy {acc:.3f}; a bag of words: {bag:.3f}")
    assert acc >= 0.9, f"the Transformer should learn the order, got accuracy {acc:.3f}"
    assert bag < 0.7, f"a bag of words should be near chance, got {bag:.3f}"


if __name__ == "__main__":
    main()
