"""The LSTM, transformer and GCN jobs converge as shipped (run through Keel's pytest plugin, as a user tests their
own job), and the stress suite runs end to end. The custom-model example: tests/integration/test_cluster_jobs.py."""

import json

import pytest

from orchestrator import cli
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def run_shipped_job(keel_run, name: str, tmp_path, epochs: int):
    """A shipped job through Keel's pytest plugin (`keel_run`), as a user tests their own; data.generate writes
    the dataset on first use."""
    outcome = keel_run(ROOT / "jobs" / f"{name}.yaml", f"data.train={tmp_path}/data/train.parquet",
                       f"data.val={tmp_path}/data/val.parquet", run__epochs=epochs)
    # the plugin applied its overrides: the run lives under the test's tmp_path and ran the epochs asked for
    assert outcome.run_dir.parent == tmp_path and len(outcome.history) <= epochs, (outcome.run_dir, len(outcome.history))
    return outcome


@pytest.mark.timeout(600)
def test_sequence_lstm_job_learns_the_sign_of_the_sum(keel_run, tmp_path):
    # The label is the sign of the sum of 32 N(0,1) steps: a deterministic function of the input, so an
    # LSTM that integrates can approach 100%. Chance is 50%; the shipped job reaches ~0.98 in 6 epochs.
    outcome = run_shipped_job(keel_run, "sequence-lstm", tmp_path, 4)
    assert outcome.ok and outcome.final["val_accuracy"] >= 0.93, outcome.final


@pytest.mark.timeout(600)
def test_sequence_transformer_job_learns_to_compare_the_first_token_with_the_rest(keel_run, tmp_path):
    # Whether the first token comes back later (chance ~51%): no token count or single position tells, the
    # first token has to be compared with every other. The shipped job sits at chance for ~2 epochs, then
    # jumps (1.0 from epoch 5 of 10, measured).
    outcome = run_shipped_job(keel_run, "sequence-transformer", tmp_path, 6)
    assert outcome.ok and outcome.final["val_accuracy"] >= 0.95, outcome.final
    assert outcome.history[0]["val_accuracy"] < 0.7  # it was not solvable without learning to attend


@pytest.mark.timeout(600)
def test_graph_gcn_job_tells_community_structure_apart(keel_run, tmp_path):
    # Three classes of SBM graph (assortative, disassortative, random); chance is 33%. A node's own feature
    # is a noisy community hint, so the class is only visible through message passing (~0.89 in 8 epochs).
    outcome = run_shipped_job(keel_run, "graph-gcn", tmp_path, 6)
    assert outcome.ok and outcome.final["val_accuracy"] >= 0.80, outcome.final


@pytest.mark.timeout(600)
def test_keel_stress_poisoned_batches_kill_the_plain_loop_not_keel(keel_ray, tmp_path, capsys):
    out = tmp_path / "stress"
    # 3 epochs (66 steps): the NaN batch at step 30 is skipped, the 1e4x batch at 60 is caught as a spike
    # one seed: this is the suite's smoke test; the measured table (2 seeds, all scenarios) is in the README
    assert cli.main(["stress", "--scenarios", "poisoned_batches", "--epochs", "3", "--seeds", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "stress.json").read_text())
    runs = {r["profile"]: r for r in summary["runs"]}
    assert runs["plain"]["diverged"] and not runs["plain"]["converged"]   # the NaN step was applied
    assert not runs["keel"]["diverged"] and runs["keel"]["accuracy"] > 0.8  # skipped on every rank
    cell = summary["cells"]["poisoned_batches"]
    assert cell["keel"]["mean"] == runs["keel"]["accuracy"] and cell["plain"]["diverged"] == 1 and cell["no_harm"]
    assert "| poisoned_batches |" in (out / "stress.md").read_text()
    assert (out / "stress_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert "Converged: **keel" in capsys.readouterr().out


def test_keel_stress_unknown_scenario_is_exit_2(capsys):
    assert cli.main(["stress", "--scenarios", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err
