import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every integration test (starting one costs 3-6 s)."""
    from orchestrator.train.driver import ensure_ray

    ensure_ray(None)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from orchestrator.data.generators import make_digits

    out = tmp_path_factory.mktemp("digits")
    make_digits(out)
    return out


def job_tree(digits_dir: Path, storage: Path, name: str, **sections) -> dict:
    """A small digits job as a dict; `sections` replace or extend the defaults per section."""
    tree = {
        "model": {"kind": "resnet", "channels": [16, 32], "blocks_per_stage": 1, "dropout": 0.0},
        "data": {"train": str(digits_dir / "train.parquet"), "val": str(digits_dir / "val.parquet"),
                 "shape": [1, 8, 8], "num_classes": 10, "batch_size": 32},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": str(storage), "epochs": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree
