"""Loss functions: ``loss, dY = loss_fn(Y, y, n_total=...)`` on one partition's arrays.

Every loss sums the per-sample losses of its batch and divides by ``n_total``, the size of the
*global* mini-batch (default: this batch's size), and returns the gradient with the same
normalisation. Because of that, the losses and gradients that the partitions of a distributed
mini-batch compute with the same ``n_total`` *sum* to the single-process loss and gradient::

    loss = sum_i w_i * l(Y_i, y_i) / n_total          dY_i = w_i * dl(Y_i, y_i)/dY_i / n_total

where ``w_i = sample_weight[i] * class_weight[label_i]`` (Keras semantics: the weights scale the
sum, the divisor stays ``n_total``; PyTorch's weighted cross-entropy divides by the sum of weights
instead). A per-sample loss over several outputs (``(batch, k)`` regression, multi-label BCE) is
the mean over that sample's outputs, as in Keras.

The cross-entropies and the model's output activation (the rule, one paragraph): a model whose
last layer ends in ``sigmoid`` (binary cross-entropy) or ``softmax`` (categorical and sparse
categorical cross-entropy) is trained on the *pre-activation logits*: the model leaves the
activation out in training and evaluation and the loss computes ``softplus`` / log-sum-exp on the
logits, fused and finite for any logit, as Keras does; ``predict`` still returns probabilities.
A model without that activation outputs logits, and the loss reads them as logits. Losses built
by hand take ``from_logits``: ``None`` (the default) decides by the model as above; ``True`` reads
the output as logits whatever it is; ``False`` reads it as probabilities (fused when the model
ends in the matching activation, else ``-log`` of the output clipped to ``[1e-7, 1 - 1e-7]``,
Keras' epsilon). ``model.compile`` binds the loss to the model (:meth:`Loss.bind`); ``loss.link``
maps what the loss reads to the probabilities the metrics in :mod:`rddtensor.optim.metrics` consume.

Only ``rddtensor.backend`` picks NumPy or CuPy: ``Y`` decides, ``y`` may be a NumPy array.
"""
from __future__ import annotations

import copy
import numbers
import warnings

import numpy as np

from rddtensor.backend import get_array_module
from rddtensor.ops import get_ops
from rddtensor.ops.numpy_ops import softmax_xent as _softmax_xent

__all__ = [
    "Loss", "MeanSquaredError", "MeanAbsoluteError", "Huber", "BinaryCrossentropy",
    "CategoricalCrossentropy", "SparseCategoricalCrossentropy", "Hinge", "get_loss",
    "mse", "mae", "huber", "binary_crossentropy", "categorical_crossentropy",
    "sparse_categorical_crossentropy", "hinge",
]


# --- shared helpers (also used by optim.metrics) ---------------------------------------------

def _reshape_targets(xp, Y, y, what: str):
    """Return ``y`` with ``Y``'s shape; only size-1 axes may differ, never broadcast rows."""
    y = xp.asarray(y)
    if y.shape == Y.shape:
        return y

    def core(shape):
        return tuple(d for d in shape[1:] if d != 1)

    if (y.ndim >= 1 and Y.ndim >= 1 and y.shape[0] == Y.shape[0] and y.size == Y.size
            and core(y.shape) == core(Y.shape)):
        return y.reshape(Y.shape)
    raise ValueError(f"{what}: targets y of shape {tuple(y.shape)} do not match predictions Y of "
                     f"shape {tuple(Y.shape)}; pass y with shape {tuple(Y.shape)} (size-1 axes "
                     "may be dropped or added, rows are never broadcast)")


