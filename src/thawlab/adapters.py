"""LoRA adapters for timm backbones through HF PEFT: inject, train the `lora_` parameters, merge back.

`add_lora` wraps layers of the backbone in place with `peft.inject_adapter_in_model`, which keeps the backbone's
own module paths: `layer1.0.conv1.weight` becomes `layer1.0.conv1.base_layer.weight` beside
`layer1.0.conv1.lora_A.default.weight` and `...lora_B.default.weight`, so timm's `group_matcher` regexes
(`^layer(\\d+)`, `^blocks\\.(\\d+)`, `^stages\\.(\\d+)`) put each adapter in the block of the layer it adapts, and
every adapter parameter name contains `lora_`. B starts at zero, so the backbone computes exactly what it computed
before (W = W0 + alpha / rank * B A). `merge_lora` folds B A into W0 and puts the original layers back, leaving a
backbone whose state_dict is a plain timm model's and loads without PEFT.

Which layers PEFT's LoRA wraps exactly, and mergeably (checked against peft 0.21): `nn.Linear` and `nn.Conv1d/2d/3d`
whose forward is torch's own (timm's `Linear`, a plain F.linear, counts too), with groups=1, dilation 1 and zero
padding. Left out, with the reason in the error when named explicitly:
- grouped and depthwise convolutions (ConvNeXt's `conv_dw`, EfficientNet's `conv_dw`): PEFT needs the rank to be
  divisible by groups and cannot merge them ("Merging is not supported for _ConvNd layers with groups > 1");
- dilated convolutions: PEFT builds lora_A without the base layer's dilation, so the forward fails on a shape
  mismatch; non-zero padding modes are ignored by lora_A as well (merge would not reproduce the forward);
- layers with their own forward (timm's `Conv2dSame`, `StdConv2d`, ...): the adapter would see other inputs than the
  weight it merges into;
- norms, embeddings and containers.
"""
from __future__ import annotations

import re
import sys

import torch
from torch import nn

from thawlab.errors import ThawlabError, did_you_mean

ADAPTER = "default"  # PEFT's adapter name: parameters are named <layer>.lora_A.default.weight
CONFIG = "schedule."  # where the options live in thawlab's config, for messages
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def add_lora(backbone: nn.Module, rank: int = 8, alpha: float = 16, target_modules=None, dropout: float = 0.0,
             name: str = "backbone") -> list[str]:
    """Inject LoRA adapters into `backbone` in place; return the names of the wrapped modules.

    target_modules: None for `default_lora_targets(backbone)`; a list of module names, each matching a module
    whose name is the entry or ends with "." + entry (PEFT's rule: ["qkv", "fc1"], ["conv1", "downsample.1"]); or
    a string, a regular expression that must match a whole module name (PEFT's rule: r"layer\\d\\.\\d\\.conv\\d").
    Every matched module must be a layer LoRA can wrap and merge (see the module docstring), else ThawlabError.
    name: the backbone's name in messages (cfg.backbone.name); the default falls back to timm's architecture.

    The adapter parameters require grad; every parameter the backbone had keeps its requires_grad (thawlab's phase
    decides what trains), unlike PEFT, which freezes them.
    """
    label = _label(backbone, name)
    _check_options(rank, alpha, dropout)
    if _wrapped(backbone):
        raise ThawlabError(f"{label} already has LoRA adapters ({_wrapped(backbone)[0]}, ...): add them once")
    if target_modules is None:
        targets = default_lora_targets(backbone, name=label)
    else:
        targets = _resolve(backbone, _as_targets(target_modules), label)

    from peft import LoraConfig, inject_adapter_in_model

    # an exact regex over the resolved names: PEFT wraps exactly the layers checked above
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
                        init_lora_weights=True, target_modules="|".join(re.escape(t) for t in targets))
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    for p, flag in flags:  # PEFT froze everything but the adapters
        p.requires_grad_(flag)
    for n, p in backbone.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    wrapped = _wrapped(backbone)
    if sorted(wrapped) != sorted(targets):  # PEFT wrapped other layers than asked: a PEFT change, not user error
        raise RuntimeError(f"PEFT wrapped {len(wrapped)} modules of {label}, expected {len(targets)}: "
                           f"{sorted(set(wrapped) ^ set(targets))[:3]}")
    return wrapped


