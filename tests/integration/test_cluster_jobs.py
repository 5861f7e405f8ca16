"""`keel submit` / `keel jobs` against a real head started with `ray start --head` on 127.0.0.1."""

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import yaml

from orchestrator.train.checkpointing import list_checkpoints
from tests.helpers import ROOT, cli_here

pytestmark = pytest.mark.integration


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1. Every socket stays bound until all are picked: picked one at a
    time, the kernel can hand the same port out twice (seen: the head's GCS and client-server ports collided
    and `ray start` failed)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def kill_processes_with_env(marker: bytes) -> None:
    """Kill exactly the head's processes: all inherit its unique token (several rename their titles,
    so matching on the command line misses them, e.g. ray::DashboardAgent)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read():
                    os.kill(int(pid), 9)
        except (OSError, ProcessLookupError):
            continue


def keel(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)


def cluster_state(address: str, env: dict) -> dict:
    """The head node's id, the live nodes' ids and every live actor's (class, node), from Ray's state API as a
    client sees it."""
    code = ("import json, sys; from ray.util.state import list_actors, list_nodes; a = sys.argv[1]; n = list_nodes(address=a); "
            "print(json.dumps({'head': next(x.node_id for x in n if x.is_head_node), "
            "'nodes': [x.node_id for x in n if x.state == 'ALIVE'], "
            "'actors': [(x.class_name, x.node_id) for x in list_actors(address=a, filters=[('state', '=', 'ALIVE')])]}))")
    proc = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class TwoNodeCluster:
    """A token-authenticated cluster on this machine that this module's tests share (one start-up, not three):
    a 3-CPU head (`ray start --head`) and a 2-CPU second node (`ray start --address`), each in its own temp dir.
    The elastic test adds the second node and the node-loss test, last, kills it; tests run in file order, so
    neither waits, and a test run alone first puts the second node in the state it needs. Stopped by killing
    only the processes it started (all inherit its unique token)."""

    def __init__(self, head_cpus: int = 3, node_cpus: int = 2):
        self.node_cpus = node_cpus
        self.gcs, dash, client, *agents = free_ports(7)
        token = secrets.token_hex(32)
        self.token_marker = f"RAY_AUTH_TOKEN={token}".encode()
        self.server_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        started = subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
                                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={short_temp_dir('kh')}",
                                  f"--num-cpus={head_cpus}", "--include-dashboard=true", "--disable-usage-stats",
                                  f"--ray-client-server-port={client}", *agent_ports(agents)],
                                 env=self.server_env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:  # what a half-started head left behind goes too
            self.stop()
            raise AssertionError(f"ray start --head failed:\n{started.stderr[-3000:]}")
        self.node_id = secrets.token_hex(8)  # in the second node's environment: kill_processes_with_env takes it alone
        self.node_marker = f"KEEL_TEST_NODE={self.node_id}".encode()
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": ""}  # a client's
        deadline = time.monotonic() + 60
        while keel("jobs", "list", "--address", self.address, env=self.env).returncode != 0:
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("head did not come up")
            time.sleep(1)

    def start_second_node(self) -> None:
        # its own temp dir, as on a real second machine: sharing the head's, its runtime-env agent unpacked the
        # job's working directory over the head's copy and deleted the data the driver had just generated (seen)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{self.gcs}", "--node-ip-address=127.0.0.1",
                        f"--num-cpus={self.node_cpus}", f"--temp-dir={short_temp_dir('kn')}", "--disable-usage-stats",
                        *agent_ports(free_ports(4))], check=True, capture_output=True, timeout=120,
                       env={**self.server_env, "KEEL_TEST_NODE": self.node_id})

    def alive_nodes(self) -> int:
        return len(cluster_state(self.address, self.env)["nodes"])

    def second_node(self, up: bool) -> None:
        """Bring the second node up or down, if it is not already (only a test run out of order waits here)."""
        if (self.alive_nodes() == 2) == up:
            return
        if up:
            self.start_second_node()
        else:
            kill_processes_with_env(self.node_marker)
        deadline = time.monotonic() + 120  # a killed node is declared dead by the head's health checks
        while (self.alive_nodes() == 2) != up:
            assert time.monotonic() < deadline, f"the second node did not go {'up' if up else 'down'}"
            time.sleep(1)

    def stop(self) -> None:
        kill_processes_with_env(self.token_marker)


def short_temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit


def agent_ports(ports: list[int]) -> list[str]:
    """Every agent on its own port: the suite's local Ray already holds the defaults."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)]