def _format_label(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _check_labels(xp, y, num_classes: int):
    """Validate integer class ids in ``[0, num_classes)`` and return them as int64 (flat)."""
    y = xp.asarray(y).reshape(-1)
    if y.dtype.kind in "iub":
        bad = (y < 0) | (y >= num_classes)
    elif y.dtype.kind == "f":
        bad = ~(y == xp.floor(y)) | (y < 0) | (y >= num_classes)  # NaN fails the first test
    else:
        raise TypeError(f"labels must be a numeric array of class ids, got dtype {y.dtype}")
    if y.size and bool(bad.any()):
        row = int(xp.argmax(bad))
        raise ValueError(f"labels must be integers in [0, {num_classes}), got "
                         f"{_format_label(y[row].item())} at row {row}")
    return y.astype(xp.int64)


def _sigmoid(xp, Y):
    # exp(-softplus(-Y)): no overflow for any Y, full relative precision for tiny probabilities
    return xp.exp(-xp.logaddexp(0, -Y))


def _softmax(xp, Y):
    Z = xp.exp(Y - Y.max(axis=-1, keepdims=True))
    return Z / Z.sum(axis=-1, keepdims=True)


EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before a log (Keras')


def _bce_probabilities(xp, P, y):
    """Binary cross-entropy of probabilities ``P`` (clipped) and its gradient w.r.t. ``P``
    (zero where the clip is active, as ``clip`` has no gradient there)."""
    Pc = xp.clip(P, EPSILON, 1 - EPSILON)
    E = -(y * xp.log(Pc) + (1 - y) * xp.log1p(-Pc))
    inside = (P > EPSILON) & (P < 1 - EPSILON)
    return E, xp.where(inside, (Pc - y) / (Pc * (1 - Pc)), 0).astype(P.dtype, copy=False)


def _xent_probabilities(xp, P, T):
    """Cross-entropy of class-probability rows ``P`` (normalised to sum 1, then clipped, as
    Keras) against target rows ``T``, and its gradient w.r.t. ``P``."""
    s = P.sum(axis=1, keepdims=True)
    Q = P / s
    Qc = xp.clip(Q, EPSILON, 1 - EPSILON)
    per = -(T * xp.log(Qc)).sum(axis=1)
    G = xp.where((Q > EPSILON) & (Q < 1 - EPSILON), -T / Qc, 0)  # d loss / d Q
    return per, ((G - (G * Q).sum(axis=1, keepdims=True)) / s).astype(P.dtype, copy=False)


def _check_from_logits(from_logits):
    if from_logits is not None and not isinstance(from_logits, (bool, np.bool_)):
        raise ValueError(f"from_logits must be True, False or None (decided by the model's "
                         f"output activation), got {from_logits!r}")
    return None if from_logits is None else bool(from_logits)


def _n_total(n_total, batch: int) -> float:
    if n_total is None:
        return float(batch)
    if (isinstance(n_total, bool) or not isinstance(n_total, numbers.Real)
            or not n_total > 0 or not np.isfinite(n_total)):
        raise ValueError(f"n_total must be a positive number (the global batch size), "
                         f"got {n_total!r}")
    return float(n_total)


def _class_weight_table(class_weight, num_classes: int) -> np.ndarray:
    table = np.ones(num_classes, dtype=np.float64)
    if isinstance(class_weight, dict):
        for key, weight in class_weight.items():
            if (isinstance(key, bool) or not isinstance(key, numbers.Real)
                    or float(key) != int(key) or not 0 <= int(key) < num_classes):
                raise ValueError(f"class_weight keys must be class ids in [0, {num_classes}), "
                                 f"got {key!r}; binary losses use 0 (negative) and 1 (positive)")
            table[int(key)] = float(weight)
        return table
    table = np.asarray(class_weight, dtype=np.float64).reshape(-1)
    if table.shape != (num_classes,):
        raise ValueError(f"class_weight must be a dict or an array of length {num_classes} "
                         f"(one weight per class), got shape {table.shape}")
    return table


def _mean_over_outputs(xp, E, dE):
    """Per-sample mean over all non-batch axes of elementwise losses ``E`` and gradients."""
    if E.ndim == 1:
        return E, dE
    k = int(np.prod(E.shape[1:]))
    return E.reshape(E.shape[0], k).mean(axis=1), dE / k


# --- the base class ---------------------------------------------------------------------------

class Loss:
    """Base class of all losses: ``loss, dY = loss_fn(Y, y, n_total=None, ...)``.

    ``loss = sum_i w_i * l_i / n_total`` and ``dY = d loss / d Y``, with
    ``w_i = sample_weight[i] * class_weight[label_i]`` (missing weights are 1).

    Subclasses set ``name`` and ``task`` and implement ``_targets(xp, Y, y)`` (validate and
    reshape the targets), ``_per_sample(xp, Y, y)`` (per-sample losses ``(batch,)`` and their
    gradient w.r.t. ``Y``), and, for classification, ``_num_classes(Y)`` and ``_class_ids``.

    Attributes:
        name: canonical name accepted by :func:`get_loss`.
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``.

    Args (of ``__call__``):
        Y: model output (logits for classification), float array; NumPy or CuPy.
        y: targets; see each loss for the accepted forms.
        n_total: size of the global mini-batch this batch is part of (default ``len(Y)``).
            Partitions of one mini-batch called with the same ``n_total`` return losses and
            gradients that sum to the single-process ones.
        class_weight: dict ``class -> weight`` (missing classes weigh 1) or an array of one
            weight per class; classification losses only.
        sample_weight: one weight per row, shape ``(batch,)`` or ``(batch, 1)``.

    Shape:
        Y: ``(batch, ...)``; dY: same shape and dtype as ``Y``.

    Returns:
        ``(loss, dY)``: a Python float and the gradient array.

    Example:
        >>> import numpy as np
        >>> loss, dY = mse(np.array([1.0, 3.0]), np.array([1.0, 1.0]), n_total=4)
        >>> loss, dY.tolist()
        (1.0, [0.0, 1.0])
    """

    name = "loss"
    task = "regression"
    fusable = None  # the output activation whose logits this loss can take ("sigmoid"/"softmax")
    from_logits = None  # as asked: None (decided by the model), True or False
    fused = None  # once bound: the model's output activation this loss takes the logits of
    probabilities_in = False  # once bound (or from_logits=False): Y are probabilities

    def __call__(self, Y, y, n_total=None, class_weight=None, sample_weight=None):
        xp = get_array_module(Y)
        Y = xp.asarray(Y)
        if Y.dtype.kind != "f":
            Y = Y.astype(xp.float64)
        if Y.ndim == 0:
            raise ValueError(f"{self.name}: Y must have a batch axis, got a scalar")
        batch = Y.shape[0]
        n = _n_total(n_total, batch)
        y = self._targets(xp, Y, y)
        per, dY = self._per_sample(xp, Y, y)
        w = self._weights(xp, Y, y, class_weight, sample_weight)
        if w is not None:
            per = per * w
            dY = dY * w.reshape((batch,) + (1,) * (Y.ndim - 1))
        if n == 0:  # an empty batch with no n_total: nothing to add
            return 0.0, xp.zeros_like(Y)
        loss = float(per.astype(xp.float64).sum()) / n
        return loss, (dY / n).astype(Y.dtype, copy=False)

    def link(self, Y):
        """Map the model output to what metrics consume (identity here: regression)."""
        return Y

    def bind(self, activation) -> "Loss":
        """This loss for a model whose output ends in ``activation`` (``(name, kwargs)`` from
        ``Layer.output_activation()``, or ``None``): a copy that knows how to read the output.

        A cross-entropy asked with ``from_logits`` None or False, on a model ending in its
        activation (``fusable``), is *fused*: ``fused`` names the activation, the model leaves it
        out (``forward(..., logits=True)``) and the loss reads logits. Otherwise ``from_logits``
        decides, and None reads an output ending in sigmoid/softmax as probabilities, any other
        as logits. Other losses are returned unchanged.
        """
        if self.fusable is None:
            return self
        name, kwargs = activation if activation else (None, {})
        probability = name in ("sigmoid", "softmax")
        bound = copy.copy(self)
        bound.fused, bound.probabilities_in = None, False
        if self.from_logits is True:
            if probability:
                warnings.warn(f"{self.name} got from_logits=True, but the model's output comes "
                              f"from a {name} activation, so it is a probability, not a logit; "
                              "drop from_logits (the loss then takes the logits before the "
                              f"{name}) or the activation", UserWarning, stacklevel=3)
        elif name == self.fusable and kwargs.get("axis", -1) in (-1, 1):
            bound.fused = name
        elif self.from_logits is False or probability:
            bound.probabilities_in = True
        return bound

    def get_config(self) -> dict:
        """``{"name": ..., **settings}``; ``get_loss(c.pop("name"), **c)`` rebuilds the loss."""
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # --- hooks ----------------------------------------------------------------------------
    def _targets(self, xp, Y, y):
        return _reshape_targets(xp, Y, y, self.name).astype(Y.dtype, copy=False)

    def _per_sample(self, xp, Y, y):
        raise NotImplementedError

    def _num_classes(self, Y):
        return None  # regression: no classes, no class_weight

    def _class_ids(self, xp, Y, y):
        raise NotImplementedError

    def _weights(self, xp, Y, y, class_weight, sample_weight):
        batch = Y.shape[0]
        w = None
        if class_weight is not None:
            num_classes = self._num_classes(Y)
            if num_classes is None:
                raise ValueError(f"class_weight applies to classification losses; {self.name} is a "
                                 "regression loss: pass sample_weight instead")
            table = xp.asarray(_class_weight_table(class_weight, num_classes), dtype=Y.dtype)
            w = table[self._class_ids(xp, Y, y)]
        if sample_weight is not None:
            sw = xp.asarray(sample_weight, dtype=Y.dtype)
            if sw.size != batch or (sw.ndim > 1 and sw.shape[0] != batch):
                raise ValueError(f"sample_weight has shape {tuple(sw.shape)} but the batch has "
                                 f"{batch} rows; pass one weight per row, shape ({batch},)")
            sw = sw.reshape(batch)
            w = sw if w is None else w * sw
        return w


# --- regression -------------------------------------------------------------------------------

class MeanSquaredError(Loss):
    """Mean squared error: ``l_i = mean_j (Y_ij - y_ij)^2``, ``dl/dY = 2 (Y - y) / k``.

    ``y`` must have ``Y``'s shape; ``(batch,)`` and ``(batch, 1)`` are interchangeable, anything
    else that would broadcast (e.g. ``(batch,)`` against ``(batch, batch)``) raises.

    Shape:
        Y, y: ``(batch,)`` or ``(batch, k, ...)`` (``k`` outputs averaged per sample).

    Returns:
        ``(loss, dY)`` as in :class:`Loss`.

    Example:
        >>> import numpy as np
        >>> mse(np.array([[1.0], [2.0]]), np.array([0.0, 0.0]))[0]
        2.5
    """

    name = "mse"
    task = "regression"

    def _per_sample(self, xp, Y, y):
        R = Y - y
        return _mean_over_outputs(xp, R * R, 2 * R)


class MeanAbsoluteError(Loss):
    """Mean absolute error: ``l_i = mean_j |Y_ij - y_ij|``, subgradient ``sign(Y - y) / k``.

    The subgradient at ``Y == y`` is 0. Shapes as in :class:`MeanSquaredError`.

    Shape:
        Y, y: ``(batch,)`` or ``(batch, k, ...)``.

    Returns:
        ``(loss, dY)`` as in :class:`Loss`.

    Example:
        >>> import numpy as np
        >>> mae(np.array([1.0, -2.0]), np.array([0.0, 0.0]))[0]
        1.5
    """

    name = "mae"
    task = "regression"

    def _per_sample(self, xp, Y, y):
        R = Y - y
        return _mean_over_outputs(xp, xp.abs(R), xp.sign(R))


class Huber(Loss):
    """Huber loss: quadratic for small residuals, linear beyond ``delta``.

    ``l(r) = r^2 / 2`` if ``|r| <= delta`` else ``delta * (|r| - delta / 2)``, ``r = Y - y``,
    averaged over outputs; ``dl/dr = clip(r, -delta, delta)``. Equals PyTorch's ``huber_loss``.

    Args:
        delta: positive threshold between the quadratic and linear parts (default 1.0).

    Shape:
        Y, y: ``(batch,)`` or ``(batch, k, ...)``.

    Returns:
        ``(loss, dY)`` as in :class:`Loss`.

    Example:
        >>> import numpy as np
        >>> Huber(delta=1.0)(np.array([0.5, 3.0]), np.array([0.0, 0.0]))[0]
        1.3125
    """

    name = "huber"
    task = "regression"

    def __init__(self, delta: float = 1.0):
        if (isinstance(delta, bool) or not isinstance(delta, numbers.Real)
                or not delta > 0 or not np.isfinite(delta)):
            raise ValueError(f"delta must be a positive number, got {delta!r}")
        self.delta = float(delta)

    def get_config(self) -> dict:
        return {"name": self.name, "delta": self.delta}

    def _per_sample(self, xp, Y, y):
        R = Y - y
        A = xp.abs(R)
        E = xp.where(A <= self.delta, 0.5 * R * R, self.delta * (A - 0.5 * self.delta))
        return _mean_over_outputs(xp, E, xp.clip(R, -self.delta, self.delta))


# --- classification ---------------------------------------------------------------------------

def _check_label_smoothing(label_smoothing) -> float:
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or not 0 <= label_smoothing <= 1):
        hint = " (from_logits is a keyword argument)" if isinstance(label_smoothing, bool) else ""
        raise ValueError(f"label_smoothing must be a number in [0, 1], got "
                         f"{label_smoothing!r}{hint}")
    return float(label_smoothing)


def _logits_2d(Y, name: str):
    if Y.ndim != 2 or Y.shape[1] < 1:
        raise ValueError(f"{name} needs logits of shape (batch, classes), got {tuple(Y.shape)}")


class BinaryCrossentropy(Loss):
    """Binary cross-entropy from logits: ``l = softplus(Y) - y * Y``, ``dl/dY = sigmoid(Y) - y``.

    Equals ``-y log sigmoid(Y) - (1 - y) log(1 - sigmoid(Y))``, computed with ``logaddexp`` so
    that it stays finite for any logit. With several outputs per row (multi-label) the per-sample
    loss is their mean. ``class_weight`` keys are 0 and 1 (a target counts as class 1 when it is
    above 0.5) and needs one output per row.

    Args:
        label_smoothing: in ``[0, 1]``; targets become ``y * (1 - s) + s / 2``.
        from_logits: ``None`` (default): decided by the model (logits, fused with a last
            ``sigmoid`` activation); ``True``: ``Y`` are logits; ``False``: ``Y`` are
            probabilities (see the module docstring).

    Shape:
        Y: ``(batch,)``, ``(batch, 1)`` or ``(batch, k)`` logits; y: 0/1 (or probabilities),
        same shape (``(batch,)`` and ``(batch, 1)`` are interchangeable).

    Returns:
        ``(loss, dY)`` as in :class:`Loss`; ``link(Y) = sigmoid(Y)``.

    Example:
        >>> import numpy as np
        >>> round(binary_crossentropy(np.array([0.0, 0.0]), np.array([0, 1]))[0], 6)
        0.693147
    """

    name = "binary_crossentropy"
    task = "binary"
    fusable = "sigmoid"

    def __init__(self, label_smoothing: float = 0.0, *, from_logits=None):
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.from_logits = _check_from_logits(from_logits)
        self.probabilities_in = self.from_logits is False

    def get_config(self) -> dict:
        return {"name": self.name, "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}

    def link(self, Y):
        """The probability of class 1: ``sigmoid(Y)`` of logits, ``Y`` itself of probabilities."""
        return Y if self.probabilities_in else _sigmoid(get_array_module(Y), Y)

    def _per_sample(self, xp, Y, y):
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.probabilities_in:
            return _mean_over_outputs(xp, *_bce_probabilities(xp, Y, y))
        E = xp.logaddexp(0, Y) - y * Y
        return _mean_over_outputs(xp, E, _sigmoid(xp, Y) - y)

    def _num_classes(self, Y):
        return 2

    def _class_ids(self, xp, Y, y):
        if y.size != Y.shape[0]:
            raise ValueError(f"class_weight needs one binary output per row, got Y of shape "
                             f"{tuple(Y.shape)}; for multi-label outputs pass sample_weight")
        return (y.reshape(-1) > 0.5).astype(xp.int64)


class CategoricalCrossentropy(Loss):
    """Softmax cross-entropy from logits against one-hot or probability targets.

    ``l_i = -sum_c t_ic log softmax(Y_i)_c`` with ``t = y * (1 - s) + s / C`` (label smoothing
    ``s``); ``dl/dY_i = softmax(Y_i) * sum_c t_ic - t_i`` (``softmax - t`` for rows summing to 1).
    Log-sum-exp keeps it finite for any logits. ``class_weight`` uses ``argmax(y)`` as the label.

    Args:
        label_smoothing: in ``[0, 1]``, as PyTorch's and Keras's ``label_smoothing``.
        from_logits: ``None`` (default): decided by the model (logits, fused with a last
            ``softmax`` activation); ``True``: ``Y`` are logits; ``False``: ``Y`` are
            probabilities (see the module docstring).

    Shape:
        Y: ``(batch, C)`` logits; y: ``(batch, C)`` one-hot rows or probabilities.

    Returns:
        ``(loss, dY)`` as in :class:`Loss`; ``link(Y) = softmax(Y)``.

    Example:
        >>> import numpy as np
        >>> round(categorical_crossentropy(np.zeros((1, 4)), np.eye(4)[[2]])[0], 6)
        1.386294
    """

    name = "categorical_crossentropy"
    task = "multiclass"
    fusable = "softmax"

    def __init__(self, label_smoothing: float = 0.0, *, from_logits=None):
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.from_logits = _check_from_logits(from_logits)
        self.probabilities_in = self.from_logits is False

    def get_config(self) -> dict:
        return {"name": self.name, "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}

    def link(self, Y):
        """Class probabilities: ``softmax(Y)`` of logits, ``Y`` itself of probabilities."""
        return Y if self.probabilities_in else _softmax(get_array_module(Y), Y)

    def _targets(self, xp, Y, y):
        _logits_2d(Y, self.name)
        y = xp.asarray(y)
        if y.shape != Y.shape:
            raise ValueError(f"{self.name} needs one-hot or probability targets of shape "
                             f"{tuple(Y.shape)} like Y, got {tuple(y.shape)}; for integer labels "
                             "use sparse_categorical_crossentropy")
        return y.astype(Y.dtype, copy=False)

    def _per_sample(self, xp, Y, y):
        s = self.label_smoothing
        T = y * (1 - s) + s / Y.shape[1] if s else y
        return (_xent_probabilities if self.probabilities_in else _softmax_xent)(xp, Y, T)

    def _num_classes(self, Y):
        return Y.shape[1]

    def _class_ids(self, xp, Y, y):
        return xp.argmax(y, axis=1)


class SparseCategoricalCrossentropy(Loss):
    """Softmax cross-entropy from logits against integer class ids.

    ``l_i = logsumexp(Y_i) - Y_i[y_i]`` (with label smoothing ``s`` the target row is
    ``(1 - s) * onehot(y_i) + s / C``); ``dl/dY_i = softmax(Y_i) - onehot(y_i)``. Labels must be
    integer-valued (any numeric dtype) in ``[0, C)``; others raise naming the row.

    Args:
        label_smoothing: in ``[0, 1]``, as PyTorch's ``cross_entropy(label_smoothing=...)``.
        from_logits: ``None`` (default): decided by the model (logits, fused with a last
            ``softmax`` activation); ``True``: ``Y`` are logits; ``False``: ``Y`` are
            probabilities (see the module docstring).

    Shape:
        Y: ``(batch, C)`` logits; y: ``(batch,)`` or ``(batch, 1)`` class ids.

    Returns:
        ``(loss, dY)`` as in :class:`Loss`; ``link(Y) = softmax(Y)``.

    Example:
        >>> import numpy as np
        >>> loss, dY = sparse_categorical_crossentropy(np.zeros((2, 2)), np.array([0, 1]))
        >>> round(loss, 6), dY.tolist()
        (0.693147, [[-0.25, 0.25], [0.25, -0.25]])
    """

    name = "sparse_categorical_crossentropy"
    task = "multiclass"
    fusable = "softmax"

    def __init__(self, label_smoothing: float = 0.0, *, from_logits=None):
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.from_logits = _check_from_logits(from_logits)
        self.probabilities_in = self.from_logits is False

    def get_config(self) -> dict:
        return {"name": self.name, "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}

    def link(self, Y):
        """Class probabilities: ``softmax(Y)`` of logits, ``Y`` itself of probabilities."""
        return Y if self.probabilities_in else _softmax(get_array_module(Y), Y)

    def _targets(self, xp, Y, y):
        _logits_2d(Y, self.name)
        y = xp.asarray(y)
        if y.size != Y.shape[0] or (y.ndim > 1 and y.shape[0] != Y.shape[0]):
            hint = ("; for one-hot targets use categorical_crossentropy"
                    if y.shape == Y.shape else "")
            raise ValueError(f"{self.name} needs one class id per row, y of shape "
                             f"({Y.shape[0]},) for Y of shape {tuple(Y.shape)}, "
                             f"got {tuple(y.shape)}{hint}")
        return _check_labels(xp, y, Y.shape[1])

    def _per_sample(self, xp, Y, y):
        s = self.label_smoothing
        if not self.probabilities_in:
            # logits: the device's op (one fused pass per row on CuPy); normalised by the caller
            return get_ops(Y).sparse_softmax_cross_entropy(Y, y, s)
        batch, C = Y.shape
        T = xp.full(Y.shape, s / C, dtype=Y.dtype)
        T[xp.arange(batch), y] += 1 - s
        return _xent_probabilities(xp, Y, T)

    def _num_classes(self, Y):
        return Y.shape[1]

    def _class_ids(self, xp, Y, y):
        return y


class Hinge(Loss):
    """Hinge loss of a linear SVM on raw scores; binary, or Crammer-Singer multi-class.

    Binary (``Y`` of shape ``(batch,)`` or ``(batch, 1)``): ``l = max(0, 1 - t * Y)`` with
    ``t = +1`` for label 1 and ``t = -1`` for label 0 or -1 (labels 0/1 and -1/+1 both work);
    subgradient ``-t`` where the margin is violated, else 0.

    Multi-class (``Y`` of shape ``(batch, C)``, ``C >= 2``): Crammer-Singer, one joint SVM,
    ``l = max(0, 1 + max_{j != y} Y_j - Y_y)`` (sklearn ``LinearSVC(multi_class="crammer_singer")``,
    Keras ``categorical_hinge`` with the max over the wrong classes only); labels are class ids
    or one-hot rows. For ``C = 2`` it is twice PyTorch's ``multi_margin_loss``.

    ``class_weight`` keys are class ids (binary: 0 = negative, 1 = positive). ``link`` is the
    elementwise sigmoid of the scores: it keeps the ranking (AUC) and maps score 0 to 0.5, so
    accuracy's threshold of 0.5 is the SVM's decision rule. ``task`` is ``"binary"``; metrics see
    a multi-class model from the width of its output.

    Shape:
        Y: ``(batch,)``/``(batch, 1)`` scores, or ``(batch, C)``; y: ``(batch,)`` labels
        (or ``(batch, 1)``, or one-hot ``(batch, C)`` for multi-class).

    Returns:
        ``(loss, dY)`` as in :class:`Loss`.

    Example:
        >>> import numpy as np
        >>> hinge(np.array([2.0, 0.5, 0.5]), np.array([1, 1, 0]))[0]
        0.6666666666666666
    """

    name = "hinge"
    task = "binary"

    def link(self, Y):
        """``sigmoid(Y)`` elementwise: ranking-preserving, 0.5 at score 0."""
        return _sigmoid(get_array_module(Y), Y)

    @staticmethod
    def _binary(Y) -> bool:
        return Y.ndim == 1 or (Y.ndim == 2 and Y.shape[1] == 1)

    def _targets(self, xp, Y, y):
        if self._binary(Y):
            y = _reshape_targets(xp, Y, y, self.name).reshape(-1)
            bad = ~((y == 1) | (y == 0) | (y == -1))
            if y.size and bool(bad.any()):
                row = int(xp.argmax(bad))
                raise ValueError(f"hinge labels must be 0/1 or -1/+1, got "
                                 f"{_format_label(y[row].item())} at row {row}")
            return (y > 0).astype(xp.int64)
        if Y.ndim != 2:
            raise ValueError(f"hinge needs scores of shape (batch,), (batch, 1) or "
                             f"(batch, classes), got {tuple(Y.shape)}")
        y = xp.asarray(y)
        if y.shape == Y.shape:  # one-hot rows
            return xp.argmax(y, axis=1)
        if y.size != Y.shape[0] or (y.ndim > 1 and y.shape[0] != Y.shape[0]):
            raise ValueError(f"hinge needs class ids of shape ({Y.shape[0]},) or one-hot rows of "
                             f"shape {tuple(Y.shape)} for Y of shape {tuple(Y.shape)}, "
                             f"got {tuple(y.shape)}")
        return _check_labels(xp, y, Y.shape[1])

    def _per_sample(self, xp, Y, y):
        if self._binary(Y):
            t = (2 * y - 1).astype(Y.dtype)
            margin = 1 - t * Y.reshape(-1)
            violated = margin > 0
            dY = xp.where(violated, -t, 0).astype(Y.dtype).reshape(Y.shape)
            return xp.maximum(margin, 0), dY
        rows = xp.arange(Y.shape[0])
        true_score = Y[rows, y]
        others = Y.copy()
        others[rows, y] = -xp.inf
        rival = xp.argmax(others, axis=1)
        margin = 1 + others[rows, rival] - true_score
        violated = (margin > 0).astype(Y.dtype)
        dY = xp.zeros_like(Y)
        dY[rows, rival] += violated
        dY[rows, y] -= violated
        return xp.maximum(margin, 0), dY

    def _num_classes(self, Y):
        return 2 if self._binary(Y) else Y.shape[1]

    def _class_ids(self, xp, Y, y):
        return y


# --- instances and lookup ---------------------------------------------------------------------

mse = MeanSquaredError()
mae = MeanAbsoluteError()
huber = Huber()
binary_crossentropy = BinaryCrossentropy()
categorical_crossentropy = CategoricalCrossentropy()
sparse_categorical_crossentropy = SparseCategoricalCrossentropy()
hinge = Hinge()

_LOSSES = {
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError, "mean_absolute_error": MeanAbsoluteError,
    "huber": Huber, "huber_loss": Huber,
    "binary_crossentropy": BinaryCrossentropy, "bce": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy, "cce": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "hinge": Hinge,
}


def get_loss(name_or_loss, **kwargs) -> Loss:
    """Look up a loss by name (case-insensitive) or pass a :class:`Loss` instance through.

    Args:
        name_or_loss: one of ``"mse"``/``"mean_squared_error"``, ``"mae"``/
            ``"mean_absolute_error"``, ``"huber"``, ``"binary_crossentropy"``/``"bce"``,
            ``"categorical_crossentropy"``, ``"sparse_categorical_crossentropy"``, ``"hinge"``;
            or a ``Loss`` instance (returned unchanged).
        **kwargs: settings of the loss class (``delta`` for Huber, ``label_smoothing`` for the
            cross-entropies), as in ``loss.get_config()``.

    Returns:
        A :class:`Loss`. Unknown names raise ``ValueError`` listing the known ones.

    Example:
        >>> get_loss("Huber", delta=2.0)
        Huber(delta=2.0)
        >>> get_loss("bce").name
        'binary_crossentropy'
    """
    if isinstance(name_or_loss, Loss):
        if kwargs:
            raise ValueError(f"settings {sorted(kwargs)} only apply to a loss given by name, "
                             f"got the instance {name_or_loss!r}")
        return name_or_loss
    if not isinstance(name_or_loss, str):
        raise TypeError(f"loss must be a loss name or a Loss instance, got {name_or_loss!r}; "
                        "for a custom loss subclass rddtensor.optim.losses.Loss")
    key = name_or_loss.strip().lower()
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name_or_loss!r}; known losses: {sorted(_LOSSES)}")
    return _LOSSES[key](**kwargs)
