"""Writes the TFRecord fixtures of ``tests/test_tfrecord.py`` with TensorFlow's own writer.

Made with TensorFlow 2.21.0 (tensorflow-cpu 2.21.0, protobuf 7.36.2, Python 3.11) in a separate
virtual environment; TensorFlow is never needed at test time::

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfvenv/bin/python tests/data/tfrecord/make_fixtures.py

Writes, next to this script:

- ``examples.tfrecord``: 48 ``tf.train.Example`` records, uncompressed;
- ``examples.tfrecord.gz``: 16 more records with the same features, GZIP-compressed;
- ``expected.json``: what TensorFlow reads back from both files (``tf.data.TFRecordDataset`` +
  ``tf.io.parse_single_example``, cross-checked against ``tf.train.Example.FromString``), with
  each feature's kind and each PNG decoded by ``tf.io.decode_png`` (HWC uint8 bytes, base64).
  The tests compare against this file, not against the values this script meant to write.

The features (record ``i`` over both files, ``label = i % 3``):

- ``label``: int64, one value; ``features``: 4 floats, class-dependent (learnable);
- ``image/encoded``: a 4x4 RGB PNG (``tf.io.encode_png``) whose ``label``-th channel is bright;
  ``image/format``: ``b"png"``;
- ``name``: UTF-8 text (one non-ASCII); ``blobs``: 1 or 2 raw byte strings (NUL and 0xFF bytes);
- ``tokens``: int64 list of length ``i % 4`` (0 to 3 values: an empty list is present, not missing);
- ``big``: int64 extremes (-2**63, 2**63 - 1, 2**53 + 1, ...); ``score``: float32 specials
  (-0.0, inf, -inf, NaN, subnormal, max float32, 0.1);
- ``weight``: one float, *missing* in records 5 and 50.
"""
import base64
import json
import os
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
BIG = [-2**63, 2**63 - 1, 2**53 + 1, -1, 0]
SCORE = [0.1, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4028234663852886e38]
MISSING_WEIGHT = {5, 50}
KINDS = {"bytes_list": tf.string, "float_list": tf.float32, "int64_list": tf.int64}


def _int64(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def example(i, rng):
    label = i % 3
    features = np.zeros(4, np.float32)
    features[label] = 1.0
    features += rng.normal(0.0, 0.3, 4).astype(np.float32)
    pixels = rng.integers(0, 60, (4, 4, 3)).astype(np.uint8)
    pixels[:, :, label] += 180
    feats = {
        "label": _int64([label]),
        "features": _float(features.tolist()),
        "image/encoded": _bytes([tf.io.encode_png(pixels).numpy()]),
        "image/format": _bytes([b"png"]),
        "name": _bytes([(f"record-{i:02d}" + ("-é" if i == 7 else "")).encode("utf-8")]),
        "blobs": _bytes([bytes([0, 255, i])] + ([b"second"] if i % 2 else [])),
        "tokens": _int64([100 * i + k for k in range(i % 4)]),
        "big": _int64([BIG[i % len(BIG)]]),
        "score": _float([SCORE[i % len(SCORE)]]),
    }
    if i not in MISSING_WEIGHT:
        feats["weight"] = _float([0.5 + 0.25 * (i % 4)])
    return tf.train.Example(features=tf.train.Features(feature=feats))


def _json_value(kind, values):
    """Exact JSON: ints as ints, float32 values as the doubles they widen to, bytes as base64."""
    if kind == "bytes_list":
        return [base64.b64encode(v).decode("ascii") for v in values]
    if kind == "float_list":
        return [float(v) if np.isfinite(v) else repr(float(v)) for v in values]  # "nan", "inf"
    return [int(v) for v in values]


def read_back(path, compression):
    """What TensorFlow parses from ``path``, column-wise: ``{"kinds": {feature: kind}, "dtypes":
    {feature: TF dtype}, "values": {feature: [per record: list of values, or None if missing]},
    "decoded_png": [per record: base64 of the decoded HWC uint8 pixels], "png_shape": ...}``."""
    rows = []
    out = {"kinds": {}, "dtypes": {}, "decoded_png": []}
    for raw in tf.data.TFRecordDataset(path, compression_type=compression):
        proto = tf.train.Example.FromString(raw.numpy())
        kinds = {k: f.WhichOneof("kind") for k, f in proto.features.feature.items()}
        spec = {k: tf.io.VarLenFeature(KINDS[kind]) for k, kind in kinds.items()}
        parsed = tf.io.parse_single_example(raw, spec)
        row = {}
        for key, kind in kinds.items():
            assert out["kinds"].setdefault(key, kind) == kind, key
            tensor = tf.sparse.to_dense(parsed[key])
            assert out["dtypes"].setdefault(key, tensor.dtype.name) == tensor.dtype.name, key
            values = tensor.numpy().tolist()
            again = list(getattr(proto.features.feature[key], kind).value)
            obj = object if kind == "bytes_list" else None
            assert np.array_equal(np.asarray(values, dtype=obj), np.asarray(again, dtype=obj),
                                  equal_nan=kind == "float_list"), key
            row[key] = _json_value(kind, values)
        rows.append(row)
        png = tf.io.decode_png(proto.features.feature["image/encoded"].bytes_list.value[0])
        out["png_shape"] = list(png.shape)
        out["decoded_png"].append(base64.b64encode(png.numpy().tobytes()).decode("ascii"))
    out["values"] = {key: [row.get(key) for row in rows] for key in sorted(out["kinds"])}
    out["num_records"] = len(rows)
    return out


def main():
    rng = np.random.default_rng(16)
    files = [("examples.tfrecord", "", range(0, 48)),
             ("examples.tfrecord.gz", "GZIP", range(48, 64))]
    expected = {"tensorflow_version": tf.__version__, "files": {}}
    for name, compression, indices in files:
        path = os.path.join(HERE, name)
        with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type=compression)) as w:
            for i in indices:
                w.write(example(i, rng).SerializeToString())
        expected["files"][name] = read_back(path, compression)
        print(f"{name}: {len(indices)} records, {os.path.getsize(path)} bytes", file=sys.stderr)
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=None, separators=(",", ":"), sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
