"""The torch.optim-style optimizers: LevenbergMarquardt, GradientDescent, Momentum."""

import copy
import functools
import io
import json
import math
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import marquardt
import marquardt.optim
from torch import nn
from marquardt import GradientDescent, LevenbergMarquardt, Momentum
from marquardt.optim import ClosureProblem, prefers_forward, rows_per_backward


def _line_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1).to(dtype)
    X = torch.linspace(0, 1, 20, dtype=dtype)[:, None]
    return model, X, 3 * X - 1


def test_lm_solves_linear_least_squares_in_a_few_steps():
    model, X, y = _line_problem()
    opt = LevenbergMarquardt(model.parameters())
    for _ in range(4):
        cost = opt.step(lambda: model(X) - y)
    assert float(model.weight.detach()) == pytest.approx(3.0, abs=1e-8)
    assert float(model.bias.detach()) == pytest.approx(-1.0, abs=1e-8)
    assert float(cost) < 1e-15


def test_lm_step_returns_cost_at_the_parameters_it_leaves():
    model, X, y = _line_problem()
    opt = LevenbergMarquardt(model.parameters())
    cost = opt.step(lambda: model(X) - y)
    with torch.no_grad():
        r = (model(X) - y).reshape(-1)
    assert float(cost) == pytest.approx(0.5 * float(r @ r), rel=1e-12)


def test_lm_damping_follows_matlab_rule_and_round_trips_through_state_dict():
    model, X, y = _line_problem()
    opt = LevenbergMarquardt(model.parameters(), damping=1e-3)
    opt.step(lambda: model(X) - y)
    assert opt.damping_state.damping == pytest.approx(1e-4)  # accepted: x0.1
    saved = opt.state_dict()
    fresh_model, _, _ = _line_problem()
    fresh = LevenbergMarquardt(fresh_model.parameters())
    fresh.load_state_dict(saved)
    assert fresh.damping_state == opt.damping_state


def test_lm_rejects_non_finite_trials_and_keeps_weights_finite():
    # Residuals are NaN whenever the weight exceeds 2: every long step is rejected.
    w = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    target = torch.tensor([10.0], dtype=torch.float64)

    def closure():
        r = w - target
        return torch.where(w > 2, torch.full_like(r, math.nan), r)

    opt = LevenbergMarquardt([w], damping=1e-6)
    before = opt.damping_state
    cost = opt.step(closure)
    assert torch.isfinite(w).all() and float(w.detach()) <= 2
    assert math.isfinite(float(cost))
    assert before is None and opt.damping_state.damping > 1e-6


def test_lm_nielsen_strategy_also_converges():
    model, X, y = _line_problem()
    opt = LevenbergMarquardt(model.parameters(), strategy="nielsen")
    for _ in range(10):
        opt.step(lambda: model(X) - y)
    assert float(model.weight.detach()) == pytest.approx(3.0, abs=1e-6)


def test_lm_solves_physics_informed_poisson_problem():
    """u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0, 1-20-1 tanh network, float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1)).double()
    x = torch.linspace(0, 1, 102, dtype=torch.float64)[1:-1, None].requires_grad_(True)
    boundary = torch.tensor([[0.0], [1.0]], dtype=torch.float64)

    def closure():
        u = net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        pde = d2u + math.pi**2 * torch.sin(math.pi * x)
        return torch.cat([pde.reshape(-1), 10 * net(boundary).reshape(-1)])

    opt = LevenbergMarquardt(net.parameters())
    for _ in range(300):
        opt.step(closure)
        if opt.exhausted:
            break
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        exact = torch.sin(math.pi * grid)
        error = float(torch.linalg.vector_norm(net(grid) - exact) / torch.linalg.vector_norm(exact))
    assert error < 1e-6


def test_adam_stalls_far_above_lm_on_the_same_physics_problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1)).double()
    x = torch.linspace(0, 1, 102, dtype=torch.float64)[1:-1, None].requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        u = net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        boundary = net(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
        loss = ((d2u + math.pi**2 * torch.sin(math.pi * x)) ** 2).mean() + (boundary**2).sum()
        loss.backward()
        opt.step()
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None]
    with torch.no_grad():
        exact = torch.sin(math.pi * grid)
        error = float(torch.linalg.vector_norm(net(grid) - exact) / torch.linalg.vector_norm(exact))
    assert error > 1e-3


def _tanh_problem(m=60, hidden=8):
    """1-hidden-8-1 tanh network on ``m`` samples, float64: more residuals than parameters (normal form)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).double()
    X = torch.linspace(-2, 2, m, dtype=torch.float64)[:, None]
    return net, X, torch.sin(2 * X)


@pytest.fixture
def autograd_paths(monkeypatch):
    """Steps by the closure's autograd graph (rows or columns), never the closed form."""
    monkeypatch.setattr(LevenbergMarquardt, "_closed_form", False)


def _one_step(max_jacobian_bytes):
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters(), max_jacobian_bytes=max_jacobian_bytes)
    cost = opt.step(lambda: net(X) - y)
    return float(cost), torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_lm_step_with_tiny_jacobian_budget_equals_step_with_large_budget(autograd_paths):
    # 2000 bytes: chunks of 10 rows (25 parameters), each from 10 one-row backward passes, as the
    # graph saves about 4.5 KB.
    tiny_cost, tiny_x = _one_step(2000)
    large_cost, large_x = _one_step(1 << 30)
    assert tiny_cost == pytest.approx(large_cost, rel=1e-12)
    torch.testing.assert_close(tiny_x, large_x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batch", [1, 7, 60])
def test_jacobian_chunks_do_not_depend_on_rows_per_backward(batch):
    net, X, y = _tanh_problem()
    problem = ClosureProblem(list(net.parameters()), lambda: net(X) - y)
    with torch.enable_grad():
        r = problem.residuals()
        reference = torch.autograd.functional.jacobian(lambda *p: torch.func.functional_call(
            net, dict(zip([n for n, _ in net.named_parameters()], p)), (X,)).reshape(-1), tuple(net.parameters()))
        chunks = list(problem._jacobian_chunks(r, 25, batch))
    assert [c[0].shape[0] for c in chunks] == [25, 25, 10]
    expected = torch.cat([j.reshape(60, -1) for j in reference], dim=1)
    torch.testing.assert_close(torch.cat([c[0] for c in chunks]), expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), r.detach())


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of seeds of every batched backward pass (``_vmapped_rows`` call), in order."""
    seen = []
    original = marquardt.optim._vmapped_rows

    def counting(outputs, inputs, seeds):
        seen.append(seeds.shape[0])
        return original(outputs, inputs, seeds)

    monkeypatch.setattr(marquardt.optim, "_vmapped_rows", counting)
    return seen


def test_rows_per_backward_are_bounded_by_the_budget_given_the_saved_tensors(monkeypatch, batch_sizes, autograd_paths):
    m, hidden = 60, 8
    net, X, y = _tanh_problem(m, hidden)
    n = sum(p.numel() for p in net.parameters())
    seen = batch_sizes
    monkeypatch.setattr(marquardt.optim, "prefers_forward", lambda *args: False)
    budget = 20 * m * hidden * 8  # room for about 20 copies of the tanh activations
    opt = LevenbergMarquardt(net.parameters(), max_jacobian_bytes=budget)
    opt.step(lambda: net(X) - y)
    # The graph saves at least the m x hidden tanh output, so each pass holds fewer than 20 rows.
    assert max(seen) * (m * hidden * 8 + n * 8) <= budget
    assert sum(seen) == m and len(seen) == math.ceil(m / max(seen))


def test_tanh_network_rows_take_torch_vmap_not_the_legacy_batched_backward(monkeypatch, autograd_paths):
    # The legacy is_grads_batched has no batching rule for tanh_backward and loops in Python.
    def refuse(*args):
        raise AssertionError("the legacy batched backward was used")

    monkeypatch.setattr(marquardt.optim, "_legacy_batched_rows", refuse)
    net, X, y = _tanh_problem()
    assert float(LevenbergMarquardt(net.parameters()).step(lambda: net(X) - y)) < 0.5 * float(y.square().sum())


def _poisson_problem():
    """u'' = -pi^2 sin(pi x) residuals of a 1-20-1 tanh network: the closure itself differentiates."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1)).double()
    x = torch.linspace(0, 1, 202, dtype=torch.float64)[1:-1, None].requires_grad_(True)

    def closure():
        u = net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        return torch.cat([(d2u + math.pi**2 * torch.sin(math.pi * x)).reshape(-1), net(x[[0, -1]]).reshape(-1)])

    return net, closure


def _mlp_problem():
    net, X, y = _tanh_problem(m=200, hidden=20)
    return net, lambda: net(X) - y


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        out = torch.tanh(z)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)


class _OpaqueTanh(_OnceDifferentiableTanh):
    """A backward pass computed outside autograd, without saying so: ``J^T u`` silently loses ``u``."""

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.detach() * (1 - out**2)


def _custom_tanh_problem(function):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(1, 20).double(), torch.nn.Linear(20, 1).double()
    X = torch.linspace(-2, 2, 200, dtype=torch.float64)[:, None]
    net = torch.nn.Sequential(first, second)
    return net, lambda: second(function.apply(first(X))) - torch.sin(2 * X)


def _jacobians(net, closure):
    """The Jacobian by rows and by columns (``None`` where the column path declined)."""
    problem = ClosureProblem(list(net.parameters()), closure)
    with torch.enable_grad():
        r = problem.residuals()
        rows = torch.cat([chunk for chunk, _ in problem._jacobian_chunks(r, r.numel(), r.numel())])
        return rows, problem._forward_jacobian(r, 0)


@pytest.mark.parametrize("make", [_mlp_problem, _poisson_problem])
def test_jacobian_by_columns_equals_jacobian_by_rows(make):
    rows, columns = _jacobians(*make())
    assert columns is not None
    torch.testing.assert_close(columns, rows, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("function", [_OnceDifferentiableTanh, _OpaqueTanh])
def test_graphs_that_cannot_be_differentiated_twice_decline_the_column_path(function):
    net, closure = _custom_tanh_problem(function)
    rows, columns = _jacobians(net, closure)
    assert columns is None
    reference, _ = _jacobians(*_custom_tanh_problem(_Tanh))
    torch.testing.assert_close(rows, reference, rtol=1e-12, atol=1e-14)


class _Tanh(torch.autograd.Function):
    forward = _OnceDifferentiableTanh.forward

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)


@pytest.mark.parametrize("function", [_OnceDifferentiableTanh, _OpaqueTanh, _Tanh])
def test_lm_step_on_graphs_the_column_path_declines_equals_the_step_by_rows(function, monkeypatch):
    net, closure = _custom_tanh_problem(function)
    opt = LevenbergMarquardt(net.parameters())
    cost = opt.step(closure)
    assert opt.state[next(iter(net.parameters()))]["jacobian"] == ("forward" if function is _Tanh else "reverse")
    monkeypatch.setattr(marquardt.optim, "prefers_forward", lambda *args: False)
    net_rows, closure_rows = _custom_tanh_problem(function)
    assert float(cost) == pytest.approx(float(LevenbergMarquardt(net_rows.parameters()).step(closure_rows)), rel=1e-10)
    for p, q in zip(net.parameters(), net_rows.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("m", "budget", "path"),
    [
        (200, 1 << 30, "forward"),  # n = 61: m > 2n
        (122, 1 << 30, "reverse"),  # m = 2n
        (200, 200 * 61 * 8 - 1, "reverse"),  # the whole Jacobian would not fit
    ],
)
def test_lm_takes_columns_when_residuals_outnumber_twice_the_parameters(m, budget, path, autograd_paths):
    net, X, y = _tanh_problem(m=m, hidden=20)
    opt = LevenbergMarquardt(net.parameters(), max_jacobian_bytes=budget)
    opt.step(lambda: net(X) - y)
    assert opt.state[next(iter(net.parameters()))]["jacobian"] == path
    assert prefers_forward(m, 61, 8, budget) == (path == "forward")


def test_column_batches_are_bounded_by_the_budget_given_both_graphs(batch_sizes, autograd_paths):
    m, hidden = 200, 8
    net, X, y = _tanh_problem(m, hidden)
    n = sum(p.numel() for p in net.parameters())
    seen = batch_sizes
    budget = 40 * m * hidden * 8  # room for about 40 copies of the tanh activations
    opt = LevenbergMarquardt(net.parameters(), max_jacobian_bytes=budget)
    opt.step(lambda: net(X) - y)
    assert opt.state[next(iter(net.parameters()))]["jacobian"] == "forward"
    # Both graphs save at least the m x hidden tanh output (and hold it twice a column).
    assert 1 < max(seen) < n
    assert max(seen) * (2 * 2 * m * hidden * 8 + m * 8) <= budget
    assert sum(seen) == n and len(seen) == math.ceil(n / max(seen))


@pytest.mark.parametrize("closed_form", [True, False])
def test_jacobian_paths_leave_the_global_random_stream_alone(closed_form, monkeypatch):
    monkeypatch.setattr(LevenbergMarquardt, "_closed_form", closed_form)
    net, closure = _mlp_problem()
    torch.manual_seed(1)
    LevenbergMarquardt(net.parameters()).step(closure)
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.testing.assert_close(after, torch.rand(3))


