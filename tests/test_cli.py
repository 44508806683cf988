"""The ``marquardt`` command line: demo, fit, predict, evaluate, and every bad input with exit status 2."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marquardt import cli
from marquardt.io import load, load_metadata

# Tiny networks and few epochs: the point is the plumbing, not the fit.
FAST = ["--hidden", "4", "--epochs", "8", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: intra-op threads only add overhead, and the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


@pytest.fixture
def regression_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(50, 2))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2
    rows = [[a, b, "ignored", t] for (a, b), t in zip(x.tolist(), y.tolist())]
    return write_csv(tmp_path / "data.csv", ["x1", "x2", "note", "y"], rows)


@pytest.fixture
def classes_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    centers = {"bird": (-2.0, 0.0), "cat": (2.0, 0.0), "dog": (0.0, 2.5)}
    rows = []
    for label, (cx, cy) in centers.items():
        for a, b in (rng.normal(size=(20, 2)) * 0.5).tolist():
            rows.append([cx + a, cy + b, label])
    return write_csv(tmp_path / "animals.csv", ["length", "weight", "species"], rows)


def run_fit(data: Path, out: Path, *extra: str) -> int:
    return cli.main(["fit", str(data), "--out", str(out), *FAST, *extra])


# ------------------------------------------------------------------------------------------------
# fit, predict, evaluate


def test_fit_writes_model_report_and_plots(regression_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2") == 0
    for name in ("model.safetensors", "model.json", "report.md", *cli._PLOTS):
        assert (out / name).is_file(), name
    meta = load_metadata(out / "model")
    assert meta["cli"]["features"] == ["x1", "x2"] and meta["cli"]["targets"] == ["y"]
    assert meta["cli"]["loss"] == "mse" and meta["cli"]["options"]["method"] == "lm"
    assert meta["cli"]["options"]["seed"] == 0 and meta["cli"]["options"]["hidden"] == [4]
    assert len(meta["history"]["records"]) == 9 and meta["history"]["stop_reason"]
    report = (out / "report.md").read_text()
    assert "Stop reason:" in report and "| Validation" in report and "| training" in report
    printed = capsys.readouterr().out
    assert "Training" in printed and "Test" in printed and "r2" in printed


def test_default_features_are_all_other_columns_and_must_be_numeric(regression_csv, tmp_path, capsys):
    # "note" is text, so the default feature set (all but the target) fails on it, naming it.
    assert run_fit(regression_csv, tmp_path / "run", "--target", "y") == 2
    err = capsys.readouterr().err
    assert "column 'note': 'ignored' is not a finite number; to leave the column out, list the feature columns with " \
           "--features" in err


def test_split_metrics_match_the_training_record(regression_csv, tmp_path):
    """The CLI rebuilds fit's division from the seed; its per-split MSE equals fit's own record."""
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2", "--division", "random") == 0
    meta = load_metadata(out / "model")
    rows = {row["split"]: row for row in meta["cli"]["metrics"]}
    assert set(rows) == {"Training", "Validation", "Test", "All"}
    assert [rows[s]["samples"] for s in ("Training", "Validation", "Test")] == [34, 8, 8]
    kept = meta["history"]["records"][meta["history"]["best_epoch"]]
    for split, key in (("Training", "perf"), ("Validation", "vperf"), ("Test", "tperf")):
        assert rows[split]["mse"] == pytest.approx(kept[key], rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("division", ["block", "interleaved", "none"])
def test_divisions(regression_csv, tmp_path, division):
    out = tmp_path / division
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2", "--division", division) == 0
    meta = load_metadata(out / "model")
    rows = {row["split"]: row for row in meta["cli"]["metrics"]}
    kept = meta["history"]["records"][meta["history"]["best_epoch"]]
    assert rows["Training"]["mse"] == pytest.approx(kept["perf"], rel=1e-10)
    assert ("Validation" in rows) == (division != "none")


def test_predict_and_evaluate_round_trip_bit_for_bit(regression_csv, tmp_path, monkeypatch, capsys):
    trained = {}
    train_model = cli.train_model

    def capture(*args, **kwargs):
        trained["model"], history, seconds = train_model(*args, **kwargs)
        return trained["model"], history, seconds

    monkeypatch.setattr(cli, "train_model", capture)
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2") == 0
    X = torch.from_numpy(cli.read_table(regression_csv).numbers(["x1", "x2"]))
    loaded = load(out / "model")
    with torch.no_grad():
        expected = trained["model"](X)
        assert torch.equal(loaded(X), expected)

    predictions = tmp_path / "pred.csv"
    assert cli.main(["predict", str(out), str(regression_csv), "-o", str(predictions)]) == 0
    header, rows = read_csv(predictions)
    assert header == ["y"] and len(rows) == 50
    assert torch.equal(torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64), expected)

    capsys.readouterr()
    assert cli.main(["evaluate", str(out), str(regression_csv)]) == 0
    printed = capsys.readouterr().out
    y = cli.read_table(regression_csv).numbers(["y"])
    metrics = cli.regression_metrics(y, expected.numpy())
    for name in ("mse", "rmse", "r2"):
        assert f"{metrics[name]:.4g}" in printed


def test_predict_needs_only_the_feature_columns(regression_csv, tmp_path):
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x2,x1") == 0
    _, rows = read_csv(regression_csv)
    features_only = write_csv(tmp_path / "new.csv", ["x1", "x2"], [[r[0], r[1]] for r in rows[:5]])
    assert cli.main(["predict", str(out), str(features_only), "-o", str(tmp_path / "p.csv")]) == 0
    assert len(read_csv(tmp_path / "p.csv")[1]) == 5


def test_multiple_targets(regression_csv, tmp_path):
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y,x2", "--features", "x1") == 0
    assert load(out / "model").n_outputs == 2
    assert cli.main(["predict", str(out), str(regression_csv), "-o", str(tmp_path / "p.csv")]) == 0
    assert read_csv(tmp_path / "p.csv")[0] == ["y", "x2"]


@pytest.mark.parametrize("method", ["br", "gd", "momentum", "adam"])
def test_other_methods(regression_csv, tmp_path, method):
    out = tmp_path / method
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2", "--method", method) == 0
    assert load_metadata(out / "model")["history"]["method"] in {method, "adam"}


def test_classification_with_string_labels(classes_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["fit", str(classes_csv), "--target", "species", "--loss", "cross_entropy", "--out", str(out),
                     "--hidden", "4", "--epochs", "15", "--seed", "0"]) == 0
    meta = load_metadata(out / "model")["cli"]
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["task"] == "classification"
    assert load(out / "model").n_outputs == 3
    assert {row["split"]: row["accuracy"] for row in meta["metrics"]}["All"] > 0.9
    # The All row's cross-entropy is the sample-weighted mean of the splits' (it was missing).
    *parts, whole = meta["metrics"]
    assert whole["cross_entropy"] == pytest.approx(
        sum(r["samples"] * r["cross_entropy"] for r in parts) / sum(r["samples"] for r in parts), rel=1e-12)
    assert whole["samples"] == 60 and 0 < whole["cross_entropy"] < 1.2
    assert "accuracy" in load_metadata(out / "model")["history"]["records"][-1]

    assert cli.main(["predict", str(out), str(classes_csv), "-o", str(tmp_path / "p.csv")]) == 0
    header, rows = read_csv(tmp_path / "p.csv")
    assert header == ["species", "p(bird)", "p(cat)", "p(dog)"]
    assert {row[0] for row in rows} <= {"bird", "cat", "dog"}
    assert all(math.isclose(sum(float(v) for v in row[1:]), 1.0) for row in rows)
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), str(classes_csv)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_binary_classification_with_integer_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2))
    rows = [[a, b, int(a + b > 0)] for a, b in x.tolist()]
    data = write_csv(tmp_path / "b.csv", ["a", "b", "label"], rows)
    out = tmp_path / "run"
    assert run_fit(data, out, "--target", "label", "--loss", "binary_cross_entropy") == 0
    assert load_metadata(out / "model")["cli"]["classes"] == ["0", "1"]
    assert load(out / "model").n_outputs == 1


def test_numeric_labels_sort_as_numbers(tmp_path):
    rows = [[i, ["2", "10", "1"][i % 3]] for i in range(12)]
    data = write_csv(tmp_path / "c.csv", ["x", "c"], rows)
    assert run_fit(data, tmp_path / "run", "--target", "c", "--loss", "cross_entropy") == 0
    assert load_metadata(tmp_path / "run" / "model")["cli"]["classes"] == ["1", "2", "10"]


def test_demo_prints_a_comparison_and_writes_plots(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    for text in ("method", "LM", "Momentum", "GD", "stop_reason", "Maximum epoch reached."):
        assert text in printed
    assert (tmp_path / "demo" / "comparison.png").is_file()
    assert (tmp_path / "demo" / "comparison_time.png").is_file()


# ------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no traceback


@pytest.fixture
def files(tmp_path: Path, regression_csv: Path) -> dict[str, Path]:
    """The data files of the bad-input table, by name."""
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "ragged.csv").write_text("x,y\n1,2\n3\n")
    # A quote never closed swallowed the rest of the file into one cell of an unused column.
    (tmp_path / "unclosed.csv").write_text('x,y,note\n1,2,a\n3,4,"oops\n5,6,b\n7,8,c\n')
    (tmp_path / "after_quote.csv").write_text('x,y\n1,2\n"3"x,4\n5,6\n')
    # Excel's and writetable's CSV where the decimal mark is a comma; a tab-separated file.
    (tmp_path / "semicolons.csv").write_text("x;y\n1,5;2,5\n2,5;3,5\n")
    (tmp_path / "tabs.csv").write_text("x\ty\n1\t2\n2\t3\n")
    (tmp_path / "trailing_comma.csv").write_text("x,y,\n1,2,\n2,3,\n")
    return {
        "tmp": tmp_path,
        "data": regression_csv,
        "empty": tmp_path / "empty.csv",
        "ragged": tmp_path / "ragged.csv",
        "unclosed": tmp_path / "unclosed.csv",
        "after_quote": tmp_path / "after_quote.csv",
        "underscore": write_csv(tmp_path / "underscore.csv", ["x", "y"], [[1, 2], ["1_000", 3], [2, 4]]),
        "header": write_csv(tmp_path / "header.csv", ["x", "y"], []),
        "text": write_csv(tmp_path / "text.csv", ["x", "y"], [[1, 2], [2, 3], ["abc", 4]]),
        "blank": write_csv(tmp_path / "blank.csv", ["x", "y"], [[1, 2], [2, ""]]),
        "nan": write_csv(tmp_path / "nan.csv", ["x", "y"], [[1, 2], ["nan", 3]]),
        "three": write_csv(tmp_path / "three.csv", ["x", "c"], [[1, "a"], [2, "b"], [3, "c"]]),
        "one": write_csv(tmp_path / "one.csv", ["x", "c"], [[1, "a"], [2, "a"]]),
        "tiny": write_csv(tmp_path / "tiny.csv", ["x", "y"], [[1, 2], [2, 3], [3, 4]]),
        "noheader": write_csv(tmp_path / "noheader.csv", ["0.5", "1.5"], [[1, 2], [2, 3]]),
        "labels": write_csv(tmp_path / "labels.csv", ["x", "c"], [[1, "a"], [2, "b"], [3, "a"], [4, "b"]]),
        "semicolons": tmp_path / "semicolons.csv",
        "tabs": tmp_path / "tabs.csv",
        "trailing_comma": tmp_path / "trailing_comma.csv",
        # a numeric target given a classification loss: 30 classes of one sample each
        "floats": write_csv(tmp_path / "floats.csv", ["x", "y"], [[i, i / 7] for i in range(30)]),
    }


OUT = ["--out", "{tmp}/out"]
# (case, argv with {file} placeholders, the message expected on stderr)
BAD_INPUT = [
    ("missing file", ["fit", "{tmp}/nope.csv", "--target", "y", *OUT], "{tmp}/nope.csv: no such file"),
    ("misspelled target", ["fit", "{data}", "--target", "yy", *OUT],
     "--target: {data} has no column 'yy'; did you mean 'y'?"),
    ("misspelled feature", ["fit", "{data}", "--target", "y", "--features", "x1,X_2", *OUT],
     "--features: {data} has no column 'X_2'; did you mean 'x2'?"),
    ("unrelated column", ["fit", "{data}", "--target", "zzz", *OUT],
     "has no column 'zzz'; the columns are x1, x2, note, y"),
    ("non-numeric value", ["fit", "{text}", "--target", "y", *OUT],
     "{text} line 4, column 'x': 'abc' is not a finite number"),
    ("empty value", ["fit", "{blank}", "--target", "y", *OUT],
     "{blank} line 3, column 'y': an empty value is not a finite number"),
    ("nan value", ["fit", "{nan}", "--target", "y", *OUT], "{nan} line 3, column 'x': 'nan' is not a finite number"),
    # float() and numpy read '1_000' as 1000 (PEP 515).
    ("underscore in a number", ["fit", "{underscore}", "--target", "y", *OUT],
     "{underscore} line 3, column 'x': '1_000' is not a finite number"),
    ("quote never closed", ["fit", "{unclosed}", "--target", "y", "--features", "x", *OUT],
     '{unclosed} line 3: a quoted field opened there is never closed (a " without its closing ")'),
    ("text after a closing quote", ["fit", "{after_quote}", "--target", "y", *OUT],
     "{after_quote} line 3: malformed CSV: ',' expected after '\"'"),
    ("empty file", ["fit", "{empty}", "--target", "y", *OUT],
     "{empty} is empty; expected a header line naming the columns, then data rows"),
    ("header only", ["fit", "{header}", "--target", "y", *OUT], "{header} has a header but no data rows"),
    ("ragged row", ["fit", "{ragged}", "--target", "y", *OUT], "{ragged} line 3 has 1 fields; the header has 2"),
    ("target as feature", ["fit", "{data}", "--target", "y", "--features", "x1,y", *OUT],
     "column 'y' is given both as --target and in --features; a target cannot be a feature"),
    ("binary with three classes", ["fit", "{three}", "--target", "c", "--loss", "binary_cross_entropy", *OUT],
     "--loss binary_cross_entropy needs exactly two classes in column 'c'; found 3: a, b, c"),
    ("one class", ["fit", "{one}", "--target", "c", "--loss", "cross_entropy", *OUT],
     "--target c: classification needs at least two classes; {one} has only ['a']"),
    ("two label columns", ["fit", "{data}", "--target", "y,x1", "--loss", "cross_entropy", *OUT],
     "--loss cross_entropy takes one --target column of class labels; received 2: y,x1"),
    ("out is a file", ["fit", "{data}", "--target", "y", "--features", "x1", "--out", "{data}"],
     "--out {data} is a file; pass a folder"),
    ("no header line", ["fit", "{noheader}", "--target", "y", *OUT],
     "--target: {noheader} has no header: its first line is numbers, not column names; the file needs a header"),
    # A target named as a number of that line trained on the other rows, silently.
    ("no header line, target a number of it", ["fit", "{noheader}", "--target", "1.5", *OUT],
     "--target: {noheader} has no header: its first line is numbers, not column names; the file needs a header"),
    ("target listed twice", ["fit", "{data}", "--target", "y,y", *OUT],
     "--target: column(s) 'y' listed more than once"),
    ("br with classes", ["fit", "{labels}", "--target", "c", "--loss", "cross_entropy", "--method", "br", *OUT],
     "--method br needs --loss mse: Bayesian regularization (trainbr) minimises a sum of squared errors"),
    # fit's own refusals before training (here J^T J of 4.6 GB, past any default budget) were tracebacks.
    ("br network too large", ["fit", "{data}", "--target", "y", "--features", "x1", "--method", "br", "--hidden",
                              "8000", *OUT],
     "--method br --hidden 8000 --loss mse: method='br' needs the 24001 x 24001 matrix J^T J"),
    ("no training samples", ["fit", "{tiny}", "--target", "y", "--split", "0.01,0.49,0.5", *OUT],
     "--split 0.01,0.49,0.5: {tiny} has 3 rows, and validation and test take round(fraction x rows) each, which "
     "leaves none for training"),
    ("checkpoint is a file", ["fit", "{data}", "--target", "y", "--features", "x1", "--seed", "0", "--checkpoint", "{data}",
                              *OUT],
     "--checkpoint {data} is a file; pass a folder for the checkpoints"),
    ("out under a file", ["fit", "{data}", "--target", "y", "--features", "x1", "--out", "{data}/run"],
     "--out {data}/run: cannot create files in {data}; pass a folder you can write to"),
    ("checkpoint under a file", ["fit", "{data}", "--target", "y", "--features", "x1", "--seed", "0", "--checkpoint",
                                 "{data}/ckpt", *OUT],
     "--checkpoint {data}/ckpt: cannot create files in {data}; pass a folder you can write to"),
    ("demo into a file", ["demo", "--out", "{data}", "--epochs", "1"], "--out {data} is a file; pass a folder"),
    ("semicolon separators", ["fit", "{semicolons}", "--target", "y", *OUT],
     "{semicolons}: the header line 'x;y' separates its columns with semicolons; marquardt reads comma-separated "
     "files with '.' as the decimal mark"),
    ("tab separators", ["fit", "{tabs}", "--target", "y", *OUT],
     "{tabs}: the header line 'x\\ty' separates its columns with tabs"),
    ("header ends with a comma", ["fit", "{trailing_comma}", "--target", "y", *OUT],
     "{trailing_comma}: header column 3 has no name (the header line ends with a comma); every column needs one"),
    ("labels with the mse loss", ["fit", "{three}", "--target", "c", *OUT],
     "{three} line 2, column 'c': 'a' is not a finite number; if the column holds class labels, pass --loss "
     "cross_entropy"),
    ("a numeric target as labels", ["fit", "{floats}", "--target", "y", "--loss", "cross_entropy", *OUT],
     "--loss cross_entropy: column 'y' has 30 different labels in 30 rows; a class needs several samples to learn "
     "from. If it holds numbers to fit, use --loss mse"),
    ("predict without a model", ["predict", "{tmp}/nomodel", "{data}", "-o", "{tmp}/p.csv"],
     "{tmp}/nomodel/model.safetensors does not exist; train a model with `marquardt fit"),
    ("evaluate without a model", ["evaluate", "{tmp}/nomodel", "{data}"],
     "{tmp}/nomodel/model.safetensors does not exist"),
]


@pytest.mark.parametrize("argv, message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_with_exit_status_2(argv, message, files, capsys):
    argv = [arg.format(**files) for arg in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**files) in err, err
    assert err.count("\n") == 1 and err.startswith(f"marquardt {argv[0]}: error: ")
    assert not (files["tmp"] / "out").exists()  # nothing half-written


def test_checkpoint_resumes_the_same_command(regression_csv, tmp_path, capsys):
    argv = ["--target", "y", "--features", "x1,x2", "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    assert run_fit(regression_csv, tmp_path / "a", *argv) == 0
    assert (tmp_path / "ckpt" / "latest.txt").is_file()
    assert run_fit(regression_csv, tmp_path / "b", *argv) == 0  # resumes from the last checkpoint
    assert torch.equal(load(tmp_path / "a" / "model").net[0].weight, load(tmp_path / "b" / "model").net[0].weight)
    capsys.readouterr()
    assert run_fit(regression_csv, tmp_path / "c", *argv, "--hidden", "5") == 2
    assert "belongs to a different run" in capsys.readouterr().err
    assert cli.main(["fit", str(regression_csv), "--out", str(tmp_path / "d"), *argv]) == 2
    assert "--checkpoint needs --seed" in capsys.readouterr().err


def test_checkpoint_of_another_seed_is_refused_without_a_random_division(regression_csv, tmp_path, capsys):
    # --division none divides nothing, so the data digest matched: seed 3's weights were resumed
    # under --seed 4 and reported as seed 4's.
    folder = tmp_path / "ckpt"
    argv = ["fit", str(regression_csv), "--target", "y", "--features", "x1,x2", "--hidden", "4", "--epochs", "8",
            "--division", "none", "--checkpoint", str(folder), "--checkpoint-every", "2"]
    assert cli.main([*argv, "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--seed", "4", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (
        f"marquardt fit: error: --checkpoint {folder}: checkpoint-00000008.safetensors belongs to a different run "
        "(seed 3 there, 4 here); run the same command (data, options and --seed) to resume it, pass another "
        f"--checkpoint folder, or delete {folder} to start over\n")
    assert not (tmp_path / "b").exists()


def test_report_of_a_resumed_run_times_the_epochs_it_trained(regression_csv, tmp_path, capsys):
    argv = ["--target", "y", "--features", "x1,x2", "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "2",
            "--hidden", "4", "--seed", "0"]
    assert cli.main(["fit", str(regression_csv), "--out", str(tmp_path / "a"), "--epochs", "4", *argv]) == 0
    capsys.readouterr()
    assert cli.main(["fit", str(regression_csv), "--out", str(tmp_path / "b"), "--epochs", "8", *argv]) == 0
    assert "(epochs 4 to 8, resumed from the checkpoint)" in capsys.readouterr().out
    report = (tmp_path / "b" / "report.md").read_text()
    assert "Epochs: 8; best epoch: " in report and " Resumed from the checkpoint of epoch 4." in report
    train_s = load_metadata(tmp_path / "b" / "model")["cli"]["timings"]["train_s"]
    cells = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in report.splitlines()]
    rows = {row[0]: row[1] for row in cells if len(row) == 2}
    assert rows["training (epochs 4 to 8)"] == f"{train_s:.4g}"
    assert rows["per epoch"] == f"{train_s / 4:.4g}"  # 4 epochs trained here, not 8
    first = (tmp_path / "a" / "report.md").read_text()
    assert "Resumed" not in first and "| training (epochs 4) " in first


def test_unresumable_checkpoint_is_one_line_with_exit_status_2(regression_csv, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    argv = ["--target", "y", "--features", "x1,x2", "--checkpoint", str(folder), "--checkpoint-every", "2"]
    assert run_fit(regression_csv, tmp_path / "a", *argv) == 0
    capsys.readouterr()
    assert run_fit(regression_csv, tmp_path / "b", *argv, "--method", "gd") == 2
    assert capsys.readouterr().err == (
        f"marquardt fit: error: --checkpoint {folder}: checkpoint-00000008.safetensors belongs to a different run "
        "(method 'lm' there, 'gd' here); run the same command (data, options and --seed) to resume it, pass another "
        f"--checkpoint folder, or delete {folder} to start over\n")
    checkpoint = folder / "checkpoint-00000008.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated, as by a full disk
    assert run_fit(regression_csv, tmp_path / "c", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"marquardt fit: error: --checkpoint {folder}: checkpoint-00000008.safetensors in {folder} "
                          "cannot be read: ") and err.count("\n") == 1
    assert err.endswith(f"; pass another --checkpoint folder, or delete {folder} to start over\n")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_cuda_unavailable_is_a_usage_error(regression_csv, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_fit(regression_csv, tmp_path / "o", "--target", "y", "--features", "x1", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.fixture
def trained(regression_csv, tmp_path) -> Path:
    out = tmp_path / "run"
    assert run_fit(regression_csv, out, "--target", "y", "--features", "x1,x2") == 0
    return out


def edit_model_json(model_dir: Path, edit) -> Path:
    path = model_dir / "model.json"
    record = json.loads(path.read_text())
    edit(record["metadata"])
    path.write_text(json.dumps(record))
    return path


# (case, the model's loss, the edit of its model.json metadata, the message after "{model.json}: ")
EDITED_MODELS = [
    ("task missing", "mse", lambda meta: meta["cli"].pop("task"),
     "metadata.cli.task is missing; expected 'regression' or 'classification'"),
    ("task unknown", "mse", lambda meta: meta["cli"].update(task="weird"),
     "metadata.cli.task is 'weird'; expected 'regression' or 'classification'"),
    ("loss missing", "mse", lambda meta: meta["cli"].pop("loss"), "metadata.cli.loss is missing; expected 'mse' for a "
     "regression"),
    ("loss of a classification", "mse", lambda meta: meta["cli"].update(loss="cross_entropy"),
     "metadata.cli.loss is 'cross_entropy'; expected 'mse' for a regression"),
    ("targets missing", "mse", lambda meta: meta["cli"].pop("targets"),
     "metadata.cli.targets is missing; expected a non-empty list of target column names"),
    ("targets a string", "mse", lambda meta: meta["cli"].update(targets="y"),
     "metadata.cli.targets is 'y'; expected a non-empty list of target column names"),
    ("features missing", "mse", lambda meta: meta["cli"].pop("features"),
     "metadata.cli.features is missing; expected a non-empty list of feature column names"),
    ("features a number", "mse", lambda meta: meta["cli"].update(features=5),
     "metadata.cli.features is 5; expected a non-empty list of feature column names"),
    ("cli not an object", "mse", lambda meta: meta.update(cli=[1]),
     "metadata.cli is [1]; expected an object with the task, loss, targets and features"),
    ("classes missing", "cross_entropy", lambda meta: meta["cli"].pop("classes"),
     "metadata.cli.classes is missing; expected a list of at least two class labels"),
    ("two targets of classes", "cross_entropy", lambda meta: meta["cli"].update(targets=["species", "length"]),
     "metadata.cli.targets is ['species', 'length']; expected a list of one target column name"),
    ("binary with three classes", "binary_cross_entropy", lambda meta: meta["cli"]["classes"].append("cow"),
     "metadata.cli.classes is ['bird', 'cat', 'cow']; expected a list of two class labels"),
    # lists of another length than the network's inputs or outputs were a shape error traceback
    ("a feature too many", "mse", lambda meta: meta["cli"].update(features=["length", "species"]),
     "metadata.cli.features is ['length', 'species'] (2 inputs); expected a list of 1 feature column names for "
     "this network of 1 inputs"),
    ("a target too many", "mse", lambda meta: meta["cli"].update(targets=["weight", "length"]),
     "metadata.cli.targets is ['weight', 'length'] (2 outputs); expected a list of 1 target column names for "
     "this network of 1 outputs"),
    ("a class too many", "cross_entropy", lambda meta: meta["cli"]["classes"].append("cow"),
     "metadata.cli.classes is ['bird', 'cat', 'cow'] (3 outputs); expected a list of 2 class labels for this "
     "network of 2 outputs"),
]


@pytest.mark.parametrize("loss, edit, message", [case[1:] for case in EDITED_MODELS],
                         ids=[case[0] for case in EDITED_MODELS])
def test_a_model_json_missing_what_the_cli_wrote_is_one_line_with_exit_status_2(tmp_path, capsys, loss, edit,
                                                                                   message):
    # A key missing was a KeyError traceback (exit status 1), features 5 a TypeError, an unknown
    # task a TypeError from the classes None.
    data = write_csv(tmp_path / "data.csv", ["length", "weight", "species"],
                     [[1.0, 2.0, "bird"], [2.0, 1.0, "cat"], [0.5, 0.5, "bird"], [1.5, 2.5, "cat"]] * 3)
    target = ["--target", "weight", "--features", "length"] if loss == "mse" else ["--target", "species"]
    assert run_fit(data, tmp_path / "run", *target, "--loss", loss, "--division", "none") == 0
    path = edit_model_json(tmp_path / "run", edit)
    capsys.readouterr()
    for command in (["predict", str(tmp_path / "run"), str(data), "-o", str(tmp_path / "p.csv")],
                    ["evaluate", str(tmp_path / "run"), str(data)]):
        assert cli.main(command) == 2
        assert capsys.readouterr().err == (f"marquardt {command[0]}: error: {path}: {message}, as `marquardt fit` "
                                           "writes it\n")
    assert not (tmp_path / "p.csv").exists()


def test_predict_on_data_without_a_feature(trained, tmp_path, capsys):
    data = write_csv(tmp_path / "few.csv", ["x1", "z"], [[1, 2]])
    assert cli.main(["predict", str(trained), str(data), "-o", str(tmp_path / "p.csv")]) == 2
    assert "has no column 'x2'" in capsys.readouterr().err


def test_a_quote_never_closed_in_a_large_file_names_its_line(tmp_path, capsys):
    # Past 131072 characters csv stops on its field limit before reaching the end of the file.
    rows = [f"{i},{2 * i},a" for i in range(15000)]
    rows[3] = '3,6,"oops'
    data = tmp_path / "big.csv"
    data.write_text("x,y,note\n" + "\n".join(rows) + "\n")
    assert cli.main(["fit", str(data), "--target", "y", "--features", "x", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"marquardt fit: error: {data} line 5: a field there runs past 131072 "
                                       "characters; most likely a quote opened on that line is never closed\n")


def test_predict_refuses_an_underscore_in_a_number(trained, tmp_path, capsys):
    # The numbers go through numpy's string-to-float cast, which reads '2_5' as 25 (PEP 515).
    data = write_csv(tmp_path / "new.csv", ["x1", "x2"], [[0.5, 1.0], [1.5, "2_5"]])
    assert cli.main(["predict", str(trained), str(data), "-o", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err == (f"marquardt predict: error: {data} line 3, column 'x2': '2_5' is not a "
                                       "finite number\n")
    assert not (tmp_path / "p.csv").exists()


def test_predict_writes_through_a_symlink_and_to_standard_output(trained, regression_csv, tmp_path, capsys):
    # The atomic write replaced a symlink with a file (the linked file kept its old rows), and
    # '-o -' wrote a file named '-'.
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", str(tmp_path / "plain.csv")]) == 0
    expected = (tmp_path / "plain.csv").read_bytes().decode()  # csv's \r\n line ends kept
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", str(link)]) == 0
    assert link.is_symlink() and real.read_bytes().decode() == expected
    capsys.readouterr()
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", "-"]) == 0
    out = capsys.readouterr()
    assert out.out == expected and out.err == "wrote 50 predictions to standard output\n"
    assert not Path("-").exists()


def test_predict_to_dev_stdout_writes_into_the_descriptor(trained, regression_csv, tmp_path, capfd):
    # /dev/stdout was resolved to the file behind the descriptor and replaced (the shell kept
    # writing to the old one), or to a pipe's name that does not exist ("cannot write it").
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", str(tmp_path / "plain.csv")]) == 0
    expected = (tmp_path / "plain.csv").read_bytes().decode()
    capfd.readouterr()
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", "/dev/stdout"]) == 0
    out = capfd.readouterr()
    assert out.out == expected and out.err == "wrote 50 predictions to /dev/stdout\n"


def test_predict_refuses_to_write_over_its_data_file(trained, regression_csv, tmp_path, capsys):
    # -o data.csv replaced the features with the predictions.
    data = tmp_path / "copy.csv"
    data.write_bytes(regression_csv.read_bytes())
    assert cli.main(["predict", str(trained), str(data), "-o", str(tmp_path / "." / "copy.csv")]) == 2
    assert f"is the data file {data}; writing the predictions there would replace the data" in capsys.readouterr().err
    assert data.read_bytes() == regression_csv.read_bytes()
    assert cli.main(["predict", str(trained), str(data), "-o", ""]) == 2
    assert "-o '': expected the path of the CSV file to write" in capsys.readouterr().err


def test_numbers_do_not_hold_every_cell_as_fixed_width_text(tmp_path):
    """A 120 MB file took 0.6 GB more to convert (numpy's str_ array of all cells, 4 bytes a character)."""
    import tracemalloc

    rows = np.random.default_rng(0).standard_normal((20_000, 5)).tolist()
    table = cli.read_table(write_csv(tmp_path / "big.csv", list("abcde"), rows))
    tracemalloc.start()
    try:
        values = table.numbers(list("abcde"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(values, np.array(rows))
    assert peak < 3 * values.nbytes, peak  # the str_ array alone was 11 times values.nbytes


def test_version(capsys):
    from marquardt import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"marquardt {__version__}"


def test_predict_into_a_folder_is_a_usage_error(trained, regression_csv, tmp_path, capsys):
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"marquardt predict: error: -o {tmp_path} is a folder; pass the path of the CSV file to write\n"


def test_evaluate_on_data_without_the_target(trained, tmp_path, capsys):
    data = write_csv(tmp_path / "few.csv", ["x1", "x2"], [[1, 2]])
    assert cli.main(["evaluate", str(trained), str(data)]) == 2
    assert "needs target: " in capsys.readouterr().err


def test_evaluate_unknown_class_label(classes_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_fit(classes_csv, out, "--target", "species", "--loss", "cross_entropy") == 0
    data = write_csv(tmp_path / "new.csv", ["length", "weight", "species"], [[0, 0, "cat"], [1, 1, "cow"]])
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), str(data)]) == 2
    assert "line 3, column 'species': label 'cow' is not one of the model's classes" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["fit", "d.csv", "--target", "y", "--out", "o", "--seed", str(2**64)],
                                  ["demo", "--seed", "x"],
                                  ["fit", "d.csv", "--target", "y", "--out", "o", "--hidden", "10,0"],
                                  ["fit", "d.csv", "--out", "o"],
                                  ["fit", "d.csv", "--target", "y", "--out", "o", "--method", "newton"],
                                  ["fit", "d.csv", "--target", "y", "--out", "o", "--split", "0.5,0.5"],
                                  []])
