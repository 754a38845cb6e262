"""ReFT (LoReFT) on timm backbones: the formula and its initialisation, where the interventions go (CNN channels,
NHWC stages, ViT token positions), a real run (R orthonormal after training under weight decay, only the
interventions and the head change, BatchNorm in eval mode), resume, export, the parameter budget, bad input."""
from __future__ import annotations

import re

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import BASE, add_callbacks, cli, compose_cfg, pretrained_weights
from thawlab.build import build_net, check_config
from thawlab.errors import ThawlabError
from thawlab.reft import PREFIX, LoReFT, add_reft, interventions, load_exported
from thawlab.results import read_results
from thawlab.schedules import build_phases
from thawlab.train import train

EPOCHS = ["trainer.max_epochs=2"]
# weight decay on, R's parameter included (thawlab exempts it by default): torch's Householder map reads the
# diagonal of R's parameter as signs, which decay would zero
RUN = ["schedule=reft", "optimizer.lr=0.01", "optimizer.weight_decay=0.1", "optimizer.no_decay_exemptions=false",
       *EPOCHS]


def _net(*overrides, classes=10):
    cfg = compose_cfg(["schedule=reft", "backbone.pretrained=false", *overrides])
    net, _ = build_net(cfg, classes, False)
    return cfg, net


def _R(iv: LoReFT) -> torch.Tensor:
    return iv.rotate.weight.detach()


# ---- the intervention itself ----------------------------------------------------------------------------------
def test_formula_initialisation_and_orthonormality_under_weight_decay():
    torch.manual_seed(0)
    iv = LoReFT(16, 3)
    h = torch.randn(5, 16)
    R, W, b = _R(iv), iv.source.weight.detach(), iv.source.bias.detach()
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6)
    want = h + (h @ W.T + b - h @ R.T) @ R  # h + R^T (W h + b - R h), row-wise
    assert torch.allclose(iv(h), want, atol=1e-6)
    # pyreft's LoReFT initialisation: R orthogonal, W and b nn.Linear's default; so not the identity at start ...
    assert (iv(h) - h).abs().max() > 1e-2
    with torch.no_grad():  # ... which it becomes exactly when W = R and b = 0
        iv.source.weight.copy_(R)
        iv.source.bias.zero_()
    assert torch.allclose(iv(h), h, atol=1e-6)
    # AdamW's decoupled decay shrinks the parameter's diagonal, which torch's map casts to int signs: R stays
    # orthonormal only because the forward restores them
    opt = torch.optim.AdamW(iv.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        loss = iv(h).pow(3).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    iv(h)
    assert torch.allclose(_R(iv) @ _R(iv).T, torch.eye(3), atol=1e-5)
    assert not torch.allclose(_R(iv), R, atol=1e-3), "R did not train"


@pytest.mark.parametrize("overrides,where", [
    ([], {"layer3.0": 1, "layer4.0": 1}),  # ResNet: NCHW maps, the last block of each stage (Sequential)
    (["backbone.name=test_convnext"], {"stages.3": 1, "head.norm": 1}),  # top: the pooled (B, C, 1, 1), not head
    (["backbone.name=swin_tiny_patch4_window7_224", "+backbone.kwargs.img_size=32", "+backbone.kwargs.window_size=2",
      "+backbone.kwargs.embed_dim=16", "+backbone.kwargs.num_heads=[1,1,1,1]", "schedule.layers=[1,-1]"],
     {"layers.0": -1, "norm": -1}),  # Swin: NHWC stages (timm output_fmt), the last dim is the width
])
def test_interventions_sit_on_block_group_outputs_in_their_group(overrides, where):
    cfg, net = _net(*overrides)
    ivs = interventions(net.backbone)
    assert {p: iv.channel_dim for p, iv in ivs.items()} == where
    phase, = build_phases(cfg.schedule, list(net.groups), 2)
    for path in where:  # each intervention's parameters are in the block group of the module it edits ...
        names = {f"backbone.{path}.reft.{n}" for n, _ in ivs[path].named_parameters()}
        (group,) = {g for g, params in net.groups.items() if names & set(params)}
        assert names <= set(net.groups[group]) and group in phase.trainable
    net.apply_phase(phase)  # ... and they, with the head, are all that trains
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".reft." in n or n.startswith("head.")}
    assert any(n.startswith("head.") for n in trainable)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vit_positions_edit_only_the_chosen_tokens():
    vit = ["backbone.name=vit_tiny_patch16_224", "+backbone.kwargs.img_size=32", "+backbone.kwargs.patch_size=4"]
    _, net = _net(*vit, "schedule.layers=[-2]", "schedule.positions=[0,-1]")
    (path, iv), = interventions(net.backbone).items()
    assert path == "blocks.10" and iv.positions == (0, -1) and iv.channel_dim == -1
    seen = {}
    block = net.backbone.get_submodule(path)
    block.register_forward_hook(lambda m, a, out: seen.setdefault("before", out), prepend=True)
    block.register_forward_hook(lambda m, a, out: seen.setdefault("after", out))
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    before, after = seen["before"], seen["after"]
    assert before.shape == (2, 65, 192)  # class token + 8 x 8 patches
    changed = (after - before).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [0, 64]
    assert torch.allclose(after[:, [0, 64]], iv.edit(before[:, [0, 64]]))
    small = ["backbone.name=test_vit", "+backbone.kwargs.img_size=32"]
    _, net = _net(*small, "schedule.layers=[3]", "schedule.positions=prefix")
    assert interventions(net.backbone)["blocks.2"].positions == (0,)  # timm's num_prefix_tokens: the class token
    _, net = _net(*small, "schedule.positions=all")
    assert all(iv.positions is None for iv in interventions(net.backbone).values())


