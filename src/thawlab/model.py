"""The network thawlab trains: a timm backbone, a head, and named parameter groups.

Applying a phase happens here and only here: which parameters require grad, and which BatchNorm layers stay in
eval mode. The BN policy is re-applied after every `train()` call (as mmpretrain does), so Lightning's switch
back to training mode after validation never un-freezes running statistics.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from thawlab.schedules import Phase


class ThawNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, block_groups: "OrderedDict[str, list[str]]"):
        super().__init__()
        self.backbone, self.head = backbone, head
        groups = OrderedDict((g, [f"backbone.{n}" for n in names]) for g, names in block_groups.items())
        groups["head"] = [f"head.{n}" for n, _ in head.named_parameters()]
        self.groups = groups
        self._group_of = {n: g for g, names in groups.items() for n in names}
        self._bn_groups = self._batchnorm_groups()
        self.phase: Phase | None = None

    def _batchnorm_groups(self) -> list[tuple[_BatchNorm, str]]:
        """Each BatchNorm layer with the group of its parameters (or of the last parameter before it)."""
        out, last = [], next(iter(self.groups))
        for name, module in self.named_modules():
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if own:
                last = self._group_of[own[0]]
            if isinstance(module, _BatchNorm):
                out.append((module, last))
        return out

    def named_group_parameters(self) -> "OrderedDict[str, list[nn.Parameter]]":
        params = dict(self.named_parameters())
        return OrderedDict((g, [params[n] for n in names]) for g, names in self.groups.items())

    def forward(self, x):
        if self.backbone_frozen:
            with torch.no_grad():  # nothing in the backbone trains: build no graph, keep no activations
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)

    @property
    def backbone_frozen(self) -> bool:
        return self.phase is not None and self.phase.trainable == ("head",)

    def apply_phase(self, phase: Phase) -> None:
        self.phase = phase
        for g, params in self.named_group_parameters().items():
            for p in params:
                p.requires_grad_(g in phase.trainable)
        if phase.bn == "frozen":
            for bn, _ in self._bn_groups:
                for p in bn.parameters(recurse=False):
                    p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.phase is not None:
            for bn, group in self._bn_groups:
                if group not in self.phase.trainable or self.phase.bn != "train":
                    bn.eval()
        return self

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def partition_table(self) -> list[tuple[str, int, int]]:
        """(group, tensors, parameters) per group, in forward order."""
        return [(g, len(ps), sum(p.numel() for p in ps)) for g, ps in self.named_group_parameters().items()]
