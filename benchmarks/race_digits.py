"""The race: wall time to >= 0.97 test accuracy on digits x20, five contenders in one run.

Data: the 1,347 training images of ``load_digits`` (75/25 split, ``random_state=0``, features
/ 16) replicated 20 times with Gaussian noise (sd 0.05): 26,940 training rows; scored on the 450
untouched test images. Network 64-128-64-10 (ReLU, softmax cross-entropy) for every contender;
see ``benchmarks.race_contenders`` for how each one trains.

**Time to target** (the same definition for every contender):

1. *Search* (untimed): for each candidate setting of a contender, the smallest training budget
   that reaches the target: epochs for the epoch-based contenders (test accuracy after every
   epoch of one run: rddtensor's in-process run stands for both rddtensor contenders, one
   PyTorch run for both PyTorch contenders, since their distributed twins take the same batches
   and updates), MLlib's ``maxIter`` by doubling then bisection (one fit per probe).
2. *Trial* (timed once): each candidate trains with its budget exactly as in the race; one more
   epoch / the next probe if it misses the target through float rounding. The candidate with
   the fastest trial is the contender's best setting.
3. *Race*: one untimed warm-up run each, then ``repeats`` timed runs of every contender's best
   setting, interleaved (order reversed every round) so that background load hits all alike.
   Time to target = the wall time of the training call (model definition -> trained weights in
   the driver process); Spark start-up, building the input DataFrame/arrays and scoring the
   test set are outside the clock. Every timed run's test accuracy is recorded; a run below
   the target is reported as such, never dropped.

A profile of one rddtensor iteration (Spark stages, executor and serialisation time, shuffle
bytes, the Python compute of one partition's step) comes from Spark's REST API during one extra
distributed fit (``benchmarks.spark_profile``).

Usage::

    python -m benchmarks.race_digits [--quick] [--repeats R] [--only NAME ...]

``--quick``: 1,347 rows (no replication), 2 epochs / 5 MLlib iterations, no search, one timed
run each: proves that every contender runs. Writes ``benchmarks/results/race_digits.json`` and
``.md`` (``race_digits_quick.*`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import (environment, markdown_table, match_threads, summarize,
                               wait_for_idle, write_results)

NAME = "race_digits"
TARGET = 0.97
FULL = {"replicas": 20, "repeats": 5, "warmup": 1}
QUICK = {"replicas": 1, "repeats": 1, "warmup": 0}
MAX_EPOCHS = 40
MLPC_MAX_ITER = 1600

# candidate settings per contender ("best documented settings": a small grid each)
# (a search in-process over Adam lr 0.01-0.05, LAMB lr 0.02-0.1 and LARS lr 1-3, each with and
# without 3 steps of linear warm-up, at batch 8192 / 13470 / 26,940, found Adam lr 0.01 the
# fewest steps to 0.97: 28 / 20 / 21; warm-up, larger rates, LAMB and LARS took more steps or
# never got there within 30-40 epochs)
_ADAM_BIG = [{"optimizer": "adam", "lr": 0.01, "batch": 4096},
             {"optimizer": "adam", "lr": 0.01, "batch": 8192},
             {"optimizer": "adam", "lr": 0.01, "batch": 13470},
             {"optimizer": "adam", "lr": 0.01, "batch": 26940},
             {"optimizer": "lamb", "lr": 0.02, "batch": 8192}]
_ADAM_SMALL = [{"optimizer": "adam", "lr": 0.003, "batch": 256},
               {"optimizer": "adam", "lr": 0.01, "batch": 1024},
               {"optimizer": "adam", "lr": 0.01, "batch": 4096}]
CANDIDATES = {
    "rddtensor-distributed": _ADAM_BIG,
    "rddtensor-inprocess": _ADAM_SMALL,
    "mllib-mlpc": [{"solver": "l-bfgs", "block_size": 128}, {"solver": "l-bfgs", "block_size": 1024},
                   {"solver": "gd", "block_size": 128, "step_size": 0.03, "search_cap": 320}],
    "torchdistributor": [{"optimizer": "adam", "lr": 0.01, "batch": 1024},
                         {"optimizer": "adam", "lr": 0.01, "batch": 4096},
                         {"optimizer": "adam", "lr": 0.01, "batch": 8192}],
    "pytorch": [{"optimizer": "adam", "lr": c["lr"], "batch": c["batch"]} for c in _ADAM_SMALL],
}
QUICK_SETTINGS = {
    "rddtensor-distributed": ({"optimizer": "adam", "lr": 0.01, "batch": 512}, 2),
    "rddtensor-inprocess": ({"optimizer": "adam", "lr": 0.01, "batch": 512}, 2),
    "mllib-mlpc": ({"solver": "l-bfgs", "block_size": 128}, 5),
    "torchdistributor": ({"optimizer": "adam", "lr": 0.01, "batch": 512}, 2),
    "pytorch": ({"optimizer": "adam", "lr": 0.01, "batch": 512}, 2),
}


# --- search ---------------------------------------------------------------------------------------
def _key(cfg) -> str:
    return json.dumps(cfg, sort_keys=True)


def epochs_to_target(name, cfg, data, cache) -> dict:
    """Search step 1 for an epoch-based contender: the first epoch at the target (or None)."""
    from benchmarks import race_contenders as rc
    family = "rddtensor" if name.startswith("rddtensor") else "torch"
    key = family + _key(cfg)
    if key not in cache:
        curve_fn = rc.rddtensor_epoch_curve if family == "rddtensor" else rc.torch_epoch_curve
        t0 = time.perf_counter()
        curve = curve_fn(cfg, *data["arrays"], MAX_EPOCHS, TARGET)
        reached = curve[-1] >= TARGET if curve else False
        cache[key] = {"curve": curve, "budget": len(curve) if reached else None,
                      "search_s": time.perf_counter() - t0, "searched_with": family}
    return cache[key]


def iterations_to_target(cfg, data) -> dict:
    """Search step 1 for MLlib: the smallest ``maxIter`` at the target (doubling, bisection)."""
    from benchmarks.race_contenders import train_mlpc
    probes, lo, hi, it = {}, 0, None, 10
    t0 = time.perf_counter()
    while hi is None and it <= cfg.get("search_cap", MLPC_MAX_ITER):
        probes[it] = train_mlpc(cfg, it, data)["accuracy"]
        lo, hi = (lo, it) if probes[it] >= TARGET else (it, None)
        it *= 2
    while hi is not None and hi - lo > max(2, hi // 20):  # bisect to 5%
        mid = (lo + hi) // 2
        probes[mid] = train_mlpc(cfg, mid, data)["accuracy"]
        lo, hi = (lo, mid) if probes[mid] >= TARGET else (mid, hi)
    return {"probes": {str(k): v for k, v in sorted(probes.items())}, "budget": hi,
            "search_s": time.perf_counter() - t0}


def search(name, data, cache) -> dict:
    """Search + trial for every candidate of ``name``; the fastest trial wins."""
    from benchmarks.race_contenders import TRAIN
    log = []
    for cfg in CANDIDATES[name]:
        found = (iterations_to_target(cfg, data) if name == "mllib-mlpc"
                 else epochs_to_target(name, cfg, data, cache))
        entry = {"config": cfg, **found, "trial": None}
        budget = found["budget"]
        if budget is not None:
            trial = TRAIN[name](cfg, budget, data)
            if trial["accuracy"] < TARGET:  # float rounding between twins: one more
                budget = budget + 1 if name != "mllib-mlpc" else int(budget * 1.1) + 1
                trial = TRAIN[name](cfg, budget, data)
            entry.update(budget=budget, trial=trial)
        print(f"  search {name} {cfg}: budget {entry['budget']}, trial "
              f"{entry['trial'] and round(entry['trial']['wall_s'], 2)} s", flush=True)
        log.append(entry)
    ok = [e for e in log if e["trial"] and e["trial"]["accuracy"] >= TARGET]
    best = min(ok, key=lambda e: e["trial"]["wall_s"]) if ok else None
    return {"candidates": log, "config": best and best["config"], "budget": best and best["budget"]}


# --- the race -------------------------------------------------------------------------------------
def race(chosen: dict, data, repeats: int, warmup: int) -> dict:
    """Warm-up, then ``repeats`` interleaved timed runs of every contender's chosen setting."""
    from benchmarks.race_contenders import TRAIN
    names = [n for n in chosen if chosen[n]["config"] is not None]
    runs = {n: [] for n in names}
    for n in names:
        for _ in range(warmup):
            TRAIN[n](chosen[n]["config"], chosen[n]["budget"], data)
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out = TRAIN[n](chosen[n]["config"], chosen[n]["budget"], data)
            print(f"  run {r + 1}/{repeats} {n}: {out['wall_s']:.2f} s, "
                  f"accuracy {out['accuracy']:.4f}", flush=True)
            runs[n].append(out)
    return runs


