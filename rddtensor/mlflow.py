"""The MLflow flavor ``rddtensor``: models logged to MLflow, loaded back, served as
``python_function``, and a callback that logs a fit to the active MLflow run.

An MLflow model written here is a directory::

    MLmodel             flavors "rddtensor" (the model directory below) and "python_function"
                        (loader module rddtensor.mlflow), the signature
    model/              model.save's directory: model.json + weights.npz (data, never pickle)
    requirements.txt    rddtensor, numpy, scipy, pandas pinned to this environment's versions
    python_env.yaml, conda.yaml
    input_example.json  (when an input_example is given)

The requirements are written, not inferred: nothing is imported in a subprocess and nothing is
looked up online. ``mlflow`` stays optional (``pip install 'rddtensor[mlflow]'``): it is imported
when a function here runs, never when this module is imported.

pyfunc input (``mlflow.pyfunc.load_model(uri).predict(x)``, ``mlflow.pyfunc.spark_udf``): a
numpy array of rows, a pandas frame of feature columns (one column per feature, in order) or a
pandas frame with one array column (each cell a list or array of the per-row shape, or its
values flat). Output: a numpy array, what ``model.predict`` returns (probabilities for a
classifier trained with a fused loss).

Example:
    >>> import mlflow, rddtensor.mlflow                                  # doctest: +SKIP
    >>> with mlflow.start_run():                                          # doctest: +SKIP
    ...     model.fit(X, y, epochs=5, callbacks=[rddtensor.mlflow.MLflowLogger()])
    ...     info = rddtensor.mlflow.log_model(model, name="model")
    >>> rddtensor.mlflow.load_model(info.model_uri).predict(X)           # doctest: +SKIP
    >>> mlflow.pyfunc.load_model(info.model_uri).predict(pandas_frame)   # doctest: +SKIP
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import scipy.sparse

from rddtensor import layers as L
from rddtensor.training.callbacks import Callback
from rddtensor.training.protocol import Model
from rddtensor.version import __version__

__all__ = ["FLAVOR_NAME", "MLflowLogger", "get_default_pip_requirements", "load_model",
           "log_model", "save_model"]

log = logging.getLogger("rddtensor")

#: the flavor's name in the MLmodel file
FLAVOR_NAME = "rddtensor"
#: the model directory (``model.save``'s) inside an MLflow model
_MODEL_DIR = "model"


def _import_mlflow():
    """The ``mlflow`` module, or an ``ImportError`` that says how to install it."""
    try:
        import mlflow
        import mlflow.pyfunc  # noqa: F401  (the flavor functions use it)
    except ImportError as e:
        raise ImportError("rddtensor.mlflow needs MLflow, which is not installed here: "
                          "pip install 'rddtensor[mlflow]'") from e
    return mlflow


def _check_model(model, what: str) -> None:
    """Refuse what cannot be saved as an MLflow model, before anything is written."""
    if not isinstance(model, Model):
        raise TypeError(f"{what} takes an rddtensor model (L.Sequential, ...), got "
                        f"{type(model).__name__}")
    if not model.built:
        raise ValueError(f"{what}: the model is not built, so it has no weights to save; train "
                         "it (model.fit) or call model.build(input_shape) first")
    if len(model.input_specs) != 1 or len(model.output_specs) != 1:
        raise ValueError(f"{what} saves models with one input and one output; this model has "
                         f"inputs {[s.name for s in model.input_specs]} and outputs "
                         f"{[s.name for s in model.output_specs]}")


# --- model input: what pyfunc's predict takes -------------------------------------------------
def _row_shape(model) -> tuple:
    return tuple(model.input_specs[0].shape)


def _features(x, model, what: str = "model input"):
    """``x`` as the array ``model.predict`` takes: rows of the per-row input shape, in the
    dtype they came in (``predict`` casts them to float32).

    ``x`` is a numpy array (or a list of rows, or a scipy sparse matrix), a pandas frame of
    feature columns (one per feature, in order; a per-row shape of several axes takes its values
    flat, C order), or a pandas frame with one column whose cells are arrays or lists.
    """
    if isinstance(x, pd.Series):
        x = x.to_frame()
    if isinstance(x, pd.DataFrame):
        return _frame_features(x, _row_shape(model), what)
    if scipy.sparse.issparse(x):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{what} must be a numpy array, a pandas DataFrame of feature columns or a "
                    f"pandas DataFrame with one array column; got {type(x).__name__}")


def _frame_features(frame, shape: tuple, what: str):
    n_features = int(np.prod(shape))
    columns = list(frame.columns)
    if len(columns) == 1 and len(frame) and not np.isscalar(frame.iloc[0, 0]):
        name = columns[0]
        try:
            X = np.stack([np.asarray(v) for v in frame[name]])
        except ValueError as e:
            raise ValueError(f"{what}: column {name!r} must hold one array of the per-row shape "
                             f"{shape} per row, all the same shape: {e}") from None
        if X.shape[1:] != shape and X[0].size == n_features:
            X = X.reshape(len(X), *shape)  # flat cells (Spark arrays): C order
        if X.shape[1:] != shape:
            raise ValueError(f"{what}: column {name!r} holds arrays of shape {X.shape[1:]}; the "
                             f"model takes rows of shape {shape} ({n_features} values)")
        return X
    if len(columns) != n_features:
        shown = columns[:8] + (["..."] if len(columns) > 8 else [])
        raise ValueError(f"{what}: the model takes {n_features} feature column(s), one per "
                         f"feature in order (per-row input shape {shape}), or one column of "
                         f"arrays; got a pandas DataFrame with {len(columns)} columns {shown}")
    X = frame.to_numpy()
    if X.dtype.kind not in "biuf":
        bad = [c for c in columns if frame[c].dtype.kind not in "biuf"]
        raise ValueError(f"{what}: feature columns must be numbers; columns {bad[:8]} are not")
    return X.reshape(len(frame), *shape)


class _PyFuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(x) -> model.predict(rows of x)``."""

    def __init__(self, model):
        self.model = model

    def predict(self, model_input, params=None):
        return self.model.predict(_features(model_input, self.model))

    def get_raw_model(self):
        """The rddtensor model (``PyFuncModel.get_raw_model``)."""
        return self.model


