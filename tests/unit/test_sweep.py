import json

import pytest

from orchestrator.errors import BadInput
from orchestrator.spec import parse_spec
from orchestrator.sweep.spec import DivergenceSpec, check_field_path
from orchestrator.sweep.stopping import DivergenceStopper, divergence_reason
from tests.helpers import ROOT

KW = dict(metric="val_accuracy", loss_metric="train_loss", loss_factor=10.0, loss_threshold=None)


@pytest.mark.parametrize("result, first, expected", [
    ({"train_loss": 2.0, "val_accuracy": 0.5}, None, None),
    ({"train_loss": float("nan"), "val_accuracy": 0.5}, 2.0, "train_loss is nan"),
    ({"train_loss": 1.0, "val_accuracy": float("inf")}, 2.0, "val_accuracy is inf"),
    ({"train_loss": 25.0, "val_accuracy": 0.1}, 2.0, "exploded above 10x"),
    ({"train_loss": 19.0, "val_accuracy": 0.1}, 2.0, None),
    ({"train_loss": 1.0, "diverged": 1, "stop_reason": "diverged: 10 consecutive"}, 2.0, "diverged: 10 consecutive"),
])
def test_divergence_reason(result, first, expected):
    reason = divergence_reason(result, first, **KW)
    assert (reason is None) if expected is None else (expected in reason)


def test_threshold_catches_an_explosion_in_the_first_report():
    assert "above threshold 23.03" in divergence_reason({"train_loss": 500.0}, None, **{**KW, "loss_threshold": 23.03})


def test_stopper_remembers_first_loss_and_records_reasons(tmp_path):
    stopper = DivergenceStopper(DivergenceSpec(loss_threshold=None), "val_accuracy", tmp_path / "d.json")
    assert not stopper("t1", {"train_loss": 2.0, "val_accuracy": 0.2, "training_iteration": 1})
    assert not stopper("t1", {"train_loss": 5.0, "val_accuracy": 0.2, "training_iteration": 2})
    assert stopper("t1", {"train_loss": 30.0, "val_accuracy": 0.1, "training_iteration": 3})
    assert stopper.reasons["t1"]["iteration"] == 3 and (tmp_path / "d.json").exists()
    again = DivergenceStopper(DivergenceSpec(), "val_accuracy", tmp_path / "d.json")  # a resumed sweep keeps them
    assert "t1" in again.reasons


def test_a_resumed_sweep_unpickles_a_stopper_that_rereads_the_record(tmp_path):
    # Tune pickles its RunConfig (the stopper in it) into tuner.pkl at the start and unpickles it on
    # Tuner.restore: that copy must not forget, nor later overwrite, reasons recorded after it was taken.
    import pickle

    stopper = DivergenceStopper(DivergenceSpec(loss_threshold=None), "val_accuracy", str(tmp_path / "d.json"))
    saved_at_start = pickle.dumps(stopper)
    assert stopper("t1", {"train_loss": float("nan"), "training_iteration": 1})
    restored = pickle.loads(saved_at_start)
    assert "t1" in restored.reasons
    assert restored("t2", {"val_accuracy": float("nan"), "training_iteration": 1})
    assert set(json.loads((tmp_path / "d.json").read_text())) == {"t1", "t2"}


def test_field_paths_are_checked_against_the_job_spec():
    check_field_path("optimizer.lr")
    check_field_path("data.augment.mixup_alpha")
    with pytest.raises(ValueError, match="optimizer.learning_rate is not a job spec field"):
        check_field_path("optimizer.learning_rate")
    with pytest.raises(ValueError, match="is a section"):
        check_field_path("stability.clip")


def test_param_space_uses_tune_distributions():
    from ray import tune

    from orchestrator.spec_text import set_dotted
    from orchestrator.sweep.driver import param_space
    space = param_space({"optimizer.lr": {"loguniform": [1e-4, 1e-1]}, "model.activation": {"choice": ["relu", "silu"]},
                         "data.batch_size": {"grid": [16, 32]}, "optimizer.momentum": {"quniform": [0.5, 0.9, 0.1]}})
    assert isinstance(space["optimizer.lr"], tune.search.sample.Float)
    assert space["data.batch_size"] == {"grid_search": [16, 32]}
    assert set_dotted({}, "a.b.c", 1) == {"a": {"b": {"c": 1}}}


