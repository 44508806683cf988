"""Tests for marquardt.history.History, the per-epoch training record."""

from __future__ import annotations

import doctest
import fractions
import json
import math
import os

import numpy as np
import pytest
import torch

import marquardt.history
from marquardt.history import History


def make_history() -> History:
    h = History("lm")
    h.append(epoch=0, time=0.0, perf=1.0, vperf=1.5, tperf=float("nan"), damping=1e-3,
             gradient=4.0, val_fail=0)
    h.append(epoch=1, time=0.1, perf=0.5, vperf=0.9, tperf=float("nan"), damping=1e-4,
             gradient=2.0, val_fail=0, solver="cholesky")
    h.append(epoch=2, time=0.2, perf=0.25, vperf=1.1, tperf=float("nan"), damping=1e-5,
             gradient=1.0, val_fail=1, solver="cg")
    h.stop_reason = "Maximum epoch reached."
    h.best_epoch = 1
    return h


def test_module_doctests():
    result = doctest.testmod(marquardt.history)
    assert result.attempted > 0 and result.failed == 0


def test_new_history_is_empty():
    h = History()
    assert (h.method, h.stop_reason, h.best_epoch, h.records, len(h)) == ("lm", None, None, [], 0)


# --------------------------------------------------------------------------- append


def test_append_accepts_dict_and_keywords_keywords_win():
    h = History()
    h.append({"epoch": 0, "perf": 1.0}, perf=2.0, gradient=3.0)
    assert h.records == [{"epoch": 0, "perf": 2.0, "gradient": 3.0}]


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (torch.tensor(0.5), 0.5, float),
        (torch.tensor(0.5, dtype=torch.float64, requires_grad=True) * 2, 1.0, float),
        (torch.tensor(3), 3, int),
        (torch.tensor(True), True, bool),
        (np.float32(0.25), 0.25, float),
        (np.float64(0.125), 0.125, float),
        (np.int64(7), 7, int),
        (np.array(2.0), 2.0, float),
        (np.bool_(False), False, bool),
        (1.5, 1.5, float),
        (2, 2, int),
        ("cholesky", "cholesky", str),
        (None, None, type(None)),
        (np.longdouble(0.5), 0.5, float),
        (fractions.Fraction(1, 4), 0.25, float),
    ],
)
def test_append_converts_scalars_to_python(value, expected, kind):
    h = History()
    h.append(x=value)
    stored = h.records[0]["x"]
    assert type(stored) is kind and stored == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (([("perf", 1.0)],), {}, TypeError, "takes a dict or keyword arguments; received list"),
        (({1: 0.5},), {}, TypeError, "keys must be strings; received 1"),
        ((), {"perf": torch.ones(3)}, TypeError, r"'perf' must be a scalar; received a Tensor of shape \(3,\)"),
        ((), {"perf": np.ones((2, 2))}, TypeError, r"'perf' must be a scalar; received a ndarray of shape \(2, 2\)"),
        ((), {"perf": [1.0]}, TypeError, r"'perf' must be a real number, str, bool or None \(NaN or None for no value\); received list"),
        ((), {"perf": object()}, TypeError, "received object"),
        # Complex values: Python's was refused, numpy's and torch's were stored (and to_json then failed).
        ((), {"perf": 1 + 2j}, TypeError, r"'perf' must be a real number.*; received complex \(1\+2j\)"),
        ((), {"perf": np.complex128(1j)}, TypeError, r"'perf' must be a real number.*; received complex128"),
        ((), {"perf": torch.tensor(1j)}, TypeError, r"received a 0-d Tensor of dtype torch.complex64"),
        ((), {"perf": np.array(2 + 0j)}, TypeError, r"received a 0-d ndarray of dtype complex128"),
        ((), {"perf": np.array(1j, dtype=object)}, TypeError, r"received a 0-d ndarray of dtype object"),
        # Other non-real values numpy's .item() turns into Python objects.
        ((), {"time": np.datetime64("2020-01-01")}, TypeError, r"'time' must be a real number.*; received datetime64"),
        ((), {"solver": np.bytes_(b"qr")}, TypeError, r"'solver' must be a real number.*; received bytes_"),
    ],
)
def test_append_rejects_bad_records(args, kwargs, exc, match):
    h = History()
    with pytest.raises(exc, match=match):
        h.append(*args, **kwargs)
    assert len(h) == 0


def test_append_mu_is_stored_as_damping():
    h = History()
    h.append(epoch=0, mu=0.01)
    assert h.records == [{"epoch": 0, "damping": 0.01}]


