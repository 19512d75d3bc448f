"""The distributed engine (``rddtensor.spark.engine``): distributed training equals in-process training.

Every comparison runs the same model, seed and optimizer in process (numpy ``fit``) and on Spark
(``fit`` on an RDD/DataFrame) and compares weights, optimizer slots, step and history, for 1, 2
and 3 partitions, uneven partitions and empty partitions, with both all-reduce strategies
(STYLE.md rule 8). Runs are small (P = 50, <= 6 iterations) because every Spark stage costs
~100 ms on two cores.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.callbacks import Callback
from rddtensor.training.params import block_bounds
from rddtensor.optim import LARS, SGD, Adam
from rddtensor.spark import allreduce as AR
from rddtensor.spark.engine import ParameterState

pytestmark = pytest.mark.spark

RTOL, ATOL = 1e-5, 1e-7

# --- data ---------------------------------------------------------------------------------------
_rng = np.random.default_rng(42)
X = _rng.normal(size=(24, 5)).astype(np.float32)
Y_CLS = (X[:, 0] + 0.5 * X[:, 1] - X[:, 2] > 0).astype(np.int64)
Y_REG = (X @ np.array([0.5, -1.0, 0.25, 0.0, 2.0], np.float32)
         + 0.1 * _rng.normal(size=24)).astype(np.float32)
XV = _rng.normal(size=(10, 5)).astype(np.float32)
YV = (XV[:, 0] + 0.5 * XV[:, 1] - XV[:, 2] > 0).astype(np.int64)

# partition layouts: rows per partition (consecutive slices of X, so global row order is kept)
LAYOUTS = {
    "N1": [24],
    "N2": [12, 12],
    "N3": [8, 8, 8],
    "uneven": [3, 14, 7],
    "empty": [10, 0, 14],  # (an empty first partition: test_fewer_rows_than_partitions)
}


def chunked_rdd(sc, rows, sizes):
    """An RDD whose partition j holds exactly the next ``sizes[j]`` rows (empty ones allowed)."""
    assert sum(sizes) == len(rows)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    chunks = [rows[a:z] for a, z in zip(bounds[:-1], bounds[1:])]
    return sc.parallelize(chunks, len(chunks)).flatMap(lambda c: c)


def pairs(X, y):
    return list(zip(X, y))


# --- models and runs ----------------------------------------------------------------------------
OPTIMIZERS = {
    "adam": lambda: Adam(0.05),
    "sgd": lambda: SGD(0.1),
    "sgd_momentum": lambda: SGD(0.1, momentum=0.9),
    "adam_clipnorm": lambda: Adam(0.05, clipnorm=0.05),
    "adam_clipvalue": lambda: Adam(0.05, clipvalue=0.01),
    "lars": lambda: LARS(0.5, momentum=0.9, trust_coefficient=0.01),
}


def classifier(opt="adam", dropout=None):
    hidden = [L.Dense(6, activation="relu", input_shape=(5,))]
    if dropout:
        hidden.append(L.Dropout(dropout))
    m = L.Sequential(hidden + [L.Dense(2)], seed=1)
    m.compile(optimizer=OPTIMIZERS[opt](), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def regressor(opt="sgd_momentum"):
    m = L.Sequential([L.Dense(4, activation="tanh", input_shape=(5,)), L.Dense(1)], seed=2)
    m.compile(optimizer=OPTIMIZERS[opt](), loss="mse", metrics=["mae"])
    return m


# (model factory, labels, fit kwargs). Adam: 3 mini-batches per epoch (10, 10, 4 rows, shuffled)
# x 2 epochs; SGD: full batch x 4 epochs. Both cross at least one epoch boundary.
RUNS = {
    "adam_minibatch": (classifier, Y_CLS, dict(epochs=2, batch_size=10, shuffle=True, seed=7)),
    "sgd_fullbatch": (regressor, Y_REG, dict(epochs=4, batch_size=24, shuffle=False, seed=3)),
}


def snapshot(model, history):
    return {"theta": model.theta.copy(), "step": model.step, "history": dict(history.history),
            "slots": {k: v.copy() for k, v in model.slots.items()}}


def new_model(run: str, opt: str | None = None, dropout=None):
    """A fresh model of ``run`` (default optimizer and no dropout unless given)."""
    return RUNS[run][0](**{k: v for k, v in (("opt", opt), ("dropout", dropout)) if v})


@functools.lru_cache(maxsize=None)
def local_run(run: str, opt: str | None = None, dropout=None):
    _, y, kw = RUNS[run]
    m = new_model(run, opt, dropout)
    h = m.fit(X, y, verbose=0, **kw)
    return snapshot(m, h)


_DIST_CACHE: dict = {}


def distributed_run(sc, run, layout, allreduce, opt=None, dropout=None, **extra):
    _, y, kw = RUNS[run]
    m = new_model(run, opt, dropout)
    rdd = chunked_rdd(sc, pairs(X, y), LAYOUTS[layout])
    h = m.fit(rdd, verbose=0, allreduce=allreduce, **{**kw, **extra})
    assert h.params["partitions"] == len(LAYOUTS[layout])
    assert h.params["allreduce"] == allreduce
    # every record a partition sent itself went through the host-local cache, none missed
    assert h.params["local_cache"] == "on"
    # one host (a local master): no record crosses between hosts, none needs a peer
    assert h.params["peer_transport"] == "unused"
    got = snapshot(m, h)
    if opt is None and dropout is None:  # later tests compare against the default runs
        _DIST_CACHE[(run, layout, allreduce)] = got
    return got


def cached_distributed_run(sc, run, layout, allreduce):
    """The run ``test_distributed_equals_local`` already did (or a fresh one if it was
    deselected); iterations per job do not change results, so they are not part of the key."""
    got = _DIST_CACHE.get((run, layout, allreduce))
    return got if got is not None else distributed_run(sc, run, layout, allreduce)


def assert_same_training(got, ref, exact=False):
    check = np.testing.assert_array_equal if exact else functools.partial(
        np.testing.assert_allclose, rtol=RTOL, atol=ATOL)
    check(got["theta"], ref["theta"])
    assert got["step"] == ref["step"]
    assert sorted(got["slots"]) == sorted(ref["slots"]) and ref["slots"]
    for k in ref["slots"]:
        check(got["slots"][k], ref["slots"][k], err_msg=f"slot {k}")
    assert sorted(got["history"]) == sorted(ref["history"])
    for k in ref["history"]:
        np.testing.assert_allclose(got["history"][k], ref["history"][k], rtol=1e-6,
                                   err_msg=f"history {k}")


# --- distributed equals local -------------------------------------------------------------------
@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("run", list(RUNS))
def test_distributed_equals_local(sc, run, layout, allreduce):
    ref = local_run(run)
    # group iterations differently per layout: whole epochs in one job, or 2 per job
    ipj = 2 if layout in ("N3", "empty") else 8
    got = distributed_run(sc, run, layout, allreduce, iterations_per_job=ipj)
    assert got["step"] == (6 if run == "adam_minibatch" else 4)
    assert not np.array_equal(got["theta"], new_model(run).build().theta)  # it trained
    assert_same_training(got, ref, exact=(layout == "N1"))


@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_fewer_rows_than_partitions(sc, allreduce):
    """``sc.parallelize(rows, N)`` with fewer rows than partitions leaves partitions empty."""
    X2, y2 = X[:2], Y_CLS[:2]
    ref = classifier()
    ref.fit(X2, y2, epochs=2, batch_size=1, seed=5, verbose=0)
    m = classifier()
    rdd = sc.parallelize(pairs(X2, y2), 3)
    assert rdd.glom().map(len).collect() == [0, 1, 1]  # partition 0 is empty
    h = m.fit(rdd, epochs=2, batch_size=1, seed=5, verbose=0, allreduce=allreduce)
    assert h.params["partitions"] == 3 and m.step == ref.step == 4
    np.testing.assert_allclose(m.theta, ref.theta, rtol=RTOL, atol=ATOL)
    for k in ref.slots:
        np.testing.assert_allclose(m.slots[k], ref.slots[k], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_clipvalue_equals_local(sc, allreduce):
    """Clipping by value is elementwise: every block's owner clips its summed block (the
    sharded all-reduce once skipped it, so distributed silently differed from local)."""
    ref = local_run("adam_minibatch", "adam_clipvalue")
    assert not np.allclose(ref["theta"], local_run("adam_minibatch")["theta"])  # it clips
    got = distributed_run(sc, "adam_minibatch", "uneven", allreduce, opt="adam_clipvalue")
    assert_same_training(got, ref)


@pytest.mark.parametrize("opt", ["adam_clipnorm", "lars"])
def test_whole_gradient_optimizers_with_replicated_equal_local(sc, opt):
    """clipnorm and LARS need whole-gradient/whole-layer norms: replicated has them."""
    ref = local_run("adam_minibatch", opt)
    got = distributed_run(sc, "adam_minibatch", "uneven", "replicated", opt=opt)
    assert_same_training(got, ref)


def test_continued_fit_resumes_slots_and_step(sc):
    """A second distributed fit continues from the first one's weights, slots and step,
    exactly like a second in-process fit."""
    ref = classifier()
    ref.fit(X, Y_CLS, epochs=1, batch_size=12, seed=4, verbose=0)
    ref.fit(X, Y_CLS, epochs=1, batch_size=12, seed=4, verbose=0)
    m = classifier()
    rdd = chunked_rdd(sc, pairs(X, Y_CLS), [5, 19])
    m.fit(rdd, epochs=1, batch_size=12, seed=4, verbose=0, allreduce="sharded")
    m.fit(rdd, epochs=1, batch_size=12, seed=4, verbose=0, allreduce="sharded")
    assert m.step == ref.step == 4
    np.testing.assert_allclose(m.theta, ref.theta, rtol=RTOL, atol=ATOL)
    for k in ref.slots:
        np.testing.assert_allclose(m.slots[k], ref.slots[k], rtol=RTOL, atol=ATOL)


# --- reproducibility ----------------------------------------------------------------------------
def test_same_seed_is_bit_identical(sc):
    a = cached_distributed_run(sc, "adam_minibatch", "uneven", "sharded")
    b = distributed_run(sc, "adam_minibatch", "uneven", "sharded")
    np.testing.assert_array_equal(a["theta"], b["theta"])
    for k in a["slots"]:
        np.testing.assert_array_equal(a["slots"][k], b["slots"][k])
    assert a["history"] == b["history"]


def test_dropout_same_seed_is_bit_identical(sc):
    a = distributed_run(sc, "adam_minibatch", "uneven", "replicated", opt="adam", dropout=0.4)
    b = distributed_run(sc, "adam_minibatch", "uneven", "replicated", opt="adam", dropout=0.4)
    np.testing.assert_array_equal(a["theta"], b["theta"])
    assert a["history"] == b["history"]
    # the masks matter: without dropout the same run ends elsewhere
    assert not np.allclose(a["theta"], local_run("adam_minibatch")["theta"], rtol=RTOL)


def test_dropout_one_partition_equals_local(sc):
    """With one partition the dropout masks come from the same generator as in process."""
    ref = local_run("adam_minibatch", "adam", 0.4)
    got = distributed_run(sc, "adam_minibatch", "N1", "sharded", opt="adam", dropout=0.4)
    assert_same_training(got, ref, exact=True)


# --- DataFrame input ----------------------------------------------------------------------------
def test_dataframe_vector_and_array_features_equal_rdd(spark, sc):
    from pyspark.ml.linalg import Vectors
    ref = local_run("adam_minibatch")
    make, y, kw = RUNS["adam_minibatch"]
    rdd_run = cached_distributed_run(sc, "adam_minibatch", "N2", "sharded")

    df_vec = spark.createDataFrame([(Vectors.dense(x.tolist()), float(t)) for x, t in zip(X, y)],
                                   ["features", "label"])
    assert dict(df_vec.dtypes) == {"features": "vector", "label": "double"}
    m = make()
    h = m.fit(df_vec, verbose=0, allreduce="sharded", **kw)
    vec_run = snapshot(m, h)

    df_arr = spark.createDataFrame([(x.tolist(), float(t)) for x, t in zip(X, y)],
                                   "x array<float>, target double")
    m = make()
    h = m.fit(df_arr, verbose=0, allreduce="replicated", features_col="x", label_col="target",
              **kw)
    arr_run = snapshot(m, h)

    for got in (vec_run, arr_run):
        assert_same_training(got, rdd_run)
        assert_same_training(got, ref)


# --- validation, evaluate, predict --------------------------------------------------------------
def test_validation_evaluate_and_predict_on_rdds(sc):
    make, y, kw = RUNS["adam_minibatch"]
    ref = make()
    href = ref.fit(X, y, validation_data=(XV, YV), verbose=0, **kw)

    m = make()
    train = chunked_rdd(sc, pairs(X, y), [12, 12])
    val = chunked_rdd(sc, pairs(XV, YV), [3, 0, 7])  # a different partition count than train
    h = m.fit(train, validation_data=val, verbose=0, allreduce="replicated", **kw)
    assert {"val_loss", "val_accuracy"} <= set(h.history)
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h.history[k], href.history[k], rtol=1e-5, err_msg=k)

    # the last epoch's validation used the final weights: evaluate afterwards agrees
    ev = m.evaluate(val)
    np.testing.assert_allclose(h.history["val_loss"][-1], ev["loss"], rtol=1e-6)
    np.testing.assert_allclose(h.history["val_accuracy"][-1], ev["accuracy"], rtol=1e-6)
    ev_local = m.evaluate(XV, YV)
    assert sorted(ev) == sorted(ev_local)
    for k in ev_local:
        np.testing.assert_allclose(ev[k], ev_local[k], rtol=1e-6, err_msg=k)

    # predict: features-only RDD with an empty partition, and a (features, label) RDD
    want = m.predict(XV)
    got = np.stack(m.predict(chunked_rdd(sc, list(XV), [4, 0, 6])).collect())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    got = np.stack(m.predict(val).collect())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_evaluate_and_predict_on_dataframe(spark, sc):
    m = classifier()
    m.build()
    df = spark.createDataFrame([(x.tolist(), int(t)) for x, t in zip(XV, YV)],
                               "features array<double>, label long")
    ev, ev_local = m.evaluate(df), m.evaluate(XV, YV)
    for k in ev_local:
        np.testing.assert_allclose(ev[k], ev_local[k], rtol=1e-6, err_msg=k)
    got = np.stack(m.predict(df).collect())
    np.testing.assert_allclose(got, m.predict(XV), rtol=1e-6, atol=1e-7)


def test_evaluate_and_predict_stream_one_pass_caching_nothing(spark, sc):
    """evaluate/predict on a DataFrame decode each partition record batch by record batch in
    one job: many small batches give the in-process numbers, nothing stays cached, and a bad
    row deep in a partition is named as in a fit."""
    m = classifier()
    m.build()
    df = spark.createDataFrame([(x.tolist(), int(t)) for x, t in zip(XV, YV)],
                               "features array<double>, label long").repartition(3)
    before = set(_persisted(sc))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
    try:
        ev = m.evaluate(df, batch_size=3)
        got = np.stack(m.predict(df, batch_size=3).collect())
        order = [np.asarray(r.features, np.float32) for r in df.select("features").collect()]
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    ev_local = m.evaluate(XV, YV)
    for k in ev_local:
        np.testing.assert_allclose(ev[k], ev_local[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(got, m.predict(np.stack(order)), rtol=1e-6, atol=1e-7)
    assert set(_persisted(sc)) == before  # one pass: no shard was built or cached
    bad = spark.createDataFrame([(x.tolist()[: 3 if i == 7 else None], int(t))
                                 for i, (x, t) in enumerate(zip(XV, YV))],
                                "features array<double>, label long").coalesce(1)
    with pytest.raises(ValueError, match=r"evaluation data: .*row 7.*features") as e:
        m.evaluate(bad)
    _assert_clean(e)
    with pytest.raises(ValueError, match="evaluation data is empty"):
        m.evaluate(df.limit(0))


# --- bad input: a clear Python error, never a Py4JJavaError ------------------------------------
def _assert_clean(excinfo):
    e = excinfo.value
    assert type(e) is ValueError, type(e)
    text = str(e)
    assert "Py4J" not in text and "org.apache" not in text and "Traceback" not in text, text
    assert e.__cause__ is None


def _rows(n=24):
    return pairs(X[:n], Y_CLS[:n])


def _ragged():
    rows = _rows()
    rows[17] = (X[17][:4], Y_CLS[17])
    return rows


def _nan():
    rows = _rows()
    rows[13] = (np.where(np.arange(5) == 2, np.nan, X[13]).astype(np.float32), Y_CLS[13])
    return rows


BAD_INPUTS = {
    # name: (rows, partitions, fit kwargs, message regex)
    "ragged_features": (_ragged, 2, {}, r"row 5 of partition 1 has features of shape \(4,\), "
                                       r"expected \(5,\)"),
    "nan_features": (_nan, 2, {}, r"NaN or inf \(row 1 of partition 1\)"),
    "batch_too_big": (_rows, 2, {"batch_size": 25},
                      r"batch_size=25 is larger than the 24 training rows"),
    "no_labels": (lambda: list(X), 2, {}, r"training data needs labels"),
    "empty_rdd": (lambda: [], 2, {}, r"empty"),
    "unknown_allreduce": (_rows, 2, {"allreduce": "ring"},
                          r"allreduce must be 'auto', 'sharded', 'replicated' or 'hierarchical', "
                          r"got 'ring'"),
    "label_out_of_range": (lambda: pairs(X, Y_CLS + 2), 2, {},
                           r"labels must be integers in \[0, 2\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_python_error(sc, case):
    rows, n, kw, msg = BAD_INPUTS[case]
    m = classifier()
    with pytest.raises(ValueError, match=msg) as excinfo:
        m.fit(sc.parallelize(rows(), n), epochs=1, verbose=0,
              **{"batch_size": 6, "allreduce": "sharded", **kw})
    _assert_clean(excinfo)


def test_empty_rdd_from_emptyRDD(sc):
    with pytest.raises(ValueError, match="empty") as excinfo:
        classifier().fit(sc.emptyRDD(), batch_size=4, verbose=0)
    _assert_clean(excinfo)


@pytest.mark.parametrize("built", [False, True])
def test_feature_width_not_matching_model(sc, built):
    m = classifier()
    if built:
        m.build()
    rdd = sc.parallelize(pairs(X[:, :4], Y_CLS), 2)
    with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)") as excinfo:
        m.fit(rdd, batch_size=4, verbose=0)
    _assert_clean(excinfo)


@pytest.mark.parametrize("opt, what", [("adam_clipnorm", "clipnorm"), ("lars", "LARS")])
def test_norm_optimizers_refuse_sharded(sc, opt, what):
    m = classifier(opt)
    with pytest.raises(ValueError, match=rf"{what} .*use allreduce='replicated'") as excinfo:
        m.fit(sc.parallelize(_rows(), 2), batch_size=6, verbose=0, allreduce="sharded")
    _assert_clean(excinfo)


def test_evaluate_without_labels_says_labels_are_needed(sc):
    m = classifier()
    m.build()
    with pytest.raises(ValueError, match="label"):
        m.evaluate(sc.parallelize(list(XV), 2))


def test_empty_validation_data_is_named(sc):
    m = classifier()
    with pytest.raises(ValueError, match="validation"):
        m.fit(sc.parallelize(_rows(), 2), batch_size=6, verbose=0,
              validation_data=sc.parallelize([], 2))


# --- choosing the all-reduce --------------------------------------------------------------------
def _big_model(opt="adam"):
    m = L.Sequential([L.Dense(2000, input_shape=(2000,)), L.Dense(10)], seed=0)
    m.compile(optimizer=OPTIMIZERS[opt](), loss="sparse_categorical_crossentropy")
    m.build()
    return m


def test_choose_auto():
    small, big = classifier(), _big_model()  # Adam: 2 slots
    small.build()
    P = big.layout.size
    assert P > 4_000_000
    for n in (1, 2, 3, 8, 64):
        for hosts in (1, 2):
            assert AR.choose("auto", small, n, hosts=hosts).name == "replicated"
    # big: replicated's extra values (full state and update, (N-1)·P gradient values out)
    # cost more than the Python pass it saves, at every N, on one host or several
    for n in (2, 3, 8, 32):
        for hosts, cost in ((1, AR.ONE_HOST), (2, AR.HOSTS), (min(n, 4), AR.HOSTS)):
            assert (cost.seconds(AR.Replicated, P, n, hosts, 2)
                    > cost.seconds(AR.Sharded, P, n, hosts, 2))
            assert AR.choose("auto", big, n, hosts=hosts).name == "sharded"

    # the crossover at N = 2 (fitted by benchmarks.allreduce): on one host SGD near 5.3e6
    # values and Adam near 2.1e6; across two hosts (peer transport) 7.7e6 / 2.9e6: there a
    # Python pass costs 94 ms against 34.5 ms on one host, and replicated saves one
    def crossover(n_slots, cost, hosts):
        return min(P for P in np.geomspace(1e4, 1e8, 400)
                   if cost.seconds(AR.Replicated, P, 2, hosts, n_slots)
                   > cost.seconds(AR.Sharded, P, 2, hosts, n_slots))
    assert 4.5e6 < crossover(0, AR.ONE_HOST, 1) < 6e6
    assert 1.8e6 < crossover(2, AR.ONE_HOST, 1) < 2.5e6
    assert 7.0e6 < crossover(0, AR.HOSTS, 2) < 8.5e6
    assert 2.5e6 < crossover(2, AR.HOSTS, 2) < 3.4e6
    mid = _big_model("sgd")  # 4e6 parameters: replicated at N = 2, sharded at N = 8
    for hosts in (1, 2):
        assert AR.choose("auto", mid, 2, hosts=hosts).name == "replicated"
    for hosts in (1, 2, 8):
        assert AR.choose("auto", mid, 8, hosts=hosts).name == "sharded"
    # a value sent to another host never costs less than one within a host
    assert AR.HOSTS.per_cross_value >= AR.HOSTS.per_local_value
    m1 = L.Sequential([L.Dense(1000, input_shape=(1000,))], seed=0)
    m1.compile(optimizer="sgd", loss="mse")
    m1.build()
    for hosts in (1, 8):  # 1e6 parameters: replicated's extra values cost less than a pass
        assert AR.choose("auto", m1, 8, hosts=hosts).name == "replicated"
    assert AR.Sharded.values(1000, 2, 1, 0)[0] == AR.Replicated.values(1000, 2, 1, 0)[0] == 0
    assert AR.Sharded.values(1000, 2, 2, 0)[0] == AR.Replicated.values(1000, 2, 2, 0)[0] == 1000
    # whole-gradient norms force replicated whatever the size
    assert AR.choose("auto", _big_model("adam_clipnorm"), 32).name == "replicated"
    assert AR.choose("auto", _big_model("lars"), 32, hosts=4).name == "replicated"


@pytest.mark.spark
def test_a_local_master_is_one_host(sc):
    from rddtensor.spark.engine import executor_hosts, one_host
    assert one_host(sc) and executor_hosts(sc) == 1  # (two hosts: tests/test_multihost.py)


def test_choose_explicit_and_errors():
    m = classifier()
    m.build()
    assert isinstance(AR.choose("sharded", m, 4), AR.Sharded)
    assert isinstance(AR.choose("replicated", m, 4), AR.Replicated)
    with pytest.raises(ValueError, match="got 'Sharded'"):
        AR.choose("Sharded", m, 4)
    for opt in ("adam_clipnorm", "lars"):
        bad = classifier(opt)
        bad.build()
        for name in ("sharded", "hierarchical"):
            with pytest.raises(ValueError, match=f"which the {name} all-reduce does not have; "
                                                 "use allreduce='replicated'"):
                AR.choose(name, bad, 4)
        assert AR.choose("replicated", bad, 4).name == "replicated"
    assert AR.choose("hierarchical", m, 4).name == "hierarchical"


def test_strategies_share_the_allreduce_interface():
    for cls in (AR.Sharded, AR.Replicated):
        assert issubclass(cls, AR.AllReduce) and AR.STRATEGIES[cls.name] is cls
    with pytest.raises(TypeError):
        AR.AllReduce()  # abstract


def test_task_settings_are_frozen_and_pickle():
    import dataclasses
    import pickle
    from rddtensor.spark.config import CacheSettings, Iteration, StepConfig
    from rddtensor.spark.worker import Worker
    step = StepConfig(n_total=10, batch_size=4, seed=0, shuffle=True, offsets=(0, 6), t0=0,
                      batch_sizes=(4, 4, 2), wire_bf16=True)
    it = Iteration(step, CacheSettings(run="r", job=2, peers=(0, 0)), cut=False)
    assert pickle.loads(pickle.dumps(it)) == it
    assert step.steps_per_epoch == 3 and step.gradient_bf16 == ("g",)
    assert it.state_cache is it.cache and dataclasses.replace(it, cut=True).state_cache is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        it.cache.job = 3
    w = Worker()  # (not ``worker.current()``: that would tune and gc.freeze the test process)
    assert w.scratch("g", 5) is w.scratch("g", 5) and w.scratch("g", 6).shape == (6,)
    assert w.epoch_plan(step, 0, 0, 6) is w.epoch_plan(step, 0, 0, 6)


# --- the parameter state as a BlockTensor -------------------------------------------------------
@pytest.mark.parametrize("strategy", [AR.Sharded, AR.Replicated])
def test_parameter_state_tensor_view(sc, strategy):
    m = classifier()
    m.build()
    m.init_slots()
    rng = np.random.default_rng(0)
    for k in m.slots:
        m.slots[k][...] = rng.normal(size=m.layout.size).astype(np.float32) ** 2
    m.step = 5
    state = ParameterState.from_driver(strategy(), sc, m, 3)
    try:
        assert state.n_blocks == 3 and state.bounds == block_bounds(m.layout.size, 3)
        t = state.tensor()
        assert (t.size, t.n_blocks, t.bounds) == (m.layout.size, 3, state.bounds)
        np.testing.assert_array_equal(t.to_numpy(), m.theta)
        np.testing.assert_allclose(t.sum(), m.theta.astype(np.float64).sum(), rtol=1e-6)
        for k in ("m", "v"):
            np.testing.assert_array_equal(state.tensor(k).to_numpy(), m.slots[k])
        theta, slots, step = state.gather()
        np.testing.assert_array_equal(theta, m.theta)
        assert step == 5 and sorted(slots) == ["m", "v"]
    finally:
        state.unpersist()


def test_runner_state_tensor_after_training(sc):
    """The view also reads a trained state (the output of an update pass, not the initial one)."""
    from rddtensor.spark.engine import DistributedRunner
    from rddtensor.spark.shards import make_shards
    make, y, kw = RUNS["adam_minibatch"]
    ref = make()
    ref.fit(X, y, verbose=0, **{**kw, "epochs": 1})
    m = make()
    m.build()
    m.init_slots()
    shards = make_shards(chunked_rdd(sc, pairs(X, y), LAYOUTS["uneven"]))
    runner = DistributedRunner(m, shards, AR.Sharded(), batch_size=kw["batch_size"],
                               shuffle=True, seed=kw["seed"], class_weight=None,
                               iterations_per_job=2)
    try:
        runner.train_epoch(0, lambda n, stats: None)
        assert runner.t == 3
        w, v = runner.state.tensor().to_numpy(), runner.state.tensor("v").to_numpy()
        np.testing.assert_allclose(w, ref.theta, rtol=RTOL, atol=ATOL)
        runner.finish()  # gathers into the model
        np.testing.assert_array_equal(m.theta, w)
        np.testing.assert_array_equal(m.slots["v"], v)
        assert m.step == 3
    finally:
        runner.state.unpersist()
        shards.unpersist()


# --- cached RDDs and lineage stay bounded -------------------------------------------------------
def _persisted(sc) -> dict:
    """{rdd id: lines of its lineage} for every RDD the JVM holds as persisted."""
    return {int(k): len(str(v.toDebugString()).splitlines())
            for k, v in dict(sc._jsc.getPersistentRDDs()).items()}


def test_cached_rdds_and_lineage_stay_bounded(sc):
    rows = pairs(X, Y_CLS)
    user = sc.parallelize(rows, 2).cache()  # the user's own cached RDD stays cached
    user.count()
    before = set(_persisted(sc))
    assert user.id() in before
    seen = []

    def record(epoch, logs):
        now = _persisted(sc)
        seen.append({k: v for k, v in now.items() if k not in before})

    m = classifier()
    # 24 rows / batch 3 = 8 iterations per epoch = one job of 8; 5 epochs = 40 iterations
    h = m.fit(user, epochs=5, batch_size=3, seed=1, verbose=0, iterations_per_job=8,
              callbacks=[record])  # auto: replicated at N = 2, one Python pass per iteration
    assert m.step == 40 and h.params["iterations_per_job"] == 8
    # during the fit: the same number of our RDDs (data shards + current state) after every
    # group, and their lineage does not grow
    counts = [len(s) for s in seen]
    assert counts == [counts[0]] * 5 and counts[0] <= 3, counts
    depths = [max(s.values()) for s in seen]
    assert depths == [depths[0]] * 5, depths
    # after the fit: nothing of ours is left persisted; the user's RDD is
    after = set(_persisted(sc))
    assert after - before == set()
    assert user.id() in after and user.is_cached
    user.unpersist()


def test_failed_fit_leaves_nothing_persisted(sc):
    before = set(_persisted(sc))
    with pytest.raises(ValueError, match="labels must be integers"):
        classifier().fit(sc.parallelize(pairs(X, Y_CLS + 2), 2), batch_size=6, verbose=0,
                         allreduce="sharded")
    assert set(_persisted(sc)) - before == set()


# --- the host-local cache (rddtensor.spark.localcache) changes speed only -----------------------------
@pytest.mark.alone  # lists the host-wide cache directory (see conftest.py)
@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_local_cache_off_or_missing_gives_bit_identical_weights(spark, sc, allreduce):
    import os

    from rddtensor.spark import localcache
    on = cached_distributed_run(sc, "adam_minibatch", "N2", allreduce)
    before = set(os.listdir(localcache.root())) if os.path.isdir(localcache.root()) else set()
    try:
        for mode, expect in (("false", "off"), ("evict", "off after a miss")):
            spark.conf.set("spark.rddtensor.localCache", mode)
            m = new_model("adam_minibatch")
            _, y, kw = RUNS["adam_minibatch"]
            # 3 iterations per job: the first job misses, re-runs without the cache, and the
            # later jobs run without it
            h = m.fit(chunked_rdd(sc, pairs(X, y), LAYOUTS["N2"]), verbose=0,
                      allreduce=allreduce, iterations_per_job=3, **kw)
            assert h.params["local_cache"] == expect
            assert_same_training(snapshot(m, h), on, exact=True)
        spark.conf.set("spark.rddtensor.localCache", "sometimes")
        with pytest.raises(ValueError, match="spark.rddtensor.localCache must be true, false"):
            new_model("adam_minibatch").fit(chunked_rdd(sc, pairs(X, Y_CLS), [12, 12]),
                                            verbose=0, batch_size=8)
        spark.conf.unset("spark.rddtensor.localCache")
        spark.conf.set("spark.rddtensor.peerTransport", "maybe")
        with pytest.raises(ValueError, match="spark.rddtensor.peerTransport must be true or "):
            new_model("adam_minibatch").fit(chunked_rdd(sc, pairs(X, Y_CLS), [12, 12]),
                                            verbose=0, batch_size=8)
    finally:
        spark.conf.unset("spark.rddtensor.localCache")
        spark.conf.unset("spark.rddtensor.peerTransport")
    # the fits removed their cache files (all on this host with a local master)
    after = set(os.listdir(localcache.root())) if os.path.isdir(localcache.root()) else set()
    assert after <= before


def test_peer_transport_on_or_failed_gives_bit_identical_weights(spark, sc, monkeypatch):
    """Records between hosts as served tokens (``rddtensor.spark.peers``), and a fit whose
    peer could not be reached (the job runs again with those records in the shuffle, for the
    rest of the fit): the weights, slots and history of the shuffle, bit for bit. The engine
    is told the two partitions are on two hosts; on a local master their tasks then write
    served tokens (each worker starts its server) and read the files where they are."""
    from rddtensor.spark import engine, peers
    on = cached_distributed_run(sc, "adam_minibatch", "N2", "sharded")
    monkeypatch.setattr(engine, "one_host", lambda sc: False)
    monkeypatch.setattr(engine.DistributedRunner, "_hosts",
                        lambda self, one: ((0, 1), ("127.0.0.1", "127.0.0.1")))
    real, calls = engine.DistributedRunner._try_group, []

    def second_job_fails(self, steps):
        calls.append(steps)
        if fail and len(calls) == 2:  # as a task that could not reach its peer reports it
            raise RuntimeError(f"Job aborted ... PythonException: {peers.MISS}: "
                               "127.0.0.2:40001 (grad-0-1-1): ConnectionRefusedError: refused")
        return real(self, steps)
    monkeypatch.setattr(engine.DistributedRunner, "_try_group", second_job_fails)
    _, y, kw = RUNS["adam_minibatch"]
    for fail, expect in ((False, "on"), (True, "off after a failure")):
        calls.clear()
        m = new_model("adam_minibatch")
        h = m.fit(chunked_rdd(sc, pairs(X, y), LAYOUTS["N2"]), verbose=0, allreduce="sharded",
                  iterations_per_job=2, **kw)
        assert h.params["peer_transport"] == expect and h.params["local_cache"] == "on"
        assert_same_training(snapshot(m, h), on, exact=True)
        assert len(calls) == 3 + fail  # 6 steps in jobs of 2; the failed job ran again


# --- the executor-local data store (rddtensor.spark.datastore) changes speed only ----------------
def _store_dirs(shards) -> list:
    return [d[1] for d in shards.dirs if d is not None]


@pytest.mark.parametrize("allreduce,layout", [("sharded", "uneven"), ("replicated", "empty")])
def test_data_store_on_off_or_missing_gives_bit_identical_weights(spark, sc, allreduce, layout,
                                                                 monkeypatch):
    """Training reads its rows from memory-mapped files (the default), from inline records
    (``dataStore=false``), or after every stored partition vanished (``evict``: each build's
    files are deleted at once, so the fit goes inline after its restores, here none): the same
    weights, slots and history, bit for bit, as in-process training."""
    from rddtensor.spark import shards as shards_module
    monkeypatch.setattr(shards_module, "MAX_RESTORES", 0)  # (restores: the next test)
    on = cached_distributed_run(sc, "adam_minibatch", layout, allreduce)
    _, y, kw = RUNS["adam_minibatch"]
    try:
        for mode, expect in (("true", "on"), ("false", "off"), ("evict", "off after 1 miss")):
            spark.conf.set("spark.rddtensor.dataStore", mode)
            m = new_model("adam_minibatch")
            h = m.fit(chunked_rdd(sc, pairs(X, y), LAYOUTS[layout]), verbose=0,
                      allreduce=allreduce, iterations_per_job=3, **kw)
            assert h.params["data_store"] == expect
            assert_same_training(snapshot(m, h), on, exact=True)
        spark.conf.set("spark.rddtensor.dataStore", "sometimes")
        with pytest.raises(ValueError, match="spark.rddtensor.dataStore must be true, false"):
            new_model("adam_minibatch").fit(chunked_rdd(sc, pairs(X, Y_CLS), [12, 12]),
                                            verbose=0, batch_size=8)
    finally:
        spark.conf.unset("spark.rddtensor.dataStore")
    assert_same_training(on, local_run("adam_minibatch"))


def test_data_store_files_lost_mid_fit_are_rebuilt_from_lineage(spark, sc):
    """The stored files vanish between epochs (an executor's disk cleaned, a restart): the next
    job misses, the shards are built again from lineage (stored again) and training goes on
    with the same results; the fit's files are gone after it."""
    import shutil

    from rddtensor.spark import engine

    seen = []
    real = engine.make_shards

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    class Wipe(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                for d in _store_dirs(seen[0]):
                    shutil.rmtree(d)

    _, y, kw = RUNS["adam_minibatch"]
    m = new_model("adam_minibatch")
    engine.make_shards = spy
    try:
        h = m.fit(chunked_rdd(sc, pairs(X, y), LAYOUTS["N3"]), verbose=0, callbacks=[Wipe()],
                  allreduce="sharded", **kw)
    finally:
        engine.make_shards = real
    assert h.params["data_store"] == "on (1 restored)"
    assert_same_training(snapshot(m, h), cached_distributed_run(sc, "adam_minibatch", "N3",
                                                                "sharded"), exact=True)
    import os
    assert seen and not any(os.path.exists(d) for d in _store_dirs(seen[0]))


def test_data_store_refuses_a_lineage_that_gives_other_rows(spark, sc):
    """Rebuilding after a miss must give the same rows; an input whose lineage draws new random
    rows each time is refused with a message that says what to do, not trained on."""
    spark.conf.set("spark.rddtensor.dataStore", "evict")
    try:
        rdd = sc.parallelize(range(24), 2).map(
            lambda i: (np.random.default_rng().normal(size=5).astype(np.float32), i % 2))
        with pytest.raises(ValueError, match="not deterministic.*persist or checkpoint"):
            new_model("adam_minibatch").fit(rdd, verbose=0, batch_size=8, epochs=1)
    finally:
        spark.conf.unset("spark.rddtensor.dataStore")


def test_stored_shards_are_tokens_and_their_files_go_with_them(sc):
    """The cached record of a stored partition is a token of a few hundred bytes whatever the
    partition's size; ``unpersist`` removes the files (one host here)."""
    import os

    from rddtensor.spark.shards import make_shards
    big = _rng.normal(size=(4000, 64)).astype(np.float32)
    shards = make_shards(sc.parallelize(pairs(big, np.arange(4000) % 3), 2))
    try:
        sizes = shards.rdd.map(len).collect()
        assert shards.stored and max(sizes) < 2048 < big.nbytes // 2
        assert all(os.path.isfile(os.path.join(d, "X.npy")) for d in _store_dirs(shards))
    finally:
        shards.unpersist()
    assert not any(os.path.exists(d) for d in _store_dirs(shards))


def _cache_files_at_epoch_ends(before: set) -> tuple:
    """A fit callback that lists, at every epoch end, the files of the host-local cache runs
    that did not exist in ``before``; returns ``(callback, seen)``."""
    import os

    from rddtensor.spark import localcache
    seen: set = set()

    def callback(epoch, logs):
        root = localcache.root()
        for run in set(os.listdir(root)) - before:
            seen.update(f.rsplit("-", 1)[0] for f in os.listdir(os.path.join(root, run))
                        if f != "owner")  # (the driver's claim on the run, not a record)
    return callback, seen


@pytest.mark.alone  # lists the host-wide cache directory (see conftest.py)
@pytest.mark.parametrize("hosts", ["one", "several, apart", "several, together",
                                   "several, apart, served"])
def test_records_between_partitions_use_the_cache_only_on_one_host(sc, monkeypatch, hosts):
    """All executors on the driver's host (local masters): the records between partitions go
    through the host-local cache too (θ blocks to the other partition, gradient blocks to their
    owner). Executors on several machines (``one_host`` false): the records a partition sends
    itself do, and those between partitions whose data is cached on the same host (here both
    are, on this process's executor: "together"); partitions on different hosts ("apart",
    simulated, addresses unknown) send each other their records inline, or with the peer
    transport ("served": the hosts' addresses known) as tokens of files their writer serves.
    Same weights every way."""
    import os

    from rddtensor.spark import engine, localcache
    on = cached_distributed_run(sc, "adam_minibatch", "N2", "sharded")
    if hosts != "one":
        monkeypatch.setattr(engine, "one_host", lambda sc_: False)
    if hosts.startswith("several, apart"):
        addrs = ("127.0.0.1", "127.0.0.1") if hosts.endswith("served") else ()
        monkeypatch.setattr(engine.DistributedRunner, "_hosts",
                            lambda self, one: ((0, 1), addrs))
    os.makedirs(localcache.root(), exist_ok=True)
    callback, seen = _cache_files_at_epoch_ends(set(os.listdir(localcache.root())))
    m = new_model("adam_minibatch")
    _, y, kw = RUNS["adam_minibatch"]
    h = m.fit(chunked_rdd(sc, pairs(X, y), LAYOUTS["N2"]), verbose=0, allreduce="sharded",
              iterations_per_job=3, callbacks=[callback], **kw)
    assert h.params["local_cache"] == "on"
    assert h.params["peer_transport"] == ("on" if hosts.endswith("served") else "unused")
    assert_same_training(snapshot(m, h), on, exact=True)
    own = {"own-0", "own-1", "grad-0-0", "grad-1-1"}
    between = {"theta-0", "theta-1", "grad-0-1", "grad-1-0"}
    assert seen == (own if hosts == "several, apart" else own | between)