def test_bad_options_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: marquardt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# as a program


def _python_m(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "marquardt", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_python_m_marquardt_fit_predict_evaluate(regression_csv, tmp_path):
    done = _python_m("fit", str(regression_csv), "--target", "y", "--features", "x1,x2", "--out", "run", *FAST,
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Training" in done.stdout and (tmp_path / "run" / "model.safetensors").is_file()
    done = _python_m("predict", "run", str(regression_csv), "-o", "p.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _python_m("evaluate", "run", str(regression_csv), cwd=tmp_path)
    assert done.returncode == 0 and "rmse" in done.stdout


def test_python_m_marquardt_bad_input(regression_csv, tmp_path):
    done = _python_m("fit", str(regression_csv), "--target", "Y", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"marquardt fit: error: --target: {regression_csv} has no column 'Y'; did you mean 'y'?\n"
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_metadata_is_plain_json(trained):
    record = json.loads((trained / "model.json").read_text(), parse_constant=pytest.fail)  # no NaN or Infinity
    assert record["metadata"]["cli"]["timings"]["train_s"] > 0


def test_metrics_that_do_not_apply_are_null_in_the_model_file(tmp_path):
    # A constant target has no R^2: the report shows "-", the JSON null (strict JSON has no NaN).
    data = write_csv(tmp_path / "flat.csv", ["x", "y"], [[i, 3.0] for i in range(10)])
    assert run_fit(data, tmp_path / "run", "--target", "y", "--division", "none") == 0
    record = json.loads((tmp_path / "run" / "model.json").read_text(), parse_constant=pytest.fail)
    assert [row["r2"] for row in record["metadata"]["cli"]["metrics"]] == [None, None]
    assert record["metadata"]["cli"]["metrics"][0]["mse"] == 0.0


def test_ctrl_c_during_fit_is_one_line_with_exit_status_130(regression_csv, tmp_path, monkeypatch, capsys):
    import marquardt.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(marquardt.train, "fit", interrupted)
    argv = ["--target", "y", "--features", "x1", "--checkpoint", str(tmp_path / "ckpt")]
    assert run_fit(regression_csv, tmp_path / "run", *argv) == 130
    assert capsys.readouterr().err == ("marquardt fit: interrupted (run the same command to resume from the last "
                                       "checkpoint)\n")
    assert not (tmp_path / "run").exists()


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 168000000000 bytes. Error code 12 (Cannot allocate memory)")
# (case, the error training raises, what the message says the allocator tried)
OUT_OF_MEMORY = [
    ("CPU allocator", RuntimeError(CPU_ALLOCATOR), " (it tried to allocate 168 GB)"),
    ("CUDA", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                    "79.10 GiB of which 1.2 GiB is free."), " (it tried to allocate 2.00 GiB)"),
    ("MemoryError", MemoryError(), ""),
    ("small allocation", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5000 bytes"),
     " (it tried to allocate 5 kB)"),
]


@pytest.mark.parametrize("error, tried", [case[1:] for case in OUT_OF_MEMORY], ids=[case[0] for case in OUT_OF_MEMORY])
def test_out_of_memory_during_fit_is_one_line_with_exit_status_2(regression_csv, tmp_path, monkeypatch, capsys, error,
                                                                  tried):
    # `--hidden 100000000` ended in a traceback of the allocator's RuntimeError, exit status 1.
    import marquardt.train

    def too_large(*args, **kwargs):
        raise error
    monkeypatch.setattr(marquardt.train, "fit", too_large)
    assert run_fit(regression_csv, tmp_path / "run", "--target", "y", "--features", "x1", "--hidden", "100000,3") == 2
    assert capsys.readouterr().err == (
        f"marquardt fit: error: not enough memory for a network with --hidden 100000,3 on {regression_csv}{tried}: "
        "reduce --hidden or the data (fewer rows or feature columns)\n")
    assert not (tmp_path / "run").exists()


def test_out_of_memory_in_predict_is_one_line_with_exit_status_2(trained, regression_csv, tmp_path, monkeypatch,
                                                                  capsys):
    def too_large(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR)
    monkeypatch.setattr(cli, "_outputs", too_large)
    assert cli.main(["predict", str(trained), str(regression_csv), "-o", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err == (
        f"marquardt predict: error: not enough memory to run the model in {trained} on {regression_csv} (it tried "
        "to allocate 168 GB): pass fewer rows at a time\n")


def test_other_runtime_errors_are_not_taken_for_out_of_memory(regression_csv, tmp_path, monkeypatch):
    import marquardt.train

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (5x2 and 3x4)")
    monkeypatch.setattr(marquardt.train, "fit", bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):  # a bug keeps its traceback
        run_fit(regression_csv, tmp_path / "run", "--target", "y", "--features", "x1")


@pytest.mark.parametrize("y, outputs, r2", [
    ([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]], [[0.1, 1.1], [1.1, 1.1], [2.1, 1.1], [3.1, 1.1]], 0.992),
    ([[0.0], [1.0], [2.0], [3.0]], [[0.1], [1.1], [2.1], [3.1]], 0.992),
    ([[1.0], [1.0]], [[1.0], [1.5]], math.nan),
])
def test_r2_averages_the_target_columns_that_have_one(y, outputs, r2):
    # A constant second target used to turn the averaged R^2 into NaN.
    metrics = cli.regression_metrics(np.array(y), np.array(outputs))
    assert metrics["r2"] == pytest.approx(r2, nan_ok=True, rel=1e-12)


def test_a_closed_pipe_is_not_a_traceback(regression_csv, tmp_path):
    code = ("import sys; from marquardt.cli import main; sys.exit(main(['fit', sys.argv[1], '--target', 'y', "
            "'--features', 'x1', '--hidden', '2', '--epochs', '2', '--seed', '0', '--out', sys.argv[2]]))")
    reader = subprocess.Popen([sys.executable, "-c", code, str(regression_csv), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head -0` would
    _, err = reader.communicate()
    assert b"Traceback" not in err and reader.returncode == 1


def test_a_checkpoint_folder_the_file_system_refuses_is_a_usage_error_before_training(regression_csv, tmp_path,
                                                                                      capsys, monkeypatch):
    # As root, os.access says yes where the file system refuses (--checkpoint /proc/x): training
    # ran, then the first checkpoint write ended in a traceback. The pre-check now makes a file.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    trained = []
    monkeypatch.setattr(cli, "train_model", lambda *args, **kwargs: trained.append(1))
    code = run_fit(regression_csv, tmp_path / "out", "--target", "y", "--features", "x1,x2", "--checkpoint",
                   str(tmp_path / "ckpt"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot create files in" in err and trained == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_checkpoint_under_proc_is_refused_as_a_usage_error(regression_csv, tmp_path, capsys):
    assert run_fit(regression_csv, tmp_path / "out", "--target", "y", "--features", "x1,x2",
                   "--checkpoint", "/proc/marquardt-ckpt") == 2
    assert "--checkpoint /proc/marquardt-ckpt: cannot create files in /proc" in capsys.readouterr().err


def test_fit_on_a_terminal_without_tqdm_trains_without_a_bar(regression_csv, tmp_path, monkeypatch, capsys):
    # The command passed progress=isatty(), True on a terminal: without the optional tqdm it raised
    # fit's "progress=True needs tqdm". It now passes fit's default, which falls back silently.
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_fit(regression_csv, tmp_path / "out", "--target", "y", "--features", "x1,x2") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


LONG = "n" * 300  # past NAME_MAX (255 on Linux's file systems): the system refuses it as "File name too long"


def untrained_model(folder: Path) -> Path:
    """A model folder as `marquardt fit` writes it, without the seconds of training and plots."""
    from marquardt.io import save
    from marquardt.mlp import mlp

    cli_meta = {"task": "regression", "loss": "mse", "targets": ["y"], "features": ["x1", "x2"], "classes": None}
    save(mlp(2, (3,), 1, dtype=torch.float64), folder / "model", metadata={"cli": cli_meta})
    return folder


@pytest.mark.parametrize("argv, argument", [
    (["fit", "{tmp}/" + LONG + ".csv", "--target", "y", "--out", "{tmp}/out"], "DATA.csv"),
    (["fit", "{data}", "--target", "y", "--features", "x1", "--out", "{tmp}/" + LONG], "--out"),
    (["fit", "{data}", "--target", "y", "--features", "x1", "--seed", "0", "--checkpoint", "{tmp}/" + LONG,
      "--out", "{tmp}/out"], "--checkpoint"),
    (["predict", "{tmp}/" + LONG, "{data}", "-o", "{tmp}/out"], "DIR"),
    (["predict", "{model}", "{data}", "-o", "{tmp}/" + LONG + ".csv"], "-o"),
    (["evaluate", "{model}", "{tmp}/" + LONG + ".csv"], "DATA.csv"),
    (["demo", "--out", "{tmp}/" + LONG, "--epochs", "1"], "--out"),
])
def test_a_path_the_system_refuses_is_one_line_with_exit_status_2(regression_csv, tmp_path, capsys, argv,
                                                                  argument):
    # A file name past the system's limit was an OSError traceback (errno 36) at the first stat of the path.
    names = {"tmp": tmp_path, "data": regression_csv, "model": untrained_model(tmp_path / "model")}
    argv = [arg.format(**names) for arg in argv]
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"marquardt {argv[0]}: error: {argument} {str(tmp_path)[:40]}"), err
    assert err.count("\n") == 1 and err.endswith("characters): File name too long\n"), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
