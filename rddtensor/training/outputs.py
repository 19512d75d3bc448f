"""Several outputs trained as one: a loss and metrics per output of a graph model.

``compile`` on a model with several outputs turns its ``loss`` into an ``OutputLosses`` and its
``metrics`` into ``OutputMetric`` objects; both look like the single-output ones to the training
step (``rddtensor.training.steps``), which passes ``Y`` (the model's outputs) and ``y`` (the
targets) through as tuples, one array per output:

- ``OutputLosses(Y, y) = sum_k w_k * loss_k(Y_k, y_k)`` with ``dY_k = w_k * dloss_k/dY_k``;
  every term normalised by the same global batch size (or the same sample weights), so the
  partitions of a batch still sum to the whole batch's loss and gradient. ``w_k`` are Keras'
  ``loss_weights`` (default 1).
- ``OutputMetric`` computes one metric on one output (``"<output name>_<metric>"`` in the
  history, as Keras).

Each output's loss is bound to that output's activation (``Loss.bind``), so a ``softmax`` output
with a cross-entropy trains on its logits, as in a single-output model.
"""
from __future__ import annotations

import numbers

from rddtensor.optim import get_loss, get_metric

__all__ = ["OutputLosses", "OutputMetric", "output_losses", "output_metrics"]


def _per_output(value, names: list, what: str) -> list:
    """``value`` (one setting for every output, a list in output order, or a dict by output
    name) as a list with one entry per output."""
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        unknown = sorted(str(k) for k in value if k not in names)
        if missing or unknown:
            raise ValueError(f"{what} is a dict by output name; the model's outputs are {names}"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; unknown {unknown}" if unknown else ""))
        return [value[n] for n in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"the model has {len(names)} outputs {names}: {what} must be a list "
                             f"of {len(names)} (one per output, in that order) or a dict by "
                             f"output name, got {len(value)}")
        return list(value)
    return [value] * len(names)


class OutputLosses:
    """The losses of a model's outputs as one loss (see the module docstring).

    Args:
        losses: one ``rddtensor.optim.Loss`` per output.
        weights: one number per output (Keras' ``loss_weights``).
        names: the outputs' names (for errors and ``summary``).
    """

    task = "outputs"

    def __init__(self, losses: list, weights: list, names: list):
        self.losses, self.weights, self.names = list(losses), list(weights), list(names)

    @property
    def name(self) -> str:
        return "outputs(" + ", ".join(loss.name for loss in self.losses) + ")"

    @property
    def fused(self):
        """``None`` when no output's loss reads logits, else per output the activation its loss
        is fused with (or ``None``)."""
        fused = tuple(loss.fused for loss in self.losses)
        return None if all(f is None for f in fused) else fused

    def bind(self, activations) -> "OutputLosses":
        """Each loss bound to its output's activation (``activations``: one per output)."""
        return OutputLosses([loss.bind(a) for loss, a in zip(self.losses, activations)],
                            self.weights, self.names)

    def __call__(self, Y, y, n_total=None, class_weight=None, sample_weight=None):
        if class_weight is not None:
            raise ValueError("class_weight applies to models with one output; this one has "
                             f"{len(self.losses)} {self.names}: pass sample_weight instead")
        total, dYs = 0.0, []
        for loss, w, name, Yk, yk in zip(self.losses, self.weights, self.names, Y, y):
            try:
                value, dY = loss(Yk, yk, n_total=n_total, sample_weight=sample_weight)
            except ValueError as e:
                raise ValueError(f"output {name!r}: {e}") from None
            total += w * value
            dYs.append(dY if w == 1 else dY * dY.dtype.type(w))
        return total, tuple(dYs)

    def link(self, Y):
        return tuple(loss.link(Yk) for loss, Yk in zip(self.losses, Y))

    def get_config(self) -> dict:
        return {"outputs": [loss.get_config() for loss in self.losses],
                "loss_weights": list(self.weights)}

    def __repr__(self):
        return f"OutputLosses({dict(zip(self.names, self.losses))}, weights={self.weights})"


def output_losses(loss, loss_weights, names: list) -> OutputLosses:
    """``compile``'s ``loss`` and ``loss_weights`` for outputs ``names``: a loss (name, object)
    for every output, a list in output order or a dict by output name."""
    losses = [get_loss(entry) for entry in _per_output(loss, names, "loss")]
    weights = [1.0] * len(names) if loss_weights is None else \
        _per_output(loss_weights, names, "loss_weights")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not w >= 0:
            raise ValueError(f"loss_weights must be numbers >= 0, got {w!r} for output {name!r}")
    return OutputLosses(losses, [float(w) for w in weights], names)


class OutputMetric:
    """``metric`` on output ``index`` (named ``"<output>_<metric>"``): ``state`` reads that
    output's targets and probabilities; merging and results are the metric's."""

    def __init__(self, metric, index: int, output: str):
        self.metric, self.index, self.output = metric, int(index), output
        self.name = f"{output}_{metric.name}"

    def state(self, y_true, P):
        return self.metric.state(y_true[self.index], P[self.index])

    def merge(self, a, b):
        return self.metric.merge(a, b)

    def result(self, state):
        return self.metric.result(state)

    def get_config(self) -> dict:
        return {**self.metric.get_config(), "output": self.index}

    def __repr__(self):
        return f"OutputMetric({self.metric!r} on {self.output!r})"


def output_metrics(metrics, names: list) -> list:
    """``compile``'s ``metrics`` for outputs ``names``: a list for every output, a list of lists
    (one per output) or a dict by output name (a metric or a list each)."""
    if not metrics:
        return []
    if isinstance(metrics, dict):
        per = _per_output({n: metrics.get(n, []) for n in names} if set(metrics) <= set(names)
                          else metrics, names, "metrics")
    elif isinstance(metrics, (list, tuple)) and all(isinstance(m, (list, tuple))
                                                    for m in metrics):
        per = _per_output(metrics, names, "metrics")
    else:
        per = [metrics] * len(names)
    out = []
    for k, (name, entries) in enumerate(zip(names, per)):
        entries = entries if isinstance(entries, (list, tuple)) else [entries]
        out += [OutputMetric(get_metric(m), k, name) for m in entries]
    return out
