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