def test_small_problems_run_their_closure_on_one_thread_and_restore_the_count():
    net, X, y = _tanh_problem(m=200, hidden=20)  # 200 x 61 Jacobian: small
    seen = []

    def closure():
        seen.append(torch.get_num_threads())
        return net(X) - y

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt = LevenbergMarquardt(net.parameters())
        opt.step(closure)
        first = len(seen)
        opt.step(closure)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen[0] == 2 and set(seen[1:]) == {1}  # the size is unknown before the first call
    assert len(seen) > first


def test_saved_bytes_counts_each_saved_storage_once():
    m, hidden = 60, 8
    net, X, y = _tanh_problem(m, hidden)
    with torch.enable_grad(), marquardt.optim._SavedBytes() as saved:
        net(X) - y
    # The tanh output is saved by Tanh and by the second Linear: counted once, with the input
    # and the weights on top.
    assert m * hidden * 8 < saved.nbytes < 2 * m * hidden * 8


def _expanded_weight_problem(B=500, d=32):
    """Per-sample ``bmm`` by one shared weight expanded over the ``B`` samples (stride 0), float64."""
    torch.manual_seed(0)
    A, W = (nn.Parameter(torch.randn(d, d, dtype=torch.float64) / d**0.5) for _ in range(2))
    v = nn.Parameter(torch.randn(d, 1, dtype=torch.float64) / d**0.5)
    X = torch.randn(B, 1, d, dtype=torch.float64)
    y = torch.randn(B, 1, dtype=torch.float64)
    return [A, W, v], lambda: (torch.tanh(torch.bmm(torch.tanh(X @ A), W.expand(B, d, d))).reshape(B, d) @ v) - y


def test_saved_views_of_parameters_are_copied_once_per_storage_not_per_view(monkeypatch):
    # W.expand(500, 32, 32) was cloned at its expanded size, 4 MB for an 8 KB weight (125 MB for
    # the audit's 64 KB weight over 2,000 samples).
    params, closure = _expanded_weight_problem()
    packed = []
    pack = marquardt.optim._SavedBytes._pack

    def record(self, tensor):
        out = pack(self, tensor)
        if out is not tensor:
            packed.append(out)
        return out

    monkeypatch.setattr(marquardt.optim._SavedBytes, "_pack", record)
    with torch.enable_grad(), marquardt.optim._SavedBytes(params):
        closure()
    copies = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
    assert any(t.stride()[0] == 0 and t.shape == (500, 32, 32) for t in packed)  # the view itself is kept
    # Measured: 8,448 bytes, W and v (A is not saved), against 4,096,256 before.
    assert sum(copies.values()) <= sum(p.numel() * p.element_size() for p in params)


def test_matrix_free_step_through_expanded_parameter_views_is_unchanged_by_the_copies(monkeypatch):
    def steps():
        params, closure = _expanded_weight_problem()
        opt = LevenbergMarquardt(params, solver="matrix-free")
        costs = [float(opt.step(closure)) for _ in range(3)]
        assert opt.state[params[0]]["jacobian"] == "forward"
        return costs

    shared = steps()
    # A clone of every saved view of a parameter (the copies before): the same bits. (On torch
    # 2.13 [251.6349774378416, 198.721492568984, 136.42179305340306]; other releases round
    # differently in the last bits, so the reference is computed here.)
    monkeypatch.setattr(marquardt.optim._SavedBytes, "_snapshot", lambda self, tensor, key: tensor.clone())
    assert steps() == shared
    assert shared[2] < 0.6 * shared[0]


# (solver, max_matrix_bytes relative to J^T J's n * n * 8 bytes, whether saved weights are copied)
COPIES_BY_FORM = [("matrix-free", 1, True), ("auto", -1, True), ("auto", 0, False), ("normal", 0, False),
                  ("sample-space", -1, False)]


@pytest.mark.parametrize("solver, margin, copied", COPIES_BY_FORM)
def test_saved_weights_are_copied_only_when_the_step_can_be_matrix_free(solver, margin, copied, monkeypatch):
    # The dense forms form J before any trial writes the parameters: copies would only cost memory.
    given = []

    class Spy(marquardt.optim._SavedBytes):
        def __init__(self, params=None):
            given.append(params)
            super().__init__(params)

    monkeypatch.setattr(marquardt.optim, "_SavedBytes", Spy)
    net, closure = _squashed_problem(60, 8)
    n = _n_params(net)
    LevenbergMarquardt(net.parameters(), solver=solver, max_matrix_bytes=n * n * 8 + margin).step(closure)
    assert bool(given[0]) == copied


def test_rows_per_backward_is_at_least_one():
    assert rows_per_backward(10**12, 8, 100) == 1
    assert rows_per_backward(0, 8, 100) == 12


# ---------------------------------------------------------------------------------------------
# the closed-form path: the module behind the residuals, verified, else the autograd paths


def _params(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _state(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


def _same_state(*states):
    """Whether the optimizer states hold the same keys and values (tensors equal, bit for bit)."""
    def same(a, b):
        return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b

    first = states[0]
    return all(state.keys() == first.keys() and all(same(state[k], first[k]) for k in first) for state in states)


def _steps(make, closed_form, monkeypatch, steps=1, select=lambda net: net.parameters()):
    """``steps`` LM steps on ``make()``'s problem; the costs, the weights, and the last state."""
    monkeypatch.setattr(LevenbergMarquardt, "_closed_form", closed_form)
    net, closure = make()
    opt = LevenbergMarquardt(select(net))
    costs = [float(opt.step(closure)) for _ in range(steps)]
    return costs, _params(net), _state(opt)


def _tanh_closure(m=60, hidden=8, dtype=torch.float64):
    net, X, y = _tanh_problem(m, hidden)
    net, X, y = net.to(dtype), X.to(dtype), y.to(dtype)
    return net, lambda: net(X) - y


def _dense_step(net, X, y, damping=1e-3):
    """The LM step at ``damping``, ``(J^T J + damping I) h = -J^T r``, with ``J`` from torch.func."""
    names = [name for name, _ in net.named_parameters()]

    def residuals(*params):
        return (torch.func.functional_call(net, dict(zip(names, params)), (X,)) - y).reshape(-1)

    values = tuple(p.detach() for p in net.parameters())
    blocks = torch.func.jacrev(residuals, tuple(range(len(values))))(*values)
    jac = torch.cat([block.reshape(X.shape[0], -1) for block in blocks], dim=1)
    r = residuals(*values)
    return torch.linalg.solve(jac.T @ jac + damping * torch.eye(jac.shape[1], dtype=jac.dtype), -jac.T @ r)


@pytest.mark.parametrize(("m", "hidden", "form"), [(60, 8, "cholesky"), (10, 20, "sample-space")])
def test_closed_form_step_equals_the_autograd_step_and_the_dense_step(m, hidden, form, monkeypatch):
    make = functools.partial(_tanh_closure, m, hidden)
    costs, x, state = _steps(make, True, monkeypatch)
    reference_costs, reference_x, reference_state = _steps(make, False, monkeypatch)
    assert state["jacobian"] == "closed-form" and reference_state["jacobian"] in ("forward", "reverse")
    assert state["solver"] == reference_state["solver"] == form
    assert costs[0] == pytest.approx(reference_costs[0], rel=1e-12)
    torch.testing.assert_close(x, reference_x, rtol=1e-11, atol=1e-13)
    # MATLAB's rule: the accepted trial's damping, times damping_dec (0.1) once accepted.
    net, X, y = _tanh_problem(m, hidden)
    step = _dense_step(net, X, y, damping=state["damping"] / 0.1)
    torch.testing.assert_close(x - _params(net), step, rtol=1e-9, atol=1e-12)


def test_closed_form_keeps_float32_parameters_in_float32_and_steps_as_float64_would(monkeypatch):
    # A tiny float32 network is linearized in float64 (ModuleProblem's working dtype), but the
    # step and the weights stay float32: the same step as the float64 problem's, rounded.
    costs32, x32, state = _steps(functools.partial(_tanh_closure, dtype=torch.float32), True, monkeypatch)
    costs64, x64, _ = _steps(_tanh_closure, True, monkeypatch)
    assert state["jacobian"] == "closed-form" and x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64, rtol=1e-5, atol=1e-5)
    assert costs32[0] == pytest.approx(costs64[0], rel=1e-5)


def _closure_of(residuals, model=None):
    """``make()`` for a closure ``residuals(net, X, y)`` on the 60-sample tanh problem."""

    def make():
        net, X, y = _tanh_problem()
        net = net if model is None else model(net)
        return net, lambda: residuals(net, X, y)

    return make


class _Wrapped(torch.nn.Module):
    """A module ``describe`` does not know, around a supported one."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, X):
        return self.net(X)


def _frozen_bias(net):
    net[0].bias.requires_grad_(False)
    return net


_FALLBACKS = {
    "scaled residuals": (_closure_of(lambda net, X, y: 2 * (net(X) - y)), None),
    "squared outputs": (_closure_of(lambda net, X, y: net(X) ** 2 - y), None),
    "model called twice": (_closure_of(lambda net, X, y: torch.cat([(net(X) - y).reshape(-1),
                                                                     net(X[:5]).reshape(-1)])), None),
    "outputs changed in place": (_closure_of(lambda net, X, y: net(X).sub_(y)), None),
    "unsupported module": (_closure_of(lambda net, X, y: net(X) - y, _Wrapped), None),
    "frozen parameter": (_closure_of(lambda net, X, y: net(X) - y, _frozen_bias),
                         lambda net: [p for p in net.parameters() if p.requires_grad]),
    "first layer only": (_closure_of(lambda net, X, y: net(X) - y), lambda net: net[0].parameters()),
    "physics-informed": (_poisson_problem, None),
}


@pytest.mark.parametrize("case", list(_FALLBACKS))
def test_closures_that_are_not_module_outputs_minus_constants_take_the_autograd_step(case, monkeypatch):
    make, select = _FALLBACKS[case]
    select = select or (lambda net: net.parameters())
    costs, x, state = _steps(make, True, monkeypatch, steps=2, select=select)
    reference_costs, reference_x, reference_state = _steps(make, False, monkeypatch, steps=2, select=select)
    assert state["jacobian"] in ("forward", "reverse")
    assert (costs, state["jacobian"]) == (reference_costs, reference_state["jacobian"])
    assert torch.equal(x, reference_x)
    assert costs[-1] < costs[0]


def test_a_last_layer_alone_is_a_module_output_minus_a_constant(monkeypatch):
    # The hidden layer is fixed for this optimizer: the last stage's outputs minus y, verified.
    def staged(net):
        return torch.nn.Sequential(net[0], net[1], torch.nn.Sequential(net[2]))

    make, select = _closure_of(lambda net, X, y: net(X) - y, staged), lambda net: net[2].parameters()
    costs, x, state = _steps(make, True, monkeypatch, select=select)
    reference_costs, reference_x, _ = _steps(make, False, monkeypatch, select=select)
    assert state["jacobian"] == "closed-form"
    assert costs[0] == pytest.approx(reference_costs[0], rel=1e-12)
    torch.testing.assert_close(x, reference_x, rtol=1e-11, atol=1e-13)


def test_training_by_the_closed_form_reaches_the_cost_of_the_autograd_paths(monkeypatch):
    make = functools.partial(_tanh_closure, 200, 20)
    costs, _, state = _steps(make, True, monkeypatch, steps=15)
    reference_costs, _, _ = _steps(make, False, monkeypatch, steps=15)
    assert state["jacobian"] == "closed-form"
    assert costs[-1] < 1e-3 * costs[0]
    assert costs == pytest.approx(reference_costs, rel=1e-6)


def test_module_hooks_are_removed_after_a_step_even_when_the_closure_raises():
    hooks = torch.nn.modules.module
    before = (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks))
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    opt.step(lambda: net(X) - y)

    def failing():
        net(X)
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks)) == before


def test_steps_leave_no_global_hook_record_behind_and_no_torch_compile_warning():
    # torch's handle of register_module_forward_hook(..., with_kwargs=True) does not remove its
    # entry in _global_forward_hooks_with_kwargs: one entry was left per step (100 after 100
    # steps), and torch.nn.modules.module._has_any_global_hook() stayed true in the whole
    # process, so every call of a torch.compile(module) warned about global hooks from then on.
    hooks = torch.nn.modules.module
    names = [name for name in vars(hooks) if name.startswith("_global_") and name.endswith("hooks")
             or name.startswith("_global_forward_hooks_")]
    before = {name: dict(getattr(hooks, name)) for name in names}
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    for closure in (lambda: net(X) - y, lambda: torch.sin(net(X)) - y):
        for _ in range(3):
            opt.step(closure)
    assert {name: dict(getattr(hooks, name)) for name in names} == before
    if any(before.values()):  # a global hook of another test: the warning is torch's to give
        return
    compiled = torch.compile(net, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(compiled(X), net(X))


# (options, the error the constructor must raise, its message)
BAD_OPTIONS = [
    (dict(damping=-1.0), ValueError, "Invalid damping value: -1.0"),
    (dict(damping_dec=1.5), ValueError, "Invalid damping_dec value: 1.5"),
    # A factor of 1 would never lower the damping; fit refuses mu_dec=1 too.
    (dict(damping_dec=1.0), ValueError, r"Invalid damping_dec value: 1.0; expected .* > 0.0 and < 1.0"),
    (dict(damping_inc=0.5), ValueError, "Invalid damping_inc value: 0.5"),
    (dict(damping_max=0), ValueError, "Invalid damping_max value: 0"),
    (dict(strategy="trust"), ValueError, "Invalid strategy: 'trust'"),
    (dict(max_jacobian_bytes=0), ValueError, "Invalid max_jacobian_bytes value: 0"),
    (dict(max_jacobian_bytes=True), ValueError, r"Invalid max_jacobian_bytes value: True; expected an integer >= 1"),
    (dict(max_jacobian_bytes=2.0**20), ValueError, "Invalid max_jacobian_bytes value: 1048576.0"),
    (dict(damping=True), ValueError, "Invalid damping value: True"),
    (dict(damping="1e-3"), ValueError, "Invalid damping value: '1e-3'"),
    (dict(damping_max=np.inf), ValueError, "Invalid damping_max value: inf"),
    # fit's names and meanings (its method options max_matrix_bytes and solver)
    (dict(max_matrix_bytes=0), ValueError,
     r"Invalid max_matrix_bytes value: 0; expected an integer >= 1 \(bytes\)"),
    (dict(max_matrix_bytes=False), ValueError, "Invalid max_matrix_bytes value: False"),
    (dict(max_matrix_bytes=1e9), ValueError, "Invalid max_matrix_bytes value: 1000000000.0"),
    (dict(solver="cg"), ValueError,
     r"Invalid solver: 'cg'; expected 'auto' or one of \('sample-space', 'normal', 'matrix-free'\)"),
    (dict(solver=None), ValueError, "Invalid solver: None"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_OPTIONS)
def test_lm_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        LevenbergMarquardt(torch.nn.Linear(1, 1).parameters(), **kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_OPTIONS)
def test_lm_rejects_bad_options_given_in_its_parameter_group(kwargs, error, match):
    # torch.optim's per-group form, LevenbergMarquardt([{"params": ..., "damping": ...}]): the
    # group's own values were taken unchecked, and refused only at the first step.
    with pytest.raises(error, match=match):
        LevenbergMarquardt([{"params": torch.nn.Linear(1, 1).parameters(), **kwargs}])


def test_lm_options_given_in_its_parameter_group_are_stepped_and_stored_as_the_constructors():
    net, X, y = _tanh_problem()
    reference = copy.deepcopy(net)
    opt = LevenbergMarquardt([{"params": net.parameters(), "damping": np.float64(0.1), "damping_inc": 4}])
    group = opt.param_groups[0]
    assert (type(group["damping"]), type(group["damping_inc"])) == (float, float)
    expected = LevenbergMarquardt(reference.parameters(), damping=0.1, damping_inc=4.0)
    for _ in range(3):
        assert opt.step(lambda: net(X) - y) == expected.step(lambda: reference(X) - y)
    assert torch.equal(_params(net), _params(reference)) and opt.damping_state == expected.damping_state


def _edit_group(opt, how, key, value):
    """Give the optimizer's group ``key = value`` as a user can after construction."""
    if how == "set":
        opt.param_groups[0][key] = value
    else:  # a state dict saved elsewhere, or edited
        saved = opt.state_dict()
        saved["param_groups"][0][key] = value
        opt.load_state_dict(saved)


# (how the group got the value, the key, the value, the error step() must raise before the closure runs)
BAD_GROUPS = [
    ("set", "damping_inc", 0.5, r"Invalid damping_inc value: 0.5; expected a finite number > 1.0\."),
    ("set", "damping_inc", 1.0, r"Invalid damping_inc value: 1.0; expected a finite number > 1.0\."),
    ("set", "damping_dec", 1.0, r"Invalid damping_dec value: 1.0; expected a finite number > 0.0 and < 1.0\."),
    ("set", "damping_dec", 0.0, r"Invalid damping_dec value: 0.0; expected a finite number > 0.0 and < 1.0\."),
    ("set", "damping", -1e-3, r"Invalid damping value: -0.001; expected a finite number > 0.0\."),
    ("set", "damping_max", math.nan, r"Invalid damping_max value: nan; expected a finite number > 0.0\."),
    ("set", "strategy", "trust", r"Invalid strategy: 'trust'; expected 'marquardt' or 'nielsen'\."),
    ("set", "max_jacobian_bytes", 0, r"Invalid max_jacobian_bytes value: 0; expected an integer >= 1 \(bytes\)\."),
    ("set", "max_matrix_bytes", -1, r"Invalid max_matrix_bytes value: -1; expected an integer >= 1 \(bytes\)\."),
    ("set", "solver", "dense", r"Invalid solver: 'dense'; expected 'auto' or one of .*\."),
    ("loaded", "damping_inc", -5, r"Invalid damping_inc value: -5; expected a finite number > 1.0\."),
    ("loaded", "damping_dec", 2.0, r"Invalid damping_dec value: 2.0; expected a finite number > 0.0 and < 1.0\."),
]


@pytest.mark.parametrize("how, key, value, message", BAD_GROUPS,
                         ids=[f"{how} {key}={value}" for how, key, value, _ in BAD_GROUPS])
def test_lm_step_refuses_a_bad_group_before_the_closure_runs(how, key, value, message):
    # Was a ValueError from the damping rule after the closure had run and J had been formed, or,
    # for strategy='trust' and max_jacobian_bytes=0, no error at all (a Marquardt step was taken).
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    opt.step(lambda: net(X) - y)
    _edit_group(opt, how, key, value)
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure():
        calls.append(1)
        return net(X) - y

    with pytest.raises(ValueError, match=message + r" It was read from param_groups\[0\]"):
        opt.step(closure)
    assert calls == [] and all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_lm_takes_a_numpy_integer_budget_as_fit_does():
    opt = LevenbergMarquardt(torch.nn.Linear(1, 1).parameters(), max_jacobian_bytes=np.int64(1 << 20))
    assert type(opt.defaults["max_jacobian_bytes"]) is int and opt.defaults["max_jacobian_bytes"] == 1 << 20


def test_lm_rejects_several_parameter_groups():
    model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    with pytest.raises(ValueError, match="one parameter group; received 2"):
        LevenbergMarquardt(groups)


def test_lm_refuses_a_parameter_group_added_after_construction():
    # Its parameters would never be stepped: the one group holds everything a step solves for.
    model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Linear(2, 1))
    opt = LevenbergMarquardt(model[0].parameters())
    with pytest.raises(ValueError, match="one parameter group; add_param_group would add a second"):
        opt.add_param_group({"params": model[1].parameters()})
    assert len(opt.param_groups) == 1


