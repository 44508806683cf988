"""Optimizers with the :mod:`torch.optim` contract: Levenberg-Marquardt, gradient descent, momentum.

:class:`LevenbergMarquardt` is closure-driven, like :class:`torch.optim.LBFGS`: ``step(closure)``
needs the *residual* tensor for the current parameters and runs one iteration of the same LM
loop as :func:`marquardt.least_squares` (:func:`marquardt.solver.lm_step`). When the residuals
are verifiably ``model(X) - c`` for a layered network the closure called once, the system is
the one :func:`marquardt.fit` builds (:class:`~marquardt.network.ModuleProblem`, closed-form
Jacobian); otherwise the Jacobian comes from batched backward passes through the closure's
graph (so the closure may itself use autograd, as physics-informed residuals do), or, in the
matrix-free form (``solver="auto"`` when ``J^T J`` would not fit in ``max_matrix_bytes`` and the
sample-space form does not apply, or ``solver="matrix-free"``), is never formed: conjugate
gradients on the products ``J v`` and ``J^T u`` of that graph (:mod:`marquardt.matfree`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import math
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .chunked import (DEFAULT_JACOBIAN_BYTES, DEFAULT_MATRIX_BYTES, FORMS, Plan, PromotedEquations, accumulate_normal,
                      assemble_sample_space, plan_assembly, single_thread)
from .damping import DAMPING_FLOOR, DampingState, MarquardtDamping, NielsenDamping, is_real_number
from .fastjac import LayeredJacobian
from .matfree import MatrixFreeEquations, float64_norm, warm_start
from .network import ModuleProblem, trainable_parameters
from .solver import Linearization, StepResult, lm_step, reject_accepted

__all__ = ["GradientDescent", "LevenbergMarquardt", "Momentum"]


def _check_number(name: str, value: float, *, low: float = 0.0, strict: bool = True, high: float = math.inf,
                  strict_high: bool = False) -> float:
    """``value`` as a Python float, or a ValueError naming ``name``: a real number (numpy scalars
    included, bools not) within the bounds (``strict``: above ``low``; ``strict_high``: below ``high``)."""
    ok = is_real_number(value) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok or (value >= high if strict_high else value > high):
        bound = f"> {low}" if strict else f">= {low}"
        upper = f" and {'<' if strict_high else '<='} {high}." if math.isfinite(high) else "."
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number {bound}{upper}")
    return float(value)


#: The group's keys, in the order :func:`_lm_options` takes them.
LM_OPTIONS = ("damping", "damping_dec", "damping_inc", "damping_max", "strategy", "max_jacobian_bytes",
              "max_matrix_bytes", "solver")


def _lm_options(damping: Any, damping_dec: Any, damping_inc: Any, damping_max: Any, strategy: Any,
                max_jacobian_bytes: Any, max_matrix_bytes: Any, solver: Any) -> dict[str, Any]:
    """:class:`LevenbergMarquardt`'s hyperparameters as its group holds them, or a ValueError naming
    the first bad one, the value and what is expected (the damping rule's own bounds:
    ``0 < damping_dec < 1 < damping_inc``; a factor of 1 would leave the damping where it is;
    ``solver`` and the byte budgets as :func:`marquardt.fit` takes them)."""
    options = dict(damping=_check_number("damping", damping),
                   damping_dec=_check_number("damping_dec", damping_dec, high=1.0, strict_high=True),
                   damping_inc=_check_number("damping_inc", damping_inc, low=1.0),
                   damping_max=_check_number("damping_max", damping_max))
    if strategy not in ("marquardt", "nielsen"):
        raise ValueError(f"Invalid strategy: {strategy!r}; expected 'marquardt' or 'nielsen'.")
    if not isinstance(solver, str) or solver not in ("auto",) + FORMS:
        raise ValueError(f"Invalid solver: {solver!r}; expected 'auto' or one of {FORMS}.")
    return {**options, "strategy": strategy,
            "max_jacobian_bytes": _check_bytes("max_jacobian_bytes", max_jacobian_bytes),
            "max_matrix_bytes": _check_bytes("max_matrix_bytes", max_matrix_bytes), "solver": solver}


def _check_bytes(name: str, value: int) -> int:
    """``value`` as a Python int, or a ValueError naming ``name``: an integer >= 1 (numpy integers
    included, bools not), as :func:`marquardt.fit` takes its byte budgets."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r}; expected an integer >= 1 (bytes).")
    return int(value)


