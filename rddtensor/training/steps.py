"""The training step shared by every engine: the only places a training step computes.

``gradient_step`` (forward, loss, backprop on one partition's rows) and ``optimizer_step`` /
``apply_update`` (clip and optimize the flat vector, or one slice of it) run in-process in
``rddtensor.training.loop.LocalRunner`` on the whole vector, and inside Spark tasks
(``rddtensor.spark``) on shards and parameter blocks. The stats helpers are the aggregates that
cross from workers to the driver (O(classes), never O(rows)).
"""
from __future__ import annotations

import numpy as np

from rddtensor.backend import to_numpy
from rddtensor.training.batching import count_rows, take_rows
from rddtensor.optim.clipping import clip_by_value, norm_clip_scale



# --- aggregates: what crosses from workers to the driver (O(classes), never O(rows)) ----------
def empty_stats(metrics) -> dict:
    return {"loss": 0.0, "count": 0, "states": [None] * len(metrics)}


def merge_stats(metrics, a: dict, b: dict) -> dict:
    states = [sb if sa is None else sa if sb is None else m.merge(sa, sb)
              for m, sa, sb in zip(metrics, a["states"], b["states"])]
    out = {"loss": a["loss"] + b["loss"], "count": a["count"] + b["count"], "states": states}
    if "weight" in a or "weight" in b:  # a weighted fit: the sum of the sample weights
        out["weight"] = a.get("weight", 0.0) + b.get("weight", 0.0)
    return out


def batch_stats(metrics, loss, Y, y, loss_value: float, n_norm, weight=None) -> dict:
    """Stats of one batch: the loss summed over its rows (weighted, with sample weights whose
    sum over these rows is ``weight``) and each metric's mergeable state."""
    n = count_rows(Y)  # (Y, y: arrays, or tuples of one per output of a model with several)
    if n == 0:
        return empty_stats(metrics)
    P = _host(loss.link(Y)) if metrics else None
    y = _host(y)
    stats = {"loss": float(loss_value) * n_norm, "count": n,
             "states": [m.state(y, P) for m in metrics]}
    if weight is not None:
        stats["weight"] = float(weight)
    return stats


def _host(a):
    """NumPy copies of an array or a tuple of them (what metrics read)."""
    return tuple(to_numpy(x) for x in a) if isinstance(a, tuple) else to_numpy(a)


def stats_logs(metrics, stats: dict, prefix: str = "") -> dict:
    """Turn merged stats into the numbers a user reads: mean loss (weighted by the sample
    weights, if the fit has them) and each metric's result (unweighted)."""
    n = stats["weight"] if "weight" in stats else max(stats["count"], 1)
    logs = {prefix + "loss": stats["loss"] / n if n else 0.0}
    for m, s in zip(metrics, stats["states"]):
        if s is not None:
            r = m.result(s)
            if np.ndim(r) == 0:
                logs[prefix + m.name] = float(r)
    return logs


# --- the step ---------------------------------------------------------------------------------
def gradient_step(model, theta, X, y, *, loss, n_batch: int, rng, class_weight=None,
                  metrics=(), grad_out=None, sample_weight=None, weight_sum=None):
    """Forward, loss and backprop of ``model`` at flat weights ``theta`` on rows ``X, y``.

    ``loss`` is bound to the model (``Loss.bind``): when it is fused with the model's output
    activation, the forward pass stops before it and the loss reads the logits.

    The loss and gradient are normalised by ``n_batch``, the GLOBAL batch size, so the gradients
    of disjoint parts of a batch sum to the gradient of the whole batch. With ``sample_weight``
    (one weight per row of ``X``) they are the weighted mean over the global batch instead:
    normalised by ``weight_sum``, the sum of the sample weights over the WHOLE global batch
    (``weight_normaliser``), the same in every part of it.

    Returns:
        ``(grad, stats)``: the flat gradient (``grad_out`` if given) and this part's stats.
    """
    layout = model.layout
    rows = count_rows(X)  # (X: one array, or a tuple of one per model input)
    if rows == 0:
        grad = np.zeros(layout.size, theta.dtype) if grad_out is None else grad_out
        grad[...] = 0
        return grad, empty_stats(metrics)
    Y, backprop = model.forward(layout.unflatten(theta), X, training=True, rng=rng,
                                logits=loss.fused is not None)
    norm = n_batch if sample_weight is None else weight_normaliser(weight_sum)
    value, dY = loss(Y, y, n_total=norm, class_weight=class_weight, sample_weight=sample_weight)
    _, grads = backprop(dY)
    grad = layout.flatten(grads, out=grad_out, dtype=theta.dtype)
    if layout.buffers:  # a buffer's change counts by this part's share of the global batch
        share = grad.dtype.type(rows / n_batch)
        for a, b in layout.split_segments()[1]:
            grad[a:b] *= share
    return grad, batch_stats(metrics, loss, Y, y, value, norm,
                             None if sample_weight is None else sum_weights(sample_weight))