def _frozen_net():
    net, X, y = _tanh_problem()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, lambda: net(X) - y


def _residuals_of(residuals):
    def make():
        net, X, y = _tanh_problem()
        return net, lambda: residuals(net, X, y)

    return make


def _raises_at_second_call():
    net, X, y = _tanh_problem()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the first trial point
            raise RuntimeError("closure failed at a trial point")
        return net(X) - y

    return net, closure


def _fewer_residuals_at_trials():
    # A minibatch drawn inside the closure: the trials' costs would be those of other residuals.
    net, X, y = _tanh_problem()
    calls = []

    def closure():
        calls.append(1)
        rows = 60 if len(calls) == 1 else 30
        return net(X[:rows]) - y[:rows]

    return net, closure


def _nan_at_the_start():
    net, X, y = _tanh_problem()
    return net, lambda: torch.where(X == X[3], math.nan, net(X) - y)


def _float32_cost_overflow():
    # Every residual is finite (about 1e20); their squares pass float32's 3.4e38.
    net, X, y = _tanh_problem()
    net, X, y = net.float(), X.float(), y.float()
    return net, lambda: 1e20 * (net(X) - y)


def _sqrt_at_zero():
    # Finite residuals whose derivative is infinite: d sqrt(w) / dw at w = 0.
    net = torch.nn.Linear(1, 1, dtype=torch.float64)
    with torch.no_grad():
        net.weight.zero_()
    X = torch.linspace(0, 1, 10, dtype=torch.float64)
    return net, lambda: torch.sqrt(net.weight[0]) * X + net.bias - (2 * X + 1)


def _bfloat16_net():
    # Twice the residuals: not the closed form (which works the network in float64), so the
    # Jacobian comes from autograd in bfloat16, which no Cholesky accepts.
    net, X, y = _tanh_problem()
    net, X, y = net.bfloat16(), X.bfloat16(), y.bfloat16()
    return net, lambda: 2 * (net(X) - y)


def _complex_residuals():
    net, X, y = _tanh_problem()
    return net, lambda: torch.fft.fft((net(X) - y).reshape(-1))


def _another_models_residuals():
    # The optimizer holds net's parameters; the closure uses a copy: J reads as zero.
    net, X, y = _tanh_problem()
    copied = copy.deepcopy(net)
    return net, lambda: copied(X) - y


def _lbfgs_style_closure():
    # Written as for torch.optim.LBFGS, but returning the residuals: backward() frees the graph.
    net, X, y = _tanh_problem()

    def closure():
        net.zero_grad()
        r = net(X) - y
        (r**2).sum().backward()
        return r

    return net, closure


def _residuals_computed_before_the_step(model):
    """``lambda: r`` for ``r = model(X) - y`` computed once, before the step: a closure that
    returns the same tensor at every call, whatever the parameters the step tries."""
    def make():
        net, X, y = _tanh_problem()
        if model == "linear":
            net = torch.nn.Linear(1, 1, dtype=torch.float64)
        r = net(X) - y
        return net, lambda: r

    return make


def _residuals_instead_of_a_closure():
    net, X, y = _tanh_problem()
    return net, net(X) - y


# A bad closure or parameter set raises before or during the step; the weights are left as they were.
_BAD_STEPS = {
    "no parameter requires grad": (_frozen_net, ValueError, "None of the optimizer's parameters requires grad"),
    "detached residuals": (_residuals_of(lambda net, X, y: (net(X) - y).detach()), ValueError,
                           "residuals do not depend on the parameters"),
    "residuals under no_grad": (_residuals_of(lambda net, X, y: torch.no_grad()(lambda: net(X) - y)()), ValueError,
                                "residuals do not depend on the parameters"),
    "residuals of another model": (_another_models_residuals, ValueError,
                                   "residuals do not depend on the optimizer's parameters"),
    "closure calls backward()": (_lbfgs_style_closure, RuntimeError,
                                 r"does not call backward\(\) on them \(LBFGS closures do\)"),
    "empty residuals": (_residuals_of(lambda net, X, y: (net(X) - y)[:0]), ValueError, "empty residual tensor"),
    "closure raises at a trial": (_raises_at_second_call, RuntimeError, "closure failed at a trial point"),
    "bfloat16 parameters": (_bfloat16_net, TypeError,
                            r"Invalid parameter dtype: torch.bfloat16 \(a parameter of shape \(8, 1\)\); "
                            "LevenbergMarquardt fits float32 or float64 parameters when the closure is not model"),
    "complex residuals": (_complex_residuals, TypeError,
                          r"returned complex residuals \(dtype torch.complex128\).*torch.view_as_real"),
    "non-finite residuals": (_nan_at_the_start, ValueError,
                             r"non-finite residuals at the current parameters \(first at flat index 3: nan\)"),
    "float32 cost overflows": (_float32_cost_overflow, ValueError,
                               r"cost 0.5 \* sum\(r\*\*2\) overflows torch.float32 at the current parameters"),
    "non-finite Jacobian": (_sqrt_at_zero, ValueError, r"gradient J\^T r is not finite at the current parameters"),
    "residual count changes within the step": (
        _fewer_residuals_at_trials, ValueError,
        "returned 30 residuals at a trial point of the step and 60 at the current parameters"),
    # A linear model's graph saves no weight: every trial returned the start's residuals, and the
    # step ended exhausted (damping 1e11) with the weights unmoved, at every step, silently.
    "residuals computed before the step (linear model)": (
        _residuals_computed_before_the_step("linear"), ValueError,
        r"returned the same residual tensor at a trial point as at the current parameters.*"
        r"opt.step\(lambda: model\(X\) - y\)"),
    # A tanh network's graph saves its weights, which the step writes: torch's "modified by an
    # inplace operation" from deep inside the Jacobian, with no word of the closure.
    "residuals computed before the step (tanh network)": (
        _residuals_computed_before_the_step("tanh"), RuntimeError,
        r"computed before step\(\).*opt.step\(lambda: model\(X\) - y\)"),
    # TypeError: 'Tensor' object is not callable, from inside the linearization.
    "residual tensor instead of a closure": (
        _residuals_instead_of_a_closure, TypeError,
        r"closure must be a callable that returns the residual tensor; received Tensor"),
}


