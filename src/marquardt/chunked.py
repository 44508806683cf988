"""Assemble the LM linear system from Jacobian row chunks: pure tensor code.

Network problems produce their Jacobian a block of rows at a time (a chunk of samples). The
normal equations only need ``J^T J`` and ``J^T r``, so the chunks are folded in and dropped: the
memory is ``O(chunk * n + n^2)`` instead of ``O(m * n)``. When there are fewer residuals than
parameters the rows are kept instead, for the residual-space solve.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import NormalEquations, SampleSpaceEquations

#: Default bound on the bytes of Jacobian rows held at once (128 MiB).
DEFAULT_JACOBIAN_BYTES = 1 << 27


@dataclass(frozen=True)
class Plan:
    """How to assemble the system for ``m`` residuals and ``n`` parameters under a byte budget.

    Attributes
    ----------
    form : {"normal", "sample-space"}
        Accumulate ``J^T J`` chunk by chunk, or keep all rows for the residual-space solve.
    chunk_rows : int
        Jacobian rows computed at once.
    """

    form: str
    chunk_rows: int


def plan_assembly(m: int, n: int, itemsize: int, max_bytes: int = DEFAULT_JACOBIAN_BYTES) -> Plan:
    """Choose the system form and chunk size.

    The residual-space form is taken when ``m < n`` and the whole ``m x n`` Jacobian fits in
    ``max_bytes``; otherwise ``J^T J`` is accumulated from chunks of at most ``max_bytes``.

    Examples
    --------
    >>> plan_assembly(1000, 61, 8, max_bytes=61 * 8 * 100)
    Plan(form='normal', chunk_rows=100)
    >>> plan_assembly(10, 1000, 8)
    Plan(form='sample-space', chunk_rows=10)
    """
    row_bytes = max(1, n * itemsize)
    rows = max(1, min(m, max_bytes // row_bytes))
    if m < n and m * row_bytes <= max_bytes:
        return Plan("sample-space", m)
    return Plan("normal", rows)


def accumulate_normal(chunks: Iterable[tuple[Tensor, Tensor]], n: int, *, dtype: torch.dtype,
                      device: torch.device | str) -> tuple[NormalEquations, Tensor, float]:
    """Fold ``(J_chunk, r_chunk)`` pairs into ``J^T J``, ``J^T r`` and the cost.

    Examples
    --------
    >>> J = torch.arange(6.0).reshape(3, 2); r = torch.ones(3)
    >>> system, grad, cost = accumulate_normal([(J[:2], r[:2]), (J[2:], r[2:])], 2, dtype=J.dtype, device="cpu")
    >>> torch.equal(system.gram, J.T @ J), grad.tolist(), cost
    (True, [6.0, 9.0], 1.5)
    """
    gram = torch.zeros(n, n, dtype=dtype, device=device)
    grad = torch.zeros(n, dtype=dtype, device=device)
    sum_sq = torch.zeros((), dtype=dtype, device=device)
    for jac, residuals in chunks:
        # J^T J is symmetric: addmm on the full block is BLAS-3; the symmetric half is filled
        # by the same call (torch has no exposed syrk).
        gram.addmm_(jac.T, jac)
        grad.addmv_(jac.T, residuals)
        sum_sq += residuals @ residuals
    return NormalEquations(gram), grad, 0.5 * float(sum_sq)


def assemble_sample_space(chunks: Iterable[tuple[Tensor, Tensor]]) -> tuple[SampleSpaceEquations, Tensor, float]:
    """Stack all rows for the residual-space solve; returns ``(system, J^T r, cost)``."""
    jacs, residuals = zip(*chunks)
    jac = torch.cat(jacs)
    r = torch.cat(residuals)
    return SampleSpaceEquations(jac, r), jac.T @ r, 0.5 * float(r @ r)
