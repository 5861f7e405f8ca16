"""Planning a run without a cluster: CPUs per worker that never starve the data pipeline, what a failed run
says (every backend's way of reporting a hung peer becomes the same clear line), and one run at a time per run
directory."""

import os
import sys
from pathlib import Path

import pytest

from orchestrator.errors import BadInput
from orchestrator.spec import parse_spec
from orchestrator.train.driver import failure_reason
from orchestrator.train.run_lock import run_directory_lock
from orchestrator.train.planning import DATA_RESERVE_CPUS, fit_cpus_per_worker

SPEC = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 2},
                   "scaling": {"num_workers": 2, "collective_timeout_s": 10}, "run": {"name": "r"}})


@pytest.mark.parametrize("text", [
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation to complete",
    "RuntimeError: Application timeout caused pair closure",  # gloo, seen in CI on a loaded 2-core machine
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)",
])
def test_a_hung_peer_is_named_with_the_setting_that_bounds_the_wait(text):
    reason = failure_reason(RuntimeError(f"worker failed\n{text}"), SPEC)
    assert "collective timed out after 10 s" in reason and "scaling.collective_timeout_s" in reason


@pytest.mark.parametrize("last", ["ValueError: bad shape [3, 4]", "ValueError: invalid timeout value -1 for the data loader"])
def test_any_other_failure_keeps_its_own_last_line(last):
    assert failure_reason(ValueError(f"Traceback ...\n  File x\n{last}\n"), SPEC) == last


def test_a_failure_is_its_error_line_not_a_hint_printed_after_it():
    text = "Traceback ...\n  File x\nKeyError: 'logits'\nDuring handling, set KEEL_DEBUG to see more\n"
    assert failure_reason(RuntimeError(text), SPEC) == "KeyError: 'logits'"


def test_ddps_unused_parameter_error_says_which_setting_mends_it():
    # what Ray keeps of it (the snippet's tail): the error's own first line is cut off
    text = ("Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n"
            "   ...\n... (Output truncated. See individual worker logs for full details) ...\n"
            " tensors in the return value of your module's `forward` function.\n"
            "Parameter indices which did not receive grad for rank 0: 4 5\n"
            " In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL\n")
    reason = failure_reason(RuntimeError(text), SPEC)
    assert "scaling.find_unused_parameters: true" in reason and "parameter indices 4 5 on rank 0" in reason, reason


def workers(n, cpus=None):
    return parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": {"num_workers": n, "cpus_per_worker": cpus}, "run": {"name": "r"}})


@pytest.mark.parametrize("n, cpus, total, expected", [
    (2, None, 2, 0.5),     # this machine, or a 2-CPU head: one CPU stays free for Ray Data
    (2, None, 64, 1.0),    # a big node: one CPU each
    (4, None, 3, 0.5),
    (8, None, 2, None),    # 0.125 each is no use: refused
    (2, 1.0, 2, None),     # asked for 1 each on 2 CPUs: Ray Data would never run (the 14-minute hang)
    (2, 0.5, 2, 0.5),
    (2, None, 0, None),    # a CPU-less head before the autoscaler adds workers: wait
])
def test_workers_always_leave_cpus_for_the_data_pipeline(n, cpus, total, expected):
    got = fit_cpus_per_worker(workers(n, cpus), total)
    assert got == expected
    if got is not None:
        assert n * got + DATA_RESERVE_CPUS <= total


class FakeCluster:
    """A cluster whose CPUs/GPUs appear when an autoscaler acts on a resource request."""

    def __init__(self, now: dict, after_request: dict):
        self.now, self.after_request, self.requests = now, after_request, []

    def cluster_resources(self):
        return dict(self.now)

    def request_resources(self, bundles):
        self.requests.append(bundles)
        self.now = dict(self.after_request)


