"""Shared pieces of the benchmark harness: thread matching, machine facts, timing, output files.

Every benchmark in ``benchmarks/`` runs rddtensor and its peer side by side in one process and
writes ``benchmarks/results/<name>.json`` (all raw samples) next to ``<name>.md`` (the table).
This module holds what they share:

- ``match_threads(n)``: give NumPy's BLAS and PyTorch the same thread count; call it *before*
  importing numpy or torch (it also works after, through threadpoolctl).
- ``environment()``: machine (cores, CPU model, memory), versions, git commit, for the JSON;
  ``background_load()`` / ``wait_for_idle()``: how busy other processes keep the machine, and
  waiting (bounded) until they leave it alone.
- ``time_interleaved(fns, calls=, repeats=, warmup=, settle=, rewarm=)``: per-call wall time
  of each function, timed blocks interleaved so that background load hits all of them alike,
  with a pause between blocks so that one library's spinning threads do not slow the other.
- ``ratio(a, b)``: ``a / b`` of two timing results, of the medians and per interleaved repeat.
- ``markdown_table(header, rows)`` and ``write_results(name, payload, table)``.
- ``summarize(samples)``, ``load_average()``, ``gpus()``, ``java_version_string()`` and
  ``run_json_subprocess(cmd, timeout)`` (a contender in a fresh process, its last JSON line).

Nothing here imports numpy or torch at module level, so ``match_threads`` can still set the
thread environment variables before either library loads its thread pools.

Example:
    >>> from benchmarks.common import time_interleaved, markdown_table
    >>> r = time_interleaved({"noop": lambda: None}, calls=10, repeats=3, warmup=1)
    >>> sorted(r["noop"])
    ['background', 'max', 'median', 'min', 'samples', 'unit']
    >>> print(markdown_table(["a", "b"], [[1, 2.5]]))
    | a | b |
    |---|---|
    | 1 | 2.5 |
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["RESULTS_DIR", "match_threads", "environment", "background_load", "wait_for_idle",
           "time_interleaved", "ratio", "markdown_table", "write_results", "load_average",
           "gpus", "java_version_string", "summarize", "run_json_subprocess"]

ROOT = Path(__file__).resolve().parent.parent
#: Where every benchmark writes ``<name>.json`` and ``<name>.md``; the environment variable
#: ``RDDTENSOR_BENCH_RESULTS`` moves it (the harness's quick CI test writes to a temporary folder).
RESULTS_DIR = Path(os.environ.get("RDDTENSOR_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
#: Software whose version every results JSON records, as ``versions[key]`` (not imported).
_DISTRIBUTIONS = {"numpy": ("numpy",), "pyspark": ("pyspark",), "torch": ("torch",),
                  "cupy": ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x"),
                  "scipy": ("scipy",), "pyarrow": ("pyarrow",)}

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- threads ------------------------------------------------------------------------------------
def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def match_threads(n: int | None = None, *, torch: bool = True) -> dict:
    """Run NumPy's BLAS and PyTorch's intra-op pool with ``n`` threads each (default: all cores).

    How, in order:

    1. ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` are set to ``n``; a
       BLAS reads them when it loads, so this alone suffices when numpy is not imported yet.
    2. ``threadpoolctl.threadpool_limits(n, user_api="blas")`` (if installed) resizes every BLAS
       already loaded (NumPy's and SciPy's OpenBLAS, an MKL-backed NumPy).
    3. ``torch.set_num_threads(n)`` (if torch imports) sizes PyTorch's OpenMP/MKL pool;
       ``torch=False`` skips this and leaves torch unimported (benchmarks without a torch peer).

    Elementwise NumPy ufuncs are single-threaded whatever ``n`` is; PyTorch parallelises them
    over its pool. That difference is part of what a benchmark measures, not something to hide.

    Returns:
        What was done and what the libraries report afterwards, for the results JSON.
    """
    n = usable_cores() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be a positive integer, got {n}")
    numpy_was_loaded = "numpy" in sys.modules
    for var in _THREAD_ENV:
        os.environ[var] = str(n)
    info = {"threads": n, "env": {var: str(n) for var in _THREAD_ENV},
            "numpy_loaded_before_env": numpy_was_loaded}
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
        info["numpy_method"] = "environment variables only (threadpoolctl not installed)"
        if numpy_was_loaded:
            info["warning"] = "numpy was imported before match_threads: its BLAS may ignore n"
    else:
        import numpy  # noqa: F401  (loads its BLAS so that the limit below reaches it)
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        info["numpy_method"] = "threadpoolctl.threadpool_limits(n, user_api='blas') + environment"
    if torch:
        info.update(_match_torch_threads(n))
    else:
        info["torch_method"] = "not requested"
    if threadpoolctl is not None:  # what every loaded pool reports now: the proof
        info["pools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads",
                                                 "version", "architecture", "threading_layer")}
                         for p in threadpoolctl.threadpool_info()]
    return info


def _match_torch_threads(n: int) -> dict:
    try:
        import torch
    except ImportError:
        return {"torch_method": "torch not installed"}
    torch.set_num_threads(n)
    return {"torch_method": "torch.set_num_threads(n)",
            "torch_num_threads": torch.get_num_threads()}


# --- environment --------------------------------------------------------------------------------
def _cpu_seconds():
    """(CPU seconds all processes were busy, CPU seconds elapsed, CPU seconds of this process)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    own = os.times()
    return busy / hz, sum(fields) / hz, own.user + own.system


def _other_load(before, after) -> float | None:
    if before is None or after is None:
        return None
    busy, total, own = (b - a for a, b in zip(before, after))
    return max(busy - own, 0.0) / total if total > 0 else None


def _cpu_snapshot():
    try:
        return _cpu_seconds()
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (not Linux)
        return None


def background_load(seconds: float = 1.0) -> float | None:
    """Fraction of all cores kept busy by *other* processes over the next ``seconds``.

    From ``/proc/stat`` minus this process's own CPU time (``None`` without ``/proc``). Timings
    taken while it is well above 0 (a test suite or Spark job on the same machine) are slower
    and noisier than the code deserves; ``time_interleaved`` records it for every block.
    """
    before = _cpu_snapshot()
    time.sleep(seconds)
    return _other_load(before, _cpu_snapshot())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _installed_version(names) -> str | None:
    from importlib import metadata
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def java_version_string() -> str | None:
    """First line of ``java -version`` (JAVA_HOME's java first), or ``None`` without Java."""
    home = os.environ.get("JAVA_HOME")
    exe = os.path.join(home, "bin", "java") if home else "java"
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0].strip() if lines else None


def gpus() -> list:
    """``[{"name", "memory_mib"}]`` per NVIDIA GPU that ``nvidia-smi`` lists (``[]`` without)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    rows = [line.split(",") for line in out.stdout.strip().splitlines() if line.strip()]
    return [{"name": r[0].strip(), "memory_mib": int(r[1]) if r[1].strip().isdigit() else None}
            for r in rows if len(r) >= 2]


def load_average():
    """``os.getloadavg()`` (1, 5, 15 minutes) as a list, or ``None`` where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(modules=("numpy", "torch")) -> dict:
    """Machine, software versions and source revision, as recorded in every results JSON.

    Always recorded: cores, CPU model, memory, GPUs (``nvidia-smi``), the load average when
    called, and the versions of Python, Java, Spark, NumPy, CuPy and PyTorch (from the installed
    package metadata, without importing them; ``None`` when not installed).

    Args:
        modules: import names whose ``__version__`` to record as imported (missing: ``None``);
            these override the metadata version of the same name.

    Returns:
        ``{"machine": {...}, "versions": {...}, "git": {"commit", "dirty"}, "created": ...}``;
        ``dirty`` is True when tracked files differ from the commit (the numbers then describe
        a working tree, not the commit alone).
    """
    versions = {"python": platform.python_version(), "java": java_version_string()}
    for key, names in _DISTRIBUTIONS.items():
        versions[key] = _installed_version(names)
    for name in modules:
        try:
            versions[name] = getattr(__import__(name), "__version__", None)
        except ImportError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "usable_cores": usable_cores(),
                    "cpu_model": _cpu_model(), "memory_bytes": _memory_bytes(),
                    "gpus": gpus(), "load_average": load_average(),
                    "platform": platform.platform()},
        "versions": versions,
        "git": {"commit": _git("rev-parse", "HEAD"),
                "dirty": None if status is None else bool(status)},
    }


def wait_for_idle(max_wait_s: float = 120.0, threshold: float = 0.05, quiet_s: int = 3) -> dict:
    """Wait until other processes use under ``threshold`` of the CPU for ``quiet_s`` s in a row.

    Gives up after ``max_wait_s`` (then ``idle`` is False and the run goes on, noisier). On a
    shared machine (tests and Spark jobs of others) this is the difference between a number and
    noise.

    Returns:
        ``{"idle": bool, "waited_s": float, "last_load": float | None}`` for the results JSON.
    """
    t0, quiet, load = time.monotonic(), 0, None
    while quiet < quiet_s and time.monotonic() - t0 < max_wait_s:
        load = background_load(1.0)
        if load is None:  # cannot tell: do not wait
            break
        quiet = quiet + 1 if load < threshold else 0
    return {"idle": quiet >= quiet_s, "waited_s": round(time.monotonic() - t0, 1),
            "last_load": load}


# --- timing -------------------------------------------------------------------------------------
def summarize(samples, unit: str = "s") -> dict:
    """``{"unit", "median", "min", "max", "n", "samples"}`` of a list of measurements."""
    samples = [float(x) for x in samples]
    return {"unit": unit, "median": statistics.median(samples), "min": min(samples),
            "max": max(samples), "n": len(samples), "samples": samples}


def _summary(samples: list[float], background: list) -> dict:
    return {"unit": "ms", "median": statistics.median(samples), "min": min(samples),
            "max": max(samples), "samples": samples, "background": background}


def time_interleaved(fns: dict, *, calls: int, repeats: int, warmup: int = 0,
                     settle: float = 0.0, rewarm: int = 0) -> dict:
    """Milliseconds per call of each function: ``repeats`` timed blocks of ``calls`` calls each.

    Every function first runs ``warmup`` untimed calls. Then each repeat times one block per
    function, in the given order on even repeats and reversed on odd ones, so slow drift and
    background load spread over all functions alike and none always runs right after another.
    A function must finish its work before it returns (synchronise a GPU inside it). The
    garbage collector stays on: its cost is part of what a training step costs.

    Thread pools of different libraries fight when blocks alternate: OpenBLAS workers spin for
    about 0.1 s after a NumPy matmul (``2**28`` cycles by default) and OpenMP workers spin too,
    holding cores the next block's own threads need. On the 2-core machine, alternating without
    a pause put PyTorch's median training step at 1.65x its time in a process of its own
    (rddtensor's within 10%), which flipped the comparison. ``settle`` (sleep before each block,
    longer than the spin) and ``rewarm`` (untimed calls right before each block, which wake its
    own pool) give each block the time it has alone: with 0.3 s and 3 calls both medians
    matched their one-library processes within 2% on an idle machine.

    Args:
        fns: ``{name: zero-argument callable}``.
        calls: calls per timed block (the sample is the block's time / ``calls``).
        repeats: timed blocks per function.
        warmup: untimed calls per function before the first block.
        settle: seconds to sleep before every timed block.
        rewarm: untimed calls of the block's function after ``settle``, before the clock starts.

    Returns:
        ``{name: {"unit": "ms", "median", "min", "max", "samples": [ms per call, ...],
        "background": [...]}}``; ``background[i]`` is the share of all cores that *other*
        processes used during block ``i`` (``None`` without ``/proc``; 10 ms resolution), to
        tell a slow block from a disturbed one.
    """
    if calls < 1 or repeats < 1 or warmup < 0 or rewarm < 0 or settle < 0:
        raise ValueError(f"need calls >= 1, repeats >= 1 and warmup, rewarm, settle >= 0; got "
                         f"calls={calls}, repeats={repeats}, warmup={warmup}, rewarm={rewarm}, "
                         f"settle={settle}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples = {name: [] for name in names}
    background = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = fns[name]
            if settle:
                time.sleep(settle)
            for _ in range(rewarm):
                fn()
            cpu0, t0 = _cpu_snapshot(), time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / calls)
            background[name].append(_other_load(cpu0, _cpu_snapshot()))
    return {name: _summary(samples[name], background[name]) for name in names}


def ratio(a: dict, b: dict) -> dict:
    """``a / b`` for two ``time_interleaved`` results of the same run.

    ``of_medians`` divides the medians; ``paired_*`` summarise the per-repeat ratios (repeat i
    of ``a`` over repeat i of ``b``, timed back to back), which cancel drift between repeats.
    """
    paired = [x / y for x, y in zip(a["samples"], b["samples"])]
    return {"of_medians": a["median"] / b["median"], "paired_median": statistics.median(paired),
            "paired_min": min(paired), "paired_max": max(paired)}


# --- subprocesses -------------------------------------------------------------------------------
def run_json_subprocess(cmd: list, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` from the repository root; return the last stdout line that parses as JSON.

    A benchmark runs each contender in a fresh process (its own Spark master, thread pools and
    peak memory) whose last line is its result. On failure: ``{"error": ...}`` with the exit
    code, a timeout, or the last lines of stderr that mention an error.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    err = [line for line in proc.stderr.splitlines() if "rror" in line][-3:]
    return {"error": " | ".join(err) or f"exit {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:]}


# --- output -------------------------------------------------------------------------------------
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return str(value)


def markdown_table(header, rows) -> str:
    """A GitHub Markdown table; floats get 3 significant digits (plain digits from 1000 up)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_results(name: str, payload: dict, table: str, directory=None) -> Path:
    """Write ``<name>.json`` (``payload``) and ``<name>.md`` (``table``); return the JSON path.

    Both files are written to a temporary name and renamed, so an interrupted run never leaves
    half a file. ``directory`` defaults to ``RESULTS_DIR``.
    """
    directory = Path(RESULTS_DIR if directory is None else directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{name}.json"
    for path, text in ((json_path, json.dumps(payload, indent=2, default=_jsonable) + "\n"),
                       (directory / f"{name}.md", table.rstrip("\n") + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path
