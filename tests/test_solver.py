"""The LM core (solver.py, linalg.py): entry-point validation, solver paths, stopping tests.

Problems are defined once (``PROBLEMS``) and parametrised; bad inputs are a table with the error
each must raise; float64 results are compared with scipy and, for the NIST cases, with the
certified values.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize._lsq.least_squares import TERMINATION_MESSAGES as SCIPY_MESSAGES

from marquardt import TERMINATION_MESSAGES, NielsenDamping, least_squares
from marquardt.damping import DampingState, MarquardtDamping
from marquardt.linalg import (
    NormalEquations,
    SampleSpaceEquations,
    cosine_optimality,
    damped_lstsq,
    damping_for_radius,
    gauss_newton_step,
    range_cosine,
)
from marquardt.solver import FunctionProblem, Linearization, lm_step

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# problems, defined once

T = np.linspace(0.0, 4.0, 30)
DECAY_TRUE = np.array([3.0, 0.8, 0.5])
DECAY_Y = DECAY_TRUE[0] * np.exp(-DECAY_TRUE[1] * T) + DECAY_TRUE[2] + 0.02 * np.cos(5.0 * T)
S = np.array([0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0])
MM_Y = 1.7 * S / (0.9 + S) + 0.01 * np.sin(S)


def decay(b, t=T, y=DECAY_Y):
    t, y = torch.as_tensor(t, dtype=b.dtype), torch.as_tensor(y, dtype=b.dtype)
    return b[0] * torch.exp(-b[1] * t) + b[2] - y


def decay_jac(b):
    t = torch.as_tensor(T, dtype=b.dtype)
    e = torch.exp(-b[1] * t)
    return torch.stack([e, -b[0] * t * e, torch.ones_like(t)], dim=1)


def michaelis_menten(b, s=S, y=MM_Y):
    s, y = torch.as_tensor(s, dtype=b.dtype), torch.as_tensor(y, dtype=b.dtype)
    return b[0] * s / (b[1] + s) - y


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


@dataclass(frozen=True)
class Case:
    name: str
    fun: object
    x0: tuple


PROBLEMS = [
    Case("decay", decay, (1.0, 1.0, 0.0)),
    Case("michaelis_menten", michaelis_menten, (1.0, 1.0)),
    Case("rosenbrock", rosenbrock, (-1.2, 1.0)),
]


def scipy_reference(case, **kwargs):
    """scipy's MINPACK LM on the same residuals, tight tolerances: the reference minimiser."""
    options = dict(method="lm", ftol=1e-15, xtol=1e-15, gtol=1e-15) | kwargs
    return scipy.optimize.least_squares(lambda b: case.fun(torch.as_tensor(b)).numpy(), case.x0, **options)


# ---------------------------------------------------------------------------------------------
# the entry point validates everything, once

X0 = (1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("fun", "x0", "options", "error", "match"),
    [
        (decay, [1.0, math.inf, 0.0], {}, ValueError, r"x0 must be finite; received non-finite values at index 1"),
        (lambda b: decay(b) / b[2], X0, {}, ValueError, r"fun\(x0\) is not finite at residual index 0"),
        (lambda b: torch.outer(b, b), X0, {}, ValueError,
         r"must return a 1-D tensor of residuals; received shape \(3, 3\)"),
        (lambda b: b[:0], X0, {}, ValueError, r"fun\(x0\) returned no residuals"),
        (lambda b: 1e160 * (b + 1.0), X0, {}, ValueError, r"cost 0\.5 \* sum\(fun\(x0\)\*\*2\) overflows"),
        (decay, X0, dict(jac=lambda b: decay_jac(b).T), ValueError,
         r"jac returned shape \(3, 30\); expected \(m, n\) = \(30, 3\)"),
        (decay, X0, dict(damping="lbfgs"), ValueError,
         r"Invalid damping: 'lbfgs'; expected one of \['marquardt', 'nielsen'\]"),
        (decay, X0, dict(ftol=-1e-8), ValueError, r"Invalid ftol value: -1e-08; expected a finite number >= 0"),
        (decay, X0, dict(xtol=-1.0), ValueError, r"Invalid xtol value: -1.0"),
        (decay, X0, dict(gtol=-0.5), ValueError, r"Invalid gtol value: -0.5"),
        (decay, np.array([1, 1, 0]), {}, TypeError, r"x0 has integer dtype int64; expected a floating-point array"),
        (decay, torch.tensor([1, 1, 0]), {}, TypeError, r"x0 has dtype torch.int64; expected a floating-point tensor"),
    ],
    ids=["x0-inf", "fun-nan", "fun-2d", "fun-empty", "cost-overflow", "jac-shape", "damping", "ftol", "xtol",
         "gtol", "numpy-int", "torch-int"],
)
def test_bad_input_raises(fun, x0, options, error, match):
    with pytest.raises(error, match=match):
        least_squares(fun, x0, **options)


