"""A CNN on digit images read from PNG files with Spark's image data source.

The bundled 8x8 digits are written out as grayscale PNG files, one folder per class
(``digits/7/123.png``), the layout most image collections come in. ``spark.read.format("image")``
decodes them in the JVM into an ``image`` struct column (height, width, channels, bytes); the label
comes from each file's folder name. ``model.fit(df, features_col="image")`` decodes the structs
on the executors to NCHW float arrays in [0, 1] and trains a small CNN (conv -> pool -> dense).

Run:  python examples/cnn_digits_images.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
from PIL import Image
from pyspark.sql import functions as F
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def write_pngs(root):
    """The digits as 8-bit grayscale PNGs in one folder per class; returns the file count."""
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(root, str(label))
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L")
        img.save(os.path.join(folder, f"{i}.png"))
    return len(digits.target)


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory() as root:
        n = write_pngs(root)
        images = spark.read.format("image").option("recursiveFileLookup", True).load(root)
        folder = F.element_at(F.split("image.origin", "/"), -2)
        # small files make many small partitions: gather them into 2 and decode them once
        df = images.withColumn("label", folder.cast("double")).repartition(2).cache()
        train, test = df.randomSplit([0.75, 0.25], seed=0)
        print(f"{n} PNG files -> {train.count()} training and {test.count()} test images")

        model = L.Sequential([
            L.Conv2D(32, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
            L.MaxPool2D(2),
            L.Flatten(),
            L.Dense(128, activation="relu"),
            L.Dense(10),
        ], seed=0)
        model.compile(optimizer=Adam(5e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(train, epochs=5 if QUICK else 12, batch_size=128, features_col="image")
        acc = model.evaluate(test.select(F.col("image").alias("features"), "label"))["accuracy"]
    print(f"held-out accuracy {acc:.4f}")
    assert acc >= (0.93 if QUICK else 0.96), f"the CNN should classify the digits, got {acc:.3f}"


if __name__ == "__main__":
    main()
