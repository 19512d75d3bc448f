"""Training and predicting from Spark's data sources: image files, libsvm files, array columns.

Images are small PNGs written here (a 20-line PNG encoder: no imaging library needed) from
scikit-learn's digits and read back with ``spark.read.format("image")``; libsvm data is a
generated high-dimensional sparse "bag of words", so training runs on sparse shards and
``transform`` on sparse batches.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.functions import vector_to_array

from rddtensor import layers as L
from rddtensor.spark import wire
from rddtensor.ml import NNClassifier
from rddtensor.spark.columns import SparseRows
from rddtensor.spark.shards import make_shards

pytestmark = pytest.mark.spark


def accuracy(df):
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(df)


# --- images -------------------------------------------------------------------------------------
def write_png(path: str, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG (no filtering, one zlib stream)."""
    h, w, _ = rgb.shape

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """60 digits of each of the classes 0, 1, 7 as colour PNGs in ``label=<class>`` folders."""
    from sklearn.datasets import load_digits
    d = load_digits()
    root = tmp_path_factory.mktemp("images")
    expected = {}
    for label, cls in enumerate((0, 1, 7)):
        os.makedirs(root / f"label={label}")
        for k, i in enumerate(np.flatnonzero(d.target == cls)[:60]):
            g = (d.images[i] * 15).astype(np.uint8)
            rgb = np.stack([g, 255 - g, g // 2], axis=-1)  # distinct channels: order matters
            path = str(root / f"label={label}" / f"{k}.png")
            write_png(path, rgb)
            expected[os.path.basename(path), label] = rgb.transpose(2, 0, 1) / np.float32(255)
    return str(root), expected


def test_image_source_trains_end_to_end(spark, image_dir):
    root, expected = image_dir
    df = spark.read.format("image").load(root)
    assert set(df.columns) == {"image", "label"}
    net = L.Sequential([L.Conv2D(4, 3, padding="same", activation="relu", input_shape=(3, 8, 8)),
                        L.MaxPool2D(2), L.Flatten(), L.Dense(3)])
    clf = NNClassifier(network=net, featuresCol="image", maxEpoch=5, batchSize=30,
                       learningRate=2e-2, numPartitions=2)
    model = clf.fit(df)
    out = model.transform(df)
    assert accuracy(out) > 0.9
    # transform decodes the struct to NCHW RGB exactly as the PNGs were written
    rows = out.select("image.origin", "label", "rawPrediction").collect()
    X = np.stack([expected[os.path.basename(r.origin), r.label] for r in rows]).astype(np.float32)
    logits = model.network.predict(X)
    np.testing.assert_allclose(np.stack([r.rawPrediction.toArray() for r in rows]),
                               logits - logits.mean(1, keepdims=True), rtol=1e-5, atol=1e-5)


# --- libsvm: sparse vectors ---------------------------------------------------------------------
def bag_of_words(n=600, vocab=5000, seed=0):
    """Rows of 8 word ids: 4 from their class's 30 keywords, 4 at random; 3 classes."""
    rng = np.random.default_rng(seed)
    keywords = rng.choice(vocab, size=(3, 30), replace=False)
    y = rng.integers(0, 3, size=n)
    rows = []
    for c in y:
        words = np.unique(np.concatenate([rng.choice(keywords[c], 4), rng.choice(vocab, 4)]))
        rows.append((words, rng.integers(1, 4, size=len(words)).astype(float)))
    return rows, y


@pytest.fixture(scope="module")
def libsvm_df(spark, tmp_path_factory):
    rows, y = bag_of_words()
    path = str(tmp_path_factory.mktemp("libsvm") / "train.txt")
    with open(path, "w") as f:
        for (idx, vals), label in zip(rows, y):
            f.write(f"{label} " + " ".join(f"{i + 1}:{v:g}" for i, v in zip(idx, vals)) + "\n")
    return spark.read.format("libsvm").option("numFeatures", 5000).load(path).repartition(2)


def test_libsvm_source_trains_on_sparse_shards(spark, libsvm_df):
    shards = make_shards(libsvm_df)
    try:
        for records in shards.rdd.glom().collect():
            _, _, arrays = wire.unpack(records[0])
            assert "X.indptr" in arrays and "X" not in arrays  # kept sparse, not 5000 floats/row
    finally:
        shards.unpersist()
    net = L.Sequential([L.Dense(16, activation="relu", input_shape=(5000,)), L.Dense(3)])
    clf = NNClassifier(network=net, maxEpoch=3, batchSize=50, learningRate=1e-2, seed=1)
    model = clf.fit(libsvm_df)
    out = model.transform(libsvm_df)
    assert accuracy(out) > 0.9
    # sparse batches in transform: the same outputs as the in-process network on a CSR matrix
    rows = out.select("features", "rawPrediction").collect()
    X = SparseRows(np.stack([r.features.toArray() for r in rows]).astype(np.float32))
    logits = model.network.predict(X)
    np.testing.assert_allclose(np.stack([r.rawPrediction.toArray() for r in rows]),
                               logits - logits.mean(1, keepdims=True), rtol=1e-4, atol=1e-5)
    # and training on sparse shards equals training on the same rows densified
    dense_df = libsvm_df.withColumn("dense", vector_to_array("features"))
    dense = clf.copy({clf.featuresCol: "dense"}).fit(dense_df)
    for a, b in zip(model.network.get_weights(), dense.network.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- array columns: token sequences ---------------------------------------------------------------
def test_int_array_sequences_train_an_embedding_rnn(spark):
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 12, size=(400, 6))
    tokens[tokens == 3] = 4
    has3 = rng.random(400) < 0.5
    tokens[has3, rng.integers(0, 6, size=has3.sum())] = 3
    df = spark.createDataFrame([(t.tolist(), int(h)) for t, h in zip(tokens, has3)],
                               "tokens array<int>, label int").repartition(2)
    net = L.Sequential([L.Embedding(12, 8, input_shape=(6,)), L.SimpleRNN(16), L.Dense(2)])
    model = NNClassifier(network=net, featuresCol="tokens", maxEpoch=6, batchSize=50,
                         learningRate=2e-2).fit(df)
    out = model.transform(df)
    assert accuracy(out.withColumn("label", out.label.cast("double"))) > 0.8
    rows = out.select("tokens", "rawPrediction").collect()
    X = np.array([r.tokens for r in rows], np.float32)
    logits = model.network.predict(X)
    np.testing.assert_allclose(np.stack([r.rawPrediction.toArray() for r in rows]),
                               logits - logits.mean(1, keepdims=True), rtol=1e-5, atol=1e-5)
