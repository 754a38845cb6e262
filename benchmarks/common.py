"""Shared by the benchmarks: thawlab's real config, composed as `thawlab-train` would."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from thawlab import config
from thawlab.train import conf_dir

sys.path.insert(0, str(Path(__file__).parent))


def compose_cfg(overrides: list[str]):
    config.register()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


def plain_optimizer(cfg, net, phases, steps_per_epoch: int):
    """(optimizer, per-step LambdaLR) of a hand-written loop: thawlab's named groups, its optimizer and the lr
    shape of `phases`, nothing else: what the benchmarks compare thawlab's Trainer path with."""
    import functools

    import torch

    from thawlab.module import OPTIMIZERS, SHAPE_KEYS
    from thawlab.schedules import lr_factor

    groups = [{"params": ps, "name": g} for g, ps in net.named_group_parameters().items()]
    c = dict(cfg.optimizer)
    opt = OPTIMIZERS[c["name"]](groups, c)
    shape = {"name": c["schedule"], **{k: c[k] for k in SHAPE_KEYS}}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [functools.partial(
        lr_factor, phases, g["name"], steps_per_epoch=steps_per_epoch, shape=shape) for g in groups])
    return opt, sched

