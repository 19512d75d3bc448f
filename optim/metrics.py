"""Metrics that merge: each partition computes a small state, the driver merges and finishes.

    state = metric.state(y_true, P)        # on a partition: a tuple of small NumPy arrays
    state = metric.merge(state_a, state_b) # anywhere: elementwise sum by default
    value = metric.result(state)           # on the driver
    value = metric(y_true, P)              # all three at once

States are O(classes) or O(bins), never O(rows), so evaluation moves a few numbers per
partition. ``P`` is the output of the loss's ``link``: probabilities ``(n, C)`` (multi-class,
decided by the width ``C >= 2``), ``(n,)`` or ``(n, 1)`` probabilities of class 1 (binary), or
predictions (regression). Binary ``y_true`` counts as class 1 above 0.5 (0/1 and -1/+1 labels
both work); multi-class ``y_true`` is class ids ``(n,)``/``(n, 1)`` or one-hot ``(n, C)``.
Computation runs on ``P``'s array module (NumPy or CuPy); states are always NumPy.
"""
from __future__ import annotations

import re

import numpy as np

from rddtensor.optim.losses import _check_labels, _reshape_targets
from rddtensor.backend import get_array_module, to_numpy

__all__ = [
    "Metric", "Accuracy", "TopKAccuracy", "Precision", "Recall", "F1", "ROCAUC", "RMSE", "MSE",
    "MAE", "ConfusionMatrix", "get_metric",
]


# --- input handling -------------------------------------------------------------------------

def _bincount(xp, x, length: int):
    if x.size == 0:
        return xp.zeros(length, dtype=xp.int64)
    return xp.bincount(x, minlength=length).astype(xp.int64)


def _classification(y_true, P, name: str):
    """Return ``(xp, P, labels, num_classes, binary)``; binary ``P`` is flattened to ``(n,)``."""
    xp = get_array_module(P)
    P = xp.asarray(P)
    if P.ndim == 1 or (P.ndim == 2 and P.shape[1] == 1):
        P = P.reshape(-1)
        y = _reshape_targets(xp, P, y_true, name)
        return xp, P, (y > 0.5).astype(xp.int64), 2, True
    if P.ndim != 2:
        raise ValueError(f"{name} needs P of shape (n,), (n, 1) or (n, classes), "
                         f"got {tuple(P.shape)}")
    y = xp.asarray(y_true)
    if y.ndim == 2 and y.shape == P.shape:  # one-hot rows
        return xp, P, xp.argmax(y, axis=1), P.shape[1], False
    if y.size != P.shape[0] or (y.ndim > 1 and y.shape[0] != P.shape[0]):
        raise ValueError(f"{name}: y_true of shape {tuple(y.shape)} does not match P of shape "
                         f"{tuple(P.shape)}; pass class ids of shape ({P.shape[0]},) or one-hot "
                         f"rows of shape {tuple(P.shape)}")
    return xp, P, _check_labels(xp, y, P.shape[1]), P.shape[1], False


def _predicted(xp, P, binary: bool):
    return (P > 0.5).astype(xp.int64) if binary else xp.argmax(P, axis=1)


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else float("nan")


# --- the base class -------------------------------------------------------------------------

class Metric:
    """Base class of mergeable metrics.

    Subclasses implement ``state`` and ``result``; ``merge`` sums states elementwise unless a
    metric needs otherwise.

    Attributes:
        name: display name, e.g. ``"accuracy"`` or ``"top_5_accuracy"`` (history keys).

    Example:
        >>> import numpy as np
        >>> acc = get_metric("accuracy")
        >>> a = acc.state([1], np.array([[0.2, 0.8]]))   # partition 1: right
        >>> b = acc.state([0], np.array([[0.3, 0.7]]))   # partition 2: wrong
        >>> acc.result(acc.merge(a, b))
        0.5
    """

    name = "metric"
    kind = "metric"  # the get_metric key that rebuilds it, see get_config

    def state(self, y_true, P) -> tuple:
        """The partial state of one batch or partition: a tuple of small NumPy arrays."""
        raise NotImplementedError

    def merge(self, a: tuple, b: tuple) -> tuple:
        """Combine two states (elementwise sum)."""
        if len(a) != len(b) or any(np.shape(x) != np.shape(y) for x, y in zip(a, b)):
            raise ValueError(f"{self.name}: cannot merge states of shapes "
                             f"{[np.shape(x) for x in a]} and {[np.shape(y) for y in b]}; "
                             "were the partitions' outputs of different widths?")
        return tuple(np.add(x, y) for x, y in zip(a, b))

    def result(self, state: tuple):
        """The metric's value from a (merged) state."""
        raise NotImplementedError

    def __call__(self, y_true, P):
        return self.result(self.state(y_true, P))

    def get_config(self) -> dict:
        """``{"name": kind, **settings}``; ``get_metric(c.pop("name"), **c)`` rebuilds it."""
        return {"name": self.kind}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _numpy_state(*arrays) -> tuple:
    return tuple(np.asarray(to_numpy(a), dtype=np.int64) for a in arrays)


