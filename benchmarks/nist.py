"""NIST StRD nonlinear regression: marquardt against MINPACK (scipy ``method="lm"``), side by side.

Runs the 27 problems from both NIST starting points (54 runs) with each solver in
:data:`SOLVERS`, scores each run by its log relative error (LRE, correct significant digits
of the worst parameter), and writes a Markdown table to ``benchmarks/results/nist.md``.

Usage::

    python benchmarks/nist.py [--repeats 3] [--problems Misra1a,MGH09] [--output PATH]

Every solver gets the same float64 residuals and the same exact (autograd) Jacobian, so the
table compares the iterations, not the derivatives. Times are the median of ``--repeats``
runs, in milliseconds, and are only comparable within one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from marquardt.nist import PROBLEM_NAMES, NistProblem, load_problem, lre

RESULTS = Path(__file__).resolve().parent / "results" / "nist.md"


@dataclass(frozen=True)
class Outcome:
    """What the table needs from one solver run."""

    x: np.ndarray
    nfev: int
    status: int
    message: str


Solve = Callable[[NistProblem, np.ndarray], Outcome]


@dataclass(frozen=True)
class Run:
    """One (problem, start, solver) cell of the table."""

    problem: str
    difficulty: str
    start: int
    solver: str
    lre: float
    nfev: int
    ms: float
    status: int
    message: str


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------


def _marquardt(problem: NistProblem, x0: np.ndarray) -> Outcome:
    import marquardt

    result = marquardt.least_squares(problem.residual_function(), torch.as_tensor(x0))
    return Outcome(result.x.detach().numpy(), result.nfev, result.status, result.message)


def _scipy_lm(tol: float) -> Solve:
    def solve(problem: NistProblem, x0: np.ndarray) -> Outcome:
        fun = problem.residual_function()
        jacobian = torch.func.jacfwd(fun)
        result = scipy.optimize.least_squares(
            lambda b: fun(torch.from_numpy(b)).numpy(),
            x0,
            jac=lambda b: jacobian(torch.from_numpy(b)).numpy(),
            method="lm",
            x_scale="jac",  # MINPACK's own scaling; the scipy default only since 1.16
            ftol=tol,
            xtol=tol,
            gtol=tol,
        )
        return Outcome(result.x, result.nfev, result.status, result.message)

    return solve


def _marquardt_available() -> bool:
    try:
        import marquardt

        return callable(getattr(marquardt, "least_squares", None))
    except ImportError:
        return False


def solvers() -> list[tuple[str, Solve]]:
    """The solvers to compare, as ``(name, solve)``; marquardt only when it can be imported."""
    table = [("marquardt", _marquardt)] if _marquardt_available() else []
    return table + [("scipy lm", _scipy_lm(1e-8)), ("scipy lm 1e-15", _scipy_lm(1e-15))]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure(problem: NistProblem, start: int, name: str, solve: Solve, repeats: int) -> Run:
    """Run ``solve`` ``repeats`` times from ``start``; keep the last outcome, the median time."""
    x0 = problem.starts[start - 1]
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        try:
            outcome = solve(problem, x0)
        except Exception as error:  # a crash is a result too: LRE 0, reason in the message
            outcome = Outcome(np.full_like(x0, np.nan), 0, -99, f"{type(error).__name__}: {error}")
        times.append(time.perf_counter() - began)
    return Run(
        problem=problem.name,
        difficulty=problem.difficulty,
        start=start,
        solver=name,
        lre=lre(outcome.x, problem.certified),
        nfev=outcome.nfev,
        ms=1e3 * statistics.median(times),
        status=outcome.status,
        message=outcome.message,
    )


def warm_up(problems: Sequence[NistProblem], table: Sequence[tuple[str, Solve]]) -> None:
    """One untimed solve per solver, so that one-off costs (torch.func's first trace, lazy
    imports: about 3 s for marquardt's first call) are not charged to the first problem."""
    if not problems:
        return
    problem = problems[0]
    for _, solve in table:
        try:
            solve(problem, problem.starts[0])
        except Exception:  # measure() records the failure with its message
            pass


def measure_all(
    problems: Sequence[NistProblem], table: Sequence[tuple[str, Solve]], repeats: int
) -> list[Run]:
    """Every problem x start x solver (after :func:`warm_up`), printing progress to stderr."""
    warm_up(problems, table)
    runs = []
    for problem in problems:
        for start in (1, 2):
            for name, solve in table:
                runs.append(measure(problem, start, name, solve, repeats))
            print(f"{problem.name} start {start} done", file=sys.stderr, flush=True)
    return runs


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def summary(runs: Sequence[Run], solver: str) -> str:
    """One line: how many runs reached LRE 4 and 6, and the mean LRE."""
    scores = [run.lre for run in runs if run.solver == solver]
    at_least = {d: sum(score >= d for score in scores) for d in (4, 6)}
    return (
        f"- **{solver}**: LRE >= 4 in {at_least[4]}/{len(scores)}, "
        f"LRE >= 6 in {at_least[6]}/{len(scores)}, mean LRE {statistics.fmean(scores):.2f}"
    )


def markdown(runs: Sequence[Run], names: Sequence[str], repeats: int) -> str:
    """The side-by-side table, the summary lines, and the runs below LRE 6."""
    header = "| problem | difficulty | start | " + " | ".join(
        f"{name} LRE | nfev | ms" for name in names
    )
    rule = "|---|---|---:|" + "---:|---:|---:|" * len(names)
    cells = {(r.problem, r.start, r.solver): r for r in runs}
    rows = []
    keys = dict.fromkeys((r.problem, r.difficulty, r.start) for r in runs)
    for problem, difficulty, start in keys:
        parts = [problem, difficulty, str(start)]
        for name in names:
            run = cells[problem, start, name]
            parts += [f"{run.lre:.1f}", str(run.nfev), f"{run.ms:.1f}"]
        rows.append("| " + " | ".join(parts) + " |")
    weak = [
        f"| {r.solver} | {r.problem} | {r.start} | {r.lre:.2f} | {r.status} | {r.message} |"
        for r in runs
        if r.lre < 6
    ]
    return "\n".join(
        [
            "# NIST StRD nonlinear regression",
            "",
            f"LRE: correct significant digits of the worst parameter (capped at 15). "
            f"Times: median of {repeats} runs, ms, comparable only within this table. "
            f"torch {torch.__version__}, scipy {scipy.__version__}.",
            "",
            header + " |",
            rule,
            *rows,
            "",
            "## Summary",
            "",
            *(summary(runs, name) for name in names),
            "",
            "## Runs below LRE 6",
            "",
            "| solver | problem | start | LRE | status | message |",
            "|---|---|---:|---:|---:|---|",
            *weak,
            "",
        ]
    )


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the Markdown table and write it to ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default 3)")
    parser.add_argument("--problems", default="", help="comma-separated subset of problem names")
    parser.add_argument("--data-dir", default=None, help="directory of the NIST .dat files")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    names = args.problems.split(",") if args.problems else list(PROBLEM_NAMES)
    problems = [load_problem(name, args.data_dir) for name in names]
    table = solvers()
    text = markdown(measure_all(problems, table, args.repeats), [n for n, _ in table], args.repeats)
    print(text)
    write_atomically(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
