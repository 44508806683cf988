"""fit(): MATLAB stop reasons, best-weights rollback, validation, determinism, architectures, bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import marquardt
from marquardt import STOP_REASONS, Callback, fit
from marquardt.division import divide_block, divide_interleaved, divide_random


def tanh_net(hidden=10, inputs=1, outputs=1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).to(dtype)


def smooth_data(n=50, dtype=torch.float64):
    X = torch.linspace(-1, 1, n, dtype=dtype)[:, None]
    return X, torch.sin(2 * X)


def test_lm_reaches_mse_below_1e6_on_smooth_function_within_200_epochs():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, epochs=200, goal=1e-6)
    assert history.stop_reason == "Performance goal met."
    assert history["perf"][-1] <= 1e-6
    assert len(history) <= 201


def test_history_records_matlab_fields_from_epoch_zero():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, epochs=5)
    assert history["epoch"] == [0, 1, 2, 3, 4, 5]
    assert history.stop_reason == "Maximum epoch reached."
    assert history["mu"] == history["damping"]
    assert history["damping"][0] == pytest.approx(1e-3)
    for key in ("time", "perf", "gradient", "val_fail"):
        assert all(v is not None for v in history[key])
    assert all(b <= a for a, b in zip(history["perf"], history["perf"][1:]))  # LM never accepts an uphill step
    as_dict = history.to_dict()
    assert as_dict["stop_reason"] == "Maximum epoch reached." and len(as_dict["records"]) == 6


def test_performance_goal_stop():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, goal=1e-3, epochs=500)
    assert history.stop_reason == STOP_REASONS["goal"]
    assert history["perf"][-1] <= 1e-3 < history["perf"][-2]


def test_maximum_time_stop():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, time_limit=1e-6, epochs=500)
    assert history.stop_reason == STOP_REASONS["time"]
    assert len(history) == 1


def test_time_limit_zero_stops_after_epoch_zero_as_matlab():
    # MATLAB's trainParam.time = 0 is valid (nntype.pos_inf_scalar) and 'current_time >= time'
    # holds at epoch 0: one record, stop 'Maximum time elapsed.', weights untouched.
    X, y = smooth_data()
    model = tanh_net()
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(model, X, y, time_limit=0, epochs=500)
    assert history.stop_reason == STOP_REASONS["time"]
    assert history["epoch"] == [0] and history.best_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_minimum_gradient_stop():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, min_grad=1e3)
    assert history.stop_reason == STOP_REASONS["gradient"]
    assert history["gradient"][-1] <= 1e3


class Frozen(nn.Module):
    """Finite only at its initial weight: every trial step is rejected, so damping must escalate."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

    def forward(self, x):
        out = self.w * x
        return torch.where(self.w == 0.5, out, torch.full_like(out, math.nan))


def test_maximum_mu_stop_after_damping_escalates():
    X = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    model = Frozen()
    history = fit(model, X, 2 * X, epochs=100)
    assert history.stop_reason == STOP_REASONS["mu"]
    assert len(history) == 2  # epoch 0, then one epoch of rejected trials from 1e-3 past 1e10
    assert history["damping"][-1] == pytest.approx(1e11)
    assert float(model.w.detach()) == 0.5


def test_maximum_mu_checked_before_the_first_step():
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, mu=1e10, mu_max=1e10)
    assert history.stop_reason == STOP_REASONS["mu"] and len(history) == 1


def test_validation_stop_restores_best_weights():
    X, y = smooth_data()
    # Validation targets of the opposite sign: validation performance worsens as training improves.
    history = fit(tanh_net(), X, y, validation_data=(X, -y), epochs=500)
    assert history.stop_reason == STOP_REASONS["validation"]
    vperf = history["vperf"]
    best = history.best_epoch
    assert vperf[best] == min(vperf)
    assert history["val_fail"][-1] == 6
    model_perf = history["vperf"][best]
    # The model holds the weights of the best epoch.
    return_model = tanh_net()
    fit(return_model, X, y, validation_data=(X, -y), epochs=500)
    with torch.no_grad():
        assert float(((return_model(X) + y) ** 2).mean()) == pytest.approx(model_perf, rel=1e-12)


def test_max_fail_inf_never_stops_on_validation_but_keeps_the_best_weights():
    X, y = smooth_data()
    model = tanh_net()
    history = fit(model, X, y, validation_data=(X, -y), epochs=20, max_fail=math.inf)
    assert history.stop_reason == STOP_REASONS["epochs"] and history["val_fail"][-1] >= 6
    best = history.best_epoch
    assert history["vperf"][best] == min(history["vperf"]) and best < 20
    with torch.no_grad():
        assert float(((model(X) + y) ** 2).mean()) == pytest.approx(history["vperf"][best], rel=1e-12)


