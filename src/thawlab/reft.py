"""LoReFT (Wu et al., "ReFT: Representation Finetuning for Language Models", NeurIPS 2024) on timm backbones.

The backbone stays frozen; at the output of chosen block groups a low-rank intervention edits the representation h
(a vector of width d):

    h <- h + R^T (W h + b - R h),    R (r x d) with orthonormal rows, W (r x d), b (r): trained with the head.

R is an `nn.Linear(d, r, bias=False)` under `torch.nn.utils.parametrizations.orthogonal` (Householder map, no
trivialization: no d x d buffer; its state dict key is `...rotate.parametrizations.weight.original`). Initial values
as in pyreft 0.1.0's `LoreftIntervention` (the authors' code): R orthogonal (`nn.init.orthogonal_`), W and b torch's
default `nn.Linear` init. So the intervention is NOT the identity at the start (W != R), unlike LoRA's zero B.

Where h lives, by the shape of the hooked module's output (seen once, in a probe forward pass, when adding):
- (B, C, H, W), a CNN feature map: the channel vector at every spatial position. Some timm families run their stages
  channels-last, (B, H, W, C) (Swin, MambaOut, ...: they set timm's `output_fmt = "NHWC"`): then the last dim. Where
  timm's `feature_info` lists the module, its `num_chs` decides which of dim 1 and the last dim is the width.
- (B, N, D), ViT-like tokens: the token positions `schedule.positions` (indices into the N tokens as the block outputs
  them, 0 = the class token; "prefix" = timm's `num_prefix_tokens`: class and register tokens; null or "all": every
  token). Positions are refused for other outputs.
- (B, D), a vector (a group whose output module pools): that vector.

Which module: `schedule.layers` are block-group indices as schedule=surgical counts them (timm `group_matcher`, forward
order, negative from the top). A group's output is that of the largest module holding the group's last parameter and
no parameter of another group, nor the classifier (ResNet `layer3`, ViT `blocks.3`, ViT's last group `top` = last
block + `norm`: `norm`; ConvNeXt's last: `head.norm`, on the pooled (B, C, 1, 1)); inside an nn.Sequential or
ModuleList the intervention goes on the last child (a new child of the container itself would be run, or iterated,
as one more layer). The intervention is registered as that module's child `reft`, so its
parameters (`layer3.5.reft.source.weight`) fall in the same block group through timm's own regexes (checked), and a
forward hook applies it. The stem is refused: its output comes after parameter-free steps that are no module's output
(ResNet's ReLU and max-pool, ViT's class token and position embedding).

Library choice (checked against pyreft 0.1.0 and pyvene 0.1.8, wheels read, not installed): pyreft is built on
pyvene's `IntervenableModel` for HF transformers models: it pins transformers==4.45.1 (this stack has 5.x through
peft) and pulls datasets, evaluate, jupyter, ydata-profiling, gcsfs, seaborn==0.12.2; pyvene looks the model up in
`type_to_dimension_mapping[type(model)]` and reads `model.config` (HF configs), which timm models lack, and its
interventions act on the last dim of sequence outputs (`keep_last_dim`), so NCHW feature maps would need reshaping
around every hook. The intervention itself is a few lines of torch, so thawlab keeps its own.

Weight decay: torch's Householder map multiplies column i of R by `int(original[i, i])` (+1 or -1, never trained).
AdamW's decoupled decay (or SGD's L2) shrinks that entry every step, 1 -> 0.999, and the cast then gives 0: a zero row
of R, silently. So each forward first sets the diagonal back to its sign.

Export: ReFT cannot be merged into a timm state dict (it edits activations, on chosen tokens). model.safetensors holds
the plain backbone and, per intervention, `thawlab_reft.<module>.{rotation, weight, bias, channel_dim, positions}`
(R itself, W, b; positions absent = every token); `load_exported` puts them back on a plain timm model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from thawlab.errors import ThawlabError
from thawlab.schedules import pick_groups

CHILD = "reft"  # the intervention's name under the module it edits
PREFIX = "thawlab_reft."  # its tensors in model.safetensors
CONFIG = "schedule."
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class LoReFT(nn.Module):
    """h + R^T (W h + b - R h) along `channel_dim` of h; for tokens (B, N, D) only at `positions` (None: all)."""

    def __init__(self, width: int, rank: int, channel_dim: int = -1, positions: tuple[int, ...] | None = None):
        super().__init__()
        self.rotate = nn.Linear(width, rank, bias=False)  # R
        nn.init.orthogonal_(self.rotate.weight)
        orthogonal(self.rotate, orthogonal_map="householder", use_trivialization=False)
        self.source = nn.Linear(width, rank)  # W, b
        self.channel_dim, self.positions = channel_dim, positions

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d): one fused product, h + (h (W - R)^T + b) R."""
        R = self.rotate.weight
        return h + (F.linear(h, self.source.weight - R, self.source.bias) @ R).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # see the module docstring (weight decay)
            signs = self.rotate.parametrizations.weight.original.diagonal()
            signs.copy_(torch.where(signs < 0, -1.0, 1.0))
        if self.positions is not None:
            idx = torch.tensor([p % h.shape[1] for p in self.positions], device=h.device)
            return h.index_copy(1, idx, self.edit(h.index_select(1, idx)))
        if self.channel_dim not in (-1, h.dim() - 1):
            return self.edit(h.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)
        return self.edit(h)


