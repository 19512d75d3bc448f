"""A Spark standalone cluster of several "hosts" on one machine, for tests and benchmarks.

``multi_host_cluster()`` starts a standalone master on 127.0.0.1 and one worker per host on
127.0.0.2, 127.0.0.3, ... (the pip-installed pyspark's ``spark-class``; no ``SPARK_HOME`` to
install), each worker in a mount namespace of its own with a fresh tmpfs on ``/dev/shm``, so
what one host writes to its host-local cache (``rddtensor.spark.localcache``) the others cannot
read, as on real machines. It yields a ``Cluster``: its ``master`` URL and the ``conf`` a
driver needs on it::

    from rddtensor.spark.session import get_spark
    from rddtensor.spark.testing import multi_host_cluster, unavailable_reason

    if unavailable_reason() is None:
        with multi_host_cluster(hosts=2) as cluster:  # 2 hosts, 1 executor of 1 core each
            spark = get_spark(cluster.master, conf=cluster.conf)
            ...                                       # engine.one_host(sc) is False here
            spark.stop()                              # before the cluster goes

(or ``SparkSession.builder.master(cluster.master)`` with each of ``cluster.conf`` set).
``multi_host_cluster(hosts=2, executors_per_host=2)`` gives two executors on each of two hosts
(one worker of 2 cores per host, ``spark.executor.cores=1``), for paths between executors of
one host. On leaving the block, however it is left, every process is killed (the executors
with their worker: each worker runs in a process group of its own) and the temporary
directory (worker and local dirs, executor logs, daemon logs) is removed.
``unavailable_reason()`` says why such a cluster cannot start here (``None`` when it can):
tests skip with it. ``run_driver(cluster, code)`` runs a driver script in a fresh Python
process (one process holds one SparkContext at a time, and a test suite's may be live).

What it needs: Linux, ``unshare`` (util-linux) and the right to make mount namespaces and mount
a tmpfs in them (root, CAP_SYS_ADMIN; without it, unprivileged user namespaces, through
``unshare --map-root-user``), Java 17+, and the loopback addresses 127.0.0.x (Linux routes all
of 127/8 to ``lo``; macOS does not).

What it isolates: ``/dev/shm`` (host-local cache files), the addresses (the executors of host
``i`` register as 127.0.0.(i+1), so ``engine.one_host`` is False), the Spark local and work
directories (separate paths), and the host identity the library uses (``localcache.host_id``,
from ``RDDTENSOR_HOST_ID``, which each worker passes on to its executors and their Python
workers). What it does not: CPU, memory, the disk and the rest of the file system, process ids
and the network are shared; bytes between "hosts" cross loopback, not a wire, so timings show
the cost of the shuffle's copies and protocol, not of a network's bandwidth or latency.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

from rddtensor.spark.session import java_version

__all__ = ["Cluster", "multi_host_cluster", "unavailable_reason", "run_driver", "HOST_ID_ENV"]

HOST_ID_ENV = "RDDTENSOR_HOST_ID"
"""The environment variable that names a fake host to ``localcache.host_id``."""

#: the master and workers do bookkeeping only and live minutes: the C1 compiler is enough (C2
#: spent about half of a short-lived JVM's start-up CPU compiling code it never ran long)
DAEMON_JAVA_OPTS = "-XX:TieredStopAtLevel=1"
_NS = ["unshare", "--mount", "--propagation", "private"]
#: inside the namespace: a fresh /dev/shm, then the worker itself (exec: same pid)
_SHM = 'mount -t tmpfs -o mode=1777{size} tmpfs /dev/shm && exec "$@"'


@dataclasses.dataclass
class Cluster:
    """A running ``multi_host_cluster``: what a driver needs to use it."""
    master: str                  #: spark://127.0.0.1:<port>
    conf: dict                   #: session settings for this cluster (``get_spark(conf=...)``)
    hosts: list                  #: the workers' addresses, one per host
    executors_per_host: int
    web_ui: str                  #: the master's web UI (``/json/`` lists the workers)
    directory: str               #: the temporary directory (removed on exit)

    @property
    def executors(self) -> int:
        return len(self.hosts) * self.executors_per_host

    def workers(self) -> list:
        """The master's view of its workers (the ``workers`` of its ``/json/`` page)."""
        with urllib.request.urlopen(self.web_ui + "/json/", timeout=5) as r:
            return json.load(r)["workers"]


def _spark_class() -> str:
    from pyspark.find_spark_home import _find_spark_home
    return os.path.join(_find_spark_home(), "bin", "spark-class")


