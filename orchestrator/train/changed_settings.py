"""What a re-run of a run changes against the checkpoint it resumes from.

Re-running a `run.name` resumes it, and a re-run may change hyper-parameters: a lower LR, more epochs. The
optimizer's and the LR schedule's state in a checkpoint carry the old ones (torch restores a param group's
lr, betas and weight decay, and a scheduler's base LRs and length, from their state dicts). Loaded as they
are, a changed `optimizer.lr` was ignored, and a cosine run given more epochs climbed back to its peak LR
(cosine annealing past its T_max is periodic). So a resume whose hyper-parameters changed takes the weights,
the optimizer's moments and every guard's state from the checkpoint, and this job's hyper-parameters with
its own LR schedule replayed to the checkpoint's step: the run continues as if the job had said so from
the start. A resume that changed none of them is the exact continuation it always was.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# the settings that decide the optimizer's hyper-parameters and the LR at each step
HYPER_PARAMETERS = ("optimizer.", "schedule.", "regularization.weight_decay", "init_from.lr_multipliers", "run.epochs")
NOT_A_CHANGE = ("run.name", "run.storage_path")  # the same run, however it is named on the command line


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_settings(written_with: dict | None, spec, only: tuple[str, ...] | None = None) -> list[str]:
    """'key old → new' for each setting of `spec` that differs from the spec a checkpoint was written with
    (its config.yaml), in the spec's order; `only`: settings starting with one of these."""
    if not written_with:
        return []
    before, now = flatten(written_with), flatten(yaml.safe_load(spec.to_yaml()))
    keys = [k for k in now if k not in NOT_A_CHANGE and (only is None or k.startswith(only))]
    # a setting the checkpoint's spec lacks (written by an older Keel) is left out: it ran with that default
    return [f"{k} {_shown(before[k])} → {_shown(now[k])}" for k in keys if k in before and before[k] != now[k]]


def read_written_with(checkpoint: Path) -> dict | None:
    from orchestrator.train.checkpointing import CONFIG_FILE

    try:
        return yaml.safe_load((Path(checkpoint) / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None


def hyper_parameter_changes(checkpoint: Path, spec, payload: dict, plan_steps: int | None) -> list[str]:
    """Why this resume cannot load the checkpoint's optimizer hyper-parameters and schedule as they are; [] when
    it can. Besides the settings, a plan with another number of steps to the checkpoint's epoch (other worker
    counts or batch sizes: a linearly scaled LR and the schedule's length follow the plan)."""
    changes = changed_settings(read_written_with(checkpoint), spec, only=HYPER_PARAMETERS)
    if plan_steps is not None and plan_steps != payload["step"]:
        changes.append(f"steps to the end of epoch {payload['epoch'] + 1} {payload['step']} → {plan_steps}")
    return changes


def describe(changes: list[str], limit: int = 3) -> str:
    shown = ", ".join(changes[:limit])
    return shown + (f" (+{len(changes) - limit} more)" if len(changes) > limit else "")


def _shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
