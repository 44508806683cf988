"""matfree: conjugate gradients, the matrix-free damped system, the forcing sequence."""

import math

import pytest
import torch

from marquardt.linalg import NormalEquations
from marquardt.matfree import MatrixFreeEquations, conjugate_gradient, eisenstat_walker

DT = torch.float64


def spd(n: int, seed: int = 0, cond: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    values = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return (q * values) @ q.T


def jacobian(m: int = 30, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=DT), torch.randn(m, generator=g, dtype=DT)


@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_cg_solves_spd_systems_to_tight_tolerance(n, preconditioned):
    A = spd(n, seed=n)
    b = torch.arange(1.0, n + 1, dtype=DT)
    out = conjugate_gradient(lambda v: A @ v, b, rtol=1e-12, max_iter=10 * n, stall_tol=0,
                             preconditioner=A.diagonal() if preconditioned else None)
    assert out.reason == "tolerance"
    torch.testing.assert_close(out.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.product, A @ out.x, rtol=1e-9, atol=1e-9)


def test_cg_warm_start_at_the_solution_needs_one_product():
    A, b = spd(6), torch.ones(6, dtype=DT)
    exact = torch.linalg.solve(A, b)
    out = conjugate_gradient(lambda v: A @ v, b, x0=exact, rtol=1e-10)
    assert out.iterations == 1 and out.reason == "tolerance"


def test_cg_warm_start_is_scaled_never_worse_than_zero():
    A, b = spd(6), torch.ones(6, dtype=DT)
    bad = -10 * torch.linalg.solve(A, b)  # pointing the right way, wrong length and sign
    out = conjugate_gradient(lambda v: A @ v, b, x0=bad, max_iter=0)
    model = 0.5 * float(out.x @ (A @ out.x)) - float(b @ out.x)
    assert model <= 0.0
    torch.testing.assert_close(out.x, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-12)  # the line holds it


def test_cg_stop_reasons():
    A, b = spd(30, cond=1e6), torch.ones(30, dtype=DT)
    assert conjugate_gradient(lambda v: A @ v, b, rtol=1e-14, max_iter=3, stall_tol=0).reason == "max_iter"
    assert conjugate_gradient(lambda v: A @ v, torch.zeros(30, dtype=DT)).reason == "tolerance"
    indefinite = -torch.eye(3, dtype=DT)
    assert conjugate_gradient(lambda v: indefinite @ v, torch.ones(3, dtype=DT)).reason == "breakdown"
    stalled = conjugate_gradient(lambda v: A @ v, b, rtol=0.0, max_iter=500, stall_tol=0.5)
    assert stalled.reason == "stalled" and stalled.iterations < 500


def test_cg_model_decreases_monotonically():
    A, b = spd(20, cond=1e4), torch.ones(20, dtype=DT)
    models = []
    for k in range(1, 15):
        x = conjugate_gradient(lambda v: A @ v, b, rtol=0.0, max_iter=k, stall_tol=0).x
        models.append(0.5 * float(x @ (A @ x)) - float(b @ x))
    assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(models, models[1:]))


