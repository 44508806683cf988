"""A module's parameters as a least-squares problem, for the LM loop.

:class:`ModuleProblem` is the bridge between an ``nn.Module`` and :func:`marquardt.solver.lm_step`:
the flattened parameters are the unknowns, ``model(X) - y`` the residuals. The per-sample
Jacobian comes from :mod:`torch.func` (``vmap`` of ``jacrev`` over samples) in chunks that fit
a byte budget, folded straight into ``J^T J`` and ``J^T r`` (see :mod:`marquardt.chunked`).
With a cross-entropy loss (:mod:`marquardt.losses`) the chunks are folded into the generalized
Gauss-Newton matrix ``J^T H J`` and the gradient ``J^T dl/dz`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .chunked import DEFAULT_JACOBIAN_BYTES, Plan, accumulate_normal, assemble_sample_space, plan_assembly
from .losses import Loss, SquaredError, accumulate_gauss_newton
from .solver import Linearization


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that require gradients, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flatten_parameters(model: nn.Module) -> Tensor:
    """The trainable parameters as one detached 1-D tensor."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(model)])


def write_parameters(model: nn.Module, x: Tensor) -> None:
    """Copy the flat vector ``x`` into the trainable parameters of ``model`` (in place)."""
    offset = 0
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@dataclass
class ModuleProblem:
    """Least squares over the trainable parameters of ``model``: residuals ``model(X) - y``.

    Parameters
    ----------
    model : nn.Module
        Maps a batch ``X`` to outputs of the shape of ``y``.
    X, y : Tensor
        Inputs (first dimension: samples) and targets (same first dimension), ``y`` as the
        loss holds it (see :meth:`marquardt.losses.Loss.targets`).
    max_jacobian_bytes : int
        Budget for the Jacobian rows held at once.
    loss : Loss
        :class:`~marquardt.losses.SquaredError` (default) gives the least-squares problem
        above; a cross-entropy loss gives its cost and generalized Gauss-Newton model, always
        in the ``n x n`` normal form.

    Examples
    --------
    >>> model = nn.Linear(1, 1).double()
    >>> X = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    >>> problem = ModuleProblem(model, X, 2 * X + 1)
    >>> lin = problem.linearize(flatten_parameters(model))
    >>> lin.grad.shape, lin.system.name
    (torch.Size([2]), 'cholesky')
    """

    model: nn.Module
    X: Tensor
    y: Tensor
    max_jacobian_bytes: int = DEFAULT_JACOBIAN_BYTES
    loss: Loss = field(default_factory=SquaredError)
    names: list[str] = field(init=False)
    shapes: list[torch.Size] = field(init=False)

    def __post_init__(self) -> None:
        named = trainable_parameters(self.model)
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.n_params = sum(p.numel() for _, p in named)
        self.outputs_per_sample = max(1, self.y[0].numel()) if self.y.shape[0] else 1
        itemsize = self.y.element_size()
        self.plan = plan_assembly(self.y.numel(), self.n_params, itemsize, self.max_jacobian_bytes)
        if not self.is_least_squares:
            # The residual-space solve needs residuals r with grad = J^T r; a loss gradient has none.
            self.plan = Plan("normal", self.plan.chunk_rows)
        self.buffers = dict(self.model.named_buffers())

    @property
    def is_least_squares(self) -> bool:
        """Whether the loss is the squared error (residuals ``model(X) - y``)."""
        return isinstance(self.loss, SquaredError)

    @property
    def n_residuals(self) -> int:
        """Number of residuals (all target elements)."""
        return self.y.numel()

    def params(self, x: Tensor) -> dict[str, Tensor]:
        """The flat vector ``x`` viewed as the module's named parameters."""
        pieces = torch.split(x, [s.numel() for s in self.shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def outputs(self, x: Tensor, X: Tensor | None = None) -> Tensor:
        """``model(X)`` with parameters ``x`` (the module itself is untouched)."""
        X = self.X if X is None else X
        return functional_call(self.model, (self.params(x), self.buffers), (X,))

    def cost(self, x: Tensor) -> float:
        """The loss's cost, ``0.5 * sum((model(X) - y)**2)`` for least squares; ``inf`` when not finite."""
        with torch.no_grad():
            value = float(self.loss.cost(self.outputs(x), self.y))
        return value if value == value and value != float("inf") else float("inf")

    def linearize(self, x: Tensor) -> Linearization:
        """``J^T J`` (or the rows, in residual space), ``J^T r`` and the cost at ``x``.

        For a cross-entropy loss: ``J^T H J``, ``J^T dl/dz`` and the cost.
        """
        if not self.is_least_squares:
            terms = (self.loss.gauss_newton(jac, out, y) for jac, out, y in self._jacobian_outputs(x))
            system, grad, cost = accumulate_gauss_newton(terms, self.n_params, dtype=x.dtype, device=x.device)
            return Linearization(cost, grad, system)
        chunks = self.jacobian_chunks(x)
        if self.plan.form == "sample-space":
            system, grad, cost = assemble_sample_space(chunks)
            return Linearization(cost, grad, system, system.residuals, system.jac)
        system, grad, cost = accumulate_normal(chunks, self.n_params, dtype=x.dtype, device=x.device)
        return Linearization(cost, grad, system)

    def jacobian_chunks(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(J_rows, residual_rows)`` for consecutive chunks of samples."""
        for jac, outputs, targets in self._jacobian_outputs(x):
            yield jac, (outputs - targets).reshape(-1)

    def _jacobian_outputs(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(J_rows, outputs, targets)`` for consecutive chunks of samples."""
        params = self.params(x)
        samples = max(1, self.plan.chunk_rows // self.outputs_per_sample)
        per_sample = vmap(jacrev(self._single, has_aux=True), in_dims=(None, 0))
        for start in range(0, self.X.shape[0], samples):
            X_chunk = self.X[start : start + samples]
            jacs, outputs = per_sample(params, X_chunk)
            rows = outputs.reshape(-1).numel()
            jac = torch.cat([jacs[name].reshape(rows, -1) for name in self.names], dim=1)
            yield jac.detach(), outputs.detach(), self.y[start : start + samples]

    def _single(self, params: dict[str, Tensor], sample: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(self.model, (params, self.buffers), (sample.unsqueeze(0),)).squeeze(0)
        return out, out
