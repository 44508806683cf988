"""fastjac: closed-form Jacobians and products of layered networks agree with torch.func (float64)."""

import pytest
import torch
from torch import nn

import marquardt
from marquardt.fastjac import (
    BufferedNetwork,
    FunctionalJacobian,
    LayeredJacobian,
    LinearizedNetwork,
    describe,
    forward,
    jacobian_backend,
)
from marquardt.mlp import MLP

DT = torch.float64


def _net(*layers):
    torch.manual_seed(0)
    return nn.Sequential(*layers).to(DT)


def _mlp(normalized: bool, outputs: int = 2, activation: str = "tanh"):
    torch.manual_seed(1)
    model = MLP(3, (6, 4), outputs, activation=activation, dtype=DT)
    if normalized:
        g = torch.Generator().manual_seed(2)
        model.set_normalization(3 * torch.randn(20, 3, generator=g, dtype=DT) + 1,
                                5 * torch.randn(20, outputs, generator=g, dtype=DT))
    return model


ARCHITECTURES = {
    "tanh 3-5-1": lambda: _net(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)),
    "tanh-sigmoid 3-5-4-2": lambda: _net(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 2)),
    "relu, no bias, nested": lambda: _net(nn.Linear(3, 5), nn.ReLU(),
                                          nn.Sequential(nn.Linear(5, 4, bias=False), nn.GELU()), nn.Linear(4, 3)),
    "leading activation, identity": lambda: _net(nn.Tanh(), nn.Linear(3, 5), nn.Identity(), nn.Softplus(),
                                                 nn.Linear(5, 2)),
    "leaky, silu+elu, output activation": lambda: _net(nn.Linear(3, 5), nn.LeakyReLU(0.1), nn.Linear(5, 5),
                                                       nn.SiLU(), nn.ELU(), nn.Linear(5, 1), nn.Sigmoid()),
    # Each written over its input, the value the derivative is taken at (two in-place ELUs in a row
    # are refused by autograd itself: the second overwrites what the first's backward reads).
    "in-place elementwise activations": lambda: _net(nn.Linear(3, 5), nn.ELU(0.5, inplace=True), nn.Linear(5, 5),
                                                     nn.SELU(inplace=True), nn.Linear(5, 5), nn.CELU(inplace=True),
                                                     nn.Linear(5, 4), nn.Mish(inplace=True),
                                                     nn.Hardswish(inplace=True), nn.Linear(4, 2),
                                                     nn.Hardsigmoid(inplace=True)),
    "linear only": lambda: _net(nn.Linear(3, 2)),
    "consecutive affine layers": lambda: _net(nn.Linear(3, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2),
                                              nn.Linear(2, 2)),
    "MLP normalized, 2 outputs": lambda: _mlp(True),
    "MLP not normalized, 1 output": lambda: _mlp(False, 1, "sigmoid"),
}


