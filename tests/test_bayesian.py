"""Bayesian regularization (MATLAB trainbr): hyperparameter updates, the regularized LM problem, fit(method="br")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marquardt.bayesian import (
    BayesianState,
    RegularizedProblem,
    effective_parameters,
    initial_state,
    update_state,
)
from marquardt.damping import MarquardtDamping
from marquardt.mlp import mlp
from marquardt.network import ModuleProblem, flatten_parameters
from marquardt.solver import FunctionProblem, lm_step
from marquardt.train import fit

f64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks have tens of parameters: one BLAS thread is faster, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_sine(n=100, sigma=0.1, seed=0):
    """MATLAB's trainbr example: sin(2 pi x) on [-1, 1] with Gaussian noise."""
    X = torch.linspace(-1, 1, n, dtype=f64)[:, None]
    noise = sigma * torch.randn(X.shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return X, torch.sin(2 * math.pi * X) + noise


def grid_error(model):
    """Mean squared error against the noise-free function on a dense grid."""
    X = torch.linspace(-1, 1, 2001, dtype=f64)[:, None]
    with torch.no_grad():
        return float(((model(X) - torch.sin(2 * math.pi * X)) ** 2).mean())


def random_gram(n=6, m=4, seed=0):
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return J.T @ J  # rank m < n: some directions carry no data


# --------------------------------------------------------------------- hyperparameters


def test_initial_state_follows_trainbr():
    state = initial_state(n_params=61, n_errors=100, sse=3.0, ssw=20.0)
    assert state == BayesianState(alpha=61 / 40, beta=39 / 6, gamma=61.0, sse=3.0, ssw=20.0)
    assert type(state.gamma) is float  # as every later estimate: the record's gamk is one type
    assert state.objective == pytest.approx(39 / 6 * 3.0 + 61 / 40 * 20.0)


@pytest.mark.parametrize(
    ("n_params", "n_errors", "sse", "ssw", "alpha", "beta"),
    [
        (61, 50, 3.0, 20.0, 61 / 40, 1.0),  # more parameters than errors: beta <= 0 is reset to 1
        (5, 10, 0.0, 2.0, 5 / 4, 1.0),  # a perfect fit: E_D = 0
        (5, 10, 1.0, 0.0, 1.0, 5 / 2),  # all weights zero: E_W = 0
    ],
)
def test_initial_state_edge_cases(n_params, n_errors, sse, ssw, alpha, beta):
    state = initial_state(n_params, n_errors, sse, ssw)
    assert (state.alpha, state.beta) == pytest.approx((alpha, beta))


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.01, 3.0), (50.0, 0.2)])
def test_effective_parameters_equals_trace_formula(alpha, beta):
    gram = random_gram()
    n = gram.shape[0]
    expected = n - alpha * float(torch.trace(torch.linalg.inv(beta * gram + alpha * torch.eye(n, dtype=f64))))
    assert effective_parameters(gram, alpha, beta) == pytest.approx(expected, rel=1e-10)


def test_effective_parameters_limits():
    gram = random_gram(n=6, m=4)  # rank 4
    # Rounding leaves the null directions eigenvalues near 1e-15, so alpha stays well above that.
    assert effective_parameters(gram, alpha=1e-9, beta=1.0) == pytest.approx(4.0, abs=1e-5)
    assert effective_parameters(gram, alpha=1e12, beta=1.0) == pytest.approx(0.0, abs=1e-6)


def test_update_state_uses_old_hyperparameters_for_gamma():
    gram = random_gram()
    old = BayesianState(alpha=0.5, beta=2.0, gamma=6, sse=1.0, ssw=1.0)
    new = update_state(old, gram, sse=0.4, ssw=3.0, n_errors=20)
    gamma = effective_parameters(gram, 0.5, 2.0)
    assert new == BayesianState(gamma / 6.0, (20 - gamma) / 0.8, gamma, 0.4, 3.0)


# ------------------------------------------------------------------ the regularized problem


def _data_problem():
    t = torch.linspace(0, 1, 8, dtype=f64)
    return FunctionProblem(lambda x: x[0] * torch.exp(x[1] * t) + x[2] - torch.cos(t), None, 8)


