"""The structured-config schema. Hydra composes conf/ on top of it, so a value of the wrong type
(`trainer.max_epochs=abc`, `optimizer.lr=fast`) is rejected when the config is composed, before anything runs.

Groups whose options take different keys (data, head, logger) carry their own schema, registered
below and named in each option's defaults list (`defaults: [digits_schema]`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class BackboneConfig:
    name: str = "test_resnet"  # any timm model name (a tag such as resnet18.a1_in1k selects hub weights)
    # false: random init | true: the timm hub tag | "source": thawlab's own pretraining on the data's
    # source task (cached) | a path to a local weights file (.safetensors, .pth, .bin)
    pretrained: Any = "source"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    coarse_groups: bool = True  # timm group_matcher(coarse=...): stages rather than single blocks


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32-true"
    deterministic: bool = False
    # int: that many batches; float: that fraction of the batches (Lightning's semantics)
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 5
    enable_progress_bar: bool = True
    gradient_clip_val: Optional[float] = None


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # base lr of every group; phases scale it per group
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # lr shape within each phase: cosine | constant
    warmup_epochs: float = 0.0  # linear warm-up at the start of each phase


@dataclass
class ScheduleConfig:
    """One schema for every strategy: a strategy reads the keys it needs (see schedules.py)."""

    name: str = MISSING  # frozen | gradual | full | lp_ft
    probe_lr_mult: float = 10.0  # lr multiplier of the head while it trains alone (a linear probe)
    bn: str = "train"  # BatchNorm policy of trainable groups: train | eval | frozen (frozen groups: eval)
    lp_epochs: Optional[int] = None  # lp_ft: epochs of the probing phase (default: half the run)
    interval: int = 1  # gradual: epochs between two unfreezings
    factor: float = 2.6  # gradual: lr of each group below = lr of the one above / factor (ULMFiT)


@dataclass
class PretrainConfig:
    """Recipe of thawlab's own pretraining on a data set's source task (backbone.pretrained=source)."""

    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    _target_: str = MISSING
    batch_size: int = 32
    eval_batch_size: int = 256
    num_workers: int = 0


@dataclass
class DigitsSourceConfig:
    _target_: str = "thawlab.data.digits.DigitsSource"
    renders: int = 30  # images per class and font (34 classes x 21 fonts)
    test_renders: int = 4
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0


@dataclass
class DigitsConfig(DataConfig):
    _target_: str = "thawlab.data.digits.DigitsTarget"
    train_per_class: int = 10
    val_per_class: int = 18
    test_per_class: int = 36
    split_seed: int = 0
    ood: list[str] = field(default_factory=lambda: ["printed", "corrupt"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    img_size: int = 32
    source: DigitsSourceConfig = field(default_factory=DigitsSourceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class HeadConfig:
    _target_: str = MISSING
    dropout: float = 0.0


@dataclass
class MLPHeadConfig(HeadConfig):
    hidden_dim: int = 256


@dataclass
class CosineHeadConfig(HeadConfig):
    scale: float = 16.0  # logits = scale * cos(feature, class weight)


@dataclass
class LoggerConfig:
    _target_: str = MISSING
    project: str = "thawlab"


@dataclass
class TrainConfig:
    seed: int = 0
    task: str = "finetune"  # finetune | pretrain (experiment=pretrain_source)
    ckpt_path: Optional[str] = None  # resume: a checkpoint path, or "last"
    cache_dir: str = "${oc.env:THAWLAB_CACHE,${oc.env:HOME}/.cache/thawlab}"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    head: Any = MISSING
    data: Any = MISSING
    logger: Any = None
    debug: Any = None
    experiment: Any = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="thawlab_schema", node=TrainConfig)
    cs.store(group="data", name="digits_schema", node=DigitsConfig)
    cs.store(group="head", name="head_schema", node=HeadConfig)
    cs.store(group="head", name="mlp_schema", node=MLPHeadConfig)
    cs.store(group="head", name="cosine_schema", node=CosineHeadConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
