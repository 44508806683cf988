"""NIST StRD nonlinear regression: the parser, the models, and certification of the solver.

Every problem is run from both NIST starting points with ``marquardt.least_squares`` at its
defaults and must reach the certified parameters to 4 significant digits (LRE >= 4). On the
Lower-difficulty problems the reported standard errors must match the certified ones (rtol 5e-3),
on the Average and Higher ones to 4 significant digits (Lanczos1 excepted), and
from Start 2 the final cost must be no worse than MINPACK's (scipy ``method="lm"``) at tight
tolerances.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.optimize
import torch

import marquardt
from marquardt.nist import PROBLEM_NAMES, NistProblem, default_data_dir, load_problem, lre

DATA_DIR = default_data_dir()

#: (name, difficulty, number of parameters, number of observations, predictors per row)
CATALOGUE = [
    ("Misra1a", "Lower", 2, 14, 1),
    ("Chwirut2", "Lower", 3, 54, 1),
    ("Chwirut1", "Lower", 3, 214, 1),
    ("Lanczos3", "Lower", 6, 24, 1),
    ("Gauss1", "Lower", 8, 250, 1),
    ("Gauss2", "Lower", 8, 250, 1),
    ("DanWood", "Lower", 2, 6, 1),
    ("Misra1b", "Lower", 2, 14, 1),
    ("Kirby2", "Average", 5, 151, 1),
    ("Hahn1", "Average", 7, 236, 1),
    ("Nelson", "Average", 3, 128, 2),
    ("MGH17", "Average", 5, 33, 1),
    ("Lanczos1", "Average", 6, 24, 1),
    ("Lanczos2", "Average", 6, 24, 1),
    ("Gauss3", "Average", 8, 250, 1),
    ("Misra1c", "Average", 2, 14, 1),
    ("Misra1d", "Average", 2, 14, 1),
    ("Roszman1", "Average", 4, 25, 1),
    ("ENSO", "Average", 9, 168, 1),
    ("MGH09", "Higher", 4, 11, 1),
    ("Thurber", "Higher", 7, 37, 1),
    ("BoxBOD", "Higher", 2, 6, 1),
    ("Rat42", "Higher", 3, 9, 1),
    ("MGH10", "Higher", 3, 16, 1),
    ("Eckerle4", "Higher", 3, 35, 1),
    ("Rat43", "Higher", 4, 15, 1),
    ("Bennett5", "Higher", 3, 154, 1),
]

LOWER = [name for name, difficulty, *_ in CATALOGUE if difficulty == "Lower"]
RUNS = [(name, start) for name in PROBLEM_NAMES for start in (1, 2)]

#: Lanczos1's certified RSS (1.4e-25) is below what float64 residuals of size ~1 can
#: resolve; at the 11-digit certified parameters the RSS is ~4e-21, so only require "tiny".
TINY_RSS = {"Lanczos1": 1e-18}

MIN_LRE = 4.0
STDERR_RTOL = 5e-3


@functools.cache
def problem(name: str) -> NistProblem:
    return load_problem(name, DATA_DIR)


def rss(p: NistProblem, b: np.ndarray) -> float:
    residuals = p.residual_function()(torch.as_tensor(b, dtype=torch.float64))
    return float((residuals**2).sum())


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


@functools.cache
def marquardt_fit(name: str, start: int):
    """``marquardt.least_squares`` at its defaults from NIST start ``start`` (1 or 2)."""
    p = problem(name)
    x0 = torch.as_tensor(p.starts[start - 1], dtype=torch.float64)
    return marquardt.least_squares(p.residual_function(), x0)


@functools.cache
def scipy_fit(name: str, start: int, tol: float = 1e-8):
    """MINPACK via ``scipy.optimize.least_squares(method="lm")`` with an autograd Jacobian."""
    p = problem(name)
    fun = p.residual_function()
    jacobian = torch.func.jacfwd(fun)
    return scipy.optimize.least_squares(
        lambda b: fun(torch.from_numpy(b)).numpy(),
        p.starts[start - 1],
        jac=lambda b: jacobian(torch.from_numpy(b)).numpy(),
        method="lm",
        x_scale="jac",  # MINPACK's own scaling; the scipy default only since 1.16
        ftol=tol,
        xtol=tol,
        gtol=tol,
    )


def cost_rounding(name: str, cost: float) -> float:
    """Bound on the float64 rounding error of ``cost``: residuals carry errors ``delta`` of a
    few ulps of the response, which move ``0.5 * |r|**2`` by up to ``|r| |delta| + |delta|**2 / 2``.

    Only Lanczos1 (residuals ~1e-13 against responses ~1) comes near this floor.
    """
    delta = 4 * np.finfo(np.float64).eps * float(np.linalg.norm(problem(name).response))
    return float(np.sqrt(2 * cost)) * delta + 0.5 * delta**2


def describe(result) -> str:
    return f"status={result.status} nfev={result.nfev} cost={result.cost:.10g}: {result.message}"


# --------------------------------------------------------------------------------------------
# Parser and models
# --------------------------------------------------------------------------------------------


def test_catalogue_lists_every_problem():
    assert sorted(name for name, *_ in CATALOGUE) == sorted(PROBLEM_NAMES)
    assert len(PROBLEM_NAMES) == 27


@pytest.mark.parametrize(("name", "difficulty", "n_params", "n_obs", "n_predictors"), CATALOGUE)
def test_problem_loads(name, difficulty, n_params, n_obs, n_predictors):
    p = problem(name)
    assert p.name == name
    assert p.difficulty == difficulty
    assert p.y.shape == (n_obs,) and p.y.dtype == np.float64
    expected_x = (n_obs,) if n_predictors == 1 else (n_obs, n_predictors)
    assert p.x.shape == expected_x and p.x.dtype == np.float64
    for vector in (*p.starts, p.certified, p.certified_stderr):
        assert vector.shape == (n_params,) and vector.dtype == np.float64
    assert np.all(p.certified_stderr > 0) and p.certified_rss > 0


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_rss_at_certified_values(name):
    p = problem(name)
    value = rss(p, p.certified)
    if name in TINY_RSS:
        assert value < TINY_RSS[name]
    else:
        assert value == pytest.approx(p.certified_rss, rel=1e-6)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_residual_function_follows_dtype(name):
    p = problem(name)
    b = torch.as_tensor(p.certified, dtype=torch.float32)
    assert p.residual_function(torch.float32)(b).dtype == torch.float32


def test_nelson_response_is_log_y():
    p = problem("Nelson")
    assert p.log_response
    np.testing.assert_array_equal(p.response, np.log(p.y))
    assert not problem("Misra1a").log_response


def test_parser_reads_known_values():
    p = problem("Misra1a")
    np.testing.assert_array_equal(p.starts[0], [500.0, 0.0001])
    np.testing.assert_array_equal(p.starts[1], [250.0, 0.0005])
    np.testing.assert_array_equal(p.certified, [2.3894212918e02, 5.5015643181e-04])
    np.testing.assert_array_equal(p.certified_stderr, [2.7070075241e00, 7.2668688436e-06])
    assert p.certified_rss == 1.2455138894e-01
    assert (p.y[0], p.x[0], p.y[-1], p.x[-1]) == (10.07, 77.6, 81.78, 760.0)


def test_environment_variable_overrides_data_dir(monkeypatch, tmp_path):
    from marquardt.nist import default_data_dir

    monkeypatch.setenv("MARQUARDT_NIST_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="MARQUARDT_NIST_DIR"):
        load_problem("Misra1a")


def test_unknown_problem_is_rejected():
    with pytest.raises(KeyError, match="unknown NIST problem 'Misra9'"):
        load_problem("Misra9", DATA_DIR)


@pytest.mark.parametrize(
    ("estimate", "certified", "expected"),
    [
        ([1.0, 2.0], [1.0, 2.0], 15.0),  # exact: capped
        ([1.0001, 2.0], [1.0, 2.0], 4.0),  # worst parameter decides
        ([1.0, 2.0000002], [1.0, 2.0], 7.0),
        ([5.0, 2.0], [1.0, 2.0], 0.0),  # no correct digit: clipped
        ([np.nan, 2.0], [1.0, 2.0], 0.0),
        (torch.tensor([-1.001], dtype=torch.float64), [-1.0], 3.0),  # tensors accepted
    ],
)
def test_lre(estimate, certified, expected):
    assert lre(estimate, certified) == pytest.approx(expected, abs=1e-6)


def test_lre_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"estimate has shape \(2,\), certified has shape \(3,\)"):
        lre([1.0, 2.0], [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------------------------
# Certification of marquardt.least_squares
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "start"), RUNS)
def test_certified_parameters(name, start):
    result = marquardt_fit(name, start)
    score = lre(result.x, problem(name).certified)
    assert score >= MIN_LRE, f"{name} start {start}: LRE {score:.2f}; {describe(result)}"


@pytest.mark.parametrize("name", LOWER)
def test_certified_standard_errors(name):
    p = problem(name)
    fits = [marquardt_fit(name, start) for start in (1, 2)]
    best = max(fits, key=lambda r: lre(r.x, p.certified))
    assert lre(best.x, p.certified) >= MIN_LRE, f"{name}: neither start converged"
    np.testing.assert_allclose(to_numpy(best.stderr), p.certified_stderr, rtol=STDERR_RTOL)


@pytest.mark.parametrize("name", [name for name in PROBLEM_NAMES if name not in LOWER and name != "Lanczos1"])
def test_certified_standard_errors_of_the_harder_problems(name):
    # Their Jacobians are the ill-conditioned ones (Hahn1, MGH09, Bennett5: condition numbers up
    # to 1e9 before column scaling), where a rank cutoff can drop a direction and make standard
    # errors wrong or inf. 4 significant digits, as for the parameters. Lanczos1 is left out:
    # its certified RSS (1.4e-25) is below float64 resolution, so s is rounding noise.
    p = problem(name)
    best = max((marquardt_fit(name, start) for start in (1, 2)), key=lambda r: lre(r.x, p.certified))
    score = lre(best.stderr, p.certified_stderr)
    assert score >= MIN_LRE, f"{name}: standard errors LRE {score:.2f}; {describe(best)}"


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_cost_no_worse_than_minpack(name):
    ours = marquardt_fit(name, 2)
    minpack = scipy_fit(name, 2, tol=1e-15)
    assert ours.cost <= minpack.cost * (1 + 1e-10) + cost_rounding(name, minpack.cost), (
        f"{name}: marquardt cost {ours.cost:.15g} > MINPACK {minpack.cost:.15g}; {describe(ours)}"
    )