@dataclass
class ClosureProblem:
    """The parameters of ``params`` as a least-squares problem whose residuals a closure returns.

    :meth:`linearize` takes the closed form (:meth:`_closed_form`) where it applies, else the
    Jacobian of the closure's graph by columns or rows, or, in the matrix-free form, only its
    products (:meth:`_matrix_free`); :meth:`cost` always calls the closure.
    """

    params: list[Tensor]
    closure: Callable[[], Tensor]
    max_jacobian_bytes: int = DEFAULT_JACOBIAN_BYTES
    #: Bytes the ``n x n`` normal matrix may take; past it the "auto" form is matrix-free.
    max_matrix_bytes: int = DEFAULT_MATRIX_BYTES
    #: The system form: "auto" (:func:`~marquardt.chunked.plan_assembly`) or one of its forms.
    solver: str = "auto"
    #: "auto" (:func:`prefers_forward`), "forward" (columns, rows where the graph refuses) or "reverse".
    mode: str = "auto"
    #: Try the closed-form Jacobian of the module that produced the residuals first
    #: (:meth:`_closed_form`); the autograd paths above when it does not apply.
    closed_form: bool = True
    #: Most conjugate-gradient products per matrix-free linearization (``ModuleProblem``'s default).
    cg_max_iter: int = 20
    #: The last step's matrix-free solve, as the optimizer keeps it: ``(warm_start, grad_norm,
    #: forcing)``, the accepted step (or ``None``), ``||J^T r||`` and the forcing term there.
    previous: tuple[Tensor | None, float, float] | None = None
    #: The path the last :meth:`linearize` took: "closed-form", "forward" or "reverse" (in the
    #: matrix-free form: how ``J v`` is made, by the double-backward trick or from rows).
    used_mode: str = field(default="", init=False)
    #: The forcing term of the last matrix-free linearization on the graph; ``None`` on other paths.
    forcing: float | None = field(default=None, init=False)
    #: The point of that linearization, written back after each trial (see :meth:`cost`).
    _point: Tensor | None = field(default=None, init=False, repr=False)
    #: Whether the problem is small enough for one thread (:func:`~marquardt.chunked.is_small`):
    #: a guess for the first closure call, then what :meth:`linearize` found.
    serial: bool = False
    #: The closed-form problem of an earlier step (kept by the optimizer), reused when the module
    #: call is the same; :meth:`_closed_form` replaces it when a new one passes the check.
    kept: KeptProblem | None = None
    #: The last call refused the closed form (kept by the optimizer), not tried again by
    #: :meth:`_closed_form`; replaced at the next refusal.
    refused: Refusal | None = None
    #: A closed-form matrix-free problem's :meth:`~marquardt.network.ModuleProblem.resume_state`
    #: as the optimizer's state keeps it (:func:`_resume_state`), loaded into a problem built
    #: anew: after ``load_state_dict`` or a copy (which drop :attr:`kept`) or for a new input.
    resume: tuple[dict[str, Tensor], dict[str, Any]] | None = None
    #: Residuals the closure returned at the current parameters (set by :meth:`linearize`); every
    #: trial must return as many, or its cost would be that of another problem.
    size: int = field(default=0, init=False)
    #: The cost ``0.5 * sum(r**2)`` of those residuals, computed as :meth:`cost` computes a
    #: trial's (the same float for the same residuals; the system's own cost may be summed by chunks).
    start_cost: float = field(default=math.nan, init=False)
    #: The tensor the closure returned last, and the one it returned at the current parameters
    #: with that point (weak references: the graph is not kept alive through the trials); see
    #: :meth:`_check_follows_parameters`.
    _returned: Any = field(default=None, init=False, repr=False)
    _start_returned: Any = field(default=None, init=False, repr=False)
    _start_x: Tensor | None = field(default=None, init=False, repr=False)

    def write(self, x: Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(x[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def residuals(self) -> Tensor:
        value = self.closure()
        if not isinstance(value, Tensor):
            raise TypeError(f"The closure must return the residual tensor; received {type(value).__name__}.")
        if value.is_complex():
            raise TypeError(f"The closure returned complex residuals (dtype {value.dtype}); LevenbergMarquardt needs "
                            "real ones: return torch.view_as_real(r), its real and imaginary parts as residuals.")
        if value.ndim == 0:
            raise ValueError(
                "The closure returned a scalar loss; LevenbergMarquardt needs the residual tensor "
                "(e.g. return model(X) - y, not a loss such as mse(model(X), y)); return a single residual "
                "as a 1-element tensor, r.reshape(1)."
            )
        if self.size and value.numel() != self.size:
            raise ValueError(
                f"The closure returned {value.numel()} residuals at a trial point of the step and {self.size} at "
                "the current parameters; a step compares costs of the same residuals, so draw a minibatch "
                "outside the closure, once per step."
            )
        self._returned = weakref.ref(value)
        return value.reshape(-1)

    def _check_follows_parameters(self, x: Tensor) -> None:
        """A ValueError when the closure returned, at the trial point ``x``, the very tensor it
        returned at the current parameters: residuals computed once, before the step
        (``r = model(X) - y; opt.step(lambda: r)``). Their values never follow the parameters the
        step writes, so no trial lowers the cost, and every step ended exhausted with the weights
        unmoved, silently. A tensor that shares a parameter's storage (the parameter itself, a
        view of it) does follow them and passes."""
        start = None if self._start_returned is None else self._start_returned()
        if start is None or self._returned() is not start or torch.equal(x, self._start_x):
            return
        if _storage_key(start) in {_storage_key(p) for p in self.params}:
            return
        raise ValueError(
            "The closure returned the same residual tensor at a trial point as at the current parameters: "
            "residuals computed once, before step() (r = model(X) - y; opt.step(lambda: r)), do not follow the "
            "parameters a step tries, so no trial can lower the cost. Compute them inside the closure: "
            "opt.step(lambda: model(X) - y).")

    def cost(self, x: Tensor) -> float:
        self.write(x)
        try:
            with torch.enable_grad():
                r = self.residuals().detach()
            self._check_follows_parameters(x)
            # Read before the write-back below: residuals that alias a parameter (the closure
            # returns it, or a view of it) would read the linearization point's cost instead.
            value = 0.5 * float(r @ r)
        finally:
            if self._point is not None:
                # The matrix-free system makes products after a trial: a graph that recomputes
                # its forward pass in backward (torch.utils.checkpoint) reads the parameters
                # then, and gave products at the trial point (0.91 relative error in a solve).
                self.write(self._point)
        return value if math.isfinite(value) else math.inf

    def linearize(self, x: Tensor) -> Linearization:
        self.write(x)
        # Only a matrix-free step makes products after its trials; the dense forms take J first.
        copied = self.params if self._may_be_matrix_free(x) else None
        with torch.enable_grad():
            marks = _random_marks(x.device)
            with _SavedBytes(copied) as saved, single_thread(self.serial), \
                    _ModuleCalls(self.closed_form) as calls:
                r = self.residuals()
            self._start_returned, self._start_x = self._returned, x
            self.size = r.numel()
            if r.numel() == 0:
                raise ValueError("The closure returned an empty residual tensor; LevenbergMarquardt needs at "
                                 "least one residual.")
            self.start_cost = _check_start_residuals(r.detach())
            if not _same_marks(marks, _random_marks(x.device)):
                self._check_repeatable(r.detach())
            if not r.requires_grad:
                raise ValueError("The closure's residuals do not depend on the parameters (they carry no autograd "
                                 "graph): compute them from the parameters, without detach() or torch.no_grad().")
            lin = self._closed_form(r, calls.producer(self.params), x)
            if lin is not None:
                self.used_mode = "closed-form"
                return lin
            _check_autograd_dtype(self.params)
            m, n, itemsize = r.numel(), x.numel(), r.element_size()
            plan = plan_assembly(m, n, itemsize, self.max_jacobian_bytes, max_matrix_bytes=self.max_matrix_bytes,
                                 form=self.solver)
            self.serial = plan.serial
            if plan.form == "matrix-free":
                with single_thread(plan.serial), _graph_hints():
                    lin = self._matrix_free(r, plan, saved.nbytes, x)
                if not bool(lin.grad.any()):
                    _check_reaches_parameters(r, self.params)
                return lin
            jac = None
            auto = self.mode == "auto" and prefers_forward(m, n, itemsize, self.max_jacobian_bytes)
            if self.mode == "forward" or auto:
                with single_thread(plan.serial):
                    jac = self._forward_jacobian(r, saved.nbytes)
            self.used_mode = "reverse" if jac is None else "forward"
            # A small problem's columns are small kernels (n x graph), best on one thread; its rows
            # are m x graph each and were measured faster on two (T1: 103 vs 142 ms at load 3).
            # A non-finite J (sqrt at 0) is refused right after with a ValueError (_iterate); numpy's
            # "invalid value encountered in matmul" from the J^T J blocks would only precede it.
            with single_thread(plan.serial and jac is not None), _graph_hints(), \
                    np.errstate(invalid="ignore", over="ignore"):
                lin = self._assemble(r, jac, plan, saved.nbytes, x)
            if not bool(lin.grad.any()):
                _check_reaches_parameters(r, self.params)
            return lin

    def _check_repeatable(self, r: Tensor) -> None:
        """The ValueError of a closure whose residuals change between two calls at the same
        parameters: called once more (no graph), after the first call drew random numbers.

        Levenberg-Marquardt keeps a step only if the cost at the trial point is lower; with a new
        dropout mask (or a new minibatch) at every call that comparison is meaningless, and the
        steps wandered. Residuals that agree to ``sqrt(eps)`` of their largest magnitude pass (a
        random draw that does not reach them, or a GPU's reductions, which need not be bitwise
        repeatable): such a closure is called twice at every linearization.
        """
        again = self.residuals().detach()
        tolerance = math.sqrt(torch.finfo(r.dtype).eps) * float(r.abs().max())
        difference = float((again - r).abs().max())
        if not difference <= tolerance:
            raise ValueError(
                f"The closure drew random numbers and returned other residuals when called again at the same "
                f"parameters (largest difference {difference:.3g}, against {float(r.abs().max()):.3g} for the "
                "largest residual). Levenberg-Marquardt compares the cost of each trial step at fixed weights: call "
                "model.eval() before the steps if the model has dropout (nn.Dropout or F.dropout in training "
                "mode), remove random operations from its forward, and draw a minibatch outside the closure, once "
                "per step.")

    def _closed_form(self, r: Tensor, call: ModuleCall | None, x: Tensor) -> Linearization | None:
        """The system ``fit`` would build for ``call.module`` (:class:`~marquardt.network.ModuleProblem`),
        when ``r`` is verifiably ``call.outputs`` minus a constant; else ``None``.

        The targets ``outputs - r`` make the problem's residuals ``r`` up to rounding. Its
        system and gradient come back in the parameters' dtype (a tiny float32 network is
        worked in float64 there, :class:`~marquardt.chunked.PromotedEquations`), its cost is
        the closure's, as the trial costs are. A call refused before (:attr:`refused`) is not
        tried again: building and linearizing problems the check then threw away (one more for
        the kept one) took 0.18 s of 0.54 s in six matrix-free steps of ``sin(net(X)) - y``
        (17,793 parameters, 2,000 samples; 0.01 s of 0.39 s now, the one refused attempt).
        """
        if call is None or not r.requires_grad or call.outputs.numel() != r.numel():
            return None
        key, closure = CallKey.of(call, x.dtype, self._budgets), _closure_identity(self.closure)
        if self.refused is not None and self.refused.covers(key, closure):
            return None
        outputs = call.outputs.detach()
        targets = outputs - r.detach().reshape(outputs.shape)
        if self.kept is not None and self.kept.key.same(key):
            problem = self.kept.problem
            problem.set_targets(targets)
            lin = problem.linearize(x)  # first: a tiny network's check then reads the J it holds
            if _reproduces(problem, r, call, x) or (_is_output_minus_constant(problem, r, self.params, x)
                                                     and _outputs_agree(problem.outputs_at(x), call.outputs)):
                return self._accepted(problem, lin, r, x)
            # The module may have changed in place since the problem was described (new
            # mapminmax ranges): describe it again, once. The kept problem failed the check at
            # every later step, and the steps stayed on the autograd path at 4-5x the time.
            self.kept = None
        problem = self._new_problem(call, targets)
        # A new problem is checked before its linearization, which a refusal never needs
        # (without a held J, ModuleProblem.vjp makes its own forward and backward pass).
        if problem is None or not (_is_output_minus_constant(problem, r, self.params, x)
                                   and _outputs_agree(problem.outputs_at(x), call.outputs)):
            self.refused = Refusal(key, closure)
            return None
        self.kept = KeptProblem(problem, key)
        return self._accepted(problem, problem.linearize(x), r, x)

    def _new_problem(self, call: ModuleCall, targets: Tensor) -> ModuleProblem | None:
        """The closed-form problem of ``call`` with ``targets`` (the kept resume state loaded), or
        ``None`` where the module has no closed form."""
        try:
            problem = ModuleProblem(call.module, call.X.detach(), targets, self.max_jacobian_bytes,
                                    solver=self.solver, max_matrix_bytes=self.max_matrix_bytes)
        except (RuntimeError, TypeError, ValueError):  # never fail a step the graph can take
            return None
        if not isinstance(problem.backend, LayeredJacobian):
            return None
        if self.resume is not None:
            problem.load_resume_state(*self.resume)
        return problem

    def _accepted(self, problem: ModuleProblem, lin: Linearization, r: Tensor, x: Tensor) -> Linearization:
        """``lin`` of the checked closed-form ``problem``, in the step's dtype with the closure's cost."""
        self.serial = problem.plan.serial
        residuals = r.detach()
        return _in_dtype(lin, x.dtype, 0.5 * float(residuals @ residuals))

    def _may_be_matrix_free(self, x: Tensor) -> bool:
        """Whether the graph step at ``x`` can take the matrix-free form, before the closure has
        told the number of residuals (:func:`~marquardt.chunked.plan_assembly` with ``m``
        unknown: "auto" goes matrix-free only when ``J^T J`` is past ``max_matrix_bytes``)."""
        n = x.numel()
        return self.solver == "matrix-free" or (self.solver == "auto"
                                                 and n * n * x.element_size() > self.max_matrix_bytes)

    @property
    def _budgets(self) -> tuple[int, int, str]:
        """The options a closed-form problem is built with: ``max_jacobian_bytes``,
        ``max_matrix_bytes`` and ``solver``."""
        return self.max_jacobian_bytes, self.max_matrix_bytes, self.solver

    def _matrix_free(self, r: Tensor, plan: Plan, saved_bytes: int, x: Tensor) -> Linearization:
        """Gradient, cost and the CG system from products through the closure's graph (``J`` is
        never formed, nor ``J^T J``).

        ``J^T u`` is a backward pass of ``r`` seeded with ``u``; ``J v`` one backward pass through
        the graph of ``g(p) = J^T p`` (:func:`_double_backward_jvp`), or ``m`` passes by rows where
        the graph cannot be differentiated twice. Every product uses all the residuals: the
        closure hides which rows belong to which sample, so there is no subset to sample the
        curvature from, as ``fit``'s matrix-free form does. As there (``ModuleProblem``), the
        solve starts from the last accepted step and stops at an Eisenstat-Walker forcing term,
        carried from the previous step by the optimizer (:attr:`previous`), and expands its basis
        by plain residuals (no Jacobi preconditioner), so ``diag(J^T J)``, the one quantity that
        costs ``m`` backward passes, is computed only when asked for (:meth:`_gram_diagonal`).
        """
        residuals = r.detach()
        vjp = functools.partial(_flat_vjp, r, self.params)
        grad = vjp(residuals)
        batch = rows_per_backward(saved_bytes, x.numel() * r.element_size(), self.max_jacobian_bytes)
        jvp = _double_backward_jvp(r, self.params)
        self.used_mode = "reverse" if jvp is None else "forward"
        if jvp is None:
            jvp = functools.partial(self._rows_times, r, plan.chunk_rows, batch)
        diagonal = functools.partial(self._gram_diagonal, r, plan.chunk_rows, batch)
        start, self.forcing = warm_start(self.previous, float64_norm(grad), x)
        self._point = x.clone()
        system = MatrixFreeEquations(jvp, vjp, diagonal, initial=start, rtol=self.forcing, max_iter=self.cg_max_iter,
                                     precondition=False)
        return Linearization(0.5 * float(residuals @ residuals), grad, system)

    def _gram_diagonal(self, r: Tensor, rows: int, batch: int) -> Tensor:
        """``diag(J^T J)``, the column sums of the squared Jacobian rows, folded in chunk by chunk.

        Costs ``m`` backward passes (batched ``batch`` at a time, within ``max_jacobian_bytes``),
        as a linearization by rows does, and holds one chunk of ``rows x n`` at a time: no
        ``m x n`` or ``n x n`` matrix. Only Nielsen's rule reads it (its first damping).
        """
        total = torch.zeros(sum(p.numel() for p in self.params), dtype=r.dtype, device=r.device)
        with torch.enable_grad():
            for jac, _ in self._jacobian_chunks(r, rows, batch):
                total += jac.square().sum(0)
        return total

    def _rows_times(self, r: Tensor, rows: int, batch: int, vector: Tensor) -> Tensor:
        """``J v`` from the Jacobian rows, a chunk at a time: ``m`` backward passes a product, for
        graphs that cannot be differentiated twice."""
        with torch.enable_grad():
            return torch.cat([jac @ vector for jac, _ in self._jacobian_chunks(r, rows, batch)])

    def _assemble(self, r: Tensor, jac: Tensor | None, plan: Plan, saved_bytes: int, x: Tensor) -> Linearization:
        """``J^T J`` (or the held rows) from the columns ``jac``, or from rows when it is ``None``."""
        m, n, itemsize = r.numel(), x.numel(), r.element_size()
        if jac is None:
            batch = rows_per_backward(saved_bytes, n * itemsize, self.max_jacobian_bytes)
            chunks = self._jacobian_chunks(r, plan.chunk_rows, batch)
        else:
            chunks = ((jac[start : start + plan.chunk_rows], r[start : start + plan.chunk_rows].detach())
                      for start in range(0, m, plan.chunk_rows))
        if plan.form == "sample-space":
            # In x's dtype, as the normal form below: float64 residuals of a float32 model (targets
            # from numpy) meet float32 Jacobian rows, which one solve cannot mix.
            system, grad, cost = assemble_sample_space(chunks, dtype=x.dtype)
            return Linearization(cost, grad, system, system.residuals, system.jac)
        system, grad, cost = accumulate_normal(chunks, n, dtype=x.dtype, device=x.device)
        return Linearization(cost, grad, system)

    def _jacobian_chunks(self, r: Tensor, rows: int, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunks of ``rows`` Jacobian rows, each from batched backward passes of ``batch`` rows."""
        m = r.numel()
        for start in range(0, m, rows):
            stop = min(start + rows, m)
            yield _unit_vjps(r, self.params, start, stop, batch), r[start:stop].detach()

    def _forward_jacobian(self, r: Tensor, saved_bytes: int) -> Tensor | None:
        """The ``m x n`` Jacobian column by column, or ``None`` where the graph does not allow it.

        ``g(u) = J^T u`` is a backward pass with ``create_graph=True``; it is linear in ``u``, so
        a backward pass of ``g`` seeded with ``e_j`` gives the column ``J e_j`` (the
        double-backward trick: ``n`` passes instead of ``m``). A graph with an operation that
        cannot be differentiated twice either raises (then ``None``) or silently drops that
        operation's share of the columns; comparing ``J^T u`` from the columns with ``g(u)``
        itself, for a random ``u``, catches the latter (then ``None`` too).
        """
        try:
            with _SavedBytes() as saved:
                probe, g = _adjoint_graph(r, self.params)
            n, column_bytes = g.numel(), r.numel() * r.element_size()
            batch = rows_per_backward(saved_bytes + saved.nbytes, column_bytes, self.max_jacobian_bytes)
            columns = _unit_vjps(g, [probe], 0, n, batch)
        except (RuntimeError, NotImplementedError):  # never fail a step the rows can take
            return None
        jac = columns.T.contiguous()
        return jac if _products_agree(jac, probe.detach(), g.detach()) else None


def _refuse_duplicates(params: list[Tensor]) -> None:
    """A ValueError for a parameter listed twice (torch.optim only warns): the step solves for
    each listed copy and writes both into the one tensor, so half of the step was applied."""
    seen: dict[int, int] = {}
    for index, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"Invalid params: the parameter at index {index} is the one at index {seen[id(p)]} "
                             f"(shape {tuple(p.shape)}) listed again; expected each parameter once (e.g. "
                             "list(dict.fromkeys(params)) or model.parameters(), which lists shared weights once).")
        seen[id(p)] = index


def _random_marks(device: torch.device) -> list[Any]:
    """The state of the generators a closure draws from by default: torch's on the CPU and, for a
    CUDA device, that device's (dropout on the GPU draws from it), and numpy's global one
    (:func:`_numpy_mark`), from which a minibatch drawn inside the closure
    (``np.random.permutation``) passed unnoticed. Python's ``random`` (``getstate`` and its
    comparison took 70 us) and generator objects the closure holds (``np.random.default_rng()``)
    are not watched."""
    marks: list[Any] = [torch.default_generator.get_state(), _numpy_mark()]
    if device.type == "cuda":
        marks.append(torch.cuda.get_rng_state(device))
    return marks


def _same_marks(before: list[Any], after: list[Any]) -> bool:
    """Whether no random number was drawn between the two :func:`_random_marks`."""
    return all(torch.equal(a, b) if isinstance(a, Tensor) else a == b for a, b in zip(before, after))


#: Bytes of numpy's MT19937 state: ``uint32_t key[624]`` and ``int pos``.
MT19937_STATE_BYTES = 624 * 4 + 4


def _numpy_mark() -> bytes | None:
    """The bytes of numpy's global MT19937 state, read in place (under a microsecond:
    ``np.random.get_state()`` copies them into a dict, 80 us, twice a step), or ``None`` where
    the global generator is not one (nothing then to compare)."""
    bit_generator = getattr(getattr(np.random.mtrand, "_rand", None), "_bit_generator", None)
    if not isinstance(bit_generator, np.random.MT19937):
        return None
    return ctypes.string_at(bit_generator.ctypes.state_address, MT19937_STATE_BYTES)


def _check_autograd_dtype(params: list[Tensor]) -> None:
    """Refuse parameters the autograd paths cannot solve in, before forming ``J``: they work in
    the parameters' dtype, and torch has no half-precision or complex Cholesky (the closed form,
    tried first, works a half-precision network in float64 itself)."""
    for p in params:
        if p.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Invalid parameter dtype: {p.dtype} (a parameter of shape {tuple(p.shape)}); "
                            "LevenbergMarquardt fits float32 or float64 parameters when the closure is not "
                            "model(X) - y for a network fit supports: convert with .float() or .double().")


def _check_start_residuals(r: Tensor) -> float:
    """The cost ``0.5 * sum(r**2)``, or a ValueError for residuals at the current parameters
    that no step can start from: non-finite ones, or finite ones whose cost overflows their
    dtype (float32 from ``|r|`` about 1e19), which is a scaling problem, not a non-finite closure."""
    cost = 0.5 * float(r @ r)
    if math.isfinite(cost):
        return cost
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        index = int(torch.nonzero(bad)[0])
        raise ValueError(f"The closure returned non-finite residuals at the current parameters (first at flat "
                         f"index {index}: {float(r[index])}); start from parameters where they are finite.")
    raise ValueError(f"The cost 0.5 * sum(r**2) overflows {r.dtype} at the current parameters (largest |residual| "
                     f"{float(r.abs().max()):.3e}); rescale the residuals, or compute them and the parameters in "
                     "float64.")


@contextlib.contextmanager
def _graph_hints() -> Iterator[None]:
    """Re-raises two autograd errors of the Jacobian's backward passes as what a closure did.

    'Backward through the graph a second time': it called ``backward()`` on its residuals, as
    LBFGS closures do, which frees the graph the Jacobian needs (torch's own advice,
    retain_graph, reads as if the optimizer should pass it). 'Modified by an inplace operation':
    it returned residuals computed before the step, whose graph saved the weights the step has
    since written (the same values, a new version), or it modified a saved tensor in place.
    """
    try:
        yield
    except RuntimeError as error:
        if "backward through the graph a second time" in str(error):
            raise RuntimeError("The closure's autograd graph was freed before the step could form the Jacobian: a "
                               "LevenbergMarquardt closure returns the residuals and does not call backward() on "
                               "them (LBFGS closures do); remove that call, or give it retain_graph=True.") from error
        if "modified by an inplace operation" in str(error):
            raise RuntimeError("The closure's residuals have a graph whose saved tensors were modified in place "
                               "since: residuals computed before step() (r = model(X) - y; opt.step(lambda: r)) "
                               "saved the weights that the step writes before it calls the closure. Compute them "
                               "inside the closure, opt.step(lambda: model(X) - y), and modify no tensor in place "
                               "after the operation that saved it.") from error
        raise


def _check_reaches_parameters(r: Tensor, params: list[Tensor]) -> None:
    """Refuse residuals whose graph reaches none of ``params`` (computed from another model, or
    a copy made after the optimizer): their Jacobian reads as zero, and every step would leave
    the parameters as they are while raising the damping. Called only when ``J^T r`` is zero."""
    grads = torch.autograd.grad(r, params, torch.ones_like(r), retain_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError("The closure's residuals do not depend on the optimizer's parameters (autograd reaches "
                         "none of them): compute them from the parameters the optimizer was given (one made "
                         "before the model was copied or replaced holds the old parameters).")


def _check_start_gradient(grad: Tensor) -> None:
    """Refuse a non-finite ``J^T r`` at the current parameters: every damped step from there is
    non-finite, so the trials would only raise the damping past its maximum."""
    if not bool(torch.isfinite(grad).all()):
        raise ValueError(f"The gradient J^T r is not finite at the current parameters: the residuals' Jacobian has "
                         f"non-finite entries there (sqrt or log at 0, say), or J^T r overflows {grad.dtype}; start "
                         "from parameters where the residuals are differentiable.")


@dataclass(frozen=True, eq=False)
class CallKey:
    """What a closed-form problem for ``outputs = module(X)`` is built from: the module and its
    input (the same objects, the input at the same ``_version``), the outputs' shape, the
    parameters' dtype, the trainable parameter names (a parameter frozen or unfrozen changes the
    unknowns), the submodules (name, type, training mode: a layer swapped in place, ``eval()``;
    the hooks on them and on their parameters), the budgets ``(max_jacobian_bytes,
    max_matrix_bytes, solver)`` and the global module hooks."""

    module: nn.Module
    X: Tensor
    version: int
    shape: torch.Size
    dtype: torch.dtype
    names: tuple[str, ...]
    submodules: tuple[tuple[str, type, bool, tuple[int, ...]], ...]
    budgets: tuple[int, int, str]
    hooks: tuple[int, ...] = ()

    @classmethod
    def of(cls, call: ModuleCall, dtype: torch.dtype, budgets: tuple[int, int, str]) -> CallKey:
        module = call.module
        names = tuple(name for name, _ in trainable_parameters(module))
        submodules = tuple((name, type(sub), sub.training, _hooks(sub)) for name, sub in module.named_modules())
        return cls(module, call.X, call.X._version, call.outputs.shape, dtype, names, submodules, budgets,
                   _global_hooks())

    def same(self, other: CallKey) -> bool:
        """Whether ``other`` is a call of this module on this unmodified input, all else equal."""
        fields = (self.version, self.shape, self.dtype, self.names, self.submodules, self.budgets, self.hooks)
        return (self.module is other.module and self.X is other.X
                and fields == (other.version, other.shape, other.dtype, other.names, other.submodules, other.budgets,
                               other.hooks))


def _hooks(module: nn.Module) -> tuple[int, ...]:
    """The ids of the hooks on ``module`` (forward, backward and their pre-hooks) and on its own
    parameters (tensor hooks): any of them may change the outputs or the gradients the closed
    form reproduces."""
    dicts = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    ids = tuple(key for hooks in dicts for key in hooks)
    tensor_hooks = tuple(key for p in module.parameters(recurse=False) for key in (p._backward_hooks or ()))
    return ids + tensor_hooks


def _global_hooks() -> tuple[int, ...]:
    """The ids of the global module hooks (``torch.nn.modules.module.register_module_*_hook``)."""
    hooks = torch.nn.modules.module
    dicts = (hooks._global_forward_pre_hooks, hooks._global_forward_hooks, hooks._global_backward_pre_hooks,
             hooks._global_backward_hooks)
    return tuple(key for table in dicts for key in table)


@dataclass(frozen=True)
class KeptProblem:
    """A closed-form :class:`~marquardt.network.ModuleProblem` kept from one optimizer step to the
    next, built for the call ``key``.

    Reused, with the new step's targets, only for the same call (:meth:`CallKey.same`): no new
    problem (its network description and buffers), and the ``n x n`` buffers of the last step's
    system recycled as ``fit`` recycles them between epochs. The residuals are checked to be the
    outputs minus a constant at every step: by the graph's nodes and the held outputs
    (:func:`_reproduces`), else by a backward pass.
    """

    problem: ModuleProblem
    key: CallKey


@dataclass
class Refusal:
    """A call refused the closed form (no closed-form module, or residuals that are not its
    outputs minus a constant) for the closure ``closure`` (:func:`_closure_identity`): the next
    :data:`RETRY_AFTER` steps of that closure on that call go straight to the closure's graph,
    then the closed form is tried once more.

    The closure is part of it because the same call may be closed form for another closure
    (``net(X) - y`` after ``torch.sin(net(X)) - y``), and so are the objects it captured: two
    lambdas of one factory, ``make(torch.sin)`` and ``make(identity)``, share their code only.
    A closure that switches its residuals through state it does not capture (a global, an
    attribute of an object it holds) cannot be told apart; the retry bounds how long it stays
    on the graph path.
    """

    key: CallKey
    closure: tuple
    steps: int = 0

    def covers(self, key: CallKey, closure: tuple) -> bool:
        """Whether a step of ``closure`` on the call ``key`` is refused again without a try
        (counted towards the retry)."""
        if self.steps >= RETRY_AFTER or not (_same_objects(closure, self.closure) and key.same(self.key)):
            return False
        self.steps += 1
        return True


#: Steps a :class:`Refusal` stands for before the closed form is tried again: 1 attempt in 11
#: steps costs about 3% of a matrix-free step of ``sin(net(X)) - y`` (an attempt took 0.18 s of
#: 0.54 s in 6 steps before refusals were kept).
RETRY_AFTER = 10


def _closure_identity(closure: Callable[[], Tensor]) -> tuple:
    """What tells closures apart that may be written anew at each step: a function's code with the
    objects it captured (closure cells, defaults), a bound method's function and object, a
    :func:`functools.partial`'s function and arguments; else the callable itself."""
    if isinstance(closure, functools.partial):
        return (_closure_identity(closure.func), *closure.args, *sorted(closure.keywords.items()))
    if hasattr(closure, "__func__") and hasattr(closure, "__self__"):
        return (_closure_identity(closure.__func__), closure.__self__)
    code = getattr(closure, "__code__", None)
    if code is None:
        return (closure,)
    cells = tuple(cell.cell_contents if _filled(cell) else None for cell in closure.__closure__ or ())
    return (code, *cells, *(closure.__defaults__ or ()), *sorted((closure.__kwdefaults__ or {}).items()))


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return False
    return True


