"""The embedded benchmark: handwritten digits (target) and printed characters (source), offline.

Material that ships inside dependencies, no download:
- target: scikit-learn's 1,797 handwritten digits (UCI optdigits: a 32x32 bitmap per digit, counted in 4x4
  blocks into 8x8 images with values 0..16);
- source and style shift: characters rendered from the TrueType fonts matplotlib carries, pushed through the
  same 32x32 -> 4x4-block-count pipeline, so printed and handwritten differ in style, not in preprocessing.

Tasks:
- source (pretraining): 34 printed classes, digits and capital letters (O and I left out: at 8x8 they are
  the digits 0 and 1), 21 fonts, rendered with random rotation, shear, scale, shift and stroke weight.
- target: the 10 handwritten digits, fixed stratified train-pool/val/test splits (`split_seed`), a few labels
  per class for training (`train_per_class`).
- OOD sets: `printed` (digits in print: a style shift; the pretraining saw print, the fine-tuning does not)
  and `corrupt_s1`..`corrupt_s5` (the ID images under the CIFAR-10-C corruption suite, one corruption per
  image in turn, at severity 1..5; constants in corruptions.py). Validation OOD sets are built from the val
  split and other renders, test OOD sets from the test split: selection never sees a test image.

Training augmentation (`data.augment`, default none): every set is preprocessed once into tensors; with a
preset, the training images are instead kept as 8-bit grey PIL images at img_size (the 8x8 digit upsampled as
for evaluation) and augmented per item (thawlab.data.augment, with `RECIPE`). Evaluation sets never are.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from thawlab.data import augment as aug
from thawlab.data.corruptions import NAMES as CORRUPTIONS
from thawlab.data.corruptions import corrupt
from thawlab.data.preprocess import Preprocess  # noqa: F401  (also thawlab.data.digits.Preprocess for callers)
from thawlab.data.real import ArrayImages
from thawlab.data.sets import ImageSets
from thawlab.errors import ThawlabError

FONT_DIR = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)
DIGITS = "0123456789"
SOURCE_CLASSES = DIGITS + "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no O, I: indistinguishable from 0, 1 at 8x8
CANVAS = 64  # glyphs are drawn at 64x64, then reduced to the optdigits 32x32 bitmap


@functools.lru_cache(maxsize=None)
def glyph_atlas(chars: str) -> torch.Tensor:
    """(len(FONTS), len(chars), 64, 64) grey glyphs in [0, 1], scaled to full height, centred."""
    from matplotlib.ft2font import FT2Font
    from PIL import Image

    atlas = torch.zeros(len(FONTS), len(chars), CANVAS, CANVAS)
    for i, font in enumerate(FONTS):
        ft = FT2Font(os.path.join(FONT_DIR, font))
        ft.set_size(96, 72)
        for j, ch in enumerate(chars):
            ft.set_text(ch)
            ft.draw_glyphs_to_bitmap(antialiased=True)
            img = np.asarray(ft.get_image())
            ys, xs = np.nonzero(img > 64)
            img = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            h, w = img.shape
            height = CANVAS - 4
            width = max(1, min(CANVAS - 4, round(w * height / h)))
            img = np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))
            top, left = (CANVAS - height) // 2, (CANVAS - width) // 2
            atlas[i, j, top : top + height, left : left + width] = torch.from_numpy(img / 255.0)
    return atlas


def to_optdigits(canvas: torch.Tensor) -> torch.Tensor:
    """(N, 1, 64, 64) grey -> (N, 1, 8, 8) in [0, 1]: binary 32x32 bitmap counted in 4x4 blocks, as optdigits."""
    bitmap = (F.avg_pool2d(canvas, 2) > 0.5).float()
    return F.avg_pool2d(bitmap, 4)  # = count of on pixels / 16


def render(chars: str, labels: torch.Tensor, fonts: torch.Tensor, seed: int) -> torch.Tensor:
    """Render labels[k] (an index into chars) in FONTS[fonts[k]], each with its own random distortion."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    glyphs = glyph_atlas(chars)[fonts, labels].unsqueeze(1)
    angle = (torch.rand(n, generator=g) - 0.5) * np.deg2rad(24)
    shear = (torch.rand(n, generator=g) - 0.5) * 0.4
    scale = 0.85 + 0.2 * torch.rand(n, generator=g)  # > 1 shrinks the glyph
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.12
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(glyphs.shape), align_corners=False)
    out = F.grid_sample(glyphs, grid, align_corners=False)
    weight = torch.randint(0, 4, (n,), generator=g)  # 0-3 px of extra stroke at 64x64
    for k in range(1, 4):
        sel = weight >= k
        out[sel] = F.max_pool2d(out[sel], 3, stride=1, padding=1)
    return to_optdigits(out)


