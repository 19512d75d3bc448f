"""Forward + backward time per layer: rddtensor (NumPy) against PyTorch CPU, same thread count.

Layers (float32): Dense 512->512 on a (256, 512) batch; Conv2D 3x3, 64->64 channels, padding 1
on (32, 64, 32, 32); LSTM with 128 units over 50 steps of 128 features, batch 32
(``return_sequences=True``); a residual block written as a graph model (``L.Model``: Conv2D
3x3 -> BatchNorm -> ReLU -> Conv2D 3x3 -> BatchNorm, plus a 1x1 projection shortcut, ``Add``,
ReLU; 32 -> 64 channels on (32, 32, 16, 16), BatchNorm in training mode) against the same
``torch.nn.Module``; MultiHeadAttention (self-attention, d_model 256, 8 heads) and
TransformerEncoderLayer (d_model 256, 8 heads, dim_feedforward 1024, ReLU, post-norm, dropout 0)
on (32, 128, 256), against ``torch.nn.MultiheadAttention(batch_first=True)`` called as
``mha(X, X, X, need_weights=False)`` and ``torch.nn.TransformerEncoderLayer(batch_first=True)``. One call = forward, then backward with output gradient ``R``
(a fixed random array), computing the input and the weight gradients on both sides: PyTorch
runs ``Y.backward(R)`` on an input with ``requires_grad=True``. Both libraries get the same
weights (PyTorch layouts) and inputs; a check asserts their outputs agree before anything is
timed. Thread counts are matched with ``benchmarks.common.match_threads`` and the timed blocks
alternate (``time_interleaved``).

NumPy's GEMMs run on its bundled OpenBLAS, which picks its kernels from the CPU at load time
unless ``OPENBLAS_CORETYPE`` names them. The project's development machine (AMD EPYC, Zen 5,
AVX-512) sets ``OPENBLAS_CORETYPE=Haswell`` in every process's environment, which holds
OpenBLAS to its AVX2 kernels; without it NumPy's OpenBLAS 0.3.31 picks its AVX-512 "SkylakeX"
kernels there by itself. PyTorch's oneDNN/MKL ignore the variable and use AVX-512.
``--openblas-coretype SkylakeX`` sets the variable before NumPy loads, to measure with the
kernels OpenBLAS would choose; by default the environment is left as it is. The table footer
names the kernels OpenBLAS reported.

Memory: both libraries allocate through glibc in this one process. The layers run with the
malloc settings every rddtensor training step applies (``rddtensor.allocator.tune_malloc``:
temporaries reuse heap pages instead of fresh, zero-filled ones), so the numbers are what a fit
sees; ``--malloc default`` measures with glibc's defaults instead (then each side's speed also
depends on what the other freed before it: glibc raises its mmap threshold as it goes).

Usage::

    python -m benchmarks.layers [--quick] [--threads T] [--repeats R] [--openblas-coretype NAME]
                                [--malloc tuned|default] [--only KIND ...]

Writes ``benchmarks/results/layers.json`` and ``layers.md`` (``layers_quick.*`` with --quick,
``layers_<name>.*`` with --openblas-coretype, ``layers_only_<kinds>.*`` with --only, which runs
just the rows of those kinds: dense, conv, lstm, mha, tel, resblock).
"""
from __future__ import annotations

import argparse
import os

import sys

from benchmarks.common import (background_load, environment, markdown_table, match_threads, ratio,
                               time_interleaved, write_results)

CASES = {
    "Dense 512->512, batch 256": ("dense", (256, 512)),
    "Conv2D 3x3 64->64, 32x32, batch 32": ("conv", (32, 64, 32, 32)),
    "LSTM 128 units x 50 steps, batch 32": ("lstm", (32, 50, 128)),
    "MultiHeadAttention d 256, 8 heads, seq 128, batch 32": ("mha", (32, 128, 256)),
    "TransformerEncoderLayer d 256, 8 heads, ff 1024, seq 128, batch 32": ("tel", (32, 128, 256)),
    "Residual block (graph model) 32->64, 16x16, batch 32": ("resblock", (32, 32, 16, 16)),
}


