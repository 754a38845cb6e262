"""Freeze invariants: a frozen backbone is bitwise what was loaded, BatchNorm statistics included, whatever
calls model.train(); frozen groups build no autograd graph; lp_ft's phase 2 starts from the phase-1 head."""
from __future__ import annotations

import lightning as L
import timm
import torch

from conftest import add_callbacks, pretrained_weights
from thawlab.backbone import block_groups
from thawlab.heads import LinearHead
from thawlab.model import ThawNet
from thawlab.schedules import Phase


def test_frozen_backbone_is_bitwise_as_loaded_bn_buffers_included(run):
    r = run("schedule=frozen", "trainer.max_epochs=2")
    loaded = pretrained_weights(r)
    ckpt = torch.load(r["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("net.backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.backbone.")}
    assert any("running_mean" in k for k in trained)
    for k, v in trained.items():
        assert torch.equal(v, loaded[k]), f"{k} changed under schedule=frozen"
    head_before = r["trace"][0]
    assert head_before["trainable_groups"] == ["head"]


def _net(name="test_resnet", **kwargs):
    backbone = timm.create_model(name, num_classes=0, **kwargs)
    return ThawNet(backbone, LinearHead(backbone.num_features, 10, dropout=0.5), block_groups(backbone))


def _modes(net, kind):
    """{module name: (training, groups)} of the modules of one kind."""
    return {n: (m.training, g) for n, m, g in net._module_groups if isinstance(m, kind)}


def test_frozen_groups_stay_in_eval_mode_whatever_calls_train():
    from timm.layers import DropPath
    from torch.nn.modules.batchnorm import _BatchNorm

    net = _net("resnet18", drop_path_rate=0.2)  # drop-path in every block, BatchNorm everywhere
    groups = list(net.groups)
    top = groups[-2]
    net.apply_phase(Phase("p", 1, (top, "head"), {}, "train"))
    for _ in range(2):  # Lightning switches to eval for validation and back
        net.train()
        for kind in (_BatchNorm, DropPath):
            modes = _modes(net, kind)
            assert modes and all(training == (top in g) for training, g in modes.values()), kind
        assert net.head.dropout.training  # the head trains: its dropout is active
        net.eval()
        assert not any(m.training for m in net.modules())
    net.apply_phase(Phase("p", 1, tuple(groups), {}, "eval"))  # LP-FT: everything trains, statistics frozen
    net.train()
    assert not any(t for t, _ in _modes(net, _BatchNorm).values())
    assert all(t for t, _ in _modes(net, DropPath).values())
    assert all(p.requires_grad for p in net.parameters())
    net.apply_phase(Phase("p", 1, tuple(groups), {}, "frozen"))
    bns = [m for _, m, _ in net._module_groups if isinstance(m, _BatchNorm)]
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    assert all(p.requires_grad for n, p in net.named_parameters() if ".bn" not in n and "downsample.1" not in n)


def test_frozen_backbone_builds_no_graph():
    net = _net()
    net.apply_phase(Phase("p", 1, ("head",), {}, "train"))
    seen = []
    net.backbone.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    out = net(torch.randn(2, 3, 32, 32))
    assert seen == [False] and out.requires_grad


def _saved_for_backward(net, x) -> dict[str, int]:
    """Bytes autograd saves for backward during one forward, by the innermost module that was running."""
    stack, saved = [], {}

    def enter(name):
        return lambda module, inputs: stack.append(name)  # list.append returns None: inputs unchanged

    def leave(module, inputs, output):
        stack.pop()  # returns None: output unchanged

    for name, module in net.named_modules():
        module.register_forward_pre_hook(enter(name))
        module.register_forward_hook(leave)

    def pack(t):
        saved[stack[-1]] = saved.get(stack[-1], 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum().backward()
    return saved


def test_a_frozen_prefix_runs_without_autograd_and_saves_no_activations():
    net = _net("resnet18")
    groups = list(net.groups)
    x = torch.randn(4, 3, 32, 32)
    net.apply_phase(Phase("full", 1, tuple(groups)))
    net.train()
    full = _saved_for_backward(net, x)
    net.apply_phase(Phase("top", 1, tuple(groups[-2:])))  # the last block group and the head train
    net.train()
    top = _saved_for_backward(net, x)
    group_of = {n: g for n, _, g in net._module_groups}
    in_prefix = [n for n in top if n and group_of[n] <= set(groups[:-2])]
    assert not in_prefix, f"frozen prefix saved tensors for backward: {in_prefix[:3]}"
    assert any(group_of[n] <= set(groups[:-2]) for n in full if n)  # the check can fail: full saves there


class _Boundary(L.Callback):
    """Eval-mode predictions at the end of phase 1 against the model's predictions as phase 2 starts."""

    def __init__(self, lp_epochs):
        self.lp, self.x, self.before, self.after = lp_epochs, None, None, None

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.lp - 1:
            self.x = next(iter(trainer.datamodule.train_dataloader()))[0]
            module.net.eval()
            with torch.no_grad():
                self.before = module.net(self.x)
            module.net.train()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.lp and batch_idx == 0:
            with torch.no_grad():  # training mode, phase 2 applied: BN must use the frozen statistics
                self.after = module.net(self.x)


def test_lp_ft_phase_two_starts_from_the_phase_one_head(run, monkeypatch):
    cb = _Boundary(lp_epochs=2)
    add_callbacks(monkeypatch, cb)
    r = run("schedule=lp_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4")
    assert [t["phase"] for t in r["trace"]] == ["lp", "lp", "ft", "ft"]
    assert cb.before is not None and cb.after is not None
    torch.testing.assert_close(cb.after, cb.before)
    assert not torch.allclose(cb.before, torch.zeros_like(cb.before))
