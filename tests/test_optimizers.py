"""Optimizers: torch.optim equivalence, blockwise application, LARS/LAMB references, configs."""
import doctest
import json

import numpy as np
import pytest

import rddtensor.optim.optimizers as optimizers
from rddtensor.optim.optimizers import (LAMB, LARS, SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop,
                              get_optimizer, lars_update, serialize_optimizer)
from rddtensor.optim.schedules import CosineDecay, LinearWarmup, StepDecay

N_STEPS = 5

# (our optimizer, torch class name, torch kwargs, {our slot: torch state key})
SGD_SLOTS = {"momentum": "momentum_buffer"}
ADAM_SLOTS = {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"}
RMS_SLOTS = {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum": "momentum_buffer"}
CASES = {
    "sgd": (lambda: SGD(0.1), "SGD", dict(lr=0.1), SGD_SLOTS),
    "sgd-wd": (lambda: SGD(0.05, weight_decay=0.1), "SGD", dict(lr=0.05, weight_decay=0.1),
               SGD_SLOTS),
    "sgd-momentum": (lambda: SGD(0.1, momentum=0.9), "SGD", dict(lr=0.1, momentum=0.9), SGD_SLOTS),
    "sgd-dampening": (lambda: SGD(0.1, momentum=0.8, dampening=0.3, weight_decay=0.01), "SGD",
                      dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01), SGD_SLOTS),
    "sgd-nesterov": (lambda: SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01), "SGD",
                     dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), SGD_SLOTS),
    "adam": (lambda: Adam(), "Adam", dict(), ADAM_SLOTS),
    "adam-hyper": (lambda: Adam(0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1), "Adam",
                   dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), ADAM_SLOTS),
    "adam-amsgrad": (lambda: Adam(0.01, weight_decay=0.05, amsgrad=True), "Adam",
                     dict(lr=0.01, weight_decay=0.05, amsgrad=True), ADAM_SLOTS),
    "adamw": (lambda: AdamW(), "AdamW", dict(), ADAM_SLOTS),
    "adamw-amsgrad": (lambda: AdamW(0.01, beta1=0.5, weight_decay=0.1, amsgrad=True), "AdamW",
                      dict(lr=0.01, betas=(0.5, 0.999), weight_decay=0.1, amsgrad=True),
                      ADAM_SLOTS),
    "rmsprop": (lambda: RMSprop(), "RMSprop", dict(lr=0.01), RMS_SLOTS),
    "rmsprop-centered": (lambda: RMSprop(0.01, alpha=0.9, eps=1e-6, centered=True), "RMSprop",
                         dict(lr=0.01, alpha=0.9, eps=1e-6, centered=True), RMS_SLOTS),
    "rmsprop-momentum": (lambda: RMSprop(0.01, momentum=0.9, weight_decay=0.1), "RMSprop",
                         dict(lr=0.01, momentum=0.9, weight_decay=0.1), RMS_SLOTS),
    "rmsprop-all": (lambda: RMSprop(0.02, alpha=0.95, momentum=0.5, centered=True,
                                    weight_decay=0.01), "RMSprop",
                    dict(lr=0.02, alpha=0.95, momentum=0.5, centered=True, weight_decay=0.01),
                    RMS_SLOTS),
    "adagrad": (lambda: Adagrad(), "Adagrad", dict(lr=0.01), {"sum": "sum"}),
    "adagrad-all": (lambda: Adagrad(0.1, lr_decay=0.1, weight_decay=0.1,
                                    initial_accumulator_value=0.5, eps=1e-6), "Adagrad",
                    dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5,
                         eps=1e-6), {"sum": "sum"}),
}


def _data(n=101, steps=N_STEPS, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=n)
    # varying gradient scale exercises AMSGrad's running maximum
    grads = [rng.normal(size=n) * rng.uniform(0.1, 3.0) for _ in range(steps)]
    return w0, grads


