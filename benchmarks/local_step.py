"""In-process training-step time: rddtensor (NumPy) against PyTorch CPU, side by side.

One step is forward + loss + backward + optimizer update on one batch of a 64-256-256-10 MLP
(ReLU; sparse categorical cross-entropy from logits; Adam, lr 1e-3), batch 512, float32.

- rddtensor runs the library's own step path, the body of ``rddtensor.training.loop.LocalRunner``:
  ``gradient_step`` on the flat ``theta`` (forward, loss, backprop, flatten into the flat
  gradient) then ``optimizer_step`` (clipping checks, ``adam_update`` on the whole vector);
  a check requires it to give LocalRunner's weights bit for bit.
- PyTorch runs the same network (``nn.Linear``/``nn.ReLU``, ``nn.CrossEntropyLoss``,
  ``torch.optim.Adam`` with its defaults) from the same initial weights.

Both get the same thread count T (default: all usable cores) through
``benchmarks.common.match_threads``: ``OMP/OPENBLAS/MKL_NUM_THREADS=T`` before numpy loads, then
``threadpoolctl.threadpool_limits(T, user_api="blas")`` for NumPy's OpenBLAS and
``torch.set_num_threads(T)`` for PyTorch's OpenMP/MKL pool; the JSON records every pool's size
as the libraries report it. NumPy's elementwise ufuncs stay single-threaded at any T. Both get
the same fixed batch (no data loading is timed) and a check that a few steps of each give the
same weights. Timed blocks of the two alternate, with a 0.3 s pause and 3 untimed steps before
each, so that neither library's spinning worker threads slow the other's block (see
``time_interleaved``).

Usage::

    python -m benchmarks.local_step [--quick] [--threads T] [--steps N] [--repeats R]
                                    [--warmup W] [--seed S] [--wait-idle SECONDS]

Writes ``benchmarks/results/local_step.json`` (machine, versions, commit, parameters, raw
samples) and ``local_step.md``; ``--quick`` writes ``local_step_quick.*`` instead.
"""
from __future__ import annotations

import argparse
import statistics
import time

# numpy and torch are imported inside functions, after match_threads has fixed the thread count
from benchmarks.common import (background_load, environment, markdown_table, match_threads, ratio,
                               time_interleaved, wait_for_idle, write_results)

NAME = "local_step"
SIZES = (64, 256, 256, 10)  # input, hidden..., classes
BATCH = 512
LR = 1e-3
CHECK_STEPS = 3
CHECK_ATOL = 1e-4  # float32 weights after CHECK_STEPS Adam steps of lr 1e-3
FULL = {"steps": 50, "repeats": 15, "warmup": 30, "wait_idle": 120}
QUICK = {"steps": 5, "repeats": 2, "warmup": 3, "wait_idle": 0}
SETTLE_S = 0.3  # > OpenBLAS's ~0.1 s spin: see time_interleaved
REWARM = 3
BUSY = 0.05  # others' CPU share in the median block above which the numbers are flagged
BUSY_MAX = 0.25  # ... or in any one block (10 ms ticks: a 0.1 s block reads 0 %, 5 %, 10 %, ...)


def make_batch(seed: int):
    """A fixed batch: standard-normal float32 features and uniform int64 class ids."""
    import numpy as np
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((BATCH, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], BATCH, dtype=np.int64)
    return X, y


def build_rddtensor(seed: int):
    """The compiled, built model with fresh Adam slots, as ``fit`` leaves it before step 1."""
    from rddtensor import layers as L
    from rddtensor.optim import Adam
    stack = [L.Dense(SIZES[1], activation="relu", input_shape=(SIZES[0],))]
    stack += [L.Dense(n, activation="relu") for n in SIZES[2:-1]]
    model = L.Sequential([*stack, L.Dense(SIZES[-1])], seed=seed)
    model.compile(optimizer=Adam(LR), loss="sparse_categorical_crossentropy")
    model.build()
    model.slots = model.optimizer.init_slots(model.layout.size)
    model.step = 0
    return model


def rddtensor_step(model, X, y, seed: int):
    """One call = one step of ``LocalRunner.train_epoch`` on ``X, y`` (minus the row gather).

    ``check_matches_local_runner`` verifies that this stays the library's step, bit for bit.
    """
    import numpy as np
    from rddtensor.training.batching import step_rng
    from rddtensor.training.steps import gradient_step, optimizer_step
    from rddtensor.runtime import prepare_process
    prepare_process()  # as LocalRunner does once per fit
    grad = np.empty(model.layout.size, dtype=np.float32)  # LocalRunner.grad
    n_batch = len(X)

    def step():
        model.step += 1
        g, stats = gradient_step(model, model.theta, X, y, loss=model.loss, n_batch=n_batch,
                                 rng=step_rng(seed, model.step), class_weight=None,
                                 metrics=model.metrics, grad_out=grad)
        optimizer_step(model.optimizer, model.theta, g, model.slots, model.step,
                       model.layout.split_segments())
        return stats["loss"] / stats["count"]
    return step