def _same_objects(a: object, b: object) -> bool:
    """``a`` and ``b`` are the same objects, item by item through tuples (never ``==``: a tensor's
    is elementwise)."""
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(_same_objects(u, v) for u, v in zip(a, b))
    return a is b


@dataclass(frozen=True)
class ModuleCall:
    """One call ``outputs = module(X)`` seen while the closure ran (``X``, ``outputs``: ``None``
    unless the call took one tensor and returned one)."""

    module: nn.Module
    depth: int
    X: Tensor | None = None
    outputs: Tensor | None = None
    versions: tuple[int, int] = (-1, -1)

    @property
    def closed_form_candidate(self) -> bool:
        """One 2-D tensor in, one 2-D tensor of as many samples out, neither modified in place since."""
        X, out = self.X, self.outputs
        if X is None or out is None or X.ndim != 2 or out.ndim != 2 or X.shape[0] != out.shape[0]:
            return False
        return self.versions == (X._version, out._version)


#: Whether torch's global forward hooks take ``with_kwargs`` (not torch 2.4, which the package
#: supports: there every step failed with a TypeError from the hook's registration).
_GLOBAL_HOOK_KWARGS = "with_kwargs" in inspect.signature(torch.nn.modules.module.register_module_forward_hook).parameters


class _ModuleCalls:
    """Records every module call while active (global forward hooks, removed on exit).

    ``enabled=False`` records nothing and installs no hook.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.calls: list[ModuleCall] = []
        self._depth = 0
        self._handles: list = []

    def __enter__(self) -> _ModuleCalls:
        if self.enabled:
            hooks = torch.nn.modules.module
            leave = hooks.register_module_forward_hook(self._leave, with_kwargs=True) if _GLOBAL_HOOK_KWARGS \
                else hooks.register_module_forward_hook(self._leave_positional)
            self._handles = [hooks.register_module_forward_pre_hook(self._enter), leave]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
            # torch's handle leaves the hook's with_kwargs entry behind (torch 2.13): one entry
            # per step, and _has_any_global_hook() true for the process, so that every call of a
            # torch.compile(module) warned about global hooks from the first step on.
            getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)
        self._handles = []

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _leave_positional(self, module: nn.Module, args: tuple, outputs: object) -> None:
        """:meth:`_leave` where global hooks do not see keyword arguments (torch 2.4): a
        call with keywords then reads as one with its positional arguments alone. The closed
        form is taken only for a module :func:`~marquardt.fastjac.describe` reads, whose
        ``forward`` takes the input alone, and only after its outputs are checked."""
        self._leave(module, args, {}, outputs)

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, outputs: object) -> None:
        self._depth -= 1
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and isinstance(outputs, Tensor):
            X = args[0]
            self.calls.append(ModuleCall(module, self._depth, X, outputs, (X._version, outputs._version)))
        else:
            self.calls.append(ModuleCall(module, self._depth))

    def producer(self, params: list[Tensor]) -> ModuleCall | None:
        """The outermost call of a module whose trainable parameters are ``params`` (the same
        tensors, in the same order), when that module was called once and the call is a
        :attr:`~ModuleCall.closed_form_candidate`; ``None`` when there is none or several."""
        owners = [call for call in self.calls if _owns_exactly(call.module, params)]
        if not owners:
            return None
        outermost = min(call.depth for call in owners)
        owners = [call for call in owners if call.depth == outermost]
        if len(owners) != 1 or sum(call.module is owners[0].module for call in self.calls) != 1:
            return None
        return owners[0] if owners[0].closed_form_candidate else None


def _owns_exactly(module: nn.Module, params: list[Tensor]) -> bool:
    """Whether the trainable parameters of ``module`` are ``params``, same tensors in the same order."""
    own = [p for _, p in trainable_parameters(module)]
    return len(own) == len(params) and all(p is q for p, q in zip(own, params))


#: Relative agreement of ``J^T u`` in closed form and by autograd that identifies ``r`` as the
#: module's outputs minus a constant (rounding of either is far below; any other dependence of
#: ``r`` on the parameters, such as ``2 * (out - y)``, is of order one).
AGREEMENT = {torch.float64: 1e-10, torch.float32: 1e-4}


def _is_output_minus_constant(problem: ModuleProblem, r: Tensor, params: list[Tensor], x: Tensor) -> bool:
    """Whether ``J^T u`` of ``problem`` (closed form) equals autograd's ``d r/d params^T u`` for a
    random ``u``, to :data:`AGREEMENT` of the parameters' dtype (relative, on the norm)."""
    u = _probe(r.detach())
    try:
        expected = torch.cat([g.reshape(-1) for g in _vjp(r, params, u)]).to(problem.dtype)
    except RuntimeError:
        return False
    closed = problem.vjp(x, u)
    tolerance = AGREEMENT.get(x.dtype, math.sqrt(torch.finfo(x.dtype).eps))
    error = float(torch.linalg.vector_norm(closed - expected))
    return error <= tolerance * float(torch.linalg.vector_norm(expected))


