"""The frozen-prefix cache: where timm models split, that the prefix really is skipped, that a model which cannot
be split runs uncached, and that cached runs equal uncached ones (gradual, surgical, ReFT; RAM and memory map)."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch import nn

from conftest import add_callbacks, compose_cfg
from thawlab.backbone import block_groups
from thawlab.build import cache_options, check_config
from thawlab.errors import ThawlabError
from thawlab.heads import LinearHead
from thawlab.model import ThawNet
from thawlab.prefix_cache import find_split, run_prefix, run_suffix
from thawlab.schedules import Phase

# (model, kwargs, input size, trainable groups counted from the top, the cut expected)
FAMILIES = [
    ("resnet18", {}, 32, 1, "layer3"),
    ("resnet18", {}, 32, 4, "maxpool"),  # the stem frozen only: its output after the (parameter-free) max-pool
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32, 2, "blocks.9"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32, 12, "norm_pre"),  # after the position embedding
    ("convnext_atto", {}, 32, 2, "stages.2"),
    ("efficientnet_b0", {}, 32, 2, "blocks.4"),
]


def _net(name, kwargs, top: int) -> ThawNet:
    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=0, **kwargs)
    net = ThawNet(backbone, LinearHead(backbone.num_features, 10), block_groups(backbone))
    groups = list(net.groups)
    net.apply_phase(Phase("p", 1, tuple(groups[-(top + 1):])))  # the top `top` block groups and the head
    return net.train()


@pytest.mark.parametrize("name,kwargs,size,top,cut", FAMILIES)
def test_split_skips_the_prefix_and_changes_nothing(name, kwargs, size, top, cut):
    net = _net(name, kwargs, top)
    x, y = torch.randn(6, 3, size, size), torch.arange(6)
    split = find_split(net.backbone, x[:2])
    assert not isinstance(split, str), split
    assert split.cut == cut
    # the plain step: loss and every trainable gradient (training mode: dropout/drop-path off in timm's defaults)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    # the cached step: the prefix once, then the rest on its output, with every prefix module counted
    cut_out = run_prefix(net.backbone, split.cut, x)
    prefix = [m for n, m in net.backbone.named_modules()
              if n and any(n == s or n.startswith(s + ".") for s in [*split.skipped, split.cut])]
    assert len(prefix) == split.prefix_modules
    calls = []
    handles = [m.register_forward_pre_hook(lambda m, i: calls.append(m)) for m in prefix]
    cached = nn.functional.cross_entropy(net.head(run_suffix(net.backbone, split, x, cut_out)), y)
    for h in handles:
        h.remove()
    assert not calls, "a module of the prefix ran"
    cached.backward()
    assert torch.equal(cached, loss)
    for n, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)
    assert len(plain) and all(not n.startswith(f"backbone.{cut}.") for n in plain)


class _Bypass(nn.Module):
    """A residual path around the would-be cut `a`: b's input is a's output, the output also adds the stem's."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        return (self.b(self.a(s)) + s).mean((2, 3))


def test_a_path_around_the_cut_is_found_and_refused():
    model = _Bypass().train()
    for m in (model.stem, model.a):
        m.requires_grad_(False).eval()
    reason = find_split(model, torch.randn(2, 3, 8, 8))
    assert isinstance(reason, str) and "path around the cut" in reason and "a's output" in reason


class _Unhooked(nn.Module):
    """A trainable layer run through its forward method (no hook sees it) before the frozen `a`."""

    def __init__(self):
        super().__init__()
        self.pre, self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.a(self.pre.forward(x))).mean((2, 3))


def test_a_trainable_layer_no_hook_sees_is_refused():
    model = _Unhooked().train()
    model.a.requires_grad_(False).eval()
    reason = find_split(model, torch.randn(2, 3, 8, 8))
    assert isinstance(reason, str) and "pre.weight" in reason


