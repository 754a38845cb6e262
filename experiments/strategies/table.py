"""The README's strategy table: frozen, gradual, full and lp_ft on the embedded benchmark over seeds.

Runs `thawlab-train -m` (unless --no-run) and aggregates the results.json files: mean, std (sample std, n-1)
and n per strategy, and paired win counts against full fine-tuning (same seed, same data). A run that failed
or is missing lowers n; nothing is averaged over silently.

    .venv/bin/python experiments/strategies/table.py --seeds 10 --out multirun/strategies
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("frozen", "gradual", "full", "lp_ft")
COLUMNS = (("ID", "test/id/acc"), ("OOD printed", "test/ood/printed/acc"),
           ("OOD corrupt s3", "test/ood/corrupt_s3/acc"), ("OOD corrupt s5", "test/ood/corrupt_s5/acc"),
           ("OOD mean", "test/ood/mean/acc"), ("ECE ID", "test/id/ece"),
           ("source task", "test/source/acc"))


def run_sweep(out: Path, seeds: int, extra: list[str]) -> None:
    cmd = [str(Path(sys.executable).parent / "thawlab-train"), "-m", f"schedule={','.join(STRATEGIES)}",
           f"seed={','.join(map(str, range(seeds)))}", "logger=none", "trainer.enable_progress_bar=false",
           f"hydra.sweep.dir={out}", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def collect(out: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {s: {} for s in STRATEGIES}
    for f in sorted(out.glob("*/results.json")):
        r = json.loads(f.read_text())
        if r["status"] == "done" and (f.parent / "done").exists():
            runs[r["config"]["schedule"]["name"]][r["seed"]] = r["metrics"]
    return runs


def table(runs: dict[str, dict[int, dict]]) -> str:
    lines = ["| schedule | n | " + " | ".join(c for c, _ in COLUMNS) + " | OOD printed − full, paired | wins |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    full = runs["full"]
    for s in STRATEGIES:
        seeds = runs[s]
        cells = []
        for _, key in COLUMNS:
            vals = [100 * m[key] for m in seeds.values()]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}" if vals else "–")
        paired = [k for k in seeds if k in full]  # same seed: same head init and batch order
        key = "test/ood/printed/acc"
        diffs = [100 * (seeds[k][key] - full[k][key]) for k in paired]
        wins = sum(d > 0 for d in diffs)
        if s == "full" or not diffs:
            cells += ["–", "–"]
        else:
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            cells += [f"{statistics.mean(diffs):+.1f} ± {sd:.1f}", f"{wins}/{len(paired)}"]
        lines.append(f"| {s} | {len(seeds)} | " + " | ".join(cells) + " |")
    pretrained = {round(100 * m["pretrain/source/acc"], 1) for seeds in runs.values() for m in seeds.values()
                  if "pretrain/source/acc" in m}
    if pretrained:
        lines.append(f"\nsource task: the fine-tuned backbone with the source head on the source test set "
                     f"(forgetting); the pretrained model scores {', '.join(map(str, sorted(pretrained)))}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("multirun/strategies"))
    ap.add_argument("--no-run", action="store_true", help="only aggregate an existing sweep")
    ap.add_argument("overrides", nargs="*", help="extra thawlab-train overrides")
    a = ap.parse_args()
    if not a.no_run:
        run_sweep(a.out, a.seeds, a.overrides)
    text = table(collect(a.out))
    print("accuracy and ECE in %, mean ± std (n-1) over seeds; test metrics of the checkpoint selected on "
          "val/id/acc\n")
    print(text)
    (a.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
