"""The NIST StRD nonlinear regression problems: a parser, the 27 models, and the LRE score.

The Statistical Reference Datasets of the National Institute of Standards and Technology
(https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml) give, for 27 nonlinear regression
problems, the data, two starting points each, and parameters certified to 11 significant
digits. A solver is scored by the log relative error (LRE) of its estimate against the
certified values: ``LRE >= 4`` is the customary pass mark, ``LRE >= 6`` a good one.

The files are read from :func:`default_data_dir` (override with the ``MARQUARDT_NIST_DIR``
environment variable or the ``data_dir`` argument); the models are written here by hand from
the formulas in the file headers, as torch functions ``model(b, x) -> Tensor``.

Examples
--------
>>> import torch
>>> problem = load_problem("Misra1a")
>>> problem.difficulty, problem.x.shape, len(problem.certified)
('Lower', (14,), 2)
>>> fun = problem.residual_function()
>>> rss = float((fun(torch.as_tensor(problem.certified)) ** 2).sum())
>>> abs(rss - problem.certified_rss) / problem.certified_rss < 1e-6
True
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NistProblem",
    "PROBLEM_NAMES",
    "default_data_dir",
    "load_all",
    "load_problem",
    "lre",
    "parse_problem",
]

Model = Callable[[Tensor, Tensor], Tensor]

#: Largest LRE reported: float64 carries about 15.9 significant digits.
LRE_CAP = 15.0


# --------------------------------------------------------------------------------------------
# The models, written from the formulas in the file headers.
# --------------------------------------------------------------------------------------------


def _saturating_exponential(b: Tensor, x: Tensor) -> Tensor:
    # Misra1a, BoxBOD: y = b1*(1-exp[-b2*x])
    return b[0] * (1 - torch.exp(-b[1] * x))


def _chwirut(b: Tensor, x: Tensor) -> Tensor:
    # y = exp[-b1*x]/(b2+b3*x)
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _danwood(b: Tensor, x: Tensor) -> Tensor:
    # y = b1*x**b2
    return b[0] * x ** b[1]


def _misra1b(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 * (1-(1+b2*x/2)**(-2))
    return b[0] * (1 - (1 + b[1] * x / 2) ** -2)


def _misra1c(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 * (1-(1+2*b2*x)**(-.5))
    return b[0] * (1 - (1 + 2 * b[1] * x) ** -0.5)


def _misra1d(b: Tensor, x: Tensor) -> Tensor:
    # y = b1*b2*x*((1+b2*x)**(-1))
    return b[0] * b[1] * x / (1 + b[1] * x)


def _rat42(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 / (1+exp[b2-b3*x])
    return b[0] / (1 + torch.exp(b[1] - b[2] * x))


def _rat43(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 / ((1+exp[b2-b3*x])**(1/b4))
    return b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3])


def _eckerle4(b: Tensor, x: Tensor) -> Tensor:
    # y = (b1/b2) * exp[-0.5*((x-b3)/b2)**2]
    return (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2)


def _mgh09(b: Tensor, x: Tensor) -> Tensor:
    # y = b1*(x**2+x*b2) / (x**2+x*b3+b4)
    return b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3])


def _mgh10(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 * exp[b2/(x+b3)]
    return b[0] * torch.exp(b[1] / (x + b[2]))


def _mgh17(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 + b2*exp[-x*b4] + b3*exp[-x*b5]
    return b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4])


def _lanczos(b: Tensor, x: Tensor) -> Tensor:
    # y = b1*exp(-b2*x) + b3*exp(-b4*x) + b5*exp(-b6*x)
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(b: Tensor, x: Tensor) -> Tensor:
    # y = b1*exp(-b2*x) + b3*exp(-(x-b4)**2 / b5**2) + b6*exp(-(x-b7)**2 / b8**2)
    decay = b[0] * torch.exp(-b[1] * x)
    return (
        decay
        + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _kirby2(b: Tensor, x: Tensor) -> Tensor:
    # y = (b1 + b2*x + b3*x**2) / (1 + b4*x + b5*x**2)
    return (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2)


def _cubic_over_cubic(b: Tensor, x: Tensor) -> Tensor:
    # Hahn1, Thurber: y = (b1+b2*x+b3*x**2+b4*x**3) / (1+b5*x+b6*x**2+b7*x**3)
    numerator = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    return numerator / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3)


def _enso(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 + b2*cos(2 pi x/12) + b3*sin(2 pi x/12) + b5*cos(2 pi x/b4)
    #        + b6*sin(2 pi x/b4) + b8*cos(2 pi x/b7) + b9*sin(2 pi x/b7)
    annual = 2 * math.pi * x / 12
    cycle1 = 2 * math.pi * x / b[3]
    cycle2 = 2 * math.pi * x / b[6]
    return (
        b[0]
        + b[1] * torch.cos(annual)
        + b[2] * torch.sin(annual)
        + b[4] * torch.cos(cycle1)
        + b[5] * torch.sin(cycle1)
        + b[7] * torch.cos(cycle2)
        + b[8] * torch.sin(cycle2)
    )


def _roszman1(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 - b2*x - arctan[b3/(x-b4)]/pi
    return b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / math.pi


def _bennett5(b: Tensor, x: Tensor) -> Tensor:
    # y = b1 * (b2+x)**(-1/b3)
    return b[0] * (b[1] + x) ** (-1 / b[2])


def _nelson(b: Tensor, x: Tensor) -> Tensor:
    # log[y] = b1 - b2*x1 * exp[-b3*x2]; the model predicts log(y), see NistProblem.response
    return b[0] - b[1] * x[:, 0] * torch.exp(-b[2] * x[:, 1])


#: Every problem's model, in the order of the NIST web page (by difficulty, then name).
_MODELS: dict[str, Model] = {
    "Misra1a": _saturating_exponential,
    "Chwirut2": _chwirut,
    "Chwirut1": _chwirut,
    "Lanczos3": _lanczos,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "DanWood": _danwood,
    "Misra1b": _misra1b,
    "Kirby2": _kirby2,
    "Hahn1": _cubic_over_cubic,
    "Nelson": _nelson,
    "MGH17": _mgh17,
    "Lanczos1": _lanczos,
    "Lanczos2": _lanczos,
    "Gauss3": _gauss,
    "Misra1c": _misra1c,
    "Misra1d": _misra1d,
    "Roszman1": _roszman1,
    "ENSO": _enso,
    "MGH09": _mgh09,
    "Thurber": _cubic_over_cubic,
    "BoxBOD": _saturating_exponential,
    "Rat42": _rat42,
    "MGH10": _mgh10,
    "Eckerle4": _eckerle4,
    "Rat43": _rat43,
    "Bennett5": _bennett5,
}

#: Problems whose model predicts ``log(y)`` rather than ``y``.
_LOG_RESPONSE = frozenset({"Nelson"})

#: The 27 problem names.
PROBLEM_NAMES: tuple[str, ...] = tuple(_MODELS)


# --------------------------------------------------------------------------------------------
# The problem record.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NistProblem:
    """One NIST StRD nonlinear regression problem with its certified results.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"Misra1a"``.
    difficulty : {"Lower", "Average", "Higher"}
        NIST's level of difficulty.
    x : ndarray
        Predictors, float64, shape ``(N,)``, or ``(N, k)`` with ``k`` predictors (Nelson).
    y : ndarray
        Observed response, float64, shape ``(N,)``, as printed in the file.
    starts : tuple of ndarray
        Start 1 and Start 2, each float64 of shape ``(p,)``.
    certified : ndarray
        Certified parameter values, shape ``(p,)``.
    certified_stderr : ndarray
        Certified standard deviations of the parameters, shape ``(p,)``.
    certified_rss : float
        Certified residual sum of squares, ``sum((response - model)**2)``.
    model : callable
        ``model(b, x) -> Tensor`` of shape ``(N,)`` for parameters ``b`` of shape ``(p,)``.
    log_response : bool
        Whether the model predicts ``log(y)`` (Nelson) rather than ``y``.

    Notes
    -----
    The certified standard deviations are :math:`s\\sqrt{\\operatorname{diag}((J^T J)^{-1})}`
    with :math:`s^2 = \\mathrm{RSS} / (N - p)` and :math:`J` the Jacobian at the certified
    parameters.

    Examples
    --------
    >>> problem = load_problem("Nelson")
    >>> problem.x.shape, problem.log_response
    ((128, 2), True)
    """

    name: str
    difficulty: str
    x: np.ndarray
    y: np.ndarray
    starts: tuple[np.ndarray, np.ndarray]
    certified: np.ndarray
    certified_stderr: np.ndarray
    certified_rss: float
    model: Model
    log_response: bool = False

    @property
    def response(self) -> np.ndarray:
        """The quantity the model predicts: ``log(y)`` for Nelson, ``y`` otherwise."""
        return np.log(self.y) if self.log_response else self.y

    @property
    def n_params(self) -> int:
        """Number of parameters ``p``."""
        return len(self.certified)

    def residual_function(self, dtype: torch.dtype = torch.float64) -> Callable[[Tensor], Tensor]:
        """Return ``fun(b) = response - model(b, x)`` on tensors of ``dtype``.

        Parameters
        ----------
        dtype : torch.dtype, default torch.float64
            Dtype of the data tensors captured by ``fun``; ``b`` should have the same dtype.

        Returns
        -------
        callable
            ``fun(b: Tensor) -> Tensor`` of shape ``(N,)``.

        Examples
        --------
        >>> import torch
        >>> problem = load_problem("DanWood")
        >>> fun = problem.residual_function()
        >>> fun(torch.as_tensor(problem.starts[0])).shape
        torch.Size([6])
        """
        x = torch.as_tensor(self.x, dtype=dtype)
        response = torch.as_tensor(self.response, dtype=dtype)
        model = self.model

        def fun(b: Tensor) -> Tensor:
            return response - model(b, x)

        return fun


# --------------------------------------------------------------------------------------------
# Parsing.
# --------------------------------------------------------------------------------------------

_LINE_RANGE = r"\(lines\s+(\d+)\s+to\s+(\d+)\)"
_PARAMETER_LINE = re.compile(r"^\s*b(\d+)\s*=\s*(.*)$")


def _line_range(text: str, section: str) -> tuple[int, int]:
    """Return the 1-based inclusive line range the header gives for ``section``."""
    match = re.search(section + r"\s+" + _LINE_RANGE, text)
    if match is None:
        raise ValueError(f"NIST file header has no '{section} (lines a to b)' entry")
    return int(match.group(1)), int(match.group(2))


def _header_value(text: str, label: str) -> float:
    """Return the number that follows ``label:`` in the certified-values block."""
    match = re.search(re.escape(label) + r":\s*(\S+)", text)
    if match is None:
        raise ValueError(f"NIST file has no '{label}:' line")
    return float(match.group(1))


def _parameter_table(lines: list[str]) -> np.ndarray:
    """Return the ``(p, 4)`` table Start 1, Start 2, certified value, standard deviation."""
    rows = {}
    for line in lines:
        match = _PARAMETER_LINE.match(line)
        if match:
            rows[int(match.group(1))] = [float(v) for v in match.group(2).split()]
    if sorted(rows) != list(range(1, len(rows) + 1)) or any(len(r) != 4 for r in rows.values()):
        raise ValueError(f"malformed parameter lines: {rows}")
    return np.array([rows[i] for i in sorted(rows)], dtype=np.float64)


def _data_columns(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` from whitespace-separated ``y x1 [x2 ...]`` rows."""
    table = np.array([[float(v) for v in line.split()] for line in lines if line.strip()])
    x = table[:, 1] if table.shape[1] == 2 else table[:, 1:]
    return np.ascontiguousarray(x), np.ascontiguousarray(table[:, 0])


