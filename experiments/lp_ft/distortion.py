"""Per-set drift of the LP-FT distortion sweep, paired LP-FT − FT over seeds (results.json `diagnostics.final`).

thawlab-report's table carries the distortion ratio averaged over the OOD sets; the paper's account is about each
shift, and about how much features move as well as the ratio, so this prints, per test set, the mean of each
arm and the paired difference with its win count: the OOD/ID ratio, the relative change and the linear CKA of the
pooled features (the head's input).

    python experiments/lp_ft/distortion.py multirun/lp_ft_distortion
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(root: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for f in sorted(root.glob("*/results.json")):
        r = json.loads(f.read_text())
        if r.get("status") == "done" and r.get("diagnostics"):
            out[r["config"]["schedule"]["name"], r["seed"]] = r["diagnostics"]["final"]
    return out


def main(root: Path, a: str = "lp_ft", b: str = "full") -> None:
    runs = load(root)
    seeds = sorted({s for (name, s) in runs if name == a} & {s for (name, s) in runs if name == b})
    sets = list(runs[a, seeds[0]]["feature_change"])
    measures = {
        "distortion OOD/ID": lambda d, s: d["distortion"].get(s),
        "feature change (pooled)": lambda d, s: d["feature_change"][s]["pooled"],
        "linear CKA (pooled)": lambda d, s: d["cka"][s]["pooled"],
    }
    print(f"{a} − {b}, paired over seeds {seeds} ({root})")
    print(f"| measure | set | {a} | {b} | {a} − {b} | {a} lower |")
    print("|---|---|---:|---:|---:|---:|")
    for label, get in measures.items():
        for s in sets:
            va, vb = [get(runs[a, k], s) for k in seeds], [get(runs[b, k], s) for k in seeds]
            if None in va or None in vb:
                continue
            d = [x - y for x, y in zip(va, vb)]
            print(f"| {label} | {s} | {statistics.mean(va):.3f} | {statistics.mean(vb):.3f} | "
                  f"{statistics.mean(d):+.3f} ± {statistics.stdev(d):.3f} | {sum(x < 0 for x in d)} of {len(d)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/lp_ft_distortion"))