#: Autograd nodes that pass a tensor's elements on unchanged and in the same (row-major) order:
#: ``reshape``, ``view``, ``flatten``, ``squeeze``, ``unsqueeze`` and the copy ``reshape`` makes
#: of a non-contiguous tensor.
_SAME_ELEMENTS = frozenset({"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "CloneBackward0",
                            "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0"})


def _is_outputs_minus_constant_graph(r: Tensor, outputs: Tensor) -> bool:
    """Whether the autograd graph of ``r`` is ``outputs`` minus (or plus) tensors that carry no
    graph, then reshaped: the nodes from ``r`` back to ``outputs`` are :data:`_SAME_ELEMENTS`,
    ``SubBackward0`` of ``outputs - c`` and ``AddBackward0`` of ``outputs + c`` or ``c + outputs``
    (``alpha`` 1), and nothing else. Then ``d r / d params = d outputs / d params``, exactly.

    Reads the nodes only (a few microseconds); ``False`` for anything else, which
    :func:`_is_output_minus_constant` then judges by a backward pass.
    """
    target, target_nr = outputs.grad_fn, outputs.output_nr
    node, nr = r.grad_fn, r.output_nr
    for _ in range(64):  # the closures this accepts are a handful of nodes deep
        if node is None:
            return False
        if node is target:
            return nr == target_nr
        name, inputs = node.name(), node.next_functions
        if name in _SAME_ELEMENTS and len(inputs) == 1:
            node, nr = inputs[0]
        elif name in ("SubBackward0", "AddBackward0") and len(inputs) == 2 and getattr(node, "_saved_alpha", None) == 1:
            if inputs[1][0] is None:
                node, nr = inputs[0]
            elif name == "AddBackward0" and inputs[0][0] is None:
                node, nr = inputs[1]
            else:
                return False
        else:
            return False
    return False


def _reproduces(problem: ModuleProblem, r: Tensor, call: ModuleCall, x: Tensor) -> bool:
    """Whether ``r`` is verifiably ``call.outputs`` minus a constant without a backward pass: by its
    graph (:func:`_is_outputs_minus_constant_graph`), with the closed form's own forward pass at
    ``x`` (held by a tiny network, :meth:`~marquardt.network.ModuleProblem.held_outputs`) equal
    to ``call.outputs`` to :data:`AGREEMENT`.

    The first step of a problem is always checked by :func:`_is_output_minus_constant`; this
    serves the later steps of the same call (:class:`KeptProblem`), where that check's backward
    pass through the closure's graph was about a fifth of a step of the 1-20-1 benchmark network
    (~350 of ~1,900 us). The module itself is covered by :class:`CallKey` (its submodules, their
    modes and hooks) and by the outputs' agreement (constants changed in place, such as new
    normalization ranges, move them).
    """
    if not _is_outputs_minus_constant_graph(r, call.outputs):
        return False
    held = problem.held_outputs(x)
    return held is not None and _outputs_agree(held, call.outputs)


def _outputs_agree(closed: Tensor, outputs: Tensor) -> bool:
    """Whether the closed form's outputs ``closed`` are the module's ``outputs`` to :data:`AGREEMENT`
    of the module's dtype (relative, on the norm).

    The ``J^T u`` check (:func:`_is_output_minus_constant`) compares derivatives only: a module
    whose outputs the closed form does not give, though its derivatives are the same (a forward
    hook adding a buffer), passed it, and the closed form's residuals ``closed - targets`` were
    the closure's residuals shifted by the difference (its gradient too).
    """
    if closed.numel() != outputs.numel():
        return False
    expected = outputs.detach().reshape(closed.shape).to(closed.dtype)
    tolerance = AGREEMENT.get(outputs.dtype, math.sqrt(torch.finfo(outputs.dtype).eps))
    scale = float(torch.linalg.vector_norm(expected))
    return math.isfinite(scale) and float(torch.linalg.vector_norm(closed - expected)) <= tolerance * scale


def _in_dtype(lin: Linearization, dtype: torch.dtype, cost: float) -> Linearization:
    """``lin`` with cost ``cost``, its system and gradient seen in ``dtype`` (the step's dtype)."""
    if lin.grad.dtype == dtype:
        return Linearization(cost, lin.grad, lin.system, lin.residuals, lin.jac)
    narrow = [None if t is None else t.to(dtype) for t in (lin.residuals, lin.jac)]
    return Linearization(cost, lin.grad.to(dtype), PromotedEquations(lin.system, dtype), *narrow)


#: The column path is taken when ``FORWARD_RATIO * n < m``. A column is a backward pass through
#: the backward graph (dearer than a row's pass), after one pass that builds ``J^T u``. Measured
#: on tanh MLPs (float32, one thread; rows time / columns time): n = 61: 0.67 at m = n, 1.35 at
#: m = 2n, 2.3 at 3n, 7.2 at 6n; n = 321: 0.85 at m = n, 2.0 at 2n, 3.1 at 3n.
FORWARD_RATIO = 2


