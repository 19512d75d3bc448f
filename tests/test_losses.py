"""Losses: gradient checks, PyTorch parity, stability, partition sums and error messages."""
import doctest

import numpy as np
import pytest
from gradcheck import check_loss

import rddtensor.optim.losses as losses_module
from rddtensor.optim.losses import (BinaryCrossentropy, CategoricalCrossentropy, Hinge, Huber, Loss,
                          SparseCategoricalCrossentropy, binary_crossentropy,
                          categorical_crossentropy, get_loss, hinge, huber, mae, mse,
                          sparse_categorical_crossentropy)

B, C = 7, 5
ALL = [mse, mae, huber, Huber(0.3), binary_crossentropy, BinaryCrossentropy(0.1),
       categorical_crossentropy, CategoricalCrossentropy(0.2), sparse_categorical_crossentropy,
       SparseCategoricalCrossentropy(0.1), hinge]
CLASS_WEIGHTED = [binary_crossentropy, categorical_crossentropy, sparse_categorical_crossentropy,
                  hinge]


def make_case(loss, rng, batch=B, shape=None, scale=2.0):
    """Logits/predictions and valid targets for ``loss`` (hinge: binary unless ``shape``)."""
    if loss.task == "regression":
        shape = shape or (batch, 3)
        return rng.standard_normal(shape) * scale, rng.standard_normal(shape)
    if isinstance(loss, (BinaryCrossentropy, Hinge)) and shape is None:
        return rng.standard_normal((batch, 1)) * scale, rng.integers(0, 2, batch)
    shape = shape or (batch, C)
    Y = rng.standard_normal(shape) * scale
    labels = rng.integers(0, shape[1], batch)
    if isinstance(loss, CategoricalCrossentropy):
        return Y, rng.dirichlet(np.ones(shape[1]), size=batch)
    return Y, labels


def test_docstring_examples_run():
    assert doctest.testmod(losses_module).failed == 0


# --- gradient checks ------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ALL, ids=repr)
def test_gradcheck(loss):
    Y, y = make_case(loss, np.random.default_rng(0))
    check_loss(loss, Y, y)
    check_loss(loss, Y, y, n_total=23)
    check_loss(loss, Y, y, sample_weight=np.random.default_rng(1).uniform(0.1, 3, B), n_total=11)


@pytest.mark.parametrize("loss", CLASS_WEIGHTED, ids=repr)
def test_gradcheck_class_weight(loss):
    Y, y = make_case(loss, np.random.default_rng(2))
    C_ = 2 if loss.task == "binary" else C
    check_loss(loss, Y, y, class_weight={0: 2.0, 1: 0.5}, n_total=9)
    check_loss(loss, Y, y, class_weight=np.linspace(0.5, 3, C_),
               sample_weight=np.linspace(1, 2, B))


@pytest.mark.parametrize("loss", [mse, mae, huber, binary_crossentropy], ids=repr)
def test_gradcheck_shapes(loss):
    rng = np.random.default_rng(3)
    for shape in [(B,), (B, 1), (B, 2, 3)]:
        Y = rng.standard_normal(shape) * 2
        y = rng.integers(0, 2, shape) if loss.task == "binary" else rng.standard_normal(shape)
        check_loss(loss, Y, y, n_total=10)


def test_gradcheck_multiclass_hinge():
    rng = np.random.default_rng(4)
    Y, y = rng.standard_normal((B, C)), rng.integers(0, C, B)
    check_loss(hinge, Y, y)
    check_loss(hinge, Y, np.eye(C)[y], class_weight={3: 4.0}, n_total=20)


# --- PyTorch parity --------------------------------------------------------------------------

def torch_reference(fn, Y, *args, **kwargs):
    torch = pytest.importorskip("torch")
    Yt = torch.tensor(Y, requires_grad=True)
    out = fn(Yt, *args, **kwargs)
    out.backward()
    return out.item(), Yt.grad.numpy()


