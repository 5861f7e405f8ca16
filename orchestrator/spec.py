"""The job spec: a typed tree loaded from YAML, with `a.b=c` overrides.

Every field has one line of documentation (its `description`), shown by
`keel spec` and in the README reference. Unknown keys are
rejected everywhere (`extra="forbid"`), and combinations that cannot work are
rejected at load time with a message naming the field, never mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import BadInput
from orchestrator.spec_fields import Section, doc
from orchestrator.spec_stability import (  # noqa: F401 (re-exported: callers import every section from here)
    ClipSpec, CollapseSpec, DiagnosticsSpec, EarlyStoppingSpec, NonFiniteSpec, SpikeSpec, StabilitySpec)
from orchestrator.spec_text import apply_overrides, read_yaml  # noqa: F401 (re-exported: callers load specs from here)

ACTIVATIONS = ("relu", "leaky_relu", "elu", "silu", "swish", "gelu")
INITS = ("auto", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "default")


class ModelSpec(Section):
    kind: Literal["mlp", "cnn", "resnet", "lstm", "gcn", "transformer", "custom"] = doc("resnet", "Architecture family: mlp, cnn (plain conv stack), resnet (residual blocks), lstm (data.shape [time, features]), gcn (data.shape [nodes, nodes + node features]: adjacency then features), transformer (pre-LN encoder, data.shape [time, features]), or custom (your own nn.Module from model.factory).")
    factory: Optional[str] = doc(None, "kind custom: 'package.module:function', imported from the current directory; called as function(shape=data.shape, num_classes=data.num_classes, **model.args), it returns an nn.Module giving num_classes logits.")
    args: dict[str, Any] = Field(default_factory=dict, description="kind custom: keyword arguments for model.factory.")
    hidden: list[int] = doc([128, 128], "Hidden widths: MLP layers, stacked LSTM layers, or GCN layers.")
    channels: list[int] = doc([32, 64], "CNN/ResNet channels per stage; each stage after the first halves the resolution.")
    blocks_per_stage: int = doc(2, "ResNet residual blocks per stage.", ge=1)
    batch_norm: bool = doc(True, "Use batch norm after each conv/linear layer.")
    activation: Literal[ACTIVATIONS] = doc("relu", "Hidden activation: relu, leaky_relu, elu, silu/swish or gelu.")
    leaky_slope: float = doc(0.01, "Negative slope of leaky_relu (also used for its init gain).", ge=0, lt=1)
    init: Literal[INITS] = doc("auto", "Weight init of conv/linear layers; 'default' keeps torch's; 'auto': kaiming_normal for nets without normalisation layers, torch's default for nets with them (measured: see orchestrator/models/init.py); a custom model keeps its own init unless a scheme is named. Under every scheme but 'default', LSTM layers get the classic recurrent init: orthogonal recurrent and Xavier input weights per gate, forget-gate bias 1.")
    dropout: float = doc(0.0, "Dropout probability before the classifier (and between MLP/LSTM/GCN layers).", ge=0, lt=1)
    width: int = doc(64, "transformer: model width (embedding and residual stream).", ge=1)
    layers: int = doc(2, "transformer: encoder blocks.", ge=1)
    heads: int = doc(4, "transformer: attention heads (model.width must divide by it).", ge=1)
    qk_norm: Union[bool, Literal["auto"]] = doc(
        "auto", "transformer: LayerNorm on each head's queries and keys (QK-layernorm), which bounds the attention "
        "logits; auto: on for a transformer (measured: see the stress suite's transformer rows), off for other models.")
    zero_init_residual: bool = doc(False, "Start each residual branch's last BN at zero so blocks begin as identities (off by default: with weights x10 it cost 15 points in the stress suite).")

    @model_validator(mode="after")
    def _resolve_qk_norm(self) -> "ModelSpec":  # resolved here, so the model builder and config.yaml see a bool
        if self.qk_norm == "auto":
            self.qk_norm = self.kind == "transformer"
        return self


class PreprocessSpec(Section):
    standardize: Literal["auto", "none", "per_feature", "per_channel"] = doc(
        "auto", "Standardise with mean/std of the TRAINING split (stored in checkpoints). auto: per_feature for "
        "tabular rows (data.shape of one dimension) into Keel's MLP, whose columns come in unrelated units (scikit-learn's wine "
        "set, proline in the hundreds beside hue near 1: val accuracy 0.70 as read with Keel's guards, 0.75 in a "
        "plain loop; 0.99 standardised, either way), none for images, sequences, graphs and a custom model's inputs (set per_channel for images).")
    impute: Literal["none", "mean", "median", "constant"] = doc("none", "Fill NaN features with the training split's mean/median, or a constant.")
    impute_value: float = doc(0.0, "impute: constant: the fill value.")
    labels: Literal["index", "onehot"] = doc("index", "Label encoding fed to the loss (mixup/cutmix imply onehot).")


class AugmentSpec(Section):
    random_crop_padding: int = doc(0, "Images: pad by this many pixels and crop back at a random offset (0 = off).", ge=0)
    hflip: float = doc(0.0, "Images: probability of a horizontal flip.", ge=0, le=1)
    noise_std: float = doc(0.0, "Std of additive gaussian noise (after standardisation).", ge=0)
    cutout: int = doc(0, "Images: side of a random square zeroed per sample (0 = off).", ge=0)
    brightness: float = doc(0.0, "Random brightness shift in [-b, b] per sample.", ge=0)
    contrast: float = doc(0.0, "Random contrast factor in [1-c, 1+c] per sample.", ge=0, lt=1)
    mixup_alpha: float = doc(0.0, "Mixup Beta(alpha, alpha) mixing of samples and labels (0 = off).", ge=0)
    cutmix_alpha: float = doc(0.0, "Images: CutMix Beta(alpha, alpha) box pasting, labels mixed by area (0 = off).", ge=0)

    @property
    def active(self) -> bool:
        return any(v for v in self.model_dump().values())

    @property
    def soft_labels(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)


class CurriculumSpec(Section):
    enabled: bool = doc(False, "Train on the easiest rows first, widening the pool every epoch.")
    score: str = doc("difficulty", "Training-split column with each row's difficulty (higher = harder).")
    checkpoint: Optional[str] = doc(None, "Instead of a column: a Keel checkpoint directory whose model's per-row loss is the difficulty.")
    pacing: Literal["linear", "root", "step"] = doc("linear", "How the pool grows: linearly, as a square root, or in 4 steps.")
    start_fraction: float = doc(0.3, "Fraction of the data in the pool at epoch 1.", gt=0, le=1)
    full_epoch: int = doc(5, "Epoch (0-based) from which the pool is the whole training split.", ge=1)


class DataSpec(Section):
    train: str = doc(..., "Parquet file or directory with the training split.")
    val: str = doc(..., "Parquet file or directory with the validation split.")
    extra_val: dict[str, str] = doc({}, "More validation splits, name -> Parquet path, each reported every epoch as val_accuracy_<name> and val_loss_<name> (fine-tuning: the old data, to see forgetting).")
    generate: Optional[Literal["digits", "digits_shifted", "sequence", "tokens", "graphs", "synthetic", "tabular"]] = doc(None, "If the Parquet files are missing, write this built-in dataset (keel data make) there first.")
    features: Union[str, list[str]] = doc("image", "Feature column (a fixed-size list), or a list of scalar columns (tabular).")
    label: str = doc("label", "Column with class labels in [0, num_classes): integers, or floats that are whole numbers (pandas writes a label column with a gap as float64; a 1.5 or a missing label is a bad row).")
    shape: list[int] = doc(..., "Shape of one sample, e.g. [1, 8, 8] for images or [64] for tabular rows.", min_length=1)
    num_classes: int = doc(..., "Number of classes.", ge=2)
    batch_size: int = doc(32, "Batch size per worker; the global batch is batch_size x num_workers.", ge=2)
    shuffle_buffer: int = doc(0, "Rows each worker shuffles together: every chunk it fetches (at least this many rows) is permuted again before it is cut into batches. 0: only the pipeline's per-epoch shuffle of each block, which already puts every row of a block in a new random order each epoch (a second shuffle of those rows cost 13% of the ingest rate: benchmarks/RESULTS.md).", ge=0)
    prefetch_batches: int = doc(2, "Batches each worker prefetches while it computes, in whole fetched chunks (at least one).", ge=0)
    on_bad_rows: Literal["error", "drop"] = doc("error", "Rows with NaN/Inf features or out-of-range labels: refuse the data, or drop and count them.")
    preprocess: PreprocessSpec = doc(PreprocessSpec(), "Deterministic preprocessing, computed once.")
    augment: AugmentSpec = doc(AugmentSpec(), "Random augmentation, fresh every epoch (training split only).")
    curriculum: CurriculumSpec = doc(CurriculumSpec(), "Curriculum learning by a difficulty score.")

    @property
    def feature_columns(self) -> list[str]:
        return [self.features] if isinstance(self.features, str) else list(self.features)


class OptimizerSpec(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = doc("sgd", "Optimizer.")
    lr: float = doc(0.1, "Peak learning rate (after warmup, before world-size scaling).", gt=0)
    momentum: float = doc(0.9, "Momentum for sgd and rmsprop.", ge=0, lt=1)
    nesterov: bool = doc(False, "Nesterov momentum (sgd only).")
    betas: tuple[float, float] = doc((0.9, 0.999), "Adam/AdamW betas.")
    eps: float = doc(1e-8, "Adam/AdamW/RMSprop epsilon.", gt=0)
    scale_lr: Literal["none", "linear", "sqrt"] = doc("none", "Scale lr with the number of workers (Goyal et al.: linear).")


class ScheduleSpec(Section):
    kind: Literal["constant", "step", "exponential", "cosine", "cyclic", "one_cycle", "plateau"] = doc(
        "cosine", "LR schedule after warmup.")
    warmup_epochs: Union[float, Literal["auto"]] = doc(
        "auto", "Linear warmup from warmup_start_factor x lr to lr, in epochs (may be fractional); auto: a quarter of "
        "run.epochs for a transformer or an LSTM (a transformer at 3x its tuned LR, 6 seeds: 0.978 mean accuracy vs "
        "0.895 with 1 epoch; an LSTM at 3x, 8 seeds: 0.933 vs 0.892 without), 1 epoch for any other model (a quarter "
        "of a run shorter than 4 epochs; the digits ResNet, 6 seeds: at 30x its LR 0.981 vs 0.973 without, with 20% "
        "label noise 0.974 vs 0.963); 0 under one_cycle.")
    warmup_start_factor: float = doc(0.1, "LR at the start of warmup, as a fraction of lr.", gt=0, le=1)
    step_epochs: int = doc(10, "step: multiply the LR by gamma every this many epochs.", ge=1)
    gamma: float = doc(0.1, "step/exponential: LR factor per step_epochs (step) or per epoch (exponential).", gt=0, le=1)
    min_lr_ratio: float = doc(0.0, "cosine: final LR as a fraction of lr.", ge=0, le=1)
    cycle_epochs: float = doc(4.0, "cyclic: length of one triangle cycle in epochs.", gt=0)
    base_lr_ratio: float = doc(0.1, "cyclic: lowest LR as a fraction of lr.", gt=0, le=1)
    plateau_patience: int = doc(3, "plateau: epochs without val_loss improvement before the LR drops.", ge=0)
    plateau_factor: float = doc(0.5, "plateau: LR factor applied on a plateau.", gt=0, lt=1)

    @property
    def warmup(self) -> float:
        """warmup_epochs as a number: a JobSpec resolves auto by its model; a schedule on its own has none."""
        return 0.0 if self.warmup_epochs == "auto" else self.warmup_epochs

    @field_validator("warmup_epochs", mode="before")
    @classmethod
    def _warmup(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        raise ValueError(f"expected a number of epochs >= 0, or auto (got {value!r})")


def auto_warmup_epochs(model_kind: str, schedule_kind: str, epochs: int) -> float:
    """`schedule.warmup_epochs: auto`: a quarter of the run for a transformer or an LSTM, one epoch (a quarter of
    a shorter run) for every other model, none for one_cycle (it has its own). Measured in benchmarks/RESULTS.md."""
    if schedule_kind == "one_cycle":
        return 0.0
    return epochs / 4 if model_kind in ("transformer", "lstm") else min(1.0, epochs / 4)


class LossSpec(Section):
    kind: Literal["cross_entropy", "symmetric_ce", "bootstrap", "huber"] = doc(
        "cross_entropy", "Training loss; symmetric_ce / bootstrap / huber are robust to noisy labels.")
    label_smoothing: float = doc(0.0, "Mix this much of the uniform distribution into the targets.", ge=0, lt=1)
    sce_alpha: float = doc(0.1, "symmetric_ce: weight of the cross-entropy term.", ge=0)
    sce_beta: float = doc(1.0, "symmetric_ce: weight of the reverse cross-entropy term.", ge=0)
    log_clamp: float = doc(-4.0, "symmetric_ce: log(0) in the reverse term is clamped to this.", lt=0)
    bootstrap_beta: float = doc(0.8, "bootstrap: weight of the given labels against the model's own prediction.", gt=0, le=1)
    huber_delta: float = doc(1.0, "huber: the Huber threshold on probability errors.", gt=0)
    z_loss: float = doc(0.0, "Add this times the mean squared log-partition log(sum(exp(logits)))^2 (PaLM's z-loss; 1e-4 there): keeps logits from drifting to large values, a source of loss spikes. 0 = off.", ge=0)


class RegularizationSpec(Section):
    weight_decay: float = doc(0.0, "The optimizer's weight decay (decoupled for adamw, coupled for the others).", ge=0)
    l1: float = doc(0.0, "L1 penalty coefficient added to the loss: l1 * sum|w|.", ge=0)
    l2: float = doc(0.0, "L2 penalty coefficient added to the loss: l2/2 * sum w^2.", ge=0)
    exclude_norm_and_bias: bool = doc(True, "Exempt norm-layer parameters and biases from weight decay and penalties.")


class ScalingSpec(Section):
    num_workers: Union[int, list[int]] = doc(2, "Data-parallel worker processes (one per GPU with use_gpu); [min, max]: elastic, Ray Train starts with what the cluster can give (at least min) and grows toward max as nodes join (a resize restarts the workers from the last checkpoint). 1 on the embedded local Ray (CPU, run.max_failures 0): Keel trains in its own process (Ray Train's local mode), no worker group to start.")
    use_gpu: bool = doc(False, "Train on GPUs with nccl; otherwise CPUs with gloo.")
    cpus_per_worker: Optional[float] = doc(None, "CPUs reserved per worker. Default 1, shared out on a smaller machine or cluster so that one CPU always stays free for Ray Data's tasks; an explicit value that leaves less is refused (locally at once, on a cluster after scaling.resource_wait_s).", gt=0)
    amp: Literal["none", "bf16", "fp16"] = doc("none", "Mixed precision (fp16 uses a GradScaler; clipping happens after unscale).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc("PACK", "How Ray places the workers on nodes: PACK (fewest nodes, Ray's default), SPREAD (across nodes where possible), STRICT_SPREAD (one worker per node), STRICT_PACK (one node).")
    address: Optional[str] = doc(None, "Ray cluster address ('auto' inside a cluster); empty = start an embedded local Ray.")
    collective_timeout_s: int = doc(300, "gloo/nccl timeout: a dead peer fails the run after this many seconds, not 30 minutes.", ge=10)
    resize_check_s: float = doc(60.0, "Elastic runs: how often Ray Train looks for room to grow the worker group (Ray's elastic_resize_monitor_interval_s).", gt=0)
    find_unused_parameters: Union[Literal["auto"], bool] = doc("auto", "DDP's search, every step, for parameters that got no gradient (without it, a model with one fails at its second step). auto: on when a custom model's forward and backward on two samples leave a parameter without gradient (named in a warning at the start); true: also for parameters used on some batches only; false: never.")
    resource_wait_s: float = doc(120.0, "How long to wait for the cluster to offer the workers' CPUs/GPUs (Keel asks the autoscaler for them) before failing with a clear message.", ge=0)


    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, n):
        if isinstance(n, list) and (len(n) != 2 or not 1 <= n[0] <= n[1]):
            raise ValueError(f"{n}; give a count, or [min, max] with 1 <= min <= max")
        if isinstance(n, int) and n < 1:
            raise ValueError(f"{n}; at least 1")
        return n

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class InitFromSpec(Section):
    checkpoint: Optional[str] = doc(None, "Fine-tune: a Keel checkpoint directory (local, or s3://...) whose weights start this run. A run with checkpoints of its own resumes from those instead.")
    reset_head: Literal["auto", "yes", "no"] = doc("auto", "Re-initialise the final classifier: auto = when its shape differs from the checkpoint's (data.num_classes changed).")
    freeze: list[str] = doc([], "Parameter name prefixes to freeze, e.g. ['stem.', 'blocks.0.']; one that names no parameter is refused, listing the model's top-level names.")
    lr_multipliers: dict[str, float] = doc({}, "Parameter name prefix -> LR multiplier, e.g. {'blocks.': 0.1} (the longest matching prefix wins; others 1).")
    preprocess: Literal["keep", "refit"] = doc("keep", "Standardisation and imputation statistics: the checkpoint's (keep: the network sees inputs scaled as it learned them) or fitted on the new training data (refit).")

    @field_validator("freeze", "lr_multipliers", mode="before")
    @classmethod
    def _prefixes_are_names(cls, value):
        """Keel's MLP and CNN name their layers by position ('1.weight'): YAML reads an unquoted prefix 1. as
        the number 1.0, which then names nothing. Say so, instead of pydantic's 'not a valid string'."""
        for item in (value if isinstance(value, (list, dict)) else []):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                raise ValueError(f"{item!r} is a number, not a name prefix: YAML reads an unquoted 1. as 1.0; "
                                 f"quote it, e.g. '1.'")
        return value

    @field_validator("lr_multipliers")
    @classmethod
    def _positive(cls, value):
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"{bad}: multipliers must be > 0 (freeze a prefix instead of a 0 multiplier)")
        return value


