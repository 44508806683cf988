"""``J^T J`` of a layered network in about half the work of ``?syrk``: pure numerical code
(numpy and SciPy's BLAS, on the CPU).

A Jacobian row of an affine layer ``z = a W^T + b`` (one residual ``r``, that is one sample and
one output) is an outer product: ``d r / d W[i, j] = delta[i] h[j]`` with ``h = [a, 1]`` (the 1
for the bias). So the layer's diagonal block of ``J^T J`` is::

    G[(i, j), (k, l)] = sum_r delta_r[i] delta_r[k] h_r[j] h_r[l] = M[pair(i, k), pair(j, l)],
    M = U^T V,   U[r, pair(i, k)] = delta_r[i] delta_r[k],   V[r, pair(j, l)] = h_r[j] h_r[l],

over the unordered pairs ``i <= k`` and ``j <= l``. ``M`` is one matrix product with
``o (o + 1) / 2`` rows and ``q (q + 1) / 2`` columns (``o`` outputs, ``q`` inputs plus bias) over
the rows of ``J``: ``m o^2 q^2 / 2`` multiply-adds, half of the ``m (o q)^2`` that ``?syrk`` spends
on the same block, which it cannot know is a sum of Kronecker products. The rows of several
outputs of one sample share ``h``, so their ``U`` rows are summed first. The off-diagonal blocks
(between layers) are ordinary products of ``J``'s columns.

On the 1-64-64-1 benchmark network (4,353 parameters, 4,160 in the middle layer) this is 56% of
``?syrk``'s arithmetic for the whole ``J^T J``; measured in the suite (docs/performance.md).

:class:`LayerGram` is the plan for one network and parameter layout; ``ModuleProblem`` folds each
chunk of Jacobian rows into ``J^T J`` with it (through
:func:`marquardt.chunked.accumulate_normal`) instead of ``?syrk``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .fastjac import LayeredNetwork, LinearizedNetwork

try:  # SciPy is optional: without it the products are torch's
    from scipy.linalg.blas import dgemm, sgemm
    _GEMM = {torch.float32: sgemm, torch.float64: dgemm}
except ImportError:  # pragma: no cover - exercised only without SciPy
    _GEMM = {}

__all__ = ["KRON_MAX_SMALL", "KRON_MAX_WORK", "KRON_MIN_COLUMNS", "KRON_MIN_WIDTH", "LayerGram"]

#: A layer's diagonal block is formed from its Kronecker factors when it has at least this many
#: outputs and inputs (bias included) and :data:`KRON_MIN_COLUMNS` columns; smaller blocks are
#: products of ``J``'s columns. Measured (float32, 2 cores, 3,000-5,000 samples, whole
#: linearization, medians): one hidden layer of 16 or 24, the same time as ``?syrk``; 32, 37 vs
#: 48 ms; 48, 186 vs 258 ms; 64, 324 vs 513 ms; two consecutive layers of 16, 48 vs 41 ms, of
#: 32, 153 vs 160 ms (their cross block is a plain product).
KRON_MIN_WIDTH = 32
KRON_MIN_COLUMNS = 1024
#: Rows of ``U`` and ``V`` formed at a time: about this many bytes for both.
FACTOR_BYTES = 32 << 20


def _pair_index(width: int) -> np.ndarray:
    """The symmetric ``width x width`` matrix of each unordered pair's position, the pairs
    ``i <= k`` of ``range(width)`` in row-major order."""
    first, second = np.triu_indices(width)
    position = np.empty((width, width), dtype=np.intp)
    order = np.arange(first.size)
    position[first, second] = order
    position[second, first] = order
    return position


@dataclass
class _Block:
    """One layer's columns ``[start, stop)`` of ``J``: weight ``(outputs, fan_in)`` row-major,
    then the bias (``outputs`` columns; :meth:`LayerGram.plan` takes only layers with one)."""

    start: int
    stop: int
    layer: int
    outputs: int
    fan_in: int
    kron: bool

    @property
    def inputs(self) -> int:
        """``q``: fan-in plus one for the bias."""
        return self.fan_in + 1


class LayerGram:
    """Folds chunks of a layered network's Jacobian rows into the lower triangle of ``J^T J``,
    the large layers' diagonal blocks from their Kronecker factors (see the module docstring).

    Use :meth:`plan` (``None`` where it does not apply), then per system :meth:`clear` (or a
    zeroed ``gram``), :meth:`fold` per chunk and :meth:`finish` once. Only the lower triangle of
    ``gram`` is meaningful after, as after :func:`marquardt.chunked.symmetric_rank_update`.

    Examples
    --------
    >>> from torch import nn
    >>> from marquardt.fastjac import describe
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    >>> layout = [(n, p.numel()) for n, p in net.named_parameters()]
    >>> spec = describe(net, [n for n, _ in layout])
    >>> params = {n: p.detach() for n, p in net.named_parameters()}
    >>> lin = LinearizedNetwork(spec, params, torch.randn(50, 3, dtype=torch.float64), layout)
    >>> J = lin.jacobian()
    >>> gram = LayerGram.plan(spec, layout, torch.float64, "cpu")  # the 32 x 33 middle block
    >>> [block.kron for block in gram.blocks]
    [False, True, False]
    >>> out, grad = torch.zeros(J.shape[1], J.shape[1], dtype=torch.float64), torch.zeros(J.shape[1], dtype=torch.float64)
    >>> r = torch.ones(J.shape[0], dtype=torch.float64)
    >>> gram.fold(out, grad, J, r, lin); gram.finish(out)
    >>> bool(torch.allclose(out.tril(), (J.T @ J).tril())), bool(torch.allclose(grad, J.T @ r))
    (True, True)
    """

    def __init__(self, blocks: list[_Block], n: int, dtype: torch.dtype) -> None:
        self.blocks = blocks
        self.n = n
        self.dtype = dtype
        self._np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self._gemm = _GEMM[dtype]
        small = [np.arange(b.start, b.stop) for b in blocks if not b.kron]
        self._small = np.concatenate(small) if small else np.zeros(0, dtype=np.int64)
        self._pairs: dict[int, np.ndarray] = {}  # width -> pair positions (_pair_index)
        self._sums: dict[int, np.ndarray] = {}  # per Kronecker block: M, accumulated over chunks
        # Reused memory (a fresh 16 MB array costs its page faults at every fold).
        self._buffers: dict[str, np.ndarray] = {}
        self._folded = False

    @classmethod
    def plan(cls, network: LayeredNetwork, layout: Sequence[tuple[str, int]], dtype: torch.dtype,
             device: torch.device | str, *, min_width: int | None = None,
             min_columns: int | None = None) -> LayerGram | None:
        """The plan for ``network`` whose parameters are laid out as ``layout`` (the columns of
        ``J``), or ``None`` where it does not apply: no layer large enough, a layout that is not
        layer by layer (each weight followed by its bias), a layer without bias, a device other
        than the CPU or SciPy missing (``?syrk`` or ``addmm`` then)."""
        min_width = KRON_MIN_WIDTH if min_width is None else min_width
        min_columns = KRON_MIN_COLUMNS if min_columns is None else min_columns
        names = [name for name, _ in layout]
        numel = dict(layout)
        if (names != network.parameter_names or dtype not in _GEMM
                or torch.device(device).type != "cpu"):
            return None
        widths = _widths(network, numel)
        if widths is None:
            return None
        blocks, start = [], 0
        for index, (outputs, fan_in) in enumerate(widths):
            stop = start + outputs * (fan_in + 1)
            kron = min(outputs, fan_in + 1) >= min_width and outputs * (fan_in + 1) >= min_columns
            blocks.append(_Block(start, stop, index, outputs, fan_in, kron))
            start = stop
        if not any(block.kron for block in blocks) or not _pays(blocks, start):
            return None
        return cls(blocks, start, dtype)

    def clear(self, gram: Tensor) -> None:
        """Start a new system in ``gram``: zero what :meth:`fold` adds to in its lower triangle
        (all but the Kronecker diagonal blocks, which :meth:`finish` overwrites: 69 of the 76 MB
        of the 4,353-parameter network's matrix are not written twice), and the Kronecker sums,
        which a linearization interrupted between :meth:`fold` and :meth:`finish` (an exception
        in a chunk, Ctrl-C) would otherwise carry into this one."""
        out = gram.numpy()
        for block in self.blocks:
            out[block.start:block.stop, :block.start if block.kron else block.stop] = 0.0
        for total in self._sums.values():
            total.fill(0.0)
        self._folded = False

    def fold(self, gram: Tensor, grad: Tensor | None, jac: Tensor, residuals: Tensor | None,
             lin: LinearizedNetwork) -> None:
        """Add the chunk's rows ``jac`` (``(rows, n)``, linearized as ``lin``: ``lin.delta(layer)`` and
        ``lin.inputs`` are the rows' outer-product factors) into ``gram``'s lower triangle, and
        ``J^T r`` for its ``residuals`` into ``grad`` (neither when ``residuals`` is None); the
        Kronecker blocks are summed aside until :meth:`finish`.

        Every lower-triangle entry ``(r, c)`` is written once: by the column's block when that is
        small (one product of all of ``J`` with the small columns and ``r``), else by the row's
        block when that is small, else as a Kronecker diagonal block or a product of two large
        blocks.
        """
        out = gram.numpy()
        rows = jac.detach().to(self.dtype).contiguous().numpy()
        r = None if residuals is None else residuals.detach().to(self.dtype).numpy()
        gradient = self._fold_small(out, rows, r)
        if r is not None:
            grad.add_(torch.from_numpy(gradient))
        kron = [block for block in self.blocks if block.kron]
        for index, block in enumerate(kron):
            for earlier in kron[:index]:  # two large layers: their columns' product
                self._fold_cross(out, rows, block, earlier)
            self._fold_factors(block, lin.delta(block.layer), lin.inputs[block.layer])
        self._folded = True

    def _fold_cross(self, out: np.ndarray, rows: np.ndarray, block: _Block, earlier: _Block) -> None:
        """``J_block^T J_earlier`` into the block's rows, from contiguous copies of both column
        blocks by SciPy's ``?gemm`` (the BLAS of the other products: a product on strided
        views went to numpy's own OpenBLAS, whose idle threads then competed for the cores)."""
        count = rows.shape[0]
        left = self._buffer("cross-left", (count, block.stop - block.start))
        right = self._buffer("cross-right", (count, earlier.stop - earlier.start))
        np.copyto(left, rows[:, block.start:block.stop])
        np.copyto(right, rows[:, earlier.start:earlier.stop])
        # Fortran order: the product's transpose (earlier x block) = right^T left.
        product = self._gemm(1.0, right.T, left.T, trans_b=1)
        out[block.start:block.stop, earlier.start:earlier.stop] += product.T

    def finish(self, gram: Tensor) -> None:
        """Write the summed Kronecker blocks into ``gram`` (zero when no chunk was folded) and
        reset the sums for the next system."""
        out = gram.numpy()
        for block in self.blocks:
            if not block.kron:
                continue
            target = out[block.start:block.stop, block.start:block.stop]
            if not self._folded:
                target[...] = 0.0
                continue
            total = self._sums[block.layer]
            _scatter(target, total, self._pair(block.outputs), self._pair(block.inputs), block)
            total.fill(0.0)
        self._folded = False

    def _buffer(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous ``shape`` array on reused memory (grown when too small)."""
        size = math.prod(shape)
        held = self._buffers.get(key)
        if held is None or held.size < size:
            held = self._buffers[key] = np.empty(size, dtype=self._np_dtype)
        return held[:size].reshape(shape)

    def _pair(self, width: int) -> np.ndarray:
        if width not in self._pairs:
            self._pairs[width] = _pair_index(width)
        return self._pairs[width]

    def _fold_small(self, out: np.ndarray, rows: np.ndarray, residuals: np.ndarray | None) -> np.ndarray:
        """The entries in a small block's columns (rows at or below the block) and in its rows
        against the large blocks before it, from ``P = J^T [J_small, r]``; returns ``J^T r``,
        its last column (one pass over ``J`` for both; zeros without ``residuals``)."""
        count, width = rows.shape[0], self._small.size + 1
        small = self._buffer("small", (count, width))
        np.take(rows, self._small, axis=1, out=small[:, :-1])
        small[:, -1] = 0.0 if residuals is None else residuals
        # Fortran order: J^T (n x rows) is the C-ordered J, and J_small^T likewise.
        product = self._buffer("product", (width, self.n)).T  # (n, small + 1), Fortran-ordered
        result = self._gemm(1.0, rows.T, small.T, beta=0.0, c=product, trans_b=1, overwrite_c=1)
        if not np.shares_memory(result, product):  # f2py copied (never expected)
            product = result
        column = 0
        for block in self.blocks:
            if block.kron:
                continue
            width = block.stop - block.start
            part = product[:, column:column + width]
            out[block.start:, block.start:block.stop] += part[block.start:]
            for earlier in self.blocks:
                if earlier.kron and earlier.stop <= block.start:
                    out[block.start:block.stop, earlier.start:earlier.stop] += part[earlier.start:earlier.stop].T
            column += width
        return product[:, -1]

    def _fold_factors(self, block: _Block, delta: Tensor, inputs: Tensor) -> None:
        """``M += U^T V`` for one block over the chunk's rows, ``U`` and ``V`` a slice of rows at a time."""
        o, q, f = block.outputs, block.inputs, block.fan_in
        po, pq = o * (o + 1) // 2, q * (q + 1) // 2
        if block.layer not in self._sums:
            self._sums[block.layer] = np.zeros((po, pq), dtype=self._np_dtype)
        total = self._sums[block.layer]
        delta = delta.detach().to(self.dtype).numpy()
        inputs = inputs.detach().to(self.dtype).numpy()
        samples, outputs_per_sample = delta.shape[0], delta.shape[1]
        itemsize = np.dtype(self._np_dtype).itemsize
        step = max(1, min(samples, FACTOR_BYTES // (itemsize * (po + pq))))
        for begin in range(0, samples, step):
            end = min(samples, begin + step)
            count = end - begin
            # Transposed (pairs x samples): each pair's row is one contiguous product.
            factors = self._buffer("delta", (outputs_per_sample, o, count))
            np.copyto(factors, delta[begin:end].transpose(1, 2, 0))
            h = self._buffer("h", (1, q, count))
            np.copyto(h[0, :f], inputs[begin:end].T)
            h[0, f] = 1.0
            u = _pair_products(factors, self._buffer("u", (po, count)))
            v = _pair_products(h, self._buffer("v", (pq, count)))
            # Fortran order: total^T (pq x po) += v u^T, from the Fortran views v^T and u^T.
            result = self._gemm(1.0, v.T, u.T, beta=1.0, c=total.T, trans_a=1, overwrite_c=1)
            if not np.shares_memory(result, total):  # f2py copied (never expected): write back
                total[...] = result.T


#: The structured path is taken when its multiply-adds per row of ``J`` are at most this share
#: of ``?syrk``'s ``n^2 / 2`` (its copies and gathers cost the rest: measured break-even on
#: single 16- to 24-wide layers, where the share is 0.55-0.6).
KRON_MAX_WORK = 0.75
#: ... and the small columns at most this share of ``n``: ``J^T [J_small, r]`` is an ``n x
#: (n_small + 1)`` matrix that ``max_matrix_bytes`` does not count (a quarter of ``J^T J`` at most).
KRON_MAX_SMALL = 0.25


def _pays(blocks: list[_Block], n: int) -> bool:
    """Whether the structured ``J^T J`` is cheaper than ``?syrk`` for this layout, and its
    product with the small columns small enough (:data:`KRON_MAX_WORK`, :data:`KRON_MAX_SMALL`).

    Per row of ``J``: each Kronecker block's ``M`` costs ``o (o + 1) / 2 * q (q + 1) / 2``, the
    small columns ``n (n_small + 1)``, two large blocks' cross product ``w_1 w_2``; ``?syrk``
    ``n^2 / 2``. Where small layers hold most of the columns (say 200-20-32-32-1, n = 5,781, of
    which 4,725 small) ``J^T J_small`` alone is more than ``?syrk``: measured 1.0-1.3 s against
    0.6-0.7 s a linearization.
    """
    kron = [block for block in blocks if block.kron]
    small = n - sum(block.stop - block.start for block in kron)
    work = n * (small + 1)
    for index, block in enumerate(kron):
        o, q = block.outputs, block.inputs
        work += (o * (o + 1) // 2) * (q * (q + 1) // 2)
        work += sum((block.stop - block.start) * (earlier.stop - earlier.start) for earlier in kron[:index])
    return work <= KRON_MAX_WORK * n * n / 2 and small + 1 <= KRON_MAX_SMALL * n


def _widths(network: LayeredNetwork, numel: dict[str, int]) -> list[tuple[int, int]] | None:
    """``(outputs, fan_in)`` per layer from the parameter sizes (None if a layer has no bias)."""
    widths = []
    for layer in network.layers:
        if layer.bias is None:
            return None
        outputs = numel[layer.bias]
        if numel[layer.weight] % outputs:
            return None
        widths.append((outputs, numel[layer.weight] // outputs))
    return widths


def _pair_products(factors: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` ``(pairs, rows)``: for ``factors`` ``(K, width, rows)``, row ``pair(i, k)`` is
    ``sum_K factors[K, i] * factors[K, k]`` over the pairs ``i <= k`` in row-major order."""
    count, width, _ = factors.shape
    offset = 0
    for i in range(width):
        part = out[offset:offset + width - i]
        np.multiply(factors[0, i], factors[0, i:], out=part)
        for k in range(1, count):
            part += factors[k, i] * factors[k, i:]
        offset += width - i
    return out


def _scatter(target: np.ndarray, total: np.ndarray, out_pairs: np.ndarray, in_pairs: np.ndarray,
             block: _Block) -> None:
    """The lower triangle of a layer's diagonal block from its pair sums ``total``.

    ``target`` is the ``(o f + o) x (o f + o)`` block (weight columns row-major ``(i, j)``, then
    the biases): ``target[(i, j), (k, l)] = total[out_pairs[i, k], in_pairs[j, l]]``, input ``f``
    standing for the bias.
    """
    o, f = block.outputs, block.fan_in
    weights = o * f
    grid = target[:weights, :weights].reshape(o, f, o, f)  # a view: (i, j, k, l)
    columns = in_pairs[:f, :f]
    for i in range(o):
        # Sub-blocks k <= i: the lower triangle (and both halves of the diagonal sub-block).
        # Rows first, then columns: gathering the columns of all of ``total`` at once (34 MB on
        # the 4,353-parameter network) took four times as long.
        grid[i, :, : i + 1, :] = total[out_pairs[i, : i + 1]][:, columns].transpose(1, 0, 2)
    by_output = total[:, in_pairs[f]][out_pairs.reshape(-1)]  # row (i, k), column pair(bias, l)
    target[weights:, :weights] = by_output[:, :f].reshape(o, o * f)
    target[weights:, weights:] = by_output[:, f].reshape(o, o)
