"""The ``marquardt`` command line: ``demo``, ``fit``, ``predict`` and ``evaluate``.

``marquardt demo`` trains one network by LM, momentum and gradient descent on a data set made
in code and prints the comparison. ``marquardt fit DATA.csv --target y --out DIR`` trains an
:func:`~marquardt.mlp.mlp` with MATLAB's defaults (one hidden layer of 10, Levenberg-Marquardt,
random 70/15/15 division) and writes the model, a report and the training plots to ``DIR``;
``predict`` and ``evaluate`` read that model back.

Data-parallel training: ``torchrun --nproc-per-node=K -m marquardt fit DATA.csv ...`` starts K
ranks (gloo on CPU, NCCL with ``--device cuda``); each trains on its contiguous block of the CSV
rows (:mod:`marquardt.distributed`), ``--division`` divides each block, and only rank 0 prints
and writes the model, report and plots (over all rows).

CSV files are read with the :mod:`csv` module: a header line naming the columns, then one
sample per line. A mistake in the input (a missing file or column, a value that is not a
number, an empty file, a target also given as a feature) is reported on one line of standard
error, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .history import _finite_or_none
from .io import _atomic_write, _is_stream

__all__ = ["UsageError", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
_METHODS = ("lm", "br", "gd", "momentum", "adam")
_LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")
_DIVISIONS = ("random", "block", "interleaved", "none")
_SPLIT_NAMES = ("Training", "Validation", "Test")
_LOSS_KEYS = {"Training": "perf", "Validation": "vperf", "Test": "tperf"}  # History keys per split
_MODEL_STEM = "model"
_CSV_HELP = "comma-separated file: a header line naming the columns, then one sample per line"
_PLOTS = ("performance.png", "training_state.png", "regression.png", "error_histogram.png")
# How torch's allocators say they failed: the CPU allocator raises a RuntimeError ("can't
# allocate memory: you tried to allocate N bytes"), CUDA an OutOfMemoryError ("Tried to allocate
# 2.00 GiB"), some backends a RuntimeError "... out of memory".
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_ALLOCATION = re.compile(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ ?[KMGT]i?B)", re.IGNORECASE)


class UsageError(Exception):
    """An input the user can fix; :func:`main` prints it on one line and returns 2."""


# ---------------------------------------------------------------------------------------------
# CSV tables


@dataclass(frozen=True)
class Table:
    """The cells of a CSV file as strings, with the file line of each row for messages."""

    path: str
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def numbers(self, names: Sequence[str]) -> np.ndarray:
        """The named columns as a float64 array (rows, columns); non-numbers raise CellError."""
        values = np.empty((len(self.rows), len(names)))
        for c, name in enumerate(names):
            # One column at a time: an array of every cell as text (numpy's fixed-width str_)
            # took 4 bytes per character of the longest cell, 0.6 GB for a 120 MB file.
            index = self.columns.index(name)
            cells = [row[index] for row in self.rows]
            try:
                values[:, c] = np.array(cells, dtype=np.float64)
            except ValueError:
                return self._numbers_one_by_one(names)  # names the first bad cell
            # Python's float() and numpy read '1_000' as 1000 (PEP 515); in a data file it is a typo.
            if not np.isfinite(values[:, c]).all() or any("_" in cell for cell in cells):
                return self._numbers_one_by_one(names)
        return values

    def _numbers_one_by_one(self, names: Sequence[str]) -> np.ndarray:
        values = np.empty((len(self.rows), len(names)))
        for r, (row, line) in enumerate(zip(self.rows, self.lines)):
            for c, name in enumerate(names):
                text = row[self.columns.index(name)]
                try:
                    values[r, c] = _cell_number(text)
                except ValueError:
                    values[r, c] = math.nan
                if not math.isfinite(values[r, c]):
                    what = "an empty value" if not text.strip() else f"{text!r}"
                    raise CellError(f"{self.path} line {line}, column {name!r}: {what} is not a finite number",
                                    name)
        return values


class CellError(UsageError):
    """A cell that is not a finite number; ``column`` names its column, for hints on the options."""

    def __init__(self, message: str, column: str) -> None:
        super().__init__(message)
        self.column = column


def _cell_number(text: str) -> float:
    """The number in a CSV cell, as ``float`` reads it but without PEP 515's underscores."""
    if "_" in text:
        raise ValueError(f"{text!r} has an underscore")
    return float(text)


def read_table(path: str | Path) -> Table:
    """Read a CSV file with a header line; every problem becomes a one-line UsageError.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     name = os.path.join(tmp, "d.csv")
    ...     _ = open(name, "w").write("x,y\\n1,2\\n3,4\\n")
    ...     table = read_table(name)
    >>> table.columns, table.numbers(["y"]).ravel().tolist()
    (['x', 'y'], [2.0, 4.0])
    """
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{path}: no such file")
    if not file.is_file():
        raise UsageError(f"{path} is not a file")
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            # strict: a quote never closed is an error, not a field that swallows the rest of the file
            return _parse(str(path), csv.reader(handle, strict=True))
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _rows(path: str, reader: Any) -> Any:
    """The reader's rows; a csv.Error becomes a UsageError naming the line the bad row starts on."""
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if str(error) == "unexpected end of data":
                raise UsageError(f"{path} line {start}: a quoted field opened there is never closed (a \" without "
                                 "its closing \")") from None
            if str(error).startswith("field larger than field limit"):
                # In a large file an unclosed quote reaches csv's field limit before the end of the file.
                raise UsageError(f"{path} line {start}: a field there runs past {csv.field_size_limit()} characters; "
                                 "most likely a quote opened on that line is never closed") from None
            raise UsageError(f"{path} line {start}: malformed CSV: {error}") from None
        yield row
        start = reader.line_num + 1


