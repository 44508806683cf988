"""Turn the per-case JSON results into ``performance.md`` and PNG charts.

Pure reading: nothing here measures anything, so a report can be rebuilt from the JSON files
(``python -m benchmarks --report-only``) after the fact.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from benchmarks.common import (
    CASES, bar_chart, curve_chart, fmt_float, fmt_mb, fmt_ratio, fmt_seconds, markdown_table,
    median, write_atomic,
)
from benchmarks.suite import OURS_FIT, PEER_CHOL, PEER_QR, mse_at, round_ratio

MET, NOT_MET, NOT_MEASURED = "met", "**not met**", "not measured"


def status(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (MET if ok else NOT_MET)


# --------------------------------------------------------------------------- per-step tables


def per_step_table(result: dict) -> str:
    ps = result["per_step"]
    bound = ps.get("bound", {})
    ours = OURS_FIT.label if OURS_FIT.label in ps["contenders"] else None
    rows = []
    for label, entry in ps["contenders"].items():
        runs = entry.get("runs", [])
        rows.append([
            label, fmt_seconds(entry["median"]), len(entry["times"]),
            fmt_ratio(round_ratio(ps, label, "bound")) if bound else "n/a",
            fmt_ratio(round_ratio(ps, label, ours)) if ours and label != ours else "",
            fmt_float(median([r["mse"] for r in runs])), _step_notes(runs, entry.get("errors", [])),
        ])
    if bound:
        rows.append(["**bound** (syrk + Cholesky)", fmt_seconds(bound["total_s"]), bound["repeats"],
                     "1.00x", "", "", _bound_notes(bound)])
        if "torch_total_s" in bound:
            rows.append(["torch kernels, same work", fmt_seconds(bound["torch_total_s"]), bound["repeats"],
                         fmt_ratio(bound["torch_total_s"] / bound["total_s"]), "", "",
                         f"J.T @ J GEMM {fmt_seconds(bound['torch_gemm_s'])} + "
                         f"torch.linalg.cholesky {fmt_seconds(bound['torch_chol_s'])} (first round)"])
    headers = ["contender", "per-step median", "steps timed", "vs bound", "vs ours (fit)",
               "MSE after", "notes"]
    return markdown_table(headers, rows)


def _step_notes(runs: list[dict], errors: list[str] = ()) -> str:
    if not runs and errors:
        return f"failed: {_short(errors[0])}"
    notes = set()
    for r in runs:
        if r.get("form"):
            notes.add(f"{r['form']}, {r['solver']}")
        for s in (r.get("solvers") or {}):
            notes.add(f"solver {s}")
        if r.get("warmup_included"):
            notes.add("stopped by the time cap: warm-up step timed")
        if r.get("attempts"):
            notes.add(f"attempts/step {median(r['attempts']):.0f}")
    return "; ".join(sorted(notes))


def _short(error: str, limit: int = 160) -> str:
    return error if len(error) <= limit else error[:limit] + "..."


def _bound_notes(b: dict) -> str:
    syrk, chol = b.get("syrk_how", "ssyrk"), b.get("chol_how", "spotrf")
    return (f"{b['form']} {b['m']:,}x{b['m']:,}: {syrk} {fmt_seconds(b['syrk_s'])} "
            f"({b['syrk_gflops']:.0f} GFLOP/s) + {chol} {fmt_seconds(b['chol_s'])} "
            f"({b['chol_gflops']:.0f} GFLOP/s); J alone is {fmt_mb(b['jacobian_mb'])}")


def memory_line(result: dict) -> str:
    peak = result.get("peak_rss_mb") or {}
    base = result.get("import_rss_mb") or {}
    parts = [f"{m}: {fmt_mb(v)}" + (f" (after imports {fmt_mb(base[m])})" if base.get(m) else "")
             for m, v in peak.items()]
    return "Peak RSS of each worker process (whole process, `wait4`): " + ", ".join(parts) + ".\n"


def failures(r: dict) -> str:
    """Calls that crashed, timed out or were killed, with the worker's peak RSS at the end."""
    lines = [f"- `{f['module']}.{f['func']}` ({', '.join(f'{k}={v}' for k, v in f['kwargs'].items() if k != 'case')}): "
             f"{f['error']}; worker peak RSS {fmt_mb(f['peak_rss_mb'])}" for f in r.get("failures", [])]
    return "\nFailed calls:\n\n" + "\n".join(lines) + "\n" if lines else ""


