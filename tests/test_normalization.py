"""BatchNorm and LayerNorm (``rddtensor.layers.normalization``).

Gradient checks (float64, trainable weights and input; a buffer's entry in ``grads`` is its
change, checked against the running-average formula instead), PyTorch comparisons (train and eval
mode, running statistics over several steps, a whole model trained with SGD), and the distributed
semantics: one partition equals in-process bit for bit, several partitions normalise with their
own rows and share-weight the running statistics.
"""
from __future__ import annotations

import doctest

import numpy as np
import pytest
from gradcheck import check_grad

from rddtensor import layers as L
from rddtensor.layers import normalization
from rddtensor.layers.base import layer_class
from rddtensor.training.batching import step_rng
from rddtensor.layers.normalization import BatchNorm, LayerNorm
from rddtensor.training.steps import gradient_step, optimizer_step
from rddtensor.optim import SGD

BUFFERS = ("running_mean", "running_var")


# --- helpers ------------------------------------------------------------------------------------
def built_params(layer, input_shape, seed=0, random_stats=False):
    """float64 params with random affine weights (and, if asked, random running statistics)."""
    layer.build(tuple(input_shape))
    params = layer.init_params(np.random.default_rng(seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 10)
    for k in ("W", "b"):
        if k in params:
            params[k] = rng.standard_normal(params[k].shape)
    if random_stats:
        params["running_mean"] = rng.standard_normal(params["running_mean"].shape)
        params["running_var"] = rng.uniform(0.5, 2.0, params["running_var"].shape)
    return params


def check_trainable(layer, input_shape, *, batch=4, training=True, params=None, X=None, seed=0,
                    per_element=False):
    """Gradient-check ``X`` and the trainable parameters of ``layer`` (float64).

    ``check_layer`` cannot be used as is: under a buffer key ``backprop`` returns the buffer's
    change, not a gradient. Returns ``(params, X, Y, dX, grads)``.
    """
    if params is None:
        params = built_params(layer, input_shape, seed)
    layer.build(tuple(input_shape))
    rng = np.random.default_rng(seed)
    if X is None:
        X = 2.0 * rng.standard_normal((batch, *input_shape)) + 0.5
    Y, backprop = layer.forward(params, X, training=training)
    R = rng.standard_normal(Y.shape)
    dX, grads = backprop(R)
    assert set(grads) == set(params), f"grads keys {set(grads)} != params keys {set(params)}"
    trainable = list(layer.param_shapes())

    def f(arrs):
        p = {**params, **{k: arrs["p." + k] for k in trainable}}
        return float(np.sum(layer.forward(p, arrs["X"], training=training)[0] * R))

    arrays = {"X": X, **{"p." + k: params[k] for k in trainable}}
    analytic = {"X": dX, **{"p." + k: grads[k] for k in trainable}}
    check_grad(f, arrays, analytic, per_element=per_element, seed=seed)
    return params, X, Y, dX, grads


def expected_changes(params, X, axis, momentum):
    """``new - old`` of both running statistics after one training batch ``X`` (by hand)."""
    axes = tuple(a for a in range(X.ndim) if a != axis % X.ndim)
    mean, var = X.mean(axis=axes), X.var(axis=axes, ddof=1)
    rm, rv = params["running_mean"], params["running_var"]
    return {"running_mean": (1 - momentum) * rm + momentum * mean - rm,
            "running_var": (1 - momentum) * rv + momentum * var - rv}


# --- gradient checks ----------------------------------------------------------------------------
BN_SHAPES = {"1d": (3,), "1d_seq": (3, 5), "2d": (2, 3, 4), "3d": (2, 2, 3, 2)}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", sorted(BN_SHAPES))
def test_batchnorm_gradcheck_training(shape, affine):
    layer = BatchNorm(momentum=0.3, affine=affine)
    params, X, _, _, grads = check_trainable(layer, BN_SHAPES[shape], batch=4)
    for k, want in expected_changes(params, X, 1, 0.3).items():
        np.testing.assert_allclose(grads[k], want, rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_gradcheck_eval_uses_running_stats(affine):
    layer = BatchNorm(affine=affine)
    params = built_params(layer, (3, 4), random_stats=True)
    _, X, Y, _, grads = check_trainable(layer, (3, 4), training=False, params=params)
    Xhat = (X - params["running_mean"][:, None]) / np.sqrt(params["running_var"][:, None] + 1e-5)
    np.testing.assert_allclose(Y, Xhat * params["W"][:, None] + params["b"][:, None]
                               if affine else Xhat, rtol=1e-12)
    for k in BUFFERS:  # evaluation changes nothing
        np.testing.assert_array_equal(grads[k], 0)


def test_batchnorm_gradcheck_channels_last_and_per_element():
    layer = BatchNorm(axis=-1, momentum=0.5)
    params, X, _, _, grads = check_trainable(layer, (2, 3), batch=2, per_element=True)
    for k, want in expected_changes(params, X, -1, 0.5).items():
        np.testing.assert_allclose(grads[k], want, rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("normalized_shape,input_shape", [
    (None, (5,)), (None, (3, 4)), ((3, 4), (3, 4)), (4, (2, 3, 4))])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_gradcheck(normalized_shape, input_shape, affine):
    check_trainable(LayerNorm(normalized_shape, elementwise_affine=affine), input_shape, batch=3)


def test_layernorm_gradcheck_per_element_tiny():
    check_trainable(LayerNorm(), (3,), batch=2, per_element=True)


# --- against PyTorch ------------------------------------------------------------------------------
def torch_batchnorm(torch, ndim, params, momentum=0.1, eps=1e-5, affine=True):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    C = params["running_mean"].shape[0]
    bn = cls(C, eps=eps, momentum=momentum, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(params["running_mean"]))
        bn.running_var.copy_(torch.tensor(params["running_var"]))
        if affine:
            bn.weight.copy_(torch.tensor(params["W"]))
            bn.bias.copy_(torch.tensor(params["b"]))
    return bn


def run_torch(torch, module, X, dY):
    Xt = torch.tensor(X, requires_grad=True)
    Yt = module(Xt)
    Yt.backward(torch.tensor(dY))
    return Yt.detach().numpy(), Xt.grad.numpy()


TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 5), (2, 3, 2, 3, 2)])
def test_batchnorm_matches_torch(shape, affine, training):
    torch = pytest.importorskip("torch")
    layer = BatchNorm(momentum=0.2, eps=1e-3, affine=affine)
    params = built_params(layer, shape[1:], seed=1, random_stats=True)
    rng = np.random.default_rng(2)
    X, dY = 3.0 * rng.standard_normal(shape) - 1.0, rng.standard_normal(shape)
    Y, backprop = layer.forward(params, X, training=training)
    dX, grads = backprop(dY)

    bn = torch_batchnorm(torch, len(shape), params, momentum=0.2, eps=1e-3, affine=affine)
    bn.train(training)
    Yt, dXt = run_torch(torch, bn, X, dY)
    np.testing.assert_allclose(Y, Yt, **TOL)
    np.testing.assert_allclose(dX, dXt, **TOL)
    if affine:
        np.testing.assert_allclose(grads["W"], bn.weight.grad.numpy(), **TOL)
        np.testing.assert_allclose(grads["b"], bn.bias.grad.numpy(), **TOL)
    for k in BUFFERS:  # old + change = torch's updated running statistic
        np.testing.assert_allclose(params[k] + grads[k], getattr(bn, k).numpy(), **TOL, err_msg=k)


