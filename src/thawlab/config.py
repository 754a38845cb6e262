"""The structured-config schema. Hydra composes conf/ on top of it, so a value of the wrong type
(`trainer.max_epochs=abc`, `optimizer.lr=fast`) is rejected when the config is composed, before anything runs.

Groups whose options take different keys (data, head, logger, schedule) carry their own schema, registered
below under schema/<group> and named first in each option's defaults list
(`defaults: [/schema/schedule/lp_ft@_here_, _self_]`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from thawlab.errors import ThawlabError
from thawlab.sweep import job_dir_name

# hydra.sweep.subdir: a sweep job's directory is named after its overrides. Registered on import, so a launcher's
# worker process that unpickles the task function can resolve it too.
OmegaConf.register_new_resolver("thawlab_jobdir", lambda overrides, num: job_dir_name(str(overrides), int(num)),
                                replace=True)


# ---- value ranges ---------------------------------------------------------------------------------------
# Every numeric key declares its range next to its field (`num(default, "[0, 1)")`); check_values walks the
# composed config and checks each value against it, before anything runs. A numeric key without a declared
# range is a bug the walker refuses (numeric_fields), so a new key cannot skip the check.
@dataclass(frozen=True)
class Range:
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what null or a special value means, appended to the error
    batches: bool = False  # Lightning's limit_*_batches: an int >= 0 (batches) or a float in [0, 1] (a fraction)

    @classmethod
    def parse(cls, spec: str, note: str = "") -> "Range":
        """Interval notation: "[0, 1)", "(0, inf)", "[1, 5]"; "any": every value (indices checked later)."""
        if spec == "any":
            return cls(note=note)
        if spec == "batches":
            return cls(batches=True, note=note)
        m = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^\])]+)([\])])", spec)
        if not m:
            raise ValueError(f"bad range {spec!r}")
        return cls(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", note)

    def __contains__(self, v) -> bool:
        if self.batches:
            return (isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1)
        return ((v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)
                and not (isinstance(v, float) and math.isnan(v)))

    def describe(self, integer: bool) -> str:
        """'is outside [0, 1)', 'must be >= 0', 'must be a positive integer': what follows `key=value`."""
        note = f" ({self.note})" if self.note else ""
        if self.batches:
            return f"must be a number of batches (an int >= 0) or a fraction (a float in [0, 1]){note}"
        if math.isinf(self.lo) or math.isinf(self.hi):
            if integer and self.lo == 1 and not self.lo_open:
                return f"must be a positive integer{note}"
            if self.lo == 0 and self.lo_open:
                return f"must be positive{note}"
            if math.isinf(self.hi):
                return f"must be {'>' if self.lo_open else '>='} {_fmt(self.lo)}{note}"
            return f"must be {'<' if self.hi_open else '<='} {_fmt(self.hi)}{note}"
        return (f"is outside {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}"
                f"{')' if self.hi_open else ']'}{note}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def num(default: Any = MISSING, spec: str = "", note: str = "", factory=None) -> Any:
    """A numeric field and its range (interval notation, see Range.parse); lists: every element in range."""
    meta = {"range": Range.parse(spec, note)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SEED = "[0, 4294967295]"  # numpy's and Lightning's seed range


def _numeric(tp) -> tuple[type, bool] | None:
    """(int or float, whether a list of them) for a numeric field type (Optional unwrapped), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _numeric(rest[0]) if len(rest) == 1 else None
    if origin is list and args and args[0] in (int, float):
        return args[0], True
    if tp in (int, float):
        return tp, False
    return None


