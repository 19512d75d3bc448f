"""Learning-rate schedules: hand-computed values, torch.optim.lr_scheduler, validation, configs."""
import doctest
import json
import math
import warnings

import pytest

import rddtensor.optim.schedules as schedules
from rddtensor.optim.schedules import (Constant, CosineDecay, ExponentialDecay, LinearWarmup, Schedule,
                             StepDecay, get_schedule, serialize_schedule)


def _values(schedule, n):
    return [schedule(t) for t in range(1, n + 1)]


def test_hand_computed_values():
    assert _values(Constant(0.3), 3) == [0.3, 0.3, 0.3]
    assert _values(StepDecay(1.0, step_size=3, gamma=0.5), 7) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert _values(ExponentialDecay(2.0, decay_rate=0.5), 4) == [2.0, 1.0, 0.5, 0.25]
    assert ExponentialDecay(1.0, decay_rate=0.25, decay_steps=2)(2) == pytest.approx(0.5)
    cos = CosineDecay(1.0, total_steps=4, min_lr=0.2)
    expected = [0.2 + 0.8 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert _values(cos, 5) == pytest.approx(expected, rel=1e-15)
    assert cos(6) == cos(100) == pytest.approx(0.2)  # held at min_lr after total_steps
    warm = LinearWarmup(0.1, warmup_steps=4, start_factor=0.2)
    assert _values(warm, 6) == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])


def test_warmup_hands_over_to_inner_schedule_from_its_step_one():
    inner = StepDecay(1.0, step_size=2, gamma=0.1)
    warm = LinearWarmup(inner, warmup_steps=3)
    assert _values(warm, 3) == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert [warm(t) for t in (4, 5, 6, 7)] == [inner(t) for t in (1, 2, 3, 4)]
    no_warmup = LinearWarmup(inner, warmup_steps=0)
    assert _values(no_warmup, 5) == _values(inner, 5)


def _torch_lrs(torch, make_scheduler, lr, n):
    """lr used by the t-th optimizer step, scheduler stepped after each optimizer step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("ours, make, n", [
    (StepDecay(0.1, step_size=3, gamma=0.3), lambda s, o: s.StepLR(o, step_size=3, gamma=0.3), 12),
    (ExponentialDecay(0.1, decay_rate=0.9), lambda s, o: s.ExponentialLR(o, gamma=0.9), 10),
    (CosineDecay(0.1, total_steps=8, min_lr=0.01),
     lambda s, o: s.CosineAnnealingLR(o, T_max=8, eta_min=0.01), 9),
    (LinearWarmup(0.1, warmup_steps=5, start_factor=0.25),
     lambda s, o: s.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=5), 9),
    (LinearWarmup(CosineDecay(0.1, total_steps=6), warmup_steps=4, start_factor=0.1),
     lambda s, o: s.SequentialLR(o, [s.LinearLR(o, start_factor=0.1, total_iters=4),
                                     s.CosineAnnealingLR(o, T_max=6)], milestones=[4]), 11),
], ids=["StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR", "SequentialLR"])
def test_matches_torch_lr_scheduler(ours, make, n):
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about SequentialLR internals
        expected = _torch_lrs(torch, make, 0.1, n)
    assert _values(ours, n) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("step", [0, -1, 1.5, True, "1", None])
def test_step_is_one_based_integer(step):
    with pytest.raises(ValueError, match="1-based"):
        Constant(0.1)(step)


@pytest.mark.parametrize("make, match", [
    (lambda: Constant(-0.1), r"invalid learning rate: -0\.1"),
    (lambda: Constant("0.1"), "invalid learning rate: '0.1'"),
    (lambda: StepDecay(0.1, step_size=0), "invalid step_size: 0"),
    (lambda: StepDecay(0.1, step_size=2.5), r"invalid step_size: 2\.5"),
    (lambda: StepDecay(0.1, step_size=2, gamma=0), "invalid gamma: 0"),
    (lambda: ExponentialDecay(0.1, decay_rate=-0.5), r"invalid decay_rate: -0\.5"),
    (lambda: ExponentialDecay(0.1, decay_rate=0.5, decay_steps=0), "invalid decay_steps: 0"),
    (lambda: CosineDecay(0.1, total_steps=-3), "invalid total_steps: -3"),
    (lambda: CosineDecay(0.1, total_steps=3, min_lr=0.2), r"invalid min_lr: 0\.2"),
    (lambda: LinearWarmup(0.1, warmup_steps=-1), "invalid warmup_steps: -1"),
    (lambda: LinearWarmup(0.1, warmup_steps=2, start_factor=1.5), r"invalid start_factor: 1\.5"),
    (lambda: LinearWarmup({"class_name": "Nope"}, warmup_steps=2), "unknown schedule"),
])
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


ALL_SCHEDULES = [
    Constant(0.01), StepDecay(0.1, 5, 0.5), ExponentialDecay(0.1, 0.96, decay_steps=100),
    CosineDecay(0.1, 50, min_lr=1e-3),
    LinearWarmup(CosineDecay(0.1, 50), warmup_steps=10, start_factor=0.1),
    LinearWarmup(LinearWarmup(0.5, 2), warmup_steps=3),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_config_round_trip_through_json(schedule):
    again = get_schedule(json.loads(json.dumps(serialize_schedule(schedule))))
    assert type(again) is type(schedule)
    assert again.get_config() == schedule.get_config()
    assert _values(again, 70) == _values(schedule, 70)
    assert type(schedule).from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_get_schedule():
    s = StepDecay(0.1, 2)
    assert get_schedule(s) is s
    assert isinstance(get_schedule(0.5), Constant) and get_schedule(2)(9) == 2.0
    assert isinstance(get_schedule({"class_name": "cosinedecay",
                                    "config": {"lr": 1.0, "total_steps": 3}}), CosineDecay)
    assert isinstance(LinearWarmup(0.3, 2).schedule, Schedule)
    with pytest.raises(ValueError, match="unknown schedule class_name 'Poly'; known: Constant"):
        get_schedule({"class_name": "Poly", "config": {}})
    with pytest.raises(TypeError, match="cannot make a learning-rate schedule"):
        get_schedule("cosine")
    with pytest.raises(TypeError, match="expected a Schedule"):
        serialize_schedule(lambda t: 0.1)


def test_docstring_examples():
    assert doctest.testmod(schedules).failed == 0
