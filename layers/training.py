"""The training step shared by every engine, and the epoch loop around it.

``gradient_step`` (forward, loss, backprop on one partition's rows) and ``apply_update`` (clip and
optimize one slice of the flat vector) are the only places a training step computes. The
in-process ``LocalRunner`` calls them on the whole vector; the distributed engine
(``rddtensor.engine``) calls the same two functions inside Spark tasks on shards and parameter
blocks. ``fit_loop`` drives either runner: epochs, progress bar, validation, history.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
import warnings

import numpy as np

from rddtensor.layers.batching import batch_sizes, local_batches, step_rng
from rddtensor.layers.callbacks import CallbackList
from rddtensor.layers.history import History
from rddtensor.allocator import tune_malloc  # (per in-process fit: LocalRunner)
from rddtensor.backend import to_numpy
from rddtensor.optim.clipping import clip_by_value, norm_clip_scale

log = logging.getLogger("rddtensor")


# --- aggregates: what crosses from workers to the driver (O(classes), never O(rows)) ----------
def empty_stats(metrics) -> dict:
    return {"loss": 0.0, "count": 0, "states": [None] * len(metrics)}


def merge_stats(metrics, a: dict, b: dict) -> dict:
    states = [sb if sa is None else sa if sb is None else m.merge(sa, sb)
              for m, sa, sb in zip(metrics, a["states"], b["states"])]
    return {"loss": a["loss"] + b["loss"], "count": a["count"] + b["count"], "states": states}


def batch_stats(metrics, loss, Y, y, loss_value: float, n_norm: int) -> dict:
    """Stats of one batch: the loss summed over its rows and each metric's mergeable state."""
    n = int(Y.shape[0])
    if n == 0:
        return empty_stats(metrics)
    P = to_numpy(loss.link(Y)) if metrics else None
    y = to_numpy(y)
    return {"loss": float(loss_value) * n_norm, "count": n,
            "states": [m.state(y, P) for m in metrics]}


def stats_logs(metrics, stats: dict, prefix: str = "") -> dict:
    """Turn merged stats into the numbers a user reads: mean loss and each metric's result."""
    n = max(stats["count"], 1)
    logs = {prefix + "loss": stats["loss"] / n}
    for m, s in zip(metrics, stats["states"]):
        if s is not None:
            r = m.result(s)
            if np.ndim(r) == 0:
                logs[prefix + m.name] = float(r)
    return logs


# --- the step ---------------------------------------------------------------------------------
def gradient_step(model, theta, X, y, *, loss, n_batch: int, rng, class_weight=None,
                  metrics=(), grad_out=None):
    """Forward, loss and backprop of ``model`` at flat weights ``theta`` on rows ``X, y``.

    ``loss`` is bound to the model (``Loss.bind``): when it is fused with the model's output
    activation, the forward pass stops before it and the loss reads the logits.

    The loss and gradient are normalised by ``n_batch``, the GLOBAL batch size, so the gradients
    of disjoint parts of a batch sum to the gradient of the whole batch.

    Returns:
        ``(grad, stats)``: the flat gradient (``grad_out`` if given) and this part's stats.
    """
    layout = model.layout
    if len(X) == 0:
        grad = np.zeros(layout.size, theta.dtype) if grad_out is None else grad_out
        grad[...] = 0
        return grad, empty_stats(metrics)
    Y, backprop = model.forward(layout.unflatten(theta), X, training=True, rng=rng,
                                logits=loss.fused is not None)
    value, dY = loss(Y, y, n_total=n_batch, class_weight=class_weight)
    _, grads = backprop(dY)
    grad = layout.flatten(grads, out=grad_out, dtype=theta.dtype)
    if layout.buffers:  # a buffer's change counts by this part's share of the global batch
        share = grad.dtype.type(len(X) / n_batch)
        for a, b in layout.split_segments()[1]:
            grad[a:b] *= share
    return grad, batch_stats(metrics, loss, Y, y, value, n_batch)


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
    for a in range(0, len(X), batch_size):
        Xb, yb = X[a:a + batch_size], y[a:a + batch_size]
        Y, _ = model.forward(params, Xb, training=False, logits=loss.fused is not None)
        value, _ = loss(Y, yb, n_total=len(Xb))
        stats = merge_stats(metrics, stats, batch_stats(metrics, loss, Y, yb, value, len(Xb)))
    return stats


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then
    raise it: an in-place update of θ and the optimizer slots is never left half done. Only in
    the main thread (the only one Python delivers signals to); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:  # now what would have happened: the handler that was there before
        if callable(previous):
            previous(*caught[0])
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


