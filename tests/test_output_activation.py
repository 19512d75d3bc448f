"""A sigmoid/softmax output with a cross-entropy: the Keras spellings give correct numbers.

``Dense(1, activation="sigmoid")`` + ``"binary_crossentropy"`` and ``Dense(k,
activation="softmax")`` (or a ``Softmax`` layer) + the categorical losses train on the logits
before the activation (fused, as Keras does), report the loss and metrics of the probabilities,
and predict probabilities; a model without the activation keeps meaning logits; ``from_logits``
overrides. PyTorch is the oracle for every combination; the same holds distributed, in Spark ML
columns (with MLlib's evaluators) and through the command line.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import SGD
from rddtensor.optim.losses import (BinaryCrossentropy, CategoricalCrossentropy,
                          SparseCategoricalCrossentropy, get_loss)

torch = pytest.importorskip("torch")
F = torch.nn.functional

N, D, H = 32, 4, 5


def _data(loss, k, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)).astype(np.float32)
    if loss == "binary_crossentropy":
        y = (rng.random((N, k)) < 0.5).astype(np.float32)
        return X, (y[:, 0] if k == 1 else y)
    labels = rng.integers(0, k, N)
    return X, (labels if loss == "sparse_categorical_crossentropy"
               else np.eye(k, dtype=np.float32)[labels])


def _model(k, head):
    """An MLP whose output ends in ``head``: None, ("dense", act) or ("layer", act)."""
    last = [L.Dense(k)]
    if head is not None and head[0] == "dense":
        last = [L.Dense(k, activation=head[1])]
    elif head is not None:
        last = [L.Dense(k), L.Sigmoid() if head[1] == "sigmoid" else L.Softmax()]
    return L.Sequential([L.Dense(H, activation="relu", input_shape=(D,)), *last], seed=1)


def _torch_net(model):
    w = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in model.get_weights()]

    def pre_activation(X):
        h = torch.relu(torch.as_tensor(X, dtype=torch.float64) @ w[0].T + w[1])
        return h @ w[2].T + w[3]
    return w, pre_activation


def _torch_loss(loss, Z, y, reads):
    """The reference loss of what the model's loss reads: ``"logits"`` or ``"probabilities"``."""
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if loss == "binary_crossentropy":
        y = y.reshape(Z.shape)
        return (F.binary_cross_entropy_with_logits(Z, y) if reads == "logits"
                else F.binary_cross_entropy(Z, y))
    if loss == "sparse_categorical_crossentropy":
        y = F.one_hot(y.long(), Z.shape[1]).double()
    if reads == "logits":
        return F.cross_entropy(Z, y)
    return -(y * torch.log(Z / Z.sum(1, keepdim=True))).sum(1).mean()


def _activate(name, Z):
    return torch.sigmoid(Z) if name == "sigmoid" else torch.softmax(Z, dim=1)


# (loss, outputs, head, from_logits) -> what the loss reads, in PyTorch terms
CASES = []
for _loss, _k, _act in [("binary_crossentropy", 1, "sigmoid"),
                        ("binary_crossentropy", 3, "sigmoid"),
                        ("categorical_crossentropy", 3, "softmax"),
                        ("sparse_categorical_crossentropy", 3, "softmax")]:
    for _head in [None, ("dense", _act), ("layer", _act)]:
        for _from_logits in [None, True, False]:
            if _head is None and _from_logits is False:
                continue  # raw outputs read as probabilities: the loss-level tests below
            CASES.append((_loss, _k, _head, _from_logits))
# an output activation that is not the loss's own: its outputs are probabilities
CASES += [("binary_crossentropy", 3, ("layer", "softmax"), None),
          ("categorical_crossentropy", 3, ("dense", "sigmoid"), None),
          ("sparse_categorical_crossentropy", 3, ("layer", "sigmoid"), None)]


def _reference(loss, head, from_logits):
    """``(transform of the pre-activation Z into what the loss reads, "logits"/"probabilities")``."""
    act = head[1] if head else None
    own = {"binary_crossentropy": "sigmoid"}.get(loss, "softmax")
    if act is None:
        return (lambda Z: Z), "logits"
    if from_logits is True:  # as told: the activated output read as logits
        return (lambda Z: _activate(act, Z)), "logits"
    if act == own:  # fused: the loss reads the logits before the activation
        return (lambda Z: Z), "logits"
    return (lambda Z: _activate(act, Z)), "probabilities"


