"""A timm backbone: creation, weights (hub tag or local file), preprocessing and its block partition.

The backbone is created with `num_classes=0`, so it returns pooled features; thawlab's head sits on top.
Blocks come from timm's model-agnostic `group_matcher` (stem, blocks..., top), never from per-architecture
layer lists.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from collections import OrderedDict

import timm
import torch
from timm.models import group_parameters
from torch import nn

from thawlab.errors import ThawlabError, did_you_mean

log = logging.getLogger(__name__)
HUB_HOST = ("huggingface.co", 443)


def check_name(name: str) -> None:
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ThawlabError(f"unknown backbone.name {name!r}{did_you_mean(arch, timm.list_models())}")


def check_input_size(name: str, kwargs: dict, img_size: int) -> None:
    """A backbone with a fixed input size (a ViT's or Swin's strict patch embedding, PiT's position embedding)
    that differs from data.img_size fails at its first forward, deep inside a training (or the source
    pretraining). Build it on the meta device (no memory, no weights: a fraction of a second) and run one
    forward at the data's size, so the mismatch is one line before anything starts, with the fix."""
    arch = name.split(".")[0]
    try:
        model = _meta_model(arch, kwargs)
    except ThawlabError:
        raise
    except Exception:  # noqa: BLE001 (whatever creation problem is reported where the model is really built)
        return
    if _runs_at(model, img_size):
        return
    pe = getattr(model, "patch_embed", None)
    fixed, by = getattr(pe, "img_size", None) if getattr(pe, "strict_img_size", False) else None, "its patch embedding"
    if not fixed and model.pretrained_cfg.get("fixed_input_size"):
        fixed, by = model.pretrained_cfg.get("input_size", (0, 0, 0))[1:], "its timm config"
    if not fixed:
        return  # not a fixed-size model: the failure, if any, is reported where the model really runs
    h = int(tuple(fixed)[0])
    if not _runs_at(model, h):
        return  # it fails at its own size too: the meta device, not the size, is the problem here
    fixes = []
    patch = max(1, img_size // 8)
    suggested = {**kwargs, "img_size": img_size, **({"patch_size": patch} if "patch_size" in _args_of(model) else {})}
    try:
        if img_size % patch == 0 and _runs_at(_meta_model(arch, suggested), img_size):
            fixes.append(" ".join(f"{'' if k in kwargs else '+'}backbone.kwargs.{k}={v}" for k, v in suggested.items()
                                  if k in ("img_size", "patch_size")))
    except Exception:  # noqa: BLE001
        pass
    fixes.append(f"data.img_size={h}")
    raise ThawlabError(f"backbone.name={name} takes {h}x{h} inputs only (fixed by {by}), "
                       f"data.img_size={img_size}: pass {' or '.join(fixes)}")


def _meta_model(arch: str, kwargs: dict) -> nn.Module:
    with torch.device("meta"):
        return _create(arch, pretrained=False, num_classes=0, **kwargs).eval()


def _runs_at(model: nn.Module, size: int) -> bool:
    chans = int(model.pretrained_cfg.get("input_size", (3,))[0])
    try:
        with torch.no_grad():
            model(torch.empty(2, chans, size, size, device="meta"))
        return True
    except Exception:  # noqa: BLE001
        return False


def _args_of(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).__init__).parameters)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _create(name: str, **kwargs) -> nn.Module:
    """timm.create_model; an argument the architecture does not take is the user's one line, not a TypeError."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not bad:
            raise
        key = "backbone.drop_path_rate" if bad[1] == "drop_path_rate" else f"backbone.kwargs.{bad[1]}"
        raise ThawlabError(f"{key}: timm's {name.split('.')[0]!r} does not take {bad[1]!r}") from None


def create_backbone(name: str, pretrained, kwargs: dict | None = None) -> nn.Module:
    """pretrained: False (random init), True (the timm hub tag) or a path to a local weights file."""
    check_name(name)
    kwargs = dict(kwargs or {})
    if pretrained is False or pretrained is None:
        return _create(name, pretrained=False, num_classes=0, **kwargs)
    if pretrained is True:
        if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
            raise ThawlabError(
                f"backbone.pretrained=true needs the hub weights of {name!r} from huggingface.co, which cannot "
                f"be reached: put a weights file on this machine and pass backbone.pretrained=/path/to/file "
                f"(or set HF_HUB_OFFLINE=1 to use the local hub cache)")
        try:
            return _create(name, pretrained=True, num_classes=0, **kwargs)
        except ThawlabError:
            raise
        except Exception as e:  # offline cache miss, no weights for this tag, ...
            raise ThawlabError(f"backbone.pretrained=true: no hub weights for {name!r} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); pass a local file as "
                               f"backbone.pretrained=/path/to/file") from None
    path = os.path.expanduser(str(pretrained))
    if not os.path.isfile(path):
        raise ThawlabError(f"backbone.pretrained: weights file {str(pretrained)!r} does not exist "
                           f"(false, true, source or a path to a weights file)")
    # timm drops the classifier (num_classes differs) and adapts the input channels
    model = _create(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **kwargs)
    _check_all_loaded(model, path, name)
    return model


def _load_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _check_all_loaded(model: nn.Module, path: str, name: str) -> None:
    """timm loads non-strictly once it drops the classifier: check every backbone tensor came from the file."""
    keys = set(_load_file(path))
    missing = [k for k in model.state_dict() if k not in keys and not k.endswith("num_batches_tracked")]
    if missing:
        raise ThawlabError(f"backbone.pretrained: {path!r} does not fit {name!r}: {len(missing)} tensors missing "
                           f"(first: {missing[0]})")


def timm_state_dict(model: nn.Module, classifier: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict, plus `classifier` under the model's own classifier name (pretrained_cfg):
    what `timm.create_model(name, num_classes=...)` loads, strict, with no thawlab or PEFT installed."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if classifier is not None:
        name = model.pretrained_cfg.get("classifier", "fc")
        state.update({f"{name}.weight": classifier.weight.detach().contiguous(),
                      f"{name}.bias": classifier.bias.detach().contiguous()})
    return state


def classifier_of(state: dict[str, torch.Tensor], model: nn.Module) -> nn.Linear:
    """The classifier stored in a timm state dict, as a Linear layer on the model's pooled features."""
    name = model.pretrained_cfg.get("classifier", "fc")
    weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.load_state_dict({"weight": weight, "bias": bias})
    return layer


