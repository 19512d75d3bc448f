"""Soak: 1,000 training iterations on ``local[2]`` leave nothing growing on the driver.

Sampled after every epoch (10 epochs of 100 iterations, 50 iterations per Spark job): the
driver's resident memory (its Python process and its JVM), the RDDs the JVM holds persisted,
the block manager's directories and files (shuffle outputs, spilled blocks) under
``spark.local.dir``, and the open file descriptors of the driver's Python process and JVM. After
warm-up (the first epoch) each must stay flat within a tolerance. The run has its own session in
a subprocess, so that its local directory and process figures are its own; the figures are
printed (``pytest -s``) and written to ``$RDDTENSOR_SOAK_JSON`` when that is set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.spark]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.optim import Adam
    from rddtensor.spark.session import get_spark

    local_dir = sys.argv[1]
    spark = get_spark("local[2]", app_name="rddtensor-soak",
                      conf={"spark.local.dir": local_dir, "spark.default.parallelism": "2"})
    sc = spark.sparkContext
    jvm = int(sc._jvm.java.lang.ProcessHandle.current().pid())

    def rss_mb(pid):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)

    def sample():
        blockmgr = [d for d in os.listdir(local_dir) if d.startswith("blockmgr-")]
        files = sum(len(fs) for d in blockmgr for _, _, fs in os.walk(os.path.join(local_dir, d)))
        return {"t": round(time.time() - t0, 1), "driver_rss_mb": rss_mb("self"),
                "jvm_rss_mb": rss_mb(jvm), "persisted_rdds": len(dict(sc._jsc.getPersistentRDDs())),
                "blockmgr_dirs": len(blockmgr), "block_files": files,
                "driver_fds": len(os.listdir("/proc/self/fd")),
                "jvm_fds": len(os.listdir(f"/proc/{jvm}/fd"))}

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    y = (X[:, :4].sum(axis=1) > 0).astype(np.int64)
    m = L.Sequential([L.Dense(16, activation="relu", input_shape=(8,)), L.Dropout(0.1),
                      L.Dense(2)], seed=0)
    m.compile(optimizer=Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rdd = sc.parallelize(list(zip(X, y)), 2).cache()
    rdd.count()
    t0 = time.time()
    samples = [sample()]
    # 1000 rows / batch 10 = 100 iterations per epoch; 10 epochs; 50 iterations per job
    h = m.fit(rdd, epochs=10, batch_size=10, seed=1, verbose=0, iterations_per_job=50,
              callbacks=[lambda epoch, logs: samples.append(sample())])
    rdd.unpersist()
    out = {"step": m.step, "loss": h.history["loss"], "samples": samples,
           "seconds": round(time.time() - t0, 1), "allreduce": h.params["allreduce"]}
    spark.stop()
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_thousand_iterations_stay_flat(tmp_path):
    env = dict(os.environ)
    env.pop("RDDTENSOR_FAIL_AT", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"soak run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(out, indent=1))
    if os.environ.get("RDDTENSOR_SOAK_JSON"):
        with open(os.environ["RDDTENSOR_SOAK_JSON"], "w") as f:
            json.dump(out, f, indent=1)

    assert out["step"] == 1000 and out["loss"][-1] < out["loss"][0]
    samples = out["samples"]  # before the fit, then after each of the 10 epochs
    warm, after = samples[1], samples[2:]
    for s in after:
        assert s["persisted_rdds"] == warm["persisted_rdds"], s
        assert s["blockmgr_dirs"] == warm["blockmgr_dirs"], s
        # shuffle files of finished iterations are deleted (the engine lets the driver JVM
        # collect garbage every 200 iterations): bounded, not growing with every epoch
        assert s["block_files"] <= 3 * warm["block_files"], s
        assert abs(s["driver_fds"] - warm["driver_fds"]) <= 8, s
        assert abs(s["jvm_fds"] - warm["jvm_fds"]) <= 40, s
    # the driver keeps O(N) stats per iteration, never O(P) per iteration or a growing history
    assert samples[-1]["driver_rss_mb"] - warm["driver_rss_mb"] < 25, samples
