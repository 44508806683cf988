"""fit(checkpoint=...): periodic atomic checkpoints, and a killed run resumed to the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from marquardt import STOP_REASONS, Callback, fit, mlp
from marquardt.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer, latest_checkpoint
from marquardt.io import load_state, save_state


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem():
    X = torch.linspace(-1, 1, 60, dtype=torch.float64)[:, None]
    return X, torch.sin(3 * X) + 0.05 * torch.cos(17 * X)


def network(hidden=6):
    return mlp(1, hidden, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def without_time(history):
    return [{k: v for k, v in record.items() if k != "time"} for record in history.to_dict()["records"]]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ------------------------------------------------------------------------------------------------
# killed with SIGKILL in a subprocess, then resumed

RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from marquardt import Callback, fit, mlp
    from marquardt.io import save_state

    mode, folder, out = sys.argv[1:4]
    X = torch.linspace(-1, 1, 60, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X) + 0.05 * torch.cos(17 * X)
    model = mlp(1, 6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    class Kill(Callback):
        def on_epoch_end(self, history, model):
            if len(history) == 9:  # epoch 8 recorded; the last checkpoint is from epoch 6
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [Kill()] if mode == "kill" else []
    options = dict(checkpoint=folder, checkpoint_every=3) if mode != "plain" else {}
    history = fit(model, X, y, epochs=25, min_grad=0.0, max_fail=1000, division="random", seed=0,
                  progress=False, callbacks=callbacks, **options)
    save_state(out, dict(model.state_dict()), {"history": history.to_dict()})
""")


def run(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), mode, str(tmp_path / "ckpt"), str(tmp_path / mode)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_lm_run_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    killed = run("kill", tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "kill.safetensors").exists()
    checkpoint = latest_checkpoint(tmp_path / "ckpt")
    assert checkpoint is not None and checkpoint.name == "checkpoint-00000006.safetensors"
    assert load_state(checkpoint)[1]["epoch"] == 6

    for mode in ("resume", "plain"):
        done = run(mode, tmp_path)
        assert done.returncode == 0, done.stderr
    resumed, resumed_meta = load_state(tmp_path / "resume")
    plain, plain_meta = load_state(tmp_path / "plain")
    assert same_weights(resumed, plain)
    records = [{k: v for k, v in r.items() if k != "time"} for r in resumed_meta["history"]["records"]]
    assert records == [{k: v for k, v in r.items() if k != "time"} for r in plain_meta["history"]["records"]]
    assert resumed_meta["history"]["stop_reason"] == plain_meta["history"]["stop_reason"]
    assert resumed_meta["history"]["best_epoch"] == plain_meta["history"]["best_epoch"]
    assert len(records) == 26


# ------------------------------------------------------------------------------------------------
# interrupted in-process (an exception from a callback), for every trainer


class Interrupted(Exception):
    pass


class InterruptAt(Callback):
    def __init__(self, records: int) -> None:
        self.records = records

    def on_epoch_end(self, history, model):
        if len(history) == self.records:
            raise Interrupted


# LBFGS keeps lists of tensors in its state (its curvature pairs), stored one tensor each.
@pytest.mark.parametrize("method, options", [("lm", {}), ("br", {}), ("br", {"max_fail": None}), ("gd", {}),
                                             ("momentum", {}), (torch.optim.Adam, {"lr": 0.01}),
                                             (torch.optim.LBFGS, {"history_size": 4}),
                                             (torch.optim.Rprop, {})])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, method, options):
    X, y = problem()
    common = dict(method=method, epochs=12, min_grad=0.0, max_fail=1000, division="interleaved", seed=3,
                  progress=False)
    common.update(options)
    plain = network()
    expected = fit(plain, X, y, **common)

    model = network()
    with pytest.raises(Interrupted):
        fit(model, X, y, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(8)], **common)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 6
    resumed_model = network()
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())
    assert without_time(resumed) == without_time(expected)
    assert resumed.stop_reason == expected.stop_reason and resumed.best_epoch == expected.best_epoch
    times = resumed["time"]
    assert all(b >= a for a, b in zip(times, times[1:]))


# (samples, why): up to 2000 samples the curvature products use them all, and the state to carry
# is the CG warm start and forcing term; past 2000 a random subset of 2000 is drawn at each
# linearization (matfree.curvature_sample_size), and its generator's state must be carried too.
MATRIX_FREE_RUNS = [(60, "warm start and forcing"), (2400, "and the curvature subsets")]


@pytest.mark.parametrize("samples", [case[0] for case in MATRIX_FREE_RUNS], ids=[case[1] for case in MATRIX_FREE_RUNS])
def test_matrix_free_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, samples):
    # The resumed run's first solve started cold, at the first forcing term and a fresh subset
    # generator: 0.10 apart in the weights after 12 epochs (1-16-16-1 network, 1000 samples).
    X = torch.linspace(-1, 1, samples, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X) + 0.05 * torch.cos(17 * X)
    common = dict(solver="matrix-free", epochs=10, min_grad=0.0, max_fail=1000, seed=3, progress=False)
    plain = network()
    expected = fit(plain, X, y, **common)
    assert set(expected["solver"][1:]) == {"cg"}

    with pytest.raises(Interrupted):
        fit(network(), X, y, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(7)], **common)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 6
    resumed_model = network()
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())
    assert without_time(resumed) == without_time(expected)


