"""Shared fixtures. Helpers live in tests/helpers.py; keel_ray (the session's local Ray), keel_run and
keel_check come from Keel's pytest plugin, orchestrator/testing.py: the fixtures a user's own tests get."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from orchestrator.data.generators import make_digits

    out = tmp_path_factory.mktemp("digits")
    make_digits(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def s3_endpoint():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 for the whole session, named in the
    environment the standard AWS way (AWS_ENDPOINT_URL and keys) before any Ray starts: the suite's one Ray, its
    workers and trials then reach it as the Ray a user starts from a shell that names the store would. Autouse,
    so it is up before the first test's `keel_ray`; nothing else in the suite reads these variables."""
    import os

    from tests.helpers import s3_server

    with s3_server() as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():  # the environment as it was
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
