"""Data-parallel LM (marquardt.distributed): 2 gloo ranks on CPU agree with one process on all data.

Each multi-process test starts its ranks with the ``spawn`` start method, a free localhost port
and ``MASTER_ADDR=127.0.0.1``; every rank puts ``(rank, outcome)`` on a queue, and the parent
waits for them with a bounded join. Networks are tiny and runs short.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from queue import Empty
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from marquardt import Callback, fit, mlp
from marquardt.damping import MarquardtDamping
from marquardt.distributed import (
    DistributedError,
    LocalReducer,
    ReducedProblem,
    average_gradients,
    global_range,
    global_scale,
    initialize,
    make_reducer,
    pack_upper,
    payload_bytes,
    shard_bounds,
    synchronize_module,
    unpack_upper,
)
from marquardt.network import ModuleProblem, flatten_parameters
from marquardt.solver import FunctionProblem, lm_step

WORLD = 2
JOIN_TIMEOUT = 120.0  # seconds for a whole multi-process test; failures must come well before


# ---------------------------------------------------------------------------------------------
# shared problem and single-process references


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def tiny_data(n: int = 41) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1
    return X, torch.sin(2 * X[:, :1]) * torch.cos(X[:, 1:])


def lm_run(problem: Any, x: torch.Tensor, steps: int) -> torch.Tensor:
    """MATLAB trainlm's iteration (Marquardt damping, identity scale), as LMTrainer runs it."""
    rule = MarquardtDamping()
    state = rule.init(1.0)
    scale = torch.ones_like(x)
    for _ in range(steps):
        out = lm_step(problem, x, problem.linearize(x), scale, rule, state)
        x, state = out.x, out.state
    return x


def gd_run(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, reducer: Any, weight: float) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        average_gradients(model.parameters(), reducer, weight)
        optimizer.step()
    return flatten_parameters(model)


def validation_data() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = tiny_data(24)
    return X.flip(0) * 0.9, y.flip(0)


def fit_runs(shard: Callable, distributed: bool, checkpoint: str | None = None) -> dict[str, Any]:
    """fit() by LM (with validation data), trainbr, momentum and a normalized MLP; weights and History."""
    X, y = shard(*tiny_data())
    Xv, yv = shard(*validation_data())
    out: dict[str, Any] = {}
    rank = int(os.environ.get("RANK", "0"))
    runs = {"lm": (tiny_net, dict(method="lm", validation_data=(Xv, yv))), "br": (tiny_net, dict(method="br")),
            "momentum": (tiny_net, dict(method="momentum", lr=0.2)),
            "matrix_free": (cg_net, dict(method="lm", solver="matrix-free")),
            # LBFGS reads the closure's loss (line search, tolerance_change). Over 20 steps it
            # amplifies rounding (the samples merely permuted in one process move its weights
            # by 1e-8 after 3 epochs of 20 iterations): 4 epochs of 5 iterations keep it to 1e-12.
            "lbfgs": (tiny_net, dict(method=torch.optim.LBFGS, max_iter=5, line_search_fn="strong_wolfe",
                                     epochs=4))}
    for name, (net, options) in runs.items():
        model = tiny_net(seed=rank) if net is tiny_net else net()  # fit sends rank 0's weights
        history = fit(model, X, y, **{"epochs": 8, "distributed": distributed, **options})
        out[name] = flatten_parameters(model)
        out[name + "_solver"] = history["solver"][1:]
        out[name + "_history"] = {k: history[k] for k in ("perf", "vperf", "gradient", "damping", "gamma")
                                  if k in history.records[0]}
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    model = mlp(2, 4, 1, dtype=torch.float64)
    fit(model, X * 3 + 1, y * 5, epochs=6, distributed=distributed)
    out["mlp"] = torch.cat([t.reshape(-1) for t in model.state_dict().values() if t.is_floating_point()])
    if checkpoint is not None:
        fit(tiny_net(), X, y, epochs=4, distributed=distributed, checkpoint=checkpoint, checkpoint_every=2)
    return out


