"""Every layer, loss and optimizer on CuPy arrays equals the NumPy path (``gpu`` tests).

Each case runs once on NumPy and once on CuPy copies of the same inputs, weights and dropout
``rng``; outputs, input gradients and weight gradients must agree to float tolerance, and come
back as CuPy arrays (no silent trip through the host). Without cupy or a visible GPU the ``gpu``
tests skip; the ``numpy`` tests run everywhere so that the cases themselves are known to build
and run before a GPU ever sees them.
"""
from __future__ import annotations

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.steps import gradient_step
from rddtensor import optim
from rddtensor.optim import get_loss


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-11}


# name -> (layer factory, per-sample input shape, training, input kind)
LAYERS = {
    "dense": (lambda: L.Dense(5, activation="relu"), (4,), False, "float"),
    "dense_3d": (lambda: L.Dense(3, activation="gelu"), (2, 4), False, "float"),
    "dropout": (lambda: L.Dropout(0.4), (6,), True, "float"),
    "flatten": (lambda: L.Flatten(), (2, 3, 2), False, "float"),
    "reshape": (lambda: L.Reshape((3, 4)), (12,), False, "float"),
    "relu": (lambda: L.ReLU(), (7,), False, "float"),
    "leaky_relu": (lambda: L.LeakyReLU(0.1), (7,), False, "float"),
    "elu": (lambda: L.ELU(), (7,), False, "float"),
    "gelu": (lambda: L.GELU(), (7,), False, "float"),
    "gelu_tanh": (lambda: L.GELU(approximate="tanh"), (7,), False, "float"),
    "sigmoid": (lambda: L.Sigmoid(), (7,), False, "float"),
    "tanh": (lambda: L.Tanh(), (7,), False, "float"),
    "softmax": (lambda: L.Softmax(), (7,), False, "float"),
    "activation": (lambda: L.Activation("elu"), (7,), False, "float"),
    "batchnorm_train": (lambda: L.BatchNorm(), (3, 4, 4), True, "float"),
    "batchnorm_eval": (lambda: L.BatchNorm(), (3, 4, 4), False, "float"),
    "batchnorm_1d": (lambda: L.BatchNorm(), (5,), True, "float"),
    "layernorm": (lambda: L.LayerNorm(), (3, 6), True, "float"),
    "embedding": (lambda: L.Embedding(11, 4, padding_idx=0), (5,), True, "ids"),
    "simple_rnn": (lambda: L.SimpleRNN(4, return_sequences=True), (5, 3), True, "float"),
    "lstm": (lambda: L.LSTM(4), (5, 3), True, "float"),
    "lstm_masked": (lambda: L.LSTM(4, return_sequences=True, mask_value=0.0), (5, 3), True,
                    "padded"),
    "gru": (lambda: L.GRU(4, return_sequences=True), (5, 3), True, "float"),
    "gru_masked": (lambda: L.GRU(4, mask_value=0.0), (5, 3), True, "padded"),
    "bidirectional": (lambda: L.Bidirectional(L.LSTM(3, return_sequences=True)), (4, 2), True,
                      "float"),
    "time_distributed": (lambda: L.TimeDistributed(L.Dense(3)), (4, 2), True, "float"),
    "conv1d": (lambda: L.Conv1D(4, 3, padding="same"), (2, 9), True, "float"),
    "conv2d": (lambda: L.Conv2D(4, 3, padding="same", activation="relu"), (2, 6, 5), True,
               "float"),
    "conv2d_strided": (lambda: L.Conv2D(3, (3, 2), strides=2, dilation=(1, 2)), (2, 9, 8), True,
                       "float"),
    "conv2d_groups": (lambda: L.Conv2D(4, 3, groups=2), (4, 6, 6), True, "float"),
    "conv2d_winograd_shape": (lambda: L.Conv2D(16, 3, padding="same"), (16, 6, 6), True,
                              "float"),
    "conv2d_transpose": (lambda: L.Conv2DTranspose(3, 3, strides=2, padding=1,
                                                   output_padding=1), (2, 4, 5), True, "float"),
    "maxpool1d": (lambda: L.MaxPool1D(2), (3, 8), True, "float"),
    "maxpool2d": (lambda: L.MaxPool2D(2), (2, 6, 6), True, "float"),
    "maxpool2d_padded": (lambda: L.MaxPool2D(3, strides=2, padding=1), (2, 7, 7), True, "float"),
    "avgpool2d": (lambda: L.AvgPool2D(2), (2, 6, 6), True, "float"),
    "global_avgpool2d": (lambda: L.GlobalAvgPool2D(), (3, 4, 5), True, "float"),
    "upsampling2d": (lambda: L.UpSampling2D(2), (2, 3, 3), True, "float"),
}


