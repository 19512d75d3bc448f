"""All-reduce cost per training iteration on ``local[2]``: rddtensor against the MLlib pattern.

One iteration = gradient in -> updated weights at every partition. Contenders, each in a fresh
process (so the driver's peak memory is its own) with ``spark.driver.memory=1g``:

- ``sharded``: rddtensor's reduce-scatter + all-gather (two Python passes per iteration).
- ``replicated``: rddtensor's all-to-all exchange (one Python pass per iteration).
- ``hierarchical`` (with ``--cluster 2x2``): ``sharded`` with one copy per host between hosts
  (``rddtensor.spark.hierarchical``; four passes, and ``sharded``'s two without several
  partitions per host).
- ``*-bf16``: the same with ``wire_dtype="bfloat16"`` (gradients and parameter copies cross
  the shuffle as bfloat16; float32 master weights stay with their owners).
- ``*-shuffle`` (with ``--cluster``): the same with ``spark.rddtensor.peerTransport=false``:
  records between hosts cross the JVM shuffle instead of being fetched from the sending
  worker (``rddtensor.spark.peers``).
- ``mllib``: MLlib's pattern in PySpark: broadcast θ, ``treeAggregate`` the gradients, update
  on the driver (one job per iteration; the driver carries all P values twice).
- ``floor-2pass`` / ``floor-1pass``: the same number of Python passes and shuffles per iteration
  with empty payloads, grouped in jobs like rddtensor's: the scheduling floor.

rddtensor runs its real engine (``DistributedRunner``) on a model whose only layer holds P
parameters and whose gradient is a fixed random vector times a scalar (one O(P) multiply,
incompressible like a real gradient), so compute is negligible and what is timed is the
all-reduce, the optimizer update (SGD) and the scheduling. Run:

    python -m benchmarks.allreduce            # P = 1e5, 1e6, 1e7, 1e8
    python -m benchmarks.allreduce --quick    # P = 1e4, few repeats, one process (CI smoke test)
    python -m benchmarks.allreduce --cluster 2hosts --sizes 1e5,1e6,1e7

``--cluster 2hosts`` runs every contender as a driver of a standalone cluster of two "hosts" on
this machine (``rddtensor.spark.testing.multi_host_cluster``: one 1-core executor on each of
127.0.0.2 and 127.0.0.3, each with a private ``/dev/shm``), started once for the whole run;
results go to ``allreduce_2hosts.json``/``.md``. Bytes between the hosts cross loopback.
``--cluster 2x2``: two 1-core executors on each host and N = 4 partitions
(``allreduce_2x2.*``), where records between partitions of one host and between hosts differ.

With ``sharded`` and ``replicated`` at three sizes or more, the run also fits the cost model
``rddtensor.spark.allreduce.choose`` uses (``fit_cost_model``: its ``ONE_HOST`` constants come
from a run on ``local[2]``, its ``HOSTS`` constants from a ``--cluster 2hosts`` run) and writes
it under the table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from rddtensor.layers.base import Layer, register

CONTENDERS = ("sharded", "sharded-bf16", "replicated", "replicated-bf16", "mllib",
              "floor-2pass", "floor-1pass")
PARTITIONS_ENV = "RDDTENSOR_BENCH_PARTITIONS"  # N (``--cluster 2x2``: 4, one per executor)
N_PARTITIONS = int(os.environ.get(PARTITIONS_ENV, "2"))


_NOISE: dict = {}


def synthetic_gradient(size: int, scale: float) -> np.ndarray:
    """A dense, incompressible gradient (fixed noise times ``scale``) in one O(P) multiply.

    Random floats, like real gradients: a constant fill would let Spark's lz4 shuffle
    compression shrink the traffic to nothing and flatter every contender.
    """
    noise = _NOISE.get(size)
    if noise is None:
        noise = _NOISE[size] = np.random.default_rng(size).standard_normal(size, dtype=np.float32)
    return noise * np.float32(scale)


@register
class SyntheticParams(Layer):
    """``size`` parameters with a synthetic gradient: isolates the all-reduce from compute."""

    def __init__(self, size: int, **kw):
        super().__init__(**kw)
        self.size = int(size)

    def compute_output_shape(self, input_shape):
        return (1,)

    def param_shapes(self):
        return {"w": (self.size,)}

    def forward(self, params, X, training=False, rng=None):
        Y = X[:, :1] + params["w"][:1]

        def backprop(dY):
            return None, {"w": synthetic_gradient(self.size, 1e-3 * float(dY.sum()))}
        return Y, backprop

    def get_config(self):
        return {**super().get_config(), "size": self.size}


MASTER_ENV = "RDDTENSOR_BENCH_MASTER"  # a cluster's master URL and executor count
EXECUTORS_ENV = "RDDTENSOR_BENCH_EXECUTORS"


def _session():
    from rddtensor.spark.session import get_spark
    extra = json.loads(os.environ.get("RDDTENSOR_BENCH_CONF", "{}"))
    spark = get_spark(os.environ.get(MASTER_ENV, "local[2]"), app_name="bench-allreduce",
                      conf={"spark.driver.memory": "1g", "spark.ui.enabled": "false", **extra})
    status = spark.sparkContext._jsc.sc().getExecutorMemoryStatus  # the driver's, and theirs
    deadline = time.monotonic() + 120
    while status().size() < int(os.environ.get(EXECUTORS_ENV, "0")) + 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster's executors did not register within 120 s")
        time.sleep(0.1)
    return spark


def _jvm_peak_heap_mb(sc) -> float:
    mf = sc._jvm.java.lang.management.ManagementFactory
    peak = 0
    for pool in mf.getMemoryPoolMXBeans():
        if str(pool.getType().toString()) == "Heap memory":
            peak += pool.getPeakUsage().getUsed()
    return peak / 2**20


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants (the
    driver JVM, its Python workers), read from /proc: unlike wall time, barely moved by other
    load on the machine. Includes what exited children used. 0.0 where /proc is missing."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, cpu = {}, {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        cpu[int(pid)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    total = 0.0
    for pid, c in cpu.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += c
    return total


_CPU: list = []  # CPU ms per iteration of each timed group (same order as the samples)


WARMUP_GROUPS = 2  # workers, imports, first shuffle files, and the JVMs' JIT compilation


def _time_groups(run_group, k: int, repeats: int) -> list:
    for _ in range(WARMUP_GROUPS):
        run_group(k)
    out = []
    for _ in range(repeats):
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        run_group(k)
        out.append((time.perf_counter() - t0) * 1e3 / k)
        _CPU.append((tree_cpu_seconds() - c0) * 1e3 / k)
    return out


def _rddtensor(sc, size, mode, k, repeats):
    from rddtensor import layers as L
    from rddtensor.spark.allreduce import STRATEGIES
    from rddtensor.spark.engine import DistributedRunner
    from rddtensor.spark.shards import make_shards
    model = L.Sequential([SyntheticParams(size, input_shape=(1,))], seed=0)
    model.compile(optimizer="sgd", loss="mse")
    model.build()
    model.init_slots()
    rows = [(np.ones(1, np.float32), np.zeros(1, np.float32)) for _ in range(2 * N_PARTITIONS)]
    strategy = STRATEGIES[mode.split("-")[0]]()
    from pyspark.sql import SparkSession
    conf = SparkSession.getActiveSession().conf
    if "-shuffle" in mode:  # (unset below: later contenders of this process get the default)
        conf.set("spark.rddtensor.peerTransport", "false")
    shards = make_shards(sc.parallelize(rows, N_PARTITIONS))
    # epochs of one full-batch step each: the engine never runs out of steps in an epoch
    runner = DistributedRunner(model, shards, strategy, batch_size=len(rows), shuffle=False,
                               seed=0, class_weight=None, iterations_per_job=k,
                               wire_dtype="bfloat16" if "-bf16" in mode else "float32")
    runner.spe = 10**9
    try:
        return _time_groups(runner._run_group, k, repeats)
    finally:
        runner.close()  # its cached state and its host-local cache files
        conf.unset("spark.rddtensor.peerTransport")


def _mllib(sc, size, k, repeats):
    rows = sc.parallelize([np.ones(1, np.float32)] * (2 * N_PARTITIONS), N_PARTITIONS).cache()
    rows.count()
    theta = np.zeros(size, np.float32)

    def iteration(_):
        nonlocal theta
        bc = sc.broadcast(theta)

        def seq(acc, x):
            g = synthetic_gradient(size, 1e-3 * float(x[0] + bc.value[0]))
            return g if acc is None else acc + g

        def comb(a, b):
            return b if a is None else a if b is None else a + b
        g = rows.treeAggregate(None, seq, comb, depth=2)
        theta = theta - np.float32(0.01) * g
        bc.destroy()

    def group(n):
        for _ in range(n):
            iteration(None)
    return _time_groups(group, k, repeats)


def _floor(sc, passes, k, repeats):
    from rddtensor.spark import rawrdd
    n_dest = N_PARTITIONS  # (the executors import this module without the driver's setting)

    def emit(_, records):
        for _ in records:
            pass
        for d in range(n_dest):
            yield rawrdd.key(d)
            yield b"x"
    state = {"S": rawrdd.map_raw(sc.parallelize(range(N_PARTITIONS), N_PARTITIONS), emit).cache()}

    def group(n):
        S = state["S"]
        for _ in range(n):
            for _ in range(passes):
                S = rawrdd.map_raw(rawrdd.shuffle_pairs(S, N_PARTITIONS), emit)
        S.persist()
        S.localCheckpoint()
        S._jrdd.count()
        state["S"] = S
    return _time_groups(group, k, repeats)


def _small_fit(sc, mode, repeats):
    """Seconds per whole ``fit`` (3 epochs, 2,000 rows, batch 200: 30 steps) of a small MLP
    (278 parameters) on an RDD: what scheduling and the all-reduce's fixed costs make of a
    model too small to notice. The first fit (workers, imports) is not timed."""
    from rddtensor import layers as L
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 10)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    rows = sc.parallelize(list(zip(X, y)), N_PARTITIONS)
    out = []
    for r in range(repeats + 1):
        m = L.Sequential([L.Dense(16, activation="relu", input_shape=(10,)), L.Dense(6)], seed=0)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        t0 = time.perf_counter()
        m.fit(rows, epochs=3, batch_size=200, allreduce=mode, verbose=0)
        if r:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(sc, contender: str, size: int, k: int, repeats: int) -> dict:
    """One contender's samples on the running ``sc`` (the driver peaks are this process's)."""
    t0 = time.perf_counter()
    del _CPU[:]
    if contender.startswith("fit-"):
        samples = _small_fit(sc, contender[4:], repeats)
        _CPU.extend([0.0] * len(samples))  # (not measured for whole fits)
    elif contender.split("-")[0] in ("sharded", "replicated", "hierarchical"):
        samples = _rddtensor(sc, size, contender, k, repeats)
    elif contender == "mllib":
        samples = _mllib(sc, size, k, repeats)
    else:
        samples = _floor(sc, 2 if contender == "floor-2pass" else 1, k, repeats)
    return {"contender": contender, "P": size, "samples_ms": samples,
            "median_ms": float(np.median(samples)), "min_ms": min(samples), "max_ms": max(samples),
            "cpu_ms_samples": list(_CPU), "median_cpu_ms": float(np.median(_CPU)),
            "driver_jvm_peak_heap_mb": _jvm_peak_heap_mb(sc),
            "driver_python_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": time.perf_counter() - t0}


def worker(contender: str, size: int, k: int, repeats: int) -> dict:
    spark = _session()
    out = measure(spark.sparkContext, contender, size, k, repeats)
    spark.stop()
    return out


def run_inline(contenders, size, k, repeats) -> list:
    """Every contender in this process, one Spark session (``--quick``: proves each runs; the
    driver peaks are then those of the whole run so far, not of one contender)."""
    spark = _session()
    results = []
    for c in contenders:
        try:
            r = measure(spark.sparkContext, c, size, k, repeats)
        except Exception as e:  # noqa: BLE001 (recorded like a failed subprocess)
            r = {"contender": c, "P": size, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({x: r.get(x) for x in ("contender", "P", "median_ms", "error")}),
              flush=True)
        results.append(r)
    spark.stop()
    return results


def run_one(contender, size, k, repeats, timeout, env=None) -> dict:
    # import the module by name (not ``-m``): as ``__main__`` its functions and their caches
    # would be pickled by value into every task, regenerating the noise each time
    cmd = [sys.executable, "-c", "import sys; from benchmarks.allreduce import main; main(sys.argv[1:])",
           "--worker", contender, "--size", str(size), "--k", str(k), "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"contender": contender, "P": size, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = [l for l in proc.stderr.splitlines() if "Error" in l or "error" in l][-3:]
    return {"contender": contender, "P": size, "error": " | ".join(err) or f"exit {proc.returncode}"}


def main(argv=None):
    global N_PARTITIONS  # (--cluster 2x2: one partition per executor)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    ap.add_argument("--sizes", default="1e5,1e6,1e7,1e8")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--k", type=int, default=8, help="iterations per timed group (one job for rddtensor)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--cluster", choices=("2hosts", "2x2"),
                    help="run on a standalone cluster of two hosts on this machine (2x2: two "
                         "executors on each, 4 partitions)")
    ap.add_argument("--no-fits", action="store_true",
                    help="with --cluster: skip the small model's whole fits")
    ap.add_argument("--fit-from", metavar="JSON",
                    help="only fit the cost model to a results file of an earlier run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, int(a.size), a.k, a.repeats)))
        return
    if a.fit_from:
        with open(a.fit_from) as f:
            run = json.load(f)
        hosts = 2 if "2 hosts" in run["parameters"]["master"] else 1
        model = fit_cost_model(run["results"], hosts, run["parameters"].get("partitions",
                                                                            N_PARTITIONS))
        if model is None:
            raise SystemExit(f"{a.fit_from}: fewer than three sharded/replicated medians at "
                             "P <= 1e7 to fit")
        print(_cost_text(model).strip())
        return
    if a.cluster and not a.quick:
        from rddtensor.spark.testing import multi_host_cluster, unavailable_reason
        why = unavailable_reason(2)
        if why:
            raise SystemExit(f"--cluster {a.cluster}: {why}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        per_host = 2 if a.cluster == "2x2" else 1
        # (the executors unpickle this module's layer: they need the checkout on their path)
        with multi_host_cluster(hosts=2, executors_per_host=per_host,
                                env={"PYTHONPATH": root}) as cluster:
            extra = json.loads(os.environ.get("RDDTENSOR_BENCH_CONF", "{}"))
            os.environ.update({MASTER_ENV: cluster.master, EXECUTORS_ENV: str(cluster.executors),
                               "RDDTENSOR_BENCH_CONF": json.dumps({**cluster.conf, **extra}),
                               "SPARK_LOCAL_IP": "127.0.0.1",
                               PARTITIONS_ENV: str(cluster.executors)})
            N_PARTITIONS = cluster.executors
            return _main(a, f"2 hosts: standalone master, {per_host} 1-core executor(s) on each "
                            "of 127.0.0.2 and 127.0.0.3 (private /dev/shm each)",
                         "_2hosts" if per_host == 1 else "_2x2")
    return _main(a, "local[2]", "")


def fit_cost_model(results: list, hosts: int, partitions: int) -> dict | None:
    """``rddtensor.spark.allreduce.CostModel``'s constants fitted to this run's ``sharded`` and
    ``replicated`` medians up to P = 1e7 (SGD, N = ``partitions``, ``hosts`` hosts; at 1e8
    the machine pages, which no constant describes): non-negative least
    squares of ms per iteration on ``[1, passes, all values, cross values]``
    (``AllReduce.values``: a value across hosts is priced as one within a host plus a
    non-negative extra); ``None`` with fewer than three points. With one executor per host
    (the ``2hosts`` cluster) both strategies send the same values across at N = 2, so only
    their difference in values within a host and in passes tells the prices apart."""
    from scipy.optimize import nnls

    from rddtensor.spark.allreduce import STRATEGIES
    rows, ms, points = [], [], []
    for r in results:
        c = STRATEGIES.get(r.get("contender"))
        if r.get("contender") not in ("sharded", "replicated") or r.get("median_ms") is None \
                or r["P"] > 10**7:  # (1e8 pages)
            continue
        cross, local = c.values(r["P"], partitions, hosts, 0)
        rows.append([1.0, c.passes, local + cross, cross])
        ms.append(r["median_ms"] / 1e3)
        points.append((r["contender"], r["P"]))
    if len(rows) < 3:
        return None
    A, b = np.array(rows), np.array(ms)
    coef, _ = nnls(A, b)
    # (a value across hosts does all a value within one does, and then the network: its price
    # is fitted as the within-host price plus a non-negative extra)
    per_iteration, per_pass, per_local, extra = coef.tolist()
    fitted = {"per_iteration": per_iteration, "per_pass": per_pass,
              "per_local_value": per_local, "per_cross_value": per_local + extra}
    return {"hosts": hosts, "partitions": partitions, **fitted,
            "fitted_ms": {f"{c} {P:.0e}": round(float(f) * 1e3, 1)
                          for (c, P), f in zip(points, A @ coef)}}


def _cost_text(model: dict) -> str:
    fitted = ", ".join(f"{k} {v} ms" for k, v in model["fitted_ms"].items())
    return (f"\n\nCost model fitted on this run (`fit_cost_model`, {model['hosts']} host(s); "
            f"{_constants(model)}): "
            f"per iteration {model['per_iteration'] * 1e3:.1f} ms, per pass "
            f"{model['per_pass'] * 1e3:.1f} ms, per value within a host "
            f"{model['per_local_value'] * 1e9:.2f} ns"
            + (f", per value across hosts {model['per_cross_value'] * 1e9:.2f} ns"
               if model["hosts"] > 1 else "")
            + f" (model's ms per iteration: {fitted}).\n")


def _constants(model: dict) -> str:
    """Which of ``rddtensor.spark.allreduce``'s constants a fit is the source of."""
    if model["hosts"] == 1:
        return "`rddtensor.spark.allreduce.ONE_HOST`"
    if model.get("partitions", N_PARTITIONS) == 2:
        return "`rddtensor.spark.allreduce.HOSTS`"
    return f"N = {model['partitions']}; not the source of `HOSTS`, fitted at N = 2"