def test_a_trainable_parameter_used_between_modules_is_refused():
    net = _net("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 2)
    net.backbone.pos_embed.requires_grad_(True)  # used by code between modules, before the blocks
    reason = find_split(net.backbone, torch.randn(2, 3, 32, 32))
    assert isinstance(reason, str) and "pos_embed" in reason


def test_first_group_training_or_whole_backbone_frozen_have_no_prefix():
    net = _net("resnet18", {}, 5)
    assert "first block group trains" in find_split(net.backbone, torch.randn(2, 3, 32, 32))
    net = _net("resnet18", {}, 0)
    assert "feature cache" in find_split(net.backbone, torch.randn(2, 3, 32, 32))


# ---- real runs: cached equals uncached -----------------------------------------------------------------------
class _StemCalls(L.Callback):
    """Samples through the backbone's first convolution per epoch (training and validation)."""

    def __init__(self):
        self.per_epoch, self.count = [], 0

    def on_fit_start(self, trainer, module):
        if module.phases[0].name == "pretrain":
            return
        module.net.backbone.conv1.register_forward_hook(lambda m, i, o: setattr(self, "count", self.count + len(o)))
        self.per_epoch, self.count = [], 0

    def on_train_epoch_end(self, trainer, module):
        self.per_epoch.append(self.count)
        self.count = 0


WHOLE = ("data.batch_size=50", "trainer.limit_train_batches=null")  # 100 images in 2 batches: all, every epoch


def _same(cached, plain):
    for key, value in plain["metrics"].items():
        if re.match(r"test/(id|ood)/", key):
            assert cached["metrics"][key] == pytest.approx(value, abs=1e-4), key
    a = torch.load(cached["run_dir"] / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(plain["run_dir"] / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)


def _watched(run, monkeypatch, *overrides):
    calls = _StemCalls()
    add_callbacks(monkeypatch, calls)
    return run(*overrides), calls.per_epoch


def test_gradual_unfreezing_cached_equals_uncached(run, monkeypatch, capsys):
    common = ("schedule=gradual", "schedule.interval=2", "trainer.max_epochs=8", *WHOLE)
    cached, calls = _watched(run, monkeypatch, *common)
    err = capsys.readouterr().err
    # phases: head (feature cache), layer4.0, layer3.0, layer2.0 (prefix cache: the cut moves down each phase)
    for phase, cut in (("unfreeze1", "layer3"), ("unfreeze2", "layer2"), ("unfreeze3", "layer1")):
        assert re.search(rf"prefix cache, phase {phase}: \d+ modules up to {cut} run once", err), err
    first = calls[0]  # 100 training + the validation samples
    # each phase computes its prefix in its first epoch (and checks its split on 3 x 2 samples), never after
    assert first > 100 and calls[1::2] == [0] * 4 and calls[2::2] == [first + 6] * 3, calls
    plain, plain_calls = _watched(run, monkeypatch, *common, "cache_features=false")
    assert plain_calls == [first] * 8
    _same(cached, plain)


def test_surgical_cached_in_ram_and_on_disk_equals_uncached(run, monkeypatch, capsys):
    common = ("schedule=surgical", "schedule.groups=[-2]", "trainer.max_epochs=3", *WHOLE)
    ram, calls = _watched(run, monkeypatch, *common)
    assert calls[1:] == [0, 0] and "up to layer2" in capsys.readouterr().err
    files = []  # the memory-mapped tables exist during fit, in the run directory, and are gone after it

    class _Files(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            files.extend(p.name for p in (Path(trainer.default_root_dir) / "prefix_cache").rglob("*.bin"))

    add_callbacks(monkeypatch, _Files())
    disk, calls = _watched(run, monkeypatch, *common, "cache_features.max_gb=0")
    assert calls[1:] == [0, 0] and "memory-mapped file" in capsys.readouterr().err
    assert "train-0.bin" in files and not (disk["run_dir"] / "prefix_cache").exists()
    full, calls = _watched(run, monkeypatch, *common, "cache_features.max_gb=0", "cache_features.disk_gb=0")
    note = [line for line in capsys.readouterr().err.splitlines() if "prefix cache" in line]
    assert len(note) == 1 and "exceed cache_features.max_gb=0 (RAM) and disk_gb=0" in note[0] and "uncached" in note[0]
    assert calls[1] == calls[2] == calls[0] - 6 > 100, "a phase that does not fit runs uncached (after its check)"
    plain, _ = _watched(run, monkeypatch, *common, "cache_features=false")
    for r in (ram, disk, full):
        _same(r, plain)


def test_reft_cached_equals_uncached(run, monkeypatch, capsys):
    # the intervention sits on layer3.0's output: the prefix ends below that group (layer2), never at the edited
    # output, so the cached activations are those before any trainable computation
    common = ("schedule=reft", "schedule.layers=[-2]", "trainer.max_epochs=2", *WHOLE)
    cached, calls = _watched(run, monkeypatch, *common)
    assert calls[1] == 0 and "up to layer2 " in capsys.readouterr().err
    plain, _ = _watched(run, monkeypatch, *common, "cache_features=false")
    _same(cached, plain)


@pytest.mark.parametrize("overrides,expected", [
    ([], {"enabled": True, "prefix": True, "max_gb": 2.0, "disk_gb": 20.0, "shared_gb": 10.0}),
    (["cache_features=false"], {"enabled": False, "prefix": True, "max_gb": 2.0, "disk_gb": 20.0, "shared_gb": 10.0}),
    (["cache_features.prefix=false", "cache_features.max_gb=0.5"],
     {"enabled": True, "prefix": False, "max_gb": 0.5, "disk_gb": 20.0, "shared_gb": 10.0}),
    (["trainer.compile=true"], {"enabled": True, "prefix": False, "max_gb": 2.0, "disk_gb": 20.0, "shared_gb": 10.0}),
])
def test_cache_options_from_the_block_or_a_bool(overrides, expected):
    assert cache_options(compose_cfg(overrides)) == expected
    assert not cache_options(compose_cfg(overrides), deterministic=False)["enabled"]


@pytest.mark.parametrize("override,needle", [("cache_features=abc", "cache_features='abc' must be true, false"),
                                             ("cache_features.max_gb=-1", "cache_features.max_gb=-1.0 must be >= 0")])
def test_bad_cache_options_are_one_line_errors(override, needle):
    with pytest.raises(ThawlabError, match=re.escape(needle)):
        check_config(compose_cfg(["backbone.pretrained=false", override]))
