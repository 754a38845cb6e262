"""Every config option composes; the schema rejects wrong types; bad input is one line, exit 2, no traceback."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg, cli
from thawlab.schedules import STRATEGIES
from thawlab.train import conf_dir

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in Path(conf_dir()).iterdir() if g.is_dir()}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.schedule.name in STRATEGIES


def test_public_keys_exist_with_documented_defaults():
    cfg = compose_cfg([])
    assert cfg.backbone.name == "test_resnet" and cfg.backbone.pretrained == "source"
    assert cfg.data._target_.endswith("DigitsTarget") and cfg.head._target_.endswith("LinearHead")
    for key in ("seed", "trainer.max_epochs", "trainer.devices", "trainer.accelerator", "backbone.kwargs"):
        assert OmegaConf.select(cfg, key) is not None, key
    assert set(GROUPS["schedule"]) == set(STRATEGIES)
    assert set(GROUPS["head"]) >= {"linear", "mlp", "cosine"}
    assert set(GROUPS["logger"]) >= {"wandb", "csv", "none"}


def test_schema_rejects_wrong_types_when_composing():
    with pytest.raises(Exception, match="max_epochs"):
        compose_cfg(["trainer.max_epochs=abc"])
    with pytest.raises(Exception, match="lr"):
        compose_cfg(["optimizer.lr=fast"])
    with pytest.raises(Exception, match="train_per_class"):
        compose_cfg(["data.train_per_class=2.5"])


def test_cli_cfg_job_and_help(tmp_path, cache_dir):
    r = cli("--cfg", "job", "schedule=lp_ft", "backbone.name=resnet18", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.schedule.name == "lp_ft" and cfg.backbone.name == "resnet18"
    r = cli("--help", cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 0
    line = next(line for line in r.stdout.splitlines() if line.startswith("schedule: "))
    assert line == "schedule: " + ", ".join(sorted(STRATEGIES)), line


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("thawlab-train: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "\n" not in errors[0]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


BAD_INPUT = [
    (["trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
    (["schedule=lp-ft"], ["schedule", "lp-ft", "did you mean lp_ft"]),
    (["head=linaer"], ["head", "linaer", "did you mean linear"]),
    (["backbone.name=resnet181"], ["resnet181", "did you mean"]),
    (["backbone.pretrained=/no/such/weights.safetensors"], ["/no/such/weights.safetensors", "does not exist"]),
    (["schedule.bn=sometimes"], ["schedule.bn", "sometimes"]),
    (["schedule=surgical", "schedule.groups=[9]", "backbone.pretrained=false"],
     ["schedule.groups", "index 9 is out of range", "-5..4"]),
    (["schedule=lora", "schedule.target_modules=[nope]", "backbone.pretrained=false"],
     ["schedule.target_modules", "nope", "matches no module of test_resnet"]),
    (["optimizer.layer_decay=1.5"], ["optimizer.layer_decay=1.5", "(0, 1]"]),
    (["optimizer.cut_frac=1.5"], ["optimizer.cut_frac=1.5", "(0, 1)"]),
    (["schedule=fine_tune", "schedule.spread=layers"], ["schedule.spread='layers'", "fastai, blocks"]),
    (["schedule=wise_ft", "schedule.alphas=[0,0.5,2]"], ["schedule.alphas", "2", "outside [0, 1]"]),
    (["ckpt_path=last"], ["ckpt_path=last", "does not exist"]),
    (["head.dropout=1.0"], ["head.dropout=1.0", "outside [0, 1)"]),
    (["early_stopping.patience=2", "early_stopping.monitor=val/id/f1"], ["early_stopping.monitor", "val/id/f1"]),
    (["backbone.name=vgg11", "backbone.pretrained=false", "backbone.drop_path_rate=0.1"],
     ["backbone.drop_path_rate", "'vgg11' does not take"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_INPUT, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2(tmp_path, cache_dir, overrides, needles):
    r = cli(*overrides, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=cache_dir)
    _one_line_error(r, *needles)
    results = tmp_path / "run" / "results.json"
    if results.exists():  # errors found once the run started: marked failed, never done
        assert json.loads(results.read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "done").exists()


def test_hub_weights_offline_fail_fast_and_name_the_alternative(tmp_path, cache_dir):
    start = time.time()
    r = cli("backbone.name=resnet18", "backbone.pretrained=true", "logger=none", f"hydra.run.dir={tmp_path}/run",
            cwd=tmp_path, cache=cache_dir, env={"HF_HUB_OFFLINE": ""})
    line = _one_line_error(r, "resnet18", "backbone.pretrained=/path/to/file")
    assert time.time() - start < 60, "offline answer must come within seconds, not after a retry loop"
    assert "huggingface.co" in line