def prefers_forward(m: int, n: int, itemsize: int, max_bytes: int) -> bool:
    """Whether the Jacobian should be formed by columns (``n`` passes) rather than rows (``m``).

    Only when the whole ``m x n`` Jacobian fits in ``max_bytes``: the columns span all rows,
    so they cannot be folded into ``J^T J`` chunk by chunk.

    Examples
    --------
    >>> prefers_forward(1000, 61, 4, 1 << 30), prefers_forward(102, 61, 8, 1 << 30)  # T1; Poisson
    (True, False)
    >>> prefers_forward(1000, 61, 4, 1000 * 61 * 4 - 1)
    False
    """
    return FORWARD_RATIO * n < m and m * n * itemsize <= max_bytes


def _probe(r: Tensor) -> Tensor:
    """A fixed random vector shaped like ``r`` (its own generator: the user's stream is untouched)."""
    generator = torch.Generator(device=r.device).manual_seed(0)
    return torch.randn(r.shape, generator=generator, dtype=r.dtype, device=r.device)


def _products_agree(jac: Tensor, probe: Tensor, expected: Tensor) -> bool:
    """Whether ``jac.T @ probe`` equals ``expected`` up to a loose rounding bound.

    The two differ by rounding only when every operation was differentiated twice; an operation
    whose backward is not differentiable leaves its whole share out of ``jac``, far above the
    bound ``sqrt(eps) * (|J|^T |u| + |expected|)``.
    """
    bound = math.sqrt(torch.finfo(jac.dtype).eps) * (jac.abs().T @ probe.abs() + expected.abs())
    return bool(((jac.T @ probe - expected).abs() <= bound).all())


def _flat_vjp(r: Tensor, params: list[Tensor], u: Tensor) -> Tensor:
    """``J^T u`` as one flat vector: a backward pass of ``r`` seeded with ``u`` (the graph kept)."""
    return torch.cat([g.reshape(-1) for g in _vjp(r, params, u)])


def _adjoint_graph(r: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(p, g)``: a fixed random ``p`` shaped like ``r`` (requiring grad) and ``g = J^T p`` as one
    flat vector with its graph (``create_graph=True``). ``g`` is linear in ``p``, so a backward
    pass of ``g`` seeded with ``v`` gives ``J v``: the double-backward trick."""
    probe = _probe(r).requires_grad_()
    g = torch.autograd.grad(r, params, probe, create_graph=True, allow_unused=True, materialize_grads=True)
    return probe, torch.cat([part.reshape(-1) for part in g])


def _double_backward_jvp(r: Tensor, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """``v -> J v`` through the graph of ``g(p) = J^T p``, or ``None`` where that graph is wrong.

    ``g`` is built once, by a backward pass with ``create_graph=True`` seeded with a dummy
    ``p``; it is linear in ``p``, so the backward pass of ``g`` seeded with ``v`` gives
    ``dg/dp^T v = J v`` (the double-backward trick of :meth:`ClosureProblem._forward_jacobian`,
    one vector at a time). Both graphs are held while the operator lives: about twice the
    closure's. A graph that cannot be differentiated twice raises (then ``None``) or silently
    drops that operation's share of ``J v``; the adjoint test ``p^T (J v) = g(p)^T v`` for a
    random ``v`` (:func:`_adjoint_agrees`) catches the latter (then ``None`` too).
    """
    try:
        with torch.enable_grad(), _SavedBytes(params):
            probe, g = _adjoint_graph(r, params)

        def jvp(vector: Tensor) -> Tensor:
            (product,) = torch.autograd.grad(g, probe, vector, retain_graph=True)
            return product.detach().reshape(-1)

        agrees = _adjoint_agrees(jvp, probe.detach().reshape(-1), g.detach())
    except torch.OutOfMemoryError:
        # A RuntimeError too, but no sign of a graph that refuses double backward: the rows
        # would take m backward passes a product and hit the same wall.
        raise
    except (RuntimeError, NotImplementedError):  # never fail a step the rows can take
        return None
    return jvp if agrees else None


def _adjoint_agrees(jvp: Callable[[Tensor], Tensor], probe: Tensor, expected: Tensor) -> bool:
    """Whether ``probe^T (J v)`` equals ``expected^T v = (J^T probe)^T v`` for a fixed random ``v``,
    up to the rounding bound ``sqrt(eps) * (|probe|^T |J v| + |expected|^T |v|)`` (the bound of
    :func:`_products_agree`, on one number: a dropped share of ``J v`` is far above it)."""
    generator = torch.Generator(device=expected.device).manual_seed(1)
    vector = torch.randn(expected.shape, generator=generator, dtype=expected.dtype, device=expected.device)
    product = jvp(vector)
    bound = math.sqrt(torch.finfo(expected.dtype).eps) * float(probe.abs() @ product.abs()
                                                               + expected.abs() @ vector.abs())
    return abs(float(probe @ product) - float(expected @ vector)) <= bound


def _unit_vjps(outputs: Tensor, inputs: list[Tensor], start: int, stop: int, batch: int) -> Tensor:
    """Rows ``start:stop`` of ``d(outputs)/d(inputs)``, by batched backward passes of ``batch`` rows.

    Each batch's rows are copied into the result, allocated once, and dropped at once: kept as
    pieces for one ``torch.cat`` they sat between each pass's freed temporaries, and the heap
    grew by about a pass's saved tensors per batch (a 1-64-64-1 network on 5,000 samples with
    ``max_jacobian_bytes=64e6`` peaked 5.2 GB above its start, for a 87 MB ``J``; 312 MB now).
    """
    total, rows = outputs.numel(), None
    for low in range(start, stop, batch):
        high = min(low + batch, stop)
        part = _batched_vjp(outputs, inputs, _unit_seeds(total, low, high, outputs))
        if rows is None:
            if high == stop:  # one batch is all of them
                return part
            rows = part.new_empty(stop - start, part.shape[1])
        rows[low - start : high - start] = part
        del part
    return rows


def _batched_vjp(outputs: Tensor, inputs: list[Tensor], seeds: Tensor) -> Tensor:
    """``seeds @ d(outputs)/d(inputs)``, by the fastest batched backward pass the graph allows."""
    for rows in (_vmapped_rows, _legacy_batched_rows):
        try:
            grads = rows(outputs, inputs, seeds)
            break
        except RuntimeError:
            continue
    else:  # Some double-backward graphs cannot be vmapped at all; one backward pass per row then.
        grads = [torch.stack(g) for g in zip(*(_vjp(outputs, inputs, seed) for seed in seeds))]
    return torch.cat([g.reshape(seeds.shape[0], -1) for g in grads], dim=1).detach()


def _vjp(r: Tensor, params: list[Tensor], seed: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(r, params, grad_outputs=seed, retain_graph=True, allow_unused=True,
                               materialize_grads=True)


def _vmapped_rows(r: Tensor, params: list[Tensor], seeds: Tensor) -> tuple[Tensor, ...]:
    # torch.vmap, not is_grads_batched: the latter runs the legacy vmap prototype, which has no
    # batching rule for ops such as tanh_backward and loops over the rows in Python (4-6x slower
    # at T2 size, same values).
    return torch.vmap(functools.partial(_vjp, r, params))(seeds)


def _legacy_batched_rows(r: Tensor, params: list[Tensor], seeds: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(r, params, grad_outputs=seeds, retain_graph=True, allow_unused=True,
                               materialize_grads=True, is_grads_batched=True)


#: Bytes a batched backward pass holds per row, in units of the bytes the graph saved: the
#: gradient reaching each saved tensor and the one leaving it. Measured 1.5 at the T2 benchmark
#: size (1-64-64-1 tanh MLP, 5,000 samples: 2.6 MB saved, 3.9 MB per row); 2 leaves room.
BACKWARD_COPIES = 2


def rows_per_backward(saved_bytes: int, row_bytes: int, max_bytes: int) -> int:
    """Jacobian rows one batched backward pass may compute within ``max_bytes``.

    A backward pass batched over ``k`` seeds holds ``k`` gradients of every tensor the graph
    saved for it (:data:`BACKWARD_COPIES` per saved byte) and ``k`` Jacobian rows of
    ``row_bytes``, however few rows the chunk folded into ``J^T J`` holds.

    Examples
    --------
    >>> rows_per_backward(saved_bytes=2_596_640, row_bytes=4 * 4353, max_bytes=1 << 30)  # T2
    206
    >>> rows_per_backward(saved_bytes=10**10, row_bytes=8, max_bytes=1 << 20)
    1
    """
    return max(1, max_bytes // max(1, BACKWARD_COPIES * saved_bytes + row_bytes))


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct storages autograd saves for backward while active.

    With ``params``, a saved tensor that shares storage with one of them (a weight, its
    transpose) is saved as a copy: the graph then stays the linearization at the current point
    whatever the parameters hold later (a matrix-free step makes products through it after its
    trials wrote them). Autograd does not check the version of a tensor saved through hooks, so
    the graph would otherwise read the new values silently (and without hooks, fail its check:
    "modified by an inplace operation"). Gradients still reach the parameters (autograd keeps
    the saved tensor's edge); each parameter's storage is copied at most once, so the copies take
    at most the parameters' own bytes, however many (expanded, transposed) views were saved.
    """

    def __init__(self, params: list[Tensor] | None = None) -> None:
        self.nbytes = 0
        self._seen: set[int] = set()
        self._params = {_storage_key(p) for p in params or ()}
        self._copies: dict[int, torch.UntypedStorage] = {}
        super().__init__(self._pack, _unpack)

    def __enter__(self) -> _SavedBytes:
        super().__enter__()
        return self

    def _pack(self, tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, nested, ...: no single storage
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += size
        if key in self._params:
            return self._snapshot(tensor, key)
        return tensor

    def _snapshot(self, tensor: Tensor, key: int) -> Tensor:
        """``tensor`` as the same view (offset, shape, strides) of a copy of its parameter's
        storage, the storage copied once per pass. ``tensor.clone()`` materialized an expanded
        view at its full size: a 64 KB weight expanded over 2,000 samples took 125 MB."""
        storage = self._copies.get(key)
        if storage is None:
            storage = self._copies[key] = tensor.untyped_storage().clone()
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
            storage, tensor.storage_offset(), tensor.shape, tensor.stride())


