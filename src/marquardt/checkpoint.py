"""Checkpoints of a training run, for ``fit(..., checkpoint=DIR, resume=True)``.

A checkpoint holds everything the epoch loop of :func:`marquardt.train.fit` carries from one
epoch to the next: the weights and which parameters train (``requires_grad``, which a callback
may have changed), the trainer's state (LM damping, optimizer buffers, and
the weights as LM steps them where the module holds them rounded: a small float32 network is
stepped in float64, and a resume from its float32 weights would go on from other weights), the
History so far, the epoch counter, the validation-failure count, the best weights so far, the
state of the trainer's problem (for the matrix-free form, the warm start and forcing term of the
next conjugate-gradient solve and the generator of its curvature subsets), the
elapsed time and the random states (torch's global generator, numpy's global generator and the
generator that drew the data division and batches). It is written after a training step, so a
resumed run starts by evaluating that epoch, exactly as the uninterrupted run does next: with
the same seed and data, a run killed and resumed ends with the same weights, bit for bit.

Checkpoints are written after every ``every``-th step and once more when training ends, for
its last step, if that one was not a multiple of ``every``: a run that reached ``epochs``, met
its goal, stopped on validation, time, gradient or ``mu``, or was stopped by a callback can be
continued with other stopping rules (a larger ``epochs``, a lower ``goal``, a larger
``max_fail``, ...) as the uninterrupted longer run would have gone on. The final checkpoint
holds the state after that last step, as a periodic one would, not the best weights the model
ends with; to have it, the state after each step whose checkpoint is not written is kept in
memory (a copy of the weights, the trainer's tensors and the random states) until the next
step. A run ended by an exception (``KeyboardInterrupt`` included, or a callback's error)
writes no final checkpoint: the newest one is the last periodic one, and a resume repeats the
steps after it.

Layout of ``DIR``: ``checkpoint-<epoch>.safetensors`` + ``.json`` (via
:func:`marquardt.io.save_state`, each file written to a temporary file and renamed) and
``latest.txt`` naming the newest complete pair. The pointer moves only after both files are in
place, and older pairs are deleted only after it moves, so a process killed at any moment
leaves a readable checkpoint behind (or, when ``resume=False`` rewrites the very pair the
pointer names, no pointer until the new pair is complete: never a damaged one).

A resume is refused before any weight is loaded: with :class:`CheckpointMismatch`, naming the
differences, when the checkpoint was written by a run with another network (class,
architecture, shapes, dtype), method, method options, loss, batch size, data or seed (a run
given no seed continues the checkpointed run's seed); with
:class:`CheckpointError` when the newest checkpoint cannot be read (truncated, garbled
pointer, a missing file). Stopping rules (``epochs``, ``goal``, ...) may change, so a finished
run can be continued.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks; a second run there is not detected)
    fcntl = None  # type: ignore[assignment]
from torch import Tensor

from .bayesian import BayesianState
from .damping import DampingState
from .history import History
from .io import _atomic_write, _describe, _dtype_name, _json_default, _raw_bytes, load_state, save_state

__all__ = ["NO_CHECKPOINT", "CheckpointError", "CheckpointMismatch", "Checkpointer", "NoCheckpoint",
           "latest_checkpoint"]

_POINTER = "latest.txt"
_PREFIX = "checkpoint-"
# 2: the run record names the loss, options, architecture, dtype and batch size as well. The
# problem's state (trainer/problem/*, meta["trainer"]["problem"]) and the parameters' requires_grad
# (meta["requires_grad"]) came later within format 2, and so did LM's own weights (trainer/x, where
# they are wider than the module's): a checkpoint without the first resumes as before, its problem
# starting fresh; one without the second keeps the resuming model's flags; one without the third
# steps on from the module's weights.
_FORMAT = 2
# What a trainer carries between epochs besides the weights (and an optimizer's buffers): LM's
# damping state and last solver path, trainbr's hyperparameters and whether the last step was kept.
_TRAINER_FIELDS = ("state", "regularization", "accepted", "solver")
_STATE_CLASSES = {cls.__name__: cls for cls in (DampingState, BayesianState)}
# LM options that fix the iterates. The memory budgets are left out: their defaults depend on the
# machine's memory, and a run resumed on another machine is still the same run.
_LM_OPTIONS = ("mu", "mu_dec", "mu_inc", "mu_max", "solver")
# What a resume must share with the run that wrote the checkpoint, and how a difference is named.
_RUN_FIELDS = {
    "method": "method", "trainer": "trainer", "loss": "loss", "options": "method options",
    "model": "model class", "architecture": "architecture", "dtype": "dtype", "batch_size": "batch_size",
}


class CheckpointError(ValueError):
    """The checkpoint in the folder cannot be resumed: it is unreadable, or from another run.

    ``path`` is the checkpoint and ``reason`` says what is wrong with it, without the advice
    that ends the message (the command line gives its own).

    Examples
    --------
    >>> import tempfile
    >>> from marquardt import fit
    >>> X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
    >>> wide = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = fit(torch.nn.Linear(1, 1).double(), X, 2 * X, epochs=2, checkpoint=folder, checkpoint_every=1)
    ...     try:  # resuming it with another model: refused before any epoch
    ...         fit(wide, X, 2 * X, epochs=2, checkpoint=folder, resume=True)
    ...     except CheckpointMismatch as error:
    ...         print(type(error).__name__, isinstance(error, CheckpointError), error.path.suffix)
    CheckpointMismatch True .safetensors
    """

    def __init__(self, path: Path, reason: str, advice: str) -> None:
        super().__init__(f"The checkpoint {path} {reason}. {advice}")
        self.path, self.reason = path, reason


class CheckpointMismatch(CheckpointError):
    """The checkpoint in the folder was written by a run with another model, method, options or data.

    See :class:`CheckpointError` for an example.
    """


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The ``.safetensors`` file of the newest complete checkpoint in ``folder``, or None.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     latest_checkpoint(tmp) is None
    True
    """
    pointer = Path(folder) / _POINTER
    if not pointer.is_file():
        return None
    return Path(folder) / f"{pointer.read_text(encoding='utf-8').strip()}.safetensors"