@pytest.mark.parametrize("case", list(_BAD_STEPS))
def test_lm_bad_steps_raise_clearly_and_leave_the_weights_unchanged(case):
    make, error, match = _BAD_STEPS[case]
    net, closure = make()
    before = _params(net)
    opt = LevenbergMarquardt(net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone: no numpy RuntimeWarning before it
        with pytest.raises(error, match=match):
            opt.step(closure)
    assert torch.equal(_params(net), before)


def test_lm_zero_gradient_of_connected_residuals_is_a_stationary_point_not_an_error():
    # w**2 - 1 at w = 0: J is zero but the graph reaches w (unlike another model's residuals).
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    assert float(opt.step(lambda: w**2 - 1)) == 0.5 and float(w.detach()) == 0.0


def test_lm_rejected_step_leaves_the_weights_bitwise_unchanged_and_raises_damping():
    # Every trial point is non-finite: damping rises past its maximum, the weights stay put.
    net, X, y = _tanh_problem()
    start = _params(net)

    def closure():
        r = net(X) - y
        return r if torch.equal(_params(net), start) else torch.full_like(r, math.nan)

    opt = LevenbergMarquardt(net.parameters(), damping=1.0, damping_max=100.0)
    cost = opt.step(closure)
    assert opt.exhausted and opt.damping_state.damping > 100.0
    assert torch.equal(_params(net), start)
    assert float(cost) == pytest.approx(0.5 * float((net(X) - y).detach().pow(2).sum()), rel=1e-15)


def test_lm_fits_the_parameters_that_require_grad_at_each_step_and_keeps_its_damping():
    # Freezing the first layer after construction (torch.optim skips frozen parameters at step
    # time): the frozen weights stay, the step is that of an optimizer over the last layer
    # started at the damping the first step left.
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    opt.step(lambda: net(X) - y)
    damping, first = opt.damping_state.damping, [p.detach().clone() for p in net[0].parameters()]
    reference = copy.deepcopy(net)
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt.step(lambda: net(X) - y)
    for p in reference[0].parameters():
        p.requires_grad_(False)
    fresh = LevenbergMarquardt(reference[2].parameters(), damping=damping)
    fresh.step(lambda: reference(X) - y)
    assert all(torch.equal(p, q) for p, q in zip(net[0].parameters(), first))
    assert torch.equal(_params(net), _params(reference))
    assert _state(opt)["jacobian"] == _state(fresh)["jacobian"] and opt.damping_state == fresh.damping_state


def test_lm_resumed_from_state_dict_takes_the_same_next_step():
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    for _ in range(3):
        opt.step(lambda: net(X) - y)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    cost = opt.step(lambda: net(X) - y)
    resumed, _, _ = _tanh_problem()
    resumed.load_state_dict(weights)
    again = LevenbergMarquardt(resumed.parameters())
    again.load_state_dict(saved)
    assert again.step(lambda: resumed(X) - y) == cost
    assert torch.equal(_params(resumed), _params(net)) and again.damping_state == opt.damping_state


@pytest.mark.parametrize("solver", ["auto", "matrix-free"])
def test_lm_state_dict_loaded_keeps_its_string_entries_and_saves_again_as_it_was(solver):
    # torch's load_state_dict rebuilds every iterable of the state by its type, so state["solver"]
    # and state["jacobian"] became "<generator object Optimizer.load_state_dict.<locals>...>" until
    # the next step, and a state dict saved right after loading (a checkpoint rewritten) kept that.
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters(), solver=solver)
    for _ in range(2):
        opt.step(lambda: net(X) - y)
    saved = copy.deepcopy(opt.state_dict())
    fresh, _, _ = _tanh_problem()
    again = LevenbergMarquardt(fresh.parameters(), solver=solver)
    again.load_state_dict(saved)
    assert (_state(again)["solver"], _state(again)["jacobian"]) == (_state(opt)["solver"], "closed-form")
    assert _same_state(again.state_dict()["state"][0], saved["state"][0])
    assert again.state_dict()["param_groups"] == saved["param_groups"]


def test_lm_deep_copied_or_pickled_with_its_model_takes_the_same_next_step():
    # torch.optim's __getstate__ leaves out the kept closed-form problem: the copy's step raised
    # AttributeError '_kept'.
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters())
    opt.step(lambda: net(X) - y)
    copied_net, copied_opt = copy.deepcopy((net, opt))
    buffer = io.BytesIO()
    torch.save((net, opt), buffer)
    buffer.seek(0)
    loaded_net, loaded_opt = torch.load(buffer, weights_only=False)
    cost = opt.step(lambda: net(X) - y)
    assert copied_opt.step(lambda: copied_net(X) - y) == cost and loaded_opt.step(lambda: loaded_net(X) - y) == cost
    assert torch.equal(_params(copied_net), _params(net)) and torch.equal(_params(loaded_net), _params(net))
    assert _same_state(_state(copied_opt), _state(opt), _state(loaded_opt))


@pytest.mark.parametrize("extra", [0, 4])
def test_float32_closure_stacking_indexed_elements_steps_in_float32(extra):
    # torch.func's forward mode gives such a function a float64 Jacobian (least_squares had to
    # cast it); the optimizer's rows (extra=0) and columns (m = 6 > 2 n) stay float32.
    w = torch.nn.Parameter(torch.zeros(2))
    opt = LevenbergMarquardt([w])
    for _ in range(6):
        cost = opt.step(lambda: torch.stack([3.0 * (w[0] - 1), w[1], *[w[0] + w[1] - 2 for _ in range(extra)]]))
    assert _state(opt)["jacobian"] == ("reverse" if extra == 0 else "forward")
    assert w.dtype == cost.dtype == torch.float32
    expected = [1.0, 0.0] if extra == 0 else [53 / 49, 36 / 49]  # 13 a + 4 b = 17, 4 a + 5 b = 8
    torch.testing.assert_close(w.detach(), torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver, form", [("auto", "sample-space"), ("sample-space", "sample-space"),
                                          ("normal", "cholesky")])
def test_float32_model_with_float64_residuals_steps_in_every_form(solver, form):
    # Targets from numpy make float64 residuals of a float32 network; the autograd rows are
    # float32. The sample-space form (10 residuals < 61 parameters) mixed them in one solve.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
    X = torch.linspace(-1, 1, 10)[:, None]
    y = torch.from_numpy(np.sin(3 * np.linspace(-1, 1, 10))[:, None])
    opt = LevenbergMarquardt(net.parameters(), solver=solver)
    costs = [float(opt.step(lambda: torch.sin(net(X)) - y)) for _ in range(3)]
    assert _state(opt)["solver"] == form and _state(opt)["jacobian"] in ("forward", "reverse")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert costs[-1] < costs[0]


def test_lm_step_without_closure_is_a_clear_error():
    opt = LevenbergMarquardt(torch.nn.Linear(1, 1).parameters())
    with pytest.raises(ValueError, match="needs a closure that returns the residual tensor"):
        opt.step()


def test_lm_step_under_inference_mode_is_a_clear_error_before_the_closure_runs():
    # Was "Inference tensors do not track version counter." from the optimizer's own module hook
    # (or, on the graph path, "do not depend on the parameters ... without torch.no_grad()").
    net, X, y = _tanh_problem()
    opt, calls = LevenbergMarquardt(net.parameters()), []
    before = _params(net)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside torch.inference_mode\(\)"):
        opt.step(lambda: calls.append(1) or net(X) - y)
    assert calls == [] and torch.equal(_params(net), before)
    start = 0.5 * float(((net(X) - y).detach() ** 2).sum())
    with torch.no_grad():  # no_grad is fine: the step enables grad where it needs it
        assert float(opt.step(lambda: net(X) - y)) < start


def test_lm_step_with_scalar_loss_closure_is_a_clear_error():
    model, X, y = _line_problem()
    opt = LevenbergMarquardt(model.parameters())
    with pytest.raises(ValueError, match="returned a scalar loss"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(X), y))


def test_lm_single_residual_as_a_one_element_tensor_finds_a_root():
    # A 0-dim residual is refused as a scalar loss; the message says how to pass one residual.
    w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    with pytest.raises(ValueError, match=r"return a single residual as a 1-element tensor, r.reshape\(1\)"):
        opt.step(lambda: w**2 - 2)
    assert float(w.detach()) == 1.0
    for _ in range(8):
        opt.step(lambda: (w**2 - 2).reshape(1))
    assert float(w.detach()) == pytest.approx(math.sqrt(2), rel=1e-12)


def test_gradient_descent_step_is_exact():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = GradientDescent([w], lr=0.1)
    (w**2).sum().backward()
    opt.step()
    assert w.detach().tolist() == pytest.approx([0.8, -1.6])


def test_momentum_update_is_matlab_traingdm_form():
    # traingdm.m, literally: gX is minus the gradient; dX = lr*gX before the loop, then each
    # epoch dX = mc*dX + (1-mc)*lr*gX; X = X + dX. The first step is lr*gX, not (1-mc)*lr*gX.
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    lr, mc = 0.5, 0.9
    opt = Momentum([w], lr=lr, beta=mc)
    X = 1.0
    dX = lr * -(2 * X)
    expected = []
    for _ in range(3):
        gX = -(2 * X)
        dX = mc * dX + (1 - mc) * lr * gX
        X = X + dX
        expected.append(X)
    got = []
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
        got.append(float(w.detach()))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[0] == pytest.approx(0.0)  # 1 - 0.5 * 2: the whole first gradient step


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_momentum_follows_schedulers_that_cycle_the_momentum_as_sgd_does(scheduler):
    # Both cycle the momentum constant by default (cycle_momentum=True); they refused Momentum
    # ("optimizer must support momentum or beta1"). Each step must use the lr and the constant
    # the scheduler set, the ones it sets on SGD(momentum=0.9).
    def schedule(opt):
        if scheduler == "OneCycleLR":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Momentum([w], lr=0.1, beta=0.9)
    sgd = torch.optim.SGD([torch.nn.Parameter(w.detach().clone())], lr=0.1, momentum=0.9)
    schedulers = [schedule(opt), schedule(sgd)]
    expected, velocity, constants = w.detach().clone(), None, []
    for _ in range(5):
        lr, beta = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        assert (lr, beta) == (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"])
        constants.append(beta)
        grad = 2 * expected
        velocity = grad if velocity is None else beta * velocity + (1 - beta) * grad
        expected = expected - lr * velocity
        for optimizer, lr_schedule in zip((opt, sgd), schedulers):
            optimizer.zero_grad()
            (optimizer.param_groups[0]["params"][0] ** 2).sum().backward()
            optimizer.step()
            lr_schedule.step()
    assert len(set(constants)) > 1 and min(constants) >= 0.8 and max(constants) <= 0.95
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=0.0)


def test_momentum_group_constants_given_as_beta_or_momentum_are_the_ones_stepped():
    a, b, c = (torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64)) for _ in range(3))
    opt = Momentum([{"params": [a], "beta": 0.5}, {"params": [b]}, {"params": [c], "momentum": 0.0}], lr=0.5)
    assert [group["momentum"] for group in opt.param_groups] == [0.5, 0.9, 0.0]
    assert all("beta" not in group for group in opt.param_groups)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in (a, b, c)).backward()
        opt.step()
    # v = 2, w = 0 for all; then v = beta * 2 + (1 - beta) * 0 and w = -0.5 * v.
    assert [float(p.detach()) for p in (a, b, c)] == pytest.approx([-0.5, -0.9, 0.0], rel=1e-15)
    with pytest.raises(ValueError, match="gives both 'beta' and 'momentum'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "beta": 0.5, "momentum": 0.5})
    with pytest.raises(ValueError, match="Invalid beta value: 2.0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "beta": 2.0})


def test_momentum_loads_a_state_dict_that_named_the_constant_beta():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = Momentum([w], lr=0.5, beta=0.9)
    saved = opt.state_dict()
    del saved["param_groups"][0]["momentum"]
    saved["param_groups"][0]["beta"] = 0.5
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["momentum"] == 0.5 and "beta" not in opt.param_groups[0]
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert float(w.detach()) == -0.5  # v = 2, w = 1 - 0.5 * 2 = 0; then v = 0.5 * 2 + 0.5 * 0, w = -0.5


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (GradientDescent, dict(lr=-0.1), "Invalid lr value: -0.1"),
        (Momentum, dict(lr=0.0), "Invalid lr value: 0.0"),
        (Momentum, dict(beta=1.5), "Invalid beta value: 1.5"),
        (GradientDescent, dict(lr=False), "Invalid lr value: False"),
    ],
)
def test_first_order_optimizers_reject_bad_options(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(torch.nn.Linear(1, 1).parameters(), **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (LevenbergMarquardt, dict(damping=np.float32(1e-3), damping_dec=np.float64(0.1), damping_inc=np.int64(10),
                                  damping_max=np.float64(1e10))),
        (GradientDescent, dict(lr=np.float32(0.5))),
        (Momentum, dict(lr=np.float64(0.5), beta=np.float32(0.75))),
    ],
)
def test_numpy_scalar_options_are_accepted_and_stored_as_floats(cls, kwargs):
    opt = cls(torch.nn.Linear(1, 1).parameters(), **kwargs)
    for option, value in kwargs.items():
        name = "momentum" if option == "beta" else option  # Momentum's groups use torch.optim's key
        assert type(opt.defaults[name]) is float and opt.defaults[name] == float(value)
        assert type(opt.param_groups[0][name]) is float


@pytest.mark.parametrize("chunked", [False, True])
def test_closed_form_problem_is_kept_across_steps_with_the_same_steps(chunked):
    # Kept while the module and its input tensor are the same: the same steps, bit for bit, as a
    # new problem each step (also on the chunked normal form, whose n x n buffers are recycled).
    def run(keep):
        net, X, y = _tanh_problem(300, 12)
        opt_bytes = {"max_jacobian_bytes": 64 * 37 * 8} if chunked else {}
        opt = LevenbergMarquardt(net.parameters(), **opt_bytes)
        problems, costs = [], []
        for _ in range(6):
            if not keep:
                opt._kept = None
            costs.append(float(opt.step(lambda: net(X) - y)))
            problems.append(opt._kept.problem)
        return costs, _params(net), problems, opt.state[opt._params[0]]

    costs, x, problems, state = run(True)
    fresh_costs, fresh_x, fresh_problems, _ = run(False)
    assert state["jacobian"] == "closed-form" and state["solver"] == ("chunked-cholesky" if chunked else "cholesky")
    assert all(p is problems[0] for p in problems) and len({id(p) for p in fresh_problems}) == 6
    assert costs == fresh_costs and torch.equal(x, fresh_x)