def test_batchnorm_channels_last_matches_torch_on_transposed_input():
    torch = pytest.importorskip("torch")
    layer = BatchNorm(axis=-1)
    params = built_params(layer, (5, 3), seed=3)
    rng = np.random.default_rng(4)
    X, dY = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5, 3))
    Y, backprop = layer.forward(params, X, training=True)
    dX, grads = backprop(dY)
    bn = torch_batchnorm(torch, 3, params)
    Yt, dXt = run_torch(torch, bn, X.transpose(0, 2, 1).copy(), dY.transpose(0, 2, 1).copy())
    np.testing.assert_allclose(Y, Yt.transpose(0, 2, 1), **TOL)
    np.testing.assert_allclose(dX, dXt.transpose(0, 2, 1), **TOL)
    np.testing.assert_allclose(params["running_var"] + grads["running_var"],
                               bn.running_var.numpy(), **TOL)


@pytest.mark.parametrize("shape", [(3,), (2, 4)])
def test_batchnorm_running_stats_match_torch_over_steps(shape):
    """Adding each step's change reproduces torch's running statistics, batch sizes varying."""
    torch = pytest.importorskip("torch")
    layer = BatchNorm(momentum=0.25)
    params = built_params(layer, shape, seed=5)
    bn = torch_batchnorm(torch, len(shape) + 1, params, momentum=0.25)
    rng = np.random.default_rng(6)
    for batch in (5, 2, 8, 3):
        X = rng.uniform(-1, 3, (batch, *shape))
        _, backprop = layer.forward(params, X, training=True)
        _, grads = backprop(np.ones_like(X))
        for k in BUFFERS:
            params[k] = params[k] + grads[k]
        bn(torch.tensor(X))
        for k in BUFFERS:
            np.testing.assert_allclose(params[k], getattr(bn, k).numpy(), **TOL, err_msg=k)
    bn.eval()
    X = rng.standard_normal((3, *shape))
    np.testing.assert_allclose(layer.forward(params, X)[0], bn(torch.tensor(X)).detach().numpy(),
                               **TOL)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("normalized_shape,shape", [
    (None, (4, 5)), ((4, 5), (3, 4, 5)), (5, (2, 3, 5)), ((2, 3, 4), (2, 2, 3, 4))])
