"""Build the objects of a run from its config: network, data, phases, module, trainer."""
from __future__ import annotations

import copy
from dataclasses import asdict
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from thawlab import backbone as bb
from thawlab import clip as openclip
from thawlab import diagnostics, projection, reft, schedules, stopping
from thawlab.data.preprocess import Preprocess
from thawlab.model import ThawNet
from thawlab.errors import ThawlabError, did_you_mean
from thawlab.heads import LinearHead
from thawlab.module import OPTIMIZERS, FineTuner
from thawlab.selection import SELECT, SelectCheckpoint, check_rules, extra_rules

WIDE = 240  # columns of output that is not a terminal (a pipe, a SLURM log): rich's default 80 cuts tables


class LogConsole(Console):
    """A rich Console whose output also goes to the job's log file (Hydra's `<run dir>/train.log`), as plain
    text; full width in a file or a pipe, not cut at 80 columns (a terminal keeps its own width)."""

    def __init__(self, stderr: bool = False):
        stream = sys.stderr if stderr else sys.stdout
        tty = hasattr(stream, "isatty") and stream.isatty()
        width = None if tty else int(os.environ.get("COLUMNS") or 0) or WIDE
        # soft_wrap: long paths stay on one line, copyable
        super().__init__(stderr=stderr, soft_wrap=True, record=True, width=width)

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        text = self.export_text(clear=True).rstrip("\n")
        if text:
            to_log_files("\n" + text if "\n" in text else text)


