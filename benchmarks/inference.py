"""Batch inference throughput: ``NNModel.transform`` against MLlib's MLPC ``transform``.

Both score the same cached DataFrame of ``--rows`` dense feature vectors with the same network:
an MLlib ``MultilayerPerceptronClassificationModel`` (sigmoid hidden layers, softmax output) and
an ``NNClassificationModel`` whose ``rddtensor.layers.Sequential`` holds MLPC's weights copied over, so
both compute the same function (checked: the predictions must agree). Every timed call writes
all output columns (``rawPrediction``, ``probability``, ``prediction``) to Spark's ``noop`` sink,
so nothing is pruned and nothing is collected to the driver.

Contenders, timed in interleaved blocks in one Spark session (``local[2]``):

- ``rddtensor``: ``NNClassificationModel.transform`` (a scalar Arrow UDF: only the features
  column goes to Python, decoded with numpy, one GEMM per layer per ``inferenceBatchSize``
  rows; only the outputs come back);
- ``mllib``: ``MultilayerPerceptronClassificationModel.transform`` (JVM, row at a time);
- ``rddtensor-udt``: the same Arrow UDF fed the ``VectorUDT`` column itself (what wide, sparse
  vectors get) instead of ``vector_to_array(features, "float32")``: a UDT value costs ~20 us
  per row on its way into Python;
- ``rddtensor-mapInArrow``: the same model through its ``mapInArrow`` plan (what PySpark < 4.1
  gets): whole rows go to Python and back;
- ``mapInPandas``: the same network through ``mapInPandas`` (vectors arrive as one Python dict
  per row and must leave as ``DenseVector`` objects, the passed-through input column too): why
  ``transform`` uses ``mapInArrow``;
- ``arrow-floor``: ``mapInArrow`` appending constant columns, no decoding or compute: the cost
  of moving whole rows to Python and back.

Run (the README's numbers):

    python -m benchmarks.inference --rows 1000000
    python -m benchmarks.inference --quick        # 2k rows, 2 repeats, no waiting (smoke test)
"""
from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import (environment, markdown_table, ratio, time_interleaved,
                               wait_for_idle, write_results)

CONTENDERS = ("rddtensor", "mllib", "rddtensor-udt", "rddtensor-mapInArrow", "mapInPandas",
              "arrow-floor")


def _session(driver_memory: str):
    from rddtensor.spark.session import get_spark
    return get_spark("local[2]", app_name="rddtensor-inference-bench",
                     conf={"spark.driver.memory": driver_memory,
                           "spark.sql.shuffle.partitions": "2"})


def make_data(spark, rows: int, n_in: int, partitions: int, seed: int = 0):
    """``rows`` dense vectors of ``n_in`` uniform features and a 0..9 label, cached."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F
    df = spark.range(rows, numPartitions=partitions).select(
        array_to_vector(F.array(*[F.rand(seed + i) for i in range(n_in)])).alias("features"),
        (F.col("id") % 10).cast("double").alias("label"))
    df = df.cache()
    df.count()
    return df


def mllib_model(spark, df, layers: list, seed: int = 0):
    """An MLPC model with ``rddtensor.layers`` (fitted for one iteration on a sample: weights are random)."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    sample = df.limit(2000)
    return MultilayerPerceptronClassifier(layers=layers, maxIter=1, seed=seed,
                                          blockSize=128).fit(sample)


def same_network(mlpc, layers: list):
    """A ``rddtensor.layers.Sequential`` computing what ``mlpc`` computes (its weights copied over).

    MLPC keeps each affine layer as a column-major ``(n_out, n_in)`` matrix followed by its bias
    in one flat vector; hidden layers are sigmoid, the last one softmax (here: logits + the
    softmax link of the compiled loss).
    """
    import numpy as np

    from rddtensor import layers as L
    flat = mlpc.weights.toArray()
    net = L.Sequential(
        [L.Dense(n, activation="sigmoid", input_shape=(layers[0],) if i == 0 else None)
         for i, n in enumerate(layers[1:-1])] + [L.Dense(layers[-1])])
    net.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    net.build()
    weights, offset = [], 0
    for n_in, n_out in zip(layers[:-1], layers[1:]):
        W = flat[offset:offset + n_in * n_out].reshape(n_in, n_out).T
        offset += n_in * n_out
        b = flat[offset:offset + n_out]
        offset += n_out
        weights += [W.astype(np.float32), b.astype(np.float32)]
    net.set_weights(weights)
    return net


