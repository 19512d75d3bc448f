"""``rddtensor.ml`` stages inside Spark ML: Pipelines, evaluators, persistence, MLlib stages.

One small pipeline (VectorAssembler -> StandardScaler -> NNClassifier on scikit-learn's digits)
is fitted once per module and shared; the other tests fit a few epochs of tiny networks. Every
fit is a real distributed fit on the session's ``local[2]`` master.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.evaluation import (BinaryClassificationEvaluator,
                                   MulticlassClassificationEvaluator, RegressionEvaluator)
from pyspark.ml.feature import StandardScaler, StringIndexer, VectorAssembler
from pyspark.ml.linalg import Vectors

from rddtensor import layers as L
from rddtensor.ml import (NNClassificationModel, NNClassifier, NNEstimator, NNModel,
                          NNRegressor)

pytestmark = pytest.mark.spark

PIXELS = [f"p{i}" for i in range(64)]


def digits(spark, n=None):
    """Digits as a DataFrame: 64 pixel columns, ``label`` (double) and ``id``; train/test split."""
    import pandas as pd
    from sklearn.datasets import load_digits
    d = load_digits()
    pdf = pd.DataFrame(d.data[:n], columns=PIXELS)
    pdf["label"] = d.target[:n].astype(float)
    pdf["id"] = np.arange(len(pdf))
    df = spark.createDataFrame(pdf).repartition(2)
    return df.filter(df.id % 5 != 0), df.filter(df.id % 5 == 0)


def mlp(n_in=64, n_out=10, hidden=32):
    return L.Sequential([L.Dense(hidden, activation="relu", input_shape=(n_in,)), L.Dense(n_out)])


def column(df, name, order="id"):
    rows = df.orderBy(order).select(name).collect()
    return np.array([r[0].toArray() if hasattr(r[0], "toArray") else r[0] for r in rows])


@pytest.fixture(scope="module")
def data(spark):
    return digits(spark)


@pytest.fixture(scope="module")
def fitted(data):
    train, _ = data
    pipeline = Pipeline(stages=[
        VectorAssembler(inputCols=PIXELS, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        NNClassifier(network=mlp(), maxEpoch=4, batchSize=128, learningRate=1e-2, seed=3)])
    return pipeline.fit(train)


# --- pipelines and evaluators -------------------------------------------------------------------
def test_pipeline_fits_and_predicts(fitted, data):
    _, test = data
    out = fitted.transform(test)
    assert out.schema["prediction"].dataType.typeName() == "double"
    assert out.schema["probability"].dataType.simpleString() == "vector"
    acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out)
    assert acc > 0.85, acc
    log_loss = MulticlassClassificationEvaluator(metricName="logLoss").evaluate(out)
    assert log_loss < 0.6, log_loss
    nn = fitted.stages[-1]
    assert isinstance(nn, NNClassificationModel) and nn.numClasses == 10
    assert len(nn.history["loss"]) == 4 and nn.history["loss"][-1] < nn.history["loss"][0]


@pytest.mark.parametrize("mode", ["udf", "map"])
def test_transform_equals_in_process_predict(fitted, data, mode, monkeypatch):
    from rddtensor.ml import transform as T
    monkeypatch.setattr(T, "MODE", mode)  # the Arrow UDF plan, and mapInArrow (PySpark < 4.1)
    _, test = data
    out = fitted.transform(test)
    assert set(out.columns) == set(test.columns) | {"raw", "features", "rawPrediction",
                                                     "probability", "prediction"}
    net = fitted.stages[-1].network
    X = column(out, "features").astype(np.float32)
    logits = net.predict(X)
    # rawPrediction: the logits centred per row (the same softmax)
    np.testing.assert_allclose(column(out, "rawPrediction"),
                               logits - logits.mean(1, keepdims=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(column(out, "probability"), net.predict_proba(X), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(column(out, "prediction"), logits.argmax(1))


def test_saved_pipeline_model_reloads_and_predicts_identically(fitted, data, tmp_path):
    _, test = data
    path = str(tmp_path / "pipeline")
    fitted.write().overwrite().save(path)
    assert sorted(os.listdir(os.path.join(path, "stages")))[-1].startswith("2_NNClassification")
    stage_dir = os.path.join(path, "stages", sorted(os.listdir(os.path.join(path, "stages")))[-1])
    assert sorted(os.listdir(os.path.join(stage_dir, "network"))) == ["model.json", "weights.npz"]
    loaded = PipelineModel.load(path)
    nn = loaded.stages[-1]
    assert isinstance(nn, NNClassificationModel) and nn.uid == fitted.stages[-1].uid
    assert nn.history == fitted.stages[-1].history
    a, b = fitted.transform(test), loaded.transform(test)
    for name in ("rawPrediction", "probability", "prediction"):
        np.testing.assert_array_equal(column(a, name), column(b, name))


def test_model_save_load_through_hadoop_path_and_overwrite(fitted, tmp_path):
    nn = fitted.stages[-1]
    path = "file://" + str(tmp_path / "nn")
    nn.save(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        nn.save(path)
    nn.write().overwrite().save(path)
    back = NNModel.load(path)  # the base class loads the subclass named in the metadata
    assert type(back) is NNClassificationModel
    for w, v in zip(nn.network.get_weights(), back.network.get_weights()):
        np.testing.assert_array_equal(w, v)
    assert back.getProbabilityCol() == nn.getProbabilityCol()


def test_binary_classifier_with_one_logit(spark, data):
    train, test = (df.filter(df.label < 2) for df in data)
    assembler = VectorAssembler(inputCols=PIXELS, outputCol="features")
    net = L.Sequential([L.Dense(1, input_shape=(64,))])
    clf = NNClassifier(network=net, loss="binary_crossentropy", maxEpoch=3, batchSize=64,
                       learningRate=1e-2)
    model = Pipeline(stages=[assembler, clf]).fit(train)
    assert model.stages[-1].numClasses == 2
    out = model.transform(test)
    auc = BinaryClassificationEvaluator().evaluate(out)
    assert auc > 0.98, auc
    P = column(out, "probability")
    np.testing.assert_allclose(P.sum(1), 1.0)
    np.testing.assert_array_equal(column(out, "prediction"), (P[:, 1] > 0.5).astype(float))


def test_regressor_with_regression_evaluator(spark):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.05 * rng.normal(size=400)
    df = spark.createDataFrame([(Vectors.dense(x), float(t)) for x, t in zip(X, y)],
                               ["features", "label"])
    reg = NNRegressor(network=L.Sequential([L.Dense(1, input_shape=(3,))]), maxEpoch=20,
                      batchSize=200, learningRate=0.2, metrics=["mae"])
    model = reg.fit(df)
    assert type(model) is NNModel and "mae" in model.history
    out = model.transform(df)
    assert out.schema["prediction"].dataType.typeName() == "double"
    rmse = RegressionEvaluator().evaluate(out)
    assert rmse < 0.2, rmse


def test_random_forest_feeding_nn_in_one_pipeline(data):
    train, test = data
    pipeline = Pipeline(stages=[
        VectorAssembler(inputCols=PIXELS, outputCol="pixels"),
        RandomForestClassifier(featuresCol="pixels", numTrees=10, maxDepth=6, seed=1,
                               predictionCol="rf_prediction", probabilityCol="rf_probability",
                               rawPredictionCol="rf_raw"),
        VectorAssembler(inputCols=["pixels", "rf_probability"], outputCol="features"),
        NNClassifier(network=mlp(n_in=74), maxEpoch=3, batchSize=128, learningRate=1e-2)])
    out = pipeline.fit(train).transform(test)
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    acc_nn = evaluator.evaluate(out)
    acc_rf = evaluator.setPredictionCol("rf_prediction").evaluate(out)
    assert acc_nn > 0.85 and acc_rf > 0.7, (acc_nn, acc_rf)


def test_string_labels_through_string_indexer(spark):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 2))
    names = np.where(X[:, 0] + X[:, 1] > 0, "pos", "neg")
    df = spark.createDataFrame([(Vectors.dense(x), str(s)) for x, s in zip(X, names)],
                               ["features", "name"])
    with pytest.raises(ValueError, match="labelCol='name'.*StringIndexer"):
        NNClassifier(network=mlp(2, 2, 8), labelCol="name").fit(df)
    pipeline = Pipeline(stages=[
        StringIndexer(inputCol="name", outputCol="label"),
        NNClassifier(network=mlp(2, 2, 8), maxEpoch=5, batchSize=50, learningRate=0.05)])
    out = pipeline.fit(df).transform(df)
    assert MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out) > 0.9


# --- CrossValidator -----------------------------------------------------------------------------
@pytest.mark.slow
def test_cross_validator_picks_a_model(spark):
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
    train, test = digits(spark, n=800)
    assembler = VectorAssembler(inputCols=PIXELS, outputCol="raw")
    scaler = StandardScaler(inputCol="raw", outputCol="features")
    clf = NNClassifier(network=mlp(hidden=16), maxEpoch=2, seed=0)
    grid = (ParamGridBuilder().addGrid(clf.learningRate, [1e-4, 3e-2])
            .addGrid(clf.batchSize, [32, 128]).build())
    cv = CrossValidator(estimator=Pipeline(stages=[assembler, scaler, clf]),
                        estimatorParamMaps=grid,
                        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
                        numFolds=2, seed=7)
    model = cv.fit(train)
    metrics = np.array(model.avgMetrics)
    assert metrics.shape == (4,)
    best = grid[int(metrics.argmax())]
    assert best[clf.learningRate] == 3e-2, (metrics, best)  # 1e-4 barely moves in 2 epochs
    best_nn = model.bestModel.stages[-1]
    assert isinstance(best_nn, NNClassificationModel)
    acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        model.transform(test))
    assert acc > 0.7, acc


# --- Params, copies, errors ---------------------------------------------------------------------
def test_params_copy_and_explain():
    clf = NNClassifier(network=mlp(), batchSize=64)
    assert clf.getBatchSize() == 64 and clf.getMaxEpoch() == 10 and clf.getSeed() == 0
    assert clf.getLoss() == "sparse_categorical_crossentropy" and clf.getMetrics() == ["accuracy"]
    assert NNRegressor(network=mlp()).getLoss() == "mse"
    text = clf.explainParams()
    for name in ("featuresCol", "labelCol", "batchSize", "maxEpoch", "learningRate", "optimizer",
                 "loss", "seed", "validationSplit", "checkpointDir", "probabilityCol",
                 "rawPredictionCol"):
        assert name in text
    other = clf.copy({clf.learningRate: 0.5})
    assert other.getLearningRate() == 0.5 and clf.getLearningRate() == 1e-3
    assert other.getNetwork() == clf.getNetwork()
    clf.setLearningRate(0.25).setMaxEpoch(3)
    assert (clf.getLearningRate(), clf.getMaxEpoch()) == (0.25, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"batchSize": 0}, "batchSize must be a positive integer, got 0"),
    ({"learningRate": -1.0}, "learningRate must be a positive number"),
    ({"validationSplit": 1.0}, r"validationSplit must be in \[0, 1\)"),
    ({"optimizer": "adamx"}, "optimizer:"),
    ({"loss": "nope"}, "loss:"),
    ({"allreduce": "ring"}, "allreduce must be one of"),
    ({"network": {"layers": []}}, "non-empty 'layers'"),
    ({"network": {"layers": [{"class_name": "Evil", "config": {}}]}}, "Evil"),
])
def test_bad_params_are_refused_when_set(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NNClassifier(**kwargs)


def test_missing_columns_and_network_are_named(spark, data):
    train, _ = data
    with pytest.raises(ValueError, match="featuresCol='features': the DataFrame has no column"):
        NNClassifier(network=mlp()).fit(train)
    df = VectorAssembler(inputCols=PIXELS, outputCol="features").transform(train)
    with pytest.raises(ValueError, match="labelCol='target': the DataFrame has no column"):
        NNClassifier(network=mlp(), labelCol="target").fit(df)
    with pytest.raises(ValueError, match="set network="):
        NNClassifier().fit(df)
    with pytest.raises(ValueError, match="featuresCol='p0': column 'p0' has type double"):
        NNClassificationModel(network=mlp().build(), featuresCol="p0").transform(df)
    with pytest.raises(ValueError, match="predictionCol='label': the DataFrame already has"):
        NNClassificationModel(network=mlp().build(), predictionCol="label").transform(df)


def test_model_copy_owns_its_network_and_empty_output_columns_are_skipped(fitted, data):
    nn = fitted.stages[-1]
    other = nn.copy({nn.probabilityCol: ""})
    assert other.network is not nn.network
    np.testing.assert_array_equal(other.network.theta, nn.network.theta)
    other.network.theta[...] = 0  # the copy's weights are its own
    assert np.abs(nn.network.theta).sum() > 0
    _, test = data
    out = PipelineModel(fitted.stages[:-1] + [other]).transform(test)
    assert "probability" not in out.columns and {"prediction", "rawPrediction"} <= set(out.columns)
    assert set(column(out, "prediction")) == {0.0}  # all-zero weights: class 0 everywhere


def test_estimator_and_unfitted_pipeline_persist(tmp_path, data):
    clf = NNClassifier(network=mlp(), batchSize=64, learningRate=0.02, optimizer="sgd")
    path = str(tmp_path / "clf")
    clf.save(path)
    back = NNClassifier.load(path)
    assert back.uid == clf.uid and back.getNetwork() == clf.getNetwork()
    assert (back.getBatchSize(), back.getLearningRate(), back.getOptimizer()) == (64, 0.02, "sgd")
    pipe = Pipeline(stages=[VectorAssembler(inputCols=PIXELS, outputCol="features"), clf])
    pipe.save(str(tmp_path / "pipe"))
    assert isinstance(Pipeline.load(str(tmp_path / "pipe")).getStages()[-1], NNClassifier)


def test_generic_estimator_with_vector_targets_and_validation_split(spark):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 4))
    df = spark.createDataFrame([(i, Vectors.dense(x), Vectors.dense(2 * x[:3]))
                                for i, x in enumerate(X)], ["id", "features", "y"])
    net = L.Sequential([L.Dense(3, input_shape=(4,))])
    est = NNEstimator(network=net, labelCol="y", loss="mse", maxEpoch=2, batchSize=50,
                      validationSplit=0.25)
    model = est.fit(df)
    assert "val_loss" in model.history and len(model.history["val_loss"]) == 2
    out = model.transform(df)
    assert out.schema["prediction"].dataType.simpleString() == "vector"
    X_sorted = column(out, "features").astype(np.float32)
    np.testing.assert_allclose(column(out, "prediction"), model.network.predict(X_sorted),
                               rtol=1e-5, atol=1e-6)


def test_checkpoint_dir_is_passed_to_the_engine_when_it_takes_one(spark, tmp_path):
    from rddtensor.ml.estimator import engine_accepts
    if not engine_accepts("checkpoint_dir"):
        pytest.skip("this engine's fit has no checkpoint_dir yet: the Param is only stored")
    rng = np.random.default_rng(5)
    X = rng.normal(size=(64, 2))
    df = spark.createDataFrame([(Vectors.dense(x), float(x.sum())) for x in X],
                               ["features", "label"])
    ckpt = tmp_path / "ckpt"
    NNRegressor(network=L.Sequential([L.Dense(1, input_shape=(2,))]), maxEpoch=1, batchSize=32,
                checkpointDir=str(ckpt)).fit(df)
    assert ckpt.exists() and any(ckpt.iterdir())
