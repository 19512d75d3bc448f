"""A killed fit leaks no host memory: the host-local cache's files under ``/dev/shm``
(``rddtensor.spark.localcache``) of a driver ended by SIGTERM are removed by the driver itself, those of
a SIGKILLed one by the next fit on the host, and ``rddtensor info`` shows what is there.

The drivers run in subprocesses started in a session of their own, with a marker in their
environment that their JVM and Python workers inherit: every process of theirs is killed at the
end of each test, whatever happened."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from rddtensor.spark import localcache
from rddtensor.spark.config import CacheSettings, Kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JVM_OPTIONS = "-XX:TieredStopAtLevel=1"  # as tests/scenarios.py: these JVMs live seconds

# a driver that fits a small Dense model (P = 2,306) on local[2] until it is killed
DRIVER = textwrap.dedent("""
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.optim import SGD
    from rddtensor.spark.session import get_spark
    spark = get_spark("local[2]", conf={"spark.default.parallelism": "2",
                                        "spark.ui.enabled": "false"})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2048, 32)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = L.Sequential([L.Dense(64, activation="relu", input_shape=(32,)), L.Dense(2)])
    model.compile(optimizer=SGD(0.01), loss="sparse_categorical_crossentropy")
    model.fit(spark.sparkContext.parallelize(list(zip(X, y)), 2), epochs=100_000,
              batch_size=32, verbose=0)
