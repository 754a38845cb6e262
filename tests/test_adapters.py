"""LoRA through PEFT on timm backbones: default targets per family, zero-init (output unchanged), real training
moves the output, merge reproduces it in a plain timm model, which loads without PEFT installed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from math import prod

import pytest
import timm
import torch
from torch import nn

from thawlab.adapters import add_lora, default_lora_targets, lora_parameter_count, merge_lora
from thawlab.backbone import block_groups
from thawlab.errors import ThawlabError

FAMILIES = [("test_resnet", {}), ("test_convnext", {}), ("test_vit", {"img_size": 32})]
IDS = [f[0] for f in FAMILIES]
# the leaf names the default rule must pick in every block (and nothing else), per family
DEFAULT_LEAVES = {
    "test_resnet": {"conv1", "conv2", "conv3", "downsample.1"},
    "test_convnext": {"mlp.fc1", "mlp.fc2", "downsample.1"},
    "test_vit": {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"},
}
BLOCK = {"test_resnet": r"layer\d\.\d+\.", "test_convnext": r"stages\.\d\.(blocks\.\d+\.)?",
         "test_vit": r"blocks\.\d+\."}
RANK, ALPHA = 8, 16


def _plain(name: str, kwargs: dict) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _expected_lora_params(module: nn.Module, r: int) -> int:
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    return r * (module.in_channels * prod(module.kernel_size) + module.out_channels)  # A: kxk conv, B: 1x1


@pytest.fixture(scope="module")
def roundtrips(tmp_path_factory):
    """Per family, once: inject, train the adapters a few real steps, merge; outputs and facts at each stage."""
    out_dir = tmp_path_factory.mktemp("lora")
    records = {}
    for name, kwargs in FAMILIES:
        torch.manual_seed(0)
        backbone = _plain(name, kwargs)  # eval: BatchNorm statistics stay put, only the adapters change outputs
        plain_keys = list(backbone.state_dict())
        plain_groups = block_groups(backbone)
        targets = [(n, m) for n, m in backbone.named_modules() if n in set(default_lora_targets(backbone))]
        expected_count = sum(_expected_lora_params(m, RANK) for _, m in targets)
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            y_plain = backbone(x)

        wrapped = add_lora(backbone, rank=RANK, alpha=ALPHA)
        named = dict(backbone.named_parameters())
        lora = [p for n, p in named.items() if "lora_" in n]
        with torch.no_grad():
            y_injected = backbone(x)
        b_zero = all(not p.any() for n, p in named.items() if "lora_B" in n)
        base_before = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
        base_requires_grad = all(p.requires_grad for n, p in named.items() if "lora_" not in n)

        opt = torch.optim.Adam(lora, lr=1e-2)  # the adapters only; base weights keep requires_grad=True
        target = torch.randn_like(y_plain)
        for _ in range(3):
            loss = nn.functional.mse_loss(backbone(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            y_adapted = backbone(x)
        base_untouched = all(torch.equal(p, base_before[n]) for n, p in backbone.named_parameters() if n in base_before)
        adapted_groups = block_groups(backbone)

        merged = merge_lora(backbone)
        with torch.no_grad():
            y_merged = merged(x)
        sd = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
        torch.save({"state_dict": sd, "x": x, "y": y_merged}, out_dir / f"{name}.pt")
        records[name] = dict(
            wrapped=wrapped, targets=[n for n, _ in targets], lora_count=sum(p.numel() for p in lora),
            expected_count=expected_count, backbone_count=sum(p.numel() for p in base_before.values()),
            y_plain=y_plain, y_injected=y_injected, y_adapted=y_adapted, y_merged=y_merged, b_zero=b_zero,
            base_requires_grad=base_requires_grad, base_untouched=base_untouched, plain_keys=plain_keys,
            merged_keys=list(sd), plain_groups=plain_groups, adapted_groups=adapted_groups, merged=merged,
            file=out_dir / f"{name}.pt")
    return records


@pytest.mark.parametrize("name", IDS)
def test_default_targets_wrap_the_block_layers(roundtrips, name):
    r = roundtrips[name]
    assert r["wrapped"] and sorted(r["wrapped"]) == sorted(r["targets"])
    leaves = {next(s for s in DEFAULT_LEAVES[name] if w.endswith("." + s)) for w in r["wrapped"]
              if any(w.endswith("." + s) for s in DEFAULT_LEAVES[name])}
    assert leaves == DEFAULT_LEAVES[name], r["wrapped"]
    others = [w for w in r["wrapped"] if not any(w.endswith("." + s) for s in DEFAULT_LEAVES[name])]
    assert not others, f"unexpected targets {others}"
    assert all(re.match(BLOCK[name], w) for w in r["wrapped"]), "only layers inside the blocks"
    if name == "test_convnext":
        assert not any("conv_dw" in w for w in r["wrapped"]), "depthwise convs cannot merge"


@pytest.mark.parametrize("name", IDS)
def test_lora_parameters_are_few_and_placed_in_their_block(roundtrips, name):
    r = roundtrips[name]
    ratio = r["lora_count"] / r["backbone_count"]
    msg = (f"{name}: {r['lora_count']} LoRA parameters (rank {RANK}) vs {r['backbone_count']} in the backbone "
           f"({ratio:.1%})")
    print(msg)
    assert r["lora_count"] == r["expected_count"], msg
    assert 0 < ratio < 0.2, msg  # tiny test models; ~2% on resnet50 / swin_tiny
    # timm's group_matcher still sees the backbone's paths: same groups, each adapter beside its base weight
    plain, adapted = r["plain_groups"], r["adapted_groups"]
    assert list(adapted) == list(plain)
    for g, names in adapted.items():
        base = [n.replace(".base_layer.", ".") for n in names if "lora_" not in n]
        assert base == plain[g]
        for n in names:
            if "lora_" in n:
                layer = n.split(".lora_")[0]
                assert f"{layer}.weight" in plain[g], f"{n} not in the group of {layer}"


@pytest.mark.parametrize("name", IDS)
def test_injection_is_identity_training_moves_merge_reproduces(roundtrips, name):
    r = roundtrips[name]
    assert r["b_zero"]
    assert torch.equal(r["y_injected"], r["y_plain"]), "zero-initialised B must leave the output unchanged"
    assert r["base_requires_grad"], "add_lora must not change requires_grad of the backbone's parameters"
    assert r["base_untouched"]
    change = (r["y_adapted"] - r["y_plain"]).abs().max().item()
    assert change > 1e-3, f"training the adapters did not change the output ({change})"
    diff = (r["y_merged"] - r["y_adapted"]).abs().max().item()
    assert torch.allclose(r["y_merged"], r["y_adapted"], rtol=1e-5, atol=1e-5), f"merged differs by {diff}"
    assert r["merged_keys"] == r["plain_keys"]
    assert not [n for n, m in r["merged"].named_modules() if type(m).__module__.startswith("peft")]
    assert "peft_config" not in vars(r["merged"])


def test_merged_weights_load_into_plain_timm_without_peft(roundtrips):
    script = textwrap.dedent("""
        import json, sys
        sys.modules["peft"] = None  # any import of peft now fails
        import timm, torch
        out = {}
        for name, kwargs, path in json.loads(sys.argv[1]):
            ckpt = torch.load(path, weights_only=True)
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
            model.load_state_dict(ckpt["state_dict"], strict=True)
            with torch.no_grad():
                y = model(ckpt["x"])
            out[name] = (y - ckpt["y"]).abs().max().item()
        assert "peft" not in sys.modules or sys.modules["peft"] is None
        print(json.dumps(out))
    """)
    jobs = [(name, kwargs, str(roundtrips[name]["file"])) for name, kwargs in FAMILIES]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == set(IDS)
    assert all(d <= 1e-6 for d in diffs.values()), diffs


def test_explicit_targets_list_and_regex():
    vit = _plain("test_vit", {"img_size": 32})
    wrapped = add_lora(vit, rank=2, alpha=4, target_modules=["qkv"])
    assert wrapped and all(w.endswith(".attn.qkv") for w in wrapped)
    assert len(wrapped) == len(vit.blocks)
    resnet = _plain("test_resnet", {})
    wrapped = add_lora(resnet, rank=2, target_modules=r"layer[34]\.\d+\.conv\d")
    assert wrapped and all(w.startswith(("layer3.", "layer4.")) for w in wrapped)
    assert merge_lora(resnet) is resnet and list(resnet.state_dict()) == list(_plain("test_resnet", {}).state_dict())


@pytest.mark.parametrize("targets,expect", [
    (["nope"], "['nope'] matches no module of test_resnet"),
    (r"layer\d\.nope", "matches no module of test_resnet"),
    (["bn1"], "BatchNorm2d"),  # a norm layer
    (["conv1"], "Sequential"),  # test_resnet's deep stem conv1 is a container
    ("layer[", "not a valid regular expression"),
    (["conv1", 3], "must be a list of module names or a regex string"),
])
def test_bad_targets_are_one_line_errors(targets, expect):
    backbone = _plain("test_resnet", {})
    with pytest.raises(ThawlabError) as e:
        add_lora(backbone, target_modules=targets)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, msg
    if isinstance(targets, list):
        assert "target_modules=" in msg
    assert not any("lora_" in n for n, _ in backbone.named_parameters()), "nothing injected on error"


def test_unmergeable_layers_are_refused_and_named():
    convnext = _plain("test_convnext", {})
    with pytest.raises(ThawlabError, match=r"conv_dw.*groups=24"):
        add_lora(convnext, target_modules=["conv_dw"])
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    with pytest.raises(ThawlabError, match=r"dilation=\(2, 2\)"):
        add_lora(dilated, target_modules=["0"], name="toy")
    with pytest.raises(ThawlabError, match="rank=0 must be a positive integer"):
        add_lora(convnext, rank=0)


def test_typo_gets_a_suggestion_and_adding_twice_is_refused():
    vit = _plain("test_vit", {"img_size": 32})
    with pytest.raises(ThawlabError, match="did you mean qkv"):
        add_lora(vit, target_modules=["qvk"], name="test_vit")
    add_lora(vit, target_modules=["fc1"])
    with pytest.raises(ThawlabError, match="already has LoRA adapters"):
        add_lora(vit)


# ---- L2-SP with LoRA: the penalty is on the merged weights, as PEFT merges them --------------------------------
# random init; ResNet without timm's zero-initialised last BN of each block, which would keep those blocks'
# adapters at zero (their gradients are zero while that BN, frozen under LoRA, is)
@pytest.mark.parametrize("name,kwargs", [("test_vit", {"img_size": 32}), ("test_resnet", {"zero_init_last": False})],
                         ids=["vit", "resnet"])
def test_l2sp_with_lora_is_the_distance_of_peft_merged_weights_to_w0(name, kwargs):
    """Li et al.'s alpha/2 ||w - w0||^2 with w the weights the adapted network computes with: after some real
    training steps (B nonzero), the penalty equals the distance of PEFT's own `merge_and_unload()` result (a copy of
    the same model wrapped by `get_peft_model`, given the trained adapters) to the weights as loaded."""
    from peft import LoraConfig, get_peft_model

    from conftest import compose_cfg
    from thawlab.build import build_module, build_net
    from thawlab.data.digits import DigitsTarget

    alpha = 0.1
    cfg = compose_cfg(["logger=none", "backbone.pretrained=false", f"backbone.name={name}",
                       *[f"+backbone.kwargs.{k}={v}" for k, v in kwargs.items()], "schedule=lora",
                       "schedule.rank=4", "regularization=l2sp", f"regularization.l2sp_alpha={alpha}",
                       "regularization.l2sp_beta=0"])
    torch.manual_seed(0)
    net, pre = build_net(cfg, 10, False)
    module = build_module(cfg, net, DigitsTarget(pre))
    module.net.apply_phase(module.phases[0])
    w0 = {k.replace(".base_layer.", "."): v.clone() for k, v in net.backbone.state_dict().items() if "lora_" not in k}
    assert module.l2sp_penalty().item() == 0.0  # B = 0: the merged weights are w0

    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(net(x), y) + module.l2sp_penalty()).backward()
        opt.step()
    bs = [p for n, p in net.backbone.named_parameters() if "lora_B" in n]
    assert all(b.abs().max() > 0 for b in bs), "training moved every B"
    assert not any(p.requires_grad for n, p in net.backbone.named_parameters() if "lora_" not in n)
    penalty = module.l2sp_penalty()

    # the reference: PEFT's own wrapping and merge of a copy of the same model
    plain = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    plain.load_state_dict(w0)
    wrapped = [n for n, m in net.backbone.named_modules() if type(m).__module__.startswith("peft.")
               and hasattr(m, "lora_A")]
    config = LoraConfig(r=4, lora_alpha=cfg.schedule.alpha, target_modules="|".join(re.escape(n) for n in wrapped))
    peft_model = get_peft_model(plain, config)
    peft_model.base_model.model.load_state_dict(net.backbone.state_dict())  # same keys: inject keeps module paths
    merged = peft_model.merge_and_unload().state_dict()
    want = alpha / 2 * sum((merged[k].double() - w0[k].double()).pow(2).sum() for k in w0
                           if merged[k].is_floating_point())
    assert set(merged) == set(w0)
    assert want.item() > 0
    assert penalty.item() == pytest.approx(want.item(), rel=1e-5)

    # not the factors' distance to their initialisation (what was penalised before)
    assert penalty.grad_fn is not None
    penalty.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in net.backbone.named_parameters()
               if "lora_A" in n)


def test_l2sp_alpha_with_reft_is_a_one_line_error():
    from conftest import compose_cfg
    from thawlab.build import check_config

    with pytest.raises(ThawlabError, match=r"regularization.l2sp_alpha=0.1 with schedule.adapter=reft: it edits "
                                           r"activations and moves no pretrained weight"):
        check_config(compose_cfg(["logger=none", "schedule=reft", "regularization=l2sp"]))
    check_config(compose_cfg(["logger=none", "schedule=reft", "regularization=l2sp", "regularization.l2sp_alpha=0"]))
