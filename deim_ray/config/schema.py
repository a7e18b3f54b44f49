"""config layer: the typed, frozen configuration tree.

Every section is a small frozen dataclass with its defaults and a comment per field.
`deim_ray.config.loader` turns YAML (with `__include__` and `-u` overrides) into one `Config`;
nothing else in the project reads YAML. Schedule values (epoch gates, stop_epoch, LR phases)
live here, never in a collate function.

Epochs are 0-based. Stage 1 is `[0, stop_epoch)`, stage 2 is `[stop_epoch, epochs)`. Epoch
ranges written as `[a, b]` mean `a <= epoch < b` (inclusive lower, exclusive upper), as upstream.

The linked schedule values (stop_epoch, lr_scheduler.flat_epoch/no_aug_epoch, augment.policy_epoch,
mixup_epochs, copyblend_epochs, schedule.matcher_change_epoch) are derived from `schedule.epochs` by
upstream's rule when a config leaves them out or writes `auto` (`config.schedule.derive_schedule`); the
defaults below only apply to a Config built in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    family: str = "deimv2"
    """Detector family: deimv2, dfine (D-FINE) or rtdetrv2 (RT-DETRv2), each trained with the DEIM recipe."""
    variant: str = "atto"
    """Size within the family: one of `config.variants.FAMILY_VARIANTS[family]` (e.g. deimv2: atto ... x and
    hgnetv2_s ... hgnetv2_x; dfine: n ... x; rtdetrv2: r18 ... r101)."""
    num_queries: int | None = None
    """Override the variant's number of decoder queries (None keeps the variant's)."""
    decoder_layers: int | None = None
    """Override the variant's decoder depth."""
    num_denoising: int | None = None
    """Override the number of contrastive denoising queries (0 disables denoising)."""
    focal_loss_gamma: float = 1.5
    """MAL gamma; upstream DEIMCriterion uses 1.5 (transformers' default is 2.0)."""
    prior_prob: float = 0.01
    """Initial class prior of the score heads (upstream 0.01; transformers' default 1/(C+1) learns slower)."""
    losses: tuple[str, ...] | None = None
    """dfine/rtdetrv2 loss terms as upstream's DEIMCriterion `losses`: mal or vfl, boxes, and (dfine) local.
    None keeps the DEIM recipe (mal, boxes[, local]); the plain D-FINE / RT-DETRv2 baselines use vfl."""
    pretrained: str | None = None
    """Weights to fine-tune from: a hub id, a local `from_pretrained` directory, or a `.pth` file.
    Tensors whose shape matches are loaded; the rest (e.g. class heads) are re-initialised and reported."""
    backbone_pretrained: str | None = None
    """Upstream's backbone-only ImageNet weights to start from: `PPHGNetV2_B0_stage1.pth` for the HGNetV2 sizes
    (Atto/Femto/Pico/N, loaded with upstream's partial rules). Loaded before `pretrained`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the family's transformers config (`Deimv2Config`, `DFineConfig`,
    `RTDetrV2Config`), applied last; dfine/rtdetrv2 also take upstream's `mlp_act` (relu, silu) and rtdetrv2
    `query_pos_method` (default, as_reg)."""


DATA_FORMATS = ("coco", "yolo", "voc")
"""Annotation formats a split can be read in (`SplitConfig.format`)."""


@dataclass(frozen=True)
class SplitConfig:
    img_folder: str = ""
    """Folder of images; a relative path resolves against the working directory (as upstream). yolo: the
    `images/<split>` folder (labels are found in `labels/<split>`); voc: `JPEGImages`."""
    ann_file: str = ""
    """coco: the COCO-format annotation JSON; yolo: the dataset's `data.yaml` (its `names`); voc: the split's
    `ImageSets/Main/<split>.txt` (image ids, one per line; the XMLs are in the sibling `Annotations/`)."""
    format: str = "coco"
    """How the split is annotated: coco, yolo or voc (`deim_ray.data.layouts` detects it from a folder)."""


@dataclass(frozen=True)
class SyntheticConfig:
    """When present, `data.train`/`data.val` are generated (seeded shapes) if they do not exist yet."""

    num_train: int = 256
    num_val: int = 64
    image_size: int = 256
    """Side of the generated square images, in pixels."""
    num_classes: int = 3
    max_objects: int = 4
    seed: int = 0
    first_class: int = 0
    """Classes first_class .. first_class + num_classes - 1: another first class gives other shapes and colours
    (a second dataset to fine-tune on)."""


@dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig | None = None
    image_size: tuple[int, int] = (640, 640)
    """[height, width] for the training resize, stage 2 and evaluation (upstream eval_spatial_size).
    Both must be multiples of 32."""
    total_batch_size: int = 32
    """Training batch over all workers; must divide by the number of workers."""
    val_batch_size: int = 64
    """Evaluation batch over all workers."""
    num_workers: int = 2
    """DataLoader worker processes per training worker (rank)."""
    normalize: bool = False
    """Apply ImageNet mean/std after scaling to [0,1] (upstream does this for DINOv3 variants)."""


@dataclass(frozen=True)
class MosaicConfig:
    output_size: int = 320
    """Each of the four tiles is resized to this shorter side before pasting."""
    rotation_range: float = 10.0
    translation_range: tuple[float, float] = (0.1, 0.1)
    scaling_range: tuple[float, float] = (0.5, 1.5)
    use_cache: bool = True
    """Draw the three partner images from a per-loader-worker cache (DEIMv2) instead of the dataset (DEIM)."""
    max_cached_images: int = 50
    random_pop: bool = True
    """When the cache is full, evict a random entry (never the newest) instead of the oldest."""


@dataclass(frozen=True)
class CopyBlendConfig:
    area_threshold: float = 100.0
    """Objects with a smaller pixel area are not copied."""
    num_objects: int = 3
    with_expand: bool = True
    expand_ratios: tuple[float, float] = (0.1, 0.25)


@dataclass(frozen=True)
class AugmentConfig:
    policy_epoch: tuple[int, ...] = (4, 78, 148)
    """Three epochs [e0, e1, e2]: policy ops off before e0; Mosaic (with mosaic_prob) or ZoomOut/IoUCrop in
    [e0, e1); no Mosaic in [e1, e2); all policy ops off from e2. A single epoch E: policy ops run while epoch < E."""
    policy_ops: tuple[str, ...] = ("Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")
    """Ops gated by policy_epoch; other ops always run in stage 1."""
    mosaic_prob: float = 0.5
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    photometric_p: float = 0.5
    zoom_out_p: float = 0.5
    zoom_out_side_range: tuple[float, float] = (1.0, 4.0)
    iou_crop_p: float = 0.8
    flip_p: float = 0.5
    sanitize_min_size: float = 1.0
    """Train boxes with a width or height under this many pixels are dropped (upstream SanitizeBoundingBoxes
    min_size: 12 / 10 / 8 for Atto / Femto / Pico, 1 for the other sizes)."""
    mixup_prob: float = 0.5
    mixup_epochs: tuple[int, int] = (4, 78)
    copyblend_prob: float = 0.5
    copyblend_epochs: tuple[int, int] = (4, 148)
    """CopyBlend runs on a batch only when MixUp was not applied to it."""
    copyblend: CopyBlendConfig = field(default_factory=CopyBlendConfig)
    base_size: int | None = None
    """Multi-scale centre size (defaults to data.image_size[0])."""
    base_size_repeat: int | None = None
    """Multi-scale while epoch < stop_epoch; None disables multi-scale (upstream DEIMv2 N default)."""


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 160
    """Total epochs (upstream spelling `epoches` is accepted)."""
    stop_epoch: int = 148
    """First stage-2 epoch: strong augmentation ends, stage 2 restarts from best_stg1. Derived when absent or
    `auto`: epochs - lr_scheduler.no_aug_epoch if given, else epochs - min(no_aug_epochs, epochs // 2)."""
    no_aug_epochs: int = 12
    """Stage-2 length the schedule rule aims for (upstream's no_aug_epoch, "4n" in its README); the rule
    keeps stage 2 at most half the run. Unused when stop_epoch or lr_scheduler.no_aug_epoch is given."""
    ema_restart_decay: float = 0.9999
    """EMA decay used from stop_epoch on (takes effect, unlike upstream)."""
    stage2_restart: bool = True
    """In stage 2, an epoch that does not beat the best so far restarts from best_stg1 (upstream behaviour)."""
    matcher_change_epoch: int | None = None
    """From this epoch on the Hungarian matcher's cost is -(score * IoU^iou_order_alpha) (upstream DEIM);
    null (the default) keeps the plain matcher, `auto` switches at 90% of stop_epoch."""
    iou_order_alpha: float = 4.0
    """Exponent of the IoU-order matcher cost used from matcher_change_epoch."""
    fit_to_data: bool = False
    """Lower the batch, the LR warm-up and the EMA decays / warm-up to what the dataset's length allows
    (`config/fit.py`; the configured values are upper bounds, so COCO keeps upstream's). `train --data` sets it."""


