"""Saving and loading models and checkpoint state as safetensors + JSON, never pickle.

A save writes two files side by side: ``<stem>.safetensors`` with the tensors and
``<stem>.json`` with what is needed to rebuild and check them (format version,
class name, architecture, dtype, tensor names and shapes, a checksum of the tensors, user
metadata). Loading parses only these two formats, so a file from an untrusted source cannot run
code, and checks the tensors against the checksum, so a file changed on disk is refused.

Each file is written to a temporary file in the same directory and moved into place
with ``os.replace``, so a reader sees either the old or the new file, never a partial
one. Both files carry the same random ``save_id``; a tensors file and a JSON file from
different saves (say, a save interrupted between the two moves) are refused on load.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .mlp import MLP

__all__ = ["save", "load", "load_metadata", "save_state", "load_state", "FORMAT_VERSION"]

FORMAT = "marquardt"
FORMAT_VERSION = 1
_READABLE_VERSIONS = (1,)
_SUFFIXES = (".safetensors", ".json")

# Sequential layers that can be rebuilt from their constructor arguments alone.
_LAYER_ARGS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Identity": (nn.Identity, ()),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "ReLU": (nn.ReLU, ()),
    "SiLU": (nn.SiLU, ()),
    "Softsign": (nn.Softsign, ()),
    "Tanhshrink": (nn.Tanhshrink, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "GELU": (nn.GELU, ("approximate",)),
    "Softplus": (nn.Softplus, ("beta", "threshold")),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
}


# ------------------------------------------------------------------------------ paths


def _file_pair(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return the (tensors, JSON) paths for a stem or a path ending in either suffix."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, received {type(path).__name__}")
    text = os.fspath(path)
    for suffix in _SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    stem = Path(text)
    if not stem.name or text.endswith(("/", os.sep)) or stem.is_dir():
        raise ValueError(
            f"path must name a file stem such as 'dir/model' or 'dir/model.safetensors', received {path!r}"
        )
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _safetensors_torch() -> Any:
    """Import ``safetensors.torch`` on first use, with an actionable error."""
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(
            "saving and loading need the safetensors package; install it with "
            "`pip install safetensors` (or `pip install marquardt[io]`)"
        ) from err
    return safetensors.torch


# ------------------------------------------------------------------------------ writing


def _atomic_write(target: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``target``, then move it into place.

    The one atomic write of the package (models, checkpoints, histories, reports, plots,
    predictions). A reader sees the old file or the new one, never a partial one, and a crash
    at any point leaves the old file intact:

    - the temporary file is in ``target``'s folder (``os.replace`` is atomic only within one
      file system), named ``.<name>.<random>.tmp``;
    - its data reach the disk (``fsync``) before the rename, and the folder's entry after it,
      so that after a power loss ``target`` holds the old or the new contents, not an empty file;
    - on any failure (an exception from ``write``, a full disk, ``KeyboardInterrupt``) the
      temporary file is removed;
    - the final file gets the permissions a plain ``open`` would give it (``mkstemp``'s are 0600);
    - a symbolic link is written through: its target file is replaced, the link kept;
    - an existing target that is not a regular file (``/dev/stdout``, a named pipe) cannot be
      replaced, only written: ``write`` is called on it directly.

    Parameters
    ----------
    target : str or os.PathLike
        The file to write. Its folder must exist.
    write : callable
        Called with the temporary file's path; writes the whole contents there.

    Returns
    -------
    pathlib.Path
        ``target``.

    Raises
    ------
    FileNotFoundError
        If ``target``'s folder does not exist.
    """
    named = Path(target)
    if _is_stream(named):
        write(named)
        return named
    target = Path(os.path.realpath(named)) if named.is_symlink() else named
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write {str(named)!r}: directory {str(target.parent)!r} does not exist"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return named