@pytest.mark.parametrize("method", ["", None, 3])
def test_invalid_method(method):
    with pytest.raises(ValueError, match="Invalid method"):
        History(method)


# --------------------------------------------------------------------------- access


def test_column_access_and_missing_entries():
    h = make_history()
    assert h["perf"] == [1.0, 0.5, 0.25]
    assert h["solver"] == [None, "cholesky", "cg"]
    assert all(math.isnan(v) for v in h["tperf"])


def test_mu_is_an_alias_of_damping():
    h = make_history()
    assert h["mu"] == h["damping"] == [1e-3, 1e-4, 1e-5]
    assert "mu" in h and "damping" in h


def test_known_but_absent_key_gives_none_column():
    h = make_history()
    assert h["gamma"] == [None, None, None]
    assert "gamma" not in h
    assert History()["perf"] == []


def test_unknown_key_raises_keyerror_listing_keys():
    with pytest.raises(KeyError, match=r"No record has the key 'pref'.*'perf'"):
        make_history()["pref"]


def test_integer_and_slice_indexing_return_copies():
    h = make_history()
    assert h[-1]["epoch"] == 2 and h[0]["epoch"] == 0
    assert [r["epoch"] for r in h[1:]] == [1, 2]
    h[-1]["perf"] = 99.0
    h.last["perf"] = 99.0
    assert h.records[-1]["perf"] == 0.25


@pytest.mark.parametrize("index", [np.int64(1), np.int32(-2), torch.tensor(1)])
def test_numpy_and_tensor_integers_index_records(index):
    # history[np.argmin(history["vperf"])] is the natural way to read the best record.
    h = make_history()
    assert h[index] == h[1] and h[int(np.argmin(h["perf"]))] == h[np.argmin(h["perf"])]


@pytest.mark.parametrize(
    ("key", "exc", "match"),
    [
        (3, IndexError, "index 3 out of range for a history of 3 records"),
        (-4, IndexError, "out of range"),
        (1.0, TypeError, "must be str .* received float"),
        (True, TypeError, "received bool"),
        (np.bool_(True), TypeError, "received bool"),
        (np.float64(1.0), TypeError, "received float64"),
        (("perf",), TypeError, "received tuple"),
        (np.int64(3), IndexError, "index 3 out of range"),
    ],
)
def test_bad_indices(key, exc, match):
    with pytest.raises(exc, match=match):
        make_history()[key]


def test_keys_in_order_of_first_appearance():
    assert make_history().keys() == [
        "epoch", "time", "perf", "vperf", "tperf", "damping", "gradient", "val_fail", "solver",
    ]


def test_last_and_iteration():
    h = make_history()
    assert h.last == h.records[-1]
    assert [r["epoch"] for r in h] == [0, 1, 2]
    with pytest.raises(IndexError, match="History is empty"):
        History().last


# --------------------------------------------------------------------------- serialisation


def test_to_dict_is_strict_json_with_nan_as_none():
    h = make_history()
    h.append(epoch=3, perf=float("inf"), vperf=float("-inf"))
    d = h.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    assert d["method"] == "lm" and d["stop_reason"] == "Maximum epoch reached." and d["best_epoch"] == 1
    assert [r["tperf"] for r in d["records"][:3]] == [None, None, None]
    assert d["records"][3] == {"epoch": 3, "perf": None, "vperf": None}


def test_from_dict_round_trip():
    h = make_history()
    h2 = History.from_dict(json.loads(json.dumps(h.to_dict())))
    assert h2 == h
    assert (h2.method, h2.stop_reason, h2.best_epoch) == ("lm", "Maximum epoch reached.", 1)
    assert h2["perf"] == h["perf"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "expects a dict with a 'records' list.*received list"),
        ({"method": "lm"}, r"'records' list.*keys \['method'\]"),
        ({"records": {}}, "'records' list"),
        ({"records": [], "epochs": 3}, r"Unexpected fields \['epochs'\]"),
        # An edited file: plot_performance later said "best_epoch=3 is not the epoch of any record".
        ({"records": [], "best_epoch": "3"}, r"Invalid best_epoch in History dict: '3'; expected None or an integer"),
        ({"records": [], "best_epoch": -1}, r"Invalid best_epoch in History dict: -1"),
        ({"records": [], "best_epoch": True}, r"Invalid best_epoch in History dict: True"),
        ({"records": [], "stop_reason": 5}, r"Invalid stop_reason in History dict: 5; expected None or a string"),
        # A null record became an empty one, a list record a TypeError about append().
        ({"records": [{"epoch": 0}, None]}, r"Invalid records\[1\] in History dict: None; expected a dict"),
        ({"records": [[0, 1.0]]}, r"Invalid records\[0\] in History dict: \[0, 1.0\]; expected a dict"),
        ({"records": [{"epoch": 0, "perf": [1.0]}]},
         r"Invalid records\[0\] in History dict: History value for 'perf' must be a real number"),
    ],
)
def test_from_dict_rejects_bad_input(data, match):
    with pytest.raises(ValueError, match=match):
        History.from_dict(data)


