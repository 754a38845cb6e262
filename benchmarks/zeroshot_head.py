"""Zero-shot head construction time, 1,000 classes x 80 templates, and the time of a cache hit (a benchmark, run
by hand; not a test).

The head is built as `head=zeroshot` builds it (thawlab.zeroshot.ZeroShotHead.fill: tokenise 80,000 prompts, encode
them with the text tower in batches of 10 classes, average and normalise per class, save under the cache
directory), then built again from the cache (a new head, the same text tower: the key is computed, the file
read). Class names and templates are ImageNet's (OpenCLIP's IMAGENET_CLASSNAMES and the 80 OpenAI templates).

The model: the embedded small CLIP (open_clip:thawlab-mini-clip, registered from thawlab/clip_configs/) when it
is there, random init (the timing does not depend on the weights); else a stand-in of a small CLIP's size,
defined below, also at random init. --model names any other OpenCLIP model (random init).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zeroshot_head.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zeroshot_head.py --model open_clip:RN50 --classes 100
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from thawlab import clip
from thawlab.zeroshot import ZeroShotHead

# a stand-in when the embedded CLIP is not there: a small CLIP's size (text tower 4 layers of width 128)
STAND_IN = {"embed_dim": 128, "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}


def default_model(folder: Path) -> str:
    clip.register_configs()
    if "thawlab-mini-clip" in open_clip.list_models():
        return "open_clip:thawlab-mini-clip"
    (folder / "benchmark-small-clip.json").write_text(json.dumps(STAND_IN))
    open_clip.add_model_config(folder)
    return "open_clip:benchmark-small-clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip:<model> (default: the embedded small CLIP)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=80)
    a = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        name = a.model or default_model(Path(tmp))
        image, text = clip.split(clip.create_clip(name, False), name)
        names = list(open_clip.IMAGENET_CLASSNAMES)[: a.classes]
        templates = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES][: a.templates]
        n_text = sum(p.numel() for p in text.parameters())
        print(f"model {name} (random init), text tower {n_text:,} parameters, context "
              f"{text.model.context_length}; {len(names)} classes x {len(templates)} templates = "
              f"{len(names) * len(templates):,} prompts; torch threads {torch.get_num_threads()}")
        cache = Path(tmp) / "cache"
        # wall-clock and this process's CPU time: on a shared machine the wall clock also counts other jobs
        start, cpu = time.perf_counter(), time.process_time()
        info = ZeroShotHead(image.num_features, len(names)).fill(text, names, templates, cache_dir=cache)
        built, built_cpu = time.perf_counter() - start, time.process_time() - cpu
        assert not info["cached"]
        start, cpu = time.perf_counter(), time.process_time()
        info = ZeroShotHead(image.num_features, len(names)).fill(text, names, templates, cache_dir=cache)
        hit, hit_cpu = time.perf_counter() - start, time.process_time() - cpu
        assert info["cached"]
        n = len(names) * len(templates)
        print(f"built: {built:.2f} s wall, {built_cpu:.2f} s CPU ({n / built_cpu:,.0f} prompts per CPU second); "
              f"cache hit: {hit:.3f} s wall, {hit_cpu:.3f} s CPU (key: text tower digest + classes + templates; "
              f"{built_cpu / hit_cpu:,.0f}x less CPU)")


if __name__ == "__main__":
    main()
