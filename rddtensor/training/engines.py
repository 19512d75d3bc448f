"""Which engine trains on which data: a registry the engines fill, read by ``fit``.

The training floor knows nothing of Spark. The Spark engine registers itself here (from
``rddtensor/__init__.py``) under the types it trains on, by qualified name; ``engine_for(x)``
finds the engine for ``x`` without importing pyspark (a type whose module is not loaded cannot
be ``x``'s type) and imports the engine only then. Data no engine claims (numpy arrays, scipy
sparse matrices, lists) trains in this process.
"""
from __future__ import annotations

import importlib
import sys

_ENGINES: list = []  # (qualified type names, engine module, its fit options)


def register(module: str, types, options=()) -> None:
    """Route data of ``types`` (qualified class names) to the engine ``module``, which has
    ``fit_distributed``, ``evaluate_distributed`` and ``predict_distributed``; ``options`` are
    the ``fit`` keyword arguments only that engine takes."""
    entry = (tuple(types), module, tuple(options))
    if entry not in _ENGINES:
        _ENGINES.append(entry)


def engine_options() -> tuple:
    """Every registered engine's own ``fit`` options (checked before any engine is imported)."""
    return tuple(dict.fromkeys(o for _, _, options in _ENGINES for o in options))


def _loaded_class(qualname: str):
    module, _, name = qualname.rpartition(".")
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return cls if isinstance(cls, type) else None


def engine_for(data):
    """The engine module registered for ``data``'s type (imported now), or ``None``.

    The most specific registered type wins: a Spark Connect DataFrame is also a
    ``pyspark.sql.dataframe.DataFrame``, and goes to the engine registered for Connect's own.
    """
    best = None  # (class, module)
    for types, module, _ in _ENGINES:
        for t in types:
            cls = _loaded_class(t)
            if cls is not None and isinstance(data, cls) and \
                    (best is None or issubclass(cls, best[0])):
                best = (cls, module)
    return importlib.import_module(best[1]) if best is not None else None
