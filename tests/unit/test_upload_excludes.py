"""What `keel submit` uploads: Ray's own packaging with Keel's excludes, checked on a real zip."""

import zipfile

from ray._private.runtime_env.packaging import create_package

from orchestrator.cluster.jobs import UPLOAD_EXCLUDES, entrypoint


def test_secrets_vcs_envs_and_run_outputs_stay_behind(tmp_path):
    src = tmp_path / "proj"
    for name in ["orchestrator/cli.py", "jobs/a.yaml", ".git/config", ".venv/bin/python", "runs/x/metrics.jsonl",
                 ".env", "deploy.pem", "ssh.key", "orchestrator/__pycache__/cli.cpython-311.pyc", ".ray/auth_token"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    target = tmp_path / "pkg.zip"
    create_package(str(src), target, include_gitignore=True, excludes=UPLOAD_EXCLUDES)
    names = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist()}
    assert {"orchestrator/cli.py", "jobs/a.yaml"} <= names
    leaked = [n for n in names if n.split("/")[0] in (".git", ".venv", "runs", ".env", "deploy.pem", "ssh.key", ".ray")
              or n.endswith(".pyc")]
    assert leaked == []


def test_entrypoint_runs_keel_on_the_cluster_with_quoted_overrides(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "a.yaml"
    job.write_text("x")
    cmd = entrypoint("run", job, ["run.name=my run"], tmp_path)
    assert cmd == "python -m orchestrator run jobs/a.yaml 'run.name=my run' scaling.address=auto --quiet"


def test_sweep_files_are_submitted_as_keel_sweep():
    from orchestrator.cluster.jobs import submission_kind
    from tests.conftest import ROOT

    assert submission_kind(ROOT / "jobs/digits-sweep.yaml", []) == ("sweep", "digits-sweep")
    assert submission_kind(ROOT / "jobs/digits-resnet.yaml", ["run.name=x"]) == ("run", "x")
    cmd = entrypoint("sweep", ROOT / "jobs/digits-sweep.yaml", [], ROOT)
    assert cmd == "python -m orchestrator sweep jobs/digits-sweep.yaml --quiet"