def on_fake_cluster(monkeypatch, cluster):
    import ray
    import ray.autoscaler.sdk

    monkeypatch.setattr(ray, "cluster_resources", cluster.cluster_resources)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", cluster.request_resources)
    monkeypatch.setattr("time.sleep", lambda s: None)


def plan_for(spec):
    from orchestrator.train.planning import Plan

    return Plan(100, 10, [3], spec.scaling.cpus_per_worker or 1.0)


def test_a_cpu_less_head_asks_the_autoscaler_for_the_workers_and_the_data_cpu(monkeypatch):
    from orchestrator.train.planning import wait_for_resources

    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": {"num_workers": 4, "use_gpu": True, "address": "auto"}, "run": {"name": "r"}})
    cluster = FakeCluster(now={"CPU": 0}, after_request={"CPU": 16, "GPU": 4})
    on_fake_cluster(monkeypatch, cluster)
    plan = plan_for(spec)
    wait_for_resources(spec, plan)
    assert cluster.requests == [[{"CPU": 1.0, "GPU": 1}] * 4 + [{"CPU": DATA_RESERVE_CPUS}]]  # asked once, for all
    assert plan.cpus_per_worker == 1.0


def test_a_cluster_that_never_grows_fails_in_one_line_naming_the_field(monkeypatch):
    from orchestrator.train.planning import wait_for_resources

    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": {"num_workers": 2, "use_gpu": True, "address": "auto", "resource_wait_s": 0.2},
                       "run": {"name": "r"}})
    cluster = FakeCluster(now={"CPU": 8}, after_request={"CPU": 8})  # no GPUs ever come
    on_fake_cluster(monkeypatch, cluster)
    with pytest.raises(BadInput, match=r"^scaling: 2 workers need .* and 2 GPUs but the cluster has 8 CPUs and 0 GPUs "
                                       r"\(waited 0.2 s, scaling.resource_wait_s\)$"):
        wait_for_resources(spec, plan_for(spec))
    assert len(cluster.requests) == 1  # asked once, not at every poll of the wait


def test_the_embedded_local_ray_never_asks_an_autoscaler(monkeypatch):
    from orchestrator.errors import BadInput
    from orchestrator.train.planning import wait_for_resources

    spec = workers(2, 1.5)
    cluster = FakeCluster(now={"CPU": 2}, after_request={"CPU": 64})
    on_fake_cluster(monkeypatch, cluster)
    with pytest.raises(BadInput, match=r"\(the local machine\)$"):
        wait_for_resources(spec, plan_for(spec))
    assert cluster.requests == []