class FitInterrupted(UserWarning):
    """Warned when a fit ends with an exception: says which step the model now holds."""


def stopped_at(t: int, t0: int, steps_per_epoch: int, checkpointing: bool) -> str:
    """Where step ``t`` of a fit whose epoch 0 began after step ``t0`` lies, and how a user
    goes on from there (the tail of a ``FitInterrupted`` warning)."""
    e, b = divmod(t - t0, steps_per_epoch)
    again = ("resume=True (same checkpoint_dir) continues from the newest checkpoint, "
             if checkpointing else "")
    if b == 0:
        at, how = f"the end of epoch {e}", f"fit(..., initial_epoch={e}) continues from there"
    else:
        at = f"{b} of {steps_per_epoch} steps into epoch {e + 1}"
        how = f"fit(..., initial_epoch={e}) runs epoch {e + 1} again from these weights"
    return f"step {t}, the last completed step ({at}); {again}{how}"


def warn_interrupted(text: str) -> None:
    """Say ``text`` on the ``rddtensor`` logger and as a ``FitInterrupted`` warning (shown in
    notebooks, attributed to the user's ``fit`` call); never raises (it runs while an
    exception is on its way to the user)."""
    try:
        log.warning("%s", text)
        warnings.warn(text, FitInterrupted, stacklevel=_caller_level())
    except BaseException:
        pass


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this library (the user's ``fit`` call)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and \
            frame.f_globals.get("__name__", "").split(".")[0] in ("layers", "optim", "rddtensor"):
        frame, level = frame.f_back, level + 1
    return level


# --- in-process runner -----------------------------------------------------------------------
class LocalRunner:
    """Trains on numpy arrays in this process, one optimizer step per mini-batch."""

    engine = "in-process"

    def __init__(self, model, X, y, *, batch_size, shuffle, seed, class_weight, t0=None,
                 checkpoint=None, resume_stats=None):
        self.model, self.X, self.y = model, X, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.class_weight = class_weight
        self.n_total = len(X)
        self.grad = np.empty(model.layout.size, dtype=np.float32)
        tune_malloc()  # this process computes the steps: temporaries on reused pages
        # resuming (layers.checkpoint): the step epoch 0 started from, and the stats of the
        # resumed epoch's batches already done
        self.t0 = model.step if t0 is None else int(t0)
        self.checkpoint, self.resume_stats = checkpoint, resume_stats
        self.started, self.epoch = model.step, None

    def train_epoch(self, epoch: int, on_progress) -> dict:
        m = self.model
        self.epoch = epoch
        metrics, sizes = m.metrics, batch_sizes(self.n_total, self.batch_size)
        stats, self.resume_stats = self.resume_stats or empty_stats(metrics), None
        batches = local_batches(self.n_total, self.batch_size, self.seed, epoch, self.shuffle)
        done = m.step - self.t0 - epoch * len(sizes)  # batches of this epoch already done
        for b, (rows, n_batch) in enumerate(zip(batches, sizes)):
            if b < done:
                continue
            t = m.step + 1
            g, s = gradient_step(m, m.theta, self.X[rows], self.y[rows], loss=m.loss,
                                 n_batch=int(n_batch), rng=step_rng(self.seed, t),
                                 class_weight=self.class_weight, metrics=metrics,
                                 grad_out=self.grad)
            with interrupts_deferred():  # θ, slots and step change together or not at all
                optimizer_step(m.optimizer, m.theta, g, m.slots, t, m.layout.split_segments())
                m.step = t
            stats = merge_stats(metrics, stats, s)
            on_progress(int(n_batch), stats)
            if self.checkpoint is not None and self.checkpoint.due(m.step, b == len(sizes) - 1):
                self.checkpoint.save_local(m, self.t0, len(sizes), stats)
        return stats

    def evaluate(self, data, batch_size) -> dict:
        X, y = data
        m = self.model
        return evaluate_arrays(m, m.theta, X, y, loss=m.loss, metrics=m.metrics,
                               batch_size=batch_size)

    def sync_weights(self):
        pass  # model.theta is the live vector in-process

    def finish(self):
        pass

    def keep_progress(self, exc: BaseException, epochs: int) -> None:
        """``exc`` ends the fit: the model already holds the last completed step (θ, slots
        and step change together, ``interrupts_deferred``); say which one."""
        t, name = self.model.step, type(exc).__name__
        where = "before its first epoch" if self.epoch is None else \
            f"in epoch {self.epoch + 1} of {epochs}"
        if t == self.started:
            text = (f"fit interrupted by {name} {where}, before its first step completed: the "
                    f"model holds the weights, optimizer slots and step it started with (step {t})")
        else:
            spe = len(batch_sizes(self.n_total, self.batch_size))
            text = (f"fit interrupted by {name} {where}: the model holds the weights, optimizer "
                    f"slots and step of " + stopped_at(t, self.t0, spe, self.checkpoint is not None))
        warn_interrupted(text)


# --- the epoch loop (shared by every runner) ------------------------------------------------
class _Progress:
    """Feedback on one epoch: verbose=1 a tqdm bar (loss, metrics, samples/s, elapsed<ETA);
    verbose=2 one line on stderr at the epoch's end; verbose=0 nothing."""

    def __init__(self, verbose, total, epoch, epochs):
        self.bar, self.t0, self.seen, self.verbose = None, time.perf_counter(), 0, verbose
        self.label = f"epoch {epoch + 1}/{epochs}"
        if verbose == 1:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=self.label, unit=" samples", leave=True,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                           "[{elapsed}<{remaining}]{postfix}")

    def update(self, n, stats):
        self.seen += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(self._postfix(stats), refresh=False)

    def _postfix(self, stats, logs=None):
        rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
        loss = stats["loss"] / max(stats["count"], 1)
        extra = "".join(f", {k}={v:.4f}" for k, v in (logs or {}).items() if k != "loss")
        return f"loss={loss:.4f}{extra}, {rate:,.0f} samples/s"

    def abandon(self):
        """The epoch ends with an exception: close the bar where it stands."""
        if self.bar is not None:
            try:
                self.bar.close()
            except Exception:
                pass

    def close(self, stats, logs):
        text = self._postfix(stats, logs)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.close()  # draws the final line once
        elif self.verbose >= 2:
            elapsed = time.perf_counter() - self.t0
            values = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            print(f"{self.label} - {values} - {elapsed:.2f}s - "
                  f"{self.seen / max(elapsed, 1e-9):,.0f} samples/s", file=sys.stderr, flush=True)
        return text


