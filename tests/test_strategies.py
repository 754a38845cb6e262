"""Each strategy does what its paper says, in real (short) runs: what changes and what stays bitwise as loaded,
WiSE-FT's endpoints, L2-SP's penalty, LoRA's merged export, fastai's optimizer reset, forgetting, and the
feature cache of frozen phases."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import add_callbacks, pretrained_weights
from thawlab.wise import interpolate

FULL_TEST = "trainer.limit_test_batches=null"  # the whole test sets, as WiSE's and the source evaluations see


def _ckpt(r, which="last.ckpt") -> dict:
    return torch.load(r["run_dir"] / "checkpoints" / which, map_location="cpu", weights_only=True)


def _backbone(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")}


def test_wise_ft_endpoints_are_the_probe_and_the_fine_tuned_model(run):
    r = run("schedule=wise_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4", FULL_TEST)
    alphas = [p["alpha"] for p in r["wise"]]
    assert alphas == [round(0.1 * i, 1) for i in range(11)]
    assert "test/wise/0.5/ood/printed/acc" in r["metrics"] and "test/wise/0.5/ood/mean/acc" in r["metrics"]
    # alpha = 1 is the checkpoint selected on ID validation, which the run's own test evaluated
    end = r["wise"][-1]["metrics"]
    for key in ("id/acc", "id/nll", "ood/printed/acc", "ood/corrupt_s5/ece", "ood/mean/acc"):
        assert end[f"test/wise/1/{key}"] == pytest.approx(r["metrics"][f"test/{key}"], abs=1e-6), key
    # theta_0: the pretrained body, bitwise, with the head a linear probe of the same seed ends with
    theta0 = _ckpt(r)["thawlab_theta0"]
    pretrained = pretrained_weights(r)
    for k, v in theta0.items():
        if k.startswith("backbone."):
            assert torch.equal(v, pretrained[k.removeprefix("backbone.")]), k
    probe = run("schedule=frozen", "trainer.max_epochs=2")
    probe_head = {k.removeprefix("net."): v for k, v in _ckpt(probe)["state_dict"].items() if k.startswith("net.head")}
    assert probe_head and all(torch.equal(theta0[k], v) for k, v in probe_head.items())
    # the interpolation gives both endpoints exactly
    theta_ft = {k.removeprefix("net."): v for k, v in _ckpt(r, Path(r["selection"]["checkpoint"]).name)
                ["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(interpolate(theta0, theta_ft, 0.0)[k], theta0[k]) for k in theta0)
    assert all(torch.equal(interpolate(theta0, theta_ft, 1.0)[k], theta_ft[k]) for k in theta0)
    half = interpolate(theta0, theta_ft, 0.5)
    k = "head.fc.weight"
    assert torch.allclose(half[k], (theta0[k] + theta_ft[k]) / 2) and not torch.equal(half[k], theta_ft[k])


def test_the_curve_reads_the_test_batches_the_test_pass_reads(run):
    """trainer.limit_test_batches (a smoke run: one batch a set) cuts the WiSE-FT curve as it cuts the test pass:
    alpha = 1, the selected checkpoint, gives the run's own test metrics."""
    r = run("schedule=wise_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4", "schedule.alphas=[0,1]",
            "diagnostics=none")
    for key in ("id/acc", "id/nll", "ood/printed/acc", "ood/corrupt_s5/ece", "ood/mean/acc"):
        assert r["metrics"][f"test/wise/1/{key}"] == pytest.approx(r["metrics"][f"test/{key}"], abs=1e-6), key


