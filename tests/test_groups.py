"""Block groups come from timm's group_matcher, generically: every parameter in exactly one group, forward
order, the classifier only in our head. Checked on every common timm family (random init, 32x32 inputs), and
a smoke training per family and schedule shows the groups train when the schedule says."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch

from thawlab.backbone import block_groups
from thawlab.heads import LinearHead
from thawlab.model import ThawNet

NUM_CLASSES = 10  # the digits target task (data=digits, the default)

# family -> (timm model, create_model kwargs): timm's tiny test_* model where the family has one, else its
# smallest real architecture shrunk by kwargs; all run on the 32x32 digits.
FAMILIES = {
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {}),  # keeps head.norm (num_classes=0): unmatched, after the last block
    "efficientnet": ("test_efficientnet", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),  # conv_head: unmatched, after the last block
    "regnet": ("regnetx_002", {"depth": 6, "w0": 16, "wa": 16.0, "wm": 1.5}),  # 4 stages of 1, 1, 2, 2 blocks
    "vit": ("test_vit", {"img_size": 32, "patch_size": 4}),
    # depths[0]=2: stage 0 (8x8 tokens, 4x4 windows) runs a shifted-window block too
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4, "embed_dim": 24,
                                              "depths": [2, 1, 1, 1], "num_heads": [1, 1, 1, 1]}),
    # the distilled DeiT: a dist_token beside cls_token (its distillation classifier, like the other, is
    # an Identity with num_classes=0)
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48,
                                                 "num_heads": 2}),
    # keeps head.norm and head.pre_logits (num_classes=0): a backbone group whose module path is "head"
    "mambaout": ("test_mambaout", {}),
    # No group_matcher in timm 1.0.31 (nor in CSATv2): PoolingVisionTransformer holds pos_embed and cls_token
    # itself, outside any child module; MetaFormer (poolformer, convformer, caformer) has a top-level child
    # called head. poolformer_s12 fixes its depths and dims, so it runs at full size (11M parameters).
    "pit": ("pit_ti_224", {"img_size": 32, "patch_size": 4, "stride": 4, "depth": [1, 1, 1],
                           "base_dims": [16, 16, 16]}),
    "metaformer": ("poolformer_s12", {}),
}
NO_MATCHER = {"pit", "metaformer"}

# schedule -> (overrides, trainable groups per epoch of a 2-epoch run, given the backbone groups in forward
# order). A new schedule is one more line here.
SCHEDULES = {
    "gradual": (["schedule.interval=1"], lambda g: [["head"], [g[-1], "head"]]),
    "lp_ft": (["schedule.lp_epochs=1"], lambda g: [["head"], [*g, "head"]]),
    "surgical": (["schedule.groups=[1]"], lambda g: [[g[1], "head"]] * 2),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on shared cores, torch's threads wait on each other (10x slower), not so with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backbone(family: str) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _groups(backbone, coarse=True) -> tuple[dict, list[str]]:
    """block_groups and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = block_groups(backbone, coarse)
    return groups, [str(w.message) for w in caught]