# --- accuracy -------------------------------------------------------------------------------

class Accuracy(Metric):
    """Fraction of rows whose predicted class is the true class.

    ``mean(argmax(P) == y)`` for multi-class, ``mean((P > 0.5) == y)`` for binary. State:
    ``(correct, count)``; an empty dataset gives NaN.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        A float in ``[0, 1]``.

    Example:
        >>> import numpy as np
        >>> Accuracy()([0, 1, 1], np.array([0.2, 0.9, 0.4]))
        0.6666666666666666
    """

    name = kind = "accuracy"

    def state(self, y_true, P) -> tuple:
        xp, P, y, _, binary = _classification(y_true, P, self.name)
        return _numpy_state((_predicted(xp, P, binary) == y).sum(), y.size)

    def result(self, state: tuple) -> float:
        return _ratio(*state)


class TopKAccuracy(Metric):
    """Fraction of rows whose true class is among the ``k`` highest-scored classes.

    Correct when fewer than ``k`` classes score strictly higher than the true class (ties count
    in the row's favour). Binary ``P``: ``k = 1`` is accuracy, ``k >= 2`` is 1. State:
    ``(correct, count)``.

    Args:
        k: positive integer (default 5); the name is ``"top_{k}_accuracy"``.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``.

    Returns:
        A float in ``[0, 1]``.

    Example:
        >>> import numpy as np
        >>> TopKAccuracy(k=2)([2, 0], np.array([[0.1, 0.5, 0.4], [0.1, 0.5, 0.4]]))
        0.5
    """

    kind = "top_k_accuracy"

    def __init__(self, k: int = 5):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.name = f"top_{self.k}_accuracy"

    def get_config(self) -> dict:
        return {"name": self.kind, "k": self.k}

    def state(self, y_true, P) -> tuple:
        xp, P, y, _, binary = _classification(y_true, P, self.name)
        if binary:
            correct = (_predicted(xp, P, True) == y).sum() if self.k == 1 else y.size
            return _numpy_state(correct, y.size)
        true_score = P[xp.arange(P.shape[0]), y]
        higher = (P > true_score[:, None]).sum(axis=1)
        return _numpy_state((higher < self.k).sum(), y.size)

    def result(self, state: tuple) -> float:
        return _ratio(*state)


# --- precision, recall, F1 ------------------------------------------------------------------

_AVERAGES = ("binary", "macro", "micro", "weighted")


