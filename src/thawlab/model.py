"""The network thawlab trains: a timm backbone, a head, and named parameter groups.

Applying a phase happens here and only here: which parameters require grad, and which modules stay in eval
mode. A group that does not train is frozen whole (mmpretrain's rule): every module in it, BatchNorm, dropout
and drop-path alike, stays in eval mode whatever calls `train()`, so Lightning's switch back to training mode
after validation never un-freezes running statistics. BatchNorm in trainable groups follows the phase's policy.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from thawlab.schedules import Phase


TEXT = "text"  # the group of a CLIP text tower


class ThawNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, block_groups: "OrderedDict[str, list[str]]",
                 text: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        groups = OrderedDict((g, [f"backbone.{n}" for n in names]) for g, names in block_groups.items())
        groups["head"] = [f"head.{n}" for n, _ in head.named_parameters()]
        if text is not None:
            # a CLIP text tower (thawlab.clip): a group of its own after the head, which only a schedule that
            # names it (FLYP) trains; `body_groups` leaves it out, so no other schedule can unfreeze it
            self.text = text
            groups[TEXT] = [f"text.{n}" for n, _ in text.named_parameters()]
        self.groups = groups
        self._group_of = {n: g for g, names in groups.items() for n in names}
        self._module_groups = self._groups_of_modules()
        self.phase: Phase | None = None
        self.backbone_frozen = False

    def _groups_of_modules(self) -> list[tuple[str, nn.Module, frozenset[str]]]:
        """Each module with the groups of the parameters in its subtree. A module without parameters
        (activation, dropout, drop-path, pooling) belongs to the group of the last parameter before it in
        the backbone, or to the head when it is part of the head."""
        out, last = [], next(iter(self.groups))
        for name, module in self.named_modules():
            if not name:
                continue
            own = [self._group_of[f"{name}.{p}"] for p, _ in module.named_parameters()]
            if own:
                last = own[-1] if name.startswith("backbone") else last
                out.append((name, module, frozenset(own)))
            else:
                top = name.split(".")[0]
                out.append((name, module, frozenset([top] if top in ("head", TEXT) else [last])))
        return out

    @property
    def body_groups(self) -> list[str]:
        """The groups a schedule spreads over: the backbone's block groups and the head (not the text tower)."""
        return [g for g in self.groups if g != TEXT]

    def named_group_parameters(self) -> "OrderedDict[str, list[nn.Parameter]]":
        params = dict(self.named_parameters())
        return OrderedDict((g, [params[n] for n in names]) for g, names in self.groups.items())

    def no_decay(self) -> set[str]:
        """Parameter names exempt from weight decay, timm's rule (`param_groups_weight_decay`): biases, every
        1-d tensor (norm weights, LayerScale), and what the backbone's `no_weight_decay()` names (position
        embeddings, class tokens); and the free matrix behind a torch parametrization (ReFT's orthogonal R),
        whose norm the parametrization discards: decaying it only moves the map's fixed signs."""
        exempt = getattr(self.backbone, "no_weight_decay", None)
        named = {f"backbone.{n}" for n in (exempt() if callable(exempt) else ())}
        return {n for n, p in self.named_parameters()
                if p.ndim <= 1 or n.endswith(".bias") or n in named or ".parametrizations." in n}

    def layer_decay_scales(self, decay: float) -> dict[str, float]:
        """Parameter name -> timm's layer-decay lr scale (thawlab.backbone.layer_decay_scales; 1.0 at decay 1)."""
        if decay == 1.0:
            return {n: 1.0 for n, _ in self.named_parameters()}
        from thawlab.backbone import layer_decay_scales

        body, head = layer_decay_scales(self.backbone, decay)
        return {n: body[n.removeprefix("backbone.")] if n.startswith("backbone.") else head
                for n, _ in self.named_parameters()}

    def features(self, x):
        if self.backbone_frozen:
            with torch.no_grad():  # nothing in the backbone trains: build no graph, keep no activations
                return self.backbone(x)
        return self.backbone(x)  # a frozen prefix builds no graph either: no input of it requires grad

    def forward(self, x):
        return self.head(self.features(x))

    def trains(self, phase: Phase) -> dict[str, bool]:
        """Parameter name -> whether it trains in `phase`: its group is trainable and, in the backbone, it matches
        phase.params; BatchNorm's own weights not under bn=frozen."""
        only = re.compile(phase.params) if phase.params else None
        out = {}
        for n, _ in self.named_parameters():
            g = self._group_of[n]
            out[n] = g in phase.trainable and (g == "head" or only is None or bool(only.search(n)))
        if phase.bn == "frozen":
            for name, module, _ in self._module_groups:
                if isinstance(module, _BatchNorm):
                    out.update({f"{name}.{n}": False for n, _ in module.named_parameters(recurse=False)})
        return out

    def apply_phase(self, phase: Phase) -> None:
        self.phase = phase
        trains = self.trains(phase)
        for n, p in self.named_parameters():
            p.requires_grad_(trains[n])
        self.backbone_frozen = not any(p.requires_grad for p in self.backbone.parameters())
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.phase is not None:
            trainable = set(self.phase.trainable)
            for _, module, groups in self._module_groups:
                if not groups & trainable:
                    module.training = False  # this module only, not its children: they have their own entry
                elif isinstance(module, _BatchNorm) and self.phase.bn != "train":
                    module.training = False
        return self

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def partition_table(self) -> list[tuple[str, int, int]]:
        """(group, tensors, parameters) per group, in forward order."""
        return [(g, len(ps), sum(p.numel() for p in ps)) for g, ps in self.named_group_parameters().items()]