class _NanAbove(nn.Module):
    """``net(x)``, NaN for inputs above 10: a finite training set, a NaN validation performance."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return torch.where(x > 10, torch.full_like(out, math.nan), out)


def test_a_nan_validation_performance_leaves_val_fail_as_matlab_does():
    # trainlm counts a failure for vperf > best.vperf only; NaN compares false both ways.
    X, y = smooth_data()
    model = _NanAbove(tanh_net())
    start = [p.detach().clone() for p in model.parameters()]
    history = fit(model, X, y, validation_data=(X + 20, y), epochs=8, max_fail=2)
    assert all(math.isnan(v) for v in history["vperf"])
    assert history.stop_reason == STOP_REASONS["epochs"] and history["val_fail"] == [0] * 9
    assert history.best_epoch == 0 and all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_best_training_weights_kept_without_validation():
    X, y = smooth_data()
    model = tanh_net()
    history = fit(model, X, y, epochs=20)
    with torch.no_grad():
        final = float(((model(X) - y) ** 2).mean())
    assert final == pytest.approx(min(history["perf"]), rel=1e-12)
    assert history.best_epoch == int(np.argmin(history["perf"]))


def test_user_stop_from_callback():
    class StopAtThree(Callback):
        def on_epoch_end(self, history, model):
            if len(history) == 3:
                raise StopIteration

    X, y = smooth_data()
    history = fit(tanh_net(), X, y, epochs=100, callbacks=[StopAtThree()])
    assert history.stop_reason == "User stop." and len(history) == 3


class EpochLog(Callback):
    """Records each ``on_epoch_end``'s epoch, and whether the model then gives that record's perf."""

    def __init__(self, X, y):
        self.X, self.y, self.epochs, self.model_matches = X, y, [], []

    def on_epoch_end(self, history, model):
        self.epochs.append(history.last["epoch"])
        with torch.no_grad():
            perf = float(((model(self.X) - self.y) ** 2).mean())
        self.model_matches.append(perf == pytest.approx(history.last["perf"], rel=1e-12))


#: Runs that end on a built-in rule, and that rule.
RULE_STOPS = [
    (dict(epochs=3), "epochs"),
    (dict(epochs=0), "epochs"),
    (dict(goal=1e9), "goal"),
    (dict(time_limit=0), "time"),
    (dict(min_grad=1e9), "gradient"),
    (dict(mu=1e-3, mu_max=1e-3), "mu"),
    (dict(validation_data=(smooth_data()[0] + 0.3, smooth_data()[1]), max_fail=1), "validation"),
    (dict(method="momentum", epochs=3), "epochs"),
    (dict(method="br", epochs=2), "epochs"),
]


@pytest.mark.parametrize("options, rule", RULE_STOPS, ids=[f"{rule}-{i}" for i, (_, rule) in enumerate(RULE_STOPS)])
def test_on_epoch_end_is_called_for_every_record_the_last_one_too(options, rule):
    # The epoch a built-in rule stopped on got no call: epochs=3 recorded 0..3 and the callback
    # saw 0..2; epochs=0 or a goal met at epoch 0 never called it.
    X, y = smooth_data()
    log = EpochLog(X, y)
    history = fit(tanh_net(), X, y, callbacks=[log], **options)
    assert history.stop_reason == STOP_REASONS[rule]
    assert log.epochs == history["epoch"] and all(log.model_matches)


def test_a_user_stop_comes_before_the_rules_as_in_matlab():
    # trainlm, trainbr, traingdm: "if userStop, tr.stop = 'User stop.'; elseif (perf <= goal) ..."
    class StopAtEveryEpoch(Callback):
        def on_epoch_end(self, history, model):
            raise StopIteration

    X, y = smooth_data()
    for options in (dict(epochs=0), dict(goal=1e9), dict(epochs=5)):
        history = fit(tanh_net(), X, y, callbacks=[StopAtEveryEpoch()], **options)
        assert history.stop_reason == STOP_REASONS["user"] and len(history) == 1
    plain = fit(tanh_net(), X, y, epochs=0)
    assert plain.stop_reason == STOP_REASONS["epochs"]


class LoadWeightsAt(Callback):
    """Writes ``weights`` into the model in ``on_epoch_end`` of ``epoch``."""

    def __init__(self, epoch, weights):
        self.epoch, self.weights = epoch, weights

    def on_epoch_end(self, history, model):
        if history.last["epoch"] == self.epoch:
            model.load_state_dict(self.weights)


@pytest.mark.parametrize("method", ["lm", "br"])
def test_weights_a_callback_writes_are_where_the_next_lm_step_starts(method):
    # LM stepped from its own copy of the weights and wrote the result over the module, so a
    # callback's change was silently undone (gradient descent honoured it).
    X, y = smooth_data()
    other = tanh_net(seed=1).state_dict()
    history = fit(tanh_net(), X, y, method=method, epochs=3, callbacks=[LoadWeightsAt(2, other)])
    fresh = tanh_net(seed=1)
    reference = fit(fresh, X, y, method="lm", epochs=1, mu=history[2]["damping"])
    untouched = fit(tanh_net(), X, y, method=method, epochs=3)
    assert history["perf"][:3] == untouched["perf"][:3]
    if method == "lm":  # one LM step from the written weights with the damping reached by epoch 2
        assert history["perf"][3] == pytest.approx(reference["perf"][1], rel=1e-12)
        assert history["perf"][3] == pytest.approx(0.189707, rel=1e-5)
    # Before, epoch 3 continued the untouched run: 0.01116 (lm), 0.2384 (br).
    assert history["perf"][3] == pytest.approx({"lm": 0.189707, "br": 0.368622}[method], rel=1e-5)
    assert untouched["perf"][3] == pytest.approx({"lm": 0.0111609, "br": 0.238389}[method], rel=1e-5)


class FreezeFirstLayerAt(Callback):
    """Freezes the first layer's weight in ``on_epoch_end`` of ``epoch`` (fine-tuning's pattern),
    keeping the weights and damping reached then."""

    def __init__(self, epoch):
        self.epoch, self.weights, self.frozen, self.damping = epoch, None, None, None

    def on_epoch_end(self, history, model):
        if history.last["epoch"] == self.epoch:
            model[0].weight.requires_grad_(False)
            self.weights = {k: v.clone() for k, v in model.state_dict().items()}
            self.frozen, self.damping = model[0].weight.detach().clone(), history.last["damping"]


@pytest.mark.parametrize("solver", ["auto", "matrix-free", "sample-space"])
def test_a_layer_a_callback_freezes_stops_training_and_lm_goes_on_with_the_others(solver):
    # LM kept the problem built for every parameter and crashed at the next linearization with
    # numpy's "could not broadcast input array from shape (17,) into shape (25,)".
    X, y = smooth_data()
    freeze = FreezeFirstLayerAt(2)
    model = tanh_net(hidden=8)
    history = fit(model, X, y, epochs=5, min_grad=0.0, solver=solver, callbacks=[freeze])
    assert history.stop_reason == STOP_REASONS["epochs"] and torch.equal(model[0].weight, freeze.frozen)
    # From the weights and damping of epoch 2, the same steps as a run with the layer frozen from the start.
    reference = tanh_net(hidden=8)
    reference.load_state_dict(freeze.weights)
    reference[0].weight.requires_grad_(False)
    expected = fit(reference, X, y, epochs=3, min_grad=0.0, solver=solver, mu=freeze.damping)
    np.testing.assert_allclose(history["perf"][2:], expected["perf"], rtol=1e-10)
    assert history["damping"][2:] == expected["damping"]


@pytest.mark.parametrize("options", [dict(method="br"), dict(batch_size=20, seed=0)])
def test_freezing_a_layer_mid_run_works_for_trainbr_and_mini_batches(options):
    X, y = smooth_data()
    freeze = FreezeFirstLayerAt(1)
    model = tanh_net(hidden=8)
    history = fit(model, X, y, epochs=4, min_grad=0.0, callbacks=[freeze], **options)
    assert len(history) == 5 and torch.equal(model[0].weight, freeze.frozen)
    assert all(math.isfinite(perf) for perf in history["perf"])


def test_a_callback_that_freezes_every_parameter_is_a_value_error_saying_so():
    class FreezeAll(Callback):
        def on_epoch_end(self, history, model):
            model.requires_grad_(False)

    X, y = smooth_data()
    with pytest.raises(ValueError, match="A callback froze every parameter of the model"):
        fit(tanh_net(), X, y, epochs=3, callbacks=[FreezeAll()])


@pytest.fixture
def terminal_without_tqdm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)


def test_default_progress_on_a_terminal_without_tqdm_trains_without_a_bar(terminal_without_tqdm):
    # tqdm is an optional extra; the default progress=None raised "progress=True needs tqdm".
    from marquardt import mlp

    X, y = smooth_data()
    history = fit(mlp(1, 5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), X, y, epochs=3)
    assert history["epoch"] == [0, 1, 2, 3] and history.stop_reason == "Maximum epoch reached."


def test_progress_true_without_tqdm_fails_before_the_model_is_changed(terminal_without_tqdm):
    from marquardt import mlp

    X, y = smooth_data()
    model = mlp(1, 5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ImportError, match=r"progress=True needs tqdm: pip install tqdm"):
        fit(model, X, y, epochs=3, progress=True)
    assert not model.normalization_set  # it used to be configured from X, y first


@pytest.mark.parametrize("division", ["random", "block", "interleaved"])
def test_division_records_validation_and_test_performance(division):
    X, y = smooth_data(100)
    history = fit(tanh_net(), X, y, division=division, epochs=10, seed=1)
    assert all(math.isfinite(v) for v in history["vperf"])
    assert all(math.isfinite(v) for v in history["tperf"])


def test_seed_makes_runs_identical():
    X, y = smooth_data(100)
    first = fit(tanh_net(seed=3), X, y, division="random", epochs=10, seed=7, batch_size=30)
    second = fit(tanh_net(seed=3), X, y, division="random", epochs=10, seed=7, batch_size=30)
    assert first["perf"] == second["perf"] and first["vperf"] == second["vperf"]


def test_mini_batch_lm_carries_damping_and_lowers_the_error():
    X, y = smooth_data(200)
    history = fit(tanh_net(), X, y, batch_size=50, epochs=30)
    assert history["perf"][-1] < 0.01 * history["perf"][0]


def test_multi_output_model():
    X = torch.linspace(-1, 1, 60, dtype=torch.float64)[:, None]
    y = torch.cat([torch.sin(2 * X), torch.cos(2 * X)], dim=1)
    history = fit(tanh_net(hidden=15, outputs=2), X, y, epochs=300, goal=1e-6)
    assert history["perf"][-1] <= 1e-6


def test_convolutional_model():
    torch.manual_seed(0)
    X = torch.randn(64, 1, 8, dtype=torch.float64)
    y = X.mean(dim=(1, 2))[:, None] ** 2
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 1)).double()
    history = fit(model, X, y, epochs=30)
    assert history["perf"][-1] < 0.1 * history["perf"][0]


def test_float32_training():
    X, y = smooth_data(dtype=torch.float32)
    history = fit(tanh_net(dtype=torch.float32), X, y, epochs=100, goal=1e-5)
    assert history.stop_reason == "Performance goal met."


def test_one_dimensional_targets_match_single_output():
    X, y = smooth_data()
    history = fit(tanh_net(), X.numpy(), y.reshape(-1).numpy(), epochs=3)
    assert len(history) == 4


def test_memory_budget_smaller_than_the_jacobian_gives_the_same_training():
    X, y = smooth_data(100)
    full = fit(tanh_net(), X, y, epochs=5)
    chunked = fit(tanh_net(), X, y, epochs=5, max_jacobian_bytes=31 * 8 * 7)  # 7 rows at a time
    assert chunked["perf"] == pytest.approx(full["perf"], rel=1e-9)


@pytest.mark.parametrize("method", ["gd", "momentum", torch.optim.Adam])
def test_first_order_methods_lower_the_error(method):
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, method=method, epochs=50, lr=0.05)
    assert history["perf"][-1] < history["perf"][0]
    assert math.isnan(history["damping"][-1])


@pytest.mark.parametrize("method", ["gd", "momentum"])
def test_first_order_methods_stop_at_matlabs_min_grad_of_1e_minus_5(method):
    # traingd and traingdm default to min_grad = 1e-5 (trainlm's 1e-7 kept them running).
    X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]

    def run(**options):
        model = nn.Linear(1, 1).double()
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        return fit(model, X, 2 * X + 1, method=method, lr=0.5, epochs=5000, **options)

    history, tighter = run(), run(min_grad=1e-7)
    assert history.stop_reason == tighter.stop_reason == STOP_REASONS["gradient"]
    assert history["gradient"][-1] <= 1e-5 < history["gradient"][-2]
    assert tighter["gradient"][-1] <= 1e-7 < tighter["gradient"][-2]


def test_momentum_matches_closed_form_linear_regression():
    rng = np.random.default_rng(0)
    x = 2 * rng.random((100, 1))
    y = 4 + 3 * x + rng.standard_normal((100, 1))
    model = nn.Linear(1, 1).double()
    fit(model, x, y, method="momentum", lr=0.1, beta=0.9, epochs=3000, min_grad=0.0)
    design = np.hstack([np.ones_like(x), x])
    intercept, slope = np.linalg.lstsq(design, y, rcond=None)[0].reshape(-1)
    assert float(model.bias.detach()) == pytest.approx(intercept, abs=1e-3)
    assert float(model.weight.detach()) == pytest.approx(slope, abs=1e-3)


def test_non_finite_cost_is_a_rejected_step_and_weights_stay_finite():
    class Fragile(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))

        def forward(self, x):
            out = self.w * x
            return torch.where(self.w > 1.5, torch.full_like(out, math.inf), out)

    X = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    model = Fragile()
    history = fit(model, X, 3 * X, epochs=20, mu=1e-8)
    assert torch.isfinite(model.w).all() and float(model.w.detach()) <= 1.5
    assert all(math.isfinite(p) for p in history["perf"])


X_OK = torch.zeros(4, 1, dtype=torch.float64)
Y_OK = torch.zeros(4, 1, dtype=torch.float64)
X_NAN = X_OK.clone()
X_NAN[2, 0] = math.nan
Y_INF = Y_OK.clone()
Y_INF[1, 0] = math.inf


@pytest.mark.parametrize(
    ("X", "y", "kwargs", "error", "match"),
    [
        (X_NAN, Y_OK, {}, ValueError, r"X contains NaN or inf; first bad value at index \(2, 0\)"),
        (X_OK, Y_INF, {}, ValueError, r"y contains NaN or inf; first bad value at index \(1, 0\)"),
        (X_OK, Y_OK[:3], {}, ValueError, "X and y have different numbers of samples: 4 and 3"),
        (X_OK, torch.zeros(4, 2, dtype=torch.float64), {}, ValueError,
         r"model output shape \(2, 1\) does not match the targets y shape \(4, 2\)"),
        (X_OK[:0], Y_OK[:0], {}, ValueError, "X is empty"),
        (X_OK.to(torch.complex128), Y_OK, {}, TypeError, r"X must be real; received a tensor of dtype torch.complex128"),
        (X_OK, Y_OK.to(torch.complex64), {}, TypeError, r"y must be real; received a tensor of dtype torch.complex64"),
        (X_OK, Y_OK, dict(validation_data=(X_OK, 1j * Y_OK)), TypeError, r"y_val must be real"),
        (torch.zeros(4, 2, dtype=torch.float64), Y_OK, {}, ValueError,
         r"The model cannot take X of shape \(4, 2\) \(samples first\): mat1 and mat2 shapes cannot be multiplied"),
        (X_OK, Y_OK, dict(method="newton"), ValueError, r"Invalid method: 'newton'; expected .* class\.$"),
        (X_OK, Y_OK, dict(method="trainlm"), ValueError,
         r"Invalid method: 'trainlm'; .* \(MATLAB's 'trainlm' is method='lm'\)"),
        (X_OK, Y_OK, dict(method="traingdm"), ValueError, r"\(MATLAB's 'traingdm' is method='momentum'\)"),
        (X_OK, Y_OK, dict(method=["lm"]), ValueError, r"Invalid method: \['lm'\]"),
        (X_OK, Y_OK, dict(method="momentum", mc=0.9), TypeError,
         r"Unknown option\(s\) for method='momentum': \['mc'\]; expected \['beta', 'lr'\] \(MATLAB's 'mc' is 'beta'\)"),
        (X_OK, Y_OK, dict(time=10), TypeError, r"\['time'\]; .* \(MATLAB's 'time' is 'time_limit'\)"),
        (X_OK, Y_OK, dict(epochs=-1), ValueError, "Invalid epochs value: -1"),
        (X_OK, Y_OK, dict(goal=-1.0), ValueError, "Invalid goal value: -1.0"),
        (X_OK, Y_OK, dict(max_fail=0), ValueError, r"Invalid max_fail value: 0; .* with method='lm' \(max_fail=0 turns"),
        (X_OK, Y_OK, dict(max_fail=-math.inf), ValueError, r"Invalid max_fail value: -inf; expected None, an integer"),
        (X_OK, Y_OK, dict(batch_size=0), ValueError, "Invalid batch_size value: 0"),
        (X_OK, Y_OK, dict(division="random", split=(0.5, 0.2, 0.2)), ValueError, "must sum to 1"),
        (X_OK, Y_OK, dict(division="shuffle"), ValueError, "Invalid division: 'shuffle'"),
        (X_OK, Y_OK, dict(division="dividerand"), ValueError,
         r"Invalid division: 'dividerand'; expected one of \('random', 'block', 'interleaved'\) or None \(MATLAB's "
         r"'dividerand' is division='random'\)"),
        (X_OK, Y_OK, dict(mu=-1.0), ValueError, r"Invalid mu value: -1.0; expected a finite number > 0"),
        (X_OK, Y_OK, dict(mu_dec=2), ValueError, r"Invalid mu_dec value: 2; expected a number with 0 < mu_dec < 1"),
        (X_OK, Y_OK, dict(mu_inc=0.5), ValueError, r"Invalid mu_inc value: 0.5; expected a finite number > 1"),
        (X_OK, Y_OK, dict(method="br", mu_max=0), ValueError, r"Invalid mu_max value: 0; expected a finite number > 0"),
        (X_OK, Y_OK, dict(max_jacobian_bytes=-5), ValueError, r"Invalid max_jacobian_bytes value: -5"),
        (X_OK, Y_OK, dict(max_matrix_bytes=0), ValueError, r"Invalid max_matrix_bytes value: 0"),
        (X_OK, Y_OK, dict(max_matrix_bytes=2.5e9), ValueError, r"Invalid max_matrix_bytes value: 2500000000.0"),
        (X_OK, Y_OK, dict(split=(0.7, 0.3)), ValueError, r"split must be three fractions >= 0 .* received \(0.7, 0.3\)"),
        (X_OK, Y_OK, dict(seed="a"), ValueError, r"Invalid seed value: 'a'; expected None or an integer"),
        (X_OK, Y_OK, dict(seed=2**64), ValueError, r"Invalid seed value: 18446744073709551616"),
        (X_OK, Y_OK, dict(progress="yes"), ValueError, r"Invalid progress value: 'yes'; expected None, True or False"),
        (X_OK, Y_OK, dict(max_fail=True), ValueError, r"Invalid max_fail value: True"),
        (X_OK, Y_OK, dict(goal=math.nan), ValueError, r"Invalid goal value: nan"),
        (X_OK, Y_OK, dict(time_limit=-1.0), ValueError, r"Invalid time_limit value: -1.0; expected None or a number >= 0"),
        (X_OK, Y_OK, dict(time_limit=math.nan), ValueError, r"Invalid time_limit value: nan"),
        (X_OK, Y_OK, dict(time_limit="10"), ValueError, r"Invalid time_limit value: '10'"),
        (X_OK, Y_OK, dict(momentum=0.9), TypeError, r"Unknown option\(s\) for method='lm': \['momentum'\]"),
        (X_OK, Y_OK, dict(method="gd", beta=0.9), TypeError, r"Unknown option\(s\) for method='gd': \['beta'\]"),
        (X_OK, Y_OK, dict(validation_data=X_OK), TypeError, "validation_data must be a pair"),
        (X_OK, Y_OK, dict(validation_data=(X_OK, Y_OK), division="block"), ValueError,
         r"Pass either validation_data=\(X_val, y_val\) or division='block', not both"),
        (X_OK, Y_OK, dict(test_data=(X_OK, Y_OK), division="random"), ValueError,
         r"Pass either test_data=\(X_test, y_test\) or division='random', not both"),
        (X_OK, Y_OK, dict(test_data=[X_OK]), TypeError, r"test_data must be a pair \(X, y\); received list"),
        (X_OK, Y_OK, dict(test_data=(X_OK, Y_OK[:3])), ValueError, r"y_test"),
        (X_OK, Y_OK, dict(callbacks=[print]), TypeError, "callbacks must be marquardt.Callback instances"),
        (X_OK, Y_OK, dict(callbacks=Callback()), TypeError,
         r"callbacks must be a sequence of marquardt.Callback instances; received Callback \(wrap a single"),
        (X_OK, Y_OK, dict(callbacks=3), TypeError, r"callbacks must be a sequence .*; received int"),
        # It passed as a torch.optim class and failed after epoch 0, blaming a closure never written.
        (X_OK, Y_OK, dict(method=marquardt.LevenbergMarquardt), ValueError,
         r"Invalid method: marquardt.LevenbergMarquardt, .* pass method='lm'"),
        # Finite in float64, infinite once cast for a float32 model: it said "contains NaN or inf".
        (torch.tensor([[0.0], [1e300], [2.0], [3.0]], dtype=torch.float64), Y_OK, dict(model_dtype=torch.float32),
         ValueError, r"X has values too large for the model's dtype float32: 1e\+300 at index \(1, 0\); scale X"),
    ],
)
def test_bad_input_is_rejected_before_training(X, y, kwargs, error, match):
    kwargs = dict(kwargs)
    model = tanh_net(dtype=kwargs.pop("model_dtype", torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        fit(model, X, y, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(method="gd", lr=-1.0), ValueError, "Invalid lr value: -1.0"),
        (dict(method="momentum", beta=2.0), ValueError, "Invalid beta value: 2.0"),
        (dict(method=torch.optim.Adam, lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(method=torch.optim.Adam, momentum=0.9), TypeError, "unexpected keyword argument 'momentum'"),
        (dict(validation_data=(np.zeros((3, 1)), np.zeros((2, 1)))), ValueError,
         "X_val and y_val have different numbers of samples: 3 and 2"),
        (dict(division="random", split=(0.01, 0.5, 0.49)), ValueError, "leaves no training samples out of 4"),
        # Refused by the trainer's ModuleProblem, after the ranges were set: they stayed set.
        (dict(solver="normal", max_matrix_bytes=8), ValueError,
         r"solver='normal' needs the 10 x 10 matrix J\^T J .* more than max_matrix_bytes=8"),
    ],
)
def test_a_failed_call_leaves_the_mlp_normalization_unset(kwargs, error, match):
    from marquardt import mlp

    model = mlp(1, hidden=(3,), dtype=torch.float64)
    X = np.array([[0.0], [10.0], [20.0], [30.0]])
    with pytest.raises(error, match=match):
        fit(model, X, X / 10, **kwargs)
    assert not model.normalization_set  # a corrected call takes the ranges from its own data
    fit(model, 2 * X, X, epochs=1)
    assert model.normalization_set and model.x_max.tolist() == [60.0]


def test_a_classifier_refused_by_its_problem_keeps_its_input_ranges_unset():
    from marquardt import mlp

    model = mlp(1, hidden=(3,), n_outputs=2, dtype=torch.float64)
    X = np.linspace(0.0, 30.0, 20)[:, None]
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with pytest.raises(ValueError, match="solver='sample-space' needs the squared-error loss"):
        fit(model, X, (X[:, 0] > 15).astype(np.int64), loss="cross_entropy", solver="sample-space")
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())


def test_a_checkpoint_of_another_run_leaves_the_mlp_normalization_unset(tmp_path):
    # The mismatch is found when the loop restores the checkpoint, after fit had set the ranges.
    from marquardt import mlp
    from marquardt.checkpoint import CheckpointMismatch

    X = np.linspace(0.0, 30.0, 40)[:, None]
    fit(mlp(1, hidden=(5,), dtype=torch.float64), X, X / 10, epochs=2, checkpoint=tmp_path, checkpoint_every=1)
    model = mlp(1, hidden=(6,), dtype=torch.float64)
    with pytest.raises(CheckpointMismatch):
        fit(model, X, X / 10, epochs=4, checkpoint=tmp_path)
    assert not model.normalization_set
    assert model.x_min.tolist() == [-1.0] and model.x_max.tolist() == [1.0]


def test_a_non_finite_start_leaves_the_mlp_normalization_unset():
    from marquardt import mlp

    model = mlp(1, hidden=(3,), dtype=torch.float64)
    with torch.no_grad():
        model.net[0].weight.fill_(math.nan)
    X = np.linspace(0.0, 30.0, 20)[:, None]
    with pytest.raises(ValueError, match="The training cost at the initial weights is not finite"):
        fit(model, X, X / 10, epochs=2)
    assert not model.normalization_set


def test_callbacks_none_means_no_callbacks():
    X, y = smooth_data()
    assert fit(tanh_net(), X, y, epochs=2, callbacks=None)["epoch"] == [0, 1, 2]


def test_division_functions_match_matlab_counts():
    generator = torch.Generator().manual_seed(0)
    parts = divide_random(100, (0.7, 0.15, 0.15), generator)
    assert [len(p) for p in parts] == [70, 15, 15]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    assert [p.tolist() for p in divide_block(6, (0.5, 0.5, 0.0))] == [[0, 1, 2], [3, 4, 5], []]
    train, val, test = divide_interleaved(20, (0.6, 0.2, 0.2))
    assert (len(train), len(val), len(test)) == (12, 4, 4)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(20))


def _random(n, split):
    return divide_random(n, split, torch.Generator().manual_seed(0))


# Counts of MATLAB's divide_indices (R2010b nndivision, fcnversion 7) at 0.7/0.15/0.15:
# dividerand rounds (round(0.15 * 30) is 5; Python's round(4.5) is 4, which gave 22/4/4),
# divideblock floors (its doc example, 250 samples, is 176/37/37), divideint deals greedily.
@pytest.mark.parametrize(("divide", "n", "counts"), [
    (_random, 30, (20, 5, 5)), (_random, 70, (48, 11, 11)), (_random, 10, (6, 2, 2)), (_random, 100, (70, 15, 15)),
    # They rounded as dividerand: 20/5/5, 48/11/11, 6/2/2, 174/38/38, 2/1/1.
    (divide_block, 30, (22, 4, 4)), (divide_block, 70, (50, 10, 10)), (divide_block, 10, (8, 1, 1)),
    (divide_block, 250, (176, 37, 37)), (divide_block, 4, (4, 0, 0)),
    (divide_interleaved, 30, (20, 5, 5)), (divide_interleaved, 4, (2, 1, 1)), (divide_interleaved, 100, (70, 15, 15)),
])
def test_division_counts_are_matlabs(divide, n, counts):
    parts = divide(n, (0.7, 0.15, 0.15))
    assert tuple(len(p) for p in parts) == counts
    assert sorted(torch.cat(parts).tolist()) == list(range(n))


@pytest.mark.parametrize(("n", "split", "expected"), [
    # It dealt against rounded target counts: [0, 2, 4, 5, 7, 9], [1, 6], [3, 8].
    (10, (0.6, 0.2, 0.2), [[0, 3, 4, 5, 8, 9], [1, 6], [2, 7]]),
    (20, (0.7, 0.15, 0.15), [[0, 2, 4, 5, 6, 8, 10, 11, 12, 13, 15, 17, 18, 19], [1, 7, 14], [3, 9, 16]]),
])
def test_interleaved_division_deals_each_sample_as_divideint(n, split, expected):
    # divideint: d = percents - totals / (i - 1); the sample goes to find(d == max(d), 1).
    assert [t.tolist() for t in divide_interleaved(n, split)] == expected


def test_best_weights_are_a_copy():
    from marquardt.train import _Best

    model = tanh_net(hidden=3)
    best = _Best()
    assert best.offer(1.0, 0, model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(best.weights["0.weight"], model[0].weight)  # not the live tensor
    assert best.offer(0.5, 1, model) and torch.equal(best.weights["0.weight"], model[0].weight)
    assert not best.offer(0.7, 2, model) and best.epoch == 1


def test_problem_parameter_views_and_writes():
    from marquardt.network import ModuleProblem, flatten_parameters, write_parameters

    model = tanh_net(hidden=3, inputs=2, outputs=2)
    X, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    problem = ModuleProblem(model, X, y)
    x = torch.arange(problem.n_params, dtype=torch.float64)
    strided = torch.zeros(2 * problem.n_params, dtype=torch.float64)[1::2]
    strided.copy_(x)
    padded = torch.cat([torch.zeros(3, dtype=torch.float64), x])[3:]  # a storage offset
    for vector in (x, strided, padded):
        views = problem.params(vector)
        for (name, p), view in zip(model.named_parameters(), views.values()):
            assert view.shape == p.shape
        write_parameters(model, torch.cat([v.reshape(-1) for v in views.values()]))
        assert torch.equal(flatten_parameters(model), x)
    write_parameters(model, x + 1, [p for p in model.parameters()])
    assert torch.equal(flatten_parameters(model), x + 1)


def _sinc_data(n=200):
    X = torch.linspace(-3, 3, n, dtype=torch.float64)[:, None]
    return X, torch.sinc(X)


def test_held_weights_give_the_same_training_as_writing_every_epoch():
    # With nothing reading the module between epochs, the LM trainer keeps the weights in its
    # own vector (and the best ones as a copy of it); a do-nothing callback turns that off.
    X, y = _sinc_data()
    held, written = tanh_net(hidden=6, dtype=torch.float32, seed=3), tanh_net(hidden=6, dtype=torch.float32, seed=3)
    h_held = fit(held, X.float(), y.float(), epochs=60, progress=False)
    h_written = fit(written, X.float(), y.float(), epochs=60, progress=False, callbacks=[Callback()])
    assert h_held["perf"] == h_written["perf"] and h_held.best_epoch == h_written.best_epoch == 60
    for a, b in zip(held.parameters(), written.parameters()):
        assert torch.equal(a, b)


def test_held_weights_restore_the_best_epoch_and_reach_the_module_when_interrupted(monkeypatch):
    from marquardt import train as train_module

    X, y = _sinc_data()
    model = tanh_net(hidden=6, seed=1)
    start = [p.detach().clone() for p in model.parameters()]
    steps = []
    original = train_module.LMTrainer.step

    def step_then_interrupt(self):
        assert self.holds_weights  # nothing observes the module in this fit
        original(self)
        steps.append(self.x.clone())
        if len(steps) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.LMTrainer, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, y, epochs=50, progress=False)
    current = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(current, steps[-1])  # the weights reached, not the initial ones
    assert not torch.equal(current, torch.cat([p.reshape(-1) for p in start]))

    # The best point is a copy of the trainer's vector, restored at the end.
    best = train_module._Best()
    point = torch.arange(3.0)
    assert best.offer(1.0, 0, model, snapshot=lambda: point.clone())
    point += 1.0
    assert best.weights is None and best.point.tolist() == [0.0, 1.0, 2.0]
    assert best.offer(0.5, 1, model) and best.point is None and best.weights is not None


@pytest.mark.parametrize("method, mu_dec, mu_1", [("lm", 1e-8, 1e-11), ("lm", 1e-300, 1e-20), ("br", 1e-300, 1e-20)])
def test_mu_is_floored_at_1e_minus_20_after_accepted_steps(method, mu_dec, mu_1):
    # MATLAB trainlm/trainbr: ``mu = mu * mu_dec; if (mu < 1e-20), mu = 1e-20; end``. Without the
    # floor, mu_dec=1e-300 takes mu to 1e-303 after one accepted step (and towards underflow after two).
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, method=method, epochs=6, mu_dec=mu_dec, min_grad=0.0)
    mu = history["mu"]
    # lm: epoch 1 accepts its first trial, mu = 1e-3 (on J^T J / N, as trainlm); br: at mu = 0.5.
    assert min(mu) >= 1e-20 and mu[1] == pytest.approx(mu_1, rel=1e-12)
    assert all(b <= a for a, b in zip(history["perf"], history["perf"][1:]))


def test_numpy_scalars_are_accepted_as_options():
    # np.float32 is not a Python float: the stopping rules take any real number.
    X, y = smooth_data()
    history = fit(tanh_net(), X, y, epochs=np.int64(50), goal=np.float32(1e-3), min_grad=np.float32(0.0),
                  time_limit=np.float64(1e6), mu=np.float32(1e-3))
    assert history.stop_reason == STOP_REASONS["goal"] and history["perf"][-1] <= np.float32(1e-3)


def test_numpy_integer_seed_and_batch_size_train_as_python_ints():
    # Both passed validation, then torch.manual_seed ('an integer is required') and torch.split
    # ('must be tuple of ints') refused them, the latter after the MLP's ranges had been set.
    X, y = smooth_data(n=20)
    runs = [fit(tanh_net(), X, y, epochs=3, seed=seed, batch_size=size, division="random", progress=False)
            for seed, size in ((np.int64(3), np.int32(4)), (3, 4))]
    assert runs[0]["perf"] == runs[1]["perf"] and len(runs[0]) == 4


def test_a_model_that_is_not_a_module_is_a_type_error():
    X, y = smooth_data()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; received str"):
        fit("model", X, y)


def test_inputs_with_the_wrong_number_of_features_name_the_mlp_inputs():
    from marquardt import mlp

    model = mlp(3, 4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"The model cannot take X of shape \(5, 2\) .* MLP with n_inputs=3 needs "
                                         r"inputs of shape \(N, 3\)"):
        fit(model, torch.zeros(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64))
    assert not model.normalization_set


def test_the_shape_probe_leaves_batchnorm_statistics_and_modes_alone():
    # fit checks the output shape on two samples before training; in training mode that
    # forward pass moved BatchNorm's running statistics even when fit then refused the targets.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    model[3].eval()  # a user's own mixed modes are kept as they were
    with pytest.raises(ValueError, match="does not match the targets"):
        fit(model, torch.randn(20, 1), torch.randn(20, 3), epochs=2)
    assert model[1].running_mean.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert int(model[1].num_batches_tracked) == 0
    assert [m.training for m in model] == [True, True, True, False]


def test_lbfgs_class_trains_through_a_closure():
    # "any torch.optim class": LBFGS needs a closure at every step (it was a TypeError).
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 30, dtype=torch.float64)[:, None]
    model = nn.Linear(1, 1).double()
    history = fit(model, X, 2 * X + 1, method=torch.optim.LBFGS, epochs=3)
    assert history["perf"][0] > 1e-2 and history["perf"][-1] < 1e-9
    assert float(model.weight.detach()) == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize("method", ["lm", "gd", "br"])
def test_a_model_with_every_parameter_frozen_is_refused_naming_it(method):
    # torch.cat(): expected a non-empty list of Tensors (lm), or autograd's "does not require grad" (gd).
    model = tanh_net().requires_grad_(False)
    with pytest.raises(ValueError, match=r"model has no parameters to train: every parameter has requires_grad=False"):
        fit(model, X_OK, Y_OK, method=method, epochs=2)


class _Outputs(nn.Module):
    """A linear model whose forward wraps its outputs as ``kind`` says."""

    def __init__(self, kind):
        super().__init__()
        self.linear, self.kind = nn.Linear(1, 1).double(), kind

    def forward(self, X):
        out = self.linear(X)
        return {"tuple": lambda: (out, out), "dict": lambda: {"y": out}, "complex": lambda: out * (1 + 0j)}[self.kind]()


@pytest.mark.parametrize("method", ["lm", "gd"])
@pytest.mark.parametrize(("kind", "match"), [
    ("tuple", r"model\(X\) must return one tensor of outputs; received tuple"),
    ("dict", r"model\(X\) must return one tensor of outputs; received dict"),
    ("complex", r"model\(X\) must return real floating-point outputs; received dtype torch.complex128"),
])
def test_outputs_that_are_not_one_real_tensor_are_refused_before_training(kind, match, method):
    # They used to reach training: AttributeError ('tuple' object has no attribute 'shape') or
    # torch's own errors from inside the first epoch.
    with pytest.raises(TypeError, match=match):
        fit(_Outputs(kind), X_OK, Y_OK, method=method, epochs=2)


class _NaNBeyond(nn.Module):
    """``w * x`` whose outputs are NaN while ``|w| > 1``."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, X):
        out = self.w * X
        return torch.where(self.w.abs() > 1, torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("method, options, cost", [
    ("lm", {}, "nan"), ("br", {}, "nan"),
    # The mini-batch steps linearize batches only: the start was not checked, perf [nan, nan] and
    # "Maximum MU reached." (the trial's cost, inf for a NaN, is the one checked there).
    ("lm", {"batch_size": 2, "seed": 0}, "inf"),
    # First-order methods stepped on NaN for every epoch and stopped on "Maximum epoch reached.".
    ("gd", {}, "nan"), ("momentum", {}, "nan"), (torch.optim.Adam, {}, "nan"),
])
def test_a_non_finite_start_is_a_value_error_before_any_step(method, options, cost):
    # LM used to record perf=nan, refuse every trial and stop on "Maximum MU reached" at epoch 1.
    model = _NaNBeyond(2.0)
    with pytest.raises(ValueError, match=rf"The training cost at the initial weights is not finite \({cost}\): model"):
        fit(model, X_OK, Y_OK, method=method, **options)
    assert float(model.w.detach()) == 2.0 and model.w.grad is None


def test_a_first_order_start_whose_cost_overflows_float32_is_the_value_error_naming_the_dtype():
    # Weights of 3e38 give outputs of inf: the runs recorded perf = inf then nan for every epoch.
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(3e38)
        model.bias.zero_()
    X = torch.linspace(1, 2, 10)[:, None]
    for method in ("gd", "momentum"):
        with pytest.raises(ValueError, match=r"not finite \(inf\): .* overflows float32\. .* or train in float64"):
            fit(model, X, 2 * X, method=method, epochs=5)
        assert model.weight.item() == pytest.approx(3e38, rel=1e-7) and model.bias.item() == 0.0


def test_a_float32_cost_that_overflows_at_the_start_is_a_value_error_naming_the_dtype():
    # Residuals of 1e18 are finite in float32, their sum of squares is not (1,153 parameters: J^T J
    # and the cost accumulate in float32). Every trial was refused until "Maximum MU reached".
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    X = torch.linspace(-1, 1, 2000)[:, None]
    with pytest.raises(ValueError, match=r"not finite \(inf\): .* overflows float32\. .* or train in float64"):
        fit(model, X, torch.full_like(X, 1e18))


def test_the_record_evaluates_the_validation_set_in_eval_mode():
    # The record ran the validation and test sets through the model in training mode: BatchNorm's
    # running mean absorbed validation inputs shifted by +50, and a dropout mask made vperf
    # noisy (a spurious validation stop with weights that did not move).
    X, y = smooth_data(60)

    def batchnorm_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1)).double()

    class RunningMeans(Callback):
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, history, model):
            self.seen.append(model[1].running_mean.clone())

    with_val, alone = RunningMeans(), RunningMeans()
    fit(batchnorm_net(), X, y, method="gd", lr=0.01, epochs=3, validation_data=(X + 50.0, y), callbacks=[with_val])
    fit(batchnorm_net(), X, y, method="gd", lr=0.01, epochs=3, callbacks=[alone])
    assert len(with_val.seen) == len(alone.seen) == 4  # epochs 0 to 3
    assert not torch.equal(with_val.seen[-1], with_val.seen[0])  # the training steps move them
    assert all(torch.equal(a, b) for a, b in zip(with_val.seen, alone.seen))
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Dropout(0.5), nn.Linear(20, 1)).double()
    history = fit(dropout, X, y, method="gd", lr=1e-300, epochs=5, validation_data=(X, y), max_fail=None)
    assert dropout.training
    assert len(set(history["vperf"])) == 1  # the weights do not move: one vperf


