"""Callbacks: code that ``fit`` runs at the start and end of training and of every epoch.

A callback subclasses :class:`Callback` and overrides any of ``on_train_begin``,
``on_epoch_begin``, ``on_epoch_end``, ``on_train_end`` (Keras names and order). ``fit`` sets
``callback.model`` first; setting ``model.stop_training = True`` ends training after the current
epoch. A plain function ``f(epoch, logs)`` is also accepted and runs at every epoch end.

Weights during distributed training live on the executors: ``model.theta`` is only brought up to
date at the end of ``fit``. A callback that reads or saves weights mid-training calls
``self.sync_weights()`` first (free in-process; one Spark job that collects θ and the optimizer
slots to the driver in a distributed fit).

Example:
    >>> import numpy as np, rddtensor.layers as L
    >>> from rddtensor.training.callbacks import EarlyStopping
    >>> m = L.Sequential([L.Dense(1, input_shape=(2,))], seed=0)
    >>> m.compile(optimizer="sgd", loss="mse")
    >>> X = np.ones((8, 2), "float32"); y = np.ones((8, 1), "float32")
    >>> h = m.fit(X, y, epochs=50, batch_size=8, verbose=0,
    ...           callbacks=[EarlyStopping(monitor="loss", patience=0, min_delta=10.0)])
    >>> len(h.epoch)
    2
"""
from __future__ import annotations

import csv
import inspect
import logging
import math
import os

import numpy as np

log = logging.getLogger("rddtensor")

_MAX_METRICS = ("acc", "auc", "precision", "recall", "f1")


class Callback:
    """Base class: every hook does nothing; override the ones you need.

    Attributes:
        model: the model being trained (set by ``fit`` before ``on_train_begin``).
        params: the fit's settings, ``History.params`` (set by ``fit`` before
            ``on_train_begin``): ``epochs``, ``batch_size``, ``engine``, ``samples``; a
            distributed fit adds ``partitions``, ``allreduce``, ``iterations_per_job`` and
            ``wire_dtype``.
    """

    model = None
    params: dict = {}
    _sync = None

    def set_model(self, model, sync_weights=None) -> None:
        """Called by ``fit``: the model, and how to bring ``model.theta`` up to date."""
        self.model, self._sync = model, sync_weights

    def set_params(self, params: dict) -> None:
        """Called by ``fit`` (Keras' name): the fit's settings, read as ``self.params``."""
        self.params = params

    def sync_weights(self) -> None:
        """Make ``model.theta`` (and optimizer slots and step) current; costs one Spark job in
        a distributed fit, nothing in-process."""
        if self._sync is not None:
            self._sync()

    def on_train_begin(self, logs=None): pass

    def on_epoch_begin(self, epoch: int, logs=None): pass

    def on_epoch_end(self, epoch: int, logs=None): pass

    def on_train_end(self, logs=None): pass


class LambdaCallback(Callback):
    """A callback from plain functions: ``LambdaCallback(on_epoch_end=lambda epoch, logs: ...)``.

    ``on_train_begin``/``on_train_end`` take ``logs``; the epoch hooks take ``(epoch, logs)``.
    """

    def __init__(self, on_train_begin=None, on_epoch_begin=None, on_epoch_end=None,
                 on_train_end=None):
        for name, f in (("on_train_begin", on_train_begin), ("on_epoch_begin", on_epoch_begin),
                        ("on_epoch_end", on_epoch_end), ("on_train_end", on_train_end)):
            if f is not None:
                if not callable(f):
                    raise TypeError(f"LambdaCallback {name} must be callable, "
                                    f"got {type(f).__name__}")
                setattr(self, name, f)


class CallbackList(Callback):
    """Runs a list of callbacks (``Callback`` objects or functions ``f(epoch, logs)``) in order."""

    def __init__(self, callbacks=()):
        if isinstance(callbacks, Callback) or callable(callbacks):
            callbacks = [callbacks]
        self.callbacks = []
        for i, cb in enumerate(callbacks or ()):
            if isinstance(cb, Callback):
                self.callbacks.append(cb)
            elif callable(cb):
                self.callbacks.append(LambdaCallback(on_epoch_end=cb))
            else:
                raise TypeError(f"callbacks[{i}] must be a rddtensor.training.callbacks.Callback or a function "
                                f"f(epoch, logs), got {type(cb).__name__}")

    def set_model(self, model, sync_weights=None):
        super().set_model(model, sync_weights)
        for cb in self.callbacks:
            cb.set_model(model, sync_weights)

    def set_params(self, params):
        super().set_params(params)
        for cb in self.callbacks:
            cb.set_params(params)

    def on_train_begin(self, logs=None):
        for cb in self.callbacks:
            cb.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        for cb in self.callbacks:
            cb.on_train_end(logs)


