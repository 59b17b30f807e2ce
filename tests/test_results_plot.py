"""Specification of results/plot.py: every seed's scores are what the figures draw, and the thick
line and the bar are the seeds' means."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("plot", Path(__file__).resolve().parent.parent / "results" / "plot.py")
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def record(row, seed, epochs):
    """A study-runs.jsonl record whose best epoch is its last."""
    history = [{"epoch": i + 1, "dev": dev, "overall": overall} for i, (dev, overall) in enumerate(epochs)]
    return {"row": row, "seed": seed, "best": {"dev": epochs[-1][0], "overall": epochs[-1][1]}, "epochs": history}


RECORDS = [record("main", 11711, [({"sst": 0.45, "para": 0.82, "sts": 0.87}, 0.73),
                                  ({"sst": 0.47, "para": 0.84, "sts": 0.88}, 0.75)]),
           record("main", 1, [({"sst": 0.43, "para": 0.80, "sts": 0.86}, 0.71),
                              ({"sst": 0.49, "para": 0.84, "sts": 0.88}, 0.76)]),
           record("sst-alone", 2, [({"sst": 0.50}, 0.50)])]


def test_the_epoch_figure_draws_every_seed_and_their_mean(tmp_path):
    figure = plot.plot_epochs(RECORDS, tmp_path / "epochs.png")
    assert (tmp_path / "epochs.png").stat().st_size > 0
    sst, overall = figure.axes[0], figure.axes[3]
    assert [list(line.get_ydata()) for line in sst.lines] == [[0.45, 0.47], [0.43, 0.49], [0.44, 0.48]]
    assert list(overall.lines[2].get_ydata()) == pytest.approx([0.72, 0.755])


def test_the_comparison_figure_puts_every_seed_beside_its_mean(tmp_path):
    figure = plot.plot_comparisons(RECORDS, tmp_path / "comparisons.png")
    assert (tmp_path / "comparisons.png").stat().st_size > 0
    optimizer = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith("Optimizer"))
    assert [t.get_text() for t in optimizer.get_yticklabels()] == ["main"]
    assert sorted(optimizer.collections[0].get_offsets()[:, 0]) == [0.75, 0.76]  # overall: a multi-task row
    assert list(optimizer.lines[0].get_xdata()) == pytest.approx([0.755, 0.755])
    smart = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith("SMART"))
    assert list(smart.collections[0].get_offsets()[:, 0]) == [0.50]  # its task's score: a single-task row