@pytest.mark.parametrize("damping", [0.0, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("scale_kind", ["ones", "jacobi"])
def test_matrix_free_step_equals_cholesky_step(damping, scale_kind):
    J, r = jacobian()
    gram = J.T @ J
    scale = torch.ones(J.shape[1], dtype=DT) if scale_kind == "ones" else gram.diagonal().clone()
    reference = NormalEquations(gram, J, r).solve(J.T @ r, damping, scale)
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, lambda: (J * J).sum(0), rtol=1e-13, max_iter=200)
    step = system.solve(J.T @ r, damping, scale)
    torch.testing.assert_close(step, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(system.curvature(step), step @ gram @ step, rtol=1e-9, atol=1e-12)
    other = torch.ones_like(step)
    torch.testing.assert_close(system.curvature(other), other @ gram @ other, rtol=1e-12, atol=1e-12)


def test_matrix_free_retry_reuses_the_basis():
    J, r = jacobian(40, 12)
    calls = []

    def jvp(v):
        calls.append(1)
        return J @ v

    system = MatrixFreeEquations(jvp, lambda u: J.T @ u, (J * J).sum(0), rtol=1e-10, max_iter=100, stall_tol=0)
    ones = torch.ones(12, dtype=DT)
    system.solve(J.T @ r, 1e-2, ones)
    first = len(calls)
    assert system.iterations == first <= 12
    step = system.solve(J.T @ r, 1.0, ones)  # a retry with more damping: solved on the same basis
    assert len(calls) == first and system.iterations == 0 and system.reason == "tolerance"
    torch.testing.assert_close(step, torch.linalg.solve(J.T @ J + torch.eye(12, dtype=DT), -J.T @ r))


def test_matrix_free_basis_is_capped_by_max_iter():
    J, r = jacobian(60, 30, seed=1)
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), rtol=1e-14, max_iter=4,
                                 stall_tol=0, precondition=False)
    system.solve(J.T @ r, 1e-6, torch.ones(30, dtype=DT))
    assert (system.iterations, system.reason) == (5, "max_iter")  # max_iter + 1 basis vectors
    system.solve(J.T @ r, 1e-3, torch.ones(30, dtype=DT))
    assert system.iterations == 0


def test_warm_start_is_the_first_basis_vector():
    J, r = jacobian(40, 12)
    exact = torch.linalg.solve(J.T @ J + 1e-2 * torch.eye(12, dtype=DT), -J.T @ r)
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), initial=3 * exact, rtol=1e-10)
    step = system.solve(J.T @ r, 1e-2, torch.ones(12, dtype=DT))
    assert system.iterations == 1 and system.reason == "tolerance"
    torch.testing.assert_close(step, exact)


def test_a_float32_warm_start_of_a_float64_system_is_cast_to_the_gradients_dtype():
    # A tiny float32 network is worked in float64 while its warm start x - previous_x is made
    # in float32: the basis raised "addmv input tensors must have the same dtype".
    J, r = jacobian(40, 12)
    exact = torch.linalg.solve(J.T @ J + 1e-2 * torch.eye(12, dtype=DT), -J.T @ r)
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), initial=(3 * exact).float(),
                                 rtol=1e-6)
    step = system.solve(J.T @ r, 1e-2, torch.ones(12, dtype=DT))
    assert step.dtype == DT and system.reason == "tolerance"
    torch.testing.assert_close(step, exact, rtol=1e-6, atol=1e-6)


def test_matrix_free_diagonal_is_computed_once_on_demand():
    J, _ = jacobian()
    count = []

    def diagonal():
        count.append(1)
        return (J * J).sum(0)

    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, diagonal)
    assert not count
    torch.testing.assert_close(system.diagonal(), (J * J).sum(0))
    system.diagonal()
    assert len(count) == 1 and system.path == "cg" and system.name == "matrix-free"


def test_inexact_step_is_a_descent_direction_with_positive_predicted_reduction():
    J, r = jacobian(50, 20, seed=3)
    g = J.T @ r
    for iters in (1, 2, 5):
        system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), rtol=0.0, max_iter=iters)
        h = system.solve(g, 1e-3, torch.ones(20, dtype=DT))
        predicted = -float(g @ h + 0.5 * system.curvature(h))
        assert float(g @ h) < 0 and predicted > 0


@pytest.mark.parametrize("norm, previous_norm, previous_forcing, expected", [
    (1.0, None, None, 0.5),            # first iteration: the loosest tolerance
    (0.1, 1.0, 0.3, 0.9 * 0.01),       # fast progress: tight
    (0.1, 1.0, 0.5, 0.9 * 0.25),       # safeguard: not below gamma * eta_prev^2 when that is > 0.1
    (2.0, 1.0, 0.1, 0.5),              # growing gradient: clipped to the upper bound
    (1e-6, 1.0, 0.01, 1e-4),           # clipped to the lower bound
])
def test_eisenstat_walker_table(norm, previous_norm, previous_forcing, expected):
    assert eisenstat_walker(norm, previous_norm, previous_forcing) == pytest.approx(expected)


