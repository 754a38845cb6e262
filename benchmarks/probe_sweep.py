"""A probe sweep over seeds on one backbone: the L-BFGS probe on shared features (schedule.solver=lbfgs) against
today's AdamW probe (schedule.solver=adamw), wall time, CPU time and accuracy (a benchmark, run by hand; not a
test).

Each arm is one real multirun, `thawlab-train -m schedule=frozen schedule.solver=S seed=0,...,N-1` (the basic
launcher: the jobs one after another in one process), into a fresh sweep directory and a fresh feature store
(the source pretraining is cached first, not timed). diagnostics=none in both arms: the drift diagnostics run
the network on every test set in every job, which is no part of a probe.

The goal (issue 18): the lbfgs sweep's feature work costs at most 1.2x one feature pass, plus the solver: the
first job computes the features of every training, validation and test set (`features: ... computed in X s`),
the others read them (`from the shared cache in Y s`); each job's solver time is its `L-BFGS probe ... in Z s`.
Both are read from the jobs' results.json (`probe.features.seconds`, `probe.seconds`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_sweep.py                 # 10 seeds, test_resnet on digits
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_sweep.py --seeds 3 --train-per-class 10
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = str(Path(sys.executable).parent / "thawlab-train")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sweep(out: Path, solver: str, a, cache: str) -> dict:
    cmd = [TRAIN, "-m", "schedule=frozen", f"schedule.solver={solver}", f"seed={','.join(map(str, range(a.seeds)))}",
           f"backbone.name={a.model}", f"data.train_per_class={a.train_per_class}", f"trainer.max_epochs={a.epochs}",
           "diagnostics=none", "logger=none", "trainer.enable_progress_bar=false", f"cache_dir={cache}",
           f"hydra.sweep.dir={out}"]
    print("$", " ".join(cmd), flush=True)
    cpu, start = children_cpu(), time.perf_counter()
    with open(f"{out}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("*/results.json"))]
    runs = [r for r in runs if r.get("status") == "done"]
    acc = [r["metrics"]["test/id/acc"] for r in runs]
    ood = [r["metrics"]["test/ood/mean/acc"] for r in runs]
    out_ = {"solver": solver, "jobs": len(runs), "wall_s": wall, "cpu_s": cpu, "id_acc": acc, "ood_acc": ood}
    if solver == "lbfgs" and runs:
        feats = [r["probe"]["features"] for r in runs]
        out_["feature_pass_s"] = sum(f["seconds"] for f in feats if not f["cached"])
        out_["feature_reads_s"] = sum(f["seconds"] for f in feats if f["cached"])
        out_["computed"] = sum(not f["cached"] for f in feats)
        out_["solver_s"] = sum(r["probe"]["seconds"] for r in runs)
        out_["chosen_C"] = [r["probe"]["chosen"]["C"] for r in runs]
    return out_


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20, help="the adamw probe's epochs (trainer.max_epochs)")
    ap.add_argument("--cache", default=None, help="cache_dir holding the source pretraining (default: a fresh one)")
    a = ap.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS", "unset")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = a.cache or str(tmp / "cache")
        # the source pretraining, once, untimed: a one-job run fills the cache (its features go to another store)
        subprocess.run([TRAIN, "schedule=frozen", "trainer.max_epochs=1", "diagnostics=none", "logger=none",
                        f"backbone.name={a.model}", f"cache_dir={cache}", f"hydra.run.dir={tmp / 'warm'}",
                        "trainer.enable_progress_bar=false"], capture_output=True, check=True)
        results = []
        for solver in ("adamw", "lbfgs"):
            store = Path(cache) / "features"
            subprocess.run(["rm", "-rf", str(store)], check=True)  # every arm starts without stored features
            results.append(sweep(tmp / solver, solver, a, cache))
    print(f"\n{a.seeds} jobs, schedule=frozen, {a.model} on digits ({a.train_per_class} training images per class), "
          f"OMP_NUM_THREADS={env_threads}, load average now {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'solver':8} {'jobs':>4} {'wall s':>8} {'CPU s':>8} {'ID acc %':>14} {'OOD mean acc %':>16}")
    for r in results:
        m = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.pstdev(xs):.1f}" if xs else "-"  # noqa: E731
        print(f"{r['solver']:8} {r['jobs']:>4} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {m(r['id_acc']):>14} "
              f"{m(r['ood_acc']):>16}")
    lb = results[1]
    if lb["jobs"]:
        features = lb["feature_pass_s"] + lb["feature_reads_s"]
        print(f"lbfgs: features computed by {lb['computed']} job(s) in {lb['feature_pass_s']:.2f} s, read by the "
              f"others in {lb['feature_reads_s']:.2f} s: the sweep's feature work is {features / lb['feature_pass_s']:.2f}x "
              f"one feature pass (goal <= 1.2x); solver {lb['solver_s']:.2f} s in all; the rest of the wall time "
              f"({lb['wall_s'] - features - lb['solver_s']:.1f} s) is per-job setup, checkpoint, test and source "
              f"retention, as in the adamw arm")
        print(f"chosen C per seed: {', '.join(f'{c:.3g}' for c in lb['chosen_C'])}")


if __name__ == "__main__":
    main()
