"""Adapter for the peer library, ``torch-levenberg-marquardt`` 1.2.3 (see PEER.md).

One LM step of the peer is one call of ``LevenbergMarquardtModule.training_step(X, y)``: it
forms the Jacobian with ``vmap(jacrev)``, the normal matrix (``J^T J`` or ``J J^T`` by shape),
and retries damped solves until the loss drops. We call it directly instead of through its
Lightning/tqdm ``fit`` utility, so no progress bar or logger is timed.
"""

from __future__ import annotations

import math
import time

from benchmarks.common import CASES, make_data, make_model, mse

SOLVE_METHODS = ("qr", "cholesky", "solve")
DEFAULT_SOLVE_METHOD = "qr"  # LevenbergMarquardtModule's default


def available() -> str | None:
    """``None`` when the peer can be imported, else the reason it cannot."""
    try:
        from torch_levenberg_marquardt.training import LevenbergMarquardtModule  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Lightning install
        return f"{type(exc).__name__}: {exc}"
    return None


def version() -> str:
    import torch_levenberg_marquardt

    return torch_levenberg_marquardt.__version__


def _module(model, solve_method: str):
    from torch_levenberg_marquardt.training import LevenbergMarquardtModule

    if solve_method not in SOLVE_METHODS:
        raise ValueError(f"Invalid solve_method: {solve_method!r} (expected one of {SOLVE_METHODS})")
    # Everything else at the peer's defaults: MSELoss, StandardDampingStrategy(1e-3, x0.1, x10),
    # 10 attempts per step, learning_rate 1, use_vmap=True, no max_batch_size.
    return LevenbergMarquardtModule(model, solve_method=solve_method)


def step_times(case: str, seed: int, steps: int, warmup: int = 1,
               solve_method: str = DEFAULT_SOLVE_METHOD) -> dict:
    """Wall time of each of ``steps`` peer LM steps after ``warmup`` untimed ones."""
    x, y = make_data(case)
    module = _module(make_model(case, seed), solve_method)
    times, attempts = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, _, stop, logs = module.training_step(x, y)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            attempts.append(int(logs["attempts"]))
        if stop:
            break
    c = CASES[case]
    return {
        "times": times,
        "attempts": attempts,
        "mse": mse(module.model, x, y),
        "form": "J^T J" if c.n_residuals >= c.n_params else "J J^T",
        "solver": solve_method,
    }


def train(case: str, seed: int, max_steps: int, budget_s: float | None = None,
          target: float | None = None, solve_method: str = DEFAULT_SOLVE_METHOD) -> dict:
    """Run up to ``max_steps`` steps (or ``budget_s`` seconds); record the MSE curve.

    The clock starts before the module is built. The curve's MSE is the loss the peer returns
    for each step (the MSE at the accepted point); evaluating it costs no extra time.
    """
    x, y = make_data(case)
    model = make_model(case, seed)
    curve_t, curve_mse = [0.0], [mse(model, x, y)]
    time_to_target = math.inf
    start = time.perf_counter()
    module = _module(model, solve_method)
    stop_reason = "max steps"
    for _ in range(max_steps):
        _, loss, stop, _ = module.training_step(x, y)
        now = time.perf_counter() - start
        curve_t.append(now)
        curve_mse.append(float(loss))
        if target is not None and curve_mse[-1] <= target and math.isinf(time_to_target):
            time_to_target = now
        if stop:
            stop_reason = "damping reached its maximum"
            break
        if budget_s is not None and now >= budget_s:
            stop_reason = "time budget"
            break
    return {
        "t": curve_t,
        "mse": curve_mse,
        "final_mse": mse(module.model, x, y),
        "steps": len(curve_t) - 1,
        "wall_s": curve_t[-1],
        "time_to_target": time_to_target,
        "stop_reason": stop_reason,
        "solver": solve_method,
    }
