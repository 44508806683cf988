"""fit() under numerical trouble: non-finite Jacobians at accepted points, non-finite starts,
diverging first-order runs, half precision. Steps into trouble are refused and the weights are
never left corrupted; a start that cannot train is a ValueError before any work."""

import math

import pytest
import torch
from torch import nn

from marquardt import fit


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