def _load_pyfunc(path, model_config=None):
    """The ``python_function`` flavor's loader: ``path`` is the model directory."""
    return _PyFuncModel(L.load_model(path))


# --- the MLflow model directory ---------------------------------------------------------------
def _pinned(dist: str, fallback: str | None = None) -> str:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = fallback
    return dist if version is None else f"{dist}=={version.split('+')[0]}"


def get_default_pip_requirements() -> list[str]:
    """The pip requirements a model is saved with by default: rddtensor and the libraries the
    ``python_function`` flavor loads, pinned to the versions installed here (read from the
    installed packages' metadata: no import, no network).

    Example:
        >>> get_default_pip_requirements()[0]                             # doctest: +SKIP
        'rddtensor==0.1.0'
    """
    return [_pinned("rddtensor", __version__), _pinned("numpy"), _pinned("scipy"),
            _pinned("pandas")]


def _signature(model, input_example):
    """The signature ``save_model`` infers.

    Input: one unnamed tensor ``(-1, *per-row shape)``, dtype the input example's (what pyfunc
    checks arrays and feature columns against), float64 without one: pandas' and Spark's
    doubles. Output: one float array per row (nested as the per-row output shape), which
    ``spark_udf`` returns by default as ``array<float>``; a tensor output spec would not do,
    as ``spark_udf`` maps its batch axis to one more array level.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec
    dtype = np.dtype(np.float64)
    if input_example is not None:
        X = _features(input_example, model, "input_example")
        model.check_input_shape(X.shape[1:], "input_example")
        if X.dtype.kind in "iuf":
            dtype = X.dtype
    output = DataType.float
    for _ in model.output_specs[0].shape:
        output = Array(output)
    return ModelSignature(inputs=Schema([TensorSpec(dtype, (-1, *_row_shape(model)))]),
                          outputs=Schema([ColSpec(output)]))


def _write_environment(path, conda_env, pip_requirements, extra_pip_requirements) -> dict:
    """``requirements.txt``, ``python_env.yaml`` and ``conda.yaml`` as MLflow's own flavors
    write them (its helpers, as its custom-flavor guide does), from
    ``get_default_pip_requirements`` unless the caller gives requirements. Returns the
    ``python_function`` flavor's environment settings."""
    import yaml
    from mlflow.utils.environment import (_CONDA_ENV_FILE_NAME, _CONSTRAINTS_FILE_NAME,
                                          _PYTHON_ENV_FILE_NAME, _REQUIREMENTS_FILE_NAME,
                                          _process_conda_env, _process_pip_requirements,
                                          _PythonEnv, _validate_env_arguments)
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    if conda_env is None:
        conda_env, requirements, constraints = _process_pip_requirements(
            get_default_pip_requirements(), pip_requirements, extra_pip_requirements)
    else:
        conda_env, requirements, constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        with open(os.path.join(path, _CONSTRAINTS_FILE_NAME), "w") as f:
            f.write("\n".join(constraints))
    with open(os.path.join(path, _REQUIREMENTS_FILE_NAME), "w") as f:
        f.write("\n".join(requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
    return {"conda_env": _CONDA_ENV_FILE_NAME, "python_env": _PYTHON_ENV_FILE_NAME}


def save_model(model, path, signature=None, input_example=None, *, pip_requirements=None,
               extra_pip_requirements=None, conda_env=None, metadata=None,
               include_optimizer: bool = False, mlflow_model=None) -> None:
    """Write ``model`` as an MLflow model directory at ``path`` (new, or empty).

    Args:
        model: a built rddtensor model with one input and one output.
        path: the directory to create.
        signature: an ``mlflow.models.ModelSignature``; ``None`` infers one from the model (a
            tensor of the per-row input shape with a dynamic batch axis, dtype the
            ``input_example``'s, else float64; a float32 output); ``False`` stores none (pyfunc
            then checks nothing before the model does).
        input_example: a few rows (numpy, or a pandas frame as pyfunc takes them), stored
            with the model; its dtype sets the inferred signature's.
        pip_requirements, extra_pip_requirements, conda_env: the model's environment, as in
            MLflow's flavors (default: ``get_default_pip_requirements()``).
        metadata: a dict stored in the MLmodel file.
        include_optimizer: also store the optimizer slots and step (to resume training).
        mlflow_model: the ``mlflow.models.Model`` to add the flavors to (``log_model``'s).
    """
    _import_mlflow()
    import mlflow.pyfunc
    from mlflow.models import Model as MlflowModel
    from mlflow.models.utils import _save_example
    _check_model(model, "save_model")
    if signature is None:
        signature = _signature(model, input_example)  # (a bad example fails before any write)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"save_model writes a new MLflow model directory, and {path!r} "
                              "already exists and is not empty")
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        mlflow_model = MlflowModel() if mlflow_model is None else mlflow_model
        if signature is not False:
            mlflow_model.signature = signature
        if input_example is not None:
            _save_example(mlflow_model, input_example, path)
        if metadata is not None:
            mlflow_model.metadata = metadata
        model.save(os.path.join(path, _MODEL_DIR), include_optimizer=include_optimizer)
        env = _write_environment(path, conda_env, pip_requirements, extra_pip_requirements)
        mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=_MODEL_DIR, **env)
        mlflow_model.add_flavor(FLAVOR_NAME, rddtensor_version=__version__, data=_MODEL_DIR,
                                include_optimizer=bool(include_optimizer))
        mlflow_model.save(os.path.join(path, "MLmodel"))
    except BaseException:
        if created:  # no half-written model directory left behind
            shutil.rmtree(path, ignore_errors=True)
        raise