def _is_stream(path: Path) -> bool:
    """Whether ``path`` is written, never replaced: an existing file that is not a regular file
    or a folder (a device, a named pipe), or a process's file descriptor reached through
    ``/proc`` (``/dev/stdout``, ``/dev/fd/1``), whatever that descriptor is open on: replacing
    the file behind ``> out.csv`` would leave the shell writing to the old one.

    Examples
    --------
    >>> _is_stream(Path("/dev/null")), _is_stream(Path("/tmp/marquardt-example.csv"))
    (True, False)
    """
    if path.exists() and not path.is_file() and not path.is_dir():
        return True
    current, links = Path(os.path.realpath(path.parent)) / path.name, 0
    while current.parts[1:2] != ("proc",):
        if not current.is_symlink() or links == 40:
            return False
        link = current.parent / os.readlink(current)
        current, links = Path(os.path.realpath(link.parent)) / link.name, links + 1
    return True


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; POSIX only (Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems (certain network and FUSE mounts) cannot sync a folder; the rename
        # has happened, so the write is complete, only not yet durable.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp uses 0o600)."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    # Linux reports the umask read-only; elsewhere os.umask must set it to read it,
    # which briefly changes it for other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _json_default(obj: Any) -> Any:
    """Convert tensors, numpy values and dataclasses for ``json.dumps``."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _to_json(record: Mapping[str, Any], argument: str) -> str:
    """Serialise ``record``; a failure names the user ``argument`` that caused it."""
    try:
        return json.dumps(record, indent=2, default=_json_default)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{argument} must hold only JSON values (dict, list, str, int, float, bool, None; "
            f"tensors and numpy arrays become lists), received one that is not: {err}"
        ) from err


def _cpu_tensors(tensors: Mapping[str, Any], argument: str) -> dict[str, Tensor]:
    """Copy tensors to contiguous CPU tensors that share no storage (safetensors needs both)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{argument} must be a dict of str -> Tensor, received {type(tensors).__name__}")
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(
                f"{argument} must map str names to tensors, received {name!r}: {type(tensor).__name__}"
            )
        out[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _tensor_table(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Name -> dtype and shape, recorded in the JSON to check the tensors file against."""
    return {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw_bytes(tensor: Tensor) -> np.ndarray:
    """The tensor's memory as bytes: numpy has no bfloat16, so its bytes are read as uint8."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    """A digest of every tensor's name, dtype, shape and bytes, recorded in the JSON file.

    safetensors checks the layout of its file, not the numbers in it: a byte changed on disk
    would load as a different weight, silently.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}\0{_dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _write_pair(
    path: Any, kind: str, tensors: dict[str, Tensor], record: dict[str, Any], argument: str
) -> Path:
    """Write the tensors and JSON files for ``path`` atomically; return the tensors path."""
    tensors_path, json_path = _file_pair(path)
    save_id = uuid.uuid4().hex
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind, "save_id": save_id}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "save_id": save_id}
    full.update(record)
    full["tensors"] = _tensor_table(tensors)
    full["checksum"] = _checksum(tensors)
    text = _to_json(full, argument)  # fail before touching any file
    save_file = _safetensors_torch().save_file
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(tensors_path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    _atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return tensors_path


# ----------------------------------------------------------------------- architectures


def _layer_spec(name: str, layer: nn.Module) -> dict[str, Any] | None:
    """JSON description of one Sequential entry, or None when it cannot be rebuilt."""
    kind = type(layer).__name__
    if type(layer) is nn.Linear:
        return {
            "name": name,
            "type": "Linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }
    if type(layer) is nn.Sequential:
        layers = _sequential_spec(layer)
        return None if layers is None else {"name": name, "type": "Sequential", "layers": layers}
    if kind in _LAYER_ARGS and type(layer) is _LAYER_ARGS[kind][0]:
        return {"name": name, "type": kind, **{arg: getattr(layer, arg) for arg in _LAYER_ARGS[kind][1]}}
    return None


def _sequential_spec(seq: nn.Sequential) -> list[dict[str, Any]] | None:
    """Layer list of a Sequential of supported layers, or None if any layer is unsupported."""
    # Every entry, not named_children(), which skips a module met before: a Sequential that
    # calls one layer twice (nn.Sequential(lin, nn.Tanh(), lin)) lost the second call from its
    # record, and its save could not be loaded. Rebuilt, the two entries hold equal copies, as
    # parameters tied across layers do.
    specs = [_layer_spec(name, layer) for name, layer in seq._modules.items()]
    return None if any(spec is None for spec in specs) else specs


def _describe(model: nn.Module) -> tuple[str, Any]:
    """Class name and architecture record (None for modules that need ``model=`` to load)."""
    if type(model) is MLP:
        return "MLP", model.config()
    if type(model) is nn.Sequential:
        layers = _sequential_spec(model)
        if layers is not None:
            return "Sequential", {"layers": layers}
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}", None


def _build_layer(spec: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    _check_layer_spec(spec)
    kind = spec["type"]
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype)
    if kind == "Sequential":
        return _build_sequential(spec["layers"], dtype)
    cls, args = _LAYER_ARGS[kind]
    return cls(**{arg: spec[arg] for arg in args})


def _build_sequential(layers: list[Mapping[str, Any]], dtype: torch.dtype) -> nn.Sequential:
    if not isinstance(layers, list):
        raise TypeError(f"layers is {layers!r}; expected a list of layer records")
    built: OrderedDict[str, nn.Module] = OrderedDict()
    for spec in layers:
        built[spec["name"]] = _build_layer(spec, dtype)  # checks spec before reading its name
    return nn.Sequential(built)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each recorded constructor argument may hold: a hand-edited value of another type (a
# negative_slope of "x", approximate="bogus", bias="no") was accepted at load and failed at the
# first forward pass, or was taken as true.
_ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "in_features": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "out_features": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "dim": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "approximate": (lambda v: v in ("none", "tanh"), "'none' or 'tanh'"),
    **{arg: (_is_number, "a number") for arg in ("negative_slope", "alpha", "beta", "threshold", "min_val", "max_val")},
}


def _check_layer_spec(spec: Any) -> None:
    """A layer record's type, name and arguments, before any module is built from it."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise TypeError(f"layer record {spec!r} is not an object with a string 'name'")
    kind = spec.get("type")
    if kind not in ("Linear", "Sequential") and kind not in _LAYER_ARGS:
        raise ValueError(f"layer {spec['name']!r} has type {kind!r}, which load cannot rebuild")
    args = ("in_features", "out_features", "bias") if kind == "Linear" else _LAYER_ARGS.get(kind, (None, ()))[1]
    for arg in args:
        valid, expected = _ARG_CHECKS[arg]
        if arg not in spec or not valid(spec[arg]):
            found = "is missing" if arg not in spec else f"is {spec[arg]!r}"
            raise ValueError(f"layer {spec['name']!r} ({kind}): {arg} {found}; expected {expected}")


# Weights and biases that a record may ask for beyond the tensors file before building it is
# refused: a few MB, so that a small mismatch is reported tensor by tensor.
_CHEAP_TO_BUILD = 2**20


def _parameter_count(class_name: str, architecture: Any) -> int:
    """How many weights and biases building ``architecture`` takes: its sizes are read from a file
    that may have been edited, so they are checked against the tensors before anything is built
    (an MLP's n_inputs edited to 30000 took 14 GB and 90 s before the shape mismatch was found).
    Sizes that are not ints count 0; building refuses them."""
    if not isinstance(architecture, Mapping):
        return 0
    if class_name == "Sequential":
        return _sequential_parameter_count(architecture.get("layers"))
    try:
        sizes = [architecture["n_inputs"], *architecture["hidden"], architecture["n_outputs"]]
    except (KeyError, TypeError):
        return 0
    if not all(type(size) is int for size in sizes):
        return 0
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))


def _sequential_parameter_count(layers: Any) -> int:
    total = 0
    for spec in layers if isinstance(layers, list) else ():
        kind = spec.get("type") if isinstance(spec, Mapping) else None
        if kind == "Sequential":
            total += _sequential_parameter_count(spec.get("layers"))
        elif kind == "Linear":
            try:
                _check_layer_spec(spec)
            except (TypeError, ValueError):
                continue  # never built
            total += (spec["in_features"] + spec["bias"]) * spec["out_features"]
    return total


def _build(record: Mapping[str, Any], where: Path, held: int) -> nn.Module:
    """Rebuild the module described by a JSON record, without touching the global RNG.

    ``held`` is the number of elements in the tensors file: a record asking for more weights
    than that (and more than ``_CHEAP_TO_BUILD``) is refused before any memory is taken.
    """
    class_name, architecture = record.get("class"), record.get("architecture")
    if class_name not in ("MLP", "Sequential") or architecture is None:
        raise ValueError(
            f"{where} holds a {class_name} with no architecture record, so it cannot be rebuilt; "
            f"pass the module to load into: load(path, model=<module instance>)"
        )
    try:
        count = _parameter_count(class_name, architecture)
    except RecursionError:
        raise ValueError(f"{where} has an invalid architecture record for {class_name}: nested too deeply") from None
    if count > max(held, _CHEAP_TO_BUILD):  # below that, build and let _check_matches name each tensor
        raise ValueError(
            f"{where} does not match the model architecture: the record describes {count} weights and biases "
            f"({class_name}); the file holds {held} numbers in all"
        )
    try:
        if not isinstance(architecture, Mapping):
            raise TypeError(f"architecture is {architecture!r}; expected an object")
        # save records null when the floating tensors have several dtypes (or there are none):
        # the layers are built in the default dtype and take the file's tensors as they are.
        dtype = torch.get_default_dtype() if record["dtype"] is None else getattr(torch, record["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {record['dtype']!r}")
        # Fresh layers draw initial weights that are overwritten at once; fork_rng keeps
        # the caller's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            if class_name == "MLP":
                return MLP.from_config(architecture, dtype=dtype)
            return _build_sequential(architecture["layers"], dtype)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        raise ValueError(f"{where} has an invalid architecture record for {class_name}: {err}") from err


# ------------------------------------------------------------------------------ reading


def _read_record(json_path: Path, kind: str) -> dict[str, Any]:
    """Parse and check the JSON file of a save."""
    if not json_path.is_file():
        raise ValueError(
            f"{json_path} is missing; a marquardt save is a .safetensors file plus a .json file "
            f"with the same stem, and both are needed to load it"
        )
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # Recursion: nested too deeply
        raise ValueError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a marquardt save (no \"format\": \"{FORMAT}\" entry)")
    version = record.get("format_version")
    if type(version) is not int or version not in _READABLE_VERSIONS:  # 1.0 and true equal 1
        raise ValueError(
            f"{json_path} has unknown format version {version!r}; this marquardt reads "
            f"versions {list(_READABLE_VERSIONS)}, a newer marquardt may read it"
        )
    if record.get("kind") != kind:
        other = "load_state" if record.get("kind") == "state" else "load"
        raise ValueError(f"{json_path} holds a {record.get('kind')!r} save; read it with {other}()")
    return record


def _read_tensors(tensors_path: Path, device: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file; anything unreadable becomes a ValueError naming the file."""
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{tensors_path} does not exist")
    safe_open = _safetensors_torch().safe_open
    try:
        with safe_open(str(tensors_path), framework="pt", device=device) as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{tensors_path} is not a valid safetensors file: {err}") from err
    return tensors, header


def _read_pair(path: Any, kind: str, map_location: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and cross-check both files of a save."""
    tensors_path, json_path = _file_pair(path)
    device = _check_device(map_location)
    _check_exists(tensors_path, json_path)
    record = _read_record(json_path, kind)
    tensors, header = _read_tensors(tensors_path, device)
    if header.get("save_id") != record.get("save_id"):
        raise ValueError(
            f"{tensors_path} and {json_path} come from different saves (save_id differs); "
            f"save the model again"
        )
    if _tensor_table(tensors) != record.get("tensors"):
        raise ValueError(f"{tensors_path} does not hold the tensors that {json_path} lists")
    # Saves written before the checksum was recorded have none to compare with.
    if "checksum" in record and _checksum(tensors) != record["checksum"]:
        raise ValueError(
            f"{tensors_path} is corrupted: its numbers differ from those saved (the checksum in "
            f"{json_path.name} does not match); save the model again or restore the file from a copy"
        )
    return tensors, record


def _check_exists(tensors_path: Path, json_path: Path) -> None:
    if not tensors_path.is_file() and not json_path.is_file():
        # Neither file: a wrong path, not a half save; say so as load's docstring promises.
        raise FileNotFoundError(f"{tensors_path} does not exist (nor {json_path.name}); is the path right?")


def _check_device(map_location: Any) -> str:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"map_location must name a torch device such as 'cpu', received {map_location!r}"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        # Checked here: moving the model there later fails with torch's bare AssertionError.
        raise ValueError(
            f"map_location={map_location!r}, but CUDA is not available to this PyTorch build on "
            "this machine; load with map_location='cpu'"
        )
    return str(device)


def _check_matches(model: nn.Module, tensors: Mapping[str, Tensor], where: Path, *, dtypes: bool) -> None:
    """Raise a ValueError listing every name or shape (and dtype if asked) that differs."""

    def signature(t: Tensor) -> str:
        shape = f"shape {tuple(t.shape)}"
        return f"{shape} {_dtype_name(t.dtype)}" if dtypes else shape

    expected = {name: signature(t) for name, t in model.state_dict().items()}
    found = {name: signature(t) for name, t in tensors.items()}
    problems = [f"missing {n}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected {n}" for n in sorted(set(found) - set(expected))]
    problems += [
        f"{n}: file has {found[n]}, model has {expected[n]}"
        for n in sorted(set(expected) & set(found))
        if found[n] != expected[n]
    ]
    if problems:
        raise ValueError(f"{where} does not match the model architecture: " + "; ".join(problems))


# --------------------------------------------------------------------------- public API


def save(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save a model's tensors and architecture as ``<stem>.safetensors`` + ``<stem>.json``.

    Parameters
    ----------
    model : nn.Module
        The model. :class:`~marquardt.mlp.MLP` and plain ``nn.Sequential`` stacks of
        ``nn.Linear`` and common activations (Tanh, Sigmoid, ReLU, Identity, Softmax,
        LogSoftmax, LeakyReLU, ELU, GELU, SiLU, Softplus, Hardtanh, Softsign,
        Tanhshrink, nested Sequentials) are rebuilt by :func:`load`. Any other module
        has its ``state_dict`` saved, but must be loaded with
        ``load(path, model=instance)``.
    path : str or os.PathLike
        A file stem (``"runs/model"``) or a path ending in ``.safetensors`` or ``.json``;
        missing parent directories are created.
    metadata : dict, optional
        JSON-able user data stored in the JSON file, e.g. a training record. Tensors and
        numpy arrays are stored as lists, dataclasses as dicts. Non-finite floats are
        written as ``NaN``/``Infinity``, which Python's ``json`` reads back.

    Returns
    -------
    Path
        The ``.safetensors`` path written.

    Notes
    -----
    Each file is written atomically (temporary file in the same directory, then
    ``os.replace``); the tensors file is replaced first, then the JSON file.

    Examples
    --------
    >>> import tempfile, torch
    >>> from marquardt.mlp import mlp
    >>> model = mlp(2, hidden=(4,), dtype=torch.float64)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save(model, f"{tmp}/model", metadata={"epochs": 3})
    ...     loaded = load(f"{tmp}/model")
    ...     epochs = load_metadata(f"{tmp}/model")["epochs"]
    >>> x = torch.ones(3, 2, dtype=torch.float64)
    >>> bool(torch.equal(loaded(x), model(x))), epochs
    (True, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, received {type(model).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict or None, received {type(metadata).__name__}")
    tensors = _cpu_tensors(model.state_dict(), "model.state_dict()")
    class_name, architecture = _describe(model)
    floating = sorted({_dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point()})
    record = {
        "class": class_name,
        "architecture": architecture,
        "dtype": floating[0] if len(floating) == 1 else None,
        "metadata": dict(metadata or {}),
    }
    return _write_pair(path, "model", tensors, record, "metadata")


def load(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    model: nn.Module | None = None,
) -> nn.Module:
    """Load a model written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        The stem or either file of the save.
    map_location : str or torch.device, default "cpu"
        Device of the rebuilt model. Ignored when ``model`` is given: its tensors stay
        where they are.
    model : nn.Module, optional
        Module to load the tensors into, in place (values are cast to its tensors'
        dtypes, as ``load_state_dict`` does). Required for modules other than ``MLP``
        and plain ``nn.Sequential`` stacks, whose architecture is not recorded.

    Returns
    -------
    nn.Module
        The rebuilt model, or ``model`` itself.

    Raises
    ------
    FileNotFoundError
        If the ``.safetensors`` file does not exist.
    ValueError
        If the ``.json`` file is missing, is not a marquardt save, or has an unknown
        format version; if the tensors file is not valid safetensors (nothing in it is
        ever executed); if the two files come from different saves; if the tensors differ
        from the checksum recorded at save (a corrupted file); if the tensor names
        or shapes do not match the architecture; if no architecture is recorded and no
        ``model`` is given.

    Examples
    --------
    See :func:`save`.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, received {type(model).__name__}")
    device = _check_device(map_location)
    tensors, record = _read_pair(path, "model", "cpu")
    tensors_path, _ = _file_pair(path)
    if model is not None:
        _check_matches(model, tensors, tensors_path, dtypes=False)
        model.load_state_dict(tensors)
        return model
    built = _build(record, tensors_path, sum(t.numel() for t in tensors.values()))
    uniform = record["dtype"] is not None
    _check_matches(built, tensors, tensors_path, dtypes=uniform)
    built.load_state_dict(tensors, assign=not uniform)  # assign: each tensor keeps the dtype it was saved in
    return built.to(device)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the user ``metadata`` stored by :func:`save` (without reading tensors).

    Raises FileNotFoundError when neither file of the save exists, as :func:`load` does, and
    ValueError when the ``.json`` file is missing or not a marquardt model save.

    Examples
    --------
    See :func:`save`.
    """
    tensors_path, json_path = _file_pair(path)
    _check_exists(tensors_path, json_path)
    return _read_record(json_path, "model").get("metadata", {})


def save_state(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Save named tensors plus JSON-able ``meta`` (e.g. a checkpoint), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        A file stem or a path ending in ``.safetensors`` or ``.json``.
    tensors : dict of str to Tensor
        E.g. weights and ``torch.get_rng_state()`` (a uint8 tensor). Copied to CPU.
    meta : dict
        JSON-able data, e.g. damping state, a History as a list of dicts, or
        ``numpy.random.Generator.bit_generator.state``. Tuples come back as lists and
        numpy arrays as lists.

    Returns
    -------
    Path
        The ``.safetensors`` path written.

    Examples
    --------
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_state(f"{tmp}/ckpt", {"rng": torch.get_rng_state()}, {"damping": 1e-3})
    ...     tensors, meta = load_state(f"{tmp}/ckpt")
    >>> tensors["rng"].dtype, meta["damping"]
    (torch.uint8, 0.001)
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, received {type(meta).__name__}")
    return _write_pair(path, "state", _cpu_tensors(tensors, "tensors"), {"metadata": dict(meta)}, "meta")


def load_state(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)`` written by :func:`save_state`.

    Raises the same errors as :func:`load` for missing, corrupt, mismatched or
    unknown-version files.

    Examples
    --------
    See :func:`save_state`.
    """
    tensors, record = _read_pair(path, "state", map_location)
    return tensors, record.get("metadata", {})