def _main(a, master: str, suffix: str):
    sizes = [int(float(s)) for s in ("1e4" if a.quick else a.sizes).split(",")]
    k, repeats = (2, 2) if a.quick else (a.k, a.repeats)
    # quick: one process and one Spark session for all contenders (a JVM start each costs more
    # than the whole measurement at P = 1e4); full: a fresh process per contender
    results = run_inline(a.contenders.split(","), sizes[0], k, repeats) if a.quick else []
    for size in ([] if a.quick else sizes):
        for c in a.contenders.split(","):
            # big sizes: fewer iterations per group so one contender stays within its timeout
            kk, rr = (k, repeats) if size < 10**8 else (max(2, k // 4), min(3, repeats))
            r = run_one(c, size, kk, rr, a.timeout)
            print(json.dumps({x: r.get(x) for x in ("contender", "P", "median_ms", "error")}), flush=True)
            results.append(r)
    fits = []
    if suffix and not a.no_fits:  # the small model's whole fit, here and on local[2]
        local = {k: v for k, v in os.environ.items()
                 if k not in (MASTER_ENV, EXECUTORS_ENV, "RDDTENSOR_BENCH_CONF")}
        for c in ("fit-sharded", "fit-replicated"):
            for where, env in (("2 hosts", None), ("local[2]", local)):
                r = {**run_one(c, 0, 1, 3, a.timeout, env), "where": where}
                print(json.dumps({x: r.get(x) for x in ("contender", "where", "median_ms",
                                                         "error")}), flush=True)
                fits.append(r)
    rows = []
    for size in sizes:
        by = {r["contender"]: r for r in results if r["P"] == size}
        ml = by.get("mllib", {}).get("median_ms")
        for c, r in by.items():
            if "error" in r:
                rows.append([f"{size:.0e}", c, "failed: " + r["error"][:80], "", "", "", "", "", ""])
                continue
            speedup = ml / r["median_ms"] if ml and c != "mllib" else None
            rows.append([f"{size:.0e}", c, r["median_ms"], r["min_ms"], r["max_ms"],
                         f"{speedup:.2f}x" if speedup else "", r.get("median_cpu_ms", ""),
                         r["driver_jvm_peak_heap_mb"], r["driver_python_peak_rss_mb"]])
    table = markdown_table(["P", "contender", "median ms/iter", "min", "max", "vs mllib",
                            "CPU ms/iter (all processes)", "driver JVM peak heap MB",
                            "driver Python peak RSS MB"], rows)
    if fits:
        local = {r["contender"]: r.get("median_ms") for r in fits if r["where"] == "local[2]"}
        table += "\n\nA 3-epoch fit of a 278-parameter MLP, 2,000 rows, batch 200 (ms per fit, 3 fits):\n\n"
        table += markdown_table(
            ["contender", "where", "median ms/fit", "min", "max", "vs local[2]"],
            [[r["contender"], r["where"], r.get("median_ms", r.get("error", "")),
              r.get("min_ms", ""), r.get("max_ms", ""),
              f"{r['median_ms'] / local[r['contender']]:.2f}x"
              if r.get("median_ms") and local.get(r["contender"]) else ""] for r in fits])
    cost = None if a.quick else fit_cost_model(results, 2 if suffix else 1, N_PARTITIONS)
    if cost:
        table += _cost_text(cost)
    payload = {"benchmark": "allreduce", "environment": environment(("numpy", "pyspark")),
               "parameters": {"sizes": sizes, "iterations_per_group": k, "repeats": repeats,
                              "partitions": N_PARTITIONS, "master": master,
                              "driver_memory": "1g",
                              "process_per_contender": not a.quick},
               "command": "python -m benchmarks.allreduce" + (" --quick" if a.quick else "") +
                          (f" --cluster {a.cluster} --sizes {a.sizes}" if suffix else ""),
               "results": results, "fits": fits, "cost_model": cost}
    path = write_results("allreduce" + ("_quick" if a.quick else suffix), payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
