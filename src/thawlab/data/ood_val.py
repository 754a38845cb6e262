"""OOD validation sets for on-disk data (`data.ood_val_fraction`), which the oracle selection rule needs
(selection.rules=[oracle]; thawlab/selection.py). The OOD sets of CIFAR-10, ImageNet and image folders are test
sets only (CIFAR-10.1, STL-10, CIFAR-10-C, ImageNet-V2/R/Sketch/A have no validation split of their own), so
a fraction of each is held out: per class, a seeded shuffle (data.split_seed and the set's name; the same for
every run and strategy) sends round(fraction x its images) to the validation set of the same name, at least one
image left in the test set; the test set keeps the rest. Validation and test parts are disjoint, so a number
chosen on one is never reported on the same images; the test set is then smaller than the published one (say
so when comparing with a paper). The embedded benchmark builds its OOD validation sets itself (other renders,
the corruptions of the ID validation images), so it needs no hold-out.
"""
from __future__ import annotations

import zlib

import numpy as np
from torch.utils.data import Dataset, Subset

from thawlab.errors import ThawlabError


def labels_of(dataset: Dataset) -> np.ndarray:
    """The labels of an ArrayImages (its indexed subset) or FileImages, in dataset order."""
    labels = np.asarray(dataset.labels)
    index = getattr(dataset, "index", None)
    return labels[np.asarray(index)] if index is not None else labels


def split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, validation indices), stratified by class: round(fraction x n) of a class's n images to
    validation, never all of them."""
    rng = np.random.default_rng(seed)
    test, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(int(round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        test.append(idx[n_val:])
    return np.sort(np.concatenate(test)), np.sort(np.concatenate(val))


def hold_out(sets: dict[str, dict[str, Dataset]], fraction: float, seed: int) -> None:
    """In place: each test set `ood/<name>` gives `fraction` of its images (per class) to a val set of that name."""
    if not fraction:
        return
    for name, dataset in list(sets["test"].items()):
        if not name.startswith("ood/"):
            continue
        test, val = split(labels_of(dataset), fraction, seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(val) == 0:
            raise ThawlabError(f"data.ood_val_fraction={fraction} holds out no image of {name} ({len(test)} images, "
                               f"at most one per class): a larger fraction or a larger set")
        sets["val"][name] = Subset(dataset, val.tolist())
        sets["test"][name] = Subset(dataset, test.tolist())
