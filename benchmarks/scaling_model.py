"""All-reduce cost against partitions N and parameters P, a fitted cost model, and an extrapolation.

Measured: ms per training iteration (gradient in -> updated weights at every partition) of
rddtensor's ``sharded`` all-reduce (reduce-scatter + all-gather, the design's strategy for many
partitions) and of MLlib's pattern (broadcast θ, ``treeAggregate`` the gradients, update on the
driver), for N = 2, 4, 8, 16 partitions and P = 1e5 .. 1e8 float32 parameters, on ``local[2]``
and on ``local-cluster[2,1,1024]`` (two executor JVMs of one core). rddtensor runs the public
``model.fit(rdd, allreduce="sharded")`` on ``benchmarks.allreduce.SyntheticParams`` (a layer
whose gradient is a fixed random vector: compute is one O(P) multiply, so what is timed is the
all-reduce, the update and the scheduling), one epoch of ``k`` iterations per Spark job; MLlib's
pattern is ``benchmarks.allreduce._mllib`` with its partition count set to N. Each point is the
median of ``repeats`` epochs / groups of ``k`` iterations after one warm-up; a point that fails (memory, timeout) is recorded with its
error. P = 1e8 (400 MB per copy of θ) is tried at N <= 4 only, with one iteration per group. A
JVM-only job of many empty tasks measures the driver's cost per task launched.

Cost model, fitted by non-negative least squares on each master's points (C = 2 cores):

- rddtensor: ``t = a + b * N/C + V/(C * beta)``, ``V = 8 (N-1) P`` bytes sent per iteration by
  all partitions together (each sends ``2 (N-1)/N * P`` float32 values).
- MLlib pattern: ``t = a + b * N/C + 4P * d + 4P * N/C * e``: ``d`` the driver's cost per byte
  of θ (update, broadcast, receiving the aggregate), ``e`` the executors' cost per byte of
  gradient they produce and combine.

Extrapolation to a cluster of N executors (one partition and one core each, N = 64 .. 512) on a
network of B = 10 or 25 Gbit/s, stated in ``ASSUMPTIONS`` and written into the JSON: every
executor runs its tasks in parallel (one wave); the driver launches every task serially at the
measured per-task cost; bytes leave/enter each executor at B and are processed at the measured
per-byte rate of one core; MLlib's driver receives ``ceil(sqrt(N))`` partial gradients
(``treeAggregate`` depth 2) and sends θ once (torrent broadcast, the best case for it).

Usage::

    python -m benchmarks.scaling_model [--quick] [--sizes 1e5,1e6,1e7,1e8] [--partitions 2,4,8,16]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from benchmarks.common import ROOT as _ROOT
from benchmarks.common import environment, load_average, markdown_table, write_results

ROOT = str(_ROOT)

NAME = "scaling_model"
MASTERS = ("local[2]", "local-cluster[2,1,1024]")
CONTENDERS = ("sharded", "mllib")
CORES = 2
FULL = {"sizes": "1e5,1e6,1e7,1e8", "partitions": "2,4,8,16", "k": 4, "repeats": 3}
QUICK = {"sizes": "1e4", "partitions": "2,4", "k": 2, "repeats": 1}
BIG_P_MAX_N = 4  # P = 1e8 is measured at N <= 4 only (see the docstring)
CLUSTER_N = (64, 128, 256, 512)
CLUSTER_GBIT = (10, 25)
CLUSTER_P = (1e6, 1e7, 1e8)
ASSUMPTIONS = [
    "one partition per executor, one core each; every executor runs its task of a stage at the "
    "same time (one wave), so per-task executor overheads count once per stage",
    "the driver launches the N tasks of every stage one after another at the per-task cost "
    "measured here with empty JVM tasks (an upper bound: it includes running them on 2 cores)",
    "network: every executor (and the driver) has its own full-duplex link of B Gbit/s; no "
    "contention in the switch; latency folded into the fitted fixed cost",
    "per-byte processing on each executor (Python <-> JVM copies, serialisation, the shuffle "
    "write and read) runs at the rate of one core fitted on this machine; local shuffle files "
    "stay in the page cache as they do here",
    "rddtensor sharded: 2 stages per iteration; each executor sends and receives "
    "2 (N-1)/N * 4P bytes",
    "MLlib pattern: torrent broadcast of θ (the driver uploads 4P bytes once, each executor "
    "downloads 4P), treeAggregate depth 2 (ceil(sqrt(N)) partial sums of 4P bytes reach the "
    "driver, each intermediate combiner receives ceil(sqrt(N)) of them), the update runs on the "
    "driver at its fitted per-byte cost; 2 stages per iteration",
    "compute of the real gradient is left out for both: it divides by N alike",
]


# --- measurement (worker process, one Spark master) ----------------------------------------------
def _drop_cached(sc):
    for rdd in list(sc._jsc.getPersistentRDDs().values()):
        rdd.unpersist(False)


def task_launch_ms(sc, counts=(64, 256, 1024), repeats=3) -> dict:
    """Driver cost per task: slope of the wall time of a JVM-only job against its task count."""
    import statistics
    jvm_rdd = lambda m: sc._jvm.org.apache.spark.api.java.JavaSparkContext.fromSparkContext(  # noqa
        sc._jsc.sc()).parallelize(sc._jvm.java.util.ArrayList(), m)
    walls = {}
    for m in counts:
        rdd = jvm_rdd(m)
        rdd.count()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rdd.count()
            samples.append((time.perf_counter() - t0) * 1e3)
        walls[m] = statistics.median(samples)
    xs, ys = list(walls), list(walls.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"ms_per_task": slope, "job_ms": walls}


def rddtensor_iteration_ms(sc, size, n, k, repeats) -> list:
    """ms per iteration of ``model.fit(rdd, allreduce="sharded")`` on ``n`` partitions.

    The model is ``benchmarks.allreduce.SyntheticParams`` (P parameters, a fixed random
    gradient); an epoch is ``k`` iterations run as one Spark job, timed by epoch-end callbacks;
    the first epoch (shards, broadcast of θ, worker start) is the warm-up. Each step's batch
    has 8 rows per partition on average (shuffled), so every partition computes a gradient.
    """
    import numpy as np

    from rddtensor import layers as L
    from benchmarks.allreduce import SyntheticParams
    batch = 8 * n
    rows = [(np.ones(1, np.float32), np.zeros(1, np.float32)) for _ in range(batch * k)]
    rdd = sc.parallelize(rows, n)
    model = L.Sequential([SyntheticParams(size, input_shape=(1,))], seed=0)
    model.compile(optimizer="sgd", loss="mse")
    stamps = [time.perf_counter()]
    model.fit(rdd, epochs=repeats + 1, batch_size=batch, verbose=0, allreduce="sharded",
              iterations_per_job=k, callbacks=[lambda epoch, logs: stamps.append(
                  time.perf_counter())])
    walls = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return [w * 1e3 / k for w in walls]


def measure_point(sc, contender, size, n, k, repeats) -> dict:
    t0 = time.perf_counter()
    try:
        if contender == "mllib":
            from benchmarks import allreduce as ar
            ar.N_PARTITIONS = n  # the allreduce benchmark's MLlib iteration, at N partitions
            samples = ar._mllib(sc, size, k, repeats)
        else:
            samples = rddtensor_iteration_ms(sc, size, n, k, repeats)
    except Exception as e:  # noqa: BLE001 (recorded, not hidden: memory and task failures)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "wall_s": time.perf_counter() - t0}
    finally:
        _drop_cached(sc)
    samples = sorted(samples)
    return {"samples_ms": samples, "median_ms": samples[len(samples) // 2],
            "min_ms": samples[0], "max_ms": samples[-1], "k": k, "repeats": repeats,
            "wall_s": time.perf_counter() - t0}


def measure_all(masters, sizes, partitions, contenders, k, repeats, launch: bool, quick: bool):
    """Every point on each of ``masters`` (``;``-separated), one session at a time: yields the
    task-launch line and one line per point, as dicts."""
    from rddtensor.spark.session import get_spark
    for master in masters.split(";"):
        spark = get_spark(master, app_name="bench-scaling",
                          conf={"spark.driver.memory": "1g", "spark.ui.enabled": "false",
                                "spark.executorEnv.PYTHONPATH": ROOT})
        sc = spark.sparkContext
        if launch and master.startswith("local["):
            counts, reps = ((16, 64, 256), 1) if quick else ((64, 256, 1024), 3)
            yield {"master": master, "task_launch": task_launch_ms(sc, counts, reps)}
        for size in sizes:
            for c in contenders:
                for n in partitions:
                    if size >= 10**8 and n > BIG_P_MAX_N:
                        continue  # minutes per iteration on 2 cores, past the 1 GB executors
                    kk = k if size < 10**8 else 1
                    r = measure_point(sc, c, size, n, kk, repeats)
                    yield {"master": master, "contender": c, "P": size, "N": n, **r}
        app = sc.applicationId
        spark.stop()
        _remove_work_dir(app)


def worker(*args):
    """``measure_all`` in a worker process: one JSON line per result, flushed as it comes."""
    for line in measure_all(*args):
        print(json.dumps(line), flush=True)


def run_inline(args: list) -> list:
    """What ``run_worker`` returns, measured in this process (``--quick``: one process start
    fewer; an exception ends the run like a crashed worker, its points so far kept)."""
    a = parse_args(["--worker", *args])
    lines = []
    try:
        for line in measure_all(a.worker, a.sizes, a.partitions, a.contenders, a.k, a.repeats,
                                a.launch, a.quick):
            lines.append(line)
    except Exception as e:  # noqa: BLE001 (recorded like a worker's error)
        lines.append({"worker_error": f"{type(e).__name__}: {str(e)[:300]}", "args": args})
    return lines


def _remove_work_dir(app_id):
    import pyspark
    home = os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)
    path = os.path.join(home, "work", app_id)
    if app_id and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def run_worker(args: list, timeout: float) -> list:
    """All JSON lines a worker printed (partial results survive a crash), or one error."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", "import sys; from benchmarks.scaling_model import main; "
           "main(sys.argv[1:])", "--worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = f"timed out after {timeout} s", "timeout"
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    if code != 0:
        tail = [x for x in (err or "").splitlines() if "rror" in x][-2:]
        lines.append({"worker_error": " | ".join(tail) or f"exit {code}", "args": args})
    return lines


