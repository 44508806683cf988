"""The training record: one dict per epoch, like MATLAB's ``tr`` and skorch's ``History``.

A :class:`History` is written by the training loop and only read by everything else
(plots, reports, checkpoints). Epoch 0 holds the initial state, before any update.

Standard keys of a record
-------------------------
``epoch``       epoch number (0 = initial state)
``time``        seconds since training started
``perf``        training performance (mean squared error)
``vperf``       validation performance (NaN or None when there is no validation set)
``tperf``       test performance (NaN or None when there is no test set)
``damping``     damping parameter; MATLAB calls it ``mu``, and ``history["mu"]`` is an alias
                (NaN for first-order methods, which have none)
``gradient``    norm of the gradient, in the weights, of the performance the model trains on:
                for an :class:`~marquardt.mlp.MLP` built with ``normalize=True`` that is the
                mean squared error of the *normalized* targets, while ``perf`` is in target
                units (MATLAB's ``tr.gradient`` is in target units: with one output of range
                ``r`` it is ``(r / 2)**2`` times this value, and ``min_grad`` compares
                accordingly)
``val_fail``    consecutive epochs without validation improvement

Optional keys some methods add: ``gamma`` (effective number of parameters, Bayesian
regularization; MATLAB's ``gamk``, an alias), ``ssw`` (sum of squared weights; MATLAB's
``ssX``, an alias), ``accuracy``, ``vaccuracy``, ``taccuracy``, ``solver`` (the linear-solver
path taken, e.g. ``"cholesky"``, ``"sample-space"``, ``"cg"``, or ``"backprop"`` for
first-order methods). ``fit`` records no learning rate (its first-order methods keep ``lr``
fixed); a History filled by hand may hold any other key, such as ``lr``, which
:func:`marquardt.plot.plot_training_state` then draws in a Learning Rate panel.

MATLAB's training record
------------------------
Per-epoch fields of MATLAB's ``tr`` are columns: ``tr.perf`` is ``history["perf"]``, and so
for ``epoch``, ``time``, ``vperf``, ``tperf``, ``gradient``, ``val_fail``, ``mu``, ``gamk``
and ``ssX`` (the last three aliases of ``damping``, ``gamma`` and ``ssw``). Its scalar
fields are attributes: ``tr.best_epoch`` is ``history.best_epoch``, ``tr.stop`` is
``history.stop`` (alias of ``stop_reason``), ``tr.num_epochs`` is ``history.num_epochs``, and
``tr.best_perf``, ``tr.best_vperf``, ``tr.best_tperf`` are ``history.best_perf``,
``history.best_vperf``, ``history.best_tperf`` (the record of ``best_epoch``). ``tr.trainFcn``
is named differently: ``history.method`` (``"lm"``, not ``"trainlm"``). The rows of a division,
``tr.trainInd``, ``tr.valInd`` and ``tr.testInd``, are the attributes ``history.trainInd``,
``history.valInd`` and ``history.testInd`` (0-based). A History does not hold MATLAB's training
parameters, division settings, masks or ``states``; asking for them raises a ``KeyError`` that
says so.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import _atomic_write

__all__ = ["History", "STANDARD_KEYS", "OPTIONAL_KEYS"]

STANDARD_KEYS: tuple[str, ...] = (
    "epoch", "time", "perf", "vperf", "tperf", "damping", "gradient", "val_fail",
)
OPTIONAL_KEYS: tuple[str, ...] = (
    "gamma", "ssw", "accuracy", "vaccuracy", "taccuracy", "solver",
)
# MATLAB-compatible names accepted when reading a history.
_ALIASES: dict[str, str] = {"mu": "damping", "gamk": "gamma", "ssX": "ssw"}
# MATLAB's scalar fields of tr, which a History holds as attributes rather than columns.
_MATLAB_ATTRIBUTES: dict[str, str] = {
    name: name for name in ("best_epoch", "best_perf", "best_vperf", "best_tperf", "num_epochs", "stop",
                            "trainInd", "valInd", "testInd")
} | {"trainFcn": "method"}
# MATLAB fields of tr that a History does not hold.
_MATLAB_NOT_HELD = frozenset({
    "trainParam", "performFcn", "performParam", "derivFcn", "divideFcn", "divideMode", "divideParam",
    "trainMask", "valMask", "testMask", "states", "goal",
})
_DICT_FIELDS = frozenset({"method", "stop_reason", "best_epoch", "records", "division"})
#: The sets of :attr:`History.division`, in MATLAB's order.
DIVISION_SETS = ("train", "val", "test")

Scalar = bool | int | float | str | None


class History:
    """Per-epoch training record, a list of dicts with column access by key.

    Parameters
    ----------
    method : str, default "lm"
        Name of the training method that produced the record (``"lm"``, ``"br"``, ``"gd"``, ...).

    Attributes
    ----------
    method : str
        Training method name.
    stop_reason : str or None
        Why training stopped, set by the training loop when it ends.
    best_epoch : int or None
        Epoch whose weights were kept (lowest validation performance, or training
        performance when there is no validation set).
    records : list of dict
        One record per epoch; record 0 is the initial state.
    best_perf, best_vperf, best_tperf : float or None
        MATLAB's ``tr.best_perf`` etc.: the record of ``best_epoch`` (read-only).
    num_epochs : int or None
        MATLAB's ``tr.num_epochs``: the epoch of the last record (read-only).
    stop : str or None
        MATLAB's ``tr.stop``: an alias of ``stop_reason`` (read-only).
    division : dict or None
        Where ``fit`` divided the samples (``division="random"``, ``"block"`` or
        ``"interleaved"``): ``{"train": ..., "val": ..., "test": ...}``, each a sorted int64
        numpy array of 0-based row indices into the ``X, y`` given to ``fit`` (on each rank,
        into that rank's own samples). None when the samples were not divided.
    trainInd, valInd, testInd : numpy.ndarray or None
        MATLAB's ``tr.trainInd`` etc.: ``division["train"]`` etc. (read-only), 0-based where
        MATLAB's are 1-based, so that ``y[history.testInd]`` selects the test targets.

    Notes
    -----
    Values are stored as Python scalars: 0-d tensors, 0-d arrays and numpy scalars are
    converted on :meth:`append` with ``.item()`` (floating types become ``float``, integer
    types ``int``, booleans ``bool``), so a history never keeps a graph or a device alive.
    Inside the record NaN is kept (it marks "no value"); :meth:`to_dict` turns non-finite
    floats into ``None`` so that the result is strict JSON.

    Examples
    --------
    >>> h = History("lm")
    >>> h.append(epoch=0, perf=1.0, damping=1e-3, gradient=2.0, val_fail=0)
    >>> h.append({"epoch": 1, "perf": torch.tensor(0.25), "damping": 1e-4})
    >>> len(h)
    2
    >>> h["perf"]
    [1.0, 0.25]
    >>> h["mu"]
    [0.001, 0.0001]
    >>> h["gradient"]
    [2.0, None]
    >>> h[-1]["epoch"]
    1
    >>> h.stop_reason = "Maximum epoch reached."
    >>> History.from_dict(h.to_dict()) == h
    True
    """

    def __init__(self, method: str = "lm") -> None:
        if not isinstance(method, str) or not method:
            raise ValueError(
                f"Invalid method: {method!r}; expected a non-empty string such as 'lm'"
            )
        self.method: str = method
        self.stop_reason: str | None = None
        self.best_epoch: int | None = None
        self.records: list[dict[str, Scalar]] = []
        self.division: dict[str, np.ndarray] | None = None

    def append(self, record: Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        """Add the record of one epoch.

        Parameters
        ----------
        record : mapping, optional
            Record as a dict. Keyword arguments are merged into it and win on clashes.
        **fields
            Record entries as keywords, e.g. ``append(epoch=3, perf=0.1)``.

        Raises
        ------
        TypeError
            If ``record`` is not a mapping, a key is not a string, or a value is not a real
            number, str, bool or None (a complex number, for one), or not 0-d.

        Examples
        --------
        >>> h = History()
        >>> h.append(epoch=0, perf=np.float32(0.5))
        >>> type(h[0]["perf"])
        <class 'float'>
        """
        if record is not None and not isinstance(record, Mapping):
            raise TypeError(
                f"append() takes a dict or keyword arguments; received {type(record).__name__}"
            )
        merged = {**(record or {}), **fields}
        # Plain keys and values (every field of fit's records) pass without a call each: a
        # record is appended at every epoch, and a tiny network's epoch is ~500 us.
        self.records.append({(_ALIASES.get(k, k) if type(k) is str else _check_key(k)):
                             (v if v is None or type(v) in _PLAIN else _to_scalar(k, v)) for k, v in merged.items()})

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Scalar]]:
        return (dict(r) for r in self.records)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _ALIASES.get(key, key) in self.keys()

    def __getitem__(self, key: str | int | slice) -> Any:
        """Column ``history["perf"]``, record ``history[-1]`` or records ``history[1:]``.

        A column has one entry per record, ``None`` where the record lacks the key. Asking
        for a key that no record has and that is not a standard or optional key raises
        ``KeyError`` (it is most likely a typo). Records are returned as copies.
        """
        if isinstance(key, str):
            return self._column(key)
        if isinstance(key, slice):
            return [dict(r) for r in self.records[key]]
        try:
            # Any integer type (np.argmin's np.int64 included), but not a bool.
            index = None if isinstance(key, bool | np.bool_) else operator.index(key)
        except TypeError:
            index = None
        if index is None:
            raise TypeError(
                f"History indices must be str (a key), int or slice; received {type(key).__name__}"
            )
        try:
            return dict(self.records[index])
        except IndexError:
            raise IndexError(
                f"History index {key} out of range for a history of {len(self)} records"
            ) from None

    def _column(self, key: str) -> list[Scalar]:
        name = _ALIASES.get(key, key)
        if name not in STANDARD_KEYS + OPTIONAL_KEYS and name not in self.keys():
            _refuse_matlab_field(key)
            raise KeyError(
                f"No record has the key {key!r}; keys present: {self.keys()}, "
                f"standard keys: {list(STANDARD_KEYS + OPTIONAL_KEYS)}"
            )
        return [r.get(name) for r in self.records]

    def keys(self) -> list[str]:
        """Keys present in at least one record, in order of first appearance."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    @property
    def last(self) -> dict[str, Scalar]:
        """The most recent record (a copy).

        Raises
        ------
        IndexError
            If the history is empty.
        """
        if not self.records:
            raise IndexError("History is empty: no record has been appended yet")
        return dict(self.records[-1])

    @property
    def stop(self) -> str | None:
        """MATLAB's ``tr.stop``: an alias of :attr:`stop_reason`."""
        return self.stop_reason

    @property
    def num_epochs(self) -> int | None:
        """MATLAB's ``tr.num_epochs``: the epoch of the last record (None if empty).

        Epoch 0 is the initial state, so a run stopped after 5 updates has ``num_epochs == 5``
        and 6 records.
        """
        return self.records[-1].get("epoch", len(self) - 1) if self.records else None

    @property
    def trainInd(self) -> np.ndarray | None:  # noqa: N802  (MATLAB's name)
        """MATLAB's ``tr.trainInd``, 0-based: the training rows of :attr:`division` (None if undivided)."""
        return None if self.division is None else self.division["train"]

    @property
    def valInd(self) -> np.ndarray | None:  # noqa: N802
        """MATLAB's ``tr.valInd``, 0-based: the validation rows of :attr:`division` (None if undivided)."""
        return None if self.division is None else self.division["val"]

    @property
    def testInd(self) -> np.ndarray | None:  # noqa: N802
        """MATLAB's ``tr.testInd``, 0-based: the test rows of :attr:`division` (None if undivided)."""
        return None if self.division is None else self.division["test"]

    def set_division(self, train: Any, val: Any, test: Any) -> None:
        """Record the rows ``fit`` divided the samples into (see :attr:`division`).

        Examples
        --------
        >>> h = History()
        >>> h.set_division([0, 2, 3], [1], [])
        >>> h.trainInd.tolist(), h.valInd.tolist(), h.testInd.tolist()
        ([0, 2, 3], [1], [])
        """
        self.division = {name: _indices(name, rows) for name, rows in zip(DIVISION_SETS, (train, val, test))}

    @property
    def best_perf(self) -> Scalar:
        """MATLAB's ``tr.best_perf``: the training performance at :attr:`best_epoch`."""
        return self._best("perf")

    @property
    def best_vperf(self) -> Scalar:
        """MATLAB's ``tr.best_vperf``: the validation performance at :attr:`best_epoch`."""
        return self._best("vperf")

    @property
    def best_tperf(self) -> Scalar:
        """MATLAB's ``tr.best_tperf``: the test performance at :attr:`best_epoch`."""
        return self._best("tperf")

    def _best(self, key: str) -> Scalar:
        """``key`` in the record whose epoch is :attr:`best_epoch`; None while it is unset.

        Raises
        ------
        ValueError
            If ``best_epoch`` is set but no record has that epoch (an edited history).
        """
        if self.best_epoch is None:
            return None
        for record in self.records:
            if record.get("epoch") == self.best_epoch:
                return record.get(key)
        raise ValueError(
            f"Invalid best_epoch value: {self.best_epoch!r}; expected the epoch of a record, "
            f"found epochs {[r.get('epoch') for r in self.records]}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form: strict-JSON serialisable, non-finite floats become ``None``.

        Returns
        -------
        dict
            ``{"method", "stop_reason", "best_epoch", "records"}``, and ``"division"`` (lists of
            row indices) where the samples were divided.
        """
        data = {
            "method": self.method,
            "stop_reason": self.stop_reason,
            "best_epoch": self.best_epoch,
            "records": [{k: _finite_or_none(v) for k, v in r.items()} for r in self.records],
        }
        if self.division is not None:
            data["division"] = {name: rows.tolist() for name, rows in self.division.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Rebuild a history from :meth:`to_dict` output (or JSON loaded from :meth:`to_json`).

        Raises
        ------
        ValueError
            If ``data`` has no ``"records"`` list, has unexpected fields, or a ``stop_reason``
            that is not a string or a ``best_epoch`` that is not an integer >= 0 (None for either),
            or a record that is not a dict of real numbers, strings, booleans and None.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("records"), list):
            raise ValueError(
                "History.from_dict expects a dict with a 'records' list, as written by "
                f"History.to_dict(); received {type(data).__name__}"
                + (f" with keys {sorted(data)}" if isinstance(data, Mapping) else "")
            )
        unexpected = sorted(set(data) - _DICT_FIELDS)
        if unexpected:
            raise ValueError(
                f"Unexpected fields {unexpected} in History dict; expected {sorted(_DICT_FIELDS)}"
            )
        history = cls(data.get("method", "lm"))
        history.stop_reason = _checked_field(data, "stop_reason", str, "None or a string")
        history.best_epoch = _checked_field(data, "best_epoch", int, "None or an integer epoch >= 0")
        for index, record in enumerate(data["records"]):
            _append_saved(history, index, record)
        division = data.get("division")
        if division is not None:
            if not (isinstance(division, Mapping) and sorted(division) == sorted(DIVISION_SETS)):
                raise ValueError(f"Invalid division in History dict: {division!r}; expected a dict of "
                                 f"{list(DIVISION_SETS)} row index lists, or None")
            history.set_division(*(division[name] for name in DIVISION_SETS))
        return history

    def to_json(self, path: str | os.PathLike[str], *, indent: int | None = 2) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temporary file, then ``os.replace``).

        A reader never sees a half-written file, and a crash mid-write leaves any previous
        file intact.

        Returns
        -------
        pathlib.Path
            The path written.

        Raises
        ------
        FileNotFoundError
            If the folder of ``path`` does not exist.
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        return _atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> History:
        """Read a history written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def __repr__(self) -> str:
        epochs = self.records[-1].get("epoch", len(self) - 1) if self.records else 0
        perf = self.records[-1].get("perf") if self.records else None
        perf_text = f"{perf:.4g}" if isinstance(perf, int | float) else str(perf)
        return (
            f"History(method={self.method!r}, epochs={epochs}, stop_reason={self.stop_reason!r}, "
            f"best_epoch={self.best_epoch}, final_perf={perf_text})"
        )


def _indices(name: str, rows: Any) -> np.ndarray:
    """``rows`` as a 1-D int64 numpy array of row indices >= 0, or a ValueError naming the set."""
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    array = np.asarray(rows)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu" or int(array.min()) < 0:
        raise ValueError(f"Invalid {name} rows of the division: {rows!r}; expected a 1-D list of integer "
                         "row indices >= 0")
    return array.astype(np.int64)


def _append_saved(history: History, index: int, record: Any) -> None:
    """Append ``records[index]`` of a saved dict, or raise a ValueError naming it.

    ``append(None)`` means "no dict" and would add an empty record: a ``null`` in an edited
    file is refused here instead.
    """
    if not isinstance(record, Mapping):
        raise ValueError(
            f"Invalid records[{index}] in History dict: {record!r}; expected a dict such as "
            "{'epoch': 0, 'perf': 1.0}"
        )
    try:
        history.append(record)
    except TypeError as error:
        raise ValueError(f"Invalid records[{index}] in History dict: {error}") from None


def _checked_field(data: Mapping[str, Any], name: str, kind: type, expected: str) -> Any:
    """``data[name]`` if None or of ``kind`` (an int >= 0, not a bool, for ``best_epoch``)."""
    value = data.get(name)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool) and not (kind is int and value < 0)):
        return value
    raise ValueError(f"Invalid {name} in History dict: {value!r}; expected {expected}")