def to_log_files(text: str) -> None:
    """One INFO record to the file handlers of the root logger (Hydra's job log), not to its console handler:
    what a Console printed reaches the terminal once and the log file once."""
    record = logging.LogRecord("thawlab", logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def one_lightning_log_line() -> None:
    """Lightning (the `lightning` package) gives its logger a stderr handler of its own when imported, and
    its records also propagate to the root logger, where Hydra's job logging prints them again (and writes
    them to train.log): every INFO line twice on the terminal. Where the root logger has handlers (under
    Hydra), Lightning's own go: each line once on the terminal, once in the log file."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


one_lightning_log_line()
console = LogConsole(stderr=True)
out = LogConsole()  # stdout: the metrics tables
LAST = "last"  # checkpoints/last.ckpt: the end of the latest epoch, what ckpt_path=last resumes from


def _add_lora(backbone, cfg):
    from thawlab.adapters import add_lora  # imports PEFT (and transformers): only when asked for

    s = cfg.schedule
    add_lora(backbone, rank=s.rank, alpha=s.alpha, dropout=s.dropout, name=cfg.backbone.name,
             target_modules=list(s.target_modules) if s.target_modules is not None else None)


def _merge_lora(backbone):
    from thawlab.adapters import merge_lora

    return merge_lora(backbone), {}


def _add_reft(backbone, cfg):
    s, size = cfg.schedule, cfg.data.img_size
    positions = OmegaConf.to_container(s.positions) if OmegaConf.is_config(s.positions) else s.positions
    reft.add_reft(backbone, list(s.layers), s.rank, positions, coarse=cfg.backbone.coarse_groups,
                  input_size=(int(bb.data_config(backbone)["input_size"][0]), size, size), name=cfg.backbone.name)


class Adapter(NamedTuple):
    add: Callable  # (backbone, run config): add its modules to the backbone in place
    export: Callable  # backbone -> (a plain timm backbone: merged or removed, {name: tensor} saved beside it)
    check: Callable | None = None  # schedule config -> None: its options, checked before anything slow
    changes_weights: bool = True  # False: it edits activations, no pretrained weight moves (L2-SP has no w - w0)


# schedule.adapter -> what build_net, export_model and check_config do with it
ADAPTERS = {"lora": Adapter(_add_lora, _merge_lora),
            "reft": Adapter(_add_reft, reft.export_reft, reft.check_options, changes_weights=False)}


def export_model(net: ThawNet, adapter: str | None, path: Path) -> None:
    """The trained network, adapters merged, as a plain timm state dict (a linear head becomes the model's
    classifier): `timm.create_model(name, num_classes=K).load_state_dict(...)` loads it, no thawlab or PEFT.
    What has no place in a timm state dict is saved beside it under its own prefix: an MLP or cosine head
    (`thawlab_head.`), ReFT's interventions, which edit activations and merge into no weight (`thawlab_reft.`,
    put back on the timm model by `thawlab.reft.load_exported`)."""
    from safetensors.torch import save_file

    backbone, extra = ADAPTERS[adapter].export(copy.deepcopy(net.backbone)) if adapter else (net.backbone, {})
    fc = net.head.fc if isinstance(net.head, LinearHead) else None
    state = {**bb.timm_state_dict(backbone, fc), **extra}
    if fc is None:  # an MLP or cosine head has no timm equivalent: saved beside, under its own prefix
        state.update({f"thawlab_head.{k}": v.detach().contiguous() for k, v in net.head.state_dict().items()})
    save_file(state, str(path))


def check_config(cfg: DictConfig) -> None:
    """Values the schema cannot check by type, checked before anything slow (pretraining) starts."""
    from thawlab.config import check_values

    check_values(cfg)  # every numeric key in its declared range (thawlab/config.py)
    if openclip.is_clip(cfg.backbone.name):
        openclip.check_name(cfg.backbone.name)
        openclip.check_input_size(cfg.backbone.name, cfg.data.img_size)
        if cfg.backbone.kwargs or cfg.backbone.get("drop_path_rate"):
            raise ThawlabError(f"backbone.kwargs={OmegaConf.to_container(cfg.backbone.kwargs)} and "
                               f"backbone.drop_path_rate={cfg.backbone.drop_path_rate} are timm.create_model "
                               f"arguments: an OpenCLIP model ({cfg.backbone.name}) takes its own config")
    else:
        bb.check_name(cfg.backbone.name)
        bb.check_input_size(cfg.backbone.name, backbone_kwargs(cfg), cfg.data.img_size)
    check_text_head(cfg)
    schedules.check(cfg.schedule, cfg.trainer.max_epochs, cfg.optimizer.layer_decay)
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None and clip <= 0:
        raise ThawlabError(f"trainer.gradient_clip_val={clip} must be positive (null: no clipping)")
    if cfg.trainer.get("gradient_clip_algorithm", "norm") not in ("norm", "value"):
        raise ThawlabError(f"trainer.gradient_clip_algorithm={cfg.trainer.gradient_clip_algorithm!r} is not one "
                           f"of norm, value")
    stopping.check(cfg.get("early_stopping"))
    check_rules((cfg.get("selection") or {}).get("rules"))
    diagnostics.check(cfg.get("diagnostics"), cfg.trainer.max_epochs)
    o = cfg.optimizer
    if not 0 < o.cut_frac < 1 or o.ratio < 1:
        raise ThawlabError(f"optimizer.cut_frac={o.cut_frac} must be in (0, 1) and optimizer.ratio={o.ratio} >= 1")
    if o.get("nesterov") and o.name == "sgd" and o.momentum == 0:
        raise ThawlabError("optimizer.nesterov=true with optimizer.momentum=0: Nesterov momentum needs a momentum")
    if o.get("moms") is not None and len(o.moms) != 3:
        raise ThawlabError(f"optimizer.moms={list(o.moms)} must be 3 values (start, middle, end) or null")
    if cfg.schedule.get("train_head") is False and not cfg.head.get("pretrained"):
        raise ThawlabError("schedule.train_head=false leaves a new, random head untrained: set head.pretrained=true")
    from thawlab.data.augment import INTERPOLATIONS

    for key, value, choices in (("optimizer.name", cfg.optimizer.name, OPTIMIZERS),
                                ("data.interpolation", cfg.data.get("interpolation"), INTERPOLATIONS),
                                ("schedule.adapter", cfg.schedule.get("adapter"), ADAPTERS),
                                ("optimizer.schedule", cfg.optimizer.schedule, schedules.LR_SHAPES)):
        if value is not None and value not in choices:
            raise ThawlabError(f"{key}={value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
    adapter = ADAPTERS.get(cfg.schedule.get("adapter"))
    if adapter and adapter.check:
        adapter.check(cfg.schedule)
    if adapter and not adapter.changes_weights and cfg.regularization.l2sp_alpha:
        raise ThawlabError(f"regularization.l2sp_alpha={cfg.regularization.l2sp_alpha} with schedule.adapter="
                           f"{cfg.schedule.adapter}: it edits activations and moves no pretrained weight, so "
                           f"L2-SP's alpha/2 ||w - w0||^2 has nothing to act on (set l2sp_alpha=0; l2sp_beta still "
                           f"applies to the head)")
    check_regularization(cfg)
    projection.check(cfg)
    cache_options(cfg)


def check_text_head(cfg: DictConfig) -> None:
    """A head built from a text tower (head=zeroshot) needs a CLIP backbone and prompts: each a one-line error."""
    from hydra.utils import get_class

    from thawlab.zeroshot import check_templates

    try:
        needs_text = getattr(get_class(cfg.head._target_), "needs_text", False)
    except Exception:  # noqa: BLE001 (an unknown head class is reported where it is instantiated)
        needs_text = False
    if not needs_text:
        return
    if not openclip.is_clip(cfg.backbone.name):
        raise ThawlabError(f"head=zeroshot needs a CLIP text tower: backbone.name={cfg.backbone.name!r} is a timm "
                           f"model (use backbone.name=open_clip:<model>)")
    templates = cfg.head.get("templates") or cfg.data.get("templates")
    check_templates(templates, "head.templates" if cfg.head.get("templates") else "data.templates")
    names = cfg.data.get("classnames")
    if names is not None and len(names) == 0:
        raise ThawlabError("data.classnames=[]: head=zeroshot needs the class names in label order")


def classnames_of(cfg: DictConfig, dm) -> list[str] | None:
    """data.classnames, else the data set's own class names (imagefolder: its folder names, in label order)."""
    if cfg.data.get("classnames") is not None:
        return list(cfg.data.classnames)
    _ = dm.num_classes  # a data set on disk reads its class folders on first use
    classes = getattr(dm, "classes", None)
    if isinstance(classes, dict):
        return [c for c, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    return list(classes) if classes else None


def check_regularization(cfg: DictConfig) -> None:
    """Dropout, stochastic depth, label smoothing and mixing: values in their ranges."""
    for key, value in (("head.dropout", cfg.head.get("dropout", 0.0)),
                       ("backbone.drop_path_rate", cfg.backbone.get("drop_path_rate", 0.0))):
        if not 0 <= value < 1:
            raise ThawlabError(f"{key}={value} is outside [0, 1)")
    r = cfg.regularization
    if not 0 <= r.label_smoothing < 1:
        raise ThawlabError(f"regularization.label_smoothing={r.label_smoothing}: outside [0, 1)")
    for key in ("mixup", "cutmix"):
        if r[key] < 0:
            raise ThawlabError(f"regularization.{key}={r[key]}: a Beta(alpha, alpha) alpha must be >= 0 (0: off)")
    if not 0 <= r.mix_prob <= 1:
        raise ThawlabError(f"regularization.mix_prob={r.mix_prob}: outside [0, 1]")
    if (r.mixup or r.cutmix) and cfg.data.batch_size % 2:
        raise ThawlabError(f"data.batch_size={cfg.data.batch_size}: Mixup/CutMix (regularization.mixup={r.mixup}, "
                           f"cutmix={r.cutmix}) pairs the samples of a batch: use an even batch size")


def backbone_kwargs(cfg: DictConfig) -> dict:
    """timm.create_model arguments beyond the name: backbone.kwargs, and drop_path_rate when it is set."""
    kwargs = OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)
    if cfg.backbone.get("drop_path_rate"):  # only when asked: not every timm model takes the argument
        kwargs["drop_path_rate"] = cfg.backbone.drop_path_rate
    return kwargs


