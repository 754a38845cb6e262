"""Drift diagnostics (thawlab/diagnostics.py): linear CKA against the paper's formula, the group outputs the
hooks read, the measurements on networks whose drift is known, results.json, and bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import cli
from thawlab import diagnostics as dg
from thawlab.errors import ThawlabError


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (ICML 2019), eq. 1-2 written out: K = X X^T, L = Y Y^T, H = I - 11^T/n,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2, CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_equals_the_hsic_formula_and_has_its_invariances():
    g = torch.Generator().manual_seed(0)
    d = torch.float64  # the invariances exactly, not up to float32 rounding of the transformed features
    x = torch.randn(64, 20, generator=g, dtype=d)
    y = x @ torch.randn(20, 30, generator=g, dtype=d) + 0.5 * torch.randn(64, 30, generator=g, dtype=d)
    z = torch.randn(64, 30, generator=g, dtype=d)
    for a, b in ((x, y), (x, z), (y, z), (x, x)):
        assert dg.linear_cka(a, b) == pytest.approx(reference_cka(a, b), abs=1e-12)
    assert dg.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=d))
    assert dg.linear_cka(x @ q, y) == pytest.approx(dg.linear_cka(x, y), abs=1e-10)  # orthogonal transform
    assert dg.linear_cka(7.5 * x, y) == pytest.approx(dg.linear_cka(x, y), abs=1e-12)  # isotropic scaling
    assert dg.linear_cka(x + 3.0, y) == pytest.approx(dg.linear_cka(x, y), abs=1e-10)  # a shift: centred away
    # not invariant to an arbitrary invertible map (the measure can tell representations apart)
    a = torch.diag(torch.linspace(0.05, 5, 20, dtype=d))
    assert abs(dg.linear_cka(x @ a, y) - dg.linear_cka(x, y)) > 1e-2
    assert 0 < dg.linear_cka(x, z) < 0.6 < dg.linear_cka(x, y) < 1
    # conv maps: (n, c, h, w) flattened per sample
    assert dg.linear_cka(y.reshape(64, 3, 5, 2), y) == pytest.approx(1.0, abs=1e-12)


def test_relative_change_and_weight_change():
    f0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    f = torch.tensor([[3.0, 4.0 + 5.0], [1.0, 2.0]])
    assert dg.relative_change(f, f0) == pytest.approx((5 / 5 + 2 / 1) / 2)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.weight.mul_(1.5)
    w0 = (a.weight.pow(2).sum() + a.bias.pow(2).sum()).detach()
    expected = math.sqrt(float((0.5 * a.weight.detach()).pow(2).sum() / w0))
    out = dg.weight_change(b, a, {"lin": ["weight", "bias"], "bias": ["bias"]})
    assert out["lin"] == pytest.approx(expected) and out["bias"] == 0.0


def _net(name="test_resnet", **kwargs):
    from thawlab import backbone as bb
    from thawlab.heads import LinearHead
    from thawlab.model import ThawNet

    torch.manual_seed(0)
    m = bb.create_backbone(name, False, kwargs)
    return ThawNet(m, LinearHead(m.num_features, 10), bb.block_groups(m, True))


def test_group_outputs_are_the_stage_outputs():
    """The hooks read what each stage returns: on a ResNet the stem's max-pool and each layer; on a ViT the
    tokens after the position embedding, each block and the final norm; never the pooling after the body."""
    net = _net().eval()
    mods = dg.output_modules(net)
    assert dict(mods) == {"stem": "backbone.maxpool", "layer1.0": "backbone.layer1", "layer2.0": "backbone.layer2",
                          "layer3.0": "backbone.layer3", "layer4.0": "backbone.layer4"}
    x = torch.randn(4, 3, 32, 32)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    feats = dg._features(net, mods, torch.utils.data.DataLoader(ds, batch_size=3), "cpu", False)
    b = net.backbone
    with torch.no_grad():
        stem = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        assert torch.allclose(feats["stem"], stem, atol=1e-6)
        assert torch.allclose(feats["layer1.0"], b.layer1(stem), atol=1e-6)
        assert torch.allclose(feats["layer4.0"], b.forward_features(x), atol=1e-5)
        assert torch.allclose(feats[dg.POOLED], b(x), atol=1e-5)
    vit = _net("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    mods = dg.output_modules(vit)
    # timm's matcher puts the last block and the final norm in one group (`top`): its output is the norm's
    assert dict(mods) == {"stem": "backbone.norm_pre", "blocks.0": "backbone.blocks.0",
                          "blocks.1": "backbone.blocks.1", "top": "backbone.norm"}, mods
    # PoolFormer (no matcher: a group per top-level module): timm calls its `head` module's children one by one,
    # never `head` itself, so the group's output is the last of them that runs
    pool = _net("poolformer_s12")
    assert dg.output_modules(pool)["top"] == "backbone.head"
    assert dg.output_modules(pool, torch.randn(1, 3, 32, 32))["top"] == "backbone.head.fc"


def test_monitor_measures_known_drift():
    """A network equal to theta_0 has CKA 1 and no change; one whose third block group alone moved changes
    there and after it, not before."""
    net = _net()
    sets = {"id": torch.utils.data.TensorDataset(torch.randn(40, 3, 32, 32), torch.zeros(40, dtype=torch.long)),
            "ood/x": torch.utils.data.TensorDataset(torch.randn(30, 3, 32, 32) * 2, torch.zeros(30, dtype=torch.long))}
    mon = dg.DriftMonitor(net, sets, samples=25, seed=3, batch_size=16)
    assert {n: len(i) for n, (_, i) in mon.subsets.items()} == {"id": 25, "ood/x": 25}
    same = mon.measure(net)
    for name in sets:
        for g, v in same["cka"][name].items():
            assert v == pytest.approx(1.0, abs=1e-9) and same["feature_change"][name][g] == 0.0, (name, g)
    assert all(v == 0.0 for g, v in same["weight_change"].items())
    with torch.no_grad():
        for p in net.backbone.layer2.parameters():
            p.add_(0.3 * torch.randn_like(p))
    moved = mon.measure(net, epoch=4)
    assert moved["epoch"] == 4
    assert [g for g, v in moved["weight_change"].items() if v > 0] == ["layer2.0"]
    ch = moved["feature_change"]["id"]
    assert ch["stem"] == 0 and ch["layer1.0"] == 0 and ch["layer2.0"] > 0.05 and ch[dg.POOLED] > 0
    assert moved["cka"]["id"]["layer2.0"] < 1 - 1e-4
    assert moved["distortion"]["ood/x"] == pytest.approx(moved["feature_change"]["ood/x"][dg.POOLED] / ch[dg.POOLED])
    assert moved["distortion"]["ood/mean"] == pytest.approx(moved["distortion"]["ood/x"])
    assert net.training  # the measurement leaves the network's mode as it was


def test_samples_are_fixed_by_the_seed():
    a = dg.sample_indices(1000, 100, 5, "id")
    assert torch.equal(a, dg.sample_indices(1000, 100, 5, "id")) and len(a.unique()) == 100
    assert not torch.equal(a, dg.sample_indices(1000, 100, 6, "id"))
    assert not torch.equal(a, dg.sample_indices(1000, 100, 5, "ood/printed"))
    assert torch.equal(dg.sample_indices(50, 100, 5, "id"), torch.arange(50))


def test_run_records_drift_per_epoch_and_of_the_selected_checkpoint(run):
    # the whole test pass (smoke runs test one batch a set) in batches of 256: the selected checkpoint's drift is
    # read off it
    res = run("diagnostics.every=1", "diagnostics.samples=64", "diagnostics.sets=[id,ood/printed]",
              "trainer.limit_test_batches=1.0", "data.eval_batch_size=256")
    d = res["diagnostics"]
    assert d["samples"] == {"id": 64, "ood/printed": 64} and d["groups"][-1] == "pooled"
    assert [h["epoch"] for h in d["history"]] == [0, 1, 2]
    assert d["final"]["epoch"] == res["selection"]["epoch"]
    # the selected checkpoint's features come from its test pass (64 of each set's 360 images, every batch
    # holding some), and its drift equals that of the same epoch measured during fit by a pass of the
    # monitor's own, 64 images a batch
    assert d["final_features"] == "the test pass"
    same = d["history"][d["final"]["epoch"]]
    for name in same["cka"]:
        assert d["final"]["cka"][name] == pytest.approx(same["cka"][name], abs=1e-9)
    assert d["final"]["weight_change"] == pytest.approx(same["weight_change"], abs=1e-12)
    assert set(d["final"]["distortion"]) == {"ood/printed", "ood/mean"}
    assert all(0 < v < 1 + 1e-9 for v in d["final"]["cka"]["id"].values())
    # a linear probe: the body does not move
    frozen = run("schedule=frozen", "diagnostics.samples=32", "trainer.limit_test_batches=1.0",
                 "data.eval_batch_size=256")
    f = frozen["diagnostics"]["final"]
    assert all(v == 0.0 for g, v in f["weight_change"].items() if g != "head")
    assert all(v == pytest.approx(1.0) for v in f["cka"]["id"].values())
    assert set(f["distortion"].values()) == {None}  # no ID feature change: the ratio is undefined
    assert len(f["cka"]) == 7 and "history" in frozen["diagnostics"] and not frozen["diagnostics"]["history"]
    assert frozen["diagnostics"]["final_features"] == "the test pass"
    # the L-BFGS probe's test features come from the feature store, the body never runs in the test pass: the
    # monitor makes its own pass, with the same answer
    solved = run("schedule=frozen", "schedule.solver=lbfgs", "diagnostics.samples=32")
    assert solved["diagnostics"]["final_features"] == "a pass of their own"
    s = solved["diagnostics"]["final"]
    assert all(v == pytest.approx(1.0) for v in s["cka"]["id"].values())
    assert all(v == 0.0 for g, v in s["weight_change"].items() if g != "head")
    # a test pass cut to one batch a set misses sampled images: a pass of its own
    assert run("diagnostics.samples=32")["diagnostics"]["final_features"] == "a pass of their own"
    assert "diagnostics" not in run("diagnostics=none")


def test_unknown_set_is_one_line(run):
    with pytest.raises(ThawlabError, match=r"diagnostics.sets: unknown set 'ood/printd'.*did you mean ood/printed\?"):
        run("diagnostics.sets=[id,ood/printd]")


def test_bad_diagnostics_values_are_one_line(tmp_path):
    """Through the CLI: exit 2, one line, before anything runs; `every` beyond the run is checked with the
    config (build.check_config), before the pretraining."""
    r = cli("diagnostics.samples=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
            cache=str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("thawlab-train: error:")]
    assert errors == ["thawlab-train: error: diagnostics.samples=0 must be a positive integer"], r.stderr[-2000:]
    assert not (tmp_path / "c").exists()
    from conftest import compose_cfg
    from thawlab.build import check_config

    with pytest.raises(ThawlabError, match=r"^diagnostics.every=30 is beyond the run's trainer.max_epochs=20"):
        check_config(compose_cfg(["diagnostics.every=30"]))
    check_config(compose_cfg(["diagnostics.every=30", "diagnostics=none"]))  # off: nothing to check
