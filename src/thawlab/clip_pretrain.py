"""The embedded benchmark's small CLIP: contrastive pretraining on the source task, once, cached.

`backbone.name=open_clip:thawlab-mini-clip backbone.pretrained=source` (and `experiment=pretrain_source`) reach
`source_weights` here through thawlab.pretrain.source_weights. Nothing is re-implemented: the model is OpenCLIP's
own CLIP class built from the model config in clip_configs/ (registered with `open_clip.add_model_config`), the
captions go through OpenCLIP's tokenizer, the loss is `open_clip.loss.ClipLoss`, and the optimizer and schedule
are open_clip_train's (AdamW without decay on gains, biases and the logit scale; linear warm-up then cosine;
logit scale clamped at 100 after each step).

Captions come from the source labels: each training image is paired with one of `data.clip_pretrain.templates`
filled with its class name (drawn anew each step), as CLIP's captions for classification data. The source's
digits are named as the target's classes are (`data.classnames`), so a zero-shot head built from the target's
class names meets words the text tower learnt on printed digits.

The weights are cached under `cache_dir/pretrain/<backbone>-<key>` with pretrain.py's lock and `done` marker;
the key hashes everything that determines them (model config, source data, recipe, input size). The file is
the CLIP state dict as safetensors: `open_clip.create_model("thawlab-mini-clip", pretrained=str(path))` loads it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from omegaconf import DictConfig, OmegaConf

PREFIX = "open_clip:"
CONFIG_DIR = Path(__file__).parent / "clip_configs"  # the other OpenCLIP loaders of thawlab register it too
RECIPE_VERSION = 1  # bump when the code below changes what it produces


def register_configs() -> None:
    """Make thawlab's OpenCLIP model configs (clip_configs/*.json) known to open_clip, once."""
    import open_clip

    if not all(p.stem in open_clip.list_models() for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)


def model_name(cfg: DictConfig) -> str:
    return str(cfg.backbone.name)[len(PREFIX):]


def _model_config(name: str) -> dict:
    register_configs()
    import open_clip

    return open_clip.get_model_config(name)