@functools.lru_cache(maxsize=None)
def numeric_fields(cls) -> dict[str, tuple[Range, type, bool]]:
    """name -> (range, int or float, list) of a schema dataclass's numeric fields (declared ranges on Any
    fields count too). Raises TypeError for a numeric field that declares no range."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = _numeric(hints[f.name])
        rng = f.metadata.get("range")
        if kind is None and rng is None:
            continue
        if rng is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a numeric config key declares no range "
                            f"(use num(default, '[lo, hi)') in thawlab/config.py)")
        out[f.name] = (rng, *(kind or (float, False)))
    return out


def check_values(cfg: DictConfig, prefix: str = "") -> None:
    """Every numeric value of the composed config in its declared range: a ThawlabError naming the key, the
    value and the range otherwise. Schema nodes are found by their type (OmegaConf keeps each group option's
    dataclass when Hydra composes), so every option of every group is covered."""
    cls = OmegaConf.get_type(cfg)
    if not prefix and not dataclasses.is_dataclass(cls):
        cls = TrainConfig  # the root loses its type in a masked copy (the task config without `hydra`)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return
    ranges = numeric_fields(cls)
    for f in dataclasses.fields(cls):
        if f.name not in cfg or OmegaConf.is_missing(cfg, f.name):
            continue
        key = f"{prefix}{f.name}"
        if f.name in ranges:
            rng, kind, is_list = ranges[f.name]
            value = cfg[f.name]
            if value is None:
                continue
            values = list(value) if is_list and OmegaConf.is_list(value) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue  # a string (trainer.devices=auto) or a flag: the key's own check handles it
                if v not in rng:
                    what = f"{key}={_show(value)}: {_show(v)}" if is_list else f"{key}={_show(v)}"
                    raise ThawlabError(f"{what} {rng.describe(kind is int)}")
        elif isinstance(cfg._get_node(f.name), DictConfig) and isinstance(cfg[f.name], DictConfig):
            check_values(cfg[f.name], key + ".")


def _show(v) -> str:
    return str(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)


@dataclass
class BackboneConfig:
    # any timm model name (a tag such as resnet18.a1_in1k selects hub weights), or open_clip:<model> for an
    # OpenCLIP model (open_clip:ViT-B-16, open_clip:RN50, open_clip:convnext_base; thawlab.clip)
    name: str = "test_resnet"
    # false: random init | true: the timm hub tag | "source": thawlab's own pretraining on the data's
    # source task (cached) | a path to a local weights file (.safetensors, .pth, .bin) | an OpenCLIP tag
    # (openai, laion2b_s34b_b88k, ...) for open_clip: models
    pretrained: Any = "source"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    coarse_groups: bool = True  # timm group_matcher(coarse=...): stages rather than single blocks
    # stochastic depth in [0, 1) through timm (active in trainable blocks only)
    drop_path_rate: float = num(0.0, "[0, 1)")


@dataclass
class TrainerConfig:
    max_epochs: int = num(20, "[1, inf)")
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # more than 1: DDP, one process per device (on a CPU: per process, gloo); see trainer=ddp
    # SLURM multi-node: with hydra/launcher=submitit_slurm, one task per device on every node
    num_nodes: int = num(1, "[1, inf)")
    strategy: str = "auto"  # auto | ddp: multi-device jobs always run DDP, with ranks thawlab starts itself
    # auto: bf16-mixed on a GPU with bf16, 32-true on a CPU; or any Lightning precision (16-mixed, 32-true, ...)
    precision: str = "auto"
    channels_last: Any = "auto"  # NHWC weights and inputs: auto = on a GPU only
    compile: bool = False  # torch.compile the network (in place; the first steps compile, later ones are fast)
    deterministic: bool = False
    # int: that many batches; float: that fraction of the batches (Lightning's semantics)
    limit_train_batches: Any = num(None, "batches", "null: all")
    limit_val_batches: Any = num(None, "batches", "null: all")
    limit_test_batches: Any = num(None, "batches", "null: all")
    num_sanity_val_steps: int = num(0, "[-1, inf)", "-1: every batch")
    log_every_n_steps: int = num(5, "[1, inf)")
    enable_progress_bar: bool = True
    # clip gradients to this norm (or value: gradient_clip_algorithm)
    gradient_clip_val: Optional[float] = num(None, "(0, inf)", "null: no clipping")
    gradient_clip_algorithm: str = "norm"  # norm (total 2-norm of the trainable gradients) | value
    # DDP: BatchNorm layers as torch's SyncBatchNorm (batch statistics over every rank's samples). GPUs only:
    # torch's SyncBatchNorm refuses CPU tensors, so on a CPU with several processes it is a config error
    sync_batchnorm: bool = False


@dataclass
class DDPConfig:
    """Multi-process jobs (trainer.devices > 1): how a job with a failed rank ends."""

    # collectives wait at most this long for a peer (NCCL hangs on a dead rank until then)
    timeout_s: int = num(600, "[1, inf)")
    # after a rank fails, its peers get this long to record the failure, then are killed
    grace_s: float = num(30.0, "[0, inf)")
    # testing the above: this rank raises in its first training step
    fail_rank: Optional[int] = num(None, "[0, inf)", "null: none")


@dataclass
class EarlyStoppingConfig:
    """Early stopping per phase: a phase whose ID validation metric has not improved by min_delta for
    `patience` epochs ends there and the next phase starts; when the last phase stops, the run ends."""

    patience: Optional[int] = num(None, "[1, inf)", "null: off")
    min_delta: float = num(0.0, "[0, inf)")
    monitor: str = "val/id/acc"  # val/id/acc (higher is better) | val/id/nll | val/id/ece (lower is better)


@dataclass
class SelectionConfig:
    """Selection rules reported beside the primary one (schedule.select), each over schedule.select_phases
    (thawlab/selection.py): id_val (max val/id/acc), oracle (max mean OOD validation accuracy), last (the last
    epoch). Each is tested: results.json `selections`, metrics `test/<rule>/<set>/<metric>`."""

    rules: list[str] = field(default_factory=list)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = num(1e-3, "[0, inf)")  # base lr of every group; phases scale it per group
    weight_decay: float = num(0.0, "[0, inf)")
    no_decay_exemptions: bool = True  # no weight decay on biases, norms and timm's no_weight_decay() names
    momentum: float = num(0.9, "[0, 1)")  # sgd only
    nesterov: bool = False  # sgd only: Nesterov momentum (FTP's SGDP and TPGM's SGD runs use it)
    # adamw only (fastai's Adam: 0.9, 0.99)
    betas: list[float] = num(spec="[0, 1)", factory=lambda: [0.9, 0.999])
    eps: float = num(1e-8, "(0, inf)")  # adamw only (fastai's Adam: 1e-5)
    # in (0, 1]: timm's layer-wise lr decay, per parameter: lr x layer_decay ** (timm layer ids between its layer
    # and the classifier's), layer ids from group_matcher(coarse=False) whatever backbone.coarse_groups says
    layer_decay: float = num(1.0, "(0, 1]")
    # lr shape within each phase: cosine | constant | step | stlr (ULMFiT) | one_cycle (fastai); a phase may set
    # its own
    schedule: str = "cosine"
    # cosine, constant and step: linear warm-up at the start of each phase
    warmup_epochs: float = num(0.0, "[0, inf)")
    # step: fractions of the phase where lr drops
    milestones: list[float] = num(spec="[0, 1]", factory=lambda: [0.5])
    gamma: float = num(0.1, "(0, inf)")  # step: lr x gamma at each milestone
    cut_frac: float = num(0.1, "(0, 1)")  # stlr: fraction of the phase's steps spent increasing the lr
    ratio: float = num(32.0, "[1, inf)")  # stlr: how much smaller the lowest lr is than the maximum
    pct_start: float = num(0.25, "(0, 1)")  # one_cycle: fraction of the phase's steps spent increasing the lr
    div: float = num(25.0, "[1, inf)")  # one_cycle: initial lr = max / div
    div_final: float = num(1e5, "[1, inf)")  # one_cycle: final lr = max / div_final
    # one_cycle: cycle Adam's beta1 (SGD's momentum) cosine from moms[0] to moms[1] over pct_start, back to
    # moms[2] (fastai: 0.95, 0.85, 0.95); null: keep betas[0] / momentum
    moms: Optional[list[float]] = num(None, "[0, 1)", "null: keep betas[0] / momentum")


@dataclass
class ScheduleConfig:
    """Keys every strategy has; each strategy's own schema adds its keys (conf/schedule/<name>.yaml)."""

    name: str = MISSING
    # BatchNorm policy of trainable groups (frozen groups: always eval): train | eval | frozen, or a mapping
    # {phase name: policy}, e.g. {lp: eval, ft: train}
    bn: Any = "train"
    probe_lr_mult: float = num(10.0, "(0, inf)")  # lr multiplier of the head while it trains alone (a linear probe)
    adapter: Optional[str] = None  # modules added to the backbone before training: null | lora | reft
    # model selection (thawlab/selection.py): best (max val/id/acc) | last (the last epoch), over the epochs of
    # select_phases (null: every phase, the whole run); lp_ft and wise_ft set their papers' rules
    select: str = "best"
    select_phases: Optional[list[str]] = None
    # how the probe phase (a first phase that trains the head alone: frozen, lp_ft, wise_ft, gradual, fine_tune)
    # fits the head: adamw = gradient steps with optimizer.* like any phase; lbfgs = full-batch multinomial
    # logistic regression on cached features in float64 over probe_grid, chosen on ID val (thawlab/probe.py)
    solver: str = "adamw"
    # lbfgs: the C values (sklearn's inverse L2 strength), a list or "logspace(a, b, n)"; LP-FT's grid by default
    probe_grid: Any = "logspace(-7, 2, 50)"
    probe_max_iter: int = num(200, "[1, inf)")  # L-BFGS iterations per C (LP-FT: 200; sklearn's default: 100)
    probe_tol: float = num(1e-4, "(0, inf)")  # sklearn's tol: scipy's gtol, the largest gradient entry
    probe_normalize: bool = True  # standardise features by one scalar mean and std of the training set (LP-FT)


