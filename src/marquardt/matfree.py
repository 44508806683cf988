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

from .chunked import single_thread

__all__ = [
    "CGResult",
    "GalerkinSpace",
    "MatrixFreeEquations",
    "conjugate_gradient",
    "curvature_sample_size",
    "eisenstat_walker",
    "float64_norm",
    "scaled_products",
    "warm_start",
]

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
    bnorm = float64_norm(rhs)
    target = rtol * bnorm
    rnorm = float64_norm(residual)
    if rnorm <= target or bnorm == 0.0:
        return CGResult(x, product, iterations, rnorm, "tolerance")
    z = _precondition(residual, preconditioner)
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
        rnorm = float64_norm(residual)
        models.append(_model(x, residual, rhs))
        if rnorm <= target:
            reason = "tolerance"
            break
        if _stalled(models, i, stall_window, stall_tol):
            reason = "stalled"
            break
        z = _precondition(residual, preconditioner)
        rz_next = float(residual @ z)
        direction.mul_(rz_next / rz).add_(z)
        rz = rz_next
    return CGResult(x, product, iterations, rnorm, reason)


def float64_norm(vector: Tensor) -> float:
    """``||v||``, summed in float64: torch sums float32 squares in float32, and a float32 gradient
    of norm past 1.8e19 (unscaled inputs) read as inf, so the forcing test ``inf <= inf`` passed
    at once with a zero step. Every matrix-free front end reads its norms through this.

    Examples
    --------
    >>> v = torch.tensor([3e19, 4e19])  # float32
    >>> float(torch.linalg.vector_norm(v)), float64_norm(v)
    (inf, 5.0000000562239226e+19)
    """
    return float(torch.linalg.vector_norm(vector, dtype=torch.float64))


def _precondition(residual: Tensor, preconditioner: Tensor | None) -> Tensor:
    return residual if preconditioner is None else residual / preconditioner


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


def warm_start(previous: tuple[Tensor | None, float, float] | None, grad_norm: float,
               x: Tensor) -> tuple[Tensor | None, float]:
    """The first vector and the forcing term of a matrix-free solve at ``x``, from what the last
    solve left: ``(step, grad_norm, forcing)``, ``step`` the last accepted step (or None).

    The rule of every matrix-free front end (``fit``'s :class:`~marquardt.network.ModuleProblem`
    and the :class:`~marquardt.optim.LevenbergMarquardt` optimizer's graph path): start from the
    last accepted step where it still lives in ``x``'s space (same shape, dtype and device), and
    stop at Eisenstat & Walker's choice 2 (:func:`eisenstat_walker`; 0.5 at the first solve).

    Examples
    --------
    >>> x = torch.zeros(3)
    >>> warm_start(None, 1.0, x)
    (None, 0.5)
    >>> start, forcing = warm_start((torch.ones(3), 1.0, 0.3), 0.1, x)
    >>> start.tolist(), round(forcing, 6)
    ([1.0, 1.0, 1.0], 0.009)
    >>> warm_start((torch.ones(2), 1.0, 0.3), 0.1, x)[0] is None  # parameters frozen since
    True
    """
    if previous is None:
        return None, eisenstat_walker(grad_norm, None, None)
    start, previous_norm, previous_forcing = previous
    if start is not None and (start.shape, start.dtype, start.device) != (x.shape, x.dtype, x.device):
        # Parameters frozen since (another shape), or the model converted in place (net.double(),
        # .to(device)): the last step no longer lives where this solve does.
        start = None
    return start, eisenstat_walker(grad_norm, previous_norm, previous_forcing)