def _probe(cmd: list) -> str | None:
    """``None`` if ``cmd`` succeeds, else its error (stderr's last line or the exception)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if p.returncode == 0:
        return None
    lines = (p.stderr or p.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {p.returncode}"


_NS_CACHE: dict = {}


def _namespace_prefix() -> tuple:
    """``(unshare command, None)`` that can mount a private /dev/shm, or ``(None, why not)``."""
    if "v" not in _NS_CACHE:
        test = ["sh", "-c", _SHM.format(size=",size=1m"), "sh", "true"]
        errors = []
        for prefix in (_NS, _NS + ["--map-root-user"]):
            err = _probe(prefix + ["--"] + test)
            if err is None:
                _NS_CACHE["v"] = (prefix, None)
                break
            errors.append(f"`{' '.join(prefix)}`: {err}")
        else:
            _NS_CACHE["v"] = (None, "mount namespaces with a private /dev/shm are not permitted "
                                    "here (" + "; ".join(errors) + ")")
    return _NS_CACHE["v"]


def _loopback_reason(ips) -> str | None:
    for ip in ips:
        try:
            with socket.socket() as s:
                s.bind((ip, 0))
                s.listen(1)
                with socket.create_connection(s.getsockname(), timeout=2):
                    pass
        except OSError as e:
            return f"loopback address {ip} is not usable ({e}); Linux routes 127/8 to lo"
    return None


def _host_ips(hosts: int) -> list:
    return [f"127.0.0.{i + 2}" for i in range(hosts)]


def unavailable_reason(hosts: int = 2) -> str | None:
    """Why ``multi_host_cluster(hosts)`` cannot run on this machine, or ``None`` if it can."""
    if not sys.platform.startswith("linux"):
        return f"multi-host test clusters need Linux (mount namespaces), not {sys.platform}"
    if shutil.which("unshare") is None:
        return "no `unshare` binary (util-linux) on PATH"
    v = java_version()
    if v is None or v < 17:
        return f"Spark needs Java 17+ (found {v or 'none'})"
    if not os.path.exists(_spark_class()):
        return f"pyspark's spark-class is missing ({_spark_class()})"
    why = _loopback_reason(["127.0.0.1"] + _host_ips(hosts))
    if why:
        return why
    return _namespace_prefix()[1]


def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group (a worker's shutdown hook kills its executors), then SIGKILL
    whatever is left in it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # executors that outlived their worker
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def multi_host_cluster(hosts: int = 2, executors_per_host: int = 1, cores: int = 1,
                       memory: str = "1g", shm_size: str | None = None, env: dict | None = None,
                       timeout: float = 90.0):
    """Start a standalone cluster of ``hosts`` fake hosts on this machine; yield a ``Cluster``.

    Each host is one worker with ``executors_per_host * cores`` cores and as many times
    ``memory``; ``Cluster.conf`` asks for executors of ``cores`` cores and ``memory`` each, all
    of them (``spark.cores.max``), spread over the hosts (the master's default). ``shm_size``
    caps each host's ``/dev/shm`` (tmpfs ``size=``, e.g. ``"2g"``; default: the kernel's, half
    the memory). ``env`` is added to the workers' environment, which their executors and Python
    workers inherit (e.g. ``PYTHONPATH`` for a checkout that is not installed). Raises
    ``RuntimeError`` with the reason and the daemons' log tails when the cluster does not come
    up within ``timeout`` seconds.
    """
    if not 1 <= hosts <= 200:
        raise ValueError(f"hosts={hosts}: 1 to 200 (127.0.0.2 ...)")
    worker_memory = _times(memory, executors_per_host)
    why = unavailable_reason(hosts)
    if why:
        raise RuntimeError(f"cannot start a multi-host cluster: {why}")
    prefix = _namespace_prefix()[0]
    from pyspark.find_spark_home import _find_spark_home
    spark_home = _find_spark_home()
    spark_class = _spark_class()
    ips = _host_ips(hosts)
    workdir = tempfile.mkdtemp(prefix="rddtensor-cluster-")
    procs, logs = [], []
    try:
        conf_dir = os.path.join(workdir, "conf")  # no spark-env.sh / defaults of the machine's
        os.makedirs(conf_dir)
        base = {**os.environ, "SPARK_HOME": spark_home, "SPARK_CONF_DIR": conf_dir,
                "SPARK_DAEMON_JAVA_OPTS": DAEMON_JAVA_OPTS, **(env or {})}
        port, web = _free_port(), _free_port()

        def start(name, cmd, extra):
            log = os.path.join(workdir, f"{name}.log")
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(cmd, env={**base, **extra}, stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
            logs.append((name, log))

        start("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host",
                         "127.0.0.1", "--port", str(port), "--webui-port", str(web)],
              {"SPARK_LOCAL_IP": "127.0.0.1"})
        master = f"spark://127.0.0.1:{port}"
        boot = ""
        with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        size = f",size={shm_size}" if shm_size else ""
        for i, ip in enumerate(ips):
            local = os.path.join(workdir, f"host{i}", "local")
            work = os.path.join(workdir, f"host{i}", "work")
            os.makedirs(local)
            os.makedirs(work)
            start(f"worker{i}", prefix + ["--", "sh", "-c", _SHM.format(size=size), "sh",
                                          spark_class, "org.apache.spark.deploy.worker.Worker",
                                          "--host", ip, "--port", "0", "--webui-port", "0",
                                          "--cores", str(executors_per_host * cores),
                                          "--memory", worker_memory,
                                          "--work-dir", work, master],
                  {"SPARK_LOCAL_IP": ip, "SPARK_LOCAL_DIRS": local, "SPARK_WORKER_DIR": work,
                   HOST_ID_ENV: f"{socket.gethostname()}/{boot}/{ip}"})
        cluster = Cluster(
            master=master, hosts=ips, executors_per_host=executors_per_host,
            web_ui=f"http://127.0.0.1:{web}", directory=workdir,
            conf={"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                  "spark.executor.cores": str(cores), "spark.executor.memory": memory,
                  "spark.cores.max": str(hosts * executors_per_host * cores)})
        _wait_for_workers(cluster, procs, logs, timeout)
        yield cluster
    finally:
        for p in reversed(procs):  # workers (and their executors) first, then the master
            _stop(p)
        shutil.rmtree(workdir, ignore_errors=True)


def _times(memory: str, n: int) -> str:
    """``memory`` (Spark's ``512m``, ``1g``) times ``n``, in megabytes."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}
    m = memory.strip().lower().rstrip("b")
    mb = float(m[:-1]) * units[m[-1]] if m[-1] in units else float(m) / (1 << 20)
    return f"{int(mb * n)}m"


def _wait_for_workers(cluster: Cluster, procs, logs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        for p, (name, log) in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"the {name} exited (code {p.returncode}) before the cluster "
                                   f"was up; its log ends:\n{_tail(log)}")
        try:
            seen = cluster.workers()
        except (OSError, ValueError):  # the master's web UI is not up (or not ready) yet
            seen = None
        else:
            alive = {w["host"] for w in seen if w.get("state") == "ALIVE"}
            if alive >= set(cluster.hosts):
                return
        time.sleep(0.25)
    tails = "\n".join(f"--- {name}:\n{_tail(log, 1500)}" for name, log in logs)
    raise RuntimeError(f"the workers did not register with {cluster.master} within {timeout} s "
                       f"(the master sees {seen!r}); the logs end:\n{tails}")


_RUNNER = textwrap.dedent("""
    import json, sys, time
    from rddtensor.spark.session import get_spark
    master, conf, code, executors, timeout = json.load(sys.stdin)
    def emit(out):
        print("RESULT " + json.dumps(out), flush=True)
    spark = get_spark(master, app_name="rddtensor-multi-host", conf=conf)
    try:
        status = spark.sparkContext._jsc.sc().getExecutorMemoryStatus  # the driver's, and theirs
        deadline = time.monotonic() + timeout
        while status().size() < executors + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{status().size() - 1} of {executors} executors registered "
                                   f"within {timeout} s")
            time.sleep(0.1)
        exec(compile(code, "<driver script>", "exec"),
             {"__name__": "__main__", "spark": spark, "sc": spark.sparkContext, "emit": emit})
    finally:
        spark.stop()
""")


def run_driver(cluster: Cluster, code: str, conf: dict | None = None, env: dict | None = None,
               timeout: float = 600) -> tuple:
    """Run ``code`` as a driver in a new Python process: it gets ``spark`` (a session on
    ``cluster``, with ``cluster.conf`` and ``conf``, once all of the cluster's executors have
    registered), ``sc`` and ``emit(obj)``, which hands a JSON-able ``obj`` back. Returns
    ``(obj, log)`` (``log``: the process's stderr, Spark's log); raises ``RuntimeError`` with
    the log's tail when the script fails, emits nothing or runs past ``timeout`` seconds."""
    payload = json.dumps([cluster.master, {**cluster.conf, **(conf or {})}, code,
                          cluster.executors, 120])
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
           **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-c", _RUNNER], input=payload, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise RuntimeError(f"driver script timed out after {timeout} s; its log ends:\n"
                           f"{(log or '')[-6000:]}") from None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            if p.returncode == 0:
                return json.loads(line[len("RESULT "):]), p.stderr
    raise RuntimeError(f"driver script failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                       f"{p.stderr[-8000:]}")
