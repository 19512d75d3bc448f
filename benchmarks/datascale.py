"""Per-iteration cost against data size: the executor-local data store against inline shards.

The question: does a training iteration cost O(batch) or O(data)? A DataFrame read from Parquet
(``--features`` float32 features in an array column, 10 classes) trains a fixed small network
(Dense ``features -> 64`` ReLU, ``Dense 64 -> 10``, SGD lr 0.01, sparse softmax cross-entropy)
with a global batch of ``--batch`` rows on ``local[2]`` (2 partitions), for each size in
``--sizes``. Contenders, in one Spark session, interleaved per size:

- ``store``: the default (``spark.rddtensor.dataStore=true``): each partition's rows are
  written once to the executor's local disk and every task maps them and copies out only its
  batch's rows (``rddtensor.spark.datastore``);
  The build tasks read the Parquet files themselves (``rddtensor.spark.parquet_scan``:
  pyarrow, Spark's row order, ``num_partitions`` runs of consecutive splits, no shuffle);
- ``store-jvm`` (``--compare-jvm``): the same, but the rows reach the build tasks through the
  JVM (``spark.rddtensor.readParquet=false``: ``toArrowBatchRdd``, and an order-keeping range
  shuffle into the 2 partitions), the path of any DataFrame that is not a plain Parquet scan;
- ``inline``: ``spark.rddtensor.dataStore=false``, what every version before the store did:
  the cached record holds the partition, and every task gets all of it from the JVM (run only
  up to ``--inline-max`` rows: at larger sizes one epoch takes minutes);
- ``pytorch-memmap``: the peer for reading batches from a memory-mapped file: a single-process
  PyTorch ``DataLoader`` (``num_workers=0``, random batches of ``--batch`` rows of an
  ``np.memmap`` of the same shape) and the same network and optimizer, same thread count.

Measured per fit: ms per iteration (the second epoch's wall time over its steps, from an epoch
callback: the build is outside it), the time from ``fit`` to the first epoch (building the
shards), and the peak RSS (``ru_maxrss``) of the Python workers (one small job after the fit
asks each) and of the driver's Python process; beside it the time of one full Spark scan of the
same DataFrame (``write.format("noop")``), which a build cannot beat by much.

Usage::

    python -m benchmarks.datascale                         # 1e5 and 1e6 rows
    python -m benchmarks.datascale --sizes 1e5,1e6,3e6 --repeats 2
    python -m benchmarks.datascale --sizes 1e5,1e7 --compare-jvm   # 5.1 GB of Parquet
    python -m benchmarks.datascale --quick                 # 2e4 rows, one repeat (smoke test)

Writes ``benchmarks/results/datascale.json`` and ``.md``. The Parquet files are generated once
under ``--data-dir`` (default: the system temp directory) and reused.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from benchmarks.common import (environment, markdown_table, match_threads, summarize,
                               wait_for_idle, write_results)

HIDDEN, CLASSES = 64, 10


def _parquet(spark, rows: int, features: int, data_dir: str) -> str:
    """``rows`` rows of ``features`` uniform float32 features and a 0..9 label, as Parquet."""
    from pyspark.sql import functions as F
    path = os.path.join(data_dir, f"rddtensor-datascale-{rows}x{features}.parquet")
    if not os.path.exists(os.path.join(path, "_SUCCESS")):
        df = spark.range(rows, numPartitions=2).select(
            F.array(*[F.rand(i).cast("float") for i in range(features)]).alias("features"),
            (F.col("id") % CLASSES).cast("long").alias("label"))
        df.write.mode("overwrite").parquet(path)
    return path


def _model(features: int, seed: int = 0):
    from rddtensor import layers as L
    from rddtensor.optim import SGD
    m = L.Sequential([L.Dense(HIDDEN, activation="relu", input_shape=(features,)),
                      L.Dense(CLASSES)], seed=seed)
    m.compile(optimizer=SGD(lr=0.01), loss="sparse_categorical_crossentropy")
    return m


def _worker_peak_rss_mb(sc) -> float:
    """The largest ``ru_maxrss`` among the Python workers (a tiny job on each)."""
    def peak(_):
        yield resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float(max(sc.parallelize(range(2), 2).mapPartitions(peak).collect()))


def fit_rddtensor(spark, path: str, features: int, batch: int, mode: str) -> dict:
    """One 2-epoch distributed fit; ms per iteration of epoch 2, build time, peak RSS."""
    from rddtensor.training.callbacks import Callback
    spark.conf.set("spark.rddtensor.dataStore", "false" if mode == "inline" else "true")
    # store-jvm: the rows through the JVM (toArrowBatchRdd, an ordered range shuffle for
    # num_partitions) instead of the build tasks reading the Parquet files themselves
    spark.conf.set("spark.rddtensor.readParquet", "false" if mode == "store-jvm" else "true")
    df = spark.read.parquet(path)
    marks = {}

    class Clock(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            marks[f"begin{epoch}"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            marks[f"end{epoch}"] = time.perf_counter()

    model = _model(features)
    t0 = time.perf_counter()
    h = model.fit(df, epochs=2, batch_size=batch, verbose=0, callbacks=[Clock()],
                  num_partitions=2)
    steps = -(-h.params["samples"] // batch)
    return {"ms_per_iteration": 1e3 * (marks["end1"] - marks["begin1"]) / steps,
            "build_s": marks["begin0"] - t0, "steps_per_epoch": steps,
            "data_store": h.params.get("data_store"),
            "worker_peak_rss_mb": _worker_peak_rss_mb(spark.sparkContext),
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": h.history["loss"][-1]}


def fit_pytorch_memmap(rows: int, features: int, batch: int, data_dir: str, steps: int) -> dict:
    """``steps`` SGD steps of the same network on random batches of an ``np.memmap``."""
    import torch
    path = os.path.join(data_dir, f"rddtensor-datascale-{rows}x{features}.f32")
    if not os.path.exists(path) or os.path.getsize(path) != rows * (features + 1) * 4:
        mm = np.memmap(path, np.float32, "w+", shape=(rows, features + 1))
        rng = np.random.default_rng(0)
        for a in range(0, rows, 1 << 16):
            b = min(rows, a + (1 << 16))
            mm[a:b, :features] = rng.random((b - a, features), np.float32)
            mm[a:b, features] = np.arange(a, b) % CLASSES
        mm.flush()
        del mm
    data = np.memmap(path, np.float32, "r", shape=(rows, features + 1))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return rows

        def __getitem__(self, idx):  # a whole batch at once (batch sampler below)
            block = torch.from_numpy(np.asarray(data[np.sort(idx)]))
            return block[:, :features], block[:, features].long()

    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(rows)),
                                            batch_size=batch, drop_last=False)
    loader = torch.utils.data.DataLoader(Rows(), sampler=sampler, batch_size=None,
                                         num_workers=0)
    net = torch.nn.Sequential(torch.nn.Linear(features, HIDDEN), torch.nn.ReLU(),
                              torch.nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    lossf = torch.nn.CrossEntropyLoss()
    done, t0 = 0, None
    while done < steps + 3:
        for xb, yb in loader:
            if done == 3:  # three warm-up steps
                t0 = time.perf_counter()
            opt.zero_grad()
            lossf(net(xb), yb).backward()
            opt.step()
            done += 1
            if done >= steps + 3:
                break
    return {"ms_per_iteration": 1e3 * (time.perf_counter() - t0) / steps,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scan_seconds(spark, path: str) -> float:
    t0 = time.perf_counter()
    spark.read.parquet(path).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--inline-max", type=float, default=1e5,
                    help="largest size the inline contender runs at")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--compare-jvm", action="store_true",
                    help="also run the store contender reading the rows through the JVM "
                         "(spark.rddtensor.readParquet=false)")
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=60.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.wait_idle, args.driver_memory = "2e4", 1, 0, "1g"
    import tempfile
    data_dir = args.data_dir or tempfile.gettempdir()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    threads = match_threads(2)
    idle = wait_for_idle(args.wait_idle) if args.wait_idle else None
    from rddtensor.spark.session import get_spark
    spark = get_spark("local[2]", app_name="rddtensor-datascale-bench",
                      conf={"spark.driver.memory": args.driver_memory})
    results = []
    try:
        for n in sizes:
            path = _parquet(spark, n, args.features, data_dir)
            runs = {"store": [], "store-jvm": [], "inline": [], "pytorch-memmap": []}
            scans = []
            for r in range(args.repeats):
                order = ["store", "inline"] + (["store-jvm"] if args.compare_jvm else [])
                if r % 2:
                    order.reverse()
                for mode in order:
                    if mode == "inline" and n > args.inline_max:
                        continue
                    runs[mode].append(fit_rddtensor(spark, path, args.features, args.batch,
                                                    mode))
                scans.append(scan_seconds(spark, path))
                runs["pytorch-memmap"].append(fit_pytorch_memmap(
                    n, args.features, args.batch, data_dir,
                    steps=min(50, max(5, -(-n // args.batch)))))
            for mode, got in runs.items():
                if not got:
                    continue
                ms = summarize([g["ms_per_iteration"] for g in got], "ms")
                results.append({
                    "rows": n, "contender": mode, "ms_per_iteration": ms,
                    "build_s": summarize([g["build_s"] for g in got]) if "build_s" in got[0]
                    else None,
                    "scan_s": summarize(scans),
                    "worker_peak_rss_mb": max((g.get("worker_peak_rss_mb", 0) for g in got)),
                    "driver_peak_rss_mb": max(g["driver_peak_rss_mb"] for g in got),
                    "data_store": got[0].get("data_store"), "runs": got})
    finally:
        spark.conf.unset("spark.rddtensor.dataStore")
    rows = []
    for r in results:
        build = r["build_s"]
        rows.append([f"{r['rows']:,}", r["contender"], r["ms_per_iteration"]["median"],
                     f"{r['ms_per_iteration']['min']:.3g}-{r['ms_per_iteration']['max']:.3g}",
                     build["median"] if build else "-",
                     f"{build['median'] / r['scan_s']['median']:.2f}x" if build else "-",
                     round(r["worker_peak_rss_mb"]) if r["worker_peak_rss_mb"] else "-",
                     round(r["driver_peak_rss_mb"])])
    table = ("Per-iteration cost against data size (local[2], 2 partitions, "
             f"{args.features} float32 features, batch {args.batch}, Dense "
             f"{args.features}-{HIDDEN}-{CLASSES}, SGD); medians of {args.repeats} run(s). "
             "Build = fit start to epoch 1 (shards built), against one full Spark scan "
             "(`write.format(\"noop\")`). Peak RSS: Python workers (max over workers, over the "
             "whole session so far) and this driver process.\n\n"
             + markdown_table(["rows", "contender", "ms/iteration", "range", "build s",
                               "build / scan", "worker peak RSS MB", "driver peak RSS MB"],
                              rows)
             + "\n\nCommand: `python -m benchmarks.datascale"
             + (" --quick" if args.quick else f" --sizes {args.sizes} --repeats {args.repeats}")
             + (" --compare-jvm" if args.compare_jvm else "") + "`.\n")
    payload = {"benchmark": "datascale", "environment": environment(("numpy", "torch")),
               "threads": threads, "idle": idle,
               "parameters": {k: v for k, v in vars(args).items()}, "results": results}
    write_results("datascale_quick" if args.quick else "datascale", payload, table)
    print(table)
    return payload


if __name__ == "__main__":
    main()
