"""Data on disk to a training-ready DataFrame, through Spark's own readers.

``read_dataset(spark, path, fmt)`` returns ``(df, features_col)``: ``df`` has a features column
(a vector, or an image struct) and, when the data has one, a numeric ``label`` column. Formats:

- ``parquet``: a vector/array features column as is, or numeric columns assembled into a vector;
- ``csv`` (header row, types inferred): numeric columns assembled (``VectorAssembler``);
- ``libsvm``: Spark's libsvm source (sparse vectors + label);
- ``image``: Spark's image source (PNG, JPEG, ... decoded by the JVM); the label is the name of
  each image's parent directory (``digits/3/img_0.png`` -> 3); non-numeric directory names map
  to their index in sorted order (``classes``).

Example:
    >>> df, col = read_dataset(spark, "data/train.csv", "csv", label="y")   # doctest: +SKIP
    >>> model.fit(df, features_col=col)                                      # doctest: +SKIP
"""
from __future__ import annotations

import os

FORMATS = ("parquet", "csv", "libsvm", "image")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_ASSEMBLED = "features"


def guess_format(path: str) -> str:
    """The format of ``path`` from its extension, or from the files in a directory."""
    names = [path]
    if os.path.isdir(path):
        names = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                 if not f.startswith((".", "_"))]
    exts = {os.path.splitext(n)[1].lower() for n in names}
    if exts & {".parquet"}:
        return "parquet"
    if exts & {".csv"}:
        return "csv"
    if exts & {".libsvm", ".svm"}:
        return "libsvm"
    if exts & set(IMAGE_EXTENSIONS):
        return "image"
    raise ValueError(f"cannot tell the format of {path!r} (file types {sorted(exts) or 'none'}): "
                     f"pass --format with one of {', '.join(FORMATS)}")


def read_dataset(spark, path: str, fmt: str | None = None, *, features=None,
                 label: str | None = "label", num_features: int | None = None,
                 classes=None):
    """Read ``path`` as ``(df, features_col, classes)``; see the module docstring.

    Args:
        fmt: one of ``FORMATS``, or ``None``/``"auto"`` to guess from the path.
        features: feature column names to assemble (default: every numeric column except the
            label), or the name of one vector/array column.
        label: the label column (``None``: no labels, e.g. for prediction). A missing label
            column is fine when reading data to predict on.
        num_features: libsvm feature count (default: Spark scans the data).
        classes: image class names in label order (from training) to label images by.

    Returns:
        ``(df, features_col, classes)``; ``classes`` is the image class names (else ``None``).
    """
    local = spark.sparkContext.master.startswith("local")  # else a path may name HDFS etc.
    if local and "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"no data at {path!r}")
    fmt = guess_format(path) if fmt in (None, "auto") else fmt
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (or auto), got {fmt!r}")
    if fmt == "image":
        return _images(spark, path, label, classes)
    if fmt == "libsvm":
        reader = spark.read.format("libsvm")
        if num_features:
            reader = reader.option("numFeatures", int(num_features))
        return reader.load(path), "features", None
    if fmt == "csv":
        df = spark.read.option("header", True).option("inferSchema", True).csv(path)
    else:
        df = spark.read.parquet(path)
    return (*assemble(df, features, label), None)


def assemble(df, features=None, label: str | None = "label"):
    """``(df, features_col)`` with the features as one vector column (see ``read_dataset``);
    ``label`` may be a list (one label column per output of a model): none is a feature."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, NumericType
    types = {f.name: f.dataType for f in df.schema.fields}
    if isinstance(features, str):
        features = [features]
    if features is None:
        if _ASSEMBLED in types and isinstance(types[_ASSEMBLED], (VectorUDT, ArrayType)):
            features = [_ASSEMBLED]
        else:
            labels = set(label) if isinstance(label, (list, tuple)) else {label}
            features = [c for c, t in types.items() if c not in labels and
                        isinstance(t, NumericType)]
            if not features:
                raise ValueError(f"no numeric feature columns besides the label {label!r}; "
                                 f"columns are {list(types)}")
    missing = [c for c in features if c not in types]
    if missing:
        raise ValueError(f"feature column {missing[0]!r} is not in the data; columns are "
                         f"{list(types)}")
    if len(features) == 1 and isinstance(types[features[0]], (VectorUDT, ArrayType)):
        return df, features[0]
    bad = [c for c in features if not isinstance(types[c], NumericType)]
    if bad:
        raise ValueError(f"feature column {bad[0]!r} has type {types[bad[0]].simpleString()}, "
                         "not a number: list the numeric feature columns in the config "
                         "(\"data\": {\"features\": [...]}), or encode it first")
    out = _ASSEMBLED if _ASSEMBLED not in types else "__features"
    return VectorAssembler(inputCols=list(features), outputCol=out,
                           handleInvalid="error").transform(df), out


def _images(spark, path, label, classes):
    from pyspark.sql import functions as F
    df = (spark.read.format("image").option("dropInvalid", True)
          .option("recursiveFileLookup", True).load(path))
    if label is None:
        return df, "image", classes
    parent = F.element_at(F.split(F.col("image.origin"), "/"), -2)
    if classes is None:
        names = sorted(r[0] for r in df.select(parent).distinct().collect())
        if not names:
            raise ValueError(f"no readable images under {path!r}")
        classes = names if not all(n.isdigit() for n in names) else None
    if classes is None:
        return df.withColumn(label, parent.cast("double")), "image", None
    mapping = F.create_map(*[x for i, c in enumerate(classes) for x in (F.lit(c), F.lit(float(i)))])
    return df.withColumn(label, mapping[parent]), "image", list(classes)
