"""Assemble the LM linear system from Jacobian row chunks, and choose its form: pure tensor code.

Network problems produce their Jacobian a block of rows at a time (a chunk of samples). Which
system is built depends on the shape ``m x n`` of the Jacobian and on two memory budgets
(:func:`plan_assembly`):

* ``"sample-space"`` when there are fewer residuals than parameters and the whole Jacobian fits
  in ``max_jacobian_bytes``: the step is solved in the ``m x m`` space, from ``J J^T`` in closed
  form (:class:`KernelSampleSpaceEquations`, no row held) or from the held rows
  (:class:`HeldSampleSpaceEquations`);
* ``"normal"`` when the ``n x n`` matrix fits in ``max_matrix_bytes``: the chunks are folded into
  ``J^T J`` and ``J^T r`` and dropped, so memory is ``O(chunk * n + n^2)``, not ``O(m * n)``;
* ``"matrix-free"`` otherwise: neither ``J`` nor ``J^T J`` is formed; conjugate gradients use
  Jacobian-vector products (:mod:`marquardt.matfree`), memory ``O(m + n)`` plus activations.

``J^T J`` is accumulated as a symmetric rank-k update: on the CPU in float32/float64 by BLAS
``ssyrk``/``dsyrk`` on zero-copy numpy views (half the flops of a matrix product), elsewhere
(CUDA, other dtypes, no SciPy) by ``addmm``. The damped matrix is factorized likewise by LAPACK
``?potrf``/``?potrs`` on the CPU (:func:`cholesky_factor`), on as many OpenBLAS threads as last
proved faster (:class:`BlasThreadChoice`), else by ``torch.linalg.cholesky_ex``. Small float32
problems assemble and solve in float64 (:func:`accumulation_dtype`), and tiny ones run on one
thread (:func:`single_thread`).
See ``docs/performance.md`` for the memory each form needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import numpy as np
import torch
from torch import Tensor

from .linalg import NormalEquations, damped_eigh_solve

try:  # SciPy is optional: without it J^T J is a (twice as costly) matrix product
    from scipy.linalg.blas import dsymv as _dsymv
    from scipy.linalg.blas import dsyrk as _dsyrk
    from scipy.linalg.blas import ssymv as _ssymv
    from scipy.linalg.blas import ssyrk as _ssyrk
    from scipy.linalg.lapack import dpotrf as _dpotrf
    from scipy.linalg.lapack import dpotrs as _dpotrs
    from scipy.linalg.lapack import spotrf as _spotrf
    from scipy.linalg.lapack import spotrs as _spotrs
except ImportError:  # pragma: no cover - exercised only without SciPy
    _ssyrk = _dsyrk = _ssymv = _dsymv = None
    _spotrf = _dpotrf = _spotrs = _dpotrs = None

try:  # optional: without it OpenBLAS factorizes on its default thread count
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - exercised only without threadpoolctl
    ThreadpoolController = None

__all__ = [
    "ADAPTIVE_MIN_ORDER",
    "CHUNK_BYTES",
    "DEFAULT_JACOBIAN_BYTES",
    "DEFAULT_MATRIX_BYTES",
    "FORMS",
    "PROMOTE_MAX_PARAMS",
    "SERIAL_MAX_ENTRIES",
    "SERIAL_ORDER",
    "AccumulatedNormalEquations",
    "BlasThreadChoice",
    "CholeskyFactor",
    "HeldSampleSpaceEquations",
    "KernelSampleSpaceEquations",
    "Plan",
    "PromotedEquations",
    "accumulate_normal",
    "add_gradient",
    "accumulation_dtype",
    "assemble_sample_space",
    "cholesky_factor",
    "is_small",
    "normal_equations",
    "plan_assembly",
    "single_thread",
    "symmetric_rank_update",
]

_MIB = 1 << 20
_LAPACK_DTYPES = (torch.float32, torch.float64)


def _memory_share(fraction: float, low: int, high: int) -> int:
    """``fraction`` of the physical memory, clipped to ``[low, high]`` bytes (``low`` if unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return low
    return int(min(high, max(low, fraction * total)))


#: Default bound on the bytes of Jacobian rows held at once: 1/16 of the physical memory,
#: between 128 MiB and 1 GiB. The sample-space form needs the whole Jacobian within it.
DEFAULT_JACOBIAN_BYTES = _memory_share(1 / 16, 128 * _MIB, 1024 * _MIB)
#: Default bound on the ``n x n`` normal matrix: 1/16 of the physical memory, between 128 MiB
#: and 2 GiB. The normal form holds two such matrices (``J^T J`` and its damped copy, factorized
#: in place), three when torch factorizes; past the bound the matrix-free form is used.
DEFAULT_MATRIX_BYTES = _memory_share(1 / 16, 128 * _MIB, 2048 * _MIB)
#: Largest chunk of rows folded into ``J^T J`` at once: beyond a few thousand rows a bigger
#: rank-k update is no faster, only bigger.
CHUNK_BYTES = 64 * _MIB
#: The system forms, in the order :func:`plan_assembly` considers them.
FORMS = ("sample-space", "normal", "matrix-free")
#: Up to this many parameters a lower-precision problem's system is assembled and solved in
#: float64 (see :func:`accumulation_dtype`).
PROMOTE_MAX_PARAMS = 1024
#: Problems whose Jacobian has at most this many entries run their kernels on one thread
#: (see :func:`single_thread`).
SERIAL_MAX_ENTRIES = 1 << 18


@dataclass(frozen=True)
class Plan:
    """How to assemble the system for ``m`` residuals and ``n`` parameters.

    Attributes
    ----------
    form : {"sample-space", "normal", "matrix-free"}
        Keep all rows for the residual-space solve; accumulate ``J^T J`` chunk by chunk; or
        form neither (conjugate gradients on Jacobian products).
    chunk_rows : int
        Jacobian rows computed at once.
    serial : bool
        The problem is small enough (``m * n <= SERIAL_MAX_ENTRIES``) that its kernels should
        run on one thread (:func:`single_thread`).
    """

    form: str
    chunk_rows: int
    serial: bool = False


def plan_assembly(m: int, n: int, itemsize: int, max_bytes: int = DEFAULT_JACOBIAN_BYTES, *,
                  max_matrix_bytes: int = DEFAULT_MATRIX_BYTES, form: str = "auto") -> Plan:
    """Choose the system form and the chunk size for an ``m x n`` Jacobian.

    Parameters
    ----------
    m, n : int
        Residuals and parameters.
    itemsize : int
        Bytes per element (4 for float32).
    max_bytes : int
        Bytes of Jacobian rows held at once.
    max_matrix_bytes : int
        Bytes the ``n x n`` normal matrix may take.
    form : {"auto", "sample-space", "normal", "matrix-free"}
        ``"auto"``: sample-space when ``m < n`` and the whole ``m x n`` Jacobian fits in
        ``max_bytes``; else normal when ``n * n * itemsize <= max_matrix_bytes``; else
        matrix-free. Any other value forces that form (sample-space then ignores ``max_bytes``;
        normal still needs ``J^T J`` within ``max_matrix_bytes``).

    Raises
    ------
    ValueError
        For an unknown ``form``, or ``form="normal"`` with ``n * n * itemsize > max_matrix_bytes``.

    Examples
    --------
    >>> plan_assembly(1000, 61, 8, max_bytes=61 * 8 * 100)
    Plan(form='normal', chunk_rows=100, serial=True)
    >>> plan_assembly(10, 1000, 8)
    Plan(form='sample-space', chunk_rows=10, serial=True)
    >>> plan_assembly(20_000, 98_945, 4).form
    'matrix-free'
    """
    if form not in ("auto",) + FORMS:
        raise ValueError(f"Invalid solver form: {form!r}; expected 'auto' or one of {FORMS}.")
    row_bytes = max(1, n * itemsize)
    rows = max(1, min(m, min(max_bytes, CHUNK_BYTES) // row_bytes))
    if form == "normal" and n * row_bytes > max_matrix_bytes:
        raise ValueError(
            f"solver='normal' needs the {n} x {n} matrix J^T J ({n * row_bytes:,} bytes, and a factor of the "
            f"same size), more than max_matrix_bytes={max_matrix_bytes}; pass a larger max_matrix_bytes if the "
            "memory is there, or solver='auto' or 'matrix-free'.")
    if form == "auto":
        if m < n and m * row_bytes <= max_bytes:
            form = "sample-space"
        elif n * row_bytes <= max_matrix_bytes:
            form = "normal"
        else:
            form = "matrix-free"
    return Plan(form, rows, is_small(m, n))


def is_small(m: int, n: int) -> bool:
    """Whether an ``m x n`` Jacobian is small enough for one thread (``m * n <= SERIAL_MAX_ENTRIES``).

    Examples
    --------
    >>> is_small(1000, 61), is_small(5000, 4353)
    (True, False)
    """
    return m * n <= SERIAL_MAX_ENTRIES


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed torch kernels on one intra-op thread (the previous count is restored).

    On small problems every kernel is a few microseconds of work, and waking a second thread
    costs more than it saves; on a machine shared with other jobs it can cost a whole scheduler
    time slice (measured here: a 20,000-element ``tanh`` took 52 us on one thread and 16 ms on
    two under load). The setting is process-wide while the block runs, so other Python threads
    running torch at the same time are slowed, never wrong.

    Examples
    --------
    >>> before = torch.get_num_threads()
    >>> with single_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    previous = torch.get_num_threads()
    if not enabled or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def accumulation_dtype(dtype: torch.dtype, n: int) -> torch.dtype:
    """The dtype to assemble and solve the exact system in: float64 for small lower-precision problems.

    ``J^T J`` squares the condition number of ``J``: in float32 (``eps ~ 1.2e-7``) a Jacobian with
    ``cond(J) > ~3e3`` already gives a normal matrix whose Cholesky factor is meaningless, and
    training stalls far above the accuracy the float32 network itself can reach. Forming
    ``J^T J`` from the float32 rows in float64 costs little while ``n <= PROMOTE_MAX_PARAMS``
    (the per-step overhead dominates there), so small float32/float16/bfloat16 problems are
    promoted; larger ones stay in their own dtype, where the rank-k update is the bulk of a step,
    except float16/bfloat16, which LAPACK cannot factorize: those go to float32.

    Examples
    --------
    >>> accumulation_dtype(torch.float32, 61), accumulation_dtype(torch.float32, 4353)
    (torch.float64, torch.float32)
    >>> accumulation_dtype(torch.bfloat16, 4353)
    torch.float32
    """
    if dtype in (torch.float32, torch.float16, torch.bfloat16) and n <= PROMOTE_MAX_PARAMS:
        return torch.float64
    if dtype in (torch.float16, torch.bfloat16):
        # No CPU Cholesky or eigh in half precision ('"cholesky_cpu" not implemented for
        # Half'): a larger float16 network failed in its first step on every exact path.
        return torch.float32
    return dtype


class PromotedEquations:
    """A system assembled in a wider dtype, seen by the LM loop in the problem's dtype.

    ``solve`` and ``curvature`` cast their arguments up and their results down; ``gram``,
    ``jac`` and ``residuals`` (where the inner system holds them) come back in the problem's
    dtype, so code that rebuilds a system from them (regularization, reductions across
    processes) keeps working unchanged.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> system = PromotedEquations(NormalEquations(J.T @ J), torch.float32)
    >>> system.solve(torch.tensor([1.0, 4.0]), 0.0, torch.ones(2))
    tensor([-1., -1.])
    """

    def __init__(self, system, dtype: torch.dtype) -> None:
        self.system = system
        self.dtype = dtype
        self.wide = system.diagonal().dtype
        self.name = system.name

    @property
    def path(self) -> str:
        """The solver path the inner system last took."""
        return self.system.path

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` in the problem's dtype."""
        return self.system.diagonal().to(self.dtype)

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The inner system's step, computed in the wide dtype."""
        wide = None if residuals is None else residuals.to(self.wide)
        return self.system.solve(grad.to(self.wide), damping, scale.to(self.wide), wide).to(self.dtype)

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``, computed in the wide dtype."""
        return self.system.curvature(step.to(self.wide)).to(self.dtype)

    def _narrow(self, name: str) -> Tensor | None:
        value = getattr(self.system, name, None)
        return None if value is None else value.to(self.dtype)

    @property
    def gram(self) -> Tensor | None:
        return self._narrow("gram")

    @property
    def jac(self) -> Tensor | None:
        return self._narrow("jac")

    @property
    def residuals(self) -> Tensor | None:
        return self._narrow("residuals")


def symmetric_rank_update(gram: Tensor, jac: Tensor) -> None:
    """``gram += J^T J`` on the lower triangle; the strict upper triangle is not meaningful after.

    On the CPU in float32/float64 this is BLAS ``?syrk`` on numpy views of the same memory
    (``J^T`` of a C-contiguous ``J`` is Fortran-contiguous; the lower triangle of a C-ordered
    ``gram`` is the upper one of its Fortran-ordered transpose). Elsewhere, ``addmm`` on the
    whole matrix. :class:`AccumulatedNormalEquations` reads the lower triangle only.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> gram = torch.zeros(2, 2)
    >>> symmetric_rank_update(gram, J)
    >>> gram.tril().tolist()
    [[10.0, 0.0], [14.0, 20.0]]
    """
    rows = jac.detach().contiguous()
    syrk = _syrk(gram, rows)
    if syrk is None:
        gram.addmm_(jac.T, jac)
        return
    target = gram.numpy().T
    result = syrk(1.0, rows.numpy().T, beta=1.0, c=target, trans=0, lower=0, overwrite_c=1)
    if result.ctypes.data != target.ctypes.data:  # f2py copied: write back (never expected)
        gram.copy_(torch.from_numpy(result.T))


def _syrk(*tensors: Tensor):
    """BLAS ``?syrk`` for these CPU tensors of one float dtype (contiguous, no autograd), else None."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.requires_grad:
            return None
    return {torch.float32: _ssyrk, torch.float64: _dsyrk}.get(dtype)


def mirror_lower(gram: Tensor) -> None:
    """Make ``gram`` symmetric from its lower triangle (in place).

    Examples
    --------
    >>> gram = torch.tensor([[1.0, 9.0], [2.0, 3.0]])
    >>> mirror_lower(gram); gram.tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    """
    gram.tril_()
    gram += gram.tril(-1).T


class AccumulatedNormalEquations:
    """Normal equations folded from Jacobian rows that are no longer held.

    The same questions as :class:`~marquardt.linalg.NormalEquations` (``solve``, ``curvature``,
    ``diagonal``, ``path``, ``gram``), answered with the rows gone:

    * Only the lower triangle of ``J^T J`` is accumulated (:func:`symmetric_rank_update`); the
      products use it directly (BLAS ``?symv``) and the full matrix is mirrored only if someone
      asks for :attr:`gram`.
    * :class:`~marquardt.linalg.NormalEquations` refuses a Cholesky factor whose diagonal says the
      damped matrix is ill-conditioned, because with the rows at hand a QR solve on ``J`` is more
      accurate. Here its fallback would be an eigen-decomposition of the same matrix (ten times
      the work, only truncated), so any factorization that succeeds is used, as MATLAB's
      ``trainlm`` does; the eigen-decomposition takes over only when Cholesky fails.
    * ``J^T J`` formed in floating point is exact only to about ``eps * ||J^T J||``: in float32
      its smallest eigenvalues come out slightly negative (measured: ``-2e-3`` next to ``9e4``
      for the 4,353-parameter benchmark network), and a damping below that level makes the
      factorization fail. Each diagonal entry of the damped matrix is therefore at least
      ``eps * trace(J^T J)`` (``trace >= ||J^T J||``): below the precision of the matrix, and
      invisible whenever ``damping * scale`` is larger (the recorded damping is never changed).
    * A retry with more damping (the LM loop's answer to a rejected step) factorizes the damped
      matrix again, in the same workspace: ``J^T J`` is formed once per linearization and the
      ``n x n`` work matrix allocated once (a fresh 76 MB matrix for the 4,353-parameter
      network cost ~11 ms of page faults per trial); ``lower`` itself is never written. A retry
      whose damped diagonal is the same as the last one's (both damping values under the
      ``eps * trace`` floor, as MATLAB's ``mu = 1e-3`` then ``1e-2`` are for that network)
      reuses the last factor. (Iterating on the previous
      factor instead, as preconditioned conjugate gradients, took as long as a new factorization
      on the benchmark problems: each iteration reads the ``n x n`` factor twice.)

    The path is ``"cholesky"``, prefixed with ``"chunked-"`` when more than one chunk of rows
    was folded in, so that a training record shows that the Jacobian was never held whole.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1e-3]])  # float32, cond(J^T J) = 1e6
    >>> system = AccumulatedNormalEquations((J.T @ J).tril(), chunks=2)
    >>> step = system.solve(torch.tensor([1.0, 1e-6]), 1e-12, torch.ones(2))
    >>> [round(v, 1) for v in step.tolist()], system.path
    ([-1.0, -0.9], 'chunked-cholesky')
    """

    def __init__(self, lower: Tensor, chunks: int = 1, work: Tensor | None = None) -> None:
        self.lower = lower
        self.chunks = chunks
        self.path = "cholesky"
        self._mirrored = False
        # The damped copy and its factor, reused by every retry (and, given, from an earlier system).
        self._work = work if work is not None and work.shape == lower.shape and work.dtype == lower.dtype \
            and work.device == lower.device else None
        self._last: tuple[Tensor, CholeskyFactor | None] | None = None  # (damped diagonal, factor)
        self._floor: float | None = None
        self._small: tuple | None = None  # numpy views for _small_solve, () where it does not apply

    @property
    def name(self) -> str:
        return "chunked-cholesky" if self.chunks > 1 else "cholesky"

    def release(self) -> dict[str, Tensor]:
        """The ``n x n`` buffers (``"gram"``, and ``"work"`` once a factorization ran) for the next
        system to reuse; this system must not be used after.

        A fresh 76 MB matrix (the 4,353-parameter benchmark network, float32) costs 25-40 ms of
        page faults where a reused one is zeroed in ~3 ms or copied into in ~9 ms: ``fit``
        hands each linearization's buffers to the next (:meth:`ModuleProblem.recycle`).
        """
        buffers = {"gram": self.lower}
        if self._work is not None:
            buffers["work"] = self._work
        self.lower = self._work = self._last = self._small = None
        return buffers

    @property
    def gram(self) -> Tensor:
        """``J^T J``, full (mirrored from the lower triangle on first use)."""
        if not self._mirrored:
            mirror_lower(self.lower)
            self._mirrored = True
        return self.lower

    def diagonal(self) -> Tensor:
        """``diag(J^T J)``."""
        return self.lower.diagonal()

    def gram_product(self, vector: Tensor) -> Tensor:
        """``J^T J v`` from the lower triangle."""
        symv = _symv(self.lower, vector)
        if symv is None:
            return self.gram @ vector
        result = symv(1.0, self.lower.numpy().T, vector.detach().contiguous().numpy(), lower=0)
        return torch.from_numpy(result)

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``."""
        return step @ self.gram_product(step)

    def _factor(self, damped: Tensor) -> CholeskyFactor | None:
        """The factor of ``J^T J + diag(damped)``, or None; the last one again for the same ``damped``."""
        if self._last is not None and _same(self._last[0], damped):
            return self._last[1]
        if self._work is None:
            self._work = torch.empty_like(self.lower)
        factor = cholesky_factor(self.lower, damped, self._work)
        self._last = (damped, factor)
        return factor

    def _damped(self, damping: float, scale: Tensor) -> Tensor:
        """``max(damping * scale, eps * trace(J^T J))``; the floor is computed once per system."""
        if self._floor is None:
            self._floor = torch.finfo(self.lower.dtype).eps * float(self.lower.diagonal().sum())
        if _numpy_vector(scale, self.lower.dtype):
            # The same float64/float32 products and maxima as torch.clamp, at a third of the cost
            # on a 61-vector (one numpy call against two torch kernels; this runs at every trial).
            values = scale.numpy() * damping
            return torch.from_numpy(np.maximum(values, self._floor, out=values))
        return torch.clamp(damping * scale, min=self._floor)

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The damped Gauss-Newton step by Cholesky (eigen-decomposition if even that fails)."""
        step = self._small_solve(grad, damping, scale)
        if step is not None:
            return step
        if self._small:
            self._small.factored = False  # the workspace is about to hold another factor
        damped = self._damped(damping, scale)
        factor = self._factor(damped)
        if factor is not None:
            step, path = factor.solve(grad, negate=True), "cholesky"
        else:
            # Not positive definite even with the floor: the pseudo-inverse of the damped matrix.
            fallback = NormalEquations(self.gram)
            step, path = fallback.solve(grad, 1.0, damped), fallback.path
        self.path = ("chunked-" if self.chunks > 1 else "") + path
        return step

    def _small_solve(self, grad: Tensor, damping: float, scale: Tensor) -> Tensor | None:
        """:meth:`solve` on numpy views for a CPU system below :data:`SERIAL_ORDER`, or None where
        it does not apply or the factorization fails (then :meth:`solve`'s own path runs).

        The same products, maxima, copy, sum, ``?potrf`` and ``?potrs`` as the general path (the
        same step to the last bit), with the checks and conversions made once per system
        (:class:`_SmallCholesky`): at n = 61 a trial's solve took 31 us against 41 us
        (interleaved medians, one thread), then ~22 us with the views kept.
        """
        small = self._small
        if small is None:
            small = self._small = self._small_setup()
        if not small:
            return None
        grad_np, scale_np = small.vector(grad), small.vector(scale)
        if grad_np is None or scale_np is None:
            return None
        if self._floor is None:
            self._floor = torch.finfo(self.lower.dtype).eps * float(self.lower.diagonal().sum())
        step = small.solve(grad_np, scale_np, damping, self._floor)
        if step is None:
            self._last = None
            return None
        self._last = None  # work now holds the small path's factor, not the general path's
        self.path = "chunked-cholesky" if self.chunks > 1 else "cholesky"
        return torch.from_numpy(step)

    def _small_setup(self) -> _SmallCholesky | tuple[()]:
        """The numpy views of :meth:`_small_solve`, or ``()`` where it does not apply."""
        lower = self.lower
        potrf = _potrf(lower)
        if potrf is None or lower.shape[0] >= SERIAL_ORDER:
            return _NO_SMALL
        if self._work is None:
            self._work = torch.empty_like(lower)
        return _SmallCholesky(lower.numpy(), self._work.numpy())


class _SmallCholesky:
    """The damped Cholesky solves of a small CPU system on numpy views held for its lifetime.

    ``?potrf`` then ``?potrs`` on the C-ordered lower triangle read as the Fortran-ordered upper
    one, as :func:`cholesky_factor` and :meth:`CholeskyFactor.solve` do (bitwise the same step);
    a retry whose damped diagonal equals the last one's only solves again.
    """

    def __init__(self, lower: np.ndarray, work: np.ndarray) -> None:
        self.lower, self.work = lower, work
        self.potrf, self.potrs = (_dpotrf, _dpotrs) if lower.dtype == np.float64 else (_spotrf, _spotrs)
        self.damped = np.empty(work.shape[0], dtype=work.dtype)
        self.factored = False  # work holds the factor for ``damped``
        self._vectors: dict[int, tuple[Tensor, np.ndarray | None]] = {}

    def vector(self, t: Tensor) -> np.ndarray | None:
        """``t``'s numpy view when it can be read as one of the system's dtype, else None; checked
        once per tensor object (the gradient and the damping scale come back at every trial)."""
        held = self._vectors.get(id(t))
        if held is not None and held[0] is t:
            return held[1]
        view = t.numpy() if _numpy_vector(t, _TORCH_DTYPES[self.lower.dtype.type]) else None
        self._vectors[id(t)] = (t, view)
        return view

    def solve(self, grad: np.ndarray, scale: np.ndarray, damping: float, floor: float) -> np.ndarray | None:
        """``-(J^T J + diag(max(damping * scale, floor)))^{-1} grad``, or None when ``?potrf`` fails."""
        damped = np.multiply(scale, damping)
        np.maximum(damped, floor, out=damped)
        if not (self.factored and np.array_equal(self.damped, damped)):
            self.factored = _potrf_damped(self.potrf, self.work, self.lower, damped)
            if not self.factored:
                return None
            self.damped = damped
        step = self.potrs(self.work.T, grad, lower=0)[0]
        return np.negative(step, out=step)


#: :meth:`AccumulatedNormalEquations._small_setup` where the small path does not apply.
_NO_SMALL = ()
_TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _numpy_vector(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` can be read as a numpy array of ``dtype`` sharing its memory."""
    return t.dtype == dtype and t.device.type == "cpu" and dtype in _LAPACK_DTYPES and not t.requires_grad \
        and t.is_contiguous()


def _same(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` (numpy's on small CPU vectors: a few microseconds less per trial)."""
    if a.dtype == b.dtype and a.shape == b.shape and _numpy_vector(a, a.dtype) and _numpy_vector(b, b.dtype):
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def _symv(lower: Tensor, vector: Tensor):
    if lower.device.type != "cpu" or vector.dtype != lower.dtype or _ssymv is None:
        return None
    return {torch.float32: _ssymv, torch.float64: _dsymv}.get(lower.dtype)


#: Below this order the factorization runs on one OpenBLAS thread; from it on the thread count
#: is chosen by :class:`BlasThreadChoice`. Measured (interleaved, 2 cores, load 5-6): float32
#: ``spotrf`` at n = 200 took 0.25 ms on two threads in one run and 98 ms (float64) in another,
#: 0.35 ms on one; at n = 1000, 81 ms on two and 10 ms on one.
ADAPTIVE_MIN_ORDER = 1024
#: From this order a LAPACK factor is solved with by torch's triangular solves (multi-threaded)
#: rather than ``?potrs``, and only the lower triangle is copied before ``?potrf``; below it
#: the small-problem paths stay bitwise as they were.
TRIANGULAR_MIN_ORDER = 1024
#: Below this order OpenBLAS is left alone: at n = 61 ``spotrf`` took 0.02 ms on its default
#: two threads and on one alike, less than setting the count would add.
SERIAL_ORDER = 128


class BlasThreadChoice:
    """Pick the OpenBLAS thread count for a factorization from the speed the last ones reached.

    OpenBLAS ``?potrf`` on both cores is the fastest factorization on an idle machine, but its
    threads synchronize once per block column, and when the machine is shared one descheduled
    thread stalls the other. Measured here at n = 4353 in float32: load ~1.8 on the 2 cores,
    two threads 159 ms (``benchmarks.bound``; 165-190 ms inside ``fit`` on the T2 benchmark),
    one thread 305-320 ms (inside ``fit``), MKL through ``torch.linalg.cholesky`` 240 ms; load
    5-6, interleaved medians, one thread 515 ms, two threads 1632 ms (871-1902, and up to 4.6 s
    inside ``fit``), torch 1093 ms. No fixed count wins both, so each call records its rate
    (seconds per unit of work) and the next call uses the count with the better last rate. The
    other count is retried after ``explore_every * ratio`` calls, ``ratio`` being how much
    slower it last was: a change of load is noticed, and a retry costs on average less than
    ``1 / explore_every`` of a call. The choice changes the rounding of the factor, not its
    accuracy.

    Examples
    --------
    >>> choice = BlasThreadChoice((1, 2), explore_every=2)
    >>> [choice.pick() for _ in range(2)]  # nothing measured yet: each count once
    [1, 1]
    >>> choice.record(1, 2.0, 1.0); choice.pick()
    2
    >>> choice.record(2, 1.0, 1.0); [choice.pick() for _ in range(5)]  # 1 is 2x slower: retried after 4
    [2, 2, 2, 1, 2]
    """

    def __init__(self, counts: tuple[int, ...], *, explore_every: int = 8) -> None:
        self.rates: dict[int, float | None] = dict.fromkeys(counts)
        self.explore_every = explore_every
        self.calls = 0

    def pick(self) -> int:
        """The thread count for the next call."""
        untried = [count for count, rate in self.rates.items() if rate is None]
        if untried:
            return untried[0]
        ranked = sorted(self.rates, key=self.rates.get)
        if len(ranked) == 1:
            return ranked[0]
        self.calls += 1
        if self.calls >= self.explore_every * self.rates[ranked[1]] / self.rates[ranked[0]]:
            self.calls = 0
            return ranked[1]
        return ranked[0]

    def record(self, count: int, seconds: float, work: float) -> None:
        """A call on ``count`` threads took ``seconds`` for ``work`` (any consistent unit)."""
        self.rates[count] = max(seconds, 1e-9) / max(work, 1e-300)


class _OpenBlasThreads:
    """Runs a LAPACK call on a chosen number of OpenBLAS threads (threadpoolctl, looked up once).

    The count is set through each library's own ``set_num_threads`` and restored after the
    call: ``threadpoolctl``'s ``limit()`` context re-reads every library's info on entry, about
    60 us, three times a 61-parameter factorization.
    """

    def __init__(self) -> None:
        self._libraries: list | None = None
        self._choice: BlasThreadChoice | None = None

    def _setup(self) -> list:
        if self._libraries is None:
            found = [] if ThreadpoolController is None else ThreadpoolController().select(internal_api="openblas")
            self._libraries = list(getattr(found, "lib_controllers", []))
            most = max([lib.num_threads for lib in self._libraries] or [1])
            self._choice = BlasThreadChoice(tuple(sorted({1, most})))
        return self._libraries

    def run(self, call, order: int):
        """``call()``: as is below :data:`SERIAL_ORDER` (OpenBLAS keeps such sizes on one thread
        itself), on one thread below :data:`ADAPTIVE_MIN_ORDER`, else on the chosen count."""
        libraries = self._setup() if order >= SERIAL_ORDER else []
        if not libraries:
            return call()
        count = 1 if order < ADAPTIVE_MIN_ORDER else self._choice.pick()
        before = [lib.get_num_threads() for lib in libraries]
        for lib in libraries:
            lib.set_num_threads(count)
        try:
            start = perf_counter()
            result = call()
            seconds = perf_counter() - start
        finally:
            for lib, threads in zip(libraries, before):
                lib.set_num_threads(threads)
        if order >= ADAPTIVE_MIN_ORDER:
            self._choice.record(count, seconds, float(order) ** 3)
        return result


_OPENBLAS = _OpenBlasThreads()


@dataclass(frozen=True)
class CholeskyFactor:
    """A lower Cholesky factor ``L`` (``L L^T = A``) in the lower triangle of ``tensor``.

    ``lapack`` says it came from SciPy's ``?potrf`` (solved by ``?potrs`` on the same memory);
    otherwise from ``torch.linalg.cholesky_ex`` (solved by ``torch.cholesky_solve``).

    Examples
    --------
    >>> A = torch.tensor([[4.0, 0.0], [2.0, 5.0]], dtype=torch.float64)  # lower triangle read
    >>> factor = cholesky_factor(A, torch.zeros(2, dtype=torch.float64))
    >>> factor.solve(torch.tensor([6.0, 7.0], dtype=torch.float64)).tolist()
    [1.0, 1.0]
    """

    tensor: Tensor
    lapack: bool

    def solve(self, rhs: Tensor, *, negate: bool = False) -> Tensor:
        """``A^{-1} rhs`` for a vector ``rhs`` (``-A^{-1} rhs`` with ``negate``)."""
        if not self.lapack:
            x = torch.cholesky_solve(rhs.unsqueeze(1), self.tensor).squeeze(1)
            return -x if negate else x
        if self.tensor.shape[0] >= TRIANGULAR_MIN_ORDER:
            # Two triangular solves by torch (MKL, every intra-op thread): 4.4 ms against
            # ?potrs's 15.8 ms at n = 4,353 in float32 (medians of 9); the factor is the lower
            # triangle, and the other one is never read.
            lower = self.tensor
            column = rhs.detach().to(lower.dtype).reshape(-1, 1)
            half = torch.linalg.solve_triangular(lower, column, upper=False)
            x = torch.linalg.solve_triangular(lower.T, half, upper=True).squeeze(1)
            return x.neg_() if negate else x
        potrs = _potrs(self.tensor)
        if not _numpy_vector(rhs, self.tensor.dtype):
            rhs = rhs.detach().to(self.tensor.dtype).contiguous()
        # The C-ordered lower triangle is the Fortran-ordered upper one of the transpose (U = L^T).
        x, _ = potrs(self.tensor.numpy().T, rhs.numpy(), lower=0)
        if negate:  # in place on potrs's fresh result: no second tensor
            np.negative(x, out=x)
        return torch.from_numpy(x)


def _potrf(tensor: Tensor):
    """SciPy's ``?potrf`` for a contiguous CPU float32/float64 matrix without autograd, else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.requires_grad:
        return None
    return {torch.float32: _spotrf, torch.float64: _dpotrf}.get(tensor.dtype)


def _potrs(tensor: Tensor):
    return {torch.float32: _spotrs, torch.float64: _dpotrs}[tensor.dtype]


def cholesky_factor(lower: Tensor, damped: Tensor, work: Tensor | None = None) -> CholeskyFactor | None:
    """The Cholesky factor of ``lower + diag(damped)`` (only the lower triangle is read), or None.

    The damped copy is written into ``work`` (allocated if None; ``lower`` is never modified), and
    on the CPU in float32/float64 factorized there in place by LAPACK ``?potrf`` on a numpy view
    (zero copy); elsewhere ``torch.linalg.cholesky_ex`` reads it. Measured here, interleaved
    medians of factor + solve, 2 cores under load 5-6 (SciPy on one OpenBLAS thread):

    ==========  =====================  ========================
    n, dtype    torch factor / solve   ``?potrf`` / ``?potrs``
    ==========  =====================  ========================
    61, f32     1.0 ms / 0.05 ms       0.02 ms / 0.007 ms
    200, f32    11 ms / 6.7 ms         0.38 ms / 0.06 ms
    1000, f32   17 ms / 4.3 ms         10 ms / 1.0 ms
    4353, f32   614 ms / 57 ms         311 ms / 16 ms
    4353, f64   1203 ms / 150 ms       890 ms / 25 ms
    ==========  =====================  ========================

    LAPACK wins at every size, so there is no crossover to switch on. When ``?potrf`` fails,
    ``torch.linalg.cholesky_ex`` is tried on the same matrix; None when that fails too
    (``info != 0``) or the factor's diagonal is not finite.

    Examples
    --------
    >>> lower = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # [[1, 2], [2, 1]]: indefinite
    >>> cholesky_factor(lower, torch.zeros(2)) is None, cholesky_factor(lower, torch.full((2,), 2.0)) is None
    (True, False)
    """
    work = torch.empty_like(lower) if work is None else work
    potrf = _potrf(work)
    if potrf is not None and lower.dtype == work.dtype:
        factor = _lapack_factor(potrf, lower.detach().contiguous(), damped.detach().to(work.dtype).contiguous(), work)
        if factor is not None:
            return factor
        # OpenBLAS rounds differently from MKL: at the eps * trace floor (float32, n = 4353, a
        # trained network) its spotrf failed where torch.linalg.cholesky_ex succeeded, and the
        # eigen fallback costs several factorizations. One torch attempt first.
    _damped_copy(work, lower, damped)
    tensor, info = torch.linalg.cholesky_ex(work)
    return _checked(CholeskyFactor(tensor, lapack=False), info)


def _lapack_factor(potrf, lower: Tensor, damped: Tensor, work: Tensor) -> CholeskyFactor | None:
    """``?potrf`` of ``lower + diag(damped)`` in ``work``, all on numpy views (None if it fails).

    The same copy, sum and factorization as the torch-tensor path (bitwise the same factor),
    with numpy calls in place of torch kernels and checks: about 1 us each against 3-5 us. At
    n = 61 (the T1 network) the ~13 us ``dpotrf`` had ~45 us of such overhead around it; with
    this path, :class:`AccumulatedNormalEquations` ``solve`` (damped diagonal, factor, ``dpotrs``)
    went from 61 to 36 us a trial (medians of 15 x 100 calls, interleaved, one thread).
    """
    if not _potrf_damped(potrf, work.numpy(), lower.numpy(), damped.numpy()):
        return None
    return CholeskyFactor(work, lapack=True)


def _potrf_damped(potrf, work: np.ndarray, lower: np.ndarray, damped: np.ndarray) -> bool:
    """``?potrf`` of ``lower + diag(damped)`` in place in ``work`` (C-ordered, lower triangles
    read and written): whether it succeeded with a finite diagonal."""
    _copy_lower(work, lower)
    diagonal = work.reshape(-1)[:: work.shape[0] + 1]  # a view
    diagonal += damped
    # clean=0: the strict upper triangle (C order) is left as it was, and never read.
    _, info = _OPENBLAS.run(lambda: potrf(work.T, lower=0, overwrite_a=1, clean=0), work.shape[0])
    return info == 0 and bool(np.isfinite(diagonal).all())


def _copy_lower(work: np.ndarray, lower: np.ndarray) -> None:
    """``work``'s lower triangle from ``lower``'s (C order); past :data:`TRIANGULAR_MIN_ORDER`
    by row blocks that stop at the diagonal (5.8 ms against 8.1 ms for all of a 4,353 float32
    matrix), else the whole matrix in one copy."""
    n = work.shape[0]
    if n < TRIANGULAR_MIN_ORDER:
        np.copyto(work, lower)
        return
    for start in range(0, n, 512):
        stop = min(n, start + 512)
        np.copyto(work[start:stop, :stop], lower[start:stop, :stop])


def _damped_copy(work: Tensor, lower: Tensor, damped: Tensor) -> None:
    work.copy_(lower)
    work.diagonal().add_(damped)


def _checked(factor: CholeskyFactor, info) -> CholeskyFactor | None:
    """``factor``, or None when the factorization failed (``info != 0``) or its diagonal is not finite."""
    if int(info) != 0 or not bool(torch.isfinite(factor.tensor.diagonal()).all()):
        return None
    return factor


class HeldSampleSpaceEquations:
    """The LM step in sample space, ``h = -S J^T (J S J^T + damping I)^{-1} r`` (``S = 1 / scale``), rows held.

    The same step as :class:`~marquardt.linalg.SampleSpaceEquations`, built for network-sized
    Jacobians (``m`` residuals, ``n >> m`` parameters):

    * ``J S J^T`` is formed by one symmetric rank-k update (``?syrk``, half a matrix product)
      once per scale, and only its lower triangle is used; ``J`` itself is never copied when the
      scale is uniform (as in ``fit``, whose damping is MATLAB's ``N mu I``);
    * there is no QR fallback on the stacked ``(m + n) x n`` system (a dense ``n x n`` problem,
      out of reach when ``n`` is large): a factorization that succeeds is used, the damped
      diagonal is floored at ``eps * trace`` as in :class:`AccumulatedNormalEquations`, and an
      eigen-decomposition of the ``m x m`` matrix takes over only if Cholesky still fails.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    >>> r = torch.tensor([5.0], dtype=torch.float64)
    >>> HeldSampleSpaceEquations(J, r).solve(J.T @ r, 0.0, torch.ones(3, dtype=torch.float64)).tolist()
    [-1.0, -2.0, -0.0]
    """

    name = "sample-space"

    def __init__(self, jac: Tensor, residuals: Tensor) -> None:
        self.jac = jac
        self.residuals = residuals
        self.path = "sample-space"
        self._cache: tuple[Tensor, Tensor] | None = None

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` without forming ``J^T J`` (nor ``J * J``)."""
        return torch.linalg.vector_norm(self.jac, dim=0) ** 2

    def curvature(self, step: Tensor) -> Tensor:
        """``||J h||^2``."""
        product = self.jac @ step
        return product @ product

    def _row_gram(self, scale: Tensor) -> Tensor:
        """``J S J^T`` (lower triangle), formed once per scale."""
        if self._cache is None or not torch.equal(self._cache[0], scale):
            uniform = bool((scale == scale[0]).all())
            rows = self.jac if uniform else self.jac / scale.sqrt()
            gram = _outer_gram(rows)
            if uniform:
                gram /= scale[0]
            self._cache = (scale.clone(), gram)
        return self._cache[1]

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The damped step; the right-hand side is ``residuals`` (default: the held ones), ``grad = J^T r``."""
        residuals = self.residuals if residuals is None else residuals
        gram = self._row_gram(scale)
        floor = torch.finfo(gram.dtype).eps * float(gram.diagonal().sum())
        damped = torch.full_like(gram.diagonal(), max(damping, floor))
        factor = cholesky_factor(gram, damped)
        if factor is not None:
            self.path = "sample-space"
            coefficients = factor.solve(residuals)
        else:
            full = gram.tril() + gram.tril(-1).T
            self.path = "sample-space-eigh"
            coefficients = -damped_eigh_solve(full, residuals, 1.0, damped)
        return -(self.jac.T @ coefficients) / scale


class KernelSampleSpaceEquations:
    """The sample-space LM step from ``J J^T`` and Jacobian products, with no row of ``J`` held.

    For networks whose ``J J^T`` has a closed form (:meth:`marquardt.fastjac.LinearizedNetwork.row_gram`)
    the step ``h = -J^T (J J^T / c + damping I)^{-1} r / c`` (uniform damping scale ``c``) needs
    only that ``m x m`` matrix and one product ``J^T u``; ``curvature`` is one ``J v``. Memory is
    ``O(m^2)`` plus the activations, not ``O(m n)``. A non-uniform scale (``J S J^T`` has no such
    form) forms the rows and solves as :class:`HeldSampleSpaceEquations`. Cholesky as there
    (floored damped diagonal, an eigen-decomposition only if it still fails). ``row_gram`` may
    be wider than the products (float64 for a small float32 network, see
    :func:`accumulation_dtype`): the solve runs in its dtype, everything else in the residuals'.

    ``jac`` materializes the rows on first use (through ``rows``), for code that needs them
    (Bayesian regularization's ``J^T J``, a QR fallback elsewhere); the LM loop never does.

    Examples
    --------
    >>> J = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    >>> r = torch.tensor([5.0, 1.0], dtype=torch.float64)
    >>> system = KernelSampleSpaceEquations(J @ J.T, lambda v: J @ v, lambda u: J.T @ u, lambda: (J * J).sum(0), r)
    >>> step = system.solve(J.T @ r, 0.0, torch.ones(3, dtype=torch.float64))
    >>> torch.allclose(J @ step, -r), system.path
    (True, 'sample-space')
    """

    name = "sample-space"

    def __init__(self, row_gram: Tensor, jvp, vjp, gram_diagonal, residuals: Tensor, rows=None) -> None:
        self.row_gram, self.residuals, self.path = row_gram, residuals, "sample-space"
        self._jvp, self._vjp, self._gram_diagonal, self._rows = jvp, vjp, gram_diagonal, rows
        self._diagonal: Tensor | None = None
        self._jac: Tensor | None = None
        self._held: HeldSampleSpaceEquations | None = None

    @property
    def jac(self) -> Tensor:
        """The ``m x n`` Jacobian, formed on first use."""
        if self._jac is None:
            if self._rows is None:
                raise AttributeError("This sample-space system holds no Jacobian rows and cannot form them.")
            self._jac = self._rows()
        return self._jac

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` (closed form, computed once)."""
        if self._diagonal is None:
            self._diagonal = self._gram_diagonal()
        return self._diagonal

    def curvature(self, step: Tensor) -> Tensor:
        """``||J h||^2``."""
        product = self._jvp(step)
        return product @ product

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The damped step; the right-hand side is ``residuals`` (default: the held ones), ``grad = J^T r``."""
        residuals = self.residuals if residuals is None else residuals
        if not bool((scale == scale[0]).all()):
            if self._held is None:
                self._held = HeldSampleSpaceEquations(self.jac, self.residuals)
            step = self._held.solve(grad, damping, scale, residuals)
            self.path = self._held.path
            return step
        c = float(scale[0])
        floor = torch.finfo(self.row_gram.dtype).eps * float(self.row_gram.diagonal().sum()) / c
        damped = torch.full_like(self.row_gram.diagonal(), max(damping, floor))
        gram = self.row_gram / c
        factor = cholesky_factor(gram, damped)
        wide = residuals.to(gram.dtype)
        if factor is not None:
            self.path = "sample-space"
            coefficients = factor.solve(wide)
        else:
            self.path = "sample-space-eigh"
            coefficients = -damped_eigh_solve(gram, wide, 1.0, damped)
        return -self._vjp(coefficients.to(residuals.dtype)) / c


def _outer_gram(rows: Tensor) -> Tensor:
    """``rows rows^T``; only the lower triangle is meaningful (``?syrk`` on the CPU)."""
    syrk = _syrk(rows.detach())
    if syrk is None:
        return rows @ rows.T
    # rows^T is Fortran-contiguous (n x m); trans=1 gives (rows^T)^T rows^T = rows rows^T, whose
    # upper triangle in Fortran order is the lower one of the C-ordered result.
    result = syrk(1.0, rows.detach().numpy().T, trans=1, lower=0)
    return torch.from_numpy(result.T)


def accumulate_normal(chunks: Iterable[tuple[Tensor, Tensor]], n: int, *, dtype: torch.dtype,
                      device: torch.device | str, buffers: dict[str, Tensor] | None = None,
                      structure=None) -> tuple[AccumulatedNormalEquations, Tensor, float]:
    """Fold ``(J_chunk, r_chunk)`` pairs into ``J^T J``, ``J^T r`` and the cost, in ``dtype``.

    ``buffers``: what an earlier system's :meth:`AccumulatedNormalEquations.release` gave back;
    those of the right shape, dtype and device are reused (zeroed, not allocated).

    ``structure``: a :class:`~marquardt.kronecker.LayerGram` (anything with its ``clear(gram)``,
    ``fold(gram, grad, jac, residuals, extra)`` and ``finish(gram)``), which then forms ``J^T J``
    and ``J^T r`` instead of ``?syrk``; the chunks are triples ``(J_chunk, r_chunk, extra)``,
    ``extra`` what ``fold`` reads besides the rows.

    Examples
    --------
    >>> J = torch.arange(6.0).reshape(3, 2); r = torch.ones(3)
    >>> system, grad, cost = accumulate_normal([(J[:2], r[:2]), (J[2:], r[2:])], 2, dtype=J.dtype, device="cpu")
    >>> torch.equal(system.gram, J.T @ J), grad.tolist(), cost, system.name
    (True, [6.0, 9.0], 1.5, 'chunked-cholesky')
    """
    buffers = _fitting_buffers(buffers, n, dtype, device)
    if structure is not None:
        gram = buffers["gram"] if "gram" in buffers else torch.empty(n, n, dtype=dtype, device=device)
        structure.clear(gram)  # what it adds to, and its own sums; the rest it overwrites
    else:
        gram = buffers["gram"].zero_() if "gram" in buffers else torch.zeros(n, n, dtype=dtype, device=device)
    grad = torch.zeros(n, dtype=dtype, device=device)
    sum_sq = torch.zeros((), dtype=dtype, device=device)
    count = 0
    for chunk in chunks:
        jac, residuals = chunk[0].to(dtype), chunk[1].to(dtype)
        if structure is not None:
            structure.fold(gram, grad, jac, residuals, chunk[2])
        else:
            if count == 0:  # gram is zero
                _first_rank_update(gram, jac)
            else:
                symmetric_rank_update(gram, jac)
            add_gradient(grad, jac, residuals)
        sum_sq += residuals @ residuals
        count += 1
    if structure is not None:
        structure.finish(gram)
    elif _syrk(gram) is None:
        gram.tril_()  # addmm filled both halves: keep the lower one, as the BLAS path does
    return AccumulatedNormalEquations(gram, chunks=count, work=buffers.get("work")), grad, 0.5 * float(sum_sq)


def normal_equations(jac: Tensor, residuals: Tensor, buffers: dict[str, Tensor] | None = None
                     ) -> tuple[AccumulatedNormalEquations, Tensor, float]:
    """:func:`accumulate_normal` of one chunk, for rows held whole in the working dtype.

    ``buffers``: the ``"gram"`` and ``"work"`` matrices of a released system
    (:meth:`AccumulatedNormalEquations.release`), reused where they fit, as by
    :func:`accumulate_normal`.

    The same kernels on the same memory (bitwise the same ``J^T J``, ``J^T r`` and cost; ``J^T J``
    of a small ``J`` by :func:`_first_rank_update` in both), without the per-chunk conversions,
    checks and running sums. Falls back to :func:`accumulate_normal` where ``?syrk`` does not
    apply.

    Examples
    --------
    >>> J = torch.arange(6.0, dtype=torch.float64).reshape(3, 2); r = torch.ones(3, dtype=torch.float64)
    >>> system, grad, cost = normal_equations(J, r)
    >>> torch.equal(system.gram, J.T @ J), grad.tolist(), cost, system.name
    (True, [6.0, 9.0], 1.5, 'cholesky')
    """
    n = jac.shape[1]
    if _syrk(jac, residuals) is None or residuals.dtype != jac.dtype:
        return accumulate_normal([(jac, residuals)], n, dtype=jac.dtype, device=jac.device, buffers=buffers)
    buffers = _fitting_buffers(buffers, n, jac.dtype, jac.device)
    gram = buffers["gram"].zero_() if "gram" in buffers else torch.zeros(n, n, dtype=jac.dtype)
    _first_rank_update(gram, jac)
    grad = add_gradient(torch.zeros(n, dtype=jac.dtype), jac, residuals)
    return AccumulatedNormalEquations(gram, work=buffers.get("work")), grad, 0.5 * float(residuals @ residuals)


def add_gradient(grad: Tensor, jac: Tensor, residuals: Tensor) -> Tensor:
    """``grad += J^T r`` in place (and returned): by numpy's ``r @ J`` on CPU float tensors that
    it can read without a copy, else by ``addmv``.

    On the 1-20-1 benchmark network (1000 x 61, float64, one thread) numpy took 2.5 us against
    13 us for torch's ``addmv`` (its dispatch, and MKL's ``dgemv`` on this CPU). Both
    :func:`normal_equations` and :func:`accumulate_normal` fold the gradient here, so the two
    stay bitwise alike.

    Examples
    --------
    >>> J = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    >>> add_gradient(torch.ones(2, dtype=torch.float64), J, torch.ones(3, dtype=torch.float64)).tolist()
    [7.0, 10.0]
    """
    if (jac.ndim == 2 and _numpy_vector(grad, jac.dtype) and _numpy_vector(residuals, jac.dtype)
            and _numpy_vector(jac, jac.dtype)):
        values = grad.numpy()
        np.add(values, np.dot(residuals.numpy(), jac.numpy()), out=values)
        return grad
    return grad.addmv_(jac.T, residuals)


def _fitting_buffers(buffers: dict[str, Tensor] | None, n: int, dtype: torch.dtype,
                     device: torch.device | str) -> dict[str, Tensor]:
    """The released ``n x n`` buffers (:meth:`AccumulatedNormalEquations.release`) of ``dtype`` on
    ``device``: those a new system can reuse."""
    return {name: buffer for name, buffer in (buffers or {}).items()
            if buffer.shape == (n, n) and buffer.dtype == dtype and buffer.device == torch.device(device)}


#: :func:`normal_equations` forms the lower triangle of ``J^T J`` by :data:`BLOCKED_GRAM_COLUMNS`
#: -column matrix products up to this order, when ``J`` fits in :data:`BLOCKED_GRAM_MAX_BYTES`
#: (a cache-resident ``J``). OpenBLAS's ``?syrk`` at such orders takes as long as the full
#: ``J^T J`` product; the row blocks of the lower triangle do about 60% of its work. Measured, one
#: thread, interleaved medians: 1000 x 61 float64 138 -> 98 us, float32 96 -> 57 us; 1000 x 21
#: float64 30 -> 25 us. At 5,000 rows (not cache-resident) or 101+ columns ``?syrk`` was as fast
#: or faster.
BLOCKED_GRAM_MAX_ORDER = 64
BLOCKED_GRAM_MAX_BYTES = 512 * 1024
BLOCKED_GRAM_COLUMNS = 12


def _first_rank_update(gram: Tensor, jac: Tensor) -> None:
    """:func:`symmetric_rank_update` of a zero ``gram``: by :func:`_blocked_lower_gram` where that
    is faster (small, cache-resident CPU ``J``), so that :func:`normal_equations` and the first
    chunk of :func:`accumulate_normal` round alike."""
    n = jac.shape[1]
    if (n <= BLOCKED_GRAM_MAX_ORDER and jac.numel() * jac.element_size() <= BLOCKED_GRAM_MAX_BYTES
            and _syrk(gram) is not None and jac.dtype == gram.dtype and jac.device.type == "cpu"):
        _blocked_lower_gram(gram.numpy(), jac.detach().numpy())
    else:
        symmetric_rank_update(gram, jac)


def _blocked_lower_gram(out: np.ndarray, jac: np.ndarray) -> None:
    """The lower triangle of ``J^T J`` (and the upper one of the diagonal blocks) into ``out``
    (C-ordered), one block row of :data:`BLOCKED_GRAM_COLUMNS` rows at a time.

    Examples
    --------
    >>> J = np.arange(60.0).reshape(4, 15); out = np.zeros((15, 15))
    >>> _blocked_lower_gram(out, J)
    >>> bool(np.array_equal(np.tril(out), np.tril(J.T @ J)))
    True
    """
    n = jac.shape[1]
    for start in range(0, n, BLOCKED_GRAM_COLUMNS):
        stop = min(start + BLOCKED_GRAM_COLUMNS, n)
        np.matmul(jac[:, start:stop].T, jac[:, :stop], out=out[start:stop, :stop])


def assemble_sample_space(chunks: Iterable[tuple[Tensor, Tensor]], shape: tuple[int, int] | None = None, *,
                          dtype: torch.dtype | None = None) -> tuple[HeldSampleSpaceEquations, Tensor, float]:
    """Stack all rows for the residual-space solve; returns ``(system, J^T r, cost)``.

    With ``shape = (m, n)`` the rows are copied into one preallocated ``m x n`` tensor as they
    come (peak memory: the Jacobian plus one chunk), else concatenated at the end. ``dtype``
    (default: the rows' own) is the dtype the rows are stored and solved in.

    Examples
    --------
    >>> J = torch.arange(6.0).reshape(2, 3); r = torch.ones(2)
    >>> system, grad, cost = assemble_sample_space([(J[:1], r[:1]), (J[1:], r[1:])], (2, 3))
    >>> torch.equal(system.jac, J), grad.tolist(), cost
    (True, [3.0, 5.0, 7.0], 1.0)
    """
    if shape is None:
        jacs, residuals = zip(*chunks)
        jac, r = torch.cat(jacs), torch.cat(residuals)
    else:
        jac, r = _fill_rows(iter(chunks), shape, dtype)
    if dtype is not None:
        jac, r = jac.to(dtype), r.to(dtype)
    return HeldSampleSpaceEquations(jac, r), jac.T @ r, 0.5 * float(r @ r)


def _fill_rows(chunks: Iterator[tuple[Tensor, Tensor]], shape: tuple[int, int],
               dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    first_jac, first_r = next(chunks)
    jac = first_jac.new_empty(shape, dtype=dtype or first_jac.dtype)
    r = first_r.new_empty(shape[0], dtype=dtype or first_r.dtype)
    start = 0
    for rows, values in _chain_first((first_jac, first_r), chunks):
        stop = start + rows.shape[0]
        jac[start:stop] = rows
        r[start:stop] = values
        start = stop
    if start != shape[0]:
        raise ValueError(f"The chunks held {start} rows; expected {shape[0]}.")
    return jac, r


def _chain_first(first: tuple[Tensor, Tensor], rest: Iterator[tuple[Tensor, Tensor]]):
    yield first
    yield from rest