class _PerClass(Metric):
    """Shared state of precision/recall/F1: per-class true positives, predicted and true counts.

    Averages as in scikit-learn: ``binary`` scores class 1 (default for binary ``P``),
    ``macro`` is the mean over the classes that occur in ``y_true`` or in the predictions
    (default for multi-class), ``weighted`` weighs classes by their support, ``micro`` pools the
    counts. An undefined ratio (0/0) counts as 0, scikit-learn's ``zero_division=0``.
    """

    def __init__(self, average: str | None = None):
        if average is not None and average not in _AVERAGES:
            raise ValueError(f"average must be one of {list(_AVERAGES)} or None (binary for "
                             f"binary outputs, macro otherwise), got {average!r}")
        self.average = average
        self.name = self.kind if average is None else f"{self.kind}_{average}"

    def get_config(self) -> dict:
        return {"name": self.kind, "average": self.average}

    def state(self, y_true, P) -> tuple:
        xp, P, y, C, binary = _classification(y_true, P, self.name)
        if self.average == "binary" and not binary:
            raise ValueError(f"{self.name}: average='binary' needs binary outputs P of shape (n,) "
                             f"or (n, 1), got {C} classes; use macro, micro or weighted")
        pred = _predicted(xp, P, binary)
        tp = _bincount(xp, y[pred == y], C)
        # the width tells result() whether the outputs were binary: (tp, pred, true, binary)
        return _numpy_state(tp, _bincount(xp, pred, C), _bincount(xp, y, C), int(binary))

    def merge(self, a: tuple, b: tuple) -> tuple:
        merged = super().merge(a, b)
        return merged[:3] + (np.maximum(a[3], b[3]),)

    def result(self, state: tuple) -> float:
        tp, pred, true, binary = (np.asarray(s, dtype=np.float64) for s in state)
        average = self.average or ("binary" if binary else "macro")
        if average == "binary":
            return float(self._score(tp[1:], pred[1:], true[1:])[0])
        if average == "micro":
            return float(self._score(tp.sum(keepdims=True), pred.sum(keepdims=True),
                                     true.sum(keepdims=True))[0])
        scores = self._score(tp, pred, true)
        if average == "weighted":
            return float((scores * true).sum() / true.sum()) if true.sum() else 0.0
        present = (pred + true) > 0
        return float(scores[present].mean()) if present.any() else 0.0

    @staticmethod
    def _safe(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


class Precision(_PerClass):
    """Precision ``tp / (tp + fp)``, per class and averaged (see ``average``).

    Args:
        average: ``None`` (binary outputs: class 1; multi-class: macro), ``"binary"``,
            ``"macro"``, ``"micro"`` or ``"weighted"``, as in scikit-learn. Macro averages over
            the classes present in the labels or the predictions.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        A float in ``[0, 1]`` (0 where undefined).

    Example:
        >>> import numpy as np
        >>> Precision()([0, 1, 1], np.array([0.7, 0.9, 0.2]))
        0.5
    """

    kind = "precision"

    def _score(self, tp, pred, true):
        return self._safe(tp, pred)


class Recall(_PerClass):
    """Recall ``tp / (tp + fn)``, per class and averaged (see :class:`Precision`).

    Args:
        average: as in :class:`Precision`.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        A float in ``[0, 1]`` (0 where undefined).

    Example:
        >>> import numpy as np
        >>> Recall()([0, 1, 1], np.array([0.7, 0.9, 0.2]))
        0.5
    """

    kind = "recall"

    def _score(self, tp, pred, true):
        return self._safe(tp, true)


class F1(_PerClass):
    """F1 score ``2 tp / (2 tp + fp + fn)`` (harmonic mean of precision and recall), averaged.

    Args:
        average: as in :class:`Precision`; macro is the mean of the per-class F1 scores.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        A float in ``[0, 1]`` (0 where undefined).

    Example:
        >>> import numpy as np
        >>> F1()([0, 1, 1], np.array([0.7, 0.9, 0.2]))
        0.5
    """

    kind = "f1"

    def _score(self, tp, pred, true):
        return self._safe(2 * tp, pred + true)


# --- ROC AUC --------------------------------------------------------------------------------

class ROCAUC(Metric):
    """Area under the ROC curve from fixed score histograms (mergeable, approximate).

    Scores in ``[0, 1]`` fall into ``num_bins`` equal bins, counted separately for positive and
    negative rows; then ``AUC = sum_b pos_b * (neg_below_b + neg_b / 2) / (n_pos * n_neg)``:
    exact for pairs in different bins, pairs in the same bin count as ties (1/2). The error is at
    most half the fraction of (positive, negative) pairs that share a bin: about
    ``1 / (2 * num_bins)`` for spread-out scores, more when many scores of both classes crowd
    within ``1 / num_bins`` of each other (raise ``num_bins`` then). Scores outside ``[0, 1]``
    are clipped: pass probabilities (the loss's ``link``). Multi-class: one-vs-rest, macro
    average over the classes that have both positive and negative rows (NaN when none has).
    State: ``(pos, neg)`` int64 histograms of shape ``(K, num_bins)``, ``K = 1`` for binary,
    ``C`` for multi-class.

    Args:
        num_bins: number of histogram bins (default 4096).

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        A float in ``[0, 1]``, or NaN when undefined.

    Example:
        >>> import numpy as np
        >>> ROCAUC()([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """

    name = kind = "roc_auc"

    def __init__(self, num_bins: int = 4096):
        if (isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer))
                or num_bins < 1):
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.num_bins = int(num_bins)

    def get_config(self) -> dict:
        return {"name": self.kind, "num_bins": self.num_bins}

    def state(self, y_true, P) -> tuple:
        xp, P, y, C, binary = _classification(y_true, P, self.name)
        if P.size and bool(xp.isnan(P).any()):
            raise ValueError(f"{self.name}: P contains NaN; check the model's outputs")
        B = self.num_bins
        S = P.reshape(-1, 1) if binary else P
        is_pos = (y.reshape(-1, 1) == 1) if binary else (y[:, None] == xp.arange(C)[None, :])
        bins = xp.clip(xp.floor(S * B), 0, B - 1).astype(xp.int64)
        flat = bins + B * xp.arange(S.shape[1])[None, :]
        K = S.shape[1]
        pos = _bincount(xp, flat[is_pos], K * B).reshape(K, B)
        neg = _bincount(xp, flat[~is_pos], K * B).reshape(K, B)
        return _numpy_state(pos, neg)

    def result(self, state: tuple) -> float:
        pos, neg = (np.asarray(s, dtype=np.float64) for s in state)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        defined = (n_pos > 0) & (n_neg > 0)
        if not defined.any():
            return float("nan")
        return float(np.mean(wins[defined] / (n_pos[defined] * n_neg[defined])))