def test_matrix_free_checkpoint_without_the_problem_state_still_resumes(tmp_path):
    # Checkpoints written before the problem's state was kept: the resume starts its solves cold.
    X, y = problem()
    common = dict(solver="matrix-free", epochs=8, min_grad=0.0, seed=3, progress=False)
    with pytest.raises(Interrupted):
        fit(network(), X, y, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(5)], **common)
    path = latest_checkpoint(tmp_path)
    tensors, meta = load_state(path)
    del meta["trainer"]["problem"]
    save_state(path, {name: value for name, value in tensors.items() if "/problem/" not in name}, meta)
    history = fit(network(), X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert history["epoch"] == list(range(9)) and set(history["solver"][5:]) == {"cg"}


def test_bfloat16_model_is_checkpointed_and_resumed(tmp_path):
    # numpy has no bfloat16: the data digest read the tensors through numpy and raised TypeError.
    X, y = problem()

    def bfloat16_network():
        return sequential(dtype=torch.bfloat16)

    common = dict(method="gd", lr=0.05, epochs=6, min_grad=0.0, progress=False)
    plain = bfloat16_network()
    expected = fit(plain, X, y, **common)
    with pytest.raises(Interrupted):
        fit(bfloat16_network(), X, y, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(5)], **common)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 4
    model = bfloat16_network()
    resumed = fit(model, X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert same_weights(model.state_dict(), plain.state_dict()) and model[0].weight.dtype == torch.bfloat16
    assert without_time(resumed) == without_time(expected)


def test_validation_stop_and_best_weights_survive_a_resume(tmp_path):
    X, y = problem()
    common = dict(epochs=200, division="random", seed=1, progress=False, max_fail=3)
    plain = network(8)
    expected = fit(plain, X, y, **common)
    assert expected.stop_reason == "Validation stop."
    stop = len(expected) - 2  # interrupt while failures are counting
    with pytest.raises(Interrupted):
        fit(network(8), X, y, checkpoint=tmp_path, checkpoint_every=1, callbacks=[InterruptAt(stop)], **common)
    model = network(8)
    resumed = fit(model, X, y, checkpoint=tmp_path, **common)
    assert same_weights(model.state_dict(), plain.state_dict())
    assert without_time(resumed) == without_time(expected) and resumed.best_epoch == expected.best_epoch


# ------------------------------------------------------------------------------------------------
# a float32 network that LM steps in float64: the trainer's weights are wider than the module's


def float32_problem():
    X = torch.linspace(-1, 1, 100, dtype=torch.float32)[:, None]
    return X, torch.sin(3 * X) + 0.05 * torch.cos(17 * X)


def float32_network():
    return mlp(1, 6, 1, dtype=torch.float32, generator=torch.Generator().manual_seed(0))


# (case, the method and data options, the first run's options, the longer run's). Each first run
# ends (or is interrupted) between two epochs the longer run goes past; "validation stop": the
# longer run stops at epoch 12 with the best weights of epoch 9, which the checkpoint at 10 holds.
FLOAT32_RUNS = [
    ("lm", {}, dict(epochs=5, checkpoint_every=2), dict(epochs=12)),
    ("lm, interrupted", {}, dict(epochs=12, checkpoint_every=3, callbacks=[InterruptAt(8)]), dict(epochs=12)),
    ("matrix-free", {"solver": "matrix-free"}, dict(epochs=5, checkpoint_every=2), dict(epochs=12)),
    ("matrix-free, interrupted", {"solver": "matrix-free"},
     dict(epochs=12, checkpoint_every=3, callbacks=[InterruptAt(8)]), dict(epochs=12)),
    ("trainbr", {"method": "br"}, dict(epochs=5, checkpoint_every=2), dict(epochs=12)),
    ("lm, mini-batches", {"batch_size": 50}, dict(epochs=5, checkpoint_every=2), dict(epochs=12)),
    ("lm, validation stop", dict(division="random", seed=5), dict(epochs=10, checkpoint_every=4),
     dict(epochs=60, max_fail=3)),
]


@pytest.mark.parametrize("method, first, longer", [case[1:] for case in FLOAT32_RUNS],
                         ids=[case[0] for case in FLOAT32_RUNS])
def test_float32_network_stepped_in_float64_resumes_bit_for_bit(tmp_path, method, first, longer):
    # Checkpoints held only the module's float32 weights, the float64 ones LM steps rounded: the
    # resumed run went on from other weights (9.5e-7 apart after 12 epochs, 0.11 matrix-free).
    X, y = float32_problem()
    common = {**dict(min_grad=0.0, max_fail=1000, seed=3, progress=False), **method}
    try:
        fit(float32_network(), X, y, checkpoint=tmp_path, **{**common, **first})
    except Interrupted:
        pass
    resumed_model, plain = float32_network(), float32_network()
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=first["checkpoint_every"],
                  **{**common, **longer})
    expected = fit(plain, X, y, **{**common, **longer})
    assert without_time(resumed) == without_time(expected)
    assert resumed.stop_reason == expected.stop_reason and resumed.best_epoch == expected.best_epoch
    assert same_weights(resumed_model.state_dict(), plain.state_dict())
    assert resumed_model.net[0].weight.dtype == torch.float32