@dataclass(frozen=True)
class _State:
    """The content of one checkpoint: the state before ``epoch`` is evaluated.

    ``meta`` lacks the History's records, which are the first ``records`` of ``history``'s
    (taken when written: the loop only appends to them).
    """

    epoch: int
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    history: History
    records: int

    def kept(self) -> _State:
        """A copy that the loop's next steps leave as it is: weights, optimizer buffers and
        problem tensors are changed in place by them, and an optimizer's state may hold lists
        it appends to (LBFGS). The rest of ``meta`` is made afresh by each call of
        ``Checkpointer._state``, and the best weights are shared: the loop replaces its
        best-weights dict, and never writes into one (``_Best.keep``)."""
        tensors = {name: value if name.startswith("best/") else value.detach().clone()
                   for name, value in self.tensors.items()}
        meta = {**self.meta, "trainer": copy.deepcopy(self.meta["trainer"])}
        return dataclasses.replace(self, tensors=tensors, meta=meta)


@dataclass
class Checkpointer:
    """Writes the training state to ``folder`` every ``every`` epochs and at the end, and restores it on resume.

    Parameters
    ----------
    folder : path
        Checkpoint folder, created if missing.
    every : int, default 10
        Write a checkpoint after every ``every``-th training step, and after the last one when
        training ends (:meth:`train_done`).
    resume : bool, default True
        Continue from the newest checkpoint in ``folder`` when there is one; with False an
        existing checkpoint is ignored and replaced.
    generator : torch.Generator, optional
        The generator of the data division and batch order, saved and restored with the rest.
        Its initial seed is the run's seed, recorded in each checkpoint.
    seeded : bool, optional
        Whether the caller gave that seed (``fit(seed=...)``), or drew it; ``None``: inferred
        from torch's global generator, which ``fit`` seeds with the same seed exactly when given.

    Notes
    -----
    A resume must have the seed of the run that wrote the checkpoint when it was given one: its
    generator fixed the division and the batch order, and a seed that is not the checkpoint's
    is refused with :class:`CheckpointMismatch` even where the division is not random. A run
    given no seed (``fit(seed=None)`` draws one) continues the checkpointed run's seed and
    records it in its own checkpoints.

    The epoch loop calls :meth:`restore` once before its first evaluation,
    :meth:`epoch_done` after each training step and :meth:`train_done` when training has
    ended without an exception. ``loop`` is the loop object of :mod:`marquardt.train`
    (``model``, ``trainer``, ``history``, ``train``); ``best`` its best-epoch tracker
    (``perf``, ``epoch``, ``weights``).
    """

    folder: Path
    every: int = 10
    resume: bool = True
    generator: torch.Generator | None = None
    seeded: bool | None = None
    _run: dict[str, Any] | None = dataclasses.field(default=None, init=False, repr=False)
    _seed: int | None = dataclasses.field(default=None, init=False, repr=False)
    _seeded: bool = dataclasses.field(default=False, init=False, repr=False)
    _unwritten: _State | None = dataclasses.field(default=None, init=False, repr=False)
    _lock: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.folder, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a folder path; received {type(self.folder).__name__}.")
        self.folder = Path(self.folder)
        if isinstance(self.every, bool) or not isinstance(self.every, (int, np.integer)) or self.every < 1:
            raise ValueError(f"Invalid checkpoint_every value: {self.every!r}; expected an integer >= 1.")
        if not isinstance(self.resume, bool):
            raise TypeError(f"resume must be True or False; received {self.resume!r}.")
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint={str(self.folder)!r} is a file; pass a folder for the checkpoints.")
        _check_creatable(self.folder)
        self._seed, self._seeded = _run_seed(self.generator)
        if self.seeded is not None and self.generator is not None:
            self._seeded = bool(self.seeded)

    # -- resume ---------------------------------------------------------------------------------

    def restore(self, loop: Any, best: Any) -> tuple[int, int, float]:
        """Load the newest checkpoint into ``loop`` and ``best``; return (epoch, val_fail, elapsed).

        Returns ``(0, 0, 0.0)``, a fresh start, when there is no checkpoint or ``resume`` is False.
        """
        found = _read_latest(self.folder) if self.resume else None
        if found is None:
            return 0, 0, 0.0
        path, tensors, meta = found
        self._check_compatible(path, loop, meta)
        _check_record(path, tensors, meta)
        _check_not_past(path, meta["epoch"], loop.rules["epochs"])
        trainable = _saved_requires_grad(path, meta)
        with _unchanged_on_failure(path, loop, self.generator):
            _load(loop, best, tensors, meta, trainable, self.generator)
        return meta["epoch"], meta["val_fail"], meta["elapsed"]

    def _check_compatible(self, path: Path, loop: Any, meta: Mapping[str, Any]) -> None:
        expected = self._fingerprint(loop)
        found, there = _without_seed(_current_names(meta.get("run")))
        if meta.get("format") != _FORMAT:
            raise CheckpointError(
                path, f"has checkpoint format {meta.get('format')!r}, and this marquardt resumes format {_FORMAT}",
                "Pass another checkpoint folder, or resume=False to start over and replace it."
            )
        other_seed = self._seeded and there is not None and there != self._seed
        if found != expected or other_seed:
            seeds = (there, self._seed if self._seeded else None)
            differences = "; ".join(_differences(found, expected, seeds)) or "another run record"
            raise CheckpointMismatch(
                path, f"belongs to a different run ({differences})",
                "Resume with the same model, method, options, data and seed (the seed fixes the division), pass "
                "another checkpoint folder, or resume=False to start over and replace it."
            )
        if not self._seeded:  # continue the checkpointed run's seed, and record it as that run's
            self._seed = there

    # -- write ----------------------------------------------------------------------------------

    def epoch_done(self, loop: Any, epoch: int, best: Any, val_fail: int, elapsed: float) -> None:
        """After the training step that leads to ``epoch``: write a checkpoint every ``every``
        epochs, and keep a copy of the state otherwise, for :meth:`train_done`."""
        if epoch % self.every == 0:
            self._unwritten = None
            self.write(loop, epoch, best, val_fail, elapsed)
        else:
            self._unwritten = self._state(loop, epoch, best, val_fail, elapsed).kept()

    def train_done(self) -> Path | None:
        """When training has ended: write the state after its last step, unless that step's
        checkpoint was written (or no step was taken); return the ``.safetensors`` path or None.

        The state is the one :meth:`epoch_done` kept, before the last epoch was evaluated: what
        the loop would carry into that epoch had its stopping rules let it go on, not the best
        weights it then restored.
        """
        state, self._unwritten = self._unwritten, None
        try:
            return None if state is None else self._save(state)
        finally:
            self.close()

    def claim(self) -> None:
        """Lock the folder for this run's writes before any work (a :class:`CheckpointError` when
        another process is writing there); held until :meth:`train_done` or :meth:`close`.

        A folder that does not exist yet has no writer and is not created here (a run refused
        before its first write leaves nothing behind): it is locked at the first write.
        """
        if self._lock is None and self.folder.is_dir():
            self._lock = _lock_folder(self.folder)

    def close(self) -> None:
        """Drop this run's lock on the folder (taken by :meth:`claim`); a later run may write there."""
        self._lock = _unlock(self.folder, self._lock)

    def write(self, loop: Any, epoch: int, best: Any, val_fail: int, elapsed: float) -> Path:
        """Write the state before ``epoch`` is evaluated; return the ``.safetensors`` path."""
        return self._save(self._state(loop, epoch, best, val_fail, elapsed))

    def _state(self, loop: Any, epoch: int, best: Any, val_fail: int, elapsed: float) -> _State:
        """The state before ``epoch`` is evaluated, its tensors the loop's own (not copies)."""
        tensors = {f"model/{name}": value for name, value in loop.model.state_dict().items()}
        tensors.update({f"best/{name}": value for name, value in (best.weights or {}).items()})
        trainer_tensors, trainer_meta = _trainer_state(loop.trainer)
        tensors.update({f"trainer/{name}": value for name, value in trainer_tensors.items()})
        random_tensors, random_meta = _random_state(self.generator)
        tensors.update(random_tensors)
        meta = {
            "format": _FORMAT, "run": {**self._fingerprint(loop), "seed": self._seed}, "epoch": epoch,
            "val_fail": val_fail, "elapsed": elapsed,
            "best": {"perf": best.perf, "epoch": best.epoch}, "trainer": trainer_meta, "random": random_meta,
            "requires_grad": {name: p.requires_grad for name, p in loop.model.named_parameters()},
        }
        return _State(epoch, tensors, meta, loop.history, len(loop.history.records))

    def _save(self, state: _State) -> Path:
        """Write ``state`` as the newest checkpoint; older ones are removed once it is complete."""
        if self._lock is None:
            self._lock = _lock_folder(self.folder)
        history = {"method": state.history.method, "records": state.history.records[: state.records]}
        stem = f"{_PREFIX}{state.epoch:08d}"
        self._unpoint(stem)
        path = save_state(self.folder / stem, state.tensors, {**state.meta, "history": history})
        _atomic_write(self.folder / _POINTER, lambda tmp: tmp.write_text(stem + "\n", encoding="utf-8"))
        self._remove_older(stem)
        return path

    def _fingerprint(self, loop: Any) -> dict[str, Any]:
        # Once per run: the data digest reads every training sample. Taken through JSON, as the
        # checkpoint stores it, so that tuples (Adam's betas) compare equal to the lists read back.
        if self._run is None:
            self._run = json.loads(json.dumps(_fingerprint(loop), default=_plain_option))
        return self._run

    def _unpoint(self, stem: str) -> None:
        # The two files of a pair are replaced one after the other: while latest.txt names the
        # pair being rewritten (resume=False reaching the old run's epoch), a crash between the
        # two would leave it naming files from two saves. No checkpoint is better than that.
        pointer = self.folder / _POINTER
        if pointer.is_file() and pointer.read_bytes().strip() == stem.encode():
            pointer.unlink()

    def _remove_older(self, keep: str) -> None:
        for old in self.folder.glob(f"{_PREFIX}*"):
            if old.name.split(".")[0] != keep:
                old.unlink(missing_ok=True)
        # Temporary files of writes that a kill interrupted (io._atomic_write's names): each can be
        # as large as a checkpoint, and nothing else would ever remove them.
        for stale in [*self.folder.glob(f".{_PREFIX}*.tmp"), *self.folder.glob(f".{_POINTER}.*.tmp")]:
            stale.unlink(missing_ok=True)


