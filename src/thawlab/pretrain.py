"""thawlab's own pretraining on a data set's source task (backbone.pretrained=source).

No machine here reaches a model hub, so the embedded benchmark pretrains its backbone itself: full training
from random init on the source task, run once and cached under `cache_dir/pretrain/<arch>-<key>`, where the key
hashes everything that determines the weights (architecture, timm kwargs, source data, recipe, input size).
Concurrent sweep jobs wait on a file lock instead of pretraining twice. The weights file is a plain timm state
dict, source classifier included, so it loads with `pretrained_cfg_overlay=dict(file=...)` like any local file.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from thawlab.backbone import classifier_of, timm_state_dict
from thawlab.build import build_datamodule, build_module, build_net, build_trainer, console
from thawlab.metrics import evaluate
from thawlab.results import atomic_write_json
from thawlab.schedules import Phase
from thawlab.source_cache import META, WEIGHTS, check_source, run_cached  # noqa: F401 (META, WEIGHTS: public here too)

RECIPE_VERSION = 2  # bump when the pretraining code changes what it produces


def cache_key(cfg: DictConfig) -> str:
    spec = {"version": RECIPE_VERSION, "backbone": cfg.backbone.name,
            "kwargs": OmegaConf.to_container(cfg.backbone.kwargs, resolve=True),
            "source": OmegaConf.to_container(cfg.data.source, resolve=True),
            "pretrain": OmegaConf.to_container(cfg.data.pretrain, resolve=True), "img_size": cfg.data.img_size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / "pretrain" / f"{cfg.backbone.name}-{cache_key(cfg)}"


def source_weights(cfg: DictConfig, force: bool = False) -> Path:
    """Path of the cached source-pretrained weights for this config, pretraining first if needed."""
    if str(cfg.backbone.name).startswith("open_clip:"):
        # the one dispatch on the backbone's kind: an OpenCLIP model pretrains both towers contrastively on
        # captions made from the source labels (thawlab.clip_pretrain); same cache layout, lock and marker
        from thawlab import clip_pretrain

        return clip_pretrain.source_weights(cfg, force)
    check_source(cfg)
    return run_cached(cache_dir(cfg), force, lambda out: _pretrain(cfg, out))


def _pretrain(cfg: DictConfig, out: Path) -> None:
    p = cfg.data.pretrain
    data = cfg.data._target_.rsplit(".", 1)[-1]
    console.print(f"[bold]pretraining {cfg.backbone.name} on the source task of {data}[/] "
                  f"({p.epochs} epochs, once; cached in {out})")
    start = time.time()
    with torch.random.fork_rng():
        L.seed_everything(p.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg.data, None, task="source", shuffle_seed=p.seed)
        net, preprocess = build_net(_linear_head(cfg), dm.num_classes, pretrained=False, adapters=False)
        dm.preprocess = preprocess
        everything = Phase("pretrain", p.epochs, tuple(net.groups), {}, "train")
        module = build_module(_pretrain_cfg(cfg), net, dm, phases=[everything])
        trainer = build_trainer(cfg.trainer, None, False, max_epochs=p.epochs, devices=1, num_nodes=1,
                                strategy="auto", limit_train_batches=None, gradient_clip_val=None,
                                limit_val_batches=None, limit_test_batches=None)
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
    acc = module.computed["test"]["test/id/acc"]
    save_file(timm_state_dict(net.backbone, net.head.fc), str(out / WEIGHTS))
    atomic_write_json(out / META, {"backbone": cfg.backbone.name, "source_classes": dm.num_classes,
                                   "source_test_acc": acc, "seconds": round(time.time() - start, 1),
                                   "config": OmegaConf.to_container(cfg.data, resolve=True)})
    console.print(f"pretraining done in {time.time() - start:.0f}s: source test acc {100 * acc:.1f}%")


def source_retention(cfg: DictConfig, net, preprocess, weights: Path) -> dict[str, float]:
    """Forgetting: the fine-tuned backbone with the original source head on the source test set
    (`test/source/*`), next to the pretrained model's own figure (`pretrain/source/acc`)."""
    if str(cfg.backbone.name).startswith("open_clip:"):  # no source head: the pretrained text tower's instead
        from thawlab import clip_pretrain

        return clip_pretrain.source_retention(cfg, net, preprocess, weights)
    dm = build_datamodule(cfg.data, preprocess, task="source", shuffle_seed=cfg.data.pretrain.seed)
    dm.setup("test")
    model = nn.Sequential(net.backbone, classifier_of(load_file(str(weights)), net.backbone))
    loaders = {"source": dm.eval_dataloaders("test")["id"]}
    values = evaluate(model, loaders, dm.num_classes, "test")
    meta = json.loads((Path(weights).parent / META).read_text())
    return {**values, "pretrain/source/acc": float(meta["source_test_acc"])}


def _linear_head(cfg: DictConfig) -> DictConfig:
    """The source head is linear whatever head the fine-tuning uses: it becomes timm's own classifier."""
    c = cfg.copy()
    OmegaConf.set_struct(c, False)
    c.head = {"_target_": "thawlab.heads.LinearHead"}
    c.backbone.drop_path_rate = 0.0  # the pretraining recipe does not move with the fine-tuning's regularisers
    return c


def _pretrain_cfg(cfg: DictConfig) -> DictConfig:
    """The pretraining recipe, whatever the fine-tuning's optimizer and regularisation."""
    c = OmegaConf.merge(cfg, {"optimizer": {"name": "adamw", "lr": cfg.data.pretrain.lr,
                                            "weight_decay": cfg.data.pretrain.weight_decay, "layer_decay": 1.0,
                                            "schedule": "cosine", "warmup_epochs": 0.0,
                                            "no_decay_exemptions": False},  # the recipe cached weights had
                              "regularization": {"l2sp_alpha": 0.0, "l2sp_beta": 0.0, "label_smoothing": 0.0,
                                                 "mixup": 0.0, "cutmix": 0.0, "projection": None}})
    OmegaConf.update(c, "cache_features", False, merge=False)  # a bool replaces the block (build.cache_options)
    return c