def _setup(model):
    layout = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.randn(9, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    fast = jacobian_backend(model, layout, dict(model.named_buffers()), X=X)
    slow = FunctionalJacobian(model, layout, dict(model.named_buffers()))
    return params, X, fast, slow


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_closed_form_jacobian_equals_torch_func(name):
    params, X, fast, slow = _setup(ARCHITECTURES[name]())
    assert isinstance(fast, LayeredJacobian)
    (J_fast, out_fast), = fast.chunks(params, X, 100)
    (J_slow, out_slow), = slow.chunks(params, X, 100)
    assert J_fast.shape == J_slow.shape
    torch.testing.assert_close(J_fast, J_slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_products_and_diagonal_equal_dense_jacobian(name):
    params, X, fast, slow = _setup(ARCHITECTURES[name]())
    (J, _), = slow.chunks(params, X, 100)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(J.shape[1], generator=g, dtype=DT)
    u = torch.randn(J.shape[0], generator=g, dtype=DT)
    for lin in (fast.linearize(params, X), slow.linearize(params, X)):
        torch.testing.assert_close(lin.jvp(v), J @ v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.vjp(u), J.T @ u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.gram_diagonal(), (J * J).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_equals_module(name):
    model = ARCHITECTURES[name]()
    params, X, fast, _ = _setup(model)
    # Equal up to the last bits: CPU tanh is numpy's (see fastjac._tanh), the module's torch's.
    torch.testing.assert_close(fast.outputs(params, X), model(X), rtol=4 * torch.finfo(DT).eps, atol=1e-15)


def test_chunks_cover_all_samples_in_order():
    params, X, fast, _ = _setup(ARCHITECTURES["tanh-sigmoid 3-5-4-2"]())
    (J_all, out_all), = fast.chunks(params, X, 100)
    pieces = list(fast.chunks(params, X, 4))
    assert [out.shape[0] for _, out in pieces] == [4, 4, 1]
    torch.testing.assert_close(torch.cat([j for j, _ in pieces]), J_all, rtol=0, atol=0)


class _MyLinear(nn.Linear):
    pass


class _Residual(nn.Sequential):
    """A residual block, as users write it: a Sequential whose forward adds its input."""

    def forward(self, x):
        return x + super().forward(x)


class _Doubled(nn.Identity):
    def forward(self, x):
        return 2 * x


class _ScaledGELU(nn.GELU):
    """Not elementwise: each output scaled by its sample's mean."""

    def forward(self, x):
        return super().forward(x) * x.mean(1, keepdim=True)


UNSUPPORTED = {
    "convolution": lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1)),
    "bilinear": lambda: nn.Bilinear(2, 2, 1),
    "dropout": lambda: nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1), nn.Linear(3, 1)),
    "batch norm": lambda: nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)),
    "PReLU (own parameter)": lambda: nn.Sequential(nn.Linear(2, 3), nn.PReLU(), nn.Linear(3, 1)),
    "subclass of Linear": lambda: nn.Sequential(_MyLinear(2, 3), nn.Tanh(), nn.Linear(3, 1)),
    # Subclasses with their own forward were read as what they derive from: the residual block as
    # its two layers, the doubling as nothing, the scaled GELU as elementwise.
    "nested Sequential subclass (residual block)": lambda: nn.Sequential(
        nn.Linear(2, 3), nn.Tanh(), _Residual(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 1)),
    "subclass of Identity": lambda: nn.Sequential(nn.Linear(2, 3), _Doubled(), nn.Tanh(), nn.Linear(3, 1)),
    "subclass of an elementwise activation": lambda: nn.Sequential(nn.Linear(2, 3), _ScaledGELU(),
                                                                   nn.Linear(3, 1)),
    "softmax (not elementwise)": lambda: nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=1), nn.Linear(3, 1)),
    "bare Linear (not a Sequential)": lambda: nn.Linear(2, 1),
}


class _Named(nn.Sequential):
    """A stack named by a subclass with only an ``__init__``, as users often write one."""

    def __init__(self, width: int = 5) -> None:
        super().__init__(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))


@pytest.mark.parametrize("build", [lambda: _Named(), lambda: nn.Sequential(_Named(), nn.Sigmoid(), nn.Linear(2, 1))],
                         ids=["top level", "nested"])
def test_a_sequential_subclass_that_only_names_a_stack_takes_the_closed_form(build):
    torch.manual_seed(0)
    params, X, fast, slow = _setup(build().to(DT))
    assert isinstance(fast, LayeredJacobian)
    (J_fast, out_fast), = fast.chunks(params, X, 100)
    (J_slow, out_slow), = slow.chunks(params, X, 100)
    torch.testing.assert_close(J_fast, J_slow, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_modules_fall_back_to_torch_func(name):
    model = UNSUPPORTED[name]()
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    assert describe(model, [n for n, _ in layout]) is None
    assert isinstance(jacobian_backend(model, layout), FunctionalJacobian)


@pytest.mark.parametrize("name", [name for name in UNSUPPORTED if name != "bilinear"])
def test_torch_func_rows_of_unsupported_modules_equal_the_batch_jacobian(name):
    # The reference differentiates the whole batch at once (no vmap over samples); PReLU's
    # reverse mode cannot be vmapped over samples in torch 2.x, so its rows come by forward mode.
    torch.manual_seed(0)
    model = UNSUPPORTED[name]().to(DT).eval()
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shape = (7, 1, 3) if name == "convolution" else (7, 2)
    X = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    backend = FunctionalJacobian(model, layout, dict(model.named_buffers()))
    rows, outputs = zip(*backend.chunks(params, X, 3))
    dense = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    m = model(X).numel()
    expected = torch.cat([dense[n].reshape(m, -1) for n, _ in layout], dim=1)
    torch.testing.assert_close(torch.cat(rows), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(outputs), model(X).detach(), rtol=0, atol=0)
    assert backend.forward_mode == name.startswith("PReLU")


class _Recurrent(nn.Module):
    """The last step's state of a recurrent layer, mapped to two outputs."""

    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn, self.out = cell(2, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_torch_func_rows_of_recurrent_layers_equal_the_batch_jacobian(cell):
    # torch 2.13's vmap cannot run nn.RNN or nn.GRU over samples, in either mode (an in-place
    # update of the unbatched initial state): a RuntimeError at the first linearization. Their
    # rows come one sample at a time.
    torch.manual_seed(0)
    model = _Recurrent(cell).to(DT)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    rows, outputs = zip(*FunctionalJacobian(model, layout).chunks(params, X, 3))
    dense = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    expected = torch.cat([dense[n].reshape(10, -1) for n, _ in layout], dim=1)
    torch.testing.assert_close(torch.cat(rows), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(outputs), model(X).detach(), rtol=0, atol=1e-15)


def test_jacobian_products_of_a_float32_lstm_without_forward_mode():
    # CPU float32 nn.LSTM runs mkldnn_rnn_layer, which has no forward-mode derivative: J v raised
    # NotImplementedError, and fit's matrix-free form with it. J v is then the transpose of J^T u.
    torch.manual_seed(0)
    model = _Recurrent(nn.LSTM)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(3))
    dense = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    J = torch.cat([dense[n].reshape(10, -1) for n, _ in layout], dim=1)
    v = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(4))
    lin = FunctionalJacobian(model, layout).linearize(params, X)
    for _ in range(2):  # the second from the kept transpose
        torch.testing.assert_close(lin.jvp(v), J @ v, rtol=1e-5, atol=1e-6)