def uneven_runs(shard: Callable, distributed: bool) -> dict[str, torch.Tensor]:
    """fit() by LM, trainbr and momentum where one rank holds 40 samples and the other 1.

    The one-sample shard is in residual-space form locally and the other in normal form: the
    reduction turns both into ``J^T J``.
    """
    X, y = tiny_data()
    out = {}
    for method, options in {"lm": {}, "br": {}, "momentum": {"lr": 0.2}}.items():
        model = tiny_net()
        fit(model, shard(X), shard(y), epochs=6, method=method, distributed=distributed, **options)
        out[method] = flatten_parameters(model)
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ---------------------------------------------------------------------------------------------
# launching ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _portable(value: Any) -> Any:
    # Tensors would travel as shared-memory handles that die with the rank: send numpy copies.
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def _entry(rank: int, world: int, port: int, timeout: float, fn: Callable, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        reducer = initialize(backend="gloo", timeout=timeout)
        queue.put((rank, "ok", _portable(fn(reducer))))
    except BaseException as error:  # noqa: BLE001 - the parent asserts on every outcome
        queue.put((rank, type(error).__name__, f"{error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, *, world: int = WORLD, timeout: float = 30.0) -> dict[int, tuple[str, Any]]:
    """Run ``fn(reducer)`` on ``world`` gloo ranks; ``{rank: (outcome, value)}``, "ok" or the error type."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, timeout, fn, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        # Until every rank reported, or every rank is gone (a rank that died reports nothing).
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, outcome, value = queue.get(timeout=0.5)
            except Empty:
                if not any(proc.is_alive() for proc in procs) and queue.empty():
                    break
                continue
            results[rank] = (outcome, _tensors(value))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


# ---------------------------------------------------------------------------------------------
# rank bodies (module level, so that spawn can import them)


def _shard(reducer: Any, *tensors: torch.Tensor) -> list[torch.Tensor]:
    start, stop = shard_bounds(tensors[0].shape[0], reducer.rank, reducer.world_size)
    return [t[start:stop] for t in tensors]


def _agreement_body(folder: str, reducer: Any) -> dict[str, Any]:
    X, y = tiny_data()
    X_k, y_k = _shard(reducer, X, y)
    model = tiny_net(seed=reducer.rank)  # different on each rank until synchronised
    synchronize_module(model, reducer)
    x0 = flatten_parameters(model)
    out: dict[str, Any] = {"x0": x0}
    # 41 samples, 25 parameters: each 20-sample shard is in residual-space form locally.
    local = ModuleProblem(model, X_k, y_k)
    out["local_form"] = local.plan.form
    problem = ReducedProblem(local, reducer)
    problem.linearize(x0)  # the first one also agrees the layout (row counts, forms)
    before = reducer.bytes, reducer.calls
    lin = problem.linearize(x0)
    out["linearize_bytes"], out["linearize_calls"] = reducer.bytes - before[0], reducer.calls - before[1]
    out["grad"], out["gram"], out["cost"] = lin.grad, lin.system.gram, lin.cost
    out["lm"] = lm_run(problem, x0, steps=8)
    local_scale = 2.0 / y_k.numel()  # mse = (2 / elements) * cost
    weight = global_scale(local_scale, reducer) / local_scale  # this rank's share of the elements
    out["gd"] = gd_run(model, X_k, y_k, steps=10, reducer=reducer, weight=weight)
    out["range"] = global_range(X_k, reducer)
    out["gathered"] = _gathered_run(reducer)
    out["closure"] = _closure_run(reducer, X_k, y_k)
    out["matrix_free"] = _matrix_free_run(reducer, X_k, y_k) if _has_matrix_free() else None
    out.update({f"fit_{k}": v for k, v in fit_runs(functools.partial(_shard, reducer), True, folder).items()})
    out["cli_status"] = cli_fit(Path(folder).parent / "data.csv", Path(folder).parent / "cli-2-ranks")
    out["uneven"] = uneven_runs(lambda X: X[:40] if reducer.rank == 0 else X[40:], True)
    out["resume"] = _resume_body(str(Path(folder).parent / "resume"), reducer)
    return out


def write_csv(path: Path) -> None:
    X, y = tiny_data()
    rows = ["a,b,y"] + [f"{a!r},{b!r},{t!r}" for (a, b), (t,) in zip(X.tolist(), y.tolist())]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def cli_fit(data: Path, out: Path) -> int:
    from marquardt.cli import main

    return main(["fit", str(data), "--target", "y", "--out", str(out), "--seed", "3", "--epochs", "6",
                 "--hidden", "4", "--division", "none"])


def _gathered_run(reducer: Any) -> dict[str, Any]:
    # 20 samples, 25 parameters: fewer residuals than parameters in all, so the rows are gathered.
    X, y = _shard(reducer, *tiny_data(20))
    problem = ReducedProblem(ModuleProblem(tiny_net(), X, y), reducer)
    x0 = flatten_parameters(tiny_net())
    problem.linearize(x0)  # agrees the layout (one small reduction)
    before = reducer.bytes, reducer.calls
    lin = problem.linearize(x0)
    sent = {"form": lin.system.name, "bytes": reducer.bytes - before[0], "calls": reducer.calls - before[1]}
    return {"x": lm_run(problem, x0, steps=8), **sent}


def _closure_run(reducer: Any, X: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One call of a first-order trainer's closure: the loss it returns and what it sent."""
    from marquardt.train import FirstOrderTrainer, Split

    model = tiny_net()
    trainer = FirstOrderTrainer(model, Split(X, y), torch.optim.SGD(model.parameters(), lr=0.1), reducer=reducer)
    before = reducer.bytes, reducer.calls
    loss = trainer._loss_and_gradient(X, y)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return {"loss": float(loss), "grad": grad, "bytes": reducer.bytes - before[0], "calls": reducer.calls - before[1]}


def _has_matrix_free() -> bool:
    try:
        import marquardt.matfree  # noqa: F401
    except ImportError:
        return False
    return True


def cg_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()


class MatrixFreeShard:
    """A module problem whose linear system is matrix-free: ``J v`` and ``J^T u`` on its samples.

    CG in floating point amplifies rounding from one iteration to the next, the more so the
    worse ``J^T J`` is conditioned: on ``tiny_net`` (25 parameters, eigenvalues of ``J^T J`` down
    to 1e-15) merely summing ``J^T u`` in two blocks *in one process* moves the weights after
    8 inexact LM steps by 7e-2 (relative). The comparison therefore uses ``cg_net`` (9
    parameters), where the same change moves them by 5e-9, so that what is measured is the
    reduction, not CG's sensitivity.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.inner = ModuleProblem(cg_net(), X, y)

    def cost(self, x: torch.Tensor) -> float:
        return self.inner.cost(x)

    def linearize(self, x: torch.Tensor) -> Any:
        from marquardt.matfree import MatrixFreeEquations
        from marquardt.solver import Linearization

        J, r = (torch.cat(parts) for parts in zip(*self.inner.jacobian_chunks(x)))
        system = MatrixFreeEquations(lambda v: J @ v, lambda u: J.T @ u, lambda: (J * J).sum(0), rtol=1e-3)
        return Linearization(0.5 * float(r @ r), J.T @ r, system)


def _matrix_free_run(reducer: Any, X: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    problem = ReducedProblem(MatrixFreeShard(X, y), reducer, forcing="local")  # its fixed rtol, as one process
    x0 = flatten_parameters(cg_net())
    lin = problem.linearize(x0)
    before = reducer.bytes, reducer.calls
    lin.system.solve(lin.grad, 1e-3, torch.ones_like(x0))
    sent = reducer.bytes - before[0], reducer.calls - before[1]
    return {"x": lm_run(problem, x0, steps=8), "iterations": lin.system.iterations, "bytes": sent[0],
            "calls": sent[1]}


def _checkpoint_fit(folder: str | None, shard: Callable, epochs: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """fit() with validation data and a checkpoint every 2 epochs; the model and History."""
    model = tiny_net(seed=seed)
    history = fit(model, *shard(*tiny_data()), epochs=epochs, validation_data=tuple(shard(*validation_data())),
                  checkpoint=folder, checkpoint_every=2)
    return model, history


def _resume_body(folder: str, reducer: Any) -> dict[str, Any]:
    shard = functools.partial(_shard, reducer)
    model, history = _checkpoint_fit(folder, shard, epochs=7, seed=reducer.rank)  # rank 0's weights are sent
    out = {"x": flatten_parameters(model), "epoch": history["epoch"]}
    # Rank 1 given a folder of its own (a disk the ranks do not share): it sees no checkpoint.
    own = folder if reducer.rank == 0 else f"{folder}-rank-{reducer.rank}"
    try:
        _checkpoint_fit(own, shard, epochs=9)
        out["unshared"] = ("ok", "")
    except Exception as error:  # noqa: BLE001 - the test asserts on the outcome
        out["unshared"] = (type(error).__name__, str(error))
    try:
        _checkpoint_fit(f"{folder}-garbled", shard, epochs=9)
        out["garbled"] = ("ok", "")
    except Exception as error:  # noqa: BLE001 - the test asserts on the outcome
        out["garbled"] = (type(error).__name__, str(error))
    return out


class FailAt(Callback):
    """Rank 1 fails after epoch 2: by raising, or by exiting without a word."""

    def __init__(self, rank: int, how: str) -> None:
        self.rank, self.how = rank, how

    def on_epoch_end(self, history: Any, model: nn.Module) -> None:
        if self.rank == 1 and len(history) == 3:
            if self.how == "raise":
                raise ValueError("boom on purpose")
            os._exit(3)  # dies without a word: the peer must not wait forever


def _fail_in_fit(how: str, reducer: Any) -> str:
    X, y = _shard(reducer, *tiny_data())
    fit(tiny_net(), X, y, epochs=50, callbacks=[FailAt(reducer.rank, how)])
    return "finished"


def _bad_shard_in_fit(reducer: Any) -> str:
    X, y = _shard(reducer, *tiny_data())
    if reducer.rank == 0:
        y = y.clone()
        y[3, 0] = math.nan
    fit(tiny_net(), X, y, epochs=5)
    return "finished"


class StopAlone(Callback):
    """Stops training on rank 0 only, after epoch 1 (a callback reading rank-local state)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_epoch_end(self, history: Any, model: nn.Module) -> None:
        if self.rank == 0 and len(history) == 2:
            raise StopIteration


def _activated_net(activation: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), activation(), nn.Linear(6, 1)).double()


def _wider_net(rank: int) -> nn.Module:
    torch.manual_seed(0)
    width = 6 if rank == 0 else 7
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).double()


#: Ranks that disagree: what each rank passes to fit (rank 0, rank 1).
MISMATCHES = {
    "wider model": lambda rank, X, y: dict(model=_wider_net(rank), X=X, y=y, epochs=3),
    "float32 model": lambda rank, X, y: dict(model=tiny_net() if rank == 0 else tiny_net().float(), X=X, y=y, epochs=3),
    # Same tensors, another activation: the ranks summed Jacobians of two networks, silently.
    "sigmoid on rank 1": lambda rank, X, y: dict(model=_activated_net(nn.Sigmoid if rank else nn.Tanh), X=X, y=y,
                                                 epochs=3),
    "callback stops one rank": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=6,
                                                       callbacks=[StopAlone(rank)]),
    "fewer epochs on rank 0": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2 if rank == 0 else 6),
    # Options were checked before fail_together: rank 1 waited in its first collective.
    "bad option on rank 0": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2,
                                                    batch_size=8 if rank == 0 else None),
    "bad mu on rank 1": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2, mu=-1.0 if rank else 1e-3),
    # Checked before fail_together: rank 0 said only "collective failed (connection reset)".
    "callbacks not iterable on rank 1": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2,
                                                                callbacks=5 if rank else ()),
    "no module on rank 0": lambda rank, X, y: dict(model="net" if rank == 0 else tiny_net(), X=X, y=y, epochs=2),
    # Ranks whose code takes different paths reached collectives of other sizes: gloo aborted
    # rank 0 ("terminate called ... Received data size doesn't match expected size").
    "momentum on rank 1": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2,
                                                  method="momentum" if rank else "lm"),
    "checkpoint on rank 0 only": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2, checkpoint_every=1,
                                                         checkpoint=None if rank else os.environ["MISMATCH_FOLDER"]),
    "validation data on rank 0 only": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2,
                                                              validation_data=None if rank else validation_data()),
    "test data on rank 1 only": lambda rank, X, y: dict(model=tiny_net(), X=X, y=y, epochs=2,
                                                        test_data=validation_data() if rank else None),
}