class NoCheckpoint:
    """The loop's checkpointer when ``fit`` has no ``checkpoint`` folder: a fresh start, no writes."""

    def restore(self, loop: Any, best: Any) -> tuple[int, int, float]:
        return 0, 0, 0.0

    def epoch_done(self, loop: Any, epoch: int, best: Any, val_fail: int, elapsed: float) -> None:
        pass

    def train_done(self) -> None:
        pass

    def claim(self) -> None:
        pass

    def close(self) -> None:
        pass


NO_CHECKPOINT = NoCheckpoint()


def _run_seed(generator: torch.Generator | None) -> tuple[int | None, bool]:
    """The run's seed (the division generator's initial seed, or None) and whether it was given.

    ``fit`` seeds torch's global generator with the seed it was given and a fresh division
    generator with the same seed; without one, the division generator's seed is a draw that
    torch's global seed equals only by a 1 in 2**31 chance.
    """
    if generator is None:
        return None, False
    seed = generator.initial_seed()
    return seed, seed == torch.initial_seed()


# Two runs writing to one folder delete each other's files (an older pair, a write's temporary
# file): the second crashed mid-run with a FileNotFoundError, or resumed from the first's
# checkpoint while it was being replaced. The writer holds an advisory lock on the folder itself
# (no lock file to leave behind; the kernel drops it when the process dies, killed included),
# taken at its first write and dropped when training ends (train_done, close): a second run is
# refused at its first write, before it deletes anything of the first's. Not at restore: every
# rank of a distributed run restores, and rank 0's lock from a run of its process that raised
# (which no train_done dropped) would refuse the others. Per process, the descriptor of each
# folder it holds: a run of this process that raised left its lock, and the next takes it over.
_HELD: dict[Path, int] = {}


