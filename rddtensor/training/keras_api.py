"""``KerasModel``: the user-facing API every model class shares, written once.

``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``predict_proba`` / ``save``, the checks of
what a user passes them, the flat weight vector's creation and the ``summary`` table.
``rddtensor.training.sequential.Sequential`` (a stack of layers) and
``rddtensor.training.graph.GraphModel`` (``L.Model(inputs, outputs)``) inherit it and add their
structure (``build``, ``forward``, ``get_config``, ``summary``'s rows).

``fit`` on numpy arrays trains in this process; on a Spark RDD or DataFrame it hands the same
step function to the engine registered for that type (``rddtensor.training.engines``: the Spark
engine, imported only then, so ``rddtensor.layers`` stays usable without Spark or a JVM).

Inputs: a model with one input takes one array; a model with several takes a list of arrays in
``input_specs`` order, or a dict by input name (``L.Input(..., name=...)``), in ``fit``,
``evaluate``, ``predict`` and ``validation_data``. The arrays travel as a tuple, and every batch
takes the same rows of each (``rddtensor.training.batching.take_rows``). Targets of a model with
several outputs likewise: a list in ``output_specs`` order or a dict by output name; its loss and
metrics are per output (``rddtensor.training.outputs``) and ``predict`` returns a list.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

from rddtensor.allocator import tune_malloc
from rddtensor.backend import check_device
from rddtensor.layers.base import non_negative_int, positive_int
from rddtensor.optim import get_loss, get_metric, get_optimizer
from rddtensor.training import checkpoint, engines, serialization
from rddtensor.training.batching import (BlockShuffle, check_shuffle, count_rows, shuffle_setting,
                                         steps_per_epoch, take_rows)
from rddtensor.training.loop import LocalRunner, fit_loop
from rddtensor.training.outputs import output_losses, output_metrics
from rddtensor.training.params import ParamLayout
from rddtensor.training.protocol import Model
from rddtensor.training.steps import evaluate_arrays, stats_logs

__all__ = ["KerasModel", "check_sample_weight", "split_validation"]


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


def split_validation(x, y, split: float, seed: int, sample_weight=None):
    """``(x_train, y_train, validation_data, sample_weight_train)`` for
    ``fit(validation_split=split)``.

    numpy (Keras): the last ``split`` fraction of the rows, before any shuffling (``x`` one
    array or a tuple of one per input, as ``KerasModel`` checks them). An RDD or DataFrame:
    ``randomSplit([1 - split, split], seed)``, a deterministic function of the data's
    partitioning and ``seed`` (Spark recomputes the same split on a retry).
    """
    if engines.engine_for(x) is not None:
        train, val = x.randomSplit([1 - split, split], seed=int(seed))
        return train, None, val, None
    n = count_rows(x)
    at = int(np.floor(n * (1 - split)))
    if at == n or at == 0:
        raise ValueError(f"validation_split={split} of {n} rows leaves "
                         f"{'no validation' if at == n else 'no training'} rows; use a "
                         f"{'larger' if at == n else 'smaller'} fraction")
    if y is None:
        raise ValueError("y is required when x is a numpy array")
    train, held_out = slice(0, at), slice(at, n)
    return take_rows(x, train), take_rows(y, train), \
        (take_rows(x, held_out), take_rows(y, held_out)), \
        None if sample_weight is None else sample_weight[:at]


def _check_target(y, n: int, what: str, label: str) -> np.ndarray:
    """One output's targets as an array of ``n`` rows (float targets float32 and finite)."""
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != n:
        raise ValueError(f"{what} has {n} rows but {label} has "
                         f"{len(y) if y.ndim else 'none (a scalar)'}")
    if len(y) == 0:
        raise ValueError(f"{what} is empty: no rows to train or evaluate on")
    if y.dtype.kind == "f":
        y = y.astype(np.float32)
        if not np.isfinite(y).all():
            row = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
            raise ValueError(f"{label} contains NaN or inf (first at row {row})")
    return y


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or scipy.sparse.issparse(a)



