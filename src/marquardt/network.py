"""A module's parameters as a least-squares problem, for the LM loop.

:class:`ModuleProblem` is the bridge between an ``nn.Module`` and :func:`marquardt.solver.lm_step`:
the flattened parameters are the unknowns, ``model(X) - y`` the residuals. The per-sample
Jacobian comes in closed form for stacks of linear layers and elementwise activations
(:mod:`marquardt.fastjac`), from :mod:`torch.func` (``vmap`` of ``jacrev`` over samples) for
anything else, in chunks that fit a byte budget. The system form follows the shape and the
memory budgets (:func:`marquardt.chunked.plan_assembly`): the chunks are folded straight into
``J^T J`` and ``J^T r``, kept whole for the sample-space solve, or not formed at all
(conjugate gradients on Jacobian products, :mod:`marquardt.matfree`).
With a cross-entropy loss (:mod:`marquardt.losses`) the chunks are folded into the generalized
Gauss-Newton matrix ``J^T H J`` and the gradient ``J^T dl/dz`` instead. A tiny float64
least-squares stack of affine layers and ``tanh`` (the benchmark's 1-20-1 network) runs its
forward passes and ``J`` in buffers allocated once (:class:`marquardt.fastjac.BufferedNetwork`),
with the same kernels and so the same iterates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .chunked import (
    DEFAULT_JACOBIAN_BYTES,
    DEFAULT_MATRIX_BYTES,
    AccumulatedNormalEquations,
    KernelSampleSpaceEquations,
    PromotedEquations,
    accumulate_normal,
    accumulation_dtype,
    assemble_sample_space,
    normal_equations,
    plan_assembly,
    single_thread,
)
from .fastjac import VMAP_RANDOM, BufferedNetwork, FunctionalJacobian, LayeredJacobian, jacobian_backend
from .kronecker import LayerGram
from .losses import Loss, SquaredError, accumulate_gauss_newton
from .matfree import MatrixFreeEquations, curvature_sample_size, float64_norm, scaled_products, warm_start
from .solver import Linearization


@contextmanager
def evaluation_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode, each submodule's own mode restored after (anything that is not
    an ``nn.Module`` is left alone): a forward pass that only reads the model (a shape probe,
    a plotted curve) must not move BatchNorm's running statistics or sample dropout.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))
    >>> with evaluation_mode(model):
    ...     model.training
    False
    >>> model.training
    True
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training



#: A context that does nothing, made once (``nullcontext`` holds no state and can be reused).
_NO_CONTEXT = nullcontext()


def _finite(value: float) -> float:
    """``value``, or ``inf`` when it is not finite."""
    return value if value == value and value != float("inf") else float("inf")


@dataclass
class CurvatureFactors:
    """A chunk's :class:`~marquardt.fastjac.LinearizedNetwork` seen through the loss's Hessian
    factor ``L``: the curvature rows ``L J`` are outer products of the layer inputs with the
    deltas ``L delta``, which :meth:`delta` gives per layer (what :class:`~marquardt.kronecker.LayerGram`
    reads to form ``J^T H J``, for its large layers only: the small ones' columns come from the
    rows ``L J`` themselves, and their deltas are never transformed)."""

    lin: Any
    loss: Loss
    outputs: Tensor

    @property
    def inputs(self) -> list[Tensor]:
        return self.lin.inputs

    def delta(self, layer: int) -> Tensor:
        """``L delta`` of layer ``layer``."""
        return self.loss.curvature_rows(self.outputs, self.lin.delta(layer))


def _check_deterministic(model: nn.Module) -> None:
    """A ValueError, before any work, for submodules in training mode whose forward pass is random
    (dropout) or updates state (batch norm, instance norm with running statistics), and for
    batch norm that normalizes by the batch's statistics in any mode.

    LM keeps a step only if the cost at the trial weights is lower: a cost that changes from one
    call to the next at the same weights makes that test meaningless, and the per-sample rows of
    :mod:`torch.func` cannot be formed at all (``vmap`` refuses the random mask and the in-place
    update of the running statistics, with a RuntimeError from inside torch, after the start's
    forward passes had moved those statistics). Batch statistics mix the samples: the rows of
    one sample at a time are not the derivatives of the batch's outputs.
    """
    batch_statistics = [_label(name, module) for name, module in model.named_modules()
                        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None]
    if batch_statistics:
        raise ValueError(
            f"Invalid model: submodule(s) {', '.join(batch_statistics)} normalize by the statistics of the batch "
            "(track_running_stats=False), in eval mode too, so each sample's outputs depend on the other samples "
            "and Levenberg-Marquardt's per-sample Jacobian rows are not their derivatives; build the batch norm "
            "with track_running_stats=True and call model.eval(), use a per-sample normalization (nn.LayerNorm, "
            "nn.GroupNorm), or train with a first-order method (method='momentum' or a torch.optim class).")
    stateful = [_label(name, module) for name, module in model.named_modules() if module.training and _changes(module)]
    if stateful:
        raise ValueError(
            f"Invalid model: submodule(s) {', '.join(stateful)} in training mode make model(X) random or change "
            "it at every call, and Levenberg-Marquardt compares the cost of each trial step at fixed weights; call "
            "model.eval() first (dropout off, batch norm on its running statistics), or train with a "
            "first-order method (method='momentum' or a torch.optim class).")


def _label(name: str, module: nn.Module) -> str:
    return f"'{name or 'model'}' ({type(module).__name__})"


def _changes(module: nn.Module) -> bool:
    """Whether ``module``'s forward pass in training mode is random or updates its state."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats


