"""The command line with graph models: a config's "model" section (``model.get_config()``'s
form), one DataFrame column per input, predict on several inputs."""
import copy
import json
import os

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.cli import build_model, input_columns, load_config, main


def _two_inputs():
    """A two-input classifier, as its config: Dense(a) ++ Dense(b) -> Dense(2)."""
    a, b = L.Input((3,), name="a"), L.Input((2,), name="b")
    h = L.Concatenate(name="merge")([L.Dense(8, activation="relu")(a), L.Dense(4)(b)])
    return L.Model([a, b], L.Dense(2, name="logits")(h)).get_config()


COMPILE = {"optimizer": {"class_name": "Adam", "config": {"lr": 0.05}},
           "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}


# --- config -> model (no Spark) ---------------------------------------------------------------
def test_model_section_builds_the_graph_model_and_yaml_reads_the_same(tmp_path):
    config = {"model": _two_inputs(), "compile": COMPILE}
    (tmp_path / "c.json").write_text(json.dumps(config))
    m = build_model(load_config(str(tmp_path / "c.json")), "c.json")
    assert [s.name for s in m.input_specs] == ["a", "b"] and m.optimizer.lr == 0.05
    assert m.get_config() == config["model"] and m.count_params() == 32 + 12 + 26
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert build_model(load_config(str(tmp_path / "c.yaml"))).get_config() == config["model"]
    # "list" may be left out by hand: a node with several inbound tensors gets a list
    hand = copy.deepcopy(config["model"])
    for node in hand["nodes"]:
        del node["list"]
    assert build_model({"model": hand}).get_config() == config["model"]


def test_config_keys_and_graph_errors_name_the_file_and_the_entry(tmp_path):
    good = _two_inputs()
    (tmp_path / "both.json").write_text(json.dumps({"layers": [], "model": good}))
    with pytest.raises(SystemExit, match=r"both.json: .*both \"layers\".*and \"model\""):
        load_config(str(tmp_path / "both.json"))
    (tmp_path / "neither.json").write_text(json.dumps({"compile": COMPILE}))
    with pytest.raises(SystemExit, match=r"neither.json: .*\"layers\" list.*\"model\" object"):
        load_config(str(tmp_path / "neither.json"))

    def error(change):
        c = copy.deepcopy(good)
        change(c)
        with pytest.raises(SystemExit) as e:
            build_model({"model": c}, "m.json")
        return str(e.value)
    assert error(lambda c: c["layers"][1].update(class_name="Dence")).startswith(
        "m.json: model.layers[1]: unknown layer type 'Dence'")
    assert "model.layers[0] (Dense): invalid config" in error(
        lambda c: c["layers"][0]["config"].update(unitz=3))
    msg = error(lambda c: c["nodes"][2].update(inputs=[2, 7]))
    assert msg.startswith("m.json: model.nodes[2] (layers[2], Concatenate 'merge'): inbound "
                          "tensor 7 is unknown") and "2..3 the outputs of nodes 0..1" in msg
    assert "model.nodes[3] (layers[3], Dense 'logits') on tensor(s) [1]" in error(
        lambda c: c["nodes"][3].update(inputs=[1]))
    assert "model.outputs must be" in error(lambda c: c.update(outputs=[9]))
    assert "model: unknown key(s) ['input']" in error(lambda c: c.update(input=[]))


def test_the_example_graph_config_builds():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "examples", "configs", "two_tower_graph.json")
    m = build_model(load_config(path), path)
    assert [s.name for s in m.input_specs] == ["user", "item"] and m.count_params() == 290


def test_data_features_map_one_column_per_input():
    m = build_model({"model": _two_inputs()})
    assert input_columns(m, None) == {"a": "a", "b": "b"}
    assert input_columns(m, ["x", ["y1", "y2"]]) == {"a": "x", "b": ["y1", "y2"]}
    assert input_columns(m, {"b": "B", "a": "A"}) == {"a": "A", "b": "B"}
    with pytest.raises(SystemExit, match=r"c.json: data.features.*no input named 'c'"):
        input_columns(m, {"a": "x", "b": "y", "c": "z"}, "c.json: data.features")
    with pytest.raises(SystemExit, match=r"2 inputs \['a', 'b'\]"):
        input_columns(m, ["x"])


