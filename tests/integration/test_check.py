"""`keel check` on real 1- and 2-worker Ray Train runs: the main job passes; per-rank batch norm, a layer
seeded by the rank and an unseeded augmentation are each caught, named, with the fix. Uses Keel's own
pytest plugin fixtures."""

import pytest

from orchestrator import cli
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def data(digits_dir):
    return [f"data.train={digits_dir / 'train.parquet'}", f"data.val={digits_dir / 'val.parquet'}"]


@pytest.mark.timeout(400)
def test_the_main_job_is_distributed_correct(keel_check, digits_dir):
    from ray.util.state import list_actors

    def train_workers() -> int:  # Ray Train worker processes the suite's Ray has seen
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10000))
    workers_before = train_workers()
    report = keel_check(ROOT / "jobs/digits-resnet.yaml", *data(digits_dir))
    assert train_workers() - workers_before == 2  # the job's 2 workers; the 1-worker reference ran in this process
    assert report.ok, [(line.name, line.detail) for line in report.lines if not line.ok]
    names = [line.name for line in report.lines]
    assert names == ["data pipeline deterministic", "forward, step 0 (every layer)", "loss, every step",
                     "global grad norm, every step", "parameters and buffers after k steps",
                     "replicas identical, every step", "determinism (the same run twice)",
                     "resume at k/2 from a Keel checkpoint"]
    assert "20 steps" in report.lines[2].detail and report.notes  # the job's dropout was switched off, and said so
    import ray.data  # the check read its batches in order; the process's later runs do not pay for that
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False


@pytest.mark.timeout(300)
def test_a_custom_layer_seeded_by_rank_is_named_and_keel_check_exits_1(keel_ray, digits_dir, capsys):
    rc = cli.main(["check", str(ROOT / "examples/custom_model/job.yaml"), *data(digits_dir),
                   "model.factory=tests.integration.check_models:rank_noise_net", "model.args={}", "--steps", "4"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "MISMATCH in forward, step 0 (every layer): first differs at 2 (RankNoise)" in " ".join(out.split())
    assert "random numbers drawn per rank" in " ".join(out.split())


def unseeded_augmentation(batch, **kwargs):
    """Keel's per-epoch stage, then noise from an unseeded generator: augmentation that depends on where and
    when it runs (seeded by rank, process or clock) rather than on run.seed, epoch and the block's content."""
    import numpy as np

    from orchestrator.data.pipeline import epoch_stage
    from orchestrator.data.preprocess import FEATURES

    out = epoch_stage(batch, **kwargs)
    noise = np.random.default_rng().normal(0, 0.1, out[FEATURES].shape)
    return {**out, FEATURES: (out[FEATURES] + noise).astype(out[FEATURES].dtype)}


@pytest.mark.timeout(300)
def test_per_rank_batch_norm_and_an_unseeded_augmentation_are_each_named_on_their_own_line(keel_check, digits_dir, monkeypatch):
    """Two mistakes in one job (one check run): each line names its own, with its own fix."""
    import orchestrator.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "epoch_stage", unseeded_augmentation)  # Ray Data's tasks import it from this module
    report = keel_check(ROOT / "jobs/digits-resnet.yaml", *data(digits_dir), "stability.sync_batchnorm=false", steps=4)
    failed = {line.name: line for line in report.lines if not line.ok}
    data_line, forward = failed.pop("data pipeline deterministic"), failed.pop("forward, step 0 (every layer)")
    assert report.first_failure is data_line and "seeded by (run.seed, epoch)" in data_line.cause, data_line
    assert "(BatchNorm2d)" in forward.detail and "stability.sync_batchnorm: true" in forward.cause, forward
