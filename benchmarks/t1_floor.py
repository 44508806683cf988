"""How fast can a T1 LM epoch be in Python? A bare numpy/LAPACK loop, for comparison with ``fit``.

T1's network (1-20-1 tanh, 61 parameters, 1,000 samples) is so small that an epoch is a few
dozen microsecond-sized kernels, and the time goes to calling them. This script runs the
least Python an exact LM epoch with MATLAB's damping rule can be: float64 numpy arrays
throughout, the Jacobian written from the kept activations of the accepted trial, the lower
triangle of ``J^T J`` by 12-column block products (as ``fit`` does), LAPACK ``dpotrf``/``dpotrs``
for each trial, no checks, no records, no callbacks, no stop tests but the epoch count. It
then times ``marquardt.fit`` on the same seeds, interleaved, and prints both per-epoch medians
and the peer's time per step that the 5x target of issue "Performance engine" implies.

Run: ``python -m benchmarks.t1_floor`` (about 15 s). It is not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from scipy.linalg.lapack import dpotrf, dpotrs

from benchmarks.common import configure_threads, make_data, make_model

EPOCHS = 1000
HIDDEN = 20


def bare_loop(seed: int, epochs: int = EPOCHS) -> tuple[float, float]:
    """Seconds per epoch and the final MSE of the bare loop from ``make_model("T1", seed)``."""
    x, y = make_data("T1")
    model = make_model("T1", seed)
    X, Y = x.double().numpy()[:, 0].copy(), y.double().numpy()[:, 0].copy()
    h, m = HIDDEN, X.shape[0]
    n = 3 * h + 1
    theta = np.concatenate([model[0].weight.detach().double().numpy()[:, 0], model[0].bias.detach().double().numpy(),
                            model[2].weight.detach().double().numpy()[0], model[2].bias.detach().double().numpy()])
    jac, gram, work = np.empty((m, n)), np.empty((n, n)), np.empty((n, n))
    kept, trial = np.empty((m, h)), np.empty((m, h))

    def residuals(th: np.ndarray, act: np.ndarray) -> np.ndarray:
        np.multiply.outer(X, th[:h], out=act)
        act += th[h:2 * h]
        np.tanh(act, out=act)
        return act @ th[2 * h:3 * h] + th[3 * h] - Y

    r = residuals(theta, kept)
    cost, mu = 0.5 * float(r @ r), 1e-3
    start = time.perf_counter()
    for _ in range(epochs):
        slope = (1.0 - kept * kept) * theta[2 * h:3 * h]
        np.multiply(slope, X[:, None], out=jac[:, :h])
        jac[:, h:2 * h] = slope
        jac[:, 2 * h:3 * h] = kept
        jac[:, 3 * h] = 1.0
        for s in range(0, n, 12):
            e = min(n, s + 12)
            np.matmul(jac[:, s:e].T, jac[:, :e], out=gram[s:e, :e])
        grad = jac.T @ r
        while True:
            np.copyto(work, gram)
            work.flat[:: n + 1] += mu
            factor, info = dpotrf(work.T, lower=0, overwrite_a=1, clean=0)
            step = dpotrs(factor, grad, lower=0)[0]
            candidate = theta - step
            r_new = residuals(candidate, trial)
            new = 0.5 * float(r_new @ r_new)
            if info == 0 and new < cost:
                theta, r, cost, mu = candidate, r_new, new, mu * 0.1
                kept, trial = trial, kept
                break
            mu *= 10.0
            if mu > 1e10:
                break
    seconds = (time.perf_counter() - start) / epochs
    return seconds, 2.0 * cost / m


def fit_loop(seed: int, epochs: int = EPOCHS) -> tuple[float, float]:
    """Seconds per epoch and the final MSE of ``marquardt.fit`` (defaults) on the same start."""
    import marquardt

    x, y = make_data("T1")
    model = make_model("T1", seed)
    start = time.perf_counter()
    history = marquardt.fit(model, x, y, epochs=epochs, progress=False)
    seconds = (time.perf_counter() - start) / (len(history["perf"]) - 1)
    return seconds, history["perf"][-1]


def main() -> None:
    configure_threads(2)
    bare, ours = [], []
    for seed in range(5):
        bare.append(bare_loop(seed))
        ours.append(fit_loop(seed))
        print(f"seed {seed}: bare loop {bare[-1][0] * 1e6:.0f} us/epoch (MSE {bare[-1][1]:.3g}), "
              f"fit {ours[-1][0] * 1e6:.0f} us/epoch (MSE {ours[-1][1]:.3g})")
    b = statistics.median(t for t, _ in bare)
    o = statistics.median(t for t, _ in ours)
    print(f"median: bare loop {b * 1e6:.0f} us, fit {o * 1e6:.0f} us an epoch ({o / b:.2f}x the bare loop); "
          f"5x the peer needs the peer at {5 * b * 1e3:.2f} ms a step or slower for the bare loop itself")


if __name__ == "__main__":
    main()
