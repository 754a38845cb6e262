"""Training augmentation (`data.augment` presets on every data set), Mixup / CutMix and label smoothing: evaluation
sets never change, the feature cache turns itself off when training inputs are random, training targets are
soft under mixing while evaluation NLL stays the plain NLL, every schedule runs with them, and bad values are
one line before any pretraining."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import TensorDataset

from conftest import add_callbacks, cli, compose_cfg
from test_datasets import _one_line_error, make_cifar, make_folders
from thawlab.build import build_datamodule, check_config
from thawlab.data import augment as aug
from thawlab.data.cifar import Cifar10
from thawlab.data.digits import DigitsTarget, Preprocess
from thawlab.data.folders import ImageFolders
from thawlab.errors import ThawlabError
from thawlab.module import host_rng_state, set_host_rng_state

RANDOM = [p for p in aug.PRESETS if p != "none"]


def _setup(dm, p: Preprocess = Preprocess(img_size=32)):
    dm.preprocess = p
    dm.setup("fit")
    return dm


def _same_eval_sets(dm, plain) -> None:
    for stage in ("val", "test"):
        assert list(dm.sets[stage]) == list(plain.sets[stage])
        for name, ds in dm.sets[stage].items():
            ref = plain.sets[stage][name]
            for i in range(len(ds)):
                a, b = ds[i], ref[i]
                assert torch.equal(a[0], b[0]) and int(a[1]) == int(b[1]), (stage, name, i)


# ---- the presets, data set by data set ---------------------------------------------------------------------
def test_digits_presets_augment_training_items_only():
    plain = _setup(DigitsTarget(severities=(5,)))
    assert isinstance(plain.train_set, TensorDataset) and plain.train_transform_deterministic  # today's path
    for preset in RANDOM:
        dm = _setup(DigitsTarget(augment=preset, severities=(5,)))
        assert dm.train_transform_deterministic is False, preset
        for stage in ("val", "test"):  # evaluation sets: the very same tensors as without augmentation
            assert list(dm.sets[stage]) == list(plain.sets[stage])
            for name, ds in dm.sets[stage].items():
                assert torch.equal(ds.tensors[0], plain.sets[stage][name].tensors[0]), (preset, stage, name)
        ds = dm.train_set
        assert [int(ds[i][1]) for i in range(len(ds))] == plain.train_set.tensors[1].tolist()
        torch.manual_seed(0)
        a = torch.stack([ds[i][0] for i in range(30)])
        b = torch.stack([ds[i][0] for i in range(30)])
        assert a.shape == (30, 3, 32, 32) and a.dtype == torch.float32 and not torch.equal(a, b), preset
        assert "Flip" not in repr(ds.transform), "a mirrored digit is no digit"
    # the images the presets start from are the evaluation path's, up to 8 bits: same size, scale, normalisation
    ds.transform = aug.eval_transform(dm.preprocess, crop_pct=1.0)
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i][0], plain.train_set[i][0], atol=1.01 / 255, rtol=0)
    # pixels moved in are background: black, white under the inverted task
    assert dm.recipe.fill == 0 and DigitsTarget(augment="randaug", shift="invert").recipe.fill == 255


def test_real_data_presets_augment_training_items_only(tmp_path):
    make_cifar(tmp_path / "c")
    make_folders(tmp_path / "f")
    sets = {"cifar10": lambda a: Cifar10(str(tmp_path / "c"), ood=["cifar10_1", "cifar10_c"], corruptions=["fog"],
                                         severities=[3], val_per_class=1, num_workers=0, augment=a),
            "imagefolder": lambda a: ImageFolders(str(tmp_path / "f"), ood={"sketch": "ood_sketch"}, num_workers=0,
                                                  augment=a)}
    for name, make in sets.items():
        plain = _setup(make("none"))
        assert plain.train_transform_deterministic is True
        for preset in RANDOM:
            dm = _setup(make(preset))
            assert dm.train_transform_deterministic is False, (name, preset)
            _same_eval_sets(dm, plain)
            x, y = dm.train_set[0]
            assert x.shape == (3, 32, 32) and y == plain.train_set[0][1], (name, preset)
    # one-channel models: the operations run on grey images
    for preset in ("randaug", "augmix"):
        dm = _setup(sets["cifar10"](preset), Preprocess(img_size=32, in_chans=1, mean=(0.5,), std=(0.5,)))
        assert dm.train_set[0][0].shape == (1, 32, 32)
    assert Cifar10.recipe.base == "crop_flip" and ImageFolders.recipe.base == "resized_crop"


def test_randaug_survives_its_largest_magnitude():
    """timm's increasing posterize at magnitude 10 keeps 0 bits, which Pillow 13 rejects: the cap keeps 1."""
    from PIL import Image

    tf = aug.train_transform(Preprocess(img_size=32), "randaug")
    posterize = next(op for t in tf.transforms if hasattr(t, "ops") for op in t.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    out = np.asarray(posterize(Image.fromarray(np.full((32, 32, 3), 200, np.uint8))))
    assert (out == 128).all()  # 1 bit kept


# ---- training: the cache, every schedule, soft targets, plain evaluation ----------------------------------
@pytest.mark.parametrize("overrides,cached", [([], True), (["data.augment=crop_flip"], False),
                                              (["regularization.mixup=0.2"], False), (["cache_features=false"], False)],
                         ids=["none", "random-augment", "mixup", "off"])
def test_feature_cache_only_for_deterministic_unmixed_training_inputs(overrides, cached):
    from thawlab.build import build_module, build_net

    cfg = compose_cfg(["schedule=frozen", "backbone.pretrained=false", "data.severities=[5]", *overrides])
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, False)
    assert (build_module(cfg, net, dm).cache is not None) == cached


