"""CLIP-family backbones through OpenCLIP (`backbone.name=open_clip:<model>`).

OpenCLIP's image tower is wrapped so that the rest of thawlab sees what it sees in a timm backbone created with
`num_classes=0`: forward(x) -> pooled features (here CLIP's projected image embedding, the space the zero-shot
head lives in), `group_matcher` (the block-group API), `pretrained_cfg` (preprocessing and the classifier's
name), `no_weight_decay`, `num_features`. So ThawNet, every schedule, the feature cache, L2-SP, export and
WiSE-FT run on it unchanged. The per-tower matchers live here and nowhere else:
  VisionTransformer  stem (class/position embeddings, patch conv, ln_pre) / transformer.resblocks.<i> / top
  ModifiedResNet     stem (three convs) / layer1..4 (layerN.M fine) / attnpool
  TimmModel          the timm trunk's own matcher / top (OpenCLIP's projection head)

The text tower (everything of the CLIP model but `visual`: token and position embeddings, transformer,
ln_final, text_projection, logit_scale) is a module of its own, `ClipText`. ThawNet holds it apart from the
backbone's block groups, in a group called `text` that no schedule but FLYP names (thawlab.schedules), so it
cannot be unfrozen by accident.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from thawlab.errors import ThawlabError, did_you_mean

PREFIX = "open_clip:"
CONFIGS = Path(__file__).parent / "clip_configs"  # thawlab's own OpenCLIP model configs (the embedded CLIP)
# the layers after the last block (ln_post and the projection, attnpool, the timm tower's head) in a group of their
# own, `top`, as the block-group API names it; timm's (99999,) would merge them into the last block's group
TOP = (10**6,)
log = logging.getLogger(__name__)


def is_clip(name: str) -> bool:
    return str(name).startswith(PREFIX)


def model_name(name: str) -> str:
    return str(name)[len(PREFIX):]


CONFIGS_ENV = "THAWLAB_CLIP_CONFIGS"  # more folders of OpenCLIP model configs (os.pathsep-separated)


def register_configs() -> None:
    """Every OpenCLIP model config shipped in thawlab/clip_configs/ (the embedded small CLIP) and in the folders
    of $THAWLAB_CLIP_CONFIGS (a user's own model configs; an environment variable, so DDP rank processes and
    launcher workers see them too), registered before any model is named or created, each folder once."""
    import open_clip

    done = register_configs.__dict__.setdefault("done", set())
    folders = [CONFIGS, *(Path(p) for p in os.environ.get(CONFIGS_ENV, "").split(os.pathsep) if p)]
    for folder in folders:
        if folder.is_dir() and str(folder) not in done:
            open_clip.add_model_config(folder)
            done.add(str(folder))


def check_name(name: str) -> None:
    import open_clip

    register_configs()
    arch = model_name(name)
    models = open_clip.list_models()
    if arch not in models:
        raise ThawlabError(f"unknown OpenCLIP model backbone.name={name!r}{did_you_mean(arch, models)}")


def check_input_size(name: str, img_size: int) -> None:
    """A ViT tower's position embedding (and a ModifiedResNet's attention pool's) fixes its input size: a
    different data.img_size fails at the first forward. One line before anything starts, naming the size it
    takes. timm-trunk towers are left to their own checks at the first forward."""
    import open_clip

    register_configs()
    vision = (open_clip.get_model_config(model_name(name)) or {}).get("vision_cfg", {})
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if vision.get("timm_model_name") is None and int(size) != int(img_size):
        raise ThawlabError(f"backbone.name={name} takes {size}x{size} inputs only (its position embedding), "
                           f"data.img_size={img_size}: pass data.img_size={size}")


def _hub_file(arch: str, tag: str) -> str | None:
    """The cached file of a hub tag, if a previous download left one (HF hub cache), else None."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hub)
    for f in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
        found = try_to_load_from_cache(repo, f)
        if isinstance(found, str):
            return found
    return None


def create_clip(name: str, pretrained) -> nn.Module:
    """The whole OpenCLIP model (both towers). pretrained: false/None (random init), a hub tag (`openai`,
    `laion2b_s34b_b88k`: used from the local hub cache when the hub is out of reach) or a local weights file."""
    import open_clip

    from thawlab.backbone import _hub_reachable

    check_name(name)
    arch = model_name(name)
    if pretrained is False or pretrained is None:
        with _quiet():  # OpenCLIP warns that no weights were loaded: random init is what was asked for
            return open_clip.create_model(arch, pretrained=None)
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ThawlabError(f"backbone.pretrained=true: an OpenCLIP model needs a tag ({', '.join(tags) or 'none'}"
                           f" for {arch}) or a local weights file")
    value = str(pretrained)
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        try:
            return open_clip.create_model(arch, pretrained=path)
        except Exception as e:  # noqa: BLE001 (a file that does not fit the architecture)
            raise ThawlabError(f"backbone.pretrained: {value!r} does not fit OpenCLIP's {arch!r} "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if value not in tags:
        looks_like_path = os.sep in value or value.endswith((".pt", ".bin", ".safetensors", ".pth"))
        if looks_like_path:
            raise ThawlabError(f"backbone.pretrained: weights file {value!r} does not exist")
        raise ThawlabError(f"backbone.pretrained={value!r} is not an OpenCLIP tag of {arch} (tags: "
                           f"{', '.join(tags) or 'none'}){did_you_mean(value, tags)}")
    if not os.environ.get("HF_HUB_OFFLINE") and _hub_reachable():
        return open_clip.create_model(arch, pretrained=value)
    cached = _hub_file(arch, value)
    if cached is None:
        raise ThawlabError(f"backbone.pretrained={value}: the weights of OpenCLIP's {arch}/{value} are not in the "
                           f"local hub cache and the hub cannot be reached: the weights must be a local file "
                           f"(backbone.pretrained=/path/to/file) or already in the cache")
    tag_cfg = open_clip.get_pretrained_cfg(arch, value)  # what create_model takes from the tag: same model
    pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    return open_clip.create_model(arch, pretrained=cached, force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                                  force_preprocess_cfg=pre or None)


class _quiet:
    """OpenCLIP's own log lines about weights (the root logger, WARNING) while a model is created at random."""

    def __enter__(self):
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self.level)


