"""``fit``: train an ``nn.Module`` by Levenberg-Marquardt or a first-order method, as MATLAB ``train`` does.

The epoch loop records the state (performance, damping, gradient, validation failures), checks
MATLAB's stopping rules in MATLAB's order, and hands the step to a *trainer*:
:class:`LMTrainer` runs the shared LM iteration (:func:`marquardt.solver.lm_step`) on a
:class:`~marquardt.network.ModuleProblem` (wrapped in a
:class:`~marquardt.bayesian.RegularizedProblem` for Bayesian regularization);
:class:`FirstOrderTrainer` runs any :class:`torch.optim.Optimizer`. At the end the model holds
the best weights (the last ones for Bayesian regularization, as MATLAB ``trainbr``).

Trainers work in *training units*: a :class:`~marquardt.mlp.MLP` with normalization trains its
layers on ``mapminmax``-normalized inputs and targets, while the History reports performance
in the original target units, as MATLAB does.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .bayesian import BayesianState, RegularizedProblem, data_gram, initial_state, update_state
from .checkpoint import NO_CHECKPOINT, Checkpointer
from .chunked import DEFAULT_JACOBIAN_BYTES, DEFAULT_MATRIX_BYTES, FORMS, is_small, single_thread
from .damping import DAMPING_FLOOR, DampingState, MarquardtDamping, is_real_number
from .distributed import (LocalReducer, ReducedProblem, Reducer, ShardedCheckpoint, average_gradients, fail_together,
                          global_range, global_scale, make_reducer, require_same, slowest, sum_values,
                          synchronize_module)
from .division import DIVISIONS, check_split, divide
from .history import History
from .losses import Loss, SquaredError, make_loss
from .mlp import MLP
from .network import ModuleProblem, evaluation_mode, flatten_parameters, trainable_parameters, write_parameters
from .optim import GradientDescent, LevenbergMarquardt, Momentum
from .progress import resolve_progress
from .solver import all_finite, lm_step, reject_accepted

__all__ = ["Callback", "fit", "STOP_REASONS"]

STOP_REASONS = {
    "goal": "Performance goal met.",
    "epochs": "Maximum epoch reached.",
    "time": "Maximum time elapsed.",
    "gradient": "Minimum gradient reached.",
    "mu": "Maximum MU reached.",
    "validation": "Validation stop.",
    # Not MATLAB's: its train functions go on with NaN weights. An LM step never gets there (its
    # trials with a non-finite cost are refused), a first-order step or a mini-batch can.
    "nonfinite": "Performance is not finite.",
    "user": "User stop.",
}

_LM_OPTIONS = {"mu": 1e-3, "mu_dec": 0.1, "mu_inc": 10.0, "mu_max": 1e10, "max_jacobian_bytes": DEFAULT_JACOBIAN_BYTES,
                "max_matrix_bytes": DEFAULT_MATRIX_BYTES, "solver": "auto"}
# MATLAB trainbr starts from mu = 0.005; the other defaults are trainlm's.
_DAMPED = {"lm": _LM_OPTIONS, "br": {**_LM_OPTIONS, "mu": 0.005}}
_DEFAULT_MAX_FAIL = 6
# MATLAB trainlm and trainbr floor mu at 1e-20 after an accepted step (``if (mu < 1e-20), mu = 1e-20; end``):
# without it a long run of accepted steps drives mu towards underflow, from which x mu_inc per
# rejection takes hundreds of trials to climb back.
_MU_FLOOR = DAMPING_FLOOR
_FIRST_ORDER = {"gd": (GradientDescent, {"lr": 0.01}), "momentum": (Momentum, {"lr": 0.01, "beta": 0.9})}
# MATLAB's min_grad: 1e-7 for trainlm and trainbr, 1e-5 for traingd and traingdm.
_DEFAULT_MIN_GRAD = 1e-7
_MIN_GRAD = {"gd": 1e-5, "momentum": 1e-5}
# MATLAB's names, named in the error when one is passed: what a trainFcn or trainParam becomes here.
_MATLAB_METHODS = {"trainlm": "lm", "trainbr": "br", "traingd": "gd", "traingdm": "momentum"}
#: MATLAB's division functions by the name ``fit`` takes (``divideind`` is ``validation_data``/``test_data``).
_MATLAB_DIVISIONS = {"dividerand": "random", "divideblock": "block", "divideint": "interleaved",
                     "dividetrain": "none"}
_MATLAB_OPTIONS = {"mc": "beta", "time": "time_limit"}


class Callback:
    """Base class for ``fit`` callbacks; override the hooks you need.

    Raising :class:`StopIteration` in ``on_epoch_end`` stops training with ``"User stop."``.

    Examples
    --------
    >>> class StopBelow(Callback):
    ...     def on_epoch_end(self, history, model):
    ...         if history.last["perf"] < 1e-3:
    ...             raise StopIteration
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> X = torch.linspace(-1, 1, 50, dtype=torch.float64)[:, None]
    >>> model = nn.Linear(1, 1).double()
    >>> history = fit(model, X, 2 * X + 1, callbacks=[StopBelow()])
    >>> history.stop_reason, history.last["perf"] < 1e-3
    ('User stop.', True)
    """

    def on_train_begin(self, history: History, model: nn.Module) -> None:
        """Called once before epoch 0 is recorded."""

    def on_epoch_end(self, history: History, model: nn.Module) -> None:
        """Called after each epoch's record is appended, ``model`` holding that epoch's weights.

        Weights written to ``model`` here are where the next epoch starts, for every method.
        It is called for the last record too. Raising StopIteration ends the run with "User
        stop.", also at an epoch where a stopping rule ends it, as MATLAB tests the user's stop
        before its own rules.
        """

    def on_train_end(self, history: History, model: nn.Module) -> None:
        """Called once after the best weights are restored."""


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    """One data set (training, validation or test) on the model's device and dtype."""

    X: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.X.shape[0]


def _as_tensor(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_complex():  # .to(float) would drop the imaginary part (for y without a warning)
            raise TypeError(f"{name} must be real; received a tensor of dtype {value.dtype}.")
        tensor = value.detach()
    else:
        try:
            array = np.asarray(value)
        except Exception as error:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be an array or tensor; received {type(value).__name__}.") from error
        if array.dtype.kind not in "iufb":
            raise TypeError(f"{name} must be numeric; received dtype {array.dtype}.")
        tensor = torch.as_tensor(array)
    if tensor.ndim == 0:
        raise ValueError(f"{name} must have a samples dimension; received a scalar.")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty; expected at least one sample.")
    source = tensor
    tensor = tensor.to(device=device, dtype=dtype)
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        where = index if len(index) > 1 else index[0]
        value = source[index]
        if not value.is_floating_point() or bool(torch.isfinite(value)):  # finite before the cast
            raise ValueError(f"{name} has values too large for the model's dtype {str(dtype).removeprefix('torch.')}: "
                             f"{float(value):g} at index {where}; scale {name}, or train the model in float64.")
        raise ValueError(f"{name} contains NaN or inf; first bad value at index {where}.")
    return tensor


def _check_class_indices_fit(name: str, y: Any, dtype: torch.dtype) -> None:
    """Refuse integer class indices that ``dtype`` cannot hold exactly, before ``y`` is cast to it
    (a bfloat16 model has 8 bits of mantissa: class 257 would become 256, another class)."""
    if isinstance(y, Tensor):
        integral, empty = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool), y.numel() == 0
        real = not y.is_complex()
    else:
        y = np.asarray(y)
        integral, empty = np.issubdtype(y.dtype, np.integer), y.size == 0
        real = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
    if empty or not real:
        return
    exact = 2.0 / torch.finfo(dtype).eps  # every integer up to this is exact in dtype
    largest = float(y.max())
    # Class indices held as floats (MATLAB's labels are doubles) are rounded the same way; a
    # float y past ``exact`` that is not whole is no class index and is left to the loss.
    if largest > exact and (integral or float(largest).is_integer()):
        raise ValueError(f"Invalid {name}: class index {int(largest)} cannot be held exactly by the model's dtype "
                         f"{str(dtype).removeprefix('torch.')} (exact up to {int(exact)}); train the model in "
                         "float32 or float64.")


def _prepare(model: nn.Module, X: Any, y: Any, names: tuple[str, str], loss: Loss) -> Split:
    reference = next(model.parameters(), None)
    if reference is None:
        raise ValueError("model has no parameters to train.")
    if not trainable_parameters(model):
        raise ValueError("model has no parameters to train: every parameter has requires_grad=False "
                         "(frozen); unfreeze those to train with model.requires_grad_(True) or p.requires_grad_().")
    X_t = _as_tensor(names[0], X, reference.dtype, reference.device)
    if loss.classification:
        _check_class_indices_fit(names[1], y, reference.dtype)
    y_t = _as_tensor(names[1], y, reference.dtype, reference.device)
    if X_t.shape[0] != y_t.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} have different numbers of samples: "
                         f"{X_t.shape[0]} and {y_t.shape[0]}.")
    try:
        with torch.no_grad(), evaluation_mode(model):
            probe = model(X_t[:2])
    except (RuntimeError, ValueError) as error:  # a layer that does not fit X's shape
        raise ValueError(f"The model cannot take {names[0]} of shape {tuple(X_t.shape)} (samples first): "
                         f"{error}") from error
    _check_model_output(probe)
    if loss.classification:
        _check_logits(model, probe, loss)
    return Split(X_t, loss.targets(y_t, tuple(probe.shape), names[1]))


#: Output modules that turn logits into probabilities: the classification losses apply the
#: softmax or sigmoid themselves, so a model ending in one applies it twice.
_PROBABILITY_OUTPUTS = (nn.Softmax, nn.Sigmoid, nn.Softmin)