def _run_ours(opt, w0, grads, dtype):
    w, slots = w0.astype(dtype), opt.init_slots(w0.size, dtype=dtype)
    history = []
    for t, g in enumerate(grads, 1):
        opt.update(w, g.astype(dtype), slots, t)
        history.append(w.copy())
    return history, slots


def _run_torch(torch, name, kwargs, w0, grads, dtype, scheduler=None):
    p = torch.nn.Parameter(torch.tensor(w0, dtype=dtype))
    opt = getattr(torch.optim, name)([p], foreach=False, **kwargs)
    sched = scheduler(opt) if scheduler else None
    history = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        if sched is not None:
            sched.step()
        history.append(p.detach().numpy().copy())
    return history, opt.state[p]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_float64(case):
    torch = pytest.importorskip("torch")
    make, name, kwargs, slot_keys = CASES[case]
    opt = make()
    w0, grads = _data()
    ours, slots = _run_ours(opt, w0, grads, np.float64)
    ref, state = _run_torch(torch, name, kwargs, w0, grads, torch.float64)
    for t, (a, b) in enumerate(zip(ours, ref), 1):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{case} step {t}")
    for slot in opt.slot_names:
        np.testing.assert_allclose(slots[slot], state[slot_keys[slot]].numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=f"{case} slot {slot}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_float32(case):
    torch = pytest.importorskip("torch")
    make, name, kwargs, _ = CASES[case]
    w0, grads = _data(seed=1)
    ours, _ = _run_ours(make(), w0, grads, np.float32)
    ref, _ = _run_torch(torch, name, kwargs, w0, grads, torch.float32)
    assert ours[-1].dtype == np.float32
    np.testing.assert_allclose(ours[-1], ref[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_opt, name, kwargs, make_sched", [
    (lambda: SGD(StepDecay(0.1, step_size=2, gamma=0.5), momentum=0.9), "SGD",
     dict(lr=0.1, momentum=0.9), lambda torch, o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)),
    (lambda: Adam(CosineDecay(0.01, total_steps=6, min_lr=0.001)), "Adam", dict(lr=0.01),
     lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=0.001)),
])
def test_schedule_matches_torch_scheduler(make_opt, name, kwargs, make_sched):
    torch = pytest.importorskip("torch")
    w0, grads = _data(steps=7)
    ours, _ = _run_ours(make_opt(), w0, grads, np.float64)
    ref, _ = _run_torch(torch, name, kwargs, w0, grads, torch.float64,
                        scheduler=lambda o: make_sched(torch, o))
    np.testing.assert_allclose(ours[-1], ref[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_is_bit_identical(case):
    opt = CASES[case][0]()
    w0, grads = _data()
    whole, whole_slots = _run_ours(opt, w0, grads, np.float32)
    cuts = [0, 17, 17, 60, 101]  # uneven, with an empty block
    w = w0.astype(np.float32)
    blocks = [(a, b, opt.init_slots(b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float32)
        for a, b, slots in blocks:
            opt.update(w[a:b], g[a:b].copy(), slots, t)
    assert np.array_equal(w, whole[-1])
    for name in opt.slot_names:
        assert np.array_equal(np.concatenate([s[name] for _, _, s in blocks]), whole_slots[name])


# ---------------------------------------------------------------------------- LARS / LAMB

LAYERS = [7, 12, 1, 30, 5]
BOUNDS = np.cumsum([0] + LAYERS)
SEGMENTS = list(zip(BOUNDS[:-1].tolist(), BOUNDS[1:].tolist()))


def _layers(x):
    return [x[a:b] for a, b in SEGMENTS]


def _lars_reference(w0, grads, lr, momentum, weight_decay, trust_coefficient, eps):
    """Per-layer LARS as torchlars: local lr, scaled gradient, then SGD with momentum."""
    ws = [x.copy() for x in _layers(w0)]
    bufs = [None] * len(ws)
    for g_all in grads:
        for i, (w, g) in enumerate(zip(ws, _layers(g_all))):
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            local = (trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
                     if w_norm > 0 and g_norm > 0 else 1.0)
            d = local * (g + weight_decay * w)
            if momentum:
                bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
                d = bufs[i]
            ws[i] = w - lr * d
    return np.concatenate(ws)


def _lamb_reference(w0, grads, lr, beta1, beta2, eps, weight_decay):
    """Per-layer LAMB, You et al. 2019 Algorithm 2 with bias correction."""
    ws = [x.copy() for x in _layers(w0)]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t, g_all in enumerate(grads, 1):
        for i, g in enumerate(_layers(g_all)):
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            m_hat, v_hat = ms[i] / (1 - beta1 ** t), vs[i] / (1 - beta2 ** t)
            u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * ws[i]
            w_norm, u_norm = np.linalg.norm(ws[i]), np.linalg.norm(u)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            ws[i] = ws[i] - lr * ratio * u
    return np.concatenate(ws)


def _lars_lamb_data(zero_layer=False):
    w0, grads = _data(n=int(BOUNDS[-1]))
    if zero_layer:  # a zero-initialised layer takes the trust ratio 1
        w0[BOUNDS[1]:BOUNDS[2]] = 0.0
    return w0, grads


LARS_CONFIGS = [dict(lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8),
                dict(lr=0.5, momentum=0.0, weight_decay=0.01, trust_coefficient=0.02, eps=1e-8),
                dict(lr=2.0, momentum=0.8, weight_decay=1e-4, trust_coefficient=0.01, eps=1e-6)]
LAMB_CONFIGS = [dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0),
                dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.01)]


@pytest.mark.parametrize("zero_layer", [False, True])
@pytest.mark.parametrize("config", LARS_CONFIGS)
def test_lars_matches_reference(config, zero_layer):
    w0, grads = _lars_lamb_data(zero_layer)
    opt, w = LARS(**config), w0.copy()
    slots = opt.init_slots(w.size, dtype=np.float64)
    for t, g in enumerate(grads, 1):
        opt.update(w, g.copy(), slots, t, segments=SEGMENTS)
    np.testing.assert_allclose(w, _lars_reference(w0, grads, **config), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("zero_layer", [False, True])
@pytest.mark.parametrize("config", LAMB_CONFIGS)
def test_lamb_matches_reference(config, zero_layer):
    w0, grads = _lars_lamb_data(zero_layer)
    opt, w = LAMB(**config), w0.copy()
    slots = opt.init_slots(w.size, dtype=np.float64)
    for t, g in enumerate(grads, 1):
        opt.update(w, g.copy(), slots, t, segments=SEGMENTS)
    np.testing.assert_allclose(w, _lamb_reference(w0, grads, **config), rtol=1e-12, atol=1e-14)


def _pieces(a, b):
    """The layer pieces inside block [a, b): (layer index, start, stop) relative to the block."""
    out = []
    for i, (s, e) in enumerate(SEGMENTS):
        lo, hi = max(s, a), min(e, b)
        if lo < hi:
            out.append((i, lo - a, hi - a))
    return out


def _run_whole(opt, w0, grads):
    w, slots = w0.astype(np.float32), opt.init_slots(w0.size)
    for t, g in enumerate(grads, 1):
        opt.update(w, g.astype(np.float32), slots, t, segments=SEGMENTS)
    return w


@pytest.mark.parametrize("opt", [LARS(**LARS_CONFIGS[0]), LARS(**LARS_CONFIGS[1]),
                                 LAMB(**LAMB_CONFIGS[1])])
def test_lars_lamb_blocks_on_layer_boundaries_are_bit_identical(opt):
    w0, grads = _lars_lamb_data()
    cuts = [0, int(BOUNDS[2]), int(BOUNDS[2]), int(BOUNDS[3]), int(BOUNDS[-1])]
    w = w0.astype(np.float32)
    blocks = [(a, b, opt.init_slots(b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float32)
        for a, b, slots in blocks:
            segs = [(s, e) for _, s, e in _pieces(a, b)] or [(0, 0)]
            opt.update(w[a:b], g[a:b].copy(), slots, t, segments=segs)
    assert np.array_equal(w, _run_whole(opt, w0, grads))


@pytest.mark.parametrize("segments", [[(0, 5)], [(0, 5), (6, 10)], [(0, 6), (5, 10)],
                                      [(5, 10), (0, 5)], [(0, 11)]])
def test_segments_must_tile_the_slice(segments):
    w, g, buf = np.ones(10), np.ones(10), np.zeros(10)
    with pytest.raises(ValueError, match="segments must tile"):
        lars_update(np, w, g, buf, lr=1.0, momentum=0.9, weight_decay=0.0,
                    trust_coefficient=0.001, eps=1e-8, step=1, segments=segments)


# ---------------------------------------------------------------------------- class API

@pytest.mark.parametrize("opt, names", [
    (SGD(), ()), (SGD(momentum=0.9), ("momentum",)), (Adam(), ("m", "v")),
    (Adam(amsgrad=True), ("m", "v", "vmax")), (AdamW(), ("m", "v")),
    (RMSprop(), ("square_avg",)), (RMSprop(momentum=0.5, centered=True),
                                   ("square_avg", "grad_avg", "momentum")),
    (Adagrad(), ("sum",)), (LARS(), ("momentum",)), (LARS(momentum=0.0), ()),
    (LAMB(), ("m", "v")),
])
def test_slot_names_and_init_slots(opt, names):
    assert opt.slot_names == names
    slots = opt.init_slots(4, dtype=np.float64)
    assert set(slots) == set(names)
    assert all(s.shape == (4,) and s.dtype == np.float64 for s in slots.values())
    assert all(s.dtype == np.float32 for s in opt.init_slots(3).values())


def test_adagrad_initial_accumulator():
    np.testing.assert_array_equal(Adagrad(initial_accumulator_value=0.25).init_slots(3)["sum"],
                                  np.full(3, 0.25, np.float32))


def test_learning_rate_float_schedule_and_callable():
    assert SGD(0.5).learning_rate(7) == 0.5
    assert SGD(StepDecay(1.0, step_size=1, gamma=0.5)).learning_rate(3) == 0.25
    assert SGD(lambda t: 1.0 / t).learning_rate(4) == 0.25
    with pytest.raises(ValueError, match="1-based"):
        SGD(0.5).learning_rate(0)
    with pytest.raises(ValueError, match="1-based"):
        Adam().update(np.ones(2), np.ones(2), Adam().init_slots(2), step=0)


@pytest.mark.parametrize("cls, kwargs, match", [
    (SGD, dict(lr=-0.1), r"invalid learning rate: -0\.1"),
    (SGD, dict(lr="fast"), "invalid learning rate: 'fast'"),
    (Adam, dict(lr=float("nan")), "invalid learning rate: nan"),
    (SGD, dict(momentum=-0.5), r"invalid momentum: -0\.5"),
    (SGD, dict(dampening=1.5), r"invalid dampening: 1\.5"),
    (SGD, dict(weight_decay=-1), "invalid weight_decay: -1"),
    (SGD, dict(nesterov=True), "invalid nesterov.*momentum > 0 and dampening = 0"),
    (SGD, dict(momentum=0.9, dampening=0.1, nesterov=True), r"dampening=0\.1"),
    (SGD, dict(nesterov="yes"), "invalid nesterov: 'yes'"),
    (SGD, dict(clipnorm=0), "invalid clipnorm: 0"),
    (Adam, dict(beta1=1.0), r"invalid beta1: 1\.0"),
    (Adam, dict(beta2=-0.1), r"invalid beta2: -0\.1"),
    (Adam, dict(eps=-1e-8), "invalid eps: -1e-08"),
    (Adam, dict(amsgrad=None), "invalid amsgrad: None"),
    (Adam, dict(clipvalue=-1.0), r"invalid clipvalue: -1\.0"),
    (AdamW, dict(weight_decay=-0.01), r"invalid weight_decay: -0\.01"),
    (RMSprop, dict(alpha=1.5), r"invalid alpha: 1\.5"),
    (RMSprop, dict(momentum=-1), "invalid momentum: -1"),
    (RMSprop, dict(centered=1), "invalid centered: 1"),
    (Adagrad, dict(lr_decay=-0.1), r"invalid lr_decay: -0\.1"),
    (Adagrad, dict(initial_accumulator_value=-1), "invalid initial_accumulator_value: -1"),
    (Adagrad, dict(eps=-1), "invalid eps: -1"),
    (LARS, dict(trust_coefficient=0), "invalid trust_coefficient: 0"),
    (LARS, dict(momentum=-0.9), r"invalid momentum: -0\.9"),
    (LAMB, dict(beta1=1.5), r"invalid beta1: 1\.5"),
    (LAMB, dict(weight_decay=-1), "invalid weight_decay: -1"),
])
def test_invalid_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


ALL_OPTIMIZERS = [
    SGD(0.2, momentum=0.9, nesterov=True, weight_decay=1e-4, clipnorm=1.0),
    Adam(LinearWarmup(CosineDecay(0.01, total_steps=100, min_lr=1e-4), warmup_steps=10),
         amsgrad=True, clipvalue=0.5),
    AdamW(0.003, beta1=0.85, weight_decay=0.05),
    RMSprop(0.001, alpha=0.9, momentum=0.5, centered=True),
    Adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    LARS(StepDecay(2.0, step_size=10), momentum=0.8, weight_decay=5e-4, trust_coefficient=0.02),
    LAMB(0.002, weight_decay=0.01, eps=1e-7),
]


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_config_round_trip_through_json(opt):
    data = json.loads(json.dumps(serialize_optimizer(opt)))
    again = get_optimizer(data)
    assert type(again) is type(opt)
    assert again.get_config() == opt.get_config()
    assert again.slot_names == opt.slot_names
    assert [again.learning_rate(t) for t in (1, 5, 20, 200)] == \
        [opt.learning_rate(t) for t in (1, 5, 20, 200)]
    assert type(opt).from_config(opt.get_config()).get_config() == opt.get_config()


@pytest.mark.parametrize("name, cls", [("sgd", SGD), ("Adam", Adam), ("ADAMW", AdamW),
                                       ("rmsprop", RMSprop), ("adagrad", Adagrad),
                                       ("lars", LARS), ("LAMB", LAMB)])
def test_get_optimizer_by_name(name, cls):
    opt = get_optimizer(name)
    assert type(opt) is cls and isinstance(opt, Optimizer)
    assert opt.get_config() == cls().get_config()


def test_get_optimizer_instance_and_errors():
    opt = Adam()
    assert get_optimizer(opt) is opt
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'; known: sgd, adam.*lamb"):
        get_optimizer("adamax")
    with pytest.raises(ValueError, match="unknown optimizer"):
        get_optimizer({"class_name": "Nadam", "config": {}})
    with pytest.raises(TypeError, match="cannot make an optimizer"):
        get_optimizer(3)


def test_callable_lr_is_not_serializable():
    with pytest.raises(TypeError, match="Schedule"):
        SGD(lambda t: 0.1).get_config()


def test_clip_settings_are_stored():
    config = SGD(clipnorm=2, clipvalue=0.5).get_config()
    assert config["clipnorm"] == 2.0 and config["clipvalue"] == 0.5
    assert Adam().get_config()["clipnorm"] is None


def test_docstring_examples():
    assert doctest.testmod(optimizers).failed == 0