def parse_problem(text: str, name: str) -> NistProblem:
    """Parse the text of a NIST StRD ``.dat`` file into a :class:`NistProblem`.

    Parameters
    ----------
    text : str
        The whole file.
    name : str
        Dataset name; selects the model, so it must be one of :data:`PROBLEM_NAMES`.

    Returns
    -------
    NistProblem

    Raises
    ------
    KeyError
        If ``name`` is not a known problem.
    ValueError
        If the header lacks an expected entry or the data disagree with it.

    Examples
    --------
    >>> path = default_data_dir() / "Rat42.dat"
    >>> parse_problem(path.read_text(), "Rat42").starts[1].tolist()
    [75.0, 2.5, 0.07]
    """
    if name not in _MODELS:
        raise KeyError(f"unknown NIST problem {name!r}; expected one of {PROBLEM_NAMES}")
    lines = text.splitlines()
    first, last = _line_range(text, "Starting Values")
    params = _parameter_table(lines[first - 1 : last])
    first, last = _line_range(text, "Data")
    x, y = _data_columns(lines[first - 1 : last])
    n_obs = int(_header_value(text, "Number of Observations"))
    if len(y) != n_obs:
        raise ValueError(f"{name}: header promises {n_obs} observations, found {len(y)}")
    difficulty = re.search(r"(Lower|Average|Higher) Level of Difficulty", text)
    return NistProblem(
        name=name,
        difficulty=difficulty.group(1) if difficulty else "",
        x=x,
        y=y,
        starts=(params[:, 0].copy(), params[:, 1].copy()),
        certified=params[:, 2].copy(),
        certified_stderr=params[:, 3].copy(),
        certified_rss=_header_value(text, "Residual Sum of Squares"),
        model=_MODELS[name],
        log_response=name in _LOG_RESPONSE,
    )