def peer_best(ps: dict) -> str | None:
    """Label of the peer's faster setting in this run (its default or Cholesky)."""
    present = [l for l in (PEER_QR.label, PEER_CHOL.label) if l in ps["contenders"]]
    return min(present, key=lambda l: ps["contenders"][l]["median"]) if present else None


# --------------------------------------------------------------------------- case sections


def section_t1(r: dict) -> tuple[str, list]:
    ps, tr = r["per_step"], r["training"]
    target, equal = r["target_mse"], r["equal_time_s"]
    rows = []
    for name, runs in (("ours (fit, defaults + goal)", tr["ours"]),
                       (f"peer (default, {r['peer_steps']} steps max)", tr["peer"]),
                       ("Adam (best lr per seed)", tr["adam"]),
                       ("scipy least_squares(method='lm'), float64", tr.get("scipy_lm", []))):
        runs = [x for x in runs if x]
        if not runs:
            rows.append([name, "not available", "", "", "", "", ""])
            continue
        reached = [x["time_to_target"] for x in runs]
        rows.append([name, f"{sum(math.isfinite(t) for t in reached)}/{len(runs)}",
                     fmt_seconds(median(reached)), fmt_float(median([mse_at(x, equal) for x in runs])),
                     fmt_float(median([x["final_mse"] for x in runs])),
                     f"{median([x['steps'] for x in runs]):.0f}", fmt_seconds(median([x["wall_s"] for x in runs]))])
    text = per_step_table(r) + "\n" + markdown_table(
        ["training run", f"seeds reaching MSE <= {target:g}", "median time to it",
         f"median lowest MSE by {equal:g} s", "median final MSE", "median steps", "median wall"], rows)
    ours_ok = [x for x in tr["ours"] if x]
    best = peer_best(ps)
    speedup = round_ratio(ps, best, OURS_FIT.label) if best else math.nan
    ttt = median([x["time_to_target"] for x in ours_ok]) if ours_ok else math.nan
    peer_runs = [x for x in tr["peer"] if x]
    targets = [
        ["T1", "time per LM step >= 5x lower than the peer's (its faster setting)",
         f"{fmt_ratio(speedup)} ({best})", status(None if math.isnan(speedup) else speedup >= 5)],
        ["T1", f"median time to MSE <= {target:g} at most 1 s",
         fmt_seconds(ttt), status(None if math.isnan(ttt) else ttt <= 1.0)],
        ["T1", f"reference: the peer's default after {r['peer_steps']} steps (or its time budget)",
         f"MSE {fmt_float(median([x['final_mse'] for x in peer_runs]))} after "
         f"{median([x['steps'] for x in peer_runs]):.0f} steps in "
         f"{fmt_seconds(median([x['wall_s'] for x in peer_runs]))}" if peer_runs else "n/a", "reference"],
    ]
    return text, targets


def section_bound_ratio(r: dict, limit: float) -> tuple[str, list]:
    ps = r["per_step"]
    ratio = round_ratio(ps, OURS_FIT.label, "bound") if OURS_FIT.label in ps["contenders"] else math.nan
    best = peer_best(ps)
    peer_ratio = round_ratio(ps, best, "bound") if best else math.nan
    peer_text = f"{best}: {fmt_ratio(peer_ratio)}" if best else "peer not run"
    targets = [[r["case"], f"per-step time at most {limit}x the bound", f"{fmt_ratio(ratio)} ({peer_text})",
                status(None if math.isnan(ratio) else ratio <= limit)]]
    return per_step_table(r) + "\n" + memory_line(r), targets