# ---------------------------------------------------------------------------------------------
# types in, types out


def test_numpy_in_gives_numpy_out():
    res = least_squares(decay, np.array(X0))
    for value in (res.x, res.fun, res.jac, res.grad, res.covariance, res.stderr):
        assert isinstance(value, np.ndarray) and value.dtype == np.float64


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.float64, 1e-7)])
def test_tensor_in_keeps_its_dtype(dtype, rel):
    res = least_squares(decay, torch.tensor(X0, dtype=dtype))
    for value in (res.x, res.fun, res.jac, res.covariance):
        assert isinstance(value, torch.Tensor) and value.dtype == dtype
    assert res.x.double().numpy() == pytest.approx(scipy_reference(PROBLEMS[0]).x, rel=rel)


# ---------------------------------------------------------------------------------------------
# the default run agrees with scipy, whatever the Jacobian


@pytest.mark.parametrize("case", PROBLEMS, ids=lambda c: c.name)
def test_default_run_reaches_scipys_minimiser(case):
    res = least_squares(case.fun, case.x0)
    reference = scipy_reference(case)
    assert res.success
    assert res.x == pytest.approx(reference.x, rel=1e-7, abs=1e-9)
    assert res.cost == pytest.approx(reference.cost, rel=1e-10, abs=1e-20)


@pytest.mark.parametrize("jac", ["2-point", decay_jac], ids=["2-point", "callable"])
def test_jacobian_modes_agree_with_the_exact_one(jac):
    exact = least_squares(decay, X0)
    other = least_squares(decay, X0, jac=jac)
    # Forward differences carry ~sqrt(eps) relative error into the steps; the minimiser is
    # the same, reached to the default tolerances.
    assert other.x == pytest.approx(exact.x, rel=1e-6)
    if callable(jac):
        assert other.jac == pytest.approx(exact.jac, rel=1e-12, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# linear-algebra paths


def _small_underdetermined():
    torch.manual_seed(3)
    jac = torch.randn(3, 7, dtype=F64)
    residuals = torch.randn(3, dtype=F64)
    return jac, residuals


def test_sample_space_step_equals_normal_equations_step_in_lm_step():
    jac, residuals = _small_underdetermined()
    x = torch.zeros(7, dtype=F64)
    scale = torch.linspace(0.5, 2.0, 7, dtype=F64)
    problem = FunctionProblem(lambda b: jac @ b + residuals, None, 3)
    rule = NielsenDamping()
    steps = []
    for system in (SampleSpaceEquations(jac, residuals), NormalEquations(jac.T @ jac, jac, residuals)):
        lin = Linearization(0.5 * float(residuals @ residuals), jac.T @ residuals, system, residuals, jac)
        out = lm_step(problem, x, lin, scale, rule, rule.init(1.0))
        assert out.accepted
        steps.append(out.step)
    assert system.path == "cholesky"
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)


def test_cholesky_and_qr_paths_agree():
    torch.manual_seed(4)
    jac = torch.randn(40, 4, dtype=F64)
    residuals = torch.randn(40, dtype=F64)
    scale = torch.rand(4, dtype=F64) + 0.1
    system = NormalEquations(jac.T @ jac, jac, residuals)
    cholesky = system.solve(jac.T @ residuals, 1e-2, scale)
    assert system.path == "cholesky"
    torch.testing.assert_close(cholesky, damped_lstsq(jac, residuals, 1e-2, scale), rtol=1e-10, atol=1e-12)