# --------------------------------------------------------------------------------------------
# Loading (the I/O edge).
# --------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Return the directory holding the NIST ``.dat`` files.

    ``$MARQUARDT_NIST_DIR`` when set; otherwise the copy shipped with the package
    (``marquardt/data/nist_strd``: the 27 public-domain NIST StRD files, 152 KB).

    Examples
    --------
    >>> default_data_dir().name
    'nist_strd'
    """
    override = os.environ.get("MARQUARDT_NIST_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "data" / "nist_strd"


def load_problem(name: str, data_dir: str | os.PathLike | None = None) -> NistProblem:
    """Read ``<data_dir>/<name>.dat`` and return the problem.

    Parameters
    ----------
    name : str
        One of :data:`PROBLEM_NAMES`, e.g. ``"Thurber"``.
    data_dir : path-like, optional
        Directory of the ``.dat`` files; :func:`default_data_dir` when omitted.

    Returns
    -------
    NistProblem

    Raises
    ------
    KeyError
        If ``name`` is not a known problem.
    FileNotFoundError
        If the file is missing, with a hint on where the data are looked for.

    Examples
    --------
    >>> load_problem("Thurber").certified_rss
    5642.7082397
    """
    if name not in _MODELS:
        raise KeyError(f"unknown NIST problem {name!r}; expected one of {PROBLEM_NAMES}")
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    path = directory / f"{name}.dat"
    if not path.is_file():
        raise FileNotFoundError(
            f"NIST StRD file {path} not found; pass data_dir= or set MARQUARDT_NIST_DIR "
            "to the directory holding the 27 .dat files"
        )
    return parse_problem(path.read_text(), name)


def load_all(data_dir: str | os.PathLike | None = None) -> list[NistProblem]:
    """Load all 27 problems, in the order of :data:`PROBLEM_NAMES`.

    Examples
    --------
    >>> problems = load_all()
    >>> len(problems), sum(p.difficulty == "Higher" for p in problems)
    (27, 8)
    """
    return [load_problem(name, data_dir) for name in PROBLEM_NAMES]


# --------------------------------------------------------------------------------------------
# Scoring.
# --------------------------------------------------------------------------------------------


def lre(estimate, certified) -> float:
    """Log relative error: the number of correct significant digits, worst over parameters.

    Parameters
    ----------
    estimate, certified : array-like or Tensor
        Estimated and certified parameters, same shape.

    Returns
    -------
    float
        :math:`\\min_i -\\log_{10}(|b_i - c_i| / |c_i|)`, capped at :data:`LRE_CAP` for an
        exact match and clipped at 0 (no correct digit); 0 when ``estimate`` is not finite.

    Notes
    -----
    Follows McCullough (1998), "Assessing the reliability of statistical software". No
    certified NIST parameter is zero, so the relative error is always defined.

    Examples
    --------
    >>> round(lre([1.0001, 2.0], [1.0, 2.0]), 6)
    4.0
    >>> lre([1.0, 2.0], [1.0, 2.0])
    15.0
    >>> lre([float("nan"), 2.0], [1.0, 2.0])
    0.0
    """
    b = _as_float64(estimate)
    c = _as_float64(certified)
    if b.shape != c.shape:
        raise ValueError(f"estimate has shape {b.shape}, certified has shape {c.shape}")
    if not np.all(np.isfinite(b)):
        return 0.0
    with np.errstate(divide="ignore"):
        digits = -np.log10(np.abs(b - c) / np.abs(c))
    return float(np.clip(digits.min(), 0.0, LRE_CAP))


def _as_float64(value) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)