def test_float32_checkpoint_without_the_trainers_weights_resumes_from_the_modules(tmp_path):
    # Checkpoints written before the trainer's float64 weights were kept: the resume starts from
    # the module's float32 weights, as it did then.
    X, y = float32_problem()
    common = dict(min_grad=0.0, seed=3, progress=False, checkpoint_every=2)
    fit(float32_network(), X, y, checkpoint=tmp_path, epochs=4, **common)
    path = latest_checkpoint(tmp_path)
    tensors, meta = load_state(path)
    assert tensors["trainer/x"].dtype == torch.float64
    save_state(path, {name: value for name, value in tensors.items() if name != "trainer/x"}, meta)
    model = float32_network()
    history = fit(model, X, y, checkpoint=tmp_path, epochs=8, **common)
    assert history["epoch"] == list(range(9)) and model.net[0].weight.dtype == torch.float32
    # The records after the resume go on from the rounded weights, apart from the uninterrupted run's.
    expected = fit(float32_network(), X, y, epochs=8, **{k: v for k, v in common.items() if k != "checkpoint_every"})
    assert history["perf"][:5] == expected["perf"][:5] and history["perf"][5:] != expected["perf"][5:]


# ------------------------------------------------------------------------------------------------
# the final checkpoint: a run that ends between two multiples of checkpoint_every can be continued


class StopAt(Callback):
    """Raises StopIteration ("User stop.") once ``records`` records are appended."""

    def __init__(self, records: int) -> None:
        self.records = records

    def on_epoch_end(self, history, model):
        if len(history) == self.records:
            raise StopIteration


class CountEpochs(Callback):
    """Counts the records a run appends itself (a resumed run starts with the checkpoint's)."""

    def __init__(self) -> None:
        self.count = 0

    def on_epoch_end(self, history, model):
        self.count += 1


ADAM = {"method": torch.optim.Adam, "lr": 0.01}
# (case, the method and data options, the first run's options, those of the longer run (resumed, and
# uninterrupted), how and at which epoch the first run stops). Each first run stops between two
# multiples of checkpoint_every, or before the first; the longer run changes only a stopping rule.
FINAL_CHECKPOINTS = [
    ("epochs below checkpoint_every", {}, dict(epochs=3, checkpoint_every=10), dict(epochs=8), ("epochs", 3)),
    ("epochs, trainbr", {"method": "br"}, dict(epochs=5, checkpoint_every=2), dict(epochs=8), ("epochs", 5)),
    ("epochs, Adam", ADAM, dict(epochs=5, checkpoint_every=2), dict(epochs=8), ("epochs", 5)),
    ("goal", {}, dict(goal=1e-3, checkpoint_every=3), dict(goal=0.0, epochs=8), ("goal", 4)),
    # These models end with the best epoch's weights (5, 11); the checkpoint holds the last step's.
    ("validation stop", dict(division="random", seed=1), dict(max_fail=2, checkpoint_every=4),
     dict(max_fail=1000, epochs=12), ("validation", 7)),
    ("validation stop, Adam", dict(ADAM, lr=0.05, division="random", seed=1), dict(max_fail=2, checkpoint_every=4),
     dict(max_fail=1000, epochs=18), ("validation", 13)),
    ("callback stop", {}, dict(callbacks=[StopAt(6)], checkpoint_every=4), dict(epochs=8), ("user", 5)),
]


@pytest.mark.parametrize("method, first, longer, stop", [case[1:] for case in FINAL_CHECKPOINTS],
                         ids=[case[0] for case in FINAL_CHECKPOINTS])