@dataclass
class LPFTConfig(ScheduleConfig):
    # epochs of the probing phase (default: half the run); 0: no probe, for a head that starts trained
    lp_epochs: Optional[int] = num(None, "[0, inf)", "null: half the run")
    # with a head that starts trained (head=zeroshot): probe it first (LP-FT from the zero-shot head) when
    # lp_epochs is null; false: no probe (WiSE-FT: theta_0 is the zero-shot model)
    zeroshot_probe: bool = True


@dataclass
class FLYPConfig(ScheduleConfig):
    """FLYP: both CLIP towers with the contrastive loss between images and prompts of their classes."""


@dataclass
class WiseFTConfig(LPFTConfig):
    # WiSE-FT: evaluate (1 - alpha) * theta_0 + alpha * theta_ft at each alpha after training
    alphas: list[float] = num(spec="[0, 1]", factory=lambda: [round(0.1 * i, 1) for i in range(11)])


@dataclass
class GradualConfig(ScheduleConfig):
    interval: int = num(1, "[1, inf)")  # epochs between two unfreezings
    factor: float = num(2.6, "(0, inf)")  # lr of each group below = lr of the one above / factor (ULMFiT)


@dataclass
class SurgicalConfig(ScheduleConfig):
    groups: list[int] = num(spec="any", factory=lambda: [0])  # block groups that train: forward order, -1 = top
    train_head: bool = True  # false (with head.pretrained=true): the listed groups alone, as Lee et al.