# --- the model ------------------------------------------------------------------------------------
def _features(contender, n, p):
    if contender == "mllib":
        return [1.0, n / CORES, 4 * p, 4 * p * n / CORES]
    return [1.0, n / CORES, 8 * (n - 1) * p / CORES]


def fit(points, contender) -> dict | None:
    """Non-negative least squares of the cost model (seconds) on one master's points."""
    import numpy as np
    from scipy.optimize import nnls
    pts = [p for p in points if p["contender"] == contender and "median_ms" in p]
    if len(pts) < 2:  # (quick runs fit 2 points: the code path, not a model)
        return None
    A = np.array([_features(contender, p["N"], p["P"]) for p in pts])
    t = np.array([p["median_ms"] / 1e3 for p in pts])
    # relative error matters (times span 3 decades): weight each row by 1/t
    coef, _ = nnls(A / t[:, None], np.ones_like(t))
    pred = A @ coef
    rel = np.abs(pred - t) / t
    names = (["a_s", "b_s_per_task_wave", "d_s_per_driver_byte", "e_s_per_executor_byte"]
             if contender == "mllib" else ["a_s", "b_s_per_task_wave", "s_per_byte_per_core"])
    return {"coef": dict(zip(names, coef.tolist())), "points": len(pts),
            "median_rel_error": float(np.median(rel)), "max_rel_error": float(rel.max()),
            "predicted_ms": (pred * 1e3).tolist()}