def log_model(model, artifact_path=None, *, name=None, signature=None, input_example=None,
              registered_model_name=None, pip_requirements=None, extra_pip_requirements=None,
              conda_env=None, metadata=None, include_optimizer: bool = False, **kwargs):
    """Log ``model`` to the active MLflow run (``save_model``'s directory); returns MLflow's
    ``ModelInfo`` (``.model_uri`` loads it back).

    ``name`` is MLflow 3's spelling of the older ``artifact_path`` (either; default
    ``"model"``). Other keyword arguments go to ``mlflow.models.Model.log`` (``run_id``,
    ``params``, ``tags``, ``step``, ``await_registration_for``, ...); the rest are
    ``save_model``'s.
    """
    _import_mlflow()
    from mlflow.models import Model as MlflowModel
    _check_model(model, "log_model")  # before MLflow creates a logged model or a run
    if name is not None and artifact_path is not None:
        raise ValueError(f"pass name= (MLflow 3) or artifact_path=, not both; got "
                         f"name={name!r} and artifact_path={artifact_path!r}")
    where = name if name is not None else artifact_path if artifact_path is not None else "model"
    if "name" in inspect.signature(MlflowModel.log).parameters:  # MLflow 3
        kwargs.update(artifact_path=None, name=where)
    else:
        kwargs.update(artifact_path=where)
    return MlflowModel.log(flavor=sys.modules[__name__], model=model, signature=signature,
                           input_example=input_example,
                           registered_model_name=registered_model_name,
                           pip_requirements=pip_requirements,
                           extra_pip_requirements=extra_pip_requirements, conda_env=conda_env,
                           metadata=metadata, include_optimizer=include_optimizer, **kwargs)


