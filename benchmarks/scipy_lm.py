"""Adapter for ``scipy.optimize.least_squares(method="lm")`` (MINPACK's lmder), where it applies.

MINPACK works in float64 on a dense Jacobian, so it only makes sense for small networks (T1).
Residuals and the exact Jacobian come from torch (``torch.func.jacfwd`` over the flat
parameter vector, float64 copy of the same seeded model); MINPACK does the rest. Its tolerances
are at their defaults (1e-8), so it may stop before the target MSE; a time budget stops it too.
"""

from __future__ import annotations

import math
import time

from benchmarks.common import make_data, make_model


def available() -> str | None:
    try:
        from scipy.optimize import least_squares  # noqa: F401
    except ImportError as exc:
        return f"ImportError: {exc}"
    return None


def _problem(case: str, seed: int):
    """``(residuals(w), jacobian(w), w0, residual_t)`` on a float64 copy of the case."""
    import torch
    from torch.func import functional_call, jacfwd

    x, y = (t.double() for t in make_data(case))
    model = make_model(case, seed).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def residual_t(w):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(w, sizes), shapes)}
        return (functional_call(model, params, (x,)) - y).reshape(-1)

    jac_t = jacfwd(residual_t)  # forward mode: P (61) pushes instead of N (1000) pulls

    def residuals(w):
        with torch.no_grad():
            return residual_t(torch.from_numpy(w)).numpy()

    def jacobian(w):
        return jac_t(torch.from_numpy(w)).detach().numpy()

    return residuals, jacobian, w0.numpy(), residual_t


class _OutOfTime(Exception):
    """Raised from the residual function: MINPACK's lm has no callback to stop it otherwise."""


def train(case: str, seed: int, target: float | None = None, budget_s: float = 20.0,
          max_nfev: int = 100_000) -> dict:
    """One MINPACK run of at most ``budget_s`` seconds; the curve is the best MSE per evaluation."""
    from scipy.optimize import least_squares

    residuals, jacobian, w0, _ = _problem(case, seed)
    curve_t, curve_mse = [], []
    start = time.perf_counter()
    counts = {"njev": 0}

    def fun(w):
        if time.perf_counter() - start > budget_s:
            raise _OutOfTime
        r = residuals(w)
        curve_t.append(time.perf_counter() - start)
        # Best so far: MINPACK also evaluates trial points it then rejects.
        curve_mse.append(min(float((r * r).mean()), curve_mse[-1] if curve_mse else math.inf))
        return r

    def jac(w):
        counts["njev"] += 1
        return jacobian(w)

    try:
        reason = least_squares(fun, w0, jac=jac, method="lm", max_nfev=max_nfev).message
    except _OutOfTime:
        reason = f"time budget ({budget_s:g} s)"
    wall = time.perf_counter() - start
    hits = [t for t, m in zip(curve_t, curve_mse) if target is not None and m <= target]
    return {
        "t": curve_t, "mse": curve_mse, "final_mse": curve_mse[-1], "steps": counts["njev"],
        "nfev": len(curve_t), "wall_s": wall, "step_s": wall / max(counts["njev"], 1),
        "time_to_target": hits[0] if hits else (math.inf if target is not None else math.nan),
        "stop_reason": reason,
    }