def section_t2(r: dict) -> tuple[str, list]:
    return section_bound_ratio(r, 1.15)


def section_t3(r: dict) -> tuple[str, list]:
    text, targets = section_bound_ratio(r, 1.25)
    if PEER_CHOL.label in r["per_step"]["contenders"]:
        text += ("\nThe peer's one timed step is its first (no warm-up, to keep its minute-long steps to "
                 "one): it includes its one-time sizing forward pass and first `vmap(jacrev)` call, so its "
                 "ratios are a reference, not a steady-state step.\n")
    rss = (r.get("peak_rss_mb") or {}).get("ours") if OURS_FIT.label in r["per_step"]["contenders"] else None
    targets.insert(0, ["T3", "peak RSS of the whole process at most 1 GB", fmt_mb(rss),
                       status(None if rss is None else rss <= 1000)])
    return text, targets


def section_t4(r: dict) -> tuple[str, list]:
    ours, adam, budget = r.get("ours"), r.get("adam"), r["budget_s"]
    peak = r.get("peak_rss_mb") or {}
    rows = []
    if ours:
        rows.append(["ours (fit, defaults + time_limit)", fmt_float(mse_at(ours, budget)),
                     fmt_float(ours["final_mse"]), ours["steps"],
                     fmt_seconds(ours["wall_s"]), fmt_mb(peak.get("ours")),
                     "; ".join(f"solver {s}" for s in ours.get("solvers", {})) + f"; stop: {ours.get('stop_reason')}"])
    else:
        why = next((f"failed: {_short(f['error'])}" for f in r.get("failures", []) if f["module"] == "ours"),
                   "not available")
        rows.append(["ours (fit)", why, "", "", "", fmt_mb(next(
            (f["peak_rss_mb"] for f in r.get("failures", []) if f["module"] == "ours"), None)), ""])
    if adam:
        rows.append([f"Adam (best lr = {adam['lr']:g})", fmt_float(mse_at(adam, budget)),
                     fmt_float(adam["final_mse"]), adam["steps"],
                     fmt_seconds(adam["wall_s"]), fmt_mb(peak.get("adam")),
                     ("lowest MSE by lr: " if "best_mse" in adam else "final MSE by lr: ")
                     + ", ".join(f"{k}: {fmt_float(v)}" for k, v in adam["all_lr"].items())])
    text = markdown_table(["contender", f"lowest training MSE by {budget:g} s", "final MSE", "steps",
                           "wall", "peak RSS", "notes"], rows)
    text += ("\nfit checks `time_limit` after each epoch, so its last epoch may end past the budget; "
             f"the comparison uses the lowest MSE each curve reached by {budget:g} s (Adam's curve "
             "oscillates: its last point before the budget can sit far above what it reached).\n")
    text += ("\nThe peer is not run on T4: its dense Jacobian alone would take "
             f"{fmt_mb(r['n_samples'] * r['n_params'] * 4 / 1e6)}; dense J^T J would take "
             f"{fmt_mb(r['n_params'] ** 2 * 4 / 1e6)}.\n")
    rss = peak.get("ours") if ours else None
    ours_at, adam_at = (mse_at(ours, budget) if ours else math.nan), (mse_at(adam, budget) if adam else math.nan)
    better = None if math.isnan(ours_at) or math.isnan(adam_at) else ours_at < adam_at
    targets = [
        ["T4", "peak RSS at most 4 GB", fmt_mb(rss), status(None if rss is None else rss <= 4000)],
        ["T4", f"lower training loss than the best Adam in the same {budget:g} s",
         f"{fmt_float(ours_at)} vs {fmt_float(adam_at)}",
         status(better)],
    ]
    return text, targets


