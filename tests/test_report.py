"""report.md and the report's plots, from hand-made run results: the text names its store relative to the report's
folder, report.png's title fits over a single bar, and the label-budget plot puts every point at its entry's and
fraction's x, with one method, one fraction or both."""

from __future__ import annotations

import os

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pipeline.layout import REPORT_BUDGET_PLOT, REPORT_PLOT, REPORT_TEXT
from pipeline.stages.report import aggregate, budget_figure, budget_tables, report_figure, write_report


def _result(method: str, top1: float, store, fraction: float = 0.25, seed: int = 0) -> dict:
    """One run's entry in a report, as `report.run_result` reads it from the run's summaries."""
    probed = method.startswith("feature")
    return {
        "method": method,
        "seed": seed,
        "student": "resnet8",
        "dataset": "digits",
        "store": str(store),
        "teacher_taps": ["layer3.2"],
        "losses": {"feature_mse" if probed else "ce": {"weight": 1}},
        "steps": 4,
        "batch_size": 25,
        "lr": 0.05,
        "label_fraction": fraction,
        "num_labelled": int(400 * fraction),
        "num_training_rows": 400,
        "top1": top1,
        "test_split": "test",
        "num_test": 360,
        "evaluated_with": "linear probe" if probed else "own classifier",
        "probe_tap": "layer3.0" if probed else None,
    }


def test_the_report_names_its_store_relative_to_its_folder(tmp_path):
    store = os.path.realpath(tmp_path / "runs" / "store" / "features.zarr")  # recorded resolved, as distill does
    out = tmp_path / "runs" / "report"
    out.mkdir(parents=True)
    results = [_result("ce", 90.0, store), _result("feature", 93.0, store)]
    summary = write_report(out, results, ["ce", "feature"], plot=False, swept=results)
    text = (out / REPORT_TEXT).read_text()
    assert "from the store `../store/features.zarr`" in text
    for absolute in {str(tmp_path), os.path.realpath(tmp_path)}:
        assert absolute not in text and absolute not in summary["setting"]


def _drawn(figure):
    """The figure laid out as it is saved (constrained layout runs at draw), and its renderer."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("methods", [["feature+no-unlabelled-distill"], ["ce", "feature"]])
def test_the_report_plot_title_fits_in_the_figure(tmp_path, methods):
    rows = aggregate([_result(m, 90.0 + k, tmp_path) for k, m in enumerate(methods)], methods)
    figure = report_figure(rows)
    title = figure.axes[0].title.get_window_extent(_drawn(figure))
    assert 0 <= title.x0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height


def _points(figure) -> list[tuple[list[float], list[float]]]:
    """Each errorbar's (x, y) data: the points as drawn, one entry per method entry."""
    return [(c.lines[0].get_xdata().tolist(), c.lines[0].get_ydata().tolist()) for c in figure.axes[0].containers]


def test_one_fraction_puts_each_entry_at_its_own_place(tmp_path):
    swept = [_result("ce", 90.0, tmp_path, 0.5), _result("feature", 93.0, tmp_path, 0.5)]
    figure = budget_figure(budget_tables(swept, ["ce", "feature"]))
    ax = figure.axes[0]
    assert _points(figure) == [([0], [90.0]), ([1], [93.0])]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ce", "feature"] and ax.get_xlim() == (-0.5, 1.5)
    assert ax.get_xscale() == "linear" and "label fraction 0.5" in ax.get_title()


def test_one_method_sits_on_its_fractions(tmp_path):
    swept = [_result("feature", top1, tmp_path, fraction) for fraction, top1 in ((0.1, 80.0), (0.5, 92.0))]
    figure = budget_figure(budget_tables(swept, ["feature"]))
    ax = figure.axes[0]
    assert _points(figure) == [([0.1, 0.5], [80.0, 92.0])]  # not set aside: nothing to keep apart
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_legend().get_texts()] == ["feature"]
    # One method at one fraction: a single point, in the middle.
    figure = budget_figure(budget_tables(swept[:1], ["feature"]))
    assert _points(figure) == [([0], [80.0])] and figure.axes[0].get_xlim() == (-0.5, 0.5)


def test_several_methods_are_set_aside_evenly_around_each_fraction(tmp_path):
    fractions, methods = (0.01, 0.1, 1.0), ["ce", "kd", "feature"]
    swept = [_result(m, 80.0 + k, tmp_path, f) for f in fractions for k, m in enumerate(methods)]
    xs = np.array([x for x, _ in _points(budget_figure(budget_tables(swept, methods)))])
    assert np.allclose(np.exp(np.log(xs).mean(axis=0)), fractions)  # centred on the fraction (geometric mean)
    assert (np.diff(xs, axis=0) > 0).all() and np.allclose(xs[1], fractions)  # in order, the middle one on it


def test_the_report_writes_both_plots_with_one_method_and_one_fraction(tmp_path):
    results = [_result("feature", 93.0, tmp_path, 0.5, seed) for seed in (0, 1)]
    write_report(tmp_path, results, ["feature"], plot=True, swept=results)
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in (REPORT_PLOT, REPORT_BUDGET_PLOT))
    assert f"]({REPORT_BUDGET_PLOT})" in (tmp_path / REPORT_TEXT).read_text()
