"""The Levenberg-Marquardt iteration, and :func:`least_squares` built on it.

There is one LM loop in marquardt: :func:`lm_step`. It takes a *problem* (anything with
``linearize(x)`` and ``cost(x)``), the current linearization, a damping rule and its state, and
tries damped Gauss-Newton steps until one is accepted, the damping rule gives up, a trial step
becomes negligible, or the trial budget runs out. :func:`least_squares`, the
:class:`~marquardt.LevenbergMarquardt` optimizer and :func:`marquardt.fit` all call it; they
differ only in the problem they hand over and in their stopping rules.
"""

from __future__ import annotations

import math
import reprlib
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .chunked import SERIAL_MAX_ENTRIES, single_thread
from .damping import DampingRule, DampingState, is_real_number, make_damping
from .jacobian import (
    autograd_residuals_and_jacobian,
    finite_difference_jacobian,
    finite_difference_second_derivative,
    residuals_and_jacobian,
    second_directional_derivative,
)
from .linalg import (cosine_optimality, damping_for_radius, gauss_newton_step, make_system, range_cosine,
                     unit_column_svd)
from .result import IterationInfo, LeastSquaresResult, termination_message

__all__ = [
    "FixedScaling",
    "JacobiScaling",
    "Linearization",
    "Problem",
    "StepResult",
    "least_squares",
    "lm_step",
    "make_scaling",
]


@dataclass
class Linearization:
    """The local model of a problem at a point.

    Attributes
    ----------
    cost : float
        ``0.5 * sum(r**2)`` at the point.
    grad : Tensor
        ``J^T r``, shape ``(n,)``.
    system : object
        A damped linear system (see :mod:`marquardt.linalg`): ``solve``, ``curvature``,
        ``diagonal``, and ``path`` (the solver path last taken).
    residuals, jac : Tensor, optional
        Held only when the problem materialises them (small problems, :func:`least_squares`).
    """

    cost: float
    grad: Tensor
    system: Any
    residuals: Tensor | None = None
    jac: Tensor | None = None


class Problem(Protocol):
    """What :func:`lm_step` needs of a least-squares problem."""

    def linearize(self, x: Tensor) -> Linearization:
        """Residuals, gradient and a damped linear system at ``x``."""

    def cost(self, x: Tensor) -> float:
        """``0.5 * sum(r**2)`` at ``x``; ``inf`` when any residual is not finite."""


@dataclass(frozen=True)
class JacobiScaling:
    """Scale the damping term by ``diag(J^T J)``.

    With ``accumulate=True`` an entry never shrinks (Moré, 1978, as MINPACK does); by default
    the current diagonal is used. Zero columns get scale 1 so that the damped matrix stays
    positive definite.
    """

    accumulate: bool = False

    def update(self, previous: Tensor | None, diagonal: Tensor) -> Tensor:
        """The scale for the next iteration, from the previous one and ``diag(J^T J)``."""
        current = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))
        if previous is None or not self.accumulate:
            return current
        return torch.maximum(previous, current)


@dataclass(frozen=True)
class FixedScaling:
    """A constant damping scale, ``1 / x_scale**2`` (``x_scale=1`` is Marquardt's identity damping)."""

    values: Tensor

    def update(self, previous: Tensor | None, diagonal: Tensor) -> Tensor:
        """The fixed scale, whatever the curvature."""
        return self.values.to(dtype=diagonal.dtype, device=diagonal.device)


Scaling = JacobiScaling | FixedScaling


def make_scaling(x_scale: Any, n: int, *, dtype: torch.dtype, device: torch.device | str) -> Scaling:
    """Build the damping scale from ``x_scale``: ``"jac"``, a positive number, or ``n`` positive numbers.

    Examples
    --------
    >>> make_scaling(2.0, 2, dtype=torch.float64, device="cpu").values.tolist()
    [0.25, 0.25]
    """
    if isinstance(x_scale, str):
        if x_scale == "jac":
            # Moré's non-decreasing scale: a column that vanishes on the way (a parameter driven
            # where the model no longer depends on it) keeps the damping it had. Without it MGH17
            # from start 1 takes a step of 8.8e3 in b4 once its column has shrunk.
            return JacobiScaling(accumulate=True)
        raise ValueError(f"Invalid x_scale: {x_scale!r}; expected 'jac', a positive number or an array of {n}.")
    values = _scale_values(x_scale, n).to(dtype=dtype, device=device)
    if values.ndim == 0:
        values = values.expand(n)
    if values.shape != (n,) or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise ValueError(
            f"Invalid x_scale: expected 'jac', a positive number or {n} positive numbers; "
            f"received {x_scale!r}."
        )
    return FixedScaling(1.0 / values**2)


def _scale_values(x_scale: Any, n: int) -> Tensor:
    """``x_scale`` as a float64 tensor, or a ValueError naming it (numpy's own conversion errors
    name no argument, and a tensor on a GPU or one that requires grad has no numpy view)."""
    if isinstance(x_scale, Tensor):
        kind = "b" if x_scale.dtype == torch.bool else "c" if x_scale.is_complex() else "f"
        values = x_scale.detach()
    else:
        try:
            values = np.asarray(x_scale)
        except ValueError:  # a ragged list
            values = np.asarray(None)
        kind = values.dtype.kind
    if kind not in "iuf":
        # Strings, booleans, complex numbers, None or other objects: never a scale anyone meant.
        raise ValueError(f"Invalid x_scale: expected 'jac', a positive number or {n} positive numbers; "
                         f"received {x_scale!r}.")
    return torch.as_tensor(values).to(torch.float64)


@dataclass(frozen=True)
class StepResult:
    """The outcome of one LM iteration (:func:`lm_step`).

    Attributes
    ----------
    x : Tensor
        The new point when ``accepted``, else the old one.
    cost : float
        Cost at ``x``.
    accepted : bool
        Whether a trial step was kept.
    state : DampingState
        Damping state after the iteration.
    step : Tensor
        The last trial step.
    actual_reduction, predicted_reduction, gain_ratio : float
        Of the last trial step.
    n_trials : int
        Cost evaluations made (one per evaluated trial step; trials rejected by the trust radius
        or the geodesic acceleration test are not evaluated and not counted).
    small_step : bool
        The last trial step was negligible (``||h|| <= xtol (xtol + ||x||)``).
    exhausted : bool
        The damping rule gave up (damping past its maximum).
    trial_state : DampingState or None
        The damping state the accepted step was computed with (before the accepting update),
        for a caller that rejects the new point after all (a non-finite Jacobian there); None
        when no step was accepted.
    """

    x: Tensor
    cost: float
    accepted: bool
    state: DampingState
    step: Tensor
    actual_reduction: float
    predicted_reduction: float
    gain_ratio: float
    n_trials: int
    small_step: bool
    exhausted: bool
    trial_state: DampingState | None = None

    @property
    def step_norm(self) -> float:
        """Euclidean norm of the last trial step."""
        return float(torch.linalg.vector_norm(self.step))


GeodesicFn = Callable[[Tensor, Tensor, Tensor, float, Tensor], Tensor | None]


