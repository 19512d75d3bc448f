"""Injected task failures, for testing that retried work changes nothing.

Set ``RDDTENSOR_FAIL_AT`` in the driver's environment (or the Spark conf
``spark.rddtensor.failAt``) to a comma-separated list of ``step:partition:attempt`` rules, each
field a number or ``*``. The training task that computes step ``step`` (1-based: the model's
step counter after that update) on data partition ``partition`` then raises a ``RuntimeError``
on every matching task attempt (``TaskContext.attemptNumber()``, 0 for the first try). Examples:

- ``"3:1:0"``: the first attempt of step 3 on partition 1 fails, Spark's retry succeeds
  (needs ``spark.task.maxFailures`` > 1, e.g. master ``local[2,4]``);
- ``"3:1:0,3:1:1,5:0:0"``: two failures in a row, then one elsewhere;
- ``"4:*:*"``: every attempt of step 4 fails: the job aborts as if the run had crashed there.

The hook rides on the per-step stats accumulator, which every training task adds to exactly once
per step under the key ``(step, partition)`` (``rddtensor.spark.stages.StatsParam``); the engine uses
the plain accumulator when no rule is set, so an unset hook costs nothing.
"""
from __future__ import annotations

import os

from rddtensor.spark.stages import StatsParam

ENV = "RDDTENSOR_FAIL_AT"
CONF = "spark.rddtensor.failAt"


def parse(spec: str) -> tuple:
    """``"3:1:0,4:*:*"`` -> ``((3, 1, 0), (4, None, None))`` (``None`` matches anything)."""
    rules = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        fields = part.split(":")
        if len(fields) != 3 or not all(f == "*" or f.isdigit() for f in fields):
            raise ValueError(f"{ENV}: expected step:partition:attempt (numbers or *), got {part!r}")
        rules.append(tuple(None if f == "*" else int(f) for f in fields))
    return tuple(rules)


def spec_for(sc) -> str:
    """The failure rules in force for ``sc``: the environment variable, else the Spark conf."""
    return os.environ.get(ENV) or sc.getConf().get(CONF, "") or ""


class FailingStats(StatsParam):
    """``StatsParam`` whose task-side ``add`` raises for the steps/partitions/attempts in ``rules``."""

    def __init__(self, rules: tuple, spec: str):
        self.rules, self.spec = rules, spec

    def addInPlace(self, a, b):
        from pyspark import TaskContext
        ctx = TaskContext.get()
        if ctx is not None:  # inside a task (the driver merges results with ctx None)
            attempt = ctx.attemptNumber()
            for key in b:
                step, part = key
                for rule in self.rules:
                    if all(r is None or r == v for r, v in zip(rule, (step, part, attempt))):
                        raise RuntimeError(f"injected task failure at step {step}, partition "
                                           f"{part}, attempt {attempt} ({ENV}={self.spec})")
        return super().addInPlace(a, b)


def stats_param(sc) -> StatsParam:
    """The accumulator param for a fit: ``FailingStats`` when rules are set, else ``StatsParam``."""
    spec = spec_for(sc)
    return FailingStats(parse(spec), spec) if spec else StatsParam()
