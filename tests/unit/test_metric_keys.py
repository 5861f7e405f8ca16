"""Metric key names live in one module (orchestrator/metric_keys.py): writers and readers use its names."""

import ast
from pathlib import Path

from orchestrator import metric_keys as mk
from orchestrator.train.meters import EpochMeter

PACKAGE = Path(mk.__file__).parent
# the names that mean nothing but a metric (words like "epoch", "step", "lr" or "loss" are also event
# types, spec fields and statuses, so a literal of those is not necessarily a metric key)
DISTINCT = {value for name, value in vars(mk).items() if name.isupper() and isinstance(value, str) and "_" in value}


def spelled_out(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in DISTINCT]


def test_no_module_spells_a_metric_key_itself():
    assert {"val_accuracy", "train_loss", "grad_norm_post_clip", "stop_reason", "skipped_steps"} <= DISTINCT
    found = {str(path.relative_to(PACKAGE)): hits for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "metric_keys.py" and (hits := spelled_out(path))}
    assert found == {}, f"use orchestrator.metric_keys instead of these literals: {found}"


def test_what_the_epoch_meter_reports_is_declared():
    declared = {value for name, value in vars(mk).items() if name.isupper() and isinstance(value, str)}
    meter = EpochMeter()
    meter.add(1.0, 2.0, 64)
    assert set(meter.summary()) <= declared