def lm_step(
    problem: Problem,
    x: Tensor,
    lin: Linearization,
    scale: Tensor,
    rule: DampingRule,
    state: DampingState,
    *,
    max_trials: float = math.inf,
    xtol: float = 0.0,
    geodesic: GeodesicFn | None = None,
    max_step: float = math.inf,
    predict: bool = True,
) -> StepResult:
    """One Levenberg-Marquardt iteration: damped trials until a step is accepted.

    Parameters
    ----------
    problem : Problem
        Evaluates the cost at trial points.
    x : Tensor
        Current point, shape ``(n,)``.
    lin : Linearization
        The problem linearised at ``x`` (its system is factorised again for each damping value,
        never recomputed).
    scale : Tensor
        Damping scale ``D`` (the system is ``J^T J + damping * diag(D)``).
    rule, state
        Damping rule and its current state.
    max_trials : float
        Most trial steps to try.
    xtol : float
        A trial step with ``||h|| <= xtol * (xtol + ||x||)`` ends the iteration.
    geodesic : callable, optional
        ``geodesic(x, velocity, grad_scale, damping, scale)`` returns the acceleration correction
        or ``None`` when it must be rejected (see :func:`least_squares`); a rejected trial raises
        the damping without evaluating the cost, as Transtrum & Sethna's algorithm does.
    max_step : float
        Trust radius: a trial step longer than this in the damping metric,
        ``||sqrt(D) h|| > max_step``, is rejected without evaluating the cost.
    predict : bool
        Evaluate the quadratic model's predicted reduction and the gain ratio. With False they
        are skipped (reported as nan) when the damping rule does not read them
        (``rule.uses_gain_ratio`` False, as for :class:`~marquardt.damping.MarquardtDamping`,
        whose decisions rest on the actual reduction alone): ``fit`` saves one ``h^T J^T J h``
        and one ``g^T h`` per trial, about 10 us each on the T1 benchmark network.

    Returns
    -------
    StepResult

    Notes
    -----
    The trial step solves ``(J^T J + damping * D) h = -J^T r``. Its gain ratio is
    ``rho = (cost(x) - cost(x + h)) / (-(g^T h + h^T J^T J h / 2))``. A non-finite step or cost
    is a rejected trial: damping rises and ``x`` is untouched.
    """
    trials = 0
    predict = predict or getattr(rule, "uses_gain_ratio", True)
    xnorm = None  # ||x||, for the small-step test of a rejected trial only
    while True:
        step, admissible, finite = _propose(lin, x, state.damping, scale, geodesic, max_step)
        if not admissible:
            state = rule.update(state, accepted=False, gain_ratio=-1.0)
            if rule.exhausted(state):
                return StepResult(x, lin.cost, False, state, step, -math.inf, math.nan, -1.0, trials, False, True)
            continue
        trials += 1
        candidate = x + step
        trial_cost, predicted = _evaluate_trial(problem, candidate, lin, step, finite, predict)
        actual = lin.cost - trial_cost if math.isfinite(trial_cost) else -math.inf
        if not predict:
            ratio = math.nan
        else:
            ratio = actual / predicted if predicted > 0 else (-1.0 if actual <= 0 else 1.0)
        accepted = math.isfinite(actual) and rule.accepts(actual, ratio)
        trial_state, state = state, rule.update(state, accepted=accepted, gain_ratio=ratio)
        if accepted:
            # The point the cost was evaluated at, the same object: a problem that kept that
            # forward pass (a tiny network's buffers) knows it without comparing values.
            return StepResult(candidate, trial_cost, True, state, step, actual, predicted, ratio, trials, False, False,
                              trial_state)
        norm = float(torch.linalg.vector_norm(step))
        if norm == 0.0 or xtol != 0.0:  # with xtol = 0 only a zero step can be small: ||x|| unread
            if xnorm is None:
                xnorm = float(torch.linalg.vector_norm(x))
            small = _is_small(norm, xnorm, xtol)
        else:
            small = False
        exhausted = rule.exhausted(state)
        if small or exhausted or trials >= max_trials:
            return StepResult(x, lin.cost, False, state, step, actual, predicted, ratio, trials, small, exhausted)


def _evaluate_trial(problem: Problem, candidate: Tensor, lin: Linearization, step: Tensor,
                    finite: bool, predict: bool = True) -> tuple[float, float]:
    """Cost at ``candidate = x + step`` and the reduction the quadratic model predicts for ``step``
    (``finite``: no NaN or inf in it)."""
    if not finite:
        return math.inf, math.nan
    # Python floats (float64): two scalar reads instead of two more tensor kernels.
    if not predict:
        return problem.cost(candidate), math.nan
    predicted = -(float(lin.grad @ step) + 0.5 * float(lin.system.curvature(step)))
    return problem.cost(candidate), predicted


def reject_accepted(rule: DampingRule, trial_state: DampingState) -> DampingState:
    """The damping after an accepted trial is rejected after all (its point's linearization is
    not finite): the rejection of ``trial_state``, the state the trial was computed with.

    Not of the state after the accepting update: that one has lower damping (Nielsen's ``1/3``
    then ``x2``, Marquardt's ``x0.1`` then ``x10``), so the same step would be proposed again and
    again. Shared by ``least_squares``, ``fit`` and the ``LevenbergMarquardt`` optimizer.

    Examples
    --------
    >>> from marquardt.damping import MarquardtDamping
    >>> reject_accepted(MarquardtDamping(), DampingState(1e-3)).damping
    0.01
    """
    return rule.update(trial_state, accepted=False, gain_ratio=-1.0)


def _is_small(norm: float, xnorm: float, xtol: float) -> bool:
    """Whether a step of length ``norm`` is negligible at a point of length ``xnorm``."""
    return math.isfinite(norm) and norm <= xtol * (xtol + xnorm)