def summarize_runs(runs: list) -> dict:
    wall = summarize([r["wall_s"] for r in runs], "s")
    steps = runs[0]["steps"]
    acc = [r["accuracy"] for r in runs]
    return {"wall_s": wall, "steps": steps, "ms_per_step": 1e3 * wall["median"] / max(steps, 1),
            "accuracy": {"min": min(acc), "max": max(acc), "samples": acc},
            "reached_target_in_all_runs": min(acc) >= TARGET,
            "extra": {k: v for k, v in runs[0].items()
                      if k not in ("wall_s", "accuracy", "steps")}}


def ratios(results: dict) -> dict:
    ours = results.get("rddtensor-distributed")
    if not ours:
        return {}
    t = ours["wall_s"]["median"]
    return {n: t / r["wall_s"]["median"] for n, r in results.items()
            if n != "rddtensor-distributed"}


# --- profile of one distributed iteration --------------------------------------------------------
def profile_distributed(cfg, budget, data) -> dict:
    """Per-iteration cost of rddtensor's distributed fit, split into stages and compute.

    Two fits of 1 epoch and two of ``budget`` epochs (the faster of each pair) give the per-step
    cost and the fixed cost of a fit; Spark's REST API gives per-stage times and bytes of the
    last long one; one partition's gradient
    step (half the batch, one BLAS thread) is timed in this process for the compute share.
    """
    from benchmarks import spark_profile
    from benchmarks.race_contenders import train_rddtensor_distributed
    sc = data["spark"].sparkContext
    ones = [train_rddtensor_distributed(cfg, 1, data) for _ in range(2)]
    fulls = []
    for _ in range(2):
        before = spark_profile.completed_stage_ids(sc)
        fulls.append(train_rddtensor_distributed(cfg, budget, data))
        stages = spark_profile.stages_since(sc, before)
    one = min(ones, key=lambda r: r["wall_s"])  # the least disturbed of two
    full = min(fulls, key=lambda r: r["wall_s"])
    per_step = (full["wall_s"] - one["wall_s"]) / max(full["steps"] - one["steps"], 1)
    return {"fit_1_epoch": one, "fit_budget": full,
            "fit_1_epoch_walls_s": [r["wall_s"] for r in ones],
            "fit_budget_walls_s": [r["wall_s"] for r in fulls],
            "ms_per_step_marginal": 1e3 * per_step,
            "fixed_cost_s": one["wall_s"] - one["steps"] * per_step,
            "stages": spark_profile.summarize_stages(stages, full["steps"]),
            "python_compute_ms": spark_profile.step_compute_ms(cfg, data["arrays"], parts=2)}