def fit_loop(model, runner, *, epochs: int, validation=None, batch_size: int, verbose: int = 1,
             callbacks=(), initial_epoch: int = 0) -> History:
    """Run ``epochs`` epochs of ``runner``: train, validate, record, report progress.

    ``callbacks`` (``rddtensor.layers.callbacks.Callback`` objects or functions ``f(epoch, logs)``) run at
    the Keras hooks; one setting ``model.stop_training`` ends training after that epoch.
    """
    history = History({"epochs": epochs, "batch_size": batch_size, "engine": runner.engine,
                       "samples": runner.n_total})
    metrics = model.metrics
    cbs = CallbackList(callbacks)
    cbs.set_model(model, getattr(runner, "sync_weights", None))
    model.stop_training = False
    logs, bar = {}, None
    try:
        cbs.on_train_begin()
        for epoch in range(initial_epoch, epochs):  # (> 0: resumed, or Keras' initial_epoch)
            cbs.on_epoch_begin(epoch)
            bar = _Progress(verbose, runner.n_total, epoch, epochs)
            stats = runner.train_epoch(epoch, bar.update)
            logs = stats_logs(metrics, stats)
            if validation is not None:
                logs.update(stats_logs(metrics, runner.evaluate(validation, batch_size), "val_"))
            bar.close(stats, logs)
            bar = None
            cbs.on_epoch_end(epoch, logs)  # may add to logs (a scheduler's lr) before recording
            history.record(epoch, logs)
            if model.stop_training:
                break
        runner.finish()
        cbs.on_train_end(logs)
    except BaseException as exc:  # Ctrl-C, a callback's error, a failed job or checkpoint
        if bar is not None:
            bar.abandon()
        # the model keeps the last completed step, and a warning says which
        runner.keep_progress(exc, epochs)
        raise
    return history