def test_rows_of_a_random_forward_are_refused_not_formed_one_sample_at_a_time():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def forward(self, x):
            return torch.nn.functional.dropout(self.layer(x), 0.5, training=True)

    model = Noisy().to(DT)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    backend = FunctionalJacobian(model, layout)
    with pytest.raises(RuntimeError, match="vmap: called random operation"):
        next(backend.chunks({n: p.detach() for n, p in model.named_parameters()}, torch.ones(4, 2, dtype=DT), 2))
    assert not backend.sample_loop


def test_forward_mode_fallback_still_raises_a_module_error():
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    backend = FunctionalJacobian(model, layout)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        next(backend.chunks({n: p.detach() for n, p in model.named_parameters()}, torch.zeros(4, 5, dtype=DT), 2))


def test_frozen_layer_falls_back():
    model = _net(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert describe(model, trainable) is None


def test_inputs_with_more_than_two_dimensions_fall_back():
    model = _net(nn.Linear(3, 2))
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    assert jacobian_backend(model, layout, X=torch.zeros(4, 5, 3, dtype=DT)).name == "torch.func"
    assert jacobian_backend(model, layout, X=torch.zeros(4, 3, dtype=DT)).name == "closed-form"


def test_mlp_description_maps_inputs_and_scales_outputs():
    model = _mlp(True)
    spec = describe(model, [n for n, _ in model.named_parameters()])
    assert spec.parameter_names == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias",
                                    "net.4.weight", "net.4.bias"]
    X = torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(forward(spec, dict(model.named_parameters()), X), model(X))
    torch.testing.assert_close(spec.output_scale, (model.y_max - model.y_min) / 2)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_row_gram_equals_j_j_transpose(name):
    params, X, fast, slow = _setup(ARCHITECTURES[name]())
    (J, _), = slow.chunks(params, X, 100)
    torch.testing.assert_close(fast.linearize(params, X).row_gram(), J @ J.T, rtol=1e-12, atol=1e-12)