# --- regression -----------------------------------------------------------------------------

class _Regression(Metric):
    """State ``(sum of f(P - y) over all elements, element count)`` as float64."""

    def state(self, y_true, P) -> tuple:
        xp = get_array_module(P)
        P = xp.asarray(P)
        if P.ndim == 0:
            raise ValueError(f"{self.name}: P must have a batch axis, got a scalar")
        y = _reshape_targets(xp, P, y_true, self.name)
        R = P.astype(xp.float64) - y.astype(xp.float64)
        return (np.asarray(float(self._elementwise(xp, R).sum())), np.asarray(float(R.size)))

    def result(self, state: tuple) -> float:
        return _ratio(*state)


class MSE(_Regression):
    """Mean squared error over all elements: ``mean((P - y)^2)``.

    Shape:
        y_true, P: same shape; ``(n,)`` and ``(n, 1)`` are interchangeable.

    Returns:
        A float (NaN for no rows).

    Example:
        >>> import numpy as np
        >>> MSE()([0.0, 0.0], np.array([1.0, 3.0]))
        5.0
    """

    name = kind = "mse"

    def _elementwise(self, xp, R):
        return R * R


class RMSE(_Regression):
    """Root mean squared error over all elements: ``sqrt(mean((P - y)^2))``.

    For several outputs this is the root of the pooled mean (Keras), not scikit-learn's mean of
    per-output roots.

    Shape:
        y_true, P: same shape; ``(n,)`` and ``(n, 1)`` are interchangeable.

    Returns:
        A float (NaN for no rows).

    Example:
        >>> import numpy as np
        >>> RMSE()([0.0, 0.0], np.array([3.0, 4.0]))
        3.5355339059327378
    """

    name = kind = "rmse"

    def _elementwise(self, xp, R):
        return R * R

    def result(self, state: tuple) -> float:
        return float(np.sqrt(_ratio(*state)))


class MAE(_Regression):
    """Mean absolute error over all elements: ``mean(|P - y|)``.

    Shape:
        y_true, P: same shape; ``(n,)`` and ``(n, 1)`` are interchangeable.

    Returns:
        A float (NaN for no rows).

    Example:
        >>> import numpy as np
        >>> MAE()([0.0, 0.0], np.array([1.0, -3.0]))
        2.0
    """

    name = kind = "mae"

    def _elementwise(self, xp, R):
        return xp.abs(R)


