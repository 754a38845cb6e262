"""Wall time of the strategies table's sweep, jobs side by side (joblib) against one at a time (a benchmark, run
by hand; not a test).

The sweep is experiments/strategies/table.py's: `thawlab-train -m schedule=frozen,gradual,full,lp_ft
seed=0,...,S-1` (4 x S jobs, 20 epochs each). It runs twice into fresh sweep directories: with the basic
launcher (one job at a time, torch's threads on every core) and with `hydra/launcher=joblib
hydra.launcher.n_jobs=N` (each job takes cores // N threads itself, thawlab.threads). OMP_NUM_THREADS is removed
from the jobs' environment so that thawlab's own choice is what is measured. The source pretraining is cached
first (not timed). The machine's load average is printed before and after each sweep: on a shared machine the
figures are only as clean as that.

    .venv/bin/python benchmarks/sweep_parallel.py                  # 40 jobs (10 seeds), n_jobs=2
    .venv/bin/python benchmarks/sweep_parallel.py --seeds 2        # 8 jobs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "strategies"))

from table import STRATEGIES  # noqa: E402  (the table's own strategies)

TRAIN = str(Path(sys.executable).parent / "thawlab-train")
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def sweep(out: Path, seeds: int, launcher: list[str], env: dict, extra: list[str]) -> tuple[float, int]:
    """(wall seconds, jobs done) of one sweep into `out`, its output in out.log."""
    cmd = [TRAIN, "-m", f"schedule={','.join(STRATEGIES)}", f"seed={','.join(map(str, range(seeds)))}", *QUIET,
           f"hydra.sweep.dir={out}", *launcher, *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - start
    done = sum(1 for f in out.glob("*/results.json") if json.loads(f.read_text()).get("status") == "done")
    return seconds, done


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="4 x seeds jobs")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, help="sweep directories (default: a fresh temporary directory)")
    ap.add_argument("overrides", nargs="*", help="extra thawlab-train overrides for every job")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="sweep-parallel-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["WANDB_SILENT"] = "true"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = len(STRATEGIES) * a.seeds
    print(f"{jobs} jobs ({a.seeds} seeds x {', '.join(STRATEGIES)}), {cores} cores, sweeps in {out}", flush=True)

    # the pretraining the table's jobs share, cached before anything is timed
    subprocess.run([TRAIN, "schedule=frozen", "trainer.max_epochs=1", *QUIET, f"hydra.run.dir={out}/warm-up",
                    *a.overrides], env=env, check=True, capture_output=True)
    rows = []
    for name, launcher in (("sequential (basic launcher)", []),
                           (f"parallel (joblib n_jobs={a.n_jobs})", ["hydra/launcher=joblib",
                                                                    f"hydra.launcher.n_jobs={a.n_jobs}"])):
        before = load()
        seconds, done = sweep(out / name.split()[0], a.seeds, launcher, env, a.overrides)
        rows.append((name, seconds, done, before, load()))
        print(f"  {name}: {seconds:.0f} s, {done} of {jobs} jobs done (load average {before} -> {load()})",
              flush=True)
    print()
    print("| launcher | jobs done | wall time | per job | load average before -> after |")
    print("|---|---|---|---|---|")
    for name, seconds, done, before, after in rows:
        print(f"| {name} | {done}/{jobs} | {seconds:.0f} s | {seconds / jobs:.1f} s | {before} -> {after} |")
    print(f"parallel/sequential wall time = {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