def split(model: nn.Module, name: str) -> tuple["ClipImage", "ClipText"]:
    """An OpenCLIP model as (image tower, text tower), each a module of its own."""
    import open_clip

    pre = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual
    del model.visual  # encode_text never touches it; the rest of the model is the text tower
    return ClipImage(visual, pre, name), ClipText(model, name)


def _prefixed(pattern: str, prefix: str) -> str:
    """A timm matcher regex (anchored at the trunk's own names) anchored under `prefix`; the alternatives of an
    unparenthesised `^a|b|c` (timm's ViT stem) all stay anchored under it."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    return "^" + re.escape(prefix) + "(?:" + body + ")"


class ClipImage(nn.Module):
    """OpenCLIP's image tower as a timm-like backbone: forward -> CLIP's (projected) image embedding."""

    def __init__(self, visual: nn.Module, preprocess_cfg: dict, name: str):
        super().__init__()
        self.visual = visual
        self.name = name
        size = preprocess_cfg.get("size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        # what timm's resolve_model_data_config reads; "classifier" names no parameter (there is none): the
        # layer-decay scales give thawlab's head the top id, as for a timm model without num_classes
        self.pretrained_cfg = {"input_size": (3, int(size), int(size)), "mean": tuple(preprocess_cfg["mean"]),
                               "std": tuple(preprocess_cfg["std"]),
                               "interpolation": preprocess_cfg.get("interpolation", "bicubic"),
                               "crop_pct": 1.0, "classifier": "head"}
        self.num_features = int(getattr(visual, "output_dim", 0) or self._probe_width(int(size)))

    def _probe_width(self, size: int) -> int:
        with torch.no_grad():
            return int(self.visual(torch.zeros(1, 3, size, size)).shape[-1])

    @property
    def kind(self) -> str:
        return type(self.visual).__name__

    def forward(self, x):
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out  # towers that also return tokens: the pooled embedding

    def data_config(self) -> dict:
        return dict(self.pretrained_cfg)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.visual, "no_weight_decay", None)
        names = set(inner()) if callable(inner) else set()
        trunk = getattr(self.visual, "trunk", None)  # a timm trunk: its own exemptions
        if trunk is not None and callable(getattr(trunk, "no_weight_decay", None)):
            names |= {f"trunk.{n}" for n in trunk.no_weight_decay()}
        return {f"visual.{n}" for n in names}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Block groups in timm's matcher format, per tower kind (the only place that knows them)."""
        kind = self.kind
        if kind == "VisionTransformer":
            return {"stem": r"^visual\.(?:class_embedding|positional_embedding|conv1|ln_pre|patch_dropout)",
                    "blocks": [(r"^visual\.transformer\.resblocks\.(\d+)", None),
                               (r"^visual\.(?:ln_post|proj|attn_pool|ln_attn_pool|head)", TOP)]}
        if kind == "ModifiedResNet":
            blocks = r"^visual\.layer(\d+)" if coarse else r"^visual\.layer(\d+)\.(\d+)"
            return {"stem": r"^visual\.(?:conv|bn)\d", "blocks": [(blocks, None), (r"^visual\.attnpool", TOP)]}
        if kind == "TimmModel":
            inner = self.visual.trunk.group_matcher(coarse=coarse)
            out = {}
            for key, spec in inner.items():
                if isinstance(spec, str):
                    out[key] = _prefixed(spec, "visual.trunk.")
                elif spec is not None:
                    out[key] = [(_prefixed(p, "visual.trunk."), i) for p, i in spec]
            blocks = out.get("blocks", [])
            out["blocks"] = ([(blocks, None)] if isinstance(blocks, str) else list(blocks)) + \
                [(r"^visual\.head", TOP)]
            return out
        raise ThawlabError(f"backbone.name={self.name}: OpenCLIP image tower {kind} has no block groups in "
                           f"thawlab.clip (VisionTransformer, ModifiedResNet and timm towers have)")


class ClipText(nn.Module):
    """OpenCLIP's text tower (the CLIP model without `visual`) and its logit scale. Encodes token ids."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        import open_clip

        self.model = model
        self.name = name
        self.tokenizer = open_clip.get_tokenizer(model_name(name))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)