@dataclass
class AutoRGNConfig(ScheduleConfig):
    batches: int = num(5, "[1, inf)")  # training batches the gradient statistics are averaged over, each epoch
    # the new head at the full lr whatever its statistics (false, with head.pretrained=true: as the paper)
    train_head: bool = True


@dataclass
class AutoSNRConfig(AutoRGNConfig):
    threshold: float = num(0.95, "[0, inf)")  # a tensor trains in an epoch when its gradient SNR is at least this


@dataclass
class PartialConfig(ScheduleConfig):
    freeze_first: int = num(1, "[0, inf)")  # the first k block groups stay frozen


@dataclass
class FineTuneConfig(ScheduleConfig):
    freeze_epochs: int = num(1, "[1, inf)")  # epochs of the head alone
    lr_mult: float = num(100.0, "(0, inf)")  # then lrs spread from lr / lr_mult (stem) to lr (head), halved
    pct_start: float = num(0.3, "(0, 1)")  # one-cycle of the second phase
    div: float = num(5.0, "[1, inf)")
    # fastai: lr / lr_mult for the whole body, lr for the head (vision_learner's 2 groups for a timm model);
    # blocks: spread log-evenly over thawlab's block groups, lr / lr_mult (stem) to lr (head)
    spread: str = "fastai"


