"""Keel's pytest plugin (installed with Keel as the `pytest11` entry point `keel`): test your own job
the way Keel tests its own, on a real embedded local Ray with real worker processes.

    def test_my_model_trains(keel_run):
        outcome = keel_run("jobs/my-model.yaml", "run.epochs=2")
        assert outcome.ok and outcome.final["val_accuracy"] > 0.9

    def test_my_job_is_distributed_correct(keel_check):
        assert keel_check("jobs/my-model.yaml").ok

Fixtures:
- `keel_ray` (session): one local Ray for the whole test session (starting one costs seconds); each
  run's workers take fractional CPUs, so a 2-worker job fits on a 2-core laptop.
- `keel_run(job, *overrides, **fields)`: run a job (a YAML path, a dict or a JobSpec) to the end and
  return its RunOutcome (status, history, final metrics, run_dir, checkpoint). Overrides are the CLI's
  `a.b=c`; keyword arguments spell dots as double underscores (`run__epochs=2`). Runs are written
  under the test's tmp_path unless `run.storage_path` is given.
- `keel_check(job, *overrides, **fields)`: the checks of `keel check` (1 worker x N*b against N workers
  x b, replica drift, determinism, resume); returns the CheckReport.

Nothing here imports torch or Ray until a fixture is used: the plugin loads in every pytest session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


# Ray 2.60's DataContext() sets every field, deprecated ones included, so any session that uses Ray Data
# warns about settings nobody set; a test session shows them under every Ray-backed test.
RAY_DATA_DEFAULTS_WARNINGS = ("`use_push_based_shuffle` is deprecated", "`use_polars` is deprecated",
                              "`use_arrow_tensor_v2` is deprecated")


def pytest_configure(config) -> None:
    for message in RAY_DATA_DEFAULTS_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


def job_overrides(overrides: tuple[str, ...], fields: dict[str, Any]) -> list[str]:
    """CLI-style overrides from positional `a.b=c` strings and `a__b=value` keywords (values as JSON)."""
    keyed = [f"{key.replace('__', '.')}={value if isinstance(value, str) else json.dumps(value)}"
             for key, value in fields.items()]
    return [*overrides, *keyed]


def load_job(job: Any, overrides: list[str]):
    """A JobSpec from a YAML path, a dict or a JobSpec, with overrides applied (BadInput on bad input)."""
    from orchestrator.spec import JobSpec, apply_overrides, parse_spec, read_yaml

    if isinstance(job, JobSpec):
        tree, source = job.model_dump(mode="json"), "spec"
    elif isinstance(job, dict):
        tree, source = json.loads(json.dumps(job)), "spec"
    else:
        tree, source = read_yaml(job), str(job)
    return parse_spec(apply_overrides(tree, overrides), source)


@pytest.fixture(scope="session")
def keel_ray():
    """One embedded local Ray for the session, shut down at its end."""
    from orchestrator.ray_session import ensure_ray

    ensure_ray(None)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture
def keel_run(keel_ray, tmp_path: Path):
    """keel_run(job, *overrides, **fields) -> RunOutcome: a real run, written under tmp_path."""
    from orchestrator.train.driver import run_job

    def run(job: Any, *overrides: str, **fields: Any):
        spec = load_job(job, [f"run.storage_path={tmp_path}", *job_overrides(overrides, fields)])
        return run_job(spec, dashboard=False)

    return run


@pytest.fixture
def keel_check(keel_ray, tmp_path: Path):
    """keel_check(job, *overrides, steps=20, **fields) -> CheckReport: `keel check` in-process."""
    from orchestrator.check import run_check

    def check(job: Any, *overrides: str, steps: int = 20, **fields: Any):
        spec = load_job(job, [f"run.storage_path={tmp_path}", *job_overrides(overrides, fields)])
        return run_check(spec, steps=steps)

    return check
