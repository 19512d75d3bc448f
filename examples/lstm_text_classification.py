"""Text classification with an Embedding and an LSTM: short product reviews, positive or negative.

Reviews (generated here: filler words plus a few opinion words, some negated with "not") are an
RDD of ``(text, label)``. Spark tokenises them and builds the vocabulary; each review becomes a
fixed-length row of word ids, zero-padded at the end. ``Embedding(padding_idx=0)`` maps ids to
vectors and ``LSTM(mask_value=0.0)`` reads the words in order and skips the padding, so "not good"
can be told from "good" -- which a bag of words cannot do.

Run:  python examples/lstm_text_classification.py      (RDDTENSOR_QUICK=1: less data, fewer epochs)
"""
import os

import numpy as np

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
MAX_LEN = 12
FILLER = ("the this it was is a product item phone case cable i my bought arrived today "
          "very really quite and but so box price quality works").split()
GOOD, BAD = "good great excellent love perfect".split(), "bad awful poor broken terrible".split()


def review(rng):
    """A review and its label: 1 if the opinion is positive (a negated bad word counts too)."""
    label = int(rng.integers(2))
    negate = rng.random() < 0.4
    word = rng.choice(GOOD if label != negate else BAD)
    opinion = ["not", word] if negate else [word]
    words = list(rng.choice(FILLER, size=int(rng.integers(3, MAX_LEN - 2))))
    at = int(rng.integers(len(words) + 1))
    return " ".join(words[:at] + opinion + words[at:]), label


def main():
    sc = get_spark().sparkContext
    sc.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    n = 3000 if QUICK else 5000
    reviews = sc.parallelize([review(rng) for _ in range(n)], 2)

    # vocabulary from the data, id 0 reserved for padding
    words = sorted(reviews.flatMap(lambda r: r[0].split()).distinct().collect())
    vocab = {w: i + 1 for i, w in enumerate(words)}

    def encode(text):
        ids = [vocab.get(w, 0) for w in text.split()][:MAX_LEN]
        return np.array(ids + [0] * (MAX_LEN - len(ids)), dtype=np.float32)

    data = reviews.map(lambda r: (encode(r[0]), r[1]))
    train, test = data.randomSplit([0.8, 0.2], seed=0)

    model = L.Sequential([
        L.Embedding(len(vocab) + 1, 16, padding_idx=0, input_shape=(MAX_LEN,)),
        L.LSTM(32, mask_value=0.0),
        L.Dense(2),
    ], seed=0)
    model.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train, epochs=5 if QUICK else 8, batch_size=128)
    acc = model.evaluate(test)["accuracy"]

    probe = ["it was good", "it was not good", "the cable arrived broken", "not bad at all"]
    p = model.predict_proba(np.stack([encode(t) for t in probe]))[:, 1]
    for text, q in zip(probe, p):
        print(f"  {text!r:32} positive with p = {q:.2f}")
    print(f"held-out accuracy {acc:.4f} ({len(vocab)} words)")
    assert acc >= 0.9, f"the LSTM should read the reviews, got accuracy {acc:.3f}"
    assert p[0] > 0.5 > p[1], "negation should flip the opinion"


if __name__ == "__main__":
    main()