def _parse(path: str, reader: Any) -> Table:
    rows_read = _rows(path, reader)
    header = next((row for row in rows_read if row), None)
    if header is None:
        raise UsageError(f"{path} is empty; expected a header line naming the columns, then data rows")
    _check_separator(path, header)
    columns = _check_header(path, [name.strip() for name in header])
    rows, lines = [], []
    for row in rows_read:
        if not row:
            continue  # blank line
        if len(row) != len(columns):
            raise UsageError(f"{path} line {reader.line_num} has {len(row)} fields; the header has {len(columns)}")
        rows.append(row)
        lines.append(reader.line_num)
    if not rows:
        raise UsageError(f"{path} has a header but no data rows")
    return Table(path, columns, rows, lines)


def _check_separator(path: str, header: list[str]) -> None:
    """Refuse a header of one field that another separator would split: a semicolon-separated file
    (Excel and MATLAB's writetable where the decimal mark is a comma) or a tab-separated one was
    read as one column, then failed as 'no column y' or 'line 2 has 3 fields'."""
    for separator, name in ((";", "semicolons"), ("\t", "tabs")):
        if len(header) == 1 and separator in header[0]:
            raise UsageError(f"{path}: the header line {header[0]!r} separates its columns with {name}; marquardt "
                             "reads comma-separated files with '.' as the decimal mark: save the file as CSV with "
                             "commas (MATLAB: writetable(T, 'data.csv'))")


def _check_header(path: str, columns: list[str]) -> list[str]:
    if "" in columns:
        index = columns.index("")
        trailing = " (the header line ends with a comma)" if index == len(columns) - 1 and index > 0 else ""
        raise UsageError(f"{path}: header column {index + 1} has no name{trailing}; every column needs one")
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise UsageError(f"{path}: the header names column(s) {', '.join(map(repr, duplicates))} more than once")
    return columns


def _check_columns(table: Table, names: Sequence[str], option: str) -> list[str]:
    if _all_numbers(table.columns):
        # Also when a name matches a number of that line (--target 2.5): the first data row was
        # taken as the header and the rest trained on, silently.
        raise UsageError(f"{option}: {table.path} has no header: its first line is numbers, not column names; the "
                         "file needs a header line naming the columns first")
    for name in names:
        if name not in table.columns:
            close = _closest(name, table.columns)
            hint = f"did you mean {close!r}?" if close else f"the columns are {', '.join(table.columns)}"
            raise UsageError(f"{option}: {table.path} has no column {name!r}; {hint}")
    twice = sorted({name for name in names if list(names).count(name) > 1})
    if twice:
        raise UsageError(f"{option}: column(s) {', '.join(map(repr, twice))} listed more than once; name each "
                         "column once")
    return list(names)


def _all_numbers(cells: Sequence[str]) -> bool:
    try:
        [_cell_number(cell) for cell in cells]
    except ValueError:
        return False
    return True


def _closest(name: str, columns: list[str]) -> str | None:
    """The column ``name`` most likely meant, ignoring case (difflib's ratio >= 0.6), or None."""
    lowered = {column.lower(): column for column in columns}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return lowered[close[0]] if close else None


# ---------------------------------------------------------------------------------------------
# tasks: how targets are encoded, predicted and scored


@dataclass
class Regression:
    """Numeric targets, one network output each; scored by MSE, RMSE and R^2."""

    targets: list[str]
    loss: str = "mse"

    @property
    def n_outputs(self) -> int:
        return len(self.targets)

    def encode(self, table: Table) -> np.ndarray:
        return table.numbers(self.targets)

    def training_targets(self, y: np.ndarray) -> torch.Tensor:
        """Targets as ``fit`` takes them for this loss."""
        return torch.from_numpy(y)

    def plot_pairs(self, y: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, outputs) for the regression and error plots."""
        return y, outputs

    def prediction_columns(self, outputs: np.ndarray) -> tuple[list[str], list[list[str]]]:
        return list(self.targets), [[repr(float(v)) for v in row] for row in outputs]

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return regression_metrics(y, outputs)

    def metadata(self) -> dict[str, Any]:
        return {"task": "regression", "targets": self.targets, "loss": self.loss, "classes": None}


@dataclass
class Classification:
    """One column of class labels mapped to indices; scored by accuracy.

    With ``loss="cross_entropy"`` the network has one output (a logit) per class; with
    ``"binary_cross_entropy"`` it has one logit for the second class.
    """

    target: str
    loss: str
    classes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [self.target]

    @property
    def n_outputs(self) -> int:
        return 1 if self.loss == "binary_cross_entropy" else len(self.classes)

    def learn_classes(self, table: Table) -> None:
        labels = sorted(set(table.column(self.target)), key=_label_order)
        if len(labels) < 2:
            raise UsageError(f"--target {self.target}: classification needs at least two classes; "
                             f"{table.path} has only {labels!r}")
        if self.loss == "binary_cross_entropy" and len(labels) != 2:
            raise UsageError(f"--loss binary_cross_entropy needs exactly two classes in column {self.target!r}; "
                             f"found {len(labels)}: {', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''} "
                             "(use --loss cross_entropy)")
        rows = len(table)
        if len(labels) > max(10, rows // 2):
            # A numeric target given a classification loss: one class per value, and a network
            # of as many outputs (200 rows of floats took 35 s for two epochs).
            raise UsageError(f"--loss {self.loss}: column {self.target!r} has {len(labels)} different labels in "
                             f"{rows} rows; a class needs several samples to learn from. If it holds numbers to "
                             "fit, use --loss mse")
        self.classes = labels

    def encode(self, table: Table) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.classes)}
        codes = []
        for label, line in zip(table.column(self.target), table.lines):
            if label not in index:
                raise UsageError(f"{table.path} line {line}, column {self.target!r}: label {label!r} is not one of "
                                 f"the model's classes {self.classes}")
            codes.append(index[label])
        return np.array(codes, dtype=np.int64)

    def training_targets(self, y: np.ndarray) -> torch.Tensor:
        # Class indices for the softmax cross-entropy, a 0/1 column for the single logit.
        codes = torch.from_numpy(y)
        return codes.to(torch.float64)[:, None] if self.loss == "binary_cross_entropy" else codes

    def plot_pairs(self, y: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One-hot targets and class probabilities, as MATLAB plots a pattern-recognition network."""
        return np.eye(len(self.classes))[y], self.probabilities(outputs)

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(outputs)
        if self.loss == "binary_cross_entropy":
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], dim=1).numpy()
        return torch.softmax(logits, dim=1).numpy()

    def prediction_columns(self, outputs: np.ndarray) -> tuple[list[str], list[list[str]]]:
        probabilities = self.probabilities(outputs)
        labels = [self.classes[i] for i in probabilities.argmax(axis=1)]
        header = [self.target] + [f"p({label})" for label in self.classes]
        return header, [[label] + [repr(float(p)) for p in row] for label, row in zip(labels, probabilities)]

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        predicted = self.probabilities(outputs).argmax(axis=1)
        return {"accuracy": float((predicted == y).mean()), "errors": int((predicted != y).sum())}

    def metadata(self) -> dict[str, Any]:
        return {"task": "classification", "targets": self.targets, "loss": self.loss, "classes": self.classes}