def _layer_case(name, dtype, batch=3, seed=0):
    factory, shape, training, kind = LAYERS[name]
    layer = factory()
    layer.build(shape)
    rng = np.random.default_rng(seed)
    params = layer.init_params(np.random.default_rng(seed + 1), dtype=dtype)
    if kind == "ids":
        X = rng.integers(0, 11, (batch, *shape))
    else:
        X = rng.standard_normal((batch, *shape)).astype(dtype)
        if kind == "padded":
            X[0, -2:] = 0.0  # padded steps at the end of row 0
    return layer, params, X, training


def _run(layer, params, X, training, dY=None, seed=7):
    Y, backprop = layer.forward(params, X, training=training, rng=np.random.default_rng(seed))
    if dY is None:
        dY = np.random.default_rng(seed + 1).standard_normal(Y.shape).astype(Y.dtype)
    dX, grads = backprop(dY)
    return Y, dX, grads, dY


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_numpy_case_runs(name):
    layer, params, X, training = _layer_case(name, np.float64)
    Y, dX, grads, _ = _run(layer, params, X, training)
    assert Y.shape[1:] == tuple(layer.output_shape) and set(grads) <= set(params)
    assert dX is None or dX.shape == X.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gpu_layer_equals_numpy(cp, name, dtype):
    layer, params, X, training = _layer_case(name, dtype)
    Y, dX, grads, dY = _run(layer, params, X, training)
    Yc, dXc, gradsc, _ = _run(layer, {k: cp.asarray(v) for k, v in params.items()},
                              cp.asarray(X), training, dY=cp.asarray(dY))
    assert isinstance(Yc, cp.ndarray), f"{name} forward returned {type(Yc)}"
    np.testing.assert_allclose(cp.asnumpy(Yc), Y, **_tol(dtype), err_msg="Y")
    if dX is None:
        assert dXc is None
    else:
        assert isinstance(dXc, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(dXc), dX, **_tol(dtype), err_msg="dX")
    assert set(gradsc) == set(grads)
    for k in grads:
        assert isinstance(gradsc[k], cp.ndarray), f"grad {k} is {type(gradsc[k])}"
        np.testing.assert_allclose(cp.asnumpy(gradsc[k]), grads[k], **_tol(dtype), err_msg=k)


# --- losses -------------------------------------------------------------------------------------
def _loss_case(name, dtype, batch=6, C=4, seed=3):
    rng = np.random.default_rng(seed)
    Y = (2.0 * rng.standard_normal((batch, C))).astype(dtype)
    if name in ("sparse_categorical_crossentropy", "sparse_smoothed"):
        y = rng.integers(0, C, batch)
    elif name == "categorical_crossentropy":
        y = np.eye(C, dtype=dtype)[rng.integers(0, C, batch)]
    elif name in ("binary_crossentropy", "hinge"):
        Y = Y[:, :1]
        y = rng.integers(0, 2, batch).astype(dtype)
    else:
        y = rng.standard_normal((batch, C)).astype(dtype)
    return Y, y


LOSSES = {
    "mse": {}, "mae": {}, "huber": {"delta": 0.5}, "binary_crossentropy": {},
    "categorical_crossentropy": {}, "sparse_categorical_crossentropy": {},
    "sparse_smoothed": {"label_smoothing": 0.1}, "hinge": {},
}