def test_to_json_writes_atomically_and_reads_back(tmp_path):
    path = tmp_path / "history.json"
    assert History().to_json(path) == path
    make_history().to_json(path)
    assert History.from_json(path) == make_history()
    assert os.listdir(tmp_path) == ["history.json"]


def test_to_json_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    History("old").to_json(path)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(marquardt.history.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        make_history().to_json(path)
    assert History.from_json(path).method == "old"
    assert os.listdir(tmp_path) == ["history.json"]


def test_to_json_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_history().to_json(tmp_path / "nope" / "h.json")


# --------------------------------------------------------------------------- repr / equality


def test_repr_summarises():
    text = repr(make_history())
    for part in ["method='lm'", "epochs=2", "stop_reason='Maximum epoch reached.'",
                 "best_epoch=1", "final_perf=0.25"]:
        assert part in text
    assert repr(History("br")) == (
        "History(method='br', epochs=0, stop_reason=None, best_epoch=None, final_perf=None)"
    )


def test_equality_and_unhashable():
    assert make_history() == make_history()
    other = make_history()
    other.best_epoch = 2
    assert other != make_history()
    assert make_history() != "history"
    with pytest.raises(TypeError):
        hash(History())


# --------------------------------------------------------------------------- MATLAB's tr


def make_br_history() -> History:
    h = History("br")
    h.append(epoch=0, perf=0.5, vperf=0.6, tperf=0.7, damping=0.005, gradient=1.0, val_fail=0,
             gamma=31.0, ssw=12.5)
    h.append(epoch=1, perf=0.25, vperf=0.4, tperf=0.45, damping=0.0005, gradient=0.5, val_fail=0,
             gamma=20.0, ssw=8.0)
    h.append(epoch=2, perf=0.2, vperf=0.41, tperf=0.5, damping=0.00005, gradient=0.25, val_fail=1,
             gamma=15.5, ssw=7.25)
    h.stop_reason, h.best_epoch = "Maximum epoch reached.", 1
    return h


def test_gamk_and_ssx_are_aliases_of_gamma_and_ssw():
    # trainbr's tr.gamk and tr.ssX: a KeyError before they were aliases.
    h = make_br_history()
    assert h["gamk"] == h["gamma"] == [31.0, 20.0, 15.5]
    assert h["ssX"] == h["ssw"] == [12.5, 8.0, 7.25]
    assert "gamk" in h and "ssX" in h and "gamk" not in make_history()
    h.append(epoch=3, gamk=14.0, ssX=7.0)
    assert h.records[-1] == {"epoch": 3, "gamma": 14.0, "ssw": 7.0}


def test_matlab_scalar_fields_are_attributes_at_best_epoch():
    h = make_br_history()
    assert (h.best_perf, h.best_vperf, h.best_tperf) == (0.25, 0.4, 0.45)
    assert (h.num_epochs, h.stop) == (2, "Maximum epoch reached.")
    h.best_epoch = 0
    assert (h.best_perf, h.best_vperf, h.best_tperf) == (0.5, 0.6, 0.7)
    assert math.isnan(make_history().best_tperf)  # no test set: NaN, as MATLAB's tr.best_tperf


def test_matlab_scalar_fields_before_training_ends():
    h = History()
    assert (h.best_perf, h.num_epochs, h.stop) == (None, None, None)
    h.append(epoch=0, perf=1.0)
    assert (h.best_perf, h.num_epochs) == (None, 0)


def test_best_perf_with_a_best_epoch_of_no_record_raises():
    h = make_br_history()
    h.best_epoch = 7
    with pytest.raises(ValueError, match=r"Invalid best_epoch value: 7; expected the epoch of a record, "
                                         r"found epochs \[0, 1, 2\]"):
        h.best_perf


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("best_perf", r"'best_perf' is not a per-epoch column; MATLAB's tr.best_perf is the attribute history.best_perf"),
        ("best_epoch", r"tr.best_epoch is the attribute history.best_epoch"),
        ("stop", r"tr.stop is the attribute history.stop"),
        ("num_epochs", r"tr.num_epochs is the attribute history.num_epochs"),
        ("trainFcn", r"tr.trainFcn is the attribute history.method"),
        ("trainInd", r"tr.trainInd is the attribute history.trainInd"),
        ("testInd", r"tr.testInd is the attribute history.testInd"),
        # The masks are not held, the rows are (the message and module docstring said neither was).
        ("trainMask", r"A History does not hold MATLAB's tr.trainMask: .* the rows of a division "
                      r"\(history.trainInd, valInd, testInd\)"),
        ("states", r"does not hold MATLAB's tr.states"),
        ("trainParam", r"does not hold MATLAB's tr.trainParam"),
    ],
)
def test_matlab_fields_not_columns_raise_keyerror_saying_where_they_are(key, match):
    with pytest.raises(KeyError, match=match):
        make_br_history()[key]


