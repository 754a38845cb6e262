"""The real data sets (data=cifar10, imagenet, imagefolder) on tiny fake copies in the official formats:
the readers decode images the right way round, labels are remapped as documented, each data set runs end to
end with its OOD sets, and bad input is one line, exit 2."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import add_callbacks, cli
from thawlab.data import cifar
from thawlab.data.cifar import CLASSES, Cifar10, Cifar10C
from thawlab.data.digits import Preprocess
from thawlab.data.folders import ImageFolders
from thawlab.data.imagenet import ImageNet
from thawlab.errors import ThawlabError

# a fast, deterministic run: random init, 32x32 inputs, one epoch, everything evaluated
FAST = ["backbone.pretrained=false", "data.img_size=32", "trainer.max_epochs=1", "logger=none",
        "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=16"]
MARK = (1, 2)  # (row, column) of the marker pixel: (label * 25, 200, 7), asymmetric in rows, columns, channels


def image(label: int, key: int, h: int = 32, w: int = 32, extra: int = 0) -> np.ndarray:
    """A random h x w x 3 uint8 image with the marker pixel, and pixel (0, 0) red = extra."""
    img = np.random.default_rng(1000 * label + key).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[MARK] = (label * 25, 200, 7)
    img[0, 0, 0] = extra
    return img


def marker(pil: Image.Image) -> tuple[int, int, int]:
    """The marker as PIL reads it: getpixel takes (x, y) = (column, row)."""
    return pil.getpixel((MARK[1], MARK[0]))


# ---- fake copies in the official formats ---------------------------------------------------------------
def cifar_row(img: np.ndarray) -> np.ndarray:
    """The CIFAR-10 python format: 1024 red values, then green, then blue, each plane row by row."""
    return np.concatenate([img[:, :, c].reshape(-1) for c in range(3)])


def stl_bytes(img: np.ndarray) -> bytes:
    """The STL-10 binary format: each channel in column-major order (Fortran order)."""
    return b"".join(img[:, :, c].flatten(order="F").tobytes() for c in range(3))


def make_cifar(root: Path, corruptions=("gaussian_noise", "fog")) -> dict[str, int]:
    """5 training batches of 10 (one per class), a test batch of 20, CIFAR-10.1 (20), CIFAR-10-C (the given
    corruptions, 5 severities x 20; red of pixel (0, 0) = severity) and STL-10 (2 images per STL class)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(1, 6):
        rows = [cifar_row(image(c, b)) for c in range(10)]
        with open(d / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": np.stack(rows), b"labels": list(range(10)), b"batch_label": b"fake"}, f)
    test_labels = [c for c in range(10) for _ in range(2)]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.stack([cifar_row(image(c, 100 + k)) for k, c in enumerate(test_labels)]),
                     b"labels": test_labels}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    c1 = root / "CIFAR-10.1"
    c1.mkdir()
    np.save(c1 / "cifar10.1_v6_data.npy", np.stack([image(c, 200 + k) for k, c in enumerate(test_labels)]))
    np.save(c1 / "cifar10.1_v6_labels.npy", np.array(test_labels, dtype=np.int64))
    cc = root / "CIFAR-10-C"
    cc.mkdir()
    np.save(cc / "labels.npy", np.array(test_labels * 5, dtype=np.uint8))
    for name in corruptions:
        np.save(cc / f"{name}.npy", np.stack([image(c, 300 + k, extra=s) for s in range(1, 6)
                                              for k, c in enumerate(test_labels)]))
    stl = root / "stl10_binary"
    stl.mkdir()
    stl_labels = [c for c in range(10) for _ in range(2)]  # 0-based STL classes; the file holds 1..10
    (stl / "test_X.bin").write_bytes(b"".join(stl_bytes(image(c, 400 + k, 96, 96)) for k, c in enumerate(stl_labels)))
    (stl / "test_y.bin").write_bytes(bytes(c + 1 for c in stl_labels))
    (stl / "class_names.txt").write_text("\n".join(cifar.STL_CLASSES) + "\n")
    return {"train": 50, "test": 20, "cifar10_1": 20, "cifar10_c": 20, "stl10": 18}