# --- monitoring a logged value ---------------------------------------------------------------
def _mode(mode: str, monitor: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if any(k in monitor for k in _MAX_METRICS) else "min"
    return mode


def _monitored(logs, monitor: str, who: str) -> float:
    if monitor not in (logs or {}):
        hint = " (pass validation_data=... to fit)" if monitor.startswith("val_") else ""
        raise ValueError(f"{who} monitors {monitor!r}, which this fit does not log{hint}; "
                         f"the epoch logs have {sorted(logs or {})}")
    return float(logs[monitor])


class EarlyStopping(Callback):
    """Stop training when a monitored value has stopped improving.

    An epoch improves on the best so far when ``current < best - min_delta`` (mode ``min``) or
    ``current > best + min_delta`` (mode ``max``); after ``patience`` epochs without improvement
    ``model.stop_training`` is set.

    Args:
        monitor: the logged value to watch (``"val_loss"``, ``"loss"``, ``"val_accuracy"``, ...).
        min_delta: smallest change that counts as an improvement (>= 0).
        patience: epochs without improvement before stopping.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy/auc/precision/recall/f1).
        baseline: training stops unless the value beats this within ``patience`` epochs.
        restore_best_weights: at the end, put back the weights of the best epoch (in a
            distributed fit each improvement collects θ to the driver: one Spark job).
        start_from_epoch: epochs to train before watching (warm-up).
        verbose: 1 logs a line when training stops.

    Attributes:
        stopped_epoch: the epoch (0-based) training stopped after, or ``None``.
        best, best_epoch: the best value seen and its epoch.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, start_from_epoch: int = 0, verbose: int = 0):
        if not (isinstance(patience, int) and patience >= 0):
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        if not (min_delta >= 0):
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.min_delta, self.patience = monitor, float(min_delta), patience
        self.mode = _mode(mode, monitor)
        self.baseline, self.restore_best_weights = baseline, bool(restore_best_weights)
        self.start_from_epoch, self.verbose = int(start_from_epoch), verbose

    def _better(self, a, b) -> bool:
        if b is None:
            return True
        return a < b - self.min_delta if self.mode == "min" else a > b + self.min_delta

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch = 0, None
        self.best, self.best_epoch, self.best_theta = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start_from_epoch:
            return
        current = _monitored(logs, self.monitor, "EarlyStopping")
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.sync_weights()
                self.best_theta = self.model.theta.copy()
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
                return
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch is not None and self.verbose:
            log.info("early stopping after epoch %d: %s did not improve on %.6g (epoch %s)",
                     self.stopped_epoch + 1, self.monitor, self.best,
                     None if self.best_epoch is None else self.best_epoch + 1)
        if self.best_theta is not None and self.best_epoch is not None:
            self.model.theta[...] = self.best_theta
            if self.verbose:
                log.info("restored the weights of epoch %d", self.best_epoch + 1)


class ModelCheckpoint(Callback):
    """Save the model (``model.save``: a directory of JSON + ``.npz``) at the end of epochs.

    Args:
        filepath: the model directory; may hold ``str.format`` fields filled from ``epoch``
            (1-based) and the epoch's logs, e.g. ``"ckpt/epoch{epoch:02d}-{val_loss:.3f}"``.
        monitor: the logged value that decides "best" with ``save_best_only``.
        save_best_only: save only when ``monitor`` improves (mode as in ``EarlyStopping``).
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        include_optimizer: also save the optimizer slots and step (to resume training).
        period: save every ``period`` epochs.
        verbose: 1 logs a line per save.

    In a distributed fit each save first collects θ and the slots to the driver (one Spark job).

    Attributes:
        saved: the directories written, in order.
    """

    def __init__(self, filepath: str, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", include_optimizer: bool = True, period: int = 1,
                 verbose: int = 0):
        if not isinstance(filepath, (str, os.PathLike)) or not str(filepath):
            raise ValueError(f"filepath must be a non-empty path, got {filepath!r}")
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"period must be a positive integer, got {period!r}")
        self.filepath, self.monitor = os.fspath(filepath), monitor
        self.save_best_only, self.mode = bool(save_best_only), _mode(mode, monitor)
        self.include_optimizer, self.period, self.verbose = bool(include_optimizer), period, verbose
        self.best, self.saved = None, []

    def on_train_begin(self, logs=None):
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if (epoch + 1) % self.period:
            return
        if self.save_best_only:
            current = _monitored(logs, self.monitor, "ModelCheckpoint")
            if self.best is not None and not (
                    current < self.best if self.mode == "min" else current > self.best):
                return
            self.best = current
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"ModelCheckpoint filepath {self.filepath!r} cannot be filled from "
                             f"epoch and the logs {sorted(logs)}: {e}") from None
        self.sync_weights()
        self.model.save(path, include_optimizer=self.include_optimizer)
        self.saved.append(path)
        if self.verbose:
            log.info("epoch %d: saved model to %s", epoch + 1, path)


class LearningRateScheduler(Callback):
    """Set the optimizer's learning rate at the start of every epoch from ``schedule``.

    ``schedule(epoch)`` or ``schedule(epoch, lr)`` (0-based epoch, current rate) returns the rate
    for that epoch. It applies to every update of the epoch, in-process and distributed (the
    optimizer travels with each Spark job). The rate is logged as ``lr`` in the epoch's logs.
    For per-step schedules use ``rddtensor.optim`` schedules (``Adam(CosineDecay(...))``) instead.

    Example:
        >>> sched = LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch >= 2 else lr)
    """

    def __init__(self, schedule, verbose: int = 0):
        if not callable(schedule):
            raise TypeError(f"schedule must be a function epoch -> lr or (epoch, lr) -> lr, "
                            f"got {type(schedule).__name__}")
        self.schedule, self.verbose, self.lr = schedule, verbose, None
        try:
            params = inspect.signature(schedule).parameters.values()
            positional = [p for p in params
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self._two_args = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):  # builtins without a signature
            self._two_args = True

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.model.optimizer
        current = opt.lr if not callable(opt.lr) else opt.learning_rate(max(self.model.step, 0) + 1)
        new = self.schedule(epoch, current) if self._two_args else self.schedule(epoch)
        if not (isinstance(new, (int, float, np.floating, np.integer)) and not isinstance(new, bool)
                and math.isfinite(new) and new >= 0):
            raise ValueError(f"LearningRateScheduler: schedule({epoch}) returned {new!r}; it must "
                             "return a finite number >= 0")
        if callable(opt.lr):
            log.warning("LearningRateScheduler replaces the optimizer's per-step schedule %r",
                        opt.lr)
        opt.lr = self.lr = float(new)
        if self.verbose:
            log.info("epoch %d: learning rate %.6g", epoch + 1, self.lr)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.lr is not None:
            logs["lr"] = self.lr


class CSVLogger(Callback):
    """Append one CSV row per epoch (``epoch`` 0-based, then every logged value) to ``filename``.

    Args:
        filename: the CSV file.
        separator: the field separator.
        append: append to an existing file (no second header) instead of overwriting it.
    """

    def __init__(self, filename: str, separator: str = ",", append: bool = False):
        self.filename, self.separator, self.append = os.fspath(filename), separator, bool(append)
        self.keys = None

    def on_train_begin(self, logs=None):
        exists = self.append and os.path.exists(self.filename) and os.path.getsize(self.filename)
        self.keys = None
        if exists:
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), None)
            self.keys = header[1:] if header else None
        self._file = open(self.filename, "a" if self.append else "w", newline="")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        writer = csv.writer(self._file, delimiter=self.separator)
        if self.keys is None:
            self.keys = list(logs)
            writer.writerow(["epoch", *self.keys])
        writer.writerow([epoch, *(logs.get(k, "") for k in self.keys)])
        self._file.flush()

    def on_train_end(self, logs=None):
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
