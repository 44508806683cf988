"""Shared pieces of the benchmark suite: cases, timing, memory, tables and charts.

Everything a contender adapter needs to build the *same* model and data from a case name and a
seed lives here, so ours, the peer, Adam and the bound all see identical problems.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
THREADS = 2
DATA_SEED = 1234  # data never depends on the model seed: seeds vary the initial weights only


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark problem: an MLP of the given widths, tanh hidden layers, linear output."""

    name: str
    title: str
    widths: tuple[int, ...]
    n_samples: int
    target: str  # "sinc" (1-D input) or "teacher" (smooth function of many inputs)

    @property
    def n_params(self) -> int:
        return sum((a + 1) * b for a, b in zip(self.widths[:-1], self.widths[1:]))

    @property
    def n_residuals(self) -> int:
        return self.n_samples * self.widths[-1]

    @property
    def architecture(self) -> str:
        return "-".join(str(w) for w in self.widths)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("T1", "small", (1, 20, 1), 1_000, "sinc"),
        Case("T2", "medium", (1, 64, 64, 1), 5_000, "sinc"),
        Case("T3", "many samples", (1, 64, 64, 1), 50_000, "sinc"),
        Case("T4", "many parameters", (64, 256, 256, 64, 1), 20_000, "teacher"),
        Case("T5", "sample-space", (1, 200, 200, 1), 2_000, "sinc"),
    )
}


def configure_threads(n: int = THREADS) -> None:
    """Pin torch to ``n`` intra-op threads (the machine has 2 cores)."""
    import torch

    torch.set_num_threads(n)


def make_model(case: Case | str, seed: int):
    """The case's float32 MLP with weights drawn from ``seed`` (PyTorch's default init)."""
    import torch
    from torch import nn

    case = CASES[case] if isinstance(case, str) else case
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(case.widths[:-1], case.widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(torch.float32)


def make_data(case: Case | str):
    """``(X, y)`` float32 tensors of shapes ``(n, inputs)`` and ``(n, 1)``; deterministic."""
    case = CASES[case] if isinstance(case, str) else case
    if case.target == "sinc":
        return _sinc_data(case.n_samples)
    return _teacher_data(case.n_samples, case.widths[0])


def _sinc_data(n: int):
    import torch

    x = torch.linspace(-10.0, 10.0, n, dtype=torch.float32).unsqueeze(1)
    return x, torch.sinc(x)  # torch.sinc is sin(pi x) / (pi x)


def _teacher_data(n: int, d: int):
    """A smooth, non-trivial target of ``d`` inputs: two ridge waves and a quadratic ridge.

    Each direction is a random unit vector, so every projection has unit variance for standard
    normal inputs; the target is scaled to unit variance so MSE values are comparable to 1.
    """
    import torch

    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(n, d, generator=g)
    u = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=1)
    p = x @ u.T
    y = torch.sin(2.0 * p[:, 0]) + torch.cos(1.5 * p[:, 1]) * p[:, 2] + 0.25 * p[:, 0] ** 2
    y = (y - y.mean()) / y.std()
    return x, y.unsqueeze(1)


def mse(model, x, y) -> float:
    """Mean squared error over all target elements (MATLAB's ``mse``)."""
    import torch

    with torch.no_grad():
        return float((model(x) - y).square().mean())


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median: float
    times: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.times)


def time_it(
    fn: Callable[..., Any],
    repeats: int = 5,
    *,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls.

    ``setup``, if given, is called untimed before every call and its result passed to ``fn``
    (e.g. a fresh copy of a matrix that ``fn`` factorizes in place).
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats value: {repeats} (need at least 1)")
    times = []
    for i in range(warmup + repeats):
        args = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*args)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return Timing(statistics.median(times), tuple(times))


def median(values: Sequence[float]) -> float:
    """Median that tolerates ``inf`` (a run that never reached a target) and empty input."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


# --------------------------------------------------------------------------- memory


MB = 1e6  # decimal megabytes, as in the targets ("1 GB", "4 GB") and the "870 MB"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def child_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: same thread count for every BLAS."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def wait_with_rusage(proc: subprocess.Popen) -> float:
    """Reap ``proc`` with ``wait4`` and return *its own* peak RSS in MB.

    ``RUSAGE_CHILDREN`` would give the maximum over every child ever waited for; ``wait4``
    gives the numbers of exactly this child.
    """
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024 / MB


def run_with_peak_rss(argv: Sequence[str], timeout: float | None = None) -> tuple[int, str, float]:
    """Run ``argv`` (e.g. ``[sys.executable, "-c", code]``) in a fresh process.

    Returns ``(returncode, stdout, peak_rss_mb)``; the child is killed after ``timeout`` s.
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, cwd=REPO_ROOT, env=child_env())
        deadline = None if timeout is None else time.monotonic() + timeout
        # Not proc.poll(): it would reap the child and lose its rusage, which wait4 reads.
        while True:
            if _exited(proc.pid):
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(0.05)
        peak = wait_with_rusage(proc)
        out.seek(0)
        return proc.returncode, out.read(), peak


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (``waitid`` with ``WNOWAIT``)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- output


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    if math.isinf(s):
        return "not reached"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None or math.isnan(r) or math.isinf(r) else f"{r:.2f}x"


def fmt_float(v: float | None, spec: str = ".3g") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def fmt_mb(mb: float | None) -> str:
    return "n/a" if mb is None or math.isnan(mb) else f"{mb:,.0f} MB"


# --------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, title: str, labels: Sequence[str], values: Sequence[float],
              ylabel: str, reference: float | None = None, reference_label: str = "") -> None:
    """Horizontal bars (log scale), optionally with a vertical reference line (the bound)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.5))
    ax.barh(list(labels), list(values), color="tab:blue")
    if reference is not None:
        ax.axvline(reference, color="tab:red", linestyle="--", label=reference_label)
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.invert_yaxis()
    _save(fig, path)


def curve_chart(path: Path, title: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str = "wall time (s)", ylabel: str = "training MSE",
                hline: float | None = None, logx: bool = False) -> None:
    """Log-scale convergence curves: ``curves[label] = (times, values)``.

    ``logx`` spreads curves of very different lengths (points at ``x <= 0`` are dropped).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        pts = [(x, y) for x, y in zip(xs, ys) if (x > 0 or not logx) and y is not None and y > 0]
        if pts:
            ax.plot(*zip(*pts), label=label)
    if logx:
        ax.set_xscale("log")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label=f"target {hline:g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())
