"""On a cluster of two "hosts" (fixture ``two_hosts``: ``rddtensor.spark.testing``, a standalone
master and one 1-core executor on each of 127.0.0.2 and 127.0.0.3, each host with a private
``/dev/shm``): the engine sees two hosts, and distributed training equals in-process training.

The driver runs in a subprocess (the fixture's ``run``), once for the module (``RESULT``), and
the tests read its JSON; the in-process reference is computed here from the same ``SETUP``.
A partition's tasks keep to the host that holds its data and its host-local cache files, job
after job, so whole fits keep the cache on (issue 21's locality).

A second cluster of two executors on each of two hosts (``peers_result``) runs 4 partitions:
records between partitions of one host go through its cache, and the hierarchical all-reduce
(``rddtensor.spark.hierarchical``) sends one copy per host across, about half of ``sharded``'s
bytes (Spark's own count of the shuffle bytes read from other executors), with the records
between hosts in the shuffle; with the peer transport (``rddtensor.spark.peers``, the default)
those records are tokens fetched from the sending worker: the same weights, bit for bit, and a
fraction of the shuffle bytes.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.spark]

# shared by the cluster run and the in-process reference
SETUP = textwrap.dedent("""
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.optim import Adam

    rng = np.random.default_rng(21)
    X = rng.normal(size=(240, 5)).astype(np.float32)
    y = (X[:, 0] - X[:, 3] + 0.5 * X[:, 1] > 0).astype(np.int64)
    FIT = dict(epochs=2, batch_size=120, shuffle=True, seed=3, verbose=0)

    def make_model():
        m = L.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(2)], seed=7)
        m.compile(optimizer=Adam(0.02), loss="sparse_categorical_crossentropy")
        return m
""")

SCRIPT = SETUP + textwrap.dedent("""
    import os, signal, time
    from rddtensor.spark import engine, localcache

    out = {"one_host": engine.one_host(sc), "hosts": engine.executor_hosts(sc),
           "n_executors": sc._jsc.sc().getExecutorMemoryStatus().size() - 1}  # minus the driver
    # the library's own idea of where each task ran (sleep: let both executors take tasks)
    out["task_hosts"] = sorted(set(sc.parallelize(range(8), 8).map(
        lambda _: (time.sleep(0.2), localcache.host_id())[1]).collect()))
    out["driver_host"] = localcache.host_id()
    train = sc.parallelize([X[:120], X[120:]], 2).flatMap(lambda c: c)
    labels = sc.parallelize([y[:120], y[120:]], 2).flatMap(lambda c: c)
    rows = train.zip(labels)
    out["runs"] = {}
    for allreduce in ("sharded", "replicated"):
        m = make_model()
        t = time.perf_counter()
        h = m.fit(rows, allreduce=allreduce, iterations_per_job=2, **FIT)
        out["runs"][allreduce] = {
            "theta": m.theta.tolist(), "step": m.step, "loss": h.history["loss"],
            "seconds": time.perf_counter() - t,
            "params": {k: h.params.get(k) for k in ("partitions", "local_cache", "data_store",
                                                    "peer_transport")}}
    # more partitions than the cluster's 2 cores: a free core must not take another host's
    # partition (a cache miss), it waits for its own (spark.locality.wait.node)
    m = make_model()
    h = m.fit(rows, allreduce="replicated", iterations_per_job=2, num_partitions=4, **FIT)
    out["four_partitions"] = {"theta": m.theta.tolist(), "params": {
        k: h.params.get(k) for k in ("partitions", "local_cache", "data_store")}}

    # the executor on 127.0.0.3 is SIGKILLed between two jobs (after epoch 0): its cached
    # blocks, its host's cache files and its stored data are gone; the fit goes on bit-identical
    def kill_executor_on(host):
        app = sc.applicationId.encode()
        for p in os.listdir("/proc"):
            try:
                args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                continue
            if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in args and \
                    app in args and host.encode() in args:
                os.kill(int(p), signal.SIGKILL)
                return int(p)

    killed = []
    def kill(epoch, logs):
        if epoch == 0:
            killed.append(kill_executor_on("127.0.0.3"))

    m = make_model()
    h = m.fit(rows, allreduce="sharded", iterations_per_job=2, callbacks=[kill], **FIT)
    out["killed"] = {"pids": killed, "theta": m.theta.tolist(), "step": m.step,
                     "loss": h.history["loss"],
                     "params": {k: h.params.get(k) for k in ("local_cache", "data_store",
                                                            "peer_transport")}}
    emit(out)
