"""Each Ray-backed benchmark runs end to end on a tiny size (numbers are not asserted: the machine is shared)."""

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def bench_env(tmp_path, monkeypatch, keel_ray):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


@pytest.mark.timeout(300)
def test_data_ingest_runs(bench_env):
    from benchmarks import data_ingest

    result = data_ingest.main(["--rows", "600", "--epochs", "1", "--batch", "32"])
    assert result["samples_per_s"]["ray_data"] > 0 and result["samples_per_s"]["dataloader"] > 0
    assert (bench_env / "data_ingest.json").exists()


@pytest.mark.timeout(300)
def test_data_path_times_every_stage_on_the_same_rows(bench_env):
    from benchmarks import data_path

    result = data_path.main(["--rows", "600", "--epochs", "1", "--rounds", "1"])
    assert set(result["median"]) == {"numpy_b32", "torch_b32", "torch_b32_shuf", "keel_chunks", "whole_blocks"}
    assert all(v > 0 for v in result["median"].values()) and (bench_env / "data_path.json").exists()
    rows = result["rows_read_by_rank_0"]  # the stages that drop a short last batch read the same full batches
    assert rows["keel_chunks"] == rows["torch_b32"] == rows["torch_b32_shuf"] == rows["whole_blocks"] > 0


@pytest.mark.timeout(600)
def test_overhead_runs_its_variants_side_by_side(bench_env):
    from benchmarks import overhead

    # keel_local_bn is run_keel with one override: the defaults' variant adds a run, not a code path. The
    # hand-written Ray Train loop (ray_train) is left to the benchmark itself: one more Ray Train start-up
    # (~20 s here) for a baseline that uses nothing of Keel's but build_model
    only = "keel_local_bn,torchrun,single"
    result = overhead.main(["--rows", "600", "--epochs", "1", "--batch", "32", "--rounds", "1", "--only", only])
    assert set(result["samples_per_s"]) == set(only.split(","))
    assert all(v > 0 for v in result["samples_per_s"].values())
    ratio = result["ratios"]["keel_local_bn/torchrun"]
    assert ratio["rounds"] == [result["rounds"][0]["keel_local_bn"] / result["rounds"][0]["torchrun"]] and ratio["within_spread"]
    assert "keel/torchrun" not in result["ratios"]  # a variant left out has no ratio


@pytest.mark.timeout(300)
def test_startup_breakdown_runs(bench_env):
    from benchmarks import startup

    # the smallest job, one worker: a cold `keel run` with its own embedded Ray that trains in process
    result = startup.main(["--rounds", "1", "--workers", "1"])
    assert result["rounds"][0]["in_process"]  # a cold `keel run` of one worker trains where it runs
    phases = result["median"]
    assert 0 < phases["to_first_step"] < phases["to_exit"]
    assert all(phases[k] >= 0 for k in ("ray_start", "worker_group", "dataset_first_batch", "first_step"))
