"""Turn failures inside Spark tasks into the Python error a user can act on.

A ``ValueError`` raised in a task reaches the driver wrapped in a ``Py4JJavaError`` whose text is a
JVM stack trace; ``spark_errors`` re-raises the original Python exception type and message first.
"""
from __future__ import annotations

import contextlib
import re

_PY_ERR = re.compile(r"^(ValueError|TypeError|KeyError|RuntimeError|MemoryError): (.*)$", re.M)
_TYPES = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
          "RuntimeError": RuntimeError, "MemoryError": MemoryError}


def task_error(exc: BaseException):
    """The Python exception a Spark task raised, rebuilt from ``exc``'s text, or ``None``."""
    matches = _PY_ERR.findall(str(exc))
    if not matches:
        return None
    name, msg = matches[-1]
    return _TYPES[name](msg)


@contextlib.contextmanager
def spark_errors():
    """Re-raise a task's ValueError/TypeError/... as itself instead of a Py4JJavaError."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ not in ("Py4JJavaError", "PythonException"):
            raise
        err = task_error(exc)
        if err is None:
            raise
        raise err from None
