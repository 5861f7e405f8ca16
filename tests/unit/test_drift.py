"""Drift between a checkpoint's training data and new data: PSI over the reference's deciles, per feature
or (wide inputs) per channel."""

import numpy as np
import pytest

from orchestrator.data import drift


def test_the_same_distribution_shows_no_shift_and_a_moved_feature_is_named_first():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4000, 6))
    ref = drift.reference(old, [6])
    same = drift.compare(ref, rng.normal(size=(4000, 6)), [6])
    assert same["major"] == 0 and same["moderate"] == 0 and same["max_psi"] < 0.05
    new = rng.normal(size=(4000, 6))
    new[:, 4] += 1.0  # one feature moves by one standard deviation
    moved = drift.compare(ref, new, [6])
    assert moved["major"] == 1 and moved["most_shifted"][0]["feature"] == 4
    assert moved["most_shifted"][0]["mean_shift_std"] == pytest.approx(1.0, abs=0.1)
    line = drift.summary_line(moved)
    assert line.startswith("drift: major shift") and "feature 4 (PSI" in line and "mean +1.0 sd" in line


def test_wide_inputs_are_compared_per_channel_and_a_mismatch_is_said_not_guessed():
    rng = np.random.default_rng(1)
    shape = [3, 32, 32]
    old = rng.uniform(size=(300, 3 * 32 * 32))
    ref = drift.reference(old, shape)
    assert ref["level"] == "channel" and len(ref["edges"]) == 3
    new = rng.uniform(size=(300, 3 * 32 * 32))
    new[:, 1024:2048] = new[:, 1024:2048] * 0.6 + 0.25  # channel 1 fainter, on grey
    report = drift.compare(ref, new, shape)
    assert report["most_shifted"][0]["channel"] == 1 and report["major"] == 1
    other = drift.compare(ref, rng.uniform(size=(300, 64)), [64])
    assert other == {"comparable": False, "reason": "the reference has 3 channels, the new data 64 features"}
    assert "not compared" in drift.summary_line(other)