def test_ill_conditioned_normal_equations_fall_back_to_qr():
    # cond(J) ~ 1e9 with the columns mixed (no column scaling removes it): J^T J (cond 1e18)
    # is refused by the Cholesky condition test.
    torch.manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 3, dtype=F64))
    mix, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64))
    jac = (q * torch.tensor([1.0, 1e-4, 1e-9], dtype=F64)) @ mix.T
    residuals = torch.randn(20, dtype=F64)
    system = NormalEquations(jac.T @ jac, jac, residuals)
    step = system.solve(jac.T @ residuals, 0.0, torch.ones(3, dtype=F64))
    assert system.path == "qr"
    # Forward error of any backward-stable solve: a small multiple of cond(J) * eps = 2e-7.
    torch.testing.assert_close(step, gauss_newton_step(jac, residuals), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_badly_scaled_parameters_keep_cholesky_and_every_direction(dtype):
    # Orthogonal columns of sizes 1e3 and 1e-3: cond(J^T J) = 1e12 (past float32's and
    # float64's unscaled test) but 1 once the columns are scaled. The step must keep both
    # directions; an unscaled test sent float32 to a QR solve whose rank cutoff dropped one.
    torch.manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(30, 2, dtype=F64))
    jac64 = q * torch.tensor([1e3, 1e-3], dtype=F64)
    residuals64 = torch.randn(30, dtype=F64)
    jac, residuals = jac64.to(dtype), residuals64.to(dtype)
    system = NormalEquations(jac.T @ jac, jac, residuals)
    step = system.solve(jac.T @ residuals, 0.0, torch.ones(2, dtype=dtype))
    assert system.path == "cholesky"
    expected = gauss_newton_step(jac64, residuals64)
    torch.testing.assert_close(step.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)


def test_qr_fallback_keeps_the_direction_of_a_small_parameter():
    # A column 1e-6 the size of the others, below float32's unscaled rank cutoff
    # (eps * max(m, n) ~ 5e-6 of the largest singular value): on unit-norm columns it is kept.
    torch.manual_seed(8)
    jac64 = torch.randn(40, 3, dtype=F64) * torch.tensor([1.0, 1.0, 1e-6], dtype=F64)
    residuals64 = torch.randn(40, dtype=F64)
    step = damped_lstsq(jac64.float(), residuals64.float(), 0.0, torch.ones(3))
    expected = torch.linalg.lstsq(jac64, -residuals64[:, None]).solution[:, 0]
    torch.testing.assert_close(step.double(), expected, rtol=1e-4, atol=0.0)


def test_gauss_newton_step_is_the_least_squares_solution_whatever_the_units():
    torch.manual_seed(6)
    jac = torch.randn(25, 4, dtype=F64) * torch.tensor([1e-6, 1.0, 1e3, 1e8], dtype=F64)
    residuals = torch.randn(25, dtype=F64)
    step = gauss_newton_step(jac, residuals)
    # Normal equations of the least-squares problem hold to rounding, column by column.
    normal = jac.T @ (jac @ step + residuals) / torch.linalg.vector_norm(jac, dim=0)
    assert float(normal.abs().max()) < 1e-12 * float(torch.linalg.vector_norm(residuals))


def test_range_cosine_bounds_the_column_cosines_and_sees_parallel_columns():
    # Two nearly parallel columns, each almost orthogonal to r, whose difference is along r.
    t = torch.linspace(0.0, 1.0, 50, dtype=F64)
    direction = torch.sin(7 * t)
    base = torch.cos(3 * t)
    base = base - (base @ direction) / (direction @ direction) * direction
    jac = torch.stack([base + 1e-6 * direction, base - 1e-6 * direction], dim=1)
    residuals = direction
    assert cosine_optimality(jac, residuals) < 1e-5
    assert range_cosine(jac, residuals) == pytest.approx(1.0, rel=1e-6)
    assert range_cosine(jac, torch.zeros(50, dtype=F64)) == 0.0


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12), n=st.integers(1, 6))
def test_range_cosine_is_at_least_every_column_cosine(seed, m, n):
    generator = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, dtype=F64, generator=generator)
    residuals = torch.randn(m, dtype=F64, generator=generator)
    assert range_cosine(jac, residuals) >= cosine_optimality(jac, residuals) - 1e-12