def sum_weights(sample_weight) -> float:
    """The sum of some rows' sample weights, as every engine adds them: float64, in row order."""
    return float(np.sum(np.asarray(sample_weight), dtype=np.float64))


def weight_normaliser(total) -> float:
    """What a weighted batch's loss is divided by: the sum of its sample weights, or 1 when
    they are all zero (the batch then adds nothing: loss and gradient 0)."""
    if total is None:
        raise ValueError("a step with sample weights needs weight_sum, the sum of the weights "
                         "over the whole global batch")
    return float(total) if total > 0 else 1.0


def clip_values(optimizer, g):
    """Clip ``g`` by value in place (if the optimizer asks); return its squared norm if it clips by norm.

    With ``clipnorm``, ``optimizer_step`` turns the sum of these squared norms over the
    parameter runs into one factor (``rddtensor.optim.clipping.norm_clip_scale``) for ``apply_update``.
    """
    if optimizer.clipvalue is not None:
        clip_by_value(g, optimizer.clipvalue)
    if optimizer.clipnorm is None:
        return None
    return float(np.dot(g.astype(np.float64, copy=False), g))


def apply_update(optimizer, w, g, slots: dict, step: int, *, clip_scale: float = 1.0,
                 segments=None, buffer_segments=()) -> None:
    """Scale ``g`` by the global-norm clip factor and update ``w`` and its slots in place.

    ``segments`` are the parameter tensors in ``w`` (relative offsets); ``buffer_segments`` the
    non-trainable buffers, which get ``w += g`` (their all-reduced change) instead.
    """
    if not buffer_segments:
        if clip_scale != 1.0:
            g *= g.dtype.type(clip_scale)
        optimizer.update(w, g, slots, step, segments=segments)
        return
    for a, b in buffer_segments:
        w[a:b] += g[a:b]
    for a, b in _runs(segments):  # contiguous runs of parameters between buffers
        ga = g[a:b]
        if clip_scale != 1.0:
            ga *= ga.dtype.type(clip_scale)
        inner = [(x - a, y - a) for x, y in segments if a <= x and y <= b]
        optimizer.update(w[a:b], ga, {k: v[a:b] for k, v in slots.items()}, step, segments=inner)


def _runs(segments):
    runs = []
    for a, b in segments:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def optimizer_step(optimizer, w, g, slots: dict, step: int, segments) -> None:
    """One full optimizer step on the whole vector: clip by value, clip by global norm, update.

    ``segments`` is ``layout.split_segments()``: (parameter tensors, buffer tensors).

    Used by the in-process loop and by the replicated distributed all-reduce (both hold the whole
    gradient); the sharded all-reduce calls ``clip_trainable`` (by value only: it refuses
    ``clipnorm``) and ``apply_update`` per block.
    """
    train, bufs = segments
    sq_norm = clip_values(optimizer, g) if not bufs else clip_trainable(optimizer, g, train)
    clip_scale = 1.0
    if sq_norm is not None:
        clip_scale = norm_clip_scale(sq_norm, optimizer.clipnorm)
    apply_update(optimizer, w, g, slots, step, clip_scale=clip_scale, segments=train,
                 buffer_segments=bufs)


def clip_trainable(optimizer, g, segments):
    """``clip_values`` on the parameter ``segments`` of ``g`` only (never a buffer's change);
    the sum of their squared norms when the optimizer clips by norm."""
    total = None
    for a, b in _runs(segments):
        sq = clip_values(optimizer, g[a:b])
        total = sq if total is None else total + sq
    return total


def evaluate_arrays(model, theta, X, y, *, loss, metrics, batch_size: int, n_norm=None) -> dict:
    """Loss and metric stats of ``model`` on ``X, y`` in eval mode (no dropout)."""
    stats = empty_stats(metrics)
    params = model.layout.unflatten(theta)
    for a in range(0, count_rows(X), batch_size):
        rows = slice(a, a + batch_size)
        Xb, yb = take_rows(X, rows), take_rows(y, rows)
        n = count_rows(Xb)
        Y, _ = model.forward(params, Xb, training=False, logits=loss.fused is not None)
        value, _ = loss(Y, yb, n_total=n)
        stats = merge_stats(metrics, stats, batch_stats(metrics, loss, Y, yb, value, n))
    return stats
