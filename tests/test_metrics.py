"""Metrics: agreement with scikit-learn, and merged partition states equal one-shot results."""
import doctest
import pickle

import numpy as np
import pytest
from sklearn import metrics as skm

import rddtensor.optim.metrics as metrics_module
from rddtensor.optim.losses import binary_crossentropy, hinge, sparse_categorical_crossentropy
from rddtensor.optim.metrics import (MAE, MSE, RMSE, ROCAUC, Accuracy, ConfusionMatrix, F1, Metric,
                           Precision, Recall, TopKAccuracy, get_metric)

N, C = 600, 6


@pytest.fixture(scope="module")
def multiclass():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((N, C)) * 1.5
    y = rng.integers(0, C, N)
    logits[np.arange(N), y] += 1.0  # better than chance, so the scores carry signal
    return y, sparse_categorical_crossentropy.link(logits)


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, N)
    return y, binary_crossentropy.link(rng.standard_normal(N) * 2 + (2 * y - 1) * 0.8)


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((N, 2))
    return y, y + rng.standard_normal((N, 2)) * 0.3


def test_docstring_examples_run():
    assert doctest.testmod(metrics_module).failed == 0


# --- against scikit-learn -------------------------------------------------------------------

def test_accuracy(multiclass, binary):
    y, P = multiclass
    assert Accuracy()(y, P) == pytest.approx(skm.accuracy_score(y, P.argmax(1)))
    assert Accuracy()(np.eye(C)[y], P) == Accuracy()(y, P)  # one-hot targets
    assert Accuracy()(y[:, None], P) == Accuracy()(y, P)
    yb, p = binary
    expected = skm.accuracy_score(yb, p > 0.5)
    assert Accuracy()(yb, p) == pytest.approx(expected)
    assert Accuracy()(yb[:, None], p[:, None]) == pytest.approx(expected)
    assert Accuracy()(2 * yb - 1, p) == pytest.approx(expected)  # -1/+1 labels


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_accuracy(multiclass, k):
    y, P = multiclass
    expected = skm.top_k_accuracy_score(y, P, k=k, labels=np.arange(C))
    assert TopKAccuracy(k)(y, P) == pytest.approx(expected)
    assert get_metric("top_k_accuracy", k=k)(y, P) == pytest.approx(expected)


def test_top_k_binary(binary):
    y, p = binary
    assert TopKAccuracy(1)(y, p) == Accuracy()(y, p)
    assert TopKAccuracy(2)(y, p) == 1.0


SK_SCORES = {Precision: skm.precision_score, Recall: skm.recall_score, F1: skm.f1_score}


@pytest.mark.parametrize("cls", [Precision, Recall, F1])
@pytest.mark.parametrize("average", [None, "macro", "micro", "weighted"])
def test_precision_recall_f1_multiclass(multiclass, cls, average):
    y, P = multiclass
    expected = SK_SCORES[cls](y, P.argmax(1), average=average or "macro", zero_division=0)
    assert cls(average=average)(y, P) == pytest.approx(expected, abs=1e-12)
    # classes absent from both labels and predictions do not dilute the macro average
    keep = y < 3
    expected = SK_SCORES[cls](y[keep], P[keep].argmax(1), average=average or "macro",
                              zero_division=0)
    assert cls(average=average)(y[keep], P[keep]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("cls", [Precision, Recall, F1])
@pytest.mark.parametrize("average", [None, "binary", "macro", "micro", "weighted"])
def test_precision_recall_f1_binary(binary, cls, average):
    y, p = binary
    expected = SK_SCORES[cls](y, p > 0.5, average=average or "binary", zero_division=0)
    assert cls(average=average)(y, p) == pytest.approx(expected, abs=1e-12)


def test_precision_zero_division_is_zero():
    assert Precision()([1, 1], np.array([0.1, 0.2])) == 0.0  # nothing predicted positive
    assert Recall()([0, 0], np.array([0.1, 0.9])) == 0.0  # no positives


def test_roc_auc_binary_within_1e3_of_sklearn():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 2000)
        for p in [rng.random(2000), binary_crossentropy.link(rng.standard_normal(2000) + y)]:
            assert abs(ROCAUC()(y, p) - skm.roc_auc_score(y, p)) < 1e-3


def test_roc_auc_exact_when_bins_separate_scores():
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.35, 0.4, 0.8, 0.55, 0.05])
    assert ROCAUC()(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-15)
    # all scores in one bin: every pair is a tie
    assert ROCAUC(num_bins=1)(y, p) == 0.5


def test_roc_auc_multiclass_ovr_macro(multiclass):
    y, P = multiclass
    expected = skm.roc_auc_score(y, P, multi_class="ovr", average="macro")
    assert abs(ROCAUC()(y, P) - expected) < 1e-3
    assert abs(get_metric("auc")(np.eye(C)[y], P) - expected) < 1e-3


def test_roc_auc_hinge_link_keeps_ranking():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 1000)
    scores = rng.standard_normal(1000) + y
    assert abs(ROCAUC()(y, hinge.link(scores)) - skm.roc_auc_score(y, scores)) < 1e-3


def test_roc_auc_undefined_is_nan():
    assert np.isnan(ROCAUC()([1, 1, 1], np.array([0.2, 0.5, 0.9])))
    with pytest.raises(ValueError, match="NaN"):
        ROCAUC()([0, 1], np.array([0.2, np.nan]))