def test_a_run_ending_between_checkpoints_leaves_a_final_one_that_continues_bit_for_bit(
        tmp_path, method, first, longer, stop):
    # Checkpoints were written only at multiples of checkpoint_every: these runs left none of
    # their last epochs (or none at all), and a resume repeated them or started over.
    X, y = problem()
    common = {**dict(min_grad=0.0, max_fail=1000, epochs=100, seed=3, progress=False), **method}
    ended = fit(network(), X, y, checkpoint=tmp_path, **{**common, **first})
    reason, last = stop
    assert (ended.stop_reason, len(ended) - 1) == (STOP_REASONS[reason], last)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == last

    counted, plain_count = CountEpochs(), CountEpochs()
    resumed_model, plain = network(), network()
    every = first["checkpoint_every"]
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=every, callbacks=[counted],
                  **{**common, **longer})
    expected = fit(plain, X, y, callbacks=[plain_count], **{**common, **longer})
    assert len(expected) > len(ended)  # the longer run went on past the first run's stop
    assert counted.count == len(expected) - last  # resumed at the last epoch, not before it
    assert without_time(resumed) == without_time(expected)
    assert resumed.stop_reason == expected.stop_reason and resumed.best_epoch == expected.best_epoch
    assert same_weights(resumed_model.state_dict(), plain.state_dict())


def test_a_run_stopped_by_keyboard_interrupt_writes_no_final_checkpoint(tmp_path):
    # An exception ends the run wherever it was raised: the newest checkpoint stays the last periodic one.
    class CtrlC(Callback):
        def on_epoch_end(self, history, model):
            if len(history) == 6:
                raise KeyboardInterrupt

    X, y = problem()
    common = dict(epochs=9, min_grad=0.0, seed=3, progress=False, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        fit(network(), X, y, checkpoint=tmp_path, callbacks=[CtrlC()], **common)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 4
    resumed_model, plain = network(), network()
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, **common)
    expected = fit(plain, X, y, **common)
    assert without_time(resumed) == without_time(expected)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())


# ------------------------------------------------------------------------------------------------
# parameters a callback froze (requires_grad=False) stay frozen in a resumed run


class SetTrainableAt(Callback):
    """Sets requires_grad of the first layer's weight once ``records`` records are appended."""

    def __init__(self, records: int, trainable: bool) -> None:
        self.records, self.trainable = records, trainable

    def on_epoch_end(self, history, model):
        if len(history) == self.records:
            model.net[0].weight.requires_grad_(self.trainable)


def first_layer(trainable: bool):
    model = network()
    model.net[0].weight.requires_grad_(trainable)
    return model


# (case, method options, whether the first layer's weight trains at the start, then after epoch 2)
FROZEN_RUNS = [
    ("lm freezes", {}, True, False),
    ("lm unfreezes", {}, False, True),
    ("lm matrix-free freezes", {"solver": "matrix-free"}, True, False),
    ("trainbr freezes", {"method": "br"}, True, False),
    ("Adam freezes", ADAM, True, False),
]


@pytest.mark.parametrize("options, start, after", [case[1:] for case in FROZEN_RUNS],
                         ids=[case[0] for case in FROZEN_RUNS])
def test_parameters_a_callback_froze_are_frozen_in_the_resumed_run(tmp_path, options, start, after):
    # Checkpoints kept the weights but not requires_grad: the fresh model of the resume trained
    # what the checkpointed run had frozen (or froze what it had unfrozen), and the runs diverged.
    X, y = problem()
    common = dict(epochs=10, min_grad=0.0, seed=3, progress=False, **options)
    plain = first_layer(start)
    expected = fit(plain, X, y, callbacks=[SetTrainableAt(3, after)], **common)
    with pytest.raises(Interrupted):
        fit(first_layer(start), X, y, checkpoint=tmp_path, checkpoint_every=2,
            callbacks=[SetTrainableAt(3, after), InterruptAt(8)], **common)
    assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 6
    resumed_model = first_layer(start)  # as the checkpointed run began, before its callback
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert without_time(resumed) == without_time(expected)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())
    assert resumed_model.net[0].weight.requires_grad is after


def test_checkpoint_without_requires_grad_resumes_with_the_models_own(tmp_path):
    # Checkpoints written before requires_grad was kept: the resuming model's flags stand, as before.
    X, y = problem()
    common = dict(epochs=10, min_grad=0.0, seed=3, progress=False, checkpoint_every=2)
    plain = first_layer(False)
    expected = fit(plain, X, y, **{key: value for key, value in common.items() if key != "checkpoint_every"})
    with pytest.raises(Interrupted):
        fit(first_layer(False), X, y, checkpoint=tmp_path, callbacks=[InterruptAt(8)], **common)
    path = latest_checkpoint(tmp_path)
    tensors, meta = load_state(path)
    meta.pop("requires_grad", None)
    save_state(path, tensors, meta)
    resumed_model = first_layer(False)
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, **common)
    assert not resumed_model.net[0].weight.requires_grad
    assert without_time(resumed) == without_time(expected)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())


# ------------------------------------------------------------------------------------------------
# files and refusals


