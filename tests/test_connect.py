"""``rddtensor.ml`` on Spark Connect: saved from a classic session, scored on Connect.

A classifier is saved from the classic session (the ``spark`` fixture) with the Spark ML
writer. A local Connect server (``SparkSession.builder.remote("local[2]")``) cannot start in a
process that holds a classic SparkContext (PySpark raises ``SESSION_ALREADY_EXIST``), and once a
process has a Connect session its ``pyspark.sql.functions`` build Connect columns, so the Connect
client runs in one subprocess for the whole file. It starts first, so that its server boots
(and its Python workers import rddtensor) while the classic session saves and scores the
model; then it loads the model, transforms the saved test data
(the network inlined in the plan, and again as a session artifact), and tries what Connect
refuses (training, evaluation, saving); the tests read what it wrote.

Skipped where ``pyspark[connect]``'s dependencies (grpcio, grpcio-status,
googleapis-common-protos, zstandard) are not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training import engines

pytestmark = pytest.mark.spark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: pyspark[connect]'s dependencies beyond pandas and pyarrow (import names)
CONNECT_DEPS = ("grpc", "grpc_status", "google.rpc", "zstandard")
COLUMNS = ("prediction", "probability", "rawPrediction")

#: The Connect client: starts its server, then reads one job (JSON, a line on stdin) and
#: writes ``results.json`` and ``<variant>_<column>.npy`` files into the job's ``out``.
CLIENT = textwrap.dedent("""
    import json, os, sys, time, warnings
    warnings.simplefilter("ignore")  # (static confs the client cannot set again)
    t0 = time.time()
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.remote("local[2]")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    from pyspark.sql.functions import udf

    @udf("long")
    def warm(x):  # the server's Python workers import rddtensor while the classic side works
        import rddtensor.ml.transform  # noqa: F401
        return x
    spark.range(2).repartition(2).select(warm("id")).collect()
    started = time.time() - t0
    job = json.loads(sys.stdin.readline())
    import numpy as np
    from rddtensor.ml import NNClassificationModel, NNClassifier, shipping
    out = job["out"]
    results = {"startup_s": started, "session": type(spark).__module__, "errors": {}}

    def keep(variant, frame, columns):
        rows = sorted(frame.collect(), key=lambda r: r.id)  # (no sort job)
        np.save(os.path.join(out, f"{variant}_id.npy"), np.array([r.id for r in rows]))
        for c in columns:
            values = [r[c].toArray() if hasattr(r[c], "toArray") else r[c] for r in rows]
            np.save(os.path.join(out, f"{variant}_{c}.npy"), np.array(values))

    def refused(name, call):
        try:
            call()
            results["errors"][name] = None
        except Exception as e:
            results["errors"][name] = [type(e).__name__, str(e)]

    model = NNClassificationModel.load(job["model"])
    results["loaded"] = [type(model).__name__, model.uid]
    data = spark.read.parquet(job["data"])
    keep("inline", model.transform(data), job["columns"])
    results["inline"] = repr(model._shipped[2])
    shipping.INLINE_MAX = 0  # the same network as a session artifact, under another name
    big = model.copy()       # (another fingerprint: the workers' cache misses and reads it)
    big.network.name = "as-artifact"
    keep("artifact", big.transform(data), job["columns"])
    results["artifact"] = repr(big._shipped[2])
    net = model.network
    keep("predict", net.predict(data).select("id", "prediction"), ["prediction"])
    refused("Sequential.fit", lambda: net.fit(data, epochs=1))
    refused("Sequential.evaluate", lambda: net.evaluate(data))
    refused("NNClassifier.fit", lambda: NNClassifier(network=net).fit(data))
    refused("NNClassificationModel.save", lambda: model.save(os.path.join(out, "again")))
    with open(os.path.join(out, "results.tmp"), "w") as f:
        json.dump(results, f)
    os.rename(os.path.join(out, "results.tmp"), os.path.join(out, "results.json"))
    spark.stop()
""")


def _blobs(n, seed):
    """Three Gaussian blobs in 4 dimensions: ``(X, y)``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(scale=0.7, size=(n, 4)) + np.eye(3, 4)[y] * 2.5
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def connect_client(tmp_path_factory):
    """The Connect client subprocess, started at once (its server boots meanwhile)."""
    for name in CONNECT_DEPS:
        pytest.importorskip(name, reason=f"pyspark[connect] is not installed ({name} is "
                                         "missing): pip install 'pyspark[connect]'")
    import scenarios  # the subprocess JVMs' options: C1 only, for JVMs that live seconds
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                                   if p]),
           # the local server binds an ephemeral port (not 15002) and the client finds it:
           # parallel test runs do not meet on one port
           "SPARK_TESTING": "1",
           "PYSPARK_SUBMIT_ARGS": f'--driver-java-options "{scenarios.JVM_OPTIONS}" '
                                  'pyspark-shell'}
    for var in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE"):
        env.pop(var, None)
    log = open(tmp_path_factory.mktemp("connect") / "client.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    yield proc, log
    if not proc.stdin.closed:  # (no job came: the classic side failed) the client ends at EOF
        proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def classic(connect_client, spark, tmp_path_factory):
    """A classifier saved from the classic session with the Spark ML writer; the test data as
    parquet; the classic session's transform of it (``{column: values}`` in id order).

    The network trains in this process (numpy ``fit``): what Connect reads is the saved
    model, the same whichever engine made its weights, and a distributed fit would add its
    jobs to this file's time (``tests/test_ml_pipeline.py`` saves ``NNClassifier.fit``'s).
    """
    from pyspark.ml.linalg import Vectors
    from rddtensor.ml import NNClassificationModel
    base = tmp_path_factory.mktemp("classic")
    X, y = _blobs(120, seed=0)
    net = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(3)], seed=0)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    net.fit(X, y, epochs=5, batch_size=20, verbose=0)
    model = NNClassificationModel(network=net, inferenceBatchSize=16)
    model.save(str(base / "model"))
    Xt, _ = _blobs(50, seed=1)
    spark.createDataFrame([(i, Vectors.dense(x.tolist())) for i, x in enumerate(Xt)],
                          ["id", "features"]).repartition(2).write.parquet(str(base / "data"))
    rows = sorted(model.transform(spark.read.parquet(str(base / "data"))).collect(),
                  key=lambda r: r.id)
    expected = {c: np.array([r[c].toArray() if hasattr(r[c], "toArray") else r[c]
                             for r in rows]) for c in COLUMNS}
    expected["id"] = np.array([r.id for r in rows])
    return {"dir": str(base), "model": model, "X": Xt, "expected": expected}