@dataclass
class LoRAConfig(ScheduleConfig):
    adapter: Optional[str] = "lora"
    rank: int = num(8, "[1, inf)")
    alpha: float = num(16.0, "(0, inf)")  # adapter output scaled by alpha / rank
    target_modules: Any = None  # a list of module names, or one regex over them; null: defaults per family
    dropout: float = num(0.0, "[0, 1)")  # on the adapter's input


@dataclass
class ReFTConfig(ScheduleConfig):
    adapter: Optional[str] = "reft"
    # block groups whose outputs get an intervention: indices as schedule.groups of surgical (-1 = top). Two, as
    # one at the top alone composes with global pooling and a linear head into an affine map: a linear probe.
    layers: list[int] = num(spec="any", factory=lambda: [-2, -1])
    rank: int = num(4, "[1, inf)")  # r: rows of R and W
    positions: Any = None  # ViT-like (B, N, D) outputs: null or "all" | "prefix" (class/register tokens) | [0, ...]


@dataclass
class RegularizationConfig:
    # L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 over the pretrained body + beta/2 ||w_head||^2
    l2sp_alpha: float = num(0.0, "[0, inf)")
    l2sp_beta: float = num(0.0, "[0, inf)")
    # projection toward theta_0 after each optimizer step (thawlab/projection.py): null | ftp | spd | tpgm
    projection: Optional[str] = None
    ftp_k: float = num(1.0, "[0, 1]")  # FTP: positive hyper-gradients of the radii scaled by k (1: strongest)
    spd_weight_decay: float = num(1.0, "[0, inf)")  # SPD: lambda, the projection decay's strength
    tpgm_norm: str = "mars"  # TPGM: the norm of w - w0 the radius bounds: mars (L1 per output row) | l2
    tpgm_every: int = num(1, "[1, inf)")  # TPGM: radii trained after every this many optimizer steps
    tpgm_iters: int = num(1, "[1, inf)")  # TPGM: Adam steps on the radii each time (one ID val batch each)
    tpgm_lr: float = num(1e-2, "(0, inf)")  # TPGM: their Adam's lr
    # in [0, 1): of the training loss only (evaluation NLL stays the plain NLL)
    label_smoothing: float = num(0.0, "[0, 1)")
    # timm Mixup / CutMix of training batches: Beta(alpha, alpha) mixing weights, 0 = off (DeiT: 0.8 and 1.0);
    # both on: one or the other per batch, half the time each. Needs an even data.batch_size; no feature cache.
    mixup: float = num(0.0, "[0, inf)", "0: off")
    cutmix: float = num(0.0, "[0, inf)", "0: off")
    mix_prob: float = num(1.0, "[0, 1]")  # probability that a training batch is mixed


@dataclass
class DiagnosticsConfig:
    """Drift from the pretrained network per block group (thawlab/diagnostics.py): linear CKA and relative
    feature change on a fixed sample of each test set, relative weight change, LP-FT's feature distortion."""

    enabled: bool = True  # diagnostics=none: off
    # also every this many epochs during training (null: only the selected checkpoint, after training)
    every: Optional[int] = num(None, "[1, inf)", "null: after training only")
    samples: int = num(512, "[1, inf)")  # images per set (a set with fewer: all of it), drawn from the seed
    sets: Optional[list[str]] = None  # test sets by name (id, ood/<name>); null: every test set


@dataclass
class PretrainConfig:
    """Recipe of thawlab's own pretraining on a data set's source task (backbone.pretrained=source)."""

    epochs: int = num(3, "[1, inf)")
    lr: float = num(2e-3, "(0, inf)")
    weight_decay: float = num(0.05, "[0, inf)")
    batch_size: int = num(128, "[1, inf)")
    seed: int = num(0, SEED)