def _load(loop: Any, best: Any, tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
          trainable: Mapping[str, bool] | None, generator: torch.Generator | None) -> None:
    """Put a checkpoint's state into the loop, its best-epoch tracker and the random generators."""
    device = next(loop.model.parameters()).device
    _restore_requires_grad(loop.model, trainable)
    loop.model.load_state_dict(_prefixed(tensors, "model/"))
    # Before the trainer's state: an LM trainer built for the fresh model's trainable set
    # rebuilds its problem for the checkpoint's, whose state is then loaded into it.
    loop.trainer.resume_from_model()
    _restore_trainer(loop.trainer, _prefixed(tensors, "trainer/"), meta["trainer"], device)
    _restore_history(loop.history, meta["history"])
    best.perf, best.epoch = meta["best"]["perf"], meta["best"]["epoch"]
    weights = _prefixed(tensors, "best/")
    best.weights = {name: value.to(device) for name, value in weights.items()} if weights else None
    _restore_random(tensors, meta["random"], generator)


@contextmanager
def _unchanged_on_failure(path: Path, loop: Any, generator: torch.Generator | None) -> Iterator[None]:
    """Undo a load that fails part way, and name the checkpoint in a :class:`CheckpointError`.

    The record checks cannot foresee every hand edit (a numpy random state of another kind, a
    tensor missing from the file): such a checkpoint failed inside ``load_state_dict`` or
    ``np.random.set_state``, after the user's model had taken the checkpoint's weights, with an
    error that did not say the checkpoint was the cause. The model's tensors and
    ``requires_grad``, the History (empty before a resume: ``fit`` then treats the call as one
    that trained nothing) and the random generators are put back as they were.
    """
    state = {name: value.detach().clone() for name, value in loop.model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in loop.model.named_parameters()}
    history = (loop.history.method, list(loop.history.records))
    randoms = (torch.get_rng_state(), np.random.get_state(), None if generator is None else generator.get_state())
    try:
        yield
    except Exception as error:
        loop.model.load_state_dict(state)
        _restore_requires_grad(loop.model, flags)
        loop.history.method, loop.history.records = history
        torch.set_rng_state(randoms[0])
        np.random.set_state(randoms[1])
        if generator is not None:
            generator.set_state(randoms[2])
        raise _unreadable(path, path.parent, f"{type(error).__name__}: {_one_line(error)}") from error