class FunctionalDropout(nn.Module):
    """Dropout called in ``forward`` (no nn.Dropout submodule): torch.func's rows, not a module scan, meet it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.tanh(self.a(x)), 0.3, training=self.training))


@pytest.mark.parametrize("solver", ["auto", "sample-space", "matrix-free"])
def test_lm_with_functional_dropout_in_training_mode_is_the_documented_value_error(solver):
    # It was torch's "vmap: called random operation while in randomness error mode" RuntimeError;
    # the matrix-free form, which forms no per-sample rows, trained on random costs.
    torch.manual_seed(0)
    model = FunctionalDropout().double()
    X, y = smooth_data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model\(X\) calls a random operation \(functional dropout .* call "
                                         r"model.eval\(\) first .* or train with a first-order method"):
        fit(model, X, y, epochs=3, solver=solver)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    history = fit(model.eval(), X, y, epochs=3, solver=solver)  # dropout off: deterministic, trains
    assert history["perf"][-1] < history["perf"][0]


def test_lm_damps_j_transpose_j_over_the_number_of_errors_as_trainlm():
    # trainlm (R2012b on) solves (J^T J / N + mu I) dx = -J^T e / N: nnCalcLib.perfsJEJJ divides
    # both by the N errors of a normalized performance. fit solved (J^T J + mu I): with N = 100
    # and mu = 10 one epoch moved the weight to 2.318 where trainlm moves it to 0.0987.
    X = torch.linspace(-1, 1, 100, dtype=torch.float64)[:, None]
    y = 3 * X + 0.5
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(0.0), model.bias.fill_(0.0)
    fit(model, X, y, epochs=1, mu=10.0, min_grad=0.0)
    J = np.hstack([X.numpy(), np.ones((100, 1))])
    e = -y.numpy()[:, 0]
    step = -np.linalg.solve(J.T @ J + 100 * 10.0 * np.eye(2), J.T @ e)
    np.testing.assert_allclose([model.weight.item(), model.bias.item()], step, rtol=1e-12)
    assert model.weight.item() == pytest.approx(0.0987, abs=5e-5)


class _CustomNet(nn.Module):
    """A network ``describe`` does not read: trained through torch.func."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 8, dtype=dtype), nn.Linear(8, 1, dtype=dtype)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["normal", "sample-space"])