class RunSpec(Section):
    name: str = doc(..., "Run name; re-running the same name resumes from its last checkpoint.", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = doc("runs", "Directory (or cloud URI) holding run directories.")
    epochs: int = doc(10, "Epochs to train (in total, counting epochs done before a resume).", ge=1)
    checkpoint_every: int = doc(1, "Write a checkpoint every this many epochs (and always at the end).", ge=1)
    keep_checkpoints: int = doc(2, "Checkpoints to keep on disk (oldest are deleted).", ge=1)
    max_failures: int = doc(0, "Worker-group failures Ray Train may recover from by restarting from the last checkpoint.", ge=-1)
    seed: int = doc(0, "Seed for model init, shuffling and dropout.")
    log_every: int = doc(10, "Send a live progress update every this many steps.", ge=1)


class FaultSpec(Section):
    kind: Literal["nan_batch", "huge_batch", "lr_spike", "scale_weights", "hang", "invert_inputs"] = doc(
        ..., "nan_batch / huge_batch: poison one rank's inputs; lr_spike: multiply the LR; scale_weights: multiply a layer's weights; hang: one rank stops responding; invert_inputs: every rank's training and validation inputs are negated (a sustained distribution shift: give a large repeat).")
    at_step: int = doc(..., "Global optimizer step at which to inject (0-based).", ge=0)
    repeat: int = doc(1, "Inject at this many consecutive steps from at_step.", ge=1)
    rank: int = doc(0, "Rank whose batch is poisoned (batch faults; the others act on every rank).", ge=0)
    factor: float = doc(100.0, "huge_batch / lr_spike / scale_weights: the multiplier.", gt=0)
    layer: str = doc("", "scale_weights: parameter-name prefix of the layer, e.g. blocks.0.conv1, or * for every parameter.")


class JobSpec(Section):
    model: ModelSpec = doc(ModelSpec(), "The network.")
    data: DataSpec = doc(..., "Where the data is and what it looks like.")
    optimizer: OptimizerSpec = doc(OptimizerSpec(), "Optimizer and learning rate.")
    schedule: ScheduleSpec = doc(ScheduleSpec(), "Learning-rate warmup and schedule.")
    regularization: RegularizationSpec = doc(RegularizationSpec(), "Weight decay and L1/L2 penalties.")
    loss: LossSpec = doc(LossSpec(), "Training loss (validation always reports plain cross-entropy).")
    stability: StabilitySpec = doc(StabilitySpec(), "Safeguards that keep training stable.")
    scaling: ScalingSpec = doc(ScalingSpec(), "Workers, devices and the Ray cluster.")
    run: RunSpec = doc(..., "Name, storage, length, checkpoints and seed.")
    init_from: InitFromSpec = doc(InitFromSpec(), "Fine-tuning: start from another run's checkpoint (weights only), with optional frozen layers and per-layer LR multipliers.")
    faults: list[FaultSpec] = doc([], "Faults to inject on purpose (tests and demos).")

    @model_validator(mode="after")
    def _combinations(self) -> "JobSpec":
        init = self.init_from
        if not init.checkpoint and (init.freeze or init.lr_multipliers):
            raise ValueError(f"init_from.{'freeze' if init.freeze else 'lr_multipliers'}: only used with init_from.checkpoint")
        if self.scaling.amp == "fp16" and not self.scaling.use_gpu:
            raise ValueError("scaling.amp: fp16 needs scaling.use_gpu: true (use bf16 or none on CPU)")
        if self.model.kind == "custom" and not self.model.factory:
            raise ValueError("model.factory: model.kind custom needs 'package.module:function'")
        if self.model.kind != "custom" and (self.model.factory or self.model.args):
            raise ValueError(f"model.{'factory' if self.model.factory else 'args'}: only used with model.kind: custom "
                             f"(model.kind is {self.model.kind})")
        if self.model.kind in ("cnn", "resnet") and len(self.data.shape) != 3:
            raise ValueError(f"data.shape: model.kind {self.model.kind} needs [channels, height, width], got {self.data.shape}")
        if self.model.kind in ("lstm", "transformer") and len(self.data.shape) != 2:
            raise ValueError(f"data.shape: model.kind {self.model.kind} needs [time, features], got {self.data.shape}")
        if self.model.kind == "transformer" and self.model.width % self.model.heads:
            raise ValueError(f"model.heads: model.width {self.model.width} does not divide into {self.model.heads} heads")
        if self.model.kind == "gcn" and (len(self.data.shape) != 2 or self.data.shape[1] <= self.data.shape[0]):
            raise ValueError(f"data.shape: model.kind gcn needs [nodes, nodes + node_features], got {self.data.shape}")
        aug = self.data.augment
        image_only = {"random_crop_padding": aug.random_crop_padding, "hflip": aug.hflip, "cutout": aug.cutout,
                      "cutmix_alpha": aug.cutmix_alpha}
        for name, value in image_only.items():
            if value and len(self.data.shape) != 3:
                raise ValueError(f"data.augment.{name}: needs image data (data.shape [C, H, W]), got {self.data.shape}")
        if self.data.preprocess.standardize == "auto":  # resolved here: the plan, checkpoints and config.yaml see it
            tabular = len(self.data.shape) == 1 and self.model.kind == "mlp"  # a custom model gets its inputs as they are
            self.data.preprocess.standardize = "per_feature" if tabular else "none"
        if self.schedule.warmup_epochs == "auto":  # resolved here, so every reader (and config.yaml) sees a number
            self.schedule.warmup_epochs = auto_warmup_epochs(self.model.kind, self.schedule.kind, self.run.epochs)
        asked = "action" in self.stability.collapse.model_fields_set  # the default is simply not applied
        if asked and self.stability.collapse.action == "rollback" and self.loss.kind != "cross_entropy":
            raise ValueError(f"stability.collapse.action: rollback needs loss.kind cross_entropy (got {self.loss.kind}: "
                             "no chance level to compare with)")
        if self.schedule.kind == "one_cycle" and self.schedule.warmup > 0:
            raise ValueError("schedule.warmup_epochs: one_cycle has its own warmup; set it to 0")
        for i, fault in enumerate(self.faults):
            if fault.kind == "scale_weights" and not fault.layer:
                raise ValueError(f"faults.{i}.layer: scale_weights needs a parameter-name prefix")
            if fault.rank >= self.scaling.min_workers:
                raise ValueError(f"faults.{i}.rank: {fault.rank} but scaling.num_workers is {self.scaling.num_workers}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def keys_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys a section takes at `path` inside `model` (list indices and dict keys passed through)."""
    import typing

    for part in path:
        field_info = model.model_fields.get(part) if isinstance(part, str) else None
        if field_info is None:
            continue  # an index into a list, or a key of a dict of sections
        candidates = [field_info.annotation, *typing.get_args(field_info.annotation)]
        inner = [t for c in candidates for t in (c, *typing.get_args(c)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def first_error(source: str, exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's first error as one line: `source: field.path: what was expected (got value)`; an unknown key
    names the closest known one."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(str(err["loc"][-1]), keys_at(model, err["loc"][:-1]) if model else [], n=1)
        msg = "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    elif err["type"] not in ("missing", "value_error") and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    others = list(dict.fromkeys(".".join(str(part) for part in e["loc"]) or "(top level)" for e in exc.errors()[1:]))
    more = f" (+{len(exc.errors()) - 1} more: {', '.join(others[:4])}{', ...' if len(others) > 4 else ''})" if others else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_spec(tree: dict, source: str = "spec", model: type[BaseModel] = JobSpec) -> Any:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise BadInput(first_error(source, exc, model)) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a job YAML, apply overrides, validate. Raises BadInput with one line."""
    tree = apply_overrides(read_yaml(path), list(overrides))
    return parse_spec(tree, str(path))