def test_measuring_fewer_sets_and_alphas_leaves_every_measured_value_as_it_is(run):
    """What the findings tests rely on (tests/test_findings_*.py measure only the sets and alphas they assert on):
    a run that evaluates fewer OOD sets and WiSE-FT alphas trains the same weights, selects the same epoch and
    gives every value it measures bitwise as the whole run does."""
    args = ("schedule=wise_ft", "schedule.lp_epochs=2", "trainer.max_epochs=4", FULL_TEST, "diagnostics=none")
    whole = run(*args)
    cut = run(*args, "data.ood=[printed]", "schedule.alphas=[0,0.5,1]")
    assert cut["selection"] == whole["selection"]
    measured = {k for k in cut["metrics"] if "/ood/mean/" not in k}  # the OOD mean: over the sets measured
    assert "test/wise/0.5/ood/printed/acc" in measured and measured < set(whole["metrics"])
    assert {k: cut["metrics"][k] for k in measured} == {k: whole["metrics"][k] for k in measured}
    name = Path(whole["selection"]["checkpoint"]).name
    a, b = _ckpt(whole, name)["state_dict"], _ckpt(cut, name)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_surgical_changes_only_the_chosen_group_and_keeps_bn_statistics(run):
    r = run("schedule=surgical", "schedule.groups=[1]", "trainer.max_epochs=2")
    chosen = r["trace"][0]["trainable_groups"][0]
    pretrained, trained = pretrained_weights(r), _backbone(_ckpt(r)["state_dict"])
    changed = {k for k, v in trained.items() if not torch.equal(v, pretrained[k])}
    assert changed and all(k.startswith(chosen) for k in changed), sorted(changed)[:5]
    assert not any("running_" in k for k in changed), "bn=eval: BatchNorm statistics stay as loaded"


def test_bitfit_trains_biases_only(run):
    r = run("schedule=bitfit", "trainer.max_epochs=2")
    state = _ckpt(r)["state_dict"]
    pretrained, trained = pretrained_weights(r), _backbone(state)
    changed = {k for k, v in trained.items() if not torch.equal(v, pretrained[k])}
    assert changed and all(k.endswith(".bias") for k in changed), sorted(changed)[:5]
    biases = sum(v.numel() for k, v in pretrained.items() if k.endswith(".bias") and not k.startswith("fc."))
    head = sum(v.numel() for k, v in state.items() if k.startswith("net.head."))
    assert r["trace"][0]["trainable_params"] == biases + head


def test_lora_trains_adapters_and_exports_a_merged_plain_timm_model(run):
    from thawlab.data.digits import DigitsTarget

    r = run("schedule=lora", "schedule.rank=4", "trainer.max_epochs=2")
    pretrained, trained = pretrained_weights(r), _backbone(_ckpt(r)["state_dict"])
    adapters = {k for k in trained if "lora_" in k}
    assert adapters
    for k, v in trained.items():  # the base weights stay as loaded
        if k not in adapters:
            assert torch.equal(v, pretrained[k.replace("base_layer.", "")]), k
    backbone_params = sum(v.numel() for k, v in pretrained.items() if not k.startswith("fc.") and "running" not in k
                          and "num_batches" not in k)
    assert r["trace"][0]["trainable_params"] < 0.2 * backbone_params
    # model.safetensors: a plain timm model with the new head as its classifier, no PEFT needed
    plain = timm.create_model("test_resnet", num_classes=10)
    plain.load_state_dict(load_file(str(r["run_dir"] / "model.safetensors")), strict=True)
    plain.eval()
    dm = DigitsTarget(preprocess=_preprocess(plain))
    dm.setup()
    x, y = dm.sets["test"]["id"].tensors
    with torch.no_grad():
        acc = (plain(x).argmax(1) == y).float().mean().item()
    run_full = run("schedule=lora", "schedule.rank=4", "trainer.max_epochs=2", FULL_TEST)  # same seed
    assert acc == pytest.approx(run_full["metrics"]["test/id/acc"], abs=1e-9)


def _preprocess(model):
    from thawlab.backbone import data_config
    from thawlab.data.digits import Preprocess

    dc = data_config(model)
    return Preprocess(32, int(dc["input_size"][0]), tuple(dc["mean"]), tuple(dc["std"]))