def load_model(model_uri, dst_path=None):
    """The rddtensor model of an MLflow model (``runs:/<run>/model``, ``models:/...``, a path).

    Data only (``L.load_model``: JSON + ``.npz``, never pickle), compiled as it was saved.
    """
    mlflow = _import_mlflow()
    from mlflow.models import Model as MlflowModel
    local = mlflow.artifacts.download_artifacts(artifact_uri=str(model_uri), dst_path=dst_path)
    mlmodel = os.path.join(local, "MLmodel")
    if not os.path.isfile(mlmodel):
        raise ValueError(f"{model_uri!r} is not an MLflow model: it has no MLmodel file")
    flavors = MlflowModel.load(mlmodel).flavors
    if FLAVOR_NAME not in flavors:
        raise ValueError(f"{model_uri!r} is an MLflow model without the {FLAVOR_NAME!r} flavor "
                         f"(it has {sorted(flavors)}): load it with mlflow.pyfunc.load_model")
    data = os.path.normpath(str(flavors[FLAVOR_NAME].get("data", _MODEL_DIR)))
    if os.path.isabs(data) or data.startswith(os.pardir):
        raise ValueError(f"{mlmodel!r}: the {FLAVOR_NAME!r} flavor's data must be a directory "
                         f"inside the model, got {data!r}")
    return L.load_model(os.path.join(local, data))


# --- the callback -----------------------------------------------------------------------------
def _param_value(v) -> str:
    return v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)