def test_row_gram_in_a_wider_dtype():
    model = ARCHITECTURES["tanh-sigmoid 3-5-4-2"]().float()
    params = {n: p.detach() for n, p in model.named_parameters()}
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    X = torch.randn(6, 3)
    lin = jacobian_backend(model, layout, X=X).linearize(params, X)
    gram = lin.row_gram(DT)
    assert gram.dtype == DT
    (J, _), = FunctionalJacobian(model, layout).chunks(params, X, 10)
    torch.testing.assert_close(gram, J.double() @ J.double().T, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the fast paths: numpy tanh, lazy slopes, in-place activation of the affine output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_tanh_matches_torch_to_rounding(dtype):
    from marquardt.fastjac import _tanh, _tanh_

    z = torch.randn(50, 7, generator=torch.Generator().manual_seed(5), dtype=dtype) * 3
    expected = torch.tanh(z)
    torch.testing.assert_close(_tanh(z), expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
    copy = z.clone()
    assert _tanh_(copy) is copy  # numpy wrote over it
    torch.testing.assert_close(copy, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("case", ["requires_grad", "strided", "float16"])
def test_tanh_falls_back_to_torch_where_numpy_does_not_apply(case):
    from marquardt.fastjac import _tanh, _tanh_

    z = torch.randn(6, 4, dtype=torch.float64)
    if case == "requires_grad":
        z.requires_grad_(True)
        out = _tanh_(z)
        out.sum().backward()  # autograd still works: no in-place numpy write on a graph input
        torch.testing.assert_close(z.grad, 1 - torch.tanh(z.detach()) ** 2)
        return
    if case == "strided":
        z = z.T
    else:
        z = z.half()
    before = z.clone()
    torch.testing.assert_close(_tanh_(z), torch.tanh(before))
    torch.testing.assert_close(_tanh(z), torch.tanh(before))
    assert torch.equal(z, before)  # not overwritten when numpy does not apply


def test_slopes_are_formed_only_when_a_derivative_is_asked_for():
    model = ARCHITECTURES["leaky, silu+elu, output activation"]()
    params, X, fast, slow = _setup(model)
    lin = fast.linearize(params, X)
    assert lin._slopes is None  # a cost evaluation needs outputs only
    torch.testing.assert_close(lin.outputs, model(X))
    (J_slow, _), = slow.chunks(params, X, 100)
    torch.testing.assert_close(lin.jacobian(), J_slow, rtol=1e-13, atol=1e-13)
    assert lin._slopes is not None and lin._pending == []


def test_forward_leaves_the_inputs_untouched():
    # A leading Tanh maps the data (out of place); the first layer's tanh overwrites only its own output.
    model = ARCHITECTURES["leading activation, identity"]()
    params, X, fast, _ = _setup(model)
    before = X.clone()
    fast.outputs(params, X)
    fast.linearize(params, X).jacobian()
    assert torch.equal(X, before)


# ---------------------------------------------------------------------------------------------
# BufferedNetwork: the same outputs and J as LinearizedNetwork, to the last bit

BUFFERED = {
    "tanh 1-20-1": lambda: _net(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)),
    "tanh 3-5-4-2, 2 outputs": lambda: _net(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)),
    "no bias, tanh output, 3 outputs": lambda: _net(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 3),
                                                    nn.Tanh()),
    "consecutive affine layers": ARCHITECTURES["consecutive affine layers"],
    "linear only": ARCHITECTURES["linear only"],
    # the deltas stay shared by all samples across two affine layers, from a 1 x 1 head
    "1 output after consecutive affine layers": lambda: _net(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3),
                                                             nn.Linear(3, 1)),
}


@pytest.mark.parametrize("name", list(BUFFERED))
def test_buffered_network_equals_the_linearized_network_bitwise(name):
    model = BUFFERED[name]()
    params, X, fast, _ = _setup(model) if name != "tanh 1-20-1" else _setup_one_input(model)
    buffered = BufferedNetwork(fast.network, fast.layout, X)
    x = torch.cat([params[n].reshape(-1) for n, _ in fast.layout])
    reference = LinearizedNetwork(fast.network, params, X, fast.layout)
    assert torch.equal(buffered.forward(x), reference.outputs)
    assert torch.equal(buffered.jacobian(), reference.jacobian())
    assert buffered.holds(x) and not buffered.holds(x + 1e-3)
    moved = x + 1e-3
    buffered.forward(moved)  # the buffers follow the last point
    assert torch.equal(buffered.jacobian(), LinearizedNetwork(fast.network, _pieces(moved, params), X,
                                                             fast.layout).jacobian())
    assert not torch.equal(buffered.outputs, reference.outputs) and not buffered.holds(x)


def test_buffered_network_knows_its_last_point_by_object_until_written_in_place():
    model = BUFFERED["tanh 1-20-1"]()
    params, X, fast, _ = _setup_one_input(model)
    buffered = BufferedNetwork(fast.network, fast.layout, X)
    x = torch.cat([params[n].reshape(-1) for n, _ in fast.layout])
    buffered.forward(x)
    assert buffered.holds(x) and buffered.holds(x.clone())  # the object, or equal values
    x.add_(1e-3)  # the same object, written in place: its version moved, the buffers did not
    assert not buffered.holds(x)
    x.sub_(1e-3)  # back to values equal to the buffers' (up to rounding, so compare them)
    assert buffered.holds(x) is torch.equal(buffered.point, x)


def _pieces(x, like):
    pieces, start = {}, 0
    for name, value in like.items():
        pieces[name] = x[start : start + value.numel()].view(value.shape)
        start += value.numel()
    return pieces


