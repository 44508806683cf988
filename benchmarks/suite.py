"""The five cases: what each runs, in which order, and which numbers it keeps.

Every contender runs in its own worker process (``benchmarks.worker``), created afresh for each
case, so the peak RSS a worker reports when it exits belongs to that case alone. Per-step
timings are taken in *rounds*: each round every contender runs once, in a rotated order, and
ratios are computed within a round and then their median taken. On a shared machine whose load
changes by the minute, that is what "side by side" has to mean.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import CASES, median
from benchmarks.worker import Worker, WorkerError

T1_TARGET_MSE = 1e-7


@dataclass(frozen=True)
class Contender:
    """One column of a per-step comparison: an adapter module, its options, a display label."""

    label: str
    module: str
    options: dict = field(default_factory=dict)
    steps: int | None = None  # overrides the case's steps / warmup (a slow peer runs fewer)
    warmup: int | None = None

    @property
    def can_stop_early(self) -> bool:
        return self.module == "ours"  # ours' step_times takes max_seconds; the peer's cannot

    @property
    def worker(self) -> str:
        """Worker name: ours' optimizer gets its own process, so fit's peak RSS stays fit's."""
        return "ours-optimizer" if self.options.get("api") == "optimizer" else self.module


OURS_FIT = Contender("ours (fit)", "ours", {"api": "fit"})
OURS_OPT = Contender("ours (optimizer)", "ours", {"api": "optimizer"})
PEER_QR = Contender("peer (default: qr)", "peer", {"solve_method": "qr"})
PEER_CHOL = Contender("peer (cholesky)", "peer", {"solve_method": "cholesky"})


@dataclass(frozen=True)
class Plan:
    """How much work each case does; ``quick`` shrinks every knob."""

    quick: bool
    t1_seeds: tuple[int, ...]
    t1_rounds: int
    t1_steps: int
    t1_peer_steps: int  # the issue quotes the peer's MSE after 1000 steps
    t1_peer_budget_s: float  # ... which take about 4 s on an idle machine, minutes on a loaded one
    t1_equal_time_s: float  # "MSE after equal wall time" for ours, the peer and Adam
    t1_ours_budget_s: float
    t2_rounds: int
    t2_steps: int
    t3_steps: int
    t3_with_peer: bool
    t4_budget_s: float
    t5_rounds: int
    t5_steps: int
    cap_s: float  # seconds one per-step run of ours may take on T2/T5 (twice that on T3)

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(quick=True, t1_seeds=(0, 1), t1_rounds=1, t1_steps=30, t1_peer_steps=300,
                       t1_peer_budget_s=15.0, t1_equal_time_s=1.0, t1_ours_budget_s=5.0, t2_rounds=1, t2_steps=1,
                       t3_steps=1, t3_with_peer=False, t4_budget_s=10.0, t5_rounds=1,
                       t5_steps=1, cap_s=45.0)
        return cls(quick=False, t1_seeds=(0, 1, 2, 3, 4), t1_rounds=3, t1_steps=50,
                   t1_peer_steps=1000, t1_peer_budget_s=60.0, t1_equal_time_s=2.0,
                   t1_ours_budget_s=10.0, t2_rounds=4,
                   t2_steps=4, t3_steps=2, t3_with_peer=True, t4_budget_s=60.0, t5_rounds=2,
                   t5_steps=2, cap_s=90.0)


