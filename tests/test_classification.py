"""Classification with LM: softmax and sigmoid cross-entropy through the generalized Gauss-Newton matrix."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from marquardt.losses import BinaryCrossEntropy, CrossEntropy, SquaredError, accumulate_gauss_newton, make_loss
from marquardt.mlp import mlp
from marquardt.network import ModuleProblem, flatten_parameters
from marquardt.train import fit

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Small networks run faster on one BLAS thread (and share the machine fairly); digits keeps two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2) if "digits" in request.node.name else 1)
    yield
    torch.set_num_threads(threads)


def net(inputs=2, hidden=6, outputs=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).to(dtype)


def blobs(n_per_class=30, n_classes=3, dtype=torch.float64, seed=0):
    """Gaussian blobs around the vertices of a polygon: separable, but not trivially."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(n_classes, dtype=torch.float64) * 2 * math.pi / n_classes
    centres = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    X = centres[labels] + 0.35 * torch.randn(len(labels), 2, generator=g, dtype=torch.float64)
    return X.to(dtype), labels


# ------------------------------------------------------------------ the Gauss-Newton pieces


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", [[0.3, -1.0, 2.0, 0.0], [40.0, 0.0, -3.0, 1.0], [1e3, -1e3, 0.0, 5.0]])
def test_softmax_factor_reproduces_hessian_without_nan(dtype, logits):
    z = torch.tensor([logits], dtype=dtype)
    p = torch.softmax(z, dim=1)[0]
    rows, grad, cost = CrossEntropy().gauss_newton(torch.eye(4, dtype=dtype), z, F.one_hot(torch.tensor([1]), 4).to(dtype))
    assert bool(torch.isfinite(rows).all()) and bool(torch.isfinite(grad).all()) and math.isfinite(float(cost))
    hessian = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(rows.T @ rows, hessian, atol=10 * torch.finfo(dtype).eps, rtol=0)
    torch.testing.assert_close(grad, p - F.one_hot(torch.tensor(1), 4).to(dtype))


@pytest.mark.parametrize("z", [0.0, 3.0, -40.0, 800.0])
def test_sigmoid_factor_reproduces_hessian_without_nan(z):
    outputs = torch.tensor([[z]], dtype=torch.float64)
    rows, grad, cost = BinaryCrossEntropy().gauss_newton(torch.ones(1, 1, dtype=torch.float64), outputs,
                                                         torch.ones(1, 1, dtype=torch.float64))
    p = torch.sigmoid(outputs)
    torch.testing.assert_close(rows.T @ rows, p * (1 - p))
    torch.testing.assert_close(grad, (p - 1).reshape(1))
    torch.testing.assert_close(cost, F.binary_cross_entropy_with_logits(outputs, torch.ones_like(outputs), reduction="sum"))


def _autograd_pieces(model, X, targets, loss):
    """Gradient and J^T H J of the summed cost, by dense autograd (small models only)."""
    x0 = flatten_parameters(model)
    problem = ModuleProblem(model, X, targets, loss=loss)
    outputs_of = lambda x: problem.outputs(x).reshape(-1)  # noqa: E731
    jac = torch.autograd.functional.jacobian(outputs_of, x0)
    z = outputs_of(x0).detach()
    hessian = torch.autograd.functional.hessian(lambda v: loss.cost(v.reshape(X.shape[0], -1), targets), z)
    grad = torch.autograd.functional.jacobian(lambda x: loss.cost(problem.outputs(x), targets), x0)
    return grad, jac.T @ hessian @ jac


@pytest.mark.parametrize("loss, outputs", [(CrossEntropy(), 3), (BinaryCrossEntropy(), 2), (SquaredError(), 2)])
@pytest.mark.parametrize("max_bytes", [None, 40 * 8 * 7])  # whole set, or 7 Jacobian rows at a time
def test_linearization_matches_autograd(loss, outputs, max_bytes):
    model = net(outputs=outputs)
    X, labels = blobs(n_per_class=7, n_classes=3)
    y = F.one_hot(labels, 3).double() if outputs == 3 else (labels[:, None] == torch.tensor([0, 2])).double()
    kwargs = {} if max_bytes is None else {"max_jacobian_bytes": max_bytes}
    problem = ModuleProblem(model, X, y, loss=loss, **kwargs)
    lin = problem.linearize(flatten_parameters(model))
    grad, ggn = _autograd_pieces(model, X, y, loss)
    gram = lin.system.gram if hasattr(lin.system, "gram") else lin.system.jac.T @ lin.system.jac
    torch.testing.assert_close(lin.grad, grad)
    torch.testing.assert_close(gram, ggn)
    with torch.no_grad():
        assert lin.cost == pytest.approx(float(loss.cost(model(X), y)))


