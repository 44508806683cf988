"""Damped linear solves for the Levenberg-Marquardt step: pure tensor code.

Every system answers the same three questions for the LM loop:

* ``solve(grad, damping, scale)``: the step ``h`` with ``(J^T J + damping * diag(scale)) h = -grad``;
* ``curvature(h)``: ``h^T J^T J h``, for the predicted reduction of the quadratic model;
* ``diagonal()``: ``diag(J^T J)``, for Jacobi scaling and the first damping value.

:class:`NormalEquations` holds ``J^T J`` (formed once per iteration; a retried damping value
only refactors it) and solves by Cholesky, falling back to a least-squares solve of the
augmented system ``[J; sqrt(damping * scale)] h = [-r; 0]`` (QR/SVD, the condition number of
``J`` rather than its square) when Cholesky fails or the factor is poorly conditioned.
:class:`SampleSpaceEquations` solves ``h = -J^T (J J^T + damping I)^{-1} r`` in the (smaller)
space of residuals, for problems with fewer residuals than parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def cholesky_or_none(matrix: Tensor) -> Tensor | None:
    """Lower Cholesky factor of ``matrix``, or ``None`` when it fails or is ill-conditioned.

    The condition test uses the diagonal of the factor of the unit-diagonal matrix
    ``D^-1/2 A D^-1/2`` (``D = diag(A)``), which is ``L_ii / sqrt(A_ii)``: the squared ratio of
    its smallest to its largest entry estimates ``1 / cond`` from below; when it is under
    ``100 * eps`` the normal equations have lost the accuracy a QR solve on ``J`` would keep.
    Scaling first makes the test blind to the parameters' units, as the solve itself is
    (Cholesky is exact under diagonal scaling): unscaled, a float32 fit whose parameters
    differ by 10^4 in size left Cholesky for a QR solve that dropped the large parameter's
    direction, and stalled.

    Examples
    --------
    >>> cholesky_or_none(torch.eye(2, dtype=torch.float64)).diagonal().tolist()
    [1.0, 1.0]
    >>> cholesky_or_none(torch.tensor([[1.0, 2.0], [2.0, 1.0]])) is None
    True
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    diag = factor.diagonal()
    if not bool(torch.isfinite(diag).all()):
        return None
    diag = diag / matrix.diagonal().sqrt()
    ratio = (diag.min() / diag.max()) ** 2
    if float(ratio) < 100 * torch.finfo(matrix.dtype).eps:
        return None
    return factor


def damped_lstsq(jac: Tensor, residuals: Tensor, damping: float, scale: Tensor) -> Tensor:
    """Minimum-norm solution of ``[J; sqrt(damping * scale)] h = [-r; 0]`` (QR/SVD path).

    Solved for ``C^-1 h`` with the columns of the augmented matrix scaled to unit norm by
    ``C``, so that the SVD's rank cutoff (``eps * max(m, n)`` of the largest singular value)
    does not depend on the parameters' units; a zero column keeps scale 1.

    Examples
    --------
    >>> J = torch.tensor([[1e4, 0.0], [0.0, 1e-4], [1e4, 1e-4]], dtype=torch.float64)
    >>> r = torch.tensor([1e4, 1e-4, 0.0], dtype=torch.float64)
    >>> h = damped_lstsq(J, r, 0.0, torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(h, torch.linalg.lstsq(J, -r[:, None]).solution[:, 0])
    True
    """
    n = jac.shape[1]
    lower = torch.diag(torch.sqrt(damping * scale))
    augmented = torch.cat([jac, lower])
    norms = torch.linalg.vector_norm(augmented, dim=0)
    columns = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
    rhs = torch.cat([-residuals, residuals.new_zeros(n)]).unsqueeze(1)
    scaled = augmented * columns
    if not bool(torch.isfinite(scaled).all()):
        # An overflowed damping scale (inf * 0): LAPACK's gelsd refuses a NaN with an internal
        # assertion.
        return no_step(n, jac)
    drivers = ("gelsd", "gelsy") if augmented.device.type == "cpu" else ("gels",)
    for driver in drivers:
        try:
            return columns * torch.linalg.lstsq(scaled, rhs, driver=driver).solution.squeeze(1)
        except torch.linalg.LinAlgError:
            # LAPACK's SVD (gelsd) can fail to converge: it did on the stacked float32 system of a
            # 1-342-1 network, mid-training. Pivoted QR (gelsy) solves the same problem; where
            # nothing does, the trial fails and the damping rises, as for any failed solve.
            continue
    return no_step(n, jac)


def no_step(n: int, like: Tensor) -> Tensor:
    """A NaN step of ``n`` entries: what the LM loop takes for a failed trial (the point is kept
    and the damping rises), returned where a system has no solution to give.

    Examples
    --------
    >>> no_step(2, torch.zeros(3, dtype=torch.float64))
    tensor([nan, nan], dtype=torch.float64)
    """
    return torch.full((n,), float("nan"), dtype=like.dtype, device=like.device)