def _storage_key(tensor: Tensor) -> int | None:
    """The address of ``tensor``'s storage, as :meth:`_SavedBytes._pack` keys it."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


def _unit_seeds(m: int, start: int, stop: int, like: Tensor) -> Tensor:
    """Rows ``start:stop`` of the ``m x m`` identity, without forming the identity."""
    seeds = torch.zeros(stop - start, m, dtype=like.dtype, device=like.device)
    index = torch.arange(start, stop, device=like.device)
    seeds[index - start, index] = 1
    return seeds


class LevenbergMarquardt(Optimizer):
    """Levenberg-Marquardt as a :class:`torch.optim.Optimizer`.

    Parameters
    ----------
    params : iterable of Tensor
        The parameters to fit, in one group (several groups, or one added later by
        ``add_param_group``, are refused). Each step fits those that require grad at that step.
    damping : float
        Initial damping, on ``J^T J`` of the closure's residuals: ``(J^T J + damping I) h =
        -J^T r``. (``fit``'s ``mu`` is MATLAB's, on ``J^T J / N`` for ``N`` errors, so the same
        value damps ``N`` times more there.) With ``strategy="nielsen"`` it is relative to the
        largest diagonal entry of ``J^T J``.
    damping_dec, damping_inc, damping_max : float
        MATLAB's ``mu_dec``, ``mu_inc``, ``mu_max`` (``strategy="marquardt"``), with
        ``0 < damping_dec < 1 < damping_inc``; Nielsen's rule uses only ``damping_max``. Checked
        here and again at each :meth:`step`, before the closure runs, so that a value set in
        ``param_groups`` or by ``load_state_dict`` is refused before any work.
    strategy : {"marquardt", "nielsen"}
        Damping rule (see :mod:`marquardt.damping`).
    max_jacobian_bytes : int
        Bytes of Jacobian rows held at once (``J^T J`` is accumulated chunk by chunk), and the
        bound on the memory of one batched backward pass (see Notes).
    max_matrix_bytes : int
        Bytes the ``n x n`` matrix ``J^T J`` may take (default
        :data:`~marquardt.chunked.DEFAULT_MATRIX_BYTES`); past it ``solver="auto"`` goes
        matrix-free, unless the sample-space form applies first (fewer residuals than
        parameters and the whole ``m x n`` Jacobian within ``max_jacobian_bytes``; see Notes).
        As :func:`marquardt.fit`'s option of that name.
    solver : {"auto", "normal", "sample-space", "matrix-free"}
        The system form, as :func:`marquardt.fit`'s ``solver``: ``"auto"`` picks it from the
        shape and the two budgets (:func:`~marquardt.chunked.plan_assembly`); another value
        forces it (``"normal"`` with ``J^T J`` past ``max_matrix_bytes`` is a ValueError at the
        step). Both are checked here and at each :meth:`step`, as the damping options are.

    Notes
    -----
    Each step solves ``(J^T J + damping I) h = -J^T r`` and retries with more damping until the
    cost ``0.5 * sum(r**2)`` drops or damping passes ``damping_max``. The parameters are left at
    the accepted point, or unchanged. After an accepted step the damping is raised to
    :data:`~marquardt.damping.DAMPING_FLOOR` (1e-20) when below it, as :func:`marquardt.fit` and
    MATLAB's ``trainlm`` do: a long run of accepted steps drove it to 0.0, which no rejection
    raises, and the next rejected trial never ended. A state whose damping is NaN, 0 or negative,
    or whose ``nu`` is not a finite number >= 1, is a ValueError naming the field, in
    :meth:`load_state_dict` (nothing is loaded) and at :meth:`step` (before the closure runs).
    A non-finite trial is a rejected step; at the current parameters, non-finite residuals or a
    cost that overflows their dtype are a ValueError before any trial (no step can start there).
    So is a non-finite gradient ``J^T r`` (``sqrt`` or ``log`` at 0 in the residuals, an
    overflow) at parameters this optimizer did not choose: the first step's, weights changed
    since, new data or another closure. At the point the last step accepted (the same weights
    bit for bit, a CRC-32 of their bytes, and the same cost from the closure) that trial is
    rejected after all, as :func:`marquardt.least_squares` rejects it: the step writes back the
    point it started from, raises the damping the accepted trial was computed with as a
    rejection would, and steps from there, so ``step()`` returns normally. The state keeps for
    this ``previous_point`` (the flat parameter vector the last accepted step started from:
    one vector of ``n`` numbers, the step's own copy, kept rather than freed),
    ``previous_damping``, ``previous_nu``, ``accepted_point`` (the CRC) and ``accepted_cost``;
    they are removed after a step that accepted nothing. The cost a step returns is that of a
    point the next step may still reject; that step then returns a cost from the point before,
    which may be higher. The closure is called at the current point and at each trial: it must
    return as many residuals each time within a step (a ValueError otherwise; draw a minibatch
    outside the closure), and may change them between steps. It computes them at each call:
    residuals computed once before the step and returned again (``opt.step(lambda: r)``) are a
    ValueError at the first trial, or a RuntimeError saying so when their graph saved the weights.

    Four paths, the first that applies: ``J`` in closed form, by columns or by rows of the
    closure's graph, or no ``J`` at all (matrix-free); ``state["jacobian"]`` records how ``J``
    or its products were made ("closed-form", "forward" or "reverse") and ``state["solver"]``
    the solve (``"cg"`` for the matrix-free form; see *Matrix-free* below). The system form
    follows :func:`~marquardt.chunked.plan_assembly`, as in ``fit``: under ``solver="auto"``,
    sample space when ``m < n`` and the ``m x n`` Jacobian fits in ``max_jacobian_bytes``, else
    the normal equations when ``J^T J`` fits in ``max_matrix_bytes``, else matrix-free.

    *Closed form*: while the closure runs, global module forward hooks record every module
    call. The outermost call of a module whose trainable parameters are exactly the optimizer's
    (the same tensors in the same order), made once, on one 2-D tensor ``X``, with outputs
    ``out`` of ``r.numel()`` elements left unmodified, is a candidate when
    :func:`~marquardt.fastjac.describe` knows the module (``nn.Sequential`` of ``nn.Linear`` and
    elementwise activations, :class:`marquardt.MLP`). It is taken only when ``r`` is verified to
    be ``out.reshape(-1) - c`` with ``c`` independent of the parameters: ``J^T u`` in closed form
    equals autograd's for one random ``u``, relative error on the norm at most
    :data:`AGREEMENT` (1e-4 in float32, 1e-10 in float64; rounding measured 4e-7 and 1e-15 on
    the benchmark networks). ``2 * (out - y)``, ``out**2 - y``, a model called twice, a
    parameter subset whose outputs feed later layers all fail this and take the graph.
    A refused call is not tried again by the next ten steps of the same closure (the same code
    and the same captured objects: a lambda written anew each step is the same, one from a
    factory called with another function is not) while the module, its input tensor
    (unmodified), the trainable parameters, the submodules' types and training modes, the
    dtype and the budgets are the same; any change tries it once more, and so does the
    eleventh step (a closure switched by state it does not capture looks the same).
    The system is then :class:`~marquardt.network.ModuleProblem` (targets ``out - r``) linearized
    at the current point, exactly as :func:`marquardt.fit` forms it: chunked normal equations,
    the sample-space kernel or matrix-free conjugate gradients by shape and budget
    (:func:`~marquardt.chunked.plan_assembly`), a tiny float32 network in float64, seen in the
    parameters' dtype (:class:`~marquardt.chunked.PromotedEquations`). The cost of the current
    point and of every trial is still the closure's. In the matrix-free form the problem's warm
    start, forcing term and curvature-subset generator
    (:meth:`~marquardt.network.ModuleProblem.resume_state`) are copied into the state after each
    step (``state["closed_form_point"]``, ``["closed_form_previous"]``,
    ``["closed_form_generator"]``), so ``state_dict()`` resumes them, and a problem built for a
    new input (a new minibatch) starts from them too, as the graph path's solves do.

    Otherwise ``J`` comes from backward passes through the closure's graph, by rows or, when
    ``m > 2 n`` (:func:`prefers_forward`) and the whole ``m x n`` Jacobian fits in
    ``max_jacobian_bytes``, by columns.

    *Rows* (reverse mode): backward passes batched over ``k`` rows. A pass holds ``k`` gradients
    of every tensor the graph saved (counted by :class:`torch.autograd.graph.saved_tensors_hooks`
    while the closure runs), so ``k`` is :func:`rows_per_backward`:
    ``k * (2 * saved_bytes + n * itemsize) <= max_jacobian_bytes``. The rows are folded into
    ``J^T J`` in chunks and dropped, so memory grows as ``O(n**2 + max_jacobian_bytes)`` plus the
    graph, not as ``O(m * n)``. Time grows as ``m`` backward passes over the whole graph,
    ``O(m * graph)``: the closure hides which residual depends on which sample.

    *Columns* (forward mode by the double-backward trick): one backward pass with
    ``create_graph=True`` gives ``g(u) = J^T u``; a backward pass of ``g`` seeded with ``e_j``
    gives the column ``J e_j``. Time grows as ``n`` such passes, ``O(n * graph)``; the passes are
    batched as the rows are, with the bytes saved by both graphs, and the whole Jacobian is held
    (at most ``max_jacobian_bytes``). A graph that cannot be differentiated twice (an error, or
    columns that disagree with ``g(u)`` for a random ``u``) falls back to rows.

    *Matrix-free* (``solver="matrix-free"``, or under ``"auto"`` when ``n**2 * itemsize >
    max_matrix_bytes`` and the sample-space form does not apply): neither ``J`` nor ``J^T J`` is
    formed. Under ``"auto"`` a wide problem whose ``m x n`` Jacobian fits ``max_jacobian_bytes``
    takes the sample-space form first, which on the graph path forms ``J`` by ``m`` backward
    passes: measured in the audit of this path (t10), a 98,945-parameter tanh MLP on 2,000
    samples would take 2,000 passes, about 75 s on one thread, where a matrix-free step took
    0.2 s. Pass ``solver="matrix-free"`` for such a closure. The closed form is not affected:
    its sample-space kernel takes no backward passes. The step is inexact LM,
    conjugate gradients on a Galerkin basis (:class:`~marquardt.matfree.MatrixFreeEquations`, as
    :func:`marquardt.fit`'s matrix-free form): at most 20 products ``J^T J v`` a step, stopped at
    an Eisenstat-Walker forcing term and warm-started from the last accepted step (both kept in
    ``state["forcing"]`` and ``state["warm_start"]``, so ``state_dict()`` resumes them). ``J^T u``
    is a backward pass of the residuals; ``J v`` a backward pass through the graph of
    ``g(p) = J^T p`` built once with ``create_graph=True`` (``state["jacobian"] == "forward"``),
    so a product costs about three passes over the closure's graph. A graph that cannot be
    differentiated twice (an error, or ``p^T J v != g(p)^T v`` for a random ``v``) takes ``J v``
    from Jacobian rows instead, ``m`` backward passes a product (``"reverse"``). Memory grows as
    ``O(n)`` vectors (the basis, ``2 * 21 * n`` numbers, and a few more) plus the closure's graph
    and the graph of its backward pass (about twice the graph), never ``n x n`` or ``m x n``.
    ``diag(J^T J)`` is computed only for Nielsen's first damping: the column sums of squared
    Jacobian rows, a chunk of at most ``max_jacobian_bytes`` at a time, ``m`` backward passes.
    Saved tensors that alias a parameter are kept as copies while the closure runs, so the
    graph stays the linearization at the current point while the trials write the parameters.

    Measured on 2 shared cores (load 1.0-1.8), float32, ``opt.step(lambda: (model(x) -
    y).reshape(-1))``, medians per step, graph paths against the closed form interleaved: T1
    (1-20-1 tanh MLP, 61 parameters, 1,000 samples; columns before) 5.0 / 6.1 / 7.2 ms against
    3.9 / 2.8 / 2.8 ms (199 steps a run); T2 (1-64-64-1, 4,353 parameters, 5,000 samples; rows
    before, chunked normal form now) 22.4 / 20.5 s against 1.19 / 1.06 s, peak resident memory
    of the process 1.40 / 1.38 GB against 0.55 / 0.55 GB; T5 (1-200-200-1, 40,801 parameters,
    2,000 samples; sample space) 14.2 / 13.8 s against 0.28 / 0.30 s. The graph paths alone,
    earlier: T1 by rows 196-204 ms a step; T2 with passes sized for the Jacobian rows alone
    (the legacy ``is_grads_batched``) 19.4 GB and 95-119 s.

    Examples
    --------
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(1, 1)
    >>> X = torch.linspace(0, 1, 10)[:, None]; y = 3 * X - 1
    >>> opt = LevenbergMarquardt(model.parameters())
    >>> for _ in range(5):
    ...     cost = opt.step(lambda: model(X) - y)
    >>> round(model.weight.item(), 4), round(model.bias.item(), 4)
    (3.0, -1.0)

    A ``Sequential`` network's residuals take the closed form; twice them do not:

    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = LevenbergMarquardt(net.parameters())
    >>> _ = opt.step(lambda: net(X) - y); opt.state[net[0].weight]["jacobian"]
    'closed-form'
    >>> _ = opt.step(lambda: 2 * (net(X) - y)); opt.state[net[0].weight]["jacobian"]
    'reverse'

    The matrix-free form, forced here (``"auto"`` takes it when ``J^T J`` would not fit in
    ``max_matrix_bytes``), never forms ``J``:

    >>> opt = LevenbergMarquardt(net.parameters(), solver="matrix-free")
    >>> _ = opt.step(lambda: 2 * (net(X) - y)); [opt.state[net[0].weight][k] for k in ("jacobian", "solver")]
    ['forward', 'cg']
    """

    #: Whether steps try the closed-form Jacobian first (tests switch it off to reach the autograd paths).
    _closed_form = True

    def __init__(self, params, *, damping: float = 1e-3, damping_dec: float = 0.1, damping_inc: float = 10.0,
                 damping_max: float = 1e10, strategy: str = "marquardt",
                 max_jacobian_bytes: int = DEFAULT_JACOBIAN_BYTES, max_matrix_bytes: int = DEFAULT_MATRIX_BYTES,
                 solver: str = "auto") -> None:
        defaults = _lm_options(damping, damping_dec, damping_inc, damping_max, strategy, max_jacobian_bytes,
                               max_matrix_bytes, solver)
        params = list(params) if not isinstance(params, Tensor) else params
        if isinstance(params, list) and len(params) > 1 and all(isinstance(g, dict) for g in params):
            raise ValueError(f"LevenbergMarquardt supports one parameter group; received {len(params)}.")
        super().__init__(params, defaults)
        self._kept: KeptProblem | None = None  # the closed-form problem of the last step
        self._refused: Refusal | None = None  # the last call refused the closed form

    def __setstate__(self, state: dict) -> None:
        # torch.optim pickles (and deep-copies) only defaults, state and groups; the kept problem
        # and the last refusal are caches of earlier steps' module calls, made again by the next step.
        super().__setstate__(state)
        self._kept = self._refused = None
        for group in self.param_groups:
            # A state dict saved before these options existed loads with fit's defaults (SGD's
            # __setstate__ fills keys added since in the same way).
            group.setdefault("max_matrix_bytes", DEFAULT_MATRIX_BYTES)
            group.setdefault("solver", "auto")

    def add_param_group(self, param_group: dict) -> None:
        """Adds the one parameter group (at construction); a second group is refused.

        One LM step solves for all parameters at once, so per-group options have no meaning, and
        parameters added later would never be stepped.
        """
        if self.param_groups:
            raise ValueError("LevenbergMarquardt supports one parameter group; add_param_group would add a "
                             "second. Pass all the parameters to the constructor instead.")
        # Options given in the group itself (torch.optim's per-group form) are checked and stored
        # as the constructor's keywords are: they were taken unchecked until the first step.
        given = {key: param_group.get(key, self.defaults[key]) for key in LM_OPTIONS}
        params = param_group["params"]
        if not isinstance(params, set):  # torch.optim refuses a set (no order) with its TypeError
            params = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
            _refuse_duplicates(params)
        super().add_param_group({**param_group, "params": params,
                                 **_lm_options(*(given[key] for key in LM_OPTIONS))})

    @property
    def _params(self) -> list[Tensor]:
        """The parameters a step fits: those of the group that require grad now (read at each
        step, as torch.optim optimizers skip frozen parameters)."""
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    @property
    def _state(self) -> dict:
        # Keyed by the group's first parameter, as torch.optim.LBFGS keeps its state: freezing or
        # unfreezing parameters between steps keeps the damping.
        return self.state[self.param_groups[0]["params"][0]]

    def _check_group(self) -> None:
        """A ValueError for a bad hyperparameter in the group, before a step does any work: the
        group is checked at construction, but may be set since (``param_groups[0][...] = ...``, a
        scheduler, ``load_state_dict``), and the damping rule would only refuse it after the
        closure had run and ``J`` had been formed."""
        group = self.param_groups[0]
        try:
            _lm_options(*(group[key] for key in LM_OPTIONS))
        except ValueError as error:
            raise ValueError(f"{error} It was read from param_groups[0] (set there since construction, or by "
                             "load_state_dict); set a valid value before calling step().") from None

    def _rule(self) -> MarquardtDamping | NielsenDamping:
        group = self.param_groups[0]
        if group["strategy"] == "nielsen":
            return NielsenDamping(tau=group["damping"], maximum=group["damping_max"])
        return MarquardtDamping(group["damping"], group["damping_dec"], group["damping_inc"], group["damping_max"])

    @property
    def damping_state(self) -> DampingState | None:
        """The current damping state (``None`` before the first step); a ValueError when the
        state holds a damping or ``nu`` no step can start from (set there, or by
        ``load_state_dict``)."""
        state = self._state
        if "damping" not in state:
            return None
        _check_damping_state(state, "the optimizer's state")
        return DampingState(state["damping"], state["nu"])

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`; a ValueError naming the field when
        the state holds a damping or ``nu`` no step can start from (NaN, 0 or negative, which
        no rejection would raise past ``damping_max``), before anything is loaded."""
        for index, entry in state_dict.get("state", {}).items():
            for prefix in ("", "previous_"):
                if isinstance(entry, dict) and f"{prefix}damping" in entry:
                    _check_damping_state(entry, f"state_dict['state'][{index!r}]", prefix)
        super().load_state_dict(state_dict)
        self._restore_strings(state_dict)
        self._restore_flat_vectors(state_dict)

    def _loaded_entries(self, state_dict: dict) -> Iterator[tuple[Tensor, dict]]:
        """``(parameter, saved entry)`` for each parameter whose state ``state_dict`` holds."""
        saved = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(saved, params):
            entry = state_dict["state"].get(index)
            if isinstance(entry, dict):
                yield param, entry

    def _restore_strings(self, state_dict: dict) -> None:
        """Put back the string entries of the loaded state (``solver``, ``jacobian``).

        torch's ``load_state_dict`` rebuilds every iterable in the state by its type, and
        ``str(generator)`` is the generator's text: ``state["solver"]`` read
        ``"<generator object Optimizer.load_state_dict.<locals>...>"`` until the next step, and a
        state dict saved right after loading (a checkpoint rewritten) kept it.
        """
        for param, entry in self._loaded_entries(state_dict):
            self.state[param].update({key: value for key, value in entry.items() if isinstance(value, str)})

    def _restore_flat_vectors(self, state_dict: dict) -> None:
        """Cast the loaded vectors of the flat parameter vector's space (:data:`FLAT_VECTOR_KEYS`)
        to that vector's dtype, the parameters' promoted one, from the saved tensors.

        torch's ``load_state_dict`` casts every state tensor to the dtype of the parameter it is
        kept under, the first: with float32 and float64 parameters the float64 warm start and
        point to step back to came back float32, and the resumed run dropped them (another next
        step). With one dtype this is torch's cast (a model converted since included).
        """
        group = self.param_groups[0]["params"]
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in (self._params or group)])
        for param, entry in self._loaded_entries(state_dict):
            for key in FLAT_VECTOR_KEYS:
                value = entry.get(key)
                if isinstance(value, Tensor) and value.is_floating_point() and dtype.is_floating_point:
                    self.state[param][key] = value.to(dtype=dtype, device=param.device)

    @property
    def exhausted(self) -> bool:
        """True when the last step found no lower cost before damping passed its maximum."""
        return bool(self._state.get("exhausted", False))

    def _iterate(self, problem: ClosureProblem, x: Tensor, state: DampingState | None
                 ) -> tuple[Tensor, Linearization, StepResult]:
        """The point the iteration starts from (``x``, or the point before it, :meth:`_step_back`),
        the linearization there and the LM iteration from it with the damping ``state``
        (``None``: the rule's first) (the trials write the parameters)."""
        lin = problem.linearize(x)
        rule = self._rule()
        if not bool(torch.isfinite(lin.grad).all()):
            back = self._step_back(problem, rule)
            if back is None:
                _check_start_gradient(lin.grad)  # raises: not a point this optimizer accepted
            x, state = back
            lin = problem.linearize(x)
            _check_start_gradient(lin.grad)
        state = state or _first_state(rule, lin.system)
        if rule.exhausted(state):
            # A step after an exhausted one starts again from the ceiling: the damping kept
            # growing by damping_inc (and Nielsen's nu doubling) at every exhausted step, reached
            # inf, and then no step could ever be taken, on new data too.
            state = DampingState(rule.maximum, 2.0)
        scale = torch.ones_like(x)
        with single_thread(problem.serial):
            return x, lin, lm_step(problem, x, lin, scale, rule, state, geodesic=None)

    def _step_back(self, problem: ClosureProblem, rule: MarquardtDamping | NielsenDamping
                   ) -> tuple[Tensor, DampingState] | None:
        """The point the last step started from and the damping of its accepted trial, raised as
        for a rejected trial, when the current point is the one that step accepted and its
        linearization is not finite: that trial is rejected after all, as :func:`least_squares`
        rejects it (:func:`~marquardt.solver.reject_accepted`). ``None`` when the current point is not one this optimizer
        accepted: the first step; weights changed since (their bytes' digest is not the accepted
        point's), or parameters frozen or unfrozen; new data or another closure (the cost there
        is not the accepted trial's, bit for bit)."""
        stored = self._state
        point = stored.get("previous_point")
        if point is None or stored.get("accepted_cost") != problem.start_cost:
            return None
        x = torch.cat([p.detach().reshape(-1) for p in problem.params])
        if stored.get("accepted_point") != _digest(x) or point.shape != x.shape or point.dtype != x.dtype \
                or point.device != x.device:
            return None
        _check_damping_state(stored, "the optimizer's state", prefix="previous_")
        trial = DampingState(stored["previous_damping"], stored["previous_nu"])
        return point, reject_accepted(rule, trial)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One LM iteration; returns the cost ``0.5 * sum(r**2)`` at the parameters it leaves."""
        if closure is None:
            raise ValueError("LevenbergMarquardt.step needs a closure that returns the residual tensor, "
                             "e.g. opt.step(lambda: model(X) - y).")
        if not callable(closure):
            raise TypeError(f"LevenbergMarquardt.step's closure must be a callable that returns the residual tensor; "
                            f"received {type(closure).__name__}. Pass a function that computes them, e.g. "
                            "opt.step(lambda: model(X) - y), not the residuals themselves.")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("LevenbergMarquardt.step differentiates the closure's residuals, which "
                               "torch.inference_mode() rules out: call step() outside torch.inference_mode() "
                               "(inside torch.no_grad() is fine: the step enables grad where it needs it).")
        self._check_group()
        start = self.damping_state  # checked before any work, as the group is
        group, params = self.param_groups[0], self._params
        if not params:
            raise ValueError("None of the optimizer's parameters requires grad; LevenbergMarquardt has nothing "
                             "to fit.")
        stored = self._state
        problem = ClosureProblem(params, closure, group["max_jacobian_bytes"], group["max_matrix_bytes"],
                                 group["solver"], closed_form=self._closed_form, serial=stored.get("serial", False),
                                 kept=self._kept, refused=self._refused, previous=_previous_solve(stored),
                                 resume=_resume_state(stored))
        x = torch.cat([p.detach().reshape(-1) for p in params])
        try:
            start_point, lin, out = self._iterate(problem, x, start)
        except BaseException:  # e.g. a closure that raised at a trial point: leave the weights as they were
            problem.write(x)
            raise
        problem.write(out.x)
        state = out.state
        if out.accepted and state.damping < DAMPING_FLOOR:  # as fit: no run of accepted steps underflows it
            state = DampingState(DAMPING_FLOOR, state.nu)
        stored.update(damping=state.damping, nu=state.nu, exhausted=out.exhausted, solver=lin.system.path,
                      jacobian=problem.used_mode, serial=problem.serial,
                      grad_norm=float(torch.linalg.vector_norm(lin.grad)))
        _keep_solve(stored, problem.forcing, out)
        _keep_resume_state(stored, problem)
        _keep_step_back(stored, start_point, out, _held_point(params, out.x))
        self._kept, self._refused = problem.kept, problem.refused
        if problem.used_mode == "closed-form":
            self._kept.problem.recycle(lin)  # lin is not used after: its n x n buffers serve the next step
        return torch.tensor(out.cost, dtype=x.dtype, device=x.device)


def _first_state(rule: MarquardtDamping | NielsenDamping, system: Any) -> DampingState:
    """The damping state of a first step. Only Nielsen's rule reads the largest diagonal entry of
    ``J^T J`` (Marquardt's value is absolute): on the matrix-free path that diagonal costs ``m``
    backward passes, so it is not computed for a rule that ignores it."""
    if isinstance(rule, MarquardtDamping):
        return rule.init(math.nan)
    state = rule.init(float(system.diagonal().max()))
    # tau times a small diagonal may underflow to 0, which no rejection would raise (0 * nu).
    return state if state.damping > 0.0 else DampingState(DAMPING_FLOOR, state.nu)


def _check_damping_state(entry: dict, where: str, prefix: str = "") -> None:
    """A ValueError naming the field of ``entry`` (a state read from ``where``) whose damping or
    ``nu`` (under ``prefix``: ``previous_damping``, :func:`_keep_step_back`) no step can start
    from: NaN, 0 or a negative damping stays there at every rejection (``0 * damping_inc``),
    never past ``damping_max``, and the step never ended. A damping past ``damping_max`` (inf
    included) is a valid state: the next step starts again from the ceiling."""
    damping, nu = entry[f"{prefix}damping"], entry.get(f"{prefix}nu")
    if not (is_real_number(damping) and damping > 0.0):  # NaN fails the comparison
        raise ValueError(f"Invalid {prefix}damping in {where}: {damping!r}; expected a number > 0 (the damping "
                         "a step starts from). Load a state saved by a step, or remove the key to start from the "
                         "group's damping.")
    if not (is_real_number(nu) and math.isfinite(nu) and nu >= 1.0):
        raise ValueError(f"Invalid {prefix}nu in {where}: {nu!r}; expected a finite number >= 1 (Nielsen's factor "
                         "for the next rejection: 2 after an accepted step, doubled at each rejection).")


def _keep_step_back(stored: dict, start: Tensor, out: StepResult, held: Tensor) -> None:
    """After an accepted step, keep what :meth:`LevenbergMarquardt._step_back` needs should the
    new point's linearization not be finite: the point the step started from (its
    linearization was finite; the tensor itself, a copy the step made, so one vector of ``n``
    numbers is held), the damping state its accepted trial was computed with, and what tells
    the accepted point at the next step: the digest of its bytes as the parameters hold it
    (``held``, :func:`_held_point`) and the cost the closure gave there. Removed after a step that
    accepted nothing: its point was linearized."""
    if not out.accepted:
        for key in STEP_BACK_KEYS:
            stored.pop(key, None)
        return
    stored.update(previous_point=start, previous_damping=out.trial_state.damping,
                  previous_nu=out.trial_state.nu, accepted_point=_digest(held), accepted_cost=out.cost)


def _held_point(params: list[Tensor], x: Tensor) -> Tensor:
    """The flat vector ``x`` as ``params`` hold it once written: ``x`` itself, or, where a
    parameter's dtype is narrower than ``x``'s (float32 and float64 parameters make a float64
    ``x``), the parameters read back, rounded as the write rounded them: the next step's ``x``."""
    if all(p.dtype == x.dtype for p in params):
        return x
    return torch.cat([p.detach().reshape(-1) for p in params]).to(x.dtype)