def test_gauss_newton_gram_equals_full_product():
    rows = torch.randn(300, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chunks = [(rows[:120], torch.zeros(1100, dtype=torch.float64), torch.tensor(1.0)), (rows[120:], torch.ones(1100, dtype=torch.float64), torch.tensor(2.0))]
    system, grad, cost = accumulate_gauss_newton(chunks, 1100, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(system.gram, rows.T @ rows)
    assert torch.equal(system.gram, system.gram.T) and cost == 3.0 and float(grad.sum()) == 1100.0


# ---------------------------------------------------------------------------- training


def test_cross_entropy_lm_separates_blobs_and_records_accuracy():
    X, labels = blobs()
    model = net()
    history = fit(model, X, labels, loss="cross_entropy", epochs=50, division="random", seed=0)
    assert {"accuracy", "vaccuracy", "taccuracy"} <= set(history[0])
    assert history[history.best_epoch]["accuracy"] >= 0.95
    assert all(math.isfinite(r["perf"]) and 0 <= r["accuracy"] <= 1 for r in history.records)
    # perf is the mean cross-entropy in the model's own outputs (History rows are the weights it ends with)
    with torch.no_grad():
        logits = model(X)
    assert history[history.best_epoch]["perf"] <= history[0]["perf"]
    assert float(F.cross_entropy(logits, labels)) < 0.5


def test_cross_entropy_perf_is_mean_cross_entropy_of_final_model():
    X, labels = blobs()
    model = net()
    history = fit(model, X, labels, loss="cross_entropy", epochs=8)
    best = history[history.best_epoch]
    with torch.no_grad():
        logits = model(X)
    assert best["perf"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    assert best["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    assert math.isnan(best["vaccuracy"]) and math.isnan(best["taccuracy"])


def test_class_indices_one_hot_and_column_give_the_same_run():
    X, labels = blobs(n_per_class=10)
    runs = [fit(net(), X, y, loss="cross_entropy", epochs=5)["perf"]
            for y in (labels, F.one_hot(labels, 3).double(), labels[:, None].double(), labels.numpy())]
    assert all(run == pytest.approx(runs[0], rel=1e-10) for run in runs[1:])


def test_binary_cross_entropy_learns_xor_like_quadrants():
    g = torch.Generator().manual_seed(1)
    X = torch.rand(120, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = ((X[:, 0] * X[:, 1]) > 0).double()
    model = net(outputs=1, hidden=8)
    history = fit(model, X, y, loss="binary_cross_entropy", epochs=100, seed=0)
    with torch.no_grad():
        logits = model(X)
    best = history[history.best_epoch]
    assert best["perf"] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y[:, None])), rel=1e-12)
    assert best["accuracy"] >= 0.95


def test_confident_fit_has_no_nan():
    # Separable data driven to p -> 1: the sqrt-of-loss residual trick would give 0/0 here.
    X, labels = blobs(n_per_class=10)
    X = X * 5
    history = fit(net(), X, labels, loss="cross_entropy", epochs=60, min_grad=0.0)
    assert history[-1]["perf"] < 1e-6
    assert all(math.isfinite(r["perf"]) and math.isfinite(r["gradient"]) for r in history.records)


@pytest.mark.parametrize("method", [torch.optim.Adam, "gd"])
def test_first_order_methods_use_the_same_loss(method):
    X, labels = blobs(n_per_class=10)
    options = {"lr": 0.05} if method is torch.optim.Adam else {"lr": 0.5}
    history = fit(net(), X, labels, method=method, loss="cross_entropy", epochs=60, **options)
    assert history[-1]["perf"] < 0.7 * history[0]["perf"]


def test_mini_batch_lm_with_cross_entropy():
    X, labels = blobs()
    history = fit(net(), X, labels, loss="cross_entropy", epochs=10, batch_size=30, seed=0)
    assert history[history.best_epoch]["accuracy"] >= 0.9


def test_mlp_classifier_normalizes_inputs_only():
    X, labels = blobs(n_per_class=10)
    model = mlp(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    history = fit(model, 100 * X + 7, labels, loss="cross_entropy", epochs=20)
    assert model.normalization_set
    assert torch.equal(model.y_min, -torch.ones(3, dtype=torch.float64)) and torch.equal(model.y_max, torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        logits = model(100 * X + 7)
    assert history[history.best_epoch]["perf"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-9)


def test_digits_64_32_10_reaches_95_percent_test_accuracy():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = model_selection.train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    # float32 halves the cost of J^T H J (2,410 parameters, 12,570 curvature rows per epoch).
    model = mlp(64, 32, 10, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    history = fit(model, X_train.astype(np.float32), y_train, loss="cross_entropy", epochs=30, goal=0.01, seed=0)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        predicted = model(torch.from_numpy(X_test.astype(np.float32))).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    print(f"digits: {len(history) - 1} epochs, {elapsed:.1f} s, {history.stop_reason} test accuracy {accuracy:.4f}")
    assert all(math.isfinite(r["perf"]) and math.isfinite(r["gradient"]) for r in history.records)
    assert accuracy >= 0.95


# --------------------------------------------------------------------------- bad input

X4 = torch.zeros(4, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    ("outputs", "y", "kwargs", "match"),
    [
        (3, torch.tensor([0, 1, 2, 0]), dict(loss="hinge"),
         r"Invalid loss: 'hinge'; expected one of \['binary_cross_entropy', 'cross_entropy', 'mse'\]"),
        (3, torch.tensor([0, 1, 3, 0]), dict(loss="cross_entropy"),
         r"Invalid y for loss='cross_entropy': class index 3 at sample 2; expected integers in \[0, 3\)"),
        (3, torch.tensor([0, -1, 2, 0]), dict(loss="cross_entropy"), "class index -1 at sample 1"),
        (3, torch.tensor([0.0, 1.5, 2.0, 0.0]), dict(loss="cross_entropy"), "class index 1.5 at sample 1"),
        (3, torch.tensor([[1.0, 1, 0]] * 4), dict(loss="cross_entropy"), "row 0 sums to 2; expected one-hot rows"),
        (3, torch.tensor([[2.0, -1, 0]] * 4), dict(loss="cross_entropy"), r"value outside \[0, 1\] in row 0"),
        (3, torch.zeros(4, 2), dict(loss="cross_entropy"), r"shape \(4, 2\); expected class indices of shape \(N,\)"),
        (1, torch.tensor([0, 1, 1, 0]), dict(loss="cross_entropy"), "needs a model with outputs of shape \\(N, K\\), K >= 2"),
        (1, torch.tensor([0.0, 0.5, 1.0, 0.0]), dict(loss="binary_cross_entropy"),
         r"Invalid y for loss='binary_cross_entropy': value 0.5 at index \(1, 0\); expected 0 or 1"),
        (2, torch.tensor([0.0, 1.0, 1.0, 0.0]), dict(loss="binary_cross_entropy"), "does not match the targets y shape"),
        (3, torch.tensor([0, 1, 2, 0]), dict(loss="cross_entropy", method="br"),
         "Invalid loss for method='br': 'cross_entropy'"),
        (3, torch.tensor([0, 1, 2, 0]), dict(loss="cross_entropy", validation_data=(X4, torch.tensor([0, 5, 0, 0]))),
         r"Invalid y_val for loss='cross_entropy': class index 5 at sample 1"),
    ],
)
def test_bad_classification_input_is_rejected_before_training(outputs, y, kwargs, match):
    model = net(outputs=outputs)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, X4, y, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_make_loss_passes_instances_through():
    loss = CrossEntropy()
    assert make_loss(loss) is loss and make_loss("mse") == SquaredError()


@pytest.mark.parametrize("labels", [torch.arange(10) + 250, (np.arange(10) + 250).tolist()])
def test_class_indices_a_bfloat16_model_cannot_hold_are_refused_before_the_cast(labels):
    # bfloat16 holds integers exactly only up to 256: class 257 became 256, another class.
    net = nn.Sequential(nn.Linear(2, 300)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"Invalid y: class index 259 cannot be held exactly by the model's dtype "
                                         r"bfloat16 \(exact up to 256\)"):
        fit(net, torch.randn(10, 2), labels, loss="cross_entropy", epochs=1)


@pytest.mark.parametrize("output_shape", [(33,), (33, 1), (33, 4, 2)])
def test_sigmoid_curvature_rows_weight_each_output_row_for_any_output_shape(output_shape):
    # Before: the weights were broadcast for (N, K) outputs only: a (N,) output raised a shape
    # error, or with N equal to the parameter count (33 here) scaled J's columns instead of its rows.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*output_shape, generator=g, dtype=torch.float64)
    jac = torch.randn(z.numel(), 33, generator=g, dtype=torch.float64)
    y = (torch.rand(*output_shape, generator=g, dtype=torch.float64) > 0.5).double()
    rows, grad, _ = BinaryCrossEntropy().gauss_newton(jac, z, y)
    p = torch.sigmoid(z.reshape(-1))
    torch.testing.assert_close(rows.T @ rows, jac.T @ torch.diag(p * (1 - p)) @ jac, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, jac.T @ (p - y.reshape(-1)), rtol=1e-12, atol=1e-12)


def test_binary_cross_entropy_trains_a_model_with_one_dimensional_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0)).double()
    X = torch.randn(50, 2, dtype=torch.float64)
    y = (X[:, 0] * X[:, 1] > 0).double()
    from marquardt import fit

    history = fit(model, X, y, loss="binary_cross_entropy", epochs=5, progress=False)
    assert history["perf"][-1] < 0.5 * history["perf"][0]


def test_float32_cross_entropy_solves_by_cholesky_with_the_damping_floor():
    # J^T H J of a float32 network near a minimum has rounding-negative eigenvalues: without the
    # eps * trace floor of the least-squares system, Cholesky failed and 16 of 40 epochs paid an
    # eigen-decomposition ('eigh') on this network.
    torch.manual_seed(0)
    X = torch.randn(600, 4)
    labels = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3))
    history = fit(model, X, labels, loss="cross_entropy", epochs=60, progress=False)
    assert set(history["solver"][1:]) == {"cholesky"}
    assert history["accuracy"][-1] == 1.0 and history["perf"][-1] < 1e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy"])
def test_half_precision_network_trains_with_cross_entropy_lm(dtype, loss):
    # J^T H J was assembled in the network's dtype and factorized there: the first step
    # failed with NotImplementedError '"cholesky_cpu" not implemented for Half', where the
    # squared error assembles a half-precision network's system in float64 (accumulation_dtype).
    X, labels = blobs(n_per_class=10)
    y = labels if loss == "cross_entropy" else (labels == 0).double()
    model = net(outputs=3 if loss == "cross_entropy" else 1, dtype=dtype)
    history = fit(model, X, y, loss=loss, epochs=10, progress=False)
    assert set(history["solver"][1:]) == {"cholesky"}
    assert history["perf"][-1] < 0.2 * history["perf"][0]
    assert history["accuracy"][-1] >= 0.9
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in model.parameters())


