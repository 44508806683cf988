"""Data division into training, validation and test sets, as MATLAB's ``divide*`` functions.

Each function returns three index tensors ``(train, val, test)``, as MATLAB's (R2010b on,
``divide_indices`` of ``nndivision``) from the fractions ``split / sum(split)``:

* ``dividerand``: ``n_val = round(val * n)``, ``n_test = round(test * n)`` and the rest for
  training, with MATLAB's ``round`` (halves away from zero: 30 samples at 0.15 give 5, not
  Python's 4);
* ``divideblock``: the same with ``floor`` (250 samples at 0.7/0.15/0.15 give 176/37/37);
* ``divideint``: no fixed counts; each sample in turn goes to the first set furthest below its
  fraction of the samples dealt so far.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DIVISIONS = ("random", "block", "interleaved")


def check_split(split: tuple[float, float, float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` fractions: three numbers >= 0 summing to 1, train > 0.

    Examples
    --------
    >>> check_split((0.7, 0.15, 0.15))
    (0.7, 0.15, 0.15)
    """
    try:
        values = tuple(float(v) for v in split)
    except (TypeError, ValueError):
        raise TypeError(f"split must be three fractions (train, val, test); received {split!r}.") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"split must be three fractions >= 0 (train, val, test); received {split!r}.")
    if abs(sum(values) - 1.0) > 1e-9 or values[0] <= 0:
        raise ValueError(f"split fractions must sum to 1 with a positive training share; received {split!r} "
                         f"(sum {sum(values):g}).")
    return values  # type: ignore[return-value]


def _round_half_up(value: float) -> int:
    """MATLAB's ``round`` of a number >= 0: halves go up (Python's ``round`` sends them to even).

    ``floor(value + 0.5)`` would round 0.49999999999999994 up, since the sum rounds to 1.0;
    the fractional part ``value - floor(value)`` is exact.

    Examples
    --------
    >>> [_round_half_up(v) for v in (4.5, 10.5, 1.5, 0.49999999999999994)]
    [5, 11, 2, 0]
    """
    whole = math.floor(value)
    return int(whole) + (1 if value - whole >= 0.5 else 0)


def _percents(split: tuple[float, float, float]) -> tuple[float, float, float]:
    """MATLAB's ``ratio / totalRatio``, with its ``totalRatio = train + test + val`` (that order)."""
    total = split[0] + split[2] + split[1]
    return split[0] / total, split[1] / total, split[2] / total


def _counts(n: int, split: tuple[float, float, float], rounding=_round_half_up) -> tuple[int, int, int]:
    # The products are MATLAB's (valPercent * Q in floating point), so the counts match its own.
    _, val, test = _percents(split)
    n_val, n_test = rounding(val * n), rounding(test * n)
    return n - n_val - n_test, n_val, n_test


def divide_random(n: int, split: tuple[float, float, float], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MATLAB ``dividerand``: a random permutation cut into three parts.

    Examples
    --------
    >>> train, val, test = divide_random(20, (0.7, 0.15, 0.15), torch.Generator().manual_seed(0))
    >>> len(train), len(val), len(test)
    (14, 3, 3)
    """
    n_train, n_val, _ = _counts(n, split)
    order = torch.randperm(n, generator=generator)
    return order[:n_train].sort().values, order[n_train : n_train + n_val].sort().values, order[n_train + n_val :].sort().values


def divide_block(n: int, split: tuple[float, float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """MATLAB ``divideblock``: consecutive blocks, training first; the validation and test
    counts rounded down (``floor``, where ``dividerand`` rounds).

    Examples
    --------
    >>> [t.tolist() for t in divide_block(10, (0.6, 0.2, 0.2))]
    [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]
    >>> [len(t) for t in divide_block(250, (0.7, 0.15, 0.15))]  # divideblock's own example
    [176, 37, 37]
    """
    n_train, n_val, _ = _counts(n, split, math.floor)
    index = torch.arange(n)
    return index[:n_train], index[n_train : n_train + n_val], index[n_train + n_val :]


def divide_interleaved(n: int, split: tuple[float, float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """MATLAB ``divideint``: samples dealt in turn, each to the first set whose fraction exceeds
    its share of the samples dealt so far by the most (``percents - totals / (i - 1)``).

    Examples
    --------
    >>> [t.tolist() for t in divide_interleaved(10, (0.6, 0.2, 0.2))]
    [[0, 3, 4, 5, 8, 9], [1, 6], [2, 7]]
    """
    percents = _percents(split)
    totals = [0, 0, 0]
    owner = []
    for i in range(n):
        lead = percents if i == 0 else [percents[k] - totals[k] / i for k in range(3)]
        k = max(range(3), key=lambda j: lead[j])  # the first of equal leads, as find(d == max(d), 1)
        totals[k] += 1
        owner.append(k)
    owner_t = torch.tensor(owner, dtype=torch.long)
    return tuple(torch.nonzero(owner_t == k).reshape(-1) for k in range(3))  # type: ignore[return-value]


def divide(n: int, division: str, split: tuple[float, float, float], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch on ``division`` (``"random"``, ``"block"`` or ``"interleaved"``)."""
    if division == "random":
        return divide_random(n, split, generator)
    if division == "block":
        return divide_block(n, split)
    if division == "interleaved":
        return divide_interleaved(n, split)
    raise ValueError(f"Invalid division: {division!r}; expected one of {DIVISIONS} or None.")
