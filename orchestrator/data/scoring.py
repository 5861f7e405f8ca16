"""Difficulty from an earlier checkpoint: each row's loss under that checkpoint's model.

The checkpoint carries its spec (config.yaml), its weights and the preprocessing statistics it was
trained with, so rows are scored exactly as that model saw them. The driver scores the training split
for the curriculum's quantiles; Ray Data tasks score the same rows again (cached model per process)
to attach the column, so the result does not depend on the order Ray reads the rows in.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from orchestrator.data.preprocess import PreprocessState, apply_preprocess
from orchestrator.errors import BadInput


@lru_cache(maxsize=2)
def load_scorer(checkpoint_dir: str):
    from orchestrator.models import build_model
    from orchestrator.spec import JobSpec
    from orchestrator.train.checkpointing import CONFIG_FILE, STATE_FILE, read_payload

    directory = Path(checkpoint_dir)
    if not (directory / STATE_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
        raise BadInput(f"data.curriculum.checkpoint: {checkpoint_dir}: not a Keel checkpoint (needs {STATE_FILE} and {CONFIG_FILE})")
    spec = JobSpec.model_validate(yaml.safe_load((directory / CONFIG_FILE).read_text()))
    payload = read_payload(directory)
    model = build_model(spec.model, spec.data)
    model.load_state_dict(payload["model"])
    model.eval()
    saved = (payload.get("extra") or {}).get("preprocess") or {}
    state = PreprocessState(**{k: (np.asarray(v, dtype=np.float32) if isinstance(v, list) else v) for k, v in saved.items()})
    state.onehot, state.drop_bad_rows = False, False
    return model, state, spec.data.shape


@torch.no_grad()
def checkpoint_losses(checkpoint_dir: str, x_raw: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy under the checkpoint's model; rows it cannot score are hardest (inf)."""
    model, state, shape = load_scorer(checkpoint_dir)
    x, _, _ = apply_preprocess(x_raw, np.where((y >= 0) & (y < state.num_classes), y, 0), state)
    bad = ~np.isfinite(x).all(axis=1) | (y < 0) | (y >= state.num_classes)
    logits = model(torch.from_numpy(np.nan_to_num(x, posinf=0, neginf=0)).reshape(len(x), *shape))
    losses = F.cross_entropy(logits, torch.from_numpy(np.clip(y, 0, state.num_classes - 1)).long(), reduction="none").numpy()
    return np.where(bad, np.inf, losses).astype(np.float64)
