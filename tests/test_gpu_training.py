"""Device-resident training on a GPU (``gpu`` tests; skipped without cupy and a visible GPU).

``rddtensor.spark.device.Placement`` copies exactly and keeps the shard on the device between tasks;
a distributed fit with ``device="gpu"`` matches the same fit with ``device="cpu"`` to float
tolerance (the CuPy and NumPy reductions differ in order, so not bit for bit).
"""
from __future__ import annotations

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.spark import device

pytestmark = pytest.mark.gpu


def test_pinned_copies_are_exact_and_pinned(cp):
    place = device.Placement(device.choose_device("gpu"), cache=device.DeviceCache())
    host = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    dev = place.to_device(host, "test")
    assert isinstance(dev, cp.ndarray) and dev.shape == host.shape
    back = place.to_host(dev, "test.out")
    np.testing.assert_array_equal(back, host)
    assert cp.cuda.runtime.pointerGetAttributes(back.ctypes.data).type == 1  # host, page-locked


def test_shard_stays_on_the_device_between_tasks(cp):
    cache = device.DeviceCache()
    place = device.Placement(device.choose_device("gpu"), cache=cache)
    arrays = {"X": np.ones((4, 3), np.float32), "y": np.arange(4, dtype=np.float32)}
    meta = {"j": 0, "n": 4, "id": "run-a"}
    a = place.shard(meta, arrays)
    assert place.shard(meta, arrays) is a and cache.stats()["hits"] == 1
    assert place.shard({**meta, "id": "run-b"}, arrays) is not a  # other data: no mix-up
    theta = np.linspace(-1, 1, 10, dtype=np.float32)
    w, X, y, rows = place.step_inputs(theta, meta, arrays, np.array([3, 1]))
    np.testing.assert_array_equal(cp.asnumpy(X[rows]), arrays["X"][[3, 1]])
    np.testing.assert_array_equal(cp.asnumpy(w), theta)
    g = place.gradient_to_host(w * 2)
    assert isinstance(g, np.ndarray) and np.array_equal(g, theta * 2)


@pytest.mark.spark
@pytest.mark.parametrize("layers_fn, shape, loss", [
    (lambda: [L.Conv2D(4, 3, padding="same", activation="relu", input_shape=(1, 6, 6)),
              L.MaxPool2D(2), L.Flatten(), L.Dense(3)], (1, 6, 6),
     "sparse_categorical_crossentropy"),
    (lambda: [L.GRU(5, input_shape=(4, 3)), L.Dense(3)], (4, 3),
     "sparse_categorical_crossentropy"),
])
def test_distributed_fit_on_the_gpu_equals_cpu(cp, sc, layers_fn, shape, loss):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((48, *shape)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    rdd = sc.parallelize(list(zip(X, y)), 3)
    weights = {}
    for dev in ("cpu", "gpu"):
        model = L.Sequential(layers_fn(), seed=0)
        model.compile(optimizer="adam", loss=loss, device=dev)
        model.fit(rdd, epochs=2, batch_size=16, verbose=0)
        weights[dev] = model.get_weights()
    for a, b in zip(weights["gpu"], weights["cpu"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
