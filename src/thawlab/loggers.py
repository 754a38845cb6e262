"""Loggers, built by Hydra from conf/logger/*.yaml. Each factory takes the same run-time arguments.

W&B: one run per job, group and name from the sweep and the overrides, the resolved config as a plain dict.
Without credentials it logs offline into the run directory and says how to upload (`wandb sync`; in a sweep,
once for all its jobs, at the end: thawlab.sweep). The mode
goes to this run's wandb.init only: Lightning's `offline=True` would set WANDB_MODE for the whole process.
"""
from __future__ import annotations

import netrc
import os
import sys


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def previous_wandb_id(save_dir: str) -> str | None:
    """The id of the latest W&B run in a run directory (online or offline), for a resumed run to continue."""
    from pathlib import Path

    runs = sorted(Path(save_dir, "wandb").glob("*run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    return runs[-1].stem[len("run-"):] if runs else None


def wandb_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
                 job_type: str = "train", entity: str | None = None, resume: bool = False):
    """resume=True (a run resumed with ckpt_path): continue the W&B run the directory already has, same id."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not _wandb_credentials():
        mode = "offline"
        if os.environ.get("RANK", "0") == "0" and group == "single":  # a sweep says it once, at its end
            print(f"W&B: no credentials found, logging offline under {save_dir}/wandb; upload later with "
                  f"`wandb sync {save_dir}/wandb/offline-run-*`", file=sys.stderr)
    kwargs = {"mode": mode} if mode else {}
    run_id = previous_wandb_id(save_dir) if resume else None
    if run_id:
        kwargs.update(id=run_id, resume="allow")
        print(f"W&B: resuming run {run_id}", file=sys.stderr)
    return WandbLogger(project=project, entity=entity, save_dir=save_dir, name=name, group=group,
                       job_type=job_type, config=run_config, **kwargs)


def csv_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
               resume: bool = False):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(run_config)
    return logger


def no_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
              resume: bool = False):
    return False


def finish_wandb(failed: bool) -> None:
    """End the job's W&B run (exit code 1 if it failed) so the next job in a sweep gets a run of its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
