"""Graph models on Spark: a model with several inputs trains on a DataFrame with one column per
input (an id column feeding an ``Embedding``, an array column feeding a ``Dense``), and equals
the in-process fit on the same rows; evaluate and predict read the same columns."""
from __future__ import annotations

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import Adam

pytestmark = pytest.mark.spark

rng = np.random.default_rng(18)
N = 96
IDS = rng.integers(0, 7, size=N)  # a categorical field: one id per row
DENSE = rng.normal(size=(N, 3)).astype(np.float32)
Y = ((IDS % 2 == 0) ^ (DENSE[:, 0] > 0)).astype(np.int64)
FIT = dict(epochs=2, batch_size=24, shuffle=True, seed=5, verbose=0)


def wide_and_deep():
    field = L.Input((1,), name="field")
    dense = L.Input((3,), name="dense")
    emb = L.Flatten()(L.Embedding(7, 4)(field))
    h = L.Concatenate()([emb, L.Dense(4, activation="relu")(dense)])
    m = L.Model([field, dense], L.Dense(2)(h), seed=3)
    m.compile(optimizer=Adam(0.05), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def _frame(spark, names=("field", "dense")):
    """The rows in order, in 2 partitions: an id column, an array column, the label."""
    rows = [(int(i), d.tolist(), int(t)) for i, d, t in zip(IDS, DENSE, Y)]
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, 2),
                                 f"{names[0]} long, {names[1]} array<float>, label long")


def test_two_input_model_on_a_dataframe_equals_in_process(spark):
    ref = wide_and_deep()
    href = ref.fit({"field": IDS[:, None].astype(np.float32), "dense": DENSE}, Y, **FIT)
    m = wide_and_deep()
    df = _frame(spark)
    h = m.fit(df, **FIT)  # columns matched by the inputs' names
    assert h.params["partitions"] == 2
    np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.history["loss"], href.history["loss"], rtol=1e-5)
    # evaluate / predict read the same columns, in one pass
    ev, ev_ref = m.evaluate(df), m.evaluate([IDS[:, None].astype(np.float32), DENSE], Y)
    for k in ev_ref:
        np.testing.assert_allclose(ev[k], ev_ref[k], rtol=1e-5, err_msg=k)
    got = np.stack(m.predict(df).collect())
    np.testing.assert_allclose(got, m.predict([IDS[:, None].astype(np.float32), DENSE]),
                               rtol=1e-5, atol=1e-6)


def test_columns_mapped_explicitly_and_errors_name_them(spark):
    df = _frame(spark, names=("f", "d"))
    m = wide_and_deep()
    h = m.fit(df, features_col={"dense": "d", "field": "f"}, **FIT)
    ref = wide_and_deep()
    ref.fit(df, features_col=["f", "d"], **FIT)  # a list: in input order
    np.testing.assert_array_equal(m.theta, ref.theta)
    assert h.params["partitions"] == 2
    with pytest.raises(ValueError, match=r"inputs \['field', 'dense'\] are read from the "
                                         r"DataFrame's columns of the same names.*'field'"):
        wide_and_deep().fit(df, **FIT)
    with pytest.raises(ValueError, match=r"features_col maps.*no input named 'x'"):
        wide_and_deep().fit(df, features_col={"x": "f", "dense": "d"}, **FIT)
    with pytest.raises(ValueError, match=r"a list of 2 column names"):
        wide_and_deep().fit(df, features_col=["f"], **FIT)
    with pytest.raises(ValueError, match=r"input 0 \(column 'd'\) of shape \(3,\), expected "
                                         r"\(1,\) \(the model's input shape\)"):
        wide_and_deep().fit(df, features_col=["d", "f"], **FIT)
    with pytest.raises(ValueError, match=r"several inputs.*DataFrame.*not an RDD"):
        wide_and_deep().fit(df.rdd, **FIT)


def test_spark_ml_stage_trains_and_scores_a_graph_model(spark, tmp_path):
    """``NNClassifier(network=L.Model(...))``: a graph model with one input (a residual block of
    Dense layers) trains as a Spark ML stage on a vector column, transforms, saves and loads."""
    from pyspark.ml.linalg import Vectors

    from rddtensor.ml import NNClassificationModel, NNClassifier
    x = L.Input((3,))
    h = L.Dense(8, activation="relu")(x)
    h = L.ReLU()(L.Add()([h, L.Dense(8)(h)]))  # a residual connection
    net = L.Model(x, L.Dense(2)(h), seed=1)
    df = spark.createDataFrame([(Vectors.dense(d.tolist()), int(t)) for d, t in zip(DENSE, Y)],
                               ["features", "label"])
    model = NNClassifier(network=net, maxEpoch=2, batchSize=24, learningRate=0.05,
                         seed=2).fit(df)
    scored = model.transform(df).select("prediction", "probability").collect()
    p = np.array([r.probability.toArray() for r in scored])
    np.testing.assert_allclose(p, model.network.predict_proba(DENSE), rtol=1e-5, atol=1e-6)
    model.save(str(tmp_path / "m"))
    again = NNClassificationModel.load(str(tmp_path / "m"))
    np.testing.assert_array_equal(again.network.theta, model.network.theta)
    assert type(again.network).__name__ == type(net).__name__
    with pytest.raises(ValueError, match=r"one output.*outputs \['cls', 'reg'\]"):
        NNClassifier(network=two_heads())  # (several inputs: featuresCols, test_ml_features_cols)


