"""The runnable examples in examples/ run and give the answers they claim."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sinc_example_reaches_a_small_error(tmp_path):
    history = load("sinc_lm").main(["--epochs", "150", "--out", str(tmp_path)])
    assert history["perf"][-1] < 1e-6
    assert (tmp_path / "sinc_fit.png").stat().st_size > 5000


def test_momentum_example_matches_closed_form(tmp_path):
    result = load("momentum_regression").main(["--out", str(tmp_path)])
    assert result["intercept"] == pytest.approx(result["exact_intercept"], abs=1e-3)
    assert result["slope"] == pytest.approx(result["exact_slope"], abs=1e-3)
    assert (tmp_path / "momentum_regression.png").stat().st_size > 5000


def test_comparison_example_shows_lm_far_ahead(tmp_path):
    histories = load("compare_methods").main(["--epochs", "200", "--out", str(tmp_path)])
    lm = histories["Levenberg-Marquardt"]["perf"][-1]
    assert lm < 1e-3 * histories["momentum"]["perf"][-1]
    assert lm < 1e-3 * histories["gradient descent"]["perf"][-1]
    assert (tmp_path / "convergence.png").stat().st_size > 5000
