"""Matrix-free damped Gauss-Newton solves: conjugate gradients on Jacobian products (pure tensor code).

When ``J^T J`` (``n x n``) is too big to form, the LM step ``(J^T J + damping D) h = -g`` can
still be solved with nothing but products ``J v`` and ``J^T u``: each conjugate-gradient
iteration costs one of each, about two passes over the data, and memory stays ``O(m + n)``.
This is *inexact* Levenberg-Marquardt: CG stops once the residual of the linear system is below
a forcing term times ``||g||`` (Eisenstat & Walker, 1996; Dembo, Eisenstat & Steihaug, 1982),
when the quadratic model stops improving (Martens, 2010), or after ``max_iter`` iterations. Every
CG iterate lowers the damped model, so the step is always a descent direction and the gain
ratio of :func:`marquardt.solver.lm_step` is well defined.

:class:`MatrixFreeEquations` answers the same questions as
:class:`marquardt.linalg.NormalEquations` (``solve``, ``curvature``, ``diagonal``, ``path``), so
the LM loop needs no change. It takes callables and tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["CGResult", "MatrixFreeEquations", "conjugate_gradient", "eisenstat_walker"]

Operator = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CGResult:
    """The outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    x : Tensor
        The approximate solution.
    product : Tensor
        ``A x`` (kept up to date by the iteration, so no extra product is needed).
    iterations : int
        Products with ``A`` made (the warm start's scaling included).
    residual_norm : float
        ``||b - A x||`` by the recurrence.
    reason : str
        ``"tolerance"``, ``"stalled"`` (the model stopped improving), ``"max_iter"`` or
        ``"breakdown"`` (non-positive or non-finite curvature ``p^T A p``).
    """

    x: Tensor
    product: Tensor
    iterations: int
    residual_norm: float
    reason: str


def conjugate_gradient(
    operator: Operator,
    rhs: Tensor,
    *,
    x0: Tensor | None = None,
    preconditioner: Tensor | None = None,
    rtol: float = 1e-5,
    max_iter: int = 100,
    stall_window: float = 0.1,
    stall_tol: float = 5e-4,
) -> CGResult:
    """Preconditioned conjugate gradients for ``A x = b``, ``A`` symmetric positive definite.

    Parameters
    ----------
    operator : callable
        ``v -> A v``.
    rhs : Tensor
        ``b``.
    x0 : Tensor, optional
        Warm start. It is first scaled by the ``alpha`` minimising the quadratic
        ``q(x) = x^T A x / 2 - b^T x`` along it, so the start is never worse than zero.
    preconditioner : Tensor, optional
        Diagonal ``M`` (Jacobi): ``M^{-1} r`` steers the search directions.
    rtol : float
        Stop when ``||b - A x|| <= rtol * ||b||``.
    max_iter : int
        Most products with ``A`` after the start.
    stall_window, stall_tol : float
        Martens' (2010) progress test: stop at iteration ``i`` when the model decreased by less
        than ``k * stall_tol`` (relative) over the last ``k = max(10, stall_window * i)``
        iterations. ``stall_tol=0`` turns it off.

    Returns
    -------
    CGResult

    Examples
    --------
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> out = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-12)
    >>> [round(v, 6) for v in out.x.tolist()], out.iterations, out.reason
    ([0.090909, 0.636364], 2, 'tolerance')
    """
    x, product, iterations = _start(operator, rhs, x0)
    residual = rhs - product
    bnorm = float(torch.linalg.vector_norm(rhs))
    target = rtol * bnorm
    rnorm = float(torch.linalg.vector_norm(residual))
    if rnorm <= target or bnorm == 0.0:
        return CGResult(x, product, iterations, rnorm, "tolerance")
    z = residual if preconditioner is None else residual / preconditioner
    direction = z.clone()
    rz = float(residual @ z)
    models = [_model(x, residual, rhs)]
    reason = "max_iter"
    for i in range(1, max_iter + 1):
        ad = operator(direction)
        iterations += 1
        curvature = float(direction @ ad)
        if not (math.isfinite(curvature) and curvature > 0):
            reason = "breakdown"
            break
        alpha = rz / curvature
        x.add_(direction, alpha=alpha)
        product.add_(ad, alpha=alpha)
        residual.sub_(ad, alpha=alpha)
        rnorm = float(torch.linalg.vector_norm(residual))
        models.append(_model(x, residual, rhs))
        if rnorm <= target:
            reason = "tolerance"
            break
        if _stalled(models, i, stall_window, stall_tol):
            reason = "stalled"
            break
        z = residual if preconditioner is None else residual / preconditioner
        rz_next = float(residual @ z)
        direction.mul_(rz_next / rz).add_(z)
        rz = rz_next
    return CGResult(x, product, iterations, rnorm, reason)


def _start(operator: Operator, rhs: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """The scaled warm start ``alpha x0`` and ``A alpha x0``; zero when there is none."""
    if x0 is None or not bool(torch.isfinite(x0).all()) or float(torch.linalg.vector_norm(x0)) == 0.0:
        return torch.zeros_like(rhs), torch.zeros_like(rhs), 0
    product = operator(x0)
    curvature = float(x0 @ product)
    if not (math.isfinite(curvature) and curvature > 0):
        return torch.zeros_like(rhs), torch.zeros_like(rhs), 1
    alpha = float(rhs @ x0) / curvature
    return alpha * x0, alpha * product, 1


def _model(x: Tensor, residual: Tensor, rhs: Tensor) -> float:
    """``q(x) = x^T A x / 2 - b^T x`` from ``r = b - A x``: ``-(b + r)^T x / 2``."""
    return -0.5 * float((rhs + residual) @ x)


def _stalled(models: list[float], i: int, window: float, tol: float) -> bool:
    k = max(10, int(window * i))
    if tol <= 0 or i < k:
        return False
    now, before = models[-1], models[-1 - k]
    return now < 0 and (now - before) / now < k * tol


def eisenstat_walker(grad_norm: float, previous_norm: float | None, previous_forcing: float | None, *,
                     gamma: float = 0.9, power: float = 2.0, low: float = 1e-4, high: float = 0.5) -> float:
    """The next forcing term (relative CG tolerance), Eisenstat & Walker's choice 2 with safeguard.

    ``eta = gamma (||g_k|| / ||g_{k-1}||)^power``, kept at least ``gamma eta_{k-1}^power`` when that
    is above 0.1 (so the tolerance does not collapse after one lucky step), and clipped to
    ``[low, high]``. The first iteration gets ``high``.

    Examples
    --------
    >>> eisenstat_walker(1.0, None, None)
    0.5
    >>> round(eisenstat_walker(0.1, 1.0, 0.3), 6)
    0.009
    """
    if previous_norm is None or previous_forcing is None or previous_norm <= 0:
        return high
    eta = gamma * (grad_norm / previous_norm) ** power
    floor = gamma * previous_forcing**power
    if floor > 0.1:
        eta = max(eta, floor)
    return float(min(high, max(low, eta)))


@dataclass
class MatrixFreeEquations:
    """The damped normal equations ``(J^T J + damping * diag(scale)) h = -grad``, solved by CG.

    Parameters
    ----------
    jvp, vjp : callable
        ``v -> J v`` (parameters to residuals) and ``u -> J^T u`` (residuals to parameters).
    gram_diagonal : callable or Tensor
        ``diag(J^T J)``, or a function computing it (called at most once, on first use).
    initial : Tensor, optional
        Warm start for the first solve (e.g. the previous iteration's step); later solves (a
        retry with more damping) start from the last solution.
    rtol : float
        Forcing term: CG stops when the linear residual is below ``rtol * ||grad||``.
    max_iter : int
        Most CG iterations per solve.
    precondition : bool
        Jacobi preconditioner ``diag(J^T J) + damping * scale``.
    stall_tol : float
        Martens' progress test (see :func:`conjugate_gradient`); 0 turns it off.

    Attributes
    ----------
    iterations : int
        CG iterations of the last solve.
    reason : str
        Why the last solve stopped (see :class:`CGResult`).

    Notes
    -----
    ``curvature(h)`` (``h^T J^T J h``, for the predicted reduction) costs nothing for the step
    just solved: CG keeps ``A h`` up to date, and ``h^T J^T J h = h^T A h - damping h^T D h``.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    >>> r = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    >>> system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), rtol=1e-12)
    >>> step = system.solve(J.T @ r, 0.0, torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(step, torch.linalg.lstsq(J, -r).solution), system.path
    (True, 'cg')
    """

    jvp: Operator
    vjp: Operator
    gram_diagonal: Callable[[], Tensor] | Tensor
    initial: Tensor | None = None
    rtol: float = 0.1
    max_iter: int = 100
    precondition: bool = True
    stall_tol: float = 5e-4
    path: str = field(default="cg", init=False)
    name = "matrix-free"
    iterations: int = field(default=0, init=False)
    reason: str = field(default="", init=False)
    _last: tuple[Tensor, Tensor, float, Tensor] | None = field(default=None, init=False, repr=False)

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` (computed on first use)."""
        if callable(self.gram_diagonal):
            self.gram_diagonal = self.gram_diagonal()
        return self.gram_diagonal

    def gram_product(self, vector: Tensor) -> Tensor:
        """``J^T J v``."""
        return self.vjp(self.jvp(vector))

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """An inexact damped Gauss-Newton step; ``residuals`` is accepted for the interface and unused."""
        damped = damping * scale

        def operator(vector: Tensor) -> Tensor:
            return self.gram_product(vector) + damped * vector

        preconditioner = self.diagonal() + damped if self.precondition else None
        start = self._last[0] if self._last is not None else self.initial
        out = conjugate_gradient(operator, -grad, x0=start, preconditioner=preconditioner,
                                 rtol=self.rtol, max_iter=self.max_iter, stall_tol=self.stall_tol)
        self.iterations, self.reason = out.iterations, out.reason
        self._last = (out.x, out.product, damping, scale)
        return out.x.clone()

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``: from the CG bookkeeping for the last solution, else one ``J h``."""
        if self._last is not None and torch.equal(step, self._last[0]):
            x, product, damping, scale = self._last
            return x @ product - damping * (x @ (scale * x))
        value = self.jvp(step)
        return value @ value
