"""What the real (on-disk) data sets share: locating their files, one-line errors when files are missing,
transforms from the model's expectation (thawlab.data.augment), lazily decoded data sets and held-out
validation splits.

Images are kept as they are stored (uint8 arrays, memory-mapped where the format allows, or file paths) and
decoded and transformed one item at a time, so 75 CIFAR-10-C sets of 10,000 images cost no memory up front.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from thawlab.data import augment as aug
from thawlab.data.augment import eval_transform, train_transform
from thawlab.data.ood_val import hold_out
from thawlab.data.preprocess import Preprocess
from thawlab.data.sets import ImageSets
from thawlab.errors import ThawlabError, did_you_mean

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def default_root() -> str:
    """$THAWLAB_DATA, else ~/data (what the configs' `root` interpolation resolves to)."""
    return os.environ.get("THAWLAB_DATA", os.path.join(os.path.expanduser("~"), "data"))


def check_root(root: str | os.PathLike | None, key: str = "data.root", create: bool = False,
               hint: str = "/path/to/the/data", missing_ok: bool = False) -> Path:
    """missing_ok: a root that does not exist is returned, for the caller to list what it expects there
    (prefixed by missing_root(root)), the same hint as for an empty root."""
    if root in (None, "", "???"):
        raise ThawlabError(f"{key} is not set: pass {key}={hint}")
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        if create and not root.exists():
            root.mkdir(parents=True)
        elif not (missing_ok and not root.exists()):
            raise ThawlabError(f"{key}={root}: no such directory")
    return root


def missing_root(root: Path, key: str = "data.root") -> str:
    """The start of a missing-files error when the data root itself does not exist: how to point at it."""
    if root.is_dir():
        return ""
    return (f"{key}={root}: no such directory (data.root=/path or $THAWLAB_DATA names the folder that holds "
            f"the sets; default $THAWLAB_DATA, else ~/data); ")


def resolve(root: Path, path: str) -> Path:
    """A configured path: absolute as given, relative to the data root otherwise."""
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else root / p


def check_choices(key: str, values: Sequence, choices: Sequence, what: str, where: str = "") -> None:
    for v in values:
        if v not in choices:
            raise ThawlabError(f"{key}: unknown {what} {v!r}{where} (choose from {', '.join(map(str, choices))})"
                               f"{did_you_mean(str(v), [str(c) for c in choices])}")


def check_severities(severities: Sequence[int]) -> None:
    for s in severities:
        if not isinstance(s, int) or not 1 <= s <= 5:
            raise ThawlabError(f"data.severities: severity {s!r} is outside 1..5")


@dataclass(frozen=True)
class Source:
    """Where a set's files come from: for the error that lists them when they are missing."""

    name: str  # "CIFAR-10.1"
    origin: str  # paper and URL
    option: str  # the config key that points at the folder
    download: bool = False  # whether data.download=true can fetch it

    def missing(self, folder: Path | Sequence[Path], files: Sequence[str] = (), reason: str = "") -> ThawlabError:
        """files: names inside folder; none: the folder (or each of several folders) itself is missing."""
        if not isinstance(folder, Path):
            listed = ", ".join(map(str, folder))
        elif len(files) > 1:
            listed = f"{folder}/{{{', '.join(files)}}}"
        else:
            listed = str(folder / files[0]) if files else str(folder)
        fix = (f"data.download=true fetches it, or point {self.option} at a copy" if self.download and not reason
               else f"download it by hand, then point {self.option} at the folder")
        return ThawlabError(f"{self.name}: missing {listed}{reason} (from {self.origin}; {fix})")


def missing_files(folder: Path, files: Sequence[str]) -> list[str]:
    return [f for f in files if not (folder / f).exists()]


# ---- data sets ------------------------------------------------------------------------------------------
class ArrayImages(Dataset):
    """uint8 images in an array (possibly memory-mapped), decoded to PIL one at a time.

    images[index[i]] is one image in the array's layout; `to_hwc` turns it into height x width x channels
    (identity for HWC arrays)."""

    def __init__(self, images, labels, transform: Callable | None = None, index=None,
                 to_hwc: Callable | None = None):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.index = np.arange(len(self.labels)) if index is None else np.asarray(index, dtype=np.int64)
        self.transform, self.to_hwc = transform, to_hwc

    def __len__(self):
        return len(self.index)

    def image(self, i: int):
        """The i-th image as a PIL image, before the transform."""
        from PIL import Image

        j = int(self.index[i])
        hwc = np.asarray(self.images[j])
        if self.to_hwc is not None:
            hwc = self.to_hwc(hwc)
        return Image.fromarray(np.ascontiguousarray(hwc))

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), int(self.labels[self.index[i]])


