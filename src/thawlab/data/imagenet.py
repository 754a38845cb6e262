"""ImageNet (`data=imagenet`) with the OOD test sets ImageNet-V2, -R, -Sketch and -A, from prepared folders.

None of them can be downloaded automatically (ImageNet needs an account); the error for a missing folder says
where each comes from. Layouts, under data.root unless data.paths.<set> is absolute:
- train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the usual prepared layout: the validation images sorted into
  class folders). Class index = position of the wnid among the sorted training wnids.
- imagenetv2-matched-frequency-format-val/<index>/*.jpeg: ImageNet-V2 folders are named by class index
  0..999 (in the sorted-wnid order of the 1000 classes), not by wnid.
- imagenet-r/<wnid>/ and imagenet-a/<wnid>/: 200 classes each. Their logits are restricted to those 200
  classes (every other class gets probability 0), as their authors evaluate: `class_subsets`.
- sketch/<wnid>/: ImageNet-Sketch, all 1000 classes.

Splits: ID test = the official val folder; validation = data.val_per_class images per class held out from
train (seeded by data.split_seed). Labels always stay in the training classes' index space.
"""
from __future__ import annotations

from pathlib import Path

from thawlab.data.real import FileImages, RealImageSets, Source, check_choices, check_root, class_dirs
from thawlab.data.real import default_root, long_tensor, map_classes, missing_root, resolve, scan, split_per_class
from thawlab.errors import ThawlabError

OOD_SETS = ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a")
SUBSET_SETS = ("imagenet_r", "imagenet_a")  # 200-class sets: logits restricted to their classes
DEFAULT_PATHS = {"train": "train", "val": "val", "imagenet_v2": "imagenetv2-matched-frequency-format-val",
                 "imagenet_r": "imagenet-r", "imagenet_sketch": "sketch", "imagenet_a": "imagenet-a"}
_IMAGENET = Source("ImageNet (ILSVRC-2012)", "Russakovsky et al. 2015, https://image-net.org/download.php after "
                   "registering; sort val into <wnid> folders, e.g. with valprep.sh of "
                   "https://github.com/soumith/imagenetloader.torch",
                   "data.root (or data.paths.train and data.paths.val)")
SOURCES = {
    "train": _IMAGENET,
    "val": _IMAGENET,
    "imagenet_v2": Source("ImageNet-V2 matched-frequency", "Recht et al. 2019, https://huggingface.co/datasets/"
                          "vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
                          "data.paths.imagenet_v2"),
    "imagenet_r": Source("ImageNet-R", "Hendrycks et al. 2021, https://people.eecs.berkeley.edu/~hendrycks/"
                         "imagenet-r.tar", "data.paths.imagenet_r"),
    "imagenet_sketch": Source("ImageNet-Sketch", "Wang et al. 2019, https://github.com/HaohanWang/ImageNet-Sketch "
                              "(ImageNet-Sketch.zip, extracts to sketch/)", "data.paths.imagenet_sketch"),
    "imagenet_a": Source("ImageNet-A", "Hendrycks et al. 2021, https://people.eecs.berkeley.edu/~hendrycks/"
                         "imagenet-a.tar", "data.paths.imagenet_a"),
}


class ImageNet(RealImageSets):
    """ImageNet with V2, R, Sketch and A test sets (see the module docstring)."""

    def __init__(self, root: str | None = None, paths: dict | None = None, ood=OOD_SETS, val_per_class: int = 10,
                 train_per_class: int | None = None, split_seed: int = 0, augment: str | None = None,
                 crop_pct: float = 0.875, **loader_kwargs):
        super().__init__(augment=augment, crop_pct=crop_pct, **loader_kwargs)
        self.root_arg, self.paths, self.ood = root, dict(paths or {}), tuple(ood)
        self.val_per_class, self.train_per_class, self.split_seed = val_per_class, train_per_class, split_seed

    def _check(self):
        check_choices("data.ood", self.ood, OOD_SETS, "OOD set", " for data=imagenet")
        check_choices("data.paths", list(self.paths), list(DEFAULT_PATHS), "set")
        self.root = check_root(self.root_arg or str(Path(default_root()) / "imagenet"), missing_ok=True)
        self.dirs = {k: resolve(self.root, self.paths.get(k) or v) for k, v in DEFAULT_PATHS.items()}
        missing: dict[Source, list[Path]] = {}  # train and val share a source: one message
        for k in ("train", "val", *self.ood):
            if not self.dirs[k].is_dir():
                missing.setdefault(SOURCES[k], []).append(self.dirs[k])
        if missing:
            raise ThawlabError(missing_root(self.root) + "; ".join(str(source.missing(folders))
                                                                for source, folders in missing.items()))
        # everything below reads folder names only: cheap, and wrong folders fail before the model is built
        self.wnids = class_dirs(self.dirs["train"])
        if not self.wnids:
            raise ThawlabError(f"data.paths.train={self.dirs['train']}: no class folders (expected <wnid>/<images>)")
        self.classes = {w: i for i, w in enumerate(self.wnids)}
        self._num_classes = len(self.wnids)
        self.maps = {"val": map_classes(self.dirs["val"], self.classes, "data.paths.val", self.dirs["train"])}
        for name in self.ood:
            key = f"data.paths.{name}"
            if name == "imagenet_v2":
                self.maps[name] = self._index_folders(self.dirs[name], key)
            else:
                self.maps[name] = map_classes(self.dirs[name], self.classes, key, self.dirs["train"])
            if name in SUBSET_SETS:
                self.class_subsets[f"ood/{name}"] = long_tensor(self.maps[name].values())

    def _index_folders(self, folder: Path, key: str) -> dict[str, int]:
        """ImageNet-V2: folders named by class index 0..num_classes-1."""
        names = class_dirs(folder)
        bad = [n for n in names if not n.isdigit() or int(n) >= self._num_classes]
        if bad or not names:
            raise ThawlabError(f"{key}={folder}: ImageNet-V2 class folders are class indices 0..{self._num_classes - 1}"
                               f"; found {', '.join(bad[:10]) or 'none'}")
        return {n: int(n) for n in names}

    def build(self, train_tf, eval_tf):
        files, labels = scan(self.dirs["train"], self.classes, "data.paths.train")
        tr, va = split_per_class(labels, self.split_seed, val_per_class=self.val_per_class,
                                 train_per_class=self.train_per_class)
        self.train_set = FileImages([files[i] for i in tr], labels[tr], train_tf)
        self.sets["val"] = {"id": FileImages([files[i] for i in va], labels[va], eval_tf)}
        test = {"id": FileImages(*scan(self.dirs["val"], self.maps["val"], "data.paths.val"), eval_tf)}
        for name in self.ood:
            test[f"ood/{name}"] = FileImages(*scan(self.dirs[name], self.maps[name], f"data.paths.{name}"), eval_tf)
        self.sets["test"] = test
