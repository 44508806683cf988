"""The Kronecker-structured J^T J of layered networks (marquardt.kronecker) against J^T J itself."""

import math

import pytest
import torch
from torch import nn

from marquardt import MLP, fit, kronecker
from marquardt.chunked import accumulation_dtype
from marquardt.fastjac import LinearizedNetwork, describe
from marquardt.kronecker import LayerGram
from marquardt.network import ModuleProblem, flatten_parameters

DT = torch.float64


def _network(widths, seed=0, dtype=DT):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _linearized(model, X):
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    spec = describe(model, [n for n, _ in layout])
    params = {n: p.detach() for n, p in model.named_parameters()}
    return spec, layout, LinearizedNetwork(spec, params, X, layout)


def _residuals(lin):
    return torch.cos(torch.arange(lin.outputs.numel(), dtype=lin.outputs.dtype))


def _folded(gram_plan, lin, n, parts=1, out=None):
    """``(J^T J, J^T r)`` by ``gram_plan`` with the rows folded in ``parts`` chunks into ``out``
    (cleared first) or a new matrix."""
    if out is None:
        out = torch.zeros(n, n, dtype=DT)
    else:
        gram_plan.clear(out)
    grad = torch.zeros(n, dtype=DT)
    r = _residuals(lin)
    samples, per_sample = lin.X.shape[0], lin.outputs.shape[1]
    bounds = [round(i * samples / parts) for i in range(parts + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        part = LinearizedNetwork(lin.network, lin.params, lin.X[start:stop], lin.layout)
        gram_plan.fold(out, grad, part.jacobian(), r[start * per_sample:stop * per_sample], part)
    gram_plan.finish(out)
    return out, grad


CASES = {  # widths, which layers are large enough (min_columns=32, min_width=4)
    "middle layer": ((1, 12, 12, 1), [False, True, False]),
    "first layer": ((9, 10, 1), [True, False]),
    "two large layers in a row": ((2, 8, 8, 8, 4), [False, True, True, True]),
    "several outputs": ((2, 6, 6, 5), [False, True, True]),
}


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("low_thresholds")
def test_lower_triangle_equals_the_product_of_the_rows(name, parts):
    widths, kron = CASES[name]
    model = _network(widths)
    X = torch.randn(40, widths[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    spec, layout, lin = _linearized(model, X)
    plan = LayerGram.plan(spec, layout, DT, "cpu", min_width=4, min_columns=32)
    assert [block.kron for block in plan.blocks] == kron
    J = lin.jacobian()
    expected = (J.T @ J).tril()
    gram, grad = _folded(plan, lin, J.shape[1], parts)
    torch.testing.assert_close(gram.tril(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, J.T @ _residuals(lin), rtol=1e-12, atol=1e-12)
    # A reused matrix full of old values: clear and finish leave no trace of them, and the
    # Kronecker sums were reset by the last finish.
    used = torch.full_like(gram, 7.0)
    torch.testing.assert_close(_folded(plan, lin, J.shape[1], out=used)[0].tril(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("low_thresholds")
def test_factors_formed_a_slice_of_rows_at_a_time_give_the_same_sums(monkeypatch):
    model = _network((1, 12, 12, 1))
    X = torch.linspace(-2, 2, 50, dtype=DT)[:, None]
    spec, layout, lin = _linearized(model, X)
    plan = LayerGram.plan(spec, layout, DT, "cpu", min_width=4, min_columns=32)
    whole = _folded(plan, lin, lin.n_params)[0]
    monkeypatch.setattr(kronecker, "FACTOR_BYTES", 7 * 8 * (78 + 91))  # 7 rows of U and V at a time
    sliced = _folded(plan, lin, lin.n_params)[0]
    torch.testing.assert_close(sliced.tril(), whole.tril(), rtol=1e-13, atol=1e-13)


@pytest.mark.usefixtures("low_thresholds")
def test_float32_gram_is_as_accurate_as_the_float32_product():
    model = _network((1, 16, 16, 1), dtype=torch.float32)
    X = torch.linspace(-3, 3, 500)[:, None]
    spec, layout, lin = _linearized(model, X)
    J = lin.jacobian()
    exact = (J.double().T @ J.double()).tril()
    plan = LayerGram.plan(spec, layout, torch.float32, "cpu", min_width=4, min_columns=32)
    out = torch.zeros(J.shape[1], J.shape[1])
    plan.fold(out, torch.zeros(J.shape[1]), J, torch.zeros(J.shape[0]), lin)
    plan.finish(out)
    scale = float(exact.abs().max())
    ours = float((out.tril().double() - exact).abs().max()) / scale
    product = float(((J.T @ J).tril().double() - exact).abs().max()) / scale
    assert ours < 1e-6 and ours < 10 * product


@pytest.mark.parametrize("case", ["tiny layers", "no bias", "shuffled layout", "cuda", "float16"])
@pytest.mark.usefixtures("low_thresholds")
def test_plan_is_none_where_it_does_not_apply(case):
    widths = (1, 3, 3, 1) if case == "tiny layers" else (1, 12, 12, 1)
    model = _network(widths)
    if case == "no bias":
        model[2] = nn.Linear(12, 12, bias=False).to(DT)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    spec = describe(model, [n for n, _ in layout])
    if case == "shuffled layout":
        layout = layout[2:] + layout[:2]
    device = "cuda" if case == "cuda" else "cpu"
    dtype = torch.float16 if case == "float16" else DT
    assert LayerGram.plan(spec, layout, dtype, device, min_width=4, min_columns=32) is None


def test_default_thresholds_take_the_benchmark_layer_and_leave_small_ones():
    spec_of = lambda widths: describe(_network(widths), [n for n, _ in _network(widths).named_parameters()])
    layout_of = lambda widths: [(n, p.numel()) for n, p in _network(widths).named_parameters()]
    plan = LayerGram.plan(spec_of((1, 64, 64, 1)), layout_of((1, 64, 64, 1)), torch.float32, "cpu")
    assert [block.kron for block in plan.blocks] == [False, True, False]
    assert LayerGram.plan(spec_of((1, 20, 1)), layout_of((1, 20, 1)), torch.float64, "cpu") is None
    assert LayerGram.plan(spec_of((1, 24, 24, 1)), layout_of((1, 24, 24, 1)), torch.float32, "cpu") is None
    model, X, y, problem = _wide_problem()  # 20-wide layers: below the default thresholds
    assert problem._layer_gram is None


# ---------------------------------------------------------------------------------------------
# in the problem and in fit


@pytest.fixture
def low_thresholds(monkeypatch):
    """Structured J^T J from 8-wide layers of 256 columns on, whatever it costs: small problems
    take it too."""
    monkeypatch.setattr(kronecker, "KRON_MIN_WIDTH", 8)
    monkeypatch.setattr(kronecker, "KRON_MIN_COLUMNS", 256)
    monkeypatch.setattr(kronecker, "KRON_MAX_WORK", math.inf)
    monkeypatch.setattr(kronecker, "KRON_MAX_SMALL", math.inf)


def _wide_problem(**options):
    model = _network((2, 20, 20, 2))  # the 20 x 21 middle block: 420 columns
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 2, generator=g, dtype=DT)
    y = torch.stack([torch.sin(X[:, 0]) * X[:, 1], torch.cos(X.sum(1))], 1)
    return model, X, y, ModuleProblem(model, X, y, **options)


@pytest.mark.parametrize("options", [{}, {"max_jacobian_bytes": 120 * 522 * 8}])  # 60 samples a chunk
@pytest.mark.usefixtures("low_thresholds")
def test_problem_system_equals_the_syrk_system(options):
    model, X, y, problem = _wide_problem(**options)
    assert problem._layer_gram is not None
    x = flatten_parameters(model)
    structured = problem.linearize(x)
    plain = ModuleProblem(model, X, y, **options)
    plain._layer_gram = None
    reference = plain.linearize(x)
    assert structured.system.name == reference.system.name
    assert structured.system.name == ("chunked-cholesky" if options else "cholesky")
    torch.testing.assert_close(structured.system.gram, reference.system.gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(structured.grad, reference.grad, rtol=1e-12, atol=1e-13)
    ones = torch.ones_like(x)
    torch.testing.assert_close(structured.system.solve(structured.grad, 1e-3, ones),
                               reference.system.solve(reference.grad, 1e-3, ones), rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("low_thresholds")
def test_jacobian_chunks_pass_each_chunks_linearization_only_when_asked():
    model, X, y, problem = _wide_problem(max_jacobian_bytes=120 * 522 * 8)
    x = flatten_parameters(model)
    plain = list(problem.jacobian_chunks(x))
    assert all(len(chunk) == 2 for chunk in plain) and len(plain) == 5
    with_lin = list(problem.jacobian_chunks(x, linearizations=True))
    assert [lin.X.shape[0] for _, _, lin in with_lin] == [60] * 5


@pytest.mark.usefixtures("low_thresholds")
def test_fit_with_the_structured_gram_follows_the_syrk_run(monkeypatch):
    model, X, y, problem = _wide_problem()
    assert problem._layer_gram is not None
    structured = fit(model, X, y, epochs=10, progress=False)
    model, X, y, _ = _wide_problem()
    monkeypatch.setattr(LayerGram, "plan", classmethod(lambda cls, *args, **kwargs: None))
    plain = fit(model, X, y, epochs=10, progress=False)
    assert structured["damping"] == plain["damping"]
    # The same steps to rounding (J^T J agrees to ~1e-15 relative; LM amplifies it to ~1e-8 here).
    assert structured["perf"] == pytest.approx(plain["perf"], rel=1e-6)
    assert structured["perf"][-1] < 0.2 * structured["perf"][0]


@pytest.mark.usefixtures("low_thresholds")
def test_mlp_with_normalization_maps_takes_the_structured_gram():
    torch.manual_seed(0)
    model = MLP(2, [20, 20], 1).double()
    X = torch.randn(600, 2, dtype=DT) * 5 + 3  # more samples than the 501 parameters: normal form
    y = X[:, :1] * X[:, 1:]
    history = fit(model, X, y, epochs=3, progress=False)  # sets the input and output maps
    assert history["perf"][-1] < history["perf"][0]
    structured = ModuleProblem(model, X, y)
    plain = ModuleProblem(model, X, y)
    plain._layer_gram = None
    assert structured._layer_gram is not None
    x = flatten_parameters(model)
    torch.testing.assert_close(structured.linearize(x).system.gram, plain.linearize(x).system.gram,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("low_thresholds")
def test_float32_problem_takes_the_structured_gram_in_its_accumulation_dtype():
    model, X, y, _ = _wide_problem()
    model, X, y = model.float(), X.float(), y.float()
    structured = ModuleProblem(model, X, y)
    plain = ModuleProblem(model, X, y)
    plain._layer_gram = None
    assert structured._layer_gram is not None and structured._layer_gram.dtype == accumulation_dtype(torch.float32, structured.n_params)
    x = flatten_parameters(model)
    a, b = structured.linearize(x), plain.linearize(x)
    assert a.grad.dtype == b.grad.dtype == torch.float32
    torch.testing.assert_close(a.system.gram, b.system.gram, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("low_thresholds")
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_structured_step_equals_the_dense_cholesky_step_of_torch_func_rows(damping):
    from marquardt.fastjac import FunctionalJacobian
    from marquardt.linalg import NormalEquations

    model, X, y, problem = _wide_problem(max_jacobian_bytes=120 * 522 * 8)
    x = flatten_parameters(model)
    lin = problem.linearize(x)
    assert problem._layer_gram is not None and lin.system.name == "chunked-cholesky"
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    (J, out), = FunctionalJacobian(model, layout).chunks(params, X, X.shape[0])
    r = (out - y).reshape(-1)
    dense = NormalEquations(J.T @ J, J, r).solve(J.T @ r, damping, torch.ones(J.shape[1], dtype=DT))
    torch.testing.assert_close(lin.system.solve(lin.grad, damping, torch.ones_like(x)), dense, rtol=1e-7, atol=1e-10)


def test_plan_is_none_where_the_small_layers_hold_most_columns():
    # 200-20-32-32-1: the 32 x 33 layer qualifies, but J^T J_small alone (n = 5,781, 4,725 small
    # columns) costs more than ?syrk: measured 1.0-1.3 s against 0.6-0.7 s a linearization.
    model = _network((200, 20, 32, 32, 1), dtype=torch.float32)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    spec = describe(model, [n for n, _ in layout])
    assert LayerGram.plan(spec, layout, torch.float32, "cpu") is None
    assert not kronecker._pays([kronecker._Block(0, 4020, 0, 20, 200, False),
                                kronecker._Block(4020, 4692, 1, 32, 20, False),
                                kronecker._Block(4692, 5748, 2, 32, 32, True),
                                kronecker._Block(5748, 5781, 3, 1, 32, False)], 5781)


@pytest.mark.usefixtures("low_thresholds")
def test_a_linearization_interrupted_between_chunks_leaves_no_trace_in_the_next(monkeypatch):
    # Before: the Kronecker sums of the chunks folded before the interruption were added to the
    # next linearization's (relative error 1.8e-3 in J^T J; the optimizer keeps its problem
    # across an exception in step()).
    from marquardt.fastjac import LayeredJacobian

    model, X, y, structured = _wide_problem(max_jacobian_bytes=120 * 522 * 8)  # 5 chunks
    plain = ModuleProblem(model, X, y, max_jacobian_bytes=120 * 522 * 8)
    plain._layer_gram = None
    x = flatten_parameters(model)
    chunks = LayeredJacobian.chunks

    def interrupted(self, *args, **kwargs):
        for index, chunk in enumerate(chunks(self, *args, **kwargs)):
            if index == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(LayeredJacobian, "chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        structured.linearize(x)
    monkeypatch.setattr(LayeredJacobian, "chunks", chunks)
    for _ in range(2):
        torch.testing.assert_close(structured.linearize(x).system.gram, plain.linearize(x).system.gram,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("low_thresholds")
def test_no_chunk_folded_leaves_zeros_in_a_reused_matrix():
    model = _network((1, 16, 16, 1))
    spec, layout, lin = _linearized(model, torch.zeros(3, 1, dtype=DT))
    plan = LayerGram.plan(spec, layout, DT, "cpu")
    used = torch.full((lin.n_params, lin.n_params), 7.0, dtype=DT)
    plan.clear(used)
    plan.finish(used)
    assert bool((used.tril() == 0).all())


def _classifier(loss, seed=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                          nn.Linear(20, 3 if loss == "cross_entropy" else 2)).to(DT)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, 3, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # three classes
    else:
        y = torch.stack([X[:, 0] > 0, X[:, 1] * X[:, 2] > 0], 1).to(DT)
    return model, X, y


@pytest.mark.usefixtures("low_thresholds")
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy"])
@pytest.mark.parametrize("options", [{}, {"max_jacobian_bytes": 90 * 505 * 8}])
def test_classification_gauss_newton_matrix_equals_the_block_products(loss, options):
    from marquardt.losses import make_loss

    model, X, y = _classifier(loss)
    targets = make_loss(loss).targets(y, tuple(model(X[:2]).shape), "y")
    structured = ModuleProblem(model, X, targets, loss=make_loss(loss), **options)
    plain = ModuleProblem(model, X, targets, loss=make_loss(loss), **options)
    plain._layer_gram = None
    assert structured._layer_gram is not None and [b.kron for b in structured._layer_gram.blocks] == [False, True, False]
    x = flatten_parameters(model)
    a, b = structured.linearize(x), plain.linearize(x)
    torch.testing.assert_close(a.system.gram, b.system.gram, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-13)
    assert a.cost == pytest.approx(b.cost, rel=1e-13)


@pytest.mark.usefixtures("low_thresholds")
def test_fit_with_cross_entropy_follows_the_block_product_run(monkeypatch):
    model, X, y = _classifier("cross_entropy")
    structured = fit(model, X, y, loss="cross_entropy", epochs=8, progress=False)
    model, X, y = _classifier("cross_entropy")
    monkeypatch.setattr(LayerGram, "plan", classmethod(lambda cls, *args, **kwargs: None))
    plain = fit(model, X, y, loss="cross_entropy", epochs=8, progress=False)
    assert structured["damping"] == plain["damping"]
    assert structured["perf"] == pytest.approx(plain["perf"], rel=1e-8)
    assert structured["perf"][-1] < 0.5 * structured["perf"][0]