def test_accumulate_gauss_newton_solves_half_precision_rows_in_float64():
    rows = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.bfloat16)
    grad = torch.tensor([1.0, -1.0], dtype=torch.bfloat16)
    system, g, cost = accumulate_gauss_newton([(rows, grad, torch.tensor(0.25, dtype=torch.bfloat16))], 2,
                                              dtype=torch.bfloat16, device="cpu")
    assert g.dtype == torch.bfloat16 and g.tolist() == [1.0, -1.0] and cost == 0.25
    assert system.gram.dtype == torch.bfloat16 and system.gram.tolist() == [[5.0, 1.0], [1.0, 1.0]]
    # (J^T J + I) h = -g with J^T J = [[5, 1], [1, 1]]: h = [-3/11, 7/11], in the problem's dtype.
    step = system.solve(g, 1.0, torch.ones(2, dtype=torch.bfloat16))
    assert step.dtype == torch.bfloat16
    torch.testing.assert_close(step.double(), torch.tensor([-3 / 11, 7 / 11], dtype=torch.float64), atol=4e-3, rtol=0)


def _blobs(classes: int = 3, n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    return torch.randn(n, 2, generator=generator) + 3.0 * labels[:, None], labels


@pytest.mark.parametrize("head, loss, match", [
    (nn.Softmax(dim=1), "cross_entropy", "last module is Softmax"),
    (nn.Sequential(nn.Sigmoid()), "binary_cross_entropy", "last module is Sigmoid"),
])
def test_a_model_ending_in_probabilities_is_refused_before_training(head, loss, match):
    # A patternnet-like model ends in a softmax: the loss applied its own softmax on top, and
    # fit trained it silently to 81% accuracy where the logit model reaches 100%.
    X, labels = _blobs()
    outputs = 3 if loss == "cross_entropy" else 1
    y = labels if loss == "cross_entropy" else (labels == 0).double()[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, outputs), head).double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, X.double(), y, loss=loss, epochs=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _SoftmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=1)


def test_a_model_returning_softmax_rows_is_refused_for_cross_entropy():
    X, labels = _blobs()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="rows of probabilities summing to 1"):
        fit(_SoftmaxHead().double(), X.double(), labels, loss="cross_entropy", epochs=5)


def test_a_model_ending_in_log_softmax_trains_as_its_logits():
    # softmax(log_softmax(z)) = softmax(z): LogSoftmax outputs are logits to the loss.
    X, labels = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(dim=1)).double()
    history = fit(model, X.double(), labels, loss="cross_entropy", epochs=30)
    assert history["accuracy"][-1] == 1.0


def test_float_class_labels_a_bfloat16_model_cannot_hold_are_refused():
    # MATLAB's labels are doubles: 257.0 became class 256 in a bfloat16 model.
    X = torch.randn(10, 2)
    labels = np.arange(250, 260).astype(float)
    model = nn.Sequential(nn.Linear(2, 300)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="class index 259 cannot be held exactly"):
        fit(model, X, labels, loss="cross_entropy", epochs=1)
