"""Data-parallel Levenberg-Marquardt: every rank holds a shard of the samples.

The LM loop (:func:`marquardt.solver.lm_step`) never sees a process rank. It sees a
:class:`ReducedProblem`, which linearises the local shard exactly as on one machine (Jacobian
rows in chunks, folded into ``J^T J``) and then sums ``J^T J``, ``J^T r`` and the cost over the
ranks through a :class:`Reducer`. Every rank then holds the same system, computes the same step
and takes the same accept/reject decision, so the weights stay identical without being sent
again after the initial broadcast: as long as every rank's solve rounds the same way (the same
thread count and BLAS on every rank; otherwise the ranks' weights drift apart by rounding, see
``docs/scaling.md``).

The sums are exact re-associations of the one-machine sums: the rows of ``J`` are split by
sample, ``J^T J = sum_k J_k^T J_k``, ``J^T r = sum_k J_k^T r_k`` and the cost likewise. The
residual-space solve (fewer residuals ``m`` than parameters ``n``) cannot be split this way
(it factors ``J J^T``, whose blocks live on different ranks): there the rows themselves are
gathered, and every rank solves as one process would. A matrix-free system (conjugate
gradients on Jacobian products) reduces one ``n``-vector per CG iteration instead of a matrix.

:class:`Reducer` is the seam: :class:`LocalReducer` (one process, every operation the identity)
and :class:`TorchDistributedReducer` (``all_reduce`` with ``SUM`` over :mod:`torch.distributed`:
gloo on CPU, NCCL on GPU). The numerical modules never import :mod:`torch.distributed`; this
module does, and the command line (to start and end a process group under ``torchrun``).

Faults: each collective of :class:`TorchDistributedReducer` is preceded by an ``all_reduce`` of
one flag per rank. A rank that raises inside :func:`fail_together` joins that flag reduction
with its flag set, so the ranks waiting in their next collective learn of the failure and raise
:class:`DistributedError` naming the failed rank and its error, instead of waiting for it
forever. A rank going on puts the collective it is about to join in its flag (operation, dtype
and size): ranks whose code took different paths (another method, solver or loss on one rank)
raise DistributedError naming what each rank reached, where the mismatched collective itself
would abort a process inside the backend. A rank that dies without a word (killed, segfault)
is caught by the process group itself: its peers' collectives fail when the connection drops,
or after the process-group timeout (``initialize(timeout=...)``), and that failure is raised as
:class:`DistributedError`.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .chunked import AccumulatedNormalEquations, PromotedEquations
from .damping import is_real_number
from .linalg import SampleSpaceEquations
from .solver import Linearization, Problem

__all__ = [
    "DistributedError",
    "LocalReducer",
    "ReducedMatrixFree",
    "ReducedProblem",
    "Reducer",
    "ShardedCheckpoint",
    "TorchDistributedReducer",
    "average_gradients",
    "fail_together",
    "gather_rows",
    "global_range",
    "global_scale",
    "initialize",
    "make_reducer",
    "require_same",
    "shard_bounds",
    "slowest",
    "sum_values",
    "synchronize_module",
]

#: Default process-group timeout (seconds): how long a rank waits in a collective for a peer
#: that neither arrives nor reports a failure before it gives up with DistributedError.
DEFAULT_TIMEOUT = 300.0

_MESSAGE_BYTES = 512
_NAME_BYTES = 64  # a checkpoint's name, as the ranks compare it on resume
# Flag values (see TorchDistributedReducer._exchange_flags); a rank going on sends the signature
# of its next collective instead, a number >= 0.
_FAILED, _FINISHED = -1, -2
_OPERATIONS = ("check", "sum", "maximum", "broadcast")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex128, torch.complex64)
_OTHER_DTYPE = 15  # signatures keep 4 bits for the dtype


class DistributedError(RuntimeError):
    """Another rank failed, or a collective could not complete; every rank stops with it.

    Examples
    --------
    >>> try:
    ...     TorchDistributedReducer()  # no process group in this process
    ... except DistributedError as error:
    ...     print(str(error).split(";")[0])
    torch.distributed is not initialized
    """


class Reducer(Protocol):
    """Sums over the ranks of a data-parallel run (see the module docstring).

    Every rank must call the same operations in the same order with tensors of the same shape.
    ``bytes`` and ``calls`` count the collectives made (payload bytes sent per rank, flags
    included), for measurements.

    Examples
    --------
    >>> reducer: Reducer = LocalReducer()  # one process; TorchDistributedReducer for several
    >>> reducer.sum(torch.tensor([1.0, 2.0])).tolist(), reducer.rank, reducer.world_size
    ([1.0, 2.0], 0, 1)
    """

    rank: int
    world_size: int
    bytes: int
    calls: int

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over the ranks (``tensor`` itself is not modified)."""

    def sum_scalar(self, value: float) -> float:
        """The sum of ``value`` over the ranks."""

    def maximum(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum of ``tensor`` over the ranks."""

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor``, on every rank."""

    def signal_failure(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed with ``error`` (they raise DistributedError)."""

    def check(self) -> None:
        """Agree that no rank has failed; raises DistributedError if one has."""


@dataclass
class LocalReducer:
    """The reducer of a single process: every sum is over one rank, the identity.

    Examples
    --------
    >>> reducer = LocalReducer()
    >>> reducer.sum_scalar(2.5), reducer.sum(torch.ones(2)).tolist(), reducer.world_size
    (2.5, [1.0, 1.0], 1)
    """

    rank: int = 0
    world_size: int = 1
    bytes: int = 0
    calls: int = 0

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` itself."""
        return tensor

    def sum_scalar(self, value: float) -> float:
        """``value`` itself."""
        return value

    def maximum(self, tensor: Tensor) -> Tensor:
        """``tensor`` itself."""
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        """``tensor`` itself."""
        return tensor

    def signal_failure(self, error: BaseException) -> None:
        """Nothing to tell."""

    def check(self) -> None:
        """Nothing to check."""

    def finish(self) -> None:
        """Nothing to agree on."""


class TorchDistributedReducer:
    """Sums over the ranks of an initialised :mod:`torch.distributed` process group.

    Parameters
    ----------
    group : ProcessGroup, optional
        The group to reduce over; default the whole world.

    Notes
    -----
    Tensors are reduced on the backend's device (CPU for gloo, the current CUDA device for
    NCCL) and returned on the device they came from. Every collective first reduces one
    ``int64`` flag per rank (``8 * world_size`` bytes, latency-bound) so that a failure on one
    rank stops all of them (see :func:`fail_together`), and so that ranks about to join
    different collectives (operation, dtype or size) raise DistributedError instead of
    reaching them: gloo aborts the process on a size mismatch. A collective that fails (a peer
    exited, or the process-group timeout passed) raises :class:`DistributedError`; after that
    the reducer refuses further collectives, since the group is no longer in step.

    Examples
    --------
    A process group of one rank (under torchrun every rank runs the same lines):

    >>> import tempfile
    >>> import torch.distributed as dist
    >>> store = tempfile.NamedTemporaryFile(delete=False).name
    >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    >>> reducer = TorchDistributedReducer()
    >>> reducer.sum(torch.tensor([1.0, 2.0])).tolist(), reducer.world_size
    ([1.0, 2.0], 1)
    >>> dist.destroy_process_group()
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "torch.distributed is not initialized; call marquardt.distributed.initialize() "
                "(or torch.distributed.init_process_group) in every process first, e.g. under "
                "torchrun, or pass distributed=False to train on this process's data alone."
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bytes = 0
        self.calls = 0
        self.broken = False

    def __repr__(self) -> str:
        return f"TorchDistributedReducer(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over the ranks, on ``tensor``'s device."""
        return self._reduce(tensor, self._dist.ReduceOp.SUM)

    def sum_scalar(self, value: float) -> float:
        """The sum of a Python number over the ranks (in float64)."""
        return float(self.sum(torch.tensor([value], dtype=torch.float64))[0])

    def maximum(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum over the ranks."""
        return self._reduce(tensor, self._dist.ReduceOp.MAX)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank (a new tensor on ``tensor``'s device)."""
        buffer = tensor.detach().to(self.device, copy=True).contiguous()
        self._exchange_flags(None, next_collective=_signature("broadcast", buffer))
        self._collective(lambda: self._dist.broadcast(buffer, src=self._global_rank(0), group=self.group), buffer)
        return buffer.to(tensor.device)

    def check(self) -> None:
        """Reduce the failure flags; raise DistributedError naming any rank that failed."""
        self._exchange_flags(None)

    def finish(self) -> None:
        """Agree that every rank has finished: raise DistributedError if one failed or is still going.

        A rank that ends early (a callback that stopped it alone, other ``epochs``) would leave
        its peers waiting in their next collective; its finish flag meets their check instead,
        and every rank raises, naming the ranks that finished.
        """
        self._exchange_flags(None, finished=True)

    def signal_failure(self, error: BaseException) -> None:
        """Join the peers' next flag reduction with this rank's flag set, then mark the group broken."""
        if self.broken:
            return
        try:
            self._exchange_flags(error)
        except DistributedError:
            pass  # expected: the exchange reports this rank's own failure
        finally:
            self.broken = True

    def _reduce(self, tensor: Tensor, op: Any) -> Tensor:
        buffer = tensor.detach().to(self.device, copy=True).contiguous()
        name = "maximum" if op == self._dist.ReduceOp.MAX else "sum"
        self._exchange_flags(None, next_collective=_signature(name, buffer))
        self._collective(lambda: self._dist.all_reduce(buffer, op=op, group=self.group), buffer)
        return buffer.to(tensor.device)

    def _exchange_flags(self, error: BaseException | None, *, finished: bool = False,
                        next_collective: int = 0) -> None:
        # One flag per rank: _FAILED, _FINISHED (the end of a fail_together block), or the
        # signature of the collective this rank joins next (0: none, a bare check).
        flags = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        flags[self.rank] = _FAILED if error is not None else _FINISHED if finished else next_collective
        self._collective(lambda: self._dist.all_reduce(flags, group=self.group), flags)
        flags = flags.cpu().tolist()
        failed = [r for r, flag in enumerate(flags) if flag == _FAILED]
        if failed:
            messages = self._exchange_messages(error)
            self.broken = True
            details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise DistributedError(
                f"Stopping rank {self.rank} of {self.world_size}: {len(failed)} rank(s) failed ({details})."
            )
        done = [r for r, flag in enumerate(flags) if flag == _FINISHED]
        if 0 < len(done) < self.world_size:
            self.broken = True
            going = [r for r in range(self.world_size) if r not in done]
            raise DistributedError(
                f"Stopping rank {self.rank} of {self.world_size}: rank(s) {done} finished while rank(s) {going} "
                "went on. Every rank must run the same epochs: pass the same options (epochs, goal, time_limit, "
                "...) on every rank, and make callbacks stop training on all ranks or none."
            )
        if len(set(flags)) > 1:
            self.broken = True
            reached = "; ".join(f"rank {r}: {_describe_signature(flag)}" for r, flag in enumerate(flags))
            raise DistributedError(
                f"Stopping rank {self.rank} of {self.world_size}: the ranks reached different collectives "
                f"({reached}). Every rank must run the same code with the same options: pass the same method, "
                "loss, solver, checkpoint and other options on every rank."
            )

    def _exchange_messages(self, error: BaseException | None) -> list[str]:
        # Every rank knows a failure happened, so all of them join this one extra collective.
        table = torch.zeros(self.world_size, _MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
            table[self.rank, : len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(self.device)
        self._collective(lambda: self._dist.all_reduce(table, group=self.group), table)
        rows = table.cpu().numpy()
        return [bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in rows]

    def _collective(self, run: Any, buffer: Tensor) -> None:
        if self.broken:
            raise DistributedError(
                f"Rank {self.rank}: the process group is out of step after an earlier failure; "
                "no further collectives are possible. Restart the run (from a checkpoint)."
            )
        try:
            run()
        except RuntimeError as error:
            self.broken = True
            raise DistributedError(
                f"Rank {self.rank} of {self.world_size}: a collective failed ({error}). Another rank "
                "probably exited, crashed or stopped reducing; the process-group timeout bounds the wait."
            ) from error
        self.calls += 1
        self.bytes += buffer.numel() * buffer.element_size()

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return self._dist.get_global_rank(self.group, group_rank)


def _signature(operation: str, buffer: Tensor) -> int:
    """A number naming a collective: its operation, dtype and element count (see _describe_signature)."""
    dtype = _DTYPES.index(buffer.dtype) if buffer.dtype in _DTYPES else _OTHER_DTYPE
    return (buffer.numel() * len(_OPERATIONS) + _OPERATIONS.index(operation)) * 16 + dtype


def _describe_signature(signature: int) -> str:
    """The words for a :func:`_signature`, e.g. ``"a sum of 3 float64 numbers"``."""
    if signature == 0:
        return "no collective (a check)"
    rest, dtype = divmod(signature, 16)
    numel, operation = divmod(rest, len(_OPERATIONS))
    name = str(_DTYPES[dtype]).removeprefix("torch.") if dtype < len(_DTYPES) else "other-dtype"
    return f"a {_OPERATIONS[operation]} of {numel} {name} numbers"


def initialize(*, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> TorchDistributedReducer:
    """Initialise :mod:`torch.distributed` from the environment (as ``torchrun`` sets it) and return a reducer.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Default NCCL when CUDA is available, else gloo. With NCCL each process uses the GPU
        ``LOCAL_RANK``; NCCL without CUDA is a ValueError.
    timeout : float
        Seconds a collective may wait for a peer before failing (the process-group timeout).

    Notes
    -----
    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. An already initialised
    process group is kept as it is, whatever its backend (so calling this twice is harmless),
    and left to whoever created it to destroy.

    A process group this function creates is destroyed at interpreter exit (an :mod:`atexit`
    handler calls ``torch.distributed.destroy_process_group()`` if that group is still the
    default one), so a script needs no teardown of its own. Left to the interpreter's
    shutdown, gloo's threads outlived it and rank 0 often died after training had finished,
    with "terminate called without an active exception" (SIGABRT, exit status 1 from
    ``torchrun``). Destroying it earlier yourself is fine: the handler then does nothing.
    """
    import torch.distributed as dist

    # Numpy scalars count; a bool is a mistake, not 1 second.
    if not (is_real_number(timeout) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"Invalid timeout value: {timeout!r}; expected a finite number of seconds > 0.")
    backend = _check_backend(backend)
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise DistributedError(f"Cannot initialize torch.distributed: environment variables {missing} are not "
                                   "set; start the processes with torchrun (torchrun --nproc-per-node=K ...).")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
        atexit.register(_destroy_at_exit, dist.group.WORLD)
    return TorchDistributedReducer()


def _destroy_at_exit(group: Any) -> None:
    """Destroy ``group``, the process group :func:`initialize` created, if it is still the default one.

    One destroyed since, or replaced by a group of the caller's, is not this handler's to end.
    """
    import torch.distributed as dist

    if dist.is_initialized() and dist.group.WORLD is group:
        dist.destroy_process_group()


def _check_backend(backend: Any) -> str | None:
    """``backend`` in lower case (torch's spelling), or ValueError naming it.

    torch's own errors name neither the argument nor the choices: an unknown name is an
    AssertionError inside init_process_group, and NCCL on a machine without CUDA an
    AttributeError from torch.cuda.
    """
    if backend is None:
        return None
    name = backend.lower() if isinstance(backend, str) else backend
    if name not in ("gloo", "nccl"):
        raise ValueError(f"Invalid backend value: {backend!r}; expected 'gloo', 'nccl' or None (NCCL when CUDA is "
                         "available, else gloo).")
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"Invalid backend value: {backend!r}; NCCL needs CUDA, which this process does not have. "
                         "Pass backend='gloo' (or None) to train on the CPU.")
    return name


#: What fit uses of a Reducer (see the Protocol).
_REDUCER_MEMBERS = ("rank", "world_size", "sum", "sum_scalar", "maximum", "broadcast", "signal_failure", "check")


def make_reducer(distributed: bool | Reducer | None = None) -> Reducer:
    """The reducer for ``fit(..., distributed=...)``.

    ``None``: a :class:`TorchDistributedReducer` when :mod:`torch.distributed` is initialized,
    else a :class:`LocalReducer`. ``True`` requires an initialized process group; ``False``
    always trains on this process's data alone. A reducer is used as it is (e.g. one over a
    sub-group, or the caller's own, so that both share its failure state).

    Examples
    --------
    >>> make_reducer(None).world_size
    1
    """
    if distributed is None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
    elif isinstance(distributed, np.bool_):  # numpy's True and False, as the other options take them
        distributed = bool(distributed)
    elif not isinstance(distributed, bool):
        missing = [name for name in _REDUCER_MEMBERS if not hasattr(distributed, name)]
        if not missing:
            return distributed
        # An object with some of the members is meant as a reducer: say which ones it lacks (fit
        # would otherwise stop with an AttributeError at the first it uses, after the others).
        lacks = f" (a Reducer needs {', '.join(missing)})" if len(missing) < len(_REDUCER_MEMBERS) else ""
        raise ValueError(f"Invalid distributed value: {distributed!r}; expected None, True, False or a Reducer{lacks}.")
    return TorchDistributedReducer() if distributed else LocalReducer()


@contextmanager
def fail_together(reducer: Reducer) -> Iterator[Reducer]:
    """Run a block on every rank so that a failure on one rank stops all of them.

    An exception on this rank is signalled to the peers (who raise :class:`DistributedError`
    from their next collective) and then re-raised here. When the block ends normally, the
    ranks agree once more that none failed and that all of them finished (the reducer's
    ``finish``, else ``check``), so no rank reports success for a run another rank abandoned,
    or leaves a rank that is still training waiting for it.

    Examples
    --------
    >>> with fail_together(LocalReducer()):
    ...     pass
    """
    try:
        yield reducer
    except DistributedError:
        raise
    except Exception as error:
        reducer.signal_failure(error)
        raise
    getattr(reducer, "finish", reducer.check)()


# ---------------------------------------------------------------------------------------------
# the reduced least-squares problem


def _upper_blocks(n: int) -> list[tuple[int, int]]:
    # Row blocks of the upper triangle: block [i, j) sends gram[i:j, i:]. With about 32
    # blocks the lower-triangle entries sent along (inside the diagonal blocks) add ~3 %.
    width = max(16, -(-n // 32))
    return [(i, min(n, i + width)) for i in range(0, n, width)]


def pack_upper(gram: Tensor) -> Tensor:
    """The upper triangle of the symmetric ``gram`` (in row blocks) as one flat tensor.

    Examples
    --------
    >>> g = torch.arange(9.0).reshape(3, 3); g = g + g.T
    >>> torch.equal(unpack_upper(pack_upper(g), 3), g)
    True
    """
    n = gram.shape[0]
    return torch.cat([gram[i:j, i:].reshape(-1) for i, j in _upper_blocks(n)])


def unpack_upper(packed: Tensor, n: int) -> Tensor:
    """The symmetric ``n x n`` matrix whose upper triangle :func:`pack_upper` packed."""
    gram = packed.new_zeros(n, n)
    offset = 0
    for i, j in _upper_blocks(n):
        size = (j - i) * (n - i)
        gram[i:j, i:] = packed[offset : offset + size].view(j - i, n - i)
        offset += size
    return torch.triu(gram) + torch.triu(gram, 1).T


def _assembled(system: Any) -> tuple[Any, torch.dtype | None]:
    """The system in the dtype it was assembled in, and the dtype the LM loop sees when they differ.

    Small float32 problems assemble ``J^T J`` in float64 (:class:`~marquardt.chunked.PromotedEquations`);
    reducing the float64 matrix keeps the accuracy one process has.
    """
    if isinstance(system, PromotedEquations):
        return system.system, system.dtype
    return system, None


def _gram(system: Any) -> Tensor:
    gram = getattr(system, "gram", None)
    if gram is not None:
        return gram
    # A residual-space system holds its rows; their Gram matrix is the normal form.
    return system.jac.T @ system.jac


def payload_bytes(n_params: int, itemsize: int) -> int:
    """Bytes one rank sends to reduce a linearization: upper ``J^T J``, ``J^T r`` and the cost.

    Examples
    --------
    >>> payload_bytes(100, 8) > 8 * 100 * 101 // 2
    True
    """
    blocks = sum((j - i) * (n_params - i) for i, j in _upper_blocks(n_params))
    return (blocks + n_params + 1) * itemsize


@dataclass
class ReducedProblem:
    """The sum over the ranks of each rank's local problem (its shard of the samples).

    Parameters
    ----------
    problem : Problem
        This rank's problem (e.g. a :class:`~marquardt.network.ModuleProblem` on its shard).
    reducer : Reducer
        Sums over the ranks.
    forcing : {"eisenstat-walker", "local"}
        The CG tolerance of matrix-free solves: Eisenstat-Walker's forcing term from the summed
        gradient, as :class:`~marquardt.network.ModuleProblem` computes it in one process; or
        the local system's own ``rtol``, which must then be the same on every rank.

    Notes
    -----
    With the rows of ``J`` and ``r`` split by sample over ranks ``k``:

    ``J^T J = sum_k J_k^T J_k``, ``J^T r = sum_k J_k^T r_k``, ``cost = sum_k cost_k``.

    :meth:`linearize` sends the upper triangle of ``J^T J`` (about ``n^2 / 2`` numbers), ``J^T r``
    and the cost in one reduction; :meth:`cost` sends one number. The result is a
    :class:`~marquardt.chunked.AccumulatedNormalEquations` system without rows, solved as one
    process solves it: the damping floored at ``eps * trace``, and the eigen-decomposition of
    the damped ``J^T J`` where even then Cholesky refuses.

    With fewer residuals than parameters in all (``m < n``), when every rank holds its rows
    (the residual-space form, chosen by each local problem), the rows are gathered instead: each
    rank places ``[J_k | r_k]`` at its offset in an ``m x (n + 1)`` buffer of zeros and the
    buffers are summed. Every rank then solves in residual space, as one process would; this
    sends ``m (n + 1)`` numbers instead of ``n^2 / 2`` and keeps the accurate residual-space
    solve, which the (then singular) ``J^T J`` could not give. The layout (row counts and
    forms) is agreed by one small reduction at the first linearization.

    When the local system is matrix-free (:mod:`marquardt.matfree`: ``J^T J`` is never formed),
    only ``J^T r`` and the cost are reduced here, and the system becomes a
    :class:`ReducedMatrixFree`: each conjugate-gradient product ``J^T J v = sum_k J_k^T (J_k v)``
    reduces one ``n``-vector.

    Examples
    --------
    >>> from marquardt.solver import FunctionProblem
    >>> local = FunctionProblem(lambda x: x - 1.0, None, 2)
    >>> problem = ReducedProblem(local, LocalReducer())
    >>> lin = problem.linearize(torch.zeros(2, dtype=torch.float64))
    >>> lin.cost, lin.grad.tolist(), lin.system.name
    (1.0, [-1.0, -1.0], 'cholesky')
    """

    problem: Problem
    reducer: Reducer = field(default_factory=LocalReducer)
    forcing: str = "eisenstat-walker"
    _rows: tuple[int, int, bool] | None = field(default=None, init=False, repr=False)
    _forcing: tuple[float, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.forcing not in ("eisenstat-walker", "local"):
            raise ValueError(f"Invalid forcing: {self.forcing!r}; expected 'eisenstat-walker' or 'local'.")

    def resume_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The local problem's :meth:`~marquardt.network.ModuleProblem.resume_state` and the summed
        gradient's norm and forcing term of the last matrix-free linearization, for a checkpoint."""
        tensors, meta = self.problem.resume_state() if hasattr(self.problem, "resume_state") else ({}, {})
        if self._forcing is not None:
            meta = {**meta, "reduced_forcing": list(self._forcing)}
        return tensors, meta

    def load_resume_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from a :meth:`resume_state` (an empty one leaves the problem as new)."""
        if hasattr(self.problem, "load_resume_state"):
            self.problem.load_resume_state(tensors, meta)
        forcing = meta.get("reduced_forcing")
        self._forcing = None if forcing is None else (float(forcing[0]), float(forcing[1]))

    def cost(self, x: Tensor) -> float:
        """The total cost over the ranks (``inf`` when it is not finite on any rank)."""
        value = self.reducer.sum_scalar(self.problem.cost(x))
        return value if math.isfinite(value) else math.inf

    def linearize(self, x: Tensor) -> Linearization:
        """The summed normal equations (or matrix-free operator), gradient and cost at ``x``."""
        lin = self.problem.linearize(x)
        if self.reducer.world_size == 1:
            return lin
        if _is_matrix_free(lin.system):
            return self._matrix_free(lin)
        n = lin.grad.numel()
        base, dtype = _assembled(lin.system)
        offset, m, gather = self._layout(base, n)
        if gather:
            return self._gathered(base, offset, m, n, dtype)
        gram = _gram(base)
        total = self.reducer.sum(torch.cat([pack_upper(gram), lin.grad.to(gram.dtype), gram.new_tensor([lin.cost])]))
        split = total.numel() - n - 1
        # As one process solves it (AccumulatedNormalEquations: the damping floored at
        # eps * trace, LAPACK's factor), so that the ranks take its steps; one "chunk", so that
        # the recorded path is the same on every rank.
        system = AccumulatedNormalEquations(unpack_upper(total[:split], n).tril_())
        grad = total[split:-1].clone()
        if dtype is not None:
            system, grad = PromotedEquations(system, dtype), grad.to(dtype)
        return Linearization(float(total[-1]), grad, system)

    def _matrix_free(self, lin: Linearization) -> Linearization:
        """Sum ``J^T r`` and the cost; the CG system reduces its products, to a forcing term from the summed gradient.

        A local problem's Eisenstat-Walker forcing (its CG tolerance) comes from its own gradient
        norm, which differs between ranks; the ranks must run the same CG iterations, so the
        forcing is recomputed here, as one process would, from the norm of the summed gradient.
        """
        from .matfree import eisenstat_walker

        total = self.reducer.sum(torch.cat([lin.grad, lin.grad.new_tensor([lin.cost])]))
        grad = total[:-1].clone()
        if self.forcing == "local":
            return Linearization(float(total[-1]), grad, ReducedMatrixFree(lin.system, self.reducer))
        norm = float(torch.linalg.vector_norm(grad))
        forcing = eisenstat_walker(norm, *(self._forcing or (None, None)))
        self._forcing = (norm, forcing)
        return Linearization(float(total[-1]), grad, ReducedMatrixFree(lin.system, self.reducer, rtol=forcing))

    def _layout(self, system: Any, n: int) -> tuple[int, int, bool]:
        """``(first row of this rank, rows of all ranks, gather the rows)``, agreed once by all ranks."""
        if self._rows is None:
            rows = getattr(system, "jac", None) if getattr(system, "gram", None) is None else None
            counts = [0.0] * (self.reducer.world_size + 1)
            counts[self.reducer.rank] = float(rows.shape[0]) if rows is not None else 0.0
            counts[-1] = 1.0 if rows is not None else 0.0
            counts = sum_values(counts, self.reducer)
            m = int(sum(counts[:-1]))
            everyone_holds_rows = int(counts[-1]) == self.reducer.world_size
            self._rows = (int(sum(counts[: self.reducer.rank])), m, everyone_holds_rows and m < n)
        return self._rows

    def _gathered(self, system: Any, offset: int, m: int, n: int, dtype: torch.dtype | None) -> Linearization:
        """All ranks' rows, summed into place; the residual-space system of one process."""
        jac, residuals = system.jac, system.residuals
        rows = jac.new_zeros(m, n + 1)
        rows[offset : offset + jac.shape[0], :n] = jac
        rows[offset : offset + jac.shape[0], n] = residuals
        rows = self.reducer.sum(rows)
        jac, residuals = rows[:, :n].contiguous(), rows[:, n].contiguous()
        cost, grad, system = 0.5 * float(residuals @ residuals), jac.T @ residuals, SampleSpaceEquations(jac, residuals)
        if dtype is not None:
            system, grad, jac, residuals = PromotedEquations(system, dtype), grad.to(dtype), jac.to(dtype), residuals.to(dtype)
        return Linearization(cost, grad, system, residuals, jac)


def _is_matrix_free(system: Any) -> bool:
    return callable(getattr(system, "jvp", None)) and callable(getattr(system, "vjp", None))


class ReducedMatrixFree:
    """A matrix-free system (:class:`marquardt.matfree.MatrixFreeEquations`) summed over the ranks.

    Parameters
    ----------
    local : MatrixFreeEquations
        This rank's system: ``jvp`` and ``vjp`` of its shard's Jacobian ``J_k``.
    reducer : Reducer
        Sums over the ranks.
    rtol : float, optional
        CG tolerance (forcing term), the same on every rank; default the local system's.

    Notes
    -----
    The solve is conjugate gradients on ``(sum_k J_k^T J_k + damping D) h = -g``: every
    product ``J_k^T (J_k v)`` is computed locally and its ``n``-vector reduced, so a solve of
    ``i`` iterations sends ``i`` vectors of ``n`` numbers instead of one ``n x n`` matrix. The
    diagonal is reduced once. Every rank runs the same iterations on the same reduced vectors,
    so all take the same number of iterations and reach the same step.
    """

    def __init__(self, local: Any, reducer: Reducer, *, rtol: float | None = None) -> None:
        from .matfree import MatrixFreeEquations

        self.reducer = reducer
        self.name = local.name
        self._local = local
        self._system = MatrixFreeEquations(
            local.jvp, lambda u: reducer.sum(local.vjp(u)), lambda: reducer.sum(local.diagonal()),
            initial=local.initial, rtol=local.rtol if rtol is None else rtol, max_iter=local.max_iter,
            precondition=local.precondition,
        )
        self._solution: Tensor | None = None

    @property
    def path(self) -> str:
        """The solver path last taken (``"cg"``)."""
        return self._system.path

    @property
    def iterations(self) -> int:
        """CG iterations of the last solve (each one reduction of ``n`` numbers)."""
        return self._system.iterations

    @property
    def reason(self) -> str:
        """Why the last CG solve stopped."""
        return self._system.reason

    def diagonal(self) -> Tensor:
        """``diag(J^T J)`` summed over the ranks."""
        return self._system.diagonal()

    def gram_product(self, vector: Tensor) -> Tensor:
        """``J^T J v`` summed over the ranks."""
        return self._system.gram_product(vector)

    def solve(self, grad: Tensor, damping: float, scale: Tensor, residuals: Tensor | None = None) -> Tensor:
        """The inexact damped step by CG on the summed operator."""
        self._solution = self._system.solve(grad, damping, scale)
        return self._solution

    def curvature(self, step: Tensor) -> Tensor:
        """``h^T J^T J h``: free for the step just solved (CG keeps ``A h``), else one reduction."""
        if self._solution is not None and torch.equal(step, self._solution):
            return self._system.curvature(step)
        local = self._local.jvp(step)
        return self.reducer.sum((local @ local).reshape(1))[0]


# ---------------------------------------------------------------------------------------------
# the pieces of a sharded training run


def shard_bounds(n_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block of samples ``[start, stop)`` that ``rank`` holds.

    Blocks differ in size by at most one sample and cover ``range(n_samples)`` in rank order.

    Examples
    --------
    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    # A float count gave float bounds (X[0.0:5.0] then failed far from here); a bool is a mistake.
    for name, value, least in (("n_samples", n_samples, 0), ("world_size", world_size, 1)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"Invalid {name} value: {value!r}; expected an integer >= {least}.")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"Invalid rank value: {rank!r}; expected an integer in [0, world_size).")
    n_samples, rank, world_size = int(n_samples), int(rank), int(world_size)
    if not (0 <= rank < world_size):
        raise ValueError(f"Invalid rank {rank!r} for world_size {world_size!r}; expected 0 <= rank < world_size.")
    if n_samples < world_size:
        raise ValueError(f"Cannot shard {n_samples} samples over {world_size} ranks; every rank needs at least one.")
    return rank * n_samples // world_size, (rank + 1) * n_samples // world_size


def synchronize_module(model: nn.Module, reducer: Reducer, options: Mapping[str, Any] | None = None) -> None:
    """Copy rank 0's parameters and buffers into ``model`` on every rank (in place, once).

    The ranks first agree that their models have the same tensors (count, elements, bytes and
    a checksum of the shapes and dtypes) and the same layers (each submodule's class and
    ``extra_repr``, so ``Tanh`` on one rank and ``Sigmoid`` on another), and, when given, the
    same ``options`` (the training options, which must match on every rank). A broadcast of
    tensors of different sizes would abort a process inside the backend; layers or options that
    differ gave every rank other steps, and weights that parted silently. A mismatch raises
    ValueError on every rank, naming the ranks (and the options) that differ.

    Examples
    --------
    >>> synchronize_module(torch.nn.Linear(1, 1), LocalReducer(), {"method": "lm"})
    """
    if reducer.world_size == 1:
        return
    _require_same_layout(model, reducer, {} if options is None else options)
    with torch.no_grad():
        for tensor in _state_tensors(model):
            tensor.copy_(reducer.broadcast(tensor))


def _state_tensors(model: nn.Module) -> Iterable[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _layers_text(model: nn.Module) -> str:
    """Each submodule's name, class and ``extra_repr`` (sizes, slopes): the model's structure,
    without a device or an address that may differ between ranks of one run."""
    return json.dumps([[name, type(module).__qualname__, module.extra_repr()]
                       for name, module in model.named_modules()])


def _option_value(value: Any) -> Any:
    # A class or function (method=torch.optim.Adam) by its name, a tensor by its values; any
    # other object by its type, whose repr may hold an address that differs between ranks.
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return f"<{type(value).__name__}>"


def _options_text(options: Mapping[str, Any]) -> str:
    return json.dumps({str(key): value for key, value in options.items()}, sort_keys=True, default=_option_value)


def _require_same_layout(model: nn.Module, reducer: Reducer, options: Mapping[str, Any]) -> None:
    """Raise ValueError on every rank unless all ranks' models and options agree (one reduction)."""
    tensors = list(_state_tensors(model))
    shapes = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    layers, settings = _layers_text(model), _options_text(options)
    # crc32 < 2^32 and the counts are exact in float64.
    code = [len(tensors), sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors),
            zlib.crc32(shapes.encode()), zlib.crc32(layers.encode()), zlib.crc32(settings.encode())]
    rows = gather_rows(torch.tensor([code], dtype=torch.float64), reducer).long().tolist()
    differ = [r for r, row in enumerate(rows) if row[:4] != rows[0][:4]]
    if differ:
        describe = lambda r: f"rank {r}: {rows[r][0]} tensors, {rows[r][1]} elements, {rows[r][2]} bytes"  # noqa: E731
        raise ValueError(
            f"The model differs between ranks ({'; '.join(describe(r) for r in [0, *differ])}; same counts mean "
            "other shapes or dtypes). Build the same model, with the same layers, sizes and dtype, on every rank."
        )
    # Every rank holds the same rows, so all of them join (or skip) these gathers together.
    if any(row[4] != rows[0][4] for row in rows):
        texts = _gather_texts(layers, reducer)
        raise ValueError(f"The model's layers differ between ranks ({_text_differences(texts)}). Build the same "
                         "model, with the same layers and activations, on every rank.")
    if any(row[5] != rows[0][5] for row in rows):
        texts = _gather_texts(settings, reducer)
        raise ValueError(f"The training options differ between ranks ({_text_differences(texts)}). Pass the same "
                         "options on every rank: each rank would take other steps, and the weights would part.")


#: Bytes of a model's or options' description that the ranks exchange to name a difference.
_TEXT_BYTES = 4096


def _gather_texts(text: str, reducer: Reducer) -> list[str]:
    """Every rank's ``text`` (at most ``_TEXT_BYTES`` of it), in rank order."""
    row = torch.zeros(1, _TEXT_BYTES, dtype=torch.uint8)
    data = text.encode("utf-8")[:_TEXT_BYTES]
    if data:
        row[0, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in gather_rows(row, reducer).numpy()]


def _text_differences(texts: list[str], shown: int = 4) -> str:
    """What differs between rank 0's JSON description and each other rank's, in words."""
    try:
        parsed = [json.loads(text) for text in texts]
    except ValueError:  # cut at _TEXT_BYTES: name the ranks only
        return "; ".join(f"rank {r} differs from rank 0" for r in range(1, len(texts)) if texts[r] != texts[0])
    if all(isinstance(item, list) for item in parsed):  # layers: [name, class, extra_repr] rows
        parsed = [{f"layer {row[0]}" if row[0] else "model": f"{row[1]}({row[2]})" for row in item} for item in parsed]
    text = lambda entries, key: repr(entries[key]) if key in entries else "not given"  # noqa: E731
    lines = [f"{key}: {text(parsed[0], key)} on rank 0, {text(other, key)} on rank {r}"
             for r, other in enumerate(parsed[1:], start=1) for key in dict.fromkeys([*parsed[0], *other])
             if text(parsed[0], key) != text(other, key)]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def global_scale(local_scale: float, reducer: Reducer) -> float:
    """The performance scale of the whole data set from one shard's (``c / count`` for every loss).

    ``perf = scale * cost`` with ``scale = c / count`` (``count`` elements or samples), so the
    counts, ``c / scale``, add over the ranks.

    Examples
    --------
    >>> global_scale(2.0 / 10, LocalReducer())
    0.2
    """
    if reducer.world_size == 1:
        return local_scale
    return 1.0 / reducer.sum_scalar(1.0 / local_scale)


def average_gradients(parameters: Iterable[Tensor], reducer: Reducer, weight: float,
                      loss: Tensor | None = None) -> Tensor | None:
    """Replace each ``.grad`` by ``sum_k weight_k * grad_k`` over the ranks, in one reduction.

    With ``weight`` this rank's share of the samples (``count_k / count``), the gradients of
    per-rank mean losses become the gradient of the mean loss over all samples. With ``loss``
    (this rank's mean loss), ``sum_k weight_k * loss_k``, the mean loss over all samples, is
    reduced in the same message (one number more, no collective more) and returned; else None.

    Examples
    --------
    >>> w = torch.ones(2, requires_grad=True); (w ** 2).sum().backward()
    >>> float(average_gradients([w], LocalReducer(), 1.0, loss=torch.tensor(3.0))), w.grad.tolist()
    (3.0, [2.0, 2.0])
    """
    if reducer.world_size == 1:
        return loss
    grads = [p.grad for p in parameters if p.grad is not None]
    parts = [g.reshape(-1) for g in grads]
    if loss is not None:
        # In the gradients' dtype, so that the message stays one tensor (torch.cat would promote).
        parts.append(loss.detach().reshape(1).to(grads[0].dtype if grads else torch.float64))
    if not parts:
        return None
    total = reducer.sum(torch.cat(parts) * weight)
    offset = 0
    for g in grads:
        g.copy_(total[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return None if loss is None else total[-1].to(loss.dtype)


def slowest(seconds: float, reducer: Reducer) -> float:
    """The largest ``seconds`` over the ranks, so that a time limit stops every rank at the same epoch."""
    if reducer.world_size == 1:
        return seconds
    return float(reducer.maximum(torch.tensor([seconds], dtype=torch.float64))[0])


def sum_values(values: Iterable[float], reducer: Reducer) -> list[float]:
    """Several numbers summed over the ranks in one reduction (float64).

    Examples
    --------
    >>> sum_values([1.0, 2.5], LocalReducer())
    [1.0, 2.5]
    """
    values = [float(v) for v in values]
    if reducer.world_size == 1:
        return values
    return reducer.sum(torch.tensor(values, dtype=torch.float64)).tolist()


def require_same(flags: dict[str, bool], reducer: Reducer) -> None:
    """Raise ValueError on every rank unless all ranks hold the same ``flags`` (one reduction).

    Examples
    --------
    >>> require_same({"validation data": True}, LocalReducer())
    """
    if reducer.world_size == 1:
        return
    totals = sum_values(flags.values(), reducer)
    mixed = [name for name, total in zip(flags, totals) if 0 < total < reducer.world_size]
    if mixed:
        counts = ", ".join(f"{name} on {int(total)} of {reducer.world_size} ranks"
                           for name, total in zip(flags, totals) if name in mixed)
        # The flags name fit's arguments ("test data" is test_data): the fix names the ones that differ.
        arguments = " and ".join(name.replace(" ", "_") for name in mixed)
        raise ValueError(f"Ranks disagree: {counts}. Every rank must hold a shard of each data set: give every "
                         f"rank {arguments}, or enough samples that division leaves some in each set.")


@dataclass
class ShardedCheckpoint:
    """A :class:`marquardt.checkpoint.Checkpointer` for a sharded run: rank 0 writes, every rank reads.

    Everything a checkpoint holds (weights, damping, History, best weights) is the same on every
    rank. What it records of the data (the checkpoint's digest of the training, validation and
    test sets) is taken over all ranks' samples in rank order, which for contiguous shards
    (:func:`shard_bounds`) is the data set itself: so a run resumes on any number of ranks, or
    on one process, given the same samples (without ``division``, which divides each shard).

    Notes
    -----
    At :meth:`restore` every rank gathers the samples of all ranks once (one reduction per
    tensor, ``N`` rows each), and rank 0 keeps them for the digest of its writes: with
    checkpoints, rank 0 holds a copy of the whole data set. The folder must be visible to every
    rank (a shared file system).
    """

    inner: Any
    reducer: Reducer
    _view: Any = field(default=None, init=False, repr=False)

    def restore(self, loop: Any, best: Any) -> tuple[int, int, float]:
        """Every rank loads the newest checkpoint, once the ranks agree on which one it is."""
        self._require_same_checkpoint()
        splits = [None if split is None else _Rows(gather_rows(split.X, self.reducer), gather_rows(split.y, self.reducer))
                  for split in (loop.train, loop.val, loop.test)]
        view = _WholeRun(loop, *splits)
        result = self.inner.restore(view, best)
        self._view = view if self.reducer.rank == 0 else None
        return result

    def epoch_done(self, loop: Any, epoch: int, best: Any, val_fail: int, elapsed: float) -> None:
        """Rank 0 writes; the others carry on."""
        if self.reducer.rank == 0:
            self.inner.epoch_done(self._view, epoch, best, val_fail, elapsed)

    def train_done(self) -> None:
        """Rank 0 writes the final checkpoint (its own :meth:`epoch_done` kept the state)."""
        if self.reducer.rank == 0:
            self.inner.train_done()

    def claim(self) -> None:
        """Rank 0, the one that writes, locks the folder before any work."""
        if self.reducer.rank == 0:
            self.inner.claim()

    def close(self) -> None:
        """Drop rank 0's lock on the folder (a run that raised)."""
        if self.reducer.rank == 0:
            self.inner.close()

    def _require_same_checkpoint(self) -> None:
        """Raise CheckpointError on every rank unless all ranks see the same newest checkpoint (or none).

        Checked before any weight is loaded. A folder that is not shared (each machine's own
        disk, or another path on one rank) let rank 0 resume while the others started over:
        the ranks then summed linearizations taken at different weights, and rank 0 wrote
        that mixture as the next checkpoint.
        """
        from .checkpoint import CheckpointError, latest_checkpoint

        folder = self.inner.folder
        try:
            found = latest_checkpoint(folder) if self.inner.resume else None
            name = b"" if found is None else found.stem.encode("utf-8", "replace")[:_NAME_BYTES]
        except (OSError, ValueError):  # a garbled pointer: the restore names it, once the ranks agree
            name = b"(unreadable latest.txt)"
        row = torch.zeros(1, _NAME_BYTES, dtype=torch.uint8)
        if name:
            row[0, : len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
        names = [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in gather_rows(row, self.reducer).numpy()]
        if len(set(names)) > 1:
            seen = "; ".join(f"rank {r}: {name or 'no checkpoint'}" for r, name in enumerate(names))
            raise CheckpointError(
                folder, f"is not the same folder on every rank ({seen})",
                "Every rank must read the one checkpoint folder, on a file system the ranks share: pass the same "
                "folder on every rank, or resume=False to start over."
            )


@dataclass
class _Rows:
    X: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.X.shape[0]


class _WholeRun:
    """The epoch loop as a checkpoint sees it: the data sets hold all ranks' samples."""

    def __init__(self, loop: Any, train: _Rows, val: _Rows | None, test: _Rows | None) -> None:
        self._loop = loop
        self.train, self.val, self.test = train, val, test

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def gather_rows(tensor: Tensor, reducer: Reducer) -> Tensor:
    """All ranks' ``tensor`` stacked along the first dimension in rank order, on every rank.

    Built from sums only: each rank writes its rows at its offset in a buffer of zeros and the
    buffers are summed (one small reduction for the row counts, one for the rows).

    Examples
    --------
    >>> gather_rows(torch.arange(3), LocalReducer()).tolist()
    [0, 1, 2]
    """
    if reducer.world_size == 1:
        return tensor
    counts = [0.0] * reducer.world_size
    counts[reducer.rank] = float(tensor.shape[0])
    counts = [int(c) for c in sum_values(counts, reducer)]
    start = sum(counts[: reducer.rank])
    rows = tensor.new_zeros((sum(counts),) + tuple(tensor.shape[1:]))
    rows[start : start + tensor.shape[0]] = tensor
    return reducer.sum(rows)


def global_range(data: Tensor, reducer: Reducer) -> Tensor:
    """Rows ``[min, max]`` over the samples of all ranks, feature by feature (shape ``(2, ...)``).

    Examples
    --------
    >>> global_range(torch.tensor([[1.0, 5.0], [3.0, -2.0]]), LocalReducer()).tolist()
    [[1.0, -2.0], [3.0, 5.0]]
    """
    extremes = torch.stack([-data.amin(dim=0), data.amax(dim=0)])
    extremes = reducer.maximum(extremes)
    return torch.stack([-extremes[0], extremes[1]])
