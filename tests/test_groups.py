"""Block groups come from timm's group_matcher, generically: every parameter in exactly one group, forward
order, the classifier only in our head."""
from __future__ import annotations

import pytest
import timm

from thawlab.backbone import block_groups
from thawlab.heads import LinearHead
from thawlab.model import ThawNet

FAMILIES = [("test_resnet", {}), ("test_convnext", {}), ("test_efficientnet", {}), ("test_vit", {"img_size": 32})]


@pytest.mark.parametrize("name,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_partition_is_complete_disjoint_and_ordered(name, kwargs):
    backbone = timm.create_model(name, num_classes=0, **kwargs)
    groups = block_groups(backbone)
    flat = [n for names in groups.values() for n in names]
    assert sorted(flat) == sorted(n for n, _ in backbone.named_parameters())
    assert len(flat) == len(set(flat))
    assert list(groups)[0] == "stem" and len(groups) >= 3
    order = {n: i for i, (n, _) in enumerate(backbone.named_parameters())}
    firsts = [min(order[n] for n in names) for names in groups.values()]
    assert firsts == sorted(firsts), "groups must follow forward order"
    net = ThawNet(backbone, LinearHead(backbone.num_features, 10), groups)
    assert net.groups["head"] == ["head.fc.weight", "head.fc.bias"]
    assert sum(p for _, _, p in net.partition_table()) == sum(p.numel() for p in net.parameters())
