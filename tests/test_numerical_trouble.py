"""fit() under numerical trouble: non-finite Jacobians at accepted points, non-finite starts,
diverging first-order runs, half precision. Steps into trouble are refused and the weights are
never left corrupted; a start that cannot train is a ValueError before any work."""

import math

import pytest
import torch
from torch import nn

import marquardt
from marquardt import Callback, fit


class Custom(nn.Module):
    """A 1-8-1 tanh network that is not an nn.Sequential: no closed form, the torch.func path."""

    def __init__(self, hidden=8):
        super().__init__()
        self.a, self.b = nn.Linear(1, hidden), nn.Linear(hidden, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _mse(model, X, y):
    """MATLAB's mse of model(X), the residuals in the model's dtype as fit forms them."""
    with torch.no_grad():
        outputs = model(X)
        return float(((outputs - y.to(outputs.dtype)).double() ** 2).mean())


# ------------------------------------------------------------------------------------------------
# half precision


# bfloat16's 8-bit mantissa: torch.func's forward and the module's round apart by a few percent.
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-3), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("samples", [50, 12], ids=["normal", "rows held"])  # 25 parameters
def test_trainbr_of_a_half_precision_module_without_a_closed_form_solves_in_float64_as_lm(dtype, rel, samples):
    # RegularizedProblem built its J^T J + alpha I in half precision from the promoted data system:
    # NotImplementedError "cholesky_cpu" not implemented for 'Half' in the first step, after
    # epoch 0 was recorded. lm on the same model assembles and solves in float64.
    torch.manual_seed(0)
    model = Custom().to(dtype)
    X = torch.linspace(-1, 1, samples)[:, None]
    y = torch.sin(3 * X)
    history = fit(model, X, y, method="br", epochs=10)
    assert len(history) == 11 and history.stop_reason == "Maximum epoch reached."
    if samples == 50:
        assert history["perf"][-1] < 0.05 * history["perf"][0]
    assert all(math.isfinite(g) and 0 < g <= 25 for g in history["gamma"])
    assert all(bool(torch.isfinite(p).all()) and p.dtype == dtype for p in model.parameters())
    # br ends on the last weights; its record reads the cost of those weights' half outputs.
    assert history["perf"][-1] == pytest.approx(_mse(model, X.to(dtype), y), rel=rel)


# ------------------------------------------------------------------------------------------------
# a point whose Jacobian is not finite: refused after the fact, as least_squares refuses it