def build_net(cfg: DictConfig, num_classes: int, pretrained, adapters: bool = True,
              classnames: list[str] | None = None) -> tuple[ThawNet, Preprocess]:
    """The backbone (with the schedule's adapters, unless adapters=False), its preprocessing and a new head
    (head=zeroshot: from the text tower, for `classnames`, else data.classnames)."""
    if classnames is None and cfg.data.get("classnames") is not None:
        classnames = list(cfg.data.classnames)
    b = cfg.backbone
    text = None
    if openclip.is_clip(b.name):  # OpenCLIP: the image tower is the backbone, the text tower is held apart
        model, text = openclip.split(openclip.create_clip(b.name, pretrained), b.name)
    else:
        model = bb.create_backbone(b.name, pretrained, backbone_kwargs(cfg))
    adapter = cfg.schedule.get("adapter")
    if adapters and adapter:
        ADAPTERS[adapter].add(model, cfg)
    dc = bb.data_config(model)
    # the resize's resampling: data.interpolation, else the weights' own (timm: bicubic for most, OpenCLIP's
    # preprocess config), as timm's create_transform and OpenCLIP's image_transform use it
    preprocess = Preprocess(img_size=cfg.data.img_size, in_chans=int(dc["input_size"][0]),
                            mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                            interpolation=cfg.data.get("interpolation") or dc.get("interpolation") or "bilinear")
    # the width of what forward() returns with num_classes=0: head_hidden_size where a model has a pre-logits
    # layer wider than num_features (MobileNetV3's conv_head, MambaOut), else num_features
    width = getattr(model, "head_hidden_size", None) or model.num_features
    head_cfg = {k: v for k, v in OmegaConf.to_container(cfg.head, resolve=True).items() if k != "pretrained"}
    head = instantiate(head_cfg, in_features=width, num_classes=num_classes)
    if cfg.head.get("pretrained"):
        _load_pretrained_classifier(head, model, pretrained, num_classes)
    if getattr(head, "needs_text", False):
        fill_zeroshot(cfg, head, text, classnames)
    return ThawNet(model, head, bb.block_groups(model, b.coarse_groups), text=text), preprocess


