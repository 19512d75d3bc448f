"""Where a distributed iteration's time goes: Spark's per-stage metrics and one step's compute.

Spark's REST API (``<ui>/api/v1/applications/<app>/stages``) reports, per stage: wall time
(submission to completion), total executor run time, executor CPU time, task deserialisation,
result serialisation, JVM GC, shuffle bytes written/read and shuffle write/fetch-wait time.
The UI must be on (``spark.ui.enabled=true``, the default). ``step_compute_ms`` times the pure
Python/NumPy part of one partition's step in this process for comparison.

Example::

    before = completed_stage_ids(sc)
    model.fit(df, ...)
    print(summarize_stages(stages_since(sc, before), iterations=20))
"""
from __future__ import annotations

import datetime
import json
import time
import urllib.request

_SUM_FIELDS = ("numTasks", "executorRunTime", "executorCpuTime", "executorDeserializeTime",
               "resultSerializationTime", "jvmGcTime", "shuffleReadBytes", "shuffleWriteBytes",
               "shuffleWriteTime", "shuffleFetchWaitTime", "inputBytes", "outputBytes")


def _stages(sc) -> list:
    url = sc.uiWebUrl
    if not url:
        return []
    with urllib.request.urlopen(f"{url}/api/v1/applications/{sc.applicationId}/stages"
                                f"?status=complete", timeout=30) as r:
        return json.load(r)


def completed_stage_ids(sc) -> set:
    """Ids of the stages completed so far (take before the code to profile)."""
    try:
        return {s["stageId"] for s in _stages(sc)}
    except OSError:
        return set()


def stages_since(sc, before: set, settle_s: float = 1.0) -> list:
    """Stages completed since ``completed_stage_ids`` returned ``before`` (oldest first)."""
    time.sleep(settle_s)  # the listener bus reports asynchronously
    try:
        return sorted((s for s in _stages(sc) if s["stageId"] not in before),
                      key=lambda s: s["stageId"])
    except OSError:
        return []


def _ms(stamp: str) -> float:
    t = datetime.datetime.strptime(stamp.replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")
    return t.timestamp() * 1e3


def summarize_stages(stages: list, iterations: int) -> dict:
    """Totals over ``stages`` and per iteration: wall, task time, serialisation, shuffle bytes.

    Times from the REST API: run/deserialize/serialize/GC/fetch wait in ms summed over tasks,
    CPU and shuffle write time in ns (converted here to ms).
    """
    if not stages:
        return {"available": False}
    tot = {f: sum(s.get(f, 0) or 0 for s in stages) for f in _SUM_FIELDS}
    tot["executorCpuTime"] /= 1e6
    tot["shuffleWriteTime"] /= 1e6
    walls = [_ms(s["completionTime"]) - _ms(s["submissionTime"]) for s in stages
             if s.get("completionTime") and s.get("submissionTime")]
    first = min(_ms(s["submissionTime"]) for s in stages if s.get("submissionTime"))
    last = max(_ms(s["completionTime"]) for s in stages if s.get("completionTime"))
    it = max(int(iterations), 1)
    per_iter = {k: v / it for k, v in tot.items()}
    per_iter["stage_wall_ms"] = sum(walls) / it
    names = {}
    for s in stages:
        key = s.get("name", "?").split(" at ")[0]
        names[key] = names.get(key, 0) + 1
    listing = [{"id": s["stageId"], "name": s.get("name", "?").split(" at ")[0],
                "tasks": s.get("numTasks"), "wall_ms": w, "run_ms": s.get("executorRunTime"),
                "shuffle_write_bytes": s.get("shuffleWriteBytes")}
               for s, w in zip(stages, walls)]
    return {"available": True, "stages": len(stages), "iterations": it, "listing": listing,
            "stages_per_iteration": len(stages) / it, "span_ms": last - first,
            "sum_stage_wall_ms": sum(walls), "totals": tot, "per_iteration": per_iter,
            "stage_kinds": names,
            "units": "ms (times summed over tasks), bytes"}


def step_compute_ms(cfg: dict, arrays, parts: int = 2, repeats: int = 20) -> dict:
    """Median ms of one partition's gradient step + full-vector optimizer update, one BLAS thread.

    The rows are ``cfg["batch"] / parts`` of the training set: what each task computes per
    iteration when the engine is out of the way.
    """
    import statistics

    import numpy as np
    from threadpoolctl import threadpool_limits

    from benchmarks.race_contenders import rddtensor_model
    from rddtensor.training.batching import step_rng
    from rddtensor.training.steps import gradient_step, optimizer_step
    from rddtensor.runtime import prepare_process
    prepare_process()  # as every Spark worker does once
    Xtr, ytr = arrays[0], arrays[1]
    rows = max(1, int(cfg["batch"]) // parts)
    X, y = Xtr[:rows], ytr[:rows]
    model = rddtensor_model(cfg)
    model.build()
    model.init_slots()
    grad = np.empty(model.layout.size, np.float32)
    grad_ms, update_ms = [], []
    with threadpool_limits(1, user_api="blas"):
        for t in range(1, repeats + 1):
            t0 = time.perf_counter()
            g, _ = gradient_step(model, model.theta, X, y, loss=model.loss, n_batch=rows * parts,
                                 rng=step_rng(0, t), metrics=model.metrics, grad_out=grad)
            t1 = time.perf_counter()
            optimizer_step(model.optimizer, model.theta, g, model.slots, t,
                           model.layout.split_segments())
            t2 = time.perf_counter()
            grad_ms.append((t1 - t0) * 1e3)
            update_ms.append((t2 - t1) * 1e3)
    return {"rows_per_partition": rows, "gradient_ms": statistics.median(grad_ms),
            "update_ms": statistics.median(update_ms), "params": int(model.layout.size)}
