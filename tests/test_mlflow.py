"""The MLflow flavor (``rddtensor.mlflow``), used as a user would: log a trained classifier, load
it back as an rddtensor model and as ``python_function`` (pandas frames of feature columns or of
one array column, numpy, ``spark_udf`` over a Spark DataFrame), the ``MLflowLogger`` callback in
an in-process and a distributed fit (read back through ``MlflowClient``), and the errors.

The tracking store is a file store under a temporary directory (MLflow 3 refuses a bare
``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``); nothing is written into the repository.
Tiny models: one ``spark_udf`` and one distributed fit are the expensive parts.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

import rddtensor  # noqa: E402
import rddtensor.mlflow as rmlflow  # noqa: E402
from rddtensor import layers as L  # noqa: E402

ATOL = 1e-6
N_FEATURES = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file tracking store in a temporary directory, for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # (put back after the module)
        mlflow.set_tracking_uri((tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri())
        yield
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES))  # float64, as pandas and Spark hold numbers
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    return X, y


def _classifier(seed=0):
    """Softmax output + sparse categorical cross-entropy: the loss is fused (trains on the
    logits) and ``predict`` returns probabilities."""
    model = L.Sequential([L.Dense(8, activation="relu", input_shape=(N_FEATURES,)),
                          L.Dense(2, activation="softmax")], seed=seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def trained(store):
    """A trained classifier, its data and a copy of it logged to a run (``ModelInfo``)."""
    X, y = _data()
    model = _classifier()
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    with mlflow.start_run():
        info = rmlflow.log_model(model, name="model")
    return model, X, info


def _frames(X):
    columns = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    arrays = pd.DataFrame({"features": list(X)})
    lists = pd.DataFrame({"features": X.tolist()})
    return {"feature columns": columns, "array column": arrays, "list column": lists}


def test_log_model_loads_back_as_rddtensor_and_pyfunc(trained):
    model, X, info = trained
    want = model.predict(X)
    assert info.flavors[rmlflow.FLAVOR_NAME]["data"] == "model"
    assert info.flavors["python_function"]["loader_module"] == "rddtensor.mlflow"

    back = rmlflow.load_model(info.model_uri)
    for w, b in zip(model.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(w, b)
    np.testing.assert_array_equal(back.predict(X), want)
    assert back.loss.name == "sparse_categorical_crossentropy"  # compiled as it was saved

    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    for layout, frame in _frames(X).items():
        got = pyfunc.predict(frame)
        assert isinstance(got, np.ndarray) and got.shape == want.shape, layout
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=layout)
    np.testing.assert_allclose(pyfunc.predict(X), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(want.sum(axis=1), 1.0, atol=1e-5)  # probabilities
    assert pyfunc.get_raw_model().count_params() == model.count_params()


def test_saved_files_are_data_with_pinned_requirements(trained, tmp_path):
    model, X, _ = trained
    path = tmp_path / "saved"
    X32 = X[:3].astype(np.float32)
    rmlflow.save_model(model, path, input_example=X32)
    files = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
    assert {"MLmodel", "model/model.json", "model/weights.npz", "requirements.txt",
            "python_env.yaml", "conda.yaml"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "model/optimizer.npz" not in files  # include_optimizer=False: serving only

    requirements = (path / "requirements.txt").read_text().split()
    assert requirements[0].startswith("mlflow")  # (MLflow's own pin)
    assert {"rddtensor==" + importlib.metadata.version("rddtensor"),
            f"numpy=={np.__version__}", f"pandas=={pd.__version__}"} <= set(requirements)

    meta = mlflow.models.Model.load(str(path / "MLmodel"))
    assert meta.flavors["rddtensor"]["rddtensor_version"] == rddtensor.__version__
    spec = meta.signature.inputs.inputs[0]  # from the example: float32, a dynamic batch
    assert (spec.type, spec.shape) == (np.dtype(np.float32), (-1, N_FEATURES))
    assert meta.signature.outputs.to_dict() == [{"type": "array", "items": {"type": "float"},
                                                 "required": True}]
    np.testing.assert_allclose(mlflow.pyfunc.load_model(str(path)).predict(X32),
                               model.predict(X32), rtol=0, atol=ATOL)


def _run(run_id):
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    # step -> value (MLflow 3 logs the step a model is logged at once more, for the model)
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
               for k in run.data.metrics}
    return run, history


def test_callback_logs_an_in_process_fit(store):
    X, y = _data()
    model = _classifier()
    logger = rmlflow.MLflowLogger(log_models=True, run_name="in-process")
    history = model.fit(X[:32], y[:32], epochs=3, batch_size=16, verbose=0,
                        validation_data=(X[32:], y[32:]), callbacks=[logger])
    assert mlflow.active_run() is None  # it started the run, and ended it
    run, logged = _run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "in-process"
    params = run.data.params
    assert {k: params[k] for k in ("epochs", "batch_size", "engine", "samples", "optimizer",
                                   "loss", "metrics", "param_count", "optimizer.lr")} == {
        "epochs": "3", "batch_size": "16", "engine": "in-process", "samples": "32",
        "optimizer": "Adam", "loss": "sparse_categorical_crossentropy",
        "metrics": "accuracy", "param_count": str(model.count_params()),
        "optimizer.lr": repr(model.optimizer.lr)}
    assert set(logged) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in history.history.items():
        assert sorted(logged[key]) == [0, 1, 2]  # step = epoch
        np.testing.assert_allclose([logged[key][s] for s in range(3)], values, rtol=1e-6)
    # log_models: the trained model, in the run
    back = rmlflow.load_model(f"runs:/{logger.run_id}/model")
    np.testing.assert_array_equal(back.predict(X), model.predict(X))


@pytest.mark.spark
def test_callback_logs_a_distributed_fit_to_the_active_run(store, sc):
    X, y = _data(32)
    rdd = sc.parallelize([(x, int(t)) for x, t in zip(X, y)], 2)
    model = _classifier()
    with mlflow.start_run() as run:
        logger = rmlflow.MLflowLogger()
        history = model.fit(rdd, epochs=2, batch_size=32, verbose=0, callbacks=[logger])
        assert mlflow.active_run().info.run_id == run.info.run_id  # not ended: not its own
    assert logger.run_id == run.info.run_id
    finished, logged = _run(run.info.run_id)
    params = finished.data.params
    assert params["partitions"] == "2" and params["epochs"] == "2"
    assert params["allreduce"] == history.params["allreduce"]
    assert params["engine"].startswith("distributed")
    assert set(logged) == {"loss", "accuracy"}
    for key, values in history.history.items():
        assert sorted(logged[key]) == [0, 1]
        np.testing.assert_allclose([logged[key][s] for s in range(2)], values, rtol=1e-6)


@pytest.mark.spark
def test_spark_udf_equals_predict(trained, spark):
    model, X, info = trained
    # an array column, one partition: one Python worker imports MLflow and loads the model
    df = spark.createDataFrame(pd.DataFrame({"id": np.arange(len(X)), "features": list(X)}))
    predict = mlflow.pyfunc.spark_udf(spark, info.model_uri)  # result type: array<float>
    out = df.coalesce(1).select("id", predict("features").alias("p")).toPandas()
    got = np.stack(out.sort_values("id")["p"])
    np.testing.assert_allclose(got, model.predict(X), rtol=0, atol=ATOL)


def test_errors_say_what_to_do(trained, tmp_path, monkeypatch):
    model, X, _ = trained
    # wrong number of feature columns: ours (no signature) and MLflow's (the signature's check)
    rmlflow.save_model(model, tmp_path / "unsigned", signature=False)
    unsigned = mlflow.pyfunc.load_model(str(tmp_path / "unsigned"))
    np.testing.assert_allclose(unsigned.predict(X.astype(np.float32)), model.predict(X),
                               rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"takes 4 feature column.*got a pandas DataFrame "
                                         r"with 3 columns \['x0', 'x1', 'x2'\]"):
        unsigned.predict(_frames(X)["feature columns"].iloc[:, :3])
    with pytest.raises(ValueError, match=r"column 'features' holds arrays of shape \(3,\)"):
        unsigned.predict(pd.DataFrame({"features": list(X[:, :3])}))
    signed = mlflow.pyfunc.load_model(trained[2].model_uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"had 3 columns.*\(-1, 4\)"):
        signed.predict(_frames(X)["feature columns"].iloc[:, :3])

    unbuilt = L.Sequential([L.Dense(2, input_shape=(N_FEATURES,))])
    with pytest.raises(ValueError, match=r"not built.*model.fit"):
        rmlflow.save_model(unbuilt, tmp_path / "unbuilt")
    assert not (tmp_path / "unbuilt").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        rmlflow.save_model(model, tmp_path / "unsigned")
    with pytest.raises(ValueError, match="not both"):
        rmlflow.log_model(model, "a", name="b")
    other = tmp_path / "other"
    other.mkdir()
    meta = mlflow.models.Model()
    meta.add_flavor("sklearn", pickled_model="model.pkl")
    meta.save(str(other / "MLmodel"))
    with pytest.raises(ValueError, match=r"without the 'rddtensor' flavor \(it has \['sklearn'\]"):
        rmlflow.load_model(str(other))

    # MLflow not installed: the module imports, its functions say how to install it
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setattr(rddtensor, "mlflow", rmlflow)
    monkeypatch.delitem(sys.modules, "rddtensor.mlflow")
    fresh = importlib.import_module("rddtensor.mlflow")
    for call in (lambda: fresh.save_model(model, tmp_path / "none"),
                 lambda: fresh.load_model("runs:/x/model"),
                 lambda: fresh.MLflowLogger().on_train_begin()):
        with pytest.raises(ImportError, match=r"pip install 'rddtensor\[mlflow\]'"):
            call()
