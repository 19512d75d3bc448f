"""Training throughput of a small CNN: rddtensor in-process, on ``local[1]`` and ``local[2]``, PyTorch.

Network (NCHW, 1x28x28 inputs): Conv2D(8, 3x3, same, ReLU) - MaxPool 2 - Conv2D(16, 3x3, same,
ReLU) - MaxPool 2 - Flatten - Dense(64, ReLU) - Dense(10); softmax cross-entropy; Adam 1e-3.
Synthetic standard-normal inputs and uniform labels from a fixed seed.

The batch is calibrated so that one step on one partition *computes* for at least
``--step-seconds`` (default 1 s): one rddtensor step on one BLAS thread is timed in this process
at a small batch and scaled. Each epoch is ``--steps`` steps (one Spark job: the whole epoch is
one group of iterations); samples/s of an epoch = rows / epoch wall time from epoch-end
callbacks; the first epoch (start-up, worker imports, caches) is dropped, the rest are the
samples. Scaling efficiency = samples/s on ``local[2]`` / (2 x samples/s on ``local[1]``).

Contenders, each in a fresh process (its own Spark master, its own thread pools; with
``--quick`` all in this one, one after another):

- ``rddtensor-inprocess``: ``model.fit(X, y)``, NumPy BLAS on all cores.
- ``rddtensor-local1`` / ``rddtensor-local2``: ``model.fit(rdd)`` on ``local[1]`` / ``local[2]``
  with 1 / 2 partitions (one BLAS thread per task, the library's default).
- ``pytorch``: the same network and batches in a plain PyTorch loop, all cores.

Usage::

    python -m benchmarks.cnn_throughput [--quick] [--epochs E] [--steps S] [--batch B]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from benchmarks.common import (environment, load_average, markdown_table, run_json_subprocess,
                               wait_for_idle, write_results)

NAME = "cnn_throughput"
CONTENDERS = ("rddtensor-inprocess", "rddtensor-local1", "rddtensor-local2", "pytorch")
FULL = {"epochs": 6, "steps": 4, "step_seconds": 1.0, "wait_idle": 120}
QUICK = {"epochs": 2, "steps": 2, "batch": 64, "wait_idle": 0}
LR = 1e-3


def make_data(n: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 28, 28), dtype=np.float32),
            rng.integers(0, 10, n).astype(np.int64))


def rddtensor_cnn(seed: int = 0):
    from rddtensor import layers as L
    from rddtensor.optim import Adam
    model = L.Sequential([
        L.Conv2D(8, 3, padding="same", activation="relu", input_shape=(1, 28, 28)),
        L.MaxPool2D(2),
        L.Conv2D(16, 3, padding="same", activation="relu"),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10),
    ], seed=seed)
    model.compile(optimizer=Adam(LR), loss="sparse_categorical_crossentropy")
    return model


def torch_cnn(seed: int = 0):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def calibrate(step_seconds: float, probe: int = 128) -> dict:
    """The batch whose single-thread rddtensor step computes for ``step_seconds`` (rounded up)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from rddtensor.training.batching import step_rng
    from rddtensor.training.steps import gradient_step, optimizer_step
    from rddtensor.runtime import prepare_process
    prepare_process()  # as LocalRunner (in-process) and every Spark worker do once
    model = rddtensor_cnn()
    model.build()
    model.init_slots()
    X, y = make_data(probe, seed=1)
    grad = np.empty(model.layout.size, np.float32)
    times = []
    with threadpool_limits(1, user_api="blas"):
        for t in range(1, 6):
            t0 = time.perf_counter()
            g, _ = gradient_step(model, model.theta, X, y, loss=model.loss, n_batch=probe,
                                 rng=step_rng(0, t), grad_out=grad)
            optimizer_step(model.optimizer, model.theta, g, model.slots, t,
                           model.layout.split_segments())
            times.append(time.perf_counter() - t0)
    per_sample = statistics.median(times[1:]) / probe
    batch = int(math.ceil(step_seconds / per_sample / 128) * 128)
    return {"probe_batch": probe, "ms_per_sample_one_thread": per_sample * 1e3,
            "step_seconds": step_seconds, "batch": batch,
            "predicted_step_s_one_partition": batch * per_sample}