def data_config(model: nn.Module) -> dict:
    """The preprocessing the weights expect (timm's pretrained config): mean, std, input size."""
    return timm.data.resolve_model_data_config(model)


def block_groups(model: nn.Module, coarse: bool = True) -> "OrderedDict[str, list[str]]":
    """Parameter names of the backbone in groups, in forward order: stem, blocks..., top.

    Group names are the module path the group's parameters share (layer1, blocks.3, stages.2, norm);
    the first is called stem. A model without a group matcher falls back, with a warning, to one group per
    top-level child module. No group is called "head": that name belongs to thawlab's head (ThawNet).
    """
    names = [n for n, _ in model.named_parameters()]
    try:
        matcher = model.group_matcher(coarse=coarse)
    except (AttributeError, NotImplementedError):
        matcher = None
    if matcher is None:
        warnings.warn(f"{type(model).__name__} has no timm group_matcher: one group per top-level module")
        # Parameters held by the model itself (PiT's cls_token and pos_embed) belong to no child module: split
        # on their name, each would be a group of its own ahead of the stem (PiT: pos_embed, cls_token,
        # patch_embed, ...), unfrozen last by gradual unfreezing. They join the first child's group instead,
        # as timm's matchers put such tokens and embeddings in the stem (vit, deit). The first group is called
        # stem here too, as documented, so every backbone's input end has the same name.
        children = [n.split(".")[0] for n in names if "." in n]
        first = children[0] if children else None
        by_child: OrderedDict[str, list[str]] = OrderedDict()
        for n in names:
            by_child.setdefault(n.split(".")[0] if "." in n else first, []).append(n)
        return _labelled(list(by_child.values()), list(by_child))
    if isinstance(matcher, dict):
        _warn_unmatched(names, matcher)
    by_id = group_parameters(model, matcher)
    # a backbone that wraps a single module (OpenCLIP's image tower, thawlab.clip: visual.*) is named by what is
    # inside it: transformer.resblocks.3, layer2, not visual.transformer.resblocks.3
    tops = {n.split(".")[0] for n in names}
    inner = f"{tops.pop()}." if len(tops) == 1 and all("." in n for n in names) else ""
    return _labelled([by_id[gid] for gid in sorted(by_id)], strip=inner)