def test_a_plan_made_for_the_same_data_is_reused_without_a_second_scan(tmp_path, monkeypatch):
    # A sweep scans its base job's data once; a trial that only changes the batch size or the workers
    # reuses that scan (no file is read again) and is still checked against it.
    from orchestrator.data.generators import GENERATORS
    from orchestrator.errors import BadInput
    from orchestrator.train import planning

    GENERATORS["digits"](tmp_path)
    job = {"model": {"kind": "mlp"}, "data": {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"),
                                              "shape": [64], "num_classes": 10, "batch_size": 32},
           "scaling": {"num_workers": 1}, "run": {"name": "r", "epochs": 2}}
    base = planning.preflight(parse_spec(job))
    assert base.epoch_rows == [base.train_rows] * 2 and base.steps_per_epoch == [base.train_rows // 32] * 2

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")
    monkeypatch.setattr(planning, "scan_split", no_scan)
    trial = planning.preflight(parse_spec({**job, "data": {**job["data"], "batch_size": 64}}), same_data=base)
    assert trial.steps_per_epoch == [base.train_rows // 64] * 2 and trial.preprocess is base.preprocess
    with pytest.raises(BadInput, match="data.batch_size: 100000 x 1 workers is more than"):
        planning.preflight(parse_spec({**job, "data": {**job["data"], "batch_size": 100000}}), same_data=base)


@pytest.mark.parametrize("config, reuses", [
    ({"optimizer.lr": 0.1, "data.batch_size": 64, "data.augment.mixup_alpha": 0.2}, True),
    ({"data.preprocess.standardize": "none"}, False),   # the statistics change
    ({"data.augment.soft_labels": True}, False),         # so do the label statistics
    ({"run.epochs": 3}, False),                          # the epochs' pools
    ({"data.curriculum.enabled": True}, False),
])
def test_which_trials_reuse_the_base_scan(config, reuses):
    from orchestrator.sweep.trial import reuses_scan

    assert reuses_scan(config) is reuses


@pytest.mark.parametrize("scaling, run, in_process", [
    ({"num_workers": 1}, {}, True),                                   # nothing to synchronize: train right here
    ({"num_workers": 2}, {}, False),
    ({"num_workers": [1, 2]}, {}, False),                             # elastic: a worker group that can grow
    ({"num_workers": 1, "use_gpu": True}, {}, False),                 # the GPU is the workers', not the driver's
    ({"num_workers": 1}, {"max_failures": 1}, False),                 # restarts need a worker group
    ({"num_workers": 1, "address": "127.0.0.1:6379"}, {}, False),     # on a cluster the driver may be a laptop
])
def test_which_runs_train_in_keels_own_process(scaling, run, in_process, monkeypatch):
    from orchestrator.train.in_process import runs_in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": scaling, "run": {"name": "r", **run}})
    assert runs_in_process(spec) is in_process


@pytest.mark.parametrize("resources, max_failures, cpu", [
    ({"workers_per_trial": 1, "cpus_per_worker": 0.5}, 0, 0.55),  # the trial's process trains: it holds the CPUs
    ({"workers_per_trial": 2, "cpus_per_worker": 0.5}, 0, 0.05),  # its workers hold theirs
    ({"workers_per_trial": 1, "gpus_per_worker": 1}, 0, 0.05),
    ({"workers_per_trial": 1, "cpus_per_worker": 0.5}, 2, 0.05),
])
def test_a_sweep_trial_that_trains_in_its_own_process_reserves_its_workers_cpus(resources, max_failures, cpu):
    from orchestrator.sweep.spec import SweepSpec
    from orchestrator.sweep.trial import trial_resources

    sweep = SweepSpec.model_validate({"name": "s", "base": {}, "search": {"optimizer.lr": {"grid": [0.1]}}, "resources": resources})
    base = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": {"num_workers": 2}, "run": {"name": "r", "max_failures": max_failures}})
    assert trial_resources(sweep, base) == {"cpu": pytest.approx(cpu)}


def test_a_one_worker_job_submitted_to_a_cluster_trains_on_a_worker_not_in_the_jobs_entrypoint(monkeypatch):
    from orchestrator.train.in_process import runs_in_process

    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "scaling": {"num_workers": 1}, "run": {"name": "r"}})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what Ray Jobs sets for an entrypoint
    assert not runs_in_process(spec)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # keel submit's Jobs API address: a local run
    assert runs_in_process(spec)


def test_training_workers_start_at_niceness_0_unless_the_user_set_ray_worker_niceness(monkeypatch):
    from orchestrator.train.driver import training_worker_env

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert training_worker_env() == {"env_vars": {"RAY_worker_niceness": "0"}}  # Ray's own default is 15
    monkeypatch.setenv("RAY_worker_niceness", "10")  # e.g. a shared node where training should yield
    assert training_worker_env() == {"env_vars": {"RAY_worker_niceness": "10"}}


