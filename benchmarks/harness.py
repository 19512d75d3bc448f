"""The benchmark harness: a registry of benchmarks, a runner, and the results-JSON schema check.

Every benchmark is a module ``benchmarks.<module>`` with a ``main(argv)`` that accepts
``--quick`` and writes ``<results>/<name>.json`` (``<name>_quick.json`` with ``--quick``)
through ``benchmarks.common.write_results``. The harness runs each in a fresh process (its own
Spark master, thread pools and memory), imported by name so that Spark pickles its functions by
reference; ``RDDTENSOR_BENCH_RESULTS`` tells it where to write. Scripts owned by others
(``local_step``, ``rddtensor.layers``, ``allreduce``, ``inference``) are registered with the arguments
their existing command lines take.

``--quick`` (the CI smoke test, under two minutes on two cores) runs every contender of every
benchmark at tiny sizes, each benchmark with one Spark session where it can (no process per
contender), no waiting for an idle machine, three benchmarks at a time (``jobs``), and every
Spark JVM with ``QUICK_JVM_OPTIONS``. Its numbers show that everything runs, not how fast.

After a run the harness checks every JSON it produced (``check_schema``) and that every
contender of the benchmark actually ran (``Entry.contenders``), writes ``harness.json`` (or
``harness_quick.json``) with the verdicts, and regenerates the report (``benchmarks.report``).

Example::

    from benchmarks.harness import run_all
    summary = run_all(quick=True, only=["race_digits"])
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, environment, load_average

DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = DEFAULT_RESULTS / "quick"
#: JVM option of every Spark JVM (driver, executors) a quick run starts: the C1 compiler only.
#: A quick benchmark lives seconds, and HotSpot's C2 compiler spent about half of a driver
#: JVM's CPU time compiling code it never got to use (9.7 -> 5.6 CPU seconds for a session
#: and one small job); a full run keeps the JVM's defaults.
QUICK_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
#: Benchmarks a quick run runs at a time. On the two-core machine, with about 120 CPU seconds
#: of work in all, two at a time took 117 s and three 93 s (load average 2-5, others included).
QUICK_JOBS = 3


def quick_submit_args() -> str:
    """``PYSPARK_SUBMIT_ARGS`` that give the driver and executors ``QUICK_JVM_OPTIONS``."""
    return (f'--driver-java-options "{QUICK_JVM_OPTIONS}" '
            f'--conf "spark.executor.extraJavaOptions={QUICK_JVM_OPTIONS}" pyspark-shell')


# --- contender checks (what "every contender ran" means for each script's JSON) --------------------
def _has_samples(d) -> bool:
    return isinstance(d, dict) and bool(d.get("samples") or d.get("samples_ms"))


def _local_step(payload) -> dict:
    res = payload.get("results", {})
    return {n: _has_samples(res.get(n)) for n in ("rddtensor", "pytorch")}


def _layers(payload) -> dict:
    out = {}
    for case, r in payload.get("results", {}).items():
        for n in ("rddtensor", "pytorch"):
            out[f"{case} / {n}"] = _has_samples(r.get("timings", {}).get(n))
    return out


def _allreduce(payload) -> dict:
    out = {}
    for r in payload.get("results", []):
        key = f"{r.get('contender')} P={r.get('P')}"
        out[key] = "error" not in r and bool(r.get("samples_ms"))
    return out


def _inference(payload) -> dict:
    return {n: _has_samples(t) for n, t in payload.get("timing", {}).items()}


def _datascale(payload) -> dict:
    return {f"{r.get('contender')} rows={r.get('rows')}": _has_samples(r.get("ms_per_iteration"))
            for r in payload.get("results", [])}


def _shuffle_order(payload) -> dict:
    r = payload.get("results", {})
    out = {f"{c.get('storage')}/{c.get('order')}": bool(c.get("final_test_accuracy", {})
                                                         .get("samples"))
           for c in r.get("convergence", [])}
    if "reading" in r:
        out["reading"] = bool(r["reading"])
    return out


def _listed(expected):
    def check(payload) -> dict:
        ran = set(payload.get("contenders_ran", []))
        names = expected(payload) if callable(expected) else expected
        return {n: n in ran for n in names}
    return check


def _scaling_expected(payload) -> list:
    p = payload.get("parameters", {})
    return [f"{m}/{c}" for m in p.get("masters", []) for c in p.get("contenders", [])]


def _race_expected(payload) -> list:
    from benchmarks.race_contenders import CONTENDERS
    return list(CONTENDERS)


# --- the registry -----------------------------------------------------------------------------------
@dataclass
class Entry:
    """One benchmark: how to run it, and how to tell that all its contenders ran."""

    name: str
    module: str
    contenders: object                      # payload -> {contender: ran?}
    owner: str
    full_args: list = field(default_factory=list)
    quick_args: list = field(default_factory=lambda: ["--quick"])
    timeout_s: int = 3600
    quick_timeout_s: int = 450              # (quick runs share the machine three ways)
    optional: bool = False                   # may not exist yet: skipped, not failed
    quick_cpu_s: float = 10.0                # about what --quick costs (CPU seconds, all
    #                                          processes): parallel quick runs start big first

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def json_name(self, quick: bool) -> str:
        return self.name + ("_quick" if quick else "")


REGISTRY = {e.name: e for e in [
    Entry("race_digits", "benchmarks.race_digits", _listed(_race_expected), "harness",
          timeout_s=5400, quick_cpu_s=28),
    Entry("cnn_throughput", "benchmarks.cnn_throughput",
          _listed(["rddtensor-inprocess", "rddtensor-local1", "rddtensor-local2", "pytorch"]),
          "harness", timeout_s=3600, quick_cpu_s=13),
    Entry("scaling_model", "benchmarks.scaling_model", _listed(_scaling_expected), "harness",
          timeout_s=7200, quick_cpu_s=40),
    Entry("local_step", "benchmarks.local_step", _local_step, "performance engineer",
          timeout_s=1800, quick_cpu_s=8),
    Entry("layers", "benchmarks.layers", _layers, "performance engineer", timeout_s=1800,
          quick_cpu_s=8),
    # --quick runs all contenders of allreduce (one size) and of inference (2k rows) in one
    # Spark session each: every one of them is exercised within the 2-minute quick budget
    Entry("allreduce", "benchmarks.allreduce", _allreduce, "lead", timeout_s=7200,
          quick_cpu_s=15),
    Entry("inference", "benchmarks.inference", _inference, "Spark ML engineer", optional=True,
          timeout_s=3600, quick_cpu_s=15),
    Entry("datascale", "benchmarks.datascale", _datascale, "data engineer", timeout_s=7200,
          quick_cpu_s=15),
    Entry("shuffle_order", "benchmarks.shuffle_order", _shuffle_order, "data engineer",
          timeout_s=1800, quick_cpu_s=10),
]}


# --- schema -----------------------------------------------------------------------------------------
REQUIRED_MACHINE = ("cores", "cpu_model", "memory_bytes", "gpus")
REQUIRED_VERSIONS = ("python", "java", "pyspark", "numpy", "cupy", "torch")


def _env_block(payload) -> dict:
    env = payload.get("environment")
    return env if isinstance(env, dict) and "machine" in env else payload


def _find_samples(value, depth=0) -> int:
    """How many non-empty lists of numbers sit under keys containing 'samples'."""
    if depth > 8:
        return 0
    found = 0
    if isinstance(value, dict):
        for k, v in value.items():
            if "samples" in str(k) and isinstance(v, list) and v and all(
                    isinstance(x, (int, float)) for x in v):
                found += 1
            else:
                found += _find_samples(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            found += _find_samples(v, depth + 1)
    return found


def check_schema(payload: dict) -> list:
    """Problems with a results JSON (empty list: fine).

    Required: machine (cores, CPU model, memory, GPUs), versions (Python, Java, Spark, NumPy,
    CuPy, PyTorch; ``None`` = not installed is fine, a missing key is not), git commit,
    parameters, and at least one list of raw samples.
    """
    problems = []
    env = _env_block(payload)
    machine, versions = env.get("machine", {}), env.get("versions", {})
    problems += [f"machine.{k} missing" for k in REQUIRED_MACHINE if k not in machine]
    problems += [f"versions.{k} missing" for k in REQUIRED_VERSIONS if k not in versions]
    if not (env.get("git") or {}).get("commit"):
        problems.append("git.commit missing")
    if not isinstance(payload.get("parameters"), dict):
        problems.append("parameters missing")
    if _find_samples(payload) == 0:
        problems.append("no raw samples (a non-empty list of numbers under a '*samples*' key)")
    return problems


# --- running -----------------------------------------------------------------------------------------
def run_entry(entry: Entry, quick: bool, results_dir: Path, log) -> dict:
    """Run one benchmark in a fresh process; return its verdict for ``harness.json``."""
    args = entry.quick_args if quick else entry.full_args
    cmd = [sys.executable, "-c", f"import sys; from {entry.module} import main; "
           "main(sys.argv[1:])", *args]
    shown = f"python -m {entry.module} {' '.join(args)}".strip()
    if not entry.available():
        return {"name": entry.name, "command": shown, "status": "absent",
                "ok": entry.optional, "note": f"{entry.module} does not exist yet"}
    env = {**os.environ, "RDDTENSOR_BENCH_RESULTS": str(results_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if quick and "PYSPARK_SUBMIT_ARGS" not in os.environ:  # the user's own settings win
        env["PYSPARK_SUBMIT_ARGS"] = quick_submit_args()
    path = results_dir / f"{entry.json_name(quick)}.json"
    before = path.stat().st_mtime if path.exists() else None
    log(f"== {entry.name}: {shown}")
    t0 = time.perf_counter()
    timeout = entry.quick_timeout_s if quick else entry.timeout_s
    try:
        proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                              timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    verdict = {"name": entry.name, "command": shown, "exit": code, "wall_s": wall,
               "json": str(path), "owner": entry.owner}
    if code != 0 or not path.exists() or path.stat().st_mtime == before:
        verdict.update(status="failed", ok=False, output_tail=tail)
        log(f"   {entry.name}: FAILED ({code}) after {wall:.1f} s\n{tail}")
        return verdict
    payload = json.loads(path.read_text())
    problems = check_schema(payload)
    ran = entry.contenders(payload)
    missing = [n for n, ok in ran.items() if not ok]
    if not ran:
        missing = ["(no contenders found in the JSON)"]
    verdict.update(status="ran", schema_problems=problems, contenders=ran,
                   contenders_missing=missing, ok=not problems and not missing)
    log(f"   {entry.name}: {'ok' if verdict['ok'] else 'PROBLEMS'} in {wall:.1f} s"
        + (f": schema {problems}" if problems else "")
        + (f": did not run {missing}" if missing else ""))
    return verdict


def run_entries(entries: list, quick: bool, results_dir: Path, log, jobs: int) -> list:
    """``run_entry`` of each, ``jobs`` at a time (biggest ``quick_cpu_s`` first when parallel);
    the verdicts in the order of ``entries``."""
    if jobs <= 1:
        return [run_entry(e, quick, results_dir, log) for e in entries]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(jobs) as pool:
        futures = {e.name: pool.submit(run_entry, e, quick, results_dir, log)
                   for e in sorted(entries, key=lambda e: -e.quick_cpu_s)}
        return [futures[e.name].result() for e in entries]


def run_all(quick: bool = False, only=None, results_dir=None, report: bool = True,
            log=print, jobs: int | None = None) -> dict:
    """Run the registered benchmarks (``only``: names), check them, regenerate the report.

    Quick runs write to ``benchmarks/results/quick/`` unless ``results_dir`` says otherwise, so
    they never overwrite full results. ``jobs`` benchmarks run at a time (default: one;
    ``QUICK_JOBS`` with ``quick``, whose numbers prove that everything runs, not how fast: a
    benchmark spends much of its quick run starting processes and waiting on Spark's
    scheduler, time that the others use). Full runs time things and should keep ``jobs=1``.
    """
    unknown = [n for n in (only or []) if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; registered: {', '.join(REGISTRY)}")
    results_dir = Path(results_dir or (QUICK_RESULTS if quick else DEFAULT_RESULTS))
    results_dir.mkdir(parents=True, exist_ok=True)
    names = list(only or REGISTRY)
    t0 = time.perf_counter()
    load = load_average()
    jobs = (QUICK_JOBS if quick else 1) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    verdicts = run_entries([REGISTRY[n] for n in names], quick, results_dir, log, jobs)
    summary = {"benchmark": "harness", "quick": quick, "jobs": jobs,
               "results_dir": str(results_dir),
               "command": "python -m benchmarks run" + (" --quick" if quick else "")
               + (f" --only {' '.join(only)}" if only else ""),
               "load_average_before": load, "load_average_after": load_average(),
               "pyspark_submit_args": os.environ.get("PYSPARK_SUBMIT_ARGS")
               or (quick_submit_args() if quick else None),
               "wall_s": time.perf_counter() - t0, "benchmarks": verdicts,
               "ok": all(v["ok"] for v in verdicts), **environment(())}
    (results_dir / f"harness{'_quick' if quick else ''}.json").write_text(
        json.dumps(summary, indent=2) + "\n")
    if report:
        from benchmarks.report import write_report
        summary["report"] = str(write_report(results_dir, quick=quick))
        log(f"report: {summary['report']}")
    log(f"harness: {'all ok' if summary['ok'] else 'PROBLEMS'} in {summary['wall_s']:.1f} s")
    return summary