def _propose(
    lin: Linearization, x: Tensor, damping: float, scale: Tensor, geodesic: GeodesicFn | None, max_step: float
) -> tuple[Tensor, bool, bool]:
    """The trial step for ``damping``, whether it may be evaluated (acceleration and radius
    tests), and whether it is finite (checked once here, not again by :func:`_evaluate_trial`)."""
    step = lin.system.solve(lin.grad, damping, scale)
    if not all_finite(step):
        return step, True, False  # evaluated as a failed trial
    if geodesic is not None:
        acceleration = geodesic(x, step, step, damping, scale)
        if acceleration is None:
            return step, False, True
        step = step + 0.5 * acceleration
        if not all_finite(step):
            return step, True, False
    return step, max_step == math.inf or _scaled_norm(step, scale) <= max_step, True


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in ``t``; through numpy for a small CPU float vector (2-3 us instead of
    the 6-7 us of two torch kernels and a sync, at every trial).

    Examples
    --------
    >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    """
    if t.is_cpu and t.dtype in (torch.float32, torch.float64) and not t.requires_grad \
            and t.ndim == 1 and t.shape[0] <= 4096:
        return bool(np.logical_and.reduce(np.isfinite(t.numpy())))
    return bool(torch.isfinite(t).all())


def _scaled_norm(vector: Tensor, scale: Tensor) -> float:
    """``||sqrt(D) v||``, the length in the metric of the damping term."""
    return float(torch.linalg.vector_norm(vector * scale.sqrt()))


# ---------------------------------------------------------------------------------------------
# least_squares: a residual function of a parameter vector


@dataclass
class FunctionProblem:
    """A residual function ``fun(x)`` with an exact, user-supplied or finite-difference Jacobian."""

    fun: Callable[[Tensor], Tensor]
    jac: Callable[[Tensor], Any] | str | None
    n_residuals: int
    #: Machine epsilon of the precision ``fun`` computes in, for the finite-difference steps
    #: (``None``: that of ``x``).
    fd_eps: float | None = None
    #: Whether ``fun`` must run with autograd on even where no Jacobian is traced (it calls
    #: ``torch.autograd.grad`` itself, as a physics-informed residual does): found at ``x0``.
    needs_grad: bool = False
    #: Whether ``jac`` takes derivatives itself (``torch.autograd.grad`` or ``backward()`` on
    #: ``x.requires_grad_()``), so that it must run with autograd on: found at its first call.
    jac_needs_grad: bool = field(default=False, init=False)
    _last: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def residuals(self, x: Tensor) -> Tensor:
        r = _as_residual_vector(self.fun(x), x)
        if r.shape != (self.n_residuals,):
            # Dropping residuals (say the non-finite ones) makes a smaller cost that is no
            # improvement: the step would be accepted for it.
            raise ValueError(
                f"fun returned {tuple(r.shape)} residuals at x = {_describe_point(x)}, but "
                f"({self.n_residuals},) at x0; the number of residuals must not change (keep every "
                "residual, e.g. torch.where(ok, r, big) instead of r[ok])."
            )
        return r

    def remember(self, x: Tensor, r: Tensor) -> None:
        """Keep ``fun(x)`` for the linearization that follows an accepted trial at ``x``."""
        self._last = (x.clone(), r)

    def _untraced(self) -> AbstractContextManager:
        """The grad mode of a call of ``fun`` whose output needs no graph: off, unless ``fun``
        differentiates inside (:attr:`needs_grad`; its output is then detached)."""
        return torch.enable_grad() if self.needs_grad else torch.no_grad()

    def _plain_residuals(self, x: Tensor) -> Tensor:
        """:meth:`residuals` at ``x`` with no graph kept (:meth:`_untraced`)."""
        with self._untraced():
            return self.residuals(x).detach()

    def cost(self, x: Tensor) -> float:
        r = self._plain_residuals(x)
        if not bool(torch.isfinite(r).all()):
            return math.inf
        self.remember(x, r)
        return 0.5 * float(r @ r)

    def _residuals_at(self, x: Tensor) -> Tensor:
        # An accepted point was just evaluated by cost(); a user or finite-difference Jacobian
        # needs no second call of fun there (an expensive model, an ODE solve, costs twice).
        # The exact Jacobian evaluates fun in the same pass anyway.
        if self._last is not None and torch.equal(self._last[0], x):
            return self._last[1]
        return self._plain_residuals(x)

    def residuals_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.jac is None:
            if self.needs_grad:  # torch.func refuses autograd.grad inside fun: no attempt every step
                return autograd_residuals_and_jacobian(self.residuals, x)
            return residuals_and_jacobian(self.residuals, x, self.n_residuals)
        r = self._residuals_at(x)
        if self.jac == "2-point":
            return r, finite_difference_jacobian(self._plain_residuals, x, r, self.fd_eps)
        value = _dense(self._jac_value(x))
        _check_real("jac", value, "torch.cat([J.real, J.imag]) for residuals torch.cat([r.real, r.imag])")
        jac = self._as_jacobian(value, x)
        if jac.ndim == 1 and self.n_residuals == 1:
            jac = jac.reshape(1, -1)  # one residual's gradient: scipy reads jac with np.atleast_2d
        if jac.shape != (self.n_residuals, x.shape[0]):
            # Checked at every point, as the residuals are: a wrong shape past x0 failed
            # inside the Cholesky solve with "Incompatible matrix sizes for cholesky_solve".
            raise ValueError(f"jac returned shape {tuple(jac.shape)}; expected (m, n) = "
                             f"({self.n_residuals}, {x.shape[0]}) (at x = {_describe_point(x)}).")
        return r, jac

    def _jac_value(self, x: Tensor) -> Any:
        """``jac(x)`` with autograd off, or on where ``jac`` takes derivatives itself.

        A ``jac`` written with ``torch.autograd.grad`` (rows of ``J`` by backward passes) failed
        with autograd off ("element 0 of tensors does not require grad"), though ``jacrev`` or
        ``torch.autograd.functional.jacobian`` inside ``jac``, which switch it on themselves,
        worked. As for ``fun`` (:func:`_first_call`), a ``RuntimeError`` with autograd off is
        tried once more with it on; if that succeeds ``jac`` runs with it on from then on, and a
        ``jac`` that fails both ways raises its first error.
        """
        if self.needs_grad or self.jac_needs_grad:
            with torch.enable_grad():
                return self.jac(x)
        value, self.jac_needs_grad = _first_call(self.jac, x)
        return value

    def _as_jacobian(self, value: Any, x: Tensor) -> Tensor:
        """``jac``'s output as a tensor like ``x``, or a TypeError naming ``jac``: torch's and
        numpy's own conversion errors ("can't convert np.ndarray of type numpy.object_" for
        ``None``) name no argument, where ``fun``'s bad output is a TypeError naming ``fun``."""
        try:
            return _as_tensor_like(value, x).detach()
        except (TypeError, ValueError, RuntimeError) as error:
            received = "None (a missing return?)" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"
            raise TypeError(f"jac must return the (m, n) = ({self.n_residuals}, {x.shape[0]}) Jacobian as a tensor, "
                            f"an array of real numbers or a scipy/torch sparse matrix; received {received} at x = "
                            f"{_describe_point(x)}.") from error

    def linearize(self, x: Tensor) -> Linearization:
        return _linearization(*self.residuals_and_jacobian(x))

    def second_directional(self, x: Tensor, direction: Tensor, jvp: Tensor, residuals: Tensor | None = None) -> Tensor:
        """``d^2/dt^2 fun(x + t direction)``; ``residuals`` is ``fun(x)`` when held (no second call)."""
        if self.jac is None and not self.needs_grad:
            return second_directional_derivative(self.residuals, x, direction)
        return finite_difference_second_derivative(self._plain_residuals, x, direction, jvp, value=residuals)


def _describe_point(x: Tensor) -> str:
    try:
        return np.array2string(x.detach().cpu().numpy(), precision=6, threshold=10)
    except RuntimeError:  # a transformed tensor inside torch.func has no data to print
        return "a trial point"


def _linearization(r: Tensor, jac: Tensor) -> Linearization:
    return Linearization(0.5 * float(r @ r), jac.T @ r, make_system(jac, r), r, jac)


