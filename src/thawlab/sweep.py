"""Sweeps (`thawlab-train -m ...`) that can be relaunched and that report their failures.

- Each job's directory is named after its overrides (`schedule=lp_ft,seed=3`), so jobs that start in the same
  second never share one, and relaunching the same sweep finds the same directories (also with `ckpt_path=last`
  added: conf/config.yaml leaves ckpt_path out of the name, how a job resumes is not what it is).
- Relaunching skips jobs whose `done` marker exists and reruns failed or unfinished ones (train.py).
- A failing job does not stop the others (the task function records the failure and returns; see train.py).
  At the end, SweepSummary (a Hydra callback, run by the process that launched the sweep, whatever the
  launcher: basic, joblib or submitit) lists the jobs of this launch that failed and why, and
  `thawlab-train` exits 1. It ends with the commands to run next: the report, and one `wandb sync` for every
  offline W&B run of the sweep.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from thawlab import threads
from thawlab.results import DONE, RESULTS

MAX_NAME = 150  # bytes of a directory name kept readable; longer override lists end in a hash
failed_jobs: list[str] = []  # filled at the end of a sweep, read by thawlab.train.main for the exit status


def job_dir_name(override_dirname: str, job_num: int) -> str:
    """The directory of a sweep job: its overrides, made safe as one path component."""
    name = override_dirname.replace("/", "%2F") or f"job{job_num}"
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[:MAX_NAME - 11].decode(errors="ignore") + "~" + digest
    return name


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time() - 1  # file times have a resolution of a second on some file systems
        failed_jobs.clear()
        # the jobs' processes (joblib workers, submitit tasks) inherit it: each takes its share of the cores
        size = threads.sweep_size(config)
        if size:
            os.environ[threads.SWEEP_JOBS] = str(size)
        else:
            os.environ.pop(threads.SWEEP_JOBS, None)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")
                      if p.stat().st_mtime >= self.started)
        failures = [(job.name, _why(job)) for job in jobs if not (job / DONE).exists()]
        failed_jobs[:] = [name for name, _ in failures]
        print(f"sweep {sweep}: {len(jobs) - len(failures)} of {len(jobs)} jobs done", file=sys.stderr)
        for name, why in failures:
            print(f"  failed: {name}: {why}", file=sys.stderr)
        for line in closing_lines(sweep):
            print(line, file=sys.stderr)


def closing_lines(sweep: Path) -> list[str]:
    """What to run next: the report over the sweep, and one upload of all its offline W&B runs (each job
    logged offline without credentials; the per-job hint is not printed inside a sweep)."""
    lines = [f"report: thawlab-report {sweep}"]
    if any(sweep.glob("*/wandb/offline-run-*")):
        lines.append(f"W&B: logged offline; upload every job of the sweep with "
                     f"`wandb sync {sweep}/*/wandb/offline-run-*`")
    return lines


def _why(job: Path) -> str:
    try:
        result = json.loads((job / RESULTS).read_text())
    except (OSError, ValueError):
        return "unfinished (no results.json)"
    if result.get("status") == "failed":
        return result.get("error", "failed")
    return f"unfinished (status {result.get('status')!r})"