""")


@pytest.fixture(scope="module")
def result(two_hosts):
    out, _ = two_hosts(SCRIPT)
    for name, run in out["runs"].items():  # shown with -s / -rA, and in a failure's report
        print(f"two hosts, {name}: local_cache={run['params']['local_cache']!r} "
              f"data_store={run['params']['data_store']!r} fit {run['seconds']:.1f} s")
    return out


def test_engine_sees_two_hosts(result, two_hosts):
    assert result["one_host"] is False
    assert result["hosts"] == 2  # what allreduce.choose prices the fit's all-reduce with
    assert result["n_executors"] == 2
    # two distinct hosts by localcache.host_id, neither of them the driver's
    assert len(result["task_hosts"]) == 2, result["task_hosts"]
    assert result["driver_host"] not in result["task_hosts"]
    assert sorted(w["host"] for w in two_hosts.cluster.workers()) == ["127.0.0.2", "127.0.0.3"]


def test_fit_on_two_hosts_equals_in_process(result):
    ns: dict = {}
    exec(SETUP, ns)
    ref = ns["make_model"]()
    href = ref.fit(ns["X"], ns["y"], **ns["FIT"])
    for name, run in result["runs"].items():
        print(f"{name}: {run['params']}")
        assert run["params"]["partitions"] == 2
        assert run["step"] == ref.step == 4, name
        np.testing.assert_allclose(np.float32(run["theta"]), ref.theta, rtol=1e-5, atol=1e-7,
                                   err_msg=name)
        np.testing.assert_allclose(run["loss"], href.history["loss"], rtol=1e-5, err_msg=name)


def test_partitions_keep_their_executor_across_jobs(result):
    """A partition's passes run on the host holding its data and its records to itself
    (``rawrdd.home``), so the host-local cache stays on for whole fits of both strategies
    (before: a miss at step 0 of every fit turned it off) and the data store is read where it
    was written."""
    got = {name: (run["params"]["local_cache"], run["params"]["data_store"])
           for name, run in result["runs"].items()}
    assert got == {"sharded": ("on", "on"), "replicated": ("on", "on")}
    # and the records between the hosts went as tokens fetched from the sending worker
    # (rddtensor.spark.peers): a failed fetch would have turned it off
    assert {run["params"]["peer_transport"] for run in result["runs"].values()} == {"on"}


def test_more_partitions_than_cores_keep_their_hosts(result):
    """4 partitions on 2 one-core hosts: a task waits for a core on its own host rather than
    running at once on the other (``spark.locality.wait.node``), so the cache stays on; the
    weights still equal in-process training."""
    run = result["four_partitions"]
    assert run["params"] == {"partitions": 4, "local_cache": "on", "data_store": "on"}
    ns: dict = {}
    exec(SETUP, ns)
    ref = ns["make_model"]()
    ref.fit(ns["X"], ns["y"], **ns["FIT"])
    np.testing.assert_allclose(np.float32(run["theta"]), ref.theta, rtol=1e-5, atol=1e-7)


PEERS_SCRIPT = SETUP + textwrap.dedent("""
    import time
    from rddtensor.spark.engine import DistributedRunner
    from rddtensor.spark.allreduce import Sharded
    from rddtensor.spark.shards import make_shards

    # cached first: each fit's shards are built where these rows are, so every fit of this
    # driver places its partitions on the hosts alike (the hierarchy's sums follow the hosts)
    rows = sc.parallelize(list(zip(X, y)), 4).persist()
    rows.count()
    m = make_model()
    shards = make_shards(rows)
    m.build((5,))
    m.init_slots()
    runner = DistributedRunner(m, shards, Sharded(), batch_size=120, shuffle=True, seed=3,
                               class_weight=None, iterations_per_job=2)
    runner._run_group(1)  # (the scheduler's view of cached blocks is a job's snapshot)
    hosts = list(runner._hosts(False)[0])  # each partition's host, from where its data is cached
    runner.close()
    shards.unpersist()

    # the bytes shuffle reads fetch from another executor (host-local ones are read from the
    # disk: spark.shuffle.readHostLocalDisk), per stage, from the driver's status store
    jsc = sc._jsc.sc()
    store = jsc.statusStore()

    def next_stage():
        jsc.listenerBus().waitUntilEmpty()  # (the store follows the scheduler's events)
        nxt = jsc.dagScheduler().nextStageId()  # (py4j may hand the AtomicInteger's value)
        return nxt if isinstance(nxt, int) else nxt.get()

    def remote_bytes(lo, hi):
        total = 0
        for stage in range(lo, hi):
            try:
                total += store.lastStageAttempt(stage).shuffleRemoteBytesRead()
            except Exception:  # (a stage id of no stage left in the store)
                pass
        return total

    # (the strategies' shuffle bytes compare with the records between hosts in the shuffle)
    spark.conf.set("spark.rddtensor.peerTransport", "false")
    runs = {}
    for name, allreduce in (("sharded", "sharded"), ("hierarchical", "hierarchical"),
                            ("hierarchical again", "hierarchical"), ("wide", "sharded"),
                            ("wide, peer transport", "sharded")):
        if name == "wide, peer transport":
            spark.conf.set("spark.rddtensor.peerTransport", "true")
        m = make_model() if not name.startswith("wide") else make_wide_model()
        marks = []
        start, t = next_stage(), time.perf_counter()
        h = m.fit(rows, allreduce=allreduce, iterations_per_job=FIT_JOB, **FIT_HIER,
                  callbacks=[lambda epoch, logs: marks.append(next_stage())])
        seconds = time.perf_counter() - t
        end = next_stage()
        runs[name] = {"theta": m.theta.tolist(), "step": m.step,
                      "local_cache": h.params["local_cache"], "seconds": seconds,
                      "peer_transport": h.params["peer_transport"],
                      # the fit's second job (epoch 1): the first knows no hosts yet (flat)
                      "job_bytes": remote_bytes(marks[0], marks[1]),
                      "fit_bytes": remote_bytes(start, end)}
    emit({"hosts": hosts, "runs": runs})
