"""Epoch time of a frozen phase with and without the feature cache (a benchmark, run by hand; not a test).

A linear probe (schedule=frozen) on the embedded benchmark, through `trainer.fit` as thawlab builds it:
training and the per-epoch validation on ID and every OOD set. With the cache, the first epoch computes every
sample's features and the later epochs train and validate the head on them; without it, every epoch runs the
backbone. Goal: 10x or more faster after the first epoch.

    .venv/bin/python benchmarks/feature_cache.py                      # resnet18 at 64x64, 5 epochs
    .venv/bin/python benchmarks/feature_cache.py --model test_resnet --img-size 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L

from common import compose_cfg
from thawlab.build import build_datamodule, build_module, build_net, build_trainer


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        self.seconds.append(time.perf_counter() - self.start)


def epoch_times(a, cache: bool) -> list[float]:
    cfg = compose_cfg([f"backbone.name={a.model}", "backbone.pretrained=false", "schedule=frozen",
                       f"data.img_size={a.img_size}", f"data.train_per_class={a.train_per_class}",
                       f"trainer.max_epochs={a.epochs}", f"cache_features={str(cache).lower()}"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    module = build_module(cfg, net, dm)
    timer = EpochTimer()
    trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=dm)
    return timer.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    a = ap.parse_args()
    print(f"{a.model} at {a.img_size}x{a.img_size}, schedule=frozen, {a.train_per_class * 10} training images, "
          f"validation on ID + 6 OOD sets each epoch, {a.epochs} epochs")
    results = {}
    for cache in (False, True):
        t = epoch_times(a, cache)
        results[cache] = t
        print(f"  cache {'on ' if cache else 'off'}: epochs " + ", ".join(f"{s:.2f}" for s in t) + " s", flush=True)
    off, on = statistics.median(results[False][1:]), statistics.median(results[True][1:])
    print(f"median epoch after the first: without cache {off:.2f} s, with cache {on:.3f} s")
    print(f"speed-up after the first epoch = {off / on:.1f}x")


if __name__ == "__main__":
    main()