def _check_logits(model: nn.Module, probe: Tensor, loss: Loss) -> None:
    """A ValueError, before any work, where the model outputs probabilities instead of logits.

    ``cross_entropy`` and ``binary_cross_entropy`` take logits and apply the softmax or sigmoid
    themselves (as ``torch.nn.CrossEntropyLoss`` does). A MATLAB ``patternnet`` ends in a softmax
    layer, and a model built like it was trained silently and wrongly: with a final ``nn.Sigmoid``
    and ``binary_cross_entropy`` the accuracy stayed at the class-1 fraction, with a final
    ``nn.Softmax`` and ``cross_entropy`` it stalled at 81% where the logit model reaches 100%.
    Refused: a last module (of nested ``nn.Sequential``) that is a softmax or sigmoid, and for
    ``cross_entropy`` probe rows that are all probabilities summing to one. ``nn.LogSoftmax`` is
    accepted: the softmax of its outputs is that of its inputs.
    """
    last = model
    while isinstance(last, nn.Sequential) and len(last):
        last = last[-1]
    if isinstance(last, _PROBABILITY_OUTPUTS):
        found = f"its last module is {type(last).__name__}"
    elif loss.name == "cross_entropy" and probe.ndim == 2 and probe.shape[1] > 1 and bool(torch.isfinite(probe).all()) \
            and bool(((probe >= 0) & (probe <= 1)).all()) \
            and bool(((probe.double().sum(1) - 1).abs() <= 1e-4).all()):
        found = "its outputs are rows of probabilities summing to 1"
    else:
        return
    raise ValueError(f"Invalid model for loss={loss.name!r}: {found}. The loss takes logits and applies the "
                     f"{'sigmoid' if loss.name == 'binary_cross_entropy' else 'softmax'} itself (as "
                     "torch.nn.CrossEntropyLoss does); remove the final softmax/sigmoid layer and apply it to "
                     "model(X) when you need probabilities.")


