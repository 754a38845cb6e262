"""The structured-config schema. Hydra composes conf/ on top of it, so a value of the wrong type
(`trainer.max_epochs=abc`, `optimizer.lr=fast`) is rejected when the config is composed, before anything runs.

Groups whose options take different keys (data, head, logger, schedule) carry their own schema, registered
below under schema/<group> and named first in each option's defaults list
(`defaults: [/schema/schedule/lp_ft@_here_, _self_]`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from thawlab.sweep import job_dir_name

# hydra.sweep.subdir: a sweep job's directory is named after its overrides. Registered on import, so a launcher's
# worker process that unpickles the task function can resolve it too.
OmegaConf.register_new_resolver("thawlab_jobdir", lambda overrides, num: job_dir_name(str(overrides), int(num)),
                                replace=True)


@dataclass
class BackboneConfig:
    name: str = "test_resnet"  # any timm model name (a tag such as resnet18.a1_in1k selects hub weights)
    # false: random init | true: the timm hub tag | "source": thawlab's own pretraining on the data's
    # source task (cached) | a path to a local weights file (.safetensors, .pth, .bin)
    pretrained: Any = "source"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    coarse_groups: bool = True  # timm group_matcher(coarse=...): stages rather than single blocks
    drop_path_rate: float = 0.0  # stochastic depth in [0, 1) through timm (active in trainable blocks only)


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # more than 1: DDP, one process per device (on a CPU: per process, gloo); see trainer=ddp
    num_nodes: int = 1  # SLURM multi-node: with hydra/launcher=submitit_slurm, one task per device on every node
    strategy: str = "auto"  # auto | ddp: multi-device jobs always run DDP, with ranks thawlab starts itself
    # auto: bf16-mixed on a GPU with bf16, 32-true on a CPU; or any Lightning precision (16-mixed, 32-true, ...)
    precision: str = "auto"
    channels_last: Any = "auto"  # NHWC weights and inputs: auto = on a GPU only
    compile: bool = False  # torch.compile the network (in place; the first steps compile, later ones are fast)
    deterministic: bool = False
    # int: that many batches; float: that fraction of the batches (Lightning's semantics)
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 5
    enable_progress_bar: bool = True
    gradient_clip_val: Optional[float] = None  # clip gradients to this norm (or value: gradient_clip_algorithm)
    gradient_clip_algorithm: str = "norm"  # norm (total 2-norm of the trainable gradients) | value


@dataclass
class DDPConfig:
    """Multi-process jobs (trainer.devices > 1): how a job with a failed rank ends."""

    timeout_s: int = 600  # collectives wait at most this long for a peer (NCCL hangs on a dead rank until then)
    grace_s: float = 30.0  # after a rank fails, its peers get this long to record the failure, then are killed
    fail_rank: Optional[int] = None  # testing the above: this rank raises in its first training step


@dataclass
class EarlyStoppingConfig:
    """Early stopping per phase: a phase whose ID validation metric has not improved by min_delta for
    `patience` epochs ends there and the next phase starts; when the last phase stops, the run ends."""

    patience: Optional[int] = None  # null: off
    min_delta: float = 0.0
    monitor: str = "val/id/acc"  # val/id/acc (higher is better) | val/id/nll | val/id/ece (lower is better)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # base lr of every group; phases scale it per group
    weight_decay: float = 0.0
    no_decay_exemptions: bool = True  # no weight decay on biases, norms and timm's no_weight_decay() names
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only (fastai's Adam: 0.9, 0.99)
    eps: float = 1e-8  # adamw only (fastai's Adam: 1e-5)
    # in (0, 1]: timm's layer-wise lr decay, per parameter: lr x layer_decay ** (timm layer ids between its layer
    # and the classifier's), layer ids from group_matcher(coarse=False) whatever backbone.coarse_groups says
    layer_decay: float = 1.0
    # lr shape within each phase: cosine | constant | step | stlr (ULMFiT) | one_cycle (fastai); a phase may set
    # its own
    schedule: str = "cosine"
    warmup_epochs: float = 0.0  # cosine, constant and step: linear warm-up at the start of each phase
    milestones: list[float] = field(default_factory=lambda: [0.5])  # step: fractions of the phase where lr drops
    gamma: float = 0.1  # step: lr x gamma at each milestone
    cut_frac: float = 0.1  # stlr: fraction of the phase's steps spent increasing the lr
    ratio: float = 32.0  # stlr: how much smaller the lowest lr is than the maximum
    pct_start: float = 0.25  # one_cycle: fraction of the phase's steps spent increasing the lr
    div: float = 25.0  # one_cycle: initial lr = max / div
    div_final: float = 1e5  # one_cycle: final lr = max / div_final
    # one_cycle: cycle Adam's beta1 (SGD's momentum) cosine from moms[0] to moms[1] over pct_start, back to
    # moms[2] (fastai: 0.95, 0.85, 0.95); null: keep betas[0] / momentum
    moms: Optional[list[float]] = None


@dataclass
class ScheduleConfig:
    """Keys every strategy has; each strategy's own schema adds its keys (conf/schedule/<name>.yaml)."""

    name: str = MISSING
    # BatchNorm policy of trainable groups (frozen groups: always eval): train | eval | frozen, or a mapping
    # {phase name: policy}, e.g. {lp: eval, ft: train}
    bn: Any = "train"
    probe_lr_mult: float = 10.0  # lr multiplier of the head while it trains alone (a linear probe)
    adapter: Optional[str] = None  # modules added to the backbone before training: null | lora | reft
    # model selection (thawlab/selection.py): best (max val/id/acc) | last (the last epoch), over the epochs of
    # select_phases (null: every phase, the whole run); lp_ft and wise_ft set their papers' rules
    select: str = "best"
    select_phases: Optional[list[str]] = None