def _unreadable(path: Path, folder: Path, detail: str) -> CheckpointError:
    """The error for a checkpoint in ``folder`` that cannot be read: ``detail`` says why."""
    return CheckpointError(path, f"in {folder} cannot be read: {detail}", "Pass another checkpoint folder, or resume=False to start over and replace it.")


def _one_line(error: BaseException) -> str:
    """``error``'s text on one line, without its final period (the message goes on after it)."""
    return " ".join(str(error).split()).rstrip(".")


def _check_not_past(path: Path, epoch: int, epochs: int) -> None:
    """A CheckpointMismatch when the checkpoint is past ``epochs``: resumed, the run would end at the
    checkpoint's epoch, with more records than an uninterrupted run with these ``epochs`` has."""
    if epoch > epochs:
        raise CheckpointMismatch(
            path, f"is at epoch {epoch}, past epochs={epochs}",
            f"Pass epochs >= {epoch} to continue it, another checkpoint folder, or resume=False to start over "
            "and replace it."
        )


def _busy(folder: Path) -> CheckpointError:
    return CheckpointError(
        folder, "is being written by another run (another process holds its lock)",
        "Wait for that run to end (an interrupted or killed run leaves it at once), or pass another "
        "checkpoint folder: two runs in one folder would delete each other's checkpoints."
    )


def _lock_folder(folder: Path) -> int | None:
    """Lock ``folder`` for this run's writes; a :class:`CheckpointError` when another process has it."""
    if fcntl is None:  # pragma: no cover
        return None
    folder.mkdir(parents=True, exist_ok=True)  # created at the first write, as save_state would
    key = folder.resolve()
    _unlock(folder, _HELD.pop(key, None))
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        raise _busy(folder) from error
    _HELD[key] = descriptor
    return descriptor


def _unlock(folder: Path, descriptor: int | None) -> None:
    if descriptor is None:
        return None
    if _HELD.get(folder.resolve()) == descriptor:
        del _HELD[folder.resolve()]
    os.close(descriptor)  # closing the descriptor drops its lock
    return None


def _check_creatable(folder: Path) -> None:
    # Checked before training: the first write comes only after `every` epochs.
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint={str(folder)!r} cannot be written: {existing} is not a folder this process "
                         "can create files in; pass a folder you can write to.")


def _read_latest(folder: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any]] | None:
    """The newest checkpoint's path, tensors and metadata, or None; unreadable is a CheckpointError.

    Raised before the model is touched: a damaged file (truncated, edited, or its pair from
    another save) is named, where load_state's own error would not say it is the checkpoint.
    """
    path = folder / _POINTER
    try:
        path = latest_checkpoint(folder)
        return None if path is None else (path, *load_state(path))
    except (OSError, ValueError) as error:  # UnicodeDecodeError (a garbled pointer) is a ValueError
        raise _unreadable(path, folder, str(error)) from error


def _fingerprint(loop: Any) -> dict[str, Any]:
    """What must match between the checkpointed run and the one resuming it.

    Everything that fixes the iterates apart from the stopping rules (which a resume may change,
    say to train longer): the network (class, architecture, parameter shapes and dtype), the
    method and its options, the loss, the batch size and the data. The data digest covers the
    divided sets, so a resume with other data is refused rather than silently trained on. The
    seed is recorded beside this record and compared on its own (:class:`Checkpointer`): a run
    given no seed resumes any.
    """
    model_class, architecture = _describe(loop.model)
    state = loop.model.state_dict()
    batches = getattr(loop.trainer, "batches", None)
    return {
        "method": loop.history.method,
        "trainer": type(loop.trainer).__name__,
        "loss": loop.loss.name,
        "options": _trainer_options(loop.trainer),
        "model": model_class,
        "architecture": architecture,
        "dtype": sorted({_dtype_name(value.dtype) for value in state.values() if value.is_floating_point()}),
        "batch_size": len(batches[0][0]) if batches else None,
        "parameters": {name: list(value.shape) for name, value in state.items()},
        "data": _digest(loop.train, loop.val, loop.test),
    }