def test_digits_sweep_spans_several_decades():
    from orchestrator.sweep.spec import load_sweep
    sweep, base = load_sweep(ROOT / "jobs/digits-sweep.yaml")
    lrs = sweep.search["optimizer.lr"]["grid"]
    assert max(lrs) / min(lrs) >= 1e4 and parse_spec(base).run.epochs == 4


def test_missing_logger_package_is_bad_input():
    import importlib.util

    from orchestrator.sweep.driver import logger_callbacks
    from orchestrator.sweep.spec import load_sweep
    sweep, _ = load_sweep(ROOT / "jobs/digits-sweep.yaml", ["loggers=[mlflow, wandb]"])
    missing = next((n for n in ("mlflow", "wandb") if importlib.util.find_spec(n) is None), None)
    if missing is None:  # both installed: the callbacks are Ray's own
        assert len(logger_callbacks(sweep)) == 2
    else:
        with pytest.raises(BadInput, match=f"loggers: {missing} is not installed"):
            logger_callbacks(sweep.model_copy(update={"loggers": [missing]}))


def test_planned_trials_are_the_samples_times_every_grid_combination_and_a_missing_one_is_unfinished():
    from orchestrator.sweep.driver import SweepOutcome, TrialRow, planned_trials
    from orchestrator.sweep.spec import SweepSpec

    def sweep(search, samples):
        return SweepSpec.model_validate({"name": "s", "base": "b.yaml", "search": search, "num_samples": samples})
    assert planned_trials(sweep({"optimizer.lr": {"grid": [0.1, 1.0, 10.0]}, "data.batch_size": {"grid": [16, 32]}}, 2)) == 12
    assert planned_trials(sweep({"optimizer.lr": {"loguniform": [1e-4, 1e-1]}}, 5)) == 5
    done = TrialRow("a", "TERMINATED", {}, 0.9, 3, "", 0)
    assert SweepOutcome("x", rows=[done], unstarted=2).unfinished == 2  # finished so far, yet two never started
    assert SweepOutcome("x", rows=[done, TrialRow("b", "PENDING", {}, None, 0, "", 0)]).unfinished == 1
    assert SweepOutcome("x", rows=[done]).unfinished == 0


def test_pbt_leaves_a_healthy_trial_alone_at_its_last_report_and_decides_every_other(monkeypatch):
    from types import SimpleNamespace

    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from orchestrator.sweep.driver import make_scheduler
    from orchestrator.sweep.spec import SweepSpec

    sweep = SweepSpec.model_validate({"name": "s", "base": "b.yaml", "search": {"optimizer.lr": {"loguniform": [1e-3, 1e-1]}},
                                      "scheduler": {"kind": "pbt", "perturbation_interval": 1}})
    pbt = make_scheduler(sweep, epochs=3)
    asked = []  # what stock PBT was asked to decide (it would pause and clone a lower-quantile trial)
    monkeypatch.setattr(PopulationBasedTraining, "on_trial_result",
                        lambda self, controller, trial, result: asked.append(result["training_iteration"]) or TrialScheduler.PAUSE)
    trial = SimpleNamespace(trial_id="t", config={"optimizer.lr": 0.01})
    assert [pbt.on_trial_result(None, trial, {"training_iteration": i}) for i in (1, 2, 3)] == ["PAUSE", "PAUSE", "CONTINUE"]
    assert asked == [1, 2]
    longer = SimpleNamespace(trial_id="u", config={"optimizer.lr": 0.01, "run.epochs": 5})  # a trial's own epochs, when searched
    assert pbt.on_trial_result(None, longer, {"training_iteration": 3}) == "PAUSE"
    diverged = {"training_iteration": 3, "diverged": 1}  # a diverged trial's last report: its last chance of a clone
    assert pbt.on_trial_result(None, trial, diverged) == "PAUSE" and asked[-1] == 3


class FakeTrial:  # what PBT reads of a trial
    def __init__(self, name):
        from types import SimpleNamespace

        from ray.tune.experiment import Trial

        self.trial_id, self.config, self.status, self.experiment_tag = name, {"optimizer.lr": 0.01}, Trial.RUNNING, name
        self.run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(checkpoint_config=SimpleNamespace(num_to_keep=None)))

    def is_finished(self):
        return self.status in ("TERMINATED", "ERROR")


