"""Every experiment config in experiments/ composes, passes thawlab's checks and builds its network and phases
(random init: nothing is downloaded), and each folder's README gives the command that uses it. The full-scale
configs cannot run here (hub weights, real data sets), so this is what keeps them from rotting."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from omegaconf import OmegaConf

from clip_fixtures import tiny_clip  # noqa: F401 (a fixture)
from conftest import compose_cfg
from thawlab import clip, schedules
from thawlab.build import build_datamodule, build_net, check_config
from thawlab.errors import ThawlabError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("*/experiment/*.yaml"))
FULL_SCALE = [p for p in CONFIGS if p.parent.parent.name != "strategies" and not p.stem.endswith(("_mini", "_source"))]


def compose_experiment(path: Path, *overrides: str):
    return compose_cfg([f"hydra.searchpath=[file://{path.parent.parent}]", f"experiment={path.stem}", "logger=none",
                        *overrides])


def test_every_paper_has_full_scale_configs_for_its_shifts():
    names = {p.stem for p in FULL_SCALE}
    assert {"lp_ft_cifar10", "lp_ft_imagenet", "wise_ft_cifar10", "wise_ft_imagenet", "surgical_cifar10c",
            "ulmfit_cifar10", "l2sp_cifar10", "peft_cifar10", "wise_ft_clip_imagenet", "flyp_imagenet",
            "lp_ft_clip_imagenet"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_config_composes_checks_and_builds(path, tmp_path, tiny_clip):
    cfg = compose_experiment(path, *([f"data.root={tmp_path}"] if path in FULL_SCALE else []))
    check_config(cfg)
    offline = OmegaConf.merge(cfg, {"backbone": {"pretrained": False}, "head": {"pretrained": False}})
    num_classes = 10
    if clip.is_clip(cfg.backbone.name) and path not in FULL_SCALE:
        # a mini-scale CLIP config: thawlab's embedded CLIP, pretrained on the source task, its zero-shot head from
        # the digits' names (built for real at random init: the embedded CLIP is small)
        assert cfg.backbone.name == "open_clip:thawlab-mini-clip" and cfg.backbone.pretrained == "source"
        assert cfg.head._target_.endswith("ZeroShotHead") and len(cfg.data.classnames) == 10
        num_classes = 10
        offline = OmegaConf.merge(offline, {"cache_dir": str(tmp_path / "cache")})
    elif clip.is_clip(cfg.backbone.name):
        # a CLIP config: its model and tag are real OpenCLIP ones (checked without downloading), then a tiny
        # stand-in of the same tower kind is built, with the config's class names and its first two templates
        # (ViT-B/16's text tower on 1,000 x 80 prompts would take minutes on a CPU)
        assert cfg.backbone.pretrained in open_clip.list_pretrained_tags_by_model(clip.model_name(cfg.backbone.name))
        assert len(cfg.data.templates) == 80 and len(cfg.data.classnames) == 1000
        num_classes = len(cfg.data.classnames)
        offline = OmegaConf.merge(offline, {"backbone": {"name": "open_clip:thawlab-test-vit"},
                                            "data": {"img_size": 32, "templates": list(cfg.data.templates[:2])},
                                            "cache_dir": str(tmp_path / "cache")})
    net, _ = build_net(offline, num_classes=num_classes, pretrained=False)
    head_trained = bool(getattr(net.head, "starts_trained", False))
    phases = schedules.build_phases(cfg.schedule, list(net.groups), cfg.trainer.max_epochs, cfg.optimizer.layer_decay,
                                    head_trained=head_trained)
    assert sum(p.epochs for p in phases) == cfg.trainer.max_epochs
    if path in FULL_SCALE:
        # timm weights (or an OpenCLIP tag), a real data set whose options are valid: with no files here, the
        # error lists the files
        assert (cfg.backbone.pretrained is True or str(cfg.backbone.pretrained).endswith("model.safetensors")
                or clip.is_clip(cfg.backbone.name))
        assert cfg.data._target_ != "thawlab.data.digits.DigitsTarget"
        with pytest.raises(ThawlabError, match="missing"):
            build_datamodule(cfg.data, None).check()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_readme_gives_the_command_of_each_config(path):
    readme = (path.parent.parent / "README.md").read_text()
    assert f"experiment={path.stem}" in readme, f"{path.parent.parent.name}/README.md never runs {path.stem}"


def test_the_clip_recipes_are_the_papers():
    """WiSE-FT's (mlfoundations/wise-ft) and FLYP's (locuslab/FLYP) ImageNet runs as their code has them:
    zero-shot CLIP ViT-B/16 openai, AdamW (torch's betas and eps) with weight decay 0.1 on every parameter, batch
    512, 10 epochs, cosine after exactly 500 steps of warm-up, clip.load's train crop (90-100%, bicubic, no flip);
    WiSE-FT at lr 3e-5 with clipping 1.0 and no probe (theta_0 the zero-shot model), FLYP at 1e-5 training the
    text tower too, without clipping."""
    steps_per_epoch = (1_281_167 - 10_000) // 512
    for name, lr in (("wise_ft/experiment/wise_ft_clip_imagenet.yaml", 3e-5), ("flyp/experiment/flyp_imagenet.yaml", 1e-5)):
        cfg = compose_experiment(EXPERIMENTS / name)
        assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.head._target_) == (
            "open_clip:ViT-B-16", "openai", "thawlab.zeroshot.ZeroShotHead")
        o = cfg.optimizer
        assert (o.name, o.lr, o.weight_decay, o.no_decay_exemptions, o.schedule) == ("adamw", lr, 0.1, False, "cosine")
        assert (list(o.betas), o.eps) == ([0.9, 0.999], 1e-8)
        assert int(o.warmup_epochs * steps_per_epoch) == 500  # as schedules.shape_at counts warm-up steps
        assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.data.augment, cfg.data.crop_pct) == (
            512, 10, "clip_crop", 1.0)
        assert cfg.trainer.gradient_clip_val == (1.0 if cfg.schedule.name == "wise_ft" else None)
        phases = schedules.build_phases(cfg.schedule, ["stem", "blocks.0", "head", "text"], 10, head_trained=True)
        trains = [g for p in phases for g in p.trainable]
        assert len(phases) == 1 and ("text" in trains) == (cfg.schedule.name == "flyp")


def test_the_lp_ft_clip_recipe_is_the_authors():
    """AnanyaKumar/transfer_learning's ImageNet CLIP ViT-B/16 LP-FT: a new linear probe, 5 epochs at lr 0.1, then
    10 epochs of fine-tuning at 3e-5 (of its 1e-5 / 3e-5 / 1e-4 sweep), SGD momentum 0.9, no weight decay, batch
    128, cosine without warm-up, no augmentation, the best ft epoch on ID validation."""
    cfg = compose_experiment(EXPERIMENTS / "lp_ft/experiment/lp_ft_clip_imagenet.yaml")
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.head._target_) == (
        "open_clip:ViT-B-16", "openai", "thawlab.heads.LinearHead")
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, o.warmup_epochs) == ("sgd", 3e-5, 0.9, 0.0,
                                                                                        "cosine", 0.0)
    assert (cfg.data.batch_size, cfg.data.augment, cfg.data.crop_pct, cfg.trainer.max_epochs) == (128, "none", 1.0, 15)
    lp, ft = schedules.build_phases(cfg.schedule, ["stem", "blocks.0", "head"], cfg.trainer.max_epochs)
    assert (lp.name, lp.epochs, lp.trainable, ft.name, ft.epochs) == ("lp", 5, ("head",), "ft", 10)
    assert o.lr * lp.lr_mult["head"] == pytest.approx(0.1, rel=1e-5) and ft.lr_mult["head"] == 1.0
    assert (cfg.schedule.select, list(cfg.schedule.select_phases)) == ("best", ["ft"])


def test_l2sp_recipe_drops_the_lr_at_iteration_5000_of_9000():
    cfg = compose_experiment(EXPERIMENTS / "l2sp" / "experiment" / "l2sp_cifar10.yaml")
    steps_per_epoch = 45_000 // cfg.data.batch_size  # 500 of CIFAR-10's 5,000 images per class held out
    phases = schedules.build_phases(cfg.schedule, ["stem", "head"], cfg.trainer.max_epochs)
    shape = {**OmegaConf.to_container(cfg.optimizer), "name": cfg.optimizer.schedule}
    lr = [schedules.lr_factor(phases, "stem", t, steps_per_epoch, shape) for t in (0, 4999, 5000, 9000)]
    assert lr == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert 9000 <= steps_per_epoch * cfg.trainer.max_epochs < 9000 + steps_per_epoch


def test_a_full_scale_config_runs_end_to_end_on_a_small_copy(run, tmp_path):
    """lp_ft_cifar10 as written (ResNet-50, SGD, its OOD sets) under debug=smoke, on a fake CIFAR-10 in the
    official formats: random init (no hub here) and 32x32 inputs keep it to seconds."""
    from test_datasets import make_cifar

    make_cifar(tmp_path / "data")
    r = run(f"hydra.searchpath=[file://{EXPERIMENTS / 'lp_ft'}]", "experiment=lp_ft_cifar10", "schedule=lp_ft",
            f"data.root={tmp_path / 'data'}", "backbone.pretrained=false", "data.img_size=32", "data.val_per_class=1",
            "data.num_workers=0")
    assert r["status"] == "done" and r["config"]["backbone"]["name"] == "resnet50.tv_in1k"
    assert {"test/ood/stl10/acc", "test/ood/cifar10_1/acc"} <= set(r["metrics"])
    assert [p["phase"] for p in r["trace"]] == ["lp", "ft", "ft"]  # debug=smoke: 3 epochs


ROBUST_FT = EXPERIMENTS / "robust_ft"
METHODS = {  # method -> (schedule, probe solver, projection, L2-SP alpha)
    "probe": ("frozen", "lbfgs", None, 0.0), "ft": ("full", "adamw", None, 0.0), "l2sp": ("full", "adamw", None, 0.1),
    "lp_ft": ("lp_ft", "lbfgs", None, 0.0), "wise_ft": ("wise_ft", "adamw", None, 0.0),
    "flyp": ("flyp", "adamw", None, 0.0), "ftp": ("full", "adamw", "ftp", 0.0), "spd": ("full", "adamw", "spd", 0.0),
    "tpgm": ("full", "adamw", "tpgm", 0.0)}


def test_robust_ft_is_one_multirun_over_every_method():
    """experiments/robust_ft: the method is a config group of the folder; each composes with the experiment into
    the schedule and regularization it names, and the README's sweep runs every one."""
    assert sorted(p.stem for p in (ROBUST_FT / "method").glob("*.yaml")) == sorted(METHODS)
    for method, (schedule, solver, projection, alpha) in METHODS.items():
        cfg = compose_experiment(ROBUST_FT / "experiment" / "robust_ft_mini.yaml", f"+method={method}")
        check_config(cfg)
        got = (cfg.schedule.name, cfg.schedule.get("solver"), cfg.regularization.get("projection"),
               cfg.regularization.l2sp_alpha)
        assert got == (schedule, solver, projection, alpha), method
        assert cfg.backbone.name == "open_clip:thawlab-mini-clip" and cfg.head._target_.endswith("ZeroShotHead")
    readme = (ROBUST_FT / "README.md").read_text()
    # the README's thawlab-train commands, continuation lines joined (the report command names methods too)
    commands = [c for c in readme.replace("\\\n", " ").splitlines() if c.startswith("thawlab-train")]
    swept = {m for c in commands for part in c.split()[1:] if part.startswith("+method=")
             for m in part.removeprefix("+method=").split(",")}
    assert swept == set(METHODS), swept
