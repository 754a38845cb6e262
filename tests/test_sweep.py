"""Sweeps: one directory per job named after its overrides, relaunching skips finished jobs and reruns the
others, a failing job does not stop the rest and the sweep ends listing it with a non-zero exit; the basic,
joblib and submitit (local: SLURM's code path) launchers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import cli
from thawlab import config
from thawlab.threads import available_cores
from thawlab.train import conf_dir

QUIET = ["debug=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def _jobs(sweep: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "results.json").read_text()) for d in sweep.iterdir()
            if (d / "results.json").exists()}


def test_failures_are_listed_and_a_relaunch_skips_done_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    args = ["-m", *QUIET, "schedule=lp_ft", "schedule.lp_epochs=1,7", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    r = cli(*args, cwd=tmp_path, cache=cache_dir)
    assert r.returncode == 1, r.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 4 and len({j["seed"] for j in jobs.values()}) == 2
    for name, job in jobs.items():  # named after its overrides
        assert f"seed={job['seed']}" in name and f"schedule.lp_epochs={job['config']['schedule']['lp_epochs']}" in name
        assert (job["status"] == "done") == (job["config"]["schedule"]["lp_epochs"] == 1)
        assert (sweep / name / "done").exists() == (job["status"] == "done")
    assert "2 of 4 jobs done" in r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 2 and all("schedule.lp_epochs=7" in line and "must leave both phases" in line
                                    for line in failed)

    # an unfinished job (killed: no done marker) and the failed ones rerun; finished ones are skipped
    done = sorted(n for n, j in jobs.items() if j["status"] == "done")
    (sweep / done[0] / "done").unlink()
    started = {n: j["started"] for n, j in jobs.items()}
    mtime = (sweep / done[1] / "results.json").stat().st_mtime_ns
    dirs = sorted(sweep.iterdir())
    # relaunched with ckpt_path=last (how a cluster sweep is launched): how a job resumes is not part of its
    # name, so the relaunch finds the same directories, and its results record the same overrides
    again = cli(*args, "ckpt_path=last", cwd=tmp_path, cache=cache_dir)
    assert again.returncode == 1
    assert sorted(sweep.iterdir()) == dirs
    assert _jobs(sweep)[done[0]]["overrides"] == jobs[done[0]]["overrides"]
    assert f"skipping {done[1]}: done" in again.stderr
    assert (sweep / done[1] / "results.json").stat().st_mtime_ns == mtime
    assert (sweep / done[0] / "done").exists()
    assert _jobs(sweep)[done[0]]["started"] >= started[done[0]] and "2 of 4 jobs done" in again.stderr


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_and_submitit_launchers(tmp_path, cache_dir, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    # no OMP_NUM_THREADS (pytest-xdist's workers set one): each job takes its share of the cores itself
    r = cli("-m", *QUIET, "schedule=frozen,lp_ft", "seed=3", f"hydra/launcher={launcher}", *extra,
            f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=cache_dir, timeout=600, env={"OMP_NUM_THREADS": None})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(j["config"]["schedule"]["name"] for j in jobs.values()) == ["frozen", "lp_ft"]
    assert all(j["status"] == "done" and j["seed"] == 3 for j in jobs.values())
    assert "2 of 2 jobs done" in r.stderr
    share = f"threads: {max(1, available_cores() // 2)} per process ({available_cores()} cores / 2 jobs at once"
    for name in jobs:
        log = (sweep / name / "train.log").read_text()
        assert share in log, [line for line in log.splitlines() if "threads" in line]


def test_slurm_launcher_config_takes_tasks_and_gpus_from_the_trainer():
    config.register()
    with initialize_config_dir(conf_dir(), version_base="1.3"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", "trainer.devices=4",
                                           "hydra.launcher.partition=gpu"], return_hydra_config=True)
        # the plugin's schema still types the keys, extended explicitly: no deprecated matching by name
        with pytest.raises(ConfigCompositionException, match="mem_gb"):
            compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.mem_gb=lots"],
                    return_hydra_config=True)
    assert not [str(w.message) for w in seen if "ConfigStore schema" in str(w.message)]
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["partition"]) == (4, 4, "gpu")
