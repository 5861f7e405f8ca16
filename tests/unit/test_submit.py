"""`keel submit` without a cluster: what it uploads (measured before it leaves), its flags, which address it uses."""

import os
import zipfile

import pytest
from ray._private.runtime_env.packaging import create_package

from orchestrator.cluster.jobs import entrypoint, runtime_env_from
from orchestrator.cluster.upload import EXCLUDES, plan_upload, virtualenvs
from orchestrator.errors import BadInput


def write(root, name, data=b"x"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)


def test_secrets_vcs_envs_and_run_outputs_stay_behind(tmp_path):
    src = tmp_path / "proj"
    for name in ["orchestrator/cli.py", "jobs/a.yaml", ".git/config", ".venv/bin/python", "runs/x/metrics.jsonl",
                 ".env", "deploy.pem", "ssh.key", "orchestrator/__pycache__/cli.cpython-311.pyc", ".ray/auth_token"]:
        write(src, name)
    target = tmp_path / "pkg.zip"
    create_package(str(src), target, include_gitignore=True, excludes=EXCLUDES)
    names = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist()}
    assert {"orchestrator/cli.py", "jobs/a.yaml"} <= names
    leaked = [n for n in names if n.split("/")[0] in (".git", ".venv", "runs", ".env", "deploy.pem", "ssh.key", ".ray")
              or n.endswith(".pyc")]
    assert leaked == []


def test_a_virtualenv_of_any_name_stays_behind_even_with_150_mb_in_it(tmp_path):
    src = tmp_path / "proj"
    write(src, "orchestrator/cli.py", b"print('hi')\n" * 100)
    write(src, "venv-x/pyvenv.cfg", b"home = /usr/bin\n")
    with open(src / "venv-x" / "big.bin", "wb") as f:  # 150 MB (sparse: nothing reads it if it is excluded)
        f.truncate(150 * 1024 * 1024)
    write(src, "tools/py311/pyvenv.cfg", b"home = /usr/bin\n")  # nested too
    assert sorted(virtualenvs(src)) == ["tools/py311", "venv-x"]
    plan = plan_upload(src)
    assert plan.size < 1024 * 1024 and plan.files == 1 and plan.largest[0][0] == "orchestrator/cli.py"
    assert "KiB" in plan.summary() or " B" in plan.summary()


def test_an_upload_over_the_limit_is_refused_in_one_line_naming_the_largest_file(tmp_path):
    src = tmp_path / "proj"
    write(src, "data/blob.bin", os.urandom(2 * 1024 * 1024))  # incompressible
    write(src, "jobs/a.yaml")
    with pytest.raises(BadInput, match=r"over Ray's 1\.0 MiB limit; largest: data/blob\.bin \(2\.0 MiB\)"):
        plan_upload(src, limit=1024 * 1024)


def test_runtime_env_json_must_be_an_object_and_leaves_working_dir_to_keel():
    assert runtime_env_from('{"env_vars": {"NCCL_DEBUG": "INFO"}}') == {"env_vars": {"NCCL_DEBUG": "INFO"}}
    for bad, message in [("{", "not JSON"), ("[1]", "expected a JSON object"), ('{"working_dir": "."}', "use --working-dir")]:
        with pytest.raises(BadInput, match=message):
            runtime_env_from(bad)


def test_address_comes_from_ray_api_server_address_before_ray_address(monkeypatch):
    from orchestrator.cluster.jobs import dashboard_address

    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert dashboard_address(None) == "http://a:8265" and dashboard_address("http://c:1") == "http://c:1"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert dashboard_address(None) == "http://b:8265"


def test_entrypoint_runs_keel_on_the_cluster_with_quoted_overrides(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "a.yaml"
    job.write_text("x")
    cmd = entrypoint("run", job, ["run.name=my run"], tmp_path)
    assert cmd == "python -m orchestrator run jobs/a.yaml 'run.name=my run' scaling.address=auto --quiet"


def test_sweep_files_are_submitted_as_keel_sweep():
    from orchestrator.cluster.jobs import submission_kind
    from tests.helpers import ROOT

    assert submission_kind(ROOT / "jobs/digits-sweep.yaml", []) == ("sweep", "digits-sweep")
    assert submission_kind(ROOT / "jobs/digits-resnet.yaml", ["run.name=x"]) == ("run", "x")
    cmd = entrypoint("sweep", ROOT / "jobs/digits-sweep.yaml", [], ROOT)
    assert cmd == "python -m orchestrator sweep jobs/digits-sweep.yaml --quiet"


def test_a_local_run_ignores_a_jobs_api_ray_address(monkeypatch):
    from orchestrator.ray_session import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # set for `keel submit`
    assert cluster_address(None) is None  # start an embedded local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # inside a Ray Job: its cluster
    assert cluster_address(None) == "10.0.0.5:6379" and cluster_address("auto") == "auto"
