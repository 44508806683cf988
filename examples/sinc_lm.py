"""Fit y = sinc(x) on [-10, 10] with a 1-20-1 tanh network trained by Levenberg-Marquardt.

Run: python examples/sinc_lm.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

import marquardt


def main(argv: list[str] | None = None) -> marquardt.History:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    X = torch.linspace(-10, 10, 1000, dtype=torch.float64)[:, None]
    y = torch.sinc(X / torch.pi)  # sin(x) / x
    model = marquardt.mlp(1, hidden=(20,), n_outputs=1, dtype=torch.float64)
    history = marquardt.fit(model, X, y, epochs=args.epochs, goal=1e-10, seed=0)
    print(f"{history.stop_reason} after {len(history) - 1} epochs; training MSE {history['perf'][-1]:.3e}")
    from marquardt.plot import plot_fit, plot_performance

    os.makedirs(args.out, exist_ok=True)
    plot_fit(model, X, y, path=os.path.join(args.out, "sinc_fit.png"))
    plot_performance(history, path=os.path.join(args.out, "sinc_performance.png"))
    return history


if __name__ == "__main__":
    main()
