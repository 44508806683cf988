"""The README's Python examples run as written (the scikit-learn one on small stand-in data)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_quick_starts():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("marquardt.least_squares" in b for b in blocks)
    assert any("marquardt.fit" in b for b in blocks)
    assert any("LevenbergMarquardt" in b for b in blocks)
    assert any("LMRegressor" in b for b in blocks)


def test_least_squares_and_pytorch_quick_starts(capsys):
    namespace: dict = {}
    torch_blocks = [b for b in python_blocks() if "sklearn" not in b]
    for block in torch_blocks:
        exec(compile(block, str(README), "exec"), namespace)
    res = namespace["res"]
    assert res.success
    np.testing.assert_allclose(res.x, [2.5, 1.3], rtol=0.02)
    assert namespace["history"]["perf"][-1] < 1e-4
    assert float(namespace["cost"]) < 1e-4
    printed = capsys.readouterr().out
    assert namespace["history"].stop_reason in printed and res.message in printed


def test_scikit_learn_quick_start():
    pytest.importorskip("sklearn")
    block = next(b for b in python_blocks() if "LMRegressor" in b)
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(60, 2))
    namespace = {
        "X": X,
        "y": np.sin(3 * X[:, 0]) * X[:, 1],
        "X_new": rng.uniform(-1, 1, size=(5, 2)),
        "labels": (X[:, 0] > 0).astype(int),
    }
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["search"].best_params_["lmregressor__hidden_layer_sizes"] in [(5,), (10,), (10, 10)]
    assert namespace["reg"].predict(namespace["X_new"]).shape == (5,)