def _resnet_tree(tmp_path, **sections) -> dict:
    tree = {"model": {"kind": "resnet", "channels": [8, 16], "blocks_per_stage": 1},
            "data": {"train": "t", "val": "v", "shape": [1, 8, 8], "num_classes": 10},
            "optimizer": {"name": "adam", "lr": 0.001}, "regularization": {"weight_decay": 1e-4},
            "run": {"name": "r", "storage_path": str(tmp_path)}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


@pytest.mark.parametrize("change, error", [
    ({}, None),
    ({"optimizer": {"name": "adamw"}}, None),  # the same state (exp_avg, exp_avg_sq, step): it loads and steps
    ({"optimizer": {"lr": 0.1, "betas": [0.9, 0.95]}}, None),  # hyper-parameters may change on resume
    ({"model": {"channels": [8, 32]}}, r"checkpoint_x: the job's model does not fit this run's checkpoint \(run.name r "
                                       r"resumes from it\): .* is \(16, 8, 3, 3\) in the checkpoint, \(32, 8, 3, 3\) in this model"),
    ({"optimizer": {"name": "sgd"}}, r"^optimizer.name: sgd, but run.name r resumes from .*checkpoint_x, written with adam"),
    ({"regularization": {"exclude_norm_and_bias": False}},
     r"^regularization.exclude_norm_and_bias: this job groups the optimizer's parameters as \[\d+, 0\], but .*whose groups are \[\d+, \d+\]"),
    # the network learned on inputs prepared one way (a run begun before standardize: auto standardised tabular rows)
    ({"data": {"preprocess": {"standardize": "per_channel"}}},
     r"^data.preprocess.standardize: per_channel, but run.name r resumes from .*checkpoint_x, trained on inputs with standardize none; "
     r"set data.preprocess.standardize: none, or a new run.name$"),
    ({"data": {"preprocess": {"impute": "mean"}}}, r"^data.preprocess.impute: mean, but .*trained on inputs with impute none"),
])
def test_a_rerun_that_would_resume_into_a_model_or_optimizer_that_does_not_fit_is_bad_input_before_ray(tmp_path, change, error):
    """What the first step after resuming would fail on (torch's 'step' KeyError, a page of shapes), as one line."""
    from orchestrator.errors import BadInput
    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components
    from orchestrator.train.planning import check_resume_fits

    spec = parse_spec(_resnet_tree(tmp_path))
    comps = build_components(spec, steps_per_epoch=4, device=__import__("torch").device("cpu"))
    save_checkpoint(tmp_path / "r" / "checkpoint_x", comps, epoch=0, spec_yaml=spec.to_yaml())
    rerun = parse_spec(_resnet_tree(tmp_path, **change))
    if error is None:
        check_resume_fits(rerun)
    else:
        with pytest.raises(BadInput, match=error):
            check_resume_fits(rerun)
    check_resume_fits(parse_spec(_resnet_tree(tmp_path, run={"name": "another"})))  # a new run.name: nothing to resume


@pytest.mark.parametrize("under", ["", "x/y"])
def test_a_storage_path_through_a_file_is_bad_input_naming_the_field_not_a_traceback(tmp_path, under):
    from orchestrator.errors import BadInput
    from orchestrator.train.planning import preflight

    (tmp_path / "afile").write_text("")
    spec = parse_spec(_resnet_tree(tmp_path, run={"storage_path": str(tmp_path / "afile" / under)}))
    with pytest.raises(BadInput, match=f"^run.storage_path: {tmp_path / 'afile'} is a file, not a directory$"):
        preflight(spec)


def test_only_a_run_that_resumes_is_held_to_its_checkpoint_not_a_sweeps_base_job_or_keel_checks_runs(tmp_path):
    from orchestrator.errors import BadInput
    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components
    from orchestrator.train.planning import preflight

    spec = parse_spec(_resnet_tree(tmp_path))
    save_checkpoint(tmp_path / "r" / "checkpoint_x", build_components(spec, 4, __import__("torch").device("cpu")),
                    epoch=0, spec_yaml=spec.to_yaml())
    other_model = parse_spec(_resnet_tree(tmp_path, model={"channels": [4, 4]}))
    with pytest.raises(BadInput, match="does not fit this run's checkpoint"):
        preflight(other_model)
    with pytest.raises(BadInput, match="^data.train: "):  # on to the next check: the (absent) data
        preflight(other_model, resumes=False)


def test_a_storage_path_this_user_cannot_write_is_one_line_before_ray_or_when_the_run_claims_its_directory(tmp_path, monkeypatch):
    """Before, a run directory that could not be made was three chained tracebacks from the run lock, exit 1."""
    from orchestrator.train.planning import check_local_storage

    check_local_storage(tmp_path / "runs" / "r")  # writable: nothing to say
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(BadInput, match=f"^run.storage_path: {tmp_path} is not writable by this user; choose another run.storage_path$"):
        check_local_storage(tmp_path / "runs" / "r")  # (the test runs as root, whom a read-only mode does not stop)
    monkeypatch.undo()
    # what even root cannot write (a path under /proc): the lock, taken when the run first writes, says so
    with run_directory_lock(Path("/proc/keel-no-such/r")) as claim:
        with pytest.raises(BadInput, match="^run.storage_path: cannot write the run directory /proc/keel-no-such/r: No such file or directory$"):
            claim()


def test_a_run_counts_as_already_trained_only_when_its_newest_checkpoint_is_intact_and_holds_every_epoch(tmp_path):
    """keel run of a finished local run answers without Ray; a damaged newest checkpoint or more epochs to go
    leave it to the run (which resumes, falling back to an older checkpoint if need be)."""
    import torch
    import yaml

    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components
    from orchestrator.train.driver import already_trained

    spec = parse_spec(_resnet_tree(tmp_path, run={"epochs": 2}))
    comps = build_components(spec, 4, torch.device("cpu"))
    for epoch in (0, 1):
        save_checkpoint(tmp_path / "r" / f"checkpoint_00{epoch}", comps, epoch=epoch, spec_yaml=yaml.safe_dump({}))
    assert already_trained(spec) == (tmp_path / "r" / "checkpoint_001", 2)
    assert already_trained(parse_spec(_resnet_tree(tmp_path, run={"epochs": 3}))) is None  # one epoch to go
    state = tmp_path / "r" / "checkpoint_001" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the weights: still loads, fails its manifest
    state.write_bytes(bytes(data))
    assert already_trained(spec) is None


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from orchestrator.train.run_lock import run_directory_lock
with run_directory_lock(Path(sys.argv[1])) as claim:  # a new run's directory: made and locked by claim()
    claim()
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_run_of_a_run_being_trained_stops_at_once_and_names_the_first(digits_dir, tmp_path, monkeypatch):
    """Two `keel run`s of one run.name side by side both trained into one directory (their epochs interleaved in
    metrics.jsonl). Here another process holds the run directory, as a training driver does."""
    import subprocess

    from orchestrator.train import driver
    from tests.helpers import ROOT, job_tree

    started = []  # whether the second run got as far as Ray (the suite may have a Ray of its own already)
    monkeypatch.setattr(driver, "ensure_ray", lambda *args, **kwargs: started.append(args))

    spec = parse_spec(job_tree(digits_dir, tmp_path, "busy"))
    racing = run_directory_lock(tmp_path / "busy")  # a run that began before the first made the directory
    late_claim = racing.__enter__()
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "busy")], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert first.stdout.readline().strip() == "holding"
        refused = rf"^run.name: {tmp_path / 'busy'} is being trained by another keel run \(pid {first.pid} on .*\); wait"
        with pytest.raises(BadInput, match=refused):
            driver.run_job(spec)
        assert not (tmp_path / "busy" / "config.yaml").exists()  # stopped before touching the run
        with pytest.raises(BadInput, match=refused):  # the racing run, as it goes to write: refused too
            late_claim()
    finally:
        racing.__exit__(None, None, None)
        first.kill()
        first.wait()
    assert not started  # and before any Ray
    with run_directory_lock(tmp_path / "busy"):  # the lock went with the process that held it
        pass