def _mismatches_body(folder: str, reducer: Any) -> dict[str, Any]:
    # Every case ends with matched collectives on both ranks, so one process group serves them all.
    os.environ["MISMATCH_FOLDER"] = folder
    X, y = _shard(reducer, *tiny_data())
    out = {}
    for name, arguments in MISMATCHES.items():
        try:
            history = fit(**arguments(reducer.rank, X, y))
            out[name] = ("ok", f"{history.stop_reason} after epoch {len(history) - 1}")
        except Exception as error:  # noqa: BLE001 - the test asserts on every outcome
            out[name] = (type(error).__name__, str(error))
    # The training options fit passes: mu on rank 1 alone (each rank then damped its own steps
    # and the weights parted silently), and the same options on both ranks.
    for name, options in {"options": {"method": "lm", "mu": 0.1 if reducer.rank else 1e-3},
                          "same options": {"method": torch.optim.Adam, "lr": 0.01}}.items():
        try:
            synchronize_module(tiny_net(), reducer, options)
            out[name] = ("ok", "")
        except Exception as error:  # noqa: BLE001 - the test asserts on every outcome
            out[name] = (type(error).__name__, str(error))
    return out


#: The float32 LM run of _float32_resume_body: its epochs, the epoch after whose checkpoint a
#: run is "killed" (the folder copied as it stands), and the epochs of a run that ends early.
RESUME_EPOCHS, KILLED_AT, STOPPED_AT = 7, 4, 3
RESUME_RECORD = ("epoch", "perf", "vperf", "gradient", "damping", "val_fail")


