"""The epoch loop shared by every engine, and the in-process runner.

``fit_loop`` drives a runner (``LocalRunner`` here, the Spark engine's runner in
``rddtensor.spark.engine``): epochs, progress bar, validation, callbacks, history, and what a fit
that ends with an exception leaves behind (``FitInterrupted``). A runner trains one epoch with the
step functions of ``rddtensor.training.steps``.
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

from rddtensor.allocator import tune_malloc  # (per in-process fit: LocalRunner)
from rddtensor.training.batching import (batch_sizes, check_shuffle, count_rows, local_batches,
                                         step_rng, take_rows)
from rddtensor.training.callbacks import CallbackList
from rddtensor.training.history import History
from rddtensor.training.steps import (empty_stats, evaluate_arrays, gradient_step, merge_stats,
                                      optimizer_step, stats_logs, sum_weights)

log = logging.getLogger("rddtensor")


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
    """Trains on numpy arrays in this process, one optimizer step per mini-batch.

    ``X`` is one array, or a tuple of arrays (one per input of a model with several inputs,
    ``batching.take_rows``); ``y`` likewise for the outputs."""

    engine = "in-process"
    #: what this engine adds to ``History.params`` (the distributed one: partitions, ...)
    params: dict = {}

    def __init__(self, model, X, y, *, batch_size, shuffle, seed, class_weight, t0=None,
                 checkpoint=None, resume_stats=None, sample_weight=None):
        self.model, self.X, self.y, self.w = model, X, y, sample_weight
        # shuffle: True, False or a BlockShuffle (``batching.local_batches`` orders each epoch)
        self.batch_size, self.shuffle, self.seed = batch_size, check_shuffle(shuffle), seed
        self.class_weight = class_weight
        self.n_total = count_rows(X)
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
            w = None if self.w is None else self.w[rows]
            g, s = gradient_step(m, m.theta, take_rows(self.X, rows), take_rows(self.y, rows),
                                 loss=m.loss,
                                 n_batch=int(n_batch), rng=step_rng(self.seed, t),
                                 class_weight=self.class_weight, metrics=metrics,
                                 grad_out=self.grad, sample_weight=w,
                                 weight_sum=None if w is None else sum_weights(w))
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

    ``callbacks`` (``rddtensor.training.callbacks.Callback`` objects or functions ``f(epoch, logs)``) run at
    the Keras hooks; one setting ``model.stop_training`` ends training after that epoch.
    """
    history = History({"epochs": epochs, "batch_size": batch_size, "engine": runner.engine,
                       "samples": runner.n_total, **runner.params})
    metrics = model.metrics
    cbs = CallbackList(callbacks)
    cbs.set_model(model, getattr(runner, "sync_weights", None))
    cbs.set_params(history.params)  # (Keras' ``callback.params``)
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