def _label_order(label: str) -> tuple[int, float, str]:
    # Numeric labels in numeric order (2 before 10), then any others alphabetically.
    try:
        return (0, _cell_number(label), label)
    except ValueError:
        return (1, 0.0, label)


def regression_metrics(y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """MSE over all target elements, its root, and R^2 averaged over target columns.

    Notes
    -----
    ``R^2 = 1 - sum (y - o)^2 / sum (y - mean y)^2`` per column, averaged over the columns that
    are not constant (NaN when all are).

    Examples
    --------
    >>> y = np.array([[1.0], [2.0], [3.0]])
    >>> regression_metrics(y, y + 0.5)
    {'mse': 0.25, 'rmse': 0.5, 'r2': 0.625}
    """
    errors = y - outputs
    mse = float(np.mean(errors**2))
    total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - (errors**2).sum(axis=0) / total, np.nan)
    # A constant target column has no R^2; the others still do (NaN only when none has one).
    defined = r2[np.isfinite(r2)]
    return {"mse": mse, "rmse": math.sqrt(mse), "r2": float(defined.mean()) if defined.size else math.nan}


def _task(loss: str, targets: list[str]) -> Regression | Classification:
    if loss == "mse":
        return Regression(targets)
    if len(targets) != 1:
        raise UsageError(f"--loss {loss} takes one --target column of class labels; received {len(targets)}: "
                         f"{','.join(targets)}")
    return Classification(targets[0], loss)


