"""In-process training: fit / evaluate / predict do what a user relies on.

Known answers (linear and logistic regression, a linear SVM, an MLP on digits), reproducibility,
History and progress output, the training step itself (manual gradient descent and a PyTorch
Adam reference).
"""
import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.batching import local_batches, step_rng
from rddtensor.training.steps import gradient_step
from rddtensor.optim import SGD, Adam


def separable(n=200, seed=0, margin=0.3):
    """A linearly separable 2-D set with labels 0/1 and a gap around w.x + b = 0."""
    rng = np.random.default_rng(seed)
    w, b = np.array([1.5, -2.0]), 0.5
    X = rng.normal(size=(4 * n, 2))
    score = X @ w + b
    keep = np.abs(score) > margin
    X, score = X[keep][:n], score[keep][:n]
    return X.astype(np.float32), (score > 0).astype(np.int64)


def classifier(seed=0, dropout=0.0, n_in=4, n_hidden=16, n_out=3):
    layers = [L.Dense(n_hidden, activation="relu", input_shape=(n_in,))]
    if dropout:
        layers.append(L.Dropout(dropout))
    layers.append(L.Dense(n_out))
    return L.Sequential(layers, seed=seed)


def blobs(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], np.float32)
    X = (centers[y] + rng.normal(scale=0.7, size=(n, 4))).astype(np.float32)
    return X, y


# --- known answers ------------------------------------------------------------------------------

def test_linear_regression_recovers_coefficients():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 3)).astype(np.float32)
    w_true, b_true = np.array([2.0, -3.0, 0.5]), 1.25
    y = (X @ w_true + b_true + rng.normal(scale=0.01, size=256)).astype(np.float32)
    m = L.Sequential([L.Dense(1, input_shape=(3,))], seed=0)
    m.compile(optimizer=SGD(0.1), loss="mse", metrics=["mae"])
    h = m.fit(X, y, epochs=40, batch_size=32, verbose=0)
    W, b = m.get_weights()
    assert W.shape == (1, 3) and b.shape == (1,)
    np.testing.assert_allclose(W[0], w_true, atol=1e-2)
    np.testing.assert_allclose(b[0], b_true, atol=1e-2)
    # and it agrees with the least-squares solution
    A = np.hstack([X, np.ones((256, 1), np.float32)]).astype(np.float64)
    coef = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(np.r_[W[0], b], coef, atol=5e-3)
    assert h.history["loss"][-1] < 1e-3
    assert h.history["mae"][-1] < 0.03


def test_logistic_regression_separates():
    X, y = separable()
    m = L.Sequential([L.Dense(1, input_shape=(2,))], seed=0)
    m.compile(optimizer=Adam(0.1), loss="binary_crossentropy", metrics=["accuracy"])
    h = m.fit(X, y, epochs=60, batch_size=50, verbose=0)
    score = m.predict(X)
    assert score.shape == (len(X), 1)
    np.testing.assert_array_equal((score[:, 0] > 0).astype(int), y)
    assert h.history["accuracy"][-1] == 1.0
    p = m.predict_proba(X)[:, 0]
    assert ((p > 0.5) == (y == 1)).all() and ((p >= 0) & (p <= 1)).all()
    assert m.evaluate(X, y)["accuracy"] == 1.0


@pytest.mark.parametrize("labels", ["-1/+1", "0/1"])
def test_linear_svm_separates(labels):
    X, y01 = separable(seed=1)
    y = 2 * y01 - 1 if labels == "-1/+1" else y01
    m = L.Sequential([L.Dense(1, input_shape=(2,))], seed=0)
    m.compile(optimizer=SGD(0.05), loss="hinge", metrics=["accuracy"])
    m.fit(X, y, epochs=60, batch_size=20, verbose=0)
    score = m.predict(X)[:, 0]
    np.testing.assert_array_equal(np.sign(score), 2 * y01 - 1)
    assert m.evaluate(X, y)["accuracy"] == 1.0
    # training drives the hinge loss (margin violations) close to zero
    assert m.evaluate(X, y)["loss"] < 0.1


