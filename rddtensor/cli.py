"""The ``rddtensor`` command line: ``demo`` (the README's main job) and ``info``.

Example:
    $ rddtensor demo            # trains on the bundled digits through an embedded local[*] Spark
    $ rddtensor info            # versions, Java, GPU/CuPy status
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("rddtensor")


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    X, y = (d.data / 16.0).astype("float32"), d.target.astype("int64")
    return train_test_split(X, y, test_size=0.25, random_state=0)


def demo(args) -> int:
    """Train an MLP on scikit-learn's handwritten digits with the distributed engine."""
    import numpy as np

    import layers as L
    from optim import Adam
    from rddtensor.session import get_spark

    from pyspark.sql import SparkSession
    owned = SparkSession.getActiveSession() is None
    spark = get_spark(args.master, app_name="rddtensor-demo")
    sc = spark.sparkContext
    Xtr, Xte, ytr, yte = _digits()
    train = sc.parallelize(list(zip(Xtr, ytr)), args.partitions)
    test = sc.parallelize(list(zip(Xte, yte)), args.partitions)
    model = L.Sequential([
        L.Dense(128, activation="relu", input_shape=(64,)),
        L.Dropout(0.1),
        L.Dense(64, activation="relu"),
        L.Dense(10),
    ], seed=0)
    model.compile(optimizer=Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    print(f"Spark {spark.version} on {sc.master}: {len(Xtr)} training digits in "
          f"{args.partitions} partitions, {model.count_params():,} parameters")
    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=test, verbose=1, seed=0)
    result = model.evaluate(test)
    print(f"test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f}); "
          f"in-process check: {float(np.mean(model.predict(Xte).argmax(1) == yte)):.4f}")
    if args.save:
        model.save(args.save)
        print(f"model saved to {args.save}")
    if owned:
        spark.stop()
    return 0 if result["accuracy"] >= 0.9 else 1


def info(args) -> int:
    """Print versions, Java, and GPU/CuPy status."""
    import platform

    import numpy as np

    import rddtensor
    from rddtensor import backend
    from rddtensor.session import java_version
    try:
        import pyspark
        spark_version = pyspark.__version__
    except ImportError:
        spark_version = "not installed"
    print(f"rddtensor {rddtensor.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"numpy     {np.__version__}")
    print(f"pyspark   {spark_version}")
    jv = java_version()
    print(f"java      {jv if jv else 'NOT FOUND (Spark needs Java 17+)'}")
    gpu = backend.device_count()
    print(f"cupy      {'installed' if backend.has_cupy() else 'not installed'}; GPUs visible: {gpu}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rddtensor", description="Deep learning on Spark, in Python.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train on the bundled digits through a local Spark master")
    p.add_argument("--master", default="local[*]", help="Spark master (default: local[*])")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--save", default=None, help="directory to save the trained model to")
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="versions, Java and GPU status")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
