"""``python -m benchmarks run [--quick] [--only NAME ...]``: run, check and report the benchmarks.

``run`` runs every registered benchmark (``benchmarks.harness.REGISTRY``) in a fresh process,
checks each results JSON (schema, every contender ran), writes ``harness.json`` and regenerates
``benchmarks/RESULTS.md`` with its charts. ``--quick`` runs everything at tiny sizes into
``benchmarks/results/quick/`` (the CI smoke test), three benchmarks at a time, every Spark JVM
with the C1 compiler only (``benchmarks.harness.QUICK_JVM_OPTIONS``). ``report`` only
regenerates the report from the JSONs already there; ``list`` shows the registry.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from benchmarks.harness import REGISTRY, run_all
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmarks, check their JSON, regenerate RESULTS.md")
    r.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test, < 2 min)")
    r.add_argument("--only", nargs="+", metavar="NAME", choices=list(REGISTRY),
                   help="run only these (the report still covers every JSON present)")
    r.add_argument("--results-dir", default=None,
                   help="where the JSONs go (default benchmarks/results, quick: .../quick)")
    r.add_argument("--no-report", action="store_true", help="do not regenerate the report")
    r.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="benchmarks run at a time (default 1; with --quick 3: a smoke test, "
                        "not timings)")
    rep = sub.add_parser("report", help="regenerate RESULTS.md from the JSONs present")
    rep.add_argument("--quick", action="store_true")
    rep.add_argument("--results-dir", default=None)
    sub.add_parser("list", help="show the registered benchmarks")
    a = p.parse_args(argv)
    if a.cmd == "list":
        for e in REGISTRY.values():
            state = "" if e.available() else " (not present yet)"
            print(f"{e.name:16s} {e.module}{state}  owner: {e.owner}")
        return 0
    if a.cmd == "report":
        from benchmarks.harness import DEFAULT_RESULTS, QUICK_RESULTS
        from benchmarks.report import write_report
        d = a.results_dir or (QUICK_RESULTS if a.quick else DEFAULT_RESULTS)
        print(write_report(d, quick=a.quick))
        return 0
    if a.jobs is not None and a.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {a.jobs}")
    summary = run_all(quick=a.quick, only=a.only, results_dir=a.results_dir,
                      report=not a.no_report, jobs=a.jobs)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
