"""Your own images (`data=imagefolder`): train/ val/ test/ folders in torchvision's ImageFolder layout
(<split>/<class name>/<image files>) and any number of named OOD folders in the same layout.

- Classes are the sorted class folders of train/; val/, test/ and every OOD folder are mapped to them BY NAME.
  A folder holding a class that train/ lacks is an error naming the folder and the classes; holding only some
  of the training classes is fine (labels by name; the logits are not restricted).
- val/ is optional: without it, data.val_fraction of each training class is held out (seeded by
  data.split_seed). test/ is required: it is the ID test set.
- data.ood = {name: path}: each becomes the test set ood/<name> (paths relative to data.root or absolute).
"""
from __future__ import annotations

from thawlab.data.real import FileImages, RealImageSets, check_choices, check_root, class_dirs, map_classes
from thawlab.data.real import resolve, scan, split_per_class
from thawlab.errors import ThawlabError

DEFAULT_PATHS = {"train": "train", "val": "val", "test": "test"}


class ImageFolders(RealImageSets):
    """train/val/test folders plus named OOD folders (see the module docstring)."""

    def __init__(self, root: str | None = None, paths: dict | None = None, ood: dict | None = None,
                 val_fraction: float = 0.1, train_per_class: int | None = None, split_seed: int = 0, augment: str | None = None,
                 crop_pct: float = 0.875, **loader_kwargs):
        super().__init__(augment=augment, crop_pct=crop_pct, **loader_kwargs)
        self.root_arg, self.paths, self.ood_arg = root, {**DEFAULT_PATHS, **(paths or {})}, ood
        self.val_fraction, self.train_per_class, self.split_seed = val_fraction, train_per_class, split_seed

    def _check(self):
        ood, val_fraction, paths = self.ood_arg, self.val_fraction, self.paths
        check_choices("data.paths", list(paths), list(DEFAULT_PATHS), "split")
        self.root = check_root(self.root_arg, hint="<the folder holding train/ (val/) test/>")
        self.dirs = {k: resolve(self.root, v) if v else None for k, v in paths.items()}
        for k in ("train", "test"):
            if not self.dirs[k].is_dir():
                raise ThawlabError(f"data.paths.{k}={self.dirs[k]}: no such directory (data=imagefolder needs "
                                   f"train/ and test/ class folders under data.root)")
        if self.dirs["val"] is not None and not self.dirs["val"].is_dir():
            if paths["val"] != DEFAULT_PATHS["val"]:  # a folder the user named must exist; the default may not
                raise ThawlabError(f"data.paths.val={self.dirs['val']}: no such directory "
                                   f"(data.paths.val=null holds validation images out of train/)")
            self.dirs["val"] = None
        if not 0 < val_fraction < 1:
            raise ThawlabError(f"data.val_fraction={val_fraction}: outside (0, 1)")
        if ood is not None and not isinstance(ood, dict):
            raise ThawlabError(f"data.ood={ood!r}: expected {{name: folder, ...}}, "
                               f"e.g. data.ood={{sketch:/data/sketch}}")
        self.ood = {}
        for name, path in (ood or {}).items():
            if not name or "/" in name or name == "mean":
                raise ThawlabError(f"data.ood.{name}: an OOD set name must be non-empty, without '/', and not "
                                   f"'mean' (metrics are test/ood/<name>/<metric>; ood/mean is the average)")
            folder = resolve(self.root, path)
            if not folder.is_dir():
                raise ThawlabError(f"data.ood.{name}={folder}: no such directory")
            self.ood[name] = folder
        self.classes = {c: i for i, c in enumerate(class_dirs(self.dirs["train"]))}
        if not self.classes:
            raise ThawlabError(f"data.paths.train={self.dirs['train']}: no class folders (expected <class>/<images>)")
        self._num_classes = len(self.classes)
        train = self.dirs["train"]
        self.maps = {k: map_classes(self.dirs[k], self.classes, f"data.paths.{k}", train)
                     for k in ("val", "test") if self.dirs[k] is not None}
        for n, folder in self.ood.items():
            self.maps[f"ood/{n}"] = map_classes(folder, self.classes, f"data.ood.{n}", train)

    def build(self, train_tf, eval_tf):
        files, labels = scan(self.dirs["train"], self.classes, "data.paths.train")
        if self.dirs["val"] is None:
            tr, va = split_per_class(labels, self.split_seed, val_fraction=self.val_fraction,
                                     train_per_class=self.train_per_class)
            val = FileImages([files[i] for i in va], labels[va], eval_tf)
        else:
            tr, _ = split_per_class(labels, self.split_seed, val_per_class=0, train_per_class=self.train_per_class)
            val = FileImages(*scan(self.dirs["val"], self.maps["val"], "data.paths.val"), eval_tf)
        self.train_set = FileImages([files[i] for i in tr], labels[tr], train_tf)
        self.sets["val"] = {"id": val}
        test = {"id": FileImages(*scan(self.dirs["test"], self.maps["test"], "data.paths.test"), eval_tf)}
        for name, folder in self.ood.items():
            test[f"ood/{name}"] = FileImages(*scan(folder, self.maps[f"ood/{name}"], f"data.ood.{name}"), eval_tf)
        self.sets["test"] = test
