"""Tests for marquardt.io: safetensors + JSON saves, never pickle."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from marquardt.io import FORMAT_VERSION, load, load_metadata, load_state, save, save_state
from marquardt.mlp import mlp

DTYPES = [torch.float32, torch.float64]


def _trained_like_mlp(dtype: torch.dtype, **kwargs) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = mlp(3, kwargs.pop("hidden", (5,)), 2, dtype=dtype, generator=gen, **kwargs)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64).to(dtype) * 4 + 1
    y = torch.randn(40, 2, generator=gen, dtype=torch.float64).to(dtype) * 100
    if model.normalize:
        model.set_normalization(X, y)
    return model


def _inputs(n_inputs: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(17, n_inputs, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) * 5


def _record(tmp_path: Path, stem: str = "model") -> dict:
    return json.loads((tmp_path / f"{stem}.json").read_text())


def _write_record(tmp_path: Path, record: dict, stem: str = "model") -> None:
    (tmp_path / f"{stem}.json").write_text(json.dumps(record))


class _Evil:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4, dtype=torch.float64)
        self.b = nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sin(self.a(x)))


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"hidden": (4, 3), "activation": "logsig"}, {"hidden": ()}, {"normalize": False}])
def test_mlp_round_trip_is_bit_exact(tmp_path, dtype, kwargs):
    model = _trained_like_mlp(dtype, **kwargs)
    save(model, tmp_path / "model")
    loaded = load(tmp_path / "model")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert loaded.normalization_set == model.normalization_set
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b)
    x = _inputs(dtype=dtype)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_path_may_be_stem_or_either_file(tmp_path, suffix):
    written = save(_trained_like_mlp(torch.float64), str(tmp_path / "sub" / "dir" / "model") + suffix)
    assert written == tmp_path / "sub" / "dir" / "model.safetensors"
    assert sorted(p.name for p in written.parent.iterdir()) == ["model.json", "model.safetensors"]
    for name in ("model", "model.safetensors", "model.json"):
        assert isinstance(load(written.parent / name), nn.Module)


def test_json_is_plain_and_describes_the_save(tmp_path):
    model = _trained_like_mlp(torch.float32)
    save(model, tmp_path / "model", metadata={"epochs": 7})
    record = _record(tmp_path)
    assert record["format"] == "marquardt" and record["format_version"] == FORMAT_VERSION
    assert record["class"] == "MLP" and record["architecture"] == model.config()
    assert record["dtype"] == "float32" and record["metadata"] == {"epochs": 7}
    assert record["tensors"]["net.0.weight"] == {"dtype": "float32", "shape": [5, 3]}
    assert record["tensors"]["stats_set"] == {"dtype": "bool", "shape": []}


SEQUENTIALS = {
    "tanh": lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)),
    "many activations": lambda: nn.Sequential(
        nn.Linear(3, 6), nn.Sigmoid(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.LeakyReLU(0.25),
        nn.Linear(6, 6), nn.ELU(alpha=0.5), nn.Linear(6, 6), nn.GELU(approximate="tanh"),
        nn.Linear(6, 6), nn.Softplus(beta=2.0, threshold=10.0), nn.Linear(6, 6), nn.SiLU(),
        nn.Linear(6, 6), nn.Hardtanh(-2.0, 2.0), nn.Linear(6, 2), nn.Identity(),
    ),
    "softmax": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Softmax(dim=1)),
    "log softmax": lambda: nn.Sequential(nn.Linear(3, 3, bias=False), nn.LogSoftmax(dim=-1)),
    "nested and named": lambda: nn.Sequential(
        OrderedDict(
            hidden=nn.Sequential(nn.Linear(3, 4), nn.Tanh()),
            out=nn.Linear(4, 2),
        )
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SEQUENTIALS))
def test_sequential_round_trip(tmp_path, dtype, name):
    torch.manual_seed(0)
    model = SEQUENTIALS[name]().to(dtype)
    save(model, tmp_path / "model")
    assert _record(tmp_path)["class"] == "Sequential"
    loaded = load(tmp_path / "model")
    assert type(loaded) is nn.Sequential
    assert repr(loaded) == repr(model)
    x = _inputs(dtype=dtype)
    assert torch.equal(loaded(x), model(x))


# save records "dtype": null for these; load failed on them ("invalid architecture record").
UNEVEN_DTYPES = {
    "float32 then float64": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2).double()),
    "bfloat16 and float16, nested": lambda: nn.Sequential(
        nn.Linear(3, 4).to(torch.bfloat16), nn.Sequential(nn.Linear(4, 2).half(), nn.Tanh())),
    "no tensors": lambda: nn.Sequential(nn.Tanh()),
}


@pytest.mark.parametrize("name", list(UNEVEN_DTYPES))
def test_sequential_of_several_dtypes_or_none_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = UNEVEN_DTYPES[name]()
    save(model, tmp_path / "model")
    assert _record(tmp_path)["dtype"] is None
    loaded = load(tmp_path / "model")
    assert repr(loaded) == repr(model)
    saved, found = model.state_dict(), loaded.state_dict()
    assert saved.keys() == found.keys()
    for key in saved:
        assert found[key].dtype == saved[key].dtype and torch.equal(found[key], saved[key]), key
    assert all(type(p) is nn.Parameter and p.requires_grad for p in loaded.parameters())
    first = next(model.parameters(), None)
    x = _inputs(dtype=torch.float32 if first is None else first.dtype)
    assert torch.equal(loaded[0](x), model[0](x))


def _with_layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("factory", [_Custom, _with_layer_norm], ids=["custom class", "unsupported layer"])
def test_other_modules_need_model_to_load(tmp_path, factory):
    torch.manual_seed(0)
    module = factory()
    save(module, tmp_path / "model")
    assert _record(tmp_path)["architecture"] is None
    with pytest.raises(ValueError, match=r"model\.safetensors.*no architecture record.*model=<module instance>"):
        load(tmp_path / "model")
    target = factory()
    assert load(tmp_path / "model", model=target) is target
    x = _inputs()
    assert torch.equal(target(x), module(x))


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    save(model, tmp_path / "model")
    target = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    load(tmp_path / "model", model=target)
    assert torch.equal(target[2].weight, model[0].weight)


def test_a_layer_called_twice_round_trips(tmp_path):
    # named_children() skips a module met before: the record of Sequential(lin, Tanh, lin) had two
    # entries, and load refused its own save ("unexpected 2.bias; unexpected 2.weight").
    lin = nn.Linear(3, 3, dtype=torch.float64)
    model = nn.Sequential(lin, nn.Tanh(), nn.Sequential(lin, nn.Tanh()), lin)
    save(model, tmp_path / "model")
    assert [layer["name"] for layer in _record(tmp_path)["architecture"]["layers"]] == ["0", "1", "2", "3"]
    loaded = load(tmp_path / "model")
    x = _inputs()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[3].weight, lin.weight) and torch.equal(loaded[2][0].bias, lin.bias)


def test_load_does_not_disturb_global_rng(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    load(tmp_path / "model")
    assert torch.equal(torch.rand(4), expected)


def test_map_location_accepts_device_and_rejects_garbage(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    assert next(load(tmp_path / "model", map_location=torch.device("cpu")).parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="map_location must name a torch device.*'not-a-device'"):
        load(tmp_path / "model", map_location="not-a-device")


# -------------------------------------------------------------------------------- metadata


@dataclasses.dataclass
class _Record:
    epoch: int
    performance: float


def test_metadata_round_trip(tmp_path):
    metadata = {
        "history": [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 0.25}],
        "best_val": math.inf,
        "numpy": np.arange(3),
        "numpy_scalar": np.float64(0.5),
        "tensor": torch.tensor([1.0, 2.0]),
        "record": _Record(3, 0.125),
        "nested": {"tuple": (1, 2), "none": None, "flag": True},
    }
    save(_trained_like_mlp(torch.float64), tmp_path / "model", metadata=metadata)
    assert load_metadata(tmp_path / "model") == {
        "history": [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 0.25}],
        "best_val": math.inf,
        "numpy": [0, 1, 2],
        "numpy_scalar": 0.5,
        "tensor": [1.0, 2.0],
        "record": {"epoch": 3, "performance": 0.125},
        "nested": {"tuple": [1, 2], "none": None, "flag": True},
    }


def test_bad_metadata_fails_before_writing(tmp_path):
    with pytest.raises(TypeError, match="metadata must hold only JSON values.*object"):
        save(_trained_like_mlp(torch.float64), tmp_path / "model", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- atomic writes


def test_no_temporary_files_left_and_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save(_trained_like_mlp(torch.float64), tmp_path / "model")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in tmp_path.iterdir())


def test_failed_write_keeps_previous_save(tmp_path, monkeypatch):
    import safetensors.torch

    first = _trained_like_mlp(torch.float64)
    save(first, tmp_path / "model")

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save(_trained_like_mlp(torch.float64, hidden=(2,)), tmp_path / "model")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    x = _inputs()
    assert torch.equal(load(tmp_path / "model")(x), first(x))


def test_replaces_go_through_same_directory_temporaries(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    assert [dst.name for _, dst in calls] == ["model.safetensors", "model.json"]
    assert all(src.parent == dst.parent and src.name.endswith(".tmp") for src, dst in calls)


def test_atomic_write_syncs_file_then_folder_and_cleans_up(tmp_path, monkeypatch):
    # The one atomic write (models, checkpoints, histories, CLI reports and predictions): the
    # file's data reach the disk before the rename, the folder's entry after it.
    from marquardt.io import _atomic_write

    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", Path(src).parent == Path(dst).parent))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "out.txt"
    assert _atomic_write(str(target), lambda tmp: tmp.write_text("new")) == target
    assert events == [("fsync", "file"), ("replace", True), ("fsync", "folder")]
    assert target.read_text() == "new"

    def fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(target, fail)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(FileNotFoundError, match="directory .*missing.* does not exist"):
        _atomic_write(tmp_path / "missing" / "out.txt", lambda tmp: tmp.write_text("x"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_goes_through_a_symlink_and_into_a_pipe(tmp_path):
    # os.replace on the link's path replaced the link by a file and left the linked file as it was.
    from marquardt.io import _atomic_write

    (tmp_path / "data").mkdir()
    real, link = tmp_path / "data" / "real.txt", tmp_path / "link.txt"
    real.write_text("old")
    link.symlink_to(real)
    assert _atomic_write(link, lambda tmp: tmp.write_text("new")) == link
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["real.txt"]
    # A named pipe cannot be replaced, only written (as /dev/stdout): its reader gets the data.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    _atomic_write(fifo, lambda path: path.write_text("through"))
    reader.join(timeout=30)
    assert received == ["through"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


# --------------------------------------------------------------------------- refusing files


def test_pickle_renamed_to_safetensors_is_refused_without_running(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "marker"
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"weights": _Evil(marker)}))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load(tmp_path / "model")
    assert not marker.exists()


def test_torch_save_file_renamed_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    torch.save({"weights": _Evil(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load(tmp_path / "model")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 64])
def test_garbage_tensors_file_is_refused(tmp_path, content):
    save_state(tmp_path / "state", {"a": torch.zeros(2)}, {})
    (tmp_path / "state.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"state\.safetensors is not a valid safetensors file"):
        load_state(tmp_path / "state")


def _flip_a_data_byte(path: Path, offset: int) -> None:
    """Change one byte of the tensor data (after the 8-byte length and the JSON header; < 0: from the end)."""
    content = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(content[:8], "little")
    content[offset if offset < 0 else start + offset] ^= 0x40
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("offset", [0, 20, -1])
def test_a_changed_byte_in_the_tensors_is_refused(tmp_path, offset):
    model = _trained_like_mlp(torch.float64)
    save(model, tmp_path / "model")
    save_state(tmp_path / "state", {"w": torch.arange(6.0), "rng": torch.get_rng_state()}, {"epoch": 3})
    for stem in ("model", "state"):
        _flip_a_data_byte(tmp_path / f"{stem}.safetensors", offset)
    # safetensors itself reads these files without complaint: only the checksum notices.
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted: its numbers differ from those saved "
                                         r"\(the checksum in model\.json does not match\)"):
        load(tmp_path / "model")
    with pytest.raises(ValueError, match=r"state\.safetensors is corrupted"):
        load_state(tmp_path / "state")


def test_a_save_without_checksum_still_loads(tmp_path):
    # Files written before the checksum was recorded.
    model = _trained_like_mlp(torch.float32)
    save(model, tmp_path / "model")
    record = _record(tmp_path)
    assert len(record.pop("checksum")) == 32
    _write_record(tmp_path, record)
    x = _inputs(dtype=torch.float32)
    assert torch.equal(load(tmp_path / "model")(x), model(x))


def test_missing_json_is_refused(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    (tmp_path / "model.json").unlink()
    with pytest.raises(ValueError, match=r"model\.json is missing"):
        load(tmp_path / "model")


@pytest.mark.parametrize("loader", [load, load_state, load_metadata])
def test_a_path_with_no_save_is_file_not_found(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist \(nor nope\.json\)"):
        loader(tmp_path / "nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_map_location_cuda_without_cuda_is_a_value_error(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    with pytest.raises(ValueError, match=r"map_location='cuda', but CUDA is not available .* map_location='cpu'"):
        load(tmp_path / "model", map_location="cuda")


def test_missing_tensors_file_is_refused(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors does not exist"):
        load(tmp_path / "model")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: "{not json", r"model\.json is not valid JSON"),
        (lambda r: [1, 2], r"model\.json is not a marquardt save"),
        (lambda r: {**r, "format": "other"}, r"model\.json is not a marquardt save"),
        (lambda r: {**r, "format_version": 99}, r"model\.json has unknown format version 99"),
        # 1.0 == 1 and True == 1: both were read as version 1.
        (lambda r: {**r, "format_version": 1.0}, r"model\.json has unknown format version 1\.0"),
        (lambda r: {**r, "format_version": True}, r"model\.json has unknown format version True"),
        # Nested past Python's recursion limit: a RecursionError traceback.
        (lambda r: json.dumps({**r, "metadata": "X"}).replace('"X"', "[" * 10**5 + "]" * 10**5),
         r"model\.json is not valid JSON: maximum recursion depth"),
        # Sizes edited past the tensors were allocated (and initialised) before the shapes were
        # compared: a RuntimeError from the allocator here, 14 GB and 90 s for n_inputs 30000.
        (lambda r: {**r, "architecture": {**r["architecture"], "hidden": [10**12]}},
         r"model\.safetensors does not match the model architecture: the record describes 6000000000002 weights "
         r"and biases \(MLP\); the file holds 43 numbers in all"),
        (lambda r: {k: v for k, v in r.items() if k != "format_version"}, r"unknown format version None"),
        (lambda r: {**r, "kind": "state"}, r"holds a 'state' save; read it with load_state\(\)"),
        (lambda r: {**r, "save_id": "0" * 32}, r"come from different saves"),
        (lambda r: {**r, "tensors": {}}, r"does not hold the tensors that .*model\.json lists"),
        (
            lambda r: {**r, "architecture": {**r["architecture"], "hidden": [4]}},
            r"model\.safetensors does not match the model architecture: net\.0\.bias: file has shape \(5,\) "
            r"float64, model has shape \(4,\) float64",
        ),
        (
            lambda r: {**r, "architecture": {**r["architecture"], "n_outputs": 1, "hidden": [5, 5]}},
            r"does not match the model architecture: missing net\.4\.bias.*net\.2\.weight",
        ),
        (lambda r: {**r, "architecture": {"n_inputs": 3}}, r"invalid architecture record for MLP"),
        (lambda r: {**r, "dtype": "int64"}, r"invalid architecture record.*received torch\.int64"),
        (lambda r: {**r, "dtype": "float32"}, r"net\.0\.bias: file has shape \(5,\) float64, model has shape \(5,\) float32"),
        (lambda r: {**r, "dtype": "Tensor"}, r"invalid architecture record.*not a dtype"),
        (lambda r: {**r, "class": "Sequential", "architecture": {"layers": [{"type": "Conv2d"}]}},
         r"invalid architecture record for Sequential"),
        (lambda r: {**r, "class": "mypackage.Net", "architecture": None}, r"holds a mypackage\.Net with no architecture"),
    ],
)
def test_bad_json_is_refused(tmp_path, edit, match):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    edited = edit(_record(tmp_path))
    (tmp_path / "model.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ValueError, match=match):
        load(tmp_path / "model")


def _linear_tanh_linear() -> dict:
    return {"class": "Sequential", "architecture": {"layers": [
        {"name": "0", "type": "Linear", "in_features": 3, "out_features": 4, "bias": True},
        {"name": "1", "type": "Tanh"},
        {"name": "2", "type": "Linear", "in_features": 4, "out_features": 2, "bias": True}]}}


def _layer(index: int, **spec) -> Callable[[dict], dict]:
    def edit(record: dict) -> dict:
        record["architecture"]["layers"][index] = {"name": str(index), **spec}
        return record
    return edit


# A hand-edited layer record: each was accepted and failed at the first forward pass, was taken
# as true, or was a RuntimeError or TypeError from torch instead of a ValueError naming the file.
BAD_LAYERS = [
    ("bias as text", _layer(0, type="Linear", in_features=3, out_features=4, bias="no"),
     r"layer '0' \(Linear\): bias is 'no'; expected true or false"),
    ("negative size", _layer(0, type="Linear", in_features=-1, out_features=4, bias=True),
     r"layer '0' \(Linear\): in_features is -1; expected an integer >= 0"),
    ("size as float", _layer(0, type="Linear", in_features=3.0, out_features=4, bias=True),
     r"layer '0' \(Linear\): in_features is 3\.0; expected an integer >= 0"),
    ("slope as text", _layer(1, type="LeakyReLU", negative_slope="x"),
     r"layer '1' \(LeakyReLU\): negative_slope is 'x'; expected a number"),
    ("unknown GELU approximation", _layer(1, type="GELU", approximate="bogus"),
     r"layer '1' \(GELU\): approximate is 'bogus'; expected 'none' or 'tanh'"),
    ("softmax dim as text", _layer(1, type="Softmax", dim="x"),
     r"layer '1' \(Softmax\): dim is 'x'; expected an integer or null"),
    ("missing argument", _layer(1, type="ELU"), r"layer '1' \(ELU\): alpha is missing; expected a number"),
    ("a layer load cannot build", _layer(1, type="Dropout"),
     r"layer '1' has type 'Dropout', which load cannot rebuild"),
    ("a layer as text", lambda r: {**r, "architecture": {"layers": ["Tanh"]}},
     r"layer record 'Tanh' is not an object with a string 'name'"),
    ("architecture as a list", lambda r: {**r, "architecture": [1]}, r"architecture is \[1\]; expected an object"),
    ("huge layer", _layer(0, type="Linear", in_features=10**12, out_features=4, bias=True),
     r"does not match the model architecture: the record describes 4000000000014 weights and biases \(Sequential\); "
     r"the file holds 26 numbers in all"),
]


@pytest.mark.parametrize("edit, match", [case[1:] for case in BAD_LAYERS], ids=[case[0] for case in BAD_LAYERS])
def test_bad_layer_records_are_refused(tmp_path, edit, match):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    save(model, tmp_path / "model")
    record = _record(tmp_path)
    assert {k: record[k] for k in ("class", "architecture")} == _linear_tanh_linear()
    _write_record(tmp_path, edit(record))
    with pytest.raises(ValueError, match=match):
        load(tmp_path / "model")


def test_files_from_different_saves_are_refused(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    old_json = (tmp_path / "model.json").read_text()
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    (tmp_path / "model.json").write_text(old_json)
    with pytest.raises(ValueError, match="come from different saves"):
        load(tmp_path / "model")


def test_model_with_other_shapes_is_refused(tmp_path):
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    with pytest.raises(ValueError, match=r"net\.0\.weight: file has shape \(5, 3\), model has shape \(4, 3\)"):
        load(tmp_path / "model", model=mlp(3, (4,), 2, dtype=torch.float64))


def test_state_save_is_refused_by_load_and_model_save_by_load_state(tmp_path):
    save_state(tmp_path / "state", {"a": torch.zeros(1)}, {})
    save(_trained_like_mlp(torch.float64), tmp_path / "model")
    with pytest.raises(ValueError, match=r"state\.json holds a 'state' save; read it with load_state\(\)"):
        load(tmp_path / "state")
    with pytest.raises(ValueError, match=r"model\.json holds a 'model' save; read it with load\(\)"):
        load_state(tmp_path / "model")


def test_missing_safetensors_package_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save(_trained_like_mlp(torch.float64), tmp_path / "model")


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: save("not a module", p / "m"), TypeError, "model must be a torch.nn.Module, received str"),
        (lambda p: save(nn.Linear(1, 1), p / "m", metadata=[1]), TypeError, "metadata must be a dict or None, received list"),
        (lambda p: save(nn.Linear(1, 1), 3), TypeError, "path must be a str or os.PathLike, received int"),
        (lambda p: save(nn.Linear(1, 1), p), ValueError, "path must name a file stem"),
        (lambda p: save(nn.Linear(1, 1), str(p / "m") + "/"), ValueError, "path must name a file stem"),
        (lambda p: load(p / "m", model="x"), TypeError, "model must be a torch.nn.Module or None, received str"),
        (lambda p: save_state(p / "s", [torch.zeros(1)], {}), TypeError, "tensors must be a dict of str -> Tensor, received list"),
        (lambda p: save_state(p / "s", {"a": 1.0}, {}), TypeError, "tensors must map str names to tensors, received 'a': float"),
        (lambda p: save_state(p / "s", {1: torch.zeros(1)}, {}), TypeError, "tensors must map str names to tensors, received 1"),
        (lambda p: save_state(p / "s", {}, None), TypeError, "meta must be a dict, received NoneType"),
        (lambda p: save_state(p / "s", {}, {"x": object()}), TypeError, "meta must hold only JSON values"),
    ],
)
def test_bad_arguments(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


# --------------------------------------------------------------------------------- state


def test_checkpoint_state_round_trip_restores_rngs(tmp_path):
    model = _trained_like_mlp(torch.float64)
    torch.manual_seed(11)
    np_rng = np.random.default_rng(5)
    np.random.seed(3)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {
        "damping": {"mu": 1e-3, "mu_inc": 10.0},
        "history": [{"epoch": 0, "perf": 2.0, "val_perf": math.nan}],
        "numpy_generator": np_rng.bit_generator.state,
        "numpy_legacy": np.random.get_state(),
    }
    save_state(tmp_path / "ckpt.safetensors", tensors, meta)
    expected_torch, expected_gen, expected_legacy = torch.rand(3), np_rng.random(3), np.random.random(3)

    loaded, loaded_meta = load_state(tmp_path / "ckpt")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert loaded_meta["damping"] == meta["damping"]
    assert math.isnan(loaded_meta["history"][0]["val_perf"])

    torch.set_rng_state(loaded["torch_rng"])
    restored_gen = np.random.default_rng()
    restored_gen.bit_generator.state = loaded_meta["numpy_generator"]
    kind, keys, pos, has_gauss, cached = loaded_meta["numpy_legacy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(restored_gen.random(3), expected_gen)
    assert np.array_equal(np.random.random(3), expected_legacy)


def test_state_with_no_tensors_and_scalar_tensors(tmp_path):
    save_state(tmp_path / "empty", {}, {"epoch": 4})
    assert load_state(tmp_path / "empty") == ({}, {"epoch": 4})
    scalars = {"flag": torch.tensor(True), "count": torch.tensor(3, dtype=torch.int64), "x": torch.tensor(0.5)}
    save_state(tmp_path / "scalars", scalars, {})
    loaded, _ = load_state(tmp_path / "scalars")
    assert all(torch.equal(loaded[k], v) and loaded[k].shape == () for k, v in scalars.items())


def test_state_tensors_are_copies(tmp_path):
    weight = torch.ones(3)
    view = torch.arange(10.0)[::2]  # non-contiguous
    save_state(tmp_path / "s", {"w": weight, "v": view}, {})
    weight.add_(1)
    loaded, _ = load_state(tmp_path / "s")
    assert torch.equal(loaded["w"], torch.ones(3)) and torch.equal(loaded["v"], torch.tensor([0.0, 2, 4, 6, 8]))
