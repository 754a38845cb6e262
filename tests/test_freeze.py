"""Freeze invariants: a frozen backbone is bitwise what was loaded, BatchNorm statistics included, whatever
calls model.train(); frozen groups build no autograd graph; lp_ft's phase 2 starts from the phase-1 head."""
from __future__ import annotations

import lightning as L
import timm
import torch
from safetensors.torch import load_file

from conftest import add_callbacks
from thawlab.backbone import block_groups
from thawlab.heads import LinearHead
from thawlab.model import ThawNet
from thawlab.schedules import Phase


def _backbone_weights_from_file(results) -> dict:
    path = results["config"]["backbone"]["pretrained"]
    assert path == "source"
    from pathlib import Path

    files = list(Path(results["config"]["cache_dir"]).glob("pretrain/*/weights.safetensors"))
    assert files, "the source pretraining left no weights"
    return load_file(str(files[0]))


def test_frozen_backbone_is_bitwise_as_loaded_bn_buffers_included(run):
    r = run("schedule=frozen", "trainer.max_epochs=2")
    loaded = _backbone_weights_from_file(r)
    ckpt = torch.load(r["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("net.backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.backbone.")}
    assert any("running_mean" in k for k in trained)
    for k, v in trained.items():
        assert torch.equal(v, loaded[k]), f"{k} changed under schedule=frozen"
    head_before = r["trace"][0]
    assert head_before["trainable_groups"] == ["head"]


def _net():
    backbone = timm.create_model("test_resnet", num_classes=0)
    return ThawNet(backbone, LinearHead(backbone.num_features, 10), block_groups(backbone))


def test_bn_of_frozen_groups_stays_in_eval_mode_after_train():
    net = _net()
    groups = list(net.groups)
    net.apply_phase(Phase("p", 1, (groups[-2], "head"), {}, "train"))
    net.train()
    for bn, g in net._bn_groups:
        assert bn.training == (g == groups[-2]), g
    net.eval(); net.train()
    assert not any(bn.training for bn, g in net._bn_groups if g != groups[-2])
    net.apply_phase(Phase("p", 1, tuple(groups), {}, "eval"))  # LP-FT: everything trains, statistics frozen
    net.train()
    assert not any(bn.training for bn, _ in net._bn_groups)
    assert all(p.requires_grad for p in net.parameters())
    net.apply_phase(Phase("p", 1, tuple(groups), {}, "frozen"))
    assert not any(p.requires_grad for bn, _ in net._bn_groups for p in bn.parameters())


def test_frozen_backbone_builds_no_graph():
    net = _net()
    net.apply_phase(Phase("p", 1, ("head",), {}, "train"))
    seen = []
    net.backbone.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    out = net(torch.randn(2, 3, 32, 32))
    assert seen == [False] and out.requires_grad


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
