"""``featuresCols``: Spark ML stages for graph models with several inputs, one column per input.

A two-input classifier (an id column feeding an ``Embedding``, a vector from a
``VectorAssembler`` feeding a ``Dense``) is fitted once per module with ``NNClassifier``: its
weights must equal the engine's ``model.fit(df, features_col=[...])`` with the same seed (the
same distributed fit), its ``transform`` the network's in-process ``predict`` on the same rows;
it saves and loads (alone and in a ``PipelineModel``) with its ``featuresCols``; the errors name
the Param to set.
"""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler

from rddtensor import layers as L
from rddtensor.ml import NNClassificationModel, NNClassifier, NNModel, NNRegressor
from rddtensor.optim import Adam

pytestmark = pytest.mark.spark

rng = np.random.default_rng(7)
N = 96
IDS = rng.integers(0, 7, size=N)  # a categorical field: one id per row
DENSE = rng.normal(size=(N, 3))
Y = ((IDS % 2 == 0) ^ (DENSE[:, 0] > 0)).astype(np.int64)
X = [IDS[:, None].astype(np.float32), DENSE.astype(np.float32)]  # in-process, input order
SEED, LR = 5, 0.05
FIT = dict(maxEpoch=2, batchSize=24, learningRate=LR, seed=SEED)


def two_inputs(seed=SEED):
    field = L.Input((1,), name="field")
    dense = L.Input((3,), name="dense")
    emb = L.Flatten()(L.Embedding(7, 4)(field))
    h = L.Concatenate()([emb, L.Dense(4, activation="relu")(dense)])
    return L.Model([field, dense], L.Dense(2)(h), seed=seed)


OUTPUTS = ("rawPrediction", "probability", "prediction")


def by_id(df, names=OUTPUTS) -> dict:
    """``{column: values in id order}`` of ``df`` (one job: sorted here, not by Spark)."""
    rows = sorted(df.select("id", *names).collect(), key=lambda r: r.id)
    return {name: np.array([r[name].toArray() if hasattr(r[name], "toArray") else r[name]
                            for r in rows]) for name in names}


@pytest.fixture(scope="module")
def raw(spark):
    """The rows in order, in 2 partitions: id, the field id, three numbers, the label."""
    rows = [(i, int(f), *map(float, d), int(t)) for i, (f, d, t) in enumerate(zip(IDS, DENSE, Y))]
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, 2),
                                 "id long, user long, a double, b double, c double, label long")


ASSEMBLER = dict(inputCols=["a", "b", "c"], outputCol="vec")


@pytest.fixture(scope="module")
def df(raw):
    return VectorAssembler(**ASSEMBLER).transform(raw)


@pytest.fixture(scope="module")
def fitted(df):
    return NNClassifier(network=two_inputs(seed=1), featuresCols=["user", "vec"], **FIT).fit(df)


@pytest.fixture(scope="module")
def scored(fitted, df):
    """The fitted model's outputs on ``df`` (the default plan), in id order."""
    return by_id(fitted.transform(df))


# --- fit and transform --------------------------------------------------------------------------
def test_fit_equals_the_engines_fit_with_the_same_columns(fitted, df):
    ref = two_inputs()
    ref.compile(optimizer=Adam(LR), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    h = ref.fit(df.select("user", "vec", "label"), features_col=["user", "vec"], epochs=2,
                batch_size=24, seed=SEED, verbose=0)
    np.testing.assert_array_equal(fitted.network.theta, ref.theta)
    assert fitted.history == {k: [float(v) for v in vs] for k, vs in h.history.items()}
    assert fitted.getFeaturesCols() == ["user", "vec"]
    assert type(fitted) is NNClassificationModel and fitted.numClasses == 2


@pytest.mark.parametrize("mode", ["udf", "map"])
def test_transform_equals_predict(fitted, df, scored, mode, monkeypatch):
    from rddtensor.ml import transform as T
    monkeypatch.setattr(T, "MODE", mode)  # the Arrow UDF plan, and mapInArrow (PySpark < 4.1)
    out = fitted.transform(df)
    assert out.columns == df.columns + list(OUTPUTS)
    assert out.schema["probability"].dataType.simpleString() == "vector"
    assert out.schema["prediction"].dataType.typeName() == "double"
    got = scored if mode == "udf" else by_id(out)
    if mode == "map":  # the same rows in the same batches through the same code
        for name in OUTPUTS:
            np.testing.assert_array_equal(got[name], scored[name], err_msg=name)
    net = fitted.network
    logits = net.predict(X)
    np.testing.assert_allclose(got["rawPrediction"], logits - logits.mean(1, keepdims=True),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["probability"], net.predict_proba(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["prediction"], logits.argmax(1))


def test_regressor_prediction_is_the_networks_output(df):
    """``NNModel`` on the fitted network: ``prediction`` (one output: a double) is ``predict``;
    with featuresCols unset, the inputs read the columns named like them."""
    field, dense = L.Input((1,), name="field"), L.Input((3,), name="dense")
    h = L.Concatenate()([L.Flatten()(L.Embedding(7, 2)(field)), dense])
    reg = L.Model([field, dense], L.Dense(1)(h), seed=0).build()
    out = by_id(NNModel(network=reg, featuresCols=["user", "vec"]).transform(df),
                ["prediction"])["prediction"]
    np.testing.assert_allclose(out, reg.predict(X)[:, 0], rtol=1e-6, atol=1e-7)
    named = df.withColumnRenamed("user", "field").withColumnRenamed("vec", "dense")
    again = NNModel(network=reg).transform(named)  # default: the inputs' names
    np.testing.assert_array_equal(by_id(again, ["prediction"])["prediction"], out)


# --- persistence and pipelines ------------------------------------------------------------------
def test_saved_model_keeps_featuresCols_and_predictions(fitted, df, scored, tmp_path):
    path = str(tmp_path / "nn")
    fitted.save(path)
    back = NNModel.load(path)
    assert type(back) is NNClassificationModel and back.uid == fitted.uid
    assert back.getFeaturesCols() == ["user", "vec"] and not back.isSet(back.featuresCol)
    np.testing.assert_array_equal(back.network.theta, fitted.network.theta)
    got = by_id(back.transform(df))
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], scored[name], err_msg=name)
    est = NNClassifier(network=two_inputs(), featuresCols=["user", "vec"])
    est.save(str(tmp_path / "est"))
    assert NNClassifier.load(str(tmp_path / "est")).getFeaturesCols() == ["user", "vec"]


