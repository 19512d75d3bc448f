"""Turn failures inside Spark tasks into the Python error a user can act on.

A ``ValueError`` raised in a task reaches the driver wrapped in a ``Py4JJavaError`` whose text is a
JVM stack trace; ``spark_errors`` re-raises the original Python exception type and message first
(any built-in exception type: ``ValueError``, ``FileExistsError``, ``ZeroDivisionError``, ...; the
full task trace stays on the new exception as ``spark_trace``).

Spark also logs every failed task on the driver's console (``Executor``: "Exception in task",
``TaskSetManager``: "Lost task", each with the whole Python and JVM trace, ~45 lines per task)
before that one clear error arrives. ``quiet_task_failures`` turns those loggers down while the
engine's own jobs run; ``spark.rddtensor.quietTaskFailures=false`` keeps them.
"""
from __future__ import annotations

import builtins
import contextlib
import re
import threading

from rddtensor.training import loop as _loop

# the last line of a Python traceback: a built-in exception's name (never dotted: custom
# exceptions print as ``module.Name``) and its message
_PY_ERR = re.compile(r"^([A-Z]\w*(?:Error|Exception|Exit|Interrupt)): (.*)$", re.M)
QUIET_CONF = "spark.rddtensor.quietTaskFailures"

FitInterrupted = _loop.FitInterrupted  # re-exported: the warning both engines' fits give


def _builtin_error(name: str):
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return None


def task_error(exc: BaseException):
    """The Python exception a Spark task raised, rebuilt from ``exc``'s text, or ``None``."""
    text = str(exc)
    for name, msg in reversed(_PY_ERR.findall(text)):
        cls = _builtin_error(name)
        if cls is None:
            continue
        try:
            err = cls(msg)
        except Exception:  # a type whose constructor wants other arguments
            err = RuntimeError(f"{name}: {msg}")
        err.spark_trace = text  # the whole task trace (Python and JVM), for who needs it
        return err
    return None


@contextlib.contextmanager
def spark_errors():
    """Re-raise a task's ValueError/TypeError/OSError/... as itself instead of a Py4JJavaError
    (its ``spark_trace`` attribute keeps the full text)."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ not in ("Py4JJavaError", "PythonException"):
            raise
        err = task_error(exc)
        if err is None:
            raise
        raise err from None


# --- the console while the engine's jobs run ------------------------------------------------------
# driver-side log4j loggers that print a failed task's whole trace (Python and JVM) per task, and
# the level each is held at meanwhile: a task's failure reaches the user as one exception
# (``spark_errors``), which names the original Python error and keeps the trace (``spark_trace``)
_NOISY = {
    # ERROR "Exception in task ...": on local masters the executor runs in the driver's JVM,
    # and this repeats TaskSetManager's line (on a cluster it is in the executor's own log)
    "org.apache.spark.executor.Executor": "FATAL",
    # WARN "Lost task ..." with the trace, ERROR "Task ... failed N times; aborting job": only
    # where a task is never retried (``local[N]``), so every failed task is the job's failure
    # and the exception says it all; with retries, an attempt that failed and was retried
    # shows nowhere else
    "org.apache.spark.scheduler.TaskSetManager": "FATAL",
    "org.apache.spark.storage.DiskBlockObjectWriter": "ERROR",  # WARN on a killed task's files
}
_RETRIED_TOO = ("org.apache.spark.scheduler.TaskSetManager",)


def task_attempts(sc) -> int:
    """How many times Spark tries a task before the job fails (``local[N]``: 1)."""
    try:
        return int(sc._jsc.sc().taskScheduler().maxTaskFailures())
    except Exception:
        m = re.fullmatch(r"local(?:\[[^,\]]+(?:,\s*(\d+))?\])?", sc.master.strip())
        if m:
            return int(m.group(1) or 1)
        return int(sc.getConf().get("spark.task.maxFailures", "4"))
_quiet_lock = threading.Lock()
_quiet = {"depth": 0, "saved": None}


def marked_line(text: str, marker: str) -> str:
    """The part of ``text`` (a failed job's message, with its tasks' traces) from ``marker`` to
    the end of that line (at most 300 characters), or ``""`` when ``marker`` is not in it."""
    at = text.find(marker)
    return text[at:].splitlines()[0][:300] if at >= 0 else ""


def spark_setting(sc, key: str, default: str) -> str:
    """A setting from the active session's runtime conf (``spark.conf.set``), else the
    SparkContext's conf, else ``default``."""
    from pyspark.sql import SparkSession
    spark = SparkSession.getActiveSession()
    value = spark.conf.get(key, None) if spark is not None else None
    return value if value is not None else sc.getConf().get(key, default)


def _set_levels(sc):
    """Hold the ``_NOISY`` loggers at their quiet levels; returns what to restore (a logger's
    own level, or ``None`` where it only inherited one), or ``None`` if log4j is not there."""
    try:
        log4j = sc._jvm.org.apache.logging.log4j
        config = log4j.LogManager.getContext(False).getConfiguration()
        saved = {}
        retries = task_attempts(sc) > 1
        for name, level in _NOISY.items():
            if retries and name in _RETRIED_TOO:
                continue
            own = config.getLoggerConfig(name)
            saved[name] = str(own.getLevel()) if own.getName() == name else None
            log4j.core.config.Configurator.setLevel(name, log4j.Level.toLevel(level))
        return saved
    except Exception:  # another logging backend, or a JVM that is gone: the logs stay as they are
        return None


def _restore_levels(sc, saved) -> None:
    try:
        log4j = sc._jvm.org.apache.logging.log4j
        ctx = log4j.LogManager.getContext(False)
        config = ctx.getConfiguration()
        for name, level in saved.items():
            if level is None:  # it had no level of its own: inherit again (e.g. sc.setLogLevel)
                config.removeLogger(name)
            else:
                log4j.core.config.Configurator.setLevel(name, log4j.Level.toLevel(level))
        ctx.updateLoggers()
    except Exception:
        pass


@contextlib.contextmanager
def quiet_task_failures(sc):
    """While the block runs, Spark's per-task failure logs stay off the driver's console.

    A failed task is otherwise logged on the driver, once by ``Executor`` (local masters run
    the executor in the driver's JVM) and once by ``TaskSetManager``, each time with the whole
    Python and JVM trace, before the job fails and ``spark_errors`` raises the one clear
    error. ``Executor``'s lines are held back always; ``TaskSetManager``'s only where tasks
    are never retried (``local[N]``: each failed task fails the job), since with retries its
    "Lost task" line is the only sign of an attempt that failed and was retried. Nested and
    concurrent uses share one setting; the levels are restored when the last one ends. On a
    cluster the executors' own logs (Spark UI) still hold every trace; on a local master the
    console is Spark's only log, so the trace is then only on the exception (``spark_trace``).
    ``spark.rddtensor.quietTaskFailures=false`` (session or SparkContext conf) keeps Spark's
    logs as they are.
    """
    try:
        wanted = spark_setting(sc, QUIET_CONF, "true").strip().lower() != "false"
    except Exception:
        wanted = False
    if not wanted:
        yield
        return
    with _quiet_lock:
        _quiet["depth"] += 1
        if _quiet["depth"] == 1:
            _quiet["saved"] = _set_levels(sc)
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0 and _quiet["saved"] is not None:
                saved, _quiet["saved"] = _quiet["saved"], None
                _restore_levels(sc, saved)
