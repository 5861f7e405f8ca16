"""Each benchmark runs end to end on a tiny size (numbers are not asserted: this machine is shared)."""

import json

from tests.helpers import ROOT


def test_guards_overhead_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    from benchmarks import guards_overhead

    result = guards_overhead.main(["--steps", "2", "--rounds", "2"])
    assert result["ratio_on_off"] > 0 and result["ratio_sync_bn"] > 0 and result["median_step_s"]["per_worker_bn"] > 0
    assert result["median_ratio_ci95"] is None and result["verdict"] == "too few rounds for an interval"  # 2 rounds decide nothing
    assert result["cpu_time"]["per_round_ratio_min_max"][0] > 0 and result["cpu_time"]["median_ratio_ci95"] is None
    assert json.loads((tmp_path / "guards_overhead.json").read_text())["median_step_s"]["guards_on"] > 0


def test_scaling_model_runs_and_projects(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    from benchmarks import scaling

    result = scaling.main(["--steps", "3"])  # two real gloo processes for the 2-worker numbers
    assert result["measured"]["t_step2"] > 0 and result["measured"]["t_allreduce2"] > 0
    eff = [p["efficiency"] for p in result["projection"]]
    assert eff[0] == 1.0 and all(a >= b for a, b in zip(eff, eff[1:]))  # more GPUs never project as more efficient


def test_gpu_path_code_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    from benchmarks import gpu_path

    result = gpu_path.main(["--device", "cpu", "--steps", "2", "--rounds", "1", "--batch", "4", "--channels", "[4,8]",
                            "--models", "main"])
    assert {r["amp"] for r in result["runs"]} == {"none", "bf16"}
    assert all(r["keel_samples_per_s"][0] > 0 and r["plain_samples_per_s"][0] > 0 for r in result["runs"])
    assert result["batchnorm_on_this_device"] == "KeelSyncBatchNorm"


def test_gpu_guards_code_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    from benchmarks import gpu_guards

    result = gpu_guards.main(["--device", "cpu", "--model", "main", "--amp", "none", "--batch", "4", "--steps", "2",
                              "--rounds", "1"])
    assert set(result["step_s"]) == {*gpu_guards.VARIANTS, "plain"} and result["profile_defaults"]["top_self_cpu"]


def test_overhead_ratios_are_per_round_medians_and_a_wide_spread_is_not_a_result():
    from benchmarks.overhead import ratio_summary

    steady = [{"keel": 80.0, "ray_train": 100.0, "torchrun": 100.0, "single": 200.0},
              {"keel": 90.0, "ray_train": 100.0, "torchrun": 110.0, "single": 200.0},
              {"keel": 85.0, "ray_train": 100.0, "torchrun": 100.0, "single": 200.0}]
    summary = ratio_summary(steady)
    assert summary["keel/ray_train"]["median"] == 0.85 and summary["keel/ray_train"]["min"] == 0.8
    assert summary["keel/torchrun"]["rounds"] == [0.8, 90.0 / 110.0, 0.85] and summary["keel/torchrun"]["within_spread"]
    noisy = steady[:2] + [{"keel": 60.0, "ray_train": 100.0, "torchrun": 100.0, "single": 200.0}]
    assert not ratio_summary(noisy)["keel/ray_train"]["within_spread"]  # 0.6 is 25% under the median 0.8


def test_a_target_cleared_or_missed_in_every_round_is_a_result_whatever_the_spread():
    from benchmarks.overhead import verdict

    def ratio(*rounds):
        mid = sorted(rounds)[len(rounds) // 2]
        return {"median": mid, "min": min(rounds), "max": max(rounds),
                "within_spread": all(abs(v - mid) <= 0.1 * mid for v in rounds)}

    assert verdict(ratio(1.66, 1.72, 2.01), 1.0) == "met in every round"  # spread 17%, every round above
    assert verdict(ratio(0.31, 0.38, 0.39), 0.8) == "missed in every round"
    assert verdict(ratio(0.77, 0.92, 1.05), 1.0) == "spread beyond +-10% across the target: not a result"
    assert verdict(ratio(0.78, 0.82, 0.85), 0.8) == "met"  # within +-10%, the median clears it
    assert verdict(ratio(0.78, 0.82, 0.85), None) == "-"


def test_snapshot_cost_runs_on_a_full_ring(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    from benchmarks import snapshot_cost

    result = snapshot_cost.main(["--sizes", "1e6", "--rounds", "1", "--every", "5"])
    (size,) = result["sizes"].values()
    assert size["snapshot_s"][0] > 0 and size["recycled_snapshot_s"][0] > 0 and size["snapshot_bytes"] > 3 * 4 * 1e6 * 0.9
    assert set(size["overhead"]) == {"blocking", "background"}


def test_run_processes_sums_cpu_by_ray_title_and_counts_processes_that_started_between_marks():
    from benchmarks.run_processes import cpu_between, process_kind, read_processes

    assert process_kind("ray::TrainController.run()") == process_kind("ray::TrainController") == "ray::TrainController"
    assert process_kind("/usr/bin/python3 -m x") == "python3"
    before = {("1", "10"): (5.0, "ray::TrainController"), ("2", "11"): (1.0, "ray::IDLE")}
    after = {("1", "10"): (7.5, "ray::TrainController"), ("2", "11"): (1.0, "ray::IDLE"),
             ("3", "12"): (2.0, "ray::RayTrainWorker"), ("4", "13"): (2.5, "ray::RayTrainWorker")}
    cpu, new = cpu_between(before, after)
    assert cpu == {"ray::TrainController": 2.5, "ray::RayTrainWorker": 4.5}  # an idle process used nothing
    assert new == {"ray::TrainController": 0, "ray::RayTrainWorker": 2}
    assert any(name.startswith(("python", "/")) for _, name in read_processes().values())  # this very process


def test_data_wait_reports_each_epoch_and_the_worst_after_the_first():
    from benchmarks.data_wait import summarize

    history = [{"epoch": 0, "data_wait_frac": 0.5, "samples_per_s": 100.0},  # the pipeline's start-up
               {"epoch": 1, "data_wait_frac": 0.02, "samples_per_s": 900.0},
               {"epoch": 2, "data_wait_frac": 0.04, "samples_per_s": 950.0}]
    summary = summarize(history)
    assert summary["steady_data_wait_frac"] == 0.04 and [e["epoch"] for e in summary["epochs"]] == [0, 1, 2]
    assert summarize(history[:1])["steady_data_wait_frac"] == 0.5  # one epoch: it is all there is
