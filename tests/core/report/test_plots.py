"""The report figures: the KLD curve is weighted by the generator's own config, bar-chart legends sit outside
the axes (they hide no bar), and the detection results get a figure."""

from __future__ import annotations

import pytest

from icm_core.report import plots
from icm_core.report.tables import result_rows
from tests.core.report.test_tables import SCORES


@pytest.fixture
def figures(monkeypatch) -> list:
    """Keep each figure a plot function makes (it is still written to its file)."""
    made = []
    save = plots.save_figure

    def keep(fig, path):
        renderer = fig.canvas.get_renderer()  # Agg; pyplot.close() in save_figure detaches the canvas
        fig.canvas.draw()
        made.append((fig, renderer))
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return made


def legend_outside_axes(made, ax) -> bool:
    renderer = made[1]
    legend = ax.get_legend().get_window_extent(renderer)
    return legend.x0 >= ax.get_window_extent(renderer).x1


@pytest.mark.parametrize("weight", [0.005, 0.1])
def test_kld_curve_uses_the_configured_weight(figures, tmp_path, weight):
    history = [{"epoch": e, "recon": 1.0 / (e + 1), "kld": 2.0 + e} for e in range(4)]
    plots.plot_training_curves(history, None, tmp_path / "curves.png", kld_weight=weight)
    ax = figures[0][0].axes[0]
    [kld] = [line for line in ax.get_lines() if "KLD" in line.get_label()]
    assert kld.get_label() == f"{weight:g} x KLD"
    assert list(kld.get_ydata()) == pytest.approx([weight * (2.0 + e) for e in range(4)])


def test_training_curves_show_the_validation_criterion(figures, tmp_path):
    history = [{"epoch": e, "recon": 1.0 / (e + 1), "kld": 2.0} for e in range(6)]
    for e, val in ((1, 3.0), (3, 2.5), (5, 2.6)):
        history[e]["val"] = val
    history[3]["best"] = True
    plots.plot_training_curves(history, None, tmp_path / "curves.png")
    val_ax = figures[0][0].axes[1]
    [line] = [ln for ln in val_ax.get_lines() if ln.get_label() == "validation criterion"]
    assert list(line.get_xdata()) == [2, 4, 6] and list(line.get_ydata()) == [3.0, 2.5, 2.6]
    assert [ln.get_xdata()[0] for ln in val_ax.get_lines() if ln.get_linestyle() == ":"] == [4]


def test_results_bars_legend_hides_no_bar(figures, tmp_path):
    plots.plot_main_bars(result_rows(SCORES), tmp_path / "bars.png")
    assert legend_outside_axes(figures[0], figures[0][0].axes[0])


def test_detection_figure(figures, tmp_path):
    rows = [
        {"method": m, "task": t, "map50": v, "map75": v / 2}
        for t, base in (("faces-a", 0.5), ("faces-b", 0.7))
        for m, v in (("base", base), ("lora", base + 0.2), ("icm_lora", base + 0.19))
    ]
    path = plots.plot_detection_bars(rows, tmp_path / "detection.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left, right = figures[0][0].axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["faces-a", "faces-b"]
    heights = sorted(round(p.get_height(), 3) for p in left.patches)
    assert heights == sorted(round(r["map50"], 3) for r in rows)
    assert sorted(round(p.get_height(), 3) for p in right.patches) == sorted(round(r["map75"], 3) for r in rows)
    assert legend_outside_axes(figures[0], right)