def cluster_time(contender, model, n, p, gbit, launch_s) -> float:
    """Seconds per iteration on N executors at ``gbit`` (see ASSUMPTIONS)."""
    c = model["coef"]
    net = gbit * 1e9 / 8  # bytes/s
    fixed = c["a_s"] + c["b_s_per_task_wave"] + 2 * n * launch_s
    if contender == "mllib":
        r = math.ceil(math.sqrt(n))
        return (fixed + 4 * p / net * (1 + 2 * r)          # broadcast down, two tree levels up
                + 4 * p * r * c["d_s_per_driver_byte"]      # driver: receive, sum, update
                + 4 * p * r * c["e_s_per_executor_byte"])   # executors: produce, combine
    per_exec = 8 * (n - 1) / n * p                           # sent (and received) per executor
    return fixed + per_exec / net + per_exec * c["s_per_byte_per_core"]


def extrapolate(models, launch_s) -> list:
    rows = []
    for p in CLUSTER_P:
        for gbit in CLUSTER_GBIT:
            for n in CLUSTER_N:
                row = {"P": p, "gbit": gbit, "N": n}
                for c in CONTENDERS:
                    if models.get(c):
                        row[f"{c}_ms"] = 1e3 * cluster_time(c, models[c], n, p, gbit, launch_s)
                rows.append(row)
    return rows


# --- driver ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny run: {QUICK}")
    p.add_argument("--sizes", default=None)
    p.add_argument("--partitions", default=None)
    p.add_argument("--masters", default=",".join(MASTERS).replace("],", "];"),
                   help="';'-separated Spark masters")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--timeout", type=int, default=1200, help="seconds per worker process")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the master
    p.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    counts = QUICK if a.quick else FULL
    for key in ("sizes", "partitions", "k", "repeats"):
        if getattr(a, key) is None:
            setattr(a, key, counts[key])
    a.sizes = [int(float(s)) for s in str(a.sizes).split(",")]
    a.partitions = [int(s) for s in str(a.partitions).split(",")]
    a.masters = a.masters.split(";")
    a.contenders = a.contenders.split(",")
    return a


