"""The real Ray Data pipeline: per-epoch augmentation, clean validation, train-only statistics, curriculum."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from orchestrator.data.generators import make_tabular
from orchestrator.data.pipeline import build_datasets
from orchestrator.ray_session import open_run_channel
from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.spec import parse_spec
from orchestrator.train.planning import preflight
from orchestrator.train.worker_config import WorkerConfig
from tests.helpers import job_tree

pytestmark = pytest.mark.integration


def rows(ds) -> np.ndarray:
    """All rows of a dataset, sorted (Ray Data does not promise an order)."""
    x = np.concatenate([b[FEATURES] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    return x[np.lexsort(x.T[::-1])]


def pipeline(spec, clock=None):
    plan = preflight(spec)
    return plan, build_datasets(spec, plan, clock if clock is not None else open_run_channel())


@pytest.mark.timeout(300)
def test_augmentation_changes_every_epoch_is_reproducible_and_never_touches_validation(keel_ray, digits_dir, tmp_path):
    tree = job_tree(digits_dir, tmp_path, "aug", data={**job_tree(digits_dir, tmp_path, "x")["data"],
                    "preprocess": {"standardize": "per_channel"},
                    "augment": {"random_crop_padding": 1, "cutout": 2, "noise_std": 0.1}})
    spec = parse_spec(tree)
    clock = open_run_channel()
    plan, ds = pipeline(spec, clock)
    seen = {}
    for epoch in (0, 1, 0):
        ray.get(clock.set.remote(epoch))
        seen.setdefault(epoch, []).append((rows(ds["train"]), rows(ds["val"])))
    (train0, val0), (train0_again, val0_again) = seen[0]
    train1, val1 = seen[1][0]
    assert np.array_equal(train0, train0_again)            # same seed and epoch: the same augmentation
    assert not np.allclose(train0, train1)                 # a new epoch: new augmentation
    assert np.array_equal(val0, val1) and np.array_equal(val0, val0_again)  # validation: never augmented
    raw = pq.read_table(digits_dir / "val.parquet").column("image").combine_chunks().flatten().to_numpy().reshape(-1, 64)
    expected = (raw - plan.preprocess.mean) / plan.preprocess.std
    np.testing.assert_allclose(val0, expected[np.lexsort(expected.T[::-1])], atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("augment", [{"random_crop_padding": 2, "hflip": 0.5}, {"hflip": 0.5}, None])
def test_every_row_keeps_its_label_through_the_shuffle_and_augmentation(keel_ray, tmp_path, augment):
    # each image is its label, repeated in every pixel: a crop (zero border of 2) and a flip keep the centre
    from orchestrator.data.generators import write_split

    labels = np.random.default_rng(0).integers(0, 10, 600)
    for split in ("train", "val"):
        write_split(tmp_path / f"{split}.parquet", np.repeat(labels[:, None], 64, 1).astype(np.float32), labels)
    tree = job_tree(tmp_path, tmp_path, "aligned", data={**job_tree(tmp_path, tmp_path, "x")["data"],
                    **({"augment": augment} if augment else {})})
    clock = open_run_channel()
    _, ds = pipeline(parse_spec(tree), clock)
    ray.get(clock.set.remote(0))
    batches = list(ds["train"].iter_batches(batch_size=None, batch_format="numpy"))
    x, y = np.concatenate([b[FEATURES] for b in batches]), np.concatenate([b[LABEL] for b in batches])
    assert sorted(y.tolist()) == sorted(labels.tolist())
    assert np.array_equal(x.reshape(-1, 8, 8)[:, 4, 4], y) and not np.array_equal(y, labels)  # aligned, and shuffled


@pytest.mark.timeout(300)
def test_standardisation_statistics_come_from_the_training_split_only(keel_ray, tmp_path):
    def write(path, x):
        pq.write_table(pa.table({"f": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), 2),
                                 "label": np.arange(len(x)) % 2}), path)
    rng = np.random.default_rng(0)
    write(tmp_path / "train.parquet", rng.normal([5.0, -3.0], [2.0, 0.5], size=(400, 2)))
    write(tmp_path / "val.parquet", rng.normal([50.0, 30.0], [9.0, 9.0], size=(100, 2)))  # very different
    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"),
                       "features": "f", "shape": [2], "num_classes": 2, "preprocess": {"standardize": "per_feature"}},
                       "run": {"name": "std", "storage_path": str(tmp_path)}})
    plan, ds = pipeline(spec)
    np.testing.assert_allclose(plan.preprocess.mean, [5.0, -3.0], atol=0.3)
    np.testing.assert_allclose(plan.preprocess.std, [2.0, 0.5], atol=0.15)
    train = rows(ds["train"])
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1.0, atol=1e-3)
    assert rows(ds["val"]).mean(0)[0] > 15  # standardised with the TRAIN statistics, so far from 0

    # every rank evaluates its own part of the validation split: together, each row exactly once
    config = WorkerConfig(spec, plan.epoch_rows, eval_sets={"val": ds["val"]})
    for world in (1, 2, 3):
        together = np.concatenate([b[FEATURES] for rank in range(world) for b in
                                   config.eval_shard("val", rank, world).iter_batches(batch_size=None, batch_format="numpy")])
        assert np.array_equal(together[np.lexsort(together.T[::-1])], rows(ds["val"])), world


@pytest.mark.timeout(300)
def test_curriculum_widens_the_pool_as_scheduled_and_bad_rows_are_dropped_and_counted(keel_ray, tmp_path):
    make_tabular(tmp_path, rows=2000, features=4, missing=0.0)
    table = pq.read_table(tmp_path / "train.parquet")
    x = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 4).copy()
    x[:7, 0] = np.inf  # 7 bad rows
    pq.write_table(table.set_column(0, "features", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), 4)),
                   tmp_path / "train.parquet")
    spec = parse_spec({"model": {"kind": "mlp"}, "data": {
        "train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"), "features": "features",
        "shape": [4], "num_classes": 3, "batch_size": 16, "on_bad_rows": "drop",
        "curriculum": {"enabled": True, "score": "difficulty", "pacing": "linear", "start_fraction": 0.25, "full_epoch": 3}},
        "run": {"name": "cur", "storage_path": str(tmp_path), "epochs": 5}})
    clock = open_run_channel()
    plan, ds = pipeline(spec, clock)
    assert plan.dropped_rows == {"train": 7, "val": 0}
    sizes = []
    for epoch in range(5):
        ray.get(clock.set.remote(epoch))
        sizes.append(sum(len(b[LABEL]) for b in ds["train"].iter_batches(batch_size=None, batch_format="numpy")))
    usable = 1600 - 7
    assert sizes[3:] == [usable, usable] and sizes == sorted(sizes)
    assert abs(sizes[0] - 0.25 * 1600) <= 10 and abs(sizes[1] - 0.5 * 1600) <= 10
    assert plan.steps_per_epoch[0] < plan.steps_per_epoch[-1] == (usable // 2) // 16


@pytest.mark.timeout(300)
def test_curriculum_by_the_loss_of_an_earlier_checkpoint(keel_ray, tmp_path):
    import torch

    from orchestrator.train.checkpointing import save_checkpoint
    from orchestrator.train.components import build_components

    make_tabular(tmp_path, rows=1500, features=4)
    data = {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"), "features": "features",
            "shape": [4], "num_classes": 3, "batch_size": 16, "preprocess": {"standardize": "per_feature"}}
    # the scorer: a Keel checkpoint as a rank writes it (model, the run's config and its standardisation
    # statistics), written here rather than by a training run of its own (a Ray Train start-up saved); what
    # the curriculum reads is the file, and tests/integration/test_training_runs.py loads one a run wrote
    scorer = parse_spec({"model": {"kind": "mlp", "hidden": [16]}, "data": data, "run": {"name": "scorer", "storage_path": str(tmp_path)}})
    checkpoint = save_checkpoint(tmp_path / "scorer" / "checkpoint_000000", build_components(scorer, 1, torch.device("cpu")),
                                 epoch=0, spec_yaml=scorer.to_yaml(), extra={"preprocess": preflight(scorer).preprocess.to_dict()})
    spec = parse_spec({"model": {"kind": "mlp"}, "run": {"name": "cur-loss", "storage_path": str(tmp_path), "epochs": 4},
                       "data": {**data, "curriculum": {"enabled": True, "checkpoint": str(checkpoint),
                                                       "start_fraction": 0.4, "full_epoch": 2}}})
    clock = open_run_channel()
    plan, ds = pipeline(spec, clock)
    sizes = []
    for epoch in range(4):
        ray.get(clock.set.remote(epoch))
        sizes.append(sum(len(b[LABEL]) for b in ds["train"].iter_batches(batch_size=None, batch_format="numpy")))
    assert abs(sizes[0] - 0.4 * 1200) <= 5 and sizes[2:] == [1200, 1200] and sizes == sorted(sizes)
    # the driver's scores (steps per epoch) and the tasks' scores (pool sizes) agree
    assert [(n // 2) // 16 for n in sizes] == plan.steps_per_epoch
    hard = ds["train"].take_all()  # epoch 3: everything; difficulty is dropped by the epoch stage
    assert len(hard) == 1200


def test_curriculum_checkpoint_that_is_not_a_checkpoint_is_bad_input(tmp_path):
    from orchestrator.errors import BadInput

    make_tabular(tmp_path, rows=300, features=4)
    spec = parse_spec({"model": {"kind": "mlp"}, "run": {"name": "x", "storage_path": str(tmp_path)},
                       "data": {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"),
                                "features": "features", "shape": [4], "num_classes": 3,
                                "curriculum": {"enabled": True, "checkpoint": str(tmp_path)}}})
    with pytest.raises(BadInput, match="data.curriculum.checkpoint: .* not a Keel checkpoint"):
        preflight(spec)
