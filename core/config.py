"""The typed schema of a whole run, and `load_config` (YAML + dotlist merged onto it).

Every field carries a one-line comment with its unit. Per-field checks live in each
section's `__post_init__` (OmegaConf runs them in `to_object`); checks that need several
sections or the world size run once in `validate`. Every failure raises `ConfigError`
whose message is one line naming the key to change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import first_line

BACKENDS = ("dali", "torch")
# The encoder registry's names (model/encoders.py registers exactly these; a test checks it), kept
# here so that a wrong `model.encoder` fails when the config loads, before anything is built.
ENCODERS = ("resnet50", "resnet18", "resnet18_small", "resnet18_small_w32", "resnet18_small_w16")
INTERPOLATIONS = ("bilinear", "bicubic")  # eval-mode resize filters
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
SEARCHES = ("auto", "faiss-gpu", "torch", "faiss-cpu")  # k-means nearest-centroid search backends
FEATURE_PRECISIONS = ("fp32", "bf16")  # forward precision of the clustering feature pass


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    shards: str = ""  # folder with the shards and _info.json (built by hcsc-shards)
    train_split: str = "train"  # split of `shards` to train and cluster on
    val_split: str = "val"  # held-out split for the kNN monitor; "" disables the monitor
    backend: str = "dali"  # dali | torch (webdataset + torchvision reference loader)
    image_size: int = 224  # px, side of the query and key crops
    min_scale: float = 0.2  # RandomResizedCrop lower area fraction of the 2 global views
    max_scale: float = 1.0  # RandomResizedCrop upper area fraction of the 2 global views
    multi_crop: bool = False  # add the local views (6 views in all, method.md §5.3)
    local_crop_sizes: list[int] = field(default_factory=lambda: [192, 160, 128, 96])  # px
    eval_resize: int = 256  # px, shorter side before the center crop in eval mode
    # eval-mode resize filter: bilinear (method.md §2.2, the clustering features) | bicubic
    # (method.md §7.1: the
    # kNN and clustering evaluations; `hcsc-eval knn|cluster|report` default to it)
    eval_interpolation: str = "bilinear"
    batch_size: int = 32  # images per rank per step
    eval_batch_size: int = 160  # images per rank per step in eval mode (5 x batch, as the reference)
    workers: int = 4  # DALI threads / DataLoader workers per rank
    blur: bool = True  # Gaussian blur p=0.5 (MoCo v2 aug+); off only for ablations
    # DALI train views: false = the official recipe as torchvision/PIL computes it (method.md §5.3);
    # true = the cheaper approximation (fixed jitter order, linear YIQ hue, one rounding, Gaussian blur
    # cut at 2 sigma on the normalised image), a documented deviation kept for benchmarking
    fast_augment: bool = False

    @property
    def num_views(self) -> int:
        return 2 + (len(self.local_crop_sizes) if self.multi_crop else 0)

    def __post_init__(self) -> None:
        _require(self.backend in BACKENDS, "data.backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        _require(self.image_size >= 8, "data.image_size", f"must be >= 8 px, got {self.image_size}")
        _require(0 < self.min_scale <= self.max_scale <= 1, "data.min_scale",
                 f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        _require(all(s >= 8 for s in self.local_crop_sizes), "data.local_crop_sizes",
                 f"every size must be >= 8 px, got {self.local_crop_sizes}")
        _require(self.eval_resize >= self.image_size, "data.eval_resize",
                 f"must be >= data.image_size ({self.image_size}), got {self.eval_resize}")
        _require(self.eval_interpolation in INTERPOLATIONS, "data.eval_interpolation",
                 f"must be one of {INTERPOLATIONS}, got {self.eval_interpolation!r}")
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        _require(self.workers >= 1, "data.workers", f"must be >= 1, got {self.workers}")


@dataclass
class ModelConfig:
    encoder: str = "resnet50"  # one of ENCODERS (model/encoders.py's registry)
    dim: int = 128  # embedding dimension of the projection head output
    queue_size: int = 16384  # K, negatives in the MoCo queue
    momentum: float = 0.999  # m of the momentum encoder EMA (fixed, no schedule)
    temperature: float = 0.2  # T of the instance logits and the mean prototype concentration
    mlp: bool = True  # MoCo v2 projection head (Linear-ReLU-Linear); False = one Linear
    shuffle_bn: bool = True  # shuffle the key batch across ranks before the key forward

    def __post_init__(self) -> None:
        _require(self.encoder in ENCODERS, "model.encoder", f"unknown encoder {self.encoder!r}; "
                 f"choose one of {', '.join(ENCODERS)}")
        _require(self.dim >= 1, "model.dim", f"must be >= 1, got {self.dim}")
        _require(self.queue_size >= 1, "model.queue_size", f"must be >= 1, got {self.queue_size}")
        _require(0 <= self.momentum < 1, "model.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.temperature > 0, "model.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class HCSCConfig:
    num_clusters: list[int] = field(default_factory=lambda: [3000, 2000, 1000])  # fine -> coarse
    warmup_epochs: int = 20  # epochs of plain MoCo v2 before clustering starts (method.md §2.1)
    instance_selection: bool = True  # ICSC, method.md §3
    proto_selection: bool = True  # PCSC, method.md §4
    selection_on_local: bool = False  # reuse the global instance masks for local views (method.md §5.1)
    # Deviation flags: False reproduces the official code (method.md §3, 4, 9).
    remove_dropped_negatives: bool = False  # True: dropped negatives are -inf, not logit 0
    fix_last_prototype: bool = False  # True: the last prototype id can be a negative (PCL #20)
    average_instance_loss: bool = False  # True: instance loss averaged over levels, not summed
    enabled: bool = True  # False: plain MoCo v2 with the same code (no clustering, no prototype loss)

    def __post_init__(self) -> None:
        _require(len(self.num_clusters) >= 1, "hcsc.num_clusters", "needs at least one level")
        _require(all(k >= 2 for k in self.num_clusters), "hcsc.num_clusters",
                 f"every level needs >= 2 clusters, got {self.num_clusters}")
        _require(self.warmup_epochs >= 0, "hcsc.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")


@dataclass
class ClusterConfig:
    niter: int = 20  # Lloyd iterations per restart (faiss default used by HCSC)
    nredo: int = 5  # restarts; the lowest global objective wins
    max_points_per_centroid: int = 1000  # faiss subsampling cap (per centroid)
    min_points_per_centroid: int = 10  # faiss warns below this
    spherical: bool = False  # normalise centroids each iteration (official: Euclidean)
    warm_start: bool = False  # init from last epoch's centroids (beyond the reference)
    warm_start_niter: int = 5  # Lloyd iterations when warm-starting (nredo is then 1)
    prune: bool = True  # CPU: search only rows whose nearest centroid may have moved (same labels)
    # nearest-centroid search: auto = faiss-gpu for CUDA features where it works, else torch on the
    # features' GPU, else faiss-cpu for CPU features (docs/architecture.md#decisions)
    search: str = "auto"
    feature_precision: str = "fp32"  # fp32 (official) | bf16 autocast of the feature pass (CUDA only)
    feature_batch_size: int = 0  # images per rank per feature-pass step; 0 = 4 x data.eval_batch_size

    def __post_init__(self) -> None:
        _require(self.niter >= 1, "cluster.niter", f"must be >= 1, got {self.niter}")
        _require(self.nredo >= 1, "cluster.nredo", f"must be >= 1, got {self.nredo}")
        _require(self.max_points_per_centroid >= 1, "cluster.max_points_per_centroid", "must be >= 1")
        _require(self.warm_start_niter >= 1, "cluster.warm_start_niter", "must be >= 1")
        _require(self.search in SEARCHES, "cluster.search", f"must be one of {SEARCHES}, got {self.search!r}")
        _require(self.feature_precision in FEATURE_PRECISIONS, "cluster.feature_precision",
                 f"must be one of {FEATURE_PRECISIONS}, got {self.feature_precision!r}")
        _require(self.feature_batch_size >= 0, "cluster.feature_batch_size",
                 "must be >= 0 (0 = 4 x data.eval_batch_size)")


@dataclass
class OptimConfig:
    lr: float = 0.03  # base learning rate per 256 images of global batch
    scale_lr: bool = True  # lr = base lr x global batch / 256 (method.md §5.2)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # on every parameter, BN and biases included (method.md §5.2)
    schedule: str = "cosine"  # cosine (per epoch, to final_lr) | constant
    final_lr: float = 0.0  # lr at the end of the cosine schedule
    epochs: int = 200  # total training epochs
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping (official: none)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
        _require(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage, 0 or 1 (ResNet-50 gains nothing from more)
    precision: str = "fp32"  # fp32 | bf16 | fp16, via DeepSpeed torch_autocast only
    collective_timeout_s: int = 1800  # a dead rank makes the others exit after this long
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its convolution algorithms once per shape
    channels_last: bool = True  # CUDA: NHWC memory format for the encoders and batches (tensor cores)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1), "engine.zero_stage", f"must be 0 or 1, got {self.zero_stage}")
        _require(self.precision in PRECISIONS, "engine.precision", f"must be one of {PRECISIONS}")
        _require(self.collective_timeout_s >= 10, "engine.collective_timeout_s", "must be >= 10 s")


WANDB_MODES = ("online", "offline")


@dataclass
class WandbConfig:
    enabled: bool = False  # also send every metrics.jsonl record to Weights & Biases (pip extra "wandb")
    project: str = "hcsc"  # W&B project
    entity: str = ""  # W&B team or user; "" = the default of the logged-in account
    name: str = ""  # run name; "" = the run folder's name
    mode: str = "online"  # online | offline (written under the run folder, `wandb sync` later)

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, "run.wandb.mode",
                 f"must be one of {WANDB_MODES}, got {self.mode!r}")


@dataclass
class RunConfig:
    output_dir: str = "runs/hcsc"  # run directory: config, logs, metrics, checkpoints
    seed: int = 0  # seeds python, numpy, torch and the data pipeline
    checkpoint_every: int = 5  # epochs between checkpoints (also saved at the end and on signal)
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = "auto"  # auto (newest intact checkpoint, if any) | none | path to a checkpoint folder
    overwrite: bool = False  # start afresh in a used output_dir (its old files move to previous-<time>/)
    log_every: int = 10  # steps between metric lines
    max_steps_per_epoch: int = 0  # cap on train steps per epoch (debug); 0 = the full epoch
    wandb: WandbConfig = field(default_factory=WandbConfig)  # optional W&B logger

    def __post_init__(self) -> None:
        _require(self.checkpoint_every >= 1, "run.checkpoint_every", "must be >= 1")
        _require(self.keep_last >= 1, "run.keep_last", f"must be >= 1, got {self.keep_last}")
        _require(self.log_every >= 1, "run.log_every", "must be >= 1")
        _require(self.max_steps_per_epoch >= 0, "run.max_steps_per_epoch", "must be >= 0")


@dataclass
class EvalConfig:
    knn_every: int = 10  # epochs between kNN monitors; 0 = only at the end
    knn_k: int = 200  # neighbours in the weighted kNN vote
    knn_t: float = 0.07  # temperature of the kNN vote weights exp(s / T)

    def __post_init__(self) -> None:
        _require(self.knn_every >= 0, "eval.knn_every", "must be >= 0")
        _require(self.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {self.knn_k}")
        _require(self.knn_t > 0, "eval.knn_t", f"must be > 0, got {self.knn_t}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hcsc: HCSCConfig = field(default_factory=HCSCConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def global_batch(cfg: Config, world: int) -> int:
    return cfg.data.batch_size * world


def scaled_lr(cfg: Config, world: int) -> float:
    """The method.md §5.2 rule: base lr x global batch / 256 (when `optim.scale_lr`)."""
    scale = global_batch(cfg, world) / 256 if cfg.optim.scale_lr else 1.0
    return cfg.optim.lr * scale


def validate(cfg: Config, world: int) -> None:
    """Cross-field checks, run once after the merge; `world` is the number of ranks."""
    gb = global_batch(cfg, world)
    _require(cfg.model.queue_size % gb == 0, "model.queue_size",
             f"queue size {cfg.model.queue_size} is not divisible by the global batch {gb} "
             f"(data.batch_size {cfg.data.batch_size} x {world} ranks)")
    sizes = cfg.hcsc.num_clusters
    _require(all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), "hcsc.num_clusters",
             f"cluster sizes must be strictly decreasing (fine to coarse), got {sizes}")
    _require(not cfg.hcsc.enabled or cfg.hcsc.warmup_epochs < cfg.optim.epochs, "hcsc.warmup_epochs",
             f"warmup {cfg.hcsc.warmup_epochs} must be < optim.epochs {cfg.optim.epochs} "
             "(for plain MoCo v2 set hcsc.enabled=false)")


def _world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                *, world: int | None = None) -> Config:
    """Merge a YAML file and `key=value` overrides onto the schema, then validate.

    Args:
        path: YAML file (may be None: schema defaults only).
        overrides: dotlist entries such as ``optim.lr=0.06``.
        world: number of ranks for the cross-field checks; default ``$WORLD_SIZE`` or 1.

    Raises:
        ConfigError: one line naming the offending key.
    """
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--config: file {str(path)!r} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: expected key=value, e.g. optim.lr=0.06")
        # `key=` means the empty string (OmegaConf would read None), so `data.val_split=` works
        # without shell quoting
        overrides = [o + "''" if o.endswith("=") else o for o in overrides]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg = cast(Config, OmegaConf.to_object(merged))  # runs every __post_init__
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None
    validate(cfg, _world_from_env() if world is None else world)
    return cfg


def _describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = first_line(err)
    if type(err).__name__ == "ConfigKeyError":
        return f"{key}: unknown config key ({first}); see `hcsc-train --print-config` for valid keys"
    return f"{key}: {first}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