def pandas_transform(df, net, batch_size: int):
    """The same prediction through ``mapInPandas`` (vector objects per row, in and out)."""
    import numpy as np
    import pandas as pd
    from pyspark.ml.linalg import DenseVector, SparseVector, VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    from rddtensor.ml import network
    payload = df.sparkSession.sparkContext.broadcast(network.encode(net))
    cache = {}

    def run(frames):
        model = cache.get("m") or cache.setdefault("m", network.decode(payload.value))
        for pdf in frames:
            # Spark 4 hands VectorUDT values to pandas as {type, size, indices, values} dicts
            # but wants Vector objects back, also for the passed-through input column
            vecs = [DenseVector(v["values"]) if v["type"] == 1 else
                    SparseVector(v["size"], v["indices"], v["values"]) for v in pdf["features"]]
            X = np.stack([v.toArray() for v in vecs]).astype(np.float32)
            pdf = pdf.assign(features=vecs)
            Y = np.concatenate([model.forward(model.params, X[a:a + batch_size])[0]
                                for a in range(0, len(X), batch_size)]).astype(np.float64)
            P = np.exp(Y - Y.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            yield pdf.assign(rawPrediction=[DenseVector(r) for r in Y],
                             probability=[DenseVector(r) for r in P],
                             prediction=pd.Series(Y.argmax(1), dtype="float64"))
    schema = StructType(df.schema.fields + [StructField("rawPrediction", VectorUDT()),
                                            StructField("probability", VectorUDT()),
                                            StructField("prediction", DoubleType())])
    return df.mapInPandas(run, schema)


def floor_transform(df, n_out: int):
    """``mapInArrow`` that appends constant output columns: the Python round trip alone."""
    import numpy as np
    import pyarrow as pa
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    from rddtensor.ml.transform import _vector_array

    def run(batches):
        for b in batches:
            Z = np.zeros((b.num_rows, n_out))
            yield pa.RecordBatch.from_arrays(
                list(b.columns) + [_vector_array(Z), _vector_array(Z), pa.array(Z[:, 0])],
                names=b.schema.names + ["rawPrediction", "probability", "prediction"])
    schema = StructType(df.schema.fields + [StructField("rawPrediction", VectorUDT()),
                                            StructField("probability", VectorUDT()),
                                            StructField("prediction", DoubleType())])
    return df.mapInArrow(run, schema)


def transform_with(model, df, mode: str, dense_max=None):
    """``model.transform(df)`` with the plan ``mode`` (``rddtensor.ml.transform.MODE``) and
    optionally another ``DENSE_VECTOR_MAX``."""
    from rddtensor.ml import transform as T
    before = T.MODE, T.DENSE_VECTOR_MAX
    T.MODE = mode
    if dense_max is not None:
        T.DENSE_VECTOR_MAX = dense_max
    try:
        return model.transform(df)
    finally:
        T.MODE, T.DENSE_VECTOR_MAX = before


def _noop(out):
    out.write.format("noop").mode("overwrite").save()


def agreement(df, mlpc, nn_model, rows: int = 20000) -> dict:
    """Share of equal predictions and largest probability difference on the first rows."""
    import numpy as np
    sample = df.limit(rows).cache()
    a = mlpc.transform(sample).select("probability", "prediction").collect()
    b = transform_with(nn_model, sample, "udf").select("probability", "prediction").collect()
    sample.unpersist()
    Pa = np.array([r.probability.toArray() for r in a])
    Pb = np.array([r.probability.toArray() for r in b])
    same = np.mean([x.prediction == y.prediction for x, y in zip(a, b)])
    return {"rows": len(a), "same_prediction": float(same),
            "max_abs_probability_diff": float(np.abs(Pa - Pb).max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--layers", default="64,128,64,10", help="MLPC layer sizes, input first")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--inference-batch", type=int, default=4096)
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--quick", action="store_true",
                    help="2k rows, 2 repeats, no wait for an idle machine, warm-up or settling")
    a = ap.parse_args(argv)
    rows, repeats = (2_000, 2) if a.quick else (a.rows, a.repeats)
    # quick proves that every contender runs: waiting up to a minute for an idle machine, an
    # untimed warm-up call and a pause before each block buy accuracy it does not report
    warmup, settle = (0, 0.0) if a.quick else (1, 1.0)
    layers = [int(x) for x in a.layers.split(",")]
    contenders = a.contenders.split(",")
    idle = None if a.quick else wait_for_idle(max_wait_s=60)
    load_before = os.getloadavg()
    spark = _session(a.driver_memory)

    from rddtensor.ml import NNClassificationModel
    t0 = time.perf_counter()
    df = make_data(spark, rows, layers[0], a.partitions)
    data_s = time.perf_counter() - t0
    mlpc = mllib_model(spark, df, layers)
    net = same_network(mlpc, layers)
    nn_model = NNClassificationModel(network=net, inferenceBatchSize=a.inference_batch)
    check = agreement(df, mlpc, nn_model)
    print(f"data: {rows} rows in {data_s:.1f}s; agreement {check}", flush=True)

    fns = {"rddtensor": lambda: _noop(transform_with(nn_model, df, "udf")),
           "rddtensor-udt": lambda: _noop(transform_with(nn_model, df, "udf", dense_max=0)),
           "rddtensor-mapInArrow": lambda: _noop(transform_with(nn_model, df, "map")),
           "mllib": lambda: _noop(mlpc.transform(df)),
           "mapInPandas": lambda: _noop(pandas_transform(df, net, a.inference_batch)),
           "arrow-floor": lambda: _noop(floor_transform(df, layers[-1]))}
    fns = {c: fns[c] for c in contenders}
    timing = time_interleaved(fns, calls=1, repeats=repeats, warmup=warmup, settle=settle)
    rows_per_s = {c: rows / (t["median"] / 1e3) for c, t in timing.items()}
    ratios = {c: ratio(timing["mllib"], timing[c]) for c in timing if c != "mllib"} \
        if "mllib" in timing else {}

    load_after = os.getloadavg()
    table_rows = []
    for c, t in timing.items():
        r = ratios.get(c, {})
        table_rows.append([c, t["median"] / 1e3, t["min"] / 1e3, t["max"] / 1e3, rows_per_s[c],
                           f"{r['of_medians']:.2f}x" if r else "1.00x",
                           f"{r['paired_min']:.2f}-{r['paired_max']:.2f}x" if r else ""])
    table = markdown_table(["contender", "median s", "min s", "max s", "rows/s",
                            "speed vs mllib (medians)", "per-repeat range"], table_rows)
    table += (f"\n\n{rows:,} rows, layers {layers}, {repeats} repeats; load average (1, 5, 15 min) "
              f"before {tuple(round(x, 1) for x in load_before)}, after "
              f"{tuple(round(x, 1) for x in load_after)} (2 cores)")
    command = "python -m benchmarks.inference " + (" ".join(argv) if argv is not None else
                                                   " ".join(__import__("sys").argv[1:]))
    payload = {"benchmark": "inference", "environment": environment(("numpy", "pyspark",
                                                                      "pyarrow")),
               "parameters": {"rows": rows, "layers": layers, "partitions": a.partitions,
                              "repeats": repeats, "warmup": warmup, "settle_s": settle,
                              "master": "local[2]",
                              "driver_memory": a.driver_memory,
                              "inference_batch_size": a.inference_batch,
                              "arrow_max_records_per_batch": spark.conf.get(
                                  "spark.sql.execution.arrow.maxRecordsPerBatch")},
               "command": command.strip(), "idle_before": idle, "agreement": check,
               "load_average_before": load_before, "load_average_after": load_after,
               "note": "timing[*].background counts this run's own Spark JVM and Python workers "
                       "as 'other' load (they are not this process); see the load averages",
               "timing": timing, "rows_per_s": rows_per_s,
               "speedup_vs_mllib": ratios}
    path = write_results("inference" + ("_quick" if a.quick else ""), payload, table)
    print(table)
    print(f"wrote {path}")
    df.unpersist()
    spark.stop()


if __name__ == "__main__":
    main()
