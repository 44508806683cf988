"""marquardt: Levenberg-Marquardt training of PyTorch networks and nonlinear least squares.

Examples
--------
>>> import marquardt
>>> sorted(marquardt.__all__)[:3]
['BinaryCrossEntropy', 'Callback', 'CheckpointError']
"""

from .checkpoint import CheckpointError, CheckpointMismatch
from .damping import DampingState, MarquardtDamping, NielsenDamping
from .distributed import DistributedError, LocalReducer, Reducer, TorchDistributedReducer
from .history import History
from .losses import BinaryCrossEntropy, CrossEntropy, SquaredError
from .io import load, save
from .mlp import MLP, mlp
from .optim import GradientDescent, LevenbergMarquardt, Momentum
from .result import TERMINATION_MESSAGES, IterationInfo, LeastSquaresResult
from .solver import least_squares
from .train import STOP_REASONS, Callback, fit

__version__ = "0.1.0"

_LAZY = {"LMRegressor": "estimators", "LMClassifier": "estimators"}


def __getattr__(name: str):
    # The scikit-learn estimators need scikit-learn, an optional dependency: import on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'marquardt' has no attribute {name!r}")


__all__ = [
    "LMClassifier",
    "LMRegressor",
    "MLP",
    "STOP_REASONS",
    "TERMINATION_MESSAGES",
    "BinaryCrossEntropy",
    "Callback",
    "CheckpointError",
    "CheckpointMismatch",
    "CrossEntropy",
    "DistributedError",
    "DampingState",
    "GradientDescent",
    "History",
    "IterationInfo",
    "LeastSquaresResult",
    "LevenbergMarquardt",
    "LocalReducer",
    "MarquardtDamping",
    "Momentum",
    "NielsenDamping",
    "Reducer",
    "SquaredError",
    "TorchDistributedReducer",
    "fit",
    "least_squares",
    "load",
    "mlp",
    "save",
]
