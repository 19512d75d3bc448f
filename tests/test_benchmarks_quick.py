"""The benchmark harness: ``python -m benchmarks run --quick`` runs every benchmark at tiny sizes,
every results JSON passes the schema check, and every contender of every benchmark actually ran.

The end-to-end test starts several Spark masters, TorchDistributor and PyTorch in subprocesses
(a few minutes on a two-core machine: three benchmarks at a time, one Spark session per
benchmark); it is marked ``benchmark`` and left out of the default run (``python -m pytest -m
benchmark`` runs it). The unit tests of the schema check, the runner and the report are fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _payload(**over):
    p = {"benchmark": "x", "created": "2026-01-01T00:00:00+00:00",
         "machine": {"cores": 2, "cpu_model": "cpu", "memory_bytes": 1, "gpus": []},
         "versions": {"python": "3", "java": "17", "pyspark": "4", "numpy": "2", "cupy": None,
                      "torch": "2"},
         "git": {"commit": "abc", "dirty": False}, "parameters": {"n": 1},
         "results": {"a": {"samples": [1.0, 2.0]}}}
    p.update(over)
    return p


def test_schema_accepts_a_complete_payload_and_nested_environment():
    from benchmarks.harness import check_schema
    assert check_schema(_payload()) == []
    p = _payload()
    env = {k: p.pop(k) for k in ("machine", "versions", "git", "created")}
    assert check_schema({**p, "environment": env}) == []


def test_schema_names_what_is_missing():
    from benchmarks.harness import check_schema
    p = _payload(results={"a": {"samples": []}}, parameters=None)
    del p["machine"]["gpus"]
    del p["versions"]["java"]
    problems = check_schema(p)
    assert "machine.gpus missing" in problems
    assert "versions.java missing" in problems
    assert "parameters missing" in problems
    assert any("raw samples" in x for x in problems)


def test_environment_records_java_spark_cupy_gpus_and_load():
    from benchmarks.common import environment
    env = environment(())
    for k in ("python", "java", "pyspark", "numpy", "cupy", "torch"):
        assert k in env["versions"]
    assert {"gpus", "load_average", "cores", "cpu_model", "memory_bytes"} <= set(env["machine"])


def test_registry_lists_every_benchmark():
    from benchmarks.harness import REGISTRY
    assert {"race_digits", "cnn_throughput", "scaling_model", "local_step", "layers",
            "allreduce", "inference"} <= set(REGISTRY)


def test_quick_run_in_parallel_biggest_first_verdicts_in_registry_order(tmp_path,
                                                                          monkeypatch):
    from benchmarks import harness
    started = []

    def fake_run_entry(entry, quick, results_dir, log):
        started.append(entry.name)
        return {"name": entry.name, "ok": True, "quick": quick}
    monkeypatch.setattr(harness, "run_entry", fake_run_entry)
    summary = harness.run_all(quick=True, results_dir=tmp_path, report=False,
                              log=lambda *a: None)
    assert summary["jobs"] == harness.QUICK_JOBS > 1 and summary["ok"]
    assert [v["name"] for v in summary["benchmarks"]] == list(harness.REGISTRY)
    biggest = max(harness.REGISTRY.values(), key=lambda e: e.quick_cpu_s).name
    assert biggest in started[:harness.QUICK_JOBS] and sorted(started) == sorted(harness.REGISTRY)
    assert "TieredStopAtLevel=1" in harness.quick_submit_args()
    assert harness.run_all(quick=False, only=["layers"], results_dir=tmp_path, report=False,
                           log=lambda *a: None)["jobs"] == 1  # full runs time: one at a time
    with pytest.raises(ValueError, match="jobs must be a positive integer, got 0"):
        harness.run_all(quick=True, results_dir=tmp_path, report=False, jobs=0)


def test_report_from_payloads(tmp_path):
    from benchmarks.report import write_report
    race = _payload(benchmark="race_digits",
                    parameters={"target": 0.97, "replicas": 1, "train_rows": 10, "test_rows": 5,
                                "repeats": 1, "warmup_runs": 0, "quick": True},
                    results={n: {"wall_s": {"median": t, "min": t, "max": t, "samples": [t]},
                                 "steps": 3, "ms_per_step": 1.0, "budget": 1, "config": {"lr": 1},
                                 "accuracy": {"min": 0.9, "max": 0.9, "samples": [0.9]}}
                             for n, t in (("rddtensor-distributed", 1.0), ("mllib-mlpc", 4.0),
                                          ("torchdistributor", 2.0))},
                    ratio_rddtensor_distributed_over={"mllib-mlpc": 0.25,
                                                      "torchdistributor": 0.5},
                    timing={"load_average_before": [0, 0, 0]})
    (tmp_path / "race_digits_quick.json").write_text(json.dumps(race))
    path = write_report(tmp_path, quick=True)
    text = path.read_text()
    assert "MLlib MLPC = 0.25" in text and "**met**" in text
    assert (tmp_path / "race_digits_quick.png").stat().st_size > 1000
    assert "No results yet" in text  # the benchmarks without a JSON say so


@pytest.mark.benchmark
@pytest.mark.spark
def test_quick_run_of_every_benchmark(tmp_path):
    """``python -m benchmarks run --quick``: exit 0, every JSON valid, every contender ran."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick",
                           "--results-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "harness_quick.json").read_text())
    bad = {b["name"]: {k: b.get(k) for k in ("status", "schema_problems",
                                              "contenders_missing", "output_tail")}
           for b in summary["benchmarks"] if not b["ok"]}
    assert proc.returncode == 0 and not bad, (bad, proc.stdout[-3000:])
    for b in summary["benchmarks"]:
        if b["status"] == "absent":  # a registered benchmark not written yet
            continue
        assert b["contenders"] and all(b["contenders"].values())
        assert b["schema_problems"] == []
    assert (tmp_path / "RESULTS_quick.md").exists()
    print(f"quick run: {summary['wall_s']:.1f} s")