class SqrtNet(nn.Module):
    """``sqrt(z)`` of a tanh network's output ``z`` where it is positive, else 0: outputs finite
    everywhere, a NaN derivative (autograd's ``0 * inf`` through ``torch.where``) wherever ``z < 0``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        with torch.no_grad():
            self.net[2].bias.fill_(1.0)  # z > 0 on every sample at the start

    def forward(self, x):
        z = self.net(x)
        return torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z))


SQRT_X = torch.linspace(-1, 1, 30, dtype=torch.float64)[:, None]
SQRT_Y = torch.relu(SQRT_X)  # zero on half the samples: the fit drives z below 0 there


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _gradient_is_finite(model, X, y):
    model.zero_grad()
    ((model(X) - y) ** 2).mean().backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    model.zero_grad()
    return finite


class Seen(Callback):
    """The weights of every recorded epoch, and whether a step can be taken from them."""

    def __init__(self, X, y):
        self.X, self.y, self.weights, self.mse, self.trainable = X, y, [], [], []

    def on_epoch_end(self, history, model):
        self.weights.append(_weights(model))
        self.mse.append(_mse(model, self.X, self.y))
        self.trainable.append(_gradient_is_finite(model, self.X, self.y))


LINEARIZATION_CASES = [("lm", "normal"), ("lm", "sample-space"), ("lm", "matrix-free"), ("br", "normal"),
                       ("br", "sample-space")]


@pytest.mark.parametrize("method, solver", LINEARIZATION_CASES)
def test_a_step_to_a_point_whose_jacobian_is_not_finite_is_refused_and_training_goes_on(method, solver):
    # The step to a point where z < 0 on some samples lowered the cost and was kept: lm recorded
    # gradient = nan there, raised mu to mu_max at the next epoch and stopped on "Maximum MU
    # reached." at epoch 2; br's gamma update raised torch._LinAlgError from eigvalsh on the NaN
    # J^T J, without a History, the module at that point.
    model, seen = SqrtNet(), Seen(SQRT_X, SQRT_Y)
    history = fit(model, SQRT_X, SQRT_Y, method=method, solver=solver, epochs=12, callbacks=[seen])
    assert history.stop_reason == "Maximum epoch reached." and len(history) == 13
    assert all(math.isfinite(g) for g in history["gradient"]) and all(seen.trainable)
    # Every record is the point it shows: its perf is model(X)'s MSE there.
    assert history["perf"] == pytest.approx(seen.mse, rel=1e-12, abs=0)
    assert history["perf"][-1] < 0.3 * history["perf"][0]
    if method == "lm":
        assert all(b <= a for a, b in zip(history["perf"], history["perf"][1:]))
        assert history.best_epoch == 12 and all(torch.equal(a, b) for a, b in zip(_weights(model), seen.weights[12]))
    else:
        assert all(math.isfinite(g) for g in history["gamma"])
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), seen.weights[-1]))


@pytest.mark.parametrize("method", ["lm", "br"])
def test_refusals_with_the_weights_held_by_the_trainer_give_the_same_training(method):
    # Without callbacks the LM trainer holds the weights in its own vector between epochs.
    held, written = SqrtNet(), SqrtNet()
    h_held = fit(held, SQRT_X, SQRT_Y, method=method, epochs=12)
    h_written = fit(written, SQRT_X, SQRT_Y, method=method, epochs=12, callbacks=[Callback()])
    assert h_held["perf"] == h_written["perf"] and h_held["damping"] == h_written["damping"]
    assert all(torch.equal(a, b) for a, b in zip(held.parameters(), written.parameters()))
    assert _mse(held, SQRT_X, SQRT_Y) == pytest.approx(h_held["perf"][h_held.best_epoch], rel=1e-12)


def test_mini_batch_steps_that_end_where_the_jacobian_is_not_finite_are_refused():
    # Before: epoch 6 recorded gradient = nan, then "Maximum MU reached." at epoch 7.
    model, seen = SqrtNet(), Seen(SQRT_X, SQRT_Y)
    history = fit(model, SQRT_X, SQRT_Y, batch_size=10, seed=0, epochs=15, callbacks=[seen])
    assert history.stop_reason == "Maximum epoch reached." and len(history) == 16
    assert all(math.isfinite(g) for g in history["gradient"]) and all(seen.trainable)
    assert history["perf"] == pytest.approx(seen.mse, rel=1e-12, abs=0)
    assert min(history["perf"]) < 0.3 * history["perf"][0]
    # A refused epoch ends where it started, mu raised by mu_inc.
    refused = [e for e in range(1, 16) if all(torch.equal(a, b) for a, b in zip(seen.weights[e], seen.weights[e - 1]))]
    assert refused and all(history["damping"][e] == pytest.approx(10 * history["damping"][e - 1]) for e in refused)
    best = history.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), seen.weights[best]))


def test_a_run_resumed_where_a_point_is_to_be_refused_goes_on_as_the_uninterrupted_one(tmp_path):
    # A checkpoint holds the state before an epoch is evaluated: the point the last step reached,
    # not yet verified, and the point to go back to (trainer/fallback_x, fallback_damping).
    from marquardt import train as train_module

    refusing, evaluations = set(), []
    original_trainable, original_evaluate = train_module.LMTrainer._trainable, train_module.LMTrainer.evaluate

    def evaluate(self):
        evaluations.append(None)
        return original_evaluate(self)

    def trainable(self, *args):
        result = original_trainable(self, *args)
        if not result:
            refusing.add(len(evaluations) - 1)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.LMTrainer, "evaluate", evaluate)
        patch.setattr(train_module.LMTrainer, "_trainable", trainable)
        expected_model = SqrtNet()
        expected = fit(expected_model, SQRT_X, SQRT_Y, epochs=10)
    assert expected.stop_reason == "Maximum epoch reached." and {1, 2, 3} <= refusing
    for epoch in sorted(refusing)[:3]:
        folder = tmp_path / str(epoch)
        fit(SqrtNet(), SQRT_X, SQRT_Y, epochs=epoch, checkpoint=folder)
        model = SqrtNet()
        resumed = fit(model, SQRT_X, SQRT_Y, epochs=10, checkpoint=folder)
        assert [(r["perf"], r["damping"], r["gradient"]) for r in resumed.records] == \
            [(r["perf"], r["damping"], r["gradient"]) for r in expected.records]
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected_model.parameters()))


# ------------------------------------------------------------------------------------------------
# float32 starts: the cost the trials sum, the gradient's norm


def _overflowing_float32_data(scale):
    X = torch.linspace(-1, 1, 20)[:, None]
    return X, (2 * X + 1) * scale


def test_a_float32_start_whose_trial_cost_overflows_is_the_value_error_lm_documents():
    # 0.5 * sum(r**2) = 2.5e39 overflows float32. A network past PROMOTE_MAX_PARAMS sums its
    # costs in float32: no trial can lower an infinite cost ("Maximum MU reached." after 4
    # epochs, before the check). The optimizer and least_squares refuse the same data alike.
    torch.manual_seed(0)
    model = nn.Linear(1100, 1)
    before = _weights(model)
    X = torch.zeros(20, 1100)
    X[:, 0] = torch.linspace(-1, 1, 20)
    y = (2 * X[:, :1] + 1) * 1e19
    with pytest.raises(ValueError, match=r"not finite \(inf\): .* overflows float32\. .* or train in float64"):
        fit(model, X, y, epochs=50)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_a_small_float32_network_whose_cost_overflows_float32_trains_on_float64_sums():
    # A small float32 problem is assembled in float64, and its trials now sum their costs there
    # too (ModuleProblem.cost_dtype): the same 2.5e39 start is finite and LM finds the weights.
    # Before, the trials summed in float32 and the start was refused with the ValueError above.
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    X, y = _overflowing_float32_data(1e19)
    history = fit(model, X, y, epochs=50)
    assert math.isfinite(history["perf"][0]) and history["perf"][0] > 1e38
    assert history["perf"][-1] < 1e-14 * history["perf"][0]
    assert model.weight.item() == pytest.approx(2e19, rel=1e-6) and model.bias.item() == pytest.approx(1e19, rel=1e-6)


def test_a_float32_gradient_whose_norm_overflows_float32_is_recorded_finite():
    # J^T e has entries of about 1e19, finite in float32; their squares are not, and the float32
    # norm recorded history["gradient"][0] = inf.
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    X, y = _overflowing_float32_data(1e18)
    model.zero_grad()
    ((model(X).double() - y.double()) ** 2).mean().backward()
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    model.zero_grad()
    history = fit(model, X, y, epochs=3)
    assert math.isfinite(history["gradient"][0]) and expected > 1e18
    assert history["gradient"][0] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(g) for g in history["gradient"])


# ------------------------------------------------------------------------------------------------
# first-order runs that diverge


class Cliff(nn.Module):
    """``w * x``, whose outputs are inf once ``w > 1.5``: a first-order step can land there."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        out = self.w * x
        return torch.where(self.w > 1.5, torch.full_like(out, math.inf), out)


