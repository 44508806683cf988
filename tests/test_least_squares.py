"""least_squares: bad input, types and devices, Jacobian modes, solver paths, statistics, scipy agreement."""

import dataclasses
import math
import re
import warnings

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import marquardt
from marquardt import TERMINATION_MESSAGES, least_squares
from marquardt.damping import DampingState, MarquardtDamping
from marquardt.jacobian import finite_difference_jacobian, residuals_and_jacobian
from marquardt.linalg import NormalEquations, SampleSpaceEquations, damped_lstsq
from marquardt.nist import load_problem, lre

T = np.linspace(0.0, 3.0, 25)
TRUE = np.array([2.5, 1.3, 0.4])
Y = TRUE[0] * np.exp(-TRUE[1] * T) + TRUE[2] + 0.01 * np.sin(7 * T)


def decay(b, t=T, y=Y):
    t, y = torch.as_tensor(t, dtype=b.dtype), torch.as_tensor(y, dtype=b.dtype)
    return b[0] * torch.exp(-b[1] * t) + b[2] - y


def decay_jac(b):
    t = torch.as_tensor(T, dtype=b.dtype)
    e = torch.exp(-b[1] * t)
    return torch.stack([e, -b[0] * t * e, torch.ones_like(t)], dim=1)


X0 = [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("fun", "x0", "kwargs", "error", "match"),
    [
        (decay, [1.0, math.nan, 0.0], {}, ValueError, "x0 must be finite; received non-finite values at index 1"),
        (lambda b: decay(b) / (b[2] - 0.0), X0, {}, ValueError, r"fun\(x0\) is not finite at residual index 0"),
        (lambda b: decay(b).reshape(5, 5), X0, {}, ValueError, r"fun\(x0\) must return a 1-D tensor of residuals; received shape \(5, 5\)"),
        (lambda b: decay(b)[:0], X0, {}, ValueError, r"fun\(x0\) returned no residuals"),
        (decay, X0, dict(jac=lambda b: decay_jac(b)[:, :2]), ValueError, r"jac returned shape \(25, 2\); expected \(m, n\) = \(25, 3\)"),
        (decay, X0, dict(damping="levenberg"), ValueError, "Invalid damping: 'levenberg'"),
        (decay, X0, dict(ftol=-1.0), ValueError, "Invalid ftol value: -1.0"),
        (decay, X0, dict(xtol=-1e-8), ValueError, "Invalid xtol value: -1e-08"),
        (decay, X0, dict(gtol=math.inf), ValueError, "Invalid gtol value: inf"),
        (decay, X0, dict(max_nfev=0), ValueError, "Invalid max_nfev value: 0"),
        (decay, X0, dict(x_scale=-1.0), ValueError, "Invalid x_scale"),
        # numpy's own conversion errors ("could not convert string to float: 'a'", "float()
        # argument must be ... not 'complex'") named no argument; a bool was taken as scale 1
        (decay, X0, dict(x_scale=["a", "b", "c"]), ValueError, r"Invalid x_scale: .* received \['a', 'b', 'c'\]"),
        (decay, X0, dict(x_scale=[1.0, 2j, 1.0]), ValueError, r"Invalid x_scale: .* received \[1.0, 2j, 1.0\]"),
        (decay, X0, dict(x_scale=True), ValueError, r"Invalid x_scale: .* received True"),
        (decay, X0, dict(x_scale=[[1.0], [1.0, 2.0]]), ValueError, r"Invalid x_scale: .* 3 positive numbers"),
        (decay, X0, dict(jac="3-point"), ValueError, "Invalid jac: '3-point'"),
        (decay, np.array([1, 1, 0]), {}, TypeError, "x0 has integer dtype int64"),
        (decay, torch.tensor([1, 1, 0]), {}, TypeError, "x0 has dtype torch.int64"),
        (decay, np.zeros((3, 1)), {}, ValueError, r"x0 must be 1-D; received shape \(3, 1\)"),
        ("not callable", X0, {}, TypeError, "fun must be callable"),
        (lambda b: decay(b) * (1 + 0j), X0, {}, TypeError,
         r"fun\(x0\) returned complex values \(dtype torch.complex128\); expected real numbers"),
        (lambda b: decay(b).numpy() + 1j, X0, dict(jac="2-point"), TypeError,
         r"fun\(x0\) returned complex values \(dtype complex128\)"),
        (decay, X0, dict(jac=lambda b: decay_jac(b) * (1 + 0j)), TypeError, r"jac returned complex values"),
        # torch's own conversion error ("can't convert np.ndarray of type numpy.object_") named no argument
        (decay, X0, dict(jac=lambda b: None), TypeError,
         r"jac must return the \(m, n\) = \(25, 3\) Jacobian .*; received None \(a missing return\?\) at x = \[1\. 1\. 0\.\]"),
        (decay, X0, dict(jac=lambda b: "J"), TypeError, r"jac must return the \(m, n\) = \(25, 3\) Jacobian .*; received str 'J'"),
        (decay, X0, dict(jac=lambda b: {"J": decay_jac(b)}), TypeError, r"jac must return .*; received dict \{'J': "),
        # ragged: numpy's "inhomogeneous shape" ValueError, naming no argument, for jac and fun
        (decay, X0, dict(jac=lambda b: [[1.0, 2.0, 3.0]] * 24 + [[1.0, 2.0]]), TypeError,
         r"jac must return .*; received list \[\[1\.0, 2\.0, 3\.0\], "),
        (lambda b: [[1.0, 2.0], [3.0]], X0, dict(jac="2-point"), TypeError,
         r"fun\(x0\) must return a 1-D tensor of residuals; received list"),
        (decay, torch.tensor(X0, dtype=torch.float16), {}, TypeError,
         r"x0 has dtype torch.float16; expected torch.float32 or torch.float64"),
        (decay, X0, dict(ftol=True), ValueError, "Invalid ftol value: True"),
        # every convergence test off: the end would be reported as an ftol stop (scipy refuses too)
        (decay, X0, dict(ftol=None, xtol=None, gtol=None), ValueError,
         r"Invalid tolerances: ftol=None, xtol=None, gtol=None; at least one must be a number above machine epsilon"),
        (decay, X0, dict(ftol=0.0, xtol=1e-17, gtol=None), ValueError, r"Invalid tolerances: ftol=0.0, xtol=1e-17"),
        (decay, X0, dict(max_nfev=True), ValueError, "Invalid max_nfev value: True"),
        (lambda b, c: decay(b) * c, X0, dict(args=2.0), TypeError,
         r"args must be a tuple of extra arguments for fun; received float 2.0 \(write args=\(2.0,\)"),
        (decay, X0, dict(kwargs=[1]), TypeError, "kwargs must be a dict of keyword arguments for fun; received list"),
        # Python's "keywords must be strings", at the first call of fun, named neither kwargs nor the key
        (decay, X0, dict(kwargs={1: 2.0}), TypeError, r"kwargs must map argument names \(str\) to values; received key 1 of type int"),
        (decay, X0, dict(callback="print"), TypeError, "callback must be callable or None; received str"),
        # numpy's own conversion errors, naming no argument
        (decay, [[1.0], [1.0, 2.0]], {}, TypeError, r"x0 must be a 1-D array-like of numbers or a tensor; received list"),
        (decay, [torch.tensor(1.0, requires_grad=True), 1.0, 0.0], {}, TypeError,
         r"x0 must be a 1-D array-like of numbers or a tensor; received list"),
        pytest.param(lambda b: torch.tensor([b[0] - 1.0, b[1] - 2.0]), X0, {}, TypeError,
                     r"fun\(x0\) does not depend on x through torch autograd",
                     marks=pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")),
        (lambda b: torch.from_numpy(decay(b).detach().numpy()), X0, {}, TypeError,
         r"fun\(x0\) does not depend on x through torch autograd"),
        # numpy or Python floats out: the zero Jacobian used to pass the gtol test at x0, success=True
        (lambda b: decay(b).detach().numpy(), X0, {}, TypeError, r"fun\(x0\) does not depend on x through torch autograd"),
        (lambda b: [float(b[0]) - 1.0, float(b[1]) - 2.0, float(b[2])], X0, {}, TypeError,
         r"fun\(x0\) does not depend on x through torch autograd"),
    ],
)
def test_bad_input_raises_before_iterating(fun, x0, kwargs, error, match):
    with pytest.raises(error, match=match):
        least_squares(fun, x0, **kwargs)


def test_a_jac_that_returns_none_past_x0_is_a_type_error_naming_it():
    # Checked at every point, as its shape is: past x0 the raw torch error named no argument either.
    calls = []

    def jac(b):
        calls.append(None)
        return decay_jac(b) if len(calls) == 1 else None

    with pytest.raises(TypeError, match=r"jac must return the \(m, n\) = \(25, 3\) Jacobian .*; received None"):
        least_squares(decay, X0, jac=jac)
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("options", "jac"),
    [
        (dict(ftol=np.float32(1e-10), xtol=np.float64(1e-10), gtol=np.float32(1e-10)), None),
        (dict(max_nfev=np.int32(50)), None),
        ({}, lambda b: torch.as_tensor(decay_jac(b)).to_sparse()),
        ({}, lambda b: scipy.sparse.csr_matrix(decay_jac(b).numpy())),
    ],
    ids=["numpy-tolerances", "numpy-max-nfev", "torch-sparse-jac", "scipy-sparse-jac"],
)
def test_numpy_scalars_and_sparse_jacobians_are_accepted(options, jac):
    # np.float32 is not a Python float: it used to be refused as a tolerance; sparse Jacobians
    # (as scipy users return them) failed deep inside the solver.
    res = least_squares(decay, X0, jac=jac, **options)
    reference = least_squares(decay, X0)
    assert res.success and res.x == pytest.approx(reference.x, rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [dict(jac="3-point"), dict(jac=np.eye(3)), dict(callback=1), dict(args=1.0), dict(ftol=-1.0), dict(x_scale=0.0),
     dict(damping="levenberg")],
    ids=["jac-name", "jac-array", "callback", "args", "ftol", "x_scale", "damping"],
)
def test_options_are_validated_before_fun_is_called(options):
    calls = []

    def fun(b, *args):
        calls.append(b)
        return decay(b)

    with pytest.raises((TypeError, ValueError)):
        least_squares(fun, X0, **options)
    assert calls == []