def fill_zeroshot(cfg: DictConfig, head, text, classnames: list[str] | None) -> None:
    """head=zeroshot: class weights from the text tower (cached on disk under cache_dir/zeroshot/)."""
    import time

    if text is None:
        raise ThawlabError(f"head=zeroshot needs a CLIP text tower: backbone.name={cfg.backbone.name!r}")
    if not classnames:
        raise ThawlabError(f"head=zeroshot: data {cfg.data._target_.rsplit('.', 1)[-1]} names no classes: set "
                           f"data.classnames (the class names in label order)")
    templates = list(head.templates or cfg.data.get("templates") or [])
    start = time.perf_counter()
    info = head.fill(text, classnames, templates, cache_dir=cfg.cache_dir)
    console.print(f"zero-shot head: {len(classnames)} classes x {len(templates)} templates, "
                  f"{'from the cache' if info['cached'] else 'computed'} in {time.perf_counter() - start:.2f} s "
                  f"({info['path']})")


def _load_pretrained_classifier(head, model, pretrained, num_classes: int) -> None:
    """head.pretrained=true: the linear head starts as the classifier stored in the weights file."""
    if not isinstance(head, LinearHead) or not isinstance(pretrained, str):
        raise ThawlabError(f"head.pretrained=true needs head=linear and backbone.pretrained=<a weights file> "
                           f"(got {type(head).__name__}, backbone.pretrained={pretrained!r})")
    classifier = bb.classifier_of(bb._load_file(pretrained), model)
    if classifier.out_features != num_classes:
        raise ThawlabError(f"head.pretrained=true: the classifier in {pretrained} has {classifier.out_features} "
                           f"classes, the data {num_classes}")
    head.fc.load_state_dict(classifier.state_dict())


# keys of a data config that describe the data rather than construct its data module
NOT_DATA_MODULE_KEYS = ("source", "pretrain", "img_size", "classnames", "templates", "clip_pretrain",
                        "interpolation")  # the model's preprocessing (build_net), not the data module's


def build_datamodule(data_cfg: DictConfig, preprocess: Preprocess, task: str = "target",
                     shuffle_seed: int = 0) -> L.LightningDataModule:
    """task=target: the data set's own task; task=source: its pretraining task (data.source)."""
    node = data_cfg.source if task == "source" else data_cfg
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k not in NOT_DATA_MODULE_KEYS}
    from hydra.errors import InstantiationException

    try:
        dm = instantiate(kwargs, shuffle_seed=shuffle_seed, _convert_="all")
    except InstantiationException as e:  # a bad data option is the user's one line, not Hydra's wrapper
        if isinstance(e.__cause__, ThawlabError):
            raise e.__cause__ from None
        raise
    dm.preprocess = preprocess  # set after: instantiate would turn the dataclass into a dict
    return dm