def section_t5(r: dict) -> tuple[str, list]:
    ps = r["per_step"]
    rows = []
    for peer in (PEER_QR.label, PEER_CHOL.label):
        ratio = round_ratio(ps, peer, OURS_FIT.label) if peer in ps["contenders"] else math.nan
        rows.append(["T5", f"per-step time vs {peer} (ratio > 1: ours faster)", fmt_ratio(ratio),
                     status(None if math.isnan(ratio) else ratio > 1)])
    return per_step_table(r) + "\n" + memory_line(r), rows


SECTIONS = {"T1": section_t1, "T2": section_t2, "T3": section_t3, "T4": section_t4, "T5": section_t5}


def _load(r: dict) -> str:
    load = r.get("load_avg")
    return f"{load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else "not recorded"


# --------------------------------------------------------------------------- charts


def charts(r: dict, out: Path) -> list[str]:
    made = []
    if "per_step" in r and r["per_step"]["contenders"]:
        ps = r["per_step"]
        labels = list(ps["contenders"])
        path = out / f"{r['case']}_per_step.png"
        bar_chart(path, f"{r['case']} ({r['architecture']}, N={r['n_samples']:,}): time per LM step",
                  labels, [ps["contenders"][l]["median"] for l in labels], "seconds per step (median)",
                  reference=ps["bound"].get("total_s"), reference_label="machine bound")
        made.append(path.name)
    curves = {}
    if r["case"] == "T1":
        tr = r["training"]
        for name, runs in (("ours", tr["ours"]), ("peer (default)", tr["peer"]), ("Adam (best lr)", tr["adam"]),
                           ("scipy lm (float64)", tr.get("scipy_lm", []))):
            if runs and runs[0]:
                curves[name] = (runs[0]["t"], runs[0]["mse"])
    if r["case"] == "T4":
        for name in ("ours", "adam"):
            if r.get(name):
                curves[name if name == "ours" else f"Adam (lr {r['adam']['lr']:g})"] = (r[name]["t"], r[name]["mse"])
    if curves:
        path = out / f"{r['case']}_convergence.png"
        curve_chart(path, f"{r['case']}: training MSE vs wall time (seed 0)", curves,
                    hline=r.get("target_mse"), logx=r["case"] == "T1")
        made.append(path.name)
    return made


# --------------------------------------------------------------------------- the page


def machine_description() -> str:
    import numpy
    import scipy
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    try:
        from benchmarks.peer import version
        peer = version()
    except Exception:
        peer = "not installed"
    return (f"{cpu}, {torch.get_num_threads()} torch threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
            f"torch-levenberg-marquardt {peer}")


def load_results(out: Path) -> dict[str, dict]:
    return {name: json.loads((out / f"{name}.json").read_text())
            for name in CASES if (out / f"{name}.json").exists()}


def build(out: Path) -> Path:
    """(Re)write ``out/performance.md`` and the charts from every ``out/T*.json`` present."""
    results = load_results(out)
    targets, body = [], []
    for name, r in results.items():
        text, rows = SECTIONS[name](r)
        targets += rows
        text += failures(r)
        pics = "".join(f"\n![{p}]({p})\n" for p in charts(r, out))
        c = CASES[name]
        body.append(f"## {name} {c.title}: {c.architecture} tanh MLP ({c.n_params:,} parameters), "
                    f"{c.n_samples:,} samples\n\n_{r['mode']} run, {r['date']}, {r['seconds']:.0f} s, "
                    f"1-minute load average {_load(r)} on {os.cpu_count()} cores._\n\n"
                    f"{text}{pics}")
    page = (
        "# Performance: ours vs torch-levenberg-marquardt vs the machine bound\n\n"
        "Generated by `python -m benchmarks` (see `benchmarks/README.md` for the columns). "
        "float32, CPU. Machine: " + machine_description() + ".\n\n"
        "The machine is shared and noisy: absolute times move by 2-3x between runs. "
        "Read the ratios, which are taken within one round of one run.\n\n"
        "## Targets\n\n" + markdown_table(["case", "target", "measured", "status"], targets)
        + "\n" + "\n".join(body)
    )
    path = out / "performance.md"
    write_atomic(path, page)
    return path