""")

# the fits of PEERS_SCRIPT: 4 steps per epoch, one job per epoch
FIT_HIER_SETUP = textwrap.dedent("""
    FIT_HIER = dict(FIT, batch_size=60)
    FIT_JOB = 4

    def make_wide_model():  # 16 KB of θ: a block (4 KB) outweighs a token many times
        m = L.Sequential([L.Dense(512, activation="relu", input_shape=(5,)), L.Dense(2)], seed=7)
        m.compile(optimizer=Adam(0.02), loss="sparse_categorical_crossentropy")
        return m
""")
PEERS_SCRIPT = PEERS_SCRIPT.replace("import time\n", "import time\n" + FIT_HIER_SETUP, 1)


@pytest.fixture(scope="module")
def peers_result(two_hosts):
    """PEERS_SCRIPT's result, on a second cluster: two executors on each of two hosts (one
    worker of 2 cores per host, executors of 1 core), 4 partitions."""
    from rddtensor.spark.testing import multi_host_cluster, run_driver
    with multi_host_cluster(hosts=2, executors_per_host=2,
                            env={"PYTHONPATH": two_hosts.cluster_env}) as cluster:
        workers = cluster.workers()
        shape = sorted((w["host"], w["cores"], w["state"]) for w in workers)
        executors, conf = cluster.executors, dict(cluster.conf)
        out, _ = run_driver(cluster, PEERS_SCRIPT, env={"PYTHONPATH": two_hosts.cluster_env})
    out["cluster"] = {"workers": shape, "executors": executors, "conf": conf}
    for name, run in out["runs"].items():  # shown with -s / -rA, and in a failure's report
        print(f"2 hosts x 2 executors, {name}: fit {run['seconds']:.1f} s, remote shuffle bytes: "
              f"second job {run['job_bytes']}, whole fit {run['fit_bytes']}")
    return out


def _reference_hier():
    ns: dict = {}
    exec(SETUP + FIT_HIER_SETUP, ns)
    ref = ns["make_model"]()
    ref.fit(ns["X"], ns["y"], **ns["FIT_HIER"])
    return ref


def test_two_executors_per_host_share_their_host_cache(peers_result):
    """Two executors on each of two hosts, 4 partitions: the driver knows which partitions
    share a host (where their data is cached: two of each), records between them go through
    their host's cache, and the fit keeps the cache on and equals the in-process one."""
    out = peers_result
    assert out["cluster"]["workers"] == [("127.0.0.2", 2, "ALIVE"), ("127.0.0.3", 2, "ALIVE")]
    assert out["cluster"]["executors"] == 4
    assert out["cluster"]["conf"]["spark.executor.cores"] == "1"
    assert out["cluster"]["conf"]["spark.cores.max"] == "4"
    assert sorted(out["hosts"]) == [0, 0, 1, 1], out["hosts"]
    run = out["runs"]["sharded"]
    assert run["local_cache"] == "on"
    ref = _reference_hier()
    assert run["step"] == ref.step == 8
    np.testing.assert_allclose(np.float32(run["theta"]), ref.theta, rtol=1e-5, atol=1e-7)