def test_kept_problem_follows_new_targets_and_is_rebuilt_for_a_new_input():
    net, X, y = _tanh_problem(60, 8)
    opt = LevenbergMarquardt(net.parameters())
    opt.step(lambda: net(X) - y)
    kept = opt._kept.problem
    shifted = y + 0.5  # same input tensor, other targets: kept, with the new targets
    opt.step(lambda: net(X) - shifted)
    assert opt._kept.problem is kept
    torch.testing.assert_close(kept.y, shifted, rtol=0, atol=1e-15)  # out - (out - shifted)
    X2 = X.clone()  # another input tensor: a new problem
    opt.step(lambda: net(X2) - shifted)
    assert opt._kept.problem is not kept
    kept = opt._kept.problem
    with torch.no_grad():
        X2.mul_(0.5)  # modified in place: rebuilt, and the step is that of the new data
    opt.step(lambda: net(X2) - shifted)
    assert opt._kept.problem is not kept and torch.equal(opt._kept.problem.X, X2)


def test_lm_non_finite_jacobian_of_a_plain_closure_gives_the_error_alone():
    # sqrt at 0 through the autograd path: numpy's "invalid value encountered in matmul" from
    # the J^T J blocks used to precede the ValueError.
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = LevenbergMarquardt([w])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"gradient J\^T r is not finite"):
            opt.step(lambda: torch.stack([torch.sqrt(w[0]) - 1, w[1] - 2]))
    assert w.detach().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("strategy", ["marquardt", "nielsen"])
def test_steps_after_an_exhausted_one_start_from_the_damping_ceiling(strategy):
    # Every exhausted step multiplied the damping on: it reached inf (step 320 with marquardt,
    # 52 with nielsen) and the optimizer could never move again, not even on new data.
    X = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    model = nn.Linear(1, 1).double()
    opt = marquardt.LevenbergMarquardt(model.parameters(), strategy=strategy)
    for _ in range(400):
        opt.step(lambda: model(X) - (3 * X - 1))
    state = opt.state[model.weight]
    assert opt.exhausted and math.isfinite(state["damping"]) and state["damping"] <= 1e10 * 10 ** 2
    cost = [float(opt.step(lambda: model(X) - (2 * X + 1))) for _ in range(40)]
    assert cost[-1] < 1e-12 * cost[0]
    assert model.weight.item() == pytest.approx(2.0, abs=1e-6)


def test_a_module_changed_in_place_is_described_again_and_stays_on_the_closed_form():
    # The kept problem described the module as it was; after an in-place change it failed the
    # check at every step and the optimizer stayed on the autograd path (13-16 ms against 3 ms).
    X = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = marquardt.LevenbergMarquardt(net.parameters())
    modes = []
    for k in range(4):
        if k == 2:
            net[1] = nn.Sigmoid()
        opt.step(lambda: net(X) - y)
        modes.append(opt.state[net[0].weight]["jacobian"])
    assert modes == ["closed-form"] * 4


@pytest.fixture
def closed_form_attempts(monkeypatch):
    """Counts of ModuleProblems built and of their linearizations (the closed form's attempts)."""
    counts = {"built": 0, "linearized": 0}
    post_init, linearize = marquardt.network.ModuleProblem.__post_init__, marquardt.network.ModuleProblem.linearize

    def counted_post_init(self):
        counts["built"] += 1
        post_init(self)

    def counted_linearize(self, x):
        counts["linearized"] += 1
        return linearize(self, x)

    monkeypatch.setattr(marquardt.network.ModuleProblem, "__post_init__", counted_post_init)
    monkeypatch.setattr(marquardt.network.ModuleProblem, "linearize", counted_linearize)
    return counts


_REFUSED = {
    "squashed outputs": (lambda net, X, y: torch.sin(net(X)) - y, None),
    "scaled residuals": (lambda net, X, y: 2 * (net(X) - y), None),
    "no closed-form module": (lambda net, X, y: net(X) - y, _Wrapped),
}


@pytest.mark.parametrize("solver", ["auto", "matrix-free"])
@pytest.mark.parametrize("case", list(_REFUSED))
def test_a_refused_call_is_tried_in_closed_form_once_with_the_same_steps(case, solver, closed_form_attempts,
                                                                         monkeypatch):
    # Each step built a ModuleProblem, linearized it and threw it away (and the kept one once
    # more): 6 problems and 11 linearizations in 6 steps of sin(net(X)) - y, 48% of the time.
    residuals, model = _REFUSED[case]

    def run(closed_form):
        monkeypatch.setattr(LevenbergMarquardt, "_closed_form", closed_form)
        net, X, y = _tanh_problem(200, 20)
        net = net if model is None else model(net)
        opt = LevenbergMarquardt(net.parameters(), solver=solver)
        costs = [float(opt.step(lambda: residuals(net, X, y))) for _ in range(5)]
        return costs, _params(net), _state(opt)

    costs, x, state = run(True)
    assert closed_form_attempts == {"built": 1, "linearized": 0}
    reference_costs, reference_x, reference_state = run(False)
    assert state["jacobian"] == reference_state["jacobian"] != "closed-form"
    assert costs == reference_costs and torch.equal(x, reference_x)
    assert costs[-1] < costs[0]


def _freeze_first_bias(net, X):
    net[0].bias.requires_grad_(False)
    return X


def _swap_activation(net, X):
    net[1] = nn.Sigmoid()
    return X


def _modify_in_place(net, X):
    with torch.no_grad():
        X.mul_(0.5)
    return X


def _evaluate(net, X):
    net.eval()
    return X


