"""Adapter for ``scipy.optimize.least_squares(method="lm")`` (MINPACK's lmder), where it applies.

MINPACK works in float64 on a dense Jacobian, so it only makes sense for small networks (T1).
Residuals and the exact Jacobian come from torch (``torch.func.jacrev`` over the flat
parameter vector, float64 copy of the same seeded model); MINPACK does the rest. Its tolerances
are at their defaults (1e-8), so it may stop before the target MSE.
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
    from torch.func import functional_call, jacrev

    x, y = (t.double() for t in make_data(case))
    model = make_model(case, seed).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def residual_t(w):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(w, sizes), shapes)}
        return (functional_call(model, params, (x,)) - y).reshape(-1)

    jac_t = jacrev(residual_t)

    def residuals(w):
        with torch.no_grad():
            return residual_t(torch.from_numpy(w)).numpy()

    def jacobian(w):
        return jac_t(torch.from_numpy(w)).detach().numpy()

    return residuals, jacobian, w0.numpy(), residual_t


def train(case: str, seed: int, target: float | None = None, max_nfev: int = 10_000) -> dict:
    """One MINPACK run; the curve records the MSE at every residual evaluation."""
    import torch
    from scipy.optimize import least_squares

    residuals, jacobian, w0, residual_t = _problem(case, seed)
    curve_t, curve_mse = [], []
    start = time.perf_counter()

    def fun(w):
        r = residuals(w)
        curve_t.append(time.perf_counter() - start)
        # Best so far: MINPACK also evaluates trial points it then rejects.
        curve_mse.append(min(float((r * r).mean()), curve_mse[-1] if curve_mse else math.inf))
        return r

    result = least_squares(fun, w0, jac=jacobian, method="lm", max_nfev=max_nfev)
    wall = time.perf_counter() - start
    with torch.no_grad():
        final = float(residual_t(torch.from_numpy(result.x)).square().mean())
    hits = [t for t, m in zip(curve_t, curve_mse) if target is not None and m <= target]
    return {
        "t": curve_t, "mse": curve_mse, "final_mse": final, "steps": int(result.njev),
        "nfev": int(result.nfev), "wall_s": wall, "step_s": wall / max(int(result.njev), 1),
        "time_to_target": hits[0] if hits else (math.inf if target is not None else math.nan),
        "stop_reason": result.message,
    }