class GalerkinSpace:
    """An orthonormal basis ``V`` with the products ``A V``, for Galerkin solves of damped systems.

    ``A = J^T J`` is fixed for one linearization; the damped system ``(A + damping D) h = b``
    changes with every damping value the LM loop tries. Restricted to a subspace with orthonormal
    basis ``V`` (``k`` rows), the solution is ``h = V^T y`` with the ``k x k`` system
    ``(V A V^T + damping V D V^T) y = V b``: one product with ``A`` per basis vector, then any
    number of damping values at ``O(k^2 n)`` each. Expanding by residuals of the damped system
    builds the Krylov space of ``A`` and ``b`` (shifts do not change it when ``D`` is a multiple
    of the identity), so each solve is the conjugate-gradient iterate on that space; a warm-start
    vector added first makes it CG from the best multiple of the warm start, augmented.
    Directions are orthogonalized twice against the basis (full reorthogonalization: cheap next
    to a product, and it keeps float32 Krylov bases orthogonal).

    Examples
    --------
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> space = GalerkinSpace(lambda v: A @ v, torch.tensor([1.0, 0.0], dtype=torch.float64), capacity=2)
    >>> space.expand(space.rhs), space.expand(torch.tensor([0.0, 1.0], dtype=torch.float64))
    (True, True)
    >>> x, _, residual = space.solve(1.0, torch.ones(2, dtype=torch.float64))
    >>> torch.allclose((A + torch.eye(2, dtype=torch.float64)) @ x, space.rhs), float(residual.norm()) < 1e-12
    (True, True)
    """

    def __init__(self, product: Operator, rhs: Tensor, capacity: int) -> None:
        self.product, self.rhs, self.capacity = product, rhs, capacity
        self.basis = rhs.new_empty(capacity, rhs.numel())
        self.images = rhs.new_empty(capacity, rhs.numel())
        # The projected matrix is small: kept in float64 so the k x k solves never add error.
        self.projected = torch.zeros(capacity, capacity, dtype=torch.float64, device=rhs.device)
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    def expand(self, direction: Tensor) -> bool:
        """Add ``direction`` (orthogonalized) and its product; ``False`` if full, already spanned,
        or its product is not finite (the basis is left as it was)."""
        if self.full:
            return False
        # Vector bookkeeping (O(k n)) runs on one thread; only the product uses them all.
        with single_thread():
            vector = self._orthonormal(direction)
        if vector is None:
            return False
        image = self.product(vector)
        if not bool(torch.isfinite(image).all()):
            # A NaN or inf in the projected matrix made every later solve on this basis fail
            # (LAPACK's gelsy refused it with an internal assertion out of fit).
            return False
        with single_thread():
            k = self.size
            self.basis[k], self.images[k] = vector, image
            column = (self.basis[: k + 1] @ image).double()
            self.projected[k, : k + 1] = column
            self.projected[: k + 1, k] = column
            self.size = k + 1
        return True

    def _orthonormal(self, direction: Tensor) -> Tensor | None:
        basis = self.basis[: self.size]
        vector = direction.clone()
        for _ in range(2):
            vector -= (basis @ vector) @ basis
        norm, scale = float64_norm(vector), float64_norm(direction)
        if not (math.isfinite(norm) and norm > 100 * torch.finfo(vector.dtype).eps * scale):
            return None
        return vector / norm

    def solve(self, damping: float, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(h, y, residual)``: the Galerkin solution of ``(A + damping diag(scale)) h = b``."""
        with single_thread():
            return self._solve(damping, scale)

    def _solve(self, damping: float, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = self.size
        basis = self.basis[:k]
        matrix = self.projected[:k, :k]
        if bool((scale == scale[0]).all()):
            damped = matrix + damping * float(scale[0]) * torch.eye(k, dtype=matrix.dtype, device=matrix.device)
        else:
            damped = matrix + damping * ((basis * scale) @ basis.T).double()
        coefficients = (basis @ self.rhs).double()
        y = _small_solve(damped, coefficients)
        narrow = y.to(self.rhs.dtype)
        step = narrow @ basis
        residual = self.rhs - narrow @ self.images[:k] - damping * scale * step
        return step, y, residual

    def curvature(self, y: Tensor) -> Tensor:
        """``h^T A h`` for ``h = V^T y``."""
        k = self.size
        return y @ (self.projected[:k, :k] @ y)


def _small_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    if matrix.device.type != "cpu":
        # CUDA's only lstsq driver, gels, assumes full rank, which is what just failed: the
        # projected matrix is at most (cg_max_iter + 1) square, so it is solved on the CPU.
        return torch.linalg.lstsq(matrix.cpu(), rhs.cpu().unsqueeze(1)).solution.squeeze(1).to(matrix.device)
    return torch.linalg.lstsq(matrix, rhs.unsqueeze(1)).solution.squeeze(1)


def curvature_sample_size(n_samples: int, *, floor: int = 2000, fraction: float = 0.1) -> int:
    """Samples used for the products ``J^T J v``: all up to ``floor``, else ``max(floor, fraction * n)``.

    A product costs two passes over its samples, the gradient two over all of them: with a
    tenth of the samples, twenty products cost about as much as the gradient and the trial
    costs of one iteration, so the solve no longer dominates, while a few thousand samples still
    give a curvature estimate whose directions the gain-ratio test can trust.

    Examples
    --------
    >>> curvature_sample_size(1500), curvature_sample_size(20_000), curvature_sample_size(50_000)
    (1500, 2000, 5000)
    """
    if n_samples <= floor:
        return n_samples
    return max(floor, int(fraction * n_samples))


def scaled_products(jvp: Operator, vjp: Operator, diagonal: Callable[[], Tensor], factor: float
                    ) -> tuple[Operator, Operator, Callable[[], Tensor]]:
    """Products of ``sqrt(factor) J``: ``J^T J`` estimated from a subset, scaled to the whole set.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 2.0]])
    >>> jvp, vjp, diag = scaled_products(lambda v: J @ v, lambda u: J.T @ u, lambda: (J * J).sum(0), 4.0)
    >>> vjp(jvp(torch.tensor([1.0, 0.0]))).tolist(), diag().tolist()
    ([4.0, 8.0], [4.0, 16.0])
    """
    if factor == 1.0:
        return jvp, vjp, diagonal
    root = math.sqrt(factor)
    return (lambda v: jvp(v) * root), (lambda u: vjp(u) * root), (lambda: diagonal() * factor)


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
        Warm start (e.g. the previous iteration's step): the first basis vector.
    rtol : float
        Forcing term: a solve stops when the linear residual is below ``rtol * ||grad||``.
    max_iter : int
        Most conjugate-gradient iterations for this linearization, over all solves. The basis
        holds ``max_iter + 1`` vectors, one product ``J^T J v`` each: the warm start and
        ``max_iter`` Krylov directions, or ``max_iter + 1`` Krylov directions without a warm start
        (``fit``'s ``cg_max_iter = 20`` makes at most 21 products a linearization).
    precondition : bool
        Expand the basis by Jacobi-preconditioned residuals, ``r / (diag(J^T J) + damping * scale)``.
        Network problems (:class:`~marquardt.network.ModuleProblem`) turn it off: there the plain
        Krylov space of ``J^T J`` gave steps the gain-ratio test accepted far more often (a
        truncated Krylov solve is itself a regularizer, weighted towards the large-curvature
        directions).
    stall_tol : float
        Martens' progress test (see :func:`conjugate_gradient`); 0 turns it off.

    Attributes
    ----------
    iterations : int
        Products made by the last solve (0 when a retry was solved on the existing basis).
    reason : str
        Why the last solve stopped: ``"tolerance"``, ``"stalled"``, ``"max_iter"`` (basis full)
        or ``"breakdown"`` (no new direction, or a product that is not finite: the step is then
        the solve on the basis made so far, NaN when that is empty).

    Notes
    -----
    The solves are Galerkin solves on a growing orthonormal basis (:class:`GalerkinSpace`):
    with ``D`` a multiple of the identity and no preconditioning the basis is the Krylov space of
    ``J^T J`` and ``g``, and each solution is exactly the conjugate-gradient iterate. Keeping the
    basis makes the LM loop's retries with more damping nearly free (no new product unless the
    forcing test fails), and ``curvature(h)`` of the step just solved is ``y^T (V J^T J V^T) y``,
    also free. Memory: ``2 (max_iter + 1)`` vectors of ``n``.

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
    _last: tuple[Tensor, Tensor | None] | None = field(default=None, init=False, repr=False)
    _space: GalerkinSpace | None = field(default=None, init=False, repr=False)

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` (computed on first use)."""
        if callable(self.gram_diagonal):
            self.gram_diagonal = self.gram_diagonal()
        return self.gram_diagonal

    def gram_product(self, vector: Tensor) -> Tensor:
        """``J^T J v``."""
        return self.vjp(self.jvp(vector))

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """An inexact damped Gauss-Newton step; ``residuals`` is accepted for the interface and unused.

        A retry with another damping value reuses every product made so far: it first solves on
        the existing basis, and expands it only while the forcing test fails.
        """
        if not bool(torch.isfinite(grad).all()):
            # An inf or NaN gradient (a derivative that overflowed) spans no Krylov space: CG would
            # stop at once with a zero step, which the LM loop takes for a tiny step and spends
            # one epoch per damping increase on. A NaN step is a failed trial, as in the exact forms.
            self.iterations, self.reason, self._last = 0, "breakdown", None
            return torch.full_like(grad, math.nan)
        reused = self._space is not None and torch.equal(self._space.rhs, -grad)
        space = self._space if reused else self._new_space(grad)
        target = self.rtol * float64_norm(grad)
        before, models, reason = space.size if reused else 0, [0.0], "max_iter"
        step, y = torch.zeros_like(grad), None
        residual = space.rhs
        while True:
            if space.size:
                step, y, residual = space.solve(damping, scale)
                models.append(-0.5 * float((space.basis[: space.size] @ space.rhs).double() @ y))
            with single_thread():
                converged = float64_norm(residual) <= target
            if converged:
                reason = "tolerance"
                break
            if _stalled(models, len(models) - 1, 0.1, self.stall_tol):
                reason = "stalled"
                break
            if space.full:
                break
            direction = self._direction(residual, damping, scale)
            if not space.expand(direction):
                reason = "breakdown"
                break
        self.iterations, self.reason = space.size - before, reason
        if y is None and reason == "breakdown":
            # Not even the first direction has a finite product: no step to give, and a zero one
            # reads as converged to the LM loop. A NaN step is a failed trial (more damping).
            self._last = None
            return torch.full_like(grad, math.nan)
        self._last = (step, y)
        return step.clone()

    def _direction(self, residual: Tensor, damping: float, scale: Tensor) -> Tensor:
        if not self.precondition:
            return residual
        diagonal = self.diagonal()
        with single_thread():
            return residual / (diagonal + damping * scale)

    def _new_space(self, grad: Tensor) -> GalerkinSpace:
        self._space = GalerkinSpace(self.gram_product, -grad, self.max_iter + 1)
        # The basis is in the gradient's dtype: a warm start made in the parameters' float32
        # (x - previous_x) for a tiny network worked in float64 failed in addmv at the next step.
        start = None if self.initial is None else self.initial.to(grad)
        if start is not None and bool(torch.isfinite(start).all()) and float(torch.linalg.vector_norm(start)) > 0:
            self._space.expand(start)
        return self._space

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``: from the projected matrix for the step just solved, else one ``J h``."""
        if self._last is not None and self._last[1] is not None and torch.equal(step, self._last[0]):
            return self._space.curvature(self._last[1]).to(step.dtype)
        value = self.jvp(step)
        return value @ value