def _check_model_output(outputs: Any) -> None:
    """Refuse outputs other than one real floating tensor (a tuple, a dict, complex values), which
    training would otherwise meet as an AttributeError or a torch error deep in the first epoch."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"model(X) must return one tensor of outputs; received {type(outputs).__name__}. Wrap the "
                        "model so that forward returns the tensor to fit (e.g. the first element of a tuple).")
    if not outputs.is_floating_point():
        raise TypeError(f"model(X) must return real floating-point outputs; received dtype {outputs.dtype} (split "
                        "complex outputs into real and imaginary parts, torch.view_as_real).")


def _divide_data(data: Split, validation_data: Any, test_data: Any, division: str | None, split: tuple,
                 generator: torch.Generator, model: nn.Module, loss: Loss
                 ) -> tuple[Split, Split | None, Split | None, tuple[Tensor, ...] | None]:
    """The training, validation and test sets, and the rows of ``data`` each holds where
    ``division`` divided it (MATLAB's ``trainInd``, ``valInd``, ``testInd``), else None."""
    if validation_data is not None or test_data is not None or division is None or division == "none":
        given = [None if pair is None else _given_split(model, pair, name, loss)
                 for pair, name in ((validation_data, "validation_data"), (test_data, "test_data"))]
        return data, given[0], given[1], None
    train, val, test = divide(len(data), division, split, generator)
    pick = lambda index: Split(data.X[index], data.y[index]) if len(index) else None  # noqa: E731
    if len(train) == 0:
        raise ValueError(f"split {split} leaves no training samples out of {len(data)}.")
    return pick(train), pick(val), pick(test), (train, val, test)


def _given_split(model: nn.Module, pair: Any, name: str, loss: Loss) -> Split:
    """``validation_data`` or ``test_data``, checked as ``X, y`` are."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{name} must be a pair (X, y); received {type(pair).__name__}.")
    suffix = "val" if name == "validation_data" else "test"
    return _prepare(model, *pair, (f"X_{suffix}", f"y_{suffix}"), loss)


def mse(model: nn.Module, data: Split | None, chunk: int = 65536) -> float:
    """Mean squared error over all target elements (MATLAB's ``mse``); NaN when ``data`` is None."""
    return evaluate(model, data, SquaredError(), chunk)[0]


def evaluate(model: nn.Module, data: Split | None, loss: Loss, chunk: int = 65536, *,
             reducer: Reducer | None = None) -> tuple[float, float]:
    """``(performance, accuracy)`` of ``model`` on ``data``; NaN for what does not apply.

    Performance is the loss's mean (mean squared error, mean cross-entropy); accuracy is the
    fraction of correct predictions for classification losses. With a ``reducer`` of several
    ranks, both are over the samples of all ranks (every rank holding a shard of ``data``).
    """
    if data is None:
        return math.nan, math.nan
    cost, correct = 0.0, 0.0
    # Eval mode: the record reads the model, and must not feed the validation and test sets to
    # BatchNorm's running statistics or score a random dropout mask.
    with torch.no_grad(), evaluation_mode(model):
        for start in range(0, len(data), chunk):
            outputs, targets = model(data.X[start : start + chunk]), data.y[start : start + chunk]
            cost += float(loss.cost(outputs, targets))
            correct += float(loss.correct(outputs, targets))
    if reducer is not None and reducer.world_size > 1:
        # perf_scale is c / count for every loss: the counts c / perf_scale add over the ranks.
        cost, correct, count, predictions = sum_values(
            (cost, correct, 1.0 / loss.perf_scale(data.y), loss.predictions(data.y)), reducer)
        return cost / count, correct / predictions
    return cost * loss.perf_scale(data.y), correct / loss.predictions(data.y)


# ---------------------------------------------------------------------------------------------
# training units


def _normalization_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of an MLP's ``mapminmax`` buffers while its ranges are unset (what
    :func:`_set_normalization` is about to change), else nothing."""
    if not (isinstance(model, MLP) and model.normalize and not model.normalization_set):
        return {}
    return {name: buffer.clone() for name, buffer in model.named_buffers()
            if name.endswith(("_min", "_max")) or name == "stats_set"}


def _restore_buffers(model: nn.Module, saved: dict[str, Tensor]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)


def _set_normalization(model: nn.Module, data: Split, loss: Loss, reducer: Reducer) -> None:
    """MATLAB's ``configure``: an MLP with unset ``mapminmax`` ranges takes them from the data (of all ranks)."""
    if isinstance(model, MLP) and model.normalize and not model.normalization_set:
        if reducer.world_size > 1:
            data = Split(global_range(data.X, reducer), data.y if loss.classification else global_range(data.y, reducer))
        # Classifier outputs are logits: their map stays the identity.
        model.set_normalization(data.X, None if loss.classification else data.y)


@contextmanager
def _configured(model: nn.Module, data: Split, loss: Loss, reducer: Reducer, history: History) -> Iterator[None]:
    """:func:`_set_normalization` for a call that may still be refused: when the block raises
    before ``history`` holds a record (an option the trainer's problem refuses, another run's
    checkpoint, a non-finite start), nothing was trained and the ranges are unset again."""
    unset = _normalization_buffers(model)
    _set_normalization(model, data, loss, reducer)
    try:
        yield
    except BaseException:
        if not history.records:
            _restore_buffers(model, unset)
        raise


def _training_view(model: nn.Module, loss: Loss) -> tuple[nn.Module, Callable[[Split], Split]]:
    """The module the trainer updates and the map from data to its (training) units.

    A normalized MLP trains its layers on normalized inputs and targets, so that ``J^T J`` and
    the absolute damping ``mu`` do not depend on the data's units; other models train as they are.
    """
    if not (isinstance(model, MLP) and model.normalize and model.normalization_set):
        return model, lambda split: split
    if loss.classification and not (bool((model.y_min == -1).all()) and bool((model.y_max == 1).all())):
        return model, lambda split: split  # logits mapped by target ranges: train through them

    def convert(split: Split) -> Split:
        with torch.no_grad():
            targets = split.y if loss.classification else model.normalize_targets(split.y)
            return Split(model.normalize_inputs(split.X), targets)

    return model.net, convert


# ---------------------------------------------------------------------------------------------
# trainers: one epoch's step for each family of methods


@dataclass
class LMTrainer:
    """MATLAB ``trainlm``: damped Gauss-Newton steps on the training set, ``mu`` x10 / x0.1.

    With ``bayesian=True``, MATLAB ``trainbr``: the steps minimise ``F = beta E_D + alpha E_W``
    and ``alpha``, ``beta`` are re-estimated after each accepted step (:mod:`marquardt.bayesian`).
    """

    model: nn.Module
    data: Split
    options: dict[str, Any]
    loss: Loss = field(default_factory=SquaredError)
    batches: list[tuple[Tensor, Tensor]] | None = None
    bayesian: bool = False
    reducer: Reducer = field(default_factory=LocalReducer)
    state: DampingState = field(init=False)
    solver: str = field(default="", init=False)
    holds_weights: bool = field(default=False, init=False)
    started: bool = field(default=False, init=False)  # the start was checked (_check_finite_start)

    def __post_init__(self) -> None:
        o = self.options
        self.rule = MarquardtDamping(o["mu"], o["mu_dec"], o["mu_inc"], o["mu_max"])
        self.state = self.rule.init(1.0)
        # Over the samples of all ranks (the data itself when training alone).
        self.perf_scale = global_scale(self.loss.perf_scale(self.data.y), self.reducer)
        self.n_errors = int(sum_values([self.data.y.numel()], self.reducer)[0])
        self.problem = self._problem(self.data.X, self.data.y)
        self.x = flatten_parameters(self.model)
        # Written every epoch: the list saves a walk over the modules each time. The problem
        # already fixed which parameters train; load_state_dict (best weights) copies in place.
        self._parameters = [p for _, p in trainable_parameters(self.model)]
        self._trained = _trained_layout(self.model)  # what the problem was built for
        self.lin = None
        self.regularization: BayesianState | None = None
        self.accepted = False
        # (point, damping state) to go back to when the point the last step accepted cannot be
        # linearized (_refuse_untrainable_points); None once that point is verified.
        self._fallback: tuple[Tensor, DampingState] | None = None
        # With mini-batches, the point and damping an epoch starts from, when its gradient is finite.
        self._epoch_start: tuple[Tensor, DampingState] | None = None
        self._scale: tuple[float, Tensor] | None = None  # (units, D) of _damping_scale

    def _problem(self, X: Tensor, y: Tensor) -> ModuleProblem | ReducedProblem:
        problem = ModuleProblem(self.model, X, y, self.options["max_jacobian_bytes"], self.loss,
                                solver=self.options["solver"], max_matrix_bytes=self.options["max_matrix_bytes"])
        return ReducedProblem(problem, self.reducer) if self.reducer.world_size > 1 else problem

    @property
    def damping(self) -> float:
        return self.state.damping

    @property
    def exhausted(self) -> bool:
        # MATLAB stops when mu >= mu_max, checked before the step.
        return self.state.damping >= self.rule.maximum

    def evaluate(self) -> float:
        """Gradient norm of the training performance at the current weights (prepares the next step).

        For Bayesian regularization this is the gradient of the data term, as MATLAB reports it.
        The point the last step accepted is verified here (:meth:`_refuse_untrainable_points`).
        """
        if self.batches is not None:
            return self._evaluate_batches()
        self._linearize()
        if not self.started:
            # The linearization sums its cost as the trials do (ModuleProblem.cost_dtype).
            _check_finite_start(self.lin.cost, self.x.dtype)
            self.started = True
        gradient = self._settle()
        if self.bayesian:
            self._estimate_regularization()
        return self.perf_scale * gradient

    def _linearize(self) -> None:
        if self.lin is not None and hasattr(self.problem, "recycle"):
            self.problem.recycle(self.lin)  # its n x n buffers serve the next one
            self.lin = None
        self.lin = self.problem.linearize(self.x)

    def _settle(self) -> float:
        """Refuse the point the last step accepted when its linearization is not finite, as
        :func:`~marquardt.least_squares` does (``sqrt`` or ``log`` at the edge of their domain, a
        derivative that overflows): the step becomes one more failed trial of its epoch.
        Returns ``||J^T e||`` at the point kept.

        Its cost fell, but no step can be taken from it (a NaN ``J^T e`` makes every trial
        NaN: ``mu`` climbed to ``mu_max`` and ``trainbr``'s ``gamma`` failed in ``eigvalsh``).
        The weights go back to the previous point, ``mu`` rises from the value the step was
        computed with, as for any failed trial, and the epoch's trials go on from there, as in
        ``trainlm``'s inner loop: the epoch's record shows the point finally accepted, or the
        previous point with ``mu`` at ``mu_max``. Re-linearizing the previous point costs a
        Jacobian, in trouble only; holding its linearization instead would double the memory of
        every epoch.
        """
        gradient, refused = _norm(self.lin.grad), False
        while self._fallback is not None and not self._trainable(self.lin, gradient):
            self.x, self.state = self._fallback
            self._fallback, self.accepted, refused = None, False, True
            self._linearize()
            if not self.exhausted:
                self._lm_iteration(self.problem, self.lin, self.perf_scale)
                if self._fallback is not None:
                    self._linearize()
            gradient = _norm(self.lin.grad)
        self._fallback = None
        if refused and not self.holds_weights:
            write_parameters(self.model, self.x, self._parameters)
        return gradient

    def _trainable(self, lin: Any, gradient: float | None = None) -> bool:
        """Whether training can go on from ``lin``: ``J^T e`` finite (a NaN or inf in ``J`` makes it
        NaN, as ``0 * nan`` is NaN; a finite ``gradient``, its norm, says so at no cost), and for
        ``trainbr`` the diagonal of the ``J^T J`` whose eigenvalues give ``gamma``. The other
        systems' diagonals are not read: matrix-free and closed-form sample-space systems would
        compute theirs for this alone.

        A point with no error at all is kept for ``trainlm``: it is a minimum, and the goal test
        stops there (a ``sqrt`` network fitting zeros exactly has a NaN ``J`` where it does).
        """
        if (gradient is not None and math.isfinite(gradient)) or all_finite(lin.grad):
            return not self.bayesian or all_finite(lin.system.diagonal())
        return lin.cost == 0.0 and not self.bayesian

    def _evaluate_batches(self) -> float:
        """:meth:`evaluate` with mini-batches: the gradient of the whole training set, which also
        verifies where the epoch's steps went (a NaN in ``J`` gives a NaN gradient). When it is
        not finite there, and was where the epoch started, the epoch's steps are refused as one
        failed trial: the weights go back to the epoch's start and ``mu`` rises."""
        if not self.started:  # the steps linearize batches only: the whole set's cost, as a trial sums it
            _check_finite_start(self.problem.cost(self.x), self.x.dtype)
            self.started = True
        gradient = _gradient_norm(self.model, self.data, self.loss)
        if self._fallback is not None and not math.isfinite(gradient):
            self.x, self.state = self._fallback
            self.accepted = False
            write_parameters(self.model, self.x, self._parameters)
            gradient = _gradient_norm(self.model, self.data, self.loss)
        self._fallback = None
        self._epoch_start = (self.x, self.state) if math.isfinite(gradient) else None
        return gradient

    def training_perf(self) -> float | None:
        """The training performance at the current weights when the linearization already has it.

        ``lin.cost`` is the data cost ``0.5 * sum(r**2)`` at these weights, so the epoch record
        needs no extra forward pass; ``None`` when it is not the reported quantity (mini-batches,
        classification accuracy wanted, a module trained in normalized units).
        """
        if self.lin is None or self.batches is not None or self.loss.classification:
            return None
        return self.perf_scale * self.lin.cost

    def _estimate_regularization(self) -> None:
        sse, ssw, n_errors = 2.0 * self.lin.cost, float(self.x @ self.x), self.n_errors
        if self.regularization is None:
            self.regularization = initial_state(self.x.numel(), n_errors, sse, ssw)
        elif self.accepted:
            # After a failed iteration (mu past mu_max) MATLAB keeps alpha and beta.
            self.regularization = update_state(self.regularization, data_gram(self.lin.system), sse, ssw, n_errors)

    def extras(self) -> dict[str, float]:
        """Per-epoch record entries beyond the standard ones: ``gamma`` and ``ssw`` for ``trainbr``."""
        if self.regularization is None:
            return {}
        return {"gamma": self.regularization.gamma, "ssw": self.regularization.ssw}

    def step(self) -> None:
        if self.batches is None:
            self._lm_iteration(self.problem, self.lin, self.perf_scale)
        else:
            self._step_batches()
        if not self.holds_weights:
            write_parameters(self.model, self.x, self._parameters)

    def _step_batches(self) -> None:
        """One LM iteration per batch, the damping carried from one to the next.

        A batch that cannot be linearized where the previous batch's step went refuses that
        step, as :meth:`_refuse_untrainable_points` does for a whole training set. The last
        step is verified by the next epoch's gradient of the whole training set
        (:meth:`_evaluate_batches`), which sees the samples of every batch: a point verified
        by one batch's ``J`` may still have a NaN ``J`` on another's.
        """
        start = self._epoch_start
        for X_b, y_b in self.batches:
            problem = self._problem(X_b, y_b)
            lin = problem.linearize(self.x)
            if self._fallback is not None and not self._trainable(lin):
                self.x, self.state = self._fallback
                self._fallback, self.accepted = None, False
                if self.exhausted:
                    break
                lin = problem.linearize(self.x)
            self._fallback = None
            self._lm_iteration(problem, lin, self.loss.perf_scale(y_b))
            if self.exhausted:
                break
        # The epoch's steps as one: refused together when the whole training set's gradient is
        # not finite where they end. (The points are never changed in place: identity says moved.)
        moved = start is not None and self.x is not start[0]
        self._fallback = (start[0], reject_accepted(self.rule, start[1])) if moved else None

    def hold_weights(self) -> bool:
        """Keep the weights in the trainer's own vector, not written to the module after each
        step, where the epoch record needs no forward pass of the module (full batch, the
        training performance from the linearization): whether it now does. ``fit`` asks this
        when nothing else reads the module during training, and calls :meth:`release_weights`
        at the end. On the 1-20-1 benchmark network this, with the best weights kept as the
        flat vector (:meth:`snapshot`), saved ~45 us of a ~700 us epoch: the write and the
        ``state_dict`` copy after each improving epoch.
        """
        self.holds_weights = self.batches is None and not self.loss.classification
        return self.holds_weights

    def release_weights(self) -> None:
        """Write the held weights to the module and write after each step again."""
        self.holds_weights = False
        write_parameters(self.model, self.x, self._parameters)

    def snapshot(self) -> Tensor:
        """A copy of the current weights as the trainer's flat vector (for :meth:`restore`)."""
        return self.x.clone()

    def restore(self, point: Tensor) -> None:
        """Set the weights to a :meth:`snapshot` and write them to the module."""
        self.x = point.clone()
        write_parameters(self.model, self.x, self._parameters)

    def _lm_iteration(self, problem: Any, lin: Any, perf_scale: float) -> None:
        if self.regularization is not None:
            problem = RegularizedProblem(problem, self.regularization.alpha, self.regularization.beta)
            lin = problem.regularize(lin, self.x)
        scale = self._damping_scale(_damping_units(perf_scale, self.bayesian))
        # MATLAB's rule reads no gain ratio: the trials skip the model's predicted reduction.
        out = lm_step(problem, self.x, lin, scale, self.rule, self.state, predict=False)
        self.solver = lin.system.path
        self.state = out.state
        if out.accepted and out.state.damping < _MU_FLOOR:
            self.state = DampingState(_MU_FLOOR, out.state.nu)
        if out.accepted:
            # Where to go back to if the new point cannot be linearized: the rejection of the
            # state the step was computed with (solver.reject_accepted), not of the lower
            # one after the acceptance, which would propose the same step again.
            self._fallback = (self.x, reject_accepted(self.rule, out.trial_state))
        self.x = out.x
        self.accepted = out.accepted

    def _damping_scale(self, units: float) -> Tensor:
        """The damping scale ``D = units * I`` as a vector like ``self.x``: the last one again while
        it still fits (the solver reads it at every trial and never writes it; a small system
        checks a scale tensor once, :class:`~marquardt.chunked.AccumulatedNormalEquations`)."""
        held = self._scale
        if held is None or held[0] != units or held[1].shape != self.x.shape or held[1].dtype != self.x.dtype \
                or held[1].device != self.x.device:
            held = self._scale = (units, torch.full_like(self.x, units))
        return held[1]

    def sync_from_model(self) -> None:
        self.x = flatten_parameters(self.model)
        self._parameters = [p for _, p in trainable_parameters(self.model)]

    def resume_from_model(self) -> None:
        """Continue from the module as a checkpoint left it (:mod:`marquardt.checkpoint`): its
        weights, and the parameters that train there, which a callback of the checkpointed run
        may have frozen or unfrozen; a problem for that set when this trainer was built for
        another (the fresh model's), as :meth:`adopt_module_weights` makes one mid-run."""
        if _trained_layout(self.model) != self._trained:
            self._retrain()
        else:
            self.sync_from_model()
        self.started = True  # the run's initial weights were checked when it started

    def resume_state(self) -> dict[str, Tensor]:
        """What a checkpoint needs of the weights beyond the module's: ``{"x": ...}``, the vector
        this trainer steps, where the module holds it rounded (a float32 network stepped in
        float64, :meth:`~marquardt.network.ModuleProblem._working_dtype`) or not at all
        (:meth:`hold_weights`); and after an accepted step, the point and damping to go back to
        should the next evaluation refuse it (``fallback_x``, ``fallback_damping``: ``[mu, nu]``).
        The tensors are the trainer's own, not copies."""
        tensors = {}
        if self.holds_weights or any(p.dtype != self.x.dtype for p in self._parameters):
            tensors["x"] = self.x
        if self._fallback is not None:
            point, state = self._fallback
            tensors["fallback_x"] = point
            tensors["fallback_damping"] = torch.tensor([state.damping, state.nu], dtype=torch.float64)
        return tensors

    def load_resume_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Continue from a :meth:`resume_state`, after :meth:`resume_from_model`. Without ``"x"``
        (the module held the weights, or the checkpoint predates the key) the module's stand;
        without ``"fallback_x"`` the point is taken as verified, as before the key existed."""
        if "x" in tensors:
            self.x = tensors["x"].to(self.x.device)
        if "fallback_x" in tensors:
            damping, nu = tensors["fallback_damping"].tolist()
            self._fallback = (tensors["fallback_x"].to(self.x.device), DampingState(damping, nu))

    def adopt_module_weights(self) -> None:
        """Continue from weights a callback wrote to the module, if it wrote any, and from the
        parameters that train now, if it froze or unfroze some.

        The next step starts from ``self.x`` and the linearization made before the callbacks
        ran, and writes its result over the module: without this, a callback's change was
        silently undone (a first-order optimizer reads the module itself and needs nothing).
        ``alpha`` and ``beta`` of ``trainbr`` are kept: they are re-estimated after accepted steps.
        """
        if _trained_layout(self.model) != self._trained:
            self._retrain()
        else:
            x = flatten_parameters(self.model)
            # The trainer may step in a wider dtype than the module's (float64 for a float32 model):
            # the module then holds self.x rounded, which is no change.
            if torch.equal(x, self.x.to(x.dtype)):
                return
            self.x = x.to(self.x.dtype)
            self._parameters = [p for _, p in trainable_parameters(self.model)]
        self._epoch_start = None  # the callback's weights are not a verified point to go back to
        if self.batches is None:  # mini-batches linearize each batch at self.x when they step
            self.accepted = False
            self.evaluate()

    def _retrain(self) -> None:
        """A problem for the parameters that require grad now (a callback froze a layer, as in
        fine-tuning): training goes on over them, as a first-order optimizer's steps skip frozen
        parameters. The damping carries over; the linearization and the damping scale, which
        had the old set's size, are made afresh."""
        named = trainable_parameters(self.model)
        if not named:
            raise ValueError("A callback froze every parameter of the model (requires_grad=False): nothing is "
                             "left to train; raise StopIteration in on_epoch_end to stop training instead.")
        if self.bayesian:  # gamma needs the dense J^T J of the new set
            _check_bayesian_form("br", self.options, self.model)
        self.problem = self._problem(self.data.X, self.data.y)
        self.x = flatten_parameters(self.model).to(self.x.dtype)
        self._parameters = [p for _, p in named]
        self._trained = _trained_layout(self.model)
        self.lin, self._scale = None, None  # not recycled: its buffers are the old set's size
        self._fallback, self._epoch_start = None, None  # points of the old set's size


def _trained_layout(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """The names and shapes of the parameters that train, in order: a :class:`LMTrainer`'s problem
    is built for one such layout."""
    return [(name, p.shape) for name, p in trainable_parameters(model)]


@dataclass
class FirstOrderTrainer:
    """Backpropagation with any :class:`torch.optim.Optimizer` on the training performance."""

    model: nn.Module
    data: Split
    optimizer: torch.optim.Optimizer
    loss: Loss = field(default_factory=SquaredError)
    batches: list[tuple[Tensor, Tensor]] | None = None
    solver: str = "backprop"
    exhausted: bool = False
    reducer: Reducer = field(default_factory=LocalReducer)
    started: bool = field(default=False, init=False)  # the start was checked (_check_finite_start)

    def __post_init__(self) -> None:
        # This rank's share of the samples: the weight of its mean-loss gradient in the global one.
        local = self.loss.perf_scale(self.data.y)
        self.share = global_scale(local, self.reducer) / local

    @property
    def damping(self) -> float:
        return math.nan

    def evaluate(self) -> float:
        if not self.started:
            self._check_start()
            self.started = True
        return _gradient_norm(self.model, self.data, self.loss, self.reducer, self.share)

    def _check_start(self) -> None:
        """The ValueError of a non-finite start, as LM's: the optimizer would step on NaN
        gradients for every epoch. Each rank checks its own shard, with no collective: one that
        refuses stops the others with a DistributedError naming its error (``fail_together``)."""
        with torch.no_grad(), evaluation_mode(self.model):
            cost = float(self.loss.criterion(self.model(self.data.X), self.data.y))
        _check_finite_start(cost, self.data.X.dtype)

    def extras(self) -> dict[str, float]:
        return {}

    def step(self) -> None:
        for X_b, y_b in self.batches or [(self.data.X, self.data.y)]:
            # Through a closure, which every torch optimizer takes and LBFGS requires (it
            # re-evaluates the loss in its inner iterations); the others call it once, first.
            self.optimizer.step(functools.partial(self._loss_and_gradient, X_b, y_b))

    def _loss_and_gradient(self, X_b: Tensor, y_b: Tensor) -> Tensor:
        """The closure: the loss and gradient of all ranks' samples (of this batch).

        LBFGS reads the loss (tolerance_change, the strong-Wolfe line search); this rank's own
        loss sent the ranks through different inner iterations. The loss rides in the gradient
        reduction, so optimizers that ignore it pay one number, not a collective.
        """
        self.optimizer.zero_grad()
        loss = self.loss.criterion(self.model(X_b), y_b)
        loss.backward()
        if self.reducer.world_size == 1:
            return loss
        return average_gradients(self.model.parameters(), self.reducer, self.share, loss=loss)

    def sync_from_model(self) -> None:
        pass

    def resume_from_model(self) -> None:
        """Nothing to rebuild: the optimizer holds every parameter and steps those that require grad."""
        self.started = True  # the run's initial weights were checked when it started


def _damping_units(perf_scale: float, bayesian: bool) -> float:
    """``D`` in ``(J^T J + mu D) h = -J^T r`` that makes ``mu`` MATLAB's: ``2 / perf_scale``, the
    number of errors ``N`` for the mean squared error.

    ``trainlm`` (R2012b on, ``nnCalcLib.perfsJEJJ`` with ``perfNorm``) divides ``J^T J`` and
    ``J^T e`` by ``N`` for a normalized performance and solves ``(J^T J / N + mu I) dx = -J^T e / N``,
    which is ``(J^T J + N mu I) dx = -J^T e``: the same ``mu = 1e-3`` is ``N`` times stronger
    than on the raw ``J^T J``. In general ``J^T J / N`` is half the Gauss-Newton Hessian of the
    performance, ``perf_scale * J^T J / 2``. ``trainbr``'s system carries its scale in ``alpha``
    and ``beta`` (the ``1 / N`` cancels there): ``D = I``.
    """
    return 1.0 if bayesian else 2.0 / perf_scale


def _check_finite_start(cost: float, dtype: torch.dtype) -> None:
    """A ValueError before the first step when the training cost at the starting weights is not
    finite, for every method: no LM trial can lower it (the run ended on "Maximum MU reached"
    after raising the damping to its maximum one trial at a time), and a first-order step from
    it is NaN. ``cost`` is the one the steps compare: for LM the sum of squares as each trial sums
    it, in :attr:`~marquardt.network.ModuleProblem.cost_dtype` (float64 for a small float32 problem,
    else its own dtype, where a sum of residuals of 1e19 overflows). A finite cost with a non-finite Jacobian (``sqrt`` at
    0) is numerical trouble of the kind training handles: its steps are refused and the weights
    kept."""
    if math.isfinite(cost):
        return
    raise ValueError(
        f"The training cost at the initial weights is not finite ({cost}): model(X) gives NaN or inf, or "
        f"the sum of squared errors overflows {str(dtype).removeprefix('torch.')}. Training needs a finite "
        "start: check the initial weights, and scale X and y (an MLP's mapminmax does) or train in float64.")


def _norm(vector: Tensor) -> float:
    """``||vector||``, in float64 where the vector's own dtype overflows (float32 from entries of
    about 1e19): a finite gradient was recorded as inf."""
    norm = float(torch.linalg.vector_norm(vector))
    if math.isinf(norm) and vector.dtype != torch.float64:
        norm = float(torch.linalg.vector_norm(vector, dtype=torch.float64))
    return norm


def _gradient_norm(model: nn.Module, data: Split, loss: Loss, reducer: Reducer | None = None,
                   share: float = 1.0) -> float:
    model.zero_grad()
    with torch.enable_grad(), evaluation_mode(model):  # as evaluate() reads the performance
        loss.criterion(model(data.X), data.y).backward()
    if reducer is not None:
        average_gradients(model.parameters(), reducer, share)
    norms = [p.grad.detach().reshape(-1) for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return _norm(torch.cat(norms)) if norms else 0.0


def _split_options(method: Any, options: dict[str, Any]) -> tuple[str, Any]:
    if isinstance(method, str) and method in _DAMPED:
        defaults = _DAMPED[method]
        _check_known_options(method, options, defaults)
        merged = {**defaults, **options}
        _check_damping_options(merged)
        merged.update({name: float(merged[name]) for name in ("mu", "mu_dec", "mu_inc", "mu_max")})
        MarquardtDamping(merged["mu"], merged["mu_dec"], merged["mu_inc"], merged["mu_max"])
        if merged["solver"] not in ("auto",) + FORMS:
            raise ValueError(f"Invalid solver: {merged['solver']!r}; expected 'auto' or one of {FORMS}.")
        return method, merged
    if isinstance(method, str) and method in _FIRST_ORDER:
        cls, defaults = _FIRST_ORDER[method]
        _check_known_options(method, options, defaults)
        return method, (cls, {**defaults, **options})
    if inspect.isclass(method) and issubclass(method, LevenbergMarquardt):
        raise ValueError("Invalid method: marquardt.LevenbergMarquardt, an optimizer driven by a closure of "
                         "residuals; fit runs Levenberg-Marquardt itself: pass method='lm' (or 'br').")
    if inspect.isclass(method) and issubclass(method, torch.optim.Optimizer):
        return method.__name__.lower(), (method, dict(options))
    matlab = _MATLAB_METHODS.get(method) if isinstance(method, str) else None
    hint = f" (MATLAB's {method!r} is method={matlab!r})" if matlab else ""
    raise ValueError(f"Invalid method: {method!r}; expected 'lm', 'br', 'gd', 'momentum' or a torch.optim.Optimizer "
                     f"class{hint}.")


def _check_known_options(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        renamed = [f"MATLAB's {name!r} is {_MATLAB_OPTIONS[name]!r}" for name in unknown if name in _MATLAB_OPTIONS]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise TypeError(f"Unknown option(s) for method={method!r}: {unknown}; expected {sorted(defaults)}{hint}.")


def _check_damping_options(options: dict[str, Any]) -> None:
    # Checked here under MATLAB's names, the ones the caller passed (the damping rule says "damping").
    checks = [
        ("mu", lambda v: v > 0, "a finite number > 0"),
        ("mu_dec", lambda v: 0 < v < 1, "a number with 0 < mu_dec < 1"),
        ("mu_inc", lambda v: v > 1, "a finite number > 1"),
        ("mu_max", lambda v: v > 0, "a finite number > 0"),
    ]
    for name, ok, expected in checks:
        value = options[name]
        if not (is_real_number(value) and math.isfinite(value) and ok(value)):
            raise ValueError(f"Invalid {name} value: {value!r}; expected {expected}.")
    for name in ("max_jacobian_bytes", "max_matrix_bytes"):
        budget = options[name]
        if not (_is_integer(budget) and budget >= 1):
            raise ValueError(f"Invalid {name} value: {budget!r}; expected an integer >= 1 (bytes).")


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_optimizer_options(kind: str, spec: Any, model: nn.Module) -> None:
    """Build a first-order method's optimizer once, so that a bad option (``lr=-1``, an unknown
    keyword) raises before training starts; constructing it changes no parameter."""
    if kind not in _DAMPED:
        cls, options = spec
        cls(model.parameters(), **options)


def _check_bayesian_form(kind: str, spec: Any, model: nn.Module) -> None:
    """``trainbr``'s ``gamma`` needs the eigenvalues of the dense ``n x n`` ``J^T J``: refuse the
    matrix-free form, and a matrix past ``max_matrix_bytes`` (where ``"auto"`` goes matrix-free),
    before any work rather than failing at the first epoch."""
    if kind != "br":
        return
    if spec["solver"] == "matrix-free":
        raise ValueError("Invalid solver for method='br': 'matrix-free'; Bayesian regularization needs the dense "
                         "n x n J^T J (gamma comes from its eigenvalues): pass solver='auto', 'normal' or "
                         "'sample-space'.")
    parameters = [p for _, p in trainable_parameters(model)]
    n_params = sum(p.numel() for p in parameters)
    needed = n_params ** 2 * (parameters[0].element_size() if parameters else 8)
    if needed > spec["max_matrix_bytes"]:
        raise ValueError(f"method='br' needs the {n_params} x {n_params} matrix J^T J ({needed:,} bytes) for gamma, "
                         f"more than max_matrix_bytes={spec['max_matrix_bytes']}; pass a larger max_matrix_bytes "
                         "if the memory is there, or train with method='lm' and early stopping (division='random').")


def _make_trainer(kind: str, spec: Any, module: nn.Module, data: Split, loss: Loss,
                  batches, reducer: Reducer) -> LMTrainer | FirstOrderTrainer:
    if kind in _DAMPED:
        return LMTrainer(module, data, spec, loss, batches, bayesian=kind == "br", reducer=reducer)
    cls, options = spec
    return FirstOrderTrainer(module, data, cls(module.parameters(), **options), loss, batches, reducer=reducer)


def _make_batches(data: Split, batch_size: int | None, generator: torch.Generator) -> list[tuple[Tensor, Tensor]] | None:
    if batch_size is None or batch_size >= len(data):
        return None
    order = torch.randperm(len(data), generator=generator).to(data.X.device)
    return [(data.X[idx], data.y[idx]) for idx in torch.split(order, batch_size)]


# ---------------------------------------------------------------------------------------------
# the epoch loop


@dataclass
class _Best:
    """The best performance so far, its epoch and its weights: the module's ``state_dict``, or,
    while the LM trainer holds the weights (:meth:`LMTrainer.hold_weights`), its flat vector."""

    perf: float = math.inf
    epoch: int = 0
    weights: dict[str, Tensor] | None = None
    point: Tensor | None = None

    def offer(self, value: float, epoch: int, model: nn.Module, keep_weights: bool = True,
              snapshot: Callable[[], Tensor] | None = None) -> bool:
        if value < self.perf:
            self.perf = value
            if keep_weights:
                self.keep(epoch, model, snapshot)
            else:
                self.epoch = epoch
            return True
        return False

    def keep(self, epoch: int, model: nn.Module, snapshot: Callable[[], Tensor] | None = None) -> None:
        """Hold the current weights as those of ``epoch`` (the performance is left as it is)."""
        self.epoch = epoch
        if snapshot is not None:
            self.point, self.weights = snapshot(), None
        else:
            self.weights, self.point = {k: v.detach().clone() for k, v in model.state_dict().items()}, None


def _stop_reason(record: dict, *, goal: float, epochs: int, time_limit: float | None, min_grad: float,
                 exhausted: bool, max_fail: int) -> str | None:
    # First: no later step can recover, and the best (finite) weights are restored.
    if not math.isfinite(record["perf"]):
        return STOP_REASONS["nonfinite"]
    if record["perf"] <= goal:
        return STOP_REASONS["goal"]
    if record["epoch"] >= epochs:
        return STOP_REASONS["epochs"]
    if time_limit is not None and record["time"] >= time_limit:
        return STOP_REASONS["time"]
    if record["gradient"] <= min_grad:
        return STOP_REASONS["gradient"]
    if exhausted:
        return STOP_REASONS["mu"]
    if record["val_fail"] >= max_fail:
        return STOP_REASONS["validation"]
    return None


def _validate_options(epochs: Any, goal: Any, min_grad: Any, max_fail: Any, time_limit: Any, batch_size: Any,
                      division: Any, callbacks: Any, seed: Any = None, progress: Any = None) -> None:
    # is_real_number takes numpy scalars (np.float32(0.1) is no float); bools are not numbers here.
    checks = [
        ("epochs", epochs, _is_integer(epochs) and epochs >= 0, "an integer >= 0"),
        ("goal", goal, is_real_number(goal) and goal >= 0, "a number >= 0"),
        ("min_grad", min_grad, min_grad is None or (is_real_number(min_grad) and min_grad >= 0), "None or a number >= 0"),
        ("max_fail", max_fail, max_fail is None or max_fail == math.inf or (_is_integer(max_fail) and max_fail >= 0),
         "None, an integer >= 1 or math.inf"),
        # MATLAB's time is a nntype.pos_inf_scalar: 0 is allowed and stops after epoch 0's record.
        ("time_limit", time_limit, time_limit is None or (is_real_number(time_limit) and time_limit >= 0),
         "None or a number >= 0 (seconds; math.inf for no limit)"),
        ("batch_size", batch_size, batch_size is None or (_is_integer(batch_size) and batch_size >= 1), "None or an integer >= 1"),
        ("seed", seed, seed is None or (_is_integer(seed) and -2**63 <= seed < 2**64), "None or an integer in [-2**63, 2**64)"),
        ("progress", progress, progress is None or isinstance(progress, bool), "None, True or False"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"Invalid {name} value: {value!r}; expected {expected}.")
    if division is not None and division not in DIVISIONS + ("none",):
        matlab = _MATLAB_DIVISIONS.get(division) if isinstance(division, str) else None
        hint = f" (MATLAB's {division!r} is division={matlab!r})" if matlab else ""
        raise ValueError(f"Invalid division: {division!r}; expected one of {DIVISIONS} or None{hint}.")
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be marquardt.Callback instances; received {type(callback).__name__}.")


def _max_fail(kind: str, max_fail: int | float | None) -> float:
    """The validation failures that stop training: 6 by default; never for ``trainbr`` by default.

    MATLAB documents ``trainbr``'s ``max_fail = 0`` (``inf`` in later releases) as "validation
    stops disabled"; ``math.inf`` disables them for every method.
    """
    if kind == "br" and max_fail in (None, 0):
        return math.inf
    return _DEFAULT_MAX_FAIL if max_fail is None else max_fail


def _callback_list(callbacks: Any) -> list[Callback]:
    """``callbacks`` as a list: None is none; a single Callback or a non-iterable is a TypeError
    that says what was received (``list(None)`` said only that NoneType is not iterable)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of marquardt.Callback instances; received "
                        f"{type(callbacks).__name__} (wrap a single callback in a list).")
    return list(callbacks)


def _validate_method_loss(kind: str, loss: Loss, batch_size: int | None, max_fail: int | float | None = None) -> None:
    if kind != "br" and max_fail == 0:
        # MATLAB trainlm/traingd would stop at epoch 0 with 'Validation stop.': surely not what was meant.
        raise ValueError(f"Invalid max_fail value: 0; expected None, an integer >= 1 or math.inf with method={kind!r} "
                         "(max_fail=0 turns validation stops off for method='br' only, as in trainbr).")
    if kind != "br":
        return
    if loss.classification:
        raise ValueError(f"Invalid loss for method='br': {loss.name!r}; Bayesian regularization (trainbr) "
                         "needs loss='mse' (a sum of squared errors).")
    if batch_size is not None:
        raise ValueError(f"Invalid batch_size for method='br': {batch_size!r}; Bayesian regularization "
                         "re-estimates its hyperparameters from the whole training set, so it needs batch_size=None.")


def fit(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    method: str | type = "lm",
    loss: str = "mse",
    epochs: int = 1000,
    goal: float = 0.0,
    min_grad: float | None = None,
    max_fail: int | float | None = None,
    time_limit: float | None = None,
    validation_data: tuple[Any, Any] | None = None,
    test_data: tuple[Any, Any] | None = None,
    division: str | None = None,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    batch_size: int | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback] | None = (),
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    checkpoint_every: int = 10,
    distributed: bool | Reducer | None = None,
    **method_options: Any,
) -> History:
    """Train ``model`` on ``(X, y)`` and return the training record.

    Parameters
    ----------
    model : nn.Module
        Maps a batch of inputs to outputs of the shape of ``y`` (a 1-D ``y`` matches outputs of
        shape ``(N, 1)``). Trained in place, on its own device and dtype. A
        :class:`~marquardt.mlp.MLP` built with ``normalize=True`` whose ranges are not set
        gets them from ``(X, y)`` first (MATLAB's ``configure``; only inputs for classification).
    X, y : array_like or Tensor
        Inputs and targets, samples along the first dimension. For ``loss="cross_entropy"``,
        ``y`` holds class indices ``(N,)`` in ``[0, K)`` or one-hot rows ``(N, K)``; for
        ``loss="binary_cross_entropy"``, 0/1 values shaped like the outputs.
    method : {"lm", "br", "gd", "momentum"} or torch.optim.Optimizer class
        Levenberg-Marquardt (MATLAB ``trainlm``), Bayesian regularization (``trainbr``; it
        ends with the last weights, not the lowest-error ones some MATLAB releases return: see
        Notes; its ``gamma`` is MATLAB's for a float64 network, and for a float32 one up to
        1,024 parameters, whose ``J^T J`` is formed in float64: past that a float32 ``J^T J``
        hides its smallest eigenvalues, and ``gamma`` can come out low (9.0 where float64 gives
        13.3), so train such a network in float64 for MATLAB's regularization), gradient descent
        (``traingd``), momentum (``traingdm``), or any optimizer class such as
        :class:`torch.optim.Adam`.
    loss : {"mse", "cross_entropy", "binary_cross_entropy"}
        Squared error; softmax cross-entropy over the outputs (logits); sigmoid cross-entropy
        on each output. LM uses the generalized Gauss-Newton matrix of the cross-entropies. The
        model outputs logits: no final softmax or sigmoid (refused), ``torch.softmax(model(X),
        dim=1)`` gives the probabilities.
    epochs, goal, min_grad, max_fail, time_limit
        MATLAB's ``epochs``, ``goal``, ``min_grad``, ``max_fail`` and ``time`` (seconds).
        As in MATLAB, ``time_limit=0`` stops after epoch 0's record with ``"Maximum time
        elapsed."``, the weights as they were.
        ``min_grad=None`` means MATLAB's default for the method: 1e-5 for ``"gd"`` and
        ``"momentum"`` (``traingd``, ``traingdm``), 1e-7 otherwise (``trainlm``, ``trainbr``).
        ``min_grad`` is compared with the recorded ``gradient``, the gradient of the
        performance the model trains on: for a normalized :class:`~marquardt.mlp.MLP`, that of
        the normalized targets (MATLAB's is in target units, ``(r / 2)**2`` times larger for
        one output of range ``r``).
        ``max_fail=None`` means 6, except for ``method="br"``, which then never stops on
        validation (as ``trainbr``); give ``max_fail`` to make it. ``max_fail=math.inf``
        never stops on validation (the model still ends with the best validation weights,
        except with ``"br"``); so does ``max_fail=0`` with ``"br"``, ``trainbr``'s default.
    validation_data : (X_val, y_val), optional
        Explicit validation set (early stopping after ``max_fail`` consecutive failures).
    test_data : (X_test, y_test), optional
        Explicit test set, recorded as ``tperf`` at each epoch and never trained on (with
        ``validation_data``, MATLAB's ``divideind``).
    division : {"random", "block", "interleaved"}, optional
        Divide ``(X, y)`` into train/validation/test as MATLAB's ``dividerand``,
        ``divideblock`` and ``divideint``, with fractions ``split``. Default: all data trains.
        The rows of each set are kept as ``history.trainInd``, ``valInd`` and ``testInd``
        (0-based, :attr:`~marquardt.history.History.division`).
    batch_size : int, optional
        Mini-batches: one step per batch (for LM, damping carries across batches). Not for
        ``method="br"``.
    seed : int, optional
        Seeds the division and batch order (and ``torch.manual_seed``) for determinism.
    progress : bool, optional
        Live progress display (tqdm). By default shown only when standard output is a terminal
        and tqdm is installed; ``True`` without tqdm raises ImportError before training.
    callbacks : sequence of Callback
        Hooks called at the start, after each epoch and at the end.
    checkpoint : path, optional
        Folder for checkpoints, written atomically every ``checkpoint_every`` epochs and when
        training ends (weights and which parameters require grad, damping or optimizer state,
        the float64 weights LM steps a small float32 network with, History, best weights,
        random states). The final one holds the state after the last
        step, not the best weights the model ends with, so a finished run resumed with other
        stopping rules (a larger ``epochs``, ``max_fail``, a lower ``goal``) goes on as one run
        would have; a run ended by an exception (``KeyboardInterrupt``) writes none, and
        resumes from its last periodic one. With ``resume=True`` an existing checkpoint there
        is continued: with the same arguments the run ends with the weights of an
        uninterrupted one (:mod:`marquardt.checkpoint`).
    resume : bool, default True
        Continue from the newest checkpoint in ``checkpoint``; False starts over and replaces it.
    checkpoint_every : int, default 10
        Epochs between checkpoints. Between two writes, the state after each step is kept in
        memory for the final checkpoint: a copy of the weights and optimizer buffers.
    distributed : bool or Reducer, optional
        Data-parallel training over :mod:`torch.distributed` (:mod:`marquardt.distributed`);
        by default whenever a process group is initialized. Each rank passes *its own shard*
        of the samples as ``X, y`` (and of ``validation_data``; ``division`` divides each
        shard). ``J^T J``, ``J^T e``, costs and performances (gradients and the closure's
        loss for first-order methods) are summed over the ranks, so every rank takes the same steps as one process
        training on all the samples. Rank 0's initial weights are sent to all ranks. Not with
        ``batch_size``. Rank 0 alone writes checkpoints (to a folder every rank can read; a run
        resumes on any number of ranks) and shows progress; callbacks run on every rank and
        see the same History. An error on one rank stops every rank. A
        :class:`~marquardt.distributed.Reducer` may be passed instead of True.
    **method_options
        For ``"lm"``: ``mu=1e-3``, ``mu_dec=0.1``, ``mu_inc=10``, ``mu_max=1e10``,
        ``max_jacobian_bytes`` (Jacobian rows held at once), ``max_matrix_bytes`` (the largest
        ``n_params x n_params`` matrix the normal form may hold), ``solver="auto"`` (``"normal"``,
        ``"sample-space"`` or ``"matrix-free"`` to force a form; see Notes); for ``"br"`` the same with
        ``mu=0.005``. For ``"gd"``: ``lr=0.01``; for ``"momentum"``: ``lr=0.01``,
        ``beta=0.9``; for an optimizer class: its options.

    Returns
    -------
    History
        Per-epoch ``epoch, time, perf, vperf, tperf, damping, gradient, val_fail, solver``,
        plus ``accuracy, vaccuracy, taccuracy`` for classification losses and ``gamma, ssw``
        for ``method="br"``; with ``best_epoch`` and ``stop_reason``.

    Raises
    ------
    ValueError
        For an unknown ``method`` or ``loss``, targets that do not fit the loss (shape, class
        index out of range, non 0/1 values), bad option values, ``method="br"`` with a
        classification loss, with ``batch_size``, with ``solver="matrix-free"`` or with a
        ``J^T J`` larger than ``max_matrix_bytes``; ``solver="normal"`` (or a cross-entropy
        loss) whose ``J^T J`` is larger than ``max_matrix_bytes``; a model whose every parameter
        is frozen; LM with dropout or batch norm in training mode (call ``model.eval()``, or
        train with a first-order method), whose costs change between calls at the same weights
        (``F.dropout`` called in ``forward``, which no submodule shows, is found by two forward
        passes of up to 64 samples at the start, which must agree to ``sqrt(eps)``); LM with
        batch norm on batch statistics (``track_running_stats=False``, eval mode too), or with a
        ``forward`` that mixes the samples (``x - x.mean(0)``: up to 8 samples computed alone
        must agree with the batch to ``sqrt(eps)``), since its Jacobian rows are each sample's
        alone; a classification loss with a model that outputs probabilities (a final
        ``nn.Softmax`` or ``nn.Sigmoid``: the losses take logits); a training cost that is not
        finite at the initial weights (NaN outputs, or a sum of squares that overflows the
        model's dtype as LM's trials sum it), for every method and with ``batch_size``, before
        the first step.
    TypeError
        For non-numeric or complex data, and a model whose output is not one real tensor.

    The performance, validation and test records are evaluated in eval mode (dropout off,
    batch norm on its running statistics); the steps of first-order methods run in the
    model's own mode.

    Notes
    -----
    Performance is the mean squared error over all target elements, the mean cross-entropy
    per sample (``cross_entropy``) or per target element (``binary_cross_entropy``), always
    in the original target units. The LM step solves ``(G + c mu I) dw = -g`` and is kept only
    if the training cost drops; ``mu`` is multiplied by ``mu_dec`` on success and by
    ``mu_inc`` on failure. ``c`` is the number of errors ``N`` for the squared error, as
    ``trainlm`` (R2012b on) solves ``(J^T J / N + mu I) dw = -J^T e / N`` for its normalized
    performance (``2 / perf_scale`` in general: twice the samples for ``cross_entropy``); ``1``
    for ``br``, whose ``alpha`` and ``beta`` carry the scale. For the squared error ``G = J^T J``, ``g = J^T e``; for the
    cross-entropies ``G = J^T H J`` with ``H`` the Hessian of the loss in the outputs
    (``diag(p) - p p^T`` for softmax, ``diag(p (1 - p))`` for sigmoid) and ``g = J^T (p - y)``.

    Numerical trouble: a step to weights where ``g`` is not finite (a NaN or inf in ``J``:
    ``sqrt`` or ``log`` at the edge of their domain, a derivative that overflows) lowered the
    cost but is refused after the fact, as :func:`~marquardt.least_squares` refuses it: no
    step could be taken from there. The weights go back, ``mu`` is multiplied by ``mu_inc``
    from the value the step was computed with, and the epoch's trials go on as in
    ``trainlm``'s inner loop, so the epoch's record shows the weights finally kept (or the
    previous ones with ``mu`` past ``mu_max``); ``trainlm`` has no such case. Weights with no
    error at all are kept. With ``batch_size``, a batch refuses the previous batch's step
    where its own ``J`` is not finite, and an epoch whose steps end where the gradient of the
    whole training set is not finite is refused as one failed trial: its record repeats the
    previous epoch's weights with ``mu`` raised.

    Bayesian regularization (MacKay, 1992; Foresee & Hagan, 1997) minimises
    ``F = beta E_D + alpha E_W`` (sum of squared errors and of squared weights) with
    ``(beta J^T J + alpha I + mu I) dw = -(beta J^T e + alpha w)``. It starts from
    ``gamma = P`` (the number of parameters), ``beta = (N - gamma) / (2 E_D)``,
    ``alpha = gamma / (2 E_W)`` (``N`` target elements) and after each accepted step sets

    ``gamma = P - alpha trace((beta J^T J + alpha I)^-1)``,
    ``alpha = gamma / (2 E_W)``, ``beta = (N - gamma) / (2 E_D)``,

    with the trace from the eigenvalues of the dense ``P x P`` matrix ``J^T J`` (practical to
    a few thousand parameters). ``"Maximum MU reached."`` is its normal end. A normalized
    MLP trains in normalized units (so ``E_D`` and ``gamma`` are in those units).

    Without validation stops, ``method="br"`` ends with the *last* weights, and
    ``best_epoch`` is the last epoch. This differs on purpose from MATLAB releases whose
    ``trainbr`` returns the weights of the epoch with the lowest training error ``E_D``:
    the 2008 ``trainbr.m`` of Neural Network Toolbox 6 keeps ``best_net`` when
    ``ssE < best_perf``; the 2010 rewrite keeps the last, as here; the 2014 one (on
    ``nnet.train.trackBestNetwork``) returns the lowest-``E_D`` weights again, and with
    validation data the lowest-validation-error ones, although it never stops on them. Bayesian
    regularization minimises ``F``, not ``E_D``: the lowest ``E_D`` is usually an early,
    barely regularized epoch, before ``alpha`` and ``gamma`` have settled. On the problem
    of MATLAB's ``trainbr`` example (noisy sine on ``-1:0.05:1``), with a 1-20-1 network
    and ten seeds, the last weights were as close or closer to the true sine every time
    (median MSE 3.1e-3 against 6.9e-3 for the lowest-``E_D`` weights). With validation
    data and ``max_fail`` given, ``"br"`` keeps the best validation weights, as the other
    methods do.

    The run stops with one of :data:`STOP_REASONS`: MATLAB's, and ``"Performance is not
    finite."`` for a run whose training performance became NaN or inf (a first-order step too
    long for ``lr``; LM refuses such steps), checked first. The model ends with the weights of
    the best epoch (best validation performance when there is validation data and validation
    stops apply, else best training performance; the last epoch for ``method="br"`` without
    validation stops). Memory: the Jacobian is formed in row chunks of at most
    ``max_jacobian_bytes`` and folded into ``J^T J`` (``n_params**2`` floats), so it grows
    with parameters squared, not with samples. ``solver="auto"`` (recorded per epoch in
    ``solver``) solves in sample space when there are fewer residuals than parameters and
    ``J`` would fit in ``max_jacobian_bytes`` (holding ``J J^T``, ``m x m``, and for a module
    without a closed form the whole Jacobian; a closed-form network never forms it); goes matrix-free
    (conjugate gradients on Jacobian products, ``"cg"``) when ``J^T J`` would not fit in
    ``max_matrix_bytes`` (default :data:`~marquardt.chunked.DEFAULT_MATRIX_BYTES`); see
    ``docs/performance.md``. The cross-entropy losses always take the normal form (their
    ``J^T H J`` has no sample-space or matrix-free solve here): a larger matrix than
    ``max_matrix_bytes``, or another ``solver``, is a ValueError before training.

    Examples
    --------
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1))
    >>> X = torch.linspace(-1, 1, 50)[:, None]
    >>> history = fit(model, X, torch.sin(3 * X), epochs=100, goal=1e-6)
    >>> history.stop_reason
    'Performance goal met.'
    """
    reducer = make_reducer(distributed)
    # Arguments are checked inside fail_together: a rank with a bad one stops its peers with a
    # DistributedError naming its error, instead of leaving them waiting in their first
    # collective until its exit resets the connection.
    with fail_together(reducer):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; received {type(model).__name__}.")
        callbacks = _callback_list(callbacks)
        _validate_options(epochs, goal, min_grad, max_fail, time_limit, batch_size, division, callbacks, seed,
                          progress)
        # Before any work: progress=True without tqdm fails here, the default quietly shows none.
        progress = resolve_progress(progress) if reducer.rank == 0 else False
        # numpy integers pass the checks; torch's seeding and tensor splitting take Python ints only.
        epochs, batch_size, seed = (None if value is None else int(value) for value in (epochs, batch_size, seed))
        kind, spec = _split_options(method, method_options)
        if min_grad is None:
            min_grad = _MIN_GRAD.get(kind, _DEFAULT_MIN_GRAD)
        loss_fn = make_loss(loss)
        _validate_method_loss(kind, loss_fn, batch_size, max_fail)
        split = check_split(split)  # also without a division: a bad split is a mistake either way
        for name, pair, given in (("validation_data", "(X_val, y_val)", validation_data),
                                  ("test_data", "(X_test, y_test)", test_data)):
            if given is not None and division not in (None, "none"):
                raise ValueError(f"Pass either {name}={pair} or division={division!r}, not both: {name} would "
                                 "replace the division's set.")
        if reducer.world_size > 1 and batch_size is not None:
            raise ValueError(f"Invalid batch_size for distributed training: {batch_size!r}; each step uses every "
                             "rank's whole shard, so pass batch_size=None (or distributed=False).")
        if seed is not None:
            torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
        checkpointer = NO_CHECKPOINT if checkpoint is None else Checkpointer(checkpoint, checkpoint_every, resume,
                                                                               generator, seeded=seed is not None)
        data = _prepare(model, X, y, ("X", "y"), loss_fn)
        # Every check on the input comes before the model is changed (its mapminmax ranges set
        # from X, y); the checks the trainer's problem makes (the solver form against the memory
        # budgets and the loss) come after, and _configured restores the ranges when they refuse:
        # a call that fails leaves the model as it was.
        train, val, test, rows = _divide_data(data, validation_data, test_data, division, split, generator, model,
                                                   loss_fn)
        _check_optimizer_options(kind, spec, model)
        _check_bayesian_form(kind, spec, model)
        # Options that differ between ranks gave each rank its own steps and weights that parted
        # silently (mu 0.001 on one, 0.1 on another); the seed, callbacks, progress and checkpoint
        # settings may differ or are checked where they are used.
        synchronize_module(model, reducer, dict(method=method, loss=loss, epochs=epochs, goal=goal,
                                                min_grad=min_grad, max_fail=max_fail, time_limit=time_limit,
                                                division=division, split=split, batch_size=batch_size,
                                                **method_options))
        history = History(kind)
        if rows is not None:
            history.set_division(*rows)
        with _configured(model, data, loss_fn, reducer, history):
            require_same({"validation data": val is not None, "test data": test is not None}, reducer)
            if reducer.world_size > 1 and checkpoint is not None:
                checkpointer = ShardedCheckpoint(checkpointer, reducer)
            module, to_training_units = _training_view(model, loss_fn)
            fitting = to_training_units(train)
            trainer = _make_trainer(kind, spec, module, fitting, loss_fn,
                                    _make_batches(fitting, batch_size, generator), reducer)
            stop_after = _max_fail(kind, max_fail) if val is not None else math.inf
            loop = _Loop(model, trainer, train, val, test, history, callbacks, loss_fn,
                         dict(goal=goal, epochs=epochs, time_limit=time_limit, min_grad=min_grad,
                              max_fail=stop_after),
                         keep_last=kind == "br" and stop_after == math.inf, checkpoint=checkpointer, reducer=reducer)
            n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
            display = _progress_display(progress, epochs)
            try:
                # Tiny problems: a second intra-op thread costs more than it saves (see single_thread).
                # Over all ranks' samples, so that every rank runs the (repeated) solve on the same kernels.
                with single_thread(is_small(int(sum_values([fitting.y.numel()], reducer)[0]), n_params)):
                    loop.run(display)
            finally:
                if display is not None:
                    display.close()
    return history


#: :func:`evaluate` of an absent split: no performance, no accuracy.
_NO_SPLIT = (math.nan, math.nan)


@dataclass
class _Loop:
    model: nn.Module
    trainer: Any
    train: Split
    val: Split | None
    test: Split | None
    history: History
    callbacks: list[Callback]
    loss: Loss
    rules: dict[str, Any]
    keep_last: bool = False
    checkpoint: Any = NO_CHECKPOINT
    reducer: Reducer = field(default_factory=LocalReducer)

    def run(self, display: Any) -> None:
        best = _Best()
        # The checkpoint folder is this run's before any work: one another run is writing to is
        # refused here, not after checkpoint_every epochs at the first write.
        self.checkpoint.claim()
        try:
            epoch, val_fail, elapsed = self.checkpoint.restore(self, best)
            start = time.perf_counter() - elapsed
            for callback in self.callbacks:
                callback.on_train_begin(self.history, self.model)
            held = self._unobserved() and self.trainer.hold_weights()
            try:
                reason, epoch = self._epochs(display, best, epoch, val_fail, start)
            finally:
                if held:  # also when interrupted: the module gets the weights reached so far
                    self.trainer.release_weights()
        except BaseException:
            # An interrupted run (Ctrl-C in a notebook whose kernel lives on) leaves the
            # checkpoint folder to other processes at once, not when this one ends.
            self.checkpoint.close()
            raise
        # The final checkpoint: the copy of the state the last step left, which _finish's best
        # weights do not reach. Not after an exception, which may leave a step half taken.
        self.checkpoint.train_done()
        self._finish(best, reason, epoch)

    def _unobserved(self) -> bool:
        """Whether nothing reads the module between epochs: no callbacks, validation or test
        set, checkpoint or other rank, and the training performance known without a forward
        pass of the module. The trainer may then hold the weights until training ends."""
        return (not self.callbacks and self.val is None and self.test is None and self.checkpoint is NO_CHECKPOINT
                and self.reducer.world_size == 1 and self.trainer.model is self.model
                and hasattr(self.trainer, "hold_weights"))

    def _epochs(self, display: Any, best: _Best, epoch: int, val_fail: int, start: float) -> tuple[str, int]:
        """The epoch loop; returns the stop reason and the last epoch."""
        while True:
            gradient = self.trainer.evaluate()
            record = self._record(epoch, slowest(time.perf_counter() - start, self.reducer), gradient, val_fail)
            val_fail = self._update_best(best, record, val_fail)
            record["val_fail"] = val_fail
            reason = _stop_reason(record, exhausted=self.trainer.exhausted, **self.rules)
            self.history.append(record)
            if display is not None:
                display(record)
            # MATLAB's train functions test the user's stop before their own rules (trainlm's
            # "if userStop, tr.stop = 'User stop.'; elseif (perf <= goal) ...").
            reason = self._epoch_end(stopping=reason is not None) or reason
            if reason is not None:
                break
            self.trainer.step()
            epoch += 1
            self.checkpoint.epoch_done(self, epoch, best, val_fail, time.perf_counter() - start)
        return reason, epoch

    def _record(self, epoch: int, elapsed: float, gradient: float, val_fail: int) -> dict[str, Any]:
        (perf, accuracy), (vperf, vaccuracy), (tperf, taccuracy) = (
            self._training_perf() if data is self.train else
            _NO_SPLIT if data is None else evaluate(self.model, data, self.loss, reducer=self.reducer)
            for data in (self.train, self.val, self.test))
        record = dict(epoch=epoch, time=elapsed, perf=perf, vperf=vperf, tperf=tperf, damping=self.trainer.damping,
                      gradient=gradient, val_fail=val_fail, solver=self.trainer.solver or None)
        if self.loss.classification:
            record.update(accuracy=accuracy, vaccuracy=vaccuracy, taccuracy=taccuracy)
        record.update(self.trainer.extras())
        return record

    def _training_perf(self) -> tuple[float, float]:
        # The trainer's cost is in the model's own units only when it trains the model itself.
        known = getattr(self.trainer, "training_perf", lambda: None)() if self.trainer.model is self.model else None
        if known is None:
            return evaluate(self.model, self.train, self.loss, reducer=self.reducer)
        return known, math.nan

    def _update_best(self, best: _Best, record: dict, val_fail: int) -> int:
        watched = record["vperf"] if self.val is not None else record["perf"]
        snapshot = self.trainer.snapshot if getattr(self.trainer, "holds_weights", False) else None
        if not math.isfinite(watched):
            # Nothing finite yet: the weights the run started from are the best (MATLAB's best.net
            # starts as the initial network), not the non-finite ones a first-order step reaches.
            if best.weights is None and best.point is None and not self.keep_last:
                best.keep(record["epoch"], self.model, snapshot)
            # MATLAB counts a failure only for vperf > best.vperf: a NaN, which compares false,
            # leaves val_fail as it is; inf counts against a finite best.
            return val_fail + 1 if (self.val is not None and watched > best.perf) else val_fail
        if best.offer(watched, record["epoch"], self.model, keep_weights=not self.keep_last, snapshot=snapshot):
            return 0
        return val_fail + 1 if (self.val is not None and watched > best.perf) else val_fail

    def _epoch_end(self, *, stopping: bool) -> str | None:
        """Call ``on_epoch_end`` for the record just appended; ``"User stop."`` when a callback asks.

        Every record gets its call, the last one too (``stopping``: a built-in rule ends the run at
        this epoch; then no step follows, so weights a callback wrote are not adopted).
        """
        stop = self._call_epoch_end()
        if self.callbacks and not stop and not stopping:
            adopt = getattr(self.trainer, "adopt_module_weights", None)
            if adopt is not None:
                adopt()
        if self.reducer.world_size > 1:
            # A callback that stops one rank (it may read rank-local state) stops every rank at
            # this epoch: one small reduction per epoch, on every rank whatever its callbacks.
            stop = sum_values([float(stop)], self.reducer)[0] > 0
        return STOP_REASONS["user"] if stop else None

    def _call_epoch_end(self) -> bool:
        """Run the callbacks' ``on_epoch_end`` in order; whether one raised StopIteration (the
        later ones are then not called)."""
        for callback in self.callbacks:
            try:
                callback.on_epoch_end(self.history, self.model)
            except StopIteration:
                return True
        return False

    def _finish(self, best: _Best, reason: str, last_epoch: int) -> None:
        if self.keep_last:
            best.epoch = last_epoch  # trainbr keeps the final weights
        elif best.point is not None:
            self.trainer.restore(best.point)
        elif best.weights is not None:
            self.model.load_state_dict(best.weights)
            self.trainer.sync_from_model()
        self.history.best_epoch = best.epoch
        self.history.stop_reason = reason
        for callback in self.callbacks:
            callback.on_train_end(self.history, self.model)


def _progress_display(progress: bool, epochs: int) -> Callable[[dict], None] | None:
    """A tqdm bar when ``progress`` (as :func:`~marquardt.progress.resolve_progress` decided)."""
    if not progress:
        return None
    from .progress import ProgressDisplay

    return ProgressDisplay(total=epochs)