def mllib_blas(spark) -> str | None:
    """The BLAS class MLlib uses in the driver JVM (native, or the Java/Vector-API fallback)."""
    try:
        return spark.sparkContext._jvm.dev.ludovic.netlib.blas.BLAS.getInstance() \
            .getClass().getName()
    except Exception:  # noqa: BLE001 (a fact for the JSON, never fatal)
        return None


# --- run ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.race_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, no search, one run each")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    p.add_argument("--only", nargs="+", default=None, help="contenders to run")
    p.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                   help="wait up to SECONDS for an idle machine first (default 120, quick 0)")
    p.add_argument("--no-profile", action="store_true", help="skip the iteration profile")
    a = p.parse_args(argv)
    counts = QUICK if a.quick else FULL
    a.replicas, a.warmup = counts["replicas"], counts["warmup"]
    a.repeats = counts["repeats"] if a.repeats is None else a.repeats
    a.wait_idle = (0 if a.quick else 120) if a.wait_idle is None else a.wait_idle
    from benchmarks.race_contenders import CONTENDERS
    a.only = a.only or list(CONTENDERS)
    bad = [n for n in a.only if n not in CONTENDERS]
    if bad:
        p.error(f"unknown contender {bad[0]!r}; choose from {', '.join(CONTENDERS)}")
    return a


