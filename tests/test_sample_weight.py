"""Sample weights: the loss is the weighted mean over each global batch, in-process and
distributed (``fit(sample_weight=...)``, ``fit(rdd_or_df, weight_col=...)``, Spark ML
``weightCol``), checked against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import SGD, Adam

torch = pytest.importorskip("torch")

_rng = np.random.default_rng(11)
X = _rng.normal(size=(48, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)
W = _rng.uniform(0.0, 3.0, size=48).astype(np.float32)
W[[2, 17, 30]] = 0.0  # rows that must not count


def _model(opt="sgd", seed=0):
    m = L.Sequential([L.Dense(6, activation="relu", input_shape=(5,)), L.Dense(2)], seed=seed)
    m.compile(optimizer=SGD(lr=0.2) if opt == "sgd" else Adam(lr=0.01),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.build()
    return m


def _torch_fit(m, X, y, w, batch_size, epochs, opt):
    """The same network, batches (shuffle=False) and optimizer in PyTorch, weighted mean loss."""
    W0 = m.get_weights()
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        for p, v in zip(net.parameters(), W0):
            p.copy_(torch.tensor(v))
    o = torch.optim.SGD(net.parameters(), lr=0.2) if opt == "sgd" else \
        torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for _ in range(epochs):
        for a in range(0, len(X), batch_size):
            xb, yb, wb = (torch.tensor(v[a:a + batch_size]) for v in (X, y, w))
            o.zero_grad()
            per = torch.nn.functional.cross_entropy(net(xb), yb, reduction="none")
            loss = (per * wb).sum() / wb.sum()
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
    return [p.detach().numpy() for p in net.parameters()], losses


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_weighted_mean_loss_equals_pytorch(opt):
    m = _model(opt)
    ref, losses = _torch_fit(m, X, Y, W, batch_size=16, epochs=2, opt=opt)
    h = m.fit(X, Y, sample_weight=W, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(m.get_weights(), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the logged loss is the weighted mean over the epoch's rows (sum w*l / sum w)
    assert h.history["loss"][1] == pytest.approx(
        sum(l * W[16 * i:16 * i + 16].sum() for i, l in enumerate(losses[3:])) / W.sum(),
        rel=1e-5)


def test_unit_weights_are_the_unweighted_fit_bit_for_bit():
    a, b = _model(), _model()
    a.fit(X, Y, batch_size=10, epochs=2, verbose=0, seed=3)
    b.fit(X, Y, sample_weight=np.ones(48), batch_size=10, epochs=2, verbose=0, seed=3)
    np.testing.assert_array_equal(a.theta, b.theta)


def test_scaling_every_weight_changes_nothing_and_zero_weight_rows_do_not_count():
    a, b, c = _model(), _model(), _model()
    a.fit(X, Y, sample_weight=W, batch_size=48, epochs=3, verbose=0)
    b.fit(X, Y, sample_weight=7.5 * W, batch_size=48, epochs=3, verbose=0)
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-5, atol=1e-7)
    Yc = Y.copy()
    Yc[W == 0] = 1 - Yc[W == 0]  # other labels on the zero-weight rows: same training
    c.fit(X, Yc, sample_weight=W, batch_size=48, epochs=3, verbose=0)
    np.testing.assert_array_equal(a.theta, c.theta)


def test_bad_sample_weights_are_refused_before_training():
    m = _model()
    before = m.theta.copy()
    for bad, match in ((np.ones(47), r"shape \(48,\)"), (-W, ">= 0"),
                       (np.where(W > 1, np.nan, W), "finite"), (["a"] * 48, "numbers")):
        with pytest.raises(ValueError, match=f"sample_weight.*{match}"):
            m.fit(X, Y, sample_weight=bad, verbose=0)
    np.testing.assert_array_equal(m.theta, before)


def test_validation_split_splits_the_weights_too():
    a, b = _model(), _model()
    a.fit(X, Y, sample_weight=W, validation_split=0.25, batch_size=12, epochs=2, verbose=0)
    b.fit(X[:36], Y[:36], sample_weight=W[:36], validation_data=(X[36:], Y[36:]),
          batch_size=12, epochs=2, verbose=0)
    np.testing.assert_array_equal(a.theta, b.theta)


# --- distributed: the same weighted mean, with the weights in the data ---------------------------
def _chunked(sc, rows, sizes):
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return sc.parallelize([rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])],
                          len(sizes)).flatMap(lambda c: c)


@pytest.mark.spark
@pytest.mark.parametrize("sizes,allreduce", [([48], "sharded"), ([20, 0, 28], "replicated"),
                                             ([7, 25, 16], "sharded")])
def test_distributed_weighted_fit_equals_in_process(sc, sizes, allreduce):
    local = _model("adam")
    hl = local.fit(X, Y, sample_weight=W, batch_size=12, epochs=2, seed=5, verbose=0)
    dist = _model("adam")
    rows = [(x, int(y), float(w)) for x, y, w in zip(X, Y, W)]
    hd = dist.fit(_chunked(sc, rows, sizes), weight_col="weight", batch_size=12, epochs=2,
                  seed=5, verbose=0, allreduce=allreduce)
    if len(sizes) == 1:  # one partition: the same sums in the same order
        np.testing.assert_array_equal(dist.theta, local.theta)
    else:
        np.testing.assert_allclose(dist.theta, local.theta, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(hd.history["loss"], hl.history["loss"], rtol=1e-5)


@pytest.mark.spark
def test_dataframe_weight_column_and_spark_ml_weightcol(spark):
    from pyspark.ml.linalg import Vectors

    from rddtensor.ml import NNClassifier
    df = spark.createDataFrame([(Vectors.dense(x.tolist()), float(y), float(w))
                                for x, y, w in zip(X, Y, W)], ["features", "label", "w"]) \
        .coalesce(1)
    local = _model("adam")
    local.fit(X, Y, sample_weight=W, batch_size=12, epochs=2, seed=5, verbose=0)
    dist = _model("adam")
    dist.fit(df, weight_col="w", batch_size=12, epochs=2, seed=5, verbose=0)
    np.testing.assert_array_equal(dist.theta, local.theta)
    with pytest.raises(ValueError, match="weight_col"):
        _model().fit(df, weight_col="nope", batch_size=12, verbose=0)
    with pytest.raises(ValueError, match="weight_col="):
        _model().fit(df, sample_weight=W, batch_size=12, verbose=0)
    # Spark ML: the estimator builds its network with seed=5 and trains with the weights
    ref = _model("adam", seed=5)
    ref.fit(X, Y, sample_weight=W, batch_size=12, epochs=2, seed=5, verbose=0)
    est = NNClassifier(network=_model("adam", seed=5), maxEpoch=2, batchSize=12,
                       optimizer="adam", learningRate=0.01, seed=5, weightCol="w")
    fitted = est.fit(df)
    np.testing.assert_allclose(fitted.network.theta, ref.theta, rtol=1e-6, atol=1e-7)
    unweighted = NNClassifier(network=_model("adam", seed=5), maxEpoch=2, batchSize=12,
                              optimizer="adam", learningRate=0.01, seed=5).fit(df)
    assert not np.allclose(unweighted.network.theta, ref.theta)
