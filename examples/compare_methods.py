"""Gradient descent, momentum and Levenberg-Marquardt on the same network, with a convergence plot.

Run: python examples/compare_methods.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

import marquardt


def main(argv: list[str] | None = None) -> dict[str, marquardt.History]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)

    X = torch.linspace(-1, 1, 200, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X) + 0.5 * X**2
    histories = {}
    for label, method, options in [("gradient descent", "gd", dict(lr=0.05)),
                                   ("momentum", "momentum", dict(lr=0.05, beta=0.9)),
                                   ("Levenberg-Marquardt", "lm", {})]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)).double()
        history = marquardt.fit(model, X, y, method=method, epochs=args.epochs, goal=1e-10, **options)
        histories[label] = history
        print(f"{label:20s} epochs {len(history) - 1:5d}  MSE {history['perf'][-1]:.3e}  {history.stop_reason}")
    from marquardt.plot import plot_comparison

    os.makedirs(args.out, exist_ok=True)
    plot_comparison(histories, path=os.path.join(args.out, "convergence.png"))
    return histories


if __name__ == "__main__":
    main()
