"""Data-parallel LM on 1 and 2 gloo ranks: time per step, its parts, and bytes sent per step.

    python -m benchmarks.distributed            # about 5-10 min on 2 shared cores
    python -m benchmarks.distributed --quick    # smoke run, results/quick/distributed.md
    python -m benchmarks.distributed --report-only   # rebuild the table from distributed.json

Each case trains the same float32 MLP from the same weights for a few LM steps (MATLAB trainlm
damping), once in one process on all samples and once on 2 ranks holding half the samples each
(:class:`marquardt.distributed.ReducedProblem`). Every rank runs one intra-op thread, so K ranks
use K cores. A timing reducer wrapped around the real one splits each step into

* local work: the shard's Jacobian folded into ``J^T J`` (``N P^2 / K``) and the trial costs;
* communication: the time inside ``all_reduce`` (failure flags included), and its bytes;
* the rest: the damped solve (Cholesky of ``P x P``), the same on every rank.

An ``all_reduce`` sweep over message sizes on the same 2 ranks gives the latency and bandwidth
of the transport (gloo over loopback TCP here), which docs/scaling.md plugs into its model.
Results: benchmarks/results/distributed.md (the 1-minute load average is recorded: the cores
are shared, so compare the columns of one run, not absolute times across runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, Case, make_data, make_model

CASES = (
    Case("D1", "many samples", (1, 32, 32, 1), 20_000, "sinc"),
    Case("D2", "more parameters", (1, 48, 48, 1), 6_000, "sinc"),
    Case("D3", "m < n, rows gathered", (1, 64, 64, 1), 2_000, "sinc"),
    Case("D4", "matrix-free", (1, 64, 64, 1), 6_000, "sinc"),
)
SOLVERS = {"D4": "matrix-free"}  # fit's solver= option; the others choose their form automatically
QUICK_CASES = (Case("D1q", "smoke", (1, 16, 16, 1), 4_000, "sinc"),)
SWEEP_BYTES = tuple(4 * 4**k for k in range(2, 12))  # 64 B .. 16 MiB of float32
SWEEP_REPEATS = 7


class TimedReducer:
    """A :class:`marquardt.distributed.Reducer` that records the seconds spent in each collective."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    @property
    def bytes(self) -> int:
        return self.inner.bytes

    @property
    def calls(self) -> int:
        return self.inner.calls

    def _timed(self, name: str, *args: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu

    def sum(self, tensor):
        return self._timed("sum", tensor)

    def sum_scalar(self, value):
        return self._timed("sum_scalar", value)

    def maximum(self, tensor):
        return self._timed("maximum", tensor)

    def broadcast(self, tensor):
        return self._timed("broadcast", tensor)

    def signal_failure(self, error):
        self.inner.signal_failure(error)

    def check(self):
        self._timed("check")


@dataclass
class StepTimes:
    step: float
    local: float
    communication: float
    step_cpu: float
    local_cpu: float
    trials: int
    bytes: int
    calls: int
    cg: int


def _lm_steps(case: Case, reducer: Any, steps: int) -> tuple[list[StepTimes], torch.Tensor]:
    from marquardt.damping import MarquardtDamping
    from marquardt.distributed import ReducedProblem, shard_bounds
    from marquardt.network import ModuleProblem, flatten_parameters
    from marquardt.solver import lm_step

    X, y = make_data(case)
    start, stop = shard_bounds(X.shape[0], reducer.rank, reducer.world_size)
    model = make_model(case, seed=0)
    local = ModuleProblem(model, X[start:stop], y[start:stop], solver=SOLVERS.get(case.name, "auto"))
    problem = ReducedProblem(local, reducer) if reducer.world_size > 1 else local
    x = flatten_parameters(model)
    rule = MarquardtDamping()
    state = rule.init(1.0)
    scale = torch.ones_like(x)
    records = []
    for _ in range(steps + 1):  # the first step warms up (allocations, thread pools)
        comm0, cpu_comm0, bytes0, calls0 = reducer.seconds, reducer.cpu_seconds, reducer.bytes, reducer.calls
        t0, c0 = time.perf_counter(), time.process_time()
        lin = problem.linearize(x)
        t1, c1 = time.perf_counter(), time.process_time()
        comm1, cpu_comm1 = reducer.seconds, reducer.cpu_seconds
        out = lm_step(problem, x, lin, scale, rule, state)
        t2, c2 = time.perf_counter(), time.process_time()
        x, state = out.x, out.state
        records.append(StepTimes(
            step=t2 - t0, local=(t1 - t0) - (comm1 - comm0), communication=reducer.seconds - comm0,
            step_cpu=(c2 - c0) - (reducer.cpu_seconds - cpu_comm0), local_cpu=(c1 - c0) - (cpu_comm1 - cpu_comm0),
            trials=out.n_trials, bytes=reducer.bytes - bytes0, calls=reducer.calls - calls0,
            cg=getattr(lin.system, "iterations", 0)))
    return records[1:], x


def _kernel_times(case: Case, repeats: int = 3) -> dict[str, float]:
    """One rank's kernels for the scaling model: a Cholesky of ``P x P`` and one ``J v`` + ``J^T u``.

    The products are what a matrix-free CG iteration costs locally: a forward-mode and a
    reverse-mode pass of the network over all ``N`` samples (:mod:`torch.func`, no ``J`` formed).
    """
    from torch.func import functional_call, jvp, vjp

    X, _ = make_data(case)
    model = make_model(case, seed=0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def outputs(p: dict) -> torch.Tensor:
        return functional_call(model, p, (X,))

    def products() -> None:
        _, jv = jvp(outputs, (params,), (tangent,))
        _, pull = vjp(outputs, params)
        pull(jv)

    a = torch.randn(case.n_params, case.n_params, dtype=torch.float32)
    spd = a @ a.T / case.n_params + torch.eye(case.n_params)
    times = {"cholesky": [], "products": []}
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.linalg.cholesky(spd)
        mid = time.perf_counter()
        products()
        times["cholesky"].append(mid - start)
        times["products"].append(time.perf_counter() - mid)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def _sweep(reducer: Any) -> list[tuple[int, float]]:
    rows = []
    for size in SWEEP_BYTES:
        tensor = torch.ones(size // 4, dtype=torch.float32)
        reducer.sum(tensor)  # warm-up
        times = []
        for _ in range(SWEEP_REPEATS):
            start = time.perf_counter()
            reducer.inner._dist.all_reduce(tensor)  # the bare collective, without the failure flags
            times.append(time.perf_counter() - start)
        rows.append((size, min(times), statistics.median(times)))
    return rows


def _rank_body(rank: int, world: int, port: int, cases: tuple[Case, ...], steps: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from marquardt.distributed import initialize

    try:
        reducer = TimedReducer(initialize(backend="gloo", timeout=600.0))
        result: dict[str, Any] = {}
        for case in cases:
            records, x = _lm_steps(case, reducer, steps)
            result[case.name] = {"records": [r.__dict__ for r in records], "x": x.tolist()}
            if world == 1:
                result[case.name]["kernels"] = _kernel_times(case)
        if world > 1:
            result["sweep"] = _sweep(reducer)
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world: int, cases: tuple[Case, ...], steps: int) -> dict[int, dict[str, Any]]:
    """Start ``world`` gloo ranks on this machine; each returns its step records."""
    import torch.multiprocessing as mp

    # One BLAS thread per rank (scipy's BLAS, used for J^T J, ignores torch.set_num_threads).
    os.environ.update({name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_body, args=(r, world, port, cases, steps, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=3600) for _ in range(world))
    for proc in procs:
        proc.join()
    return results


# --------------------------------------------------------------------------- report


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def _fit_transport(sweep: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Least-squares ``t = latency + bytes / bandwidth`` over the fastest repeat of each size."""
    sizes = torch.tensor([s for s, _, _ in sweep], dtype=torch.float64)
    times = torch.tensor([t for _, t, _ in sweep], dtype=torch.float64)
    design = torch.stack([torch.ones_like(sizes), sizes], dim=1)
    weights = 1.0 / times  # relative errors: small messages count as much as big ones
    coef = torch.linalg.lstsq(design * weights[:, None], (times * weights)[:, None]).solution[:, 0]
    latency, per_byte = float(coef[0]), float(coef[1])
    return max(latency, 0.0), 1.0 / per_byte


def report(one: dict, two: dict, cases: tuple[Case, ...], steps: int, load: tuple[float, float]) -> str:
    lines = [
        "# Data-parallel LM: 1 vs 2 ranks (gloo, CPU)",
        "",
        f"Written by `python -m benchmarks.distributed` on {datetime.date.today()}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other users "
        f"(1-minute load average {load[0]:.1f} before, {load[1]:.1f} after), torch {torch.__version__}, "
        "float32, one intra-op thread per rank, gloo over loopback TCP.",
        "",
        f"Each case: {steps} LM steps (MATLAB trainlm damping) from the same weights, after one warm-up "
        "step; medians over the steps, rank 0's numbers. *local* is the linearization without its "
        "reduction (Jacobian chunks folded into `J^T J`), *comm* the wall time inside collectives "
        "(waiting for the slower rank included); *CPU* columns are the process CPU time of the step "
        "and of the local linearization, communication excluded: on cores shared with other users "
        "they measure the work a rank does, which wall time does not. *speed-up, CPU* is the 1-rank "
        "step CPU over the K-rank one: what K dedicated cores would give before communication. "
        "*bytes/step* what each rank sends per step (upper triangle of `J^T J`, `J^T r`, "
        "costs, failure flags; for D3, with fewer residuals than parameters, the rows `[J_k | r_k]` "
        "gathered for the residual-space solve instead; for D4, matrix-free, `J^T r` and one "
        "`P`-vector per CG iteration). *CG iterations*: of the last solve of a step.",
        "",
        "| case | network (P) | N | ranks | step [s] | local [s] | comm [s] | step CPU [s] | local CPU [s] | "
        "bytes/step | collectives/step | CG iterations | speed-up, wall | speed-up, CPU | weights vs 1 rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        base = one[0][case.name]
        x1 = torch.tensor(base["x"])
        t1, cpu1 = _median(base["records"], "step"), _median(base["records"], "step_cpu")
        for world, results in ((1, one), (2, two)):
            recs = results[0][case.name]["records"]
            step, local, comm, cpu, local_cpu = (_median(recs, k) for k in (
                "step", "local", "communication", "step_cpu", "local_cpu"))
            xk = torch.tensor(results[0][case.name]["x"])
            diff = float(torch.linalg.vector_norm(xk - x1) / torch.linalg.vector_norm(x1))
            lines.append(
                f"| {case.name} {case.title} | {case.architecture} ({case.n_params:,}) | {case.n_samples:,} | "
                f"{world} | {step:.3f} | {local:.3f} | {comm:.3f} | {cpu:.3f} | {local_cpu:.3f} | "
                f"{int(_median(recs, 'bytes')):,} | {int(_median(recs, 'calls'))} | "
                f"{int(_median(recs, 'cg')) if case.name in SOLVERS else '-'} | {t1 / step:.2f} | "
                f"{cpu1 / cpu:.2f} | {'-' if world == 1 else f'{diff:.1e}'} |")
    lines += [
        "",
        "## Kernels of one rank (for the model in docs/scaling.md)",
        "",
        "*g* is the local linearization time of the 1-rank run per unit of `N P^2` (the Jacobian "
        "included); *m* the time of one `J v` plus one `J^T u` (torch.func jvp + vjp over all N "
        "samples, what a matrix-free CG iteration computes) per unit of `N P`; *Cholesky* of a "
        "`P x P` float32 matrix, which every rank repeats.",
        "",
        "| case | P | N | local, 1 rank [s] | g [ns] | J v + J^T u [s] | m [ns] | Cholesky [s] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        base = one[0][case.name]
        local = _median(base["records"], "local")
        kernels = base["kernels"]
        n, p = case.n_samples, case.n_params
        g = f"{1e9 * local / (n * p * p):.3f}" if n >= p and case.name not in SOLVERS else "- (no J^T J)"
        lines.append(f"| {case.name} | {p:,} | {n:,} | {local:.3f} | {g} | "
                     f"{kernels['products']:.3f} | {1e9 * kernels['products'] / (n * p):.2f} | "
                     f"{kernels['cholesky']:.4f} |")
    latency, bandwidth = _fit_transport(two[0]["sweep"])
    lines += [
        "",
        "## all_reduce on 2 ranks (bare collective, float32 sum)",
        "",
        "| bytes | fastest [ms] | median [ms] | fastest [MB/s] |",
        "|---:|---:|---:|---:|",
    ]
    for size, fastest, median in two[0]["sweep"]:
        lines.append(f"| {size:,} | {1e3 * fastest:.3f} | {1e3 * median:.3f} | {size / fastest / 1e6:.1f} |")
    lines += [
        "",
        f"Fit `t = latency + bytes / bandwidth`: latency **{1e6 * latency:.0f} us**, bandwidth "
        f"**{bandwidth / 1e6:.0f} MB/s**, on the fastest of {SWEEP_REPEATS} repeats (the others wait for a "
        "rank the shared cores descheduled), weighted by 1/t so small messages count.",
        "",
        "Per LM step each rank makes one reduction for the linearization and one per trial step "
        "(the cost, 8 bytes: scalars go as float64), each preceded by a flag reduction of 8 bytes per rank "
        "(`marquardt.distributed.fail_together`); so `2 (1 + trials)` collectives.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny case, 2 steps, results/quick/")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md from the saved .json")
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    steps = args.steps or (2 if args.quick else 4)
    out = (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR) / "distributed.md"
    raw = out.with_suffix(".json")
    if args.report_only:
        saved = json.loads(raw.read_text(encoding="utf-8"))
        one, two = ({int(k): v for k, v in saved[key].items()} for key in ("one", "two"))
        load = tuple(saved["load"])
    else:
        load_before = os.getloadavg()[0]
        one = run_ranks(1, cases, steps)
        two = run_ranks(2, cases, steps)
        load = (load_before, os.getloadavg()[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({"one": one, "two": two, "load": load}), encoding="utf-8")
    text = report(one, two, cases, steps, load)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
