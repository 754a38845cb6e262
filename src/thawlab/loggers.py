"""Loggers, built by Hydra from conf/logger/*.yaml. Each factory takes the same run-time arguments.

W&B: one run per job, group and name from the sweep and the overrides, the resolved config as a plain dict.
Without credentials it logs offline into the run directory and says how to upload (`wandb sync`). The mode
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


def wandb_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab",
                 job_type: str = "train", entity: str | None = None):
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not _wandb_credentials():
        mode = "offline"
        print(f"W&B: no credentials found, logging offline under {save_dir}/wandb; upload later with "
              f"`wandb sync {save_dir}/wandb/offline-run-*`", file=sys.stderr)
    kwargs = {"mode": mode} if mode else {}
    return WandbLogger(project=project, entity=entity, save_dir=save_dir, name=name, group=group,
                       job_type=job_type, config=run_config, **kwargs)


def csv_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab"):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(run_config)
    return logger


def no_logger(save_dir: str, name: str, group: str, run_config: dict, project: str = "thawlab"):
    return False


def finish_wandb(failed: bool) -> None:
    """End the job's W&B run (exit code 1 if it failed) so the next job in a sweep gets a run of its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
