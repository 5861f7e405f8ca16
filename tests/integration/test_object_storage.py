"""Runs on object storage: a real S3-compatible server (moto's standalone server) on 127.0.0.1, reached the
standard AWS way (AWS_ENDPOINT_URL and keys in the environment; tests/conftest.py starts it for the session).
No Python-level mocking."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs
import pytest
import torch
import yaml

from orchestrator import cli
from orchestrator.train.checkpointing import list_checkpoints
from orchestrator.train.resume import newest_good_index
from tests.helpers import ROOT, cli_here, job_tree, sweep_file

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket on the session's S3 server (tests/conftest.py: it is named in the environment before Ray
    starts, as a user's shell would name it, so every worker and trial sees it too)."""
    name = f"keel-{uuid.uuid4().hex[:8]}"
    store().create_dir(name)
    return name


def store():
    import os

    return pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], access_key="testing",
                                   secret_key="testing", region="us-east-1", allow_bucket_creation=True)


def listing(path: str, kind=None) -> list[str]:
    entries = store().get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in entries if kind is None or i.type == kind)


def keel(capsys, *argv: str) -> tuple[int, str]:
    """`keel ... --quiet` in this process, on the suite's Ray: (exit code, everything it printed)."""
    rc, out, err = cli_here(capsys, *argv, "--quiet")
    return rc, out + err


def temporary_copies() -> set[str]:
    """Keel's downloads from object storage in the temporary directory (the suite's Ray workers share it)."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(("keel-run-", "keel-ckpt-"))}


def read_object(path: str) -> bytes:
    with store().open_input_stream(path) as f:
        return f.read()


def bucket_metrics(run: str) -> list[dict]:
    info = store().get_file_info(f"{run}/metrics.jsonl")
    return [json.loads(line) for line in read_object(info.path).decode().splitlines()] if info.size else []


def remove_report_copy(page: str) -> None:
    """`keel report s3://...` keeps its local copy on purpose (it holds the page it prints); a test's is its own."""
    import shutil

    copy = next(p for p in Path(page).parents if p.name.startswith("keel-run-"))
    shutil.rmtree(copy)