CLIFF_X = torch.linspace(0, 1, 20, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("method, options", [("gd", {"lr": 0.5}), ("momentum", {"lr": 0.5}),
                                             (torch.optim.SGD, {"lr": 0.5}), (torch.optim.Adam, {"lr": 0.5})])
def test_a_first_order_run_whose_performance_becomes_non_finite_stops_on_the_best_weights(method, options):
    # The weights went to inf, then NaN, and training went on for every epoch on them, ending on
    # "Maximum epoch reached." (or "Minimum gradient reached.": a NaN gradient compared false).
    model, seen = Cliff(), Seen(CLIFF_X, 3 * CLIFF_X)
    history = fit(model, CLIFF_X, 3 * CLIFF_X, method=method, epochs=100, callbacks=[seen], **options)
    assert history.stop_reason == "Performance is not finite."
    assert marquardt.STOP_REASONS["nonfinite"] == history.stop_reason
    last = len(history) - 1
    assert math.isinf(history["perf"][last]) and last < 10
    assert all(math.isfinite(p) for p in history["perf"][:last])
    # The perf fell at every finite epoch: the best weights are the last finite ones.
    assert history.best_epoch == last - 1 and float(model.w.detach()) <= 1.5
    assert torch.equal(model.w.detach(), seen.weights[last - 1][0])
    assert _mse(model, CLIFF_X, 3 * CLIFF_X) == pytest.approx(history["perf"][last - 1], rel=1e-12)


def test_first_order_runs_that_stay_finite_are_not_stopped():
    # The same model short of the cliff (lr small enough that w stays below 1.5 in 20 epochs).
    history = fit(Cliff(), CLIFF_X, 3 * CLIFF_X, method="gd", lr=0.01, epochs=20)
    assert history.stop_reason == "Maximum epoch reached." and len(history) == 21
