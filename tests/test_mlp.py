"""Tests for marquardt.mlp: architecture, Nguyen-Widrow init, mapminmax normalisation, training units in fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from marquardt.io import load, save
from marquardt.mlp import MLP, mlp, nguyen_widrow_
from marquardt.train import fit

DTYPES = [torch.float32, torch.float64]


def _data(dtype: torch.dtype, n: int = 30, n_inputs: int = 3, n_outputs: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_inputs, generator=gen, dtype=torch.float64) * 7 + 3
    y = torch.randn(n, n_outputs, generator=gen, dtype=torch.float64) * 0.01 - 100
    return X.to(dtype), y.to(dtype)


def _linears(model: MLP) -> list[nn.Linear]:
    return [m for m in model.net if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "hidden, expected_types",
    [
        ((), ["Linear"]),
        ((5,), ["Linear", "Tanh", "Linear"]),
        (7, ["Linear", "Tanh", "Linear"]),
        ((4, 3), ["Linear", "Tanh", "Linear", "Tanh", "Linear"]),
    ],
)
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_layers_and_output_shape(hidden, expected_types, n_outputs):
    model = mlp(2, hidden, n_outputs)
    assert isinstance(model.net, nn.Sequential)
    assert [type(m).__name__ for m in model.net] == expected_types
    assert model(torch.randn(6, 2)).shape == (6, n_outputs)


@pytest.mark.parametrize(
    "activation, module",
    [
        ("tanh", nn.Tanh),
        ("tansig", nn.Tanh),
        ("sigmoid", nn.Sigmoid),
        ("logsig", nn.Sigmoid),
        ("relu", nn.ReLU),
        ("linear", nn.Identity),
        ("purelin", nn.Identity),
        ("TANH", nn.Tanh),
    ],
)
def test_activation_names(activation, module):
    model = mlp(2, (3, 3), activation=activation)
    assert [type(m) for m in model.net][1::2] == [module, module]


def test_mlp_factory_matches_class():
    torch.manual_seed(3)
    a = mlp(3, (4,), 2, activation="sigmoid", dtype=torch.float64)
    torch.manual_seed(3)
    b = MLP(3, (4,), 2, activation="sigmoid", dtype=torch.float64)
    assert a.config() == b.config()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_of_parameters_buffers_and_output(dtype):
    model = mlp(3, (4,), 2, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.x_min.dtype == dtype and model.y_max.dtype == dtype
    X, y = _data(dtype)
    model.set_normalization(X, y)
    assert model(X).dtype == dtype


# ------------------------------------------------------------------------ initialisation


def test_init_is_deterministic_given_manual_seed():
    torch.manual_seed(123)
    a = mlp(3, (6, 4), 2).state_dict()
    torch.manual_seed(123)
    b = mlp(3, (6, 4), 2).state_dict()
    torch.manual_seed(124)
    c = mlp(3, (6, 4), 2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])


@pytest.mark.parametrize("init", ["nguyen-widrow", "default"])
def test_init_is_deterministic_given_generator(init):
    a = mlp(3, (6,), init=init, generator=torch.Generator().manual_seed(5)).state_dict()
    b = mlp(3, (6,), init=init, generator=torch.Generator().manual_seed(5)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_same_values_in_float32_and_float64():
    torch.manual_seed(0)
    single = mlp(3, (5,), dtype=torch.float32)
    torch.manual_seed(0)
    double = mlp(3, (5,), dtype=torch.float64)
    for p32, p64 in zip(single.parameters(), double.parameters()):
        assert torch.equal(p32, p64.to(torch.float32))


# initnw's conversions: net inputs of [-1, 1] stretched to the active input range (x2 for
# tansig's [-2, 2], x4 for logsig's [-4, 4]); a layer fed by logsig outputs in [0, 1] has
# its inputs mapped to [-1, 1] (weights x2, bias - sum of the stretched weights).
INITNW_CASES = [
    # activation, layer index, (weight norm factor on beta, input gain, input offset)
    ("tanh", 0, 2.0, 1.0, 0.0),
    ("tanh", 1, 2.0, 1.0, 0.0),
    ("sigmoid", 0, 4.0, 1.0, 0.0),
    ("sigmoid", 1, 4.0, 2.0, -1.0),
]


@pytest.mark.parametrize("activation, index, stretch, gain, offset", INITNW_CASES)
@pytest.mark.parametrize("hidden", [(10, 4), (7, 3), (1, 1)])
def test_nguyen_widrow_matches_matlab_initnw(activation, index, stretch, gain, offset, hidden):
    model = mlp(4, hidden, activation=activation, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = _linears(model)[index]
    s, r = layer.out_features, layer.in_features
    beta = 0.7 * s ** (1 / r)
    # Undo the input conversion to recover initnw's [-1, 1] weights and biases.
    weight = layer.weight / gain
    bias = layer.bias - offset * weight.sum(dim=1)
    torch.testing.assert_close(weight.norm(dim=1), torch.full((s,), stretch * beta, dtype=torch.float64))
    spread = torch.linspace(-beta, beta, s, dtype=torch.float64) if s > 1 else torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(bias, stretch * spread * torch.sign(weight[:, 0]))


def test_nguyen_widrow_hand_computed_single_input():
    # One input, S = 3: beta = 2.1, every direction is +-1; tansig doubles weights and biases.
    layer = nn.Linear(1, 3, dtype=torch.float64)
    nguyen_widrow_(layer, torch.Generator().manual_seed(0))
    signs = torch.sign(layer.weight[:, 0])
    torch.testing.assert_close(layer.weight[:, 0], 4.2 * signs)
    torch.testing.assert_close(layer.bias, torch.tensor([-4.2, 0.0, 4.2], dtype=torch.float64) * signs)


def test_nguyen_widrow_logsig_input_range_shifts_biases():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 5, dtype=torch.float64), nn.Linear(3, 5, dtype=torch.float64)
    nguyen_widrow_(a, torch.Generator().manual_seed(2), activation="logsig")
    nguyen_widrow_(b, torch.Generator().manual_seed(2), activation="logsig", input_range=(0.0, 1.0))
    # Same net inputs: inputs u in [0, 1] through b equal 2u - 1 in [-1, 1] through a.
    u = torch.rand(6, 3, dtype=torch.float64)
    torch.testing.assert_close(b(u), a(2 * u - 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "relu"}, "finite active input range"),
        ({"input_range": (1.0, 1.0)}, "input_range"),
        ({"input_range": (0.0, math.inf)}, "input_range"),
    ],
)
def test_nguyen_widrow_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nguyen_widrow_(nn.Linear(2, 3), **kwargs)


@pytest.mark.parametrize(
    "linear, kwargs, error, match",
    [
        (nn.Linear(2, 3), {"input_range": (1.0,)}, ValueError, r"input_range must be finite \(low, high\).*received \(1\.0,\)"),
        (nn.Linear(2, 3), {"input_range": None}, ValueError, r"input_range must be finite.*received None"),
        (nn.Linear(2, 3), {"input_range": ("a", "b")}, ValueError, r"input_range must be finite.*received \('a', 'b'\)"),
        (nn.Linear(2, 3), {"generator": 3}, TypeError, r"generator must be a torch\.Generator or None, received 3"),
        (nn.Conv1d(1, 1, 1), {}, TypeError, r"linear must be a torch\.nn\.Linear, received Conv1d"),
    ],
)
def test_nguyen_widrow_names_the_bad_argument(linear, kwargs, error, match):
    before = [p.detach().clone() for p in linear.parameters()]
    with pytest.raises(error, match=match):
        nguyen_widrow_(linear, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, linear.parameters()))


def test_nguyen_widrow_takes_an_array_input_range():
    a, b = nn.Linear(2, 3, dtype=torch.float64), nn.Linear(2, 3, dtype=torch.float64)
    nguyen_widrow_(a, torch.Generator().manual_seed(1), activation="sigmoid", input_range=np.array([0.0, 1.0]))
    nguyen_widrow_(b, torch.Generator().manual_seed(1), activation="sigmoid", input_range=(0.0, 1.0))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
def test_output_layer_and_non_sigmoidal_layers_use_rands(activation):
    # initnw falls back to rands (uniform [-1, 1]) where the active input range is infinite.
    model = mlp(3, (50,), 2, activation=activation, dtype=torch.float64)
    layers = _linears(model) if activation != "tanh" else _linears(model)[-1:]
    for layer in layers:
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max() <= 1
    if activation != "tanh":
        norms = _linears(model)[0].weight.norm(dim=1)
        assert not torch.allclose(norms, norms[0].expand_as(norms))


def test_default_init_with_generator_stays_in_pytorch_bounds():
    model = mlp(9, (20,), init="default", generator=torch.Generator().manual_seed(0))
    for layer in _linears(model):
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


def test_generator_leaves_global_rng_alone_for_nguyen_widrow_draws():
    gen_a = torch.Generator().manual_seed(9)
    torch.manual_seed(0)
    a = mlp(2, (3,), generator=gen_a)
    torch.manual_seed(1)
    b = mlp(2, (3,), generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_nguyen_widrow_needs_bias():
    with pytest.raises(ValueError, match="bias=None"):
        nguyen_widrow_(nn.Linear(2, 3, bias=False))


# -------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalization_maps_training_range_to_exactly_minus_one_one(dtype):
    model = mlp(3, (4,), 2, dtype=dtype)
    X, y = _data(dtype)
    assert not model.normalization_set
    model.set_normalization(X, y)
    assert model.normalization_set
    for raw, mapped in ((X, model.normalize_inputs(X)), (y, model.normalize_targets(y))):
        rows_min, rows_max = raw.argmin(dim=0), raw.argmax(dim=0)
        cols = torch.arange(raw.shape[1])
        assert torch.all(mapped[rows_min, cols] == -1)
        assert torch.all(mapped[rows_max, cols] == 1)
        assert mapped.min() >= -1 and mapped.max() <= 1


def test_float16_range_wider_than_half_the_dtype_maps_its_maximum_to_one():
    # 2 * (40000 - 0) overflows float16 (max 65504): the maximum mapped to inf before.
    model = mlp(1, (3,), 1, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    X = torch.tensor([[0.0], [10000.0], [20000.0], [40000.0]], dtype=torch.float16)
    model.set_normalization(X, X)
    expected = torch.tensor([-1.0, -0.5, 0.0, 1.0], dtype=torch.float16)
    assert torch.equal(model.normalize_inputs(X).reshape(-1), expected)
    assert torch.equal(model.normalize_targets(X).reshape(-1), expected)
    assert torch.equal(model.denormalize_outputs(expected.reshape(-1, 1)), X)


@pytest.mark.parametrize("name", ["X", "y"])
def test_set_normalization_refuses_a_range_that_overflows_the_dtype(name):
    model = mlp(2, (3,), 1, dtype=torch.float64)
    X = torch.tensor([[-1e308, 0.0], [1e308, 1.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    X, y = (X, y) if name == "X" else (X[:, [1, 1]], X[:, 0])
    match = rf"Invalid {name} value: column 0 spans \[-1e\+308, 1e\+308\].*overflows torch.float64"
    with pytest.raises(ValueError, match=match):
        model.set_normalization(X, y)
    assert not model.normalization_set


@pytest.mark.parametrize("dtype", DTYPES)
def test_targets_round_trip(dtype):
    model = mlp(3, (4,), 2, dtype=dtype)
    X, y = _data(dtype)
    model.set_normalization(X, y)
    torch.testing.assert_close(model.denormalize_outputs(model.normalize_targets(y)), y)


def test_one_dimensional_targets_for_one_output():
    model = mlp(3, (4,), 1, dtype=torch.float64)
    X, y = _data(torch.float64, n_outputs=1)
    model.set_normalization(X, y[:, 0])
    torch.testing.assert_close(model.y_min, y.amin(0))
    normalized = model.normalize_targets(y[:, 0])
    assert normalized.shape == (30,) and normalized.min() == -1 and normalized.max() == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_input_column_maps_to_zero_without_nan(dtype):
    model = mlp(3, (4,), 2, dtype=dtype)
    X, y = _data(dtype)
    X[:, 1] = 42.0
    model.set_normalization(X, y)
    assert torch.all(model.normalize_inputs(X)[:, 1] == 0)
    x = X.clone().requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_constant_target_comes_back_as_its_constant():
    model = mlp(3, (4,), 2, dtype=torch.float64)
    X, y = _data(torch.float64)
    y[:, 0] = -7.5
    model.set_normalization(X, y)
    assert torch.all(model.normalize_targets(y)[:, 0] == 0)
    assert torch.all(model(X)[:, 0] == -7.5)
    assert torch.all(model.denormalize_outputs(torch.randn(5, 2, dtype=torch.float64))[:, 0] == -7.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_denormalize_net_normalize(dtype):
    model = mlp(3, (4,), 2, dtype=dtype)
    X, y = _data(dtype)
    model.set_normalization(X, y)
    raw = _data(dtype, seed=1)[0] * 3
    expected = model.denormalize_outputs(model.net(model.normalize_inputs(raw)))
    assert torch.equal(model(raw), expected)
    assert torch.equal(model.forward_normalized(model.normalize_inputs(raw)), model.net(model.normalize_inputs(raw)))


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_without_statistics_is_the_bare_network(normalize):
    model = mlp(3, (4,), 2, normalize=normalize, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64) * 1e-9  # identity must be exact, even near 0
    assert torch.equal(model(x), model.net(x))
    assert torch.equal(model.normalize_targets(x[:, :2]), x[:, :2])


def test_normalize_false_refuses_statistics():
    model = mlp(3, (4,), 2, normalize=False)
    with pytest.raises(ValueError, match="normalize=False"):
        model.set_normalization(*_data(torch.float32))


def test_statistics_are_buffers_in_state_dict():
    source = mlp(3, (4,), 2, dtype=torch.float64)
    source.set_normalization(*_data(torch.float64))
    target = mlp(3, (4,), 2, dtype=torch.float64)
    assert {"x_min", "x_max", "y_min", "y_max", "stats_set"} <= set(source.state_dict())
    target.load_state_dict(source.state_dict())
    assert target.normalization_set
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(target(x), source(x))


def test_set_normalization_accepts_numpy_and_returns_self():
    X, y = _data(torch.float64)
    model = mlp(3, (4,), 2, dtype=torch.float64)
    assert model.set_normalization(X.numpy(), y.numpy()) is model
    assert torch.equal(model.x_max, X.amax(0))


@pytest.mark.parametrize(
    "X_shape, y_shape, match",
    [
        ((10, 2), (10, 2), r"X must have shape \(N, 3\).*received shape \(10, 2\)"),
        ((10, 3), (10, 1), r"y must have shape \(N, 2\).*received shape \(10, 1\)"),
        ((10, 3), (9, 2), r"same number of rows, received 10 and 9"),
        ((0, 3), (0, 2), r"X must have shape .*received shape \(0, 3\)"),
        ((10,), (10, 2), r"X must have shape .*received shape \(10,\)"),
    ],
)
def test_set_normalization_rejects_bad_shapes(X_shape, y_shape, match):
    model = mlp(3, (4,), 2)
    with pytest.raises(ValueError, match=match):
        model.set_normalization(torch.zeros(X_shape), torch.zeros(y_shape))


def test_set_normalization_rejects_non_finite():
    X, y = _data(torch.float64)
    X[3, 0] = float("nan")
    with pytest.raises(ValueError, match="X must be finite"):
        mlp(3, (4,), 2).set_normalization(X, y)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"hidden": (6, 2), "n_outputs": 3, "activation": "logsig", "normalize": False, "init": "default"},
        {"hidden": ()},
    ],
)
def test_config_round_trip_through_json(kwargs):
    model = mlp(4, **kwargs)
    cfg = json.loads(json.dumps(model.config()))
    rebuilt = MLP.from_config(cfg)
    assert rebuilt.config() == model.config()
    assert [type(m) for m in rebuilt.net] == [type(m) for m in model.net]
    assert set(cfg) == {"n_inputs", "hidden", "n_outputs", "activation", "normalize", "init"}


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        ("not a dict", TypeError, "cfg must be a mapping"),
        ({"n_inputs": 2}, ValueError, r"missing=\['hidden'"),
        ({**mlp(2).config(), "extra": 1}, ValueError, r"unknown=\['extra'\]"),
        ({**mlp(2).config(), "hidden": [3, 0]}, ValueError, r"hidden .*received \(3, 0\)"),
    ],
)
def test_from_config_rejects_bad_configs(cfg, error, match):
    with pytest.raises(error, match=match):
        MLP.from_config(cfg)


# ---------------------------------------------------------------------------- bad args


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_inputs": 0}, ValueError, r"n_inputs must be a positive int, received 0"),
        ({"n_inputs": -3}, ValueError, r"n_inputs must be a positive int, received -3"),
        ({"n_inputs": 2.5}, TypeError, r"n_inputs must be a positive int, received 2\.5"),
        ({"n_inputs": True}, TypeError, r"n_inputs must be a positive int, received True"),
        ({"n_outputs": 0}, ValueError, r"n_outputs must be a positive int, received 0"),
        ({"hidden": (10, 0)}, ValueError, r"hidden must contain only positive ints.*received \(10, 0\)"),
        ({"hidden": 0}, ValueError, r"hidden must contain only positive ints.*received \(0,\)"),
        ({"hidden": (-1,)}, ValueError, r"hidden must contain only positive ints.*received \(-1,\)"),
        ({"hidden": (4.0,)}, ValueError, r"hidden must contain only positive ints.*received \(4\.0,\)"),
        ({"hidden": "10"}, TypeError, r"hidden must be an int or a sequence.*received '10'"),
        ({"hidden": None}, TypeError, r"hidden must be an int or a sequence.*received None"),
        ({"activation": "softmax"}, ValueError, r"activation must be one of .*received 'softmax'"),
        ({"activation": 3}, TypeError, r"activation must be a str, received 3"),
        ({"init": "xavier"}, ValueError, r"init must be one of .*received 'xavier'"),
        ({"normalize": "yes"}, TypeError, r"normalize must be a bool, received 'yes'"),
        ({"dtype": torch.int64}, ValueError, r"dtype must be a real floating dtype.*received torch\.int64"),
        ({"dtype": "float64"}, TypeError, r"dtype must be a torch\.dtype or None, received 'float64'"),
        ({"generator": 5}, TypeError, r"generator must be a torch\.Generator or None, received 5"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"n_inputs": 2, **kwargs}
    with pytest.raises(error, match=match):
        mlp(**args)


def test_numpy_integers_build_the_same_network_with_python_int_config():
    # n_outputs = labels.max() + 1 is a numpy integer; sklearn-style hidden sizes an array.
    labels = np.array([0, 2, 1, 2])
    model = mlp(np.int64(3), hidden=np.array([4, 2]), n_outputs=labels.max() + 1, normalize=np.True_,
                generator=torch.Generator().manual_seed(0))
    reference = mlp(3, hidden=(4, 2), n_outputs=3, generator=torch.Generator().manual_seed(0))
    assert model.config() == reference.config()
    assert json.loads(json.dumps(model.config()))["hidden"] == [4, 2]
    assert all(type(v) is int for v in (model.n_inputs, model.n_outputs, *model.hidden))
    assert type(model.normalize) is bool
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert mlp(2, hidden=[np.int32(5)]).hidden == (5,)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_inputs": np.float64(2.0)}, TypeError, r"n_inputs must be a positive int, received np\.float64\(2\.0\)"),
    ({"n_outputs": np.True_}, TypeError, r"n_outputs must be a positive int, received np\.True_"),
    ({"hidden": np.array([4.0])}, ValueError, r"hidden must contain only positive ints.*received \(4\.0,\)"),
    ({"hidden": np.ones((2, 2), dtype=int)}, TypeError, r"hidden must be an int or a sequence"),
    ({"hidden": np.int64(0)}, ValueError, r"hidden must contain only positive ints.*received \(np\.int64\(0\),\)"),
])
def test_bad_numpy_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mlp(**{"n_inputs": 2, **kwargs})


def test_set_normalization_without_targets_leaves_outputs_unmapped():
    model = mlp(3, (4,), 2, dtype=torch.float64)
    X, y = _data(torch.float64)
    model.set_normalization(X, None)
    assert model.normalization_set
    torch.testing.assert_close(model.normalize_targets(y), y)
    torch.testing.assert_close(model(X), model.net(model.normalize_inputs(X)))


# ------------------------------------------------------------------- training with fit


@pytest.fixture
def one_thread():
    """Tiny networks: one BLAS thread is faster, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wide_range_problem():
    """A curve sampled on [0, 1] in 'unit' form and as inputs on [0, 1000], targets on [-1e4, 1e4]."""
    u = torch.linspace(0, 1, 200, dtype=torch.float64)[:, None]
    noise = 0.02 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curve = torch.sin(2 * math.pi * u) * (1 - 0.5 * u) + noise
    curve = 2 * (curve - curve.min()) / (curve.max() - curve.min()) - 1  # exactly [-1, 1]
    return {"scaled": (2 * u - 1, curve), "raw": (1000 * u, 1e4 * curve)}


