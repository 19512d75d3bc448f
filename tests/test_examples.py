"""Every script in ``examples/`` runs to the end and asserts its headline result.

Examples run with ``RDDTENSOR_QUICK=1``, which shrinks their rows and epochs, inside this test
session (``runpy``, in a temporary directory) so that they share its Spark session: a fresh JVM
per example cost 10-30 s each, most of the examples' time in CI. One example also runs as a user
runs it, ``python examples/NAME.py`` in a process of its own. Examples are picked up by glob: a
new ``examples/*.py`` is tested without touching this file, and must follow the convention
checked in ``test_example_follows_the_convention``.
"""
import ast
import glob
import os
import runpy
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
TIMEOUT_S = 600


def _name(path):
    return os.path.basename(path)


def test_there_are_examples():
    assert len(EXAMPLES) >= 9, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=_name)
def test_example_follows_the_convention(path):
    """A plain script: docstring, ``main()`` under ``__main__``, the quick switch, an assert."""
    source = open(path).read()
    tree = ast.parse(source)
    assert ast.get_docstring(tree), "start with a docstring that says what the example shows"
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), \
        "define main()"
    guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guard and "main()" in ast.unparse(guard[0]), \
        'call main() under if __name__ == "__main__"'
    assert "RDDTENSOR_QUICK" in source, "read RDDTENSOR_QUICK to shrink rows and epochs in CI"
    assert any(isinstance(n, ast.Assert) for n in ast.walk(tree)), "assert the headline result"


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=_name)
def test_example_runs_and_asserts_its_result(path, spark, tmp_path, monkeypatch):
    monkeypatch.setenv("RDDTENSOR_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [path])
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # an example may end with sys.exit(main())
        assert e.code in (0, None), f"{_name(path)} exited with {e.code}"
    finally:
        for q in spark.streams.active:  # a failed streaming example must not leak its query
            q.stop()


@pytest.mark.slow
def test_an_example_runs_as_a_script(tmp_path):
    path = os.path.join(ROOT, "examples", "linear_regression.py")
    env = dict(os.environ, RDDTENSOR_QUICK="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, path], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")
        pytest.fail(f"{_name(path)} ran over {TIMEOUT_S} s; output tail:\n{out[-4000:]}")
    seconds = time.perf_counter() - t0
    tail = (r.stdout + "\n" + r.stderr.replace("\r", "\n"))[-4000:]
    assert r.returncode == 0, \
        f"{_name(path)} exited with {r.returncode} after {seconds:.0f} s; output tail:\n{tail}"