# --- workers (one contender per process) ---------------------------------------------------------
def _epoch_clock():
    stamps = [time.perf_counter()]

    def on_epoch(epoch, logs=None):
        stamps.append(time.perf_counter())
    return stamps, on_epoch


def _rates(stamps, rows) -> list:
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    return [rows / w for w in walls[1:]], walls  # epoch 1 is warm-up


def worker_rddtensor(master, batch, steps, epochs) -> dict:
    X, y = make_data(batch * steps)
    model = rddtensor_cnn()
    stamps, on_epoch = _epoch_clock()
    if master is None:
        from benchmarks.common import match_threads
        threads = match_threads(None, torch=False)
        stamps[0] = time.perf_counter()
        model.fit(X, y, epochs=epochs, batch_size=batch, verbose=0, callbacks=[on_epoch])
        extra = {"threads": threads["threads"]}
    else:
        from rddtensor.spark.session import get_spark
        spark = get_spark(master, app_name="bench-cnn", conf={"spark.ui.enabled": "false"})
        sc = spark.sparkContext
        parts = sc.defaultParallelism
        rdd = sc.parallelize(list(zip(X, y)), parts).cache()
        rdd.count()
        stamps[0] = time.perf_counter()
        history = model.fit(rdd, epochs=epochs, batch_size=batch, verbose=0, callbacks=[on_epoch],
                            iterations_per_job=steps)
        extra = {"master": master, "partitions": parts, "allreduce": history.params["allreduce"]}
        spark.stop()
    rates, walls = _rates(stamps, batch * steps)
    return {"samples_per_s": rates, "epoch_wall_s": walls, "params": int(model.layout.size),
            **extra}


def worker_pytorch(batch, steps, epochs) -> dict:
    from benchmarks.common import match_threads
    threads = match_threads(None)
    import numpy as np
    import torch
    from torch import nn
    X, y = make_data(batch * steps)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = torch_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    stamps, on_epoch = _epoch_clock()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(len(X)))
        for a in range(0, len(X), batch):
            rows = order[a:a + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(Xt[rows]), yt[rows]).backward()
            opt.step()
        on_epoch(epoch)
    rates, walls = _rates(stamps, batch * steps)
    return {"samples_per_s": rates, "epoch_wall_s": walls, "threads": threads["threads"],
            "params": sum(p.numel() for p in net.parameters())}


def worker(name, batch, steps, epochs) -> dict:
    t0 = time.perf_counter()
    if name == "pytorch":
        out = worker_pytorch(batch, steps, epochs)
    else:
        master = {"rddtensor-inprocess": None, "rddtensor-local1": "local[1]",
                  "rddtensor-local2": "local[2]"}[name]
        out = worker_rddtensor(master, batch, steps, epochs)
    return {"contender": name, **out, "process_wall_s": time.perf_counter() - t0}


# --- driver ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cnn_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny run: {QUICK}")
    p.add_argument("--epochs", type=int, default=None, help="epochs (the first is warm-up)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: calibrated)")
    p.add_argument("--step-seconds", type=float, default=FULL["step_seconds"])
    p.add_argument("--wait-idle", type=float, default=None)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--inline", action="store_true",
                   help="run every contender in this process, one after another (the default "
                        "with --quick: saves three process and JVM starts)")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.inline = a.inline or a.quick
    counts = QUICK if a.quick else FULL
    for k in ("epochs", "steps", "wait_idle"):
        if getattr(a, k) is None:
            setattr(a, k, counts[k])
    if a.batch is None and a.quick:
        a.batch = QUICK["batch"]
    if a.epochs < 2:
        p.error(f"--epochs must be >= 2 (the first is warm-up), got {a.epochs}")
    return a