def _task_from_metadata(meta: dict[str, Any]) -> Regression | Classification:
    if meta["task"] == "regression":
        return Regression(list(meta["targets"]), meta["loss"])
    return Classification(meta["targets"][0], meta["loss"], list(meta["classes"]))


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Rows of equal keys as an aligned plain-text (or Markdown) table; floats to 4 digits.

    Examples
    --------
    >>> print(format_table([{"method": "LM", "mse": 0.000123}, {"method": "GD", "mse": None}]))
    method  mse
    ------  --------
    LM      0.000123
    GD      -
    """
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_cell(row[key]) for key in keys] for row in rows]
    widths = [max(len(key), *(len(line[i]) for line in cells)) for i, key in enumerate(keys)]
    lines = [keys, ["-" * w for w in widths], *cells]
    if markdown:
        return "\n".join("| " + " | ".join(text.ljust(w) for text, w in zip(line, widths)) + " |" for line in lines)
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# argument types


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, received {text!r}")
    return names


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected layer sizes such as 10 or 10,10 (positive integers), received {text!r}")
    return sizes


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(part) for part in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-9 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected train,val,test fractions summing to 1 such as 0.7,0.15,0.15, "
                                         f"received {text!r}")
    return parts  # type: ignore[return-value]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -2**63 <= value < 2**64:  # the range torch's generators take
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64), received {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``marquardt``, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="marquardt", description="Levenberg-Marquardt training of "
                                     "PyTorch networks, with MATLAB fitnet/trainlm defaults.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="compare LM, momentum and gradient descent on a built-in data set")
    demo.add_argument("--out", type=Path, default=Path("marquardt-demo"), help="folder for the plots "
                      "(default: ./marquardt-demo)")
    demo.add_argument("--epochs", type=_count, default=1000, help="maximum epochs per method (default: 1000)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the weights and the division (default: 0)")
    demo.set_defaults(run=run_demo_command)
    _add_fit_parser(commands)
    predict = commands.add_parser("predict", help="write a trained model's predictions for a CSV file")
    predict.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by marquardt fit")
    predict.add_argument("data", metavar="DATA.csv", help=f"{_CSV_HELP}, with the model's feature columns")
    predict.add_argument("-o", "--output", required=True, metavar="OUT.csv",
                         help="predictions CSV to write ('-' for standard output)")
    predict.set_defaults(run=run_predict)
    evaluate = commands.add_parser("evaluate", help="score a trained model on a CSV file with targets")
    evaluate.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by marquardt fit")
    evaluate.add_argument("data", metavar="DATA.csv", help=f"{_CSV_HELP}, with the model's feature and "
                          "target columns")
    evaluate.set_defaults(run=run_evaluate)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _add_fit_parser(commands: Any) -> None:
    fit = commands.add_parser("fit", help="train a network on a CSV file and write model, report and plots")
    fit.add_argument("data", metavar="DATA.csv", help=_CSV_HELP)
    fit.add_argument("--target", type=_names, required=True, metavar="COL[,COL...]", help="target column(s)")
    fit.add_argument("--features", type=_names, metavar="COLS", help="feature columns (default: all others)")
    fit.add_argument("--hidden", type=_hidden, default=[10], metavar="N[,N...]", help="hidden layer sizes (default: 10)")
    fit.add_argument("--method", choices=_METHODS, default="lm", help="training method (default: lm)")
    fit.add_argument("--epochs", type=_count, default=1000, help="maximum epochs (default: 1000)")
    fit.add_argument("--goal", type=_non_negative, default=0.0, help="performance goal (default: 0)")
    fit.add_argument("--max-fail", type=_positive, help="validation failures before stopping (default: 6; for br, "
                     "no validation stop, as trainbr)")
    fit.add_argument("--division", choices=_DIVISIONS, default="random", help="data division (default: random)")
    fit.add_argument("--split", type=_split, default=(0.7, 0.15, 0.15), metavar="TRAIN,VAL,TEST",
                     help="division fractions (default: 0.7,0.15,0.15)")
    fit.add_argument("--loss", choices=_LOSSES, default="mse", help="mse for regression, cross_entropy or "
                     "binary_cross_entropy for class labels (default: mse)")
    fit.add_argument("--seed", type=_seed, help="seed of the weights and the division (default: random)")
    fit.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    fit.add_argument("--checkpoint", type=Path, metavar="CKPT_DIR", help="write checkpoints to CKPT_DIR and resume "
                     "from the newest one there (the same command continues a killed run)")
    fit.add_argument("--checkpoint-every", type=_positive, default=10, metavar="N",
                     help="epochs between checkpoints (default: 10)")
    fit.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for model, report and plots")
    fit.set_defaults(run=run_fit)


# ---------------------------------------------------------------------------------------------
# commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Examples
    --------
    >>> main(["fit", "no-such-file.csv", "--target", "y", "--out", "out"])
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage and the error
        return int(stop.code or 0)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"marquardt {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        print(f"marquardt {args.command}: error: {_memory_problem(args, error)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `marquardt fit ... | head`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        # A path the operating system refuses (a name too long, no permission to read): the
        # checks of the paths stat them, so this comes before any training.
        print(f"marquardt {args.command}: error: {_path_problem(args, error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        resume = (" (run the same command to resume from the last checkpoint)"
                  if getattr(args, "checkpoint", None) is not None else "")
        print(f"marquardt {args.command}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _path_problem(args: argparse.Namespace, error: OSError) -> str:
    """The one-line message for an OSError: the argument and path refused, and the system's reason.

    Examples
    --------
    >>> args = argparse.Namespace(command="fit", data="d.csv", out=Path("run"), checkpoint=None)
    >>> _path_problem(args, OSError(36, "File name too long", "run/model.json"))
    '--out run: cannot use run/model.json: File name too long'
    >>> _path_problem(args, OSError(13, "Permission denied", "d.csv"))
    'DATA.csv d.csv: Permission denied'
    """
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    path = os.fsdecode(error.filename)
    argument = _argument_of(args, path)
    if argument is None:
        return f"{_short_path(path)}: {reason}"
    label, value = argument
    given = f"{label} {_short_path(value)}"
    if os.path.abspath(value) == os.path.abspath(path):
        return f"{given}: {reason}"
    return f"{given}: cannot use {_short_path(path)}: {reason}"


# The path arguments of each command, by the name its usage line gives them.
_PATH_ARGUMENTS = {"fit": (("DATA.csv", "data"), ("--out", "out"), ("--checkpoint", "checkpoint")),
                   "predict": (("DIR", "model_dir"), ("DATA.csv", "data"), ("-o", "output")),
                   "evaluate": (("DIR", "model_dir"), ("DATA.csv", "data")), "demo": (("--out", "out"),)}


def _argument_of(args: argparse.Namespace, path: str) -> tuple[str, str] | None:
    """(label, value) of the path argument that ``path`` is, lies under or above; None if none."""
    failed = os.path.abspath(path)
    for label, name in _PATH_ARGUMENTS.get(args.command, ()):
        value = getattr(args, name, None)
        if value is None or str(value) == "-":
            continue
        given = os.path.abspath(value)
        if os.path.commonpath([failed, given]) in (failed, given):
            return label, str(value)
    return None


def _short_path(path: str, keep: int = 60) -> str:
    """``path``, or its ends around the character count when longer than the line it is printed on."""
    if len(path) <= 2 * keep + 3:
        return path
    return f"{path[:keep]}...{path[-keep:]} ({len(path)} characters)"


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's MemoryError, torch's OutOfMemoryError
    (CUDA), or a RuntimeError from an allocator; any other RuntimeError is a bug to show in full."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error)) is not None


def _memory_problem(args: argparse.Namespace, error: BaseException) -> str:
    """The one-line message for a failed allocation: what was too large, and what to reduce."""
    tried = _allocation(error)
    if args.command == "fit":
        hidden = ",".join(map(str, args.hidden))
        return (f"not enough memory for a network with --hidden {hidden} on {args.data}{tried}: reduce --hidden "
                "or the data (fewer rows or feature columns)")
    if args.command in ("predict", "evaluate"):
        return (f"not enough memory to run the model in {args.model_dir} on {args.data}{tried}: pass fewer rows "
                "at a time")
    return f"not enough memory{tried}: free some memory and run it again"


def _allocation(error: BaseException) -> str:
    """`` (it tried to allocate 168 GB)``, as the allocator's message says, or "" when it says nothing."""
    match = _ALLOCATION.search(str(error))
    if match is None:
        return ""
    if match[2]:
        return f" (it tried to allocate {match[2]})"
    size = int(match[1])
    value, unit = next(((size / scale, unit) for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))
                        if size >= scale), (size, "bytes"))
    return f" (it tried to allocate {value:.3g} {unit})"