def test_layernorm_matches_torch(normalized_shape, shape, affine):
    torch = pytest.importorskip("torch")
    layer = LayerNorm(normalized_shape, eps=1e-4, elementwise_affine=affine)
    params = built_params(layer, shape[1:], seed=7)
    rng = np.random.default_rng(8)
    X, dY = 2.0 * rng.standard_normal(shape) + 1.0, rng.standard_normal(shape)
    Y, backprop = layer.forward(params, X, training=True)
    dX, grads = backprop(dY)
    ns = layer.normalized_shape or shape[-1:]
    ln = torch.nn.LayerNorm(ns, eps=1e-4, elementwise_affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.tensor(params["W"]))
            ln.bias.copy_(torch.tensor(params["b"]))
    Yt, dXt = run_torch(torch, ln, X, dY)
    np.testing.assert_allclose(Y, Yt, **TOL)
    np.testing.assert_allclose(dX, dXt, **TOL)
    assert set(grads) == ({"W", "b"} if affine else set())
    if affine:
        np.testing.assert_allclose(grads["W"], ln.weight.grad.numpy(), **TOL)
        np.testing.assert_allclose(grads["b"], ln.bias.grad.numpy(), **TOL)
    np.testing.assert_array_equal(layer.forward(params, X, training=False)[0], Y)


# --- edge cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4)])
def test_batchnorm_empty_local_batch_is_finite_and_changes_nothing(shape):
    layer = BatchNorm()
    layer.build(shape[1:])
    params = layer.init_params(np.random.default_rng(0))
    X = np.zeros(shape, np.float32)
    with np.errstate(all="raise"):
        Y, backprop = layer.forward(params, X, training=True)
        dX, grads = backprop(np.zeros_like(X))
    assert Y.shape == dX.shape == shape and Y.dtype == np.float32
    for k, g in grads.items():
        assert g.shape == params[k].shape and g.dtype == np.float32
        np.testing.assert_array_equal(g, 0, err_msg=k)


def test_layernorm_empty_batch_is_finite():
    ln = LayerNorm()
    ln.build((4,))
    params = ln.init_params(np.random.default_rng(0))
    with np.errstate(all="raise"):
        Y, backprop = ln.forward(params, np.zeros((0, 4), np.float32), training=True)
        dX, grads = backprop(np.zeros((0, 4), np.float32))
    assert Y.shape == dX.shape == (0, 4)
    np.testing.assert_array_equal(grads["W"], 0)


def test_batchnorm_one_value_per_channel_is_finite_and_keeps_running_var():
    layer = BatchNorm(momentum=0.5)
    params = built_params(layer, (3,))
    X = np.array([[1.0, -2.0, 4.0]])
    with np.errstate(all="raise"):
        Y, backprop = layer.forward(params, X, training=True)
        dX, grads = backprop(np.ones_like(X))
    np.testing.assert_allclose(Y[0], params["b"])  # x - mean = 0
    np.testing.assert_array_equal(dX, 0)
    np.testing.assert_allclose(grads["running_mean"], 0.5 * X[0])
    np.testing.assert_array_equal(grads["running_var"], 0)


def test_batchnorm_keeps_float32_and_declares_buffers():
    layer = BatchNorm()
    layer.build((4, 2))
    assert layer.param_shapes() == {"W": (4,), "b": (4,)}
    assert layer.buffer_shapes() == {"running_mean": (4,), "running_var": (4,)}
    params = layer.init_params(np.random.default_rng(0))
    np.testing.assert_array_equal(params["running_var"], 1)
    np.testing.assert_array_equal(params["running_mean"], 0)
    X = np.random.default_rng(1).standard_normal((3, 4, 2)).astype(np.float32)
    for training in (True, False):
        Y, backprop = layer.forward(params, X, training=training)
        dX, grads = backprop(np.ones_like(Y))
        assert Y.dtype == dX.dtype == np.float32
        assert all(g.dtype == np.float32 for g in grads.values())
    no_affine = BatchNorm(affine=False)
    no_affine.build((4,))
    assert no_affine.param_shapes() == {}
    assert set(no_affine.init_params(np.random.default_rng(0))) == set(BUFFERS)


