"""End to end on ``local-cluster[2,1,1024]``: a standalone master, two workers and two executor
JVMs of one core each, so blocks, shards and shuffles really cross process boundaries.

A second SparkContext cannot live next to the session fixture's, so the cluster run is a
subprocess scenario (``tests/scenarios.py``: it shares one subprocess with the other tests'
scenarios) that emits its result as JSON; the in-process reference is computed here from the
same setup code (``SETUP``). ``SPARK_HOME`` is not needed: pip's pyspark ships
``bin/spark-class`` and ``jars/``, and pyspark finds its own home.
The standalone workers write executor logs to ``$SPARK_HOME/work/<app id>``; the test removes
the directory of its own application afterwards.
"""
from __future__ import annotations

import os
import shutil
import textwrap

import numpy as np
import pytest
import scenarios

# shared by the cluster run and the in-process reference
SETUP = textwrap.dedent("""
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.optim import Adam

    rng = np.random.default_rng(11)
    X = rng.normal(size=(24, 5)).astype(np.float32)
    y = (X[:, 0] - X[:, 3] > 0).astype(np.int64)
    XV = rng.normal(size=(9, 5)).astype(np.float32)
    yv = (XV[:, 0] - XV[:, 3] > 0).astype(np.int64)
    FIT = dict(epochs=2, batch_size=8, shuffle=True, seed=5, verbose=0)

    def make_model():
        m = L.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(2)], seed=4)
        m.compile(optimizer=Adam(0.02), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        return m
""")

SCRIPT = SETUP + textwrap.dedent("""
    import os, time
    from rddtensor.spark.session import get_spark

    spark = get_spark("local-cluster[2,1,1024]", app_name="rddtensor-local-cluster-test")
    sc = spark.sparkContext
    out = {"app_id": sc.applicationId, "spark_home": os.environ.get("SPARK_HOME")}
    try:
        def chunked(rows, sizes):
            b = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            return sc.parallelize([rows[a:z] for a, z in zip(b[:-1], b[1:])],
                                  len(sizes)).flatMap(lambda c: c)

        train = chunked(list(zip(X, y)), [5, 11, 8])
        val = chunked(list(zip(XV, yv)), [4, 0, 5])
        runs = {}
        for allreduce in ("sharded", "replicated"):
            m = make_model()
            h = m.fit(train, validation_data=val, allreduce=allreduce, iterations_per_job=2,
                      **FIT)
            runs[allreduce] = {"theta": m.theta.tolist(), "step": m.step,
                               "slots": {k: v.tolist() for k, v in m.slots.items()},
                               "history": h.history}
        out["runs"] = runs
        out["evaluate"] = m.evaluate(val)
        out["predict"] = np.stack(m.predict(chunked(list(XV), [2, 7, 0])).collect()).tolist()
        # which executors ran tasks: a Python worker's cwd is its executor's work directory
        out["executors"] = sorted(set(sc.parallelize(range(4), 4).map(
            lambda _: (time.sleep(0.3), os.path.basename(os.getcwd()))[1]).collect()))
        out["n_executors"] = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus driver
    finally:
        spark.stop()
    emit(out)
""")
scenarios.register("local_cluster", SCRIPT)


def _cleanup(result):
    """Remove the executor logs the standalone workers wrote for this application."""
    from pyspark.find_spark_home import _find_spark_home
    home = result.get("spark_home") or _find_spark_home()
    app_dir = os.path.join(home, "work", result["app_id"])
    if result["app_id"].startswith("app-") and os.path.isdir(app_dir):
        shutil.rmtree(app_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.scenario("local_cluster")
def test_local_cluster_training_equals_in_process(scenario_results):
    result, _ = scenario_results("local_cluster")
    try:
        ns: dict = {}
        exec(SETUP, ns)
        # two executor JVMs registered, and tasks ran on both of them
        assert result["n_executors"] == 2
        assert len(result["executors"]) == 2, result["executors"]

        ref = ns["make_model"]()
        href = ref.fit(ns["X"], ns["y"], validation_data=(ns["XV"], ns["yv"]), **ns["FIT"])
        for allreduce, run in result["runs"].items():
            assert run["step"] == ref.step == 6, allreduce
            np.testing.assert_allclose(np.float32(run["theta"]), ref.theta, rtol=1e-5,
                                       atol=1e-7, err_msg=allreduce)
            assert sorted(run["slots"]) == sorted(ref.slots)
            for k, v in ref.slots.items():
                np.testing.assert_allclose(np.float32(run["slots"][k]), v, rtol=1e-5, atol=1e-7,
                                           err_msg=f"{allreduce} slot {k}")
            assert sorted(run["history"]) == sorted(href.history)
            for k, v in href.history.items():
                np.testing.assert_allclose(run["history"][k], v, rtol=1e-5,
                                           err_msg=f"{allreduce} {k}")
        ev = ref.evaluate(ns["XV"], ns["yv"])
        for k, v in ev.items():
            np.testing.assert_allclose(result["evaluate"][k], v, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(np.float32(result["predict"]), ref.predict(ns["XV"]),
                                   rtol=1e-5, atol=1e-6)
    finally:
        _cleanup(result)