def cache_key(cfg: DictConfig) -> str:
    """Everything that determines the weights: the model's config itself (not only its name, so editing the JSON
    retrains), the source data, the recipe (captions included), the input size."""
    spec = {"version": RECIPE_VERSION, "model": _model_config(model_name(cfg)),
            "source": OmegaConf.to_container(cfg.data.source, resolve=True),
            "recipe": OmegaConf.to_container(cfg.data.clip_pretrain, resolve=True), "img_size": cfg.data.img_size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir(cfg: DictConfig) -> Path:
    name = str(cfg.backbone.name).replace(":", "-")  # open_clip-thawlab-mini-clip-<key>: no colon in paths
    return Path(cfg.cache_dir).expanduser() / "pretrain" / f"{name}-{cache_key(cfg)}"


def check(cfg: DictConfig) -> None:
    """What must hold before anything slow starts: a source task, a recipe, a known model, captions."""
    from thawlab.errors import ThawlabError
    from thawlab.source_cache import check_source

    check_source(cfg)
    name = model_name(cfg)
    if _model_config(name) is None:
        import open_clip

        from thawlab.errors import did_you_mean

        raise ThawlabError(f"backbone.name={cfg.backbone.name!r}: no OpenCLIP model config {name!r}"
                           f"{did_you_mean(name, open_clip.list_models())}")
    if not cfg.data.get("clip_pretrain"):
        raise ThawlabError(f"backbone.pretrained=source with {cfg.backbone.name}: data {cfg.data._target_!r} "
                           f"has no data.clip_pretrain recipe (captions and optimizer of the contrastive pretraining)")
    templates = list(cfg.data.clip_pretrain.templates or [])
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ThawlabError(f"data.clip_pretrain.templates={templates}: each caption template needs a '{{}}' for "
                           f"the class name")


def source_weights(cfg: DictConfig, force: bool = False) -> Path:
    """Path of the cached contrastively pretrained CLIP for this config, pretraining first if needed."""
    from thawlab.source_cache import run_cached

    check(cfg)
    return run_cached(cache_dir(cfg), force, lambda out: _pretrain(cfg, out))


class ContrastivePretraining(L.LightningModule):
    """CLIP's objective on (image, caption) pairs: the caption of an image is a template, drawn each step,
    filled with its class name. `texts[c, t]` holds the tokens of class c under template t."""

    def __init__(self, model, texts: torch.Tensor, recipe: dict, steps: int):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.model, self.recipe, self.steps = model, recipe, steps
        self.register_buffer("texts", texts, persistent=False)
        self.loss = ClipLoss()

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        _, n_templates, length = self.texts.shape
        template = torch.randint(n_templates, y.shape, device=y.device)
        # identical captions give identical text features: encode each distinct caption of the batch once
        # (same features, same gradients as encoding every caption; the text tower has no dropout)
        caption, inverse = torch.unique(y * n_templates + template, return_inverse=True)
        text = self.model.encode_text(self.texts.view(-1, length)[caption], normalize=True)[inverse]
        image = self.model.encode_image(x, normalize=True)
        loss = self.loss(image, text, self.model.logit_scale.exp())
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.lr_schedule(self.global_step)  # open_clip_train sets the lr before each step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():  # as open_clip_train: the temperature may not fall below 1/100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        from open_clip_train.scheduler import cosine_lr

        r = self.recipe
        # open_clip_train's split: no weight decay on gains, biases, embeddings of rank < 2 and the logit scale
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                  {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": r["weight_decay"]}]
        # fused: the same update in one kernel, 5x faster on a CPU over the 6.3M-entry token table
        opt = torch.optim.AdamW(groups, lr=r["lr"], betas=(0.9, 0.98), eps=1e-6, fused=True)
        self.lr_schedule = cosine_lr(opt, r["lr"], r["warmup_steps"], self.steps)
        return opt


def tokens(tokenizer, classnames, templates) -> torch.Tensor:
    """(classes, templates, context) token ids of every caption."""
    texts = [t.format(c) for c in classnames for t in templates]
    return tokenizer(texts).view(len(classnames), len(templates), -1)


def preprocess_of(model, img_size: int):
    """thawlab's input pipeline with OpenCLIP's own normalisation for this model (the preprocess config that
    create_model attaches), at the benchmark's input size."""
    import open_clip

    from thawlab.data.preprocess import Preprocess

    pc = open_clip.get_model_preprocess_cfg(model)
    return Preprocess(img_size=img_size, in_chans=3, mean=tuple(pc["mean"]), std=tuple(pc["std"]))


@torch.no_grad()
def features(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features (as CLIP classifies) and labels of every image of a loader."""
    model.eval()
    feats, labels = [], []
    for x, y, *_ in loader:
        feats.append(model.encode_image(x, normalize=True))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def zero_shot_accuracy(model, tokenizer, classnames, templates, loaders: dict) -> dict[str, float]:
    """Top-1 accuracy per loader of OpenCLIP's zero-shot classifier (build_zero_shot_classifier: normalised
    class embeddings averaged over the templates) on normalised image features."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                         num_classes_per_batch=None)
    out = {}
    for name, loader in loaders.items():
        f, y = features(model, loader)
        out[name] = float(((f @ weights).argmax(1) == y).float().mean())
    return out


def create(name: str, pretrained: str | None = None):
    """OpenCLIP's model (random init, or weights from a local file) and its tokenizer."""
    import logging

    import open_clip

    register_configs()
    level = logging.getLogger().level  # open_clip logs a warning for every random init: expected here
    logging.getLogger().setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    finally:
        logging.getLogger().setLevel(level)
    return model, open_clip.get_tokenizer(name)


def _pretrain(cfg: DictConfig, out: Path) -> None:
    from safetensors.torch import save_file

    from thawlab.build import build_datamodule, build_trainer, console
    from thawlab.source_cache import META, WEIGHTS
    from thawlab.results import atomic_write_json

    r = OmegaConf.to_container(cfg.data.clip_pretrain, resolve=True)
    name = model_name(cfg)
    data = cfg.data._target_.rsplit(".", 1)[-1]
    start = time.time()
    with torch.random.fork_rng():
        L.seed_everything(r["seed"], workers=True, verbose=False)
        model, tokenizer = create(name)
        dm = build_datamodule(cfg.data, preprocess_of(model, cfg.data.img_size), task="source",
                              shuffle_seed=r["seed"])
        dm.batch_size = r["batch_size"]
        dm.setup("fit")
        classnames = list(dm.classnames)
        texts = tokens(tokenizer, classnames, r["templates"])
        steps = r["epochs"] * (len(dm.train_set) // dm.batch_size or 1)
        n_img = sum(p.numel() for p in model.visual.parameters())
        console.print(f"[bold]pretraining {cfg.backbone.name} contrastively on the source task of {data}[/] "
                      f"({len(dm.train_set)} images, {len(classnames)} classes x {len(r['templates'])} caption "
                      f"templates, {r['epochs']} epochs, {steps} steps; image tower {n_img:,} parameters, text "
                      f"tower {sum(p.numel() for p in model.parameters()) - n_img:,}; once, cached in {out})")
        module = ContrastivePretraining(model, texts, r, steps)
        trainer = build_trainer(cfg.trainer, None, False, max_epochs=r["epochs"], devices=1, num_nodes=1,
                                strategy="auto", limit_train_batches=None, gradient_clip_val=None,
                                limit_val_batches=0, limit_test_batches=None, num_sanity_val_steps=0,
                                enable_progress_bar=cfg.trainer.get("enable_progress_bar", True))
        trainer.fit(module, train_dataloaders=dm.train_dataloader())  # no validation: the test set is scored after
    model = model.cpu().eval()
    # source test accuracy: image -> text retrieval among the source classes under the caption templates
    test = {"id": dm.eval_dataloaders("test")["id"]}
    acc = zero_shot_accuracy(model, tokenizer, classnames, r["templates"], test)["id"]
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    seconds = round(time.time() - start, 1)
    atomic_write_json(out / META, {"backbone": cfg.backbone.name, "source_classes": len(classnames),
                                   "source_classnames": classnames, "source_test_acc": acc, "seconds": seconds,
                                   "logit_scale": float(model.logit_scale.detach().exp()),
                                   "config": OmegaConf.to_container(cfg.data, resolve=True)})
    console.print(f"pretraining done in {seconds:.0f}s: source test acc (image -> caption among "
                  f"{len(classnames)} classes) {100 * acc:.1f}%")


class _ZeroShotOnFeatures(nn.Module):
    """An image tower followed by a fixed zero-shot classifier: logits = scale * normalise(f) @ W."""

    def __init__(self, tower: nn.Module, weights: torch.Tensor, scale: float):
        super().__init__()
        self.tower, self.scale = tower, scale
        self.register_buffer("weights", weights)

    def forward(self, x):
        return self.scale * torch.nn.functional.normalize(self.tower(x), dim=-1) @ self.weights


def source_retention(cfg: DictConfig, net, preprocess, weights: Path) -> dict[str, float]:
    """Forgetting for a CLIP fine-tuned from the embedded pretraining: the fine-tuned image tower, classified by
    the *pretrained* text tower's zero-shot head over the source classes under the caption templates (the same
    image -> caption retrieval that gave the pretrained model's figure, `pretrain/source/acc`), on the source test
    set: `test/source/*`, as thawlab.pretrain.source_retention gives for timm backbones with their source head."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from thawlab.build import build_datamodule
    from thawlab.metrics import evaluate
    from thawlab.source_cache import META

    meta = json.loads((Path(weights).parent / META).read_text())
    model, tokenizer = create(model_name(cfg), str(weights))
    model.eval()
    with torch.no_grad():
        zs = build_zero_shot_classifier(model, tokenizer, list(meta["source_classnames"]),
                                        list(cfg.data.clip_pretrain.templates), num_classes_per_batch=None)
    dm = build_datamodule(cfg.data, preprocess, task="source", shuffle_seed=cfg.data.clip_pretrain.seed)
    dm.setup("test")
    device = next(net.backbone.parameters()).device
    scored = _ZeroShotOnFeatures(net.backbone, zs.to(device), float(model.logit_scale.detach().exp()))
    values = evaluate(scored, {"source": dm.eval_dataloaders("test")["id"]}, len(meta["source_classnames"]), "test")
    return {**values, "pretrain/source/acc": float(meta["source_test_acc"])}

