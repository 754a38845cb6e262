"""How many threads a job's training process uses: its share of the machine's cores.

torch starts with a thread per core whatever else runs beside it. A sweep whose launcher runs jobs side by side
(`hydra/launcher=joblib hydra.launcher.n_jobs=N`; `submitit_local`, which starts every job of a batch at once)
would put N x cores threads on the cores, which then wait on each other: several-fold slower than one job at a
time. So each sweep job takes cores // (jobs running at once x processes per job) threads, at least 1, and
exports it as OMP_NUM_THREADS for the processes it starts (DDP ranks, data-loader workers).

An explicit OMP_NUM_THREADS wins. "Explicit" means set when `thawlab-train` was launched: joblib's loky
workers export their own OMP_NUM_THREADS (cores // n_jobs, the same rule without the sweep's size), so
thawlab.train.main records the user's value in THAWLAB_LAUNCH_OMP_NUM_THREADS before any launcher runs.
A single run (no sweep) keeps torch's default, as does anything that calls train() in its own process (a
script or a test that set its threads itself).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LAUNCH_OMP = "THAWLAB_LAUNCH_OMP_NUM_THREADS"  # OMP_NUM_THREADS as thawlab-train was launched ('' = unset)
SWEEP_JOBS = "THAWLAB_SWEEP_JOBS"  # jobs in the sweep (or in a launcher batch), set by the launching process


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, SLURM's cgroup), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def record_launch_setting(env: dict = os.environ) -> None:
    """Called by the console entry point, before Hydra: the user's OMP_NUM_THREADS, if any. Launchers start
    their workers later, from this process, so the record reaches every job whatever the workers set."""
    env[LAUNCH_OMP] = env.get("OMP_NUM_THREADS", "")


def explicit(env: Mapping[str, str]) -> str | None:
    """The user's own OMP_NUM_THREADS (not one a launcher set in its workers), or None."""
    value = env[LAUNCH_OMP] if LAUNCH_OMP in env else env.get("OMP_NUM_THREADS", "")
    return value.strip() or None


@dataclass(frozen=True)
class Plan:
    threads: int | None  # None: leave torch's default
    why: str

    def line(self, current: int) -> str:
        n = self.threads if self.threads is not None else current
        return f"threads: {n} per process ({self.why})"


def concurrent_jobs(launcher: Mapping, jobs: int | None, cores: int) -> tuple[int, str]:
    """(jobs of the sweep running at once on this machine, the launcher as the user wrote it)."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = launcher.get("n_jobs", -1)
        # joblib's own reading: None is 1, -1 all cores, -2 all but one...
        n = 1 if n_jobs is None else (max(1, cores + 1 + n_jobs) if n_jobs < 0 else max(1, n_jobs))
        what = f"joblib n_jobs={n_jobs}"
    elif target.endswith("submitit_launcher.LocalLauncher"):
        n = jobs if jobs else cores  # every job of a batch at once; an unknown batch size: assume many
        what = "submitit_local, every job of a batch at once"
    else:  # the basic launcher runs jobs one at a time; SLURM's jobs have cores of their own (affinity)
        return 1, "basic launcher" if "BasicLauncher" in target or not target else target.rsplit(".", 1)[-1]
    return (min(n, jobs) if jobs else n), what


def plan(*, multirun: bool, launcher: Mapping, processes_per_job: int, env: Mapping[str, str],
         cores: int | None = None) -> Plan:
    """Threads for each process of this job; processes_per_job: its DDP ranks on this machine (1 otherwise)."""
    user = explicit(env)
    if user is not None:
        try:
            return Plan(max(1, int(user)), f"OMP_NUM_THREADS={user}, set explicitly")
        except ValueError:
            return Plan(None, f"OMP_NUM_THREADS={user!r} is not a number: torch's default")
    cores = cores or available_cores()
    if not multirun:
        return Plan(None, f"torch's default; {cores} cores")
    jobs = env.get(SWEEP_JOBS, "")
    parallel, what = concurrent_jobs(launcher, int(jobs) if jobs.isdigit() else None, cores)
    procs = parallel * max(1, processes_per_job)
    ranks = f" x {processes_per_job} ranks each" if processes_per_job > 1 else ""
    at_once = "1 job at a time" if parallel == 1 else f"{parallel} jobs at once"
    return Plan(max(1, cores // procs), f"{cores} cores / {at_once}{ranks}; {what}")


def apply(p: Plan, env: dict = os.environ) -> int:
    """Set torch's intra-op threads and export OMP_NUM_THREADS for child processes; returns the count."""
    import torch

    if p.threads is not None:
        torch.set_num_threads(p.threads)
        env["OMP_NUM_THREADS"] = str(p.threads)
    return torch.get_num_threads()


def sweep_size(config) -> int | None:
    """Jobs a Hydra sweep launches at once (the basic sweeper: its overrides' cross product, cut in batches of
    hydra.sweeper.max_batch_size); None for other sweepers or what cannot be parsed here."""
    try:
        sweeper = config.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += list(config.hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args),
                                               sweeper.get("max_batch_size"))
        return max((len(b) for b in batches), default=None) or None
    except Exception:  # noqa: BLE001 (e.g. glob() choices need the config loader): the size stays unknown
        return None
