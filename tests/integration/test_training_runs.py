"""Real 2-worker runs through the same path as `keel run`: the main job and fine-tuning, NaN and outlier skips, divergence."""

import json

import pytest
import yaml

from orchestrator import cli
from orchestrator.train.run_files import read_metrics
from orchestrator.train.checkpointing import list_checkpoints
from tests.helpers import ROOT, job_tree

pytestmark = pytest.mark.integration


@pytest.mark.timeout(420)
def test_main_job_reaches_95_percent_on_digits(keel_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the job writes its data and runs relative to the working directory
    from orchestrator.train import planning
    scanned, scan = [], planning.scan_split
    monkeypatch.setattr(planning, "scan_split", lambda path, *a, **k: scanned.append(path) or scan(path, *a, **k))
    assert cli.main(["data", "make", "digits", "--out", "data/digits"]) == 0  # written beforehand, as the job names it
    from ray.util.state import list_actors

    def cleaners() -> int:  # Ray Train's placement-group cleaners the suite's Ray has seen (sweep trials start them)
        return len(list_actors(filters=[("class_name", "=", "PlacementGroupCleaner")], limit=10000))
    cleaners_before = cleaners()
    rc = cli.main(["run", str(ROOT / "jobs/digits-resnet.yaml"), "--quiet"])
    assert rc == 0, capsys.readouterr()
    assert len(scanned) == 2, scanned  # each split's data scanned once per run (the CLI's check is reused)
    assert cleaners() == cleaners_before  # on the embedded Ray: no placement-group cleaner, one process fewer per run
    run_dir = tmp_path / "runs" / "digits-resnet"
    history = read_metrics(run_dir)
    assert max(h["val_accuracy"] for h in history) >= 0.95
    assert all(h["replica_drift"] == 0.0 for h in history)
    # the workers run at niceness 0, not Ray's 15 (preempted by any nice-0 process, a rank stalls its peers)
    placement = json.loads((run_dir / "placement.json").read_text())
    assert [p["niceness"] for p in placement] == [0, 0], placement
    assert {"train_loss", "val_loss", "grad_norm_mean", "grad_norm_max", "lr", "skipped_steps", "samples_per_s",
            "data_wait_frac"} <= history[-1].keys()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["name"] == "digits-resnet" and saved["model"]["kind"] == "resnet"
    assert saved["data"]["train"] == str(tmp_path / "data/digits/train.parquet")  # resolved, absolute
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints and yaml.safe_load((checkpoints[-1] / "config.yaml").read_text()) == saved
    assert "best val accuracy" in capsys.readouterr().out
    # the files people's tools read: CSV, TensorBoard (read back with TensorBoard's own reader), report
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == len(history) and float(rows[-1]["val_accuracy"]) == pytest.approx(history[-1]["val_accuracy"])
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("epoch/train_loss")]
    assert losses == pytest.approx([h["train_loss"] for h in history], rel=1e-5)
    pre, post = events.Scalars("step/grad_norm"), events.Scalars("step/grad_norm_post_clip")
    assert len(pre) >= len(history) and len(post) == len(pre)
    assert all(b.value <= min(a.value, 1.0) + 1e-4 for a, b in zip(pre, post))  # clip.max_norm = 1.0
    assert cli.main(["report", str(run_dir)]) == 0
    report = run_dir / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"loss.png", "grad_norm.png", "lr.png", "throughput.png", "layers.png"} <= set(pngs)
    assert all((report / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (report / "index.html").read_text()
    assert all(f"src='{p}'" in page for p in pngs) and "best val accuracy" in page

    # ... and then fine-tuned on shifted digits, as the README says: the main run's newest checkpoint is the
    # starting point (bit for bit), and every epoch reports the original digits too (forgetting)
    capsys.readouterr()
    assert cli.main(["run", str(ROOT / "jobs/digits-finetune.yaml"), "run.epochs=3", "--quiet"]) == 0, capsys.readouterr()
    said = capsys.readouterr().out
    shift = json.loads((tmp_path / "runs" / "digits-finetune" / "drift.json").read_text())
    assert shift["comparable"] and shift["major"] > 10 and "drift: major shift against the checkpoint's training data" in said
    tuned = read_metrics(tmp_path / "runs" / "digits-finetune")
    newest = list_checkpoints(run_dir)[-1]
    from orchestrator.train.checkpointing import read_payload, state_fingerprint
    start = tuned[0]["init_from"]
    assert start["reset"] == [] and start["fingerprint"] == state_fingerprint(read_payload(newest)["model"])
    assert all("val_accuracy_original" in h for h in tuned)
    assert tuned[-1]["val_accuracy"] >= 0.8, [(h["val_accuracy"], h["val_accuracy_original"]) for h in tuned]
    assert cli.main(["validate", str(ROOT / "jobs/digits-finetune.yaml")]) == 0  # keel validate says it too
    assert "drift: major shift" in capsys.readouterr().out
    # the fine-tuning run's report shows what it forgot and how far the data drifted
    assert cli.main(["report", str(tmp_path / "runs" / "digits-finetune")]) == 0
    tuned_page = (tmp_path / "runs" / "digits-finetune" / "report" / "index.html").read_text()
    from orchestrator.report.console import fmt
    assert f"final val accuracy (original)</td><td>{fmt(tuned[-1]['val_accuracy_original'])}</td>" in tuned_page
    assert "<h2>Drift from the checkpoint" in tuned_page and "drift: major shift" in tuned_page
    assert "src='accuracy.png'" in tuned_page and "src='loss.png'" in tuned_page


@pytest.mark.timeout(300)
def test_a_nan_batch_is_skipped_and_an_outlier_on_rank_1_only_stops_both_ranks_with_exit_1(keel_ray, digits_dir, tmp_path, capsys):
    """A NaN batch on every rank at step 40 is skipped. Then 1e4x batches on rank 1 only: every loss and
    gradient stays finite (the trigger recorded below is 'batch_outlier', which is only chosen when no rank
    saw a non-finite value), so only the agreed flag can tell rank 0. From step 70 rank 1's batches are all
    outliers: after 3 consecutive skips the run ends diverged, exit 1. Reports carry rank 0's view."""
    faults = [{"kind": "nan_batch", "at_step": 40},
              {"kind": "huge_batch", "at_step": 55, "factor": 1e4, "rank": 1},
              {"kind": "huge_batch", "at_step": 70, "repeat": 1000, "factor": 1e4, "rank": 1}]
    tree = job_tree(digits_dir, tmp_path, "outlier", faults=faults, data={**job_tree(digits_dir, tmp_path, "x")["data"], "batch_size": 16},
                    stability={"nonfinite": {"max_consecutive_skips": 3}})
    job = tmp_path / "outlier.yaml"
    job.write_text(yaml.safe_dump(tree))
    assert cli.main(["run", str(job), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "diverged: 3 consecutive non-finite steps" in err and "at step 72" in err, err
    history = read_metrics(tmp_path / "outlier")
    events = [(e["step"], e["trigger"], e["action"]) for h in history for e in h["events"] if e["trigger"] != "fault"]
    assert events == [(40, "nonfinite", "skip"), (55, "batch_outlier", "skip"), (70, "batch_outlier", "skip"),
                      (71, "batch_outlier", "skip"), (72, "batch_outlier", "skip")]
    assert all(h["replica_drift"] == 0.0 for h in history)  # no rank stepped alone
    assert [h["skipped_steps"] for h in history] == [1, 5] and history[-1]["diverged"] == 1
    # remembered in the run directory by (epoch, index in the epoch), for a resume to drop them again
    remembered = json.loads((tmp_path / "outlier" / "bad_batches.json").read_text())
    assert [(b["step"], b["trigger"]) for b in remembered] == [(s, t) for s, t, _ in events]
    epoch_start = {h["epoch"] + 1: h["step"] for h in history} | {0: 0}
    assert all(b["index"] == b["step"] - epoch_start[b["epoch"]] for b in remembered)


@pytest.mark.timeout(300)
def test_a_one_worker_run_trains_in_this_process_keeps_its_newest_checkpoints_and_a_rerun_resumes_from_them(
        keel_ray, digits_dir, tmp_path, capsys):
    import os

    from orchestrator.train.checkpointing import read_payload, verify_checkpoint
    from tests.helpers import cli_here

    storage = tmp_path / "runs"
    tree = job_tree(digits_dir, storage, "solo", model={"kind": "mlp", "hidden": [64]}, scaling={"num_workers": 1},
                    run={"name": "solo", "storage_path": str(storage), "epochs": 3, "keep_checkpoints": 2})
    job = tmp_path / "solo.yaml"
    job.write_text(yaml.safe_dump(tree))
    rc, out, err = cli_here(capsys, "run", str(job), "--quiet")
    assert rc == 0, err
    run_dir = storage / "solo"
    placement = json.loads((run_dir / "placement.json").read_text())
    assert [p["pid"] for p in placement] == [os.getpid()]  # Ray Train's local mode: no worker process was started
    kept = list_checkpoints(run_dir)  # stored under Ray Train's names, the oldest dropped as Ray Train would
    assert [read_payload(c)["epoch"] for c in kept] == [1, 2], kept
    verify_checkpoint(kept[-1])
    assert not list(run_dir.glob(".checkpoint_*"))  # nothing left half-copied
    # a rerun whose model no longer fits the checkpoint it would resume from: bad input, before anything is touched
    files_before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out, err = cli_here(capsys, "run", str(job), "run.epochs=4", "model.hidden=[32]", "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{kept[-1]}: the job's model does not fit" in err and "1.weight is (64, 64) in the checkpoint, (32, 64)" in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files_before  # config.yaml too
    rc, out, err = cli_here(capsys, "run", str(job), "run.epochs=4", "--quiet")
    assert rc == 0, err
    history = read_metrics(run_dir)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["resumed_from"]["checkpoint"] == str(kept[-1])
    assert read_payload(list_checkpoints(run_dir)[-1])["epoch"] == 3
    # more epochs: the cosine schedule of a 4-epoch run, replayed to where the 3-epoch run stopped, ends at 0. The
    # checkpoint's own 3-epoch cosine, run a third past its end, had climbed back to a quarter of the peak LR
    assert history[-1]["resumed_from"]["changed"] == ["run.epochs 3 → 4"]
    assert history[-1]["lr"] < 1e-6, [h["lr"] for h in history]
    # the same again with another LR: 4 of 4 epochs trained. Said at once, with the run's own results and the
    # change this job asked for that a finished run does not make; nothing started or written
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    rc, out, err = cli_here(capsys, "run", str(job), "run.epochs=4", "optimizer.lr=0.02", "--quiet")
    said = " ".join(out.split())
    assert rc == 0 and "4 epochs already trained, run.epochs is 4: nothing to train" in said, out + err
    assert "this job changed optimizer.lr 0.1 → 0.02, which a finished run does not train with" in said, said
    from orchestrator.report.console import fmt
    assert f"final val accuracy │ {fmt(history[-1]['val_accuracy'])} │" in " ".join(out.split()), out
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == written