def _problem(classification: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 30, dtype=torch.float64)[:, None]
    y = (X[:, 0] > 0).long() if classification else torch.sin(3 * X)
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2 if classification else 1)).double()
    return model, X, y


@pytest.mark.parametrize(
    ("method", "loss"),
    [("lm", "mse"), ("br", "mse"), ("gd", "mse"), ("momentum", "mse"), (torch.optim.Adam, "mse"),
     ("lm", "cross_entropy")],
)
def test_training_runs_give_matlab_fields_consistent_with_best_epoch(method, loss):
    import marquardt

    model, X, y = _problem(loss == "cross_entropy")
    h = marquardt.fit(model, X, y, method=method, loss=loss, epochs=6, division="interleaved", seed=0,
                      progress=False)
    best = h[[r["epoch"] for r in h].index(h.best_epoch)]
    assert (h.best_perf, h.best_vperf, h.best_tperf) == (best["perf"], best["vperf"], best["tperf"])
    assert h.num_epochs == h.last["epoch"] == len(h) - 1 and h.stop == h.stop_reason
    assert h["mu"] == h["damping"]
    if method == "br":
        assert h["gamk"] == h["gamma"] and h["ssX"] == h["ssw"] and all(g > 0 for g in h["gamk"])
    back = History.from_dict(json.loads(json.dumps(h.to_dict(), allow_nan=False)))
    assert back == h and back.best_perf == h.best_perf and back.num_epochs == h.num_epochs


def test_the_optional_keys_are_the_ones_fit_records():
    # OPTIONAL_KEYS and the module notes listed "lr" (learning rate) as a key some methods add;
    # no trainer records it, and history["lr"] gave a column of None for every run.
    import marquardt

    runs = [("lm", "mse"), ("br", "mse"), ("gd", "mse"), ("momentum", "mse"), (torch.optim.Adam, "mse"),
            ("lm", "cross_entropy")]
    recorded = set()
    for method, loss in runs:
        model, X, y = _problem(loss == "cross_entropy")
        recorded.update(marquardt.fit(model, X, y, method=method, loss=loss, epochs=2, progress=False).keys())
    assert set(marquardt.history.STANDARD_KEYS) <= recorded
    assert recorded - set(marquardt.history.STANDARD_KEYS) == set(marquardt.history.OPTIONAL_KEYS)
    with pytest.raises(KeyError, match="No record has the key 'lr'"):
        make_history()["lr"]


def test_a_learning_rate_column_a_user_records_is_read_as_any_other():
    h = History("gd")
    h.append(epoch=0, perf=1.0, lr=0.1)
    h.append(epoch=1, perf=0.5, lr=0.05)
    assert "lr" in h and h["lr"] == [0.1, 0.05]


@pytest.mark.parametrize(
    ("division", "match"),
    [
        ({"train": [0, 1]}, r"Invalid division in History dict"),
        ({"train": [0], "val": [-1], "test": []}, r"Invalid val rows of the division: \[-1\]"),
        ({"train": [0.5], "val": [], "test": []}, r"Invalid train rows of the division"),
        ([[0], [1], [2]], r"Invalid division in History dict"),
    ],
)
def test_a_saved_division_that_is_not_row_indices_is_refused(division, match):
    data = {**make_history().to_dict(), "division": division}
    with pytest.raises(ValueError, match=match):
        History.from_dict(data)
