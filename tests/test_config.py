"""Every config option composes; the schema rejects wrong types; bad input is one line, exit 2, no traceback."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import compose_cfg, cli
from thawlab.build import check_config
from thawlab.config import Range, check_values, numeric_fields, schema_classes
from thawlab.errors import ThawlabError
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
    # the console script in a new interpreter, as installed (the other CLI tests fork one that has imported thawlab)
    r = cli("--cfg", "job", "schedule=lp_ft", "backbone.name=resnet18", cwd=tmp_path, cache=cache_dir, fresh=True)
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


# ---- every numeric key in its range --------------------------------------------------------------------------
def _bad_values(rng: Range, kind: type) -> list:
    """Values just outside a declared range: below the lower bound, above the upper one."""
    if rng.batches:
        return [-1, 1.5]
    out = []
    if not math.isinf(rng.lo):
        out.append(rng.lo if rng.lo_open else rng.lo - 1)
    if not math.isinf(rng.hi):
        out.append(rng.hi if rng.hi_open else rng.hi + 1)
    return [kind(v) for v in out]


def _numeric_keys(node, prefix=""):
    """(dotted key, schema class, field, range, int or float, list) for every numeric key of a composed config."""
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return
    ranges = numeric_fields(cls)
    for f in dataclasses.fields(cls):
        if f.name in ranges:
            yield (f"{prefix}{f.name}", cls, f.name, *ranges[f.name])
        elif f.name in node and isinstance(node._get_node(f.name), DictConfig) and isinstance(node[f.name], DictConfig):
            yield from _numeric_keys(node[f.name], f"{prefix}{f.name}.")


def test_every_numeric_key_of_the_schema_declares_a_range():
    classes = schema_classes()
    assert {"TrainerConfig", "DDPConfig", "OptimizerConfig", "DigitsConfig", "Cifar10CConfig", "LoRAConfig",
            "PretrainConfig", "DigitsSourceConfig", "EarlyStoppingConfig"} <= {c.__name__ for c in classes}
    declared = {(c.__name__, name) for c in classes for name in numeric_fields(c)}  # raises for a missing range
    assert ("OptimizerConfig", "lr") in declared and ("TrainerConfig", "limit_val_batches") in declared

    @dataclasses.dataclass
    class NewKey:  # a key added without a range: the walker refuses it
        ratio: float = 0.5

    with pytest.raises(TypeError, match="NewKey.ratio: a numeric config key declares no range"):
        numeric_fields(NewKey)


def test_an_out_of_range_value_of_every_key_is_one_line_naming_key_value_and_range():
    """Every option of every config group composed; every numeric key set just outside its range in turn."""
    tried, wanted, seen = set(), set(), set()
    for group, options in GROUPS.items():
        for option in options:
            cfg = compose_cfg([f"{group}={option}"])
            check_values(cfg)  # the defaults pass
            for key, cls, name, rng, kind, is_list in _numeric_keys(cfg):
                if (key, cls) in seen:  # the same key of the same schema in an earlier option's config
                    continue
                seen.add((key, cls))
                bad_values = _bad_values(rng, kind)
                if bad_values:
                    wanted.add((cls.__name__, name))
                good = copy.deepcopy(OmegaConf.select(cfg, key))
                for bad in bad_values:
                    OmegaConf.update(cfg, key, [bad] if is_list else bad)
                    with pytest.raises(ThawlabError) as e:
                        check_values(cfg)
                    msg, shown = str(e.value), str(OmegaConf.select(cfg, key) if not is_list else bad)
                    assert msg.startswith(f"{key}=") and shown in msg and "\n" not in msg, (key, bad, msg)
                    assert rng.describe(kind is int) in msg, msg
                    tried.add((cls.__name__, name))
                OmegaConf.update(cfg, key, good)
                check_values(cfg)
    everything = {(c.__name__, name) for c in schema_classes() for name, (rng, kind, _) in numeric_fields(c).items()
                  if _bad_values(rng, kind)}
    assert tried == wanted == everything, sorted(everything - tried)
    assert len(tried) > 90


def test_check_config_checks_ranges_first(tmp_path):
    with pytest.raises(ThawlabError, match=r"^optimizer\.lr=-0\.001 must be >= 0$"):
        check_config(compose_cfg(["optimizer.lr=-0.001", "backbone.name=no_such_model"]))
    with pytest.raises(ThawlabError, match=r"^optimizer\.lr=-0\.001 must be >= 0$"):  # the task config as run
        check_config(compose_cfg(["optimizer.lr=-0.001"], tmp_path))
    with pytest.raises(ThawlabError, match=r"^seed=-1 is outside \[0, 4294967295\]$"):  # a key of the root
        check_config(compose_cfg(["seed=-1"], tmp_path))


CLI_BAD = [
    (["optimizer.lr=-0.001"], ["optimizer.lr=-0.001 must be >= 0"]),
    (["data.batch_size=0"], ["data.batch_size=0 must be a positive integer"]),
    (["trainer.limit_val_batches=1.5"], ["trainer.limit_val_batches=1.5", "a fraction (a float in [0, 1])"]),
    (["backbone.name=vit_tiny_patch16_224"],
     ["backbone.name=vit_tiny_patch16_224 takes 224x224 inputs only", "data.img_size=32",
      "+backbone.kwargs.img_size=32 +backbone.kwargs.patch_size=4", "or data.img_size=224"]),
    (["data=cifar10"], ["data.root=", "no such directory", "$THAWLAB_DATA", "data.download=true fetches it",
                        "cifar-10-batches-py/{data_batch_1"]),
]


@pytest.mark.parametrize("overrides,needles", CLI_BAD, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_cli_bad_values_fail_before_anything_runs(tmp_path, overrides, needles):
    """Through the real CLI, with backbone.pretrained=source (the default): one line, exit 2, in seconds,
    and nothing made in the cache (no pretraining started, no directory holding only a lock)."""
    cache = tmp_path / "cache"
    start = time.time()
    r = cli(*overrides, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=str(cache),
            env={"THAWLAB_DATA": str(tmp_path / "no-data")})
    _one_line_error(r, *needles)
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))
    assert "pretraining" not in r.stderr and time.time() - start < 60


def test_a_failed_pretraining_leaves_no_cache_directory(tmp_path, monkeypatch):
    from thawlab import pretrain

    cfg = compose_cfg(["debug=smoke", f"cache_dir={tmp_path}"])

    def fails(cfg, out):
        (out / "weights.safetensors").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(pretrain, "_pretrain", fails)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain.source_weights(cfg)
    assert not pretrain.cache_dir(cfg).exists() and list((tmp_path / "pretrain").iterdir()) == []

    def works(cfg, out):
        (out / "weights.safetensors").write_text("w")
        (out / "meta.json").write_text('{"source_test_acc": 1.0}')

    monkeypatch.setattr(pretrain, "_pretrain", works)
    assert pretrain.source_weights(cfg).read_text() == "w"  # the next run starts afresh and caches
    assert sorted(p.name for p in pretrain.cache_dir(cfg).iterdir()) == [".lock", "done", "meta.json",
                                                                        "weights.safetensors"]


@pytest.mark.parametrize("name,kwargs,size,needle", [
    ("vit_tiny_patch16_224", {}, 32, "+backbone.kwargs.img_size=32 +backbone.kwargs.patch_size=4 or data.img_size=224"),
    ("vit_tiny_patch16_224", {"img_size": 64}, 32, "takes 64x64 inputs only (fixed by its patch embedding)"),
    ("swin_tiny_patch4_window7_224", {}, 64, "+backbone.kwargs.img_size=64 +backbone.kwargs.patch_size=8"),
    ("pit_ti_224", {}, 32, "takes 224x224 inputs only (fixed by its timm config)"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32, None),
    ("vit_tiny_patch16_224", {"dynamic_img_size": True}, 32, None),
    ("resnet18", {}, 32, None),
    ("test_vit", {}, 32, None),
])
def test_a_fixed_input_size_that_differs_from_the_data_is_caught_with_its_fix(name, kwargs, size, needle):
    """On the meta device, before any weights or pretraining; the suggested override itself runs."""
    from thawlab.backbone import check_input_size

    if needle is None:
        check_input_size(name, kwargs, size)
        return
    with pytest.raises(ThawlabError) as e:
        check_input_size(name, kwargs, size)
    assert needle in str(e.value) and f"data.img_size={size}" in str(e.value), str(e.value)


def test_a_key_of_swept_options_only_says_to_run_one_sweep_per_option(tmp_path):
    """Hydra composes a multirun once with the group's default option before sweeping it, so a key that only
    the swept options have (schedule.train_head of auto_rgn and auto_snr) fails there: one line that says so."""
    r = cli("-m", "schedule=auto_rgn,auto_snr", "schedule.train_head=false", "logger=none",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, cache=str(tmp_path / "cache"))
    _one_line_error(r, "schedule.train_head", "a sweep over schedule=auto_rgn,auto_snr", "run one sweep per option",
                    "schedule=auto_rgn schedule.train_head=...")
