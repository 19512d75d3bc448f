"""Saving and loading fitted models: ``MLWriter`` / ``MLReader`` for ``NNModel``.

A saved model is a directory::

    path/metadata/     Spark ML's JSON metadata (class, uid, Params such as featuresCol /
                       featuresCols, training history)
    path/network/      the network as ``rddtensor.layers.Sequential.save`` writes it:
                       model.json (architecture, loss) + weights.npz

Nothing is pickled: metadata and config are JSON, weights load with ``allow_pickle=False``, so
loading an untrusted directory cannot run code. ``PipelineModel.save`` / ``load`` call these for
an NN stage like for any other Python stage. Paths without a scheme are local directories; a
path with one (``hdfs://``, ``s3a://``, ``file:``) goes through Hadoop's FileSystem, which
copies the network directory from or to a local temporary directory. On a Spark Connect session
(no SparkContext, no JVM here) ``load`` reads the metadata and the network's files through the
server (``spark.read``), so any path the server reads works; saving needs a classic session.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from urllib.parse import urlparse

from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReader, MLWriter

from rddtensor.spark.connect import is_connect_session
from rddtensor.training.models import load_model
from rddtensor.version import __version__


def _is_local(path: str) -> bool:
    return urlparse(path).scheme == ""


def _hadoop(sc, path: str):
    p = sc._jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(sc._jsc.hadoopConfiguration()), p


def _exists(sc, path: str) -> bool:
    if _is_local(path):
        return os.path.exists(path)
    fs, p = _hadoop(sc, path)
    return bool(fs.exists(p))


def save_network(model, path: str, sc) -> None:
    """Write a built ``Sequential`` (without optimizer state) to ``path``, local or Hadoop."""
    if _is_local(path):
        model.save(path, include_optimizer=False)
        return
    tmp = tempfile.mkdtemp(prefix="rddtensor-save-")
    try:
        model.save(os.path.join(tmp, "network"), include_optimizer=False)
        fs, dst = _hadoop(sc, path)
        fs.copyFromLocalFile(False, True, sc._jvm.org.apache.hadoop.fs.Path(
            "file://" + os.path.join(tmp, "network")), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_through_spark(spark, path: str, local: str) -> None:
    """Copy the files of directory ``path`` into ``local`` with Spark's ``binaryFile`` source:
    read where the session reads (a Spark Connect server), whatever the filesystem."""
    try:
        rows = spark.read.format("binaryFile").load(path).select("path", "content").collect()
    except Exception as e:  # (AnalysisException: PATH_NOT_FOUND)
        if "PATH_NOT_FOUND" in str(e) or "does not exist" in str(e):
            raise FileNotFoundError(f"no network directory at {path!r}") from None
        raise
    if not rows:
        raise FileNotFoundError(f"no network directory at {path!r} (no files in it)")
    os.makedirs(local)
    for row in rows:
        name = os.path.basename(urlparse(row.path).path)
        with open(os.path.join(local, name), "wb") as f:
            f.write(row.content)


def load_network(path: str, spark):
    """Read a network written by ``save_network`` (validated; never unpickles).

    On a Spark Connect session the files come through the server (``binaryFile``), as the
    metadata does: no SparkContext or JVM on this side.
    """
    remote = is_connect_session(spark)
    if _is_local(path) and not remote:
        return load_model(path)
    tmp = tempfile.mkdtemp(prefix="rddtensor-load-")
    try:
        local = os.path.join(tmp, "network")
        if remote:
            _fetch_through_spark(spark, path, local)
            return load_model(local)
        sc = spark.sparkContext
        fs, src = _hadoop(sc, path)
        if not fs.exists(src):
            raise FileNotFoundError(f"no network directory at {path!r}")
        fs.copyToLocalFile(False, src, sc._jvm.org.apache.hadoop.fs.Path("file://" + local),
                           True)
        return load_model(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class NNModelWriter(MLWriter):
    """Writes an ``NNModel``: Spark ML metadata (with the training history) + the network."""

    def __init__(self, instance):
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        if is_connect_session(self.sparkSession):
            raise NotImplementedError(
                f"saving a {type(self.instance).__name__} from a Spark Connect session is not "
                "supported: its network files (model.json, weights.npz) are written through the "
                "driver's Hadoop FileSystem, which a Connect client does not have. Save it from "
                "the classic session it was trained on, or save the network alone with "
                "model.network.save(local_dir)")
        super().save(path)

    def saveImpl(self, path: str) -> None:
        if not self.shouldOverwrite and _exists(self.sc, path):
            raise FileExistsError(f"path {path!r} already exists; use "
                                  "model.write().overwrite().save(path) to replace it")
        DefaultParamsWriter.saveMetadata(
            self.instance, path, self.sc,
            extraMetadata={"history": self.instance.history, "rddtensorVersion": __version__})
        save_network(self.instance.network, os.path.join(path, "network"), self.sc)


class NNModelReader(MLReader):
    """Reads what ``NNModelWriter`` wrote, as the class named in its metadata."""

    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def _metadata(self, path: str) -> dict:
        if is_connect_session(self.sparkSession):
            # (no SparkContext there, and PySpark < 4 reads the file with sc.textFile)
            row = self.sparkSession.read.text(os.path.join(path, "metadata")).first()
            return json.loads(row[0])
        return DefaultParamsReader.loadMetadata(path, self.sc)

    def load(self, path: str):
        metadata = self._metadata(path)
        cls = _model_class(metadata["class"], self.cls)
        instance = cls()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        instance._set_network(load_network(os.path.join(path, "network"), self.sparkSession))
        instance.history = metadata.get("history", {})
        return instance


def _family(cls):
    """``cls`` and its subclasses, recursively."""
    yield cls
    for sub in cls.__subclasses__():
        yield from _family(sub)


def _model_class(name: str, requested):
    """The class ``name`` among ``requested`` and its subclasses (``NNModel.load`` reads an
    ``NNClassificationModel``; the reverse is refused)."""
    found = {c.__module__ + "." + c.__name__: c for c in _family(requested)}
    cls = found.get(name)
    if cls is None or not issubclass(cls, requested):
        raise ValueError(f"the saved stage is a {name}, not an {requested.__name__}; load it "
                         "with its own class (or PipelineModel.load for a whole pipeline)")
    return cls
