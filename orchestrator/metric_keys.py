"""The names of what a run reports, in one place: the training loop and its safeguards write these keys,
and the console, the run files (CSV, TensorBoard), the HTML report, sweeps, stress and `keel check`
read them. A rename here reaches every reader; a reader cannot look for a key that nobody writes.

    from orchestrator import metric_keys as mk
    metrics[mk.VAL_ACCURACY]
"""

# Per epoch (metrics.jsonl, the Ray Train report, Tune's results)
EPOCH = "epoch"                      # 0-based
STEP = "step"                        # optimizer steps so far, whole run
TRAIN_LOSS = "train_loss"            # mean over the epoch's finite global losses
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LR = "lr"                            # first parameter group's, at the epoch's end
GRAD_NORM_MEAN = "grad_norm_mean"    # global pre-clip norm, over the epoch's steps
GRAD_NORM_MAX = "grad_norm_max"
SAMPLES_PER_S = "samples_per_s"      # all workers together
DATA_WAIT_FRAC = "data_wait_frac"    # share of the epoch spent waiting for batches
EPOCH_TIME_S = "epoch_time_s"
WORLD_SIZE = "world_size"
REPLICA_DRIFT = "replica_drift"      # max parameter difference between ranks (0.0 under DDP)
STOP_REASON = "stop_reason"          # "" while the run goes on
DIVERGED = "diverged"                # 1 when the stop was a divergence
WAITING_FOR_CLONE = "waiting_for_clone"  # a PBT trial's report after its run diverged and ended
EVENTS = "events"                    # the epoch's last safeguard events
GUARD_EVENTS = "guard_events"        # a sweep trial's report: how many so far (Tune's loggers take numbers, not lists)
RESUMED_FROM = "resumed_from"        # {checkpoint, fingerprint, ranks} on the first epoch after a resume
INIT_FROM = "init_from"              # fine-tuning: the checkpoint and the layers re-initialised

# Safeguard counters, cumulative over the run
SKIPPED_STEPS = "skipped_steps"
SPIKES = "spikes"
ROLLBACKS = "rollbacks"
LR_REDUCTIONS = "lr_reductions"
BATCHES_SKIPPED = "batches_skipped"
REBASELINES = "rebaselines"
COLLAPSE_ROLLBACKS = "collapse_rollbacks"  # stability.collapse.action rollback
GRAD_NORM_JUMPS = "grad_norm_jumps"  # gradient-norm spikes let through under the clip: the guard did nothing
LET_THROUGH = "clipped"  # such a spike's event action: no guard event, not where trouble started
SPIKE_COUNTERS = (SPIKES, ROLLBACKS, LR_REDUCTIONS, BATCHES_SKIPPED, REBASELINES, GRAD_NORM_JUMPS)  # the spike guard's
COUNTERS = (SKIPPED_STEPS, *SPIKE_COUNTERS, COLLAPSE_ROLLBACKS)  # the stability report's counters
ACTED_COUNTERS = (SKIPPED_STEPS, SPIKES, COLLAPSE_ROLLBACKS)  # each a time a guard acted (a spike's rollback is its spike)

MONITORABLE = (VAL_LOSS, VAL_ACCURACY, TRAIN_LOSS)  # what early stopping may watch
# The per-epoch scalars written to metrics.csv and TensorBoard (epoch/<key>)
EPOCH_SCALARS = (TRAIN_LOSS, VAL_LOSS, VAL_ACCURACY, LR, GRAD_NORM_MEAN, GRAD_NORM_MAX, SKIPPED_STEPS,
                 SPIKES, ROLLBACKS, LR_REDUCTIONS, SAMPLES_PER_S, DATA_WAIT_FRAC, REPLICA_DRIFT)

# Per logged step (steps.jsonl, TensorBoard step/<key>)
GLOBAL_STEP = "global_step"
LOSS = "loss"                        # the global (all-rank) loss of the step
GRAD_NORM = "grad_norm"              # global norm before clipping
GRAD_NORM_POST_CLIP = "grad_norm_post_clip"
STEP_SCALARS = (LOSS, GRAD_NORM, GRAD_NORM_POST_CLIP, LR)


def extra_val(key: str, name: str) -> str:
    """The key of a metric measured on an extra validation set, e.g. val_accuracy_original."""
    return f"{key}_{name}"


def extra_val_names(metrics: dict) -> list[str]:
    """The names of the extra validation sets (data.extra_val) an epoch's metrics hold."""
    return [key.removeprefix(VAL_ACCURACY + "_") for key in metrics if key.startswith(VAL_ACCURACY + "_")]
