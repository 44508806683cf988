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