class MLflowLogger(Callback):
    """Log a fit to MLflow: its settings as params when training begins, every epoch's logged
    values (``loss``, the metrics, ``val_*``, a scheduler's ``lr``) as metrics with
    ``step=epoch`` (0-based), and with ``log_models`` the trained model when training ends.

    It logs to the active run; with none active it starts one (``run_name``, ``tags``) and ends
    it when training ends. A run it did not start it never ends. Callbacks run on the driver in
    both engines, so in-process and distributed fits log the same way; a distributed fit's
    params add ``partitions``, ``allreduce``, ``iterations_per_job`` and ``wire_dtype``.

    Params: the fit's settings (``History.params``: ``epochs``, ``batch_size``, ``engine``,
    ``samples``, ...), ``optimizer`` (its class) and its settings as ``optimizer.<name>``,
    ``loss``, ``metrics``, ``param_count``. A param the run already holds with another value
    (a second ``fit`` in one run) is left as it is: MLflow params cannot change.

    A fit that raises does not reach the end of training: a run the logger started stays
    active (MLflow ends it when the process exits; this logger's next fit ends it as FAILED).
    Wrap the fit in ``with mlflow.start_run():`` to end it yourself.

    Args:
        log_models: log the trained model (``log_model``) when training ends.
        model_name: the logged model's name (its artifact path).
        run_name, tags: of a run the logger starts.

    Attributes:
        run_id: the run this fit logs to.

    Example:
        >>> from rddtensor.mlflow import MLflowLogger                       # doctest: +SKIP
        >>> model.fit(X, y, epochs=5, callbacks=[MLflowLogger(log_models=True)])  # doctest: +SKIP
    """

    def __init__(self, log_models: bool = False, model_name: str = "model",
                 run_name: str | None = None, tags: dict | None = None):
        if not isinstance(log_models, bool):
            raise TypeError(f"log_models must be True or False, got {log_models!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        self.log_models, self.model_name = log_models, model_name
        self.run_name, self.tags = run_name, dict(tags or {})
        self.run_id, self._started, self._epoch = None, None, None

    def _fit_params(self) -> dict:
        m = self.model
        params = dict(self.params)
        params.update(optimizer=type(m.optimizer).__name__, loss=m.loss.name,
                      metrics=",".join(metric.name for metric in m.metrics),
                      param_count=m.count_params())
        for k, v in m.optimizer.get_config().items():
            params[f"optimizer.{k}"] = v
        return {k: _param_value(v) for k, v in params.items()}

    def on_train_begin(self, logs=None):
        mlflow = _import_mlflow()
        from mlflow.entities import Param
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self._started:
            mlflow.end_run(status="FAILED")  # this logger's last fit raised before its end
            active = None
        if active is None:
            active = mlflow.start_run(run_name=self.run_name, tags=self.tags or None)
            self._started = active.info.run_id
        else:
            self._started = None
        self.run_id = active.info.run_id
        client = mlflow.MlflowClient()
        held = client.get_run(self.run_id).data.params
        params, kept = self._fit_params(), []
        for k, v in params.items():
            if k in held and held[k] != v:
                kept.append(f"{k}={held[k]!r} (this fit: {v!r})")
        if kept:
            log.warning("MLflowLogger: run %s already holds params %s; MLflow params cannot "
                        "change, so they keep their values", self.run_id, ", ".join(kept))
        new = [Param(k, v) for k, v in params.items() if k not in held]
        if new:
            client.log_batch(self.run_id, params=new)

    def on_epoch_end(self, epoch, logs=None):
        mlflow = _import_mlflow()
        from mlflow.entities import Metric
        self._epoch = int(epoch)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(epoch)) for k, v in (logs or {}).items()
                   if isinstance(v, (int, float, np.integer, np.floating))
                   and not isinstance(v, bool)]
        if metrics:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, logs=None):
        # (the fit has brought the driver's model up to date before this hook: no sync)
        mlflow = _import_mlflow()
        if self.log_models:
            from mlflow.models import Model as MlflowModel
            # MLflow 3 links the metrics of the step a model is logged at to the model
            at = {"step": self._epoch} if self._epoch is not None and \
                "step" in inspect.signature(MlflowModel.log).parameters else {}
            log_model(self.model, name=self.model_name, run_id=self.run_id, **at)
        if self._started is not None:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self._started:
                mlflow.end_run()
            else:  # (no longer the active run: end it by id)
                mlflow.MlflowClient().set_terminated(self._started)
            self._started = None