def test_hierarchical_sends_one_copy_per_host(peers_result):
    """``allreduce="hierarchical"`` (``rddtensor.spark.hierarchical``) on the same cluster and
    data: equals in-process training, keeps the cache on, two runs are bit-identical, and
    about half of ``sharded``'s shuffle bytes cross between the hosts in a job that knows the
    hosts (per job of 4 iterations, 36 block copies to sharded's 64: the cut iteration's θ
    goes out flat, and the job starts from a flat cut state)."""
    runs = peers_result["runs"]
    hier, again, flat = runs["hierarchical"], runs["hierarchical again"], runs["sharded"]
    ref = _reference_hier()
    assert hier["step"] == ref.step == 8
    assert hier["local_cache"] == again["local_cache"] == "on"
    np.testing.assert_allclose(np.float32(hier["theta"]), ref.theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.float32(again["theta"]), np.float32(hier["theta"]))
    assert flat["job_bytes"] > 0 and hier["job_bytes"] > 0
    ratio = hier["job_bytes"] / flat["job_bytes"]
    assert 0.35 < ratio < 0.7, (hier["job_bytes"], flat["job_bytes"])
    assert hier["fit_bytes"] < flat["fit_bytes"]


def test_records_between_hosts_skip_the_shuffle_with_the_peer_transport(peers_result):
    """With the peer transport (``rddtensor.spark.peers``, the default) a record to a partition
    on the other host is a token its task fetches from the sending worker: the same weights,
    bit for bit, as with the records in the shuffle, and in a job that knows the hosts the
    shuffle carries a small fraction of the bytes between the hosts (the job's cut iteration
    still sends its state inline)."""
    runs = peers_result["runs"]
    shuffled, served = runs["wide"], runs["wide, peer transport"]
    assert shuffled["peer_transport"] == "off" and served["peer_transport"] == "on"
    assert served["local_cache"] == shuffled["local_cache"] == "on"
    np.testing.assert_array_equal(np.float32(served["theta"]), np.float32(shuffled["theta"]))
    ns: dict = {}
    exec(SETUP + FIT_HIER_SETUP, ns)
    ref = ns["make_wide_model"]()
    ref.fit(ns["X"], ns["y"], **ns["FIT_HIER"])
    np.testing.assert_allclose(np.float32(served["theta"]), ref.theta, rtol=1e-5, atol=1e-6)
    # 4 iterations per job: 3 send tokens across, the cut one its θ blocks inline
    assert served["job_bytes"] < 0.5 * shuffled["job_bytes"], (served, shuffled)


def test_an_executor_killed_mid_fit_changes_nothing(result):
    """SIGKILL of one host's executor between two jobs: the cut state's second copy is on the
    other host, the shards are built again from their lineage: the same weights, bit for bit."""
    got, ref = result["killed"], result["runs"]["sharded"]
    print(f"after the kill: {got['params']}")
    assert len(got["pids"]) == 1 and got["pids"][0] is not None  # an executor was killed
    assert got["step"] == ref["step"] == 4
    np.testing.assert_array_equal(np.float32(got["theta"]), np.float32(ref["theta"]))
    assert got["loss"] == ref["loss"]
