"""TFRecord files of ``tf.train.Example`` records as a Spark data source (no TensorFlow needed).

A PySpark Python Data Source (Spark >= 4.0), batch and streaming::

    from rddtensor.spark import tfrecord
    tfrecord.register(spark)
    df = spark.read.format("tfrecord").load("data/train-*.tfrecord")       # schema inferred
    df = (spark.read.format("tfrecord").schema("label bigint, `image/encoded` binary")
          .option("compression", "GZIP").load("data/"))                     # schema given
    images = tfrecord.decode_image_column(df, "image/encoded")              # -> image struct
    model.fit(images, features_col="image", label_col="label")
    stream = spark.readStream.format("tfrecord").schema(df.schema).load("incoming/")

Each feature becomes the column of its name: ``int64_list`` -> ``bigint``, ``float_list`` ->
``float``, ``bytes_list`` -> ``binary``; an ``array<...>`` of those unless every sampled record
holds exactly one value. A given schema may also read ``int``/``smallint``/``tinyint`` (range
checked), ``double`` (exact) or ``string`` (UTF-8), scalars or arrays. A feature missing from a
record (or an empty list in a scalar column) is null; a record whose feature has another kind
than its column, or several values in a scalar column, is an error naming the feature, the file
and the record. Values are exact: int64 as stored, float32 as stored.

Options: ``path`` (a file, a directory or a glob; any ``pyarrow.fs`` URI such as ``s3://``),
``compression`` (``auto``: GZIP for ``.gz``/``.gzip`` names; ``GZIP``; ``NONE``),
``verifyChecksums`` (``true``: each record's masked CRC32C is checked, a mismatch or a cut-off
record is an error naming the file and byte offset), ``pathGlobFilter`` (file names to keep in a
directory, e.g. ``*.tfrecord``), ``recursiveFileLookup`` (``false``), ``samplingRecords``
(``1000``: records read from the first files to infer a schema), ``batchSize`` (``1024``
records per Arrow batch). Files whose names start with ``.`` or ``_`` are skipped in directories.

One partition per file: TFRecord framing has no sync markers, so a file cannot be cut without
reading it. The framing (``uint64`` length, masked CRC32C of the length, data, masked CRC32C of
the data) is read here; the CRC32C is ``google-crc32c``, the records are parsed by the official
``protobuf`` runtime with a ``tf.train.Example`` descriptor built below (in a private pool, so
TensorFlow may be imported in the same process).
"""
from __future__ import annotations

import io
import os
import posixpath
import struct
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
from pyspark.sql import functions as F
from pyspark.sql.datasource import (DataSource, DataSourceReader, DataSourceStreamReader,
                                    InputPartition)
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (ArrayType, BinaryType, ByteType, DoubleType, FloatType,
                               IntegerType, LongType, ShortType, StringType, StructField,
                               StructType)

try:
    import google_crc32c
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.message import DecodeError
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("rddtensor.spark.tfrecord needs protobuf and google-crc32c: "
                      "pip install 'rddtensor[tfrecord]'") from e
try:  # only decode_image_column needs Pillow
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

__all__ = ["TFRecordDataSource", "register", "read_records", "infer_schema",
           "decode_image_column", "TFRecordError"]

#: Spark types each ``tf.train.Feature`` kind may be read into (scalars, or arrays of them)
READABLE = {"int64_list": (LongType, IntegerType, ShortType, ByteType),
            "float_list": (FloatType, DoubleType),
            "bytes_list": (BinaryType, StringType)}
_INFERRED = {"int64_list": LongType, "float_list": FloatType, "bytes_list": BinaryType}
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MAX_RECORD = 1 << 31  # protobuf messages are < 2 GiB: a larger length is a corrupt header


class TFRecordError(ValueError):
    """A file that is not valid TFRecord data (bad checksum, cut off, not an Example)."""