@functools.lru_cache(maxsize=8)
def render_balanced(chars: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class images of every char, fonts cycled so every font appears equally often. Cached: the runs of
    a sweep share one process and the same renders (callers must not modify the tensors in place)."""
    labels = torch.arange(len(chars)).repeat_interleave(per_class)
    fonts = (torch.arange(len(labels)) + seed) % len(FONTS)
    return render(chars, labels, fonts, seed), labels


def load_handwritten() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def stratified_split(y: torch.Tensor, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Per class: the first sizes[k] of a seeded shuffle go to split k; 'rest' takes the remainder."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in [*sizes, "rest"]}
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for k, n in sizes.items():
            if start + n > len(idx):
                raise ValueError(f"class {int(c)} has {len(idx)} images, too few for the split {sizes}")
            out[k].append(idx[start : start + n])
            start += n
        out["rest"].append(idx[start:])
    return {k: torch.cat(v) for k, v in out.items()}


# data.shift: the target task itself shifted, every split alike, for surgical fine-tuning (Lee et al. 2023):
# from a model trained on the plain task, an input-level shift (invert: x -> 1 - x) or a label-level one
# (flip_labels: y -> 9 - y).
SHIFTS = {
    "none": lambda x, y: (x, y),
    "invert": lambda x, y: (1.0 - x, y),
    "flip_labels": lambda x, y: (x, 9 - y),
}


# What keeps a digit's label: no horizontal flip (a mirrored 2, 3 or 7 is no digit); randaug and augmix start
# from the pad-and-crop (a shift of up to one pixel of the 8x8 digit); a resized crop keeps at least half the area (a
# crop of 8% would be a stroke); pixels moved in are background (black; white under data.shift=invert).
RECIPE = aug.Recipe(base="crop_flip", hflip=0.0, scale=(0.5, 1.0), fill=0)


class DigitsTarget(ImageSets):
    """Handwritten digits with printed and corrupted OOD sets (see the module docstring)."""

    num_classes = 10

    def __init__(self, preprocess: Preprocess = Preprocess(), train_per_class: int = 10, val_per_class: int = 18,
                 test_per_class: int = 36, split_seed: int = 0, ood: tuple[str, ...] = ("printed", "corrupt"),
                 severities: tuple[int, ...] = (1, 2, 3, 4, 5), shift: str = "none", augment: str = "none",
                 **loader_kwargs):
        super().__init__(**loader_kwargs)
        self.preprocess = preprocess
        self.train_per_class, self.val_per_class, self.test_per_class = train_per_class, val_per_class, test_per_class
        self.split_seed, self.ood, self.severities, self.shift = split_seed, tuple(ood), tuple(severities), shift
        for name in self.ood:
            if name not in ("printed", "corrupt"):
                raise ThawlabError(f"data.ood: unknown OOD set {name!r} for data=digits (choose from printed, corrupt)")
        if shift not in SHIFTS:
            raise ThawlabError(f"data.shift={shift!r} is not one of {', '.join(SHIFTS)}")
        aug.check(augment)
        self.augment = augment
        self.train_transform_deterministic = augment == "none"  # else no feature cache: inputs change each epoch
        self.recipe = dataclasses.replace(RECIPE, fill=255) if shift == "invert" else RECIPE

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        x, y = SHIFTS[self.shift](*load_handwritten())
        split = stratified_split(y, {"test": self.test_per_class, "val": self.val_per_class,
                                     "train": self.train_per_class}, self.split_seed)
        p = self.preprocess
        xt, yt = x[split["train"]], y[split["train"]]
        # augment=none: preprocessed once, the fastest (and what the feature cache keys by index)
        self.train_set = TensorDataset(p(xt), yt) if self.augment == "none" else self._augmented(xt, yt)
        for stage_name, key, seed in (("val", "val", 1), ("test", "test", 2)):
            xs, ys = x[split[key]], y[split[key]]
            sets = {"id": TensorDataset(p(xs), ys)}
            per_class = self.val_per_class if key == "val" else self.test_per_class
            if "printed" in self.ood:
                # seeds 1000+ never collide with the source renders (seeds < 1000)
                xp, yp = SHIFTS[self.shift](*render_balanced(DIGITS, per_class, seed=1000 + seed))
                sets["ood/printed"] = TensorDataset(p(xp), yp)
            if "corrupt" in self.ood:
                clean = p.resize(xs)
                for s in self.severities:
                    xc = torch.empty_like(clean)
                    for k, name in enumerate(CORRUPTIONS):  # image i gets corruption i mod 6
                        sel = torch.arange(k, len(xs), len(CORRUPTIONS))
                        xc[sel] = corrupt(clean[sel], name, s, seed=100 * seed + s)
                    sets[f"ood/corrupt_s{s}"] = TensorDataset(p.normalise(xc), ys)
            self.sets[stage_name] = sets

    def _augmented(self, x8: torch.Tensor, y: torch.Tensor):
        """Training images as 8-bit grey PIL images at img_size, augmented and normalised one at a time."""
        grey = (self.preprocess.resize(x8)[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        return ArrayImages(grey, y.numpy(), aug.train_transform(self.preprocess, self.augment, recipe=self.recipe))


class DigitsSource(ImageSets):
    """The pretraining task: 34 printed characters in 21 fonts; `renders` images per class and font."""

    num_classes = len(SOURCE_CLASSES)
    classnames = tuple(SOURCE_CLASSES)  # what a CLIP's source captions call each class (thawlab.clip_pretrain)

    def __init__(self, preprocess: Preprocess = Preprocess(), renders: int = 30, test_renders: int = 4,
                 seed: int = 0, **loader_kwargs):
        super().__init__(**loader_kwargs)
        self.preprocess, self.renders, self.test_renders, self.seed = preprocess, renders, test_renders, seed

    def setup(self, stage=None):
        """Renders what the stage needs: measuring forgetting (stage test) needs only the test set."""
        p, n = self.preprocess, len(FONTS)
        if stage in (None, "fit") and self.train_set is None:
            x, y = render_balanced(SOURCE_CLASSES, self.renders * n, seed=self.seed)
            self.train_set = TensorDataset(p(x), y)
            xv, yv = render_balanced(SOURCE_CLASSES, self.test_renders * n, seed=self.seed + 500)
            self.sets["val"] = {"id": TensorDataset(p(xv), yv)}
        if stage in (None, "fit", "test") and not self.sets["test"]:
            xt, yt = render_balanced(SOURCE_CLASSES, self.test_renders * n, seed=self.seed + 501)
            self.sets["test"] = {"id": TensorDataset(p(xt), yt)}