def test_mlp_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    digits = datasets.load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = model_selection.train_test_split(
        X, digits.target, test_size=0.25, random_state=0)
    m = L.Sequential([L.Dense(64, activation="relu", input_shape=(64,)), L.Dense(10)], seed=0)
    m.compile(optimizer=Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    h = m.fit(X_train, y_train, epochs=25, batch_size=32, verbose=0,
              validation_data=(X_test, y_test))
    acc = float((m.predict(X_test).argmax(axis=1) == y_test).mean())
    assert acc >= 0.95
    assert m.evaluate(X_test, y_test)["accuracy"] == pytest.approx(acc)
    assert h.history["val_accuracy"][-1] == pytest.approx(acc)
    assert h.history["loss"][-1] < h.history["loss"][0]


# --- reproducibility ------------------------------------------------------------------------------

def fit_fresh(seed, epochs=3):
    X, y = blobs()
    m = classifier(seed=None, dropout=0.3)  # initialisation, shuffle and dropout from fit's seed
    m.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    h = m.fit(X, y, epochs=epochs, batch_size=16, shuffle=True, seed=seed, verbose=0)
    return m, h


def test_same_seed_bit_identical():
    (a, ha), (b, hb) = fit_fresh(7), fit_fresh(7)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert ha.history == hb.history


def test_different_seed_different_weights():
    (a, _), (b, _) = fit_fresh(7), fit_fresh(8)
    assert not np.array_equal(a.theta, b.theta)


def test_seed_changes_shuffle_and_dropout_not_only_init():
    X, y = blobs()
    thetas = []
    for seed in (1, 2):
        m = classifier(seed=0, dropout=0.3)  # fixed initial weights
        m.compile(optimizer=SGD(0.05), loss="sparse_categorical_crossentropy")
        m.fit(X, y, epochs=1, batch_size=16, seed=seed, verbose=0)
        thetas.append(m.theta.copy())
    assert not np.array_equal(*thetas)


def test_step_counter_continues_across_fits_for_every_optimizer():
    X, y = blobs()
    for opt in (Adam(1e-2), SGD(0.05, momentum=0.9), SGD(0.05)):
        m = classifier()
        m.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        m.fit(X, y, epochs=1, batch_size=16, verbose=0)
        m.fit(X, y, epochs=1, batch_size=16, verbose=0)
        assert m.step == 2 * 96 // 16, type(opt).__name__


# --- History / evaluate / predict -----------------------------------------------------------------

def test_history_and_evaluate():
    X, y = blobs()
    Xv, yv = blobs(n=40, seed=1)
    m = classifier()
    m.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
              metrics=["accuracy", "top_2_accuracy"])
    h = m.fit(X, y, epochs=4, batch_size=16, verbose=0, validation_data=(Xv, yv))
    assert isinstance(h, L.History)
    assert set(h.history) == {"loss", "accuracy", "top_2_accuracy",
                              "val_loss", "val_accuracy", "val_top_2_accuracy"}
    assert all(len(v) == 4 for v in h.history.values())
    assert h.epoch == [0, 1, 2, 3]
    assert h.params["epochs"] == 4 and h.params["batch_size"] == 16
    assert all(0 <= a <= 1 for a in h.history["accuracy"])
    assert h.history["loss"][-1] < h.history["loss"][0]
    ev = m.evaluate(Xv, yv)
    assert set(ev) == {"loss", "accuracy", "top_2_accuracy"}
    for k, v in ev.items():
        assert v == pytest.approx(h.history["val_" + k][-1], rel=1e-6)
    assert h.last()["val_loss"] == h.history["val_loss"][-1]
    # evaluate does not depend on its batch size
    ev_small = m.evaluate(Xv, yv, batch_size=7)
    assert ev_small["accuracy"] == ev["accuracy"]
    assert ev_small["loss"] == pytest.approx(ev["loss"], rel=1e-6)


def test_training_loss_is_mean_over_epoch():
    """With SGD(lr=0), the weights never move, so the epoch loss equals evaluate's loss."""
    X, y = blobs()
    m = classifier()
    m.compile(optimizer=SGD(0.0), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = m.build().theta.copy()
    h = m.fit(X, y, epochs=2, batch_size=10, verbose=0)  # uneven last batch
    np.testing.assert_array_equal(m.theta, before)
    ev = m.evaluate(X, y)
    assert h.history["loss"][0] == pytest.approx(ev["loss"], rel=1e-6)
    assert h.history["accuracy"][0] == ev["accuracy"]


def test_evaluate_without_metrics_returns_loss_only():
    X, y = blobs()
    m = classifier()
    m.compile(loss="sparse_categorical_crossentropy")
    assert set(m.evaluate(X, y)) == {"loss"}


def test_predict_shapes_and_proba():
    X, y = blobs()
    m = classifier()
    m.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy")
    m.fit(X, y, epochs=1, batch_size=16, verbose=0)
    out = m.predict(X)
    assert out.shape == (96, 3) and out.dtype == np.float32
    np.testing.assert_allclose(m.predict(X, batch_size=7), out, rtol=1e-6, atol=1e-6)
    assert m.predict(X[:0]).shape == (0, 3)
    P = m.predict_proba(X)
    assert P.shape == (96, 3)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-6)
    assert (P >= 0).all()
    np.testing.assert_array_equal(P.argmax(axis=1), out.argmax(axis=1))


def test_predict_is_deterministic_with_dropout():
    X, _ = blobs()
    m = classifier(dropout=0.5)
    m.build()
    np.testing.assert_array_equal(m.predict(X), m.predict(X))  # dropout off at inference


