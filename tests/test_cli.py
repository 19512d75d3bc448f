"""The command line a new user meets first: demo, train, predict, info."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rddtensor.cli import build_model, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def test_info_reports_versions_java_master_and_gpus(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rddtensor" in out and "pyspark" in out and "java" in out
    assert "master    local[*]" in out and "GPUs visible" in out


def test_python_dash_m_rddtensor_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "rddtensor", "info", "--master", "spark://h:7077"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "master    spark://h:7077" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rddtensor", "--help"], capture_output=True,
                       text=True, cwd=ROOT, env=_env(), timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("demo", "train", "predict", "info"))


@pytest.mark.slow
def test_demo_trains_a_cnn_distributed_and_saves_model_and_png(spark, tmp_path, capsys, caplog):
    # the demo's own settings; reuses the test session (it only stops a session it started)
    code = main(["demo", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    acc = float(out.split("test accuracy:")[1].split()[0])
    assert acc >= 0.95 and code == 0
    assert (tmp_path / "model" / "model.json").exists()
    assert open(tmp_path / "training_curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    last = [l for l in err.replace("\r", "\n").splitlines() if "epoch 8/8" in l][-1]
    assert "loss=" in last and "val_accuracy=" in last and "samples/s" in last
    assert "Conv2D" in caplog.text  # the model summary goes through logging
    assert not spark.sparkContext._jsc.sc().isStopped()


# --- config -> model --------------------------------------------------------------------------
def test_config_layer_forms_and_errors():
    m = build_model({"layers": [{"type": "Dense", "units": 8, "activation": "relu",
                                 "input_shape": [3]},
                                {"Dropout": {"rate": 0.1}},
                                {"class_name": "Dense", "config": {"units": 2}}],
                     "compile": {"optimizer": {"class_name": "Adam", "config": {"lr": 0.01}},
                                 "loss": "sparse_categorical_crossentropy",
                                 "metrics": ["accuracy"]}})
    assert [type(l).__name__ for l in m.layers] == ["Dense", "Dropout", "Dense"]
    assert m.optimizer.lr == 0.01 and m.count_params() == 8 * 3 + 8 + 2 * 8 + 2
    with pytest.raises(SystemExit, match=r"layers\[1\] \(Densee\).*unknown layer type"):
        build_model({"layers": [{"type": "Dense", "units": 2}, {"type": "Densee"}]})
    with pytest.raises(SystemExit, match=r"layers\[0\] \(Dense\)"):
        build_model({"layers": [{"type": "Dense", "units": 0}]})
    with pytest.raises(SystemExit, match="compile"):
        build_model({"layers": [{"type": "Dense", "units": 2}], "compile": {"loss": "nope"}})


# --- train -> predict round trips -------------------------------------------------------------
def _blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype("float32")
    y = (X[:, 0] + X[:, 1] - X[:, 2] > 0).astype("int64")
    return X, y


CONFIG = {
    "layers": [{"type": "Dense", "units": 16, "activation": "relu"}, {"type": "Dense", "units": 2}],
    "compile": {"optimizer": {"class_name": "Adam", "config": {"lr": 0.02}},
                "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
    "fit": {"epochs": 4, "batch_size": 64, "validation_split": 0.2},
}


@pytest.mark.spark
def test_train_and_predict_csv_round_trip(spark, tmp_path, capsys):
    X, y = _blobs()
    csv = tmp_path / "data.csv"
    with open(csv, "w") as f:
        f.write("id,a,b,c,d,name,y\n")
        for i, (row, label) in enumerate(zip(X, y)):
            f.write(f"{i},{','.join(f'{v:.5f}' for v in row)},row{i},{label}\n")
    config = dict(CONFIG, data={"features": ["a", "b", "c", "d"], "label": "y"})
    (tmp_path / "model.json").write_text(json.dumps(config))
    model_dir = tmp_path / "model"
    assert main(["train", "--config", str(tmp_path / "model.json"), "--data", str(csv),
                 "--output", str(model_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 epochs" in out and "val_accuracy" in out
    assert (model_dir / "model.json").exists() and (model_dir / "training_curves.png").exists()
    meta = json.loads((model_dir / "training.json").read_text())
    assert meta["label"] == "y" and len(meta["history"]["loss"]) == 4

    pred = tmp_path / "pred.parquet"
    assert main(["predict", "--model", str(model_dir), "--data", str(csv),
                 "--output", str(pred)]) == 0
    assert "wrote 240 predictions" in capsys.readouterr().out
    df = spark.read.parquet(str(pred)).orderBy("id").toPandas()
    assert {"id", "a", "name", "y", "prediction", "probability", "rawPrediction"} <= set(df.columns)
    assert "features" not in df.columns and len(df) == 240
    assert float(np.mean(df["prediction"].to_numpy() == df["y"].to_numpy())) >= 0.85
    # an existing output is refused unless --overwrite
    with pytest.raises(Exception):
        main(["predict", "--model", str(model_dir), "--data", str(csv), "--output", str(pred)])
    assert main(["predict", "--model", str(model_dir), "--data", str(csv), "--output",
                 str(pred), "--overwrite"]) == 0


@pytest.mark.spark
def test_train_yaml_config_on_parquet_vectors_and_predict(spark, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from pyspark.ml.linalg import Vectors
    X, y = _blobs(seed=1)
    spark.createDataFrame([(i, Vectors.dense(r.tolist()), float(l)) for i, (r, l)
                           in enumerate(zip(X, y))], ["id", "features", "label"]) \
        .write.parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["train", "--config", str(tmp_path / "model.yaml"), "--data",
                 str(tmp_path / "data.parquet"), "--output", str(tmp_path / "m"), "--quiet",
                 "--epochs", "3"]) == 0
    assert "trained 3 epochs" in capsys.readouterr().out
    assert main(["predict", "--model", str(tmp_path / "m"), "--data",
                 str(tmp_path / "data.parquet"), "--output", str(tmp_path / "p.parquet")]) == 0
    df = spark.read.parquet(str(tmp_path / "p.parquet")).toPandas()
    assert float(np.mean(df["prediction"] == df["label"])) >= 0.85


@pytest.mark.spark
def test_train_libsvm_regression_and_predict(spark, tmp_path, capsys):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 3))
    y = X @ np.array([1.5, -2.0, 0.5]) + 0.3
    with open(tmp_path / "data.libsvm", "w") as f:
        for row, t in zip(X, y):
            f.write(f"{t:.6f} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row)) + "\n")
    config = {"layers": [{"type": "Dense", "units": 1}],
              "compile": {"optimizer": {"class_name": "Adam", "config": {"lr": 0.1}},
                          "loss": "mse"},
              "fit": {"epochs": 30, "batch_size": 50}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--data",
                 str(tmp_path / "data.libsvm"), "--output", str(tmp_path / "m"), "-q"]) == 0
    from rddtensor import layers as L
    W = L.load_model(str(tmp_path / "m")).get_weights()
    np.testing.assert_allclose(W[0].ravel(), [1.5, -2.0, 0.5], atol=0.1)
    assert main(["predict", "--model", str(tmp_path / "m"), "--data",
                 str(tmp_path / "data.libsvm"), "--output", str(tmp_path / "p")]) == 0
    df = spark.read.parquet(str(tmp_path / "p")).toPandas()
    assert set(df.columns) == {"label", "prediction"}
    assert float(np.sqrt(np.mean((df["prediction"] - df["label"]) ** 2))) < 0.2


@pytest.mark.spark
def test_train_and_predict_on_png_images_labelled_by_directory(spark, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    for cls, name in enumerate(["cross", "dot"]):
        os.makedirs(tmp_path / "imgs" / name)
        for i in range(24):
            a = rng.integers(0, 40, size=(8, 8)).astype("uint8")
            if cls == 0:
                a[3:5, :] = 250
                a[:, 3:5] = 250
            else:
                a[2:6, 2:6] = 250
            Image.fromarray(a, mode="L").save(tmp_path / "imgs" / name / f"{i}.png")
    config = {"layers": [{"type": "Conv2D", "filters": 4, "kernel_size": 3, "activation": "relu"},
                         {"type": "Flatten"}, {"type": "Dense", "units": 2}],
              "compile": {"optimizer": {"class_name": "Adam", "config": {"lr": 0.02}},
                          "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
              "fit": {"epochs": 8, "batch_size": 16}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--data",
                 str(tmp_path / "imgs"), "--output", str(tmp_path / "m"), "-q"]) == 0
    assert "accuracy 1.0000" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m" / "training.json").read_text())
    assert meta["classes"] == ["cross", "dot"] and meta["format"] == "image"
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "imgs"),
                 "--output", str(tmp_path / "p")]) == 0
    df = spark.read.parquet(str(tmp_path / "p")).toPandas()
    assert "image" not in df.columns and len(df) == 48
    truth = df["origin"].str.contains("/dot/").astype(float)
    assert float(np.mean(df["prediction"] == truth)) == 1.0


@pytest.mark.spark
def test_train_errors_name_the_problem(spark, tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n1,x,0\n2,y,1\n")
    (tmp_path / "c.json").write_text(json.dumps({"layers": [{"type": "Dense", "units": 2}],
                                                 "data": {"features": ["a", "b"]}}))
    with pytest.raises(SystemExit, match=r"column 'b' has type string"):
        main(["train", "--config", str(tmp_path / "c.json"), "--data", str(tmp_path / "d.csv"),
              "--output", str(tmp_path / "m"), "--label-col", "label", "-q"])
    (tmp_path / "d2.csv").write_text("a,b\n1,2\n2,3\n")
    with pytest.raises(SystemExit, match=r"no label column 'label'"):
        main(["train", "--config", str(tmp_path / "c.json"), "--data", str(tmp_path / "d2.csv"),
              "--output", str(tmp_path / "m"), "-q"])
    with pytest.raises(SystemExit, match=r"no data at"):
        main(["train", "--config", str(tmp_path / "c.json"), "--data", str(tmp_path / "none"),
              "--output", str(tmp_path / "m"), "-q"])
    (tmp_path / "bad.json").write_text("{\"layers\": 3}")
    with pytest.raises(SystemExit, match=r"needs a \"layers\" list"):
        main(["train", "--config", str(tmp_path / "bad.json"), "--data", str(tmp_path / "d.csv"),
              "--output", str(tmp_path / "m")])
