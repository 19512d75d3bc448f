"""``benchmarks/RESULTS.md`` and its PNG charts, regenerated from the results JSONs.

Every number in the report is read from ``benchmarks/results/<name>.json`` (each section names
its file); the tables are the ones each benchmark writes to ``<name>.md``, the charts are drawn
here with matplotlib (Agg backend, no display needed). A benchmark without a JSON yet gets a
line saying so. ``results/measured_choices.md`` (the timings behind choices the code makes,
kept out of code comments) and ``results/closing_note.md`` (hand-written analysis: where the
time goes, what would close a gap) are included verbatim when present, after the generated sections.

Example::

    from benchmarks.report import write_report
    write_report(RESULTS_DIR)          # -> benchmarks/RESULTS.md
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.common import ROOT, markdown_table

REPORT = ROOT / "benchmarks" / "RESULTS.md"
ORDER = ("race_digits", "cnn_throughput", "scaling_model", "local_step", "layers", "allreduce",
         "inference", "datascale", "shuffle_order")
TITLES = {"race_digits": "The race: time to 0.97 on digits x20",
          "cnn_throughput": "CNN training throughput and 1 -> 2 partition scaling",
          "scaling_model": "All-reduce cost model and extrapolation past one machine",
          "local_step": "In-process training step", "layers": "Layers, forward + backward",
          "allreduce": "All-reduce per iteration on local[2]",
          "inference": "Inference",
          "datascale": "Per-iteration cost against data size (the data store)",
          "shuffle_order": "Epoch order at scale: BlockShuffle convergence and reads"}


def _load(results_dir: Path, name: str, quick: bool):
    path = results_dir / f"{name}{'_quick' if quick else ''}.json"
    if not path.exists():
        return None, path
    return json.loads(path.read_text()), path


def _env(payload) -> dict:
    env = payload.get("environment")
    return env if isinstance(env, dict) and "machine" in env else payload


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


# --- charts ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    fig.clf()
    _plt().close(fig)
    tmp.replace(path)
    return path


def chart_race(payload, path):
    plt = _plt()
    res = payload["results"]
    names = list(res)
    med = [res[n]["wall_s"]["median"] for n in names]
    lo = [m - res[n]["wall_s"]["min"] for m, n in zip(med, names)]
    hi = [res[n]["wall_s"]["max"] - m for m, n in zip(med, names)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["tab:red" if n.startswith("rddtensor") else "tab:gray" for n in names]
    ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
    for i, n in enumerate(names):
        ax.text(med[i] + hi[i], i, f"  {med[i]:.2f} s, {res[n]['steps']} steps", va="center",
                fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"wall seconds to >= {payload['parameters']['target']} test accuracy "
                  "(median, min-max)")
    ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.45)
    ax.set_title("digits x%d race, 64-128-64-10 MLP" % payload["parameters"]["replicas"])
    return _save(fig, path)


def chart_cnn(payload, path):
    plt = _plt()
    res = {n: r for n, r in payload["results"].items() if "summary" in r}
    names = list(res)
    med = [res[n]["summary"]["median"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.barh(names, med, color=["tab:red" if n.startswith("rddtensor") else "tab:gray"
                               for n in names])
    for i, m in enumerate(med):
        ax.text(m, i, f"  {m:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(med) * 1.25)
    eff = payload.get("scaling_efficiency_1_to_2")
    ax.set_xlabel("training samples/s (median over epochs)")
    ax.set_title("small CNN, batch %d%s" % (payload["parameters"]["batch"],
                 f"; local[1] -> local[2] efficiency {eff['of_medians']:.0%}" if eff else ""))
    return _save(fig, path)


def chart_scaling(payload, path):
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"sharded": "-", "mllib": "--"}
    pts = [p for p in payload["points"] if "median_ms" in p]
    for (m, c, P) in sorted({(p["master"], p["contender"], p["P"]) for p in pts}):
        xs = sorted((p["N"], p["median_ms"]) for p in pts
                    if (p["master"], p["contender"], p["P"]) == (m, c, P))
        a1.plot([x for x, _ in xs], [y for _, y in xs], styles.get(c, ":"), marker="o",
                label=f"{'cluster' if 'cluster' in m else 'local'} {c} P={P:.0e}")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("partitions N")
    a1.set_ylabel("ms per iteration (measured)")
    a1.set_title("this machine (2 cores): local[2] and local-cluster[2,1,1024]")
    a1.legend(fontsize=6, ncol=2)
    rows = payload["cluster"]["rows"]
    for P in payload["cluster"]["P"]:
        for g in payload["cluster"]["gbit"]:
            sel = [r for r in rows if r["P"] == P and r["gbit"] == g]
            for c in ("sharded", "mllib"):
                if sel and f"{c}_ms" in sel[0]:
                    a2.plot([r["N"] for r in sel], [r[f"{c}_ms"] for r in sel], styles[c],
                            marker="." if g == 10 else "x",
                            label=f"{'rddtensor' if c == 'sharded' else 'MLlib'} P={P:.0e} {g} Gbit/s")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("executors N")
    a2.set_ylabel("ms per iteration (model)")
    a2.set_title("extrapolated: rddtensor (solid) vs MLlib pattern (dashed)")
    a2.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def chart_local_step(payload, path):
    plt = _plt()
    res = payload["results"]
    fig, ax = plt.subplots(figsize=(5, 2.2))
    names = list(res)
    med = [res[n]["median"] for n in names]
    ax.barh(names, med, color=["tab:red", "tab:gray"][:len(names)])
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    return _save(fig, path)


def chart_layers(payload, path):
    plt = _plt()
    res = payload["results"]
    cases = list(res)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ys = range(len(cases))
    ours = [res[c]["timings"]["rddtensor"]["median"] for c in cases]
    theirs = [res[c]["timings"]["pytorch"]["median"] for c in cases]
    ax.barh([y - 0.2 for y in ys], ours, height=0.4, color="tab:red", label="rddtensor")
    ax.barh([y + 0.2 for y in ys], theirs, height=0.4, color="tab:gray", label="PyTorch CPU")
    ax.set_yticks(list(ys), cases, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms, forward + backward (median)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def chart_allreduce(payload, path):
    plt = _plt()
    by = {}
    for r in payload["results"]:
        if "median_ms" in r:
            by.setdefault(r["contender"], []).append((r["P"], r["median_ms"]))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for c, xs in by.items():
        xs.sort()
        ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o",
                linestyle="--" if c == "mllib" else "-", label=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters P")
    ax.set_ylabel("ms per iteration (median)")
    ax.legend(fontsize=7)
    return _save(fig, path)


CHARTS = {"race_digits": chart_race, "cnn_throughput": chart_cnn, "scaling_model": chart_scaling,
          "local_step": chart_local_step, "layers": chart_layers, "allreduce": chart_allreduce}


# --- sections -------------------------------------------------------------------------------------
def _machine_line(payload) -> str:
    env = _env(payload)
    m, v, g = env.get("machine", {}), env.get("versions", {}), env.get("git", {})
    gpus = ", ".join(x["name"] for x in m.get("gpus") or []) or "no GPU"
    mem = m.get("memory_bytes")
    box = f"{m.get('cpu_model')}, {m.get('cores')} cores" + (f", {mem / 2**30:.0f} GiB"
                                                              if mem else "")
    return (f"{box}, {gpus}; Python {v.get('python')}, {v.get('java')}, PySpark "
            f"{v.get('pyspark')}, NumPy {v.get('numpy')}, PyTorch {v.get('torch')}, CuPy "
            f"{v.get('cupy')}; commit {(g.get('commit') or '?')[:10]}"
            f"{' (+ uncommitted changes)' if g.get('dirty') else ''}; {env.get('created', '?')}; "
            f"load average at the end {m.get('load_average')}")


def race_profile_text(payload) -> str:
    prof = payload.get("profile")
    if not prof:
        return ""
    st, pc = prof["stages"], prof["python_compute_ms"]
    lines = [f"Profile of rddtensor-distributed's iterations (one extra fit of "
             f"{prof['fit_budget']['steps']} steps, Spark REST API):",
             "",
             f"- marginal cost per step: {prof['ms_per_step_marginal']:.0f} ms (from a 1-epoch "
             f"and a {payload['results']['rddtensor-distributed']['budget']}-epoch fit); fixed "
             f"cost of a fit (shards, θ broadcast, final gather): {prof['fixed_cost_s']:.2f} s",
             f"- Python compute of one partition's step ({pc['rows_per_partition']} rows, one "
             f"BLAS thread): gradient {pc['gradient_ms']:.1f} ms + update "
             f"{pc['update_ms']:.2f} ms"]
    if st.get("available"):
        per = st["per_iteration"]
        lines += [
            f"- {st['stages_per_iteration']:.1f} Spark stages per iteration; stage wall time "
            f"{per['stage_wall_ms']:.0f} ms per iteration; tasks' executor run time "
            f"{per['executorRunTime']:.0f} ms (CPU {per['executorCpuTime']:.0f} ms in the JVM), "
            f"task deserialisation {per['executorDeserializeTime']:.0f} ms, result "
            f"serialisation {per['resultSerializationTime']:.0f} ms, JVM GC "
            f"{per['jvmGcTime']:.0f} ms, shuffle write {per['shuffleWriteTime']:.1f} ms / "
            f"fetch wait {per['shuffleFetchWaitTime']:.1f} ms, "
            f"{per['shuffleWriteBytes'] / 1e3:.0f} kB shuffled (all summed over tasks)"]
    return "\n".join(lines) + "\n"


def race_verdict(payload) -> list:
    res, q = payload["results"], payload["ratio_rddtensor_distributed_over"]
    out = []
    if "rddtensor-distributed" not in res:
        return out
    if "mllib-mlpc" in q:
        r = q["mllib-mlpc"]
        out.append(f"rddtensor distributed / MLlib MLPC = {r:.2f} (target <= 0.33): "
                   + ("**met**" if r <= 1 / 3 else f"**missed** by {r / (1 / 3):.2f}x"))
    if "torchdistributor" in q:
        r = q["torchdistributor"]
        out.append(f"rddtensor distributed / TorchDistributor = {r:.2f} (target < 1): "
                   + ("**met**" if r < 1 else f"**missed** by {r:.2f}x"))
    return out


def scaling_text(payload) -> str:
    out = ["Assumptions of the extrapolation:", ""]
    out += [f"- {a}" for a in payload.get("assumptions", [])]
    tl = payload.get("task_launch")
    if tl:
        out.append(f"- measured driver cost per task launched (JVM-only jobs of "
                   f"{', '.join(map(str, tl['job_ms']))} tasks on local[2]): "
                   f"{tl['ms_per_task']:.2f} ms")
    out.append(f"- fits used for the cluster: {payload.get('model_used_for_cluster')}")
    rows = payload["cluster"]["rows"]
    if rows:
        table_rows = [[f"{r['P']:.0e}", r["gbit"], r["N"], r.get("sharded_ms"),
                       r.get("mllib_ms"),
                       f"{r['mllib_ms'] / r['sharded_ms']:.2f}x"
                       if r.get("mllib_ms") and r.get("sharded_ms") else ""] for r in rows]
        out += ["", "Extrapolated ms per iteration (model, not measured):", "",
                markdown_table(["P", "Gbit/s", "executors", "rddtensor sharded", "MLlib pattern",
                                "MLlib / rddtensor"], table_rows)]
    return "\n".join(out) + "\n"


def cnn_verdict(payload) -> list:
    eff = payload.get("scaling_efficiency_1_to_2")
    if not eff:
        return []
    e = eff["of_medians"]
    return [f"CNN scaling efficiency local[1] -> local[2] = {e:.1%} (target >= 85%): "
            + ("**met**" if e >= 0.85 else f"**missed** by {(0.85 - e) * 100:.1f} points")]


def _section(name, payload, path, results_dir, quick) -> list:
    out = [f"## {TITLES.get(name, name)}", ""]
    if payload is None:
        return out + [f"No results yet (`{_rel(path, ROOT)}` is missing): run "
                      f"`python -m benchmarks run --only {name}`.", ""]
    out.append(f"Source: `{_rel(path, ROOT)}`; machine: {_machine_line(payload)}.")
    out.append("")
    md = path.with_suffix(".md")
    if md.exists():
        out += [md.read_text().strip(), ""]
    if name == "race_digits":
        out += [race_profile_text(payload)]
    if name == "scaling_model":
        out += [scaling_text(payload)]
    chart = CHARTS.get(name)
    if chart is not None:
        png = results_dir / f"{name}{'_quick' if quick else ''}.png"
        try:
            chart(payload, png)
            out += [f"![{name}]({_rel(png, REPORT.parent if not quick else results_dir)})", ""]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            out += [f"(chart not drawn: {type(e).__name__}: {e})", ""]
    return out


def summary_rows(payloads) -> list:
    """The short table the README copies: one line per headline number."""
    rows = []
    race = payloads.get("race_digits")
    if race:
        res, load = race["results"], race.get("timing", {}).get("load_average_before")
        for n, r in res.items():
            rows.append([f"race to 0.97: {n}", f"{r['wall_s']['median']:.2f} s",
                         f"{r['steps']} steps, acc {r['accuracy']['min']:.3f}; load average "
                         f"{load[0] if load else '?'}"])
    cnn = payloads.get("cnn_throughput")
    if cnn and cnn.get("scaling_efficiency_1_to_2"):
        rows.append(["CNN scaling local[1] -> local[2]",
                     f"{cnn['scaling_efficiency_1_to_2']['of_medians']:.0%}",
                     f"batch {cnn['parameters']['batch']}; load average "
                     f"{(cnn.get('timing', {}).get('load_average_before') or ['?'])[0]}"])
    return rows


def write_report(results_dir, quick: bool = False, path=None) -> Path:
    """Regenerate the report from every ``<name>.json`` in ``results_dir``; return its path."""
    results_dir = Path(results_dir)
    path = Path(path) if path else (results_dir / "RESULTS_quick.md" if quick else REPORT)
    payloads, lines, verdicts = {}, [], []
    for name in ORDER:
        payload, p = _load(results_dir, name, quick)
        payloads[name] = payload
        lines += _section(name, payload, p, results_dir, quick)
    if payloads.get("race_digits"):
        verdicts += race_verdict(payloads["race_digits"])
    if payloads.get("cnn_throughput"):
        verdicts += cnn_verdict(payloads["cnn_throughput"])
    head = ["# Benchmark results" + (" (QUICK smoke run: tiny sizes, not results)" if quick
                                     else ""), "",
            "Generated by `python -m benchmarks run" + (" --quick" if quick else "") + "` "
            "(`benchmarks/harness.py`, `benchmarks/report.py`) from the JSON files in "
            f"`{_rel(results_dir, ROOT)}/`; every number below is read from the file its "
            "section names, which also holds the raw samples, the machine, the versions and "
            "the git commit. Each benchmark runs the peer in the same run.", ""]
    srows = summary_rows(payloads)
    if srows:
        head += ["## Summary", "", markdown_table(["what", "result", "detail"], srows), ""]
    if verdicts:
        head += ["Targets:", ""] + [f"- {v}" for v in verdicts] + [""]
    tail = []
    for name, title in (("measured_choices.md", "Measurements behind choices in the code"),
                        ("closing_note.md", "Closing note")):
        note = results_dir / name
        if note.exists() and not quick:
            tail += [f"## {title}", "", note.read_text().strip(), ""]
    path.write_text("\n".join(head + lines + tail).rstrip() + "\n")
    return path
