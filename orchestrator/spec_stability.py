"""The job spec's `stability` section: clipping, the non-finite skip, spike and collapse recovery, diagnostics,
early stopping (split from orchestrator/spec.py, which re-exports every class here)."""

from __future__ import annotations

from typing import Literal, Optional

from orchestrator import metric_keys as mk
from orchestrator.spec_fields import Section, doc

METRICS = mk.MONITORABLE


class ClipSpec(Section):
    mode: Literal["auto", "norm", "value", "none", "agc", "zscore"] = doc(
        "auto", "Clip by global L2 norm, elementwise value, adaptive unit-wise (agc), z-score of the norm, or not at all; auto: agc for feed-forward nets without normalisation layers, zscore otherwise (chosen by measurement, see orchestrator/stability/clipping.py).")
    max_norm: float = doc(1.0, "norm: global L2 norm threshold (zscore: the fixed threshold during its warm-up).", gt=0)
    max_value: float = doc(1.0, "value: elementwise threshold.", gt=0)
    agc_lambda: float = doc(0.01, "agc: max gradient/weight norm ratio per unit (Brock et al. 2021).", gt=0)
    agc_eps: float = doc(1e-3, "agc: floor on the weight norm so zero-initialised weights can move.", gt=0)
    zscore_z: float = doc(3.0, "zscore: clip norms above EMA mean + z x EMA std.", gt=0)
    zscore_beta: float = doc(0.98, "zscore: EMA decay of the norm statistics.", gt=0, lt=1)
    zscore_warmup: int = doc(20, "zscore: steps of fixed max_norm clipping while the statistics settle.", ge=1)


class SpikeSpec(Section):
    enabled: bool = doc(True, "Detect loss and gradient-norm spikes (z-score against an EMA of calm steps).")
    window: int = doc(32, "EMA window, in steps, of the loss and grad-norm statistics (128 let a falling loss's trend hide a 150x spike: z 4.9).", ge=2)
    z_loss: float = doc(6.0, "A loss more than this many std above its EMA mean is a spike.", gt=0)
    z_grad: float = doc(6.0, "A global grad norm more than this many std above its EMA mean is a spike.", gt=0)
    warmup_steps: int = doc(50, "Steps of statistics gathering before detection starts.", ge=1)
    action: Literal["skip", "rollback", "reduce_lr"] = doc("rollback", "On a spike: roll back to an in-memory snapshot and skip batches (default: also undoes an update that was already applied), skip the step, or cut and re-warm the LR.")
    snapshot_every: int = doc(25, "rollback: steps between in-memory snapshots (also their minimum age when restoring).", ge=1)
    snapshots: int = doc(3, "rollback: snapshots kept in memory.", ge=1)
    rollback_skip_batches: int = doc(10, "rollback: batches every rank skips after restoring.", ge=0)
    lr_factor: float = doc(0.5, "reduce_lr: LR multiplier applied per recovery.", gt=0, lt=1)
    rewarm_steps: int = doc(50, "reduce_lr: steps to ramp the reduced LR back up from zero.", ge=1)
    cut_lr_after: int = doc(2, "rollback: from this many recoveries within `window` steps on, each rollback also multiplies the LR by lr_factor for the rest of the run (0 = never).", ge=0)
    max_recoveries: int = doc(10, "Recoveries allowed within `window` steps; one more stops the run as diverged.", ge=0)
    min_rise: float = doc(0.05, "A loss spike must also rise this much above its mean, as a fraction of the loss's chance level (cross-entropy: ln classes; other losses: the run's first loss): near zero loss, z-scores blow up on jitter (converged tabular runs logged 2-8 spikes and a rollback; measured). 0 = the z-score alone.", ge=0)
    rebaseline_after: int = doc(2, "rollback: when this many rollbacks in a row meet the spike again at the first step after restoring (the restored, calm weights already see the high loss: the data changed, not the run), accept the new level: re-baseline the statistics, undo those rollbacks' LR cuts and train on (0 = never).", ge=0)


class DiagnosticsSpec(Section):
    enabled: bool = doc(True, "Collect per-layer diagnostics and write stability_report.json at the end.")
    every: int = doc(50, "Sample per-layer update ratios and dead units every this many steps.", ge=1)


class NonFiniteSpec(Section):
    enabled: bool = doc(True, "Skip steps with a NaN/Inf loss or gradient (off: they are applied, as in a plain loop).")
    max_consecutive_skips: int = doc(10, "Consecutive skipped (NaN/Inf) steps after which the run stops as diverged.", ge=1)
    max_batch_scale_ratio: float = doc(1000.0, "Also skip a step whose input batch's mean square exceeds this multiple of its running average (a corrupt batch that BN hides from the loss while poisoning its running statistics; judged after 50 steps; 0 = off).", ge=0)


class EarlyStoppingSpec(Section):
    enabled: bool = doc(False, "Stop when the monitored metric stops improving.")
    metric: Literal[METRICS] = doc(mk.VAL_LOSS, "Metric to monitor.")
    mode: Literal["min", "max"] = doc("min", "Whether lower (min) or higher (max) is better.")
    patience: int = doc(5, "Epochs without improvement before stopping.", ge=1)
    min_delta: float = doc(0.0, "Smallest change that counts as an improvement.", ge=0)
    divergence_threshold: Optional[float] = doc(None, "Stop at once (diverged) if the metric gets worse than this.")
    check_finite: bool = doc(True, "Stop at once (diverged) if the metric is NaN or Inf.")


class CollapseSpec(Section):
    action: Literal["report", "rollback"] = doc(
        "rollback", "A validation loss back at a uniform guess (ln classes, at most 1.1x it) after the model had "
        "learned, judged at each epoch's end: roll back to the best epoch's weights and optimizer state and cut the LR "
        "for the rest of the run (long_lstm seed 1: 0.55 -> 0.87, see benchmarks/RESULTS.md), or only report it "
        "(the stability report's collapse names it either way). Only cross_entropy has a chance level: other losses "
        "are not watched, and rollback is refused for them.")
    lr_factor: float = doc(0.5, "rollback: LR multiplier applied for good at each collapse rollback.", gt=0, le=1)
    max_rollbacks: int = doc(2, "rollback: collapse rollbacks allowed in a run; later collapses are only reported.", ge=1)


class StabilitySpec(Section):
    clip: ClipSpec = doc(ClipSpec(), "Synchronized gradient clipping (after DDP's all-reduce and AMP unscale).")
    sync_batchnorm: bool = doc(True, "Batch norm statistics over the global batch (torch's SyncBatchNorm on CUDA, Keel's on CPU).")
    nonfinite: NonFiniteSpec = doc(NonFiniteSpec(), "Skip optimizer steps whose loss or gradients are NaN/Inf on any rank.")
    early_stopping: EarlyStoppingSpec = doc(EarlyStoppingSpec(), "Early stopping agreed across ranks.")
    spike: SpikeSpec = doc(SpikeSpec(), "Spike detection and recovery, agreed across ranks.")
    diagnostics: DiagnosticsSpec = doc(DiagnosticsSpec(), "Per-layer diagnostics and the stability report.")
    collapse: CollapseSpec = doc(CollapseSpec(), "What to do when the loss goes back to chance level after learning.")
    remember_bad_batches: bool = doc(True, "Remember the batches a guard rejected (epoch, index), write them to bad_batches.json in the run directory and drop them again after a resume.")
