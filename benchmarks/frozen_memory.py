"""Peak memory of a frozen (linear probe) run against a full fine-tuning run at the same batch size (a benchmark,
run by hand; not a test). Goal: frozen at most half.

Each schedule trains in its own process (peak resident memory is per process) through `trainer.fit` as thawlab
builds it, on the embedded benchmark's images resized to --img-size, for --steps steps. Reported: the peak
resident set size of the process, and the part of it training added above what the process held before
`fit` (model, data, libraries). On a GPU the same script reports torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/frozen_memory.py                 # resnet50 at 224x224, batch 32, 3 steps
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import lightning as L
import torch

from common import compose_cfg
from thawlab.build import build_datamodule, build_module, build_net, build_trainer


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(a) -> dict:
    cfg = compose_cfg([f"backbone.name={a.model}", "backbone.pretrained=false", f"schedule={a.child}",
                       f"data.img_size={a.img_size}", "data.ood=[]", f"data.batch_size={a.batch_size}",
                       "trainer.max_epochs=1", f"trainer.limit_train_batches={a.steps}", "trainer.limit_val_batches=0",
                       f"trainer.accelerator={a.accelerator}", "cache_features=false"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    module = build_module(cfg, net, dm)
    trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
    before = rss_mib()
    if torch.cuda.is_available() and a.accelerator != "cpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    out = {"schedule": a.child, "before_fit_mib": before,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable_params": module.net.trainable_parameter_count()}
    if torch.cuda.is_available() and a.accelerator != "cpu":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    print(f"{a.model} at {a.img_size}x{a.img_size}, batch {a.batch_size}, {a.steps} training steps")
    rows = {}
    for schedule in ("frozen", "full"):
        args = [sys.executable, __file__, "--child", schedule] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                   vars(a).items() if k != "child"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[schedule] = r = json.loads(out)
        added = r["peak_rss_mib"] - r["before_fit_mib"]
        line = (f"  {schedule:6s} peak RSS {r['peak_rss_mib']:7.0f} MiB, added by training {added:7.0f} MiB, "
                f"trainable parameters {r['trainable_params']:,}")
        if "cuda_peak_mib" in r:
            line += f", CUDA peak {r['cuda_peak_mib']:.0f} MiB"
        print(line, flush=True)
    f, u = rows["frozen"], rows["full"]
    print(f"ratio frozen/full: peak RSS {f['peak_rss_mib'] / u['peak_rss_mib']:.2f}, added by training "
          f"{(f['peak_rss_mib'] - f['before_fit_mib']) / (u['peak_rss_mib'] - u['before_fit_mib']):.2f}"
          + (f", CUDA peak {f['cuda_peak_mib'] / u['cuda_peak_mib']:.2f}" if "cuda_peak_mib" in f else ""))


if __name__ == "__main__":
    main()