@pytest.mark.parametrize("radius", [1e-3, 0.1, 1.0])
def test_damping_for_radius_gives_a_step_of_that_length(radius):
    torch.manual_seed(7)
    jac = torch.randn(15, 3, dtype=F64)
    residuals = torch.randn(15, dtype=F64)
    scale = (jac * jac).sum(0)
    damping = damping_for_radius(jac, residuals, scale, radius)
    step = NormalEquations(jac.T @ jac, jac, residuals).solve(jac.T @ residuals, damping, scale)
    assert float(torch.linalg.vector_norm(scale.sqrt() * step)) == pytest.approx(radius, rel=2e-3)


def test_damping_for_radius_is_zero_when_the_gauss_newton_step_fits():
    jac = torch.eye(2, dtype=F64)
    residuals = torch.tensor([3.0, 4.0], dtype=F64)
    assert damping_for_radius(jac, residuals, torch.ones(2, dtype=F64), 5.0) == 0.0


# ---------------------------------------------------------------------------------------------
# lm_step: trials rejected before evaluation


@dataclass
class CountingProblem:
    """A FunctionProblem that records the points where the cost is evaluated."""

    inner: FunctionProblem
    points: list

    def linearize(self, x):
        return self.inner.linearize(x)

    def cost(self, x):
        self.points.append(x.clone())
        return self.inner.cost(x)