def damped_eigh_solve(gram: Tensor, grad: Tensor, damping: float, scale: Tensor) -> Tensor:
    """Pseudo-inverse solve of the damped normal equations, for when no ``J`` is held.

    A non-finite system (an inf or NaN in ``J``: a derivative that overflowed, ``sqrt`` at 0)
    gives :func:`no_step`: LAPACK's ``?syevd`` raises on it instead of solving.
    """
    if not (bool(torch.isfinite(gram).all()) and bool(torch.isfinite(grad).all())):
        return no_step(grad.shape[0], grad)
    matrix = gram + torch.diag(damping * scale)
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = values.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    return -(vectors @ (inverse * (vectors.T @ grad)))


@dataclass
class NormalEquations:
    """The damped normal equations ``(J^T J + damping * diag(scale)) h = -grad``.

    Parameters
    ----------
    gram : Tensor
        ``J^T J``, shape ``(n, n)``.
    jac, residuals : Tensor, optional
        When given, the QR fallback solves the augmented least-squares system instead of the
        eigen-decomposition of the damped ``gram``.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    >>> r = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    >>> system = NormalEquations(J.T @ J, J, r)
    >>> system.solve(J.T @ r, 0.0, torch.ones(2, dtype=torch.float64)).tolist()
    [-1.0, -0.5]
    """

    gram: Tensor
    jac: Tensor | None = None
    residuals: Tensor | None = None
    path: str = field(default="cholesky", init=False)
    name = "cholesky"

    def diagonal(self) -> Tensor:
        """``diag(J^T J)``."""
        return self.gram.diagonal()

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The damped Gauss-Newton step; records the path taken in ``self.path``.

        ``residuals`` (with ``grad = J^T residuals``) replaces the held residuals, as the
        geodesic correction needs; without it the held ones are used.
        """
        factor = cholesky_or_none(self.gram + torch.diag(damping * scale))
        if factor is not None:
            self.path = "cholesky"
            return -torch.cholesky_solve(grad.unsqueeze(1), factor).squeeze(1)
        residuals = self.residuals if residuals is None else residuals
        if self.jac is not None and residuals is not None:
            self.path = "qr"
            return damped_lstsq(self.jac, residuals, damping, scale)
        self.path = "eigh"
        return damped_eigh_solve(self.gram, grad, damping, scale)

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``."""
        return step @ (self.gram @ step)