class CopyCheckpoint(Callback):
    """On rank 0, after epoch ``epoch``: copy the checkpoint folder as a run killed there leaves it."""

    def __init__(self, rank: int, epoch: int, source: Path, target: Path) -> None:
        self.rank, self.epoch, self.source, self.target = rank, epoch, source, target

    def on_epoch_end(self, history: Any, model: nn.Module) -> None:
        if self.rank == 0 and len(history) == self.epoch + 1:
            shutil.copytree(self.source, self.target)


def _float32_fit(folder: Path | None, shard: Callable, epochs: int, callbacks: tuple = ()) -> dict[str, Any]:
    """fit() by LM of a float32 tiny_net (stepped in float64), with validation data; weights and History."""
    X, y = (t.float() for t in shard(*tiny_data()))
    Xv, yv = (t.float() for t in shard(*validation_data()))
    model = tiny_net().float()
    history = fit(model, X, y, epochs=epochs, validation_data=(Xv, yv), checkpoint=folder, checkpoint_every=2,
                  callbacks=callbacks)
    return {"x": flatten_parameters(model), "history": {key: history[key] for key in RESUME_RECORD}}


def _float32_resume_body(root: str, reducer: Any) -> dict[str, Any]:
    """The same float32 run uninterrupted (without and with checkpoints), resumed from a periodic
    checkpoint, and resumed from the final checkpoint of a run that ended early."""
    shard, root = functools.partial(_shard, reducer), Path(root)
    copy = CopyCheckpoint(reducer.rank, KILLED_AT, root / "straight", root / "killed")
    out = {"plain": _float32_fit(None, shard, RESUME_EPOCHS),
           "straight": _float32_fit(root / "straight", shard, RESUME_EPOCHS, (copy,))}
    out["killed"] = _float32_fit(root / "killed", shard, RESUME_EPOCHS)
    _float32_fit(root / "stopped", shard, STOPPED_AT)
    out["stopped"] = _float32_fit(root / "stopped", shard, RESUME_EPOCHS)
    return out


# ---------------------------------------------------------------------------------------------
# tests: pieces in one process


def test_pack_upper_round_trip_for_block_sizes():
    for n in (1, 5, 16, 17, 100, 531):
        a = torch.randn(n, n, dtype=torch.float64)
        gram = a @ a.T
        packed = pack_upper(gram)
        assert packed.numel() < n * n or n <= 16
        assert torch.equal(unpack_upper(packed, n), torch.triu(gram) + torch.triu(gram, 1).T)


def test_local_reducer_leaves_the_problem_as_it_is():
    local = FunctionProblem(lambda x: torch.stack([x[0] - 1, 2 * x[1]]), None, 2)
    x = torch.tensor([0.5, 0.5], dtype=torch.float64)
    reduced = ReducedProblem(local, LocalReducer())
    assert reduced.cost(x) == local.cost(x)
    assert torch.equal(lm_run(reduced, x, 3), lm_run(local, x, 3))


def test_make_reducer_without_process_group():
    assert isinstance(make_reducer(None), LocalReducer)
    assert isinstance(make_reducer(False), LocalReducer)
    with pytest.raises(DistributedError, match="torch.distributed is not initialized"):
        make_reducer(True)
    with pytest.raises(ValueError, match="Invalid distributed value: .yes.; expected None, True, False or a Reducer"):
        make_reducer("yes")


@pytest.mark.parametrize("n, rank, world, message", [
    (1, 0, 2, "Cannot shard 1 samples over 2 ranks"),
    (10, 2, 2, "Invalid rank 2 for world_size 2"),
    (10, -1, 2, "Invalid rank -1 for world_size 2"),
    # Float bounds came back ((0.0, 5.0)), which fail only when they slice X.
    (10.0, 0, 2, "Invalid n_samples value: 10.0; expected an integer >= 0"),
    (10, 0, 2.0, "Invalid world_size value: 2.0; expected an integer >= 1"),
    (10, 0.0, 2, r"Invalid rank value: 0.0; expected an integer in \[0, world_size\)"),
    (10, True, 2, r"Invalid rank value: True; expected an integer in \[0, world_size\)"),
    (-1, 0, 1, "Invalid n_samples value: -1; expected an integer >= 0"),
    (10, 0, 0, "Invalid world_size value: 0; expected an integer >= 1"),  # said "Invalid rank 0 for world_size 0"
])
def test_shard_bounds_bad_input(n, rank, world, message):
    with pytest.raises(ValueError, match=message):
        shard_bounds(n, rank, world)


def test_shard_bounds_are_python_ints_for_numpy_integers():
    bounds = shard_bounds(np.int64(41), np.int32(1), np.int64(2))
    assert bounds == (20, 41) and all(type(b) is int for b in bounds)


def test_shards_cover_the_samples_in_order():
    for n, world in ((10, 3), (41, 2), (7, 7)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.parametrize("value, expected", [(np.False_, LocalReducer), (False, LocalReducer), (None, LocalReducer)])
def test_make_reducer_takes_numpy_booleans(value, expected):
    assert type(make_reducer(value)) is expected
    with pytest.raises(DistributedError, match="torch.distributed is not initialized"):
        make_reducer(np.True_)  # was "Invalid distributed value: np.True_"


@pytest.mark.parametrize("timeout", [True, False, np.True_, math.nan, math.inf, -1.0, "30", None])
def test_initialize_refuses_bad_timeouts(timeout):
    with pytest.raises(ValueError, match="Invalid timeout value: .*expected a finite number of seconds > 0"):
        initialize(timeout=timeout)


@pytest.mark.parametrize("timeout", [np.float32(30.0), np.int64(30), 30, 0.5])
def test_initialize_takes_numeric_timeouts_then_asks_for_torchrun(monkeypatch, timeout):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):  # numpy numbers were refused as timeouts
        initialize(timeout=timeout)


