"""Learning-rate schedules: callables ``step -> lr`` with a JSON config.

Steps are **1-based**, the same ``t`` the optimizer update receives: ``schedule(t)`` is the rate
used by the t-th update. Every schedule returns its base ``lr`` at ``t = 1`` (warm-up excepted)
and equals the rate a ``torch.optim.lr_scheduler`` gives the t-th ``optimizer.step()`` when
``scheduler.step()`` is called once after each optimizer step (i.e. torch's ``last_epoch = t - 1``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["Schedule", "Constant", "StepDecay", "ExponentialDecay", "CosineDecay", "LinearWarmup",
           "get_schedule", "serialize_schedule"]


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}: {value!r} ({rule})")


def _check_lr(lr) -> float:
    if not (_is_real(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate: {lr!r} (must be a finite number >= 0)")
    return float(lr)


def _check_positive_int(name: str, value) -> int:
    _require(isinstance(value, Integral) and not isinstance(value, bool) and value > 0,
             name, value, "must be a positive integer")
    return int(value)


def _check_step(step) -> int:
    if not (isinstance(step, Integral) and not isinstance(step, bool) and step >= 1):
        raise ValueError(f"step is 1-based and must be an integer >= 1, got {step!r}")
    return int(step)


class Schedule:
    """Base class: a learning rate as a function of the 1-based update step.

    Subclasses set ``_config_keys`` (constructor argument names, stored as attributes of the same
    name) and implement ``_lr(step)``.

    Example:
        >>> CosineDecay(0.1, total_steps=10)(1)
        0.1
    """

    _config_keys: tuple = ()

    def __call__(self, step) -> float:
        return self._lr(_check_step(step))

    def _lr(self, step: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        """Constructor arguments as a JSON-serializable dict."""
        return {k: getattr(self, k) for k in self._config_keys}

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """Rebuild a schedule from :meth:`get_config` output."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """A constant rate: ``lr(t) = lr``.

    Args:
        lr: the learning rate (>= 0).

    Example:
        >>> Constant(0.01)(100)
        0.01
    """

    _config_keys = ("lr",)

    def __init__(self, lr: float):
        self.lr = _check_lr(lr)

    def _lr(self, step):
        return self.lr


class StepDecay(Schedule):
    """Multiply the rate by ``gamma`` every ``step_size`` updates.

    ``lr(t) = lr * gamma ** ((t - 1) // step_size)``.

    Like ``torch.optim.lr_scheduler.StepLR`` stepped once per update (not per epoch).

    Args:
        lr: initial rate (>= 0).
        step_size: updates between decays (positive integer).
        gamma: multiplicative factor (> 0).

    Example:
        >>> s = StepDecay(1.0, step_size=2, gamma=0.5)
        >>> [s(t) for t in (1, 2, 3, 4, 5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    _config_keys = ("lr", "step_size", "gamma")

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = _check_lr(lr)
        self.step_size = _check_positive_int("step_size", step_size)
        _require(_is_real(gamma) and gamma > 0, "gamma", gamma, "must be a finite number > 0")
        self.gamma = float(gamma)

    def _lr(self, step):
        return self.lr * self.gamma ** ((step - 1) // self.step_size)


class ExponentialDecay(Schedule):
    """Smooth exponential decay: ``lr(t) = lr * decay_rate ** ((t - 1) / decay_steps)``.

    With ``decay_steps=1`` this is ``torch.optim.lr_scheduler.ExponentialLR(gamma=decay_rate)``;
    it is Keras' ``ExponentialDecay`` with Keras' 0-based iteration count ``t - 1``.

    Args:
        lr: initial rate (>= 0).
        decay_rate: factor applied every ``decay_steps`` updates (> 0).
        decay_steps: updates per factor of ``decay_rate`` (> 0).

    Example:
        >>> s = ExponentialDecay(1.0, decay_rate=0.5, decay_steps=2)
        >>> [s(t) for t in (1, 3, 4)]
        [1.0, 0.5, 0.3535533905932738]
    """

    _config_keys = ("lr", "decay_rate", "decay_steps")

    def __init__(self, lr: float, decay_rate: float, decay_steps: float = 1):
        self.lr = _check_lr(lr)
        _require(_is_real(decay_rate) and decay_rate > 0, "decay_rate", decay_rate,
                 "must be a finite number > 0")
        _require(_is_real(decay_steps) and decay_steps > 0, "decay_steps", decay_steps,
                 "must be a finite number > 0")
        self.decay_rate = float(decay_rate)
        self.decay_steps = decay_steps

    def _lr(self, step):
        return self.lr * self.decay_rate ** ((step - 1) / self.decay_steps)


class CosineDecay(Schedule):
    """Half-cosine from ``lr`` to ``min_lr`` over ``total_steps`` updates, then constant.

    ``lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * min(t - 1, total_steps) / total_steps)) / 2``:
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)`` for
    ``t <= total_steps + 1``, held at ``min_lr`` afterwards instead of rising again.

    Args:
        lr: initial rate (>= 0).
        total_steps: length of the decay in updates (positive integer).
        min_lr: final rate, in ``[0, lr]``.

    Example:
        >>> s = CosineDecay(1.0, total_steps=4)
        >>> [round(s(t), 4) for t in (1, 3, 5, 9)]
        [1.0, 0.5, 0.0, 0.0]
    """

    _config_keys = ("lr", "total_steps", "min_lr")

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        self.lr = _check_lr(lr)
        self.total_steps = _check_positive_int("total_steps", total_steps)
        _require(_is_real(min_lr) and 0 <= min_lr <= self.lr, "min_lr", min_lr,
                 f"must be in [0, lr={self.lr}]")
        self.min_lr = float(min_lr)

    def _lr(self, step):
        progress = min(step - 1, self.total_steps) / self.total_steps
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class LinearWarmup(Schedule):
    """Linear warm-up for ``warmup_steps`` updates, then the wrapped schedule from its step 1.

    For ``t <= warmup_steps``:
    ``lr(t) = base * (start_factor + (1 - start_factor) * (t - 1) / warmup_steps)`` with
    ``base = schedule(1)``; afterwards ``lr(t) = schedule(t - warmup_steps)``. This is torch's
    ``SequentialLR([LinearLR(start_factor, 1.0, warmup_steps), inner], milestones=[warmup_steps])``
    (torch requires ``start_factor > 0``). With the default ``start_factor=0`` the first update
    uses rate 0 (as in Hugging Face's linear warm-up); pass e.g. ``start_factor=1 / warmup_steps``
    to avoid it.

    Args:
        schedule_or_lr: the schedule to warm up into: a float, a :class:`Schedule` or its config.
        warmup_steps: length of the warm-up in updates (integer >= 0; 0 disables it).
        start_factor: fraction of the base rate at ``t = 1``, in ``[0, 1]``.

    Example:
        >>> s = LinearWarmup(CosineDecay(1.0, total_steps=2), warmup_steps=2)
        >>> [s(t) for t in (1, 2, 3, 4, 5)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    _config_keys = ("schedule_or_lr", "warmup_steps", "start_factor")

    def __init__(self, schedule_or_lr, warmup_steps: int, start_factor: float = 0.0):
        self.schedule = get_schedule(schedule_or_lr)
        _require(isinstance(warmup_steps, Integral) and not isinstance(warmup_steps, bool)
                 and warmup_steps >= 0, "warmup_steps", warmup_steps, "must be an integer >= 0")
        _require(_is_real(start_factor) and 0 <= start_factor <= 1, "start_factor", start_factor,
                 "must be in [0, 1]")
        self.warmup_steps = int(warmup_steps)
        self.start_factor = float(start_factor)

    @property
    def schedule_or_lr(self) -> dict:
        return serialize_schedule(self.schedule)

    def _lr(self, step):
        if step > self.warmup_steps:
            return float(self.schedule(step - self.warmup_steps))
        frac = (step - 1) / self.warmup_steps
        return float(self.schedule(1)) * (self.start_factor + (1 - self.start_factor) * frac)


_SCHEDULES = {cls.__name__.lower(): cls
              for cls in (Constant, StepDecay, ExponentialDecay, CosineDecay, LinearWarmup)}


def serialize_schedule(schedule: Schedule) -> dict:
    """``{"class_name": ..., "config": ...}`` for a schedule: the form :func:`get_schedule` reads.

    Example:
        >>> serialize_schedule(Constant(0.1))
        {'class_name': 'Constant', 'config': {'lr': 0.1}}
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"expected a Schedule, got {type(schedule).__name__}; wrap a plain "
                        "callable in a Schedule subclass to make it serializable")
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def get_schedule(obj) -> Schedule:
    """Return a :class:`Schedule` from a float (:class:`Constant`), a Schedule or a config dict.

    Args:
        obj: a number, a :class:`Schedule` (returned as is), or
            ``{"class_name": name, "config": {...}}`` with a case-insensitive built-in class name.

    Example:
        >>> get_schedule({"class_name": "StepDecay", "config": {"lr": 1.0, "step_size": 1}})(2)
        0.1
    """
    if isinstance(obj, Schedule):
        return obj
    if isinstance(obj, Real) and not isinstance(obj, bool):
        return Constant(obj)
    if isinstance(obj, dict):
        name = obj.get("class_name")
        cls = _SCHEDULES.get(str(name).lower())
        if cls is None:
            known = ", ".join(c.__name__ for c in _SCHEDULES.values())
            raise ValueError(f"unknown schedule class_name {name!r}; known: {known}")
        return cls.from_config(dict(obj.get("config", {})))
    raise TypeError(f"cannot make a learning-rate schedule from {type(obj).__name__} {obj!r}; "
                    "pass a number, a Schedule or a {'class_name': ..., 'config': ...} dict")