@dataclass
class SampleSpaceEquations:
    """The LM step in residual space: ``h = -S J^T (J S J^T + damping I)^{-1} r``, ``S = diag(1/scale)``.

    Equal to the normal-equations step (push-through identity) but factors an ``m x m`` matrix,
    which is cheaper when there are fewer residuals ``m`` than parameters ``n``.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    >>> r = torch.tensor([5.0], dtype=torch.float64)
    >>> SampleSpaceEquations(J, r).solve(J.T @ r, 0.0, torch.ones(3, dtype=torch.float64)).tolist()
    [-1.0, -2.0, -0.0]
    """

    jac: Tensor
    residuals: Tensor
    path: str = field(default="sample-space", init=False)
    name = "sample-space"
    _cache: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` without forming ``J^T J``."""
        return (self.jac * self.jac).sum(dim=0)

    def _scaled_gram(self, scale: Tensor) -> Tensor:
        # J S J^T is formed once per scale (once per iteration); damping retries reuse it.
        if self._cache is None or not torch.equal(self._cache[0], scale):
            scaled = self.jac / scale
            self._cache = (scale.clone(), scaled @ self.jac.T)
        return self._cache[1]

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The damped Gauss-Newton step, computed in residual space.

        The right-hand side is ``residuals`` (default: the held ones), with ``grad = J^T residuals``.
        """
        residuals = self.residuals if residuals is None else residuals
        small = self._scaled_gram(scale)
        eye = torch.eye(small.shape[0], dtype=small.dtype, device=small.device)
        factor = cholesky_or_none(small + damping * eye)
        if factor is not None:
            self.path = "sample-space"
            coeffs = torch.cholesky_solve(residuals.unsqueeze(1), factor).squeeze(1)
            return -(self.jac.T @ coeffs) / scale
        self.path = "qr"
        return damped_lstsq(self.jac, residuals, damping, scale)

    def curvature(self, step: Tensor) -> Tensor:
        """``||J h||^2``."""
        product = self.jac @ step
        return product @ product


def make_system(jac: Tensor, residuals: Tensor) -> NormalEquations | SampleSpaceEquations:
    """Pick the cheaper exact system for a held Jacobian: residual space when ``m < n``."""
    m, n = jac.shape
    if m < n:
        return SampleSpaceEquations(jac, residuals)
    return NormalEquations(jac.T @ jac, jac, residuals)


def unit_column_svd(jac: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Thin SVD of ``J`` with unit-norm columns: ``U, s, V^T``, the column norms and the mask of
    the singular values kept.

    Normalising the columns first makes the rank decision (singular values under
    ``eps * max(m, n)`` times the largest are dropped, as LAPACK's ``gelsd`` does) independent of
    the units of the parameters; the dropped rows of ``V^T`` span the numerical null space.

    Examples
    --------
    >>> J = torch.tensor([[1e6, 0.0], [0.0, 1e-6], [0.0, 0.0]], dtype=torch.float64)
    >>> u, s, vt, norms, keep = unit_column_svd(J)
    >>> s.tolist(), norms.tolist(), keep.tolist()
    ([1.0, 1.0], [1000000.0, 1e-06], [True, True])
    """
    norms = torch.linalg.vector_norm(jac, dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    u, s, vt = _thin_svd(jac / norms)
    cutoff = torch.finfo(jac.dtype).eps * max(jac.shape) * (s[0] if s.numel() else 0.0)
    return u, s, vt, norms, s > cutoff


def _thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD, factorising the tall orientation (LAPACK is several times slower on wide input)."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, ut = torch.linalg.svd(matrix.T, full_matrices=False)
    return ut.T, s, v.T


def gauss_newton_step(jac: Tensor, residuals: Tensor) -> Tensor:
    """The undamped step: the minimum-norm ``h`` minimising ``||J h + r||`` (SVD, rank-revealing).

    Examples
    --------
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    >>> gauss_newton_step(J, torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)).tolist()
    [-1.0, -0.5]
    """
    u, s, vt, norms, keep = unit_column_svd(jac)
    return -(vt[keep].T @ ((u[:, keep].T @ residuals) / s[keep])) / norms


def range_cosine(jac: Tensor, residuals: Tensor) -> float:
    """Cosine of the angle between ``r`` and the range of ``J``: ``||P r|| / ||r||``.

    ``P`` projects onto the numerical range of ``J``. The square is the share of the cost the
    undamped Gauss-Newton model can still remove, ``(cost - min_h 0.5 ||J h + r||^2) / cost``;
    the cosine bounds MINPACK's per-column cosines (:func:`cosine_optimality`) from above, and
    unlike them it is not fooled by nearly parallel columns.

    Examples
    --------
    >>> J = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> range_cosine(J, torch.tensor([3.0, 4.0], dtype=torch.float64))
    0.6
    """
    rnorm = float(torch.linalg.vector_norm(residuals))
    if rnorm == 0.0:
        return 0.0
    u, _, _, _, keep = unit_column_svd(jac)
    return float(torch.linalg.vector_norm(u[:, keep].T @ residuals)) / rnorm


def damping_for_radius(jac: Tensor, residuals: Tensor, scale: Tensor, radius: float) -> float:
    """The damping whose step has scaled length ``radius``: ``||sqrt(scale) * h(damping)|| = radius``.

    ``h(damping)`` solves ``(J^T J + damping * diag(scale)) h = -J^T r``. Returns ``0.0`` when the
    undamped (minimum-norm) step is already within ``radius``. This is how Moré's trust-region
    form of Levenberg-Marquardt picks its damping; the length is monotone in the damping, so a
    bisection on the SVD of ``J diag(scale)^(-1/2)`` finds it (to 0.1%, from the side whose step
    is within ``radius``) with one factorisation.

    Examples
    --------
    >>> J = torch.eye(2, dtype=torch.float64)
    >>> r = torch.tensor([3.0, 4.0], dtype=torch.float64)
    >>> round(damping_for_radius(J, r, torch.ones(2, dtype=torch.float64), 2.5), 2)  # 5 / (1 + d) = 2.5
    1.0
    """
    root = scale.sqrt()
    u, s, _ = _thin_svd(jac / root)
    cutoff = torch.finfo(jac.dtype).eps * max(jac.shape) * (s[0] if s.numel() else 0.0)
    s = torch.where(s > cutoff, s, torch.zeros_like(s))
    projected = (u.T @ residuals) * s  # components of the scaled gradient

    def length(damping: float) -> float:
        denominator = s**2 + damping
        terms = torch.where(denominator > 0, projected / denominator, torch.zeros_like(projected))
        return float(torch.linalg.vector_norm(terms))

    if not length(0.0) > radius:
        return 0.0
    high = float(torch.linalg.vector_norm(projected)) / radius  # length(d) <= ||projected|| / d
    low = high * torch.finfo(jac.dtype).eps
    if length(low) <= radius:
        return low
    while high / low > 1.001:  # geometric bisection: 16 halvings of log(high / low), O(n) each
        middle = math.sqrt(low * high)
        low, high = (middle, high) if length(middle) > radius else (low, middle)
    return high


def cosine_optimality(jac: Tensor, residuals: Tensor) -> float:
    """MINPACK's scale-free gradient test: ``max_j |J_j^T r| / (||J_j|| ||r||)``."""
    rnorm = torch.linalg.vector_norm(residuals)
    cnorm = torch.linalg.vector_norm(jac, dim=0)
    if float(rnorm) == 0.0:
        return 0.0
    cosines = (jac.T @ residuals).abs() / (cnorm * rnorm)
    cosines = torch.where(cnorm > 0, cosines, torch.zeros_like(cosines))
    return float(cosines.max()) if cosines.numel() else 0.0
