"""What thawlab's training loop costs over a plain PyTorch loop (a benchmark, run by hand; not a test).

Both loops train the same network (thawlab's ThawNet from the same config and initial weights), on the same
data (the embedded benchmark's source task, in memory), with the same named parameter groups, AdamW, per-step
LambdaLR schedule and number of steps. thawlab's side is `trainer.fit` exactly as a run builds it (phases,
BatchNorm policy, per-epoch trace, lr logging, progress bar), without validation, which the plain loop does
not have either. The two alternate `--repeats` times; the figures are medians of wall time.

    .venv/bin/python benchmarks/overhead.py                     # resnet18 at 32x32, batch 64, 2 x 50 steps
    .venv/bin/python benchmarks/overhead.py --model test_resnet --batch-size 32

Ends with the line `ratio thawlab/plain = X.XX` (goal: 1.05 or less).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from common import compose_cfg, plain_optimizer
from thawlab.build import build_datamodule, build_module, build_net, build_trainer


def make_cfg(model: str, batch_size: int, epochs: int):
    return compose_cfg([f"backbone.name={model}", "backbone.pretrained=false", "schedule=full",
                        f"data.source.batch_size={batch_size}", f"trainer.max_epochs={epochs}"])


def thawlab_loop(cfg, net, dm, steps: int) -> float:
    module = build_module(cfg, net, dm)
    trainer = build_trainer(cfg.trainer, None, False, limit_train_batches=steps, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def plain_loop(cfg, net, dm, steps: int) -> float:
    """What a researcher would write by hand: the same groups, optimizer and lr schedule, nothing else."""
    start = time.perf_counter()
    phases = build_module(cfg, net, dm).phases  # the same single phase; building it is cheap
    net.apply_phase(phases[0])
    net.train()
    opt, sched = plain_optimizer(cfg, net, phases, steps)
    for _ in range(cfg.trainer.max_epochs):
        for i, (x, y, _) in enumerate(dm.train_dataloader()):
            if i == steps:
                break
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    cfg = make_cfg(a.model, a.batch_size, a.epochs)
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None, task="source")
    net0, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    dm.setup("fit")
    images = a.epochs * a.steps * a.batch_size
    print(f"{a.model}, {dm.preprocess.img_size}x{dm.preprocess.img_size}, batch {a.batch_size}, "
          f"{a.epochs} x {a.steps} steps ({images} images), torch threads {torch.get_num_threads()}")

    times = {"plain": [], "thawlab": []}
    for r in range(a.repeats):
        for name, loop in (("plain", plain_loop), ("thawlab", thawlab_loop)):
            L.seed_everything(r, verbose=False)
            seconds = loop(cfg, copy.deepcopy(net0), dm, a.steps)
            times[name].append(seconds)
            print(f"  repeat {r}: {name:8s} {seconds:6.2f} s  ({images / seconds:6.1f} images/s)", flush=True)
    plain, thawlab = statistics.median(times["plain"]), statistics.median(times["thawlab"])
    print(f"median wall time: plain {plain:.2f} s, thawlab {thawlab:.2f} s")
    print(f"ratio thawlab/plain = {thawlab / plain:.2f}")


if __name__ == "__main__":
    main()
