"""Every experiment config in experiments/ composes, passes thawlab's checks and builds its network and phases
(random init: nothing is downloaded), and each folder's README gives the command that uses it. The full-scale
configs cannot run here (hub weights, real data sets), so this is what keeps them from rotting."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from thawlab import schedules
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
            "ulmfit_cifar10", "l2sp_cifar10", "peft_cifar10"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_config_composes_checks_and_builds(path, tmp_path):
    cfg = compose_experiment(path, *([f"data.root={tmp_path}"] if path in FULL_SCALE else []))
    check_config(cfg)
    offline = OmegaConf.merge(cfg, {"backbone": {"pretrained": False}, "head": {"pretrained": False}})
    net, _ = build_net(offline, num_classes=10, pretrained=False)
    phases = schedules.build_phases(cfg.schedule, list(net.groups), cfg.trainer.max_epochs, cfg.optimizer.layer_decay)
    assert sum(p.epochs for p in phases) == cfg.trainer.max_epochs
    if path in FULL_SCALE:
        # timm weights, a real data set whose options are valid: with no files here, the error lists the files
        assert cfg.backbone.pretrained is True or str(cfg.backbone.pretrained).endswith("model.safetensors")
        assert cfg.data._target_ != "thawlab.data.digits.DigitsTarget"
        with pytest.raises(ThawlabError, match="missing"):
            build_datamodule(cfg.data, None).check()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_readme_gives_the_command_of_each_config(path):
    readme = (path.parent.parent / "README.md").read_text()
    assert f"experiment={path.stem}" in readme, f"{path.parent.parent.name}/README.md never runs {path.stem}"


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