@pytest.mark.parametrize("backend, message", [
    # torch raised AssertionError("Unknown backend type glooo") and "Backend constructor parameter must be string-ish".
    ("glooo", "Invalid backend value: 'glooo'; expected 'gloo', 'nccl' or None"),
    (7, "Invalid backend value: 7; expected 'gloo', 'nccl' or None"),
    pytest.param("nccl", "Invalid backend value: 'nccl'; NCCL needs CUDA", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available")),  # was AttributeError from torch.cuda
])
def test_initialize_refuses_bad_backends_before_anything_starts(monkeypatch, backend, message):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ValueError, match=message):
        initialize(backend=backend, timeout=5)
    assert not torch.distributed.is_initialized()


def test_initialize_outside_torchrun_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        initialize()
    with pytest.raises(ValueError, match="Invalid timeout value: 0"):
        initialize(timeout=0)


def one_rank_environment(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


@pytest.fixture
def exit_handlers(monkeypatch) -> list[tuple[Callable, tuple]]:
    """The atexit handlers registered during the test (not run at this process's exit); the
    default process group is destroyed afterwards whoever created it."""
    import atexit

    registered: list[tuple[Callable, tuple]] = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    one_rank_environment(monkeypatch)
    yield registered
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_handlers(handlers: list[tuple[Callable, tuple]]) -> None:
    for fn, args in handlers:
        fn(*args)


def test_initialize_destroys_the_group_it_created_at_exit(exit_handlers):
    # Without a teardown, gloo's threads outlived the interpreter and rank 0 of a 2-rank torchrun
    # often aborted after training ("terminate called without an active exception").
    initialize(backend="gloo", timeout=5)
    initialize(backend="gloo", timeout=5)  # the group is kept: no second handler
    assert len(exit_handlers) == 1
    run_handlers(exit_handlers)
    assert not torch.distributed.is_initialized()
    run_handlers(exit_handlers)  # already gone: nothing to do


def test_initialize_leaves_a_group_it_did_not_create_alone_at_exit(exit_handlers):
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))
    initialize(backend="gloo", timeout=5)
    assert exit_handlers == []
    assert torch.distributed.is_initialized()


def test_exit_handler_leaves_a_group_that_replaced_its_own_alone(exit_handlers, monkeypatch):
    initialize(backend="gloo", timeout=5)
    torch.distributed.destroy_process_group()
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))  # the caller's own
    run_handlers(exit_handlers)
    assert torch.distributed.is_initialized()