def _refuse_matlab_field(key: str) -> None:
    """Raise a KeyError that says where a MATLAB ``tr`` field is, or that it is not held."""
    if key in _MATLAB_ATTRIBUTES:
        raise KeyError(
            f"{key!r} is not a per-epoch column; MATLAB's tr.{key} is the attribute "
            f"history.{_MATLAB_ATTRIBUTES[key]}"
        )
    if key in _MATLAB_NOT_HELD:
        raise KeyError(
            f"A History does not hold MATLAB's tr.{key}: it records only the per-epoch values, "
            "method, stop_reason, best_epoch and the rows of a division (history.trainInd, valInd, testInd)"
        )


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"History record keys must be strings; received {key!r}")
    return _ALIASES.get(key, key)


_PLAIN = frozenset((bool, int, float, str))


def _to_scalar(key: str, value: Any) -> Scalar:
    """Convert 0-d tensors/arrays and numpy scalars to Python scalars; reject anything else.

    A record holds real numbers (NaN or None for "no value"), strings and booleans: a complex
    number, or a date or bytes that numpy's ``.item()`` returns, has no place in a record and
    could not be written as JSON.
    """
    if value is None or type(value) in _PLAIN:  # the common case, by exact type (np.float64 is a float)
        return value
    converted = _unwrap(key, value)
    if converted is None or isinstance(converted, bool | int | float | str):
        return converted
    raise TypeError(
        f"History value for {key!r} must be a real number, str, bool or None (NaN or None for no "
        f"value); received {_describe(value)}"
    )


def _unwrap(key: str, value: Any) -> Any:
    """The Python object inside a numpy scalar or a 0-d tensor/array; other values as they are."""
    if isinstance(value, np.floating):
        return float(value)  # np.longdouble's .item() is a np.longdouble again
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.ndim != 0:
            raise TypeError(
                f"History value for {key!r} must be a scalar; received a "
                f"{type(value).__name__} of shape {tuple(value.shape)} (use .item() or a 0-d value)"
            )
        return (value.detach() if isinstance(value, torch.Tensor) else value).item()
    if isinstance(value, numbers.Real) and not isinstance(value, int):
        return float(value)  # fractions.Fraction and other registered reals
    return value


def _describe(value: Any) -> str:
    """The type of ``value`` (with its dtype for tensors and arrays) and its repr, for errors."""
    name = type(value).__name__
    if isinstance(value, torch.Tensor | np.ndarray):
        name = f"a 0-d {name} of dtype {value.dtype}"
    text = repr(value)
    return f"{name} {text}" if len(text) <= 60 else name


def _finite_or_none(value: Scalar) -> Scalar:
    # Strict JSON has no NaN or Infinity; None reads back as "no value".
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
