"""chunked: system forms, symmetric rank-k accumulation, promotion; every solver path gives the dense step."""

import copy

import pytest
import torch
from torch import nn

from marquardt import chunked, fit
from marquardt.chunked import (
    AccumulatedNormalEquations,
    BlasThreadChoice,
    HeldSampleSpaceEquations,
    KernelSampleSpaceEquations,
    Plan,
    PromotedEquations,
    accumulate_normal,
    accumulation_dtype,
    assemble_sample_space,
    cholesky_factor,
    normal_equations,
    plan_assembly,
    single_thread,
    symmetric_rank_update,
)
from marquardt.fastjac import FunctionalJacobian
from marquardt.linalg import NormalEquations
from marquardt.losses import CrossEntropy
from marquardt.network import ModuleProblem, flatten_parameters, write_parameters

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# plans


@pytest.mark.parametrize("m, n, itemsize, kwargs, form, rows", [
    (1000, 61, 4, {}, "normal", 1000),
    (1000, 61, 8, dict(max_bytes=61 * 8 * 100), "normal", 100),
    (10, 1000, 8, {}, "sample-space", 10),
    (2000, 40_801, 4, {}, "sample-space", (64 << 20) // (40_801 * 4)),
    (2000, 40_801, 4, dict(max_bytes=100 << 20), "matrix-free", (64 << 20) // (40_801 * 4)),
    (2000, 4000, 4, dict(max_bytes=1 << 20), "normal", (1 << 20) // 16_000),  # J too big, J^T J fits
    (50_000, 4353, 4, {}, "normal", (64 << 20) // (4353 * 4)),
    (20_000, 98_945, 4, {}, "matrix-free", (64 << 20) // (98_945 * 4)),
    (100, 50, 8, dict(max_matrix_bytes=50 * 50 * 8 - 1), "matrix-free", 100),
    (100, 50, 8, dict(form="sample-space"), "sample-space", 100),
    (10, 50, 8, dict(form="normal"), "normal", 10),
    (10, 50, 8, dict(form="matrix-free"), "matrix-free", 10),
])
def test_plan_table(m, n, itemsize, kwargs, form, rows):
    plan = plan_assembly(m, n, itemsize, **kwargs)
    assert (plan.form, plan.chunk_rows) == (form, min(m, rows))


def test_plan_rejects_unknown_form():
    with pytest.raises(ValueError, match="Invalid solver form: 'qr'; expected 'auto' or one of"):
        plan_assembly(10, 10, 8, form="qr")


def test_small_problems_are_serial():
    assert plan_assembly(1000, 61, 4).serial and not plan_assembly(5000, 4353, 4).serial


def test_single_thread_restores_the_thread_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with single_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# accumulation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_rank_update_fills_the_lower_triangle(dtype):
    J = torch.randn(37, 9, generator=torch.Generator().manual_seed(0), dtype=dtype)
    gram = torch.eye(9, dtype=dtype)
    symmetric_rank_update(gram, J)
    expected = torch.eye(9, dtype=dtype) + J.T @ J
    torch.testing.assert_close(gram.tril(), expected.tril())


def test_accumulate_normal_equals_one_product_and_is_exactly_symmetric():
    g = torch.Generator().manual_seed(1)
    J, r = torch.randn(50, 7, generator=g, dtype=DT), torch.randn(50, generator=g, dtype=DT)
    chunks = [(J[i : i + 16], r[i : i + 16]) for i in range(0, 50, 16)]
    system, grad, cost = accumulate_normal(chunks, 7, dtype=DT, device="cpu")
    assert isinstance(system, AccumulatedNormalEquations) and system.name == "chunked-cholesky"
    torch.testing.assert_close(system.gram, J.T @ J)
    assert torch.equal(system.gram, system.gram.T)
    torch.testing.assert_close(grad, J.T @ r)
    assert cost == pytest.approx(0.5 * float(r @ r))
    single, _, _ = accumulate_normal([(J, r)], 7, dtype=DT, device="cpu")
    assert single.name == "cholesky"
    step = system.solve(grad, 1e-3, torch.ones(7, dtype=DT))
    assert system.path == "chunked-cholesky"
    torch.testing.assert_close(step, single.solve(grad, 1e-3, torch.ones(7, dtype=DT)))
    reference = NormalEquations(J.T @ J, J, r)
    torch.testing.assert_close(step, reference.solve(grad, 1e-3, torch.ones(7, dtype=DT)))
    torch.testing.assert_close(system.curvature(step), step @ (J.T @ J) @ step)


def test_float32_gram_with_negative_rounding_eigenvalues_still_factorizes():
    g = torch.Generator().manual_seed(7)
    J = torch.randn(300, 60, generator=g) @ torch.randn(60, 120, generator=g)  # rank 60 of 120
    system, grad, _ = accumulate_normal([(J, torch.randn(300, generator=g))], 120, dtype=torch.float32, device="cpu")
    step = system.solve(grad, 1e-12, torch.ones(120))
    assert system.path == "cholesky" and bool(torch.isfinite(step).all())


# ---------------------------------------------------------------------------------------------
# the Cholesky factorization: LAPACK on a reused workspace, torch elsewhere


def _normal_system(n, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(2 * n, n, generator=g, dtype=dtype)
    system, grad, _ = accumulate_normal([(J, torch.randn(2 * n, generator=g, dtype=dtype))], n, dtype=dtype,
                                        device="cpu")
    return system, grad, J


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n", [5, 200])
def test_lapack_step_equals_the_torch_cholesky_step(dtype, rtol, n):
    system, grad, J = _normal_system(n, dtype)
    scale = torch.linspace(1.0, 2.0, n, dtype=dtype)
    step = system.solve(grad, 1e-2, scale)
    assert system.path == "cholesky" and chunked._potrf(system.lower) is not None
    factor = torch.linalg.cholesky((J.T @ J).to(dtype) + torch.diag(1e-2 * scale))
    expected = -torch.cholesky_solve(grad.unsqueeze(1), factor).squeeze(1)
    torch.testing.assert_close(step, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_views_give_bitwise_the_steps_of_torch_kernels(dtype):
    system, grad, _ = _normal_system(30, dtype)
    scale = torch.linspace(1.0, 2.0, 30, dtype=dtype)
    step = system.solve(grad, 1e-2, scale)  # contiguous CPU vectors: numpy views throughout
    strided = torch.stack([scale, scale], 1)[:, 0]  # not contiguous: the torch kernels
    damped = system._damped(1e-2, strided)
    assert torch.equal(damped, system._damped(1e-2, scale))
    factor = cholesky_factor(system.lower, torch.stack([damped, damped], 1)[:, 0])
    assert factor.lapack and torch.equal(factor.solve(grad, negate=True), step)
    assert torch.equal(-factor.solve(torch.stack([grad, grad], 1)[:, 0]), step)


def test_torch_path_without_lapack_gives_the_same_step(monkeypatch):
    system, grad, _ = _normal_system(40, DT)
    lapack_step = system.solve(grad, 1e-3, torch.ones(40, dtype=DT))
    monkeypatch.setattr(chunked, "_potrf", lambda tensor: None)
    torch_step = system.solve(grad, 1e-3, torch.ones(40, dtype=DT))
    assert system.path == "cholesky"
    torch.testing.assert_close(torch_step, lapack_step)


def test_a_failed_lapack_factorization_is_retried_by_torch(monkeypatch):
    system, grad, _ = _normal_system(40, DT)
    expected = system.solve(grad, 1e-3, torch.ones(40, dtype=DT))

    def failing_potrf(a, **options):
        a[:] = float("nan")  # what a failed factorization may leave behind
        return a, 3

    monkeypatch.setattr(chunked, "_potrf", lambda tensor: failing_potrf)
    factor = cholesky_factor(system.lower, torch.full((40,), 1e-3, dtype=DT))
    assert factor is not None and not factor.lapack
    retried, _, _ = _normal_system(40, DT)
    torch.testing.assert_close(retried.solve(grad, 1e-3, torch.ones(40, dtype=DT)), expected)
    assert retried.path == "cholesky"


def test_retries_reuse_one_workspace_and_leave_the_lower_triangle_intact():
    system, grad, _ = _normal_system(30, torch.float32)
    before = system.lower.clone()
    steps = [system.solve(grad, damping, torch.ones(30)) for damping in (1e-3, 1e-2, 1e-1)]
    pointers = {system._work.data_ptr()}
    system.solve(grad, 1.0, torch.ones(30))
    pointers.add(system._work.data_ptr())
    assert len(pointers) == 1 and torch.equal(system.lower, before)
    assert all(step.data_ptr() != system._work.data_ptr() for step in steps)
    assert steps[0].norm() > steps[1].norm() > steps[2].norm()  # more damping, shorter step


def test_a_retry_with_the_same_damped_diagonal_reuses_the_factor(monkeypatch):
    system, grad, _ = _normal_system(30, torch.float32)
    floor = torch.finfo(torch.float32).eps * float(system.lower.diagonal().sum())
    first = system.solve(grad, floor / 10, torch.ones(30))
    monkeypatch.setattr(chunked, "cholesky_factor", lambda *args: pytest.fail("factorized again"))
    torch.testing.assert_close(system.solve(grad, floor / 100, torch.ones(30)), first)  # both floored


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_solve_gives_bitwise_the_steps_of_the_general_path(dtype):
    small, grad, _ = _normal_system(30, dtype)
    general = AccumulatedNormalEquations(small.lower.clone())
    general._small = ()  # the general path only
    scale = torch.linspace(1.0, 2.0, 30, dtype=dtype)
    for damping in (1e-3, 1e-2, 1e-2, 1e-12, 1e-13):  # repeats and floored values reuse the factor
        assert torch.equal(small.solve(grad, damping, scale), general.solve(grad, damping, scale))
        assert small.path == general.path == "cholesky"
    assert small._small and small._work is not None


def test_small_solve_does_not_reuse_a_workspace_the_general_path_wrote():
    system, grad, _ = _normal_system(30, DT)
    reference = AccumulatedNormalEquations(system.lower.clone())
    scale = torch.ones(30, dtype=DT)
    first = system.solve(grad, 1e-3, scale)  # small path: its factor in the workspace
    system.solve(grad.float(), 1e-1, scale)  # a float32 gradient: the general path, another factor there
    assert torch.equal(system.solve(grad, 1e-3, scale), first)
    assert torch.equal(first, reference.solve(grad, 1e-3, scale))


def test_small_solve_reuses_the_factor_for_the_same_damped_diagonal():
    system, grad, _ = _normal_system(30, torch.float32)
    floor = torch.finfo(torch.float32).eps * float(system.lower.diagonal().sum())
    first = system.solve(grad, floor / 10, torch.ones(30))
    system._small.potrf = lambda *a, **k: pytest.fail("factorized again")
    assert torch.equal(system.solve(grad, floor / 100, torch.ones(30)), first)  # both floored


def test_indefinite_matrix_goes_to_the_eigen_fallback():
    lower = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=DT)  # [[1, 2], [2, 1]]: eigenvalues 3, -1
    system = AccumulatedNormalEquations(lower.clone())
    step = system.solve(torch.tensor([1.0, 0.0], dtype=DT), 1e-6, torch.ones(2, dtype=DT))
    assert system.path == "eigh" and bool(torch.isfinite(step).all())
    assert cholesky_factor(lower, torch.zeros(2, dtype=DT)) is None
    assert torch.equal(system.lower.tril(), lower)  # the fallback mirrored it, and nothing else


def _non_finite_systems():
    J = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    J[1, 1] = float("nan")  # a NaN derivative in one row
    r = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    kernel = KernelSampleSpaceEquations((J @ J.T).tril(), lambda v: J @ v, lambda u: J.T @ u,
                                        lambda: (J * J).sum(0), r)
    return {
        "normal": (AccumulatedNormalEquations((J.T @ J).tril(), chunks=2), "chunked-eigh"),
        "sample-space, rows held": (HeldSampleSpaceEquations(J, r), "sample-space-eigh"),
        "sample-space, closed form": (kernel, "sample-space-eigh"),
    }


@pytest.mark.parametrize("name", list(_non_finite_systems()))
def test_a_non_finite_jacobian_gives_a_nan_step_not_a_lapack_error(name):
    # Before: the eigen fallback ran on the NaN matrix and torch.linalg.eigh raised _LinAlgError.
    system, path = _non_finite_systems()[name]
    grad = torch.tensor([1.0, float("nan"), 2.0, 3.0], dtype=DT)
    step = system.solve(grad, 1e-3, torch.ones(4, dtype=DT))
    assert step.shape == (4,) and bool(torch.isnan(step).all()) and system.path == path


class _Sqrt(nn.Module):
    def forward(self, x):
        return x.abs().sqrt()  # derivative NaN (0 / 0) at 0


@pytest.mark.parametrize("options, path", [
    (dict(), "eigh"),
    (dict(max_jacobian_bytes=5 * 17 * 8), "chunked-eigh"),
    (dict(solver="sample-space"), "sample-space-eigh"),
])
def test_fit_with_a_non_finite_jacobian_rejects_the_step_and_keeps_the_weights(options, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), _Sqrt(), nn.Linear(4, 1)).to(DT)
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 1.0, 0.0  # hidden unit 0 sits at sqrt(|0|) for X = 0
    X = torch.linspace(-1, 1, 21, dtype=DT)[:, None]
    X[10] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(model, X, torch.sin(3 * X), epochs=5, **options)
    assert history.stop_reason == "Maximum MU reached."
    assert history["solver"][1:] == [path] and history["perf"][1] == history["perf"][0]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_cholesky_factor_rejects_a_non_finite_diagonal():
    lower = torch.eye(3, dtype=DT)
    assert cholesky_factor(lower, torch.tensor([0.0, float("nan"), 0.0], dtype=DT)) is None


@pytest.mark.parametrize("records, picks", [
    ([], [1, 1]),                                     # nothing measured: each count in turn
    ([(1, 2.0)], [2]),
    ([(1, 2.0), (2, 1.0)], [2, 2, 2, 1, 2]),          # the other after 2 * (2x slower) calls
    ([(1, 1.0), (2, 3.0)], [1, 1, 1, 1, 1, 2, 1]),    # 3x slower: after 6
    ([(1, 1.0), (2, 3.0), (2, 0.5)], [2, 2, 2, 1]),   # the last measurement counts
])
def test_blas_thread_choice_table(records, picks):
    choice = BlasThreadChoice((1, 2), explore_every=2)
    for count, seconds in records:
        choice.record(count, seconds, 1.0)
    assert [choice.pick() for _ in picks] == picks


def test_blas_thread_choice_with_one_count_always_picks_it():
    choice = BlasThreadChoice((1,))
    choice.record(1, 1.0, 1.0)
    assert [choice.pick() for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_equations_equal_accumulate_normal_bitwise(dtype):
    g = torch.Generator().manual_seed(4)
    J, r = torch.randn(50, 7, generator=g, dtype=dtype), torch.randn(50, generator=g, dtype=dtype)
    system, grad, cost = normal_equations(J, r)
    expected, expected_grad, expected_cost = accumulate_normal([(J, r)], 7, dtype=dtype, device="cpu")
    assert torch.equal(system.lower, expected.lower) and torch.equal(grad, expected_grad) and cost == expected_cost
    strided = torch.stack([J, J], 2)[..., 0]  # not contiguous: accumulate_normal itself
    assert torch.equal(normal_equations(strided, r)[0].lower, expected.lower)


def test_normal_equations_reuse_released_buffers():
    g = torch.Generator().manual_seed(5)
    J, r = torch.randn(40, 20, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)  # 2 block rows
    first, _, _ = normal_equations(J, r)
    first.solve(torch.ones(20, dtype=DT), 1e-3, torch.ones(20, dtype=DT))  # makes its work matrix
    buffers = first.release()
    buffers["gram"].fill_(7.0)  # stale values must not leak into the next J^T J
    second, grad, cost = normal_equations(2 * J, r, buffers)
    expected, expected_grad, expected_cost = normal_equations(2 * J, r)
    assert second.lower.data_ptr() == buffers["gram"].data_ptr() and second._work is buffers["work"]
    assert torch.equal(second.lower, expected.lower) and torch.equal(grad, expected_grad) and cost == expected_cost
    wrong = {"gram": torch.zeros(5, 5, dtype=DT), "work": torch.zeros(20, 20)}  # shape, dtype: not taken
    third, _, _ = normal_equations(J, r, wrong)
    assert third.lower.data_ptr() != wrong["gram"].data_ptr() and third._work is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_gradient_agrees_with_addmv_on_every_layout(dtype):
    g = torch.Generator().manual_seed(6)
    J, r = torch.randn(30, 4, generator=g, dtype=dtype), torch.randn(30, generator=g, dtype=dtype)
    expected = torch.ones(4, dtype=dtype).addmv_(J.T, r)
    for jac in (J, J.T.contiguous().T):  # numpy's product; a transposed layout: addmv
        grad = torch.ones(4, dtype=dtype)
        assert chunked.add_gradient(grad, jac, r) is grad
        torch.testing.assert_close(grad, expected)


def test_accumulate_normal_promotes_float32_rows():
    J = torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
    system, grad, _ = accumulate_normal([(J, torch.ones(20))], 3, dtype=DT, device="cpu")
    assert system.gram.dtype == DT and grad.dtype == DT
    torch.testing.assert_close(system.gram, J.double().T @ J.double())


def test_sample_space_assembly_preallocated_equals_concatenated():
    g = torch.Generator().manual_seed(3)
    J, r = torch.randn(6, 11, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    chunks = [(J[:4], r[:4]), (J[4:], r[4:])]
    a, grad_a, cost_a = assemble_sample_space(chunks, (6, 11))
    b, grad_b, cost_b = assemble_sample_space(chunks)
    assert torch.equal(a.jac, b.jac) and torch.equal(grad_a, grad_b) and cost_a == cost_b
    with pytest.raises(ValueError, match="The chunks held 6 rows; expected 7"):
        assemble_sample_space(chunks, (7, 11))


@pytest.mark.parametrize("scale_kind", ["ones", "uniform 3", "jacobi"])
@pytest.mark.parametrize("damping", [0.0, 1e-3, 10.0])
def test_held_sample_space_step_equals_the_dense_step(scale_kind, damping):
    g = torch.Generator().manual_seed(8)
    J, r = torch.randn(7, 20, generator=g, dtype=DT), torch.randn(7, generator=g, dtype=DT)
    scale = {"ones": torch.ones(20, dtype=DT), "uniform 3": torch.full((20,), 3.0, dtype=DT),
             "jacobi": (J * J).sum(0)}[scale_kind]
    system = HeldSampleSpaceEquations(J, r)
    step = system.solve(J.T @ r, damping, scale)
    assert system.path == "sample-space"
    if damping > 0:
        exact = torch.linalg.solve(J.T @ J + damping * torch.diag(scale), -J.T @ r)
    else:  # the minimum-norm (in the scale metric) Gauss-Newton step
        exact = -(J.T / scale[:, None]) @ torch.linalg.solve((J / scale) @ J.T, r)
    torch.testing.assert_close(step, exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(system.curvature(step), (J @ step) @ (J @ step))
    torch.testing.assert_close(system.diagonal(), (J * J).sum(0))


def test_held_sample_space_float32_rank_deficient_rows_still_solve():
    g = torch.Generator().manual_seed(9)
    J = torch.randn(50, 5, generator=g) @ torch.randn(5, 300, generator=g)  # 50 rows of rank 5
    system = HeldSampleSpaceEquations(J, torch.randn(50, generator=g))
    step = system.solve(J.T @ system.residuals, 1e-12, torch.ones(300))
    assert system.path == "sample-space" and bool(torch.isfinite(step).all())


@pytest.mark.parametrize("scale_kind", ["ones", "uniform 3", "jacobi"])
def test_kernel_sample_space_step_equals_the_dense_step(scale_kind):
    g = torch.Generator().manual_seed(10)
    J, r = torch.randn(6, 15, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    scale = {"ones": torch.ones(15, dtype=DT), "uniform 3": torch.full((15,), 3.0, dtype=DT),
             "jacobi": (J * J).sum(0)}[scale_kind]
    formed = []
    system = KernelSampleSpaceEquations(J @ J.T, lambda v: J @ v, lambda u: J.T @ u, lambda: (J * J).sum(0), r,
                                        rows=lambda: formed.append(1) or J)
    step = system.solve(J.T @ r, 1e-2, scale)
    exact = torch.linalg.solve(J.T @ J + 1e-2 * torch.diag(scale), -J.T @ r)
    torch.testing.assert_close(step, exact, rtol=1e-9, atol=1e-11)
    assert system.path == "sample-space"
    assert len(formed) == (scale_kind == "jacobi")  # rows are formed only for a non-uniform scale
    torch.testing.assert_close(system.curvature(step), (J @ step) @ (J @ step))


def test_sample_space_path_of_a_closed_form_network_holds_no_rows():
    model, X, y = _problem_data(hidden=30, outputs=2, samples=20)
    problem = ModuleProblem(model, X, y)
    recorder = _Recorder(problem)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    step = lin.system.solve(lin.grad, 1e-3, torch.ones_like(x))
    assert problem.plan.form == "sample-space" and isinstance(lin.system, KernelSampleSpaceEquations)
    assert recorder.sizes == []
    torch.testing.assert_close(step, _dense_step(model, X, y, 1e-3), rtol=1e-8, atol=1e-10)


def test_accumulation_dtype_table():
    assert accumulation_dtype(torch.float32, 1024) == DT
    assert accumulation_dtype(torch.float32, 1025) == torch.float32
    assert accumulation_dtype(torch.bfloat16, 10) == DT
    assert accumulation_dtype(DT, 10) == DT


def test_promoted_equations_answer_in_the_problem_dtype():
    J = torch.randn(30, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    r = torch.randn(30, generator=torch.Generator().manual_seed(5), dtype=DT)
    system = PromotedEquations(NormalEquations(J.T @ J, J, r), torch.float32)
    step = system.solve((J.T @ r).float(), 1e-2, torch.ones(4))
    assert step.dtype == torch.float32 and system.path == "cholesky" and system.name == "cholesky"
    assert system.curvature(step).dtype == torch.float32 and system.diagonal().dtype == torch.float32
    assert system.gram.dtype == torch.float32 and system.jac.dtype == torch.float32
    assert PromotedEquations(system.system, torch.float32).residuals.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# every solver path gives the dense Cholesky step (float64, small problems)


def _problem_data(hidden=6, outputs=2, samples=25, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).to(DT)
    g = torch.Generator().manual_seed(seed + 10)
    X = torch.randn(samples, 2, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True)).expand(samples, outputs).clone()
    return model, X, y


def _dense_step(model, X, y, damping):
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    (J, out), = FunctionalJacobian(model, layout).chunks(params, X, X.shape[0])
    r = (out - y).reshape(-1)
    return NormalEquations(J.T @ J, J, r).solve(J.T @ r, damping, torch.ones(J.shape[1], dtype=DT))


PATHS = {  # ModuleProblem options -> the path the system records
    "normal, one chunk": (dict(), "cholesky"),
    "normal, chunked (5 rows at a time)": (dict(max_jacobian_bytes=5 * 32 * 8), "chunked-cholesky"),
    "sample-space": (dict(solver="sample-space"), "sample-space"),
    "matrix-free (tight CG)": (dict(solver="matrix-free", cg_max_iter=500), "cg"),
}


@pytest.mark.parametrize("damping", [1e-4, 1.0])
@pytest.mark.parametrize("name", list(PATHS))
def test_every_solver_path_gives_the_dense_cholesky_step(name, damping):
    model, X, y = _problem_data()
    options, path = PATHS[name]
    problem = ModuleProblem(model, X, y, **options)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    if path == "cg":
        lin.system.rtol, lin.system.stall_tol = 1e-13, 0.0
    step = lin.system.solve(lin.grad, damping, torch.ones_like(x))
    assert lin.system.path == path
    torch.testing.assert_close(step, _dense_step(model, X, y, damping), rtol=1e-8, atol=1e-10)


def test_closed_form_and_torch_func_problems_linearize_the_same():
    model, X, y = _problem_data(outputs=3)
    fast = ModuleProblem(model, X, y)
    slow = ModuleProblem(model, X, y)
    slow.backend = FunctionalJacobian(model, [(n, p.numel()) for n, p in model.named_parameters()])
    assert fast.backend.name == "closed-form"
    x = flatten_parameters(model)
    a, b = fast.linearize(x), slow.linearize(x)
    torch.testing.assert_close(a.system.gram, b.system.gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert a.cost == pytest.approx(b.cost, rel=1e-14) and fast.cost(x) == pytest.approx(slow.cost(x), rel=1e-14)


def test_float32_problem_is_assembled_in_float64_and_steps_in_float32():
    model, X, y = _problem_data(samples=5000)  # 10,000 x 32: past SERIAL_MAX_ENTRIES, n <= 1024
    model, X, y = model.float(), X.float(), y.float()
    problem = ModuleProblem(model, X, y)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    assert problem.dtype == torch.float32
    assert isinstance(lin.system, PromotedEquations) and lin.system.system.gram.dtype == DT
    step = lin.system.solve(lin.grad, 1e-3, torch.ones_like(x))
    assert step.dtype == torch.float32 and lin.grad.dtype == torch.float32


def test_tiny_float32_network_runs_in_float64_and_keeps_its_dtype():
    model, X, y = _problem_data()
    model, X, y = model.float(), X.float(), y.float()
    problem = ModuleProblem(model, X, y)
    assert problem.dtype == DT and problem.X.dtype == DT
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    assert lin.grad.dtype == DT and type(lin.system) is AccumulatedNormalEquations
    torch.testing.assert_close(lin.system.solve(lin.grad, 1e-3, torch.ones(x.numel(), dtype=DT)),
                               _dense_step(copy.deepcopy(model).double(), X.double(), y.double(), 1e-3))
    history = fit(model, X, y, epochs=20)
    assert next(model.parameters()).dtype == torch.float32
    assert history["perf"][-1] < 0.05 * history["perf"][0]


def _general(problem):
    problem._buffered = None
    return problem


def test_buffered_problem_gives_bitwise_the_general_linearization():
    model, X, y = _problem_data(outputs=3)
    buffered, general = ModuleProblem(model, X, y), _general(ModuleProblem(model, X, y))
    assert buffered._buffered is not None
    x = flatten_parameters(model)
    for point in (x, x + 1e-2, x):  # a fresh point, then one whose forward pass is held by cost
        assert buffered.cost(point) == general.cost(point)
        a, b = buffered.linearize(point), general.linearize(point)
        assert torch.equal(a.system.gram, b.system.gram) and torch.equal(a.grad, b.grad) and a.cost == b.cost
        scale = torch.ones_like(point)
        assert torch.equal(a.system.solve(a.grad, 1e-3, scale), b.system.solve(b.grad, 1e-3, scale))
    held = buffered.linearize(x)  # a later linearization leaves an earlier one's system alone
    gram = held.system.gram.clone()
    buffered.linearize(x + 1.0)
    assert torch.equal(held.system.gram, gram)


@pytest.mark.parametrize("case, engaged", [
    ("float64", True),
    ("float32 model and data", True),  # runs in float64
    ("sigmoid", False),
    ("sample-space", False),
    ("cross-entropy", False),
    ("large", False),  # past SERIAL_MAX_ENTRIES
])
def test_buffered_path_engages_only_where_it_applies(case, engaged):
    model, X, y = _problem_data(samples=5000 if case == "large" else 25)
    options = {}
    if case == "float32 model and data":
        model, X, y = model.float(), X.float(), y.float()
    elif case == "sigmoid":
        model[1] = nn.Sigmoid()
    elif case == "sample-space":
        options["solver"] = "sample-space"
    elif case == "cross-entropy":
        y, options["loss"] = nn.functional.one_hot(y[:, 0].gt(0).long(), 2).to(DT), CrossEntropy()
    problem = ModuleProblem(model, X, y, **options)
    assert (problem._buffered is not None) is engaged
    x = flatten_parameters(model)
    lin, reference = problem.linearize(x), _general(ModuleProblem(model, X, y, **options)).linearize(x)
    torch.testing.assert_close(lin.grad, reference.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_parameters_through_numpy_equals_torch_copies(dtype):
    model, _, _ = _problem_data()
    x = torch.randn(flatten_parameters(model).numel(), dtype=DT, generator=torch.Generator().manual_seed(5))
    fast, slow = copy.deepcopy(model).to(dtype), copy.deepcopy(model).to(dtype)
    write_parameters(fast, x)
    with torch.no_grad():
        for p, value in zip(slow.parameters(), torch.split(x, [p.numel() for p in slow.parameters()])):
            p.copy_(value.view_as(p))
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), slow.parameters()))
    write_parameters(fast, torch.stack([x, x], 1)[:, 0])  # not contiguous: torch's copies
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), slow.parameters()))


# ---------------------------------------------------------------------------------------------
# memory-bounded paths never hold the whole Jacobian


class _Recorder:
    """Wraps a backend's ``chunks`` and records the bytes of every Jacobian block it yields."""

    def __init__(self, problem):
        self.sizes = []
        self.inner = problem.backend.chunks
        problem.backend.chunks = self

    def __call__(self, *args, **kwargs):
        for jac, out in self.inner(*args, **kwargs):
            self.sizes.append(jac.numel() * jac.element_size())
            yield jac, out


def test_chunked_normal_path_holds_at_most_the_budget():
    model, X, y = _problem_data(hidden=10, outputs=1, samples=400)
    n = sum(p.numel() for p in model.parameters())
    budget = 37 * n * 8  # 37 rows, far below the 400-row Jacobian
    problem = ModuleProblem(model, X, y, max_jacobian_bytes=budget)
    recorder = _Recorder(problem)
    lin = problem.linearize(flatten_parameters(model))
    assert problem.plan == Plan("normal", 37, True)
    assert max(recorder.sizes) <= budget < 400 * n * 8
    assert sum(recorder.sizes) == 400 * n * 8  # every row was seen, a block at a time
    torch.testing.assert_close(lin.grad, ModuleProblem(model, X, y).linearize(flatten_parameters(model)).grad)


@pytest.mark.parametrize("model_kind, samples", [("closed form", 160), ("torch.func", 37)])
def test_chunked_trial_cost_takes_a_bounded_chunk_of_samples(model_kind, samples):
    model, X, y = _problem_data(hidden=10, outputs=2, samples=400)
    if model_kind == "torch.func":
        model = _Wrapped(model)  # not a closed-form stack: torch.func computes its outputs
    n = sum(p.numel() for p in model.parameters())
    budget = 37 * 2 * n * 8  # 37 samples of 2 outputs a chunk of Jacobian rows
    problem = ModuleProblem(model, X, y, max_jacobian_bytes=budget)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    batches = []
    outputs = problem.backend.outputs
    problem.backend.outputs = lambda params, X_: batches.append(X_.shape[0]) or outputs(params, X_)
    assert problem.plan.form == "normal" and problem.plan.chunk_rows == 74
    assert problem.cost(x) == pytest.approx(lin.cost, rel=1e-13)
    # The closed form: budget // (2 numbers x (10 + 2) widths x 8 bytes) samples; else the Jacobian chunk.
    assert max(batches) == samples and sum(batches) == 400 and samples * 2 * 12 * 8 <= budget
    moved = x + 1e-2
    with torch.no_grad():
        expected = 0.5 * float(((model_at(model, moved)(X) - y) ** 2).sum())
    assert problem.cost(moved) == pytest.approx(expected, rel=1e-12)


class _Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.0


def model_at(model, x):
    copy_ = copy.deepcopy(model)
    write_parameters(copy_, x)
    return copy_


def test_matrix_free_path_never_forms_jacobian_rows():
    model, X, y = _problem_data(hidden=10, outputs=1, samples=400)
    problem = ModuleProblem(model, X, y, max_matrix_bytes=8)  # J^T J does not fit: matrix-free
    recorder = _Recorder(problem)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    lin.system.solve(lin.grad, 1e-2, torch.ones_like(x))
    lin.system.diagonal()
    assert problem.plan.form == "matrix-free" and lin.system.path == "cg"
    assert recorder.sizes == []


def test_matrix_free_warm_start_and_forcing_carry_over():
    model, X, y = _problem_data(hidden=10, outputs=1, samples=100)
    problem = ModuleProblem(model, X, y, solver="matrix-free")
    x = flatten_parameters(model)
    first = problem.linearize(x)
    assert first.system.initial is None and first.system.rtol == 0.5
    h = first.system.solve(first.grad, 1e-2, torch.ones_like(x))
    second = problem.linearize(x + h)
    torch.testing.assert_close(second.system.initial, h)
    assert 1e-4 <= second.system.rtol <= 0.5


# ---------------------------------------------------------------------------------------------
# fit records the path it took


@pytest.mark.parametrize("options, expected", [
    (dict(), {"cholesky"}),
    (dict(max_jacobian_bytes=7 * 8 * 31), {"chunked-cholesky"}),
    (dict(solver="sample-space"), {"sample-space"}),
    (dict(solver="matrix-free"), {"cg"}),
    (dict(max_matrix_bytes=31 * 31 * 8 - 1), {"cg"}),  # J^T J one byte past the budget
])
def test_fit_records_the_solver_path_and_reduces_the_loss(options, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)
    X = torch.linspace(-1, 1, 40, dtype=DT)[:, None]
    history = fit(model, X, torch.sin(3 * X), epochs=15, **options)
    assert set(history["solver"][1:]) == expected
    assert history["perf"][-1] < 0.1 * history["perf"][0]
    assert all(b <= a for a, b in zip(history["perf"], history["perf"][1:]))


@pytest.mark.parametrize("options, match", [
    (dict(solver="matrix-free"), r"solver='matrix-free' needs the squared-error loss; the cross_entropy loss"),
    (dict(solver="sample-space"), r"solver='sample-space' needs the squared-error loss"),
    (dict(max_matrix_bytes=45 * 45 * 8 - 1), r"needs the 45 x 45 Gauss-Newton matrix \(16,200 bytes.* "
                                             r"max_matrix_bytes=16199"),
])
def test_fit_refuses_a_form_a_cross_entropy_loss_does_not_have(options, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    X = torch.randn(30, 2, dtype=DT)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, X, torch.arange(30) % 3, loss="cross_entropy", epochs=3, **options)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    exact = fit(model, X, torch.arange(30) % 3, loss="cross_entropy", epochs=3, max_matrix_bytes=45 * 45 * 8)
    assert set(exact["solver"][1:]) == {"cholesky"}


def test_fit_refuses_a_forced_normal_form_past_max_matrix_bytes():
    # Before: solver="normal" ignored max_matrix_bytes and built the 31 x 31 J^T J anyway.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)
    X = torch.linspace(-1, 1, 40, dtype=DT)[:, None]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"solver='normal' needs the 31 x 31 matrix J\^T J \(7,688 bytes.*"
                                         r"more than max_matrix_bytes=7687; pass a larger max_matrix_bytes"):
        fit(model, X, torch.sin(3 * X), epochs=3, solver="normal", max_matrix_bytes=31 * 31 * 8 - 1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    history = fit(model, X, torch.sin(3 * X), epochs=3, solver="normal", max_matrix_bytes=31 * 31 * 8)
    assert set(history["solver"][1:]) == {"cholesky"}


@pytest.mark.parametrize("layer, match", [
    (lambda: nn.Dropout(0.2), r"submodule\(s\) '2' \(Dropout\) in training mode"),
    (lambda: nn.BatchNorm1d(6), r"submodule\(s\) '2' \(BatchNorm1d\) in training mode"),
])
@pytest.mark.parametrize("options", [dict(), dict(solver="matrix-free"), dict(max_jacobian_bytes=200)])
def test_fit_refuses_dropout_or_batch_norm_in_training_mode_before_any_work(layer, match, options):
    # Before: a RuntimeError from inside torch.func (vmap of a random mask, or of the in-place
    # running-statistics update) at the first linearization; matrix-free trained on random costs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), layer(), nn.Linear(6, 1)).to(DT)
    X = torch.linspace(-1, 1, 30, dtype=DT)[:, None]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match + r".*call model.eval\(\) first"):
        fit(model, X, torch.sin(3 * X), epochs=3, **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    history = fit(model.eval(), X, torch.sin(3 * X), epochs=3, **options)
    assert history["perf"][-1] < history["perf"][0]


def test_fit_rejects_an_unknown_solver():
    model = nn.Linear(1, 1).double()
    X = torch.zeros(3, 1, dtype=DT)
    with pytest.raises(ValueError, match="Invalid solver: 'svd'; expected 'auto' or one of"):
        fit(model, X, X, solver="svd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(PATHS))
def test_every_solver_path_runs_on_cuda_and_matches_the_cpu_step(name):
    model, X, y = _problem_data()
    options, path = PATHS[name]
    x = flatten_parameters(model)
    steps = []
    for device in ("cpu", "cuda"):
        problem = ModuleProblem(copy.deepcopy(model).to(device), X.to(device), y.to(device), **options)
        lin = problem.linearize(x.to(device))
        if path == "cg":
            lin.system.rtol, lin.system.stall_tol = 1e-13, 0.0
        steps.append(lin.system.solve(lin.grad, 1e-3, torch.ones_like(lin.grad)).cpu())
        assert lin.system.path == path
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-8, atol=1e-10)


def test_recycled_buffers_give_the_same_system_without_new_matrices():
    # fit hands each linearization's n x n buffers (J^T J, the factorization workspace) to the
    # next: the next system must be the one a fresh problem builds, bit for bit.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    X = torch.randn(300, 2, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    row_bytes = 49 * 8
    recycling = ModuleProblem(model, X, y, max_jacobian_bytes=64 * row_bytes)  # 5 chunks
    fresh = ModuleProblem(model, X, y, max_jacobian_bytes=64 * row_bytes)
    x0 = flatten_parameters(model)
    x1 = x0 + 0.01 * torch.randn_like(x0)
    first = recycling.linearize(x0)
    assert isinstance(first.system, AccumulatedNormalEquations) and first.system.chunks == 5
    first.system.solve(first.grad, 1e-2, torch.ones_like(x0))  # allocates the workspace
    gram, work = first.system.lower, first.system._work
    recycling.recycle(first)
    assert first.system.lower is None  # released: the old system holds nothing
    again, reference = recycling.linearize(x1), fresh.linearize(x1)
    assert again.system.lower.data_ptr() == gram.data_ptr() and again.system._work is work
    assert torch.equal(again.system.gram, reference.system.gram) and torch.equal(again.grad, reference.grad)
    scale = torch.ones_like(x0)
    assert torch.equal(again.system.solve(again.grad, 1e-3, scale), reference.system.solve(reference.grad, 1e-3, scale))


def test_reused_jacobian_chunks_share_one_buffer_and_equal_fresh_ones():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    X = torch.randn(300, 2, dtype=torch.float64)
    problem = ModuleProblem(model, X, torch.cos(X[:, :1]), max_jacobian_bytes=64 * 49 * 8)
    x = flatten_parameters(model)
    fresh = [(jac.clone(), r.clone()) for jac, r in problem.jacobian_chunks(x)]
    pointers = set()
    for (jac, r), (expected_jac, expected_r) in zip(problem.jacobian_chunks(x, reuse=True), fresh, strict=True):
        pointers.add(jac.data_ptr())
        assert torch.equal(jac, expected_jac) and torch.equal(r, expected_r)
    assert len(fresh) == 5 and len(pointers) == 1
    assert fresh[-1][0].shape[0] == 300 - 4 * 64  # the last chunk is the leading rows of the buffer


def test_problem_vjp_reads_the_held_jacobian_only_at_its_point():
    model, X, y = _problem_data(outputs=3)
    problem = ModuleProblem(model, X, y)
    assert problem._buffered is not None
    x = flatten_parameters(model)
    u = torch.randn(y.numel(), generator=torch.Generator().manual_seed(2), dtype=problem.dtype)
    general = problem.backend.linearize(problem.params(x), problem.X).vjp(u)
    problem.linearize(x)
    torch.testing.assert_close(problem.vjp(x, u), general, rtol=1e-12, atol=1e-12)  # from the held J
    moved = x + 1e-2
    problem.cost(moved)  # a trial's forward pass: the held J is still the one at x
    expected = problem.backend.linearize(problem.params(moved), problem.X).vjp(u)
    assert torch.equal(problem.vjp(moved, u), expected)  # another point: forward and backward passes


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("negate", [False, True])
def test_large_lapack_factors_solve_by_triangular_solves_like_potrs(monkeypatch, negate):
    n = chunked.TRIANGULAR_MIN_ORDER + 50
    matrix = _spd(n)
    lower = matrix.tril() + torch.triu(torch.full_like(matrix, 9.0), 1)  # the upper half is never read
    damped = torch.full((n,), 1e-3, dtype=torch.float64)
    rhs = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factor = chunked.cholesky_factor(lower, damped)
    assert factor.lapack
    fast = factor.solve(rhs, negate=negate)
    monkeypatch.setattr(chunked, "TRIANGULAR_MIN_ORDER", 10 * n)  # ?potrs on the same factor
    slow = factor.solve(rhs, negate=negate)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    exact = torch.linalg.solve(matrix + torch.diag(damped), rhs)
    torch.testing.assert_close(fast, -exact if negate else exact, rtol=1e-8, atol=1e-10)


def test_large_factorization_copies_only_the_lower_triangle_into_a_used_workspace():
    n = chunked.TRIANGULAR_MIN_ORDER + 30
    matrix = _spd(n, seed=2)
    damped = torch.full((n,), 1e-2, dtype=torch.float64)
    work = torch.full((n, n), float("nan"), dtype=torch.float64)  # a used workspace: NaN everywhere
    factor = chunked.cholesky_factor(matrix.tril(), damped, work)
    assert factor is not None and factor.tensor is work
    assert bool(torch.isnan(work[:512, 512:]).all())  # above the diagonal blocks: not copied, not read
    rhs = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(factor.solve(rhs), torch.linalg.solve(matrix + torch.diag(damped), rhs),
                               rtol=1e-8, atol=1e-10)
