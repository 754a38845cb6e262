"""The cache of source-pretrained weights: `<cache_dir>/pretrain/<name>-<key>/` holding weights.safetensors,
meta.json and a `done` marker written last, made once under a file lock so that concurrent sweep jobs pretrain
once. Shared by thawlab.pretrain (timm backbones) and thawlab.clip_pretrain (the embedded CLIP), which both
import it: it imports neither."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from thawlab.build import console
from thawlab.filelock import locked as _locked  # shared with the feature store (thawlab.feature_store)

WEIGHTS, META = "weights.safetensors", "meta.json"


def check_source(cfg: DictConfig) -> None:
    if not (cfg.data.get("source") or {}).get("_target_"):
        from thawlab.errors import ThawlabError

        raise ThawlabError(f"backbone.pretrained=source: data {cfg.data._target_!r} has no source task; "
                           f"use true (hub), false or a weights file")


def run_cached(d: Path, force: bool, pretrain) -> Path:
    """d/weights.safetensors, made by pretrain(d) unless a finished run left it there (its `done` marker),
    under d's file lock so that concurrent sweep jobs pretrain once. d/meta.json must give source_test_acc."""
    with _locked(d):
        if (d / "done").exists() and not force:
            meta = json.loads((d / META).read_text())
            console.print(f"pretrained source weights: {d / WEIGHTS} (cached; source test acc "
                          f"{100 * meta['source_test_acc']:.1f}%)")
            return d / WEIGHTS
        (d / "done").unlink(missing_ok=True)
        try:
            pretrain(d)
        except BaseException:
            # a failed pretraining leaves no directory behind (only a lock and half a result would be
            # left for later runs to trip over); a job waiting on the lock notices and starts afresh
            shutil.rmtree(d, ignore_errors=True)
            raise
        (d / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return d / WEIGHTS
