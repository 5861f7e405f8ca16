"""Guards in real 2-worker runs: spike rollback recovers, the retry budget stops a hopeless run."""

import json

import pytest

from orchestrator import cli
from orchestrator.train.run_files import read_metrics
from orchestrator.spec import load_spec
from orchestrator.train.checkpointing import list_checkpoints
from orchestrator.train.driver import run_job
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def spike_job(digits_dir, tmp_path, name, *overrides):
    return load_spec(ROOT / "jobs/spike-recovery.yaml", [
        f"run.name={name}", f"run.storage_path={tmp_path}",
        f"data.train={digits_dir / 'train.parquet'}", f"data.val={digits_dir / 'val.parquet'}", *overrides])


@pytest.mark.timeout(600)
def test_spike_recovery_job_rolls_back_past_a_fault_that_outlasts_the_skip_window_and_recovers(keel_ray, digits_dir, tmp_path):
    # The same job with the guards off collapses to near chance (0.16 in CI; the stress suite's
    # long_lr_spike row measures it, plain 0.13-0.28 across runs): that run is not repeated here.
    guarded = run_job(spike_job(digits_dir, tmp_path, "guarded"))
    assert guarded.ok
    # recovered: the fault-free job ends at 0.97-1.0 (measured; CI once saw guarded 0.967 vs clean 1.0 with the
    # LR halved for the last 40 steps)
    assert guarded.final["val_accuracy"] >= 0.93, guarded.final
    rollbacks = [e for h in guarded.history for e in h["events"] if e["action"] == "rollback"]
    assert rollbacks and all(e["replica_drift"] == 0.0 for e in rollbacks)  # ranks identical right after each rollback
    assert all(h["replica_drift"] == 0.0 for h in guarded.history)
    assert rollbacks[0]["step"] > 180 and rollbacks[0]["rollback_to"] <= 180  # after the fault, to before it
    # the fault lasts 30 steps, the skip window 10: recovery had to outlast it, not hide it
    assert rollbacks[-1]["step"] > 180 + rollbacks[0]["skip_batches"]
    report = json.loads((guarded.run_dir / "stability_report.json").read_text())
    assert report["first_trouble"]["trigger"].endswith("_spike") and report["first_trouble"]["layer"]
    # where trouble started: the first spike the guard acted on (a gradient-norm jump the clip let through is none)
    spikes = [e for h in guarded.history for e in h["events"] if e["trigger"].endswith("_spike") and e["action"] != "clipped"]
    assert spikes[0]["step"] <= rollbacks[0]["step"]  # a lone spike may be skipped before one is confirmed
    assert f"Trouble started at step {spikes[0]['step']}" in report["summary"]
    assert (list_checkpoints(guarded.run_dir)[-1] / "stability_report.json").exists()


@pytest.mark.timeout(300)
def test_retry_budget_stops_a_hopeless_run_with_exit_1(keel_ray, digits_dir, tmp_path, capsys):
    spec = spike_job(digits_dir, tmp_path, "hopeless", "run.epochs=10", "faults=[{kind: lr_spike, at_step: 60, repeat: 10000, factor: 1000}]",
                     "stability.spike.max_recoveries=2", "stability.spike.rollback_skip_batches=2")
    job = tmp_path / "hopeless.yaml"
    job.write_text(spec.to_yaml())
    assert cli.main(["run", str(job), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "diverged: 3" in err and "exceeded stability.spike.max_recoveries=2" in err
    history = read_metrics(tmp_path / "hopeless")
    events = [e for h in history for e in h["events"] if e["trigger"] != "fault"]
    actions = [e["action"] for e in events]  # lone loss spikes are skipped until confirmed, then rolled back
    assert actions[-1] == "stop" and actions.count("rollback") == 2 and set(actions) <= {"skip", "rollback", "stop"}
    assert all(e["replica_drift"] == 0.0 for e in events if e["action"] == "rollback") and history[-1]["diverged"] == 1
    assert len(history) < 10  # stopped early, not run to the end
