"""Shared test helpers: compose the real configs and run real (short) trainings in temporary directories."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import forked_cli
from thawlab import config
from thawlab.clip import CONFIGS_ENV as CLIP_CONFIGS_ENV
from thawlab.results import read_results
from thawlab.train import conf_dir, train

TRAIN = str(Path(sys.executable).parent / "thawlab-train")
# fast, deterministic defaults for every test run; tests add their own overrides after these
BASE = ["debug=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs `-n 2`), each worker gets its share of the cores: torch processes
    that each use every core wait on each other several-fold. An explicit OMP_NUM_THREADS wins. Set in the
    environment too, so that the thawlab-train subprocesses a test starts inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        from thawlab.threads import available_cores

        threads = max(1, available_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Test files that take minutes (seconds of CPU on 2 cores, fresh clone), run first: pytest-xdist hands files to the
# workers in collection order (`make test` turns off its reordering by test count, which put these one-test files
# last), so the longest start first and the short ones fill the gaps, instead of one worker running the surgical
# findings alone for the last three minutes. Each worker starts with two files (the 1st and 3rd, the 2nd and 4th):
# the second is not a findings file, since the findings share one pretraining that the first computes while
# another findings file would wait for its lock.
SLOW_FIRST = ("test_findings_surgical.py", "test_ddp.py", "test_findings_lp_ft.py", "test_clip.py",
              "test_findings_wise_ft.py", "test_report.py", "test_report_zeroshot.py", "test_resume.py",
              "test_sweep.py", "test_notebook.py", "test_clip_pretrain.py", "test_selection.py", "test_wandb.py",
              "test_selection_rules.py", "test_projection.py", "test_probe.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One pretraining cache for the whole session: the smoke pretraining runs once. Under pytest-xdist the
    workers share it (the directory above each worker's own basetemp): thawlab.pretrain fills each entry once
    under a file lock, so the worker that comes second waits and reads it, as concurrent sweep jobs do."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "thawlab-cache"
        shared.mkdir(exist_ok=True)
        return str(shared)
    return str(tmp_path_factory.mktemp("thawlab-cache"))


def compose_cfg(overrides: list[str], run_dir: Path | None = None):
    config.register()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=run_dir is not None)
    if run_dir is None:
        return cfg
    with open_dict(cfg):  # what Hydra's run_job fills in before calling the task function
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.override_dirname = ",".join(overrides)
        cfg.hydra.overrides.task = list(overrides)
        cfg.hydra.job.name = "test"
        cfg.hydra.mode = "RUN"
    HydraConfig.instance().set_config(cfg)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(task_cfg, True)
    return task_cfg


@pytest.fixture
def run(tmp_path, cache_dir):
    """run(*overrides) -> results.json of a real in-process training in a fresh directory."""
    counter = iter(range(1000))

    def _run(*overrides: str, smoke: bool = True, name: str | None = None) -> dict:
        """name: the run directory's name, to run again in the same directory (resume)."""
        run_dir = tmp_path / (name or f"run{next(counter)}")
        base = BASE if smoke else BASE[1:]
        cfg = compose_cfg([*base, f"cache_dir={cache_dir}", *overrides], run_dir)
        train(cfg)
        out = read_results(run_dir)
        out["run_dir"] = run_dir
        return out

    return _run


def pretrained_weights(results: dict) -> dict:
    """The source-pretrained weights a run (backbone.pretrained=source) started from."""
    from safetensors.torch import load_file

    from thawlab.pretrain import WEIGHTS, cache_dir

    return load_file(str(cache_dir(OmegaConf.create(results["config"])) / WEIGHTS))


def add_callbacks(monkeypatch, *callbacks) -> None:
    """Every Trainer that train() builds from now on also runs these callbacks (a test's probes)."""
    import thawlab.build as build

    real = build.build_trainer

    def with_callbacks(*a, **kw):
        trainer = real(*a, **kw)
        trainer.callbacks.extend(callbacks)
        return trainer

    monkeypatch.setattr(build, "build_trainer", with_callbacks)


class Killed(RuntimeError):
    pass


class KillAfter(L.Callback):
    """Ends the run after epoch `epoch`, once its checkpoint is on disk (Lightning writes checkpoints after
    every other callback's epoch end), as a kill would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch + 1:
            raise Killed(f"killed after epoch {self.epoch}")


# variables thawlab and its libraries read while running, not when starting or importing: a process forked from
# an interpreter that has imported them sees them as a new interpreter would
RUN_TIME_ENV = {"THAWLAB_CACHE", "THAWLAB_DATA", CLIP_CONFIGS_ENV, "WANDB_SILENT", "WANDB_MODE", "OMP_NUM_THREADS"}


def cli(*args: str, cwd: Path, cache: str, timeout: float = 300, env: dict | None = None, fresh: bool = False):
    """thawlab-train as a user runs it: a process of its own, with its exit code and its streams. env: variables
    to set, or to remove (None). The process is forked from one that imported thawlab already (tests/forked_cli.py:
    the same entry point, without seconds of imports per call); fresh=True, or a variable outside RUN_TIME_ENV: a
    new interpreter running the console script."""
    e = {**os.environ, "THAWLAB_CACHE": cache, "WANDB_SILENT": "true", **(env or {})}
    e = {k: v for k, v in e.items() if v is not None}
    if fresh or not set(env or ()) <= RUN_TIME_ENV:
        return subprocess.run([TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    return forked_cli.run([TRAIN, *args], cwd=cwd, env=e, timeout=timeout)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache_dir):
    """The findings tests' runs: experiment(paper, *overrides) -> results.json of a real run with experiments/<paper>'s configs."""
    root = tmp_path_factory.mktemp("findings")
    counter = iter(range(10_000))

    def _run(paper: str, *overrides: str) -> dict:
        run_dir = root / f"{paper}-{next(counter)}"
        # diagnostics=none: the findings are test accuracies, which the drift measurement after training never
        # changes (it draws no random number the run uses); it is tested in test_diagnostics.py
        cfg = compose_cfg([f"hydra.searchpath=[file://{EXPERIMENTS / paper}]", "logger=none",
                           "trainer.enable_progress_bar=false", "diagnostics=none", f"cache_dir={cache_dir}",
                           *overrides], run_dir)
        train(cfg)
        r = read_results(run_dir)
        assert r["status"] == "done", r.get("error")
        return {**r, "run_dir": run_dir}

    return _run
