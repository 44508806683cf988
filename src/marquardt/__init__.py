"""marquardt: Levenberg-Marquardt training of PyTorch networks and nonlinear least squares."""

from .damping import DampingState, MarquardtDamping, NielsenDamping
from .result import TERMINATION_MESSAGES, IterationInfo, LeastSquaresResult
from .solver import least_squares

__version__ = "0.1.0"
__all__ = [
    "TERMINATION_MESSAGES",
    "DampingState",
    "IterationInfo",
    "LeastSquaresResult",
    "MarquardtDamping",
    "NielsenDamping",
    "least_squares",
]
