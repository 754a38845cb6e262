"""Backbone features shared across runs (the L-BFGS probe's features, `schedule.solver=lbfgs`): computed once
per (backbone weights, data, preprocessing, device kind) and kept on disk beside the pretraining cache,

    <cache_dir>/features/<key>/   <stage>-<set>.npy (float32, samples x features), <stage>-<set>.labels.npy,
                                  meta.json, `done` (written last), .lock

so the ten jobs of a probe sweep over seeds run the backbone once. The key is content: a digest of the
backbone's tensors (parameters and buffers: BatchNorm statistics change features too), the data config without
its loader settings (batch sizes, workers), the preprocessing and the device kind (cuDNN's TF32 convolutions give
other float32 features than a CPU). An entry is made under its file lock (thawlab.filelock, as the pretraining
cache's), so concurrent jobs compute it once; the first sees `done` missing, the others wait and read.
Features are computed in float32, no autocast, the backbone in eval mode.

Bounded: after an entry is written, the least recently used entries go until the store holds at most
`cache_features.shared_gb` (an entry larger than the bound is used by its run and not kept). Cleared by
`thawlab-cache clear` (`thawlab-cache list` shows the entries).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from thawlab.filelock import locked as _locked

FORMAT = 1  # bump when what an entry holds changes
LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers")
GB = 1e9


def store_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "features"


def weights_digest(backbone: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_key(digest: str, data: dict, preprocess: str, device: str) -> str:
    described = {"format": FORMAT, "weights": digest, "preprocess": preprocess, "device": device,
                 "data": {k: v for k, v in data.items() if k not in LOADER_KEYS}}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file(stage: str, name: str) -> str:
    return f"{stage}-{name.replace('/', '-')}"


@torch.no_grad()
def compute(backbone, datasets: dict[tuple[str, str], object], device, batch_size: int, num_workers: int = 0
            ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of every sample of each data set, in order, the backbone in eval mode."""
    from torch.utils.data import DataLoader

    modes = {n: m.training for n, m in backbone.named_modules()}
    backbone.eval()
    out = {}
    try:
        for key, ds in datasets.items():
            feats, labels = [], []
            for x, y in DataLoader(ds, batch_size, shuffle=False, num_workers=num_workers):
                feats.append(backbone(x.to(device)).float().cpu())
                labels.append(torch.as_tensor(y))
            out[key] = (torch.cat(feats).numpy(), torch.cat(labels).numpy())
    finally:
        for n, m in backbone.named_modules():
            m.training = modes[n]
    return out


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def entries(root: Path) -> list[tuple[Path, int, float]]:
    """(dir, bytes, last use) of each finished entry, oldest use first."""
    out = []
    for d in root.iterdir() if root.is_dir() else []:
        done = d / "done"
        if d.is_dir() and done.exists():
            out.append((d, _size(d), done.stat().st_mtime))
    return sorted(out, key=lambda e: e[2])


def evict(root: Path, bound_gb: float, keep: Path | None = None, note=None) -> list[str]:
    """Least recently used entries removed until the store holds at most bound_gb; an entry another process
    holds the lock of (being written or read) is skipped. Returns the removed entries' names."""
    removed = []
    listed = entries(root)
    total = sum(size for _, size, _ in listed)
    for d, size, _ in listed:
        if total <= bound_gb * GB:
            break
        if d == keep:
            continue
        with open(d / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d.name)
    if removed and note:
        note(f"feature store: evicted {len(removed)} least recently used entr{'y' if len(removed) == 1 else 'ies'} "
             f"(cache_features.shared_gb={bound_gb:g})")
    return removed


def features(cache_dir, backbone, datasets: dict[tuple[str, str], object], *, data: dict, preprocess: str,
             device, batch_size: int, num_workers: int = 0, bound_gb: float = 10.0, note=print
             ) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], dict]:
    """The backbone's features of each data set ((stage, set name) -> dataset), from the store or computed and
    stored. Returns (features, info) with info = {"key", "digest", "cached", "seconds", "path"}."""
    root = store_dir(cache_dir)
    start = time.perf_counter()
    digest = weights_digest(backbone)
    key = entry_key(digest, data, preprocess, torch.device(device).type)
    d = root / key
    info = {"key": key, "digest": digest, "path": str(d)}
    with _locked(d):
        meta = d / "meta.json"
        names = [_file(*k) for k in datasets]
        if (d / "done").exists() and all(n in json.loads(meta.read_text())["sets"] for n in names):
            out = {k: (np.load(d / f"{_file(*k)}.npy"), np.load(d / f"{_file(*k)}.labels.npy")) for k in datasets}
            os.utime(d / "done")  # its last use: eviction goes by it
            info.update(cached=True, seconds=time.perf_counter() - start)
            note(f"features: {sum(len(f) for f, _ in out.values())} samples x {next(iter(out.values()))[0].shape[1]} "
                 f"from the shared cache in {info['seconds']:.2f} s ({d})")
            return out, info
        (d / "done").unlink(missing_ok=True)
        out = compute(backbone, datasets, device, batch_size, num_workers)
        for k, (f, y) in out.items():
            np.save(d / f"{_file(*k)}.npy", f)
            np.save(d / f"{_file(*k)}.labels.npy", y)
        meta.write_text(json.dumps({"sets": names, "weights": digest, "data": data, "preprocess": preprocess,
                                    "device": torch.device(device).type, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                   indent=2, default=str))
        (d / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        info.update(cached=False, seconds=time.perf_counter() - start)
        n = sum(len(f) for f, _ in out.values())
        note(f"features: {n} samples x {next(iter(out.values()))[0].shape[1]} computed in {info['seconds']:.2f} s, "
             f"stored in the shared cache ({d}, {_size(d) / GB:.3g} GB)")
    if _size(d) > bound_gb * GB:  # larger than the whole store may be: used by this run only
        with _locked(d):
            shutil.rmtree(d, ignore_errors=True)
        note(f"feature store: {d.name} exceeds cache_features.shared_gb={bound_gb:g}; not kept")
    else:
        evict(root, bound_gb, keep=d, note=note)
    return out, info


def main(argv: list[str] | None = None) -> None:
    """`thawlab-cache list|clear`: the shared feature store under the cache directory."""
    ap = argparse.ArgumentParser(prog="thawlab-cache", description="The shared feature store of L-BFGS probes "
                                 "(<cache_dir>/features): list its entries, or clear it.")
    ap.add_argument("action", choices=("list", "clear"))
    ap.add_argument("--cache-dir", default=os.environ.get("THAWLAB_CACHE") or str(Path.home() / ".cache/thawlab"),
                    help="thawlab's cache_dir (default: $THAWLAB_CACHE, else ~/.cache/thawlab)")
    a = ap.parse_args(argv)
    root = store_dir(a.cache_dir)
    listed = entries(root)
    if a.action == "list":
        for d, size, used in listed:
            meta = json.loads((d / "meta.json").read_text())
            print(f"{d.name}  {size / GB:8.3f} GB  last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}"
                  f"  {meta['data'].get('_target_', '?')}  {len(meta['sets'])} sets")
        print(f"{len(listed)} entries, {sum(s for _, s, _ in listed) / GB:.3f} GB in {root}")
        return
    total = sum(s for _, s, _ in listed)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(root)
    print(f"cleared {root}: {len(listed)} entries, {total / GB:.3f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
