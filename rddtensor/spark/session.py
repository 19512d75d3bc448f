"""Finding or starting the Spark session rddtensor runs on.

The default is an embedded ``local[*]`` master: nothing to install but Java 17+.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

DEFAULT_CONF = {
    "spark.ui.showConsoleProgress": "false",
    "spark.locality.wait": "0s",          # tasks never wait for a "better" executor...
    # ...but for one on the host that holds their data: a partition's shard, its data-store
    # files and its host-local cache files are on one host (rawrdd.home), and with more
    # partitions than cores a free core elsewhere would take the task at once, miss, and turn
    # the cache off. On one host every executor is on it: this never delays a task there.
    "spark.locality.wait.node": "3s",
    "spark.python.worker.reuse": "true",  # keeps worker-local caches warm between tasks
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # JVM <-> Python worker stream buffer (default 64 KB): parameter blocks are megabytes, and
    # Spark 4's runner writes at most about one buffer per select() round. 256 KiB, not more:
    # G1 allocates arrays of half a heap region (512 KiB at a 1 GiB heap) or more as humongous
    # old-generation objects, and these buffers are allocated per task; so are the chunks in
    # which cached blocks are serialized (unrollMemoryThreshold, default 1 MiB).
    "spark.buffer.size": str(1 << 18),
    "spark.storage.unrollMemoryThreshold": str(1 << 18),
    # one BLAS thread per task: Spark already runs one task per core
    "spark.executorEnv.OMP_NUM_THREADS": "1",
    "spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
    "spark.executorEnv.MKL_NUM_THREADS": "1",
    # the engine stores each cut parameter state on two executors (rddtensor.spark.engine); an
    # executor picks where to copy a block from its cached list of peers, kept 60 s by default:
    # after an executor is lost and replaced, blocks stored within that minute got no copy
    # (the list still named only the dead peer, or none), and a second loss then lost them
    "spark.storage.cachedPeersTtl": "5000",
    # JVM <-> Python workers over a Unix domain socket instead of loopback TCP (Spark 4.1+;
    # ignored before): every parameter and gradient byte crosses this socket twice per pass
    "spark.python.unix.domain.socket.enabled": "true",
}

LOCAL_CONF = {
    # on one host, shuffle files never cross a network: lz4 on float32 parameters and
    # gradients saves almost no bytes and costs CPU on both ends (applied to local masters only)
    "spark.shuffle.compress": "false",
}


def java_version() -> int | None:
    """Major version of the ``java`` Spark will use (JAVA_HOME first), or ``None`` if absent."""
    home = os.environ.get("JAVA_HOME")
    exe = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not exe or not os.path.exists(exe):
        return None
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def check_java(minimum: int = 17) -> int:
    """Raise a clear error when Java is missing or older than ``minimum``; return the version."""
    v = java_version()
    if v is None:
        raise RuntimeError("Java was not found: Spark needs Java 17 or newer. Install it "
                           "(e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME; "
                           "check with `java -version`.")
    if v < minimum:
        raise RuntimeError(f"Java {v} is too old: Spark needs Java {minimum} or newer "
                           "(check with `java -version`, or point JAVA_HOME at a newer JDK).")
    return v


def get_spark(master: str | None = None, app_name: str = "rddtensor", conf: dict | None = None):
    """The active SparkSession, or a new one on ``master`` (default ``local[*]``).

    Example:
        >>> spark = get_spark("local[2]")   # doctest: +SKIP
    """
    from pyspark.sql import SparkSession
    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active
    check_java()
    master = master or "local[*]"
    builder = SparkSession.builder.master(master).appName(app_name)
    local = LOCAL_CONF if master.startswith("local") else {}
    for k, v in {**DEFAULT_CONF, **local, **(conf or {})}.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
