"""Bayesian regularization (MacKay, 1992; Foresee & Hagan, 1997), as MATLAB ``trainbr``: pure tensor code.

The network minimises ``F = beta E_D + alpha E_W``, with ``E_D`` the sum of squared errors and
``E_W`` the sum of squared weights. ``F / 2`` is itself a least-squares cost, with the weight
residuals ``sqrt(alpha) w`` appended to the data residuals ``sqrt(beta) e``, so the step goes
through the one LM loop (:func:`marquardt.solver.lm_step`) on a :class:`RegularizedProblem`.
After each accepted step the hyperparameters are re-estimated from the effective number of
parameters ``gamma`` (:func:`update_state`).

Size limit: ``gamma`` needs the eigenvalues of the dense ``n x n`` matrix ``J^T J`` each epoch
(``8 n^2`` bytes in float64 and ``O(n^3)`` time), which is practical up to a few thousand
parameters (n = 5000: 200 MB and a few seconds per epoch on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .chunked import PromotedEquations
from .linalg import NormalEquations
from .solver import Linearization, Problem

__all__ = [
    "BayesianState",
    "RegularizedProblem",
    "data_gram",
    "effective_parameters",
    "initial_state",
    "update_state",
]


@dataclass(frozen=True)
class BayesianState:
    """The regularization hyperparameters and the quantities they were estimated from.

    Attributes
    ----------
    alpha, beta : float
        Weights of ``E_W`` and ``E_D`` in ``F = beta E_D + alpha E_W``.
    gamma : float
        Effective number of parameters (MATLAB's ``gamk``, "Num Parameters").
    sse, ssw : float
        ``E_D`` (sum of squared errors) and ``E_W`` (sum of squared weights, MATLAB's ``ssX``).
    """

    alpha: float
    beta: float
    gamma: float
    sse: float
    ssw: float

    @property
    def objective(self) -> float:
        """``F = beta E_D + alpha E_W``."""
        return self.beta * self.sse + self.alpha * self.ssw


def _hyperparameters(gamma: float, n_errors: int, sse: float, ssw: float) -> tuple[float, float]:
    # MATLAB's conventions: alpha = beta = 1 when E_W or E_D is zero; beta <= 0 (gamma >= N,
    # more effective parameters than errors) is reset to 1.
    alpha = gamma / (2.0 * ssw) if ssw > 0 else 1.0
    beta = (n_errors - gamma) / (2.0 * sse) if sse > 0 else 1.0
    return alpha, (beta if beta > 0 else 1.0)


def initial_state(n_params: int, n_errors: int, sse: float, ssw: float) -> BayesianState:
    """First estimate: ``gamma = n_params``, ``beta = (N - gamma) / (2 E_D)``, ``alpha = gamma / (2 E_W)``.

    Examples
    --------
    >>> initial_state(n_params=61, n_errors=100, sse=3.0, ssw=20.0)
    BayesianState(alpha=1.525, beta=6.5, gamma=61.0, sse=3.0, ssw=20.0)
    """
    alpha, beta = _hyperparameters(n_params, n_errors, sse, ssw)
    return BayesianState(alpha, beta, float(n_params), sse, ssw)


def effective_parameters(gram: Tensor, alpha: float, beta: float) -> float:
    """``gamma = n - alpha trace((beta J^T J + alpha I)^-1)`` from ``gram = J^T J``.

    With the eigenvalues ``lambda_i >= 0`` of ``J^T J`` (symmetric eigensolver) this is
    ``sum_i beta lambda_i / (beta lambda_i + alpha)``: each direction counts by how much the
    data, rather than the prior, determines it. No inverse is formed, so the sum stays
    accurate when ``alpha`` is small.

    The eigenvalues are computed in float64. Those at or below ``eps * trace(J^T J)``
    (``eps`` of ``gram``'s dtype) count as 0:
    ``J^T J`` formed in floating point is exact only to about that level (the damping floor of
    :class:`~marquardt.chunked.AccumulatedNormalEquations`), so the directions the data leaves
    undetermined come out as rounding of that size, not 0. Counted, they took ``gamma`` past
    ``rank(J) <= N`` when ``alpha`` is small (142.8 effective parameters for 20 errors from a
    float32 ``J^T J``), and ``beta = (N - gamma) / (2 E_D)`` went negative.

    Examples
    --------
    >>> effective_parameters(torch.diag(torch.tensor([3.0, 1.0, 0.0])), alpha=1.0, beta=1.0)
    1.25
    """
    eps = torch.finfo(gram.dtype).eps  # of the precision it was formed in
    # Solved in float64 whatever the dtype (LAPACK has no half-precision eigensolver): a float32
    # eigensolver's own error (measured 2.8e-3 next to 2.9e3 for a 1,027-parameter network)
    # exceeds the level of the matrix's rounding, and would count as parameters again.
    gram = gram.to(torch.float64)
    eigenvalues = torch.linalg.eigvalsh(gram)
    resolved = eigenvalues > eps * float(gram.diagonal().sum())
    eigenvalues = torch.where(resolved, eigenvalues, 0.0) * beta
    return float((eigenvalues / (eigenvalues + alpha)).sum())


def update_state(state: BayesianState, gram: Tensor, sse: float, ssw: float, n_errors: int) -> BayesianState:
    """Re-estimate after an accepted step: ``gamma`` with the old ``alpha, beta``, then the new ones.

    ``gram`` is ``J^T J`` at the new weights, ``sse`` and ``ssw`` are ``E_D`` and ``E_W`` there.
    """
    gamma = effective_parameters(gram, state.alpha, state.beta)
    alpha, beta = _hyperparameters(gamma, n_errors, sse, ssw)
    return BayesianState(alpha, beta, gamma, sse, ssw)


def data_gram(system: Any) -> Tensor:
    """``J^T J`` of a linear system from :mod:`marquardt.linalg`: in the dtype it was assembled in
    (float64 for a small float32/float16/bfloat16 problem, whose
    :class:`~marquardt.chunked.PromotedEquations` would hand it back rounded to the problem's
    dtype), or formed in float64 when the system holds rows only (sample space)."""
    system = _assembled(system)
    gram = getattr(system, "gram", None)
    if gram is not None:
        return gram
    # Sample space holds the rows in the problem's dtype: J^T J is formed from them in float64
    # (a float16 one failed in Cholesky). Past PROMOTE_MAX_PARAMS a float32 one was formed in
    # float32, as the normal form assembles it: its rounding hid the smallest data directions
    # from gamma (a 1-342-1 network interpolated the noise where float64 regularizes), and the
    # QR fallback of the stacked float32 system failed in LAPACK's SVD. With fewer rows than
    # parameters this costs m n^2, little next to gamma's O(n^3) eigenvalues.
    jac = system.jac.to(torch.float64)
    return jac.T @ jac


def _assembled(system: Any) -> Any:
    """The system as it was assembled: the wide one inside a
    :class:`~marquardt.chunked.PromotedEquations` (see :func:`~marquardt.chunked.accumulation_dtype`)."""
    return system.system if isinstance(system, PromotedEquations) else system


@dataclass
class RegularizedProblem:
    """``F / 2`` as a least-squares problem: residuals ``[sqrt(beta) e; sqrt(alpha) w]``.

    Parameters
    ----------
    problem : Problem
        The data problem, with cost ``E_D / 2``.
    alpha, beta : float
        The current hyperparameters.

    Notes
    -----
    The LM step on this problem solves MATLAB ``trainbr``'s system

    .. math:: (\\beta J^T J + \\alpha I + \\mu I)\\, \\Delta w = -(\\beta J^T e + \\alpha w).

    Examples
    --------
    >>> from marquardt.solver import FunctionProblem
    >>> data = FunctionProblem(lambda x: x - 1.0, None, 2)
    >>> problem = RegularizedProblem(data, alpha=1.0, beta=1.0)
    >>> x = torch.zeros(2, dtype=torch.float64)
    >>> lin = problem.linearize(x)
    >>> step = lin.system.solve(lin.grad, 0.0, torch.ones(2, dtype=torch.float64))
    >>> [round(v, 12) for v in (x + step).tolist()]  # halfway between the data (1) and the prior (0)
    [0.5, 0.5]
    """

    problem: Problem
    alpha: float
    beta: float

    def cost(self, x: Tensor) -> float:
        """``(beta E_D + alpha E_W) / 2``; ``inf`` when the data cost is not finite."""
        data = self.problem.cost(x)
        return self.beta * data + 0.5 * self.alpha * float(x @ x) if math.isfinite(data) else math.inf

    def linearize(self, x: Tensor) -> Linearization:
        """The regularized system at ``x``."""
        return self.regularize(self.problem.linearize(x), x)

    def regularize(self, lin: Linearization, x: Tensor) -> Linearization:
        """Turn the data problem's linearization at ``x`` into this problem's.

        The system is assembled and solved in the dtype the data system was assembled in, as
        ``"lm"`` solves: a small float16 or bfloat16 network's ``J^T J`` is formed in float64
        (:func:`~marquardt.chunked.accumulation_dtype`), and a half-precision matrix, which
        has no Cholesky factorization in torch, is never formed.
        """
        data = _assembled(lin.system)
        gram = data_gram(data)
        wide = gram.dtype
        eye = torch.eye(x.numel(), dtype=wide, device=x.device)
        gram = self.beta * gram + self.alpha * eye
        grad = self.beta * lin.grad + self.alpha * x
        cost = self.beta * lin.cost + 0.5 * self.alpha * float(x @ x)
        jac = getattr(data, "jac", None)
        residuals = getattr(data, "residuals", None)
        if jac is None or residuals is None:
            system = NormalEquations(gram)
        else:
            # Rows held: the QR fallback solves the stacked least-squares system itself.
            root_alpha, root_beta = math.sqrt(self.alpha), math.sqrt(self.beta)
            jac = torch.cat([root_beta * jac, root_alpha * eye])
            residuals = torch.cat([root_beta * residuals, root_alpha * x.to(wide)])
            system = NormalEquations(gram, jac, residuals)
        if wide != grad.dtype:
            # Seen by the LM loop in the problem's dtype, as the data system was.
            system = PromotedEquations(system, grad.dtype)
            jac, residuals = system.jac, system.residuals
        return Linearization(cost, grad, system, residuals, jac)