def _intervene(module, args, output):
    """The forward hook: a module-level function, so deep copies and checkpoints of the model keep working."""
    return getattr(module, CHILD)(output)


def _attach(backbone: nn.Module, path: str, intervention: LoReFT) -> None:
    module = backbone.get_submodule(path)
    module.add_module(CHILD, intervention)
    module.register_forward_hook(_intervene)


def parse_positions(value):
    """None (every token), "prefix", or a tuple of token indices; anything else is a ThawlabError."""
    if value is None or value == "all":
        return None
    if value == "prefix":
        return value
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else []
    ints = all(isinstance(p, int) and not isinstance(p, bool) for p in items)
    if not items or not ints or len(set(items)) < len(items):
        raise ThawlabError(f"{CONFIG}positions={value!r} must be null or 'all' (every token), 'prefix' (the class and "
                           f"register tokens) or a list of distinct token indices such as [0]")
    return tuple(items)


def check_options(s) -> None:
    """What can be checked before the model exists (schedule.rank, .layers, .positions)."""
    if isinstance(s.rank, bool) or not isinstance(s.rank, int) or s.rank < 1:
        raise ThawlabError(f"{CONFIG}rank={s.rank!r} must be a positive integer")
    if not s.layers:
        raise ThawlabError(f"{CONFIG}layers=[] names no block group to intervene on")
    parse_positions(s.positions)


def output_module(backbone: nn.Module, params: list[str]) -> str:
    """The module whose output is a block group's output (see the module docstring); '' when there is none."""
    group, best = set(params), ""
    # not the classifier's container (ConvNeXt's `head`): with num_classes > 0 its output would be the logits
    classifier = f"{(getattr(backbone, 'pretrained_cfg', None) or {}).get('classifier') or ''}."
    parts = params[-1].split(".")[:-1]
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        inside = all(f"{path}.{n}" in group for n, _ in backbone.get_submodule(path).named_parameters())
        if not inside or classifier.startswith(f"{path}."):
            break
        best = path
    while best and isinstance(backbone.get_submodule(best), _CONTAINERS):
        best = f"{best}.{list(backbone.get_submodule(best).named_children())[-1][0]}"
    return best


def _probe(backbone: nn.Module, paths: list[str], input_size) -> dict[str, tuple]:
    """Output shape of each module in one forward pass, eval mode, no grad (nothing is updated)."""
    shapes, handles = {}, []

    def record(path, out):  # returns None: the output passes unchanged
        shapes.setdefault(path, tuple(out.shape) if torch.is_tensor(out) else type(out).__name__)

    for path in paths:
        handles.append(backbone.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: record(path, out)))
    modes = {m: m.training for m in backbone.modules()}
    p = next(backbone.parameters())
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _channel_dim(backbone: nn.Module, path: str, shape: tuple) -> int:
    if len(shape) != 4:
        return -1
    dim = -1 if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else 1
    listed = {f.get("module"): f.get("num_chs") for f in getattr(backbone, "feature_info", None) or []}
    width = listed.get(path) or listed.get(path.rsplit(".", 1)[0])
    other = 1 if dim == -1 else -1
    return other if width is not None and shape[dim] != width and shape[other] == width else dim


