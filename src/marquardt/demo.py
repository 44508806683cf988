"""The ``marquardt demo`` comparison: one network trained by LM, momentum and gradient descent.

The data set is generated in code, so the demo needs no files and no network access:
:func:`simplefit_data` is a noisy 1-D curve in the spirit of MATLAB's ``simplefit_dataset``
(94 samples of a damped oscillation on ``[0, 10]``). :func:`run_demo` trains the same
``mlp(1, 10, 1)``, from the same initial weights and on the same random 70/15/15 division, with
each method, and returns one :class:`DemoRun` per method; :func:`write_plots` draws them with
:func:`marquardt.plot.plot_comparison` and ``marquardt demo`` prints them as a table.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .history import History
from .mlp import mlp
from .train import fit

__all__ = ["DEMO_METHODS", "DemoRun", "run_demo", "simplefit_data", "write_plots"]

# Label -> fit method: MATLAB's trainlm, traingdm and traingd with their default rates.
DEMO_METHODS: dict[str, str] = {"LM": "lm", "Momentum": "momentum", "GD": "gd"}


def simplefit_data(n_samples: int = 94, *, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy damped oscillation on ``[0, 10]``, shaped like MATLAB's ``simplefit_dataset``.

    Parameters
    ----------
    n_samples : int, default 94
        Number of evenly spaced inputs.
    noise : float, default 0.05
        Standard deviation of the Gaussian noise added to the targets.
    seed : int, default 0
        Seed of the noise.

    Returns
    -------
    X : ndarray, shape (n_samples, 1)
    y : ndarray, shape (n_samples, 1)

    Notes
    -----
    ``y = 5 + 3 sin(x) exp(-x / 8) + 0.8 cos(2.3 x) + noise``: targets between about 1 and 9.

    Examples
    --------
    >>> X, y = simplefit_data()
    >>> X.shape, y.shape, float(X.min()), float(X.max())
    ((94, 1), (94, 1), 0.0, 10.0)
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"Invalid n_samples value: {n_samples!r}; expected an integer >= 2.")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"Invalid noise value: {noise!r}; expected a finite number >= 0.")
    x = np.linspace(0.0, 10.0, n_samples)
    clean = 5.0 + 3.0 * np.sin(x) * np.exp(-x / 8.0) + 0.8 * np.cos(2.3 * x)
    y = clean + noise * np.random.default_rng(seed).standard_normal(n_samples)
    return x[:, None], y[:, None]


@dataclass(frozen=True)
class DemoRun:
    """One method's run: its label, training record and wall-clock seconds."""

    label: str
    history: History
    seconds: float

    def row(self) -> dict[str, object]:
        """Table row: method, epochs, seconds, train/validation MSE of the final model, stop reason.

        The final model holds the weights of the best epoch (lowest validation MSE), as
        MATLAB's ``train`` returns them, so the MSEs are that epoch's.
        """
        kept = self.history[self.history.best_epoch]
        return {
            "method": self.label,
            "epochs": self.history.last["epoch"],
            "best_epoch": self.history.best_epoch,
            "time_s": self.seconds,
            "train_mse": kept["perf"],
            "val_mse": kept["vperf"],
            "stop_reason": self.history.stop_reason,
        }


def run_demo(
    *,
    epochs: int = 1000,
    seed: int = 0,
    hidden: int | Sequence[int] = 10,
    methods: dict[str, str] | None = None,
) -> list[DemoRun]:
    """Train one ``mlp(1, hidden, 1)`` on :func:`simplefit_data` with each method.

    Every method starts from the same initial weights and sees the same random 70/15/15
    division (both drawn from ``seed``), with MATLAB's stopping rules (``max_fail=6``).

    Parameters
    ----------
    epochs : int, default 1000
        Maximum epochs per method (MATLAB's default).
    seed : int, default 0
        Seed of the initial weights and of the division.
    hidden : int or sequence of int, default 10
        Hidden layer sizes.
    methods : dict of str to str, optional
        Label -> ``fit`` method; :data:`DEMO_METHODS` by default.

    Returns
    -------
    list of DemoRun
        In the order of ``methods``.

    Examples
    --------
    >>> runs = run_demo(epochs=3, methods={"LM": "lm"})
    >>> runs[0].row()["epochs"], runs[0].row()["method"]
    (3, 'LM')
    """
    X, y = (torch.from_numpy(a) for a in simplefit_data())
    initial = mlp(1, hidden, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    runs = []
    for label, method in (methods or DEMO_METHODS).items():
        # One untimed epoch first: the first run of a method family pays one-time start-up (~0.6 s
        # for the first first-order run: autograd and optimizer set-up), which time_s left in.
        fit(copy.deepcopy(initial), X, y, method=method, epochs=1, division="random", seed=seed, progress=False)
        model = copy.deepcopy(initial)
        start = time.perf_counter()
        history = fit(model, X, y, method=method, epochs=epochs, division="random", seed=seed, progress=False)
        runs.append(DemoRun(label, history, time.perf_counter() - start))
    return runs


def write_plots(runs: Sequence[DemoRun], out: str | os.PathLike[str]) -> list[Path]:
    """Write the convergence plots (by epoch and by time) to the folder ``out``.

    Returns
    -------
    list of Path
        ``out/comparison.png`` and ``out/comparison_time.png``.
    """
    from .plot import plot_comparison

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    histories = {run.label: run.history for run in runs}
    paths = [folder / "comparison.png", folder / "comparison_time.png"]
    plot_comparison(histories, x="epoch", path=paths[0])
    plot_comparison(histories, x="time", path=paths[1])
    return paths
