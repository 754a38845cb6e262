"""The embedded benchmark's small CLIP: pretraining wall time, source accuracy and zero-shot accuracy per set.

For each pretraining seed (data.clip_pretrain.seed), pretrains `open_clip:thawlab-mini-clip` on the source task
(force: the timing is measured, not read from a cache; a fresh cache dir) and reports:
- the wall time of the pretraining (run under OMP_NUM_THREADS=1 and =2 to get both figures), and the CPU
  time of the process (on a shared machine the wall time also counts the other processes' turns);
- source test accuracy: image -> caption retrieval among the 34 source classes (the caption templates);
- zero-shot accuracy of OpenCLIP's build_zero_shot_classifier with the target's data.classnames and
  data.templates on the target's test split (id) and every OOD test set; also with a template the
  pretraining never saw, and with the templates the captions used.

    OMP_NUM_THREADS=1 python benchmarks/clip_pretrain.py --seeds 0 1
    python benchmarks/clip_pretrain.py --seeds 0 -- data.clip_pretrain.epochs=2   # any config override after --
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from common import compose_cfg

UNSEEN = ['a handwritten digit "{}".']  # not among the caption templates: how far prompts generalise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from thawlab import clip_pretrain as cp
    from thawlab.build import build_datamodule

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            cfg = compose_cfg(["backbone.name=open_clip:thawlab-mini-clip", f"cache_dir={cache}",
                               f"data.clip_pretrain.seed={seed}", "trainer.enable_progress_bar=false",
                               *args.overrides])
            start, cpu = time.time(), time.process_time()
            path = cp.source_weights(cfg, force=True)
            seconds, cpu = time.time() - start, time.process_time() - cpu
            meta = json.loads((path.parent / "meta.json").read_text())
            model, tokenizer = cp.create(cp.model_name(cfg), str(path))
            dm = build_datamodule(cfg.data, cp.preprocess_of(model, cfg.data.img_size))
            dm.setup("test")
            loaders = dm.eval_dataloaders("test")
            row = {"seed": seed, "threads": torch.get_num_threads(), "pretrain_s": round(seconds, 1),
                   "pretrain_cpu_s": round(cpu, 1),
                   "source_acc": meta["source_test_acc"], "logit_scale": meta["logit_scale"]}
            for label, templates in (("zs", cfg.data.templates), ("zs_unseen", UNSEEN),
                                     ("zs_captions", cfg.data.clip_pretrain.templates)):
                accs = cp.zero_shot_accuracy(model, tokenizer, cfg.data.classnames, templates, loaders)
                row.update({f"{label}/{k.removeprefix('ood/')}": v for k, v in accs.items()})
            rows.append(row)
            print(json.dumps(row))
    keys = [k for k in rows[0] if k not in ("seed", "threads")]
    print(f"\n{'':22}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in rows) + f"{'mean':>10}")
    for k in keys:
        vals = [r[k] for r in rows]
        pct = k not in ("pretrain_s", "pretrain_cpu_s", "logit_scale")
        fmt = (lambda v: f"{100 * v:10.1f}") if pct else (lambda v: f"{v:10.1f}")
        print(f"{k:22}" + "".join(fmt(v) for v in vals) + fmt(sum(vals) / len(vals)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
