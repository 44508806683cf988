"""marquardt: Levenberg-Marquardt training of PyTorch networks and nonlinear least squares."""

__version__ = "0.1.0"
__all__: list[str] = []