_CHANGES = {
    "new input tensor": lambda net, X: X.clone(),
    "input modified in place": _modify_in_place,
    "parameter frozen": _freeze_first_bias,
    "activation swapped": _swap_activation,
    "eval mode": _evaluate,
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_refused_call_is_tried_again_once_after_it_changes(change, closed_form_attempts):
    net, X, y = _tanh_problem(200, 20)
    opt = LevenbergMarquardt(net.parameters())
    for _ in range(2):
        opt.step(lambda: torch.sin(net(X)) - y)
    X = _CHANGES[change](net, X)
    for _ in range(2):
        opt.step(lambda: torch.sin(net(X)) - y)
    assert closed_form_attempts == {"built": 2, "linearized": 0}
    assert _state(opt)["jacobian"] in ("forward", "reverse")


def test_a_closed_form_closure_on_a_refused_call_takes_the_closed_form(closed_form_attempts):
    # The refusal is of the closure's residuals, not of the call: net(X) - y on the same call
    # takes the closed form at once, and sin(net(X)) - y after it is not tried again.
    net, X, y = _tanh_problem(200, 20)
    opt = LevenbergMarquardt(net.parameters())
    squashed, plain, modes = (lambda: torch.sin(net(X)) - y), (lambda: net(X) - y), []
    for closure in [squashed] * 2 + [plain] * 3 + [squashed] * 2:
        opt.step(closure)
        modes.append(_state(opt)["jacobian"])
    assert modes[:2] == modes[5:] and modes[0] in ("forward", "reverse")
    assert modes[2:5] == ["closed-form"] * 3
    assert closed_form_attempts == {"built": 2, "linearized": 3}


def _make_residuals(link, net, X, y):
    return lambda: link(net(X)) - y


def _partial_residuals(net, X, y, link=None):
    out = net(X)
    return (out if link is None else link(out)) - y


_SAME_CODE = {
    # every lambda of one factory shares its code; the refusal must see what each captured
    "factory": lambda net, X, y, link: _make_residuals(link, net, X, y),
    "partial": lambda net, X, y, link: functools.partial(_partial_residuals, net, X, y,
                                                         link=None if link is _identity else link),
}


def _identity(t):
    return t


@pytest.mark.parametrize("how", list(_SAME_CODE))
def test_a_closure_of_the_same_code_with_other_captures_takes_the_closed_form(how):
    # The audit's case: make(torch.sin) refused, then make(identity) stayed on the graph path (in
    # float32 its costs then drifted 2.7% from the closed form's, which works in float64).
    net, X, y = _tanh_problem(200, 20)
    opt = LevenbergMarquardt(net.parameters())
    modes = []
    for link in [torch.sin] * 3 + [_identity] * 3:
        opt.step(_SAME_CODE[how](net, X, y, link))
        modes.append(_state(opt)["jacobian"])
    assert modes[0] in ("forward", "reverse") and modes[3:] == ["closed-form"] * 3


def test_a_refusal_is_tried_again_after_retry_after_steps(closed_form_attempts):
    # A closure switched by state it does not capture (here an attribute) looks the same: the
    # retry bounds how long it stays on the graph path.
    net, X, y = _tanh_problem(200, 20)
    opt = LevenbergMarquardt(net.parameters())
    switch = types.SimpleNamespace(link=torch.sin)
    closure = lambda: switch.link(net(X)) - y  # noqa: E731
    modes = []
    for step in range(2 * marquardt.optim.RETRY_AFTER + 3):
        if step == 2:
            switch.link = _identity
        opt.step(closure)
        modes.append(_state(opt)["jacobian"])
    # refused at step 0, covered for RETRY_AFTER steps, tried again at step RETRY_AFTER + 1
    assert modes[: marquardt.optim.RETRY_AFTER + 1] == [modes[0]] * (marquardt.optim.RETRY_AFTER + 1)
    assert modes[marquardt.optim.RETRY_AFTER + 1 :] == ["closed-form"] * (marquardt.optim.RETRY_AFTER + 2)
    assert closed_form_attempts["built"] == 2


# ---------------------------------------------------------------------------------------------
# the matrix-free graph path: J^T J past max_matrix_bytes, products through the closure's graph


def _squashed_problem(m=200, hidden=20):
    """``tanh(net(X)) - y``: residuals that are not the network's outputs minus a constant."""
    net, X, y = _tanh_problem(m, hidden)
    return net, lambda: torch.tanh(net(X)) - y


def _checkpointed_problem(m=200, hidden=20):
    """``tanh(net(X)) - y`` with ``net`` under activation checkpointing: its backward pass runs
    the forward pass again, with the parameters as they are then."""
    net, X, y = _tanh_problem(m, hidden)
    return net, lambda: torch.tanh(torch.utils.checkpoint.checkpoint(net, X, use_reentrant=False)) - y


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


def _linearizations(make, **matrix_free):
    """The matrix-free linearization (``J^T J`` one byte past ``max_matrix_bytes``, CG to 1e-12)
    and the dense one of ``make()``'s closure at its parameters, with their problems."""
    net, closure = make()
    params, n = list(net.parameters()), _n_params(net)
    free = ClosureProblem(params, closure, max_matrix_bytes=n * n * 8 - 1, cg_max_iter=n, **matrix_free)
    dense = ClosureProblem(params, closure)
    x = _params(net)
    free_lin, dense_lin = free.linearize(x), dense.linearize(x)
    free_lin.system.rtol, free_lin.system.stall_tol = 1e-12, 0.0
    return x, (free, free_lin), (dense, dense_lin)


# (problem, how J v is made: the double-backward trick, or rows where the graph refuses it)
MATRIX_FREE_CASES = {
    "physics-informed": (_poisson_problem, "forward"),
    "squashed outputs": (_squashed_problem, "forward"),
    "once differentiable": (functools.partial(_custom_tanh_problem, _OnceDifferentiableTanh), "reverse"),
    "opaque backward": (functools.partial(_custom_tanh_problem, _OpaqueTanh), "reverse"),
}


@pytest.mark.parametrize("case", list(MATRIX_FREE_CASES))
def test_matrix_free_graph_step_equals_the_dense_step(case):
    make, mode = MATRIX_FREE_CASES[case]
    x, (free, free_lin), (dense, dense_lin) = _linearizations(make)
    assert (free.used_mode, free_lin.system.path, dense_lin.system.path) == (mode, "cg", "cholesky")
    assert free_lin.cost == dense_lin.cost
    torch.testing.assert_close(free_lin.grad, dense_lin.grad, rtol=1e-12, atol=1e-12)
    ones = torch.ones_like(x)
    for damping in (1e-3, 1e-1):
        # Measured: 1.5e-8 (physics-informed), 1.2e-10, 4.2e-9, 4.2e-9 relative at 1e-3.
        step = free_lin.system.solve(free_lin.grad, damping, ones)
        expected = dense_lin.system.solve(dense_lin.grad, damping, ones)
        assert float(torch.linalg.vector_norm(step - expected)) <= 1e-6 * float(torch.linalg.vector_norm(expected))
    torch.testing.assert_close(free_lin.system.diagonal(), dense_lin.system.diagonal(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["squashed outputs", "once differentiable", "checkpointed"])
def test_matrix_free_products_after_a_trial_are_those_of_the_linearization_point(case):
    # A trial writes the parameters in place. The graph saved the weights themselves, and the
    # next product raised "modified by an inplace operation"; a checkpointed graph recomputed
    # its forward pass at the trial point (a step 0.91 away from the dense one, relative).
    make = _checkpointed_problem if case == "checkpointed" else MATRIX_FREE_CASES[case][0]
    x, (free, free_lin), (_, dense_lin) = _linearizations(make)
    assert math.isfinite(free.cost(x + 0.1))
    assert torch.equal(_params_of(free.params), x)  # written back for the next products
    step = free_lin.system.solve(free_lin.grad, 1e-3, torch.ones_like(x))
    expected = dense_lin.system.solve(dense_lin.grad, 1e-3, torch.ones_like(x))
    assert float(torch.linalg.vector_norm(step - expected)) <= 1e-6 * float(torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("solver", ["normal", "sample-space", "matrix-free"])
def test_residuals_that_are_a_view_of_the_parameter_step_in_every_form(solver):
    # The matrix-free trial's cost was read from the residuals after the linearization point was
    # written back into the parameters: residuals that alias a parameter (the closure returns it,
    # or a view) then cost the start's 37.5 at every trial, and the step ended exhausted, unmoved.
    p = torch.nn.Parameter(torch.full((3,), 5.0, dtype=torch.float64))
    opt = LevenbergMarquardt([p], solver=solver)
    cost = opt.step(lambda: p[:])
    assert not opt.exhausted and float(cost) == pytest.approx(0.5 * float(p.detach() @ p.detach()), rel=1e-12)
    assert float(cost) < 1e-4


@pytest.mark.parametrize("case", ["physics-informed", "squashed outputs", "once differentiable"])
def test_matrix_free_products_do_not_read_the_parameters_after_the_linearization(case):
    # The graph keeps copies of the saved weights. Without them it read the weights as they
    # were at the time of the product (autograd does not check the version of a tensor saved
    # through hooks, as the optimizer's are): steps off by 1,700 to 3,500 times their length.
    x, (free, free_lin), (_, dense_lin) = _linearizations(MATRIX_FREE_CASES[case][0])
    free.write(x + 0.1)
    step = free_lin.system.solve(free_lin.grad, 1e-3, torch.ones_like(x))
    expected = dense_lin.system.solve(dense_lin.grad, 1e-3, torch.ones_like(x))
    assert float(torch.linalg.vector_norm(step - expected)) <= 1e-6 * float(torch.linalg.vector_norm(expected))


def test_out_of_memory_in_the_double_backward_product_is_raised_not_taken_for_a_refusing_graph(monkeypatch):
    # torch.OutOfMemoryError is a RuntimeError: it was caught, and the step fell back to J v by
    # rows, m backward passes a product.
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    net, closure = _squashed_problem(60, 8)
    with torch.enable_grad():
        r = closure().reshape(-1)
    monkeypatch.setattr(torch.autograd, "grad", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 2.00 GiB"):
        marquardt.optim._double_backward_jvp(r, list(net.parameters()))


def _params_of(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an operation returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_lm_past_max_matrix_bytes_steps_matrix_free_without_an_n_by_n_tensor(monkeypatch):
    # 1-24-24-1 network, 673 parameters, 800 residuals: J^T J one byte too many. Before, the
    # graph path ignored the plan's form and accumulated the dense J^T J.
    torch.manual_seed(0)
    hidden, m = 24, 800
    net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, 1)).double()
    X = torch.linspace(-2, 2, m, dtype=torch.float64)[:, None]
    y = torch.sin(2 * X)
    n = _n_params(net)

    def refuse(*args, **kwargs):
        raise AssertionError("formed J^T J or its diagonal")

    monkeypatch.setattr(marquardt.optim, "accumulate_normal", refuse)
    monkeypatch.setattr(ClosureProblem, "_gram_diagonal", refuse)  # Marquardt's rule does not read it
    opt = LevenbergMarquardt(net.parameters(), max_matrix_bytes=n * n * 8 - 1)
    start = 0.5 * float((torch.tanh(net(X).detach()) - y).square().sum())
    with _LargestTensor() as largest:
        costs = [float(opt.step(lambda: torch.tanh(net(X)) - y)) for _ in range(2)]
    state = _state(opt)
    assert (n, state["jacobian"], state["solver"]) == (673, "forward", "cg")
    # The largest tensor is the graph's m x hidden activations; the CG basis is 21 x n.
    assert largest.numel == m * hidden < n * n
    assert start > costs[0] > costs[1]
    assert costs[1] < 0.8 * start  # measured 169.8 -> 149.6 -> 129.4 (forcing 0.5: early CG stops)


def test_nielsen_first_damping_reads_the_chunked_diagonal_within_the_budget(batch_sizes, monkeypatch):
    references = []
    init = marquardt.damping.NielsenDamping.init
    monkeypatch.setattr(marquardt.damping.NielsenDamping, "init",
                        lambda rule, reference: references.append(reference) or init(rule, reference))
    net, closure = _squashed_problem(m=200, hidden=20)
    n = _n_params(net)
    budget = 30 * n * 8  # 30 rows of J, far below its 200
    opt = LevenbergMarquardt(net.parameters(), strategy="nielsen", max_matrix_bytes=n * n * 8 - 1,
                             max_jacobian_bytes=budget)
    opt.step(closure)
    assert _state(opt)["solver"] == "cg" and _state(opt)["jacobian"] == "forward"
    # The rows of the diagonal, m = 200, in passes of at most the budget (J v took none).
    assert sum(batch_sizes) == 200 and max(batch_sizes) * n * 8 <= budget
    _, _, (_, dense_lin) = _linearizations(functools.partial(_squashed_problem, 200, 20))
    assert references == [pytest.approx(float(dense_lin.system.diagonal().max()), rel=1e-12)]


def test_matrix_free_warm_start_and_forcing_are_state_and_resume_the_same_next_step():
    def matrix_free():
        net, closure = _squashed_problem()
        return net, LevenbergMarquardt(net.parameters(), max_matrix_bytes=1000), closure

    net, opt, closure = matrix_free()
    for _ in range(3):
        opt.step(closure)
    state = _state(opt)
    assert set(state) >= {"forcing", "warm_start"} and 1e-4 <= state["forcing"] <= 0.5
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    cost = opt.step(closure)
    resumed, again, resumed_closure = matrix_free()
    resumed.load_state_dict(weights)
    again.load_state_dict(saved)
    assert again.step(resumed_closure) == cost and torch.equal(_params(resumed), _params(net))
    # Another form drops them: a forcing term belongs to a run of CG solves.
    opt.param_groups[0]["max_matrix_bytes"] = 1 << 30
    opt.step(closure)
    assert "forcing" not in _state(opt) and "warm_start" not in _state(opt)


def _closed_form_matrix_free(samples):
    """``net(X) - y`` for a 2-16-1 tanh network (65 parameters) under ``solver="matrix-free"``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    X = torch.randn(samples, 2, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    return net, LevenbergMarquardt(net.parameters(), solver="matrix-free"), lambda: net(X) - y


def _checkpoint_round_trip(opt, saved):
    """``saved`` (a state_dict) loaded into ``opt`` through marquardt.checkpoint's layout: state
    tensors apart, the other values through JSON."""
    from types import SimpleNamespace
    from marquardt.checkpoint import _restore_trainer, _trainer_state
    source = LevenbergMarquardt([torch.zeros(1, dtype=torch.float64) for _ in saved["param_groups"][0]["params"]])
    source.load_state_dict(saved)
    tensors, meta = _trainer_state(SimpleNamespace(optimizer=source))
    _restore_trainer(SimpleNamespace(optimizer=opt), tensors, json.loads(json.dumps(meta)), torch.device("cpu"))


# 300 samples: every product uses them all; 5,000: products on subsets the generator draws.
@pytest.mark.parametrize("samples", [300, 5000])
@pytest.mark.parametrize("how", ["load_state_dict", "checkpoint", "deepcopy"])
def test_closed_form_matrix_free_run_resumed_takes_the_same_next_step(samples, how):
    # The warm start, forcing term and subset generator lived only in the kept ModuleProblem,
    # which load_state_dict and copies drop: the resumed next cost was 6.245 against 5.542
    # (300 samples) and 125.3 against 69.87 (5,000), weights 0.23 and 0.13 apart (relative).
    net, opt, closure = _closed_form_matrix_free(samples)
    for _ in range(3):
        opt.step(closure)
    assert (_state(opt)["jacobian"], _state(opt)["solver"]) == ("closed-form", "cg")
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    copied = copy.deepcopy(opt) if how == "deepcopy" else None
    cost = opt.step(closure)
    resumed, again, resumed_closure = _closed_form_matrix_free(samples)
    resumed.load_state_dict(weights)
    if how == "load_state_dict":
        again.load_state_dict(saved)
    elif how == "checkpoint":
        _checkpoint_round_trip(again, saved)
    else:
        again.load_state_dict(copied.state_dict())
    assert again.step(resumed_closure) == cost and torch.equal(_params(resumed), _params(net))


def _mixed_dtype_network():
    """A 2-16-1 tanh network whose first layer is float32 and last float64 (65 parameters, 300
    samples), its closure on the graph path: the flat parameter vector is float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16).float(), nn.Tanh(), nn.Linear(16, 1).double())
    X = torch.randn(300, 2, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    return net, lambda: net[2](torch.tanh(net[0](X.float())).double()) - y


@pytest.mark.parametrize("solver", ["matrix-free", "auto"])
def test_a_run_with_parameters_of_mixed_dtypes_resumed_takes_the_same_next_step(solver):
    # torch's load_state_dict casts every state tensor to its parameter's dtype: the float64
    # warm start and point to step back to, kept under the float32 first parameter, came back
    # float32. The matrix-free solve then dropped its warm start (resumed cost 6.245 against
    # 5.542), and the step back could no longer take place.
    net, closure = _mixed_dtype_network()
    opt = LevenbergMarquardt(net.parameters(), solver=solver)
    for _ in range(3):
        opt.step(closure)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    cost = opt.step(closure)
    resumed, resumed_closure = _mixed_dtype_network()
    resumed.load_state_dict(weights)
    again = LevenbergMarquardt(resumed.parameters(), solver=solver)
    again.load_state_dict(saved)
    assert _state(again)["previous_point"].dtype == torch.float64
    assert torch.equal(_state(again)["previous_point"], saved["state"][0]["previous_point"])
    assert again.step(resumed_closure) == cost and torch.equal(_params(resumed), _params(net))


def test_closed_form_resume_state_is_dropped_after_another_form():
    net, opt, closure = _closed_form_matrix_free(300)
    opt.step(closure)
    assert {"closed_form_generator", "closed_form_point", "closed_form_previous"} <= set(_state(opt))
    opt.param_groups[0]["solver"] = "auto"
    opt.step(closure)
    assert not any(key.startswith("closed_form_") for key in _state(opt))


def test_closed_form_takes_the_optimizers_solver_and_max_matrix_bytes():
    net, X, y = _tanh_problem(60, 8)
    opt = LevenbergMarquardt(net.parameters(), solver="matrix-free")
    opt.step(lambda: net(X) - y)
    assert (_state(opt)["jacobian"], _state(opt)["solver"]) == ("closed-form", "cg")
    opt.param_groups[0]["solver"] = "auto"  # the kept problem was built for the other form
    opt.step(lambda: net(X) - y)
    assert (_state(opt)["jacobian"], _state(opt)["solver"]) == ("closed-form", "cholesky")
    opt.param_groups[0]["max_matrix_bytes"] = 24 * 25 * 8  # J^T J of the 25 parameters, one row short
    opt.step(lambda: net(X) - y)
    assert (_state(opt)["jacobian"], _state(opt)["solver"]) == ("closed-form", "cg")


@pytest.mark.parametrize("options", [dict(solver="matrix-free"), dict(max_matrix_bytes=100)])
def test_closed_form_matrix_free_steps_of_a_tiny_float32_network(options):
    # The problem works the 13-parameter float32 network in float64; its warm start x - previous_x
    # was float32, and the second step raised "addmv input tensors must have the same dtype".
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    X = torch.linspace(-1, 1, 40)[:, None]
    y = torch.sin(2 * X)
    opt = LevenbergMarquardt(net.parameters(), **options)
    costs = [float(opt.step(lambda: net(X) - y)) for _ in range(4)]
    assert (_state(opt)["jacobian"], _state(opt)["solver"], net[0].weight.dtype) == ("closed-form", "cg",
                                                                                     torch.float32)
    assert costs[0] > costs[1] > costs[2] > costs[3]
    assert costs[3] < 0.1 * costs[0]  # measured 5.394, 0.4651, 0.2593, 0.2559


def test_matrix_free_warm_start_of_another_dtype_is_dropped_after_the_model_is_converted():
    # The warm start kept in state stayed float32 after net.double(), and the next step raised
    # "addmv input tensors must have the same dtype" inside the Galerkin basis.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    X = torch.linspace(-1, 1, 50)[:, None]
    y = torch.sin(2 * X)
    opt = LevenbergMarquardt(net.parameters(), solver="matrix-free")
    for _ in range(2):
        opt.step(lambda: torch.sin(net(X)) - y)
    assert _state(opt)["warm_start"].dtype == torch.float32
    net.double()
    X, y = X.double(), y.double()
    before = 0.5 * float((torch.sin(net(X)) - y).detach().square().sum())
    cost = float(opt.step(lambda: torch.sin(net(X)) - y))
    assert (_state(opt)["jacobian"], _state(opt)["solver"]) == ("forward", "cg")
    assert cost < before and _state(opt)["warm_start"].dtype == torch.float64


def test_forced_normal_form_past_max_matrix_bytes_is_a_value_error_with_the_weights_unchanged():
    net, closure = _squashed_problem(60, 8)
    before = _params(net)
    opt = LevenbergMarquardt(net.parameters(), solver="normal", max_matrix_bytes=100)
    with pytest.raises(ValueError, match=r"solver='normal' needs the 25 x 25 matrix J\^T J \(5,000 bytes.*"
                                         r"max_matrix_bytes=100"):
        opt.step(closure)
    assert torch.equal(_params(net), before)


def test_a_state_dict_saved_before_the_matrix_options_loads_with_fits_defaults():
    net, X, y = _tanh_problem()
    opt = LevenbergMarquardt(net.parameters(), solver="normal", max_matrix_bytes=1 << 20)
    saved = opt.state_dict()
    for key in ("solver", "max_matrix_bytes"):
        del saved["param_groups"][0][key]
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert (group["solver"], group["max_matrix_bytes"]) == ("auto", marquardt.chunked.DEFAULT_MATRIX_BYTES)
    assert float(opt.step(lambda: net(X) - y)) < 0.5 * float(y.square().sum())


ROWS_MEMORY_SCRIPT = """
import json, torch, marquardt
torch.set_num_threads(1)
torch.manual_seed(0)
def status(key):  # this process's memory, not getrusage's ru_maxrss, which keeps the parent's peak across exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                          torch.nn.Linear(32, 1))
X = torch.linspace(-1, 1, 3000)[:, None]
y = torch.sin(3 * X)
small = torch.nn.Linear(1, 1)  # the code paths loaded before the baseline
marquardt.LevenbergMarquardt(small.parameters()).step(lambda: torch.sin(small(X[:30])) - y[:30])
opt = marquardt.LevenbergMarquardt(net.parameters(), max_jacobian_bytes=8_000_000)
base = status("VmRSS")
opt.step(lambda: torch.sin(net(X)) - y)  # refused by the closed form: J by batched backward passes
state = opt.state[next(net.parameters())]
print(json.dumps({"growth": status("VmHWM") - base, "jacobian": state["jacobian"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's heap behaviour")
def test_jacobian_rows_by_small_batches_stay_within_the_budget_in_resident_memory():
    # The rows of each batched backward pass were kept as pieces for one torch.cat, between the
    # passes' freed temporaries: the heap grew by about a pass's saved tensors per batch (1.09 GB
    # above the start for this 14 MB J at m = 4,000; 5.2 GB for a 87 MB J at T2's size).
    done = subprocess.run([sys.executable, "-c", ROWS_MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["jacobian"] == "reverse"
    assert measured["growth"] < 150e6, measured  # 52 MB now, 549 MB before


# --------------------------------------------------------------------------- later steps of a kept closed form


def _count_checks(monkeypatch):
    counts = {"backward": 0, "graph": 0}
    full, fast = marquardt.optim._is_output_minus_constant, marquardt.optim._reproduces

    def counted_full(*args):
        counts["backward"] += 1
        return full(*args)

    def counted_fast(*args):
        verified = fast(*args)
        counts["graph"] += verified
        return verified

    monkeypatch.setattr(marquardt.optim, "_is_output_minus_constant", counted_full)
    monkeypatch.setattr(marquardt.optim, "_reproduces", counted_fast)
    return counts


def _sinc_net(dtype=torch.float32):
    torch.manual_seed(3)
    X = torch.linspace(-10, 10, 200, dtype=dtype)[:, None]
    y = torch.where(X == 0, torch.ones_like(X), torch.sin(torch.pi * X) / (torch.pi * X))
    net = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 1)).to(dtype)
    return X, y, net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_later_steps_of_a_kept_problem_are_verified_by_the_graph_with_the_same_steps(monkeypatch, dtype):
    # Each step ran a backward pass through the closure's graph to check that the residuals are
    # the outputs minus a constant (~350 of ~1,900 us a step on the 1-20-1 benchmark network).
    # Later steps of the same call now read the graph's nodes and the closed form's held outputs.
    X, y, net = _sinc_net(dtype)
    reference = copy.deepcopy(net)
    opt = marquardt.LevenbergMarquardt(net.parameters())
    counts = _count_checks(monkeypatch)
    costs = [float(opt.step(lambda: (net(X) - y).reshape(-1))) for _ in range(12)]
    assert counts == {"backward": 1, "graph": 11}
    assert opt.state[net[0].weight]["jacobian"] == "closed-form"
    monkeypatch.setattr(marquardt.optim, "_reproduces", lambda *args: False)  # every step by the backward pass
    opt = marquardt.LevenbergMarquardt(reference.parameters())
    expected = [float(opt.step(lambda: (reference(X) - y).reshape(-1))) for _ in range(12)]
    assert costs == expected and costs[-1] < 0.2 * costs[0]
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))


@pytest.mark.parametrize("name, residuals, verified", [
    ("reshape", lambda out, y: (out - y).reshape(-1), True),
    ("flatten", lambda out, y: (out - y).flatten(), True),
    ("squeeze", lambda out, y: (out - y).squeeze(1), True),
    ("unsqueeze", lambda out, y: (out - y).unsqueeze(0), True),
    ("plus negated", lambda out, y: out + (-y), True),
    ("negated first", lambda out, y: -y + out, True),
    ("minus a number", lambda out, y: out - 0.5, True),
    ("copy", lambda out, y: (out - y).clone().reshape(-1), True),
    ("targets minus outputs", lambda out, y: y - out, False),
    ("negated", lambda out, y: -(out - y), False),
    ("scaled", lambda out, y: 2 * (out - y), False),
    ("alpha", lambda out, y: torch.sub(out, y, alpha=2), False),
    ("transposed", lambda out, y: (out - y).T.reshape(-1), False),
    ("cast", lambda out, y: out.double() - y.double(), False),
    ("targets with a graph", lambda out, y: out - y.detach().requires_grad_(), False),
    ("outputs of another call", None, False),
])
def test_the_graph_check_accepts_outputs_minus_a_constant_only(name, residuals, verified):
    X, y, net = _sinc_net()
    X2 = torch.cat([X, X], 1)
    wide = torch.nn.Linear(2, 1)
    out = net(X)
    r = (net(X) - y) if residuals is None else residuals(out, y)
    assert marquardt.optim._is_outputs_minus_constant_graph(r, out) is verified, name
    assert not marquardt.optim._is_outputs_minus_constant_graph(wide(X2) - y, out)


def test_a_hook_added_between_steps_is_checked_by_a_backward_pass_again(monkeypatch):
    # A tensor hook changes the gradients and not the outputs: the call's key (its hooks) makes
    # the next step check the closed form against the closure's graph again, as every step did.
    X, y, net = _sinc_net(torch.float64)
    opt = marquardt.LevenbergMarquardt(net.parameters())
    counts = _count_checks(monkeypatch)
    for k in range(5):
        if k == 3:
            net[2].weight.register_hook(lambda g: 2 * g)
        opt.step(lambda: net(X) - y)
    assert counts["backward"] == 2 and counts["graph"] == 2  # steps 0 and 3 by the backward pass


def test_outputs_the_closed_form_does_not_give_are_not_taken_for_its_residuals():
    # A forward hook adds a buffer to the outputs: the derivatives are the closed form's, and
    # the J^T u check passed, but the closed form's residuals were the closure's minus the shift
    # (its gradient too): every step stayed at cost 20.71 where the graph path reaches 0.28.
    X, y, net = _sinc_net(torch.float64)
    reference = copy.deepcopy(net)
    for model in (net, reference):
        model[2].register_buffer("shift", torch.full((1,), 0.5, dtype=torch.float64))
        model[2].register_forward_hook(lambda module, args, out: out + module.shift)
    opt = marquardt.LevenbergMarquardt(net.parameters())
    graph = marquardt.LevenbergMarquardt(reference.parameters())
    graph._closed_form = False
    costs, expected, modes = [], [], []
    for _ in range(5):
        costs.append(float(opt.step(lambda: net(X) - y)))
        expected.append(float(graph.step(lambda: reference(X) - y)))
        modes.append(opt.state[net[0].weight]["jacobian"])
    assert "closed-form" not in modes
    np.testing.assert_allclose(costs, expected, rtol=1e-9)
    assert costs[-1] < 0.1 * costs[0]


@pytest.mark.parametrize("from_step", [0, 2])
def test_closed_form_outputs_that_differ_from_the_modules_are_refused(monkeypatch, from_step):
    # The closed form's own forward pass must give the module's outputs, at the first step of a
    # call (by a forward pass) and at later ones (the outputs a tiny network holds).
    X, y, net = _sinc_net(torch.float64)
    opt = marquardt.LevenbergMarquardt(net.parameters())
    modes = []
    for k in range(4):
        if k == from_step:
            for name in ("held_outputs", "outputs_at"):
                method = getattr(marquardt.network.ModuleProblem, name)
                monkeypatch.setattr(marquardt.network.ModuleProblem, name,
                                    lambda self, x, method=method: None if (out := method(self, x)) is None
                                    else out * 1.001)
        opt.step(lambda: net(X) - y)
        modes.append(opt.state[net[0].weight]["jacobian"])
    assert modes[:from_step] == ["closed-form"] * from_step and "closed-form" not in modes[from_step:]


# --------------------------------------------------------------------------- closures that are not repeatable


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, X):
        return self.out(nn.functional.dropout(torch.tanh(self.hidden(X)), 0.2, self.training))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1)),
    _FunctionalDropout,
])
@pytest.mark.parametrize("closed_form", [True, False])
def test_dropout_in_training_mode_is_a_clear_error_and_the_weights_stay(monkeypatch, make, closed_form):
    # Each call drew a new mask: the trial costs were those of other networks, and LM "trained".
    monkeypatch.setattr(marquardt.LevenbergMarquardt, "_closed_form", closed_form)
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 50)[:, None]
    y = torch.sin(3 * X)
    net = make()
    before = [p.detach().clone() for p in net.parameters()]
    opt = marquardt.LevenbergMarquardt(net.parameters())
    with pytest.raises(ValueError, match=r"drew random numbers.*model\.eval\(\)"):
        opt.step(lambda: net(X) - y)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    net.eval()
    costs = [float(opt.step(lambda: net(X) - y)) for _ in range(5)]
    assert costs[-1] < costs[0]


_MINIBATCH_ROWS = {
    "torch": lambda: torch.randperm(200)[:50],
    # numpy's global generator was not watched: this minibatch, drawn anew at every call, passed,
    # and each trial's cost was that of other samples (the steps wandered).
    "numpy": lambda: torch.as_tensor(np.random.permutation(200)[:50]),
}


@pytest.mark.parametrize("generator", list(_MINIBATCH_ROWS))
def test_a_minibatch_drawn_inside_the_closure_is_a_clear_error(generator):
    torch.manual_seed(0)
    np.random.seed(0)
    X = torch.linspace(-1, 1, 200)[:, None]
    y = torch.sin(3 * X)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    before = _params(net)
    opt = marquardt.LevenbergMarquardt(net.parameters())

    def closure():
        rows = _MINIBATCH_ROWS[generator]()
        return net(X[rows]) - y[rows]

    with pytest.raises(ValueError, match="draw a minibatch outside the closure"):
        opt.step(closure)
    assert torch.equal(_params(net), before)


def test_random_numbers_that_do_not_reach_the_residuals_are_allowed():
    X, y, net = _sinc_net(torch.float64)
    reference = copy.deepcopy(net)
    calls = []

    def closure(model):
        calls.append(torch.rand(1))  # e.g. a draw for logging: the residuals are the same
        return model(X) - y

    opt, plain = (marquardt.LevenbergMarquardt(m.parameters()) for m in (net, reference))
    costs = [float(opt.step(lambda: closure(net))) for _ in range(3)]
    expected = [float(plain.step(lambda: reference(X) - y)) for _ in range(3)]
    assert costs == expected


# ---------------------------------------------------------------------------------------------
# the damping state: a floor after accepted steps, and states no step can start from


def _exponential_closure(b, limit=10_000):
    """``b0 exp(-b1 t) - y`` with a small residual left at the minimum, float64, counting its
    calls: past ``limit`` it raises, so that a step that would never end fails instead."""
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.01 * torch.sin(40 * t)
    calls = []

    def closure():
        calls.append(None)
        if len(calls) > limit:
            raise RuntimeError(f"the closure was called {limit} times: the step never ends")
        return b[0] * torch.exp(-b[1] * t) - y

    return closure, calls


@pytest.mark.parametrize("strategy", ["marquardt", "nielsen"])
def test_a_tiny_damping_is_floored_after_accepted_steps_and_every_step_ends(strategy):
    # damping=5e-324 is a valid option; accepted steps multiplied it (x0.1, or Nielsen's x1/3)
    # to 0.0, and from there each rejection gave 0 * 10 = 0, never past damping_max: the sixth
    # step called the closure 200,000 times in 20 s and went on. fit floors it at 1e-20.
    b = torch.nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
    closure, calls = _exponential_closure(b)
    opt = LevenbergMarquardt([b], damping=5e-324, strategy=strategy)
    for _ in range(40):
        cost = opt.step(closure)
        assert opt.damping_state.damping > 0.0 and math.isfinite(float(cost))
    assert opt.exhausted and opt.damping_state.damping > 1e10  # it ends as a run at the minimum does
    assert float(cost) == pytest.approx(0.0012692252487127, rel=1e-9) and len(calls) < 2000


def test_the_damping_stops_at_fits_floor_after_accepted_steps():
    b = torch.nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
    closure, _ = _exponential_closure(b)
    opt = LevenbergMarquardt([b], damping=1e-19)
    opt.step(closure)
    assert opt.damping_state.damping == pytest.approx(1e-20, rel=1e-12)  # x0.1
    opt.step(closure)
    assert opt.damping_state.damping == marquardt.damping.DAMPING_FLOOR == marquardt.train._MU_FLOOR


@pytest.mark.parametrize("field, value", [("damping", math.nan), ("damping", -1e-3), ("damping", 0.0),
                                          ("damping", "1e-3"), ("nu", math.nan), ("nu", 0.0), ("nu", math.inf)])
def test_a_state_dict_with_a_damping_no_step_can_start_from_is_refused(field, value):
    # A NaN, 0 or negative damping was loaded and the next step never ended (NaN * 10 and
    # -1e-3 * 10 are never past damping_max); a NaN or 0 nu gave Nielsen's rule the same.
    b = torch.nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
    closure, calls = _exponential_closure(b)
    opt = LevenbergMarquardt([b], strategy="nielsen")
    opt.step(closure)
    saved = opt.state_dict()
    saved["state"][0][field] = value
    fresh = LevenbergMarquardt([b], strategy="nielsen")
    with pytest.raises(ValueError, match=rf"Invalid {field} in state_dict\['state'\]\[0\]: {re.escape(repr(value))}; "
                                         "expected a (finite )?number"):
        fresh.load_state_dict(saved)
    assert fresh.state_dict()["state"] == {}  # nothing loaded
    # Written into the state directly: refused at the step, before the closure runs.
    _state(opt)[field] = value
    before, count = b.detach().clone(), len(calls)
    with pytest.raises(ValueError, match=rf"Invalid {field} in the optimizer's state: {re.escape(repr(value))}"):
        opt.step(closure)
    assert len(calls) == count and torch.equal(b.detach(), before)


def test_a_state_dict_with_a_damping_past_its_maximum_starts_again_from_the_ceiling():
    b = torch.nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
    closure, _ = _exponential_closure(b)
    opt = LevenbergMarquardt([b])
    opt.step(closure)
    saved = opt.state_dict()
    saved["state"][0]["damping"] = math.inf
    opt.load_state_dict(saved)
    cost = opt.step(closure)
    assert math.isfinite(float(cost)) and opt.damping_state.damping <= 1e10  # from 1e10: accepted, x0.1


# ---------------------------------------------------------------------------------------------
# a point the optimizer accepted whose Jacobian is not finite: rejected after all


_SQRT_X = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)


def _sqrt_residuals(w, X=_SQRT_X):
    """``sqrt(w X) - 0.1``, 0 - 0.1 where ``w X <= 0``: finite everywhere, its derivative NaN by
    autograd where ``w X < 0`` (sqrt of a negative in the unselected branch). From ``w = 1`` the
    first step is accepted at ``w = -0.80``, on the flat part (cost 0.04, lower than at 1)."""
    z = w * X
    return torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z)) - 0.1


@pytest.mark.parametrize("solver", ["auto", "matrix-free"])
@pytest.mark.parametrize("strategy", ["marquardt", "nielsen"])
def test_a_point_whose_jacobian_is_not_finite_is_rejected_and_the_run_goes_on(solver, strategy):
    # The optimizer accepted w = -0.80 (its cost is lower), where J is NaN, and the next step()
    # raised "The gradient J^T r is not finite": a training loop crashed at a point the
    # optimizer chose itself. least_squares rejects such a point and raises the damping.
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LevenbergMarquardt([w], solver=solver, strategy=strategy)
    assert float(opt.step(lambda: _sqrt_residuals(w))) == pytest.approx(0.04, rel=1e-12) and float(w.detach()) < 0
    costs = []
    for _ in range(40):
        costs.append(float(opt.step(lambda: _sqrt_residuals(w))))
        if opt.exhausted:
            break
    assert all(math.isfinite(c) for c in costs) and torch.isfinite(w).all()
    # It ends at the minimum, where sqrt is differentiable (w = 0.00972, cost 1.135e-3).
    assert opt.exhausted and float(w.detach()) == pytest.approx(0.00972, abs=1e-5)
    assert costs[-1] == pytest.approx(1.135e-3, rel=1e-3)


def test_the_step_after_a_rejected_point_starts_from_the_point_before_with_the_damping_raised():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    opt.step(lambda: _sqrt_residuals(w))
    first = float(w.detach())
    assert _state(opt)["previous_damping"] == 1e-3 and _state(opt)["accepted_cost"] == pytest.approx(0.04)
    # The same step taken by hand: from w = 1, damping 1e-3 * 10 (the accepted trial rejected).
    reference = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    by_hand = LevenbergMarquardt([reference], damping=1e-2)
    expected = by_hand.step(lambda: _sqrt_residuals(reference))
    assert opt.step(lambda: _sqrt_residuals(w)) == expected and torch.equal(w, reference) and float(w.detach()) != first
    assert opt.damping_state == by_hand.damping_state
    assert torch.equal(_state(opt)["previous_point"], torch.tensor([1.0], dtype=torch.float64))


def _mixed_dtype_sqrt_problem(w0=1.0, shift=0.1):
    """``sqrt(w X) - shift`` (as :func:`_sqrt_residuals`) with ``w`` a float32 parameter and
    ``shift`` a float64 one: the flat parameter vector is float64, ``w`` holds it rounded."""
    w = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float32))
    shift = torch.nn.Parameter(torch.tensor([shift], dtype=torch.float64))
    return [w, shift], lambda: _sqrt_residuals(w.double()) + 0.1 - shift


def test_a_point_with_a_nan_jacobian_is_stepped_back_from_with_parameters_of_mixed_dtypes():
    # The accepted point's digest was taken of the float64 step, not of the weights the float32
    # parameter holds (rounded): the next step never recognised its own point and raised "The
    # gradient J^T r is not finite" where a float64 run steps back.
    params, closure = _mixed_dtype_sqrt_problem()
    opt = LevenbergMarquardt(params)
    opt.step(closure)
    assert float(params[0].detach()) < 0 and _state(opt)["previous_damping"] == 1e-3  # accepted where J is NaN
    reference, by_hand_closure = _mixed_dtype_sqrt_problem()
    by_hand = LevenbergMarquardt(reference, damping=1e-2)  # from the start, the accepted trial rejected
    expected = by_hand.step(by_hand_closure)
    assert opt.step(closure) == expected and torch.equal(_params_of(params), _params_of(reference))
    assert opt.damping_state == by_hand.damping_state


@pytest.mark.parametrize("change", ["initial weights", "weights set since", "new data", "other closure"])
def test_a_non_finite_gradient_at_a_point_the_optimizer_did_not_choose_stays_a_value_error(change):
    w = torch.nn.Parameter(torch.tensor([1.0 if change != "initial weights" else -0.5], dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    closure = lambda: _sqrt_residuals(w)  # noqa: E731
    if change != "initial weights":
        opt.step(closure)  # accepted at w = -0.80, where J is NaN
    if change == "weights set since":  # the same cost as the accepted point's, 0.04: the digest tells
        with torch.no_grad():
            w.fill_(-0.5)
    elif change == "new data":  # some w X > 0 now: other residuals, and NaN derivatives where w X < 0
        closure = lambda: _sqrt_residuals(w, torch.linspace(-1.5, 1.0, 8, dtype=torch.float64))  # noqa: E731
    elif change == "other closure":
        closure = lambda: 2 * _sqrt_residuals(w)  # noqa: E731
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"The gradient J\^T r is not finite at the current parameters"):
        opt.step(closure)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("how", ["load_state_dict", "checkpoint", "deepcopy"])
def test_a_run_resumed_at_a_rejected_point_takes_the_same_step_back(how):
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    opt.step(lambda: _sqrt_residuals(w))
    saved, copied = copy.deepcopy(opt.state_dict()), copy.deepcopy((w, opt))
    cost = opt.step(lambda: _sqrt_residuals(w))
    if how == "deepcopy":
        resumed, again = copied
    else:
        resumed = torch.nn.Parameter(copied[0].detach().clone())  # the weights at the rejected point
        again = LevenbergMarquardt([resumed])
        if how == "load_state_dict":
            again.load_state_dict(saved)
        else:
            _checkpoint_round_trip(again, saved)
    assert again.step(lambda: _sqrt_residuals(resumed)) == cost and torch.equal(resumed, w)
    assert _same_state(_state(again), _state(opt))


class _SqrtNet(nn.Module):
    """A 1-4-1 tanh network under ``sqrt(max(z, 0))``: autograd gives NaN derivatives for every
    sample with ``z < 0``, so most points an LM step reaches have a NaN Jacobian (graph path)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        with torch.no_grad():
            self.net[2].bias.fill_(1.0)

    def forward(self, x):
        z = self.net(x)
        return torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z))


