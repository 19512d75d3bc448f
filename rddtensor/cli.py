"""The ``rddtensor`` command line (also ``python -m rddtensor``).

Commands:
    demo     train a CNN on the bundled handwritten digits through an embedded ``local[*]``
             Spark master: progress bar, test accuracy, the saved model and a training-curve PNG
    train    train a model described by a JSON/YAML config on Parquet/CSV/libsvm/image data
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
from rddtensor.layers.base import layer_class
from rddtensor.optim import Adam
from rddtensor.spark.readers import guess_format, read_dataset
from rddtensor.spark.session import get_spark, java_version
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
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise SystemExit(f"{path}: the config needs a \"layers\" list, e.g. "
                         '{"layers": [{"type": "Dense", "units": 10}], '
                         '"compile": {"loss": "sparse_categorical_crossentropy"}}')
    return config


def build_model(config: dict):
    """A compiled ``Sequential`` from a config's ``rddtensor.layers`` and ``compile`` sections.

    A layer entry is ``{"type": "Dense", "units": 64, ...}``, ``{"Dense": {"units": 64}}`` or
    the ``{"class_name": ..., "config": ...}`` form that ``model.json`` files use.
    """
    layers = []
    for i, entry in enumerate(config["layers"]):
        if not isinstance(entry, dict):
            raise SystemExit(f"layers[{i}] must be an object like {{\"type\": \"Dense\", "
                             f"\"units\": 10}}, got {entry!r}")
        if "class_name" in entry:
            name, kwargs = entry["class_name"], dict(entry.get("config") or {})
        elif "type" in entry:
            name, kwargs = entry["type"], {k: v for k, v in entry.items() if k != "type"}
        elif len(entry) == 1:
            (name, kwargs), = entry.items()
            kwargs = dict(kwargs or {})
        else:
            raise SystemExit(f"layers[{i}] = {entry!r} names no layer type: add \"type\"")
        try:
            layers.append(layer_class(name).from_config(kwargs))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"layers[{i}] ({name}): {e}") from None
    model = L.Sequential(layers, seed=config.get("seed", 0))
    c = config.get("compile") or {}
    try:
        model.compile(optimizer=c.get("optimizer", "adam"), loss=c.get("loss", "mse"),
                      metrics=c.get("metrics"))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"compile: {e}") from None
    return model


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
    model = build_model(config)
    fmt = args.format or data_cfg.get("format")
    spark, owned = start_spark(args, "rddtensor-train")
    try:
        if fmt in (None, "auto") and os.path.exists(args.data):
            fmt = guess_format(args.data)
        label = args.label_col or data_cfg.get("label", "label")
        df, fcol, classes = read_dataset(spark, args.data, fmt,
                                         features=data_cfg.get("features"), label=label,
                                         num_features=data_cfg.get("num_features"))
        if label not in df.columns:
            raise SystemExit(f"{args.data}: no label column {label!r}; columns are {df.columns} "
                             "(set \"data\": {\"label\": ...} in the config or --label-col)")
        df = df.select(fcol, label)
        split = float(fit_cfg.pop("validation_split", 0) or 0)
        val = None
        if split:
            df, val = df.randomSplit([1 - split, split], seed=int(fit_cfg.get("seed", 0)))
        if args.partitions:
            df = df.repartition(args.partitions)
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
    extra = {"features": data_cfg.get("features"), "label": label, "classes": classes,
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
    a classifier).
    """
    model = L.load_model(args.model)
    meta_path = os.path.join(args.model, "training.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    spark, owned = start_spark(args, "rddtensor-predict")
    try:
        fmt = args.format or meta.get("format") or guess_format(args.data)
        df, fcol, _ = read_dataset(spark, args.data, fmt, features=meta.get("features"),
                                   label=None if fmt == "image" else meta.get("label", "label"))
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
    p.add_argument("--config", required=True, help="model config (.json, or .yaml with PyYAML)")
    p.add_argument("--data", required=True, help="training data: a file or directory")
    p.add_argument("--format", choices=["auto", "parquet", "csv", "libsvm", "image"], default=None,
                   help="data format (default: the config's data.format, else from the path)")
    p.add_argument("--label-col", default=None, help="label column (default: config, 'label')")
    p.add_argument("--output", required=True, help="directory to save the trained model to")
    p.add_argument("--epochs", type=int, default=None, help="overrides the config's fit.epochs")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--validation-split", dest="validation_split", type=float, default=None)
    p.add_argument("--partitions", type=int, default=None, help="repartition the data first")
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
