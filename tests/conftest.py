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
