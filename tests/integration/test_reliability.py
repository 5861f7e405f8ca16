"""Reliability promises in real multi-process runs (see docs/reliability.md)."""

import os
import signal

import pytest

from orchestrator.errors import BadInput
from orchestrator.spec import load_spec, parse_spec
from orchestrator.train.checkpointing import read_payload, state_fingerprint
from orchestrator.train.driver import run_job
from tests.helpers import ROOT, job_tree

pytestmark = pytest.mark.integration


def worker_pids():
    import ray
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


@pytest.mark.timeout(600)
def test_worker_killed_mid_epoch_is_restarted_from_the_last_checkpoint_and_early_stop_is_agreed_across_it(keel_ray, digits_dir, tmp_path):
    # Early stopping that no epoch after the first can satisfy (val_loss must fall by 100), patience 4: every
    # rank stops together after epoch 4, but only if the count of bad epochs survived the restart (epoch 3's
    # killed attempt resumes from epoch 2's checkpoint with 2 bad epochs counted).
    spec = load_spec(ROOT / "jobs/digits-resnet.yaml", [
        "run.name=killed", f"run.storage_path={tmp_path}", "run.epochs=6", "run.max_failures=1",
        f"data.train={digits_dir / 'train.parquet'}", f"data.val={digits_dir / 'val.parquet'}",
        "stability.early_stopping.enabled=true", "stability.early_stopping.metric=val_loss",
        "stability.early_stopping.patience=4", "stability.early_stopping.min_delta=100"])
    killed = {}

    def on_event(event):  # the pump thread: kill a real worker process mid-epoch 4
        if event["type"] == "resumed":  # read now: the run keeps only its newest checkpoints
            killed["on_disk"] = state_fingerprint(read_payload(event["checkpoint"])["model"])
        if event["type"] == "step" and event["epoch"] == 3 and event["step"] > 5 and "pid" not in killed:
            killed["pid"] = worker_pids()[-1]
            os.kill(killed["pid"], signal.SIGKILL)

    events = []
    disturbed = run_job(spec, on_event=lambda e: (events.append(e), on_event(e)))
    assert "pid" in killed, "no worker was killed"
    assert disturbed.status == "early_stopped" and "no improvement for 4 epochs" in disturbed.reason, disturbed.reason
    resumed = [e for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 3  # restarted from the checkpoint of epoch 3, not from scratch
    # every restarted worker holds that checkpoint's weights, bit for bit (the exact continuation after
    # that is tests/unit/test_resume_exact.py)
    assert resumed[0]["ranks"] == 2 and resumed[0]["fingerprint"] == killed["on_disk"]
    assert [h["epoch"] for h in disturbed.history] == [0, 1, 2, 3, 4]  # epoch 3 once: the killed attempt never reported
    assert disturbed.final["val_accuracy"] >= 0.95 and disturbed.final["replica_drift"] == 0.0  # and it trained on


@pytest.mark.timeout(300)
def test_a_hung_peer_fails_the_run_fast_with_a_clear_message(keel_ray, digits_dir, tmp_path):
    tree = job_tree(digits_dir, tmp_path, "hang", faults=[{"kind": "hang", "at_step": 3, "rank": 1}],
                    scaling={"num_workers": 2, "collective_timeout_s": 10})
    outcome = run_job(parse_spec(tree))  # the test's own timeout bounds a hang; the reason names the 10 s limit
    assert outcome.status == "failed" and "collective timed out after 10 s" in outcome.reason


@pytest.mark.timeout(120)
def test_more_resources_than_the_cluster_has_fail_with_a_clear_message(keel_ray, digits_dir, tmp_path):
    tree = job_tree(digits_dir, tmp_path, "huge", scaling={"num_workers": 2, "cpus_per_worker": 64, "address": "auto",
                                                            "resource_wait_s": 2})
    with pytest.raises(BadInput, match=r"2 workers need 129 CPUs \(64 each \+ 1 for Ray Data's tasks\) and 0 GPUs but "
                                       r"the cluster has \d+ CPUs.*waited 2 s"):
        run_job(parse_spec(tree))