def test_regularized_problem_is_the_stacked_least_squares_problem():
    data = _data_problem()
    alpha, beta = 0.3, 2.5
    x = torch.tensor([0.5, -1.0, 0.2], dtype=f64)
    problem = RegularizedProblem(data, alpha, beta)
    lin = problem.linearize(x)
    stacked = lambda v: torch.cat([math.sqrt(beta) * data.residuals(v), math.sqrt(alpha) * v])  # noqa: E731
    r = stacked(x)
    J = torch.autograd.functional.jacobian(stacked, x)
    torch.testing.assert_close(lin.system.gram, J.T @ J)
    torch.testing.assert_close(lin.grad, J.T @ r)
    assert lin.cost == pytest.approx(0.5 * float(r @ r))
    assert problem.cost(x) == pytest.approx(0.5 * float(r @ r))
    # The QR fallback solves the same stacked system as Cholesky.
    ones = torch.ones(3, dtype=f64)
    step = lin.system.solve(lin.grad, 1e-3, ones)
    torch.testing.assert_close(step, -torch.linalg.solve(J.T @ J + 1e-3 * torch.eye(3, dtype=f64), J.T @ r))


def test_regularized_problem_same_from_normal_and_sample_space_systems():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()  # 19 parameters
    X = torch.linspace(-1, 1, 10, dtype=f64)[:, None]  # 10 residuals < 19: sample-space system
    x = flatten_parameters(model)
    lins = []
    for max_bytes in (1 << 27, 19 * 8 * 3):  # all rows (sample-space) or 3 rows at a time (normal)
        problem = ModuleProblem(model, X, torch.sin(3 * X), max_jacobian_bytes=max_bytes)
        lins.append(RegularizedProblem(problem, 0.7, 4.0).linearize(x))
    assert lins[0].jac is not None and lins[1].jac is None
    torch.testing.assert_close(lins[0].system.gram, lins[1].system.gram)
    torch.testing.assert_close(lins[0].grad, lins[1].grad)


def test_lm_step_on_regularized_problem_lowers_the_objective():
    problem = RegularizedProblem(_data_problem(), 0.3, 2.5)
    x = torch.tensor([0.5, -1.0, 0.2], dtype=f64)
    rule = MarquardtDamping(0.005)
    out = lm_step(problem, x, problem.linearize(x), torch.ones(3, dtype=f64), rule, rule.init(1.0))
    assert out.accepted and out.cost < problem.cost(x)


def test_regularized_cost_is_inf_where_the_data_cost_is():
    data = FunctionProblem(lambda x: torch.log(x), None, 2)
    assert RegularizedProblem(data, 1.0, 1.0).cost(torch.tensor([-1.0, 1.0], dtype=f64)) == math.inf


# ---------------------------------------------------------------------------- fit("br")


@pytest.fixture(scope="module")
def sine_runs():
    """One trainbr run and one early-stopping run on MATLAB's example, from the same initial weights."""
    X, y = noisy_sine()
    runs = {}
    for name, kwargs in {"br": dict(method="br"), "es": dict(method="lm", division="random")}.items():
        model = mlp(1, 20, dtype=f64, generator=torch.Generator().manual_seed(0))
        initial = flatten_parameters(model)
        runs[name] = (model, fit(model, X, y, seed=0, **kwargs), initial)
    return runs


def test_br_on_noisy_sine_uses_few_effective_parameters_and_generalizes(sine_runs):
    model, history, _ = sine_runs["br"]
    es_model, es_history, _ = sine_runs["es"]
    gamma = history["gamma"]
    assert gamma[0] == 61  # P = 3 * 20 + 1
    # MATLAB's documented example ends near 12 effective parameters out of 61.
    assert 6 < gamma[-1] < 20
    br_error, es_error = grid_error(model), grid_error(es_model)
    print(f"trainbr: {len(history) - 1} epochs, {history.stop_reason} gamma {gamma[-1]:.2f}, "
          f"grid MSE {br_error:.3g}; early stopping: {len(es_history) - 1} epochs, grid MSE {es_error:.3g}")
    assert br_error <= es_error
    assert br_error < 0.01  # noise variance is 0.01: BR fits the function, not the noise


