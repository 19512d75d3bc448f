"""The executor-local data store (rddtensor.spark.datastore): streaming writes of named arrays to
memory-mappable .npy files, reads of arbitrary rows, the manifest, tokens and misses. No Spark."""
import os
import tracemalloc

import numpy as np
import pytest

from rddtensor.spark import datastore as ds
from rddtensor.spark import wire
from rddtensor.spark.datastore import (HEADER_BYTES, MISS, ArraySpec, PartitionReader, PartitionWriter,
                                 StoreMiss)


def _chunks(n, sizes, seed=0):
    """``n`` rows of four named arrays (2-d float features, 3-d uint8 images, int64 labels,
    float32 weights), cut into chunks of the given sizes (cycled)."""
    rng = np.random.default_rng(seed)
    full = {"x": rng.standard_normal((n, 7)).astype(np.float32),
            "image": rng.integers(0, 256, (n, 2, 3, 4), dtype=np.uint8),
            "y": rng.integers(0, 10, n).astype(np.int64),
            "sample_weight": rng.random(n).astype(np.float32)}
    out, a, i = [], 0, 0
    while a < n:
        b = min(n, a + sizes[i % len(sizes)])
        out.append({k: v[a:b] for k, v in full.items()})
        a, i = b, i + 1
    return full, out


def _write(directory, chunks, **kw):
    with PartitionWriter(directory, dataset=kw.pop("dataset", "d1"), part=kw.pop("part", 0),
                         **kw) as w:
        for c in chunks:
            w.append(c)
    return ds._load_manifest(directory)