def build_module(cfg: DictConfig, net: ThawNet, dm, phases=None) -> FineTuner:
    dm.setup("fit")
    wise = phases is None and bool(cfg.schedule.get("alphas"))
    head_trained = bool(getattr(net.head, "starts_trained", False) or cfg.head.get("pretrained"))
    phases = phases or schedules.build_phases(cfg.schedule, list(net.groups), cfg.trainer.max_epochs,
                                              cfg.optimizer.layer_decay, head_trained=head_trained)
    if any(p.solver == "lbfgs" for p in phases):
        from thawlab.probe import check_run

        check_run(cfg, net, dm)
    if any(p.loss == "contrastive" for p in phases):
        if not callable(getattr(net.head, "refresh", None)):
            raise ThawlabError(f"schedule={cfg.schedule.name} trains with CLIP's contrastive loss and is evaluated "
                               f"with the zero-shot head of the updated text tower: use head=zeroshot")
        r = cfg.regularization
        if r.mixup or r.cutmix or r.label_smoothing:
            raise ThawlabError(f"schedule={cfg.schedule.name}: its contrastive loss pairs each image with a prompt "
                               f"of its class; regularization.mixup={r.mixup}, cutmix={r.cutmix} and "
                               f"label_smoothing={r.label_smoothing} act on a cross-entropy over class targets "
                               f"and would be ignored: set them to 0")
    return FineTuner(net, phases, OmegaConf.to_container(cfg.optimizer, resolve=True), dm.num_classes,
                     {"val": dm.eval_sets("val"), "test": dm.eval_sets("test")},
                     regularization=OmegaConf.to_container(cfg.regularization, resolve=True),
                     cache_features=cache_options(cfg, dm.train_transform_deterministic), keep_probe_weights=wise,
                     class_subsets=dm.class_subsets, channels_last=use_channels_last(cfg),
                     fail_rank=cfg.ddp.fail_rank if "ddp" in cfg else None, note=console.print)


def cache_options(cfg: DictConfig, deterministic: bool = True) -> dict:
    """cache_features as a plain dict {enabled, prefix, max_gb, disk_gb}, from the block or a bare bool
    (`cache_features=false`); off where the training inputs change every epoch (random augmentation). The
    frozen-prefix cache is also off under trainer.compile: it swaps modules' forwards, which a compiled graph
    would not see."""
    from thawlab.config import CacheConfig

    value = cfg.get("cache_features", True)
    if isinstance(value, bool):
        options = {**asdict(CacheConfig()), "enabled": value}
    elif isinstance(value, DictConfig):
        options = {**asdict(CacheConfig()), **OmegaConf.to_container(value, resolve=True)}
    else:
        raise ThawlabError(f"cache_features={value!r} must be true, false or a block such as "
                           f"cache_features.max_gb=4")
    options["enabled"] = options["enabled"] and deterministic
    if cfg.trainer.get("compile"):
        options["prefix"] = False
    return options


def build_monitor(cfg: DictConfig, net: ThawNet, dm) -> "diagnostics.DriftMonitor | None":
    """The run's drift diagnostics from `diagnostics.*` (None with diagnostics=none); dm is set up. Built before
    training: it keeps the network as it is now, theta_0."""
    d = cfg.get("diagnostics")
    if d is None or not d.enabled:
        return None
    diagnostics.check(d, cfg.trainer.max_epochs)
    names = diagnostics.check_sets(OmegaConf.to_container(d.sets) if d.sets is not None else None,
                                   dm.eval_sets("test"))
    return diagnostics.DriftMonitor(net, {n: dm.sets["test"][n] for n in names}, d.samples, cfg.seed, d.every,
                                    batch_size=cfg.data.eval_batch_size, channels_last=use_channels_last(cfg))


def use_channels_last(cfg: DictConfig) -> bool:
    """trainer.channels_last=auto: on a GPU (convolutions in NHWC run on tensor cores), not on a CPU."""
    value = cfg.trainer.get("channels_last", False)
    return on_gpu(cfg.trainer) if value == "auto" else bool(value)


def prepare_for_device(cfg: DictConfig, net: ThawNet) -> None:
    """Memory layout and compilation: trainer.channels_last, trainer.compile (torch.compile, in place: the
    state dict keeps its keys, so checkpoints and exports do not change)."""
    import torch

    if use_channels_last(cfg):
        net.to(memory_format=torch.channels_last)
    if cfg.trainer.get("compile"):
        net.compile()