@pytest.mark.parametrize("loss, k, head, from_logits", CASES)
def test_loss_gradient_and_probabilities_match_pytorch(loss, k, head, from_logits):
    X, y = _data(loss, k)
    model = _model(k, head)
    loss_obj = get_loss(loss) if from_logits is None else \
        get_loss(loss, from_logits=from_logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=SGD(0.5), loss=loss_obj, metrics=["accuracy"])
    told_twice = from_logits is True and head is not None
    assert any("from_logits=True" in str(w.message) for w in caught) == told_twice

    w, pre_activation = _torch_net(model)
    to_read, reads = _reference(loss, head, from_logits)
    Z = to_read(pre_activation(X))
    ref = _torch_loss(loss, Z, y, reads)
    ref.backward()

    # the loss a user reads, at the initial weights
    assert model.evaluate(X, y)["loss"] == pytest.approx(ref.item(), rel=1e-5)
    # probabilities: what the loss reads, through its link
    P = Z.detach() if reads == "probabilities" else (
        torch.sigmoid(Z.detach()) if loss == "binary_crossentropy" else torch.softmax(Z.detach(), 1))
    np.testing.assert_allclose(model.predict_proba(X), P.numpy(), rtol=1e-5, atol=1e-6)
    if head is not None and not told_twice:  # predict: the model's (activated) output
        np.testing.assert_allclose(model.predict(X), _activate(head[1], pre_activation(X))
                                   .detach().numpy(), rtol=1e-5, atol=1e-6)
    # one full-batch SGD step equals PyTorch's
    before = model.get_weights()
    model.fit(X, y, epochs=1, batch_size=N, shuffle=False, verbose=0)
    for a, b, wt in zip(model.get_weights(), before, w):
        np.testing.assert_allclose(a, b - 0.5 * wt.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_cls", [BinaryCrossentropy, CategoricalCrossentropy,
                                      SparseCategoricalCrossentropy])
def test_from_logits_false_reads_probabilities_like_pytorch(loss_cls):
    rng = np.random.default_rng(3)
    if loss_cls is BinaryCrossentropy:
        P = rng.uniform(0.05, 0.95, size=(6, 2))
        y = (rng.random((6, 2)) < 0.5).astype(float)
    else:
        P = rng.dirichlet(np.ones(4), size=6) * rng.uniform(0.5, 2, size=(6, 1))  # unnormalised
        labels = rng.integers(0, 4, 6)
        y = labels if loss_cls is SparseCategoricalCrossentropy else np.eye(4)[labels]
    Pt = torch.tensor(P, requires_grad=True)
    ref = _torch_loss({BinaryCrossentropy: "binary_crossentropy",
                       CategoricalCrossentropy: "categorical_crossentropy",
                       SparseCategoricalCrossentropy: "sparse_categorical_crossentropy"}[loss_cls],
                      Pt, y, "probabilities")
    ref.backward()
    value, dP = loss_cls(from_logits=False)(P, y)
    assert value == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(dP, Pt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_probabilities_at_zero_and_one_stay_finite():
    value, dP = BinaryCrossentropy(from_logits=False)(np.array([0.0, 1.0, 1.0]),
                                                      np.array([1.0, 0.0, 1.0]))
    assert np.isfinite(value) and np.isfinite(dP).all()
    assert value == pytest.approx(2 * -np.log(1e-7) / 3, rel=1e-4)  # Keras' epsilon


def test_from_logits_and_label_smoothing_arguments_are_checked():
    with pytest.raises(ValueError, match="from_logits must be True, False or None"):
        BinaryCrossentropy(from_logits="yes")
    with pytest.raises(ValueError, match="from_logits is a keyword argument"):
        BinaryCrossentropy(True)
    assert get_loss("bce", from_logits=True).get_config() == {
        "name": "binary_crossentropy", "label_smoothing": 0.0, "from_logits": True}


def _separable(n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)).astype(np.float32)
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.float32)


def _sigmoid_net(activation="sigmoid"):
    return L.Sequential([L.Dense(1, activation=activation, input_shape=(2,))], seed=0)