@dataclass
class LPFTConfig(ScheduleConfig):
    lp_epochs: Optional[int] = None  # epochs of the probing phase (default: half the run)


@dataclass
class WiseFTConfig(LPFTConfig):
    # WiSE-FT: evaluate (1 - alpha) * theta_0 + alpha * theta_ft at each alpha after training
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])


@dataclass
class GradualConfig(ScheduleConfig):
    interval: int = 1  # epochs between two unfreezings
    factor: float = 2.6  # lr of each group below = lr of the one above / factor (ULMFiT)


@dataclass
class SurgicalConfig(ScheduleConfig):
    groups: list[int] = field(default_factory=lambda: [0])  # block groups that train: forward order, -1 = top
    train_head: bool = True  # false (with head.pretrained=true): the listed groups alone, as Lee et al.


@dataclass
class PartialConfig(ScheduleConfig):
    freeze_first: int = 1  # the first k block groups stay frozen


@dataclass
class FineTuneConfig(ScheduleConfig):
    freeze_epochs: int = 1  # epochs of the head alone
    lr_mult: float = 100.0  # then lrs spread from lr / lr_mult (stem) to lr (head), halved
    pct_start: float = 0.3  # one-cycle of the second phase
    div: float = 5.0
    # fastai: lr / lr_mult for the whole body, lr for the head (vision_learner's 2 groups for a timm model);
    # blocks: spread log-evenly over thawlab's block groups, lr / lr_mult (stem) to lr (head)
    spread: str = "fastai"


@dataclass
class LoRAConfig(ScheduleConfig):
    adapter: Optional[str] = "lora"
    rank: int = 8
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    target_modules: Any = None  # a list of module names, or one regex over them; null: defaults per family
    dropout: float = 0.0  # on the adapter's input


@dataclass
class ReFTConfig(ScheduleConfig):
    adapter: Optional[str] = "reft"
    # block groups whose outputs get an intervention: indices as schedule.groups of surgical (-1 = top). Two, as
    # one at the top alone composes with global pooling and a linear head into an affine map: a linear probe.
    layers: list[int] = field(default_factory=lambda: [-2, -1])
    rank: int = 4  # r: rows of R and W
    positions: Any = None  # ViT-like (B, N, D) outputs: null or "all" | "prefix" (class/register tokens) | [0, ...]


