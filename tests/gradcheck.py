"""Numerical gradient checks, written once for every layer and loss.

Float64, central differences along random directions (the Chainer recipe), plus a per-element
mode for tiny shapes. ``check_layer`` drives a layer's forward/backprop against them.
"""
from __future__ import annotations

import numpy as np


def numeric_directional(f, arrays: dict, direction: dict, eps: float = 1e-6) -> float:
    plus = {k: a + eps * direction[k] for k, a in arrays.items()}
    minus = {k: a - eps * direction[k] for k, a in arrays.items()}
    return (f(plus) - f(minus)) / (2 * eps)


def check_grad(f, arrays: dict, analytic: dict, *, n_dirs: int = 4, eps: float = 1e-6,
               rtol: float = 1e-5, atol: float = 1e-7, per_element: bool = False, seed: int = 0):
    """Assert that ``analytic`` is the gradient of scalar ``f(arrays)``.

    Args:
        f: maps a dict of float64 arrays to a float.
        arrays: the point (float64 arrays).
        analytic: gradient arrays with the same keys and shapes.
        per_element: also compare every element by central differences (tiny shapes only).
    """
    rng = np.random.default_rng(seed)
    for k, a in arrays.items():
        assert a.dtype == np.float64, f"gradcheck needs float64, {k} is {a.dtype}"
        assert analytic[k].shape == a.shape, f"grad {k}: shape {analytic[k].shape} != {a.shape}"
    for _ in range(n_dirs):
        d = {k: rng.standard_normal(a.shape) for k, a in arrays.items()}
        num = numeric_directional(f, arrays, d, eps)
        ana = float(sum(np.sum(np.asarray(analytic[k]) * d[k]) for k in arrays))
        assert np.isclose(ana, num, rtol=rtol, atol=atol), f"directional derivative {ana} != numeric {num}"
    if per_element:
        for k, a in arrays.items():
            num = np.zeros_like(a)
            for idx in np.ndindex(a.shape):
                e = {kk: np.zeros_like(aa) for kk, aa in arrays.items()}
                e[k][idx] = 1.0
                num[idx] = numeric_directional(f, arrays, e, eps)
            np.testing.assert_allclose(analytic[k], num, rtol=rtol * 10, atol=atol * 10,
                                       err_msg=f"per-element gradient of {k}")


def check_layer(layer, input_shape, *, batch: int = 3, training: bool = False, seed: int = 0,
                X=None, params=None, per_element: bool = False, rtol: float = 1e-5,
                atol: float = 1e-7):
    """Gradient-check ``layer`` w.r.t. its input and every parameter, in float64.

    The scalar is ``sum(Y * R)`` for a fixed random ``R``; stochastic layers get the same
    ``rng`` seed at every evaluation.
    """
    rng = np.random.default_rng(seed)
    layer.build(tuple(input_shape))
    if params is None:
        params = layer.init_params(np.random.default_rng(seed + 1), dtype=np.float64)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    if X is None:
        X = rng.standard_normal((batch, *input_shape))
    X = np.asarray(X, dtype=np.float64)
    Y, backprop = layer.forward(params, X, training=training, rng=np.random.default_rng(seed + 2))
    assert Y.shape[1:] == tuple(layer.output_shape), f"output {Y.shape} vs {layer.output_shape}"
    R = rng.standard_normal(Y.shape)
    dX, grads = backprop(R)
    assert set(grads) == set(params), f"grads keys {set(grads)} != params keys {set(params)}"

    def f(arrs):
        p = {k: arrs["p." + k] for k in params}
        Yp, _ = layer.forward(p, arrs["X"], training=training, rng=np.random.default_rng(seed + 2))
        return float(np.sum(Yp * R))

    arrays = {"X": X, **{"p." + k: v for k, v in params.items()}}
    analytic = {"X": dX, **{"p." + k: g for k, g in grads.items()}}
    check_grad(f, arrays, analytic, per_element=per_element, rtol=rtol, atol=atol, seed=seed)
    return Y, dX, grads


def check_loss(loss_fn, Y, y, *, rtol: float = 1e-5, atol: float = 1e-7, **kwargs):
    """Gradient-check a loss ``loss_fn(Y, y, **kwargs) -> (loss, dY)`` w.r.t. ``Y`` (float64)."""
    Y = np.asarray(Y, dtype=np.float64)
    loss, dY = loss_fn(Y, y, **kwargs)
    check_grad(lambda a: float(loss_fn(a["Y"], y, **kwargs)[0]), {"Y": Y}, {"Y": dY},
               rtol=rtol, atol=atol)
    return loss, dY