""")


def _marked(mark: str) -> list:
    """The pids of the processes whose environment carries ``mark`` (the driver, its JVM, the
    JVM's Python workers)."""
    pids, needle = [], f"RDDTENSOR_TEST_MARK={mark}".encode()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


@pytest.fixture()
def driver(tmp_path):
    """``start() -> Popen``: a fitting driver subprocess; all of its processes die at the end."""
    mark, procs = uuid.uuid4().hex, []

    def start():
        env = dict(os.environ, RDDTENSOR_TEST_MARK=mark)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYSPARK_SUBMIT_ARGS"] = (f'--driver-java-options "{JVM_OPTIONS}" '
                                      f'--conf "spark.executor.extraJavaOptions={JVM_OPTIONS}" '
                                      "pyspark-shell")
        log = open(tmp_path / f"driver-{len(procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        proc.log, proc.mark = tmp_path / f"driver-{len(procs)}.log", mark
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait(timeout=30)
    _kill_marked(mark)


def _kill_marked(mark: str) -> None:
    deadline = time.time() + 30
    while (pids := _marked(mark)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def _owner_pid(path: str):
    try:
        with open(os.path.join(path, "owner")) as f:
            return json.load(f).get("pid")
    except (OSError, ValueError):
        return None


def _cache_files(path: str) -> list:
    try:
        return [f for f in os.listdir(path) if f != "owner" and not f.startswith(".")]
    except OSError:
        return []


def _wait_for_run(proc, before: set, timeout: float = 90) -> str:
    """The directory of the cache files ``proc`` writes, once the fit has written some: the one
    whose owner file names ``proc`` (other fits may run on this host meanwhile)."""
    base, deadline = localcache.root(), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (f"the driver exited ({proc.returncode}):\n"
                                     + proc.log.read_text(errors="replace")[-4000:])
        try:
            names = set(os.listdir(base)) - before
        except OSError:
            names = set()
        for name in sorted(names):
            path = os.path.join(base, name)
            if _owner_pid(path) == proc.pid and _cache_files(path):
                return path
        time.sleep(0.2)
    raise AssertionError(f"no cache files in a run directory the driver owns in {timeout} s:\n"
                         + proc.log.read_text(errors="replace")[-4000:])


def _before() -> set:
    try:
        return set(os.listdir(localcache.root()))
    except OSError:
        return set()


@pytest.mark.alone  # another fit on the host would remove the killed run first (conftest.py)
@pytest.mark.slow
@pytest.mark.spark
def test_the_next_fit_removes_what_a_sigkilled_driver_left(driver, spark, capsys):
    from rddtensor import layers as L
    from rddtensor.optim import SGD
    from rddtensor.cli import main
    before = _before()
    proc = driver()
    run_dir = _wait_for_run(proc, before)  # (the driver registered the run it owns)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM
    proc.wait(timeout=30)
    _kill_marked(proc.mark)  # and the JVM's Python workers (their own process group)
    assert _cache_files(run_dir)  # what the killed fit left in memory

    assert main(["info"]) == 0  # shows it, and says the driver is gone
    line, = [l for l in capsys.readouterr().out.splitlines() if os.path.basename(run_dir) in l]
    assert f"driver pid {proc.pid} gone" in line and "kB in" in line

    # the next fit on the host (here: in the test process, on the test session)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(64, 4)).astype(np.float32)
    model = L.Sequential([L.Dense(2, input_shape=(4,))])
    model.compile(optimizer=SGD(0.1), loss="sparse_categorical_crossentropy")
    rdd = spark.sparkContext.parallelize(list(zip(X, (X[:, 0] > 0).astype(np.int64))), 2)
    model.fit(rdd, epochs=1, batch_size=16, verbose=0)
    assert not os.path.exists(run_dir), os.listdir(run_dir)
    assert not [p for p in (os.path.join(localcache.root(), n) for n in _before())
                if _owner_pid(p) == proc.pid]  # no file of the killed driver remains


@pytest.mark.slow
def test_a_sigtermed_driver_removes_its_files_and_still_terminates(driver):
    before = _before()
    proc = driver()
    run_dir = _wait_for_run(proc, before)
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `timeout` does
    assert proc.wait(timeout=30) == -signal.SIGTERM  # terminated by SIGTERM, as without us
    assert not os.path.exists(run_dir), (os.listdir(run_dir),
                                         proc.log.read_text(errors="replace")[-4000:])


# --- the same, without Spark: a process that owns a run, and `rddtensor info` -----------------
def _owner_process(root: str, run: str, before_register: str = "") -> subprocess.Popen:
    """A Python process that registers ``run`` under ``root``, writes a file, says "ready"."""
    code = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from rddtensor.spark import localcache
        from rddtensor.spark.config import CacheSettings, Kind
        localcache.root = lambda: {root!r}
        {before_register}
        localcache.register_run({run!r})
        localcache.put(CacheSettings(run={run!r}, job=1), Kind.GRAD, 0, 1, {{}},
                       {{"g": np.ones(1000)}})
        print("ready", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc


def _end(proc, sig) -> int:
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_sigterm_chains_to_the_handler_it_replaced(tmp_path):
    root = str(tmp_path / "cache")
    previous = ("import signal, sys\n"
                "        signal.signal(signal.SIGTERM, lambda s, f: (print('previous', "
                "flush=True), sys.exit(3)))")
    proc = _owner_process(root, "chained", previous)
    assert os.listdir(os.path.join(root, "chained"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 3 and "previous" in out  # the replaced handler ran
    assert not os.path.exists(os.path.join(root, "chained"))


def test_info_lists_runs_with_their_owner_and_cleans_the_stale_ones(tmp_path, monkeypatch,
                                                                   capsys):
    from rddtensor.cli import main
    root = tmp_path / "cache"
    monkeypatch.setattr(localcache, "root", lambda: str(root))
    localcache._SEEN_RUNS.clear()
    handler = signal.getsignal(signal.SIGTERM)
    # a run whose driver was SIGKILLed; an executor's directory (no owner file), fresh and old
    dead = _owner_process(str(root), "deadrun")
    assert _end(dead, signal.SIGKILL) == -signal.SIGKILL
    for name, age in (("executor-new", 0), ("executor-old", 2 * 3600)):
        (root / name).mkdir()
        (root / name / "grad-0-0").write_bytes(b"x" * 1000)
        past = time.time() - age
        os.utime(root / name / "grad-0-0", (past, past))
        os.utime(root / name, (past, past))
    # a live run: this process owns it (registering it removes nothing that is not stale)
    localcache.register_run("liverun")
    try:
        assert signal.getsignal(signal.SIGTERM) is not handler  # ours while a run is owned
        localcache.put(CacheSettings(run="liverun", job=1), Kind.GRAD, 0, 1, {},
                       {"g": np.ones(10)})
        assert not (root / "deadrun").exists() and not (root / "executor-old").exists()
        # again, as `rddtensor info` finds them after a SIGKILL, before the next fit
        dead = _owner_process(str(root), "deadrun")
        assert _end(dead, signal.SIGKILL) == -signal.SIGKILL
        assert main(["info"]) == 0
        lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()
                 if l.startswith("          ")}
        assert f"driver pid {os.getpid()} running" in lines["liverun"]
        assert f"driver pid {dead.pid} gone" in lines["deadrun"]
        assert " kB in 1 file(s), driver pid" in lines["liverun"]
        assert " 8.1 kB in 1 file(s), driver pid" in lines["deadrun"]  # 1,000 float64 + header
        assert "no driver file" in lines["executor-new"]
        assert main(["info", "--clean-cache"]) == 0
        out = capsys.readouterr().out
        assert f"removed   {root / 'deadrun'}" in out
        assert sorted(os.listdir(root)) == ["executor-new", "liverun"]
    finally:
        localcache.drop_run("liverun")
    assert not (root / "liverun").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # restored when the last run is dropped


def test_a_task_after_its_runs_end_does_not_make_the_directory_anew(tmp_path, monkeypatch):
    monkeypatch.setattr(localcache, "root", lambda: str(tmp_path / "cache"))
    localcache._SEEN_RUNS.clear()
    cache = CacheSettings(run="ended", job=1, owner=localcache.register_run("ended"))
    assert localcache.put(cache, Kind.GRAD, 0, 1, {}, {"g": np.ones(4)}) is not None
    localcache.drop_run("ended")  # the driver's SIGTERM, or the end of its fit
    localcache._SEEN_RUNS.clear()  # a task in a worker that has not written for it yet
    assert localcache.put(cache, Kind.GRAD, 1, 1, {}, {"g": np.ones(4)}) is None  # goes inline
    assert not (tmp_path / "cache" / "ended").exists()