#: The state keys of :func:`_keep_step_back`.
STEP_BACK_KEYS = ("previous_point", "previous_damping", "previous_nu", "accepted_point", "accepted_cost")

#: The state tensors that live in the flat parameter vector's space (its dtype: the parameters'
#: promoted one): the point to step back to, the matrix-free warm start and the closed-form
#: problem's last point.
FLAT_VECTOR_KEYS = ("previous_point", "warm_start", "closed_form_point")


def _digest(x: Tensor) -> int:
    """The CRC-32 of the bytes of the flat parameter vector ``x``: equal for the same values, bit
    for bit. An int, so that the state stays JSON and tensors, as checkpoints store it, and passes
    torch's ``load_state_dict`` as it is (a string, such as a hexadecimal digest, comes out as the
    text of a generator; :meth:`LevenbergMarquardt._restore_strings`). A cost alone would not
    do: on a flat part of the cost (saturated units, ``where`` branches) other weights give the
    same cost to the last bit. CRC-32 (1.9 ms for 10^6 float64 parameters, 4.5x faster than
    blake2b): a collision costs no more than a step back from weights changed by hand."""
    return zlib.crc32(x.detach().contiguous().view(torch.uint8).cpu().numpy())


def _previous_solve(stored: dict) -> tuple[Tensor | None, float, float] | None:
    """The last step's matrix-free solve as the optimizer's state keeps it (``warm_start``,
    ``grad_norm``, ``forcing``; :attr:`ClosureProblem.previous`), or ``None`` after another path."""
    if "forcing" not in stored:
        return None
    return stored.get("warm_start"), stored["grad_norm"], stored["forcing"]