def _raise_if_random(error: RuntimeError) -> None:
    """The ValueError of :func:`_check_deterministic` for randomness it cannot see: a random
    operation called in ``forward`` itself (``F.dropout(x, p, training=self.training)``), which
    the per-sample Jacobian meets as torch.func's RuntimeError. Other errors are left alone."""
    if VMAP_RANDOM not in str(error):
        return
    raise _random_model_error() from error


def _random_model_error() -> ValueError:
    return ValueError(
        "Invalid model: model(X) calls a random operation (functional dropout such as F.dropout(x, p, "
        "training=self.training), or a torch random function) and Levenberg-Marquardt compares the cost of each "
        "trial step at fixed weights; call model.eval() first if it is dropout in training mode, or remove the "
        "random operation from forward, or train with a first-order method (method='momentum' or a torch.optim "
        "class).")


#: Samples of the forward pass :func:`_check_repeatable` runs twice.
REPEAT_SAMPLES = 64


def _check_repeatable(backend: FunctionalJacobian, params: dict[str, Tensor], X: Tensor) -> None:
    """The ValueError of :func:`_raise_if_random`, before any work, where two forward passes at the
    same weights differ: a random operation in ``forward`` that no submodule shows.

    The per-sample rows of :mod:`torch.func` meet it as an error, but the matrix-free form makes
    only ``jvp`` and ``vjp`` products, which draw a new mask at each call: it trained on random
    costs. Outputs that agree to ``sqrt(eps)`` relative pass (a GPU's reductions need not be
    bitwise repeatable); dropout moves them far more.
    """
    with torch.no_grad():
        first, second = backend.outputs(params, X), backend.outputs(params, X)
    if not (isinstance(first, Tensor) and first.is_floating_point() and first.numel()
            and second.shape == first.shape and bool(torch.isfinite(first).all())):
        return  # not this check's to judge: a non-finite start has its own error (train._check_finite_start)
    tolerance = math.sqrt(torch.finfo(first.dtype).eps) * float(first.abs().max())
    if float((first - second).abs().max()) > tolerance:
        raise _random_model_error()


#: Samples of the batch whose outputs :func:`_check_per_sample` compares with each sample's alone.
MIXING_SAMPLES = 8