@dataclass
class BoundedSolves:
    """A linear system that fails the test once it has been solved ``limit`` times: an iteration
    that would never end fails instead (a NaN step is rejected without a cost evaluation)."""

    system: object
    limit: int = 10_000
    calls: int = 0

    def solve(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError(f"{self.limit} trial steps: the iteration never ends")
        return self.system.solve(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.system, name)


class RejectingProblem(FunctionProblem):
    """Every trial is non-finite: a rejected trial."""

    def cost(self, x):
        return math.inf


@pytest.mark.parametrize("rule", [MarquardtDamping(), NielsenDamping()], ids=["marquardt", "nielsen"])
@pytest.mark.parametrize("damping, nu", [(0.0, 2.0), (math.nan, 2.0), (-1e-3, 2.0), (1e-3, 0.0), (1e-3, math.nan)])
def test_lm_step_ends_at_a_damping_no_rejection_can_raise(rule, damping, nu):
    # A damping of 0 (underflowed), NaN or negative stays so at every rejection (0 * 10 = 0),
    # never past the maximum, and lm_step without a trial limit tried forever; Nielsen's nu of 0
    # or NaN leads there. Such a damping now counts as exhausted.
    x = torch.tensor(X0, dtype=F64)
    problem = RejectingProblem(decay, None, 30)
    lin = problem.linearize(x)
    system = lin.system = BoundedSolves(lin.system)
    out = lm_step(problem, x, lin, torch.ones_like(x), rule, DampingState(damping, nu))
    assert out.exhausted and not out.accepted and torch.equal(out.x, x)
    assert system.calls <= 14  # Marquardt's from 1e-3 (nu unused) climbs past 1e10 in 14 trials


@pytest.mark.parametrize("rule, skipped", [(MarquardtDamping(initial=1e-6), True), (NielsenDamping(), False)])
def test_lm_step_without_predict_skips_the_model_only_for_a_rule_that_ignores_it(rule, skipped):
    x = torch.tensor(X0, dtype=F64)
    problem = FunctionProblem(decay, None, 30)
    lin = problem.linearize(x)
    scale = torch.ones_like(x)
    full = lm_step(problem, x, lin, scale, rule, rule.init(1.0))
    lean = lm_step(problem, x, lin, scale, rule, rule.init(1.0), predict=False)
    assert torch.equal(full.x, lean.x) and full.state == lean.state and full.n_trials == lean.n_trials
    assert math.isnan(lean.gain_ratio) == skipped and math.isnan(lean.predicted_reduction) == skipped
    assert math.isfinite(full.gain_ratio)


def test_lm_step_never_evaluates_a_trial_outside_the_radius():
    x = torch.tensor(X0, dtype=F64)
    problem = CountingProblem(FunctionProblem(decay, None, 30), [])
    lin = problem.linearize(x)
    scale = lin.system.diagonal()
    radius = 0.05 * float(torch.linalg.vector_norm(scale.sqrt() * x))
    rule = NielsenDamping()
    out = lm_step(problem, x, lin, scale, rule, rule.init(1.0), max_step=radius)
    assert out.accepted and out.n_trials == len(problem.points) >= 1
    for point in problem.points:
        assert float(torch.linalg.vector_norm(scale.sqrt() * (point - x))) <= radius * (1 + 1e-12)


def test_lm_step_rejects_a_trial_whose_acceleration_is_refused_without_evaluating_it():
    x = torch.tensor(X0, dtype=F64)
    problem = CountingProblem(FunctionProblem(decay, None, 30), [])
    lin = problem.linearize(x)
    scale = lin.system.diagonal()
    rule = NielsenDamping()
    refusals = []

    def refuse_twice(point, velocity, _, damping, scale_):
        refusals.append(damping)
        return None if len(refusals) <= 2 else torch.zeros_like(velocity)

    state = rule.init(1.0)
    out = lm_step(problem, x, lin, scale, rule, state, geodesic=refuse_twice)
    assert len(refusals) >= 3 and refusals[1] > refusals[0] and refusals[2] > refusals[1]
    assert out.n_trials == len(problem.points) == len(refusals) - 2


# ---------------------------------------------------------------------------------------------
# robustness


@pytest.mark.parametrize("jac", [None, "2-point"], ids=["exact", "2-point"])
def test_non_finite_trial_is_rejected_and_result_is_finite(jac):
    # exp(b) - e^3 from b = 0: the undamped step goes to b = 20, where the residual is NaN.
    nan_trials = []

    def fun(b):
        value = torch.exp(b) - math.exp(3.0)
        if bool((b > 5.0).any()):
            nan_trials.append(float(b[0]))
            return value * math.nan
        return value

    res = least_squares(fun, [0.0], jac=jac)
    assert nan_trials, "the test must exercise a non-finite trial"
    assert res.success and np.isfinite(res.x).all() and np.isfinite(res.fun).all()
    assert res.x[0] == pytest.approx(3.0, rel=1e-10)


@pytest.mark.parametrize("damping", ["nielsen", "marquardt"])
def test_point_with_non_finite_jacobian_is_rejected_and_the_damping_rises(damping):
    # The cost falls all the way to b = 1, but the Jacobian is undefined beyond b = 0.7. The
    # trial that lands there lowers the cost and must still be rejected with more damping than
    # it was computed with; the rejection used to start from the state after the accepting
    # update (lower damping), so the same step was retried until max_nfev (1000) ran out.
    def jac(b):
        return torch.full((1, 1), math.nan if float(b[0]) > 0.7 else 1.0, dtype=b.dtype)

    reports = []
    res = least_squares(lambda b: b - 1.0, [0.5], jac=jac, damping=damping, callback=reports.append)
    assert res.status != 0 and res.nfev < 100
    assert np.isfinite(res.jac).all() and 0.7 - 1e-6 < res.x[0] <= 0.7
    assert all(float(info.x[0]) <= 0.7 for info in reports)
    assert not reports[0].accepted  # the first step reached b = 1 and was refused


def test_trust_radius_keeps_a_saturating_parameter_from_evaporating():
    # BoxBOD (NIST) from start 1: the damped step with Nielsen's tau sends b2 from 1 to 115,
    # where exp(-b2 x) and its Jacobian column vanish; the first step is now bounded.
    x = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 10.0], dtype=F64)
    y = torch.tensor([109.0, 149.0, 149.0, 191.0, 213.0, 224.0], dtype=F64)
    res = least_squares(lambda b: b[0] * (1 - torch.exp(-b[1] * x)) - y, [1.0, 1.0])
    assert res.x == pytest.approx([213.80940889, 0.54723748542], rel=1e-5)  # certified values


