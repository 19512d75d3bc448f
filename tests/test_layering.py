"""Dependencies point down: backend -> math (layers, optim) -> training -> spark.

Reads every module's imports with ``ast`` (nothing is imported): no module imports one on a
higher floor; no import loops (a submodule import also runs the ``__init__`` of every package
above it); imports inside functions only of heavy optional third-party modules; nothing in the
tree imports a top-level ``layers`` or ``optim``; pyproject.toml lists every package.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: module prefix -> folder (pyproject.toml's package-dir)
FOLDERS = {"rddtensor.layers": "layers", "rddtensor.optim": "optim", "rddtensor": "rddtensor"}
#: a module's floor: its longest matching prefix. Floor 1 is the arrays switch rddtensor/backend.py, the ops
#: switch rddtensor/ops/, rddtensor/{allocator,runtime}.py; then the folders are the floors:
#: layers/ and optim/ (2), rddtensor/training (3), rddtensor/spark (4); the rest of rddtensor/
#: (Spark ML, the command line) is the top.
FLOORS = {"rddtensor.backend": 1, "rddtensor.ops": 1, "rddtensor.allocator": 1,
          "rddtensor.runtime": 1, "rddtensor._checkout": 1, "rddtensor.version": 1,
          "rddtensor.layers": 2, "rddtensor.optim": 2, "rddtensor.training": 3,
          "rddtensor.spark": 4, "rddtensor": 5}
#: faces: package __init__ files that only hand names on. The root face may import anything;
#: ``rddtensor.layers`` hands on the training names users spell ``L.Sequential`` (lazily).
FACES = {"rddtensor", "rddtensor.layers"}
#: third-party modules a function may import (heavy, or optional for in-process use; tqdm: the
#: driver's progress bar, never needed on an executor; onnx/onnxruntime: the ONNX export extra)
LAZY_OK = {"pyspark", "cupy", "cupyx", "torch", "matplotlib", "sklearn", "yaml", "tqdm", "onnx",
           "onnxruntime", "mlflow"}
#: our modules a function may import: the command line loads Spark ML (it imports pyspark.ml
#: at once) only for ``predict`` (``rddtensor info`` and ``--help`` stay light); the protocol's
#: ``Model.export`` loads the exporter (every layer class) only when a model is exported
LAZY_OK_OURS = {("rddtensor/cli.py", "rddtensor.ml"), ("rddtensor/cli.py", "rddtensor.ml.transform"),
                ("rddtensor/training/protocol.py", "rddtensor.training.onnx_export")}
#: what is still to mend, as (file, imported module, why); the list may only shrink
KNOWN: set = set()


def _modules():
    found = {}
    for prefix, folder in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            parts = [p for p in os.path.relpath(dirpath, base).split(os.sep) if p != "."]
            for f in files:
                if f.endswith(".py"):
                    found[".".join([prefix, *parts] + ([] if f == "__init__.py" else [f[:-3]]))] = \
                        os.path.join(dirpath, f)
    return found


def _floor(name):
    return FLOORS[max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len)]


def _imports(path, known):
    """``(module, in_function)`` for every import in ``path`` (``from pkg import sub`` -> sub)."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.extend((f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known
                            else child.module, in_function) for a in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(open(path, encoding="utf-8").read()), False)
    return out


def _cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(" <-> ".join(sorted(comp)))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_dependencies_point_down_and_never_loop():
    known = _modules()
    found, graph = set(), {m: set() for m in known}
    for name, path in known.items():
        rel = os.path.relpath(path, ROOT)
        for target, in_function in _imports(path, known):
            top = target.split(".")[0]
            if top != "rddtensor":
                if in_function and top not in LAZY_OK:
                    found.add((rel, target, "import inside a function"))
                continue
            if in_function and (rel, target) not in LAZY_OK_OURS:
                found.add((rel, target, "import inside a function"))
            if name not in FACES and _floor(target) > _floor(name):
                found.add((rel, target, "points up"))
            parts = target.split(".")  # the package __init__s it runs, except its own packages'
            graph[name] |= {p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                            if p in known and p != name and not name.startswith(p + ".")}
    found |= {(loop, "", "import loop") for loop in _cycles(graph)}
    assert found - KNOWN == set(), "\n".join(map(str, sorted(found - KNOWN)))
    assert KNOWN - found == set(), f"mended: remove from KNOWN {sorted(KNOWN - found)}"


_TOP_LEVEL = re.compile(r"^\s*(?:>>> |\.\.\. )?(?:import|from)\s+(?:[\w.]+ as \w+,\s*)*"
                        r"(?:layers|optim)\b|[\"'](?:layers|optim)\.\w+\.\w+[\"']", re.M)


def test_one_import_root_everywhere():
    """Code, doctests, code in strings (subprocesses), monkeypatch targets and the README."""
    bad = []
    paths = [os.path.join(ROOT, "README.md")]
    for top in ("rddtensor", "layers", "optim", "tests", "benchmarks", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            paths += [os.path.join(dirpath, f) for f in files if f.endswith((".py", ".md"))]
    for path in paths:
        text = open(path, encoding="utf-8").read()
        bad += [f"{os.path.relpath(path, ROOT)}: {m.group(0).strip()}"
                for m in _TOP_LEVEL.finditer(text)]
    assert bad == [], "write `from rddtensor import layers as L, optim`:\n" + "\n".join(bad)


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {m if os.path.basename(p) == "__init__.py" else m.rpartition(".")[0]
                for m, p in _modules().items()}
    assert packages <= listed, f"pyproject.toml lacks packages {sorted(packages - listed)}"