def run(a) -> dict:
    cal = calibrate(a.step_seconds) if a.batch is None else None
    batch = a.batch or cal["batch"]
    idle = wait_for_idle(a.wait_idle) if a.wait_idle else None
    load_before = load_average()
    results = {}
    for name in CONTENDERS:
        if a.inline:
            r = worker(name, batch, a.steps, a.epochs)
        else:
            cmd = [sys.executable, "-c", "import sys; from benchmarks.cnn_throughput import main; "
                   "main(sys.argv[1:])", "--worker", name, "--batch", str(batch),
                   "--steps", str(a.steps), "--epochs", str(a.epochs)]
            r = run_json_subprocess(cmd, a.timeout)
        if "samples_per_s" in r:
            s = r["samples_per_s"]
            r["summary"] = {"unit": "samples/s", "median": statistics.median(s), "min": min(s),
                            "max": max(s), "n": len(s)}
        print(json.dumps({"contender": name, "median": r.get("summary", {}).get("median"),
                          "error": r.get("error")}), flush=True)
        results[name] = r
    eff = None
    one, two = (results.get(n, {}).get("summary") for n in ("rddtensor-local1", "rddtensor-local2"))
    if one and two:
        eff = {"of_medians": two["median"] / (2 * one["median"]),
               "min_max": [two["min"] / (2 * one["max"]), two["max"] / (2 * one["min"])]}
    return {
        "benchmark": NAME,
        "description": "training samples/s of a small CNN on 1x28x28 inputs; scaling 1 -> 2 "
                       "partitions",
        **environment(("numpy", "torch", "pyspark")),
        "parameters": {"batch": batch, "inline": a.inline, "steps_per_epoch": a.steps, "epochs": a.epochs,
                       "warmup_epochs": 1, "quick": a.quick, "lr": LR, "optimizer": "adam",
                       "input_shape": [1, 28, 28], "calibration": cal,
                       "network": "Conv2D(8,3,same,relu)-MaxPool2-Conv2D(16,3,same,relu)-"
                                  "MaxPool2-Flatten-Dense(64,relu)-Dense(10)"},
        "timing": {"wait_for_idle": idle, "load_average_before": load_before,
                   "load_average_after": load_average()},
        "results": results,
        "scaling_efficiency_1_to_2": eff,
        "target_efficiency": 0.85,
        "contenders_ran": sorted(n for n, r in results.items() if "samples_per_s" in r),
    }


def table(payload) -> str:
    res, p = payload["results"], payload["parameters"]
    base = res.get("pytorch", {}).get("summary", {}).get("median")
    rows = []
    for n, r in res.items():
        if "summary" not in r:
            rows.append([n, "failed: " + str(r.get("error"))[:80], "", "", ""])
            continue
        s = r["summary"]
        rows.append([n, s["median"], s["min"], s["max"],
                     f"{s['median'] / base:.2f}x" if base else ""])
    eff = payload["scaling_efficiency_1_to_2"]
    head = (f"Training samples/s, small CNN on 1x28x28 (synthetic), batch {p['batch']}, "
            f"{p['steps_per_epoch']} steps/epoch, median over epochs 2-{p['epochs']}"
            f"{' (QUICK)' if p['quick'] else ''}. Load average before: "
            f"{payload['timing']['load_average_before']}.")
    body = markdown_table(["contender", "median samples/s", "min", "max", "vs PyTorch"], rows)
    foot = ""
    if eff:
        foot = (f"Scaling efficiency local[1] -> local[2]: {eff['of_medians']:.1%} (target 85%; "
                f"range {eff['min_max'][0]:.1%}-{eff['min_max'][1]:.1%}).")
    return f"{head}\n\n{body}\n\n{foot}\n\nCommand: `python -m benchmarks.cnn_throughput" \
           f"{' --quick' if p['quick'] else ''}`.\n"


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.batch, a.steps, a.epochs)))
        return None
    payload = run(a)
    text = table(payload)
    path = write_results(NAME + ("_quick" if a.quick else ""), payload, text)
    print(text)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