class _Probe(L.Callback):
    """The module's feature cache when fit starts; at test start (the selected checkpoint loaded), the plain
    NLL and accuracy of the ID test set computed here, outside thawlab's metrics."""

    def __init__(self, calls: list | None = None):
        self.calls = calls if calls is not None else []

    def on_fit_start(self, trainer, module):  # the last fit is the fine-tuning (the first may be a pretraining)
        self.cache, self.start = module.cache, len(self.calls)

    def on_test_start(self, trainer, module):  # debug=smoke tests one batch a set: this one
        x, y, _ = next(iter(trainer.datamodule.eval_dataloaders("test")["id"]))
        with torch.no_grad():
            logits = module.net(x)
        self.nll, self.acc = float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def _record_soft_targets(monkeypatch) -> list[torch.Tensor]:
    targets, forward = [], SoftTargetCrossEntropy.forward
    monkeypatch.setattr(SoftTargetCrossEntropy, "forward",
                        lambda self, x, target: targets.append(target.detach().clone()) or forward(self, x, target))
    return targets


@pytest.mark.parametrize("schedule,preset", [("frozen", "randaug"), ("full", "augmix"), ("lp_ft", "randaug"),
                                             ("gradual", "crop_flip")])
def test_random_augmentation_and_mixup_with_every_schedule(run, monkeypatch, schedule, preset):
    probe = _Probe()
    add_callbacks(monkeypatch, probe)
    targets = _record_soft_targets(monkeypatch)
    r = run(f"schedule={schedule}", f"data.augment={preset}", "regularization.mixup=0.8", "regularization.cutmix=1.0",
            "regularization.label_smoothing=0.1", "trainer.max_epochs=2")
    assert r["status"] == "done" and r["config"]["data"]["augment"] == preset
    assert probe.cache is None, "random training inputs: no feature cache, even for a frozen backbone"
    t = torch.cat(targets)
    assert len(t) == 2 * 2 * 32  # every training batch (2 epochs x 2 batches) went through Mixup
    torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
    assert t.min() >= 0.1 / 10 - 1e-6, "label smoothing: every class keeps smoothing / classes"
    mixed = ((t > 0.01 + 1e-3).sum(1) >= 2).float().mean()
    assert mixed > 0.5, f"soft targets: most rows mix two classes ({mixed:.2f})"
    # evaluation: unmixed inputs, the plain NLL (no smoothing)
    assert r["metrics"]["test/id/nll"] == pytest.approx(probe.nll, abs=1e-4)
    assert r["metrics"]["test/id/acc"] == pytest.approx(probe.acc, abs=1e-6)


def test_mixup_on_real_data_with_an_odd_training_set(run, tmp_path, monkeypatch):
    """9 training images in one batch: Mixup pairs 8 of them (timm mixes sample i with sample n-1-i)."""
    make_folders(tmp_path / "f")
    targets = _record_soft_targets(monkeypatch)
    r = run("data=imagefolder", f"data.root={tmp_path / 'f'}", "data.train_per_class=3", "data.batch_size=16",
            "data.augment=randaug", "regularization.mixup=0.5", "backbone.pretrained=false", "data.img_size=32",
            "data.num_workers=0", "trainer.max_epochs=1", "logger=none", smoke=False)
    assert r["status"] == "done" and [len(t) for t in targets] == [8]
    assert r["counts"]["test/id"] == 6  # evaluation: every image, unmixed


def test_label_smoothing_in_training_only_and_the_cache_stays_on(run, monkeypatch):
    smoothing, cross_entropy = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **kw: smoothing.append(kw.get("label_smoothing", 0.0))
                        or cross_entropy(*a, **kw))
    probe = _Probe(smoothing)
    add_callbacks(monkeypatch, probe)
    r = run("schedule=frozen", "regularization.label_smoothing=0.2", "trainer.max_epochs=2")
    assert probe.cache is not None, "augment=none and no mixing: a frozen backbone's features are cached"
    assert smoothing[probe.start:probe.start + 5] == [0.2] * 4 + [0.0]  # 4 training steps, then the probe's NLL
    assert r["metrics"]["test/id/nll"] == pytest.approx(probe.nll, abs=1e-4)


