"""``spark.read.format("tfrecord")``: TFRecord files written by TensorFlow read back exactly.

The fixtures in ``tests/data/tfrecord/`` were written by TensorFlow 2.21.0 (``make_fixtures.py``
there); ``expected.json`` is what TensorFlow itself parses from them. TensorFlow is not needed
here.
"""
import base64
import json
import os
import shutil
import struct

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("google.protobuf", reason="the tfrecord extra (protobuf) is not installed")
pytest.importorskip("google_crc32c", reason="the tfrecord extra (google-crc32c) is not installed")

from rddtensor import layers as L  # noqa: E402
from rddtensor.optim import Adam  # noqa: E402
from rddtensor.spark import tfrecord  # noqa: E402
from rddtensor.spark.columns import decode_value  # noqa: E402

pytestmark = pytest.mark.spark

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tfrecord")
PLAIN, GZIP = "examples.tfrecord", "examples.tfrecord.gz"
with open(os.path.join(DATA, "expected.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
INFERRED = ("struct<big:bigint,blobs:array<binary>,features:array<float>,image/encoded:binary,"
            "image/format:binary,label:bigint,name:binary,score:float,tokens:array<bigint>,"
            "weight:float>")


@pytest.fixture(scope="module")
def tf_spark(spark):
    tfrecord.register(spark)
    return spark


def read(spark, path, schema=None, **options):
    reader = spark.read.format("tfrecord").options(**options)
    return (reader.schema(schema) if schema else reader).load(path)


def expected_column(file, feature):
    """TensorFlow's values of ``feature`` in ``file``, as numpy / bytes; ``None`` where missing."""
    kind = EXPECTED["files"][file]["kinds"][feature]
    out = []
    for v in EXPECTED["files"][file]["values"][feature]:
        if v is None:
            out.append(None)
        elif kind == "bytes_list":
            out.append([base64.b64decode(b) for b in v])
        elif kind == "float_list":
            out.append(np.array([float(x) for x in v], np.float32))  # "nan", "inf" too
        else:
            out.append(np.array(v, np.int64))
    return kind, out


def same_float32(a, b):
    """Bit for bit: -0.0 is not 0.0, NaN is NaN."""
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                          np.asarray(b, np.float32).view(np.uint32))


# --- batch reads --------------------------------------------------------------------------------
def test_schema_is_inferred_from_the_features(tf_spark):
    assert EXPECTED["tensorflow_version"] == "2.21.0"
    df = read(tf_spark, os.path.join(DATA, PLAIN))
    assert df.schema.simpleString() == INFERRED
    assert df.rdd.getNumPartitions() == 1


@pytest.mark.parametrize("file", [PLAIN, GZIP])
def test_values_and_dtypes_read_back_exactly(tf_spark, file):
    table = read(tf_spark, os.path.join(DATA, file)).toArrow()
    assert table.num_rows == EXPECTED["files"][file]["num_records"]
    numpy_dtype = {"int64": np.int64, "float32": np.float32}
    for feature, tf_dtype in EXPECTED["files"][file]["dtypes"].items():
        kind, want = expected_column(file, feature)
        col = table.column(feature).combine_chunks()
        is_list = pa.types.is_list(col.type)
        assert [v is None for v in col.to_pylist()] == [w is None for w in want], feature
        for row, w in enumerate(want):
            if w is None:
                continue
            values = col[row].values if is_list else col.slice(row, 1)
            if kind == "bytes_list":
                assert tf_dtype == "string" and values.to_pylist() == w, (feature, row)
                continue
            got = values.to_numpy(zero_copy_only=False)  # the stored dtype, not a cast
            assert got.dtype == numpy_dtype[tf_dtype], (feature, got.dtype)
            same = same_float32 if kind == "float_list" else np.array_equal
            assert same(got, w), (feature, row, got, w)
    assert not pa.types.is_list(table.schema.field("label").type)
    assert pa.types.is_list(table.schema.field("tokens").type)
    if file == PLAIN:
        assert table.column("big").to_pylist()[:3] == [-2**63, 2**63 - 1, 2**53 + 1]


def test_missing_feature_is_null(tf_spark):
    rows = read(tf_spark, os.path.join(DATA, "*.tfrecord*")).select("name", "weight").collect()
    missing = sorted(r.name.decode() for r in rows if r.weight is None)
    assert missing == ["record-05", "record-50"]
    assert len(rows) == 64


def test_user_schema_converts_and_projects(tf_spark):
    schema = ("label int, `image/format` string, name string, features array<double>, "
              "weight double, tokens array<bigint>, absent bigint")
    rows = read(tf_spark, os.path.join(DATA, PLAIN), schema).collect()
    assert rows[7].name == "record-07-é"
    assert rows[0]["image/format"] == "png" and rows[4].label == 1
    _, features = expected_column(PLAIN, "features")
    assert np.array_equal(np.array(rows[3].features), features[3].astype(np.float64))
    assert rows[5].weight is None and rows[6].weight == 0.5 + 0.25 * 2
    assert rows[0].tokens == [] and rows[3].tokens == [300, 301, 302]
    assert all(r.absent is None for r in rows)


# --- errors -------------------------------------------------------------------------------------
def test_feature_of_another_kind_names_column_and_file(tf_spark):
    with pytest.raises(Exception, match=r"examples\.tfrecord: record 0 \(byte offset 0\): "
                                        r"feature 'label' is an int64_list, but column 'label' "
                                        r"is float"):
        read(tf_spark, os.path.join(DATA, PLAIN), "label float").collect()
    with pytest.raises(Exception, match=r"examples\.tfrecord: record 2 .*feature 'tokens' has 2 "
                                        r"values, but column 'tokens' is a scalar bigint; read "
                                        r"it as array<bigint>"):
        read(tf_spark, os.path.join(DATA, PLAIN), "tokens bigint").collect()
    with pytest.raises(Exception, match=r"column 'big' \(int8\) cannot hold a value"):
        read(tf_spark, os.path.join(DATA, PLAIN), "big tinyint").select("big").collect()
    with pytest.raises(Exception, match=r"column 'when' has type timestamp"):
        read(tf_spark, os.path.join(DATA, PLAIN), "when timestamp").collect()


def _record_offsets(data):
    offsets, at = [], 0
    while at < len(data):
        offsets.append(at)
        at += 16 + struct.unpack_from("<Q", data, at)[0]
    return offsets


def test_corrupt_and_truncated_files_name_file_and_offset(tf_spark, tmp_path):
    data = open(os.path.join(DATA, PLAIN), "rb").read()
    offsets = _record_offsets(data)
    png = data.index(b"IDAT", offsets[3])  # a byte inside record 3's PNG
    damaged = bytearray(data)
    damaged[png + 8] ^= 0xFF
    bad = tmp_path / "damaged.tfrecord"
    bad.write_bytes(bytes(damaged))
    message = (rf"damaged\.tfrecord: corrupt record at byte offset {offsets[3]}: the data's "
               rf"checksum does not match")
    with pytest.raises(Exception, match=message):  # in a task
        read(tf_spark, str(bad), "label bigint, `image/encoded` binary").collect()
    with pytest.raises(Exception, match=message):  # inferring the schema, on the driver
        read(tf_spark, str(bad))
    # without checksums the damaged PNG byte goes through: the Example itself still parses
    assert read(tf_spark, str(bad), "label bigint", verifyChecksums="false").count() == 48

    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(data[:-5])
    with pytest.raises(Exception, match=rf"cut\.tfrecord: truncated record at byte offset "
                                        rf"{offsets[-1]}"):
        read(tf_spark, str(cut), "label bigint").collect()

    # a GZIP file read as uncompressed: the first length checksum fails
    with pytest.raises(Exception, match=r"examples\.tfrecord\.gz: corrupt record at byte offset 0"):
        read(tf_spark, os.path.join(DATA, GZIP), "label bigint", compression="NONE").collect()


def test_directories_globs_and_gzip_without_extension(tf_spark, tmp_path):
    shutil.copy(os.path.join(DATA, PLAIN), tmp_path / "part-00000")
    (tmp_path / "sub").mkdir()
    shutil.copy(os.path.join(DATA, PLAIN), tmp_path / "sub" / "part-00001")
    for skipped in ("_SUCCESS", ".part-00000.crc"):  # not TFRecord: reading them would fail
        (tmp_path / skipped).write_bytes(b"not a record")
    df = read(tf_spark, str(tmp_path), "name binary")
    assert df.count() == 48 and df.rdd.getNumPartitions() == 1
    df = read(tf_spark, str(tmp_path), "name binary", recursiveFileLookup="true")
    assert df.count() == 96 and df.rdd.getNumPartitions() == 2
    assert read(tf_spark, str(tmp_path / "*" / "part-*"), "name binary").count() == 48
    shutil.copy(os.path.join(DATA, GZIP), tmp_path / "sub" / "part-00002")
    assert read(tf_spark, str(tmp_path / "sub" / "part-00002"), "label bigint",
                compression="GZIP").count() == 16


# --- streaming ----------------------------------------------------------------------------------
def test_stream_picks_up_files_added_later(tf_spark, tmp_path):
    incoming, checkpoint = tmp_path / "incoming", tmp_path / "checkpoint"
    incoming.mkdir()
    shutil.copy(os.path.join(DATA, PLAIN), incoming / "a.tfrecord")
    batches = []

    def run():
        stream = tf_spark.readStream.format("tfrecord").load(str(incoming))  # schema inferred
        q = (stream.writeStream.trigger(availableNow=True)
             .option("checkpointLocation", str(checkpoint))
             .foreachBatch(lambda df, i: batches.append((i, df.collect()))).start())
        try:
            assert q.awaitTermination(120), "the availableNow query did not finish"
        finally:
            q.stop()
        return stream

    stream = run()
    assert stream.schema.simpleString() == INFERRED
    first = [r for i, rows in batches for r in rows]
    assert [r.name for r in first] == [r.name for r in
                                       read(tf_spark, os.path.join(DATA, PLAIN)).collect()]
    # a second file appears (written elsewhere, moved in complete); the query resumes from its
    # checkpoint and reads only the new file, decompressing it by its name
    shutil.copy(os.path.join(DATA, GZIP), tmp_path / "b.tfrecord.gz")
    os.rename(tmp_path / "b.tfrecord.gz", incoming / "b.tfrecord.gz")
    batches.clear()
    run()
    second = [r for i, rows in batches for r in rows]
    assert sorted(r.name.decode() for r in second) == [f"record-{i}" for i in range(48, 64)]
    _, labels = expected_column(GZIP, "label")
    assert [r.label for r in second] == [int(v[0]) for v in labels]


# --- images and training ------------------------------------------------------------------------
def test_png_bytes_decode_to_the_image_path(tf_spark):
    pytest.importorskip("PIL")
    df = tfrecord.decode_image_column(read(tf_spark, os.path.join(DATA, PLAIN)), "image/encoded")
    from pyspark.ml.image import ImageSchema
    assert df.schema["image"].dataType == ImageSchema.columnSchema  # spark.read.format("image")'s
    rows = df.select("image", "label").collect()
    info = EXPECTED["files"][PLAIN]
    h, w, c = info["png_shape"]
    for row, png in zip(rows, info["decoded_png"]):
        rgb = np.frombuffer(base64.b64decode(png), np.uint8).reshape(h, w, c)  # tf.io.decode_png
        img = row.image
        assert (img.height, img.width, img.nChannels, img.mode) == (h, w, 3, 16)
        assert np.array_equal(np.frombuffer(img.data, np.uint8).reshape(h, w, c), rgb[..., ::-1])
        # rddtensor's own image decoding (what fit/transform use): NCHW float32 RGB in [0, 1]
        np.testing.assert_allclose(decode_value(img), rgb.transpose(2, 0, 1) / 255, rtol=0,
                                   atol=1e-7)


def test_train_on_tfrecord_images_end_to_end(tf_spark):
    pytest.importorskip("PIL")
    df = read(tf_spark, os.path.join(DATA, "*.tfrecord*"), "label bigint, `image/encoded` binary")
    df = tfrecord.decode_image_column(df, "image/encoded").select("image", "label").cache()
    model = L.Sequential([L.Conv2D(4, 3, padding="same", activation="relu", input_shape=(3, 4, 4)),
                          L.Flatten(), L.Dense(3)], seed=0)
    model.compile(optimizer=Adam(0.03), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(df, features_col="image", label_col="label", epochs=2, batch_size=16,
                        verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < 0.3 * loss[0], loss
    assert model.evaluate(df.withColumnRenamed("image", "features"))["accuracy"] >= 0.95
    df.unpersist()
