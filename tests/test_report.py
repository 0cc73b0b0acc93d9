"""The report's plots read without explanation: every drawn line is named in a legend, the
legends sit where they cover no data, and the training curves mark the epoch that was kept."""

from __future__ import annotations

import numpy as np
import pytest

from clf_core.model import calibration
from clf_core.training import report
from clf_core.model.calibration import softmax
from clf_core.model.metrics import classification_metrics

HISTORY = [{"epoch": i, "train_loss": t, "val_loss": v, "val_accuracy": a, "val_macro_f1": f}
           for i, (t, v, a, f) in enumerate([(0.69, 0.60, 0.70, 0.62), (0.45, 0.41, 0.83, 0.80),
                                             (0.30, 0.36, 0.88, 0.86), (0.20, 0.38, 0.87, 0.85)])]


@pytest.fixture(scope="module")
def figures() -> dict:
    """Held-out figures of an over-confident binary model (as in test_calibration.py)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4.0, size=(1_500, 2))
    labels = np.array([rng.choice(2, p=p) for p in softmax(logits, 2.0)])
    fitted = calibration.fit(logits[:1_000], labels[:1_000], "fraction", 0.1)
    return calibration.evaluate(logits[1_000:], labels[1_000:], fitted)


def drawn_lines(fig) -> list:
    """The data lines of every axes (a legend's own sample lines are not in ax.lines)."""
    return [line for ax in fig.axes for line in ax.lines]


def legend_texts(fig) -> set[str]:
    return {t.get_text() for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
            for t in legend.get_texts()}


def assert_reads_well(fig) -> None:
    named = legend_texts(fig)
    unnamed = [line.get_label() for line in drawn_lines(fig) if line.get_label() not in named]
    assert not unnamed, unnamed
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "a legend lies over a plot's data area"


def test_the_training_curves_mark_the_kept_epoch_in_both_panels():
    fig = report.curves_figure(HISTORY, best_epoch=2)
    kept = [line for line in drawn_lines(fig) if line.get_label() == "kept: epoch 3 of 4"]
    assert len(kept) == 2 and all(list(line.get_xdata()) == [3, 3] for line in kept)
    assert legend_texts(fig) == {"train loss", "validation loss", "validation accuracy", "validation macro-F1",
                                 "kept: epoch 3 of 4"}
    assert_reads_well(fig)
    assert not any("kept" in line.get_label() for line in drawn_lines(report.curves_figure(HISTORY)))


def test_the_report_passes_the_kept_epoch_to_the_curves(monkeypatch, figures):
    seen = []

    def curves_png(history, best_epoch=None):
        seen.append(best_epoch)
        return b""

    monkeypatch.setattr(report, "curves_png", curves_png)
    test_metrics = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), ["Expense", "Income"])
    report.build_report(test_metrics, HISTORY, {"best_epoch": 2}, figures)
    assert seen == [2]


def test_the_risk_coverage_legend_names_both_axes_lines_and_the_threshold(figures):
    fig = report.risk_coverage_figure(figures)
    assert len(drawn_lines(fig)) == 3   # two curves on two y axes, the threshold
    assert_reads_well(fig)


def test_the_reliability_legend_names_the_diagonal_and_both_series(figures):
    fig = report.reliability_figure(figures)
    texts = legend_texts(fig)
    assert "perfectly calibrated" in texts
    assert {t.split(" (")[0] for t in texts} >= {"before calibration", "after calibration"}
    assert_reads_well(fig)   # the series' connecting lines too: each is named with its markers
