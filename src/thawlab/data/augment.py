"""Image transforms: the evaluation transform, and the training augmentations `data.augment` names, the same
presets on every data set (evaluation sets never get them).

Presets, each on a PIL image, then to a tensor normalised with the model's mean and std (Preprocess):
- none: the evaluation transform (deterministic: the feature cache of frozen phases stays on);
- crop_flip: pad by img_size/8, random crop back, horizontal flip (the CIFAR recipe);
- resized_crop: random resized crop (area `Recipe.scale`), horizontal flip (the ImageNet recipe);
- randaug: the data set's base crop (`Recipe.base`), then timm's RandAugment `rand-m9-mstd0.5-inc1` (2 of 15
  operations drawn per image, each applied with probability 0.5, magnitude 9 ± 0.5 of 10) and timm's random
  erasing (probability 0.25, noise): the timm / DeiT recipe;
- clip_crop: the training transform of OpenAI's CLIP code as wise-ft and FLYP vendor it (clip/clip.py
  `_transform(n_px, is_train=True)` in mlfoundations/wise-ft and locuslab/FLYP): a random resized crop of 90-100%
  of the area, bicubic, no flip, whatever the data set's recipe (the papers' CLIP ImageNet runs);
- augmix: the base crop, then torchvision's AugMix (Hendrycks et al., ICLR 2020: 3 chains of 1-3 operations
  mixed with Dirichlet weights, then with the image) at the paper's settings: severity 3, width 3, and without
  the operations that overlap with the corruption benchmarks (contrast, colour, brightness, sharpness:
  `all_ops=False`, as the paper). The paper's Jensen-Shannon consistency loss is not included.

What keeps a label depends on the images: `Recipe` says it per data set. Natural images (CIFAR, ImageNet, your
folders) flip horizontally; digits do not (a mirrored 2, 3, 7 is no digit), start from a pad-and-crop and take
a milder resized crop; pixels moved in (padding, rotation, shear, translation) get the digits' background.

Why not `timm.data.create_transform(is_training=True, ...)` itself: its training path always starts with a random
resized crop of 8-100% of the area (on 8x8 digits a stroke, and not the CIFAR recipe) and fills with the mean
colour. The randaug preset assembles the same timm pieces (`rand_augment_transform` with the hparams that
create_transform passes, `RandomErasing`) after the data set's own crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from thawlab.data.preprocess import Preprocess
from thawlab.errors import ThawlabError, did_you_mean

PRESETS = ("none", "crop_flip", "resized_crop", "randaug", "augmix", "clip_crop")
CLIP_CROP_SCALE = (0.9, 1.0)  # wise-ft / FLYP clip/clip.py: RandomResizedCrop(n_px, scale=(0.9, 1.0), BICUBIC)
RANDAUG = "rand-m9-mstd0.5-inc1"  # timm's default RandAugment policy (DeiT, timm's ImageNet recipes)
RE_PROB = 0.25  # random erasing probability (DeiT)
MAGNITUDE_MAX = 9.99  # RandAugment's magnitude cap (timm: 10); see train_transform


@dataclass(frozen=True)
class Recipe:
    """Which random changes keep a data set's labels."""

    base: str = "resized_crop"  # the crop randaug and augmix start from: crop_flip | resized_crop
    hflip: float = 0.5  # probability of a horizontal flip
    scale: tuple[float, float] = (0.08, 1.0)  # resized_crop: range of the crop's share of the area
    fill: int | None = None  # grey level of pixels moved in; None: the libraries' defaults (black; timm: mean)


NATURAL = Recipe()


def check(augment: str) -> None:
    if augment not in PRESETS:
        raise ThawlabError(f"data.augment={augment!r} is not one of {', '.join(PRESETS)}"
                           f"{did_you_mean(str(augment), PRESETS)}")


def finish(p: Preprocess) -> list[Callable]:
    """PIL image -> tensor in the model's channels, normalised."""
    import torchvision.transforms as T

    if p.in_chans not in (1, 3):
        raise ThawlabError(f"the backbone expects {p.in_chans} input channels; image data sets give 1 or 3")
    return [ToMode(_mode(p)), T.ToTensor(), T.Normalize(p.mean[: p.in_chans], p.std[: p.in_chans])]