@pytest.fixture(scope="module")
def connect(connect_client, classic, tmp_path_factory):
    """``(results, arrays(variant, column))`` of the Connect client's run."""
    proc, log = connect_client
    out = str(tmp_path_factory.mktemp("connect_out"))
    job = {"model": os.path.join(classic["dir"], "model"),
           "data": os.path.join(classic["dir"], "data"), "out": out, "columns": list(COLUMNS)}
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.close()
    path = os.path.join(out, "results.json")
    deadline = time.monotonic() + 300
    # (the results, not the exit: the client stops its server while the tests read them)
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not os.path.exists(path):
        log.seek(0)
        pytest.fail(f"the Spark Connect client failed (exit {proc.poll()}):\n"
                    f"{log.read()[-6000:]}")
    with open(path) as f:
        results = json.load(f)

    def arrays(variant, column):
        return np.load(os.path.join(out, f"{variant}_{column}.npy"))
    return results, arrays


# --- on Spark Connect ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["inline", "artifact"])
def test_saved_model_loads_and_transforms_on_connect_as_on_classic(connect, classic, variant):
    results, arrays = connect
    assert results["session"] == "pyspark.sql.connect.session"
    assert results["loaded"] == ["NNClassificationModel", classic["model"].uid]
    assert results[variant].startswith({"inline": "InlineNetwork(",
                                        "artifact": "ArtifactNetwork(name='rddtensor-network-"}
                                       [variant])
    expected = classic["expected"]
    np.testing.assert_array_equal(arrays(variant, "id"), expected["id"])
    for c in COLUMNS:  # the same rows in the same Arrow batches through the same code
        np.testing.assert_array_equal(arrays(variant, c), expected[c], err_msg=c)


def test_predict_on_connect_appends_the_outputs(connect, classic):
    _, arrays = connect
    net = classic["model"].network
    np.testing.assert_array_equal(arrays("predict", "id"), np.arange(len(classic["X"])))
    np.testing.assert_allclose(arrays("predict", "prediction"), net.predict(classic["X"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", ["Sequential.fit", "NNClassifier.fit", "Sequential.evaluate"])
def test_training_on_connect_stops_with_the_reason(connect, call):
    results, _ = connect
    assert results["errors"][call] is not None, f"{call} on a Connect DataFrame did not refuse"
    kind, message = results["errors"][call]
    assert kind == "ConnectTrainingError"
    assert message.startswith(f"{call} got a Spark Connect DataFrame")
    assert "RDD" in message and "classic Spark session" in message and "transform(df)" in message
    if call == "NNClassifier.fit":
        assert "NNClassificationModel.load(path)" in message


def test_saving_on_connect_refuses_clearly(connect):
    results, _ = connect
    kind, message = results["errors"]["NNClassificationModel.save"]
    assert kind == "NotImplementedError"
    assert "Spark Connect" in message and "classic session" in message


# --- in this process, no Connect needed ---------------------------------------------------------
def test_classic_transform_ships_a_broadcast(spark):
    from pyspark import Broadcast
    from rddtensor.ml import NNModel
    net = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0).build()
    model = NNModel(network=net)
    token, payload = model._ship(spark)
    assert isinstance(payload, Broadcast)
    assert model._ship(spark)[1] is payload  # made once per weights version


class _Frame:
    pass


class _RemoteFrame(_Frame):
    pass


def test_engine_for_takes_the_most_specific_registered_type(monkeypatch):
    here = __name__
    monkeypatch.setattr(engines, "_ENGINES", [])
    engines.register("json", (f"{here}._Frame",))
    engines.register("string", (f"{here}._RemoteFrame",))
    assert engines.engine_for(_RemoteFrame()).__name__ == "string"
    assert engines.engine_for(_Frame()).__name__ == "json"
    assert engines.engine_for(object()) is None


def test_connect_detection_imports_nothing(monkeypatch):
    from rddtensor.spark import connect
    for name in ("pyspark.sql.connect.dataframe", "pyspark.sql.connect.session"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert not connect.is_connect_dataframe(object())
    assert not connect.is_connect_session(object())
    assert "pyspark.sql.connect.dataframe" not in sys.modules
    assert "pyspark.sql.connect.session" not in sys.modules
