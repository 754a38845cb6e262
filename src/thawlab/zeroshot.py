"""The zero-shot head of a CLIP model (head=zeroshot) and its on-disk cache.

Class weights are OpenCLIP's `build_zero_shot_classifier`: for each class, the text embeddings of its name under
every template, each normalised, averaged, normalised again. As WiSE-FT's `ClassificationHead`
(mlfoundations/wise-ft): features are normalised, the weights are those class embeddings times CLIP's
`logit_scale.exp()`, the bias is zero, and weights and bias are trainable like a linear head's (fine-tuning and
LP-FT's probe start from them).

Text embeddings of 1,000 classes x 80 templates take a while on a CPU, so a head is cached on disk under
cache_dir/zeroshot/, keyed by the model name, a digest of the text tower's weights (the weights file decides
them; hashing the tensors themselves also keys random inits and fine-tuned text towers correctly), the class
names and the templates.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from thawlab.errors import ThawlabError


def check_templates(templates, key: str) -> None:
    if not templates:
        raise ThawlabError(f"{key} is empty: give at least one prompt template with {{}} for the class name")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ThawlabError(f"{key}: template {t!r} has no {{}} where the class name goes")


class ZeroShotHead(nn.Module):
    """logits = fc(normalize(features)), fc.weight = logit_scale.exp() * class embeddings, fc.bias = 0.

    Built at zero (the same arguments as every head: in_features, num_classes), then filled from a text tower by
    `fill` (thawlab.build). `templates`: head.templates, overriding data.templates when set."""

    needs_text = True  # built from a CLIP text tower (thawlab.build.fill_zeroshot)
    starts_trained = True  # a classifier before any training: LP-FT / WiSE-FT may skip the probe

    def __init__(self, in_features: int, num_classes: int, templates: list[str] | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.templates = list(templates) if templates else None
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.prompts: list[list[str]] = []  # per class, its prompts (FLYP's captions)

    def forward(self, x):
        return self.fc(self.dropout(F.normalize(x, dim=-1)))

    def fc_input(self, x):
        """What fc sees at evaluation: the normalised features (the L-BFGS probe fits fc on them, from scratch)."""
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def fill(self, text: nn.Module, classnames: list[str], templates: list[str], cache_dir: str | Path | None = None,
             batch_classes: int = 10) -> dict:
        """Class weights from `text` (thawlab.clip.ClipText); from the disk cache when it has them.
        Returns {"cached": bool, "key": ...} for the log."""
        if len(classnames) != self.fc.out_features:
            raise ThawlabError(f"data.classnames has {len(classnames)} names, the data {self.fc.out_features} "
                               f"classes")
        self.prompts = [[t.format(c) for t in templates] for c in classnames]
        path = None
        if cache_dir is not None:
            key = cache_key(text, classnames, templates)
            path = Path(cache_dir) / "zeroshot" / f"{key}.pt"
            if path.is_file():
                weight = torch.load(path, map_location="cpu", weights_only=True)
                self.fc.weight.copy_(weight)
                self.fc.bias.zero_()
                return {"cached": True, "path": str(path)}
        weight = class_embeddings(text, self.prompts, batch_classes) * text.logit_scale.exp()
        self.fc.weight.copy_(weight)
        self.fc.bias.zero_()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}")
            torch.save(weight.detach().cpu().contiguous(), tmp)
            tmp.replace(path)  # atomic: a concurrent job reads a whole file or none
        return {"cached": False, "path": str(path) if path else None}

    @torch.no_grad()
    def refresh(self, text: nn.Module) -> None:
        """Weights recomputed from a text tower that trained (FLYP's evaluation), same prompts; no cache."""
        self.fc.weight.copy_(class_embeddings(text, self.prompts) * text.logit_scale.exp())
        self.fc.bias.zero_()


def class_embeddings(text: nn.Module, prompts: list[list[str]], batch_classes: int = 10) -> torch.Tensor:
    """(classes, dim): per class, the mean of its normalised prompt embeddings, normalised
    (open_clip.build_zero_shot_classifier's arithmetic, in its batches of classes)."""
    device = next(text.parameters()).device
    was_training = text.training
    text.eval()
    out = []
    for i in range(0, len(prompts), batch_classes):
        batch = prompts[i:i + batch_classes]
        n = len(batch[0])
        tokens = text.tokenize([p for c in batch for p in c]).to(device)
        emb = text(tokens, normalize=True).float().reshape(len(batch), n, -1).mean(dim=1)
        out.append(emb / emb.norm(dim=1, keepdim=True))
    text.train(was_training)
    return torch.cat(out)


def cache_key(text: nn.Module, classnames: list[str], templates: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": getattr(text, "name", ""), "classes": list(classnames),
                         "templates": list(templates)}).encode())
    for name, t in sorted(text.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