def _mode(p: Preprocess) -> str:
    return "L" if p.in_chans == 1 else "RGB"


class ToMode:
    """PIL image -> that mode (RGB, or L for one-channel models); picklable, for loader worker processes."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self):
        return f"ToMode({self.mode!r})"


def eval_transform(p: Preprocess, crop_pct: float = 0.875) -> Callable:
    """Resize the shorter side to img_size / crop_pct, centre-crop img_size (crop_pct=1: the central square,
    so a square image is kept whole: CIFAR at 32x32 loses no pixel)."""
    import torchvision.transforms as T

    size = p.img_size
    resize = int(math.floor(size / crop_pct))
    return T.Compose([T.Resize(resize, interpolation=resampling(p), antialias=True), T.CenterCrop(size), *finish(p)])


INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")


def resampling(p: Preprocess):
    """The torchvision mode of the model's interpolation (timm's and OpenCLIP's configs name it)."""
    import torchvision.transforms as T

    if p.interpolation not in INTERPOLATIONS:
        raise ThawlabError(f"data.interpolation={p.interpolation!r}: choose from {', '.join(INTERPOLATIONS)} "
                           f"(null: the model's own)")
    return T.InterpolationMode(p.interpolation)


def _crop(p: Preprocess, kind: str, recipe: Recipe) -> list[Callable]:
    import torchvision.transforms as T

    size, mode = p.img_size, resampling(p)
    flip = [T.RandomHorizontalFlip(recipe.hflip)] if recipe.hflip > 0 else []
    if kind == "crop_flip":
        return [T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size),
                T.RandomCrop(size, padding=max(1, size // 8), fill=recipe.fill or 0), *flip]
    return [T.RandomResizedCrop(size, scale=recipe.scale, interpolation=mode, antialias=True), *flip]


def train_transform(p: Preprocess, kind: str, crop_pct: float = 0.875, recipe: Recipe = NATURAL) -> Callable:
    """The training transform of preset `kind` (module docstring); none is the evaluation transform."""
    import torchvision.transforms as T

    check(kind)
    if kind == "none":
        return eval_transform(p, crop_pct)
    if kind in ("crop_flip", "resized_crop"):
        return T.Compose([*_crop(p, kind, recipe), *finish(p)])
    if kind == "clip_crop":  # the reference's crop (ratio: torchvision's default 3/4..4/3, as there)
        return T.Compose([T.RandomResizedCrop(p.img_size, scale=CLIP_CROP_SCALE,
                                              interpolation=T.InterpolationMode.BICUBIC, antialias=True), *finish(p)])
    steps = [*_crop(p, recipe.base, recipe), ToMode(_mode(p))]  # the operations below need L or RGB
    bands = p.in_chans
    if kind == "randaug":
        from timm.data import rand_augment_transform
        from timm.data.random_erasing import RandomErasing

        fill = (recipe.fill,) * bands if recipe.fill is not None else \
            tuple(min(255, round(255 * m)) for m in p.mean[:bands])  # timm's own choice: the mean colour
        hparams = {"translate_const": int(p.img_size * 0.45), "img_mean": fill,  # as create_transform passes
                   "interpolation": _pil(p),  # create_transform: the model's interpolation
                   # magnitudes drawn at 10 (9 + noise, clipped) make the increasing posterize keep 0 bits: a
                   # black image in older Pillow, a ValueError in Pillow 13. Capped just below: at least 1 bit.
                   "magnitude_max": MAGNITUDE_MAX}
        return T.Compose([*steps, rand_augment_transform(RANDAUG, hparams), *finish(p),
                          RandomErasing(RE_PROB, mode="pixel", device="cpu")])
    fill = [float(recipe.fill)] * bands if recipe.fill is not None else None
    return T.Compose([*steps, T.AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False,
                                       interpolation=resampling(p), fill=fill), *finish(p)])


def _pil(p: Preprocess):
    from timm.data.transforms import str_to_pil_interp

    resampling(p)  # checked
    return str_to_pil_interp(p.interpolation)