def write_images(folder: Path, classes: dict[str, int], per_class: int, fmt: str = "png", key: int = 0) -> int:
    """folder/<class>/<k>.<fmt>: 40x48 images of one colour, (label * 25, 200, 7): JPEG keeps it within a few
    levels, so the label can be read back from any pixel."""
    for name, label in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.new("RGB", (48, 40), (label * 25, 200, 7)).save(folder / name / f"{key + k}.{fmt}")
    return len(classes) * per_class


def label_of(pil: Image.Image) -> int:
    return round(pil.getpixel((MARK[1], MARK[0]))[0] / 25)


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def make_imagenet(root: Path) -> dict[str, int]:
    classes = {w: i for i, w in enumerate(WNIDS)}
    sizes = {"train": write_images(root / "train", classes, 4, "JPEG"),
             "id": write_images(root / "val", classes, 2, "JPEG", key=10),
             # V2: folders named by class index; the marker still encodes the label
             "imagenet_v2": write_images(root / "imagenetv2-matched-frequency-format-val",
                                         {str(i): i for i in range(4)}, 1, "jpeg", key=20),
             "imagenet_r": write_images(root / "imagenet-r", {WNIDS[1]: 1, WNIDS[3]: 3}, 2, key=30),
             "imagenet_sketch": write_images(root / "sketch", classes, 1, key=40),
             "imagenet_a": write_images(root / "imagenet-a", {WNIDS[0]: 0, WNIDS[2]: 2}, 1, key=50)}
    return sizes


FOLDER_CLASSES = {"cat": 0, "dog": 1, "fox": 2}


def make_folders(root: Path, val: bool = True) -> dict[str, int]:
    sizes = {"train": write_images(root / "train", FOLDER_CLASSES, 4)}
    if val:
        sizes["val"] = write_images(root / "val", FOLDER_CLASSES, 2, key=10)
    sizes["test"] = write_images(root / "test", FOLDER_CLASSES, 2, "jpg", key=20)
    sizes["sketch"] = write_images(root / "ood_sketch", FOLDER_CLASSES, 1, key=30)
    sizes["night"] = write_images(root.parent / f"{root.name}_night", {"dog": 1, "fox": 2}, 2, key=40)  # absolute
    return sizes


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    base = tmp_path_factory.mktemp("fake-data")
    return {"cifar": (base / "c", make_cifar(base / "c")), "imagenet": (base / "in", make_imagenet(base / "in")),
            "folders": (base / "f", make_folders(base / "f"))}


def setup(dm, img_size: int = 32):
    dm.preprocess = Preprocess(img_size=img_size)
    dm.setup("fit")
    return dm


def assert_markers(ds, expected_label=lambda y: y, n: int | None = None):
    """Every image's marker pixel encodes the label the data set gives it."""
    for i in range(len(ds) if n is None else min(n, len(ds))):
        pil = ds.image(i)
        y = int(ds.labels[ds.index[i]]) if hasattr(ds, "index") else int(ds.labels[i])
        assert marker(pil) == (expected_label(y) * 25, 200, 7), (i, y, marker(pil))