# --- confusion matrix -----------------------------------------------------------------------

class ConfusionMatrix(Metric):
    """Counts of (true class, predicted class) pairs: rows are true, columns predicted.

    ``C`` is ``P``'s width (2 for binary outputs, thresholded at 0.5). State: the ``(C, C)``
    int64 matrix itself.

    Shape:
        y_true: ``(n,)``, ``(n, 1)`` or one-hot ``(n, C)``; P: ``(n, C)``, ``(n,)`` or ``(n, 1)``.

    Returns:
        The ``(C, C)`` int64 NumPy array, as scikit-learn's ``confusion_matrix``.

    Example:
        >>> import numpy as np
        >>> ConfusionMatrix()([0, 1, 1], np.array([0.2, 0.9, 0.4])).tolist()
        [[1, 0], [1, 1]]
    """

    name = kind = "confusion_matrix"

    def state(self, y_true, P) -> tuple:
        xp, P, y, C, binary = _classification(y_true, P, self.name)
        pairs = y * C + _predicted(xp, P, binary)
        return _numpy_state(_bincount(xp, pairs, C * C).reshape(C, C))

    def result(self, state: tuple) -> np.ndarray:
        return np.array(state[0], dtype=np.int64)


# --- lookup ---------------------------------------------------------------------------------

_METRICS = {
    "accuracy": Accuracy, "acc": Accuracy,
    "top_k_accuracy": TopKAccuracy, "top_k": TopKAccuracy,
    "precision": Precision, "recall": Recall, "f1": F1, "f1_score": F1,
    "roc_auc": ROCAUC, "auc": ROCAUC, "rocauc": ROCAUC,
    "rmse": RMSE, "root_mean_squared_error": RMSE,
    "mse": MSE, "mean_squared_error": MSE,
    "mae": MAE, "mean_absolute_error": MAE,
    "confusion_matrix": ConfusionMatrix,
}
_TOP_K = re.compile(r"top_?(\d+)(_accuracy)?")
_AVERAGED = re.compile(r"(precision|recall|f1)_(binary|macro|micro|weighted)")


def get_metric(name_or_metric, **kwargs) -> Metric:
    """Look up a metric by name (case-insensitive) or pass a :class:`Metric` instance through.

    Args:
        name_or_metric: ``"accuracy"``/``"acc"``, ``"top_k_accuracy"`` (with ``k=``) or
            ``"top5"``/``"top_5_accuracy"``, ``"precision"``, ``"recall"``, ``"f1"`` (also
            ``"f1_micro"`` etc.), ``"roc_auc"``/``"auc"``, ``"rmse"``, ``"mse"``, ``"mae"``,
            ``"confusion_matrix"``; or a ``Metric`` (returned unchanged).
        **kwargs: settings of the metric class (``k``, ``average``, ``num_bins``).

    Returns:
        A :class:`Metric`. Unknown names raise ``ValueError`` listing the known ones.

    Example:
        >>> get_metric("top_k_accuracy", k=3).name
        'top_3_accuracy'
        >>> get_metric("top5").name
        'top_5_accuracy'
    """
    if isinstance(name_or_metric, Metric):
        if kwargs:
            raise ValueError(f"settings {sorted(kwargs)} only apply to a metric given by name, "
                             f"got the instance {name_or_metric!r}")
        return name_or_metric
    if not isinstance(name_or_metric, str):
        raise TypeError(f"metric must be a metric name or a Metric instance, "
                        f"got {name_or_metric!r}")
    key = name_or_metric.strip().lower()
    if key in _METRICS:
        return _METRICS[key](**kwargs)
    match = _TOP_K.fullmatch(key)
    if match:
        return TopKAccuracy(k=int(match.group(1)), **kwargs)
    match = _AVERAGED.fullmatch(key)
    if match:
        return _METRICS[match.group(1)](average=match.group(2), **kwargs)
    known = sorted(_METRICS) + ["top5", "top_5_accuracy", "f1_micro", "..."]
    raise ValueError(f"unknown metric {name_or_metric!r}; known metrics: {known}")
