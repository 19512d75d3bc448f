"""``Sequential``: a stack of layers with one flat parameter vector, and the user-facing
``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``save`` API.

``fit`` on numpy arrays trains in this process; on a Spark RDD or DataFrame it hands the same
step function to the engine registered for that type (``rddtensor.training.engines``: the Spark
engine, imported only then, so ``rddtensor.layers`` stays usable without Spark or a JVM).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

from rddtensor.training import checkpoint, engines, serialization
from rddtensor.layers.base import Layer, layer_class, non_negative_int, positive_int, shape_tuple
from rddtensor.training.batching import (BlockShuffle, check_shuffle, shuffle_setting,
                                         steps_per_epoch)
from rddtensor.training.params import ParamLayout
from rddtensor.training.protocol import Model, TensorSpec
from rddtensor.training.steps import evaluate_arrays, stats_logs
from rddtensor.training.loop import LocalRunner, fit_loop
from rddtensor.allocator import tune_malloc
from rddtensor.backend import check_device
from rddtensor.optim import get_loss, get_metric, get_optimizer


def _check_fit_options(options: dict, engine) -> None:
    """One refusal for both engines: unknown ``fit`` arguments, or engine options on numpy."""
    known = engines.engine_options()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise TypeError(f"fit() got unexpected keyword argument(s) {unknown}; fit takes the "
                        "Keras arguments (epochs, batch_size, validation_data, "
                        "validation_split, shuffle, seed, verbose, class_weight, callbacks, "
                        "initial_epoch) plus checkpoint_dir, checkpoint_every, resume, and for "
                        f"an RDD or DataFrame {list(known)}")
    if options and engine is None:
        raise TypeError(f"fit() arguments {sorted(options)} apply to the distributed engine "
                        "only (x an RDD or DataFrame); x is a numpy array")


def _check_verbose(verbose) -> int:
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0 (silent), 1 (progress bar), 2 (one line per epoch) "
                         f"or 'auto', got {verbose!r}")
    return int(verbose)


def _check_validation_split(split, validation_data) -> float:
    if isinstance(split, bool) or not isinstance(split, (int, float, np.floating, np.integer)) \
            or not 0 <= split < 1:
        raise ValueError(f"validation_split must be a number in [0, 1) (the fraction of the rows "
                         f"held out for validation), got {split!r}")
    if split and validation_data is not None:
        raise ValueError("pass validation_data or validation_split, not both (got "
                         f"validation_split={split!r} and validation_data)")
    return float(split)


def check_sample_weight(sample_weight, n: int) -> np.ndarray:
    """``sample_weight`` as float32 ``(n,)``: one finite weight >= 0 per row, or ``ValueError``."""
    try:
        w = np.asarray(sample_weight, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sample_weight must be numbers, one per row: {e}") from None
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have one weight per row of x: shape ({n},), got "
                         f"{w.shape}")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"sample_weight must be finite and >= 0, got {w[r]} at row {r}")
    return w


def _rows(x) -> int:
    return x.shape[0] if scipy.sparse.issparse(x) else len(x)


def split_validation(x, y, split: float, seed: int, sample_weight=None):
    """``(x_train, y_train, validation_data, sample_weight_train)`` for
    ``fit(validation_split=split)``.

    numpy (Keras): the last ``split`` fraction of the rows, before any shuffling. An RDD or
    DataFrame: ``randomSplit([1 - split, split], seed)``, a deterministic function of the data's
    partitioning and ``seed`` (Spark recomputes the same split on a retry).
    """
    if engines.engine_for(x) is not None:
        train, val = x.randomSplit([1 - split, split], seed=int(seed))
        return train, None, val, None
    n = len(x) if not scipy.sparse.issparse(x) else x.shape[0]
    at = int(np.floor(n * (1 - split)))
    if at == n or at == 0:
        raise ValueError(f"validation_split={split} of {n} rows leaves "
                         f"{'no validation' if at == n else 'no training'} rows; use a "
                         f"{'larger' if at == n else 'smaller'} fraction")
    if y is None:
        raise ValueError("y is required when x is a numpy array")
    return x[:at], y[:at], (x[at:], y[at:]), \
        None if sample_weight is None else sample_weight[:at]


class Sequential(Model):
    """A linear stack of layers trained as one model.

    Parameters live in one float32 vector ``theta`` (layer order; keys ``"<index>.<name>"`` such
    as ``"0.W"``); ``params`` holds reshaped views into it.

    Args:
        layers: the layers, first one with ``input_shape`` (or build on the first ``fit``).
        name: optional model name.
        seed: seed for weight initialisation (``None``: ``fit``'s seed, else fresh entropy).

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> m = L.Sequential([L.Dense(4, activation="relu", input_shape=(3,)), L.Dense(2)], seed=0)
        >>> m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> X = np.random.default_rng(0).normal(size=(32, 3)).astype("float32"); y = (X[:, 0] > 0).astype(int)
        >>> h = m.fit(X, y, epochs=2, batch_size=8, verbose=0)
        >>> m.predict(X).shape
        (32, 2)
    """

    def __init__(self, layers=None, name: str | None = None, seed: int | None = None):
        self._loss = None
        self.layers: list[Layer] = []
        self.name = name
        self.seed = seed
        self.layout: ParamLayout | None = None
        self.theta = None
        self.params: dict = {}
        self.optimizer = self.loss = None
        self.device = "auto"  # compile(device=...): where distributed training tasks compute
        self.metrics: list = []
        self.slots: dict | None = None  # optimizer slots, created by the first fit
        self.step = 0
        self._keys: list[list[tuple[str, str]]] = []
        for layer in layers or []:
            self.add(layer)

    # --- structure ------------------------------------------------------------------------
    def add(self, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add expects a Layer, got {type(layer).__name__}")
        if self.built:
            raise ValueError("cannot add layers to a built model")
        self.layers.append(layer)
        if self._loss is not None:
            self.loss = self._loss  # the output activation changed: bind the loss again

    @property
    def input_shape(self):
        return self.layers[0].input_shape if self.layers else None

    @property
    def output_shape(self):
        return self.layers[-1].output_shape if self.built else None

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """One input, ``"X"``: the features (per-row shape of the first layer)."""
        return (TensorSpec("X", self.input_shape),)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """One output, ``"y"``: the last layer's (per-row shape once built)."""
        return (TensorSpec("y", self.output_shape),)

    def output_activation(self):
        return self.layers[-1].output_activation() if self.layers else None

    def build(self, input_shape=None, seed: int | None = None) -> "Sequential":
        """Build every layer from the per-sample ``input_shape`` and initialise the weights."""
        if not self.layers:
            raise ValueError("Sequential model has no layers")
        shape = input_shape if input_shape is not None else self.layers[0].input_shape
        if shape is None:
            raise ValueError("the first layer needs input_shape=..., or call build(input_shape) "
                             "or fit() so the model can infer it")
        shape = shape_tuple(shape, "input_shape")
        if self.layers[0].input_shape is not None and shape != self.layers[0].input_shape:
            raise ValueError(f"input_shape {shape} does not match the first layer's "
                             f"input_shape {self.layers[0].input_shape}")
        entries, buffers, self._keys = [], [], []
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.build(shape)
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer.describe()}): {e}") from None
            shapes = {**layer.param_shapes(), **layer.buffer_shapes()}
            keys = [(k, f"{i}.{k}") for k in shapes]
            self._keys.append(keys)
            entries += [(full, shapes[k]) for k, full in keys]
            buffers += [f"{i}.{k}" for k in layer.buffer_shapes()]
        self.layout = ParamLayout(entries, buffers)
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        theta = np.empty(self.layout.size, dtype=np.float32)
        init = {}
        for i, layer in enumerate(self.layers):
            for k, arr in layer.init_params(rng, dtype=np.float32).items():
                init[f"{i}.{k}"] = arr
        self._set_theta(self.layout.flatten(init, out=theta))
        return self

    # --- compute --------------------------------------------------------------------------
    def forward(self, params: dict, X, training: bool = False, rng=None, logits: bool = False):
        """Forward through every layer; returns ``(Y, backprop)``, ``backprop(dY) -> (dX, grads)``.

        ``logits=True`` leaves out the last layer's output activation (what a loss fused with
        it reads, see ``Loss.bind``): the training step and evaluation pass
        ``logits=loss.fused is not None``.
        """
        if scipy.sparse.issparse(X) and self.layers and \
                not getattr(self.layers[0], "accepts_sparse", False):
            X = X.toarray()  # only a layer that multiplies sparse batches (Dense) keeps them sparse
        backprops = []
        last = len(self.layers) - 1
        for i, (layer, keys) in enumerate(zip(self.layers, self._keys)):
            run = layer.forward_logits if logits and i == last else layer.forward
            try:
                X, bp = run({k: params[full] for k, full in keys}, X, training=training, rng=rng)
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer.describe()}): {e}") from None
            backprops.append(bp)

        def backprop(dY):
            grads = {}
            for bp, keys in zip(reversed(backprops), reversed(self._keys)):
                dY, g = bp(dY)
                for k, full in keys:
                    grads[full] = g[k]
            return dY, grads

        return X, backprop

    def check_input_shape(self, shape, what: str) -> None:
        """Refuse per-row input ``shape`` the first layer cannot take, naming ``what``."""
        first = self.layers[0] if self.layers else None
        if first is not None and first.input_shape is not None and \
                tuple(shape) != tuple(first.input_shape):
            raise ValueError(f"{what} has per-row shape {tuple(shape)} but the first layer "
                             f"({first.describe()}) expects {tuple(first.input_shape)}")

    def summary(self, print_fn=print) -> None:
        """Print a table of layers, output shapes and parameter counts (as Keras: returns
        ``None``; ``print_fn=lines.append`` collects the text)."""
        self.ensure_built()
        rows = [("#", "layer", "output shape", "params")]
        for i, layer in enumerate(self.layers):
            n = sum(int(np.prod(s)) for s in {**layer.param_shapes(), **layer.buffer_shapes()}.values())
            label = type(layer).__name__ + (f" ({layer.name})" if layer.name else "")
            act = layer.output_activation()
            if act is not None and type(layer).__name__.lower() != act[0].replace("_", ""):
                label += f" [{act[0]}]"
            rows.append((str(i), label, str((None, *layer.output_shape)), f"{n:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.layout.size:,} ({self.layout.size * 4:,} bytes float32)")
        if self.loss is not None and self.loss.fused is not None:
            lines.append(f"loss: {self.loss.name} on the logits before the output "
                         f"{self.loss.fused} (fused); predict() returns probabilities")
        (print_fn or print)("\n".join(lines))

    # --- training API ---------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="mse", metrics=None, device="auto") -> None:
        """Choose the optimizer, the loss and the metrics reported by ``fit`` and ``evaluate``.

        Args:
            optimizer: an ``rddtensor.optim`` optimizer, its name (``"adam"``) or config dict.
            loss: a loss name (``"sparse_categorical_crossentropy"``) or ``rddtensor.optim.Loss``.
            metrics: names or ``rddtensor.optim.Metric`` objects (``["accuracy"]``).
            device: where the distributed engine's training tasks compute: ``"auto"`` (the
                task's GPU when CuPy sees one, else NumPy with a warning if CuPy is installed),
                ``"gpu"`` (fail without one) or ``"cpu"`` (see ``rddtensor.spark.device``).
                In-process fits on numpy arrays compute on NumPy.
        """
        self.device = check_device(device)
        self.optimizer = get_optimizer(optimizer)
        self.loss = get_loss(loss)
        self.metrics = [get_metric(m) for m in (metrics or [])]
        self.slots = None

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"call model.compile(optimizer=..., loss=...) before {what}()")

    def fit(self, x, y=None, *, epochs: int = 1, batch_size: int = 32, validation_data=None,
            validation_split: float = 0.0, shuffle: bool | BlockShuffle = True, seed: int = 0,
            verbose=1, class_weight=None, sample_weight=None, callbacks=(), initial_epoch: int = 0,
            checkpoint_dir=None, checkpoint_every=None, resume: bool = False, **engine_options):
        """Train the model; returns a ``History`` with per-epoch loss and metrics.

        Args:
            x: numpy features (in-process), or a Spark RDD of ``(features, label)`` / DataFrame
                (distributed engine; see ``rddtensor.spark.engine.fit_distributed`` for its options).
            y: numpy labels/targets (with numpy ``x`` only).
            epochs: passes over the data.
            batch_size: global mini-batch size (split across partitions in distributed fits).
            validation_data: ``(X_val, y_val)``, or an RDD/DataFrame for distributed fits;
                ``val_loss`` and ``val_<metric>`` per epoch in the history.
            validation_split: hold out this fraction of the training data for validation
                instead (Keras): numpy, the last rows (before shuffling); an RDD/DataFrame, a
                ``randomSplit`` by ``seed`` (deterministic for the same partitioning).
            shuffle: the rows' order in each epoch, drawn from ``seed`` and the epoch (the
                same in-process and distributed, for any partitioning): ``True`` a global
                permutation every epoch; ``False`` the stored order;
                ``BlockShuffle(block_rows=64, window_blocks=1024)`` (``from rddtensor.training
                import BlockShuffle``) shuffles blocks of consecutive rows, then the rows within
                windows of blocks, so that an epoch reads its data as contiguous runs: for data
                larger than the page cache (``rddtensor.training.batching``; keep
                ``window_blocks`` in the hundreds where the stored order follows the label).
            seed: seeds shuffling, dropout and (for an unbuilt model) weight initialisation;
                same seed and data -> bit-identical weights.
            verbose: 0 silent, 1 a progress bar per epoch (loss, metrics, samples/s, ETA),
                2 one line per epoch on stderr (epoch, loss, metrics, validation, time,
                samples/s); ``"auto"`` is 1.
            class_weight: dict class -> weight multiplying each sample's loss.
            sample_weight: one weight >= 0 per row of numpy ``x`` (shape ``(rows,)``): the loss
                is the weighted mean over each global batch, ``sum(w_i * l_i) / sum(w_i)``
                (PyTorch's ``(loss(reduction="none") * w).sum() / w.sum()``; class weights
                multiply the terms, not the normaliser); the logged ``loss`` too, the metrics
                stay unweighted. RDDs/DataFrames take ``weight_col=`` (a column, or the third
                element of ``(features, label, weight)`` rows) instead.
            initial_epoch: the epoch to start at (Keras): epochs ``initial_epoch`` to
                ``epochs - 1`` run, each with its own row order, so ``fit(epochs=3)`` then
                ``fit(epochs=6, initial_epoch=3)`` gives the weights of ``fit(epochs=6)``.
                ``epochs <= initial_epoch`` trains nothing.
            checkpoint_dir: save checkpoints (weights, optimizer slots, step counters) in this
                directory (``rddtensor.training.checkpoint``; distributed fits: each partition writes its
                own block).
            checkpoint_every: save every this many optimizer steps (default: each epoch end).
            resume: continue from the newest complete checkpoint in ``checkpoint_dir``;
                ``epochs`` counts from the original start. Same seed and data: bit-identical
                to an uninterrupted fit. Starts afresh when there is no checkpoint yet.
        """
        self._require_compiled("fit")
        epochs = non_negative_int(epochs, "epochs")
        initial_epoch = non_negative_int(initial_epoch, "initial_epoch")
        batch_size = positive_int(batch_size, "batch_size")
        shuffle = check_shuffle(shuffle)
        verbose = _check_verbose(verbose)
        validation_split = _check_validation_split(validation_split, validation_data)
        if initial_epoch and resume:
            raise ValueError(f"initial_epoch={initial_epoch} and resume=True both choose where "
                             "the fit starts; resume=True takes the epoch from the checkpoint: "
                             "pass one of them")
        engine = engines.engine_for(x)
        _check_fit_options(engine_options, engine)
        if sample_weight is not None and engine is not None:
            raise ValueError("sample_weight is for numpy x; an RDD or DataFrame carries its "
                             "weights in the data: fit(..., weight_col='weight') (a column, or "
                             "(features, label, weight) rows)")
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, _rows(x))
        if validation_split:
            x, y, validation_data, sample_weight = split_validation(
                x, y, validation_split, seed, sample_weight)
        if engine is not None:
            return engine.fit_distributed(self, x, epochs=epochs, batch_size=batch_size,
                                   validation_data=validation_data, shuffle=shuffle, seed=seed,
                                   verbose=verbose, class_weight=class_weight,
                                   callbacks=callbacks, checkpoint_dir=checkpoint_dir,
                                   checkpoint_every=checkpoint_every, resume=resume,
                                   initial_epoch=initial_epoch, **engine_options)
        if getattr(self, "device", "auto") == "gpu":
            raise ValueError("device='gpu' puts the distributed engine's tasks on their GPUs, but "
                             "fit on numpy arrays trains in-process on NumPy; pass an RDD or "
                             "DataFrame, or compile(device='auto')")
        X, y = self._check_arrays(x, y, "x", build_seed=seed)
        self.check_label_range(y, "labels in y")
        if batch_size > len(X):
            raise ValueError(f"batch_size={batch_size} is larger than the {len(X)} training rows; "
                             f"use batch_size <= {len(X)} (full batch)")
        if validation_data is not None:
            if engines.engine_for(validation_data) is not None:
                raise ValueError("validation_data must be numpy arrays (X, y) when x is numpy")
            validation_data = self._check_arrays(*validation_data, "validation_data")
            self.check_label_range(validation_data[1], "labels in validation_data")
        self.init_slots()
        ckpt, resumed = checkpoint.start(
            self, checkpoint_dir, checkpoint_every, resume,
            settings={"seed": seed, "batch_size": batch_size, "shuffle": shuffle_setting(shuffle),
                      "n_total": len(X), "partitions": 1})
        t0 = resumed.t0 if resumed else \
            self.step - initial_epoch * steps_per_epoch(len(X), batch_size)
        runner = LocalRunner(self, X, y, batch_size=batch_size, shuffle=shuffle, seed=seed,
                             class_weight=class_weight, t0=t0, checkpoint=ckpt,
                             resume_stats=resumed.stats if resumed else None,
                             sample_weight=sample_weight)
        history = fit_loop(self, runner, epochs=epochs, validation=validation_data,
                           batch_size=batch_size, verbose=verbose, callbacks=callbacks,
                           initial_epoch=resumed.epoch if resumed else initial_epoch)
        if resumed:
            history.params["resumed_from"] = resumed.path
        return history

    def evaluate(self, x, y=None, *, batch_size: int = 4096, verbose: int = 0) -> dict:
        """Mean loss and metrics on ``x, y`` (numpy, or an RDD/DataFrame distributed)."""
        self._require_compiled("evaluate")
        batch_size = positive_int(batch_size, "batch_size")
        engine = engines.engine_for(x)
        if engine is not None:
            return engine.evaluate_distributed(self, x, batch_size=batch_size)
        X, y = self._check_arrays(x, y, "x")
        tune_malloc()  # (process tuning of an in-process evaluate; rddtensor.allocator)
        stats = evaluate_arrays(self, self.theta, X, y, loss=self.loss, metrics=self.metrics,
                                batch_size=batch_size)
        return stats_logs(self.metrics, stats)

    def predict(self, x, *, batch_size: int = 4096):
        """Raw model outputs (logits for classifiers trained with a from-logits loss).

        ``x`` is a numpy array (returns numpy) or an RDD/DataFrame (returns an RDD of outputs).
        """
        batch_size = positive_int(batch_size, "batch_size")
        engine = engines.engine_for(x)
        if engine is not None:
            return engine.predict_distributed(self, x, batch_size=batch_size)
        X = self._check_features(x, "x")
        return self._forward_batches(X, batch_size, logits=False)

    def _forward_batches(self, X, batch_size: int, logits: bool):
        tune_malloc()  # (process tuning of an in-process predict; rddtensor.allocator)
        outs = [self.forward(self.params, X[a:a + batch_size], logits=logits)[0]
                for a in range(0, len(X), batch_size)]
        if not outs:
            return np.zeros((0, *self.output_shape), np.float32)
        return np.concatenate(outs)

    def predict_proba(self, x, *, batch_size: int = 4096):
        """Class probabilities (numpy ``x``): the compiled loss's link over the outputs it reads.

        ``sigmoid``/``softmax`` of the logits; for a model that ends in that activation, the same
        as ``predict``; for a loss reading probabilities (``from_logits=False``), the outputs.
        """
        self._require_compiled("predict_proba")
        batch_size = positive_int(batch_size, "batch_size")
        if engines.engine_for(x) is not None:
            raise ValueError("predict_proba takes numpy arrays; for an RDD or DataFrame use an "
                             "rddtensor.ml.NNClassificationModel (its probability column)")
        X = self._check_features(x, "x")
        Z = self._forward_batches(X, batch_size, logits=self.loss.fused is not None)
        return np.asarray(self.loss.link(Z))

    # --- input checks ---------------------------------------------------------------------
    def _check_features(self, x, what, build_seed=None):
        sp = scipy.sparse
        try:
            X = x.tocsr().astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:  # ragged rows, strings, None
            raise ValueError(f"{what} must be a numeric array of shape (rows, features...), every "
                             f"row the same length: {e}") from None
        if X.ndim < 2:
            raise ValueError(f"{what} must have a batch axis: shape (rows, features...), got {X.shape}")
        self.check_input_shape(X.shape[1:], what)
        if not self.built:  # (after this the first layer's input_shape is set: checked above)
            self.build(X.shape[1:], seed=self.seed if self.seed is not None else build_seed)
        if not sp.issparse(X) and not np.isfinite(X).all():
            bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))[0])
            raise ValueError(f"{what} contains NaN or inf (first at row {bad})")
        return X

    def check_label_range(self, labels, what: str) -> None:
        """Refuse labels that cannot be the model's classes before training starts.

        Only for ``sparse_categorical_crossentropy``: labels must be integers in ``[0, C)``, C
        the last layer's outputs. ``labels`` is an array of scalar labels or a precomputed
        ``(min, max, all integers)`` (the distributed engine's summary of its shards).
        """
        if self.loss is None or self.loss.name != "sparse_categorical_crossentropy" or \
                labels is None:
            return
        row = None
        if isinstance(labels, tuple):
            lo, hi, integral = labels
        else:
            y = np.asarray(labels)
            if y.ndim != 1 or not len(y) or y.dtype.kind not in "biuf":
                return
            bad = (y < 0) | (y >= self.output_shape[-1]) | (y != np.floor(y))
            if not bad.any():
                return
            row = int(np.argmax(bad))
            lo, hi, integral = float(y.min()), float(y.max()), bool(np.all(y == np.floor(y)))
        n = int(self.output_shape[-1])
        if integral and lo >= 0 and hi < n:
            return
        raise ValueError(
            f"{what} must be integers in [0, {n}): class ids for the {n} outputs of the last "
            f"layer ({self.layers[-1].describe()}); got values from {lo:g} to {hi:g}"
            + ("" if integral else ", not all integers")
            + ("" if row is None else f" (first bad one at row {row})")
            + (f". Re-index the labels, or give the last layer {int(hi) + 1} outputs"
               if integral and lo >= 0 else f". Re-index the labels to 0, 1, ..., {n - 1}"))

    def _check_arrays(self, x, y, what, build_seed=None):
        if y is None:
            raise ValueError(f"y is required when {what} is a numpy array")
        X = self._check_features(x, what, build_seed)
        y = np.asarray(y)
        if len(y) != X.shape[0]:
            raise ValueError(f"{what} has {X.shape[0]} rows but y has {len(y)}")
        if len(y) == 0:
            raise ValueError(f"{what} is empty: no rows to train or evaluate on")
        if y.dtype.kind == "f":
            y = y.astype(np.float32)
            if not np.isfinite(y).all():
                raise ValueError(f"y contains NaN or inf (first at row {int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])})")
        return X, y

    # --- persistence ----------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "layers": [
            {"class_name": type(l).__name__, "config": l.get_config()} for l in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        layers = [layer_class(c["class_name"]).from_config(c.get("config", {}))
                  for c in config["layers"]]
        return cls(layers, name=config.get("name"))

    def save(self, path: str, include_optimizer: bool = True) -> None:
        """Write the model to directory ``path``: ``model.json`` (config) + ``weights.npz``."""
        serialization.save_model(self, path, include_optimizer=include_optimizer)

    def __repr__(self):
        return f"Sequential({len(self.layers)} layers" + (f", {self.layout.size:,} params)" if self.built else ")")


def load_model(path: str) -> Sequential:
    """Load a model saved with ``model.save(path)`` (data only: JSON + ``.npz``, never pickle)."""
    return serialization.load_model(path, Sequential)