def test_a_script_that_initializes_exits_with_the_group_destroyed(tmp_path, monkeypatch):
    # atexit runs its handlers last registered first: the probe, registered before initialize,
    # sees the process group after marquardt's handler has run.
    one_rank_environment(monkeypatch)
    script = tmp_path / "script.py"
    script.write_text("import atexit, torch.distributed as dist\n"
                      "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
                      "from marquardt.distributed import initialize\n"
                      "print('world size', initialize(backend='gloo', timeout=5).world_size)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "world size 1\ninitialized at exit: False\n"), done.stderr


# ---------------------------------------------------------------------------------------------
# tests: two gloo ranks


@pytest.fixture(scope="module")
def agreement(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distributed")
    write_csv(root / "data.csv")
    write_resume_folders(root / "resume")
    folder = root / "checkpoint"
    return {"ranks": launch(functools.partial(_agreement_body, str(folder))), "folder": folder, "root": root}


def write_resume_folders(folder: Path) -> None:
    """A checkpoint written by one process after 4 epochs, and beside it a garbled one."""
    _checkpoint_fit(str(folder), lambda *tensors: list(tensors), epochs=4)
    garbled = folder.parent / "resume-garbled"
    garbled.mkdir()
    (garbled / "latest.txt").write_bytes(b"\xff\xfe not a name")


def _reference() -> dict[str, Any]:
    X, y = tiny_data()
    model = tiny_net(seed=0)
    x0 = flatten_parameters(model)
    problem = ModuleProblem(model, X, y)
    lin = problem.linearize(x0)
    ref = {"x0": x0, "grad": lin.grad, "gram": lin.system.gram, "cost": lin.cost, "form": problem.plan.form}
    ref["lm"] = lm_run(problem, x0, steps=8)
    ref["gd"] = gd_run(model, X, y, steps=10, reducer=LocalReducer(), weight=1.0)
    closure = tiny_net()
    loss = nn.functional.mse_loss(closure(X), y)
    loss.backward()
    ref["closure_loss"] = float(loss.detach())
    ref["closure_grad"] = torch.cat([p.grad.reshape(-1) for p in closure.parameters()])
    ref["range"] = torch.stack([X.amin(0), X.amax(0)])
    few = ModuleProblem(tiny_net(), *tiny_data(20))
    ref["gathered"] = lm_run(few, x0, steps=8) if few.plan.form == "sample-space" else None
    if _has_matrix_free():
        ref["matrix_free"] = lm_run(MatrixFreeShard(X, y), flatten_parameters(cg_net()), steps=8)
    ref.update({f"fit_{k}": v for k, v in fit_runs(lambda *t: list(t), False).items()})
    ref["uneven"] = uneven_runs(lambda X: X, False)
    return ref


@pytest.fixture(scope="module")
def ranks(agreement) -> dict[int, tuple[str, Any]]:
    return agreement["ranks"]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _reference()


def test_two_ranks_report_success(ranks):
    assert sorted(ranks) == [0, 1], ranks
    for outcome, value in ranks.values():
        assert outcome == "ok", value


def test_two_ranks_start_from_rank_0_weights_and_sum_the_normal_equations(ranks, reference):
    ref = reference
    assert ref["form"] == "normal"
    for _, out in ranks.values():
        assert out["local_form"] == "sample-space"  # converted to J^T J before the reduction
        assert torch.equal(out["x0"], ref["x0"])
        assert relative_difference(out["gram"], ref["gram"]) <= 1e-12
        assert relative_difference(out["grad"], ref["grad"]) <= 1e-12
        assert out["cost"] == pytest.approx(ref["cost"], rel=1e-12)
        assert torch.equal(out["range"], ref["range"])


def test_two_ranks_lm_weights_equal_one_process_on_all_data(ranks, reference):
    ref = reference
    assert relative_difference(ref["lm"], ref["x0"]) > 1e-2  # the run moved
    for _, out in ranks.values():
        assert relative_difference(out["lm"], ref["lm"]) <= 1e-6
    assert torch.equal(ranks[0][1]["lm"], ranks[1][1]["lm"])  # same decisions on every rank


def test_fewer_residuals_than_parameters_gathers_rows_and_solves_in_residual_space(ranks, reference):
    assert reference["gathered"] is not None  # one process solves in residual space
    n, m = 25, 20
    for _, out in ranks.values():
        gathered = out["gathered"]
        assert gathered["form"] == "sample-space"
        assert relative_difference(gathered["x"], reference["gathered"]) <= 1e-6
        assert gathered["calls"] == 2
        assert gathered["bytes"] == 8 * m * (n + 1) + 8 * WORLD


def test_two_ranks_first_order_weights_equal_one_process_on_all_data(ranks, reference):
    ref = reference
    for _, out in ranks.values():
        assert relative_difference(out["gd"], ref["gd"]) <= 1e-6


def test_first_order_closure_returns_the_loss_of_all_samples_in_the_gradient_reduction(ranks, reference):
    # LBFGS reads the closure's value: this rank's own loss sent the ranks down different
    # line searches (DistributedError). The loss rides in the gradient's message.
    n = 25
    for _, out in ranks.values():
        closure = out["closure"]
        assert closure["loss"] == pytest.approx(reference["closure_loss"], rel=1e-12)
        assert relative_difference(closure["grad"], reference["closure_grad"]) <= 1e-12
        assert closure["calls"] == 2  # failure flags, then the gradient and the loss
        assert closure["bytes"] == 8 * (n + 1) + 8 * WORLD


def test_linearize_sends_the_upper_gram_gradient_and_cost_in_one_reduction(ranks, reference):
    n = 25
    out = ranks[0][1]
    assert out["linearize_calls"] == 2  # failure flags, then the payload
    assert out["linearize_bytes"] == payload_bytes(n, 8) + 8 * WORLD
    assert payload_bytes(n, 8) < 8 * (n * n + n + 1)


@pytest.mark.parametrize("method", ["lm", "br", "momentum", "matrix_free", "lbfgs"])
def test_fit_on_two_ranks_equals_fit_on_all_data_in_one_process(ranks, reference, method):
    if method == "matrix_free":
        assert set(reference["fit_matrix_free_solver"]) == {"cg"}
        assert ranks[0][1]["fit_matrix_free_solver"] == reference["fit_matrix_free_solver"]
    start = flatten_parameters(cg_net()) if method == "matrix_free" else reference["x0"]
    assert relative_difference(reference[f"fit_{method}"], start) > 1e-2  # the run moved
    for _, out in ranks.values():
        assert relative_difference(out[f"fit_{method}"], reference[f"fit_{method}"]) <= 1e-6
        for key, values in reference[f"fit_{method}_history"].items():
            assert out[f"fit_{method}_history"][key] == pytest.approx(values, rel=1e-6, nan_ok=True), key


@pytest.mark.parametrize("method", ["lm", "br", "momentum"])
def test_a_rank_with_one_sample_trains_as_one_process_on_all_data(ranks, reference, method):
    assert relative_difference(reference["uneven"][method], reference["x0"]) > 1e-2  # the run moved
    for _, out in ranks.values():
        assert relative_difference(out["uneven"][method], reference["uneven"][method]) <= 1e-6


def test_fit_on_two_ranks_reduces_validation_performance(ranks, reference):
    vperf = reference["fit_lm_history"]["vperf"]
    assert all(math.isfinite(v) for v in vperf)
    assert ranks[0][1]["fit_lm_history"]["vperf"] == ranks[1][1]["fit_lm_history"]["vperf"]


def test_normalized_mlp_takes_its_ranges_from_all_ranks(ranks, reference):
    for _, out in ranks.values():
        assert relative_difference(out["fit_mlp"], reference["fit_mlp"]) <= 1e-6


def test_matrix_free_reduces_one_vector_per_cg_iteration(ranks, reference):
    if reference.get("matrix_free") is None:
        pytest.skip("marquardt.matfree is not available")
    n = 9
    for _, out in ranks.values():
        mf = out["matrix_free"]
        assert relative_difference(mf["x"], reference["matrix_free"]) <= 1e-6
        assert mf["iterations"] >= 2
        # Per product: failure flags (8 * WORLD bytes) and one n-vector; the diagonal once.
        assert mf["calls"] == 2 * (mf["iterations"] + 1)
        assert mf["bytes"] == (mf["iterations"] + 1) * (8 * n + 8 * WORLD)


def test_checkpoint_written_by_two_ranks_resumes_in_one_process(agreement, reference):
    folder = agreement["folder"]
    assert (folder / "latest.txt").read_text().strip() == "checkpoint-00000004"
    X, y = tiny_data()
    resumed, straight = tiny_net(seed=5), tiny_net()
    history = fit(resumed, X, y, epochs=7, checkpoint=folder, checkpoint_every=2, distributed=False)
    fit(straight, X, y, epochs=7, distributed=False)
    assert history["epoch"] == list(range(8))
    assert relative_difference(flatten_parameters(resumed), flatten_parameters(straight)) <= 1e-6


@pytest.fixture(scope="module")
def resumed(agreement) -> dict[str, Any]:
    """The one-process checkpoint of write_resume_folders, resumed on two ranks to epoch 7."""
    straight, _ = _checkpoint_fit(None, lambda *tensors: list(tensors), epochs=7)
    return {"ranks": {rank: (outcome, out["resume"] if outcome == "ok" else out)
                      for rank, (outcome, out) in agreement["ranks"].items()},
            "folder": agreement["root"] / "resume", "straight": flatten_parameters(straight)}


def test_checkpoint_written_by_one_process_resumes_on_two_ranks(resumed):
    ranks = resumed["ranks"]
    assert sorted(ranks) == [0, 1], ranks
    for outcome, out in ranks.values():
        assert outcome == "ok", out
        assert out["epoch"] == list(range(8))
        assert relative_difference(out["x"], resumed["straight"]) <= 1e-6


def test_ranks_that_see_different_checkpoints_are_refused_before_training(resumed):
    # Rank 0 resumed from checkpoint 6 while rank 1 started over: the ranks summed J^T J at
    # different weights, rank 0 wrote that as checkpoint 8, and only the end said "rank(s) [0]
    # finished while rank(s) [1] went on".
    ranks, folder = resumed["ranks"], resumed["folder"]
    assert sorted(ranks) == [0, 1], ranks
    for outcome, out in ranks.values():
        assert outcome == "ok", out
        error, message = out["unshared"]
        assert error == "CheckpointError", message
        assert "is not the same folder on every rank (rank 0: checkpoint-00000007; rank 1: no checkpoint)" in message
    # The two-rank run to epoch 7 ended with its final checkpoint, written by rank 0 alone.
    assert (folder / "latest.txt").read_text().strip() == "checkpoint-00000007"
    assert not (folder.parent / "resume-rank-1").exists()  # rank 1 writes nothing


def test_a_garbled_checkpoint_pointer_is_named_on_every_rank(resumed):
    for outcome, out in resumed["ranks"].values():
        assert outcome == "ok", out
        error, message = out["garbled"]
        assert error == "CheckpointError" and "resume-garbled cannot be read" in message, out["garbled"]


def test_cli_under_two_ranks_writes_once_and_matches_one_process(agreement):
    from marquardt import load

    root = agreement["root"]
    assert [out["cli_status"] for _, out in agreement["ranks"].values()] == [0, 0]
    assert cli_fit(root / "data.csv", root / "cli-1-rank") == 0
    two, one = load(root / "cli-2-ranks" / "model"), load(root / "cli-1-rank" / "model")
    flat = [torch.cat([t.reshape(-1).double() for t in m.state_dict().values() if t.is_floating_point()])
            for m in (two, one)]
    assert relative_difference(flat[0], flat[1]) <= 1e-6
    report = (root / "cli-2-ranks" / "report.md").read_text()
    assert "41 samples" in report  # rank 0 reports on all rows
    assert sorted(p.name for p in (root / "cli-2-ranks").iterdir()) == sorted(p.name for p in (root / "cli-1-rank").iterdir())


def test_fit_distributed_needs_a_process_group_and_a_bool():
    X, y = tiny_data()
    with pytest.raises(DistributedError, match="not initialized"):
        fit(tiny_net(), X, y, epochs=1, distributed=True)
    with pytest.raises(ValueError, match="Invalid distributed value"):
        fit(tiny_net(), X, y, epochs=1, distributed="yes")


def test_an_exception_on_one_rank_stops_every_rank_with_its_message():
    results = launch(functools.partial(_fail_in_fit, "raise"), timeout=60.0)
    assert sorted(results) == [0, 1], results
    assert results[1][0] == "ValueError" and "boom on purpose" in results[1][1]
    assert results[0][0] == "DistributedError"
    assert "rank 1: ValueError: boom on purpose" in results[0][1]


def test_bad_data_on_one_rank_stops_every_rank_before_training():
    results = launch(_bad_shard_in_fit, timeout=60.0)
    assert results[0][0] == "ValueError" and "NaN" in results[0][1]
    assert results[1][0] == "DistributedError" and "rank 0: ValueError: y contains NaN" in results[1][1]


def test_a_rank_that_dies_ends_the_run_with_an_error_on_the_others():
    results = launch(functools.partial(_fail_in_fit, "exit"), timeout=20.0)
    assert 1 not in results  # exited without reporting
    assert results[0][0] == "DistributedError", results
    assert "collective failed" in results[0][1]


@pytest.fixture(scope="module")
def mismatch_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mismatch") / "checkpoint"


@pytest.fixture(scope="module")
def mismatches(mismatch_folder) -> dict[int, tuple[str, Any]]:
    return launch(functools.partial(_mismatches_body, str(mismatch_folder)), timeout=30.0)


@pytest.mark.parametrize("case, error, message", [
    # A broadcast of tensors of different sizes aborted a process inside gloo ("terminate called").
    ("wider model", "ValueError", "The model differs between ranks (rank 0: 4 tensors, 25 elements, 200 bytes; "
                                  "rank 1: 4 tensors, 29 elements, 232 bytes"),
    ("float32 model", "ValueError", "rank 0: 4 tensors, 25 elements, 200 bytes; rank 1: 4 tensors, 25 elements, "
                                    "100 bytes"),
    ("sigmoid on rank 1", "ValueError", "The model's layers differ between ranks (layer 1: 'Tanh()' on rank 0, "
                                        "'Sigmoid()' on rank 1). Build the same model"),
    ("options", "ValueError", "The training options differ between ranks (mu: 0.001 on rank 0, 0.1 on rank 1). "
                              "Pass the same options on every rank"),
    ("same options", "ok", ""),
    # Rank 0 returned success while rank 1 waited in its next collective; since the options are
    # compared before any work, both name the option.
    ("fewer epochs on rank 0", "ValueError", "The training options differ between ranks (epochs: 2 on rank 0, 6 on "
                                             "rank 1). Pass the same options on every rank"),
    # Rank 0 stopped alone; now the ranks agree on the stop each epoch.
    ("callback stops one rank", "ok", "User stop. after epoch 1"),
    # gloo aborted rank 0 on the mismatched sizes; then both named the collectives each rank
    # reached; now the options are compared before any work.
    ("momentum on rank 1", "ValueError", "The training options differ between ranks (method: 'lm' on rank 0, "
                                         "'momentum' on rank 1; min_grad:"),
    ("checkpoint on rank 0 only", "DistributedError", "the ranks reached different collectives (rank 0: a sum of 2 "
                                                      "float64 numbers; rank 1: a sum of 3 float64 numbers)"),
    # The message said "give every rank validation_data" for a test set on one rank too.
    ("validation data on rank 0 only", "ValueError", "Ranks disagree: validation data on 1 of 2 ranks. Every rank "
                                                     "must hold a shard of each data set: give every rank "
                                                     "validation_data, or"),
    ("test data on rank 1 only", "ValueError", "Ranks disagree: test data on 1 of 2 ranks. Every rank must hold a "
                                               "shard of each data set: give every rank test_data, or"),
])
def test_ranks_that_disagree_all_stop_with_an_error_naming_them(mismatches, case, error, message):
    assert sorted(mismatches) == [0, 1], mismatches
    for rank, (outcome, value) in mismatches.items():
        assert outcome == "ok", value
        assert value[case][0] == error, (rank, value[case])
        assert message in value[case][1], (rank, value[case])


def test_a_checkpoint_on_rank_0_alone_is_refused_before_anything_is_written(mismatches, mismatch_folder):
    assert sorted(mismatches) == [0, 1], mismatches
    assert not mismatch_folder.exists()


class PartialReducer:
    """Sums only: a reducer written against an older Reducer protocol."""

    rank, world_size = 0, 2

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2

    def sum_scalar(self, value: float) -> float:
        return value * 2


def test_fit_refuses_a_reducer_that_lacks_members_before_training():
    # fit took it, then raised AttributeError: 'PartialReducer' object has no attribute
    # 'signal_failure' (from fail_together, over a ValueError saying the model differs between ranks).
    X, y = tiny_data()
    model = tiny_net()
    before = flatten_parameters(model).clone()
    with pytest.raises(ValueError, match=r"Invalid distributed value: .*PartialReducer.*; expected None, True, False "
                                         r"or a Reducer \(a Reducer needs maximum, broadcast, signal_failure, check\)"):
        fit(model, X, y, epochs=2, distributed=PartialReducer())
    assert torch.equal(flatten_parameters(model), before)


@pytest.mark.parametrize("case, bad, message", [
    ("bad option on rank 0", 0, "ValueError: Invalid batch_size for distributed training: 8"),
    ("bad mu on rank 1", 1, "ValueError: Invalid mu value: -1.0"),
    ("callbacks not iterable on rank 1", 1, "TypeError: callbacks must be a sequence of marquardt.Callback "
                                            "instances; received int"),
    ("no module on rank 0", 0, "TypeError: model must be a torch.nn.Module; received str"),
])
def test_a_bad_option_on_one_rank_stops_the_others(mismatches, case, bad, message):
    outcomes = {rank: value[case] for rank, (_, value) in mismatches.items()}
    error, text = message.split(": ", 1)
    assert outcomes[bad][0] == error and text in outcomes[bad][1]
    assert outcomes[1 - bad][0] == "DistributedError", outcomes
    assert f"rank {bad}: {message}" in outcomes[1 - bad][1], outcomes


def test_a_reduced_matrix_free_problem_carries_its_forcing_and_local_state_through_a_checkpoint():
    # ReducedProblem keeps the summed gradient's forcing term itself; a resumed distributed
    # matrix-free run started its first CG solve cold and at another tolerance.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.linspace(-1, 1, 30, dtype=torch.float64)[:, None]

    def reduced():
        return ReducedProblem(ModuleProblem(model, X, torch.sin(3 * X), solver="matrix-free"), LocalReducer())

    source = reduced()
    source.problem.linearize(flatten_parameters(model))
    source._forcing = (0.25, 0.125)  # as a two-rank linearization leaves it
    tensors, meta = source.resume_state()
    assert meta["reduced_forcing"] == [0.25, 0.125] and sorted(tensors) == ["generator", "previous_x"]
    target = reduced()
    target.load_resume_state(tensors, meta)
    assert target._forcing == (0.25, 0.125)
    assert torch.equal(target.problem._previous[0], source.problem._previous[0])
    assert target.problem._previous[1:] == source.problem._previous[1:]
    empty = reduced()
    empty.load_resume_state({}, {})  # a checkpoint written before the state was kept
    assert empty._forcing is None and empty.problem._previous is None


@pytest.fixture(scope="module")
def float32_resume(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("float32-resume")
    return {"ranks": launch(functools.partial(_float32_resume_body, str(root))), "root": root}


@pytest.mark.parametrize("run", ["killed", "stopped"])
def test_a_two_rank_float32_lm_run_resumes_bit_for_bit(float32_resume, run):
    # "killed": resumed from checkpoint 4 of a 7-epoch run; "stopped": a 3-epoch run (its final
    # checkpoint, 3) continued to 7. History and weights must equal the uninterrupted run's exactly.
    ranks = float32_resume["ranks"]
    assert sorted(ranks) == [0, 1], ranks
    for outcome, out in ranks.values():
        assert outcome == "ok", out
        straight = out["straight"]
        assert straight["history"]["epoch"] == list(range(RESUME_EPOCHS + 1))
        assert straight["history"] == out["plain"]["history"]  # checkpoints change nothing
        assert torch.equal(straight["x"], out["plain"]["x"])
        assert out[run]["history"] == straight["history"]
        assert out[run]["x"].dtype == torch.float32 and torch.equal(out[run]["x"], straight["x"])
    assert torch.equal(ranks[0][1][run]["x"], ranks[1][1][run]["x"])


def test_a_two_rank_float32_lm_checkpoint_holds_the_float64_weights(float32_resume):
    from marquardt.checkpoint import latest_checkpoint
    from marquardt.io import load_state

    tensors, meta = load_state(latest_checkpoint(float32_resume["root"] / "killed"))
    assert meta["epoch"] == RESUME_EPOCHS and tensors["trainer/x"].dtype == torch.float64
    module = torch.cat([tensors[f"model/{name}"].reshape(-1) for name, _ in tiny_net().named_parameters()])
    assert module.dtype == torch.float32
    assert torch.equal(module, tensors["trainer/x"].float())  # the module holds them rounded
    assert not torch.equal(module.double(), tensors["trainer/x"])