def assert_matches(ours, ref, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(ours[0], ref[0], rtol=rtol, atol=atol)
    np.testing.assert_allclose(ours[1], ref[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(B,), (B, 1), (B, 3)])
def test_regression_matches_torch(shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    Y, y = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    yt = torch.tensor(y)
    assert_matches(mse(Y, y), torch_reference(F.mse_loss, Y, yt))
    assert_matches(mae(Y, y), torch_reference(F.l1_loss, Y, yt))
    assert_matches(huber(Y, y), torch_reference(F.huber_loss, Y, yt))
    assert_matches(Huber(0.4)(Y, y), torch_reference(F.huber_loss, Y, yt, delta=0.4))


def test_bce_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(6)
    Y, y = rng.standard_normal((B, 1)) * 3, rng.integers(0, 2, (B, 1)).astype(np.float64)
    yt = torch.tensor(y)
    assert_matches(binary_crossentropy(Y, y), torch_reference(F.binary_cross_entropy_with_logits,
                                                              Y, yt))
    # torch's per-element `weight` rescales without renormalising: Keras sample_weight semantics
    w = rng.uniform(0.1, 2, B)
    assert_matches(binary_crossentropy(Y, y, sample_weight=w),
                   torch_reference(F.binary_cross_entropy_with_logits, Y, yt,
                                   weight=torch.tensor(w[:, None])))
    smoothed = torch.tensor(y * 0.8 + 0.1)
    assert_matches(BinaryCrossentropy(0.2)(Y, y),
                   torch_reference(F.binary_cross_entropy_with_logits, Y, smoothed))


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_cross_entropy_matches_torch(smoothing):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    Y, labels = rng.standard_normal((B, C)) * 3, rng.integers(0, C, B)
    target = torch.tensor(labels)
    ref = torch_reference(F.cross_entropy, Y, target, label_smoothing=smoothing)
    assert_matches(SparseCategoricalCrossentropy(smoothing)(Y, labels), ref)
    assert_matches(CategoricalCrossentropy(smoothing)(Y, np.eye(C)[labels]), ref)
    probs = rng.dirichlet(np.ones(C), size=B)
    assert_matches(CategoricalCrossentropy(smoothing)(Y, probs),
                   torch_reference(F.cross_entropy, Y, torch.tensor(probs),
                                   label_smoothing=smoothing))


def test_class_weighted_cross_entropy_vs_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(8)
    Y, labels = rng.standard_normal((B, C)), rng.integers(0, C, B)
    target = torch.tensor(labels)
    # unit weights: torch's weighted mean (divides by the sum of weights) is the plain mean
    ones = np.ones(C)
    assert_matches(sparse_categorical_crossentropy(Y, labels, class_weight=ones),
                   torch_reference(F.cross_entropy, Y, target, weight=torch.tensor(ones)))
    # other weights: we divide by n (Keras), so compare with reduction='none' summed over n
    weights = rng.uniform(0.2, 3, C)
    ref = torch_reference(lambda Yt: F.cross_entropy(Yt, target, weight=torch.tensor(weights),
                                                     reduction="none").sum() / 11, Y)
    assert_matches(sparse_categorical_crossentropy(Y, labels, class_weight=weights, n_total=11),
                   ref)
    as_dict = dict(enumerate(weights))
    assert_matches(categorical_crossentropy(Y, np.eye(C)[labels], class_weight=as_dict,
                                            n_total=11), ref)
    # and torch's own weighted mean is ours rescaled by n / sum of the row weights
    torch_mean = F.cross_entropy(torch.tensor(Y), target, weight=torch.tensor(weights)).item()
    ours = sparse_categorical_crossentropy(Y, labels, class_weight=weights)[0]
    np.testing.assert_allclose(ours * B / weights[labels].sum(), torch_mean, rtol=1e-12)


def test_hinge_matches_torch_multi_margin():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(9)
    # binary hinge max(0, 1 - t s) is 2 * multi_margin_loss on the two scores (0, s)
    s, labels = rng.standard_normal(B) * 2, rng.integers(0, 2, B)
    target = torch.tensor(labels)
    ref = torch_reference(lambda st: 2 * F.multi_margin_loss(
        torch.stack([torch.zeros_like(st), st], dim=1), target), s)
    assert_matches(hinge(s, labels), ref)
    assert_matches(hinge(s, 2 * labels - 1), ref)  # -1/+1 labels
    # with C = 2 Crammer-Singer is twice torch's (Weston-Watkins) multi_margin_loss
    Y2 = rng.standard_normal((B, 2)) * 2
    assert_matches(hinge(Y2, labels),
                   torch_reference(lambda Yt: 2 * F.multi_margin_loss(Yt, target), Y2))


def test_crammer_singer_matches_torch_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    Y, labels = rng.standard_normal((B, C)) * 2, rng.integers(0, C, B)
    target = torch.tensor(labels)

    def crammer_singer(Yt):
        true = Yt.gather(1, target[:, None])[:, 0]
        others = Yt.masked_fill(torch.nn.functional.one_hot(target, C).bool(), -torch.inf)
        return torch.clamp(1 + others.max(dim=1).values - true, min=0).mean()

    assert_matches(hinge(Y, labels), torch_reference(crammer_singer, Y))


# --- numerics, dtype, partitions --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_at_huge_logits(dtype):
    Yc = np.array([[1000, -1000, 0], [-1000, 1000, 999], [1000, 1000, -1000]], dtype=dtype)
    labels = np.array([1, 0, 2])
    Yb = np.array([1000, -1000, 1000, -1000], dtype=dtype)
    yb = np.array([1, 1, 0, 0])
    cases = [(sparse_categorical_crossentropy, Yc, labels),
             (SparseCategoricalCrossentropy(0.1), Yc, labels),
             (categorical_crossentropy, Yc, np.eye(3)[labels]), (hinge, Yc, labels),
             (binary_crossentropy, Yb, yb), (hinge, Yb, yb)]
    for loss_fn, Y, y in cases:
        loss, dY = loss_fn(Y, y)
        assert np.isfinite(loss) and np.all(np.isfinite(dY)), loss_fn
        assert dY.dtype == dtype and dY.shape == Y.shape
    loss, dY = binary_crossentropy(Yb, yb)
    np.testing.assert_allclose(loss, 2000 / 4, rtol=1e-6)
    np.testing.assert_allclose(dY, [0, -0.25, 0.25, 0], atol=1e-7)
    loss, dY = sparse_categorical_crossentropy(Yc, labels)
    expected = 2000 + (np.log1p(np.exp(-1.0)) + np.log(2.0)) / 3  # rows 1 and 2 have rivals
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert np.isfinite(binary_crossentropy.link(Yb)).all()
    assert np.isfinite(sparse_categorical_crossentropy.link(Yc)).all()


@pytest.mark.parametrize("loss", ALL, ids=repr)
def test_float32_keeps_dtype_and_matches_float64(loss):
    Y, y = make_case(loss, np.random.default_rng(11))
    l64, d64 = loss(Y, y)
    l32, d32 = loss(Y.astype(np.float32), y)
    assert d32.dtype == np.float32 and d32.shape == Y.shape
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    np.testing.assert_allclose(d32, d64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss,shape", [(loss, None) for loss in ALL] + [(hinge, (10, C))],
                         ids=lambda v: repr(v) if isinstance(v, Loss) else str(v))
@pytest.mark.parametrize("weighted", [False, True])
def test_partitions_sum_to_full_batch(loss, shape, weighted):
    rng = np.random.default_rng(12)
    n = 10
    Y, y = make_case(loss, rng, batch=n, shape=shape)
    kwargs = {}
    if weighted:
        kwargs["sample_weight"] = rng.uniform(0.1, 2, n)
        if loss.task != "regression":
            kwargs["class_weight"] = {0: 3.0, 1: 0.5}
    full_loss, full_dY = loss(Y, y, **kwargs)
    total, parts = 0.0, []
    for part in np.split(np.arange(n), [3, 3, 7]):  # sizes 3, 0, 4, 3: one empty
        part_kwargs = {k: v[part] if k == "sample_weight" else v for k, v in kwargs.items()}
        part_loss, part_dY = loss(Y[part], y[part], n_total=n, **part_kwargs)
        total += part_loss
        parts.append(part_dY)
    np.testing.assert_allclose(total, full_loss, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(parts), full_dY, rtol=1e-12)


def test_empty_batch():
    loss, dY = sparse_categorical_crossentropy(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert loss == 0.0 and dY.shape == (0, 3)
    loss, dY = mse(np.zeros((0,)), np.zeros((0,)), n_total=8)
    assert loss == 0.0 and dY.shape == (0,)


def test_known_values():
    assert mae(np.array([0.0, 1.0, -2.0]), np.zeros(3))[1].tolist() == [0.0, 1 / 3, -1 / 3]
    np.testing.assert_allclose(hinge(np.array([[3.0, 1.0, 2.5]]), np.array([0]))[0], 0.5)
    np.testing.assert_allclose(hinge(np.array([[3.0, 1.0, 2.5]]), np.array([0]))[1],
                               [[-1.0, 0.0, 1.0]])


# --- shapes and errors ------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [mse, mae, huber], ids=repr)
def test_regression_shapes_never_broadcast(loss):
    Y = np.arange(4.0)
    expected = loss(Y, np.zeros(4))
    for Yshape, yshape in [((4,), (4, 1)), ((4, 1), (4,)), ((4, 1), (4, 1))]:
        result = loss(Y.reshape(Yshape), np.zeros(yshape))
        assert result[1].shape == Yshape
        np.testing.assert_allclose(result[0], expected[0])
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*shape \(4, 1\)"):
        loss(Y.reshape(4, 1), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(4,\)"):
        loss(Y, np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*shape \(4, 3\)"):
        loss(np.zeros((4, 3)), np.zeros((4, 2)))


def test_bad_labels_are_named():
    Y = np.zeros((8, 10))
    labels = np.array([0, 1, 2, 3, 4, 12, 6, 7])
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 10\), got 12 at row 5"):
        sparse_categorical_crossentropy(Y, labels)
    with pytest.raises(ValueError, match=r"got -1 at row 0"):
        sparse_categorical_crossentropy(Y, -np.ones(8))
    with pytest.raises(ValueError, match=r"got 2.5 at row 3"):
        sparse_categorical_crossentropy(Y, np.array([0, 1, 2, 2.5, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match=r"got nan at row 1"):
        sparse_categorical_crossentropy(Y, np.array([0, np.nan, 2, 3, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match=r"got 12 at row 5"):
        hinge(Y, labels)
    with pytest.raises(ValueError, match=r"hinge labels must be 0/1 or -1/\+1, got 2 at row 1"):
        hinge(np.zeros(3), np.array([0, 2, 1]))
    # float labels that are whole numbers are fine
    a = sparse_categorical_crossentropy(Y, labels.clip(0, 9).astype(np.float32))
    b = sparse_categorical_crossentropy(Y, labels.clip(0, 9))
    assert a[0] == b[0]


def test_target_shape_errors():
    with pytest.raises(ValueError, match="use categorical_crossentropy"):
        sparse_categorical_crossentropy(np.zeros((4, 3)), np.eye(3)[[0, 1, 2, 0]])
    with pytest.raises(ValueError, match="use sparse_categorical_crossentropy"):
        categorical_crossentropy(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\), got \(4,\)"):
        sparse_categorical_crossentropy(np.zeros(4), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"sample_weight has shape \(3,\).*4 rows"):
        mse(np.zeros(4), np.zeros(4), sample_weight=np.ones(3))


def test_argument_errors():
    with pytest.raises(ValueError, match="n_total must be a positive number"):
        mse(np.zeros(4), np.zeros(4), n_total=0)
    with pytest.raises(ValueError, match="class_weight applies to classification losses"):
        mse(np.zeros(4), np.zeros(4), class_weight={0: 1.0})
    with pytest.raises(ValueError, match=r"class_weight keys must be class ids in \[0, 2\)"):
        binary_crossentropy(np.zeros(4), np.zeros(4), class_weight={-1: 2.0})
    with pytest.raises(ValueError, match=r"array of length 3.*got shape \(2,\)"):
        sparse_categorical_crossentropy(np.zeros((2, 3)), [0, 1], class_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="multi-label"):
        binary_crossentropy(np.zeros((4, 2)), np.zeros((4, 2)), class_weight={1: 2.0})
    with pytest.raises(ValueError, match="delta must be a positive number, got 0"):
        Huber(0)
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        CategoricalCrossentropy(label_smoothing=1.5)


def test_class_weight_semantics():
    """Missing classes weigh 1; the divisor stays n_total (Keras), not the sum of weights."""
    rng = np.random.default_rng(13)
    Y, labels = rng.standard_normal((6, 3)), np.array([0, 1, 2, 0, 1, 2])
    per = sparse_categorical_crossentropy(Y, labels, n_total=1)  # n_total=1: plain sums
    rows = [sparse_categorical_crossentropy(Y[[i]], labels[[i]])[0] for i in range(6)]
    np.testing.assert_allclose(per[0], sum(rows))
    weighted = sparse_categorical_crossentropy(Y, labels, class_weight={2: 5.0})[0]
    expected = sum(r * (5.0 if lab == 2 else 1.0) for r, lab in zip(rows, labels)) / 6
    np.testing.assert_allclose(weighted, expected)
    # binary: a target counts as class 1 when above 0.5; -1/+1 hinge labels map to classes 0/1
    s = rng.standard_normal(4)
    a = hinge(s, np.array([-1, 1, 1, -1]), class_weight={0: 2.0})
    b = hinge(s, np.array([0, 1, 1, 0]), sample_weight=np.array([2.0, 1, 1, 2]))
    assert_matches(a, b)


# --- link, task, lookup ---------------------------------------------------------------------

def test_link_and_task():
    Y = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    np.testing.assert_allclose(sparse_categorical_crossentropy.link(Y), [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(categorical_crossentropy.link(Y).sum(axis=1), 1)
    np.testing.assert_allclose(binary_crossentropy.link(np.array([0.0, np.log(3.0)])), [0.5, 0.75])
    np.testing.assert_allclose(hinge.link(np.array([0.0])), [0.5])
    assert mse.link(Y) is Y
    assert {loss.task for loss in [mse, mae, huber]} == {"regression"}
    assert binary_crossentropy.task == hinge.task == "binary"
    assert categorical_crossentropy.task == sparse_categorical_crossentropy.task == "multiclass"


def test_get_loss():
    for name, expected in [("mse", mse), ("Mean_Squared_Error", mse), ("MAE", mae),
                           ("huber", huber), ("bce", binary_crossentropy),
                           ("binary_crossentropy", binary_crossentropy),
                           ("categorical_crossentropy", categorical_crossentropy),
                           ("sparse_categorical_crossentropy", sparse_categorical_crossentropy),
                           ("HINGE", hinge)]:
        loss = get_loss(name)
        assert isinstance(loss, Loss) and type(loss) is type(expected)
        assert loss.name == expected.name
    assert get_loss(huber) is huber
    assert get_loss("huber", delta=2.0).delta == 2.0
    for loss in ALL:
        config = loss.get_config()
        assert repr(get_loss(config.pop("name"), **config)) == repr(loss)
    with pytest.raises(ValueError, match=r"unknown loss 'xyz'; known losses: \[.*'mse'"):
        get_loss("xyz")
    with pytest.raises(TypeError, match="subclass rddtensor.optim.losses.Loss"):
        get_loss(lambda Y, y: (0.0, Y))


def test_losses_pickle_small():
    import pickle
    for loss in ALL:
        clone = pickle.loads(pickle.dumps(loss))
        assert repr(clone) == repr(loss)
        assert len(pickle.dumps(loss)) < 200