def two_heads(seed=0):
    """One input, two outputs: a 3-class classifier and a 2-value regression."""
    x = L.Input((3,), name="x")
    h = L.Dense(8, activation="relu")(x)
    m = L.Model(x, [L.Dense(3, activation="softmax", name="cls")(h), L.Dense(2, name="reg")(h)],
                seed=seed)
    m.compile(optimizer=Adam(0.02), loss=["sparse_categorical_crossentropy", "mse"],
              loss_weights={"cls": 1.0, "reg": 0.5}, metrics={"cls": "accuracy"})
    return m


CLS = (DENSE[:, 0] > 0).astype(np.int64) + (DENSE[:, 1] > 1)
REG = np.stack([2 * DENSE[:, 0] - DENSE[:, 2], DENSE[:, 1]], 1).astype(np.float32)


def _heads_frame(spark, names=("cls", "reg")):
    """Features, then one label column per output (a long, an array), in 2 partitions."""
    rows = [(d.tolist(), int(c), r.tolist()) for d, c, r in zip(DENSE, CLS, REG)]
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, 2),
                                 f"x array<float>, {names[0]} long, {names[1]} array<float>")


def test_two_output_model_on_a_dataframe_equals_in_process(spark):
    """Each output's labels from its own column (named like the outputs by default), each
    through its own loss; fit, evaluate and predict equal the in-process model's."""
    ref = two_heads()
    href = ref.fit(DENSE, {"cls": CLS, "reg": REG}, **FIT)
    df = _heads_frame(spark)
    m = two_heads()
    h = m.fit(df, features_col="x", **FIT)
    assert h.params["partitions"] == 2 and set(h.history) == {"loss", "cls_accuracy"}
    np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.history["loss"], href.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(h.history["cls_accuracy"], href.history["cls_accuracy"])
    ev, ev_ref = m.evaluate(df, features_col="x"), m.evaluate(DENSE, [CLS, REG])
    assert set(ev) == set(ev_ref)
    for k in ev_ref:
        np.testing.assert_allclose(ev[k], ev_ref[k], rtol=1e-5, err_msg=k)
    rows = m.predict(df, features_col="x").collect()  # a tuple per row: one array per output
    probs, values = m.predict(DENSE)
    np.testing.assert_allclose(np.stack([r[0] for r in rows]), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r[1] for r in rows]), values, rtol=1e-5, atol=1e-6)
    # an RDD of features feeds the one input too (predict reads no labels)
    got = m.predict(spark.sparkContext.parallelize(list(DENSE), 2)).collect()
    np.testing.assert_allclose(np.stack([r[1] for r in got]), values, rtol=1e-5, atol=1e-6)


def test_label_columns_of_several_outputs_mapped_and_checked(spark):
    df = _heads_frame(spark, names=("c", "r"))
    m = two_heads()
    m.fit(df, features_col="x", label_col={"reg": "r", "cls": "c"}, **FIT)
    ref = two_heads()
    ref.fit(df, features_col="x", label_col=["c", "r"], **FIT)  # a list: in output order
    np.testing.assert_array_equal(m.theta, ref.theta)
    with pytest.raises(ValueError, match=r"outputs \['cls', 'reg'\] are read from the "
                                         r"DataFrame's columns of the same names.*'cls'"):
        two_heads().fit(df, features_col="x", **FIT)
    with pytest.raises(ValueError, match=r"label_col maps.*no output named 'y'"):
        two_heads().fit(df, features_col="x", label_col={"y": "c", "reg": "r"}, **FIT)
    bad = df.withColumn("c", df["c"] + 3)  # class 3 and 4 of a 3-class output
    with pytest.raises(ValueError, match=r"labels of output 'cls' \(column 'c'\)"):
        two_heads().fit(bad, features_col="x", label_col=["c", "r"], **FIT)
    with pytest.raises(ValueError, match=r"several outputs.*DataFrame.*not an RDD"):
        two_heads().fit(df.rdd.map(lambda r: (r[0], r[1])), **FIT)
    with pytest.raises(ValueError, match=r"class_weight applies to models with one output.*"
                                         r"weight_col"):  # (before any job)
        two_heads().fit(df, features_col="x", label_col=["c", "r"], class_weight={0: 2.0},
                        **FIT)