@dataclass(frozen=True)
class LRSchedulerConfig:
    type: str = "flatcosine"
    """flatcosine (per-iteration warmup, flat, cosine, flat tail) or constant (warmup then flat)."""
    warmup_iter: int = 2000
    flat_epoch: int = 78
    no_aug_epoch: int = 12
    lr_gamma: float = 1.0
    """Minimum LR as a fraction of each group's base LR."""
    tail_lr_factor: float | None = None
    """flatcosine only: the LR of the flat tail (stage 2) as a fraction of each group's base LR; null keeps
    lr_gamma. Unlike lr_gamma it leaves the stage-1 curve alone, so stage-2 branches can search it."""


@dataclass(frozen=True)
class ParamGroupConfig:
    params: str = ""
    """Regex searched (`re.search`) in the transformers parameter names (`model.conv_encoder.*` is the backbone,
    `model.conv_encoder.backbone.*` the DINOv3 ViT); each trainable parameter must match at most one group."""
    lr: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "AdamW"
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    params: tuple[ParamGroupConfig, ...] = ()


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmups: int = 1000
    """Effective decay = decay * (1 - exp(-updates / warmups)); 0 means constant decay."""
    start: int = 0
    """Skip this many updates before the EMA starts following the model."""


TRACKERS = ("tensorboard", "mlflow", "wandb")
"""The experiment trackers `train.trackers` may name (the driver's `trackers.py` implements each)."""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    clip_max_norm: float = 0.1
    use_amp: bool = True
    """Mixed precision on GPU (ignored on CPU). YAML decides; there is no CLI flag overriding it."""
    amp_dtype: str = "float16"
    """float16 with a GradScaler (upstream's `--use-amp`) or bfloat16 (no GradScaler). Either way only the model's
    forward runs under autocast: the loss is computed in float32, and evaluation always runs in float32."""
    sync_bn: bool = True
    """Under DDP on GPUs, BatchNorm layers synchronise their batch statistics over all ranks (upstream's
    `sync_bn: True`). Ignored in single-process runs; CPU (gloo) runs skip it with one log line."""
    keep_checkpoints: int = 2
    """Ray checkpoints kept per stage (the latest is always kept too)."""
    print_freq: int = 10
    """Log a progress line every this many iterations."""
    trackers: tuple[str, ...] = ("tensorboard",)
    """Where rank 0 logs every epoch (TRACKERS): tensorboard (event files under the run directory's `tb/`),
    mlflow (params, metrics, plots and the final artifact's URI in an MLflow run), wandb (the same in a
    Weights & Biases run; `WANDB_MODE=offline` works without a network). `[]` logs nowhere but metrics.jsonl."""
    tensorboard: bool | None = None
    """Older spelling kept for existing configs: `false` drops tensorboard from `trackers`, `true` adds it."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server (or `file:`/`sqlite:` store); null uses MLFLOW_TRACKING_URI, as MLflow does."""
    mlflow_experiment: str = "deim_ray"
    """MLflow experiment the runs are logged under (created when missing)."""
    wandb_project: str = "deim_ray"
    """Weights & Biases project the runs are logged under (the entity comes from WANDB_ENTITY / your login)."""

    @property
    def active_trackers(self) -> tuple[str, ...]:
        """`trackers` with the older `tensorboard: true|false` applied (each name once, in order)."""
        names = [t for t in self.trackers if t != "tensorboard" or self.tensorboard is not False]
        if self.tensorboard and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        return tuple(dict.fromkeys(names))
    nan_tolerance: int = 20
    """Steps with a non-finite loss or gradient (skipped on every rank) an epoch may have before the stage rolls
    back to its last good state (the last completed epoch, or the stage start)."""
    nan_retries: int = 3
    """Rollbacks per stage run before it fails with a one-line reason."""
    nan_lr_factor: float = 1.0
    """Each rollback multiplies the LR by this (1.0 keeps it)."""
    nan_amp_off: bool = False
    """A rollback also turns mixed precision off for the rest of the stage run."""


@dataclass(frozen=True)
class EvalConfig:
    num_top_queries: int = 300
    """Detections kept per image (top-k over queries x classes)."""


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    """S3-compatible endpoint override (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile)."""
    region: str | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    stage2_search: dict[str, Any] = field(default_factory=dict)
    """What the stage-2 branches of `--stage2-branches K` vary: dotted stage-2 keys mapped to one distribution
    each, as in a Tune space file (`driver/stage2_branches.py` checks it); empty uses the default space."""
    source: str = ""
    """Path of the YAML file this config was loaded from (set by the loader)."""