def _plain_option(value: Any) -> Any:
    # A custom optimizer may keep anything in its groups; such a value is named by its type.
    try:
        return _json_default(value)
    except TypeError:
        return f"<{type(value).__name__}>"


def _trainer_options(trainer: Any) -> dict[str, Any]:
    """LM's damping options, or an optimizer's hyperparameters (its first group, less the tensors)."""
    optimizer = getattr(trainer, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        group = optimizer.param_groups[0]
        return {key: value for key, value in group.items() if key != "params"}
    options = getattr(trainer, "options", {})
    return {key: options[key] for key in _LM_OPTIONS if key in options}


#: Method options renamed since checkpoints were first written, per method: old name -> new.
#: Momentum's constant is held under torch.optim's "momentum" (schedulers cycle it), not "beta".
_RENAMED_OPTIONS: dict[str, dict[str, str]] = {"momentum": {"beta": "momentum"}}


def _current_names(run: Any) -> Any:
    """A checkpointed run record with its method options under today's names, so that a
    checkpoint written before a rename resumes."""
    renames = _RENAMED_OPTIONS.get(run.get("method")) if isinstance(run, Mapping) else None
    options = run.get("options") if renames else None
    if not isinstance(options, Mapping) or not any(old in options for old in renames):
        return run
    return {**run, "options": {renames.get(key, key): value for key, value in options.items()}}


def _without_seed(run: Any) -> tuple[Any, int | None]:
    """A checkpointed run record less its seed, and the seed (None in checkpoints written before
    the seed was recorded: theirs cannot be checked)."""
    if not isinstance(run, Mapping):
        return run, None
    return {key: value for key, value in run.items() if key != "seed"}, run.get("seed")


def _differences(found: Any, expected: Mapping[str, Any], seeds: tuple[int | None, int | None]) -> list[str]:
    """Each way the checkpointed run (``found``) differs from this one, in words.

    ``seeds`` are the checkpointed run's seed and this run's (None where not recorded or not
    given). What follows from an earlier difference is left out: another method has other
    options, another architecture other parameter shapes, another dtype or seed other data.
    """
    if not isinstance(found, Mapping):
        return []
    there, here = seeds
    other_seed = there is not None and here is not None and there != here
    fields = dict(_RUN_FIELDS)
    if found.get("method") != expected["method"]:
        del fields["trainer"], fields["options"]
    differences = [_difference(label, found.get(key), expected[key])
                   for key, label in fields.items() if found.get(key) != expected[key]]
    same_architecture = expected["architecture"] is None or found.get("architecture") == expected["architecture"]
    if same_architecture and found.get("parameters") != expected["parameters"]:
        differences.append(_parameter_differences(found.get("parameters"), expected["parameters"]))
    # The data are digested in the model's dtype, so another dtype has other data too; another
    # seed draws another random division.
    if other_seed:
        differences.append(f"seed {there} there, {here} here")
    elif found.get("data") != expected["data"] and found.get("dtype") == expected["dtype"]:
        differences.append(_data_difference(there, here))
    return differences


def _data_difference(there: int | None, here: int | None) -> str:
    # A run given no seed drew a division of its own: name the seed that draws the checkpoint's.
    if there is not None and here is None:
        return f"other data, or another seed or division of it (the checkpointed run had seed {there}, this one none)"
    return "other data, or another seed or division of it"


def _difference(label: str, there: Any, here: Any) -> str:
    if _is_layers(there) and _is_layers(here):  # a Sequential: name the layers that differ
        return _layer_differences(there["layers"], here["layers"])
    if isinstance(there, Mapping) and isinstance(here, Mapping):  # name the entries that differ
        keys = [key for key in {**there, **here} if there.get(key) != here.get(key)]
        return "; ".join(f"{label} {key} {there.get(key)!r} there, {here.get(key)!r} here" for key in keys)
    return f"{label} {there!r} there, {here!r} here"


def _is_layers(architecture: Any) -> bool:
    return isinstance(architecture, Mapping) and isinstance(architecture.get("layers"), list)


def _layer_differences(there: list[Any], here: list[Any]) -> str:
    if len(there) != len(here):
        return f"architecture {len(there)} layers there, {len(here)} here"
    return "; ".join(f"architecture layer {a.get('name')!r}: {_layer_text(a)} there, {_layer_text(b)} here"
                     for a, b in zip(there, here) if a != b)


def _layer_text(spec: Mapping[str, Any]) -> str:
    """``Linear(in_features=1, out_features=5, bias=True)``, ``Tanh``: a layer record as code."""
    if spec.get("type") == "Sequential":
        return f"Sequential({', '.join(_layer_text(layer) for layer in spec.get('layers', []))})"
    args = ", ".join(f"{key}={value!r}" for key, value in spec.items() if key not in ("name", "type"))
    return f"{spec.get('type')}({args})" if args else str(spec.get("type"))


def _parameter_differences(found: Any, expected: Mapping[str, list[int]], shown: int = 4) -> str:
    found = found if isinstance(found, Mapping) else {}
    lines = [f"{name} missing there" for name in expected if name not in found]
    lines += [f"{name} not here" for name in found if name not in expected]
    lines += [f"{name} of shape {found[name]} there, {shape} here" for name, shape in expected.items()
              if name in found and found[name] != shape]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return "parameters: " + ", ".join(lines[:shown]) + more


def _digest(*splits: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for split in splits:
        for tensor in () if split is None else (split.X, split.y):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_trainer_field(value: Any) -> bool:
    """A trainer field as :func:`_plain` writes it: a scalar, or a state class with its fields."""
    if not isinstance(value, Mapping):
        return value is None or isinstance(value, (bool, int, float, str))
    cls = _STATE_CLASSES.get(value.get("class"))
    fields = value.get("fields")
    return (cls is not None and isinstance(fields, Mapping)
            and set(fields) == {field.name for field in dataclasses.fields(cls)})


def _bad_record(records: Any) -> Any:
    """The first History record that is not an object holding its own epoch number, or None."""
    if not isinstance(records, list):
        return None
    return next((record for i, record in enumerate(records)
                 if not (isinstance(record, Mapping) and _is_count(record.get("epoch")) and record["epoch"] == i)),
                None)


def _check_record(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Refuse, before the model is touched, a checkpoint whose record was edited or damaged by
    hand (the checksum covers the tensors only), rather than fail halfway through loading it
    with a KeyError or resume at a nonsensical epoch."""
    def get(*keys: str) -> Any:
        value: Any = meta
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    records = get("history", "records")
    bad_record = _bad_record(records)
    fields = get("trainer", "fields")
    bad_field = next((name for name, value in fields.items() if not _is_trainer_field(value)), None) \
        if isinstance(fields, Mapping) else None
    checks = [
        ("epoch", get("epoch"), _is_count(get("epoch")) and get("epoch") >= 1, "an integer >= 1"),
        ("val_fail", get("val_fail"), _is_count(get("val_fail")), "an integer >= 0"),
        ("elapsed", get("elapsed"), _is_number(get("elapsed")) and get("elapsed") >= 0, "a number of seconds >= 0"),
        ("best", get("best"), _is_number(get("best", "perf")) and (get("best", "epoch") is None
                                                                     or _is_count(get("best", "epoch"))),
         'an object {"perf": number, "epoch": integer or null}'),
        ("history method", get("history", "method"), isinstance(get("history", "method"), str), "a string"),
        ("history records", f"{len(records)} records" if isinstance(records, list) else records,
         isinstance(records, list) and len(records) == get("epoch"),
         f"a list of {get('epoch')} records, one per epoch before it"),
        # A record edited or replaced by hand became a History row of its own (epoch None), silently.
        ("history row", bad_record, bad_record is None,
         'records numbered from 0, each an object with its "epoch"'),
        ("trainer fields", fields, isinstance(fields, Mapping), "an object"),
        (f"trainer field {bad_field!r}", get("trainer", "fields", str(bad_field)), bad_field is None,
         f"a scalar, or one of {sorted(_STATE_CLASSES)} with its fields"),
        ("numpy random state", get("random", "numpy"),
         isinstance(get("random", "numpy"), list) and len(get("random", "numpy")) == 4, "a list of 4 values"),
        ("random tensors", sorted(name for name in tensors if name.startswith("random/")),
         {"random/torch", "random/numpy"} <= set(tensors), "random/torch and random/numpy"),
    ]
    for what, value, ok, expected in checks:
        if not ok:
            raise _unreadable(path, path.parent,
                              f"its {what} record is {json.dumps(value, default=str)[:80]}, expected {expected}")


def _saved_requires_grad(path: Path, meta: Mapping[str, Any]) -> dict[str, bool] | None:
    """The checkpoint's ``requires_grad`` of each parameter, or None where it predates them."""
    saved = meta.get("requires_grad")
    if saved is None:
        return None
    if not (isinstance(saved, Mapping) and all(isinstance(value, bool) for value in saved.values())):
        raise _unreadable(path, path.parent, f"its requires_grad record is {json.dumps(saved)[:80]}, expected an "
                                             "object mapping parameter names to true or false")
    return dict(saved)


def _restore_requires_grad(model: torch.nn.Module, trainable: Mapping[str, bool] | None) -> None:
    """Freeze and unfreeze ``model``'s parameters as the checkpointed run had them. Not part of
    the run record: a callback may change them during a run, so the resuming model's flags (as
    the checkpointed run began) may differ. None (an older checkpoint) leaves the model's own."""
    if trainable is None:
        return
    for name, parameter in model.named_parameters():
        if name in trainable:
            parameter.requires_grad_(trainable[name])


def _prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


# -------------------------------------------------------------------------------------------------
# trainer state: LM damping, Bayesian hyperparameters, optimizer buffers


def _trainer_state(trainer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    meta: dict[str, Any] = {"fields": {name: _plain(getattr(trainer, name)) for name in _TRAINER_FIELDS
                                       if hasattr(trainer, name)}}
    # LM's weights as it steps them, where the module holds them rounded (a float32 network is
    # stepped in float64): resumed from the module's, the runs parted (9.5e-7 apart in the weights
    # after 12 epochs of a 1-6-1 network, 0.11 matrix-free).
    tensors: dict[str, Tensor] = dict(trainer.resume_state()) if hasattr(trainer, "resume_state") else {}
    optimizer = getattr(trainer, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        state = optimizer.state_dict()["state"]
        meta["optimizer"] = {str(index): {key: _optimizer_value(value) for key, value in entry.items()}
                             for index, entry in state.items()}
        tensors.update({f"optimizer/{index}/{name}": value for index, entry in state.items()
                        for key, value in entry.items() for name, value in _optimizer_tensors(key, value)})
    # The matrix-free solve's warm start, forcing term and subset generator: without them a resumed
    # run's first solves differ from the uninterrupted run's (up to 0.10 in the weights after 12 epochs).
    problem = getattr(trainer, "problem", None)
    if hasattr(problem, "resume_state"):
        problem_tensors, meta["problem"] = problem.resume_state()
        tensors.update({f"problem/{name}": value for name, value in problem_tensors.items()})
    return tensors, meta


def _restore_trainer(trainer: Any, tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                     device: torch.device) -> None:
    for name, value in meta["fields"].items():
        setattr(trainer, name, _rebuilt(value))
    if hasattr(trainer, "load_resume_state"):  # the trainer's own tensors: those not under optimizer/ or problem/
        trainer.load_resume_state({name: value for name, value in tensors.items() if "/" not in name})
    if "optimizer" in meta:
        state = {int(index): {key: _optimizer_entry(tensors, f"optimizer/{index}/{key}", value, device)
                              for key, value in entry.items()} for index, entry in meta["optimizer"].items()}
        groups = trainer.optimizer.state_dict()["param_groups"]
        trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
    if "problem" in meta:
        trainer.problem.load_resume_state(_prefixed(tensors, "problem/"), meta["problem"])


# An optimizer's state entry is a tensor (stored as a tensor, None in the JSON), a list holding
# tensors (LBFGS's curvature pairs ``old_dirs``, ``old_stps``, ``ro`` and ``al``: each tensor stored
# as ``<key>/<i>``, the JSON recording which items are tensors), or a plain value (JSON as it is).
_TENSOR_LIST = "tensor_list"


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(item, Tensor) for item in value)


def _optimizer_value(value: Any) -> Any:
    if isinstance(value, Tensor):
        return None
    if _holds_tensors(value):
        return {_TENSOR_LIST: [None if isinstance(item, Tensor) else item for item in value],
                "tensors": [i for i, item in enumerate(value) if isinstance(item, Tensor)]}
    return value


def _optimizer_tensors(key: str, value: Any) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(key, value)]
    if _holds_tensors(value):
        return [(f"{key}/{i}", item) for i, item in enumerate(value) if isinstance(item, Tensor)]
    return []


def _optimizer_entry(tensors: Mapping[str, Tensor], name: str, value: Any, device: torch.device) -> Any:
    if value is None:  # a tensor, or (none stored under the name) a state entry that was None
        return tensors[name].to(device) if name in tensors else None
    if isinstance(value, Mapping) and _TENSOR_LIST in value:
        items = list(value[_TENSOR_LIST])
        for i in value["tensors"]:
            items[i] = tensors[f"{name}/{i}"].to(device)
        return items
    return value


def _plain(value: Any) -> Any:
    """A trainer field as JSON: scalars as they are, state dataclasses as their class and fields."""
    if type(value) in _STATE_CLASSES.values():
        return {"class": type(value).__name__, "fields": dataclasses.asdict(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a trainer field of type {type(value).__name__}")  # pragma: no cover


def _rebuilt(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _STATE_CLASSES[value["class"]](**value["fields"])
    return value


def _restore_history(history: History, saved: Mapping[str, Any]) -> None:
    # Records are stored as they were (NaN included, which the checkpoint's JSON keeps), so the
    # resumed history equals the uninterrupted one value for value.
    history.method = saved["method"]
    history.records = []
    for record in saved["records"]:
        history.append(record)


# -------------------------------------------------------------------------------------------------
# random state: torch, numpy, the division generator


def _random_state(generator: torch.Generator | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"random/torch": torch.get_rng_state(), "random/numpy": torch.from_numpy(keys.astype(np.int64))}
    if generator is not None:
        tensors["random/generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"random/cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"numpy": [kind, position, has_gauss, cached]}


def _restore_random(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(tensors["random/torch"])
    kind, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["random/numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    if generator is not None and "random/generator" in tensors:
        generator.set_state(tensors["random/generator"])
    cuda = _prefixed(tensors, "random/cuda/")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[index] for index in sorted(cuda, key=int)])
