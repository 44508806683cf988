"""Full-batch ``torch.optim.Adam`` on a case: the first-order baseline, best of three rates."""

from __future__ import annotations

import math
import time

from benchmarks.common import make_data, make_model, mse

LEARNING_RATES = (1e-3, 3e-3, 1e-2)
CURVE_POINTS = 150  # the curve is thinned to about this many points to keep results small


def available() -> str | None:
    return None  # torch.optim is always there


def train(case: str, seed: int, lr: float, budget_s: float, max_steps: int = 10**9,
          target: float | None = None) -> dict:
    """Adam on the full batch for ``budget_s`` seconds (clock started before the optimizer)."""
    import torch

    x, y = make_data(case)
    model = make_model(case, seed)
    curve_t, curve_mse = [0.0], [mse(model, x, y)]
    time_to_target = math.inf
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    while steps < max_steps:
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        steps += 1
        now = time.perf_counter() - start
        # loss is the MSE *before* this update: a lag of one step, free to read.
        curve_t.append(now)
        curve_mse.append(float(loss))
        if target is not None and curve_mse[-1] <= target and math.isinf(time_to_target):
            time_to_target = now
        if now >= budget_s:
            break
    stride = max(1, len(curve_t) // CURVE_POINTS)
    return {
        "lr": lr,
        "t": curve_t[::stride] + [curve_t[-1]],
        "mse": curve_mse[::stride] + [curve_mse[-1]],
        "final_mse": mse(model, x, y),
        "steps": steps,
        "wall_s": curve_t[-1],
        "time_to_target": time_to_target,
    }


def best_of(runs: list[dict]) -> dict:
    """The run with the lowest final MSE (ties: the first)."""
    return min(runs, key=lambda r: (math.isnan(r["final_mse"]), r["final_mse"]))
