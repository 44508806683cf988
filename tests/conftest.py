"""Shared test settings.

Under pytest-xdist each worker is its own process; with two workers on two cores, two BLAS
threads per worker oversubscribe the machine and small networks slow down many times over.
One thread per worker keeps the suite fast and its floating-point results deterministic.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