def _setup_one_input(model):
    layout = [(n, p.numel()) for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.linspace(-3, 3, 50, dtype=DT)[:, None]
    return params, X, jacobian_backend(model, layout, X=X), None


@pytest.mark.parametrize("name, X, supported", [
    ("tanh 3-5-1", torch.zeros(4, 3, dtype=DT), True),
    ("tanh 3-5-1", torch.zeros(4, 3, dtype=torch.float32), False),  # float64 only
    ("tanh-sigmoid 3-5-4-2", torch.zeros(4, 3, dtype=DT), False),  # tanh or nothing
    ("leading activation, identity", torch.zeros(4, 3, dtype=DT), False),  # no input map
    ("MLP normalized, 2 outputs", torch.zeros(4, 3, dtype=DT), False),  # no data maps
    ("MLP not normalized, 1 output", torch.zeros(4, 3, dtype=DT), False),
])
def test_buffered_network_supports_table(name, X, supported):
    model = ARCHITECTURES[name]()
    spec = describe(model, [n for n, _ in model.named_parameters()])
    assert BufferedNetwork.supports(spec, X) is supported
    if not supported:
        with pytest.raises(ValueError, match="tanh or no activation"):
            BufferedNetwork(spec, [(n, p.numel()) for n, p in model.named_parameters()], X)


def _hooked(kind):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    if kind == "forward hook":
        net[2].register_forward_hook(lambda module, args, out: out + 0.5)
    elif kind == "forward pre-hook":
        net[2].register_forward_pre_hook(lambda module, args: (2 * args[0],))
    elif kind == "forward set on the instance":
        net[1].forward = lambda z: torch.tanh(2 * z)
    return net


@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook", "forward set on the instance"])
def test_fit_trains_what_model_computes_when_hooks_change_it(kind):
    # The closed form described the hookless stack: with a hook adding 0.5 to the outputs, fit
    # recorded an MSE of 2.7e-7 for a model whose model(X) was 0.25 off. Such a model now takes
    # the torch.func path, which calls the module (its hooks included).
    X = torch.linspace(-3, 3, 100, dtype=torch.float64)[:, None]
    y = torch.sin(X)
    net = _hooked(kind)
    assert describe(net, [name for name, _ in net.named_parameters()]) is None
    history = marquardt.fit(net, X, y, epochs=30)
    with torch.no_grad():
        actual = float(((net(X) - y) ** 2).mean())
    assert history["perf"][-1] == pytest.approx(actual, rel=1e-10)
    assert actual < 1e-3


def test_a_global_forward_hook_leaves_the_closed_form():
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    names = [name for name, _ in net.named_parameters()]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert describe(net, names) is None
    finally:
        handle.remove()
    assert describe(net, names) is not None


def _tied_module():
    torch.manual_seed(4)
    shared = nn.Linear(3, 3)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(3, 1)).to(DT)


def _tied_parameter():
    torch.manual_seed(5)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), first, nn.Tanh(), second, nn.Linear(3, 1)).to(DT)


@pytest.mark.parametrize("make", [_tied_module, _tied_parameter])
def test_torch_func_backend_shares_weights_and_leaves_the_module_as_it_was(make):
    # torch.func.functional_call ties weights by name: a layer applied twice was swapped in and
    # out once per name, the outputs came from the wrong weights and the layer was left holding
    # plain tensors without requires_grad (fit then failed with a shape error).
    model = make()
    named = list(model.named_parameters())
    before = [(id(p), p.detach().clone()) for _, p in named]
    layout = [(name, p.numel()) for name, p in named]
    backend = jacobian_backend(model, layout, dict(model.named_buffers()))
    assert isinstance(backend, FunctionalJacobian)
    X = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    params = {name: 2 * p.detach() for name, p in named}
    (J, outputs), = backend.chunks(params, X, 100)
    assert [(id(p), type(p), p.requires_grad) for _, p in model.named_parameters()] == \
        [(i, nn.Parameter, True) for i, _ in before]
    assert all(torch.equal(p, value) for (_, p), (_, value) in zip(model.named_parameters(), before))
    # The reference: the same network with its weights doubled, differentiated by autograd.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    expected = model(X)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, model.parameters(), retain_graph=True)])
            for out in expected.reshape(-1)]
    torch.testing.assert_close(outputs, expected.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(J, torch.stack(rows), rtol=1e-12, atol=1e-12)


def test_fit_trains_a_network_that_applies_one_layer_twice():
    X = torch.linspace(-3, 3, 100, dtype=DT)[:, None]
    y = torch.sin(X)
    torch.manual_seed(3)
    shared = nn.Linear(1, 1)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1), nn.Tanh(), shared, nn.Tanh(), shared).to(DT)
    history = marquardt.fit(net, X, y, epochs=30)
    with torch.no_grad():
        actual = float(((net(X) - y) ** 2).mean())
    assert history["perf"][-1] == pytest.approx(actual, rel=1e-10)
    assert actual < 1e-4
    assert all(type(p) is nn.Parameter and p.requires_grad for p in net.parameters())
