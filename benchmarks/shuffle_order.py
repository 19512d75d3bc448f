"""What the epoch order does to convergence, and to reading batches from disk (issue 16).

``fit(..., shuffle=BlockShuffle(block_rows=B, window_blocks=K))`` shuffles blocks of ``B`` rows,
then the rows within windows of ``K`` blocks (``rddtensor.training.batching``). Two questions:

**Convergence.** Synthetic 10-class data (``--features`` Gaussian features, strongly overlapping
classes: about 41% attainable accuracy), ``--rows`` training rows stored either in random order
or sorted by label (the worst case for any block scheme: a block holds one class), and a
held-out test set of ``--test-rows`` rows. A small MLP (features -> 64 ReLU -> 10), SGD
(lr 0.05, momentum 0.9), batch ``--batch``, ``--epochs`` epochs, trained in-process with the
library's own ``fit`` for each order: global (``shuffle=True``), several ``BlockShuffle(B, K)``
and none (``shuffle=False``), seeds 0..``--seeds``-1 (the seed draws the initial weights and
every epoch's order). Reported: test accuracy after every epoch (the final one in the table).

**Reading batches** (``--io``; skipped with ``--no-io``): one stored partition of
``--io-rows`` rows x ``--features`` float32 (512-byte rows at 128 features) written with the
data store's own ``PartitionWriter`` under ``--data-dir``; the first ``--io-steps`` batches of
``--io-batch`` rows are gathered with ``PartitionReader.take`` (the engine's read path) in the
global order, the block order, and the block order reading ahead as the engine's tasks do
(``stages.read_ahead``: ``MADV_WILLNEED`` on the partition's runs of each window a step enters
and of the next one, adjacent blocks merged); cold (the file dropped from the page cache with ``fsync`` + ``posix_fadvise(DONTNEED)``
before each run) and warm. On a VM whose disk is served from the host's cache, cold random reads
cost little and the orders differ little: the numbers say what *this* machine does.

Usage::

    python -m benchmarks.shuffle_order            # ~3-5 min on 2 cores
    python -m benchmarks.shuffle_order --quick    # smoke test, seconds
    python -m benchmarks.shuffle_order --no-io

Writes ``benchmarks/results/shuffle_order.json`` and ``.md`` (``shuffle_order_quick`` with
``--quick``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import (environment, load_average, markdown_table, match_threads,
                               summarize, wait_for_idle, write_results)

CLASSES, HIDDEN = 10, 64
#: the block orders of the convergence table, ``(block_rows, window_blocks)``
BLOCK_ORDERS = [(16, 1024), (64, 1024), (64, 256), (64, 64), (256, 16), (1024, 8), (4096, 2)]
QUICK_BLOCK_ORDERS = [(64, 64), (1024, 2)]


# --- convergence -----------------------------------------------------------------------------
def make_data(rows: int, test_rows: int, features: int, sorted_by_label: bool):
    """``(X, y, X_test, y_test)``: overlapping Gaussian classes, the same draw for both storages
    (the training rows sorted by label, stably, for ``sorted_by_label``)."""
    rng = np.random.default_rng(123)
    means = rng.standard_normal((CLASSES, features)).astype(np.float32) * 0.15
    y = rng.integers(0, CLASSES, rows + test_rows)
    X = (means[y] + rng.standard_normal((rows + test_rows, features), dtype=np.float32))
    X, y, Xt, yt = X[:rows], y[:rows], X[rows:], y[rows:]
    if sorted_by_label:
        o = np.argsort(y, kind="stable")
        X, y = X[o], y[o]
    return np.ascontiguousarray(X), y.astype(np.int64), Xt, yt.astype(np.int64)


def train(data, shuffle, seed: int, epochs: int, batch: int) -> dict:
    """One in-process ``fit``; test accuracy and loss after every epoch."""
    from rddtensor import layers as L
    from rddtensor.optim import SGD
    X, y, Xt, yt = data
    m = L.Sequential([L.Dense(HIDDEN, activation="relu", input_shape=(X.shape[1],)),
                      L.Dense(CLASSES)], seed=seed)
    m.compile(optimizer=SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    t0 = time.perf_counter()
    h = m.fit(X, y, epochs=epochs, batch_size=batch, shuffle=shuffle, seed=seed, verbose=0,
              validation_data=(Xt, yt))
    return {"seed": seed, "test_accuracy": [round(float(a), 4) for a in h.history["val_accuracy"]],
            "test_loss": [round(float(a), 4) for a in h.history["val_loss"]],
            "train_loss": [round(float(a), 4) for a in h.history["loss"]],
            "fit_s": round(time.perf_counter() - t0, 2)}


def order_name(shuffle) -> str:
    if shuffle is True:
        return "global (shuffle=True)"
    if shuffle is False:
        return "none (shuffle=False)"
    return f"B={shuffle.block_rows} K={shuffle.window_blocks}"


def convergence(args) -> list:
    from rddtensor.training import BlockShuffle
    orders = [True] + [BlockShuffle(b, k) for b, k in args.block_orders] + [False]
    out = []
    for sorted_by_label in (False, True):
        data = make_data(args.rows, args.test_rows, args.features, sorted_by_label)
        for shuffle in orders:
            runs = [train(data, shuffle, seed, args.epochs, args.batch)
                    for seed in range(args.seeds)]
            final = [r["test_accuracy"][-1] for r in runs]
            r = {"storage": "sorted by label" if sorted_by_label else "random order",
                 "order": order_name(shuffle),
                 "block_rows": getattr(shuffle, "block_rows", None),
                 "window_blocks": getattr(shuffle, "window_blocks", None),
                 "window_rows": getattr(shuffle, "window_rows", None),
                 "final_test_accuracy": summarize(final, "accuracy"), "runs": runs}
            out.append(r)
            print(f"{r['storage']:>16}  {r['order']:<22} final test accuracy "
                  f"{statistics.mean(final):.3f} ({min(final):.3f}-{max(final):.3f})", flush=True)
    return out


# --- reading batches from a stored partition -------------------------------------------------
def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # (dirty pages cannot be dropped)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_batches(directory: str, order, batch: int, steps: int, spec=None) -> float:
    """ms per batch gathering the first ``steps`` batches of ``order``; with ``spec`` (the
    order's ``BlockShuffle``), reading ahead as the engine's tasks do (``stages.read_ahead``:
    at each step the windows ``batching.windows_to_prefetch`` names)."""
    from rddtensor.spark.datastore import PartitionReader
    from rddtensor.training.batching import block_windows, windows_to_prefetch
    n = len(order)
    with PartitionReader.open(directory) as reader:
        t0 = time.perf_counter()
        if spec is not None:  # (an engine task caches these per epoch: timed once here too)
            bounds, runs = block_windows(n, 0, 0, spec)
        for b in range(steps):
            if spec is not None:
                for w in windows_to_prefetch(bounds, b, batch):
                    for a, z in runs[w].tolist():
                        reader.prefetch("x", a, z)
            reader.take("x", order[b * batch:(b + 1) * batch])
        return 1e3 * (time.perf_counter() - t0) / steps


def reading(args) -> dict:
    from rddtensor.spark.datastore import PartitionWriter
    from rddtensor.training import BlockShuffle
    from rddtensor.training.batching import epoch_order
    spec = BlockShuffle(*args.io_order)
    rows = args.io_rows - args.io_rows % spec.block_rows
    root = tempfile.mkdtemp(prefix="rddtensor-shuffle-io-", dir=args.data_dir)
    try:
        directory = os.path.join(root, "p00000")
        rng = np.random.default_rng(0)
        with PartitionWriter(directory, dataset="shuffle-io", part=0) as w:
            for a in range(0, rows, 16384):
                w.append({"x": rng.standard_normal((min(16384, rows - a), args.features),
                                                   dtype=np.float32)})
        path = os.path.join(directory, "x.npy")
        steps = min(args.io_steps, rows // args.io_batch)
        orders = {"global (shuffle=True)": (epoch_order(rows, 0, 0, True), None),
                  order_name(spec): (epoch_order(rows, 0, 0, spec), None),
                  order_name(spec) + " + read-ahead": (epoch_order(rows, 0, 0, spec), spec),
                  "none (shuffle=False)": (epoch_order(rows, 0, 0, False), None)}
        got = {k: {"cold": [], "warm": []} for k in orders}
        for r in range(args.io_repeats):  # interleaved, the order reversed every other repeat
            names = list(orders) if r % 2 == 0 else list(orders)[::-1]
            for name in names:
                order, pf = orders[name]
                _drop_from_page_cache(path)
                got[name]["cold"].append(_read_batches(directory, order, args.io_batch, steps, pf))
                got[name]["warm"].append(_read_batches(directory, order, args.io_batch, steps, pf))
        fs = _filesystem(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows, "row_bytes": 4 * args.features, "file_mib": rows * 4 * args.features
            / 2**20, "batch": args.io_batch, "steps": steps, "filesystem": fs,
            "results": {k: {"cold_ms_per_batch": summarize(v["cold"], "ms"),
                            "warm_ms_per_batch": summarize(v["warm"], "ms")}
                        for k, v in got.items()}}


def _filesystem(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (``/proc/mounts``): tmpfs holds no disk."""
    try:
        best = ("", None)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and os.path.realpath(path).startswith(parts[1]) and \
                        len(parts[1]) > len(best[0]):
                    best = (parts[1], parts[2])
        return best[1]
    except OSError:
        return None


# --- report ----------------------------------------------------------------------------------
def _tables(args, conv: list, io: dict | None) -> str:
    orders = list(dict.fromkeys(r["order"] for r in conv))
    rows = []
    for storage in ("random order", "sorted by label"):
        cells = {r["order"]: r["final_test_accuracy"] for r in conv if r["storage"] == storage}
        rows.append([storage] + [f"{statistics.mean(cells[o]['samples']):.3f} "
                                 f"({cells[o]['min']:.3f}-{cells[o]['max']:.3f})"
                                 for o in orders])
    windows = ["window rows"] + [next((f"{r['window_rows']:,}" for r in conv if r["order"] == o
                                       and r["window_rows"]), "all" if o.startswith("global")
                                      else "-") for o in orders]
    text = (f"Convergence by epoch order (in-process `fit`; {args.rows:,} training rows, "
            f"{args.features} features, {CLASSES} overlapping classes; MLP {args.features}-"
            f"{HIDDEN}-{CLASSES}, SGD lr 0.05 momentum 0.9, batch {args.batch}, {args.epochs} "
            f"epochs). Test accuracy ({args.test_rows:,} held-out rows) after the last epoch: "
            f"mean over seeds 0-{args.seeds - 1} (min-max). B = block_rows, K = window_blocks.\n\n"
            + markdown_table(["storage"] + orders, rows + [windows]))
    if io is not None:
        io_rows = [[name, r["cold_ms_per_batch"]["median"],
                    f"{r['cold_ms_per_batch']['min']:.3g}-{r['cold_ms_per_batch']['max']:.3g}",
                    r["warm_ms_per_batch"]["median"]]
                   for name, r in io["results"].items()]
        text += ("\n\nReading batches from a stored partition (`PartitionReader.take`; "
                 f"{io['rows']:,} rows x {io['row_bytes']} B = {io['file_mib']:.0f} MiB on "
                 f"{io['filesystem']}; first {io['steps']} batches of {io['batch']} rows; cold: "
                 "the file dropped from the page cache before each run). Medians of "
                 f"{args.io_repeats} interleaved runs.\n\n"
                 + markdown_table(["order", "cold ms/batch", "cold range", "warm ms/batch"],
                                  io_rows))
    text += ("\n\nCommand: `python -m benchmarks.shuffle_order"
             + (" --quick" if args.quick else "") + (" --no-io" if not args.io else "")
             + "`.\n")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--test-rows", type=int, default=16384)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--io", dest="io", action="store_true", default=True)
    ap.add_argument("--no-io", dest="io", action="store_false")
    ap.add_argument("--io-rows", type=int, default=262144)
    ap.add_argument("--io-features", type=int, default=128)
    ap.add_argument("--io-batch", type=int, default=4096)
    ap.add_argument("--io-steps", type=int, default=48)
    ap.add_argument("--io-repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="where the I/O test writes its partition")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=30.0)
    args = ap.parse_args(argv)
    args.block_orders = BLOCK_ORDERS
    args.io_order = (64, 1024)
    if args.quick:
        args.rows, args.test_rows, args.epochs, args.seeds = 8192, 2048, 2, 1
        args.io_rows, args.io_steps, args.io_repeats, args.wait_idle = 32768, 4, 1, 0
        args.block_orders = QUICK_BLOCK_ORDERS
        args.io_order = (64, 64)
    threads = match_threads(1, torch=False)  # (convergence does not depend on it; speed does)
    idle = wait_for_idle(args.wait_idle) if args.wait_idle else None
    load_before = load_average()
    t0 = time.perf_counter()
    conv = convergence(args)
    conv_s = time.perf_counter() - t0
    io_args = argparse.Namespace(**{**vars(args), "features": args.io_features})
    io = reading(io_args) if args.io else None
    table = _tables(args, conv, io)
    payload = {"benchmark": "shuffle_order", "environment": environment(("numpy",)),
               "threads": threads, "idle": idle, "load_average_before": load_before,
               "load_average_after": load_average(),
               "parameters": {k: v for k, v in vars(args).items()},
               "convergence_s": round(conv_s, 1), "results": {"convergence": conv,
                                                              "reading": io}}
    write_results("shuffle_order_quick" if args.quick else "shuffle_order", payload, table)
    print(table)
    return payload


if __name__ == "__main__":
    main()
