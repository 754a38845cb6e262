"""Seconds per epoch of gradual unfreezing with and without the caches of frozen parts (a benchmark, run by
hand; not a test).

schedule=gradual on the embedded benchmark, through `trainer.fit` as thawlab builds it: training and the
per-epoch validation on ID and every OOD set. With `cache_features` on, the head-only phase trains on cached
features (the whole backbone is frozen) and each later phase computes the activations at the end of its frozen
prefix in its first epoch and trains the rest of the network on them after that; without it, every epoch runs
the whole network. Goals (issue 11): a phase training only the last stage and the head at least 3x faster, the
whole gradual run at least 1.8x.

    .venv/bin/python benchmarks/prefix_cache.py                 # resnet18 at 64x64, interval 2, 12 epochs
    .venv/bin/python benchmarks/prefix_cache.py --interval 4    # longer phases: the fill epoch counts less
"""
from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch

from common import compose_cfg
from thawlab.build import build_datamodule, build_module, build_net, build_trainer
from thawlab.schedules import phase_at


class EpochTimer(L.Callback):
    """Wall seconds and this process's CPU seconds per epoch: on a shared machine the CPU time (one thread)
    moves much less with the other jobs' load than the wall time."""

    def __init__(self):
        self.seconds: list[tuple[str, float]] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        phase = phase_at(module.phases, trainer.current_epoch)[1]
        self.seconds.append((phase.name, time.perf_counter() - self.start))
        self.cpu.append(time.process_time() - self.cpu_start)


def epoch_times(a, cache: bool) -> list[tuple[str, float]]:
    cfg = compose_cfg([f"backbone.name={a.model}", "backbone.pretrained=false", "schedule=gradual",
                       f"schedule.interval={a.interval}", f"data.img_size={a.img_size}",
                       f"data.train_per_class={a.train_per_class}", f"trainer.max_epochs={a.epochs}",
                       f"cache_features={str(cache).lower()}"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    module = build_module(cfg, net, dm)
    timer = EpochTimer()
    trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=dm)
    return timer.seconds, timer.cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=12)
    a = ap.parse_args()
    print(f"{a.model} at {a.img_size}x{a.img_size}, schedule=gradual (interval {a.interval}), {a.epochs} epochs, "
          f"{a.train_per_class * 10} training images, validation on ID + 6 OOD sets each epoch; "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results, cpus = {}, {}
    for cache in (False, True):
        results[cache], cpus[cache] = epoch_times(a, cache)
        print(f"  cache {'on ' if cache else 'off'}: " + ", ".join(f"{p} {s:.2f}" for p, s in results[cache])
              + " s wall; CPU " + ", ".join(f"{c:.2f}" for c in cpus[cache]), flush=True)
    for label, values in (("wall", lambda c: [s for _, s in results[c]]), ("CPU", lambda c: cpus[c])):
        table({c: list(zip([p for p, _ in results[c]], values(c))) for c in (False, True)}, label)


def table(results: dict, label: str) -> None:
    phases = list(dict.fromkeys(p for p, _ in results[False]))
    print(f"\n{label} seconds")
    print("| phase | epochs | uncached s/epoch | cached: first epoch | cached: later epochs | phase speed-up |")
    print("|---|---|---|---|---|---|")
    for name in phases:
        off = [s for p, s in results[False] if p == name]
        on = [s for p, s in results[True] if p == name]
        later = f"{sum(on[1:]) / len(on[1:]):.2f} ({sum(off[1:]) / sum(on[1:]):.1f}x)" if len(on) > 1 else "-"
        print(f"| {name} | {len(off)} | {sum(off) / len(off):.2f} | {on[0]:.2f} | {later} | "
              f"{sum(off) / sum(on):.2f}x |")
    total_off, total_on = (sum(s for _, s in results[c]) for c in (False, True))
    print(f"| whole run | {len(results[False])} | {total_off:.1f} s | | {total_on:.1f} s | "
          f"{total_off / total_on:.2f}x |")

if __name__ == "__main__":
    main()