def default_lora_targets(backbone: nn.Module, name: str = "backbone") -> list[str]:
    """The layers LoRA adapts when schedule.target_modules is not set: every wrappable layer inside the blocks.

    One rule for every family: a layer is inside a block when the first regex of timm's `group_matcher` that
    matches its weight's name captures a block index (`^layer(\\d+)`, `^blocks\\.(\\d+)`, `^stages\\.(\\d+)`);
    the stem and the layers after the blocks (ViT's final `norm`, EfficientNet's `conv_head`) capture none.
    Wrappable: a Linear or Conv layer PEFT wraps and merges exactly (no groups, no dilation; module docstring).
    What that gives:
    - ResNet: every convolution of the residual blocks: conv1, conv2 (, conv3 in bottlenecks) and the 1x1
      projection shortcut downsample.1 (or downsample.0); the stem convolutions stay as they are. Dilated convs
      (output_stride < 32) are left out.
    - ConvNeXt: the pointwise MLP of every block, mlp.fc1 and mlp.fc2 (Linear, or 1x1 Conv2d with conv_mlp),
      and the stride-2 downsample conv that opens stages 1-3; the depthwise 7x7 conv_dw is left out (grouped).
    - ViT / DeiT: attn.qkv, attn.proj, mlp.fc1 and mlp.fc2 of every block (the recipe's targets); patch_embed.proj
      (stem) is left out.
    """
    label = _label(backbone, name)
    try:
        matcher = backbone.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        matcher = None
    if not isinstance(matcher, dict):
        raise ThawlabError(f"{label} has no timm group_matcher with block regexes to find its blocks: set "
                           f"{CONFIG}target_modules to the layers LoRA should adapt")
    compiled = []
    for spec in matcher.values():
        if spec is None:
            continue
        compiled += [re.compile(s[0]) for s in spec] if isinstance(spec, (list, tuple)) else [re.compile(spec)]

    def in_block(param_name: str) -> bool:
        for regex in compiled:
            m = regex.match(param_name)
            if m:
                return any(g is not None for g in m.groups())
        return False

    targets = [n for n, m in backbone.named_modules()
               if n and _unsupported(m) is None and in_block(f"{n}.weight")]
    if not targets:
        raise ThawlabError(f"{label} has no Linear or Conv layer LoRA can adapt inside its blocks: set "
                           f"{CONFIG}target_modules")
    return targets