def check_matches_local_runner(X, y, seed: int) -> dict:
    """``rddtensor_step`` must give exactly the weights ``LocalRunner`` gives on the same batches.

    Guards the benchmark against timing a stale copy of the step when the library changes.
    """
    import numpy as np
    from rddtensor.training.loop import LocalRunner
    ours, theirs = build_rddtensor(seed), build_rddtensor(seed)
    step = rddtensor_step(ours, X, y, seed)
    for _ in range(CHECK_STEPS):
        step()
    runner = LocalRunner(theirs, np.tile(X, (CHECK_STEPS, 1)), np.tile(y, CHECK_STEPS),
                         batch_size=len(X), shuffle=False, seed=seed, class_weight=None)
    runner.train_epoch(0, lambda n, stats: None)
    if theirs.step != CHECK_STEPS or not np.array_equal(ours.theta, theirs.theta):
        raise RuntimeError("the benchmark's rddtensor step no longer matches LocalRunner's step: "
                           "update rddtensor_step to the body of LocalRunner.train_epoch")
    return {"steps": CHECK_STEPS, "bit_identical": True}


def build_torch(weights):
    """The same MLP in PyTorch, initialised from rddtensor's weights (same layouts)."""
    import torch
    from torch import nn
    mods = []
    for n_in, n_out in zip(SIZES[:-2], SIZES[1:-1]):
        mods += [nn.Linear(n_in, n_out), nn.ReLU()]
    net = nn.Sequential(*mods, nn.Linear(SIZES[-2], SIZES[-1]))
    params = list(net.parameters())
    if [tuple(p.shape) for p in params] != [w.shape for w in weights]:
        raise RuntimeError("PyTorch and rddtensor parameter shapes differ")
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(torch.from_numpy(w))
    return net, torch.optim.Adam(net.parameters(), lr=LR)


def torch_step(net, opt, X, y):
    """One call = ``zero_grad``, forward, ``CrossEntropyLoss``, backward, ``Adam.step``."""
    import torch
    from torch import nn
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(Xt), yt)
        loss.backward()
        opt.step()
        return loss
    return step