@pytest.mark.timeout(600)
def test_ctrl_c_on_a_keel_run_to_s3_stops_cleanly_and_the_rerun_resumes_past_a_truncated_checkpoint_object(
        keel_ray, digits_dir, tmp_path, tmp_path_factory, bucket, capsys, monkeypatch):
    """A real `keel run` process (its own embedded Ray, as from a shell) checkpoints to the bucket and is
    interrupted (SIGINT) after two epochs: exit 130 and the command that resumes. The newest complete
    checkpoint's state.pt object is then truncated in the bucket; the re-run the message asks for (in this
    process, on the suite's warm Ray) names it, resumes from the one before, and the run's metrics, global
    step and guard state carry over. Nothing is written to the local disk; `keel report` reads the bucket."""
    run = f"{bucket}/runs/sigint"
    downloads_before = temporary_copies()
    tree = job_tree(digits_dir, tmp_path, "sigint", run={"name": "sigint", "storage_path": f"s3://{bucket}/runs", "epochs": 30})
    job = tmp_path / "sigint.yaml"
    job.write_text(yaml.safe_dump(tree))
    shell = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # set in this process by the suite's Ray
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(job), "--quiet"], cwd=tmp_path, text=True,
                            env={**shell, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(bucket_metrics(run)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "to resume" in err and f"keel run {job}" in err and f"s3://{run}" in out + err
    assert "Token authentication is enabled" not in out + err  # Ray's notice at every start of a local cluster
    done = len(bucket_metrics(run))
    # Ctrl-C may have cut the newest upload short: the newest checkpoint that verifies, from a copy elsewhere
    copies = tmp_path_factory.mktemp("s3-copies")  # outside tmp_path, which must stay empty
    pyarrow.fs.copy_files(run, str(copies), source_filesystem=store(), destination_filesystem=pyarrow.fs.LocalFileSystem())
    newest_first = list_checkpoints(copies)[::-1]
    latest = newest_first[newest_good_index(newest_first, warn=lambda message: None)]
    assert {"state.pt", "manifest.json", "config.yaml"} <= {p.name for p in latest.iterdir()}
    epoch = torch.load(latest / "state.pt", weights_only=False)["epoch"]
    damaged = f"{run}/{latest.name}/state.pt"
    data = read_object(damaged)
    with store().open_output_stream(damaged) as f:
        f.write(data[: len(data) // 2])

    monkeypatch.chdir(tmp_path)
    rc, said = keel(capsys, "run", str(job), f"run.epochs={epoch + 2}")
    assert rc == 0, said[-3000:]
    assert damaged in said and "truncated" in said, said[-3000:]  # the bad checkpoint is named ...
    assert f"resumed from checkpoint: continuing at epoch {epoch + 1}" in said, said[-3000:]  # ... and the one before used
    metrics = bucket_metrics(run)
    assert [h["epoch"] for h in metrics] == [*range(done), epoch, epoch + 1]  # the bucket's metrics continue
    assert metrics[-2]["step"] == (epoch + 1) * metrics[0]["step"]  # the global step carried over
    newest = [n for n in listing(run, pyarrow.fs.FileType.Directory) if n.startswith("checkpoint_")][-1]
    state = torch.load(io.BytesIO(read_object(f"{run}/{newest}/state.pt")), weights_only=False)
    assert state["epoch"] == epoch + 1 and json.dumps(state["safeguards"])  # guard state travels with it, as plain data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sigint.yaml"]  # nothing written locally
    assert {"config.yaml", "metrics.jsonl", "placement.json", "stability_report.json"} <= set(listing(run))
    # the driver's mirrors and the worker's copy of the older checkpoint are gone (runs on the cluster leave
    # no copies behind in /tmp; only the report below keeps its local copy, the page it shows)
    assert temporary_copies() == downloads_before

    assert cli.main(["report", f"s3://{run}"]) == 0  # read from the bucket
    page = capsys.readouterr().out.split("report: ")[-1].strip()
    assert page.endswith(".html") and "val accuracy" in open(page).read().lower()
    remove_report_copy(page)


def test_fine_tuning_from_a_checkpoint_in_the_bucket_reads_it_and_keeps_no_copy(tmp_path, bucket):
    """init_from.checkpoint: s3://...: the driver's check and rank 0's load each download the checkpoint; the
    copy is removed once read (a Ray worker is killed at the run's end, so it would never be)."""
    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components
    from orchestrator.train.warm_start import read_checkpoint
    from tests.unit.test_warm_start import job

    comps = build_components(job(), 4, torch.device("cpu"))
    save_checkpoint(tmp_path / "run" / "checkpoint_000", comps, epoch=0, spec_yaml=yaml.safe_dump({}))
    pyarrow.fs.copy_files(str(tmp_path / "run"), f"{bucket}/run", source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=store())
    before = temporary_copies()
    payload = read_checkpoint(f"s3://{bucket}/run")  # a run directory stands for its newest checkpoint
    saved = comps.state.model.state_dict()
    assert payload["epoch"] == 0 and all(torch.equal(payload["model"][k], v) for k, v in saved.items())
    assert temporary_copies() == before


def test_a_missing_bucket_or_a_bad_uri_is_one_line_exit_2_before_anything_starts(digits_dir, tmp_path, bucket, capsys):
    for storage, expected in ((f"s3://no-such-{bucket}/runs", f"bucket 'no-such-{bucket}' does not exist"),
                              ("nosuchscheme://x/runs", "not a storage URI pyarrow can open")):
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(job_tree(digits_dir, tmp_path, "bad", run={"name": "bad", "storage_path": storage})))
        assert cli.main(["run", str(job), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.count("run.storage_path") == 1 and expected in err, err
    sweep = sweep_file(tmp_path, digits_dir, "nobucket", [0.1], storage_path=f"s3://no-such-{bucket}/sweeps")
    assert cli.main(["sweep", str(sweep), "--quiet"]) == 2  # a sweep's own storage_path, before Ray starts
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"storage_path: s3://no-such-{bucket}/sweeps" in err, err
    assert listing(bucket) == []


@pytest.mark.timeout(900)
def test_a_pbt_sweep_on_s3_clones_a_diverged_trial_from_its_donor_there_and_keel_results_reads_it(keel_ray, digits_dir, tmp_path,
                                                                                                   bucket, capsys, monkeypatch, recwarn):
    # Two trials side by side: lr 0.05 trains, lr 1e4 diverges in its first epoch (Keel's guard ends its
    # run). Stock PBT ignores NaN scores; Keel's trial reports the worst score instead, so PBT's exploit
    # clones the good trial over it, from the good trial's checkpoint in the bucket.
    # A ResNet, not the MLP: PBT clones only from trials still running, so the good one must outlast
    # the bad one's first reports (with the MLP, under load, it finished within 2 s of them). 3 epochs: the
    # good trial ends while the clone restarts, so PBT (which ranks only running trials) clones just once.
    model = ["model.kind=resnet", "model.channels=[16,32]", "model.blocks_per_stage=1"]
    path = sweep_file(tmp_path, digits_dir, "pbt", [0.05, 1e4], max_concurrent_trials=2, overrides=["run.epochs=3", *model],
                      scheduler={"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5},
                      storage_path=f"s3://{bucket}/sweeps")
    tree = yaml.safe_load(path.read_text())
    tree["search"]["regularization.weight_decay"] = {"choice": [0.0, 1e-5]}  # PBT needs a mutation to explore
    path.write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)
    rc, swept = keel(capsys, "sweep", str(path))
    assert rc == 0, swept[-3000:]
    assert not (tmp_path / "sweeps").exists()  # the experiment lives in the bucket only
    assert not [str(w.message) for w in recwarn if "reuse_actors" in str(w.message)]  # Tune's advice, not the user's

    with store().open_input_stream(f"{bucket}/sweeps/pbt/keel_diverged.json") as f:
        (bad_id, record), = json.loads(f.read()).items()
    assert cli.main(["results", f"s3://{bucket}/sweeps/pbt", "--json"]) == 0  # Tune's analysis, read from the bucket
    results = json.loads(capsys.readouterr().out)
    good = next(r for r in results["trials"] if r["trial_id"] != bad_id)
    bad = next(r for r in results["trials"] if r["trial_id"] == bad_id)
    assert record["cloned_from"] == good["trial_id"], record        # replaced by a clone of the good trial
    assert record["loaded_donor_weights"] == 1, record              # its workers hold the donor checkpoint's weights
    assert bad["status"] == "TERMINATED" and "replaced by a clone of" in bad["reason"]
    assert bad["config"]["optimizer.lr"] == 0.05                    # it took the donor's hyper-parameters
    assert bad["metric"] > 0.8 and good["metric"] > 0.8             # and trained on from its weights
    # (the record is Keel's, the rows are Tune's analysis; a restored trial's result.json is not
    # reliable: Tune may leave it at the pre-clone lines, measured)
    assert results["best"] is not None and results["best"]["metric"] > 0.8
    trial_runs = listing(f"{bucket}/sweeps/pbt/trials", pyarrow.fs.FileType.Directory)
    assert f"{bad_id}-r1" in trial_runs, trial_runs                # the clone's own run, checkpointing to the bucket
    assert any(n.startswith("checkpoint_") for n in listing(f"{bucket}/sweeps/pbt/trials/{bad_id}-r1"))
    best_job = swept.split("best config as a job: ")[-1].split()[0]
    assert yaml.safe_load(open(best_job).read())["optimizer"]["lr"] == 0.05   # a local file keel run takes

    assert cli.main(["report", f"s3://{bucket}/sweeps/pbt"]) == 0   # the sweep's report, from the bucket
    page = capsys.readouterr().out.split("report: ")[-1].strip()
    assert page.endswith(".html")
    remove_report_copy(page)