def test_numpy_in_numpy_out_float64():
    res = least_squares(decay, np.array(X0))
    assert isinstance(res.x, np.ndarray) and res.x.dtype == np.float64
    assert isinstance(res.jac, np.ndarray) and res.jac.shape == (25, 3)
    assert res.success and res.status in (1, 2, 3, 4)
    assert res.message == TERMINATION_MESSAGES[res.status]


def test_result_has_scipys_fields_including_the_active_mask():
    ours = least_squares(decay, X0)
    theirs = scipy.optimize.least_squares(lambda b: decay(torch.as_tensor(b)).numpy(), X0, method="lm")
    missing = [key for key in theirs.keys() if not hasattr(ours, key)]
    assert missing == []
    assert ours.active_mask.dtype == theirs.active_mask.dtype and ours.active_mask.tolist() == [0, 0, 0]
    assert least_squares(decay, torch.tensor(X0)).active_mask.tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_in_keeps_dtype(dtype):
    res = least_squares(decay, torch.tensor(X0, dtype=dtype))
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    reference = scipy.optimize.least_squares(lambda b: decay(torch.as_tensor(b)).numpy(), X0, method="lm",
                                             ftol=1e-14, xtol=1e-14, gtol=1e-14)
    assert res.x.double().numpy() == pytest.approx(reference.x, rel=tol, abs=tol)