class FakeController:  # what PBT asks of Tune's controller; records the checkpoints it is told to save
    search_alg = None  # Tune's own variant generator

    def __init__(self, trials):
        self.trials, self.saved = trials, []

    def get_trials(self):
        return self.trials

    def _schedule_trial_save(self, trial, result=None):
        self.saved.append((trial.trial_id, result["training_iteration"]))
        return f"checkpoint of {trial.trial_id}"


def keel_pbt_over(monkeypatch, *names):
    """Keel's PBT scheduler (3 epochs, perturbation every report) over fake trials; exploits are recorded."""
    from ray.tune.schedulers import PopulationBasedTraining

    from orchestrator.sweep.driver import make_scheduler
    from orchestrator.sweep.spec import SweepSpec

    sweep = SweepSpec.model_validate({"name": "s", "base": "b.yaml", "search": {"optimizer.lr": {"loguniform": [1e-3, 1e-1]}},
                                      "scheduler": {"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5}})
    pbt = make_scheduler(sweep, epochs=3)
    pbt.set_search_properties("val_accuracy", "max", config={})
    cloned = []
    monkeypatch.setattr(PopulationBasedTraining, "_exploit", lambda self, controller, trial, donor: cloned.append((trial.trial_id, donor.trial_id)))
    trials = [FakeTrial(name) for name in names]
    controller = FakeController(trials)
    for trial in trials:
        pbt.on_trial_add(controller, trial)
    return pbt, controller, trials, cloned


def test_pbt_counts_its_perturbation_interval_in_reports_so_fast_epochs_still_get_a_diverged_trial_cloned(monkeypatch):
    # Epochs of 0.3 s, as a small model has: counted in seconds (Tune's default time_attr), PBT perturbed
    # once a second, the good trial saved no checkpoint while ranked above the diverged one, and the diverged
    # trial was never cloned (the PBT-on-S3 integration test failed that way on an idle machine).
    pbt, controller, (good, bad), cloned = keel_pbt_over(monkeypatch, "good", "bad")
    for trial, report, accuracy in ((good, 1, 0.6), (bad, 1, -1e9), (good, 2, 0.9), (bad, 2, -1e9)):
        pbt.on_trial_result(controller, trial, {"training_iteration": report, "time_total_s": 0.3 * report,
                                                "val_accuracy": accuracy})
    assert controller.saved == [("good", 2)] and cloned == [("bad", "good")]


def test_a_trial_that_diverged_before_any_other_reported_waits_for_a_donor_and_is_stopped_when_none_is_left(monkeypatch):
    # A trial diverged at its first steps reports (worst score) while the healthy one is still starting its
    # workers. Its run has ended; it reports on, waiting. Bounded by its 3 epochs it was done 2 s later, before
    # the healthy trial's first report, and was never cloned (the PBT-on-S3 integration test's flake).
    pbt, controller, (good, bad), cloned = keel_pbt_over(monkeypatch, "good", "bad")
    diverged = {"val_accuracy": -1e9, "diverged": 1}
    decisions = [pbt.on_trial_result(controller, bad, {**diverged, "training_iteration": 1})]
    decisions += [pbt.on_trial_result(controller, bad, {**diverged, "training_iteration": i, "waiting_for_clone": 1}) for i in (2, 3, 4)]
    assert decisions == ["CONTINUE"] * 4 and cloned == []  # no report from the healthy trial yet: nothing to clone
    pbt.on_trial_result(controller, good, {"training_iteration": 1, "val_accuracy": 0.6})
    assert controller.saved == [("good", 1)]  # ranked above the waiting trial: its checkpoint is kept for a clone
    pbt.on_trial_result(controller, bad, {**diverged, "training_iteration": 5, "waiting_for_clone": 1})
    assert cloned == [("bad", "good")]

    # with no healthy trial left unfinished, a waiting trial is stopped: another diverged one is no donor
    pbt, controller, (good, bad, worse), cloned = keel_pbt_over(monkeypatch, "good", "bad", "worse")
    for trial in (bad, worse):
        pbt.on_trial_result(controller, trial, {**diverged, "training_iteration": 1})
    waiting = {**diverged, "training_iteration": 2, "waiting_for_clone": 1}
    assert pbt.on_trial_result(controller, bad, waiting) == "CONTINUE"  # the good trial may yet report
    good.status = "TERMINATED"
    assert pbt.on_trial_result(controller, bad, waiting) == "STOP" and cloned == []


def test_the_median_rules_grace_period_counts_reports_not_seconds():
    # The spec says reports (grace_period: 1): a trial far below the median at its first report is stopped
    # there even when that report came 0.3 s in (counted in seconds it ran on past its grace period).
    from orchestrator.sweep.driver import make_scheduler
    from orchestrator.sweep.spec import SweepSpec

    sweep = SweepSpec.model_validate({"name": "s", "base": "b.yaml", "search": {"optimizer.lr": {"loguniform": [1e-3, 1e-1]}},
                                      "scheduler": {"kind": "median", "grace_period": 1}})
    rule = make_scheduler(sweep, epochs=3)
    rule.set_search_properties("val_accuracy", "max", config={})

    class FakeTrial:
        status = "RUNNING"

        def __init__(self, name):
            self.trial_id = name

    trials = [FakeTrial(name) for name in ("a", "b", "c", "slow")]
    controller = type("FakeController", (), {"get_live_trials": lambda self: trials})()
    first = {"training_iteration": 1, "time_total_s": 0.3}
    decisions = [rule.on_trial_result(controller, trial, {**first, "val_accuracy": accuracy})
                 for trial, accuracy in zip(trials, (0.9, 0.9, 0.9, 0.1))]
    assert decisions == ["CONTINUE", "CONTINUE", "CONTINUE", "STOP"]


def test_a_sweep_missing_its_base_is_told_so_not_read_as_a_job(tmp_path, capsys):
    """A sweep file with a search space but no base job: the error names the sweep's missing field, not a job
    spec's missing data and run sections."""
    from orchestrator import cli

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nsearch:\n  optimizer.lr: {loguniform: [0.001, 1.0]}\nmetric: val_accuracy\n")
    for command in ("validate", "sweep"):
        assert cli.main([command, str(sweep)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "base: Field required" in err and "data:" not in err, err


def test_the_live_lines_name_the_trial_that_changed_once_per_change():
    """Without a terminal, `keel sweep` prints a line per change: Tune passes every trial's row, so the line must
    be the updated trial's (not the last one's), and a completion that repeats the last result adds nothing."""
    from types import SimpleNamespace

    from orchestrator.report.sweep_table import TrialLines

    def row(trial, status, metric, reports, reason=""):
        return SimpleNamespace(trial_id=trial, status=status, metric=metric, iterations=reports, reason=reason)

    lines = TrialLines("val_accuracy")
    assert lines.new([row("a", "RUNNING", 0.5, 1)]) == ["a RUNNING val_accuracy=0.5 reports=1"]
    assert lines.new([row("a", "RUNNING", 0.5, 1), row("b", "RUNNING", 0.4, 1)]) == ["b RUNNING val_accuracy=0.4 reports=1"]
    assert lines.new([row("a", "RUNNING", 0.7, 2), row("b", "RUNNING", 0.4, 1)]) == ["a RUNNING val_accuracy=0.7 reports=2"]
    diverged = row("b", "diverged", 0.1, 2, "train_loss is nan")
    assert lines.new([row("a", "RUNNING", 0.7, 2), diverged]) == ["b diverged val_accuracy=0.1 reports=2 (train_loss is nan)"]
    assert lines.new([row("a", "RUNNING", 0.7, 2), diverged]) == []  # its completion: the same state again


def test_a_diverged_pbt_trial_reports_on_past_its_epochs_until_tune_ends_it(monkeypatch):
    # Its run's epochs are no bound: a clone can only come after a healthy trial's report, however late.
    import ray.tune

    from orchestrator.sweep.trial import wait_to_be_replaced

    reports = []

    class EndedByTune(Exception):  # what stopping the trial's actor amounts to, for this loop
        pass

    def report(metrics):
        reports.append(metrics)
        if len(reports) == 10:
            raise EndedByTune

    monkeypatch.setattr(ray.tune, "report", report)
    last = {"epoch": 2, "val_accuracy": -1e9, "diverged": 1, "events": [{"kind": "spike"}], "spikes": 1}
    with pytest.raises(EndedByTune):
        wait_to_be_replaced(last, every_s=0.001)
    assert len(reports) == 10  # a 3-epoch run, past its epochs
    assert all(r["waiting_for_clone"] == 1 and r["val_accuracy"] == -1e9 and r["diverged"] == 1 for r in reports)
    assert all(r["epoch"] == 2 and r["guard_events"] == 1 for r in reports)  # its last real epoch, as Tune takes it


def test_a_trial_reports_the_steps_its_guards_acted_on_not_gradient_norm_jumps_the_clip_let_through():
    from orchestrator.sweep.trial import for_tune

    events = [{"trigger": "grad_norm_spike", "action": "clipped"}, {"trigger": "loss_spike", "action": "skip"},
              {"trigger": "grad_norm_spike", "action": "clipped"}]
    epoch = {"val_accuracy": 1.0, "events": events, "spikes": 1, "grad_norm_jumps": 2, "skipped_steps": 0}
    assert for_tune(epoch) == {**{k: v for k, v in epoch.items() if k != "events"}, "guard_events": 1}


def test_a_trials_guard_events_are_its_runs_so_far_not_its_last_epochs():
    # the epoch's event list holds only its own last 20: a trial that skipped 30 NaN steps in epoch 1, rolled
    # back once for a spike and ran clean after showed "0 guard events" in the sweep table
    from orchestrator.sweep.trial import for_tune

    later_epoch = {"val_accuracy": 0.9, "events": [], "skipped_steps": 30, "spikes": 1, "rollbacks": 1,
                   "batches_skipped": 10, "lr_reductions": 1, "collapse_rollbacks": 1, "grad_norm_jumps": 4}
    assert for_tune(later_epoch)["guard_events"] == 32  # 30 skipped steps, 1 spike (its rollback), 1 collapse rollback


def test_a_finished_trials_note_counts_its_guard_events_and_a_diverged_trials_says_why():
    from orchestrator.report.console import output_console
    from orchestrator.report.sweep_table import trial_table
    from orchestrator.sweep.driver import TrialRow

    rows = [TrialRow("t0", "TERMINATED", {}, 0.9, 3, events=1), TrialRow("t1", "TERMINATED", {}, 0.9, 3, events=2),
            TrialRow("t2", "TERMINATED", {}, 0.9, 3), TrialRow("t3", "diverged", {}, 0.1, 1, "non-finite", events=5)]
    console = output_console()
    with console.capture() as captured:
        console.print(trial_table(rows, "val_accuracy"))
    lines = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in captured.get().splitlines() if "│ t" in line}
    assert lines == {"t0": "1 guard event", "t1": "2 guard events", "t2": "", "t3": "non-finite"}


def test_in_a_log_the_results_table_is_wide_enough_for_its_headers_and_a_terminal_keeps_its_width(monkeypatch, capsys, tmp_path):
    # keel submit streams the cluster's keel sweep output: no terminal there, and rich's 80 columns folded
    # the table's val_accuracy header and every parameter list over two lines
    from orchestrator.report.console import LOG_WIDTH, output_console
    from orchestrator.report.sweep_table import trial_table
    from orchestrator.sweep.driver import TrialRow

    monkeypatch.delenv("COLUMNS", raising=False)
    row = TrialRow("ed05f_00002", "TERMINATED", {"optimizer.lr": 0.05, "regularization.weight_decay": 1e-05}, 0.9861, 6,
                   "diverged at report 1 (train_loss 1.066e+18 above threshold 23.03); replaced by a clone of ed05f_00001")
    console = output_console()  # pytest's captured stdout: a log
    assert console.width == LOG_WIDTH
    console.print(trial_table([row], "val_accuracy"))
    out = capsys.readouterr().out
    assert "┃ val_accuracy ┃" in out and "lr=0.05, weight_decay=1e-05 " in out, out
    monkeypatch.setenv("COLUMNS", "100")  # what the user says wins
    assert output_console().width == 100
    monkeypatch.delenv("COLUMNS")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator import cli

    path = tmp_path / "wide.parquet"  # keel's own commands print through it
    pq.write_table(pa.table({**{f"feature_{i}": [0.0, 1.0] for i in range(30)}, "label": [0, 1]}), path)
    assert cli.main(["data", "inspect", str(path)]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) == LOG_WIDTH