def _loss(name):
    kwargs = LOSSES[name]
    return get_loss("sparse_categorical_crossentropy" if name == "sparse_smoothed" else name,
                    **kwargs)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_numpy_loss_case_runs(name):
    Y, y = _loss_case(name, np.float64)
    loss, dY = _loss(name)(Y, y, n_total=10)
    assert np.isfinite(loss) and dY.shape == Y.shape


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gpu_loss_equals_numpy(cp, name, dtype, weighted):
    Y, y = _loss_case(name, dtype)
    kw = {"sample_weight": np.linspace(0.5, 2.0, len(Y)).astype(dtype)} if weighted else {}
    loss, dY = _loss(name)(Y, y, n_total=10, **kw)
    kwc = {k: cp.asarray(v) for k, v in kw.items()}
    lossc, dYc = _loss(name)(cp.asarray(Y), cp.asarray(y), n_total=10, **kwc)
    assert isinstance(dYc, cp.ndarray) and dYc.dtype == dY.dtype
    assert lossc == pytest.approx(loss, rel=_tol(dtype)["rtol"])
    np.testing.assert_allclose(cp.asnumpy(dYc), dY, **_tol(dtype))


# --- optimizers -----------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": (optim.SGD, {"lr": 0.1}),
    "sgd_nesterov": (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                 "weight_decay": 0.01}),
    "adam": (optim.Adam, {"lr": 0.01}),
    "adam_amsgrad": (optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    "adamw": (optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    "rmsprop": (optim.RMSprop, {"lr": 0.01, "momentum": 0.9}),
    "adagrad": (optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    "lars": (optim.LARS, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "lamb": (optim.LAMB, {"lr": 0.01, "weight_decay": 0.01}),
}
SEGMENTS = [(0, 40), (40, 97), (97, 101)]  # per-tensor trust ratios (LARS, LAMB)


def _run_optimizer(name, xp, w, grads):
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(**kwargs)
    slots = opt.init_slots(w.size, xp=xp, dtype=w.dtype)
    for step, g in enumerate(grads, start=1):
        opt.update(w, xp.array(g, copy=True), slots, step, segments=SEGMENTS)
    return w, slots


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_numpy_optimizer_case_runs(name):
    rng = np.random.default_rng(4)
    w, _ = _run_optimizer(name, np, rng.standard_normal(101),
                          [rng.standard_normal(101) for _ in range(3)])
    assert np.isfinite(w).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gpu_optimizer_equals_numpy(cp, name, dtype):
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal(101).astype(dtype)
    grads = [rng.standard_normal(101).astype(dtype) for _ in range(3)]
    w, slots = _run_optimizer(name, np, w0.copy(), grads)
    wc, slotsc = _run_optimizer(name, cp, cp.asarray(w0), [cp.asarray(g) for g in grads])
    np.testing.assert_allclose(cp.asnumpy(wc), w, **_tol(dtype))
    for k in slots:
        assert isinstance(slotsc[k], cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(slotsc[k]), slots[k], **_tol(dtype), err_msg=k)


# --- a whole training step ------------------------------------------------------------------------
MODELS = {
    "cnn": (lambda: [L.Conv2D(4, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
                     L.MaxPool2D(2), L.BatchNorm(), L.Flatten(), L.Dropout(0.2), L.Dense(3)],
            (1, 8, 8), "sparse_categorical_crossentropy"),
    "lstm": (lambda: [L.LSTM(6, return_sequences=True, input_shape=(5, 3)), L.GRU(4),
                      L.Dense(1)], (5, 3), "mse"),
}


def _step(model, theta, X, y, loss):
    return gradient_step(model, theta, X, y, loss=get_loss(loss), n_batch=8,
                         rng=np.random.default_rng(5), metrics=())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_numpy_model_case_runs(name):
    factory, shape, loss = MODELS[name]
    model = L.Sequential(factory(), seed=0).build()
    X = np.random.default_rng(6).standard_normal((6, *shape)).astype(np.float32)
    y = np.arange(6) % 2
    g, stats = _step(model, model.theta, X, y, loss)
    assert g.shape == model.theta.shape and stats["count"] == 6


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_gradient_step_equals_numpy(cp, name):
    factory, shape, loss = MODELS[name]
    model = L.Sequential(factory(), seed=0).build()
    X = np.random.default_rng(6).standard_normal((6, *shape)).astype(np.float32)
    y = np.arange(6) % 2
    g, stats = _step(model, model.theta, X, y, loss)
    gc, statsc = _step(model, cp.asarray(model.theta), cp.asarray(X), cp.asarray(y), loss)
    assert isinstance(gc, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(gc), g, rtol=1e-4, atol=1e-6)
    assert statsc["loss"] == pytest.approx(stats["loss"], rel=1e-5)