def _by_name(d: dict, names: list, what: str) -> list:
    """The values of dict ``d`` in the order of ``names``; a ``ValueError`` that starts with
    ``what`` ("... the model's inputs") when a name is missing or a key unknown."""
    missing = [n for n in names if n not in d]
    unknown = sorted(str(k) for k in d if k not in names)
    if missing or unknown:
        raise ValueError(f"{what} are {names}" + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {unknown}" if unknown else ""))
    return [d[n] for n in names]

def _columns(given: dict, what: str, labels: bool = True, numpy: bool = False) -> dict:
    """``evaluate``/``predict``'s column keywords for Spark data (``features_col``, and
    ``label_col`` where labels are read); unknown keywords, or any for numpy data, refused."""
    allowed = ("features_col", "label_col") if labels else ("features_col",)
    bad = [k for k in given if k not in allowed]
    if bad:
        raise TypeError(f"{what}() got an unexpected keyword argument {bad[0]!r} (Spark data "
                        f"takes {' and '.join(allowed)})")
    if numpy and given:
        raise ValueError(f"{', '.join(given)} name(s) the columns of an RDD or DataFrame; "
                         f"{what} on numpy arrays reads x (and y) as given")
    return given


class KerasModel(Model):
    """The Keras-shaped training API over the model protocol (see the module docstring).

    A subclass provides the protocol's structure and compute, ``layers`` (the distinct layers,
    in weight order), ``output_shape``, ``output_layer()`` and ``summary_rows()``.
    """

    layers: list  # the distinct layers, in weight order (set by the subclass)

    def _init_state(self, name, seed) -> None:
        """The state every model starts with: not built, not compiled."""
        self._loss = None
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
        self._keys: list[list[tuple[str, str]]] = []  # per layer: (its key, the model's key)

    # --- structure shared by the subclasses ------------------------------------------------
    @property
    def input_shape(self):
        """The per-row input shape of a one-input model (``None`` while unknown)."""
        specs = self.input_specs
        if len(specs) != 1:
            raise ValueError(f"the model has {len(specs)} inputs "
                             f"{[s.name for s in specs]}: see input_specs for their shapes")
        return specs[0].shape

    def output_layer(self):
        """The layer that computes the (first) output, or ``None``."""
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.output_specs]

    def _init_weights(self, seed) -> None:
        """Lay out the built ``layers``' parameters and buffers in one flat vector (keys
        ``"<layer index>.<key>"``, layer order, each layer's own order) and initialise them
        from ``seed``, layer after layer from one generator."""
        entries, buffers, self._keys = [], [], []
        for i, layer in enumerate(self.layers):
            shapes = {**layer.param_shapes(), **layer.buffer_shapes()}
            keys = [(k, f"{i}.{k}") for k in shapes]
            self._keys.append(keys)
            entries += [(full, shapes[k]) for k, full in keys]
            buffers += [f"{i}.{k}" for k in layer.buffer_shapes()]
        self.layout = ParamLayout(entries, buffers)
        rng = np.random.default_rng(seed)
        theta = np.empty(self.layout.size, dtype=np.float32)
        init = {}
        for i, layer in enumerate(self.layers):
            for k, arr in layer.init_params(rng, dtype=np.float32).items():
                init[f"{i}.{k}"] = arr
        self._set_theta(self.layout.flatten(init, out=theta))

    def _layer_params(self, params: dict, index: int) -> dict:
        """Layer ``index``'s views of the model's ``params``, under the layer's own keys."""
        return {k: params[full] for k, full in self._keys[index]}

    def _add_layer_grads(self, grads: dict, index: int, g: dict) -> None:
        """Add layer ``index``'s gradients ``g`` (its own keys) to the model's ``grads``; a
        layer called several times (shared) adds up."""
        for k, full in self._keys[index]:
            grads[full] = g[k] if full not in grads else grads[full] + g[k]

    # --- training API ---------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="mse", metrics=None, device="auto",
                loss_weights=None) -> None:
        """Choose the optimizer, the loss and the metrics reported by ``fit`` and ``evaluate``.

        Args:
            optimizer: an ``rddtensor.optim`` optimizer, its name (``"adam"``) or config dict.
            loss: a loss name (``"sparse_categorical_crossentropy"``) or ``rddtensor.optim.Loss``;
                a model with several outputs takes one for all, a list (output order) or a
                dict by output name.
            metrics: names or ``rddtensor.optim.Metric`` objects (``["accuracy"]``); several
                outputs: a list for every output, a list of lists or a dict by output name
                (logged as ``"<output>_<metric>"``).
            device: where the distributed engine's training tasks compute: ``"auto"`` (the
                task's GPU when CuPy sees one, else NumPy with a warning if CuPy is installed),
                ``"gpu"`` (fail without one) or ``"cpu"`` (see ``rddtensor.spark.device``).
                In-process fits on numpy arrays compute on NumPy.
            loss_weights: several outputs only: a number per output (list or dict by output
                name) weighing its loss in the sum that is minimised (default 1 each).
        """
        self.device = check_device(device)
        self.optimizer = get_optimizer(optimizer)
        names = self.output_names
        if len(names) > 1:
            self.loss = output_losses(loss, loss_weights, names)
            self.metrics = output_metrics(metrics, names)
        else:
            if loss_weights is not None:
                raise ValueError(f"loss_weights weighs the losses of a model with several "
                                 f"outputs; this model has one, got loss_weights={loss_weights!r}")
            self.loss = get_loss(loss)
            self.metrics = [get_metric(m) for m in (metrics or [])]
        self.slots = None

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"call model.compile(optimizer=..., loss=...) before {what}()")

    def _distributed(self, engine, what: str, x=None):
        """``engine`` if the data ``x`` is an RDD/DataFrame the model can take there (several
        inputs or outputs: a DataFrame, one column each), ``None`` for numpy."""
        if engine is None:
            return None
        specs = self.input_specs
        if len(specs) > 1 and not hasattr(x, "columns"):
            raise ValueError(f"{what} on Spark of a model with several inputs "
                             f"{[s.name for s in specs]} takes a DataFrame with one column per "
                             "input (by default named like the inputs; or features_col=[...] / "
                             "{input name: column}), not an RDD")
        specs = self.output_specs
        if len(specs) > 1 and not hasattr(x, "columns") and what != "predict":
            raise ValueError(f"{what} on Spark of a model with several outputs "
                             f"{[s.name for s in specs]} takes a DataFrame with one label "
                             "column per output (by default named like the outputs; or "
                             "label_col=[...] / {output name: column}), not an RDD")
        return engine

    def fit(self, x, y=None, *, epochs: int = 1, batch_size: int = 32, validation_data=None,
            validation_split: float = 0.0, shuffle: bool | BlockShuffle = True, seed: int = 0,
            verbose=1, class_weight=None, sample_weight=None, callbacks=(), initial_epoch: int = 0,
            checkpoint_dir=None, checkpoint_every=None, resume: bool = False, **engine_options):
        """Train the model; returns a ``History`` with per-epoch loss and metrics.

        Args:
            x: numpy features (in-process): one array, or for a model with several inputs a
                list of arrays (``inputs`` order) or a dict by input name; or a Spark RDD of
                ``(features, label)`` / DataFrame (distributed engine, one-input models; see
                ``rddtensor.spark.engine.fit_distributed`` for its options).
            y: numpy labels/targets (with numpy ``x`` only).
            epochs: passes over the data.
            batch_size: global mini-batch size (split across partitions in distributed fits).
            validation_data: ``(X_val, y_val)`` (``X_val`` as ``x``), or an RDD/DataFrame for
                distributed fits; ``val_loss`` and ``val_<metric>`` per epoch in the history.
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
                directory (``rddtensor.training.checkpoint``; distributed fits: each partition
                writes its own block).
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
        engine = self._distributed(engines.engine_for(x), "fit", x)
        _check_fit_options(engine_options, engine)
        if class_weight is not None and len(self.output_specs) > 1:
            raise ValueError(f"class_weight applies to models with one output; this one has "
                             f"{len(self.output_specs)} {self.output_names}: pass sample_weight"
                             + (" (numpy) or weight_col (a DataFrame)" if engine else ""))
        if sample_weight is not None and engine is not None:
            raise ValueError("sample_weight is for numpy x; an RDD or DataFrame carries its "
                             "weights in the data: fit(..., weight_col='weight') (a column, or "
                             "(features, label, weight) rows)")
        if engine is not None:
            if validation_split:
                x, _, validation_data, _ = split_validation(x, None, validation_split, seed)
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
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, count_rows(X))
        if validation_split:
            X, y, validation_data, sample_weight = split_validation(
                X, y, validation_split, seed, sample_weight)
        self.check_label_range(y, "labels in y")
        n_rows = count_rows(X)
        if batch_size > n_rows:
            raise ValueError(f"batch_size={batch_size} is larger than the {n_rows} training rows; "
                             f"use batch_size <= {n_rows} (full batch)")
        if validation_data is not None:
            if engines.engine_for(validation_data) is not None:
                raise ValueError("validation_data must be numpy arrays (X, y) when x is numpy")
            validation_data = self._check_arrays(*validation_data, "validation_data")
            self.check_label_range(validation_data[1], "labels in validation_data")
        self.init_slots()
        ckpt, resumed = checkpoint.start(
            self, checkpoint_dir, checkpoint_every, resume,
            settings={"seed": seed, "batch_size": batch_size, "shuffle": shuffle_setting(shuffle),
                      "n_total": n_rows, "partitions": 1})
        t0 = resumed.t0 if resumed else \
            self.step - initial_epoch * steps_per_epoch(n_rows, batch_size)
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

    def evaluate(self, x, y=None, *, batch_size: int = 4096, verbose: int = 0,
                 **columns) -> dict:
        """Mean loss and metrics on ``x, y`` (numpy, ``x`` as in ``fit``; or an RDD/DataFrame
        distributed: ``features_col=``/``label_col=`` name its columns, as in ``fit``)."""
        self._require_compiled("evaluate")
        batch_size = positive_int(batch_size, "batch_size")
        engine = self._distributed(engines.engine_for(x), "evaluate", x)
        if engine is not None:
            return engine.evaluate_distributed(self, x, batch_size=batch_size,
                                               **_columns(columns, "evaluate"))
        _columns(columns, "evaluate", numpy=True)
        X, y = self._check_arrays(x, y, "x")
        tune_malloc()  # (process tuning of an in-process evaluate; rddtensor.allocator)
        stats = evaluate_arrays(self, self.theta, X, y, loss=self.loss, metrics=self.metrics,
                                batch_size=batch_size)
        return stats_logs(self.metrics, stats)

    def predict(self, x, *, batch_size: int = 4096, **columns):
        """Raw model outputs (logits for classifiers trained with a from-logits loss).

        ``x`` is numpy (as in ``fit``; returns numpy) or an RDD/DataFrame (returns an RDD of
        outputs, in row order; one pass, nothing cached). On a Spark Connect DataFrame (no RDDs
        there) it returns the DataFrame with a ``prediction`` column appended, as
        ``rddtensor.ml.NNModel(network=model).transform(df)`` does. ``features_col=`` names a
        DataFrame's input column(s), as in ``fit``; a model with several outputs gives a tuple
        of arrays per row.
        """
        batch_size = positive_int(batch_size, "batch_size")
        engine = self._distributed(engines.engine_for(x), "predict", x)
        if engine is not None:
            return engine.predict_distributed(self, x, batch_size=batch_size,
                                              **_columns(columns, "predict", labels=False))
        _columns(columns, "predict", numpy=True)
        X = self._check_inputs(x, "x")
        return self._forward_batches(X, batch_size, logits=False)

    def _forward_batches(self, X, batch_size: int, logits: bool):
        """The outputs on all rows: an array, or a list of one per output."""
        tune_malloc()  # (process tuning of an in-process predict; rddtensor.allocator)
        outs = [self.forward(self.params, take_rows(X, slice(a, a + batch_size)), logits=logits)[0]
                for a in range(0, count_rows(X), batch_size)]
        specs = self.output_specs
        if len(specs) == 1:
            return np.concatenate(outs) if outs else \
                np.zeros((0, *self.output_shape), np.float32)
        return [np.concatenate([o[k] for o in outs]) if outs else
                np.zeros((0, *spec.shape), np.float32) for k, spec in enumerate(specs)]

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
        X = self._check_inputs(x, "x")
        Z = self._forward_batches(X, batch_size, logits=self.loss.fused is not None)
        if isinstance(Z, list):  # several outputs: each through its own loss's link
            return [np.asarray(P) for P in self.loss.link(tuple(Z))]
        return np.asarray(self.loss.link(Z))

    # --- input checks ---------------------------------------------------------------------
    def _input_list(self, x, what) -> list:
        """``x`` as one raw array-like per input, in ``input_specs`` order."""
        names = [s.name for s in self.input_specs]
        if isinstance(x, dict):
            return _by_name(x, names, f"{what} is a dict of arrays by input name; the model's "
                            "inputs")
        if len(names) == 1:
            if isinstance(x, (list, tuple)) and len(x) == 1 and _is_array(x[0]):
                return [x[0]]  # [X] for a one-input model, as Keras takes it
            return [x]
        if not isinstance(x, (list, tuple)) or not all(
                _is_array(a) or isinstance(a, (list, tuple)) for a in x):
            raise ValueError(f"the model has {len(names)} inputs {names}: {what} must be a list "
                             f"of {len(names)} arrays in that order, or a dict by input name; "
                             f"got {type(x).__name__}")
        if len(x) != len(names):
            raise ValueError(f"the model has {len(names)} inputs {names}: {what} must be a list "
                             f"of {len(names)} arrays in that order, got {len(x)}")
        return list(x)

    def _check_inputs(self, x, what, build_seed=None):
        """numpy ``x`` as ``forward`` takes it: one float32 array (or CSR matrix) for a
        one-input model, a tuple of them in ``input_specs`` order for several; every array
        checked (a batch axis, per-row shapes, the same rows, finite). Builds the model on
        first use (weights from ``seed``, else ``build_seed``)."""
        sp = scipy.sparse
        raw = self._input_list(x, what)
        single = len(raw) == 1
        labels = [what] if single else \
            [f"{what}[{s.name!r}]" for s in self.input_specs]
        arrays = []
        for i, (a, label) in enumerate(zip(raw, labels)):
            try:
                X = a.tocsr().astype(np.float32) if sp.issparse(a) else \
                    np.asarray(a, dtype=np.float32)
            except (TypeError, ValueError) as e:  # ragged rows, strings, None
                raise ValueError(f"{label} must be a numeric array of shape (rows, features...), "
                                 f"every row the same length: {e}") from None
            if X.ndim < 2:
                raise ValueError(f"{label} must have a batch axis: shape (rows, features...), got "
                                 f"{X.shape}")
            self.check_input_shape(X.shape[1:], label, index=i)
            arrays.append(X)
        rows = [X.shape[0] for X in arrays]
        if len(set(rows)) > 1:
            raise ValueError(f"{what}: every input needs the same rows, got " + ", ".join(
                f"{label} {n}" for label, n in zip(labels, rows)))
        if not self.built:  # (after this the input shapes are set: checked above)
            self.build(arrays[0].shape[1:] if single else None,
                       seed=self.seed if self.seed is not None else build_seed)
        for X, label in zip(arrays, labels):
            if not sp.issparse(X) and not np.isfinite(X).all():
                bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(axis=1))[0])
                raise ValueError(f"{label} contains NaN or inf (first at row {bad})")
        return arrays[0] if single else tuple(arrays)

    def check_input_shape(self, shape, what: str, index: int = 0) -> None:
        """Refuse a per-row ``shape`` for input ``index`` that the model cannot take."""
        spec = self.input_specs[index]
        if spec.shape is not None and tuple(shape) != tuple(spec.shape):
            raise ValueError(f"{what} has per-row shape {tuple(shape)} but the model's input "
                             f"{spec.name!r} expects {tuple(spec.shape)}")

    def check_label_range(self, labels, what: str) -> None:
        """Refuse labels that cannot be the model's classes before training starts.

        Only for ``sparse_categorical_crossentropy``: labels must be integers in ``[0, C)``, C
        the output's last axis. ``labels`` is an array of scalar labels or a precomputed
        ``(min, max, all integers)`` (the distributed engine's summary of its shards); with
        several outputs, a tuple of one array per output, each checked against its loss, and
        ``what`` either one name (errors add the output's) or a list of one per output.
        """
        if self.loss is None or labels is None:
            return
        specs = self.output_specs
        if len(specs) > 1:
            names = list(what) if isinstance(what, (list, tuple)) else \
                [f"{what}[{spec.name!r}]" for spec in specs]
            for k, (loss, spec, y) in enumerate(zip(self.loss.losses, specs, labels)):
                self._check_labels(loss, y, spec.shape, names[k], self.output_layer(k))
            return
        self._check_labels(self.loss, labels, self.output_shape, what, self.output_layer())

    @staticmethod
    def _check_labels(loss, labels, output_shape, what: str, layer) -> None:
        if loss.name != "sparse_categorical_crossentropy":
            return
        row = None
        if isinstance(labels, tuple):
            lo, hi, integral = labels
        else:
            y = np.asarray(labels)
            if y.ndim != 1 or not len(y) or y.dtype.kind not in "biuf":
                return
            bad = (y < 0) | (y >= output_shape[-1]) | (y != np.floor(y))
            if not bad.any():
                return
            row = int(np.argmax(bad))
            lo, hi, integral = float(y.min()), float(y.max()), bool(np.all(y == np.floor(y)))
        n = int(output_shape[-1])
        if integral and lo >= 0 and hi < n:
            return
        source = f"the last layer ({layer.describe()})" if layer is not None else "the output"
        raise ValueError(
            f"{what} must be integers in [0, {n}): class ids for the {n} outputs of "
            f"{source}; got values from {lo:g} to {hi:g}"
            + ("" if integral else ", not all integers")
            + ("" if row is None else f" (first bad one at row {row})")
            + (f". Re-index the labels, or give the last layer {int(hi) + 1} outputs"
               if integral and lo >= 0 else f". Re-index the labels to 0, 1, ..., {n - 1}"))

    def _check_arrays(self, x, y, what, build_seed=None):
        """``(X, y)`` checked: ``X`` as ``_check_inputs``; ``y`` an array, or a tuple of one per
        output (from a list in output order or a dict by output name)."""
        if y is None:
            raise ValueError(f"y is required when {what} is a numpy array")
        X = self._check_inputs(x, what, build_seed)
        n = count_rows(X)
        names = self.output_names
        if len(names) == 1:
            return X, _check_target(y, n, what, "y")
        if isinstance(y, dict):
            y = _by_name(y, names, "y is a dict of targets by output name; the model's outputs")
        if not isinstance(y, (list, tuple)) or len(y) != len(names):
            raise ValueError(f"the model has {len(names)} outputs {names}: y must be a list of "
                             f"{len(names)} target arrays in that order, or a dict by output "
                             f"name; got " + (f"{len(y)}" if isinstance(y, (list, tuple))
                                              else type(y).__name__))
        return X, tuple(_check_target(t, n, what, f"y[{k!r}]") for t, k in zip(y, names))

    # --- summary and persistence ------------------------------------------------------------
    @staticmethod
    def layer_label(layer) -> str:
        """``Dense (head) [softmax]``: a layer's type, name and output activation."""
        label = type(layer).__name__ + (f" ({layer.name})" if layer.name else "")
        act = layer.output_activation()
        if act is not None and type(layer).__name__.lower() != act[0].replace("_", ""):
            label += f" [{act[0]}]"
        return label

    @staticmethod
    def layer_size(layer) -> int:
        """How many numbers a built layer keeps in the flat vector (parameters and buffers)."""
        return sum(int(np.prod(s)) for s in {**layer.param_shapes(),
                                             **layer.buffer_shapes()}.values())

    def summary_rows(self) -> list[tuple[str, ...]]:
        """The table ``summary`` prints: a header row, then one row per layer (call)."""
        raise NotImplementedError

    def summary(self, print_fn=print) -> None:
        """Print a table of layers, output shapes and parameter counts (as Keras: returns
        ``None``; ``print_fn=lines.append`` collects the text)."""
        self.ensure_built()
        rows = self.summary_rows()
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.layout.size:,} "
                     f"({self.layout.size * 4:,} bytes float32)")
        fused = None if self.loss is None else self.loss.fused
        if isinstance(fused, tuple):  # several outputs
            for name, loss, f in zip(self.output_names, self.loss.losses, fused):
                if f is not None:
                    lines.append(f"loss on {name}: {loss.name} on the logits before the output "
                                 f"{f} (fused); predict() returns probabilities")
        elif fused is not None:
            lines.append(f"loss: {self.loss.name} on the logits before the output "
                         f"{self.loss.fused} (fused); predict() returns probabilities")
        (print_fn or print)("\n".join(lines))

    def save(self, path: str, include_optimizer: bool = True) -> None:
        """Write the model to directory ``path``: ``model.json`` (config) + ``weights.npz``."""
        serialization.save_model(self, path, include_optimizer=include_optimizer)