def run_demo_command(args: argparse.Namespace) -> int:
    """``marquardt demo``: the comparison table and convergence plots."""
    from .demo import run_demo, write_plots

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder for the plots")
    _check_writable(args.out)
    print(f"Training mlp 1-10-1 on the built-in simplefit-style data (94 samples, random 70/15/15, "
          f"seed {args.seed}) with LM, momentum and gradient descent...")
    runs = run_demo(epochs=args.epochs, seed=args.seed)
    print(format_table([run.row() for run in runs]))
    for path in write_plots(runs, args.out):
        print(f"wrote {path}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    """``marquardt fit``: train, then write the model, the report and the plots (rank 0 of a torchrun)."""
    from .distributed import DistributedError, fail_together

    started = time.perf_counter()
    reducer, owned = _process_group(args.device)
    try:
        with fail_together(reducer):  # a bad row in one rank's block stops every rank
            table = read_table(args.data)
            task, features = _fit_columns(args, table)
            shard = _shard_rows(table, reducer)
            X, y = _fit_arrays(args, shard, task, features)
            read_s = time.perf_counter() - started
            device = _device(args.device)
            if args.out.exists() and not args.out.is_dir():
                raise UsageError(f"--out {args.out} is a file; pass a folder for the model, report and plots")
            if args.checkpoint is not None and args.seed is None:
                raise UsageError("--checkpoint needs --seed, so that a resumed run divides the data and starts the "
                                 "same way")
            seed = args.seed if args.seed is not None else _shared_seed(reducer)
            _check_fit_options(args, task, len(X), seed)
            resumed = _checkpoint_epoch(args.checkpoint)
            model, history, train_s = train_model(args, task, X, y, seed, device, reducer)
    except DistributedError as error:
        print(f"marquardt {args.command}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if owned:
            torch.distributed.destroy_process_group()
    if reducer.rank != 0:
        return 0
    if shard is not table:
        X, y = table.numbers(features), task.encode(table)
    outputs = _outputs(model, X)
    splits = _sharded_split_indices(len(X), reducer.world_size, args.division, args.split, seed)
    rows = _split_rows(task, splits, y, outputs, history)
    options = _options(args, seed)
    if reducer.world_size > 1:
        options["ranks"] = reducer.world_size
    record = FitRecord(args.data, features, task, options, history, rows, {"read_s": read_s, "train_s": train_s},
                       resumed)
    try:
        written = write_fit_outputs(args.out, model, record, splits, y, outputs)
    except OSError as error:
        raise UsageError(f"--out {args.out}: cannot write {error.filename or args.out}: "
                         f"{error.strerror or error}") from None
    _print_summary(record, written)
    return 0


def _fit_columns(args: argparse.Namespace, table: Table) -> tuple[Regression | Classification, list[str]]:
    targets = _check_columns(table, args.target, "--target")
    if args.features is None:
        features = [name for name in table.columns if name not in targets]
        if not features:
            raise UsageError(f"{table.path} has no columns left for features after --target {','.join(targets)}")
    else:
        features = _check_columns(table, args.features, "--features")
        both = [name for name in features if name in targets]
        if both:
            raise UsageError(f"column {both[0]!r} is given both as --target and in --features; a target cannot "
                             "be a feature (drop it from --features)")
    task = _task(args.loss, targets)
    if isinstance(task, Classification):
        task.learn_classes(table)
    return task, features


def _fit_arrays(args: argparse.Namespace, table: Table, task: Regression | Classification,
                features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features and encoded targets; a text cell's error says which option leaves its column out."""
    try:
        return table.numbers(features), task.encode(table)
    except CellError as error:
        if error.column in task.targets:  # a regression target of labels
            hint = "if the column holds class labels, pass --loss cross_entropy"
        elif args.features is None:
            hint = ("to leave the column out, list the feature columns with --features (by default every column "
                    "but the targets is a feature)")
        else:
            raise
        raise UsageError(f"{error}; {hint}") from None


def _check_fit_options(args: argparse.Namespace, task: Regression | Classification, n_rows: int, seed: int) -> None:
    """Option combinations ``fit`` would refuse only after reading the data: checked before training."""
    if args.method == "br" and isinstance(task, Classification):
        raise UsageError(f"--method br needs --loss mse: Bayesian regularization (trainbr) minimises a sum of "
                         f"squared errors; use --method lm with --loss {task.loss}")
    if args.checkpoint is not None and args.checkpoint.exists() and not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint} is a file; pass a folder for the checkpoints")
    if args.checkpoint is not None:
        _check_writable(args.checkpoint, "--checkpoint")
    if args.division != "none" and "Training" not in split_indices(n_rows, args.division, args.split, seed):
        raise UsageError(f"--split {','.join(f'{s:g}' for s in args.split)}: {args.data} has {n_rows} rows, and "
                         "validation and test take round(fraction x rows) each, which leaves none for training; "
                         "use a larger training fraction or --division none")
    _check_writable(args.out)


def _check_writable(out: Path, option: str = "--out") -> None:
    # The nearest existing folder must take new files, or the training would be lost at the end
    # (--out), or stop with a traceback at the first checkpoint (--checkpoint).
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _takes_a_file(existing):
        raise UsageError(f"{option} {out}: cannot create files in {existing}; pass a folder you can write to")