# ---------------------------------------------------------------------------------------------
# geodesic acceleration


def test_geodesic_acceleration_solves_rosenbrock():
    res = least_squares(rosenbrock, [-1.2, 1.0], geodesic=True)
    assert res.success and res.x == pytest.approx([1.0, 1.0], abs=1e-10)


def test_geodesic_acceleration_solves_a_nist_case():
    nist = pytest.importorskip("marquardt.nist")
    try:
        problem = nist.load_problem("Misra1a")
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f"NIST data not available: {error}")
    res = least_squares(problem.residual_function(), torch.tensor(problem.starts[0], dtype=F64), geodesic=True)
    assert res.success and nist.lre(res.x.numpy(), problem.certified) >= 6


# ---------------------------------------------------------------------------------------------
# status codes, messages, statistics


def test_termination_messages_are_scipys():
    assert TERMINATION_MESSAGES == SCIPY_MESSAGES


def _stop_at_second_iteration(info):
    if info.n_iter == 2:
        raise StopIteration


@pytest.mark.parametrize(
    ("fun", "x0", "options", "status"),
    [
        (decay, X0, dict(max_nfev=3), 0),
        (lambda b: b - 1.0, [1.0, 1.0], {}, 1),  # starts at the solution: r = 0
        (decay, X0, dict(xtol=0.0, gtol=0.0), 2),
        (decay, X0, dict(ftol=0.0, gtol=0.0, xtol=1e-6), 3),
        (decay, X0, dict(xtol=None, gtol=None), 2),  # None disables a test, as in scipy
        (decay, X0, dict(ftol=None, gtol=None, xtol=1e-6), 3),
        (decay, X0, dict(ftol=None, xtol=None, gtol=1e-6), 1),
        (decay, X0, dict(callback=_stop_at_second_iteration), -2),
        (decay, X0, dict(callback=lambda info: info.n_iter == 1), -2),
    ],
    ids=["max_nfev", "gtol", "ftol", "xtol", "ftol-others-none", "xtol-others-none", "gtol-others-none",
         "callback-raises", "callback-returns-true"],
)
def test_status_message_and_success_follow_scipys_table(fun, x0, options, status):
    res = least_squares(fun, x0, **options)
    assert res.status == status
    assert res.message == SCIPY_MESSAGES[status]
    assert res.success == (status > 0)


