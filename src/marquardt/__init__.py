"""marquardt: Levenberg-Marquardt training of PyTorch networks and nonlinear least squares.

Examples
--------
>>> import marquardt
>>> sorted(marquardt.__all__)[:3]
['Callback', 'DampingState', 'GradientDescent']
"""

from .damping import DampingState, MarquardtDamping, NielsenDamping
from .history import History
from .io import load, save
from .mlp import MLP, mlp
from .optim import GradientDescent, LevenbergMarquardt, Momentum
from .result import TERMINATION_MESSAGES, IterationInfo, LeastSquaresResult
from .solver import least_squares
from .train import STOP_REASONS, Callback, fit

__version__ = "0.1.0"
__all__ = [
    "MLP",
    "STOP_REASONS",
    "TERMINATION_MESSAGES",
    "Callback",
    "DampingState",
    "GradientDescent",
    "History",
    "IterationInfo",
    "LeastSquaresResult",
    "LevenbergMarquardt",
    "MarquardtDamping",
    "Momentum",
    "NielsenDamping",
    "fit",
    "least_squares",
    "load",
    "mlp",
    "save",
]