class Session:
    """The workers of one case, started on first use and closed (RSS read) at the end."""

    def __init__(self, case: str, log_dir: Path) -> None:
        self.case = case
        self.log_dir = log_dir
        self.workers: dict[str, Worker] = {}
        self.import_rss_mb: dict[str, float] = {}
        self.unavailable: dict[str, str] = {}
        self.failures: list[dict] = []

    def available(self, contender: Contender) -> bool:
        """Ask the worker; print "not available" once per label and skip it from then on."""
        key = f"{contender.module}:{contender.options.get('api', '')}"
        if key not in self.unavailable:
            kwargs = {"api": contender.options["api"]} if "api" in contender.options else {}
            worker = self.worker(contender.worker)
            try:
                reason = worker.call("available", timeout=300, **kwargs)
                self.import_rss_mb.setdefault(contender.worker, worker.last_rss_mb)
            except WorkerError as exc:
                reason = str(exc).splitlines()[0]
            self.unavailable[key] = reason or ""
            if reason:
                log(f"  {contender.label}: not available ({reason})")
        return not self.unavailable[key]

    def worker(self, name: str) -> Worker:
        """The worker called ``name`` ("ours", "ours-optimizer", "peer", ...), started if needed."""
        if name not in self.workers:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            module = name.split("-")[0]
            self.workers[name] = Worker(module, self.log_dir / f"{self.case}-{name}.log")
        return self.workers[name]

    def call(self, name: str, func: str, timeout: float = 600.0, **kwargs: Any) -> Any:
        try:
            return self.worker(name).call(func, timeout=timeout, **kwargs)
        except WorkerError as exc:
            message = str(exc).splitlines()[-1]
            log(f"  {name}.{func} failed: {message}")
            # Always a fresh worker next time: one that ran out of address space stays unusable.
            peak = self.workers.pop(name).close()
            self.failures.append({"module": name, "func": func, "kwargs": kwargs,
                                  "error": message, "peak_rss_mb": peak})
            return None

    def close(self) -> dict[str, float | None]:
        return {module: w.close() for module, w in self.workers.items()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- building blocks


def per_step(session: Session, contenders: list[Contender], *, rounds: int, steps: int,
             warmup: int, bound_repeats: int, cap_s: float, timeout: float = 600.0,
             torch_reference: bool = False) -> dict:
    """Per-step medians of each contender and of the bound, in interleaved rounds.

    A run of ours stops after ``cap_s`` seconds (fewer steps are then timed), so a slow build
    cannot stall the suite; any call past ``timeout`` is killed and recorded as a failure.
    """
    active = [c for c in contenders if session.available(c)]
    by_label: dict[str, dict] = {c.label: {"rounds": [], "times": [], "runs": []} for c in active}
    bounds: dict[int, dict] = {}  # round index -> the bound's result in that round
    for r in range(rounds):
        order = active[r % len(active):] + active[:r % len(active)] if active else []
        for c in order:
            log(f"  round {r + 1}/{rounds}: {c.label}")
            cap = {"max_seconds": cap_s} if c.can_stop_early else {}
            res = session.call(c.worker, "step_times", timeout, case=session.case, seed=r,
                               steps=c.steps or steps,
                               warmup=warmup if c.warmup is None else c.warmup, **c.options, **cap)
            if res and res["times"]:
                # Each round's number carries its round index: a contender that missed a round
                # (failed, timed out) must not be paired with another's next round.
                entry = by_label[c.label]
                entry["rounds"].append({"round": r, "seconds": statistics.median(res["times"])})
                entry["times"] += res["times"]
                entry["runs"].append({"round": r, **{k: v for k, v in res.items() if k != "times"}})
            elif res is None and session.failures:
                by_label[c.label].setdefault("errors", []).append(session.failures[-1]["error"])
        log(f"  round {r + 1}/{rounds}: bound")
        b = session.call("bound", "bound", timeout, case=session.case, repeats=bound_repeats,
                         torch_reference=torch_reference and r == 0)
        if b:
            bounds[r] = b
    return {"contenders": {k: _summary(v) for k, v in by_label.items()},
            "bound": _bound_summary(bounds), "rounds": rounds}


def _summary(entry: dict) -> dict:
    return {**entry, "median": median(entry["times"])}


def _bound_summary(bounds: dict[int, dict]) -> dict:
    """The bound's times, medians over the rounds it completed (``bounds``: round index -> result)."""
    if not bounds:
        return {}
    out = dict(next(iter(bounds.values())))  # the earliest round's: round 0's holds the torch reference
    for key in ("syrk_s", "chol_s", "total_s", "syrk_gflops", "chol_gflops"):
        out[key] = median([b[key] for b in bounds.values()])
    out["rounds"] = [{"round": r, "seconds": b["total_s"]} for r, b in bounds.items()]
    return out


def round_times(rounds: list) -> dict[int, float]:
    """A ``"rounds"`` list as {round index: seconds}.

    Entries are ``{"round": r, "seconds": t}``. Results written before rounds carried their index
    hold bare times, one per round from round 0 (every contender of those runs completed every
    round), so a bare time's index is its position.
    """
    entries = [e if isinstance(e, dict) else {"round": i, "seconds": e} for i, e in enumerate(rounds)]
    return {e["round"]: e["seconds"] for e in entries}


def round_ratio(result: dict, num: str, den: str) -> float:
    """Median over rounds of (num's median / den's median) in the same round.

    ``den`` may be ``"bound"``. Only rounds both sides completed are paired, by round index;
    ``nan`` when there are none (either side missing).
    """
    def times_of(label: str) -> dict[int, float]:
        if label == "bound":
            return round_times(result["bound"].get("rounds", []))
        return round_times(result["contenders"].get(label, {}).get("rounds", []))

    a, b = times_of(num), times_of(den)
    return median([a[r] / b[r] for r in sorted(a.keys() & b.keys())])


def mse_at(run: dict | None, seconds: float) -> float:
    """The lowest MSE a training curve reached by wall time ``seconds``.

    The lowest, not the last point: an oscillating first-order run (Adam at lr 1e-2 on T4) would
    otherwise be judged by wherever its last recorded point happens to fall (0.0142 at 59.6 s on
    a curve that had reached 1.7e-3). LM's curves only go down, so for them it is the last point.
    A run that kept the lowest value of its unthinned curve (``best_mse`` with ``best_t``, see
    :func:`_best_adam`) is read from there when that time is within ``seconds``.
    """
    if not run:
        return math.nan
    reached = [m for t, m in zip(run["t"], run["mse"]) if t <= seconds and not math.isnan(m)]
    if run.get("best_t") is not None and run["best_t"] <= seconds:
        reached.append(run["best_mse"])
    return min(reached) if reached else math.nan


def thin(run: dict | None, points: int = 150) -> dict | None:
    """A run with its curve thinned (results stay small; the last point is kept)."""
    if not run:
        return run
    stride = max(1, len(run["t"]) // points)
    return {**run, "t": run["t"][::stride] + run["t"][-1:], "mse": run["mse"][::stride] + run["mse"][-1:]}


# --------------------------------------------------------------------------- cases


def case_t1(session: Session, plan: Plan) -> dict:
    contenders = [OURS_FIT, PEER_QR, PEER_CHOL] if plan.quick else [OURS_FIT, OURS_OPT, PEER_QR, PEER_CHOL]
    steps = per_step(session, contenders, rounds=plan.t1_rounds,
                     steps=plan.t1_steps, warmup=5, bound_repeats=20, cap_s=15, timeout=300)
    runs: dict[str, list] = {"ours": [], "peer": [], "adam": [], "scipy_lm": []}
    for seed in plan.t1_seeds:  # seed-major: the three contenders side by side per seed
        log(f"  seed {seed}: training runs")
        if session.available(OURS_FIT):
            runs["ours"].append(thin(session.call(
                "ours", "train", 300, case="T1", seed=seed, max_steps=10_000,
                budget_s=plan.t1_ours_budget_s, target=T1_TARGET_MSE)))
        if session.available(PEER_QR):
            runs["peer"].append(thin(session.call(
                "peer", "train", 600, case="T1", seed=seed, max_steps=plan.t1_peer_steps,
                budget_s=plan.t1_peer_budget_s, target=T1_TARGET_MSE)))
        runs["adam"].append(_best_adam(session, "T1", seed, plan.t1_equal_time_s, T1_TARGET_MSE))
        runs["scipy_lm"].append(thin(session.call("scipy_lm", "train", 300, case="T1", seed=seed,
                                                  target=T1_TARGET_MSE,
                                                  budget_s=plan.t1_ours_budget_s)))
    return {"per_step": steps, "training": runs, "equal_time_s": plan.t1_equal_time_s,
            "target_mse": T1_TARGET_MSE, "peer_steps": plan.t1_peer_steps, "seeds": list(plan.t1_seeds)}


def _best_adam(session: Session, case: str, seed: int, budget_s: float,
               target: float | None = None) -> dict | None:
    from benchmarks.adam import LEARNING_RATES

    runs = [session.call("adam", "train", budget_s + 600, case=case, seed=seed, lr=lr,
                         budget_s=budget_s, target=target) for lr in LEARNING_RATES]
    runs = [_with_lowest(r, budget_s) for r in runs if r]
    if not runs:
        return None
    # Chosen by the measure the targets compare: the lowest MSE reached within the budget.
    best = min(runs, key=lambda r: (math.isnan(r["best_mse"]), r["best_mse"]))
    return {**thin(best), "all_lr": {str(r["lr"]): r["best_mse"] for r in runs}}


def _with_lowest(run: dict, budget_s: float) -> dict:
    """``run`` with ``best_mse`` and ``best_t``: the lowest MSE of its whole curve within
    ``budget_s`` and when it was reached, kept before :func:`thin` drops points."""
    points = [(m, t) for t, m in zip(run["t"], run["mse"]) if t <= budget_s and not math.isnan(m)]
    best_mse, best_t = min(points) if points else (math.nan, None)
    return {**run, "best_mse": best_mse, "best_t": best_t}


def _step_contenders(plan: Plan) -> list[Contender]:
    """All four in the full suite; the quick run keeps ours' fit and the peer's best setting."""
    return [OURS_FIT, PEER_CHOL] if plan.quick else [OURS_FIT, OURS_OPT, PEER_QR, PEER_CHOL]


def case_t2(session: Session, plan: Plan) -> dict:
    # Two warm-up steps, untimed for every contender alike: from MATLAB's mu = 1e-3 the first steps
    # may take more trials (factorizations) than the steady state of about two a step.
    return {"per_step": per_step(session, _step_contenders(plan),
                                 rounds=plan.t2_rounds, steps=plan.t2_steps, warmup=2,
                                 bound_repeats=3, cap_s=plan.cap_s, torch_reference=True)}


def case_t3(session: Session, plan: Plan) -> dict:
    # Only fit: it is the path with a memory budget. The peer runs its best setting once (its
    # step takes about a minute here and holds the whole Jacobian), and only in the full suite.
    peer = replace(PEER_CHOL, steps=1, warmup=0)
    contenders = [OURS_FIT] + ([peer] if plan.t3_with_peer else [])
    return {"per_step": per_step(session, contenders, rounds=1, steps=plan.t3_steps, warmup=1,
                                 bound_repeats=1 if plan.quick else 2, cap_s=2 * plan.cap_s,
                                 timeout=900)}


def case_t4(session: Session, plan: Plan) -> dict:
    budget = plan.t4_budget_s
    ours = None
    if session.available(OURS_FIT):
        log(f"  ours: fit for {budget:.0f} s")
        ours = thin(session.call("ours", "train", budget + 600, case="T4", seed=0,
                                 max_steps=10**7, budget_s=budget))
    log(f"  adam: 3 learning rates x {budget:.0f} s")
    adam = _best_adam(session, "T4", 0, budget)
    return {"budget_s": budget, "ours": ours, "adam": adam}


def case_t5(session: Session, plan: Plan) -> dict:
    return {"per_step": per_step(session, _step_contenders(plan),
                                 rounds=plan.t5_rounds, steps=plan.t5_steps, warmup=1,
                                 bound_repeats=2, cap_s=plan.cap_s)}


CASE_RUNNERS = {"T1": case_t1, "T2": case_t2, "T3": case_t3, "T4": case_t4, "T5": case_t5}


def run_case(name: str, plan: Plan, log_dir: Path) -> dict:
    """Run one case in fresh workers; return its JSON-ready result with each worker's peak RSS."""
    case = CASES[name]
    session = Session(name, log_dir)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        result = CASE_RUNNERS[name](session, plan)
    finally:
        peak = session.close()
    return {
        "case": name, "title": case.title, "architecture": case.architecture,
        "n_samples": case.n_samples, "n_params": case.n_params, "mode": "quick" if plan.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - start,
        "load_avg": [load_before, os.getloadavg()[0]],  # 1-minute load: other users of the cores
        "peak_rss_mb": peak, "import_rss_mb": session.import_rss_mb, "unavailable": {k: v for k, v in session.unavailable.items() if v},
        "failures": session.failures,
        **result,
    }