def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the original layers back, in place; return backbone.

    Afterwards nothing of PEFT is left in the module tree: the state_dict has exactly the keys of the plain timm
    model and loads into one with strict=True where PEFT is not installed. The base parameters are the same
    tensor objects (updated in place), so an optimizer or a ThawNet holding them stays valid. A backbone without
    adapters is returned unchanged.
    """
    wrapped = _wrapped(backbone)
    for name in wrapped:
        module = backbone.get_submodule(name)
        try:
            module.merge(safe_merge=True)
        except ValueError as e:  # safe_merge found NaN or inf in the merged weight
            raise ThawlabError(f"cannot merge the LoRA adapter of {name}: {str(e).splitlines()[0]}") from None
        parent, _, attr = name.rpartition(".")
        setattr(backbone.get_submodule(parent), attr, module.get_base_layer())
    for module in backbone.modules():
        if "peft_config" in vars(module):  # set by inject_adapter_in_model; would drag PEFT into a pickle
            del module.peft_config
    left = [n for n, _ in backbone.named_parameters() if "lora_" in n or ".base_layer." in n]
    if left:
        raise RuntimeError(f"merge_lora left PEFT parameters behind: {left[:3]}")
    return backbone


def merged_weights(backbone: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """{name of each LoRA layer's base weight (`<layer>.base_layer.weight`): (W + delta W, whether the adapter
    trains)}, where delta W = PEFT's own `get_delta_weight` (what `merge` adds: (alpha / rank) B A, for a conv
    the kxk A composed with the 1x1 B), kept differentiable: the weight the layer computes with, which L2-SP
    (Li et al. 2018) compares with the pretrained one. Empty without adapters."""
    out = {}
    for name in _wrapped(backbone):
        layer = backbone.get_submodule(name)
        if layer.merged or ADAPTER in getattr(layer, "lora_variant", {}):  # merged: W already holds delta W
            raise RuntimeError(f"{name}: a merged adapter or a LoRA variant (DoRA...) has no plain delta weight")
        weight = layer.get_base_layer().weight
        trains = any(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n)
        out[f"{name}.base_layer.weight"] = (weight + layer.get_delta_weight(ADAPTER).to(weight.dtype), trains)
    return out


def _wrapped(model: nn.Module) -> list[str]:
    """Names of the PEFT-wrapped modules (none without PEFT imported: then nothing can be wrapped)."""
    if sys.modules.get("peft") is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _unsupported(module: nn.Module) -> str | None:
    """None when PEFT's LoRA wraps `module` exactly and can merge it again; otherwise the reason it cannot."""
    kind = type(module).__name__
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    if isinstance(module, NonDynamicallyQuantizableLinear):
        # torch's nn.MultiheadAttention (OpenCLIP's towers) passes out_proj.weight to its functional form and
        # never calls out_proj: a LoRA wrapper around it would never run, its adapter would never train
        return f"the output projection of torch's nn.MultiheadAttention, which reads its weight and never calls it"
    if isinstance(module, nn.Linear):
        from timm.layers import Linear as TimmLinear  # F.linear outside torchscript

        if type(module).forward not in (nn.Linear.forward, TimmLinear.forward):
            return f"a {kind} with its own forward"
        return None
    if isinstance(module, _CONVS):
        base = next(c for c in _CONVS if isinstance(module, c))
        if type(module).forward is not base.forward:
            return f"a {kind} with its own forward (same padding or weight standardisation)"
        if module.groups > 1:
            return f"a {kind} with groups={module.groups} (PEFT cannot merge a grouped or depthwise conv)"
        if any(d != 1 for d in module.dilation):
            return f"a {kind} with dilation={tuple(module.dilation)} (PEFT's lora_A ignores dilation)"
        if module.padding_mode != "zeros":
            return f"a {kind} with padding_mode={module.padding_mode!r} (PEFT's lora_A pads with zeros)"
        return None
    return f"a {kind} (LoRA adapts Linear and Conv layers)"


def _as_targets(value):
    """A str (regex) or a list of str, from Python or OmegaConf."""
    if isinstance(value, str):
        return value
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(t, str) for t in items):
        raise ThawlabError(f"{CONFIG}target_modules={value!r} must be a list of module names or a regex string")
    return items


def _matches(targets, name: str) -> bool:
    """PEFT's matching rule: a string is a regex over the whole name; a list entry is the name or a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _resolve(backbone: nn.Module, targets, label: str) -> list[str]:
    shown = f"{CONFIG}target_modules={targets!r}"
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ThawlabError(f"{shown} is not a valid regular expression ({e})") from None
    modules = [(n, m) for n, m in backbone.named_modules() if n]
    matched = [(n, m) for n, m in modules if _matches(targets, n)]
    if not matched:
        layers = [n for n, m in modules if _unsupported(m) is None]
        step = max(1, len(layers) // 6)
        examples = ", ".join(layers[::step][:6])
        hint = ""
        if not isinstance(targets, str):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            hint = "".join(did_you_mean(t, leaves) for t in targets[:1])
        raise ThawlabError(f"{shown} matches no module of {label} (examples of module names: {examples}){hint}")
    bad = [(n, why) for n, m in matched if (why := _unsupported(m)) is not None]
    if bad:
        n, why = bad[0]
        raise ThawlabError(f"{shown} matches {len(bad)} module(s) of {label} that LoRA cannot adapt, e.g. {n}: "
                           f"{why}; name Linear and Conv layers only (regex strings match whole names)")
    return [n for n, _ in matched]


def _check_options(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ThawlabError(f"{CONFIG}rank={rank!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ThawlabError(f"{CONFIG}alpha={alpha!r} must be a positive number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ThawlabError(f"{CONFIG}dropout={dropout!r} must be in [0, 1)")


def _label(backbone: nn.Module, name: str) -> str:
    if name != "backbone":
        return name
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or name


def lora_parameter_count(backbone: nn.Module) -> int:
    """Number of adapter parameters (names containing `lora_`)."""
    return sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)


__all__ = ["add_lora", "default_lora_targets", "merge_lora", "merged_weights", "lora_parameter_count", "ADAPTER"]