def test_streamed_chunks_read_back_exactly(tmp_path):
    full, chunks = _chunks(1000, [1, 37, 256, 5])
    d = str(tmp_path / "p00000")
    m = _write(d, chunks)
    assert m.n == 1000 and m.names == ["x", "image", "y", "sample_weight"]
    r = PartitionReader.open(d)
    for name, ref in full.items():
        got = r.array(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
        assert not got.flags.writeable
    # the files are ordinary .npy files: numpy reads them (and maps them) too
    for name, ref in full.items():
        np.testing.assert_array_equal(np.load(os.path.join(d, f"{name}.npy")), ref)
        assert np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r").offset == HEADER_BYTES
    r.close()


def test_header_is_one_page_and_rows_start_page_aligned(tmp_path):
    full, chunks = _chunks(10, [10])
    d = str(tmp_path / "p")
    _write(d, chunks)
    path = os.path.join(d, "x.npy")
    assert os.path.getsize(path) == HEADER_BYTES + full["x"].nbytes
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    assert head.endswith(b"\n") and b"'shape': (10, 7)" in head
    assert HEADER_BYTES % 4096 == 0


def test_take_any_rows_in_any_order(tmp_path):
    full, chunks = _chunks(500, [64])
    d = str(tmp_path / "p")
    _write(d, chunks)
    rng = np.random.default_rng(1)
    with PartitionReader.open(d) as r:
        for rows in (rng.permutation(500)[:128], np.array([499, 0, 0, 250]), np.array([], int)):
            for name, ref in full.items():
                got = r.take(name, rows)
                np.testing.assert_array_equal(got, ref[rows])
                assert got.flags.writeable and got.flags.owndata  # a copy, not a view
        v = r.rows("x", 10, 20)
        np.testing.assert_array_equal(v, full["x"][10:20])
        assert not v.flags.writeable
        with pytest.raises(IndexError, match=r"\[0, 500\)"):
            r.take("x", [500])
        with pytest.raises(IndexError):
            r.take("x", [-1])
        with pytest.raises(KeyError, match="holds"):
            r.take("nope", [0])
        r.prefetch("x", 0, 100)  # advice only: nothing changes
        r.release()  # pages leave this process's RSS; the rows are still there
        np.testing.assert_array_equal(r.take("y", [3, 2]), full["y"][[3, 2]])


def test_same_data_in_other_chunks_has_the_same_fingerprint(tmp_path):
    """A rebuild from lineage may see other Arrow batch sizes: the check must not care."""
    full, a = _chunks(300, [300])
    _, b = _chunks(300, [1, 2, 97])
    ma, mb = _write(str(tmp_path / "a"), a), _write(str(tmp_path / "b"), b)
    assert ma.same_data(mb) and ma.fingerprints == mb.fingerprints
    _, c = _chunks(300, [300], seed=1)
    assert not ma.same_data(_write(str(tmp_path / "c"), c))


def test_empty_partition_needs_specs(tmp_path):
    d = str(tmp_path / "p")
    specs = (ArraySpec("x", "<f4", (3, 2)), ArraySpec("y", "<i8", ()))
    with PartitionWriter(d, dataset="d", part=4, specs=specs):
        pass
    with PartitionReader.open(d, dataset="d", part=4) as r:
        assert r.n == 0
        assert r.array("x").shape == (0, 3, 2) and r.array("x").dtype == np.float32
        assert r.take("y", []).shape == (0,)
    with pytest.raises(ValueError, match="give specs"):
        with PartitionWriter(str(tmp_path / "q"), dataset="d", part=0):
            pass


def test_bad_chunks_are_refused_with_the_array_named(tmp_path):
    w = PartitionWriter(str(tmp_path / "p"), dataset="d", part=2)
    w.append({"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match=r"'x'.*\(4,\), expected \(3,\).*row 2 of partition 2"):
        w.append({"x": np.zeros((1, 4), np.float32), "y": np.zeros(1, np.int64)})
    with pytest.raises(ValueError, match="same number of rows"):
        w.append({"x": np.zeros((1, 3), np.float32), "y": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match=r"arrays \['x'\]"):
        w.append({"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(ValueError, match="'x': dtype float64 cannot be stored as float32"):
        w.append({"x": np.zeros((1, 3)), "y": np.zeros(1, np.int64)})
    w.append({"x": np.zeros((1, 3), np.float32), "y": np.zeros(1, np.int32)})  # int32 fits
    assert w.finish().n == 3
    with pytest.raises(ValueError, match="object"):
        PartitionWriter(str(tmp_path / "o"), dataset="d", part=0).append(
            {"x": np.array([None, 1], dtype=object)})
    for bad in ("", "../x", ".hidden", " x"):
        with pytest.raises(ValueError, match="array name"):
            ArraySpec.of(bad, np.zeros(1))


def test_a_failed_build_leaves_nothing(tmp_path):
    d = tmp_path / "run" / "ds" / "p00000"
    with pytest.raises(RuntimeError, match="boom"):
        with PartitionWriter(str(d), dataset="d", part=0) as w:
            w.append({"x": np.zeros((4, 2), np.float32)})
            raise RuntimeError("boom")
    assert not d.exists()
    assert os.listdir(d.parent) == []  # no hidden temporary directory either


def test_token_is_small_and_opens_the_partition(tmp_path):
    full, chunks = _chunks(2000, [500])
    d = str(tmp_path / "p")
    m = _write(d, chunks, dataset="abc", part=3)
    rec = ds.token(d, m)
    assert len(rec) < 1024  # the cached record, whatever the partition's size
    kind, meta, arrays = wire.unpack(rec)
    assert kind == "store" and arrays == {}
    with ds.open_token(meta) as r:
        assert (r.manifest.dataset, r.manifest.part, r.n) == ("abc", 3, 2000)
        np.testing.assert_array_equal(r.take("x", [5, 1]), full["x"][[5, 1]])


@pytest.mark.parametrize("damage", ["rmtree", "manifest", "truncate", "other_host", "rebuilt",
                                    "header"])
def test_every_unreadable_partition_is_a_miss(tmp_path, damage):
    _, chunks = _chunks(100, [100])
    d = str(tmp_path / "p")
    m = _write(d, chunks)
    meta = wire.unpack(ds.token(d, m))[1]
    if damage == "rmtree":
        import shutil
        shutil.rmtree(d)
    elif damage == "manifest":
        os.remove(os.path.join(d, ds.MANIFEST))
    elif damage == "truncate":
        with open(os.path.join(d, "y.npy"), "r+b") as f:
            f.truncate(HEADER_BYTES + 8)
    elif damage == "other_host":
        meta = {**meta, "host": "elsewhere/0"}
    elif damage == "rebuilt":  # the directory now holds other rows than the token names
        import shutil
        shutil.rmtree(d)
        _write(d, _chunks(100, [100], seed=5)[1])
    elif damage == "header":
        with open(os.path.join(d, "x.npy"), "r+b") as f:
            f.write(b"garbage")
    with pytest.raises(StoreMiss, match=MISS):
        r = ds.open_token(meta)
        r.take("x", [0])  # (a bad header shows when the array is first mapped)


def test_publishing_again_keeps_same_data_and_refuses_other_data(tmp_path):
    _, chunks = _chunks(50, [20])
    d = str(tmp_path / "p")
    first = _write(d, chunks)
    again = _write(d, chunks)  # a retried task on this host: same rows
    assert again.same_data(first)
    with pytest.raises(ValueError, match="lineage is not deterministic"):
        _write(d, _chunks(50, [20], seed=9)[1])
    assert sorted(os.listdir(tmp_path)) == ["p"]  # the losers' temporary files are gone
    with PartitionReader.open(d, expect=first) as r:
        assert r.n == 50


def test_writing_holds_one_chunk_not_the_partition(tmp_path):
    """Peak Python memory while streaming 64 MB is about one 1 MB chunk."""
    chunk = {"x": np.ones((256, 1024), np.float32)}  # 1 MiB
    tracemalloc.start()
    try:
        with PartitionWriter(str(tmp_path / "p"), dataset="d", part=0) as w:
            for _ in range(64):
                w.append(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert os.path.getsize(tmp_path / "p" / "x.npy") == HEADER_BYTES + 64 * (1 << 20)


def test_roots_dirs_and_cleanup(tmp_path, monkeypatch):
    a, b = tmp_path / "blockmgr-a", tmp_path / "blockmgr-b"
    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{a},{b}")
    roots = ds.store_roots()
    assert roots == [str(a / "rddtensor-store"), str(b / "rddtensor-store")]
    d0, d1 = ds.partition_dir("ds1", 0), ds.partition_dir("ds1", 1)
    assert d0.startswith(roots[0]) and d1.startswith(roots[1]) and d0.endswith("p00000")
    for dataset in ("ds1", "ds2"):
        _write(ds.partition_dir(dataset, 0), _chunks(5, [5])[1])
    ds.remove_dataset("ds2")
    assert not os.path.exists(os.path.join(roots[0], "ds2")) and os.path.isdir(d0)
    monkeypatch.delenv("SPARK_LOCAL_DIRS")
    assert len(ds.store_roots()) == 1  # outside Spark: the temp directory


def test_large_arrays_are_gathered_row_by_row_without_mapping_the_file(tmp_path, monkeypatch):
    """Above ``PREAD_MIN_BYTES`` an array's rows are read with ``preadv`` into the result:
    the same values as a gather through the map, in the order asked, and nothing mapped (a
    random batch through the map would bring most of a large partition into the RSS)."""
    full, chunks = _chunks(300, [64, 200, 36])
    d = str(tmp_path / "p")
    _write(d, chunks)
    rows = np.array([299, 0, 17, 17, 150, 3])
    r = PartitionReader.open(d)
    mapped = {k: r.take(k, rows) for k in full}
    monkeypatch.setattr(ds, "PREAD_MIN_BYTES", 0)
    r2 = PartitionReader.open(d)
    for k in full:
        got = r2.take(k, rows)
        assert got.dtype == mapped[k].dtype
        np.testing.assert_array_equal(got, mapped[k])
        np.testing.assert_array_equal(got, full[k][rows])
    assert r2._maps == {}
    with pytest.raises(IndexError):
        r2.take("x", [300])