@pytest.mark.parametrize("jac", [None, decay_jac, "2-point"])
def test_jacobian_modes_agree(jac):
    res = least_squares(decay, X0, jac=jac, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    exact = least_squares(decay, X0, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    assert res.x == pytest.approx(exact.x, rel=1e-6)


def test_args_and_kwargs_reach_fun():
    res = least_squares(lambda b, t, y=None: decay(b, t, y), X0, args=(T,), kwargs={"y": Y})
    assert res.x == pytest.approx(least_squares(decay, X0).x, rel=1e-10)


def test_sample_space_step_equals_normal_equations_step():
    torch.manual_seed(0)
    jac = torch.randn(4, 9, dtype=torch.float64)
    r = torch.randn(4, dtype=torch.float64)
    scale = torch.rand(9, dtype=torch.float64) + 0.5
    grad = jac.T @ r
    dense = NormalEquations(jac.T @ jac, jac, r).solve(grad, 0.3, scale)
    small = SampleSpaceEquations(jac, r).solve(grad, 0.3, scale)
    assert torch.allclose(dense, small, rtol=1e-10, atol=1e-12)


def test_qr_fallback_equals_cholesky_step():
    torch.manual_seed(1)
    jac = torch.randn(30, 5, dtype=torch.float64)
    r = torch.randn(30, dtype=torch.float64)
    scale = torch.ones(5, dtype=torch.float64)
    cholesky = NormalEquations(jac.T @ jac, jac, r).solve(jac.T @ r, 0.1, scale)
    qr = damped_lstsq(jac, r, 0.1, scale)
    assert torch.allclose(cholesky, qr, rtol=1e-10, atol=1e-12)


def test_underdetermined_problem_uses_residual_space_and_converges():
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    res = least_squares(lambda x: torch.stack([x[0] * x[1], x[2] + x[3] ** 2]) - target, [1.0, 1.0, 1.0, 1.0])
    assert res.cost < 1e-20
    assert np.all(np.isinf(res.covariance))


def test_non_finite_trials_are_rejected_and_result_is_finite():
    # log(b) is NaN for b < 0: the full Gauss-Newton step from b = 1 overshoots into it.
    y = torch.tensor([-5.0, -5.0], dtype=torch.float64)
    res = least_squares(lambda b: torch.log(b[0]) * torch.ones(2, dtype=b.dtype) - y, [1.0])
    assert np.isfinite(res.x).all() and res.x[0] > 0
    assert res.x[0] == pytest.approx(math.exp(-5.0), rel=1e-6)


def test_rosenbrock_with_and_without_geodesic_acceleration():
    rosen = lambda x: torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])  # noqa: E731
    plain = least_squares(rosen, [-1.2, 1.0])
    accelerated = least_squares(rosen, [-1.2, 1.0], geodesic=True)
    for res in (plain, accelerated):
        assert res.x == pytest.approx([1.0, 1.0], abs=1e-8)


def test_marquardt_damping_rule_converges_too():
    res = least_squares(decay, X0, damping="marquardt")
    assert res.x == pytest.approx(least_squares(decay, X0).x, rel=1e-6)


def test_covariance_and_stderr_equal_curve_fit():
    model = lambda t, a, k, c: a * np.exp(-k * t) + c  # noqa: E731
    popt, pcov = scipy.optimize.curve_fit(model, T, Y, p0=X0, method="lm", ftol=1e-14, xtol=1e-14, gtol=1e-14)
    res = least_squares(decay, X0, ftol=1e-14, xtol=1e-14, gtol=1e-14)
    assert res.x == pytest.approx(popt, rel=1e-8)
    assert res.covariance == pytest.approx(pcov, rel=1e-6)
    assert res.stderr == pytest.approx(np.sqrt(np.diag(pcov)), rel=1e-6)


@pytest.mark.parametrize(
    ("fun", "undetermined"),
    [
        (lambda b: decay(torch.stack([b[0] * b[3], b[1], b[2]])), [0, 3]),  # a enters as b0 * b3
        (lambda b: decay(b[:3]) + 0 * b[3], [3]),  # b3 has no effect
    ],
    ids=["product", "dead"],
)
def test_undetermined_parameters_get_inf_standard_errors_and_a_warning(fun, undetermined):
    # pinv(J^T J) gave them small finite standard errors (the product: 0.0126 each; the dead
    # parameter: 0.0) and no warning; the determined ones keep curve_fit's values for the
    # 3-parameter model, rescaled to 21 degrees of freedom instead of 22.
    model = lambda t, a, k, c: a * np.exp(-k * t) + c  # noqa: E731
    _, pcov = scipy.optimize.curve_fit(model, T, Y, p0=X0, method="lm", ftol=1e-14, xtol=1e-14, gtol=1e-14)
    with pytest.warns(RuntimeWarning, match=rf"parameters {re.escape(str(undetermined))} are not determined by the data"):
        res = least_squares(fun, [1.0, 1.0, 0.0, 1.0], ftol=1e-14, xtol=1e-14, gtol=1e-14)
    determined = [j for j in range(4) if j not in undetermined]
    expected = np.sqrt(np.diag(pcov) * 22 / 21)[[j for j in determined if j < 3]]
    assert res.stderr[determined] == pytest.approx(expected, rel=1e-6)
    assert np.all(np.isinf(res.stderr[undetermined]))
    assert np.all(np.isinf(res.covariance[undetermined])) and np.all(np.isinf(res.covariance[:, undetermined]))


