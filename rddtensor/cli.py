"""The ``rddtensor`` command line (also ``python -m rddtensor``).

Commands:
    demo     train a CNN on the bundled handwritten digits through an embedded ``local[*]``
             Spark master: progress bar, test accuracy, the saved model and a training-curve PNG
    train    train a model described by a JSON/YAML config on Parquet/CSV/libsvm/image data: a
             Sequential's "layers", or a graph model's "model" (model.get_config()'s form; one
             Parquet/CSV column per input)
    predict  apply a saved model to data and write the predictions as Parquet
    info     versions, Java, the Spark master, GPU/CuPy status

Every command that uses Spark takes ``--master`` (default: an embedded ``local[*]``; give
``spark://host:7077``, ``yarn``, ``k8s://...`` for a cluster). Spark's own log output is turned
down to errors unless ``--verbose``.

Example:
    $ rddtensor demo
    $ rddtensor train --config model.json --data train.csv --output my_model
    $ rddtensor predict --model my_model --data test.csv --output predictions.parquet
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np

from rddtensor import backend
from rddtensor.spark import localcache
from rddtensor import layers as L
from rddtensor.spark.device import discovery_script_path
from rddtensor.spark.engine import predict_distributed
from rddtensor.layers.base import layer_class
from rddtensor.optim import Adam
from rddtensor.spark.readers import guess_format, read_dataset
from rddtensor.spark.session import get_spark, java_version
from rddtensor.training.graph import GraphModel
from rddtensor.version import __version__

log = logging.getLogger("rddtensor")

DEMO_MIN_ACCURACY = 0.95
_QUIET_LOG4J = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
# a logger of its own for the class PySpark starts: stops the "Setting default log level" banner
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
"""