def _normalized_mse(model, X, y):
    half_range = float(y.max() - y.min()) / 2
    with torch.no_grad():
        return float(((model(X) - y) ** 2).mean()) / half_range**2


@pytest.mark.usefixtures("one_thread")
def test_fit_sets_normalization_and_trains_wide_ranges_as_well_as_scaled_data(tmp_path):
    results = {}
    for name, (X, y) in _wide_range_problem().items():
        model = mlp(1, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        history = fit(model, X, y, epochs=100, seed=0)
        assert model.normalization_set
        assert (float(model.x_min), float(model.x_max)) == (float(X.min()), float(X.max()))
        # History is in the original target units, the model's outputs are too.
        assert history[history.best_epoch]["perf"] == pytest.approx(_normalized_mse(model, X, y) * float(y.max()) ** 2, rel=1e-9)
        results[name] = (_normalized_mse(model, X, y), model, X)
    raw, scaled = results["raw"][0], results["scaled"][0]
    assert raw < 2e-3 and raw == pytest.approx(scaled, rel=1e-3)
    model, X = results["raw"][1:]
    save(model, tmp_path / "wide")
    assert torch.equal(load(tmp_path / "wide")(X), model(X))


@pytest.mark.usefixtures("one_thread")
def test_without_normalization_wide_ranges_train_badly():
    # The contrast that motivates mapminmax: the same network on raw units stalls.
    X, y = _wide_range_problem()["raw"]
    model = mlp(1, 10, normalize=False, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fit(model, X, y, epochs=100, seed=0)
    assert _normalized_mse(model, X, y) > 0.1


@pytest.mark.usefixtures("one_thread")
def test_fit_keeps_normalization_that_is_already_set():
    X, y = _wide_range_problem()["raw"]
    model = mlp(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.set_normalization(torch.tensor([[-5.0], [2000.0]], dtype=torch.float64), torch.tensor([-2e4, 3e4], dtype=torch.float64))
    fit(model, X, y, epochs=3)
    assert (float(model.x_min), float(model.x_max), float(model.y_min), float(model.y_max)) == (-5.0, 2000.0, -2e4, 3e4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method, options", [("gd", {"lr": 0.05}), ("lm", {"batch_size": 50})])
def test_other_trainers_also_work_in_normalized_units(method, options):
    X, y = _wide_range_problem()["raw"]
    model = mlp(1, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    history = fit(model, X, y, method=method, epochs=20, seed=0, **options)
    assert all(math.isfinite(r["perf"]) for r in history.records)
    assert history[history.best_epoch]["perf"] < history[0]["perf"]


@pytest.mark.parametrize("shape", [(5, 2), (5, 4), (2,), (5, 3, 1)])
def test_forward_rejects_inputs_of_the_wrong_width(shape):
    # Before: torch's "size of tensor a (2) must match the size of tensor b (3)" from the mapminmax buffers.
    model = mlp(3, hidden=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"MLP with n_inputs=3 needs inputs of shape \(N, 3\); received shape "
                                         rf"\({', '.join(map(str, shape))},?\)"):
        model(torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("x", [np.ones((4, 3)), [[1.0, 2.0, 3.0]]])
def test_forward_names_a_non_tensor_input(x):
    # Before: "unsupported operand type(s) for -: 'numpy.ndarray' and 'Tensor'" from mapminmax,
    # or "'list' object has no attribute 'shape'".
    model = mlp(3, hidden=4, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"MLP inputs must be a torch\.Tensor of shape \(N, 3\); received "
                                        rf"{type(x).__name__}\. Convert with torch\.as_tensor"):
        model(x)


def test_a_column_spanning_rounding_noise_passes_unmapped_as_mapminmax():
    # mapminmax fixes gains above 1e14 (a span under 2e-14) to 1 with offset ymin: y = x. It was
    # stretched to [-1, 1], so rounding noise became a full-scale input.
    X = torch.tensor([[0.3, 0.0], [0.3 + 2 ** -54, 1.0], [0.3, 2.0]], dtype=torch.float64)
    model = mlp(2, hidden=(3,), dtype=torch.float64).set_normalization(X, X[:, 1:])
    mapped = model.normalize_inputs(X)
    assert torch.equal(mapped[:, 0], X[:, 0])
    assert mapped[:, 1].tolist() == [-1.0, 0.0, 1.0]
    noisy_targets = X[:, :1]
    model.set_normalization(X, noisy_targets)
    assert torch.equal(model.normalize_targets(noisy_targets), noisy_targets)
    assert torch.equal(model.denormalize_outputs(noisy_targets), noisy_targets)


def test_an_mlp_on_the_meta_device_draws_no_weights():
    # Meta tensors hold no values; the initialisation drew every weight on the CPU first (8.7 s
    # and 2.6 GB for MLP(5000, (20000,), 1, device="meta")) and moved the global random state.
    import marquardt

    state = torch.random.get_rng_state()
    model = marquardt.MLP(50, (200,), 1, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert tuple(model.net[0].weight.shape) == (200, 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_numpy_input_error_names_the_conversion_that_works(dtype):
    # The hint said dtype=torch.float64 for every network: following it on the default float32
    # mlp gave "mat1 and mat2 must have the same dtype".
    model = mlp(1, dtype=dtype)
    with pytest.raises(TypeError) as error:
        model(np.zeros((2, 1)))
    hint = str(error.value).split("Convert with ")[1]
    assert hint == f"torch.as_tensor(x, dtype={dtype})"
    converted = eval(hint, {"torch": torch, "x": np.zeros((2, 1))})  # the hint, run as written
    assert model(converted).dtype == dtype


@pytest.mark.parametrize("normalize", [True, False])
def test_a_float64_tensor_given_to_a_float32_network_names_the_conversion(normalize):
    # torch.as_tensor of numpy data is float64: it reached nn.Linear and failed there with torch's
    # "mat1 and mat2 must have the same dtype, but got Double and Float".
    torch.manual_seed(0)
    model = mlp(2, hidden=(3,), normalize=normalize)
    if normalize:
        model.set_normalization(torch.tensor([[0.0, 1.0], [2.0, 5.0]]), torch.tensor([1.0, 3.0]))
    x = torch.as_tensor(np.array([[1.0, 2.0], [0.5, 4.0]]))
    with pytest.raises(TypeError, match=r"MLP inputs must have the network's dtype torch\.float32; received a "
                                        r"tensor of dtype torch\.float64\. Convert with x\.to\(torch\.float32\), "
                                        r"or build the network with mlp\(\.\.\., dtype=torch\.float64\)"):
        model(x)
    assert model(x.to(torch.float32)).dtype == torch.float32
    if normalize:  # integers are promoted by the normalization, as before
        assert torch.equal(model(torch.tensor([[1, 2]])), model(torch.tensor([[1.0, 2.0]])))