def test_host_random_states_survive_a_checkpoint(tmp_path):
    """timm's RandAugment draws from python's random, Mixup from numpy's: a resumed run restores both."""
    import random

    torch.save({"rng": host_rng_state()}, tmp_path / "c.pt")
    first = (random.random(), np.random.rand())
    set_host_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == first


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needles", [
    ("regularization.label_smoothing=1.0", ["regularization.label_smoothing=1.0", "[0, 1)"]),
    ("regularization.label_smoothing=-0.1", ["regularization.label_smoothing=-0.1"]),
    ("regularization.mixup=-0.2", ["regularization.mixup=-0.2", ">= 0"]),
    ("regularization.cutmix=-1", ["regularization.cutmix=-1"]),
    ("regularization.mix_prob=1.5", ["regularization.mix_prob=1.5"]),
])
def test_bad_regularization_values_are_one_line(override, needles):
    with pytest.raises(ThawlabError) as e:
        check_config(compose_cfg([override]))
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_mixup_needs_an_even_batch_and_presets_are_checked_on_every_data_set(tmp_path):
    with pytest.raises(ThawlabError, match=r"data\.batch_size=33: .*even batch size"):
        check_config(compose_cfg(["regularization.cutmix=1.0", "data.batch_size=33"]))
    check_config(compose_cfg(["regularization.cutmix=1.0"]))
    with pytest.raises(ThawlabError, match=r"data\.augment='randaugment' is not one of .*; did you mean randaug"):
        build_datamodule(compose_cfg(["data.augment=randaugment"]).data, None)
    make_cifar(tmp_path / "c")
    with pytest.raises(ThawlabError, match=r"data\.augment='augmx'.*did you mean augmix"):
        Cifar10(str(tmp_path / "c"), augment="augmx").check()


def test_cli_unknown_preset_is_one_line_before_pretraining(tmp_path):
    cache = tmp_path / "empty-cache"
    r = cli("debug=smoke", "logger=none", "data.augment=foo", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
            cache=str(cache), timeout=120)
    _one_line_error(r, "data.augment='foo' is not one of none, crop_flip, resized_crop, randaug, augmix")
    assert not (cache / "pretrain").exists(), "the error comes before the source pretraining"


def test_clip_crop_is_the_training_transform_of_wise_ft_and_flyp():
    """wise-ft's and FLYP's clip/clip.py `_transform(n_px, is_train=True)`, written out as there (neither repo is
    installable): the same crops for the same torch seed, to the pixel."""
    import torchvision.transforms as T
    from PIL import Image

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    reference = T.Compose([T.RandomResizedCrop(64, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])
    ours = aug.train_transform(Preprocess(img_size=64, mean=mean, std=std), "clip_crop")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        torch.testing.assert_close(a, reference(img), atol=0, rtol=0)
    assert "Flip" not in repr(ours)


def test_evaluation_resamples_as_the_model_expects_equal_to_timm_and_open_clip():
    """The resize of real images uses the weights' own interpolation (timm's and OpenCLIP's configs: bicubic for
    ViTs and CLIP), as timm's create_transform and OpenCLIP's image_transform do: equal to theirs to the pixel;
    data.interpolation overrides it; the embedded benchmark's test_resnet keeps its bilinear."""
    import open_clip
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from thawlab.build import build_net

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    dc = resolve_model_data_config(timm.create_model("test_vit", pretrained=False))
    assert dc["interpolation"] == "bicubic"
    _, pre = build_net(compose_cfg(["backbone.name=test_vit", "backbone.pretrained=false", "data.img_size=160"]),
                       10, False)
    assert pre.interpolation == "bicubic"
    timm_eval = create_transform(**{**dc, "input_size": (3, 160, 160), "crop_pct": 0.875}, is_training=False)
    torch.testing.assert_close(aug.eval_transform(pre, 0.875)(img), timm_eval(img), atol=0, rtol=0)
    # OpenCLIP's evaluation transform (resize the shorter side, centre crop): crop_pct 1
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    clip_eval = open_clip.image_transform(64, is_train=False, mean=mean, std=std, interpolation="bicubic")
    ours = aug.eval_transform(Preprocess(img_size=64, mean=mean, std=std, interpolation="bicubic"), 1.0)
    torch.testing.assert_close(ours(img), clip_eval(img), atol=0, rtol=0)
    # an override wins; test_resnet's own is bilinear; a bad name is one line
    _, pre = build_net(compose_cfg(["backbone.name=test_vit", "backbone.pretrained=false", "data.img_size=160",
                                    "data=imagefolder", "data.interpolation=bilinear"]), 10, False)
    assert pre.interpolation == "bilinear"
    _, pre = build_net(compose_cfg(["backbone.pretrained=false"]), 10, False)
    assert pre.interpolation == "bilinear"
    with pytest.raises(ThawlabError, match=r"data\.interpolation='cubic': choose from bilinear, bicubic"):
        aug.eval_transform(Preprocess(interpolation="cubic"))
    with pytest.raises(ThawlabError, match=r"data\.interpolation='bicubc' is not one of .*did you mean bicubic"):
        check_config(compose_cfg(["data=imagefolder", "data.interpolation=bicubc"]))