def _as_tensor_like(value: Any, like: Tensor) -> Tensor:
    """``value`` as a new tensor of ``like``'s dtype and device, never a view of it: ``fun`` or
    ``jac`` may return a buffer they write again at their next call (MINPACK copies ``fvec``
    too), which would change the kept residuals, and the result's ``fun`` and ``jac``, after the fact."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device, copy=True)
    return torch.tensor(np.asarray(value), dtype=like.dtype, device=like.device)


def _as_residual_vector(value: Any, like: Tensor) -> Tensor:
    """``fun``'s output as a tensor of ``like``'s dtype, read as scipy reads it (``np.atleast_1d``).

    A list or tuple of 0-d tensors (``[b[0] - 1, b[1] - 2]``) is stacked, not passed through
    numpy, which would cut the autograd graph (and refuses a tensor that requires grad); a 0-d
    output is one residual.
    """
    if isinstance(value, (list, tuple)) and any(isinstance(item, Tensor) for item in value):
        value = torch.stack([_as_tensor_like(item, like) for item in value])
    r = _as_tensor_like(value, like)
    return r.reshape(1) if r.ndim == 0 else r


@dataclass
class _Geodesic:
    """Geodesic acceleration (Transtrum & Sethna, 2012) with the ``2|a|/|v| <= alpha`` test."""

    problem: FunctionProblem
    lin: Linearization
    alpha: float = 0.75

    def __call__(self, x: Tensor, velocity: Tensor, _: Tensor, damping: float, scale: Tensor) -> Tensor | None:
        jac = self.lin.jac
        rpp = self.problem.second_directional(x, velocity, jac @ velocity, self.lin.residuals)
        acceleration = self.lin.system.solve(jac.T @ rpp, damping, scale, residuals=rpp)
        if not bool(torch.isfinite(acceleration).all()):
            return torch.zeros_like(velocity)  # no usable second derivative: plain LM step
        # A large acceleration means the step leaves the region where the linear model holds
        # (parameter evaporation): reject the trial and raise the damping, as geodesicLM does,
        # rather than take the uncorrected step (which is what carries BoxBOD's b2 to 1e4).
        if 2.0 * _scaled_norm(acceleration, scale) > self.alpha * _scaled_norm(velocity, scale):
            return None
        return acceleration


def least_squares(
    fun: Callable[..., Any],
    x0: Any,
    *,
    jac: Callable[..., Any] | str | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
    damping: str | DampingRule = "nielsen",
    geodesic: bool = False,
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    max_nfev: int | None = None,
    x_scale: Any = "jac",
    verbose: int = 0,
    callback: Callable[[IterationInfo], Any] | None = None,
) -> LeastSquaresResult:
    """Minimise ``0.5 * sum(fun(x)**2)`` by Levenberg-Marquardt.

    Parameters
    ----------
    fun : callable
        ``fun(x, *args, **kwargs)`` maps a 1-D tensor of shape ``(n,)`` to the residuals, a 1-D
        tensor of shape ``(m,)`` (a list or tuple of 0-d tensors is stacked, and a 0-d output is
        one residual, as scipy's ``np.atleast_1d`` reads them). It is always called with a tensor
        (so that autograd can differentiate it), on the device and dtype of the working point.
        It must not modify ``x`` in place: an accepted trial point is the tensor ``fun`` was
        called with, so a change made there would be kept. Its output is copied, so it may
        return a buffer it writes again at the next call. ``fun`` may take derivatives itself
        by ``torch.autograd.grad`` (``create_graph=True``), as a physics-informed residual does:
        it then always runs with autograd on, and the exact Jacobian comes from
        :func:`torch.autograd.functional.jacobian` (``torch.func.grad`` inside ``fun`` keeps the
        faster :mod:`torch.func` path).
    x0 : Tensor or array_like
        Starting point. A tensor keeps its dtype and device (CPU or CUDA); numpy arrays and Python
        numbers become float64, and the result is then returned as numpy.
    jac : callable, "2-point" or None
        ``None`` (default): the exact Jacobian by :mod:`torch.func` (forward mode when
        ``n <= m``, reverse mode otherwise). A callable ``jac(x, *args, **kwargs)`` returning the
        ``(m, n)`` Jacobian (a tensor, an array, or a scipy/torch sparse matrix, made dense;
        shape ``(n,)`` when ``m == 1``, as scipy reads it; anything else, ``None`` included, is a
        TypeError naming ``jac``). It may take derivatives itself (``torch.autograd.grad``); it then
        runs with autograd on, as ``fun`` does. ``"2-point"``: forward differences, only when asked for,
        with MINPACK's relative steps ``sqrt(eps) * |x_j|`` (``sqrt(eps)`` where ``x_j == 0``), as
        ``lmdif`` takes them, with ``eps`` that of the coarser of ``fun``'s and ``x``'s precisions.
    args, kwargs
        Extra arguments passed to ``fun`` and ``jac``.
    damping : {"nielsen", "marquardt"} or damping rule
        ``"nielsen"`` (default): gain-ratio update with ``nu`` doubling, stopping at ``1e16``.
        ``"marquardt"``: MATLAB ``trainlm``'s ``x0.1`` / ``x10`` rule from ``1e-3``, stopping at
        ``1e10``. Both ceilings are in units of the largest diagonal entry of ``J^T J / D`` at
        ``x0`` (1 with ``x_scale="jac"``), so that they mean the same for any scale of the
        residuals. When no trial lowers the cost before the damping passes its ceiling, the run
        stops with status 2 (3 when ``ftol`` is disabled; 0 when ``xtol`` is too).
    geodesic : bool
        Add geodesic acceleration (Transtrum & Sethna, 2012): the second directional derivative
        of the residuals by a forward-mode JVP of a JVP, solved with the same factorisation; a
        trial with ``2 |a| / |v| > 0.75`` (norms in the damping metric) is rejected and the
        damping raised, as in Transtrum & Sethna's geodesicLM.
    ftol, xtol, gtol : float or None
        ``None`` or ``0`` disables the test, as in :func:`scipy.optimize.least_squares`; at
        least one must stay above machine epsilon (a ValueError otherwise, as in scipy).
        ``ftol``: stop when an accepted step reduced the cost, and the model predicted it would,
        by at most ``ftol * cost`` (scipy's test), and the undamped Gauss-Newton model at the new
        point can remove at most ``ftol * cost / max(1, m - n)`` more. ``xtol``: stop when a step
        is shorter than ``xtol * (xtol + ||x||)``; until a first trial is refused, not for an
        accepted step that the damping held back (``damping * D_j > (J^T J)_jj`` for some
        parameter, the damping still falling from its start). ``gtol``: stop when
        ``max_j |J_j^T r| / (||J_j|| ||r||) <= gtol`` (MINPACK's scale-free test) and the cosine
        between ``r`` and the whole range of ``J`` is at most ``gtol`` too.
    max_nfev : int, optional
        Most evaluations of ``fun`` for a cost (``nfev``); default ``max(1000, 100 * n)`` (scipy:
        ``100 * n``). As in scipy since 1.16, the calls a ``"2-point"`` Jacobian (``n`` per
        Jacobian) or a finite-difference geodesic acceleration makes are not counted.
    x_scale : "jac", float or array_like
        Damping scale: ``"jac"`` (default) scales the damping by ``diag(J^T J)``, kept
        non-decreasing (Moré's scaling); a number or array gives the constant ``1 / x_scale**2``.
    verbose : {0, 1, 2}
        1 prints the termination report in scipy's format (the message, then a line with the
        evaluations, initial and final cost and first-order optimality); 2 also one line per
        iteration, under a header.
    callback : callable, optional
        ``callback(info: IterationInfo)`` after each iteration; returning ``True`` or raising
        ``StopIteration`` stops the run with status -2.

    Returns
    -------
    LeastSquaresResult

    Notes
    -----
    Each iteration solves ``(J^T J + damping * D) h = -J^T r``, with ``J^T J`` formed once and
    factorised by Cholesky for each damping value tried (a QR solve of
    ``[J; sqrt(damping D)] h = [-r; 0]`` takes over when Cholesky fails or is ill-conditioned),
    or in residual space, ``h = -D^{-1} J^T (J D^{-1} J^T + damping I)^{-1} r``, when ``m < n``.
    Steps are held within a trust radius in the metric ``||sqrt(D) h||``: it starts at
    ``2 ||sqrt(D) x0||`` (when the Gauss-Newton step is longer, the first damping is the one whose
    step reaches it) and grows to twice the longest accepted step; longer trial steps are
    rejected unevaluated. A solution far from ``x0`` (``||x*|| >> ||x0||``) therefore costs
    about ``log2(||x*|| / ||x0||)`` evaluations more than MINPACK's first radius of
    ``100 ||D x0||`` (22 against scipy's 6 from ``[1, 1]`` to ``(1e3, -1e3)`` on a linear
    problem); a start of the right size, or ``x_scale``, avoids them (the factor 2 was chosen on
    NIST StRD, where 16 and 100 each lost a run). After a successful stop one undamped Gauss-Newton step is
    tried and kept when it lowers the cost. The covariance is ``s^2 (J^T J)^+`` with
    ``s^2 = 2 cost / (m - n)``, as :func:`scipy.optimize.curve_fit` reports it; a parameter the
    data do not determine (``J`` rank-deficient) gets ``inf`` variance and a ``RuntimeWarning``.

    The cost is a sum of squares, not MINPACK's scaled norm: residuals all below the square root
    of the dtype's smallest normal number (``1.5e-154`` in float64, ``1.1e-19`` in float32)
    square to zero, and the run stops at once on a zero cost (``1e-170 * (b - 1)`` from
    ``b = 0`` reports success at 0, where scipy finds 1). Scale such residuals first.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.linspace(0, 1, 20)
    >>> y = 2.0 * np.exp(-1.5 * t)
    >>> res = least_squares(lambda b: b[0] * torch.exp(-b[1] * torch.as_tensor(t)) - torch.as_tensor(y), [1.0, 1.0])
    >>> res.success, np.round(res.x, 6).tolist()
    (True, [2.0, 1.5])
    """
    kwargs = {} if kwargs is None else kwargs
    x, as_numpy = _validate_x0(x0)
    _validate_options(ftol=ftol, xtol=xtol, gtol=gtol, max_nfev=max_nfev, verbose=verbose)
    ftol, xtol, gtol = (0.0 if tol is None else tol for tol in (ftol, xtol, gtol))
    _validate_call(args=args, kwargs=kwargs, callback=callback, geodesic=geodesic)
    rule = make_damping(damping)
    scaling = make_scaling(x_scale, x.shape[0], dtype=x.dtype, device=x.device)
    bound_fun, bound_jac = _bind(fun, args, kwargs), _bind_jac(jac, args, kwargs)
    residuals0, output_eps, needs_grad = _validate_residuals(bound_fun, x)
    problem = FunctionProblem(bound_fun, bound_jac, residuals0.shape[0], output_eps, needs_grad)
    problem.remember(x, residuals0)
    max_nfev = max(1000, 100 * x.shape[0]) if max_nfev is None else max_nfev
    # Small problems run on one thread: a 250 x 8 ``J^T J`` took 5 us on one thread and 31 ms
    # on two on this 2-core machine under load (a descheduled worker costs a time slice).
    with single_thread(residuals0.shape[0] * x.shape[0] <= SERIAL_MAX_ENTRIES and x.device.type == "cpu"):
        lin = _first_linearization(problem, x, residuals0.shape[0], jac)
        run = _Run(problem, rule, scaling, ftol, xtol, gtol, max_nfev, geodesic, verbose, callback)
        x, lin, status = run.solve(x, lin)
        if status > 0:
            x, lin = run.finish(x, lin)
        return _make_result(x, lin, status, run, as_numpy)


def _relative_ceiling(rule: DampingRule, reference: float) -> DampingRule:
    """``rule`` with its damping ceiling in units of ``reference``, the largest diagonal entry of
    the scaled ``J^T J`` at ``x0``.

    The damping is added to that curvature, so an absolute ceiling means a different thing for
    every scale of the residuals: with a fixed ``x_scale`` and residuals of order ``1e9`` (a
    curvature of ``2e16``) the first rejected trial passed Nielsen's ``1e16`` and the run
    stopped at ``x0`` as converged. With ``x_scale="jac"`` the reference is 1: no change. A
    rule of the caller's own kind, without a ``maximum`` field, is used as given.
    """
    if not (math.isfinite(reference) and reference > 0.0 and is_dataclass(rule) and hasattr(rule, "maximum")):
        return rule
    return replace(rule, maximum=rule.maximum * reference)


def _damping_bound(out: StepResult, lin: Linearization, scale: Tensor) -> bool:
    """Whether an accepted step may have been short only because the damping held it back: its
    damping outweighed the curvature of some parameter (``damping * D_j > (J^T J)_jj > 0``) and
    the model was trusted (gain ratio at least MINPACK's 0.25).

    :class:`_Run` then skips the ``xtol`` test while no trial has been refused yet: the damping
    is still falling from its start, not held up by steps that failed. MINPACK tests ``xtol`` on
    its trust radius, which shrinks only after poor steps. On NIST Misra1c with ``x_scale=1.0``,
    Nielsen's damping fell from 1.6e8 by a third per step, and the third step, 2e-7 long, ended
    the run as converged with ``b1`` not yet moved from 500 (certified 636).
    """
    if not out.gain_ratio >= _POOR_GAIN:
        return False
    curvature = lin.system.diagonal()
    held = (out.trial_state.damping * scale > curvature) & (curvature > 0)
    return bool(held.any())


_POOR_GAIN = 0.25  # MINPACK shrinks its trust radius below this gain ratio
_RADIUS_FACTOR = 2.0  # first trust radius, in units of ||sqrt(D) x0|| (see _Run._first_state)
_RADIUS_GROWTH = 2.0  # the radius grows to twice the longest accepted step (1.5 and 4: same NIST counts)


@dataclass
class _Run:
    """The stopping rules of :func:`least_squares` around :func:`lm_step`."""

    problem: FunctionProblem
    rule: DampingRule
    scaling: Scaling
    ftol: float
    xtol: float
    gtol: float
    max_nfev: int
    geodesic: bool
    verbose: int
    callback: Callable[[IterationInfo], Any] | None
    nfev: int = 1
    njev: int = 1
    n_iter: int = 0
    radius: float = math.inf
    initial_cost: float = math.nan
    #: A message in place of the status code's own (:meth:`_exhausted_status`), or "".
    note: str = ""
    #: Whether any trial has been refused yet (:func:`_damping_bound`).
    refused: bool = False

    def solve(self, x: Tensor, lin: Linearization) -> tuple[Tensor, Linearization, int]:
        self.initial_cost = lin.cost
        if self.verbose >= 2:
            print(f"{'iteration':>9} {'nfev':>6} {'cost':>14} {'optimality':>11} {'damping':>10} {'step norm':>10} accepted")
        scale = self.scaling.update(None, lin.system.diagonal())
        reference = float((lin.system.diagonal() / scale).max())
        self.rule = _relative_ceiling(self.rule, reference)
        state, self.radius = self._first_state(x, lin, scale, reference)
        while True:
            if self._gtol_met(lin):
                return x, lin, 1
            if self.nfev >= self.max_nfev:
                return x, lin, 0
            geodesic = _Geodesic(self.problem, lin) if self.geodesic else None
            out = lm_step(self.problem, x, lin, scale, self.rule, state, max_trials=self.max_nfev - self.nfev,
                          xtol=self.xtol, geodesic=geodesic, max_step=self.radius)
            self.nfev += out.n_trials
            self.n_iter += 1
            # Any trial refused (the damping raised for it) since the start: see _damping_bound.
            self.refused = self.refused or not out.accepted or out.trial_state.damping > state.damping
            state = out.state
            status = None
            accepted = out.accepted
            if accepted:
                new_lin = self._relinearize(out.x)
                if new_lin is None:
                    self.refused = True
                    state, accepted = reject_accepted(self.rule, out.trial_state), False
                    status = self._exhausted_status(state) if self.rule.exhausted(state) else None
                else:
                    self.radius = max(self.radius, _RADIUS_GROWTH * _scaled_norm(out.step, scale))
                    x, lin, scale, status = self._accept(lin, scale, out, new_lin)
            elif out.small_step:
                status = 3
            elif out.exhausted:
                status = self._exhausted_status(out.state)
            if self._report(x, lin, state, out, accepted) and status is None:
                status = -2
            if status is not None:
                return x, lin, status

    def _first_state(self, x: Tensor, lin: Linearization, scale: Tensor, reference: float
                     ) -> tuple[DampingState, float]:
        """The trust radius ``2 ||sqrt(D) x0||`` and the damping of the first trial step.

        A long first step is how a parameter evaporates (BoxBOD from start 1: ``b2`` goes
        1 -> 115, where ``exp(-b2 x)`` and its column of ``J`` vanish); a fixed ``tau`` cannot
        know the step length it allows. When the Gauss-Newton step is longer than the radius, the
        first trial is Moré's trust-region step, the damped step that reaches the radius (its
        damping may be above or below the rule's start); otherwise the rule's own start
        (Nielsen's ``tau``) is kept. Taking the Gauss-Newton step whenever it fits measured worse:
        a first step of 1.3e3 on Bennett5 start 1, then 834 evaluations instead of 274.

        The factor 2 lies between scipy's ``trf`` (1) and MINPACK (100). Measured on the 54 NIST
        runs: 2 and 4 reach LRE >= 4 on all; 16 and 100 lose BoxBOD start 1; 1 ends MGH17
        start 1 in another local minimum; 3, 8 and 100 lose MGH10 start 1, whose outcome hangs
        on its first steps. Without a size (``x0 = 0``) there is no radius. ``reference`` is the
        largest diagonal entry of ``J^T J / D`` at ``x0``.
        """
        state = self.rule.init(reference)
        size = _scaled_norm(x, scale)
        if not (math.isfinite(size) and size > 0.0):
            return state, math.inf
        radius = _RADIUS_FACTOR * size
        damping = damping_for_radius(lin.jac, lin.residuals, scale, radius)
        return (replace(state, damping=damping) if damping > 0 else state), radius

    def _gtol_met(self, lin: Linearization) -> bool:
        """MINPACK's per-column cosine test, confirmed by the cosine with the whole range of ``J``.

        Nearly parallel columns can each be almost orthogonal to ``r`` while their span is not:
        MGH17 from start 1 passes the column test at cost 4.0e-5, far from the minimum 2.7e-5.
        The column test is the cheap filter; the range cosine (one SVD) decides.
        """
        if cosine_optimality(lin.jac, lin.residuals) > self.gtol:
            return False
        return range_cosine(lin.jac, lin.residuals) <= self.gtol

    def _relinearize(self, x: Tensor) -> Linearization | None:
        """The linearization at an accepted point, or ``None`` when it is not finite (``J``, or
        ``J^T r`` and ``J^T J`` overflowing the working precision)."""
        new_lin = self.problem.linearize(x)
        self.njev += 1
        return new_lin if _finite_linearization(new_lin) else None

    def _accept(self, lin: Linearization, scale: Tensor, out: StepResult, new_lin: Linearization):
        f_ok = out.actual_reduction <= self.ftol * lin.cost and out.predicted_reduction <= self.ftol * lin.cost
        f_ok = f_ok and self._model_converged(new_lin)
        held = not self.refused and _damping_bound(out, lin, scale)
        x_ok = not held and out.step_norm <= self.xtol * (self.xtol + float(torch.linalg.vector_norm(out.x)))
        status = 4 if (f_ok and x_ok) else 2 if f_ok else 3 if x_ok else None
        return out.x, new_lin, self.scaling.update(scale, new_lin.system.diagonal()), status

    def _exhausted_status(self, state: DampingState) -> int:
        """The status when no trial lowered the cost before the damping passed its ceiling.

        A damping that is not a positive number (0 after an underflow: accepted steps of a
        problem whose ``J^T J`` is about ``1e-300`` of ``x_scale``'s) cannot pass it, and its
        rule counts it as exhausted: nothing converged there, so status 0 with its own message.

        The last steps were about ``1e-16`` of the problem's scale (the ceiling is relative, see
        :func:`_relative_ceiling`) and none lowered the cost: MINPACK's "no further reduction is
        possible", reported as the ``ftol`` test (2), or the ``xtol`` test (3) where ``ftol``
        is disabled. With both disabled, nothing the caller asked for holds: status 0, with its
        own message (:attr:`note`).
        """
        if not (math.isfinite(state.damping) and state.damping > 0.0):
            self.note = (f"The damping fell to {state.damping!r} after accepted steps (an underflow), and a rejected "
                         "trial cannot raise it; the problem's scale is far from x_scale's: pass x_scale='jac' or "
                         "rescale the parameters.")
            return 0
        if self.ftol > 0.0:
            return 2
        if self.xtol > 0.0:
            return 3
        self.note = ("No step lowered the cost with the damping at its maximum; the `ftol` and `xtol` tests are "
                     "disabled and the `gtol` test is not met.")
        return 0

    def _model_converged(self, lin: Linearization) -> bool:
        """The ``ftol`` certificate: the undamped model at the new point can hardly lower the cost.

        The step just taken was damped, so its small reduction does not show that no larger one
        is left. The undamped Gauss-Newton model can still remove ``range_cosine**2 * cost``; we
        require that to be at most ``ftol * cost / (m - n)``, ``ftol`` times half the residual
        variance ``s^2 = 2 cost / (m - n)``. Then the model's minimiser lies within ``sqrt(ftol)``
        standard errors of the point (``0.5 e^T J^T J e <= ftol s^2 / 2``), however many residuals
        there are; scipy's ``ftol * cost`` allows ``sqrt(ftol (m - n))`` standard errors, which on
        ENSO (``m - n = 159``, a standard error of ``b8`` 2.4 times ``b8``) leaves LRE 3.4.
        """
        m, n = lin.jac.shape
        return range_cosine(lin.jac, lin.residuals) ** 2 <= self.ftol / max(1, m - n)

    def finish(self, x: Tensor, lin: Linearization) -> tuple[Tensor, Linearization]:
        """After a successful stop, take the undamped Gauss-Newton step when it lowers the cost.

        The stopping tests certify the cost; the damping still shortens the last steps along
        weakly determined directions, which the cost hardly sees and the parameters do. One
        undamped step costs one evaluation and, near a minimiser of a small-residual problem,
        gains several digits (NIST, 54 runs: LRE >= 6 on 43 with it, 31 without; mean 8.0, 6.8).
        """
        if self.nfev >= self.max_nfev:
            return x, lin
        step = gauss_newton_step(lin.jac, lin.residuals)
        if not bool(torch.isfinite(step).all()):
            return x, lin
        if torch.equal(x + step, x):
            # Already at the Gauss-Newton point (zero residuals, or x0 the minimiser): a call of
            # fun at x again could not lower the cost and made nfev 2 where scipy reports 1.
            return x, lin
        self.nfev += 1
        if not self.problem.cost(x + step) < lin.cost:
            return x, lin
        new_lin = self.problem.linearize(x + step)
        self.njev += 1
        if not (bool(torch.isfinite(new_lin.grad).all()) and bool(torch.isfinite(new_lin.jac).all())):
            return x, lin
        return x + step, new_lin

    def _report(self, x: Tensor, lin: Linearization, state: DampingState, out: StepResult, accepted: bool) -> bool:
        # A copy: the callback may change info.x in place (clamp_, add_), which would move the
        # solver's own point and leave the result's x apart from its cost.
        info = IterationInfo(self.n_iter, x.clone(), lin.cost, float(lin.grad.abs().max()), state.damping,
                             out.step_norm, accepted)
        if self.verbose >= 2:
            print(f"{info.n_iter:9d} {self.nfev:6d} {info.cost:14.6e} {info.optimality:11.3e} "
                  f"{info.damping:10.2e} {info.step_norm:10.3e} {'yes' if info.accepted else 'no'}")
        if self.callback is None:
            return False
        try:
            result = self.callback(info)
            # True itself (numpy's, or a one-element bool tensor): a merely truthy return (1, a
            # list) does not stop.
            if isinstance(result, Tensor):
                return result.dtype == torch.bool and result.numel() == 1 and bool(result)
            return result is True or result is np.True_
        except StopIteration:
            return True


def _make_result(x: Tensor, lin: Linearization, status: int, run: _Run, as_numpy: bool) -> LeastSquaresResult:
    covariance = _covariance(lin.jac, lin.cost)
    message = run.note or termination_message(status)
    if run.verbose >= 1:
        # scipy's two lines, so that logs read (and are parsed) the same.
        print(message)
        print(f"Function evaluations {run.nfev}, initial cost {run.initial_cost:.4e}, final cost {lin.cost:.4e}, "
              f"first-order optimality {float(lin.grad.abs().max()):.2e}.")
    convert = (lambda t: t.detach().cpu().numpy()) if as_numpy else (lambda t: t.detach())
    return LeastSquaresResult(
        x=convert(x), cost=lin.cost, fun=convert(lin.residuals), jac=convert(lin.jac),
        grad=convert(lin.grad), optimality=float(lin.grad.abs().max()),
        active_mask=convert(torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)), nfev=run.nfev, njev=run.njev,
        n_iter=run.n_iter, status=status, message=message, success=status > 0,
        covariance=convert(covariance), stderr=convert(covariance.diagonal().sqrt()),
    )


def _covariance(jac: Tensor, cost: float) -> Tensor:
    """``s^2 (J^T J)^+`` with ``s^2 = 2 cost / (m - n)``, ``inf`` where it cannot be estimated.

    The pseudo-inverse comes from the SVD of ``J`` with unit-norm columns, so that the rank
    decision (singular values under ``eps * max(m, n)`` times the largest are dropped) does not
    depend on the units of the parameters: on the raw ``J`` a float32 Misra1a (columns 1e5
    apart) lost a direction and reported standard errors of 1e-13 times the certified ones.
    A parameter with a component in a dropped direction is not determined by the data (a dead
    parameter, or two that enter only as a product); ``pinv`` would give it a small finite
    variance, so its row and column are ``inf`` instead, with a warning, as
    :func:`scipy.optimize.curve_fit` fills a covariance it cannot estimate. With ``m <= n`` every
    entry is ``inf`` and nothing is said: no residual variance can be estimated, and a square
    system of equations is a common use that asked for no statistics.
    """
    m, n = jac.shape
    if m <= n:
        return torch.full((n, n), math.inf, dtype=jac.dtype, device=jac.device)
    _, singular, vt, norms, keep = unit_column_svd(jac)
    kept = vt[keep] / norms
    covariance = (kept.T @ (kept / singular[keep, None] ** 2)) * (2.0 * cost / (m - n))
    undetermined = _undetermined_parameters(vt[~keep], torch.finfo(jac.dtype).eps)
    if undetermined:
        # stacklevel 4: _covariance <- _make_result <- least_squares <- the caller.
        warnings.warn(f"Covariance of the parameters could not be estimated: the Jacobian is rank-deficient; "
                      f"parameters {undetermined} are not determined by the data; their standard errors are inf.",
                      RuntimeWarning, stacklevel=4)
        covariance[undetermined, :] = math.inf
        covariance[:, undetermined] = math.inf
    return covariance


def _undetermined_parameters(null_space: Tensor, eps: float) -> list[int]:
    """Indices of the parameters with a component in the numerical null space of ``J``.

    A parameter outside it has a component there of the size of the SVD's rounding, near
    ``eps`` times the condition number; ``sqrt(eps)`` separates the two.
    """
    if null_space.shape[0] == 0:
        return []
    weight = torch.linalg.vector_norm(null_space, dim=0)
    return torch.nonzero(weight > eps**0.5).flatten().tolist()


# ---------------------------------------------------------------------------------------------
# validation at the entry point


def _validate_x0(x0: Any) -> tuple[Tensor, bool]:
    as_numpy = not isinstance(x0, Tensor)
    if isinstance(x0, Tensor):
        x = x0.detach()
    else:
        try:
            array = np.asarray(x0)
        except (ValueError, TypeError, RuntimeError) as error:  # ragged, or tensors that need grad
            raise TypeError(f"x0 must be a 1-D array-like of numbers or a tensor; received {type(x0).__name__} "
                            f"that numpy cannot read as one ({error}).") from None
        if array.dtype.kind in "iub" and not isinstance(x0, (list, tuple, int, float)):
            raise TypeError(f"x0 has integer dtype {array.dtype}; expected a floating-point array (e.g. x0.astype(float)).")
        if array.dtype.kind not in "iufb":
            raise TypeError(f"x0 must be numeric; received dtype {array.dtype}.")
        x = torch.as_tensor(array.astype(np.float64))
    if not x.is_floating_point():
        raise TypeError(f"x0 has dtype {x.dtype}; expected a floating-point tensor (e.g. x0.double()).")
    if x.dtype not in (torch.float32, torch.float64):
        # The SVD and Cholesky factorisations the solver needs exist in single and double only.
        raise TypeError(f"x0 has dtype {x.dtype}; expected torch.float32 or torch.float64 (e.g. x0.float()).")
    if x.ndim > 1:
        raise ValueError(f"x0 must be 1-D; received shape {tuple(x.shape)}.")
    x = x.reshape(-1).clone()
    if x.numel() == 0:
        raise ValueError("x0 is empty; expected at least one parameter.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x0 must be finite; received non-finite values at index {_first_bad(x)}.")
    return x, as_numpy


def _first_bad(values: Tensor) -> int:
    return int(torch.nonzero(~torch.isfinite(values.reshape(-1)))[0])


def _validate_options(*, ftol: float | None, xtol: float | None, gtol: float | None, max_nfev: int | None,
                      verbose: int) -> None:
    for name, value in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)):
        # Numpy scalars of every width count (np.float32 is not a float); a bool is a number to
        # Python but never a tolerance anyone meant. None disables the test, as in scipy.
        if value is not None and (not is_real_number(value) or not math.isfinite(value) or value < 0):
            raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number >= 0, or None to disable "
                             "the test.")
    eps = float(np.finfo(np.float64).eps)
    if all(value is None or value < eps for value in (ftol, xtol, gtol)):
        # With every test off, the run could only end at max_nfev or when the damping gives up,
        # which would be reported as an ftol stop (status 2); scipy refuses this too.
        raise ValueError(f"Invalid tolerances: ftol={ftol!r}, xtol={xtol!r}, gtol={gtol!r}; at least one must be "
                         f"a number above machine epsilon ({eps:.2e}), or the run has no convergence test.")
    if max_nfev is not None and (not isinstance(max_nfev, (int, np.integer)) or isinstance(max_nfev, bool)
                                 or max_nfev < 1):
        raise ValueError(f"Invalid max_nfev value: {max_nfev!r}; expected a positive integer or None.")
    if verbose not in (0, 1, 2):
        raise ValueError(f"Invalid verbose value: {verbose!r}; expected 0, 1 or 2.")


def _validate_call(*, args: Any, kwargs: Any, callback: Any, geodesic: Any) -> None:
    if not isinstance(geodesic, (bool, np.bool_)):
        # A string is truthy: geodesic="no" would switch the acceleration on.
        raise TypeError(f"geodesic must be True or False; received {type(geodesic).__name__} {geodesic!r}.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of extra arguments for fun; received {type(args).__name__} "
                        f"{args!r} (write args=({args!r},) for one argument).")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict of keyword arguments for fun; received {type(kwargs).__name__}.")
    bad_keys = [key for key in kwargs if not isinstance(key, str)]
    if bad_keys:
        # Python's own error, at the first call of fun, names neither kwargs nor the key.
        raise TypeError(f"kwargs must map argument names (str) to values; received key {bad_keys[0]!r} of type "
                        f"{type(bad_keys[0]).__name__}.")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None; received {type(callback).__name__}.")


def _bind(fun: Callable[..., Any], args: tuple, kwargs: dict) -> Callable[[Tensor], Any]:
    if not callable(fun):
        raise TypeError(f"fun must be callable; received {type(fun).__name__}.")
    return lambda x: fun(x, *args, **kwargs)


def _bind_jac(jac: Any, args: tuple, kwargs: dict) -> Any:
    if jac is None or (isinstance(jac, str) and jac == "2-point"):
        return jac
    if callable(jac):
        return lambda x: jac(x, *args, **kwargs)
    raise ValueError(f"Invalid jac: {jac!r}; expected None (exact, by autograd), '2-point' or a callable.")


def _validate_residuals(fun: Callable[[Tensor], Any], x: Tensor) -> tuple[Tensor, float, bool]:
    """``fun(x0)`` checked, the machine epsilon of the precision it was computed in, and whether
    ``fun`` needs autograd on (:attr:`FunctionProblem.needs_grad`)."""
    value, needs_grad = _first_call(fun, x)
    _check_real("fun(x0)", value, "torch.cat([r.real, r.imag])")
    try:
        r = _as_residual_vector(value, x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"fun(x0) must return a 1-D tensor of residuals; received {type(value).__name__}.") from error
    if r.ndim != 1:
        raise ValueError(f"fun(x0) must return a 1-D tensor of residuals; received shape {tuple(r.shape)}.")
    if r.numel() == 0:
        raise ValueError("fun(x0) returned no residuals; expected at least one.")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"fun(x0) is not finite at residual index {_first_bad(r)}; choose a starting point where it is.")
    if not math.isfinite(0.5 * float(r @ r)):
        largest = float(r.abs().max())
        raise ValueError(
            f"The cost 0.5 * sum(fun(x0)**2) overflows {r.dtype} (largest |residual| {largest:.3e}); "
            "rescale the residuals or choose a starting point nearer the data."
        )
    return r.detach(), _output_eps(value, x), needs_grad  # r is a copy (_as_tensor_like)


def _first_call(fun: Callable[[Tensor], Any], x: Tensor) -> tuple[Any, bool]:
    """``fun(x0)`` with autograd off, or on where ``fun`` differentiates inside.

    A physics-informed residual takes derivatives of its model by ``torch.autograd.grad``,
    which fails with autograd off ("element 0 of tensors does not require grad"); calls that
    need no graph (trial costs, finite differences) then run with it on and detach the output.
    A ``fun`` that fails both ways raises its first error.
    """
    try:
        with torch.no_grad():
            return fun(x), False
    except RuntimeError as error:
        try:
            with torch.enable_grad():
                value = fun(x)
        except Exception:  # noqa: BLE001 - not a grad-mode failure: the first error is fun's own
            raise error from None
        return (value.detach() if isinstance(value, Tensor) else value), True


def _output_eps(value: Any, x: Tensor) -> float:
    """The machine epsilon of ``fun``'s own output dtype, at least that of ``x``.

    A float32 model with a float64 ``x`` (``b[0] * torch.exp(-b[1] * t)`` with a float32 ``t``
    gives float32) needs float32-sized difference steps, as scipy's ``approx_derivative`` takes
    the coarser of the two precisions.
    """
    eps = torch.finfo(x.dtype).eps
    dtype = value.dtype if isinstance(value, Tensor) else np.asarray(value).dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return max(eps, torch.finfo(dtype).eps)
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return max(eps, float(np.finfo(dtype).eps))
    return eps


def _check_connected(fun: Callable[[Tensor], Any], x: Tensor) -> None:
    """Refuse a ``fun`` whose output autograd cannot trace back to ``x``.

    Called only when the exact Jacobian at ``x0`` is zero: ``torch.tensor([...])``, ``.numpy()``
    or ``float()`` inside ``fun`` cut the graph, the Jacobian reads as zero, and the run used to
    stop at once on ``gtol`` with ``success=True`` at ``x0``. A Jacobian that is zero because the
    model is flat there (``b**2`` at ``b = 0``) keeps its graph and passes.
    """
    point = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            value = fun(point)
    except Exception:  # noqa: BLE001 - the exact Jacobian was computed; this is only a diagnosis
        return
    if not _traced(value):
        raise TypeError(
            "fun(x0) does not depend on x through torch autograd (torch.tensor(...), .numpy(), float() or "
            ".item() inside fun cut the graph), so its exact Jacobian reads as zero; write fun with torch "
            "operations (torch.stack instead of torch.tensor), or pass jac='2-point' or a jac callable."
        )


def _traced(value: Any) -> bool:
    """Whether autograd traces ``value`` (a tensor, or a list or tuple holding one) to its inputs.

    A numpy array or Python floats (``b.detach().numpy()``, ``[float(b[0]) - 1, ...]``) never are.
    """
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_traced(item) for item in value)
    return False


def _dense(value: Any) -> Any:
    """A sparse Jacobian (scipy.sparse or a torch sparse layout), as the dense matrix the solver factorises."""
    if isinstance(value, Tensor):
        return value.to_dense() if value.layout != torch.strided else value
    return value.toarray() if hasattr(value, "toarray") else value


def _check_real(name: str, value: Any, fix: str) -> None:
    """Refuse complex output, which the conversion to the real dtype of ``x`` would silently truncate."""
    try:
        complex_ = value.is_complex() if isinstance(value, Tensor) else np.iscomplexobj(value)
    except (TypeError, ValueError):  # no array at all (a ragged list): the conversion after names ``name``
        return
    if complex_:
        dtype = value.dtype if isinstance(value, Tensor) else np.asarray(value).dtype
        raise TypeError(f"{name} returned complex values (dtype {dtype}); expected real numbers: "
                        f"split them into real and imaginary parts, {fix}.")


def _first_linearization(problem: FunctionProblem, x: Tensor, m: int, jac: Any) -> Linearization:
    try:
        r, J = problem.residuals_and_jacobian(x)
    except (RuntimeError, TypeError) as error:
        if jac is None:
            raise TypeError(
                "fun could not be differentiated by torch autograd; write it with torch operations, "
                f"or pass jac='2-point' or a jac callable ({error})."
            ) from error
        raise
    if tuple(J.shape) != (m, x.shape[0]):
        raise ValueError(f"jac returned shape {tuple(J.shape)}; expected (m, n) = ({m}, {x.shape[0]}).")
    if not bool(torch.isfinite(J).all()):
        raise ValueError("The Jacobian at x0 is not finite; choose a starting point where fun is differentiable.")
    if jac is None and not bool(J.any()):
        _check_connected(problem.fun, x)
    lin = _linearization(r, J)
    if not _finite_linearization(lin):
        raise ValueError(
            f"J^T J or J^T r overflows {x.dtype} at x0 (largest |J| entry {float(J.abs().max()):.3g}, largest "
            f"|r| {float(r.abs().max()):.3g}); pass x0 in float64, or rescale fun or the parameters.")
    return lin


def _finite_linearization(lin: Linearization) -> bool:
    """Whether ``J``, ``J^T r`` and ``diag(J^T J)`` are finite (in float32 the products overflow
    from entries of about 1e19: NIST MGH10 from start 1 reaches them)."""
    return (bool(torch.isfinite(lin.grad).all()) and bool(torch.isfinite(lin.jac).all())
            and bool(torch.isfinite(lin.system.diagonal()).all()))