def _resblock(c_in: int, hw: int):
    """A residual block as a graph model: Conv2D 3x3 -> BatchNorm -> ReLU -> Conv2D 3x3 ->
    BatchNorm, plus a 1x1 Conv2D projection of the input, added, ReLU (64 channels out)."""
    from rddtensor import layers as L
    x = L.Input((c_in, hw, hw))
    h = L.ReLU()(L.BatchNorm()(L.Conv2D(64, 3, padding=1)(x)))
    h = L.BatchNorm()(L.Conv2D(64, 3, padding=1)(h))
    return L.Model(x, L.ReLU()(L.Add()([h, L.Conv2D(64, 1)(x)])), seed=0).build()


class _GraphAsLayer:
    """A built graph model with a layer's ``forward(params, X, training)`` (for ``make_case``)."""

    def __init__(self, model):
        self.model = model

    def forward(self, params, X, training=False):
        return self.model.forward(params, X, training=training)


def _ours(kind, shape):
    import numpy as np

    from rddtensor import layers as L
    if kind == "resblock":
        model = _resblock(shape[1], shape[2])
        return _GraphAsLayer(model), model.params
    layer = {"dense": lambda: L.Dense(512), "conv": lambda: L.Conv2D(64, 3, padding=1),
             "lstm": lambda: L.LSTM(128, return_sequences=True),
             "mha": lambda: L.MultiHeadAttention(256, 8),
             "tel": lambda: L.TransformerEncoderLayer(256, 8, dim_feedforward=1024,
                                                      dropout=0.0)}[kind]()
    layer.build(shape[1:])
    params = layer.init_params(np.random.default_rng(0))
    return layer, params


def _torch_twin(kind, params):
    import torch
    if kind == "dense":
        m = torch.nn.Linear(512, 512)
        m.weight.data = torch.from_numpy(params["W"].copy())
        m.bias.data = torch.from_numpy(params["b"].copy())
    elif kind == "conv":
        m = torch.nn.Conv2d(64, 64, 3, padding=1)
        m.weight.data = torch.from_numpy(params["W"].copy())
        m.bias.data = torch.from_numpy(params["b"].copy())
    elif kind == "resblock":  # the same block in PyTorch; weights by layer (see _resblock)
        class Block(torch.nn.Module):
            def __init__(self, c_in):
                super().__init__()
                self.conv1, self.bn1 = torch.nn.Conv2d(c_in, 64, 3, padding=1), \
                    torch.nn.BatchNorm2d(64)
                self.conv2, self.bn2 = torch.nn.Conv2d(64, 64, 3, padding=1), \
                    torch.nn.BatchNorm2d(64)
                self.proj = torch.nn.Conv2d(c_in, 64, 1)

            def forward(self, x):
                h = torch.relu(self.bn1(self.conv1(x)))
                return torch.relu(self.bn2(self.conv2(h)) + self.proj(x))
        m = Block(params["0.W"].shape[1])
        for i, mod in ((0, m.conv1), (1, m.bn1), (3, m.conv2), (4, m.bn2), (5, m.proj)):
            mod.weight.data = torch.from_numpy(params[f"{i}.W"].copy())
            mod.bias.data = torch.from_numpy(params[f"{i}.b"].copy())
    elif kind in ("mha", "tel"):  # our keys are PyTorch's state_dict keys
        m = (torch.nn.MultiheadAttention(256, 8, batch_first=True) if kind == "mha" else
             torch.nn.TransformerEncoderLayer(256, 8, dim_feedforward=1024, dropout=0.0,
                                              batch_first=True))
        m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    else:
        m = torch.nn.LSTM(128, 128, batch_first=True)
        for k in ("W_ih", "W_hh", "b_ih", "b_hh"):
            name = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0",
                    "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}[k]
            getattr(m, name).data = torch.from_numpy(params[k].copy())
    return m