@pytest.mark.parametrize("make,match", [
    (lambda: BatchNorm(momentum=1.5), r"momentum must be a number in \[0, 1\], got 1.5"),
    (lambda: BatchNorm(eps=0), r"eps must be a number > 0, got 0"),
    (lambda: BatchNorm(affine="yes"), r"affine must be True or False, got 'yes'"),
    (lambda: BatchNorm(axis=1.0), r"axis must be an integer"),
    (lambda: BatchNorm(axis=0).build((3,)), r"axis 0 must name a non-batch axis"),
    (lambda: BatchNorm(axis=3).build((3, 4)), r"axis 3 must name a non-batch axis"),
    (lambda: BatchNorm().build(()), r"needs a per-sample shape with a channel axis"),
    (lambda: BatchNorm().param_shapes(), r"has no input shape yet"),
    (lambda: LayerNorm(eps=-1.0), r"eps must be a number > 0"),
    (lambda: LayerNorm((4, 5)).build((5, 4)), r"normalized_shape \(4, 5\) must be the last axes"),
    (lambda: LayerNorm(0), r"normalized_shape"),
])
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_shapes_are_named():
    bn = BatchNorm()
    bn.build((3,))
    params = bn.init_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expects 3 channels on axis 1, got shape \(2, 4\)"):
        bn.forward(params, np.zeros((2, 4)), training=True)
    with pytest.raises(ValueError, match=r"with 2 axes, got shape \(3,\)"):
        bn.forward(params, np.zeros(3))
    ln = LayerNorm()
    ln.build((3,))
    params = ln.init_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expects inputs \(batch, \.\.\., \*\(3,\)\)"):
        ln.forward(params, np.zeros((2, 4)))


@pytest.mark.parametrize("layer", [
    BatchNorm(momentum=0.3, eps=1e-4, affine=False, axis=-1, input_shape=(2, 3), name="bn"),
    LayerNorm((2, 3), eps=1e-3, elementwise_affine=False),
    LayerNorm()])
def test_config_round_trip(layer):
    cfg = layer.get_config()
    again = layer_class(type(layer).__name__).from_config(cfg)
    assert again.get_config() == cfg and repr(again) == repr(layer)


def test_docstring_examples(monkeypatch):
    # the examples use the public names (layers.BatchNorm); they hold whether or not
    # layers/__init__.py exports them yet
    monkeypatch.setattr(L, "BatchNorm", BatchNorm, raising=False)
    monkeypatch.setattr(L, "LayerNorm", LayerNorm, raising=False)
    assert doctest.testmod(normalization).failed == 0


# --- a model with BatchNorm, trained in process against PyTorch --------------------------------
_rng = np.random.default_rng(42)
XM = (_rng.normal(size=(24, 4)) * [1.0, 3.0, 0.5, 2.0] + [0.0, 1.0, -2.0, 0.5]).astype(np.float32)
YM = (XM[:, 0] - 0.3 * XM[:, 1] > 0).astype(np.int64) + (XM[:, 2] > -2).astype(np.int64)


def bn_model(kind):
    if kind == "1d":
        layers = [L.Dense(6, input_shape=(4,)), BatchNorm(momentum=0.2), L.ReLU(), L.Dense(3)]
    else:  # BatchNorm over (batch, C=2, L=4)
        layers = [L.Dense(8, input_shape=(4,)), L.Reshape((2, 4)), BatchNorm(momentum=0.2),
                  L.Flatten(), L.ReLU(), L.Dense(3)]
    m = L.Sequential(layers, seed=3)
    m.compile(optimizer=SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    m.build()
    return m


def torch_model(torch, kind, model):
    nn = torch.nn
    if kind == "1d":
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.2), nn.ReLU(),
                            nn.Linear(6, 3))
    else:
        net = nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 4)), nn.BatchNorm1d(2, momentum=0.2),
                            nn.Flatten(), nn.ReLU(), nn.Linear(8, 3))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == len(model.layout.keys)
    net.load_state_dict({**net.state_dict(), **{k: torch.tensor(w) for k, w in
                                                zip(state, model.get_weights())}})
    return net


