"""Whole convolutional models on the sklearn digits images (8x8, one channel).

(a) a small CNN classifies them (>= 0.97 test accuracy), (b) a convolutional autoencoder learns
to reconstruct them, (c) distributed ``fit`` on an RDD equals in-process ``fit`` for a CNN.
"""
import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.layers.conv import Conv2D, Conv2DTranspose
from rddtensor.layers.pooling import MaxPool2D, UpSampling2D
from rddtensor.optim import Adam


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split
    d = datasets.load_digits()
    X = (d.data.reshape(-1, 1, 8, 8) / 16).astype(np.float32)
    return train_test_split(X, d.target, test_size=0.25, random_state=0)  # Xtr, Xte, ytr, yte


@pytest.fixture
def one_blas_thread():
    """These GEMMs are tiny (at most 32 x 288 x 2048): BLAS threads only add overhead, and on a
    busy 2-core machine spinning OpenBLAS threads make them 10-30x slower. Results are the same
    up to float rounding."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def test_small_cnn_classifies_digits(digits, one_blas_thread):
    Xtr, Xte, ytr, yte = digits
    model = L.Sequential([
        Conv2D(32, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
        MaxPool2D(2),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10),
    ], seed=0)
    model.compile(optimizer=Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(Xtr, ytr, epochs=15, batch_size=32, seed=0, verbose=0)
    assert model.evaluate(Xte, yte)["accuracy"] >= 0.97


def test_conv_autoencoder_reconstructs_digits(digits, one_blas_thread):
    """Encoder 1x8x8 -> 16x2x2 (conv, max-pool, strided conv), decoder back through
    UpSampling2D and Conv2DTranspose. The test-set reconstruction MSE after training must be at
    most 1/5 of the same model's MSE at initialisation, and at most half of the MSE of always
    predicting the mean training image (so it learned more than the mean)."""
    Xtr, Xte, _, _ = digits
    model = L.Sequential([
        Conv2D(16, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),  # 16x8x8
        MaxPool2D(2),                                                             # 16x4x4
        Conv2D(16, 3, strides=2, padding=1, activation="relu"),                   # 16x2x2
        UpSampling2D(2),                                                          # 16x4x4
        Conv2DTranspose(16, 2, strides=2, activation="relu"),                     # 16x8x8
        Conv2D(1, 3, padding="same"),                                             # 1x8x8
    ], seed=0)
    model.compile(optimizer=Adam(3e-3), loss="mse")
    model.build()

    def mse():
        return float(np.mean((model.predict(Xte) - Xte) ** 2))

    mse_init = mse()
    model.fit(Xtr, Xtr, epochs=15, batch_size=32, seed=0, verbose=0)
    mse_trained = mse()
    mse_mean_image = float(np.mean((Xtr.mean(axis=0) - Xte) ** 2))
    assert mse_trained <= mse_init / 5
    assert mse_trained <= mse_mean_image / 2
    assert model.evaluate(Xte, Xte)["loss"] == pytest.approx(mse_trained, rel=1e-5)


@pytest.mark.spark
def test_distributed_fit_equals_in_process(sc, digits):
    Xtr, _, ytr, _ = digits
    X, y = Xtr[:48], ytr[:48]

    def cnn():
        model = L.Sequential([
            Conv2D(4, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
            MaxPool2D(2),
            Conv2D(4, 3, strides=2, padding=1, groups=2, activation="relu"),
            L.Flatten(),
            L.Dense(10),
        ], seed=1)
        model.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    ref = cnn()
    ref.fit(X, y, epochs=1, batch_size=24, seed=3, verbose=0)  # 2 steps
    model = cnn()
    history = model.fit(sc.parallelize(list(zip(X, y)), 2), epochs=1, batch_size=24, seed=3,
                        verbose=0)
    assert history.params["partitions"] == 2
    assert model.step == ref.step == 2
    assert not np.allclose(model.theta, cnn().build().theta)  # it trained
    np.testing.assert_allclose(model.theta, ref.theta, rtol=1e-5, atol=1e-7)
    for k in ref.slots:
        np.testing.assert_allclose(model.slots[k], ref.slots[k], rtol=1e-5, atol=1e-7)