@pytest.fixture(scope="module")
def cluster():
    started = TwoNodeCluster()
    try:
        yield started
    finally:
        started.stop()


def epochs_done(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_no_epoch_lost_across_one_restart(history: list[dict]) -> None:
    """Epochs 0, 1, ... in order, through one restart from the last checkpoint. An epoch whose report reached the
    driver but whose checkpoint was not yet stored when the group stopped (rank 0 waits at the report's barrier
    for a rank that is gone) is trained again from the checkpoint before it, so it appears twice, as it ran."""
    epochs = [h["epoch"] for h in history]
    at = next(i for i, h in enumerate(history) if h.get("resumed_from"))
    assert epochs[:at] == list(range(at)) and epochs[at] in (at - 1, at), epochs  # repeats at most the interrupted epoch
    assert epochs[at:] == list(range(epochs[at], epochs[at] + len(epochs) - at)), epochs  # then on, none lost


@pytest.mark.timeout(900)
def test_an_elastic_run_starts_with_what_there_is_grows_when_a_node_joins_and_keel_jobs_stop_ends_it(cluster, tmp_path):
    """scaling.num_workers: [1, 2] with 2 CPUs a worker on a 3-CPU head: one worker fits (a CPU stays for Ray
    Data), so the run starts with one. A second node joins after the first epoch; at Ray Train's next resize
    check the group restarts with two workers from the last checkpoint. Ray sees the new node late: Ray Train's
    elastic policy reads Ray Data's autoscaling coordinator, which refreshes node resources every 20 s
    (measured: an 8-epoch run finished before it noticed). So the job asks for many epochs, is submitted with
    --no-wait as a long job would be, and is ended with `keel jobs stop` once it has trained two epochs on both
    nodes."""
    cluster.second_node(up=False)
    address, env = cluster.address, cluster.env
    run_dir, sid = tmp_path / "elastic", f"keel-elastic-{secrets.token_hex(3)}"
    proc = keel("submit", "jobs/digits-resnet.yaml", "run.name=elastic", "run.epochs=40", f"run.storage_path={tmp_path}",
                "scaling.num_workers=[1,2]", "scaling.cpus_per_worker=2", "scaling.resize_check_s=5",
                "stability.early_stopping.enabled=false", "--address", address, "--submission-id", sid, "--no-wait", env=env)
    assert proc.returncode == 0 and f"keel jobs stop {sid}" in proc.stdout, proc.stdout + proc.stderr

    def wait_for(enough, what: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not enough(epochs_done(run_dir)):
            if time.monotonic() > deadline:
                logs = keel("jobs", "logs", sid, "--address", address, env=env)
                pytest.fail(f"{what}; the job's log ends:\n{logs.stdout[-3000:]}")
            time.sleep(0.5)

    wait_for(len, "the run did not get through an epoch", 300)
    assert epochs_done(run_dir)[0]["world_size"] == 1  # started with the one worker that fits
    cluster.start_second_node()
    wait_for(lambda history: sum(h["world_size"] == 2 for h in history) >= 2, "the run never trained two epochs on two workers", 300)
    stop = keel("jobs", "stop", sid, "--address", address, env=env)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    logs = keel("jobs", "logs", sid, "--follow", "--address", address, env=env, timeout=60)  # returns: the job ended
    assert logs.returncode == 0
    assert "STOPPED" in keel("jobs", "status", sid, "--address", address, env=env).stdout
    missing = keel("jobs", "status", "keel-no-such-job", "--address", address, env=env)
    assert missing.returncode == 2 and "keel-no-such-job" in missing.stderr
    history = epochs_done(run_dir)
    sizes = [h["world_size"] for h in history]
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes  # grew once, never shrank
    grown = next(h for h in history if h["world_size"] == 2)
    assert grown.get("resumed_from") and grown["resumed_from"]["ranks"] == 2, grown  # from the checkpoint, on both
    assert_no_epoch_lost_across_one_restart(history)
    grown_epochs = [h for h in history if h["world_size"] == 2]
    # it trains on at two workers (judged on their best epoch: the job was stopped early in a 40-epoch cosine
    # schedule, where one epoch's accuracy still swings by points; the last one was once 0.883)
    assert max(h["val_accuracy"] for h in grown_epochs) >= 0.85 and all(h["replica_drift"] == 0.0 for h in grown_epochs)
    placement = json.loads((run_dir / "placement.json").read_text())
    assert sorted(p["rank"] for p in placement) == [0, 1] and len({p["node"] for p in placement}) == 2, placement


@pytest.mark.timeout(300)
def test_workers_that_would_starve_the_data_pipeline_fail_with_the_reason_instead_of_hanging(cluster, tmp_path):
    """2 workers x 2.5 CPUs on the 5-CPU cluster leave nothing for Ray Data's tasks: once that hung silently."""
    cluster.second_node(up=True)
    address, env = cluster.address, cluster.env
    proc = keel("submit", "jobs/digits-resnet.yaml", "run.name=starved", f"run.storage_path={tmp_path}",
                "scaling.cpus_per_worker=2.5", "scaling.resource_wait_s=3", "--address", address, env=env, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 CPUs (2.5 each + 1 for Ray Data's tasks)" in proc.stdout and "the cluster has 5 CPUs" in proc.stdout
    assert "FAILED" in proc.stdout


@pytest.mark.timeout(300)
def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_reach_it(cluster, tmp_path):
    address, env = cluster.address, cluster.env
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "submit", "jobs/digits-resnet.yaml", "run.name=ctrlc",
                             "run.epochs=50", f"run.storage_path={tmp_path}", "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    lines = []
    for line in proc.stdout:  # wait until it is following the job's logs
        lines.append(line)
        if line.startswith("submitted "):
            break
    sid = lines[-1].split()[1]
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert f"job {sid} keeps running" in out and f"keel jobs stop {sid} --address {address}" in out and "Traceback" not in err
    status = keel("jobs", "status", sid, "--address", address, "--json", env=env)
    assert json.loads(status.stdout)["status"] in ("PENDING", "RUNNING")
    assert keel("jobs", "stop", sid, "--address", address, env=env).returncode == 0


@pytest.mark.parametrize("client_env", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}])
def test_request_without_the_right_token_is_refused(cluster, client_env):
    proc = keel("jobs", "list", "--address", cluster.address, env={"RAY_AUTH_TOKEN": "", **client_env, "HOME": tempfile.mkdtemp()})
    assert proc.returncode == 2
    assert "authentication" in proc.stderr.lower() and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.timeout(600)
def test_a_custom_model_job_on_two_nodes_survives_losing_one_and_its_own_class_reloads_the_checkpoint(cluster, tmp_path):
    """The README's own-model example, submitted as a user would: the user's module travels in the uploaded
    working directory and is imported on the cluster; `keel submit` follows the job's logs. Two nodes (a 3-CPU
    head, a 2-CPU second node), one rank on each (SPREAD). After two epochs the second node is killed outright
    (its raylet and every process it started). Ray Train restarts the worker group on what is left
    (run.max_failures), the workers resume from the last checkpoint, and the job succeeds; the user's own class
    reloads Keel's checkpoint. Last in the module: the cluster is one node after it."""
    cluster.second_node(up=True)
    address, env, node_marker = cluster.address, cluster.env, cluster.node_marker
    run_dir, sid = tmp_path / "custom-tiny-convnet", f"keel-custom-{secrets.token_hex(3)}"
    submit = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", "examples/custom_model/job.yaml", "run.epochs=6",
         f"run.storage_path={tmp_path}", "run.max_failures=2", "scaling.placement_strategy=SPREAD", "--address", address,
         "--submission-id", sid, "--runtime-env-json", '{"env_vars": {"KEEL_TEST_MARKER": "1"}}'],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(epochs_done(run_dir)) < 2:
        assert submit.poll() is None and time.monotonic() < deadline, "the run did not get through two epochs"
        time.sleep(0.5)
    before = json.loads((run_dir / "placement.json").read_text())
    assert sorted(p["rank"] for p in before) == [0, 1] and len({p["node"] for p in before}) == 2, before  # one rank a node
    state = cluster_state(address, env)
    killed_node = {p["node"] for p in before} - {state["head"]}
    helpers = [node for name, node in state["actors"] if "RunChannel" in name]
    assert helpers and set(helpers) == {state["head"]}, state  # the driver's helpers live beside it, on the head
    kill_processes_with_env(node_marker)
    output, _ = submit.communicate(timeout=400)
    assert submit.returncode == 0 and "SUCCEEDED" in output, output[-4000:]
    assert f"submitted {sid}" in output and "uploading " in output and "largest:" in output  # measured before it left
    assert "best val accuracy" in output  # the job's own summary came through the log stream
    history = epochs_done(run_dir)
    resumed = [h for h in history if h.get("resumed_from")]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= 1, ([h["epoch"] for h in history], output[-3000:])  # from a checkpoint, not scratch
    assert_no_epoch_lost_across_one_restart(history)
    assert history[-1]["epoch"] == 5 and history[-1]["val_accuracy"] >= 0.9, history
    assert all(h["replica_drift"] == 0.0 for h in history)  # DDP across nodes, and after the restart, kept them equal
    after = json.loads((run_dir / "placement.json").read_text())
    assert sorted(p["rank"] for p in after) == [0, 1] and not {p["node"] for p in after} & killed_node, after
    from examples.custom_model.tiny_convnet import build
    model_state = torch.load(list_checkpoints(run_dir)[-1] / "state.pt", weights_only=False)["model"]
    build(shape=(1, 8, 8), num_classes=10).load_state_dict(model_state)  # the user's own class reloads Keel's checkpoint
    assert json.loads((run_dir / "stability_report.json").read_text())["first_trouble"] is None  # no false alarm
    status = keel("jobs", "status", sid, "--address", address, "--json", env=env)
    record = json.loads(status.stdout)
    assert status.returncode == 0 and record["status"] == "SUCCEEDED" and record["run"] == "custom-tiny-convnet"
    listing = keel("jobs", "list", "--address", address, env=env)
    assert sid in listing.stdout and "custom-tiny-convnet" in listing.stdout


def test_unreachable_address_fails_fast_with_exit_2():
    for argv in (["jobs", "list"], ["submit", "jobs/digits-resnet.yaml"]):
        proc = keel(*argv, "--address", f"http://127.0.0.1:{free_port()}", timeout=60)
        assert proc.returncode == 2 and "cannot reach" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        # before the working directory is packaged: no upload measured, none begun
        assert "upload" not in proc.stdout and "Creating a file package" not in proc.stdout + proc.stderr, proc.stdout


def test_invalid_spec_is_rejected_before_anything_is_uploaded():
    proc = keel("submit", "jobs/digits-resnet.yaml", "optimizer.lr=-1", "--address", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "optimizer.lr" in proc.stderr  # failed on the spec, not on the address
    assert "cannot reach" not in proc.stderr and "upload" not in proc.stdout


def validate(capsys, path) -> tuple[int, str, str]:
    """`keel cluster validate PATH` in this process (no Ray starts): exit code, stdout, stderr."""
    return cli_here(capsys, "cluster", "validate", str(path))


def test_shipped_cluster_yaml_passes_ray_schema(capsys):
    rc, out, _ = validate(capsys, ROOT / "cluster.yaml")
    assert rc == 0 and "ok" in out
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert not any("--shm-size" in option for option in config["docker"]["run_options"])  # Ray sizes /dev/shm itself
    nodes = config["available_node_types"]
    for name, node in nodes.items():  # every node may write s3:// storage and has room for the image
        assert node["node_config"]["IamInstanceProfile"] and node["node_config"]["BlockDeviceMappings"], name
    assert any(n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in nodes.values())


@pytest.mark.parametrize("edit, message", [
    (("upscaling_speed:", "upscaling_sped:"), "'upscaling_sped' was unexpected"),
    (("head_node_type: head_cpu", "head_node_type: head_gpu"), "head_node_type"),
    (("RAY_AUTH_MODE=token ray start --head", "ray start --head"), "RAY_AUTH_MODE=token"),
    (("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "exposes the job API"),
    (("\nprovider:", "\nproviders:"), "provider: missing; a Ray cluster-launcher config needs it"),  # was "'provider'"
])
def test_cluster_validate_rejects_bad_configs(tmp_path, capsys, edit, message):
    bad = tmp_path / "cluster.yaml"
    bad.write_text((ROOT / "cluster.yaml").read_text().replace(*edit))
    rc, _, err = validate(capsys, bad)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_shipped_rayjob_passes_and_typos_or_unsafe_settings_are_refused_in_one_line(tmp_path, capsys):
    # the shipped manifest: a CPU-0 head, a GPU group autoscaling from zero, token auth, cleaned up at the end
    rc, out, err = validate(capsys, ROOT / "k8s/rayjob.yaml")
    assert rc == 0 and "RayJob keel-digits-resnet" in out and "token auth" in out, err
    spec = yaml.safe_load((ROOT / "k8s/rayjob.yaml").read_text())["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0" and cluster["enableInTreeAutoscaling"]
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert spec["shutdownAfterJobFinishes"] and "keel run" in spec["entrypoint"] and "scaling.address=auto" in spec["entrypoint"]
    text = (ROOT / "k8s/rayjob.yaml").read_text()
    for edit, message in [
        (("        minReplicas: 0", "        minReplica: 0"), "workerGroupSpecs.0.minReplica: unknown field"),
        (("  shutdownAfterJobFinishes: true", "  shutdownAfterJobFinished: true"), "spec.shutdownAfterJobFinished: unknown field"),
        (('num-cpus: "0"', "num-cpus: 0"), "rayStartParams.num-cpus: Input should be a valid string"),
        (("      mode: token", "      mode: disabled"), "authOptions.mode: set it to token"),
        (("serviceType: ClusterIP", "serviceType: LoadBalancer"), "exposes the dashboard and job API"),
        (("submissionMode: K8sJobMode", "submissionMode: K8sJob"), "spec.submissionMode: Input should be"),
        (('rayVersion: "2.60.0"', 'rayVersion: "2.46.0"'), "needs Ray 2.52 or newer"),
        (("        maxReplicas: 4", "        maxReplicas: four"), "maxReplicas: Input should be a valid integer"),
    ]:
        assert edit[0] in text, edit
        bad = tmp_path / "rayjob.yaml"
        bad.write_text(text.replace(*edit))
        rc, _, err = validate(capsys, bad)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (edit, err)


def test_dockerfile_pins_ray_and_python_and_stays_user_ray():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] == "ray"
    assert "RUN keel data make digits --out data/digits" in text  # the CLI runs in the image, and the jobs find their data
    lines = text.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if '"torch==' in line)
    code_line = next(i for i, line in enumerate(lines) if line.startswith("COPY") and " orchestrator " in line)
    assert torch_line < code_line  # an edit to the code does not reinstall torch
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("-c /home/ray/ray-constraints.txt" in line for line in installs)


def test_ray_constraints_pin_ray_and_its_dependencies_but_not_torch():
    proc = subprocess.run([sys.executable, str(ROOT / "docker/ray_constraints.py")], capture_output=True, text=True)
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert proc.returncode == 0 and pins["ray"] == "2.60.0"
    assert {"pyarrow", "numpy", "pydantic", "aiohttp", "grpcio"} <= pins.keys() and "torch" not in pins