def test_pipeline_with_a_vector_assembler_saves_and_reloads(fitted, raw, scored, tmp_path):
    pipeline = Pipeline(stages=[VectorAssembler(**ASSEMBLER),
                                NNClassifier(network=two_inputs(seed=1),
                                             featuresCols=["user", "vec"], **FIT)])
    model = pipeline.fit(raw)
    nn = model.stages[-1]
    np.testing.assert_array_equal(nn.network.theta, fitted.network.theta)  # the same fit
    path = str(tmp_path / "pipeline")
    model.save(path)
    loaded = PipelineModel.load(path)
    assert loaded.stages[-1].getFeaturesCols() == ["user", "vec"]
    got = by_id(loaded.transform(raw))
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], scored[name], err_msg=name)


# --- Params and errors --------------------------------------------------------------------------
def test_param_is_documented_unset_by_default_and_copied():
    clf = NNClassifier(network=two_inputs())
    assert clf.getFeaturesCols() is None and not clf.isDefined(clf.featuresCols)
    assert "featuresCols: feature columns of a network with several inputs" in \
        clf.explainParams()
    assert "one column per input" in NNClassifier.__doc__ + NNModel.__doc__
    other = clf.copy({clf.featuresCols: ["a", "b"]})
    assert other.getFeaturesCols() == ["a", "b"] and clf.getFeaturesCols() is None
    assert clf.setFeaturesCols(("x", "y")).getFeaturesCols() == ["x", "y"]


@pytest.mark.parametrize("value, message", [
    ("user", "featuresCols takes a list of column names.*for one column set featuresCol"),
    ([], "featuresCols must be a non-empty list"),
    (["a", ""], "featuresCols must be a non-empty list of non-empty column names"),
    ({"field": "user"}, "featuresCols takes a list of column names in the network's input "
                        "order.*not a dict"),
])
def test_bad_values_are_refused_when_set(value, message):
    with pytest.raises(ValueError, match=message):
        NNClassifier(featuresCols=value)


@pytest.mark.parametrize("kwargs, message", [
    ({"featuresCols": ["user"]},
     r"featuresCols=\['user'\] names 1 column\(s\) but the network has 2 input\(s\) "
     r"\['field', 'dense'\]"),
    ({"featuresCols": ["user", "nope"]},
     r"featuresCols\[1\]='nope': the DataFrame has no column 'nope'"),
    ({"featuresCols": ["vec", "user"]},
     r"featuresCols\[1\]='user': a numeric column gives rows of shape \(1,\) but the "
     r"network's input 'dense' expects \(3,\).*input order \['field', 'dense'\]"),
    ({"featuresCols": ["user", "vec"], "featuresCol": "vec"},
     r"featuresCol='vec' and featuresCols=\['user', 'vec'\] are both set and disagree: set "
     r"only featuresCols"),
    ({"featuresCol": "vec"},
     r"featuresCol='vec' names one column but the network has 2 inputs \['field', 'dense'\]: "
     r"set featuresCols"),
    ({}, r"the network has 2 inputs \['field', 'dense'\]: with featuresCols unset they are "
         r"read from the DataFrame's columns of the same names.*no column 'field'.*set "
         r"featuresCols"),
])
def test_fit_and_transform_errors_name_featuresCols(fitted, df, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NNClassifier(network=two_inputs(), **kwargs).fit(df)
    with pytest.raises(ValueError, match=message):  # the model reads the columns alike
        NNClassificationModel(network=fitted.network, **kwargs).transform(df)


def test_one_input_network_takes_featuresCols_of_one_column(df):
    net = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0).build()
    with pytest.raises(ValueError, match=r"featuresCols=\['vec', 'user'\] names 2 column\(s\) "
                                         r"but the network has 1 input"):
        NNRegressor(network=net, featuresCols=["vec", "user"]).fit(df)  # (before any job)
    got = by_id(NNModel(network=net, featuresCols=["vec"]).transform(df), ["prediction"])
    np.testing.assert_allclose(got["prediction"], net.predict(X[1]), rtol=1e-6, atol=1e-7)
    same = NNModel(network=net, featuresCol="vec", featuresCols=["vec"]).transform(df)
    assert "prediction" in same.columns  # both set, and they agree


def test_network_with_several_outputs_is_refused():
    x = L.Input((3,), name="x")
    h = L.Dense(4)(x)
    two_out = L.Model(x, [L.Dense(1)(h), L.Dense(2)(h)])
    with pytest.raises(ValueError, match=r"one output.*outputs \["):
        NNClassifier(network=two_out)
    with pytest.raises(ValueError, match=r"one output.*outputs \["):
        NNModel(network=two_out.build())
