"""CIFAR-10 (`data=cifar10`) and its OOD test sets CIFAR-10.1, CIFAR-10-C and STL-10, read from the official
files (torchvision's own classes check md5 sums and would reject other copies; they are used to download only).

Layouts, under data.root unless data.paths.<set> is absolute:
- cifar-10-batches-py/: data_batch_1..5, test_batch: pickles with b'data' (N x 3072 uint8: the red, green and
  blue 32x32 planes, each row-major) and b'labels';
- CIFAR-10.1/: cifar10.1_v6_data.npy (N x 32 x 32 x 3 uint8) and cifar10.1_v6_labels.npy (2,000 images);
- CIFAR-10-C/: <corruption>.npy (5 x 10,000 x 32 x 32 x 3 uint8: severity 1 first) and labels.npy;
- stl10_binary/: test_X.bin (uint8, each image 3 x 96 x 96, every channel stored column by column),
  test_y.bin (labels 1..10), class_names.txt. Its 9 classes shared with CIFAR-10 are kept, relabelled to
  CIFAR-10's indices (car -> automobile; monkey dropped; CIFAR's frog has no STL counterpart).

Splits: ID test = the official test_batch; validation = data.val_per_class images per class held out from the
training batches (seeded by data.split_seed), so model selection never sees a test image. OOD sets are test
sets only: test/ood/cifar10_1, test/ood/stl10, test/ood/cifar10_c_<corruption>_s<severity>.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from thawlab.data.augment import Recipe
from thawlab.data.real import ArrayImages, RealImageSets, Source, check_choices, check_root, check_severities
from thawlab.data.real import default_root, missing_files, missing_root, resolve, split_per_class
from thawlab.errors import ThawlabError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")  # the 15 of the benchmark
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the 4 held-out ones, also shipped
OOD_SETS = ("cifar10_1", "stl10", "cifar10_c")
STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
STL_RENAME = {"car": "automobile"}

DEFAULT_PATHS = {"cifar10": "cifar-10-batches-py", "cifar10_1": "CIFAR-10.1", "cifar10_c": "CIFAR-10-C",
                 "stl10": "stl10_binary"}
SOURCES = {
    "cifar10": Source("CIFAR-10", "Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "data.paths.cifar10", download=True),
    "cifar10_1": Source("CIFAR-10.1 v6", "Recht et al. 2018, https://github.com/modestyachts/CIFAR-10.1/tree/master/"
                        "datasets", "data.paths.cifar10_1", download=True),
    "cifar10_c": Source("CIFAR-10-C", "Hendrycks and Dietterich 2019, "
                        "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar", "data.paths.cifar10_c",
                        download=True),
    "stl10": Source("STL-10", "Coates et al. 2011, http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                    "data.paths.stl10", download=True),
}
CIFAR10_1_URL = "https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/"
# set -> what data.download=true fetches: (url, archive name or None for a plain file, md5, folder in archive)
DOWNLOADS = {
    "cifar10": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py")],
    "cifar10_1": [(CIFAR10_1_URL + f, None, None, None)
                  for f in ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")],
    "cifar10_c": [("https://zenodo.org/records/2535967/files/CIFAR-10-C.tar", "CIFAR-10-C.tar", None,
                   "CIFAR-10-C")],
    "stl10": [("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz",
               "91f7769df0f17e558f3565bffb0c7dfb", "stl10_binary")],
}


def chw_to_hwc(a: np.ndarray) -> np.ndarray:
    """A CIFAR row (3072 bytes: R, G, B planes, each row-major) -> 32 x 32 x 3."""
    return a.reshape(3, 32, 32).transpose(1, 2, 0)


def stl_to_hwc(a: np.ndarray) -> np.ndarray:
    """An STL-10 image (27,648 bytes: each channel column-major, i.e. stored as C x W x H) -> 96 x 96 x 3."""
    return a.reshape(3, 96, 96).transpose(2, 1, 0)


def read_cifar_batches(folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3072 uint8, official row layout) and labels of the given pickled batches."""
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d.get(b"data", d.get("data")), dtype=np.uint8)
        y = d.get(b"labels", d.get("labels"))
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise ThawlabError(f"CIFAR-10: {folder / name} is not a CIFAR-10 python batch "
                               f"(data {x.shape}, {len(y)} labels; expected N x 3072 and N labels)")
        xs.append(x)
        ys.append(np.asarray(y, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def read_stl10_test(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """test_X.bin memory-mapped as N x 27,648 uint8, labels 0..9 (from the file's 1..10), class names."""
    x = np.memmap(folder / "test_X.bin", dtype=np.uint8, mode="r")
    y = np.fromfile(folder / "test_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if x.size != len(y) * 3 * 96 * 96:
        raise ThawlabError(f"STL-10: {folder / 'test_X.bin'} holds {x.size} bytes, not {len(y)} images of "
                           f"3 x 96 x 96 (one per label in test_y.bin)")
    names_file = folder / "class_names.txt"
    names = (tuple(n.strip() for n in names_file.read_text().splitlines() if n.strip()) if names_file.exists()
             else STL_CLASSES)
    return x.reshape(len(y), 3 * 96 * 96), y, names


def stl_to_cifar(names: tuple[str, ...]) -> np.ndarray:
    """STL label (0-based) -> CIFAR-10 label, or -1 where CIFAR-10 has no such class (monkey)."""
    return np.array([CLASSES.index(STL_RENAME.get(n, n)) if STL_RENAME.get(n, n) in CLASSES else -1
                     for n in names], dtype=np.int64)


class Cifar10(RealImageSets):
    """CIFAR-10 with CIFAR-10.1, STL-10 and CIFAR-10-C test sets (see the module docstring)."""

    default_augment = "crop_flip"
    recipe = Recipe(base="crop_flip")  # 32x32: randaug and augmix after the CIFAR pad-and-crop, not a resized crop

    def __init__(self, root: str | None = None, paths: dict | None = None, download: bool = False,
                 val_per_class: int = 500, train_per_class: int | None = None, split_seed: int = 0,
                 ood=OOD_SETS, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5), augment: str | None = None,
                 crop_pct: float = 1.0, **loader_kwargs):
        super().__init__(augment=augment, crop_pct=crop_pct, **loader_kwargs)
        self.root_arg, self.paths, self.download = root, dict(paths or {}), download
        self.ood, self.corruptions, self.severities = tuple(ood), tuple(corruptions), tuple(severities)
        self.val_per_class, self.train_per_class, self.split_seed = val_per_class, train_per_class, split_seed

    def _check(self):
        check_choices("data.ood", self.ood, OOD_SETS, "OOD set", " for data=cifar10")
        check_choices("data.corruptions", self.corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS, "corruption")
        check_severities(self.severities)
        check_choices("data.paths", list(self.paths), list(DEFAULT_PATHS), "set")
        self.root = check_root(self.root_arg or default_root(), create=self.download, missing_ok=True)
        self.dirs = {k: resolve(self.root, self.paths.get(k) or v) for k, v in DEFAULT_PATHS.items()}
        self._num_classes = len(CLASSES)
        if not self.download:
            self.check_files()

    def needed(self) -> dict[str, list[str]]:
        """set -> the files it needs (relative to its folder)."""
        out = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
        if "cifar10_1" in self.ood:
            out["cifar10_1"] = ["cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"]
        if "stl10" in self.ood:
            out["stl10"] = ["test_X.bin", "test_y.bin"]
        if "cifar10_c" in self.ood:
            out["cifar10_c"] = [f"{c}.npy" for c in self.corruptions] + ["labels.npy"]
        return out

    def missing(self) -> dict[str, list[str]]:
        return {k: m for k, files in self.needed().items() if (m := missing_files(self.dirs[k], files))}

    def check_files(self, reason: str = "") -> None:
        missing = self.missing()
        if missing:
            raise ThawlabError(missing_root(self.root) + "; ".join(str(SOURCES[k].missing(self.dirs[k], m, reason))
                                                                for k, m in missing.items()))

    def prepare_data(self):
        """data.download=true: fetch the sets whose files are missing (torchvision's downloader)."""
        self.check()
        if not self.download:
            return
        for name in self.missing():
            try:
                fetch(name, self.dirs[name])
            except Exception as e:  # noqa: BLE001 (no network, a moved URL, a bad checksum: the user's to fix)
                reason = f" (data.download=true failed: {type(e).__name__}: {' '.join(str(e).split())[:200]})"
                raise SOURCES[name].missing(self.dirs[name], self.missing()[name], reason) from e
        self.check_files(" (not in the downloaded files)")

    def build(self, train_tf, eval_tf):
        d = self.dirs
        x, y = read_cifar_batches(d["cifar10"], [f"data_batch_{i}" for i in range(1, 6)])
        tr, va = split_per_class(y, self.split_seed, val_per_class=self.val_per_class,
                                 train_per_class=self.train_per_class)
        self.train_set = ArrayImages(x, y, train_tf, tr, chw_to_hwc)
        self.sets["val"] = {"id": ArrayImages(x, y, eval_tf, va, chw_to_hwc)}
        xt, yt = read_cifar_batches(d["cifar10"], ["test_batch"])
        test = {"id": ArrayImages(xt, yt, eval_tf, to_hwc=chw_to_hwc)}
        for name in self.ood:
            if name == "cifar10_1":
                x1 = np.load(d[name] / "cifar10.1_v6_data.npy", mmap_mode="r")
                y1 = np.load(d[name] / "cifar10.1_v6_labels.npy")
                _check_hwc(x1, len(y1), d[name] / "cifar10.1_v6_data.npy", "CIFAR-10.1")
                test["ood/cifar10_1"] = ArrayImages(x1, y1, eval_tf)
            elif name == "stl10":
                xs, ys, names = read_stl10_test(d[name])
                mapped = stl_to_cifar(names)[ys]
                keep = np.flatnonzero(mapped >= 0)
                test["ood/stl10"] = ArrayImages(xs, mapped, eval_tf, keep, stl_to_hwc)
            elif name == "cifar10_c":
                labels = np.load(d[name] / "labels.npy")
                if len(labels) % 5:
                    raise ThawlabError(f"CIFAR-10-C: {d[name] / 'labels.npy'} has {len(labels)} labels, not 5 "
                                       f"severities x N")
                n = len(labels) // 5
                for c in self.corruptions:
                    xc = np.load(d[name] / f"{c}.npy", mmap_mode="r")
                    _check_hwc(xc, len(labels), d[name] / f"{c}.npy", "CIFAR-10-C")
                    for s in self.severities:
                        test[f"ood/cifar10_c_{c}_s{s}"] = ArrayImages(xc, labels, eval_tf,
                                                                      np.arange((s - 1) * n, s * n))
        self.sets["test"] = test


def _check_hwc(x: np.ndarray, n: int, path: Path, name: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != n:
        raise ThawlabError(f"{name}: {path} holds {x.dtype} {tuple(x.shape)}, expected ({n}, 32, 32, 3) uint8 "
                           f"(one image per label)")


def fetch(name: str, folder: Path) -> None:
    """Download set `name` into `folder` with torchvision's downloader (archives are extracted beside it and
    their top folder renamed to `folder` if the names differ)."""
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    for url, archive, md5, top in DOWNLOADS[name]:
        if archive is None:
            download_url(url, str(folder), md5=md5)
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, str(folder.parent), filename=archive, md5=md5, remove_finished=True)
        extracted = folder.parent / top
        if extracted != folder and extracted.is_dir() and not folder.exists():
            extracted.rename(folder)


class Cifar10C(Cifar10):
    """`data=cifar10c`: one CIFAR-10-C corruption at one severity as the TARGET task (surgical fine-tuning's
    input-level shift, Lee et al. 2023: a model trained on clean CIFAR-10 adapted with a few corrupted labels).

    The 10,000 images of (data.corruption, data.severity) are split per class, seeded by data.split_seed alone:
    val_per_class for model selection, then train_per_class for training, then test_per_class (null: all the
    rest) as the ID test set. data.ood=[cifar10] adds the clean CIFAR-10 test set as test/ood/cifar10: what
    adapting to the corruption costs on the source distribution (the same underlying images: CIFAR-10-C was
    made from CIFAR-10's test set)."""

    default_augment = "none"
    TARGET_OOD = ("cifar10",)

    def __init__(self, root: str | None = None, corruption: str = "gaussian_noise", severity: int = 5,
                 train_per_class: int = 100, val_per_class: int = 10, test_per_class: int | None = None,
                 ood=("cifar10",), **kwargs):
        super().__init__(root, val_per_class=val_per_class, train_per_class=train_per_class, ood=(),
                         corruptions=(corruption,), severities=(severity,), **kwargs)
        self.corruption, self.severity, self.test_per_class = corruption, severity, test_per_class
        self.target_ood = tuple(ood)

    def _check(self):
        check_choices("data.ood", self.target_ood, self.TARGET_OOD, "OOD set", " for data=cifar10c")
        check_choices("data.corruption", [self.corruption], CORRUPTIONS + EXTRA_CORRUPTIONS, "corruption")
        check_severities([self.severity])
        for key, value in (("data.train_per_class", self.train_per_class), ("data.val_per_class", self.val_per_class),
                           ("data.test_per_class", self.test_per_class)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ThawlabError(f"{key}={value!r} must be a positive number of images per class")
        super()._check()

    def needed(self) -> dict[str, list[str]]:
        out = {"cifar10_c": [f"{self.corruption}.npy", "labels.npy"]}
        if "cifar10" in self.target_ood:
            out["cifar10"] = ["test_batch"]
        return out

    def build(self, train_tf, eval_tf):
        folder = self.dirs["cifar10_c"]
        labels = np.load(folder / "labels.npy")
        if len(labels) % 5:
            raise ThawlabError(f"CIFAR-10-C: {folder / 'labels.npy'} has {len(labels)} labels, not 5 severities x N")
        n = len(labels) // 5
        x = np.load(folder / f"{self.corruption}.npy", mmap_mode="r")
        _check_hwc(x, len(labels), folder / f"{self.corruption}.npy", "CIFAR-10-C")
        first = (self.severity - 1) * n
        y = labels[first:first + n]
        tr, va = split_per_class(y, self.split_seed, val_per_class=self.val_per_class)  # tr: all but val
        rng = np.random.default_rng(self.split_seed + 1)  # order within each class, apart from the val draw
        train, test = [], []
        for c in np.unique(y[tr]):
            idx = tr[y[tr] == c]
            idx = idx[rng.permutation(len(idx))]
            if len(idx) <= self.train_per_class:
                raise ThawlabError(f"data.train_per_class={self.train_per_class}: class {int(c)} has {len(idx)} "
                                   f"images after validation, too few to leave any for the test set")
            train.append(idx[:self.train_per_class])
            rest = idx[self.train_per_class:]
            test.append(rest if self.test_per_class is None else rest[:self.test_per_class])
        train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
        self.train_set = ArrayImages(x, labels, train_tf, first + train)
        self.sets["val"] = {"id": ArrayImages(x, labels, eval_tf, first + va)}
        self.sets["test"] = {"id": ArrayImages(x, labels, eval_tf, first + test)}
        if "cifar10" in self.target_ood:
            xt, yt = read_cifar_batches(self.dirs["cifar10"], ["test_batch"])
            self.sets["test"]["ood/cifar10"] = ArrayImages(xt, yt, eval_tf, to_hwc=chw_to_hwc)
