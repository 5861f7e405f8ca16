"""The stress scenarios are valid jobs, and a stabiliser scenario sets its stabiliser in both profiles."""

from pathlib import Path

from orchestrator.spec import JobSpec
from orchestrator.stress.scenarios import BY_NAME, JOBS, SCENARIOS, scenario_job

EPOCHS = {"digits": 8, "lstm": 4, "transformer": 10}


def data_dirs(root: Path) -> dict[str, Path]:
    return {workload: root / workload for workload in JOBS}


def test_every_scenario_is_a_valid_job_in_both_profiles(tmp_path):
    for scenario in SCENARIOS:
        for profile in ("plain", "keel"):
            JobSpec.model_validate(scenario_job(scenario, profile, data_dirs(tmp_path), EPOCHS, tmp_path))


def test_a_stabiliser_is_set_after_the_profile_so_the_plain_loop_gets_it_too(tmp_path):
    warm = {p: JobSpec.model_validate(scenario_job(BY_NAME["transformer_high_lr+warmup"], p, data_dirs(tmp_path), EPOCHS, tmp_path))
            for p in ("plain", "keel")}
    assert warm["plain"].schedule.warmup_epochs == 1 and warm["keel"].schedule.warmup_epochs == 1
    assert not warm["plain"].stability.spike.enabled and warm["keel"].stability.spike.enabled  # the profiles still differ
    bare = {p: JobSpec.model_validate(scenario_job(BY_NAME["transformer_high_lr"], p, data_dirs(tmp_path), EPOCHS, tmp_path))
            for p in ("plain", "keel")}
    assert bare["plain"].schedule.warmup_epochs == 0 and bare["plain"].optimizer.lr == 0.006
    assert bare["keel"].schedule.warmup_epochs == 2.5  # no warmup written: Keel's default, a quarter of 10 epochs
    assert warm["keel"].run.name == "transformer_high_lr-warmup-keel"


def test_the_data_shift_lasts_to_the_end_and_reaches_validation(tmp_path):
    job = JobSpec.model_validate(scenario_job(BY_NAME["data_shift"], "keel", data_dirs(tmp_path), EPOCHS, tmp_path))
    (fault,) = job.faults
    assert fault.kind == "invert_inputs" and fault.at_step + fault.repeat > 8 * 23
