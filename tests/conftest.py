import importlib.abc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class _OneImportRoot(importlib.abc.MetaPathFinder):
    """The checkout's ``layers/`` and ``optim/`` are ``rddtensor.layers`` / ``rddtensor.optim``.
    With the checkout root on ``sys.path`` (``python -m pytest``) they would also import as
    top-level ``layers`` / ``optim``: a second copy of every module, with its own layer registry.
    Refuse that here, at the import, naming the right spelling."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in ("layers", "optim"):
            raise ModuleNotFoundError(f"import rddtensor.{fullname} (from rddtensor import {top}), "
                                      f"not {fullname}: rddtensor has one import root", name=fullname)
        return None


sys.meta_path.insert(0, _OneImportRoot())


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test run (Spark takes ~5 s to start)."""
    from rddtensor.spark.session import get_spark
    s = get_spark("local[2]", app_name="rddtensor-tests",
                  conf={"spark.default.parallelism": "2", "spark.sql.shuffle.partitions": "2"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def sc(spark):
    return spark.sparkContext


@pytest.fixture(scope="session")
def scenario_results(request):
    """``get(name) -> (result, log)`` of a subprocess scenario (``tests/scenarios.py``).

    The first call runs, in one subprocess, every scenario that a selected test names with
    ``@pytest.mark.scenario(name)``; a scenario that raised fails the tests that ask for it.
    """
    import scenarios
    done = {}

    def get(name):
        if name not in done:
            wanted = {m.args[0] for item in request.session.items
                      for m in item.iter_markers("scenario")} | {name}
            done.update(scenarios.run(wanted - set(done)))
        out, log, err = done[name]
        if err is not None:
            pytest.fail(f"scenario {name!r} failed:\n{err}\n--- its log ---\n{log[-6000:]}")
        return out, log
    return get


@pytest.fixture(scope="session")
def cp():
    """The cupy module, for tests marked ``gpu``: skips without cupy or without a visible GPU."""
    from rddtensor import backend
    cupy = pytest.importorskip("cupy")
    if not backend.gpu_available():
        pytest.skip("no CUDA GPU visible")
    return cupy


@pytest.fixture(scope="module")
def two_hosts():
    """A Spark standalone cluster of two "hosts" on this machine (``rddtensor.spark.testing``:
    a master on 127.0.0.1, one worker of one 1-core executor on each of 127.0.0.2 and 127.0.0.3,
    each with a private ``/dev/shm``), started once per test module and torn down after it;
    skips with the reason where it cannot start (no ``unshare``, mount namespaces not permitted,
    no Java 17, no 127.0.0.x).

    A process holds one SparkContext at a time and the ``spark`` fixture's may be live, so the
    session on this cluster lives in a subprocess: the fixture yields ``run(code, conf=None)
    -> (result, log)``, which runs ``code`` as a driver with ``spark`` (a session on the cluster,
    stopped when the code ends), ``sc`` and ``emit(obj)`` (hands a JSON-able result back); its
    ``.cluster`` is the ``testing.Cluster``.
    """
    from rddtensor.spark import testing
    reason = testing.unavailable_reason(hosts=2)
    if reason:
        pytest.skip(f"no multi-host test cluster: {reason}")
    import scenarios  # the scenarios' JVM options: C1 only, for JVMs that live seconds
    path = {"PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                                    if p])}
    driver = {**path, "PYSPARK_SUBMIT_ARGS": f'--driver-java-options "{scenarios.JVM_OPTIONS}" '
                                             'pyspark-shell'}
    jvm = {"spark.executor.extraJavaOptions": scenarios.JVM_OPTIONS}
    with testing.multi_host_cluster(hosts=2, env=path) as cluster:
        def run(code, conf=None):
            return testing.run_driver(cluster, code, conf={**jvm, **(conf or {})}, env=driver)
        run.cluster = cluster
        run.cluster_env = path["PYTHONPATH"]  # (for a second cluster a test starts itself)
        yield run


# --- the suite on two xdist workers (CI: ``python -m pytest -q -n 2``) ---------------------------
# Spark tests spend much of their time waiting (job scheduling, JVM and Python worker start-up,
# subprocesses), so two sessions side by side overlap well on two cores. What keeps that safe
# and balanced (none of it applies to a plain, serial run):
#
# 1. ``@pytest.mark.alone``: a test that lists the host-wide cache directory (``/dev/shm``, where
#    a fit in another worker adds and removes run directories) or that bounds a time runs while
#    no test runs in another worker. Every test holds a lock of this host's test runs while it
#    runs (setup, call, teardown): shared, or exclusive for an ``alone`` test, kept from one
#    ``alone`` test to the next when they follow each other.
# 2. Work units (``pytest_xdist_make_scheduler``): every test of a module runs in one worker, so
#    module-scoped fixtures (clusters, subprocess runs) are set up once, as in a serial run; the
#    modules that read the shared subprocess scenarios (``tests/scenarios.py``) are one unit, so
#    the scenario subprocess runs once; and the ``alone`` tests (``ALONE``) are one unit with
#    ``test_interrupted_fit.py`` (whose ``alone`` test shares its module fixtures), run first:
#    at the start the other worker is in short tests, so waiting for it costs little, and later
#    the lock never waits for another worker's minutes-long test.
# 3. Order: then the units known to be long, longest first (the rest keep their order); the
#    scheduler hands units out in that order as workers run low, so the long ones are spread
#    over the workers and the short ones fill the gaps at the end.
SCENARIO_MODULES = ("test_early_errors.py", "test_faults.py", "test_local_cluster.py")
#: the tests marked ``alone`` (module::function; the scheduler sees node ids, not marks)
ALONE = ("test_engine.py::test_local_cache_off_or_missing_gives_bit_identical_weights",
         "test_engine.py::test_records_between_partitions_use_the_cache_only_on_one_host",
         "test_shm_cleanup.py::test_the_next_fit_removes_what_a_sigkilled_driver_left",
         "test_interrupted_fit.py::"
         "test_ctrl_c_during_a_spark_job_cancels_it_and_keeps_the_last_completed_step")
ALONE_MODULES = ("test_interrupted_fit.py",)  # in the "alone" unit as a whole (module fixtures)
#: seconds per unit in a serial CI run (``--durations``), for the order of the long ones
UNIT_SECONDS = {"test_engine.py": 170, "scenarios": 190, "test_shards.py": 150,
                "test_examples.py": 150, "test_multihost.py": 140, "test_soak.py": 70,
                "test_checkpoint.py": 65, "test_cli.py": 45, "test_ml_pipeline.py": 35,
                "test_keras_habits.py": 32, "test_bad_input.py": 28, "test_callbacks.py": 22,
                "test_connect.py": 20}


def _in_alone(nodeid: str) -> bool:
    path, _, name = nodeid.partition("::")
    return f"{os.path.basename(path)}::{name}".startswith(ALONE)  # (and its parameters)


def _unit(nodeid: str) -> str:
    module = os.path.basename(nodeid.split("::", 1)[0])
    if module in ALONE_MODULES or _in_alone(nodeid):
        return "alone"
    return "scenarios" if module in SCENARIO_MODULES else module


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")  # (not the environment: subprocesses inherit it)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # (before xdist's own; xdist may be absent)
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` (``--dist load``, the default with ``-n``): the units above, in the order of the
    workers' collection (``pytest_collection_modifyitems``). Other ``--dist`` modes: xdist's."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _unit(nodeid)

    config.option.loadscopereorder = False  # (xdist's own order: units with the most tests first)
    return ByUnit(config, log)


def pytest_collection_modifyitems(config, items):
    if not _xdist_worker(config):
        return
    for item in items:
        if item.get_closest_marker("alone") and not _in_alone(item.nodeid):
            raise pytest.UsageError(f"{item.nodeid} is marked alone: add it to conftest.ALONE")

    def order(item):  # (a stable sort: the rest keep their order)
        unit = _unit(item.nodeid)
        if unit != "alone":
            return (1, -UNIT_SECONDS.get(unit, 0))
        # the alone tests of other modules, then each whole module, its alone tests first
        whole = item.path.name in ALONE_MODULES
        return (0, whole, item.get_closest_marker("alone") is None)
    items.sort(key=order)


class _RunLock:
    """A lock of this user's test runs on this host: shared, or exclusive (``alone``). A
    turnstile keeps an exclusive request from waiting behind a stream of shared ones."""

    def __init__(self):
        import tempfile
        base = os.path.join(tempfile.gettempdir(), f"rddtensor-tests-{os.getuid()}")
        self.turnstile = open(base + ".turnstile", "a")
        self.lock = open(base + ".lock", "a")
        self.exclusive = False

    def acquire(self, exclusive: bool) -> None:
        import fcntl
        if self.exclusive:  # (kept from the last test)
            return
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self.exclusive = exclusive
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def release(self) -> None:
        import fcntl
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.exclusive = False


_RUN_LOCK: list = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _xdist_worker(item.config):
        return (yield)
    if not _RUN_LOCK:
        _RUN_LOCK.append(_RunLock())
    lock, alone = _RUN_LOCK[0], item.get_closest_marker("alone") is not None
    lock.acquire(exclusive=alone)
    try:
        return (yield)
    finally:
        if not (alone and nextitem is not None and nextitem.get_closest_marker("alone")):
            lock.release()