def _check_per_sample(backend: FunctionalJacobian, params: dict[str, Tensor], X: Tensor) -> None:
    """A ValueError, before any work, where a sample's outputs computed alone differ from its
    outputs in a batch: a ``forward`` that mixes the samples (``x - x.mean(0)``).

    The per-sample Jacobian rows of :mod:`torch.func` differentiate each sample alone, where such
    a centered input is zero: LM stopped on "Maximum MU reached." at its starting cost, and with
    ``x.std(0)`` (NaN for one sample) blamed the initial weights. Outputs that agree to
    ``sqrt(eps)`` of the largest pass (a batch of one may take other kernels).
    """
    try:
        with torch.no_grad():
            batched, alone = backend.outputs(params, X), backend.sample_outputs(params, X)
    except (RuntimeError, ValueError, IndexError):
        return  # not this check's to judge: the Jacobian's own pass raises what is wrong
    if not (isinstance(batched, Tensor) and batched.is_floating_point() and batched.numel()
            and alone.numel() == batched.numel() and bool(torch.isfinite(batched).all())):
        return
    gaps = (batched.reshape(alone.shape) - alone).abs().reshape(X.shape[0], -1).amax(1).nan_to_num(nan=math.inf)
    largest = float(batched.abs().max())
    mixed = torch.nonzero(gaps > math.sqrt(torch.finfo(batched.dtype).eps) * largest)
    if mixed.numel():
        raise ValueError(
            f"Invalid model: model(X) mixes the samples: the outputs of sample {int(mixed[0])} computed alone differ "
            f"from its outputs in a batch of {X.shape[0]} (largest difference {float(gaps.max()):.3g}, against "
            f"{largest:.3g} for the largest output). Levenberg-Marquardt's Jacobian rows are those of each sample "
            "alone; compute statistics of the data (x - x.mean(0), x.std(0)) once from the training set, outside "
            "the model or as fixed buffers, or train with a first-order method (method='momentum' or a "
            "torch.optim class).")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that require gradients, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flatten_parameters(model: nn.Module) -> Tensor:
    """The trainable parameters as one detached 1-D tensor."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(model)])


def write_parameters(model: nn.Module, x: Tensor, parameters: list[Tensor] | None = None) -> None:
    """Copy the flat vector ``x`` into the trainable parameters of ``model`` (in place).

    ``parameters``: those parameters, when the caller has them already (a training loop writes
    every epoch; walking ``named_parameters`` is most of the cost of writing a tiny network).
    CPU float parameters are written through numpy views (the same rounding to their dtype as
    ``copy_``, without autograd's version bump): 13 us against 27 us for the four tensors of
    the 1-20-1 benchmark network.
    """
    if parameters is None:
        parameters = [p for _, p in trainable_parameters(model)]
    if _write_numpy(x, parameters):
        return
    offset = 0
    with torch.no_grad():
        for p in parameters:
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _is_numpy_float(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) \
        and t.is_contiguous()


def _write_numpy(x: Tensor, parameters: list[Tensor]) -> bool:
    """:func:`write_parameters` on numpy views; False (nothing written) unless all are CPU float tensors."""
    if x.ndim != 1 or not _is_numpy_float(x):
        return False
    targets = []
    for p in parameters:
        if not _is_numpy_float(p):
            return False
        targets.append(p.detach().numpy().reshape(-1))
    values, offset = x.detach().numpy(), 0
    for target in targets:
        target[...] = values[offset : offset + target.shape[0]]
        offset += target.shape[0]
    return True


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
    solver : {"auto", "normal", "sample-space", "matrix-free"}
        The system form (see :func:`~marquardt.chunked.plan_assembly`); ``"auto"`` picks it from
        the shape and the budgets.
    max_matrix_bytes : int
        Budget for the ``n x n`` normal matrix; past it ``"auto"`` goes matrix-free.
    cg_max_iter : int
        Most conjugate-gradient directions per matrix-free linearization: up to
        ``cg_max_iter + 1`` Jacobian products (the warm start's and one per direction).
    curvature_samples : int, optional
        Samples whose Jacobian products model ``J^T J`` in the matrix-free form (the gradient
        and the cost always use all samples); default :func:`~marquardt.matfree.curvature_sample_size`.
    seed : int
        Seeds the choice of those samples (a fresh subset at each linearization).

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
    solver: str = "auto"
    max_matrix_bytes: int = DEFAULT_MATRIX_BYTES
    cg_max_iter: int = 20
    curvature_samples: int | None = None
    seed: int = 0
    names: list[str] = field(init=False)
    shapes: list[torch.Size] = field(init=False)

    def __post_init__(self) -> None:
        _check_deterministic(self.model)
        named = trainable_parameters(self.model)
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.n_params = sum(p.numel() for _, p in named)
        self._pieces, start = [], 0
        for name, p in named:
            self._pieces.append((name, start, start + p.numel(), p.shape, torch.empty(p.shape, device="meta").stride()))
            start += p.numel()
        self.outputs_per_sample = max(1, self.y[0].numel()) if self.y.shape[0] else 1
        # The residual-space and matrix-free solves need residuals r with grad = J^T r; a
        # cross-entropy gradient has none, so its model is always the normal form.
        form = self.solver if self.is_least_squares else self._normal_form_only(named)
        self.plan = plan_assembly(self.y.numel(), self.n_params, self.y.element_size(), self.max_jacobian_bytes,
                                  max_matrix_bytes=self.max_matrix_bytes, form=form)
        self.buffers = dict(self.model.named_buffers())
        layout = [(name, p.numel()) for name, p in named]
        self.backend = jacobian_backend(self.model, layout, self.buffers, X=self.X)
        if isinstance(self.backend, FunctionalJacobian):
            params = {name: p.detach() for name, p in named}
            _check_repeatable(self.backend, params, self.X[:REPEAT_SAMPLES])
            _check_per_sample(self.backend, params, self.X[:MIXING_SAMPLES])
        self.dtype = self._working_dtype()
        # Least squares sums its cost in the dtype the normal equations are assembled in (float64
        # for a small float32/float16 problem): a trial's cost and the linearization's, whose
        # difference decides whether a step is kept, then agree at the same point.
        self.cost_dtype = accumulation_dtype(self.dtype, self.n_params) if self.is_least_squares else self.dtype
        if self.dtype != self.X.dtype:
            self.X, self.y = self.X.to(self.dtype), self.y.to(self.dtype)
        self._previous: tuple[Tensor, float, float] | None = None  # matrix-free warm start and forcing
        self._trial: tuple[Tensor, Any] | None = None  # the last cost's forward pass, kept for linearize
        self._generator = torch.Generator().manual_seed(self.seed)
        self._buffered = self._buffered_network()
        self._spare: dict[str, Tensor] = {}  # buffers of a released system, for the next linearization
        self._rows: Tensor | None = None  # the Jacobian chunk buffer of jacobian_chunks(reuse=True)
        self._layer_gram = self._structured_gram()

    def _normal_form_only(self, named: list[tuple[str, Tensor]]) -> str:
        """``"normal"`` for a cross-entropy loss, whose ``J^T H J`` has no other form here; a
        ValueError for another ``solver``, or a matrix past ``max_matrix_bytes`` (where the
        squared error would go matrix-free), before any work."""
        if self.solver not in ("auto", "normal"):
            raise ValueError(f"solver={self.solver!r} needs the squared-error loss; the {self.loss.name} loss "
                             "is solved in the normal form only: pass solver='auto' or 'normal'.")
        itemsize = named[0][1].element_size() if named else 4
        needed = self.n_params ** 2 * itemsize
        if needed > self.max_matrix_bytes:
            raise ValueError(
                f"The {self.loss.name} loss needs the {self.n_params} x {self.n_params} Gauss-Newton matrix "
                f"({needed:,} bytes, and a factor and a partial sum of the same size), more than "
                f"max_matrix_bytes={self.max_matrix_bytes}; pass a larger max_matrix_bytes if the memory is "
                "there, or train with a first-order method (method='momentum' or a torch.optim class).")
        return "normal"

    def _structured_gram(self) -> LayerGram | None:
        """The Kronecker-structured ``J^T J`` (or ``J^T H J``; :class:`~marquardt.kronecker.LayerGram`)
        where the normal equations of a closed-form network have a layer large enough for it,
        else None (``?syrk``, or block products for ``J^T H J``)."""
        if not (self.plan.form == "normal" and isinstance(self.backend, LayeredJacobian) and self._buffered is None):
            return None
        dtype = accumulation_dtype(self.dtype, self.n_params) if self.is_least_squares else self.dtype
        return LayerGram.plan(self.backend.network, self.backend.layout, dtype, self.X.device)

    def _buffered_network(self) -> BufferedNetwork | None:
        """The reused-buffer forward pass and ``J`` (:class:`~marquardt.fastjac.BufferedNetwork`)
        for a tiny float64 least-squares network held in one chunk, else None.

        Same arithmetic as the general closed-form path, kernel for kernel (bitwise the same
        costs, ``J``, ``J^T J`` and gradient), with most of its per-call overhead gone: on the
        1-20-1 benchmark network a trial's cost went from 80 to 64 us and a linearization from
        ~360 to ~275 us (one thread, interleaved medians).
        """
        if not (self.plan.serial and self._keeps_trials and self.plan.form == "normal"):
            return None
        outputs = (self.X.shape[0], self.outputs_per_sample)
        if not (BufferedNetwork.supports(self.backend.network, self.X) and self.y.shape == outputs
                and self.y.dtype == torch.float64):
            return None
        buffered = BufferedNetwork(self.backend.network, self.backend.layout, self.X)
        self._targets = self.y.detach().contiguous().numpy()
        self._residuals = torch.empty(self.y.numel(), dtype=torch.float64)
        # numpy views of the fixed buffers, made once: they are read at every trial.
        self._outputs_np = buffered.outputs.numpy()
        self._residuals_np = self._residuals.numpy().reshape(self._targets.shape)
        return buffered

    def _working_dtype(self) -> torch.dtype:
        """float64 for a tiny lower-precision least-squares network in closed form, else its own dtype.

        On tiny problems float32 is what stops LM, not time: the 1-20-1 benchmark network
        stalls at MSE 1.4e-5 in float32 (weights and costs too coarse for the steps along that
        plateau; the peer stops there too) and reaches 1e-7 in float64. There the whole
        problem (weights, forward passes, Jacobian) runs in float64, for about the same cost;
        the module keeps its dtype and receives rounded weights (the costs, and ``fit``'s
        recorded performance, are those of the float64 weights; rounding changes the benchmark
        network's MSE near 1e-7 in the fourth digit at most).
        """
        native = self.X.dtype
        if not (self.plan.serial and self.is_least_squares and isinstance(self.backend, LayeredJacobian)):
            return native
        return accumulation_dtype(native, self.n_params)

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
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if x.ndim == 1 and x.shape[0] == self.n_params and x.stride(0) == 1 and not x.requires_grad:
            # One as_strided per piece: a third of the time of slicing then viewing (7 us
            # against 20 us for four pieces), and this runs at every trial point.
            base = x.storage_offset()
            return {name: x.as_strided(shape, stride, base + start) for name, start, _, shape, stride in self._pieces}
        return {name: x[start:stop].view(shape) for name, start, stop, shape, _ in self._pieces}

    def outputs(self, x: Tensor, X: Tensor | None = None) -> Tensor:
        """``model(X)`` with parameters ``x`` (the module itself is untouched)."""
        return self.backend.outputs(self.params(x), self.X if X is None else X.to(self.dtype))

    def cost(self, x: Tensor) -> float:
        """The loss's cost, ``0.5 * sum((model(X) - y)**2)`` for least squares; ``inf`` when not finite."""
        if self._buffered is not None:
            # The buffers carry no autograd graph: no_grad matters only for an x that does.
            with self._threads(), (torch.no_grad() if x.requires_grad else _NO_CONTEXT):
                residuals = self._buffered_residuals(x, fresh=True)
                return _finite(0.5 * float(residuals @ residuals))
        with torch.no_grad(), self._threads():
            if not self._keeps_trials:
                return _finite(self._chunked_cost(x))
            return _finite(float(self._outputs_cost(self._trial_outputs(x), self.y)))

    def _outputs_cost(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss's cost of ``outputs`` (a 0-d tensor); for least squares ``0.5 * r @ r``, as the
        linearization computes it: trial and current costs, whose difference decides whether a
        step is kept, agree to the last bit at the same point."""
        if self.is_least_squares:
            return self._squared_cost((outputs - targets).reshape(-1))
        return self.loss.cost(outputs, targets)

    def _squared_cost(self, residuals: Tensor) -> Tensor:
        """``0.5 * r @ r`` in :attr:`cost_dtype` (a 0-d tensor), as the linearization sums it.

        A float16 network's own sum rounded its trial costs to float16: 1238.0 where the
        linearization, in float64, read 1238.19 at the same point, a difference larger than the
        reductions it decides on near a minimum.
        """
        if residuals.dtype != self.cost_dtype:
            residuals = residuals.to(self.cost_dtype)
        return 0.5 * (residuals @ residuals)

    def _chunked_cost(self, x: Tensor) -> float:
        """The cost at ``x`` by forward passes over chunks of samples (:meth:`_forward_samples`).

        On the chunked normal form the Jacobian rows are bounded by ``max_jacobian_bytes``; a
        trial's forward pass over every sample at once was not (its activations grow with
        ``m``). Where one chunk holds every sample, as on the benchmark networks, this is the
        one forward pass it was.
        """
        params = self.params(x)
        samples = self._forward_samples()
        total = torch.zeros((), dtype=self.cost_dtype, device=self.X.device)
        for start in range(0, self.X.shape[0], samples):
            outputs = self.backend.outputs(params, self.X[start : start + samples])
            total += self._outputs_cost(outputs, self.y[start : start + samples])
        return float(total)

    def _forward_samples(self) -> int:
        """Samples a trial's forward pass takes at once: as many as fit ``max_jacobian_bytes``
        at two numbers an activation (a layer's affine output and its activation; ``W`` per
        sample, the sum of the layer widths) for a closed-form network, else the Jacobian's
        chunk of samples (a Jacobian row holds more numbers than a sample's activations)."""
        jacobian_samples = max(1, self.plan.chunk_rows // self.outputs_per_sample)
        if not isinstance(self.backend, LayeredJacobian):
            return jacobian_samples
        numel, width, total = dict(self.backend.layout), self.X.shape[1], 0
        for layer in self.backend.network.layers:
            width = numel[layer.weight] // max(1, width)
            total += width
        per_sample = 2 * total * self.X.element_size()
        return max(jacobian_samples, self.max_jacobian_bytes // max(1, per_sample))

    def _buffered_residuals(self, x: Tensor, *, fresh: bool) -> Tensor:
        """``model(X) - y`` at ``x`` from :attr:`_buffered` (a buffer the next call overwrites);
        without ``fresh``, the forward pass already held for ``x`` is reused."""
        buffered = self._buffered
        if fresh or not buffered.holds(x):
            buffered.forward(x)
        np.subtract(self._outputs_np, self._targets, out=self._residuals_np)
        return self._residuals

    def _buffered_linearization(self, x: Tensor) -> Linearization:
        residuals = self._buffered_residuals(x, fresh=False)
        system, grad, cost = normal_equations(self._buffered.jacobian(), residuals, self._spare)
        self._spare = {}
        return Linearization(cost, grad, system)

    def held_outputs(self, x: Tensor) -> Tensor | None:
        """``model(X)`` at ``x`` as the last forward pass left it in a tiny network's buffers
        (:class:`~marquardt.fastjac.BufferedNetwork`; a buffer the next pass overwrites), without
        computing anything; ``None`` where no such pass is held for ``x``."""
        buffered = self._buffered
        if buffered is None or not buffered.holds(x):
            return None
        return buffered.outputs

    def outputs_at(self, x: Tensor) -> Tensor:
        """``model(X)`` at ``x`` in the working dtype, shape ``(N, outputs per sample)``: the forward
        pass a tiny network holds for ``x`` (:meth:`held_outputs`), else forward passes over
        chunks of samples, each within ``max_jacobian_bytes`` as a trial's are."""
        held = self.held_outputs(x)
        if held is not None:
            return held
        params, samples = self.params(x), self._forward_samples()
        with torch.no_grad(), self._threads():
            parts = [self.backend.outputs(params, self.X[start : start + samples])
                     for start in range(0, self.X.shape[0], samples)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def vjp(self, x: Tensor, cotangent: Tensor) -> Tensor:
        """``J^T u`` at ``x`` for a closed-form backend (``u``: one entry per residual), in the
        working dtype: from the Jacobian a tiny network's last :meth:`linearize` holds when that
        was at ``x``, else by a forward and a backward pass."""
        u = cotangent.reshape(-1).to(self.dtype)
        held = None if self._buffered is None else self._buffered.held_vjp(x, u)
        return held if held is not None else self.backend.linearize(self.params(x), self.X).vjp(u)

    def set_targets(self, y: Tensor) -> None:
        """Replace the targets by ``y`` of the same shape (for a problem kept from one optimizer
        step to the next, :class:`~marquardt.optim.KeptProblem`)."""
        if tuple(y.shape) != tuple(self.y.shape):
            raise ValueError(f"y must keep the targets' shape {tuple(self.y.shape)}; received {tuple(y.shape)}.")
        self.y = y.detach().to(device=self.y.device, dtype=self.dtype)
        if self._buffered is not None:
            self._targets = self.y.contiguous().numpy()

    def recycle(self, lin: Linearization) -> None:
        """Take back the buffers of ``lin``, which the caller no longer uses, for the next
        :meth:`linearize` (``J^T J`` and the factorization workspace of the chunked normal
        form, :meth:`~marquardt.chunked.AccumulatedNormalEquations.release`); ``lin`` must not be
        used after. Other systems are left as they are."""
        if isinstance(lin.system, AccumulatedNormalEquations) and lin.system.lower is not None:
            self._spare = lin.system.release()

    def resume_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What this problem carries from one linearization to the next, as tensors and JSON, for a
        checkpoint (:mod:`marquardt.checkpoint`): for the matrix-free form the last linearization's
        point, gradient norm and forcing term (the next solve's warm start and tolerance) and the
        state of the generator that draws the curvature subsets; nothing for the other forms.

        Examples
        --------
        >>> model = nn.Linear(1, 1).double()
        >>> X = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
        >>> problem = ModuleProblem(model, X, 2 * X + 1, solver="matrix-free")
        >>> _ = problem.linearize(flatten_parameters(model))
        >>> tensors, meta = problem.resume_state()
        >>> sorted(tensors), meta["previous"][1]
        (['generator', 'previous_x'], 0.5)
        """
        if self.plan.form != "matrix-free":
            return {}, {}
        tensors, meta = {"generator": self._generator.get_state()}, {"previous": None}
        if self._previous is not None:
            x, norm, forcing = self._previous
            tensors["previous_x"] = x
            meta["previous"] = [norm, forcing]
        return tensors, meta

    def load_resume_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from a :meth:`resume_state`; empty ones (a checkpoint written before it was
        kept) leave the problem as new: a cold first solve and the generator at its seed."""
        if "generator" in tensors:
            self._generator.set_state(tensors["generator"])
        previous = meta.get("previous")
        self._previous = None if previous is None else (tensors["previous_x"].to(self.X.device), *previous)

    def linearize(self, x: Tensor) -> Linearization:
        """``J^T J`` (or the rows, in residual space), ``J^T r`` and the cost at ``x``.

        For a cross-entropy loss: ``J^T H J``, ``J^T dl/dz`` and the cost.
        """
        with self._threads():
            try:
                return self._linearize(x)
            except RuntimeError as error:
                _raise_if_random(error)
                raise

    def _threads(self) -> AbstractContextManager:
        """:func:`~marquardt.chunked.single_thread` for a small problem, unless already on one thread
        (as inside ``fit``): then nothing, which saves a few microseconds at every trial."""
        if self.plan.serial and torch.get_num_threads() != 1:
            return single_thread()
        return _NO_CONTEXT

    def _linearize(self, x: Tensor) -> Linearization:
        if self._buffered is not None:
            with torch.no_grad():
                return self._buffered_linearization(x)
        if not self.is_least_squares:
            structure = self._layer_gram
            terms = (self._curvature_terms(*chunk, structured=structure is not None)
                     for chunk in self._jacobian_outputs(x, linearizations=structure is not None))
            system, grad, cost = accumulate_gauss_newton(terms, self.n_params, dtype=self.dtype, device=x.device,
                                                         structure=structure)
            return Linearization(cost, grad, system)
        if self.plan.form == "matrix-free":
            return self._matrix_free(x)
        if self.plan.form == "sample-space" and isinstance(self.backend, LayeredJacobian):
            return self._kernel_sample_space(x)
        wide = accumulation_dtype(self.dtype, self.n_params)
        # Folded one chunk at a time into J^T J: the chunks may share one buffer.
        structure = self._layer_gram if self.plan.form == "normal" else None
        chunks = self.jacobian_chunks(x, reuse=self.plan.form == "normal", linearizations=structure is not None)
        if self.plan.form == "sample-space":
            system, grad, cost = assemble_sample_space(chunks, (self.n_residuals, self.n_params), dtype=wide)
        else:
            system, grad, cost = accumulate_normal(chunks, self.n_params, dtype=wide, device=x.device,
                                                   buffers=self._spare, structure=structure)
            self._spare = {}
        if wide != self.dtype:
            system, grad = PromotedEquations(system, self.dtype), grad.to(self.dtype)
        if self.plan.form == "sample-space":
            return Linearization(cost, grad, system, system.residuals, system.jac)
        return Linearization(cost, grad, system)

    def _curvature_terms(self, jac: Tensor, outputs: Tensor, targets: Tensor, lin: Any, *, structured: bool) -> tuple:
        """The loss's ``(L J, J^T dl/dz, cost)`` for a chunk, and for a structured ``J^T H J`` the
        chunk's linearization seen through ``L`` (:class:`CurvatureFactors`)."""
        terms = self.loss.gauss_newton(jac, outputs, targets)
        return (*terms, CurvatureFactors(lin, self.loss, outputs)) if structured else terms

    def _kernel_sample_space(self, x: Tensor) -> Linearization:
        """The sample-space system from the closed-form ``J J^T`` and Jacobian products (no rows held)."""
        params = self.params(x)
        lin = self._full_linearization(x)
        residuals = (lin.outputs - self.y).reshape(-1)

        def rows() -> Tensor:
            samples = max(1, self.plan.chunk_rows // self.outputs_per_sample)
            return torch.cat([jac for jac, _ in self.backend.chunks(params, self.X, samples)])

        row_gram = lin.row_gram(accumulation_dtype(self.dtype, self.n_params))
        system = KernelSampleSpaceEquations(row_gram, lin.jvp, lin.vjp, lin.gram_diagonal, residuals, rows)
        return Linearization(float(self._squared_cost(residuals)), lin.vjp(residuals), system)

    @property
    def _keeps_trials(self) -> bool:
        """Whether a trial's forward pass is kept for the next linearization: closed form, and
        every sample in one pass (matrix-free, closed-form sample space, or a single chunk)."""
        if not (isinstance(self.backend, LayeredJacobian) and self.is_least_squares):
            return False
        return self.plan.form != "normal" or self.plan.chunk_rows >= self.n_residuals

    def _trial_outputs(self, x: Tensor) -> Tensor:
        """``model(X)``; through a kept linearization when :attr:`_keeps_trials`, so that the
        next :meth:`linearize` at an accepted trial point needs no second forward pass."""
        if not self._keeps_trials:
            return self.outputs(x)
        lin = self.backend.linearize(self.params(x), self.X)
        self._trial = (x.clone(), lin)
        return lin.outputs

    def _full_linearization(self, x: Tensor) -> Any:
        if self._trial is not None and torch.equal(self._trial[0], x):
            lin = self._trial[1]
        else:
            lin = self.backend.linearize(self.params(x), self.X)
        self._trial = None
        return lin

    def _curvature_products(self, x: Tensor, full: Any) -> tuple[Any, float]:
        """The linearization whose products model ``J^T J``, and the factor that scales them."""
        n = self.X.shape[0]
        size = curvature_sample_size(n) if self.curvature_samples is None else min(n, self.curvature_samples)
        if size >= n:
            return full, 1.0
        index = torch.randperm(n, generator=self._generator)[:size].sort().values.to(self.X.device)
        return self.backend.linearize(self.params(x), self.X[index]), n / size

    def _matrix_free(self, x: Tensor) -> Linearization:
        """Gradient, cost and the CG system from Jacobian products at ``x`` (``J`` is never formed).

        The gradient and cost use every sample; the products ``J^T J v`` a random subset scaled
        by ``n / size`` (subsampled Gauss-Newton, as in Hessian-free optimization: Martens, 2010;
        Byrd et al., 2011), exact when the subset is everything. The solve starts from the last
        accepted step and stops at an Eisenstat-Walker forcing term, both carried from the
        previous linearization of this problem.
        """
        lin = self._full_linearization(x)
        # Flattened apart: a torch.func linearization holds its outputs as (samples, -1), which
        # would broadcast against targets of another shape ((N,) or (N, T, K)).
        residuals = lin.outputs.reshape(-1) - self.y.reshape(-1)
        grad = lin.vjp(residuals)
        curvature, factor = self._curvature_products(x, lin)
        norm = float64_norm(grad)  # a float32 gradient's own norm reads inf past ~1.8e19
        previous = self._previous
        if previous is not None:  # the step from the last linearization's point, an accepted one
            previous_x, previous_norm, previous_forcing = previous
            step = x - previous_x if (previous_x.shape, previous_x.device) == (x.shape, x.device) else None
            previous = (step, previous_norm, previous_forcing)
        start, forcing = warm_start(previous, norm, x)
        self._previous = (x.clone(), norm, forcing)
        jvp, vjp, diagonal = scaled_products(curvature.jvp, curvature.vjp, curvature.gram_diagonal, factor)
        # Unpreconditioned: on networks the Jacobi-preconditioned steps were rejected far more often.
        system = MatrixFreeEquations(jvp, vjp, diagonal, initial=start, rtol=forcing, max_iter=self.cg_max_iter,
                                     precondition=False)
        return Linearization(float(self._squared_cost(residuals)), grad, system)

    def jacobian_chunks(self, x: Tensor, *, reuse: bool = False, linearizations: bool = False) -> Iterator[tuple]:
        """Yield ``(J_rows, residual_rows)`` for consecutive chunks of samples.

        With ``reuse`` the closed-form rows of every chunk are written into one buffer kept by
        the problem (each chunk overwrites the last, so the consumer must be done with a chunk
        before asking for the next): a fresh 43 MB chunk cost ~15-20 ms of page faults on the
        4,353-parameter benchmark network. With ``linearizations`` (closed form only) each
        chunk's :class:`~marquardt.fastjac.LinearizedNetwork` comes third, for
        :class:`~marquardt.kronecker.LayerGram`.
        """
        for jac, outputs, targets, lin in self._jacobian_outputs(x, reuse=reuse, linearizations=linearizations):
            residuals = (outputs - targets).reshape(-1)
            yield (jac, residuals, lin) if linearizations else (jac, residuals)

    def _jacobian_outputs(self, x: Tensor, *, reuse: bool = False, linearizations: bool = False
                          ) -> Iterator[tuple[Tensor, Tensor, Tensor, Any]]:
        """Yield ``(J_rows, outputs, targets, linearization)`` for consecutive chunks of samples
        (``reuse``: see :meth:`jacobian_chunks`; the linearization, closed form only, when asked)."""
        if self._keeps_trials:
            lin = self._full_linearization(x)
            yield lin.jacobian(), lin.outputs, self.y, lin
            return
        samples = max(1, self.plan.chunk_rows // self.outputs_per_sample)
        start = 0
        options = {}
        if reuse and isinstance(self.backend, LayeredJacobian):
            rows = min(samples, self.X.shape[0]) * self.outputs_per_sample
            if self._rows is None or self._rows.shape != (rows, self.n_params):
                self._rows = torch.empty(rows, self.n_params, dtype=self.dtype, device=self.X.device)
            options["out"] = self._rows
        if linearizations and isinstance(self.backend, LayeredJacobian):
            options["linearizations"] = True
        for chunk in self.backend.chunks(self.params(x), self.X, samples, **options):
            jac, outputs = chunk[0], chunk[1]
            stop = start + outputs.shape[0]
            yield jac, outputs, self.y[start:stop], chunk[2] if len(chunk) > 2 else None
            start = stop