@pytest.mark.parametrize("solver, samples", [("normal", 30), ("sample-space", 5), ("matrix-free", 30)])
def test_every_form_of_the_graph_path_steps_back_from_a_point_with_a_nan_jacobian(solver, samples):
    model = _SqrtNet()
    X = torch.linspace(-1, 1, 30, dtype=torch.float64)[:samples, None]
    y = torch.relu(X)
    opt = LevenbergMarquardt(model.parameters(), solver=solver)
    start = 0.5 * float((model(X).detach() - y).square().sum())
    steps_back = 0
    for _ in range(20):
        before = _state(opt).get("previous_point")
        cost = float(opt.step(lambda: model(X) - y))  # raised "The gradient J^T r is not finite" at the 2nd
        assert math.isfinite(cost) and cost <= start and all(torch.isfinite(p).all() for p in model.parameters())
        # A step back starts from the point kept, and keeps it again when its trial is accepted.
        steps_back += before is not None and _state(opt).get("previous_point") is before
    assert steps_back >= 5 and _state(opt)["jacobian"] != "closed-form"
    assert _state(opt)["solver"] == {"normal": "cholesky", "sample-space": "sample-space", "matrix-free": "cg"}[solver]


@pytest.mark.parametrize("field", ["previous_damping", "previous_nu"])
def test_a_state_dict_with_a_bad_damping_to_step_back_with_is_refused(field):
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LevenbergMarquardt([w])
    opt.step(lambda: _sqrt_residuals(w))
    saved = opt.state_dict()
    saved["state"][0][field] = math.nan
    with pytest.raises(ValueError, match=rf"Invalid {field} in state_dict\['state'\]\[0\]: nan; expected"):
        LevenbergMarquardt([w]).load_state_dict(saved)


