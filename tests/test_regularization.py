"""Regularisers and early stopping: each does what its config key claims, in real (short) runs where it matters."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import DropPath

from conftest import compose_cfg
from thawlab.build import build_net, check_config
from thawlab.errors import ThawlabError
from thawlab.module import FineTuner
from thawlab.schedules import Phase


def net_of(*overrides: str, num_classes: int = 10):
    cfg = compose_cfg(["logger=none", "backbone.pretrained=false", *overrides])
    return cfg, build_net(cfg, num_classes, pretrained=False)[0]


# ---- dropout and stochastic depth -----------------------------------------------------------------------
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_dropout_is_active_in_training_only(head):
    _, net = net_of(f"head={head}", "head.dropout=0.5")
    x = torch.randn(8, 3, 32, 32)
    net.apply_phase(Phase("full", 1, tuple(net.groups)))
    net.train()
    assert not torch.equal(net(x), net(x)), "dropout draws a new mask each training forward"
    net.eval()
    assert torch.equal(net(x), net(x))
    net.apply_phase(Phase("blocks", 1, tuple(g for g in net.groups if g != "head")))  # the head frozen
    net.train()
    assert torch.equal(net(x), net(x)), "a frozen head's dropout stays in eval mode"


def test_drop_path_reaches_timm_and_is_off_in_frozen_blocks():
    _, net = net_of("backbone.drop_path_rate=0.2")
    rates = [m.drop_prob for m in net.backbone.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2), rates  # timm's linear ramp over the blocks
    for m in net.modules():  # timm zero-initialises each block's last BatchNorm: make the residual branches count
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    x = torch.randn(8, 3, 32, 32)
    net.apply_phase(Phase("probe", 1, ("head",)))
    net.train()
    assert torch.equal(net.features(x), net.features(x)), "frozen blocks drop no path"
    net.apply_phase(Phase("full", 1, tuple(net.groups)))
    net.train()
    assert not torch.equal(net.features(x), net.features(x))
    assert not any(isinstance(m, DropPath) for m in net_of()[1].modules()), "off by default"


# ---- weight decay exemptions ------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_resnet", "vit_tiny_patch16_224"])
def test_weight_decay_exempts_biases_norms_and_timm_no_weight_decay(backbone, monkeypatch):
    kwargs = ["+backbone.kwargs.img_size=32", "+backbone.kwargs.patch_size=8"] if "vit" in backbone else []
    _, net = net_of(f"backbone.name={backbone}", *kwargs)
    c = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "layer_decay": 1.0,
         "schedule": "constant", "warmup_epochs": 0.0, "cut_frac": 0.1, "ratio": 32.0, "pct_start": 0.25,
         "div": 25.0, "div_final": 1e5, "milestones": [0.5], "gamma": 0.1}
    names = {id(p): n for n, p in net.named_parameters()}

    def groups(**opt):
        module = FineTuner(net, [Phase("full", 1, tuple(net.groups))], {**c, **opt}, 10,
                           {"val": ["id"], "test": ["id"]})
        monkeypatch.setattr(FineTuner, "trainer", property(lambda self: type("T", (), {
            "estimated_stepping_batches": 10, "max_epochs": 1})()))
        return module.configure_optimizers()["optimizer"].param_groups

    exempt = {names[id(p)] for g in groups() if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups() if g["weight_decay"] == 0.05 for p in g["params"]}
    assert exempt | decayed == set(names.values()) and not exempt & decayed
    assert all(n.endswith(".bias") or dict(net.named_parameters())[n].ndim <= 1 or n.split(".")[-1] in
               ("pos_embed", "cls_token") for n in exempt)
    assert all(dict(net.named_parameters())[n].ndim > 1 for n in decayed)
    assert "head.fc.bias" in exempt and "head.fc.weight" in decayed
    if "vit" in backbone:
        assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight"} <= exempt
    else:
        assert "backbone.bn1.weight" in exempt and "backbone.conv1.0.weight" in decayed
    # every exempt group sits beside its block group, under the same name (the phase's lr applies to both)
    assert {g["name"] for g in groups()} == set(net.groups)
    assert all(g["weight_decay"] == 0.05 for g in groups(no_decay_exemptions=False))
    assert all("weight_decay" not in g or g["weight_decay"] == 0.0 for g in groups(weight_decay=0.0))


# ---- gradient clipping ------------------------------------------------------------------------------------
def test_gradient_clipping_bounds_the_norm_of_every_step(run):
    norms = []

    def record(optimizer, args, kwargs):  # after each step (Lightning runs the closure and clips inside it)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(record)
    try:
        run("trainer.gradient_clip_val=0.01", "optimizer.lr=0.1", "backbone.pretrained=false")  # no pretraining steps
        assert len(norms) == 6 and max(norms) <= 0.01 * (1 + 1e-4), norms  # debug=smoke: 3 epochs x 2 steps
        norms.clear()
        run("optimizer.lr=0.1", "backbone.pretrained=false")
        assert max(norms) > 0.01, "without clipping the same run's gradients are larger"
    finally:
        handle.remove()


# ---- early stopping ---------------------------------------------------------------------------------------
def test_early_stopping_cuts_the_phase_not_the_run(run):
    """lr 0: nothing improves, so with patience 1 each phase stops after its second epoch. LP-FT planned as
    4 + 2 epochs: the probe is cut to 2, fine-tuning still runs (its 2 epochs), and the run ends after 4."""
    r = run("schedule=lp_ft", "schedule.lp_epochs=4", "trainer.max_epochs=6", "optimizer.lr=0",
            "early_stopping.patience=1")
    assert r["status"] == "done"
    assert [t["phase"] for t in r["trace"]] == ["lp", "lp", "ft", "ft"]
    es = r["early_stopping"]
    assert es["stopped"] == [{"phase": "lp", "planned_epochs": 4, "epochs": 2, "stopped_after_epoch": 1,
                              "best": es["stopped"][0]["best"], "best_epoch": 0}]
    assert (es["epochs_run"], es["epochs_planned"], es["monitor"], es["patience"]) == (4, 6, "val/id/acc", 1)
    assert r["selection"]["rule"] == "max val/id/acc"
    plan = torch.load(r["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["thawlab_plan"]
    assert plan["epochs"] == [2, 2], "a resumed run continues the cut plan"


def test_early_stopping_in_the_last_phase_ends_the_run(run):
    r = run("trainer.max_epochs=5", "optimizer.lr=0", "early_stopping.patience=1")
    assert [t["phase"] for t in r["trace"]] == ["full", "full"]
    assert r["early_stopping"]["stopped"][0]["planned_epochs"] == 5 and r["early_stopping"]["epochs_run"] == 2
    assert "early_stopping" not in run("trainer.max_epochs=2"), "off by default: nothing recorded"


@pytest.mark.parametrize("overrides,needle", [
    (["backbone.drop_path_rate=1.0"], "backbone.drop_path_rate=1.0 is outside [0, 1)"),
    (["head=mlp", "head.dropout=-0.1"], "head.dropout=-0.1 is outside [0, 1)"),
    (["early_stopping.patience=0"], "early_stopping.patience=0 must be a positive integer"),
    (["early_stopping.patience=2", "early_stopping.min_delta=-1"], "early_stopping.min_delta=-1.0 must be >= 0"),
    (["trainer.gradient_clip_val=0"], "trainer.gradient_clip_val=0.0 must be positive"),
    (["trainer.gradient_clip_algorithm=l1"], "trainer.gradient_clip_algorithm='l1' is not one of norm, value"),
])
def test_bad_regularisation_values_name_the_value(overrides, needle):
    with pytest.raises(ThawlabError) as e:
        check_config(compose_cfg(["logger=none", *overrides]))
    assert needle in str(e.value), str(e.value)