def check_same_training(model, net, rdd_step, pt_step) -> dict:
    """Run ``CHECK_STEPS`` steps of each and require the same weights: same work is timed."""
    import numpy as np
    for _ in range(CHECK_STEPS):
        rdd_loss, pt_loss = rdd_step(), pt_step().item()
    theirs = np.concatenate([p.detach().numpy().reshape(-1) for p in net.parameters()])
    diff = float(np.max(np.abs(model.theta - theirs)))
    if not diff <= CHECK_ATOL:
        raise RuntimeError(f"rddtensor and PyTorch weights differ by {diff:.3g} after "
                           f"{CHECK_STEPS} steps (tolerance {CHECK_ATOL}): the two sides no "
                           "longer compute the same step, so their times are not comparable")
    return {"steps": CHECK_STEPS, "max_abs_weight_diff": diff, "atol": CHECK_ATOL,
            "last_loss_rddtensor": rdd_loss, "last_loss_pytorch": pt_loss}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.local_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny counts for a smoke run ({QUICK}); writes {NAME}_quick.*")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's BLAS and for PyTorch (default: all usable cores)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per implementation")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPU idle "
                        f"(default {FULL['wait_idle']:g}, with --quick 0)")
    args = p.parse_args(argv)
    counts = QUICK if args.quick else FULL
    for key in ("steps", "repeats", "warmup", "wait_idle"):
        value = getattr(args, key)
        least = 1 if key in ("steps", "repeats") else 0
        if value is None:
            setattr(args, key, counts[key])
        elif value < least:
            p.error(f"--{key.replace('_', '-')} must be >= {least}, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def run(args) -> dict:
    """Set threads, build both sides, check them, time them; return the results payload."""
    threads = match_threads(args.threads)
    X, y = make_batch(args.seed)
    same_as_runner = check_matches_local_runner(X, y, args.seed)
    model = build_rddtensor(args.seed)
    net, opt = build_torch(model.get_weights())
    rdd, pt = rddtensor_step(model, X, y, args.seed), torch_step(net, opt, X, y)
    same_as_torch = check_same_training(model, net, rdd, pt)
    time.sleep(SETTLE_S)  # let the check's spinning BLAS workers go idle first
    idle = wait_for_idle(args.wait_idle, BUSY) if args.wait_idle else None
    if idle is not None and not idle["idle"]:
        print(f"the machine stayed busy for {args.wait_idle:g} s; timing anyway (noisy)")
    load_before = background_load(0.5)
    times = time_interleaved({"rddtensor": rdd, "pytorch": pt}, calls=args.steps,
                             repeats=args.repeats, warmup=args.warmup, settle=SETTLE_S,
                             rewarm=REWARM)
    time.sleep(SETTLE_S)  # our own spinning BLAS workers would count as background
    timing = {"method": "benchmarks.common.time_interleaved", "settle_s": SETTLE_S,
              "rewarm_calls": REWARM, "wait_for_idle": idle,
              "background_load_before": load_before, "background_load_after": background_load(0.5)}
    return {
        "benchmark": NAME,
        "description": "in-process training step (forward + loss + backward + Adam update), "
                       "ms per step, rddtensor vs PyTorch CPU in the same process",
        **environment(("numpy", "torch", "threadpoolctl", "scipy")),
        "threads": threads,
        "parameters": parameters(args, model, opt),
        "timing": timing,
        "check": {"same_as_local_runner": same_as_runner, "same_as_pytorch": same_as_torch},
        "results": times,
        "ratio_rddtensor_over_pytorch": ratio(times["rddtensor"], times["pytorch"]),
    }


def parameters(args, model, opt) -> dict:
    """What was run, for the results JSON."""
    adam = {k: v for k, v in opt.defaults.items()
            if v is None or isinstance(v, (int, float, bool, tuple))}
    return {
        "sizes": list(SIZES), "activation": "relu",
        "loss": "sparse categorical cross-entropy from logits (mean over the batch)",
        "optimizer": {"name": "adam", "lr": LR}, "batch": BATCH, "dtype": "float32",
        "param_count": int(model.layout.size), "steps_per_block": args.steps,
        "repeats": args.repeats, "warmup_steps": args.warmup, "seed": args.seed,
        "quick": args.quick,
        "rddtensor_path": "rddtensor.training.steps.gradient_step + optimizer_step (LocalRunner's step "
                          "body, checked bit-identical to LocalRunner; same batch every step, "
                          "no row gather)",
        "pytorch_path": "zero_grad(set_to_none=True), CrossEntropyLoss, backward, "
                        "torch.optim.Adam.step",
        "pytorch_adam_defaults": adam,
    }


def table(payload: dict) -> str:
    p, res = payload["parameters"], payload["results"]
    r = payload["ratio_rddtensor_over_pytorch"]
    rows = []
    for name, label in (("rddtensor", "rddtensor (NumPy " + payload["versions"]["numpy"] + ")"),
                        ("pytorch", "PyTorch " + payload["versions"]["torch"])):
        s = res[name]
        rows.append([label, s["median"], s["min"], s["max"],
                     f"{s['median'] / res['pytorch']['median']:.2f}x"])
    m, n = payload["machine"], payload["threads"]["threads"]
    head = (f"Training step, {'-'.join(map(str, p['sizes']))} MLP (ReLU, softmax cross-entropy, "
            f"Adam), batch {p['batch']} {p['dtype']}; {n} thread{'s' if n > 1 else ''} "
            f"each; {m['cpu_model']}, {m['cores']} cores; median of {p['repeats']} blocks of "
            f"{p['steps_per_block']} steps{' (QUICK)' if p['quick'] else ''}.")
    body = markdown_table(["implementation", "median ms/step", "min", "max", "vs PyTorch"], rows)
    foot = (f"rddtensor / PyTorch: {r['of_medians']:.2f}x (ratio of medians), "
            f"{r['paired_median']:.2f}x (median of per-block ratios, "
            f"range {r['paired_min']:.2f}-{r['paired_max']:.2f}).")
    blocks = [b for name in res for b in res[name]["background"] if b is not None]
    if blocks:
        mid, top = statistics.median(blocks), max(blocks)
        foot += (f" Other processes used {mid:.0%} of the CPU during the median timed block, "
                 f"{top:.0%} during the busiest.")
        if mid > BUSY or top > BUSY_MAX:
            foot += ("\n\nWARNING: other processes loaded the machine during timing; these times "
                     "are inflated and noisy. Re-run on an idle machine.")
    return f"{head}\n\n{body}\n\n{foot}\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    text = table(payload)
    path = write_results(NAME + ("_quick" if args.quick else ""), payload, text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
