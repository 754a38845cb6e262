"""Freezing schedules as data. A strategy is a small function that returns phases; nothing else in
thawlab branches on the strategy's name.

A phase says for how many epochs it runs, which groups train, each group's lr multiplier and the BatchNorm
policy of its trainable groups (groups that do not train always keep BatchNorm in eval mode):
  train   BN normalises with batch statistics and updates its running statistics and affine weights
  eval    BN uses (and keeps) its running statistics; affine weights train (LP-FT, surgical: Kumar et al.)
  frozen  as eval, and the affine weights do not train either
Group names are the backbone's block groups in forward order, then "head".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from thawlab.errors import ThawlabError, did_you_mean

BN_POLICIES = ("train", "eval", "frozen")
LR_SHAPES = ("cosine", "constant")


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: tuple[str, ...]
    lr_mult: dict[str, float] = field(default_factory=dict)  # groups not named: 1.0
    bn: str = "train"


def frozen(groups, epochs, s):
    """Linear probe: only the head trains; the backbone is the pretrained one, bitwise."""
    return [Phase("probe", epochs, ("head",), {"head": s.probe_lr_mult}, s.bn)]


def full(groups, epochs, s):
    """Full fine-tuning: every group trains at the base lr."""
    return [Phase("full", epochs, tuple(groups), {}, s.bn)]


def lp_ft(groups, epochs, s):
    """LP-FT (Kumar et al. 2022): probe the head, then fine-tune everything from that head."""
    lp = s.lp_epochs if s.lp_epochs is not None else epochs // 2
    if not 0 < lp < epochs:
        raise ThawlabError(f"schedule.lp_epochs={lp} must leave both phases an epoch of the {epochs}")
    return [Phase("lp", lp, ("head",), {"head": s.probe_lr_mult}, s.bn),
            Phase("ft", epochs - lp, tuple(groups), {}, s.bn)]


def gradual(groups, epochs, s):
    """ULMFiT gradual unfreezing: the head first, then one more group from the top every `interval`
    epochs, each group's lr the one above it divided by `factor` (discriminative fine-tuning)."""
    if s.interval < 1:
        raise ThawlabError(f"schedule.interval={s.interval} must be at least 1")
    top_down = list(reversed(groups))  # head, last block, ..., stem
    mult = {g: s.factor ** -depth for depth, g in enumerate(top_down)}
    phases, start = [], 0
    for k in range(1, len(top_down) + 1):
        if start >= epochs:
            break
        n = epochs - start if k == len(top_down) else min(s.interval, epochs - start)
        lr = {g: mult[g] for g in top_down[:k]}
        if k == 1:
            lr["head"] = s.probe_lr_mult
        phases.append(Phase(f"unfreeze{k - 1}" if k > 1 else "head", n, tuple(reversed(top_down[:k])), lr, s.bn))
        start += n
    return phases


STRATEGIES = {"frozen": frozen, "gradual": gradual, "full": full, "lp_ft": lp_ft}


def check(schedule_cfg, epochs: int) -> None:
    """What can be checked before a model exists: runs call this first, so bad input fails in seconds."""
    name = schedule_cfg.name
    if name not in STRATEGIES:
        raise ThawlabError(f"unknown schedule {name!r} (choose from {', '.join(STRATEGIES)})"
                           f"{did_you_mean(name, STRATEGIES)}")
    if schedule_cfg.bn not in BN_POLICIES:
        raise ThawlabError(f"schedule.bn={schedule_cfg.bn!r} is not one of {', '.join(BN_POLICIES)}")
    if epochs < 1:
        raise ThawlabError(f"trainer.max_epochs={epochs} must be at least 1")


def build_phases(schedule_cfg, groups: list[str], epochs: int) -> list[Phase]:
    """Phases of strategy schedule_cfg.name over `epochs`, for groups (forward order, ending with 'head')."""
    check(schedule_cfg, epochs)
    phases = STRATEGIES[schedule_cfg.name](groups, epochs, schedule_cfg)
    assert sum(p.epochs for p in phases) == epochs, phases
    return phases


def phase_at(phases: list[Phase], epoch: int) -> tuple[int, Phase, int]:
    """(index, phase, first epoch of the phase) for an epoch; past the end, the last phase."""
    start = 0
    for i, p in enumerate(phases):
        if epoch < start + p.epochs:
            return i, p, start
        start += p.epochs
    return len(phases) - 1, phases[-1], start - phases[-1].epochs


def lr_factor(phases: list[Phase], group: str, step: int, steps_per_epoch: int, shape: str = "cosine",
              warmup_epochs: float = 0.0) -> float:
    """Multiplier of the base lr for `group` at optimizer step `step`: 0 while the group is frozen, else its
    phase multiplier times the phase's lr shape (linear warm-up, then cosine to 0 or constant)."""
    _, phase, start = phase_at(phases, step // steps_per_epoch)
    if group not in phase.trainable:
        return 0.0
    t = step - start * steps_per_epoch
    total = phase.epochs * steps_per_epoch
    warm = int(warmup_epochs * steps_per_epoch)
    if t < warm:
        shape_f = (t + 1) / warm
    elif shape == "cosine":
        shape_f = 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))
    elif shape == "constant":
        shape_f = 1.0
    else:
        raise ThawlabError(f"optimizer.schedule={shape!r} is not one of {', '.join(LR_SHAPES)}")
    return phase.lr_mult.get(group, 1.0) * shape_f
