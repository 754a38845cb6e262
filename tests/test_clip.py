"""CLIP-family backbones through OpenCLIP (thawlab.clip), the zero-shot head (thawlab.zeroshot), WiSE-FT and LP-FT
from it, FLYP. Every model here is a tiny OpenCLIP config (32 px, width 32-64, 1-2 layers) created from a random
initialisation and saved to a local file: nothing is downloaded."""
from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch

from clip_fixtures import NAMES, PROMPTS, TEMPLATES, tiny_clip  # noqa: F401 (a fixture)
from conftest import BASE, TRAIN, KillAfter, Killed, add_callbacks, compose_cfg
from thawlab import backbone as bb
from thawlab import clip
from thawlab.build import build_net, check_config
from thawlab.errors import ThawlabError
from thawlab.results import read_results
from thawlab.zeroshot import ZeroShotHead

def clip_args(tiny_clip, name="thawlab-test-vit") -> list[str]:
    return [f"backbone.name=open_clip:{name}", f"backbone.pretrained={tiny_clip[name]}", *PROMPTS]


# ---- the zero-shot head is OpenCLIP's -----------------------------------------------------------------------
def test_zeroshot_head_equals_open_clip_build_zero_shot_classifier(tiny_clip, tmp_path):
    name = "thawlab-test-vit"
    reference = open_clip.create_model(name, pretrained=tiny_clip[name]).eval()
    expected = open_clip.build_zero_shot_classifier(reference, open_clip.get_tokenizer(name), NAMES, TEMPLATES)
    image, text = clip.split(clip.create_clip(f"open_clip:{name}", tiny_clip[name]), f"open_clip:{name}")
    head = ZeroShotHead(image.num_features, len(NAMES))
    assert head.fill(text, NAMES, TEMPLATES, cache_dir=tmp_path)["cached"] is False
    scale = reference.logit_scale.exp()
    torch.testing.assert_close(head.fc.weight / scale, expected.T, atol=1e-5, rtol=0)
    assert torch.equal(head.fc.bias, torch.zeros(len(NAMES)))
    # logits: CLIP's, logit_scale.exp() * normalised image features @ class weights
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref_logits = scale * reference.encode_image(x, normalize=True) @ expected
        torch.testing.assert_close(head(image.eval()(x)), ref_logits, atol=1e-4, rtol=1e-5)
    # cached on disk: the same weights back, keyed by the text tower, the classes and the templates
    again = ZeroShotHead(image.num_features, len(NAMES))
    assert again.fill(text, NAMES, TEMPLATES, cache_dir=tmp_path)["cached"] is True
    assert torch.equal(again.fc.weight, head.fc.weight)
    other = ZeroShotHead(image.num_features, len(NAMES))
    assert other.fill(text, NAMES, TEMPLATES[:1], cache_dir=tmp_path)["cached"] is False
    with torch.no_grad():
        text.model.ln_final.weight.add_(0.1)  # another text tower: another key
    assert ZeroShotHead(image.num_features, len(NAMES)).fill(text, NAMES, TEMPLATES, cache_dir=tmp_path)["cached"] \
        is False


# ---- the image tower as a timm-like backbone ------------------------------------------------------------------
@pytest.mark.parametrize("name, groups", [
    ("thawlab-test-vit", ["stem", "transformer.resblocks.0", "transformer.resblocks.1", "top"]),
    ("thawlab-test-rn", ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "attnpool"]),
    ("thawlab-test-timm", ["stem", *[f"trunk.blocks.{i}" for i in range(5)], "trunk", "head.proj"]),
])
def test_block_groups_of_each_tower_kind_in_forward_order_text_tower_apart(tiny_clip, name, groups):
    cfg = compose_cfg([*BASE, *clip_args(tiny_clip, name), "head=zeroshot"])
    net, preprocess = build_net(cfg, 10, tiny_clip[name])
    assert list(net.groups) == [*groups, "head", "text"]
    assert net.body_groups == [*groups, "head"]
    every = {n for names in net.groups.values() for n in names}
    assert every == {n for n, _ in net.named_parameters()}
    assert all(n.startswith("text.") for n in net.groups["text"]) and len(net.groups["text"]) > 5
    # preprocessing from OpenCLIP's preprocess config; forward gives CLIP's projected embedding
    assert preprocess.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and preprocess.img_size == 32
    assert net.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 32)