def test_resnet50_trains_under_one_percent_of_its_backbone():
    cfg, net = _net("backbone.name=resnet50")
    phase, = build_phases(cfg.schedule, list(net.groups), 2)
    trains = net.trains(phase)
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    reft = sum(v for n, v in sizes.items() if trains[n] and n.startswith("backbone."))
    body = sum(v for n, v in sizes.items() if n.startswith("backbone.") and ".reft." not in n)
    print(f"resnet50, default reft: {reft:,} trainable parameters in the backbone ({reft / body:.3%} of {body:,})")
    assert reft == sum(2 * 4 * d + 4 for d in (1024, 2048))  # R and W (4 x d) and b (4), at layer3 and layer4
    assert reft / body < 0.01


def test_a_refused_option_leaves_the_backbone_unchanged():
    backbone = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(ThawlabError, match="d=96 of layer4.0"):
        add_reft(backbone, [-2, -1], rank=100, input_size=(3, 32, 32))  # fits layer3.0 (192), not layer4.0 (96)
    assert not interventions(backbone) and not any(m._forward_hooks for m in backbone.modules())


# ---- real runs ------------------------------------------------------------------------------------------------
class _Watch(L.Callback):
    """The interventions and head at the start; whether any backbone BatchNorm was in training mode in a step."""

    def __init__(self):
        self.start, self.bn_training = None, []

    def on_train_start(self, trainer, module):
        if module.phases[0].name != "reft":  # the source pretraining, when the cache is empty
            return
        self.start = {k: v.detach().clone() for k, v in module.net.state_dict().items()
                      if ".reft." in k or k.startswith("head.")}
        self.R0 = {p: _R(iv).clone() for p, iv in interventions(module.net.backbone).items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.phases[0].name != "reft":
            return
        self.bn_training += [n for n, m in module.net.backbone.named_modules() if isinstance(m, _BatchNorm) and m.training]


class Killed(RuntimeError):
    pass


class _KillAfterFirstEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            raise Killed


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A reft run on the source-pretrained test_resnet, watched; the same run killed after epoch 0 and resumed."""
    root = tmp_path_factory.mktemp("reft")

    def go(name, *overrides, callbacks=()):
        with pytest.MonkeyPatch.context() as m:
            add_callbacks(m, *callbacks)
            train(compose_cfg([*BASE, f"cache_dir={cache_dir}", *RUN, *overrides], root / name))
        out = read_results(root / name)
        out["run_dir"] = root / name
        return out

    watch = _Watch()
    whole = go("whole", callbacks=[watch])
    with pytest.raises(Killed):
        go("resumed", callbacks=[_KillAfterFirstEpoch()])
    resumed = go("resumed", "ckpt_path=last")
    return whole, watch, resumed


def _state(r, which="last.ckpt"):
    return torch.load(r["run_dir"] / "checkpoints" / which, map_location="cpu", weights_only=True)["state_dict"]


def _trained_net(r, which="last.ckpt"):
    """A fresh network of the run's config with the checkpoint's weights (its interventions' keys must match)."""
    cfg = compose_cfg([*BASE, *RUN, "backbone.pretrained=false"])
    net, _ = build_net(cfg, 10, False)
    net.load_state_dict({k.removeprefix("net."): v for k, v in _state(r, which).items() if k.startswith("net.")})
    return net.eval()


def test_rotation_is_orthonormal_after_training_and_trained(runs):
    r, watch, _ = runs
    net = _trained_net(r)
    ivs = interventions(net.backbone)
    assert set(ivs) == set(watch.R0) == {"layer3.0", "layer4.0"}
    for path, iv in ivs.items():
        R = _R(iv)
        assert torch.allclose(R @ R.T, torch.eye(R.shape[0]), atol=1e-5), (path, (R @ R.T - torch.eye(4)).abs().max())
        assert (R - watch.R0[path]).abs().max() > 1e-3, f"R of {path} did not train"


def test_only_interventions_and_head_change_bn_stays_in_eval(runs):
    r, watch, _ = runs
    state = _state(r)
    loaded = pretrained_weights(r)
    backbone = {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")}
    for k, v in backbone.items():
        if ".reft." not in k:  # the backbone, BatchNorm statistics included, bitwise as loaded
            assert torch.equal(v, loaded[k]), f"{k} changed"
    for k, v in watch.start.items():
        assert not torch.equal(state[f"net.{k}"], v), f"{k} did not train"
    assert not watch.bn_training, f"BatchNorm in training mode: {watch.bn_training[:3]}"
    counted = sum(v.numel() for k, v in state.items() if ".reft." in k or k.startswith("net.head."))
    trace = r["trace"][0]
    assert trace["trainable_params"] == counted and trace["trainable_groups"] == ["layer3.0", "layer4.0", "head"]


def test_resume_after_a_kill_equals_the_whole_run(runs):
    whole, _, resumed = runs
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys() and any("parametrizations.weight.original" in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} differs after resuming"
    assert resumed["metrics"] == whole["metrics"]


def test_export_saves_the_interventions_beside_a_plain_timm_state_dict(runs):
    r, _, _ = runs
    state = load_file(str(r["run_dir"] / "model.safetensors"))
    reft = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    assert {re.sub(r"\.[^.]+$", "", k[len(PREFIX):]) for k in reft} == {"layer3.0", "layer4.0"}
    plain = timm.create_model("test_resnet", num_classes=10)
    plain.load_state_dict({k: v for k, v in state.items() if k not in reft}, strict=True)
    load_exported(plain, reft).eval()
    net = _trained_net(r, r["selection"]["checkpoint"].rsplit("/", 1)[-1])  # what export_model saved
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), net(x), atol=1e-5)
        plain_only = timm.create_model("test_resnet", num_classes=10).eval()
        plain_only.load_state_dict({k: v for k, v in state.items() if k not in reft})
        assert not torch.allclose(plain_only(x), net(x), atol=1e-3), "the interventions matter"


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (["schedule.rank=193"], "schedule.rank=193 is larger than the width d=192 of layer3.0"),
    (["schedule.layers=[9]"], "schedule.layers: index 9 is out of range for the 5 block groups"),
    (["schedule.layers=[0]"], "schedule.layers: index 0 is the stem"),
    (["schedule.layers=[-1,4]"], "schedule.layers names layer4.0 twice"),
    (["schedule.positions=[0]"], "schedule.positions=[0] selects tokens, but layer3.0"),
    (["schedule.positions=first"], "schedule.positions='first' must be null or 'all'"),
    (["schedule.rank=0"], "schedule.rank=0 must be a positive integer"),
    (["schedule.layers=[]"], "schedule.layers=[] names no block group"),
    (["backbone.name=test_vit", "+backbone.kwargs.img_size=32", "schedule.positions=[5]"],
     "schedule.positions: 5 is out of range for the 5 tokens"),
    (["backbone.name=test_convnext", "schedule.positions=prefix"], "selects tokens"),
])
def test_bad_options_are_one_line_errors(overrides, needle):
    with pytest.raises(ThawlabError) as e:
        cfg = compose_cfg(["schedule=reft", "backbone.pretrained=false", *overrides])
        check_config(cfg)
        build_net(cfg, 10, False)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_rank_too_large_is_one_line_exit_2(tmp_path, runs, cache_dir):
    r = cli("debug=smoke", "logger=none", "schedule=reft", "schedule.rank=100000", f"hydra.run.dir={tmp_path}/run",
            cwd=tmp_path, cache=cache_dir)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("thawlab-train: error: schedule.rank=100000 is larger than the width"), lines[-1]