def test_callbacks_called_per_epoch():
    X, y = blobs()
    m = classifier()
    m.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    seen = []
    m.fit(X, y, epochs=3, batch_size=32, verbose=0,
          callbacks=[lambda e, logs: seen.append((e, dict(logs)))])
    assert [e for e, _ in seen] == [0, 1, 2]
    assert set(seen[0][1]) == {"loss", "accuracy"}


# --- progress output ------------------------------------------------------------------------------

def test_verbose_1_shows_progress_bar(capsys):
    X, y = blobs()
    m = classifier()
    m.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(X, y, epochs=2, batch_size=16, verbose=1, validation_data=(X, y))
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    final = [seg for seg in err.replace("\n", "\r").split("\r") if seg.strip()][-1]
    assert "epoch 2/2" in final
    assert "loss=" in final and "samples/s" in final
    assert "val_loss=" in final and "accuracy=" in final


def test_verbose_0_prints_nothing(capsys):
    X, y = blobs()
    m = classifier()
    m.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(X, y, epochs=2, batch_size=16, verbose=0, validation_data=(X, y))
    m.evaluate(X, y)
    m.predict(X)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# --- the step: manual gradient descent, gradient splitting, PyTorch -----------------------------

def test_full_batch_sgd_step_is_theta_minus_lr_grad():
    X, y = blobs(n=40)
    m = classifier(seed=3)
    m.compile(optimizer=SGD(0.1), loss="sparse_categorical_crossentropy")
    m.build()
    theta0 = m.theta.copy()
    grad, stats = gradient_step(m, theta0, X, y, loss=m.loss, n_batch=len(X), rng=step_rng(0, 1))
    assert grad.shape == theta0.shape and np.abs(grad).sum() > 0
    assert stats["count"] == len(X)
    m.fit(X, y, epochs=1, batch_size=len(X), shuffle=False, verbose=0)
    assert m.step == 1
    np.testing.assert_allclose(m.theta, theta0 - np.float32(0.1) * grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shuffle", [False, True])
def test_partition_gradients_sum_to_batch_gradient(shuffle):
    """The rule the distributed engine relies on: per-partition gradient_step with the global
    batch size, over local_batches of any partitioning, sums to the whole batch's gradient."""
    X, y = blobs(n=30)
    m = classifier(seed=1)
    m.compile(loss="sparse_categorical_crossentropy")
    m.build()
    n, bs, seed, epoch = len(X), 12, 4, 1
    whole = local_batches(n, bs, seed, epoch, shuffle)
    bounds = [0, 7, 7, 19, 30]
    parts = [(lo, local_batches(n, bs, seed, epoch, shuffle, lo=lo, hi=hi))
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    for s, rows in enumerate(whole):
        g_whole, st = gradient_step(m, m.theta, X[rows], y[rows], loss=m.loss, n_batch=len(rows),
                                    rng=None)
        g_sum, loss_sum = np.zeros_like(g_whole), 0.0
        for lo, p in parts:
            g, st_p = gradient_step(m, m.theta, X[lo + p[s]], y[lo + p[s]], loss=m.loss,
                                    n_batch=len(rows), rng=None)
            g_sum += g
            loss_sum += st_p["loss"]
        np.testing.assert_allclose(g_sum, g_whole, rtol=1e-5, atol=1e-7)
        assert loss_sum == pytest.approx(st["loss"], rel=1e-6)


def test_matches_pytorch_adam():
    torch = pytest.importorskip("torch")
    X, y = blobs(n=64, seed=2)
    m = classifier(seed=5, n_hidden=10)
    lr = 1e-2
    m.compile(optimizer=Adam(lr), loss="sparse_categorical_crossentropy")
    m.build()
    W1, b1, W2, b2 = m.get_weights()

    net = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    with torch.no_grad():
        for p, w in zip(net.parameters(), (W1, b1, W2, b2)):  # identical layouts: (out, in)
            p.copy_(torch.from_numpy(w))
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        opt.step()

    m.fit(X, y, epochs=5, batch_size=len(X), shuffle=False, verbose=0)
    assert m.step == 5
    ref = [p.detach().numpy() for p in net.parameters()]
    for ours, theirs in zip(m.get_weights(), ref):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    # and the weights moved: the comparison is not trivially true
    assert not np.allclose(m.get_weights()[0], W1)


def test_history_plot_writes_a_png_or_says_what_to_install(tmp_path):
    from rddtensor.training.history import History
    h = History()
    for e, (loss, acc) in enumerate([(1.0, 0.5), (0.5, 0.8)]):
        h.record(e, {"loss": loss, "accuracy": acc, "val_loss": loss + 0.1})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            h.plot(str(tmp_path / "curves.png"))
        return
    path = h.plot(str(tmp_path / "curves.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