# --- Spark, quietly -------------------------------------------------------------------------------
def _quiet_conf() -> dict:
    """Conf that starts the driver JVM with errors-only logging (no start-up banner/warnings)."""
    path = os.path.join(tempfile.gettempdir(), "rddtensor-log4j2-quiet-v2.properties")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".properties")
        with os.fdopen(fd, "w") as f:
            f.write(_QUIET_LOG4J)
        os.replace(tmp, path)
    return {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{path}"}


def start_spark(args, app_name: str):
    """``(spark, owned)``: the active session, or a new one on ``--master`` (``owned``: ours to
    stop). Turns Spark's log level down to ERROR unless ``--verbose``."""
    from pyspark.sql import SparkSession

    owned = SparkSession.getActiveSession() is None
    conf = _quiet_conf() if owned and not args.verbose else {}
    spark = get_spark(args.master, app_name=app_name, conf=conf)
    if not args.verbose:
        spark.sparkContext.setLogLevel("ERROR")
    return spark, owned


# --- demo -----------------------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    X = (d.data / 16.0).astype("float32").reshape(-1, 1, 8, 8)  # NCHW
    return train_test_split(X, d.target.astype("int64"), test_size=0.25, random_state=0)


def demo_model():
    """The demo's CNN: conv 3x3 -> max-pool -> dense -> 10 logits, on 1x8x8 digits."""
    model = L.Sequential([
        L.Conv2D(32, 3, padding="same", activation="relu", input_shape=(1, 8, 8)),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(128, activation="relu"),
        L.Dropout(0.1),
        L.Dense(10),
    ], seed=0)
    model.compile(optimizer=Adam(5e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def demo(args) -> int:
    """Train the demo CNN on the digits with the distributed engine; 1 if accuracy is too low."""
    t_start = time.perf_counter()
    spark, owned = start_spark(args, "rddtensor-demo")
    try:
        sc = spark.sparkContext
        Xtr, Xte, ytr, yte = _digits()
        train = sc.parallelize(list(zip(Xtr, ytr)), args.partitions)
        test = sc.parallelize(list(zip(Xte, yte)), args.partitions)
        model = demo_model()
        log.info("Spark %s, master %s (up in %.1f s): %d training and %d test digits (1x8x8) "
                 "in %d partitions", spark.version, sc.master, time.perf_counter() - t_start,
                 len(Xtr), len(Xte), args.partitions)
        model.summary(print_fn=log.info)
        t_fit = time.perf_counter()
        history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size,
                            validation_data=test, verbose=0 if args.quiet else 1, seed=0)
        t_fit = time.perf_counter() - t_fit
        result = model.evaluate(test)
    finally:
        if owned:
            spark.stop()
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "model")
    model.save(model_dir)
    png = _plot(history, os.path.join(args.out, "training_curves.png"))
    acc = result["accuracy"]
    print(f"test accuracy: {acc:.4f} (loss {result['loss']:.4f}) on {len(Xte)} held-out digits; "
          f"training {t_fit:.1f} s, {time.perf_counter() - t_start:.1f} s in all")
    print(f"model saved to {model_dir}" + (f"; training curves in {png}" if png else ""))
    if acc < DEMO_MIN_ACCURACY:
        log.error("test accuracy %.4f is below %.2f: something is wrong with this installation",
                  acc, DEMO_MIN_ACCURACY)
        return 1
    return 0


def _plot(history, path):
    try:
        return history.plot(path)
    except ImportError:
        log.warning("no training-curve PNG: matplotlib is not installed (pip install matplotlib)")
        return None


# --- train / predict ------------------------------------------------------------------------------
def load_config(path: str) -> dict:
    """A training config from JSON, or YAML (needs PyYAML) for ``.yaml``/``.yml`` files."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path}: YAML configs need PyYAML (pip install pyyaml), or write "
                             "the config as JSON") from None
        config = yaml.safe_load(text)
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON: {e}") from None
    if isinstance(config, dict) and "layers" in config and "model" in config:
        raise SystemExit(f"{path}: the config has both \"layers\" (a Sequential's layer list) "
                         "and \"model\" (a graph model's config): keep one of them")
    if isinstance(config, dict) and "model" in config:
        if not isinstance(config["model"], dict):
            raise SystemExit(f"{path}: \"model\" must be an object: a graph model's config as "
                             "model.get_config() returns it and a saved model.json holds it "
                             "under \"config\" (\"inputs\", \"layers\", \"nodes\", "
                             f"\"outputs\"), got {type(config['model']).__name__}")
        return config
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise SystemExit(f"{path}: the config needs a \"layers\" list, e.g. "
                         '{"layers": [{"type": "Dense", "units": 10}], '
                         '"compile": {"loss": "sparse_categorical_crossentropy"}}'
                         + ("" if isinstance(config, dict) and "layers" in config else
                            "; or, for a graph model (several inputs, merges), a \"model\" "
                            "object: its config as model.get_config() returns it"))
    return config


def build_model(config: dict, path: str | None = None):
    """A compiled model from a config's ``layers`` (a ``Sequential``) or ``model`` (a graph
    model) section and its ``compile`` section; errors name ``path`` (the config file) and the
    layer or node at fault.

    A ``layers`` entry is ``{"type": "Dense", "units": 64, ...}``, ``{"Dense": {"units": 64}}``
    or the ``{"class_name": ..., "config": ...}`` form that ``model.json`` files use. ``model``
    is a model's config exactly as ``model.get_config()`` returns it and ``model.save`` writes it
    (``model.json``'s ``"config"``): for a graph model ``"inputs"``, ``"layers"``, ``"nodes"``
    and ``"outputs"`` (see ``graph_model_from_config``).
    """
    if "model" in config:
        model = graph_model_from_config(config["model"], path)
        model.seed = config.get("seed", 0)  # as for "layers": the same weights on every run
    else:
        model = _sequential(config, path)
    c = config.get("compile") or {}
    try:
        model.compile(optimizer=c.get("optimizer", "adam"), loss=c.get("loss", "mse"),
                      metrics=c.get("metrics"))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{_at(path)}compile: {e}") from None
    return model


def _at(path) -> str:
    return f"{path}: " if path else ""


def _sequential(config: dict, path=None):
    layers = []
    for i, entry in enumerate(config["layers"]):
        if not isinstance(entry, dict):
            raise SystemExit(f"{_at(path)}layers[{i}] must be an object like {{\"type\": "
                             f"\"Dense\", \"units\": 10}}, got {entry!r}")
        if "class_name" in entry:
            name, kwargs = entry["class_name"], dict(entry.get("config") or {})
        elif "type" in entry:
            name, kwargs = entry["type"], {k: v for k, v in entry.items() if k != "type"}
        elif len(entry) == 1:
            (name, kwargs), = entry.items()
            kwargs = dict(kwargs or {})
        else:
            raise SystemExit(f"{_at(path)}layers[{i}] = {entry!r} names no layer type: add "
                             "\"type\"")
        try:
            layers.append(layer_class(name).from_config(kwargs))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{_at(path)}layers[{i}] ({name}): {e}") from None
    return L.Sequential(layers, seed=config.get("seed", 0))


_GRAPH_KEYS = ("name", "inputs", "layers", "nodes", "outputs")


def graph_model_from_config(section: dict, path: str | None = None):
    """The model of a config's ``"model"`` section: a model config exactly as
    ``model.get_config()`` returns it and ``model.json`` holds it under ``"config"``.

    A graph model's (``L.Model(inputs, outputs)``)::

        {"name": "two_tower",                                  # optional
         "inputs": [{"name": "a", "shape": [4], "dtype": "float32"},   # tensors 0, 1
                    {"name": "b", "shape": [2]}],
         "layers": [{"class_name": "Dense", "config": {"units": 8}},  # in first-call order
                    {"class_name": "Concatenate", "config": {}},
                    {"class_name": "Dense", "config": {"units": 2}}],
         "nodes": [{"layer": 0, "inputs": [0], "list": false},       # tensor 2 = Dense(a)
                   {"layer": 1, "inputs": [2, 1], "list": true},     # tensor 3 = concat
                   {"layer": 2, "inputs": [3], "list": false}],      # tensor 4
         "outputs": [4]}

    Tensors are numbers: the inputs ``0 .. n-1``, then node ``j``'s output ``n + j``; a node
    reads earlier tensors only. ``"list"`` (the layer is called on a list: merge layers) may be
    left out: then a node with several inputs is called on a list. A config without ``"nodes"``
    is a ``Sequential``'s (``{"layers": [{"class_name": ..., "config": ...}, ...]}``).

    Everything is checked before Spark starts; an error names ``path``, the entry
    (``model.nodes[2]``) and the layer (type and name) at fault.
    """
    where = f"{_at(path)}model"
    if section.get("format") == "rddtensor.model" and "config" in section:
        raise SystemExit(f"{where}: this is a whole model.json; put its \"config\" object here "
                         "(and the compile settings in the config's \"compile\" section)")
    unknown = [k for k in section if k not in _GRAPH_KEYS]
    if unknown:
        raise SystemExit(f"{where}: unknown key(s) {unknown}; a model config has "
                         f"{list(_GRAPH_KEYS)} (as model.get_config() returns it)")
    layers = _config_layers(section.get("layers"), where)
    if not any(k in section for k in ("inputs", "nodes", "outputs")):  # a Sequential's config
        if not layers:
            raise SystemExit(f"{where}: \"layers\" is empty; a model needs at least one layer")
        return L.Sequential(layers, name=section.get("name"))
    inputs = _config_inputs(section.get("inputs"), where)
    section = dict(section, nodes=_config_nodes(section.get("nodes"), inputs, layers, where))
    outs = section.get("outputs")
    n_tensors = len(inputs) + len(section["nodes"])
    if not isinstance(outs, list) or not outs or not all(_is_index(r, n_tensors) for r in outs):
        raise SystemExit(f"{where}.outputs must be a non-empty list of tensor numbers < "
                         f"{n_tensors} ({_tensor_numbers(inputs, len(section['nodes']))}), got "
                         f"{outs!r}")
    try:
        return GraphModel.from_config(section)
    except (TypeError, ValueError, KeyError) as e:
        raise SystemExit(f"{where}: {e}") from None


def _is_index(value, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def _tensor_numbers(inputs, n_nodes: int) -> str:
    n = len(inputs)
    names = [t.name for t in inputs]
    text = f"0..{n - 1} are the inputs {names}" if n > 1 else f"0 is the input {names[0]!r}"
    if n_nodes:
        text += (f", {n}..{n + n_nodes - 1} the outputs of nodes 0..{n_nodes - 1}"
                 if n_nodes > 1 else f", {n} the output of node 0")
    return text


def _config_layers(entries, where: str) -> list:
    if not isinstance(entries, list):
        raise SystemExit(f"{where}: \"layers\" must be a list of {{\"class_name\": ..., "
                         f"\"config\": {{...}}}}, got {entries!r}"[:300])
    layers = []
    for i, c in enumerate(entries):
        if not isinstance(c, dict) or not isinstance(c.get("class_name"), str) or \
                not isinstance(c.get("config", {}), dict) or set(c) - {"class_name", "config"}:
            raise SystemExit(f"{where}.layers[{i}] must be {{\"class_name\": \"Dense\", "
                             f"\"config\": {{\"units\": 8}}}}, got {str(c)[:120]}")
        kwargs = dict(c.get("config") or {})
        label = c["class_name"] + (f" {kwargs['name']!r}" if isinstance(kwargs.get("name"), str)
                                   else "")
        try:
            cls = layer_class(c["class_name"])
        except ValueError as e:
            raise SystemExit(f"{where}.layers[{i}]: {e}") from None
        try:
            layers.append(cls.from_config(kwargs))
        except (TypeError, ValueError, KeyError) as e:
            raise SystemExit(f"{where}.layers[{i}] ({label}): invalid config {kwargs}: {e}") \
                from None
    return layers


def _config_inputs(specs, where: str) -> list:
    if not isinstance(specs, list) or not specs:
        raise SystemExit(f"{where}: a graph model config needs \"inputs\": a list of "
                         "{\"name\": ..., \"shape\": [...], \"dtype\": \"float32\"}, got "
                         f"{specs!r}"[:300])
    tensors = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                set(spec) - {"name", "shape", "dtype"}:
            raise SystemExit(f"{where}.inputs[{i}] must be {{\"name\": str, \"shape\": [...], "
                             f"\"dtype\": str}}, got {str(spec)[:120]}")
        try:
            tensors.append(L.Input(spec.get("shape"), spec.get("dtype", "float32"),
                                   spec["name"]))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{where}.inputs[{i}] ({spec['name']!r}): {e}") from None
    return tensors


def _config_nodes(nodes, inputs, layers, where: str) -> list:
    """The nodes, checked by replaying them on fresh layers (``layers``; the model itself is
    built from the config again); ``"list"`` filled in where left out."""
    if not isinstance(nodes, list) or not nodes:
        raise SystemExit(f"{where}: \"nodes\" must be a non-empty list of layer calls "
                         f"{{\"layer\": index, \"inputs\": [tensor numbers], \"list\": bool}}, "
                         f"got {nodes!r}"[:300])
    tensors, out = list(inputs), []
    for j, n in enumerate(nodes):
        at = f"{where}.nodes[{j}]"
        if not isinstance(n, dict) or set(n) - {"layer", "inputs", "list"}:
            raise SystemExit(f"{at} must be {{\"layer\": index, \"inputs\": [tensor numbers], "
                             f"\"list\": bool}}, got {str(n)[:120]}")
        if not _is_index(n.get("layer"), len(layers)):
            raise SystemExit(f"{at}: \"layer\" must be an index into \"layers\" (0.."
                             f"{len(layers) - 1}), got {n.get('layer')!r}")
        layer = layers[n["layer"]]
        at = f"{at} (layers[{n['layer']}], {type(layer).__name__}" + \
            (f" {layer.name!r})" if layer.name else ")")
        refs = n.get("inputs")
        if not isinstance(refs, list) or not refs:
            raise SystemExit(f"{at}: \"inputs\" must be a non-empty list of tensor numbers, got "
                             f"{refs!r}")
        for r in refs:
            if not _is_index(r, len(tensors)):
                raise SystemExit(f"{at}: inbound tensor {r!r} is unknown: a node reads the "
                                 f"inputs or earlier nodes' outputs, and here "
                                 f"{_tensor_numbers(inputs, j)}")
        as_list = n.get("list", len(refs) > 1)
        if not isinstance(as_list, bool) or (not as_list and len(refs) != 1):
            raise SystemExit(f"{at}: \"list\" must be true (called on a list of tensors) or "
                             f"false (on one tensor: one inbound tensor), got {as_list!r} with "
                             f"inputs {refs}")
        args = [tensors[r] for r in refs]
        try:
            tensors.append(layer(args if as_list else args[0]))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{at} on tensor(s) {refs}: {e}") from None
        out.append({"layer": n["layer"], "inputs": list(refs), "list": as_list})
    return out


# --- a graph model's inputs as DataFrame columns --------------------------------------------------
def _several_inputs(model) -> bool:
    return len(model.input_specs) > 1


def input_columns(model, features, where: str = "data.features"):
    """For a model with several inputs: ``{input name: column or [columns]}`` in input order,
    from the config's ``data.features``: ``None`` (the columns named like the inputs), a list
    (one entry per input, in input order) or a dict by input name. A list of column names for
    one input is assembled into one vector (CSV: one number per column). Checked before Spark
    starts."""
    names = [s.name for s in model.input_specs]

    def column(value, name):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(c, str) and c for c in value):
            return list(value)
        raise SystemExit(f"{where}: input {name!r} must be read from a column name (or a list "
                         f"of numeric columns to assemble), got {value!r}")
    if features is None:
        return {n: n for n in names}
    if isinstance(features, dict):
        return {n: column(c, n) for n, c in zip(names, _by_name(features, names, where,
                                                                "input", "columns"))}
    if isinstance(features, list) and len(features) == len(names):
        return {n: column(v, n) for n, v in zip(names, features)}
    raise SystemExit(f"{where}: the model has {len(names)} inputs {names}: give one column per "
                     f"input, as a list in input order or as {{input name: column}} (or leave "
                     f"it out: the columns named like the inputs), got {features!r}")


def _by_name(mapping: dict, names: list, where: str, what: str, to: str) -> list:
    """A config's ``{input/output name: column}`` as a list in ``names``' order; an unknown or
    missing name refused, naming ``where``."""
    unknown = [k for k in mapping if k not in names]
    missing = [n for n in names if n not in mapping]
    if unknown or missing:
        raise SystemExit(f"{where} maps the model's {what}s {names} to {to}; "
                         + (f"there is no {what} named {unknown[0]!r}" if unknown else
                            f"{what} {missing[0]!r} has no column"))
    return [mapping[n] for n in names]


def label_columns(model, label, where: str = "data.label") -> list:
    """For a model with several outputs: one label column per output, in output order, from
    the config's ``data.label``: the default (the columns named like the outputs), a list
    (output order) or a dict by output name. Checked before Spark starts."""
    names = [s.name for s in model.output_specs]
    if label is None or label == "label":
        return names
    if isinstance(label, dict):
        label = _by_name(label, names, where, "output", "label columns")
    if isinstance(label, list) and len(label) == len(names) and \
            all(isinstance(c, str) and c for c in label):
        return label
    raise SystemExit(f"{where}: the model has {len(names)} outputs {names}: give one label "
                     f"column per output, as a list in output order or as {{output name: "
                     f"column}} (or leave it out: the columns named like the outputs), got "
                     f"{label!r}")


def _check_one_output(model, path) -> None:
    """Refuse, before Spark starts, a model with several outputs for ``predict`` (whose output
    columns are one output's)."""
    outs = model.output_specs
    if len(outs) > 1:
        raise SystemExit(f"{_at(path)}model: rddtensor predict writes one output's prediction "
                         f"columns; this model has {len(outs)} {[s.name for s in outs]}: use "
                         "model.predict(df) in Python (a tuple of arrays per row)")


def _read_table(spark, path: str, fmt: str):
    """Parquet/CSV as they are (a column per input: vectors/arrays in Parquet, numbers)."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"a model with several inputs reads Parquet or CSV data (a column per "
                         f"input), got format {fmt!r}")
    local = spark.sparkContext.master.startswith("local")
    if local and "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"no data at {path!r}")
    if fmt == "csv":
        return spark.read.option("header", True).option("inferSchema", True).csv(path)
    return spark.read.parquet(path)


def _input_frame(df, columns: dict):
    """``(df, [one column per input])``: inputs given as lists of numeric columns assembled
    into a vector column each (``__input_<name>``)."""
    from pyspark.ml.feature import VectorAssembler
    cols = []
    for name, spec in columns.items():
        wanted = spec if isinstance(spec, list) else [spec]
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise ValueError(f"input {name!r} reads column {missing[0]!r}, which the data lacks; "
                             f"its columns are {df.columns} (set \"data\": {{\"features\": "
                             "{input name: column}} in the config)")
        if isinstance(spec, list):
            out = f"__input_{name}"
            df = VectorAssembler(inputCols=spec, outputCol=out, handleInvalid="error") \
                .transform(df)
            spec = out
        cols.append(spec)
    return df, cols


_CLASSIFIER_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy",
                      "binary_crossentropy")


def train(args) -> int:
    """``rddtensor train``: fit a config's model on a dataset, save it with its history."""
    config = load_config(args.config)
    data_cfg = config.get("data") or {}
    fit_cfg = dict(config.get("fit") or {})
    for key in ("epochs", "batch_size", "validation_split"):
        if getattr(args, key) is not None:
            fit_cfg[key] = getattr(args, key)
    model = build_model(config, args.config)
    features = data_cfg.get("features")
    several = _several_inputs(model)
    if several:  # one column per input: checked against the model before Spark starts
        features = input_columns(model, features, f"{args.config}: data.features")
    elif isinstance(features, dict):  # {input name: column} for a one-input graph model
        name = model.input_specs[0].name
        if list(features) != [name]:
            raise SystemExit(f"{args.config}: data.features maps inputs to columns, but the "
                             f"model has one input {name!r}, got {features!r}")
        features = features[name]
    label = args.label_col or data_cfg.get("label", "label")
    if len(model.output_specs) > 1:  # a label column per output, checked before Spark starts
        label = label_columns(model, label, f"{args.config}: data.label")
    fmt = args.format or data_cfg.get("format")
    if isinstance(label, list) and fmt in ("libsvm", "image"):
        raise SystemExit(f"rddtensor train: a model with several outputs reads a label column "
                         f"per output from Parquet or CSV data, got format {fmt!r}")
    if several and fmt not in (None, "auto", "parquet", "csv"):
        raise SystemExit(f"rddtensor train: a model with several inputs "
                         f"{[s.name for s in model.input_specs]} trains on Parquet or CSV data "
                         f"with a column per input, got format {fmt!r}")
    spark, owned = start_spark(args, "rddtensor-train")
    try:
        if fmt in (None, "auto") and (os.path.exists(args.data) or several):
            fmt = guess_format(args.data)
        if several:
            df, fcol = _input_frame(_read_table(spark, args.data, fmt), features)
            classes = None
        else:
            df, fcol, classes = read_dataset(spark, args.data, fmt, features=features,
                                             label=label,
                                             num_features=data_cfg.get("num_features"))
        for col in (label if isinstance(label, list) else [label]):
            if col not in df.columns:
                raise SystemExit(f"{args.data}: no label column {col!r}; columns are "
                                 f"{df.columns} (set \"data\": {{\"label\": ...}} in the config "
                                 "or --label-col)")
        df = df.select(*(fcol if several else [fcol]),
                       *(label if isinstance(label, list) else [label]))
        split = float(fit_cfg.pop("validation_split", 0) or 0)
        val = None
        if split:
            df, val = df.randomSplit([1 - split, split], seed=int(fit_cfg.get("seed", 0)))
        if args.partitions:  # runs of consecutive rows, their order kept (not round robin)
            fit_cfg["num_partitions"] = args.partitions
        if isinstance(fit_cfg.get("class_weight"), dict):  # JSON object keys are strings
            fit_cfg["class_weight"] = {int(k) if str(k).lstrip("-").isdigit() else k: v
                                       for k, v in fit_cfg["class_weight"].items()}
        history = model.fit(df, validation_data=val, features_col=fcol, label_col=label,
                            verbose=0 if args.quiet else 1, **fit_cfg)
    except TypeError as e:
        raise SystemExit(f"rddtensor train: the config's \"fit\" section: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rddtensor train: {e}") from None
    finally:
        if owned:
            spark.stop()
    model.save(args.output)
    extra = {"features": features, "label": label, "classes": classes,
             "format": fmt, "history": history.history}
    with open(os.path.join(args.output, "training.json"), "w") as f:
        json.dump(extra, f, indent=1)
    png = _plot(history, os.path.join(args.output, "training_curves.png"))
    last = ", ".join(f"{k} {v:.4f}" for k, v in history.last().items())
    print(f"trained {len(history.epoch)} epochs: {last}")
    print(f"model saved to {args.output}" + (f"; training curves in {png}" if png else ""))
    return 0


def predict(args) -> int:
    """``rddtensor predict``: a saved model over a dataset, predictions written as Parquet.

    The output holds the input's columns without the features column (an image's ``origin``
    path instead of its pixels), plus ``prediction`` (and ``probability``, ``rawPrediction`` for
    a classifier). A graph model with several inputs reads one column per input (as trained:
    ``training.json``'s ``features``, else the columns named like the inputs), and the output
    holds the other columns.
    """
    try:
        model = L.load_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rddtensor predict: {e}") from None
    meta_path = os.path.join(args.model, "training.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    _check_one_output(model, args.model)
    several = _several_inputs(model)
    if several:
        columns = input_columns(model, meta.get("features"), f"{meta_path}: features")
    spark, owned = start_spark(args, "rddtensor-predict")
    try:
        fmt = args.format or meta.get("format") or guess_format(args.data)
        if several:
            df, fcols = _input_frame(_read_table(spark, args.data, fmt), columns)
            out = _graph_predictions(model, df, fcols)
        else:
            df, fcol, _ = read_dataset(spark, args.data, fmt, features=meta.get("features"),
                                       label=None if fmt == "image" else
                                       meta.get("label", "label"))
            out = _prediction_stage(model, fcol).transform(df)
            if fcol == "image":
                out = out.withColumn("origin", out["image.origin"])
            out = out.drop(fcol)
        out.write.mode("overwrite" if args.overwrite else "errorifexists").parquet(args.output)
        n = spark.read.parquet(args.output).count()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rddtensor predict: {e}") from None
    finally:
        if owned:
            spark.stop()
    print(f"wrote {n} predictions to {args.output}")
    return 0


def _prediction_stage(model, features_col):
    from rddtensor.ml import NNClassificationModel, NNModel
    loss = getattr(model.loss, "name", None)
    cls = NNClassificationModel if loss in _CLASSIFIER_LOSSES else NNModel
    return cls(network=model, featuresCol=features_col)


def _graph_predictions(model, df, cols):
    """``df`` without the input columns ``cols``, plus the output columns an ``NNModel`` /
    ``NNClassificationModel`` writes, for a model with several inputs (a Spark ML stage takes
    one features column): the engine's ``predict`` (one job, streamed, row order kept) zipped
    with the other columns of the same rows."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    loss = model.loss
    classifier = getattr(loss, "name", None) in _CLASSIFIER_LOSSES
    keys = ["rawPrediction", "probability", "prediction"] if classifier else ["prediction"]
    one = int(np.prod(model.output_shape)) == 1
    types = {"rawPrediction": VectorUDT(), "probability": VectorUDT(),
             "prediction": DoubleType() if classifier or one else VectorUDT()}
    rest = df.select(*[c for c in df.columns if c not in cols])
    clash = [k for k in keys if k in rest.columns]
    if clash:
        raise ValueError(f"the data already has a column {clash[0]!r}, which predict writes: "
                         "rename or drop it first")
    preds = predict_distributed(model, df, features_col=list(cols))
    rows = rest.rdd
    if rows.getNumPartitions() == preds.getNumPartitions():
        pairs = rows.zip(preds)  # (Spark checks the rows per partition match)
    else:  # (not seen with Parquet/CSV scans: both sides are the same scan's partitions)
        def indexed(rdd):
            return rdd.zipWithIndex().map(lambda p: (p[1], p[0]))
        pairs = indexed(rows).join(indexed(preds)).sortByKey().values()
    schema = StructType(rest.schema.fields + [StructField(k, types[k]) for k in keys])
    return df.sparkSession.createDataFrame(
        pairs.mapPartitions(_prediction_rows(loss, classifier, keys)), schema)


def _prediction_rows(loss, classifier: bool, keys, chunk: int = 1024):
    """A ``mapPartitions`` function: ``(row, model output)`` pairs -> rows with the output
    columns ``keys`` appended, computed as ``NNModel.transform`` does
    (``rddtensor.ml.transform.outputs``)."""
    from rddtensor.ml.transform import outputs
    fused = getattr(loss, "fused", None) if classifier else None

    def run(pairs):
        from pyspark.ml.linalg import DenseVector
        buf = []

        def flush():
            Y = np.stack([np.asarray(y, np.float64) for _, y in buf])
            outs = outputs(_logits(Y, fused) if fused else Y, loss, classifier)
            cols = [[DenseVector(v) for v in outs[k]] if outs[k].ndim == 2 else
                    outs[k].tolist() for k in keys]
            for i, (row, _) in enumerate(buf):
                yield tuple(row) + tuple(c[i] for c in cols)
        for pair in pairs:
            buf.append(pair)
            if len(buf) == chunk:
                yield from flush()
                buf.clear()
        if buf:
            yield from flush()
    return run


def _logits(P, activation: str):
    """Logits (up to a per-row constant, which softmax ignores) of a model's probabilities: the
    engine's ``predict`` returns what the output activation the loss is fused with makes."""
    P = P.reshape(P.shape[0], -1)
    tiny = np.finfo(np.float64).tiny
    if activation == "sigmoid":
        p = np.clip(P, tiny, 1 - np.finfo(np.float64).eps)
        return np.log(p) - np.log1p(-p)
    return np.log(np.maximum(P, tiny))


# --- info -----------------------------------------------------------------------------------------
def info(args) -> int:
    """Print versions, Java, the Spark master, and GPU/CuPy status."""
    if args.gpu_discovery_script:
        print(discovery_script_path())
        return 0
    try:
        import pyspark
        spark_version = pyspark.__version__
    except ImportError:
        spark_version = "not installed"
    print(f"rddtensor {__version__}")
    print(f"python    {platform.python_version()}")
    print(f"numpy     {np.__version__}")
    print(f"pyspark   {spark_version}")
    jv = java_version()
    print(f"java      {jv if jv else 'NOT FOUND (Spark needs Java 17+)'}")
    print(f"master    {args.master or 'local[*] (embedded; --master to choose a cluster)'}")
    gpu = backend.device_count()
    cupy = "installed" if backend.has_cupy() else "not installed"
    print(f"cupy      {cupy}; GPUs visible: {gpu}")
    print(f"device    {_device_line()}")
    print(f"discovery {discovery_script_path()} (spark.executor.resource.gpu.discoveryScript)")
    _cache_lines(getattr(args, "clean_cache", False))
    if args.spark:
        spark, owned = start_spark(args, "rddtensor-info")
        sc = spark.sparkContext
        # block managers: the driver's, plus one per executor on a cluster (local: just one)
        executors = sc._jsc.sc().getExecutorMemoryStatus().size()
        executors -= 0 if sc.master.startswith("local") else 1
        gpus = sc.getConf().get("spark.executor.resource.gpu.amount", "0")
        print(f"spark     {spark.version} on {sc.master}: default parallelism "
              f"{sc.defaultParallelism}, {executors} executor(s), GPUs per executor {gpus}")
        if owned:
            spark.stop()
    return 0


def _cache_lines(clean: bool) -> None:
    """The host-local cache's run directories on this host (``rddtensor.spark.localcache``): size,
    the driver that owns each and whether it still runs; ``clean`` removes the stale ones."""

    def size(n):
        return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"
    if clean:
        for r in localcache.remove_stale():
            print(f"removed   {r['path']} ({size(r['bytes'])})")
    runs = localcache.runs()
    print(f"cache     {localcache.root()}: {len(runs)} run(s), "
          f"{size(sum(r['bytes'] for r in runs))}")
    for r in runs:
        owner, pid = r["owner"], (r["owner"] or {}).get("pid")
        if r["alive"]:
            who = f"driver pid {pid} running"
        elif r["alive"] is False:
            who = (f"driver pid {pid} gone: stale, removed by the next fit on this host "
                   f"(or now: rddtensor info --clean-cache)")
        else:
            who = ("driver on another host" if owner else "no driver file (an executor's, "
                   "or from an older rddtensor)")
            who += (f", untouched {r['idle'] / 60:.0f} min: "
                    + ("stale, removed by the next fit on this host" if r["stale"]
                       else "removed once untouched for an hour"))
        print(f"          {r['run']}  {size(r['bytes'])} in {r['files']} file(s), {who}")


def _device_line() -> str:
    """Where training tasks on this host would compute with the default device='auto'."""
    if backend.gpu_available():
        d = backend.device_info(0)
        return (f"gpu {d['id']}: {d['name']} (compute {d['compute_capability']}, "
                f"{d['memory_bytes'] / 2 ** 30:.1f} GiB); tasks compute on CuPy")
    if not backend.has_cupy():
        return "cpu (NumPy); for GPUs: pip install rddtensor[gpu]"
    return (f"cpu (NumPy): cupy is installed but sees no CUDA GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); tasks warn and use NumPy, "
            f"compile(device='gpu') fails")


# --- argument parsing -----------------------------------------------------------------------------
def _spark_args(p, master_default="local[*]"):
    p.add_argument("--master", default=master_default,
                   help="Spark master (default: an embedded local[*]; e.g. spark://host:7077, "
                        "yarn, k8s://https://host:443)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="keep Spark's own log output (warnings and up)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rddtensor",
                                 description="Deep learning on Apache Spark, in pure Python.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a CNN on the bundled digits through a local Spark "
                                    "master; print test accuracy; save the model and a PNG")
    _spark_args(p)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--out", default="rddtensor-demo",
                   help="directory for the model and training_curves.png (default: %(default)s)")
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="train a model from a JSON/YAML config on a dataset")
    _spark_args(p)
    p.add_argument("--config", required=True,
                   help="model config (.json, or .yaml with PyYAML): \"layers\" (a Sequential) "
                        "or \"model\" (a graph model, as model.get_config() returns it)")
    p.add_argument("--data", required=True, help="training data: a file or directory")
    p.add_argument("--format", choices=["auto", "parquet", "csv", "libsvm", "image"], default=None,
                   help="data format (default: the config's data.format, else from the path)")
    p.add_argument("--label-col", default=None, help="label column (default: config, 'label')")
    p.add_argument("--output", required=True, help="directory to save the trained model to")
    p.add_argument("--epochs", type=int, default=None, help="overrides the config's fit.epochs")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--validation-split", dest="validation_split", type=float, default=None)
    p.add_argument("--partitions", type=int, default=None,
                   help="train on this many partitions (fit's num_partitions: runs of "
                        "consecutive rows, the order kept)")
    p.set_defaults(func=train)

    p = sub.add_parser("predict", help="apply a saved model to a dataset; write Parquet")
    _spark_args(p)
    p.add_argument("--model", required=True, help="a model directory (model.save / train)")
    p.add_argument("--data", required=True, help="data to predict on: a file or directory")
    p.add_argument("--format", choices=["auto", "parquet", "csv", "libsvm", "image"], default=None)
    p.add_argument("--output", required=True, help="Parquet output path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=predict)

    p = sub.add_parser("info", help="versions, Java, Spark master and GPU status")
    p.add_argument("--master", default=None, help="the Spark master to report / check")
    p.add_argument("--spark", action="store_true",
                   help="start Spark on the master and report its executors")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--gpu-discovery-script", action="store_true",
                   help="print only the path of the GPU discovery script shipped with rddtensor "
                        "(for spark.executor.resource.gpu.discoveryScript)")
    p.add_argument("--clean-cache", action="store_true",
                   help="remove the host-local cache files (/dev/shm) of fits whose driver is "
                        "gone (the next fit on this host removes them anyway)")
    p.set_defaults(func=info)
    return ap


def setup_logging(verbose: bool = False) -> None:
    """rddtensor's log lines to stderr; py4j's chatter (and Spark's, via log4j) turned down."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("rddtensor").setLevel(logging.INFO)
    logging.getLogger("py4j").setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
