"""The report's plots draw what they say: each extra validation set (fine-tuning's old data) gets its own line."""

import pytest

from orchestrator import metric_keys as mk
from orchestrator.report import plots


def drawn_lines(monkeypatch, draw, *args):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)  # keep the figure to read it
    draw(*args)
    return {line.get_label(): list(line.get_ydata()) for line in figures[0].axes[0].get_lines()}


def test_accuracy_and_loss_plots_draw_each_extra_validation_set(monkeypatch, tmp_path):
    history = [{mk.EPOCH: e, mk.TRAIN_LOSS: 1.0 - e / 10, mk.VAL_LOSS: 0.9 - e / 10, mk.VAL_ACCURACY: 0.5 + e / 10,
                mk.extra_val(mk.VAL_ACCURACY, "old"): 0.9 - e / 10, mk.extra_val(mk.VAL_LOSS, "old"): 0.2 + e / 10}
               for e in range(3)]
    accuracy = drawn_lines(monkeypatch, plots.accuracy_curves, history, tmp_path / "a.png")
    assert accuracy["validation"] == pytest.approx([0.5, 0.6, 0.7])
    assert accuracy["validation (old)"] == pytest.approx([0.9, 0.8, 0.7])
    loss = drawn_lines(monkeypatch, plots.loss_curves, history, [], 10, tmp_path / "l.png")
    assert loss["validation loss (old)"] == pytest.approx([0.2, 0.3, 0.4])