# --- tf.train.Example -------------------------------------------------------------------------
def _example_class():
    """``tensorflow.Example`` (tensorflow/core/example/{example,feature}.proto) as a message class.

    ``Example{Features features = 1}``, ``Features{map<string, Feature> feature = 1}``,
    ``Feature{oneof kind {BytesList bytes_list = 1; FloatList float_list = 2;
    Int64List int64_list = 3}}``, each list ``{repeated T value = 1}`` (packed numbers).
    """
    T = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="rddtensor/tf_example.proto",
                                               package="tensorflow", syntax="proto3")

    def field(msg, name, number, ftype, *, repeated=False, type_name="", oneof=None):
        f = msg.field.add(name=name, number=number, type=ftype,
                          label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL)
        if type_name:
            f.type_name = f".tensorflow.{type_name}"
        if oneof is not None:
            f.oneof_index = oneof
        return f

    for name, ftype in [("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT),
                        ("Int64List", T.TYPE_INT64)]:
        field(proto.message_type.add(name=name), "value", 1, ftype, repeated=True)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate([("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                           ("int64_list", "Int64List")], 1):
        field(feature, name, number, T.TYPE_MESSAGE, type_name=kind, oneof=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, T.TYPE_STRING)
    field(entry, "value", 2, T.TYPE_MESSAGE, type_name="Feature")
    field(features, "feature", 1, T.TYPE_MESSAGE, repeated=True,
          type_name="Features.FeatureEntry")
    field(proto.message_type.add(name="Example"), "features", 1, T.TYPE_MESSAGE,
          type_name="Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


# --- files and framing ------------------------------------------------------------------------
def _filesystem(path: str):
    """``(pyarrow filesystem, path in it)`` for a URI (``s3://...``, ``file://...``) or a path."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _option(options, name, default):
    """Option ``name`` (Spark's options are case-insensitive: the readers keep them lowercased)."""
    value = options.get(name.lower())
    return default if value is None else value


def _flag(options, name, default: bool) -> bool:
    value = str(_option(options, name, default)).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"tfrecord option {name}={value!r}: expected true or false")
    return value == "true"


def _number(options, name, default: int) -> int:
    value = _option(options, name, default)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"tfrecord option {name}={value!r}: expected a positive integer")
    return n


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob(fs, path: str) -> list:
    """The paths matching ``path``, whose components may hold ``*``, ``?`` and ``[...]``: one
    directory listing per level that holds a pattern."""
    parts = PurePosixPath(path).parts
    first = next(i for i, part in enumerate(parts) if _has_glob(part))
    if first == 0:
        raise ValueError(f"tfrecord path {path!r}: the first path component cannot be a pattern")
    found = [str(PurePosixPath(*parts[:first]))]
    for part in parts[first:]:
        if not _has_glob(part):
            found = [posixpath.join(d, part) for d in found]
            continue
        dirs = [i.path for i in fs.get_file_info(found) if i.type == pafs.FileType.Directory]
        found = [i.path for d in dirs for i in fs.get_file_info(pafs.FileSelector(d))
                 if fnmatchcase(posixpath.basename(i.path), part)]
    return found


def list_files(fs, path: str, options) -> list:
    """The files ``path`` names, sorted: itself, a directory's files, or a glob's matches (and
    the files of the directories it matches). Names starting with ``.`` or ``_`` are skipped
    except where ``path`` names the file itself; ``pathGlobFilter`` filters names."""
    pattern = _option(options, "pathGlobFilter", None)
    recursive = _flag(options, "recursiveFileLookup", False)

    def wanted(name):
        name = posixpath.basename(name)
        return not name.startswith((".", "_")) and (pattern is None or fnmatchcase(name, pattern))

    def in_directory(directory):
        infos = fs.get_file_info(pafs.FileSelector(directory, recursive=recursive))
        return [i.path for i in infos if i.type == pafs.FileType.File and wanted(i.path)]

    if not _has_glob(path):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            return [path]
        return sorted(in_directory(path)) if kind == pafs.FileType.Directory else []
    files = []
    for info in fs.get_file_info(_glob(fs, path)):
        if info.type == pafs.FileType.Directory:
            files += in_directory(info.path)
        elif info.type == pafs.FileType.File and wanted(info.path):
            files.append(info.path)
    return sorted(set(files))


def _compression(path: str, options):
    value = str(_option(options, "compression", "auto")).strip().upper()
    if value == "AUTO":
        return "gzip" if path.lower().endswith((".gz", ".gzip")) else None
    if value in ("GZIP", "GZ"):
        return "gzip"
    if value in ("NONE", ""):
        return None
    raise ValueError(f"tfrecord option compression={value!r}: expected auto, GZIP or NONE "
                     "(ZLIB-compressed TFRecord files are not supported)")


def masked_crc32c(data) -> int:
    """TFRecord's masked CRC32C of ``data``: the CRC rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(stream, name: str = "<stream>", verify: bool = True):
    """``(byte offset, record bytes)`` for each record of a TFRecord ``stream`` (decompressed).

    Raises ``TFRecordError`` naming ``name`` and the record's byte offset when a checksum does
    not match (``verify``) or the stream ends inside a record.
    """
    offset = 0
    while True:
        header = stream.read(_HEADER.size)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise TFRecordError(f"{name}: truncated record at byte offset {offset}: "
                                f"{len(header)} of {_HEADER.size} header bytes")
        length, length_crc = _HEADER.unpack(header)
        if verify and masked_crc32c(header[:8]) != length_crc:
            raise TFRecordError(f"{name}: corrupt record at byte offset {offset}: the length's "
                                "checksum does not match (not a TFRecord file, or damaged)")
        if length >= _MAX_RECORD:
            raise TFRecordError(f"{name}: corrupt record at byte offset {offset}: "
                                f"implausible length {length}")
        data = stream.read(length)
        footer = stream.read(_FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            raise TFRecordError(f"{name}: truncated record at byte offset {offset}: the file "
                                f"ends inside a record of {length} bytes")
        if verify and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            raise TFRecordError(f"{name}: corrupt record at byte offset {offset}: the data's "
                                "checksum does not match")
        yield offset, data
        offset += _HEADER.size + length + _FOOTER.size


def _open(fs, path, options):
    return fs.open_input_stream(path, compression=_compression(path, options),
                                buffer_size=1 << 20)


def _examples(fs, path, options):
    """``(byte offset, Example)`` for each record of one file."""
    verify = _flag(options, "verifyChecksums", True)
    with _open(fs, path, options) as stream:
        for offset, data in read_records(stream, path, verify):
            try:
                yield offset, Example.FromString(data)
            except DecodeError as e:
                raise TFRecordError(f"{path}: the record at byte offset {offset} is not a "
                                    f"tf.train.Example ({e})") from None


# --- schema -----------------------------------------------------------------------------------
def infer_schema(fs, files, options) -> StructType:
    """Columns for the features of the first ``samplingRecords`` records of ``files``.

    Sorted by name; a feature is a scalar where every sampled record that has it holds exactly
    one value, else an array.
    """
    want = _number(options, "samplingRecords", 1000)
    kinds, scalar, seen = {}, {}, 0
    for path in files:
        for offset, example in _examples(fs, path, options):
            for key, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                if kind is None:
                    continue
                if kinds.setdefault(key, kind) != kind:
                    raise ValueError(f"{path}: feature {key!r} is {_a(kind)} in the record "
                                     f"at byte offset {offset} but {_a(kinds[key])} in earlier "
                                     "records: a feature must keep one kind")
                scalar[key] = scalar.get(key, True) and len(getattr(feature, kind).value) == 1
            seen += 1
            if seen >= want:
                break
        if seen >= want:
            break
    if not kinds:
        raise ValueError(f"no tf.train.Example features found in {list(files)[:3]} (no files, "
                         "or only empty records): give a schema, e.g. .schema('label bigint')")
    fields = []
    for key in sorted(kinds):
        t = _INFERRED[kinds[key]]()
        fields.append(StructField(key, t if scalar[key] else ArrayType(t, False), True))
    return StructType(fields)


def _plan(schema: StructType):
    """Per column: ``(name, kind it reads, is an array, leaf type)``; refuses other types."""
    plan = []
    for f in schema.fields:
        t = f.dataType
        leaf = t.elementType if isinstance(t, ArrayType) else t
        kind = next((k for k, types in READABLE.items() if isinstance(leaf, types)), None)
        if kind is None:
            allowed = ", ".join(c().simpleString() for ts in READABLE.values() for c in ts)
            raise ValueError(f"tfrecord column {f.name!r} has type {t.simpleString()}; columns "
                             f"must be one of {allowed}, or an array of one")
        plan.append((f.name, kind, isinstance(t, ArrayType), leaf))
    return plan


# --- reading ----------------------------------------------------------------------------------
def _a(kind):
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _cell(feature, name, kind, is_array, leaf, where):
    """One column's value for one record, or ``None`` when the feature is missing."""
    have = feature.WhichOneof("kind")
    if have is None:
        return None
    if have != kind:
        col_type = f"array<{leaf.simpleString()}>" if is_array else leaf.simpleString()
        fits = ", ".join(c().simpleString() for c in READABLE[have])
        raise ValueError(f"{where}: feature {name!r} is {_a(have)}, but column {name!r} is "
                         f"{col_type}, which reads {_a(kind)}; give the column a type that reads "
                         f"{_a(have)} ({fits}, or an array of one)")
    values = getattr(feature, kind).value
    if isinstance(leaf, StringType):
        try:
            values = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: feature {name!r} is not UTF-8 text ({e}); read column "
                             f"{name!r} as binary") from None
    if is_array:
        return list(values)
    if len(values) > 1:
        raise ValueError(f"{where}: feature {name!r} has {len(values)} values, but column "
                         f"{name!r} is a scalar {leaf.simpleString()}; read it as "
                         f"array<{leaf.simpleString()}>")
    return values[0] if values else None


def read_file(fs, path, schema: StructType, options):
    """One file's records as ``pyarrow.RecordBatch``es of ``schema``."""
    plan = _plan(schema)
    arrow = to_arrow_schema(schema, timezone="UTC")
    size = _number(options, "batchSize", 1024)
    columns = [[] for _ in plan]
    first = 0

    def batch(rows):
        arrays = []
        for (name, *_), values, field in zip(plan, columns, arrow):
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, OverflowError) as e:
                raise ValueError(f"{path}: records {first}..{first + rows - 1}: column {name!r} "
                                 f"({field.type}) cannot hold a value: {e}") from None
            values.clear()
        return pa.RecordBatch.from_arrays(arrays, schema=arrow)

    rows = 0
    for offset, example in _examples(fs, path, options):
        features = example.features.feature
        where = f"{path}: record {first + rows} (byte offset {offset})"
        for (name, kind, is_array, leaf), values in zip(plan, columns):
            values.append(_cell(features[name], name, kind, is_array, leaf, where)
                          if name in features else None)
        rows += 1
        if rows == size:
            yield batch(rows)
            first, rows = first + rows, 0
    if rows:
        yield batch(rows)


# --- the data source --------------------------------------------------------------------------
class TFRecordDataSource(DataSource):
    """``spark.read.format("tfrecord")`` and ``spark.readStream.format("tfrecord")``."""

    @classmethod
    def name(cls):
        return "tfrecord"

    def _path(self):
        path = self.options.get("path")
        if not path:
            raise ValueError("tfrecord: no path; use .load(path) or .option('path', ...)")
        return (path, *_filesystem(path))

    def schema(self):
        path, fs, fs_path = self._path()
        files = list_files(fs, fs_path, self.options)
        if not files:
            raise ValueError(f"tfrecord: no files at {path!r} to infer a schema from; give one, "
                             "e.g. .schema('label bigint, image binary, x array<float>')")
        return infer_schema(fs, files, self.options)

    def reader(self, schema):
        _plan(schema)  # refuse unreadable column types before any task starts
        return TFRecordReader(*self._path(), schema, self.options)

    def streamReader(self, schema):
        _plan(schema)
        return TFRecordStreamReader(*self._path(), schema, self.options)


class _Files:
    """What both readers share: the filesystem, the schema, the options, reading one file."""

    def __init__(self, path, fs, fs_path, schema, options):
        self.path, self.fs, self.fs_path = path, fs, fs_path
        self.schema = schema
        self.options = {k.lower(): v for k, v in options.items()}
        _compression("", self.options)  # refuse bad options on the driver, before any task
        _flag(self.options, "verifyChecksums", True)
        _number(self.options, "batchSize", 1024)

    def files(self):
        return list_files(self.fs, self.fs_path, self.options)

    def read(self, partition):
        return read_file(self.fs, partition.value, self.schema, self.options)


class TFRecordReader(_Files, DataSourceReader):
    """Batch reads: one partition per file."""

    def partitions(self):
        files = self.files()
        if not files:
            raise ValueError(f"tfrecord: no files at {self.path!r}")
        return [InputPartition(f) for f in files]


class TFRecordStreamReader(_Files, DataSourceStreamReader):
    """Streaming reads of a directory (or glob): each micro-batch reads the files that appeared
    since the last one. The offset is the sorted list of files seen; a file is read once, so
    write files elsewhere and move them in when complete."""

    def initialOffset(self):
        return {"files": []}

    def latestOffset(self, start=None, limit=None):
        # Spark >= 4.2 passes (start, limit), earlier versions nothing: either way every file
        # there now is the latest offset (no admission control: the whole backlog is one batch)
        return {"files": self.files()}

    def partitions(self, start, end):
        done = set(start["files"])
        return [InputPartition(f) for f in end["files"] if f not in done]

    def commit(self, end):
        pass


def register(spark):
    """Registers the ``tfrecord`` format with ``spark`` (a ``SparkSession``)."""
    spark.dataSource.register(TFRecordDataSource)


# --- images -----------------------------------------------------------------------------------
#: Spark's image struct (``pyspark.ml.image.ImageSchema.columnSchema``), built without a JVM
IMAGE_STRUCT = StructType([StructField("origin", StringType(), True),
                           *(StructField(n, IntegerType(), False)
                             for n in ("height", "width", "nChannels", "mode")),
                           StructField("data", BinaryType(), False)])
_OPENCV_MODES = {1: 0, 3: 16, 4: 24}  # channels -> CV_8UC1, CV_8UC3, CV_8UC4


def encoded_image_struct(data, origin=""):
    """Encoded image bytes (PNG, JPEG, ... anything Pillow opens) as an image-struct tuple, laid
    out as ``spark.read.format("image")`` lays it out: 8-bit, row-major HWC, BGR(A) channels;
    grayscale stays one channel, images with an alpha channel or transparency get four. Images
    of more than 8 bits per channel are refused, as rddtensor's image path refuses them."""
    if data is None:
        return None
    if Image is None:
        raise ImportError("decoding images needs Pillow: pip install pillow")
    with Image.open(io.BytesIO(bytes(data))) as img:
        if img.mode.startswith(("I", "F")):
            raise ValueError(f"image {origin!r}: mode {img.mode} ({img.format}) is not an 8-bit "
                             "image; only 8-bit images are supported")
        alpha = "A" in img.getbands() or "transparency" in img.info
        gray = not alpha and img.mode in ("1", "L")
        mode = "L" if gray else "RGBA" if alpha else "RGB"
        raw, height, width = img.convert(mode).tobytes(), img.height, img.width
    channels = len(mode)
    if channels >= 3:  # RGB(A) -> BGR(A)
        pixels = bytearray(raw)
        pixels[0::channels], pixels[2::channels] = raw[2::channels], raw[0::channels]
        raw = bytes(pixels)
    return origin, height, width, channels, _OPENCV_MODES[channels], raw


def decode_image_column(df, col: str, output_col: str = "image", origin_col: str | None = None):
    """``df`` with ``output_col`` added: the encoded image bytes of column ``col`` decoded (on
    the executors, with Pillow) into Spark's image struct, the column type that
    ``model.fit(df, features_col=output_col)`` and ``NNModel.transform`` already decode to NCHW
    float32 in ``[0, 1]``, RGB. A null ``col`` gives a null image; bytes that are not an image
    fail the task with Pillow's error."""
    if Image is None:
        raise ImportError("decode_image_column needs Pillow: pip install pillow")
    decode = F.udf(encoded_image_struct, IMAGE_STRUCT)
    origin = F.col(origin_col).cast("string") if origin_col else F.lit("")
    return df.withColumn(output_col, decode(F.col(col), origin))