@dataclass
class RegularizationConfig:
    # L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 over the pretrained body + beta/2 ||w_head||^2
    l2sp_alpha: float = 0.0
    l2sp_beta: float = 0.0
    label_smoothing: float = 0.0  # in [0, 1): of the training loss only (evaluation NLL stays the plain NLL)
    # timm Mixup / CutMix of training batches: Beta(alpha, alpha) mixing weights, 0 = off (DeiT: 0.8 and 1.0);
    # both on: one or the other per batch, half the time each. Needs an even data.batch_size; no feature cache.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0  # probability that a training batch is mixed


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
    batch_size: int = 32  # per process: under DDP the global batch is batch_size x devices
    eval_batch_size: int = 256
    num_workers: int = 0
    pin_memory: Any = "auto"  # auto: on when training on a GPU
    persistent_workers: Any = "auto"  # auto: on a GPU with num_workers > 0
    # a source task to pretrain on (backbone.pretrained=source) and its recipe: data=digits has them; for the
    # others they stay empty, and debug=smoke's shrunken settings for them are ignored
    source: Any = None
    pretrain: Any = None


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
    shift: str = "none"  # none | invert | flip_labels: the target task itself shifted (surgical fine-tuning)
    augment: str = "none"  # training: none | crop_flip (no flip on digits) | resized_crop | randaug | augmix
    img_size: int = 32
    source: DigitsSourceConfig = field(default_factory=DigitsSourceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


DATA_ROOT = "${oc.env:THAWLAB_DATA,${oc.env:HOME}/data}"  # where the real data sets live by default


@dataclass
class CifarPaths:
    """Folders of each set: relative to data.root, or absolute."""

    cifar10: str = "cifar-10-batches-py"
    cifar10_1: str = "CIFAR-10.1"
    cifar10_c: str = "CIFAR-10-C"
    stl10: str = "stl10_binary"


@dataclass
class Cifar10Config(DataConfig):
    _target_: str = "thawlab.data.cifar.Cifar10"
    root: str = DATA_ROOT
    paths: CifarPaths = field(default_factory=CifarPaths)
    download: bool = False  # fetch missing files (torchvision's downloader) from their public URLs
    val_per_class: int = 500  # held out from the training batches for model selection
    train_per_class: Optional[int] = None  # at most this many training images per class (null: all)
    split_seed: int = 0
    ood: list[str] = field(default_factory=lambda: ["cifar10_1", "stl10", "cifar10_c"])
    corruptions: list[str] = field(default_factory=lambda: [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    augment: str = "crop_flip"  # none | crop_flip | resized_crop | randaug | augmix (thawlab.data.augment)
    crop_pct: float = 1.0  # evaluation: resize to img_size / crop_pct, centre-crop img_size
    img_size: int = 32


@dataclass
class Cifar10CConfig(DataConfig):
    """data=cifar10c: one CIFAR-10-C corruption at one severity as the target task (surgical fine-tuning)."""

    _target_: str = "thawlab.data.cifar.Cifar10C"
    root: str = DATA_ROOT
    paths: CifarPaths = field(default_factory=CifarPaths)
    download: bool = False
    corruption: str = "gaussian_noise"
    severity: int = 5
    train_per_class: int = 100  # Lee et al.: 100 labelled corrupted images per class
    val_per_class: int = 10
    test_per_class: Optional[int] = None  # null: every image left
    split_seed: int = 0
    ood: list[str] = field(default_factory=lambda: ["cifar10"])  # the clean CIFAR-10 test set, or []
    augment: str = "none"
    crop_pct: float = 1.0
    img_size: int = 32


@dataclass
class ImageNetPaths:
    """Folders of each set: relative to data.root, or absolute."""

    train: str = "train"
    val: str = "val"
    imagenet_v2: str = "imagenetv2-matched-frequency-format-val"
    imagenet_r: str = "imagenet-r"
    imagenet_sketch: str = "sketch"
    imagenet_a: str = "imagenet-a"


@dataclass
class ImageNetConfig(DataConfig):
    _target_: str = "thawlab.data.imagenet.ImageNet"
    root: str = DATA_ROOT + "/imagenet"
    paths: ImageNetPaths = field(default_factory=ImageNetPaths)
    val_per_class: int = 10
    train_per_class: Optional[int] = None
    split_seed: int = 0
    ood: list[str] = field(default_factory=lambda: ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a"])
    augment: str = "resized_crop"  # none | crop_flip | resized_crop | randaug | augmix (thawlab.data.augment)
    crop_pct: float = 0.875
    img_size: int = 224


@dataclass
class FolderPaths:
    train: str = "train"
    val: Optional[str] = "val"  # null: hold data.val_fraction out of train
    test: str = "test"


@dataclass
class ImageFolderConfig(DataConfig):
    _target_: str = "thawlab.data.folders.ImageFolders"
    root: Optional[str] = None  # required: the folder holding train/ (val/) test/
    paths: FolderPaths = field(default_factory=FolderPaths)
    ood: Any = None  # {name: folder}, or null: the test set ood/<name>
    val_fraction: float = 0.1  # without a val folder: this fraction of each class held out of train
    train_per_class: Optional[int] = None
    split_seed: int = 0
    augment: str = "resized_crop"  # none | crop_flip | resized_crop | randaug | augmix (thawlab.data.augment)
    crop_pct: float = 0.875
    img_size: int = 224


@dataclass
class HeadConfig:
    _target_: str = MISSING
    dropout: float = 0.0
    # linear head: start from the pretrained model's own classifier (a weights file with the same classes)
    pretrained: bool = False


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
    ddp: DDPConfig = field(default_factory=DDPConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    cache_features: bool = True  # frozen backbone + deterministic training data: compute features once
    export: bool = False  # write model.safetensors, a plain timm state dict (always with adapters: merged)
    schedule: Any = MISSING
    head: Any = MISSING
    data: Any = MISSING
    logger: Any = None
    debug: Any = None
    experiment: Any = None


SCHEMAS = {  # group -> option schema; each option names its schema first in its defaults list
    "data": {"digits": DigitsConfig, "cifar10": Cifar10Config, "cifar10c": Cifar10CConfig, "imagenet": ImageNetConfig,
             "imagefolder": ImageFolderConfig},
    "head": {"head": HeadConfig, "mlp": MLPHeadConfig, "cosine": CosineHeadConfig},
    "logger": {"logger": LoggerConfig},
    "schedule": {"schedule": ScheduleConfig, "lp_ft": LPFTConfig, "wise_ft": WiseFTConfig, "gradual": GradualConfig,
                 "surgical": SurgicalConfig, "partial": PartialConfig, "fine_tune": FineTuneConfig,
                 "lora": LoRAConfig, "reft": ReFTConfig},
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="thawlab_schema", node=TrainConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():  # under schema/, so `--help` lists them apart from the options
            cs.store(group=f"schema/{group}", name=name, node=node)