def _worker_args(a, master, sizes, contenders, launch):
    args = [master, "--sizes", ",".join(str(s) for s in sizes), "--partitions",
            ",".join(map(str, a.partitions)), "--contenders", ",".join(contenders),
            "--k", str(a.k), "--repeats", str(a.repeats)]
    return args + (["--launch"] if launch else []) + (["--quick"] if a.quick else [])


def run(a) -> dict:
    load_before = load_average()
    lines = []
    # quick: everything in this process; full: one worker process per (master, P, contender),
    # so that a crash at 1e8 (memory) loses only its own points
    jobs = ([(";".join(a.masters), a.sizes, a.contenders)] if a.quick else
            [(m, [s], [c]) for m in a.masters for s in a.sizes for c in a.contenders])
    for i, (masters, sizes, contenders) in enumerate(jobs):
        args = _worker_args(a, masters, sizes, contenders, launch=(i == 0))
        got = run_inline(args) if a.quick else run_worker(args, a.timeout)
        for x in got:
            print(json.dumps({k: v for k, v in x.items() if k != "samples_ms"}), flush=True)
        lines += got
    points = [x for x in lines if "contender" in x]
    launch = next((x["task_launch"] for x in lines if "task_launch" in x), None)
    errors = [x for x in lines if "worker_error" in x]
    models = {m: {c: fit([p for p in points if p["master"] == m], c) for c in a.contenders}
              for m in a.masters}
    launch_s = launch["ms_per_task"] / 1e3 if launch else 0.002
    base = models.get(MASTERS[1]) or models.get(a.masters[-1])
    if not base or not all(base.values()):  # the cluster fit needs enough points; else local
        base = models.get(a.masters[0], {})
    cluster = extrapolate(base, max(launch_s, 0.0)) if base and all(base.values()) else []
    ran = sorted({f"{p['master']}/{p['contender']}" for p in points if "median_ms" in p})
    return {
        "benchmark": NAME,
        "description": "all-reduce ms/iteration vs partitions N and parameters P; fitted cost "
                       "model; extrapolation to 64-512 executors",
        **environment(("numpy", "pyspark")),
        "parameters": {"sizes": a.sizes, "partitions": a.partitions, "masters": a.masters,
                       "contenders": a.contenders, "k": a.k, "repeats": a.repeats,
                       "quick": a.quick, "cores": CORES, "driver_memory": "1g",
                       "iteration": "rddtensor: model.fit(rdd, allreduce='sharded') on "
                                    "benchmarks.allreduce.SyntheticParams; mllib: "
                                    "benchmarks.allreduce._mllib with N_PARTITIONS = N"},
        "timing": {"load_average_before": load_before, "load_average_after": load_average()},
        "task_launch": launch,
        "points": points,
        "worker_errors": errors,
        "models": models,
        "model_used_for_cluster": next((m for m in a.masters if models.get(m) is base), None),
        "cluster": {"N": list(CLUSTER_N), "gbit": list(CLUSTER_GBIT), "P": list(CLUSTER_P),
                    "launch_s_per_task": launch_s, "rows": cluster},
        "assumptions": ASSUMPTIONS,
        "contenders_ran": ran,
    }


def _arg(args, flag):
    return args[args.index(flag) + 1] if flag in args else ""


def table(payload) -> str:
    rows = []
    for p in payload["points"]:
        rows.append([p["master"], p["contender"], f"{p['P']:.0e}", p["N"],
                     p.get("median_ms", "failed: " + str(p.get("error"))[:60]),
                     p.get("min_ms", ""), p.get("max_ms", "")])
    for e in payload.get("worker_errors", []):
        args = e.get("args", [])
        rows.append([args[0] if args else "?", _arg(args, "--contenders"),
                     _arg(args, "--sizes"), _arg(args, "--partitions"),
                     "not measured: " + str(e["worker_error"])[:70], "", ""])
    out = [markdown_table(["master", "contender", "P", "N", "median ms/iter", "min", "max"],
                          rows)]
    for m, fits in payload["models"].items():
        for c, f in fits.items():
            if f:
                coef = ", ".join(f"{k}={v:.3g}" for k, v in f["coef"].items())
                out.append(f"- fit {m} {c}: {coef} (median relative error "
                           f"{f['median_rel_error']:.0%}, max {f['max_rel_error']:.0%}, "
                           f"{f['points']} points)")
    return "\n".join(out) + f"\n\nCommand: `python -m benchmarks.scaling_model" \
        f"{' --quick' if payload['parameters']['quick'] else ''}`.\n"


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker(a.worker, a.sizes, a.partitions, a.contenders, a.k, a.repeats, a.launch, a.quick)
        return None
    payload = run(a)
    text = table(payload)
    path = write_results(NAME + ("_quick" if a.quick else ""), payload, text)
    print(text)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
