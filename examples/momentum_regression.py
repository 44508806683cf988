"""Momentum gradient descent on linear regression y = 4 + 3x + noise, against the closed form.

x = 2 * rand(100, 1) with seed 0, as in the classic textbook example. Prints the intercept and
slope found by momentum gradient descent (MATLAB traingdm) and by least squares, and saves a
plot of the data and the fitted line.

Run: python examples/momentum_regression.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import marquardt


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = 2 * rng.random((100, 1))
    y = 4 + 3 * x + rng.standard_normal((100, 1))
    torch.manual_seed(0)  # the initial weights, so that every run prints the same numbers
    model = torch.nn.Linear(1, 1).double()
    history = marquardt.fit(model, x, y, method="momentum", lr=0.1, beta=0.9, epochs=args.epochs, min_grad=0.0)
    intercept, slope = float(model.bias.detach()), float(model.weight.detach())
    design = np.hstack([np.ones_like(x), x])
    exact_intercept, exact_slope = np.linalg.lstsq(design, y, rcond=None)[0].reshape(-1)
    print(f"momentum:      intercept {intercept:.6f}  slope {slope:.6f}  ({history.stop_reason})")
    print(f"closed form:   intercept {exact_intercept:.6f}  slope {exact_slope:.6f}")
    _plot(x, y, intercept, slope, os.path.join(args.out, "momentum_regression.png"))
    return dict(intercept=intercept, slope=slope, exact_intercept=float(exact_intercept), exact_slope=float(exact_slope))


def _plot(x: np.ndarray, y: np.ndarray, intercept: float, slope: float, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.scatter(x, y, s=10, label="data")
    grid = np.array([0.0, 2.0])
    ax.plot(grid, intercept + slope * grid, "r-", label=f"y = {intercept:.2f} + {slope:.2f} x")
    ax.set(xlabel="x", ylabel="y", title="Momentum gradient descent")
    ax.legend()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