def add_reft(backbone: nn.Module, layers, rank: int = 4, positions=None, input_size=(3, 224, 224),
             coarse: bool = True, name: str = "backbone") -> list[str]:
    """Add a LoReFT intervention at the output of each block group in `layers`, in place; return the module paths.

    input_size: (channels, height, width) of the inputs the backbone will see (one probe forward pass at it finds
    each output's shape). coarse: timm group_matcher(coarse=...), as thawlab's block groups use it.
    The new parameters require grad; the backbone's keep their requires_grad (thawlab's phase decides what trains).
    """
    from thawlab.backbone import block_groups

    spec = parse_positions(positions)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ThawlabError(f"{CONFIG}rank={rank!r} must be a positive integer")
    if interventions(backbone):
        raise ThawlabError(f"{name} already has ReFT interventions: add them once")
    groups = block_groups(backbone, coarse)
    labels = list(groups)
    chosen = pick_groups(labels, layers, f"{CONFIG}layers")
    twice = [g for i, g in enumerate(chosen) if g in chosen[:i]]
    if twice:
        raise ThawlabError(f"{CONFIG}layers names {twice[0]} twice")
    if labels[0] in chosen:
        raise ThawlabError(f"{CONFIG}layers: index 0 is the stem, whose output is no module's output: choose a "
                           f"block group, 1..{len(labels) - 1} or -{len(labels) - 1}..-1")
    paths = {g: output_module(backbone, groups[g]) for g in chosen}
    shapes = _probe(backbone, [p for p in paths.values() if p], input_size)
    new = {}  # every group checked before the backbone changes
    for g, path in paths.items():
        shape = shapes.get(path)
        at = f"{g} of {name}" if path == g else f"{g} ({path or 'no module'}) of {name}"
        if not isinstance(shape, tuple) or len(shape) not in (2, 3, 4):
            raise ThawlabError(f"{CONFIG}layers: {at} gives no tensor of shape (B, D), (B, N, D) or (B, C, H, W) in "
                               f"a forward pass (got {shape!r}): choose another group")
        dim = _channel_dim(backbone, path, shape)
        if rank > shape[dim]:
            raise ThawlabError(f"{CONFIG}rank={rank} is larger than the width d={shape[dim]} of {at} (output "
                               f"{shape}): use 1..{shape[dim]}")
        if spec is not None and len(shape) != 3:
            raise ThawlabError(f"{CONFIG}positions={positions!r} selects tokens, but {at} outputs {shape}: ReFT "
                               f"edits every position there; use positions=null")
        pos = tuple(range(getattr(backbone, "num_prefix_tokens", 0))) if spec == "prefix" else spec
        if pos == ():
            raise ThawlabError(f"{CONFIG}positions=prefix: {name} has no prefix (class or register) tokens")
        bad = [p for p in pos or () if not -shape[1] <= p < shape[1]]
        if bad:
            raise ThawlabError(f"{CONFIG}positions: {bad[0]} is out of range for the {shape[1]} tokens of {at}: "
                               f"use {-shape[1]}..{shape[1] - 1}")
        new[path] = (shape[dim], dim, pos)
    p = next(backbone.parameters())
    for path, (width, dim, pos) in new.items():
        _attach(backbone, path, LoReFT(width, rank, dim, pos).to(device=p.device, dtype=p.dtype))
    # timm's group_matcher must place each intervention in the group of the module it edits
    after = {n: i for i, params in enumerate(block_groups(backbone, coarse).values()) for n in params}
    for g, path in paths.items():
        for n, _ in backbone.get_submodule(f"{path}.{CHILD}").named_parameters():
            if after[f"{path}.{CHILD}.{n}"] != labels.index(g):
                raise RuntimeError(f"timm's group_matcher puts {path}.{CHILD}.{n} outside block group {g}")
    return list(new)


def interventions(backbone: nn.Module) -> dict[str, LoReFT]:
    """Module path -> its intervention."""
    return {n.rpartition(".")[0]: m for n, m in backbone.named_modules() if isinstance(m, LoReFT)}


def export_reft(backbone: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Remove the interventions in place; return the plain backbone and their tensors under `thawlab_reft.`."""
    state = {}
    for path, iv in interventions(backbone).items():
        key = f"{PREFIX}{path}."
        state.update({key + "rotation": iv.rotate.weight, key + "weight": iv.source.weight,
                      key + "bias": iv.source.bias, key + "channel_dim": torch.tensor(iv.channel_dim)})
        if iv.positions is not None:
            state[key + "positions"] = torch.tensor(iv.positions, dtype=torch.int64)
        module = backbone.get_submodule(path)
        delattr(module, CHILD)
        for k in [k for k, fn in module._forward_hooks.items() if fn is _intervene]:
            del module._forward_hooks[k]
    return backbone, {k: v.detach().contiguous() for k, v in state.items()}


def load_exported(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Put the interventions of an exported state (keys `thawlab_reft.<module>.*`) on a timm model, in place."""
    paths = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in state if k.startswith(PREFIX)})
    for path in paths:
        get = lambda key: state.get(f"{PREFIX}{path}.{key}")  # noqa: E731
        rank, width = get("rotation").shape
        pos = get("positions")
        iv = LoReFT(width, rank, int(get("channel_dim")), tuple(pos.tolist()) if pos is not None else None)
        iv.rotate.weight = get("rotation")  # through the parametrization's right_inverse
        iv.source.load_state_dict({"weight": get("weight"), "bias": get("bias")})
        _attach(model, path, iv)
    return model


def reft_parameter_count(backbone: nn.Module) -> int:
    return sum(p.numel() for iv in interventions(backbone).values() for p in iv.parameters())


__all__ = ["LoReFT", "add_reft", "check_options", "export_reft", "load_exported", "interventions", "output_module",
           "parse_positions", "reft_parameter_count"]
