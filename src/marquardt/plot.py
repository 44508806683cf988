"""Training plots in the style of MATLAB's plotperform, plottrainstate, plotregression,
ploterrhist and plotfit.

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path=``, also saves it
atomically: the image is written to a temporary file in the same directory and moved into place
with ``os.replace``. The suffix picks the format (``.png``, ``.pdf``, ``.svg``, ...; PNG when there
is none). A ``path`` that cannot be written (a suffix that names no format, a missing
directory) is refused before anything is drawn or a model is evaluated.

matplotlib is imported only when a plot is made, and only ``matplotlib.figure`` and the Agg
canvas: ``matplotlib.pyplot`` is never imported, so no global backend is chosen or changed, no
window is opened and nothing needs a display. To show a figure in a notebook, let it be the
cell's value; in a script, save it with ``path=``.

Examples
--------
>>> from marquardt.history import History
>>> h = History("lm")
>>> for epoch, (perf, vperf) in enumerate([(1.0, 1.2), (0.1, 0.2), (0.01, 0.05), (0.005, 0.06)]):
...     h.append(epoch=epoch, perf=perf, vperf=vperf, damping=1e-3, gradient=perf, val_fail=0)
>>> fig = plot_performance(h)
>>> fig.axes[0].get_title()
'Best Validation Performance is 0.05 at epoch 2'
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from marquardt.history import History
from marquardt.io import _atomic_write
from marquardt.network import evaluation_mode

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_performance",
    "plot_training_state",
    "plot_regression",
    "plot_error_histogram",
    "plot_fit",
    "plot_comparison",
]

ArrayLike = npt.ArrayLike | torch.Tensor
PathLike = str | os.PathLike[str]
# Either one (targets, outputs) pair, or named splits {"Training": (t, o), ...}.
Splits = dict[str | None, tuple[np.ndarray, np.ndarray]]

# MATLAB's colours: training blue, validation green, test red, all data black.
_SPLIT_COLORS = {
    "Training": "tab:blue", "Validation": "tab:green", "Test": "tab:red", "All": "black",
}
_PERF_SERIES = (
    ("perf", "Train", "tab:blue"),
    ("vperf", "Validation", "tab:green"),
    ("tperf", "Test", "tab:red"),
)
# (key, MATLAB panel name, log scale), in MATLAB's plottrainstate order.
_STATE_PANELS = (
    ("gradient", "Gradient", True),
    ("damping", "Mu", True),
    ("lr", "Learning Rate", True),
    ("gamma", "Num Parameters", False),
    ("ssw", "Sum Squared Param", True),
    ("val_fail", "Validation Checks", False),
)
_MATPLOTLIB_HINT = "marquardt.plot needs matplotlib: pip install matplotlib (or pip install 'marquardt[plot]')"
_MSE_LABEL = "Mean Squared Error (mse)"
# Not MATLAB's "(crossentropy)": fit's softmax cross-entropy is a mean per sample, K times
# MATLAB's mean per element for K classes (the binary one agrees); the label claims neither.
_CE_LABEL = "Cross-Entropy"


# --------------------------------------------------------------------------- public plots


def plot_performance(
    history: History,
    *,
    path: PathLike | None = None,
    title: str | None = None,
    goal: float | None = None,
) -> Figure:
    """Training, validation and test performance against epoch (MATLAB's ``plotperform``).

    Parameters
    ----------
    history : History
        Training record with ``perf`` and, when available, ``vperf`` and ``tperf``.
    path : str or path-like, optional
        Where to save the figure; the suffix picks the format (PNG when there is none).
    title : str, optional
        Figure title; by default ``"Best Validation Performance is X at epoch N"``
        (``Training`` when there is no validation data).
    goal : float, optional
        The performance goal the run was given (``fit``'s ``goal``; a History does not hold
        it): a value > 0 is drawn as a dotted black ``Goal`` line, as ``plotperform`` draws
        ``tr.goal``. ``None`` or 0 draws none.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    The best epoch is ``history.best_epoch`` when set, otherwise the epoch of lowest
    validation performance (training performance without a validation set). It is marked
    with a dotted vertical line and a circle. The y axis is logarithmic. The epoch axis
    has integer ticks and spans at least one epoch (``plotperform``'s ``[0 max(1,N)]``), and
    a curve with a single finite value (a run stopped at epoch 0) is drawn as a point.

    Examples
    --------
    >>> from marquardt.history import History
    >>> h = History()
    >>> for e, p in enumerate([1.0, 0.3, 0.05]):
    ...     h.append(epoch=e, perf=p)
    >>> ax = plot_performance(h).axes[0]
    >>> ax.get_yscale(), ax.get_title()
    ('log', 'Best Training Performance is 0.05 at epoch 2')
    """
    _check_path(path)
    goal = _check_goal(goal)
    _check_history(history)
    best_index, best_key = _best(history)
    epochs = _epochs(history)
    fig, axes = _new_figure()
    ax = axes[0, 0]
    for key, label, color in _PERF_SERIES:
        if _has_data(history, key):
            values = _series(history, key)
            ax.plot(epochs, values, color=color, linewidth=2, label=label, marker=_lone_point_marker(values))
    best_value = _series(history, best_key)[best_index]
    _mark_best(ax, epochs[best_index], best_value, validation=best_key == "vperf")
    if goal is not None:
        ax.axhline(goal, color="black", linestyle=":", label="Goal")
    _log_scale_if_positive(ax, [_series(history, key) for key, _, _ in _PERF_SERIES if key in history])
    _epoch_axis(ax, epochs)
    ax.set_xlabel(f"{_int_text(epochs[-1])} Epochs")
    ax.set_ylabel(_perf_label([history]))
    split = "Validation" if best_key == "vperf" else "Training"
    best_epoch = _int_text(epochs[best_index])
    ax.set_title(title if title is not None else
                 f"Best {split} Performance is {best_value:.4g} at epoch {best_epoch}")
    ax.legend(loc="upper right")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def plot_training_state(history: History, *, path: PathLike | None = None) -> Figure:
    """Stacked panels of the optimizer state against epoch (MATLAB's ``plottrainstate``).

    Panels, each drawn only when the history has values for it: gradient norm (log),
    damping ``mu`` (log), learning rate ``lr`` (log), effective number of parameters
    ``gamma`` and sum of squared weights ``ssw`` (Bayesian regularization), and validation
    failures ``val_fail``. Each panel's title gives the final value, as MATLAB does.

    Parameters
    ----------
    history : History
        Training record.
    path : str or path-like, optional
        Where to save the figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If the history is empty or has none of the keys above.

    Examples
    --------
    >>> from marquardt.history import History
    >>> h = History("br")
    >>> for e in range(4):
    ...     h.append(epoch=e, gradient=10.0 ** -e, damping=1e-3, gamma=3.0 + e, ssw=1.0, val_fail=0)
    >>> [ax.get_title() for ax in plot_training_state(h).axes][:2]
    ['Gradient = 0.001, at epoch 3', 'Mu = 0.001, at epoch 3']
    """
    _check_path(path)
    _check_history(history)
    panels = [panel for panel in _STATE_PANELS if _has_data(history, panel[0])]
    if not panels:
        raise ValueError(
            "history has no training-state values to plot; expected at least one of "
            f"{[key for key, _, _ in _STATE_PANELS]}, found keys {history.keys()}"
        )
    epochs = _epochs(history)
    fig, axes = _new_figure(len(panels), 1, figsize=(6.4, 1.6 * len(panels) + 0.8), sharex=True)
    for ax, (key, name, log) in zip(axes[:, 0], panels):
        _state_panel(ax, epochs, _series(history, key), name=name, ylabel=key, log=log)
    _epoch_axis(axes[-1, 0], epochs)  # the panels share x
    axes[-1, 0].set_xlabel(f"{_int_text(epochs[-1])} Epochs")
    return _finish(fig, path)


def plot_regression(
    targets: ArrayLike | Mapping[str, Any],
    outputs: ArrayLike | Mapping[str, ArrayLike] | None = None,
    *,
    path: PathLike | None = None,
) -> Figure:
    """Outputs against targets with the fitted line and the correlation R (``plotregression``).

    Parameters
    ----------
    targets : array, tensor or dict
        Targets (flattened), or a dict of splits ``{"Training": (t, o), "Validation":
        (t, o), "Test": (t, o)}`` giving one panel per split plus an ``"All"`` panel.
        With a dict of target arrays, pass a dict of output arrays with the same keys
        as ``outputs``.
    outputs : array, tensor or dict, optional
        Network outputs, the shape of ``targets`` (dimensions of size 1 aside: ``(N,)``
        and ``(N, 1)`` pair up); omitted when ``targets`` is a dict of ``(t, o)`` pairs.
    path : str or path-like, optional
        Where to save the figure.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    The fit is the least-squares line ``o = m t + b`` with ``m = cov(t, o) / var(t)``, and
    ``R = cov(t, o) / (std(t) std(o))`` is Pearson's correlation, as in MATLAB. A perfect
    network lies on the dashed ``Y = T`` line with ``R = 1``. Pairs whose target or output is
    NaN or infinite are left out of the fit and of R, as MATLAB leaves out NaN targets.

    Examples
    --------
    >>> t = np.linspace(0.0, 1.0, 50)
    >>> fig = plot_regression(t, 2 * t)
    >>> fig.axes[0].get_title()
    'R=1.00000'
    >>> fig = plot_regression({"Training": (t, t), "Test": (t, t + 0.1 * np.sin(9 * t))})
    >>> [ax.get_title().split(":")[0] for ax in fig.axes]
    ['Training', 'Test', 'All']
    """
    _check_path(path)
    splits = _splits(targets, outputs)
    if len(splits) > 1 and "All" not in splits:
        splits["All"] = _concat_splits(splits)
    ncols = 1 if len(splits) == 1 else 2
    nrows = math.ceil(len(splits) / ncols)
    fig, axes = _new_figure(nrows, ncols, figsize=(5.0 * ncols, 4.6 * nrows))
    for ax, (name, (t, o)) in zip(axes.flat, splits.items()):
        _regression_panel(ax, name, t, o)
    for ax in axes.flat[len(splits):]:
        fig.delaxes(ax)
    return _finish(fig, path)


def plot_error_histogram(
    targets: ArrayLike | Mapping[str, Any],
    outputs: ArrayLike | Mapping[str, ArrayLike] | None = None,
    *,
    bins: int = 20,
    path: PathLike | None = None,
) -> Figure:
    """Histogram of the errors ``targets - outputs`` with a zero-error line (``ploterrhist``).

    Parameters
    ----------
    targets, outputs
        As in :func:`plot_regression`. With a dict of splits, the bars are stacked with one
        colour per split.
    bins : int, default 20
        Number of bins, shared by all splits.
    path : str or path-like, optional
        Where to save the figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> t = rng.normal(size=200)
    >>> fig = plot_error_histogram({"Training": (t[:150], t[:150] + 0.1 * rng.normal(size=150)),
    ...                             "Test": (t[150:], t[150:] + 0.2 * rng.normal(size=50))})
    >>> fig.axes[0].get_title()
    'Error Histogram with 20 Bins'
    """
    _check_path(path)
    if not _is_integer(bins) or bins < 1:
        raise ValueError(f"Invalid bins: {bins!r}; expected a positive integer")
    bins = int(bins)
    errors = {name: t - o for name, (t, o) in _splits(targets, outputs).items()}
    finite = np.concatenate([e[np.isfinite(e)] for e in errors.values()])
    if finite.size == 0:
        raise ValueError("All errors are NaN or infinite; there is nothing to histogram")
    edges = np.histogram_bin_edges(finite, bins=bins)
    fig, axes = _new_figure()
    ax = axes[0, 0]
    ax.hist([e[np.isfinite(e)] for e in errors.values()], bins=edges, stacked=True,
            color=[_split_color(name) for name in errors],
            label=[name or "Errors" for name in errors], edgecolor="black", linewidth=0.5)
    ax.axvline(0.0, color="tab:orange", linewidth=2, label="Zero Error")
    ax.set_title(f"Error Histogram with {bins} Bins")
    ax.set_xlabel("Errors = Targets - Outputs")
    ax.set_ylabel("Instances")
    ax.legend(loc="upper right")
    return _finish(fig, path)


def plot_fit(
    model: Callable[[torch.Tensor], torch.Tensor],
    X: ArrayLike,
    y: ArrayLike,
    *,
    path: PathLike | None = None,
    grid_points: int = 200,
) -> Figure:
    """Data, network output on a dense grid, and errors at the data (MATLAB's ``plotfit``).

    Parameters
    ----------
    model : torch.nn.Module or callable
        Network with one input and one output; called on tensors of shape ``(M, 1)``.
    X : array or tensor, shape (N,) or (N, 1)
        Inputs.
    y : array or tensor, shape (N,) or (N, 1)
        Targets.
    path : str or path-like, optional
        Where to save the figure.
    grid_points : int, default 200
        Number of points of the grid over ``[min(X), max(X)]`` on which the output is drawn.

    Returns
    -------
    matplotlib.figure.Figure
        Upper axes: targets and network output; lower axes: errors ``y - model(X)``.

    Raises
    ------
    ValueError
        If the input or the target is not one-dimensional, or their lengths differ.

    Notes
    -----
    The model is called under ``torch.no_grad()`` with inputs of the dtype and device of its
    first floating-point parameter, and an ``nn.Module`` is put in eval mode for the call
    (dropout off, batch norm frozen); each submodule's mode is restored afterwards.

    Examples
    --------
    >>> model = torch.nn.Linear(1, 1)
    >>> X = torch.linspace(-1.0, 1.0, 20).reshape(-1, 1)
    >>> fig = plot_fit(model, X, 3 * X)
    >>> len(fig.axes)
    2
    """
    _check_path(path)
    if not callable(model):
        raise TypeError(
            f"model must be a torch.nn.Module or callable; received {type(model).__name__}"
        )
    if not _is_integer(grid_points) or grid_points < 2:
        raise ValueError(f"Invalid grid_points: {grid_points!r}; expected an integer >= 2")
    grid_points = int(grid_points)
    x, t = _fit_data(X, y)
    grid = _input_grid(x, grid_points)
    out_data, out_grid = _predict(model, x), _predict(model, grid)
    fig, axes = _new_figure(2, 1, figsize=(6.4, 6.0), sharex=True, height_ratios=(3, 1))
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot(x, t, "o", color="tab:blue", markerfacecolor="none", label="Targets")
    top.plot(grid, out_grid, "-", color="black", linewidth=1.5, label="Network output")
    top.set_title("Function Fit")
    top.set_ylabel("Output and Target")
    top.legend(loc="upper right")
    _error_panel(bottom, x, t - out_data)
    return _finish(fig, path)


def plot_comparison(
    histories: Mapping[str, History],
    *,
    x: str = "epoch",
    key: str = "perf",
    path: PathLike | None = None,
) -> Figure:
    """Performance of several training methods on one log-scale axes.

    Parameters
    ----------
    histories : dict of str to History
        Label -> training record, e.g. ``{"LM": h_lm, "Momentum": h_mom, "GD": h_gd}``.
    x : {"epoch", "time"}, default "epoch"
        Horizontal axis: epoch number, or seconds since the start (the ``time`` key).
    key : str, default "perf"
        History key to plot (``"vperf"`` compares validation performance).
    path : str or path-like, optional
        Where to save the figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If ``histories`` is empty, a history is empty or lacks ``key``, ``x`` is not
        ``"epoch"`` or ``"time"``, or ``x="time"`` and a record has no time.

    Examples
    --------
    >>> from marquardt.history import History
    >>> fast, slow = History("lm"), History("gd")
    >>> for e in range(5):
    ...     fast.append(epoch=e, time=0.02 * e, perf=10.0 ** -e)
    ...     slow.append(epoch=e, time=0.01 * e, perf=1.0 / (1 + e))
    >>> ax = plot_comparison({"LM": fast, "GD": slow}, x="time").axes[0]
    >>> ax.get_xlabel(), ax.get_yscale()
    ('Time (s)', 'log')
    """
    _check_path(path)
    if not isinstance(histories, Mapping) or not histories:
        empty = " (empty)" if isinstance(histories, Mapping) else ""
        raise ValueError(
            "histories must be a non-empty dict of label -> History; "
            f"received {type(histories).__name__}{empty}"
        )
    if x not in ("epoch", "time"):
        raise ValueError(f"Invalid x: {x!r}; expected 'epoch' or 'time'")
    curves = {label: _comparison_curve(h, label, x=x, key=key) for label, h in histories.items()}
    fig, axes = _new_figure()
    ax = axes[0, 0]
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, linewidth=2, label=label, marker=_lone_point_marker(ys))
    _log_scale_if_positive(ax, [ys for _, ys in curves.values()])
    if x == "epoch":
        _epoch_axis(ax, np.concatenate([xs for xs, _ in curves.values()]))
    ax.set_xlabel("Epoch" if x == "epoch" else "Time (s)")
    ax.set_ylabel(_perf_label(histories.values()) if key == "perf" else key)
    ax.set_title(f"{'Training performance' if key == 'perf' else key} by method")
    ax.legend(loc="upper right")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


# --------------------------------------------------------------------------- figures


def _new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] = (6.4, 4.8),
    sharex: bool = False,
    height_ratios: tuple[float, ...] | None = None,
) -> tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas (no pyplot, no global backend) and a 2-D array of axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_MATPLOTLIB_HINT) from exc
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    gridspec = None if height_ratios is None else {"height_ratios": height_ratios}
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, gridspec_kw=gridspec)
    return fig, axes


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    """Save ``fig`` atomically when a path is given; the format follows the suffix (PNG default)."""
    if path is not None:
        fmt = _image_format(path)
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100))
    return fig


def _image_format(path: PathLike) -> str:
    return Path(path).suffix.lstrip(".").lower() or "png"


def _check_path(path: Any) -> None:
    """Refuse a ``path`` the figure could not be saved to, before anything is drawn or evaluated."""
    if path is None:
        return
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Invalid path value: {path!r}; expected a str or path-like file name such as 'perf.png'")
    target = Path(path)
    formats = _supported_formats()
    if _image_format(target) not in formats:
        raise ValueError(
            f"Invalid path value: {str(target)!r}; its suffix {target.suffix!r} names no image format. "
            f"Expected no suffix (PNG) or one of {', '.join('.' + f for f in sorted(formats))}"
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write {str(target)!r}: directory {str(target.parent)!r} does not exist"
        )
    if target.is_dir():
        raise IsADirectoryError(f"Invalid path value: {str(target)!r} is a directory; expected a file name in it")


def _supported_formats() -> frozenset[str]:
    """File formats matplotlib's savefig writes (``png``, ``pdf``, ``svg``, ...)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ImportError(_MATPLOTLIB_HINT) from exc
    return frozenset(FigureCanvasBase.get_supported_filetypes())


def _log_scale_if_positive(ax: Axes, series: list[np.ndarray]) -> None:
    # A run that fits its data exactly records a performance of 0: with no positive value a log
    # axis has nothing to show (matplotlib warns and draws an empty panel), so it stays linear.
    if any((values[np.isfinite(values)] > 0).any() for values in series):
        _log_y(ax)


def _log_y(ax: Axes) -> None:
    """A log y axis that leaves out values <= 0, as MATLAB's ``semilogy`` does. matplotlib's
    default clips them to about 1e-300 instead: a performance of 0 at epoch 2 was drawn as a
    vertical drop just after epoch 1, off the bottom of the axes."""
    ax.set_yscale("log", nonpositive="mask")


def _epoch_axis(ax: Axes, epochs: np.ndarray) -> None:
    """Integer ticks over at least one epoch, as ``plotperform``'s ``xlim = [0 max(1,N)]``.

    Left to matplotlib, a run stopped at epoch 0 got an axis from -0.055 to 0.055 with ticks
    at -0.04 ... 0.04, and a one-epoch run ticks at 0.2, 0.4, ...: epochs that do not exist.
    """
    from matplotlib.ticker import MaxNLocator

    finite = epochs[np.isfinite(epochs)]
    first, last = float(finite.min()), float(finite.max())
    span = max(1.0, last - first)
    margin = 0.05 * span  # matplotlib's own margin, so that end markers are not cut in half
    ax.set_xlim(first - margin, first + span + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _lone_point_marker(values: np.ndarray) -> str | None:
    # A line through one point draws nothing: a run stopped at epoch 0 showed an empty axes.
    return "o" if np.isfinite(values).sum() == 1 else None


def _check_goal(goal: Any) -> float | None:
    """``goal`` as a float, None for no line (also for 0: ``plotperform`` draws no goal <= 0)."""
    if goal is None:
        return None
    if not isinstance(goal, numbers.Real) or isinstance(goal, (bool, np.bool_)) or not math.isfinite(goal) or goal < 0:
        raise ValueError(f"Invalid goal value: {goal!r}; expected None or a finite number >= 0 (fit's goal)")
    return float(goal) if goal > 0 else None


def _is_integer(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _int_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --------------------------------------------------------------------------- histories


def _check_history(history: Any, name: str = "history") -> None:
    if not isinstance(history, History):
        raise TypeError(f"{name} must be a marquardt History; received {type(history).__name__}")
    if len(history) == 0:
        raise ValueError(f"{name} is empty: it has no records to plot")


def _series(history: History, key: str) -> np.ndarray:
    """Column ``key`` as float64, NaN where a record has no value."""
    values = history[key]
    try:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"History key {key!r} holds non-numeric values; it cannot be plotted"
        ) from None


def _has_data(history: History, key: str) -> bool:
    return key in history and bool(np.isfinite(_series(history, key)).any())


def _perf_label(histories: Iterable[History]) -> str:
    """Axis label of ``perf``: classification runs record accuracy, and their performance is the
    mean cross-entropy; a mix of both kinds gets the neutral ``Performance``."""
    kinds = {_has_data(history, "accuracy") for history in histories}
    if kinds == {True}:
        return _CE_LABEL
    return _MSE_LABEL if kinds == {False} else "Performance"


def _epochs(history: History) -> np.ndarray:
    """The ``epoch`` column, or 0, 1, 2, ... when some record lacks it."""
    if "epoch" in history:
        epochs = _series(history, "epoch")
        if np.isfinite(epochs).all():
            return epochs
    return np.arange(len(history), dtype=np.float64)


def _best(history: History) -> tuple[int, str]:
    """Record index of the best epoch, and the key (``vperf`` or ``perf``) it is judged by."""
    key = "vperf" if _has_data(history, "vperf") else "perf"
    if not _has_data(history, key):
        raise ValueError(
            f"history has no 'perf' or 'vperf' values to plot; found keys {history.keys()}"
        )
    values = _series(history, key)
    if history.best_epoch is None:
        return int(np.nanargmin(values)), key
    matches = np.flatnonzero(_epochs(history) == history.best_epoch)
    if matches.size == 0:
        raise ValueError(
            f"history.best_epoch={history.best_epoch} is not the epoch of any record "
            f"(epochs {_int_text(_epochs(history)[0])}..{_int_text(_epochs(history)[-1])})"
        )
    index = int(matches[-1])
    return index, key if np.isfinite(values[index]) else "perf"


def _mark_best(ax: Axes, epoch: float, value: float, *, validation: bool) -> None:
    """Dotted vertical line and an open circle at the best epoch, as in ``plotperform``."""
    color = "tab:green" if validation else "tab:blue"
    ax.axvline(epoch, color=color, linestyle=":", label="Best")
    ax.plot(epoch, value, "o", color=color, markerfacecolor="none", markersize=12,
            markeredgewidth=2)


def _state_panel(ax: Axes, epochs: np.ndarray, values: np.ndarray, *,
                 name: str, ylabel: str, log: bool) -> None:
    ax.plot(epochs, values, "-", color="tab:blue",
            marker="." if len(values) <= 50 else _lone_point_marker(values))
    finite = np.flatnonzero(np.isfinite(values))
    last = finite[-1]
    ax.set_title(f"{name} = {values[last]:.4g}, at epoch {_int_text(epochs[last])}")
    ax.set_ylabel(ylabel)
    if log and (values[finite] > 0).any():
        _log_y(ax)
    elif ylabel == "val_fail":
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if values[finite].max() == 0:  # no failures: MaxNLocator alone puts ticks at +-0.04
            ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)


def _comparison_curve(
    history: Any, label: str, *, x: str, key: str
) -> tuple[np.ndarray, np.ndarray]:
    name = f"histories[{label!r}]"
    _check_history(history, name)
    if not _has_data(history, key):
        raise ValueError(f"{name} has no {key!r} values; found keys {history.keys()}")
    if x == "epoch":
        return _epochs(history), _series(history, key)
    times = _series(history, "time") if "time" in history else np.full(len(history), np.nan)
    if not np.isfinite(times).all():
        raise ValueError(f"{name} lacks 'time' in some records; use x='epoch' or record the time")
    return times, _series(history, key)


# --------------------------------------------------------------------------- targets/outputs


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """Float64 array of a tensor (any device/dtype), array or nested sequence."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be an array or tensor of numbers; received {type(value).__name__}"
        ) from None


def _pair(name: str | None, targets: Any, outputs: Any) -> tuple[np.ndarray, np.ndarray]:
    where = f" for split {name!r}" if name else ""
    t, o = _to_numpy(targets, "targets"), _to_numpy(outputs, "outputs")
    if t.size != o.size:
        raise ValueError(
            f"targets and outputs{where} must have the same number of elements; received "
            f"targets of shape {t.shape} and outputs of shape {o.shape}"
        )
    if t.size == 0:
        raise ValueError(f"targets and outputs{where} are empty; there is nothing to plot")
    # Same size is not enough: (outputs, samples) against (samples, outputs) would be flattened
    # in different orders and paired wrongly. Dimensions of size 1 may differ ((N,) vs (N, 1)).
    if _squeezed_shape(t) != _squeezed_shape(o):
        raise ValueError(
            f"targets and outputs{where} must have the same shape (dimensions of size 1 aside); "
            f"received targets of shape {t.shape} and outputs of shape {o.shape}. Transpose one of "
            "them so that both hold one row per sample"
        )
    return t.reshape(-1), o.reshape(-1)


def _squeezed_shape(array: np.ndarray) -> tuple[int, ...]:
    return tuple(size for size in array.shape if size != 1)


def _splits(targets: Any, outputs: Any) -> Splits:
    """Normalise the accepted call forms to ``{split name or None: (t, o)}``."""
    if not isinstance(targets, Mapping):
        if outputs is None:
            raise TypeError("outputs is required when targets is an array or tensor")
        return {None: _pair(None, targets, outputs)}
    if not targets:
        raise ValueError("targets is an empty dict; expected splits such as {'Training': (t, o)}")
    if isinstance(outputs, Mapping):
        if set(outputs) != set(targets):
            raise ValueError(
                f"targets and outputs must have the same splits; received {sorted(targets)} "
                f"and {sorted(outputs)}"
            )
        return {name: _pair(name, t, outputs[name]) for name, t in targets.items()}
    if outputs is not None:
        raise TypeError("outputs must be omitted or a dict when targets is a dict of splits")
    return {name: _pair(name, *_two(name, value)) for name, value in targets.items()}


def _two(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(
            f"split {name!r} must be a (targets, outputs) pair; received {type(value).__name__}"
        )
    return value[0], value[1]


def _concat_splits(splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([t for t, _ in splits.values()]),
            np.concatenate([o for _, o in splits.values()]))


def _split_color(name: str | None) -> str:
    return _SPLIT_COLORS.get(name or "Training", "tab:purple")


def _linear_fit(t: np.ndarray, o: np.ndarray) -> tuple[float, float, float]:
    """Slope and intercept of ``o ~ m t + b`` and Pearson's R over the finite pairs; NaN where undefined.

    A pair with a NaN or infinite target or output is left out, as MATLAB's ``regression``
    leaves out NaN ("don't care") targets and as :func:`plot_error_histogram` leaves out
    non-finite errors: one missing value would otherwise make R and the fit line NaN.
    """
    finite = np.isfinite(t) & np.isfinite(o)
    t, o = t[finite], o[finite]
    if t.size == 0:
        return math.nan, math.nan, math.nan
    tc, oc = t - t.mean(), o - o.mean()
    stt, soo, sto = float(tc @ tc), float(oc @ oc), float(tc @ oc)
    if stt == 0.0:
        return math.nan, math.nan, math.nan
    slope = sto / stt
    r = sto / math.sqrt(stt * soo) if soo > 0.0 else math.nan
    return slope, float(o.mean() - slope * t.mean()), r


def _regression_panel(ax: Axes, name: str | None, t: np.ndarray, o: np.ndarray) -> None:
    slope, intercept, r = _linear_fit(t, o)
    finite = np.concatenate([t, o])[np.isfinite(np.concatenate([t, o]))]
    ends = np.array([finite.min(), finite.max()]) if finite.size else np.array([0.0, 1.0])
    ax.plot(t, o, "o", color="black", markerfacecolor="none", markersize=4, label="Data")
    if math.isfinite(slope):
        ax.plot(ends, slope * ends + intercept, color=_split_color(name), linewidth=2, label="Fit")
        sign = "+" if intercept >= 0 else "-"
        ax.set_ylabel(f"Output ~= {slope:.2g}*Target {sign} {abs(intercept):.2g}")
    else:
        ax.set_ylabel("Output")
    ax.plot(ends, ends, "--", color="0.4", label="Y = T")
    if ends[1] > ends[0]:
        # Same limits on both axes, so that Y = T is the diagonal of a square panel.
        limits = ends + np.array([-0.05, 0.05]) * (ends[1] - ends[0])
        ax.set_xlim(*limits)
        ax.set_ylim(*limits)
    ax.set_xlabel("Target")
    ax.set_title(f"{name}: R={r:.5f}" if name else f"R={r:.5f}")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)


# --------------------------------------------------------------------------- plot_fit


def _fit_data(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, t = _column(X, "X", "input"), _column(y, "y", "target")
    if x.size != t.size:
        raise ValueError(
            f"X and y must have the same number of samples; received X of shape "
            f"{tuple(np.shape(X))} and y of shape {tuple(np.shape(y))}"
        )
    if x.size == 0:
        raise ValueError("X and y are empty; there is nothing to plot")
    return x, t


def _input_grid(x: np.ndarray, grid_points: int) -> np.ndarray:
    """``grid_points`` inputs over the finite range of ``x``: one NaN or infinite input would make
    every grid point NaN, and the network output line empty."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError("X has no finite values; there is no input range to draw the network output over")
    return np.linspace(finite.min(), finite.max(), grid_points)


def _column(value: Any, name: str, what: str) -> np.ndarray:
    array = _to_numpy(value, name)
    if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        return array.reshape(-1)
    raise ValueError(
        f"plot_fit needs a one-dimensional {what}: {name} must have shape (N,) or (N, 1); "
        f"received shape {array.shape}"
    )


def _predict(model: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
    dtype, device = _dtype_device(model)
    inputs = torch.as_tensor(x, dtype=dtype, device=device).reshape(-1, 1)
    with torch.no_grad(), evaluation_mode(model):
        out = torch.as_tensor(model(inputs))
    if out.numel() != inputs.shape[0]:
        raise ValueError(
            f"plot_fit needs a model with one output; for input of shape {tuple(inputs.shape)} "
            f"the model returned shape {tuple(out.shape)}"
        )
    return out.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)


def _error_panel(ax: Axes, x: np.ndarray, errors: np.ndarray) -> None:
    ax.vlines(x, 0.0, errors, color="tab:orange")
    ax.plot(x, errors, ".", color="tab:orange")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("Error")
    ax.set_xlabel("Input")


def _dtype_device(model: Any) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of the model's first floating-point parameter or buffer."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")