def test_folder_holds_one_checkpoint_and_a_pointer(tmp_path):
    X, y = problem()
    fit(network(), X, y, epochs=7, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    # The final checkpoint (epoch 7) replaced the last periodic one (epoch 6).
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["checkpoint-00000007.json", "checkpoint-00000007.safetensors", "latest.txt"]
    tensors, meta = load_state(tmp_path / "checkpoint-00000007")
    assert meta["epoch"] == 7 and len(meta["history"]["records"]) == 7
    assert "trainer/x" not in tensors  # a float64 module holds the weights LM steps
    parameters = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    assert meta["requires_grad"] == {name: True for name in parameters}


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    # What SIGKILL leaves in the middle of io._atomic_write.
    stale = [".checkpoint-00000020.json.a5d3pv_t.tmp", ".checkpoint-00000089.safetensors.j_mr6c4o.tmp",
             ".latest.txt.v206loof.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    X, y = problem()
    fit(network(), X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["checkpoint-00000002.json", "checkpoint-00000002.safetensors", "latest.txt", "notes.txt"]


def test_a_pair_left_half_written_is_ignored(tmp_path):
    X, y = problem()
    fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    # A kill between the two renames of the next checkpoint: the pointer still names epoch 4.
    (tmp_path / "checkpoint-00000006.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004.safetensors"
    model = network()
    history = fit(model, X, y, epochs=6, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    assert len(history) == 7 and latest_checkpoint(tmp_path).name == "checkpoint-00000006.safetensors"


def test_resume_false_starts_over(tmp_path):
    X, y = problem()
    fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    model = network()
    history = fit(model, X, y, epochs=2, checkpoint=tmp_path, resume=False, checkpoint_every=1, progress=False)
    assert history["epoch"] == [0, 1, 2]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002.safetensors"


def test_crash_while_replacing_the_pointed_checkpoint_leaves_no_damaged_one(tmp_path, monkeypatch):
    # resume=False writes checkpoint-00000002 again while latest.txt still names the old one; a
    # crash between the two renames left latest.txt naming a pair from two saves (unreadable).
    X, y = problem()
    fit(network(), X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    replace = os.replace

    def crash_at_the_json(source, target):
        if str(target).endswith(".json"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", crash_at_the_json)
    with pytest.raises(KeyboardInterrupt):
        fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, resume=False, progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None  # no checkpoint, rather than a damaged one
    history = fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    assert history["epoch"] == [0, 1, 2, 3, 4] and latest_checkpoint(tmp_path).name == "checkpoint-00000004.safetensors"


def test_resume_can_extend_a_finished_run(tmp_path):
    X, y = problem()
    common = dict(min_grad=0.0, progress=False)
    fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, **common)
    longer = network()
    history = fit(longer, X, y, epochs=8, checkpoint=tmp_path, checkpoint_every=2, **common)
    plain = network()
    fit(plain, X, y, epochs=8, **common)
    assert len(history) == 9 and same_weights(longer.state_dict(), plain.state_dict())


def sequential(activation=torch.nn.Tanh, dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 5), activation(), torch.nn.Linear(5, 1)).to(dtype)


# (case, the checkpointed run's model and fit options, the resuming run's, the difference named)
OTHER_RUNS = [
    ("hidden size", (network, {}), (lambda: network(5), {}), "architecture hidden [6] there, [5] here"),
    ("method", (network, {}), (network, {"method": "gd"}), "method 'lm' there, 'gd' here"),
    ("activation", (sequential, {}), (lambda: sequential(torch.nn.ReLU), {}),
     "architecture layer '1': Tanh there, ReLU here"),
    ("dtype", (sequential, {}), (lambda: sequential(dtype=torch.float32), {}),
     "dtype ['float64'] there, ['float32'] here"),
    ("learning rate", (network, {"method": "gd"}), (network, {"method": "gd", "lr": 0.5}),
     "method options lr 0.01 there, 0.5 here"),
    ("Adam betas", (network, {"method": torch.optim.Adam}),
     (network, {"method": torch.optim.Adam, "betas": (0.8, 0.9)}),
     "method options betas [0.9, 0.999] there, [0.8, 0.9] here"),
    ("mu_dec", (network, {}), (network, {"mu_dec": 0.5}), "method options mu_dec 0.1 there, 0.5 here"),
    ("loss", (network, {}), (network, {"loss": "binary_cross_entropy"}),
     "loss 'mse' there, 'binary_cross_entropy' here"),
    ("batch size", (network, {}), (network, {"batch_size": 16}), "batch_size None there, 16 here"),
]


@pytest.mark.parametrize("first, second, message", [case[1:] for case in OTHER_RUNS],
                         ids=[case[0] for case in OTHER_RUNS])
def test_checkpoint_of_another_run_is_refused_before_the_model_changes(tmp_path, first, second, message):
    X = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None]
    y = (X > 0).to(torch.float64)  # 0/1 targets: the same data for mse and binary_cross_entropy
    (build, options), (build_again, other_options) = first, second
    fit(build(), X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=1, progress=False, **options)
    model = build_again()
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    with pytest.raises(CheckpointMismatch, match="belongs to a different run") as refused:
        fit(model, X, y, epochs=4, checkpoint=tmp_path, progress=False, **other_options)
    assert f"({message}). Resume with the same model, method, options" in str(refused.value)
    assert same_weights(dict(model.named_parameters()), before)  # refused before any weight is loaded
    # The same options resume it, as ever.
    history = fit(build(), X, y, epochs=4, checkpoint=tmp_path, progress=False, **options)
    assert history["epoch"] == [0, 1, 2, 3, 4]


# (case, the division, the checkpointed run's seed, the resuming run's, the difference named)
OTHER_SEEDS = [
    # Without a random division the data digest is the same: the other seed was resumed silently.
    ("no division", None, 3, 4, "seed 3 there, 4 here"),
    ("random division", "random", 0, 1, "seed 0 there, 1 here"),
    ("negative seed", None, -5, 5, f"seed {2**64 - 5} there, 5 here"),  # torch keeps a seed as a uint64
    ("no seed, random division", "random", 0, None,
     "other data, or another seed or division of it (the checkpointed run had seed 0, this one none)"),
]


@pytest.mark.parametrize("division, seed, other_seed, message", [case[1:] for case in OTHER_SEEDS],
                         ids=[case[0] for case in OTHER_SEEDS])
def test_resume_with_another_seed_is_refused(tmp_path, division, seed, other_seed, message):
    X, y = problem()
    common = dict(division=division, checkpoint=tmp_path, progress=False)
    fit(network(), X, y, epochs=2, seed=seed, checkpoint_every=1, **common)
    model = network()
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    with pytest.raises(CheckpointMismatch) as refused:
        fit(model, X, y, epochs=4, seed=other_seed, **common)
    assert f"belongs to a different run ({message}). Resume with the same" in str(refused.value)
    assert same_weights(dict(model.named_parameters()), before)


def test_resume_without_a_seed_continues_the_checkpointed_seed(tmp_path):
    X, y = problem()
    common = dict(epochs=4, min_grad=0.0, checkpoint_every=2, progress=False)
    fit(network(), X, y, epochs=2, seed=3, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    resumed = network()
    history = fit(resumed, X, y, checkpoint=tmp_path, **common)
    plain = network()
    fit(plain, X, y, seed=3, **common)
    assert history["epoch"] == [0, 1, 2, 3, 4] and same_weights(resumed.state_dict(), plain.state_dict())
    assert load_state(latest_checkpoint(tmp_path))[1]["run"]["seed"] == 3  # recorded as seed 3's run still
    with pytest.raises(CheckpointMismatch, match=r"\(seed 3 there, 4 here\)"):
        fit(network(), X, y, seed=4, checkpoint=tmp_path, **common)


def test_checkpoint_without_a_recorded_seed_resumes_with_any_seed(tmp_path):
    # Checkpoints written before the seed was recorded: it cannot be checked, so it is not.
    X, y = problem()
    fit(network(), X, y, epochs=2, seed=3, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    path = latest_checkpoint(tmp_path)
    tensors, meta = load_state(path)
    del meta["run"]["seed"]
    save_state(path, tensors, meta)
    history = fit(network(), X, y, epochs=4, seed=4, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    assert history["epoch"] == [0, 1, 2, 3, 4] and load_state(latest_checkpoint(tmp_path))[1]["run"]["seed"] == 4


def truncate_tensors(folder: Path) -> None:
    path = latest_checkpoint(folder)
    path.write_bytes(path.read_bytes()[:100])


def remove_json(folder: Path) -> None:
    latest_checkpoint(folder).with_suffix(".json").unlink()


def garble_pointer(folder: Path) -> None:
    (folder / "latest.txt").write_bytes(b"\xff\xfe")


def point_nowhere(folder: Path) -> None:
    (folder / "latest.txt").write_text("checkpoint-00000099\n")


def garble_requires_grad(folder: Path) -> None:
    path = latest_checkpoint(folder)
    tensors, meta = load_state(path)
    meta["requires_grad"] = ["net.0.weight"]
    save_state(path, tensors, meta)


def edit_record(**changes):
    """A damage that edits the checkpoint's JSON record by hand (``history`` may name a
    function of the saved history): the checksum covers the tensors only."""
    def edit(folder: Path) -> None:
        path = latest_checkpoint(folder)
        tensors, meta = load_state(path)
        for key, value in changes.items():
            meta[key] = value(meta[key]) if callable(value) else value
        save_state(path, tensors, meta)
    edit.__name__ = "edit_" + "_".join(changes)
    return edit


def edit_trainer_state_fields(folder: Path) -> None:
    path = latest_checkpoint(folder)
    tensors, meta = load_state(path)
    meta["trainer"]["fields"]["state"]["fields"]["bogus"] = 1
    save_state(path, tensors, meta)


def drop_model_tensor(folder: Path) -> None:
    path = latest_checkpoint(folder)
    tensors, meta = load_state(path)
    del tensors["model/net.2.bias"]
    save_state(path, tensors, meta)


# (damage, the checkpoint file named, what the message says of it)
DAMAGES = [
    (edit_record(epoch="four"), "checkpoint-00000002.safetensors", 'its epoch record is "four", expected an integer'),
    (edit_record(epoch=-3), "checkpoint-00000002.safetensors", "its epoch record is -3, expected an integer >= 1"),
    (edit_record(epoch=5), "checkpoint-00000002.safetensors",
     "its history records record is \"2 records\", expected a list of 5 records"),
    (edit_record(history=lambda saved: {**saved, "records": [saved["records"][0], {"perf": 0.5}]}),
     "checkpoint-00000002.safetensors", r'its history row record is \{"perf": 0.5\}, expected records numbered'),
    (edit_record(val_fail=None), "checkpoint-00000002.safetensors", "its val_fail record is null"),
    (edit_record(best={}), "checkpoint-00000002.safetensors", "its best record is {}"),
    (edit_record(elapsed="x"), "checkpoint-00000002.safetensors", 'its elapsed record is "x"'),
    (edit_record(random={}), "checkpoint-00000002.safetensors", "its numpy random state record is null"),
    (edit_trainer_state_fields, "checkpoint-00000002.safetensors",
     "its trainer field 'state' record is .*bogus.*, expected a scalar, or one of"),
    (truncate_tensors, "checkpoint-00000002.safetensors", "is not a valid safetensors file"),
    (remove_json, "checkpoint-00000002.safetensors", "checkpoint-00000002.json is missing"),
    (garble_requires_grad, "checkpoint-00000002.safetensors",
     r'its requires_grad record is \["net.0.weight"\], expected an object mapping parameter names to true or false'),
    (garble_pointer, "latest.txt", "can't decode byte 0xff"),
    (point_nowhere, "checkpoint-00000099.safetensors", "does not exist"),
    # Past the record checks: these failed while loading, after the model had taken the weights.
    (edit_record(random={"numpy": ["PCG64", 0, 0, 0.0]}), "checkpoint-00000002.safetensors",
     "ValueError: set_state can only be used with legacy MT19937 state instances"),
    (drop_model_tensor, "checkpoint-00000002.safetensors", 'RuntimeError: .*Missing key.*"net.2.bias"'),
]


@pytest.mark.parametrize("damage, name, message", DAMAGES, ids=[case[0].__name__ for case in DAMAGES])
def test_unreadable_checkpoint_is_named_before_the_model_changes(tmp_path, damage, name, message):
    X, y = problem()
    fit(network(), X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=1, progress=False)
    damage(tmp_path)
    model = network()
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}  # ranges unset
    expected = f"The checkpoint .*{name} in {tmp_path} cannot be read: .*{message}"
    with pytest.raises(CheckpointError, match=expected) as err:
        fit(model, X, y, epochs=4, checkpoint=tmp_path, progress=False)
    assert str(err.value).endswith("Pass another checkpoint folder, or resume=False to start over and replace it.")
    assert not isinstance(err.value, CheckpointMismatch) and err.value.path.name == name
    assert same_weights(model.state_dict(), before) and not model.normalization_set
    assert all(p.requires_grad for p in model.parameters())
    history = fit(network(), X, y, epochs=2, checkpoint=tmp_path, resume=False, progress=False)  # the way out
    assert history["epoch"] == [0, 1, 2]


@pytest.mark.parametrize("options, error, message", [
    ({"checkpoint_every": 0}, ValueError, "Invalid checkpoint_every value: 0"),
    ({"checkpoint_every": 2.5}, ValueError, "Invalid checkpoint_every value: 2.5"),
    ({"resume": "yes"}, TypeError, "resume must be True or False"),
])
def test_bad_checkpoint_options(tmp_path, options, error, message):
    X, y = problem()
    with pytest.raises(error, match=message):
        fit(network(), X, y, epochs=1, checkpoint=tmp_path, **options)


def test_checkpoint_path_that_is_a_file(tmp_path):
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        Checkpointer(file)


def test_checkpoint_folder_under_a_file_is_refused_before_training(tmp_path):
    file = tmp_path / "f"
    file.write_text("")
    X, y = problem()
    model = network()
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    # Was NotADirectoryError at the first write, after checkpoint_every epochs of training.
    with pytest.raises(ValueError, match=f"checkpoint='{file}/ckpt' cannot be written: {file} is not a folder"):
        fit(model, X, y, epochs=4, checkpoint=file / "ckpt", checkpoint_every=2, progress=False)
    assert same_weights(dict(model.named_parameters()), before)


def test_momentum_checkpoint_naming_its_constant_beta_still_resumes(tmp_path):
    # Checkpoints written before Momentum held its constant under torch.optim's "momentum" key
    # (c13b116) record it as "beta"; a resume refused them as a run with other options.
    X, y = problem()
    common = dict(method="momentum", epochs=12, min_grad=0.0, seed=3, progress=False)
    plain = network()
    expected = fit(plain, X, y, **common)
    with pytest.raises(Interrupted):
        fit(network(), X, y, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(8)], **common)
    path = latest_checkpoint(tmp_path)
    tensors, meta = load_state(path)
    options = meta["run"]["options"]
    options["beta"] = options.pop("momentum")
    save_state(path, tensors, meta)
    resumed_model = network()
    resumed = fit(resumed_model, X, y, checkpoint=tmp_path, checkpoint_every=2, **common)
    assert same_weights(resumed_model.state_dict(), plain.state_dict())
    assert without_time(resumed) == without_time(expected)


def test_fit_says_whether_the_seed_was_given_rather_than_the_checkpointer_guessing(tmp_path):
    # Inferred from torch's global seed, a drawn division seed that happened to equal it (1 in
    # 2**31) would have been taken for a given one, and a resume without a seed refused.
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(7)
    assert Checkpointer(tmp_path / "guess", generator=generator)._seeded
    assert not Checkpointer(tmp_path / "told", generator=generator, seeded=False)._seeded


HOLD = textwrap.dedent("""
    import fcntl, os, sys, time
    descriptor = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a run writing checkpoints there holds it
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="no advisory locks on Windows")
def test_a_folder_another_run_is_writing_to_is_refused_at_the_first_write(tmp_path):
    # Two runs in one folder deleted each other's files: one crashed mid-run with FileNotFoundError.
    X, y = problem()
    fit(network(), X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=1, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in (True, False):
            with pytest.raises(CheckpointError, match="is being written by another run"):
                fit(network(), X, y, epochs=4, checkpoint=tmp_path, resume=resume, progress=False)
        assert load_state(latest_checkpoint(tmp_path))[1]["epoch"] == 2  # the other run's files untouched
    finally:
        holder.kill()
        holder.wait()
    assert fit(network(), X, y, epochs=4, checkpoint=tmp_path, progress=False)["epoch"] == [0, 1, 2, 3, 4]


def test_a_run_of_this_process_that_raised_leaves_the_folder_to_the_next(tmp_path):
    X, y = problem()
    with pytest.raises(Interrupted):  # no train_done: the lock of its writes is not dropped by it
        fit(network(), X, y, epochs=8, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(4)],
            progress=False)
    assert fit(network(), X, y, epochs=6, checkpoint=tmp_path, checkpoint_every=2, progress=False)["epoch"][-1] == 6


WRITE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import network, problem
    from marquardt import fit
    from marquardt.checkpoint import CheckpointError
    X, y = problem()
    try:
        fit(network(), X, y, epochs=6, checkpoint=sys.argv[1], checkpoint_every=2, progress=False)
    except CheckpointError as error:
        print("refused:", error)
    else:
        print("written")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="no advisory locks on Windows")
def test_a_run_that_raised_leaves_the_folder_to_other_processes_at_once(tmp_path):
    # A notebook whose run was interrupted (Ctrl-C) held the folder's lock until its kernel
    # ended: another process was refused with "is being written by another run".
    X, y = problem()
    with pytest.raises(Interrupted):
        fit(network(), X, y, epochs=8, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(4)],
            progress=False)
    other = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path), str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=300)
    assert other.stdout.strip() == "written", other.stdout + other.stderr


def test_a_checkpoint_past_the_epochs_asked_for_is_refused_before_the_model_changes(tmp_path):
    # Resumed at epoch 4 with epochs=2, the run returned 5 records ("Maximum epoch reached."),
    # where an uninterrupted run with epochs=2 has 3.
    X, y = problem()
    with pytest.raises(Interrupted):
        fit(network(), X, y, epochs=8, checkpoint=tmp_path, checkpoint_every=2, callbacks=[InterruptAt(6)],
            progress=False)
    model = network()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match=r"is at epoch 4, past epochs=2.*Pass epochs >= 4"):
        fit(model, X, y, epochs=2, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    assert same_weights(model.state_dict(), before)
    assert fit(network(), X, y, epochs=4, checkpoint=tmp_path, checkpoint_every=2, progress=False)["epoch"][-1] == 4


class Counting(Callback):
    def __init__(self) -> None:
        self.begun = self.epochs = 0

    def on_train_begin(self, history, model):
        self.begun += 1

    def on_epoch_end(self, history, model):
        self.epochs += 1


@pytest.mark.skipif(sys.platform == "win32", reason="no advisory locks on Windows")
def test_a_folder_another_run_is_writing_to_is_refused_before_any_work(tmp_path):
    # The lock was taken at the first write: the second run trained checkpoint_every epochs
    # (here 50) before it was refused.
    X, y = problem()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        model, counting = network(), Counting()
        before = {name: value.clone() for name, value in model.state_dict().items()}
        with pytest.raises(CheckpointError, match="is being written by another run"):
            fit(model, X, y, epochs=100, checkpoint=tmp_path, checkpoint_every=50, callbacks=[counting],
                progress=False)
        assert (counting.begun, counting.epochs) == (0, 0) and same_weights(model.state_dict(), before)
    finally:
        holder.kill()
        holder.wait()