def test_covariance_and_stderr_equal_curve_fit():
    def model(t, a, k, c):
        return a * np.exp(-k * t) + c

    popt, pcov = scipy.optimize.curve_fit(model, T, DECAY_Y, p0=X0, method="lm", ftol=1e-15, xtol=1e-15, gtol=1e-15)
    res = least_squares(decay, X0)  # default tolerances
    assert res.x == pytest.approx(popt, rel=1e-8)
    assert res.covariance == pytest.approx(pcov, rel=1e-6)
    assert res.stderr == pytest.approx(np.sqrt(np.diag(pcov)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# property: random well-posed problems agree with scipy's MINPACK


# Parameter ranges where the curve bends inside t in [0.1, 5] and the noise leaves every
# parameter determined (a rational curve with b2 = 0.2 and noise 0.1 is fitted as well by
# b1 -> inf, b2 -> 0: not a well-posed problem, and not a comparison of solvers).
MODELS = {
    "exponential": (lambda b, t: b[0] * torch.exp(-b[1] * t) + b[2], (1.0, 5.0), (0.3, 2.0), (-1.0, 1.0)),
    "rational": (lambda b, t: b[0] * t / (b[1] + t) + b[2], (1.0, 5.0), (0.5, 3.0), (-1.0, 1.0)),
}


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    model=st.sampled_from(sorted(MODELS)),
    fractions=st.tuples(*[st.floats(0.0, 1.0)] * 3),
    noise=st.sampled_from([0.0, 0.01, 0.05]),
    seed=st.integers(0, 2**16),
)
def test_random_well_posed_problems_agree_with_scipy(model, fractions, noise, seed):
    function, *ranges = MODELS[model]
    true = [low + f * (high - low) for f, (low, high) in zip(fractions, ranges)]
    t = torch.linspace(0.1, 5.0, 40, dtype=F64)
    rng = np.random.default_rng(seed)
    y = function(torch.tensor(true, dtype=F64), t) + noise * torch.as_tensor(rng.standard_normal(40))
    start = [true[0] * 1.4, true[1] * 0.6, true[2] + 0.3]

    def residuals(b):
        return function(b, t) - y

    reference = scipy.optimize.least_squares(lambda b: residuals(torch.as_tensor(b)).numpy(), start, method="lm",
                                             ftol=1e-15, xtol=1e-15, gtol=1e-15)
    tight = least_squares(residuals, start, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    assert tight.success and tight.cost <= reference.cost * (1 + 1e-10) + 1e-28
    assert tight.x == pytest.approx(reference.x, rel=1e-6, abs=1e-8)
    # With the default tolerances a noisy fit stops within ~1e-4 standard errors of the minimiser
    # (the ftol certificate); on 400 draws the largest relative gap was 1.2e-6 (scipy's default
    # run: 1.1e-5).
    default = least_squares(residuals, start)
    assert default.success and default.x == pytest.approx(reference.x, rel=1e-4, abs=1e-6)


def test_callback_sees_each_iteration_and_can_stop_the_run():
    seen = []

    def callback(info):
        seen.append((info.n_iter, info.accepted, info.cost))
        if len(seen) == 3:
            raise StopIteration

    res = least_squares(decay, X0, callback=callback)
    assert res.status == -2 and not res.success
    assert [n for n, _, _ in seen] == [1, 2, 3]
    assert res.cost == pytest.approx(seen[-1][2])


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MarquardtDamping, dict(initial=True), "Invalid damping value: True; expected a finite number > 0"),
        (MarquardtDamping, dict(decrease="0.1"), "Invalid damping_dec value: '0.1'; expected a real number"),
        (MarquardtDamping, dict(increase=None), "Invalid damping_inc value: None; expected a real number"),
        (MarquardtDamping, dict(maximum=np.True_), "Invalid damping_max value: np.True_"),
        (NielsenDamping, dict(tau=-1.0), "Invalid tau value: -1.0"),
    ],
)
def test_damping_rules_reject_bad_options(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_damping_rules_take_numpy_scalars_as_floats():
    rule = MarquardtDamping(np.float32(0.25), np.float64(0.5), np.int64(4), np.float64(1e3))
    assert [type(v) for v in (rule.initial, rule.decrease, rule.increase, rule.maximum)] == [float] * 4
    assert rule.update(rule.init(1.0), accepted=False, gain_ratio=-1.0).damping == 1.0
    assert type(NielsenDamping(np.float32(0.5)).tau) is float


@pytest.mark.parametrize("rule", [MarquardtDamping(), NielsenDamping()], ids=["marquardt", "nielsen"])
def test_lm_step_rejects_every_trial_of_a_matrix_free_system_whose_products_are_nan(rule):
    # A NaN Jacobian-vector product inside CG raised torch.linalg.lstsq's internal assertion
    # ("Argument 4 has illegal value") out of lm_step; now each trial's step is NaN, rejected
    # without a cost evaluation, and x is untouched when the damping gives up.
    from marquardt.matfree import MatrixFreeEquations

    x = torch.tensor(X0, dtype=F64)
    inner = FunctionProblem(decay, None, 30)
    problem = CountingProblem(inner, [])
    lin = inner.linearize(x)
    jac = lin.jac
    lin.system = MatrixFreeEquations(lambda v: torch.full((jac.shape[0],), math.nan, dtype=F64),
                                     lambda u: jac.T @ u, (jac * jac).sum(0), precondition=False)
    out = lm_step(problem, x, lin, torch.ones_like(x), rule, rule.init(1.0))
    assert out.exhausted and not out.accepted and torch.equal(out.x, x) and problem.points == []