def test_br_history_and_matlab_defaults(sine_runs):
    model, history, initial = sine_runs["br"]
    assert history.method == "br"
    assert history[0]["damping"] == 0.005  # trainbr's mu
    assert all(set(r) >= {"gamma", "ssw", "perf", "vperf", "tperf", "val_fail"} for r in history.records)
    assert history[0]["ssw"] == pytest.approx(float(initial @ initial))
    assert history[-1]["ssw"] == pytest.approx(float(flatten_parameters(model) @ flatten_parameters(model)))
    assert history.stop_reason in ("Maximum MU reached.", "Minimum gradient reached.", "Maximum epoch reached.")
    # trainbr keeps the final weights, not those of the lowest training MSE.
    assert history.best_epoch == len(history) - 1


def test_br_records_validation_without_stopping_on_it():
    X, y = noisy_sine(n=40)
    kwargs = dict(method="br", validation_data=(X, -y), epochs=30)  # validation gets worse as training improves
    free = fit(mlp(1, 5, dtype=f64, generator=torch.Generator().manual_seed(0)), X, y, **kwargs)
    assert all(math.isfinite(r["vperf"]) for r in free.records)
    assert free[-1]["val_fail"] >= 6 and free.stop_reason != "Validation stop."
    model = mlp(1, 5, dtype=f64, generator=torch.Generator().manual_seed(0))
    stopped = fit(model, X, y, max_fail=3, **kwargs)
    vperf = stopped["vperf"]
    assert stopped.stop_reason == "Validation stop." and len(stopped) < len(free)
    assert stopped.best_epoch == vperf.index(min(vperf)) < len(stopped) - 1


@pytest.mark.parametrize("max_fail", [0, math.inf])
def test_br_max_fail_0_or_inf_disables_validation_stops_as_trainbr(max_fail):
    # trainbr's documented default is max_fail = 0 (inf in later releases): "validation stops disabled".
    X, y = noisy_sine(n=40)
    kwargs = dict(method="br", validation_data=(X, -y), epochs=12)
    default = fit(mlp(1, 5, dtype=f64, generator=torch.Generator().manual_seed(0)), X, y, **kwargs)
    model = mlp(1, 5, dtype=f64, generator=torch.Generator().manual_seed(0))
    history = fit(model, X, y, max_fail=max_fail, **kwargs)
    assert history.stop_reason == default.stop_reason == "Maximum epoch reached."
    assert history["perf"] == default["perf"] and history[-1]["val_fail"] >= 6
    assert history.best_epoch == 12  # trainbr's final weights, as without max_fail


def test_br_gamma_does_not_depend_on_data_units():
    # A normalized MLP trains in mapminmax units, as MATLAB does: same run whatever the units.
    X, y = noisy_sine(n=40)
    runs = [fit(mlp(1, 8, dtype=f64, generator=torch.Generator().manual_seed(1)), a * X + b, c * y, method="br",
                epochs=60) for a, b, c in ((1.0, 0.0, 1.0), (500.0, 500.0, 1e4))]
    torch.testing.assert_close(torch.tensor(runs[1]["gamma"]), torch.tensor(runs[0]["gamma"]), rtol=1e-6, atol=1e-6)
    # perf is reported in the original units: the 1e4 target scale shows up squared.
    assert runs[1][-1]["perf"] == pytest.approx(1e8 * runs[0][-1]["perf"], rel=1e-5)


