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
    # The example prints both to 6 decimals and they agree: momentum has converged by epoch 600.
    result = load("momentum_regression").main(["--epochs", "600", "--out", str(tmp_path)])
    assert result["intercept"] == pytest.approx(result["exact_intercept"], abs=1e-7)
    assert result["slope"] == pytest.approx(result["exact_slope"], abs=1e-7)
    assert (tmp_path / "momentum_regression.png").stat().st_size > 5000


def test_comparison_example_shows_lm_far_ahead(tmp_path):
    histories = load("compare_methods").main(["--epochs", "200", "--out", str(tmp_path)])
    lm = histories["Levenberg-Marquardt"]["perf"][-1]
    assert lm < 1e-3 * histories["momentum"]["perf"][-1]
    assert lm < 1e-3 * histories["gradient descent"]["perf"][-1]
    assert (tmp_path / "convergence.png").stat().st_size > 5000


def test_momentum_example_prints_the_same_numbers_every_run(tmp_path):
    # The initial weights used to be unseeded: two runs started, and after a few epochs stood, apart.
    first, second = (load("momentum_regression").main(["--epochs", "20", "--out", str(tmp_path)]) for _ in range(2))
    assert first == second