@pytest.mark.parametrize("kind", ["1d", "seq"])
def test_model_with_batchnorm_trains_like_torch(kind, tmp_path):
    torch = pytest.importorskip("torch")
    m = bn_model(kind)
    net = torch_model(torch, kind, m)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    m.fit(XM, YM, epochs=2, batch_size=8, shuffle=False, verbose=0)
    for _ in range(2):
        for a in range(0, len(XM), 8):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(torch.tensor(XM[a:a + 8])),
                                                     torch.tensor(YM[a:a + 8]))
            loss.backward()
            opt.step()
    assert m.step == 6
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for key, (tk, tv) in zip(m.layout.keys, state.items()):
        rtol = 1e-5 if "running" in key else 1e-4
        np.testing.assert_allclose(m.params[key], tv.numpy(), rtol=rtol, atol=1e-5,
                                   err_msg=f"{key} vs torch {tk}")
    net.eval()
    expected = net(torch.tensor(XM)).detach().numpy()
    np.testing.assert_allclose(m.predict(XM), expected, rtol=1e-4, atol=1e-4)
    m.save(str(tmp_path / "bn"))  # the running statistics travel with the model file
    np.testing.assert_array_equal(L.load_model(str(tmp_path / "bn")).predict(XM), m.predict(XM))


# --- distributed semantics ---------------------------------------------------------------------
XD = (_rng.normal(size=(12, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]).astype(np.float32)
YD = (XD[:, 0] + XD[:, 2] > -1).astype(np.int64)
MOMENTUM = 0.3


def dist_model():
    m = L.Sequential([BatchNorm(momentum=MOMENTUM, input_shape=(3,)), L.Dense(2)], seed=4)
    m.compile(optimizer=SGD(0.1), loss="sparse_categorical_crossentropy")
    return m


def chunked_rdd(sc, rows, sizes):
    """An RDD whose partition j holds exactly the next ``sizes[j]`` rows (empty ones allowed)."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    chunks = [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]
    return sc.parallelize(chunks, len(chunks)).flatMap(lambda c: c)


@pytest.mark.spark
def test_one_partition_equals_in_process_exactly(sc):
    ref = dist_model()
    ref.fit(XD, YD, epochs=1, batch_size=4, seed=7, verbose=0)
    m = dist_model()
    m.fit(sc.parallelize(list(zip(XD, YD)), 1), epochs=1, batch_size=4, seed=7, verbose=0)
    assert m.step == ref.step == 3
    np.testing.assert_array_equal(m.theta, ref.theta)  # running statistics included
    assert not np.array_equal(m.params["0.running_var"], np.ones(3, np.float32))


@pytest.mark.spark
@pytest.mark.parametrize("sizes,allreduce", [([5, 7], "sharded"), ([5, 7], "replicated"),
                                             ([5, 0, 7], "auto")])
def test_partitions_normalise_locally_and_share_weight_running_stats(sc, sizes, allreduce):
    """Full-batch steps on partitions holding rows [0, 5) and [5, 12) (and an empty one)."""
    steps = 3
    m = dist_model()
    m.fit(chunked_rdd(sc, list(zip(XD, YD)), sizes), epochs=steps, batch_size=12, shuffle=False,
          verbose=0, allreduce=allreduce)
    assert m.step == steps

    # by hand: the row-weighted mean of the two partitions' statistics drives the running average
    parts = [XD[:5].astype(np.float64), XD[5:].astype(np.float64)]
    share = [5 / 12, 7 / 12]
    mean = sum(s * p.mean(axis=0) for s, p in zip(share, parts))
    var = sum(s * p.var(axis=0, ddof=1) for s, p in zip(share, parts))
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(steps):  # BatchNorm is the first layer: its inputs do not change
        rm, rv = (1 - MOMENTUM) * rm + MOMENTUM * mean, (1 - MOMENTUM) * rv + MOMENTUM * var
    np.testing.assert_allclose(m.params["0.running_mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.params["0.running_var"], rv, rtol=1e-5, atol=1e-6)
    whole = dist_model()  # one global batch: a different variance, so the test tells them apart
    whole.fit(XD, YD, epochs=steps, batch_size=12, shuffle=False, verbose=0)
    assert not np.allclose(whole.params["0.running_var"], rv, rtol=1e-3)

    # the trainable weights follow per-partition statistics: the sum of per-partition steps
    ref = dist_model().build()
    ref.init_slots()
    for step in range(1, steps + 1):
        grads = [gradient_step(ref, ref.theta, p.astype(np.float32), y, loss=ref.loss,
                               n_batch=12, rng=step_rng(0, step, j))[0]
                 for j, (p, y) in enumerate(zip(parts, (YD[:5], YD[5:])))]
        optimizer_step(ref.optimizer, ref.theta, grads[0] + grads[1], ref.slots, step,
                       ref.layout.split_segments())
    np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-5, atol=1e-6)
    assert not np.allclose(whole.theta, ref.theta, rtol=1e-3)