def _without_step_back(monkeypatch):
    monkeypatch.setattr(marquardt.optim, "_keep_step_back", lambda stored, start, out, held: None)


@pytest.mark.parametrize("path", ["closed-form", "graph", "matrix-free", "nielsen"])
def test_keeping_the_point_to_step_back_to_leaves_a_normal_run_bit_for_bit(path, monkeypatch):
    # The state kept for the step back (one vector, three floats) is read only when the gradient
    # is not finite: a run without trouble takes the same steps as one that keeps nothing.
    def run():
        net, X, y = _tanh_problem()
        options = {"matrix-free": dict(solver="matrix-free"), "nielsen": dict(strategy="nielsen")}.get(path, {})
        opt = LevenbergMarquardt(net.parameters(), **options)
        costs = [float(opt.step(lambda: net(X) - y)) for _ in range(12)]
        return costs, _params(net), _state(opt)

    monkeypatch.setattr(LevenbergMarquardt, "_closed_form", path != "graph")
    costs, weights, state = run()
    assert "previous_point" in state and costs[-1] < 0.5 * costs[0]
    _without_step_back(monkeypatch)
    plain_costs, plain_weights, plain_state = run()
    assert costs == plain_costs and torch.equal(weights, plain_weights) and "previous_point" not in plain_state


def test_the_closed_form_is_found_where_global_hooks_take_no_keywords(monkeypatch):
    # torch 2.4 (the oldest torch the package supports) has no with_kwargs for global forward
    # hooks: every LevenbergMarquardt step failed with a TypeError from the hook's registration.
    import marquardt.optim as optim_module

    def run():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        X = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None]
        opt = marquardt.LevenbergMarquardt(net.parameters())
        costs = [float(opt.step(lambda: (net(X) - torch.sin(3 * X)).reshape(-1))) for _ in range(5)]
        return costs, opt.state[next(net.parameters())]["jacobian"]

    expected = run()
    monkeypatch.setattr(optim_module, "_GLOBAL_HOOK_KWARGS", False)
    assert run() == expected and expected[1] == "closed-form"


def test_a_parameter_listed_twice_is_refused_at_construction():
    # torch.optim only warns: each listed copy got its own column of J and both halves of the
    # step were written into the one tensor, so half of the solved step was applied.
    layer = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"Invalid params: the parameter at index 2 is the one at index 0"):
        marquardt.LevenbergMarquardt([layer.weight, layer.bias, layer.weight])
    marquardt.LevenbergMarquardt(torch.nn.Sequential(layer, torch.nn.Tanh(), layer).parameters())  # shared once