def test_br_on_a_plain_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    X, y = noisy_sine(n=50)
    history = fit(model, X, y, method="br", epochs=100)
    assert history["gamma"][0] == 25 and 0 < history["gamma"][-1] < 25
    assert history[-1]["perf"] < history[0]["perf"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(batch_size=10), ValueError, "Invalid batch_size for method='br': 10"),
        (dict(loss="binary_cross_entropy"), ValueError, "Invalid loss for method='br': 'binary_cross_entropy'"),
        (dict(lr=0.1), TypeError, r"Unknown option\(s\) for method='br': \['lr'\]"),
        (dict(mu=0.0), ValueError, "Invalid mu value: 0.0; expected a finite number > 0"),
        (dict(max_fail=0.5), ValueError, "Invalid max_fail value: 0.5"),
        (dict(solver="matrix-free"), ValueError, r"Invalid solver for method='br': 'matrix-free'; .* pass solver='auto'"),
        # auto would go matrix-free past the budget: 2 x 2 float64 is 32 bytes.
        (dict(max_matrix_bytes=31), ValueError, r"method='br' needs the 2 x 2 matrix J\^T J \(32 bytes\) for gamma, "
                                                 r"more than max_matrix_bytes=31"),
    ],
)
def test_bad_br_options_are_rejected(kwargs, error, match):
    X, y = noisy_sine(n=10)
    with pytest.raises(error, match=match):
        fit(nn.Linear(1, 1).double(), X, (y > 0).double(), method="br", **kwargs)


def _low_rank_jacobian(m=20, n=60, seed=0):
    """m x n, rank m < n, column scales over three decades (as a network's J^T J spreads)."""
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return J * torch.logspace(0, -3, n, dtype=f64)


@pytest.mark.parametrize("alpha", [1e-9, 1e-6])
def test_effective_parameters_never_counts_rounding_as_parameters(alpha):
    # gamma = sum beta l / (beta l + alpha) counts at most rank(J) <= m directions. The null
    # directions of a J^T J formed in floating point come out at the rounding level (about
    # eps * trace), not 0: with a small alpha they counted as parameters, gamma exceeded the 20
    # errors (30.3 from the float32 matrix, 20.0000003 from the float64 one) and beta = (N - gamma)
    # / (2 E_D) went negative.
    J = _low_rank_jacobian()
    J32 = J.float()
    exact = float((torch.linalg.svdvals(J) ** 2 / (torch.linalg.svdvals(J) ** 2 + alpha)).sum())
    assert exact == pytest.approx(20.0, abs=1e-3)
    assert effective_parameters(J.T @ J, alpha, beta=1.0) == pytest.approx(exact, abs=1e-9)
    assert effective_parameters(J32.T @ J32, alpha, beta=1.0) == pytest.approx(exact, abs=1e-3)


def test_br_float32_gamma_stays_below_the_number_of_errors():
    # A float32 network past PROMOTE_MAX_PARAMS (1,027 parameters) forms J^T J in float32: its
    # rounding counted as 142.8 effective parameters out of 20 errors after one epoch (beta was
    # reset to 1 each epoch, and training interpolated the noise).
    X = torch.linspace(-1, 1, 20)[:, None]
    y = torch.sin(2 * math.pi * X) + 0.1 * torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    model = mlp(1, 342, generator=torch.Generator().manual_seed(0))
    history = fit(model, X, y, method="br", epochs=2, progress=False)
    assert history["gamma"][0] == 1027
    assert all(0 < gamma <= 20 for gamma in history["gamma"][1:])


def test_br_float32_sample_space_follows_the_float64_run():
    # Fewer errors than parameters (sample space, J held): J^T J was formed from the float32 rows
    # in float32, whose rounding hid the smallest data directions; gamma stayed at N = 20 and
    # the run interpolated the noise (MSE 4.5e-11 at epoch 7, where float64 regularizes to
    # 0.494), its steps from epoch 3 on in the QR fallback of the stacked float32 system (whose
    # LAPACK SVD failed to converge, a LinAlgError, on the same network with 30 samples).
    X = torch.linspace(-1, 1, 20, dtype=f64)[:, None]
    y = torch.sin(2 * math.pi * X) + 0.1 * torch.randn(20, 1, generator=torch.Generator().manual_seed(0), dtype=f64)
    model = mlp(1, 342, dtype=torch.float32, generator=torch.Generator().manual_seed(0))  # 1,027 parameters
    history = fit(model, X.float(), y.float(), method="br", epochs=7, progress=False)
    # The float64 run of the same network: gamma 20 (= N) for epochs 1-6, then 2.994; MSE 0.494.
    assert history["gamma"][1:7] == pytest.approx([20.0] * 6, abs=0.02)
    assert history["gamma"][7] == pytest.approx(2.994, rel=0.1)
    assert history["perf"][7] == pytest.approx(0.494, rel=0.02)
