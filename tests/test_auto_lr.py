"""Auto-RGN and Auto-SNR (Lee et al., ICLR 2023; thawlab/auto_lr.py): the multipliers against the paper's
formulas applied to gradients derived by hand, and the lrs a real run applies per tensor."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from torch.nn.modules.batchnorm import _BatchNorm

from conftest import add_callbacks
from thawlab import auto_lr


def _hand_gradients(w, b, x, y):
    """Softmax regression, logits = x W^T + b, mean cross-entropy over the batch: dL/dW = (P - Y)^T x / n,
    dL/db = sum over the batch of (P - Y) / n, P the softmax, Y the one-hot labels."""
    p = torch.softmax(x @ w.T + b, dim=1)
    r = (p - torch.nn.functional.one_hot(y, w.shape[0]).double()) / len(x)
    return r.T @ x, r.sum(0)


def _unbiased_var_rows(g):
    """Variance along dim 0 with n - 1 in the denominator, written out."""
    mean = g.sum(0, keepdim=True) / g.shape[0]
    return ((g - mean) ** 2).sum(0, keepdim=True) / (g.shape[0] - 1)


def test_multipliers_equal_the_papers_formulas_on_hand_derived_gradients():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)
    batches = [(torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(3)]
    lin = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    params = list(lin.named_parameters())

    grads = [_hand_gradients(w, b, x, y) for x, y in batches]
    # RGN: ||g|| / ||w|| per batch, averaged over the batches, over the largest tensor's
    rgn_w = sum(float(gw.norm() / w.norm()) for gw, _ in grads) / 3
    rgn_b = sum(float(gb.norm() / b.norm()) for _, gb in grads) / 3
    stats = auto_lr.tensor_statistics(lin, params, batches, "rgn")
    assert stats["weight"] == pytest.approx(rgn_w, rel=1e-10) and stats["bias"] == pytest.approx(rgn_b, rel=1e-10)
    top = max(rgn_w, rgn_b)
    assert auto_lr.multipliers(stats, "rgn") == pytest.approx({"weight": rgn_w / top, "bias": rgn_b / top})
    assert max(auto_lr.multipliers(stats, "rgn").values()) == 1.0

    # SNR: mean over entries of g^2 / (unbiased variance along dim 0 + 1e-8), averaged; on (1) or off (0) at 0.95
    snr_w = sum(float((gw ** 2 / (_unbiased_var_rows(gw) + 1e-8)).mean()) for gw, _ in grads) / 3
    snr_b = sum(float((gb ** 2 / (_unbiased_var_rows(gb) + 1e-8)).mean()) for _, gb in grads) / 3
    stats = auto_lr.tensor_statistics(lin, params, batches, "snr")
    assert stats["weight"] == pytest.approx(snr_w, rel=1e-8) and stats["bias"] == pytest.approx(snr_b, rel=1e-8)
    thr = (snr_w + snr_b) / 2  # a threshold between the two: one tensor on, the other off
    on = auto_lr.multipliers(stats, "snr", thr)
    assert sorted(on.values()) == [0.0, 1.0] and on["weight"] == float(snr_w >= thr)


def test_edge_cases_follow_the_reference_or_are_stated():
    # an all-zero tensor has no relative gradient: full lr, left out of the maximum
    assert auto_lr.multipliers({"a": 2.0, "b": 0.5, "z": math.inf}, "rgn") == {"a": 1.0, "b": 0.25, "z": 1.0}
    # SNR of a one-row tensor is NaN (the variance of one value), which the reference's `v < 0.95` keeps on
    assert math.isnan(auto_lr.snr(torch.ones(1, 4)))
    assert auto_lr.multipliers({"one_row": math.nan, "low": 0.5, "high": 0.95}, "snr") == {
        "one_row": 1.0, "low": 0.0, "high": 1.0}


class LrProbe(L.Callback):
    """Records, at the first training step of each epoch, every optimizer group's lr and the multipliers."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        opt = trainer.optimizers[0]
        if batch_idx == 0 and "tensor" in opt.param_groups[0]:  # not the source pretraining's trainer
            self.seen[trainer.current_epoch] = {
                "lrs": {g["tensor"]: g["lr"] for g in opt.param_groups},
                "bn": {f"{m}.{p}" for m, mod in module.net.named_modules() if isinstance(mod, _BatchNorm)
                       for p, _ in mod.named_parameters(recurse=False)},
                "mult": dict(module.auto_lr.mult), "state": len(opt.state),
                "weights": {n: p.detach().clone() for n, p in module.net.named_parameters()}}


@pytest.mark.parametrize("schedule", ["auto_rgn", "auto_snr"])
def test_a_run_scales_each_tensor_by_its_multiplier_every_epoch(run, monkeypatch, schedule):
    probe = LrProbe()
    add_callbacks(monkeypatch, probe)
    res = run(f"schedule={schedule}", "optimizer.schedule=constant", "diagnostics=none")
    assert sorted(probe.seen) == [0, 1, 2]
    for epoch, seen in probe.seen.items():
        assert seen["state"] == 0  # a fresh optimizer state whenever the multipliers change (the reference)
        mult = seen["mult"]
        for name, lr in seen["lrs"].items():
            expected = 1.0 if name.startswith("head.") else mult.get(name, 0.0)  # BatchNorm weights: not tuned
            assert lr == pytest.approx(1e-3 * expected), (epoch, name)
        assert set(seen["lrs"]) - set(mult) == seen["bn"], "only BatchNorm's weights left out (bn=frozen)"
        trace = res["trace"][epoch]["auto_lr"]  # per group, the mean multiplier of its tensors
        assert trace["head"] == 1.0 and set(trace) == {"stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0",
                                                       "head"}
    body = [n for n in probe.seen[0]["mult"] if not n.startswith("head.")]
    if schedule == "auto_rgn":
        assert max(probe.seen[0]["mult"][n] for n in body) <= 1.0 and min(probe.seen[0]["mult"].values()) > 0
        assert probe.seen[0]["mult"] != probe.seen[1]["mult"]  # recomputed on the moved weights
    else:
        assert set(probe.seen[0]["mult"].values()) <= {0.0, 1.0}
        off = [n for n in body if probe.seen[0]["mult"][n] == 0.0 and probe.seen[1]["mult"][n] == 0.0]
        assert off, "some tensor held still"
        for n in off:  # held still through epoch 0: lr 0 (weight_decay 0)
            assert torch.equal(probe.seen[0]["weights"][n], probe.seen[1]["weights"][n]), n