def test_trial_and_linearization_costs_agree_for_lower_precision_modules(dtype, form):
    # A trial's cost and the linearization's decide together whether a step is kept. A float32
    # module summed its trial costs in float32 against a float64 linearization, and a float16
    # one read 1238.0 against 1238.19 at the same weights; vmap's per-sample outputs in float16
    # also differed from the batched forward pass (814.1756 against 814.1453).
    from marquardt.network import ModuleProblem, flatten_parameters

    torch.manual_seed(0)
    n = 3000 if form == "normal" else 20  # sample space: fewer residuals than the 25 parameters
    X = torch.linspace(-2, 2, n, dtype=dtype)[:, None]
    model = _CustomNet(dtype)
    problem = ModuleProblem(model, X, torch.sin(2 * X), solver=form)
    x = flatten_parameters(model)
    for point in (x, x + 0.01):
        lin = problem.linearize(point)
        assert problem.cost(point) == lin.cost
    with torch.no_grad():
        exact = 0.5 * float(((model(X).double() - torch.sin(2 * X).double()) ** 2).sum())
    assert problem.linearize(x).cost == pytest.approx(exact, rel=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("division", ["random", "block", "interleaved"])
def test_the_history_keeps_the_rows_of_each_set_as_matlab_tr_does(division, tmp_path):
    # MATLAB users select the test samples by tr.testInd (plotregression(t(tr.testInd), ...)).
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    history = fit(net, X, y, division=division, epochs=3, seed=7, progress=False)
    rows = np.concatenate([history.trainInd, history.valInd, history.testInd])
    assert sorted(rows.tolist()) == list(range(40))
    assert [len(history.trainInd), len(history.valInd), len(history.testInd)] == [28, 6, 6]
    with torch.no_grad():
        test_mse = float(((net(X[history.testInd]) - y[history.testInd]) ** 2).mean())
    assert history.best_tperf == pytest.approx(test_mse, rel=1e-12)  # the model ends on the best weights
    back = marquardt.History.from_json(history.to_json(tmp_path / "h.json"))
    assert back == history and back.testInd.tolist() == history.testInd.tolist()


def test_an_undivided_run_has_no_division():
    X = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    history = fit(nn.Linear(1, 1).double(), X, 2 * X, epochs=1, progress=False)
    assert history.division is None and history.testInd is None and "division" not in history.to_dict()


def test_test_data_is_recorded_as_tperf_and_never_trained_on():
    # MATLAB's divideind: explicit validation and test sets. The test set only reads.
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 60, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X)
    train, val, test = (X[0::3], y[0::3]), (X[1::3], y[1::3]), (X[2::3], y[2::3])
    make = lambda: nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()  # noqa: E731
    torch.manual_seed(1)
    with_test = make()
    torch.manual_seed(1)
    without = make()
    history = fit(with_test, *train, validation_data=val, test_data=test, epochs=15, progress=False)
    reference = fit(without, *train, validation_data=val, epochs=15, progress=False)
    assert history["perf"] == reference["perf"] and history["vperf"] == reference["vperf"]
    assert all(math.isfinite(t) for t in history["tperf"])
    with torch.no_grad():
        assert history.best_tperf == pytest.approx(float(((with_test(test[0]) - test[1]) ** 2).mean()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(solver="normal"), dict(solver="sample-space"), dict(solver="auto"),
                                     dict(method="br")], ids=["normal", "sample-space", "auto", "br"])
