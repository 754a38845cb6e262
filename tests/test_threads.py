"""Each sweep job's share of the cores (thawlab.threads): from the launcher's parallelism, the sweep's size and
the job's DDP ranks; an explicit OMP_NUM_THREADS wins; a single run keeps torch's default. The launchers
themselves run in tests/test_sweep.py, which checks what their jobs print."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from thawlab import threads

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
NO_USER = {threads.LAUNCH_OMP: ""}  # thawlab-train launched without OMP_NUM_THREADS


def plan(launcher: dict, env: dict = NO_USER, cores: int = 8, per_job: int = 1, multirun: bool = True):
    return threads.plan(multirun=multirun, launcher=launcher, processes_per_job=per_job, env=env, cores=cores)


@pytest.mark.parametrize("n_jobs, jobs, expected", [
    (2, None, 4), (2, "40", 4), (4, "2", 4),  # never more parallel jobs than the sweep has
    (8, None, 1), (16, None, 1),  # more jobs than cores: one thread each, never zero
    (-1, None, 1), (-2, None, 1), (-5, None, 2),  # joblib's -1 = all cores, -2 = all but one
    (None, None, 8), (1, None, 8),
])
def test_joblib_jobs_share_the_cores(n_jobs, jobs, expected):
    env = {**NO_USER, **({threads.SWEEP_JOBS: jobs} if jobs else {})}
    assert plan({"_target_": JOBLIB, "n_jobs": n_jobs}, env).threads == expected


def test_submitit_local_runs_a_whole_batch_at_once():
    assert plan({"_target_": SUBMITIT_LOCAL}, {**NO_USER, threads.SWEEP_JOBS: "2"}).threads == 4
    assert plan({"_target_": SUBMITIT_LOCAL}, {**NO_USER, threads.SWEEP_JOBS: "40"}).threads == 1
    assert plan({"_target_": SUBMITIT_LOCAL}).threads == 1  # batch size unknown: assume it fills the cores


def test_one_job_at_a_time_takes_every_core_and_ddp_ranks_split_them():
    assert plan({"_target_": BASIC}).threads == 8
    assert plan({"_target_": SLURM}, cores=6).threads == 6  # a SLURM job's own allocation (its affinity)
    p = plan({"_target_": JOBLIB, "n_jobs": 2}, per_job=2)
    assert p.threads == 2 and "2 jobs at once x 2 ranks each" in p.why
    assert plan({"_target_": BASIC}, per_job=3).threads == 2


def test_an_explicit_setting_wins_and_a_launchers_own_does_not():
    # as launched by the user: wins whatever the launcher
    assert plan({"_target_": JOBLIB, "n_jobs": 2}, {threads.LAUNCH_OMP: "3", "OMP_NUM_THREADS": "3"}).threads == 3
    # joblib's loky workers export OMP_NUM_THREADS themselves; the user had set none
    assert plan({"_target_": JOBLIB, "n_jobs": 8}, {**NO_USER, "OMP_NUM_THREADS": "4"}).threads == 1
    # train() called without the console entry point (a script): OMP_NUM_THREADS is all there is
    p = plan({"_target_": JOBLIB, "n_jobs": 8}, {"OMP_NUM_THREADS": "4"})
    assert p.threads == 4 and "set explicitly" in p.why
    assert plan({}, {"OMP_NUM_THREADS": "many"}).threads is None


def test_a_single_run_keeps_torchs_default():
    p = plan({}, multirun=False)
    assert p.threads is None and p.line(current=5) == "threads: 5 per process (torch's default; 8 cores)"


def test_record_launch_setting():
    env = {"OMP_NUM_THREADS": "2"}
    threads.record_launch_setting(env)
    assert threads.explicit(env) == "2"
    env = {}
    threads.record_launch_setting(env)
    env["OMP_NUM_THREADS"] = "1"  # set later by a launcher's worker
    assert threads.explicit(env) is None


def test_apply_sets_torch_and_the_environment_of_child_processes():
    import torch

    before = torch.get_num_threads()
    env = {}
    try:
        assert threads.apply(threads.Plan(1, "test"), env) == 1 and env == {"OMP_NUM_THREADS": "1"}
        assert threads.apply(threads.Plan(None, "default"), env) == 1 and env == {"OMP_NUM_THREADS": "1"}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("task, params, batch, expected", [
    (["schedule=frozen,gradual,full,lp_ft", "seed=0,1,2,3,4,5,6,7,8,9"], {}, None, 40),
    (["schedule=frozen,full", "logger=none"], {"seed": "0,1,2"}, None, 6),  # hydra.sweeper.params count too
    (["seed=range(0,10)"], {}, 4, 4),  # jobs at once: one batch
    (["seed=1"], {}, None, 1),
])
def test_sweep_size_of_the_basic_sweeper(task, params, batch, expected):
    cfg = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                                  "max_batch_size": batch, "params": params},
                                      "overrides": {"task": task}}})
    assert threads.sweep_size(cfg) == expected


def test_sweep_size_unknown_for_other_sweepers():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.OptunaSweeper"},
                                      "overrides": {"task": ["seed=0,1"]}}})
    assert threads.sweep_size(cfg) is None