def test_sigmoid_output_reports_its_real_loss_accuracy_and_probabilities():
    """The issue's case: separable data, ``Dense(1, activation="sigmoid")``,
    ``"binary_crossentropy"``: the loss and accuracy reported are those of the predictions."""
    X, y = _separable()
    model = _sigmoid_net()
    model.compile(optimizer=SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(X, y, epochs=10, batch_size=50, verbose=0)
    p = model.predict(X)[:, 0]
    accuracy = float(np.mean((p > 0.5) == y))
    assert accuracy > 0.97
    assert history.history["accuracy"][-1] > 0.95
    result = model.evaluate(X, y)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["loss"] == pytest.approx(
        float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))), rel=1e-4)
    assert result["loss"] < 0.25  # (the sigmoid applied twice reported ~0.5 here)
    proba = model.predict_proba(X)[:, 0]
    np.testing.assert_allclose(proba, p, rtol=1e-6)
    assert proba.min() < 0.05 and proba.max() > 0.95

    # the same model without the activation trains on the same logits: identical weights
    logits_model = _sigmoid_net(activation=None)
    logits_model.compile(optimizer=SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
    logits_model.fit(X, y, epochs=10, batch_size=50, verbose=0)
    for a, b in zip(model.get_weights(), logits_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_saved_model_keeps_the_rule(tmp_path):
    X, y = _separable(100)
    model = _sigmoid_net()
    model.compile(optimizer=SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(X, y, epochs=2, batch_size=50, verbose=0)
    model.save(str(tmp_path / "m"))
    back = L.load_model(str(tmp_path / "m"))
    assert back.loss.fused == "sigmoid"
    assert back.evaluate(X, y) == model.evaluate(X, y)
    np.testing.assert_array_equal(back.predict_proba(X), model.predict_proba(X))


@pytest.mark.spark
def test_distributed_sigmoid_fit_equals_in_process(sc):
    X, y = _separable(400)
    local = _sigmoid_net()
    local.compile(optimizer=SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
    h_local = local.fit(X, y, epochs=3, batch_size=50, verbose=0)
    dist = _sigmoid_net()
    dist.compile(optimizer=SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
    rdd = sc.parallelize(list(zip(X, y)), 2)
    h_dist = dist.fit(rdd, epochs=3, batch_size=50, verbose=0)
    for a, b in zip(dist.get_weights(), local.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_dist.history["loss"], h_local.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(h_dist.history["accuracy"], h_local.history["accuracy"])
    assert h_dist.history["accuracy"][-1] > 0.95
    assert dist.evaluate(rdd)["loss"] == pytest.approx(local.evaluate(X, y)["loss"], rel=1e-5)
    np.testing.assert_allclose(np.stack(dist.predict(rdd).collect()), local.predict(X),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.spark
@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_nnclassifier_columns_with_probability_outputs(spark, output):
    from pyspark.ml.evaluation import (BinaryClassificationEvaluator,
                                       MulticlassClassificationEvaluator)
    from pyspark.ml.linalg import Vectors

    from rddtensor.ml import NNClassifier
    X, y = _separable(400, seed=1)
    df = spark.createDataFrame([(Vectors.dense(x.tolist()), float(t)) for x, t in zip(X, y)],
                               ["features", "label"])
    if output == "sigmoid":
        net = L.Sequential([L.Dense(1, activation="sigmoid", input_shape=(2,))], seed=0)
        loss = "binary_crossentropy"
    else:
        net = L.Sequential([L.Dense(2, input_shape=(2,)), L.Softmax()], seed=0)
        loss = "sparse_categorical_crossentropy"
    clf = NNClassifier(network=net, loss=loss, maxEpoch=4, batchSize=100, learningRate=0.5,
                       optimizer="sgd")
    out = clf.fit(df).transform(df).cache()
    pred = np.array([r.prediction for r in out.select("prediction").collect()])
    assert 0.3 < pred.mean() < 0.7  # both classes predicted
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out)
    assert accuracy > 0.95, accuracy
    assert BinaryClassificationEvaluator().evaluate(out) > 0.99
    P = np.array([r.probability.toArray() for r in out.select("probability").collect()])
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-9)
    assert P[:, 1].min() < 0.1 and P[:, 1].max() > 0.9
    np.testing.assert_array_equal(pred, (P[:, 1] > 0.5).astype(float))


@pytest.mark.spark
def test_cli_train_and_predict_with_a_sigmoid_output(spark, tmp_path, capsys):
    from rddtensor.cli import main
    X, y = _separable(240, seed=2)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b,y\n" + "".join(f"{a:.5f},{b:.5f},{int(t)}\n" for (a, b), t in zip(X, y)))
    config = {"layers": [{"type": "Dense", "units": 1, "activation": "sigmoid"}],
              "compile": {"optimizer": {"class_name": "SGD", "config": {"lr": 0.5}},
                          "loss": "binary_crossentropy", "metrics": ["accuracy"]},
              "fit": {"epochs": 5, "batch_size": 40},
              "data": {"features": ["a", "b"], "label": "y"}}
    (tmp_path / "model.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "model.json"), "--data", str(csv),
                 "--output", str(tmp_path / "model"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "model" / "training.json").read_text())
    assert meta["history"]["accuracy"][-1] > 0.95
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(csv),
                 "--output", str(tmp_path / "pred.parquet")]) == 0
    df = spark.read.parquet(str(tmp_path / "pred.parquet")).toPandas()
    assert float(np.mean(df["prediction"].to_numpy() == df["y"].to_numpy())) > 0.95