def make_case(kind, shape):
    """``(ours, theirs)``: two zero-argument callables doing forward + backward once."""
    import numpy as np
    import torch
    rng = np.random.default_rng(1)
    X = rng.standard_normal(shape, dtype=np.float32)
    layer, params = _ours(kind, shape)
    net = _torch_twin(kind, params)
    Y, _ = layer.forward(params, X, training=True)
    R = rng.standard_normal(Y.shape, dtype=np.float32)
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    Rt = torch.from_numpy(R)

    def torch_out():
        out = net(Xt, Xt, Xt, need_weights=False) if kind == "mha" else net(Xt)
        return out[0] if isinstance(out, tuple) else out
    np.testing.assert_allclose(Y, torch_out().detach().numpy(), rtol=1e-3, atol=1e-3)

    def ours():
        Y, backprop = layer.forward(params, X, training=True)
        backprop(R)

    def theirs():
        net.zero_grad(set_to_none=True)
        Xt.grad = None
        torch_out().backward(Rt)  # the gradient of sum(Y * R), without computing that sum
    return ours, theirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--openblas-coretype", default=None, metavar="NAME",
                    help="set OPENBLAS_CORETYPE (e.g. SkylakeX) before NumPy loads")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="rddtensor's malloc settings (what a fit runs with) or glibc's defaults")
    ap.add_argument("--only", nargs="+", default=None, metavar="KIND",
                    choices=sorted({kind for kind, _ in CASES.values()}),
                    help="run just the rows of these layer kinds")
    a = ap.parse_args(argv)
    if a.openblas_coretype:
        if "numpy" in sys.modules:
            raise RuntimeError("--openblas-coretype must be applied before numpy is imported; "
                               "run python -m benchmarks.layers in a fresh process")
        os.environ["OPENBLAS_CORETYPE"] = a.openblas_coretype
    if a.malloc == "tuned":
        from rddtensor.allocator import tune_malloc
        malloc = tune_malloc()
    else:
        malloc = "glibc defaults"
    threads = match_threads(a.threads)
    blas = sorted({f"{p['internal_api']} {p['architecture']}" for p in threads.get("pools", [])
                   if p.get("user_api") == "blas"})
    calls, repeats, warmup = (2, 2, 1) if a.quick else (5, a.repeats or 9, 3)
    load = background_load(0.5)
    load_avg = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    rows, results = [], {}
    for label, (kind, shape) in CASES.items():
        if a.only and kind not in a.only:
            continue
        ours, theirs = make_case(kind, shape)
        r = time_interleaved({"rddtensor": ours, "pytorch": theirs}, calls=calls,
                             repeats=repeats, warmup=warmup, settle=0.3, rewarm=1)
        q = ratio(r["rddtensor"], r["pytorch"])
        results[label] = {"timings": r, "ratio": q, "shape": list(shape)}
        rows.append([label, r["rddtensor"]["median"], r["pytorch"]["median"],
                     f"{q['of_medians']:.2f}x", f"{q['paired_min']:.2f}-{q['paired_max']:.2f}x"])
    table = markdown_table(["layer (forward+backward)", "rddtensor ms", "PyTorch CPU ms",
                            "ratio (medians)", "paired ratio range"], rows)
    flags = (" --quick" if a.quick else "") + (f" --openblas-coretype {a.openblas_coretype}"
                                                if a.openblas_coretype else "") + (
        " --malloc default" if a.malloc == "default" else "") + (
        f" --only {' '.join(a.only)}" if a.only else "")
    table += (f"\n\nThreads: {threads['threads']} for both (`match_threads`); NumPy's BLAS: "
              f"{', '.join(blas) or 'unknown'}"
              f"{' (OPENBLAS_CORETYPE=' + a.openblas_coretype + ')' if a.openblas_coretype else ''}"
              f"; malloc: {malloc}; background load before the run: {load}, load average {load_avg}. Command: "
              f"`python -m benchmarks.layers{flags}`.\n")
    payload = {"benchmark": "layers", "environment": environment(("numpy", "torch")),
               "threads": threads, "blas": blas, "openblas_coretype": a.openblas_coretype,
               "malloc": malloc,
               "background_load": load, "load_average": load_avg,
               "parameters": {"calls": calls, "repeats": repeats, "warmup": warmup},
               "results": results}
    name = "layers" + ("_quick" if a.quick else "") + (
        f"_{a.openblas_coretype.lower()}" if a.openblas_coretype else "") + (
        "_malloc_default" if a.malloc == "default" else "") + (
        f"_only_{'_'.join(sorted(a.only))}" if a.only else "")
    path = write_results(name, payload, table)
    print(table)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
