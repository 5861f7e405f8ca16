"""Each benchmark runs end to end on a tiny size (numbers are not asserted: this machine is shared)."""

import json

from tests.conftest import ROOT


def test_guards_overhead_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    from benchmarks import guards_overhead

    result = guards_overhead.main(["--steps", "2", "--rounds", "2"])
    assert result["ratio_on_off"] > 0
    assert json.loads((tmp_path / "guards_overhead.json").read_text())["median_step_s"]["guards_on"] > 0
