"""Adapter for marquardt itself, called exactly as a new user would: defaults everywhere.

The contract this adapter relies on (issue 3's public API):

* ``marquardt.fit(model, X, y, *, method="lm", epochs=..., goal=..., time_limit=...)`` trains
  ``model`` in place and returns a ``History`` whose per-epoch columns are read as
  ``history["time"]`` (seconds since training started, epoch 0 = the initial state),
  ``history["perf"]`` (training MSE), ``history["damping"]`` and ``history["solver"]`` (the linear
  solver path taken), with ``history.stop_reason``. ``history.to_dict()`` is the fallback.
* ``marquardt.LevenbergMarquardt(model.parameters())`` is a ``torch.optim.Optimizer`` whose
  ``step(closure)`` takes a closure returning the residual tensor and returns the cost.

Anything missing makes :func:`available` say why, and the suite prints "not available".
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

from benchmarks.common import make_data, make_model, mse

APIS = ("fit", "optimizer")


def available(api: str = "fit") -> str | None:
    """``None`` when ``api`` ("fit" or "optimizer") of marquardt can be used, else why not."""
    try:
        import marquardt
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    name = {"fit": "fit", "optimizer": "LevenbergMarquardt"}[api]
    if not hasattr(marquardt, name):
        return f"marquardt {getattr(marquardt, '__version__', '?')} has no marquardt.{name} yet"
    return None


# --------------------------------------------------------------------------- History access


def column(history: Any, key: str) -> list:
    """One per-epoch column of a History: ``history[key]``, else ``history.to_dict()``."""
    try:
        return list(history[key])
    except (KeyError, TypeError, IndexError):
        pass
    data = history.to_dict() if hasattr(history, "to_dict") else history
    if isinstance(data, dict) and key in data and isinstance(data[key], (list, tuple)):
        return list(data[key])
    records = data.get("records", data.get("epochs")) if isinstance(data, dict) else data
    if isinstance(records, (list, tuple)) and records and isinstance(records[0], dict):
        return [r.get(key) for r in records]
    raise KeyError(f"History has no per-epoch column {key!r}")


def stop_reason(history: Any) -> str | None:
    reason = getattr(history, "stop_reason", None)
    if reason is None and hasattr(history, "to_dict"):
        reason = history.to_dict().get("stop_reason")
    return reason


def elapsed(history: Any) -> list[float]:
    """Cumulative seconds per recorded epoch (epoch 0 first).

    ``time`` is read as cumulative (MATLAB's ``tr.time``); a column that ever decreases is taken
    to hold per-epoch durations instead and summed.
    """
    times = [float(t) for t in column(history, "time")]
    if all(b >= a for a, b in zip(times, times[1:])):
        return times
    out, total = [], 0.0
    for t in times:
        total += t
        out.append(total)
    return out


def _solvers(history: Any) -> dict[str, int]:
    try:
        return dict(Counter(str(s) for s in column(history, "solver")[1:] if s is not None))
    except KeyError:
        return {}


# --------------------------------------------------------------------------- measurements


def _fit(model, x, y, **options):
    import marquardt

    start = time.perf_counter()
    history = marquardt.fit(model, x, y, method="lm", **options)
    return history, time.perf_counter() - start


def step_times(case: str, seed: int, steps: int, warmup: int = 1, api: str = "fit",
               max_seconds: float | None = None) -> dict:
    """Wall time of each of ``steps`` LM steps after ``warmup`` untimed ones.

    ``api="fit"``: one ``fit`` run of ``warmup + steps`` epochs, per-epoch times from its
    History. ``api="optimizer"``: ``LevenbergMarquardt.step(closure)`` timed from outside.
    ``max_seconds`` stops early (fewer steps timed) so a slow build cannot stall the suite.
    """
    if api not in APIS:
        raise ValueError(f"Invalid api: {api!r} (expected one of {APIS})")
    x, y = make_data(case)
    model = make_model(case, seed)
    if api == "fit":
        limit = {} if max_seconds is None else {"time_limit": max_seconds}
        history, _ = _fit(model, x, y, epochs=warmup + steps, **limit)
        cum = elapsed(history)
        times = [b - a for a, b in zip(cum, cum[1:])]
        extra = {"solvers": _solvers(history), "stop_reason": stop_reason(history)}
    else:
        times = _optimizer_steps(model, x, y, warmup + steps, max_seconds)
        extra = {"solvers": {}, "stop_reason": None}
    # Stopped by max_seconds within the warm-up: better a warm-up step than no number at all.
    warmup_included = len(times) <= warmup
    times = times if warmup_included else times[warmup:]
    return {"times": times, "mse": mse(model, x, y), "api": api,
            "warmup_included": warmup_included, **extra}


def _optimizer_steps(model, x, y, n: int, max_seconds: float | None) -> list[float]:
    import marquardt

    opt = marquardt.LevenbergMarquardt(model.parameters())

    def closure():
        return (model(x) - y).reshape(-1)

    times: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - start)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    return times


def train(case: str, seed: int, max_steps: int, budget_s: float | None = None,
          target: float | None = None) -> dict:
    """``fit`` with ``epochs=max_steps`` and, when given, ``goal=target``, ``time_limit=budget_s``.

    ``time_to_target`` is the wall time of the ``fit`` call up to the first epoch whose MSE is at
    most ``target`` (set-up included: what the user waits for).
    """
    x, y = make_data(case)
    model = make_model(case, seed)
    options: dict[str, Any] = {"epochs": max_steps}
    if target is not None:
        options["goal"] = target
    if budget_s is not None:
        options["time_limit"] = budget_s
    history, wall = _fit(model, x, y, **options)
    cum = elapsed(history)
    perf = [float(p) for p in column(history, "perf")]
    return {
        "t": cum, "mse": perf, "final_mse": mse(model, x, y), "steps": len(perf) - 1,
        "wall_s": wall, "time_to_target": _time_to_target(cum, perf, wall, target),
        "stop_reason": stop_reason(history), "solvers": _solvers(history),
    }


def _time_to_target(cum: list[float], perf: list[float], wall: float,
                    target: float | None) -> float:
    if target is None:
        return math.nan
    for t, p in zip(cum, perf):
        if p <= target:
            return wall - (cum[-1] - t)  # fit's own set-up and wrap-up counted once
    return math.inf
