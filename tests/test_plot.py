"""Tests for marquardt.plot: each plot rendered to PNG, checked by its axes and titles."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import marquardt.plot  # noqa: E402
from marquardt.history import History  # noqa: E402
from marquardt.plot import (  # noqa: E402
    plot_comparison,
    plot_error_histogram,
    plot_fit,
    plot_performance,
    plot_regression,
    plot_training_state,
)

MIN_PNG_BYTES = 5_000


def lm_history(epochs: int = 12, *, validation: bool = True) -> History:
    """Synthetic LM record: training falls steadily, validation bottoms out at epoch 7."""
    h = History("lm")
    for e in range(epochs):
        perf = 10.0 ** (-e / 4)
        record = dict(epoch=e, time=0.05 * e, perf=perf, damping=10.0 ** (-3 + e % 3),
                      gradient=3 * perf, val_fail=max(0, e - 7))
        if validation:
            record.update(vperf=0.02 + 0.001 * (e - 7) ** 2, tperf=0.03 + perf)
        h.append(record)
    h.best_epoch = 7 if validation else None
    h.stop_reason = "Validation stop."
    return h


def br_history() -> History:
    h = History("br")
    for e in range(8):
        h.append(epoch=e, perf=1.0 / (1 + e), damping=5e-3, gradient=0.5 ** e, val_fail=0,
                 gamma=4.0 + 0.5 * e, ssw=10.0 - e, solver="cholesky")
    return h


def splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    t = rng.normal(size=120)
    o = t + 0.1 * rng.normal(size=120)
    return {"Training": (t[:80], o[:80]), "Validation": (t[80:100], o[80:100]),
            "Test": (t[100:], o[100:])}


def assert_png(path) -> None:
    assert path.is_file()
    assert path.stat().st_size > MIN_PNG_BYTES
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == [path.name], "temporary file left behind"


def test_module_doctests():
    result = doctest.testmod(marquardt.plot)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- performance


def test_plot_performance_png_log_scale_and_best_epoch(tmp_path):
    path = tmp_path / "perf.png"
    fig = plot_performance(lm_history(), path=path)
    assert_png(path)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "Best Validation Performance is 0.02 at epoch 7"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Train", "Validation", "Test", "Best"]
    vertical = [ln for ln in ax.lines if ln.get_linestyle() == ":"]
    assert len(vertical) == 1 and set(vertical[0].get_xdata()) == {7}
    circle = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert len(circle) == 1 and list(circle[0].get_ydata()) == [pytest.approx(0.02)]


def test_plot_performance_without_validation_uses_training_minimum():
    ax = plot_performance(lm_history(validation=False)).axes[0]
    assert ax.get_title().startswith("Best Training Performance is ")
    assert ax.get_title().endswith("at epoch 11")
    assert len(ax.get_legend().get_texts()) == 2


@pytest.mark.parametrize("perf, scale", [([0.0, 0.0], "linear"), ([1.0, 0.1, 0.0], "log"), ([2.0, 1.0], "log")])
def test_performance_axes_are_log_only_with_positive_values(perf, scale, tmp_path):
    # A one-sample run meets goal=0 at epoch 0 with perf 0.0: nothing to draw on a log axis.
    history = History()
    for epoch, value in enumerate(perf):
        history.append(epoch=epoch, perf=value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Data has no positive values" warning
        fig = plot_performance(history, path=tmp_path / "perf.png")
        comparison = plot_comparison({"LM": history})
    assert fig.axes[0].get_yscale() == scale and comparison.axes[0].get_yscale() == scale
    assert fig.axes[0].get_title() == f"Best Training Performance is {min(perf):.4g} at epoch {perf.index(min(perf))}"


def test_plot_performance_custom_title():
    assert plot_performance(lm_history(), title="My run").axes[0].get_title() == "My run"


def test_plot_performance_goal_line_as_plotperform():
    # plotperform draws tr.goal as a dotted black 'Goal' line when goal > 0, none for goal 0.
    ax = plot_performance(lm_history(), goal=1e-3).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Train", "Validation", "Test", "Best", "Goal"]
    goal_line = [line for line in ax.get_lines() if line.get_label() == "Goal"][0]
    assert list(goal_line.get_ydata()) == [1e-3, 1e-3] and goal_line.get_linestyle() == ":"
    for goal in (None, 0, 0.0, np.float64(0.0)):
        ax = plot_performance(lm_history(), goal=goal).axes[0]
        assert "Goal" not in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Goal" in [t.get_text() for t in plot_performance(lm_history(), goal=np.float32(0.01)).axes[0]
                      .get_legend().get_texts()]


@pytest.mark.parametrize("goal", [-1.0, float("nan"), float("inf"), True, "0.1", [0.1]])
def test_plot_performance_bad_goal(goal):
    with pytest.raises(ValueError, match="Invalid goal value"):
        plot_performance(lm_history(), goal=goal)


def _visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


def short_history(epochs: int) -> History:
    """The first ``epochs`` records of :func:`lm_history`, best epoch unset (7 is not among them)."""
    history = lm_history(epochs)
    history.best_epoch = None
    return history


def _epoch_plots(history: History) -> list:
    """The epoch axis of each epoch-based plot: performance, training state, comparison."""
    return [plot_performance(history).axes[0], plot_training_state(history).axes[-1],
            plot_comparison({"LM": history}).axes[0]]


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_axes_have_integer_ticks_over_at_least_one_epoch(epochs):
    # plotperform's xlim is [0 max(1,N)]. Left to matplotlib, a run stopped at epoch 0 had an axis
    # from -0.055 to 0.055 ticked at -0.04 ... 0.04, and a one-epoch run ticked at 0.2, 0.4, ...
    history = short_history(epochs)
    for ax in _epoch_plots(history):
        low, high = ax.get_xlim()
        assert low < 0 < 1 < high, (epochs, ax.get_xlim())
        assert high < max(1, epochs - 1) + 0.5
        ticks = _visible_ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_epoch_axis_of_a_resumed_record_starts_at_its_first_epoch():
    history = History()
    for epoch in (5, 6, 7):
        history.append(epoch=epoch, perf=1.0 / epoch, damping=1e-3, gradient=1.0, val_fail=0)
    for ax in _epoch_plots(history):
        low, high = ax.get_xlim()
        assert 4 < low < 5 and 7 < high < 8
        assert all(float(t).is_integer() for t in _visible_ticks(ax))


def test_a_record_of_epoch_0_only_is_drawn_as_points():
    # A line through one point draws nothing: a run stopped at epoch 0 (epochs=0, time_limit=0)
    # showed only the Best marker, not its training, validation and test performance.
    history = short_history(1)
    ax = plot_performance(history).axes[0]
    curves = {line.get_label(): line for line in ax.get_lines() if line.get_label() in ("Train", "Validation", "Test")}
    assert set(curves) == {"Train", "Validation", "Test"}
    assert all(line.get_marker() == "o" for line in curves.values())
    assert all(line.get_marker() == "o" for line in plot_comparison({"LM": history}).axes[0].get_lines())
    assert all(line.get_marker() in (".", "o") for ax in plot_training_state(history).axes for line in ax.get_lines())
    # Longer records keep plotperform's plain lines.
    assert all(line.get_marker() in ("None", None, "") for line in plot_performance(lm_history()).axes[0].get_lines()
               if line.get_label() in ("Train", "Validation", "Test"))


# --------------------------------------------------------------------------- training state


def test_plot_training_state_lm_has_three_panels(tmp_path):
    path = tmp_path / "state.png"
    fig = plot_training_state(lm_history(), path=path)
    assert_png(path)
    assert [ax.get_ylabel() for ax in fig.axes] == ["gradient", "damping", "val_fail"]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear"]
    assert fig.axes[2].get_title() == "Validation Checks = 4, at epoch 11"


def test_plot_training_state_br_adds_gamma_and_ssw(tmp_path):
    path = tmp_path / "state_br.png"
    fig = plot_training_state(br_history(), path=path)
    assert_png(path)
    assert [ax.get_ylabel() for ax in fig.axes] == ["gradient", "damping", "gamma", "ssw", "val_fail"]
    assert fig.axes[2].get_title() == "Num Parameters = 7.5, at epoch 7"
    # trainbr's state_info: ssX on a log scale (it falls by orders of magnitude), gamk linear
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear", "log", "linear"]


def test_plot_training_state_no_validation_failures_keeps_integer_axis():
    h = History()
    for e in range(4):
        h.append(epoch=e, perf=1.0 / (e + 1), gradient=1.0, damping=1e-3, val_fail=0)
    ax = plot_training_state(h).axes[-1]
    assert ax.get_ylabel() == "val_fail"
    assert ax.get_ylim() == (0.0, 1.0)
    assert all(float(t).is_integer() for t in ax.get_yticks())


def test_plot_training_state_without_state_keys():
    h = History()
    h.append(epoch=0, perf=1.0)
    with pytest.raises(ValueError, match="no training-state values"):
        plot_training_state(h)


# --------------------------------------------------------------------------- regression


def test_plot_regression_single_pair(tmp_path):
    path = tmp_path / "regression.png"
    t = torch.linspace(-1.0, 1.0, 40).reshape(-1, 1)
    fig = plot_regression(t, 2 * t.reshape(-1) + 1, path=path)
    assert_png(path)
    (ax,) = fig.axes
    assert ax.get_title() == "R=1.00000"
    assert ax.get_ylabel() == "Output ~= 2*Target + 1"


def test_plot_regression_splits_add_all_panel(tmp_path):
    path = tmp_path / "regression_splits.png"
    fig = plot_regression(splits(), path=path)
    assert_png(path)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(":")[0] for t in titles] == ["Training", "Validation", "Test", "All"]
    assert all("R=0.99" in t for t in titles)


def test_plot_regression_r_matches_numpy():
    t, o = splits()["Training"]
    r = np.corrcoef(t, o)[0, 1]
    assert plot_regression(t, o).axes[0].get_title() == f"R={r:.5f}"


def test_plot_regression_leaves_out_non_finite_pairs():
    # One NaN target and one infinite output among 80 pairs: R and the fit line are those
    # of the 78 finite pairs (MATLAB's regression drops NaN targets), in the All panel too.
    t, o = (a.copy() for a in splits()["Training"])
    r = np.corrcoef(t[2:], o[2:])[0, 1]
    slope, intercept = np.polyfit(t[2:], o[2:], 1)
    t[0], o[1] = np.nan, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_regression({"Training": (t, o), "Test": (np.full(3, np.nan), np.ones(3))})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"Training: R={r:.5f}", "Test: R=nan", f"All: R={r:.5f}"]
    fit_line = next(line for line in fig.axes[0].lines if line.get_label() == "Fit")
    xs, ys = fit_line.get_data()
    np.testing.assert_allclose(ys, slope * xs + intercept, rtol=1e-12)


def test_plot_regression_pairs_samples_across_singleton_dimensions():
    # A MATLAB row of targets (1, N) against torch outputs (N, 1) and (N,): the same R.
    t, o = splits()["Training"]
    r = f"R={np.corrcoef(t, o)[0, 1]:.5f}"
    assert plot_regression(t[None, :], o[:, None]).axes[0].get_title() == r
    assert plot_regression(torch.as_tensor(t)[:, None], o).axes[0].get_title() == r


def test_plot_regression_dict_of_targets_and_dict_of_outputs():
    s = splits()
    fig = plot_regression({k: t for k, (t, _) in s.items()}, {k: o for k, (_, o) in s.items()})
    assert len(fig.axes) == 4


def test_plot_regression_constant_targets_has_no_fit_line():
    ax = plot_regression(np.ones(5), np.arange(5.0)).axes[0]
    assert ax.get_title() == "R=nan"
    assert ax.get_ylabel() == "Output"


# --------------------------------------------------------------------------- error histogram


def test_plot_error_histogram_stacks_splits(tmp_path):
    path = tmp_path / "errors.png"
    fig = plot_error_histogram(splits(), bins=15, path=path)
    assert_png(path)
    (ax,) = fig.axes
    assert ax.get_title() == "Error Histogram with 15 Bins"
    assert len(ax.patches) == 3 * 15
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Training", "Validation", "Test", "Zero Error"]
    zero = [ln for ln in ax.lines if set(ln.get_xdata()) == {0.0}]
    assert len(zero) == 1


def test_plot_error_histogram_single_pair_counts_all_errors():
    t, o = splits()["Training"]
    ax = plot_error_histogram(t, o).axes[0]
    assert sum(p.get_height() for p in ax.patches) == len(t)


def test_numpy_integer_bins_and_grid_points():
    t, o = splits()["Training"]
    ax = plot_error_histogram(t, o, bins=np.int64(7)).axes[0]
    assert ax.get_title() == "Error Histogram with 7 Bins" and len(ax.patches) == 7
    fig = plot_fit(lambda x: 2 * x, np.arange(3.0), np.arange(3.0), grid_points=np.int32(4))
    assert len(next(ln for ln in fig.axes[0].lines if ln.get_label() == "Network output").get_xdata()) == 4


# --------------------------------------------------------------------------- fit


def test_plot_fit_linear_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    X = torch.linspace(-2.0, 2.0, 25).reshape(-1, 1)
    path = tmp_path / "fit.png"
    fig = plot_fit(model, X, torch.sin(X), path=path)
    assert_png(path)
    top, bottom = fig.axes
    assert top.get_title() == "Function Fit"
    assert bottom.get_ylabel() == "Error"
    curve = top.lines[1]
    assert len(curve.get_xdata()) == 200
    with torch.no_grad():
        expected = model(torch.tensor([[-2.0]])).item()
    assert curve.get_ydata()[0] == pytest.approx(expected, rel=1e-6)


def test_plot_fit_uses_model_dtype_and_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    model = model.double().train()
    model[1].eval()  # mixed modes must come back as they were
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, m[1].training, m[0].training)))
    plot_fit(model, np.linspace(0.0, 1.0, 10), np.zeros(10))
    assert set(seen) == {(torch.float64, False, False)}
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_plot_fit_draws_the_output_over_the_finite_inputs(bad):
    X = np.array([1.0, bad, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_fit(lambda x: 2 * x, X, np.arange(3.0), grid_points=5)
    line = next(ln for ln in fig.axes[0].lines if ln.get_label() == "Network output")
    np.testing.assert_array_equal(line.get_xdata(), [1.0, 1.5, 2.0, 2.5, 3.0])
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 3.0, 4.0, 5.0, 6.0])


def test_plot_fit_accepts_plain_callable():
    fig = plot_fit(lambda x: x ** 2, [0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
    assert len(fig.axes) == 2


# --------------------------------------------------------------------------- comparison


def test_plot_comparison_by_epoch_and_time(tmp_path):
    gd = History("gd")
    for e in range(30):
        gd.append(epoch=e, time=0.01 * e, perf=1.0 / (1 + e))
    histories = {"LM": lm_history(), "GD": gd}
    path = tmp_path / "comparison.png"
    fig = plot_comparison(histories, path=path)
    assert_png(path)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "Epoch"
    assert [ln.get_label() for ln in ax.lines] == ["LM", "GD"]
    ax = plot_comparison(histories, x="time").axes[0]
    assert ax.get_xlabel() == "Time (s)"
    assert max(ax.lines[1].get_xdata()) == pytest.approx(0.29)


def test_plot_comparison_of_validation_performance():
    ax = plot_comparison({"LM": lm_history()}, key="vperf").axes[0]
    assert ax.get_ylabel() == "vperf"


def ce_history() -> History:
    """Synthetic cross-entropy record: classification runs record accuracy."""
    h = History("lm")
    for e in range(4):
        h.append(epoch=e, perf=0.7 / (1 + e), accuracy=0.5 + 0.1 * e, damping=1e-3, gradient=1.0)
    return h


@pytest.mark.parametrize(("histories", "label"), [
    ({"LM": ce_history(), "Momentum": ce_history()}, "Cross-Entropy"),
    ({"LM": lm_history(), "GD": lm_history()}, "Mean Squared Error (mse)"),
    ({"LM": ce_history(), "GD": lm_history()}, "Performance"),
])
def test_plot_comparison_labels_the_performance_of_the_loss(histories, label):
    assert plot_comparison(histories).axes[0].get_ylabel() == label


def test_plot_performance_of_a_classification_run_is_cross_entropy():
    assert plot_performance(ce_history()).axes[0].get_ylabel() == "Cross-Entropy"  # not MATLAB's per-element scale
    assert plot_performance(lm_history()).axes[0].get_ylabel() == "Mean Squared Error (mse)"


# --------------------------------------------------------------------------- bad inputs


def _no_time() -> History:
    h = History()
    h.append(epoch=0, perf=1.0)
    return h


BAD_INPUTS = [
    (plot_performance, (History(),), {}, ValueError, "history is empty"),
    (plot_performance, ([{"perf": 1.0}],), {}, TypeError, "must be a marquardt History; received list"),
    (plot_training_state, (History(),), {}, ValueError, "history is empty"),
    (plot_comparison, ({},), {}, ValueError, r"non-empty dict .* \(empty\)"),
    (plot_comparison, ({"LM": History()},), {}, ValueError, r"histories\['LM'\] is empty"),
    (plot_comparison, ({"LM": lm_history()},), {"x": "epochs"}, ValueError, "Invalid x: 'epochs'"),
    (plot_comparison, ({"A": _no_time()},), {"x": "time"}, ValueError, r"histories\['A'\] lacks 'time'"),
    (plot_comparison, ({"A": _no_time()},), {"key": "vperf"}, ValueError, "has no 'vperf' values"),
    (plot_regression, (np.ones(5), np.ones(4)), {}, ValueError,
     r"same number of elements; received targets of shape \(5,\) and outputs of shape \(4,\)"),
    (plot_regression, ({"Test": (np.ones((3, 2)), np.ones(5))},), {}, ValueError,
     r"for split 'Test'.*shape \(3, 2\) and outputs of shape \(5,\)"),
    (plot_regression, (np.ones(0), np.ones(0)), {}, ValueError, "are empty"),
    (plot_regression, (np.ones((2, 5)), np.ones((5, 2))), {}, ValueError,
     r"same shape \(dimensions of size 1 aside\); received targets of shape \(2, 5\) and outputs of shape \(5, 2\)"),
    (plot_error_histogram, ({"Test": (np.ones((3, 4)), np.ones((4, 3)))},), {}, ValueError,
     r"for split 'Test' must have the same shape.*Transpose one of them"),
    (plot_regression, (np.ones(3),), {}, TypeError, "outputs is required"),
    (plot_regression, ({},), {}, ValueError, "empty dict"),
    (plot_regression, ({"Training": np.ones(3)},), {}, TypeError, r"\(targets, outputs\) pair"),
    (plot_regression, ({"Training": np.ones(3)}, {"Test": np.ones(3)}), {}, ValueError, "same splits"),
    (plot_regression, (["a", "b"], [1.0, 2.0]), {}, TypeError, "targets must be an array"),
    (plot_error_histogram, (np.ones(3), np.ones(3)), {"bins": 0}, ValueError, "Invalid bins: 0"),
    (plot_error_histogram, (np.ones(3), np.ones(3)), {"bins": np.float64(5.0)}, ValueError,
     r"Invalid bins: np\.float64\(5\.0\); expected a positive integer"),
    (plot_error_histogram, (np.ones(3), np.ones(3)), {"bins": np.True_}, ValueError, r"Invalid bins: np\.True_"),
    (plot_error_histogram, (np.ones(3), np.ones(2)), {}, ValueError, r"shape \(3,\).*shape \(2,\)"),
    (plot_error_histogram, (np.full(2, np.nan), np.ones(2)), {}, ValueError, "NaN or infinite"),
    (plot_fit, (torch.nn.Linear(2, 1), np.ones((5, 2)), np.ones(5)), {}, ValueError,
     r"one-dimensional input: X must have shape \(N,\) or \(N, 1\); received shape \(5, 2\)"),
    (plot_fit, (torch.nn.Linear(1, 2), np.ones(5), np.ones((5, 2))), {}, ValueError,
     r"one-dimensional target: y must have shape"),
    (plot_fit, (torch.nn.Linear(1, 2), np.ones(5), np.ones(5)), {}, ValueError,
     r"one output; for input of shape \(5, 1\) the model returned shape \(5, 2\)"),
    (plot_fit, (torch.nn.Linear(1, 1), np.ones(5), np.ones(4)), {}, ValueError,
     r"same number of samples; received X of shape \(5,\) and y of shape \(4,\)"),
    (plot_fit, ("model", np.ones(5), np.ones(5)), {}, TypeError, "received str"),
    (plot_fit, (torch.nn.Linear(1, 1), np.full(3, np.nan), np.ones(3)), {}, ValueError, "X has no finite values"),
    (plot_fit, (torch.nn.Linear(1, 1), np.ones(5), np.ones(5)), {"grid_points": 1}, ValueError,
     "Invalid grid_points: 1"),
]


@pytest.mark.parametrize(("func", "args", "kwargs", "exc", "match"), BAD_INPUTS)
def test_bad_inputs(func, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        func(*args, **kwargs)


def test_best_epoch_not_in_history():
    h = lm_history()
    h.best_epoch = 99
    with pytest.raises(ValueError, match="best_epoch=99 is not the epoch of any record"):
        plot_performance(h)


# --------------------------------------------------------------------------- files and imports


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_performance(lm_history(), path=tmp_path / "missing" / "perf.png")


class _CountingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 2 * x


BAD_PATHS = [
    ("perf.xyz", ValueError, r"Invalid path value: '.*perf\.xyz'; its suffix '\.xyz' names no image format"),
    ("run.v2", ValueError, r"suffix '\.v2' names no image format.*\.pdf, .*\.png"),
    ("missing/perf.png", FileNotFoundError, "does not exist"),
    ("", IsADirectoryError, "is a directory"),
]


@pytest.mark.parametrize(("name", "exc", "match"), BAD_PATHS)
def test_unwritable_path_is_refused_before_the_model_is_evaluated(tmp_path, name, exc, match):
    # plot_fit calls the model: a path savefig cannot write must fail before that, and leave no file.
    model, x = _CountingModel(), torch.linspace(0.0, 1.0, 5)
    with pytest.raises(exc, match=match):
        plot_fit(model, x, 2 * x, path=tmp_path / name)
    assert model.calls == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("func, args", [
    (plot_performance, (lm_history(),)), (plot_training_state, (lm_history(),)),
    (plot_regression, (np.arange(3.0), np.arange(3.0))), (plot_error_histogram, (np.arange(3.0), np.ones(3))),
    (plot_comparison, ({"LM": lm_history()},)),
])
def test_every_plot_refuses_a_bad_path(tmp_path, func, args):
    with pytest.raises(ValueError, match="Invalid path value"):
        func(*args, path=tmp_path / "figure.txt")
    with pytest.raises(TypeError, match="Invalid path value: 3; expected a str or path-like"):
        func(*args, path=3)


def test_save_format_follows_suffix(tmp_path):
    path = tmp_path / "perf.svg"
    plot_performance(lm_history(), path=path)
    assert path.read_text().lstrip().startswith("<?xml")


def test_missing_matplotlib_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_performance(lm_history())


def test_import_and_plotting_do_not_import_pyplot():
    code = (
        "import sys\n"
        "import marquardt.plot\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "from marquardt.history import History\n"
        "h = History(); h.append(epoch=0, perf=1.0); h.append(epoch=1, perf=0.5)\n"
        "marquardt.plot.plot_performance(h)\n"
        "assert 'matplotlib' in sys.modules\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_zero_value_is_left_out_of_a_log_axis_as_semilogy_does():
    # matplotlib's default clips values <= 0 to ~1e-300: a performance of 0 at epoch 2 was drawn
    # as a drop just after epoch 1, off the bottom of the axes. MATLAB's semilogy leaves it out.
    history = History()
    for epoch, perf in enumerate([1.0, 0.1, 0.0]):
        history.append(epoch=epoch, perf=perf, vperf=perf + 0.2, damping=1e-3, gradient=perf, val_fail=0)
    axes = [plot_performance(history).axes[0], plot_comparison({"LM": history}).axes[0],
            plot_training_state(history).axes[0]]  # the Gradient panel
    for ax in axes:
        assert ax.get_yscale() == "log"
        x_zero, y_zero = ax.transData.transform((2.0, 0.0))
        assert not np.isfinite(y_zero)  # clipped, it was a finite position below the axes
        assert np.isfinite(ax.transData.transform((1.0, 0.1))).all()