def test_l2sp_penalty_is_the_papers_formula_and_pulls_towards_w0(run):
    from thawlab.build import build_module, build_net
    from thawlab.data.digits import DigitsTarget
    from conftest import compose_cfg

    cfg = compose_cfg(["regularization=l2sp", "backbone.pretrained=false"])
    net, pre = build_net(cfg, 10, False)
    module = build_module(cfg, net, DigitsTarget(pre))
    module.net.apply_phase(module.phases[0])
    w0 = [p.detach().clone() for p in net.backbone.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    want = 0.1 / 2 * sum((p - q).pow(2).sum() for p, q in zip(net.backbone.parameters(), w0))
    want = want + 0.01 / 2 * sum(p.pow(2).sum() for p in net.head.parameters())
    assert module.l2sp_penalty().item() == pytest.approx(want.item(), rel=1e-5)

    def distance(r):
        pretrained, trained = pretrained_weights(r), _backbone(_ckpt(r)["state_dict"])
        return sum((trained[k] - pretrained[k]).pow(2).sum().item() for k in trained if k.endswith("weight"))

    plain = run("schedule=full", "trainer.max_epochs=2", "optimizer.lr=0.01")
    pulled = run("schedule=full", "trainer.max_epochs=2", "optimizer.lr=0.01", "regularization=l2sp",
                 "regularization.l2sp_alpha=50")
    assert distance(pulled) < 0.5 * distance(plain)


class _OptimizerState(L.Callback):
    def __init__(self):
        self.first_step = {}  # epoch -> (tensors with optimizer state, {group: lr}) at the epoch's first step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            opt = trainer.optimizers[0]
            self.first_step[trainer.current_epoch] = (len(opt.state), {g["name"]: g["lr"] for g in opt.param_groups})


def test_fine_tune_clears_optimizer_state_when_it_unfreezes(run, monkeypatch):
    probe = _OptimizerState()
    add_callbacks(monkeypatch, probe)
    r = run("schedule=fine_tune", "schedule.freeze_epochs=2", "trainer.max_epochs=4")
    assert [t["phase"] for t in r["trace"]] == ["frozen", "frozen", "unfrozen", "unfrozen"]
    assert probe.first_step[1][0] == 2  # the head's weight and bias carry Adam state into epoch 1
    assert probe.first_step[2][0] == 0  # unfreezing starts afresh
    lrs = probe.first_step[2][1]
    names = list(lrs)
    # one-cycle starts at max/div (div=5); max = base_lr/2 spread from /lr_mult (stem) to x1 (head)
    assert lrs["head"] == pytest.approx(2e-3 / 2 / 5)  # fastai's base lr 2e-3 (conf/schedule/fine_tune.yaml)
    assert lrs[names[0]] == pytest.approx(2e-3 / 2 / 100 / 5)


def test_forgetting_is_measured_with_the_source_head(run):
    frozen = run("schedule=frozen", "trainer.max_epochs=1")
    m = frozen["metrics"]
    assert {"test/source/acc", "test/source/nll", "pretrain/source/acc"} <= set(m)
    # a frozen backbone is the pretrained model: it keeps exactly the pretrained model's source accuracy
    assert m["test/source/acc"] == pytest.approx(m["pretrain/source/acc"], abs=1e-9)
    full = run("schedule=full", "trainer.max_epochs=2", "optimizer.lr=0.01")
    assert full["metrics"]["test/source/nll"] != pytest.approx(m["test/source/nll"])


class _BackboneCalls(L.Callback):
    def __init__(self):
        self.per_epoch, self.count = [], 0

    def on_fit_start(self, trainer, module):
        module.net.backbone.register_forward_hook(lambda m, i, o: setattr(self, "count", self.count + len(o)))
        self.per_epoch, self.count = [], 0

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        self.per_epoch.append(self.count)
        self.count = 0


def test_feature_cache_computes_features_once_and_changes_nothing(run, monkeypatch):
    common = ("schedule=lp_ft", "schedule.lp_epochs=3", "trainer.max_epochs=4", "data.batch_size=50",
              "trainer.limit_train_batches=null")  # 100 images in 2 batches: every image every epoch
    calls = _BackboneCalls()
    add_callbacks(monkeypatch, calls)
    cached = run(*common)
    samples_epoch0 = calls.per_epoch[0]
    assert samples_epoch0 >= 100
    assert calls.per_epoch[1:3] == [0, 0], "frozen phase: features come from the cache after the first epoch"
    assert calls.per_epoch[3] >= 100, "phase 2 trains the backbone: no cache"
    plain = run(*common, "cache_features=false")
    assert calls.per_epoch[:3] == [samples_epoch0] * 3
    for key, value in plain["metrics"].items():
        if re.match(r"test/(id|ood)/", key):
            assert cached["metrics"][key] == pytest.approx(value, abs=1e-4), key
    a, b = _ckpt(cached)["state_dict"], _ckpt(plain)["state_dict"]
    for k in a:
        if k.startswith("net."):
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
