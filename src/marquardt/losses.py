"""Training losses and their Gauss-Newton pieces: pure tensor code.

A loss sees network outputs ``z`` (one row per sample) and targets, never a module. For the LM
step it turns a chunk of output Jacobians ``J`` (``d z / d w``, one block of rows per sample)
into the three pieces of the *generalized Gauss-Newton* model (Schraudolph, 2002) of the cost:

* curvature rows ``R = L J`` with ``L^T L = H``, the Hessian of the loss with respect to the
  outputs, so that ``R^T R = J^T H J`` is accumulated exactly like ordinary Jacobian rows;
* the gradient ``J^T (dl/dz)``;
* the cost itself, for the accept/reject test and the gain ratio.

For the squared error ``L = I`` and this is the ordinary Gauss-Newton model. For the softmax
cross-entropy ``H = diag(p) - p p^T`` and ``L = diag(sqrt p) - sqrt(p) p^T`` (``sum p = 1``),
which stays finite as ``p -> 1``; the gradient ``J^T (p - y)`` is formed directly rather than
through residuals such as ``sqrt(-log p)``, which break down (0/0) at a perfect fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from .chunked import AccumulatedNormalEquations, PromotedEquations, accumulation_dtype, symmetric_rank_update

#: Lower-precision dtypes some CPU loss kernels lack in older torch releases.
_HALF_DTYPES = (torch.float16, torch.bfloat16)

__all__ = [
    "LOSSES",
    "BinaryCrossEntropy",
    "CrossEntropy",
    "Loss",
    "SquaredError",
    "accumulate_gauss_newton",
    "make_loss",
]


class Loss(Protocol):
    """What training needs of a loss (see the module docstring for the Gauss-Newton pieces)."""

    name: str
    classification: bool

    def targets(self, y: Tensor, probe_shape: tuple[int, ...], name: str) -> Tensor:
        """Validate ``y`` against the model's outputs; return the targets as training holds them.

        ``probe_shape`` is the shape of the outputs for the first (at most two) samples.
        """

    def cost(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The summed cost (a 0-d tensor) that the LM step minimises."""

    def perf_scale(self, targets: Tensor) -> float:
        """Factor from cost to the reported performance (and from ``||grad||`` to the gradient)."""

    def gauss_newton(self, jac: Tensor, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L J, J^T dl/dz, cost)`` for a chunk of samples; ``jac`` has one row per output element."""

    def curvature_rows(self, outputs: Tensor, values: Tensor) -> Tensor:
        """``L_n values_n`` per sample: ``values`` ``(N, K, ...)`` holds, per sample, one row per
        output (the rows of ``J``, or a layer's deltas, of which they are outer products)."""

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The differentiable performance, for first-order methods."""

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Number of correct predictions (0-d tensor); NaN for regression."""

    def predictions(self, targets: Tensor) -> int:
        """Number of predictions that :meth:`correct` counts over (accuracy's denominator)."""


def _bad_targets(loss: str, name: str, problem: str, expected: str) -> ValueError:
    return ValueError(f"Invalid {name} for loss={loss!r}: {problem}; expected {expected}.")


@dataclass(frozen=True)
class SquaredError:
    """``cost = 1/2 sum (z - y)^2``; performance is the mean squared error (MATLAB ``mse``).

    Examples
    --------
    >>> loss = SquaredError()
    >>> z, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    >>> float(loss.cost(z, y)), float(loss.cost(z, y)) * loss.perf_scale(y)
    (2.5, 2.5)
    """

    name: str = "mse"
    classification: bool = False

    def targets(self, y: Tensor, probe_shape: tuple[int, ...], name: str) -> Tensor:
        output_shape = tuple(probe_shape[1:])
        if y.ndim == 1 and output_shape == (1,):
            y = y.reshape(-1, 1)
        if tuple(y.shape[1:]) != output_shape:
            raise ValueError(
                f"The model output shape {tuple(probe_shape)} does not match the targets {name} shape "
                f"{tuple(y.shape)} (per sample {output_shape} vs {tuple(y.shape[1:])}); reshape {name} or "
                "change the model's output layer (outputs are never broadcast)."
            )
        return y

    def cost(self, outputs: Tensor, targets: Tensor) -> Tensor:
        r = outputs - targets
        return 0.5 * (r * r).sum()

    def perf_scale(self, targets: Tensor) -> float:
        return 2.0 / targets.numel()

    def gauss_newton(self, jac: Tensor, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = (outputs - targets).reshape(-1)
        return jac, jac.T @ r, 0.5 * (r @ r)

    def curvature_rows(self, outputs: Tensor, values: Tensor) -> Tensor:
        return values  # H = I

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.device.type == "cpu" and outputs.dtype in _HALF_DTYPES:
            # torch 2.4 has no CPU mse_loss kernel for bfloat16 ('"mse_cpu" not implemented').
            return (outputs - targets).square().mean()
        return F.mse_loss(outputs, targets)

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs.new_tensor(float("nan"))

    def predictions(self, targets: Tensor) -> int:
        return targets.numel()


@dataclass(frozen=True)
class CrossEntropy:
    """Softmax cross-entropy over the outputs (logits): ``cost = -sum_i sum_k y_ik log p_ik``.

    Targets are class indices ``(N,)`` in ``[0, K)`` or rows of class probabilities ``(N, K)``
    (one-hot); they are held as ``(N, K)`` probabilities. Performance is the mean
    cross-entropy per sample, as :func:`torch.nn.functional.cross_entropy`.

    Notes
    -----
    With ``p = softmax(z)`` the gradient of the cost is ``J^T (p - y)`` and the Hessian with
    respect to ``z`` is ``H = diag(p) - p p^T``, factored per sample as ``H = L^T L`` with
    ``L = diag(sqrt p) - sqrt(p) p^T`` (expand: ``diag(p) - 2 p p^T + p (sum p) p^T``).

    Examples
    --------
    >>> loss = CrossEntropy()
    >>> z = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    >>> p = torch.softmax(z, dim=1)[0]
    >>> rows, _, _ = loss.gauss_newton(torch.eye(3, dtype=torch.float64), z, torch.tensor([[0.0, 0.0, 1.0]]))
    >>> bool(torch.allclose(rows.T @ rows, torch.diag(p) - torch.outer(p, p)))
    True
    """

    name: str = "cross_entropy"
    classification: bool = True

    def targets(self, y: Tensor, probe_shape: tuple[int, ...], name: str) -> Tensor:
        output_shape = tuple(probe_shape[1:])
        if len(output_shape) != 1 or output_shape[0] < 2:
            raise ValueError(
                f"loss='cross_entropy' needs a model with outputs of shape (N, K), K >= 2 (one logit per class); "
                f"received per-sample output shape {tuple(output_shape)}. For two classes with one output "
                "use loss='binary_cross_entropy'."
            )
        n_classes = output_shape[0]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.ndim == 1:
            return F.one_hot(self._class_indices(y, n_classes, name), n_classes).to(y.dtype)
        if y.ndim == 2 and y.shape[1] == n_classes:
            return self._probabilities(y, name)
        raise _bad_targets(self.name, name, f"shape {tuple(y.shape)}",
                           f"class indices of shape (N,) or one-hot rows of shape (N, {n_classes})")

    def _class_indices(self, y: Tensor, n_classes: int, name: str) -> Tensor:
        bad = (y != y.round()) | (y < 0) | (y >= n_classes)
        if bool(bad.any()):
            index = int(torch.nonzero(bad)[0])
            raise _bad_targets(self.name, name, f"class index {float(y[index]):g} at sample {index}",
                               f"integers in [0, {n_classes}) for a model with {n_classes} outputs")
        return y.long()

    def _probabilities(self, y: Tensor, name: str) -> Tensor:
        bad = (y < 0) | (y > 1)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise _bad_targets(self.name, name, f"value outside [0, 1] in row {row}",
                               "one-hot rows (or class probabilities in [0, 1])")
        sums = y.sum(dim=1)
        off = (sums - 1).abs() > 1e-4
        if bool(off.any()):
            row = int(torch.nonzero(off)[0])
            raise _bad_targets(self.name, name, f"row {row} sums to {float(sums[row]):g}",
                               "one-hot rows (or class probabilities) that sum to 1")
        return y

    def cost(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -(targets * torch.log_softmax(outputs, dim=1)).sum()

    def perf_scale(self, targets: Tensor) -> float:
        return 1.0 / targets.shape[0]

    def gauss_newton(self, jac: Tensor, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        samples, n_classes = outputs.shape
        p = torch.softmax(outputs, dim=1)
        rows = self.curvature_rows(outputs, jac.reshape(samples, n_classes, -1)).reshape(jac.shape)
        return rows, jac.T @ (p - targets).reshape(-1), self.cost(outputs, targets)

    def curvature_rows(self, outputs: Tensor, values: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=1)
        root = p.sqrt()
        factor = torch.diag_embed(root) - root[:, :, None] * p[:, None, :]
        return torch.bmm(factor, values.reshape(values.shape[0], values.shape[1], -1)).reshape(values.shape)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.argmax(dim=1) == targets.argmax(dim=1)).sum()

    def predictions(self, targets: Tensor) -> int:
        return targets.shape[0]


@dataclass(frozen=True)
class BinaryCrossEntropy:
    """Sigmoid cross-entropy on each output: ``cost = sum log(1 + exp(z)) - y z`` with ``y`` in {0, 1}.

    Performance is the mean over all target elements, as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Notes
    -----
    With ``p = sigmoid(z)`` the gradient is ``J^T (p - y)`` and the Hessian with respect to
    ``z`` is ``diag(p (1 - p))``, whose factor is ``diag(sqrt(p (1 - p)))``.

    Examples
    --------
    >>> loss = BinaryCrossEntropy()
    >>> z, y = torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [0.0]])
    >>> round(float(loss.cost(z, y) * loss.perf_scale(y)), 4)  # log 2
    0.6931
    """

    name: str = "binary_cross_entropy"
    classification: bool = True

    def targets(self, y: Tensor, probe_shape: tuple[int, ...], name: str) -> Tensor:
        y = SquaredError().targets(y, probe_shape, name)
        bad = (y != 0) & (y != 1)
        if bool(bad.any()):
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise _bad_targets(self.name, name, f"value {float(y[index]):g} at index {index}", "0 or 1")
        return y

    def cost(self, outputs: Tensor, targets: Tensor) -> Tensor:
        # torch's max(z, 0) - y z + log1p(exp(-|z|)) keeps the exp(-|z|) tail that
        # softplus(z) - y z loses (softplus returns z itself past z = 20).
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")

    def perf_scale(self, targets: Tensor) -> float:
        return 1.0 / targets.numel()

    def gauss_newton(self, jac: Tensor, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = outputs.reshape(-1)
        rows = self.curvature_rows(outputs, jac.reshape(*outputs.shape, -1)).reshape(jac.shape)
        return rows, jac.T @ (torch.sigmoid(z) - targets.reshape(-1)), self.cost(outputs, targets)

    def curvature_rows(self, outputs: Tensor, values: Tensor) -> Tensor:
        # sigmoid(z) sigmoid(-z) = p (1 - p) without cancellation when p -> 1.
        root = (torch.sigmoid(outputs) * torch.sigmoid(-outputs)).sqrt()
        # values: (*outputs.shape, ...): one weight per output, broadcast over the trailing axes.
        return root.reshape(*root.shape, *([1] * (values.ndim - root.ndim))) * values

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return ((outputs > 0) == (targets > 0.5)).sum()

    def predictions(self, targets: Tensor) -> int:
        return targets.numel()


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (SquaredError(), CrossEntropy(), BinaryCrossEntropy())}


def make_loss(loss: str | Loss) -> Loss:
    """The loss named ``loss`` (``"mse"``, ``"cross_entropy"``, ``"binary_cross_entropy"``).

    Examples
    --------
    >>> make_loss("cross_entropy").name
    'cross_entropy'
    """
    if isinstance(loss, (SquaredError, CrossEntropy, BinaryCrossEntropy)):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(f"Invalid loss: {loss!r}; expected one of {sorted(LOSSES)}.")


def accumulate_gauss_newton(chunks: Iterable[tuple[Tensor, Tensor, Tensor]], n: int, *, dtype: torch.dtype,
                            device: torch.device | str, structure=None
                            ) -> tuple[AccumulatedNormalEquations | PromotedEquations, Tensor, float]:
    """Fold ``(L J, J^T dl/dz, cost)`` chunks into ``J^T H J``, the gradient and the cost.

    The curvature rows play the part of Jacobian rows in
    :func:`marquardt.chunked.accumulate_normal`; the gradient comes separately because it is
    not ``(L J)^T`` of any finite residual vector when ``H`` is singular (softmax).

    ``structure``: a :class:`~marquardt.kronecker.LayerGram` for the network, which then forms
    ``J^T H J`` (CPU); the chunks are then ``(L J, J^T dl/dz, cost, extra)``, ``extra`` what its
    ``fold`` reads besides the rows (a linearization whose deltas are the curvature rows' own,
    ``L delta``: the rows ``L J`` keep the outer-product form of ``J``'s).

    A float16 or bfloat16 system is assembled and solved in
    :func:`~marquardt.chunked.accumulation_dtype` (LAPACK has no half-precision Cholesky) and
    seen by the LM loop in ``dtype`` (:class:`~marquardt.chunked.PromotedEquations`), as the
    squared error's is; the cost is summed in ``dtype``, as a trial's cost is.

    Examples
    --------
    >>> rows, grad = torch.eye(2), torch.ones(2)
    >>> system, g, cost = accumulate_gauss_newton([(rows, grad, torch.tensor(0.5))] * 2, 2,
    ...                                           dtype=torch.float32, device="cpu")
    >>> system.gram.tolist(), g.tolist(), cost
    ([[2.0, 0.0], [0.0, 2.0]], [2.0, 2.0], 1.0)
    """
    wide = _assembly_dtype(dtype, n)
    grad = torch.zeros(n, dtype=wide, device=device)
    total = torch.zeros((), dtype=dtype, device=device)
    if structure is not None:
        gram = torch.empty(n, n, dtype=wide, device=device)
        structure.clear(gram)  # what its folds do not overwrite
    else:
        gram = torch.zeros(n, n, dtype=wide, device=device)
    count = 0
    for chunk in chunks:
        rows, grad_part, cost_part = chunk[0].to(wide), chunk[1], chunk[2]
        if structure is not None:
            structure.fold(gram, None, rows, None, chunk[3])
        else:
            symmetric_rank_update(gram, rows)
        grad += grad_part
        total += cost_part
        count += 1
    if structure is not None:
        structure.finish(gram)
    else:
        gram.tril_()  # the lower triangle is the system (addmm, off the BLAS path, filled both)
    # The least-squares system: its solves floor the damping at eps * trace, which a float32
    # J^T H J near a minimum needs (a plain NormalEquations failed Cholesky on rounding-negative
    # eigenvalues and paid an eigen-decomposition in 16 of 40 epochs of a 4-20-20-3 network).
    system = AccumulatedNormalEquations(gram, chunks=max(count, 1))
    if wide != dtype:
        return PromotedEquations(system, dtype), grad.to(dtype), float(total)
    return system, grad, float(total)


def _assembly_dtype(dtype: torch.dtype, n: int) -> torch.dtype:
    """The dtype ``J^T H J`` is assembled and solved in: ``dtype`` itself, but float16 and bfloat16
    as the squared error assembles them (float64 up to ``PROMOTE_MAX_PARAMS`` parameters, float32
    past it): a half-precision matrix has no Cholesky factor in torch ('"cholesky_cpu" not
    implemented for Half' ended the first step)."""
    return accumulation_dtype(dtype, n) if dtype in _HALF_DTYPES else dtype
