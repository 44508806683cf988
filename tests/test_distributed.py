"""Data-parallel LM (marquardt.distributed): 2 gloo ranks on CPU agree with one process on all data.

Each multi-process test starts its ranks with the ``spawn`` start method, a free localhost port
and ``MASTER_ADDR=127.0.0.1``; every rank puts ``(rank, outcome)`` on a queue, and the parent
waits for them with a bounded join. Networks are tiny and runs short.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from queue import Empty
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from marquardt.damping import MarquardtDamping
from marquardt.distributed import (
    DistributedError,
    LocalReducer,
    ReducedProblem,
    average_gradients,
    fail_together,
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


def _agreement_body(reducer: Any) -> dict[str, Any]:
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
    before = reducer.bytes, reducer.calls
    lin = problem.linearize(x0)
    out["linearize_bytes"], out["linearize_calls"] = reducer.bytes - before[0], reducer.calls - before[1]
    out["grad"], out["gram"], out["cost"] = lin.grad, lin.system.gram, lin.cost
    out["lm"] = lm_run(problem, x0, steps=8)
    local_scale = 2.0 / y_k.numel()  # mse = (2 / elements) * cost
    weight = global_scale(local_scale, reducer) / local_scale  # this rank's share of the elements
    out["gd"] = gd_run(model, X_k, y_k, steps=10, reducer=reducer, weight=weight)
    out["range"] = global_range(X_k, reducer)
    return out


def _raise_on_rank_1(reducer: Any) -> str:
    X, y = tiny_data()
    X_k, y_k = _shard(reducer, X, y)
    model = tiny_net()
    problem = ReducedProblem(ModuleProblem(model, X_k, y_k), reducer)
    with fail_together(reducer):
        x = flatten_parameters(model)
        for step in range(50):
            if reducer.rank == 1 and step == 2:
                raise ValueError("boom on purpose")
            x = lm_run(problem, x, steps=1)
    return "finished"


def _exit_on_rank_1(reducer: Any) -> str:
    X, y = tiny_data()
    X_k, y_k = _shard(reducer, X, y)
    problem = ReducedProblem(ModuleProblem(tiny_net(), X_k, y_k), reducer)
    with fail_together(reducer):
        x = flatten_parameters(tiny_net())
        for step in range(50):
            if reducer.rank == 1 and step == 2:
                os._exit(3)  # dies without a word: the peer must not wait forever
            x = lm_run(problem, x, steps=1)
    return "finished"


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
    with pytest.raises(ValueError, match="Invalid distributed value: 'yes'"):
        make_reducer("yes")


@pytest.mark.parametrize("n, rank, world, message", [
    (1, 0, 2, "Cannot shard 1 samples over 2 ranks"),
    (10, 2, 2, "Invalid rank 2 for world_size 2"),
    (10, -1, 2, "Invalid rank -1 for world_size 2"),
])
def test_shard_bounds_bad_input(n, rank, world, message):
    with pytest.raises(ValueError, match=message):
        shard_bounds(n, rank, world)


def test_shards_cover_the_samples_in_order():
    for n, world in ((10, 3), (41, 2), (7, 7)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_initialize_outside_torchrun_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        initialize()
    with pytest.raises(ValueError, match="Invalid timeout value: 0"):
        initialize(timeout=0)


# ---------------------------------------------------------------------------------------------
# tests: two gloo ranks


@pytest.fixture(scope="module")
def agreement() -> dict[int, tuple[str, Any]]:
    return launch(_agreement_body)


def _reference() -> dict[str, Any]:
    X, y = tiny_data()
    model = tiny_net(seed=0)
    x0 = flatten_parameters(model)
    problem = ModuleProblem(model, X, y)
    lin = problem.linearize(x0)
    ref = {"x0": x0, "grad": lin.grad, "gram": lin.system.gram, "cost": lin.cost, "form": problem.plan.form}
    ref["lm"] = lm_run(problem, x0, steps=8)
    ref["gd"] = gd_run(model, X, y, steps=10, reducer=LocalReducer(), weight=1.0)
    ref["range"] = torch.stack([X.amin(0), X.amax(0)])
    return ref


def test_two_ranks_report_success(agreement):
    assert sorted(agreement) == [0, 1], agreement
    for outcome, value in agreement.values():
        assert outcome == "ok", value


def test_two_ranks_start_from_rank_0_weights_and_sum_the_normal_equations(agreement):
    ref = _reference()
    assert ref["form"] == "normal"
    for _, out in agreement.values():
        assert out["local_form"] == "sample-space"  # converted to J^T J before the reduction
        assert torch.equal(out["x0"], ref["x0"])
        assert relative_difference(out["gram"], ref["gram"]) <= 1e-12
        assert relative_difference(out["grad"], ref["grad"]) <= 1e-12
        assert out["cost"] == pytest.approx(ref["cost"], rel=1e-12)
        assert torch.equal(out["range"], ref["range"])


def test_two_ranks_lm_weights_equal_one_process_on_all_data(agreement):
    ref = _reference()
    assert relative_difference(ref["lm"], ref["x0"]) > 1e-2  # the run moved
    for _, out in agreement.values():
        assert relative_difference(out["lm"], ref["lm"]) <= 1e-6
    assert torch.equal(agreement[0][1]["lm"], agreement[1][1]["lm"])  # same decisions on every rank


def test_two_ranks_first_order_weights_equal_one_process_on_all_data(agreement):
    ref = _reference()
    for _, out in agreement.values():
        assert relative_difference(out["gd"], ref["gd"]) <= 1e-6


def test_linearize_sends_the_upper_gram_gradient_and_cost_in_one_reduction(agreement):
    n = 25
    out = agreement[0][1]
    assert out["linearize_calls"] == 2  # failure flags, then the payload
    assert out["linearize_bytes"] == payload_bytes(n, 8) + 4 * WORLD
    assert payload_bytes(n, 8) < 8 * (n * n + n + 1)


def test_an_exception_on_one_rank_stops_every_rank_with_its_message():
    results = launch(_raise_on_rank_1, timeout=60.0)
    assert sorted(results) == [0, 1], results
    assert results[1][0] == "ValueError" and "boom on purpose" in results[1][1]
    assert results[0][0] == "DistributedError"
    assert "rank 1: ValueError: boom on purpose" in results[0][1]


def test_a_rank_that_dies_ends_the_run_with_an_error_on_the_others():
    results = launch(_exit_on_rank_1, timeout=20.0)
    assert 1 not in results  # exited without reporting
    assert results[0][0] == "DistributedError", results
    assert "collective failed" in results[0][1]
