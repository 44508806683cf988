"""Termination status codes, their messages, and the typed result of :func:`least_squares`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Status codes and messages, as in :func:`scipy.optimize.least_squares`.
TERMINATION_MESSAGES: dict[int, str] = {
    -2: "Stopped because `callback` function raised `StopIteration` or returned `True`",
    -1: "Improper input parameters status returned from `leastsq`",
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}


def termination_message(status: int) -> str:
    """Return the message for a termination ``status`` code.

    Examples
    --------
    >>> termination_message(1)
    '`gtol` termination condition is satisfied.'
    """
    return TERMINATION_MESSAGES[status]


@dataclass(frozen=True)
class LeastSquaresResult:
    """The outcome of :func:`marquardt.least_squares`.

    Attributes
    ----------
    x : Tensor or ndarray
        The solution (numpy when ``x0`` was not a tensor).
    cost : float
        ``0.5 * sum(fun**2)`` at the solution.
    fun : Tensor or ndarray
        Residuals at the solution, shape ``(m,)``.
    jac : Tensor or ndarray
        Jacobian at the solution, shape ``(m, n)``.
    grad : Tensor or ndarray
        Gradient of the cost, ``jac.T @ fun``.
    optimality : float
        First-order optimality, ``max |grad|``.
    active_mask : Tensor or ndarray
        Zeros of shape ``(n,)``, integer: no bound is active (Levenberg-Marquardt takes no
        bounds), as :func:`scipy.optimize.least_squares` reports for ``method="lm"``.
    nfev, njev, n_iter : int
        Evaluations of ``fun`` for a cost, Jacobian evaluations and accepted-or-rejected
        iterations. ``nfev`` leaves out the calls of a ``"2-point"`` Jacobian, as scipy's does
        since 1.16.
    status : int
        Termination code; see :data:`TERMINATION_MESSAGES`.
    message : str
        Human-readable termination reason.
    success : bool
        ``status > 0``.
    covariance : Tensor or ndarray
        ``s**2 * pinv(J^T J)`` with ``s**2 = 2 cost / (m - n)``, as
        :func:`scipy.optimize.curve_fit` reports it. ``inf`` everywhere when ``m <= n``, and in
        the rows and columns of parameters the data do not determine (``J`` rank-deficient,
        judged with the columns of ``J`` scaled to unit norm; a ``RuntimeWarning`` names them).
    stderr : Tensor or ndarray
        Standard errors of the parameters, ``sqrt(diag(covariance))``.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from marquardt import least_squares
    >>> t = torch.linspace(0, 1, 8, dtype=torch.float64)
    >>> res = least_squares(lambda b: b[0] * t + b[1] - (3 * t + 1), np.zeros(2))
    >>> res.success, np.round(res.x, 8).tolist(), res.message == TERMINATION_MESSAGES[res.status]
    (True, [3.0, 1.0], True)
    >>> bool(np.all(res.stderr < 1e-6))  # an exact fit: no residual scatter
    True
    """

    x: Any
    cost: float
    fun: Any
    jac: Any
    grad: Any
    optimality: float
    active_mask: Any
    nfev: int
    njev: int
    n_iter: int
    status: int
    message: str
    success: bool
    covariance: Any
    stderr: Any


@dataclass(frozen=True)
class IterationInfo:
    """What a ``callback`` of :func:`marquardt.least_squares` receives after each iteration.

    Attributes
    ----------
    n_iter : int
        Iterations so far (accepted and rejected damping trials count once per outer step).
    x : Tensor
        Current point (after the step when it was accepted); a copy, so that changing it in place
        does not move the solver.
    cost : float
        ``0.5 * sum(fun**2)`` at ``x``.
    optimality : float
        ``max |J^T r|`` at ``x``.
    damping : float
        Damping after the step.
    step_norm : float
        Norm of the last trial step.
    accepted : bool
        Whether the last trial step was kept (it lowered the cost, and the Jacobian at the new
        point is finite).

    Examples
    --------
    >>> from marquardt import least_squares
    >>> seen = []
    >>> res = least_squares(lambda b: b**2 - 4, [1.0], callback=lambda info: seen.append(info.accepted))
    >>> len(seen) == res.n_iter, seen[0]
    (True, True)
    """

    n_iter: int
    x: Any
    cost: float
    optimality: float
    damping: float
    step_norm: float
    accepted: bool