@dataclass
class DataConfig:
    _target_: str = MISSING
    batch_size: int = num(32, "[1, inf)")  # per process: under DDP the global batch is batch_size x devices
    eval_batch_size: int = num(256, "[1, inf)")
    num_workers: int = num(0, "[0, inf)")
    pin_memory: Any = "auto"  # auto: on when training on a GPU
    persistent_workers: Any = "auto"  # auto: on a GPU with num_workers > 0
    # a source task to pretrain on (backbone.pretrained=source) and its recipe: data=digits has them; for the
    # others they stay empty, and debug=smoke's shrunken settings for them are ignored
    source: Any = None
    pretrain: Any = None
    # zero-shot heads and FLYP (CLIP backbones): the class names in label order (null: the data set's own, where
    # it has them: imagefolder's folder names) and prompt templates with {} for the name (head.templates
    # overrides them)
    classnames: Optional[list[str]] = None
    templates: Optional[list[str]] = None
    # the contrastive pretraining of an OpenCLIP backbone on the source task (thawlab.clip_pretrain): data=digits
    # has one; null elsewhere
    clip_pretrain: Any = None


@dataclass
class ClipPretrainConfig:
    """Recipe of the contrastive source pretraining of an OpenCLIP model (backbone.name=open_clip:...,
    backbone.pretrained=source): captions are the templates filled with the source class names."""

    templates: list[str] = MISSING
    epochs: int = num(6, "[1, inf)")
    lr: float = num(1e-3, "(0, inf)")
    weight_decay: float = num(0.1, "[0, inf)")
    warmup_steps: int = num(50, "[0, inf)")
    batch_size: int = num(256, "[1, inf)")
    seed: int = num(0, SEED)


@dataclass
class DigitsSourceConfig:
    _target_: str = "thawlab.data.digits.DigitsSource"
    renders: int = num(30, "[1, inf)")  # images per class and font (34 classes x 21 fonts)
    test_renders: int = num(4, "[1, inf)")
    seed: int = num(0, SEED)
    batch_size: int = num(128, "[1, inf)")
    eval_batch_size: int = num(512, "[1, inf)")
    num_workers: int = num(0, "[0, inf)")


