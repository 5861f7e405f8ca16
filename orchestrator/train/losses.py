"""Training losses, including robust ones for noisy labels.

- cross_entropy, with optional label smoothing (Szegedy et al. 2016);
- symmetric_ce: alpha * CE + beta * reverse CE, log(0) clamped to `log_clamp` (Wang et al. 2019, SCE);
- bootstrap: "soft" bootstrapping, targets = beta * labels + (1 - beta) * the model's own prediction
  (Reed et al. 2015);
- huber: Huber loss between softmax probabilities and the target distribution (bounded per sample, so a
  wrong label cannot dominate a batch);
- any of them plus PaLM's z-loss on the logits (`loss.z_loss`).

Targets are class indices or probability rows (one-hot, mixup). Each loss is a plain function of
(logits, targets, spec) so it can be tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_probs(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    probs = targets.float() if targets.dim() == 2 else F.one_hot(targets, num_classes).float()
    return probs * (1 - smoothing) + smoothing / num_classes if smoothing else probs


def cross_entropy(logits, targets, spec) -> torch.Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=spec.label_smoothing, reduction="none")


def symmetric_ce(logits, targets, spec) -> torch.Tensor:
    probs = target_probs(targets, logits.shape[1], spec.label_smoothing)
    forward = -(probs * F.log_softmax(logits, 1)).sum(1)
    reverse = -(F.softmax(logits, 1) * probs.clamp_min(torch.exp(torch.tensor(spec.log_clamp)).item()).log()).sum(1)
    return spec.sce_alpha * forward + spec.sce_beta * reverse


def bootstrap(logits, targets, spec) -> torch.Tensor:
    probs = target_probs(targets, logits.shape[1], spec.label_smoothing)
    own = F.softmax(logits, 1).detach()  # the prediction is a target, not a path for gradients
    mixed = spec.bootstrap_beta * probs + (1 - spec.bootstrap_beta) * own
    return -(mixed * F.log_softmax(logits, 1)).sum(1)


def huber(logits, targets, spec) -> torch.Tensor:
    probs = target_probs(targets, logits.shape[1], spec.label_smoothing)
    return F.huber_loss(F.softmax(logits, 1), probs, delta=spec.huber_delta, reduction="none").sum(1)


# each returns one loss per sample
LOSSES = {"cross_entropy": cross_entropy, "symmetric_ce": symmetric_ce, "bootstrap": bootstrap, "huber": huber}


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """PaLM's auxiliary loss (Chowdhery et al. 2022): log Z squared per sample, Z the softmax normaliser.
    Zero when log Z = 0; it pulls the logits' overall level back without changing their differences."""
    return torch.logsumexp(logits, dim=1).pow(2)


def sample_losses(logits: torch.Tensor, targets: torch.Tensor, spec) -> torch.Tensor:
    """The training loss of each sample (the batch's loss is their mean)."""
    loss = LOSSES[spec.kind](logits, targets, spec)
    return loss + spec.z_loss * z_loss(logits) if spec.z_loss else loss


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, spec) -> torch.Tensor:
    return sample_losses(logits, targets, spec).mean()


def without_worst(losses: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum, count) of a batch's per-sample losses less its largest one (a batch of one: nothing left). A
    batch whose loss is high because of one hard or mislabelled sample is what small batches look like,
    not instability; when training breaks, every sample's loss rises."""
    if losses.numel() < 2:
        return torch.zeros((), device=losses.device), 0
    return losses.sum() - losses.max(), losses.numel() - 1
