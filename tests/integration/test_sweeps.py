"""Sweeps on a real local Ray cluster: divergent trials stopped at once, healthy ones finish, resume works."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from orchestrator import cli
from orchestrator.sweep.driver import run_sweep, summarize
from orchestrator.sweep.spec import load_sweep
from tests.helpers import ROOT, cli_cases, sweep_file

pytestmark = pytest.mark.integration
BAD_SWEEPS = {
    "unknown_distribution.yaml": "search.optimizer.lr: unknown distribution 'lognormal'",
    "bounds_reversed.yaml": "lower bound 1.0 must be below upper bound 0.001",
    "loguniform_zero.yaml": "bounds must be positive",
    "nonexistent_field.yaml": "optimizer.learning_rate is not a job spec field",
    "section_not_field.yaml": "search.optimizer: is a section, not a field",
    "unknown_scheduler.yaml": "scheduler.kind:",
    "quniform_two_args.yaml": "quniform: expected 3 numbers",
    "missing_base.yaml": "no-such-job.yaml: no such file",
    "invalid_base_override.yaml": "optimizer.lr: Input should be greater than 0",
    "value_out_of_range.yaml": "search.optimizer.lr.uniform: -1.0 is not a valid optimizer.lr: Input should be greater than 0",
}


@pytest.fixture(scope="module", params=["sweep", "validate"])
def bad_sweep_outcomes(request, tmp_path_factory):
    """Every bad sweep file through one command, all in one fresh interpreter."""
    argvs = [(case, [request.param, str(ROOT / "tests/bad_inputs/sweeps" / case)]) for case in sorted(BAD_SWEEPS)]
    return cli_cases(argvs, tmp_path_factory.mktemp(f"bad-{request.param}"))


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_spec_is_one_line_exit_2_and_starts_nothing(case, bad_sweep_outcomes):
    result = bad_sweep_outcomes["results"][case]
    assert result["rc"] == 2, result["stderr"]
    assert len(result["stderr"].strip().splitlines()) == 1 and BAD_SWEEPS[case] in result["stderr"], result["stderr"]
    assert not bad_sweep_outcomes["ray_imported"]


@pytest.mark.timeout(600)
def test_non_finite_metric_stops_the_trial_at_that_report_from_a_trials_worker_group(keel_ray, digits_dir, tmp_path):
    # Two workers per trial: the trial drives a Ray Train worker group, whose reports reach Tune through the
    # trial's Train callback (the other sweep tests' one-worker trials train in their own process)
    path = sweep_file(tmp_path, digits_dir, "nan", [0.05], overrides=[
        "faults=[{kind: nan_batch, at_step: 12, repeat: 100000}]", "stability.nonfinite.max_consecutive_skips=100000"],
        resources={"workers_per_trial": 2, "cpus_per_worker": 0.5})
    # 22 steps per epoch on 2 workers; every step from 12 on is NaN: the guard skips them, epoch 2's train
    # loss is NaN (no finite step)
    sweep, base = load_sweep(path)
    outcome = run_sweep(sweep, base)
    row = outcome.rows[0]
    assert row.status == "diverged" and row.iterations == 2 and "train_loss is nan" in row.reason
    assert outcome.best is None
    reports = [json.loads(line) for trial in (tmp_path / "sweeps" / "nan").glob("run_trial_*")
               for line in (trial / "result.json").read_text().splitlines()]
    assert [r["world_size"] for r in reports] == [2, 2]  # a worker group's reports, not the trial's own process


@pytest.mark.timeout(900)
def test_an_interrupted_sweep_resumes_and_stops_absurd_learning_rates_at_once_and_its_best_trial_is_healthy(
        keel_ray, digits_dir, tmp_path, capsys, monkeypatch):
    # One sweep, one trial at a time: a real `keel sweep` process is interrupted (Ctrl-C) once it has said that
    # its first, healthy trial finished (its result.json may reach the experiment directory only at the end:
    # waiting for that file once let the whole sweep finish first). The resumed sweep (in this process, as
    # `keel sweep` runs it) keeps that trial and runs the absurd learning rates, each stopped within 2 reports
    # of its explosion.
    path = sweep_file(tmp_path, digits_dir, "lrs", [0.05, 1e4, 1e8])
    # the data given as a user's job gives it, relative to where `keel sweep` runs: trials run elsewhere
    (tmp_path / "data").symlink_to(digits_dir)
    tree = yaml.safe_load(path.read_text())
    tree["base"]["data"].update(train="data/train.parquet", val="data/val.parquet")
    path.write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)  # the resumed sweep below runs here too, as the user re-runs it
    # a run of the base job's name with another model: trials have their own names and never resume from it
    from orchestrator.spec import parse_spec
    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components

    other = parse_spec({**tree["base"], "model": {"kind": "mlp", "hidden": [8]}})
    save_checkpoint(tmp_path / "base" / "checkpoint_old", build_components(other, 4, torch.device("cpu")), epoch=0,
                    spec_yaml=other.to_yaml())
    exp = tmp_path / "sweeps" / "lrs"
    suite_ray = keel_ray.get_runtime_context().gcs_address  # joined as a user's RAY_ADDRESS would: no second cold start
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(path)], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": suite_ray},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = []
    for line in proc.stdout:  # its line per trial result ("<trial> <status> ..."): interrupt once one has finished
        said.append(line)
        if line.split()[1:2] == ["TERMINATED"]:
            break
    assert said and said[-1].split()[1:2] == ["TERMINATED"], "".join(said)[-3000:]
    first_trial = said[-1].split()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    # the two trials left are unfinished whether or not Tune had created them yet (it creates a grid's lazily)
    assert proc.returncode == 130 and "interrupted with 2 trials unfinished; re-run to resume: keel sweep" in out, out[-2000:]
    # Keel's lines only: not Tune's pointers into Ray's temporary session directory
    assert "View detailed results here" not in "".join(said) + out and "tensorboard --logdir" not in "".join(said) + out
    sweep, base = load_sweep(path)
    seen = []
    outcome = run_sweep(sweep, base, on_result=lambda rows: seen.append(len(rows)))  # resumes the same experiment
    trial_dirs = [p.name for p in exp.glob("run_trial_*")]
    assert len(trial_dirs) == len(outcome.rows) == 3, trial_dirs  # the finished trial was not run again as a new one
    assert all(sum(r.trial_id in name for name in trial_dirs) == 1 for r in outcome.rows), trial_dirs
    rows = {r.config["optimizer.lr"]: r for r in outcome.rows}
    assert rows[0.05].trial_id == first_trial and rows[0.05].status == "TERMINATED" and rows[0.05].iterations == 3
    first_dir, = exp.glob(f"run_trial_{first_trial}*")
    assert len((first_dir / "result.json").read_text().splitlines()) == 3  # its results kept as they were
    for lr in (1e4, 1e8):
        assert rows[lr].status == "diverged" and rows[lr].iterations <= 2, rows[lr]  # within 2 reports of explosion
        reasons = json.loads((outcome.exp_dir / "keel_diverged.json").read_text())
        assert reasons[rows[lr].trial_id]["iteration"] == rows[lr].iterations
    assert rows[1e8].events >= 10  # its non-finite skips, counted in the report (Tune's loggers take no lists)
    assert outcome.best.config["optimizer.lr"] == 0.05 and outcome.best.metric > 0.8
    assert yaml.safe_load(outcome.best_job.read_text())["optimizer"]["lr"] == 0.05
    assert seen  # the live table was fed
    # results can be re-read from the experiment directory alone
    again = summarize(outcome.exp_dir, "val_accuracy", "max")
    assert {r.trial_id: r.status for r in again.rows} == {r.trial_id: r.status for r in outcome.rows}
    # a diverged trial is never the best, whatever its metric reads (its val_loss is the largest of all)
    assert summarize(outcome.exp_dir, "val_loss", "max").best.config["optimizer.lr"] == 0.05
    assert cli.main(["results", "sweeps/lrs"]) == 0  # relative to where keel runs, as the README's example gives it
    assert "best:" in capsys.readouterr().out
    assert cli.main(["results", "sweeps/lrs", "--metric", "val_acc"]) == 2  # a typo: said so, not "no trial healthy"
    assert "--metric val_acc: no trial reported it (they report train_loss, val_accuracy, val_loss" in capsys.readouterr().err
    # the sweep report marks the diverged trials and plots the metric against the searched parameter
    assert cli.main(["report", str(outcome.exp_dir)]) == 0
    page = (outcome.exp_dir / "report" / "index.html").read_text()
    assert page.count("class='diverged'") == 2 and "2 diverged" in page
    assert (outcome.exp_dir / "report" / "param_0.png").read_bytes()[:4] == b"\x89PNG"
    assert (outcome.exp_dir / "report" / "best_trial.png").exists()