def _takes_a_file(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, by trying (``os.access`` says yes to root
    where the file system refuses, as /proc does)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available to this PyTorch build on this machine; use --device cpu")
    return torch.device(name)


def train_model(args: argparse.Namespace, task: Regression | Classification, X: np.ndarray, y: np.ndarray,
                seed: int, device: torch.device, reducer: Any = None) -> tuple[Any, Any, float]:
    """Build ``mlp(F, hidden, outputs)`` from ``seed`` and train it with ``fit``; return model, history, seconds."""
    from .checkpoint import CheckpointError
    from .mlp import mlp
    from .train import fit

    generator = torch.Generator().manual_seed(seed)
    model = mlp(X.shape[1], args.hidden, task.n_outputs, dtype=torch.float64, device=device, generator=generator)
    targets = task.training_targets(y)
    method = torch.optim.Adam if args.method == "adam" else args.method
    start = time.perf_counter()
    try:
        history = fit(model, torch.from_numpy(X), targets, method=method, epochs=args.epochs, goal=args.goal,
                      max_fail=args.max_fail, division=None if args.division == "none" else args.division,
                      split=args.split, loss=task.loss, seed=seed, progress=None,
                      checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                      distributed=reducer if reducer is not None else False)
    except CheckpointError as error:
        raise UsageError(_checkpoint_problem(args.checkpoint, error)) from None
    except ValueError as error:
        # fit refuses, before training, what the options and data together cannot do (a J^T J
        # beyond the memory budget for --method br or a cross-entropy loss): a usage error too.
        hidden = ",".join(map(str, args.hidden))
        raise UsageError(f"--method {args.method} --hidden {hidden} --loss {task.loss}: {error}") from None
    return model, history, time.perf_counter() - start


def _checkpoint_problem(folder: Path, error: Any) -> str:
    """A checkpoint that cannot be resumed, with the command line's ways out (it has no resume=False)."""
    from .checkpoint import CheckpointMismatch

    mismatch = isinstance(error, CheckpointMismatch)
    same = "run the same command (data, options and --seed) to resume it, " if mismatch else ""
    return (f"--checkpoint {folder}: {error.path.name} {error.reason}; {same}pass another --checkpoint folder, or "
            f"delete {folder} to start over")


def _checkpoint_epoch(folder: Path | None) -> int:
    """The epoch of the newest checkpoint in ``folder`` (0 without one), where ``fit`` will resume.

    Only for the timings: an unreadable or foreign checkpoint is fit's to report.
    """
    from .checkpoint import latest_checkpoint
    from .io import load_state

    try:
        path = None if folder is None else latest_checkpoint(folder)
        return 0 if path is None else int(load_state(path)[1]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def split_indices(n: int, division: str, split: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """The sample indices of each non-empty split, as ``fit(division=..., seed=seed)`` draws them.

    ``fit`` seeds a fresh ``torch.Generator`` with ``seed`` and divides before anything else
    draws from it; the same call here gives the same indices.
    """
    from .division import divide

    if division == "none":
        return {"Training": np.arange(n)}
    parts = divide(n, division, split, torch.Generator().manual_seed(seed))
    return {name: part.numpy() for name, part in zip(_SPLIT_NAMES, parts) if len(part)}


# ---------------------------------------------------------------------------------------------
# torchrun: one rank per process, each with a contiguous block of the rows


def _process_group(device: str) -> tuple[Any, bool]:
    """The reducer of this run and whether this command started the process group (then it ends it)."""
    import os

    from .distributed import LocalReducer, initialize

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalReducer(), False
    owned = not torch.distributed.is_initialized()
    return initialize(backend="nccl" if device == "cuda" else "gloo"), owned


def _shard_rows(table: Table, reducer: Any) -> Table:
    """This rank's contiguous block of the rows (the table itself for one process)."""
    from .distributed import shard_bounds

    if reducer.world_size == 1:
        return table
    try:
        start, stop = shard_bounds(len(table), reducer.rank, reducer.world_size)
    except ValueError as error:
        raise UsageError(f"{table.path}: {error}") from None
    return Table(table.path, table.columns, table.rows[start:stop], table.lines[start:stop])


def _shared_seed(reducer: Any) -> int:
    # Rank 0 draws; the others take its seed (the weights are sent from rank 0 anyway).
    seed = random.SystemRandom().randrange(2**31) if reducer.rank == 0 else 0
    return int(reducer.sum_scalar(float(seed)))


def _sharded_split_indices(n: int, world_size: int, division: str, split: tuple[float, float, float],
                           seed: int) -> dict[str, np.ndarray]:
    """The row indices of each split over all ranks: each rank divides its own block of rows."""
    from .distributed import shard_bounds

    if world_size == 1:
        return split_indices(n, division, split, seed)
    parts: dict[str, list[np.ndarray]] = {}
    for rank in range(world_size):
        start, stop = shard_bounds(n, rank, world_size)
        for name, index in split_indices(stop - start, division, split, seed).items():
            parts.setdefault(name, []).append(index + start)
    return {name: np.concatenate(pieces) for name, pieces in parts.items()}


def _outputs(model: Any, X: np.ndarray) -> np.ndarray:
    reference = next(model.parameters())
    with torch.no_grad():
        return model(torch.from_numpy(X).to(reference)).cpu().numpy()


def _split_rows(task: Regression | Classification, splits: dict[str, np.ndarray], y: np.ndarray,
                outputs: np.ndarray, history: Any) -> list[dict[str, Any]]:
    """Metrics of the final model per split; for classes also the cross-entropy ``fit`` recorded for it."""
    kept = history[history.best_epoch]
    rows = []
    for name, index in [*splits.items(), ("All", np.arange(len(y)))]:
        row: dict[str, Any] = {"split": name, "samples": len(index)}
        if isinstance(task, Classification):
            row[task.loss] = kept.get(_LOSS_KEYS.get(name, "")) if name != "All" else _pooled(rows, task.loss)
        rows.append({**row, **task.metrics(y[index], outputs[index])})
    return rows


def _pooled(rows: list[dict[str, Any]], key: str) -> float | None:
    """The per-sample mean ``key`` over all splits, from each split's mean (one output per sample's loss)."""
    values = [row.get(key) for row in rows]
    if not rows or any(not isinstance(v, float) or not math.isfinite(v) for v in values):
        return None
    return sum(row["samples"] * value for row, value in zip(rows, values)) / sum(row["samples"] for row in rows)


def _options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"hidden": args.hidden, "method": args.method, "epochs": args.epochs, "goal": args.goal,
            "max_fail": args.max_fail, "division": args.division, "split": list(args.split), "loss": args.loss,
            "seed": seed, "device": args.device}


@dataclass
class FitRecord:
    """What ``marquardt fit`` learned and measured, for the model metadata, report and summary."""

    data: str
    features: list[str]
    task: Regression | Classification
    options: dict[str, Any]
    history: Any
    rows: list[dict[str, Any]]
    timings: dict[str, float]
    resumed: int = 0  # the checkpoint's epoch this run continued from (0: a fresh start)

    @property
    def trained(self) -> str:
        """The epochs trained by this run, for the timings: ``"784"``, or ``"777 to 784"`` after a resume."""
        last = self.history.last["epoch"]
        return f"{self.resumed} to {last}" if self.resumed else str(last)

    @property
    def seconds_per_epoch(self) -> float:
        return self.timings["train_s"] / max(self.history.last["epoch"] - self.resumed, 1)

    def metadata(self) -> dict[str, Any]:
        # Strict JSON, like the History's to_dict: a metric that does not apply (R^2 of a constant
        # target) is null, not NaN.
        metrics = [{key: _finite_or_none(value) for key, value in row.items()} for row in self.rows]
        return {"cli": {"data": str(self.data), "features": self.features, **self.task.metadata(),
                        "options": self.options, "metrics": metrics, "timings": self.timings},
                "history": self.history.to_dict()}


def write_fit_outputs(out: Path, model: Any, record: FitRecord, splits: dict[str, np.ndarray],
                      y: np.ndarray, outputs: np.ndarray) -> list[Path]:
    """Write ``model.safetensors``/``model.json``, the plots and ``report.md`` to ``out``."""
    from .io import save

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    written = [save(model, out / _MODEL_STEM, metadata=record.metadata())]
    written.append(written[0].with_suffix(".json"))
    written += _write_plots(out, record, splits, *record.task.plot_pairs(y, outputs))
    record.timings["write_s"] = time.perf_counter() - start
    report = out / "report.md"
    text = format_report(record, written).encode("utf-8")
    _atomic_write(report, lambda tmp: tmp.write_bytes(text))
    return [*written, report]


def _write_plots(out: Path, record: FitRecord, splits: dict[str, np.ndarray], targets: np.ndarray,
                 outputs: np.ndarray) -> list[Path]:
    from .plot import plot_error_histogram, plot_performance, plot_regression, plot_training_state

    pairs = {name: (targets[index], outputs[index]) for name, index in splits.items()}
    paths = [out / name for name in _PLOTS]
    plot_performance(record.history, path=paths[0])
    plot_training_state(record.history, path=paths[1])
    plot_regression(pairs, path=paths[2])
    plot_error_histogram(pairs, path=paths[3])
    return paths


def format_report(record: FitRecord, written: Sequence[Path]) -> str:
    """``report.md``: data, network, metrics per split, stop reason, timings, files."""
    history, options = record.history, record.options
    epochs = history.last["epoch"]
    train_s = record.timings["train_s"]
    lines = [
        "# marquardt fit report",
        "",
        f"- data: `{record.data}`, {record.rows[-1]['samples']} samples",
        f"- features ({len(record.features)}): {', '.join(record.features)}",
        f"- targets: {', '.join(record.task.targets)}"
        + (f" (classes: {', '.join(record.task.classes)})" if isinstance(record.task, Classification) else ""),
        f"- network: mlp {len(record.features)}-{'-'.join(map(str, options['hidden']))}-{record.task.n_outputs}, "
        f"method {options['method']}, loss {options['loss']}",
        f"- division: {options['division']} {'/'.join(f'{s:g}' for s in options['split'])}, seed {options['seed']}, "
        f"device {options['device']}",
        "",
        "## Result",
        "",
        f"Stop reason: {history.stop_reason} Epochs: {epochs}; best epoch: {history.best_epoch}."
        + (f" Resumed from the checkpoint of epoch {record.resumed}." if record.resumed else ""),
        "",
        format_table(record.rows, markdown=True),
        "",
        "## Timings",
        "",
        format_table([
            {"step": "read CSV", "seconds": record.timings["read_s"]},
            {"step": f"training (epochs {record.trained})", "seconds": train_s},
            {"step": "per epoch", "seconds": record.seconds_per_epoch},
            {"step": "save model and plots", "seconds": record.timings["write_s"]},
        ], markdown=True),
        "",
        "## Files",
        "",
        *[f"- `{path.name}`" for path in written],
        "- `report.md`",
        "",
    ]
    return "\n".join(lines)


def _print_summary(record: FitRecord, written: Sequence[Path]) -> None:
    history = record.history
    print(format_table(record.rows))
    print(f"stop reason: {history.stop_reason} epochs: {history.last['epoch']}, best epoch: {history.best_epoch}, "
          f"training time: {record.timings['train_s']:.3g} s"
          + (f" (epochs {record.trained}, resumed from the checkpoint)" if record.resumed else ""))
    print(f"wrote {', '.join(str(path) for path in written)}")


def _load_model(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    from .io import load, load_metadata

    path = model_dir / f"{_MODEL_STEM}.safetensors"
    if not path.is_file():
        raise UsageError(f"{path} does not exist; train a model with `marquardt fit DATA.csv --target COL --out "
                         f"{model_dir}`")
    try:
        meta = load_metadata(path)
        model = load(path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not isinstance(meta, dict) or "cli" not in meta:
        raise UsageError(f"{path} has no feature names in its metadata; was it written by `marquardt fit`?")
    cli = _check_cli_metadata(path.with_suffix(".json"), meta["cli"])
    _check_cli_sizes(path.with_suffix(".json"), cli, model)
    return model, cli


def _check_cli_sizes(file: Path, cli: dict[str, Any], model: Any) -> None:
    """The feature, target and class counts of ``metadata.cli`` against the network's inputs and
    outputs: a hand-edited list of another length was a shape error traceback at the first
    forward pass."""
    if cli["task"] == "regression":
        outputs = len(cli["targets"])
    else:  # one logit for two classes, else one per class
        outputs = 1 if cli["loss"] == "binary_cross_entropy" else len(cli["classes"])
    for key, count, size in (("features", len(cli["features"]), getattr(model, "n_inputs", None)),
                             ("targets" if cli["task"] == "regression" else "classes", outputs,
                              getattr(model, "n_outputs", None))):
        if size is not None and count != size:
            side, what = ("inputs", "feature column names") if key == "features" else (
                "outputs", "target column names" if key == "targets" else "class labels")
            raise UsageError(f"{file}: metadata.cli.{key} is {cli[key]!r} ({count} {side}); expected a list of "
                             f"{size} {what} for this network of {size} {side}, as `marquardt fit` writes it")


def _check_cli_metadata(file: Path, cli: Any) -> dict[str, Any]:
    """``metadata.cli`` of a model file, with every key predict and evaluate read checked.

    A key missing or of another type (a hand-edited ``model.json``) was a KeyError or TypeError
    traceback; it is a UsageError naming the file, the key, what it holds and what it should.
    """
    if not isinstance(cli, dict):
        raise UsageError(f"{file}: metadata.cli is {cli!r}; expected an object with the task, loss, targets and "
                         "features, as `marquardt fit` writes it")
    for key, (valid, expected) in _cli_metadata_checks(cli).items():
        if key not in cli or not valid(cli[key]):
            found = "is missing" if key not in cli else f"is {cli[key]!r}"
            raise UsageError(f"{file}: metadata.cli.{key} {found}; expected {expected}, as `marquardt fit` writes it")
    return cli


def _cli_metadata_checks(cli: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Each key of ``metadata.cli`` with its test and what it should hold, in the order checked:
    the task first, and the loss before the classes, as what they may hold depends on them."""
    checks: dict[str, tuple[Any, str]] = {"task": (lambda v: v in ("regression", "classification"),
                                                   "'regression' or 'classification'")}
    if cli.get("task") == "regression":
        checks["loss"] = (lambda v: v == "mse", "'mse' for a regression")
        checks["targets"] = (_is_names, "a non-empty list of target column names")
    else:
        checks["loss"] = (lambda v: v in _LOSSES[1:], "'cross_entropy' or 'binary_cross_entropy' for a classification")
        checks["targets"] = (lambda v: _is_names(v) and len(v) == 1, "a list of one target column name")
        if cli.get("loss") == "binary_cross_entropy":  # one logit: two classes exactly
            checks["classes"] = (lambda v: _is_names(v) and len(v) == 2, "a list of two class labels")
        else:
            checks["classes"] = (lambda v: _is_names(v) and len(v) >= 2, "a list of at least two class labels")
    checks["features"] = (_is_names, "a non-empty list of feature column names")
    return checks


def _is_names(value: Any) -> bool:
    """A non-empty list of strings (column names, class labels)."""
    return isinstance(value, list) and bool(value) and all(isinstance(name, str) for name in value)


def _model_inputs(model_dir: Path, data: str) -> tuple[Any, dict[str, Any], Table, np.ndarray]:
    model, meta = _load_model(model_dir)
    table = read_table(data)
    features = _check_columns(table, meta["features"], f"the model in {model_dir} needs feature")
    return model, meta, table, table.numbers(features)


def run_predict(args: argparse.Namespace) -> int:
    """``marquardt predict``: one output row per input row (labels and probabilities for classes)."""
    model, meta, _, X = _model_inputs(args.model_dir, args.data)
    header, rows = _task_from_metadata(meta).prediction_columns(_outputs(model, X))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    if args.output == "-":  # to standard output, for a pipe; the note goes to standard error
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        print(f"wrote {len(rows)} predictions to standard output", file=sys.stderr)
        return 0
    if not args.output:
        raise UsageError("-o '': expected the path of the CSV file to write, or '-' for standard output")
    output = Path(args.output)
    if output.exists() and Path(args.data).exists() and output.samefile(args.data):
        raise UsageError(f"-o {args.output} is the data file {args.data}; writing the predictions there would "
                         "replace the data: pass another file")
    if output.parent and not output.parent.is_dir():
        raise UsageError(f"-o {args.output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"-o {args.output} is a folder; pass the path of the CSV file to write")
    try:  # atomically: an interrupted run leaves the old file or none, never half a CSV
        _atomic_write(output, lambda tmp: tmp.write_bytes(data))
    except OSError as error:
        raise UsageError(f"-o {args.output}: cannot write it: {error.strerror or error}") from None
    # Not into the predictions: -o /dev/stdout writes them where this note would go.
    note = sys.stderr if _is_stream(output) else sys.stdout
    print(f"wrote {len(rows)} predictions to {output}", file=note)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``marquardt evaluate``: MSE, RMSE and R^2, or accuracy, on a CSV file with targets."""
    model, meta, table, X = _model_inputs(args.model_dir, args.data)
    task = _task_from_metadata(meta)
    _check_columns(table, task.targets, f"the model in {args.model_dir} needs target")
    metrics = task.metrics(task.encode(table), _outputs(model, X))
    print(format_table([{"metric": name, "value": value} for name, value in metrics.items()]))
    print(f"on {len(table)} samples of {args.data}")
    return 0
