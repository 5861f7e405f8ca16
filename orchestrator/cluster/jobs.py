"""Ray Jobs: submit a Keel job to a cluster, follow it, list, stop.

The spec is validated locally first, so nothing is uploaded for a typo. The
working directory travels as the job's runtime env, minus version control,
every virtualenv, caches, run outputs and anything that looks like a secret
(Ray also honours .gitignore); it is measured before it leaves (upload.py).
On the cluster the entrypoint is the same `keel run`, with
`scaling.address=auto` so it joins the cluster instead of starting one.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Optional

from orchestrator.errors import BadInput, RunFailed

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60.0


def dashboard_address(address: Optional[str]) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS (what `ray job` reads first), else $RAY_ADDRESS, else local."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path.home() / ".ray" / "auth_token").is_file()


def connect(address: Optional[str]):
    """A JobSubmissionClient, sending Ray's token when one is available; one-line errors otherwise."""
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"  # the SDK sends the token only in token mode
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise BadInput(f"--address {address}: cannot reach a Ray dashboard there ({_first_line(exc)})") from None
    except Exception as exc:  # the SDK raises RuntimeError for HTTP 401/403
        text = _first_line(exc)
        if "401" in text or "403" in text or "uthenticat" in text or "oken" in text:
            raise BadInput(f"--address {address}: authentication failed: set RAY_AUTH_MODE=token and put the cluster's "
                           f"token in RAY_AUTH_TOKEN or ~/.ray/auth_token ({text})") from None
        raise BadInput(f"--address {address}: {text}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def entrypoint(kind: str, job_path: Path, overrides: list[str], workdir: Path) -> str:
    try:
        rel = job_path.resolve().relative_to(workdir.resolve())
    except ValueError:
        raise BadInput(f"{job_path}: the spec must be inside the working directory {workdir} that is uploaded") from None
    args = ["python", "-m", "orchestrator", kind, str(rel), *overrides, "--quiet"]
    if kind == "run":
        args.insert(-1, "scaling.address=auto")
    return " ".join(shlex.quote(a) for a in args)


def submission_kind(path: Path, overrides: list[str]) -> tuple[str, str]:
    """('run', run name) for a job spec, ('sweep', sweep name) for a sweep spec; validates either."""
    from orchestrator.spec import load_spec
    from orchestrator.sweep.spec import is_sweep_file, load_sweep

    if is_sweep_file(path):
        return "sweep", load_sweep(path, overrides)[0].name
    return "run", load_spec(path, overrides).run.name


def runtime_env_from(json_text: Optional[str]) -> dict:
    """--runtime-env-json: a JSON object (env_vars for WANDB_API_KEY, NCCL_*, AWS_*; pip; ...)."""
    if not json_text:
        return {}
    try:
        env = json.loads(json_text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--runtime-env-json: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(env, dict):
        raise BadInput("--runtime-env-json: expected a JSON object, e.g. '{\"env_vars\": {\"NCCL_DEBUG\": \"INFO\"}}'")
    if "working_dir" in env:
        raise BadInput("--runtime-env-json: working_dir: use --working-dir (Keel measures and filters the upload)")
    return env


def submit(job_path: str, overrides: list[str], address: Optional[str], workdir: str = ".", *,
           runtime_env_json: Optional[str] = None, submission_id: Optional[str] = None,
           entrypoint_num_cpus: Optional[float] = None, entrypoint_num_gpus: Optional[float] = None,
           say=print) -> tuple[object, str]:
    """Validate locally, measure the upload, then submit. Returns (client, submission id)."""
    from orchestrator.cluster.upload import plan_upload

    path = Path(job_path)
    kind, name = submission_kind(path, overrides)  # BadInput before anything is uploaded
    command = entrypoint(kind, path, list(overrides), Path(workdir))
    extra_env = runtime_env_from(runtime_env_json)
    client = connect(address)  # an address that does not answer: one line, before the working dir is packaged
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)  # Keel says what it uploads
    plan = plan_upload(workdir)  # BadInput before anything is uploaded when it is over Ray's limit
    say(plan.summary())
    submission_id = submission_id or f"keel-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resources = {k: v for k, v in (("entrypoint_num_cpus", entrypoint_num_cpus),
                                   ("entrypoint_num_gpus", entrypoint_num_gpus)) if v is not None}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=command, submission_id=submission_id, **resources,
                runtime_env={**extra_env, "working_dir": str(plan.workdir), "excludes": plan.excludes},
                metadata={"keel_job": str(path), "keel_run": name, "kind": kind, "user": getpass.getuser()})
            return client, submission_id
        except RuntimeError as exc:
            # A head that just started answers before its job agent is up; Ray says "try again later".
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise RunFailed(f"submit to {dashboard_address(address)}: {_first_line(exc)}") from None


def job_record(info) -> dict:
    """One job as plain JSON for scripts (`--json`)."""
    meta = info.metadata or {}
    return {"submission_id": info.submission_id or info.job_id, "status": str(info.status.value),
            "message": info.message, "run": meta.get("keel_run"), "kind": meta.get("kind"), "user": meta.get("user"),
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def follow(client, submission_id: str, write=print) -> str:
    """Stream the job's logs until it ends; returns the final status name."""
    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk.rstrip("\n"))

    asyncio.run(tail())
    return wait_terminal(client, submission_id)


def wait_terminal(client, submission_id: str, timeout_s: float = 30.0) -> str:
    status = client.get_job_status(submission_id)
    deadline = time.monotonic() + timeout_s
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(submission_id)
    return str(status.value)
