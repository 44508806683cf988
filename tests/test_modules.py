"""Users' own modules through fit and LevenbergMarquardt: in-place activations, batch norm, ..."""

import copy

import pytest
import torch
from torch import nn

import marquardt

DT = torch.float64


def _sine(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.linspace(-2, 2, n, dtype=DT)[:, None]
    return X, torch.sin(3 * X)


@pytest.mark.parametrize("activation", [nn.ELU, nn.SELU, nn.Mish])
def test_fit_with_an_in_place_activation_takes_the_steps_of_the_out_of_place_one(activation):
    # The closed-form slope was taken at the activation's output, written over its input:
    # ELU(inplace=True) ended at MSE 0.065 where ELU() reaches 3.9e-4.
    X, y = _sine()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), activation(), nn.Linear(10, 1)).to(DT)
    in_place = copy.deepcopy(model)
    in_place[1].inplace = True
    reference = marquardt.fit(model, X, y, epochs=30, progress=False)
    history = marquardt.fit(in_place, X, y, epochs=30, progress=False)
    torch.testing.assert_close(history["perf"], reference["perf"], rtol=1e-9, atol=0)
    assert history["perf"][-1] < 0.05 * history["perf"][0]


def _conv_net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(24, 1)).to(DT)


def _signals() -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(40, 2, 10, generator=torch.Generator().manual_seed(1), dtype=DT)
    return X, X.mean((1, 2))[:, None]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("options", [dict(), dict(solver="matrix-free")])
def test_fit_refuses_batch_norm_on_batch_statistics_before_any_work(mode, options):
    # track_running_stats=False normalizes by the batch's statistics in eval mode too: each output
    # depends on every sample, and the per-sample Jacobian rows (the batch norm of one sample)
    # are not its derivatives. Before, LM stopped on "Maximum MU reached." at MSE 0.017.
    model = _conv_net(nn.BatchNorm1d(3, track_running_stats=False)).train(mode == "train")
    X, y = _signals()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"submodule\(s\) '1' \(BatchNorm1d\) normalize by the statistics of "
                                         r"the batch \(track_running_stats=False\).*nn.LayerNorm"):
        marquardt.fit(model, X, y, epochs=3, progress=False, **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training == (mode == "train")


def test_fit_refuses_instance_norm_updating_running_statistics_and_leaves_them_alone():
    # InstanceNorm1d(track_running_stats=True) in training mode moves its running statistics at
    # every call: before, the start's two forward passes moved them, then torch.func's vmap
    # failed with a RuntimeError about batched running statistics.
    model = _conv_net(nn.InstanceNorm1d(3, affine=True, track_running_stats=True))
    X, y = _signals()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"submodule\(s\) '1' \(InstanceNorm1d\) in training mode.*model.eval"):
        marquardt.fit(model, X, y, epochs=3, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    history = marquardt.fit(model.eval(), X, y, epochs=3, progress=False)
    assert history["perf"][-1] < history["perf"][0]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if "running" in k)


class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def test_fit_records_the_performance_of_a_residual_block_that_model_computes():
    # A Sequential subclass nested in a Sequential was read as its layers, without its skip
    # connection: fit trained that other network and recorded MSE 0.011 for a model whose
    # model(X) was 0.44 off.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _Residual(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1)).to(DT)
    X = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    history = marquardt.fit(model, X, y, epochs=5, progress=False)
    with torch.no_grad():
        mse = float(((model(X) - y) ** 2).mean())
    assert history["perf"][-1] == pytest.approx(mse, rel=1e-12)
    assert history["perf"][-1] < 0.5 * history["perf"][0]


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU])
def test_fit_trains_a_recurrent_network(cell):
    # Before: RuntimeError "output with shape [1, 4] doesn't match the broadcast shape [30, 1, 4]"
    # from inside torch.func at the first epoch (vmap of nn.RNN/nn.GRU over samples).
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = cell(2, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent().to(DT)
    X = torch.randn(30, 5, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.tanh(X.sum((1, 2)))[:, None]
    history = marquardt.fit(model, X, y, epochs=5, progress=False)
    assert history["perf"][-1] < 0.5 * history["perf"][0]
    with torch.no_grad():
        assert history["perf"][-1] == pytest.approx(float(((model(X) - y) ** 2).mean()), rel=1e-12)


def test_fit_trains_a_float32_lstm_in_the_matrix_free_form():
    # Before: NotImplementedError "Trying to use forward AD with mkldnn_rnn_layer" at the first
    # epoch (J v of CPU float32 nn.LSTM), in the form "auto" takes past max_matrix_bytes.
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(2, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent()
    X = torch.randn(30, 5, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tanh(X.sum((1, 2)))[:, None]
    history = marquardt.fit(model, X, y, epochs=5, solver="matrix-free", progress=False)
    assert history["perf"][-1] < 0.5 * history["perf"][0]
    assert set(history["solver"][1:]) == {"cg"}


class _Centered(nn.Module):
    """Centers each batch by its own mean in forward: the outputs of one sample depend on the others."""

    def __init__(self, scale: bool):
        super().__init__()
        self.net, self.scale = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), scale

    def forward(self, x):
        x = x - x.mean(0)
        return self.net(x / x.std(0) if self.scale else x)


@pytest.mark.filterwarnings(r"ignore:std\(\)")  # the std of one sample, taken by the check
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(solver="matrix-free")])
def test_fit_refuses_a_forward_that_mixes_the_samples_before_any_work(scale, options):
    # The per-sample Jacobian rows differentiate each sample alone, where x - x.mean(0) is zero:
    # LM stopped on "Maximum MU reached." at its starting MSE, and with x.std(0) (NaN for one
    # sample) blamed the initial weights for a cost that is not finite.
    torch.manual_seed(1)
    model = _Centered(scale).to(DT)
    X = 3 * torch.randn(60, 3, generator=torch.Generator().manual_seed(0), dtype=DT) + 1
    y = torch.sin(X.sum(1, keepdim=True))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model\(X\) mixes the samples: the outputs of sample 0 computed alone "
                                         r"differ from its outputs in a batch of 8 \(largest difference .*"
                                         r"first-order method"):
        marquardt.fit(model, X, y, epochs=3, progress=False, **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    history = marquardt.fit(model, X, y, epochs=3, method="momentum", progress=False)
    assert history["perf"][-1] < history["perf"][0]
