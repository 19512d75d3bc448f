"""Gradient clipping: torch.nn.utils equivalence, float64 accumulation, blockwise factor."""
import doctest
import math

import numpy as np
import pytest

import rddtensor.optim.clipping as clipping
from rddtensor.optim.clipping import (clip_by_global_norm, clip_by_value, global_norm, norm_clip_scale,
                            sum_of_squares)


def _grads(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) * scale for shape in [(5, 3), (7,), (2, 2, 2)]]


def test_global_norm_of_flat_array_and_list():
    grads = _grads()
    flat = np.concatenate([g.ravel() for g in grads])
    expected = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    assert global_norm(grads) == pytest.approx(expected, rel=1e-14)
    assert global_norm(flat) == pytest.approx(expected, rel=1e-14)
    assert global_norm([]) == 0.0
    assert global_norm(np.zeros(0, np.float32)) == 0.0


def test_float32_accumulates_in_float64():
    x = np.random.default_rng(1).normal(size=3_000_001).astype(np.float32)  # > one chunk
    expected = float(np.sum(x.astype(np.float64) ** 2))
    assert sum_of_squares(x) == pytest.approx(expected, rel=1e-13)
    assert isinstance(sum_of_squares(x), float)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_by_global_norm_matches_torch(max_norm):
    torch = pytest.importorskip("torch")
    grads = _grads(scale=0.5)
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    total = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    scale = clip_by_global_norm(grads, max_norm)
    assert scale == pytest.approx(min(1.0, max_norm / (total + 1e-6)), rel=1e-14)
    for g, p in zip(grads, params):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14, atol=0)


def test_no_clipping_leaves_gradients_bit_identical():
    grads = _grads()
    before = [g.copy() for g in grads]
    assert clip_by_global_norm(grads, 1e6) == 1.0
    assert all(np.array_equal(a, b) for a, b in zip(grads, before))


def test_clip_in_place_keeps_float32():
    g = np.full(4, 2.0, np.float32)
    scale = clip_by_global_norm(g, 1.0)
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, np.full(4, 2.0 * scale), rtol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(g), 1.0, rtol=1e-5)


def test_blockwise_factor_equals_whole_factor():
    flat = np.random.default_rng(2).normal(size=1000)
    blocks = np.array_split(flat, 3)
    sq = sum(sum_of_squares(b) for b in blocks)
    assert norm_clip_scale(sq, 2.0) == pytest.approx(clip_by_global_norm(flat.copy(), 2.0),
                                                     rel=1e-14)


def test_nan_norm_gives_nan_factor_like_torch():
    g = np.array([np.nan, 1.0])
    assert math.isnan(clip_by_global_norm(g, 1.0))


def test_clip_by_value_matches_torch():
    torch = pytest.importorskip("torch")
    grads = _grads(scale=2.0)
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_(params, 0.7)
    assert clip_by_value(grads, 0.7) is None
    for g, p in zip(grads, params):
        np.testing.assert_array_equal(g, p.grad.numpy())


def test_clip_by_value_single_array():
    g = np.array([-3.0, 0.25, 9.0], np.float32)
    clip_by_value(g, 1.0)
    np.testing.assert_array_equal(g, np.array([-1.0, 0.25, 1.0], np.float32))


@pytest.mark.parametrize("call, match", [
    (lambda: clip_by_global_norm(np.ones(2), 0), "max_norm must be a finite number > 0, got 0"),
    (lambda: clip_by_global_norm(np.ones(2), -1.0), r"max_norm .* got -1\.0"),
    (lambda: norm_clip_scale(4.0, float("inf")), "max_norm .* got inf"),
    (lambda: clip_by_value(np.ones(2), 0.0), r"clip_value must be a finite number > 0, got 0\.0"),
    (lambda: clip_by_value(np.ones(2), "1"), "clip_value .* got '1'"),
])
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples():
    assert doctest.testmod(clipping).failed == 0