def setup(args) -> dict:
    from benchmarks import race_contenders as rc
    data = {"arrays": rc.race_data(args.replicas)}
    if any(n in rc.SPARK_CONTENDERS for n in args.only):
        from rddtensor.spark.session import get_spark
        spark = get_spark("local[2]", app_name="bench-race",
                          conf={"spark.ui.enabled": "true", "spark.ui.showConsoleProgress": "false"})
        data["spark"] = spark
        data["train_df"], data["test_df"] = rc.spark_frames(spark, *data["arrays"])
    return data


def run(args) -> dict:
    threads = match_threads(None)
    data = setup(args)
    chosen, cache = {}, {}
    t0 = time.perf_counter()
    for name in args.only:
        if args.quick:
            cfg, budget = QUICK_SETTINGS[name]
            chosen[name] = {"config": cfg, "budget": budget, "candidates": []}
        else:
            chosen[name] = search(name, data, cache)
    search_s = time.perf_counter() - t0
    idle = wait_for_idle(args.wait_idle) if args.wait_idle else None
    from benchmarks.common import load_average
    load_before = load_average()
    runs = race(chosen, data, args.repeats, args.warmup)
    load_after = load_average()
    results = {n: {**summarize_runs(r), "config": chosen[n]["config"],
                   "budget": chosen[n]["budget"]} for n, r in runs.items()}
    profile = None
    if not args.quick and not args.no_profile and "rddtensor-distributed" in results:
        c = chosen["rddtensor-distributed"]
        profile = profile_distributed(c["config"], c["budget"], data)
    n_train = len(data["arrays"][0])
    payload = {
        "benchmark": NAME,
        "description": f"wall time to >= {TARGET} test accuracy on digits x{args.replicas}, "
                       "64-128-64-10 MLP, every contender at its best searched setting",
        **environment(("numpy", "torch", "pyspark")),
        "threads": threads,
        "parameters": {"target": TARGET, "replicas": args.replicas, "train_rows": n_train,
                       "test_rows": len(data["arrays"][2]), "noise_sd": 0.05, "split_seed": 0,
                       "sizes": [64, 128, 64, 10], "master": "local[2]", "quick": args.quick,
                       "repeats": args.repeats, "warmup_runs": args.warmup,
                       "candidates": CANDIDATES if not args.quick else QUICK_SETTINGS,
                       "max_epochs": MAX_EPOCHS, "mlpc_max_iter": MLPC_MAX_ITER},
        "timing": {"wait_for_idle": idle, "load_average_before": load_before,
                   "load_average_after": load_after, "search_s": search_s},
        "search": {n: c.get("candidates", []) for n, c in chosen.items()},
        "results": results,
        "ratio_rddtensor_distributed_over": ratios(results),
        "profile": profile,
        "mllib_blas": mllib_blas(data["spark"]) if "spark" in data else None,
        "contenders_ran": sorted(results),
    }
    if "spark" in data:
        data["spark"].stop()
    return payload


def table(payload: dict) -> str:
    res, q = payload["results"], payload["ratio_rddtensor_distributed_over"]
    rows = []
    for n, r in res.items():
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        w = r["wall_s"]
        rows.append([n, cfg, r["budget"], r["steps"], r["ms_per_step"], w["median"], w["min"],
                     w["max"], f"{r['accuracy']['min']:.4f}-{r['accuracy']['max']:.4f}",
                     f"{q[n]:.2f}x" if n in q else "1.00x"])
    p = payload["parameters"]
    head = (f"Wall time to >= {p['target']} test accuracy, digits x{p['replicas']} "
            f"({p['train_rows']:,} training rows, {p['test_rows']} test), 64-128-64-10 MLP; "
            f"median of {p['repeats']} interleaved runs after {p['warmup_runs']} warm-up"
            f"{' (QUICK: fixed tiny budgets, target not sought)' if p['quick'] else ''}. "
            f"Load average before/after: {payload['timing']['load_average_before']} / "
            f"{payload['timing']['load_average_after']}.")
    body = markdown_table(["contender", "setting", "budget (epochs / maxIter)", "steps",
                           "ms/step (wall/steps)", "median s", "min s", "max s",
                           "test accuracy", "rddtensor-dist / this"], rows)
    return f"{head}\n\n{body}\n\nCommand: `python -m benchmarks.race_digits" \
           f"{' --quick' if p['quick'] else ''}`.\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    text = table(payload)
    path = write_results(NAME + ("_quick" if args.quick else ""), payload, text)
    print(text)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