def _run_order(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> rank of its module's first call in a forward pass (32x32). The model's own
    parameters (cls_token, pos_embed) have no module to time: absent."""
    owners = {n: m for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None}
    first_call: dict[str, int] = {}

    def called(name):
        def hook(_module, _args):  # returns None: a pre-hook's return value would replace the module's input
            first_call.setdefault(name, len(first_call))
        return hook

    hooks = [m.register_forward_pre_hook(called(n)) for n, m in owners.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert set(first_call) == set(owners), f"modules that never ran: {sorted(set(owners) - set(first_call))}"
    return {f"{n}.{p}": first_call[n] for n, m in owners.items() for p, _ in m.named_parameters(recurse=False)}


def _out_of_order(groups: dict, when: dict[str, int]) -> list[str]:
    """Parameters whose module runs before a module of an earlier group (the forward order broken)."""
    bad, latest = [], -1
    for g, names in groups.items():
        timed = [n for n in names if n in when]
        bad += [f"{n} (in {g})" for n in timed if when[n] < latest]
        latest = max([latest, *(when[n] for n in timed)])
    return bad


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "fine"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_partition_is_complete_disjoint_and_ordered(family, coarse):
    backbone = _backbone(family)
    names = [n for n, _ in backbone.named_parameters()]
    groups, warned = _groups(backbone, coarse)

    if family in NO_MATCHER:  # the fallback: one group per top-level child module, with a warning
        assert not hasattr(backbone, "group_matcher"), f"timm gave {family} a group_matcher: fallback untested"
        assert len(warned) == 1 and "has no timm group_matcher" in warned[0], warned
        own = [n for n in names if "." not in n]  # the model's own tokens go with the first child (stem)
        children = [[f"{c}.{n}" for n, _ in m.named_parameters()] for c, m in backbone.named_children()]
        children = [ps for ps in children if ps]  # PiT's pos_drop, head: no parameters, no group
        assert list(groups.values()) == [own + children[0], *children[1:]]
    else:
        assert warned == [], f"spurious warning on {family}: {warned}"

    flat = [n for ns in groups.values() for n in ns]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat)), "every parameter in exactly one group"
    assert list(groups)[0] == "stem" and len(groups) >= 3 and "head" not in groups
    order = {n: i for i, n in enumerate(names)}
    firsts = [min(order[n] for n in ns) for ns in groups.values()]
    assert firsts == sorted(firsts), "groups must follow forward order"

    when = _run_order(backbone)
    assert all(n in groups["stem"] for n in names if n not in when), "the model's own tokens belong to the stem"
    assert min(when, key=when.get) in groups["stem"], "the first module to run is in the stem"
    assert _out_of_order(groups, when) == [], "a group runs before an earlier group"
    *earlier, top = groups.values()
    last_before_top = max(when[n] for ns in earlier for n in ns if n in when)
    early_in_top = [n for n in top if when.get(n, last_before_top + 1) <= last_before_top]
    assert early_in_top == [], "parameters that run before the last block were pushed into the top group (#2712)"

    net = ThawNet(backbone, LinearHead(_width(backbone), NUM_CLASSES), groups)
    assert net.groups["head"] == ["head.fc.weight", "head.fc.bias"]
    assert all(n.startswith("backbone.") for g, ns in net.groups.items() if g != "head" for n in ns)
    net_flat = [n for ns in net.groups.values() for n in ns]
    assert sorted(net_flat) == sorted(n for n, _ in net.named_parameters()) and len(net_flat) == len(set(net_flat))
    assert sum(p for _, _, p in net.partition_table()) == sum(p.numel() for p in net.parameters())


def test_matcher_that_misses_an_early_parameter_warns_and_is_caught():
    """timm #2712 constructed: a matcher without the stem's BatchNorm. timm puts bn1 (which runs right after
    conv1) into the last group; block_groups warns, and the ordering checks above would catch it."""
    backbone = _backbone("resnet")
    backbone.group_matcher = lambda coarse=False: {"stem": r"^conv1", "blocks": r"^layer(\d+)"}
    groups, warned = _groups(backbone)
    assert len(warned) == 1 and "run before the last block unmatched" in warned[0] and "bn1.weight" in warned[0]
    assert "bn1.weight" in list(groups.values())[-1]
    assert "bn1.weight (in bn1)" in _out_of_order(groups, _run_order(backbone))


def _width(backbone) -> int:
    """Width of the pooled features a backbone created with num_classes=0 returns."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def _kwargs_overrides(kwargs: dict) -> list[str]:
    # a key backbone.kwargs does not hold yet needs Hydra's "+"
    return [f"+backbone.kwargs.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in kwargs.items()]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_training_trains_the_scheduled_groups(run, family, schedule):
    name, kwargs = FAMILIES[family]
    overrides, expected = SCHEDULES[schedule]
    r = run(f"schedule={schedule}", *overrides, f"backbone.name={name}", "backbone.pretrained=false",
            "trainer.max_epochs=2", "data.eval_batch_size=16", *_kwargs_overrides(kwargs))
    assert r["status"] == "done", r.get("error")

    backbone = _backbone(family)
    groups, _ = _groups(backbone)
    params = dict(backbone.named_parameters())
    size = {g: sum(params[n].numel() for n in ns) for g, ns in groups.items()}
    size["head"] = _width(backbone) * NUM_CLASSES + NUM_CLASSES
    want = expected(list(groups))
    assert [t["epoch"] for t in r["trace"]] == list(range(len(want)))
    for t, trainable in zip(r["trace"], want):
        assert t["trainable_groups"] == trainable, t
        assert t["trainable_params"] == sum(size[g] for g in trainable), t
        assert list(t["lr"]) == [*groups, "head"], "one optimizer group per block group, named after it"