def test_float32_standard_errors_do_not_depend_on_the_units_of_the_parameters():
    # Misra1a's two Jacobian columns differ by 1e5: on the raw float32 J the smaller singular
    # value fell under the rank cutoff and b1's standard error came out 4.5e-13 of NIST's.
    p = load_problem("Misra1a")
    res = least_squares(p.residual_function(torch.float32), torch.tensor(p.certified, dtype=torch.float32))
    assert res.stderr.numpy() == pytest.approx(p.certified_stderr, rel=1e-4)


def test_callback_stop_gives_status_minus_two():
    seen = []

    def callback(info):
        seen.append(info.n_iter)
        if info.n_iter == 2:
            raise StopIteration

    res = least_squares(decay, X0, callback=callback)
    assert res.status == -2 and not res.success and seen == [1, 2]
    assert res.message == TERMINATION_MESSAGES[-2]


@pytest.mark.parametrize(("returned", "stops"), [(True, True), (np.True_, True), (torch.tensor(True), True),
                                                 (1, False), ([1], False), (np.False_, False), (None, False),
                                                 (torch.tensor(False), False), (torch.tensor(1), False)])
def test_callback_stops_on_true_only(returned, stops):
    seen = []

    def callback(info):
        seen.append(info.n_iter)
        return returned

    res = least_squares(decay, X0, callback=callback)
    assert (res.status == -2) is stops
    assert (seen == [1]) is stops


def test_a_flat_start_with_a_zero_jacobian_is_not_mistaken_for_a_cut_graph():
    # J(x0) = 0 because the model is flat there, not because fun detached x.
    res = least_squares(lambda b: torch.stack([b[0] ** 2 - 4.0, b[1] ** 2 - 9.0]), [0.0, 0.0])
    assert res.status == 1 and res.x.tolist() == [0.0, 0.0]