def test_regression_metrics(regression):
    y, P = regression
    assert MSE()(y, P) == pytest.approx(skm.mean_squared_error(y, P))
    assert RMSE()(y, P) == pytest.approx(np.sqrt(skm.mean_squared_error(y, P)))
    assert MAE()(y, P) == pytest.approx(skm.mean_absolute_error(y, P))
    y1, P1 = y[:, 0], P[:, :1]  # (n,) against (n, 1): no broadcasting to (n, n)
    assert MSE()(y1, P1) == pytest.approx(skm.mean_squared_error(y1, P1[:, 0]))
    with pytest.raises(ValueError, match=r"shape \(600, 600\).*shape \(600, 1\)"):
        MSE()(np.zeros((N, N)), P1)


def test_confusion_matrix(multiclass, binary):
    y, P = multiclass
    cm = ConfusionMatrix()(y, P)
    assert cm.dtype == np.int64 and cm.shape == (C, C)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, P.argmax(1), labels=range(C)))
    yb, p = binary
    np.testing.assert_array_equal(ConfusionMatrix()(yb, p), skm.confusion_matrix(yb, p > 0.5))
    # classes missing from this data still get their row and column
    np.testing.assert_array_equal(ConfusionMatrix()([0], np.eye(4)[[0]]),
                                  np.diag([1, 0, 0, 0]))


# --- distributed: states merge --------------------------------------------------------------

ALL_CLASSIFICATION = [Accuracy(), TopKAccuracy(2), Precision(), Recall(), F1(),
                      F1(average="micro"), Precision(average="weighted"), ROCAUC(),
                      ConfusionMatrix()]


def merged(metric, y, P):
    """Split into 3 uneven parts (one empty), compute states, merge in a tree, finish."""
    cuts = [len(y) // 5, len(y) // 5]
    states = [metric.state(y[part], P[part]) for part in np.split(np.arange(len(y)), cuts)]
    for s in states:
        assert all(isinstance(a, np.ndarray) for a in s)
        assert sum(a.size for a in s) <= 2 * C * 4096 + 8  # O(classes x bins), never O(rows)
    return metric.result(metric.merge(states[0], metric.merge(states[1], states[2])))


@pytest.mark.parametrize("metric", ALL_CLASSIFICATION, ids=lambda m: m.name)
def test_merge_equals_all_at_once_classification(metric, multiclass, binary):
    for y, P in [multiclass, binary, (binary[0][:, None], binary[1][:, None])]:
        if isinstance(metric, ConfusionMatrix):
            np.testing.assert_array_equal(merged(metric, y, P), metric(y, P))
        else:
            assert merged(metric, y, P) == pytest.approx(metric(y, P), abs=1e-12)


@pytest.mark.parametrize("metric", [MSE(), RMSE(), MAE()], ids=lambda m: m.name)
def test_merge_equals_all_at_once_regression(metric, regression):
    y, P = regression
    assert merged(metric, y, P) == pytest.approx(metric(y, P), rel=1e-12)


def test_state_of_empty_partition():
    P = np.zeros((0, C))
    assert Accuracy().state([], P) == (0, 0)
    assert np.isnan(Accuracy()([], P))
    assert ConfusionMatrix().state(np.zeros(0, dtype=int), P)[0].shape == (C, C)
    assert ROCAUC().state([], P)[0].shape == (C, 4096)


def test_merge_rejects_different_widths():
    a = ConfusionMatrix().state([0], np.eye(3)[[0]])
    b = ConfusionMatrix().state([0], np.eye(4)[[0]])
    with pytest.raises(ValueError, match="different widths"):
        ConfusionMatrix().merge(a, b)


# --- inputs, lookup -------------------------------------------------------------------------

def test_bad_inputs():
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\), got 7 at row 1"):
        Accuracy()([0, 7], np.eye(3)[[0, 1]])
    with pytest.raises(ValueError, match=r"y_true of shape \(3,\).*P of shape \(2, 3\)"):
        Accuracy()([0, 1, 2], np.eye(3)[[0, 1]])
    with pytest.raises(ValueError, match="average='binary' needs binary outputs"):
        F1(average="binary")([0, 1], np.eye(3)[[0, 1]])
    with pytest.raises(ValueError, match="average must be one of"):
        F1(average="samples")
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        TopKAccuracy(0)


def test_get_metric():
    for name, cls in [("accuracy", Accuracy), ("ACC", Accuracy), ("auc", ROCAUC),
                      ("roc_auc", ROCAUC), ("precision", Precision), ("recall", Recall),
                      ("f1", F1), ("f1_score", F1), ("rmse", RMSE), ("mse", MSE), ("mae", MAE),
                      ("confusion_matrix", ConfusionMatrix), ("top5", TopKAccuracy)]:
        assert isinstance(get_metric(name), cls)
    assert get_metric("top5").name == "top_5_accuracy"
    assert get_metric("top_3_accuracy").k == 3
    assert get_metric("top_k_accuracy", k=5).name == "top_5_accuracy"
    assert get_metric("f1", average="micro").name == "f1_micro"
    assert get_metric("precision_weighted").average == "weighted"
    assert get_metric("auc", num_bins=100).num_bins == 100
    acc = Accuracy()
    assert get_metric(acc) is acc
    for metric in ALL_CLASSIFICATION + [RMSE()]:
        config = metric.get_config()
        clone = get_metric(config.pop("name"), **config)
        assert clone.name == metric.name and repr(clone) == repr(metric)
        assert isinstance(pickle.loads(pickle.dumps(metric)), Metric)
    with pytest.raises(ValueError, match=r"unknown metric 'xyz'; known metrics: \[.*'accuracy'"):
        get_metric("xyz")