class FileImages(Dataset):
    """Image files and their labels, opened one at a time."""

    def __init__(self, files: Sequence[str], labels, transform: Callable | None = None):
        self.files, self.labels, self.transform = list(files), np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.files)

    def image(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return img.convert("RGB")

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def class_dirs(folder: Path) -> list[str]:
    """Class folder names, sorted (torchvision ImageFolder's order)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan(folder: Path, classes: dict[str, int], key: str) -> tuple[list[str], np.ndarray]:
    """Image files under folder/<class>/ (any depth), labelled classes[class]; sorted, so the order is fixed."""
    files, labels = [], []
    for name in class_dirs(folder):
        if name not in classes:
            continue
        found = []
        for dirpath, _, names in os.walk(folder / name, followlinks=True):
            found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        found.sort()
        files += found
        labels += [classes[name]] * len(found)
    if not files:
        raise ThawlabError(f"{key}={folder}: no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return files, np.asarray(labels, dtype=np.int64)


def map_classes(folder: Path, classes: dict[str, int], key: str, train: Path) -> dict[str, int]:
    """The class folders of an evaluation set, mapped by name to the training classes; others are an error."""
    names = class_dirs(folder)
    unknown = [n for n in names if n not in classes]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ThawlabError(f"{key}={folder}: class folders not among the training classes (from {train}): {shown}")
    if not names:
        raise ThawlabError(f"{key}={folder}: no class folders (expected <class name>/<image files>)")
    return {n: classes[n] for n in names}


def split_per_class(labels: np.ndarray, seed: int, val_per_class: int | None = None,
                    val_fraction: float | None = None, train_per_class: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out validation indices), stratified by class, from a seeded shuffle (numpy's,
    seeded by `seed` alone: the split does not move with the run's seed).

    Per class: val_per_class images, or val_fraction of them (rounded; at least 1 where a class has 2 or
    more), go to validation; of the rest, at most train_per_class (None: all) to training."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    tr, va = [], []
    for idx in np.split(order, bounds):
        if len(idx) == 0:
            continue
        idx = idx[rng.permutation(len(idx))]
        if val_per_class is not None:
            n_val, key, val = val_per_class, "data.val_per_class", val_per_class
        else:
            n_val = max(1, round(val_fraction * len(idx))) if len(idx) > 1 and val_fraction > 0 else 0
            key, val = "data.val_fraction", val_fraction
        if n_val >= len(idx):
            raise ThawlabError(f"{key}={val}: class {int(labels[idx[0]])} has {len(idx)} training images, "
                               f"too few to hold out {n_val} for validation and train on the rest")
        rest = idx[n_val:]
        if train_per_class is not None:
            rest = rest[:train_per_class]
        va.append(idx[:n_val])
        tr.append(rest)
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


class RealImageSets(ImageSets):
    """An on-disk data set: `setup` builds every set once (train, val and test stages: the module names its
    metrics after the test sets before fitting), each decoding its images lazily.

    The constructor only stores its arguments; `check()` validates them and reads what is cheap (folder names,
    which files exist): it runs on the first use of `num_classes` (right after the data module is built,
    before the model) or of `prepare_data`/`setup`, so a bad value is a ThawlabError raised outside Hydra's
    instantiate, which would wrap it into an InstantiationException."""

    default_augment = "resized_crop"
    recipe = aug.NATURAL  # what keeps a label (thawlab.data.augment): flips, the base crop of randaug and augmix

    def __init__(self, augment: str | None = None, crop_pct: float = 0.875, ood_val_fraction: float = 0.0,
                 **loader_kwargs):
        super().__init__(**loader_kwargs)
        self.ood_val_fraction = ood_val_fraction  # held out of each OOD test set for validation (data/ood_val.py)
        self.preprocess = Preprocess()  # replaced by the model's expectation before setup
        self.augment = self.default_augment if augment in (None, "default") else augment
        self.crop_pct = crop_pct
        # random augmentation: a sample's input changes every epoch, so no feature cache
        self.train_transform_deterministic = self.augment == "none"
        self._num_classes: int | None = None
        self._checked = False

    @property
    def num_classes(self) -> int:
        self.check()
        return self._num_classes

    def check(self) -> "RealImageSets":
        """Validate the options and the files (once); sets num_classes and class_subsets."""
        if not self._checked:
            aug.check(self.augment)
            if not 0 < self.crop_pct <= 1:
                raise ThawlabError(f"data.crop_pct={self.crop_pct}: outside (0, 1]")
            if not 0 <= self.ood_val_fraction < 1:
                raise ThawlabError(f"data.ood_val_fraction={self.ood_val_fraction}: outside [0, 1)")
            self._check()
            self._checked = True
        return self

    def _check(self) -> None:
        raise NotImplementedError

    def prepare_data(self):
        self.check()

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        self.prepare_data()
        self.build(train_transform(self.preprocess, self.augment, self.crop_pct, self.recipe),
                   eval_transform(self.preprocess, self.crop_pct))
        hold_out(self.sets, self.ood_val_fraction, getattr(self, "split_seed", 0))

    def build(self, train_tf: Callable, eval_tf: Callable) -> None:
        """Fill train_set, sets["val"] (id) and sets["test"] (id, then ood/<name>...)."""
        raise NotImplementedError


def long_tensor(values) -> torch.Tensor:
    return torch.as_tensor(sorted(set(int(v) for v in values)), dtype=torch.long)