# --- train -> predict on Spark ----------------------------------------------------------------
@pytest.mark.spark
def test_train_and_predict_a_two_input_graph_model_on_parquet(spark, tmp_path, capsys):
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(200, 3)), rng.normal(size=(200, 2))
    y = (A[:, 0] + B[:, 1] > 0).astype(float)
    data = str(tmp_path / "d.parquet")
    spark.createDataFrame([(i, a.tolist(), b.tolist(), float(t)) for i, (a, b, t)
                           in enumerate(zip(A, B, y))], ["id", "colA", "colB", "y"]) \
        .write.parquet(data)
    config = {"model": _two_inputs(), "compile": COMPILE,
              "data": {"features": {"a": "colA", "b": "colB"}, "label": "y"},
              "fit": {"epochs": 1, "batch_size": 50}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    out = tmp_path / "m"
    assert main(["train", "--config", str(tmp_path / "c.json"), "--data", data,
                 "--output", str(out), "-q"]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    model = L.load_model(str(out))
    assert [s.name for s in model.input_specs] == ["a", "b"]
    assert json.loads((out / "training.json").read_text())["features"] == {"a": "colA",
                                                                          "b": "colB"}
    assert main(["predict", "--model", str(out), "--data", data,
                 "--output", str(tmp_path / "p")]) == 0
    assert "wrote 200 predictions" in capsys.readouterr().out
    df = spark.read.parquet(str(tmp_path / "p")).orderBy("id").toPandas()
    assert list(df.columns) == ["id", "y", "rawPrediction", "probability", "prediction"]
    P = np.stack(df["probability"].map(lambda v: v.toArray()))
    Z = model.predict({"a": A.astype("float32"), "b": B.astype("float32")})
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(P, E / E.sum(axis=1, keepdims=True), atol=1e-5)
    assert np.array_equal(df["prediction"].to_numpy(), Z.argmax(axis=1).astype(float))


@pytest.mark.spark
def test_train_a_two_output_graph_model_reads_a_label_column_per_output(spark, tmp_path, capsys):
    """``data.label`` maps each output to its label column; the saved model equals the same
    fit run through the Python API on the same rows."""
    x = L.Input((3,), name="x")
    h = L.Dense(4, activation="relu")(x)
    config = {"model": L.Model(x, [L.Dense(2, name="cls")(h), L.Dense(1, name="reg")(h)])
              .get_config(),
              "compile": {"optimizer": {"class_name": "SGD", "config": {"lr": 0.1}},
                          "loss": ["sparse_categorical_crossentropy", "mse"]},
              "data": {"features": "x", "label": {"cls": "c", "reg": "r"}},
              "fit": {"epochs": 1, "batch_size": 20, "shuffle": False}}
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3))
    data = str(tmp_path / "d.parquet")
    spark.createDataFrame([(a.tolist(), int(a[0] > 0), [float(a[1])]) for a in X],
                          "x array<float>, c long, r array<float>").coalesce(1) \
        .write.parquet(data)
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--data", data,
                 "--output", str(tmp_path / "m"), "-q"]) == 0
    ref = build_model(config)
    ref.fit(spark.read.parquet(data), features_col="x", label_col=["c", "r"], verbose=0,
            **config["fit"])
    np.testing.assert_array_equal(L.load_model(str(tmp_path / "m")).theta, ref.theta)
    with pytest.raises(SystemExit, match=r"one output.*prediction columns.*\['cls', 'reg'\]"):
        main(["predict", "--model", str(tmp_path / "m"), "--data", data,
              "--output", str(tmp_path / "p")])


def test_data_label_maps_one_column_per_output():
    """``data.label`` of a model with several outputs: named like the outputs by default, a
    list in output order or a dict by output name; errors name the config entry."""
    from rddtensor.cli import label_columns
    x = L.Input((3,), name="x")
    h = L.Dense(4)(x)
    m = L.Model(x, [L.Dense(2, name="cls")(h), L.Dense(1, name="reg")(h)])
    assert label_columns(m, "label") == label_columns(m, None) == ["cls", "reg"]
    assert label_columns(m, ["c", "r"]) == label_columns(m, {"reg": "r", "cls": "c"}) == ["c", "r"]
    with pytest.raises(SystemExit, match=r"c.json: data.label maps.*no output named 'y'"):
        label_columns(m, {"cls": "c", "y": "r"}, "c.json: data.label")
    with pytest.raises(SystemExit, match=r"2 outputs \['cls', 'reg'\]"):
        label_columns(m, "c")
