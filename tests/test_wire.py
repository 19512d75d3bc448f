"""Raw-bytes records (rddtensor.spark.wire) and the bfloat16 wire option of the distributed engine."""
import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.spark import wire


def test_pack_unpack_round_trip_is_exact_and_zero_copy():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    rec = wire.pack("blk", {"i": 3}, {"x": x, "n": np.asarray(7), "e": np.zeros(0)})
    kind, meta, arrays = wire.unpack(rec)
    assert (kind, meta) == ("blk", {"i": 3})
    np.testing.assert_array_equal(arrays["x"], x)
    assert arrays["n"].shape == () and int(arrays["n"]) == 7 and arrays["e"].shape == (0,)
    assert not arrays["x"].flags.writeable  # a view into the received bytes


def test_a_kind_member_packs_as_its_value():
    from rddtensor.spark.config import Kind
    x = np.arange(5, dtype=np.float32)
    for kind in Kind:  # the same bytes as the plain string: records unchanged
        assert wire.pack(kind, {"i": 1}, {"x": x}) == wire.pack(kind.value, {"i": 1}, {"x": x})
        got = wire.unpack(wire.pack(kind))[0]
        assert type(got) is str and got == kind
    assert b'"k":"own"' in wire.pack(Kind.OWN)


def test_bf16_rounds_to_nearest_even_and_halves_the_bytes():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3.3e38, 1e-40], np.float32)
    y = wire.from_bf16(wire.to_bf16(x))
    # ties go to the even mantissa: 1 + 2^-8 -> 1.0, 1 + 3*2^-8 -> 1 + 2^-6
    np.testing.assert_array_equal(y[:4], np.array([1.0, 1.0, 1.0 + 2 ** -6, -2.5], np.float32))
    assert np.all(np.abs(y - x)[:5] <= np.abs(x[:5]) * 2 ** -8)  # normal numbers: 8 bits
    assert abs(y[5] - x[5]) <= 2.0 ** -133  # subnormal: absolute spacing of bf16 subnormals
    g = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    full, half = wire.pack("g", {}, {"g": g}), wire.pack("g", {}, {"g": g}, bf16=("g",))
    assert len(half) < 0.55 * len(full)
    assert wire.unpack(half)[2]["g"].dtype == np.float32


@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_bfloat16_wire_trains_close_to_float32(sc, allreduce):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 5)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] > 0).astype(int)
    rdd = sc.parallelize(list(zip(X, y)), 2)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        m = L.Sequential([L.Dense(8, activation="tanh", input_shape=(5,)), L.Dense(2)], seed=1)
        m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        h = m.fit(rdd, epochs=2, batch_size=32, verbose=0, allreduce=allreduce, wire_dtype=dtype)
        assert h.params["wire_dtype"] == dtype
        runs[dtype] = m.theta.copy()
    # owners keep float32 master weights; only the traffic is rounded (relative 2^-8)
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=2e-2, atol=2e-3)
    assert not np.array_equal(runs["bfloat16"], runs["float32"])


def test_unknown_wire_dtype_is_named(sc):
    m = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0)
    m.compile(optimizer="sgd", loss="mse")
    rdd = sc.parallelize([(np.ones(3, np.float32), np.zeros(2, np.float32))] * 4, 2)
    with pytest.raises(ValueError, match="wire_dtype must be 'float32' or 'bfloat16', got 'int8'"):
        m.fit(rdd, epochs=1, batch_size=2, verbose=0, wire_dtype="int8")


def _decoded(records):
    return [wire.unpack(b"".join(r) if isinstance(r, list) else r) for r in records]


@pytest.mark.parametrize("n", [0, 1, 100_000, 3 * 65_536])
def test_chunks_carry_an_array_in_bounded_records_and_put_it_back(n, monkeypatch):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    recs = _decoded(wire.chunks("own", {"i": 1}, {"w": x, "slot.m": x * 2}))
    assert all(len(a["x"]) * 4 <= wire.CHUNK_BYTES for _, _, a in recs)
    assert len(recs) == 2 * max(1, -(-n // (wire.CHUNK_BYTES // 4)))
    got = wire.Chunks()
    for kind, meta, arrays in reversed(recs):  # arrival order does not matter
        assert kind == "own" and meta["i"] == 1
        got.add(meta, arrays["x"])
    np.testing.assert_array_equal(got.into("w"), x)
    out = np.zeros(n + 3, np.float32)
    got.into("slot.m", out, offset=3)
    np.testing.assert_array_equal(out[3:], x * 2)


def test_chunk_sum_is_in_source_order_whatever_the_arrival_order():
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal(70_000).astype(np.float32) * 10.0 ** k for k in (0, 7, -7)]
    recs = [r for src, g in enumerate(gs) for r in _decoded(wire.chunks("g", {"src": src}, {"g": g}))]
    expected = (gs[0] + gs[1]) + gs[2]
    for order in (recs, recs[::-1], recs[1::2] + recs[::2]):
        got = wire.Chunks()
        for _, meta, arrays in order:
            got.add(meta, arrays["x"])
        out = got.sum_into("g", np.empty(70_000, np.float32))
        assert np.array_equal(out, expected)  # bit-identical


def test_missing_chunks_are_an_error_not_zeros():
    recs = _decoded(wire.chunks("g", {}, {"g": np.ones(100_000, np.float32)}))
    got = wire.Chunks()
    for _, meta, arrays in recs[:-1]:
        got.add(meta, arrays["x"])
    with pytest.raises(RuntimeError, match="cover"):
        got.into("g")


def test_frames_records_cross_spark_unjoined_and_co_union_keeps_partitions(sc):
    from rddtensor.spark import rawrdd
    big = np.arange(300_000, dtype=np.float32)

    def emit(j, records):
        for _ in records:
            pass
        for d in range(3):
            for rec in wire.chunks("blk", {"src": j}, {"x": big + j}):
                yield rawrdd.key(d)
                yield rec
    S = rawrdd.shuffle_raw(sc.parallelize(range(3), 3), emit, 3)
    data = rawrdd.pin(rawrdd.map_raw(sc.parallelize(range(3), 3),
                                     lambda j, it: [wire.pack("shard", {"j": j})] + [wire.PAD] * len(list(it))), 3)
    both = rawrdd.co_union(S, data)
    assert both.getNumPartitions() == 3

    def check(j, records):
        got, shard = wire.Chunks(), []
        for r in records:
            kind, meta, arrays = wire.unpack(r)
            if kind == "shard":
                shard.append(meta["j"])
            else:
                got.add(meta, arrays["x"])
        yield j, shard, [float(got.into("x", src=s)[-1]) for s in got.sources()]
    out = sorted(both.mapPartitionsWithIndex(check).collect())
    assert out == [(j, [j], [299_999.0, 300_000.0, 300_001.0]) for j in range(3)]
    data.unpersist()
