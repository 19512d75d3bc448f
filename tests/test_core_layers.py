import json
import pickle

import numpy as np
import pytest
from gradcheck import check_layer

from rddtensor import layers as L
from rddtensor.layers.base import layer_class


# --- Dropout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9])
def test_dropout_gradcheck_training(rate):
    check_layer(L.Dropout(rate), (4, 5), batch=3, training=True)


def test_dropout_gradcheck_eval():
    check_layer(L.Dropout(0.5), (6,), training=False)


def test_dropout_eval_is_identity():
    X = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    Y, backprop = L.Dropout(0.5).forward({}, X, training=False)
    assert Y is X
    dY = np.ones_like(X)
    dX, grads = backprop(dY)
    assert dX is dY and grads == {}


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_fraction_and_scale(rate):
    X = np.ones((200, 500), np.float32)
    Y, backprop = L.Dropout(rate).forward({}, X, training=True, rng=np.random.default_rng(1))
    kept = Y != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01
    np.testing.assert_allclose(Y[kept], 1 / (1 - rate), rtol=1e-6)
    assert Y.dtype == np.float32
    dX, grads = backprop(np.full_like(X, 2.0))
    assert dX.dtype == np.float32 and grads == {}
    np.testing.assert_array_equal(dX != 0, kept)
    np.testing.assert_allclose(dX[kept], 2 / (1 - rate), rtol=1e-6)
    assert abs(Y.mean() - 1.0) < 0.03  # inverted dropout keeps the expectation


def test_dropout_same_seed_same_mask():
    X = np.random.default_rng(0).standard_normal((8, 16))
    drop = L.Dropout(0.4)
    Y1, _ = drop.forward({}, X, training=True, rng=np.random.default_rng(42))
    Y2, _ = drop.forward({}, X, training=True, rng=np.random.default_rng(42))
    Y3, _ = drop.forward({}, X, training=True, rng=np.random.default_rng(43))
    np.testing.assert_array_equal(Y1, Y2)
    assert not np.array_equal(Y1 != 0, Y3 != 0)
    Y32, _ = drop.forward({}, X.astype(np.float32), training=True, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(Y1 != 0, Y32 != 0)  # the mask does not depend on the dtype


def test_dropout_training_needs_rng():
    with pytest.raises(ValueError, match="training step must pass rng="):
        L.Dropout(0.5).forward({}, np.ones((2, 2)), training=True)
    with pytest.raises(ValueError, match="training step must pass rng="):
        L.Dropout(0.5).forward({}, np.ones((2, 2)), training=True, rng=7)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.5", None, True, float("nan")])
def test_dropout_bad_rate(rate):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\), got"):
        L.Dropout(rate)


# --- Flatten ---------------------------------------------------------------------------------
def test_flatten_gradcheck():
    check_layer(L.Flatten(), (2, 3, 4), batch=2)


def test_flatten_shapes():
    layer = L.Flatten()
    assert layer.build((2, 3, 4)) == (24,)
    X = np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4)
    Y, backprop = layer.forward({}, X)
    assert Y.shape == (2, 24) and Y.dtype == np.float32
    np.testing.assert_array_equal(Y[1], np.arange(24, 48))
    dX, grads = backprop(Y)
    np.testing.assert_array_equal(dX, X)
    assert grads == {}


def test_flatten_empty_batch():
    Y, backprop = L.Flatten().forward({}, np.zeros((0, 3, 4)))
    assert Y.shape == (0, 12)
    assert backprop(Y)[0].shape == (0, 3, 4)


# --- Reshape ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [(3, 4), (-1, 2), (2, -1, 3)])
def test_reshape_gradcheck(target):
    check_layer(L.Reshape(target), (12,), batch=2)


@pytest.mark.parametrize("target,expected", [((3, 4), (3, 4)), ((-1,), (12,)), ((2, -1), (2, 6)),
                                             (12, (12,)), ([4, -1], (4, 3))])
def test_reshape_shapes(target, expected):
    layer = L.Reshape(target)
    assert layer.build((2, 6)) == expected
    X = np.arange(24.0, dtype=np.float32).reshape(2, 2, 6)
    Y, backprop = layer.forward({}, X)
    assert Y.shape == (2, *expected) and Y.dtype == np.float32
    dX, grads = backprop(Y)
    np.testing.assert_array_equal(dX, X)
    assert grads == {}


@pytest.mark.parametrize("target,input_shape", [((5, -1), (12,)), ((5,), (12,)), ((2, 7), (3, 4))])
def test_reshape_element_count(target, input_shape):
    with pytest.raises(ValueError, match=rf"Reshape layer cannot reshape per-sample shape "
                                         rf"\({input_shape[0]},.*elements\) to target_shape"):
        L.Reshape(target).build(input_shape)


def test_reshape_forward_checks_count():
    with pytest.raises(ValueError, match=r"per-sample shape \(10,\) \(10 elements\)"):
        L.Reshape((3, 4)).forward({}, np.zeros((2, 10)))


@pytest.mark.parametrize("target,match", [
    ((-1, -1), "at most one -1"),
    ((0, 3), "target_shape must be a tuple of positive integers"),
    ((-2, 3), "target_shape must be a tuple of positive integers"),
    ((2.0, 3), "target_shape must be a tuple of positive integers"),
    (None, "target_shape must be a tuple of positive integers"),
])
def test_reshape_bad_target(target, match):
    with pytest.raises(ValueError, match=match):
        L.Reshape(target)


# --- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    L.Dropout(0.25), L.Dropout(0.1, name="drop"), L.Flatten(), L.Flatten(input_shape=(2, 3)),
    L.Reshape((3, -1)), L.Reshape([2, 2], input_shape=(4,), name="r"),
], ids=repr)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    clone = layer_class(type(layer).__name__).from_config(cfg)
    assert type(clone) is type(layer)
    assert clone.get_config() == cfg


def test_pickle():
    layer = L.Dropout(0.5)
    layer.forward({}, np.ones((100, 100)), training=True, rng=np.random.default_rng(0))
    blob = pickle.dumps(layer)
    assert len(blob) < 500
    assert pickle.loads(blob).rate == 0.5
