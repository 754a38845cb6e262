"""Build the objects of a run from its config: network, data, phases, module, trainer."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from thawlab import backbone as bb
from thawlab import schedules
from thawlab.data.digits import Preprocess
from thawlab.model import ThawNet
from thawlab.errors import ThawlabError, did_you_mean
from thawlab.module import OPTIMIZERS, FineTuner

console = Console(stderr=True)
SELECT = ("val/id/acc", "max")  # model selection: the checkpoint with the best ID validation accuracy


def check_config(cfg: DictConfig) -> None:
    """Values the schema cannot check by type, checked before anything slow (pretraining) starts."""
    bb.check_name(cfg.backbone.name)
    schedules.check(cfg.schedule, cfg.trainer.max_epochs)
    for key, value, choices in (("optimizer.name", cfg.optimizer.name, OPTIMIZERS),
                                ("optimizer.schedule", cfg.optimizer.schedule, schedules.LR_SHAPES)):
        if value not in choices:
            raise ThawlabError(f"{key}={value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")


def build_net(cfg: DictConfig, num_classes: int, pretrained) -> tuple[ThawNet, Preprocess]:
    b = cfg.backbone
    model = bb.create_backbone(b.name, pretrained, OmegaConf.to_container(b.kwargs))
    dc = bb.data_config(model)
    preprocess = Preprocess(img_size=cfg.data.img_size, in_chans=int(dc["input_size"][0]),
                            mean=tuple(dc["mean"]), std=tuple(dc["std"]))
    head = instantiate(cfg.head, in_features=model.num_features, num_classes=num_classes)
    return ThawNet(model, head, bb.block_groups(model, b.coarse_groups)), preprocess


def build_datamodule(data_cfg: DictConfig, preprocess: Preprocess, task: str = "target") -> L.LightningDataModule:
    """task=target: the data set's own task; task=source: its pretraining task (data.source)."""
    node = data_cfg.source if task == "source" else data_cfg
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k not in ("source", "pretrain", "img_size")}
    return instantiate(kwargs, preprocess=preprocess, _convert_="all")


def build_module(cfg: DictConfig, net: ThawNet, dm, phases=None) -> FineTuner:
    dm.setup("fit")
    phases = phases or schedules.build_phases(cfg.schedule, list(net.groups), cfg.trainer.max_epochs)
    return FineTuner(net, phases, OmegaConf.to_container(cfg.optimizer, resolve=True), dm.num_classes,
                     {"val": dm.eval_sets("val"), "test": dm.eval_sets("test")})


def build_trainer(trainer_cfg: DictConfig, run_dir: Path | None, logger, **overrides) -> L.Trainer:
    kwargs = {k: v for k, v in OmegaConf.to_container(trainer_cfg, resolve=True).items() if v is not None}
    callbacks = []
    if run_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-epoch{epoch}",
                                         auto_insert_metric_name=False, monitor=SELECT[0], mode=SELECT[1],
                                         save_last=True, save_top_k=1))
    kwargs.update(overrides)
    return L.Trainer(logger=logger, callbacks=callbacks, default_root_dir=run_dir,
                     enable_checkpointing=run_dir is not None, enable_model_summary=False, **kwargs)


def print_partition(net: ThawNet, phases) -> None:
    table = Table(title="Block groups (timm group_matcher) and when they train", title_justify="left")
    for col in ("group", "tensors", "parameters", *[f"{p.name} ({p.epochs} ep)" for p in phases]):
        table.add_column(col, justify="right" if col != "group" else "left")
    for g, tensors, params in net.partition_table():
        marks = [f"x{p.lr_mult.get(g, 1.0):.3g}" if g in p.trainable else "-" for p in phases]
        table.add_row(g, str(tensors), f"{params:,}", *marks)
    console.print(table)
    console.print("(xM: trains at M times optimizer.lr; -: frozen, BatchNorm in eval mode)")


def print_metrics(metrics: dict[str, float], stage: str = "test") -> None:
    sets = sorted({k.split("/", 1)[1].rsplit("/", 1)[0] for k in metrics if k.startswith(f"{stage}/")},
                  key=lambda s: (s != "id", s == "ood/mean", s))
    table = Table(title=f"{stage} metrics (checkpoint selected on {SELECT[0]})", title_justify="left")
    for col in ("set", "acc %", "nll", "ece %"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for s in sets:
        m = lambda k: metrics.get(f"{stage}/{s}/{k}", float("nan"))  # noqa: E731
        table.add_row(s, f"{100 * m('acc'):.1f}", f"{m('nll'):.3f}", f"{100 * m('ece'):.1f}")
    Console().print(table)
