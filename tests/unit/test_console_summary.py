"""What `keel run` prints about a run: the resume line and the closing summary table (rich, to a string)."""

import io

import pytest
from rich.console import Console

from orchestrator.report.console import RunDisplay, summary_table
from orchestrator.train.driver import RunOutcome


@pytest.mark.parametrize("next_epoch, said", [
    (2, "resumed from checkpoint: continuing at epoch 3"),
    (4, "resumed from checkpoint: 4 epochs already trained, run.epochs is 4: nothing to train (raise run.epochs to train on)"),
])
def test_a_resume_says_where_it_continues_or_that_a_finished_run_has_nothing_left_to_train(next_epoch, said):
    out = io.StringIO()
    RunDisplay(Console(file=out, width=200), epochs=4)({"type": "resumed", "epoch": next_epoch})
    assert out.getvalue().strip() == said


def test_the_summary_shows_each_extra_validation_split_beside_the_main_one(tmp_path):
    """A fine-tune's data.extra_val (the old data: forgetting) is in the closing summary, not only in the files."""
    final = {"epoch": 5, "val_accuracy": 0.98, "val_accuracy_original": 0.2028, "val_loss_original": 17.6}
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(RunOutcome(status="finished", run_dir=tmp_path, history=[final])))
    lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert "│ final val accuracy │ 0.98 │" in lines and "│ final val accuracy (original) │ 0.2028 │" in lines, lines


def test_a_run_that_failed_before_its_first_epoch_shows_no_value_as_a_dash_not_as_a_nan(tmp_path):
    """'nan' in the summary of a run that never reported reads as a diverged loss; it has no value at all."""
    out = io.StringIO()
    failed = RunOutcome(status="failed", run_dir=tmp_path, history=[], reason="KeyError: 'logits'")
    Console(file=out, width=200).print(summary_table(failed))
    lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert "│ final train loss │ - │" in lines and "│ best val accuracy │ - │" in lines and "│ epochs run │ 0 │" in lines, lines
    assert "nan" not in out.getvalue()
    out = io.StringIO()  # a real NaN is still shown as one
    Console(file=out, width=200).print(summary_table(RunOutcome(status="diverged", run_dir=tmp_path, history=[{"epoch": 0, "train_loss": float("nan")}])))
    assert "│ final train loss │ nan │" in [" ".join(line.split()) for line in out.getvalue().splitlines()]
