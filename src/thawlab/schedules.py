"""Freezing schedules as data. A strategy is a small function that returns phases; nothing else in
thawlab branches on the strategy's name.

A phase says for how many epochs it runs, which groups train (and, within them, which parameters: BitFit trains
biases, LoRA its adapters, ReFT its interventions), each group's lr multiplier, the lr shape within the phase,
whether the optimizer state starts afresh, and the BatchNorm policy of its trainable groups. Groups that do not
train are frozen whole: no gradients, every module in eval mode (BatchNorm statistics, dropout, drop-path).
  train   BN normalises with batch statistics and updates its running statistics and affine weights
  eval    BN uses (and keeps) its running statistics; affine weights train (LP-FT, surgical: Kumar et al.)
  frozen  as eval, and the affine weights do not train either
Group names are the backbone's block groups in forward order, then "head".
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from thawlab.errors import ThawlabError, did_you_mean
from thawlab.probe import DEFAULT_GRID, SOLVERS, parse_grid

BN_POLICIES = ("train", "eval", "frozen")
LR_SHAPES = ("cosine", "constant", "step", "stlr", "one_cycle")
SELECT_RULES = ("best", "last")  # schedule.select: max val/id/acc, or the last epoch (thawlab/selection.py)
BIASES = r"(^|\.)bias$"  # BitFit (Ben Zaken et al. 2022): bias terms only
ADAPTERS = "lora_"  # parameters PEFT adds; everything else in the backbone stays as loaded
INTERVENTIONS = r"(^|\.)reft\."  # parameters thawlab.reft adds (module path ...reft.rotate..., ...reft.source...)


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: tuple[str, ...]
    lr_mult: dict[str, float] = field(default_factory=dict)  # groups not named: 1.0
    bn: str = "train"
    params: str | None = None  # regex: in trainable backbone groups only matching parameter names train
    shape: dict = field(default_factory=dict)  # overrides of optimizer.schedule and its arguments
    reset_optimizer: bool = False  # clear the optimizer state when the phase starts (fastai's unfreeze)
    select: bool = True  # model selection considers this phase's epochs (schedule.select_phases; selection.py)
    # per-tensor lr multipliers from gradient statistics, recomputed each epoch (thawlab/auto_lr.py): {} off, or
    # {"stat": "rgn" | "snr", "batches": k, "threshold": t (snr)}
    auto: dict = field(default_factory=dict)
    # the training loss: ce (cross-entropy of the head's logits) | contrastive (CLIP's loss between each image
    # and a prompt of its class, over the batch: FLYP; needs a CLIP text tower and head=zeroshot)
    loss: str = "ce"
    # how the phase fits its trainable groups: adamw (gradient steps, optimizer.*) | lbfgs (a probe phase solved
    # before fit by L-BFGS on cached features, thawlab/probe.py; it then runs one epoch at lr 0, which validates
    # and checkpoints the solved head like any epoch)
    solver: str = "adamw"


LOSSES = ("ce", "contrastive")
TEXT = "text"  # a CLIP text tower's group (thawlab.model): only a strategy that names it trains it


def _body(groups):
    return [g for g in groups if g != "head"]


def pick_groups(body: list[str], indices, key: str) -> list[str]:
    """Block groups by index (forward order from 0, negative from the top); an index out of range is one line."""
    for i in indices:
        if not -len(body) <= i < len(body):
            raise ThawlabError(f"{key}: index {i} is out of range for the {len(body)} block groups "
                               f"({', '.join(body)}): use {-len(body)}..{len(body) - 1}")
    return [body[i] for i in indices]


def frozen(groups, epochs, s):
    """Linear probe: only the head trains; the backbone is the pretrained one, bitwise."""
    return [Phase("probe", epochs, ("head",), {"head": s.probe_lr_mult})]


def full(groups, epochs, s):
    """Full fine-tuning: every group trains at the base lr."""
    return [Phase("full", epochs, tuple(groups))]


def lp_ft(groups, epochs, s, head_trained=False):
    """LP-FT (Kumar et al. 2022): probe the head, then fine-tune everything from that head. WiSE-FT
    (Wortsman et al. 2022) trains the same phases and then interpolates (schedule.alphas, see wise.py).

    A head that starts trained (head=zeroshot, or head.pretrained) may skip the probe: lp_epochs=0, or null
    with zeroshot_probe=false (wise_ft: theta_0 is the zero-shot model and fine-tuning starts from it, the
    paper's recipe); LP-FT (zeroshot_probe=true) probes from the zero-shot head."""
    lp = s.lp_epochs
    if lp is None:
        lp = 0 if head_trained and not s.get("zeroshot_probe", True) else epochs // 2
    if lp == 0:
        if not head_trained:
            raise ThawlabError("schedule.lp_epochs=0 fine-tunes from a new, random head (no probe): use a head "
                               "that starts trained (head=zeroshot or head.pretrained=true) or lp_epochs >= 1")
        return [Phase("ft", epochs, tuple(groups))]
    if not 0 < lp < epochs:
        raise ThawlabError(f"schedule.lp_epochs={lp} must leave both phases an epoch of the {epochs}")
    return [Phase("lp", lp, ("head",), {"head": s.probe_lr_mult}), Phase("ft", epochs - lp, tuple(groups))]


def flyp(groups, epochs, s):
    """FLYP (Goyal et al., CVPR 2023), "finetune like you pretrain": both CLIP towers train with CLIP's
    contrastive loss between each image and a prompt of its class, over the batch. The head is not trained: it
    is the zero-shot head, recomputed from the updated text tower before each evaluation (thawlab.module)."""
    return [Phase("flyp", epochs, tuple(g for g in groups if g != "head") + (TEXT,), loss="contrastive")]


def gradual(groups, epochs, s):
    """ULMFiT gradual unfreezing (Howard and Ruder 2018): the head first, then one more group from the top
    every `interval` epochs, each group's lr the one above it divided by `factor` (discriminative lr)."""
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
        phases.append(Phase(f"unfreeze{k - 1}" if k > 1 else "head", n, tuple(reversed(top_down[:k])), lr))
        start += n
    return phases


def surgical(groups, epochs, s):
    """Surgical fine-tuning (Lee et al., ICLR 2023): only the listed block groups train (indices in forward
    order, negative from the top), with the new head unless train_head=false (a pretrained head kept as it is,
    the paper's setting); the rest stays frozen, BatchNorm in eval mode."""
    chosen = set(pick_groups(_body(groups), s.groups, "schedule.groups"))
    if not chosen:
        raise ThawlabError("schedule.groups=[] names no block group (for the head alone use schedule=frozen)")
    if s.train_head:
        chosen.add("head")
    return [Phase("surgical", epochs, tuple(g for g in groups if g in chosen))]


def partial(groups, epochs, s):
    """Partial fine-tuning: the first `freeze_first` block groups stay frozen, the rest and the head train."""
    body = _body(groups)
    if not 0 <= s.freeze_first <= len(body):
        raise ThawlabError(f"schedule.freeze_first={s.freeze_first} is out of range for the {len(body)} block "
                           f"groups: use 0..{len(body)}")
    return [Phase("partial", epochs, tuple(body[s.freeze_first:]) + ("head",))]


def bitfit(groups, epochs, s):
    """BitFit (Ben Zaken et al. 2022): the backbone's biases and the new head train, nothing else."""
    return [Phase("bitfit", epochs, tuple(groups), params=BIASES)]


def lora(groups, epochs, s):
    """LoRA (Hu et al. 2022) through HF PEFT: low-rank adapters in the backbone and the new head train."""
    return [Phase("lora", epochs, tuple(groups), params=ADAPTERS)]


def reft(groups, epochs, s):
    """LoReFT (Wu et al. 2024): low-rank interventions on the outputs of the listed block groups (`layers`, indices
    as surgical's) and the new head train; the backbone stays as loaded, BatchNorm in eval mode (thawlab/reft.py)."""
    chosen = set(pick_groups(_body(groups), s.layers, "schedule.layers"))
    if not chosen:
        raise ThawlabError("schedule.layers=[] names no block group to intervene on")
    return [Phase("reft", epochs, tuple(g for g in groups if g in chosen or g == "head"), params=INTERVENTIONS)]


def auto_rgn(groups, epochs, s):
    """Auto-RGN (Lee et al., ICLR 2023): every group trains, each tensor at the lr scaled by its relative gradient
    norm ||g|| / ||w|| over the largest one, recomputed at each epoch's start on `batches` training batches."""
    return [Phase("auto_rgn", epochs, tuple(groups), auto={"stat": "rgn", "batches": s.batches, "always": _head(s)})]


def auto_snr(groups, epochs, s):
    """Auto-SNR (Lee et al., ICLR 2023): every group may train; each epoch, a tensor trains (multiplier 1) when its
    gradient's signal-to-noise ratio is at least `threshold`, else not (0), as the paper's code computes it."""
    return [Phase("auto_snr", epochs, tuple(groups),
                  auto={"stat": "snr", "batches": s.batches, "threshold": s.threshold, "always": _head(s)})]


def _head(s) -> list[str]:
    """Groups an auto phase trains at the full lr whatever their statistics: the new head (train_head=true)."""
    return ["head"] if s.get("train_head", True) else []


SPREADS = ("fastai", "blocks")


def fine_tune(groups, epochs, s):
    """fastai's `fine_tune`: one-cycle on the head for freeze_epochs at the base lr; then, optimizer state
    cleared, one-cycle on everything at half the base lr, `slice(lr / lr_mult, lr)` spread over the groups by
    fastai's `even_mults`. spread=fastai: over fastai's split of a timm model (`vision_learner`'s
    `default_split`: body, head), so every block group gets lr/lr_mult and the head lr; spread=blocks: over
    thawlab's block groups, log-evenly from lr/lr_mult (stem) to lr (head)."""
    if not 0 < s.freeze_epochs < epochs:
        raise ThawlabError(f"schedule.freeze_epochs={s.freeze_epochs} must leave both phases an epoch of "
                           f"the {epochs}")
    # fastai's even_mults(start, stop, n) over the groups it splits the model into (spread: checked in check())
    split = [_body(groups), ["head"]] if s.get("spread", "fastai") == "fastai" else [[g] for g in groups]
    n = len(split)
    spread = {g: 0.5 * (1 / s.lr_mult) ** (1 - i / (n - 1)) for i, part in enumerate(split) for g in part}
    return [Phase("frozen", s.freeze_epochs, ("head",), {"head": 1.0},
                  shape={"name": "one_cycle", "pct_start": 0.99, "div": 25.0}),
            Phase("unfrozen", epochs - s.freeze_epochs, tuple(groups), spread,
                  shape={"name": "one_cycle", "pct_start": s.pct_start, "div": s.div}, reset_optimizer=True)]


STRATEGIES = {"frozen": frozen, "gradual": gradual, "full": full, "lp_ft": lp_ft, "wise_ft": lp_ft,
              "surgical": surgical, "partial": partial, "bitfit": bitfit, "lora": lora, "reft": reft,
              "fine_tune": fine_tune, "flyp": flyp, "auto_rgn": auto_rgn, "auto_snr": auto_snr}


def check(schedule_cfg, epochs: int, layer_decay: float = 1.0) -> None:
    """What can be checked before a model exists: runs call this first, so bad input fails in seconds."""
    name = schedule_cfg.name
    if name not in STRATEGIES:
        raise ThawlabError(f"unknown schedule {name!r} (choose from {', '.join(STRATEGIES)})"
                           f"{did_you_mean(name, STRATEGIES)}")
    bn = schedule_cfg.bn
    for policy in (bn.values() if isinstance(bn, Mapping) else [bn]):
        if policy not in BN_POLICIES:
            raise ThawlabError(f"schedule.bn={policy!r} is not one of {', '.join(BN_POLICIES)}")
    if epochs < 1:
        raise ThawlabError(f"trainer.max_epochs={epochs} must be at least 1")
    if not 0 < layer_decay <= 1:
        raise ThawlabError(f"optimizer.layer_decay={layer_decay} must be in (0, 1]")
    for alpha in schedule_cfg.get("alphas") or []:
        if not 0 <= alpha <= 1:
            raise ThawlabError(f"schedule.alphas: {alpha} is outside [0, 1]")
    if schedule_cfg.get("spread", "fastai") not in SPREADS:
        raise ThawlabError(f"schedule.spread={schedule_cfg.spread!r} is not one of {', '.join(SPREADS)}")
    if schedule_cfg.get("interval", 1) < 1:
        raise ThawlabError(f"schedule.interval={schedule_cfg.interval} must be at least 1")
    select = schedule_cfg.get("select", "best")
    if select not in SELECT_RULES:
        raise ThawlabError(f"schedule.select={select!r} is not one of {', '.join(SELECT_RULES)}"
                           f"{did_you_mean(str(select), SELECT_RULES)}")
    solver = schedule_cfg.get("solver", "adamw")
    if solver not in SOLVERS:
        raise ThawlabError(f"schedule.solver={solver!r} is not one of {', '.join(SOLVERS)}"
                           f"{did_you_mean(str(solver), SOLVERS)}")
    if solver == "lbfgs":
        parse_grid(schedule_cfg.get("probe_grid", DEFAULT_GRID))
        # a schedule without a probe phase, refused before anything slow: its phases on stand-in groups (a
        # strategy's own errors, which may depend on the real groups or head, are left to build_phases)
        try:
            trial = STRATEGIES[name](["g0", "g1", "g2", "g3", "head"], epochs, schedule_cfg)
        except (ThawlabError, TypeError, KeyError, AttributeError):
            trial = None
        if trial:
            solved_probe(trial, name)
    names = schedule_cfg.get("select_phases")
    if names is not None and (isinstance(names, str) or len(names) == 0):
        raise ThawlabError(f"schedule.select_phases={names!r} must be a non-empty list of phase names "
                           f"(null: every phase)")


def build_phases(schedule_cfg, groups: list[str], epochs: int, layer_decay: float = 1.0,
                 head_trained: bool = False) -> list[Phase]:
    """Phases of strategy schedule_cfg.name over `epochs`, for groups (forward order, ending with 'head').

    schedule.bn is one policy for every phase or a mapping {phase name: policy} (phases not named: train).
    schedule.select_phases names the phases model selection considers (null: all of them).
    layer_decay is only checked here: timm's layer-wise lr decay is per parameter, not per block group, and
    is applied by the optimizer's groups (thawlab.backbone.layer_decay_scales, FineTuner).
    """
    check(schedule_cfg, epochs, layer_decay)
    # a CLIP text tower is never handed to a strategy: one that trains it names it itself (FLYP)
    body = [g for g in groups if g != TEXT]
    fn = STRATEGIES[schedule_cfg.name]
    takes_head = "head_trained" in inspect.signature(fn).parameters
    phases = fn(body, epochs, schedule_cfg, head_trained=head_trained) if takes_head else fn(body, epochs,
                                                                                             schedule_cfg)
    for p in phases:
        if p.loss not in LOSSES:
            raise ThawlabError(f"phase {p.name}: loss {p.loss!r} is not one of {', '.join(LOSSES)}")
        missing = [g for g in p.trainable if g not in groups]
        if missing:
            what = ("a CLIP text tower (backbone.name=open_clip:<model>)" if missing[0] == TEXT
                    else f"group {missing[0]!r}")
            raise ThawlabError(f"schedule={schedule_cfg.name}: phase {p.name} trains {what}, which this network "
                               f"does not have (groups: {', '.join(groups)})")
    bn = schedule_cfg.bn
    if isinstance(bn, Mapping):
        unknown = set(bn) - {p.name for p in phases}
        if unknown:
            raise ThawlabError(f"schedule.bn names phase {sorted(unknown)[0]!r}; the phases of "
                               f"{schedule_cfg.name} are {', '.join(p.name for p in phases)}")
    select = schedule_cfg.get("select_phases")
    if select is not None:
        unknown = set(select) - {p.name for p in phases}
        if unknown:
            raise ThawlabError(f"schedule.select_phases names phase {sorted(unknown)[0]!r}; the phases of "
                               f"{schedule_cfg.name} are {', '.join(p.name for p in phases)}")
    phases = [replace(p, bn=bn.get(p.name, "train") if isinstance(bn, Mapping) else bn,
                      select=select is None or p.name in select,
                      lr_mult={g: p.lr_mult.get(g, 1.0) for g in p.trainable})
              for p in phases]
    assert sum(p.epochs for p in phases) == epochs, phases
    if schedule_cfg.get("solver", "adamw") == "lbfgs":
        phases = solved_probe(phases, schedule_cfg.name)
    return phases


def solved_probe(phases: list[Phase], name: str) -> list[Phase]:
    """schedule.solver=lbfgs: the probe phase (the first, if it trains the head alone) is solved before fit; it
    keeps one epoch at lr 0, so that the solved head is validated and checkpointed (and selected, where the
    schedule's selection considers the probe) as any epoch. The later phases keep their epochs."""
    first = phases[0]
    if first.trainable != ("head",) or first.params is not None:
        raise ThawlabError(f"schedule.solver=lbfgs solves a linear probe, and schedule={name} has no probe phase (its "
                           f"first phase, {first.name}, does not train the head alone): use schedule=frozen, lp_ft "
                           f"or wise_ft with lp_epochs >= 1")
    return [replace(first, epochs=1, lr_mult={"head": 0.0}, solver="lbfgs"), *phases[1:]]


def phase_at(phases: list[Phase], epoch: int) -> tuple[int, Phase, int]:
    """(index, phase, first epoch of the phase) for an epoch; past the end, the last phase."""
    start = 0
    for i, p in enumerate(phases):
        if epoch < start + p.epochs:
            return i, p, start
        start += p.epochs
    return len(phases) - 1, phases[-1], start - phases[-1].epochs


def _cos(start: float, end: float, pos: float) -> float:
    """fastai's SchedCos: from start (pos 0) to end (pos 1) along half a cosine."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def _stlr(t: int, total: int, cut_frac: float, ratio: float) -> float:
    """ULMFiT's slanted triangular lr (Howard and Ruder 2018, eq. 3), t = 0..total-1 the phase's steps:
    cut = floor(T cut_frac), p = t/cut below cut, else 1 - (t - cut)/(T - cut); lr = (1 + p (ratio - 1))/ratio.
    The paper writes the falling side's denominator as cut (1/cut_frac - 1), which is T - cut only when
    T cut_frac is whole; otherwise it overshoots and the lr goes below 1/ratio, then negative, before the phase
    ends (T = 36: t = 31..35). T - cut keeps the paper's shape for every T: 1/ratio at t = 0, 1 at t = cut,
    and 1/ratio at t = T, the step after the phase's last (as in the paper, whose lr reaches lr_max/ratio at
    its last iteration t = T counting from 1: thawlab counts steps from 0, so its last step, T - 1, is one
    step above the floor). Equal to eq. 3 whenever T cut_frac is whole."""
    cut = max(1, math.floor(total * cut_frac + 1e-9))  # + 1e-9: 0.29 * 100 is 28.999999999999996
    if t < cut:
        p = t / cut
    else:
        p = max(0.0, 1 - (t - cut) / max(1, total - cut))
    return (1 + p * (ratio - 1)) / ratio


def shape_at(t: int, total: int, shape: dict, steps_per_epoch: int) -> float:
    """Multiplier at step t of a phase of `total` steps.
      cosine     linear warm-up over warmup_epochs, then half a cosine to 0
      constant   linear warm-up, then 1
      step       linear warm-up, then x gamma at each milestone (fractions of the phase's steps; L2-SP's recipe)
      stlr       ULMFiT's slanted triangular lr: up for cut_frac of the steps, down to 1/ratio
      one_cycle  fastai's fit_one_cycle: cosine from 1/div up to 1 over pct_start, then down to 1/div_final
    """
    name = shape["name"]
    if name == "stlr":
        return _stlr(t, total, shape["cut_frac"], shape["ratio"])
    if name == "one_cycle":
        pos, pct = t / total, shape["pct_start"]
        if pos < pct:
            return _cos(1 / shape["div"], 1.0, pos / pct)
        return _cos(1.0, 1 / shape["div_final"], (pos - pct) / (1 - pct))
    warm = int(shape.get("warmup_epochs", 0.0) * steps_per_epoch)
    if t < warm:
        return (t + 1) / warm
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))
    if name == "constant":
        return 1.0
    if name == "step":
        return shape["gamma"] ** sum(t >= m * total for m in shape["milestones"])
    raise ThawlabError(f"optimizer.schedule={name!r} is not one of {', '.join(LR_SHAPES)}")


def lr_factor(phases: list[Phase], group: str, step: int, steps_per_epoch: int, shape: dict,
              scale: float = 1.0) -> float:
    """Multiplier of the base lr for `group` at optimizer step `step`: 0 while the group is frozen, else `scale`
    (a parameter's timm layer-decay scale) times its phase multiplier times the phase's lr shape
    (optimizer.schedule, overridden by the phase's own)."""
    _, phase, start = phase_at(phases, step // steps_per_epoch)
    if group not in phase.trainable:
        return 0.0
    t = step - start * steps_per_epoch
    return scale * (phase.lr_mult.get(group, 1.0) * shape_at(t, phase.epochs * steps_per_epoch,
                                                             {**shape, **phase.shape}, steps_per_epoch))


def momentum_at(phases: list[Phase], step: int, steps_per_epoch: int, shape: dict, default: float) -> float:
    """beta1 (Adam) or momentum (SGD) at optimizer step `step`: fastai's fit_one_cycle cycles it against the lr,
    cosine from moms[0] down to moms[1] over pct_start, then up to moms[2] (shape one_cycle with `moms` set);
    `default` (the optimizer's own value) otherwise."""
    _, phase, start = phase_at(phases, step // steps_per_epoch)
    sh = {**shape, **phase.shape}
    if sh["name"] != "one_cycle" or not sh.get("moms"):
        return default
    total, (first, low, last) = phase.epochs * steps_per_epoch, sh["moms"]
    pos, pct = (step - start * steps_per_epoch) / total, sh["pct_start"]
    return _cos(first, low, pos / pct) if pos < pct else _cos(low, last, (pos - pct) / (1 - pct))