def _keep_solve(stored: dict, forcing: float | None, out: StepResult) -> None:
    """Keep in the state what the next matrix-free solve starts from: its forcing term and, when
    the step was accepted, the step (its warm start). Removed after a step by another path: a
    forcing term belongs to a run of conjugate-gradient solves."""
    if forcing is None:
        stored.pop("forcing", None)
    else:
        stored["forcing"] = forcing
    if forcing is not None and out.accepted:
        stored["warm_start"] = out.step.detach().clone()
    else:
        stored.pop("warm_start", None)


#: The state keys of a closed-form matrix-free problem's resume state: flat tensors and JSON
#: values (no ``None``), as :mod:`marquardt.checkpoint` stores an optimizer's state.
RESUME_KEYS = {"generator": "closed_form_generator", "previous_x": "closed_form_point",
               "previous": "closed_form_previous"}


def _keep_resume_state(stored: dict, problem: ClosureProblem) -> None:
    """Keep in the state what the kept closed-form problem carries to its next matrix-free solve
    (:meth:`~marquardt.network.ModuleProblem.resume_state`: warm start, forcing term, subset
    generator), so that ``state_dict()`` resumes it as it resumes the graph path's; removed
    after a step by another path or form."""
    for key in RESUME_KEYS.values():
        stored.pop(key, None)
    if problem.used_mode != "closed-form" or problem.kept is None:
        return
    tensors, meta = problem.kept.problem.resume_state()
    stored.update({RESUME_KEYS[name]: value for name, value in tensors.items()})
    if meta.get("previous") is not None:
        stored[RESUME_KEYS["previous"]] = list(meta["previous"])


def _resume_state(stored: dict) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The resume state :func:`_keep_resume_state` kept, as ``load_resume_state`` takes it, or
    ``None`` when the last step was not a closed-form matrix-free one."""
    if RESUME_KEYS["generator"] not in stored:
        return None
    # load_state_dict casts every state tensor to the parameters' dtype and device; the
    # generator's bytes (0..255) survive any float dtype exactly and go back to a CPU ByteTensor.
    tensors = {"generator": stored[RESUME_KEYS["generator"]].to(dtype=torch.uint8, device="cpu")}
    if RESUME_KEYS["previous_x"] in stored:
        tensors["previous_x"] = stored[RESUME_KEYS["previous_x"]]
    return tensors, {"previous": stored.get(RESUME_KEYS["previous"])}


class GradientDescent(Optimizer):
    """Gradient descent (backpropagation), MATLAB ``traingd``: ``param -= lr * grad``.

    Learning-rate schedulers work as on :class:`torch.optim.SGD`; those that also cycle a
    momentum constant (``OneCycleLR``, ``CyclicLR``) need ``cycle_momentum=False`` here, as
    there is none (on ``SGD(momentum=0)`` they would switch momentum on).

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = GradientDescent([w], lr=0.5)
    >>> (w**2).sum().backward(); _ = opt.step()
    >>> w.item()
    0.0
    """

    def __init__(self, params, lr: float = 0.01) -> None:
        lr = _check_number("lr", lr)
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step along the negative gradient; calls ``closure`` (with grad enabled) first if given."""
        loss = _call_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


class Momentum(Optimizer):
    """Momentum gradient descent as MATLAB ``traingdm``.

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or parameter groups, as for :class:`torch.optim.SGD`.
    lr : float
        Learning rate (``traingdm``'s ``lr``), > 0.
    beta : float
        Momentum constant (``traingdm``'s ``mc``), in ``[0, 1]``. Each parameter group holds it
        under torch.optim's key ``"momentum"``, the one learning-rate schedulers cycle
        (:class:`~torch.optim.lr_scheduler.OneCycleLR`, :class:`~torch.optim.lr_scheduler.CyclicLR`
        with ``cycle_momentum=True``), so they work as on ``SGD(momentum=...)``.

    Notes
    -----
    ``velocity = beta * velocity + (1 - beta) * grad``; ``param -= lr * velocity``. The velocity
    starts at the first gradient, so the first step is ``lr * grad``: ``traingdm`` starts its
    weight change at ``lr * gX`` (and ``torch.optim.SGD`` its momentum buffer at the gradient);
    a zero start would make it ``(1 - beta) * lr * grad``, ten times smaller at ``beta = 0.9``.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = Momentum([w], lr=0.25, beta=0.5)
    >>> (w**2).sum().backward(); _ = opt.step()
    >>> w.item()  # velocity = grad = 2; w = 1 - 0.25 * 2
    0.5
    >>> opt.zero_grad(); (w**2).sum().backward(); _ = opt.step()
    >>> w.item()  # velocity = 0.5 * 2 + 0.5 * 1 = 1.5; w = 0.5 - 0.25 * 1.5
    0.125
    """

    def __init__(self, params, lr: float = 0.01, beta: float = 0.9) -> None:
        lr = _check_number("lr", lr)
        beta = _check_number("beta", beta, strict=False, high=1.0)
        super().__init__(params, dict(lr=lr, momentum=beta))

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group; its own constant may be given as ``"beta"`` (the constructor's name) or
        ``"momentum"`` (torch.optim's), and is held as ``"momentum"``."""
        if "beta" in param_group:
            if "momentum" in param_group:
                raise ValueError("A parameter group gives both 'beta' and 'momentum'; they name the same constant: "
                                 "give one.")
            beta = _check_number("beta", param_group["beta"], strict=False, high=1.0)
            param_group = {key: value for key, value in param_group.items() if key != "beta"}
            param_group["momentum"] = beta
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        # A state dict saved when the groups held the constant as "beta" loads as "momentum"
        # (SGD's __setstate__ fills keys added since in the same way).
        super().__setstate__(state)
        for group in self.param_groups:
            if "beta" in group:
                group.setdefault("momentum", group.pop("beta"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One momentum step; calls ``closure`` (with grad enabled) first if given."""
        loss = _call_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                velocity = state.get("velocity")
                if velocity is None:
                    velocity = state["velocity"] = p.grad.detach().clone()
                else:
                    velocity.mul_(group["momentum"]).add_(p.grad, alpha=1.0 - group["momentum"])
                p.add_(velocity, alpha=-group["lr"])
        return loss


def _call_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