# trainer.* keys thawlab applies itself; the rest are lightning.Trainer arguments
OWN_TRAINER_KEYS = ("channels_last", "compile")


def on_gpu(trainer_cfg: DictConfig) -> bool:
    import torch

    return trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto"
                                                          and torch.cuda.is_available())


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """precision=auto: bf16-mixed on a GPU that has bf16 (Ampere and later), else 32-true."""
    import torch

    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    return "bf16-mixed" if on_gpu(trainer_cfg) and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(trainer_cfg: DictConfig, run_dir: Path | None, logger, ddp: DictConfig | None = None,
                  early_stopping: DictConfig | None = None, select: str = "best", callbacks=(),
                  rules=(), **overrides) -> L.Trainer:
    """The Lightning Trainer. Data are split between DDP ranks by thawlab's own samplers (exact evaluation
    counts), so use_distributed_sampler is off; DDP processes are never started by Lightning (thawlab.ranks).
    select: schedule.select, the rule of the selected checkpoint (over the phases marked `select`).
    rules: selection.rules, the rules whose checkpoints are kept too (the primary one is not repeated).
    callbacks: more callbacks, run before the checkpoints (Lightning calls ModelCheckpoint last)."""
    from thawlab import ranks

    merged = OmegaConf.create({**OmegaConf.to_container(trainer_cfg, resolve=True), **overrides})
    kwargs = {k: v for k, v in OmegaConf.to_container(merged).items() if v is not None and k not in OWN_TRAINER_KEYS}
    kwargs["precision"] = resolve_precision(merged)
    callbacks = list(callbacks)
    if run_dir is not None:
        # the selected checkpoint first (trainer.checkpoint_callback; thawlab/selection.py), then last.ckpt,
        # written every epoch by a callback of its own: Lightning 2.6's save_last=True rewrites last.ckpt only in
        # epochs whose monitored metric improved, which would resume a killed run from a stale epoch
        callbacks.append(SelectCheckpoint(run_dir / "checkpoints", select))
        callbacks += [SelectCheckpoint(run_dir / "checkpoints", r, primary=False) for r in extra_rules(rules, select)]
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=LAST, monitor=None,
                                         save_top_k=1, enable_version_counter=False))
    if early_stopping is not None and early_stopping.patience is not None:
        callbacks.append(stopping.PhaseEarlyStopping(early_stopping.monitor, early_stopping.patience,
                                                     early_stopping.min_delta))
    plugins = []
    if ranks.world_size(OmegaConf.create({"trainer": merged})) > 1:
        from datetime import timedelta

        from lightning.pytorch.plugins.environments import LightningEnvironment
        from lightning.pytorch.strategies import DDPStrategy

        timeout = timedelta(seconds=ddp.timeout_s if ddp is not None else 1800)
        kwargs["strategy"] = DDPStrategy(timeout=timeout)
        if os.environ.get("THAWLAB_RANK_OF") or os.environ.get("SUBMITIT_EXECUTOR") == "local":
            plugins.append(LightningEnvironment())  # ranks from RANK/LOCAL_RANK, even inside a SLURM allocation
        if not ranks.started_by_cluster():
            raise ThawlabError("a multi-process Trainer outside a thawlab rank: start it with thawlab-train")
    return L.Trainer(logger=logger, callbacks=callbacks, default_root_dir=run_dir, plugins=plugins or None,
                     enable_checkpointing=run_dir is not None, enable_model_summary=False,
                     use_distributed_sampler=False, **kwargs)


def print_partition(net: ThawNet, phases) -> None:
    table = Table(title="Block groups (timm group_matcher) and when they train", title_justify="left")
    for col in ("group", "tensors", "parameters", *[f"{p.name} ({p.epochs} ep)" for p in phases]):
        table.add_column(col, justify="right" if col != "group" else "left")
    for g, tensors, params in net.partition_table():
        marks = [f"x{p.lr_mult.get(g, 1.0):.3g}" if g in p.trainable else "-" for p in phases]
        table.add_row(g, str(tensors), f"{params:,}", *marks)
    console.print(table)
    console.print("(xM: trains at M times optimizer.lr; -: frozen, BatchNorm in eval mode)")
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    body = sum(v for n, v in sizes.items() if n.startswith("backbone."))
    for p in phases:
        trains = net.trains(p)
        inside = sum(v for n, v in sizes.items() if trains[n] and n.startswith("backbone."))
        head = sum(v for n, v in sizes.items() if trains[n] and n.startswith("head."))
        text = sum(v for n, v in sizes.items() if trains[n] and n.startswith("text."))  # a CLIP text tower
        console.print(f"trainable parameters in {p.name}: {inside + head + text:,} = {inside:,} in the backbone "
                      f"({inside / max(body, 1):.2%} of its {body:,}) + {head:,} in the head"
                      + (f" + {text:,} in the text tower" if text else ""))