# ---- schedules: the text tower stays as loaded, FLYP trains it -------------------------------------------------
def _towers(results: dict, ckpt: str = "last.ckpt") -> tuple[dict, dict]:
    state = torch.load(results["run_dir"] / "checkpoints" / ckpt, weights_only=True)["state_dict"]
    image = {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")}
    text = {k.removeprefix("net.text.model."): v for k, v in state.items() if k.startswith("net.text.")}
    return image, text


SCHEDULES = {
    "frozen": ["schedule=frozen", "export=true"],
    "full_layer_decay": ["schedule=full", "optimizer.layer_decay=0.7", "regularization=l2sp"],
    "gradual": ["schedule=gradual", "schedule.interval=1"],
    "surgical": ["schedule=surgical", "schedule.groups=[1]"],
    "partial": ["schedule=partial"],
    "bitfit": ["schedule=bitfit"],
    "lora": ["schedule=lora", "schedule.rank=2"],
    "reft": ["schedule=reft", "schedule.rank=2"],
    "lp_ft": ["schedule=lp_ft", "cache_features=true"],
    "fine_tune": ["schedule=fine_tune"],
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_every_schedule_runs_and_leaves_the_text_tower_bitwise_as_loaded(run, tiny_clip, case):
    r = run(*clip_args(tiny_clip), "head=zeroshot", *SCHEDULES[case], "trainer.max_epochs=2")
    assert r["status"] == "done"
    assert all("text" not in t["trainable_groups"] for t in r["trace"])
    loaded = torch.load(tiny_clip["thawlab-test-vit"], weights_only=True)
    image, text = _towers(r)
    assert text.keys() == {k for k in loaded if not k.startswith("visual.")}
    for k, v in text.items():
        assert torch.equal(v, loaded[k]), f"{case}: text tower {k} changed"
    changed = [k for k, v in image.items() if k in loaded and not torch.equal(v, loaded[k])]
    if case == "frozen":  # the image tower too, bitwise; the export holds OpenCLIP's own image-tower names
        assert changed == [] and len(image) == sum(k.startswith("visual.") for k in loaded)
        from safetensors.torch import load_file

        exported = load_file(str(r["run_dir"] / "model.safetensors"))
        assert all(torch.equal(exported[k], loaded[k]) for k in loaded if k.startswith("visual."))
        assert {"thawlab_head.fc.weight", "thawlab_head.fc.bias"} <= set(exported)
    elif case not in ("lora", "reft"):  # those train their own parameters, the tower's stay as loaded
        assert changed, case
    if case == "lora":  # every adapter ran and trained (B starts at zero): no wrapper that is never called
        state = torch.load(r["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        b = {k: v for k, v in state.items() if "lora_B" in k}
        assert b and all(v.abs().sum() > 0 for v in b.values()), [k for k, v in b.items() if v.abs().sum() == 0]
        assert all(".mlp." in k for k in b)  # c_fc, c_proj: attention's projections are nn.MultiheadAttention's
    assert {"test/zeroshot/id/acc", "test/zeroshot/ood/printed/acc"} <= set(r["metrics"])


def test_wise_ft_starts_from_the_zero_shot_model_and_interpolates_towards_it(run, tiny_clip):
    r = run(*clip_args(tiny_clip), "head=zeroshot", "schedule=wise_ft", "schedule.alphas=[0.0,1.0]")
    assert [t["phase"] for t in r["trace"]] == ["ft"] * 3  # no probe: theta_0 is the zero-shot model
    m = r["metrics"]
    zero = {k.removeprefix("test/zeroshot/"): v for k, v in m.items() if k.startswith("test/zeroshot/")}
    assert zero and zero == {k.removeprefix("test/wise/0/"): v for k, v in m.items() if k.startswith("test/wise/0/")}


class HeadAtStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.weight = module.net.head.fc.weight.detach().clone()


def test_lp_ft_probes_from_the_zero_shot_head(run, tiny_clip, monkeypatch):
    probe = HeadAtStart()
    add_callbacks(monkeypatch, probe)
    r = run(*clip_args(tiny_clip), "head=zeroshot", "schedule=lp_ft", "schedule.lp_epochs=1")
    assert [t["phase"] for t in r["trace"]] == ["lp", "ft", "ft"]
    assert r["trace"][0]["trainable_groups"] == ["head"]
    cfg = compose_cfg([*BASE, *clip_args(tiny_clip), "head=zeroshot"])
    zero_shot = build_net(cfg, 10, tiny_clip["thawlab-test-vit"])[0].head.fc.weight
    assert torch.equal(probe.weight, zero_shot) and zero_shot.abs().sum() > 0


def test_flyp_trains_both_towers_and_evaluates_with_the_recomputed_zero_shot_head(run, tiny_clip):
    r = run(*clip_args(tiny_clip), "head=zeroshot", "schedule=flyp", "trainer.max_epochs=2")
    assert r["trace"][0]["trainable_groups"] == ["stem", "transformer.resblocks.0", "transformer.resblocks.1",
                                                 "top", "text"]
    loaded = torch.load(tiny_clip["thawlab-test-vit"], weights_only=True)
    state = torch.load(r["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    _, text = _towers(r)
    assert not torch.equal(text["logit_scale"], loaded["logit_scale"])  # the logit scale trains too
    assert any(not torch.equal(v, loaded[k]) for k, v in text.items() if k != "logit_scale")
    # the checkpoint's head is the zero-shot head of the checkpoint's own text tower
    cfg = compose_cfg([*BASE, *clip_args(tiny_clip), "head=zeroshot"])
    net, _ = build_net(cfg, 10, tiny_clip["thawlab-test-vit"])
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    recomputed = net.head.fc.weight.detach().clone()
    net.head.refresh(net.text)
    torch.testing.assert_close(net.head.fc.weight, recomputed, atol=1e-6, rtol=0)
    assert not torch.allclose(recomputed, build_net(cfg, 10, tiny_clip["thawlab-test-vit"])[0].head.fc.weight)


@pytest.mark.parametrize("schedule", [["schedule=flyp"], ["schedule=wise_ft", "schedule.alphas=[0.0,0.5,1.0]"]],
                         ids=["flyp", "wise_ft"])
def test_resumed_mid_run_equals_an_uninterrupted_run(run, tiny_clip, monkeypatch, schedule):
    """FLYP (both towers, the recomputed head) and WiSE-FT from the zero-shot model (theta_0 taken at epoch 0,
    carried by the checkpoints): killed after epoch 1, resumed, the same weights, metrics and curve."""
    args = [*clip_args(tiny_clip), "head=zeroshot", *schedule, "trainer.max_epochs=3"]
    whole = run(*args)
    with monkeypatch.context() as m:
        add_callbacks(m, KillAfter(1))
        with pytest.raises(Killed):
            run(*args, name="resumed")
    resumed = run(*args, "ckpt_path=last", name="resumed")
    a = torch.load(whole["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    assert resumed["metrics"] == whole["metrics"] and resumed.get("wise") == whole.get("wise")


# ---- bad input: one line each ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["backbone.name=open_clip:ViT-B-61", "head=zeroshot"], r"unknown OpenCLIP model .*did you mean ViT-B-16"),
    (["backbone.name=resnet18", "head=zeroshot"], r"head=zeroshot needs a CLIP text tower.*timm model"),
    (["head=zeroshot", "head.templates=[a photo]"], r"head.templates: template 'a photo' has no \{\}"),
    (["backbone.name=open_clip:ViT-B-16", "data.img_size=32"], r"takes 224x224 inputs only.*data.img_size=224"),
    (["backbone.drop_path_rate=0.1"], r"timm.create_model arguments: an OpenCLIP model"),
])
def test_bad_clip_config_is_one_line(tiny_clip, overrides, message):
    cfg = compose_cfg([*BASE, *clip_args(tiny_clip), *overrides])
    with pytest.raises(ThawlabError, match=message):
        check_config(cfg)


def test_bad_tags_and_offline_hub_tags_are_one_line(monkeypatch, tiny_clip):
    with pytest.raises(ThawlabError, match=r"not an OpenCLIP tag of RN50.*did you mean openai"):
        clip.create_clip("open_clip:RN50", "opneai")
    monkeypatch.setattr(bb, "_hub_reachable", lambda *a: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ThawlabError, match=r"must be a local file .* or already in the cache"):
        clip.create_clip("open_clip:RN50", "yfcc15m")


def test_zero_shot_head_without_class_names_is_one_line(tiny_clip):
    cfg = compose_cfg([*BASE, *clip_args(tiny_clip), "head=zeroshot", "data.classnames=null"])
    with pytest.raises(ThawlabError, match="names no classes: set data.classnames"):
        build_net(cfg, 10, tiny_clip["thawlab-test-vit"], classnames=None)


def test_a_bad_open_clip_name_exits_2_with_one_line(tmp_path):
    p = subprocess.run([TRAIN, *BASE, "backbone.name=open_clip:ViT-B-61", "head=zeroshot"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("thawlab-train: error: unknown OpenCLIP model")
    assert "Traceback" not in p.stderr


def test_data_configs_name_their_classes_and_clip_templates():
    """ImageNet: OpenCLIP's own class names and OpenAI's 80 templates; CIFAR-10: its classes in label order."""
    imagenet = compose_cfg([*BASE, "data=imagenet"]).data
    assert list(imagenet.classnames) == list(open_clip.IMAGENET_CLASSNAMES)
    assert list(imagenet.templates) == [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    from thawlab.data.cifar import CLASSES

    for data in ("cifar10", "cifar10c"):
        cfg = compose_cfg([*BASE, f"data={data}"]).data
        assert len(cfg.classnames) == 10 and len(cfg.templates) == 18
        assert tuple(cfg.classnames) == CLASSES
    assert compose_cfg([*BASE, "data=imagefolder"]).data.classnames is None  # the folder names


def test_ddp_flyp_keeps_ranks_identical_and_equals_one_process(tmp_path, cache_dir, tiny_clip):
    """FLYP on 2 CPU processes (gloo; the contrastive loss gathers both ranks' features): the ranks end with the
    same weights, both towers moved, and the test metrics equal the selected checkpoint evaluated in one process.
    The tiny model configs reach the rank processes through $THAWLAB_CLIP_CONFIGS."""
    from omegaconf import OmegaConf

    from conftest import cli
    from test_ddp import DDP

    folder = str(Path(tiny_clip["thawlab-test-vit"]).parent)
    run_dir = tmp_path / "run"
    r = cli(*DDP, "logger=none", *clip_args(tiny_clip), "head=zeroshot", "schedule=flyp", "trainer.max_epochs=2",
            "trainer.limit_test_batches=null", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache_dir,
            env={clip.CONFIGS_ENV: folder})
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run_dir)
    ranks = res["distributed"]["ranks"]
    assert ranks[0]["weights"] == ranks[1]["weights"], "ranks diverged"
    # both towers trained; the head moved too: recomputed from the text tower before each validation
    assert {"stem", "top", "text", "head"} <= set(ranks[0]["changed"])
    assert res["counts"]["test/id"] == 360 and "test/zeroshot/id/acc" in res["metrics"]
    one = _evaluate_in_one_process(OmegaConf.create(res["config"]), run_dir / res["selection"]["checkpoint"])
    for key, value in one.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key


def _evaluate_in_one_process(cfg, checkpoint: Path) -> dict[str, float]:
    from thawlab.build import build_datamodule, build_module, build_trainer

    dm = build_datamodule(cfg.data, None, shuffle_seed=cfg.seed)
    net, dm.preprocess = build_net(cfg, dm.num_classes, cfg.backbone.pretrained)
    module = build_module(cfg, net, dm)
    trainer = build_trainer(cfg.trainer, None, False, devices=1, num_nodes=1, strategy="auto",
                            enable_progress_bar=False)
    trainer.test(module, datamodule=dm, ckpt_path=str(checkpoint), verbose=False)
    return module.computed["test"]


def test_an_image_folder_names_its_classes_after_its_folders(tmp_path, tiny_clip):
    """data=imagefolder with data.classnames=null: the zero-shot head's class names are the train/ folder names,
    in label order."""
    from test_datasets import FOLDER_CLASSES, make_folders

    from thawlab.build import build_datamodule, classnames_of

    make_folders(tmp_path / "f")
    cfg = compose_cfg([*BASE, "data=imagefolder", f"data.root={tmp_path / 'f'}", "data.ood=null"])
    dm = build_datamodule(cfg.data, None)
    assert classnames_of(cfg, dm) == sorted(FOLDER_CLASSES) and dm.num_classes == len(FOLDER_CLASSES)


@pytest.mark.parametrize("name", ["thawlab-test-rn", "thawlab-test-timm"])
def test_resnet_and_timm_towers_train_through_a_schedule(run, tiny_clip, name):
    """The other tower kinds through gradual unfreezing with layer decay: every group trains in turn, BatchNorm
    of the ModifiedResNet's frozen groups stays in eval mode, the text tower as loaded."""
    r = run(*clip_args(tiny_clip, name), "head=zeroshot", "schedule=gradual", "schedule.interval=1",
            "optimizer.layer_decay=0.8", "trainer.max_epochs=3")
    top, below = {"thawlab-test-rn": ("attnpool", "layer4.0"), "thawlab-test-timm": ("head.proj", "trunk")}[name]
    assert [t["trainable_groups"] for t in r["trace"]] == [["head"], [top, "head"], [below, top, "head"]]
    loaded = torch.load(tiny_clip[name], weights_only=True)
    _, text = _towers(r)
    assert all(torch.equal(v, loaded[k]) for k, v in text.items())
