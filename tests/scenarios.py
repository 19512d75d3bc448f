"""Scripts that need a Spark master of their own, run together in one subprocess.

A second SparkContext cannot live next to the test session's, so a test that needs another
master (``local-cluster[2,1,1024]``, ``local[2,4]``) runs a script in a subprocess that prints
its result as JSON. Started one by one, each script paid for its own Python and JVM start-up
(and a cluster for its own executor JVMs); here every scenario the selected tests need runs in
one subprocess, one after another (a scenario stops its session; the next one starts its
master in the same JVM), and the tests read their own scenario's result.

A scenario is a script registered with ``register(name, code)`` that calls ``emit(out)`` once;
it also gets ``ARGS`` (a list of strings). Its stderr (Spark's log) is kept per scenario, and an
exception in one is reported to the tests of that scenario only. ``PYTHONPATH`` is the
repository: the executors' Python workers run in their own work directories, not in the
driver's cwd, and fail with ``ModuleNotFoundError: No module named 'rddtensor'`` without it.

Every JVM the subprocess starts runs with ``-XX:TieredStopAtLevel=1`` (the C1 compiler only):
these JVMs live seconds to minutes, and C2 spent about half their start-up CPU compiling code
they never ran long enough to use; results do not depend on it.

Example (in a test module)::

    scenarios.register("mine", "spark = get_spark('local[3]'); emit({'ok': 1}); spark.stop()")

    @pytest.mark.scenario("mine")
    def test_mine(scenario_results):
        out, log = scenario_results("mine")
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
#: name -> (code, args), in registration order (the order they run in)
REGISTRY: dict = {}

RUNNER = textwrap.dedent("""
    import json, sys, traceback
    for name, code, args in json.load(sys.stdin):
        print(f"=== scenario {name}", file=sys.stderr, flush=True)
        def emit(out, _name=name):
            print(f"RESULT {_name} " + json.dumps(out), flush=True)
        ns = {"__name__": "__main__", "ARGS": list(args), "emit": emit}
        try:
            exec(compile(code, f"<scenario {name}>", "exec"), ns)
        except BaseException:
            print(f"ERROR {name} " + json.dumps(traceback.format_exc()), flush=True)
        sys.stderr.flush()
""")


def register(name: str, code: str, args=()) -> None:
    """Add a scenario (a script that calls ``emit(out)`` once) under ``name``."""
    REGISTRY[name] = (code, [str(a) for a in args])


def run(names, timeout: float = 1200) -> dict:
    """Run the scenarios ``names`` in one subprocess (registration order).

    Returns ``{name: (result or None, stderr of that scenario, error text or None)}``.
    """
    from rddtensor.spark import faults
    order = [n for n in REGISTRY if n in set(names)]
    env = dict(os.environ)
    env.pop(faults.ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYSPARK_SUBMIT_ARGS",
                   f'--driver-java-options "{JVM_OPTIONS}" '
                   f'--conf "spark.executor.extraJavaOptions={JVM_OPTIONS}" pyspark-shell')
    payload = json.dumps([[n, *REGISTRY[n]] for n in order])
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER], input=payload, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, rc = text(e.stdout), text(e.stderr), f"timeout after {timeout} s"
    logs = _split_log(stderr)
    results = {}
    for name in order:
        out = err = None
        for line in stdout.splitlines():
            if line.startswith(f"RESULT {name} "):
                out = json.loads(line[len(f"RESULT {name} "):])
            elif line.startswith(f"ERROR {name} "):
                err = json.loads(line[len(f"ERROR {name} "):])
        if out is None and err is None:
            err = f"no result (subprocess exit {rc}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
        results[name] = (out, logs.get(name, ""), err)
    return results


def _split_log(stderr: str) -> dict:
    logs, name = {}, None
    for line in stderr.splitlines(keepends=True):
        if line.startswith("=== scenario "):
            name = line[len("=== scenario "):].strip()
            logs[name] = ""
        elif name is not None:
            logs[name] += line
    return logs