def test_a_half_precision_network_past_the_float64_promotion_trains_on_every_exact_path(dtype, options):
    # 1,882 parameters, past PROMOTE_MAX_PARAMS: the system was assembled and factorized in
    # float16 ('"cholesky_cpu" not implemented for Half' in the first step); now in float32.
    torch.manual_seed(0)
    X = torch.randn(300, 3).to(dtype)
    y = torch.sin(X[:, :2].float()).to(dtype)
    net = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 2)).to(dtype)
    history = fit(net, X, y, epochs=4, progress=False, **options)
    assert len(history) == 5 and history["perf"][-1] < 0.5 * history["perf"][0]
    assert net[0].weight.dtype == dtype


def test_trainbr_in_sample_space_assembles_its_gram_as_the_normal_form_does():
    # A float32 network with fewer residuals than parameters (sample space under "auto"):
    # trainbr's J^T J was formed from the float32 rows in float32, where the normal form
    # promotes a problem this small to float64.
    from marquardt.bayesian import data_gram
    from marquardt.network import ModuleProblem, flatten_parameters

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 29), nn.Tanh(), nn.Linear(29, 29), nn.Tanh(), nn.Linear(29, 1))
    X = torch.randn(300, 2)
    problem = ModuleProblem(net, X, torch.sin(X[:, :1]), solver="sample-space")
    lin = problem.linearize(flatten_parameters(net))
    normal = ModuleProblem(net, X, torch.sin(X[:, :1]), solver="normal").linearize(flatten_parameters(net))
    gram = data_gram(lin.system)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, data_gram(normal.system), rtol=1e-6, atol=1e-9)
