"""Merge layers (``rddtensor.layers.merge``): gradient checks (float64, every input), PyTorch as
the oracle for outputs and input gradients, shapes, configs and the errors of bad calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gradcheck import check_grad

from rddtensor import layers as L
from rddtensor.layers.base import layer_class

#: (layer, per-sample input shapes, the PyTorch function of the inputs)
CASES = {
    "add3": (lambda: L.Add(), [(3, 4), (3, 4), (3, 4)], lambda a, b, c: a + b + c),
    "subtract": (lambda: L.Subtract(), [(5,), (5,)], lambda a, b: a - b),
    "multiply3": (lambda: L.Multiply(), [(2, 3), (2, 3), (2, 3)], lambda a, b, c: a * b * c),
    "average3": (lambda: L.Average(), [(4,), (4,), (4,)], lambda a, b, c: (a + b + c) / 3),
    "concat_last": (lambda: L.Concatenate(), [(2, 3), (2, 1), (2, 4)],
                    lambda *xs: torch.cat(xs, dim=-1)),
    "concat_channels": (lambda: L.Concatenate(axis=1), [(2, 3, 3), (1, 3, 3)],
                        lambda a, b: torch.cat([a, b], dim=1)),
    "dot_vectors": (lambda: L.Dot(axes=1), [(5,), (5,)],
                    lambda a, b: (a * b).sum(dim=1, keepdim=True)),
    "dot_sequences": (lambda: L.Dot(axes=2), [(3, 4), (5, 4)],
                      lambda a, b: torch.bmm(a, b.transpose(1, 2))),
    "dot_mixed_axes": (lambda: L.Dot(axes=(1, 2)), [(4, 3), (2, 4)],
                       lambda a, b: torch.einsum("nkp,nqk->npq", a, b)),
    "dot_cosine": (lambda: L.Dot(axes=-1, normalize=True), [(6,), (6,)],
                   lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1,
                                                                      eps=0)[:, None]),
}


def _inputs(shapes, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, *s)) for s in shapes]


@pytest.mark.parametrize("case", list(CASES))
def test_merge_gradients_are_exact(case):
    make, shapes, _ = CASES[case]
    layer = make()
    out_shape = layer.build(shapes)
    Xs = _inputs(shapes)
    Y, backprop = layer.forward({}, Xs)
    assert Y.shape == (3, *out_shape)
    R = np.random.default_rng(1).standard_normal(Y.shape)
    dXs, grads = backprop(R)
    assert grads == {} and len(dXs) == len(Xs)

    def f(arrays):
        return float(np.sum(layer.forward({}, [arrays[f"x{i}"] for i in range(len(Xs))])[0] * R))

    check_grad(f, {f"x{i}": X for i, X in enumerate(Xs)},
               {f"x{i}": dX for i, dX in enumerate(dXs)}, per_element=True)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_pytorch(case):
    make, shapes, torch_fn = CASES[case]
    layer = make()
    layer.build(shapes)
    Xs = [X.astype(np.float32) for X in _inputs(shapes, seed=2)]
    Y, backprop = layer.forward({}, Xs)
    assert Y.dtype == np.float32
    R = np.random.default_rng(3).standard_normal(Y.shape).astype(np.float32)
    dXs, _ = backprop(R)
    ts = [torch.tensor(X, requires_grad=True) for X in Xs]
    tY = torch_fn(*ts)
    (tY * torch.tensor(R)).sum().backward()
    np.testing.assert_allclose(Y, tY.detach().numpy(), rtol=1e-5, atol=1e-6)
    for dX, t in zip(dXs, ts):
        np.testing.assert_allclose(dX, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_backprop_leaves_the_gradient_it_gets_alone():
    for make, shapes, _ in CASES.values():
        layer = make()
        layer.build(shapes)
        Y, backprop = layer.forward({}, _inputs(shapes))
        dY = np.ones_like(Y)
        backprop(dY)
        assert (dY == 1).all(), type(layer).__name__


@pytest.mark.parametrize("case", list(CASES))
def test_merge_config_round_trip(case):
    layer = CASES[case][0]()
    layer.build(CASES[case][1])
    cfg = layer.get_config()
    assert "input_shape" not in cfg  # a list of shapes is the graph's business, not the config's
    again = layer_class(type(layer).__name__).from_config(cfg)
    assert again.get_config() == cfg


def test_symbolic_shapes():
    a, b = L.Input((2, 3), name="a"), L.Input((5, 3), name="b")
    assert L.Concatenate(axis=1)([a, b]).shape == (7, 3)
    assert L.Dot(axes=2)([a, b]).shape == (2, 5)
    assert L.Add()([a, a, a]).shape == (2, 3)


@pytest.mark.parametrize("call, message", [
    (lambda a, b, c: L.Add()(a), r"Add layer takes a list of at least 2 tensors \(\[a, b\]\), "
                                  "got one tensor"),
    (lambda a, b, c: L.Add()([a]), "Add layer takes a list of at least 2 tensors, got 1"),
    (lambda a, b, c: L.Subtract()([a, a, a]), "Subtract layer takes a list of 2 tensors, got 3"),
    (lambda a, b, c: L.Add(name="res")([a, c]),
     r"Add layer 'res' cannot take Input 'a' of shape \(4,\), Input 'c' of shape \(5,\): .*one "
     r"shape, got \[\(4,\), \(5,\)\]"),
    (lambda a, b, c: L.Concatenate()([a, L.Input((2, 4))]), "same number of axes"),
    (lambda a, b, c: L.Concatenate(axis=1)([L.Input((2, 4)), L.Input((2, 5))]),
     r"match on every axis but axis=1, got shapes \[\(2, 4\), \(2, 5\)\]"),
    (lambda a, b, c: L.Concatenate(axis=3)([a, b]), "axis=3 is out of range"),
    (lambda a, b, c: L.Dot(axes=1)([a, c]), r"axis 1 of shape \(4,\) \(size 4\) with axis 1 "
                                             r"of shape \(5,\) \(size 5\)"),
])
def test_bad_merges_name_the_layer_and_the_shapes(call, message):
    a, b, c = L.Input((4,), name="a"), L.Input((4,), name="b"), L.Input((5,), name="c")
    with pytest.raises(ValueError, match=message):
        call(a, b, c)


def test_bad_settings():
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        L.Concatenate(axis=0)
    with pytest.raises(ValueError, match="Dot axes must be an integer or a pair"):
        L.Dot(axes=(1, 2, 3))
    with pytest.raises(ValueError, match="different batch sizes"):
        L.Add().forward({}, [np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="takes a list of arrays"):
        L.Add().forward({}, np.ones((2, 3)))
