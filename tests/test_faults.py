"""Failures cost time, not the run, and change nothing: failed task attempts (injected with
``RDDTENSOR_FAIL_AT`` on ``local[2,4]``, four attempts per task) and executor JVMs killed with
SIGKILL mid-fit (``local-cluster[2,1,1024]``) end with weights bit-identical to the fault-free
run, for both all-reduce strategies.

Each scenario needs its own master, and a second SparkContext cannot live next to the test
session's, so each is a subprocess scenario (``tests/scenarios.py``: one subprocess runs the
scenarios of all selected tests, one master after another) that emits its results as JSON.
"""
from __future__ import annotations

import os
import re
import shutil
import textwrap

import numpy as np
import pytest
import scenarios

from rddtensor.spark import faults

COMMON = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.optim import Adam
    from rddtensor.spark.session import get_spark

    rng = np.random.default_rng(11)
    X = rng.normal(size=(48, 5)).astype(np.float32)
    y = (X[:, 0] - X[:, 3] > 0).astype(np.int64)
    # 48 rows, batch 8: 6 steps per epoch in jobs of 2 (each scenario picks its epochs)
    FIT = dict(batch_size=8, seed=5, verbose=0, iterations_per_job=2)

    def make_model():
        m = L.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dropout(0.25),
                          L.Dense(2)], seed=4)
        m.compile(optimizer=Adam(0.02), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        return m

    def snapshot(m, h):
        return {"theta": m.theta.tolist(), "step": m.step, "history": h.history,
                "slots": {k: v.tolist() for k, v in m.slots.items()}}
""")

TASK_FAILURES = COMMON + textwrap.dedent("""
    spark = get_spark("local[2,4]", app_name="rddtensor-task-failures")
    sc = spark.sparkContext
    out = {}
    # 2 epochs = 12 steps: enough for every failure below (the first epoch, the first step of
    # the next, the last step); a third epoch added 6 fault-free steps to each of the 4 fits
    FIT["epochs"] = 2
    try:
        train = sc.parallelize(list(zip(X, y)), 3)
        for allreduce in ("sharded", "replicated"):
            m = make_model()
            out[allreduce] = snapshot(m, m.fit(train, allreduce=allreduce, **FIT))
            # step 2: partition 0 fails three times in a row (the fourth attempt runs);
            # step 7 (the first of epoch 2): every partition's first attempt; step 12 (the
            # last): partition 2 once
            os.environ["RDDTENSOR_FAIL_AT"] = "2:0:0,2:0:1,2:0:2,7:*:0,12:2:0"
            try:
                m = make_model()
                out[allreduce + "_faulty"] = snapshot(m, m.fit(train, allreduce=allreduce, **FIT))
            finally:
                del os.environ["RDDTENSOR_FAIL_AT"]
    finally:
        spark.stop()
    emit(out)
""")

EXECUTOR_LOSS = COMMON + textwrap.dedent("""
    import tempfile

    def executor_pids():
        \"\"\"The executor JVMs of this application: descendants of this driver process (the
        standalone workers run inside the driver's JVM and start executors as its children).\"\"\"
        kids = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                kids.setdefault(ppid, []).append(int(p))
        found, todo = [], [os.getpid()]
        while todo:
            for c in kids.get(todo.pop(), []):
                todo.append(c)
                try:
                    cmd = open(f"/proc/{c}/cmdline", "rb").read()
                except OSError:
                    continue
                if b"CoarseGrainedExecutorBackend" in cmd:
                    found.append(c)
        return sorted(found)

    def kill_during_next_job(sc, how_many, log):
        \"\"\"A callback: after epoch 0 (6 steps done), SIGKILL executors once a job runs.\"\"\"
        def kill():
            deadline = time.time() + 60
            while not sc.statusTracker().getActiveJobsIds() and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(0.3)  # inside the job: tasks running, shuffle files written
            pids = executor_pids()[:how_many]
            for p in pids:
                os.kill(p, signal.SIGKILL)
            log.append(pids)

        def callback(epoch, logs):
            if epoch == 0:
                threading.Thread(target=kill, daemon=True).start()
        return callback

    def watch_executors(sc, stop):
        \"\"\"``changed[0]``: when the set of registered executors last changed (polled).\"\"\"
        changed = [time.time()]

        def poll():
            seen = None
            while not stop.wait(0.2):
                try:
                    now = sorted(sc._jsc.sc().getExecutorMemoryStatus().keys().mkString("\\n")
                                 .split("\\n"))
                except Exception:  # the session is stopping
                    return
                if now != seen:
                    seen, changed[0] = now, time.time()
        threading.Thread(target=poll, daemon=True).start()
        return changed

    def wait_for_executors(sc, n, changed):
        # until n executors are registered (the cluster replaces a killed one in seconds), then
        # until spark.storage.cachedPeersTtl (5 s) has passed since the last one registered, so
        # that every executor knows its peers again (a fit since then may have covered it)
        deadline = time.time() + 120
        while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < n and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(max(0.0, changed[0] + 6 - time.time()))

    # 3 epochs = 18 steps: the executors die in epoch 2's first job, and a whole epoch (new
    # shards on the replacement executors) follows the recovery
    FIT["epochs"] = 3
    spark = get_spark("local-cluster[2,1,1024]", app_name="rddtensor-executor-loss")
    sc = spark.sparkContext
    stop_watch = threading.Event()
    changed = watch_executors(sc, stop_watch)
    deadline = time.time() + 120  # the cluster's executor JVMs start after the session
    while (sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < 2 or len(executor_pids()) < 2) \
            and time.time() < deadline:
        time.sleep(0.2)
    out = {"app_id": sc.applicationId, "executors_at_start": executor_pids()}
    try:
        train = sc.parallelize(list(zip(X, y)), 2)
        allreduces = ARGS[0].split(",")
        for allreduce in allreduces:
            m = make_model()
            t = time.time()
            out[allreduce] = snapshot(m, m.fit(train, allreduce=allreduce, **FIT))
            out[allreduce]["seconds"] = time.time() - t
            # one executor dies: the other holds a copy of every parameter block
            wait_for_executors(sc, 2, changed)
            killed = []
            m = make_model()
            t = time.time()
            h = m.fit(train, allreduce=allreduce,
                      callbacks=[kill_during_next_job(sc, 1, killed)], **FIT)
            out[allreduce + "_one_killed"] = {**snapshot(m, h), "killed": killed,
                                               "seconds": time.time() - t}
        # both executors die at once: every copy of the state is gone, the fit reloads its
        # last checkpoint (the cluster restarts executors) and replays
        allreduce = allreduces[0]
        wait_for_executors(sc, 2, changed)
        killed = []
        m = make_model()
        t = time.time()
        h = m.fit(train, allreduce=allreduce, callbacks=[kill_during_next_job(sc, 2, killed)],
                  checkpoint_dir=tempfile.mkdtemp(), checkpoint_every=4, **FIT)
        out[allreduce + "_all_killed"] = {**snapshot(m, h), "killed": killed,
                                           "seconds": time.time() - t}
        out["executors_at_end"] = executor_pids()
    finally:
        stop_watch.set()
        spark.stop()
    emit(out)
""")

scenarios.register("task_failures", TASK_FAILURES)
scenarios.register("executor_loss", EXECUTOR_LOSS, ["sharded,replicated"])


def _assert_bit_identical(got, ref, what, steps):
    np.testing.assert_array_equal(np.float32(got["theta"]), np.float32(ref["theta"]),
                                  err_msg=what)
    assert got["step"] == ref["step"] == steps, what
    for k in ref["slots"]:
        np.testing.assert_array_equal(np.float32(got["slots"][k]), np.float32(ref["slots"][k]),
                                      err_msg=f"{what} slot {k}")
    assert got["history"] == ref["history"], what


# --- the hook -----------------------------------------------------------------------------------
def test_parse_rules():
    assert faults.parse("3:1:0, 4:*:*") == ((3, 1, 0), (4, None, None))
    assert faults.parse("") == ()
    for bad in ("3:1", "a:1:0", "3:1:0:2", "-1:0:0"):
        with pytest.raises(ValueError, match=r"RDDTENSOR_FAIL_AT: expected "
                                             r"step:partition:attempt"):
            faults.parse(bad)


def test_unset_hook_uses_the_plain_accumulator(sc, monkeypatch):
    from rddtensor.spark.stages import StatsParam
    monkeypatch.delenv(faults.ENV, raising=False)
    assert type(faults.stats_param(sc)) is StatsParam
    monkeypatch.setenv(faults.ENV, "1:0:0")
    p = faults.stats_param(sc)
    assert isinstance(p, faults.FailingStats) and p.rules == ((1, 0, 0),)
    assert p.addInPlace({}, {(1, 0): "s"}) == {(1, 0): "s"}  # on the driver it never raises


# --- task failures: retried attempts change nothing ---------------------------------------------
@pytest.mark.spark
@pytest.mark.scenario("task_failures")
def test_injected_task_failures_are_retried_bit_identically(scenario_results):
    out, log = scenario_results("task_failures")
    for allreduce in ("sharded", "replicated"):
        _assert_bit_identical(out[allreduce + "_faulty"], out[allreduce], allreduce, 12)
    # the failures happened: Spark logged each failed attempt with the injected message
    seen = set(re.findall(r"injected task failure at step (\d+), partition (\d+), attempt (\d+)",
                          log))
    want = {("2", "0", "0"), ("2", "0", "1"), ("2", "0", "2"), ("12", "2", "0")}
    want |= {("7", str(j), "0") for j in range(3)}
    assert want <= seen, sorted(seen)


# --- executor loss ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.scenario("executor_loss")
def test_killed_executors_cost_time_not_the_run(scenario_results):
    out, log = scenario_results("executor_loss")
    try:
        assert len(out["executors_at_start"]) == 2
        for allreduce in ("sharded", "replicated"):
            got = out[allreduce + "_one_killed"]
            assert len(got["killed"]) == 1 and len(got["killed"][0]) == 1, got["killed"]
            _assert_bit_identical(got, out[allreduce], f"{allreduce}, one executor killed", 18)
        got = out["sharded_all_killed"]
        assert len(got["killed"]) == 1 and len(got["killed"][0]) == 2, got["killed"]
        _assert_bit_identical(got, out["sharded"], "both executors killed", 18)
        assert "reloading" in log and "replaying" in log  # it went back to the checkpoint
        assert len(out["executors_at_end"]) == 2  # the cluster replaced the killed executors
        print({k: round(v["seconds"], 1) for k, v in out.items()
               if isinstance(v, dict) and "seconds" in v})
    finally:
        from pyspark.find_spark_home import _find_spark_home
        app_dir = os.path.join(_find_spark_home(), "work", out["app_id"])
        if out["app_id"].startswith("app-") and os.path.isdir(app_dir):
            shutil.rmtree(app_dir, ignore_errors=True)