def test_verbose_report_gives_the_initial_and_final_cost_in_scipys_two_lines(capsys):
    # The report used to print "initial cost -", then the message and the counts on one line.
    res = least_squares(decay, X0, verbose=1)
    initial = 0.5 * float((decay(torch.tensor(X0, dtype=torch.float64)) ** 2).sum())
    assert capsys.readouterr().out == (
        f"{res.message}\nFunction evaluations {res.nfev}, initial cost {initial:.4e}, final cost {res.cost:.4e}, "
        f"first-order optimality {res.optimality:.2e}.\n"
    )
    theirs = scipy.optimize.least_squares(lambda b: decay(torch.as_tensor(b)).numpy(), X0, method="lm", verbose=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == theirs.message and lines[1].startswith("Function evaluations ")


@pytest.mark.parametrize(("jac", "calls_per_jacobian"), [(decay_jac, 0), ("2-point", 3)], ids=["callable", "2-point"])
def test_fun_is_called_once_per_counted_evaluation(jac, calls_per_jacobian):
    # The linearization at an accepted point called fun again, though the trial had just
    # evaluated it there: 16 calls for nfev = 8 with a callable jac (an expensive model cost twice).
    calls = []

    def fun(b):
        calls.append(b)
        return decay(b)

    res = least_squares(fun, X0, jac=jac)
    reference = least_squares(decay, X0, jac=jac)
    assert len(calls) == res.nfev + calls_per_jacobian * res.njev
    assert res.nfev == reference.nfev and np.array_equal(res.x, reference.x)


@pytest.mark.parametrize("geodesic", [False, True])
@pytest.mark.parametrize("jac", [decay_jac, "2-point"], ids=["callable", "2-point"])
def test_fun_is_never_called_twice_at_the_same_point(jac, geodesic):
    # The geodesic finite difference recomputed fun(x) at the current point for every trial
    # (decay, callable jac: 26 calls instead of 17).
    calls = []

    def fun(b):
        calls.append(b.clone())
        return decay(b)

    least_squares(fun, X0, jac=jac, geodesic=geodesic)
    points = torch.stack(calls)
    assert torch.unique(points, dim=0).shape[0] == len(calls)


T32, Y32 = torch.as_tensor(T, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)


@pytest.mark.parametrize(
    "fun",
    [
        lambda b: b[0] * torch.exp(-b[1] * T32) + b[2] - Y32,  # a float64 b times float32 data is float32
        lambda b: (np.float32(b[0]) * np.exp(-np.float32(b[1]) * T32.numpy()) + np.float32(b[2]) - Y32.numpy()),
    ],
    ids=["torch-float32-data", "numpy-float32-model"],
)
def test_two_point_jacobian_steps_fit_a_float32_model_under_a_float64_x(fun):
    # Steps of sqrt(eps64) = 1.5e-8 are below float32 resolution: the Jacobian read zero and the
    # run stopped at x0 on gtol with success=True and stderr 0.
    res = least_squares(fun, X0, jac="2-point")
    reference = least_squares(decay, X0)
    assert res.success and res.x == pytest.approx(reference.x, rel=1e-4)
    assert res.stderr == pytest.approx(reference.stderr, rel=1e-2)


def test_two_point_jacobian_reaches_nist_hahn1_from_start_2():
    # Steps sqrt(eps) * max(1, |x_j|) moved Hahn1's parameters of size 1e-7 by 15 % of
    # themselves: the run stopped at cost 22.7 (certified 0.766) with success=True and LRE 0.
    problem = load_problem("Hahn1")
    res = least_squares(problem.residual_function(), problem.starts[1], jac="2-point")
    assert res.success and lre(res.x, problem.certified) >= 4
    assert res.cost == pytest.approx(problem.certified_rss / 2, rel=1e-6)


def test_two_point_jacobian_is_accurate_for_parameters_of_size_1e_minus_8():
    # MINPACK's relative step sqrt(eps) * |x_j| gives columns right to 7e-9; the old floor of
    # sqrt(eps) = 1.5e-8 was half the parameter and the columns were wrong by 2 % and 22 %.
    s = torch.linspace(0.0, 1e8, 6, dtype=torch.float64)

    def fun(b):
        return torch.cat([torch.exp(-b[0] * s), torch.sin(b[1] * s), b[0] * b[1] * s**2])

    x = torch.tensor([3e-8, -2e-8], dtype=torch.float64)
    value, exact = residuals_and_jacobian(fun, x, 18)
    approx = finite_difference_jacobian(fun, x, value)
    assert torch.all((approx - exact).norm(dim=0) / exact.norm(dim=0) < 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_point_jacobian_steps_a_zero_parameter_by_sqrt_eps(dtype):
    # A relative step alone is zero at x_j = 0; MINPACK's fdjac2 then steps by sqrt(eps).
    points = []

    def fun(b):
        points.append(b.clone())
        return torch.stack([b[0] ** 2 + 3 * b[0], 2 * b[1], b[0] * b[1]])

    x = torch.tensor([0.0, 1.0], dtype=dtype)
    jac = finite_difference_jacobian(fun, x, fun(x))
    assert float(points[1][0] - x[0]) == pytest.approx(torch.finfo(dtype).eps ** 0.5, rel=1e-6)
    expected = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(jac, expected, rtol=0, atol=10 * torch.finfo(dtype).eps ** 0.5)


def test_verbose_two_prints_a_header_and_one_line_per_iteration(capsys):
    # The per-iteration lines had no header naming their seven columns.
    res = least_squares(decay, X0, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["iteration", "nfev", "cost", "optimality", "damping", "step", "norm", "accepted"]
    rows = [line.split() for line in lines[1:-2]]
    assert [int(row[0]) for row in rows] == list(range(1, res.n_iter + 1))
    assert all(len(row) == 7 and row[-1] in ("yes", "no") for row in rows)
    assert lines[-2] == res.message and lines[-1].startswith("Function evaluations ")


@pytest.mark.parametrize("jac", [None, decay_jac, "2-point"], ids=["exact", "callable", "2-point"])
def test_residuals_that_change_in_number_raise(jac):
    # Dropping residuals lowers the cost without improving the fit; such a step was accepted and
    # the run reported success on 20 of the 25 residuals.
    def fun(b):
        r = decay(b)
        return r[:20] if float(b[0]) > 2.0 else r

    with pytest.raises(ValueError, match=r"fun returned \(20,\) residuals at x = \[.*\], but \(25,\) at x0"):
        least_squares(fun, X0, jac=jac)


def test_max_nfev_gives_status_zero():
    res = least_squares(decay, [10.0, 5.0, -3.0], max_nfev=2)
    assert res.status == 0 and res.nfev <= 2 + 1
    assert res.message == "The maximum number of function evaluations is exceeded."


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    a=st.floats(0.5, 5.0), k=st.floats(0.2, 3.0), c=st.floats(-1.0, 1.0),
    noise=st.floats(0.0, 0.05), seed=st.integers(0, 1000),
)
def test_agrees_with_scipy_on_random_well_posed_problems(a, k, c, noise, seed):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 4, 30)
    y = a * np.exp(-k * t) + c + noise * rng.standard_normal(30)
    fun = lambda b: decay(b, t, y)  # noqa: E731
    start = [a * 1.3, k * 0.7, c + 0.2]
    ours = least_squares(fun, start, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    scipy_res = scipy.optimize.least_squares(lambda b: fun(torch.as_tensor(b)).numpy(), start, method="lm",
                                             ftol=1e-14, xtol=1e-14, gtol=1e-14)
    # Near-noiseless data leave a cost at float64 rounding level: allow eps-scale slack on it.
    assert ours.cost <= scipy_res.cost * (1 + 1e-9) + 1e-12 * float(np.sum(y**2))
    assert ours.x == pytest.approx(scipy_res.x, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# float32: torch.func's dtype quirk and overflow of J^T J


def test_float32_fun_stacking_indexed_elements_gets_a_float32_jacobian():
    # torch.func's forward mode returns a float64 J for this float32 fun (torch 2.13); J^T r
    # then failed with "addmv input tensors must have the same dtype".
    def fun(x):
        return torch.stack([3.0 * (x[0] - 1), x[1] - 2, x[0] * x[1]])

    r, J = residuals_and_jacobian(fun, torch.tensor([0.5, 0.5]), 3)
    assert r.dtype == J.dtype == torch.float32
    result = least_squares(fun, torch.tensor([0.5, 0.5]))
    reference = scipy.optimize.least_squares(
        lambda x: [3.0 * (x[0] - 1), x[1] - 2, x[0] * x[1]], [0.5, 0.5], method="lm", xtol=1e-15, ftol=1e-15)
    assert result.x.dtype == torch.float32 and result.success
    np.testing.assert_allclose(result.x.numpy(), reference.x, rtol=1e-4)


@pytest.mark.parametrize("jac", [None, "2-point"])
def test_float32_overflow_of_the_normal_equations_at_x0_is_a_value_error(jac):
    # J^T J = 9e38 overflows float32; the solver used to report `gtol` met (status 1) at x0.
    def fun(x):
        return torch.stack([3e19 * (x[0] - 1), x[1] - 2, x[0] * x[1]])

    with pytest.raises(ValueError, match=r"overflows torch.float32 at x0 \(largest \|J\| entry 3e\+19"):
        least_squares(fun, torch.tensor([0.5, 0.5]), jac=jac)


def test_damped_lstsq_with_an_overflowed_scale_gives_a_nan_step_not_a_lapack_error():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    step = damped_lstsq(J, torch.ones(3), 1e-3, torch.tensor([math.inf, 1.0]))
    assert step.shape == (2,) and bool(torch.isnan(step).all())


def test_float32_mgh10_from_start_1_does_not_raise():
    # Its Jacobian reaches ~6e18 on the way: J^T J overflows float32 and gelsd raised an
    # internal assertion ("Argument 4 has illegal value"). Such points are now rejected trials.
    problem = load_problem("MGH10")
    x0 = torch.as_tensor(problem.starts[0], dtype=torch.float32)
    result = least_squares(problem.residual_function(torch.float32), x0, jac="2-point")
    assert result.status in (1, 2, 3, 4) and math.isfinite(result.cost)
    assert bool(torch.isfinite(result.x).all())


@pytest.mark.parametrize("jac", [None, "2-point"], ids=["exact", "2-point"])
@pytest.mark.parametrize("container", [list, tuple])
def test_fun_returning_a_list_of_scalar_tensors_is_a_residual_vector_as_in_scipy(container, jac):
    # scipy reads fun's output with np.atleast_1d; a list of 0-d tensors went through numpy,
    # and with the exact Jacobian raised "fun could not be differentiated by torch autograd".
    def fun(b):
        return container([b[0] - 1.0, b[1] - 2.0, b[0] * b[1]])

    ours = least_squares(fun, [0.5, 0.5], jac=jac)
    theirs = scipy.optimize.least_squares(lambda b: [b[0] - 1.0, b[1] - 2.0, b[0] * b[1]], [0.5, 0.5], method="lm",
                                          ftol=1e-12, xtol=1e-12, gtol=1e-12)
    assert ours.success and ours.fun.shape == (3,) and ours.jac.shape == (3, 2)
    assert ours.x == pytest.approx(theirs.x, rel=1e-5)


@pytest.mark.parametrize("jac", [None, "2-point"], ids=["exact", "2-point"])
def test_fun_returning_a_0d_value_is_one_residual_as_in_scipy(jac):
    # scipy's np.atleast_1d makes a scalar output one residual; ours raised "received shape ()".
    res = least_squares(lambda b: b[0] ** 2 - 2.0, [1.0], jac=jac)
    assert res.success and res.fun.shape == (1,) and res.jac.shape == (1, 1)
    assert res.x[0] == pytest.approx(math.sqrt(2.0), rel=1e-7)


def test_x_scale_may_be_a_tensor_that_requires_grad():
    # np.asarray raised "Can't call numpy() on Tensor that requires grad" (and would refuse a
    # CUDA tensor): the scale is now read from the tensor itself.
    scale = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    res = least_squares(decay, X0, x_scale=scale)
    reference = least_squares(decay, X0, x_scale=[1.0, 2.0, 0.5])
    assert res.success and res.nfev == reference.nfev and res.x.tolist() == reference.x.tolist()


def test_a_jacobian_whose_shape_changes_after_x0_raises_a_value_error_naming_jac():
    # The shape was checked at x0 only: a wrong one later failed inside the Cholesky solve with
    # "Incompatible matrix sizes for cholesky_solve".
    calls = []

    def jac(b):
        calls.append(b)
        return decay_jac(b) if len(calls) < 3 else decay_jac(b)[:, :2]

    with pytest.raises(ValueError, match=r"jac returned shape \(25, 2\); expected \(m, n\) = \(25, 3\) \(at x = \["):
        least_squares(decay, X0, jac=jac)
    assert len(calls) == 3


def _scaled_decay(b, k):
    """``k`` times the residuals of ``2 exp(-1.5 t)``: curvature ``~k^2`` at a fixed ``x_scale``."""
    t = torch.linspace(0.0, 3.0, 20, dtype=b.dtype)
    return k * (b[0] * torch.exp(-b[1] * t) - 2.0 * torch.exp(-1.5 * t))


@pytest.mark.parametrize(("k", "damping"), [(1e9, "nielsen"), (1e6, "marquardt"), (1.0, "nielsen")])
def test_the_damping_ceiling_is_relative_to_the_curvature_at_a_fixed_x_scale(k, damping):
    # The ceilings were absolute (1e16, 1e10): with curvature ~1e16-1e19 the first rejected
    # trial passed them and the run stopped at x0 = [1, 5] with status 2 and success=True.
    res = least_squares(_scaled_decay, [1.0, 5.0], args=(k,), x_scale=1.0, damping=damping)
    assert res.success
    np.testing.assert_allclose(res.x, [2.0, 1.5], rtol=1e-7)


def test_exhausted_damping_reports_a_test_that_is_enabled():
    # A wrong (sign-flipped) Jacobian: no step lowers the cost, the damping runs out at x0.
    def wrong_jac(b):
        return -decay_jac(b)

    assert least_squares(decay, X0, jac=wrong_jac).status == 3  # the trial steps shrink below xtol first
    assert least_squares(decay, X0, jac=wrong_jac, xtol=None).status == 2  # the damping runs out
    res = least_squares(decay, X0, jac=wrong_jac, ftol=None, xtol=None)
    # It used to claim "`ftol` termination condition is satisfied" with ftol disabled, success=True.
    assert (res.status, res.success) == (0, False)
    assert res.message.startswith("No step lowered the cost with the damping at its maximum")
    np.testing.assert_array_equal(res.x, X0)


@pytest.mark.parametrize("name", ["Misra1a", "Misra1c", "Roszman1", "Nelson"])
def test_a_short_step_held_back_by_a_falling_damping_is_not_an_xtol_stop(name):
    # x_scale=1.0 on parameters 1e5 apart: Nielsen's damping starts ~1e8 and falls by a third a
    # step; the xtol test used to stop these runs from start 2 after 3-5 evaluations, success=True
    # with LRE 0-1.3 (Misra1c: b1 still 500, certified 636). scipy's MINPACK reaches them.
    problem = load_problem(name)
    res = least_squares(problem.residual_function(), problem.starts[1], x_scale=1.0)
    assert res.success
    assert lre(res.x, problem.certified) >= 6.0


def test_a_fun_writing_into_one_buffer_gives_the_result_of_a_fun_returning_copies():
    # MINPACK copies fvec: a fun that returns the same preallocated array at every call must
    # not change the kept residuals (the m < n step reads them after a rejected trial) nor
    # the returned result's fun and jac afterwards.
    rng = np.random.default_rng(3)
    A, target = rng.standard_normal((3, 6)), np.array([0.3, -0.2, 0.5])
    buffer, jac_buffer = np.empty(3), np.empty((3, 6))

    def fun(x):
        x = np.asarray(x, dtype=float)
        np.subtract(A @ np.sin(3 * x), target, out=buffer)
        return buffer

    def jac(x):
        x = np.asarray(x, dtype=float)
        np.multiply(A, 3 * np.cos(3 * x), out=jac_buffer)
        return jac_buffer

    for start in rng.uniform(-1.0, 1.0, (6, 6)):
        shared = least_squares(fun, start, jac=jac)
        copied = least_squares(lambda x: fun(x).copy(), start, jac=lambda x: jac(x).copy())
        assert shared.nfev == copied.nfev and np.array_equal(shared.x, copied.x)
        fun(np.zeros(6))
        jac(np.zeros(6))
        np.testing.assert_array_equal(shared.fun, copied.fun)
        np.testing.assert_array_equal(shared.jac, copied.jac)


PINN_T = torch.linspace(0.0, 1.0, 20, dtype=torch.float64)


def decay_ode(b):
    """u' + 1.7 u = 0 with u(0) = 2 for u = b0 exp(-b1 t), u' by torch.autograd.grad inside."""
    t = PINN_T.clone().requires_grad_(True)
    u = b[0] * torch.exp(-b[1] * t)
    (du,) = torch.autograd.grad(u.sum(), t, create_graph=True)
    return torch.cat([du + 1.7 * u, u[:1] - 2.0])


@pytest.mark.parametrize(("jac", "geodesic"), [(None, False), (None, True), ("2-point", False), ("2-point", True)])
def test_a_fun_calling_torch_autograd_grad_inside_is_solved(jac, geodesic):
    # A physics-informed residual: its derivative by autograd failed with autograd off
    # ("element 0 of tensors does not require grad") before the first iteration.
    res = least_squares(decay_ode, [1.0, 1.0], jac=jac, geodesic=geodesic)
    assert res.success and res.cost < 1e-20
    np.testing.assert_allclose(res.x, [2.0, 1.7], rtol=1e-8)


@dataclasses.dataclass(frozen=True)
class _UnderflowingDamping(MarquardtDamping):
    """Marquardt's rule whose damping underflows to 0 at every accepted step (as a damping of
    5e-324 does after one decrease by 0.1)."""

    def update(self, state, *, accepted, gain_ratio):
        if accepted:
            return DampingState(0.0, state.nu)
        return super().update(state, accepted=accepted, gain_ratio=gain_ratio)


def test_a_damping_that_underflowed_to_zero_is_not_reported_as_convergence():
    # A damping of 0 cannot be raised by a rejection (0 * 10), so the rule counts it as
    # exhausted; the run then stopped with status 2, "`ftol` termination condition is
    # satisfied.", at a cost of 2.78 where the minimum is 1.27e-3.
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.01 * torch.sin(40 * t)
    result = marquardt.least_squares(lambda b: b[0] * torch.exp(-b[1] * t) - y, [1.0, 5.0],
                                     damping=_UnderflowingDamping(), x_scale=1.0)
    assert result.status == 0 and not result.success
    assert "damping fell to 0.0" in result.message and "x_scale" in result.message
    assert result.cost == pytest.approx(2.7781428043005256, rel=1e-12)


def test_a_callback_that_changes_info_x_in_place_does_not_change_the_run():
    # info.x was the solver's own point: `info.x.clamp_(...)` in a callback moved the iterate
    # behind the solver's back, and the result reported x = [102.5, 101.2, 100.4] with the cost
    # of the unmoved point and success=True.
    def callback(info):
        info.x.add_(100.0)

    res = least_squares(decay, X0, callback=callback)
    reference = least_squares(decay, X0)
    assert res.x == pytest.approx(reference.x, rel=1e-12) and res.cost == pytest.approx(reference.cost, rel=1e-12)
    assert res.nfev == reference.nfev


def test_geodesic_must_be_a_bool():
    # A string (geodesic="no") was truthy and silently switched the acceleration on.
    calls = []

    def fun(b):
        calls.append(b)
        return decay(b)

    with pytest.raises(TypeError, match=r"geodesic must be True or False; received str 'no'"):
        least_squares(fun, X0, geodesic="no")
    assert calls == []
    assert least_squares(decay, X0, geodesic=np.True_).success


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_a_1d_jacobian_of_one_residual_is_a_row_as_in_scipy(kind):
    # scipy reads jac's output with np.atleast_2d: one residual may give its gradient, shape (n,).
    row = np.array([1.0, 2.0])
    jac = (lambda b: row) if kind == "numpy" else (lambda b: torch.as_tensor(row))
    res = least_squares(lambda b: (b[0] + 2.0 * b[1] - 5.0).reshape(1), [0.0, 0.0], jac=jac)
    assert res.success and res.jac.shape == (1, 2) and float(res.x @ row) == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"jac returned shape \(2,\); expected \(m, n\) = \(2, 1\)"):
        least_squares(lambda b: torch.cat([b - 1.0, b - 2.0]), [0.0], jac=lambda b: np.ones(2))


def _failing_drivers(monkeypatch, failing: set[str]) -> list[str]:
    """Make torch.linalg.lstsq raise LinAlgError for the ``failing`` drivers; returns the drivers called."""
    calls: list[str] = []
    real = torch.linalg.lstsq

    def lstsq(a, b, *, driver=None, **kwargs):
        calls.append(driver)
        if driver in failing:
            raise torch.linalg.LinAlgError("SVD did not converge")
        return real(a, b, driver=driver, **kwargs)

    monkeypatch.setattr(torch.linalg, "lstsq", lstsq)
    return calls


def test_damped_lstsq_falls_back_to_pivoted_qr_when_the_svd_does_not_converge(monkeypatch):
    # gelsd's SVD failed to converge on a float32 stacked system mid-training, and the
    # LinAlgError left the LM loop; gelsy solves the same least-squares problem.
    J = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    scale = torch.ones(2, dtype=torch.float64)
    expected = damped_lstsq(J, r, 0.1, scale)
    calls = _failing_drivers(monkeypatch, {"gelsd"})
    torch.testing.assert_close(damped_lstsq(J, r, 0.1, scale), expected, rtol=1e-12, atol=0)
    assert calls == ["gelsd", "gelsy"]


def test_damped_lstsq_gives_a_nan_step_when_no_driver_solves(monkeypatch):
    J = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    _failing_drivers(monkeypatch, {"gelsd", "gelsy"})
    step = damped_lstsq(J, torch.ones(2, dtype=torch.float64), 0.1, torch.ones(2, dtype=torch.float64))
    assert step.shape == (2,) and bool(torch.isnan(step).all())


@pytest.mark.parametrize(
    ("fun", "x0"),
    [
        (lambda b: b - torch.tensor([2.0, 3.0], dtype=b.dtype), [2.0, 3.0]),  # zero residuals at x0
        (lambda b: torch.stack([b[0] ** 2 - 4.0, b[0] * b[1] - 6.0]), [2.0, 3.0]),
        (lambda b: torch.stack([b[0] ** 2 - 1.0, b[0] ** 2 + 1.0]), [0.0]),  # J = 0: a zero Gauss-Newton step
    ],
    ids=["linear", "nonlinear", "flat"],
)
def test_a_start_at_the_minimum_evaluates_fun_once_as_scipy_does(fun, x0):
    # The closing Gauss-Newton step was evaluated even when it was zero: fun was called at x0
    # a second time and nfev was 2 where scipy's method="lm" reports 1.
    calls = []

    def counted(b):
        calls.append(b.clone())
        return fun(b)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "flat": J = 0 leaves b undetermined
        res = least_squares(counted, x0, jac="2-point")
    theirs = scipy.optimize.least_squares(lambda b: fun(torch.as_tensor(b)).numpy(), x0, method="lm")
    assert (res.status, res.nfev, res.njev, res.n_iter) == (theirs.status, 1, 1, 0) == (1, theirs.nfev, 1, 0)
    assert np.array_equal(res.x, x0)
    assert len(calls) == 1 + len(x0)  # x0, then one shifted point per parameter for the Jacobian


def test_a_jac_computing_rows_by_torch_autograd_grad_is_solved():
    # jac ran with autograd off: torch.autograd.grad inside it failed with "element 0 of
    # tensors does not require grad and does not have a grad_fn", though jacrev inside jac worked.
    calls = []

    def jac(b):
        calls.append(torch.is_grad_enabled())
        b = b.detach().requires_grad_(True)
        r = decay(b)
        return torch.stack([torch.autograd.grad(r[i], b, retain_graph=True)[0] for i in range(r.shape[0])])

    res = least_squares(decay, X0, jac=jac)
    reference = least_squares(decay, X0, jac=decay_jac)
    assert res.status == reference.status and res.nfev == reference.nfev and res.njev == reference.njev
    np.testing.assert_allclose(res.x, reference.x, rtol=1e-12)
    np.testing.assert_allclose(res.x, [2.503082, 1.306379, 0.402746], rtol=1e-6)
    # Tried once with autograd off at x0, then always with it on: no second failing call per point.
    assert calls == [False] + [True] * res.njev