HEAD = "head"  # ThawNet's group of thawlab's head parameters


def _labelled(groups: list[list[str]], children: list[str] | None = None, strip: str = "") -> "OrderedDict[str, list[str]]":
    """Name groups (forward order): stem, then the module path the parameters share (the top-level child's
    name, without a matcher), top for an unnamed last group; a name already taken gets a trailing _."""
    out: OrderedDict[str, list[str]] = OrderedDict()
    for i, params in enumerate(groups):
        if i == 0:
            label = "stem"
        elif children is not None:
            label = children[i]
        else:
            label = _common_prefix([p.removeprefix(strip) for p in params]) or (
                "top" if i == len(groups) - 1 else f"group{i}")
        # ThawNet adds its own group "head" after these and would overwrite a backbone group of that name:
        # what timm keeps of its head with num_classes=0 (MambaOut's head.norm and head.pre_logits, MetaFormer's
        # head.norm) would drop out of the partition and ThawNet fail (KeyError). That part runs after the
        # last block, so it gets the name of an unnamed last group: top.
        if label == HEAD:
            label = "top"
        while label in out:
            label += "_"
        out[label] = params
    return out


def _warn_unmatched(names: list[str], matcher: dict) -> None:
    """timm puts parameters its matcher misses into the last group (timm #2712). That is right for the layers
    after the last block (ConvNeXt's head.norm); for a parameter that runs earlier it breaks forward order."""
    patterns = []
    for spec in matcher.values():
        if spec is None:
            continue
        patterns += [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
    matched = [any(re.match(p, n) for p in patterns) for n in names]
    last_matched = max((i for i, m in enumerate(matched) if m), default=-1)
    early = [n for i, n in enumerate(names) if not matched[i] and i < last_matched]
    if early:
        warnings.warn(f"timm group_matcher left {len(early)} parameters that run before the last block unmatched; "
                      f"they join the top group (first: {early[0]})")


def _common_prefix(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def layer_decay_scales(model: nn.Module, decay: float) -> tuple[dict[str, float], float]:
    """timm's layer-wise lr decay (`timm.optim.param_groups_layer_decay`, after BEiT), for every parameter:
    ({backbone parameter name: lr scale}, the scale of a new head).

    As timm: layer ids from `group_matcher(coarse=False)` (fine, whatever backbone.coarse_groups says: freezing
    granularity is not lr granularity), scale = decay ** (top id - id), computed on all parameters (timm skips
    those with requires_grad=False, which would shift the ids of a model frozen when it is called). thawlab's
    backbone has no classifier (num_classes=0), and timm gives the classifier the top id, shared with whatever
    else its matcher leaves unmatched after the last block (ConvNeXt's head.norm, ViT's fc_norm): so the ids
    are computed with the classifier's names (pretrained_cfg["classifier"]) added, and thawlab's head takes
    the classifier's scale. A model without a group_matcher: timm's own fallback (`auto_group_layers`) on it.
    """
    from timm.models._manipulate import group_with_matcher

    names = [n for n, _ in model.named_parameters()]
    classifier = model.pretrained_cfg.get("classifier") or "head"
    head_names = [f"{c}.weight" for c in ((classifier,) if isinstance(classifier, str) else classifier)]
    try:
        matcher = model.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        matcher = None
    if matcher is not None:
        layer = group_with_matcher(((n, None) for n in names + head_names), matcher, reverse=True)
    else:
        from timm.optim._param_groups import auto_group_layers

        layer = auto_group_layers(model)
        layer.update({n: max(layer.values(), default=0) + 1 for n in head_names})
    top = max(layer.values())
    scale = {n: decay ** (top - layer.get(n, top)) for n in names}
    return scale, decay ** (top - layer[head_names[0]])