def print_metrics(metrics: dict[str, float], stage: str = "test", selected: str = f"on {SELECT[0]}") -> None:
    sets = sorted({k[len(stage) + 1:].rsplit("/", 1)[0] for k in metrics
                   if k.startswith(f"{stage}/") and not k.startswith((f"{stage}/wise/", f"{stage}/zeroshot/"))},
                  key=lambda s: (s != "id", s == "ood/mean", s == "source", s))
    table = Table(title=f"{stage} metrics (checkpoint selected {selected})", title_justify="left")
    for col in ("set", "acc %", "nll", "ece %"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for s in sets:
        m = lambda k: metrics.get(f"{stage}/{s}/{k}", float("nan"))  # noqa: E731
        table.add_row(s, f"{100 * m('acc'):.1f}", f"{m('nll'):.3f}", f"{100 * m('ece'):.1f}")
    out.print(table)


def print_wise(curve: list[dict]) -> None:
    table = Table(title="WiSE-FT: (1 - alpha) theta_0 + alpha theta_ft", title_justify="left")
    for col in ("alpha", "ID acc %", "OOD mean acc %"):
        table.add_column(col, justify="right")
    for point in curve:
        m, a = point["metrics"], f"{point['alpha']:g}"
        table.add_row(a, f"{100 * m[f'test/wise/{a}/id/acc']:.1f}",
                      f"{100 * m.get(f'test/wise/{a}/ood/mean/acc', float('nan')):.1f}")
    out.print(table)


def print_drift(entry: dict) -> None:
    """The drift of the selected checkpoint from the pretrained network (thawlab/diagnostics.py), per group."""
    sets = list(entry["cka"])
    ood = [s for s in sets if s.startswith("ood/")]
    table = Table(title=f"Drift from the pretrained network (epoch {entry['epoch']}): linear CKA and relative "
                        f"feature change ||f - f0|| / ||f0|| per block group output", title_justify="left")
    cols = [s for s in sets if not s.startswith("ood/")] + (["ood mean"] if ood else [])
    for col in ("output of", *[f"CKA {c}" for c in cols], *[f"change {c}" for c in cols], "weight change"):
        table.add_column(col, justify="left" if col == "output of" else "right")

    def cell(kind, col, g):
        names = ood if col == "ood mean" else [col]
        vals = [entry[kind][n].get(g) for n in names]
        return "-" if any(v is None for v in vals) else f"{sum(vals) / len(vals):.3f}"

    groups = list(entry["cka"][sets[0]]) if sets else []
    for g in groups:
        w = entry["weight_change"].get(g)
        table.add_row(g, *[cell("cka", c, g) for c in cols], *[cell("feature_change", c, g) for c in cols],
                      "-" if w is None else f"{w:.3f}")
    console.print(table)  # stderr, beside the partition table: what happened to the groups
    if entry["distortion"]:
        console.print("feature distortion (LP-FT), OOD / ID feature change at the pooled output: "
                  + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in entry["distortion"].items()))


def print_auto_lr(trace: list[dict]) -> None:
    """Auto-RGN / Auto-SNR: per epoch, each block group's mean lr multiplier (thawlab/auto_lr.py): which groups
    the gradient statistics chose."""
    rows = [t for t in trace if t.get("auto_lr")]
    if not rows:
        return
    groups = list(rows[0]["auto_lr"])
    table = Table(title="Automatic layer choice: mean lr multiplier of each group's tensors, per epoch",
                  title_justify="left")
    for col in ("epoch", *groups):
        table.add_column(col, justify="right")
    for t in rows:
        table.add_row(str(t["epoch"]), *[f"{t['auto_lr'].get(g, 0.0):.3g}" for g in groups])
    out.print(table)