@dataclass
class DigitsConfig(DataConfig):
    _target_: str = "thawlab.data.digits.DigitsTarget"
    train_per_class: int = num(10, "[1, inf)")
    val_per_class: int = num(18, "[1, inf)")
    test_per_class: int = num(36, "[1, inf)")
    split_seed: int = num(0, SEED)
    ood: list[str] = field(default_factory=lambda: ["printed", "corrupt"])
    severities: list[int] = num(spec="[1, 5]", factory=lambda: [1, 2, 3, 4, 5])
    shift: str = "none"  # none | invert | flip_labels: the target task itself shifted (surgical fine-tuning)
    augment: str = "none"  # training: none | crop_flip (no flip on digits) | resized_crop | randaug | augmix
    img_size: int = num(32, "[1, inf)")
    source: DigitsSourceConfig = field(default_factory=DigitsSourceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    clip_pretrain: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)


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
    val_per_class: int = num(500, "[1, inf)")  # held out from the training batches for model selection
    # at most this many training images per class (null: all)
    train_per_class: Optional[int] = num(None, "[1, inf)", "null: all")
    split_seed: int = num(0, SEED)
    # held out of each OOD test set (per class, seeded by split_seed) as its validation set: the oracle
    # selection rule needs one (thawlab/data/ood_val.py); 0: OOD sets are test sets only
    ood_val_fraction: float = num(0.0, "[0, 1)")
    ood: list[str] = field(default_factory=lambda: ["cifar10_1", "stl10", "cifar10_c"])
    corruptions: list[str] = field(default_factory=lambda: [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"])
    severities: list[int] = num(spec="[1, 5]", factory=lambda: [1, 2, 3, 4, 5])
    augment: str = "crop_flip"  # none | crop_flip | resized_crop | randaug | augmix | clip_crop (data/augment.py)
    crop_pct: float = num(1.0, "(0, 1]")  # evaluation: resize to img_size / crop_pct, centre-crop img_size
    img_size: int = num(32, "[1, inf)")
    # the resize's resampling (bilinear, bicubic, ...); null: the model's own (its timm or OpenCLIP config)
    interpolation: Optional[str] = None


@dataclass
class Cifar10CConfig(DataConfig):
    """data=cifar10c: one CIFAR-10-C corruption at one severity as the target task (surgical fine-tuning)."""

    _target_: str = "thawlab.data.cifar.Cifar10C"
    root: str = DATA_ROOT
    paths: CifarPaths = field(default_factory=CifarPaths)
    download: bool = False
    corruption: str = "gaussian_noise"
    severity: int = num(5, "[1, 5]")
    train_per_class: int = num(100, "[1, inf)")  # Lee et al.: 100 labelled corrupted images per class
    val_per_class: int = num(10, "[1, inf)")
    test_per_class: Optional[int] = num(None, "[1, inf)", "null: every image left")  # null: every image left
    split_seed: int = num(0, SEED)
    # held out of each OOD test set (per class, seeded by split_seed) as its validation set: the oracle
    # selection rule needs one (thawlab/data/ood_val.py); 0: OOD sets are test sets only
    ood_val_fraction: float = num(0.0, "[0, 1)")
    ood: list[str] = field(default_factory=lambda: ["cifar10"])  # the clean CIFAR-10 test set, or []
    augment: str = "none"
    crop_pct: float = num(1.0, "(0, 1]")
    img_size: int = num(32, "[1, inf)")
    interpolation: Optional[str] = None  # null: the model's own


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
    val_per_class: int = num(10, "[1, inf)")
    train_per_class: Optional[int] = num(None, "[1, inf)", "null: all")
    split_seed: int = num(0, SEED)
    # held out of each OOD test set (per class, seeded by split_seed) as its validation set: the oracle
    # selection rule needs one (thawlab/data/ood_val.py); 0: OOD sets are test sets only
    ood_val_fraction: float = num(0.0, "[0, 1)")
    ood: list[str] = field(default_factory=lambda: ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a"])
    augment: str = "resized_crop"  # none | crop_flip | resized_crop | randaug | augmix | clip_crop (data/augment.py)
    crop_pct: float = num(0.875, "(0, 1]")
    img_size: int = num(224, "[1, inf)")
    interpolation: Optional[str] = None  # null: the model's own


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
    val_fraction: float = num(0.1, "(0, 1)")  # without a val folder: this fraction of each class held out of train
    train_per_class: Optional[int] = num(None, "[1, inf)", "null: all")
    split_seed: int = num(0, SEED)
    # held out of each OOD test set (per class, seeded by split_seed) as its validation set: the oracle
    # selection rule needs one (thawlab/data/ood_val.py); 0: OOD sets are test sets only
    ood_val_fraction: float = num(0.0, "[0, 1)")
    augment: str = "resized_crop"  # none | crop_flip | resized_crop | randaug | augmix | clip_crop (data/augment.py)
    crop_pct: float = num(0.875, "(0, 1]")
    img_size: int = num(224, "[1, inf)")
    interpolation: Optional[str] = None  # null: the model's own


@dataclass
class HeadConfig:
    _target_: str = MISSING
    dropout: float = num(0.0, "[0, 1)")
    # linear head: start from the pretrained model's own classifier (a weights file with the same classes)
    pretrained: bool = False


@dataclass
class MLPHeadConfig(HeadConfig):
    hidden_dim: int = num(256, "[1, inf)")


@dataclass
class ZeroShotHeadConfig(HeadConfig):
    # prompt templates with {} for the class name; null: data.templates
    templates: Optional[list[str]] = None


@dataclass
class CosineHeadConfig(HeadConfig):
    scale: float = num(16.0, "(0, inf)")  # logits = scale * cos(feature, class weight)


@dataclass
class LoggerConfig:
    _target_: str = MISSING
    project: str = "thawlab"


@dataclass
class CacheConfig:
    # deterministic training inputs (no random augmentation, no Mixup/CutMix): a frozen backbone's features, and a
    # phase's frozen prefix's activations, computed once per sample. `cache_features=false` turns both off.
    enabled: bool = True
    prefix: bool = True  # the frozen-prefix cache (false: only the fully frozen backbone's features are cached)
    max_gb: float = num(2.0, "[0, inf)")  # the prefix's activations held in RAM up to this size (GB)
    disk_gb: float = num(20.0, "[0, inf)")  # beyond max_gb: a memory-mapped file in the run directory, up to this
    # the store of features shared across runs (schedule.solver=lbfgs: <cache_dir>/features), least recently used
    # entries evicted beyond this size (GB); `thawlab-cache clear` empties it
    shared_gb: float = num(10.0, "[0, inf)")


@dataclass
class TrainConfig:
    seed: int = num(0, SEED)
    task: str = "finetune"  # finetune | pretrain (experiment=pretrain_source)
    ckpt_path: Optional[str] = None  # resume: a checkpoint path, or "last"
    cache_dir: str = "${oc.env:THAWLAB_CACHE,${oc.env:HOME}/.cache/thawlab}"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # the caches of frozen parts (CacheConfig); typed Any so that `cache_features=false` (a bool) still switches
    # them off, as before the block existed: build.cache_options reads both forms
    cache_features: Any = field(default_factory=CacheConfig)
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
    "head": {"head": HeadConfig, "mlp": MLPHeadConfig, "cosine": CosineHeadConfig, "zeroshot": ZeroShotHeadConfig},
    "logger": {"logger": LoggerConfig},
    "schedule": {"schedule": ScheduleConfig, "lp_ft": LPFTConfig, "wise_ft": WiseFTConfig, "gradual": GradualConfig,
                 "surgical": SurgicalConfig, "partial": PartialConfig, "fine_tune": FineTuneConfig,
                 "lora": LoRAConfig, "reft": ReFTConfig, "flyp": FLYPConfig, "auto_rgn": AutoRGNConfig,
                 "auto_snr": AutoSNRConfig},
}


def schema_classes() -> list[type]:
    """Every dataclass of the schema: TrainConfig, each group option's and the nodes they hold."""
    seen, todo = [], [TrainConfig, *(c for options in SCHEMAS.values() for c in options.values())]
    while todo:
        cls = todo.pop(0)
        if cls in seen:
            continue
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # a node typed Any that defaults to a schema dataclass (cache_features) holds that schema too
            for tp in (hints[f.name], f.default_factory):
                if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                    todo.append(tp)
    return seen


def register() -> None:
    cs = ConfigStore.instance()
    _rename_slurm_schema(cs)
    cs.store(name="thawlab_schema", node=TrainConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():  # under schema/, so `--help` lists them apart from the options
            cs.store(group=f"schema/{group}", name=name, node=node)


SLURM_SCHEMA = "submitit_slurm_schema"


def _rename_slurm_schema(cs: ConfigStore) -> None:
    """conf/hydra/launcher/submitit_slurm.yaml replaces the submitit plugin's config of the same name, so that
    `hydra/launcher=submitit_slurm` gets thawlab's defaults. Hydra would validate the file against the plugin's
    ConfigStore entry of that name, a matching by name deprecated since Hydra 1.1 and warned about whenever the
    launcher is chosen. So the plugin's schema moves to `submitit_slurm_schema`, which the file extends by its
    defaults list (Hydra's migration for this case): the same keys, types and values, no warning."""
    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:  # the launcher is an extra (thawlab[sweep]): without it there is nothing to rename
        return
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's plugin scan re-runs the plugin's registrations: let it happen first, once
    launchers = cs.repo.get("hydra", {}).get("launcher", {})
    launchers.pop("submitit_slurm.yaml", None)
    cs.store(group="hydra/launcher", name=SLURM_SCHEMA, node=SlurmQueueConf, provider="submitit_launcher")