class _SummedOutputs(torch.nn.Module):
    """A torch.func module whose per-sample output is a scalar: outputs of shape (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(x)).sum(1)


def _stack_3d() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


@pytest.mark.parametrize("make, x_shape, y_shape", [
    (_SummedOutputs, (20, 3), (20,)),           # targets (N,) against outputs held as (N, 1)
    (_stack_3d, (20, 4, 3), (20, 4, 2)),        # targets (N, T, K) against outputs held as (N, T K)
])
def test_matrix_free_network_step_with_targets_not_shaped_samples_by_outputs(make, x_shape, y_shape):
    from torch.func import functional_call, jacrev

    from marquardt.network import ModuleProblem, flatten_parameters

    torch.manual_seed(0)
    model = make().to(DT)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(x_shape, generator=g, dtype=DT), torch.randn(y_shape, generator=g, dtype=DT)
    x0 = flatten_parameters(model)
    names, shapes = zip(*[(name, p.shape) for name, p in model.named_parameters()])

    def residuals(x):
        params = dict(zip(names, (piece.view(s) for piece, s in zip(x.split([s.numel() for s in shapes]), shapes))))
        return (functional_call(model, params, (X,)) - y).reshape(-1)

    J, r = jacrev(residuals)(x0), residuals(x0)
    problem = ModuleProblem(model, X, y, solver="matrix-free", cg_max_iter=x0.numel())
    lin = problem.linearize(x0)
    lin.system.rtol, lin.system.stall_tol = 1e-12, 0.0
    step = lin.system.solve(lin.grad, 1e-2, torch.ones_like(x0))
    assert lin.cost == pytest.approx(0.5 * float(r @ r), rel=1e-12)
    torch.testing.assert_close(lin.grad, J.T @ r, rtol=1e-10, atol=1e-12)
    expected = torch.linalg.solve(J.T @ J + 1e-2 * torch.eye(x0.numel(), dtype=DT), -J.T @ r)
    torch.testing.assert_close(step, expected, rtol=1e-8, atol=1e-10)


def test_a_non_finite_gradient_gives_a_nan_step_not_a_zero_one():
    # Before: CG broke down at once and returned h = 0, which lm_step takes for a tiny step.
    J, r = jacobian()
    J[3, 2] = float("nan")
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), precondition=False)
    step = system.solve(J.T @ r, 1e-3, torch.ones(8, dtype=DT))
    assert bool(torch.isnan(step).all()) and system.reason == "breakdown"


def test_fit_matrix_free_with_a_non_finite_jacobian_stops_at_maximum_mu_in_one_epoch():
    # Before: one epoch per damping increase (13 epochs of zero steps from mu = 1e-3 to 1e10).
    from torch import nn

    from marquardt import fit

    class Sqrt(nn.Module):
        def forward(self, x):
            return x.abs().sqrt()  # derivative NaN (0 / 0) at 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), Sqrt(), nn.Linear(4, 1)).to(DT)
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 1.0, 0.0
    X = torch.linspace(-1, 1, 21, dtype=DT)[:, None]
    X[10] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(model, X, torch.sin(3 * X), epochs=5, solver="matrix-free")
    assert history.stop_reason == "Maximum MU reached." and history["epoch"] == [0, 1]
    assert history["damping"][-1] > 1e10 and history["solver"][1:] == ["cg"]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_float32_gradient_whose_norm_overflows_float32_still_gets_its_step():
    # ||g||^2 = 3.6e39 is past float32's 3.4e38 while every product is finite: the norms came out
    # inf, the forcing test read inf <= inf and the solve returned h = 0 as "tolerance".
    J = 1e19 * torch.eye(4)
    r = torch.full((4,), 3.0)
    system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), rtol=1e-6, precondition=False)
    step = system.solve(J.T @ r, 1e-3, torch.ones(4))
    assert system.reason == "tolerance" and system.iterations == 1
    torch.testing.assert_close(step, torch.full((4,), -3e-19), rtol=1e-6, atol=0.0)


def _nan_at(call: int, J: torch.Tensor):
    """``v -> J v`` whose ``call``-th product has a NaN entry (counted from 1)."""
    calls = []

    def jvp(v):
        calls.append(1)
        out = J @ v
        if len(calls) == call:
            out[0] = float("nan")
        return out

    return jvp


def test_a_nan_product_inside_cg_stops_the_solve_on_the_basis_it_has():
    # Before: the NaN went into the projected matrix and torch.linalg.lstsq raised an internal
    # assertion ("Argument 4 has illegal value") out of fit.
    J, r = jacobian()
    ones = torch.ones(8, dtype=DT)
    system = MatrixFreeEquations(_nan_at(3, J), lambda u: J.T @ u, (J * J).sum(0), rtol=1e-12, precondition=False)
    step = system.solve(J.T @ r, 1e-3, ones)
    assert system.reason == "breakdown"
    two = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, (J * J).sum(0), rtol=1e-12, max_iter=1,
                              stall_tol=0, precondition=False)
    torch.testing.assert_close(step, two.solve(J.T @ r, 1e-3, ones), rtol=1e-12, atol=1e-14)  # the 2-vector CG step
    torch.testing.assert_close(system.curvature(step), step @ (J.T @ J) @ step, rtol=1e-12, atol=1e-14)
    retry = system.solve(J.T @ r, 1.0, ones)  # more damping: the finite basis, expanded by good products
    torch.testing.assert_close(retry, torch.linalg.solve(J.T @ J + torch.eye(8, dtype=DT), -J.T @ r))


def test_a_nan_first_product_gives_a_nan_step():
    J, r = jacobian()
    system = MatrixFreeEquations(_nan_at(1, J), lambda u: J.T @ u, (J * J).sum(0), precondition=False)
    step = system.solve(J.T @ r, 1e-3, torch.ones(8, dtype=DT))
    assert bool(torch.isnan(step).all()) and system.reason == "breakdown"



def test_fit_matrix_free_float32_with_targets_near_1e17_makes_progress():
    # A float32 network on unscaled targets: ||J^T r|| ~ 3e19 read as inf, every solve returned
    # h = 0, and fit spent one epoch per damping increase at the starting cost.
    from torch import nn

    from marquardt import fit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))
    X = torch.rand(150, 2, generator=torch.Generator().manual_seed(1))
    y = 3e17 * (X[:, :1] + torch.sin(3 * X[:, 1:]))
    history = fit(model, X, y, epochs=2, solver="matrix-free")
    assert history["solver"][1:] == ["cg", "cg"] and history["damping"][1:] == pytest.approx([1e-4, 1e-5])
    assert history["perf"][2] < 0.2 * history["perf"][0]


def test_matrix_free_forcing_reads_a_float32_gradient_norm_past_float32s_range():
    # ||J^T r|| ~ 3e19 summed in float32 was inf: the next solve's Eisenstat-Walker forcing term
    # was computed from inf (the step itself is right since c1f96be; its tolerance was not).
    from torch import nn

    from marquardt.network import ModuleProblem, flatten_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))
    X = torch.rand(150, 2, generator=torch.Generator().manual_seed(1))
    problem = ModuleProblem(model, X, 3e17 * (X[:, :1] + torch.sin(3 * X[:, 1:])), solver="matrix-free")
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    norm = problem._previous[1]
    assert lin.grad.dtype == torch.float32 and math.isinf(float(torch.linalg.vector_norm(lin.grad)))
    assert math.isfinite(norm) and norm == pytest.approx(float(torch.linalg.vector_norm(lin.grad.double())), rel=1e-12)