# ---- readers -------------------------------------------------------------------------------------------
def test_cifar_readers_decode_the_official_layouts(fakes):
    root, sizes = fakes["cifar"]
    dm = setup(Cifar10(str(root), corruptions=["gaussian_noise", "fog"], severities=[1, 5], val_per_class=1,
                       num_workers=0))
    assert list(dm.sets["val"]) == ["id"]
    assert list(dm.sets["test"]) == ["id", "ood/cifar10_1", "ood/stl10", "ood/cifar10_c_gaussian_noise_s1",
                                     "ood/cifar10_c_gaussian_noise_s5", "ood/cifar10_c_fog_s1", "ood/cifar10_c_fog_s5"]
    assert len(dm.train_set) == 40 and len(dm.sets["val"]["id"]) == 10
    for name, ds in dm.sets["test"].items():
        assert len(ds) == sizes["stl10" if name == "ood/stl10" else "test"], name
    # channel-major pickles, HWC npy, stacked severities: the marker survives and matches the label
    for ds in (dm.train_set, dm.sets["val"]["id"], *dm.sets["test"].values()):
        if ds is not dm.sets["test"]["ood/stl10"]:
            assert_markers(ds)
    for s in (1, 5):  # severity s is rows (s-1)N..sN: its images carry s in pixel (0, 0)
        ds = dm.sets["test"][f"ood/cifar10_c_fog_s{s}"]
        assert {ds.image(i).getpixel((0, 0))[0] for i in range(len(ds))} == {s}
    # the whole image, exactly: the eval transform at 32x32 keeps every pixel (crop_pct 1.0)
    x, y, = dm.sets["test"]["id"][3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    expected = (torch.from_numpy(image(y, 103)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    # random training augmentation: no feature cache
    assert dm.train_transform_deterministic is False and dm.train_set[0][0].shape == (3, 32, 32)


def test_stl10_column_major_images_and_9_classes_remapped(fakes):
    root, _ = fakes["cifar"]
    dm = setup(Cifar10(str(root), ood=["stl10"], val_per_class=1, num_workers=0, augment="none"), img_size=48)
    ds = dm.sets["test"]["ood/stl10"]
    stl_to_cifar = {0: 0, 1: 2, 2: 1, 3: 3, 4: 4, 5: 5, 6: 7, 8: 8, 9: 9}  # monkey (7) dropped, car -> automobile
    assert len(ds) == 18 and sorted(set(ds.labels[ds.index].tolist())) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    cifar_to_stl = {v: k for k, v in stl_to_cifar.items()}
    assert_markers(ds, expected_label=lambda y: cifar_to_stl[y])  # 96x96, the right way round
    assert ds.image(0).size == (96, 96)
    assert ds[0][0].shape == (3, 48, 48)  # resized through the same eval transform
    assert dm.train_transform_deterministic is True  # augment=none: the feature cache may be used


def test_cifar_validation_is_held_out_of_train_stratified_and_fixed(fakes):
    root, _ = fakes["cifar"]
    a = setup(Cifar10(str(root), ood=[], val_per_class=2, train_per_class=2, num_workers=0))
    b = setup(Cifar10(str(root), ood=[], val_per_class=2, train_per_class=2, num_workers=0))
    c = setup(Cifar10(str(root), ood=[], val_per_class=2, split_seed=1, num_workers=0))
    va, tr = a.sets["val"]["id"].index, a.train_set.index
    assert not set(va) & set(tr) and len(va) == 20 and len(tr) == 20
    assert np.bincount(a.train_set.labels[va]).tolist() == [2] * 10
    assert (va == b.sets["val"]["id"].index).all() and not (va == c.sets["val"]["id"].index).all()
    assert list(a.sets["test"]) == ["id"]


def test_imagenet_folders_v2_by_index_and_r_a_class_subsets(fakes):
    root, sizes = fakes["imagenet"]
    dm = setup(ImageNet(str(root), val_per_class=1, num_workers=0))
    assert dm.num_classes == 4
    assert list(dm.sets["test"]) == ["id", "ood/imagenet_v2", "ood/imagenet_r", "ood/imagenet_sketch",
                                     "ood/imagenet_a"]
    assert len(dm.train_set) == 12 and len(dm.sets["val"]["id"]) == 4
    for name, ds in dm.sets["test"].items():
        assert len(ds) == sizes[name.removeprefix("ood/")], name
    for ds in (dm.train_set, dm.sets["val"]["id"], *dm.sets["test"].values()):
        # V2's folder "2" is class 2; val, R, A and Sketch map wnids by name to the sorted training wnids
        assert [label_of(ds.image(i)) for i in range(len(ds))] == ds.labels.tolist()
    assert sorted(set(dm.sets["test"]["ood/imagenet_r"].labels.tolist())) == [1, 3]
    assert dm.class_subsets.keys() == {"ood/imagenet_r", "ood/imagenet_a"}
    assert dm.class_subsets["ood/imagenet_r"].tolist() == [1, 3]
    assert dm.class_subsets["ood/imagenet_a"].tolist() == [0, 2]
    assert dm.class_subsets["ood/imagenet_r"].dtype == torch.long
    assert sorted(dm.sets["test"]["ood/imagenet_v2"].labels.tolist()) == [0, 1, 2, 3]
    assert_markers(dm.sets["test"]["ood/imagenet_sketch"])  # PNG: exact
    assert {ds.image(0).size for ds in dm.sets["test"].values()} == {(48, 40)}
    x, _ = dm.sets["test"]["id"][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_imagefolder_maps_classes_by_name_and_holds_out_val(fakes, tmp_path):
    root, sizes = fakes["folders"]
    dm = setup(ImageFolders(str(root), ood={"sketch": "ood_sketch", "night": str(root.parent / "f_night")},
                            num_workers=0))
    assert dm.num_classes == 3
    assert list(dm.sets["test"]) == ["id", "ood/sketch", "ood/night"]
    assert len(dm.train_set) == 12 and len(dm.sets["val"]["id"]) == sizes["val"]
    assert len(dm.sets["test"]["ood/night"]) == 4 and sorted(set(dm.sets["test"]["ood/night"].labels)) == [1, 2]
    assert_markers(dm.sets["test"]["ood/night"])  # dog -> 1, fox -> 2 by name, not by position
    for ds in (dm.train_set, dm.sets["val"]["id"], *dm.sets["test"].values()):
        assert [label_of(ds.image(i)) for i in range(len(ds))] == ds.labels.tolist()
    assert not dm.class_subsets
    make_folders(tmp_path / "noval", val=False)
    dm = setup(ImageFolders(str(tmp_path / "noval"), val_fraction=0.25, num_workers=0))
    assert len(dm.sets["val"]["id"]) == 3 and len(dm.train_set) == 9  # one image per class held out
    assert not set(dm.sets["val"]["id"].files) & set(dm.train_set.files)


# ---- bad input, in process -----------------------------------------------------------------------------
def test_missing_files_list_the_files_their_source_and_option(tmp_path):
    with pytest.raises(ThawlabError) as e:
        Cifar10(str(tmp_path), ood=["cifar10_1", "cifar10_c"], corruptions=["fog"], download=False).num_classes
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("cifar-10-batches-py/{data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
                   "test_batch}", "cifar-10-python.tar.gz",
                   "data.download=true fetches it, or point data.paths.cifar10 at a copy",
                   "CIFAR-10.1/{cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy}",
                   "modestyachts/CIFAR-10.1", "data.paths.cifar10_1", "CIFAR-10-C/{fog.npy, labels.npy}",
                   "zenodo.org/records/2535967", "data.paths.cifar10_c"):
        assert needle in msg, (needle, msg)
    with pytest.raises(ThawlabError, match=r"ImageNet-R: missing .*imagenet-r \(from .*hendrycks.*; download it by "
                                           r"hand, then point data\.paths\.imagenet_r at the folder\)$"):
        fake = tmp_path / "in"
        for split in ("train", "val"):
            (fake / split / WNIDS[0]).mkdir(parents=True)
        ImageNet(str(fake), ood=["imagenet_r"]).num_classes


def test_download_failure_is_one_line_naming_the_files(tmp_path, monkeypatch):
    def offline(*a, **kw):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    dm = Cifar10(str(tmp_path / "new"), ood=[], download=True)  # the root is created for the download
    with pytest.raises(ThawlabError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "\n" not in msg and "data.download=true failed" in msg and "name resolution" in msg
    assert "data_batch_1" in msg and "data.paths.cifar10" in msg


@pytest.mark.parametrize("kwargs,needles", [
    ({"ood": ["cifar10_2"]}, ["data.ood", "'cifar10_2' for data=cifar10", "did you mean", "cifar10_1"]),
    ({"corruptions": ["fogg"]}, ["data.corruptions", "'fogg'", "did you mean fog"]),
    ({"severities": [1, 7]}, ["data.severities", "7", "1..5"]),
    ({"augment": "autoaugment"}, ["data.augment", "autoaugment"]),
], ids=["ood", "corruption", "severity", "augment"])
def test_bad_cifar_options_name_the_value(fakes, kwargs, needles):
    with pytest.raises(ThawlabError) as e:
        Cifar10(str(fakes["cifar"][0]), **kwargs).check()
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_bad_folders_name_the_folder_and_the_classes(fakes, tmp_path):
    root = fakes["folders"][0]
    write_images(tmp_path / "odd", {"cat": 0, "wolf": 1, "bear": 2}, 1)
    with pytest.raises(ThawlabError, match=rf"data\.ood\.odd={tmp_path / 'odd'}: .*training classes.*: bear, wolf"):
        ImageFolders(str(root), ood={"odd": str(tmp_path / "odd")}).check()
    with pytest.raises(ThawlabError, match=r"data\.ood\.a/b: .*without '/'"):
        ImageFolders(str(root), ood={"a/b": "ood_sketch"}).check()
    with pytest.raises(ThawlabError, match=r"data\.ood\.gone=.*gone: no such directory"):
        ImageFolders(str(root), ood={"gone": "gone"}).check()
    with pytest.raises(ThawlabError, match=r"data\.ood=\['ood_sketch'\]: expected \{name: folder"):
        ImageFolders(str(root), ood=["ood_sketch"]).check()
    with pytest.raises(ThawlabError, match=r"data\.root is not set"):
        ImageFolders().check()
    write_images(tmp_path / "in" / "train", {WNIDS[0]: 0}, 1)
    write_images(tmp_path / "in" / "val", {WNIDS[0]: 0}, 1)
    write_images(tmp_path / "in" / "imagenetv2-matched-frequency-format-val", {"0": 0, "7": 0}, 1)
    with pytest.raises(ThawlabError, match=r"data\.paths\.imagenet_v2=.*class indices 0\.\.0; found 7"):
        ImageNet(str(tmp_path / "in"), ood=["imagenet_v2"]).check()


# ---- end to end ----------------------------------------------------------------------------------------
def test_cifar10_end_to_end_with_all_three_ood_kinds(run, fakes):
    root, sizes = fakes["cifar"]
    r = run("data=cifar10", f"data.root={root}", "data.val_per_class=1", "data.corruptions=[fog,gaussian_noise]",
            "data.severities=[2,5]", *FAST, smoke=False)
    assert r["status"] == "done"
    sets = ["cifar10_1", "stl10", "cifar10_c_fog_s2", "cifar10_c_fog_s5", "cifar10_c_gaussian_noise_s2",
            "cifar10_c_gaussian_noise_s5"]
    for s in sets:
        assert 0.0 <= r["metrics"][f"test/ood/{s}/acc"] <= 1.0, s
    assert r["counts"] == {"test/id": 20, "val/id": 10, **{f"test/ood/{s}": 18 if s == "stl10" else 20 for s in sets}}
    assert "test/ood/mean/acc" in r["metrics"] and not any(k.startswith("val/ood") for k in r["metrics"])


def test_imagenet_end_to_end_with_v2_r_sketch_a(run, fakes, monkeypatch):
    import lightning as L

    class Probe(L.Callback):  # what the module restricts the logits to, as it tests
        def on_test_start(self, trainer, pl_module):
            self.subsets = {k: v.tolist() for k, v in pl_module.class_subsets.items()}

    probe = Probe()
    add_callbacks(monkeypatch, probe)
    root, sizes = fakes["imagenet"]
    r = run("data=imagenet", f"data.root={root}", "data.val_per_class=1", *FAST, smoke=False)
    assert r["status"] == "done"
    ood = ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a")
    assert r["counts"] == {"test/id": 8, "val/id": 4, **{f"test/ood/{s}": sizes[s] for s in ood}}
    for s in ood:
        assert f"test/ood/{s}/acc" in r["metrics"] and np.isfinite(r["metrics"][f"test/ood/{s}/nll"])
    assert probe.subsets == {"ood/imagenet_r": [1, 3], "ood/imagenet_a": [0, 2]}


def test_imagefolder_end_to_end_with_two_ood_folders(run, fakes):
    root, sizes = fakes["folders"]
    night = root.parent / "f_night"  # an absolute path; sketch: relative to the root
    r = run("data=imagefolder", f"data.root={root}", f"data.ood={{sketch:ood_sketch,night:{night}}}", *FAST, smoke=False)
    assert r["status"] == "done"
    assert r["counts"] == {"test/id": 6, "val/id": 6, "test/ood/sketch": 3, "test/ood/night": 4}
    assert {"test/ood/sketch/acc", "test/ood/night/acc", "test/ood/mean/acc"} <= set(r["metrics"])


# ---- bad input, from the command line ------------------------------------------------------------------
def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("thawlab-train: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


def test_cli_bad_root_and_mismatched_ood_folder_exit_2(fakes, tmp_path, cache_dir):
    r = cli("data=cifar10", f"data.root={tmp_path}/nowhere", *FAST, f"hydra.run.dir={tmp_path}/a", cwd=tmp_path,
            cache=cache_dir, timeout=120)
    _one_line_error(r, f"data.root={tmp_path}/nowhere: no such directory")
    assert json.loads((tmp_path / "a" / "results.json").read_text())["status"] == "failed"
    write_images(tmp_path / "odd", {"cat": 0, "wolf": 1}, 1)
    r = cli("data=imagefolder", f"data.root={fakes['folders'][0]}", f"data.ood={{odd:{tmp_path}/odd}}", *FAST,
            f"hydra.run.dir={tmp_path}/b", cwd=tmp_path, cache=cache_dir, timeout=120)
    _one_line_error(r, f"data.ood.odd={tmp_path}/odd", "wolf")


# ---- data=cifar10c: a corruption as the target task (surgical fine-tuning) ---------------------------------
@pytest.fixture(scope="module")
def cifar10c_root(tmp_path_factory, fakes):
    """CIFAR-10-C with 5 images per class and severity (red of pixel (0, 0) = severity) beside the fake CIFAR-10."""
    root = tmp_path_factory.mktemp("c10c")
    (root / "cifar-10-batches-py").symlink_to(fakes["cifar"][0] / "cifar-10-batches-py")
    cc = root / "CIFAR-10-C"
    cc.mkdir()
    labels = [c for c in range(10) for _ in range(5)]
    np.save(cc / "labels.npy", np.array(labels * 5, dtype=np.uint8))
    np.save(cc / "fog.npy", np.stack([image(c, 500 + k, extra=s) for s in range(1, 6) for k, c in enumerate(labels)]))
    return root


def test_cifar10c_target_splits_one_severity_per_class_without_overlap(cifar10c_root):
    dm = setup(Cifar10C(str(cifar10c_root), corruption="fog", severity=4, train_per_class=2, val_per_class=1,
                        num_workers=0))
    train, val, test = dm.train_set, dm.sets["val"]["id"], dm.sets["test"]["id"]
    assert (len(train), len(val), len(test)) == (20, 10, 20)  # 2 / 1 / the remaining 2 per class
    assert list(dm.sets["test"]) == ["id", "ood/cifar10"] and len(dm.sets["test"]["ood/cifar10"]) == 20
    idx = [set(ds.index.tolist()) for ds in (train, val, test)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    for ds in (train, val, test):
        assert_markers(ds)
        assert {ds.image(i).getpixel((0, 0))[0] for i in range(len(ds))} == {4}  # severity 4 only
        assert np.bincount(ds.labels[ds.index], minlength=10).tolist() == [len(ds) // 10] * 10
    again = setup(Cifar10C(str(cifar10c_root), corruption="fog", severity=4, train_per_class=2, val_per_class=1,
                           test_per_class=1, ood=[], num_workers=0))
    assert again.train_set.index.tolist() == train.index.tolist()  # fixed by split_seed, not the run's seed
    assert len(again.sets["test"]["id"]) == 10 and list(again.sets["test"]) == ["id"]


@pytest.mark.parametrize("kwargs,needles", [
    ({"corruption": "fogg"}, ["data.corruption", "'fogg'", "did you mean fog"]),
    ({"severity": 6}, ["data.severities", "6", "1..5"]),
    ({"ood": ["stl10"]}, ["data.ood", "'stl10' for data=cifar10c"]),
    ({"train_per_class": 0}, ["data.train_per_class=0"]),
], ids=["corruption", "severity", "ood", "train_per_class"])
def test_bad_cifar10c_options_name_the_value(cifar10c_root, kwargs, needles):
    with pytest.raises(ThawlabError) as e:
        Cifar10C(str(cifar10c_root), **{"corruption": "fog", **kwargs}).check()
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_cifar10c_too_few_images_left_for_a_test_set(cifar10c_root):
    with pytest.raises(ThawlabError, match=r"data\.train_per_class=4: class 0 has 4 images after validation"):
        setup(Cifar10C(str(cifar10c_root), corruption="fog", train_per_class=4, val_per_class=1, num_workers=0))


def test_cifar10c_end_to_end(run, cifar10c_root):
    r = run("data=cifar10c", f"data.root={cifar10c_root}", "data.corruption=fog", "data.train_per_class=2",
            "data.val_per_class=1", *FAST, smoke=False)
    assert r["status"] == "done"
    assert r["counts"] == {"test/id": 20, "val/id": 10, "test/ood/cifar10": 20}
